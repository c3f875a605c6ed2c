"""FD_DINOv2 features by the dgm-eval protocol: DINOv2 ViT-L/14, CLS token of the final norm, 224 px.

Images are resized to 224 x 224 with PIL's bicubic filter (what torchvision's Resize does to the
PIL images dgm-eval feeds it), scaled to [0, 1] and normalised with the ImageNet mean/std. The model
is timm's `vit_large_patch14_dinov2` built for 224 px (its 37 x 37 position embedding resampled by
timm to 16 x 16 on load), from a timm name (`vit_large_patch14_dinov2.lvd142m`), a hub id
(`timm/vit_large_patch14_dinov2.lvd142m`), a timm hub folder (config.json names the architecture
and its model_args) or a single weights file (the official checkpoint layout works too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from ..encoders import _PATH_SUFFIXES
from ..encoders.vit import load_vit
from ..errors import ReDiError

ARCH = "vit_large_patch14_dinov2"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_KEY = "dinov2"  # the feature's name next to Inception's pool/spatial


def resize_bicubic(images: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """uint8 NHWC -> uint8 N x size x size x 3 through PIL's bicubic resize (antialiased when shrinking)."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
                     for image in images])


class DinoV2Features(nn.Module):
    """uint8 NHWC images -> (N, D) float32 CLS tokens after the final norm."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.dim = model.num_features

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(resize_bicubic(np.ascontiguousarray(images))).to(self.mean.device)
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        return self.model.forward_features(x)[:, 0].float()


def load_dinov2(weights: str, device: str | torch.device = "cpu", **model_args) -> DinoV2Features:
    """DINOv2 for FD_DINOv2 from evaluate.fd_dinov2.weights; `model_args` override the architecture's."""
    args = {"img_size": INPUT_SIZE, "num_classes": 0, **model_args}
    path = Path(weights).expanduser()
    if not path.exists() and (weights.startswith(("/", ".", "~")) or weights.endswith(_PATH_SUFFIXES)):
        raise ReDiError(f"evaluate.fd_dinov2.weights: {weights} not found (no such local path)")
    try:
        if path.exists():
            model = load_vit(str(path), arch=ARCH, **args)  # a timm folder or a single weights file
        elif weights.count("/") == 1:
            model = load_vit(weights, **args)  # hub id: owner/name
        else:
            model = timm.create_model(weights, pretrained=True, **args)  # timm name[.tag]
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ReDiError(f"could not load DINOv2 for FD_DINOv2 from '{weights}' (offline? point "
                        f"evaluate.fd_dinov2.weights at a local file or timm folder): {reason}") from err
    return DinoV2Features(model).to(device).eval()
