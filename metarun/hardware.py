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
    """

    def __init__(self, device: str, amp: str = "off", num_threads: int | None = None):
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

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op when ``amp`` is off)."""
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def describe(self) -> dict[str, str | int]:
        return {"device": str(self.device), "amp": self.amp, "threads": torch.get_num_threads()}
