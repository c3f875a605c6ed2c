"""`redi sample`: N images from a trained run's EMA weights (or an official DiT/SiT checkpoint).

Sample i is drawn from a generator seeded by (seed, i) alone (its label, initial noise and every
step's noise), so the images do not depend on the number of processes or on which batch a sample
shares, and two base seeds share no sample. Work is cut
into fixed shards of indices; each finished shard is one tar of PNGs (image, representation map,
label) renamed into place, so a rerun after a kill generates only the unfinished shards. Rank 0
then writes the ADM-style samples.npz (arr_0 uint8 NHWC, arr_1 labels), the sample grid and the
grid of representation maps.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from .checkpoints import SNAPSHOTS, load_checkpoint
from .code_version import stage_code_version
from .config import identity
from .devices import allow_tf32, autocast, barrier, setup_distributed, uses_bf16
from .diffusion import GaussianDiffusion, LinearInterpolant
from .encoders import LatentEncoder, load_encoder
from .errors import ReDiError
from .guidance import Guidance, guided_prediction
from .io import (
    atomic_path,
    config_hash,
    require_file,
    sha256_file,
    write_json,
    write_manifest,
)
from .models import DiT, build_model, build_run
from .progress import progress
from .runs import SAMPLERS
from .samplers import PerSampleNoise, ddim_sample, ddpm_sample, ode_sample, sde_sample

ARCHITECTURE = re.compile(r"^(DiT|SiT)-(S|B|L|XL)/(2|4|8)$")
SHARD_PATTERN = "shard-{:06d}.tar"
GRID_IMAGES = 64  # the first 64 samples (8 x 8) in grid.png and representations.png


@dataclass
class SamplingModel:
    """A model ready to sample, with what sampling needs to know about how it was trained."""

    model: DiT
    objective: str  # "interpolant" (SiT) or "ddpm" (DiT)
    num_classes: int  # 0: unconditional
    scaling_factor: float | None  # latent scale used in training (None: the VAE's own)
    z_std: torch.Tensor | None  # per-channel std of the generated z (to render it); None: unknown
    description: str
    rep_dropout: tuple[float, str] | None = None  # (p_drop, mode) of training; None: unknown
    normalize_z: bool = False  # z divided by the PCA component stds in training (official code: no)


# --- loading ----------------------------------------------------------------------------------

def load_trained(path: str | Path) -> SamplingModel:
    """The EMA weights of a `redi train` final.pt or snapshot."""
    path = Path(path)
    if path.parent.name == SNAPSHOTS and not path.is_file():
        raise ReDiError(f"{path} does not exist: the run was trained without this step in "
                        f"train.snapshot_steps (a run's fid_steps); delete {path.parent.parent} to retrain "
                        f"it with the snapshot, or drop the step")
    state = load_checkpoint(require_file(path, "checkpoint"))
    if not isinstance(state, dict) or "ema" not in state or "config" not in state:
        raise ReDiError(f"{path} is not a final.pt of `redi train`; for an official DiT/SiT checkpoint set "
                        f"sample.architecture (e.g. DiT-XL/2)")
    cfg, ema = state["config"], state["ema"]
    image_size = _input_size(ema, cfg["model"]["patch"])
    model, _ = build_run(cfg, state["num_classes"], image_size, cfg["rank"])
    model.load_state_dict(ema)
    z_std = state.get("z_std") if cfg["model"]["fusion"] != "none" else None
    return SamplingModel(model.eval(), cfg["objective"], state["num_classes"] if cfg["conditional"] else 0,
                         state["scaling_factor"], z_std, f"redi train run, step {state['step']}",
                         (cfg["rep_dropout"], cfg["rep_dropout_mode"]), bool(cfg.get("normalize_z", False)))


def load_official(path: str | Path, architecture: str) -> SamplingModel:
    """An official DiT/SiT or SiT-ReDi checkpoint: a flat state dict, or the 'ema' entry of a training
    checkpoint (train_redi.py's holds its argparse.Namespace too, which the loader admits as data).

    A ReDi checkpoint has the official `concat` layout: its patch embedding reads 4 + r channels,
    so r = in_channels - 4; its head has 4 + r channels (x2 with a learned variance).
    """
    match = ARCHITECTURE.match(architecture or "")
    if match is None:
        raise ReDiError(f"architecture must look like DiT-XL/2 or SiT-B/4, got {architecture!r}")
    family, size, patch = match.group(1), match.group(2), int(match.group(3))
    require_file(path, "checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = load_checkpoint(path)
    except Exception as err:
        raise ReDiError(f"{path} could not be loaded with weights_only=True ({type(err).__name__}: "
                        f"{str(err).splitlines()[0]}); save its 'ema' state dict alone: "
                        f"torch.save(ckpt['ema'], 'ema.pt')") from err
    state = state.get("ema", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "pos_embed" not in state or "x_embedder.proj.weight" not in state:
        raise ReDiError(f"{path} holds no DiT/SiT state dict (no pos_embed / x_embedder.proj.weight key)")
    # the REPA projector only serves training; sampling never reads it
    state = {k: v for k, v in state.items() if not k.startswith("projector.")}
    joint = state["x_embedder.proj.weight"].shape[1]
    rank = joint - 4
    out_rows = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_rows not in (joint, 2 * joint):
        raise ReDiError(f"{path}: the head has {out_rows} channels per pixel, expected {joint} or "
                        f"{2 * joint} for a patch embedding of {joint} channels")
    labels = state.get("y_embedder.embedding_table.weight")
    num_classes = labels.shape[0] - 1 if labels is not None else 0  # the last row is the null class
    model = build_model(size, patch, input_size=_input_size(state, patch), in_channels=4,
                        learn_sigma=out_rows == 2 * joint, num_classes=num_classes,
                        fusion="concat" if rank > 0 else "none", rep_channels=max(rank, 0))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ReDiError(f"{path} does not fit {architecture}: {str(err).splitlines()[0]}") from err
    objective = "ddpm" if family == "DiT" else "interpolant"
    name = f"official {architecture}" + (f" + ReDi (r = {rank}, concat)" if rank > 0 else "")
    return SamplingModel(model.eval(), objective, num_classes, None, None, name)


def _input_size(state: dict, patch: int) -> int:
    return math.isqrt(state["pos_embed"].shape[1]) * patch


# --- generation -------------------------------------------------------------------------------

def guidance_of(cfg: dict) -> Guidance:
    interval = (cfg["cfg_noise_low"], cfg["cfg_noise_high"])
    return Guidance(cfg["cfg_scale"], cfg["rg_scale"], cfg["cfg_channels"] == "all",
                    None if interval == (0.0, 1.0) else interval,
                    3 if cfg["cfg_channels"] == "first3" else None, cfg["rg_channels"] == "all")


def sample_labels(indices: list[int], cfg: dict, num_classes: int, noise: PerSampleNoise) -> torch.Tensor:
    """Class labels of the given samples: random (each from its own seed) or balanced.

    balanced: sample i takes entry i of a seeded shuffle of (0, 1, ..., C-1, 0, 1, ...) of length
    num_samples, so every class gets num_samples / C samples (+-1 when C does not divide it), and a
    sample's label depends on (seed, num_samples, i) only, never on processes or batches.
    """
    if cfg["labels"] == "random":
        return noise.integers(num_classes)
    order = np.random.default_rng([cfg["seed"], cfg["num_samples"]]).permutation(cfg["num_samples"])
    return torch.from_numpy(order[indices] % num_classes)


def sample_seed(base: int, index: int, *stream: int) -> int:
    """The generator seed of sample `index`: a hash of (base, index[, stream]), so seeds never overlap."""
    return int(np.random.SeedSequence([base, index, *stream]).generate_state(1, np.uint64)[0])


def sampler_of(cfg: dict, objective: str) -> str:
    """The configured sampler, checked against the model's objective ('auto': the paper's)."""
    name = cfg["sampler"] if cfg["sampler"] != "auto" else SAMPLERS[objective][0]
    if name not in SAMPLERS[objective]:
        raise ReDiError(f"sample.sampler {name!r} does not fit a {objective} model; "
                        f"choose one of: auto, {', '.join(SAMPLERS[objective])}")
    return name


class OracleSource:
    """The true z of real images (sample.oracle): sample i takes image j_i of a seeded permutation.

    z is prepared exactly as the training data prepares it: the first r PCA channels of
    pca_features.h5, divided by the component stds when the model trained with normalize_z.
    """

    def __init__(self, features_path: str | Path, rank: int, normalize_z: bool, grid: int):
        import h5py  # here: plain sampling reads no features

        self.path = require_file(features_path, "PCA features file (--features)")
        with h5py.File(self.path, "r") as f:
            if f["z"].shape[1] < rank:
                raise ReDiError(f"{features_path} holds {f['z'].shape[1]} PCA channels but the model "
                                f"generates r = {rank}: give the features the model was trained on")
            if f["z"].shape[-1] != grid:
                raise ReDiError(f"{features_path} has {f['z'].shape[-1]}x{f['z'].shape[-1]} PCA maps but the "
                                f"model's token grid is {grid}x{grid}: give the features it was trained on")
            self.size = len(f["labels"])
            std = np.asarray(f["component_std"][:rank], dtype=np.float32)
        self.rank = rank
        self.scale = torch.from_numpy(std if normalize_z else np.ones(rank, np.float32)).view(1, rank, 1, 1)

    def images(self, indices: list[int], seed: int) -> np.ndarray:
        """j_i: the real image of sample i, entry i (mod N) of a permutation seeded by sample.seed."""
        order = np.random.default_rng([seed, self.size, ORACLE_STREAM]).permutation(self.size)
        return order[np.asarray(indices) % self.size]

    def read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(z as the model saw it in training (N, r, G, G), labels) of the dataset rows, in that order."""
        import h5py

        unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing indices
        with h5py.File(self.path, "r") as f:
            z = torch.from_numpy(np.asarray(f["z"][unique, : self.rank], dtype=np.float32))[inverse]
            labels = torch.from_numpy(np.asarray(f["labels"][unique], dtype=np.int64))[inverse]
        return z / self.scale, labels


