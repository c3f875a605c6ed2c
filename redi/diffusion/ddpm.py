"""DDPM as in DiT: 1000 linear betas (1e-4 .. 0.02), epsilon prediction, optional learned variance.

With learn_sigma the model's extra channels v in [-1, 1] interpolate the log-variance between the
posterior's beta~_t and beta_t; they are trained by the variational bound with the predicted mean
held fixed (DiT's "MSE + VLB" hybrid). All schedule arithmetic is float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .objective import JointObjective, mean_flat


def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """DiT/ADM's linear schedule, rescaled so that other step counts keep the same endpoints' product."""
    scale = 1000 / num_steps
    return np.linspace(scale * start, scale * end, num_steps, dtype=np.float64)


def respaced_timesteps(num_steps: int, steps: int) -> np.ndarray:
    """`steps` evenly strided timesteps of 0..num_steps-1, both ends kept (ADM's space_timesteps:
    the fractional stride is accumulated and each position rounded, ties included)."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be in 1..{num_steps}, got {steps}")
    stride = (num_steps - 1) / max(steps - 1, 1)
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return np.array(sorted(set(kept)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion(JointObjective):
    """Discrete-time DDPM with epsilon prediction; timesteps t are integers 0..T-1."""

    def __init__(self, num_steps: int = 1000, learn_sigma: bool = True, betas: np.ndarray | None = None,
                 **joint):
        super().__init__(**joint)
        betas = linear_betas(num_steps) if betas is None else np.asarray(betas, dtype=np.float64)
        self.num_steps, self.learn_sigma = len(betas), learn_sigma
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # the posterior variance is 0 at t = 0: its log is clipped to the next value, as in ADM
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.schedule = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas)
            / (1.0 - alphas_cumprod),
        }

    def respaced(self, steps: int) -> tuple[GaussianDiffusion, np.ndarray]:
        """A diffusion over `steps` of the timesteps (ADM's respacing) and its map to the model's t.

        The kept timesteps keep their alphas_cumprod; the new betas follow from consecutive ratios,
        so the learned variance interpolates within the respaced range, as in DiT's 250-step sampling.
        """
        kept = respaced_timesteps(self.num_steps, steps)
        abar = self.schedule["alphas_cumprod"][kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(learn_sigma=self.learn_sigma, betas=betas), kept

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Schedule entry `name` at timesteps t, shaped to broadcast against `like`."""
        key = (name, like.device)
        if key not in self._tables:  # one host-to-device copy per table and device, not per step
            self._tables[key] = torch.from_numpy(self.schedule[name]).to(like.device)
        values = self._tables[key][t.long()]
        return values.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)

    def sample_t(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (n,), device=device)

    def q_sample(self, data: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return (self._at("sqrt_alphas_cumprod", t, data) * data
                + self._at("sqrt_one_minus_alphas_cumprod", t, data) * noise)

    def target(self, data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._at("posterior_mean_coef1", t, x_t) * x_start
                + self._at("posterior_mean_coef2", t, x_t) * x_t)
        return (mean, self._at("posterior_variance", t, x_t),
                self._at("posterior_log_variance_clipped", t, x_t))

    def predict_start_from_eps(self, x_t, t, eps):
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def p_mean_variance(self, out_x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """The model's p(x_{t-1} | x_t): mean, log-variance and predicted x_0 from its raw output."""
        channels = x_t.shape[1]
        eps = out_x[:, :channels]
        if self.learn_sigma:
            frac = (out_x[:, channels:] + 1) / 2  # in [0, 1] for v in [-1, 1]
            min_log = self._at("posterior_log_variance_clipped", t, x_t)
            max_log = self._at("betas", t, x_t).log()
            log_variance = frac * max_log + (1 - frac) * min_log
        else:  # fixed large variance (beta_t, with beta~_1 at t = 0), as ADM's FIXED_LARGE
            betas = np.append(self.schedule["posterior_variance"][1], self.schedule["betas"][1:])
            log_variance = torch.from_numpy(np.log(betas)).to(x_t.device)[t.long()]
            log_variance = log_variance.view(-1, *[1] * (x_t.dim() - 1)).to(x_t.dtype).expand_as(x_t)
        x_start = self.predict_start_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(x_start, x_t, t)
        return mean, log_variance, x_start

    def vb_terms_bpd(self, out_x, x_start, x_t, t) -> torch.Tensor:
        """Per-sample variational bound term in bits/dim: KL for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(out_x, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def extra_x_terms(self, out_x, data, x_t, t) -> dict[str, torch.Tensor]:
        """The VLB trains only the variance: the epsilon channels enter it detached."""
        if not self.learn_sigma:
            return {}
        channels = data.shape[1]
        frozen = torch.cat([out_x[:, :channels].detach(), out_x[:, channels:]], dim=1)
        return {"vb": self.vb_terms_bpd(frozen, data, x_t, t)}
