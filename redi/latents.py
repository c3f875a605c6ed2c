"""encode-latents: every image (and optionally its flip) -> VAE posterior mean and std in HDF5."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from .code_version import stage_code_version
from .data.reader import iter_batches
from .encoders import LatentEncoder, load_encoder, resolve_device
from .h5store import ResumableH5, provenance
from .io import read_manifest, write_manifest
from .progress import progress


def encode_latents(
    shard_manifest: str | os.PathLike,
    encoder: LatentEncoder,
    out_path: str | os.PathLike,
    flip: bool = True,
    dtype: str = "float16",
    batch_size: int = 64,
    workers: int = 2,
    config: dict | None = None,
) -> dict:
    """Write `latents.h5`: mean/std (N, C, h, w) [+ mean_flip/std_flip], labels (N,); resumable.

    Training draws latent = (mean + std * eps) * scaling_factor (stored as an attribute) afresh
    every step, so the posterior, not one sample of it, is stored.
    """
    start = time.time()
    shards = read_manifest(shard_manifest)
    n, size = shards["num_samples"], shards["image_size"]
    latent = (encoder.latent_channels, size // encoder.downsample, size // encoder.downsample)
    names = ["mean", "std"] + (["mean_flip", "std_flip"] if flip else [])
    store = ResumableH5(
        out_path, n,
        datasets={**{k: (latent, dtype) for k in names}, "labels": ((), "int64")},
        attrs={"scaling_factor": encoder.scaling_factor, "image_size": size, "flip": flip,
               "num_classes": shards["num_classes"],
               **provenance(shard_manifest, encoder)},
        code=stage_code_version("encode-latents"),
    )
    todo = store.todo
    with progress(total=n, initial=n - int(todo.sum()), desc="encode-latents", unit="img") as bar:
        for idx, images, labels in iter_batches(shard_manifest, batch_size, workers, todo):
            out = dict(zip(("mean", "std"), encoder(images), strict=True))
            if flip:
                out["mean_flip"], out["std_flip"] = encoder(torch.flip(images, dims=[2]))
            store.write(idx.numpy(), labels=labels.numpy(),
                        **{k: v.cpu().numpy().astype(dtype) for k, v in out.items()})
            bar.update(len(idx))
    store.finish()
    return write_manifest(
        Path(out_path).with_name("manifest.json"), "encode-latents", config or {},
        inputs={"shards": shard_manifest}, num_samples=n, latent_shape=list(latent),
        scaling_factor=encoder.scaling_factor, flip=flip, dtype=dtype,
        wall_time_s=round(time.time() - start, 2),
        images_per_s=round(float((todo.sum()) / max(time.time() - start, 1e-9)), 2),
        resumed_rows=int(n - np.count_nonzero(todo)),
    )


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi encode-latents`."""
    c = cfg["latents"]
    encoder = load_encoder(c["encoder"]["name"], c["encoder"]["weights"], resolve_device(args.device),
                           kind="vae")
    encode_latents(args.shards, encoder, args.out, c["flip"], c["dtype"], c["batch_size"],
                   c["workers"], config=cfg)
