"""`redi sample`: loading runs and official checkpoints, sharded resumable generation, ADM npz."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import write_tiny_vae
from PIL import Image

from redi.code_version import stage_code_version
from redi.config import validate_config
from redi.encoders import load_encoder
from redi.errors import ReDiError
from redi.models import build_model, build_run
from redi.sample import (
    decode,
    generate,
    image_grid,
    load_official,
    load_trained,
    read_shard,
    render_representation,
    sample,
    sample_seed,
    sampler_of,
    write_adm_npz,
    write_shard,
)

NUM_CLASSES = 5


def train_config(**overrides):
    train = {"objective": "interpolant", "rank": 3, "conditional": True,
             "model": {"size": "S", "patch": 2, "depth": 2, "hidden_size": 32, "num_heads": 2,
                       "learn_sigma": False, "fusion": "merged"}}
    train.update(overrides)
    return validate_config({"dataset": {"name": "t"}, "train": train})["train"]


def save_run(path, seed=0, **overrides):
    """A final.pt as `redi train` writes it, with random (non-zero-init) weights."""
    cfg = train_config(**overrides)
    torch.manual_seed(seed)
    model, _ = build_run(cfg, NUM_CLASSES, 8, cfg["rank"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    torch.save({"ema": model.state_dict(), "model": model.state_dict(), "step": 7, "config": cfg,
                "num_classes": NUM_CLASSES, "scaling_factor": 0.5, "z_std": torch.full((3,), 2.0)}, path)
    return path


def sample_config(**overrides):
    values = {"num_samples": 10, "steps": 4, "shard_size": 4, "batch_size": 3, "seed": 100}
    values.update(overrides)
    return validate_config({"dataset": {"name": "t"}, "sample": values})["sample"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_run(tmp_path_factory.mktemp("run") / "final.pt")


def vae_config(folder):
    return {"encoder": {"name": "standin-vae", "weights": str(folder)}}


def test_sample_writes_shards_npz_grids_and_manifest(tmp_path, run, vae_dir):
    torch.set_num_threads(1)
    manifest = sample(sample_config(), vae_config(vae_dir), str(run), tmp_path, "cpu", quiet=True)
    with np.load(tmp_path / "samples.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 16, 16, 3)  # ADM: N, H, W, 3
    assert labels.shape == (10,) and set(labels.tolist()) <= set(range(NUM_CLASSES))
    assert images.std() > 0 and not np.array_equal(images[0], images[1])
    shards = sorted((tmp_path / "shards").glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    first = read_shard(shards[0])
    assert first["index"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(first["images"], images[:4])
    assert first["reps"].shape == (4, 16, 16, 3)  # the representation map, next to each image
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 18 + 2, 4 * 18 + 2, 3)  # all 10 (from 3 shards): 3 rows of 4
    np.testing.assert_array_equal(grid[20:36, 2:18], images[4])  # row 1, column 0
    assert (tmp_path / "representations.png").exists()
    assert manifest["sampler"] == "sde" and manifest["num_samples"] == 10
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_a_rerun_generates_only_the_missing_shards(tmp_path, run, vae_dir):
    torch.set_num_threads(1)
    cfg = sample_config()
    sample(cfg, vae_config(vae_dir), str(run), tmp_path, "cpu", quiet=True)
    before = np.load(tmp_path / "samples.npz")["arr_0"]
    shards = sorted((tmp_path / "shards").glob("shard-*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # a kill before shard 1 was renamed into place
    sample(cfg, vae_config(vae_dir), str(run), tmp_path, "cpu", quiet=True)
    assert shards[1].exists()
    assert all(p.stat().st_mtime_ns == stamps[p] for p in (shards[0], shards[2]))  # not redone
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], before)


def test_shards_from_another_checkpoint_are_not_reused(tmp_path, run, vae_dir):
    torch.set_num_threads(1)
    cfg = sample_config(num_samples=4)
    sample(cfg, vae_config(vae_dir), str(run), tmp_path, "cpu", quiet=True)
    first = np.load(tmp_path / "samples.npz")["arr_0"]
    other = save_run(tmp_path / "other.pt", seed=5)
    sample(cfg, vae_config(vae_dir), str(other), tmp_path, "cpu", quiet=True)
    assert not np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], first)


def test_shards_of_other_sample_code_are_not_reused(tmp_path, run, vae_dir, monkeypatch, capsys):
    torch.set_num_threads(1)
    cfg = sample_config(num_samples=4)
    monkeypatch.setattr("redi.sample.stage_code_version", lambda stage: "0123456789ab")
    sample(cfg, vae_config(vae_dir), str(run), tmp_path, "cpu", quiet=True)
    monkeypatch.undo()
    shards = sorted((tmp_path / "shards").glob("shard-*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    sample(cfg, vae_config(vae_dir), str(run), tmp_path, "cpu", quiet=True)
    err = capsys.readouterr().err
    assert f"removing {len(shards)} shards made from another checkpoint/VAE/config/code" in err
    assert all(p.stat().st_mtime_ns != stamps[p] for p in shards)  # every shard made again
    provenance = json.loads((tmp_path / "shards" / "provenance.json").read_text())
    assert provenance["code"] == stage_code_version("sample")


def test_sample_i_depends_on_seed_and_i_only(run):
    torch.set_num_threads(1)
    sm = load_trained(run)
    cfg = sample_config()
    together = generate(sm, [3, 4, 5], cfg, torch.device("cpu"))
    alone = generate(sm, [4], cfg, torch.device("cpu"))
    torch.testing.assert_close(alone[0][0], together[0][1], rtol=1e-5, atol=1e-5)
    assert alone[2][0] == together[2][1]
    # another base seed shares no sample, not even shifted by one index (seed + i would)
    other = generate(sm, [2, 3, 4, 5, 6], sample_config(seed=101), torch.device("cpu"))[0]
    assert all((other[j] - together[0][k]).abs().max() > 1e-3 for j in range(5) for k in range(3))
    assert len({sample_seed(s, i) for s in range(50) for i in range(50)}) == 2500


@pytest.mark.parametrize("sampler", ["ode-euler", "ode-heun"])
def test_ode_samplers_run_through_the_stage_code(run, sampler):
    sm = load_trained(run)
    sm.rep_dropout = (0.2, "sample")
    x, z, y = generate(sm, [0, 1], sample_config(sampler=sampler, cfg_scale=2.0, rg_scale=1.5),
                       torch.device("cpu"))
    assert x.shape == (2, 4, 8, 8) and z.shape == (2, 3, 4, 4) and torch.isfinite(x).all()


def test_two_processes_write_the_same_samples_as_one(tmp_path, run, vae_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["sample", "--checkpoint", str(run), "--encoder-name", "standin-vae", "--encoder-weights",
              str(vae_dir), "--num-samples", "10", "--steps", "3", "--shard-size", "3", "--batch-size", "2",
              "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "redi.cli", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, "-m", "redi.cli", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_official_dit_checkpoint_samples_through_the_same_command(tmp_path, vae_dir):
    torch.manual_seed(0)
    official = build_model("S", 4, input_size=8, num_classes=NUM_CLASSES)  # DiT's own layout
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0, 0.02)
    torch.save(official.state_dict(), tmp_path / "DiT-S-4.pt")  # released checkpoints: a flat EMA dict
    torch.save({"ema": official.state_dict(), "model": {}}, tmp_path / "train-ckpt.pt")
    for name in ("DiT-S-4.pt", "train-ckpt.pt"):
        sm = load_official(tmp_path / name, "DiT-S/4")
        assert (sm.objective, sm.num_classes, sm.model.learn_sigma) == ("ddpm", NUM_CLASSES, True)
    manifest = sample(sample_config(num_samples=2, architecture="DiT-S/4", sampler="ddpm", cfg_scale=1.5),
                      vae_config(vae_dir), str(tmp_path / "DiT-S-4.pt"), tmp_path / "out", "cpu", quiet=True)
    assert manifest["model"] == "official DiT-S/4" and manifest["sampler"] == "ddpm"
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert not (tmp_path / "out" / "representations.png").exists()  # a baseline has no z
    with pytest.raises(ReDiError, match="does not fit SiT-B/4"):
        load_official(tmp_path / "DiT-S-4.pt", "SiT-B/4")
    with pytest.raises(ReDiError, match="set sample.architecture"):
        load_trained(tmp_path / "DiT-S-4.pt")
    with pytest.raises(ReDiError, match="not found"):
        load_official(tmp_path / "missing.pt", "DiT-S/4")


def test_sampler_must_fit_the_objective_and_guidance_the_model(run, tmp_path):
    assert sampler_of(sample_config(), "interpolant") == "sde"
    assert sampler_of(sample_config(), "ddpm") == "ddpm"
    with pytest.raises(ReDiError, match="does not fit a interpolant model"):
        sampler_of(sample_config(sampler="ddim"), "interpolant")
    unconditional = load_trained(save_run(tmp_path / "u.pt", conditional=False, rep_dropout=0.2))
    with pytest.raises(ReDiError, match="class-conditional"):
        generate(unconditional, [0], sample_config(cfg_scale=2.0), torch.device("cpu"))
    no_null = load_trained(save_run(tmp_path / "n.pt", class_dropout=0.0))
    for name, dropout in (("d0.pt", {}), ("bc.pt", {"rep_dropout": 0.2, "rep_dropout_mode": "batch_clean"})):
        untrained_branch = load_trained(save_run(tmp_path / name, **dropout))
        with pytest.raises(ReDiError, match="rep_dropout"):
            generate(untrained_branch, [0], sample_config(rg_scale=2.0), torch.device("cpu"))
    with pytest.raises(ReDiError, match="without label dropout"):
        generate(no_null, [0], sample_config(cfg_scale=2.0), torch.device("cpu"))
    x, z, y = generate(unconditional, [0], sample_config(rg_scale=2.0), torch.device("cpu"))
    assert y is None and z.shape == (1, 3, 4, 4)  # unconditional models use RG alone
    baseline = load_trained(save_run(tmp_path / "b.pt", model={"size": "S", "patch": 2, "depth": 1,
                                                                 "hidden_size": 32, "num_heads": 2,
                                                                 "fusion": "none"}))
    with pytest.raises(ReDiError, match="needs a ReDi model"):
        generate(baseline, [0], sample_config(rg_scale=2.0), torch.device("cpu"))


def test_decode_rounds_like_adm(vae_dir):
    vae = load_encoder("standin-vae", str(vae_dir), "cpu", kind="vae")
    latents = torch.randn(2, 4, 8, 8)
    expected = vae.vae.decode(latents / 0.5).sample
    expected = torch.clamp(127.5 * expected + 128.0, 0, 255).floor().permute(0, 2, 3, 1).numpy()
    out = decode(vae, latents, scaling_factor=0.5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_representation_maps_put_three_stds_at_the_ends():
    z = torch.zeros(1, 2, 2, 2)
    z[0, 0, 0, 0], z[0, 0, 0, 1], z[0, 1, 1, 1] = 6.0, -6.0, 3.0  # std 2 per channel -> +-3 and 1.5 std
    rgb = render_representation(z, torch.tensor([2.0, 2.0]), size=4)
    assert rgb.shape == (1, 4, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == [255, 128, 128]  # channel 0 at +3 std; missing third channel at 0
    assert rgb[0, 0, 2, 0] == 0  # -3 std, upsampled by nearest (pixel 2 of row 0 is token (0, 1))
    assert rgb[0, 3, 3, 1] == round((1.5 / 3 + 1) * 127.5)


def test_adm_npz_streams_shards_into_one_array(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    labels = torch.tensor([4, 0, 2, 1, 3])
    write_shard(tmp_path / "a.tar", [0, 1, 2], images[:3], None, labels[:3])
    write_shard(tmp_path / "b.tar", [3, 4], images[3:], None, labels[3:])
    write_adm_npz(tmp_path / "samples.npz", [tmp_path / "a.tar", tmp_path / "b.tar"], 5)
    with np.load(tmp_path / "samples.npz") as npz:
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], labels.numpy())
    with tarfile.open(tmp_path / "a.tar") as tar:  # PNGs a plain tar reader can open
        member = tar.extractfile("000000001.png").read()
        np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(member))), images[1])
    with pytest.raises(ReDiError, match="expected 6"):
        write_adm_npz(tmp_path / "bad.npz", [tmp_path / "a.tar", tmp_path / "b.tar"], 6)
    assert not (tmp_path / "bad.npz").exists()


def test_image_grid_tiles_near_square():
    grid = image_grid(np.zeros((5, 4, 4, 3), dtype=np.uint8))
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert grid[2:6, 2:6].max() == 0 and grid[0, 0, 0] == 255
