"""Official-code parity: the official PCA file, balanced labels, RG channels, ODE grid, concat sampling."""

import argparse
import pickle
import zipfile

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from test_sample_stage import NUM_CLASSES, sample_config, save_run

from redi.cli import main
from redi.errors import ReDiError
from redi.guidance import Guidance, guided_prediction
from redi.models import build_model
from redi.official_pca import load_official_pca
from redi.pca import load_pca, project
from redi.sample import PerSampleNoise, generate, load_official, load_trained, sample_labels, sample_seed
from redi.samplers import ode_sample

DIM = 12


def official_pca_file(path, rng):
    """A file as the official calc_pca.py writes it: torch.save of {pca_model, mean, std}."""
    raw = rng.normal(size=(400, DIM)) @ rng.normal(size=(DIM, DIM)) + rng.normal(size=DIM)
    mean, std = raw.mean(0).astype(np.float32), raw.std(0).astype(np.float32)
    pca = PCA().fit((raw - mean) / std)
    torch.save({"pca_model": pca, "mean": mean, "std": std}, path)
    return raw, pca, mean, std


def test_official_pca_converts_and_projects_like_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    raw, pca, mean, std = official_pca_file(tmp_path / "dino_pca_model.pth", rng)
    assert main(["convert-pca", "--official", str(tmp_path / "dino_pca_model.pth"),
                 "--out", str(tmp_path / "pca.npz")]) == 0
    ours = load_pca(tmp_path / "pca.npz")
    features = rng.normal(size=(50, DIM)) * 3
    # the official transform: standardise, subtract pca.mean_, project (sklearn's transform does the last two)
    expected = pca.transform((features - mean) / std)[:, :5]
    np.testing.assert_allclose(project(features, ours, 5), expected, atol=1e-9)
    np.testing.assert_allclose(ours["explained_variance"], pca.explained_variance_)
    manifest = (tmp_path / "manifest.json").read_text()
    assert "official ReDi PCA file" in manifest and "official_sha256" in manifest


