"""`redi report`: the run grid's results as paper-style tables (CSV, Markdown, LaTeX), the sample
grids side by side, FID against training steps and the training losses.

Each run is {name, label, tables, metrics[, curve, step]}: its metrics JSON sits in its sample
folder, whose manifest names the checkpoint, whose training folder's manifest holds the training
config. Runs sharing a `curve` are the FID-vs-step points of one training (a run's fid_steps).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from .errors import ReDiError  # noqa: E402
from .io import atomic_path, read_manifest, write_manifest  # noqa: E402
from .train import SNAPSHOTS  # noqa: E402

HIDDEN = ("name", "tables", "train_dir", "grid", "curve")  # bookkeeping, not table columns
METRIC_COLUMNS = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "Prec.",
                  "recall": "Rec."}

FUSION_LABELS = {"none": "-", "concat": "ReDi", "merged": "ReDi-MR", "separate": "ReDi-SP"}


def load_runs(runs: str) -> list[dict]:
    """The runs argument: a JSON list, or the path of a file holding one."""
    text = Path(runs).read_text() if not runs.lstrip().startswith("[") else runs
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReDiError(f"--runs is not a JSON list of runs: {err}") from err
    for row in rows:
        missing = {"name", "metrics"} - set(row)
        if missing:
            raise ReDiError(f"run entry {row} lacks {', '.join(sorted(missing))}")
    return rows


def run_record(run: dict) -> dict:
    """One table row: the run's settings (from its manifests) and its metrics."""
    metrics_path = Path(run["metrics"])
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if metrics is None:
        raise ReDiError(f"metrics of run '{run['name']}' not found: {metrics_path} (run `redi evaluate`)")
    sample_manifest = read_manifest(metrics_path.parent / "manifest.json")
    sample_cfg = sample_manifest["config"]["sample"]
    checkpoint = Path(sample_manifest["inputs"]["checkpoint"]["path"])
    train_dir = checkpoint.parent.parent if checkpoint.parent.name == SNAPSHOTS else checkpoint.parent
    train_manifest = train_dir / "manifest.json"
    train = read_manifest(train_manifest)["config"]["train"] if train_manifest.is_file() else None
    tables = run.get("tables", run.get("table", "runs"))
    record = {"run": run.get("label", run["name"]), "name": run["name"],
              "tables": [tables] if isinstance(tables, str) else list(tables)}
    if train is not None:
        m = train["model"]
        family = "SiT" if train["objective"] == "interpolant" else "DiT"
        custom = m["depth"] is not None or m["hidden_size"] is not None
        shape = f" (d{m['depth']}, w{m['hidden_size']})" if custom else ""
        record.update({
            "model": f"{family}-{m['size']}/{m['patch']}{shape}",
            "fusion": FUSION_LABELS[m["fusion"]],
            "r": train["rank"] if m["fusion"] != "none" else None, "norm z": train["normalize_z"],
            "lambda": train["rep_weight"], "p_drop": train["rep_dropout"], "lr": train["lr"],
            "cond.": train["conditional"], "steps": run.get("step", train["steps"]),
        })
    else:
        record.update({"model": sample_manifest.get("model", str(checkpoint))})
    sampler = sample_manifest.get("sampler", sample_cfg["sampler"])
    record.update({"sampler": f"{sampler} {sample_cfg['steps']}",
                   "CFG": sample_cfg["cfg_scale"], "RG": sample_cfg["rg_scale"],
                   "samples": metrics.get("num_samples")})
    for key, column in METRIC_COLUMNS.items():
        record[column] = metrics.get(key)
    record["train_dir"] = str(train_dir) if train is not None else None
    record["grid"] = str(metrics_path.parent / "grid.png")
    record["curve"] = run.get("curve", run["name"])
    return record


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1 or value == 0:
            return f"{value:.2f}"
        return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"  # 0.004, 0.0003
    return str(value)


def table_frames(records: list[dict]) -> dict[str, pd.DataFrame]:
    """One DataFrame per table, in first-appearance order, with only the columns that vary or matter."""
    frame = pd.DataFrame(records, dtype=object)  # keep ints as ints next to None
    shown = [c for c in frame.columns if c not in HIDDEN]
    tables = {}
    for name in dict.fromkeys(t for r in records for t in r["tables"]):
        part = frame[frame["tables"].apply(lambda ts, name=name: name in ts)][shown]
        keep = [c for c in shown if c in ("run", "model", *METRIC_COLUMNS.values())
                or part[c].map(_fmt).nunique() > 1]
        tables[name] = part[keep]
    return tables


