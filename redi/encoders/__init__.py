"""Encoder registry: config names an encoder by `name` + `weights` (hub id, folder or file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import ReDiError
from ..io import fingerprint
from .vae import LatentEncoder, load_vae
from .vit import PatchFeatureEncoder, load_vit


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # "vae" -> LatentEncoder, "vit" -> PatchFeatureEncoder
    default_weights: str | None = None
    arch: str | None = None  # timm architecture, for weights given as a single file
    model_args: dict = field(default_factory=dict)


ENCODERS = {
    "sd-vae": EncoderSpec("vae", "stabilityai/sd-vae-ft-ema"),
    "standin-vae": EncoderSpec("vae"),
    "dinov2-vitb14-reg4": EncoderSpec(
        "vit", "timm/vit_base_patch14_reg4_dinov2.lvd142m",
        arch="vit_base_patch14_reg4_dinov2", model_args={"img_size": 224},
    ),
    "standin-vit": EncoderSpec("vit"),
}

_PATH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_local(weights: str) -> bool:
    """True when `weights` names a local path rather than a hub id (which is `owner/name`)."""
    return (
        Path(weights).exists() or weights.startswith(("/", ".", "~"))
        or weights.endswith(_PATH_SUFFIXES) or weights.count("/") != 1
    )


def load_encoder(
    name: str, weights: str | None = None, device: str | torch.device = "cpu",
    grid: int | None = None, kind: str | None = None,
) -> LatentEncoder | PatchFeatureEncoder:
    """Build a registered encoder with its weights, in eval mode on `device`.

    `kind` ("vae" or "vit") is what the calling stage needs; another kind is refused by name.
    """
    needed = kind or (ENCODERS[name].kind if name in ENCODERS else None)
    section = {"vae": "latents", "vit": "features"}.get(needed, "")
    key = f"{section}.encoder" if section else "the encoder"  # the config keys that choose it
    if name not in ENCODERS:
        raise ReDiError(f"unknown encoder '{name}' (set {key}.name); registered: {', '.join(ENCODERS)}")
    spec = ENCODERS[name]
    if kind is not None and spec.kind != kind:
        wanted = [n for n, s in ENCODERS.items() if s.kind == kind]
        raise ReDiError(f"encoder '{name}' is a {spec.kind}; this stage needs one of: {', '.join(wanted)} "
                        f"(set {key}.name)")
    weights = weights or spec.default_weights
    if weights is None:
        raise ReDiError(f"encoder '{name}' needs weights: set {key}.weights to a folder made by "
                        f"train-standin-{spec.kind}")
    if is_local(weights) and not Path(weights).expanduser().exists():
        raise ReDiError(f"weights not found: {weights} (encoder '{name}'; no such local path; "
                        f"set {key}.weights)")
    try:
        if spec.kind == "vae":
            encoder = LatentEncoder(load_vae(weights))
        else:
            encoder = PatchFeatureEncoder(load_vit(weights, arch=spec.arch, **spec.model_args), grid=grid)
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if is_local(weights):
            message = (f"could not load encoder '{name}' from local weights '{weights}' "
                       f"({key}.weights): {reason}")
            raise ReDiError(message) from err
        raise ReDiError(
            f"could not load encoder '{name}' from hub id '{weights}' (no such local path either; "
            f"offline? set {key}.weights to a local path): {reason}") from err
    # what made the outputs: resumed files refuse rows made with other weights
    encoder.weights_id = f"{name}:{fingerprint(weights) if is_local(weights) else weights}"
    return encoder.to(device).eval()


__all__ = ["ENCODERS", "EncoderSpec", "LatentEncoder", "PatchFeatureEncoder", "is_local", "load_encoder",
           "resolve_device"]
