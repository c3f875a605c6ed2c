"""`redi train`: preemption and bit-exact resume, DDP under torchrun, non-finite losses, the
training data sampler, EMA, metrics and checkpoints — on tiny synthetic latents and PCA maps.

Small torch models on a 2-core machine are much slower with 2 threads when something else is busy:
subprocesses run with OMP_NUM_THREADS=1 and the in-process runs with torch.set_num_threads(1), which
also makes in-process and subprocess runs bit-identical.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from redi import cli
from redi.checkpoints import snapshot_path
from redi.code_version import stage_code_version
from redi.config import validate_config
from redi.data.training_data import TrainingData
from redi.errors import ReDiError
from redi.models import build_run
from redi.sample import load_trained
from redi.train import (
    NonFiniteStep,
    TrainStep,
    new_training,
    parse_time_left,
    slurm_deadline,
    train,
    update_ema,
)

N_SAMPLES, N_CLASSES, PCA_CHANNELS = 32, 4, 8
CKPT_KEYS = {"model", "ema", "opt", "step", "rng", "data", "config"}


# --- synthetic inputs ---------------------------------------------------------------------------

def write_inputs(root: Path, n: int = N_SAMPLES, classes: int = N_CLASSES, seed: int = 0,
                 identifiable: bool = False, flip: bool = True, scaling_factor: float = 1.0,
                 component_std: np.ndarray | None = None) -> tuple[Path, Path]:
    """latents.h5 and pca_features.h5 (each with a manifest.json beside it); returns their paths.

    Default: a class-dependent pattern plus a little noise (learnable). identifiable=True: every
    value names its sample and view: mean = i (view 0) or -(i + 1) (flip view), std = 64 + i or
    -(64 + i), z[:, c] = 100 c + i or -(100 c + i) - 1 — exact in float16.
    """
    rng = np.random.default_rng(seed)
    (root / "latents").mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(parents=True, exist_ok=True)
    labels = (np.arange(n) % classes).astype(np.int64)
    ones_x, ones_z = np.ones((n, 4, 8, 8)), np.ones((n, PCA_CHANNELS, 4, 4))
    idx = np.arange(n).reshape(n, 1, 1, 1)
    if identifiable:
        channel = np.arange(PCA_CHANNELS).reshape(1, -1, 1, 1)
        mean, mean_flip = idx * ones_x, -(idx + 1) * ones_x
        std, std_flip = (64 + idx) * ones_x, -(64 + idx) * ones_x
        z, z_flip = (100 * channel + idx) * ones_z, -(100 * channel + idx) * ones_z - 1
    else:
        pattern = rng.normal(0, 1.5, (classes, 4, 8, 8))
        z_pattern = rng.normal(0, 1.5, (classes, PCA_CHANNELS, 4, 4))
        mean = pattern[labels] + rng.normal(0, 0.1, ones_x.shape)
        mean_flip = mean[..., ::-1]
        std = std_flip = 0.1 * ones_x
        z = z_pattern[labels] + rng.normal(0, 0.1, ones_z.shape)
        z_flip = z[..., ::-1]
    if component_std is None:
        component_std = np.linspace(1.0, 2.0, PCA_CHANNELS)
    latents, features = root / "latents" / "latents.h5", root / "features" / "pca_features.h5"
    with h5py.File(latents, "w") as f:
        f["mean"], f["std"] = mean.astype(np.float16), std.astype(np.float16)
        if flip:
            f["mean_flip"], f["std_flip"] = mean_flip.astype(np.float16), std_flip.astype(np.float16)
        f["labels"] = labels
        f.attrs["scaling_factor"] = scaling_factor
    with h5py.File(features, "w") as f:
        f["z"] = z.astype(np.float16)
        if flip:
            f["z_flip"] = z_flip.astype(np.float16)
        f["labels"] = labels
        f["component_std"] = np.asarray(component_std, dtype=np.float32)
    (root / "latents" / "manifest.json").write_text(json.dumps({"stage": "encode_latents"}))
    (root / "features" / "manifest.json").write_text(json.dumps({"stage": "project_features"}))
    return latents, features


def sample_of(value: float) -> tuple[int, int]:
    """(sample index, view) of an identifiable latent mean value."""
    value = int(value)
    return (value, 0) if value >= 0 else (-value - 1, 1)


# --- configs, runs and their outputs ------------------------------------------------------------

TINY = {"steps": 200, "batch_size": 8, "rank": 4, "model.size": "S", "model.depth": 2,
        "model.hidden_size": 32, "model.num_heads": 2, "model.fusion": "merged", "ckpt_every": 10,
        "log_every": 1, "keep_checkpoints": 3, "lr": 1e-3, "seed": 0}


def train_cfg(**overrides) -> dict:
    """The validated `train` section of TINY + overrides (dotted keys for model.*)."""
    section: dict = {}
    for key, value in {**TINY, **overrides}.items():
        node = section
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate_config({"dataset": {"name": "test"}, "train": section})["train"]


def train_argv(latents: Path, features: Path, out: Path, **overrides) -> list[str]:
    """`redi train ...` arguments (after the program) for TINY + overrides."""
    argv = ["train", "--latents", str(latents), "--features", str(features), "--out", str(out),
            "--device", "cpu"]
    for key, value in {**TINY, **overrides}.items():
        argv += ["--" + key.replace(".", "-").replace("_", "-"), str(value)]
    return argv


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start_redi(argv: list[str], log: Path) -> subprocess.Popen:
    """`python -m redi.cli <argv>` in the background; stderr (tqdm, errors) goes to `log`."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "redi.cli", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, env=subprocess_env())


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of a metrics.jsonl."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in records]


