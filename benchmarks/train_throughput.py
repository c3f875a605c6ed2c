"""Training throughput: the in-memory loader (TrainingData) and full training steps as redi/train.py runs.

--loader writes a synthetic latents.h5 + pca_features.h5 pair in the layout the encode-latents and
project-features stages write, times the TrainingData constructor (the load into memory) and
next_batch + the posterior sample on ONE CPU thread, and reports samples/s (target >= 5,000) and the
resident memory per sample. --model times train.py's step (batch to device, posterior sample, joint
loss under bf16 autocast on CUDA, finite check, zero_grad, backward, clip_grad_norm_, AdamW, EMA)
for each --fusion variant, interleaved in a carry-over-balanced order, medians per variant.
See benchmarks/README.md.

    python benchmarks/train_throughput.py --loader                    # CPU, ~1 minute, ~2 GiB RAM
    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --model   # CPU: DiT-B/2, batch 8, ~4 minutes
    python benchmarks/train_throughput.py --model --size XL --batch 32 --fusion none,merged,separate  # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from interleave import cycle_rounds, round_order  # benchmarks/, this script's folder
from machine import MIB, busy, finish, machine_info

LOADER_TARGET = 5000  # samples/s of (latent, feature, label) on one CPU thread
RATIO_TARGET = 1.01  # merged / none step time, DiT-B/2 on CPU
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.7}, "H200": {"bf16": 989.0, "fp32": 494.7}}  # dense
FLOP_NOTE = ("TFLOP/s = 3 x forward FLOPs (2 x redi.models.forward_macs total) x batch / step time: "
             "backward assumed 2x the forward; norms, activations, the loss, AdamW and EMA not counted")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--loader", action="store_true", help="part 1: loader throughput (neither flag: both)")
    p.add_argument("--model", action="store_true", help="part 2: training-step throughput")
    p.add_argument("--grad-norm", action="store_true",
                   help="part 3: the step's gradient-norm work before (clip_grad_norm_ with no limit: norm + "
                   "a rescale by 1.0) and now (the norm alone when train.grad_clip is 0), interleaved")
    g = p.add_argument_group("loader")
    g.add_argument("--samples", type=int, default=20_000, help="synthetic samples N in the HDF5 pair")
    g.add_argument("--rank-max", type=int, default=8, help="PCA channels stored in pca_features.h5")
    g.add_argument("--loader-batch", type=int, default=256, help="next_batch size")
    g.add_argument("--loader-seconds", type=float, default=3.0, help="timed next_batch loop length")
    g.add_argument("--loader-threads", type=int, default=1, help="torch threads of the loader loop")
    g.add_argument("--write-chunk", type=int, default=1024, help="rows per HDF5 write")
    g.add_argument("--warm-cache", action="store_true",
                   help="skip the cold load (default: drop the files' page cache, load, then load warm)")
    g.add_argument("--out-dir", type=Path, default=None, help="folder of the HDF5 pair (default: temp)")
    g.add_argument("--keep", action="store_true", help="keep the HDF5 pair")
    g = p.add_argument_group("model")
    g.add_argument("--size", default="B", choices=("S", "B", "L", "XL"), help="model size")
    g.add_argument("--patch", type=int, default=2, choices=(2, 4, 8), help="patch size")
    g.add_argument("--batch", type=int, default=None, help="images per step (default: 8 on cpu, 256 on cuda)")
    g.add_argument("--fusion", default="none,merged", help="comma list of none/merged/separate")
    g.add_argument("--objective", default="interpolant", choices=("ddpm", "interpolant"))
    g.add_argument("--rep-channels", type=int, default=8, help="PCA channels r (train.rank)")
    g.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda if any")
    g.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast of the loss, as train.precision: auto = bf16 on cuda, fp32 on cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model, as train.compile")
    g.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (train.compile uses inductor; 'eager' or 'aot_eager' only "
                   "trace, for a quick dry run of the compiled path on CPU)")
    g.add_argument("--grad-checkpointing", action="store_true", help="as train.grad_checkpointing")
    g.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: 1 on cpu, 3 on cuda)")
    g.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5 cpu, 20 cuda)")
    g.add_argument("--threads", type=int, default=None, help="torch threads, model part (default: torch's)")
    g.add_argument("--deadline", type=float, default=float(os.environ.get("PART_DEADLINE", 0)) or None,
                   help="Unix time: start no timed round that would end after it, report what was measured "
                   "(default: $PART_DEADLINE, set by gpu_check.sh)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak of the device for MFU (default: H100/H200 dense 989 bf16, 495 tf32; else n/a)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, weights and noise")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if not (args.loader or args.model or args.grad_norm):
        args.loader = args.model = True
    args.fusions = [f.strip() for f in args.fusion.split(",") if f.strip()]
    from redi.config import load_schema

    known = load_schema()["properties"]["train"]["properties"]["model"]["properties"]["fusion"]["enum"]
    if not args.fusions or not set(args.fusions) <= set(known) or len(set(args.fusions)) < len(args.fusions):
        p.error(f"--fusion must be a comma list of distinct {'/'.join(known)}, got {args.fusion!r}")
    if args.samples < 1 or args.rank_max < 1 or args.loader_batch < 1 or args.loader_batch > args.samples:
        p.error("need --samples >= --loader-batch >= 1 and --rank-max >= 1")
    if args.input_size % args.patch or args.input_size % 2:
        p.error(f"--input-size {args.input_size} must be even and divisible by --patch {args.patch}")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cuda = args.device == "cuda"
    if args.dtype == "auto":
        args.dtype = "bf16" if cuda else "fp32"
    args.batch = args.batch or (256 if cuda else 8)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.steps = (20 if cuda else 5) if args.steps is None else args.steps
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.rep_channels < 1:
        p.error("need --batch >= 1, --steps >= 1, --warmup >= 0 and --rep-channels >= 1")
    return args


def proc_status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in MiB (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return {ln.split(":")[0]: int(ln.split()[1]) / 1024
                    for ln in f if ln.startswith(("VmRSS", "VmHWM"))}
    except OSError:
        return {}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- part 1: loader


def write_synthetic_pair(work: Path, n: int, r_max: int, side: int, grid: int, chunk: int, seed: int) -> dict:
    """latents.h5 + pca_features.h5 as encode-latents / project-features write them (ResumableH5:
    64-row chunks, `done`), random values, written `chunk` rows at a time; fsynced."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    latent = (4, side, side)
    labels = rng.integers(0, 1000, n, dtype=np.int64)
    lat_path, feat_path = work / "latents.h5", work / "pca_features.h5"
    with h5py.File(lat_path, "w") as lat, h5py.File(feat_path, "w") as feat:
        lat.attrs.update({"scaling_factor": 0.18215, "image_size": 8 * side, "flip": True,
                          "shards": "synthetic", "encoder": "synthetic"})
        feat.attrs.update({"rank_max": r_max, "flip": True, "shards": "synthetic", "encoder": "synthetic",
                           "pca": "synthetic"})
        sets = {k: lat.create_dataset(k, (n, *latent), dtype="float16", chunks=(min(64, n), *latent))
                for k in ("mean", "std", "mean_flip", "std_flip")}
        sets |= {k: feat.create_dataset(k, (n, r_max, grid, grid), dtype="float16",
                                        chunks=(min(64, n), r_max, grid, grid)) for k in ("z", "z_flip")}
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            for name, ds in sets.items():
                x = rng.standard_normal((r1 - r0, *ds.shape[1:]), dtype=np.float32)
                if name.startswith("std"):
                    x = np.exp(0.5 * x - 3.0)  # posterior std: positive, ~0.05
                elif name.startswith("z"):
                    x *= 5.0  # the official PCA channels have std ~4-6
                ds[r0:r1] = x.astype(np.float16)
        for f in (lat, feat):
            f.create_dataset("labels", data=labels)
            f.create_dataset("done", data=np.ones(n, dtype=bool))
        feat.create_dataset("component_std", data=np.full(r_max, 5.0))
        feat.create_dataset("explained_variance_ratio", data=np.full(r_max, 0.01))
    for path in (lat_path, feat_path):
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    return {"latents": lat_path, "features": feat_path}


