"""``dataset=folder`` on real images: Omniglot's PNGs extracted to a folder tree (whose fixed
episodes must equal ``dataset=omniglot``'s), miniImageNet's val/test JPEGs as class folders,
and the errors a user's folder can cause."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from metarun.data import folder as folder_module
from metarun.data import imagepool
from metarun.data.episodes import EpisodeError, EpisodeSampler
from metarun.data.files import DataError
from metarun.data.folder import ImageFolder
from metarun.evaluation import fixed_episodes

METARUN = shutil.which("metarun", path=str(Path(sys.executable).parent)) or "metarun"
TRAIN_CHARACTERS = 50  # of the Vinyals train list, to keep the fixture small (see below)
OMNIGLOT_OPTIONS = dict(
    image_size=28, channels=1, invert=True, class_depth=2, rotations=[0, 90, 180, 270]
)


def metarun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [METARUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def omniglot_tree(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Omniglot's PNGs extracted from the zips to ``images/<alphabet>/<character>/`` (both
    sets in one tree, as a user would have them), for the characters of the Vinyals val and
    test lists and the first 50 of its train list; ``lists/`` holds the Vinyals val and test
    lists as published and the train list cut to those 50 characters (the val and test
    episodes do not depend on the train classes)."""
    top = tmp_path_factory.mktemp("omniglot_tree")
    published = data_dir / "omniglot" / "splits" / "vinyals"
    lists = {s: (published / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    train_chars = list(dict.fromkeys(n.rsplit("/", 1)[0] for n in lists["train"]))
    kept = set(train_chars[:TRAIN_CHARACTERS])
    lists["train"] = [n for n in lists["train"] if n.rsplit("/", 1)[0] in kept]
    wanted = {n.rsplit("/", 1)[0] for names in lists.values() for n in names}
    for name in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(data_dir / "omniglot" / f"{name}.zip") as archive:
            for member in archive.namelist():
                character = "/".join(member.split("/")[1:3])
                if member.endswith(".png") and character in wanted:
                    target = top / "images" / member.split("/", 1)[1]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
    (top / "lists").mkdir()
    for split, names in lists.items():
        (top / "lists" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return top


@pytest.fixture(scope="module")
def omniglot_folder(omniglot_tree: Path, tmp_path_factory) -> ImageFolder:
    cache = tmp_path_factory.mktemp("folder_cache")
    return ImageFolder(
        str(omniglot_tree / "images"),
        str(cache),
        split_dir=str(omniglot_tree / "lists"),
        **OMNIGLOT_OPTIONS,
    )


def test_omniglot_tree_gives_the_same_fixed_episodes_as_dataset_omniglot(omniglot_folder, omniglot):
    """Same split lists (val and test: Vinyals'), same options as dataset=omniglot (28 px,
    grayscale, inverted, four rotations): the pools must have the same classes in the same
    order, and the fixed val and test episodes the same images in the same order."""
    assert omniglot_folder.mode == "lists"
    for split in ("val", "test"):
        ours, theirs = omniglot_folder.pool(split), omniglot.pool(split)
        assert ours.class_names == theirs.class_names
        assert ours.n_classes == {"val": 688, "test": 1692}[split]
        a = fixed_episodes(ours, 5, 1, 15, seed=0)
        b = fixed_episodes(theirs, 5, 1, 15, seed=0)
        for _ in range(50):
            ea, eb = a.sample(), b.sample()
            assert torch.equal(ea.classes, eb.classes)
            assert torch.equal(ea.support_x, eb.support_x)
            assert torch.equal(ea.query_x, eb.query_x)


def test_rotated_classes_are_the_class_turned_counter_clockwise(omniglot_folder):
    pool = omniglot_folder.pool("test")
    assert pool.class_names[:2] == ["Gurmukhi/character42/rot000", "Gurmukhi/character42/rot090"]
    upright = pool.images[pool.class_items[0]]
    torch.testing.assert_close(pool.images[pool.class_items[1]], torch.rot90(upright, 1, (-2, -1)))
    torch.testing.assert_close(pool.images[pool.class_items[2]], torch.rot90(upright, 2, (-2, -1)))


def test_a_list_may_name_a_class_for_all_its_rotations(omniglot_tree, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    for split, names in (
        ("train", ["Gurmukhi/character42"]),
        ("val", ["Gurmukhi/character43/rot090"]),
        ("test", ["Gurmukhi/character44/rot000", "Gurmukhi/character44/rot180"]),
    ):
        (lists / f"{split}.txt").write_text("\n".join(names) + "\n")
    ds = ImageFolder(
        str(omniglot_tree / "images"), str(tmp_path), split_dir=str(lists), **OMNIGLOT_OPTIONS
    )
    assert ds.pool("train").class_names == [
        f"Gurmukhi/character42/rot{a:03d}" for a in (0, 90, 180, 270)
    ]
    assert ds.pool("val").class_names == ["Gurmukhi/character43/rot090"]
    assert ds.pool("test").n_classes == 2


def test_rotated_names_without_rotations_are_named_with_the_fix(omniglot_tree, tmp_path):
    options = dict(OMNIGLOT_OPTIONS, rotations=[0])
    with pytest.raises(DataError, match=r"rot000 names a rotation .* set dataset.rotations"):
        ImageFolder(
            str(omniglot_tree / "images"),
            str(tmp_path),
            split_dir=str(omniglot_tree / "lists"),
            **options,
        )


def test_the_cache_is_reused_then_rebuilt_when_an_image_changes(
    omniglot_tree, omniglot_folder, tmp_path, monkeypatch
):
    images = tmp_path / "images"
    shutil.copytree(omniglot_tree / "images" / "Gurmukhi", images / "Gurmukhi")
    options = dict(OMNIGLOT_OPTIONS, split="fractions", fractions=[0.5, 0.25, 0.25])
    first = ImageFolder(str(images), str(tmp_path / "cache"), **options)
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(written) == 1  # one cache file, no temporary file left over
    assert written[0].name.startswith("images_") and written[0].name.endswith("_28px_L_inverted.pt")
    monkeypatch.setattr(folder_module, "decode", _must_not_decode)
    again = ImageFolder(str(images), str(tmp_path / "cache"), **options)
    assert torch.equal(again.pool("test").images, first.pool("test").images)
    characters = sorted((images / "Gurmukhi").iterdir())
    victim = sorted(characters[0].iterdir())[0]
    shutil.copy(sorted(characters[1].iterdir())[0], victim)
    with pytest.raises(AssertionError, match="the cache should have been used"):
        ImageFolder(str(images), str(tmp_path / "cache"), **options)


def _must_not_decode(*args, **kwargs):
    raise AssertionError("the cache should have been used")


def test_class_depth_too_small_is_named_with_the_fix(omniglot_tree, tmp_path):
    with pytest.raises(DataError, match=r"has subfolders with images .*Set dataset.class_depth=2"):
        ImageFolder(str(omniglot_tree / "images"), str(tmp_path), class_depth=1)


def test_written_split_given_back_as_lists_gives_the_same_pools(omniglot_folder, tmp_path):
    omniglot_folder.write_split(tmp_path / "split")
    test_list = (tmp_path / "split" / "test.txt").read_text().splitlines()
    assert test_list[0].startswith("# the test split: the classes listed in ")
    assert test_list[1:] == omniglot_folder.pool("test").class_names
    described = json.loads((tmp_path / "split" / "split.json").read_text())
    assert described["mode"] == "lists"
    assert set(described["splits"]["val"]["examples"].values()) == {20}
    again = ImageFolder(
        str(omniglot_folder.root),
        omniglot_folder.cache_dir,  # the same images: the fixture's cache is reused
        split_dir=str(tmp_path / "split"),
        **OMNIGLOT_OPTIONS,
    )
    for split in ("train", "val", "test"):
        assert again.pool(split).class_names == omniglot_folder.pool(split).class_names
        assert torch.equal(again.pool(split).images, omniglot_folder.pool(split).images)


# --- miniImageNet's val and test JPEGs as class folders ------------------------------------------


@pytest.fixture(scope="module")
def mini_tree(data_dir: Path, tmp_path_factory) -> Path:
    """miniImageNet's images as ``train/``, ``val/`` and ``test/`` folders of class folders
    (links to the shared JPEGs, the first 20 of each class): the split of
    ``dataset.split=val_test_reduced`` (11 val classes to train on, the other 5 for
    validation, the 20 test classes for testing)."""
    top = tmp_path_factory.mktemp("mini_tree")
    folder = data_dir / "miniimagenet"
    by_class: dict[str, list[str]] = {}
    for split in ("val", "test"):
        for line in (folder / f"{split}.csv").read_text().splitlines()[1:]:
            name, wnid = line.split(",")
            by_class.setdefault(wnid, []).append(name)
    val = sorted({line.split(",")[1] for line in (folder / "val.csv").read_text().split()[1:]})
    test = sorted({line.split(",")[1] for line in (folder / "test.csv").read_text().split()[1:]})
    for split, classes in (("train", val[:11]), ("val", val[11:]), ("test", test)):
        for wnid in classes:
            (top / split / wnid).mkdir(parents=True)
            for name in sorted(by_class[wnid])[:20]:
                (top / split / wnid / name).symlink_to(folder / "images" / name)
    return top


def test_minimagenet_folders_split_and_pixels(mini_tree, tmp_path):
    ds = ImageFolder(str(mini_tree), str(tmp_path), image_size=84)
    assert ds.mode == "folders"
    sizes = {s: ds.pool(s).n_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 11, "val": 5, "test": 20}
    assert ds.image_shape == (3, 84, 84)
    pool = ds.pool("test")
    wnid = pool.class_names[3]
    first = sorted((mini_tree / "test" / wnid).iterdir())[0]
    # The same decoding as dataset=miniimagenet (RGB, no resize at 84 px).
    expected = imagepool.to_rgb_tensor(first.read_bytes(), 84)
    assert torch.equal(pool.images[pool.class_items[3, 0]], expected)


def test_grayscale_and_resized_minimagenet(mini_tree, tmp_path):
    ds = ImageFolder(str(mini_tree), str(tmp_path), image_size=32, channels=1)
    pool = ds.pool("val")
    assert pool.images.shape[1:] == (1, 32, 32) and pool.images.dtype == torch.uint8
    first = sorted((mini_tree / "val" / pool.class_names[0]).iterdir())[0]
    from PIL import Image

    with Image.open(first) as img:
        gray = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    assert pool.images[pool.class_items[0, 0], 0].flatten().tolist() == list(gray.tobytes())


def test_mixed_modes_are_converted_to_the_channels_asked_for(mini_tree, omniglot_tree, tmp_path):
    """1-bit Omniglot PNGs and RGB miniImageNet JPEGs in one folder."""
    from PIL import Image

    root = tmp_path / "mixed"
    characters = sorted((omniglot_tree / "images" / "Gurmukhi").iterdir())
    photos = sorted((mini_tree / "test").iterdir())
    for name, source in (("drawing", characters[0]), ("photo", photos[0]), ("other", photos[1])):
        shutil.copytree(source, root / name, symlinks=True)
    for split, name in (("train", "drawing"), ("val", "photo"), ("test", "other")):
        (root / f"{split}.txt").write_text(f"{name}\n")
    drawing = sorted((root / "drawing").iterdir())[0]
    photo = sorted((root / "photo").iterdir())[0]
    with Image.open(drawing) as a, Image.open(photo) as b:
        assert (a.mode, b.mode) == ("1", "RGB")
        gray_photo = b.convert("L").resize((28, 28), Image.Resampling.LANCZOS).tobytes()
    rgb = ImageFolder(str(root), str(tmp_path / "c"), image_size=28, channels=3)
    drawn = rgb.pool("train").images[rgb.pool("train").class_items[0, 0]]
    assert drawn.shape == (3, 28, 28) and torch.equal(drawn[0], drawn[1])
    assert torch.equal(drawn[0], drawn[2]) and 0 < float(drawn.float().mean()) < 255
    gray = ImageFolder(str(root), str(tmp_path / "c"), image_size=28, channels=1)
    assert gray.pool("val").images[gray.pool("val").class_items[0, 0]].flatten().tolist() == list(
        gray_photo
    )


def test_fractions_split_is_seeded_disjoint_and_complete(mini_tree, tmp_path):
    root = mini_tree / "test"  # 20 classes, no train/val/test folders below: fractions
    a = ImageFolder(str(root), str(tmp_path), image_size=16, fractions=[0.5, 0.25, 0.25])
    b = ImageFolder(str(root), str(tmp_path), image_size=16, fractions=[0.5, 0.25, 0.25])
    c = ImageFolder(
        str(root), str(tmp_path), image_size=16, fractions=[0.5, 0.25, 0.25], split_seed=1
    )
    assert a.mode == "fractions"
    names = a.split_lists()
    assert [len(names[s]) for s in ("train", "val", "test")] == [10, 5, 5]
    assert sorted(sum(names.values(), [])) == sorted(p.name for p in root.iterdir())
    assert names == b.split_lists() and names != c.split_lists()


def test_small_class_is_named_or_dropped(mini_tree, tmp_path, caplog):
    root = tmp_path / "images"
    shutil.copytree(mini_tree, root, symlinks=True)
    small = sorted((root / "test").iterdir())[2]
    for extra in sorted(small.iterdir())[3:]:
        extra.unlink()
    ds = ImageFolder(str(root), str(tmp_path / "cache"), image_size=16)
    with pytest.raises(EpisodeError, match=rf"{small.name} \(3\).*drop_small_classes=true"):
        EpisodeSampler(ds.pool("test"), ways=5, shots=1, query_shots=5, seed=0)
    EpisodeSampler(ds.pool("test"), ways=5, shots=1, query_shots=2, seed=0)  # 3 are enough
    dropping = ImageFolder(
        str(root), str(tmp_path / "cache"), image_size=16, drop_small_classes=True
    )
    with caplog.at_level(logging.WARNING):
        sampler = EpisodeSampler(dropping.pool("test"), ways=5, shots=1, query_shots=5, seed=0)
    assert small.name in caplog.text
    classes = {int(c) for _ in range(50) for c in sampler.sample().classes}
    assert dropping.pool("test").class_names.index(small.name) not in classes


def test_too_few_classes_for_the_ways_names_the_split_and_its_count(mini_tree, tmp_path):
    ds = ImageFolder(str(mini_tree), str(tmp_path), image_size=16)
    with pytest.raises(
        EpisodeError, match=r"the val split \(the class folders in .*/val\) has only 5"
    ):
        EpisodeSampler(ds.pool("val"), ways=6, shots=1, query_shots=1, seed=0)


def test_unreadable_images_are_named_and_no_cache_is_left(mini_tree, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(mini_tree, root, symlinks=True)
    victim = sorted((root / "val").iterdir())[1] / "broken.jpg"
    good = sorted((root / "val").iterdir())[0]
    data = next(good.iterdir()).read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    (victim.parent / "notes.txt").write_text("not an image, left out")
    with pytest.raises(DataError, match=rf"1 of .* cannot be read.*\n{victim}: OSError"):
        ImageFolder(str(root), str(tmp_path / "cache"), image_size=16)
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_empty_and_missing_splits_are_named(mini_tree, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(mini_tree, root, symlinks=True)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    with pytest.raises(DataError, match=rf"{root / 'val'} holds no class folder.*empty"):
        ImageFolder(str(root), str(tmp_path / "cache"), split="folders")
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match=rf"split=folders needs {root / 'val'}"):
        ImageFolder(str(root), str(tmp_path / "cache"), split="folders")


def test_list_errors_name_the_list_and_the_classes(mini_tree, tmp_path):
    root = mini_tree / "test"
    classes = sorted(p.name for p in root.iterdir())
    lists = tmp_path / "lists"
    lists.mkdir()

    def write(train, val, test):
        for split, names in (("train", train), ("val", val), ("test", test)):
            (lists / f"{split}.txt").write_text("# a comment\n" + "".join(f"{n}\n" for n in names))

    def load():
        return ImageFolder(str(root), str(tmp_path / "c"), image_size=16, split_dir=str(lists))

    write(classes[:10], classes[10:15], ["n00000000"] + classes[15:])
    with pytest.raises(
        DataError, match=rf"classes listed in {lists / 'test.txt'} but not in .*: n00000000\."
    ):
        load()
    write(classes[:10], [], classes[15:])
    with pytest.raises(
        DataError, match=rf"{lists / 'val.txt'} names no class: the val split is empty"
    ):
        load()
    write(classes[:10], classes[9:15], classes[15:])
    with pytest.raises(
        DataError, match=rf"in both the train split .* and the val split .*: {classes[9]}\."
    ):
        load()
    (lists / "val.txt").unlink()
    with pytest.raises(DataError, match=r"split=lists needs .*val.txt, which does not exist"):
        load()


def test_image_above_the_class_folders_is_refused(mini_tree, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(mini_tree / "test", root, symlinks=True)
    shutil.copy(next(next(root.iterdir()).iterdir()), root / "stray.jpg")
    with pytest.raises(DataError, match=r"stray.jpg is an image above the class folders"):
        ImageFolder(str(root), str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(channels=2), "channels must be 1"),
        (dict(rotations=[0, 45]), "rotations"),
        (dict(split="random"), "unknown dataset.split"),
        (dict(fractions=[0.5, 0.5]), "three positive fractions"),
        (dict(fractions=[0.5, 0.3, 0.3]), "add up to"),
        (dict(split="fractions", split_dir="x"), "split_dir is read by split=lists only"),
    ],
)
def test_bad_options_are_refused_before_any_file_is_read(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ImageFolder(str(tmp_path / "not-there"), None, **options)


def test_metarun_data_lists_and_prepares_a_folder(mini_tree, tmp_path, capsys):
    from metarun.data_cli import main

    common = ["--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "list"]) == 0
    listed = capsys.readouterr().out
    assert "folder           yours" in listed and "(dataset.path=...)" in listed
    root = f"dataset.root={mini_tree}"
    assert main([*common, "prepare", "folder", root, "dataset.image_size=16"]) == 0
    prepared = capsys.readouterr().out
    assert re.search(r"^test +20 classes +400 images$", prepared, re.M), prepared
    assert list((tmp_path / "cache" / "folder").glob("*_16px_RGB.pt"))


# --- end to end through the real entry point ---------------------------------------------------


def test_protonet_learns_on_the_omniglot_tree(omniglot_tree, tmp_path):
    """ProtoNet with an MLP, 100 iterations on the 200 train classes of the fixture (50
    characters x 4 rotations), validated every 50 on 20 episodes, tested on 200 fixed 5-way
    1-shot episodes of the Vinyals test classes. Measured with this command (on the full
    extracted tree with the same lists) on a loaded 2-core machine: 31.85 ± 0.96% with no
    training (train.iterations=0), 51.89 ± 1.60% after 100 iterations. The threshold sits
    halfway."""
    run_dir = tmp_path / "run"
    done = metarun(
        "algo=protonet",
        "dataset=folder",
        f"dataset.root={omniglot_tree / 'images'}",
        f"dataset.split_dir={omniglot_tree / 'lists'}",
        "dataset.image_size=28",
        "dataset.channels=1",
        "dataset.invert=true",
        "dataset.class_depth=2",
        "dataset.rotations=[0,90,180,270]",
        "model=mlp",
        "hardware=cpu",
        "hardware.num_threads=1",
        "train.iterations=100",
        "eval.val_every=50",
        "eval.val_episodes=20",
        "eval.test_episodes=200",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["dataset"] == "ImageFolder" and protocol["test_classes"] == 1692
    assert protocol["split_from"]["test"].endswith(
        f"listed in {omniglot_tree / 'lists' / 'test.txt'})"
    )
    assert protocol["eval_episode"] == {
        "ways": 5,
        "shots": 1,
        "query_shots": 15,
        "episodes": "standard",
    }
    assert results["test"]["episodes"] == 200
    assert results["test"]["acc"] > 0.42, results["test"]
    written = (run_dir / "split" / "test.txt").read_text().splitlines()[1:]
    assert written == (omniglot_tree / "lists" / "test.txt").read_text().split()


def test_maml_runs_on_the_minimagenet_folders(mini_tree, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(
        "algo=maml",
        "dataset=folder",
        f"dataset.root={mini_tree}",
        "dataset.image_size=32",
        "model.hidden=8",
        "hardware=cpu",
        "train.iterations=4",
        "train.meta_batch_size=2",
        "eval.val_every=2",
        "eval.val_episodes=4",
        "eval.test_episodes=6",
        "eval.query_shots=5",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocol"]["algorithm"] == "MAML" and results["protocol"]["image_size"] == 32
    assert results["protocol"]["test_classes"] == 20
    assert 0 <= results["test"]["acc"] <= 1 and results["test"]["episodes"] == 6
    split = json.loads((run_dir / "split" / "split.json").read_text())
    assert split["mode"] == "folders" and len(split["splits"]["train"]["examples"]) == 11
