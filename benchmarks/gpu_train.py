"""A short real training run: `python -m redi.cli train` on synthetic data, checkpoint, resume, checks.

Writes a synthetic latents.h5 + pca_features.h5 in the stages' layout (train_throughput's writer), trains
--steps / 2 steps, then reruns the same command with --steps: the run must resume from the checkpoint
(it logs steps after the half only once, and the step-<half> and step-<steps> checkpoints exist), every
logged loss and gradient norm must be finite, and the loss must fall (mean of the last three logged
values < 0.9 x the first three). Prints and writes (--json) wall times, img/s and the loss curve.
Exit status 1 when a check fails. Part (b) of benchmarks/gpu_check.sh.

    python benchmarks/gpu_train.py --device cuda --size B --batch 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import write_synthetic_pair  # benchmarks/, this script's folder

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--size", default="S", choices=("S", "B", "L", "XL"))
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--fusion", default="merged")
    p.add_argument("--input-size", type=int, default=32, help="latent side (patch 2)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=4096, help="synthetic training samples")
    p.add_argument("--steps", type=int, default=200, help="total steps; the first run stops at half")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--work", type=Path, default=None, help="folder of data and run (default: temp)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.steps < 20 or args.steps % 2:
        p.error("--steps must be even and >= 20")
    return args


def train_command(args, data: dict, run: Path, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "redi.cli", "train", "--latents", str(data["latents"]),
           "--features", str(data["features"]), "--out", str(run), "--device", args.device,
           "--model-size", args.size, "--model-patch", "2", "--model-fusion", args.fusion,
           "--rank", "8", "--normalize-z", "--batch-size", str(args.batch), "--lr", str(args.lr),
           "--steps", str(steps),
           "--ckpt-every", str(args.steps // 2), "--log-every", str(max(1, args.steps // 20))]
    for flag, value in (("--model-depth", args.depth), ("--model-hidden-size", args.hidden_size),
                        ("--model-num-heads", args.heads)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="redi-gpu-train-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_pair(work, args.samples, 8, args.input_size, args.input_size // 2, 1024, 0)
    (work / "manifest.json").write_text('{"stage": "synthetic"}\n')  # train records its inputs
    run = work / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    half = args.steps // 2
    phases = []
    for steps in (half, args.steps):
        cmd = train_command(args, data, run, steps)
        print("+ " + " ".join(cmd), flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        phases.append({"steps": steps, "exit": rc, "wall_s": round(time.perf_counter() - start, 2)})
        if rc:
            print(f"gpu_train: `redi train` exited {rc} at --steps {steps}", file=sys.stderr)
            break
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    losses = [r["loss"] for r in records]
    logged = [r["step"] for r in records]
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("step-*.pt"))
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else {}
    checks = {
        "both runs exited 0": len(phases) == 2 and all(p["exit"] == 0 for p in phases),
        "every loss and grad norm finite": bool(records) and all(
            math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records),
        "loss falls (last 3 < 0.9 x first 3)": len(losses) >= 6 and
        statistics.mean(losses[-3:]) < 0.9 * statistics.mean(losses[:3]),
        "resumed: each step logged once, up to --steps": logged == sorted(set(logged)) and bool(logged)
        and logged[-1] == args.steps,
        f"checkpoints at {half} and {args.steps}": f"step-{half:09d}.pt" in checkpoints and
        f"step-{args.steps:09d}.pt" in checkpoints,
        "manifest: all steps": manifest.get("steps") == args.steps,
    }
    img_s = [r["img_per_s"] for r in records[1:]]  # the first window holds start-up
    peak = max((r.get("peak_mem_gb", 0) for r in records), default=None)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "phases": phases, "device": manifest.get("device"), "bf16": manifest.get("bf16"),
              "parameters": manifest.get("parameters"), "img_per_s_median": statistics.median(img_s)
              if img_s else None, "peak_mem_gb": peak,
              "loss_curve": [[r["step"], round(r["loss"], 5)] for r in records], "checkpoints": checkpoints,
              "checks": checks, "pass": all(checks.values())}
    print(f"gpu_train: {manifest.get('parameters')} parameters on {manifest.get('device')} "
          f"(bf16 {manifest.get('bf16')}), runs {[p['wall_s'] for p in phases]} s, median "
          f"{result['img_per_s_median'] or 0:.1f} img/s, loss {losses[0] if losses else 'n/a'} -> "
          f"{losses[-1] if losses else 'n/a'}")
    for name, ok in checks.items():
        print(f"gpu_train: {'ok  ' if ok else 'FAIL'} {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
