"""``dataset=folder``: few-shot episodes from a folder of images, one folder per class.

Layout: ``root/<class>/<image files>``, or ``class_depth`` folder levels per class name
(``root/<alphabet>/<character>/`` for Omniglot: ``class_depth=2``, class names
``alphabet/character``). Every file whose extension Pillow knows (PNG, JPEG, BMP, GIF, TIFF,
WebP, ...) directly inside a class folder is an image of that class; other files, and
files and folders whose names start with ``.``, are left out.

Images are converted to grayscale (``channels=1``, Pillow's ``L`` mode) or RGB
(``channels=3``) whatever their own mode, so a folder may mix modes: RGB photos become
grayscale with ITU-R 601-2 luma weights, grayscale images become RGB with three equal
channels, an alpha channel is dropped, a palette is expanded. An EXIF orientation tag is
applied first. Images are then resized to ``image_size`` x ``image_size`` with Lanczos
filtering (the aspect ratio is not kept) unless they are that size already, and
optionally inverted (``invert``: ``255 - pixel``, for dark drawings on a light background
such as Omniglot, so strokes are bright as in ``dataset=omniglot``).

``rotations`` turns each class into one class per angle (multiples of 90 degrees,
counter-clockwise, named ``<class>/rot090``), as the Vinyals et al. (2016) Omniglot split
does. The class split is described in :mod:`metarun.data.classsplit`; with rotations, a
split list may name a rotated class (``alphabet/character/rot090``) or the class itself
(all its rotations), and ``fractions`` and ``folders`` split whole classes with all their
rotations.

The decoded images of the classes the split uses are cached as one uint8 tensor file per
root, image size, channels and inversion in ``cache_dir/folder/``, written atomically and
rebuilt when any image file is added, removed, renamed or changed (its path, size and
modification time are part of the cache's fingerprint).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metarun.data import classsplit, imagepool
from metarun.data.classsplit import SPLITS
from metarun.data.episodes import ClassPool
from metarun.data.files import DataError, cache_root

log = logging.getLogger(__name__)

MODES = ("auto", "lists", "folders", "fractions")
ANGLES = (0, 90, 180, 270)
_ROTATED = re.compile(r"(.+)/rot(\d{3})")


class ImageFolder(classsplit.SplitPools):
    """Image folders as three class pools (``train``, ``val``, ``test``).

    Args:
        root: the folder of class folders (or of ``train/``, ``val/``, ``test/`` folders of
            class folders with ``split=folders``). Never written to.
        cache_dir: writable folder for the decoded tensor cache; ``None`` means the user cache.
        image_size: side of the square images after resizing.
        channels: 1 (grayscale) or 3 (RGB); every image is converted (see the module docstring).
        invert: store ``255 - pixel``.
        class_depth: how many folder levels below ``root`` (or below ``root/<split>``) name
            a class; images must be directly inside the class folders.
        rotations: angles, counter-clockwise in degrees from 0, 90, 180, 270; more than
            ``[0]`` makes each class one class per angle.
        split: ``lists``, ``folders``, ``fractions`` or ``auto``: ``lists`` when
            ``split_dir`` is set or ``root`` holds ``train.txt``, else ``folders`` when
            ``root`` holds ``train/``, ``val/`` and ``test/`` folders, else ``fractions``.
        split_dir: the folder of ``train.txt``, ``val.txt``, ``test.txt`` (``lists``);
            ``None`` means ``root``.
        fractions: train / val / test fractions of the classes (``fractions``).
        split_seed: seed of the ``fractions`` shuffle.
        drop_small_classes: leave out, with a warning naming them, the classes with fewer
            images than an episode takes; ``False`` refuses them with an error naming them.
    """

    def __init__(
        self,
        root: str | None,
        cache_dir: str | None,
        image_size: int = 84,
        channels: int = 3,
        invert: bool = False,
        class_depth: int = 1,
        rotations: Sequence[int] = (0,),
        split: str = "auto",
        split_dir: str | None = None,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        split_seed: int = 0,
        drop_small_classes: bool = False,
    ):
        if not root:
            raise ValueError(
                "dataset=folder needs dataset.root=FOLDER: the folder of class folders "
                "(FOLDER/<class>/<image files>; docs/DATASETS.md)"
            )
        classsplit.check_options(split, MODES, fractions, split_dir)
        if image_size < 1:
            raise ValueError(f"dataset.image_size must be positive, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if class_depth < 1:
            raise ValueError(f"dataset.class_depth must be 1 or more, got {class_depth}")
        rotations = [int(r) for r in rotations]
        if not rotations or len(set(rotations)) != len(rotations) or set(rotations) - set(ANGLES):
            raise ValueError(
                f"dataset.rotations={rotations}: give distinct angles from {list(ANGLES)} "
                f"([0] for no rotation)"
            )
        self.image_size, self.channels, self.invert = image_size, channels, invert
        self.class_depth, self.rotations = class_depth, rotations
        self.cache_dir = cache_dir
        self.small_classes = "drop" if drop_small_classes else "error"
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"dataset.root={root}: no such folder ({self.root})")
        lists_dir = Path(split_dir).expanduser().resolve() if split_dir else self.root
        self.mode = split if split != "auto" else self._auto_mode(split_dir, lists_dir)
        files, entries = self._find_classes(lists_dir, fractions, split_seed)
        self.names = {s: [self._name(key, r) for key, r in entries[s]] for s in SPLITS}
        classsplit.check_disjoint(self.names, self.where)
        used = sorted({key for s in SPLITS for key, _ in entries[s]})
        cached = self._load_or_build({key: files[key] for key in used})
        self._pools = {s: self._split_pool(s, entries[s], cached) for s in SPLITS}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def describe(self) -> dict[str, Any]:
        """The split used: mode, source of each split and each class's number of images."""
        return {
            "dataset": "folder",
            "root": str(self.root),
            "mode": self.mode,
            "rotations": self.rotations,
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

    # -- finding the classes ----------------------------------------------------------------

    def _auto_mode(self, split_dir: str | None, lists_dir: Path) -> str:
        if split_dir is not None or (lists_dir / "train.txt").is_file():
            return "lists"
        if all((self.root / s).is_dir() for s in SPLITS):
            return "folders"
        return "fractions"

    def _find_classes(
        self, lists_dir: Path, fractions: Sequence[float], split_seed: int
    ) -> tuple[dict[str, list[Path]], dict[str, list[tuple[str, int]]]]:
        """The image files of each class folder (keyed by its path relative to ``root``), and
        the ``(class folder, rotation)`` pairs of each split, in pool order; sets
        ``self.where``, where each split's classes came from."""
        rotations = self.rotations
        if self.mode == "folders":
            bases, self.where = self._split_folders()
            files = {k: v for part in bases.values() for k, v in part.items()}
            entries = {s: [(key, r) for key in sorted(bases[s]) for r in rotations] for s in SPLITS}
            return files, entries
        files = self._scan_root(self.root)
        if self.mode == "lists":
            entries, self.where = self._from_lists(lists_dir, files)
            return files, entries
        parts = classsplit.by_fractions(list(files), fractions, split_seed)
        self.where = {
            s: f"{len(parts[s])} of the {len(files)} classes in {self.root} by fractions "
            f"{list(fractions)}, split_seed {split_seed}"
            for s in SPLITS
        }
        return files, {s: [(key, r) for key in parts[s] for r in rotations] for s in SPLITS}

    def _name(self, key: str, rotation: int) -> str:
        name = key.split("/", 1)[1] if self.mode == "folders" else key
        return name if self.rotations == [0] else f"{name}/rot{rotation:03d}"

    def _split_folders(self) -> tuple[dict[str, dict[str, list[Path]]], dict[str, str]]:
        bases, where = {}, {}
        for s in SPLITS:
            top = self.root / s
            if not top.is_dir():
                raise DataError(
                    f"split=folders needs {top}: root must hold train/, val/ and test/ "
                    f"folders, each a folder of class folders."
                )
            found = self._scan_root(top)
            bases[s] = {f"{s}/{name}": paths for name, paths in found.items()}
            where[s] = f"the class folders in {top}"
        return bases, where

    def _scan_root(self, top: Path) -> dict[str, list[Path]]:
        """Class name (the ``class_depth`` folders below ``top``) -> its sorted image files."""
        extensions = _image_extensions()
        classes: dict[str, list[Path]] = {}
        _walk(top, (), self.class_depth, extensions, classes)
        if not classes:
            raise DataError(
                f"{top} holds no class folder (class_depth={self.class_depth}: classes are "
                f"the folders {self.class_depth} level(s) below it): the split is empty. "
                f"Put the images in {top}/<class>/."
            )
        if not any(classes.values()):
            raise DataError(
                f"the class folders in {top} hold no image files (extensions Pillow reads, "
                f"such as .png and .jpg); the split is empty."
            )
        return classes

    def _from_lists(
        self, folder: Path, files: dict[str, list[Path]]
    ) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str]]:
        lists = classsplit.read_lists(folder)
        paths = classsplit.list_files(folder)
        entries, where = {}, {}
        for s in SPLITS:
            resolved = [(name, self._resolve_entry(name, files)) for name in lists[s]]
            missing = [name for name, found in resolved if found is None]
            rotated = [m for m in map(_ROTATED.fullmatch, missing) if m and m[1] in files]
            hint = (
                f" {rotated[0][0]} names a rotation of the class {rotated[0][1]}: set "
                f"dataset.rotations to the angles the lists use (e.g. [0, 90, 180, 270])."
                if rotated
                else ""
            )
            classsplit.refuse_missing(missing, str(paths[s]), self.root, hint)
            entries[s] = [e for _, found in resolved for e in found or ()]
            where[s] = f"the classes listed in {paths[s]}"
        return entries, where

    def _resolve_entry(self, entry: str, files: dict) -> list[tuple[str, int]] | None:
        """A list entry -> its (class folder, rotation) pairs; ``None`` if it is not there."""
        if entry in files:
            return [(entry, r) for r in self.rotations]
        match = _ROTATED.fullmatch(entry)
        rotated = self.rotations != [0] and match is not None
        if rotated and match[1] in files and int(match[2]) in self.rotations:
            return [(match[1], int(match[2]))]
        return None

    # -- images ---------------------------------------------------------------------------

    def _load_or_build(self, files: dict[str, list[Path]]) -> ClassPool:
        """The images of ``files``' classes (in sorted class order) from the cache, or decoded
        into it."""
        digest = hashlib.sha1()
        for key in sorted(files):
            for path in files[key]:
                st = path.stat()
                digest.update(f"{key}\t{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        mode = "L" if self.channels == 1 else "RGB"
        fingerprint = {"root": str(self.root), "files": digest.hexdigest(), "mode": mode}
        tag = hashlib.sha1(str(self.root).encode()).hexdigest()[:16]
        inverted = "_inverted" if self.invert else ""
        name = f"{self.root.name}_{tag}_{self.image_size}px_{mode}{inverted}.pt"
        cache_file = cache_root(self.cache_dir) / "folder" / name
        what = f"image folder {self.root}"
        cached = imagepool.load_cache(cache_file, fingerprint, what)
        if cached is not None:
            return cached
        n = sum(len(v) for v in files.values())
        log.info("decoding %d images of %d classes from %s (once)", n, len(files), self.root)
        images = torch.empty(n, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        rows: dict[str, list[int]] = {}
        failed: list[str] = []
        i = 0
        for key in sorted(files):
            rows[key] = []
            for path in files[key]:
                try:
                    images[i] = decode(path, self.image_size, self.channels, self.invert)
                except DataError as err:
                    failed.append(str(err))
                    continue
                rows[key].append(i)
                i += 1
        if failed:
            more = f"\n... and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise DataError(
                f"{len(failed)} of {n} image files under {self.root} cannot be read; "
                f"replace or remove them:\n" + "\n".join(failed[:5]) + more
            )
        pool = classsplit.pool_from_rows(images, rows, sorted(files), str(self.root), "skip")
        imagepool.save_cache(cache_file, fingerprint, pool, what)
        return pool

    def _split_pool(
        self, split: str, entries: list[tuple[str, int]], cached: ClassPool
    ) -> ClassPool:
        """The pool of one split: its classes in order, rotated as the entries say."""
        index = {name: i for i, name in enumerate(cached.class_names)}
        names = self.names[split]
        origin = f"the {split} split ({self.where[split]})"

        def rows_of(key: str) -> list[int]:
            items = cached.class_items[index[key]]
            return items[items >= 0].tolist()

        if self.rotations == [0]:
            rows = {name: rows_of(key) for name, (key, _) in zip(names, entries, strict=True)}
            return classsplit.pool_from_rows(cached.images, rows, names, origin, self.small_classes)
        keys = list(dict.fromkeys(key for key, _ in entries))  # each class folder once
        picked = [rows_of(key) for key in keys]
        base = cached.images[[r for rs in picked for r in rs]]
        position, start = {}, 0
        for key, rs in zip(keys, picked, strict=True):
            position[key] = range(start, start + len(rs))
            start += len(rs)
        angles = [a for a in self.rotations if any(r == a for _, r in entries)]
        images = torch.cat([torch.rot90(base, a // 90, dims=(-2, -1)) for a in angles])
        offset = {a: j * len(base) for j, a in enumerate(angles)}
        rows = {
            name: [offset[r] + p for p in position[key]]
            for name, (key, r) in zip(names, entries, strict=True)
        }
        return classsplit.pool_from_rows(images, rows, names, origin, self.small_classes)


def _walk(
    folder: Path,
    parts: tuple[str, ...],
    depth: int,
    extensions: set[str],
    classes: dict[str, list[Path]],
) -> None:
    """Fills ``classes`` with the class folders ``depth`` levels below ``folder``."""
    try:
        entries = sorted(
            (e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name
        )
    except OSError as err:
        raise DataError(f"cannot list the folder {folder} ({err})") from err
    images = [Path(e.path) for e in entries if e.is_file() and _is_image(e.name, extensions)]
    dirs = [e for e in entries if e.is_dir()]
    if len(parts) < depth:
        if images:
            raise DataError(
                f"{images[0]} is an image above the class folders: with class_depth={depth} "
                f"the classes are the folders {depth} level(s) below the root, and images "
                f"must be inside them. Move it into a class folder, or set "
                f"dataset.class_depth={len(parts)} if the folders above it are the classes."
            )
        for entry in dirs:
            _walk(Path(entry.path), (*parts, entry.name), depth, extensions, classes)
        return
    for entry in dirs:
        inner = next(
            (p for p in sorted(Path(entry.path).iterdir()) if _is_image(p.name, extensions)), None
        )
        if inner is not None:
            raise DataError(
                f"the class folder {folder} has subfolders with images (e.g. {inner}), but "
                f"with class_depth={depth} a class's images must be directly inside its "
                f"folder. Set dataset.class_depth={depth + 1} if each subfolder is a class."
            )
    classes["/".join(parts)] = images


def is_image_file(path: Path) -> bool:
    """Whether ``path``'s extension is one Pillow reads (and its name does not start with ``.``)."""
    return _is_image(path.name, _image_extensions())


def _image_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _is_image(name: str, extensions: set[str]) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions


def decode(path: Path, size: int, channels: int, invert: bool = False) -> torch.Tensor:
    """An image file -> ``(channels, size, size)`` uint8 (see the module docstring).

    Raises:
        DataError: the file cannot be decoded (the message names it and the cause).
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            img = ImageOps.exif_transpose(opened)
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            data = img.tobytes()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: {type(err).__name__}: {err}") from err
    pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    pixels = pixels.view(size, size, channels).permute(2, 0, 1).contiguous()
    return 255 - pixels if invert else pixels


__all__ = ["ImageFolder", "DataError", "decode", "is_image_file"]
