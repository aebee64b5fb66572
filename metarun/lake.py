"""``metarun-lake``: the 20 within-alphabet 20-way one-shot runs of Lake et al. (2015).

Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic
program induction", Science 350(6266), 2015. Each of the 20 runs draws 20 characters from
one alphabet of Omniglot's evaluation set: one drawing of each is the one-shot training
example (``runNN/training/classNN.png``) and another drawing of each is a query
(``runNN/test/itemNN.png``); ``runNN/class_labels.txt`` pairs every query with its class,
one ``runNN/test/itemNN.png runNN/training/classNN.png`` line per query. A run's error is
the fraction of its 20 queries classified wrongly; the benchmark reports it per run and
over all 400 trials.

The files are ``all_runs.zip`` from the official repository
(https://github.com/brendenlake/omniglot, ``python/one-shot-classification``), read from
``<data_dir>/omniglot/all_runs.zip`` or the extracted ``<data_dir>/omniglot/all_runs/``.
The repository publishes no checksum for it, so a downloaded copy is checked by its
structure (20 runs of 20 training images, 20 queries and 20 labels) instead.

A model is evaluated through its algorithm's own ``adapt`` path
(:func:`metarun.evaluation.evaluate`), one 20-way 1-shot episode of 20 queries per run,
with images prepared as the runner's Omniglot loader prepares them
(:func:`metarun.data.omniglot.decode_image`). The protocol asks for a model trained on the
background set only, so a run trained with any Omniglot split other than ``lake`` or
``lake_proxy`` (the same training characters) is refused unless ``--force`` is given.

Usage::

    metarun-lake outputs/runs/2026-11-22/10-00-00 [--data-dir D] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OFFICIAL_URL = (
    "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
)
RUNS = 20
# Omniglot splits that train on the background set only (the same characters for both).
BACKGROUND_ONLY_SPLITS = ("lake", "lake_proxy")
WAYS = 20  # training images (classes) per run, and queries per run
REFERENCES = {  # error rates (%) reported by Lake et al. (2015) on these 20 runs
    "humans": 4.5,
    "Bayesian Program Learning": 3.3,
    "deep Siamese convnet": 8.0,
    "deep convnet": 13.5,
}
EVALUATION_ALPHABETS = (  # Omniglot's images_evaluation: the alphabets of the 20 runs
    "Angelic",
    "Atemayar_Qelisayer",
    "Atlantean",
    "Aurek-Besh",
    "Avesta",
    "Ge_ez",
    "Glagolitic",
    "Gurmukhi",
    "Kannada",
    "Keble",
    "Malayalam",
    "Manipuri",
    "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)",
    "Oriya",
    "Sylheti",
    "Syriac_(Serto)",
    "Tengwar",
    "Tibetan",
    "ULOG",
)
_MEMBER = re.compile(
    r"(?:^|/)(run(\d\d)/(?:training/class\d\d\.png|test/item\d\d\.png|class_labels\.txt))$"
)


class ProtocolError(ValueError):
    """The model cannot be evaluated on Lake's runs under the benchmark's protocol."""


@dataclass
class LakeRun:
    """One run as tensors.

    Attributes:
        name: ``runNN``.
        support: ``(20, 1, s, s)`` uint8, the training images in file-name order; label
            ``i`` is the ``i``-th training file.
        query: ``(20, 1, s, s)`` uint8, the test images in file-name order.
        labels: ``(20,)`` the label of each query's class.
        classes: the training file names, in label order.
    """

    name: str
    support: Any
    query: Any
    labels: Any
    classes: list[str]


def locate(data_dir: Path, allow_download: bool) -> Path:
    """``<data_dir>/omniglot/all_runs`` (a folder) or ``all_runs.zip``; downloads the zip
    from the official repository when it is missing and ``allow_download``."""
    from metarun.data.files import DataError, download

    folder = data_dir / "omniglot"
    for candidate in (folder / "all_runs", folder / "all_runs.zip"):
        if candidate.exists():
            return candidate
    missing = (
        f"Lake's one-shot runs are missing from {folder}: expected all_runs.zip (or the "
        f"extracted folder all_runs/ with run01/ ... run20/ inside), the file "
        f"python/one-shot-classification/all_runs.zip of the official Omniglot repository "
        f"(https://github.com/brendenlake/omniglot). Put it there, or point --data-dir (or "
        f"METARUN_DATA) at a folder that has omniglot/ inside."
    )
    if not allow_download:
        raise DataError(missing + " Downloading is off (--no-download).")
    target = folder / "all_runs.zip"
    try:  # no official checksum exists: the structure is checked by read_runs below
        download(OFFICIAL_URL, target, md5=None)
    except DataError as err:
        raise DataError(f"{missing} Download failed: {err}") from err
    try:
        read_runs(target, image_size=28)
    except DataError:
        target.unlink(missing_ok=True)
        raise
    return target


def read_runs(source: Path, image_size: int) -> list[LakeRun]:
    """Reads and checks the 20 runs of ``source`` (the zip or the extracted folder),
    resizing images to ``image_size`` like the runner's Omniglot loader."""
    from metarun.data.files import DataError

    try:
        files = _members(source)
        runs = [_read_run(files, r, image_size) for r in range(1, RUNS + 1)]
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(
            f"{source} is corrupt or truncated ({err}). Delete it and copy or download "
            f"all_runs.zip again."
        ) from err
    except _BadRun as err:
        raise DataError(
            f"{source} does not have the structure of Lake's all_runs.zip: {err}. Replace "
            f"it with the official file."
        ) from err
    return runs


