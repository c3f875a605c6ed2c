"""Atomic artifact writes and stage manifests: a half-written file never looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ReDiError


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a write error shows up here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file is fsynced before the rename, so a full disk fails the block instead of leaving a
    short file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """Write arrays as one .npz, atomically (through a file object: np.savez would append .npz to
    the temporary name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def save_torch(path: str | os.PathLike, state: Any) -> None:
    """torch.save, atomically; a failed write (torch says only 'unexpected pos') becomes one line."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as err:
            free = shutil.disk_usage(Path(path).parent).free
            raise ReDiError(f"could not write {path} ({free / 2**20:.1f} MiB free there; torch: "
                            f"{str(err).splitlines()[0]}): free space and rerun") from None


def load_npz(path: str | os.PathLike, what: str, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz (all, or those of `keys` present), never unpickling: object arrays,
    a corrupt zip or a bad header are one ReDiError naming the file."""
    path = require_file(path, what)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files if keys is None or k in keys}
    except ValueError as err:
        reason = ("it holds object arrays, which would need unpickling" if "allow_pickle" in str(err)
                  else str(err).splitlines()[0])
        raise ReDiError(f"{what} {path} cannot be read: {reason}; rewrite it with plain numeric "
                        f"arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ReDiError(f"{what} {path} cannot be read ({type(err).__name__}: {err}); it is not a complete "
                        f".npz: rewrite it") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able config section."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def git_revision() -> str | None:
    """The git revision of the package checkout, or None when not installed from git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def write_manifest(
    path: str | os.PathLike,
    stage: str,
    config: dict,
    inputs: dict[str, str | os.PathLike] | None = None,
    **fields: Any,
) -> dict:
    """Write a stage's manifest.json: config and its hash, code version, input hashes, results."""
    for name, p in (inputs or {}).items():
        if not Path(p).is_file():
            raise ReDiError(f"input manifest '{name}' not found: {p} (run the stage that writes it)")
    manifest = {
        "stage": stage,
        "config": config,
        "config_hash": config_hash(config),
        "redi_version": __version__,
        "git_revision": git_revision(),
        "inputs": {
            name: {"path": str(p), "sha256": sha256_file(p)} for name, p in (inputs or {}).items()
        },
        **fields,
    }
    write_json(path, manifest)
    return manifest


def require_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path, or a ReDiError naming it when it is not an existing file."""
    path = Path(path)
    if not path.is_file():
        raise ReDiError(f"{what} not found: {path} (run the stage that writes it first)")
    return path


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file, or of every file below a folder (names and contents)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict:
    """Read a stage manifest, with a clear error when the upstream stage has not finished."""
    return json.loads(require_file(path, "manifest").read_text())
