"""metarun against learn2learn 0.2.0, side by side, on the same model, episodes and settings.

    bash scripts/install_learn2learn.sh     # once, into the environment that runs this
    METARUN_DATA=../shared/data python scripts/benchmark_l2l.py --rounds 3 --out docs/BENCHMARKS.md
    METARUN_DATA=../shared/data python scripts/benchmark_l2l.py --device cuda --amp bf16

Every measurement runs in a fresh process (so its peak memory is its own) and the two
libraries alternate, A/B/A/B, for ``--rounds`` rounds; the table gives medians over the
rounds and the ratio learn2learn / metarun (> 1: metarun is faster or smaller).
``--device cuda`` runs both on the GPU (episodes sampled on the CPU, as each library does,
then moved); ``--amp bf16`` autocasts both libraries' forward passes alike.
``--metarun-amp bf16`` and ``--channels-last`` change metarun's side only (its
``hardware.amp`` and ``hardware.channels_last`` options), to time metarun as it is best run
on a machine against learn2learn as its examples run (fp32, default memory format).

Cases (Omniglot, Vinyals split, 28x28, conv4 with 64 channels, Adam 1e-3):
    sampling   5-way 1-shot 15-query training episodes: metarun's ``EpisodeSampler`` vs
               learn2learn's ``TaskDataset`` with ``NWays``/``KShots``/``LoadData``/
               ``RemapLabels``/``ConsecutiveLabels`` over the same images, held in memory
               as tensors like metarun's (episodes/s).
    tasksets   the same metarun sampler against learn2learn's own Omniglot pipeline as its
               examples get it, ``l2l.vision.benchmarks.get_tasksets("omniglot", ...)``
               (``FullOmniglot`` read through torchvision with the Resize/ToTensor
               transforms, ``FusedNWaysKShots``, ``LoadData``, ``RemapLabels``,
               ``ConsecutiveLabels``, ``RandomClassRotation``), from the zips of
               ``$METARUN_DATA/omniglot`` extracted once into the user cache (episodes/s).
    maml2      MAML second order, 5-way 1-shot 15-query, meta-batch 32, 1 inner step of
               0.4: seconds per meta-update (metarun ``algo.engine=loop``; learn2learn
               ``l2l.algorithms.MAML`` with ``clone()``/``adapt()``), episodes pre-sampled.
    maml2v     the same with metarun's ``algo.engine=vmap`` against the same learn2learn loop.
    maml2p     the same with metarun's loop split over two single-threaded processes, as
               ``torchrun --nproc_per_node=2`` runs it (gloo all-reduce of the
               meta-gradient; peak memory is the two processes' sum), against the same
               single-process learn2learn loop (CPU only).
    maml1      the same as maml2, first order.
    protonet   ProtoNet 60-way 1-shot 5-query, end to end (sampling + training step), s/step.
    eval       MAML test-time adaptation (3 steps) on N 5-way 1-shot 15-query episodes,
               sampling included: seconds for ``--eval-episodes`` episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = ("sampling", "tasksets", "maml2", "maml2v", "maml2p", "maml1", "protonet", "eval")
UNITS = {
    "sampling": "episodes/s",
    "tasksets": "episodes/s",
    "maml2": "s/step",
    "maml2v": "s/step",
    "maml2p": "s/step",
    "maml1": "s/step",
    "protonet": "s/step",
    "eval": "s",
}
HIGHER_IS_BETTER = {"sampling", "tasksets"}


def _setup(seed: int = 0):
    import torch

    from metarun.data.omniglot import Omniglot

    data = os.environ.get("METARUN_DATA")
    cache = os.environ.get("METARUN_CACHE")
    pool = Omniglot(data, cache).pool("train")
    torch.manual_seed(seed)
    return pool


def _l2l_taskset(pool, ways: int, per_class: int):
    """learn2learn's episode pipeline over the same uint8 images as metarun's pool."""
    import learn2learn as l2l
    import torch

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return int(pool.counts.sum())

        def __getitem__(self, i: int):
            return pool.images[i].float().div_(255), int(labels[i])

    labels = torch.empty(pool.images.shape[0], dtype=torch.long)
    labels_to_indices = {}
    for c in range(pool.n_classes):
        items = pool.class_items[c][pool.class_items[c] >= 0]
        labels[items] = c
        labels_to_indices[c] = items.tolist()
    meta = l2l.data.MetaDataset(Images(), labels_to_indices=labels_to_indices)
    transforms = [
        l2l.data.transforms.NWays(meta, ways),
        l2l.data.transforms.KShots(meta, per_class),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    return l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)


def _l2l_omniglot_root() -> str:
    """A folder laid out as torchvision's ``Omniglot`` (and so learn2learn's
    ``FullOmniglot``) reads it offline, ``omniglot-py/images_{background,evaluation}/``,
    extracted once from the zips in ``$METARUN_DATA/omniglot`` into the user cache."""
    import zipfile

    from metarun.data.files import cache_root, data_root

    root = cache_root(os.environ.get("METARUN_CACHE")) / "l2l-omniglot"
    for name in ("images_background", "images_evaluation"):
        target = root / "omniglot-py" / name
        if not target.is_dir():
            source = data_root(os.environ.get("METARUN_DATA")) / "omniglot" / f"{name}.zip"
            partial = root / "omniglot-py" / f"{name}.partial"
            with zipfile.ZipFile(source) as archive:
                archive.extractall(partial)
            (partial / name).rename(target)
            partial.rmdir()
    return str(root)


def _l2l_episode(taskset, shots: int):
    """One learn2learn task split into support and query: every (shots+queries)-th image
    of each class goes to the support set, as in learn2learn's examples."""
    import torch

    x, y = taskset.sample()
    support = torch.zeros(x.shape[0], dtype=torch.bool)
    for c in range(int(y.max()) + 1):
        support[torch.nonzero(y == c).flatten()[:shots]] = True
    return x[support], y[support], x[~support], y[~support]


