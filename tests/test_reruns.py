"""What reruns after a change, on a copy of the repository (edits never touch the checkout):
a semantic code edit retrains from step 0 into a new folder, a comment plans no job, a new key at
its old behaviour plans no job while a changed default does, and the default profile is in effect
with the README's bare `snakemake`."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) copied to dest."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def snakemake(repo: Path, *args: str, cwd: Path | None = None, check: bool = True) -> str:
    """`snakemake` of the copy, its `redi` imported from the copy."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    command = [sys.executable, "-m", "snakemake", *args]
    done = subprocess.run(command, cwd=cwd or repo, capture_output=True, text=True, env=env, timeout=900)
    out = done.stdout + done.stderr
    assert (done.returncode == 0) == check, out[-4000:]
    return out


def planned_jobs(output: str) -> dict[str, int]:
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


class Edit:
    """Replace text in a file of the copy; undo() puts the original back."""

    def __init__(self, path: Path, old: str, new: str):
        self.path, self.original = path, path.read_text()
        assert old in self.original, f"{old!r} not in {path}"
        path.write_text(self.original.replace(old, new, 1))

    def undo(self) -> None:
        self.path.write_text(self.original)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A copy of the repository whose CI config (one run) has been built up to `train`."""
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    config = yaml.safe_load((repo / "config" / "ci.yaml").read_text())
    config["runs"] = {"redi": {"label": "SiT + ReDi-MR"}}
    (repo / "one-run.yaml").write_text(yaml.safe_dump(config))
    args = ["--configfile", "one-run.yaml", "--until", "train"]
    snakemake(repo, *args)
    return repo, args


def train_folders(repo: Path) -> list[Path]:
    return sorted((repo / "results" / "ci-demo" / "train" / "redi").iterdir())


def test_comment_docstring_and_formatting_edits_plan_no_job(trained):
    repo, args = trained
    edit = Edit(repo / "redi" / "models" / "blocks.py",
                "def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:\n"
                '    """Per-sample affine modulation of normalised tokens: x * (1 + scale) + shift."""\n',
                "# a comment\n\ndef modulate(x: torch.Tensor, shift: torch.Tensor,\n"
                "             scale: torch.Tensor) -> torch.Tensor:\n    \"\"\"Reworded.\"\"\"\n")
    try:
        assert planned_jobs(snakemake(repo, *args, "-n")) == {}
    finally:
        edit.undo()


def test_a_new_key_at_its_old_behaviour_plans_no_job_and_a_changed_default_retrains(trained):
    repo, args = trained
    schema, baseline = repo / "redi" / "config.schema.yaml", repo / "redi" / "config.baseline.yaml"
    new_key = Edit(schema, "      ema_decay:",
                   "      new_option: {type: number, default: 1.0, description: new.}\n      ema_decay:")
    recorded = Edit(baseline, "train.ema_decay:", "train.new_option: 1.0\ntrain.ema_decay:")
    try:
        assert planned_jobs(snakemake(repo, *args, "-n")) == {}
    finally:
        new_key.undo()
        recorded.undo()
    changed = Edit(schema, "default: 0.9999, description: EMA", "default: 0.999, description: EMA")
    try:
        assert planned_jobs(snakemake(repo, *args, "-n")) == {"train": 1}
    finally:
        changed.undo()


def test_a_semantic_edit_retrains_from_step_zero_into_a_new_folder(trained):
    repo, args = trained
    (old,) = train_folders(repo)
    old_final, old_bytes = torch.load(old / "final.pt", weights_only=True), (old / "final.pt").read_bytes()
    # the adaLN modulation scale doubled: the same initial weights, other gradients
    edit = Edit(repo / "redi" / "models" / "blocks.py",
                "return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)",
                "return x * (1 + 2 * scale.unsqueeze(1)) + shift.unsqueeze(1)")
    try:
        assert planned_jobs(snakemake(repo, *args, "-n")) == {"train": 1}  # nothing upstream reruns
        snakemake(repo, *args)
    finally:
        edit.undo()
    folders = train_folders(repo)
    assert len(folders) == 2 and old in folders  # the old version folder stays
    (new,) = [f for f in folders if f != old]
    steps = [json.loads(line)["step"] for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]  # trained from step 0, not resumed
    new_final = torch.load(new / "final.pt", weights_only=True)
    assert new_final["step"] == 20 and new_final["code_version"] != old_final["code_version"]
    differs = [k for k in old_final["ema"] if not torch.equal(old_final["ema"][k], new_final["ema"][k])]
    assert any("adaLN" in k for k in differs)
    assert (old / "final.pt").read_bytes() == old_bytes  # the old result is untouched


def test_bare_snakemake_uses_the_default_profile(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    bad = {"dataset": {"name": "bad", "root": str(tmp_path / "none")}}
    (repo / "bad.yaml").write_text(yaml.safe_dump(bad))
    # the README's command: no --cores, no profile named
    out = snakemake(repo, "--configfile", "bad.yaml", "--until", "shard", check=False)
    assert "Using workflow specific profile" in out and "profiles/default" in out
    assert f"Provided cores: {os.cpu_count()}" in out  # cores: all
    # show-failed-logs: the stage's one-line error is printed, not only written to logs/
    assert f"redi shard: error: input folder not found: {tmp_path / 'none'}" in out


def test_nested_config_overrides_as_yaml_mappings(tmp_path):
    args = ["-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
            str(REPO / "config" / "ci.yaml"), "-n"]
    out = snakemake(REPO, *args, "--config", "train={steps: 12, lr: 1e-3}", "sample={cfg_scale: 1.5}",
                    cwd=tmp_path)
    trains = re.findall(r"redi train .*", out)
    assert trains and all("--steps 12 " in line and "--lr 0.001 " in line for line in trains)
    assert all("--model-depth 2 " in line for line in trains)  # merged into the file's section
    assert all("--cfg-scale 1.5 " in line for line in re.findall(r"redi sample .*", out))
    # a dotted key is refused by Snakemake itself, as config/README.md says
    refused = snakemake(REPO, *args, "--config", "train.steps=12", cwd=tmp_path, check=False)
    assert "Config entry must start with a valid identifier" in refused
