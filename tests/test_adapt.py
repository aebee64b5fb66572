"""``metarun adapt`` (metarun/adapt.py, metarun/data/taskfiles.py) and ``Trained.predict``.

On real data: a ProtoNet and a MAML run trained briefly on Omniglot's background set
(``dataset.split=lake``), then ``metarun adapt`` on 20 evaluation characters written as
class folders of the real PNGs, exactly the characters and drawings of the first episode
that ``metarun test=`` draws: the two accuracies must agree, and the class scores must
equal those of the learner on the dataset's own tensors of that episode. The same for a
sinusoid regression run (MSE), every classification algorithm through tensor files, the
training statistics of ``dataset=tensors`` with ``standardize``, the output files, and the
refusals, each raised before anything is computed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import metarun
from metarun import checkpoint, trained
from metarun.adapt import adapt, main, wilson95
from metarun.config import register_configs
from metarun.data.episodes import Episode
from metarun.data.files import DataError
from metarun.data.omniglot import Omniglot
from metarun.evaluation import evaluate, fixed_episodes
from metarun.hardware import Hardware
from tests.conftest import CONFIGS, tiny_overrides
from tests.test_cli import METARUN

EPISODE = ("eval.ways=20", "eval.shots=1", "eval.query_shots=2")  # 20 characters, 40 queries
SINUSOID = (
    "experiment=maml_sinusoid",
    "train.meta_batch_size=2",
    "train.iterations=4",
    "eval.query_shots=20",
    "eval.report_steps=[1]",
)


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [METARUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def compose_cfg(data_dir: Path, cache_dir: Path, *overrides: str):
    """The real config with conftest's tiny overrides (a narrow conv4, a few iterations)."""
    register_configs()
    base = tiny_overrides(data_dir, cache_dir)
    if any(o.startswith(("model=", "experiment=maml_sinusoid")) for o in overrides):
        base.remove("model.hidden=8")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


def train(data_dir: Path, cache_dir: Path, folder: Path, *overrides: str) -> Path:
    threads = torch.get_num_threads()
    try:
        metarun.run(compose_cfg(data_dir, cache_dir, "hardware.num_threads=1", *overrides), folder)
    finally:
        torch.set_num_threads(threads)
    return folder


def untrained(cfg, folder: Path, input_shape=(1, 28, 28), task="classification") -> Path:
    """A run folder whose best.pt holds a freshly initialised learner of ``cfg``."""
    from metarun.tasks import TASK_KINDS

    torch.manual_seed(0)
    algo = trained.build_learner(cfg, Hardware("cpu"), input_shape, TASK_KINDS[task])
    checkpoint.save(
        folder / "checkpoints" / "best.pt",
        recipe="meta_learning",
        iteration=0,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        input_shape=input_shape,
        task=task,
        algo=algo.state_dict(),
    )
    return folder


@pytest.fixture(scope="module")
def protonet_run(data_dir, cache_dir, tmp_path_factory) -> Path:
    """ProtoNet, 5-way training, tested 20-way 1-shot; Omniglot background set only."""
    folder = tmp_path_factory.mktemp("protonet")
    return train(data_dir, cache_dir, folder, "algo=protonet", "dataset.split=lake", *EPISODE)


@pytest.fixture(scope="module")
def maml_run(data_dir, cache_dir, tmp_path_factory) -> Path:
    """MAML with a 20-way head (its ways are fixed), trained and tested 20-way 1-shot."""
    folder = tmp_path_factory.mktemp("maml")
    overrides = ("algo=maml", "dataset.split=lake", "train.ways=20", "train.iterations=2")
    return train(data_dir, cache_dir, folder, *overrides, *EPISODE)


