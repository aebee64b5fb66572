"""Task streams. Mirrors ``configs/scenario``.

A scenario is a list of :class:`Task` objects learned in order, plus the rule that says
which outputs are in play (``incremental``, following van de Ven & Tolias 2019, "Three
scenarios for continual learning"):

``task``: a task's own classes only (multi-head through masking; the task is known).
``class``: every class seen so far (one growing head; the task is not known at test time).
``domain``: all outputs, always (the label space is shared by all tasks).

A regression stream (``sinusoid_stream``) has no classes: its tasks are functions, its one
output is shared, and each task is scored by its mean squared error instead of accuracy
(``Scenario.task``).

Stream order and task composition come from the scenario's ``seed`` and are recorded in
``results.json`` (:meth:`Scenario.describe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from metarun.data.episodes import ClassPool
from metarun.tasks import CLASSIFICATION, REGRESSION, TaskKind

INCREMENTAL = ("task", "class", "domain")


class ScenarioError(ValueError):
    """A scenario that cannot be built, or one combined with a method that cannot learn it."""


def declares(task: TaskKind = CLASSIFICATION, meta_training: bool | str = False):
    """Declares, on a scenario builder, what its stream holds before it is built (read by
    :func:`metarun.checks.check_continual`): the ``task`` kind of its tasks, and whether it
    provides a meta-training set (``True``/``False``, or the name of the builder's option
    whose positive value gives one)."""

    def mark(builder):
        builder.task, builder.meta_training = task, meta_training
        return builder

    return mark


@dataclass
class Task:
    """One task of the stream.

    Attributes:
        name: for reports, e.g. ``digits 0,1`` or ``permutation 3``.
        classes: ``(k,)`` global labels the task uses (empty for regression).
        train_x: ``(n_train, C, H, W)`` uint8 images (shared with other tasks when
            ``permutation`` is set), or ``(n_train, d)`` float inputs (regression).
        train_y: ``(n_train,)`` global labels, or ``(n_train, 1)`` float targets.
        test_x: ``(n_test, C, H, W)`` uint8, or ``(n_test, d)`` float.
        test_y: ``(n_test,)``, or ``(n_test, 1)`` float.
        permutation: ``(C*H*W,)`` pixel permutation applied when inputs are drawn, or None.
    """

    name: str
    classes: torch.Tensor
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    permutation: torch.Tensor | None = None

    def size(self, split: str) -> int:
        return (self.train_y if split == "train" else self.test_y).numel()

    def inputs(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``idx`` of ``split`` as ``(floats in [0, 1] (n, C, H, W), labels (n,))``;
        float inputs and targets (regression) are returned as they are stored."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        if x.is_floating_point():
            return x.index_select(0, idx), y.index_select(0, idx)
        images = x.index_select(0, idx).float().div_(255)
        if self.permutation is not None:
            flat = images.flatten(1).index_select(1, self.permutation)
            images = flat.view_as(images)
        return images, y.index_select(0, idx)


def draw(tasks: list[Task], split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ``idx`` of the concatenation of ``tasks``' ``split`` data (joint training
    draws from several tasks at once); returns ``(x (n, C, H, W), y (n,))`` in ``idx`` order."""
    if len(tasks) == 1:
        return tasks[0].inputs(split, idx)
    ends = torch.tensor([t.size(split) for t in tasks]).cumsum(0)
    owner = torch.searchsorted(ends, idx, right=True)
    starts = ends - ends.new_tensor([t.size(split) for t in tasks])
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    order: list[torch.Tensor] = []
    for k in owner.unique().tolist():
        where = torch.nonzero(owner == k).flatten()
        x, y = tasks[k].inputs(split, idx[where] - starts[k])
        xs.append(x)
        ys.append(y)
        order.append(where)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(xs)[inverse], torch.cat(ys)[inverse]