def _conv4_head(ways: int):
    import torch

    from metarun.models import Conv4

    torch.manual_seed(0)
    backbone = Conv4(input_shape=(1, 28, 28))
    return torch.nn.Sequential(backbone, torch.nn.Linear(backbone.out_features, ways))


def _median_time(step, repeats: int, warmup: int = 2) -> float:
    import torch

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        tic = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def worker(
    case: str,
    impl: str,
    repeats: int,
    eval_episodes: int,
    device: str = "cpu",
    amp: str = "off",
    metarun_amp: str | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from metarun.algorithms import MAML, ProtoNet
    from metarun.data.episodes import Episode, EpisodeSampler
    from metarun.distributed import DataParallel
    from metarun.evaluation import evaluate, fixed_episodes
    from metarun.hardware import Hardware
    from metarun.models import Conv4

    pool = _setup()
    dev = torch.device(device)
    l2l_autocast = Hardware(device, amp=amp).autocast  # learn2learn's precision
    hardware = Hardware(device, amp=metarun_amp or amp, channels_last=channels_last)
    autocast = hardware.autocast if impl == "metarun" else l2l_autocast
    fmt = hardware.memory_format if impl == "metarun" else torch.contiguous_format
    rss_after_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if impl == "l2l":
        import learn2learn as l2l

    if case in ("sampling", "tasksets"):
        if impl == "metarun":
            sampler = EpisodeSampler(pool, 5, 1, 15, seed=0)
            sample = sampler.sample
        elif case == "sampling":
            taskset = _l2l_taskset(pool, 5, 16)

            def sample():
                return _l2l_episode(taskset, 1)
        else:
            # torchvision's Omniglot accepts a folder only next to the official zips (it
            # checks their MD5); the PNGs here are the same, repacked, so skip that check.
            from torchvision.datasets import Omniglot as TorchvisionOmniglot

            TorchvisionOmniglot._check_integrity = lambda self: True
            taskset = l2l.vision.benchmarks.get_tasksets(
                "omniglot",
                train_ways=5,
                train_samples=16,
                test_ways=5,
                test_samples=16,
                root=_l2l_omniglot_root(),
            ).train

            def sample():
                return _l2l_episode(taskset, 1)

        n = 200
        seconds = _median_time(lambda: [sample() for _ in range(n)], repeats)
        value = n / seconds
    elif case in ("maml2", "maml2v", "maml2p", "maml1"):
        first_order = case == "maml1"
        sampler = EpisodeSampler(pool, 5, 1, 15, seed=0)
        episodes = [sampler.sample().to(dev, fmt) for _ in range(32)]
        if impl == "metarun":
            engine = "vmap" if case == "maml2v" else "loop"
            algo = MAML(Conv4(input_shape=(1, 28, 28)), 5, 0.4, 1, 3, first_order, engine=engine)
            algo.model.load_state_dict(_conv4_head(5).state_dict())
            algo = hardware.prepare(algo)
            optimizer = torch.optim.Adam(algo.parameters(), 1e-3)
            batches = [Episode.stack(episodes)] if engine == "vmap" else episodes
            parallel = DataParallel(dev)  # one process of one, except for maml2p
            batches = parallel.share(batches)

            def step():
                optimizer.zero_grad()
                for batch in batches:
                    with autocast():
                        loss, _ = algo.meta_loss(batch)
                    (loss * batch.tasks / 32).backward()
                parallel.sum_gradients(algo)
                optimizer.step()
        else:
            maml = l2l.algorithms.MAML(_conv4_head(5), lr=0.4, first_order=first_order).to(dev)
            optimizer = torch.optim.Adam(maml.parameters(), 1e-3)

            def step():
                optimizer.zero_grad()
                for ep in episodes:
                    with autocast():
                        learner = maml.clone()
                        learner.adapt(F.cross_entropy(learner(ep.support_x), ep.support_y))
                        loss = F.cross_entropy(learner(ep.query_x), ep.query_y)
                    (loss / 32).backward()
                optimizer.step()

        value = _median_time(step, repeats)
    elif case == "protonet":
        if impl == "metarun":
            sampler = EpisodeSampler(pool, 60, 1, 5, seed=0)
            algo = hardware.prepare(ProtoNet(Conv4(input_shape=(1, 28, 28))))
            optimizer = torch.optim.Adam(algo.parameters(), 1e-3)

            def step():
                optimizer.zero_grad()
                with autocast():
                    loss, _ = algo.meta_loss(sampler.sample().to(dev, fmt))
                loss.backward()
                optimizer.step()
        else:
            taskset = _l2l_taskset(pool, 60, 6)
            model = Conv4(input_shape=(1, 28, 28)).to(dev)
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)

            def step():
                optimizer.zero_grad()
                sx, sy, qx, qy = (t.to(dev) for t in _l2l_episode(taskset, 1))
                with autocast():
                    z = model(torch.cat([sx, qx]))
                    order = torch.argsort(sy)  # prototypes in label order (1 shot per class)
                    protos = z[: sx.shape[0]][order]
                    logits = -torch.cdist(z[sx.shape[0] :].float(), protos.float()).pow(2)
                    loss = F.cross_entropy(logits, qy)
                loss.backward()
                optimizer.step()

        value = _median_time(step, repeats)
    elif case == "eval":
        if impl == "metarun":
            algo = MAML(Conv4(input_shape=(1, 28, 28)), 5, 0.4, 1, 3)
            algo.model.load_state_dict(_conv4_head(5).state_dict())
            algo = hardware.prepare(algo)

            def run_eval():
                evaluate(algo, fixed_episodes(pool, 5, 1, 15, 0), eval_episodes, hardware)
        else:
            taskset = _l2l_taskset(pool, 5, 16)
            maml = l2l.algorithms.MAML(_conv4_head(5), lr=0.4).to(dev)

            def run_eval():
                for _ in range(eval_episodes):
                    sx, sy, qx, qy = (t.to(dev) for t in _l2l_episode(taskset, 1))
                    with autocast():
                        learner = maml.clone()
                        for _ in range(3):
                            learner.adapt(F.cross_entropy(learner(sx), sy))
                        with torch.no_grad():
                            (learner(qx).argmax(1) == qy).float().mean().item()

        value = _median_time(run_eval, 1, warmup=0)
    else:
        raise ValueError(f"unknown case {case!r}; choose from {CASES}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":  # the GPU's peak matters there, not the host's
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
        rss_after_setup = 0
    if case == "maml2p" and impl == "metarun":  # both processes' memory, rank 0's time
        peak_mb, rss_after_setup = parallel.sum(
            torch.tensor(peak_mb), torch.tensor(rss_after_setup)
        )
        peak_mb, rss_after_setup = float(peak_mb), float(rss_after_setup)
        if not parallel.is_main:
            sys.exit(0)
        parallel.close()
    return {
        "value": value,
        "peak_mb": peak_mb,
        "peak_above_setup_mb": peak_mb - rss_after_setup / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    parser.add_argument("--eval-episodes", type=int, default=600)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"], help="autocast dtype")
    parser.add_argument(
        "--metarun-amp", default=None, choices=["off", "bf16"], help="metarun's alone"
    )
    parser.add_argument(
        "--channels-last", action="store_true", help="metarun's hardware.channels_last"
    )
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        result = worker(
            *args.worker,
            args.repeats,
            args.eval_episodes,
            args.device,
            args.amp,
            args.metarun_amp,
            args.channels_last,
        )
        print(json.dumps(result))
        return
    try:
        import learn2learn  # noqa: F401
    except ImportError:
        sys.exit("learn2learn is not installed here: run bash scripts/install_learn2learn.sh")

    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for case in args.cases:
            for impl in ("metarun", "l2l") if r % 2 == 0 else ("l2l", "metarun"):
                launcher, env, threads = [sys.executable], None, args.threads
                if case == "maml2p" and impl == "metarun":
                    if args.device != "cpu":
                        sys.exit("maml2p compares CPU processes: run it with --device cpu")
                    launcher += ["-m", "torch.distributed.run", "--standalone"]
                    launcher += ["--nproc_per_node=2"]
                    env, threads = {**os.environ, "OMP_NUM_THREADS": "1"}, 1
                command = [*launcher, __file__, "--worker", case, impl]
                command += ["--repeats", str(args.repeats)]
                command += ["--eval-episodes", str(args.eval_episodes)]
                command += ["--device", args.device, "--amp", args.amp]
                if args.metarun_amp:
                    command += ["--metarun-amp", args.metarun_amp]
                if args.channels_last:
                    command.append("--channels-last")
                if threads:
                    command += ["--threads", str(threads)]
                out = subprocess.run(command, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.exit(f"{case}/{impl} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((case, impl), []).append(result)
                print(f"round {r + 1} {case:9s} {impl:8s} {result}", flush=True)
    print(table(results, args))
    if args.out:
        args.out.write_text(table(results, args) + "\n")


def table(results: dict, args: argparse.Namespace) -> str:
    import platform

    import torch

    cuda = args.device.startswith("cuda")
    gpu = f", {torch.cuda.get_device_name()}" if cuda else ""
    memory = "GPU memory" if cuda else "RSS"
    ours = (f" --metarun-amp {args.metarun_amp}" if args.metarun_amp else "") + (
        " --channels-last" if args.channels_last else ""
    )
    lines = [
        f"Measured by `python scripts/benchmark_l2l.py --cases {' '.join(args.cases)} --rounds "
        f"{args.rounds} --repeats {args.repeats} --eval-episodes {args.eval_episodes} --device "
        f"{args.device} --amp {args.amp}{ours}` (torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}{gpu}).",
        "",
        f"| case | unit | metarun | learn2learn | ratio | peak {memory} metarun / l2l (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for case in args.cases:
        ours = statistics.median(x["value"] for x in results[(case, "metarun")])
        theirs = statistics.median(x["value"] for x in results[(case, "l2l")])
        ratio = ours / theirs if case in HIGHER_IS_BETTER else theirs / ours
        mem_ours = statistics.median(x["peak_mb"] for x in results[(case, "metarun")])
        mem_theirs = statistics.median(x["peak_mb"] for x in results[(case, "l2l")])
        lines.append(
            f"| {case} | {UNITS[case]} | {ours:.4g} | {theirs:.4g} | {ratio:.2f}x | "
            f"{mem_ours:.0f} / {mem_theirs:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
