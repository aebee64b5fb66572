"""Does ``MM`` in Omniglot's ``NNNN_MM.png`` name one drawer across an alphabet?

For each alphabet of ``images_background``, each drawing gets five style features (ink,
height, width, vertical and horizontal centre of the strokes, from the 105x105 PNG). The
character's mean is subtracted, and the share of the remaining variance explained by the
mean of each ``MM`` over the alphabet's characters is compared with the same share after
shuffling ``MM`` within each character (200 shuffles): if ``MM`` is the same person for
every character of an alphabet, their drawings share a size, ink and placement, and the
share is far above chance. Then the per-``MM`` height effects of every pair of alphabets
are correlated: near 0 if ``MM`` names different people in different alphabets.

Usage::

    python scripts/omniglot_drawers.py [DATA_DIR]   # default: METARUN_DATA

Prints one row per alphabet (share / shuffled mean, p-value per feature) and the mean
correlation between alphabets. docs/DATASETS.md quotes its output.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

FEATURES = ("ink", "height", "width", "centre_y", "centre_x")


def features(png: bytes) -> np.ndarray:
    strokes = np.array(Image.open(io.BytesIO(png)).convert("L")) < 128
    ys, xs = np.nonzero(strokes)
    if ys.size == 0:
        return np.zeros(len(FEATURES))
    return np.array([ys.size, np.ptp(ys), np.ptp(xs), ys.mean(), xs.mean()], dtype=float)


def drawer_share(x: np.ndarray) -> np.ndarray:
    """``x``: ``(characters, 20 drawers, features)`` -> share of the within-character
    variance explained by the drawer means, per feature."""
    r = x - x.mean(axis=1, keepdims=True)
    r = r / (r.std(axis=(0, 1), keepdims=True) + 1e-9)
    return (r.mean(axis=0) ** 2).sum(axis=0) * x.shape[0] / (r**2).sum(axis=(0, 1))


def main() -> None:
    data = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["METARUN_DATA"])
    archive = zipfile.ZipFile(data / "omniglot" / "images_background.zip")
    alphabets: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for name in sorted(n for n in archive.namelist() if n.endswith(".png")):
        _, alphabet, character, file = name.split("/")
        drawer = int(file.split("_")[1][:2])
        alphabets.setdefault(alphabet, {}).setdefault(character, {})[drawer] = features(
            archive.read(name)
        )
    rng = np.random.default_rng(0)
    effects = {}
    print(f"{'alphabet':42s} chars  " + "  ".join(f"{f:>17s}" for f in FEATURES))
    for alphabet, characters in alphabets.items():
        x = np.stack([np.stack([d[m] for m in sorted(d)]) for d in characters.values()])
        real = drawer_share(x)
        null = np.stack(
            [drawer_share(np.stack([c[rng.permutation(20)] for c in x])) for _ in range(200)]
        )
        p = ((null >= real).sum(axis=0) + 1) / (len(null) + 1)
        rows = zip(real, null.mean(axis=0), p, strict=True)
        cells = "  ".join(f"{r:.2f}/{n:.2f} p{q:.3f}" for r, n, q in rows)
        print(f"{alphabet:42s} {len(x):5d}  {cells}")
        effects[alphabet] = (x - x.mean(axis=1, keepdims=True)).mean(axis=0)[:, 1]  # height
    names = sorted(effects)
    r = [
        np.corrcoef(effects[a], effects[b])[0, 1]
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    print(
        f"per-MM height effects between alphabets: mean r {np.mean(r):.3f}, sd {np.std(r):.3f} "
        f"over {len(r)} pairs (independent drawers: mean 0, sd about {1 / np.sqrt(19):.2f})"
    )


if __name__ == "__main__":
    main()
