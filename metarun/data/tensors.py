"""``dataset=tensors``: few-shot episodes from arrays of examples and their class labels.

One file holds the examples ``x`` and labels ``y``:

``.npz``: arrays named ``x`` and ``y`` (``numpy.savez``); read with ``allow_pickle=False``,
    so object arrays are refused.
``.pt``: a dict ``{"x": tensor, "y": tensor or list of str}`` (``torch.save``); read with
    ``torch.load(weights_only=True)``, which loads tensors and plain containers only.
``.csv``: a header row, then one example a row: the column ``label_column`` holds the
    class label, every other column a number (the features, a 2-D ``x``).
``.parquet``: the same columns as ``.csv``; read with pyarrow (``pip install
    "metarun[parquet]"``), or pandas where pyarrow is missing.

``x`` is ``(n, features)`` (tabular data, embeddings; ``model=mlp``), ``(n, channels,
length)`` (sequences, such as sensor signals; ``model=conv1d``) or ``(n, channels, height,
width)`` (images; ``model=conv4``). uint8 ``x`` is kept as bytes and scaled to [0, 1] in
each episode, as the image datasets are; any other numeric type becomes float32 and is used
as it is (or standardised: ``standardize``). ``y`` is ``(n,)`` integers or strings; a class
is named by its label (``str``), and classes are in sorted label order.

The class split (:mod:`metarun.data.classsplit`): ``lists`` (label names in ``train.txt``,
``val.txt``, ``test.txt``), ``files`` (``path`` is a folder with one file per split:
``train.npz``, ``val.npz``, ``test.npz``, or the same with another extension above), or
``fractions``. Nothing is cached: the files are read as they are at each start.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarun.data import classsplit
from metarun.data.classsplit import SPLITS
from metarun.data.files import DataError

log = logging.getLogger(__name__)

MODES = ("auto", "lists", "files", "fractions")
SUFFIXES = (".npz", ".pt", ".csv", ".parquet")


class TensorFile(classsplit.SplitPools):
    """Examples and labels from tensor files as three class pools (``train``, ``val``, ``test``).

    Args:
        path: a ``.npz``, ``.pt``, ``.csv`` or ``.parquet`` file; with ``split=files`` a
            folder of ``train``, ``val`` and ``test`` files. Never written to.
        label_column: the label column of ``.csv`` and ``.parquet`` files.
        split: ``lists``, ``files``, ``fractions`` or ``auto``: ``files`` when ``path`` is
            a folder, else ``lists`` when ``split_dir`` is set or ``path``'s folder holds
            ``train.txt``, else ``fractions``.
        split_dir: the folder of ``train.txt``, ``val.txt``, ``test.txt`` (``lists``);
            ``None`` means the folder of ``path``.
        fractions: train / val / test fractions of the classes (``fractions``).
        split_seed: seed of the ``fractions`` shuffle.
        standardize: subtract the mean and divide by the standard deviation of each feature
            (of ``(n, features)``) or each channel (of sequences and images), both computed
            on the train split's examples.
        drop_small_classes: leave out, with a warning naming them, the classes with fewer
            examples than an episode takes; ``False`` refuses them with an error naming them.
    """

    def __init__(
        self,
        path: str | None,
        label_column: str = "label",
        split: str = "auto",
        split_dir: str | None = None,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        split_seed: int = 0,
        standardize: bool = False,
        drop_small_classes: bool = False,
    ):
        if not path:
            raise ValueError(
                "dataset=tensors needs dataset.path=FILE: a .npz, .pt, .csv or .parquet file "
                "of examples x and labels y, or a folder of train/val/test files "
                "(docs/DATASETS.md)"
            )
        classsplit.check_options(split, MODES, fractions, split_dir)
        self.path = Path(path).expanduser().resolve()
        self.label_column = label_column
        small = "drop" if drop_small_classes else "error"
        if not self.path.exists():
            raise DataError(f"dataset.path={path}: no such file or folder ({self.path})")
        lists_dir = Path(split_dir).expanduser().resolve() if split_dir else self.path.parent
        self.mode = split if split != "auto" else self._auto_mode(split_dir, lists_dir)
        x, labels, splits = self._read_split(lists_dir, fractions, split_seed)
        classsplit.check_disjoint(splits, self.where)
        rows: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            rows.setdefault(label, []).append(i)
        self.standardization: tuple[torch.Tensor, torch.Tensor] | None = None
        if standardize:
            train_rows = [r for c in splits["train"] for r in rows[c]]
            self.standardization = standardization(x, train_rows)
            x = standardize_examples(x, self.standardization)
        self.examples = x
        self.names = {s: list(splits[s]) for s in SPLITS}
        self._pools = {
            s: classsplit.pool_from_rows(
                x, rows, self.names[s], f"the {s} split ({self.where[s]})", small
            )
            for s in SPLITS
        }

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one example: ``(features,)``, ``(channels, length)`` or ``(C, H, W)``;
        the backbone's ``input_shape``."""
        return tuple(self.examples.shape[1:])

    def describe(self) -> dict[str, Any]:
        """The split used: mode, source of each split and each class's number of examples."""
        return {
            "dataset": "tensors",
            "path": str(self.path),
            "mode": self.mode,
            "example_shape": list(self.image_shape),
            "dtype": str(self.examples.dtype).replace("torch.", ""),
            "splits": {
                s: {
                    "from": self.where[s],
                    "examples": dict(
                        zip(self.names[s], self._pools[s].counts.tolist(), strict=True)
                    ),
                }
                for s in SPLITS
            },
        }

    def _read_split(
        self, lists_dir: Path, fractions: Sequence[float], split_seed: int
    ) -> tuple[torch.Tensor, list[str], dict[str, list[str]]]:
        """The examples ``(n, ...)``, their labels and the classes of each split in pool
        order; sets ``self.where``, where each split's classes came from."""
        if self.mode == "files":
            parts = {s: self._read(_split_file(self.path, s)) for s in SPLITS}
            self.where = {s: f"the classes of {_split_file(self.path, s)}" for s in SPLITS}
            return _concat(parts)
        if self.path.is_dir():
            raise DataError(
                f"dataset.path={self.path} is a folder, which split={self.mode} does not "
                f"read: give one file, or use split=files for a folder of train/val/test files."
            )
        x, labels = self._read(self.path)
        classes = sorted_labels(labels)
        if self.mode == "lists":
            lists = classsplit.read_lists(lists_dir)
            paths = classsplit.list_files(lists_dir)
            present = set(classes)
            for s in SPLITS:
                missing = [c for c in lists[s] if c not in present]
                classsplit.refuse_missing(missing, str(paths[s]), self.path)
            self.where = {s: f"the classes listed in {paths[s]}" for s in SPLITS}
            return x, labels, lists
        parts = classsplit.by_fractions(classes, fractions, split_seed)
        self.where = {
            s: f"{len(parts[s])} of the {len(classes)} classes in {self.path} by fractions "
            f"{list(fractions)}, split_seed {split_seed}"
            for s in SPLITS
        }
        return x, labels, {s: [c for c in classes if c in set(parts[s])] for s in SPLITS}

    def _auto_mode(self, split_dir: str | None, lists_dir: Path) -> str:
        if self.path.is_dir():
            return "files"
        if split_dir is not None or (lists_dir / "train.txt").is_file():
            return "lists"
        return "fractions"

    def _read(self, path: Path) -> tuple[torch.Tensor, list[str]]:
        """``(x (n, ...), labels)`` of one file, checked."""
        x, y = read_arrays(path, self.label_column)
        return _check(path, x, y)


