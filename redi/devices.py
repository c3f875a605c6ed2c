"""Torch device selection, with no silent CPU fallback when the job asked for a GPU.

The rule: `auto` is cuda when a usable CUDA device exists, else cpu -- but only when no GPU was
requested. A GPU counts as requested when the job's environment shows an allocation
(CUDA_VISIBLE_DEVICES naming a device, or SLURM's SLURM_GPUS_ON_NODE / SLURM_JOB_GPUS /
SLURM_STEP_GPUS) or when the workflow's rule asked for one (REDI_GPUS > 0, set from the stage's
`resources.<stage>.gpus`). `cuda` / `cuda:N` always require a usable device. A GPU that is wanted
but unusable is a ReDiError naming what torch.cuda reported (CPU-only build, a driver the build
cannot use, no device visible). A module of its own so light stages need not import the encoders.
"""

from __future__ import annotations

import os
import warnings

import torch

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
