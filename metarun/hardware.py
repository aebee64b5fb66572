"""Device, mixed precision and threads. Mirrors ``configs/hardware``."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Hardware:
    """Where and in which precision a run computes.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        amp: ``off``, ``bf16`` or ``fp16`` autocast for the forward passes; ``fp16`` adds
            dynamic loss scaling for the meta-gradient.
        num_threads: CPU threads for torch; ``None`` keeps torch's default.
        channels_last: store images and conv weights as NHWC (``torch.channels_last``);
            about 1.4x faster for conv4 on large batches on a CPU (ProtoNet's 60-way
            episodes), slower for MAML's 5-image tasks: see ``docs/RESULTS.md``.
        compile: ``torch.compile`` the backbone's forward (in place, so checkpoints keep
            their keys). ``compile_backend`` picks the compiler: ``inductor`` (generated
            kernels; needs a C++ compiler on a CPU) or ``eager`` (graph capture only).
    """

    def __init__(
        self,
        device: str,
        amp: str = "off",
        num_threads: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
    ):
        amp = getattr(amp, "value", amp)
        if amp not in AMP_DTYPES:
            raise ValueError(f"unknown amp mode {amp!r}; choose one of {list(AMP_DTYPES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "hardware=cuda was asked for but torch sees no CUDA device; use hardware=cpu "
                "or hardware=auto."
            )
        self.amp = amp
        if self.device.type == "cpu" and amp == "bf16" and not cpu_has_bf16():
            log.warning(
                "hardware.amp=bf16 on a CPU without bf16 instructions (avx512_bf16 or AMX): "
                "bf16 is emulated there and several times slower than fp32 "
                "(docs/RESULTS.md); hardware.amp=off is faster on this machine."
            )
        if num_threads:
            torch.set_num_threads(num_threads)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.compile = compile
        self.compile_backend = compile_backend

    def compile_backbone(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """``torch.compile`` of ``backbone``'s forward when ``compile`` is on (in place)."""
        if self.compile:
            backbone.compile(backend=self.compile_backend)
        return backbone

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Moves ``module`` (an algorithm) to the device (and to NHWC weights with
        ``channels_last``). Refuses a compiled backbone under an algorithm that
        differentiates through its own gradient steps: the compiled backward of
        ``inductor`` (and of every AOTAutograd backend) has no double backward."""
        second_order = getattr(module, "first_order", True) is False
        if self.compile and second_order and self.compile_backend != "eager":
            raise ValueError(
                f"hardware.compile=true with compile_backend={self.compile_backend} cannot "
                f"run second-order {type(module).__name__}: torch.compile's compiled backward "
                "has no double backward. Use algo.first_order=true, "
                "hardware.compile_backend=eager, or hardware.compile=false."
            )
        return module.to(self.device, memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op when ``amp`` is off)."""
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def describe(self) -> dict[str, str | int]:
        return {
            "device": str(self.device),
            "amp": self.amp,
            "threads": torch.get_num_threads(),
            "channels_last": self.memory_format == torch.channels_last,
            "compile": self.compile_backend if self.compile else False,
        }


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX), so that
    ``hardware.amp=bf16`` speeds a CPU run up instead of slowing it down."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)