@pytest.fixture(scope="module")
def lake_test_episode(data_dir, cache_dir, tmp_path_factory) -> tuple[Episode, Path]:
    """The first test episode of the lake split for EPISODE and episode seed 0 (what
    ``metarun test=RUN eval.test_episodes=1`` tests), and a folder holding it as files:
    ``support/`` and ``query/``, one folder per character named ``<label>_<alphabet>_
    <character>`` (so sorted order is label order), holding the real PNGs of the drawings
    the episode took, found by their pixels among the character's 20 drawings."""
    omniglot = Omniglot(str(data_dir), str(cache_dir), split="lake")
    pool = omniglot.pool("test")
    episode = fixed_episodes(pool, ways=20, shots=1, query_shots=2, seed=0).sample()
    top = tmp_path_factory.mktemp("lake_episode")
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".png"))
        for label, cls in enumerate(episode.classes.tolist()):
            character = pool.class_names[cls]  # images_evaluation/<alphabet>/<character>
            drawings = [m for m in members if m.startswith(character + "/")]
            assert len(drawings) == 20
            images = pool.images[pool.class_items[cls]]
            name = f"{label:02d}_{character.split('/', 1)[1].replace('/', '_')}"
            for role, x, per_class in (
                ("support", episode.support_x, 1),
                ("query", episode.query_x, 2),
            ):
                folder = top / role / name
                folder.mkdir(parents=True)
                for k, image in enumerate(x[label * per_class : (label + 1) * per_class]):
                    match = [j for j in range(20) if torch.equal(images[j], image)]
                    assert len(match) == 1, f"{character}: drawing not found once"
                    member = drawings[match[0]]
                    # k_ keeps the episode's order within a class (sorted by file name)
                    (folder / f"{k}_{member.rsplit('/', 1)[1]}").write_bytes(archive.read(member))
    return episode, top


# --- 1. the same episode: metarun adapt against metarun test= -----------------------------


