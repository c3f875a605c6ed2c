"""Image -> ViT patch tokens on the diffusion token grid: DINOv2 or a stand-in, both timm models."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn


def load_vit(weights: str, arch: str | None = None, **model_args) -> nn.Module:
    """A timm ViT from a local folder (timm hub layout), a single weights file, or a hub id."""
    path = Path(weights).expanduser()
    if path.is_dir():
        return timm.create_model(f"local-dir:{path}", pretrained=True, **model_args)
    if path.is_file():
        if arch is None:
            raise ValueError("a single weights file needs a registered timm architecture")
        return timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **model_args
        )
    return timm.create_model(f"hf-hub:{weights}", pretrained=True, **model_args)


class PatchFeatureEncoder(nn.Module):
    """uint8 NHWC images -> patch tokens (N, grid*grid, D), class and register tokens dropped.

    Pixels are scaled to [0, 1], normalised with the model's mean/std, resized (bicubic) to the
    model's input size; the token map is then resized to `grid` x `grid` if it differs.
    """

    def __init__(self, model: nn.Module, grid: int | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))
        self.input_size = tuple(model.patch_embed.img_size)
        self.native_grid = tuple(model.patch_embed.grid_size)
        self.grid = (grid, grid) if grid else self.native_grid
        self.dim = model.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device).permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens :]
        if self.grid != self.native_grid:
            fmap = tokens.transpose(1, 2).reshape(len(x), self.dim, *self.native_grid)
            shrink = self.grid[0] <= self.native_grid[0]
            fmap = F.adaptive_avg_pool2d(fmap, self.grid) if shrink else F.interpolate(
                fmap, size=self.grid, mode="bilinear", align_corners=False)
            tokens = fmap.flatten(2).transpose(1, 2)
        return tokens.float()
