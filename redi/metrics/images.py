"""The images an evaluation reads, as uint8 NHWC batches: an ADM-style npz (`arr_0`, read member by
member, never whole), a shard manifest of this workflow, or a folder of images."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.reader import iter_batches
from ..errors import ReDiError
from ..io import read_manifest, require_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def npz_images(path: str | Path, batch_size: int, limit: int | None = None,
               skip: int = 0) -> Iterator[np.ndarray]:
    """Batches of arr_0 from an npz, streamed from the zip member (50k 256 px images are 9.8 GB)."""
    with zipfile.ZipFile(require_file(path, "npz file")) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise ReDiError(f"{path} has no arr_0 (ADM's sample/reference images, uint8 N x H x W x 3)")
        with archive.open("arr_0.npy") as f:
            shape, fortran, dtype = _npy_header(f)
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
                raise ReDiError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape}")
            n = shape[0] if limit is None else min(limit, shape[0])
            per_image = int(np.prod(shape[1:]))
            f.seek(f.tell() + min(skip, n) * per_image)  # zip members seek by reading ahead: no memory held
            for start in range(min(skip, n), n, batch_size):
                count = min(batch_size, n - start)
                chunk = bytearray(f.read(count * per_image))  # writable, no second copy
                yield np.frombuffer(chunk, dtype=np.uint8).reshape(count, *shape[1:])


def npz_image_count(path: str | Path) -> int:
    with zipfile.ZipFile(require_file(path, "npz file")) as archive, archive.open("arr_0.npy") as f:
        return int(_npy_header(f)[0][0])


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def shard_images(manifest: str | Path, batch_size: int, limit: int | None,
                 seed: int = 0, skip: int = 0) -> Iterator[np.ndarray]:
    """A seeded random subset of `limit` images of a shard stage (shards are in class order)."""
    total = sum(s["count"] for s in read_manifest(manifest)["shards"])
    todo = np.ones(total, dtype=bool)
    if limit is not None and limit < total:
        todo[:] = False
        todo[np.random.default_rng(seed).choice(total, limit, replace=False)] = True
    todo[np.flatnonzero(todo)[:skip]] = False  # resuming: the first `skip` of the subset are done
    for _, images, _ in iter_batches(manifest, batch_size, todo=todo):
        yield images.numpy()


def folder_images(folder: str | Path, batch_size: int, limit: int | None = None,
                  skip: int = 0) -> Iterator[np.ndarray]:
    """Images of a folder (recursively, sorted), which must share one size."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReDiError(f"no images (png/jpg/...) under {folder}")
    files = files[:limit][skip:]
    for start in range(0, len(files), batch_size):
        names = files[start:start + batch_size]
        batch = [np.asarray(Image.open(p).convert("RGB")) for p in names]
        for name, image in zip(names, batch, strict=True):
            if image.shape != batch[0].shape:
                raise ReDiError(f"{name} is {image.shape[1]}x{image.shape[0]}, {names[0]} is "
                                f"{batch[0].shape[1]}x{batch[0].shape[0]}: resize the images to one size")
        yield np.stack(batch)


def image_source(source: str | Path, batch_size: int, limit: int | None = None,
                 seed: int = 0, skip: int = 0) -> tuple[Iterator[np.ndarray], int]:
    """(batches, count) of an npz, a shard manifest.json or an image folder; count includes the
    first `skip` images, which the batches leave out (a resumed stage's done part)."""
    path = Path(source)
    if path.suffix == ".npz":
        count = npz_image_count(path)
        return npz_images(path, batch_size, limit, skip), min(count, limit or count)
    if path.name == "manifest.json":
        manifest = read_manifest(path)
        if manifest.get("stage") != "shard":
            raise ReDiError(f"{path} is the manifest of '{manifest.get('stage')}', not of the shard stage; "
                            f"for samples pass their samples.npz")
        total = sum(s["count"] for s in manifest["shards"])
        return shard_images(path, batch_size, limit, seed, skip), min(total, limit or total)
    if path.is_dir():
        count = sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return folder_images(path, batch_size, limit, skip), min(count, limit or count)
    raise ReDiError(f"image source {source}: expected an .npz (arr_0), a shard manifest.json or a folder")
