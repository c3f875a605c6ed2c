"""SiT's linear interpolant: x_t = t * x1 + (1 - t) * eps, t ~ U[0, 1] (t = 1 is data), velocity target."""

from __future__ import annotations

import torch

from .objective import JointObjective


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)


class LinearInterpolant(JointObjective):
    """Flow matching on the straight path from noise (t = 0) to data (t = 1)."""

    def sample_t(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device)

    def q_sample(self, data: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        t = _expand(t, data)
        return t * data + (1 - t) * noise

    def target(self, data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d x_t / d t = x1 - eps."""
        return data - noise
