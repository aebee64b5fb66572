"""One few-shot task from the user's files: the support set or the query set that ``metarun
adapt`` gives a trained run, read from a folder or a tensor file and prepared as the run's
dataset prepared its training inputs (:class:`InputFormat`).

A **folder** holds either one folder per class with the images of that class directly inside
(``support/<class>/<image files>``: labelled; classes are named by their folder), or the
images themselves (``query/<image files>``: unlabelled, for a query set). Images are
decoded by :func:`metarun.data.folder.decode`: converted to the run's channels (grayscale
with ITU-R 601-2 luma weights, or RGB), resized to its image size with Lanczos filtering
(the aspect ratio is not kept) unless they are that size already, and inverted
(``255 - pixel``) when the run's dataset inverted its own (Omniglot; ``dataset=folder`` with
``invert: true``). Items are in sorted order: by class folder, then by file name.

A **file** (``.npz``, ``.pt``, ``.csv``, ``.parquet``) holds the examples ``x`` and, for a
labelled set, ``y``, in the formats of ``dataset=tensors`` (read by
:func:`metarun.data.tensors.read_arrays`: nothing read can run code). ``x`` must have the
run's input shape, ``(n, *input_shape)``; for a run whose input is one number (sinusoid
regression) a 1-D ``x`` or a single ``.csv`` column is taken as ``(n, 1)``. ``y`` holds class
labels (integers or strings) for classification and target values ``(n,)`` or ``(n,
outputs)`` for regression; in ``.csv`` and ``.parquet`` files it is the column
:attr:`InputFormat.label_column`. Items keep the file's order and are named by their row
index (0 for the first example). uint8 ``x`` is scaled to [0, 1] when the task is computed,
as the datasets' images are; other types become float32 and are used as they are, or
standardised with the statistics of the run's training file (``dataset=tensors`` with
``standardize: true``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarun.data import folder as image_folder
from metarun.data import tensors
from metarun.data.files import DataError


@dataclass(frozen=True)
class InputFormat:
    """How a run's dataset turned its files into inputs; a user's files are prepared the same
    way.

    Attributes:
        shape: the shape of one input the run was trained on, e.g. ``(1, 28, 28)``.
        regression: the run's tasks are regression (targets are numbers, not class labels).
        invert: images are stored as ``255 - pixel``.
        standardization: the mean and standard deviation ``dataset=tensors`` standardised
            its examples with (``standardize: true``), else ``None``.
        label_column: the column of labels (or targets) in ``.csv`` and ``.parquet`` files.
    """

    shape: tuple[int, ...]
    regression: bool = False
    invert: bool = False
    standardization: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    label_column: str = "label"

    @property
    def takes_images(self) -> bool:
        """Whether inputs are square grayscale or RGB images, ``(1 or 3, size, size)``, so
        that image files can be prepared for the run."""
        return len(self.shape) == 3 and self.shape[0] in (1, 3) and self.shape[1] == self.shape[2]

    def describe(self) -> dict[str, Any]:
        """What is done to a user's files, for the record (``predictions.json``)."""
        described: dict[str, Any] = {"input_shape": list(self.shape)}
        if self.takes_images:
            channels, size = self.shape[0], self.shape[1]
            described["images"] = (
                f"{'grayscale' if channels == 1 else 'RGB'}, resized to {size}x{size} "
                f"(Lanczos){', inverted (255 - pixel)' if self.invert else ''}, scaled to [0, 1]"
            )
        described["arrays"] = (
            "standardised with the run's training statistics"
            if self.standardization is not None
            else "uint8 scaled to [0, 1]; other types used as they are"
        )
        return described


@dataclass
class Examples:
    """A support or query set as read from disk.

    Attributes:
        x: ``(n, *input_shape)`` uint8 images (or arrays) or float32 examples, prepared.
        items: a name per example: its path relative to the folder, or its row index.
        labels: the class name of each example (classification), or ``None`` (unlabelled).
        classes: the class names found (sorted; a class folder without images included), or
            ``None`` when unlabelled.
        targets: ``(n, outputs)`` float32 targets (regression), or ``None``.
        source: the folder or file read.
    """

    x: torch.Tensor
    items: list[str]
    labels: list[str] | None
    classes: list[str] | None
    targets: torch.Tensor | None
    source: Path

    @property
    def labelled(self) -> bool:
        return self.labels is not None or self.targets is not None


def read_examples(path: Path | str, fmt: InputFormat, role: str = "support") -> Examples:
    """The examples of a folder or a file (see the module docstring), prepared for a run
    whose inputs are described by ``fmt``. ``role`` (``support`` or ``query``) names the set
    in error messages.

    Raises:
        DataError: a missing, unreadable or empty source, examples of another shape than
            ``fmt.shape`` (the message gives the expected shape), a folder for a run that
            does not take images, labels that are not class labels or targets.
    """
    source = Path(path).expanduser().resolve()
    if not source.exists():
        raise DataError(f"{role}={path}: no such folder or file ({source})")
    if source.is_dir():
        examples = _read_folder(source, fmt, role)
    else:
        examples = _read_file(source, fmt, role)
    check_shape(examples, fmt, role)
    if fmt.standardization is not None:
        examples.x = tensors.standardize_examples(examples.x, fmt.standardization)
    return examples


