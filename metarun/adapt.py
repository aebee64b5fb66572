"""``metarun adapt``: a trained run on a new few-shot task given as your own files.

    metarun adapt RUN support=DIR_OR_FILE query=DIR_OR_FILE [out=PATH] [device=auto] [steps=N]

The run's trained learner (:func:`metarun.load`: its ``best.pt``, else ``last.pt``; or a
``.pt`` file) adapts to the labelled **support** set and predicts each item of the **query**
set, through the same code as the run's test episodes
(:meth:`metarun.trained.Trained.predict`). Inputs are prepared as the run's dataset
prepared its training inputs (:class:`metarun.data.taskfiles.InputFormat`, read from the
run's saved config and its dataset's class): a folder of class folders of images, or a
tensor file (``.npz``, ``.pt``, ``.csv``, ``.parquet``) with ``x`` and ``y``
(:mod:`metarun.data.taskfiles`).

Classes are numbered in sorted order of their names (label 0 is the first); the support
set is given to the learner grouped by class, in that order, as a test episode is. For each
query item, ``out.csv`` and ``out.json`` hold the predicted label, the predicted class name
and the class scores (the algorithm's logits: the prediction is the highest); with labelled
queries (class folders, or ``y`` in the file) also the true class, and the accuracy with its
95% confidence interval (Wilson score interval over the queries of this one task). A
regression run (sinusoid-style ``x``/``y`` files) gets the predicted targets, and the MSE
(mean ± 1.96 standard errors over the queries) when the queries have targets.

Everything is checked before anything is computed: the shapes of the inputs against the
run's, a support class without examples, a number of classes or of examples per class that
the algorithm cannot take (``fixed_ways``, ``fixed_shots`` in its capabilities: MAML's head,
MANN's output, SNAIL's sequence), query labels naming classes absent from the support set,
and output files that exist already (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch

from metarun import trained
from metarun.data.files import DataError, atomic_write
from metarun.data.taskfiles import Examples, InputFormat, read_examples
from metarun.errors import USER_ERRORS, ConfigError
from metarun.evaluation import mean_ci95

log = logging.getLogger("metarun")

SETTINGS = {
    "support": "the labelled support set: a folder of class folders, or a tensor file with x and y",
    "query": "the query set: a folder (of class folders, or of images), or a tensor file",
    "out": "where to write PATH.csv and PATH.json (default: predictions, in this folder)",
    "device": "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: auto)",
    "steps": "adaptation steps, for algorithms that adapt by gradient steps (default: the run's)",
}
Z95 = 1.96


def adapt(
    run: Path | str,
    support: Path | str,
    query: Path | str,
    out: Path | str | None = "predictions",
    device: str = "auto",
    steps: int | None = None,
) -> dict[str, Any]:
    """Adapts the trained learner of ``run`` to ``support`` and predicts ``query`` (see the
    module docstring); writes ``out.csv`` and ``out.json`` unless ``out`` is ``None``, and
    returns what ``out.json`` holds.

    Raises:
        DataError, ConfigError, ValueError, FileNotFoundError: input that cannot be used,
            named with the fix, before anything is computed or written.
        FileExistsError: ``out.csv`` or ``out.json`` exists (nothing is overwritten).
    """
    paths = _out_paths(out) if out is not None else None
    model = trained.load(run, device)
    if steps is not None and not type(model.algo).capabilities.adaptation_steps:
        raise ConfigError(
            f"steps={steps}: {type(model.algo).__name__} does not adapt by gradient steps, so "
            f"it has no step count to set; leave steps= out."
        )
    fmt = input_format(model)
    support_set = read_examples(support, fmt, "support")
    query_set = read_examples(query, fmt, "query")
    if not support_set.labelled:
        raise DataError(
            f"the support set {support_set.source} has no labels: give one folder per class "
            f"({support_set.source}/<class>/<images>), or a file with y"
            f"{' (targets)' if fmt.regression else ' (class labels)'} next to x (the column "
            f"{fmt.label_column!r} of a .csv or .parquet file)."
        )
    head = {
        "run": str(model.checkpoint),
        "iteration": model.iteration,
        "algorithm": type(model.algo).__name__,
        "task": model.task.name,
        "input": fmt.describe(),
        "device": str(model.hardware.device),
        **({"steps": steps} if steps is not None else {}),
    }
    if fmt.regression:
        result = head | _regress(model, support_set, query_set, steps)
    else:
        result = head | _classify(model, support_set, query_set, steps)
    if paths is not None:
        _write(result, *paths)
        result["written"] = [str(p) for p in paths]
    return result


def input_format(model: trained.Trained) -> InputFormat:
    """How the run's dataset prepared its inputs: the input shape saved with the run, the
    dataset's ``invert`` (its config's, else its class's: Omniglot's images are inverted),
    and for ``dataset=tensors`` with ``standardize: true`` the statistics of its training
    split (read again from its ``dataset.path``, which must still be there)."""
    from hydra.utils import get_class

    dataset = model.config.dataset
    cls = get_class(dataset._target_)  # metarun's own: checked when the config was read
    regression = model.task.outputs is not None
    stats = None
    if dataset.get("standardize"):
        stats = _training_statistics(dataset)
    return InputFormat(
        shape=tuple(model.input_shape),
        regression=regression,
        invert=bool(dataset.get("invert", getattr(cls, "invert", False))),
        standardization=stats,
        label_column="y" if regression else str(dataset.get("label_column", "label")),
    )


def _training_statistics(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from hydra.utils import instantiate

    try:
        data = instantiate(dataset)
    except Exception as err:  # noqa: BLE001 - reported with what it was needed for
        cause = err.__cause__ if err.__cause__ is not None else err  # Hydra wraps it
        raise DataError(
            f"the run standardised its inputs (dataset.standardize=true) with the mean and "
            f"standard deviation of its training split, read from dataset.path="
            f"{dataset.get('path')}; that file is needed to prepare these inputs the same "
            f"way, and reading it failed: {cause}"
        ) from err
    return data.standardization


def _classify(
    model: trained.Trained, support: Examples, query: Examples, steps: int | None
) -> dict[str, Any]:
    assert support.labels is not None and support.classes is not None
    classes = support.classes
    counts = [support.labels.count(c) for c in classes]
    model.check_support(counts, classes)
    if query.labels is not None:
        absent = sorted(set(query.labels) - set(classes))
        if absent:
            raise DataError(
                f"the query set {query.source} has labels of classes that are not in the "
                f"support set {support.source}: {', '.join(absent[:10])}"
                f"{' ...' if len(absent) > 10 else ''}. The learner can only predict the "
                f"support set's classes ({', '.join(classes[:10])}"
                f"{' ...' if len(classes) > 10 else ''}): add those classes to the support "
                f"set, or remove them from the query set."
            )
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[name] for name in support.labels])
    order = torch.argsort(labels, stable=True)  # grouped by class, as in a test episode
    scores = model.predict(support.x[order], labels[order], query.x, steps)
    predicted = scores.argmax(dim=1).tolist()
    rows = []
    for i, item in enumerate(query.items):
        row: dict[str, Any] = {
            "item": item,
            "label": predicted[i],
            "class": classes[predicted[i]],
            "scores": scores[i].tolist(),
        }
        if query.labels is not None:
            row["true_class"] = query.labels[i]
            row["correct"] = query.labels[i] == classes[predicted[i]]
        rows.append(row)
    accuracy = None
    if query.labels is not None:
        correct = sum(r["correct"] for r in rows)
        low, high = wilson95(correct, len(rows))
        accuracy = {
            "acc": correct / len(rows),
            "correct": correct,
            "queries": len(rows),
            "ci95": [low, high],
            "interval": "Wilson score interval, over the queries of this task",
        }
    return {
        "support": {
            "source": str(support.source),
            "classes": classes,
            "examples": dict(zip(classes, counts, strict=True)),
        },
        "query": {
            "source": str(query.source),
            "items": len(rows),
            "labelled": query.labels is not None,
        },
        "accuracy": accuracy,
        "notes": _notes(model, counts, classes, len(rows)),
        "predictions": rows,
    }


def _regress(
    model: trained.Trained, support: Examples, query: Examples, steps: int | None
) -> dict[str, Any]:
    assert support.targets is not None
    outputs = int(model.task.outputs or 1)
    for examples in (support, query):
        if examples.targets is not None and examples.targets.shape[1] != outputs:
            raise DataError(
                f"{examples.source}: y has {examples.targets.shape[1]} targets per example, "
                f"and the run predicts {outputs}."
            )
    predictions = model.predict(support.x, support.targets, query.x, steps)
    rows = []
    for i, item in enumerate(query.items):
        row: dict[str, Any] = {"item": item, "prediction": predictions[i].tolist()}
        if query.targets is not None:
            row["target"] = query.targets[i].tolist()
            row["squared_error"] = ((predictions[i] - query.targets[i]) ** 2).mean().item()
        rows.append(row)
    mse = None
    if query.targets is not None:
        mean, ci95 = mean_ci95(torch.tensor([r["squared_error"] for r in rows]))
        mse = {
            "mse": mean,
            "ci95": ci95,
            "queries": len(rows),
            "interval": "mean ± 1.96 standard errors, over the queries of this task",
        }
    return {
        "support": {"source": str(support.source), "examples": len(support.items)},
        "query": {
            "source": str(query.source),
            "items": len(rows),
            "labelled": query.targets is not None,
        },
        "mse": mse,
        "notes": [],
        "predictions": rows,
    }


def _notes(model: trained.Trained, counts: list[int], classes: list[str], n_query: int) -> list:
    """What the user should know about how comparable this task is with the run's tests."""
    notes = []
    e = model.config.eval
    if len(set(counts)) > 1:
        listed = ", ".join(f"{c} ({n})" for c, n in list(zip(classes, counts, strict=True))[:5])
        notes.append(
            f"the support classes have different numbers of examples ({listed}"
            f"{', ...' if len(classes) > 5 else ''}); the run's test episodes had "
            f"{e.shots} per class, and some algorithms (Relation Networks: summed features) "
            f"favour larger classes."
        )
    bn_mode = str(getattr(model.algo, "bn_mode", ""))
    if "transductive" in bn_mode:
        notes.append(
            f"bn_mode=transductive: the {n_query} queries were normalised with their own "
            f"batch statistics, as in the run's test episodes ({e.ways} x {e.query_shots} "
            f"queries), so each prediction depends on the other queries given with it."
        )
    return notes