ORACLE_STREAM = 0x6F7261  # separates the oracle's draws (permutation, z noise) from the sampler's


def check_oracle(model: DiT, has_features: bool) -> None:
    """Refuse sample.oracle without a ReDi model or without the features file."""
    if model.fusion == "none":
        raise ReDiError("sample.oracle needs a ReDi model (train.model.fusion concat, merged or separate)")
    if not has_features:
        raise ReDiError("sample.oracle needs the true z of real images: pass --features pca_features.h5 "
                        "(the file the model was trained on)")


def oracle_noise(base: int, indices: list[int]) -> PerSampleNoise:
    """The fixed per-sample noise of the oracle's z_t: its own stream, so x's draws are unchanged."""
    return PerSampleNoise([sample_seed(base, i, ORACLE_STREAM) for i in indices])


def oracle_predict(predict, z_true: torch.Tensor, eps: torch.Tensor, diffusion: GaussianDiffusion | None):
    """predict with the model's z input replaced by the true z noised to each step's level, by the
    objective's own q_sample (interpolant: t z + (1 - t) eps; DDPM: at the model timestep).

    The noise eps is fixed per sample across steps; the sampler's own z state is ignored.
    """
    noising = diffusion if diffusion is not None else LinearInterpolant()

    def wrapped(x, z, t):
        return predict(x, noising.q_sample(z_true, t, eps), t)

    return wrapped


