"""ImageNet-style folder -> webdataset tar shards of ADM-cropped PNGs with integer labels."""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..errors import ReDiError
from ..io import write_manifest
from ..progress import progress
from .crop import adm_center_crop

SHARD_PATTERN = "shard-{:06d}.tar"


def list_image_folder(
    root: str | os.PathLike, num_classes: int | None = None, skipped: list[dict] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names -> labels 0..C-1) and every (file, label), sorted.

    Entries that are no regular file inside `root` (dangling symlinks, symlinks leaving the
    folder, FIFOs, devices, folders) are left out and appended to `skipped` with the reason: they
    are never opened, so a FIFO cannot block the stage and a link cannot pull in outside data.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReDiError(f"input folder not found: {root} (expected <root>/<class>/<image>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ReDiError(f"no class folders in {root} (expected <root>/<class>/<image>)")
    if num_classes is not None and len(classes) != num_classes:
        raise ReDiError(
            f"{root} has {len(classes)} class folders but dataset.num_classes is {num_classes}"
        )
    items = []
    inside = root.resolve()
    for label, name in enumerate(classes):
        entries = sorted(f for f in (root / name).iterdir() if not f.name.startswith("."))
        if not entries:
            raise ReDiError(f"empty class folder: {root / name} (add its images or remove it)")
        for entry in entries:
            reason = unusable_entry(entry, inside)
            if reason is None:
                items.append((entry, label))
            elif skipped is not None:
                skipped.append({"path": str(entry), "reason": reason})
    return classes, items


def unusable_entry(entry: Path, root: Path) -> str | None:
    """Why a folder entry cannot be an image of the dataset rooted at `root` (resolved), or None."""
    if entry.is_symlink():
        target = entry.resolve()
        if not target.is_relative_to(root):
            return f"symlink leaving the dataset folder (-> {target})"
        if not target.exists():
            return f"dangling symlink (-> {target})"
    try:
        mode = entry.stat().st_mode
    except OSError as err:
        return f"cannot stat: {err.strerror}"
    if stat.S_ISREG(mode):
        return None
    kind = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
            stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
    return f"not a regular file ({next((v for k, v in kind.items() if k(mode)), 'special file')})"


def load_cropped_png(job: tuple[Path, int, int, float]) -> tuple[bytes | None, str | None]:
    """Decode one image, ADM-crop it and re-encode as PNG; on failure return the reason instead.

    The size caps are checked on the header, before any pixel is decoded or resized: a 370-byte
    300000x1 PNG would otherwise be scaled up to gigabytes.
    """
    path, size, max_pixels, max_aspect = job
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return None, (f"{width}x{height} = {width * height} pixels exceeds shard.max_pixels = "
                              f"{max_pixels}")
            if max(width, height) > max_aspect * min(width, height):
                return None, (f"aspect ratio of {width}x{height} exceeds shard.max_aspect_ratio = "
                              f"{max_aspect:g}")
            image.load()
            pixels = adm_center_crop(image, size)
    except ValueError as err:  # a pixel format with no sound 8-bit scaling (see to_rgb8)
        return None, str(err)
    except Exception as err:  # any unreadable file is reported and skipped, never fatal
        return None, f"{type(err).__name__}: {err}"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), None


class _ShardWriter:
    """Writes consecutive samples into fixed-size tar shards, each renamed into place when full."""

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None

    def write(self, index: int, png: bytes, label: int) -> None:
        if self._writer is None:
            name = SHARD_PATTERN.format(len(self.shards))
            self._writer = wds.TarWriter(str(self.out_dir / f".{name}.partial"))
            self.shards.append({"file": name, "first_index": index, "count": 0})
        self._writer.write({"__key__": f"{index:09d}", "png": png, "cls": label})
        self.shards[-1]["count"] += 1
        if self.shards[-1]["count"] == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            name = self.shards[-1]["file"]
            os.replace(self.out_dir / f".{name}.partial", self.out_dir / name)
            self._writer = None


def write_shards(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    image_size: int,
    shard_size: int = 1000,
    workers: int = 2,
    num_classes: int | None = None,
    config: dict | None = None,
    max_pixels: int = 100_000_000,
    max_aspect_ratio: float = 20.0,
) -> dict:
    """Shard an image folder; unreadable or unusable files are listed in the manifest and skipped."""
    start = time.time()
    skipped: list[dict] = []
    classes, items = list_image_folder(root, num_classes, skipped)
    entries = len(items) + len(skipped)
    for entry in skipped:
        tqdm.write(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for partial in out_dir.glob(".shard-*.partial"):  # left by a killed run
        partial.unlink()
    writer = _ShardWriter(out_dir, shard_size)
    counts: Counter[str] = Counter()
    jobs = [(path, image_size, max_pixels, max_aspect_ratio) for path, _ in items]
    with Pool(workers) if workers > 0 else _InProcess() as pool:
        results = pool.imap(load_cropped_png, jobs, chunksize=16)
        for (path, label), (png, reason) in zip(
            items, progress(results, total=len(items), desc="shard", unit="img"), strict=True
        ):
            if png is None:
                skipped.append({"path": str(path), "reason": reason})
                tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
                continue
            writer.write(sum(counts.values()), png, label)
            counts[classes[label]] += 1
    writer.close()
    written = {s["file"] for s in writer.shards}
    for stale in out_dir.glob("shard-*.tar"):  # left by an earlier run that made more shards
        if stale.name not in written:
            stale.unlink()
    if not counts:
        raise ReDiError(f"no readable image in {root}: all {entries} entries were skipped")
    return write_manifest(
        out_dir / "manifest.json", "shard", config or {},
        source=str(root), image_size=image_size, num_samples=sum(counts.values()),
        num_classes=len(classes), classes=classes,
        counts_per_class={name: counts[name] for name in classes},
        shards=writer.shards, skipped=skipped, wall_time_s=round(time.time() - start, 2),
    )


class _InProcess:
    """Stand-in for multiprocessing.Pool when workers == 0."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs, chunksize=1):
        return map(fn, jobs)


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi shard`."""
    s = cfg["shard"]
    write_shards(args.input, args.out, s["image_size"], s["shard_size"], s["workers"],
                 num_classes=cfg["dataset"]["num_classes"], config=cfg, max_pixels=s["max_pixels"],
                 max_aspect_ratio=s["max_aspect_ratio"])
