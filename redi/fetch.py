"""`redi fetch`: download a published file the workflow needs (a released checkpoint, ADM's reference
batch) to the path the config names, atomically.

Sources: `hf://<owner>/<repo>[/<file>]` through huggingface_hub (without a file name the repository
must hold exactly one weights file), or an http(s)/file URL through urllib. Offline, or when the
source fails, the error says where to put the file by hand; a file already in place is never
fetched (Snakemake only runs the rule for a missing file).
"""

from __future__ import annotations

import argparse
import shutil
import urllib.request
from pathlib import Path

from .errors import ReDiError
from .io import atomic_path, sha256_file

WEIGHTS = ("*.pt", "*.pth", "*.safetensors", "*.ckpt", "*.bin")


def _from_hub(source: str, tmp: Path) -> None:
    """hf://owner/repo[/file]: one file of a Hugging Face model repository."""
    from huggingface_hub import hf_hub_download, list_repo_files

    parts = source.removeprefix("hf://").split("/", 2)
    if len(parts) < 2:
        raise ReDiError(f"{source!r}: expected hf://<owner>/<repo>[/<file>]")
    repo = "/".join(parts[:2])
    name = parts[2] if len(parts) == 3 else None
    if name is None:
        files = [f for f in list_repo_files(repo) if any(Path(f).match(p) for p in WEIGHTS)]
        if len(files) != 1:
            raise ReDiError(f"{repo} holds {len(files)} weights files ({', '.join(files) or 'none'}); "
                            f"name one: hf://{repo}/<file>")
        name = files[0]
    shutil.copyfile(hf_hub_download(repo, name), tmp)


def fetch(source: str, out: str | Path) -> dict:
    """Download `source` to `out` (atomic); returns {source, path, sha256, bytes}."""
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            if source.startswith("hf://"):
                _from_hub(source, tmp)
            else:
                with urllib.request.urlopen(source, timeout=60) as response, open(tmp, "wb") as f:
                    shutil.copyfileobj(response, f, length=1 << 20)
    except ReDiError:
        raise
    except Exception as err:  # offline, unknown repository or URL, refused connection ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ReDiError(f"could not fetch {source} ({type(err).__name__}: {reason}); download it by hand "
                        f"to {out}") from None
    return {"source": source, "path": str(out), "sha256": sha256_file(out), "bytes": out.stat().st_size}


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi fetch`."""
    done = fetch(args.source, args.out)
    print(f"fetched {done['source']} -> {done['path']} ({done['bytes']} bytes, sha256 {done['sha256'][:12]})")
