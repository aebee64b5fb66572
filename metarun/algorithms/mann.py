"""Memory-Augmented Neural Networks (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap,
"Meta-Learning with Memory-Augmented Neural Networks", ICML 2016).

An episode is presented as a sequence. At step ``t`` the network sees input ``x_t`` with the
one-hot label of the *previous* step, ``y_{t-1}`` (a zero vector at the first step), and
predicts ``y_t``; the loss is the cross-entropy at every step. To do better than chance on
the first presentation of a class is impossible, so what the network must learn is to bind
an input to the label that arrives one step later and to retrieve that binding when the
class comes back. An LSTM controller does this through an external memory (``memory_slots``
rows of width ``memory_width``):

- reading (content addressing): each read head emits a key ``k_t``; its read weights are a
  softmax over the cosine similarities between ``k_t`` and every memory row, and the read
  vector is the weighted sum of the rows;
- writing (least recently used access, LRUA): usage weights decay by ``usage_decay`` and
  accumulate the read and write weights, ``u_t = gamma u_{t-1} + w^r_t + w^w_t``. The least
  used rows (as many as there are heads) form ``w^lu_{t-1}``; each head writes its key with
  ``w^w_t = sigmoid(alpha) w^r_{t-1} + (1 - sigmoid(alpha)) w^lu_{t-1}``, a learned gate
  between the row it last read and a fresh row. The single least used row is erased first.
  With ``add_vector`` a head writes an add vector of its own instead of its key (as the
  Neural Turing Machine does); on frozen ProtoNet features this learned to bind images to
  labels in a CPU budget where the paper's key writes stayed at chance (docs/RESULTS.md).

Input features come from the runner's backbone (the paper feeds flattened 20x20 pixels; a
Conv4 embedding learns much faster on a small CPU budget). Support and query images of a
runner episode are the sequence's elements: with ``shots + query_shots = 10`` per class and
5 ways, a training sequence has the paper's 50 steps and 10 instances of each class.

Evaluation has two readings of one episode:

- :meth:`MANN.adapt` (the runner's accuracy): the support set is presented as a sequence,
  then every query is presented as the next step, each from the same memory state, with
  the last support label as its delayed label. In a 1-shot episode a query is the second
  instance of its class.
- :meth:`MANN.episode_metrics` (the paper's table): the whole episode, support and query
  images together, is one sequence, and accuracy is reported by instance number (the 1st,
  2nd, ... presentation of a class). :func:`metarun.evaluation.evaluate` averages them over
  the test episodes with a 95% confidence interval.

Presentation orders: in training, a random permutation from torch's global generator
(seeded with ``seed`` and checkpointed by the runner); in evaluation, a permutation from a
fresh ``torch.Generator`` seeded with ``order_seed`` (and, for the whole-episode sequence,
the episode's classes), so every evaluation of an episode sees the same sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.base import (
    BatchNormMode,
    Capabilities,
    Predictor,
    batch_norm_mode,
    buffer_copies,
    require_classification,
)
from metarun.checkpoint import load_backbone
from metarun.data.episodes import Episode
from metarun.tasks import CLASSIFICATION, TaskKind, accuracy


def delayed_labels(labels: torch.Tensor, ways: int) -> torch.Tensor:
    """The label input of each step: row ``t`` is the one-hot of ``labels[t - 1]``, row 0 is
    zero. ``(T,)`` labels -> ``(T, ways)`` floats."""
    one_hot = F.one_hot(labels, ways).float()
    return torch.cat([one_hot.new_zeros(1, ways), one_hot[:-1]])


def instance_numbers(labels: torch.Tensor) -> torch.Tensor:
    """How many times each step's class has been presented so far, this step included:
    ``(T,)`` labels -> ``(T,)`` counts starting at 1 (e.g. ``[0, 1, 0]`` -> ``[1, 1, 2]``)."""
    same = labels[:, None] == labels[None, :]  # (T, T): step j shows step i's class
    return torch.tril(same).sum(dim=1)


@dataclass
class MemoryState:
    """The recurrent state of a batch of ``B`` sequences.

    Attributes:
        h, c: ``(B, controller_size)`` LSTM state.
        memory: ``(B, memory_slots, memory_width)``.
        usage: ``(B, memory_slots)`` usage weights ``w^u``.
        read_weights: ``(B, read_heads, memory_slots)`` the last read weights ``w^r``.
        reads: ``(B, read_heads * memory_width)`` the last read vectors.
    """

    h: torch.Tensor
    c: torch.Tensor
    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    reads: torch.Tensor

    def expand(self, batch: int) -> MemoryState:
        """The same state for ``batch`` sequences (from a state of batch 1)."""
        return MemoryState(*(t.expand(batch, *t.shape[1:]) for t in vars(self).values()))


def least_used(usage: torch.Tensor, n: int) -> torch.Tensor:
    """``w^lu``: 1 at the ``n`` rows of lowest usage, 0 elsewhere. ``(B, N)`` -> ``(B, N)``.
    Ties go to the lowest row index."""
    idx = usage.argsort(dim=-1, stable=True)[..., :n]
    return torch.zeros_like(usage).scatter_(-1, idx, 1.0)


def lrua_step(
    memory: torch.Tensor,
    usage: torch.Tensor,
    read_weights: torch.Tensor,
    keys: torch.Tensor,
    write_gate: torch.Tensor,
    usage_decay: float,
    strength: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LRUA write and content-based read (Santoro et al. 2016, section 3.2).

    Args:
        memory: ``(B, N, W)`` before this step.
        usage: ``(B, N)`` usage weights of the previous step.
        read_weights: ``(B, heads, N)`` read weights of the previous step.
        keys: ``(B, heads, W)`` this step's keys (written, then used to read).
        write_gate: ``(B, heads)`` ``sigmoid(alpha)``, in [0, 1].
        usage_decay: ``gamma``.
        strength: ``(B, heads)`` key strengths ``beta >= 1`` that sharpen the read softmax
            (NTM's content addressing, Graves et al. 2014); ``None``: the paper's plain
            cosine similarities.
        values: ``(B, heads, W)`` the vectors written, apart from the keys (the NTM's add
            vectors); ``None``: the keys are written, as in the MANN paper.

    Returns:
        The new memory ``(B, N, W)``, usage ``(B, N)``, read weights ``(B, heads, N)`` and
        read vectors ``(B, heads, W)``.
    """
    heads = keys.shape[1]
    fresh = least_used(usage, heads)[:, None, :]  # (B, 1, N)
    gate = write_gate[..., None]
    write_weights = gate * read_weights + (1 - gate) * fresh  # (B, heads, N)
    erase = least_used(usage, 1)  # the least used row is zeroed before writing
    written = keys if values is None else values
    memory = memory * (1 - erase)[..., None] + torch.einsum("bhn,bhw->bnw", write_weights, written)
    similarity = F.cosine_similarity(keys[:, :, None, :], memory[:, None, :, :], dim=-1, eps=1e-8)
    if strength is not None:
        similarity = similarity * strength[..., None]
    new_read_weights = similarity.softmax(dim=-1)  # (B, heads, N)
    reads = torch.einsum("bhn,bnw->bhw", new_read_weights, memory)
    usage = usage_decay * usage + new_read_weights.sum(1) + write_weights.sum(1)
    return memory, usage, new_read_weights, reads


