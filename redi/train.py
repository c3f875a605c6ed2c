"""`redi train`: one DiT/SiT (+ ReDi) run, single-process or under torchrun (DDP).

Checkpoints {model, ema, opt, step, rng, data, config} are written atomically every ckpt_every
steps and when SIGTERM/SIGUSR1 arrives (SLURM preemption); a rerun resumes from the latest one and
continues bit-exactly on CPU. A non-finite loss stops the run before the optimizer step, naming the
step, so the last checkpoint stays good. final.pt, and snapshots/step-<N>.pt at train.snapshot_steps,
hold what sampling needs: the EMA weights, the config and the data's scales.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .cli import RESOURCE_KEYS
from .code_version import stage_code_version
from .config import load_baseline
from .data.training_data import TrainingData, stream_seed
from .devices import resolve_device
from .diffusion import build_objective
from .errors import ReDiError
from .io import atomic_path, save_torch, write_manifest
from .models import build_model
from .progress import progress

CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"


# --- processes ---------------------------------------------------------------------------------

def setup_distributed(device: str, timeout: timedelta | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (gloo on CPU, nccl on GPU).

    `timeout` bounds collective waits (torch's default: 10 minutes for NCCL).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device)
    local_rank = int(os.environ["LOCAL_RANK"])
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timeout)
    return dist.get_rank(), world, target


def all_mean(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Means over ranks of scalar metrics."""
    if world == 1:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world).tolist(), strict=True))


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if world == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


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
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, in float32."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


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


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint of a run folder, or None."""
    found = sorted((out_dir / CHECKPOINTS).glob("step-*.pt"))
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """Write checkpoints/step-<step>.pt atomically; drop the oldest beyond `keep`."""
    path = out_dir / CHECKPOINTS / f"step-{state['step']:09d}.pt"
    save_torch(path, state)
    for old in sorted((out_dir / CHECKPOINTS).glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def snapshot_path(train_dir: str | Path, step: int) -> Path:
    """Where the EMA snapshot of `step` of a run lives."""
    return Path(train_dir) / SNAPSHOTS / f"step-{step:09d}.pt"


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, tensors on CPU (weights_only: no code runs on load); ReDiError if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or objects weights_only refuses
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ReDiError(f"{path} cannot be loaded ({reason}); delete it and rerun the stage that "
                        f"writes it") from None


def resume_checkpoint(out_dir: Path, set_aside: bool = True) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, and its state. Unreadable newer ones (a truncated copy, a
    disk error) are skipped; with `set_aside` (rank 0) renamed `<name>.unreadable` with a warning."""
    for path in sorted((out_dir / CHECKPOINTS).glob("step-*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except ReDiError as err:
            if set_aside and path.exists():
                aside = path.with_name(path.name + ".unreadable")
                print(f"redi train: warning: {err}; set aside as {aside.name}, resuming from an older "
                      f"checkpoint", file=sys.stderr)
                os.replace(path, aside)
    return None, None


# --- the run -----------------------------------------------------------------------------------

def learns_sigma(cfg: dict) -> bool:
    """train.model.learn_sigma, with null resolved: DiT (ddpm) yes; SiT yes except with `concat`
    (the official SiT checkpoints keep the unused variance channels, SiT-ReDi drops them)."""
    m = cfg["model"]
    if m["learn_sigma"] is not None:
        return m["learn_sigma"]
    return cfg["objective"] == "ddpm" or m["fusion"] != "concat"


def build_run(cfg: dict, num_classes: int, image_size: int, rep_channels: int) -> tuple[nn.Module, object]:
    """The model and objective of a `train` config section."""
    m = cfg["model"]
    overrides = {k: m[k] for k in ("depth", "hidden_size", "num_heads") if m[k] is not None}
    model = build_model(
        m["size"], m["patch"], input_size=image_size, in_channels=4, learn_sigma=learns_sigma(cfg),
        num_classes=num_classes if cfg["conditional"] else 0, class_dropout_prob=cfg["class_dropout"],
        fusion=m["fusion"], rep_channels=rep_channels if m["fusion"] != "none" else 0,
        grad_checkpointing=cfg["grad_checkpointing"], **overrides,
    )
    joint = {"rep_weight": cfg["rep_weight"], "rep_dropout": cfg["rep_dropout"],
             "rep_dropout_mode": cfg["rep_dropout_mode"], "rep_dropout_norm": cfg["rep_dropout_norm"]}
    if cfg["objective"] == "ddpm":
        joint["learn_sigma"] = learns_sigma(cfg)
    return model, build_objective(cfg["objective"], **joint)


def train(cfg: dict, latents: str, features: str, out_dir: str | os.PathLike, device: str = "auto",
          quiet: bool = False) -> dict | None:
    """Train (or resume) one run into out_dir; returns the manifest on rank 0 when finished."""
    start = time.time()
    late = [s for s in cfg["snapshot_steps"] if s > cfg["steps"]]
    if late:
        raise ReDiError(f"train.snapshot_steps {late} lie beyond train.steps {cfg['steps']}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, device = setup_distributed(device)
    if cfg["batch_size"] % world:
        raise ReDiError(f"train.batch_size {cfg['batch_size']} is not divisible by {world} processes")
    local_batch = cfg["batch_size"] // world
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cfg["precision"] == "bf16" or (cfg["precision"] == "auto" and device.type == "cuda")

    data = TrainingData(latents, features, cfg["rank"], cfg["normalize_z"], cfg["flip"], cfg["seed"],
                        rank, world)
    grid = data.mean.shape[-1] // cfg["model"]["patch"]
    if data.z.shape[-1] != grid:
        raise ReDiError(f"the PCA maps are {data.z.shape[-1]}x{data.z.shape[-1]} but the model's token grid "
                        f"is {grid}x{grid}: set features.grid = latent side / train.model.patch")
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model, objective = build_run(cfg, data.num_classes, data.mean.shape[-1], cfg["rank"])
    model.to(device)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            fused=device.type == "cuda")
    step, metrics_path = 0, out_dir / "metrics.jsonl"
    code = stage_code_version("train")
    resume, state = resume_checkpoint(out_dir, set_aside=rank == 0)
    if state is not None and state.get("code_version") != code:
        if rank == 0:
            _set_aside(out_dir, state.get("code_version"), code)
        _barrier(world)
        resume = state = None
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        changed = _changed_keys(state["config"], cfg)
        if changed:
            raise ReDiError(f"{resume} was trained with other settings ({', '.join(changed)}); use a new "
                            f"output folder, or put the settings back (only steps and speed keys may change)")
        if len(state["rng"]) != world:
            raise ReDiError(f"{resume} was written by {len(state['rng'])} processes; resume it with as many "
                            f"(this run has {world})")
        data.load_state_dict(state["data"][rank])
        set_rng_state(state["rng"][rank], device)
        step = int(state["step"])
    else:
        torch.manual_seed(stream_seed(cfg["seed"], rank, "noise"))  # independent noise per rank
    if rank == 0:
        _truncate_metrics(metrics_path, step)
    net = DistributedDataParallel(model) if world > 1 else model
    forward = torch.compile(net) if cfg["compile"] else net
    stop = StopSignal()
    margin = float(os.environ.get("REDI_STOP_MARGIN_S", "600"))
    deadline = slurm_deadline() if rank == 0 and margin > 0 else None
    if deadline is not None and rank == 0:
        print(f"train: the job's time limit is in {deadline - time.time():.0f} s; checkpointing and "
              f"stopping {margin:.0f} s before it", file=sys.stderr, flush=True)

    def checkpoint_state() -> dict:
        gathered_rng, gathered_data = [None] * world, [None] * world
        if world > 1:
            dist.all_gather_object(gathered_rng, rng_state(device))
            dist.all_gather_object(gathered_data, data.state_dict())
        else:
            gathered_rng, gathered_data = [rng_state(device)], [data.state_dict()]
        return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "rng": gathered_rng, "data": gathered_data, "config": cfg,
                "code_version": code}

    def sampling_state() -> dict:
        return {"ema": ema.state_dict(), "step": step, "config": cfg, "num_classes": data.num_classes,
                "scaling_factor": data.scaling_factor, "z_std": data.z_std, "code_version": code}

    def save() -> None:
        state = checkpoint_state()  # every rank joins the gathers
        if rank == 0:
            save_checkpoint(out_dir, state, cfg["keep_checkpoints"])

    board = tensorboard_writer(out_dir) if cfg["tensorboard"] and rank == 0 else None
    bar = progress(total=cfg["steps"], initial=step, desc="train", unit="step", disable=rank != 0 or quiet)
    try:
        window_start, window_images = time.time(), 0
        while step < cfg["steps"]:
            lr = cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]
            for group in opt.param_groups:
                group["lr"] = lr
            batch = {k: v.to(device, non_blocking=True) for k, v in data.next_batch(local_batch).items()}
            x = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * data.scaling_factor
            z = batch["z"] if cfg["model"]["fusion"] != "none" else None
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
                losses = objective.loss(forward, x, z, batch["y"] if cfg["conditional"] else None)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or math.inf)
            bad = not (torch.isfinite(losses["loss"]) and torch.isfinite(grad_norm)).item()
            if any_rank(bad, world, device):
                raise _non_finite(losses["loss"], grad_norm, step + 1, batch["index"], rank, out_dir)
            opt.step()
            update_ema(ema, model, cfg["ema_decay"])
            step += 1
            window_images += cfg["batch_size"]
            bar.update(1)
            if step % cfg["log_every"] == 0 or step == cfg["steps"]:
                values = {k: float(v.detach()) for k, v in losses.items()} | {"grad_norm": float(grad_norm)}
                values = all_mean(values, world, device)
                elapsed = time.time() - window_start
                record = {"step": step, **values, "lr": lr, "img_per_s": window_images / max(elapsed, 1e-9)}
                if device.type == "cuda":
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if board is not None:
                        for key, value in record.items():
                            if key != "step":
                                board.add_scalar(f"train/{key}", value, step)
                        board.flush()
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                window_start, window_images = time.time(), 0
            late = deadline is not None and time.time() > deadline - margin
            stopping = any_rank(stop.received is not None or late, world, device)
            if step % cfg["ckpt_every"] == 0 or step == cfg["steps"] or stopping:
                save()
            if step in cfg["snapshot_steps"] and rank == 0:
                save_sampling_weights(snapshot_path(out_dir, step), sampling_state())
            if stopping and step < cfg["steps"]:
                cause = "a signal" if stop.received is not None or not late else "the job's time limit"
                raise ReDiError(f"stopped by {cause} after step {step}; checkpoint saved, rerun to resume")
    finally:
        stop.restore()
        bar.close()
        if board is not None:
            board.close()
    checksums = _replica_checksums(model, world, device)
    if rank != 0:
        return None
    save_sampling_weights(out_dir / "final.pt", sampling_state() | {"model": model.state_dict()})
    return write_manifest(
        out_dir / "manifest.json", "train", {"train": cfg},
        inputs={"latents": Path(latents).with_name("manifest.json"),
                "features": Path(features).with_name("manifest.json")},
        steps=step, world_size=world, device=str(device), bf16=bf16,
        parameters=sum(p.numel() for p in model.parameters()), replica_checksums=checksums,
        wall_time_s=round(time.time() - start, 2),
    )


