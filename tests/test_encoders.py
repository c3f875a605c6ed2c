"""redi.encoders: the real SD-VAE / DINOv2 architectures (random weights) through load_encoder."""

import pytest
import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from timm.models import save_for_hf

from redi.encoders import ENCODERS, LatentEncoder, PatchFeatureEncoder, load_encoder
from redi.errors import ReDiError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SMALL_VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def uint8_images(n: int, size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)


def assert_same_state(expected: dict, got: dict) -> None:
    assert set(expected) == set(got)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key].cpu(), value.cpu()), key


# ---------------------------------------------------------------------------------------- SD-VAE


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
        scaling_factor=0.18215, sample_size=256,
    ).eval()
    folder = tmp_path_factory.mktemp("sd-vae")
    vae.save_pretrained(folder)
    return vae, folder, load_encoder("sd-vae", str(folder))


def test_sd_vae_loads_saved_weights(sd_vae):
    vae, _, encoder = sd_vae
    assert isinstance(encoder, LatentEncoder)
    assert encoder.scaling_factor == pytest.approx(0.18215)
    assert encoder.downsample == 8
    assert encoder.latent_channels == 4
    assert not encoder.vae.training and not any(m.training for m in encoder.vae.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    assert_same_state(vae.state_dict(), encoder.vae.state_dict())


def test_sd_vae_posterior(sd_vae):
    vae, _, encoder = sd_vae
    images = uint8_images(2, 64, seed=1)
    mean, std = encoder(images)
    assert mean.shape == std.shape == (2, 4, 8, 8)
    assert mean.dtype == std.dtype == torch.float32
    assert torch.all(std > 0)
    with torch.no_grad():
        ref = vae.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1.0).latent_dist
    torch.testing.assert_close(mean, ref.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, ref.std, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- DINOv2


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=224).eval()
    path = tmp_path_factory.mktemp("dinov2") / "model.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path, load_encoder("dinov2-vitb14-reg4", str(path), grid=16)


def dinov2_reference(model, images: torch.Tensor) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    with torch.no_grad():
        return model.forward_features(x)[:, 5:]


