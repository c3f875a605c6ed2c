"""`redi report`: the run grid's results as paper-style tables (CSV, Markdown, LaTeX), the sample
grids side by side, FID against training steps and the training losses.

Each run is {name, label, tables, metrics[, curve, step, train_run]}: its metrics JSON sits in its
sample folder, whose manifest names the checkpoint, whose training folder's manifest holds the
training config. Runs sharing a `curve` are the FID-vs-step points of one training (a run's
fid_steps). Every row carries the protocol that produced its numbers (sampler, NFE, guidance, label
sampling, seed, sample count, reference and Inception weights); the tables show the settings that
differ within them. Labels are made unique within the report.

Runs of one `group` (a run's seed pairs, `<name>@t<T>s<S>`) are one row: its metrics as mean ± std
(sample std, n runs), and the paired difference of FID to the table's first row (its baseline),
over the (train seed, sample seed) pairs both have; a difference is marked when its |mean| exceeds
2 standard errors (std of the paired differences / sqrt(n pairs)). runs.csv keeps one row per run.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from html import escape
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

from .checkpoints import SNAPSHOTS  # noqa: E402
from .errors import ReDiError  # noqa: E402
from .io import atomic_path, read_manifest, write_manifest  # noqa: E402

HIDDEN = ("name", "tables", "train_dir", "samples_dir", "curve", "training", "group", "train seed")
# (bookkeeping, not table columns; runs.csv keeps group and train seed)
METRIC_COLUMNS = {"fid": "FID", "sfid": "sFID", "fd_dinov2": "FD_DINOv2", "inception_score": "IS",
                  "precision": "Prec.", "recall": "Rec."}
PROTOCOL_COLUMNS = ("sampler", "NFE", "CFG", "CFG on", "CFG interval", "RG", "labels", "seed", "samples",
                    "reference", "Inception", "DINOv2")  # what produced a row's numbers
GRID_COLUMNS, GRID_CLASSES = 8, 10  # grids.png: 8 samples per class row, up to 10 classes


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations per sample (per guidance branch). The ODEs' steps count grid points
    (steps - 1 intervals; Heun evaluates twice per interval); SDE, DDPM and DDIM once per step."""
    return {"ode-heun": 2 * (steps - 1), "ode-euler": steps - 1}.get(sampler, steps)

PAIRED_NOTE = ("Metrics: mean ± sample std over a row's n runs (its training and sample seeds). "
               "ΔFID: mean ± std of the row's FID minus the first row's over the (train seed, sample seed) "
               "pairs both have; * marks |mean| > 2 standard errors (std / sqrt(pairs)). Pairs sharing a "
               "training are not independent, so * is a screen for a difference beyond the seed spread, "
               "not a formal test.")
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
    guided = sample_cfg["cfg_scale"] != 1.0
    interval = (sample_cfg.get("cfg_noise_low", 0.0), sample_cfg.get("cfg_noise_high", 1.0))
    record.update({
        "sampler": sampler, "NFE": nfe(sampler, sample_cfg["steps"]),
        "CFG": sample_cfg["cfg_scale"],
        "CFG on": sample_cfg.get("cfg_channels", "image") if guided else None,
        "CFG interval": f"[{interval[0]:g}, {interval[1]:g}]" if guided else None,
        "RG": sample_cfg["rg_scale"],
        "labels": sample_cfg.get("labels", "random") if record.get("cond.", True) else None,
        "seed": sample_cfg["seed"], "samples": metrics.get("num_samples"),
    })
    for key, column in METRIC_COLUMNS.items():
        record[column] = metrics.get(key)
    images = metrics.get("reference_images")
    record["reference"] = (f"{metrics['reference_sha256']}" + (f" ({images} img)" if images else "")
                           if metrics.get("reference_sha256") else None)
    record["Inception"] = metrics.get("inception_weights_id", metrics.get("inception_weights"))
    if "fd_dinov2" in metrics:
        record["DINOv2"] = metrics.get("fd_dinov2_weights_id")
    record["train_dir"] = str(train_dir) if train is not None else None
    record["samples_dir"] = str(metrics_path.parent)
    record["curve"] = run.get("curve", run["name"])
    record["training"] = run.get("train_run", run["name"])
    record["group"] = run.get("group", run["name"])
    record["train seed"] = (run.get("seeds") or {}).get("train")
    return record


