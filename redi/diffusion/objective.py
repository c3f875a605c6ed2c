"""The joint ReDi objective shared by DDPM and the SiT interpolant: MSE_x + lambda * MSE_z.

Both modalities get the same timestep and independent noise. Representation dropout (p_drop) is
drawn per sample: a dropped sample sees z_t = 0 and contributes no z loss, which is exactly what
Representation Guidance feeds its unconditional branch at sampling time. The official code's
variant (zero the clean z of the whole batch, keep the noise and the loss) is kept for parity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REP_DROPOUT_MODES = ("sample", "batch_clean")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first."""
    return x.flatten(1).mean(dim=1)


class JointObjective:
    """Base class: subclasses define the timestep law, the corruption, the target and extra terms."""

    def __init__(
        self,
        rep_weight: float = 1.0,
        rep_dropout: float = 0.0,
        rep_dropout_mode: str = "sample",
        repa_weight: float = 0.5,
    ):
        if rep_dropout_mode not in REP_DROPOUT_MODES:
            raise ValueError(f"rep_dropout_mode must be one of {REP_DROPOUT_MODES}")
        if not 0.0 <= rep_dropout <= 1.0:
            raise ValueError(f"rep_dropout must be in [0, 1], got {rep_dropout}")
        if rep_weight < 0 or repa_weight < 0:
            raise ValueError(f"loss weights must be >= 0: rep_weight={rep_weight}, repa_weight={repa_weight}")
        self.rep_weight, self.rep_dropout = rep_weight, rep_dropout
        self.rep_dropout_mode, self.repa_weight = rep_dropout_mode, repa_weight

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
        repa_target: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch-mean losses: 'loss' (to minimise) and its parts loss_x, loss_z, [vb, repa]."""
        n, device = x.shape[0], x.device
        t = self.sample_t(n, device)
        noise_x = torch.randn_like(x)
        x_t = self.q_sample(x, t, noise_x)
        z_t, drop = None, torch.zeros(n, dtype=torch.bool, device=device)
        batch_dropped = False
        if z is not None:
            if getattr(model, "fusion", None) == "none":
                raise ValueError("representations z were given to a model built with fusion='none'")
            if self.rep_dropout_mode == "batch_clean" and torch.rand(()) < self.rep_dropout:
                z = torch.zeros_like(z)  # official variant: clean z zeroed, noise stays, loss kept
                batch_dropped = True
            elif self.rep_dropout_mode == "sample":
                drop = self.drop_mask(n, device)
            noise_z = torch.randn_like(z)
            z_t = self.q_sample(z, t, noise_z)
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
            losses["loss_z"] = (per_sample * kept).sum() / kept.sum().clamp(min=1.0)
            total = total + self.rep_weight * losses["loss_z"]
        if repa_target is not None:
            if pred.repa is None:
                raise ValueError("a REPA target was given but the model has no projector (repa_block)")
            cosine = F.cosine_similarity(pred.repa, repa_target.to(pred.repa.dtype), dim=-1)
            losses["repa"] = -cosine.mean()
            total = total + self.repa_weight * losses["repa"]
        losses["loss"] = total
        losses["rep_dropped"] = torch.ones(()) if batch_dropped else drop.float().mean()
        return losses
