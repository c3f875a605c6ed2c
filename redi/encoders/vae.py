"""Image -> VAE posterior (mean, std): SD-VAE or a stand-in, both diffusers AutoencoderKL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def load_vae(weights: str) -> AutoencoderKL:
    """An AutoencoderKL from a hub id (e.g. stabilityai/sd-vae-ft-ema) or a local folder."""
    from diffusers import AutoencoderKL  # here, not at the top: training and sampling import this module

    return AutoencoderKL.from_pretrained(weights, low_cpu_mem_usage=False)  # no accelerate needed


class LatentEncoder(nn.Module):
    """uint8 NHWC images -> posterior mean and std (N, C, H/f, W/f), float32."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.vae.parameters()).device
        x = images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean.float(), posterior.std.float()
