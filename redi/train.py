"""`redi train`: one DiT/SiT (+ ReDi) run, single-process or under torchrun (DDP).

Three parts: `resume` builds the run (model, EMA, AdamW, data) from scratch or from its newest
checkpoint; `TrainStep` is one optimisation step (the benchmarks time this same object); `train`
is the loop: logs, checkpoints (atomic, every ckpt_every steps and on SIGTERM/SIGUSR1 or before a
SLURM time limit), snapshots and final.pt. A rerun resumes bit-exactly on CPU. A non-finite loss or
gradient stops the run naming the step, and no update from that step is ever saved.
Checkpoint files and their layout: redi/checkpoints.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import (
    FINAL,
    latest_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    save_sampling_weights,
    set_aside_other_code,
    snapshot_path,
)
from .code_version import stage_code_version
from .config import load_baseline
from .data.training_data import TrainingData, stream_seed
from .devices import all_mean, allow_tf32, any_rank, autocast, barrier, setup_distributed, uses_bf16
from .errors import ReDiError
from .io import atomic_path, write_manifest
from .models import build_run
from .progress import progress
from .stages import STAGES

# On CUDA the host reads the non-finite flag every this many steps (the update of a bad step is
# skipped on the device meanwhile); reading it every step would stall the host behind the GPU.
CUDA_CHECK_EVERY = 16


# --- stopping -------------------------------------------------------------------------------

class StopSignal:
    """Remembers SIGTERM / SIGUSR1 so the loop can checkpoint after the current step and exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def slurm_deadline(environ: dict | None = None) -> float | None:
    """Unix time at which this SLURM job hits its time limit, or None (not in a job, no limit).

    Asked from squeue (the job step's environment need not carry SLURM_JOB_END_TIME), so training
    can checkpoint before the limit instead of relying on a signal reaching it through Snakemake.
    """
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    left = parse_time_left(done.stdout.strip()) if done.returncode == 0 else None
    return None if left is None else time.time() + left


def parse_time_left(text: str) -> float | None:
    """Seconds in squeue's %L format ([days-]hours:minutes:seconds, minutes:seconds); None if unlimited."""
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not text or not all(p.isdigit() for p in parts) or len(parts) > 3 or (days and not days.isdigit()):
        return None  # UNLIMITED, NOT_SET, INVALID
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + 86400 * int(days or 0))


# --- state -------------------------------------------------------------------------------------

@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, weight: torch.Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, in float32 (`weight`: 1 - decay as a device tensor,
    0 to leave the EMA as it is without a host sync)."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay if weight is None else weight)


