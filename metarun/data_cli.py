"""``metarun-data``: see which datasets are here, check them, and build their caches.

metarun-data list
metarun-data verify miniimagenet
metarun-data prepare miniimagenet dataset.split=val_test_reduced

The data and cache folders are the ones ``metarun`` uses: ``--data-dir`` / ``--cache-dir``,
else ``METARUN_DATA`` / ``METARUN_CACHE``, else ``~/.cache/metarun/{data,cache}``.
Exit status: 0 when everything asked for is in order, 1 when ``verify`` finds a problem
or ``prepare`` fails (the message says what is missing and how to get it), 2 for a usage
error. Heavy modules (torch, Hydra) are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib import resources
from pathlib import Path

OK, WARN, ERROR = "ok", "warn", "error"
Finding = tuple[str, str]  # (level, message)


def dataset_names() -> list[str]:
    """The ``dataset=`` options: the files of ``configs/dataset``."""
    folder = resources.files("metarun.configs").joinpath("dataset")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _folders(data_dir: str | None, cache_dir: str | None) -> tuple[Path, Path]:
    data = data_dir or os.environ.get("METARUN_DATA") or None
    cache = cache_dir or os.environ.get("METARUN_CACHE") or None
    from metarun.data.files import cache_root, data_root

    return data_root(data), cache_root(cache)


def _reads_files(name: str) -> bool:
    """Whether ``dataset=<name>`` reads a data folder (synthetic datasets do not)."""
    config = resources.files("metarun.configs").joinpath(f"dataset/{name}.yaml").read_text()
    return "${data_dir}" in config


def _required_keys(name: str) -> list[str]:
    """The keys that ``dataset=<name>`` leaves for the user to set (``null  # required``):
    where the user's own files are (``dataset=folder``, ``dataset=tensors``)."""
    config = resources.files("metarun.configs").joinpath(f"dataset/{name}.yaml").read_text()
    return re.findall(r"^(\w+):\s*null\s+# required", config, re.M)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# --- verify -------------------------------------------------------------------------------


def verify_omniglot(folder: Path) -> list[Finding]:
    """Both archives (or extracted folders): character and drawing counts, official MD5."""
    import zipfile

    from metarun.data.files import md5sum
    from metarun.data.omniglot import ARCHIVES, DRAWINGS

    findings: list[Finding] = []
    for name, (n_chars, official_md5) in ARCHIVES.items():
        zipped, extracted = folder / f"{name}.zip", folder / name
        if zipped.exists():
            try:
                with zipfile.ZipFile(zipped) as archive:
                    members = [m for m in archive.namelist() if m.endswith(".png")]
            except zipfile.BadZipFile as err:
                findings.append((ERROR, f"{zipped} is not a readable zip ({err})"))
                continue
            got = md5sum(zipped)
            findings.append(
                (OK, f"{zipped.name}: MD5 {got} equals the official one")
                if got == official_md5
                else (
                    WARN,
                    f"{zipped.name}: MD5 {got} differs from the official {official_md5} "
                    f"(a repacked copy?); the structure below decides whether it is usable",
                )
            )
        elif extracted.is_dir():
            members = [
                f"{name}/{p.relative_to(extracted).as_posix()}" for p in extracted.rglob("*.png")
            ]
        else:
            findings.append((ERROR, f"missing {zipped} (or the extracted folder {extracted}/)"))
            continue
        per_char = Counter("/".join(m.split("/")[:3]) for m in members)
        counts = set(per_char.values())
        if len(per_char) == n_chars and counts == {DRAWINGS}:
            findings.append((OK, f"{name}: {n_chars} characters x {DRAWINGS} drawings"))
        else:
            findings.append(
                (
                    ERROR,
                    f"{name}: {len(per_char)} characters with {sorted(counts)} drawings, "
                    f"expected {n_chars} x {DRAWINGS}",
                )
            )
        source = zipped if zipped.exists() else extracted
        findings += _decode_every_image(source, name, members)
    return findings


def _decode_every_image(source: Path, name: str, members: list[str]) -> list[Finding]:
    """Reads every image of an Omniglot archive or folder (a zip checks each member's CRC
    as it reads it) and decodes it as ``metarun`` will; names each one that fails."""
    import zipfile

    from metarun.data.omniglot import decode_image

    bad: list[str] = []
    archive = zipfile.ZipFile(source) if source.is_file() else None
    try:
        for member in members:
            try:
                if archive is not None:
                    data = archive.read(member)
                else:
                    data = (source / member.split("/", 1)[1]).read_bytes()
                decode_image(data, 28)
            except Exception as err:  # noqa: BLE001 - each failure is reported by name
                bad.append(f"{member}: {err}")
    finally:
        if archive is not None:
            archive.close()
    if not bad:
        return [(OK, f"{name}: all {len(members)} images read and decoded")]
    shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
    return [
        (
            ERROR,
            f"{name}: {len(bad)} of {len(members)} images cannot be read or decoded; replace "
            f"{source.name} with a good copy:\n  {shown}",
        )
    ]


def verify_miniimagenet(folder: Path) -> list[Finding]:
    """Raw format: rows, classes and images per split against Ravi & Larochelle's split;
    learn2learn pickles: presence. No checksums are published for either."""
    from metarun.data.miniimagenet import (
        CSV_FILES,
        IMAGES_PER_CLASS,
        PICKLE_FILES,
        RAVI_CLASSES,
    )

    findings: list[Finding] = []
    pickles = [s for s, f in PICKLE_FILES.items() if (folder / f).exists()]
    for split in pickles:
        size = _human((folder / PICKLE_FILES[split]).stat().st_size)
        findings.append((OK, f"{split}: learn2learn pickle {PICKLE_FILES[split]} ({size})"))
    classes_of: dict[str, set[str]] = {}
    for split, name in CSV_FILES.items():
        path = folder / name
        if not path.exists():
            if split not in pickles:
                findings.append((ERROR, f"{split}: missing {path} (and {PICKLE_FILES[split]})"))
            continue
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r][1:]
        per_class = Counter(label for _, label in rows)
        classes_of[split] = set(per_class)
        shape_ok = len(per_class) == RAVI_CLASSES[split] and set(per_class.values()) == {
            IMAGES_PER_CLASS
        }
        findings.append(
            (
                OK if shape_ok else WARN,
                f"{split}: {name} lists {len(rows)} images of {len(per_class)} classes"
                + ("" if shape_ok else f" (Ravi: {RAVI_CLASSES[split]} x {IMAGES_PER_CLASS})"),
            )
        )
        missing = [n for n, _ in rows if not (folder / "images" / n).exists()]
        if missing:
            findings.append(
                (
                    ERROR if split not in pickles else WARN,
                    f"{split}: {len(missing)} of {len(rows)} images missing from "
                    f"{folder / 'images'} (first: {missing[0]})",
                )
            )
        else:
            findings.append((OK, f"{split}: all {len(rows)} images present"))
    splits = sorted(classes_of)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            if shared := classes_of[a] & classes_of[b]:
                findings.append((ERROR, f"{a} and {b} share {len(shared)} classes"))
    findings.append((OK, "no published checksums for miniImageNet; structure checked"))
    return findings


