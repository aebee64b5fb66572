"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017) from their IDX files.

Both come as four gzipped IDX files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``)
of 60,000 training and 10,000 test 28x28 uint8 images in 10 classes; strokes are bright
on a dark background, as in the Omniglot loader.

Files are read from ``<data_dir>/mnist/`` or ``<data_dir>/fashion_mnist/``. A file that is
missing is downloaded from the official address and checked against the official MD5
(torchvision lists the same checksums). Local files are not checksummed, since a repacked
copy is as good as the original, but their structure is checked: magic number, counts,
image size and label range.

As a few-shot dataset (``dataset=mnist``) the ten classes are shared by the three splits:
``train`` is the first 90% of each class's training images, ``val`` the last 10%, ``test``
the official test set. That is a sanity check for the episode machinery, not a few-shot
benchmark (the test classes are not new).
"""

from __future__ import annotations

import functools
import gzip
import logging
import struct
import zlib
from pathlib import Path

import torch

from metarun.data.episodes import ClassPool
from metarun.data.files import DataError, data_root, download

log = logging.getLogger(__name__)

FILES = {  # role -> file name
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
VARIANTS = {  # name -> (folder, official base URL, {file name: official MD5})
    "mnist": (
        "mnist",
        "https://ossci-datasets.s3.amazonaws.com/mnist",
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": (
        "fashion_mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}
COUNTS = {"train": 60_000, "test": 10_000}
CLASSES = 10
SIDE = 28
VAL_FRACTION = 0.1
_IDX_DTYPES = {0x08: torch.uint8}


def read_idx(path: Path) -> torch.Tensor:
    """Reads a (gzipped) IDX file into a tensor of its stored shape.

    Args:
        path: an ``.gz`` or raw IDX file of unsigned bytes (the only type MNIST uses).

    Returns:
        ``(n,)`` labels or ``(n, rows, cols)`` images, uint8.

    Raises:
        DataError: the file is truncated, not gzip, or not an unsigned-byte IDX file.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path} is corrupt or truncated ({err}). Delete it and copy or download it again."
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4].hex()}). "
            f"Replace it with the official file."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    expected = header + int(torch.tensor(shape).prod()) if shape else -1
    if len(raw) != expected:
        raise DataError(
            f"{path} is truncated or padded: its header promises shape {tuple(shape)} "
            f"({expected} bytes) but the file holds {len(raw)} bytes. Replace it."
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=_IDX_DTYPES[raw[2]])
    return data.view(*shape)


def _read_once(path: Path) -> torch.Tensor:
    """:func:`read_idx`, decoded once per process for a given file version (decompressing
    the training images takes seconds); the tensor is shared, so callers never modify it."""
    stat = path.stat()
    return _read_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, size: int, mtime_ns: int) -> torch.Tensor:
    return read_idx(Path(path))


class MNIST:
    """MNIST or Fashion-MNIST as tensors, and as class pools for episodes.

    Args:
        root: data folder holding ``mnist/`` (or ``fashion_mnist/``) with the four IDX
            files; ``None`` means the user data folder.
        variant: ``mnist`` or ``fashion_mnist``.
        download: fetch missing files from ``mirror`` (checking the official MD5).
        mirror: base URL of the files; ``None`` means the official address.

    Attributes:
        train_images: ``(60000, 1, 28, 28)`` uint8.
        train_labels: ``(60000,)`` int64 in ``0..9``.
        test_images: ``(10000, 1, 28, 28)`` uint8.
        test_labels: ``(10000,)`` int64.
    """

    channels = 1
    image_shape = (1, SIDE, SIDE)

    def __init__(
        self,
        root: str | None,
        variant: str = "mnist",
        download: bool = True,
        mirror: str | None = None,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"unknown MNIST variant {variant!r}; choose one of {list(VARIANTS)}")
        folder_name, official, md5s = VARIANTS[variant]
        self.variant = variant
        self.folder = data_root(root) / folder_name
        paths = {}
        for role, name in FILES.items():
            paths[role] = self._locate(name, md5s[name], download, mirror or official)
        for split in ("train", "test"):
            images = _read_once(paths[f"{split}_images"])
            labels = _read_once(paths[f"{split}_labels"])
            self._check(split, images, labels, paths)
            setattr(self, f"{split}_images", images.unsqueeze(1))
            setattr(self, f"{split}_labels", labels.long())

    def _check(self, split: str, images: torch.Tensor, labels: torch.Tensor, paths: dict) -> None:
        n = COUNTS[split]
        where = f"{paths[f'{split}_images']} / {paths[f'{split}_labels'].name}"
        if images.dim() != 3 or tuple(images.shape) != (n, SIDE, SIDE):
            raise DataError(
                f"{where}: expected {n} images of {SIDE}x{SIDE}, found shape "
                f"{tuple(images.shape)}. Replace the files with the official ones."
            )
        if labels.dim() != 1 or labels.numel() != n or int(labels.max()) >= CLASSES:
            raise DataError(
                f"{where}: expected {n} labels in 0..{CLASSES - 1}, found shape "
                f"{tuple(labels.shape)} with maximum {int(labels.max())}. Replace the files."
            )

    def _locate(self, name: str, md5: str, allow_download: bool, base_url: str) -> Path:
        path = self.folder / name
        if path.exists():
            return path
        expected = (
            f"{self.variant} is missing {name} in {self.folder}: expected the four IDX files "
            f"{', '.join(FILES.values())}. Put them there, or point `data_dir=` (or "
            f"METARUN_DATA) at a folder that has {self.folder.name}/ inside."
        )
        if not allow_download:
            raise DataError(expected + " Downloading is off (download=false).")
        url = f"{base_url.rstrip('/')}/{name}"
        log.info("downloading %s to %s", url, path)
        try:
            download(url, path, md5)
        except DataError as err:
            raise DataError(f"{expected} Download failed: {err}") from err
        return path

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (n, 1, 28, 28) uint8, labels (n,))`` of ``train`` or ``test``."""
        if split not in COUNTS:
            raise ValueError(f"unknown MNIST split {split!r}; choose train or test")
        return getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")

    def pool(self, split: str) -> ClassPool:
        """The ten classes of ``split`` (``train``, ``val`` or ``test``, see the module
        docstring) as a :class:`ClassPool` for the episode sampler."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        images, labels = self.split("test" if split == "test" else "train")
        rows = []
        for c in range(CLASSES):
            idx = torch.nonzero(labels == c).flatten()
            if split != "test":
                n_train = int(round(idx.numel() * (1 - VAL_FRACTION)))
                idx = idx[:n_train] if split == "train" else idx[n_train:]
            rows.append(idx)
        width = max(r.numel() for r in rows)
        items = torch.full((CLASSES, width), -1, dtype=torch.long)
        for c, idx in enumerate(rows):
            items[c, : idx.numel()] = idx
        return ClassPool(images, items, [str(c) for c in range(CLASSES)])


__all__ = ["MNIST", "read_idx", "DataError"]
