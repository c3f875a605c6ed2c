"""Torch device selection, with no silent CPU fallback when the job asked for a GPU.

The rule: `auto` is cuda when a usable CUDA device exists, else cpu -- but only when no GPU was
requested. A GPU counts as requested when the job's environment shows an allocation
(CUDA_VISIBLE_DEVICES naming a device, or SLURM's SLURM_GPUS_ON_NODE / SLURM_JOB_GPUS /
SLURM_STEP_GPUS) or when the workflow's rule asked for one (REDI_GPUS > 0, set from the stage's
`resources.<stage>.gpus`). `cuda` / `cuda:N` always require a usable device. A GPU that is wanted
but unusable is a ReDiError naming what torch.cuda reported (CPU-only build, a driver the build
cannot use, no device visible). A module of its own so light stages need not import the encoders.

Also the process set-up every neural stage shares: torchrun's process group (gloo on CPU, nccl on
GPU), the collectives the loops use, and one precision rule for train and sample.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ReDiError

ALLOCATION_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def gpu_requested(environ: dict | None = None) -> str | None:
    """Why this process is expected to have a GPU (the variable that says so), or None."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in ALLOCATION_VARIABLES:  # a count (GPUS_ON_NODE) or a list of indices (JOB/STEP_GPUS)
        value = env.get(name, "").strip()
        if value and value != "(null)" and not (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"{name}={value}"
    try:
        if int(env.get("REDI_GPUS", "0") or 0) > 0:
            return f"REDI_GPUS={env['REDI_GPUS']} (the rule's resources.<stage>.gpus)"
    except ValueError:
        raise ReDiError(f"REDI_GPUS={env['REDI_GPUS']!r} is not a number of GPUs") from None
    return None


def cuda_problem() -> str | None:
    """Why CUDA is unusable in this process, in torch's words, or None when a device is usable."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this torch ({torch.__version__}) is built without CUDA: install a CUDA build of "
                f"torch (e.g. the cu12x wheels from download.pytorch.org)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    said = "; ".join(str(w.message).strip().splitlines()[0] for w in caught)
    try:
        count = torch._C._cuda_getDeviceCount()
    except Exception as err:  # e.g. "The NVIDIA driver on your system is too old"
        said = said or f"{type(err).__name__}: {err}"
        count = 0
    if said:
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use the GPU: {said}"
                f" (a driver older than the build's CUDA needs a torch built for an older CUDA)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"no CUDA device visible (torch.cuda.device_count() = {count}, "
            f"CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)})")


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when usable (required when a GPU was requested), else cpu; `cuda[:N]` must be usable."""
    if device == "auto":
        requested = gpu_requested()
        problem = cuda_problem()
        if problem is None:
            return torch.device("cuda")
        if requested is None:
            return torch.device("cpu")
        raise ReDiError(f"a GPU was requested ({requested}) but {problem}; or set device: cpu to run "
                        f"on the CPU on purpose")
    target = torch.device(device)
    if target.type == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise ReDiError(f"device {device}: {problem}")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ReDiError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return target


# --- processes ---------------------------------------------------------------------------------

def setup_distributed(device: str, timeout: timedelta | None = None) -> tuple[int, int, torch.device]:
    """(process rank, world size, device); initialises the process group under torchrun (gloo on
    CPU, nccl on GPU). `timeout` bounds collective waits (torch's default: 10 minutes for NCCL)."""
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
    """Means over processes of scalar metrics."""
    if world == 1:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world).tolist(), strict=True))


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every process when `flag` is True on at least one."""
    if world == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for alone)."""
    if world > 1:
        dist.barrier()


# --- precision ---------------------------------------------------------------------------------

def uses_bf16(precision: str, device: torch.device) -> bool:
    """The one precision rule of train and sample: `bf16` autocasts on any device, `auto` on CUDA
    only, `fp32` never."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(bf16: bool, device: torch.device):
    """torch.autocast to bfloat16 when `bf16`, else a context that does nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def allow_tf32(device: torch.device) -> None:
    """TF32 matmuls and convolutions on CUDA (what fp32 means on the official code's GPUs)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