@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_adapt_on_an_episode_as_folders_matches_metarun_test_on_that_episode(
    algo, request, lake_test_episode, data_dir, cache_dir, tmp_path
):
    run = request.getfixturevalue(f"{algo}_run")
    episode, task = lake_test_episode
    data = [f"data_dir={data_dir}", f"cache_dir={cache_dir}"]
    tested = command(
        f"test={run}", "eval.test_episodes=1", *data, f"hydra.run.dir={tmp_path / 't'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stderr
    test_acc = json.loads((tmp_path / "t" / "test_scores.json").read_text())["episodes"][0]

    out = tmp_path / "pred"
    done = command(
        "adapt", str(run), f"support={task / 'support'}", f"query={task / 'query'}",
        f"out={out}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    accuracy = result["accuracy"]
    assert accuracy["queries"] == 40 and len(result["support"]["classes"]) == 20
    assert accuracy["correct"] == round(test_acc * 40)
    assert accuracy["acc"] == pytest.approx(test_acc, abs=1e-6)
    assert f"accuracy {100 * accuracy['acc']:.2f}% ({accuracy['correct']}/40" in done.stdout

    # The class scores are the learner's on the dataset's own tensors of that episode: the
    # PNGs were decoded, converted, resized and inverted exactly as the run's loader did.
    model = metarun.load(run, device="cpu")
    expected = model.predict(episode.support_x, episode.support_y, episode.query_x)
    scores = torch.tensor([row["scores"] for row in result["predictions"]])
    # MAML's logits come after gradient steps on the support set; the subprocess may sum with
    # another thread count than this process (CI measured 1.1e-5 apart), and the steps carry
    # that rounding on. A wrong decode or resize moves the scores by far more.
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if algo == "protonet" else {"rtol": 1e-3, "atol": 1e-4}
    torch.testing.assert_close(scores, expected, **tolerance)
    truth = [int(row["true_class"][:2]) for row in result["predictions"]]
    assert truth == episode.query_y.tolist()


# --- 2. what is written -------------------------------------------------------------------


def test_the_csv_and_json_hold_each_querys_prediction_class_name_and_scores(
    protonet_run, lake_test_episode, tmp_path
):
    _, task = lake_test_episode
    result = adapt(protonet_run, task / "support", task / "query", tmp_path / "out.csv", "cpu")
    assert result["written"] == [str(tmp_path / "out.csv"), str(tmp_path / "out.json")]
    assert json.loads((tmp_path / "out.json").read_text()) | {"written": None} == result | {
        "written": None
    }
    classes = result["support"]["classes"]
    assert classes == sorted(p.name for p in (task / "support").iterdir())
    assert result["support"]["examples"] == dict.fromkeys(classes, 1)
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 == len(result["predictions"])
    header = ["item", "predicted_label", "predicted_class", "true_class", "correct"]
    assert list(rows[0])[:5] == header and list(rows[0])[5:] == [f"score_{c}" for c in classes]
    for row, pred in zip(rows, result["predictions"], strict=True):
        scores = [float(row[f"score_{c}"]) for c in classes]
        assert scores == pred["scores"]
        label = int(row["predicted_label"])
        assert label == max(range(20), key=scores.__getitem__) == pred["label"]
        assert row["predicted_class"] == classes[label] == pred["class"]
        assert row["item"] == pred["item"] and (task / "query" / row["item"]).is_file()
        assert row["true_class"] == row["item"].split("/")[0]
        assert int(row["correct"]) == (row["true_class"] == row["predicted_class"])
    correct = sum(int(r["correct"]) for r in rows)
    assert result["accuracy"]["correct"] == correct
    assert result["accuracy"]["ci95"] == list(wilson95(correct, 40))

    # Unlabelled queries: a folder of images. Predictions only, and the same ones.
    flat = tmp_path / "unlabelled"
    flat.mkdir()
    for path in sorted((task / "query").rglob("*.png")):
        (flat / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    plain = adapt(protonet_run, task / "support", flat, tmp_path / "plain", "cpu")
    assert plain["accuracy"] is None and not plain["query"]["labelled"]
    assert [p["scores"] for p in plain["predictions"]] == [
        p["scores"] for p in result["predictions"]
    ]  # the same order: class folder, then file name
    with open(tmp_path / "plain.csv", newline="") as f:
        assert next(csv.reader(f))[:4] == ["item", "predicted_label", "predicted_class"] + [
            f"score_{classes[0]}"
        ]
    # Nothing is overwritten.
    before = (tmp_path / "out.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"out.csv and .*out.json exist already"):
        adapt(protonet_run, task / "support", task / "query", tmp_path / "out", "cpu")
    assert (tmp_path / "out.json").read_bytes() == before


def test_wilson_interval_against_a_hand_computed_value():
    # 17 of 20: p = 0.85, centre (0.85 + 1.96^2/40) / (1 + 1.96^2/20), from the formula.
    low, high = wilson95(17, 20)
    assert low == pytest.approx(0.6396, abs=1e-4) and high == pytest.approx(0.9476, abs=1e-4)
    assert wilson95(20, 20)[1] == 1.0 and wilson95(20, 20)[0] < 0.9


# --- 3. refusals, before anything is computed ---------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    """Makes any prediction fail the test: a refusal must come before it."""

    def fail(*args, **kwargs):
        raise AssertionError("predict was called")

    monkeypatch.setattr(trained.Trained, "predict", fail)


def npz(path: Path, x, y=None) -> Path:
    np.savez(path, **({"x": x} | ({} if y is None else {"y": y})))
    return path


def test_refusals_name_the_problem_and_the_fix(
    protonet_run, maml_run, lake_test_episode, make_cfg, tmp_path, no_compute
):
    _, task = lake_test_episode
    support, query = task / "support", task / "query"
    out = tmp_path / "never"

    def refused(run, sup, qry, match, error=(DataError, ValueError)):
        with pytest.raises(error, match=match):
            adapt(run, sup, qry, out, "cpu")
        assert not list(tmp_path.glob("never*"))

    rgb = np.zeros((4, 3, 28, 28), dtype=np.uint8)
    refused(protonet_run, npz(tmp_path / "rgb.npz", rgb, [0, 0, 1, 1]), query,
            r"shape \(4, 3, 28, 28\), but the run was trained on inputs of shape "
            r"\(n, 1, 28, 28\): 1 channel of 28x28 pixels \(these have 3 channels\)")  # fmt: skip
    small = np.zeros((4, 1, 32, 32), dtype=np.uint8)
    refused(protonet_run, support, npz(tmp_path / "small.npz", small),
            r"query set .*small.npz holds examples of shape \(4, 1, 32, 32\)")  # fmt: skip

    empty = tmp_path / "empty_class"
    for path in support.iterdir():
        (empty / path.name).mkdir(parents=True)
        if path.name[:2] > "05":
            continue
        for f in path.iterdir():
            (empty / path.name / f.name).write_bytes(f.read_bytes())
    refused(protonet_run, empty, query, r"class 06_\S+ has no examples \(and 13 more classes\)")

    five = tmp_path / "five"
    for path in sorted(support.iterdir())[:5]:
        (five / path.name).mkdir(parents=True)
        for f in path.iterdir():
            (five / path.name / f.name).write_bytes(f.read_bytes())
    refused(protonet_run, five, query,
            r"classes that are not in the support set .*: 05_\S+, 06_")  # fmt: skip
    refused(maml_run, five, query,
            r"MAML was trained with a 20-way output \(algo.ways=20\), so it takes support "
            r"sets of exactly 20 classes, and this one has 5 ")  # fmt: skip

    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(query.rglob("*.png"))[:3]:
        (flat / f.name).write_bytes(f.read_bytes())
    refused(protonet_run, flat, query, r"support set .*flat has no labels: give one folder")
    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    (mixed / "x.png").write_bytes(next(flat.iterdir()).read_bytes())
    refused(protonet_run, support, mixed, r"holds both images \(x.png, ...\) and folders")
    refused(protonet_run, tmp_path / "nowhere", query, r"support=.*nowhere: no such folder")
    with pytest.raises(ValueError, match=r"steps=2: ProtoNet does not adapt by gradient steps"):
        adapt(protonet_run, support, query, out, "cpu", steps=2)

    # Memory methods: MANN's output and SNAIL's sequence are sized by algo.ways/algo.shots.
    mann = untrained(make_cfg("algo=mann"), tmp_path / "mann")
    refused(mann, support, query, r"MANN was trained with a 5-way output .* has 20 ")
    snail = untrained(make_cfg("algo=snail"), tmp_path / "snail")
    two_shots = tmp_path / "two_shots"
    for path in sorted(query.iterdir())[:5]:
        (two_shots / path.name).mkdir(parents=True)
        for f in path.iterdir():
            (two_shots / path.name / f.name).write_bytes(f.read_bytes())
    refused(snail, two_shots, two_shots,
            r"SNAIL's sequences are sized for 1 examples per class \(algo.shots=1\), so every "
            r"support class needs exactly 1; 5 do not")  # fmt: skip


def test_the_command_line_refuses_with_exit_status_2(protonet_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([str(protonet_run), "suport=a", "query=b"])
    assert stopped.value.code == 2
    assert "'suport=a' is not a setting. Did you mean support=?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(protonet_run), "query=b"])
    assert "give support=DIR_OR_FILE" in capsys.readouterr().err
    assert main([str(tmp_path / "none"), "support=a", "query=b"]) == 2
    assert "does not exist: give a run folder" in capsys.readouterr().err
    listed = command("--help", cwd=tmp_path)
    assert "metarun adapt RUN support=DIR query=DIR [out=FILE]" in listed.stdout
    helped = command("adapt", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "usage: metarun adapt" in helped.stdout
    assert all(f"  {key}=..." in helped.stdout for key in ("support", "query", "out", "steps"))
    refused = command("adapt", str(protonet_run), "support=nowhere", "query=q", cwd=tmp_path)
    assert refused.returncode == 2 and "metarun adapt: error: support=nowhere" in refused.stderr


# --- 4. every classification algorithm, and the preparation of tensor files ---------------

ALGORITHMS = [
    "maml", "fomaml", "metasgd", "anil", "reptile", "mamlpp", "lstm_meta", "learned_opt",
    "protonet", "matching", "relation", "siamese", "mann", "snail", "leo",
]  # fmt: skip


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_classification_algorithm_adapts_to_tensor_files_as_in_its_test_episodes(
    algo, omniglot, make_cfg, tmp_path
):
    """A 5-way 1-shot test episode of the real Omniglot written as .npz (uint8 images, class
    labels) and .pt files: the accuracy is the one :func:`evaluate` gives on that episode."""
    cfg = make_cfg(f"algo={algo}")
    run = untrained(cfg, tmp_path / "run")
    episode = fixed_episodes(omniglot.pool("test"), 5, 1, 2, seed=3).sample()
    names = np.array([f"c{label}" for label in range(5)])
    npz(tmp_path / "s.npz", episode.support_x.numpy(), names[episode.support_y.numpy()])
    query_names = [f"c{label}" for label in episode.query_y.tolist()]
    torch.save({"x": episode.query_x, "y": query_names}, tmp_path / "q.pt")
    result = adapt(run, tmp_path / "s.npz", tmp_path / "q.pt", None, "cpu")
    assert result["support"]["classes"] == [f"c{i}" for i in range(5)]
    assert [p["true_class"] for p in result["predictions"]] == query_names
    model = metarun.load(run, device="cpu")

    class One:
        def sample(self) -> Episode:
            return episode

    expected = evaluate(model.algo, One(), 1, model.hardware).mean
    assert result["accuracy"]["acc"] == pytest.approx(expected, abs=1e-6)
    assert result["algorithm"] == type(model.algo).__name__


def test_standardised_tensor_runs_prepare_raw_inputs_with_their_training_statistics(
    data_dir, make_cfg, tmp_path
):
    """A ``dataset=tensors`` run with ``standardize: true`` on flattened MNIST digits (float
    pixels): raw rows given to ``metarun adapt`` score as the standardised rows of the
    run's own pool do, and not as the raw rows would."""
    from metarun.data.mnist import MNIST
    from metarun.data.tensors import TensorFile

    images, labels = MNIST(str(data_dir), download=False).split("train")
    keep = torch.cat([torch.nonzero(labels == d).flatten()[:12] for d in range(10)])
    x = images[keep].flatten(1).float().numpy()
    y = labels[keep].numpy()
    npz(tmp_path / "digits.npz", x, y)
    overrides = ("dataset=tensors", f"dataset.path={tmp_path / 'digits.npz'}", "model=mlp")
    cfg = make_cfg(*overrides, "dataset.standardize=true", "algo=protonet")
    run = untrained(cfg, tmp_path / "run", input_shape=(784,))
    data = TensorFile(str(tmp_path / "digits.npz"), standardize=True)
    rows = {d: np.nonzero(y == d)[0] for d in (3, 7)}
    s_rows = np.concatenate([rows[3][:2], rows[7][:2]])
    q_rows = np.concatenate([rows[3][2:5], rows[7][2:5]])
    npz(tmp_path / "s.npz", x[s_rows], y[s_rows])
    npz(tmp_path / "q.npz", x[q_rows])
    result = adapt(run, tmp_path / "s.npz", tmp_path / "q.npz", None, "cpu")
    assert "standardised" in result["input"]["arrays"]
    model = metarun.load(run, device="cpu")
    support_y = torch.tensor([0, 0, 1, 1])
    expected = model.predict(data.examples[s_rows], support_y, data.examples[q_rows])
    scores = torch.tensor([p["scores"] for p in result["predictions"]])
    torch.testing.assert_close(scores, expected)
    raw = model.predict(torch.from_numpy(x[s_rows]), support_y, torch.from_numpy(x[q_rows]))
    assert not torch.allclose(scores, raw)

    (tmp_path / "digits.npz").unlink()  # the statistics cannot be read again
    with pytest.raises(DataError, match=r"standardised its inputs .* read from dataset.path="):
        adapt(run, tmp_path / "s.npz", tmp_path / "q.npz", None, "cpu")


# --- 5. regression ------------------------------------------------------------------------


def test_a_sinusoid_run_regresses_csv_and_npz_files_as_metarun_test_does(
    data_dir, cache_dir, tmp_path
):
    """The first test episode of a sinusoid MAML run as files (support .csv with columns x
    and y, query .npz): the MSE equals the one ``metarun test=`` records for that episode,
    also after 1 adaptation step (``steps=1``)."""
    from metarun.data.sinusoid import Sinusoid

    run = train(data_dir, cache_dir, tmp_path / "run", *SINUSOID)
    cfg = compose_cfg(data_dir, cache_dir, *SINUSOID)
    e = cfg.eval
    pool = Sinusoid().pool("test")
    episode = fixed_episodes(pool, e.ways, e.shots, e.query_shots, e.episode_seed).sample()
    with open(tmp_path / "support.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y"])
        pairs = torch.cat([episode.support_x, episode.support_y], dim=1).tolist()
        writer.writerows([repr(xv), repr(yv)] for xv, yv in pairs)
    npz(tmp_path / "query.npz", episode.query_x[:, 0].numpy(), episode.query_y.numpy())
    tested = command(
        f"test={run}", "eval.test_episodes=1", f"hydra.run.dir={tmp_path / 't'}", cwd=tmp_path
    )
    assert tested.returncode == 0, tested.stderr
    scores = json.loads((tmp_path / "t" / "test_scores.json").read_text())
    for steps, expected in ((None, scores["episodes"][0]), (1, scores["after_steps"]["1"][0])):
        out = tmp_path / f"pred{steps}"
        args = ["adapt", str(run), "support=support.csv", "query=query.npz", f"out={out}"]
        done = command(*args, *([f"steps={steps}"] if steps else []), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        result = json.loads(out.with_suffix(".json").read_text())
        assert result["task"] == "regression" and result["mse"]["queries"] == 20
        assert result["mse"]["mse"] == pytest.approx(expected, rel=1e-5)
        with open(out.with_suffix(".csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["item", "prediction", "target", "squared_error"]
        targets = [float(r["target"]) for r in rows]
        assert targets == pytest.approx(episode.query_y[:, 0].tolist())
    # Unlabelled queries (x only) get predictions; a folder is refused for regression.
    npz(tmp_path / "x_only.npz", episode.query_x[:, 0].numpy())
    plain = adapt(run, tmp_path / "support.csv", tmp_path / "x_only.npz", None, "cpu")
    assert plain["mse"] is None and len(plain["predictions"]) == 20
    with pytest.raises(DataError, match=r"is a folder, but the run is a regression run"):
        adapt(run, tmp_path, tmp_path / "x_only.npz", None, "cpu")
