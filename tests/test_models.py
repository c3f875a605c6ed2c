"""redi.models: DiT/SiT shapes, official checkpoint names, ReDi fusion, embeddings, checkpointing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import redi.models.dit as dit_module
from redi.models import FUSIONS, PATCH_SIZES, SIZES, DiT, Prediction, build_model
from redi.models.embeddings import TimestepEmbedder, sincos_pos_embed_2d


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These models are tiny: intra-op threads only add spin-wait overhead (10-50x slower on a busy
    2-core machine). Restored afterwards so that other test modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


R = 8  # representation channels (PCA components) used throughout
TINY = dict(depth=2, hidden_size=64, num_heads=4, input_size=8, num_classes=10)


def tiny(patch_size: int = 2, **kwargs) -> DiT:
    """A 2-block, 64-wide DiT on an 8x8 latent: fast on CPU. kwargs override TINY."""
    args = {**TINY, **kwargs}
    if args.get("fusion", "none") != "none":
        args.setdefault("rep_channels", R)
    return build_model("S", patch_size, **args)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Re-draw every trainable parameter from N(0, std): DiT's zero-init heads and adaLN would
    otherwise make outputs identically zero and many comparisons trivially true."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * std)
    return model


def inputs(model: DiT, n: int = 2, seed: int = 0, dtype=torch.float32, device="cpu"):
    """(x, t, y, z) for `model`; z is None for fusion none, else the model's z state (N, r, S, S),
    S = model.rep_size (the latent's side for concat, the token grid's otherwise)."""
    size = model.grid_size * model.patch_size
    if device == "meta":
        gen = None
        rand = lambda *s: torch.randn(*s, device="meta", dtype=dtype)  # noqa: E731
    else:
        gen = torch.Generator().manual_seed(seed)
        rand = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    x = rand(n, model.in_channels, size, size)
    t = torch.rand(n, generator=gen, device=device, dtype=dtype) * 1000
    y = torch.randint(0, max(model.num_classes, 1), (n,), generator=gen, device=device)
    y = y if model.num_classes > 0 else None
    z = None if model.fusion == "none" else rand(n, model.rep_channels, model.rep_size, model.rep_size)
    return x, t, y, z


# ------------------------------------------------------------------------------------------ shapes


def test_size_table_matches_papers():
    assert SIZES == {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert PATCH_SIZES == (2, 4, 8)
    assert FUSIONS == ("none", "concat", "merged", "separate")


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("patch", PATCH_SIZES)
@pytest.mark.parametrize("size", list(SIZES))
def test_shapes_every_size_on_meta(size, patch, fusion):
    """Full-size models at 256 px (32x32 latent) on the meta device: parameter and output shapes."""
    depth, width, heads = SIZES[size]
    with torch.device("meta"):
        model = build_model(size, patch, fusion=fusion, rep_channels=R if fusion != "none" else 0)
    grid, tokens = 32 // patch, (32 // patch) ** 2
    joint = 4 + R if fusion == "concat" else 4  # channels of one patch (and of the head, per sigma half)
    assert len(model.blocks) == depth
    assert model.blocks[0].attn.num_heads == heads
    assert model.blocks[0].attn.qkv.weight.shape == (3 * width, width)
    assert model.blocks[0].mlp.fc1.weight.shape == (4 * width, width)
    assert model.x_embedder.proj.weight.shape == (width, joint, patch, patch)
    assert model.pos_embed.shape == (1, tokens, width)
    assert model.final_layer.linear.weight.shape == (patch * patch * 2 * joint, width)
    if fusion in ("none", "concat"):
        assert not hasattr(model, "z_embedder") and not hasattr(model, "final_layer_z")
    else:
        assert model.z_embedder.weight.shape == (width, R)
        assert model.final_layer_z.linear.weight.shape == (R, width)
    assert hasattr(model, "modality_embed") == (fusion == "separate")
    assert model.rep_size == (32 if fusion == "concat" else grid)

    x, t, y, z = inputs(model, n=3, device="meta")
    pred = model(x, t, y, z)
    assert isinstance(pred, Prediction) and len(pred) == 2
    assert pred.x.shape == (3, 8, 32, 32)
    if fusion == "none":
        assert pred.z is None
    else:  # concat: z at the latent resolution; merged / separate: on the token grid
        assert pred.z.shape == (3, R, model.rep_size, model.rep_size)


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_shapes_real_small_s(patch, fusion, learn_sigma):
    """A real (narrow, 2-block) model on a 16x16 latent with odd channel counts: finite values, shapes."""
    model = tiny(patch, input_size=16, in_channels=3, num_classes=5, learn_sigma=learn_sigma,
                 fusion=fusion, rep_channels=5 if fusion != "none" else 0)
    randomize(model, std=0.05).eval()
    x, t, y, z = inputs(model, n=2)
    with torch.no_grad():
        pred = model(x, t, y, z)
    side = 16 if fusion == "concat" else 16 // patch
    assert model.rep_size == side
    assert pred.x.shape == (2, 6 if learn_sigma else 3, 16, 16)
    assert torch.isfinite(pred.x).all()
    if fusion == "none":
        assert pred.z is None
    else:
        assert pred.z.shape == (2, 5, side, side)
        assert torch.isfinite(pred.z).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_adaln_zero_init(fusion):
    """At init every block is the identity and every head outputs exactly zero (adaLN-Zero)."""
    model = tiny(fusion=fusion).eval()
    separate_z_head = fusion in ("merged", "separate")  # none / concat: one head for everything
    assert hasattr(model, "final_layer_z") == separate_z_head
    heads = [model.final_layer] + ([model.final_layer_z] if separate_z_head else [])
    for layer in [*model.blocks, *heads]:
        assert not layer.adaLN_modulation[-1].weight.any() and not layer.adaLN_modulation[-1].bias.any()
    for head in heads:
        assert not head.linear.weight.any() and not head.linear.bias.any()
    assert model.x_embedder.proj.weight.any() and model.t_embedder.mlp[0].weight.any()
    x, t, y, z = inputs(model)
    with torch.no_grad():
        h, c = model.embed(x, z), model.condition(t, y)
        assert torch.equal(model.blocks[0](h, c), h)
        pred = model(x, t, y, z)
    assert not pred.x.any()
    assert pred.z is None if fusion == "none" else not pred.z.any()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        build_model("M", 2)
    with pytest.raises(ValueError):
        build_model("S", 3)
    with pytest.raises(ValueError, match="fusion must be one of"):
        tiny(fusion="channels")
    with pytest.raises(ValueError, match="fusion='concat' needs rep_channels >= 1"):
        tiny(fusion="concat", rep_channels=0)
    with pytest.raises(ValueError, match="fusion='merged' needs rep_channels >= 1"):
        tiny(fusion="merged", rep_channels=0)
    concat = tiny(fusion="concat")
    x, t, y, _ = inputs(concat)
    with pytest.raises(ValueError, match=r"z must have shape \(2, 8, 8, 8\)"):  # z on the token grid
        concat(x, t, y, torch.zeros(2, R, concat.grid_size, concat.grid_size))


# ---------------------------------------------------------------------- official checkpoint names


def official_dit_shapes(depth: int, width: int, patch: int, input_size: int = 32, in_channels: int = 4,
                        num_classes: int = 1000, learn_sigma: bool = True) -> dict[str, tuple[int, ...]]:
    """Key -> shape of facebookresearch/DiT models.py (and willisma/SiT, same names), written by hand."""
    out_channels = 2 * in_channels if learn_sigma else in_channels
    tokens = (input_size // patch) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, width),
        "x_embedder.proj.weight": (width, in_channels, patch, patch),
        "x_embedder.proj.bias": (width,),
        "t_embedder.mlp.0.weight": (width, 256),
        "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width),
        "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (num_classes + 1, width),  # + the CFG null class
        "final_layer.linear.weight": (patch * patch * out_channels, width),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * width, width),
        "final_layer.adaLN_modulation.1.bias": (2 * width,),
    }
    for n in range(depth):
        shapes.update({
            f"blocks.{n}.attn.qkv.weight": (3 * width, width),
            f"blocks.{n}.attn.qkv.bias": (3 * width,),
            f"blocks.{n}.attn.proj.weight": (width, width),
            f"blocks.{n}.attn.proj.bias": (width,),
            f"blocks.{n}.mlp.fc1.weight": (4 * width, width),
            f"blocks.{n}.mlp.fc1.bias": (4 * width,),
            f"blocks.{n}.mlp.fc2.weight": (width, 4 * width),
            f"blocks.{n}.mlp.fc2.bias": (width,),
            f"blocks.{n}.adaLN_modulation.1.weight": (6 * width, width),
            f"blocks.{n}.adaLN_modulation.1.bias": (6 * width,),
        })
    return shapes


def test_official_dit_xl2_state_dict_names_and_shapes():
    expected = official_dit_shapes(depth=28, width=1152, patch=2)
    # spot-check the hand-written table against the published checkpoint's well-known shapes
    assert expected["y_embedder.embedding_table.weight"] == (1001, 1152)
    assert expected["pos_embed"] == (1, 256, 1152)
    assert expected["final_layer.linear.weight"] == (32, 1152)
    assert len(expected) == 12 + 28 * 10
    with torch.device("meta"):
        model = build_model("XL", 2, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000)
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert got == expected


def test_official_names_are_all_that_matters():
    """A random 'official' S/2 state dict loads strictly; two differently-initialised models that load
    it compute the same function."""
    expected = official_dit_shapes(depth=12, width=384, patch=2, input_size=8, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    official = {key: torch.randn(shape, generator=gen) * 0.05 for key, shape in expected.items()}
    torch.manual_seed(0)
    first = build_model("S", 2, input_size=8, num_classes=10)
    torch.manual_seed(1)
    second = build_model("S", 2, input_size=8, num_classes=10)
    first.load_state_dict(official, strict=True)
    second.load_state_dict(official, strict=True)
    first.eval()
    second.eval()
    x, t, y, _ = inputs(first, n=2)
    with torch.no_grad():
        a, b = first(x, t, y), second(x, t, y)
    assert a.x.abs().max() > 0  # not the trivial all-zero output of the zero-initialised head
    assert torch.equal(a.x, b.x)

    # a fusion model takes the same dict, only its extra modules are missing
    merged = build_model("S", 2, input_size=8, num_classes=10, fusion="merged", rep_channels=R)
    result = merged.load_state_dict(official, strict=False)
    assert result.unexpected_keys == []
    assert {key.split(".")[0] for key in result.missing_keys} == {"z_embedder", "final_layer_z"}


def reference_dit_forward(sd: dict, x, t, y, *, depth: int, heads: int, patch: int, out_channels: int):
    """facebookresearch/DiT's forward, written out functionally on an official-style state dict."""
    import torch.nn.functional as F

    def linear(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    n, tokens, d = h.shape
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(h.dtype)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    for i in range(depth):
        b = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(
            F.silu(c), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(norm(h), shift_msa, scale_msa)
        q, k, v = linear(a, f"{b}.attn.qkv").reshape(n, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(dim=-1)
        a = linear((attn @ v).transpose(1, 2).reshape(n, tokens, d), f"{b}.attn.proj")
        h = h + gate_msa.unsqueeze(1) * a
        m = modulate(norm(h), shift_mlp, scale_mlp)
        m = linear(F.gelu(linear(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        h = h + gate_mlp.unsqueeze(1) * m
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(modulate(norm(h), shift, scale), "final_layer.linear")
    g = int(tokens**0.5)
    h = h.reshape(n, g, g, patch, patch, out_channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, out_channels, g * patch, g * patch)


@pytest.mark.parametrize("patch", [2, 4])
def test_baseline_matches_reference_dit_forward(patch):
    """Same names and the same computation: shift/scale/gate order, tanh GELU, head layout, ..."""
    model = randomize(tiny(patch_size=patch, input_size=16, depth=3), seed=13).double().eval()
    x, t, y, _ = inputs(model, n=3, dtype=torch.float64)
    sd = model.state_dict()
    with torch.no_grad():
        expected = reference_dit_forward(sd, x, t, y, depth=3, heads=4, patch=patch, out_channels=8)
        got = model(x, t, y).x
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------- ReDi fusion


def test_merged_with_zero_z_and_zero_wz_equals_baseline():
    torch.manual_seed(0)
    base = randomize(tiny(fusion="none"), seed=3).double().eval()
    merged = tiny(fusion="merged")
    result = merged.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert {key.split(".")[0] for key in result.missing_keys} == {"z_embedder", "final_layer_z"}
    randomize(merged.final_layer_z, seed=4)
    merged.double().eval()
    with torch.no_grad():
        merged.z_embedder.weight.zero_()
        merged.z_embedder.bias.zero_()
    x, t, y, _ = inputs(base, dtype=torch.float64)
    z = torch.zeros(2, R, base.grid_size, base.grid_size, dtype=torch.float64)
    with torch.no_grad():
        expected = base(x, t, y).x
        got = merged(x, t, y, z)
        got_none = merged(x, t, y, None)  # z=None means the dropped representation, z_t = 0
    assert expected.abs().max() > 1e-3
    assert torch.equal(got.x, expected)
    assert torch.equal(got_none.x, expected)
    assert got.z.abs().max() > 0

    # and the check can fail: a non-zero W_z with a non-zero z moves the output
    with torch.no_grad():
        merged.z_embedder.weight.normal_(0, 0.1)
        moved = merged(x, t, y, torch.randn_like(z)).x
    assert not torch.allclose(moved, expected)


@pytest.mark.parametrize("fusion", ["merged", "separate"])
def test_gradient_flow_into_both_heads(fusion):
    model = randomize(tiny(fusion=fusion), seed=5).train()
    x, t, y, z = inputs(model)

    model.zero_grad()
    pred = model(x, t, y, z)
    pred.z.square().mean().backward()
    for name in ["z_embedder.weight", "z_embedder.bias", "final_layer_z.linear.weight",
                 "final_layer_z.adaLN_modulation.1.weight", "blocks.0.attn.qkv.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name
    if fusion == "separate":
        assert model.modality_embed.grad[1].abs().max() > 0
    # the x head plays no part in eps_z
    assert model.final_layer.linear.weight.grad is None or not model.final_layer.linear.weight.grad.any()

    model.zero_grad()
    pred = model(x, t, y, z)
    pred.x.square().mean().backward()
    for name in ["x_embedder.proj.weight", "x_embedder.proj.bias", "final_layer.linear.weight",
                 "final_layer.adaLN_modulation.1.weight", "t_embedder.mlp.0.weight",
                 "y_embedder.embedding_table.weight"]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name
    grad_z_head = model.final_layer_z.linear.weight.grad
    assert grad_z_head is None or not grad_z_head.any()
    # the fixed position embedding is not trained
    assert not model.pos_embed.requires_grad and model.pos_embed.grad is None


def test_fusion_none_has_no_representation_modules():
    model = tiny(fusion="none")
    assert not hasattr(model, "z_embedder")
    assert not hasattr(model, "final_layer_z")
    assert not any(key.startswith(("z_embedder", "final_layer_z", "modality_embed"))
                   for key in model.state_dict())
    x, t, y, _ = inputs(model)
    assert model(x, t, y).z is None


def block_input_lengths(model: DiT, *args) -> list[int]:
    lengths: list[int] = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        handle.remove()
    return lengths


@pytest.mark.parametrize("fusion, factor", [("none", 1), ("concat", 1), ("merged", 1), ("separate", 2)])
def test_sequence_length(fusion, factor):
    model = tiny(fusion=fusion, input_size=16).eval()  # 8x8 = 64 tokens
    assert block_input_lengths(model, *inputs(model)) == [factor * 64]


def test_separate_z_is_separate_tokens():
    model = randomize(tiny(fusion="separate"), seed=6).eval()
    x, t, y, z = inputs(model)
    z2 = z + torch.randn_like(z)
    with torch.no_grad():
        a, b = model(x, t, y, z), model(x, t, y, z2)
    assert not torch.allclose(a.z, b.z)
    assert not torch.allclose(a.x, b.x)  # through attention

    # without attention (zero output projection) no token sees another: eps_x no longer depends on z,
    # which it would if z were summed onto the x tokens as in the merged variant
    merged = randomize(tiny(fusion="merged"), seed=6).eval()
    for m in (model, merged):
        with torch.no_grad():
            for block in m.blocks:
                block.attn.proj.weight.zero_()
                block.attn.proj.bias.zero_()
    with torch.no_grad():
        a, b = model(x, t, y, z), model(x, t, y, z2)
        ma, mb = merged(x, t, y, z), merged(x, t, y, z2)
    assert torch.equal(a.x, b.x)
    assert not torch.allclose(a.z, b.z)
    assert not torch.allclose(ma.x, mb.x)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_input_tokens(fusion):
    """merged: x W_x + pos + z W_z; separate: [x W_x + pos + m_x ; z W_z + pos + m_z] (each half with the
    position embedding and its own modality embedding); concat: one patch embedding of [x ; z] along
    the channels, i.e. x W[:, :C] + z W[:, C:] + b + pos."""
    model = randomize(tiny(fusion=fusion), seed=12).eval()
    x, _, _, z = inputs(model)
    with torch.no_grad():
        h = model.embed(x, z)
        if fusion == "concat":
            w, b, p = model.x_embedder.proj.weight, model.x_embedder.proj.bias, model.patch_size
            assert w.shape[1] == 4 + R
            hxz = torch.nn.functional.conv2d(x, w[:, :4], b, stride=p)
            hxz = hxz + torch.nn.functional.conv2d(z, w[:, 4:], None, stride=p)
            torch.testing.assert_close(h, hxz.flatten(2).transpose(1, 2) + model.pos_embed)
            assert not torch.allclose(h, model.embed(x, torch.zeros_like(z)))  # z moves the tokens
            return
        hx = model.x_embedder.proj(x).flatten(2).transpose(1, 2) + model.pos_embed
        if fusion == "none":
            torch.testing.assert_close(h, hx)
            return
        hz = z.flatten(2).transpose(1, 2) @ model.z_embedder.weight.T + model.z_embedder.bias
        if fusion == "merged":
            torch.testing.assert_close(h, hx + hz)
        else:
            assert model.modality_embed.shape == (2, 64)
            assert not torch.allclose(model.modality_embed[0], model.modality_embed[1])
            torch.testing.assert_close(h, torch.cat([hx + model.modality_embed[0],
                                                     hz + model.pos_embed + model.modality_embed[1]], 1))


@pytest.mark.parametrize("fusion", ["merged", "concat"])
def test_token_order_of_x_and_z_agree(fusion):
    """z[:, :, i, j] (merged) or z's pixels of patch (i, j) (concat) land on the same token as the
    latent's patch (i, j): token i * G + j."""
    model = randomize(tiny(patch_size=2, fusion=fusion, input_size=8), seed=7).eval()
    g, s = model.grid_size, model.rep_size // model.grid_size  # s: z pixels per token side
    x = torch.zeros(1, 4, 8, 8)
    z = torch.zeros(1, R, model.rep_size, model.rep_size)
    with torch.no_grad():
        base = model.embed(x, z)
        for i, j in [(0, 1), (2, 3), (3, 0)]:
            x2 = x.clone()
            x2[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = 1.0
            z2 = z.clone()
            z2[:, :, s * i:s * i + s, s * j:s * j + s] = 1.0
            changed_x = (model.embed(x2, z) - base).abs().amax(dim=(0, 2)).nonzero().flatten().tolist()
            changed_z = (model.embed(x, z2) - base).abs().amax(dim=(0, 2)).nonzero().flatten().tolist()
            assert changed_x == [i * g + j]
            assert changed_z == [i * g + j]


# ------------------------------------------------------------------------- concat (official layout)


def np_bilinear_upsample(z: np.ndarray, size: int) -> np.ndarray:
    """(N, C, G, G) -> (N, C, size, size): bilinear with half-pixel centres (align_corners=False):
    output pixel i samples the input at (i + 0.5) * G / size - 0.5, clamped to [0, G - 1]."""
    g = z.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, g - 1)
    w = src - lo
    rows = z[:, :, lo, :] * (1 - w)[:, None] + z[:, :, hi, :] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., hi] * w


@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_concat_lifts_z_bilinearly_to_the_latent(patch):
    model = tiny(patch_size=patch, input_size=16, fusion="concat")
    g = 16 // patch
    assert (model.grid_size, model.rep_size) == (g, 16)
    z = torch.randn(2, R, g, g, generator=torch.Generator().manual_seed(30), dtype=torch.float64)
    lifted = model.lift_representation(z)
    assert lifted.shape == (2, R, 16, 16)
    np.testing.assert_allclose(lifted.numpy(), np_bilinear_upsample(z.numpy(), 16), rtol=0, atol=1e-12)
    # pinned by hand for patch 2 (factor 2): pixel 1 = 3/4 of cell 0 + 1/4 of cell 1, pixel 0 = cell 0
    if patch == 2:
        z00, z01 = z[0, 0, 0, 0].item(), z[0, 0, 0, 1].item()
        assert lifted[0, 0, 0, 1].item() == pytest.approx(0.75 * z00 + 0.25 * z01)
        assert lifted[0, 0, 0, 0].item() == pytest.approx(z[0, 0, 0, 0].item())
    assert torch.equal(model.lift_representation(lifted), lifted)  # already at the latent resolution
    merged = tiny(patch_size=patch, input_size=16, fusion="merged")
    assert torch.equal(merged.lift_representation(z), z)  # other fusions keep z on the token grid


@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_concat_representation_on_grid_is_the_patch_mean(patch):
    model = tiny(patch_size=patch, input_size=16, fusion="concat")
    g = model.grid_size
    z = torch.randn(3, R, 16, 16, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    expected = z.numpy().reshape(3, R, g, patch, g, patch).mean(axis=(3, 5))
    got = model.representation_on_grid(z)
    assert got.shape == (3, R, g, g)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    # a map constant on each patch survives the round trip grid -> latent -> grid only where the
    # bilinear lift is exact: a constant map
    const = torch.full((1, R, g, g), 0.7, dtype=torch.float64)
    torch.testing.assert_close(model.representation_on_grid(model.lift_representation(const)), const)
    small = torch.randn(1, R, g, g, dtype=torch.float64)
    assert torch.equal(model.representation_on_grid(small), small)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_concat_head_layout(learn_sigma):
    """One head of p*p*(C + r) (x2) values per token: unpatchified channels [eps_x, eps_z (, var_x,
    var_z)]; Prediction.x = [eps_x (, var_x)], Prediction.z = eps_z at the latent resolution."""
    model = randomize(tiny(fusion="concat", learn_sigma=learn_sigma), seed=32).eval()
    joint = 4 + R
    assert model.out_channels == (2 * joint if learn_sigma else joint)
    assert model.final_layer.linear.weight.shape == (4 * model.out_channels, 64)
    captured = []
    handle = model.final_layer.register_forward_hook(lambda _m, _a, out: captured.append(out))
    x, t, y, z = inputs(model, n=3)
    with torch.no_grad():
        pred = model(x, t, y, z)
    handle.remove()
    tokens = captured[0]  # (N, T, p*p*out): unpatchify by hand
    g, p, c = model.grid_size, model.patch_size, model.out_channels
    full = torch.empty(3, c, g * p, g * p)
    for i in range(g):
        for j in range(g):
            block = tokens[:, i * g + j].reshape(3, p, p, c)  # (row in patch, col in patch, channel)
            full[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = block.permute(0, 3, 1, 2)
    expected_x = torch.cat([full[:, :4], full[:, joint:joint + 4]], 1) if learn_sigma else full[:, :4]
    torch.testing.assert_close(pred.x, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(pred.z, full[:, 4:joint], rtol=0, atol=0)
    assert pred.z.abs().max() > 0 and pred.x.abs().max() > 0
    with torch.no_grad():  # z = None is the dropped representation, z = 0
        dropped, zero = model(x, t, y, None), model(x, t, y, torch.zeros_like(z))
    torch.testing.assert_close(dropped.x, zero.x, rtol=0, atol=0)


def test_concat_gradients_split_by_head_rows():
    """loss on eps_z trains only the z rows of the one head (and reads z's input channels); loss on
    eps_x only the x rows: row k of the head is channel k % (C + r) of a patch pixel."""
    model = randomize(tiny(fusion="concat", learn_sigma=False), seed=33).train()
    x, t, y, z = inputs(model)
    joint = 4 + R
    channel_of_row = torch.arange(model.final_layer.linear.weight.shape[0]) % joint
    is_z_row = channel_of_row >= 4
    for part, rows in (("z", is_z_row), ("x", ~is_z_row)):
        model.zero_grad()
        getattr(model(x, t, y, z), part).square().mean().backward()
        grad = model.final_layer.linear.weight.grad.abs().sum(1)
        assert (grad[rows] > 0).all() and not grad[~rows].any(), part
        assert model.x_embedder.proj.weight.grad[:, 4:].abs().sum() > 0  # z's channels are read


# ------------------------------------------------------------------------------- labels / uncond


def test_unconditional_model():
    model = randomize(tiny(num_classes=0), seed=8).eval()
    assert not hasattr(model, "y_embedder")
    assert not any("y_embedder" in key for key in model.state_dict())
    x, t, y, _ = inputs(model)
    assert y is None
    with torch.no_grad():
        assert model(x, t, None).x.shape == (2, 8, 8, 8)


def test_conditional_model_needs_labels():
    model = tiny(num_classes=10)
    x, t, _, _ = inputs(model)
    with pytest.raises(ValueError):
        model(x, t, None)


def test_label_dropout():
    # the null class exists only where labels can be dropped, as in DiT (checkpoints have 1001 rows)
    assert tiny(num_classes=10, class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape[0] == 10
    model = randomize(tiny(num_classes=10, class_dropout_prob=1.0), seed=9)
    table = model.y_embedder.embedding_table.weight
    assert table.shape[0] == 11  # + the null class
    t = torch.tensor([10.0, 500.0, 999.0])
    y = torch.tensor([0, 3, 9])
    with torch.no_grad():
        t_emb = model.t_embedder(t)
        model.train()
        assert torch.equal(model.condition(t, y), t_emb + table[10].expand(3, -1))
        model.eval()
        assert torch.equal(model.condition(t, y), t_emb + table[y])
        # and the whole forward: in train mode, every label gives the null-class output
        model.train()
        x = torch.randn(3, 4, 8, 8)
        assert torch.equal(model(x, t, y).x, model(x, t, torch.tensor([1, 1, 1])).x)
        model.eval()
        assert not torch.allclose(model(x, t, y).x, model(x, t, torch.tensor([1, 1, 1])).x)


# ------------------------------------------------------------------------------------ embeddings


def reference_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def reference_2d(dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/DiT get_2d_sincos_pos_embed, reimplemented."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # grid[0]: the width coordinate
    return np.concatenate([reference_1d(dim // 2, grid[0]), reference_1d(dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim, grid", [(8, 3), (64, 4), (384, 16), (1152, 16)])
def test_sincos_pos_embed_matches_dit(dim, grid):
    got = sincos_pos_embed_2d(dim, grid)
    expected = reference_2d(dim, grid)
    assert got.shape == (grid * grid, dim)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # pinned by hand: token k is (row k // G, column k % G); channel 0 is sin(column), D/4 cos(column),
    # D/2 sin(row)
    k = grid + 2 if grid > 2 else 1
    row, col = divmod(k, grid)
    assert got[k, 0] == pytest.approx(math.sin(col))
    assert got[k, dim // 4] == pytest.approx(math.cos(col))
    assert got[k, dim // 2] == pytest.approx(math.sin(row))
    assert got[k, 3 * dim // 4] == pytest.approx(math.cos(row))


def test_model_pos_embed_is_the_sincos_table():
    model = tiny(input_size=12, patch_size=2)  # 6x6 grid, width 64
    np.testing.assert_allclose(model.pos_embed[0].numpy(), reference_2d(64, 6), rtol=0, atol=1e-6)
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("dim", [256, 64, 9])
def test_timestep_embedding(dim):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    got = TimestepEmbedder.timestep_embedding(t, dim)
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    args = t.numpy().astype(np.float64)[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        expected = np.concatenate([expected, np.zeros((4, 1))], axis=1)
    assert got.shape == (4, dim)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-4)  # float32 args up to ~1000


def test_timestep_embedder_applies_mlp_to_frequencies():
    emb = TimestepEmbedder(32, frequency_embedding_size=16)
    t = torch.tensor([3.0, 250.0])
    with torch.no_grad():
        expected = emb.mlp(TimestepEmbedder.timestep_embedding(t, 16))
        assert torch.equal(emb(t), expected)


# ----------------------------------------------------------------------- checkpointing / layout


def test_gradient_checkpointing_is_exact(monkeypatch):
    calls = []
    original = dit_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dit_module, "checkpoint", counting_checkpoint)
    plain = randomize(tiny(fusion="separate"), seed=10)
    plain = plain.double().train()
    ckpt = tiny(fusion="separate", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ckpt = ckpt.double().train()
    x, t, y, z = inputs(plain, dtype=torch.float64)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same label dropout draw
        pred = model(x, t, y, z)
        (pred.x.square().mean() + pred.z.square().mean()).backward()
        results.append((pred, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == 2  # one per block, only for the checkpointed model
    (pa, ga), (pb, gb) = results
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert set(ga) == set(gb) and len(ga) > 20
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-12, msg=name)

    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x, t, y, z)
    assert calls == []  # no checkpointing at inference


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("patch", PATCH_SIZES)
def test_unpatchify_layout(patch, learn_sigma):
    model = tiny(patch_size=patch, input_size=16, learn_sigma=learn_sigma)
    g, c = model.grid_size, model.out_channels
    tokens = torch.randn(2, g * g, patch * patch * c)
    expected = torch.empty(2, c, g * patch, g * patch)
    for i in range(g):
        for j in range(g):
            block = tokens[:, i * g + j].reshape(2, patch, patch, c)  # (row in patch, col in patch, channel)
            expected[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = block.permute(0, 3, 1, 2)
    assert torch.equal(model.unpatchify(tokens), expected)
