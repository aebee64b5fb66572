"""Few-shot episodes drawn from a tensor-backed pool of classes.

An episode (a "task") holds ``ways`` classes with ``shots`` labelled support examples
and ``query_shots`` query examples each. Classes are drawn from one split only, support
and query never share an image, and the class-to-label assignment is a fresh random
permutation of ``0..ways-1`` in every episode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

log = logging.getLogger(__name__)


class EpisodeError(ValueError):
    """An episode that the class pool cannot provide (too many ways or shots)."""


@dataclass
class Episode:
    """One few-shot task. Images are uint8 until :meth:`to` converts them.

    Attributes:
        support_x: ``(ways * shots, C, H, W)`` support images.
        support_y: ``(ways * shots,)`` labels in ``0..ways-1``.
        query_x: ``(ways * query_shots, C, H, W)`` query images.
        query_y: ``(ways * query_shots,)`` labels in ``0..ways-1``.
        classes: ``(ways,)`` pool class index of each label (label ``i`` is class ``classes[i]``).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def ways(self) -> int:
        return int(self.classes.shape[-1])

    @property
    def tasks(self) -> int:
        """1 for one episode; the number of stacked episodes for :meth:`stack`'s result."""
        return int(self.classes.shape[0]) if self.classes.dim() == 2 else 1

    @staticmethod
    def stack(episodes: list[Episode]) -> Episode:
        """Stacks episodes of one shape along a new leading task dimension, e.g. support
        images ``(tasks, ways * shots, C, H, W)``, for engines that batch over tasks."""
        fields = ("support_x", "support_y", "query_x", "query_y", "classes")
        return Episode(*(torch.stack([getattr(e, f) for e in episodes]) for f in fields))

    def to(
        self,
        device: torch.device | str,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Episode:
        """Moves the episode to ``device`` and scales uint8 images to floats in [0, 1]
        (stored in ``memory_format``, e.g. ``torch.channels_last``)."""

        def prep(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x
            return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x

        return Episode(
            prep(self.support_x),
            self.support_y.to(device),
            prep(self.query_x),
            self.query_y.to(device),
            self.classes,
        )


@dataclass
class ClassPool:
    """The images of one split, grouped by class.

    Attributes:
        images: ``(n_images, C, H, W)`` uint8 images.
        class_items: ``(n_classes, max_per_class)`` indices into ``images``; rows of classes
            with fewer images are padded with ``-1``.
        class_names: one name per class, for reports.
        origin: where the classes come from, for error messages (e.g. ``the test split
            (the classes listed in /data/test.txt)``); empty: ``the split``.
        small_classes: what a sampler does with a class that has fewer images than an
            episode takes (``shots + query_shots``): ``skip`` leaves it out silently (the
            built-in datasets with uneven classes), ``drop`` leaves it out and names it in
            a warning, ``error`` refuses with an :class:`EpisodeError` that names it (the
            user's own data, ``dataset.drop_small_classes``).
        groups: optional, the group of each class (Omniglot: its alphabet), for episodes
            drawn within one group (:mod:`metarun.data.within_alphabet`).
        drawers: optional ``(n_classes, max_per_class)`` int, who made each item of
            ``class_items`` (Omniglot: its drawer within the alphabet; ``-1`` on padding).
    """

    images: torch.Tensor
    class_items: torch.Tensor
    class_names: list[str]
    origin: str = ""
    small_classes: str = "skip"
    groups: list[str] | None = None
    drawers: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.class_items.shape[0] != len(self.class_names):
            raise ValueError("class_items and class_names disagree on the number of classes")
        if self.small_classes not in ("skip", "drop", "error"):
            raise ValueError(
                f"small_classes must be skip, drop or error, not {self.small_classes!r}"
            )
        if self.groups is not None and len(self.groups) != len(self.class_names):
            raise ValueError("groups and class_names disagree on the number of classes")
        if self.drawers is not None and self.drawers.shape != self.class_items.shape:
            raise ValueError("drawers must have the shape of class_items")
        self.counts = (self.class_items >= 0).sum(dim=1)
        self._reported: set[int] = set()  # episode sizes whose dropped classes were logged

    @classmethod
    def from_grouped(
        cls,
        images: torch.Tensor,
        class_names: list[str],
        groups: list[str] | None = None,
        drawers: torch.Tensor | None = None,
    ) -> ClassPool:
        """Builds a pool from ``(n_classes, per_class, C, H, W)`` images (and optionally
        each class's group and ``(n_classes, per_class)`` drawers)."""
        n_classes, per_class = images.shape[:2]
        items = torch.arange(n_classes * per_class).view(n_classes, per_class)
        flat = images.reshape(n_classes * per_class, *images.shape[2:])
        return cls(flat, items, class_names, groups=groups, drawers=drawers)

    @property
    def n_classes(self) -> int:
        return self.class_items.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @cached_property
    def group_classes(self) -> dict[str, list[int]]:
        """The classes of each group, in order of first appearance (``groups`` required)."""
        if self.groups is None:
            raise ValueError("this pool does not record the group of its classes")
        by_group: dict[str, list[int]] = {}
        for index, group in enumerate(self.groups):
            by_group.setdefault(group, []).append(index)
        return by_group


def _check_small_classes(
    pool: ClassPool, eligible: torch.Tensor, shots: int, query_shots: int
) -> None:
    """Names the classes with fewer than ``shots + query_shots`` images, in an error or a
    warning, as ``pool.small_classes`` asks (see :class:`ClassPool`)."""
    small = torch.nonzero(~eligible).flatten().tolist()
    per_episode = shots + query_shots
    if not small or pool.small_classes == "skip":
        return
    listed = ", ".join(f"{pool.class_names[i]} ({int(pool.counts[i])})" for i in small[:10])
    more = f" and {len(small) - 10} more" if len(small) > 10 else ""
    what = (
        f"{len(small)} of the {pool.n_classes} classes of {pool.origin or 'the split'} have "
        f"fewer than shots={shots} + query_shots={query_shots} = {per_episode} examples "
        f"(examples in brackets): {listed}{more}"
    )
    if pool.small_classes == "error":
        raise EpisodeError(
            f"{what}. Add examples to them, lower shots/query_shots, or set "
            f"dataset.drop_small_classes=true to leave them out of these episodes."
        )
    if per_episode not in pool._reported:
        pool._reported.add(per_episode)
        log.warning("%s; left out of these episodes (dataset.drop_small_classes=true)", what)


class EpisodeSampler:
    """Samples episodes from a :class:`ClassPool` with its own seeded generator.

    Args:
        pool: the classes of one split.
        ways: classes per episode.
        shots: support examples per class.
        query_shots: query examples per class.
        seed: seed of the sampler's ``torch.Generator``; the same seed gives the same
            sequence of episodes, whatever else the process does with random numbers.
    """

    def __init__(self, pool: ClassPool, ways: int, shots: int, query_shots: int, seed: int):
        per_episode = shots + query_shots
        if ways < 1 or shots < 1 or query_shots < 1:
            raise EpisodeError(
                f"an episode needs ways, shots and query_shots >= 1, got ways={ways}, "
                f"shots={shots}, query_shots={query_shots}"
            )
        split = pool.origin or "the split"
        if ways > pool.n_classes:
            raise EpisodeError(
                f"cannot sample {ways}-way episodes: {split} has only {pool.n_classes} "
                f"classes. Lower `ways` to at most {pool.n_classes}."
            )
        eligible = pool.counts >= per_episode
        _check_small_classes(pool, eligible, shots, query_shots)
        if int(eligible.sum()) < ways:
            raise EpisodeError(
                f"cannot sample {ways}-way episodes with shots={shots} + query_shots="
                f"{query_shots} = {per_episode} images per class: only {int(eligible.sum())} "
                f"classes have that many images (the largest has {int(pool.counts.max())}). "
                f"Lower `shots`/`query_shots` or `ways`."
            )
        self.pool = pool
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.generator = torch.Generator().manual_seed(seed)
        # Only the random draws use torch (its generator's state is what checkpoints save);
        # the indexing around them is done in numpy, whose calls cost about a microsecond
        # where a torch op costs ten, and which does not wake torch's thread pool (about
        # 1 ms when the cores are busy with training). This halves the time per episode.
        self._eligible = torch.nonzero(eligible).flatten().numpy()  # classes with enough images
        self._class_items = pool.class_items.numpy()
        self._padded = bool((pool.class_items < 0).any())
        self._images = pool.images.numpy() if pool.images.device.type == "cpu" else None
        self._rows = np.arange(ways)[:, None]
        labels = torch.arange(ways)
        self._support_y = labels.repeat_interleave(shots)
        self._query_y = labels.repeat_interleave(query_shots)

    def _gather(self, idx: np.ndarray) -> torch.Tensor:
        if self._images is None:
            return self.pool.images.index_select(
                0, torch.from_numpy(idx).to(self.pool.images.device)
            )
        return torch.from_numpy(self._images[idx])

    def sample(self) -> Episode:
        """Draws one episode; see :class:`Episode` for the shapes."""
        g = self.generator
        order = torch.randperm(self._eligible.size, generator=g)[: self.ways].numpy()
        classes = self._eligible[order]
        items = self._class_items[classes]  # (ways, max_per_class)
        # A random key per image; padding gets +inf so it sorts last and is never taken.
        keys = torch.rand(items.shape, generator=g)
        if self._padded:
            keys.masked_fill_(torch.from_numpy(items < 0), float("inf"))
        rank = keys.argsort(dim=1)[:, : self.shots + self.query_shots].numpy()
        picked = items[self._rows, rank]
        return Episode(
            support_x=self._gather(picked[:, : self.shots].ravel()),
            support_y=self._support_y.clone(),
            query_x=self._gather(picked[:, self.shots :].ravel()),
            query_y=self._query_y.clone(),
            classes=torch.from_numpy(classes),
        )

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
