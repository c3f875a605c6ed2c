"""DiT/SiT models with ReDi fusion, the size table of the papers, and an analytic FLOP count."""

from __future__ import annotations

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


__all__ = ["DiT", "FUSIONS", "PATCH_SIZES", "Prediction", "SIZES", "build_model", "forward_macs"]
