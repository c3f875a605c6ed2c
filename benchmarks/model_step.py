"""Benchmark of one training step: the baseline DiT/SiT (fusion none) vs ReDi merged vs separate.

Times zero_grad + the real joint loss (`build_objective(...).loss(model, x, z, y)`: noising,
forward, MSE_x [+ VLB] + MSE_z) + backward, on random latents, PCA features and labels; the optimizer
step is excluded unless --optimizer-step (AdamW). The three variants are interleaved in a
carry-over-balanced order (benchmarks/interleave.py: each follows every other equally often), and
each reports its median, so slow drift of a shared machine hits all of them alike. See benchmarks/README.md.

    python benchmarks/model_step.py --size B --patch 2          # CPU, 1 thread: ~3 minutes
    python benchmarks/model_step.py --size B --patch 2 --threads 0   # CPU, torch's threads (all cores)
    python benchmarks/model_step.py --size XL --patch 2 --batch 32 --dtype bf16 --compile  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from interleave import cycle_rounds, round_order  # benchmarks/, this script's folder

VARIANTS = ("none", "merged", "separate")  # "none" is the baseline
MIB = 1 << 20
FLOP_NOTE = ("TFLOP/s = 3 x forward MACs x 2 FLOP/MAC x batch / step time: backward assumed 2x the "
             "forward; the analytic count (redi.models.forward_macs) covers every matmul incl. "
             "attention, not norms, activations, elementwise ops or the loss")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="B", choices=("S", "B", "L", "XL"), help="model size")
    p.add_argument("--patch", type=int, default=2, choices=(2, 4, 8), help="patch size")
    p.add_argument("--batch", type=int, default=4, help="samples per step")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    p.add_argument("--rep-channels", type=int, default=8, help="PCA channels r of the fused variants")
    p.add_argument("--objective", default="interpolant", choices=("ddpm", "interpolant"),
                   help="ddpm (DiT: eps + learned-sigma VLB) or interpolant (SiT: velocity)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when available")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 weights; bf16 = torch.autocast bfloat16 around the loss (cuda only)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (every variant, interleaved)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (cuda only)")
    p.add_argument("--optimizer-step", action="store_true",
                   help="also time AdamW's step (default: zero_grad + loss + backward only)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on cpu (two OpenMP threads on 2 cores stall "
                   "whenever another job runs, which swamps the ratios), torch's own on cuda; 0 = torch's")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.rep_channels < 1:
        p.error("need --batch >= 1, --steps >= 1, --warmup >= 0 and --rep-channels >= 1")
    if args.input_size % args.patch:
        p.error(f"--input-size {args.input_size} is not divisible by --patch {args.patch}")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cpu" and (args.dtype != "fp32" or args.compile):
        p.error("--dtype bf16 and --compile need --device cuda")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.threads is not None and args.threads < 0:
        p.error("--threads must be >= 0")
    return args


def machine_info(device) -> dict:
    import torch

    info = {
        "platform": platform.platform(), "processor": platform.machine(),
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device.type, "load_average_start": os.getloadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_mib=round(props.total_memory / MIB),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    matmul_precision=torch.get_float32_matmul_precision())
    return info


def build_variant(fusion: str, args, device) -> dict:
    """A model of the requested size with this fusion, its analytic MACs and parameter count."""
    import torch

    from redi.models import build_model, forward_macs

    torch.manual_seed(args.seed)  # the shared parts start from the same weights in every variant
    kwargs = {} if fusion == "none" else {"rep_channels": args.rep_channels}
    # learn_sigma stays DiT's default (True, 2C output channels) for both objectives, as in the
    # official DiT and SiT checkpoints; the interpolant's loss reads the first C channels only
    model = build_model(args.size, args.patch, input_size=args.input_size, fusion=fusion,
                        **kwargs).to(device).train()
    params = [q for q in model.parameters() if q.requires_grad]
    return {
        "fusion": fusion, "model": model,
        "run": torch.compile(model) if args.compile else model,
        "optimizer": torch.optim.AdamW(params, lr=1e-4, weight_decay=0) if args.optimizer_step else None,
        "macs": forward_macs(model),
        "params": sum(q.numel() for q in params),
        "param_mib": sum(q.numel() * q.element_size() for q in model.parameters()) / MIB,
        "times": [], "cpu_times": [], "peak_mib": 0.0, "step_mib": 0.0, "loss": None,
    }


def train_step(v: dict, objective, x, z, y, args, device) -> dict:
    """One step: loss (forward) + backward [+ AdamW step] + zero_grad(set_to_none); its wall and
    process CPU seconds and, on cuda, its peak memory.

    zero_grad comes last, so a variant's gradients are freed before the next variant runs.
    """
    import torch

    cuda = device.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bf16"
                else contextlib.nullcontext())
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    with autocast:
        losses = objective.loss(v["run"], x, z if v["fusion"] != "none" else None, y)
    losses["loss"].backward()
    if v["optimizer"] is not None:
        v["optimizer"].step()
    v["model"].zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    out = {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - start_cpu}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_mib=peak / MIB, step_mib=(peak - before) / MIB)
    v["loss"] = float(losses["loss"].detach())
    return out


def summarize(variants: list[dict], args) -> dict:
    base = variants[0]
    base_median = statistics.median(base["times"])
    out = {}
    for v in variants:
        median = statistics.median(v["times"])
        fwd_macs = v["macs"]["total"]
        row = {
            "params": v["params"], "param_mib": round(v["param_mib"], 1),
            "forward_gmacs_per_sample": round(fwd_macs / 1e9, 3),
            "step_s_median": median, "step_s_min": min(v["times"]), "step_s_max": max(v["times"]),
            "step_s_all": v["times"],
            "process_cpu_s_median": statistics.median(v["cpu_times"]), "process_cpu_s_all": v["cpu_times"],
            "images_per_s": args.batch / median,
            "achieved_tflops": 3 * fwd_macs * 2 * args.batch / median / 1e12,
            "final_loss": v["loss"],
            "macs_by_part": v["macs"],
        }
        if args.device == "cuda":
            row.update(peak_mib=round(v["peak_mib"], 1), step_peak_mib=round(v["step_mib"], 1))
        if v is not base:
            paired = [t / b for t, b in zip(v["times"], base["times"], strict=True)]
            row.update(
                step_ratio=median / base_median,
                step_ratio_paired=statistics.median(paired),
                cpu_time_ratio=statistics.median(v["cpu_times"]) / statistics.median(base["cpu_times"]),
                flops_ratio=fwd_macs / base["macs"]["total"],
                params_ratio=v["params"] / base["params"],
            )
        out[v["fusion"]] = row
    return out


def print_report(result: dict) -> None:
    m, s, res = result["machine"], result["settings"], result["variants"]
    shape = (f"latent 4x{s['input_size']}x{s['input_size']} ({8 * s['input_size']} px), "
             f"{result['tokens']} tokens")
    print(f"\nredi model-step benchmark: DiT-{s['size']}/{s['patch']}, {shape}, batch {s['batch']}, "
          f"objective {s['objective']}, r = {s['rep_channels']}, {s['dtype']}"
          f"{', torch.compile' if s['compile'] else ''}")
    if m["device"] == "cuda":
        print(f"machine: GPU {m['gpu']} ({m['gpu_memory_mib']} MiB, sm {m['capability']}, CUDA {m['cuda']}, "
              f"fp32 matmul precision {m['matmul_precision']}) | CPUs {m['cpu_count']} | torch {m['torch']}")
    else:
        print(f"machine: CPU {m['processor']} | CPUs {m['cpu_count']} (usable {m['cpu_affinity']}) | "
              f"torch {m['torch']}, {m['torch_threads']} thread{'s' * (m['torch_threads'] != 1)} "
              f"({m['torch_interop_threads']} interop) | "
              f"{m['platform']}")
        load = " -> ".join("/".join(f"{x:.2f}" for x in m[k]) for k in ("load_average_start",
                                                                        "load_average_end"))
        busy = m["load_average_start"][0] > 0.5 or m["load_average_end"][0] > m["cpu_affinity"] + 0.5
        print(f"load average (1/5/15 min) at start -> end (the end includes this benchmark): {load}"
              + ("; other jobs were running: expect noisy step times" if busy else ""))
    what = "zero_grad + joint loss (forward) + backward" + (
        " + AdamW step" if s["optimizer_step"] else "; optimizer step EXCLUDED")
    print(f"step = {what}; {s['steps']} timed steps per variant after {s['warmup']} warm-up round(s), "
          "variants interleaved, carry-over balanced (each follows every other equally often), "
          "median per variant")
    cuda = m["device"] == "cuda"
    head = (f"\n{'variant':<10}{'params':>13}{'GMACs/img':>11}{'step ms':>10}{'min..max ms':>17}"
            f"{'images/s':>10}{'TFLOP/s':>9}")
    print(head + (f"{'peak MiB':>10}{'step MiB':>10}" if cuda else f"{'CPU s':>8}"))
    for name, r in res.items():
        label = "baseline" if name == "none" else name
        spread = f"{1e3 * r['step_s_min']:.0f}..{1e3 * r['step_s_max']:.0f}"
        line = (f"{label:<10}{r['params']:>13,}{r['forward_gmacs_per_sample']:>11.2f}"
                f"{1e3 * r['step_s_median']:>10.1f}{spread:>17}{r['images_per_s']:>10.2f}"
                f"{r['achieved_tflops']:>9.3f}")
        line += (f"{r['peak_mib']:>10.0f}{r['step_peak_mib']:>10.0f}" if cuda
                 else f"{r['process_cpu_s_median']:>8.1f}")
        print(line)
    print(f"\n{'ratio':<21}{'step time':>10}{'paired':>9}{'CPU time':>10}{'FLOPs':>8}{'params':>9}")
    for name in VARIANTS[1:]:
        r = res[name]
        print(f"{name + ' / baseline':<21}{r['step_ratio']:>10.3f}{r['step_ratio_paired']:>9.3f}"
              f"{r['cpu_time_ratio']:>10.3f}{r['flops_ratio']:>8.3f}{r['params_ratio']:>9.4f}")
    print("step time = ratio of the median wall times; paired = median over rounds of (variant / baseline) "
          "in the same round\n(the drift-robust one); CPU time = ratio of the median process CPU times "
          "(all threads; time.process_time;\nless sensitive to other jobs, but OpenMP spin-waits count); "
          "FLOPs = analytic forward MACs per sample\n(forward_macs['total']); params = trainable parameters "
          "(the fixed pos_embed excluded)")
    print(FLOP_NOTE)
    if cuda:
        print("peak MiB = torch.cuda.max_memory_allocated during a step with all three models resident; "
              "step MiB = peak - allocated before the step (activations, gradients, temporaries)")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from redi.diffusion import build_objective

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_info(device)
    variants = [build_variant(f, args, device) for f in VARIANTS]
    objective = build_objective(args.objective)

    gen = torch.Generator().manual_seed(args.seed)
    grid = args.input_size // args.patch
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, generator=gen).to(device)
    z = torch.randn(args.batch, args.rep_channels, grid, grid, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)

    cycle = cycle_rounds(len(variants))
    args.steps = -(-args.steps // cycle) * cycle  # whole balanced cycles
    total = args.warmup + args.steps
    for rnd in range(total):
        for v in (variants[i] for i in round_order(len(variants), rnd - args.warmup)):
            step = train_step(v, objective, x, z, y, args, device)
            if rnd >= args.warmup:  # warm-up steps (and compilation) are neither timed nor measured
                v["times"].append(step["wall_s"])
                v["cpu_times"].append(step["cpu_s"])
                if device.type == "cuda":
                    v["peak_mib"] = max(v["peak_mib"], step["peak_mib"])
                    v["step_mib"] = max(v["step_mib"], step["step_mib"])
        print(f"round {rnd + 1}/{total}{' (warm-up)' if rnd < args.warmup else ''}: "
              + ", ".join(f"{v['fusion']} {1e3 * v['times'][-1]:.0f} ms" if rnd >= args.warmup
                          else v["fusion"] for v in variants), file=sys.stderr, flush=True)

    machine["load_average_end"] = os.getloadavg()
    result = {
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tokens": grid * grid,
        "step": "zero_grad + loss + backward" + (" + AdamW step" if args.optimizer_step else ""),
        "flop_assumption": FLOP_NOTE,
        "variants": summarize(variants, args),
    }
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
