"""Times one stream update of an online head (OML's and ANML's continual phase): a single
example's cross-entropy over every output, backward, and an Adam step, with the optimiser
the streams use (:func:`metarun.continual.methods.base.make_optimizer`, fused where torch
has it) against torch's default Adam.

Usage:
    python scripts/bench_stream_step.py [--features 2304] [--classes 792] [--threads 1]

Prints the median milliseconds per update of each (after warm-up) and their ratio, with the
largest difference between the two heads' weights after the same updates (the fused step
is the same update up to rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from metarun.continual.methods.base import make_optimizer


def timed_updates(fused: bool, args: argparse.Namespace) -> tuple[list[float], torch.Tensor]:
    """Milliseconds of each of ``args.repeats`` updates (after ``args.warmup``) and the
    head's final weight; the same head and examples for both optimisers."""
    torch.manual_seed(0)
    head = torch.nn.Linear(args.features, args.classes)
    if fused:
        opt = make_optimizer("adam", head.parameters(), 1e-3)
    else:
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    times = []
    for i in range(args.warmup + args.repeats):
        x = torch.randn(1, args.features, generator=g)
        y = torch.randint(0, args.classes, (1,), generator=g)
        tic = time.perf_counter()
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(1e3 * (time.perf_counter() - tic))
    return times, head.weight.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=2304)
    parser.add_argument("--classes", type=int, default=792)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default, w_default = timed_updates(False, args)
    streams, w_streams = timed_updates(True, args)
    a, b = statistics.median(default), statistics.median(streams)
    head = f"head {args.classes} x {args.features}"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {head}")
    print(f"torch.optim.Adam (default):   {a:.2f} ms per update")
    print(f"metarun's stream optimiser:   {b:.2f} ms per update  ({a / b:.2f}x)")
    print(f"largest weight difference after {args.warmup + args.repeats} updates: "
          f"{(w_default - w_streams).abs().max().item():.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
