"""Analytic multiply-accumulate count of one forward pass, per sample (the DiT paper's "Gflops")."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dit import DiT


def forward_macs(model: DiT) -> dict[str, int]:
    """MACs of one sample's forward pass, by part; 'total' is their sum.

    Counts every matrix product (patch and z embeddings, timestep MLP, adaLN modulations,
    qkv/proj, attention scores and values, MLP, output heads); norms, activations and additions are
    left out. This reproduces the DiT paper's table (e.g. 118.6 "GFLOPs" for DiT-XL/2 at 256 px).
    """
    d = model.pos_embed.shape[-1]
    t = model.x_embedder.num_patches
    seq = 2 * t if model.fusion == "separate" else t
    p = model.patch_size
    c_in = model.x_embedder.proj.in_channels  # with concat: latent + PCA channels
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    freq = model.t_embedder.frequency_embedding_size
    per_block = {
        "qkv_proj": seq * d * 3 * d + seq * d * d,
        "attention": 2 * seq * seq * d,
        "mlp": 2 * seq * d * mlp_hidden,
        "adaln": d * 6 * d,
    }
    macs = {name: len(model.blocks) * value for name, value in per_block.items()}
    macs["embed"] = t * c_in * p * p * d + freq * d + d * d
    macs["head_x"] = t * d * p * p * model.out_channels + 2 * d * d
    if model.fusion in ("merged", "separate"):
        r = model.rep_channels
        macs["embed_z"] = t * r * d
        macs["head_z"] = t * d * r + 2 * d * d
    macs["total"] = sum(macs.values())
    return macs
