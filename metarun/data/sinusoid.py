"""Sinusoid regression (Finn, Abbeel & Levine, ICML 2017, section 5.1).

Each task is ``y = amplitude * sin(x - phase)`` with the amplitude drawn uniformly from
[0.1, 5.0] and the phase from [0, pi]; inputs are uniform on [-5, 5]. A task's support set
holds ``shots`` points (K in the paper) and its query set ``query_shots`` fresh points of
the same function. The family is infinite, so the splits differ only in their random
streams: train, validation and test tasks are drawn by generators seeded differently, so
validation and test tasks never repeat each other or the training tasks' stream.
"""

from __future__ import annotations

import math

import torch

from metarun.data.episodes import Episode, EpisodeError
from metarun.tasks import REGRESSION

SPLITS = ("train", "val", "test")


class Sinusoid:
    """The sinusoid task family; ``pool(split)`` gives the tasks of one split.

    Args:
        amplitude: ``[low, high]`` of the uniform amplitude.
        phase: ``[low, high]`` of the uniform phase (radians).
        x_range: ``[low, high]`` of the uniform inputs.
    """

    task = REGRESSION
    image_shape = (1,)
    """Shape of one input (the runner builds the model from it): a scalar ``x``."""

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ):
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"dataset.{name} must be [low, high] with low <= high")
        self.amplitude = (float(amplitude[0]), float(amplitude[1]))
        self.phase = (float(phase[0]), float(phase[1]))
        self.x_range = (float(x_range[0]), float(x_range[1]))

    def figures(
        self, algo: torch.nn.Module, sampler: SinusoidSampler, report_steps: list[int]
    ) -> dict[str, torch.Tensor]:
        """Images for TensorBoard: ``adapted_curves``, four test tasks, each with the true
        function, the support points, the meta-learned initialisation (0 steps) and the
        prediction after each of ``report_steps`` adaptation steps (or the algorithm's own
        number when empty), with axes and a legend (:func:`metarun.figures.sinusoid_tasks`).
        ``(3, H, W)`` uint8; none (and one warning) without matplotlib."""
        from metarun import figures

        if not figures.warn_missing():
            return {}
        device = next(algo.parameters()).device
        grid = torch.linspace(*self.x_range, 200).unsqueeze(1)
        step_counts: list[int | None] = [*report_steps] or [None]
        panels = []
        for _ in range(4):
            episode, amplitude, phase = sampler.sample_task()
            sx, sy = episode.support_x.to(device), episode.support_y.to(device)
            curves = {}
            for steps in [0, *step_counts]:
                kwargs = {} if steps is None else {"steps": steps}
                with torch.no_grad():
                    pred = algo.adapt(sx, sy, **kwargs)(grid.to(device)).float().cpu()
                name = {0: "meta-learned init (0 steps)", None: "adapted (test steps)"}.get(
                    steps, f"after {steps} step{'s' if steps != 1 else ''}"
                )
                curves[name] = pred[:, 0].tolist()
            panels.append(
                {
                    "x": grid[:, 0].tolist(),
                    "truth": (amplitude * torch.sin(grid[:, 0] - phase)).tolist(),
                    "support_x": episode.support_x[:, 0].tolist(),
                    "support_y": episode.support_y[:, 0].tolist(),
                    "curves": curves,
                    "amplitude": amplitude,
                    "phase": phase,
                }
            )
        fig = figures.sinusoid_tasks(panels, self.x_range)
        return {"adapted_curves": torch.from_numpy(figures.to_rgb(fig))}

    def pool(self, split: str) -> SinusoidTasks:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return SinusoidTasks(self, SPLITS.index(split))


class SinusoidTasks:
    """The tasks of one split: a sampler per seed, in a stream of its own."""

    n_classes = None  # regression: no classes

    def __init__(self, family: Sinusoid, split_index: int):
        self.family, self.split_index = family, split_index

    def sampler(self, ways: int, shots: int, query_shots: int, seed: int) -> SinusoidSampler:
        """Episodes of ``shots`` support and ``query_shots`` query points; ``ways`` must be 1
        (one function per task)."""
        if ways != 1:
            raise EpisodeError(
                f"sinusoid tasks are regression of one function, got ways={ways}: set "
                f"train.ways=1 and eval.ways=1 (experiment=maml_sinusoid does)."
            )
        if shots < 1 or query_shots < 1:
            raise EpisodeError(
                f"a sinusoid task needs shots and query_shots >= 1, got shots={shots}, "
                f"query_shots={query_shots}"
            )
        # Seeds of different splits never coincide: seed * 3 + split index.
        return SinusoidSampler(
            self.family, shots, query_shots, seed * len(SPLITS) + self.split_index
        )


class SinusoidSampler:
    """Draws sinusoid tasks with its own seeded ``torch.Generator``.

    Args:
        family: the task distribution.
        shots: support points per task (K).
        query_shots: query points per task.
        seed: the same seed gives the same sequence of tasks.
    """

    def __init__(self, family: Sinusoid, shots: int, query_shots: int, seed: int):
        self.family, self.shots, self.query_shots = family, shots, query_shots
        self.generator = torch.Generator().manual_seed(seed)

    def sample_task(self) -> tuple[Episode, float, float]:
        """One episode and its function's ``(amplitude, phase)``. Shapes: ``support_x``,
        ``support_y`` ``(shots, 1)``; ``query_x``, ``query_y`` ``(query_shots, 1)``;
        ``classes`` ``(1,)`` (a single "class", the function)."""
        g, f = self.generator, self.family
        amplitude = _uniform(f.amplitude, (), g).item()
        phase = _uniform(f.phase, (), g).item()
        x = _uniform(f.x_range, (self.shots + self.query_shots, 1), g)
        y = amplitude * torch.sin(x - phase)
        episode = Episode(
            support_x=x[: self.shots],
            support_y=y[: self.shots],
            query_x=x[self.shots :],
            query_y=y[self.shots :],
            classes=torch.zeros(1, dtype=torch.long),
        )
        return episode, amplitude, phase

    def sample(self) -> Episode:
        return self.sample_task()[0]

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def _uniform(
    bounds: tuple[float, float], shape: tuple[int, ...], g: torch.Generator
) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=g)
