"""The learn2learn adapter: clear errors without learn2learn or without the files, and (where
learn2learn is installed) each dataset read from small files in learn2learn's layout."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import learn2learn as adapter
from metarun.data.episodes import EpisodeSampler
from metarun.data.files import DataError
from metarun.data.learn2learn import Learn2LearnDataset

# --- without learn2learn ------------------------------------------------------------------------


@pytest.fixture
def no_learn2learn(monkeypatch):
    """Makes ``import learn2learn`` fail, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "learn2learn", None)


def test_missing_learn2learn_names_the_install_script(no_learn2learn):
    with pytest.raises(DataError, match=r"scripts/install_learn2learn\.sh") as err:
        adapter.import_learn2learn()
    assert 'pip install "metarun[l2l]"' in str(err.value)


def test_download_without_learn2learn_is_the_same_clear_error(no_learn2learn, tmp_path):
    with pytest.raises(DataError, match="learn2learn, which is not installed"):
        Learn2LearnDataset("fc100", str(tmp_path / "data"), str(tmp_path / "cache"), 32)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fc100", "FC100_train.pickle, FC100_val.pickle, FC100_test.pickle"),
        ("tiered_imagenet", "tiered-imagenet/train_images_png.pkl"),
        ("cifar_fs", "cifarfs/cifar100/data, cifarfs/cifar100/splits/bertinetto"),
        ("cub200", "cubirds200/CUB_200_2011/images"),
        ("fgvc_aircraft", "fgvc-aircraft-2013b/data/labels.pkl or with"),
        ("fgvc_aircraft", "fgvc_aircraft/fgvc-aircraft-2013b/data/images_variant_test.txt"),
        ("fgvc_fungi", "fgvc_fungi/images, fgvc_fungi/train.json, fgvc_fungi/val.json"),
        ("vgg_flowers", "vgg_flower102/jpg, vgg_flower102/imagelabels.mat"),
        ("dtd", "describable_textures/dtd/images"),
    ],
)
def test_offline_without_files_names_the_folder_and_files(tmp_path, name, expected):
    with pytest.raises(DataError) as err:
        Learn2LearnDataset(name, str(tmp_path / "data"), str(tmp_path / "cache"), 32, False)
    message = str(err.value)
    assert str(tmp_path / "data" / name) in message and expected in message
    assert "dataset.download=false" in message
    assert not (tmp_path / "data").exists()  # nothing created in the data folder


def test_importing_the_adapter_does_not_import_learn2learn():
    code = "import metarun.data.learn2learn, sys; print('learn2learn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", list(adapter.SPECS))
def test_dataset_configs_compose(make_cfg, name):
    cfg = make_cfg(f"dataset={name}")
    assert cfg.dataset.name == name
    assert cfg.dataset._target_ == "metarun.data.learn2learn.Learn2LearnDataset"
    assert cfg.dataset.image_size == adapter.SPECS[name].image_size


# --- with learn2learn: small files in its layout --------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


SPLIT_FILES = {"train": "train", "val": "val", "test": "test"}


def test_fc100_pickles(tmp_path, monkeypatch):
    pytest.importorskip("learn2learn")
    folder = tmp_path / "data" / "fc100"
    folder.mkdir(parents=True)
    written = {}
    for k, split in enumerate(SPLIT_FILES):
        labels = [10 * k + c for c in range(6) for _ in range(3)]  # 6 classes x 3 images
        data = _images(len(labels), 32, seed=k)
        with open(folder / f"FC100_{split}.pickle", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f, protocol=2)
        written[split] = (data, labels)
    dataset = Learn2LearnDataset("fc100", str(tmp_path / "data"), str(tmp_path / "cache"), 32)
    for split, (data, labels) in written.items():
        pool = dataset.pool(split)
        assert pool.n_classes == 6 and pool.counts.tolist() == [3] * 6
        first = pool.class_names.index(f"{labels[0]:05d}")
        got = pool.images[pool.class_items[first]].permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(got, data[:3])
    episode = EpisodeSampler(dataset.pool("test"), 5, 1, 2, seed=0).sample()
    assert episode.support_x.shape == (5, 3, 32, 32)

    # The second time, the cache answers and learn2learn is not asked.
    monkeypatch.setattr(Learn2LearnDataset, "_read", _must_not_read)
    again = Learn2LearnDataset("fc100", str(tmp_path / "data"), str(tmp_path / "cache"), 32)
    assert torch.equal(again.pool("val").images, dataset.pool("val").images)


