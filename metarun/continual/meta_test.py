"""The meta-continual benchmark of OML and ANML (Javed & White 2019; Beaulieu et al. 2020):
after one meta-training, many short streams of unseen classes, each learned one image per
update in one pass, then scored.

For each number of classes ``N`` (10, 50, 100, 200, 600) and each of ``draws`` seeded draws
of ``N`` evaluation characters: the learner restarts from its meta-trained state
(:meth:`~metarun.continual.methods.base.ContinualLearner.begin_stream`), sees the
``train_shots`` (15) training drawings of the first class, then of the second, ... one per
update, once; it is then scored on the other drawings of every class ("meta-test test") and
on the training drawings themselves ("meta-test train", what was kept of what was seen),
among the ``N`` classes of the stream. The numbers are the mean over draws with a 95%
confidence interval (Student's t, ``draws - 1`` degrees of freedom).

A learner with a continual-phase learning rate has it chosen for each ``N`` from
``lr_grid`` on streams of characters held out of meta-training (background alphabets, never
evaluation characters): the rate with the best mean meta-test-test accuracy over
``selection_draws`` streams of ``min(N, held-out characters)`` classes.

Learners whose stream learning only touches a head on fixed features
(``capabilities.frozen_embedding``) have every image embedded once; the others learn from
the images. Every draw, every split of a character's drawings and every presentation order
comes from the benchmark's seed, so every learner meets the same streams.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from metarun.continual.methods.base import ContinualLearner
from metarun.continual.scenarios import MetaTestBenchmark
from metarun.data.episodes import ClassPool
from metarun.stats import mean_t_ci95


@dataclass
class Stream:
    """One stream: pool class indices ``classes (N,)`` (label ``i`` is ``classes[i]``),
    pool image indices ``train (N, train_shots)`` in presentation order (class after
    class) and ``test (N, others)``."""

    classes: torch.Tensor
    train: torch.Tensor
    test: torch.Tensor


def draw_stream(pool: ClassPool, n: int, train_shots: int, seed: int) -> Stream:
    """``n`` classes of ``pool`` and a split of each one's drawings, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.randperm(pool.n_classes, generator=g)[:n]
    train, test = [], []
    for c in classes.tolist():
        items = pool.class_items[c][: int(pool.counts[c])]
        if items.numel() <= train_shots:
            raise ValueError(
                f"class {pool.class_names[c]} has {items.numel()} images; the benchmark "
                f"needs more than train_shots = {train_shots}"
            )
        items = items[torch.randperm(items.numel(), generator=g)]
        train.append(items[:train_shots])
        test.append(items[train_shots:])
    return Stream(classes, torch.stack(train), torch.stack(test))


def stream_seed(seed: int, phase: str, n: int, draw: int) -> int:
    """The seed of draw ``draw`` of ``n`` classes in ``phase`` (``selection`` or
    ``evaluation``): independent of the learner, so every learner gets the same streams."""
    return (seed * 1_000_003 + {"selection": 1, "evaluation": 2}[phase] * 10_007 + n) * 101 + draw


@dataclass
class Inputs:
    """What a learner learns from: images (``(n, C, H, W)`` floats) or, for a learner with
    a frozen embedding, their features ``(n, d)``; indexed by pool image index."""

    values: torch.Tensor

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.values[idx]


def prepare_inputs(
    method: ContinualLearner, pool: ClassPool, hardware: Any, batch: int = 1000
) -> Inputs:
    """The pool's images as the learner takes them: on the run's device (and memory format),
    embedded once for a frozen-embedding learner."""
    images = pool.images
    out = []
    for chunk in images.split(batch):
        x = chunk.to(hardware.device).float().div_(255)
        if x.dim() == 4:
            x = x.contiguous(memory_format=hardware.memory_format)
        if method.capabilities.frozen_embedding:
            with hardware.autocast():
                x = method.embed(x).float()
        out.append(x)
    return Inputs(torch.cat(out))


@torch.no_grad()
def _accuracy(
    method: ContinualLearner, inputs: Inputs, items: torch.Tensor, hardware: Any
) -> float:
    """Accuracy on the images ``items (N, k)`` (row ``i`` has label ``i``), among the
    ``N`` classes of the stream."""
    n = items.shape[0]
    labels = torch.arange(n).repeat_interleave(items.shape[1]).to(hardware.device)
    flat = items.flatten()
    method.eval()
    correct = 0
    for idx, y in zip(flat.split(1000), labels.split(1000), strict=True):
        x = inputs[idx.to(inputs.values.device)]
        with hardware.autocast():
            if method.capabilities.frozen_embedding:
                logits = method.predict_embedded(x)
            else:
                logits = method(x)
        correct += int((logits.float()[:, :n].argmax(1) == y).sum())
    return correct / flat.numel()