@dataclass
class Scenario:
    """A stream of tasks and how it is trained and scored.

    Attributes:
        tasks: in stream order.
        n_classes: outputs of the head (global labels are ``0..n_classes-1``); 0 for a
            regression stream, whose head has ``task.outputs`` outputs.
        input_shape: ``(C, H, W)``, or ``(d,)`` for vector inputs.
        incremental: ``task``, ``class`` or ``domain`` (module docstring).
        epochs: passes over each task's training data.
        batch_size: training examples per step (1 for the OML online protocol).
        meta_train: classes (or, for regression, :class:`SineFunctions`) for a
            meta-training phase before the stream (OML), or None.
        info: what else defines the protocol, recorded with the results.
        task: what the tasks ask: ``CLASSIFICATION`` (cross-entropy, scored by accuracy)
            or ``REGRESSION`` (MSE loss, scored by MSE); see
            :class:`metarun.algorithms.base.TaskKind`.
    """

    tasks: list[Task]
    n_classes: int
    input_shape: tuple[int, int, int]
    incremental: str
    epochs: int
    batch_size: int
    meta_train: ClassPool | SineFunctions | None = None
    info: dict = field(default_factory=dict)
    task: TaskKind = CLASSIFICATION

    def __post_init__(self) -> None:
        if self.incremental not in INCREMENTAL:
            raise ScenarioError(
                f"unknown incremental={self.incremental!r}; choose one of {INCREMENTAL}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ScenarioError(
                f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}"
            )
        if not self.tasks:
            raise ScenarioError("the stream has no tasks")

    def train_classes(self, task: int) -> torch.Tensor:
        """Outputs in play while training on ``task``: ``(k,)`` global labels."""
        return self.eval_classes(task, task)

    def eval_classes(self, after: int, task: int) -> torch.Tensor:
        """Outputs in play when scoring ``task`` after training on tasks ``0..after``
        (``after = -1``: before any training). Empty when no class has been seen yet."""
        if self.incremental == "domain":
            return torch.arange(self.n_classes)
        if self.incremental == "task":
            return self.tasks[task].classes
        seen = [t.classes for t in self.tasks[: after + 1]]
        return torch.cat(seen).unique() if seen else torch.empty(0, dtype=torch.long)

    def describe(self) -> dict:
        """The stream as recorded in ``results.json``: order and composition of each task."""
        return {
            "incremental": self.incremental,
            "n_tasks": len(self.tasks),
            "n_classes": self.n_classes,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "meta_train_classes": getattr(self.meta_train, "n_classes", None),
            "tasks": [
                {
                    "name": t.name,
                    "classes": t.classes.tolist(),
                    "train_examples": t.size("train"),
                    "test_examples": t.size("test"),
                }
                for t in self.tasks
            ],
            **self.info,
        }


def _mnist(root: str | None, variant: str, download: bool):
    from metarun.data.mnist import MNIST

    return MNIST(root, variant=variant, download=download)


def _subset(labels: torch.Tensor, classes: list[int], limit: int | None, g: torch.Generator):
    """Indices of ``labels`` in ``classes``, at most ``limit`` of them (a seeded draw)."""
    idx = torch.nonzero(torch.isin(labels, torch.tensor(classes))).flatten()
    if limit is not None and limit < idx.numel():
        idx = idx[torch.randperm(idx.numel(), generator=g)[:limit]].sort().values
    return idx


@declares()
def split_mnist(
    root: str | None,
    incremental: str = "class",
    classes_per_task: int = 2,
    shuffle_classes: bool = False,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 128,
    train_per_task: int | None = None,
    variant: str = "mnist",
    download: bool = True,
) -> Scenario:
    """Split-MNIST: the ten digits in tasks of ``classes_per_task`` (Zenke et al. 2017).

    Args:
        root: data folder with ``mnist/`` inside.
        incremental: ``task`` or ``class`` (``domain`` is a different benchmark: relabel
            each pair to 0/1; not offered).
        classes_per_task: digits per task; must divide 10.
        shuffle_classes: draw the digit order from ``seed``; otherwise 0,1 | 2,3 | ...
        seed: seeds the digit order and the ``train_per_task`` subset.
        epochs, batch_size: the training budget per task (see :class:`Scenario`).
        train_per_task: keep at most this many training examples per task (None: all).
        variant: ``mnist`` or ``fashion_mnist``.
        download: fetch missing files (official URLs, MD5 checked).
    """
    if incremental not in ("task", "class"):
        raise ScenarioError(f"split_mnist supports incremental=task or class, got {incremental!r}")
    if classes_per_task < 1 or 10 % classes_per_task:
        raise ScenarioError(f"classes_per_task must divide 10, got {classes_per_task}")
    data = _mnist(root, variant, download)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(10, generator=g).tolist() if shuffle_classes else list(range(10))
    tasks = []
    for start in range(0, 10, classes_per_task):
        classes = order[start : start + classes_per_task]
        tr = _subset(data.train_labels, classes, train_per_task, g)
        te = _subset(data.test_labels, classes, None, g)
        tasks.append(
            Task(
                f"digits {','.join(map(str, classes))}",
                torch.tensor(classes),
                data.train_images[tr],
                data.train_labels[tr],
                data.test_images[te],
                data.test_labels[te],
            )
        )
    return Scenario(
        tasks,
        10,
        data.image_shape,
        incremental,
        epochs,
        batch_size,
        info={"benchmark": f"split_{variant}", "class_order": order, "seed": seed},
    )


