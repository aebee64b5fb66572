"""Class splits of the user's own data (``dataset=folder``, ``dataset=tensors``).

A few-shot split assigns whole classes to ``train``, ``val`` and ``test``. The user's data
gives it in one of three ways, shared by both datasets:

``lists``: ``train.txt``, ``val.txt`` and ``test.txt`` in ``split_dir``, one class name a
    line (blank lines and lines starting with ``#`` are skipped). A split's classes are
    used in the order of its list.
``folders`` / ``files``: the data itself comes in three parts (``root/train``, ``root/val``,
    ``root/test`` folders of class folders; or ``train``, ``val`` and ``test`` tensor files).
``fractions``: the classes, in sorted order, are shuffled by a ``torch.Generator`` seeded with
    ``split_seed`` and cut into ``fractions`` of ``train`` / ``val`` / ``test``.

Whatever the way, the three splits must be disjoint and none empty; the split actually
used is written to the run folder (:func:`write_split`) in the ``lists`` format, so it can be
given back with ``dataset.split=lists dataset.split_dir=RUN/split``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metarun.data.episodes import ClassPool
from metarun.data.files import DataError

SPLITS = ("train", "val", "test")


def check_options(
    mode: str, modes: Sequence[str], fractions: Sequence[float], split_dir: str | None
) -> None:
    """Refuses an unknown split mode or fractions that do not make three parts of 1."""
    if mode not in modes:
        raise ValueError(f"unknown dataset.split {mode!r}; choose one of {', '.join(modes)}")
    if len(fractions) != 3 or any(not f > 0 for f in fractions):
        raise ValueError(
            f"dataset.fractions={list(fractions)}: give three positive fractions of the "
            f"classes for train, val and test, e.g. [0.7, 0.15, 0.15]"
        )
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"dataset.fractions={list(fractions)} add up to {sum(fractions)}, not 1")
    if split_dir is not None and mode not in ("lists", "auto"):
        raise ValueError(
            f"dataset.split_dir is read by split=lists only; it is set with split={mode}. "
            f"Set dataset.split=lists, or split_dir=null."
        )


def list_files(folder: Path) -> dict[str, Path]:
    return {split: folder / f"{split}.txt" for split in SPLITS}


def read_lists(folder: Path) -> dict[str, list[str]]:
    """The class names of ``train.txt``, ``val.txt`` and ``test.txt`` in ``folder``.

    Raises:
        DataError: a list is missing, names no class, or names a class twice.
    """
    out = {}
    for split, path in list_files(folder).items():
        if not path.is_file():
            raise DataError(
                f"split=lists needs {path}, which does not exist: one class name a line, "
                f"as train.txt, val.txt and test.txt in {folder} (dataset.split_dir)."
            )
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read the split list {path} ({err})") from err
        names = [line.strip() for line in lines]
        names = [n for n in names if n and not n.startswith("#")]
        if not names:
            raise DataError(f"the split list {path} names no class: the {split} split is empty")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"the split list {path} names these classes twice: {_few(twice)}")
        out[split] = names
    return out


def by_fractions(classes: Sequence[str], fractions: Sequence[float], seed: int) -> dict:
    """``classes`` (sorted first) shuffled with ``seed`` and cut into three parts; each part
    keeps the sorted order.

    Raises:
        DataError: a part would be empty.
    """
    names = sorted(classes)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = round(fractions[0] * len(names))
    n_val = round(fractions[1] * len(names))
    cuts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    for split, idx in cuts.items():
        if not idx:
            raise DataError(
                f"split=fractions {list(fractions)} leaves the {split} split without a class: "
                f"there are only {len(names)} classes. Change dataset.fractions, or give "
                f"the split as lists (dataset.split=lists)."
            )
    return {split: [names[i] for i in sorted(idx)] for split, idx in cuts.items()}


def check_disjoint(splits: dict[str, list[str]], where: dict[str, str]) -> None:
    """Refuses a class that is in two splits (test classes must be new)."""
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            both = sorted(set(splits[a]) & set(splits[b]))
            if both:
                raise DataError(
                    f"classes in both the {a} split ({where[a]}) and the {b} split "
                    f"({where[b]}): {_few(both)}. Few-shot splits need disjoint classes; "
                    f"take each of these out of one of them."
                )


def refuse_missing(missing: Sequence[str], where: str, root: Path | str, hint: str = "") -> None:
    """Refuses the class names of a list that are not in the data, naming them."""
    if missing:
        raise DataError(
            f"classes listed in {where} but not in {root}: {_few(missing)}. Fix the list, "
            f"or add the classes.{hint}"
        )


def pool_from_rows(
    examples: torch.Tensor,
    rows: dict[str, Sequence[int]],
    names: Sequence[str],
    origin: str,
    small_classes: str,
) -> ClassPool:
    """A pool of the classes ``names`` (in that order) whose examples are the given rows of
    ``examples`` (``(n, *shape)``, shared, not copied)."""
    width = max((len(rows[n]) for n in names), default=0)
    items = torch.full((len(names), width), -1, dtype=torch.long)
    for i, name in enumerate(names):
        items[i, : len(rows[name])] = torch.as_tensor(list(rows[name]), dtype=torch.long)
    return ClassPool(examples, items, list(names), origin, small_classes)


def write_split(
    folder: Path, splits: dict[str, list[str]], where: dict[str, str], extra: dict
) -> None:
    """Writes ``train.txt``, ``val.txt`` and ``test.txt`` (the ``lists`` format, each with a
    comment line saying where the split came from) and ``split.json`` (the same, with the
    number of examples of each class) to ``folder``, each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        text = f"# the {split} split: {where[split]}\n" + "".join(f"{c}\n" for c in splits[split])
        _atomic_write(folder / f"{split}.txt", text)
    _atomic_write(folder / "split.json", json.dumps(extra, indent=2) + "\n")


class SplitPools:
    """The split-facing half of a user's dataset (``dataset=folder``, ``dataset=tensors``):
    set ``_pools``, ``names`` (class names per split, pool order) and ``where`` (where each
    split came from) and define ``describe()``; this gives ``pool``, ``split_lists`` and
    ``write_split``."""

    _pools: dict[str, ClassPool]
    names: dict[str, list[str]]
    where: dict[str, str]

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def pool(self, split: str) -> ClassPool:
        """The classes of ``split`` (``train``, ``val`` or ``test``) as a :class:`ClassPool`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        return self._pools[split]

    def split_lists(self) -> dict[str, list[str]]:
        """The class names of each split, in pool order (the split actually used)."""
        return {s: list(self.names[s]) for s in SPLITS}

    def write_split(self, folder: Path) -> None:
        """Writes the split used to ``folder`` (``train.txt``, ``val.txt``, ``test.txt`` and
        ``split.json``; see :func:`write_split`)."""
        write_split(Path(folder), self.split_lists(), self.where, self.describe())


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _few(names: Sequence[str], n: int = 10) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