def first_of_groups(records: list[dict]) -> list[dict]:
    """The first record of each group (a run without one is its own), in order."""
    firsts: dict[str, dict] = {}
    for record in records:
        firsts.setdefault(record.get("group", record["name"]), record)
    return list(firsts.values())


def unique_labels(records: list[dict]) -> list[dict]:
    """Labels made unique within the report: a shared one gets its table's name, else the run's name.

    Two trainings both labelled "SiT baseline" (one per table) would otherwise be one legend entry
    and one line in the plots. The runs of one group (its seed pairs) are one row and keep one label.
    """
    firsts = first_of_groups(records)
    counts = pd.Series([r["run"] for r in firsts]).value_counts()
    renamed = {}
    for record in firsts:
        label, group = record["run"], record.get("group", record["name"])
        if counts[label] > 1:
            by_table = [f"{r['run']} ({r['tables'][0]})" if r["tables"] else None
                        for r in firsts if r["run"] == label]
            table_label = f"{label} ({record['tables'][0]})" if record["tables"] else None
            unique = table_label is not None and by_table.count(table_label) == 1
            label = table_label if unique else f"{label} [{group}]"
        renamed[group] = label
    labels = list(renamed.values())
    if len(set(labels)) != len(labels):  # a label that already had a suffix like ours
        raise ReDiError(f"run labels are not unique even with their tables and names: {labels}; "
                        f"give the runs distinct `label`s")
    return [{**r, "run": renamed[r.get("group", r["name"])]} for r in records]


class Spread:
    """A group's metric over its runs: mean ± sample std (n), or a paired difference with its marker."""

    def __init__(self, values, marked: bool = False):
        self.values = [float(v) for v in values]
        self.n = len(self.values)
        self.mean = float(np.mean(self.values))
        self.std = float(np.std(self.values, ddof=1)) if self.n > 1 else float("nan")
        self.marked = marked

    def __str__(self) -> str:
        text = f"{_fmt(self.mean)} ± {_fmt(self.std)}" if self.n > 1 else _fmt(self.mean)
        return text + (" *" if self.marked else "")


def paired_difference(run: pd.DataFrame, baseline: pd.DataFrame, column: str = "FID") -> Spread | None:
    """run - baseline over their matching (train seed, sample seed) pairs; marked when
    |mean| > 2 std / sqrt(n) (n >= 2 pairs). None when no pair matches."""
    def by_pair(frame):
        return {(r["train seed"], r["seed"]): r[column] for _, r in frame.iterrows() if r[column] is not None}

    mine, theirs = by_pair(run), by_pair(baseline)
    pairs = [k for k in mine if k in theirs]
    if not pairs:
        return None
    diff = Spread([mine[k] - theirs[k] for k in pairs])
    diff.marked = diff.n >= 2 and abs(diff.mean) > 2 * diff.std / math.sqrt(diff.n)
    return diff


