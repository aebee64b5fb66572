"""Where data and caches live, downloads with checksums, and atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from metarun.errors import DataError  # the data layer's error, defined with the others


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metarun"


def data_root(configured: str | None) -> Path:
    """The data folder: ``data_dir`` from the config, else ``~/.cache/metarun/data``.

    The config's default for ``data_dir`` is the ``METARUN_DATA`` environment variable.
    """
    return Path(configured).expanduser().resolve() if configured else _user_cache() / "data"


def cache_root(configured: str | None) -> Path:
    """The writable cache folder: ``cache_dir`` (``METARUN_CACHE``), else ``~/.cache/metarun``."""
    return Path(configured).expanduser().resolve() if configured else _user_cache() / "cache"


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None, timeout: float = 60.0) -> None:
    """Downloads ``url`` to ``dest`` and checks its MD5; nothing is left behind on failure,
    not even the folders made for it."""
    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    done = False
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        if md5 is not None and (got := md5sum(Path(tmp))) != md5:
            raise DataError(f"checksum mismatch for {url}: expected MD5 {md5}, got {got}")
        os.replace(tmp, dest)
        done = True
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"could not download {url}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not done:
            for folder in created:  # deepest first; only the empty ones this call made
                try:
                    folder.rmdir()
                except OSError:
                    break


def atomic_write(data: bytes, path: Path) -> None:
    """Writes ``data`` to a temporary file beside ``path``, flushes it to the disk, then
    renames it into place: a crash, a kill or a full disk never leaves a half-written file
    at ``path``, and the file that was there stays until the new one is complete.

    Raises:
        OSError: the write failed (``errno.ENOSPC`` when the disk is full); nothing changed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` of ``obj`` to ``path`` through :func:`atomic_write` (serialised in
    memory first, so a failed write is an ``OSError`` with its errno)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(buffer.getvalue(), path)


def stale_temporary_files(folder: Path) -> list[Path]:
    """The temporary files :func:`atomic_write` leaves in ``folder`` when its process is
    killed mid-write (``.<name>.<random>.tmp``)."""
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