def learn_stream(
    method: ContinualLearner,
    snapshot: dict | None,
    inputs: Inputs,
    stream: Stream,
    lr: float | None,
    hardware: Any,
    order_seed: int,
) -> dict[str, float]:
    """Learns ``stream`` one image per update from the meta-trained state (class after
    class; a ``cumulative`` learner, joint training, sees the same images in a shuffled
    order), puts back that state, ``snapshot``, for a learner that changes more than a
    head (so the next stream, and a checkpoint written now, start from it), and returns
    its meta-test test and train accuracies.

    The global random state while the stream is learned (a fresh head's initial weights)
    is seeded by ``order_seed``, and a learner with a ``snapshot`` starts from it, its
    sampling generator included; so a stream's result does not depend on which streams
    ran before it: ``metarun test=`` with other ``scenario.sizes`` reproduces the shared
    ones, and the rates of the grid are compared on the same initial heads."""
    device = torch.device(hardware.device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(order_seed)
        n, shots = stream.train.shape
        method.begin_stream(lr, n)
        labels = torch.arange(n).repeat_interleave(shots)
        items = stream.train.flatten()
        if method.cumulative:
            perm = torch.randperm(
                items.numel(), generator=torch.Generator().manual_seed(order_seed)
            )
            items, labels = items[perm], labels[perm]
        frozen = method.capabilities.frozen_embedding
        seen = 0
        for k in range(items.numel()):
            y = int(labels[k])
            seen = max(seen, y + 1)
            classes = torch.arange(seen if not method.cumulative else n, device=hardware.device)
            x = inputs[items[k : k + 1].to(inputs.values.device)]
            target = torch.tensor([y], device=hardware.device)
            with hardware.autocast():
                if frozen:
                    method.observe_embedded(x, target, classes, score=False)
                else:
                    method.observe(x, target, classes)
            last_of_class = k + 1 == items.numel() or int(labels[k + 1]) != y
            if last_of_class and not method.cumulative:

                def sample(m: int, c: int = y) -> tuple[torch.Tensor, torch.Tensor]:
                    idx = stream.train[c][:m]
                    return inputs[idx.to(inputs.values.device)], torch.full((idx.numel(),), c)

                method.end_task(sample, classes)
        result = {
            "test": _accuracy(method, inputs, stream.test, hardware),
            "train": _accuracy(method, inputs, stream.train, hardware),
        }
        if snapshot is not None:  # learners that change more than a head: back to the start
            method.load_state_dict(snapshot)
    return result


Progress = Callable[[str, dict[str, Any]], bool]
"""``progress(key, result) -> stop``: called after each stream with its key (e.g.
``evaluation/600/3``) and result; the recipe records it (resume) and says whether to stop."""


def stream_count(method: ContinualLearner, bench: MetaTestBenchmark) -> int:
    """How many streams :func:`run_benchmark` learns: the selection streams (each rate of
    the grid, on ``min(N, held-out characters)`` classes: sizes beyond the held-out set
    share them) and the reported ones."""
    selection = 0
    if _chooses_rate(method, bench):
        sizes = {min(n, bench.selection.n_classes) for n in bench.sizes}
        selection = len(sizes) * len(bench.lr_grid) * bench.selection_draws
    return selection + len(bench.sizes) * bench.draws


def _chooses_rate(method: ContinualLearner, bench: MetaTestBenchmark) -> bool:
    """Whether the benchmark chooses ``method``'s continual-phase rate from ``lr_grid``."""
    return method.capabilities.stream_lr and len(bench.lr_grid) > 1


def run_benchmark(
    method: ContinualLearner,
    bench: MetaTestBenchmark,
    hardware: Any,
    done: dict[str, dict[str, float]],
    progress: Progress,
) -> dict[str, Any] | None:
    """Selects the learning rates, then runs every reported stream; ``done`` holds the
    streams of an interrupted run (skipped). Returns the results, or ``None`` when
    ``progress`` asked to stop."""
    frozen = method.capabilities.frozen_embedding
    snapshot = None if frozen else copy.deepcopy(method.state_dict())
    tune = _chooses_rate(method, bench)
    chosen: dict[int, float | None] = {}
    if tune:
        inputs = prepare_inputs(method, bench.selection, hardware)
        for n in bench.sizes:
            n_sel = min(n, bench.selection.n_classes)
            scores = {}
            for lr in bench.lr_grid:
                accs = []
                for d in range(bench.selection_draws):
                    key = f"selection/{n_sel}/{lr:g}/{d}"
                    if key not in done:
                        seed = stream_seed(bench.seed, "selection", n_sel, d)
                        stream = draw_stream(bench.selection, n_sel, bench.train_shots, seed)
                        done[key] = learn_stream(
                            method, snapshot, inputs, stream, lr, hardware, seed
                        )
                        if progress(key, done[key]):
                            return None
                    accs.append(done[key]["test"])
                scores[lr] = sum(accs) / len(accs)
            chosen[n] = max(bench.lr_grid, key=lambda lr, s=scores: (s[lr], -lr))
        del inputs
    inputs = prepare_inputs(method, bench.evaluation, hardware)
    per_size = {}
    for n in bench.sizes:
        fixed = bench.lr_grid[0] if method.capabilities.stream_lr else None
        lr = chosen.get(n) if tune else fixed
        runs = []
        for d in range(bench.draws):
            key = f"evaluation/{n}/{d}"
            if key not in done:
                seed = stream_seed(bench.seed, "evaluation", n, d)
                stream = draw_stream(bench.evaluation, n, bench.train_shots, seed)
                done[key] = learn_stream(method, snapshot, inputs, stream, lr, hardware, seed)
                if progress(key, done[key]):
                    return None
            runs.append(done[key])
        entry: dict[str, Any] = {"lr": lr}
        for part in ("test", "train"):
            values = [r[part] for r in runs]
            mean, ci = mean_t_ci95(values)
            entry[part] = {"mean": mean, "ci95": ci if not math.isnan(ci) else None}
            entry[part]["values"] = values
        if tune:
            n_sel = min(n, bench.selection.n_classes)
            entry["selection"] = {
                f"{lr:g}": sum(done[f"selection/{n_sel}/{lr:g}/{d}"]["test"] for d in
                               range(bench.selection_draws)) / bench.selection_draws
                for lr in bench.lr_grid
            }  # fmt: skip
            entry["selection_classes"] = n_sel
        per_size[str(n)] = entry
    return {"per_size": per_size}