class Boom:
    """A pickle payload whose unpickling would write a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_official_pca_refuses_any_other_global_and_runs_nothing(tmp_path, capsys):
    target = tmp_path / "pwned.txt"
    bad = tmp_path / "bad.pth"
    torch.save({"pca_model": Boom(str(target)), "mean": np.zeros(3), "std": np.ones(3)}, bad)
    code = main(["convert-pca", "--official", str(bad), "--out", str(tmp_path / "pca.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("redi convert-pca: error:") and err.strip().count("\n") == 0
    assert "open" in err and not target.exists() and not (tmp_path / "pca.npz").exists()
    # a plain pickle (not a torch zip file) with the same payload: refused too
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"pca_model": Boom(str(target))}))
    with pytest.raises(ReDiError):
        load_official_pca(legacy)
    assert not target.exists()


def test_the_official_pca_file_of_the_repository_loads_when_present(tmp_path):
    """The shipped format: a zip whose data.pkl names only numpy and sklearn globals."""
    path = tmp_path / "p.pth"
    official_pca_file(path, np.random.default_rng(1))
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl")]
        assert names
    state = load_official_pca(path)
    assert isinstance(state["pca_model"], PCA) and state["mean"].shape == (DIM,)


def test_balanced_labels_are_exact_per_class_and_batch_independent():
    cfg = sample_config(num_samples=50, labels="balanced")
    indices = list(range(50))
    noise = PerSampleNoise([sample_seed(cfg["seed"], i) for i in indices])
    labels = sample_labels(indices, cfg, NUM_CLASSES, noise).numpy()
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [10] * NUM_CLASSES
    parts = [sample_labels(indices[a:b], cfg, NUM_CLASSES, PerSampleNoise([0] * (b - a)))
             for a, b in ((0, 7), (7, 31), (31, 50))]
    np.testing.assert_array_equal(torch.cat(parts).numpy(), labels)
    other = sample_labels(indices, sample_config(num_samples=50, labels="balanced", seed=101), NUM_CLASSES,
                          noise).numpy()
    assert not np.array_equal(other, labels)
    uneven = sample_labels(list(range(13)), sample_config(num_samples=13, labels="balanced"), NUM_CLASSES,
                           PerSampleNoise([0] * 13)).numpy()
    counts = np.bincount(uneven, minlength=NUM_CLASSES)
    assert counts.sum() == 13 and counts.max() - counts.min() <= 1


def test_the_ode_grid_counts_points_like_sit():
    calls = []

    def velocity(x, z, t):
        calls.append(float(t[0]))
        return torch.ones_like(x), None

    x = torch.zeros(2, 3)
    out, _ = ode_sample(velocity, x, None, steps=5, method="euler")
    assert calls == pytest.approx([0.0, 0.25, 0.5, 0.75])  # linspace(0, 1, 5): 4 intervals
    torch.testing.assert_close(out, torch.ones(2, 3), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        ode_sample(velocity, x, None, steps=1)


class Affine(torch.nn.Module):
    """A model whose predictions are known: x-head = x + a*z_mean, z-head = z + b (per branch)."""

    fusion = "concat"

    def forward(self, x, t, y, z):
        from redi.models import Prediction

        zero = torch.zeros_like(x[:, :1]) if z is None else z.mean(1, keepdim=True)
        label = y.view(-1, 1, 1, 1)
        return Prediction(x + 2 * zero + label, (z if z is not None else 0) + 3 * label)


def test_rg_on_all_channels_guides_z_too():
    x, z = torch.randn(2, 4, 4, 4), torch.randn(2, 3, 4, 4)
    y, t = torch.tensor([1, 2]), torch.zeros(2)
    model = Affine()
    image_only = guided_prediction(model, x, t, y, z, Guidance(rg_scale=2.0))
    official = guided_prediction(model, x, t, y, z, Guidance(rg_scale=2.0, rg_all_channels=True))
    cond, dropped = model(x, t, y, z), model(x, t, y, torch.zeros_like(z))
    torch.testing.assert_close(image_only[0], official[0])
    torch.testing.assert_close(image_only[1], cond.z)  # z untouched by image-only RG
    torch.testing.assert_close(official[1], dropped.z + 2.0 * (cond.z - dropped.z))


def test_official_redi_checkpoint_loads_with_its_training_namespace(tmp_path):
    model = build_model("S", 2, input_size=8, num_classes=NUM_CLASSES, learn_sigma=False, fusion="concat",
                        rep_channels=3, depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "0400000.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model="SiT-S/2", pca_rank=3)}, path)
    # a 2-block S model: the loader builds S's 12 blocks, so the strict load names the mismatch
    with pytest.raises(ReDiError, match="does not fit SiT-S/2"):
        load_official(path, "SiT-S/2")
    full = build_model("S", 2, input_size=8, num_classes=NUM_CLASSES, learn_sigma=False, fusion="concat",
                       rep_channels=3)
    torch.save({"ema": full.state_dict(), "args": argparse.Namespace(pca_rank=3)}, path)
    sm = load_official(path, "SiT-S/2")
    assert sm.model.fusion == "concat" and sm.model.rep_channels == 3 and not sm.model.learn_sigma
    assert sm.objective == "interpolant" and sm.num_classes == NUM_CLASSES


def test_pca_rank_below_the_models_r_is_a_clear_error(tmp_path):
    from redi.pca import save_pca
    from redi.sample import representation_std

    save_pca(tmp_path / "pca.npz", {"explained_variance": np.array([4.0, 1.0])})
    with pytest.raises(ReDiError, match="2 principal components but the model generates r = 3"):
        representation_std(tmp_path / "pca.npz", 3)
    torch.testing.assert_close(representation_std(tmp_path / "pca.npz", 2), torch.tensor([2.0, 1.0]))


def test_a_concat_run_generates_z_on_the_token_grid(tmp_path):
    path = save_run(tmp_path / "final.pt", model={"size": "S", "patch": 2, "depth": 2, "hidden_size": 32,
                                                  "num_heads": 2, "fusion": "concat"}, rep_dropout=0.2)
    sm = load_trained(path)
    assert sm.model.fusion == "concat" and not sm.model.learn_sigma  # null -> no sigma for SiT + concat
    latents, z, labels = generate(sm, [0, 1, 2], sample_config(rg_scale=1.5, rg_channels="all"),
                                  torch.device("cpu"))
    assert latents.shape == (3, 4, 8, 8) and z.shape == (3, 3, 4, 4) and labels.shape == (3,)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("flags, expected", [([], None), (["--model-learn-sigma"], True),
                                             (["--no-model-learn-sigma"], False),
                                             (["--model-learn-sigma", "none"], None),
                                             (["--model-learn-sigma", "false"], False)])
def test_a_nullable_boolean_key_takes_every_flag_form(flags, expected):
    """train.model.learn_sigma is true, false or null (resolved by objective and fusion)."""
    from redi.cli import build_parser
    from redi.config import config_from_args

    args = build_parser().parse_args(["train", "--latents", "a", "--features", "b", "--out", "c", *flags])
    assert config_from_args(args, ["train"])["train"]["model"]["learn_sigma"] is expected
