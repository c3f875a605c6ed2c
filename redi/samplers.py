"""Samplers for the joint (x, z) state: SiT's ODE (Euler, Heun) and SDE (Euler-Maruyama), DiT's
DDPM (ancestral) and DDIM.

`predict(x, z, t)` returns the (x, z) predictions of a (guided) model: velocities for the
interpolant (t from 0 = noise to 1 = data), epsilons for DDPM (the model's integer t counting down
to 0; the ancestral sampler also reads the learned-variance channels after the epsilon ones).
z is None for a model without ReDi fusion. `noise(like)` draws the sampler's fresh Gaussian noise;
`PerSampleNoise` makes each sample's draws depend on its own seed only, not on its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .diffusion import GaussianDiffusion
from .diffusion.ddpm import respaced_timesteps

Predict = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]
]
Noise = Callable[[torch.Tensor], torch.Tensor]


class PerSampleNoise:
    """Standard normal draws from one generator per sample (seeded by the caller, e.g. base + index).

    A sample's noise never depends on which other samples share its batch or process.
    """

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"batch of {like.shape[0]} samples but {len(self.generators)} seeds")
        draws = [torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in self.generators]
        return torch.stack(draws).to(like.device)

    def integers(self, high: int) -> torch.Tensor:
        """One uniform integer in [0, high) per sample (e.g. a class label)."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators])


def generator_noise(generator: torch.Generator | None = None) -> Noise:
    """noise(like) from one shared generator (or torch's global one)."""
    return lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)


def _step(state, velocity, dt):
    return tuple(None if s is None else s + dt * v for s, v in zip(state, velocity, strict=True))


@torch.no_grad()
def ode_sample(
    predict: Predict, x: torch.Tensor, z: torch.Tensor | None, steps: int = 50, method: str = "heun"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integrate dx/dt = v(x, t) from t = 0 (noise) to 1 (data) on a uniform grid of `steps` points.

    `steps` counts grid points, as SiT's fixed-grid ODE (linspace(0, 1, num_steps)): steps - 1
    intervals, i.e. steps - 1 model calls for Euler and 2 (steps - 1) for Heun.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    if steps < 2:
        raise ValueError(f"the ODE grid needs at least 2 points (steps >= 2), got {steps}")
    times = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    state = (x, z)
    for t0, t1 in zip(times[:-1], times[1:], strict=True):
        dt = float(t1 - t0)
        t = torch.full((x.shape[0],), float(t0), device=x.device)
        v0 = predict(*state, t)
        nxt = _step(state, v0, dt)
        if method == "heun":
            v1 = predict(*nxt, torch.full_like(t, float(t1)))
            mean_v = tuple(None if a is None else (a + b) / 2 for a, b in zip(v0, v1, strict=True))
            nxt = _step(state, mean_v, dt)
        state = nxt
    return state


@torch.no_grad()
def sde_sample(
    predict: Predict,
    x: torch.Tensor,
    z: torch.Tensor | None,
    steps: int = 250,
    last_step: float = 0.04,
    noise: Noise = torch.randn_like,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SiT's Euler-Maruyama sampler: dx = [v + w s] dt + sqrt(2 w) dW with w(t) = 1 - t.

    The score of the linear interpolant follows from the velocity, s = (t v - x) / (1 - t), so
    w s = t v - x stays finite; the Langevin part (w s dt + sqrt(2 w) dW) keeps the marginals of
    the probability-flow ODE. Integrates t from 0 to 1 - last_step, then SiT's default "Mean"
    last step: the SDE drift (v + w s) without noise, over last_step, to t = 1.
    """
    times = torch.linspace(0.0, 1.0 - last_step, steps, dtype=torch.float64)
    state = (x, z)

    def drift(state, t, scalar):
        v = predict(*state, t)
        return tuple(None if s is None else vi + (scalar * vi - s) for s, vi in zip(state, v, strict=True))

    for t0, t1 in zip(times[:-1], times[1:], strict=True):
        dt, scalar = float(t1 - t0), float(t0)
        t = torch.full((x.shape[0],), scalar, device=x.device)
        mean = _step(state, drift(state, t, scalar), dt)
        scale = (2.0 * (1.0 - scalar) * dt) ** 0.5
        state = tuple(None if m is None else m + scale * noise(m) for m in mean)
    t_end = float(times[-1])
    last = drift(state, torch.full((x.shape[0],), t_end, device=x.device), t_end)
    return _step(state, last, 1.0 - t_end)


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    predict: Predict,
    x: torch.Tensor,
    z: torch.Tensor | None,
    steps: int = 50,
    eta: float = 0.0,
    noise: Noise = torch.randn_like,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DDIM on `steps` evenly spaced timesteps of the 1000; eta = 0 is deterministic."""
    abar = diffusion.schedule["alphas_cumprod"]
    timesteps = respaced_timesteps(diffusion.num_steps, steps)[::-1]
    state = (x, z)
    for i, step in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a, a_prev = abar[step], (abar[prev] if prev >= 0 else 1.0)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        t = torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)
        eps = predict(*state, t)
        new = []
        for s, e in zip(state, eps, strict=True):
            if s is None:
                new.append(None)
                continue
            x0 = (s - np.sqrt(1 - a) * e) / np.sqrt(a)
            mean = np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - sigma**2, 0.0)) * e
            new.append(mean + sigma * noise(s) if sigma else mean)
        state = tuple(new)
    return state


@torch.no_grad()
def ddpm_sample(
    diffusion: GaussianDiffusion,
    predict: Predict,
    x: torch.Tensor,
    z: torch.Tensor | None,
    steps: int = 250,
    noise: Noise = torch.randn_like,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DiT's ancestral sampler on `steps` respaced timesteps, with the model's learned variance.

    z has no predicted variance: it takes the posterior's (ADM's fixed-small) variance.
    """
    respaced, model_t = diffusion.respaced(steps)
    for i in reversed(range(steps)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out_x, eps_z = predict(x, z, torch.full_like(t, int(model_t[i])))
        mean, log_variance, _ = respaced.p_mean_variance(out_x, x, t)
        x = mean + (torch.exp(0.5 * log_variance) * noise(x) if i > 0 else 0)
        if z is not None:
            z_start = respaced.predict_start_from_eps(z, t, eps_z)
            mean_z, _, log_variance_z = respaced.q_posterior_mean_variance(z_start, z, t)
            z = mean_z + (torch.exp(0.5 * log_variance_z) * noise(z) if i > 0 else 0)
    return x, z
