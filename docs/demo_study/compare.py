"""Paired FID comparisons across the demo study's parts, from the reports' runs.csv files.

A part's report pairs rows only within that part; this script pairs a run group of one part with a
group of another over the (training seed, sample seed) pairs both have, and also per training (the
sample seeds of one training averaged first), since pairs that share a training are not independent.

    python docs/demo_study/compare.py part1_runs.csv:baseline part3_random_runs.csv:redi-mr

prints each group's FID mean ± std (n) and, for every group after the first, its paired difference
to the first: by seed pair and by training, each as mean ± std (n) and the mean in standard errors.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent


def group_rows(spec: str, with_steps: bool = False) -> pd.DataFrame:
    """'runs.csv:group' (a bare file name: next to this script) -> that group's rows, and with_steps
    also those of its FID-vs-step runs (`<group>-step<N>`)."""
    path, _, group = spec.rpartition(":")
    file = Path(path) if Path(path).exists() else HERE / path
    rows = pd.read_csv(file)
    pattern = rf"{re.escape(group)}(-step\d+)?" if with_steps else re.escape(group)
    mine = rows[rows["group"].map(lambda name: re.fullmatch(pattern, name) is not None)]
    if mine.empty:
        raise SystemExit(f"{file}: no rows of group '{group}' (groups: {sorted(set(rows['group']))})")
    return mine


def load_group(spec: str) -> pd.Series:
    """'runs.csv:group' -> that group's FID indexed by (train seed, sample seed)."""
    return group_rows(spec).set_index(["train seed", "seed"])["FID"].sort_index()


def summary(values: pd.Series) -> str:
    """mean ± std (n), and the mean in standard errors when n > 1."""
    n = len(values)
    if n < 2:
        return f"{values.mean():+.2f} (n = {n})"
    std = values.std(ddof=1)
    return f"{values.mean():+.2f} ± {std:.2f} (n = {n}, {values.mean() / (std / math.sqrt(n)):+.1f} SE)"


def paired(first: pd.Series, other: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(differences per shared seed pair, differences per shared training seed)."""
    shared = first.index.intersection(other.index)
    if shared.empty:
        raise SystemExit("the two groups share no (train seed, sample seed) pair")
    by_pair = other[shared] - first[shared]
    by_training = other[shared].groupby(level=0).mean() - first[shared].groupby(level=0).mean()
    return by_pair, by_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", help="runs.csv:group (the first is the reference)")
    args = parser.parse_args()
    groups = [load_group(spec) for spec in args.groups]
    for spec, fid in zip(args.groups, groups, strict=True):
        print(f"{spec}: FID {fid.mean():.2f} ± {fid.std(ddof=1):.2f} (n = {len(fid)})")
    for spec, fid in zip(args.groups[1:], groups[1:], strict=True):
        by_pair, by_training = paired(groups[0], fid)
        print(f"{spec} - {args.groups[0]}: by seed pair {summary(by_pair)}; "
              f"by training {summary(by_training)}")


if __name__ == "__main__":
    main()