def read_arrays(path: Path, label_column: str = "label", require_y: bool = True) -> tuple[Any, Any]:
    """The examples ``x`` and labels ``y`` of a ``.npz``, ``.pt``, ``.csv`` or ``.parquet``
    file, as stored (numpy arrays or tensors; see the module docstring), unchecked. Without
    ``require_y``, a file without labels (no ``y`` array or key, no ``label_column``) gives
    ``y = None`` and, for ``.csv`` and ``.parquet``, every column as a feature.

    Raises:
        DataError: an unknown file type, or a file that cannot be read (named with the cause).
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {suffix!r}; give a {', '.join(SUFFIXES)} file")
    if suffix in (".csv", ".parquet"):
        reader = _read_csv if suffix == ".csv" else _read_parquet
        return reader(path, label_column, require_y)
    return (_read_npz if suffix == ".npz" else _read_pt)(path, require_y)


def _split_file(folder: Path, split: str) -> Path:
    found = sorted(p for p in folder.glob(f"{split}.*") if p.suffix.lower() in SUFFIXES)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise DataError(
            f"split=files needs one {split} file in {folder} ({split}.npz, {split}.pt, "
            f"{split}.csv or {split}.parquet); found {what}."
        )
    return found[0]


def _concat(
    parts: dict[str, tuple[torch.Tensor, list[str]]],
) -> tuple[torch.Tensor, list[str], dict[str, list[str]]]:
    """One ``x`` and label list from the three split files; their example shapes and types
    must agree."""
    shapes = {s: (tuple(x.shape[1:]), x.dtype) for s, (x, _) in parts.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(
            "the train, val and test files hold examples of different shapes or types: "
            + ", ".join(f"{s} {shape} {dtype}" for s, (shape, dtype) in shapes.items())
        )
    x = torch.cat([parts[s][0] for s in SPLITS])
    labels = [label for s in SPLITS for label in parts[s][1]]
    return x, labels, {s: sorted_labels(parts[s][1]) for s in SPLITS}


def _read_npz(path: Path, require_y: bool = True) -> tuple[Any, Any]:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing == ["y"] and not require_y:
                return data["x"], None
            if missing:
                raise DataError(
                    f"{path} has no array named {' or '.join(missing)} (its arrays: "
                    f"{', '.join(data.files) or 'none'}); save it with "
                    f"numpy.savez(path, x=..., y=...)."
                )
            return data["x"], data["y"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:  # not a zip, truncated, object arrays
        raise DataError(
            f"cannot read {path} as an .npz file ({type(err).__name__}: {err})"
        ) from err


def _read_pt(path: Path, require_y: bool = True) -> tuple[Any, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types; none may leave a half-read state
        raise DataError(
            f"cannot read {path} with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{err}); save a dict of tensors: torch.save({{'x': x, 'y': y}}, path)."
        ) from err
    if isinstance(data, dict) and "x" in data and "y" not in data and not require_y:
        return data["x"], None
    if not isinstance(data, dict) or not {"x", "y"} <= set(data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f"{path} holds {keys}, not a dict with 'x' and 'y'; save it with "
            f"torch.save({{'x': x, 'y': y}}, path)."
        )
    return data["x"], data["y"]


def _read_csv(path: Path, label_column: str, require_y: bool = True) -> tuple[Any, Any]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path} as CSV ({type(err).__name__}: {err})") from err
    if not rows:
        raise DataError(f"{path} is empty: expected a header row, then one example a row")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    col = _label_index(path, header, label_column, require_y)
    widths = {len(r) for r in body}
    if widths - {len(header)}:
        bad = next(i for i, r in enumerate(rows[1:], start=2) if r and len(r) != len(header))
        raise DataError(
            f"{path}, line {bad}: {len(rows[bad - 1])} cells where the header has {len(header)}"
        )
    labels = None if col is None else [r[col].strip() for r in body]
    features = body if col is None else [r[:col] + r[col + 1 :] for r in body]
    try:
        x = np.array(features, dtype=np.float32)
    except ValueError:
        names = header if col is None else header[:col] + header[col + 1 :]
        for line, row in enumerate(features, start=2):
            for name, cell in zip(names, row, strict=True):
                try:
                    float(cell)
                except ValueError:
                    raise DataError(
                        f"{path}, line {line}, column {name!r}: {cell!r} is not a number; "
                        f"every column but the label column ({label_column!r}) must be numeric."
                    ) from None
        raise
    width = len(header) - (col is not None)
    return x.reshape(len(body), width), None if labels is None else np.array(labels)


def _read_parquet(path: Path, label_column: str, require_y: bool = True) -> tuple[Any, Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            table = pq.read_table(path)
            columns = {name: table.column(name).to_numpy() for name in table.column_names}
        else:
            try:
                import pandas as pd
            except ImportError:
                raise DataError(
                    f"reading {path} needs pyarrow (or pandas with a parquet engine): "
                    f'pip install "metarun[parquet]"'
                ) from None
            frame = pd.read_parquet(path)
            columns = {str(name): frame[name].to_numpy() for name in frame.columns}
    except DataError:
        raise
    except ImportError as err:  # pandas without a parquet engine
        raise DataError(
            f'reading {path} needs pyarrow: pip install "metarun[parquet]" ({err})'
        ) from err
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} as Parquet ({type(err).__name__}: {err})") from err
    header = list(columns)
    col = _label_index(path, header, label_column, require_y)
    names = [h for h in header if col is None or h != header[col]]
    for name in names:
        if columns[name].dtype.kind not in "biuf":
            raise DataError(
                f"{path}, column {name!r} holds {columns[name].dtype} values, not numbers; "
                f"every column but the label column ({label_column!r}) must be numeric."
            )
    x = np.stack([columns[n].astype(np.float32) for n in names], axis=1) if names else None
    if x is None:
        raise DataError(f"{path} has no feature column besides {label_column!r}")
    return x, None if col is None else columns[header[col]]


def _label_index(
    path: Path, header: list[str], label_column: str, require_y: bool = True
) -> int | None:
    """The label column's index; ``None`` when it is absent and not required."""
    if label_column not in header and not require_y:
        return None
    if label_column not in header:
        raise DataError(
            f"{path} has no column {label_column!r} (its columns: {', '.join(header[:10])}"
            f"{' ...' if len(header) > 10 else ''}); name the label column with "
            f"dataset.label_column."
        )
    if len(header) < 2:
        raise DataError(f"{path} has no feature column besides {label_column!r}")
    return header.index(label_column)