def check_shape(examples: Examples, fmt: InputFormat, role: str) -> None:
    """Refuses examples whose shape is not the run's input shape, naming both."""
    got = tuple(examples.x.shape[1:])
    if got == fmt.shape:
        return
    expected = f"(n, {', '.join(map(str, fmt.shape))})"
    what = ""
    if fmt.takes_images:
        channels = f"{fmt.shape[0]} channel{'s' if fmt.shape[0] > 1 else ''}"
        what = f": {channels} of {fmt.shape[1]}x{fmt.shape[2]} pixels"
        if len(got) == 3 and got[0] != fmt.shape[0]:
            what += f" (these have {got[0]} channels)"
    folder = " (or a folder of images, which is converted and resized to it)"
    raise DataError(
        f"the {role} set {examples.source} holds examples of shape {tuple(examples.x.shape)}, "
        f"but the run was trained on inputs of shape {expected}{what}. Give examples of "
        f"that shape{folder if fmt.takes_images else ''}."
    )


def _read_folder(source: Path, fmt: InputFormat, role: str) -> Examples:
    if fmt.regression:
        raise DataError(
            f"{role}={source} is a folder, but the run is a regression run: give a .csv, "
            f".npz, .pt or .parquet file with the inputs x and (for a support set) the "
            f"targets y."
        )
    if not fmt.takes_images:
        raise DataError(
            f"{role}={source} is a folder of images, but the run was trained on inputs of "
            f"shape {fmt.shape}, not images: give a .npz, .pt, .csv or .parquet file with x "
            f"of shape (n, {', '.join(map(str, fmt.shape))})."
        )
    images, folders = _listing(source)
    if images and folders:
        raise DataError(
            f"{source} holds both images ({images[0].name}, ...) and folders "
            f"({folders[0].name}, ...): give one folder per class (a labelled set) or the "
            f"images alone (an unlabelled query set), not both."
        )
    if images:
        x = _decode_all(images, source, fmt)
        return Examples(x, [p.name for p in images], None, None, None, source)
    if not folders:
        raise DataError(
            f"{source} holds no image files and no class folders: give {source}/<class>/"
            f"<image files> (extensions Pillow reads, such as .png and .jpg)."
        )
    paths: list[Path] = []
    labels: list[str] = []
    for class_folder in folders:
        files, inner = _listing(class_folder)
        if inner:
            raise DataError(
                f"the class folder {class_folder} holds a folder, {inner[0].name}: a class's "
                f"images must be directly inside its folder, {source}/<class>/<image files>. "
                f"Move them up, or remove the folder."
            )
        paths += files
        labels += [class_folder.name] * len(files)
    if not paths:
        raise DataError(
            f"the class folders in {source} ({', '.join(f.name for f in folders[:5])}"
            f"{', ...' if len(folders) > 5 else ''}) hold no image files (extensions Pillow "
            f"reads, such as .png and .jpg)."
        )
    items = [p.relative_to(source).as_posix() for p in paths]
    x = _decode_all(paths, source, fmt)
    return Examples(x, items, labels, [f.name for f in folders], None, source)


def _listing(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files and the folders directly inside ``folder``, each sorted by name;
    names starting with ``.`` are left out, and so are files that are not images."""
    try:
        entries = sorted(
            (e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name
        )
    except OSError as err:
        raise DataError(f"cannot list the folder {folder} ({err})") from err
    images = [Path(e.path) for e in entries if e.is_file() and image_folder.is_image_file(Path(e))]
    return images, [Path(e.path) for e in entries if e.is_dir()]


def _decode_all(paths: list[Path], source: Path, fmt: InputFormat) -> torch.Tensor:
    channels, size = fmt.shape[0], fmt.shape[1]
    x = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)
    failed = []
    for i, path in enumerate(paths):
        try:
            x[i] = image_folder.decode(path, size, channels, fmt.invert)
        except DataError as err:
            failed.append(str(err))
    if failed:
        more = f"\n... and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise DataError(
            f"{len(failed)} of the {len(paths)} image files in {source} cannot be read; "
            f"replace or remove them:\n" + "\n".join(failed[:5]) + more
        )
    return x


def _read_file(source: Path, fmt: InputFormat, role: str) -> Examples:
    x, y = tensors.read_arrays(source, fmt.label_column, require_y=False)
    if np.ndim(x) == 1 and fmt.shape == (1,):  # one number per example (sinusoid x)
        x = np.asarray(x).reshape(-1, 1) if not isinstance(x, torch.Tensor) else x.view(-1, 1)
    x = tensors.check_examples(source, x)
    items = [str(i) for i in range(x.shape[0])]
    if x.shape[0] == 0:
        raise DataError(f"the {role} set {source} holds no examples")
    if y is None:
        return Examples(x, items, None, None, None, source)
    if fmt.regression:
        return Examples(x, items, None, None, _targets(source, y, x.shape[0]), source)
    labels = tensors.label_names(source, y)
    if len(labels) != x.shape[0]:
        raise DataError(f"{source}: x has {x.shape[0]} examples but y has {len(labels)} labels")
    return Examples(x, items, labels, tensors.sorted_labels(labels), None, source)


def _targets(source: Path, y: Any, n: int) -> torch.Tensor:
    """Regression targets as ``(n, outputs)`` float32."""
    try:
        values = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=torch.float32)
    except (TypeError, ValueError):
        raise DataError(
            f"{source}: the targets y are not numbers; a regression run takes real-valued "
            f"targets, (n,) or (n, outputs)."
        ) from None
    values = values.view(-1, 1) if values.dim() == 1 else values
    if values.dim() != 2 or values.shape[0] != n:
        raise DataError(
            f"{source}: y has shape {tuple(values.shape)}; give one target per example, "
            f"({n},) or ({n}, outputs)"
        )
    if not bool(torch.isfinite(values).all()):
        raise DataError(f"{source}: y holds NaN or infinite values")
    return values.contiguous()


__all__ = ["InputFormat", "Examples", "read_examples", "check_shape", "DataError"]