def verify_mnist(folder: Path) -> list[Finding]:
    """MNIST, and Fashion-MNIST when ``fashion_mnist/`` is next to it: the four IDX files,
    their headers (magic number, count) and the official MD5 of each."""
    import gzip
    import struct

    from metarun.data.files import md5sum
    from metarun.data.mnist import VARIANTS

    findings: list[Finding] = []
    for variant, (name, _, checksums) in VARIANTS.items():
        here = folder.parent / name
        if variant != "mnist" and not here.exists():
            continue
        for file, official in checksums.items():
            path = here / file
            if not path.exists():
                findings.append((ERROR, f"{variant}: missing {path}"))
                continue
            magic = 2051 if "images" in file else 2049
            count = 60000 if file.startswith("train") else 10000
            try:
                with gzip.open(path) as f:
                    got_magic, got_count = struct.unpack(">II", f.read(8))
            except (OSError, EOFError, struct.error) as err:
                findings.append((ERROR, f"{variant}: {file} is not a gzipped IDX file ({err})"))
                continue
            if (got_magic, got_count) != (magic, count):
                findings.append(
                    (
                        ERROR,
                        f"{variant}: {file} has magic {got_magic} and {got_count} items, "
                        f"expected {magic} and {count}",
                    )
                )
                continue
            md5 = md5sum(path)
            findings.append(
                (OK, f"{variant}: {file}: {count} items, official MD5")
                if md5 == official
                else (WARN, f"{variant}: {file}: {count} items; MD5 {md5} is not the official one")
            )
    return findings


# The keys of metarun.metarun.data.learn2learn.SPECS, named here so that `--help` imports no torch
# (a test keeps the two equal).
L2L_DATASETS = (
    "tiered_imagenet",
    "cifar_fs",
    "fc100",
    "cub200",
    "fgvc_aircraft",
    "fgvc_fungi",
    "vgg_flowers",
    "dtd",
)


def _verify_learn2learn(name: str) -> Callable[[Path], list[Finding]]:
    def verify(folder: Path) -> list[Finding]:
        from metarun.data.learn2learn import expected_files_text, missing_files

        missing = missing_files(name, folder)
        if missing:
            return [
                (ERROR, f"missing {', '.join(missing)}"),
                (ERROR, f"expected {expected_files_text(name, folder)}"),
            ]
        return [
            (OK, f"the files learn2learn reads are present in {folder}"),
            (OK, "no checksums known for these files; `prepare` checks class counts"),
        ]

    return verify