class _BadRun(Exception):
    pass


def _members(source: Path) -> dict[str, Callable[[], bytes]]:
    """``runNN/...`` -> a reader of its bytes, for every file of the runs in ``source``."""
    if source.is_dir():
        paths = {p.relative_to(source).as_posix(): p for p in source.rglob("*") if p.is_file()}
        readers = {name: p.read_bytes for name, p in paths.items()}
    else:
        archive = zipfile.ZipFile(source)
        readers = {n: (lambda n=n: archive.read(n)) for n in archive.namelist()}
    files: dict[str, Callable[[], bytes]] = {}
    for name, reader in readers.items():
        match = _MEMBER.search(name)
        if match is None or name.startswith("__MACOSX/"):
            continue
        if match.group(1) in files:
            raise _BadRun(f"{match.group(1)} appears twice")
        files[match.group(1)] = reader
    return files


def _read_run(files: dict[str, Callable[[], bytes]], number: int, size: int) -> LakeRun:
    import torch

    from metarun.data.omniglot import decode_image

    name = f"run{number:02d}"
    labels_file = f"{name}/class_labels.txt"
    if labels_file not in files:
        raise _BadRun(f"{labels_file} is missing")
    training = sorted(f for f in files if f.startswith(f"{name}/training/"))
    tests = sorted(f for f in files if f.startswith(f"{name}/test/"))
    if len(training) != WAYS or len(tests) != WAYS:
        raise _BadRun(
            f"{name} has {len(training)} training images and {len(tests)} test images, "
            f"expected {WAYS} of each"
        )
    answers: dict[str, str] = {}
    for line in files[labels_file]().decode().splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise _BadRun(f"{labels_file}: {line!r} is not 'test-image training-image'")
        test, train = ("/".join(p.replace("\\", "/").split("/")[-3:]) for p in parts)
        if test not in tests or train not in training or test in answers:
            raise _BadRun(f"{labels_file}: {line!r} names a missing or repeated image")
        answers[test] = train
    if sorted(answers) != tests:
        raise _BadRun(f"{labels_file} labels {len(answers)} of the {WAYS} test images")
    return LakeRun(
        name=name,
        support=torch.stack([decode_image(files[f](), size) for f in training]),
        query=torch.stack([decode_image(files[f](), size) for f in tests]),
        labels=torch.tensor([training.index(answers[t]) for t in tests]),
        classes=training,
    )


def run_errors(algo: Any, runs: list[LakeRun], hardware: Any, views: int = 0) -> list[int]:
    """Wrong queries in each run: ``algo`` adapts to the run's 20 training images and
    classifies its 20 queries, through :func:`metarun.evaluation.evaluate` (``views``:
    its test-time distortions)."""
    import torch

    from metarun.data.episodes import Episode
    from metarun.evaluation import evaluate

    errors = []
    for run in runs:
        episode = Episode(
            run.support, torch.arange(WAYS), run.query, run.labels, torch.arange(WAYS)
        )
        try:
            acc = evaluate(algo, _OneEpisode(episode), 1, hardware, views=views).mean
        except ValueError as err:  # e.g. a head with a fixed number of ways
            raise ProtocolError(
                f"{type(algo).__name__} cannot classify Lake's {WAYS}-way runs: {err}"
            ) from err
        errors.append(round((1.0 - acc) * WAYS))
    return errors


class _OneEpisode:
    def __init__(self, episode: Any):
        self.episode = episode

    def sample(self) -> Any:
        return self.episode


def check_protocol(config: dict, force: bool) -> str:
    """The run's Omniglot split; raises :class:`ProtocolError` for a model that cannot
    take Omniglot images, or (unless ``force``) one trained beyond the background set."""
    dataset = config.get("dataset", {})
    if not str(dataset.get("_target_", "")).endswith(".Omniglot"):
        raise ProtocolError(
            f"this run was trained on {dataset.get('_target_', 'no dataset')}, not Omniglot: "
            f"Lake's benchmark needs a model trained with dataset=omniglot "
            f"dataset.split=lake."
        )
    split = dataset.get("split")
    if split not in BACKGROUND_ONLY_SPLITS and not force:
        from metarun.data.omniglot import _packaged_split

        seen = (
            sorted({c.split("/")[0] for c in _packaged_split("train")} & set(EVALUATION_ALPHABETS))
            if split == "vinyals"
            else []
        )
        which = f" ({len(seen)} of them in its training split: {', '.join(seen)})" if seen else ""
        raise ProtocolError(
            f"this run was trained with dataset.split={split}, whose training classes include "
            f"characters of the evaluation alphabets that Lake's runs are drawn from{which}. "
            f"The benchmark's protocol needs a model trained on the background set only: "
            f"train with dataset.split=lake, or pass --force to evaluate anyway (the error "
            f"is then not comparable with Lake et al. 2015)."
        )
    return str(split)


