"""Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Source: the official repository https://github.com/brendenlake/omniglot (``python/``
folder), MIT license. MD5 checksums of the official zips as listed by torchvision's
``Omniglot`` dataset.

Splits:
    ``vinyals``: 1028 / 172 / 423 characters (train / val / test), each at rotations 0, 90,
        180 and 270 degrees as separate classes (Vinyals et al. 2016; lists from the
        Prototypical Networks code, shipped in ``metarun/data/splits``).
    ``lake``: train on the background set (30 alphabets) less 5 alphabets held out for
        validation (the Vinyals validation alphabets, all from the background set); test on
        the 20 alphabets of the evaluation set (Lake et al. 2015). No rotations.
    ``lake_proxy``: the ``lake`` split's training characters; validation *and* test on its
        5 held-out background alphabets, validation on the drawings of drawers 1-10 and test
        on those of drawers 11-20. Nothing of the evaluation set is used, so models for
        Lake's benchmark can be developed and compared without touching its alphabets.

Drawers: a file ``NNNN_MM.png`` is drawing ``MM`` (01-20) of character ``NNNN``. Within one
alphabet, ``MM`` names the same person for every character: in each of the 30 background
alphabets, ``MM`` explains 8-89% of the per-character variance of a drawing's ink, height,
width and centre (8-89% against 2-7% with ``MM`` shuffled within each character; p < 0.005
for each alphabet and feature), while the effects of ``MM`` are uncorrelated between
alphabets (mean r = 0.03 over the 435 pairs, sd 0.23, as for independent drawers), so
drawers are identified by ``(alphabet, MM)``. Each pool records the alphabet of each class
(``groups``) and the drawer ``MM`` of each image (``drawers``).

Images are resized to ``image_size`` (Lanczos), inverted so strokes are bright (255)
on a dark (0) background, and cached as one uint8 tensor file per image size.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from importlib import resources
from pathlib import Path

import torch

from metarun.data.episodes import ClassPool
from metarun.data.files import DataError, atomic_torch_save, cache_root, data_root, download
from metarun.errors import ConfigError

log = logging.getLogger(__name__)

OFFICIAL_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
ARCHIVES = {  # name -> (characters, official MD5)
    "images_background": (964, "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": (659, "6b91aef0f799c5bb55b94e3f2daec811"),
}
DRAWINGS = 20
VINYALS_VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
# lake_proxy: which drawers (MM) of the held-out alphabets validate and which test.
PROXY_DRAWERS = {"val": tuple(range(1, 11)), "test": tuple(range(11, 21))}
CACHE_FORMAT = 2  # 2: adds the drawer (MM) of each image; a format-1 cache is rebuilt
SPLITS = ("vinyals", "lake", "lake_proxy")
_FILE = re.compile(r"^\d+_(\d+)\.png$")  # NNNN_MM.png: character NNNN, drawer MM


class Omniglot:
    """Omniglot as three class pools (``train``, ``val``, ``test``).

    Args:
        root: data folder holding ``omniglot/images_{background,evaluation}.zip`` (or the
            extracted folders); ``None`` means the user data folder. Never written to,
            except by a download into it.
        cache_dir: writable folder for the resized tensor cache; ``None`` means the user cache.
        split: ``vinyals``, ``lake`` or ``lake_proxy`` (see the module docstring).
        image_size: side of the square images after resizing.
        download: fetch missing archives from ``mirror`` (checking the official MD5).
        mirror: base URL of the archives; ``None`` means the official repository.
        train_rotations: ``lake`` and ``lake_proxy`` only: add every training character
            rotated by 90, 180 and 270 degrees as new classes (rotated alphabets as new
            alphabets), as the ``vinyals`` split does for all its splits.
    """

    channels = 1
    invert = True
    """Images are stored as ``255 - pixel`` (strokes bright); ``metarun adapt`` prepares a
    user's images the same way."""
    episode_kinds = ("standard", "within_alphabet")  # train/eval.episodes (metarun.checks)
    augmentations = ("none", "affine")  # train.augment

    def __init__(
        self,
        root: str | None,
        cache_dir: str | None,
        split: str = "vinyals",
        image_size: int = 28,
        download: bool = True,
        mirror: str | None = None,
        train_rotations: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown Omniglot split {split!r}; choose one of {SPLITS}")
        if train_rotations and split == "vinyals":
            raise ConfigError(
                "dataset.train_rotations=true adds rotated training classes to the lake and "
                "lake_proxy splits; the vinyals split has them already. Set it to false."
            )
        self.split, self.image_size, self.train_rotations = split, image_size, train_rotations
        self.folder = data_root(root) / "omniglot"
        cache_file = cache_root(cache_dir) / "omniglot" / f"omniglot_{image_size}px.pt"
        sources = {name: self._locate(name, download, mirror) for name in ARCHIVES}
        self.images, self.characters, self.drawers = _load_or_build(sources, cache_file, image_size)
        self._index = {"/".join(c.split("/")[1:]): i for i, c in enumerate(self.characters)}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def pool(self, split: str) -> ClassPool:
        """The classes of ``split`` (``train``, ``val`` or ``test``) as a :class:`ClassPool`."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        if self.split == "vinyals":
            chars = _packaged_split(split)
            return self._rotated_pool([self._index[c] for c in chars], chars)
        lake_split = "val" if self.split == "lake_proxy" and split == "test" else split
        idx = [i for i, c in enumerate(self.characters) if _in_lake_split(c, lake_split)]
        names = [self.characters[i] for i in idx]
        if split == "train" and self.train_rotations:
            return self._rotated_pool(idx, ["/".join(n.split("/")[1:]) for n in names])
        images, drawers = self.images[idx], self.drawers[idx]
        if self.split == "lake_proxy" and split != "train":
            keep = torch.isin(drawers, torch.tensor(PROXY_DRAWERS[split], dtype=drawers.dtype))
            per_class = len(PROXY_DRAWERS[split])
            images = images[keep].view(len(idx), per_class, *images.shape[2:])
            drawers = drawers[keep].view(len(idx), per_class)
        return ClassPool.from_grouped(images, names, [n.split("/")[1] for n in names], drawers)

    def _rotated_pool(self, idx: list[int], names: list[str]) -> ClassPool:
        """Each character at 0/90/180/270 degrees (counter-clockwise) as 4 classes; each
        rotated alphabet is a group of its own (``Alphabet/rot090``)."""
        base = self.images[idx]  # (n, 20, 1, s, s)
        rotated = torch.stack([torch.rot90(base, k, dims=(-2, -1)) for k in range(4)], dim=1)
        rot_names = [f"{n}/rot{90 * k:03d}" for n in names for k in range(4)]
        groups = [f"{n.split('/')[0]}/rot{90 * k:03d}" for n in names for k in range(4)]
        drawers = self.drawers[idx].repeat_interleave(4, dim=0)
        return ClassPool.from_grouped(rotated.flatten(0, 1), rot_names, groups, drawers)

    def _locate(self, name: str, allow_download: bool, mirror: str | None) -> Path:
        """The archive (or extracted folder) for ``name``, downloading it if allowed."""
        for candidate in (self.folder / name, self.folder / f"{name}.zip"):
            if candidate.exists():
                return candidate
        target = self.folder / f"{name}.zip"
        expected = (
            f"Omniglot is missing from {self.folder}: expected images_background.zip and "
            f"images_evaluation.zip (or the extracted folders images_background/ and "
            f"images_evaluation/). Put them there, or point `data_dir=` (or METARUN_DATA) "
            f"at a folder that has omniglot/ inside."
        )
        if not allow_download:
            raise DataError(expected + " Downloading is off (dataset.download=false).")
        url = f"{(mirror or OFFICIAL_URL).rstrip('/')}/{name}.zip"
        log.info("downloading %s to %s", url, target)
        try:
            download(url, target, ARCHIVES[name][1])
        except DataError as err:
            raise DataError(f"{expected} Download failed: {err}") from err
        return target


def _packaged_split(split: str) -> list[str]:
    text = resources.files("metarun.data").joinpath(f"splits/omniglot_vinyals_{split}.txt")
    lines = text.read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def _in_lake_split(character: str, split: str) -> bool:
    top, alphabet = character.split("/")[:2]
    if split == "test":
        return top == "images_evaluation"
    held_out = alphabet in VINYALS_VAL_ALPHABETS
    return top == "images_background" and held_out == (split == "val")


def _fingerprint(sources: dict[str, Path]) -> dict[str, list[int]]:
    def stat(p: Path) -> list[int]:
        s = p.stat()
        return [s.st_size, s.st_mtime_ns] if p.is_file() else [-1, s.st_mtime_ns]

    return {name: stat(path) for name, path in sources.items()}


def _load_or_build(
    sources: dict[str, Path], cache_file: Path, image_size: int
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Loads the tensor cache if it matches the sources, else decodes the archives into it.
    Returns images ``(n, 20, 1, s, s)``, character names and drawers ``(n, 20)``."""
    fingerprint = _fingerprint(sources)
    if cache_file.exists():
        try:
            cached = torch.load(cache_file, weights_only=True)
            if cached.get("format") == CACHE_FORMAT and cached.get("sources") == fingerprint:
                return cached["images"], cached["characters"], cached["drawers"]
            log.info("Omniglot cache %s is stale; rebuilding it", cache_file)
        except Exception as err:  # a damaged cache is rebuilt, never trusted
            log.warning("Omniglot cache %s is unreadable (%s); rebuilding it", cache_file, err)
    log.info("building the Omniglot cache at %d px (once; takes about a minute)", image_size)
    characters: list[str] = []
    images: list[torch.Tensor] = []
    drawers: list[torch.Tensor] = []
    for name, path in sources.items():
        chars, imgs, drawn_by = _decode_source(name, path, image_size)
        characters += chars
        images.append(imgs)
        drawers.append(drawn_by)
    all_images, all_drawers = torch.cat(images), torch.cat(drawers)
    try:
        atomic_torch_save(
            {
                "format": CACHE_FORMAT,
                "sources": fingerprint,
                "characters": characters,
                "images": all_images,
                "drawers": all_drawers,
            },
            cache_file,
        )
    except OSError as err:
        raise DataError(
            f"cannot write the Omniglot cache to {cache_file}: {err}. Set `cache_dir=` "
            f"(or METARUN_CACHE) to a writable folder."
        ) from err
    return all_images, characters, all_drawers


def _decode_source(
    name: str, path: Path, size: int
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Decodes one archive or folder into ``(characters, images (n, 20, 1, size, size),
    drawers (n, 20))``."""
    n_chars = ARCHIVES[name][0]
    try:
        if path.is_dir():
            files = {
                f"{name}/{p.relative_to(path).as_posix()}": p.read_bytes
                for p in path.rglob("*.png")
            }
            chars, images, drawers = _decode_files(files, size)
        else:
            with zipfile.ZipFile(path) as archive:
                files = {
                    n: (lambda n=n: archive.read(n))
                    for n in archive.namelist()
                    if n.endswith(".png")
                }
                chars, images, drawers = _decode_files(files, size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise DataError(
            f"Omniglot archive {path} is corrupt or truncated ({err}). Delete it and copy or "
            f"download it again."
        ) from err
    if len(chars) != n_chars or images.shape[1] != DRAWINGS:
        raise DataError(
            f"{path} does not look like Omniglot's {name}: expected {n_chars} characters "
            f"with {DRAWINGS} drawings each, found {len(chars)} characters and "
            f"{images.shape[1] if len(chars) else 0} drawings. Replace it with the official file."
        )
    return chars, images, drawers


def _decode_files(files: dict, size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``files`` maps ``top/Alphabet/characterNN/NNNN_MM.png`` to a byte reader. Returns
    the characters, their images ``(n, 20, 1, size, size)`` in drawer order and the drawer
    ``MM`` of each ``(n, 20)``."""
    by_char: dict[str, dict[int, str]] = {}
    for member in files:
        parts = member.split("/")
        match = _FILE.match(parts[-1])
        if len(parts) != 4 or match is None:
            raise OSError(
                f"unexpected entry {member!r} (expected Alphabet/characterNN/NNNN_MM.png)"
            )
        drawings = by_char.setdefault("/".join(parts[:3]), {})
        if int(match.group(1)) in drawings:
            raise OSError(f"{member!r} repeats drawer {match.group(1)} of its character")
        drawings[int(match.group(1))] = member
    chars = sorted(by_char)
    counts = {len(by_char[c]) for c in chars}
    if counts != {DRAWINGS}:
        raise OSError(f"characters with {sorted(counts)} drawings, expected {DRAWINGS}")
    out = torch.empty(len(chars), DRAWINGS, 1, size, size, dtype=torch.uint8)
    drawers = torch.empty(len(chars), DRAWINGS, dtype=torch.int16)
    for i, char in enumerate(chars):
        for j, drawer in enumerate(sorted(by_char[char])):
            member = by_char[char][drawer]
            try:
                out[i, j] = decode_image(files[member](), size)
            except (OSError, ValueError, zipfile.BadZipFile) as err:
                raise OSError(f"cannot read or decode {member}: {err}") from err
            drawers[i, j] = drawer
    return chars, out, drawers


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """An Omniglot PNG (dark strokes on white) -> ``(1, size, size)`` uint8, resized
    (Lanczos) and inverted so strokes are bright; also used for Lake's one-shot runs."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("L")
    except UnidentifiedImageError:
        raise ValueError(f"not an image Pillow can read ({len(data)} bytes)") from None
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return 255 - pixels.view(1, size, size)


__all__ = ["Omniglot", "DataError"]
