"""learn2learn's vision datasets (Arnold et al. 2020, "learn2learn: A Library for
Meta-Learning Research") as metarun datasets. With :mod:`metarun.algorithms.l2l_engine`
(``algo.engine=l2l``) this is one of the two modules that import learn2learn.

learn2learn is optional (``pip install "metarun[l2l]"``; on Python >= 3.11 use
``bash scripts/install_learn2learn.sh``) and imported only when a dataset here is built.
Its vision dataset classes read (and, when online, download) tieredImageNet, CIFAR-FS,
FC100, CUB-200-2011, FGVC Aircraft, FGVC Fungi, VGG Flowers 102 and the Describable
Textures; :class:`Learn2LearnDataset` turns each split into metarun's
:class:`~metarun.data.episodes.ClassPool`, cached as uint8 tensors like the other
datasets, so the same episode sampler serves every benchmark.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from metarun.data import imagepool
from metarun.data.episodes import ClassPool
from metarun.data.files import DataError, cache_root, data_root

log = logging.getLogger(__name__)

INSTALL_HINT = (
    'install it with `pip install "metarun[l2l]"`, or on Python >= 3.11 with '
    "`bash scripts/install_learn2learn.sh` (learn2learn 0.2.0 does not build there from PyPI)"
)
L2L_MODES = {"train": "train", "val": "validation", "test": "test"}


@dataclass(frozen=True)
class Spec:
    """How one learn2learn dataset is found on disk and what its standard split holds.

    Attributes:
        l2l_class: the class name in ``learn2learn.vision.datasets``.
        layouts: alternative sets of paths (relative to the dataset folder) that each
            make the dataset readable offline; the first is what a download produces.
        classes: standard number of train / val / test classes.
        image_size: the usual side length in few-shot papers.
        split_lists: for classes that hard-code each split's class list (the module's
            ``SPLITS`` table) and return the position in it as the label: the keys of the
            train, val and test lists. The entries (variant, species, texture names)
            then name the classes instead of the label numbers, so the pool does not
            depend on the order of learn2learn's lists.
        options: further keyword arguments of the learn2learn class.
        prepare: run on the dataset folder before learn2learn reads it.
        order_by_content: the learn2learn class lists folders with ``os.listdir``,
            whose order depends on the file system; order each class's images by a hash
            of their pixels, so the pool (and so every seeded episode) is the same on
            every machine.
    """

    l2l_class: str
    layouts: tuple[tuple[str, ...], ...]
    classes: tuple[int, int, int]
    image_size: int
    split_lists: tuple[str, str, str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Path], None] | None = None
    order_by_content: bool = False


AIRCRAFT_DATA = "fgvc_aircraft/fgvc-aircraft-2013b/data"
AIRCRAFT_VARIANT_FILES = tuple(
    f"{AIRCRAFT_DATA}/images_variant_{s}.txt" for s in ("train", "val", "test")
)


def write_aircraft_labels(folder: Path) -> None:
    """Writes ``labels.pkl`` into an FGVC Aircraft archive extracted by hand.

    learn2learn's ``FGVCAircraft`` reads the image-to-variant list from ``labels.pkl``
    (a pickled list of ``(image id, variant)`` pairs), which only its own download writes;
    without it, it downloads the 2.75 GB archive again. This builds that list from the
    archive's ``images_variant_{train,val,test}.txt`` (lines ``<image id> <variant>``), so
    the official archive, extracted, is readable offline. Does nothing when ``labels.pkl``
    exists or a variant file is missing.
    """
    target = folder / AIRCRAFT_DATA / "labels.pkl"
    sources = [folder / rel for rel in AIRCRAFT_VARIANT_FILES]
    if target.exists() or not all(p.exists() for p in sources):
        return
    pairs = []
    for path in sources:
        for line in path.read_text().splitlines():
            if line.strip():
                image, variant = line.strip().split(" ", 1)
                pairs.append((image, variant.strip()))
    log.info("writing %s from the archive's variant lists (%d images)", target, len(pairs))
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(pickle.dumps(pairs, protocol=4))
    os.replace(partial, target)


def drop_fungi_bookkeeping(folder: Path) -> None:
    """Deletes learn2learn's ``fgvc-fungi-<mode>-bookkeeping.pkl`` files.

    learn2learn's ``FGVCFungi`` saves each split's image list there, with absolute paths,
    and reuses it even after ``train.json`` changes or the folder moves. metarun reads
    through learn2learn only when its own cache is missing or stale, so it lets
    learn2learn rebuild the list from the annotations then (a few seconds).
    """
    for stale in folder.glob("fgvc-fungi-*-bookkeeping.pkl"):
        stale.unlink()


SPECS: dict[str, Spec] = {
    "tiered_imagenet": Spec(
        "TieredImagenet",
        (
            tuple(
                f"tiered-imagenet/{s}_{kind}.pkl"
                for s in ("train", "val", "test")
                for kind in ("images_png", "labels")
            ),
        ),
        (351, 97, 160),
        84,
    ),
    "cifar_fs": Spec(
        "CIFARFS",
        (
            ("cifarfs/cifar100/data", "cifarfs/cifar100/splits/bertinetto"),
            ("cifarfs/processed/train", "cifarfs/processed/val", "cifarfs/processed/test"),
        ),
        (64, 16, 20),
        32,
    ),
    "fc100": Spec(
        "FC100",
        (("FC100_train.pickle", "FC100_val.pickle", "FC100_test.pickle"),),
        (60, 20, 20),
        32,
    ),
    "cub200": Spec(
        "CUBirds200",
        (("cubirds200/CUB_200_2011/images",),),
        (140, 30, 30),
        84,
    ),
    "fgvc_aircraft": Spec(
        "FGVCAircraft",
        (
            tuple(f"{AIRCRAFT_DATA}/{p}" for p in ("images", "images_box.txt", "labels.pkl")),
            (f"{AIRCRAFT_DATA}/images", f"{AIRCRAFT_DATA}/images_box.txt", *AIRCRAFT_VARIANT_FILES),
        ),
        (70, 15, 15),
        84,
        split_lists=("train", "valid", "test"),
        options={"bounding_box_crop": True},
        prepare=write_aircraft_labels,
    ),
    "fgvc_fungi": Spec(
        "FGVCFungi",
        (("fgvc_fungi/images", "fgvc_fungi/train.json", "fgvc_fungi/val.json"),),
        (994, 200, 200),
        84,
        split_lists=("train", "validation", "test"),
        prepare=drop_fungi_bookkeeping,
    ),
    "vgg_flowers": Spec(
        "VGGFlower102",
        (("vgg_flower102/jpg", "vgg_flower102/imagelabels.mat"),),
        (71, 15, 16),
        84,
        split_lists=("train", "validation", "test"),
    ),
    "dtd": Spec(
        "DescribableTextures",
        (("describable_textures/dtd/images",),),
        (33, 7, 7),
        84,
        split_lists=("train", "validation", "test"),
        order_by_content=True,
    ),
}


def import_learn2learn() -> ModuleType:
    """``learn2learn``, or a :class:`DataError` that says how to install it."""
    try:
        import learn2learn
    except ImportError as err:
        raise DataError(f"this needs learn2learn, which is not installed: {INSTALL_HINT}.") from err
    return learn2learn


def learn2learn_version() -> str | None:
    """The installed learn2learn version, without importing it (``None`` if absent)."""
    from importlib import metadata

    try:
        return metadata.version("learn2learn")
    except metadata.PackageNotFoundError:
        return None


def missing_files(name: str, folder: Path) -> list[str]:
    """Paths of the first layout of ``name`` missing from ``folder``; empty when any
    layout is complete."""
    layouts = SPECS[name].layouts
    gaps = [[p for p in layout if not (folder / p).exists()] for layout in layouts]
    return [] if any(not gap for gap in gaps) else gaps[0]


def expected_files_text(name: str, folder: Path) -> str:
    """Human-readable description of what ``folder`` must hold for ``name``."""
    layouts = [", ".join(layout) for layout in SPECS[name].layouts]
    return f"{folder} with " + " or with ".join(layouts)


class Learn2LearnDataset:
    """A learn2learn vision dataset as three class pools (``train``, ``val``, ``test``).

    Args:
        name: a key of :data:`SPECS`: ``tiered_imagenet``, ``cifar_fs``, ``fc100``,
            ``cub200``, ``fgvc_aircraft``, ``fgvc_fungi``, ``vgg_flowers`` or ``dtd``
            (standard splits: Ren et al. 2018; Bertinetto et al. 2019; Oreshkin et al.
            2018; the last five Triantafillou et al. 2020, Meta-Dataset).
        root: data folder; the dataset lives in ``<root>/<name>/`` in learn2learn's
            layout (see ``docs/DATASETS.md``). ``None`` means the user data folder.
        cache_dir: writable folder for the tensor caches; ``None`` means the user cache.
        image_size: side of the square RGB images after resizing (Lanczos).
        download: let learn2learn download missing files (needs internet).
    """

    channels = 3

    def __init__(
        self,
        name: str,
        root: str | None,
        cache_dir: str | None,
        image_size: int,
        download: bool = True,
    ):
        if name not in SPECS:
            raise ValueError(f"unknown learn2learn dataset {name!r}; choose one of {list(SPECS)}")
        self.name, self.image_size, self.download = name, image_size, download
        self.folder = data_root(root) / name
        self.cache_folder = cache_root(cache_dir) / name
        self._pools = {split: self._load(split) for split in L2L_MODES}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def pool(self, split: str) -> ClassPool:
        """The classes of ``split`` (``train``, ``val`` or ``test``) as a :class:`ClassPool`."""
        if split not in L2L_MODES:
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        return self._pools[split]

    def _load(self, split: str) -> ClassPool:
        cache_file = self.cache_folder / f"{self.name}_{split}_{self.image_size}px.pt"
        what = f"{self.name} {split}"
        if not missing_files(self.name, self.folder):
            fingerprint = self._fingerprint()
            pool = imagepool.load_cache(cache_file, fingerprint, what)
            if pool is not None:
                return pool
        elif not self.download:
            raise DataError(
                f"{self.name} is missing: expected {expected_files_text(self.name, self.folder)}"
                f" (missing: {', '.join(missing_files(self.name, self.folder))}). Downloading "
                f"is off (dataset.download=false); copy the files there or point `data_dir=` "
                f"(or METARUN_DATA) at a folder with {self.name}/ inside."
            )
        log.info("building the %s cache at %d px through learn2learn (once)", what, self.image_size)
        pool = self._read(split)
        expected = SPECS[self.name].classes[list(L2L_MODES).index(split)]
        if pool.n_classes != expected:
            log.warning(
                "%s has %d classes, the standard split has %d", what, pool.n_classes, expected
            )
        imagepool.save_cache(cache_file, self._fingerprint(), pool, what)
        return pool

    def _read(self, split: str) -> ClassPool:
        """Reads one split through learn2learn's dataset class (downloading if allowed)."""
        l2l = import_learn2learn()
        spec = SPECS[self.name]
        cls = getattr(l2l.vision.datasets, spec.l2l_class)
        offline_missing = missing_files(self.name, self.folder)
        expected = f"Expected {expected_files_text(self.name, self.folder)}."
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if spec.prepare is not None:
                spec.prepare(self.folder)
            dataset = cls(
                root=str(self.folder),
                mode=L2L_MODES[split],
                download=self.download,
                **spec.options,
            )
        except Exception as err:  # learn2learn raises whatever requests or pickle raise
            reason = "download failed (offline?)" if offline_missing else "reading failed"
            raise DataError(
                f"{self.name} {split}: {reason}: {type(err).__name__}: {err}. {expected}"
            ) from err
        names = None
        if spec.split_lists is not None:
            names = _split_classes(cls, spec.split_lists[list(L2L_MODES).index(split)])
        images, labels = [], []
        try:
            for i in range(len(dataset)):
                image, label = dataset[i]
                images.append(imagepool.to_rgb_tensor(image, self.image_size))
                labels.append(names[int(label)] if names else _class_name(dataset, label))
        except Exception as err:  # a missing or damaged image file, a stale file list
            raise DataError(
                f"{self.name} {split}: reading image {len(images)} failed: "
                f"{type(err).__name__}: {err}. {expected}"
            ) from err
        if not images:
            raise DataError(f"{self.name} {split} holds no images in {self.folder}.")
        if spec.order_by_content:
            digests = [hashlib.sha1(image.numpy().tobytes()).digest() for image in images]
            order = sorted(range(len(images)), key=digests.__getitem__)
            images, labels = [images[i] for i in order], [labels[i] for i in order]
        return imagepool.group_by_class(torch.stack(images), labels)

    def _fingerprint(self) -> list[int]:
        """Sizes and mtimes of every file of the dataset (not their contents)."""
        files: set[Path] = set()
        for layout in SPECS[self.name].layouts:
            for rel in layout:
                path = self.folder / rel
                if path.is_dir():
                    files.update(p for p in path.rglob("*") if p.is_file())
                elif path.exists():
                    files.add(path)
        return imagepool.stat_fingerprint(sorted(files))


