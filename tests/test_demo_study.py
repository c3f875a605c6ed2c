"""config/demo_study*.yaml: every part plans offline, parts share data stages and runs, seed 7 is held
back."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from redi.config import validate_config
from redi.runs import deep_merge, expand_runs

REPO = Path(__file__).resolve().parents[1]
PARTS = ["demo_study_part1", "demo_study_part2", "demo_study_part3_mae", "demo_study_part3_random",
         "demo_study_part4", "demo_study_part5_baseline", "demo_study_part5_random",
         "demo_study_part6_baseline", "demo_study_part6_random", "demo_study_part7"]
# (train seeds, sample seeds) of a group where not (0, 1) x (0, 1): part 4 has one sample seed (its budget),
# part 5 four trainings (its oracle one sample seed), part 6 the snapshots of part 5's new trainings,
# part 7 one sample seed
SEEDS = {("demo_study_part4", None): ({0, 1}, {0}),
         ("demo_study_part7", None): ({0, 1}, {0}),
         ("demo_study_part6_baseline", None): ({2, 3}, {0}),
         ("demo_study_part6_random", None): ({2, 3}, {0}),
         ("demo_study_part5_baseline", "baseline"): ({0, 1, 2, 3}, {0, 1}),
         ("demo_study_part5_random", "redi-mr"): ({0, 1, 2, 3}, {0, 1}),
         ("demo_study_part5_random", "redi-mr-oracle"): ({0, 1, 2, 3}, {0})}
HELD_BACK_SEED = 7
FINALS = ["demo_study_final_baselines", "demo_study_final"]  # the final table: seed 7 on the chosen defaults


def part_config(part):
    base = yaml.safe_load((REPO / "config" / "demo_study.yaml").read_text())
    return validate_config(deep_merge(base, yaml.safe_load((REPO / "config" / f"{part}.yaml").read_text())))


@pytest.mark.parametrize("part", PARTS)
def test_every_group_has_two_training_seeds_and_none_uses_the_held_back_one(part):
    runs = expand_runs(part_config(part))
    groups = {}
    for run in runs.values():
        groups.setdefault(run["group"], set()).add((run["seeds"]["train"], run["seeds"]["sample"]))
    for group, pairs in groups.items():
        train_seeds, sample_seeds = SEEDS.get((part, group), SEEDS.get((part, None), ({0, 1}, {0, 1})))
        assert {t for t, _ in pairs} == train_seeds and {s for _, s in pairs} == sample_seeds, group
        assert len(pairs) == len(train_seeds) * len(sample_seeds), group
    assert all(run["sample"]["seed"] != HELD_BACK_SEED for run in runs.values())


def planned_dirs(workdir, part, base="demo_study"):
    """The result folders a dry run of config/<base>.yaml + config/<part>.yaml plans (part None: the
    default, config/config.yaml alone)."""
    configs = [] if part is None else ["--configfile", *(str(REPO / "config" / f"{name}.yaml")
                                                       for name in (base, part))]
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), *configs, "-n"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return set(re.findall(r"results/mnist-demo/([\w-]+/(?:[\w.@-]+/)?[0-9a-f]{8})/", done.stdout))


@pytest.mark.parametrize("final", FINALS)
def test_the_final_table_samples_only_the_held_back_seed_on_two_trainings(final):
    runs = expand_runs(part_config(final))
    tabled = [run for run in runs.values() if run["tables"]]
    assert tabled and all(run["sample"]["seed"] == HELD_BACK_SEED for run in tabled)
    for group in {run["group"] for run in tabled}:
        assert {run["seeds"]["train"] for run in tabled if run["group"] == group} == {0, 1}, group


def test_the_parts_share_data_stages_and_reuse_each_others_runs(tmp_path):
    plans = {part: planned_dirs(tmp_path, part) for part in PARTS + FINALS}
    one, two, mae = plans["demo_study_part1"], plans["demo_study_part2"], plans["demo_study_part3_mae"]
    shared = {d for d in one if d.split("/")[0] in ("shards", "latents", "standin-vae", "reference")}
    assert len(shared) == 4 and all(shared <= plan for plan in plans.values())
    reused = {d for d in one if d.startswith(("train/baseline@", "train/redi-mr@"))}
    assert len(reused) == 4 and reused <= two  # part 2 trains only redi-concat
    assert not {d for d in one if d.startswith("standin-vit/")} & mae  # part 3 retrains the stand-in ViT
    trainings = {part: {d for d in plan if d.startswith("train/")} for part, plan in plans.items()}
    # the final table samples the parts' trainings; only the random stand-in's unconditional ones are new
    parts_1_4 = trainings["demo_study_part1"] | trainings["demo_study_part4"]
    assert trainings["demo_study_final_baselines"] <= parts_1_4
    new = trainings["demo_study_final"] - trainings["demo_study_part3_random"]
    assert len(new) == 2 and all(d.startswith("train/uncond-redi@") for d in new)
    for kind in ("baseline", "random"):  # part 6 samples part 5's snapshots and trains nothing
        assert trainings[f"demo_study_part6_{kind}"] <= trainings[f"demo_study_part5_{kind}"]
    assert trainings["demo_study_part7"] <= trainings["demo_study_final"]  # RG on the final's trainings


def test_compare_pairs_groups_across_parts_by_seed_pair_and_by_training(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "docs" / "demo_study"))
    import compare

    seeds = [(0, 0), (0, 1), (1, 0), (1, 1)]
    base, other = [100.0, 104.0, 101.0, 99.0], [97.0, 100.0, 99.0, 95.0]
    for name, fids, extra in (("a.csv", base, [(2, 0, 50.0)]), ("b.csv", other, [])):
        points = [(t, s, f) for (t, s), f in zip(seeds, fids, strict=True)] + extra  # extra: unpaired
        rows = [{"group": "g", "train seed": t, "seed": s, "FID": f} for t, s, f in points]
        rows.append({"group": "other", "train seed": 0, "seed": 0, "FID": 1.0})
        pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    by_pair, by_training = compare.paired(compare.load_group(f"{tmp_path}/a.csv:g"),
                                          compare.load_group(f"{tmp_path}/b.csv:g"))
    diffs = np.subtract(other, base)
    assert np.allclose(by_pair.to_numpy(), diffs)
    assert np.allclose(by_training.to_numpy(), [diffs[:2].mean(), diffs[2:].mean()])
    monkeypatch.setattr(sys, "argv", ["compare.py", f"{tmp_path}/a.csv:g", f"{tmp_path}/b.csv:g"])
    compare.main()
    sem = diffs.std(ddof=1) / 2
    mean, std = diffs.mean(), diffs.std(ddof=1)
    expected = f"by seed pair {mean:+.2f} ± {std:.2f} (n = 4, {mean / sem:+.1f} SE)"
    assert expected in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no rows of group 'missing'"):
        compare.load_group(f"{tmp_path}/a.csv:missing")


def test_the_full_demo_adds_a_sample_seed_and_rg_to_the_defaults_runs(tmp_path):
    """config/demo_full.yaml reuses every folder of the default demo but its report, and adds exactly
    the second sample seed of its four runs and the RG run's two samples."""
    default, full = planned_dirs(tmp_path, None), planned_dirs(tmp_path, "demo_full", base="config")
    assert {d for d in default - full} == {d for d in default if d.startswith("report/")}
    added = {d.rsplit("/", 1)[0] for d in full - default if not d.startswith("report/")}
    seed_1 = {f"samples/{run}@t0s1" for run in ("baseline", "redi-mr", "uncond-baseline", "uncond-redi")}
    assert added == seed_1 | {"samples/uncond-redi-rg@t0s0", "samples/uncond-redi-rg@t0s1"}