def wilson95(correct: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion ``correct / n`` (unlike the normal
    interval it does not collapse to a point at 0% or 100%)."""
    p, z2 = correct / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _out_paths(out: Path | str) -> tuple[Path, Path]:
    """``PATH.csv`` and ``PATH.json`` (``out`` with or without either suffix); refuses to
    overwrite either."""
    base = Path(out).expanduser()
    if base.suffix.lower() in (".csv", ".json"):
        base = base.with_suffix("")
    paths = (base.with_name(base.name + ".csv"), base.with_name(base.name + ".json"))
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(
            f"{' and '.join(existing)} exist{'s' if len(existing) == 1 else ''} already; "
            f"nothing is overwritten: give another out=PATH, or move the old files away."
        )
    return paths


def _write(result: dict[str, Any], csv_path: Path, json_path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    labelled = result["query"]["labelled"]
    if result["task"] == "regression":
        outputs = len(result["predictions"][0]["prediction"])
        names = ["prediction"] if outputs == 1 else [f"prediction_{k}" for k in range(outputs)]
        targets = ["target"] if outputs == 1 else [f"target_{k}" for k in range(outputs)]
        writer.writerow(["item", *names, *((*targets, "squared_error") if labelled else ())])
        for r in result["predictions"]:
            extra = (*r["target"], r["squared_error"]) if labelled else ()
            writer.writerow([r["item"], *r["prediction"], *extra])
    else:
        classes = result["support"]["classes"]
        truth = ["true_class", "correct"] if labelled else []
        writer.writerow(
            ["item", "predicted_label", "predicted_class", *truth] + [f"score_{c}" for c in classes]
        )
        for r in result["predictions"]:
            extra = [r["true_class"], int(r["correct"])] if labelled else []
            writer.writerow([r["item"], r["label"], r["class"], *extra, *r["scores"]])
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(buffer.getvalue().encode(), csv_path)
    atomic_write((json.dumps(result, indent=2) + "\n").encode(), json_path)


def summary(result: dict[str, Any]) -> str:
    """What ``metarun adapt`` prints: the task, the score, the notes, the files."""
    s, q = result["support"], result["query"]
    if result["task"] == "regression":
        task = f"{s['examples']} support examples"
    else:
        task = f"{len(s['classes'])} classes, {sum(s['examples'].values())} support examples"
    lines = [
        f"{result['algorithm']} ({result['run']}, iteration {result['iteration']}) adapted to "
        f"{task} ({s['source']}); {q['items']} queries ({q['source']})"
    ]
    if result.get("accuracy"):
        a = result["accuracy"]
        lines.append(
            f"accuracy {100 * a['acc']:.2f}% ({a['correct']}/{a['queries']} queries), 95% CI "
            f"[{100 * a['ci95'][0]:.1f}%, {100 * a['ci95'][1]:.1f}%] (Wilson score interval "
            f"over this task's queries)"
        )
    if result.get("mse"):
        m = result["mse"]
        lines.append(f"MSE {m['mse']:.4f} ± {m['ci95']:.4f} ({m['queries']} queries)")
    lines += [f"note: {n}" for n in result["notes"]]
    if "written" in result:
        lines.append("wrote " + " and ".join(result["written"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``metarun adapt ...`` (dispatched from :func:`metarun.cli.main`)."""
    parser = argparse.ArgumentParser(
        prog="metarun adapt",
        description="Adapt a trained run to a new few-shot task given as files, and predict "
        "its queries: writes the prediction, the class name and the class scores of each "
        "query (CSV and JSON), and the accuracy when the queries are labelled.",
        epilog="settings:\n"
        + "\n".join(f"  {k}=...  {v}" for k, v in SETTINGS.items())
        + "\n\nexamples:\n"
        "  metarun adapt outputs/runs/RUN support=new_task/support query=new_task/query\n"
        "  metarun adapt RUN support=support.npz query=query.npz out=results/preds\n"
        "Formats and what is assumed: docs/PYTHON_API.md and docs/DATASETS.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", help="a run folder (best.pt, else last.pt) or a checkpoint .pt")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="support=, query=, ...")
    args = parser.parse_args(argv)
    settings: dict[str, str] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTINGS:
            close = difflib.get_close_matches(key, list(SETTINGS), n=1)
            hint = f" Did you mean {close[0]}=?" if close else ""
            parser.error(f"{item!r} is not a setting.{hint} Settings: {', '.join(SETTINGS)}=")
        settings[key] = value
    missing = [k for k in ("support", "query") if not settings.get(k)]
    if missing:
        parser.error(f"give {' and '.join(f'{k}=DIR_OR_FILE' for k in missing)}")
    steps = settings.get("steps")
    if steps is not None and not steps.isdigit():
        parser.error(f"steps={steps}: give a whole number of steps, 0 or more")
    logging.basicConfig(level=logging.WARNING, format="metarun adapt: %(message)s")
    try:
        result = adapt(
            args.run,
            settings["support"],
            settings["query"],
            settings.get("out", "predictions"),
            settings.get("device", "auto"),
            None if steps is None else int(steps),
        )
    except (*USER_ERRORS, FileExistsError) as err:
        print(f"metarun adapt: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "CUDA" not in str(err):
            raise  # a bug: keep the traceback
        print(f"metarun adapt: error: {err}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