def wait_for_step(proc: subprocess.Popen, metrics: Path, min_step: int, log: Path,
                  timeout: float = 90) -> int:
    """Poll metrics.jsonl until it shows a step >= min_step; the last step logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_metrics(metrics)
        if records and records[-1]["step"] >= min_step:
            return records[-1]["step"]
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before step {min_step}:\n{log.read_text()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no step {min_step} in {metrics} after {timeout} s")


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.pt"))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def run_cli_in_process(argv: list[str]) -> int:
    """`redi <argv>` in this process (its exit status)."""
    return cli.main(argv)


@pytest.fixture
def started():
    """Background runs of a test (list.append them); any still running at teardown is killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def one_thread_and_restored_signals():
    """One intra-op thread; the SIGTERM/SIGUSR1 handlers and torch RNG as they were before."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """The learnable tiny data set (32 samples, 4 classes, flipped views)."""
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """An uninterrupted TINY run (200 steps) of the CLI, in process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    torch.set_num_threads(1)
    try:
        assert run_cli_in_process(train_argv(*inputs, out)) == 0
    finally:
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return out


def assert_matches_reference(out: Path, reference: Path) -> None:
    """Same final model and EMA weights, same metric lines (steps, losses, lr; not timings)."""
    final, expected = load(out / "final.pt"), load(reference / "final.pt")
    assert final["step"] == expected["step"] == TINY["steps"]
    assert_same_state(final["model"], expected["model"])
    assert_same_state(final["ema"], expected["ema"])
    got = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, TINY["steps"] + 1))
    assert without_timing(got) == without_timing(read_metrics(reference / "metrics.jsonl"))


# --- 1. preemption: SIGTERM / SIGUSR1 -> checkpoint, exit, bit-exact resume --------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_and_resume_is_bit_exact(sig, inputs, reference, tmp_path, started):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    argv = train_argv(*inputs, out)
    proc = start_redi(argv, log)
    started.append(proc)
    seen = wait_for_step(proc, out / "metrics.jsonl", 12, log)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    err = log.read_text()
    assert rc == 2, err
    found = re.search(r"stopped by a signal after step (\d+); checkpoint saved", err)
    assert found, err
    k = int(found.group(1))
    assert seen <= k < TINY["steps"]
    assert checkpoint_steps(out)[-1] == k
    assert load(out / "checkpoints" / f"step-{k:09d}.pt")["step"] == k
    assert not (out / "final.pt").exists() and not (out / "manifest.json").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, k + 1))

    if sig == signal.SIGTERM:  # the same command again, as a process
        rerun = subprocess.run([sys.executable, "-m", "redi.cli", *argv], capture_output=True, text=True,
                               env=subprocess_env(), timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    else:  # the same command again, in process
        assert run_cli_in_process(argv) == 0
    assert_matches_reference(out, reference)
    assert json.loads((out / "manifest.json").read_text())["steps"] == TINY["steps"]


# --- 2. hard kill: resume from the last periodic checkpoint -------------------------------------

def test_resume_after_sigkill_from_periodic_checkpoint(inputs, reference, tmp_path, monkeypatch, started):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    argv = train_argv(*inputs, out, ckpt_every=50)  # ckpt_every changes nothing but the checkpoints
    proc = start_redi(argv, log)
    started.append(proc)
    wait_for_step(proc, out / "metrics.jsonl", 60, log)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "final.pt").exists()
    last = checkpoint_steps(out)[-1]
    assert last % 50 == 0 and last >= 50
    before = (out / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["step"] for line in before]
    assert logged == list(range(1, len(logged) + 1)) and logged[-1] >= last

    updates = []
    original = update_ema
    monkeypatch.setattr("redi.train.update_ema", lambda *a: updates.append(1) or original(*a))
    assert run_cli_in_process(argv) == 0
    assert len(updates) == TINY["steps"] - last  # continued from the checkpoint, not from scratch
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[:last] == before[:last]  # kept verbatim (their timings too): not redone
    assert_matches_reference(out, reference)  # each step once, same values and weights