def test_fid_vs_step_folds_step_runs_into_curves_averaging_sample_seeds_first(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "docs" / "demo_study"))
    import fid_vs_step

    rng = np.random.default_rng(0)
    fids = {}  # (csv, step, train seed, sample seed) -> FID
    for name in ("a.csv", "b.csv"):
        rows = []
        for step in (200, 400, 800):
            for train_seed in (2, 3):
                for sample_seed in (0, 1):
                    fid = fids[name, step, train_seed, sample_seed] = float(rng.uniform(50, 150))
                    group = "g" if step == 800 else f"g-step{step}"
                    rows.append({"group": group, "steps": step, "train seed": train_seed, "seed": sample_seed,
                                 "FID": fid})
        rows.append({"group": "gg-step200", "steps": 200, "train seed": 2, "seed": 0, "FID": 1e6})  # not g's
        pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    curve_a, curve_b = (fid_vs_step.load_curve(f"{tmp_path}/{name}:g") for name in ("a.csv", "b.csv"))

    def per_training(name, step):
        return [np.mean([fids[name, step, t, s] for s in (0, 1)]) for t in (2, 3)]

    stats = fid_vs_step.by_step(curve_a)
    assert list(stats.index) == [200, 400, 800] and list(stats["n"]) == [2, 2, 2]
    for step in (200, 400, 800):
        assert np.isclose(stats.loc[step, "mean"], np.mean(per_training("a.csv", step)))
        assert np.isclose(stats.loc[step, "std"], np.std(per_training("a.csv", step), ddof=1))
        diff = np.subtract(per_training("b.csv", step), per_training("a.csv", step))
        paired = fid_vs_step.paired_by_step(curve_a, curve_b).loc[step]
        assert np.isclose(paired["mean"], diff.mean()) and np.isclose(paired["std"], diff.std(ddof=1))
    figure = tmp_path / "steps.png"
    monkeypatch.setattr(sys, "argv", ["fid_vs_step.py", f"{tmp_path}/a.csv:g", f"{tmp_path}/b.csv:g",
                                      "--plot", str(figure)])
    fid_vs_step.main()
    assert figure.stat().st_size > 0
    expected = f"step 200: FID {stats.loc[200, 'mean']:.2f} ± {stats.loc[200, 'std']:.2f} (n = 2)"
    assert expected in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no rows of group 'missing'"):
        fid_vs_step.load_curve(f"{tmp_path}/a.csv:missing")