def tensorboard_writer(out_dir: Path):
    """A TensorBoard SummaryWriter on <run>/tensorboard (train.tensorboard), or a clear error without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ReDiError(f"train.tensorboard needs the tensorboard package ({err}): pip install -e "
                        f"'.[tensorboard]', or set train.tensorboard: false") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def save_sampling_weights(path: Path, state: dict) -> None:
    """final.pt or a snapshot: the EMA weights and what sampling needs to know (atomic)."""
    save_torch(path, state)


def _replica_checksums(model: nn.Module, world: int, device: torch.device) -> list[float]:
    """Sum of all weights on every rank: DDP replicas must agree exactly."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if world == 1:
        return [total.item()]
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total.to(device))
    return [g.item() for g in gathered]


def _non_finite(loss, grad_norm, step: int, index: torch.Tensor, rank: int, out_dir: Path) -> ReDiError:
    """The error that stops a run whose loss or gradient is NaN/inf, naming the step and the batch."""
    samples = index.tolist()
    shown = f"{samples[:16]}{' ...' if len(samples) > 16 else ''}"
    return ReDiError(
        f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at step {step}, batch "
        f"samples {shown} (rank {rank}); stopped before the update; last good checkpoint: "
        f"{latest_checkpoint(out_dir) or 'none yet'}")


def _set_aside(out_dir: Path, old: str | None, new: str) -> None:
    """Move checkpoints written by other train code to checkpoints/code-<version>/, saying why."""
    aside = out_dir / CHECKPOINTS / f"code-{old or 'unrecorded'}"
    aside.mkdir(parents=True, exist_ok=True)
    found = sorted((out_dir / CHECKPOINTS).glob("step-*.pt"))
    for path in found:
        os.replace(path, aside / path.name)
    print(f"train: not resuming: {len(found)} checkpoint(s) in {out_dir / CHECKPOINTS} were written by train "
          f"code {old or '(unrecorded)'}, this is {new}; moved to {aside}, starting from step 0",
          file=sys.stderr, flush=True)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Result-changing train keys that differ between a checkpoint's config and this run's.

    A key the checkpoint lacks (written before the key existed) counts as its baseline value, so
    the checkpoint resumes when the key keeps the old behaviour.
    """
    baseline = load_baseline()
    free = {"steps", *RESOURCE_KEYS["train"]}
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
