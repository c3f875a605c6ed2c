"""The Snakemake workflow end to end at toy size (config/ci.yaml): outputs, no-op rerun, and
that a config change reruns only the stages that read the changed key."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def snakemake(workdir: Path, configfile: Path, *args: str) -> str:
    """Run Snakemake in `workdir`; a workdir whose path holds a space gets its results folder as
    an absolute path, so every rule's shell line carries paths with that space (and quote)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if " " in str(workdir):
        args = ("--config", f"results={workdir / 'results'}", *args)
    done = subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(configfile), "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def planned_jobs(output: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table of a dry run."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    # a space and a quote in every path the rules pass: they must reach `redi` as one argument
    workdir = tmp_path_factory.mktemp("work flow") / "it's here"
    workdir.mkdir()
    snakemake(workdir, REPO / "config" / "ci.yaml")
    return workdir


def test_ci_workflow_writes_training_inputs(workflow_run):
    results = workflow_run / "results" / "ci-demo"
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    n = 10 * config["demo_data"]["per_class"]
    (latents,) = results.glob("latents/*/latents.h5")
    with h5py.File(latents) as f:
        assert f["mean"].shape == (n, 4, 8, 8) and f["std"].shape == (n, 4, 8, 8)
        assert f["mean_flip"].shape == (n, 4, 8, 8)
        assert sorted(set(f["labels"][:].tolist())) == list(range(10))
        assert f.attrs["scaling_factor"] > 0
    (features,) = results.glob("pca_features/*/pca_features.h5")
    rank = config["pca"]["rank_max"]
    with h5py.File(features) as f:
        assert f["z"].shape == (n, rank, 4, 4) and f["z_flip"].shape == (n, rank, 4, 4)
        assert f["component_std"].shape == (rank,)
        assert (f["labels"][:] == h5py.File(latents)["labels"][:]).all()
    for stage in ("images", "shards", "standin-vae", "standin-vit", "latents", "features", "pca",
                  "pca_features"):
        (manifest,) = results.glob(f"{stage}/*/manifest.json")
        assert json.loads(manifest.read_text())["config_hash"]
    assert not list(workflow_run.rglob("*.partial")), "a stage left a partial file"
    (run,) = results.glob("train/redi/*")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(5, 21, 5))
    assert all(math.isfinite(m["loss"]) and m["loss_z"] > 0 for m in metrics)
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["step"] == 20 and "ema" in final


def test_ci_workflow_samples_from_the_trained_run(workflow_run):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    (samples,) = (workflow_run / "results" / "ci-demo").glob("samples/redi/*")
    with np.load(samples / "samples.npz") as npz:
        assert npz["arr_0"].shape == (config["sample"]["num_samples"], 32, 32, 3)
        assert npz["arr_0"].dtype == np.uint8 and set(npz["arr_1"].tolist()) <= set(range(10))
    assert (samples / "grid.png").exists() and (samples / "representations.png").exists()
    assert len(list((samples / "shards").glob("shard-*.tar"))) == 2  # 16 samples, shard_size 8
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["sampler"] == "sde" and "train" in manifest["inputs"]["checkpoint"]["path"]


def test_ci_workflow_evaluates_the_samples_against_the_real_images(workflow_run):
    results = workflow_run / "results" / "ci-demo"
    (metrics_file,) = results.glob("samples/redi/*/metrics-*.json")
    metrics = json.loads(metrics_file.read_text())
    assert math.isfinite(metrics["fid"]) and metrics["fid"] > 0 and math.isfinite(metrics["sfid"])
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["inception_score"] is None  # the offline TF-Inception has no classifier
    (reference,) = results.glob("reference/*/reference.npz")
    with np.load(reference) as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma_s"].shape == (2023, 2023)
        assert ref["acts"].shape == (20, 2048)  # evaluate.reference_images of the real digits
    (converted,) = results.glob("inception/*/manifest.json")
    assert json.loads(converted.read_text())["pool3_max_abs_difference"] < 1e-4


