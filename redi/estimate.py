"""GPU-hours of a config's run grid before submitting it, from the analytic FLOP counter.

Training: 3 x forward FLOPs (backward ~ 2x forward) x global batch x steps, once per training
(runs with train_run share one). Sampling: NFE x forward FLOPs x samples x branches (1 + CFG + RG;
every step runs all branches, a CFG interval is not discounted). GPU time = FLOPs / (peak x MFU).
Not counted: the VAE/DINOv2 encoding of the data set, the VAE decoding of samples and the
Inception passes (each well under 1 % of the grid; see `python benchmarks/gpu_hours.py --help`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .models import build_run, forward_macs
from .runs import SAMPLERS

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ARCHITECTURE = re.compile(r"^(DiT|SiT)-(S|B|L|XL)/(2|4|8)$")


@dataclass
class RunCost:
    """FLOPs of one run's training (0 when it reuses another's) and sampling."""

    name: str
    model: str
    train_flops: float
    sample_flops: float


def model_flops(cfg: dict, num_classes: int, latent_side: int) -> float:
    """Forward FLOPs (2 x MACs) per sample of the run's model, built on the meta device (no memory)."""
    train_cfg = cfg["train"]
    arch = ARCHITECTURE.match(cfg["sample"]["architecture"] or "") if cfg["sample"]["checkpoint"] else None
    if arch is not None:  # an official checkpoint: its architecture, the train section's fusion and rank
        train_cfg = {**train_cfg, "model": {**train_cfg["model"], "size": arch.group(2),
                                            "patch": int(arch.group(3))}}
    with torch.device("meta"):
        model, _ = build_run(train_cfg, num_classes, latent_side, train_cfg["rank"])
    return 2.0 * forward_macs(model)["total"]


def sampler_nfe(cfg: dict) -> int:
    """Model calls per sample of the run's sampler (redi/samplers.py: the ODE grid has steps points)."""
    sample = cfg["sample"]
    name = sample["sampler"] if sample["sampler"] != "auto" else SAMPLERS[cfg["train"]["objective"]][0]
    steps = sample["steps"]
    return {"ode-euler": steps - 1, "ode-heun": 2 * (steps - 1)}.get(name, steps)


def branches(sample: dict) -> int:
    """Batched forward branches per model call: conditional, + unconditional (CFG), + z-dropped (RG)."""
    return 1 + (sample["cfg_scale"] != 1.0) + (sample["rg_scale"] != 1.0)


def grid_costs(runs: dict[str, dict], num_classes: int, latent_side: int) -> list[RunCost]:
    """RunCost of every run; a training is charged to the run that owns it (train_run == name)."""
    costs = []
    for name, cfg in runs.items():
        forward = model_flops(cfg, num_classes, latent_side)
        sample_cfg = cfg["sample"]
        trains = cfg["train_run"] == name and not sample_cfg["checkpoint"] and not sample_cfg["train_step"]
        train = 3.0 * forward * cfg["train"]["batch_size"] * cfg["train"]["steps"] if trains else 0.0
        sample = sampler_nfe(cfg) * forward * cfg["sample"]["num_samples"] * branches(cfg["sample"])
        m = cfg["train"]["model"]
        model = f"{'SiT' if cfg['train']['objective'] == 'interpolant' else 'DiT'}-{m['size']}/{m['patch']}"
        costs.append(RunCost(name, f"{model} {m['fusion']}", train, sample))
    return costs


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    """Hours on one GPU at `mfu` of its peak."""
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0


def estimate_table(costs: list[RunCost], peak_tflops: float, mfu: float) -> str:
    """A plain-text table: per run training and sampling GPU-hours, and the total."""
    lines = [f"{'run':34} {'model':22} {'train GPU-h':>12} {'sample GPU-h':>13}"]
    total_train = total_sample = 0.0
    for c in costs:
        t, s = gpu_hours(c.train_flops, peak_tflops, mfu), gpu_hours(c.sample_flops, peak_tflops, mfu)
        total_train, total_sample = total_train + t, total_sample + s
        lines.append(f"{c.name:34} {c.model:22} {t:12,.0f} {s:13,.1f}")
    lines.append(f"{'total':57} {total_train:12,.0f} {total_sample:13,.1f}")
    lines.append(f"grand total: {total_train + total_sample:,.0f} GPU-hours "
                 f"({(total_train + total_sample) / 24:,.0f} GPU-days)")
    return "\n".join(lines)
