"""`redi fit-pca`: standardisation + PCA of every sampled token of features.h5, streamed in chunks
of ~1M values (float64 moments, O(D^2) memory whatever the number of tokens)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from .io import require_file, write_manifest
from .pca import fit_pca, save_pca
from .progress import progress


def iter_token_chunks(features_path: str | os.PathLike, rows_per_chunk: int = 32) -> Iterator[np.ndarray]:
    """Stream (rows*tokens, D) float32 blocks of a features.h5 file, never loading all of it."""
    with h5py.File(features_path, "r") as f:
        tokens = f["tokens"]
        for i in range(0, len(tokens), rows_per_chunk):
            block = tokens[i : i + rows_per_chunk]
            yield block.reshape(-1, block.shape[-1]).astype(np.float32)


def fit_pca_file(
    features_path: str | os.PathLike, out_path: str | os.PathLike, config: dict | None = None
) -> dict:
    """fit-pca: standardisation + PCA of every token in features.h5 -> pca.npz + manifest."""
    start = time.time()
    with h5py.File(require_file(features_path, "features file"), "r") as f:
        _, tokens, dim = f["tokens"].shape
    rows = max(1, (1 << 20) // (tokens * dim))  # ~1M values per chunk: a few float64 copies, ~30 MB
    pca = fit_pca(progress(iter_token_chunks(features_path, rows), desc="fit-pca", unit="chunk"), dim)
    save_pca(out_path, pca)
    ratio = np.cumsum(pca["explained_variance_ratio"])
    return write_manifest(
        Path(out_path).with_name("manifest.json"), "fit-pca", config or {},
        inputs={"features": Path(features_path).with_name("manifest.json")},
        num_vectors=int(pca["num_vectors"]), dim=int(dim),
        cumulative_variance_ratio={r: round(float(ratio[r - 1]), 4)
                                   for r in (1, 2, 4, 8, 16, 32, 64) if r <= dim},
        component_std={r + 1: round(float(s), 4)
                       for r, s in enumerate(np.sqrt(pca["explained_variance"][:32]))},
        wall_time_s=round(time.time() - start, 2),
    )


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi fit-pca`."""
    fit_pca_file(args.features, args.out, config=cfg)