def rng_state(device: torch.device) -> dict:
    """This process's torch RNG states (CPU and, on GPU, CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state returned."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- one step ----------------------------------------------------------------------------------

class NonFiniteStep(ReDiError):
    """A step whose loss or gradient norm is NaN/inf; its update was not applied."""

    def __init__(self, step: int, loss: float, grad_norm: float, index: torch.Tensor, process_rank: int):
        samples = index.tolist()
        shown = f"{samples[:16]}{' ...' if len(samples) > 16 else ''}"
        super().__init__(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}, batch "
                         f"samples {shown} (rank {process_rank}); stopped before the update")
        self.step = step


class TrainStep:
    """One optimisation step: posterior sample of x, joint loss (bf16 autocast per train.precision),
    backward, gradient norm (clipped when train.grad_clip is set), non-finite check, AdamW, EMA.

    On CPU the check reads the flag every step (no cost there) and raises before the update. With a
    fused AdamW (train's choice on CUDA) the flag stays on the device: the optimizer and the EMA skip
    a bad step's update by themselves and `check()` reads the pending flags once every `check_every`
    steps (and before anything is saved), raising with the exact step; nothing else waits for the GPU.
    """

    def __init__(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, objective, cfg: dict,
                 device: torch.device, scaling_factor: float, forward: nn.Module | None = None,
                 world: int = 1, process_rank: int = 0, check_every: int | None = None):
        self.model, self.ema, self.opt, self.objective, self.cfg = model, ema, opt, objective, cfg
        self.forward = forward if forward is not None else model
        self.device, self.scaling_factor = device, scaling_factor
        self.world, self.process_rank = world, process_rank
        self.bf16 = uses_bf16(cfg["precision"], device)
        self.on_device_skip = bool(opt.defaults.get("fused"))  # train uses fused AdamW on CUDA only
        self.check_every = check_every or (CUDA_CHECK_EVERY if self.on_device_skip else 1)
        self.pending: list[tuple] = []  # (step, bad flag, loss, grad norm, batch index) not yet read

    def __call__(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Train on `batch` (TrainingData.next_batch on this device) as step number `step` (1-based);
        returns the losses and the gradient norm as tensors on the device."""
        x = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * self.scaling_factor
        z = batch["z"] if self.cfg["model"]["fusion"] != "none" else None
        with autocast(self.bf16, self.device):
            losses = self.objective.loss(self.forward, x, z, batch["y"] if self.cfg["conditional"] else None)
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if self.cfg["grad_clip"]:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.cfg["grad_clip"], grad_norm)
        bad = ~(torch.isfinite(losses["loss"]) & torch.isfinite(grad_norm))
        decay = self.cfg["ema_decay"]
        if self.on_device_skip:
            bad = bad.float()
            if self.world > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # stays on the GPU: no host sync
            self.opt.found_inf = bad  # fused AdamW leaves weights and moments as they are where set
            self.opt.step()
            update_ema(self.ema, self.model, decay, weight=(1.0 - decay) * (1.0 - bad))
            self.pending.append((step, bad, losses["loss"].detach(), grad_norm, batch["index"]))
            if len(self.pending) >= self.check_every:
                self.check()
        else:
            if any_rank(bool(bad.item()), self.world, self.device):
                raise NonFiniteStep(step, losses["loss"].item(), grad_norm.item(), batch["index"],
                                    self.process_rank)
            self.opt.step()
            update_ema(self.ema, self.model, decay)
        return losses | {"grad_norm": grad_norm}

    def check(self) -> None:
        """Read the flags of the steps not yet checked (one host sync); raise for the first bad one."""
        if not self.pending:
            return
        flags = torch.stack([bad for _, bad, *_ in self.pending]).tolist()
        pending, self.pending = self.pending, []
        for (step, _, loss, grad_norm, index), flag in zip(pending, flags, strict=True):
            if flag:
                raise NonFiniteStep(step, loss.item(), grad_norm.item(), index, self.process_rank)


# --- the run's state ---------------------------------------------------------------------------

@dataclass
class Run:
    """What a training run holds between steps; `step` steps are done."""

    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    objective: object
    data: TrainingData
    step: int
    code: str  # the train stage's code version, recorded in every file it writes


def new_training(cfg: dict, num_classes: int, image_size: int, device: torch.device
                 ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, object]:
    """Model (seeded by train.seed: the same initial weights on every rank), its float32 EMA copy,
    AdamW (fused on CUDA) and the objective of a fresh run."""
    torch.manual_seed(cfg["seed"])
    model, objective = build_run(cfg, num_classes, image_size, cfg["rank"])
    model.to(device)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            fused=device.type == "cuda")
    return model, ema, opt, objective


def resume(cfg: dict, latents: str, features: str, out_dir: Path, process_rank: int, world: int,
           device: torch.device) -> Run:
    """The run from scratch, or from its newest readable checkpoint written by this code and these
    settings (checkpoints of other code are set aside; other result-changing settings are an error)."""
    data = TrainingData(latents, features, cfg["rank"], cfg["normalize_z"], cfg["flip"], cfg["seed"],
                        process_rank, world)
    grid = data.mean.shape[-1] // cfg["model"]["patch"]
    if data.z.shape[-1] != grid:
        raise ReDiError(f"the PCA maps are {data.z.shape[-1]}x{data.z.shape[-1]} but the model's token grid "
                        f"is {grid}x{grid}: set features.grid = latent side / train.model.patch")
    model, ema, opt, objective = new_training(cfg, data.num_classes, data.mean.shape[-1], device)
    run = Run(model, ema, opt, objective, data, 0, stage_code_version("train"))
    path, state = resume_checkpoint(out_dir, set_aside=process_rank == 0)
    if state is not None and state.get("code_version") != run.code:
        if process_rank == 0:
            set_aside_other_code(out_dir, state.get("code_version"), run.code)
        barrier(world)
        state = None
    if state is None:
        torch.manual_seed(stream_seed(cfg["seed"], process_rank, "noise"))  # independent noise per rank
        return run
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    changed = _changed_keys(state["config"], cfg)
    if changed:
        raise ReDiError(f"{path} was trained with other settings ({', '.join(changed)}); use a new "
                        f"output folder, or put the settings back (only steps and speed keys may change)")
    if len(state["rng"]) != world:
        raise ReDiError(f"{path} was written by {len(state['rng'])} processes; resume it with as many "
                        f"(this run has {world})")
    data.load_state_dict(state["data"][process_rank])
    set_rng_state(state["rng"][process_rank], device)
    run.step = int(state["step"])
    return run


