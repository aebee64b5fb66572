"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017).

100 ImageNet classes, 600 colour images each, 64 / 16 / 20 classes for train / val / test.
Two source formats are read from ``<data_dir>/miniimagenet/``:

``raw``: ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``, one image per
    row, ``label`` the WordNet id) and ``images/<filename>``, as produced by Ravi &
    Larochelle's scripts.
``pickle``: learn2learn's cache files ``mini-imagenet-cache-{train,validation,test}.pkl``,
    each a dict with ``image_data`` ``(n, 84, 84, 3)`` uint8 and ``class_dict``
    ``{wnid: [row, ...]}``. They are read with an unpickler that accepts numpy arrays and
    plain containers only, so a foreign pickle cannot run code.

Splits (``split=``):

``ravi``: the standard protocol, train / val / test classes from the three files.
``val_test_reduced``: for machines that hold only the val and test classes. Meta-training
    uses the 16 val classes less ``reduced_val_classes`` held out (the last ones in sorted
    WordNet-id order), validation uses those held-out classes, and testing uses the 20
    test classes. Results under this split are not comparable with published ones.

Images are resized to ``image_size`` (Lanczos) when they are not that size already and
cached as one uint8 tensor file per source split and size.
"""

from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from metarun.data import imagepool
from metarun.data.episodes import ClassPool
from metarun.data.files import DataError, cache_root, data_root

log = logging.getLogger(__name__)

SPLITS = ("ravi", "val_test_reduced")
SOURCES = ("auto", "raw", "pickle")
CSV_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
PICKLE_FILES = {
    "train": "mini-imagenet-cache-train.pkl",
    "val": "mini-imagenet-cache-validation.pkl",
    "test": "mini-imagenet-cache-test.pkl",
}
RAVI_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600


class MiniImageNet:
    """miniImageNet as three class pools (``train``, ``val``, ``test``).

    Args:
        root: data folder holding ``miniimagenet/``; ``None`` means the user data folder.
            Never written to.
        cache_dir: writable folder for the tensor caches; ``None`` means the user cache.
        split: ``ravi`` or ``val_test_reduced`` (see the module docstring).
        image_size: side of the square images after resizing.
        source: ``raw``, ``pickle`` or ``auto`` (raw when its csv files are there, else
            the pickles).
        reduced_val_classes: val classes held out for validation under ``val_test_reduced``.
        download: when neither format is complete, download learn2learn's pickles through
            :mod:`metarun.data.learn2learn` (needs learn2learn and internet).
    """

    channels = 3

    def __init__(
        self,
        root: str | None,
        cache_dir: str | None,
        split: str = "ravi",
        image_size: int = 84,
        source: str = "auto",
        reduced_val_classes: int = 5,
        download: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown miniImageNet split {split!r}; choose one of {SPLITS}")
        if source not in SOURCES:
            raise ValueError(f"unknown miniImageNet source {source!r}; choose one of {SOURCES}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.split, self.image_size = split, image_size
        self.reduced_val_classes = reduced_val_classes
        self.folder = data_root(root) / "miniimagenet"
        self.cache_folder = cache_root(cache_dir) / "miniimagenet"
        needed = ("train", "val", "test") if split == "ravi" else ("val", "test")
        try:
            self.source = _pick_source(self.folder, source, needed)
        except DataError as missing:
            if not download or source == "raw":
                raise
            self._download(missing)
            self.source = _pick_source(self.folder, "pickle", needed)
        self._pools = {s: self._load(s) for s in needed}
        if split == "val_test_reduced":
            n_val = self._pools["val"].n_classes
            if not 1 <= reduced_val_classes < n_val:
                raise ValueError(
                    f"reduced_val_classes must be between 1 and {n_val - 1} (the val split "
                    f"has {n_val} classes), got {reduced_val_classes}"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def pool(self, split: str) -> ClassPool:
        """The classes of ``split`` (``train``, ``val`` or ``test``) as a :class:`ClassPool`."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        if self.split == "ravi" or split == "test":
            return self._pools[split]
        val = self._pools["val"]
        first_held_out = val.n_classes - self.reduced_val_classes
        if split == "train":
            return imagepool.subset(val, range(first_held_out))
        return imagepool.subset(val, range(first_held_out, val.n_classes))

    def _download(self, missing: DataError) -> None:
        from metarun.data.learn2learn import download_miniimagenet_pickles

        log.info("downloading learn2learn's miniImageNet pickles into %s", self.folder)
        try:
            download_miniimagenet_pickles(self.folder)
        except DataError as err:
            raise DataError(f"{missing} Download failed: {err}") from err

    def _load(self, split: str) -> ClassPool:
        """One source split, from the cache when it matches the sources, else decoded."""
        if self.source == "raw":
            rows = _read_csv(self.folder / CSV_FILES[split])
            paths = _check_images(self.folder, split, rows)
            sources = [self.folder / CSV_FILES[split]]
            fingerprint = {
                "format": "raw",
                "csv": imagepool.stat_fingerprint(sources),
                "images": imagepool.stat_fingerprint(paths),
            }
        else:
            pkl = self.folder / PICKLE_FILES[split]
            fingerprint = {"format": "pickle", "pickle": imagepool.stat_fingerprint([pkl])}
        cache_file = self.cache_folder / f"miniimagenet_{split}_{self.image_size}px.pt"
        what = f"miniImageNet {split}"
        pool = imagepool.load_cache(cache_file, fingerprint, what)
        if pool is not None:
            return pool
        log.info("building the %s cache at %d px (once)", what, self.image_size)
        if self.source == "raw":
            images = torch.stack([_decode(p, self.image_size) for p in paths])
            pool = imagepool.group_by_class(images, [label for _, label in rows])
        else:
            pool = _read_pickle(self.folder / PICKLE_FILES[split], self.image_size)
        imagepool.save_cache(cache_file, fingerprint, pool, what)
        return pool


