"""The SLURM path on a real scheduler: the CI workflow through workflow/profiles/slurm on a one-node
cluster on localhost (tests/slurm/start_cluster.sh), compared with a local run.

Needs root (apt-get install of Debian's slurm + munge, daemons). Deselect with -m "not slurm" on a
machine where that is impossible; CI runs it.
"""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/redi-slurm"))
pytestmark = pytest.mark.slurm
# The workflow profile sizes shard and fit-pca for a cluster node; the test node has 2 CPUs. Command-line
# settings win over both profiles, so these replace only what the node cannot grant. The neural stages'
# requests come from the config's `resources:` (ci.yaml keeps the defaults: no GPU, 1 CPU, 3000 MB).
CPU_SIZED = [
    "--set-threads", "shard=1",
    "--set-resources", "shard:cpus_per_task=1", "shard:mem_mb=1500", "fit_pca:mem_mb=1500",
]


@pytest.fixture(scope="module")
def slurm_conf():
    env = {**os.environ, "SLURM_TEST_DIR": str(CLUSTER)}
    started = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "start_cluster.sh")], env=env,
                             capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        pytest.fail(f"the SLURM test cluster did not start (exit {started.returncode}):\n"
                    f"{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    yield CLUSTER / "slurm.conf"
    subprocess.run(["bash", str(REPO / "tests" / "slurm" / "stop_cluster.sh")], env=env, timeout=60)


def run_workflow(workdir: Path, *args: str, env: dict) -> str:
    # SIGINT, not SIGTERM, on timeout: Snakemake treats SIGTERM as "let running jobs finish"
    command = ["timeout", "-s", "INT", "-k", "60", "1500", sys.executable, "-m", "snakemake",
               "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(REPO / "config" / "ci.yaml"), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def test_ci_workflow_runs_through_slurm_and_matches_a_local_run(tmp_path, slurm_conf, capsys):
    env = {**os.environ, "SLURM_CONF": str(slurm_conf), "HF_HUB_OFFLINE": "1"}
    before = set(_job_ids(env))
    profiles = ["--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
                "--profile", str(REPO / "tests" / "slurm" / "profile"), *CPU_SIZED]
    out = run_workflow(tmp_path / "slurm", *profiles, "--verbose", env=env)  # --verbose: the sbatch calls
    calls = {rule: re.findall(rf"sbatch call: (sbatch .*?--comment '?rule_{rule}(?:_wildcards|'| ).*)", out)
             for rule in ("train", "evaluate")}
    submitted = set(re.findall(r"SLURM jobid (\d+)", out))
    seen = set(_job_ids(env)) - before
    planned = int(re.search(r"Job stats:.*?\ntotal\s+(\d+)", out, re.S).group(1))
    with capsys.disabled():  # shown in the CI log even when the test passes
        print(f"\nSLURM: {len(submitted)} sbatch jobs submitted by snakemake, {len(seen)} new in squeue "
              f"--states=all, {planned} jobs planned (`all` runs locally)")
        for rule, found in calls.items():
            print(f"sbatch flags of the first {rule} job: {found[0] if found else '(none found)'}")
    for rule, found in calls.items():  # the config's resources reached sbatch
        assert found and "--mem 3000" in found[0] and "--cpus-per-task=1" in found[0], (rule, found)
        assert "-t 120" in found[0] and "--gpus" not in found[0], (rule, found)
    assert len(submitted) == planned - 1 and submitted <= seen

    run_workflow(tmp_path / "local", "--cores", "2", env=env)
    slurm, local = tmp_path / "slurm" / "results", tmp_path / "local" / "results"
    files = sorted(p.relative_to(slurm) for p in slurm.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())  # same versions
    for relative in files:  # the deterministic stages wrote the same images (tar headers hold mtimes)
        if relative.suffix == ".tar" and relative.parts[1] == "shards":
            assert _members(slurm / relative) == _members(local / relative), relative
    (latents,) = [p for p in files if p.name == "latents.h5"]
    with h5py.File(slurm / latents) as a, h5py.File(local / latents) as b:
        # a 1-CPU job and the 2-thread local run round differently (float16 storage: 1 ulp ~ 2e-3)
        np.testing.assert_allclose(a["mean"][:], b["mean"][:], atol=5e-3)
    reports = [p for p in files if p.name == "tables.md"]
    assert len(reports) == 1 and "SiT + ReDi-MR" in (slurm / reports[0]).read_text()


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _job_ids(env: dict) -> list[str]:
    command = ["squeue", "--states=all", "-h", "-o", "%i"]
    return subprocess.run(command, capture_output=True, text=True, env=env).stdout.split()