def _check(path: Path, x: Any, y: Any) -> tuple[torch.Tensor, list[str]]:
    """``x`` as a uint8 or float32 tensor and ``y`` as one class name per example."""
    x = check_examples(path, x)
    labels = label_names(path, y)
    if len(labels) != x.shape[0]:
        raise DataError(f"{path}: x has {x.shape[0]} examples but y has {len(labels)} labels")
    return x, labels


def check_examples(path: Path, x: Any) -> torch.Tensor:
    """``x`` ``(n, ...)`` as read from ``path`` -> a contiguous uint8 (kept as bytes) or
    float32 tensor, checked: numbers, 2 to 4 dimensions, finite.

    Raises:
        DataError: naming the file and the problem.
    """
    x = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or _is_int(x)):
        raise DataError(f"{path}: x holds {x.dtype} values; give numbers (floats or integers)")
    if x.dim() < 2 or x.dim() > 4:
        raise DataError(
            f"{path}: x has shape {tuple(x.shape)}; expected (n, features), (n, channels, "
            f"length) or (n, channels, height, width). For one feature a row, reshape it to (n, 1)."
        )
    x = x if x.dtype == torch.uint8 else x.float()
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
        raise DataError(f"{path}: x holds NaN or infinite values (first in example {bad})")
    return x.contiguous()


