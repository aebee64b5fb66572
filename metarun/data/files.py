"""Where data and caches live, downloads with checksums, and atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch


class DataError(RuntimeError):
    """A dataset that is missing, corrupt or cannot be fetched; the message says what to do."""


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
    """Downloads ``url`` to ``dest`` and checks its MD5; nothing is left behind on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        if md5 is not None and (got := md5sum(Path(tmp))) != md5:
            raise DataError(f"checksum mismatch for {url}: expected MD5 {md5}, got {got}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(f"could not download {url}: {err}") from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: object, path: Path) -> None:
    """Writes ``obj`` with ``torch.save`` to a temporary file, then renames it into place,
    so a crash or Ctrl-C never leaves a half-written file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
