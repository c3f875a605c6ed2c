"""DiT/SiT models with ReDi fusion, the size table of the papers, an analytic FLOP count, and the
model + objective a `train` config section describes."""

from __future__ import annotations

from torch import nn

from ..diffusion import build_objective
from .dit import FUSIONS, DiT, Prediction
from .flops import forward_macs

# size -> (depth, width, heads), as in DiT / SiT
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)


def build_model(size: str = "B", patch_size: int = 2, **kwargs) -> DiT:
    """A DiT of a named size (S/B/L/XL) and patch (2/4/8); kwargs go to DiT (depth etc. override)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {', '.join(SIZES)}")
    if patch_size not in PATCH_SIZES:
        raise ValueError(f"patch size must be one of {PATCH_SIZES}, got {patch_size}")
    depth, width, heads = SIZES[size]
    args = {"depth": depth, "hidden_size": width, "num_heads": heads, **kwargs}
    return DiT(patch_size=patch_size, **args)


def learns_sigma(cfg: dict) -> bool:
    """train.model.learn_sigma, with null resolved: DiT (ddpm) yes; SiT yes except with `concat`
    (the official SiT checkpoints keep the unused variance channels, SiT-ReDi drops them)."""
    m = cfg["model"]
    if m["learn_sigma"] is not None:
        return m["learn_sigma"]
    return cfg["objective"] == "ddpm" or m["fusion"] != "concat"


def build_run(cfg: dict, num_classes: int, image_size: int, rep_channels: int) -> tuple[nn.Module, object]:
    """The model and objective of a `train` config section (what train builds and sample rebuilds)."""
    m = cfg["model"]
    overrides = {k: m[k] for k in ("depth", "hidden_size", "num_heads") if m[k] is not None}
    model = build_model(
        m["size"], m["patch"], input_size=image_size, in_channels=4, learn_sigma=learns_sigma(cfg),
        num_classes=num_classes if cfg["conditional"] else 0, class_dropout_prob=cfg["class_dropout"],
        fusion=m["fusion"], rep_channels=rep_channels if m["fusion"] != "none" else 0,
        grad_checkpointing=cfg["grad_checkpointing"], **overrides,
    )
    joint = {"rep_weight": cfg["rep_weight"], "rep_dropout": cfg["rep_dropout"],
             "rep_dropout_mode": cfg["rep_dropout_mode"], "rep_dropout_norm": cfg["rep_dropout_norm"]}
    if cfg["objective"] == "ddpm":
        joint["learn_sigma"] = learns_sigma(cfg)
    return model, build_objective(cfg["objective"], **joint)


__all__ = ["DiT", "FUSIONS", "PATCH_SIZES", "Prediction", "SIZES", "build_model", "build_run", "forward_macs",
           "learns_sigma"]
