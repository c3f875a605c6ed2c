"""Stand-in encoders for the offline demo: a small AutoencoderKL and a small timm ViT.

Pretrained SD-VAE and DINOv2 cannot be downloaded offline, so the demo trains small networks of the
same families on its own shards and saves them in the formats the real loaders read (a diffusers
folder, a timm hub-layout folder). encode-latents and extract-features then load them unchanged.
Two stages, so the two trainings run side by side and changing one does not retrain the other.

The ViT's objective (standins.vit_objective): `supervised` (digit classification: features that
mostly restate the label), `mae` (a masked autoencoder, self-supervised like DINOv2) or `random`
(its random init, the negative control). Every objective records a linear probe of its features.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from functools import reduce
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from timm.models import save_for_hf
from torch import nn

from .data.reader import iter_batches
from .io import atomic_dir, read_manifest, write_manifest
from .progress import progress


def load_all_images(manifest_path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image (uint8 NHWC) and label of a small sharded dataset, in index order."""
    n = read_manifest(manifest_path)["num_samples"]
    images, labels = None, torch.empty(n, dtype=torch.long)
    for idx, img, lab in iter_batches(manifest_path, batch_size=256):
        if images is None:
            images = torch.empty((n, *img.shape[1:]), dtype=torch.uint8)
        images[idx], labels[idx] = img, lab
    return images, labels


def build_standin_vae(channels: list[int], latent_channels: int, image_size: int) -> AutoencoderKL:
    """A small SD-VAE-like AutoencoderKL; len(channels) levels -> downsampling 2^(levels-1)."""
    groups = min(32, reduce(math.gcd, channels))
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=list(channels), layers_per_block=1, norm_num_groups=groups,
        sample_size=image_size,
    )


def vit_args(cfg: dict, image_size: int, num_classes: int) -> dict:
    """timm model arguments of the stand-in ViT (also saved with it, for loading)."""
    return dict(img_size=image_size, patch_size=cfg["vit_patch"], embed_dim=cfg["vit_dim"],
                depth=cfg["vit_depth"], num_heads=cfg["vit_heads"], num_classes=num_classes)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches for `steps` steps, reshuffled every epoch."""
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def _optimise(model, loss_of, lr, weight_decay, steps, n, cfg, generator, name) -> dict:
    """AdamW on `loss_of(batch_indices) -> (loss, shown)` for `steps` steps; returns the last `shown`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    bar = progress(_batches(n, cfg["batch_size"], steps, generator), total=steps,
               desc=f"stand-in {name}", unit="step")
    for batch in bar:
        loss, shown = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
    return shown


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(images, train_idx, test_idx, cfg, generator) -> tuple[AutoencoderKL, dict]:
    """Reconstruction MSE + small KL; returns the model and held-out reconstruction metrics."""
    vae = build_standin_vae(cfg["vae_channels"], cfg["vae_latent_channels"], images.shape[1])

    def loss_of(batch):
        x = _to_unit(images[train_idx[batch]])
        posterior = vae.encode(x).latent_dist
        mse = F.mse_loss(vae.decode(posterior.sample()).sample, x)
        return mse + cfg["vae_kl_weight"] * posterior.kl().mean(), {"mse": mse.item()}

    _optimise(vae, loss_of, cfg["vae_lr"], 0.0, cfg["vae_steps"], len(train_idx), cfg, generator, "VAE")
    vae.eval()
    with torch.no_grad():
        means, errors = [], []
        for i in range(0, len(images), 256):
            x = _to_unit(images[i : i + 256])
            mean = vae.encode(x).latent_dist.mean
            means.append(mean)
            errors.append(((vae.decode(mean).sample - x) ** 2).flatten(1).mean(1))
        means, errors = torch.cat(means), torch.cat(errors)
    scaling = float(1.0 / means[train_idx].std())  # unit-variance latents, like SD-VAE's 0.18215
    vae.register_to_config(scaling_factor=scaling)
    test_mse = float(errors[test_idx].mean())
    return vae, {"test_mse": test_mse, "test_psnr_db": 10 * math.log10(4.0 / test_mse),
                 "scaling_factor": scaling, "latent_shape": list(means.shape[1:])}


