"""ANML (Beaulieu et al., ECAI 2020, "Learning to Continually Learn"), as the authors' code
and Numenta's replication run it (github.com/uvm-neurobotics-lab/ANML; numenta/nupic.research
``projects/meta_cl``; compared step by step in docs/LIFELONG.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarun.continual.methods.base import (
    MetaLog,
    StreamCapabilities,
    pool_images,
    require_meta_training,
)
from metarun.continual.methods.online_head import OnlineHead
from metarun.data.episodes import ClassPool
from metarun.models.convnet import ConvNet
from metarun.tasks import CLASSIFICATION, TaskKind


class ANML(OnlineHead):
    """A neuromodulated meta-learning algorithm: a neuromodulatory network (NM) gates the
    prediction network (PLN): ``head(pln(x) * sigmoid(nm(x)))``, elementwise on the PLN's
    features; the NM network is meta-learned to protect what the PLN learns.

    A meta-training step:

    1. draw one meta-training class and draw its head row afresh (Kaiming-normal, bias kept);
    2. inner loop: its first ``trajectory_shots`` drawings (shuffled), one SGD step of
       ``fast_lr`` per image on the whole PLN (the backbone and the head), the NM network
       fixed;
    3. meta-loss: the cross-entropy, over all head outputs, of the adapted network on
       ``remember_size`` images drawn from all meta-training classes and the class's
       trajectory drawings again; Adam at ``meta_lr`` on the NM network and the PLN's
       initial weights. ``first_order`` (the authors' code) treats the inner gradients as
       constants; Numenta's replication is second order.

    In the stream only the head learns (the setting of the anchors in issue 18, Numenta's
    ``test_train_params``), drawn afresh, Adam at ``lr``.

    Args:
        backbone: the PLN's convolutional part (``model=convnet``, per-image normalisation
            as ANML's networks: ``model.norm=instance``).
        nm_channels, nm_pools, nm_norm: the NM network's convolutions (ANML: 112 channels
            x 3, pooling after the first two, per-image normalisation); a linear layer maps
            its features to one gate per PLN feature.
        lr: the continual-phase learning rate of the head.
        fast_lr, meta_lr, meta_iterations, trajectory_shots, remember_size, first_order,
        meta_max_minutes, stream_optimizer, stream_outputs: as above.
    """

    capabilities = StreamCapabilities(
        task_kinds=("classification",),
        needs_meta_training=True,
        frozen_embedding=True,
        inner_loop_through_backbone=True,
    )

    def __init__(
        self,
        backbone: nn.Module,
        n_classes: int,
        input_shape: tuple[int, ...],
        seed: int,
        lr: float = 1e-3,
        fast_lr: float = 0.1,
        meta_lr: float = 1e-3,
        meta_iterations: int = 20000,
        trajectory_shots: int = 20,
        remember_size: int = 64,
        nm_channels: tuple[int, ...] = (112, 112, 112),
        nm_pools: tuple[bool, ...] = (True, True, False),
        nm_norm: str = "instance",
        first_order: bool = True,
        meta_max_minutes: float | None = None,
        stream_optimizer: str = "adam",
        stream_outputs: str = "all",
        task: TaskKind = CLASSIFICATION,
    ):
        nm = ConvNet(input_shape, nm_channels, pools=nm_pools, norm=nm_norm, init="kaiming_normal")
        gate = nn.Linear(nm.out_features, backbone.out_features)
        nn.init.kaiming_normal_(gate.weight, nonlinearity="relu")
        nn.init.zeros_(gate.bias)
        super().__init__(
            backbone, n_classes, input_shape, seed, lr, meta_lr, stream_optimizer,
            stream_outputs, task,
        )  # fmt: skip
        self.neuromodulation = nn.Sequential(nm, gate, nn.Sigmoid())
        self.optimizer = self.make_optimizer()  # now with the NM network's parameters
        self.fast_lr, self.first_order = fast_lr, first_order
        self.meta_iterations, self.meta_max_minutes = meta_iterations, meta_max_minutes
        self.trajectory_shots, self.remember_size = trajectory_shots, remember_size

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The gated PLN features the head reads, ``(n, d)``."""
        self.eval()
        return self.backbone(x) * self.neuromodulation(x)

    def pretrain(self, pool: ClassPool | None, iteration: int, log: MetaLog) -> int:
        require_meta_training(pool, "ANML")
        if pool.n_classes > self.head.out_features:
            raise ValueError(
                f"ANML needs a head row per meta-training class ({pool.n_classes}; the head "
                f"has {self.head.out_features})"
            )
        self.train()
        names = [n for n, _ in self.named_parameters() if n.startswith(("backbone.", "head."))]
        labels_of = _labels_of(pool)
        for it in range(iteration, self.meta_iterations):
            with self.autocast():
                meta_loss, metric = self._step_on(pool, names, labels_of)
            self._step(meta_loss, "meta-training")
            if log(it + 1, meta_loss.item(), metric):
                return it + 1
        return self.meta_iterations

    def _step_on(
        self, pool: ClassPool, names: list[str], labels_of: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        g = self.generator
        c = int(torch.randint(pool.n_classes, (), generator=g))
        items = pool.class_items[c][: int(pool.counts[c])]
        items = items[torch.randperm(items.numel(), generator=g)][: self.trajectory_shots]
        device = self.head.weight.device
        with torch.no_grad():  # the class's row, drawn afresh on the slow weights
            nn.init.kaiming_normal_(self.head.weight[c : c + 1], nonlinearity="relu")
        traj = pool_images(pool, items, self)
        label = torch.tensor([c], device=device)
        gates = self.neuromodulation(traj)
        if self.first_order:
            gates = gates.detach()
        params = dict(self.named_parameters())
        fast = {n: params[n] for n in names}
        for k in range(traj.shape[0]):
            out = self._pln(fast, traj[k : k + 1], gates[k : k + 1])
            loss = F.cross_entropy(out, label)
            grads = torch.autograd.grad(
                loss, list(fast.values()), create_graph=not self.first_order
            )
            fast = {
                n: p - self.fast_lr * gr for (n, p), gr in zip(fast.items(), grads, strict=True)
            }
        remember = torch.randint(pool.images.shape[0], (self.remember_size,), generator=g)
        meta_x = torch.cat([pool_images(pool, remember, self), traj])
        meta_y = torch.cat([labels_of[remember].to(device), label.expand(traj.shape[0])])
        logits = self._pln(fast, meta_x, self.neuromodulation(meta_x))
        meta_loss = F.cross_entropy(logits, meta_y)
        acc = (logits[-traj.shape[0] :].argmax(1) == label).float().mean().item()
        return meta_loss, acc

    def _pln(self, fast: dict, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The PLN with the weights ``fast`` (names under ``backbone.`` and ``head.``)."""
        body = {n[len("backbone.") :]: p for n, p in fast.items() if n.startswith("backbone.")}
        feats = functional_call(self.backbone, body, (x,))
        return F.linear(feats * gates, fast["head.weight"], fast["head.bias"])


def _labels_of(pool: ClassPool) -> torch.Tensor:
    """The class of every image of ``pool`` (``-1`` for padding slots)."""
    labels = torch.full((pool.images.shape[0],), -1, dtype=torch.long)
    for c in range(pool.n_classes):
        labels[pool.class_items[c][: int(pool.counts[c])]] = c
    return labels
