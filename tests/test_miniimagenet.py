"""The miniImageNet loader: the real val/test classes from the shared data folder, and small
files in the raw (csv + JPEG) and learn2learn pickle formats made here."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from metarun.data import miniimagenet as mini_module
from metarun.data.episodes import EpisodeSampler
from metarun.data.files import DataError
from metarun.data.miniimagenet import MiniImageNet


@pytest.fixture(scope="session")
def mini(data_dir, cache_dir) -> MiniImageNet:
    """The real val and test classes at 84x84 (the cache is built once per session)."""
    return MiniImageNet(str(data_dir), str(cache_dir), split="val_test_reduced")


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r[0], r[1]) for r in list(csv.reader(f))[1:]]


# --- the real files ---------------------------------------------------------------------------


def test_reduced_split_trains_on_val_classes_and_tests_on_test_classes(mini, data_dir):
    folder = data_dir / "miniimagenet"
    val_classes = sorted({label for _, label in _csv_rows(folder / "val.csv")})
    test_classes = sorted({label for _, label in _csv_rows(folder / "test.csv")})
    train, val, test = (mini.pool(s) for s in ("train", "val", "test"))
    assert (train.n_classes, val.n_classes, test.n_classes) == (11, 5, 20)
    assert train.class_names + val.class_names == val_classes
    assert val.class_names == val_classes[-5:]
    assert test.class_names == test_classes
    for pool in (train, val, test):
        assert pool.counts.tolist() == [600] * pool.n_classes
    assert test.images.shape == (12000, 3, 84, 84) and test.images.dtype == torch.uint8


def test_cached_pixels_equal_the_decoded_jpeg(mini, data_dir):
    folder = data_dir / "miniimagenet"
    test = mini.pool("test")
    name, label = _csv_rows(folder / "test.csv")[1234]
    row = test.class_names.index(label)
    # Images keep their csv order within a class.
    position = [n for n, lab in _csv_rows(folder / "test.csv") if lab == label].index(name)
    expected = np.asarray(Image.open(folder / "images" / name).convert("RGB"))
    got = test.images[test.class_items[row, position]].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


def test_ravi_split_names_the_missing_train_images(data_dir, cache_dir):
    with pytest.raises(DataError) as err:
        MiniImageNet(str(data_dir), str(cache_dir), split="ravi")
    message = str(err.value)
    assert "38400 of 38400 images listed in train.csv are missing" in message
    assert "n01532829 (600)" in message and "val_test_reduced" in message


def test_five_way_one_shot_episodes_on_the_real_test_classes(mini):
    pool = mini.pool("test")
    sampler = EpisodeSampler(pool, ways=5, shots=1, query_shots=15, seed=3)
    episode = sampler.sample()
    assert episode.support_x.shape == (5, 3, 84, 84)
    assert episode.query_x.shape == (75, 3, 84, 84)
    assert episode.query_y.bincount().tolist() == [15] * 5
    # Support and query images are distinct images of the episode's classes.
    flat = torch.cat([episode.support_x, episode.query_x]).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == 80
    again = EpisodeSampler(pool, ways=5, shots=1, query_shots=15, seed=3).sample()
    assert torch.equal(again.query_x, episode.query_x)
    assert torch.equal(again.classes, episode.classes)


def test_run_on_the_reduced_protocol_records_the_split(make_cfg, tmp_path):
    from metarun import run

    cfg = make_cfg(
        "dataset=miniimagenet",
        "dataset.split=val_test_reduced",
        "algo=protonet",
        "hardware.num_threads=1",
    )
    summary = run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["protocol"]["split"] == "val_test_reduced"
    assert results["protocol"]["image_size"] == 84
    assert results["protocol"]["test_classes"] == 20
    assert 0.0 <= summary["test/acc"] <= 1.0


def test_reduced_val_classes_out_of_range_is_an_error(data_dir, cache_dir):
    with pytest.raises(ValueError, match="reduced_val_classes must be between 1 and 15"):
        MiniImageNet(
            str(data_dir), str(cache_dir), split="val_test_reduced", reduced_val_classes=16
        )


# --- small files made here ----------------------------------------------------------------------

CLASSES = {"train": ["n001", "n002", "n003"], "val": ["n004", "n005"], "test": ["n006", "n007"]}
PER_CLASS = 4


def _jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG")
    return out.getvalue()


def _make_raw(root: Path) -> Path:
    """A miniImageNet folder in the raw format: three csv files and JPEGs of 40x30 pixels."""
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    seed = 0
    for split, classes in CLASSES.items():
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for wnid in classes:
                for i in range(PER_CLASS):
                    name = f"{wnid}{i:08d}.jpg"
                    (folder / "images" / name).write_bytes(_jpeg(seed))
                    writer.writerow([name, wnid])
                    seed += 1
    return folder


def test_raw_format_is_resized_and_split(tmp_path):
    _make_raw(tmp_path / "data")
    data = MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=16)
    assert data.source == "raw" and data.image_shape == (3, 16, 16)
    for split, classes in CLASSES.items():
        pool = data.pool(split)
        assert pool.class_names == classes
        assert pool.images.shape == (len(classes) * PER_CLASS, 3, 16, 16)
    first = (
        Image.open(io.BytesIO(_jpeg(0))).convert("RGB").resize((16, 16), Image.Resampling.LANCZOS)
    )
    np.testing.assert_array_equal(
        data.pool("train").images[0].permute(1, 2, 0).numpy(), np.asarray(first)
    )


def test_cache_is_reused_then_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    folder = _make_raw(tmp_path / "data")
    MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=16)
    cache_files = sorted(p.name for p in (tmp_path / "cache" / "miniimagenet").iterdir())
    assert cache_files == [f"miniimagenet_{s}_16px.pt" for s in ("test", "train", "val")]

    decoded = []
    real_decode = mini_module._decode
    monkeypatch.setattr(mini_module, "_decode", lambda p, s: decoded.append(p) or real_decode(p, s))
    MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=16)
    assert decoded == []  # every split came from the cache

    changed = folder / "images" / "n00600000000.jpg"
    changed.write_bytes(_jpeg(999, size=(50, 50)))
    os.utime(changed, ns=(1, 1))
    data = MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=16)
    assert len(decoded) == len(CLASSES["test"]) * PER_CLASS  # only the test split rebuilt
    new = (
        Image.open(io.BytesIO(_jpeg(999, (50, 50))))
        .convert("RGB")
        .resize((16, 16), Image.Resampling.LANCZOS)
    )
    np.testing.assert_array_equal(
        data.pool("test").images[0].permute(1, 2, 0).numpy(), np.asarray(new)
    )


def test_missing_split_file_lists_what_is_missing(tmp_path):
    folder = _make_raw(tmp_path / "data")
    (folder / "test.csv").unlink()
    with pytest.raises(DataError, match=r"missing test\.csv, mini-imagenet-cache-train\.pkl"):
        MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), download=False)


def test_missing_images_are_counted_and_named(tmp_path):
    folder = _make_raw(tmp_path / "data")
    (folder / "images" / "n00400000002.jpg").unlink()
    (folder / "images" / "n00500000003.jpg").unlink()
    with pytest.raises(DataError) as err:
        MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=16)
    message = str(err.value)
    assert "miniImageNet val: 2 of 8 images listed in val.csv are missing" in message
    assert "n004 (1), n005 (1)" in message and "n00400000002.jpg" in message


def test_corrupt_image_is_a_clear_error_and_leaves_no_cache(tmp_path):
    folder = _make_raw(tmp_path / "data")
    (folder / "images" / "n00100000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode .*n00100000001.jpg"):
        MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=16)
    assert not (tmp_path / "cache" / "miniimagenet" / "miniimagenet_train_16px.pt").exists()


def _make_pickles(root: Path, size: int = 84, protocol: int = pickle.HIGHEST_PROTOCOL) -> dict:
    """learn2learn's format: ``image_data`` (n, H, W, 3) uint8 and ``class_dict``."""
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, classes in CLASSES.items():
        n = len(classes) * PER_CLASS
        image_data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        # Interleaved rows: class k owns rows k, k + len(classes), ...
        class_dict = {wnid: list(range(k, n, len(classes))) for k, wnid in enumerate(classes)}
        with open(folder / mini_module.PICKLE_FILES[split], "wb") as f:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol)
        arrays[split] = (image_data, class_dict)
    return arrays


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_learn2learn_pickles_are_read(tmp_path, protocol):
    arrays = _make_pickles(tmp_path / "data", size=20, protocol=protocol)
    data = MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=20)
    assert data.source == "pickle"
    for split, (image_data, class_dict) in arrays.items():
        pool = data.pool(split)
        assert pool.class_names == CLASSES[split]
        for row, wnid in enumerate(pool.class_names):
            got = pool.images[pool.class_items[row]].permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(got, image_data[class_dict[wnid]])


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    _make_pickles(tmp_path / "data", size=8)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data" / "miniimagenet" / mini_module.PICKLE_FILES["val"]
    path.write_bytes(pickle.dumps({"image_data": Exploit(), "class_dict": {}}))
    with pytest.raises(DataError, match="not a readable learn2learn miniImageNet cache"):
        MiniImageNet(str(tmp_path / "data"), str(tmp_path / "cache"), image_size=8)
    assert not marker.exists()


def test_nothing_there_offline_names_both_formats(tmp_path):
    with pytest.raises(DataError) as err:
        MiniImageNet(str(tmp_path / "empty"), str(tmp_path / "cache"), download=False)
    message = str(err.value)
    assert "train.csv" in message and "mini-imagenet-cache-validation.pkl" in message
    assert str(tmp_path / "empty" / "miniimagenet") in message


def test_config_instantiates_the_dataset(make_cfg, data_dir):
    cfg = make_cfg("dataset=miniimagenet", "dataset.split=val_test_reduced")
    dataset = instantiate(cfg.dataset)
    assert isinstance(dataset, MiniImageNet)
    assert dataset.folder == data_dir / "miniimagenet" and dataset.image_shape == (3, 84, 84)