def evaluate_lake(
    target: Path,
    data_dir: Path | None = None,
    force: bool = False,
    allow_download: bool = True,
    device: str = "auto",
    views: int | None = None,
) -> dict[str, Any]:
    """Evaluates a run folder (its ``best.pt``, else ``last.pt``) or a checkpoint on the
    20 runs, writes ``lake.json`` into the run folder and returns its contents. ``views``:
    test-time distortions (``eval.test_views``; None: the run's own setting)."""
    from metarun import trained
    from metarun.data.files import data_root
    from metarun.hardware import Hardware

    target = target.expanduser().resolve()
    saved = trained.read(target)  # best.pt, else last.pt; its config checked
    if target.is_dir():
        run_dir = target
    else:
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
    config = dict(saved.state["config"])
    split = check_protocol(config, force)
    if data_dir is None:
        configured = os.environ.get("METARUN_DATA") or config.get("data_dir")
        data_dir = data_root(configured)
    source = locate(Path(data_dir).expanduser().resolve(), allow_download)
    hardware = Hardware(device)
    algo, size = trained.restore(saved, hardware), saved.input_shape()[-1]
    ckpt_path = saved.path
    runs = read_runs(source, size)
    if views is None:
        views = int((config.get("eval") or {}).get("test_views", 0))
    if views < 0:
        raise ProtocolError(f"--views={views}: give 0 (no distortions) or more views")
    errors = run_errors(algo, runs, hardware, views)
    trials = RUNS * WAYS
    result = {
        "checkpoint": str(ckpt_path),
        "algorithm": type(algo).__name__,
        "trained_split": split,
        "test_views": views,
        "forced": split not in BACKGROUND_ONLY_SPLITS,
        "source": str(source),
        "protocol": (
            f"Lake et al. (2015): {RUNS} within-alphabet {WAYS}-way 1-shot runs, one episode "
            f"each ({WAYS} training images, {WAYS} queries), images {size}x{size}; error = "
            f"wrong queries / {WAYS}"
        ),
        "runs": [
            {"run": r.name, "errors": e, "trials": WAYS, "error_pct": 100.0 * e / WAYS}
            for r, e in zip(runs, errors, strict=True)
        ],
        "overall": {
            "errors": sum(errors),
            "trials": trials,
            "error_pct": 100.0 * sum(errors) / trials,
        },
        "references_error_pct": REFERENCES,
    }
    (run_dir / "lake.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_report(result: dict[str, Any]) -> str:
    """The per-run and overall error next to the published references."""
    lines = [f"Lake's 20-way one-shot runs, {result['algorithm']} ({result['checkpoint']})"]
    if result["forced"]:
        lines.append(
            f"  (forced: trained with dataset.split={result['trained_split']}; not comparable)"
        )
    lines += [f"  {r['run']}: {r['error_pct']:5.1f}% error" for r in result["runs"]]
    overall = result["overall"]
    lines.append(
        f"  overall: {overall['error_pct']:.2f}% error "
        f"({overall['errors']}/{overall['trials']} trials)"
    )
    lines.append("  Lake et al. (2015): " + ", ".join(f"{k} {v}%" for k, v in REFERENCES.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``[project.scripts] metarun-lake``)."""
    parser = argparse.ArgumentParser(
        prog="metarun-lake",
        description="Error rate on the 20 within-alphabet 20-way one-shot runs of Lake et "
        "al. (2015); writes lake.json into the run folder.",
    )
    parser.add_argument("target", type=Path, help="a run folder or a checkpoint (.pt)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with omniglot/all_runs.zip (default: METARUN_DATA, else the run's data_dir)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="evaluate a model trained beyond the background set (not comparable)",
    )
    parser.add_argument("--no-download", action="store_true", help="never download all_runs.zip")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--views",
        type=int,
        default=None,
        help="test-time distortions per run (eval.test_views; default: the run's own)",
    )
    args = parser.parse_args(argv)

    from metarun.errors import USER_ERRORS

    try:
        result = evaluate_lake(
            args.target,
            args.data_dir,
            args.force,
            not args.no_download,
            args.device,
            args.views,
        )
    except USER_ERRORS as err:  # ProtocolError is a ValueError; anything else is a bug
        print(f"metarun-lake: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_report(result))


if __name__ == "__main__":
    main()
