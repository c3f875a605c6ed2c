"""Sampling throughput: images/s of `redi.sample.generate` per sampler, step count and guidance.

Builds the model as `redi train` does (random weights, perturbed away from DiT's zero init), then
times whole sampling loops on one batch: SiT samplers on an interpolant model, DiT samplers on a
DDPM model, each without guidance and with CFG + RG (three branches in one batched forward).
The VAE decode is excluded (`--decode` adds a row for the demo's stand-in-sized VAE).
See benchmarks/README.md.

    python benchmarks/sampling.py                           # the demo model on CPU (~2 minutes)
    python benchmarks/sampling.py --preset xl2 --batch 256  # SiT/DiT-XL/2 at 256 px on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from redi.config import validate_config
from redi.devices import resolve_device
from redi.models import build_run
from redi.sample import SamplingModel, generate

# preset -> (train.model, latent side, rank)
PRESETS = {
    "demo": ({"size": "S", "patch": 2, "depth": 6, "hidden_size": 256, "num_heads": 4}, 8, 8),
    "b2": ({"size": "B", "patch": 2}, 32, 8),
    "xl2": ({"size": "XL", "patch": 2}, 32, 8),
}
RUNS = {"interpolant": [("sde", 250), ("ode-heun", 50), ("ode-euler", 50)],
        "ddpm": [("ddpm", 250), ("ddim", 50)]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="demo", choices=PRESETS, help="model and latent size")
    p.add_argument("--fusion", default="concat", choices=("none", "concat", "merged", "separate"))
    p.add_argument("--batch", type=int, default=250, help="samples per generate() call")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every run's step count (e.g. 0.1 for a smoke run)")
    p.add_argument("--objectives", default="interpolant,ddpm", help="which model families to time")
    p.add_argument("--samplers", default=None,
                   help="comma list of the samplers to time (default: all of each objective's)")
    p.add_argument("--no-guidance-rows", action="store_true", help="skip the CFG + RG rows")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (as sample.precision)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


def build(objective: str, preset: str, fusion: str, device: torch.device) -> SamplingModel:
    model_cfg, side, rank = PRESETS[preset]
    cfg = validate_config({"dataset": {"name": "bench"}, "train": {
        "objective": objective, "rank": rank, "model": {**model_cfg, "fusion": fusion}}})["train"]
    torch.manual_seed(0)
    model, _ = build_run(cfg, 1000, side, rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    z_std = torch.ones(rank) if fusion != "none" else None
    return SamplingModel(model.to(device).eval(), objective, 1000, None, z_std, f"{preset} {objective}")


def time_run(sm, sampler, steps, guidance, batch, device, bf16) -> dict:
    cfg = validate_config({"dataset": {"name": "bench"}, "sample": {
        "sampler": sampler, "steps": steps, **guidance}})["sample"]
    generate(sm, list(range(min(batch, 2))), {**cfg, "steps": 2}, device, bf16)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(sm, list(range(batch)), cfg, device, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    nfe = steps * (2 if sampler == "ode-heun" else 1) - (1 if sampler == "ode-heun" else 0)
    branches = 1 + (guidance.get("cfg_scale", 1.0) != 1.0) + (guidance.get("rg_scale", 1.0) != 1.0)
    return {"sampler": sampler, "steps": steps, "nfe": nfe, "branches": branches, "batch": batch,
            "seconds": round(seconds, 3), "images_per_s": round(batch / seconds, 2),
            "ms_per_nfe": round(1000 * seconds / nfe, 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, bf16 {bf16}, preset {args.preset}, fusion {args.fusion}, "
          f"batch {args.batch}")
    print(f"{'model':<12} {'sampler':<10} {'steps':>5} {'NFE':>5} {'branches':>8} {'s':>8} "
          f"{'img/s':>9} {'ms/NFE':>8}")
    rows = []
    guidances = [{}] if args.no_guidance_rows else [{}, {"cfg_scale": 1.5}]
    if args.fusion != "none" and not args.no_guidance_rows:
        guidances.append({"cfg_scale": 1.5, "rg_scale": 1.5})
    for objective in args.objectives.split(","):
        sm = build(objective, args.preset, args.fusion, device)
        for sampler, steps in RUNS[objective]:
            if args.samplers and sampler not in args.samplers.split(","):
                continue
            for guidance in guidances:
                steps_run = max(2, round(steps * args.steps_scale))
                row = time_run(sm, sampler, steps_run, guidance, args.batch, device, bf16)
                row["model"] = objective
                rows.append(row)
                print(f"{objective:<12} {sampler:<10} {row['steps']:>5} {row['nfe']:>5} {row['branches']:>8} "
                      f"{row['seconds']:>8.2f} {row['images_per_s']:>9.2f} {row['ms_per_nfe']:>8.2f}",
                      flush=True)
                if args.json:  # after every row: a run stopped by a time limit keeps what it measured
                    args.json.write_text(json.dumps({"device": name, "bf16": bf16, "preset": args.preset,
                                                     "fusion": args.fusion, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
