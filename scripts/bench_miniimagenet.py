"""Times the miniImageNet pipeline: cache build and load, episode sampling, and training
steps of conv4 and ResNet-12 on 5-way episodes at 84x84.

Usage:
    METARUN_DATA=../shared/data python scripts/bench_miniimagenet.py [--threads 1] [--device cpu]

The cache is built in a fresh temporary folder (so the build is timed from the JPEGs) and
removed afterwards. Step times are medians over ``--repeats`` steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch


def train_step(algo: torch.nn.Module, episode) -> None:
    """One meta-training step's compute: the episode's meta-loss and its backward pass."""
    algo.zero_grad(set_to_none=True)
    algo.meta_loss(episode)[0].backward()


def median_seconds(step, repeats: int, sync) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("METARUN_DATA"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    from metarun.algorithms import MAML, ProtoNet
    from metarun.data.episodes import EpisodeSampler
    from metarun.data.miniimagenet import MiniImageNet
    from metarun.models import Conv4, ResNet12

    cache = tempfile.mkdtemp(prefix="metarun-bench-")
    try:
        tic = time.perf_counter()
        MiniImageNet(args.data_dir, cache, split="val_test_reduced")
        build = time.perf_counter() - tic
        tic = time.perf_counter()
        data = MiniImageNet(args.data_dir, cache, split="val_test_reduced")
        load = time.perf_counter() - tic
    finally:
        shutil.rmtree(cache)
    print(f"cache build, val+test classes (21600 JPEGs -> 84x84 uint8): {build:.1f} s")
    print(f"cache load (both splits, with the source check): {load:.2f} s")

    pool = data.pool("test")
    sampler = EpisodeSampler(pool, ways=5, shots=1, query_shots=15, seed=0)
    tic = time.perf_counter()
    for _ in range(args.episodes):
        sampler.sample()
    sample_rate = args.episodes / (time.perf_counter() - tic)
    tic = time.perf_counter()
    for _ in range(args.episodes):
        sampler.sample().to(device)
    sync()
    to_rate = args.episodes / (time.perf_counter() - tic)
    print(
        f"episodes/s, 5-way 1-shot 15-query at 84x84: {sample_rate:.0f} sampled (uint8), "
        f"{to_rate:.0f} sampled and converted to float on {device}"
    )

    episode = sampler.sample().to(device)
    models = {
        "conv4-32": lambda: Conv4((3, 84, 84), hidden=32),
        "conv4-64": lambda: Conv4((3, 84, 84), hidden=64),
        "resnet12": lambda: ResNet12((3, 84, 84)),
    }
    for name, build_model in models.items():
        torch.manual_seed(0)
        algo = ProtoNet(build_model()).to(device).train()
        seconds = median_seconds(lambda a=algo: train_step(a, episode), args.repeats, sync)
        print(
            f"{name}: ProtoNet forward+backward, 5-way 1-shot 15-query episode "
            f"(80 images): {1000 * seconds:.0f} ms"
        )
    for name in ("conv4-32", "resnet12"):
        torch.manual_seed(0)
        algo = (
            MAML(models[name](), ways=5, fast_lr=0.01, adaptation_steps=5, test_adaptation_steps=10)
            .to(device)
            .train()
        )

        repeats = args.repeats if name == "conv4-32" or device.type == "cuda" else 3
        seconds = median_seconds(lambda a=algo: train_step(a, episode), repeats, sync)
        print(
            f"{name}: MAML second-order meta-loss+backward, 5 inner steps, 5-way 1-shot "
            f"15-query episode: {1000 * seconds:.0f} ms"
        )
    print(f"threads {torch.get_num_threads()}, device {device}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