def _vit_input(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> the ViT's input, normalised as the feature encoder (redi/encoders/vit.py) does."""
    mean = torch.tensor(vit.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(vit.pretrained_cfg["std"]).view(1, 3, 1, 1)
    return ((images.permute(0, 3, 1, 2).float() / 255.0) - mean) / std


def build_standin_vit(cfg: dict, image_size: int, num_classes: int) -> nn.Module:
    """The stand-in ViT at its (seeded) random init."""
    args = vit_args(cfg, image_size, num_classes)
    return timm.create_model("vit_small_patch8_224", pretrained=False, **args)


def train_vit(images, labels, train_idx, test_idx, cfg, num_classes, generator) -> tuple[nn.Module, dict]:
    """Digit classification from the class token (small random shifts as augmentation)."""
    vit = build_standin_vit(cfg, images.shape[1], num_classes)

    def prepare(idx):
        return _vit_input(vit, images[idx])

    def loss_of(batch):
        idx = train_idx[batch]
        shift = [int(s) for s in torch.randint(-2, 3, (2,), generator=generator)]
        loss = F.cross_entropy(vit(torch.roll(prepare(idx), shifts=shift, dims=(2, 3))), labels[idx])
        return loss, {"loss": loss.item()}

    final = _optimise(vit, loss_of, cfg["vit_lr"], 0.05, cfg["vit_steps"], len(train_idx), cfg, generator,
                      "ViT")
    vit.eval()
    with torch.no_grad():
        pred = torch.cat([vit(prepare(test_idx[i : i + 256])).argmax(1)
                          for i in range(0, len(test_idx), 256)])
    accuracy = float((pred == labels[test_idx]).float().mean())
    return vit, {"final_train_loss": final["loss"], "test_accuracy": accuracy}


MAE_MASK_RATIO = 0.75  # MAE's default: 12 of the 4 x 4 patches of a 32 px digit hidden, 4 seen


class MAEDecoder(nn.Module):
    """MAE's light decoder: encoded visible tokens + mask tokens -> the pixels of every patch."""

    def __init__(self, dim: int, num_patches: int, patch: int, width: int = 64, heads: int = 2):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
        self.block = Block(width, heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch * patch * 3)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, num_patches: int) -> torch.Tensor:
        """visible (N, K, dim) encoded tokens at patch positions keep (N, K) -> (N, L, p*p*3) pixels."""
        h = self.mask_token.expand(len(visible), num_patches, -1).clone()
        h.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]), self.embed(visible))
        return self.head(self.norm(self.block(h + self.pos)))


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3) in the ViT's row-major patch order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def mae_encode(vit: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The ViT on the kept patches only (MAE's encoder): (N, K, dim) tokens of the patches in keep."""
    tokens = vit._pos_embed(vit.patch_embed(x))  # prefix (class) token + patches, with positions
    prefix = vit.num_prefix_tokens
    patches = torch.gather(tokens[:, prefix:], 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    h = vit.blocks(vit.norm_pre(torch.cat([tokens[:, :prefix], patches], dim=1)))
    return vit.norm(h)[:, prefix:]


def train_vit_mae(images, train_idx, cfg, num_classes, generator) -> tuple[nn.Module, dict]:
    """A masked autoencoder: the ViT sees 25 % of the patches, a light decoder restores the others'
    pixels (MSE on the hidden patches only, as MAE); its patch tokens are the features."""
    vit = build_standin_vit(cfg, images.shape[1], num_classes)
    patch, num_patches = cfg["vit_patch"], vit.patch_embed.num_patches
    decoder = MAEDecoder(vit.embed_dim, num_patches, patch)
    visible = max(1, round(num_patches * (1 - MAE_MASK_RATIO)))
    losses = []

    def loss_of(batch):
        x = _vit_input(vit, images[train_idx[batch]])
        order = torch.rand(len(x), num_patches, generator=generator).argsort(dim=1)
        keep, hidden = order[:, :visible], order[:, visible:]
        pred = decoder(mae_encode(vit, x, keep), keep, num_patches)
        target = patchify(x, patch)
        picked = hidden.unsqueeze(-1).expand(-1, -1, target.shape[-1])
        loss = F.mse_loss(torch.gather(pred, 1, picked), torch.gather(target, 1, picked))
        losses.append(loss.item())
        return loss, {"loss": loss.item()}

    both = nn.ModuleList([vit, decoder])
    _optimise(both, loss_of, cfg["vit_lr"], 0.05, cfg["vit_steps"], len(train_idx), cfg, generator,
              "ViT (MAE)")
    window = max(1, len(losses) // 10)  # the loss over the first and the last tenth of the steps
    return vit.eval(), {"first_train_loss": sum(losses[:window]) / window,
                        "final_train_loss": sum(losses[-window:]) / window, "mask_ratio": MAE_MASK_RATIO}


@torch.no_grad()
def linear_probe(vit: nn.Module, images, labels, train_idx, test_idx) -> float:
    """Held-out accuracy of a logistic regression on the mean-pooled patch tokens: how much label
    information the features carry (sklearn, standardised features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    vit.eval()
    pooled = torch.cat([vit.forward_features(_vit_input(vit, images[i: i + 256]))[:, vit.num_prefix_tokens:]
                        .mean(1) for i in range(0, len(images), 256)]).double().numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(pooled[train_idx.numpy()], labels[train_idx].numpy())
    return float(probe.score(pooled[test_idx.numpy()], labels[test_idx].numpy()))


def _data_and_split(shard_manifest, cfg: dict):
    """All images and labels, and the seeded train/held-out split both stand-ins share."""
    torch.manual_seed(cfg["seed"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    images, labels = load_all_images(shard_manifest)
    order = torch.randperm(len(images), generator=generator)
    n_test = max(1, int(round(cfg["holdout"] * len(images))))
    return images, labels, order[n_test:], order[:n_test], generator


def train_standin_vae(shard_manifest: str | os.PathLike, out_dir: str | os.PathLike, cfg: dict) -> dict:
    """Train the stand-in VAE and save it under out_dir/vae (a diffusers folder) + manifest.json."""
    start = time.time()
    images, _, train_idx, test_idx, generator = _data_and_split(shard_manifest, cfg)
    vae, report = train_vae(images, train_idx, test_idx, cfg, generator)
    with atomic_dir(Path(out_dir) / "vae") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    return write_manifest(
        Path(out_dir) / "manifest.json", "train-standin-vae", cfg, inputs={"shards": shard_manifest},
        vae=report, num_train=len(train_idx), num_test=len(test_idx),
        wall_time_s=round(time.time() - start, 2),
    )


def train_standin_vit(shard_manifest: str | os.PathLike, out_dir: str | os.PathLike, cfg: dict) -> dict:
    """Train the stand-in ViT and save it under out_dir/vit (a timm hub folder) + manifest.json."""
    start = time.time()
    images, labels, train_idx, test_idx, generator = _data_and_split(shard_manifest, cfg)
    num_classes = read_manifest(shard_manifest)["num_classes"]
    objective = cfg["vit_objective"]
    if objective == "supervised":
        vit, report = train_vit(images, labels, train_idx, test_idx, cfg, num_classes, generator)
    elif objective == "mae":
        vit, report = train_vit_mae(images, train_idx, cfg, num_classes, generator)
    else:  # random: the init alone, the negative control (vit_steps unused)
        vit, report = build_standin_vit(cfg, images.shape[1], num_classes).eval(), {}
    report = {"objective": objective, **report,
              "linear_probe_accuracy": linear_probe(vit, images, labels, train_idx, test_idx)}
    with atomic_dir(Path(out_dir) / "vit") as tmp:
        save_for_hf(vit, tmp, model_args=vit_args(cfg, images.shape[1], num_classes),
                    safe_serialization=True)
    return write_manifest(
        Path(out_dir) / "manifest.json", "train-standin-vit", cfg, inputs={"shards": shard_manifest},
        vit=report, num_train=len(train_idx), num_test=len(test_idx),
        wall_time_s=round(time.time() - start, 2),
    )


def run_vae_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi train-standin-vae`."""
    train_standin_vae(args.shards, args.out, cfg["standins"])


def run_vit_stage(args: argparse.Namespace, cfg: dict) -> None:
    """`redi train-standin-vit`."""
    train_standin_vit(args.shards, args.out, cfg["standins"])
