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
        """Images for TensorBoard: ``adapted_curves``, a 2x2 grid of test tasks, each with
        the true function (thick grey), the support points (black), the meta-learned
        initialisation (thin blue) and the prediction after each of ``report_steps``
        adaptation steps (or the algorithm's own number when empty). ``(3, H, W)`` uint8."""
        from PIL import Image, ImageDraw  # only when a run ends

        panel_w, panel_h, tasks = 360, 240, 4
        device = next(algo.parameters()).device
        grid = torch.linspace(*self.x_range, panel_w).unsqueeze(1)
        y_max = max(abs(a) for a in self.amplitude) * 1.3
        image = Image.new("RGB", (2 * panel_w, 2 * panel_h), "white")
        draw = ImageDraw.Draw(image)
        step_counts: list[int | None] = [*report_steps] or [None]
        palette = [(214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
        for t in range(tasks):
            ox, oy = (t % 2) * panel_w, (t // 2) * panel_h
            episode, amplitude, phase = sampler.sample_task()

            def to_px(
                x: torch.Tensor, y: torch.Tensor, ox: int = ox, oy: int = oy
            ) -> list[tuple[float, float]]:
                u = (x - self.x_range[0]) / (self.x_range[1] - self.x_range[0]) * (panel_w - 1)
                v = (1 - (y.clamp(-y_max, y_max) + y_max) / (2 * y_max)) * (panel_h - 1)
                return [(ox + a, oy + b) for a, b in zip(u.tolist(), v.tolist(), strict=True)]

            draw.rectangle([ox, oy, ox + panel_w - 1, oy + panel_h - 1], outline=(200, 200, 200))
            draw.line(to_px(grid[:, 0], amplitude * torch.sin(grid[:, 0] - phase)), (150,) * 3, 3)
            sx, sy = episode.support_x.to(device), episode.support_y.to(device)
            curves = [(0, (31, 119, 180))] + [
                (k, palette[i % len(palette)]) for i, k in enumerate(step_counts)
            ]
            for steps, colour in curves:
                kwargs = {} if steps is None else {"steps": steps}
                with torch.no_grad():
                    pred = algo.adapt(sx, sy, **kwargs)(grid.to(device)).float().cpu()
                draw.line(to_px(grid[:, 0], pred[:, 0]), colour, 1 if steps == 0 else 2)
            for x, y in to_px(episode.support_x[:, 0], episode.support_y[:, 0]):
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(0, 0, 0))
            legend = "0 (init) " + " ".join("test" if k is None else str(k) for k in step_counts)
            draw.text(
                (ox + 6, oy + 4),
                f"A={amplitude:.2f} phase={phase:.2f} steps: {legend}",
                fill=(0, 0, 0),
            )
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return {"adapted_curves": array.view(2 * panel_h, 2 * panel_w, 3).permute(2, 0, 1)}

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