class MANN(nn.Module):
    """A memory-augmented network (LSTM controller, LRUA memory) on ``backbone`` features.

    Args:
        backbone: feature extractor ``(n, C, H, W) -> (n, out_features)``.
        ways: classes per episode (the label inputs and the outputs).
        controller_size: LSTM units (the paper: 200).
        memory_slots: memory rows ``N`` (the paper: 128).
        memory_width: memory row width ``W`` (the paper: 40).
        read_heads: read heads, each with its key and write gate (the paper: 4).
        usage_decay: ``gamma``, the decay of the usage weights.
        key_strength: the controller also emits a strength ``beta = 1 + softplus(.)`` per
            head that multiplies the cosine similarities before the read softmax, as in the
            Neural Turing Machine (Graves et al. 2014). Not in the MANN paper, whose softmax
            over raw cosines (in [-1, 1]) is nearly flat over many rows.
        add_vector: each head writes an add vector of its own (``tanh`` of a linear map of
            the controller state, as the NTM's add vectors) instead of its read key. Not in
            the MANN paper, whose heads write the key they read with.
        report_instances: the instance numbers :meth:`episode_metrics` reports (those that
            an episode's ``shots + query_shots`` reaches).
        order_seed: seed of the presentation order in evaluation.
        encoder_checkpoint: a checkpoint of another run (e.g. ProtoNet's ``best.pt``) whose
            backbone is loaded and frozen (run in ``bn_mode`` in training too); ``None``
            trains the backbone jointly with the controller, as the paper does its input
            layer.
        bn_mode: see :class:`BatchNormMode`; ``running`` embeds each image on its own in
            evaluation, so no later image influences an earlier step.
        task: the dataset's task kind (given by the runner); classification only.
    """

    capabilities = Capabilities(fixed_ways=True, episode_metrics=True)
    stacks_tasks = True  # the recipe hands over the meta-batch stacked: one batched run

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        controller_size: int = 200,
        memory_slots: int = 128,
        memory_width: int = 40,
        read_heads: int = 4,
        usage_decay: float = 0.95,
        key_strength: bool = False,
        add_vector: bool = False,
        report_instances: tuple[int, ...] = (1, 2, 3, 4, 5, 10),
        order_seed: int = 0,
        encoder_checkpoint: str | None = None,
        bn_mode: BatchNormMode | str = BatchNormMode.running,
        task: TaskKind = CLASSIFICATION,
    ):
        require_classification(task, "MANN predicts class labels")
        if read_heads > memory_slots:
            raise ValueError(
                f"algo.read_heads={read_heads} needs at least as many memory rows; raise "
                f"algo.memory_slots (now {memory_slots})."
            )
        super().__init__()
        self.backbone = backbone
        self.frozen_backbone = encoder_checkpoint is not None
        if encoder_checkpoint is not None:
            load_backbone(backbone, Path(encoder_checkpoint))
            backbone.requires_grad_(False)
        self.ways = ways
        self.slots, self.width, self.heads = memory_slots, memory_width, read_heads
        self.usage_decay = usage_decay
        self.report_instances = tuple(report_instances)
        self.order_seed = order_seed
        self.bn_mode = BatchNormMode(bn_mode)
        reads = read_heads * memory_width
        self.controller = nn.LSTMCell(backbone.out_features + ways + reads, controller_size)
        self.keys = nn.Linear(controller_size, reads)
        self.write_gates = nn.Linear(controller_size, read_heads)
        self.strengths = nn.Linear(controller_size, read_heads) if key_strength else None
        self.adds = nn.Linear(controller_size, reads) if add_vector else None
        self.output = nn.Linear(controller_size + reads, ways)

    def initial_state(self, batch: int, like: torch.Tensor) -> MemoryState:
        """Empty memory (a small constant, so cosine similarities are defined), zero usage."""
        z = like.new_zeros
        return MemoryState(
            h=z(batch, self.controller.hidden_size),
            c=z(batch, self.controller.hidden_size),
            memory=like.new_full((batch, self.slots, self.width), 1e-6),
            usage=z(batch, self.slots),
            read_weights=z(batch, self.heads, self.slots),
            reads=z(batch, self.heads * self.width),
        )

    def step(
        self, features: torch.Tensor, prev_label: torch.Tensor, state: MemoryState
    ) -> tuple[torch.Tensor, MemoryState]:
        """One time step: ``(B, d)`` features and ``(B, ways)`` delayed labels -> logits
        ``(B, ways)`` and the next state."""
        inputs = torch.cat([features, prev_label, state.reads], dim=1)
        h, c = self.controller(inputs, (state.h, state.c))
        keys = torch.tanh(self.keys(h)).view(-1, self.heads, self.width)
        gate = torch.sigmoid(self.write_gates(h))
        strength = None if self.strengths is None else 1 + F.softplus(self.strengths(h))
        adds = None if self.adds is None else torch.tanh(self.adds(h)).view_as(keys)
        memory, usage, read_weights, reads = lrua_step(
            state.memory,
            state.usage,
            state.read_weights,
            keys,
            gate,
            self.usage_decay,
            strength,
            adds,
        )
        reads = reads.flatten(1)
        logits = self.output(torch.cat([h, reads], dim=1))
        return logits, MemoryState(h, c, memory, usage, read_weights, reads)

    def run(
        self, features: torch.Tensor, labels: torch.Tensor, state: MemoryState | None = None
    ) -> tuple[torch.Tensor, MemoryState]:
        """Presents one sequence, ``(T, d)`` features and ``(T,)`` labels (fed one step
        late), or ``B`` sequences side by side, ``(B, T, d)`` and ``(B, T)``, each with its
        own memory -> logits ``(T, ways)`` or ``(B, T, ways)`` (the prediction of each
        step's label) and the state."""
        single = labels.dim() == 1
        if single:
            features, labels = features[None], labels[None]
        if state is None:
            state = self.initial_state(labels.shape[0], features)
        prev = torch.stack([delayed_labels(y, self.ways) for y in labels])  # (B, T, ways)
        logits = []
        for t in range(labels.shape[1]):
            out, state = self.step(features[:, t], prev[:, t], state)
            logits.append(out)
        logits = torch.stack(logits, dim=1)  # (B, T, ways)
        return (logits[0] if single else logits), state

    def _check(self, ways: int) -> None:
        if ways != self.ways:
            raise ValueError(
                f"MANN was built for {self.ways}-way episodes (algo.ways) and got a {ways}-way "
                f"one; set train.ways and eval.ways to the same value."
            )

    def meta_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and accuracy over every step of each episode presented as one
        sequence (support and query images, each sequence in its own random order). Takes
        one episode or a stacked meta-batch (:meth:`Episode.stack`), whose sequences run
        side by side, each with its own memory."""
        self._check(episode.ways)
        stacked = episode.classes.dim() == 2
        x = torch.cat([episode.support_x, episode.query_x], dim=int(stacked))
        y = torch.cat([episode.support_y, episode.query_y], dim=int(stacked))
        if not stacked:
            x, y = x[None], y[None]
        tasks, steps = y.shape
        order = torch.rand(tasks, steps).argsort(dim=1).to(y.device)  # (tasks, steps)
        x = x[torch.arange(tasks, device=y.device)[:, None], order]
        y = y.gather(1, order)
        if self.frozen_backbone:  # fixed features, embedded as in evaluation
            with torch.no_grad():
                features = self._embedder()(x.flatten(0, 1))
        else:
            features = self.backbone(x.flatten(0, 1))
        features = features.view(tasks, steps, -1)
        logits, _ = self.run(features, y)
        logits, y = logits.flatten(0, 1), y.flatten()
        return F.cross_entropy(logits, y), accuracy(logits, y)

    def _eval_order(self, n: int, device: torch.device, salt: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.order_seed + salt)
        return torch.randperm(n, generator=generator).to(device)

    def sequence_order(self, episode: Episode) -> torch.Tensor:
        """The evaluation order of the whole episode (support then query images, ``(n,)``
        indices): seeded by ``order_seed`` and the episode's classes, so it is fixed for a
        fixed episode and differs between episodes (a fixed order would put the same label
        at the same step of every episode and bias the accuracy by instance number)."""
        n = episode.support_y.shape[0] + episode.query_y.shape[0]
        salt = hash(tuple(episode.classes.tolist())) % 2**31  # ints hash the same every run
        return self._eval_order(n, episode.support_y.device, salt)

    def _embedder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Embeds images in the evaluation BatchNorm mode, leaving the running statistics
        of the backbone untouched."""
        buffers = buffer_copies(self.backbone)

        def embed(x: torch.Tensor) -> torch.Tensor:
            with batch_norm_mode(self.backbone, self.bn_mode):
                return torch.func.functional_call(self.backbone, buffers, (x,))

        return embed

    @torch.no_grad()
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Presents the support set ``(n_support, C, H, W)`` as a sequence; the predictor
        presents each query ``(n_query, C, H, W)`` as the next step from the same state and
        returns logits ``(n_query, ways)``."""
        self._check(int(support_y.max()) + 1)
        embed = self._embedder()
        order = self._eval_order(support_y.shape[0], support_y.device)
        labels = support_y[order]
        _, state = self.run(embed(support_x[order]), labels)
        last_label = F.one_hot(labels[-1], self.ways).float()

        @torch.no_grad()
        def predict(query_x: torch.Tensor) -> torch.Tensor:
            n = query_x.shape[0]
            logits, _ = self.step(embed(query_x), last_label.expand(n, -1), state.expand(n))
            return logits

        return predict

    @torch.no_grad()
    def episode_metrics(self, episode: Episode) -> dict[str, float]:
        """Accuracy by instance number on the episode presented as one sequence (support and
        query images in the evaluation order): ``{"acc_instance_k": fraction of the steps
        showing the k-th instance of their class that were classified correctly}`` for each
        ``k`` in ``report_instances`` that the episode reaches."""
        self._check(episode.ways)
        x = torch.cat([episode.support_x, episode.query_x])
        y = torch.cat([episode.support_y, episode.query_y])
        order = self.sequence_order(episode)
        x, y = x[order], y[order]
        logits, _ = self.run(self._embedder()(x), y)
        correct = (logits.argmax(dim=1) == y).float()
        instance = instance_numbers(y)
        return {
            f"acc_instance_{k}": correct[instance == k].mean().item()
            for k in self.report_instances
            if bool((instance == k).any())
        }