def checkpoint_state(run: Run, cfg: dict, world: int, device: torch.device) -> dict:
    """The resumable state of every process (each rank joins the gathers)."""
    if world > 1:
        rngs, data = [None] * world, [None] * world
        dist.all_gather_object(rngs, rng_state(device))
        dist.all_gather_object(data, run.data.state_dict())
    else:
        rngs, data = [rng_state(device)], [run.data.state_dict()]
    return {"model": run.model.state_dict(), "ema": run.ema.state_dict(), "opt": run.opt.state_dict(),
            "step": run.step, "rng": rngs, "data": data, "config": cfg, "code_version": run.code}


def sampling_state(run: Run, cfg: dict) -> dict:
    """What final.pt and snapshots hold: the EMA weights and what sampling needs to know."""
    return {"ema": run.ema.state_dict(), "step": run.step, "config": cfg, "num_classes": run.data.num_classes,
            "scaling_factor": run.data.scaling_factor, "z_std": run.data.z_std, "code_version": run.code}


# --- the loop ----------------------------------------------------------------------------------

def train(cfg: dict, latents: str, features: str, out_dir: str | os.PathLike, device: str = "auto",
          quiet: bool = False) -> dict | None:
    """Train (or resume) one run into out_dir; returns the manifest on rank 0 when finished."""
    start = time.time()
    late = [s for s in cfg["snapshot_steps"] if s > cfg["steps"]]
    if late:
        raise ReDiError(f"train.snapshot_steps {late} lie beyond train.steps {cfg['steps']}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    process_rank, world, device = setup_distributed(device)
    if cfg["batch_size"] % world:
        raise ReDiError(f"train.batch_size {cfg['batch_size']} is not divisible by {world} processes")
    local_batch = cfg["batch_size"] // world
    allow_tf32(device)
    run = resume(cfg, latents, features, out_dir, process_rank, world, device)
    metrics_path, lead = out_dir / "metrics.jsonl", process_rank == 0
    if lead:
        _truncate_metrics(metrics_path, run.step)
    net = DistributedDataParallel(run.model) if world > 1 else run.model
    step_fn = TrainStep(run.model, run.ema, run.opt, run.objective, cfg, device, run.data.scaling_factor,
                        forward=torch.compile(net) if cfg["compile"] else net, world=world,
                        process_rank=process_rank)
    stop = StopSignal()
    margin = float(os.environ.get("REDI_STOP_MARGIN_S", "600"))
    deadline = slurm_deadline() if lead and margin > 0 else None
    if deadline is not None:
        print(f"train: the job's time limit is in {deadline - time.time():.0f} s; checkpointing and "
              f"stopping {margin:.0f} s before it", file=sys.stderr, flush=True)
    board = tensorboard_writer(out_dir) if cfg["tensorboard"] and lead else None
    bar = progress(total=cfg["steps"], initial=run.step, desc="train", unit="step", disable=not lead or quiet)
    try:
        window_start, window_images = time.time(), 0
        while run.step < cfg["steps"]:
            lr = learning_rate(cfg, run.step + 1)
            for group in run.opt.param_groups:
                group["lr"] = lr
            values = step_fn(run.data.next_batch(local_batch, device), run.step + 1)
            run.step += 1
            window_images += cfg["batch_size"]
            bar.update(1)
            step, last = run.step, run.step == cfg["steps"]
            if step % cfg["log_every"] == 0 or last:
                step_fn.check()  # a logged step is a good one
                elapsed = time.time() - window_start
                record = _log_record(values, step, lr, window_images, elapsed, world, device)
                if lead:
                    _write_metrics(metrics_path, board, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                window_start, window_images = time.time(), 0
            stopping = out_of_time = False
            if world == 1 or step % step_fn.check_every == 0 or last:  # a collective: not every step
                out_of_time = deadline is not None and time.time() > deadline - margin
                stopping = any_rank(stop.received is not None or out_of_time, world, device)
            saving = step % cfg["ckpt_every"] == 0 or last or stopping
            if saving or step in cfg["snapshot_steps"]:
                step_fn.check()  # nothing past a non-finite step is ever written
            if saving:
                state = checkpoint_state(run, cfg, world, device)
                if lead:
                    save_checkpoint(out_dir, state, cfg["keep_checkpoints"])
            if step in cfg["snapshot_steps"] and lead:
                save_sampling_weights(snapshot_path(out_dir, step), sampling_state(run, cfg))
            if stopping and not last:
                cause = "a signal" if stop.received is not None or not out_of_time else "the job's time limit"
                raise ReDiError(f"stopped by {cause} after step {step}; checkpoint saved, rerun to resume")
    except NonFiniteStep as err:
        raise ReDiError(f"{err}; last good checkpoint: {latest_checkpoint(out_dir) or 'none yet'}") from None
    finally:
        stop.restore()
        bar.close()
        if board is not None:
            board.close()
    checksums = _replica_checksums(run.model, world, device)
    if not lead:
        return None
    save_sampling_weights(out_dir / FINAL, sampling_state(run, cfg) | {"model": run.model.state_dict()})
    return write_manifest(
        out_dir / "manifest.json", "train", {"train": cfg},
        inputs={"latents": Path(latents).with_name("manifest.json"),
                "features": Path(features).with_name("manifest.json")},
        steps=run.step, world_size=world, device=str(device), bf16=step_fn.bf16,
        parameters=sum(p.numel() for p in run.model.parameters()), replica_checksums=checksums,
        wall_time_s=round(time.time() - start, 2),
    )


def learning_rate(cfg: dict, step: int) -> float:
    """train.lr after a linear warm-up over train.warmup_steps (step is 1-based)."""
    return cfg["lr"] * min(1.0, step / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]


def _log_record(values: dict, step: int, lr: float, images: int, elapsed: float, world: int,
                device: torch.device) -> dict:
    """One metrics.jsonl line: the step's losses and gradient norm (means over ranks), lr, img/s."""
    scalars = all_mean({k: float(v.detach()) for k, v in values.items()}, world, device)
    record = {"step": step, **scalars, "lr": lr, "img_per_s": images / max(elapsed, 1e-9)}
    if device.type == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def _write_metrics(path: Path, board, record: dict) -> None:
    """Append a record to metrics.jsonl (and TensorBoard when on)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if board is not None:
        for key, value in record.items():
            if key != "step":
                board.add_scalar(f"train/{key}", value, record["step"])
        board.flush()


def tensorboard_writer(out_dir: Path):
    """A TensorBoard SummaryWriter on <run>/tensorboard (train.tensorboard), or a clear error without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ReDiError(f"train.tensorboard needs the tensorboard package ({err}): pip install -e "
                        f"'.[tensorboard]', or set train.tensorboard: false") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _replica_checksums(model: nn.Module, world: int, device: torch.device) -> list[float]:
    """Sum of all weights on every rank: DDP replicas must agree exactly."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if world == 1:
        return [total.item()]
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total.to(device))
    return [g.item() for g in gathered]


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Result-changing train keys that differ between a checkpoint's config and this run's.

    A key the checkpoint lacks (written before the key existed) counts as its baseline value, so
    the checkpoint resumes when the key keeps the old behaviour.
    """
    baseline = load_baseline()
    free = {"steps", *STAGES["train"].speed["train"]}
    changed = []
    for key in sorted(set(old) | set(new)):
        if not prefix and key in free:
            continue
        a, b = old.get(key, baseline.get(f"train.{prefix}{key}")), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"train.{prefix}{key}: {a!r} -> {b!r}")
    return changed


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint a run resumes from (they will be redone)."""
    if not path.exists():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                lines.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a crash
            continue
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi train`."""
    try:
        train(cfg["train"], args.latents, args.features, args.out, args.device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