def _must_not_read(self, split):
    raise AssertionError("the cache should have been used")


def test_cifar_fs_folders_and_split_files(tmp_path):
    pytest.importorskip("learn2learn")
    raw = tmp_path / "data" / "cifar_fs" / "cifarfs" / "cifar100"
    classes = {"train": ["apple", "bear"], "val": ["cloud"], "test": ["dolphin", "eagle"]}
    for k, (split, names) in enumerate(classes.items()):
        (raw / "splits" / "bertinetto").mkdir(parents=True, exist_ok=True)
        (raw / "splits" / "bertinetto" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for c, name in enumerate(names):
            (raw / "data" / name).mkdir(parents=True)
            for i, image in enumerate(_images(2, 32, seed=10 * k + c)):
                (raw / "data" / name / f"{i}.png").write_bytes(_png(image))
    dataset = Learn2LearnDataset("cifar_fs", str(tmp_path / "data"), str(tmp_path / "cache"), 32)
    for split, names in classes.items():
        assert dataset.pool(split).class_names == names
    apple = np.asarray(Image.open(raw / "data" / "apple" / "0.png").convert("RGB"))
    np.testing.assert_array_equal(dataset.pool("train").images[0].permute(1, 2, 0).numpy(), apple)


def test_tiered_imagenet_pickles_are_resized(tmp_path):
    pytest.importorskip("learn2learn")
    folder = tmp_path / "data" / "tiered_imagenet" / "tiered-imagenet"
    folder.mkdir(parents=True)
    first_png = {}
    for k, split in enumerate(SPLIT_FILES):
        labels = np.array([0, 0, 1, 1, 2, 2])
        pngs = [_png(image) for image in _images(len(labels), 84, seed=k)]
        (folder / f"{split}_images_png.pkl").write_bytes(pickle.dumps(pngs))
        (folder / f"{split}_labels.pkl").write_bytes(pickle.dumps({"label_specific": labels}))
        first_png[split] = pngs[0]
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    dataset = Learn2LearnDataset("tiered_imagenet", root, cache, 21)
    for split, png in first_png.items():
        pool = dataset.pool(split)
        assert pool.images.shape == (6, 3, 21, 21) and pool.n_classes == 3
        resized = Image.open(io.BytesIO(png)).convert("RGB")
        resized = resized.resize((21, 21), Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(pool.images[0].permute(1, 2, 0).numpy(), np.asarray(resized))


def test_cub200_triantafillou_split(tmp_path):
    pytest.importorskip("learn2learn")
    from learn2learn.vision.datasets.cu_birds200 import SPLITS

    images = tmp_path / "data" / "cub200" / "cubirds200" / "CUB_200_2011" / "images"
    for k, name in enumerate(sum(SPLITS.values(), [])):
        (images / name).mkdir(parents=True)
        for i, image in enumerate(_images(2, 24, seed=k)):
            Image.fromarray(image).save(images / name / f"{name[4:]}_{i}.jpg")
    dataset = Learn2LearnDataset("cub200", str(tmp_path / "data"), str(tmp_path / "cache"), 16)
    sizes = [dataset.pool(s).n_classes for s in ("train", "val", "test")]
    assert sizes == [140, 30, 30]  # the standard split, from learn2learn's class lists
    assert dataset.pool("test").images.shape == (60, 3, 16, 16)


def _solid(height: int, width: int, shade: int, seed: int | None = None) -> np.ndarray:
    """A grey ``(height, width, 3)`` image of one shade; with a seed, plus noise in [0, 3]."""
    image = np.full((height, width, 3), shade, dtype=np.uint8)
    if seed is not None:
        image += np.random.default_rng(seed).integers(0, 4, image.shape, dtype=np.uint8)
    return image


def _assert_shades(pool, shade: dict[str, int], tolerance: float) -> None:
    """Every image of each class of ``pool`` has its class's shade on average: the images
    were grouped under the right name."""
    for c, name in enumerate(pool.class_names):
        items = pool.class_items[c][pool.class_items[c] >= 0]
        means = pool.images[items].float().mean(dim=(1, 2, 3))
        assert (means - shade[name]).abs().max() <= tolerance, (name, means)


def _standard_split_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the standard split has" in r.getMessage()]


AIRCRAFT = {"train": ["A340-300", "F-16A/B", "Cessna 172"], "val": ["737-900", "A310"]}
AIRCRAFT["test"] = ["737-400", "ATR-42"]  # real variant names, in learn2learn's split lists


def test_fgvc_aircraft_archive_is_cropped_and_named_by_variant(tmp_path, caplog):
    pytest.importorskip("learn2learn")
    from learn2learn.vision.datasets.fgvc_aircraft import SPLITS

    for split, key in zip(AIRCRAFT, ("train", "valid", "test"), strict=True):
        assert set(AIRCRAFT[split]) <= set(SPLITS[key])
    # The archive as extracted: images/<id>.jpg, images_box.txt, images_variant_*.txt.
    data = tmp_path / "data" / "fgvc_aircraft" / adapter.AIRCRAFT_DATA
    (data / "images").mkdir(parents=True)
    shade, boxes, image_id = {}, [], 1025790
    for split, variants in AIRCRAFT.items():
        lines = []
        for variant in variants:
            shade[variant] = 40 + 25 * len(shade)
            for _ in range(2):
                image_id += 1
                image = _solid(48, 48, 255)  # a white copyright banner below the aircraft
                image[:32] = shade[variant]
                Image.fromarray(image).save(data / "images" / f"{image_id:07d}.jpg", quality=95)
                lines.append(f"{image_id:07d} {variant}")
                boxes.append(f"{image_id:07d} 0 0 48 32")
        (data / f"images_variant_{SPLIT_FILES[split]}.txt").write_text("\n".join(lines) + "\n")
    (data / "images_box.txt").write_text("\n".join(boxes) + "\n")
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")

    with caplog.at_level(logging.WARNING, logger=adapter.__name__):
        dataset = Learn2LearnDataset("fgvc_aircraft", root, cache, 16, download=False)
    assert (data / "labels.pkl").exists()  # written from the variant lists for learn2learn
    for split, variants in AIRCRAFT.items():
        pool = dataset.pool(split)
        assert pool.class_names == sorted(variants) and pool.counts.tolist() == [2] * len(variants)
        assert pool.images.shape == (2 * len(variants), 3, 16, 16)
        _assert_shades(pool, shade, tolerance=2)  # the white banner was cropped away
    assert _standard_split_warnings(caplog) == [
        "fgvc_aircraft train has 3 classes, the standard split has 70",
        "fgvc_aircraft val has 2 classes, the standard split has 15",
        "fgvc_aircraft test has 2 classes, the standard split has 15",
    ]
    episode = EpisodeSampler(dataset.pool("train"), 3, 1, 1, seed=0).sample()
    assert episode.support_x.shape == (3, 3, 16, 16) and episode.query_x.shape == (3, 3, 16, 16)

    # What learn2learn's download leaves (labels.pkl) reads without the variant lists.
    for path in data.glob("images_variant_*.txt"):
        path.unlink()
    again = Learn2LearnDataset("fgvc_aircraft", root, str(tmp_path / "cache2"), 16, False)
    assert torch.equal(again.pool("test").images, dataset.pool("test").images)


def test_fgvc_fungi_annotations_of_both_files(tmp_path, caplog):
    pytest.importorskip("learn2learn")
    from learn2learn.vision.datasets.fgvc_fungi import SPLITS

    chosen = {"train": SPLITS["train"][:3], "val": SPLITS["validation"][:2]}
    chosen["test"] = SPLITS["test"][:2]  # real "NNNN.Species" names: ids and names
    folder = tmp_path / "data" / "fgvc_fungi"
    files = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    shade, image_id = {}, 0
    for names in chosen.values():
        for name in names:
            shade[name] = 40 + 25 * len(shade)
            category, species = int(name[:4]), name[5:]
            (folder / "fgvc_fungi" / "images" / f"{category:04d}_{species}").mkdir(parents=True)
            for i in range(3):
                image_id += 1
                file_name = f"images/{category:04d}_{species}/F{image_id:05d}.JPG"
                Image.fromarray(_solid(20, 30, shade[name])).save(folder / "fgvc_fungi" / file_name)
                part = files["val" if i == 0 else "train"]  # both annotation files count
                part["images"].append({"id": image_id, "file_name": file_name})
                part["annotations"].append(
                    {"id": image_id, "image_id": image_id, "category_id": category}
                )
    for part, content in files.items():
        (folder / "fgvc_fungi" / f"{part}.json").write_text(json.dumps(content))
    # learn2learn would reuse a bookkeeping file left from other files; it is dropped.
    (folder / "fgvc-fungi-validation-bookkeeping.pkl").write_bytes(b"stale")
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")

    with caplog.at_level(logging.WARNING, logger=adapter.__name__):
        dataset = Learn2LearnDataset("fgvc_fungi", root, cache, 12, download=False)
    for split, names in chosen.items():
        pool = dataset.pool(split)
        assert pool.class_names == sorted(names) and pool.counts.tolist() == [3] * len(names)
        assert pool.images.shape == (3 * len(names), 3, 12, 12)
        _assert_shades(pool, shade, tolerance=2)
    assert "fgvc_fungi train has 3 classes, the standard split has 994" in caplog.text
    assert "fgvc_fungi test has 2 classes, the standard split has 200" in caplog.text
    episode = EpisodeSampler(dataset.pool("val"), 2, 2, 1, seed=0).sample()
    assert episode.support_x.shape == (4, 3, 12, 12)


VGG_FLOWERS = {"train": [90, 38], "val": [10, 16], "test": [5, 9]}  # real category numbers


def make_vgg_flowers(data_root, size: int = 24) -> dict[str, int]:
    """A small VGG Flowers 102 in its real format: ``jpg/image_NNNNN.jpg`` numbered from 1
    and ``imagelabels.mat`` (``labels``: ``(1, n)``, the category 1-102 of each image), two
    images of each category of :data:`VGG_FLOWERS`, in mixed order. Returns the shade of
    each class name (``"090"``, ...)."""
    import scipy.io

    folder = data_root / "vgg_flowers" / "vgg_flower102"
    (folder / "jpg").mkdir(parents=True)
    categories = [c for cs in VGG_FLOWERS.values() for c in cs for _ in range(2)]
    categories = np.random.default_rng(0).permutation(categories).tolist()
    chosen = [c for cs in VGG_FLOWERS.values() for c in cs]
    shade = {f"{c:03d}": 40 + 30 * j for j, c in enumerate(chosen)}
    for n, category in enumerate(categories, start=1):
        image = Image.fromarray(_solid(size, size, shade[f"{category:03d}"]))
        image.save(folder / "jpg" / f"image_{n:05d}.jpg", quality=95)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([categories], np.uint8)})
    return shade


