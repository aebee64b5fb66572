"""Device, mixed precision and threads. Mirrors ``configs/hardware``."""

from __future__ import annotations

import contextlib

import torch

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
    """

    def __init__(
        self,
        device: str,
        amp: str = "off",
        num_threads: int | None = None,
        channels_last: bool = False,
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
        if num_threads:
            torch.set_num_threads(num_threads)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Moves ``module`` to the device (and to NHWC weights with ``channels_last``)."""
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
        }
