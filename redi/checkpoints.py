"""Where a training run keeps its state, and reading/writing it: resumable checkpoints, EMA
snapshots and final.pt (the sampling weights). Shared by train, sample, report and the workflow.

A run folder holds checkpoints/step-<N>.pt ({model, ema, opt, step, rng, data, config,
code_version}, the newest `keep_checkpoints`), snapshots/step-<N>.pt and final.pt ({ema, step,
config, num_classes, scaling_factor, z_std, code_version}: what sampling needs). Every write is
atomic; every read is weights_only, so loading a file runs no code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import ReDiError
from .io import save_torch

CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
FINAL = "final.pt"


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    """Where the resumable checkpoint of `step` of a run lives."""
    return Path(out_dir) / CHECKPOINTS / f"step-{step:09d}.pt"


def snapshot_path(train_dir: str | Path, step: int) -> Path:
    """Where the EMA snapshot of `step` of a run lives."""
    return Path(train_dir) / SNAPSHOTS / f"step-{step:09d}.pt"


def checkpoint_files(out_dir: str | Path) -> list[Path]:
    """The resumable checkpoints of a run folder, oldest first (step numbers are zero-padded)."""
    return sorted((Path(out_dir) / CHECKPOINTS).glob("step-*.pt"))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint of a run folder, or None."""
    found = checkpoint_files(out_dir)
    return found[-1] if found else None


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """Write checkpoints/step-<step>.pt atomically; drop the oldest beyond `keep`."""
    path = checkpoint_path(out_dir, state["step"])
    save_torch(path, state)
    for old in checkpoint_files(out_dir)[:-keep]:
        old.unlink()
    return path


def save_sampling_weights(path: Path, state: dict) -> None:
    """final.pt or a snapshot: the EMA weights and what sampling needs to know (atomic)."""
    save_torch(path, state)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint, tensors on CPU (weights_only: no code runs on load); ReDiError if unreadable."""
    import torch  # here: the workflow imports this module to name files while it plans, without torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or objects weights_only refuses
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ReDiError(f"{path} cannot be loaded ({reason}); delete it and rerun the stage that "
                        f"writes it") from None


def resume_checkpoint(out_dir: Path, set_aside: bool = True) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, and its state. Unreadable newer ones (a truncated copy, a
    disk error) are skipped; with `set_aside` (rank 0) renamed `<name>.unreadable` with a warning."""
    for path in reversed(checkpoint_files(out_dir)):
        try:
            return path, load_checkpoint(path)
        except ReDiError as err:
            if set_aside and path.exists():
                aside = path.with_name(path.name + ".unreadable")
                print(f"redi train: warning: {err}; set aside as {aside.name}, resuming from an older "
                      f"checkpoint", file=sys.stderr)
                os.replace(path, aside)
    return None, None


def set_aside_other_code(out_dir: Path, old: str | None, new: str) -> None:
    """Move checkpoints written by other train code to checkpoints/code-<version>/, saying why."""
    aside = Path(out_dir) / CHECKPOINTS / f"code-{old or 'unrecorded'}"
    aside.mkdir(parents=True, exist_ok=True)
    found = checkpoint_files(out_dir)
    for path in found:
        os.replace(path, aside / path.name)
    print(f"train: not resuming: {len(found)} checkpoint(s) in {Path(out_dir) / CHECKPOINTS} were written by "
          f"train code {old or '(unrecorded)'}, this is {new}; moved to {aside}, starting from step 0",
          file=sys.stderr, flush=True)
