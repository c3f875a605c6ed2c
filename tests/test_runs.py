"""The run grid: merging, validation naming the run, train_run, tables; the paper's grid offline."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from redi.config import validate_config
from redi.errors import ConfigError
from redi.runs import deep_merge, expand_runs

REPO = Path(__file__).resolve().parents[1]


def grid(runs, **sections):
    return validate_config({"dataset": {"name": "t"}, **sections, "runs": runs})


def test_deep_merge_replaces_leaves_and_keeps_the_rest():
    base = {"model": {"size": "B", "fusion": "merged"}, "rank": 8}
    merged = deep_merge(base, {"model": {"fusion": "none"}, "steps": 5})
    assert merged == {"model": {"size": "B", "fusion": "none"}, "rank": 8, "steps": 5}
    assert base["model"]["fusion"] == "merged"  # not mutated


def test_runs_merge_onto_the_sections_in_order():
    runs = expand_runs(grid({"base": {"train": {"model": {"fusion": "none"}}}, "redi": None,
                             "rg": {"train_run": "redi", "sample": {"rg_scale": 1.5}, "table": ["a", "b"]}},
                            train={"rank": 4, "rep_dropout": 0.2}))
    assert list(runs) == ["base", "redi", "rg"]
    assert runs["base"]["train"]["model"]["fusion"] == "none" and runs["base"]["train"]["rank"] == 4
    assert runs["redi"]["train"]["model"]["fusion"] == "concat"  # the schema default: the official layout
    assert runs["rg"]["train"] == runs["redi"]["train"] and runs["rg"]["sample"]["rg_scale"] == 1.5
    assert runs["rg"]["train_run"] == "redi" and runs["redi"]["train_run"] == "redi"
    assert runs["rg"]["tables"] == ["a", "b"] and runs["base"]["tables"] == ["runs"]
    assert list(expand_runs(validate_config({"dataset": {"name": "t"}}))) == ["main"]


@pytest.mark.parametrize("runs, message", [
    ({"bad": {"train": {"rank": "eight"}}}, "run 'bad'"),
    ({"a": {"train_run": "missing"}}, "train_run 'missing'"),
    ({"a": {}, "b": {"train_run": "a", "train": {"rank": 2}}}, "has train_run and train overrides"),
    ({"a": {"train": {"objective": "ddpm"}, "sample": {"sampler": "sde"}}},
     "does not fit train.objective ddpm"),
])
def test_bad_runs_are_named(runs, message):
    with pytest.raises(ConfigError, match=message):
        expand_runs(grid(runs))


def test_fid_steps_add_snapshot_runs_of_the_same_training():
    runs = expand_runs(grid({"redi": {"fid_steps": [400, 200], "label": "ReDi"},
                             "rg": {"train_run": "redi", "sample": {"rg_scale": 1.5}, "fid_steps": [200]}},
                            train={"steps": 800, "rep_dropout": 0.2}))
    assert list(runs) == ["redi", "rg", "redi-step200", "redi-step400", "rg-step200"]
    point = runs["redi-step200"]
    assert point["sample"]["train_step"] == 200 and point["train_run"] == "redi"
    assert point["tables"] == [] and point["label"] == "ReDi @ 200" and point["curve"] == "redi"
    assert runs["rg-step200"]["sample"]["rg_scale"] == 1.5 and runs["rg-step200"]["curve"] == "rg"
    # every run of that training asks it for the same snapshots (a speed key: no new version)
    assert {tuple(r["train"]["snapshot_steps"]) for r in runs.values()} == {(200, 400)}
    assert runs["redi"]["sample"]["train_step"] is None and runs["redi"]["curve"] == "redi"


@pytest.mark.parametrize("runs, message", [
    ({"a": {"fid_steps": [800]}}, "fid_steps [800] must lie between 0 and train.steps 800"),
    ({"a": {"fid_steps": [100]}, "a-step100": None}, "adds a run 'a-step100', a name already in runs"),
    ({"a": {"fid_steps": [100], "sample": {"checkpoint": "x.pt", "architecture": "DiT-B/2"}}},
     "fid_steps needs a run that samples its final weights"),
])
def test_bad_fid_steps_are_named(runs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand_runs(grid(runs, train={"steps": 800}))


def test_run_names_and_keys_are_checked_by_the_schema():
    with pytest.raises(ConfigError, match="runs"):
        validate_config({"dataset": {"name": "t"}, "runs": {"has space": {}}})
    with pytest.raises(ConfigError, match="unknown key"):
        validate_config({"dataset": {"name": "t"}, "runs": {"a": {"model": {}}}})


def test_the_paper_grid_plans_offline(tmp_path):
    config = yaml.safe_load((REPO / "config" / "imagenet256.yaml").read_text())
    runs = expand_runs(validate_config(config))
    assert {"dit-b2", "dit-b2-redi-mr", "dit-b2-redi-sp", "dit-b2-r1", "dit-b2-r32", "sit-xl2-redi",
            "dit-xl2-uncond-redi-rg", "sit-xl2-redi-4m-cfg"} <= set(runs)
    assert runs["dit-b2-r4"]["train"]["rank"] == 4 and runs["dit-b2-r4"]["train"]["objective"] == "ddpm"
    assert runs["sit-xl2-redi"]["train"]["model"]["fusion"] == "concat"  # the paper's runs: official layout
    official = runs["official-sit-xl2-redi"]["sample"]
    keys = ("sampler", "steps", "cfg_scale", "cfg_channels", "cfg_noise_low", "cfg_noise_high", "num_samples",
            "labels")
    assert [official[k] for k in keys] == ["sde", 250, 2.4, "image", 0.0, 1.0, 50000, "random"]
    assert official["checkpoint_source"] == "hf://zelaki/SiT-ReDi-XL-2"
    assert config["evaluate"]["reference_source"].endswith("/VIRTUAL_imagenet256_labeled.npz")
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(REPO / "config" / "imagenet256.yaml"), "-n"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("Job stats:")[1].split("Reasons")[0]
    trained = sum(1 for name, spec in runs.items()  # RG/CFG variants share; official checkpoints need none
                  if spec["train_run"] == name and not spec["sample"]["checkpoint"])
    counts = {line.split()[0]: int(line.split()[1]) for line in table.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["train"] == trained and counts["sample"] == counts["evaluate"] == len(runs)
    assert counts["report"] == 1 and counts["shard"] == 1 and counts["reference_stats"] == 1
    assert "official-sit-xl2-redi" in done.stdout
    assert counts["fetch"] == 2  # the released checkpoint and ADM's reference batch, downloaded when missing


def test_seeds_expand_into_one_run_per_pair_sharing_each_training():
    runs = expand_runs(grid({"base": {"train": {"model": {"fusion": "none"}}, "seeds": {"train": [0, 1],
                                                                                        "sample": [0, 2]}},
                             "plain": None},
                            train={"steps": 800}))
    assert list(runs) == ["base@t0s0", "base@t0s2", "base@t1s0", "base@t1s2", "plain"]
    for t in (0, 1):
        for s in (0, 2):
            run = runs[f"base@t{t}s{s}"]
            assert (run["train"]["seed"], run["sample"]["seed"]) == (t, s)
            assert run["group"] == "base" and run["seeds"] == {"train": t, "sample": s}
            assert run["train_run"] == f"base@t{t}s0"  # sample seeds of one train seed share its training
            assert run["train"]["model"]["fusion"] == "none"
    assert runs["plain"]["group"] == "plain" and runs["plain"]["seeds"] == {"train": 0, "sample": 0}
    assert runs["plain"]["train_run"] == "plain"


def test_a_variant_of_a_seeded_run_samples_each_training_seed():
    runs = expand_runs(grid({"redi": {"seeds": {"train": [0, 1], "sample": [0, 1]}, "fid_steps": [400]},
                             "rg": {"train_run": "redi", "sample": {"rg_scale": 1.5}},
                             "oracle": {"train_run": "redi", "seeds": {"sample": [4]}}},
                            train={"steps": 800, "rep_dropout": 0.2}))
    rg = {n: r for n, r in runs.items() if r["group"] == "rg"}
    assert sorted(rg) == ["rg@t0s0", "rg@t0s1", "rg@t1s0", "rg@t1s1"]  # the source's sample seeds
    assert all(r["train_run"] == f"redi@t{r['seeds']['train']}s0" for r in rg.values())
    assert all(r["train"] == runs[r["train_run"]]["train"] for r in rg.values())
    assert [n for n, r in runs.items() if r["group"] == "oracle"] == ["oracle@t0s4", "oracle@t1s4"]
    # fid_steps of a seeded run: one point per seed pair, grouped as <run>-step<N>
    points = {n: r for n, r in runs.items() if r["group"] == "redi-step400"}
    assert sorted(points) == ["redi-step400@t0s0", "redi-step400@t0s1", "redi-step400@t1s0",
                              "redi-step400@t1s1"]
    assert all(p["sample"]["train_step"] == 400 and p["train_run"] == f"redi@t{p['seeds']['train']}s0"
               and p["sample"]["seed"] == p["seeds"]["sample"] for p in points.values())
    assert {tuple(r["train"]["snapshot_steps"]) for r in runs.values()} == {(400,)}


@pytest.mark.parametrize("runs, message", [
    ({"a": {"seeds": {"train": [0, 1]}, "train": {"seed": 3}}}, "run 'a' sets train.seed and seeds.train"),
    ({"a": {"seeds": {"sample": [0]}}, "b": {"train_run": "a", "seeds": {"train": [1]}}},
     "run 'b' has train_run and seeds.train"),
    ({"a": {"seeds": {"sample": [1, 1]}}}, "run 'a': seeds.sample [1, 1] repeats a seed"),
])
def test_bad_seeds_are_named(runs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand_runs(grid(runs))


def test_seeded_run_names_plan_in_snakemake(tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["runs"] = {"baseline": {"train": {"model": {"fusion": "none"}}, "seeds": {"train": [0, 1],
                                                                                   "sample": [0, 1]}},
                      "redi": {"seeds": {"train": [0], "sample": [0]}, "fid_steps": [10]}}
    configfile = tmp_path / "seeded.yaml"
    configfile.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(configfile), "-n"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout.split("Job stats:")[1].split("Reasons")[0]
    counts = {line.split()[0]: int(line.split()[1]) for line in table.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["train"] == 3 and counts["sample"] == counts["evaluate"] == 6
    assert "samples/baseline@t1s1/" in done.stdout and "train/redi@t0s0/" in done.stdout
