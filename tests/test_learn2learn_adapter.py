"""The learn2learn adapter: clear errors without learn2learn or without the files, and (where
learn2learn is installed) each dataset read from small files in learn2learn's layout."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from metarun import learn2learn_adapter as adapter
from metarun.data.episodes import EpisodeSampler
from metarun.data.files import DataError
from metarun.learn2learn_adapter import Learn2LearnDataset

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
    code = "import metarun.learn2learn_adapter, sys; print('learn2learn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["tiered_imagenet", "cifar_fs", "fc100", "cub200"])
def test_dataset_configs_compose(make_cfg, name):
    cfg = make_cfg(f"dataset={name}")
    assert cfg.dataset.name == name
    assert cfg.dataset._target_ == "metarun.learn2learn_adapter.Learn2LearnDataset"
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
