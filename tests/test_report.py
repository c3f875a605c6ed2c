"""The report's pure parts: FID-vs-step curves, unique labels, protocol columns and the plots' files."""

import json

import numpy as np
import pytest

from redi.errors import ReDiError
from redi.report import (
    fid_curves,
    fid_rows,
    sample_mosaic,
    table_frames,
    training_labels,
    unique_labels,
    write_report,
)


def record(name, fid, steps, curve=None, tables=("runs",), label=None, train_dir=None, **extra):
    return {"run": label or name, "name": name, "curve": curve or name, "tables": list(tables),
            "model": "SiT-S/2", "steps": steps, "FID": fid, "samples_dir": "", "training": curve or name,
            "train_dir": train_dir or f"train/{curve or name}"} | extra


def test_points_join_their_runs_curve_sorted_by_step():
    records = [record("redi", 20.0, 800, label="ReDi"), record("base", 30.0, 800),
               record("redi-step400", 35.0, 400, curve="redi", tables=()),
               record("redi-step200", 50.0, 200, curve="redi", tables=()),
               record("broken", None, 800)]
    assert fid_curves(records) == {"ReDi": [(200, 50.0, "redi-step200"), (400, 35.0, "redi-step400"),
                                            (800, 20.0, "redi")], "base": [(800, 30.0, "base")]}


def test_a_line_of_fid_vs_step_never_joins_two_trainings():
    # the demo's case: two trainings share the label "SiT baseline" and the final step
    records = unique_labels([
        record("baseline", 90.0, 800, label="SiT baseline", tables=("conditional",)),
        record("uncond-baseline", 105.0, 800, label="SiT baseline", tables=("unconditional",)),
        record("baseline-step400", 120.0, 400, curve="baseline", tables=(), label="SiT baseline @ 400"),
        record("uncond-baseline-step400", 130.0, 400, curve="uncond-baseline", tables=(),
               label="SiT baseline @ 400"),
        record("uncond-rg", 100.0, 800, train_dir="train/uncond-baseline", label="RG",
               tables=("unconditional",), training="uncond-baseline"),  # a sampling variant of it
    ])
    training_of = {r["name"]: r["train_dir"] for r in records}
    # training.png: one line per training, named after the run that trains, not its RG variant
    assert training_labels(records) == {"train/baseline": "SiT baseline (conditional)",
                                        "train/uncond-baseline": "SiT baseline (unconditional)"}
    curves = fid_curves(records)
    assert len(curves) == 3
    for label, points in curves.items():
        assert len({training_of[name] for _, _, name in points}) == 1, label
        assert len({step for step, _, _ in points}) == len(points), label  # no vertical segments


def test_every_table_row_has_a_unique_label():
    records = unique_labels([
        record("baseline", 1.0, 10, label="SiT baseline", tables=("conditional",)),
        record("redi", 2.0, 10, label="SiT + ReDi", tables=("conditional",)),
        record("uncond-baseline", 3.0, 10, label="SiT baseline", tables=("unconditional",)),
        record("uncond-b2", 4.0, 10, label="SiT baseline", tables=("unconditional",)),
        record("both", 5.0, 10, label="SiT + ReDi", tables=("conditional", "unconditional")),
    ])
    rows = [label for frame in table_frames(records).values() for label in frame["run"]]
    assert len({r["run"] for r in records}) == len(records)
    for frame in table_frames(records).values():
        assert frame["run"].is_unique
    assert "SiT baseline (conditional)" in rows and "SiT baseline [uncond-b2]" in rows
    with pytest.raises(ReDiError, match="give the runs distinct"):
        unique_labels([record("a", 1.0, 1, label="x [b]"), record("b", 1.0, 1, label="x"),
                       record("c", 1.0, 1, label="x")])  # b's fallback "x [b]" is a's label


def test_tables_hold_only_runs_that_name_them():
    records = [record("a", 1.0, 10), record("b", 2.0, 20, tables=("runs", "x")),
               record("a-step5", 3.0, 5, curve="a", tables=())]
    tables = table_frames(records)
    assert list(tables) == ["runs", "x"]
    assert list(tables["runs"]["run"]) == ["a", "b"] and list(tables["x"]["run"]) == ["b"]
    assert "curve" not in tables["runs"].columns and "steps" in tables["runs"].columns  # steps vary


def test_rows_differing_only_in_protocol_show_what_differs_and_absent_metrics_are_dropped():
    protocol = {"sampler": "sde", "NFE": 50, "CFG": 1.0, "RG": 1.0, "labels": "random", "seed": 0,
                "samples": 500, "reference": "ab12 (1000 img)", "Inception": "sha256:cd34", "FD_DINOv2": None}
    records = [record("a", 1.0, 10, **protocol), record("b", 2.0, 10, **{**protocol, "seed": 1}),
               record("c", 3.0, 10, **{**protocol, "NFE": 100, "sampler": "ode-heun"})]
    frame = table_frames(records)["runs"]
    assert {"seed", "NFE", "sampler", "FID"} <= set(frame.columns)
    assert not {"FD_DINOv2", "reference", "Inception", "labels", "CFG"} & set(frame.columns)
    assert len(frame.drop(columns=["run", "FID"]).astype(str).drop_duplicates()) == 3  # told apart
    records[0]["FD_DINOv2"] = 12.5
    assert "FD_DINOv2" in table_frames(records)["runs"].columns


