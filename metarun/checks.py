"""Every option checked before any data is loaded.

:func:`check_config` reads the schemas of :mod:`metarun.config`: every key of the composed
config must be a field of its node's schema (so ``+train.iteratons=5`` fails like
``train.iteratons=5``), and every value must lie in the range its field declares
(:mod:`metarun.options`). :func:`check_meta_learning` and :func:`check_continual`
then hold the chosen algorithm's declared capabilities (``capabilities`` on its class:
:class:`metarun.algorithms.base.Capabilities`, :class:`metarun.continual.methods.
StreamCapabilities`) against the options that use them. A refusal is a
:class:`~metarun.errors.ConfigError` naming the key and the fix, raised in seconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from metarun.config import SCHEMAS, EvalConfig, RunConfig, TrainConfig
from metarun.errors import CheckpointError, ConfigError
from metarun.tasks import CLASSIFICATION, TaskKind

log = logging.getLogger("metarun")

HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def _opt(node: Any, key: str, default: Any = None) -> Any:
    """``node.key`` if the node has that key, else ``default`` (structured configs refuse
    ``get`` of a key their schema lacks)."""
    if isinstance(node, DictConfig) and key in node:
        return node[key]
    return default


GROUPS = ("algo", "dataset", "model", "hardware", "scenario")


def _schemas_by_target() -> dict[str, type]:
    by_target: dict[str, type] = {}
    for nodes in SCHEMAS.values():
        for schema in nodes.values():
            target = getattr(schema, "_target_", None)
            if isinstance(target, str):
                by_target.setdefault(target, schema)
    return by_target


def check_config(cfg: DictConfig) -> None:
    """Unknown keys and out-of-range values, anywhere in ``cfg``.

    Raises:
        ConfigError: naming the first offending key.
    """
    _check_node(cfg, RunConfig, "")
    _check_node(cfg.train, TrainConfig, "train.")
    _check_node(cfg.eval, EvalConfig, "eval.")
    by_target = _schemas_by_target()
    for group in GROUPS:
        node = cfg.get(group)
        if isinstance(node, DictConfig) and node.get("_target_") in by_target:
            _check_node(node, by_target[node._target_], f"{group}.")
    from metarun.loggers import check_loggers

    for name, node in (cfg.get("logger") or {}).items():
        if isinstance(node, DictConfig) and node.get("_target_") in by_target:
            _check_node(node, by_target[node._target_], f"logger.{name}.")
    check_loggers(cfg.get("logger"))
    e = cfg.eval
    if e.val_every > 0 and e.val_episodes < 1:
        raise ConfigError(
            f"eval.val_episodes={e.val_episodes} with eval.val_every={e.val_every}: "
            f"validation needs at least one episode. Set eval.val_episodes to 1 or more "
            f"(100 by default), or eval.val_every=0 to train without validation."
        )
    data_dir = Path(cfg.data_dir).expanduser() if cfg.get("data_dir") else None
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(
            f"data_dir={cfg.data_dir} is a file; it must be the data folder (the one with "
            f"omniglot/, miniimagenet/, mnist/ inside), or unset to use ~/.cache/metarun/data."
        )


def _check_node(node: DictConfig, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        key = str(key)
        if key in fields or key in HYDRA_KEYS:
            continue
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" Did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(
            f"unknown option {prefix}{key}: {schema.__name__} has no such key.{hint} "
            f"(`+{prefix}{key}=...` does not add options either; the valid keys are "
            f"{', '.join(sorted(k for k in fields if not k.startswith('_')))}.)"
        )
    for name, f in fields.items():
        if not f.metadata or name not in node:
            continue
        if OmegaConf.is_missing(node, name) or node[name] is None:
            continue
        value = node[name]
        if isinstance(value, (list, tuple, ListConfig)):
            for v in value:
                _check_value(f"{prefix}{name}={list(value)}: {v}", v, f.metadata)
        else:
            _check_value(f"{prefix}{name}={value}", value, f.metadata)


def _check_value(what: str, v: Any, rule: dict) -> None:
    """``what`` shows the key and value (``train.ways=-1``, or the list and the item)."""
    if "choices" in rule:
        if v not in rule["choices"]:
            raise ConfigError(
                f"{what} is not an option: choose one of {', '.join(rule['choices'])}."
            )
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return  # OmegaConf already enforced the type
    low, high, gt = rule.get("min"), rule.get("max"), rule.get("gt")
    wrong = (
        (low is not None and v < low)
        or (gt is not None and v <= gt)
        or (high is not None and (v >= high if rule.get("below_max") else v > high))
    )
    if not wrong:
        return
    if gt is not None:
        want = f"> {gt}"
    elif high is not None:
        want = f"in [{low}, {high}{')' if rule.get('below_max') else ']'}"
    else:
        want = f">= {low}"
    raise ConfigError(f"{what} is out of range: it must be {want}.")


# --- which class a config node builds, without building it -------------------------------


def target_class(node: DictConfig) -> Any:
    """The class or function ``node._target_`` names (imports its module, builds nothing)."""
    return get_object(node._target_)


def task_of_dataset(dataset: DictConfig) -> TaskKind:
    """The task kind a dataset declares on its class (``task``; classification if none)."""
    return getattr(target_class(dataset), "task", CLASSIFICATION)


# --- meta-learning ----------------------------------------------------------------------


def check_meta_learning(cfg: DictConfig) -> None:
    """Everything a meta-learning run asks for, held against the algorithm's declared
    capabilities (and the hardware), before any data is loaded.

    Raises:
        ConfigError: an unsupported option or combination, named with its fix.
    """
    check_config(cfg)
    algo_cls = target_class(cfg.algo)
    caps = getattr(algo_cls, "capabilities", None)
    name = algo_cls.__name__
    task = task_of_dataset(cfg.dataset)
    _check_iterations(cfg.train, name, caps)
    if caps is not None:
        _check_capabilities(cfg, name, caps, task)
    _check_episode_kinds(cfg)
    _check_hardware(cfg.hardware, name, _second_order_through_backbone(cfg.algo, caps))
    _check_encoder_checkpoint(cfg)
    if "members" in cfg.algo.keys():  # algo=ensemble: its trained runs exist and match its data
        _check_members(cfg.algo)


def _check_capabilities(cfg: DictConfig, name: str, caps: Any, task: TaskKind) -> None:
    a, t, e = cfg.algo, cfg.train, cfg.eval
    if task.name not in caps.task_kinds:
        raise ConfigError(
            f"algo={name} does not do {task.name} ({', '.join(caps.task_kinds)} only), and "
            f"the dataset's tasks are {task.name}. Use an algorithm that does, such as "
            f"algo=maml, or another dataset."
        )
    bn_mode = str(getattr(_opt(a, "bn_mode"), "value", _opt(a, "bn_mode")))
    if _opt(a, "bn_mode") is not None and bn_mode not in caps.bn_modes:
        raise ConfigError(
            f"algo.bn_mode={bn_mode} is not supported by {name}: choose "
            f"{' or '.join(caps.bn_modes)}."
        )
    engine = _opt(a, "engine", "loop")
    if engine not in caps.engines:
        raise ConfigError(
            f"algo.engine={engine} is not supported by {name}: choose {' or '.join(caps.engines)}."
        )
    for key, value in caps.engine_requires.get(engine, {}).items():
        got = str(getattr(_opt(a, key), "value", _opt(a, key)))
        if got != value:
            raise ConfigError(
                f"algo.engine={engine} needs algo.{key}={value} (got {got}); use "
                f"algo.engine=loop for {key}={got}."
            )
    if engine == "l2l" and importlib.util.find_spec("learn2learn") is None:
        from metarun.data.learn2learn import INSTALL_HINT

        raise ConfigError(
            f"algo.engine=l2l needs learn2learn, which is not installed: {INSTALL_HINT}"
        )
    if list(e.report_steps) and not caps.adaptation_steps:
        raise ConfigError(
            f"eval.report_steps={list(e.report_steps)}: {name} does not adapt by gradient steps, "
            f"so it has no step count to vary. Drop eval.report_steps (set it to []) for this "
            f"algorithm; it is for gradient-based ones (maml, metasgd, anil, ...)."
        )
    if caps.fixed_ways and task.outputs is None:
        ways = _opt(a, "ways", t.ways)
        if not t.ways == e.ways == ways:
            raise ConfigError(
                f"{name} has a {ways}-way output (algo.ways), so train.ways ({t.ways}) and "
                f"eval.ways ({e.ways}) must both be {ways}: set them equal."
            )
    if caps.fixed_shots:
        shots = _opt(a, "shots", t.shots)
        if not t.shots == e.shots == shots:
            raise ConfigError(
                f"{name}'s sequences are sized for {shots} shots (algo.shots), so train.shots "
                f"({t.shots}) and eval.shots ({e.shots}) must both be {shots}: set them equal."
            )
    if _opt(cfg.model, "flatten", True) is False and not caps.feature_maps:
        raise ConfigError(
            f"model.flatten=false keeps feature maps, which only algo=relation takes; {name} "
            f"needs flat features: set model.flatten=true."
        )


def _check_iterations(t: DictConfig, name: str, caps: Any) -> None:
    """``train.iterations >= 1`` for an algorithm that is trained, ``0`` for one that is not
    (``Capabilities.trainable``: ``algo=ensemble``)."""
    if caps is None or caps.trainable:
        if t.iterations < 1:
            raise ConfigError(
                f"train.iterations={t.iterations} is out of range for {name}: it must be "
                f">= 1. Only an algorithm with nothing to train (algo=ensemble) runs with "
                f"train.iterations=0."
            )
    elif t.iterations != 0:
        raise ConfigError(
            f"train.iterations={t.iterations}: {name} has nothing to train (it is built from "
            f"trained runs), so it runs with train.iterations=0 only (validated once, then "
            f"tested). Set train.iterations=0."
        )


def _check_episode_kinds(cfg: DictConfig) -> None:
    """``train.episodes``, ``eval.episodes``, ``train.augment`` and ``eval.test_views``
    against what the dataset declares on its class (``episode_kinds``, ``augmentations``;
    ``standard`` and ``none`` for a dataset that declares none)."""
    dataset_cls = target_class(cfg.dataset)
    name = dataset_cls.__name__
    kinds = getattr(dataset_cls, "episode_kinds", ("standard",))
    augments = getattr(dataset_cls, "augmentations", ("none",))
    for key, offered in (
        ("train.episodes", kinds),
        ("eval.episodes", kinds),
        ("train.augment", augments),
    ):
        value = OmegaConf.select(cfg, key, default=None)
        value = str(getattr(value, "value", value))
        if value != "None" and value not in offered:
            raise ConfigError(
                f"{key}={value} is not offered by {name} (it offers {', '.join(offered)}): "
                f"{NEEDS.get(value, 'it is not declared')}. Set {key}={offered[0]}, or use "
                f"dataset=omniglot."
            )
    views = cfg.eval.get("test_views", 0)
    if views and "affine" not in augments:
        raise ConfigError(
            f"eval.test_views={views} is not offered by {name}: the test-time views are "
            f"affine distortions, and {NEEDS['affine']}. Set eval.test_views=0, or use "
            f"dataset=omniglot."
        )


NEEDS = {  # why a dataset may not offer an episode kind or augmentation
    "within_alphabet": "within-alphabet episodes need the alphabet of each class and the "
    "drawer of each image, which Omniglot records",
    "affine": "the affine distortions are made for Omniglot's strokes on a blank background",
}


# model settings that do not change what a trained backbone computes
TRAINING_ONLY_MODEL_KEYS = ("_partial_", "bn_momentum", "init", "init_std")


def _check_encoder_checkpoint(cfg: DictConfig) -> None:
    """``algo.encoder_checkpoint``: a readable metarun checkpoint written with this run's
    model settings. Settings without weights (conv4's ``pool_blocks``, ``flatten``) would
    load without an error and compute other features, so the saved ``model`` is compared."""
    path = _opt(cfg.algo, "encoder_checkpoint")
    if not path:
        return
    from metarun.checkpoint import load, saved_config

    if not Path(path).expanduser().is_file():
        raise ConfigError(
            f"algo.encoder_checkpoint={path}: no such file. Give the best.pt (or last.pt) of "
            f"a run whose backbone this one should use, or null to train the backbone here."
        )
    try:
        saved = saved_config(load(Path(path).expanduser()), path)
    except CheckpointError as err:
        raise ConfigError(f"algo.encoder_checkpoint: {err}") from None
    if "model" not in saved:
        return
    theirs = OmegaConf.to_container(saved.model, resolve=True)
    ours = OmegaConf.to_container(cfg.model, resolve=True)
    differ = sorted(
        k
        for k in set(theirs) | set(ours)
        if k not in TRAINING_ONLY_MODEL_KEYS and theirs.get(k) != ours.get(k)
    )
    if differ:
        written = ", ".join(f"model.{k}={theirs.get(k)!r}" for k in differ)
        here = ", ".join(f"model.{k}={ours.get(k)!r}" for k in differ)
        fix = (
            "that run's model= and settings"
            if "_target_" in differ
            else " ".join(f"model.{k}={theirs.get(k)}" for k in differ)
        )
        raise ConfigError(
            f"algo.encoder_checkpoint={path} was written by a run with {written}; this run "
            f"has {here}. Its weights would compute other features here: use {fix}."
        )


def _check_members(a: DictConfig) -> None:
    """The trained runs of ``algo=ensemble``: at least two, each with a checkpoint whose
    config is metarun's own, trained on the ensemble's split and image size."""
    from metarun.algorithms.ensemble import read_members

    if OmegaConf.is_missing(a, "members"):
        raise ConfigError(
            "algo.members is not set: list the trained runs to ensemble, e.g. "
            "'algo.members=[RUN1,RUN2]' (run folders or checkpoint files)."
        )
    try:
        read_members(list(a.members), a.split, a.image_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"algo.members: {err}") from None


def _second_order_through_backbone(algo: DictConfig, caps: Any) -> bool:
    """Whether the algorithm differentiates through gradients taken in the backbone."""
    return bool(caps is not None and caps.inner_loop_through_backbone) and (
        _opt(algo, "first_order") is False
    )


def _check_hardware(hardware: DictConfig, name: str, second_order: bool) -> None:
    amp = str(getattr(hardware.amp, "value", hardware.amp))
    backend = _opt(hardware, "compile_backend", "inductor")
    if _opt(hardware, "compile") and second_order and backend != "eager":
        raise ConfigError(
            f"hardware.compile=true with compile_backend={backend} cannot run second-order "
            f"{name}: torch.compile's compiled backward has no double backward. Use "
            f"algo.first_order=true, hardware.compile_backend=eager, or hardware.compile=false."
        )
    if amp == "fp16" and _device_type(hardware.device) == "cpu":
        log.warning(
            "hardware.amp=fp16 on a CPU: float16 is emulated there and loss scaling guards "
            "against underflow that a CPU run does not need; hardware.amp=bf16 is the CPU's "
            "reduced precision (fast with AVX-512 BF16 or AMX), or hardware.amp=off."
        )


def _device_type(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device).split(":")[0]


# --- continual streams ------------------------------------------------------------------


def check_continual(cfg: DictConfig) -> None:
    """Everything a task stream asks for, held against the method's declared capabilities
    and the scenario's declarations, before any data is loaded.

    Raises:
        ConfigError: an unsupported option or combination, named with its fix.
    """
    check_config(cfg)
    method_cls = target_class(cfg.algo)
    scenario_fn = target_class(cfg.scenario)
    caps = getattr(method_cls, "capabilities", None)
    name = method_cls.__name__
    task: TaskKind = getattr(scenario_fn, "task", CLASSIFICATION)
    scenario = cfg.scenario._target_.rsplit(".", 1)[-1]
    if caps is not None:
        if task.name not in caps.task_kinds:
            raise ConfigError(
                f"algo={name} does not learn {task.name} streams, and scenario={scenario} is "
                f"one. Use another method."
            )
        if caps.needs_meta_training and not _has_meta_training(cfg.scenario, scenario_fn):
            raise ConfigError(
                f"algo={name} meta-trains on classes (or functions) held out of the stream, "
                f"and scenario={scenario} has none: use scenario=omniglot_continual (or "
                f"sinusoid_stream with scenario.meta_functions > 0), or a method without a "
                f"meta-training phase (naive, joint, er, ewc, lamaml)."
            )
    single = (
        (caps is not None and caps.single_example_steps)
        or _opt(cfg.scenario, "batch_size") == 1
        or _opt(cfg.algo, "inner_batch_size") == 1
    )
    if single and _opt(cfg.model, "batch_norm"):
        raise ConfigError(
            f"model.batch_norm=true with single-example steps (algo={name}, "
            f"scenario.batch_size={_opt(cfg.scenario, 'batch_size')}): batch normalisation "
            f"needs more than one example per step. Set model.batch_norm=false."
        )
    amp = str(getattr(cfg.hardware.amp, "value", cfg.hardware.amp))
    if amp == "fp16":
        raise ConfigError(
            "hardware.amp=fp16 is not supported for task streams: the continual methods take "
            "their own optimiser steps, without loss scaling. Use hardware.amp=bf16 or off."
        )
    second_order = bool(caps is not None and caps.inner_loop_through_backbone) and (
        _opt(cfg.algo, "first_order") is False
    )
    _check_hardware(cfg.hardware, name, second_order)
    _check_encoder_checkpoint(cfg)


def _has_meta_training(scenario: DictConfig, fn: Any) -> bool:
    """What the scenario's builder declares (``meta_training``): ``True``/``False``, or
    the name of its option whose positive value gives a meta-training set."""
    declared = getattr(fn, "meta_training", False)
    if isinstance(declared, str):
        return bool(_opt(scenario, declared))
    return bool(declared)
