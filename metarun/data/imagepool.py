"""Building blocks shared by the image datasets: decoding and resizing, grouping images by
class into a :class:`ClassPool`, and the per-split uint8 tensor cache.

A cache file holds one split at one image size, with a fingerprint of its sources (sizes
and modification times); it is reused only while the fingerprint matches, written
atomically, and rebuilt when it is stale or unreadable.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from metarun.data.episodes import ClassPool
from metarun.data.files import DataError, atomic_torch_save

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def to_rgb_tensor(image: Any, size: int) -> torch.Tensor:
    """A PIL image, encoded bytes or a ``(H, W, 3)`` uint8 array -> ``(3, size, size)`` uint8.

    Images that are not ``size`` x ``size`` already are resized with Lanczos filtering.
    """
    from PIL import Image  # only needed while building a cache

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(size, size, 3).permute(2, 0, 1).contiguous()


def group_by_class(images: torch.Tensor, labels: Sequence[str]) -> ClassPool:
    """``(n, C, H, W)`` images and one class name per image -> a :class:`ClassPool` whose
    classes are in sorted name order and whose items keep the images' order."""
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    names = sorted(by_class)
    width = max((len(v) for v in by_class.values()), default=0)
    items = torch.full((len(names), width), -1, dtype=torch.long)
    for row, name in enumerate(names):
        items[row, : len(by_class[name])] = torch.tensor(by_class[name])
    return ClassPool(images, items, names)


def subset(pool: ClassPool, classes: Iterable[int]) -> ClassPool:
    """The given classes of ``pool`` (shares the image tensor, copies nothing large)."""
    idx = torch.as_tensor(list(classes), dtype=torch.long)
    return ClassPool(pool.images, pool.class_items[idx], [pool.class_names[i] for i in idx])


def stat_fingerprint(paths: Iterable[Path]) -> list[int]:
    """``[count, total bytes, newest mtime_ns]`` of existing files: changes when a source
    file is replaced, added or removed, without reading any of them."""
    count = total = newest = 0
    for path in paths:
        s = os.stat(path)
        count, total, newest = count + 1, total + s.st_size, max(newest, s.st_mtime_ns)
    return [count, total, newest]


def load_cache(cache_file: Path, fingerprint: Any, what: str) -> ClassPool | None:
    """The cached pool if ``cache_file`` exists and was built from the same sources."""
    if not cache_file.exists():
        return None
    try:
        cached = torch.load(cache_file, weights_only=True)
        if cached.get("format") == CACHE_FORMAT and cached.get("sources") == fingerprint:
            return ClassPool(cached["images"], cached["class_items"], cached["class_names"])
        log.info("%s cache %s is stale; rebuilding it", what, cache_file)
    except Exception as err:  # a damaged cache is rebuilt, never trusted
        log.warning("%s cache %s is unreadable (%s); rebuilding it", what, cache_file, err)
    return None


def save_cache(cache_file: Path, fingerprint: Any, pool: ClassPool, what: str) -> None:
    """Writes ``pool`` atomically; a cache folder that cannot be written is a clear error."""
    try:
        atomic_torch_save(
            {
                "format": CACHE_FORMAT,
                "sources": fingerprint,
                "images": pool.images,
                "class_items": pool.class_items,
                "class_names": pool.class_names,
            },
            cache_file,
        )
    except OSError as err:
        raise DataError(
            f"cannot write the {what} cache to {cache_file}: {err}. Set `cache_dir=` "
            f"(or METARUN_CACHE) to a writable folder."
        ) from err
