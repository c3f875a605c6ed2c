"""redi.features and redi.latents: balanced sampling and a tiny end-to-end encode/PCA pipeline."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from conftest import write_tiny_vae
from PIL import Image
from timm.models import save_for_hf

from redi.data.reader import iter_batches
from redi.data.shard import write_shards
from redi.encoders import load_encoder
from redi.errors import ReDiError
from redi.features import (
    balanced_sample,
    class_ranges,
    extract_features,
    labels_of,
    project_features,
)
from redi.fit_pca import fit_pca_file, iter_token_chunks
from redi.latents import encode_latents
from redi.pca import fit_pca, load_pca, project

PER_CLASS = 10
CLASSES = ["apple", "bee", "cat"]
N = PER_CLASS * len(CLASSES)
VIT_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)


def ranges_of(sizes: list[int]) -> list[tuple[int, int]]:
    stops = np.cumsum(sizes)
    return [(int(s - n), int(s)) for s, n in zip(stops, sizes, strict=True)]


def per_class(sample: np.ndarray, ranges: list[tuple[int, int]]) -> list[int]:
    return [int(((sample >= a) & (sample < b)).sum()) for a, b in ranges]


# ------------------------------------------------------------------------------- balanced_sample


@pytest.mark.parametrize(
    "sizes, size",
    [([100, 150, 150], 7), ([100, 150, 150], 100), ([100, 150, 150], 299), ([40] * 5, 123),
     ([60, 61, 62, 63], 240)],
)
def test_balanced_sample_equal_classes(sizes, size):
    ranges = ranges_of(sizes)
    sample = balanced_sample(ranges, size, seed=0)
    assert sample.shape == (size,)
    assert np.issubdtype(sample.dtype, np.integer)
    assert len(np.unique(sample)) == size
    assert sample.min() >= 0 and sample.max() < sum(sizes)
    counts = per_class(sample, ranges)
    assert sum(counts) == size
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(
    "sizes, size, expected",
    [([2, 50, 50], 60, [2, 29, 29]), ([3, 5, 100], 50, [3, 5, 42]), ([0, 10, 10], 10, [0, 5, 5]),
     ([1, 4, 30, 30], 35, [1, 4, 15, 15]), ([2, 50, 50], 102, [2, 50, 50])],
)
def test_balanced_sample_water_fills_small_classes(sizes, size, expected):
    ranges = ranges_of(sizes)
    sample = balanced_sample(ranges, size, seed=1)
    assert per_class(sample, ranges) == expected
    assert len(np.unique(sample)) == size


def test_balanced_sample_shuffled_and_deterministic():
    ranges = ranges_of([50, 50, 50])
    sample = balanced_sample(ranges, 60, seed=7)
    assert not np.all(np.diff(sample) > 0)  # not sorted
    labels = np.searchsorted([b for _, b in ranges], sample, side="right")
    assert not np.all(np.diff(labels) >= 0)  # not grouped by class either
    np.testing.assert_array_equal(balanced_sample(ranges, 60, seed=7), sample)
    assert not np.array_equal(balanced_sample(ranges, 60, seed=8), sample)
    full = balanced_sample(ranges, 150, seed=7)
    np.testing.assert_array_equal(np.sort(full), np.arange(150))


def test_balanced_sample_too_large_raises():
    with pytest.raises(ReDiError, match="101"):
        balanced_sample(ranges_of([50, 50]), 101, seed=0)


def test_labels_of_and_class_ranges_follow_class_order():
    manifest = {"classes": ["b", "a", "c"], "counts_per_class": {"a": 2, "b": 3, "c": 1}}
    np.testing.assert_array_equal(labels_of(manifest), [0, 0, 0, 1, 1, 2])
    assert class_ranges(manifest) == [(0, 3), (3, 5), (5, 6)]


# ------------------------------------------------------------------------- tiny sharded dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            h, w = rng.integers(16, 28, 2)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = np.clip(pixels[..., c].astype(int) + 80, 0, 255)
            Image.fromarray(pixels).save(root / name / f"img{i:02d}.png")
    out = tmp_path_factory.mktemp("shards")
    manifest = write_shards(root, out, image_size=16, shard_size=8, workers=0)
    assert manifest["num_samples"] == N and len(manifest["shards"]) == 4
    images = torch.zeros((N, 16, 16, 3), dtype=torch.uint8)
    labels = torch.full((N,), -1, dtype=torch.long)
    for idx, img, lab in iter_batches(out / "manifest.json", batch_size=7):
        images[idx], labels[idx] = img, lab
    assert torch.all(labels >= 0)
    return out / "manifest.json", images, labels.numpy()


@pytest.fixture(scope="module")
def vae_encoder(tmp_path_factory):
    return load_encoder("standin-vae", str(write_tiny_vae(tmp_path_factory.mktemp("vae"), seed=0)))


@pytest.fixture(scope="module")
def vit_encoder(tmp_path_factory):
    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch8_224", pretrained=False, **VIT_ARGS)
    folder = tmp_path_factory.mktemp("vit")
    save_for_hf(vit, str(folder), model_args=VIT_ARGS, safe_serialization=True)
    encoder = load_encoder("standin-vit", str(folder), grid=4)
    assert encoder.dim == 32 and encoder.grid == (4, 4)
    return encoder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shards, vae_encoder, vit_encoder):
    manifest = shards[0]
    out = tmp_path_factory.mktemp("results")
    paths = {
        "latents": out / "latents" / "latents.h5",
        "features": out / "features" / "features.h5",
        "pca": out / "pca" / "pca.npz",
        "pca_features": out / "pca_features" / "pca_features.h5",
    }
    manifests = {
        "latents": encode_latents(manifest, vae_encoder, paths["latents"], flip=True, batch_size=8,
                                  workers=0, config={"stage": "latents"}),
        "features": extract_features(manifest, vit_encoder, paths["features"], sample_images=12,
                                     seed=0, batch_size=5, workers=0),
    }
    manifests["pca"] = fit_pca_file(paths["features"], paths["pca"])
    manifests["pca_features"] = project_features(
        manifest, vit_encoder, load_pca(paths["pca"]), paths["pca_features"], rank_max=4,
        flip=True, batch_size=8, workers=0)
    return paths, manifests


def read_h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_fp16_close(stored: np.ndarray, reference: np.ndarray) -> None:
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), reference, rtol=2e-3, atol=2e-3)


def test_shard_labels(shards):
    _, _, labels = shards
    np.testing.assert_array_equal(labels, np.repeat(np.arange(3), PER_CLASS))
    np.testing.assert_array_equal(labels_of(read_json(shards[0])), labels)


def test_latents_file(pipeline, shards, vae_encoder):
    _, images, labels = shards
    paths, manifests = pipeline
    data, attrs = read_h5(paths["latents"])
    assert not paths["latents"].with_name("latents.h5.partial").exists()
    assert set(data) == {"mean", "std", "mean_flip", "std_flip", "labels", "done"}
    for name in ("mean", "std", "mean_flip", "std_flip"):
        assert data[name].shape == (N, 4, 8, 8) and data[name].dtype == np.float16, name
    assert data["labels"].dtype == np.int64
    np.testing.assert_array_equal(data["labels"], labels)
    assert data["done"].all()
    assert attrs["scaling_factor"] == pytest.approx(vae_encoder.scaling_factor)
    assert attrs["image_size"] == 16 and bool(attrs["flip"])
    for i in (0, 7, 8, 19, 29):  # one image at a time, across shard boundaries
        mean, std = vae_encoder(images[i : i + 1])
        assert_fp16_close(data["mean"][i], mean[0].numpy())
        assert_fp16_close(data["std"][i], std[0].numpy())
        mean_f, std_f = vae_encoder(torch.flip(images[i : i + 1], dims=[2]))
        assert_fp16_close(data["mean_flip"][i], mean_f[0].numpy())
        assert_fp16_close(data["std_flip"][i], std_f[0].numpy())
    assert not np.allclose(data["mean"], data["mean_flip"], atol=1e-2)
    assert np.all(data["std"] > 0)
    manifest = read_json(paths["latents"].with_name("manifest.json"))
    assert manifest == json.loads(json.dumps(manifests["latents"]))
    assert manifest["stage"] == "encode-latents" and manifest["config"] == {"stage": "latents"}
    assert manifest["num_samples"] == N and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["resumed_rows"] == 0 and manifest["flip"] is True
    assert manifest["inputs"]["shards"]["path"] == str(shards[0])


def test_features_file(pipeline, shards, vit_encoder):
    manifest_path, images, labels = shards
    paths, _ = pipeline
    data, attrs = read_h5(paths["features"])
    ranges = class_ranges(read_json(manifest_path))
    expected_index = np.sort(balanced_sample(ranges, 12, seed=0))  # rows are stored in index order
    assert data["tokens"].shape == (12, 16, 32) and data["tokens"].dtype == np.float16
    assert data["index"].dtype == np.int64 and data["labels"].dtype == np.int64
    np.testing.assert_array_equal(data["index"], expected_index)
    np.testing.assert_array_equal(data["labels"], labels[expected_index])
    assert attrs["grid"] == 4 and attrs["seed"] == 0
    reference = vit_encoder(images[torch.from_numpy(expected_index)]).numpy()
    assert_fp16_close(data["tokens"], reference)
    manifest = read_json(paths["features"].with_name("manifest.json"))
    assert manifest["num_images"] == 12 and manifest["images_per_class"] == [4, 4, 4]
    assert manifest["grid"] == 4 and manifest["dim"] == 32


def test_pca_file(pipeline):
    paths, _ = pipeline
    pca = load_pca(paths["pca"])
    with h5py.File(paths["features"], "r") as f:
        tokens = f["tokens"][:].astype(np.float32).reshape(-1, 32)
    reference = fit_pca([tokens], 32)
    for key in ("mean", "std", "components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_allclose(pca[key], reference[key], rtol=1e-8, atol=1e-10, err_msg=key)
    assert int(pca["num_vectors"]) == 12 * 16
    chunks = list(iter_token_chunks(paths["features"], rows_per_chunk=5))
    assert [c.shape for c in chunks] == [(80, 32), (80, 32), (32, 32)]
    manifest = read_json(paths["pca"].with_name("manifest.json"))
    assert manifest["num_vectors"] == 192 and manifest["dim"] == 32
    ratio = np.cumsum(pca["explained_variance_ratio"])
    assert manifest["cumulative_variance_ratio"]["4"] == pytest.approx(ratio[3], abs=1e-4)
    assert manifest["component_std"]["1"] == pytest.approx(np.sqrt(pca["explained_variance"][0]), abs=1e-4)


def test_pca_features_file(pipeline, shards, vit_encoder):
    _, images, labels = shards
    paths, _ = pipeline
    pca = load_pca(paths["pca"])
    data, attrs = read_h5(paths["pca_features"])
    for name in ("z", "z_flip"):
        assert data[name].shape == (N, 4, 4, 4) and data[name].dtype == np.float16, name
    np.testing.assert_array_equal(data["labels"], labels)
    assert attrs["rank_max"] == 4 and bool(attrs["flip"])
    np.testing.assert_allclose(data["component_std"], np.sqrt(pca["explained_variance"][:4]), rtol=1e-12)
    np.testing.assert_allclose(data["explained_variance_ratio"], pca["explained_variance_ratio"][:4],
                               rtol=1e-12)
    for name, view in (("z", images), ("z_flip", torch.flip(images, dims=[2]))):
        proj = project(vit_encoder(view).numpy(), pca, 4)  # (N, 16 tokens, 4)
        reference = np.empty((N, 4, 4, 4))
        for t in range(16):  # token t is grid row t // 4, column t % 4
            reference[:, :, t // 4, t % 4] = proj[:, t, :]
        assert_fp16_close(data[name], reference)
    assert not np.allclose(data["z"], data["z_flip"], atol=1e-2)
    manifest = read_json(paths["pca_features"].with_name("manifest.json"))
    assert manifest["num_samples"] == N and manifest["rank_max"] == 4 and manifest["grid"] == 4


def test_project_features_rejects_bad_rank_or_dim(pipeline, shards, vit_encoder, tmp_path):
    paths, _ = pipeline
    pca = load_pca(paths["pca"])
    with pytest.raises(ReDiError, match="rank_max = 33"):
        project_features(shards[0], vit_encoder, pca, tmp_path / "a.h5", rank_max=33, workers=0)
    small = {k: (v[:, :16] if k == "components" else v) for k, v in pca.items()}
    with pytest.raises(ReDiError, match="16-d"):
        project_features(shards[0], vit_encoder, small, tmp_path / "b.h5", rank_max=4, workers=0)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- resume


class CountingEncoder:
    """Wraps a LatentEncoder, counting the images it encodes; raises once `fail_after` calls are made."""

    def __init__(self, encoder, fail_after: int | None = None):
        self.encoder, self.fail_after = encoder, fail_after
        self.calls = self.images = 0
        self.scaling_factor = encoder.scaling_factor
        self.downsample = encoder.downsample
        self.latent_channels = encoder.latent_channels

    def __call__(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.images += len(images)
        return self.encoder(images)


def test_encode_latents_resumes_after_interruption(tmp_path, shards, vae_encoder):
    manifest = shards[0]
    reference_path = tmp_path / "full" / "latents.h5"
    encode_latents(manifest, CountingEncoder(vae_encoder), reference_path, batch_size=4, workers=0)

    path = tmp_path / "resumed" / "latents.h5"
    partial = path.with_name("latents.h5.partial")
    interrupted = CountingEncoder(vae_encoder, fail_after=4)  # 2 batches, image + flip each
    try:
        encode_latents(manifest, interrupted, path, batch_size=4, workers=0)
    except KeyboardInterrupt:
        pass
    else:
        pytest.fail("the interrupted run did not raise")
    assert interrupted.images == 16
    assert partial.exists() and not path.exists()
    assert not path.with_name("manifest.json").exists()

    with pytest.raises(ReDiError, match="delete"):
        encode_latents(manifest, vae_encoder, path, flip=False, batch_size=4, workers=0)

    resumed = CountingEncoder(vae_encoder)
    report = encode_latents(manifest, resumed, path, batch_size=4, workers=0)
    assert resumed.images == 2 * (N - 8)
    assert report["resumed_rows"] == 8
    assert path.exists() and not partial.exists()
    got, got_attrs = read_h5(path)
    want, want_attrs = read_h5(reference_path)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got_attrs.keys() == want_attrs.keys()
    for key in want_attrs:
        np.testing.assert_array_equal(got_attrs[key], want_attrs[key], err_msg=key)