def _write_run(root, name, label, conditional, table, fid, train_run=None, fd=None, seed=0):
    rng = np.random.default_rng(len(name))
    images = rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(40) % 4
    train = root / "train" / (train_run or name)
    samples = root / "samples" / name
    samples.mkdir(parents=True)
    train.mkdir(parents=True, exist_ok=True)
    np.savez(samples / "samples.npz", arr_0=images, **({"arr_1": labels} if conditional else {}))
    model = {"size": "S", "patch": 2, "depth": None, "hidden_size": None, "fusion": "none"}
    (train / "manifest.json").write_text(json.dumps({"stage": "train", "config": {"train": {
        "model": model, "objective": "interpolant", "rank": 8, "normalize_z": True, "rep_weight": 1.0,
        "rep_dropout": 0.0, "lr": 1e-4, "conditional": conditional, "steps": 100}}}))
    (train / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss_x": 1.0 / s}) + "\n"
                                                 for s in (10, 20)))
    sample_cfg = {"sampler": "sde", "steps": 50, "cfg_scale": 1.0, "cfg_channels": "image",
                  "cfg_noise_low": 0.0, "cfg_noise_high": 1.0, "rg_scale": 1.0, "seed": seed}
    (samples / "manifest.json").write_text(json.dumps({
        "stage": "sample", "config": {"sample": sample_cfg}, "sampler": "sde",
        "inputs": {"checkpoint": {"path": str(train / "final.pt")}}}))
    metrics = {"fid": fid, "sfid": 1.0, "precision": 0.5, "recall": 0.5, "num_samples": 40,
               "reference_sha256": "0123456789ab", "reference_images": 100,
               "inception_weights_id": "sha256:feedfeedfeed"} | ({"fd_dinov2": fd} if fd else {})
    (samples / "metrics.json").write_text(json.dumps(metrics))
    return {"name": name, "label": label, "tables": [table], "metrics": str(samples / "metrics.json"),
            "curve": name, "train_run": train_run or name, "step": 100}