def test_touching_one_run_reruns_only_that_run_and_the_report(workflow_run, tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["runs"]["redi"]["train"] = {"rep_weight": 0.5}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    out = snakemake(workflow_run, changed, "-n")
    # the run and its FID-vs-step point (redi-step10) sample and evaluate again
    assert planned_jobs(out) == {"train": 1, "sample": 2, "evaluate": 2, "report": 1, "all": 1}
    assert "train/redi/" in out and "train/baseline/" not in out
    config["runs"]["redi"]["train"] = {}
    config["runs"]["redi"]["sample"] = {"cfg_scale": 1.5}  # sampling only: no retraining
    changed.write_text(yaml.safe_dump(config))
    assert planned_jobs(snakemake(workflow_run, changed, "-n")) == {"sample": 2, "evaluate": 2, "report": 1,
                                                                    "all": 1}


def test_the_report_tables_hold_every_run(workflow_run):
    results = workflow_run / "results" / "ci-demo"
    (report,) = results.glob("report/*")
    tables = (report / "tables.md").read_text()
    assert "| SiT baseline |" in tables and "| SiT + ReDi-MR |" in tables
    assert "@ 10" not in tables  # FID-vs-step points are plotted, not tabled
    runs = pd.read_csv(report / "runs.csv")
    assert list(runs["name"]) == ["baseline", "redi", "redi-concat", "redi-concat-rg", "redi-step10"]
    assert list(runs["steps"]) == [20, 20, 20, 20, 10]
    assert list(runs["curve"]) == ["baseline", "redi", "redi-concat", "redi-concat-rg", "redi"]
    assert runs["FID"].notna().all()
    assert "\\begin{tabular}" in (report / "tables.tex").read_text()
    for figure in ("grids.png", "fid_vs_step.png", "training.png"):
        assert (report / figure).stat().st_size > 1000


def test_the_html_report_bundles_the_figures_with_captions(workflow_run, tmp_path):
    html = tmp_path / "report.html"
    snakemake(workflow_run, REPO / "config" / "ci.yaml", "--report", str(html))
    text = html.read_text()
    for figure in ("tables.html", "grids.png", "fid_vs_step.png", "training.png"):
        assert figure in text
    for label in ("results tables", "sample grids", "FID vs training step", "training curves"):
        assert label in text  # the report lists results by name, not by versioned path
    assert "FID against training step" in text and "Training losses, one line per training" in text


def test_a_fid_step_samples_the_snapshot_of_that_step(workflow_run):
    results = workflow_run / "results" / "ci-demo"
    (train,) = results.glob("train/redi/*")
    snapshot = torch.load(train / "snapshots" / "step-000000010.pt", weights_only=True)
    checkpoint = torch.load(train / "checkpoints" / "step-000000010.pt", weights_only=True)
    assert snapshot["step"] == 10 and snapshot["config"]["snapshot_steps"] == [10]
    for key, weight in checkpoint["ema"].items():
        assert torch.equal(snapshot["ema"][key], weight), key
    (samples,) = results.glob("samples/redi-step10/*")
    manifest = json.loads((samples / "manifest.json").read_text())
    assert manifest["inputs"]["checkpoint"]["path"].endswith("snapshots/step-000000010.pt")
    assert not list(results.glob("train/redi-step10"))  # the point trains nothing


def test_a_bad_run_names_the_run_and_key(tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["runs"]["redi"]["train"] = {"rank": "eight"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    done = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(bad), "-n"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "run 'redi'" in output and "train.rank: expected an integer" in output


def test_second_run_has_nothing_to_do(workflow_run):
    out = snakemake(workflow_run, REPO / "config" / "ci.yaml", "-n")
    assert "Nothing to be done" in out


def test_rank_change_reruns_only_the_projection_and_training(workflow_run, tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["pca"]["rank_max"] = config["pca"]["rank_max"] + 2  # below train.rank is refused at load
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake(workflow_run, changed, "-n"))
    assert jobs == {"project_features": 1, "train": 3, "sample": 5, "evaluate": 5, "report": 1, "all": 1}


def test_speed_only_keys_rerun_nothing(workflow_run, tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["latents"]["batch_size"] = 7
    config["features"]["workers"] = 1
    config["train"]["log_every"] = 3
    config["train"]["ckpt_every"] = 7
    config["train"]["keep_checkpoints"] = 5
    config["sample"]["batch_size"] = 5
    config["evaluate"]["batch_size"] = 3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert "Nothing to be done" in snakemake(workflow_run, changed, "-n")


@pytest.mark.parametrize("key, reruns, keeps", [
    ("vae_steps", {"train_standin_vae", "encode_latents", "train", "sample", "evaluate", "report"},
     {"shard", "demo_data", "train_standin_vit", "extract_features", "fit_pca", "project_features",
      "reference_stats"}),
    ("vit_steps", {"train_standin_vit", "extract_features", "fit_pca", "project_features", "train", "sample",
                   "evaluate", "report"},
     {"shard", "train_standin_vae", "encode_latents", "reference_stats"}),
], ids=["vae", "vit"])
def test_a_standin_change_reruns_that_standin_and_what_reads_it_only(workflow_run, tmp_path, key, reruns,
                                                                     keeps):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["standins"][key] += 1
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake(workflow_run, changed, "-n"))
    assert reruns <= set(jobs)
    assert not keeps & set(jobs)


def test_bad_config_names_the_key(tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["pca"]["rank_max"] = "eight"
    config["shard"]["colour"] = "red"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    done = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(bad), "-n"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "pca.rank_max: expected an integer, got 'eight'" in done.stdout + done.stderr
    assert "unknown key shard.colour" in done.stdout + done.stderr


def test_a_user_config_replaces_the_demo_config(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"dataset": {"name": "mine", "root": str(tmp_path / "imagenet")}}))
    out = snakemake(tmp_path, user, "-n", "-p")
    # keys the user's file leaves out take the schema defaults, not the demo's values
    assert "--image-size 256" in out and "--num-classes 1000" in out
    assert "--encoder-name sd-vae --encoder-weights stabilityai/sd-vae-ft-ema" in out
    assert "train_standin" not in out and "demo_data" not in out


def test_given_standin_weights_are_used_not_retrained(tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["latents"]["encoder"]["weights"] = "/models/my-vae"
    config["features"]["encoder"]["weights"] = "/models/my-vit"
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump(config))
    out = snakemake(tmp_path, user, "-n", "-p")
    assert "--encoder-weights /models/my-vae" in out and "--encoder-weights /models/my-vit" in out
    assert "train_standin" not in out


def test_an_official_checkpoint_is_sampled_without_training(tmp_path):
    checkpoint = tmp_path / "DiT-XL-2-256x256.pt"
    reference = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    for path in (checkpoint, reference):
        path.write_bytes(b"")  # a dry run only needs the files to exist
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"dataset": {"name": "imagenet", "root": str(tmp_path)},
                                    "sample": {"checkpoint": str(checkpoint), "architecture": "DiT-XL/2"},
                                    "evaluate": {"reference": str(reference)}}))
    out = snakemake(tmp_path, user, "-n", "-p")
    assert planned_jobs(out) == {"sample": 1, "reference_stats": 1, "evaluate": 1, "report": 1, "all": 1}
    assert f"sample --checkpoint {checkpoint}" in out and "--architecture DiT-XL/2" in out
    assert f"reference-stats --source {reference}" in out  # ADM's statistics, plus P/R activations


def test_the_workflow_is_lint_and_format_clean(tmp_path):
    config = str(REPO / "config" / "ci.yaml")
    command = [*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", config, "--lint"]
    lint = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0 and "Congratulations" in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    files = [str(REPO / "Snakefile"), *map(str, sorted((REPO / "workflow" / "rules").glob("*.smk")))]
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True,
                         text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_threads_per_job_caps_the_heavy_jobs(tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["launch"] = {"threads_per_job": 1}
    changed = tmp_path / "capped.yaml"
    changed.write_text(yaml.safe_dump(config))
    plain = snakemake(tmp_path, REPO / "config" / "ci.yaml", "-n")
    capped = snakemake(tmp_path, changed, "-n")
    # --cores 2: one heavy job at a time, or two at once (shard keeps its shard.workers processes)
    # 17 heavy jobs at the 2 local cores unless launch.threads_per_job caps them: shard, the two
    # stand-ins and reference-stats (4), trainings (3), samplings (5) and evaluations (5)
    assert plain.count("threads: 2") == 17 and capped.count("threads: 2") == 1