def aggregate(part: pd.DataFrame) -> pd.DataFrame:
    """One row per group: settings from its first run, metrics as Spread over its runs, the seeds it
    covers, n, and (when a group has several runs) the paired FID difference to the first row."""
    groups = list(dict.fromkeys(part["group"]))
    seeded = any((part["group"] == g).sum() > 1 for g in groups)
    if not seeded:
        return part
    metrics = [c for c in METRIC_COLUMNS.values() if c in part]
    baseline = part[part["group"] == groups[0]]
    rows = []
    for group in groups:
        members = part[part["group"] == group]
        row = members.iloc[0].copy()
        for column in metrics:
            values = [v for v in members[column] if v is not None and not pd.isna(v)]
            row[column] = Spread(values) if len(values) > 1 else (values[0] if values else None)
        row["seed"] = ", ".join(str(s) for s in dict.fromkeys(members["seed"]))
        row["n"] = len(members)
        if "FID" in part:
            diff = paired_difference(members, baseline) if group != groups[0] else None
            row[f"ΔFID vs {baseline['run'].iloc[0]}"] = diff
        rows.append(row)
    out = pd.DataFrame(rows, dtype=object).reset_index(drop=True)
    out.attrs["paired"] = True
    return out


def _fmt(value) -> str:
    if isinstance(value, Spread):
        return str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 0.1 or value == 0:  # 0.00, 0.20, 1.50, 338.65: one format down a column
            return f"{value:.2f}"
        return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"  # 0.025, 0.004, 0.0003
    return str(value)


def table_frames(records: list[dict]) -> dict[str, pd.DataFrame]:
    """One DataFrame per table, in first-appearance order, with only the columns that vary or matter."""
    frame = pd.DataFrame(records, dtype=object)  # keep ints as ints next to None
    tables = {}
    for name in dict.fromkeys(t for r in records for t in r["tables"]):
        rows = frame[frame["tables"].apply(lambda ts, name=name: name in ts)]
        if "group" in rows:
            rows = aggregate(rows)
        part = rows[[c for c in rows.columns if c not in HIDDEN]]
        shown_here = list(part.columns)
        metrics = [c for c in METRIC_COLUMNS.values() if c in part and part[c].notna().any()]
        diffs = [c for c in shown_here if c.startswith("ΔFID")]
        keep = [c for c in shown_here if c in ("run", "model", "n", *metrics, *diffs)
                or (c not in METRIC_COLUMNS.values() and part[c].map(_fmt).nunique() > 1)]
        tables[name] = part[keep].copy()
        tables[name].attrs["paired"] = bool(rows.attrs.get("paired"))
        tables[name].attrs["protocol"] = {  # shared by every row: said once, under the table
            c: part[c].iloc[0] for c in PROTOCOL_COLUMNS if c in part and c not in keep
            and part[c].notna().any()}
    return tables


def protocol_line(frame: pd.DataFrame) -> str:
    """The settings every row of a table shares, e.g. 'sampler sde, NFE 50, seed 0, ...'."""
    return ", ".join(f"{column} {_fmt(value)}" for column, value in frame.attrs["protocol"].items())


def table_notes(frame: pd.DataFrame) -> list[str]:
    """What is said under a table: the protocol its rows share, and how seeded rows are summarised."""
    notes = [f"All rows: {protocol_line(frame)}."] if frame.attrs.get("protocol") else []
    return notes + ([PAIRED_NOTE] if frame.attrs.get("paired") else [])


def markdown(tables: dict[str, pd.DataFrame]) -> str:
    lines = []
    for name, frame in tables.items():
        lines += [f"## {name}", "", "| " + " | ".join(frame.columns) + " |",
                  "|" + "|".join(" --- " for _ in frame.columns) + "|"]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
        lines += [""] + [line for note in table_notes(frame) for line in (note, "")]
    return "\n".join(lines)


