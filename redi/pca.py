"""Streaming PCA of patch features: float64 moments in O(D^2) memory, then an eigendecomposition.

Features are standardised per channel (mean 0, std 1) before PCA, so the principal components are
those of the correlation matrix; results equal sklearn's PCA on StandardScaler output. The maths and
the pca.npz format only: the fit-pca stage is redi/fit_pca.py, projection is redi/features.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from .io import load_npz, write_npz


class MomentAccumulator:
    """Running count, sum and outer-product sum of D-dim vectors, shifted for float64 accuracy."""

    def __init__(self, dim: int):
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """Add a (..., dim) block of vectors."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1] != len(self.sum):
            raise ValueError(f"expected vectors of dimension {len(self.sum)}, got shape {x.shape}")
        x = x.reshape(-1, len(self.sum))
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased (n - 1) covariance of everything seen."""
        if self.n < 2:
            raise ValueError("PCA needs at least two vectors")
        centred = self.sum / self.n
        cov = (self.outer - self.n * np.outer(centred, centred)) / (self.n - 1)
        return self.shift + centred, cov


def fit_pca(chunks: Iterable[np.ndarray], dim: int) -> dict[str, np.ndarray]:
    """PCA of standardised vectors streamed as (n, dim) chunks.

    Returns mean and std (per channel, ddof 0 like StandardScaler), components (dim, dim), rows in
    decreasing variance with the largest-magnitude entry of each positive, explained_variance (of
    the standardised data, ddof 1 like sklearn) and explained_variance_ratio.
    """
    moments = MomentAccumulator(dim)
    for chunk in chunks:
        moments.update(chunk)
    mean, cov = moments.mean_and_covariance()
    std = np.sqrt(np.diag(cov) * (moments.n - 1) / moments.n)
    std = np.where(std > 0, std, 1.0)  # a constant channel stays 0 after centring
    correlation = cov / np.outer(std, std)
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    components = eigenvectors[:, order].T
    rows = np.arange(dim)
    components *= np.sign(components[rows, np.abs(components).argmax(axis=1)])[:, None]
    return {
        "mean": mean, "std": std, "components": components,
        "explained_variance": eigenvalues,
        "explained_variance_ratio": eigenvalues / eigenvalues.sum(),
        "num_vectors": np.int64(moments.n),
    }


def project(features: np.ndarray, pca: dict[str, np.ndarray], rank: int) -> np.ndarray:
    """Standardise (..., D) features and project them on the top `rank` components -> (..., rank)."""
    standardised = (np.asarray(features, dtype=np.float64) - pca["mean"]) / pca["std"]
    return standardised @ pca["components"][:rank].T


def save_pca(path: str | os.PathLike, pca: dict[str, np.ndarray]) -> None:
    """Write the fitted PCA arrays as one .npz, atomically."""
    write_npz(path, **pca)


def load_pca(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a pca.npz written by fit-pca."""
    return load_npz(path, "PCA file")
