"""GPU-hours of a config's run grid, printed before submitting it (redi/estimate.py does the counting).

    python benchmarks/gpu_hours.py --configfile config/imagenet256.yaml [--gpu H100] [--mfu 0.4]

Training = 3 x forward FLOPs x batch x steps; sampling = NFE x forward FLOPs x samples x branches;
time = FLOPs / (the GPU's dense bf16 peak x MFU). The MFU is an assumption: measure yours with
`python benchmarks/train_throughput.py --model --size XL` (it prints MFU) and pass it here.
"""

from __future__ import annotations

import argparse
import sys

from redi.config import load_config
from redi.errors import ReDiError
from redi.estimate import PEAK_BF16_TFLOPS, estimate_table, grid_costs
from redi.runs import expand_runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configfile", required=True, help="the workflow config whose runs to count")
    p.add_argument("--gpu", default="H100", choices=sorted(PEAK_BF16_TFLOPS),
                   help="GPU type: its dense bf16 peak (H100/H200 989 TFLOP/s, A100 312)")
    p.add_argument("--peak-tflops", type=float, default=None, help="a peak of your own instead of --gpu's")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed (default 0.4)")
    args = p.parse_args(argv)
    try:
        config = load_config(args.configfile)
        runs = expand_runs(config)
    except ReDiError as err:
        print(f"gpu_hours: error: {err}", file=sys.stderr)
        return 2
    peak = args.peak_tflops or PEAK_BF16_TFLOPS[args.gpu]
    latent_side = config["shard"]["image_size"] // 8
    costs = grid_costs(runs, config["dataset"]["num_classes"], latent_side)
    print(f"{args.configfile}: {len(runs)} runs, {args.gpu} at {peak:g} TFLOP/s bf16 x MFU {args.mfu:g} "
          f"= {peak * args.mfu:g} TFLOP/s per GPU")
    print(estimate_table(costs, peak, args.mfu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
