"""The Omniglot loader on the real files: splits, cache, corrupt and missing data, downloads."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from metarun.data import omniglot as omniglot_module
from metarun.data.files import DataError, md5sum
from metarun.data.omniglot import Omniglot


def test_vinyals_split_sizes_and_rotations(omniglot):
    sizes = {s: omniglot.pool(s).n_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 1028 * 4, "val": 172 * 4, "test": 423 * 4}
    pool = omniglot.pool("test")
    assert pool.images.shape == (423 * 4 * 20, 1, 28, 28) and pool.images.dtype == torch.uint8
    # Class 4k+r is character k rotated by r * 90 degrees.
    torch.testing.assert_close(
        pool.images[pool.class_items[1]], torch.rot90(pool.images[pool.class_items[0]], 1, (-2, -1))
    )


def test_packaged_split_lists_equal_the_published_ones(omniglot, data_dir):
    published = data_dir / "omniglot" / "splits" / "vinyals"
    for split in ("train", "val", "test"):
        lines = (published / f"{split}.txt").read_text().split()
        assert omniglot.pool(split).class_names == lines


def test_strokes_are_bright_on_a_dark_background(omniglot):
    mean = omniglot.images.float().mean() / 255
    assert 0.02 < mean < 0.3


def test_lake_split_trains_on_background_and_tests_on_evaluation(data_dir, cache_dir):
    lake = Omniglot(str(data_dir), str(cache_dir), split="lake")
    train, val, test = (lake.pool(s) for s in ("train", "val", "test"))
    assert (train.n_classes, val.n_classes, test.n_classes) == (964 - 172, 172, 659)
    assert all(n.startswith("images_background/") for n in train.class_names + val.class_names)
    assert all(n.startswith("images_evaluation/") for n in test.class_names)


def test_cache_is_reused_and_the_data_folder_never_written(data_dir, cache_dir, monkeypatch):
    before = sorted(p.name for p in (data_dir / "omniglot").iterdir())
    Omniglot(str(data_dir), str(cache_dir))  # built by the session fixture already
    monkeypatch.setattr(omniglot_module, "_decode_source", _must_not_decode)
    again = Omniglot(str(data_dir), str(cache_dir))
    assert again.images.shape == (1623, 20, 1, 28, 28)
    assert sorted(p.name for p in (data_dir / "omniglot").iterdir()) == before


def _must_not_decode(*args, **kwargs):
    raise AssertionError("the cache should have been used")


def _copy_data(data_dir: Path, dest: Path) -> Path:
    (dest / "omniglot").mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copy(data_dir / "omniglot" / name, dest / "omniglot" / name)
    return dest / "omniglot"


def test_truncated_zip_is_a_clear_error_and_leaves_no_cache(data_dir, tmp_path):
    folder = _copy_data(data_dir, tmp_path / "data")
    archive = folder / "images_evaluation.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match="images_evaluation.zip is corrupt or truncated"):
        Omniglot(str(tmp_path / "data"), str(tmp_path / "cache"), download=False)
    leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_wrong_archive_contents_are_a_clear_error(data_dir, tmp_path):
    folder = _copy_data(data_dir, tmp_path / "data")
    with zipfile.ZipFile(folder / "images_evaluation.zip", "w") as z:
        z.writestr("images_evaluation/Alpha/character01/0001_01.png", b"not a png")
    with pytest.raises(DataError, match="images_evaluation"):
        Omniglot(str(tmp_path / "data"), str(tmp_path / "cache"), download=False)


def test_missing_data_offline_names_the_folder_and_files(tmp_path):
    with pytest.raises(
        DataError, match=r"(?s)missing from .*empty/omniglot.*images_background\.zip"
    ):
        Omniglot(str(tmp_path / "empty"), str(tmp_path / "cache"), download=False)


def test_download_checks_the_official_md5_and_leaves_nothing_on_mismatch(data_dir, tmp_path):
    # The shared zips were repacked, so their MD5 is not the official one: a "download"
    # of them from a file:// mirror must be refused.
    mirror = (data_dir / "omniglot").as_uri()
    with pytest.raises(DataError, match="checksum mismatch"):
        Omniglot(str(tmp_path / "data"), str(tmp_path / "cache"), mirror=mirror)
    assert not (tmp_path / "data").exists()  # not even the folders made for the download


def test_download_from_a_mirror_with_matching_checksums(data_dir, tmp_path, monkeypatch, cache_dir):
    archives = {
        name: (chars, md5sum(data_dir / "omniglot" / f"{name}.zip"))
        for name, (chars, _) in omniglot_module.ARCHIVES.items()
    }
    monkeypatch.setattr(omniglot_module, "ARCHIVES", archives)
    mirror = (data_dir / "omniglot").as_uri()
    downloaded = Omniglot(str(tmp_path / "data"), str(tmp_path / "cache"), mirror=mirror)
    assert sorted(p.name for p in (tmp_path / "data" / "omniglot").iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
    assert downloaded.images.shape == (1623, 20, 1, 28, 28)


def test_unreachable_mirror_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="Download failed"):
        Omniglot(
            str(tmp_path / "data"), str(tmp_path / "cache"), mirror=(tmp_path / "nowhere").as_uri()
        )


def test_extracted_folders_are_read_like_zips(data_dir, tmp_path, omniglot):
    folder = tmp_path / "data" / "omniglot"
    folder.mkdir(parents=True)
    shutil.copy(data_dir / "omniglot" / "images_background.zip", folder)
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as z:
        z.extractall(folder)
    extracted = Omniglot(str(tmp_path / "data"), str(tmp_path / "cache"), download=False)
    assert torch.equal(extracted.images, omniglot.images)
    assert extracted.characters == omniglot.characters