def markdown(tables: dict[str, pd.DataFrame]) -> str:
    lines = []
    for name, frame in tables.items():
        lines += [f"## {name}", "", "| " + " | ".join(frame.columns) + " |",
                  "|" + "|".join(" --- " for _ in frame.columns) + "|"]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
        lines.append("")
    return "\n".join(lines)


def latex(tables: dict[str, pd.DataFrame]) -> str:
    def escape(text: str) -> str:
        return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    out = []
    for name, frame in tables.items():
        align = "l" * 2 + "r" * (len(frame.columns) - 2)
        out += [f"% {name}", r"\begin{tabular}{" + align + "}", r"\toprule",
                " & ".join(escape(c) for c in frame.columns) + r" \\", r"\midrule"]
        out += [" & ".join(escape(_fmt(v)) for v in row) + r" \\" for row in frame.itertuples(index=False)]
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


def plot_grids(records: list[dict], path: Path) -> None:
    columns = min(4, len(records))
    rows = math.ceil(len(records) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, records, strict=False):
        if Path(record["grid"]).is_file():
            ax.imshow(np.asarray(Image.open(record["grid"])))
        fid = record.get("FID")
        ax.set_title(f"{record['run']}" + (f"\nFID {fid:.1f}" if fid is not None else ""), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def fid_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """curve -> [(training step, FID)] sorted by step; a curve is named after its final run's label."""
    labels = {r["name"]: r["run"] for r in records}
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.get("FID") is not None and record.get("steps") is not None:
            label = labels.get(record["curve"], record["curve"])
            curves.setdefault(label, []).append((int(record["steps"]), float(record["FID"])))
    return {label: sorted(points) for label, points in curves.items()}


def plot_fid_vs_step(records: list[dict], path: Path) -> None:
    """One line per training with fid_steps points; a run without them is a single marker."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for label, points in fid_curves(records).items():
        steps, fids = zip(*points, strict=True)
        line = len(points) > 1
        ax.plot(steps, fids, marker="o" if line else "s", linestyle="-" if line else "none", label=label)
    ax.set(title="FID vs training step (lower is better)", xlabel="training step", ylabel="FID")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    _save(fig, path)


def plot_training(records: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    trainings = {r["train_dir"]: r for r in records if r["tables"]}  # one line per training
    for record in trainings.values():
        log = Path(record["train_dir"]) / "metrics.jsonl" if record.get("train_dir") else None
        if log is None or not log.is_file():
            continue
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [entry["step"] for entry in lines]
        axes[0].plot(steps, [entry["loss_x"] for entry in lines], label=record["run"])
        if any("loss_z" in entry for entry in lines):
            axes[1].plot(steps, [entry.get("loss_z", np.nan) for entry in lines], label=record["run"])
    axes[0].set(title="image loss (MSE_x)", xlabel="training step", yscale="log")
    axes[1].set(title="representation loss (MSE_z)", xlabel="training step", yscale="log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(runs: list[dict], out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """tables.md, tables.tex, runs.csv, grids.png, fid_vs_step.png and training.png in out_dir."""
    out_dir = Path(out_dir)
    records = [run_record(run) for run in runs]
    if not records:
        raise ReDiError("no runs to report")
    tables = table_frames(records)
    with atomic_path(out_dir / "runs.csv") as tmp:
        rows = pd.DataFrame(records).drop(columns=["train_dir", "grid"])
        rows["tables"] = rows["tables"].apply(";".join)
        rows.to_csv(tmp, index=False)
    with atomic_path(out_dir / "tables.md") as tmp:
        tmp.write_text(markdown(tables))
    with atomic_path(out_dir / "tables.tex") as tmp:
        tmp.write_text(latex(tables))
    plot_grids([r for r in records if r["tables"]] or records, out_dir / "grids.png")
    plot_fid_vs_step(records, out_dir / "fid_vs_step.png")
    plot_training(records, out_dir / "training.png")
    return tables


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi report`."""
    runs = load_runs(args.runs)
    tables = write_report(runs, args.out)
    write_manifest(Path(args.out) / "manifest.json", "report", {}, runs=runs,
                   tables={name: len(frame) for name, frame in tables.items()})
    print(markdown(tables))