@torch.no_grad()
def generate(sm: SamplingModel, indices: list[int], cfg: dict, device: torch.device,
             bf16: bool = False, oracle: OracleSource | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(latents, z on the token grid or None, labels or None) of the given samples, on CPU in float32.

    cfg['oracle']: the model's z input is the true z of real images (from `oracle`) at every step;
    the labels and the returned z are those images'.
    """
    model, guidance, sampler = sm.model, guidance_of(cfg), sampler_of(cfg, sm.objective)
    if cfg.get("oracle"):
        check_oracle(model, oracle is not None)
    if guidance.uses_rg and model.fusion == "none":
        raise ReDiError("sample.rg_scale needs a ReDi model (train.model.fusion concat, merged or separate)")
    if guidance.uses_rg and sm.rep_dropout is not None and sm.rep_dropout[0] == 0:
        raise ReDiError("sample.rg_scale needs the z-dropped branch trained: this model had "
                        "train.rep_dropout 0 (train with e.g. 0.2, mode sample)")
    if (guidance.uses_rg and sm.rep_dropout is not None and sm.rep_dropout[1] != "sample"
            and not guidance.rg_all_channels):
        raise ReDiError("sample.rg_scale feeds z_t = 0, which only train.rep_dropout_mode 'sample' trains; "
                        "this model used 'batch_clean' (sample.rg_channels: all asks for the official "
                        "code's RG as it is)")
    if guidance.uses_cfg and sm.num_classes == 0:
        raise ReDiError("sample.cfg_scale needs a class-conditional model (train.conditional: true)")
    if guidance.uses_cfg and model.y_embedder.embedding_table.num_embeddings == sm.num_classes:
        raise ReDiError("sample.cfg_scale needs a null label: this model was trained without label dropout "
                        "(train.class_dropout: 0)")
    noise = PerSampleNoise([sample_seed(cfg["seed"], i) for i in indices])
    n, side = len(indices), model.grid_size * model.patch_size
    y = sample_labels(indices, cfg, sm.num_classes, noise).to(device) if sm.num_classes else None
    x = noise(torch.empty(n, model.in_channels, side, side, device=device))
    z = None
    if model.fusion != "none":
        z = noise(torch.empty(n, model.rep_channels, model.rep_size, model.rep_size, device=device))
    diffusion = GaussianDiffusion(learn_sigma=model.learn_sigma) if sm.objective == "ddpm" else None
    z_true = real_labels = None
    if cfg.get("oracle"):  # drawn after the sampler's own draws: x's noise stays that of plain sampling
        z_true, real_labels = oracle.read(oracle.images(indices, cfg["seed"]))
        y = real_labels.to(device) if sm.num_classes else None
        z_lifted = model.lift_representation(z_true.to(device))
        eps = oracle_noise(cfg["seed"], indices)(z_lifted)

    def predict(x, z, t):
        level = 1.0 - t if diffusion is None else t.double() / (diffusion.num_steps - 1)
        with autocast(bf16, device):
            px, pz = guided_prediction(model, x, t, y, z, guidance, sm.num_classes, t_interval=level)
        px = px.float() if sampler == "ddpm" else px[:, : x.shape[1]].float()  # DDPM reads the variance
        return px, None if pz is None else pz.float()

    if z_true is not None:
        predict = oracle_predict(predict, z_lifted, eps, diffusion)
    if sampler == "sde":
        x, z = sde_sample(predict, x, z, steps=cfg["steps"], noise=noise)
    elif sampler.startswith("ode-"):
        x, z = ode_sample(predict, x, z, steps=cfg["steps"], method=sampler[4:])
    elif sampler == "ddpm":
        x, z = ddpm_sample(diffusion, predict, x, z, steps=cfg["steps"], noise=noise)
    else:
        x, z = ddim_sample(diffusion, predict, x, z, steps=cfg["steps"], eta=cfg["ddim_eta"], noise=noise)
    z = None if z is None else model.representation_on_grid(z).cpu()  # concat: mean over each patch
    if z_true is not None:  # the representation of an oracle sample is the true one
        return x.cpu(), z_true, real_labels
    return x.cpu(), z, None if y is None else y.cpu()


@torch.no_grad()
def decode(vae: LatentEncoder, latents: torch.Tensor, scaling_factor: float | None = None) -> np.ndarray:
    """Scaled latents -> uint8 NHWC images, rounded as ADM/DiT do (clamp(127.5 x + 128))."""
    device = next(vae.vae.parameters()).device
    images = vae.vae.decode(latents.to(device) / (scaling_factor or vae.scaling_factor)).sample
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1)
    return pixels.to("cpu", torch.uint8).numpy()


def render_representation(z: torch.Tensor, z_std: torch.Tensor | None, size: int) -> np.ndarray:
    """The first 3 PCA channels as RGB (+-3 std -> 0..255), upsampled to size x size: uint8 NHWC."""
    if z_std is None:  # unknown units: this batch's own spread
        std = z.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    else:
        std = z_std.view(1, -1, 1, 1).to(z)
    rgb = (z / std)[:, :3]
    if rgb.shape[1] < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - rgb.shape[1], *rgb.shape[2:])], dim=1)
    rgb = ((rgb / 3.0).clamp(-1, 1) + 1) * 127.5
    rgb = nn.functional.interpolate(rgb, size=(size, size), mode="nearest")
    return rgb.round().permute(0, 2, 3, 1).to(torch.uint8).numpy()


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- shards, npz and grids -----------------------------------------------------------------------

def write_shard(path: Path, indices: list[int], images: np.ndarray, reps: np.ndarray | None,
                labels: torch.Tensor | None) -> None:
    """One tar of <index>.png (+ .rep.png, .cls), renamed into place when complete."""
    import webdataset as wds  # here: generate() and the samplers need no shard code

    with atomic_path(path) as tmp:
        with wds.TarWriter(str(tmp)) as writer:
            for k, index in enumerate(indices):
                sample = {"__key__": f"{index:09d}", "png": _png(images[k])}
                if reps is not None:
                    sample["rep.png"] = _png(reps[k])
                if labels is not None:
                    sample["cls"] = int(labels[k])
                writer.write(sample)


SHARD_MEMBERS = {"png", "rep.png", "cls"}


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """A sample shard back as arrays: index, images, reps (if any), labels (if any), in index order."""
    found: dict[int, dict] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if not (member.isfile() and key.isdigit() and ext in SHARD_MEMBERS):
                    raise ReDiError(f"sample shard {path} holds {member.name!r}, not <index>.png / "
                                    f".rep.png / .cls: delete the shard and rerun to regenerate it")
                found.setdefault(int(key), {})[ext] = tar.extractfile(member).read()
    except tarfile.TarError as err:
        raise ReDiError(f"sample shard {path} is not a readable tar ({err}): delete it and rerun") from None
    keys = sorted(found)
    out = {"index": np.array(keys, dtype=np.int64),
           "images": np.stack([np.array(Image.open(io.BytesIO(found[k]["png"]))) for k in keys])}
    if keys and "rep.png" in found[keys[0]]:
        out["reps"] = np.stack([np.array(Image.open(io.BytesIO(found[k]["rep.png"]))) for k in keys])
    if keys and "cls" in found[keys[0]]:
        out["labels"] = np.array([int(found[k]["cls"]) for k in keys], dtype=np.int64)
    return out


def write_adm_npz(path: Path, shard_files: list[Path], num_samples: int) -> None:
    """ADM's sample file: arr_0 (N, H, W, 3) uint8 [, arr_1 labels], streamed shard by shard."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            labels, written = [], 0
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                for k, shard in enumerate(shard_files):
                    data = read_shard(shard)
                    if k == 0:
                        header = {"descr": "|u1", "fortran_order": False,
                                  "shape": (num_samples, *data["images"].shape[1:])}
                        np.lib.format.write_array_header_2_0(f, header)
                    f.write(np.ascontiguousarray(data["images"]).tobytes())
                    written += len(data["images"])
                    labels.append(data.get("labels"))
            if written != num_samples:
                raise ReDiError(f"the shards hold {written} samples, expected {num_samples}")
            if all(lab is not None for lab in labels):
                with archive.open("arr_1.npy", "w") as f:
                    np.lib.format.write_array(f, np.concatenate(labels))


def image_grid(images: np.ndarray) -> np.ndarray:
    """Up to n images (N, H, W, 3) tiled in a near-square grid with 2-pixel gaps."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = images[k]
    return grid


def _save_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


# --- the stage ----------------------------------------------------------------------------------

def representation_std(pca_path: str | Path, rank: int) -> torch.Tensor:
    """Std of the first `rank` PCA channels (sqrt of their explained variance), to render z maps."""
    from .pca import load_pca

    variance = load_pca(pca_path)["explained_variance"]
    if len(variance) < rank:
        raise ReDiError(f"{pca_path} holds {len(variance)} principal components but the model generates "
                        f"r = {rank}: give the PCA file the model was trained with")
    return torch.from_numpy(np.sqrt(variance[:rank])).float()


def sample(cfg: dict, vae_cfg: dict, checkpoint: str, out_dir: str | Path, device: str = "auto",
           quiet: bool = False, pca: str | None = None, features: str | None = None) -> dict | None:
    """Generate cfg['num_samples'] images into out_dir (resumable); returns the manifest on rank 0.

    `pca` (optional): the PCA file of the model's representation; its rank is checked against the
    model's r and, for an official checkpoint, its component stds scale the rendered z maps.
    `features` (sample.oracle only): pca_features.h5 whose true z the oracle holds fixed.
    """
    start, out_dir = time.time(), Path(out_dir)
    rank, world, device = setup_distributed(device, timeout=timedelta(hours=24))  # ranks wait for shards
    bf16 = uses_bf16(cfg["precision"], device)
    allow_tf32(device)
    sm = (load_official(checkpoint, cfg["architecture"]) if cfg["architecture"] else load_trained(checkpoint))
    sm.model.to(device)
    if pca is not None and sm.model.fusion != "none":
        std = representation_std(pca, sm.model.rep_channels)
        sm.z_std = sm.z_std if sm.z_std is not None else std
    sampler_of(cfg, sm.objective)  # refuse a bad sampler before any work
    oracle = None
    if cfg["oracle"]:
        check_oracle(sm.model, features is not None)
        oracle = OracleSource(features, sm.model.rep_channels, sm.normalize_z, sm.model.grid_size)
    vae = load_encoder(vae_cfg["encoder"]["name"], vae_cfg["encoder"]["weights"], device, kind="vae")
    shards_dir = out_dir / "shards"
    what_makes_pixels = identity({"sample": {k: v for k, v in cfg.items() if k != "batch_size"}})
    provenance = {"checkpoint_sha256": sha256_file(checkpoint), "vae": vae.weights_id,
                  "config": config_hash(what_makes_pixels), "bf16": bf16,
                  "code": stage_code_version("sample")}
    if oracle is not None:
        provenance["features_sha256"] = sha256_file(features)
    if rank == 0:
        _discard_stale_shards(shards_dir, provenance)
    barrier(world)

    n, size = cfg["num_samples"], cfg["shard_size"]
    paths = [shards_dir / SHARD_PATTERN.format(k) for k in range(math.ceil(n / size))]
    todo = [[k for k, p in enumerate(paths) if not p.exists()]]
    if world > 1:  # rank 0's view, so that a shard finished meanwhile cannot shift the split
        dist.broadcast_object_list(todo, src=0)
    mine = todo[0][rank::world]
    total = sum(min(size, n - k * size) for k in mine)
    bar = progress(total=total, desc=f"sample (rank {rank})" if world > 1 else "sample", unit="img",
               disable=quiet)
    for k in mine:
        indices = list(range(k * size, min(n, (k + 1) * size)))
        images, reps, labels = [], [], []
        for b in range(0, len(indices), cfg["batch_size"]):
            batch = indices[b: b + cfg["batch_size"]]
            latents, z, y = generate(sm, batch, cfg, device, bf16, oracle)
            images.append(decode(vae, latents, sm.scaling_factor))
            if z is not None:
                reps.append(render_representation(z, sm.z_std, images[-1].shape[1]))
            if y is not None:
                labels.append(y)
            bar.update(len(batch))
        write_shard(paths[k], indices, np.concatenate(images), np.concatenate(reps) if reps else None,
                    torch.cat(labels) if labels else None)
    bar.close()
    barrier(world)
    if rank != 0:
        return None
    write_adm_npz(out_dir / "samples.npz", paths, n)
    first = _first_samples(paths, GRID_IMAGES)
    _save_png(out_dir / "grid.png", image_grid(first["images"]))
    if "reps" in first:
        _save_png(out_dir / "representations.png", image_grid(first["reps"]))
    return write_manifest(
        out_dir / "manifest.json", "sample", {"sample": cfg, "latents": vae_cfg},
        inputs={"checkpoint": checkpoint, **({"features": features} if oracle else {})},
        model=sm.description, sampler=sampler_of(cfg, sm.objective),
        num_samples=n, shards=[p.name for p in paths], world_size=world, device=str(device), bf16=bf16,
        vae=vae.weights_id, wall_time_s=round(time.time() - start, 2),
    )


def _first_samples(paths: list[Path], count: int) -> dict[str, np.ndarray]:
    """Images (and representation maps) of the first `count` samples, read from as few shards as needed."""
    parts: list[dict] = []
    for path in paths:
        parts.append(read_shard(path))
        if sum(len(p["images"]) for p in parts) >= count:
            break
    keys = [key for key in ("images", "reps") if key in parts[0]]
    return {key: np.concatenate([p[key] for p in parts])[:count] for key in keys}


def _discard_stale_shards(shards_dir: Path, provenance: dict) -> None:
    """Shards made from another checkpoint, VAE or config are removed, never mixed with new ones."""
    record = shards_dir / "provenance.json"
    old = None
    if record.exists():
        old = json.loads(record.read_text())
    stale = sorted(shards_dir.glob("shard-*.tar")) if old != provenance else []
    if stale:
        print(f"sample: removing {len(stale)} shards made from another checkpoint/VAE/config/code in "
              f"{shards_dir}", file=sys.stderr, flush=True)
        for path in stale:
            path.unlink()
    shards_dir.mkdir(parents=True, exist_ok=True)
    write_json(record, provenance)


def run_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi sample`."""
    try:
        sample(cfg["sample"], cfg["latents"], args.checkpoint, args.out, args.device, pca=args.pca,
               features=args.features)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