def _pick_source(folder: Path, source: str, needed: tuple[str, ...]) -> str:
    """``raw`` or ``pickle``; a missing split is an error that lists the missing files."""
    missing = {
        fmt: [folder / files[s] for s in needed if not (folder / files[s]).exists()]
        for fmt, files in (("raw", CSV_FILES), ("pickle", PICKLE_FILES))
    }
    if source == "auto":
        source = "raw" if not missing["raw"] else "pickle" if not missing["pickle"] else ""
    if source and not missing[source]:
        return source
    lacking = missing[source] if source else missing["raw"] + missing["pickle"]
    raise DataError(
        f"miniImageNet is incomplete in {folder}: missing "
        f"{', '.join(p.name for p in lacking)}. Expected either the raw format "
        f"({', '.join(CSV_FILES[s] for s in needed)} and images/*.jpg) or learn2learn's "
        f"pickles ({', '.join(PICKLE_FILES[s] for s in needed)}). Put them there or point "
        f"`data_dir=` (or METARUN_DATA) at a folder with miniimagenet/ inside; "
        f"`metarun-data verify miniimagenet` shows what is present."
    )


def _read_csv(path: Path) -> list[tuple[str, str]]:
    """``(filename, wnid)`` rows of a Ravi split file."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise DataError(
                f"{path} does not look like a miniImageNet split file: its header is "
                f"{header}, expected ['filename', 'label']. Replace it with the Ravi split file."
            )
        rows = [(r[0], r[1]) for r in reader if r]
    if not rows:
        raise DataError(f"{path} lists no images; replace it with the Ravi split file.")
    return rows


def _check_images(folder: Path, split: str, rows: list[tuple[str, str]]) -> list[Path]:
    """The image paths of ``rows``; any missing image is an error that says which."""
    paths = [folder / "images" / name for name, _ in rows]
    missing = [(p, label) for p, (_, label) in zip(paths, rows, strict=True) if not p.exists()]
    if missing:
        by_class: dict[str, int] = {}
        for _, label in missing:
            by_class[label] = by_class.get(label, 0) + 1
        classes = ", ".join(f"{c} ({n})" for c, n in sorted(by_class.items())[:8])
        more = f" and {len(by_class) - 8} more" if len(by_class) > 8 else ""
        hint = (
            " This data folder lacks the train classes; use dataset.split=val_test_reduced to "
            "train on the val classes and test on the test classes."
            if split == "train"
            else ""
        )
        raise DataError(
            f"miniImageNet {split}: {len(missing)} of {len(rows)} images listed in "
            f"{CSV_FILES[split]} are missing from {folder / 'images'}, in {len(by_class)} "
            f"classes: {classes}{more}; first missing file: {missing[0][0].name}.{hint}"
        )
    return paths


def _decode(path: Path, size: int) -> torch.Tensor:
    try:
        return imagepool.to_rgb_tensor(path.read_bytes(), size)
    except OSError as err:  # PIL raises OSError subclasses for truncated or foreign files
        raise DataError(
            f"cannot decode the miniImageNet image {path} ({err}); replace the file."
        ) from err


class _ArrayUnpickler(pickle.Unpickler):
    """Loads numpy arrays and plain containers; refuses anything that could run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path, size: int) -> ClassPool:
    """A learn2learn ``mini-imagenet-cache-*.pkl`` -> a pool at ``size`` x ``size``."""
    import numpy as np

    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
        image_data, class_dict = data["image_data"], data["class_dict"]
        if not (
            isinstance(image_data, np.ndarray)
            and image_data.dtype == np.uint8
            and image_data.ndim == 4
            and image_data.shape[3] == 3
        ):
            raise ValueError("image_data is not an (n, H, W, 3) uint8 array")
        labels = [""] * len(image_data)
        for wnid, rows in class_dict.items():
            for row in rows:
                labels[int(row)] = str(wnid)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(
            f"{path} is not a readable learn2learn miniImageNet cache ({type(e).__name__}: {e}); "
            f"delete it and copy or download it again."
        ) from e
    if "" in labels:
        raise DataError(f"{path}: {labels.count('')} images belong to no class in class_dict.")
    if image_data.shape[1:3] == (size, size):
        images = torch.from_numpy(np.ascontiguousarray(image_data)).permute(0, 3, 1, 2)
    else:
        images = torch.stack([imagepool.to_rgb_tensor(im, size) for im in image_data])
    return imagepool.group_by_class(images.contiguous(), labels)


__all__ = ["MiniImageNet", "DataError"]
