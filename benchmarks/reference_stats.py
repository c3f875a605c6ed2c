"""Peak memory of the streamed reference statistics against the number of reference images N.

`redi reference-stats` keeps float64 running moments of pool3 (2048-d) and of sFID's spatial
features (2023-d) plus the activations of the precision/recall subset only: its memory must not
grow with N. Each size runs `redi.metrics.reference.ReferenceAccumulator` (the stage's own
accumulator) on N synthetic feature rows in a fresh interpreter and reports that process's peak
RSS (VmHWM), against a fresh process that only imports the same modules. The Inception itself is
left out (its cost does not depend on N; benchmarks/inception.py times it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time

import numpy as np

from redi.metrics.reference import ReferenceAccumulator, pr_subset


def vmhwm_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


n, batch, pr = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
result = {"n": n, "after_import_kib": vmhwm_kib()}
if n:
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 2048)) / 8  # correlated rows, as Inception features are
    accumulator = ReferenceAccumulator({"pool": 2048, "spatial": 2023}, pr_subset(n, pr, seed=0))
    for first in range(0, n, batch):
        rows = min(batch, n - first)
        pool = np.abs(rng.normal(size=(rows, 64)) @ mixing + rng.normal(0, 0.1, size=(rows, 2048)))
        accumulator.update({"pool": pool.astype(np.float32).astype(np.float64),
                            "spatial": pool[:, :2023] ** 0.5})
    stats = accumulator.statistics()
    result.update(seconds=time.perf_counter() - start, acts=list(stats["acts"].shape),
                  trace_sigma=float(np.trace(stats["sigma"])))
result["vmhwm_kib"] = vmhwm_kib()
print(json.dumps(result))
"""


def measure(n: int, batch: int, pr: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(batch), str(pr)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50000,200000", help="comma-separated N (rows per run)")
    parser.add_argument("--batch", type=int, default=100, help="rows per update (evaluate.batch_size)")
    parser.add_argument("--pr-reference", type=int, default=10000, help="evaluate.pr_reference_images")
    parser.add_argument("--tolerance-mib", type=float, default=32.0,
                        help="largest allowed growth of the peak RSS from the smallest to the largest N")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    baseline = measure(0, args.batch, args.pr_reference)
    print(f"fresh process with the imports only: peak RSS {baseline['vmhwm_kib'] / 1024:.0f} MiB")
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(n, args.batch, args.pr_reference)
        held = n * (2048 + 2023) * 8 / 2**20
        print(f"N = {n:>8,}: peak RSS {r['vmhwm_kib'] / 1024:7.0f} MiB "
              f"({(r['vmhwm_kib'] - baseline['vmhwm_kib']) / 1024:.0f} MiB above the imports), "
              f"{r['seconds']:.1f} s, {n / r['seconds']:,.0f} rows/s; holding every float64 feature "
              f"would take {held:,.0f} MiB")
        results.append(r)
    growth = (results[-1]["vmhwm_kib"] - results[0]["vmhwm_kib"]) / 1024
    verdict = "PASS" if growth <= args.tolerance_mib else "FAIL"
    print(f"{verdict}: peak RSS grows by {growth:.1f} MiB from N = {results[0]['n']:,} to "
          f"{results[-1]['n']:,} (allowed {args.tolerance_mib:g} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": baseline, "runs": results,
                                               "growth_mib": growth}, indent=2))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
