"""The MNIST IDX reader and loader on the real files, and its errors on broken ones."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import pytest
import torch

from metarun.data import mnist
from metarun.data.episodes import EpisodeSampler
from metarun.data.files import DataError, md5sum
from metarun.data.mnist import FILES, MNIST, read_idx

# Images per digit in the official training and test sets (LeCun et al.'s files).
OFFICIAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
OFFICIAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def write_idx(path: Path, data: torch.Tensor, magic_type: int = 0x08) -> None:
    header = bytes([0, 0, magic_type, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + data.to(torch.uint8).numpy().tobytes())


def test_real_mnist_has_the_official_shapes_and_class_counts(data_dir):
    data = MNIST(str(data_dir), download=False)
    assert data.train_images.shape == (60_000, 1, 28, 28)
    assert data.test_images.shape == (10_000, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8
    # the official per-class counts of the training and test sets
    assert torch.bincount(data.train_labels).tolist() == OFFICIAL_TRAIN_COUNTS
    assert torch.bincount(data.test_labels).tolist() == OFFICIAL_TEST_COUNTS
    # strokes are bright on a dark background: the border pixels are dark
    assert data.train_images[:, :, 0, :].float().mean() < 1


def test_read_idx_round_trips_a_written_file(tmp_path):
    data = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    write_idx(tmp_path / "x.gz", data)
    assert torch.equal(read_idx(tmp_path / "x.gz"), data)


def test_truncated_and_foreign_files_are_named_with_the_fix(tmp_path):
    good = torch.zeros(10, 28, 28, dtype=torch.uint8)
    write_idx(tmp_path / "a.gz", good)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="short.gz is truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "cut.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:50])
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_idx(tmp_path / "cut.gz")
    write_idx(tmp_path / "float.gz", good, magic_type=0x0D)
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "float.gz")


def copy_real(data_dir: Path, dest: Path) -> Path:
    folder = dest / "mnist"
    folder.mkdir(parents=True)
    for name in FILES.values():
        shutil.copy(data_dir / "mnist" / name, folder / name)
    return folder


def test_missing_file_without_download_says_where_to_put_it(data_dir, tmp_path):
    folder = copy_real(data_dir, tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz") as err:
        MNIST(str(tmp_path), download=False)
    assert "data_dir=" in str(err.value) and "Downloading is off" in str(err.value)


def test_files_with_the_wrong_structure_are_refused(data_dir, tmp_path):
    folder = copy_real(data_dir, tmp_path)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", torch.full((10_000,), 12))
    with pytest.raises(DataError, match="labels in 0..9"):
        MNIST(str(tmp_path), download=False)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", torch.zeros(9_000, 28, 28))
    with pytest.raises(DataError, match="expected 10000 images"):
        MNIST(str(tmp_path), download=False)


def test_download_checks_the_official_md5(data_dir, tmp_path, monkeypatch):
    """Downloads from a file:// mirror: the repacked local copies differ from the official
    files, so the official checksums must refuse them; with their own checksums the same
    download goes through and nothing else changes."""
    mirror = copy_real(data_dir, tmp_path / "mirror")
    with pytest.raises(DataError, match="checksum mismatch"):
        MNIST(str(tmp_path / "data"), mirror=mirror.as_uri())
    assert not list((tmp_path / "data" / "mnist").glob("*.gz"))  # nothing half-written
    folder, url, _ = mnist.VARIANTS["mnist"]
    local = {name: md5sum(mirror / name) for name in FILES.values()}
    monkeypatch.setitem(mnist.VARIANTS, "mnist", (folder, url, local))
    data = MNIST(str(tmp_path / "data"), mirror=mirror.as_uri())
    assert data.test_images.shape == (10_000, 1, 28, 28)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(FILES.values())


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="fashion_mnist"):
        MNIST(None, variant="kmnist")


def test_mnist_pools_feed_the_episode_sampler(data_dir):
    data = MNIST(str(data_dir), download=False)
    train, val, test = (data.pool(s) for s in ("train", "val", "test"))
    assert train.n_classes == val.n_classes == test.n_classes == 10
    assert int(train.counts.sum()) + int(val.counts.sum()) == 60_000
    assert int(test.counts.sum()) == 10_000
    used = set(train.class_items[train.class_items >= 0].tolist())
    held = set(val.class_items[val.class_items >= 0].tolist())
    assert not used & held  # validation images are never trained on
    episode = EpisodeSampler(val, ways=5, shots=1, query_shots=3, seed=0).sample()
    labels = data.train_labels[val.class_items[episode.classes, 0]]
    assert labels.tolist() == episode.classes.tolist()  # pool class c is digit c
    assert episode.support_x.shape == (5, 1, 28, 28)


def test_dataset_mnist_config_composes(make_cfg, data_dir):
    from hydra.utils import instantiate

    cfg = make_cfg("dataset=mnist", "model=mlp")
    data = instantiate(cfg.dataset)
    assert data.image_shape == (1, 28, 28) and data.pool("test").n_classes == 10
