"""Every config option composes and instantiates; mistakes fail at composition."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import ConfigKeyError, ValidationError

from metarun.config import register_configs
from metarun.continual.schemas import ALGO_SCHEMAS
from tests.conftest import CONFIGS


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def is_stream(experiment: str) -> bool:
    """A lifelong experiment: it overrides /scenario, itself or through the experiment it
    extends. Those are built and run in tests/test_continual.py."""
    text = (CONFIGS / "experiment" / f"{experiment}.yaml").read_text()
    bases = re.findall(r"^\s+- (\w+)\s*$", text, re.M)
    return "override /scenario" in text or any(is_stream(b) for b in bases)


# Continual methods: test_continual; ensemble (of trained runs, not trained): test_ensemble.
META_ALGOS = [a for a in options("algo") if a not in ALGO_SCHEMAS and a != "ensemble"]
META_EXPERIMENTS = [e for e in options("experiment") if not is_stream(e)]


def build(cfg, omniglot, input_shape=None):
    """Instantiates the config's objects the way the runner does (dataset reused)."""
    hardware = instantiate(cfg.hardware)
    backbone = instantiate(cfg.model)(input_shape=input_shape or omniglot.image_shape)
    algo = instantiate(cfg.algo)(backbone=backbone).to(hardware.device)
    return hardware, algo


@pytest.mark.parametrize("algo", META_ALGOS)
@pytest.mark.parametrize("model", options("model"))
def test_every_algo_and_model_instantiates_and_runs_an_episode(make_cfg, omniglot, algo, model):
    from metarun.data.episodes import ClassPool, EpisodeSampler

    cfg = make_cfg(f"algo={algo}", f"model={model}")
    pool = omniglot.pool("train")
    if model == "conv1d":  # a sequence model: the images read row by row, (1, 784)
        pool = ClassPool(pool.images.flatten(2), pool.class_items, pool.class_names)
    _, learner = build(cfg, omniglot, pool.image_shape)
    ep = EpisodeSampler(pool, cfg.train.ways, 1, 2, seed=0).sample().to("cpu")
    loss, acc = learner.meta_loss(ep)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 <= acc <= 1


@pytest.mark.parametrize("experiment", META_EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(make_cfg, omniglot, experiment):
    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    build(cfg, omniglot)
    # 600 test episodes as in the papers; Lake's within-alphabet proxy tests 2000 (RESULTS.md).
    within = cfg.eval.episodes == "within_alphabet"
    assert cfg.train.iterations > 0 and cfg.eval.test_episodes == (2000 if within else 600)


def test_dataset_config_instantiates(make_cfg, omniglot):
    dataset = instantiate(make_cfg().dataset)
    assert dataset.pool("val").n_classes == omniglot.pool("val").n_classes == 688


@pytest.mark.parametrize("hardware", options("hardware"))
def test_every_hardware_option(make_cfg, hardware):
    cfg = make_cfg(f"hardware={hardware}")
    if hardware == "cuda" and not torch.cuda.is_available():
        with pytest.raises(InstantiationException, match="no CUDA device"):
            instantiate(cfg.hardware)
        return
    hw = instantiate(cfg.hardware)
    assert hw.device.type in ("cpu", "cuda")


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_amp_modes_compose_and_autocast_on_cpu(make_cfg, amp):
    hw = instantiate(make_cfg("hardware=cpu", f"hardware.amp={amp}").hardware)
    with hw.autocast():
        y = torch.nn.Linear(4, 4)(torch.rand(2, 4))
    assert y.dtype == {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def test_misspelled_top_level_key_fails(make_cfg):
    with pytest.raises(ConfigCompositionException, match="iteratons"):
        make_cfg("train.iteratons=5")


def test_unknown_group_option_lists_the_choices(make_cfg):
    with pytest.raises(HydraException, match="(?s)mamll.*fomaml.*maml.*protonet"):
        make_cfg("algo=mamll")


def test_schema_rejects_a_misspelled_key_in_a_group_file(tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    text = (CONFIGS / "algo" / "maml.yaml").read_text().replace("fast_lr:", "fast_llr:")
    (tmp_path / "configs" / "algo" / "typo.yaml").write_text(text)
    register_configs()
    with initialize_config_dir(config_dir=str(tmp_path / "configs"), version_base="1.3"):
        with pytest.raises((ConfigCompositionException, ConfigKeyError), match="fast_llr"):
            compose(config_name="config", overrides=["algo=typo"])


def test_schema_rejects_wrong_types_and_enum_values(make_cfg):
    with pytest.raises((ConfigCompositionException, ValidationError), match="fast_lr"):
        make_cfg("algo.fast_lr=fast")
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        make_cfg("algo.bn_mode=sideways")
    assert "transductive, running" in str(err.value.__cause__)


def test_protonet_trains_and_tests_with_different_ways(make_cfg, omniglot):
    cfg = make_cfg("experiment=protonet_omniglot_5w1s", tiny=False)
    assert (cfg.train.ways, cfg.eval.ways) == (60, 5)
    assert cfg.algo._target_.endswith("ProtoNet")
