"""Data-parallel meta-training across processes started by ``torchrun``.

    torchrun --nproc_per_node=2 -m metarun.cli experiment=maml_omniglot_5w1s hardware=cpu

Every process draws the same meta-batch from the same seeded sampler and computes the
meta-gradient of its share of the tasks (task ``i`` goes to rank ``i % world_size``).
The gradients are then summed across processes with one all-reduce, so every process
applies the same update as a single process computing the whole meta-batch would
(the test checks this). Batch-norm running statistics are averaged across processes
after each update. Validation, checkpoints, logs and the final test run on rank 0 only.

This is what ``DistributedDataParallel`` does for an ordinary model, done by hand: the
inner loop runs the network through ``torch.func.functional_call`` several times per
task, which DDP's forward hooks do not follow. The backend is gloo on CPU and NCCL on
CUDA. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) nothing here does
anything and the run is an ordinary single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class DataParallel:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without torchrun)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th, from ``rank``."""
        return list(items[self.rank :: self.world_size])

    def sum_gradients(self, module: nn.Module) -> None:
        """Sums the gradients of ``module`` over the processes (one all-reduce)."""
        if not self.enabled:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def copy_from_main(self, module: nn.Module) -> None:
        """Gives every process rank 0's parameters and buffers (the starting point)."""
        if not self.enabled:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def average_buffers(self, module: nn.Module) -> None:
        """Averages floating-point buffers (batch-norm running statistics) over processes."""
        if not self.enabled:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world_size

    def sum(self, *values: torch.Tensor) -> Iterator[torch.Tensor]:
        """Sums scalar tensors over the processes (one all-reduce) and returns them."""
        stacked = torch.stack([v.detach().float() for v in values])
        if self.enabled:
            dist.all_reduce(stacked)
        return iter(stacked.unbind())

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
