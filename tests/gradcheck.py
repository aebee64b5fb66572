"""A meta-gradient against central finite differences, shared by the algorithm tests."""

from __future__ import annotations

import torch

from metarun.data.episodes import Episode


def assert_meta_gradient_matches_finite_differences(
    algo: torch.nn.Module, episode: Episode, eps: float = 1e-6
) -> None:
    """Backpropagates ``algo.meta_loss(episode)`` and compares every parameter's gradient
    with ``(L(p + eps) - L(p - eps)) / (2 eps)``, one coordinate at a time. Needs a tiny
    float64 model."""
    algo.zero_grad()
    algo.meta_loss(episode)[0].backward()
    analytic = torch.cat([p.grad.flatten() for p in algo.parameters()])
    numeric = []
    with torch.no_grad():
        for p in algo.parameters():
            for i in range(p.numel()):
                orig = p.view(-1)[i].item()
                values = []
                for sign in (1, -1):
                    p.view(-1)[i] = orig + sign * eps
                    with torch.enable_grad():
                        values.append(algo.meta_loss(episode)[0].item())
                p.view(-1)[i] = orig
                numeric.append((values[0] - values[1]) / (2 * eps))
    torch.testing.assert_close(
        analytic, torch.tensor(numeric, dtype=torch.float64), rtol=1e-5, atol=1e-8
    )