@declares()
def permuted_mnist(
    root: str | None,
    n_tasks: int = 10,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 128,
    train_per_task: int | None = None,
    variant: str = "mnist",
    download: bool = True,
) -> Scenario:
    """Permuted-MNIST (Goodfellow et al. 2013; Kirkpatrick et al. 2017): every task is the
    full ten-digit problem with its own fixed pixel permutation, drawn from ``seed``; the
    first task is permuted too. Domain-incremental: the ten outputs are shared.

    Args:
        root: data folder with ``mnist/`` inside.
        n_tasks: number of permutations.
        seed: seeds the permutations and the ``train_per_task`` subsets.
        epochs, batch_size: the training budget per task.
        train_per_task: training examples per task, a seeded subset (None: all 60,000).
        variant: ``mnist`` or ``fashion_mnist``.
        download: fetch missing files.
    """
    if n_tasks < 1:
        raise ScenarioError(f"n_tasks must be >= 1, got {n_tasks}")
    data = _mnist(root, variant, download)
    g = torch.Generator().manual_seed(seed)
    pixels = math.prod(data.image_shape)
    tasks = []
    all_classes = list(range(10))
    for t in range(n_tasks):
        perm = torch.randperm(pixels, generator=g)
        tr = _subset(data.train_labels, all_classes, train_per_task, g)
        tasks.append(
            Task(
                f"permutation {t}",
                torch.arange(10),
                data.train_images[tr] if train_per_task else data.train_images,
                data.train_labels[tr] if train_per_task else data.train_labels,
                data.test_images,
                data.test_labels,
                permutation=perm,
            )
        )
    return Scenario(
        tasks,
        10,
        data.image_shape,
        "domain",
        epochs,
        batch_size,
        info={"benchmark": f"permuted_{variant}", "seed": seed},
    )


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """``(n, C, H, W)`` uint8 images turned counter-clockwise about their centre by
    ``degrees``, nearest pixel, zeros outside: the same pixels as PIL's
    ``Image.rotate(degrees, resample=NEAREST)`` (GEM's ``mnist_rotations`` generator)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    grid = torch.nn.functional.affine_grid(
        theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False
    )
    turned = torch.nn.functional.grid_sample(
        images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return turned.round().to(torch.uint8)


@declares()
def mnist_rotations(
    root: str | None,
    n_tasks: int = 20,
    samples_per_task: int = 1000,
    min_angle: float = 0.0,
    max_angle: float = 180.0,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 10,
    download: bool = True,
) -> Scenario:
    """MNIST Rotations, the GEM/MER protocol (Lopez-Paz & Ranzato 2017; Riemer et al. 2019;
    La-MAML, Gupta et al. 2020): task ``t`` of ``n_tasks`` is the ten-digit problem with
    every image turned by one angle drawn uniformly from ``[min + t w, min + (t + 1) w)``
    degrees, ``w = (max - min) / n_tasks``; ``samples_per_task`` training images (a seeded
    draw from the 60,000) and the full 10,000-image test set, both turned, per task.
    Domain-incremental (the ten outputs are shared); one pass by default.

    Args:
        root: data folder with ``mnist/`` inside.
        n_tasks, samples_per_task: 20 and 1000 in the papers.
        min_angle, max_angle: 0 and 180 degrees in the papers.
        seed: seeds the angles and the training draws (recorded in results.json).
        epochs, batch_size: the training budget per task.
        download: fetch missing files.
    """
    if not min_angle <= max_angle:
        raise ScenarioError(f"min_angle must be <= max_angle, got {min_angle}, {max_angle}")
    data = _mnist(root, "mnist", download)
    g = torch.Generator().manual_seed(seed)
    width = (max_angle - min_angle) / n_tasks
    angles, tasks = [], []
    for t in range(n_tasks):
        angle = min_angle + width * (t + float(torch.rand((), generator=g)))
        tr = _subset(data.train_labels, list(range(10)), samples_per_task, g)
        angles.append(round(angle, 4))
        tasks.append(
            Task(
                f"rotation {angle:.1f} deg",
                torch.arange(10),
                rotate(data.train_images[tr], angle),
                data.train_labels[tr],
                rotate(data.test_images, angle),
                data.test_labels,
            )
        )
    return Scenario(
        tasks,
        10,
        data.image_shape,
        "domain",
        epochs,
        batch_size,
        info={"benchmark": "mnist_rotations", "seed": seed, "angles": angles},
    )


@declares(meta_training=True)
def omniglot_continual(
    root: str | None,
    cache_dir: str | None,
    n_classes: int = 50,
    train_shots: int = 15,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 1,
    image_size: int = 28,
    download: bool = True,
) -> Scenario:
    """Omniglot continual, after OML (Javed & White 2019): meta-train on the 964 background
    characters, then learn ``n_classes`` unseen characters of the evaluation set one at a
    time (each class is a task), from ``train_shots`` drawings each, shown once by default
    (``epochs=1``, ``batch_size=1``); each class is scored on its other ``20 - train_shots``
    drawings, over all classes seen so far (class-incremental).

    Args:
        root, cache_dir, image_size, download: as for ``dataset=omniglot``.
        n_classes: length of the stream (the paper goes up to 200 at 84x84).
        train_shots: training drawings per class (the paper: 15 of 20).
        seed: which evaluation characters, in which order, and which drawings train.
        epochs, batch_size: passes over each class's drawings and examples per step.
    """
    from metarun.data.omniglot import DRAWINGS, Omniglot

    if not 1 <= train_shots < DRAWINGS:
        raise ScenarioError(f"train_shots must be in 1..{DRAWINGS - 1}, got {train_shots}")
    data = Omniglot(root, cache_dir, split="lake", image_size=image_size, download=download)
    background = torch.cat([data.pool("train").images, data.pool("val").images])
    names = data.pool("train").class_names + data.pool("val").class_names
    meta_train = ClassPool.from_grouped(
        background.view(len(names), DRAWINGS, *background.shape[1:]), names
    )
    evaluation = data.pool("test")
    if n_classes < 1 or n_classes > evaluation.n_classes:
        raise ScenarioError(
            f"n_classes must be in 1..{evaluation.n_classes} (the evaluation characters), "
            f"got {n_classes}"
        )
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(evaluation.n_classes, generator=g)[:n_classes]
    tasks = []
    for label, c in enumerate(picked.tolist()):
        items = evaluation.class_items[c][torch.randperm(DRAWINGS, generator=g)]
        tr, te = items[:train_shots], items[train_shots:]
        tasks.append(
            Task(
                evaluation.class_names[c],
                torch.tensor([label]),
                evaluation.images[tr],
                torch.full((train_shots,), label),
                evaluation.images[te],
                torch.full((DRAWINGS - train_shots,), label),
            )
        )
    return Scenario(
        tasks,
        max(n_classes, meta_train.n_classes),  # head rows: also one per meta-training class
        data.image_shape,
        "class",
        epochs,
        batch_size,
        meta_train=meta_train,
        info={
            "benchmark": "omniglot_continual",
            "seed": seed,
            "image_size": image_size,
            "train_shots": train_shots,
            "meta_train_split": "background (964 characters)",
        },
    )


@dataclass
class MetaTestBenchmark:
    """The benchmark's data and protocol (the scenario object of
    ``scenario=omniglot_meta_continual``).

    Attributes:
        meta_train: the classes meta-training draws from.
        selection: classes held out of meta-training, for choosing learning rates.
        evaluation: the classes the reported streams are drawn from.
        sizes: the numbers of classes ``N`` per stream.
        draws: reported streams per ``N``.
        selection_draws: streams per learning rate and ``N`` in the selection.
        train_shots: training drawings per class (the others score the class).
        lr_grid: candidate continual-phase learning rates.
        seed: seeds every draw, split and order.
        input_shape, n_classes: one image's shape; outputs of a learner's head (at least
            the meta-training classes and the largest ``N``).
        info: what else defines the protocol (recorded in results.json).
    """

    meta_train: ClassPool
    selection: ClassPool
    evaluation: ClassPool
    sizes: list[int]
    draws: int
    selection_draws: int
    train_shots: int
    lr_grid: list[float]
    seed: int
    input_shape: tuple[int, ...]
    n_classes: int
    info: dict = field(default_factory=dict)
    task: TaskKind = CLASSIFICATION

    def describe(self) -> dict[str, Any]:
        return {
            "benchmark": self.info.get("benchmark"),
            "sizes": self.sizes,
            "draws": self.draws,
            "selection_draws": self.selection_draws,
            "train_shots": self.train_shots,
            "lr_grid": self.lr_grid,
            "seed": self.seed,
            "meta_train_classes": self.meta_train.n_classes,
            "selection_classes": self.selection.n_classes,
            "evaluation_classes": self.evaluation.n_classes,
            **self.info,
        }


@declares(meta_training=True)
def omniglot_meta_continual(
    root: str | None,
    cache_dir: str | None,
    sizes: tuple[int, ...] = (10, 50, 100, 200, 600),
    draws: int = 10,
    selection_draws: int = 5,
    train_shots: int = 15,
    lr_grid: tuple[float, ...] = (0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001, 0.00003, 0.00001),
    seed: int = 0,
    image_size: int = 28,
    download: bool = True,
    meta_train_rotations: bool = False,
    validation: bool = False,
) -> MetaTestBenchmark:
    """The Omniglot meta-continual benchmark of OML (Javed & White 2019) and ANML (Beaulieu
    et al. 2020), at 28x28 (:mod:`metarun.continual.meta_test`): meta-train on the
    background characters less 5 held-out alphabets (the ``lake`` split's 792 training
    characters); choose any continual-phase learning rate on streams of the 172 characters
    of the held-out background alphabets; report streams of ``N`` of the 659 evaluation
    characters, ``train_shots`` drawings each, one per update, one pass; each class scored
    on its other ``20 - train_shots`` drawings (meta-test test) and on its training drawings
    (meta-test train).

    Args:
        root, cache_dir, image_size, download: as for ``dataset=omniglot``.
        sizes: the numbers of classes per stream (the papers: 10, 50, 100, 200, 600).
        draws: reported streams per size (each a seeded draw of classes and drawings).
        selection_draws: held-out streams per learning rate and size.
        train_shots: training drawings per class (15 of 20 in the papers).
        lr_grid: the continual-phase learning rates tried (OML's grid by default).
        seed: seeds every draw.
        meta_train_rotations: meta-train on each character at 0, 90, 180 and 270 degrees as
            four classes (as SB-MCL's and the Vinyals split's training); the selection and
            evaluation streams are never rotated.
        validation: report streams of the held-out background characters instead of the
            evaluation characters (sizes capped at their 172): for choosing a method's
            settings without touching the evaluation set. Learning rates are then chosen
            and reported on the same characters, so such figures are not test figures.
    """
    from metarun.data.omniglot import DRAWINGS, Omniglot

    if not 1 <= train_shots < DRAWINGS:
        raise ScenarioError(f"train_shots must be in 1..{DRAWINGS - 1}, got {train_shots}")
    data = Omniglot(root, cache_dir, split="lake", image_size=image_size, download=download)
    meta_train, selection, evaluation = (data.pool(s) for s in ("train", "val", "test"))
    if meta_train_rotations:
        grouped = meta_train.images.view(meta_train.n_classes, DRAWINGS, *meta_train.image_shape)
        turned = torch.stack([torch.rot90(grouped, k, dims=(-2, -1)) for k in range(4)], dim=1)
        names = [f"{n}/rot{90 * k:03d}" for n in meta_train.class_names for k in range(4)]
        groups = [f"{a}/rot{90 * k:03d}" for a in meta_train.groups for k in range(4)]
        drawers = None if meta_train.drawers is None else meta_train.drawers.repeat_interleave(4, 0)
        meta_train = ClassPool.from_grouped(turned.flatten(0, 1), names, groups, drawers)
    if validation:
        evaluation = selection
        sizes = sorted({min(int(n), selection.n_classes) for n in sizes})
    if max(sizes) > evaluation.n_classes:
        raise ScenarioError(
            f"scenario.sizes go up to {max(sizes)} classes; the evaluation set has "
            f"{evaluation.n_classes}"
        )
    return MetaTestBenchmark(
        meta_train=meta_train,
        selection=selection,
        evaluation=evaluation,
        sizes=sorted(int(n) for n in sizes),
        draws=draws,
        selection_draws=selection_draws,
        train_shots=train_shots,
        lr_grid=[float(lr) for lr in lr_grid],
        seed=seed,
        input_shape=data.image_shape,
        n_classes=max(meta_train.n_classes, max(sizes)),
        info={
            "benchmark": "omniglot_meta_continual",
            "image_size": image_size,
            "meta_train_split": "background less the 5 held-out alphabets (lake split)",
            "selection_split": "the 5 held-out background alphabets (172 characters)",
            "evaluation_split": "the 5 held-out background alphabets (VALIDATION: not a test)"
            if validation
            else "the evaluation set (659 characters)",
            "meta_train_rotations": meta_train_rotations,
            "selection_rule": "per N, the learning rate of lr_grid with the best mean "
            "meta-test-test accuracy over selection_draws held-out streams of min(N, 172) "
            "classes",
        },
    )


def _uniform(bounds: tuple[float, float], shape: tuple[int, ...], g: torch.Generator):
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=g)


def _bounds(name: str, value) -> tuple[float, float]:
    """``scenario.<name>`` as ``(low, high)`` floats, refused unless ``low <= high``."""
    if len(value) != 2 or not value[0] <= value[1]:
        raise ScenarioError(f"scenario.{name} must be [low, high] with low <= high, got {value}")
    return float(value[0]), float(value[1])


def sine_inputs(slots: torch.Tensor, x: torch.Tensor, width: int) -> torch.Tensor:
    """The inputs of a sinusoid stream: the one-hot id of each point's function, then ``x``.

    Args:
        slots: ``(n,)`` the function's position in the stream (``0..width-1``).
        x: ``(n,)`` the points.
        width: length of the one-hot id.

    Returns:
        ``(n, width + 1)`` float.
    """
    return torch.cat([torch.nn.functional.one_hot(slots, width).float(), x.unsqueeze(1)], 1)


@dataclass
class SineFunctions:
    """The meta-training functions of a sinusoid stream (OML's pre-training set):
    ``y = amplitude * sin(x - phase)``, drawn once from the scenario's seed, never the
    stream's functions.

    Attributes:
        amplitude: ``(m,)`` one per function.
        phase: ``(m,)``.
        x_range: ``(low, high)`` of the uniform points.
        slots: width of the one-hot function id (the stream's ``n_tasks``).
        batch_size: points per inner step, the stream's batch size.
    """

    amplitude: torch.Tensor
    phase: torch.Tensor
    x_range: tuple[float, float]
    slots: int
    batch_size: int

    @property
    def n_functions(self) -> int:
        return self.amplitude.numel()

    def trajectory(
        self, functions: int, shots: int, queries: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One meta-training trajectory, laid out as a stream is: ``functions`` distinct
        functions of the set, the ``k``-th one with id ``k``; ``shots`` fresh points of
        each, learned function after function in inner steps of ``batch_size`` points;
        then ``queries`` other points of each function.

        Returns:
            ``x (n, slots + 1)``, ``y (n, 1)`` and ``step (n,)``: the inner step a
            trajectory point belongs to (``0, 1, ...`` in order), ``-1`` for a query
            point; ``n = functions * (shots + queries)``.
        """
        if not 1 <= functions <= min(self.slots, self.n_functions):
            raise ValueError(
                f"a sinusoid trajectory needs 1..{min(self.slots, self.n_functions)} functions "
                f"(at most scenario.n_tasks = {self.slots} ids and scenario.meta_functions = "
                f"{self.n_functions}), got algo.trajectory_classes={functions}"
            )
        if shots < 1 or queries < 1:
            raise ValueError(
                f"a sinusoid trajectory needs algo.trajectory_shots >= 1 and "
                f"algo.query_shots >= 1, got {shots} and {queries}"
            )
        g = generator
        picked = torch.randperm(self.n_functions, generator=g)[:functions]
        x = _uniform(self.x_range, (functions, shots + queries), g)
        y = self.amplitude[picked, None] * torch.sin(x - self.phase[picked, None])
        per_function = math.ceil(shots / self.batch_size)
        within = torch.arange(shots) // self.batch_size
        step = torch.full((functions, shots + queries), -1, dtype=torch.long)
        step[:, :shots] = within + per_function * torch.arange(functions)[:, None]
        slots = torch.arange(functions).repeat_interleave(shots + queries)
        return (
            sine_inputs(slots, x.flatten(), self.slots),
            y.reshape(-1, 1),
            step.flatten(),
        )


@declares(REGRESSION, meta_training="meta_functions")
def sinusoid_stream(
    n_tasks: int = 10,
    train_per_task: int = 1280,
    test_per_task: int = 500,
    meta_functions: int = 400,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 32,
) -> Scenario:
    """Incremental sinusoid regression, after OML (Javed & White 2019, "Meta-Learning
    Representations for Continual Learning", incremental sine waves): ``n_tasks`` functions
    ``y = amplitude * sin(x - phase)`` learned one after another, each from a sequence of
    ``train_per_task`` points shown once (``epochs=1``) in updates of ``batch_size``; after
    each function, every function is scored by its mean squared error on
    ``test_per_task`` other points. The input is the function's one-hot id (its position in
    the stream, ``n_tasks`` wide) followed by ``x``, so the functions can be told apart and
    the task is known (task-incremental, one shared output).

    A meta-training set of ``meta_functions`` other functions of the same family serves
    OML's meta-training phase (:class:`SineFunctions`).

    Args:
        n_tasks: functions in the stream (the paper: 10).
        train_per_task: training points per function (the paper: 40 updates of 32).
        test_per_task: points per function that score it.
        meta_functions: functions in the meta-training set (the paper: 400); 0 for none.
        amplitude, phase, x_range: ``[low, high]`` of the uniform draws (the paper:
            amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]).
        seed: the stream's functions and points come from a generator seeded with
            ``2 * seed``, the meta-training functions from one seeded with ``2 * seed + 1``.
        epochs, batch_size: the training budget per function.
    """
    for name, value, least in (
        ("n_tasks", n_tasks, 1),
        ("train_per_task", train_per_task, 1),
        ("test_per_task", test_per_task, 1),
        ("meta_functions", meta_functions, 0),
    ):
        if value < least:
            raise ScenarioError(f"scenario.{name} must be >= {least}, got {value}")
    amplitude = _bounds("amplitude", amplitude)
    phase = _bounds("phase", phase)
    x_range = _bounds("x_range", x_range)
    g = torch.Generator().manual_seed(2 * seed)
    tasks, functions = [], []
    for i in range(n_tasks):
        a = _uniform(amplitude, (), g).item()
        p = _uniform(phase, (), g).item()
        xs = [_uniform(x_range, (n,), g) for n in (train_per_task, test_per_task)]
        inputs = [sine_inputs(torch.full((len(x),), i), x, n_tasks) for x in xs]
        targets = [(a * torch.sin(x - p)).unsqueeze(1) for x in xs]
        functions.append({"amplitude": a, "phase": p})
        tasks.append(
            Task(
                f"sine {i}: amplitude {a:.3f}, phase {p:.3f}",
                torch.empty(0, dtype=torch.long),
                inputs[0],
                targets[0],
                inputs[1],
                targets[1],
            )
        )
    meta_train = None
    if meta_functions:
        gm = torch.Generator().manual_seed(2 * seed + 1)
        meta_train = SineFunctions(
            _uniform(amplitude, (meta_functions,), gm),
            _uniform(phase, (meta_functions,), gm),
            x_range,
            n_tasks,
            batch_size,
        )
    return Scenario(
        tasks,
        0,
        (n_tasks + 1,),
        "task",
        epochs,
        batch_size,
        meta_train=meta_train,
        info={
            "benchmark": "sinusoid_stream",
            "seed": seed,
            "functions": functions,
            "amplitude": list(amplitude),
            "phase": list(phase),
            "x_range": list(x_range),
            "input": f"one-hot function id ({n_tasks} wide), then x",
            "meta_train_functions": meta_functions,
        },
        task=REGRESSION,
    )
