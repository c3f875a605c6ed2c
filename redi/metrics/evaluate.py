"""`redi evaluate`: the ADM protocol (FID, sFID, IS, precision/recall; + FD_DINOv2) of a samples npz
against reference statistics.

A reference file holds mu/sigma (pool3), mu_s/sigma_s (sFID) and `acts` (pool3 of the precision/recall
reference images); ADM's VIRTUAL_imagenet256_labeled.npz is read as is (its arr_0 gives the P/R
activations). Reference statistics are made by `redi reference-stats` (redi/metrics/reference.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import ReDiError
from ..io import sha256_file, write_json
from .dinov2 import DINOV2_KEY, load_dinov2
from .features import FeatureSet, extract, fp32_device, load_inception, read_reference, stats_of, weights_id
from .images import image_source
from .inception import NO_LOGITS
from .scores import frechet_distance, gaussian_stats, inception_score, precision_recall


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


def run_evaluate_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi evaluate`: metrics JSON (reference first, then samples)."""
    c = cfg["evaluate"]
    result = evaluate(args.reference, args.samples, c["inception_weights"], c["pr_reference_images"],
                      c["batch_size"], args.device, dinov2_weights=c["fd_dinov2"]["weights"])
    result.update({"reference": str(args.reference), "samples": str(args.samples)})
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k in ("fid", "sfid", "fd_dinov2", "inception_score",
                                                                 "precision", "recall")}))