def _class_name(dataset: Any, label: Any) -> str:
    """A stable class name: the folder name for ImageFolder datasets, else the label."""
    classes = getattr(dataset, "classes", None)
    label = int(label)
    return str(classes[label]) if classes else f"{label:05d}"


def _split_classes(cls: type, key: str) -> list[str]:
    """The class list learn2learn's module hard-codes for one split (``SPLITS[key]``), as
    names; flower categories (numbers 1-102) become ``"001"`` ... ``"102"``."""
    table = importlib.import_module(cls.__module__).SPLITS
    return [f"{c:03d}" if isinstance(c, int) else str(c) for c in table[key]]


def download_miniimagenet_pickles(folder: Path) -> None:
    """Downloads learn2learn's miniImageNet pickles into ``folder`` through its
    ``MiniImagenet`` class (``mini-imagenet-cache-{train,validation,test}.pkl``)."""
    l2l = import_learn2learn()
    folder.mkdir(parents=True, exist_ok=True)
    for mode in L2L_MODES.values():
        try:
            l2l.vision.datasets.MiniImagenet(root=str(folder), mode=mode, download=True)
        except Exception as err:  # learn2learn raises whatever requests or pickle raise
            raise DataError(
                f"miniImageNet {mode}: download failed (offline?): {type(err).__name__}: "
                f"{err}. Expected {folder}/mini-imagenet-cache-{mode}.pkl, or the raw format "
                f"(train.csv, val.csv, test.csv and images/)."
            ) from err