def _is_int(x: torch.Tensor) -> bool:
    return x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def label_names(path: Path, y: Any) -> list[str]:
    """Labels ``y`` ``(n,)`` (integers or strings) as one class name per example."""
    if isinstance(y, list) and all(isinstance(v, str) for v in y):
        return list(y)
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{path}: y has shape {y.shape}; give one label per example, (n,)")
    if y.dtype.kind in "US":
        return [str(v) for v in y.astype(str)]
    if y.dtype.kind in "iu":
        return [str(int(v)) for v in y]
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return [str(int(v)) for v in y]
    raise DataError(f"{path}: y holds {y.dtype} values; class labels must be integers or strings")


def sorted_labels(labels: Sequence[str]) -> list[str]:
    """Distinct labels, numerically sorted when they are all integers."""
    distinct = set(labels)
    if all(_is_integer(v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _is_integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


def standardization(x: torch.Tensor, train_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation (1 where that is 0), over the train rows of ``x``
    (as float32), of each feature (2-D ``x``) or channel, shaped ``(1, features)`` or
    ``(1, channels, 1[, 1])`` to broadcast over ``x``."""
    train = x[train_rows].float()
    dims = [0] if x.dim() == 2 else [0, *range(2, x.dim())]
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def standardize_examples(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x`` (as float32) less the mean of :func:`standardization`, divided by its std."""
    mean, std = stats
    return ((x.float() - mean) / std).contiguous()


__all__ = [
    "TensorFile",
    "DataError",
    "read_arrays",
    "check_examples",
    "label_names",
    "sorted_labels",
    "standardization",
    "standardize_examples",
]