VERIFIERS: dict[str, Callable[[Path], list[Finding]]] = {
    "omniglot": verify_omniglot,
    "miniimagenet": verify_miniimagenet,
    "mnist": verify_mnist,
    **{n: _verify_learn2learn(n) for n in L2L_DATASETS},
}


# --- commands -------------------------------------------------------------------------------


def cmd_list(data: Path, cache: Path) -> int:
    from metarun.data.learn2learn import SPECS, learn2learn_version

    version = learn2learn_version()
    print(f"data folder:  {data}")
    print(f"cache folder: {cache}")
    print(f"learn2learn:  {version or 'not installed (needed by ' + ', '.join(SPECS) + ')'}")
    print(f"\n{'dataset':<16} {'status':<10} {'data':>10} {'cache':>10}  where")
    for name in dataset_names():
        folder, cached = data / name, cache / name
        if required := _required_keys(name):  # folder, tensors: the user's own files
            where = " ".join(f"dataset.{key}=..." for key in required)
            print(f"{name:<16} {'yours':<10} {'-':>10} {'-':>10}  ({where})")
            continue
        if not _reads_files(name):
            print(f"{name:<16} {'generated':<10} {'-':>10} {'-':>10}  (no files)")
            continue
        if name in VERIFIERS and folder.exists():
            levels = {level for level, _ in VERIFIERS[name](folder)}
            status = "incomplete" if ERROR in levels else "present"
        else:
            status = "present" if folder.exists() else "absent"
        size = _human(_size(folder)) if folder.exists() else "-"
        cache_size = _human(_size(cached)) if cached.exists() else "-"
        print(f"{name:<16} {status:<10} {size:>10} {cache_size:>10}  {folder}")
    return 0


def cmd_verify(name: str, data: Path) -> int:
    if name not in VERIFIERS:
        print(
            f"metarun-data: no verifier for {name!r}; verifiable: {', '.join(VERIFIERS)}. "
            f"`metarun-data prepare {name}` loads it and reports problems.",
            file=sys.stderr,
        )
        return 2
    findings = VERIFIERS[name](data / name)
    for level, message in findings:
        print(f"[{level:>5}] {message}")
    bad = sum(level == ERROR for level, _ in findings)
    print(f"{name}: {'FAILED, ' + str(bad) + ' problem(s)' if bad else 'ok'} ({data / name})")
    return 1 if bad else 0


def cmd_prepare(name: str, overrides: list[str], data: Path, cache: Path) -> int:
    """Composes the real config with ``dataset=<name>``, builds every split (downloading
    when the dataset's config allows) and reports the classes and the time taken."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from metarun.config import register_configs
    from metarun.data.files import DataError

    register_configs()
    base = [f"dataset={name}", f"data_dir={data}", f"cache_dir={cache}"]
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*base, *overrides])
    tic = time.perf_counter()
    try:
        dataset = instantiate(cfg.dataset)
        pools = {split: dataset.pool(split) for split in ("train", "val", "test")}
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, (DataError, ValueError)) else err
        if not isinstance(cause, (DataError, ValueError)):
            raise
        print(f"metarun-data: {name}: {cause}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - tic
    for split, pool in pools.items():
        print(f"{split:<5} {pool.n_classes:>4} classes {int(pool.counts.sum()):>7} images")
    print(
        f"{name}: ready in {seconds:.1f} s, images {tuple(dataset.image_shape)}, cache "
        f"{cache / name} ({_human(_size(cache / name)) if (cache / name).exists() else '-'})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``[project.scripts] metarun-data``)."""
    parser = argparse.ArgumentParser(
        prog="metarun-data", description="List, verify and prepare metarun's datasets."
    )
    parser.add_argument("--data-dir", help="data folder (default: METARUN_DATA)")
    parser.add_argument("--cache-dir", help="cache folder (default: METARUN_CACHE)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="what is available locally, where, and its size")
    verify = sub.add_parser("verify", help="check structure (and checksums where known)")
    verify.add_argument("name")
    prepare = sub.add_parser("prepare", help="download (when allowed) and build the cache")
    prepare.add_argument("name")
    prepare.add_argument("overrides", nargs="*", help="config overrides, e.g. dataset.split=...")
    args = parser.parse_args(argv)
    if getattr(args, "name", None) not in (None, *dataset_names()):
        parser.error(f"unknown dataset {args.name!r}; choose one of {', '.join(dataset_names())}")
    data, cache = _folders(args.data_dir, args.cache_dir)
    if args.command == "list":
        return cmd_list(data, cache)
    if args.command == "verify":
        return cmd_verify(args.name, data)
    return cmd_prepare(args.name, args.overrides, data, cache)


if __name__ == "__main__":
    sys.exit(main())