def test_vgg_flowers_labels_mat(tmp_path, caplog):
    pytest.importorskip("learn2learn")
    from learn2learn.vision.datasets.vgg_flowers import SPLITS

    for split, key in zip(VGG_FLOWERS, ("train", "validation", "test"), strict=True):
        assert set(VGG_FLOWERS[split]) <= set(SPLITS[key])
    shade = make_vgg_flowers(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger=adapter.__name__):
        dataset = Learn2LearnDataset(
            "vgg_flowers", str(tmp_path / "data"), str(tmp_path / "cache"), 16, download=False
        )
    for split, categories in VGG_FLOWERS.items():
        pool = dataset.pool(split)
        assert pool.class_names == sorted(f"{c:03d}" for c in categories)
        assert pool.counts.tolist() == [2, 2] and pool.images.shape == (4, 3, 16, 16)
        _assert_shades(pool, shade, tolerance=2)
    assert len(_standard_split_warnings(caplog)) == 3  # 2 categories per split, not 71/15/16
    episode = EpisodeSampler(dataset.pool("test"), 2, 1, 1, seed=0).sample()
    assert episode.support_x.shape == (2, 3, 16, 16)


def test_dtd_standard_split_in_a_stable_order(tmp_path, caplog):
    pytest.importorskip("learn2learn")
    from learn2learn.vision.datasets.describable_textures import SPLITS

    images = tmp_path / "data" / "dtd" / "describable_textures" / "dtd" / "images"
    shade = {}
    for k, name in enumerate(sum(SPLITS.values(), [])):
        (images / name).mkdir(parents=True)
        shade[name] = 10 + 5 * k
        if name == "banded":  # an empty folder: the test split has one class fewer
            continue
        for i in range(2):
            image = Image.fromarray(_solid(24, 24, shade[name], seed=100 * k + i))
            image.save(images / name / f"{name}_{i:04d}.jpg", quality=95)
    root = str(tmp_path / "data")

    with caplog.at_level(logging.WARNING, logger=adapter.__name__):
        dataset = Learn2LearnDataset("dtd", root, str(tmp_path / "cache"), 16, download=False)
    sizes = [dataset.pool(s).n_classes for s in ("train", "val", "test")]
    assert sizes == [33, 7, 6]  # the standard 33 / 7 / 7, less the empty "banded"
    assert _standard_split_warnings(caplog) == ["dtd test has 6 classes, the standard split has 7"]
    for split, key in (("train", "train"), ("val", "validation"), ("test", "test")):
        pool = dataset.pool(split)
        assert set(pool.class_names) == set(SPLITS[key]) - {"banded"}
        assert pool.images.shape == (2 * pool.n_classes, 3, 16, 16)
        _assert_shades(pool, {n: v + 1.5 for n, v in shade.items()}, tolerance=2)
        for row in pool.class_items:  # each class's images in the order of their hashes
            digests = [hashlib.sha1(pool.images[i].numpy().tobytes()).digest() for i in row]
            assert digests == sorted(digests)
    episode = EpisodeSampler(dataset.pool("train"), 5, 1, 1, seed=0).sample()
    assert episode.support_x.shape == (5, 3, 16, 16)

    # learn2learn lists every class folder of the split: a missing one is a clear error.
    shutil.rmtree(images / "woven")
    with pytest.raises(DataError, match=r"dtd test: reading failed: FileNotFoundError"):
        Learn2LearnDataset("dtd", root, str(tmp_path / "cache2"), 16, download=False)


def test_download_failure_offline_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("learn2learn")
    import learn2learn.vision.datasets.fc100 as l2l_fc100

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(l2l_fc100, "download_file", offline)
    monkeypatch.setattr(l2l_fc100, "download_file_from_google_drive", offline)
    with pytest.raises(DataError) as err:
        Learn2LearnDataset("fc100", str(tmp_path / "data"), str(tmp_path / "cache"), 32)
    message = str(err.value)
    assert "download failed (offline?)" in message and "no network" in message
    assert str(tmp_path / "data" / "fc100") in message and "FC100_train.pickle" in message


def test_all_specs_name_real_learn2learn_classes():
    l2l = pytest.importorskip("learn2learn")
    for name, spec in adapter.SPECS.items():
        assert hasattr(l2l.vision.datasets, spec.l2l_class), name
