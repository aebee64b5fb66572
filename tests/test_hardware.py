"""Hardware options: torch.compile, CUDA, mixed precision.

The CUDA tests carry the ``gpu`` mark and run wherever torch sees a CUDA device (skipped,
with that reason, on a machine without one). The compile tests use the ``eager`` backend
on a CPU (graph capture without a C++ compiler) and ``inductor`` on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from metarun.algorithms import MAML, ProtoNet
from metarun.data.episodes import Episode
from metarun.hardware import Hardware
from metarun.models import Conv4

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _episode(ways: int = 5, queries: int = 3, size: int = 28, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(ways, 1, size, size, generator=g),
        torch.arange(ways),
        torch.rand(ways * queries, 1, size, size, generator=g),
        torch.arange(ways).repeat(queries),
        torch.arange(ways),
    )


def _algo(name: str, hardware: Hardware, seed: int = 0) -> torch.nn.Module:
    """``protonet``, ``maml`` (second order) or ``fomaml`` on a 16-channel conv4."""
    torch.manual_seed(seed)
    backbone = hardware.compile_backbone(Conv4(input_shape=(1, 28, 28), hidden=16))
    if name == "protonet":
        return hardware.prepare(ProtoNet(backbone=backbone))
    algo = MAML(backbone, 5, 0.4, 1, 1, first_order=name == "fomaml")
    return hardware.prepare(algo)


def _meta_gradient(algo: torch.nn.Module, episode: Episode, hardware: Hardware):
    algo.zero_grad()
    with hardware.autocast():
        loss, _ = algo.meta_loss(episode.to(hardware.device, hardware.memory_format))
    loss.float().backward()
    return loss.detach().float().cpu(), {
        n: p.grad.detach().float().cpu() for n, p in algo.named_parameters() if p.grad is not None
    }


def _assert_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_compiled_backbone_gives_the_eager_loss_and_meta_gradient(name):
    """``hardware.compile`` with the ``eager`` backend (dynamo's graph capture, no C++
    compiler needed) changes nothing numerically, second-order MAML included, and keeps the
    checkpoint keys of the uncompiled model."""
    episode = _episode()
    plain = Hardware("cpu")
    compiled = Hardware("cpu", compile=True, compile_backend="eager")
    loss_a, grads_a = _meta_gradient(_algo(name, plain), episode, plain)
    algo_b = _algo(name, compiled)
    loss_b, grads_b = _meta_gradient(algo_b, episode, compiled)
    torch.testing.assert_close(loss_a, loss_b)
    _assert_close(grads_a, grads_b, rtol=1e-5, atol=1e-6)
    assert set(algo_b.state_dict()) == set(_algo(name, plain).state_dict())


def test_compile_refuses_second_order_maml_unless_the_backend_is_eager():
    """inductor's compiled backward has no double backward (seen on an H100: "compiled with
    non-empty donated buffers which requires create_graph=False"), so the combination is
    refused before training with the ways out; first order and ``eager`` are accepted."""
    with pytest.raises(ValueError, match="compile_backend=eager"):
        _algo("maml", Hardware("cpu", compile=True))
    _algo("fomaml", Hardware("cpu", compile=True))  # compiles lazily: no compiler needed yet
    _algo("maml", Hardware("cpu", compile=True, compile_backend="eager"))


def test_runner_records_the_compile_setting(make_cfg, one_thread, tmp_path):
    from metarun import run

    cfg = make_cfg(
        "algo=protonet", "hardware.compile=true", "hardware.compile_backend=eager", one_thread
    )
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["hardware"]["compile"] == "eager"


# --- CUDA: run wherever a CUDA device exists -------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_cuda_meta_gradient_matches_the_cpu(name):
    episode = _episode()
    cpu, cuda = Hardware("cpu"), Hardware("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    loss_a, grads_a = _meta_gradient(_algo(name, cpu), episode, cpu)
    loss_b, grads_b = _meta_gradient(_algo(name, cuda), episode, cuda)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-5)
    _assert_close(grads_a, grads_b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_cuda_autocast_meta_gradient_points_where_fp32s_does(name, amp):
    """Reduced-precision forward passes keep the loss within 2% and the whole meta-gradient
    pointing the fp32 way (cosine >= 0.85). Per-element agreement is not expected: at a
    random initialisation on random images, bf16 moves the gradient by 15-40% of its norm
    (CPU autocast: cosine 0.91-0.99, first run on an H100: a first-layer weight off by 0.25
    of its largest entry), while a broken autocast path (detached, zero or NaN gradients)
    falls far below."""
    episode = _episode()
    fp32, low = Hardware("cuda"), Hardware("cuda", amp=amp)
    loss_a, grads_a = _meta_gradient(_algo(name, fp32), episode, fp32)
    loss_b, grads_b = _meta_gradient(_algo(name, low), episode, low)
    torch.testing.assert_close(loss_b, loss_a, rtol=0.02, atol=0.0)
    a = torch.cat([g.flatten() for g in grads_a.values()])
    b = torch.cat([g.flatten() for g in grads_b.values()])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) >= 0.85


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", ["protonet", "fomaml"])
def test_cuda_inductor_compile_matches_eager(name):
    episode = _episode()
    plain = Hardware("cuda")
    compiled = Hardware("cuda", compile=True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    _, grads_a = _meta_gradient(_algo(name, plain), episode, plain)
    _, grads_b = _meta_gradient(_algo(name, compiled), episode, compiled)
    _assert_close(grads_a, grads_b, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=maml", "hardware.amp=fp16"],
        ["algo=maml", "algo.engine=vmap", "hardware.amp=bf16"],
        ["algo=protonet", "hardware.amp=bf16", "hardware.channels_last=true"],
        ["algo=protonet", "hardware.compile=true"],
    ],
    ids=lambda o: ",".join(o),
)
def test_cuda_run_end_to_end(make_cfg, tmp_path, overrides):
    """A whole run on the GPU: training, validation, checkpoint, test, results.json."""
    from metarun import run

    summary = run(make_cfg("hardware=cuda", *overrides), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["training"]["hardware"]["device"].startswith("cuda")
    assert 0.0 <= summary["test/acc"] <= 1.0
    assert (tmp_path / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, caplog, native):
    """bf16 autocast is emulated, and several times slower than fp32, on a CPU without
    AVX-512 BF16 or AMX: asking for it there is allowed but says so."""
    monkeypatch.setattr("metarun.hardware.cpu_has_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="metarun.hardware"):
        Hardware("cpu", amp="bf16")
        Hardware("cpu", amp="off")
    warned = [r for r in caplog.records if "without bf16 instructions" in r.message]
    assert len(warned) == (0 if native else 1)
    assert "hardware.amp=off" in warned[0].message if warned else True
