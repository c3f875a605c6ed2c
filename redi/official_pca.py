"""`redi convert-pca`: the official ReDi PCA file (`pcs/dino_pca_model.pth`) -> this project's pca.npz.

The official file is a `torch.save` of {"pca_model": a fitted sklearn PCA, "mean": ..., "std": ...}
(per-channel statistics of the DINOv2 tokens). Its transform is
    z = ((f - mean) / std - pca.mean_) @ pca.components_[:r].T      (no rescaling, no whitening)
which is this project's `project()` with mean' = mean + pca.mean_ * std and std' = std, so the
conversion folds pca.mean_ into the standardisation and `project-features` reproduces it exactly.
The pickle is read by torch's weights-only unpickler that admits numpy arrays/dtypes and sklearn's
PCA class alone: any other global is refused before anything runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .errors import ReDiError
from .io import require_file, sha256_file, write_manifest
from .pca import save_pca


def _allowed_globals() -> list:
    """numpy's array reconstruction and dtypes, and sklearn's PCA: what the official file holds."""
    from numpy._core.multiarray import _reconstruct  # numpy >= 2; pickles name it numpy.core.multiarray
    from sklearn.decomposition import PCA

    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return [(_reconstruct, "numpy.core.multiarray._reconstruct"), _reconstruct, np.ndarray, np.dtype,
            PCA, *dtypes]


def load_official_pca(path: str | Path) -> dict:
    """The official PCA file's dict, unpickled with only numpy and sklearn's PCA admitted."""
    require_file(path, "official PCA file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError names the refused global
        reason = str(err).splitlines()
        refused = next((line.strip() for line in reason if "Unsupported global" in line), reason[0])
        raise ReDiError(f"{path} was refused: it is not the official PCA file or holds more than numpy "
                        f"arrays and a sklearn PCA ({refused})") from None
    if not isinstance(state, dict) or not {"pca_model", "mean", "std"} <= set(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ReDiError(f"{path} holds {keys}, expected a dict with pca_model, mean and std")
    return state


def convert_official_pca(state: dict) -> dict[str, np.ndarray]:
    """The official PCA as pca.npz arrays: project(f) equals the official transform."""
    pca = state["pca_model"]
    if getattr(pca, "whiten", False):
        raise ReDiError("the official PCA is whitened; the official transform (and this conversion) is not")
    mean = np.asarray(state["mean"], dtype=np.float64).reshape(-1)
    std = np.asarray(state["std"], dtype=np.float64).reshape(-1)
    components = np.asarray(pca.components_, dtype=np.float64)
    if not (len(mean) == len(std) == components.shape[1]):
        raise ReDiError(f"the official PCA's shapes disagree: mean {mean.shape}, std {std.shape}, "
                        f"components {components.shape}")
    variance = np.asarray(pca.explained_variance_, dtype=np.float64)
    return {
        "mean": mean + np.asarray(pca.mean_, dtype=np.float64) * std,
        "std": std,
        "components": components,
        "explained_variance": variance,
        "explained_variance_ratio": np.asarray(pca.explained_variance_ratio_, dtype=np.float64),
        "num_vectors": np.int64(getattr(pca, "n_samples_", 0)),
    }


def convert_pca_file(official: str | Path, out_path: str | Path, config: dict | None = None) -> dict:
    """convert-pca: the official file -> pca.npz + a manifest that records where it came from."""
    start = time.time()
    pca = convert_official_pca(load_official_pca(official))
    save_pca(out_path, pca)
    ratio = np.cumsum(pca["explained_variance_ratio"])
    return write_manifest(
        Path(out_path).with_name("manifest.json"), "convert-pca", config or {},
        source="official ReDi PCA file", official_file=str(official), official_sha256=sha256_file(official),
        num_vectors=int(pca["num_vectors"]), dim=len(pca["mean"]), components=len(pca["components"]),
        cumulative_variance_ratio={r: round(float(ratio[r - 1]), 4)
                                   for r in (1, 2, 4, 8, 16, 32, 64) if r <= len(ratio)},
        wall_time_s=round(time.time() - start, 2),
    )


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi convert-pca`."""
    convert_pca_file(args.official, args.out, config=cfg)
