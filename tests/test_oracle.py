"""sample.oracle: x sampled with the true z of real images held fixed (a diagnostic of what z carries)."""

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_sample_stage import NUM_CLASSES, sample_config, save_run, vae_config, vae_dir  # noqa: F401

from redi.diffusion import GaussianDiffusion
from redi.errors import ReDiError
from redi.sample import OracleSource, generate, load_trained, oracle_noise, read_shard, sample

N_REAL, R_MAX, GRID = 12, 4, 4


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A pca_features.h5 as project-features writes it: z, labels, component_std."""
    path = tmp_path_factory.mktemp("features") / "pca_features.h5"
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        f["z"] = (rng.standard_normal((N_REAL, R_MAX, GRID, GRID)) * 3).astype(np.float32)
        f["labels"] = rng.integers(0, NUM_CLASSES, N_REAL)
        f["component_std"] = np.array([3.0, 2.5, 2.0, 1.5], dtype=np.float32)
    return path


def dataset(path):
    with h5py.File(path) as f:
        return f["z"][:], f["labels"][:], f["component_std"][:]


def oracle_of(sm, path):
    return OracleSource(path, sm.model.rep_channels, sm.normalize_z, sm.model.grid_size)


def matching_rows(z_true, z_data):
    """The dataset row each returned true z is (asserting there is exactly one)."""
    rows = []
    for z in z_true:
        hits = [k for k in range(len(z_data)) if torch.allclose(z, torch.from_numpy(z_data[k]), atol=1e-6)]
        assert len(hits) == 1
        rows.append(hits[0])
    return rows


def test_oracle_of_a_model_that_ignores_z_and_labels_is_plain_sampling_with_real_labels(tmp_path, features):
    sm = load_trained(save_run(tmp_path / "final.pt"))
    with torch.no_grad():  # the prediction no longer reads z or the label
        sm.model.z_embedder.weight.zero_(), sm.model.z_embedder.bias.zero_()
        sm.model.y_embedder.embedding_table.weight.zero_()
    indices, device = [0, 1, 2, 5, 11], torch.device("cpu")
    plain = generate(sm, indices, sample_config(), device)
    oracle = generate(sm, indices, sample_config(oracle=True), device, oracle=oracle_of(sm, features))
    torch.testing.assert_close(oracle[0], plain[0], rtol=0, atol=0)
    z_data, labels, _ = dataset(features)
    rows = matching_rows(oracle[1], z_data[:, :3])  # r = 3, not normalised: the raw PCA channels
    assert len(set(rows)) == len(rows)  # distinct real images (a permutation)
    assert oracle[2].tolist() == labels[rows].tolist()  # the real images' labels
    assert plain[2].tolist() != oracle[2].tolist()


@pytest.mark.parametrize("objective, fusion", [("interpolant", "concat"), ("interpolant", "merged"),
                                               ("ddpm", "merged")])
def test_the_model_sees_the_true_z_noised_to_each_steps_level(tmp_path, features, objective, fusion):
    sm = load_trained(save_run(tmp_path / "final.pt", objective=objective, normalize_z=True,
                               model={"size": "S", "patch": 2, "depth": 2, "hidden_size": 32, "num_heads": 2,
                                      "learn_sigma": False, "fusion": fusion}))
    seen = []
    forward = sm.model.forward

    def recording(x, t, y=None, z=None):
        seen.append((t.clone(), z.clone()))
        return forward(x, t, y, z)

    sm.model.forward = recording
    indices, cfg = [3, 4, 7], sample_config(oracle=True, steps=5)
    _, z_true, labels = generate(sm, indices, cfg, torch.device("cpu"), oracle=oracle_of(sm, features))
    z_data, label_data, std = dataset(features)
    rows = matching_rows(z_true, z_data[:, :3] / std[:3, None, None])  # normalize_z: divided by the stds
    assert labels.tolist() == label_data[rows].tolist()
    lifted = F.interpolate(z_true, size=(8, 8), mode="bilinear", align_corners=False) if fusion == "concat" \
        else z_true
    eps = oracle_noise(cfg["seed"], indices)(lifted)
    assert len(seen) == 5
    for t, z in seen:
        if objective == "interpolant":
            level = t.view(-1, 1, 1, 1)
            expected = level * lifted + (1 - level) * eps
        else:
            abar = torch.from_numpy(GaussianDiffusion().schedule["alphas_cumprod"])[t]
            abar = abar.view(-1, 1, 1, 1).float()
            expected = abar.sqrt() * lifted + (1 - abar).sqrt() * eps
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    assert len({float(t[0]) for t, _ in seen}) == 5  # every step, each at its own level


def test_oracle_needs_a_redi_model_and_the_features(tmp_path, features, vae_dir):  # noqa: F811
    baseline = save_run(tmp_path / "base.pt", model={"size": "S", "patch": 2, "depth": 2, "hidden_size": 32,
                                                     "num_heads": 2, "learn_sigma": False, "fusion": "none"})
    with pytest.raises(ReDiError, match="sample.oracle needs a ReDi model"):
        sample(sample_config(oracle=True), vae_config(vae_dir), str(baseline), tmp_path / "a", "cpu",
               quiet=True, features=str(features))
    redi = save_run(tmp_path / "redi.pt")
    with pytest.raises(ReDiError, match="pass --features pca_features.h5"):
        sample(sample_config(oracle=True), vae_config(vae_dir), str(redi), tmp_path / "b", "cpu", quiet=True)


def test_oracle_stage_writes_the_real_labels(tmp_path, features, vae_dir):  # noqa: F811
    redi = save_run(tmp_path / "redi.pt")
    manifest = sample(sample_config(oracle=True), vae_config(vae_dir), str(redi), tmp_path / "out", "cpu",
                      quiet=True, features=str(features))
    assert manifest["inputs"]["features"]["path"].endswith("pca_features.h5")
    shard = read_shard(tmp_path / "out" / "shards" / "shard-000000.tar")
    _, label_data, _ = dataset(features)
    sm = load_trained(redi)
    rows = oracle_of(sm, features).images(shard["index"].tolist(), 100)
    assert shard["labels"].tolist() == label_data[rows].tolist()
