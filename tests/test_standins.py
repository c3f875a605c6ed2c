"""train-standin-vae / -vit: the demo's stand-in encoders train, save in the real formats and load back."""

import math

import pytest
import torch
from safetensors.torch import load_file

from redi.config import validate_config
from redi.data.demo import write_demo_folder
from redi.data.shard import write_shards
from redi.encoders import load_encoder
from redi.standins import train_standin_vae, train_standin_vit

TINY = dict(batch_size=8, vae_steps=3, vae_channels=[8, 16], vit_steps=3, vit_dim=16, vit_depth=1,
            vit_heads=2, vit_patch=8, holdout=0.25)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    write_demo_folder(root / "images", per_class=2)
    write_shards(root / "images", root / "shards", image_size=32, shard_size=16, workers=0)
    return root / "shards" / "manifest.json"


def config(**overrides):
    return validate_config({"dataset": {"name": "t"}, "standins": {**TINY, **overrides}})["standins"]


def test_standins_load_through_the_real_loaders(shards, tmp_path):
    vae_manifest = train_standin_vae(shards, tmp_path / "a", config())
    vit_manifest = train_standin_vit(shards, tmp_path / "b", config())
    assert not (tmp_path / "a" / "vit").exists() and not (tmp_path / "b" / "vae").exists()
    vae = load_encoder("standin-vae", str(tmp_path / "a" / "vae"))
    assert vae.downsample == 2 and vae.latent_channels == 4
    assert vae.scaling_factor == pytest.approx(vae_manifest["vae"]["scaling_factor"])
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    mean, std = vae(images)
    assert mean.shape == (3, 4, 16, 16) and (std > 0).all()
    vit = load_encoder("standin-vit", str(tmp_path / "b" / "vit"), grid=4)
    assert vit(images).shape == (3, 16, 16)
    report = vae_manifest["vae"]
    assert report["test_psnr_db"] == pytest.approx(10 * math.log10(4 / report["test_mse"]))
    assert 0.0 <= vit_manifest["vit"]["test_accuracy"] <= 1.0
    for manifest in (vae_manifest, vit_manifest):  # the same seeded quarter held out by both
        assert manifest["num_test"] == 5 and manifest["num_train"] == 15


def test_same_seed_same_weights_other_seed_other_weights(shards, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train_standin_vae(shards, tmp_path / name, config(seed=seed))
        runs[name] = load_file(tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def vit_weights(folder):
    return load_file(folder / "vit" / "model.safetensors")


@pytest.mark.parametrize("objective", ["supervised", "mae", "random"])
def test_each_vit_objective_saves_a_vit_the_feature_encoder_loads(shards, tmp_path, objective):
    manifest = train_standin_vit(shards, tmp_path / objective, config(vit_objective=objective))
    vit = load_encoder("standin-vit", str(tmp_path / objective / "vit"), grid=4)
    assert vit(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)).shape == (2, 16, 16)
    report = manifest["vit"]
    assert report["objective"] == objective and 0.0 <= report["linear_probe_accuracy"] <= 1.0
    # random is the init itself: the same weights as a fresh timm model with the stage's seed
    init = train_standin_vit(shards, tmp_path / "init", config(vit_objective="random", vit_steps=1))
    trained, untrained = vit_weights(tmp_path / objective), vit_weights(tmp_path / "init")
    assert set(init["vit"]) == {"objective", "linear_probe_accuracy"}  # nothing trained, nothing to report
    same = all(torch.equal(trained[k], untrained[k]) for k in untrained)
    assert same == (objective == "random")


def test_mae_loss_falls(shards, tmp_path):
    manifest = train_standin_vit(shards, tmp_path, config(vit_objective="mae", vit_steps=40, vit_lr=3e-3))
    report = manifest["vit"]
    assert report["final_train_loss"] < 0.7 * report["first_train_loss"], report
    assert report["mask_ratio"] == 0.75


def test_mae_sees_only_the_kept_patches():
    from redi.standins import build_standin_vit, mae_encode, patchify

    cfg = config()
    vit = build_standin_vit(cfg, 32, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9, 15], [3, 4, 10, 12]])
    tokens = mae_encode(vit, x, keep)
    patches = patchify(x, 8)
    assert patches.shape == (2, 16, 192)
    torch.testing.assert_close(patches[0, 5].reshape(8, 8, 3).permute(2, 0, 1), x[0, :, 8:16, 8:16])
    changed = x.clone()
    changed[1, :, 0:8, 0:8] += 5.0  # patch 0 of sample 1 is hidden: its tokens must not move
    torch.testing.assert_close(mae_encode(vit, changed, keep)[1], tokens[1])
    changed[1, :, 0:8, 24:32] += 5.0  # patch 3 of sample 1 is kept
    assert not torch.allclose(mae_encode(vit, changed, keep)[1], tokens[1])
