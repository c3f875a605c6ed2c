"""The official SiT-ReDi layout (zelaki/ReDi models.py + train_redi.py): a checkpoint of an independently
written reference of that model loads strictly with `redi.sample.load_official` and computes the same
function (SiT-S/2 with r = 3, no learned sigma; and a DiT-S/2 with a learned sigma).

The reference below is written from the official code's math with plain torch modules (not from
redi.models): z (N, r, G, G) is upsampled bilinearly to the latent size and concatenated to its 4
channels, one Conv2d patch embedding reads 4 + r channels, + fixed sin-cos positions, timestep MLP and
label table, adaLN-Zero blocks (timm's Attention / Mlp names: attn.qkv, attn.proj, mlp.fc1, mlp.fc2),
the final adaLN layer and one linear head of p*p*(4 + r) (x2 with a learned sigma), unpatchified.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from redi.errors import ReDiError
from redi.sample import load_official

R = 3  # PCA rank of the official-layout checkpoints here
INPUT = 8  # latent side: a 4x4 token grid at patch 2 (pos_embed of 16 tokens)
CLASSES = 10
S_DEPTH, S_WIDTH, S_HEADS = 12, 384, 6  # the S size of DiT / SiT


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread


# --- the reference: the official model, written out ------------------------------------------------


def official_sincos(dim: int, grid: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of the official code: the first half encodes grid[0] of
    meshgrid(w, h), i.e. the column, the second half the row; each half is [sin, cos]."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, h):
        n, tokens, d = h.shape
        q, k, v = self.qkv(h).reshape(n, tokens, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, tokens, d))


class RefMlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h):
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def modulate(h, shift, scale):
    return h * (1 + scale[:, None]) + shift[:, None]


def layer_norm(h):
    return F.layer_norm(h, h.shape[-1:], eps=1e-6)  # no affine parameters, as the official norms


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn, self.mlp = RefAttention(dim, heads), RefMlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, h, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        h = h + gate_a[:, None] * self.attn(modulate(layer_norm(h), shift_a, scale_a))
        return h + gate_m[:, None] * self.mlp(modulate(layer_norm(h), shift_m, scale_m))


class RefFinal(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(h), shift, scale))


class RefPatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefTimestep(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class RefLabels(nn.Module):
    def __init__(self, classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(classes + 1, dim)  # + the CFG null class

    def forward(self, y):
        return self.embedding_table(y)


class OfficialReDi(nn.Module):
    """SiT(in_channels=4 + r) of the official code in eval mode; forward takes the joint [x ; z] input
    at the latent resolution and returns all head channels (the official forward keeps the first half
    when learn_sigma)."""

    def __init__(self, patch: int, rank: int, learn_sigma: bool, depth: int = S_DEPTH, dim: int = S_WIDTH,
                 heads: int = S_HEADS):
        super().__init__()
        self.patch, self.joint = patch, 4 + rank
        self.out_channels = 2 * self.joint if learn_sigma else self.joint
        self.x_embedder = RefPatchEmbed(self.joint, dim, patch)
        self.t_embedder = RefTimestep(dim)
        self.y_embedder = RefLabels(CLASSES, dim)
        grid = INPUT // patch
        pos = torch.from_numpy(official_sincos(dim, grid)).float()[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))
        self.final_layer = RefFinal(dim, patch * patch * self.out_channels)

    def forward(self, joint, t, y):
        h = self.x_embedder(joint) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        n, g, p, ch = h.shape[0], INPUT // self.patch, self.patch, self.out_channels
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(n, g, g, p, p, ch))
        return h.reshape(n, ch, g * p, g * p)


def official_joint_input(x, z_grid):
    """train_redi.py: z_pca interpolated to the latent size with mode='bilinear' (align_corners False)."""
    return torch.cat([x, F.interpolate(z_grid, size=x.shape[-2:], mode="bilinear")], dim=1)


def reference(patch: int = 2, learn_sigma: bool = False, seed: int = 0) -> OfficialReDi:
    """A reference model with every trainable parameter redrawn (the zero-init heads would give 0)."""
    torch.manual_seed(seed)
    model = OfficialReDi(patch, R, learn_sigma)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def official_keys(depth: int, dim: int, patch: int, joint: int, out: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official SiT-ReDi state dict, by hand."""
    shapes = {
        "pos_embed": (1, (INPUT // patch) ** 2, dim),
        "x_embedder.proj.weight": (dim, joint, patch, patch), "x_embedder.proj.bias": (dim,),
        "t_embedder.mlp.0.weight": (dim, 256), "t_embedder.mlp.0.bias": (dim,),
        "t_embedder.mlp.2.weight": (dim, dim), "t_embedder.mlp.2.bias": (dim,),
        "y_embedder.embedding_table.weight": (CLASSES + 1, dim),
        "final_layer.linear.weight": (patch * patch * out, dim),
        "final_layer.linear.bias": (patch * patch * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * dim, dim),
        "final_layer.adaLN_modulation.1.bias": (2 * dim,),
    }
    for i in range(depth):
        for name, shape in {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), "mlp.fc1": (4 * dim, dim),
                            "mlp.fc2": (dim, 4 * dim), "adaLN_modulation.1": (6 * dim, dim)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = shape[:1]
    return shapes


def random_inputs(family: str, n: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, INPUT, INPUT, generator=gen, dtype=torch.float64)
    z_grid = torch.randn(n, R, INPUT // 2, INPUT // 2, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64)  # SiT: t in [0, 1]
    if family == "DiT":
        t = torch.randint(0, 1000, (n,), generator=gen).double()  # DiT: integer steps
    y = torch.tensor([0, 7, CLASSES])[:n]  # the last one is the CFG null class
    return x, z_grid, t, y


# --- the tests --------------------------------------------------------------------------------------


def test_reference_has_the_official_names_and_shapes():
    ref = OfficialReDi(2, R, learn_sigma=False)
    got = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert got == official_keys(S_DEPTH, S_WIDTH, 2, 4 + R, 4 + R)
    assert got["x_embedder.proj.weight"] == (384, 7, 2, 2) and got["final_layer.linear.weight"] == (28, 384)
    sigma = {k: tuple(v.shape) for k, v in OfficialReDi(2, R, learn_sigma=True).state_dict().items()}
    assert sigma["final_layer.linear.weight"] == (56, 384)  # p*p*2*(4 + r)


@pytest.mark.parametrize("family, learn_sigma", [("SiT", False), ("DiT", True)])
def test_official_checkpoint_loads_strictly_and_computes_the_same(tmp_path, family, learn_sigma):
    ref = reference(learn_sigma=learn_sigma, seed=2)
    path = tmp_path / "ema.pt"
    torch.save(ref.state_dict(), path)
    sm = load_official(path, f"{family}-S/2")
    model = sm.model
    # r inferred from the patch embedding's 4 + r channels; the official concat layout
    assert (model.fusion, model.rep_channels, model.in_channels) == ("concat", R, 4)
    assert model.learn_sigma is learn_sigma and model.rep_size == INPUT
    assert sm.num_classes == CLASSES and sm.objective == ("interpolant" if family == "SiT" else "ddpm")
    assert f"r = {R}" in sm.description
    # strict: the same keys, shapes and values
    ours, theirs = model.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key

    model.double().eval()
    ref.double()
    x, z_grid, t, y = random_inputs(family)
    with torch.no_grad():
        full = ref(official_joint_input(x, z_grid), t, y)  # (N, 4 + r [x2], H, W)
        pred = model(x, t, y, model.lift_representation(z_grid))
    joint = 4 + R
    assert full.abs().max() > 1e-2  # a non-trivial function
    expected_x = torch.cat([full[:, :4], full[:, joint:joint + 4]], 1) if learn_sigma else full[:, :4]
    torch.testing.assert_close(pred.x, expected_x, rtol=0, atol=1e-10)
    torch.testing.assert_close(pred.z, full[:, 4:joint], rtol=0, atol=1e-10)
    # what the official forward returns (the first half of the channels when learn_sigma)
    official = full.chunk(2, dim=1)[0] if learn_sigma else full
    torch.testing.assert_close(torch.cat([pred.x[:, :4], pred.z], 1), official, rtol=0, atol=1e-10)

    # a sampler's state: any joint input at the latent resolution, z not from a lift
    gen = torch.Generator().manual_seed(3)
    state = torch.randn(3, joint, INPUT, INPUT, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        full = ref(state, t, y)
        pred = model(state[:, :4], t, y, state[:, 4:])
    torch.testing.assert_close(pred.z, full[:, 4:joint], rtol=0, atol=1e-10)
    torch.testing.assert_close(pred.x[:, :4], full[:, :4], rtol=0, atol=1e-10)


def test_float32_outputs_agree(tmp_path):
    ref = reference(seed=4)
    torch.save(ref.state_dict(), tmp_path / "ema.pt")
    model = load_official(tmp_path / "ema.pt", "SiT-S/2").model.eval()
    x, z_grid, t, y = (v.float() if v.is_floating_point() else v for v in random_inputs("SiT", seed=5))
    with torch.no_grad():
        full = ref(official_joint_input(x, z_grid), t, y)
        pred = model(x, t, y, model.lift_representation(z_grid))
    torch.testing.assert_close(torch.cat([pred.x, pred.z], 1), full, rtol=1e-4, atol=1e-4)


def test_train_redi_checkpoint_with_namespace_loads_its_ema(tmp_path):
    """train_redi.py saves {"model", "ema", "opt", "args": argparse.Namespace}: the loader admits the
    Namespace (weights_only with it allow-listed), takes "ema", and drops a REPA projector's keys."""
    ema, raw = reference(seed=6).state_dict(), reference(seed=7).state_dict()
    projector = {"projector.0.weight": torch.randn(16, S_WIDTH), "projector.0.bias": torch.randn(16)}
    args = argparse.Namespace(model="SiT-S/2", pca_rank=R, dino_drop_prob=0.2, repa_loss=True)
    torch.save({"model": {**raw, **projector}, "ema": {**ema, **projector}, "opt": {}, "args": args},
               tmp_path / "0400000.pt")
    sm = load_official(tmp_path / "0400000.pt", "SiT-S/2")
    ours = sm.model.state_dict()
    assert not any(key.startswith("projector.") for key in ours)
    for key, value in ema.items():
        assert torch.equal(ours[key], value), key  # the EMA weights, not the raw model's
    assert not torch.equal(ours["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])


class _WritesAFile:
    """A pickled global outside the allow-list: unpickling it would create a directory."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_a_checkpoint_with_other_globals_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "evil.pt"
    torch.save({"ema": reference(seed=8).state_dict(), "args": _WritesAFile(str(marker))}, path)
    with pytest.raises(ReDiError, match="could not be loaded with weights_only=True"):
        load_official(path, "SiT-S/2")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.is_dir()


def test_a_head_that_fits_no_layout_is_a_clear_error(tmp_path):
    state = reference(seed=9).state_dict()
    state["final_layer.linear.weight"] = torch.zeros(4 * 5, S_WIDTH)  # 5 channels per pixel, joint is 7
    state["final_layer.linear.bias"] = torch.zeros(4 * 5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ReDiError, match="the head has 5 channels per pixel, expected 7 or 14"):
        load_official(tmp_path / "bad.pt", "SiT-S/2")
