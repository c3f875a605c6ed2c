"""Official-code parity: balanced labels, RG channels, ODE grid, concat sampling."""

import numpy as np
import pytest
import torch
from test_sample_stage import NUM_CLASSES, sample_config, save_run

from redi.errors import ReDiError
from redi.guidance import Guidance, guided_prediction
from redi.sample import PerSampleNoise, generate, load_trained, sample_labels, sample_seed
from redi.samplers import ode_sample


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