def drop_page_cache(*paths: Path) -> bool:
    """Ask the kernel to evict these (fsynced, clean) files from the page cache; no root needed."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def bench_loader(args) -> dict:
    import torch

    from redi.data.training_data import TrainingData

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.loader_threads)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        work = args.out_dir
    else:
        work = Path(tempfile.mkdtemp(prefix="redi-loader-"))
    try:
        start = time.perf_counter()
        paths = write_synthetic_pair(work, args.samples, args.rank_max, args.input_size,
                                     args.input_size // args.patch, args.write_chunk, args.seed)
        write_s = time.perf_counter() - start
        file_mib = {k: p.stat().st_size / MIB for k, p in paths.items()}

        def load():
            return TrainingData(paths["latents"], paths["features"], rank=args.rank_max, normalize_z=False,
                                flip=True, seed=args.seed)

        loads = {}
        if not args.warm_cache:
            cold = drop_page_cache(*paths.values())
            gc.collect()
            before = proc_status()
            peak_reset = reset_peak_rss()
            start = time.perf_counter()
            data = load()
            loads["cold" if cold else "first"] = time.perf_counter() - start
            after = proc_status()
            del data
            gc.collect()
        gc.collect()
        before_warm = proc_status()
        peak_reset = reset_peak_rss()
        start = time.perf_counter()
        data = load()
        loads["warm"] = time.perf_counter() - start
        after_warm = proc_status()
        if args.warm_cache:
            before, after = before_warm, after_warm
        n = data.size
        held = sum(t.numel() * t.element_size() for t in (data.mean, data.std, data.z, data.labels))
        sf = data.scaling_factor

        # train.py's loop on the CPU side: next_batch, then the posterior sample (on the device; here CPU)
        bs = args.loader_batch
        for _ in range(3):  # warm-up
            b = data.next_batch(bs)
            (b["mean"] + b["std"] * torch.randn_like(b["std"])) * sf
        t_batch, t_sample = [], []
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - wall0 < args.loader_seconds:
            t0 = time.perf_counter()
            b = data.next_batch(bs)
            t1 = time.perf_counter()
            x = (b["mean"] + b["std"] * torch.randn_like(b["std"])) * sf
            t_sample.append(time.perf_counter() - t1)
            t_batch.append(t1 - t0)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        assert x.shape == (bs, 4, args.input_size, args.input_size) and b["z"].shape[1] == args.rank_max
        batches = len(t_batch)
        rate = batches * bs / wall
        per_sample_rss = (after["VmRSS"] - before["VmRSS"]) * MIB / n if after else None
        result = {
            "samples": n, "rank_max": args.rank_max, "views": data.num_views, "batch": bs,
            "latent_shape": list(data.mean.shape[2:]), "z_shape": list(data.z.shape[2:]),
            "threads": torch.get_num_threads(), "write_s": write_s, "file_mib": file_mib,
            "load_s": loads, "load_mib_per_s": {k: sum(file_mib.values()) / v for k, v in loads.items()},
            "held_bytes_per_sample": held / n,
            "expected_bytes_per_sample": 8 + data.num_views * 2 * (
                2 * 4 * args.input_size ** 2 + args.rank_max * (args.input_size // args.patch) ** 2),
            "rss_bytes_per_sample": per_sample_rss,
            "rss_before_mib": before.get("VmRSS"), "rss_after_mib": after.get("VmRSS"),
            "peak_rss_during_load_mib": after.get("VmHWM") if peak_reset else None,
            "batches": batches, "wall_s": wall, "process_cpu_s": cpu,
            "next_batch_ms_median": 1e3 * statistics.median(t_batch),
            "sample_ms_median": 1e3 * statistics.median(t_sample),
            "batch_ms_median": 1e3 * statistics.median(a + b for a, b in zip(t_batch, t_sample, strict=True)),
            "samples_per_s": rate, "target_samples_per_s": LOADER_TARGET, "pass": rate >= LOADER_TARGET,
        }
        del data, b, x
        gc.collect()
        return result
    finally:
        torch.set_num_threads(previous_threads)
        if args.keep:
            print(f"HDF5 pair kept in {work}", file=sys.stderr)
        elif args.out_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for name in ("latents.h5", "pca_features.h5"):
                (work / name).unlink(missing_ok=True)


def print_loader(r: dict) -> None:
    shape = "x".join(map(str, r["latent_shape"])), "x".join(map(str, r["z_shape"]))
    print(f"\nredi loader benchmark: TrainingData, {r['samples']:,} samples x {r['views']} views (flip): "
          f"mean+std {shape[0]} + z {shape[1]}, float16")
    print(f"files: latents.h5 {r['file_mib']['latents']:.0f} MiB + pca_features.h5 "
          f"{r['file_mib']['features']:.0f} MiB (written + fsynced in {r['write_s']:.1f} s)")
    for kind, secs in r["load_s"].items():
        note = {"cold": "after posix_fadvise(DONTNEED) of both files: read from disk",
                "warm": "files in the page cache", "first": "page cache not dropped (no posix_fadvise)"}[kind]
        print(f"load ({kind}): {secs:6.2f} s {r['load_mib_per_s'][kind]:7.0f} MiB/s  TrainingData(), {note}")
    rss, peak = r["rss_bytes_per_sample"], r["peak_rss_during_load_mib"]
    print(f"resident per sample: {rss / 1024:.2f} KiB RSS growth | " if rss is not None else "resident: ",
          f"{r['held_bytes_per_sample'] / 1024:.2f} KiB held in tensors (expected "
          f"{r['expected_bytes_per_sample'] / 1024:.2f} KiB) | RSS {r['rss_before_mib']:.0f} -> "
          f"{r['rss_after_mib']:.0f} MiB" + (f", peak during load {peak:.0f} MiB" if peak else ""), sep="")
    print(f"\n{'loop on ' + str(r['threads']) + ' CPU thread(s), batch ' + str(r['batch']):<44}"
          f"{'ms/batch':>10}{'samples/s':>12}")
    for label, ms in (("next_batch (gather + float + z scale)", r["next_batch_ms_median"]),
                      ("posterior sample (mean + std*eps)*sf", r["sample_ms_median"]),
                      ("total (median batch)", r["batch_ms_median"])):
        print(f"  {label:<42}{ms:>10.2f}{r['batch'] / ms * 1e3:>12,.0f}")
    verdict = "PASS" if r["pass"] else "FAIL"
    print(f"  {'overall: ' + str(r['batches']) + ' batches in ' + format(r['wall_s'], '.1f') + ' s':<42}"
          f"{1e3 * r['wall_s'] / r['batches']:>10.2f}{r['samples_per_s']:>12,.0f}  "
          f"target >= {r['target_samples_per_s']:,} -> {verdict}")


# ---------------------------------------------------------------- part 2: training steps


def train_config(args, fusion: str) -> dict:
    """The `train` config section (schema defaults) of this variant."""
    from redi.config import validate_config

    train = {"objective": args.objective, "rank": args.rep_channels, "compile": args.compile,
             "grad_checkpointing": args.grad_checkpointing, "batch_size": args.batch,
             "precision": args.dtype,
             "model": {"size": args.size, "patch": args.patch, "fusion": fusion}}
    return validate_config({"dataset": {"name": "benchmark"}, "train": train})["train"]


def build_variant(fusion: str, args, device) -> dict:
    """Model, EMA, AdamW and the training step exactly as redi.train builds them (new_training, TrainStep)."""
    import torch

    from redi.models import forward_macs
    from redi.train import TrainStep, new_training

    cfg = train_config(args, fusion) | {"seed": args.seed}  # the same initial weights in every variant
    model, ema, opt, objective = new_training(cfg, 1000, args.input_size, device)
    forward = torch.compile(model, backend=args.compile_backend) if cfg["compile"] else model
    step = TrainStep(model, ema, opt, objective, cfg, device, 0.18215, forward=forward)
    return {"fusion": fusion, "cfg": cfg, "model": model, "step": step, "number": 0,
            "macs": forward_macs(model),
            "params": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "times": [], "cpu_times": [], "peak_mib": 0.0, "resident_mib": 0.0, "loss": None, "error": None}


def synthetic_training_data(args):
    """The data as train.py holds it: TrainingData over float16 rows of a synthetic latents.h5 /
    pca_features.h5 pair (two batches' worth; the files are read into memory and removed)."""
    from redi.data.training_data import TrainingData

    grid, b = args.input_size // args.patch, args.batch
    work = Path(tempfile.mkdtemp(prefix="redi-step-"))
    try:
        pair = write_synthetic_pair(work, 2 * b, args.rep_channels, args.input_size, grid, 2 * b, args.seed)
        return TrainingData(pair["latents"], pair["features"], args.rep_channels, seed=args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_step(v: dict, data, batch_size: int, device) -> dict:
    """One step of redi.train's loop, logging and checkpointing aside: next_batch on the device (pinned
    float16 rows on CUDA) + TrainStep; synchronised, and the non-finite flags read, after it."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for group in v["step"].opt.param_groups:
        group["lr"] = v["cfg"]["lr"]
    v["number"] += 1
    losses = v["step"](data.next_batch(batch_size, device), v["number"])
    if cuda:
        torch.cuda.synchronize(device)
    out = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu}
    if cuda:
        out.update(peak_mib=torch.cuda.max_memory_allocated(device) / MIB, resident_mib=resident / MIB)
    v["step"].check()  # untimed: on CUDA train.py reads the flags every CUDA_CHECK_EVERY steps
    v["loss"] = float(losses["loss"].detach())
    v["model"].zero_grad(set_to_none=True)  # untimed: free this variant's gradients before the next one runs
    return out


def default_peak(device, dtype: str) -> tuple[float | None, str]:
    import torch

    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype], f"{key} dense {dtype if dtype == 'bf16' else 'tf32'}"
    return None, name


def bench_model(args) -> dict:
    import torch

    from redi.devices import allow_tf32
    from redi.train import NonFiniteStep

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    allow_tf32(device)  # as train.py
    variants = [build_variant(f, args, device) for f in args.fusions]
    s, b = args.input_size, args.batch
    data = synthetic_training_data(args)
    oom = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))
    torch.manual_seed(args.seed * 1000)
    cycle = cycle_rounds(len(variants))
    args.steps = -(-args.steps // cycle) * cycle  # whole balanced cycles
    total, round_s, stopped = args.warmup + args.steps, 0.0, None
    for rnd in range(total):
        if args.deadline and rnd > args.warmup and time.time() + round_s > args.deadline:
            stopped = f"stopped after {rnd - args.warmup} timed round(s): --deadline"
            print(stopped, file=sys.stderr, flush=True)
            break
        round_start = time.time()
        for v in (variants[i] for i in round_order(len(variants), rnd - args.warmup)):
            if v["error"]:
                continue
            try:
                step = train_step(v, data, b, device)
            except (oom, NonFiniteStep) as err:
                v["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            if v["error"]:  # outside the except block, so that the traceback's tensors are gone too
                print(f"{v['fusion']}: {v['error']}; dropped", file=sys.stderr, flush=True)
                for key in ("model", "step"):
                    v[key] = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if rnd >= args.warmup:  # warm-up steps (and compilation) are neither timed nor measured
                v["times"].append(step["wall_s"])
                v["cpu_times"].append(step["cpu_s"])
                if device.type == "cuda":
                    v["peak_mib"] = max(v["peak_mib"], step["peak_mib"])
                    v["resident_mib"] = max(v["resident_mib"], step["resident_mib"])
        print(f"round {rnd + 1}/{total}{' (warm-up)' if rnd < args.warmup else ''}: "
              + ", ".join(f"{v['fusion']} {1e3 * v['times'][-1]:.0f} ms" if rnd >= args.warmup and v["times"]
                          else v["fusion"] + (" (dropped)" if v["error"] else "") for v in variants),
              file=sys.stderr, flush=True)
        round_s = time.time() - round_start

    peak, peak_source = default_peak(device, args.dtype)
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    base = next((v for v in variants if v["fusion"] == "none" and v["times"]), None) or \
        next((v for v in variants if v["times"]), None)
    rows = {}
    for v in variants:
        gflops = v["macs"]["total"] * 2 / 1e9
        row = {"params": v["params"], "gflops_per_sample": gflops, "error": v["error"],
               "final_loss": v["loss"]}
        if v["times"]:
            median = statistics.median(v["times"])
            tflops = 3 * gflops * b / median / 1e3
            row.update(step_s_median=median, step_s_min=min(v["times"]), step_s_max=max(v["times"]),
                       step_s_all=v["times"], process_cpu_s_median=statistics.median(v["cpu_times"]),
                       images_per_s=b / median, achieved_tflops=tflops,
                       mfu=tflops / peak if peak else None)
            if device.type == "cuda":
                row.update(peak_mib=v["peak_mib"], resident_mib=v["resident_mib"])
            if base is not None and v is not base:
                paired = [t / u for t, u in zip(v["times"], base["times"], strict=False)]
                row.update(step_ratio=median / statistics.median(base["times"]),
                           step_ratio_paired=statistics.median(paired),
                           cpu_time_ratio=row["process_cpu_s_median"] / statistics.median(base["cpu_times"]),
                           flops_ratio=v["macs"]["total"] / base["macs"]["total"])
        rows[v["fusion"]] = row
    merged = rows.get("merged", {})
    target = None
    if base is not None and base["fusion"] == "none" and "step_ratio_paired" in merged:
        ratio = max(merged["step_ratio"], merged["step_ratio_paired"])
        target = {"ratio": ratio, "limit": RATIO_TARGET, "pass": ratio <= RATIO_TARGET,
                  "applies": device.type == "cpu" and args.size == "B" and args.patch == 2}
    return {"device": device.type, "peak_tflops": peak, "peak_source": peak_source,
            "baseline": base["fusion"] if base else None, "tokens": (s // args.patch) ** 2,
            "variants": rows, "merged_target": target, "flop_assumption": FLOP_NOTE, "stopped": stopped}


def print_model(r: dict, s: dict, m: dict) -> None:
    cuda = r["device"] == "cuda"
    where = (f"GPU {m.get('gpu')}" if cuda else
             f"CPU, {s['model_threads']} torch thread(s) of {m['cpu_affinity']} usable cores")
    print(f"\nredi training-throughput benchmark: DiT-{s['size']}/{s['patch']}, latent 4x{s['input_size']}"
          f"x{s['input_size']}, {r['tokens']} tokens, batch {s['batch']}, {s['objective']}, r = "
          f"{s['rep_channels']}, {s['dtype']}{', torch.compile' if s['compile'] else ''}"
          f"{', grad checkpointing' if s['grad_checkpointing'] else ''}, {where}")
    print("step = redi.train's: next_batch on the device + TrainStep (posterior sample, joint loss under "
          "autocast, zero_grad, backward, gradient norm, non-finite check, AdamW, EMA);")
    print(f"{s['steps']} timed steps per variant after {s['warmup']} warm-up round(s), interleaved "
          f"carry-over balanced, median; MFU peak: {r['peak_tflops'] or 'n/a'} TFLOP/s ({r['peak_source']})")
    head = (f"\n{'variant':<10}{'params':>13}{'GFLOP/img':>11}{'step ms':>10}{'min..max ms':>15}"
            f"{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}")
    print(head + (f"{'peak MiB':>10}{'resid MiB':>10}" if cuda else f"{'CPU s':>8}"))
    for name, row in r["variants"].items():
        label = "baseline" if name == r["baseline"] and name == "none" else name
        if "step_s_median" not in row:
            print(f"{label:<10}{row['params']:>13,}{row['gflops_per_sample']:>11.2f}  {row['error']}")
            continue
        spread = f"{1e3 * row['step_s_min']:.0f}..{1e3 * row['step_s_max']:.0f}"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        line = (f"{label:<10}{row['params']:>13,}{row['gflops_per_sample']:>11.2f}"
                f"{1e3 * row['step_s_median']:>10.1f}{spread:>15}{row['images_per_s']:>9.2f}"
                f"{row['achieved_tflops']:>9.3f}{mfu:>7}")
        line += (f"{row['peak_mib']:>10.0f}{row['resident_mib']:>10.0f}" if cuda
                 else f"{row['process_cpu_s_median']:>8.1f}")
        dropped = f"  dropped after {len(row['step_s_all'])} timed step(s): {row['error']}"
        print(line + (dropped if row["error"] else ""))
    ratios = [(n, row) for n, row in r["variants"].items() if "step_ratio" in row]
    if ratios:
        print(f"\n{'ratio':<24}{'step time':>10}{'paired':>9}{'CPU time':>10}{'FLOPs':>8}")
        for name, row in ratios:
            print(f"{name + ' / ' + r['baseline']:<24}{row['step_ratio']:>10.3f}"
                  f"{row['step_ratio_paired']:>9.3f}{row['cpu_time_ratio']:>10.3f}{row['flops_ratio']:>8.3f}")
        print("step time = ratio of medians; paired = median over rounds of variant / baseline, same round; "
              "CPU time = of the process (all threads)")
    t = r["merged_target"]
    if t:
        verdict = ("PASS" if t["pass"] else "FAIL") if t["applies"] else ("ok" if t["pass"] else "over")
        scope = "" if t["applies"] else " (the target is set for DiT-B/2 on CPU; informational here)"
        print(f"merged / none step time (worse of median and paired) {t['ratio']:.3f} <= {t['limit']}: "
              f"{verdict}{scope}")
    print(FLOP_NOTE)
    if not cuda and s["model_threads"] > 1 and busy(m):
        print(f"note: other jobs were running; {s['model_threads']} OpenMP threads stall (spin) whenever one "
              "of them loses its core, which can slow a step several-fold: compare with --threads 1")
    if cuda:
        print("peak MiB = max_memory_allocated during a step, all variants' weights, EMA and AdamW state "
              "resident; resid MiB = allocated before the step")


def bench_grad_norm(args) -> dict:
    """The lean step's CPU-visible change, alone: the gradients of one real step of the --size model,
    then clip_grad_norm_(inf) (the old step: the norm, then every gradient multiplied by 1.0) against
    get_total_norm (the step now, without clipping), alternated --steps times each."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    variant = build_variant(args.fusions[0], args, torch.device("cpu"))
    model, step = variant["model"], variant["step"]
    step.opt.step = lambda: None  # keep the gradients: only the norm work is timed below
    step(synthetic_training_data(args).next_batch(args.batch), 1)
    params = list(model.parameters())
    times: dict[str, list[float]] = {"clip_grad_norm_(inf)": [], "get_total_norm": []}
    for i in range(2 * args.steps):
        name = list(times)[i % 2]
        start = time.perf_counter()
        if i % 2 == 0:
            torch.nn.utils.clip_grad_norm_(params, math.inf)
        else:
            torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
        times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    old, new = medians["clip_grad_norm_(inf)"], medians["get_total_norm"]
    return {"size": args.size, "params": variant["params"], "median_s": medians,
            "ratio_new_over_old": new / old, "saved_ms": 1e3 * (old - new), "repeats": args.steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    result = {"machine": machine_info(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    failed = False
    if args.loader:
        result["loader"] = bench_loader(args)
        print_loader(result["loader"])
        failed |= not result["loader"]["pass"]
    if args.grad_norm:
        result["grad_norm"] = r = bench_grad_norm(args)
        ms = {k: 1e3 * v for k, v in r["median_s"].items()}
        print(f"\ngradient-norm work of DiT-{r['size']}/{args.patch} ({r['params']:,} parameters), median of "
              f"{r['repeats']} alternated repeats: clip_grad_norm_(inf) {ms['clip_grad_norm_(inf)']:.1f} ms "
              f"(before), get_total_norm {ms['get_total_norm']:.1f} ms (now): ratio "
              f"{r['ratio_new_over_old']:.3f}, {r['saved_ms']:.1f} ms saved per step")
    if args.model:
        if args.threads:
            torch.set_num_threads(args.threads)
        result["settings"]["model_threads"] = torch.get_num_threads()
        result["model"] = bench_model(args)
        finish(result["machine"])  # the end load, for print_model's note on other jobs
        print_model(result["model"], result["settings"], result["machine"])
        t = result["model"]["merged_target"]
        failed |= bool(t and t["applies"] and not t["pass"])
        failed |= any(row["error"] for row in result["model"]["variants"].values())
        if args.loader:  # on CPU train.py fetches each batch serially: the loader's share of a step
            loader, base = result["loader"], result["model"]["variants"].get(result["model"]["baseline"])
            if base and "step_s_median" in base:
                fetch = args.batch / loader["samples_per_s"]
                result["model"]["serial_loader_share"] = fetch / (fetch + base["step_s_median"])
                print(f"next_batch({args.batch}) at the measured loader rate takes {1e3 * fetch:.1f} ms: "
                      f"{100 * result['model']['serial_loader_share']:.1f} % of a baseline step run "
                      "serially (on CUDA the host prepares the next batch while the GPU runs the step)")
    print(finish(result["machine"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