def html(tables: dict[str, pd.DataFrame]) -> str:
    """The tables as one standalone HTML page: what the Snakemake report shows inline (it offers a
    Markdown file only as a download)."""
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>ReDi results</title><style>',
             "body{font-family:sans-serif;margin:1.5em;color:#222}",
             "table{border-collapse:collapse;margin:.5em 0}",
             "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f3f3f3}",
             "td:first-child,th:first-child{text-align:left}p{color:#555;max-width:60em}",
             "</style></head><body>"]
    for name, frame in tables.items():
        parts += [f"<h2>{escape(name)}</h2>", "<table><tr>"
                  + "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns) + "</tr>"]
        parts += ["<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>"
                  for row in frame.itertuples(index=False)]
        parts.append("</table>")
        parts += [f"<p>{escape(note)}</p>" for note in table_notes(frame)]
    return "\n".join([*parts, "</body></html>", ""])


def latex(tables: dict[str, pd.DataFrame]) -> str:
    def escape(text: str) -> str:
        return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    out = []
    for name, frame in tables.items():
        align = "l" * 2 + "r" * (len(frame.columns) - 2)
        out += [f"% {name}", r"\begin{tabular}{" + align + "}", r"\toprule",
                " & ".join(escape(c) for c in frame.columns) + r" \\", r"\midrule"]
        out += [" & ".join(escape(_fmt(v)) for v in row) + r" \\" for row in frame.itertuples(index=False)]
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [f"% all rows: {protocol_line(frame)}", ""] if frame.attrs.get("protocol") else [""]
        if frame.attrs.get("paired"):
            out += [f"% {PAIRED_NOTE}", ""]
    return "\n".join(out)


def sample_mosaic(samples_dir: str | Path, conditional: bool) -> tuple[np.ndarray, list[int]] | None:
    """A run's samples as one image and its rows' classes: one row per class (conditional; short rows
    when a class has fewer samples), else a plain 8 x 8 grid (no classes).

    Reads samples.npz (arr_0 images, arr_1 labels) in batches and stops as soon as the rows are full,
    so 50,000 ImageNet samples are never loaded whole.
    """
    from .metrics.images import npz_images  # the streaming reader of ADM's layout

    path = Path(samples_dir) / "samples.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        labels = data["arr_1"] if conditional and "arr_1" in data.files else None
    if labels is None:
        images = np.concatenate(list(npz_images(path, GRID_COLUMNS ** 2, limit=GRID_COLUMNS ** 2)))
        return tile([images[i:i + GRID_COLUMNS] for i in range(0, len(images), GRID_COLUMNS)]), []
    classes = np.unique(labels)[:GRID_CLASSES]
    rows: dict[int, list[np.ndarray]] = {int(c): [] for c in classes}
    start = 0
    for batch in npz_images(path, 256):
        for label, image in zip(labels[start:start + len(batch)], batch, strict=True):
            if int(label) in rows and len(rows[int(label)]) < GRID_COLUMNS:
                rows[int(label)].append(image)
        start += len(batch)
        if all(len(r) == GRID_COLUMNS for r in rows.values()):
            break
    return tile([np.stack(r) for r in rows.values() if r]), [c for c, r in rows.items() if r]


def tile(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Rows of (n, H, W, 3) images -> one uint8 image with white gaps (short rows left blank)."""
    h, w = rows[0].shape[1:3]
    grid = np.full((len(rows) * (h + gap) + gap, GRID_COLUMNS * (w + gap) + gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for q, image in enumerate(row[:GRID_COLUMNS]):
            y, x = gap + r * (h + gap), gap + q * (w + gap)
            grid[y:y + h, x:x + w] = image
    return grid


def plot_grids(records: list[dict], path: Path) -> None:
    """Every run's samples with its label and FID above them (constrained layout: titles never overlap)."""
    mosaics = [sample_mosaic(r["samples_dir"], bool(r.get("cond."))) for r in records]
    aspect = max([m[0].shape[0] / m[0].shape[1] for m in mosaics if m is not None] or [1.0])
    columns = min(3, len(records))
    rows = math.ceil(len(records) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, (3.6 * aspect + 0.7) * rows),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, record, mosaic in zip(axes.flat, records, mosaics, strict=False):
        if mosaic is not None:
            image, classes = mosaic
            ax.imshow(image, interpolation="nearest")
            if classes:  # the class of each row, on the left
                ax.axis("on")
                ax.set_xticks([])
                row = (image.shape[0] - 2) / len(classes)
                ax.set_yticks([2 + row * (k + 0.5) for k in range(len(classes))], [str(c) for c in classes],
                              fontsize=7)
                ax.set_ylabel("class", fontsize=8)
                ax.tick_params(length=0)
                for side in ax.spines.values():
                    side.set_visible(False)
        fid = record.get("FID")
        kind = "one row per class" if record.get("cond.") else "unconditional"
        seeds = (f" (train seed {record['train seed']}, sample seed {record['seed']})"
                 if record.get("train seed") is not None else "")  # one run of its group: say which
        ax.set_title(f"{record['run']}\n" + (f"FID {fid:.1f}{seeds}, " if fid is not None else "") + kind,
                     fontsize=9)
    _save(fig, path)


def fid_curves(records: list[dict]) -> dict[str, list[tuple[int, float, str]]]:
    """label -> [(training step, FID, run name)] by step: one entry per curve, i.e. per training's
    fid_steps runs plus its final run; keyed by the curve's run, never by a label two runs may share."""
    labels = {r["name"]: r["run"] for r in records}
    curves: dict[str, list[tuple[int, float, str]]] = {}
    for record in records:
        if record.get("FID") is not None and record.get("steps") is not None:
            curves.setdefault(record["curve"], []).append(
                (int(record["steps"]), float(record["FID"]), record["name"]))
    return {labels.get(curve, curve): sorted(points) for curve, points in curves.items()}


def plot_fid_vs_step(records: list[dict], path: Path) -> None:
    """One line per training with fid_steps points, other runs as single markers; a note when no run
    has fid_steps points (a plot of unconnected final FIDs would only repeat the table)."""
    curves = fid_curves(records)
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    if not any(len(points) > 1 for points in curves.values()):
        ax.axis("off")
        ax.text(0.5, 0.5, "No FID-vs-step points: no run sets fid_steps.\n"
                "Add e.g. `fid_steps: [100000, 200000]` to a run in runs: to sample and evaluate\n"
                "its EMA weights at those training steps; the tables hold the final FIDs.",
                ha="center", va="center", fontsize=10, wrap=True)
        _save(fig, path)
        return
    ax.set_prop_cycle(color=plt.get_cmap("tab10").colors)
    for label, points in curves.items():
        steps, fids, _ = zip(*points, strict=True)
        line = len(points) > 1
        ax.plot(steps, fids, marker="o" if line else "s", linestyle="-" if line else "none", label=label)
    ax.set(title="FID vs training step (lower is better)", xlabel="training step", ylabel="FID")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)


def fid_rows(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{table: {row label: FIDs of the row's runs}}: what fid_by_run.png draws (a row = a seed group)."""
    tables: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        for table in r["tables"] or ["runs"]:
            tables.setdefault(table, {}).setdefault(r.get("group") or r["name"], []).append(r)
    return {table: {members[0]["run"]: [float(m["FID"]) for m in members if m.get("FID") is not None]
                    for members in rows.values()} for table, rows in tables.items()}


def plot_fid_spread(records: list[dict], path: Path) -> None:
    """Each table's rows on one axis: every run's FID as a dot (a row's seed pairs side by side) and,
    for rows of several runs, mean ± sample std as a bar, so a difference can be set against the
    spread at a glance."""
    tables = fid_rows(records)
    height = sum(0.9 + 0.4 * len(rows) for rows in tables.values())
    fig, axes = plt.subplots(len(tables), 1, figsize=(7, height), layout="constrained", squeeze=False)
    for ax, (table, rows) in zip(axes[:, 0], tables.items(), strict=True):
        for y, fids in enumerate(rows.values()):
            offsets = np.linspace(-0.15, 0.15, len(fids)) if len(fids) > 1 else np.zeros(len(fids))
            ax.plot(fids, y + offsets, "o", ms=4, color="tab:blue", alpha=0.7)
            if len(fids) > 1:
                ax.errorbar([np.mean(fids)], [y], xerr=[np.std(fids, ddof=1)], fmt="|", ms=14, capsize=4,
                            color="black")
        ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel("FID")
        ax.set_title(f"{table}: FID of every run (dots); mean ± std over a row's seeds (black)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def training_labels(records: list[dict]) -> dict[str, str]:
    """train_dir -> the label of the run that trains there (sampling variants share its line)."""
    labels = {r["name"]: r["run"] for r in records}
    trainings: dict[str, str] = {}
    seeds: dict[str, object] = {}
    for record in records:
        if record.get("train_dir"):
            trainings.setdefault(record["train_dir"], labels.get(record["training"], record["run"]))
            seeds.setdefault(record["train_dir"], record.get("train seed"))
    uses = Counter(trainings.values())
    return {train_dir: f"{label} (train seed {seeds[train_dir]})"
            if uses[label] > 1 and seeds[train_dir] is not None else label
            for train_dir, label in trainings.items()}  # a group's trainings differ by their seed


def plot_training(records: list[dict], path: Path) -> None:
    """Losses of each training once, named after the run that trains (not a sampling variant of it)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    trainings = training_labels(records)
    colours = plt.get_cmap("tab10").colors
    for k, (train_dir, label) in enumerate(trainings.items()):  # one colour per training in both panels
        log = Path(train_dir) / "metrics.jsonl"
        if not log.is_file():
            continue
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        steps = [entry["step"] for entry in lines]
        style = {"label": label, "color": colours[k % len(colours)]}
        axes[0].plot(steps, [entry["loss_x"] for entry in lines], **style)
        if any("loss_z" in entry for entry in lines):
            axes[1].plot(steps, [entry.get("loss_z", np.nan) for entry in lines], **style)
    axes[0].set(title="image loss (MSE_x)", xlabel="training step", yscale="log")
    # concat's z loss is over bilinearly upsampled maps at the latent's resolution: not comparable
    # with merged/separate, whose z lives on the token grid
    axes[1].set(title="representation loss (MSE_z)\nconcat: at the latent resolution, not comparable",
                xlabel="training step", yscale="log")
    for ax in axes:
        ax.title.set_fontsize(10)
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 5.2, not 5.2 x 10^0
            axis(FormatStrFormatter("%g"))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(runs: list[dict], out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """tables.md, tables.tex, tables.html, runs.csv, grids.png, fid_vs_step.png, fid_by_run.png and
    training.png in out_dir."""
    out_dir = Path(out_dir)
    records = unique_labels([run_record(run) for run in runs])
    if not records:
        raise ReDiError("no runs to report")
    tables = table_frames(records)
    with atomic_path(out_dir / "runs.csv") as tmp:
        rows = pd.DataFrame(records).drop(columns=["train_dir", "samples_dir"])
        rows["tables"] = rows["tables"].apply(";".join)
        rows.to_csv(tmp, index=False)
    with atomic_path(out_dir / "tables.md") as tmp:
        tmp.write_text(markdown(tables))
    with atomic_path(out_dir / "tables.tex") as tmp:
        tmp.write_text(latex(tables))
    with atomic_path(out_dir / "tables.html") as tmp:
        tmp.write_text(html(tables))
    shown = [r for r in records if r["tables"]] or records
    plot_grids(first_of_groups(shown), out_dir / "grids.png")  # one grid per group
    plot_fid_vs_step(records, out_dir / "fid_vs_step.png")
    plot_fid_spread(records, out_dir / "fid_by_run.png")
    plot_training(records, out_dir / "training.png")
    return tables


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi report`."""
    runs = load_runs(args.runs)
    tables = write_report(runs, args.out)
    write_manifest(Path(args.out) / "manifest.json", "report", {}, runs=runs,
                   tables={name: len(frame) for name, frame in tables.items()})
    print(markdown(tables))
