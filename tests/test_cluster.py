"""Cluster requests of the workflow: the multi-node train launcher and the paper config's resources."""

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dry_run(workdir: Path, configfile: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(workdir), "--configfile", str(REPO / configfile), "-n", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def first_job(out: str, rule: str) -> str:
    return re.search(rf"\nrule {rule}:\n(.*?)\n\n", out, re.S).group(1)


def test_multi_node_training_launches_srun_and_torchrun_with_c10d(tmp_path):
    """launch.nodes 2: the train job asks SLURM for 2 nodes x 1 task with gres gpu:<gpus> per node, and
    its shell line (run here with stand-in srun/scontrol that start each "node" on localhost) brings up
    a 2-node torchrun whose ranks reach redi.cli with the rule's arguments."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = f"launch={{nodes: 2, nproc_per_node: 1, rdzv_port: {port}}}"
    out = dry_run(tmp_path, "config/ci.yaml", "--config", launch, "resources={train: {gpus: 1}}")
    job = first_job(out, "train")
    assert re.search(r"nodes=2, tasks=2, tasks_per_gpu=0, mpi=srun, gres=gpu:1", job), job
    shell = re.search(r"Shell command: (.*)", out.split("\nrule train:\n")[1]).group(1)
    launcher = shell.split(" train --latents")[0]
    assert launcher.startswith("REDI_GPUS=1 REDI_STOP_MARGIN_S=600 srun --nodes 2 --ntasks-per-node 1")

    fake = tmp_path / "bin"
    fake.mkdir()
    scripts = {  # srun: the command once per node, in parallel; scontrol: the node list's first host
        "srun": "#!/bin/bash\nn=1\nwhile [[ $1 == --* ]]; do\n"
                'case $1 in --nodes) n=$2; shift 2;; --*=*) shift;; *) shift 2;; esac\ndone\n'
                'for i in $(seq $n); do SLURM_JOB_NODELIST=127.0.0.1 "$@" & done\nrc=0\n'
                'for j in $(jobs -p); do wait $j || rc=1; done\nexit $rc\n',
        "scontrol": "#!/bin/bash\necho 127.0.0.1\n",
    }
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    probe = "import os, sys; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], sys.argv[1:])"
    (tmp_path / "probe.py").write_text(probe)
    command = launcher.replace("-m redi.cli", f"{tmp_path / 'probe.py'}") + " train --out somewhere"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank"))
    assert lines == [f"rank {r} of 2 ['train', '--out', 'somewhere']" for r in (0, 1)]


def test_the_paper_config_asks_for_gpus_and_retries_training(tmp_path):
    """`snakemake -n` of config/imagenet256.yaml through the SLURM profile: GPUs on every neural stage,
    evaluate and reference-stats included, and retries on training."""
    for name in ("pretrained/SiT-ReDi-XL-2.pt", "VIRTUAL_imagenet256_labeled.npz"):  # downloads, to plan
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    out = dry_run(tmp_path, "config/imagenet256.yaml", "--workflow-profile",
                  str(REPO / "workflow" / "profiles" / "slurm"))
    for rule, gpus in [("evaluate", 1), ("reference_stats", 1), ("sample", 8), ("train", 8),
                       ("encode_latents", 1)]:
        assert re.search(rf"cpus_per_task=\d+, gpu={gpus}\b", first_job(out, rule)), rule
    assert "retries=3" in first_job(out, "train") and "runtime=2880" in first_job(out, "train")


def test_gpu_hours_follow_the_flop_formulas():
    """Training 3 x forward x batch x steps once per training; sampling NFE x forward x samples x branches."""
    from redi.config import validate_config
    from redi.estimate import gpu_hours, grid_costs
    from redi.models import build_run, forward_macs
    from redi.runs import expand_runs

    config = validate_config({"dataset": {"name": "x"}, "train": {"model": {"size": "B"}, "steps": 1000},
                              "sample": {"num_samples": 100, "steps": 50},
                              "runs": {"a": {}, "a-rg": {"train_run": "a", "sample": {"rg_scale": 1.5}}}})
    runs = expand_runs(config)
    model, _ = build_run(runs["a"]["train"], 1000, 32, 8)
    forward = 2.0 * forward_macs(model)["total"]
    a, rg = grid_costs(runs, 1000, 32)
    assert a.train_flops == 3 * forward * 256 * 1000 and rg.train_flops == 0  # batch default 256
    assert a.sample_flops == 50 * forward * 100 and rg.sample_flops == 2 * a.sample_flops  # SDE: 50 NFE
    assert gpu_hours(989e12 * 0.4 * 3600, 989.0, 0.4) == 1.0
