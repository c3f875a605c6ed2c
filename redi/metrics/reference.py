"""`redi reference-stats`: reference statistics streamed in O(D^2) memory, resumable.

Mean and covariance of each feature (pool3 for FID, ADM's spatial features for sFID, the DINOv2
CLS token for FD_DINOv2 when configured) are float64 running moments (the PCA stage's
MomentAccumulator), so 1.28M ImageNet images cost two 2048 x 2048 matrices, not 52 GB of
features. Only the precision/recall reference (a seeded random subset of pr_reference_images of
the streamed images) keeps its activations. Every `checkpoint_seconds` the moments are saved to
`<out>.partial`; a rerun with the same settings and code continues after the images they cover.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ..code_version import stage_code_version
from ..errors import ReDiError
from ..io import fingerprint, write_manifest, write_npz
from ..pca import MomentAccumulator
from .dinov2 import load_dinov2
from .features import STAT_NAMES, FeatureSet, fp32_device, load_inception, read_reference
from .images import image_source

PR_FEATURE = "pool"  # precision/recall use Inception pool3


class ReferenceAccumulator:
    """Running moments of every feature of a stream of images, plus the P/R subset's activations.

    `keep` holds the stream positions (sorted) whose pool3 activations are kept for precision/recall.
    """

    def __init__(self, dims: dict[str, int], keep: np.ndarray):
        self.moments = {name: MomentAccumulator(dim) for name, dim in dims.items()}
        self.keep = np.sort(np.asarray(keep, dtype=np.int64))
        self.acts = np.zeros((len(self.keep), dims[PR_FEATURE]), dtype=np.float32)
        self.seen = 0

    def update(self, features: dict[str, np.ndarray]) -> None:
        """Add one batch of features (name -> (n, dim)) at the next stream positions."""
        n = len(features[PR_FEATURE])
        for name, moments in self.moments.items():
            moments.update(features[name])
        lo, hi = np.searchsorted(self.keep, [self.seen, self.seen + n])
        self.acts[lo:hi] = features[PR_FEATURE][self.keep[lo:hi] - self.seen]
        self.seen += n

    def statistics(self) -> dict[str, np.ndarray]:
        """mu/sigma per feature (float64, unbiased covariance) and the P/R activations."""
        if self.seen < 2:
            raise ReDiError(f"reference statistics need at least 2 images, got {self.seen}")
        out = {}
        for name, moments in self.moments.items():
            mean_name, cov_name = STAT_NAMES[name]
            out[mean_name], out[cov_name] = moments.mean_and_covariance()
        out["acts"] = self.acts
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to continue later, as arrays."""
        state = {"seen": np.int64(self.seen), "keep": self.keep, "acts": self.acts}
        for name, m in self.moments.items():
            if m.shift is None:
                continue
            state.update({f"{name}.n": np.int64(m.n), f"{name}.shift": m.shift, f"{name}.sum": m.sum,
                          f"{name}.outer": m.outer})
        return state

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Continue from a state(); the caller checked it was made with the same settings."""
        if not np.array_equal(state["keep"], self.keep) or state["acts"].shape != self.acts.shape:
            raise ReDiError("the saved reference statistics were made with another P/R subset")
        self.seen, self.acts = int(state["seen"]), state["acts"].astype(np.float32)
        for name, m in self.moments.items():
            if f"{name}.n" in state:
                m.n, m.shift = int(state[f"{name}.n"]), state[f"{name}.shift"]
                m.sum, m.outer = state[f"{name}.sum"], state[f"{name}.outer"]


def pr_subset(count: int, size: int, seed: int) -> np.ndarray:
    """Sorted stream positions of the precision/recall reference: a seeded random subset."""
    if size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, 1]).choice(count, size, replace=False))


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _load_partial(path: Path, settings: str) -> dict[str, np.ndarray] | None:
    """The saved state of an interrupted run with the same settings, else None (a stale one is removed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            state = {k: data[k] for k in data.files}
    except (OSError, ValueError):
        state = {}
    if str(state.get("settings", "")) == settings:
        return state
    print(f"{path} was made with other settings or code: starting over")
    path.unlink()
    return None


def reference_stats(source: str | Path, out: str | Path, weights: str | None, limit: int | None = None,
                    batch_size: int = 100, device: str = "auto", seed: int = 0,
                    pr_reference: int = 10000, dinov2_weights: str | None = None,
                    checkpoint_seconds: float = 120.0) -> dict:
    """Reference statistics of images, or of ADM's reference npz (its mu/sigma kept, acts added)."""
    start, device = time.time(), fp32_device(device)
    source = Path(source)
    known = read_reference(source) if source.suffix == ".npz" else {}
    _, count = image_source(source, batch_size, limit, seed)
    features = FeatureSet(load_inception(weights, device),
                          load_dinov2(dinov2_weights, device) if dinov2_weights else None, device)
    settings = json.dumps({
        "source": str(source.resolve()),
        "source_fingerprint": fingerprint(source) if source.is_file() else "",
        "inception": weights, "dinov2": dinov2_weights, "limit": limit, "seed": seed,
        "pr_reference": pr_reference, "count": count, "code": stage_code_version("reference-stats"),
    }, sort_keys=True)
    accumulator = ReferenceAccumulator(features.dims, pr_subset(count, pr_reference, seed))
    partial = partial_path(out)
    state = _load_partial(partial, settings)
    if state is not None:
        accumulator.restore(state)
        print(f"resuming after {accumulator.seen} of {count} images ({partial})")
    resumed_at = accumulator.seen
    batches, _ = image_source(source, batch_size, limit, seed, skip=accumulator.seen)
    saved = time.time()
    for block in features.stream(batches, count, initial=accumulator.seen, desc="reference features"):
        accumulator.update(block)
        if time.time() - saved >= checkpoint_seconds and accumulator.seen < count:
            write_npz(partial, settings=np.array(settings), **accumulator.state())
            saved = time.time()
    if accumulator.seen != count:
        raise ReDiError(f"{source}: expected {count} images, read {accumulator.seen}; did it change?")
    stats = accumulator.statistics()
    if {"mu", "sigma"} <= set(known):  # ADM's statistics cover the whole training set: keep them
        stats.update({k: known[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in known})
    write_npz(out, **stats, num_images=np.array(count))
    if partial.exists():
        os.remove(partial)
    return {"images": count, "resumed_after_images": resumed_at, "pr_reference_images": len(stats["acts"]),
            "source": str(source), "kept_statistics_of_source": "mu" in known,
            "inception_weights": weights or "torch-fidelity URL", "fd_dinov2_weights": dinov2_weights,
            "wall_time_s": round(time.time() - start, 2)}


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi reference-stats`."""
    c = cfg["evaluate"]
    result = reference_stats(args.source, args.out, c["inception_weights"], c["reference_images"],
                             c["batch_size"], args.device, pr_reference=c["pr_reference_images"],
                             dinov2_weights=c["fd_dinov2"]["weights"])
    write_manifest(Path(args.out).with_name("manifest.json"), "reference-stats", cfg, **result)
