"""MAML's meta-batch in one vectorised call (``algo.engine=vmap``).

The loop engine (:meth:`metarun.algorithms.MAML.meta_loss`) adapts to one task at a time.
This engine maps the same computation over the task dimension of a stacked meta-batch
with ``torch.func.vmap``: the inner gradient is ``torch.func.grad`` of the support loss,
the inner step is the algorithm's own :meth:`~metarun.algorithms.MAML.inner_update` (so
Meta-SGD's learned learning rates work too), and the meta-gradient flows back through it
by ordinary autograd (second order unless ``first_order``).

Batch normalisation: under ``vmap`` each task is normalised with its own batch statistics,
exactly as in the loop engine's training mode, but running statistics cannot be updated
in place inside a vectorised call. The engine therefore runs a copy of the network whose
batch-norm layers are :class:`BatchStatNorm` (batch statistics from plain tensor ops,
no running statistics), and accepts only the ``transductive`` batch-norm mode, where
running statistics are never used. Plain ops rather than ``F.batch_norm`` because the
latter's second derivative under ``vmap`` disagreed with the loop engine's (measured:
1% errors, and non-zero gradients for conv biases that batch norm cancels exactly).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metarun.data.episodes import Episode


class BatchStatNorm(nn.Module):
    """Batch normalisation with the statistics of the batch at hand only, over every
    dimension but the channels (dimension 1). Same parameter names as ``nn.BatchNorm*d``
    (``weight``, ``bias``), so the live parameters of the original layer apply."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps, self.affine = bn.eps, bn.affine
        if bn.affine:
            self.weight, self.bias = bn.weight, bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape) if self.affine else x


def stateless_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` with every batch-norm layer replaced by
    :class:`BatchStatNorm`. Its own parameters are never used: the engine passes the live
    ones in."""
    network = copy.deepcopy(model)
    for module in list(network.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, BatchStatNorm(child))
    return network


def vmap_meta_loss(algo: nn.Module, network: nn.Module, batch: Episode) -> tuple[torch.Tensor, ...]:
    """Mean query loss and mean metric over the tasks of ``batch``.

    Args:
        algo: a :class:`~metarun.algorithms.MAML` (or subclass using ``inner_update``).
        network: :func:`stateless_copy` of ``algo.model``.
        batch: a stacked meta-batch (:meth:`Episode.stack`): support ``(tasks, n_support,
            C, H, W)``, labels ``(tasks, n_support)``, and the same for the queries.

    Returns:
        ``(loss, metric)``, scalars; the loss is differentiable with respect to the
        algorithm's parameters.
    """
    network.train(algo.training)
    params = dict(algo.model.named_parameters())
    names = tuple(params)

    def task_loss(support_x, support_y, query_x, query_y):
        fast = params
        for step in range(algo.adaptation_steps):

            def support_loss(p):
                return algo.task.loss(functional_call(network, p, (support_x,)), support_y)

            grads = grad(support_loss)(fast)
            if algo.first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            fast = algo.inner_update(fast, tuple(grads[name] for name in names), step)
        predictions = functional_call(network, fast, (query_x,))
        return algo.task.loss(predictions, query_y), algo.task.score(predictions, query_y)

    losses, metrics = vmap(task_loss)(
        batch.support_x, batch.support_y, batch.query_x, batch.query_y
    )
    return losses.mean(), metrics.mean()