def test_the_report_names_trainings_and_lays_out_grids(tmp_path):
    runs = [_write_run(tmp_path, "base", "SiT baseline", True, "conditional", 90.0),
            _write_run(tmp_path, "ub", "SiT baseline", False, "unconditional", 100.0),
            _write_run(tmp_path, "ub-rg", "SiT + RG", False, "unconditional", 95.0, train_run="ub")]
    tables = write_report(runs, tmp_path / "report")
    assert list(tables["conditional"]["run"]) == ["SiT baseline (conditional)"]
    assert "FD_DINOv2" not in tables["conditional"].columns  # not configured: absent, not faked
    csv = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    header = csv[0].split(",")
    protocol = {"sampler", "NFE", "CFG", "CFG on", "RG", "labels", "seed", "samples", "reference",
                "Inception"}
    assert protocol <= set(header)
    assert "0123456789ab (100 img)" in csv[1] and "sha256:feedfeedfeed" in csv[1]
    for name in ("grids.png", "fid_vs_step.png", "training.png", "tables.md", "tables.tex", "tables.html"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    conditional, classes = sample_mosaic(tmp_path / "samples" / "base", conditional=True)
    plain, none = sample_mosaic(tmp_path / "samples" / "ub", conditional=False)
    assert classes == [0, 1, 2, 3] and none == []
    assert conditional.shape[0] == 4 * 10 + 2 and plain.shape[0] == 5 * 10 + 2  # 4 class rows; 40 = 5 rows
    images = np.load(tmp_path / "samples" / "base" / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(conditional[12:20, 2:10], images[1])  # row 2 = class 1, its first sample


def seeded(group, fids, tables=("runs",), label=None):
    """The runs of one seeded group: fids {(train seed, sample seed): FID}."""
    return [record(f"{group}@t{t}s{s}", fid, 800, tables=tables, label=label or group, group=group,
                   seed=s, **{"train seed": t, "FID": fid, "sFID": 2.0 * fid})
            for (t, s), fid in fids.items()]


def test_seeded_groups_are_one_row_with_mean_std_n_and_a_paired_difference_to_the_first_row():
    base = {(0, 0): 100.0, (0, 1): 104.0, (1, 0): 110.0, (1, 1): 98.0}
    redi = {(0, 0): 90.0, (0, 1): 95.0, (1, 0): 99.0, (1, 1): 88.0}  # ~10 better on every pair
    noisy = {(0, 0): 130.0, (0, 1): 80.0, (1, 0): 112.0}  # one pair missing, differences spread wide
    records = unique_labels(seeded("baseline", base) + seeded("redi", redi) + seeded("noisy", noisy))
    frame = table_frames(records)["runs"]
    assert list(frame["run"]) == ["baseline", "redi", "noisy"] and list(frame["n"]) == [4, 4, 3]
    fid = frame.set_index("run")["FID"]
    # hand-computed: baseline mean 103, sample std sqrt(((-3)^2 + 1 + 49 + 25) / 3) = sqrt(28)
    assert fid["baseline"].mean == pytest.approx(103.0) and fid["baseline"].std == pytest.approx(28 ** 0.5)
    assert fid["redi"].mean == pytest.approx(93.0)
    assert frame.set_index("run")["sFID"]["redi"].mean == pytest.approx(186.0)
    diff = frame.set_index("run")["ΔFID vs baseline"]
    assert diff["baseline"] is None
    # redi - baseline per pair: -10, -9, -11, -10 -> mean -10, std sqrt(2/3); |-10| > 2 std / 2: marked
    assert diff["redi"].mean == pytest.approx(-10.0) and diff["redi"].std == pytest.approx((2 / 3) ** 0.5)
    assert diff["redi"].n == 4 and diff["redi"].marked
    # noisy - baseline over its 3 pairs: 30, -24, 2 -> mean 8/3, std sqrt(1474.67); not marked
    d = np.array([30.0, -24.0, 2.0])
    assert diff["noisy"].n == 3 and diff["noisy"].mean == pytest.approx(d.mean())
    assert diff["noisy"].std == pytest.approx(d.std(ddof=1)) and not diff["noisy"].marked
    assert str(diff["redi"]) == f"-10.00 ± {(2 / 3) ** 0.5:.2f} *"
    assert frame.attrs["paired"] and "seed" not in frame.columns  # every row covers sample seeds 0, 1


def test_the_report_keeps_one_csv_row_per_run_and_one_table_row_per_group(tmp_path):
    runs = []
    for t in (0, 1):
        for s in (0, 1):
            for group, fid in (("base", 100.0 + t + 2 * s), ("redi", 90.0 + 3 * t + s)):
                name = f"{group}@t{t}s{s}"
                run = _write_run(tmp_path, name, group, False, "runs", fid, train_run=f"{group}@t{t}s0",
                                 seed=s)
                runs.append(run | {"group": group, "seeds": {"train": t, "sample": s}})
    tables = write_report(runs, tmp_path / "report")
    csv = (tmp_path / "report" / "runs.csv").read_text().splitlines()
    assert len(csv) == 1 + 8 and "group" in csv[0] and "train seed" in csv[0]
    assert (tmp_path / "report" / "fid_by_run.png").stat().st_size > 0
    md = (tmp_path / "report" / "tables.md").read_text()
    assert "| base |" in md and "| redi |" in md and "ΔFID vs base" in md and "2 standard errors" in md
    assert list(tables["runs"]["n"]) == [4, 4]
    # redi - base per pair (t, s): -10, -11, -8, -9 -> mean -9.5, std sqrt(5/3), 2 SE = 1.29: marked
    assert f"| -9.50 ± {(5 / 3) ** 0.5:.2f} * |" in md


def test_the_html_tables_hold_the_markdown_tables_cells(tmp_path):
    """tables.html (what the Snakemake report shows inline) has the same tables, cells and notes as
    tables.md, escaped."""
    from html.parser import HTMLParser

    runs = [_write_run(tmp_path, name, name, False, "runs", fid, seed=0)
            for name, fid in (("base", 101.5), ("redi<&>", 90.25))]
    write_report(runs, tmp_path / "report")
    md = (tmp_path / "report" / "tables.md").read_text()
    md_rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
               if line.startswith("|") and "---" not in line]

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                self.rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.rows[-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    page = (tmp_path / "report" / "tables.html").read_text()
    parser = Cells()
    parser.feed(page)
    assert parser.rows == md_rows and any("redi<&>" in row for row in parser.rows)
    assert "redi&lt;&amp;&gt;" in page  # escaped in the source
    notes = [line for line in md.splitlines() if line.startswith("All rows:")]
    assert notes and all(note.replace("&", "&amp;") in page for note in notes)


def test_fid_by_run_draws_every_run_of_a_row_and_rows_per_table():
    runs = [record(f"{g}@t{t}s{s}", 100.0 * (g == "base") + 10 * t + s, 800, tables=tables, label=g, group=g)
            for g, tables in (("base", ("a", "b")), ("redi", ("a",))) for t in (0, 1) for s in (0, 1)]
    rows = fid_rows(runs)
    assert rows == {"a": {"base": [100.0, 101.0, 110.0, 111.0], "redi": [0.0, 1.0, 10.0, 11.0]},
                    "b": {"base": [100.0, 101.0, 110.0, 111.0]}}


def test_the_trainings_of_a_seed_group_are_told_apart_by_their_seed():
    runs = [record(f"base@t{t}s{s}", 100.0, 800, label="SiT baseline", group="base", train_dir=f"train/t{t}",
                   training=f"base@t{t}s0", **{"train seed": t}) for t in (0, 1) for s in (0, 1)]
    runs.append(record("redi", 90.0, 800, label="ReDi", group="redi", train_dir="train/redi",
                       **{"train seed": 0}))
    assert training_labels(runs) == {"train/t0": "SiT baseline (train seed 0)",
                                     "train/t1": "SiT baseline (train seed 1)", "train/redi": "ReDi"}
