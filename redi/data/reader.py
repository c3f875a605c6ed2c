"""Batches of (index, uint8 image, label) from the shards of a `shard` manifest."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import ReDiError
from ..io import read_manifest


def shard_paths(manifest_path: str | os.PathLike, todo: np.ndarray | None = None) -> list[str]:
    """Paths of the shards listed in a manifest; with a `todo` mask, only shards with work left."""
    manifest = read_manifest(manifest_path)
    folder = Path(manifest_path).parent
    return [
        str(folder / s["file"]) for s in manifest["shards"]
        if todo is None or todo[s["first_index"] : s["first_index"] + s["count"]].any()
    ]


def _decode(sample: dict) -> tuple[int, np.ndarray, int]:
    key = sample["__key__"]
    if not key.isdigit() or "png" not in sample or "cls" not in sample:
        raise ReDiError(f"{sample.get('__url__', 'a shard')} holds {key!r} with {sorted(sample)}, not "
                        f"<index>.png + <index>.cls: rerun the shard stage")
    return int(key), np.array(sample["png"]), int(sample["cls"])  # writable copy


def iter_batches(
    manifest_path: str | os.PathLike,
    batch_size: int,
    workers: int = 0,
    todo: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (indices, images uint8 NHWC, labels), in shard order when workers <= 1.

    `todo` is a boolean mask over sample indices: samples whose entry is False are skipped before
    decoding, so a resumed stage only reads what it still has to do.
    """
    import webdataset as wds  # here: the evaluate stage's modules import this one without reading shards

    urls = shard_paths(manifest_path, todo)
    if not urls:
        return
    dataset = wds.WebDataset(
        urls, shardshuffle=False, nodesplitter=lambda u: u, empty_check=False
    )
    if todo is not None:
        dataset = dataset.select(lambda s: not s["__key__"].isdigit() or bool(todo[int(s["__key__"])]))
    dataset = dataset.decode("rgb8").map(_decode)
    workers = min(workers, len(urls))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    yield from loader
