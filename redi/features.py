"""Patch features: raw tokens of a class-balanced sample (for PCA), and PCA maps of every image."""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from .code_version import stage_code_version
from .data.reader import iter_batches
from .encoders import PatchFeatureEncoder, load_encoder, resolve_device
from .errors import ReDiError
from .h5store import ResumableH5, provenance
from .io import read_manifest, write_manifest
from .pca import load_pca, project
from .progress import progress


def class_counts(shard_manifest: dict) -> list[int]:
    """Images per class, in label order."""
    return [shard_manifest["counts_per_class"][name] for name in shard_manifest["classes"]]


def class_ranges(shard_manifest: dict) -> list[tuple[int, int]]:
    """[start, stop) index range of each class: shards hold the classes in label order."""
    counts = class_counts(shard_manifest)
    stops = np.cumsum(counts)
    return [(int(b - c), int(b)) for b, c in zip(stops, counts, strict=True)]


def labels_of(shard_manifest: dict) -> np.ndarray:
    """The label of every sample index, from the per-class counts."""
    counts = class_counts(shard_manifest)
    return np.repeat(np.arange(len(counts)), counts)


def balanced_sample(ranges: list[tuple[int, int]], size: int, seed: int) -> np.ndarray:
    """`size` sample indices, as equal per class as the class sizes allow, in shuffled order."""
    rng = np.random.default_rng(seed)
    available = np.array([stop - start for start, stop in ranges])
    if size > available.sum():
        raise ReDiError(f"pca.sample_images = {size} exceeds the {available.sum()} images sharded")
    quota = np.zeros_like(available)
    while quota.sum() < size:  # water-filling: share what is left among classes not yet exhausted
        open_classes = np.flatnonzero(quota < available)
        share = max(1, (size - quota.sum()) // len(open_classes))
        for c in rng.permutation(open_classes):
            quota[c] += min(share, available[c] - quota[c], size - quota.sum())
    chosen = [start + rng.choice(stop - start, q, replace=False)
              for (start, stop), q in zip(ranges, quota, strict=True)]
    return rng.permutation(np.concatenate(chosen))


def extract_features(
    shard_manifest: str | os.PathLike,
    encoder: PatchFeatureEncoder,
    out_path: str | os.PathLike,
    sample_images: int,
    seed: int = 0,
    dtype: str = "float16",
    batch_size: int = 64,
    workers: int = 2,
    config: dict | None = None,
) -> dict:
    """Write `features.h5`: tokens (n, grid*grid, D) of a random class-balanced sample; resumable.

    Row i holds sample index `index[i]`. Rows are stored in index order, the order the shards are
    read in, so chunks are written once; the PCA does not depend on the order of its vectors.
    """
    start = time.time()
    shards = read_manifest(shard_manifest)
    sample = np.sort(balanced_sample(class_ranges(shards), sample_images, seed))
    row_of = np.full(shards["num_samples"], -1, dtype=np.int64)
    row_of[sample] = np.arange(len(sample))
    tokens = encoder.grid[0] * encoder.grid[1]
    store = ResumableH5(
        out_path, len(sample),
        datasets={"tokens": ((tokens, encoder.dim), dtype), "index": ((), "int64"),
                  "labels": ((), "int64")},
        attrs={"grid": encoder.grid[0], "seed": seed, **provenance(shard_manifest, encoder)},
        chunk_rows=16, code=stage_code_version("extract-features"),
    )
    todo = np.zeros(shards["num_samples"], dtype=bool)
    todo[sample[store.todo]] = True
    done_before = len(sample) - int(todo.sum())
    with progress(total=len(sample), initial=done_before, desc="extract-features", unit="img") as bar:
        for idx, images, labels in iter_batches(shard_manifest, batch_size, workers, todo):
            feats = encoder(images).cpu().numpy().astype(dtype)
            store.write(row_of[idx.numpy()], tokens=feats, index=idx.numpy(), labels=labels.numpy())
            bar.update(len(idx))
    store.finish()
    elapsed = time.time() - start
    return write_manifest(
        Path(out_path).with_name("manifest.json"), "extract-features", config or {},
        inputs={"shards": shard_manifest}, num_images=len(sample), grid=encoder.grid[0],
        dim=encoder.dim, dtype=dtype, wall_time_s=round(elapsed, 2),
        images_per_s=round((len(sample) - done_before) / max(elapsed, 1e-9), 2),
        images_per_class=np.bincount(labels_of(shards)[sample], minlength=len(shards["classes"]))
        .tolist(),
    )


def project_features(
    shard_manifest: str | os.PathLike,
    encoder: PatchFeatureEncoder,
    pca: dict[str, np.ndarray],
    out_path: str | os.PathLike,
    rank_max: int,
    flip: bool = True,
    dtype: str = "float16",
    batch_size: int = 64,
    workers: int = 2,
    config: dict | None = None,
    inputs: dict | None = None,
) -> dict:
    """Write `pca_features.h5`: z (N, r_max, grid, grid) [+ z_flip], labels; resumable.

    `component_std` (r_max,) holds each channel's standard deviation (sqrt of its explained
    variance), so training can normalise channels to unit variance when configured to.
    """
    start = time.time()
    shards = read_manifest(shard_manifest)
    n = shards["num_samples"]
    dim = pca["components"].shape[1]
    if encoder.dim != dim:
        raise ReDiError(f"the PCA was fitted on {dim}-d features but the encoder gives {encoder.dim}")
    if rank_max > dim:
        raise ReDiError(f"pca.rank_max = {rank_max} exceeds the feature dimension {dim}")
    gh, gw = encoder.grid
    names = ["z", "z_flip"] if flip else ["z"]
    pca_id = hashlib.sha256(np.ascontiguousarray(pca["components"][:rank_max]).tobytes()).hexdigest()[:16]
    store = ResumableH5(
        out_path, n,
        datasets={**{k: ((rank_max, gh, gw), dtype) for k in names}, "labels": ((), "int64")},
        attrs={"rank_max": rank_max, "flip": flip, "pca": pca_id, **provenance(shard_manifest, encoder)},
        code=stage_code_version("project-features"),
    )
    todo = store.todo
    with progress(total=n, initial=n - int(todo.sum()), desc="project-features", unit="img") as bar:
        for idx, images, labels in iter_batches(shard_manifest, batch_size, workers, todo):
            views = {"z": images, "z_flip": torch.flip(images, dims=[2]) if flip else None}
            out = {}
            for name in names:
                z = project(encoder(views[name]).cpu().numpy(), pca, rank_max)  # (B, gh*gw, r)
                out[name] = z.transpose(0, 2, 1).reshape(len(idx), rank_max, gh, gw).astype(dtype)
            store.write(idx.numpy(), labels=labels.numpy(), **out)
            bar.update(len(idx))
    store.finish(component_std=np.sqrt(pca["explained_variance"][:rank_max]),
                 explained_variance_ratio=pca["explained_variance_ratio"][:rank_max])
    return write_manifest(
        Path(out_path).with_name("manifest.json"), "project-features", config or {},
        inputs={"shards": shard_manifest, **(inputs or {})}, num_samples=n, rank_max=rank_max,
        grid=gh, flip=flip,
        dtype=dtype, wall_time_s=round(time.time() - start, 2),
        images_per_s=round(float(todo.sum()) / max(time.time() - start, 1e-9), 2),
    )


def _feature_encoder(args: argparse.Namespace, cfg: dict) -> PatchFeatureEncoder:
    c = cfg["features"]
    return load_encoder(c["encoder"]["name"], c["encoder"]["weights"], resolve_device(args.device),
                        grid=c["grid"], kind="vit")


def run_extract_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi extract-features`."""
    c = cfg["features"]
    extract_features(args.shards, _feature_encoder(args, cfg), args.out, cfg["pca"]["sample_images"],
                     cfg["pca"]["seed"], c["dtype"], c["batch_size"], c["workers"], config=cfg)


def run_project_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi project-features`."""
    c = cfg["features"]
    project_features(args.shards, _feature_encoder(args, cfg), load_pca(args.pca), args.out,
                     cfg["pca"]["rank_max"], cfg["latents"]["flip"], c["dtype"], c["batch_size"],
                     c["workers"], config=cfg, inputs={"pca": Path(args.pca).with_name("manifest.json")})