# --- 3. torchrun: 2 processes, gloo on CPU ------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """150 steps of `torchrun --nproc-per-node 2` on 16 samples, global batch 16 (8 per rank)."""
    root = tmp_path_factory.mktemp("ddp")
    latents, features = write_inputs(root, n=16)
    out = root / "run"
    argv = train_argv(latents, features, out, steps=150, batch_size=16, ckpt_every=50, class_dropout=0.0)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "redi.cli", *argv],
        capture_output=True, text=True, env=subprocess_env(), timeout=150,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return latents, features, out


def test_torchrun_two_processes(ddp_run):
    _, _, out = ddp_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["steps"] == 150
    sums = manifest["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold identical weights
    state = load(out / "checkpoints" / "step-000000150.pt")
    assert len(state["rng"]) == len(state["data"]) == 2
    assert sorted(state["data"][0]["order"].tolist()) == list(range(8))  # 8 samples per rank
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses) == 150 and all(map(math.isfinite, losses))
    # seeds 0-3 give ~6.55 -> ~4.8 (ratio 0.73-0.74); a 5-step mean varies by ~0.2 (ratio ~0.03)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.9 * first, (first, last)


def test_resume_with_another_process_count_is_refused(ddp_run, tmp_path):
    latents, features, out = ddp_run
    shutil.copytree(out / "checkpoints", tmp_path / "run" / "checkpoints")
    cfg = train_cfg(steps=170, batch_size=16, ckpt_every=50, class_dropout=0.0)
    with pytest.raises(ReDiError, match=r"written by 2 processes.*this run has 1"):
        train(cfg, latents, features, tmp_path / "run", "cpu", quiet=True)
    assert not (tmp_path / "run" / "final.pt").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_node_run(argv: list[str], log: Path) -> None:
    """`redi train` as two torchrun "nodes" on localhost (--nnodes 2, c10d rendezvous), one process each:
    what the train rule's srun runs on a two-node SLURM job."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "-m", "redi.cli", *argv]
    with open(log, "w") as out:
        nodes = [subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env())
                 for _ in range(2)]
        try:
            codes = [node.wait(timeout=150) for node in nodes]
        finally:
            for node in nodes:
                if node.poll() is None:
                    node.kill()
    assert codes == [0, 0], log.read_text()[-5000:]


def test_two_nodes_train_and_resume_as_one_node_with_two_processes(tmp_path):
    """Two "nodes" x 1 process give bit for bit what one node x 2 processes gives (same world size: the
    same per-rank data blocks, data orders and noise streams; a two-term all-reduce sum is exact), and a
    two-node run resumed from its checkpoint continues bit-exactly. The result depends on the world
    size, not on the node layout (a different world size draws other batches: see TrainingData)."""
    latents, features = write_inputs(tmp_path, n=16)
    args = dict(batch_size=16, ckpt_every=10, class_dropout=0.0)
    one_node = tmp_path / "one-node"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", "-m", "redi.cli", *train_argv(latents, features, one_node, steps=20, **args)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=150)
    assert done.returncode == 0, done.stderr[-5000:]
    two_nodes = tmp_path / "two-nodes"
    two_node_run(train_argv(latents, features, two_nodes, steps=10, **args), tmp_path / "first.log")
    assert checkpoint_steps(two_nodes) == [10] and len(load(two_nodes / "final.pt")["ema"]) > 0
    two_node_run(train_argv(latents, features, two_nodes, steps=20, **args), tmp_path / "resumed.log")
    final, expected = load(two_nodes / "final.pt"), load(one_node / "final.pt")
    assert final["step"] == expected["step"] == 20
    assert_same_state(final["model"], expected["model"])
    assert_same_state(final["ema"], expected["ema"])
    got, want = read_metrics(two_nodes / "metrics.jsonl"), read_metrics(one_node / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 21))
    assert without_timing(got) == without_timing(want)
    assert json.loads((two_nodes / "manifest.json").read_text())["world_size"] == 2


def test_the_slurm_time_limit_is_read_from_squeue_format():
    assert parse_time_left("1-02:03:04") == 86400 + 2 * 3600 + 3 * 60 + 4
    assert parse_time_left("45:30") == 45 * 60 + 30
    assert parse_time_left("7") == 7
    for unlimited in ("UNLIMITED", "NOT_SET", "INVALID", ""):
        assert parse_time_left(unlimited) is None
    assert slurm_deadline({}) is None  # not in a job
    assert slurm_deadline({"SLURM_JOB_END_TIME": "1800000000"}) == 1800000000.0


def test_training_stops_with_a_checkpoint_before_the_job_time_limit(inputs, tmp_path, monkeypatch):
    """Inside a SLURM job whose limit is nearer than launch.stop_margin_s, the run checkpoints after the
    current step and stops (the resubmission resumes), naming the time limit."""
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 60))
    monkeypatch.setenv("REDI_STOP_MARGIN_S", "600")
    with pytest.raises(ReDiError, match=r"stopped by the job's time limit after step 1; checkpoint saved"):
        train(train_cfg(), *inputs, tmp_path / "run", "cpu", quiet=True)
    assert checkpoint_steps(tmp_path / "run") == [1]
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    train(train_cfg(steps=3), *inputs, tmp_path / "run", "cpu", quiet=True)  # the resubmission resumes
    assert load(tmp_path / "run" / "final.pt")["step"] == 3


def test_tensorboard_event_files_hold_the_logged_metrics(inputs, tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="tensorboard is not installed (pip install -e '.[test]')")
    out = tmp_path / "run"
    train(train_cfg(steps=6, log_every=2, tensorboard=True), *inputs, out, "cpu", quiet=True)
    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = read_metrics(out / "metrics.jsonl")
    for key in ("loss", "loss_x", "loss_z", "grad_norm", "img_per_s", "lr"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [r["step"] for r in logged] == [2, 4, 6]
        np.testing.assert_allclose([s.value for s in scalars], [r[key] for r in logged], rtol=1e-6)
    plain = tmp_path / "plain"
    train(train_cfg(steps=2), *inputs, plain, "cpu", quiet=True)
    assert not (plain / "tensorboard").exists()  # off by default


# --- 4. non-finite loss --------------------------------------------------------------------------

def test_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    latents, features = write_inputs(tmp_path, identifiable=True, scaling_factor=0.1)
    cfg = train_cfg(steps=8, ckpt_every=1, keep_checkpoints=100)
    # the samples of the 4th batch (the trainer's sampler: same seed, rank 0 of 1)
    data = TrainingData(latents, features, cfg["rank"], cfg["normalize_z"], cfg["flip"], cfg["seed"])
    for _ in range(3):
        data.next_batch(cfg["batch_size"])
    bad = sample_of(data.next_batch(cfg["batch_size"])["mean"][0, 0, 0, 0])[0]
    with h5py.File(latents, "r+") as f:
        for name in ("mean", "mean_flip"):
            values = f[name][:]
            values[bad, 0, 0, 0] = np.nan
            f[name][...] = values

    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    with pytest.raises(ReDiError, match=r"non-finite.*at step 4\b.*step-000000003\.pt") as info:
        train(cfg, latents, features, tmp_path / "run", "cpu", quiet=True)
    assert "step 4" in str(info.value)
    assert "batch samples [" in str(info.value) and str(bad) in str(info.value)  # the batch is named
    assert len(steps) == 3  # no optimizer step for the bad batch
    out = tmp_path / "run"
    assert checkpoint_steps(out) == [1, 2, 3]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert not (out / "final.pt").exists()
    state = load(out / "checkpoints" / "step-000000003.pt")
    assert state["step"] == 3
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[key].values())
    model, _ = build_run(cfg, N_CLASSES, 8, cfg["rank"])
    model.load_state_dict(state["model"])  # the last good checkpoint still loads into the model


# --- 5. TrainingData -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ident(tmp_path_factory) -> tuple[Path, Path]:
    """Identifiable data (see write_inputs), 32 samples; component_std powers of two."""
    return write_inputs(tmp_path_factory.mktemp("ident"), identifiable=True,
                        component_std=2.0 ** np.arange(PCA_CHANNELS))


def draw(data: TrainingData, batch: int, batches: int) -> list[dict]:
    return [data.next_batch(batch) for _ in range(batches)]


def indices(batch: dict) -> list[int]:
    return [sample_of(v)[0] for v in batch["mean"][:, 0, 0, 0]]


@pytest.mark.parametrize("n, world", [(32, 2), (11, 2), (11, 3)])
def test_rank_blocks_are_contiguous_and_partition_the_data(n, world, tmp_path):
    latents, features = write_inputs(tmp_path, n=n, identifiable=True)
    blocks = []
    for rank in range(world):
        data = TrainingData(latents, features, 4, flip=False, process_rank=rank, world_size=world)
        (batch,) = draw(data, data.size, 1)  # the whole block, shuffled
        block = sorted(indices(batch))
        assert block == list(range(block[0], block[0] + len(block)))  # contiguous
        assert batch["y"].tolist() == [i % N_CLASSES for i in indices(batch)]
        assert data.num_classes == N_CLASSES
        blocks.append(block)
    assert sum(blocks, []) == list(range(n))  # in rank order, each sample once
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("batch", [8, 7])
def test_batches_do_not_repeat_within_an_epoch(batch, ident):
    data = TrainingData(*ident, 4, flip=True, seed=3)
    per_epoch = N_SAMPLES // batch
    orders = []
    for _ in range(3):
        seen = sum((indices(b) for b in draw(data, batch, per_epoch)), [])
        assert len(set(seen)) == len(seen) == per_epoch * batch
        orders.append(seen)
    if batch == 8:
        assert all(sorted(order) == list(range(N_SAMPLES)) for order in orders)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch


def test_sampler_state_roundtrip(ident, tmp_path):
    data = TrainingData(*ident, 4, flip=True, seed=1)
    draw(data, 8, 5)  # into the second epoch
    state = copy.deepcopy(data.state_dict())
    expected = draw(data, 8, 7)  # crosses the next reshuffle
    path = tmp_path / "sampler.pt"  # the state goes into checkpoints: torch.save, load(weights_only)
    torch.save(state, path)
    restored = TrainingData(*ident, 4, flip=True, seed=1)
    fresh = draw(TrainingData(*ident, 4, flip=True, seed=1), 8, 7)
    restored.load_state_dict(torch.load(path, weights_only=True))
    got = draw(restored, 8, 7)
    for a, b in zip(got, expected, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a["mean"], b["mean"]) for a, b in zip(fresh, expected, strict=True))


def test_rank_above_pca_channels_is_refused(ident):
    with pytest.raises(ReDiError, match=r"pca\.rank_max"):
        TrainingData(*ident, PCA_CHANNELS + 1)
    assert TrainingData(*ident, PCA_CHANNELS).next_batch(2)["z"].shape[1] == PCA_CHANNELS


@pytest.mark.parametrize("normalize", [False, True])
def test_z_channels_and_normalisation(normalize, ident):
    rank = 5
    data = TrainingData(*ident, rank, normalize_z=normalize, flip=True, seed=2)
    batch = data.next_batch(16)
    assert batch["z"].shape == (16, rank, 4, 4) and batch["z"].dtype == torch.float32
    scale = 2.0 ** np.arange(rank) if normalize else np.ones(rank)
    for b, value in enumerate(batch["mean"][:, 0, 0, 0]):
        i, view = sample_of(value)
        raw = np.array([100 * c + i if view == 0 else -(100 * c + i) - 1 for c in range(rank)])
        expected = torch.tensor(raw / scale, dtype=torch.float32)
        assert torch.equal(batch["z"][b, :, 0, 0], expected)


def test_flip_draws_both_views_consistently(ident):
    data = TrainingData(*ident, 4, flip=True, seed=0)
    views = []
    for batch in draw(data, 16, 60):
        for b, value in enumerate(batch["mean"][:, 0, 0, 0]):
            i, view = sample_of(value)
            views.append(view)
            # mean, std, z and label of one sample and one view
            assert batch["std"][b, 0, 0, 0] == (64 + i if view == 0 else -(64 + i))
            assert batch["z"][b, 0, 0, 0] == (i if view == 0 else -i - 1)
            assert batch["y"][b] == i % N_CLASSES
    assert 0.45 < np.mean(views) < 0.55  # 960 draws: sd ~0.016
    unflipped = TrainingData(*ident, 4, flip=False, seed=0)
    assert all(sample_of(v)[1] == 0 for b in draw(unflipped, 16, 10) for v in b["mean"][:, 0, 0, 0])


def test_flip_needs_flipped_views(tmp_path):
    latents, features = write_inputs(tmp_path, identifiable=True, flip=False)
    with pytest.raises(ReDiError, match="flip"):
        TrainingData(latents, features, 4, flip=True)
    assert TrainingData(latents, features, 4, flip=False).num_views == 1


def test_mismatched_labels_or_counts_are_refused(tmp_path):
    latents, features = write_inputs(tmp_path / "a", identifiable=True)
    with h5py.File(features, "r+") as f:
        labels = f["labels"][:]
        labels[5] = (labels[5] + 1) % N_CLASSES
        f["labels"][...] = labels
    with pytest.raises(ReDiError, match="labels"):
        TrainingData(latents, features, 4)
    small_latents, _ = write_inputs(tmp_path / "b", n=N_SAMPLES - 2, identifiable=True)
    with pytest.raises(ReDiError, match=f"{N_SAMPLES - 2} samples"):
        TrainingData(small_latents, write_inputs(tmp_path / "c", identifiable=True)[1], 4)


# --- 6. EMA ----------------------------------------------------------------------------------------

def test_update_ema_is_the_weighted_mean():
    torch.manual_seed(0)
    model, ema = nn.Linear(5, 3), nn.Linear(5, 3)
    with torch.no_grad():  # multiples of 1/64: the weighted mean is exact in float32
        for p in (*model.parameters(), *ema.parameters()):
            p.copy_(torch.randint(-64, 64, p.shape) / 64)
    for decay in (0.75, 0.5, 0.0, 1.0):
        target = copy.deepcopy(ema)
        update_ema(target, model, decay)
        for got, e, m in zip(target.parameters(), ema.parameters(), model.parameters(), strict=True):
            assert torch.equal(got, decay * e + (1 - decay) * m), decay
    # arbitrary values and a typical decay: equal up to float32 rounding
    with torch.no_grad():
        for p in (*model.parameters(), *ema.parameters()):
            p.copy_(torch.randn(p.shape))
    target = copy.deepcopy(ema)
    update_ema(target, model, 0.999)
    for got, e, m in zip(target.parameters(), ema.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, 0.999 * e + 0.001 * m, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("decay", [0.9, 1.0])
def test_final_ema(decay, inputs, tmp_path):
    cfg = train_cfg(steps=6, ckpt_every=100, ema_decay=decay)
    train(cfg, *inputs, tmp_path / "run", "cpu", quiet=True)
    final = load(tmp_path / "run" / "final.pt")
    torch.manual_seed(cfg["seed"])
    initial = build_run(cfg, N_CLASSES, 8, cfg["rank"])[0].state_dict()
    trained = [k for k in final["model"] if not torch.equal(final["model"][k], initial[k])]
    assert trained  # the model moved
    if decay == 1.0:
        assert_same_state(final["ema"], initial)  # the EMA stays at the initialisation
    else:
        assert any(not torch.equal(final["ema"][k], final["model"][k]) for k in trained)
        assert any(not torch.equal(final["ema"][k], initial[k]) for k in trained)


# --- 7. metrics ------------------------------------------------------------------------------------

def test_metrics_keys_and_warmup(inputs, tmp_path):
    cfg = train_cfg(steps=14, warmup_steps=10, lr=2e-3, ckpt_every=7)
    train(cfg, *inputs, tmp_path / "run", "cpu", quiet=True)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 15))
    for r in records:
        assert {"step", "loss", "loss_x", "loss_z", "grad_norm", "lr", "img_per_s"} <= r.keys()
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_x", "loss_z", "grad_norm", "img_per_s"))
        assert r["img_per_s"] > 0
        assert r["lr"] == 2e-3 * min(1.0, r["step"] / 10)
        assert r["loss"] == pytest.approx(r["loss_x"] + cfg["rep_weight"] * r["loss_z"], rel=1e-5)
    # the optimizer used the logged rate: the step-7 checkpoint holds it
    opt = load(tmp_path / "run" / "checkpoints" / "step-000000007.pt")["opt"]
    assert opt["param_groups"][0]["lr"] == 2e-3 * 7 / 10


def test_log_every_and_grad_clip_logs_the_norm_before_clipping(inputs, tmp_path):
    clipped = tmp_path / "clipped"
    train(train_cfg(steps=5, log_every=2, grad_clip=1e-4, ckpt_every=100), *inputs, clipped, "cpu",
          quiet=True)
    records = read_metrics(clipped / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 5]  # every log_every steps, and the last
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 1e-4 for r in records)
    one_step = tmp_path / "one"
    train(train_cfg(steps=1, grad_clip=1e-4, ckpt_every=100), *inputs, one_step, "cpu", quiet=True)
    train(train_cfg(steps=1, ckpt_every=100), *inputs, tmp_path / "one-free", "cpu", quiet=True)
    # the first step's gradient is the same with and without clipping: the logged norm is pre-clip
    norm = read_metrics(one_step / "metrics.jsonl")[0]["grad_norm"]
    assert norm > 1e-4 and norm == read_metrics(tmp_path / "one-free" / "metrics.jsonl")[0]["grad_norm"]


# --- 8. checkpoints --------------------------------------------------------------------------------

def test_checkpoints_load_safely_and_are_pruned(inputs, tmp_path):
    cfg = train_cfg(steps=10, ckpt_every=2, keep_checkpoints=2)
    out = tmp_path / "run"
    manifest = train(cfg, *inputs, out, "cpu", quiet=True)
    assert checkpoint_steps(out) == [8, 10]
    assert not [p for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")]  # no temp files
    state = load(out / "checkpoints" / "step-000000010.pt")  # weights_only=True: plain data only
    assert CKPT_KEYS <= state.keys()
    assert state["step"] == 10 and state["config"] == cfg
    assert len(state["rng"]) == len(state["data"]) == 1
    final = load(out / "final.pt")
    assert_same_state(final["model"], state["model"])
    assert_same_state(final["ema"], state["ema"])
    assert final["num_classes"] == N_CLASSES and final["scaling_factor"] == 1.0
    assert manifest["steps"] == 10 and manifest["world_size"] == 1 and len(manifest["replica_checksums"]) == 1
    assert set(manifest["inputs"]) == {"latents", "features"}
    # a longer rerun resumes from step 10 (the first 10 lines stay as they were) and keeps pruning
    before = (out / "metrics.jsonl").read_text().splitlines()
    train(train_cfg(steps=14, ckpt_every=2, keep_checkpoints=2), *inputs, out, "cpu", quiet=True)
    assert checkpoint_steps(out) == [12, 14]
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[:10] == before and [json.loads(r)["step"] for r in after] == list(range(1, 15))


def test_snapshots_hold_the_ema_of_their_step_and_survive_pruning(inputs, tmp_path):
    out = tmp_path / "run"
    train(train_cfg(steps=10, ckpt_every=2, keep_checkpoints=1, snapshot_steps=[4, 7]), *inputs, out, "cpu",
          quiet=True)
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-000000004.pt", "step-000000007.pt"]
    snapshot = load(snapshot_path(out, 4))
    assert snapshot["step"] == 4 and snapshot["num_classes"] == N_CLASSES and "opt" not in snapshot
    same = tmp_path / "same"  # an identical run stopped at step 4: its EMA is the snapshot's
    train(train_cfg(steps=4, ckpt_every=2, keep_checkpoints=1), *inputs, same, "cpu", quiet=True)
    assert_same_state(snapshot["ema"], load(same / "final.pt")["ema"])
    assert load_trained(snapshot_path(out, 7)).description == "redi train run, step 7"
    with pytest.raises(ReDiError, match="trained without this step in train.snapshot_steps"):
        load_trained(snapshot_path(out, 5))
    with pytest.raises(ReDiError, match=re.escape("train.snapshot_steps [12] lie beyond train.steps 10")):
        train(train_cfg(steps=10, snapshot_steps=[12]), *inputs, tmp_path / "late", "cpu", quiet=True)


# --- robustness of resuming ------------------------------------------------------------------------

def test_signal_handlers_are_restored_after_a_run(inputs, tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    train(train_cfg(steps=2, ckpt_every=2), *inputs, tmp_path / "run", "cpu", quiet=True)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_resume_with_changed_settings_is_refused_but_more_steps_are_fine(inputs, tmp_path):
    out = tmp_path / "run"
    train(train_cfg(steps=4, ckpt_every=2), *inputs, out, "cpu", quiet=True)
    with pytest.raises(ReDiError, match=r"other settings \(train\.lr: 0\.001 -> 0\.002\)"):
        train(train_cfg(steps=6, ckpt_every=2, lr=2e-3), *inputs, out, "cpu", quiet=True)
    manifest = train(train_cfg(steps=6, ckpt_every=3, log_every=2), *inputs, out, "cpu", quiet=True)
    assert manifest["steps"] == 6


def test_checkpoints_of_other_train_code_are_set_aside_and_training_starts_over(inputs, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "run"
    monkeypatch.setattr("redi.train.stage_code_version", lambda stage: "0123456789ab")
    train(train_cfg(steps=4, ckpt_every=2), *inputs, out, "cpu", quiet=True)
    monkeypatch.undo()
    assert load(out / "checkpoints" / "step-000000004.pt")["code_version"] == "0123456789ab"
    train(train_cfg(steps=6, ckpt_every=2), *inputs, out, "cpu", quiet=True)
    err = capsys.readouterr().err
    assert "not resuming" in err and "train code 0123456789ab" in err and "starting from step 0" in err
    aside = out / "checkpoints" / "code-0123456789ab"
    assert sorted(p.name for p in aside.iterdir()) == ["step-000000002.pt", "step-000000004.pt"]
    # it trained steps 1..6 afresh: the same weights and metrics as a run into an empty folder
    fresh = tmp_path / "fresh"
    train(train_cfg(steps=6, ckpt_every=2), *inputs, fresh, "cpu", quiet=True)
    assert_same_state(load(out / "final.pt")["ema"], load(fresh / "final.pt")["ema"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))
    assert load(out / "final.pt")["code_version"] == stage_code_version("train")


def test_a_checkpoint_from_before_a_key_existed_resumes_if_the_key_keeps_the_old_behaviour(inputs, tmp_path):
    out = tmp_path / "run"
    train(train_cfg(steps=4, ckpt_every=2), *inputs, out, "cpu", quiet=True)
    path = out / "checkpoints" / "step-000000004.pt"
    state = load(path)
    del state["config"]["grad_clip"]  # as if written before train.grad_clip existed (baseline 0.0)
    torch.save(state, path)
    with pytest.raises(ReDiError, match=r"other settings \(train\.grad_clip: 0\.0 -> 1\.0\)"):
        train(train_cfg(steps=6, ckpt_every=2, grad_clip=1.0), *inputs, out, "cpu", quiet=True)
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert train(train_cfg(steps=6, ckpt_every=2), *inputs, out, "cpu", quiet=True)["steps"] == 6
    after = (out / "metrics.jsonl").read_text().splitlines()  # resumed: lines 1-4 (with timings) kept
    assert after[:4] == before and [json.loads(r)["step"] for r in after] == list(range(1, 7))


def test_a_torn_metrics_line_does_not_block_resume(inputs, tmp_path):
    out = tmp_path / "run"
    train(train_cfg(steps=4, ckpt_every=2), *inputs, out, "cpu", quiet=True)
    (out / "checkpoints" / "step-000000004.pt").unlink()  # resume from step 2
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    train(train_cfg(steps=4, ckpt_every=2), *inputs, out, "cpu", quiet=True)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_data_order_and_noise_use_different_streams():
    from redi.data.training_data import stream_seed

    seeds = {stream_seed(0, rank, purpose) for rank in (0, 1) for purpose in ("data", "noise")}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(0, 0, "data") == stream_seed(0, 0, "data")


def test_fused_step_skips_a_bad_update_on_the_device_and_names_its_step_later(tmp_path):
    """The CUDA path (fused AdamW, run here on CPU): no per-step host read; the bad step's update is
    skipped by the optimizer and the EMA themselves, and the deferred check names the exact step."""
    latents, features = write_inputs(tmp_path)
    cfg = train_cfg()
    data = TrainingData(latents, features, cfg["rank"], seed=cfg["seed"])
    model, ema, opt, objective = new_training(cfg, N_CLASSES, 8, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
    step = TrainStep(model, ema, opt, objective, cfg, torch.device("cpu"), data.scaling_factor, check_every=4)
    assert step.on_device_skip

    def weights():
        return [p.detach().clone() for p in model.parameters()], [p.clone() for p in ema.parameters()]

    step(data.next_batch(8), 1)
    before, ema_before = weights()
    bad = data.next_batch(8)
    bad["mean"][0, 0, 0, 0] = float("nan")
    step(bad, 2)  # no error yet: nothing is read back
    after, ema_after = weights()
    assert all(torch.equal(a, b) for a, b in zip(before + ema_before, after + ema_after, strict=True))
    assert {int(s["step"]) for s in opt.state.values()} == {1}  # AdamW's own count did not move either
    step(data.next_batch(8), 3)
    assert not all(torch.equal(a, b) for a, b in zip(after, weights()[0], strict=True))  # good steps update
    with pytest.raises(NonFiniteStep, match=r"non-finite loss \(nan\).* at step 2, batch samples \["):
        step(data.next_batch(8), 4)  # the 4th pending step triggers the read
    assert step.pending == []


def test_the_gradient_norm_is_logged_and_clipping_scales_to_it(tmp_path):
    """grad_norm is the L2 norm of all gradients (numpy reference); grad_clip scales them to the limit."""
    latents, features = write_inputs(tmp_path)
    for clip in (0.0, 1e-3):
        cfg = train_cfg(grad_clip=clip)
        data = TrainingData(latents, features, cfg["rank"], seed=cfg["seed"])
        model, ema, opt, objective = new_training(cfg, N_CLASSES, 8, torch.device("cpu"))
        opt.step = lambda: None  # keep the gradients as the step leaves them
        step = TrainStep(model, ema, opt, objective, cfg, torch.device("cpu"), data.scaling_factor)
        norm = float(step(data.next_batch(8), 1)["grad_norm"])
        grads = np.concatenate([p.grad.numpy().ravel() for p in model.parameters() if p.grad is not None])
        left = float(np.linalg.norm(grads.astype(np.float64)))
        if clip:  # scaled by clip / (norm + 1e-6), as torch.nn.utils.clip_grad_norm_
            assert norm > clip and left == pytest.approx(clip * norm / (norm + 1e-6), rel=1e-4)
        else:
            assert left == pytest.approx(norm, rel=1e-5)
