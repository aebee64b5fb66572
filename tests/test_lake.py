"""metarun-lake (metarun.lake): Lake et al. (2015)'s 20 one-shot runs, built here in the
official format with PIL (the real all_runs.zip is not needed): parsing, scoring against a
hand-made case with a known error rate, the refusal of models trained beyond the
background set, the missing-file error, and the preprocessing of the runner's loader."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from metarun.data.files import DataError
from metarun.lake import ProtocolError, evaluate_lake, main, read_runs

PLANTED = {1: [0, 1, 2], 5: [7]}  # run number -> queries showing another class's image


def drawing(rng: random.Random) -> Image.Image:
    """A 105x105 'character': a few black strokes on white, like Omniglot's PNGs."""
    img = Image.new("L", (105, 105), 255)
    pen = ImageDraw.Draw(img)
    for _ in range(4):
        pen.line([(rng.randrange(10, 95), rng.randrange(10, 95)) for _ in range(3)], 0, 4)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_runs(folder: Path, seed: int = 0) -> None:
    """20 runs in the official layout. Each query is an exact copy of one training image,
    and its line in class_labels.txt names that class (a shuffled assignment), except the
    queries of ``PLANTED``, whose image is another class's: an exact matcher makes
    exactly those errors."""
    rng = random.Random(seed)
    for r in range(1, 21):
        run = folder / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        classes = [drawing(rng) for _ in range(20)]
        for c, img in enumerate(classes):
            (run / "training" / f"class{c + 1:02d}.png").write_bytes(png(img))
        owner = list(range(20))
        rng.shuffle(owner)  # query k belongs to class owner[k]
        lines = []
        for k, c in enumerate(owner):
            shown = (c + 1) % 20 if k in PLANTED.get(r, []) else c
            (run / "test" / f"item{k + 1:02d}.png").write_bytes(png(classes[shown]))
            test, train = f"test/item{k + 1:02d}.png", f"training/class{c + 1:02d}.png"
            lines.append(f"run{r:02d}/{test} run{r:02d}/{train}")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A data folder with omniglot/all_runs/ (extracted form)."""
    root = tmp_path_factory.mktemp("lake-data")
    build_runs(root / "omniglot" / "all_runs")
    return root


def write_checkpoint(make_cfg, folder: Path, *overrides: str) -> Path:
    """A run folder holding checkpoints/best.pt with the composed config and the state of a
    freshly initialised algorithm (what metarun-lake reads from a checkpoint)."""
    cfg = make_cfg(*overrides)
    torch.manual_seed(0)
    backbone = instantiate(cfg.model)(input_shape=(1, 28, 28))
    algo = instantiate(cfg.algo)(backbone=backbone)
    path = folder / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    torch.save({"algo": algo.state_dict(), "config": config, "iteration": 0}, path)
    return folder


def test_parses_the_official_layout_from_a_folder_and_a_zip(data, tmp_path):
    runs = read_runs(data / "omniglot" / "all_runs", image_size=28)
    assert [r.name for r in runs] == [f"run{r:02d}" for r in range(1, 21)]
    first = runs[0]
    assert first.support.shape == first.query.shape == (20, 1, 28, 28)
    assert first.support.dtype == torch.uint8
    assert first.classes[0] == "run01/training/class01.png"
    labels = (data / "omniglot" / "all_runs" / "run01" / "class_labels.txt").read_text()
    item01_class = labels.splitlines()[0].split()[1]  # e.g. run01/training/class07.png
    assert first.classes[int(first.labels[0])] == item01_class
    assert sorted(first.labels.tolist()) == list(range(20))  # one query per class
    # The zip, with its runs under a top folder, reads the same.
    archive = tmp_path / "all_runs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((data / "omniglot" / "all_runs").rglob("*")):
            if f.is_file():
                z.write(f, "all_runs/" + f.relative_to(data / "omniglot" / "all_runs").as_posix())
    zipped = read_runs(archive, image_size=28)
    for a, b in zip(runs, zipped, strict=True):
        assert torch.equal(a.support, b.support) and torch.equal(a.labels, b.labels)


def test_broken_runs_are_a_clear_error(tmp_path):
    broken = tmp_path / "all_runs"
    build_runs(broken, seed=1)
    labels = broken / "run03" / "class_labels.txt"
    good = labels.read_text()
    labels.write_text("\n".join(good.splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match=r"run03/class_labels.txt labels 19 of the 20"):
        read_runs(broken, image_size=28)
    labels.write_text(good)
    (broken / "run07" / "test" / "item04.png").unlink()
    with pytest.raises(DataError, match="run07 has 20 training images and 19 test images"):
        read_runs(broken, image_size=28)


def test_scores_a_hand_made_case_with_a_known_error_rate(make_cfg, data, tmp_path):
    """A ProtoNet in running BatchNorm mode embeds an exact copy of a training image onto
    its prototype, so it errs on exactly the planted queries: 3/20 in run01, 1/20 in run05,
    4/400 overall."""
    run_dir = write_checkpoint(make_cfg, tmp_path / "run", "algo=protonet", "dataset.split=lake")
    result = evaluate_lake(run_dir, data_dir=data, allow_download=False, device="cpu")
    expected = [len(PLANTED.get(r, [])) for r in range(1, 21)]
    assert [r["errors"] for r in result["runs"]] == expected
    assert result["runs"][0]["error_pct"] == 15.0 and result["runs"][4]["error_pct"] == 5.0
    assert result["overall"] == {"errors": 4, "trials": 400, "error_pct": 1.0}
    assert not result["forced"] and result["algorithm"] == "ProtoNet"
    assert result["test_views"] == 0  # the run's eval.test_views
    assert json.loads((run_dir / "lake.json").read_text()) == result
    assert result["references_error_pct"]["deep convnet"] == 13.5


def test_refuses_a_model_trained_on_the_evaluation_alphabets_unless_forced(
    make_cfg, data, tmp_path, capsys
):
    run_dir = write_checkpoint(make_cfg, tmp_path / "run", "algo=protonet")  # vinyals split
    with pytest.raises(ProtocolError, match=r"dataset.split=vinyals.*Angelic.*--force"):
        evaluate_lake(run_dir, data_dir=data, allow_download=False, device="cpu")
    assert not (run_dir / "lake.json").exists()
    with pytest.raises(SystemExit) as stopped:
        main([str(run_dir), "--data-dir", str(data), "--no-download"])
    assert stopped.value.code == 2
    assert "train with dataset.split=lake" in capsys.readouterr().err
    forced = evaluate_lake(run_dir, data_dir=data, force=True, allow_download=False)
    assert forced["forced"] and forced["overall"]["trials"] == 400


def test_missing_runs_are_a_clear_error_naming_the_folder_and_files(make_cfg, tmp_path, capsys):
    run_dir = write_checkpoint(make_cfg, tmp_path / "run", "algo=protonet", "dataset.split=lake")
    empty = tmp_path / "empty"
    with pytest.raises(DataError, match=r"missing from .*empty/omniglot: expected all_runs.zip"):
        evaluate_lake(run_dir, data_dir=empty, allow_download=False)
    with pytest.raises(SystemExit):
        main([str(run_dir / "checkpoints" / "best.pt"), "--data-dir", str(empty), "--no-download"])
    assert "all_runs/ with run01/ ... run20/" in capsys.readouterr().err


def test_images_are_prepared_like_the_runners_omniglot(omniglot, data_dir, tmp_path):
    """A real Omniglot drawing placed in a run comes out exactly as the runner's loader
    caches it (same resize, strokes bright on a dark background)."""
    runs = tmp_path / "all_runs"
    build_runs(runs)
    member = "images_evaluation/Angelic/character01/"
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as z:
        name = sorted(n for n in z.namelist() if n.startswith(member) and n.endswith(".png"))[0]
        (runs / "run01" / "training" / "class01.png").write_bytes(z.read(name))
    ours = read_runs(runs, image_size=28)[0].support[0]
    index = omniglot.characters.index(member.rstrip("/"))
    assert torch.equal(ours, omniglot.images[index, 0])
    assert ours.float().mean() < 64  # mostly dark background, bright strokes


def test_console_script_evaluates_a_trained_leo_run(make_cfg, data, tmp_path, one_thread):
    """End to end: a LEO run trained 5-way on the lake split, evaluated 20-way by
    ``python -m metarun.lake`` (the console script's module) through its own adapt path."""
    from metarun import run

    cfg = make_cfg("algo=leo", "dataset.split=lake", one_thread, "algo.adaptation_steps=1")
    run(cfg, tmp_path / "leo")
    done = subprocess.run(
        [sys.executable, "-m", "metarun.lake", str(tmp_path / "leo"), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "overall:" in done.stdout and "deep convnet 13.5%" in done.stdout
    result = json.loads((tmp_path / "leo" / "lake.json").read_text())
    assert result["algorithm"] == "LEO" and result["overall"]["trials"] == 400
    assert 0 <= result["overall"]["errors"] <= 400
