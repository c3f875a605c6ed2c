"""The joint ReDi objective shared by DDPM and the SiT interpolant: MSE_x + lambda * MSE_z.

Both modalities get the same timestep and independent noise. Representation dropout (p_drop):
- "sample" (default): per sample, z_t = 0 and no z loss, exactly what Representation Guidance
  feeds its z-dropped branch at sampling time. `rep_dropout_norm` says what the z loss is
  averaged over: "batch" (default) divides by the whole batch, so the expected z weight is
  lambda * (1 - p_drop), as in the official code; "kept" divides by the kept samples only (an
  effective weight lambda, i.e. lambda / (1 - p_drop) times the official expectation).
- "batch_clean" (the official code): with probability p_drop the whole batch's clean z is zeroed
  (z_t is then pure scaled noise, not 0) and that batch has no z loss (lambda = 0).
"""

from __future__ import annotations

import torch
from torch import nn

REP_DROPOUT_MODES = ("sample", "batch_clean")
REP_DROPOUT_NORMS = ("batch", "kept")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first."""
    return x.flatten(1).mean(dim=1)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP / torch.compile wrappers (for its attributes)."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr):
            model = getattr(model, attr)
    return model


class JointObjective:
    """Base class: subclasses define the timestep law, the corruption, the target and extra terms."""

    def __init__(
        self,
        rep_weight: float = 1.0,
        rep_dropout: float = 0.0,
        rep_dropout_mode: str = "sample",
        rep_dropout_norm: str = "batch",
    ):
        if rep_dropout_mode not in REP_DROPOUT_MODES:
            raise ValueError(f"rep_dropout_mode must be one of {REP_DROPOUT_MODES}")
        if rep_dropout_norm not in REP_DROPOUT_NORMS:
            raise ValueError(f"rep_dropout_norm must be one of {REP_DROPOUT_NORMS}")
        if not 0.0 <= rep_dropout <= 1.0:
            raise ValueError(f"rep_dropout must be in [0, 1], got {rep_dropout}")
        if rep_weight < 0:
            raise ValueError(f"rep_weight (the representation loss weight) must be >= 0, got {rep_weight}")
        self.rep_weight, self.rep_dropout = rep_weight, rep_dropout
        self.rep_dropout_mode, self.rep_dropout_norm = rep_dropout_mode, rep_dropout_norm

    # --- what a subclass defines -------------------------------------------------------------
    def sample_t(self, n: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def q_sample(self, data: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep as the network sees it."""
        return t

    def extra_x_terms(self, out_x, data, x_t, t) -> dict[str, torch.Tensor]:
        """Per-sample extra loss terms of the image (e.g. DDPM's VLB for a learned variance)."""
        return {}

    # --- the shared joint loss ---------------------------------------------------------------
    def drop_mask(self, n: int, device: torch.device) -> torch.Tensor:
        """Per-sample Bernoulli(rep_dropout) mask: True where the representation is dropped."""
        return torch.rand(n, device=device) < self.rep_dropout

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        z: torch.Tensor | None,
        y: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Batch-mean losses: 'loss' (to minimise) and its parts loss_x, loss_z [, vb].

        z is the PCA map on the token grid (N, r, G, G); a `concat` model lifts it to the latent's
        resolution first, so its noise, target and loss live there (as in the official code).
        """
        n, device = x.shape[0], x.device
        t = self.sample_t(n, device)
        noise_x = torch.randn_like(x)
        x_t = self.q_sample(x, t, noise_x)
        z_t, drop = None, torch.zeros(n, dtype=torch.bool, device=device)
        z_weight = self.rep_weight
        if z is not None:
            inner = _unwrapped(model)
            if getattr(inner, "fusion", None) == "none":
                raise ValueError("representations z were given to a model built with fusion='none'")
            if hasattr(inner, "lift_representation"):
                z = inner.lift_representation(z)
            if self.rep_dropout_mode == "batch_clean" and torch.rand(()) < self.rep_dropout:
                z = torch.zeros_like(z)  # official: clean z zeroed (the noise stays) and no z loss
                z_weight = 0.0
                drop = torch.ones(n, dtype=torch.bool, device=device)
            elif self.rep_dropout_mode == "sample":
                drop = self.drop_mask(n, device)
            noise_z = torch.randn_like(z)
            z_t = self.q_sample(z, t, noise_z)
            if self.rep_dropout_mode == "sample":
                z_t = torch.where(drop.view(-1, *[1] * (z.dim() - 1)), torch.zeros_like(z_t), z_t)
        pred = model(x_t, self.model_time(t), y, z_t)

        out_x = pred.x[:, : x.shape[1]]
        terms = {"loss_x": mean_flat((out_x - self.target(x, noise_x, t)) ** 2)}
        terms.update(self.extra_x_terms(pred.x, x, x_t, t))
        losses = {name: value.mean() for name, value in terms.items()}
        total = sum(losses.values())
        if z is not None:
            per_sample = mean_flat((pred.z - self.target(z, noise_z, t)) ** 2)
            kept = (~drop).float()
            if self.rep_dropout_mode == "batch_clean":  # the z error is logged; z_weight is 0 if dropped
                losses["loss_z"] = per_sample.mean()
            elif self.rep_dropout_norm == "kept":
                losses["loss_z"] = (per_sample * kept).sum() / kept.sum().clamp(min=1.0)
            else:
                losses["loss_z"] = (per_sample * kept).sum() / n
            total = total + z_weight * losses["loss_z"]
        losses["loss"] = total
        losses["rep_dropped"] = drop.float().mean()
        return losses
