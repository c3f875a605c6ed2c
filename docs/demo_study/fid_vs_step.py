"""FID against the training step for the demo study's variants, with the spread over trainings.

Each report's runs.csv holds one row per (run, training seed, sample seed, step); a variant's curve
is its group with the `-step<N>` points folded in (step 800 is the group's own final row). This
prints, per variant and step, the FID mean ± std over trainings and the paired difference of every
later variant to the first (per training), and draws one line per variant with its trainings
drawn thin behind it.

    python docs/demo_study/fid_vs_step.py part6_baseline_runs.csv:baseline \
        part6_random_runs.csv:redi-mr --plot part6_fid_vs_step.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from compare import HERE, group_rows  # this folder's sibling script


def load_curve(spec: str) -> pd.Series:
    """'runs.csv:group' -> FID indexed by (step, train seed), sample seeds averaged per training."""
    rows = group_rows(spec, with_steps=True)
    return rows.groupby(["steps", "train seed"])["FID"].mean().sort_index()


def by_step(curve: pd.Series) -> pd.DataFrame:
    """Per step: FID mean, std over trainings (ddof 1) and the number of trainings."""
    grouped = curve.groupby(level="steps")
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.size()})


def paired_by_step(first: pd.Series, other: pd.Series) -> pd.DataFrame:
    """Per step: `other - first` over the trainings both have at that step (mean, std, n)."""
    shared = first.index.intersection(other.index)
    if shared.empty:
        raise SystemExit("the two curves share no (step, training seed) point")
    return by_step(other[shared] - first[shared])


def plot(curves: dict[str, pd.Series], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (name, curve), colour in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                     strict=False):
        for _, points in curve.groupby(level="train seed"):
            steps = points.index.get_level_values("steps")
            ax.plot(steps, points.to_numpy(), color=colour, alpha=0.3, linewidth=1)
        stats = by_step(curve)
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], color=colour, marker="o", capsize=3,
                    label=f"{name} (mean ± std, n = {int(stats['n'].max())} trainings)")
    ax.set(title="FID vs training step (thin: one training; lower is better)", xlabel="training step",
           ylabel="FID (500 samples)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="+", help="runs.csv:group (the first is the reference)")
    parser.add_argument("--plot", type=Path, help="write the figure here (a bare name: next to this script)")
    args = parser.parse_args()
    groups = [spec.rpartition(":")[2] for spec in args.curves]
    names = [group if groups.count(group) == 1 else spec  # a group name twice: the full specs
             for group, spec in zip(groups, args.curves, strict=True)]
    curves = {name: load_curve(spec) for name, spec in zip(names, args.curves, strict=True)}
    first = next(iter(curves.values()))
    for name, curve in curves.items():
        print(f"{name}:")
        for step, row in by_step(curve).iterrows():
            print(f"  step {step}: FID {row['mean']:.2f} ± {row['std']:.2f} (n = {int(row['n'])})")
        if curve is not first:
            for step, row in paired_by_step(first, curve).iterrows():
                print(f"  step {step}: minus {args.curves[0]}: {row['mean']:+.2f} ± {row['std']:.2f} "
                      f"(n = {int(row['n'])} trainings)")
    if args.plot:
        target = args.plot if args.plot.parent != Path(".") else HERE / args.plot
        plot(curves, target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