def test_dinov2_loads_saved_weights(dinov2):
    model, _, encoder = dinov2
    assert isinstance(encoder, PatchFeatureEncoder)
    assert encoder.dim == 768
    assert encoder.grid == (16, 16) and encoder.native_grid == (16, 16)
    assert encoder.input_size == (224, 224)
    assert encoder.model.num_prefix_tokens == 5
    assert not any(m.training for m in encoder.model.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    torch.testing.assert_close(encoder.mean, IMAGENET_MEAN, rtol=0, atol=1e-7)
    torch.testing.assert_close(encoder.std, IMAGENET_STD, rtol=0, atol=1e-7)
    assert_same_state(model.state_dict(), encoder.model.state_dict())


def test_dinov2_patch_tokens(dinov2):
    model, _, encoder = dinov2
    images = uint8_images(2, 32, seed=2)
    tokens = encoder(images)
    assert tokens.shape == (2, 256, 768) and tokens.dtype == torch.float32
    ref = dinov2_reference(model, images)
    assert ref.shape == (2, 256, 768)
    torch.testing.assert_close(tokens, ref, rtol=1e-5, atol=1e-5)

    coarse = PatchFeatureEncoder(encoder.model, grid=8)  # grid via load_encoder: see the small ViT
    assert coarse.grid == (8, 8)
    pooled = coarse(images)
    assert pooled.shape == (2, 64, 768)
    fmap = ref.transpose(1, 2).reshape(2, 768, 16, 16)
    expected = F.adaptive_avg_pool2d(fmap, 8).flatten(2).transpose(1, 2)
    # a 16 -> 8 adaptive pool is the mean of each 2x2 block
    blocks = fmap.reshape(2, 768, 8, 2, 8, 2).mean(dim=(3, 5)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(expected, blocks, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- small timm ViT


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch8_224", pretrained=False, **SMALL_VIT_ARGS).eval()
    folder = tmp_path_factory.mktemp("vit")
    save_for_hf(model, str(folder), model_args=SMALL_VIT_ARGS, safe_serialization=True)
    return model, folder


def test_standin_vit_from_folder(small_vit):
    model, folder = small_vit
    encoder = load_encoder("standin-vit", str(folder))
    assert isinstance(encoder, PatchFeatureEncoder)
    assert encoder.dim == 64 and encoder.grid == (4, 4) and encoder.input_size == (32, 32)
    assert_same_state(model.state_dict(), encoder.model.state_dict())
    images = uint8_images(3, 32, seed=3)
    tokens = encoder(images)
    assert tokens.shape == (3, 16, 64)
    x = (images.permute(0, 3, 1, 2).float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        ref = model.forward_features(x)[:, 1:]  # no resize at the native size; drop the cls token
    torch.testing.assert_close(tokens, ref, rtol=1e-5, atol=1e-5)


def test_standin_vit_resizes_input_and_upsamples_grid(small_vit):
    model, folder = small_vit
    encoder = load_encoder("standin-vit", str(folder), grid=8)
    images = uint8_images(2, 40, seed=4)
    tokens = encoder(images)
    assert tokens.shape == (2, 64, 64)
    x = (images.permute(0, 3, 1, 2).float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        fmap = model.forward_features(x)[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)
    ref = F.interpolate(fmap, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["sd-vae", "standin-vit", "dinov2-vitb14-reg4"])
def test_missing_local_weights_named(tmp_path, name):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(ReDiError, match="not found") as err:
        load_encoder(name, str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(ReDiError) as err:
        load_encoder(name, "relative/dir/model.safetensors")
    assert "relative/dir/model.safetensors" in str(err.value)


def test_unknown_encoder_lists_registered_names():
    with pytest.raises(ReDiError, match="unknown encoder 'clip'") as err:
        load_encoder("clip", "/tmp")
    for name in ENCODERS:
        assert name in str(err.value)
    assert set(ENCODERS) >= {"sd-vae", "standin-vae", "dinov2-vitb14-reg4", "standin-vit"}


@pytest.mark.parametrize("name, key", [("standin-vae", "latents"), ("standin-vit", "features")])
def test_standin_without_weights_names_the_key_to_set(name, key, tmp_path):
    with pytest.raises(ReDiError, match=f"needs weights: set {key}.encoder.weights to a folder"):
        load_encoder(name, None)
    with pytest.raises(ReDiError, match=f"no such local path; set {key}.encoder.weights"):
        load_encoder(name, str(tmp_path / "missing"))
    with pytest.raises(ReDiError, match=rf"offline\? set {key}.encoder.weights to a local path"):
        load_encoder("sd-vae" if key == "latents" else "dinov2-vitb14-reg4", "nobody/no-such-model")


def test_single_file_without_architecture_is_a_redi_error(dinov2):
    _, path, _ = dinov2
    with pytest.raises(ReDiError, match="standin-vit") as err:
        load_encoder("standin-vit", str(path))
    assert str(path) in str(err.value)
    assert isinstance(err.value.__cause__, ValueError)


@pytest.mark.parametrize(
    "name, hub_id",
    [("sd-vae", None), ("dinov2-vitb14-reg4", None),
     ("sd-vae", "nobody-here/no-such-vae"), ("standin-vit", "nobody-here/no-such-vit")],
)
def test_hub_id_offline_is_a_redi_error(monkeypatch, name, hub_id):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected_id = hub_id or ENCODERS[name].default_weights
    with pytest.raises(ReDiError) as err:
        load_encoder(name, hub_id)
    message = str(err.value)
    assert expected_id in message
    assert "hub id" in message and "\n" not in message
    assert err.value.__cause__ is not None
