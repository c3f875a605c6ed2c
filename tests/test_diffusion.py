"""Tests of the training objectives (redi.diffusion): DDPM schedule and VLB, the linear interpolant,
and ReDi's joint loss (same t, independent noise, representation dropout, the concat layout).

Closed forms are written here independently of the package (float64 numpy); fake models return a
known function of their inputs and record what they were fed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from redi.diffusion import (
    OBJECTIVES,
    GaussianDiffusion,
    LinearInterpolant,
    build_objective,
)
from redi.diffusion.ddpm import discretized_gaussian_log_likelihood, normal_kl
from redi.models import Prediction, build_model

T_STEPS = 1000


# --- independent closed forms ----------------------------------------------------------------------


def np_schedule() -> dict[str, np.ndarray]:
    betas = np.linspace(1e-4, 0.02, T_STEPS, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return {"betas": betas, "alphas": alphas, "abar": abar, "abar_prev": abar_prev}


def bcast(values, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (N,) -> (N, 1, 1, ...) against `like`."""
    v = torch.as_tensor(np.asarray(values), dtype=like.dtype)
    return v.view(-1, *[1] * (like.dim() - 1))


# --- fakes -----------------------------------------------------------------------------------------


class FakeModel(nn.Module):
    """Prediction is a fixed function of (x_t, t, z_t); every call's inputs are recorded (cloned)."""

    def __init__(self, x_out_channels: int | None = None, z_fn=None):
        super().__init__()
        self.x_out_channels, self.z_fn = x_out_channels, z_fn
        self.calls: list[dict] = []

    def forward(self, x_t, t, y=None, z_t=None):
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.detach().clone(), "y": y,
                           "z_t": None if z_t is None else z_t.detach().clone()})
        tt = t.to(x_t.dtype).view(-1, *[1] * (x_t.dim() - 1))
        px = fake_x(x_t, tt)
        if self.x_out_channels is not None and self.x_out_channels > x_t.shape[1]:
            px = torch.cat([px, fake_v(x_t)], dim=1)
        pz = None
        if z_t is not None:
            pz = self.z_fn(z_t, tt, x_t) if self.z_fn is not None else fake_z(z_t, tt, x_t)
        return Prediction(px, pz)


def fake_x(x_t, tt):
    return 0.5 * x_t + 0.25 * tt / (1.0 + tt)


def fake_v(x_t):
    return torch.tanh(x_t)  # variance values in [-1, 1]


def fake_z(z_t, tt, x_t):
    return -0.3 * z_t + 0.1 * tt / (1.0 + tt) + 0.2 * x_t.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


class Recorder(nn.Module):
    """Wraps a real model (as `module`, like DDP) and records the arguments it was called with."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.module, self.args = inner, None

    def forward(self, x_t, t, y=None, z_t=None):
        self.args = (x_t.detach().clone(), t.detach().clone(), y,
                     None if z_t is None else z_t.detach().clone())
        return self.module(x_t, t, y, z_t)


@pytest.fixture
def known_noise(monkeypatch):
    """torch.randn_like draws from a private generator; returns the list of what it handed out."""
    generator = torch.Generator().manual_seed(1234)
    drawn: list[torch.Tensor] = []

    def randn_like(t, *args, **kwargs):
        out = torch.randn(t.shape, generator=generator, dtype=t.dtype)
        drawn.append(out.clone())
        return out

    monkeypatch.setattr(torch, "randn_like", randn_like)
    return drawn


def noise_of_shape(drawn: list[torch.Tensor], shape) -> torch.Tensor:
    matches = [d for d in drawn if tuple(d.shape) == tuple(shape)]
    assert len(matches) == 1, f"expected one noise draw of shape {tuple(shape)}, got {len(matches)}"
    return matches[0]


def tiny_model(fusion="merged", rep_channels=4, **kwargs):
    return build_model("S", 2, input_size=8, depth=1, hidden_size=32, num_heads=2, num_classes=10,
                       fusion=fusion, rep_channels=rep_channels, **kwargs)


def randomise(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# === 1. DDPM schedule vs closed forms ==============================================================


def test_ddpm_schedule_arrays_match_closed_forms():
    s, d = np_schedule(), GaussianDiffusion()
    np.testing.assert_allclose(d.schedule["betas"], s["betas"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(d.schedule["alphas_cumprod"], s["abar"], rtol=1e-13)
    np.testing.assert_allclose(d.schedule["alphas_cumprod_prev"], s["abar_prev"], rtol=1e-13)
    for name in d.schedule.values():
        assert name.dtype == np.float64 and name.shape == (T_STEPS,)


def test_ddpm_q_sample_closed_form():
    s, d = np_schedule(), GaussianDiffusion()
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x0 = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64)
    abar = s["abar"][t.numpy()]
    expected = bcast(np.sqrt(abar), x0) * x0 + bcast(np.sqrt(1 - abar), x0) * eps
    got = d.q_sample(x0, t, eps)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # t = 0 is almost clean, t = 999 almost pure noise
    assert (got[0] - x0[0]).abs().max() < 0.05 < (got[0] - eps[0]).abs().max()
    assert (got[-1] - eps[-1]).abs().max() < 0.05 < (got[-1] - x0[-1]).abs().max()


def test_ddpm_posterior_closed_form():
    s, d = np_schedule(), GaussianDiffusion()
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 2, 37, 500, 999])
    x0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    i = t.numpy()
    beta, alpha, abar, abar_prev = s["betas"][i], s["alphas"][i], s["abar"][i], s["abar_prev"][i]
    coef1 = beta * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(alpha) / (1 - abar)
    var = beta * (1 - abar_prev) / (1 - abar)
    mean, variance, log_var = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, bcast(coef1, x0) * x0 + bcast(coef2, x0) * xt, rtol=0, atol=1e-12)
    torch.testing.assert_close(variance.flatten(), torch.as_tensor(var), rtol=1e-12, atol=0)
    # log variance: exact for t >= 1, clipped to the t = 1 value at t = 0 (where the variance is 0)
    var1 = s["betas"][1] * (1 - s["abar"][0]) / (1 - s["abar"][1])
    expected_log = np.log(np.where(i == 0, var1, var))
    torch.testing.assert_close(log_var.flatten(), torch.as_tensor(expected_log), rtol=0, atol=1e-12)
    assert variance.flatten()[0] == 0.0
    torch.testing.assert_close(mean[0], x0[0], rtol=0, atol=1e-12)  # t = 0: the posterior is x0


@pytest.mark.parametrize("step", [1, 10, 300])
def test_ddpm_posterior_matches_numeric_gaussian_conditioning(step):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1}),
    integrated on a grid: its mean and variance must be what q_posterior_mean_variance returns."""
    s, d = np_schedule(), GaussianDiffusion()
    x0_val, xt_val = 0.3, -0.45
    beta, alpha, abar_prev = s["betas"][step], s["alphas"][step], s["abar_prev"][step]
    prec = alpha / beta + 1 / (1 - abar_prev)
    centre = (np.sqrt(alpha) * xt_val / beta + np.sqrt(abar_prev) * x0_val / (1 - abar_prev)) / prec
    grid = np.linspace(centre - 15 / np.sqrt(prec), centre + 15 / np.sqrt(prec), 200001)
    log_p = (-0.5 * (xt_val - np.sqrt(alpha) * grid) ** 2 / beta
             - 0.5 * (grid - np.sqrt(abar_prev) * x0_val) ** 2 / (1 - abar_prev))
    w = np.exp(log_p - log_p.max())
    integrate = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    z = integrate(w, grid)
    num_mean = integrate(w * grid, grid) / z
    num_var = integrate(w * (grid - num_mean) ** 2, grid) / z

    t = torch.tensor([step])
    x0 = torch.full((1, 1), x0_val, dtype=torch.float64)
    xt = torch.full((1, 1), xt_val, dtype=torch.float64)
    mean, variance, _ = d.q_posterior_mean_variance(x0, xt, t)
    assert mean.item() == pytest.approx(num_mean, abs=1e-9 * max(1.0, abs(num_mean)))
    assert variance.item() == pytest.approx(num_var, rel=1e-7)


def test_ddpm_predict_start_from_eps_inverts_q_sample():
    d = GaussianDiffusion()
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 1, 250, 750, 999])
    x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_start_from_eps(xt, t, eps), x0, rtol=0, atol=1e-10)


def test_linear_betas_other_step_counts_keep_endpoints_product():
    d = GaussianDiffusion(num_steps=250)
    betas = d.schedule["betas"]
    assert betas.shape == (250,)
    np.testing.assert_allclose([betas[0], betas[-1]], [4e-4, 0.08], rtol=1e-12)


# === 2. VLB pieces ==================================================================================


def test_normal_kl_zero_for_identical_and_matches_scalar_closed_form():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    lv = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros_like(m), rtol=0, atol=1e-14)

    m1, s1, m2, s2 = 0.4, 0.7, -0.2, 1.3
    closed = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    f64 = [torch.tensor(v, dtype=torch.float64) for v in (m1, 2 * math.log(s1), m2, 2 * math.log(s2))]
    got = normal_kl(*f64)
    assert got.item() == pytest.approx(closed, rel=1e-12)
    assert closed > 0.05  # a non-trivial case


@pytest.mark.parametrize(("mean", "scale"), [(0.0, 0.3), (0.13, 0.01), (-0.97, 0.05), (0.999, 0.5)])
def test_discretized_gaussian_bins_sum_to_one(mean, scale):
    x = -1.0 + 2.0 * torch.arange(256, dtype=torch.float64) / 255.0
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, math.log(scale))
    log_p = discretized_gaussian_log_likelihood(x, means, log_scales)
    assert log_p.shape == (256,)
    assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-3)
    # an interior bin has (about) the Gaussian mass of [x - 1/255, x + 1/255]
    from scipy.stats import norm

    k = int(round((mean + 1) * 255 / 2))
    k = min(max(k, 1), 254)
    xk = x[k].item()
    mass = norm.cdf(xk + 1 / 255, mean, scale) - norm.cdf(xk - 1 / 255, mean, scale)
    assert math.exp(log_p[k].item()) == pytest.approx(mass, abs=2e-3)


def _vb_setup(seed=4, n=6):
    d = GaussianDiffusion(learn_sigma=True)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 5, 100, 600, 999][:n])
    return d, x0, eps, t, d.q_sample(x0, t, eps)


def test_vb_is_zero_for_true_eps_and_posterior_variance():
    d, x0, eps, t, xt = _vb_setup()
    out = torch.cat([eps, -torch.ones_like(eps)], dim=1)  # v = -1 -> frac 0 -> posterior log variance
    vb = d.vb_terms_bpd(out, x0, xt, t)
    assert vb.shape == (6,)
    torch.testing.assert_close(vb, torch.zeros_like(vb), rtol=0, atol=1e-8)
    # and it is clearly positive for a wrong eps or the other variance end
    assert (d.vb_terms_bpd(torch.cat([eps + 0.5, -torch.ones_like(eps)], 1), x0, xt, t) > 1e-3).all()
    assert (d.vb_terms_bpd(torch.cat([eps, torch.ones_like(eps)], 1), x0, xt, t)[:3] > 1e-3).all()


def test_vb_at_t0_is_decoder_nll_in_bits():
    d = GaussianDiffusion(learn_sigma=True)
    gen = torch.Generator().manual_seed(5)
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=gen).double() / 255.0) * 2 - 1
    eps = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 0])
    xt = d.q_sample(x0, t, eps)
    v = torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    vb = d.vb_terms_bpd(torch.cat([eps, v], 1), x0, xt, t)
    # independent: the model mean at t = 0 is x0 (coef1 = 1, coef2 = 0); variance between beta~_1 and beta_0
    s = np_schedule()
    log_min = math.log(s["betas"][1] * (1 - s["abar"][0]) / (1 - s["abar"][1]))
    log_var = (v + 1) / 2 * math.log(s["betas"][0]) + (1 - (v + 1) / 2) * log_min
    nll = -discretized_gaussian_log_likelihood(x0, x0, 0.5 * log_var)
    torch.testing.assert_close(vb, nll.flatten(1).mean(1) / math.log(2.0), rtol=1e-9, atol=1e-9)


def test_vb_term_trains_only_the_variance_channels():
    d, x0, eps, t, xt = _vb_setup(seed=6)
    gen = torch.Generator().manual_seed(7)
    out = torch.cat([eps + 0.3 * torch.randn(eps.shape, generator=gen, dtype=torch.float64),
                     torch.rand(eps.shape, generator=gen, dtype=torch.float64) * 1.6 - 0.8], dim=1)
    out.requires_grad_(True)
    terms = d.extra_x_terms(out, x0, xt, t)
    assert set(terms) == {"vb"} and terms["vb"].shape == (6,)
    terms["vb"].sum().backward()
    c = x0.shape[1]
    assert torch.count_nonzero(out.grad[:, :c]) == 0
    assert out.grad[:, c:].abs().sum() > 0
    # with the eps channels not detached the bound would depend on them (sanity of the construction)
    out2 = out.detach().clone().requires_grad_(True)
    d.vb_terms_bpd(out2, x0, xt, t).sum().backward()
    assert out2.grad[:, :c].abs().sum() > 0
    assert GaussianDiffusion(learn_sigma=False).extra_x_terms(out, x0, xt, t) == {}


# === 3. linear interpolant and the joint loss by hand ===============================================


def test_interpolant_q_sample_and_target_by_hand():
    obj = LinearInterpolant()
    x1 = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]], dtype=torch.float64)
    eps = torch.tensor([[[[0.2, 0.4]]], [[[-1.0, 2.0]]]], dtype=torch.float64)
    t = torch.tensor([0.25, 0.9], dtype=torch.float64)
    expected = torch.tensor([[[[0.25 * 1.0 + 0.75 * 0.2, 0.25 * -2.0 + 0.75 * 0.4]]],
                             [[[0.9 * 0.5 + 0.1 * -1.0, 0.9 * 3.0 + 0.1 * 2.0]]]], dtype=torch.float64)
    torch.testing.assert_close(obj.q_sample(x1, t, eps), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(obj.target(x1, eps, t), x1 - eps, rtol=0, atol=0)
    # endpoints: t = 1 is data, t = 0 is noise
    torch.testing.assert_close(obj.q_sample(x1, torch.ones(2, dtype=torch.float64), eps), x1)
    torch.testing.assert_close(obj.q_sample(x1, torch.zeros(2, dtype=torch.float64), eps), eps)


def _data(n=4, seed=8, x_shape=(3, 4, 4), z_shape=(2, 2, 2)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *x_shape, generator=gen, dtype=torch.float64)
    z = torch.randn(n, *z_shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, z, y


@pytest.mark.parametrize("rep_weight", [0.0, 1.0, 2.5])
def test_interpolant_joint_loss_by_hand(rep_weight, known_noise, monkeypatch):
    obj = LinearInterpolant(rep_weight=rep_weight)
    x, z, y = _data()
    t = torch.tensor([0.1, 0.4, 0.75, 0.95], dtype=torch.float64)
    monkeypatch.setattr(obj, "sample_t", lambda n, device: t.clone())
    model = FakeModel()
    losses = obj.loss(model, x, z, y)

    ex, ez = noise_of_shape(known_noise, x.shape), noise_of_shape(known_noise, z.shape)
    tx, tz = bcast(t.numpy(), x), bcast(t.numpy(), z)
    x_t, z_t = tx * x + (1 - tx) * ex, tz * z + (1 - tz) * ez
    loss_x = ((fake_x(x_t, tx) - (x - ex)) ** 2).mean()
    loss_z = ((fake_z(z_t, tz, x_t) - (z - ez)) ** 2).mean()
    assert set(losses) >= {"loss", "loss_x", "loss_z", "rep_dropped"}
    assert "vb" not in losses and "repa" not in losses
    assert losses["loss_x"].item() == pytest.approx(loss_x.item(), rel=1e-12)
    assert losses["loss_z"].item() == pytest.approx(loss_z.item(), rel=1e-12)
    assert losses["loss"].item() == pytest.approx((loss_x + rep_weight * loss_z).item(), rel=1e-12)
    assert losses["rep_dropped"].item() == 0.0
    call = model.calls[0]
    torch.testing.assert_close(call["x_t"], x_t, rtol=0, atol=1e-14)
    torch.testing.assert_close(call["z_t"], z_t, rtol=0, atol=1e-14)
    torch.testing.assert_close(call["t"], t, rtol=0, atol=0)  # SiT: the network sees t itself
    assert torch.equal(call["y"], y)


def test_interpolant_joint_loss_by_hand_seeded():
    """Same check controlling randomness only by the seed (no patching): reproduce the draws."""
    obj = LinearInterpolant(rep_weight=0.7)
    x, z, y = _data(seed=9)
    model = FakeModel()
    torch.manual_seed(123)
    losses = obj.loss(model, x, z, y)
    rec = model.calls[0]
    t = rec["t"]
    tx, tz = t.view(-1, 1, 1, 1).double(), t.view(-1, 1, 1, 1).double()
    ex = (rec["x_t"] - tx * x) / (1 - tx)
    ez = (rec["z_t"] - tz * z) / (1 - tz)
    loss_x = ((fake_x(rec["x_t"], tx) - (x - ex)) ** 2).mean()
    loss_z = ((fake_z(rec["z_t"], tz, rec["x_t"]) - (z - ez)) ** 2).mean()
    assert losses["loss"].item() == pytest.approx((loss_x + 0.7 * loss_z).item(), rel=1e-9)
    # and the same seed reproduces the same losses
    torch.manual_seed(123)
    again = obj.loss(FakeModel(), x, z, y)
    for key in ("loss", "loss_x", "loss_z"):
        assert again[key].item() == losses[key].item()


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("rep_weight", [1.0, 3.0])
def test_ddpm_joint_loss_by_hand(learn_sigma, rep_weight, known_noise, monkeypatch):
    obj = GaussianDiffusion(learn_sigma=learn_sigma, rep_weight=rep_weight)
    x, z, y = _data(seed=10)
    t = torch.tensor([0, 1, 500, 999])
    monkeypatch.setattr(obj, "sample_t", lambda n, device: t.clone())
    model = FakeModel(x_out_channels=2 * x.shape[1] if learn_sigma else None)
    losses = obj.loss(model, x, z, y)

    s = np_schedule()
    abar = s["abar"][t.numpy()]
    ex, ez = noise_of_shape(known_noise, x.shape), noise_of_shape(known_noise, z.shape)
    x_t = bcast(np.sqrt(abar), x) * x + bcast(np.sqrt(1 - abar), x) * ex
    z_t = bcast(np.sqrt(abar), z) * z + bcast(np.sqrt(1 - abar), z) * ez
    tt = bcast(t.numpy().astype(np.float64), x)
    loss_x = ((fake_x(x_t, tt) - ex) ** 2).mean()
    loss_z = ((fake_z(z_t, tt, x_t) - ez) ** 2).mean()
    assert losses["loss_x"].item() == pytest.approx(loss_x.item(), rel=1e-12)
    assert losses["loss_z"].item() == pytest.approx(loss_z.item(), rel=1e-12)
    expected = loss_x + rep_weight * loss_z
    if learn_sigma:
        vb = obj.vb_terms_bpd(torch.cat([fake_x(x_t, tt), fake_v(x_t)], 1), x, x_t, t).mean()
        assert losses["vb"].item() == pytest.approx(vb.item(), rel=1e-10)
        assert losses["vb"].item() > 0
        expected = expected + vb
    else:
        assert "vb" not in losses
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(model.calls[0]["x_t"], x_t, rtol=0, atol=1e-13)
    assert torch.equal(model.calls[0]["t"], t)  # DiT: integer timesteps


def test_loss_without_representation():
    obj = LinearInterpolant()
    x, _, y = _data(seed=11)
    model = FakeModel()
    losses = obj.loss(model, x, None, y)
    assert "loss_z" not in losses
    assert model.calls[0]["z_t"] is None
    assert losses["loss"].item() == pytest.approx(losses["loss_x"].item(), rel=1e-15)


# === 4. same t, independent noise ===================================================================


@pytest.mark.parametrize("name", ["interpolant", "ddpm"])
def test_same_t_for_both_modalities(name, known_noise):
    obj = build_objective(name)
    n = 64
    x, z, y = _data(n=n, seed=12, x_shape=(2, 4, 4), z_shape=(3, 2, 2))
    model = FakeModel(x_out_channels=4 if name == "ddpm" else None)
    torch.manual_seed(0)
    obj.loss(model, x, z, y)
    rec = model.calls[0]
    ex, ez = noise_of_shape(known_noise, x.shape), noise_of_shape(known_noise, z.shape)

    def recover(data_t, data, noise):
        """Per sample, solve data_t = a * data + b * noise for (a, b) by least squares."""
        a = torch.stack([data.flatten(1), noise.flatten(1)], dim=-1)  # (N, D, 2)
        sol = torch.linalg.lstsq(a, data_t.flatten(1).unsqueeze(-1)).solution.squeeze(-1)
        return sol[:, 0], sol[:, 1]

    ax, bx = recover(rec["x_t"], x, ex)
    az, bz = recover(rec["z_t"], z, ez)
    torch.testing.assert_close(ax, az, rtol=0, atol=1e-10)
    torch.testing.assert_close(bx, bz, rtol=0, atol=1e-10)
    t = rec["t"]
    if name == "interpolant":
        expected_a, expected_b = t.double(), 1 - t.double()
    else:
        abar = torch.as_tensor(np_schedule()["abar"])[t]
        expected_a, expected_b = abar.sqrt(), (1 - abar).sqrt()
    torch.testing.assert_close(ax, expected_a, rtol=0, atol=1e-10)
    torch.testing.assert_close(bx, expected_b, rtol=0, atol=1e-10)
    assert len(set(t.tolist())) > n // 4  # timesteps vary over the batch (not one t per batch)


@pytest.mark.parametrize("name", ["interpolant", "ddpm"])
def test_independent_noise_for_both_modalities(name):
    """Real RNG: with x == z the two noisy inputs would coincide if the noise were shared."""
    obj = build_objective(name)
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(16, 2, 4, 4, generator=gen, dtype=torch.float64)
    model = FakeModel(z_fn=lambda z_t, tt, x_t: z_t, x_out_channels=4 if name == "ddpm" else None)
    torch.manual_seed(1)
    obj.loss(model, x, x.clone(), None)
    rec = model.calls[0]
    t = rec["t"]
    if name == "interpolant":
        a, b = t.double(), 1 - t.double()
    else:
        abar = torch.as_tensor(np_schedule()["abar"])[t]
        a, b = abar.sqrt(), (1 - abar).sqrt()
    a, b = a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)
    ex, ez = (rec["x_t"] - a * x) / b, (rec["z_t"] - a * x) / b
    assert not torch.allclose(rec["x_t"], rec["z_t"])
    assert (ex - ez).abs().max() > 0.5
    corr = torch.corrcoef(torch.stack([ex.flatten(), ez.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.15
    assert 0.8 < ex.std().item() < 1.2 and 0.8 < ez.std().item() < 1.2


# === 5. representation dropout ======================================================================


def _dropped(z_t: torch.Tensor) -> torch.Tensor:
    return z_t.flatten(1).abs().sum(1) == 0


def _flag_dropped(z_t, tt, x_t):
    """Dropped inputs (all-zero z_t) get a huge prediction: their error would dominate loss_z."""
    return torch.where(_dropped(z_t).view(-1, 1, 1, 1), torch.full_like(z_t, 1000.0), z_t)


@pytest.mark.parametrize("name", ["interpolant", "ddpm"])
def test_per_sample_rep_dropout(name, known_noise):
    p, n = 0.2, 10_000
    obj = build_objective(name, rep_dropout=p, learn_sigma=False) if name == "ddpm" else \
        build_objective(name, rep_dropout=p)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(n, 2, 2, 2, generator=gen, dtype=torch.float64)
    model = FakeModel(z_fn=_flag_dropped)
    torch.manual_seed(2)
    losses = obj.loss(model, x, z, None)
    rec = model.calls[0]
    dropped = _dropped(rec["z_t"])
    frac = dropped.double().mean().item()
    assert abs(frac - p) < 3 * math.sqrt(p * (1 - p) / n)
    assert losses["rep_dropped"].item() == pytest.approx(frac, abs=1e-6)
    assert torch.count_nonzero(rec["z_t"][dropped]) == 0  # exactly zero, every element
    assert (rec["z_t"][~dropped].flatten(1).abs() > 0).all()  # kept ones carry noise everywhere

    ez = noise_of_shape(known_noise, z.shape)
    target = z - ez if name == "interpolant" else ez
    per_sample = ((rec["z_t"] - target) ** 2).flatten(1).mean(1)
    expected = per_sample[~dropped].sum() / n  # rep_dropout_norm "batch" (default): dropped count as 0
    assert losses["loss_z"].item() == pytest.approx(expected.item(), rel=1e-10)
    assert losses["loss_z"].item() < 100  # a dropped sample's error is ~1e6
    # loss_x is over every sample (dropout concerns only the representation)
    ex = noise_of_shape(known_noise, x.shape)
    t = rec["t"].double().view(-1, 1, 1, 1)
    target_x = x - ex if name == "interpolant" else ex
    expected_x = ((fake_x(rec["x_t"], t) - target_x) ** 2).mean()
    assert losses["loss_x"].item() == pytest.approx(expected_x.item(), rel=1e-10)


@pytest.mark.parametrize("name", ["interpolant", "ddpm"])
def test_rep_dropout_extremes(name):
    x, z, y = _data(n=32, seed=15)
    out_ch = 6 if name == "ddpm" else None
    none = FakeModel(x_out_channels=out_ch, z_fn=_flag_dropped)
    losses0 = build_objective(name, rep_dropout=0.0).loss(none, x, z, y)
    assert not _dropped(none.calls[0]["z_t"]).any()
    assert losses0["rep_dropped"].item() == 0.0 and losses0["loss_z"].item() < 100

    every = FakeModel(x_out_channels=out_ch, z_fn=_flag_dropped)
    obj = build_objective(name, rep_dropout=1.0, rep_weight=5.0)
    torch.manual_seed(3)
    losses1 = obj.loss(every, x, z, y)
    assert torch.count_nonzero(every.calls[0]["z_t"]) == 0
    assert losses1["loss_z"].item() == 0.0
    assert losses1["rep_dropped"].item() == 1.0
    rest = sum(v for k, v in losses1.items() if k in ("loss_x", "vb"))
    assert losses1["loss"].item() == pytest.approx(rest.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["interpolant", "ddpm"])
def test_batch_clean_dropout(name, known_noise):
    x, z, y = _data(n=8, seed=16)
    out_ch = 6 if name == "ddpm" else None
    model = FakeModel(x_out_channels=out_ch)
    obj = build_objective(name, rep_dropout=1.0, rep_dropout_mode="batch_clean")
    losses = obj.loss(model, x, z, y)
    rec = model.calls[0]
    ez = noise_of_shape(known_noise, z.shape)
    t = rec["t"]
    if name == "interpolant":
        b = (1 - t.double()).view(-1, 1, 1, 1)
        target = -ez  # clean z = 0: velocity 0 - eps
    else:
        b = (1 - torch.as_tensor(np_schedule()["abar"])[t]).sqrt().view(-1, 1, 1, 1)
        target = ez
    torch.testing.assert_close(rec["z_t"], b * ez, rtol=0, atol=1e-13)  # clean part zero, noise kept
    assert not _dropped(rec["z_t"]).any()
    expected = ((fake_z(rec["z_t"], t.double().view(-1, 1, 1, 1), rec["x_t"]) - target) ** 2).mean()
    assert losses["loss_z"].item() == pytest.approx(expected.item(), rel=1e-12)  # logged over all samples
    assert losses["loss_z"].item() > 1e-3
    assert losses["rep_dropped"].item() == 1.0  # the whole batch's clean z was dropped
    # official: a dropped batch has no z loss (lambda = 0), only the image terms
    rest = sum(v for k, v in losses.items() if k in ("loss_x", "vb"))
    assert losses["loss"].item() == pytest.approx(rest.item(), rel=1e-12)

    # p = 0: the clean z is kept
    known_noise.clear()
    model0 = FakeModel(x_out_channels=out_ch)
    build_objective(name, rep_dropout=0.0, rep_dropout_mode="batch_clean").loss(model0, x, z, y)
    ez0 = noise_of_shape(known_noise, z.shape)
    t0 = model0.calls[0]["t"]
    if name == "interpolant":
        a0, b0 = t0.double().view(-1, 1, 1, 1), (1 - t0.double()).view(-1, 1, 1, 1)
    else:
        abar0 = torch.as_tensor(np_schedule()["abar"])[t0].view(-1, 1, 1, 1)
        a0, b0 = abar0.sqrt(), (1 - abar0).sqrt()
    torch.testing.assert_close(model0.calls[0]["z_t"], a0 * z + b0 * ez0, rtol=0, atol=1e-13)


def _hand_losses(name: str, x, z, t, ex, ez, drop: np.ndarray, learn_sigma: bool = False):
    """Closed forms in float64 numpy of a FakeModel's per-sample losses, given t, the noises and the
    per-sample mask of zeroed z_t ('sample' mode): (loss_x, per-sample z error, vb or None)."""
    xn, zn, exn, ezn = (v.numpy() for v in (x, z, ex, ez))
    tn = t.numpy().astype(np.float64).reshape(-1, 1, 1, 1)
    if name == "interpolant":
        a, b = tn, 1 - tn
        target_x, target_z = xn - exn, zn - ezn
    else:
        abar = np_schedule()["abar"][t.numpy()].reshape(-1, 1, 1, 1)
        a, b = np.sqrt(abar), np.sqrt(1 - abar)
        target_x, target_z = exn, ezn
    x_t, z_t = a * xn + b * exn, a * zn + b * ezn
    z_t = np.where(drop.reshape(-1, 1, 1, 1), 0.0, z_t)
    pred_x = 0.5 * x_t + 0.25 * tn / (1 + tn)  # fake_x
    pred_z = -0.3 * z_t + 0.1 * tn / (1 + tn) + 0.2 * x_t.mean(axis=(1, 2, 3)).reshape(-1, 1, 1, 1)  # fake_z
    loss_x = ((pred_x - target_x) ** 2).mean()
    per_sample_z = ((pred_z - target_z) ** 2).reshape(len(xn), -1).mean(1)
    vb = None
    if learn_sigma:
        out = torch.cat([torch.from_numpy(pred_x), torch.tanh(torch.from_numpy(x_t))], 1)
        vb = GaussianDiffusion(learn_sigma=True).vb_terms_bpd(out, x, torch.from_numpy(x_t), t).mean().item()
    return loss_x, per_sample_z, vb


@pytest.mark.parametrize("name", ["interpolant", "ddpm"])
@pytest.mark.parametrize("p_drop", [0.0, 1.0])
def test_batch_clean_losses_by_hand(name, p_drop, known_noise, monkeypatch):
    """Official batch dropout: p = 0 is the plain joint loss, loss_x (+ vb) + lambda * loss_z; p = 1
    zeroes the clean z of the batch (z_t = b * eps_z) and the total is loss_x (+ vb) alone."""
    learn_sigma, rep_weight = name == "ddpm", 2.5
    obj = build_objective(name, rep_weight=rep_weight, rep_dropout=p_drop, rep_dropout_mode="batch_clean",
                          **({"learn_sigma": True} if learn_sigma else {}))
    x, z, y = _data(n=5, seed=40)
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64) if name == "interpolant" else \
        torch.tensor([0, 3, 250, 700, 999])
    monkeypatch.setattr(obj, "sample_t", lambda n, device: t.clone())
    model = FakeModel(x_out_channels=2 * x.shape[1] if learn_sigma else None)
    losses = obj.loss(model, x, z, y)
    ex, ez = noise_of_shape(known_noise, x.shape), noise_of_shape(known_noise, z.shape)
    clean_z = z if p_drop == 0.0 else torch.zeros_like(z)
    loss_x, per_sample_z, vb = _hand_losses(name, x, clean_z, t, ex, ez, np.zeros(5, bool), learn_sigma)
    assert losses["loss_x"].item() == pytest.approx(loss_x, rel=1e-12)
    assert losses["loss_z"].item() == pytest.approx(per_sample_z.mean(), rel=1e-12)
    assert losses["rep_dropped"].item() == p_drop
    image = loss_x + (vb if learn_sigma else 0.0)
    if learn_sigma:
        assert losses["vb"].item() == pytest.approx(vb, rel=1e-10)
    expected = image + (rep_weight * per_sample_z.mean() if p_drop == 0.0 else 0.0)
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-10)
    if p_drop == 1.0:  # the z input is the pure scaled noise, not 0
        b = (1 - t.double()) if name == "interpolant" else torch.as_tensor(
            np.sqrt(1 - np_schedule()["abar"][t.numpy()]))
        torch.testing.assert_close(model.calls[0]["z_t"], b.view(-1, 1, 1, 1) * ez, rtol=0, atol=1e-13)


def test_batch_clean_drops_whole_batches_with_probability_p(known_noise):
    """p = 0.3: each call either drops the whole batch (z_t = (1 - t) eps_z, total = loss_x) or keeps
    it all (z_t = t z + (1 - t) eps_z, total = loss_x + lambda * loss_z); ~p of the calls drop."""
    obj = LinearInterpolant(rep_weight=1.5, rep_dropout=0.3, rep_dropout_mode="batch_clean")
    x, z, y = _data(n=6, seed=41)
    torch.manual_seed(42)
    dropped, calls = 0, 400
    for _ in range(calls):
        known_noise.clear()
        model = FakeModel()
        losses = obj.loss(model, x, z, y)
        rec = model.calls[0]
        ez = noise_of_shape(known_noise, z.shape)
        tt = rec["t"].double().view(-1, 1, 1, 1)
        frac = losses["rep_dropped"].item()
        assert frac in (0.0, 1.0)
        if frac == 1.0:
            dropped += 1
            torch.testing.assert_close(rec["z_t"], (1 - tt) * ez, rtol=0, atol=1e-13)
            assert losses["loss"].item() == pytest.approx(losses["loss_x"].item(), rel=1e-12)
        else:
            torch.testing.assert_close(rec["z_t"], tt * z + (1 - tt) * ez, rtol=0, atol=1e-13)
            total = losses["loss_x"] + 1.5 * losses["loss_z"]
            assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-12)
    sd = math.sqrt(0.3 * 0.7 / calls)
    assert abs(dropped / calls - 0.3) < 4 * sd


@pytest.mark.parametrize("name", ["interpolant", "ddpm"])
@pytest.mark.parametrize("norm", ["batch", "kept"])
def test_per_sample_dropout_normalisation_by_hand(name, norm, known_noise, monkeypatch):
    """loss_z = sum over kept samples / N ("batch", official expectation lambda * (1 - p)) or / #kept
    ("kept"), on a known mask, against numpy; the total is loss_x (+ vb) + lambda * loss_z."""
    learn_sigma, rep_weight = name == "ddpm", 0.8
    obj = build_objective(name, rep_weight=rep_weight, rep_dropout=0.5, rep_dropout_norm=norm,
                          **({"learn_sigma": True} if learn_sigma else {}))
    n = 6
    x, z, y = _data(n=n, seed=43)
    t = torch.tensor([0.1, 0.2, 0.45, 0.6, 0.75, 0.9], dtype=torch.float64) if name == "interpolant" else \
        torch.tensor([1, 10, 200, 400, 800, 990])
    drop = np.array([True, False, False, True, True, False])
    monkeypatch.setattr(obj, "sample_t", lambda n, device: t.clone())
    monkeypatch.setattr(obj, "drop_mask", lambda n, device: torch.from_numpy(drop.copy()))
    model = FakeModel(x_out_channels=2 * x.shape[1] if learn_sigma else None)
    losses = obj.loss(model, x, z, y)
    ex, ez = noise_of_shape(known_noise, x.shape), noise_of_shape(known_noise, z.shape)
    loss_x, per_sample_z, vb = _hand_losses(name, x, z, t, ex, ez, drop, learn_sigma)
    kept_sum = per_sample_z[~drop].sum()
    loss_z = kept_sum / n if norm == "batch" else kept_sum / (~drop).sum()
    assert losses["loss_z"].item() == pytest.approx(loss_z, rel=1e-12)
    assert losses["loss_x"].item() == pytest.approx(loss_x, rel=1e-12)
    assert losses["rep_dropped"].item() == pytest.approx(drop.mean())
    expected = loss_x + (vb if learn_sigma else 0.0) + rep_weight * loss_z
    assert losses["loss"].item() == pytest.approx(expected, rel=1e-10)
    assert torch.count_nonzero(model.calls[0]["z_t"][torch.from_numpy(drop)]) == 0
    # the two norms differ by exactly #kept / N
    ratio = (~drop).sum() / n
    assert (loss_z * ratio if norm == "kept" else loss_z) == pytest.approx(kept_sum / n, rel=1e-12)


@pytest.mark.parametrize("norm", ["batch", "kept"])
def test_per_sample_dropout_everything_dropped(norm, monkeypatch):
    """All samples dropped: no z loss under either norm (no division by zero kept samples)."""
    obj = LinearInterpolant(rep_dropout=1.0, rep_dropout_norm=norm, rep_weight=3.0)
    x, z, y = _data(n=4, seed=44)
    losses = obj.loss(FakeModel(), x, z, y)
    assert losses["loss_z"].item() == 0.0 and losses["rep_dropped"].item() == 1.0
    assert losses["loss"].item() == pytest.approx(losses["loss_x"].item(), rel=1e-15)


def test_invalid_dropout_settings_raise():
    with pytest.raises(ValueError):
        LinearInterpolant(rep_dropout_mode="per_batch")
    with pytest.raises(ValueError):
        GaussianDiffusion(rep_dropout_mode="nope")
    with pytest.raises(ValueError):
        LinearInterpolant(rep_dropout=1.5)
    with pytest.raises(ValueError):
        GaussianDiffusion(rep_dropout=-0.1)
    with pytest.raises(ValueError, match="rep_dropout_norm must be one of"):
        LinearInterpolant(rep_dropout_norm="samples")


# === 6. gradients into both heads ===================================================================


@pytest.mark.parametrize("fusion", ["merged", "separate"])
@pytest.mark.parametrize("name", ["ddpm", "interpolant"])
def test_joint_loss_gradients_reach_both_branches(name, fusion):
    learn_sigma = name == "ddpm"
    model = tiny_model(fusion, learn_sigma=learn_sigma)
    randomise(model, seed=17)
    obj = build_objective(name)
    gen = torch.Generator().manual_seed(18)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    z = torch.randn(4, 4, 4, 4, generator=gen)
    y = torch.randint(0, 10, (4,), generator=gen)
    torch.manual_seed(4)
    losses = obj.loss(model, x, z, y)
    groups = {name: list(getattr(model, name).parameters())
              for name in ("x_embedder", "final_layer", "z_embedder", "final_layer_z")}

    def grad_norms(value):
        flat = [p for ps in groups.values() for p in ps]
        grads = torch.autograd.grad(value, flat, retain_graph=True, allow_unused=True)
        out, i = {}, 0
        for key, ps in groups.items():
            gs = grads[i:i + len(ps)]
            i += len(ps)
            out[key] = sum(0.0 if g is None else g.abs().sum().item() for g in gs)
        return out

    from_z, from_x = grad_norms(losses["loss_z"]), grad_norms(losses["loss_x"])
    total = grad_norms(losses["loss"])
    assert from_z["z_embedder"] > 0 and from_z["final_layer_z"] > 0
    assert from_z["final_layer"] == 0.0  # the x head does not see loss_z
    assert from_x["x_embedder"] > 0 and from_x["final_layer"] > 0
    assert from_x["final_layer_z"] == 0.0  # the z head does not see loss_x
    assert all(v > 0 for v in total.values())


@pytest.mark.parametrize("name", ["ddpm", "interpolant"])
def test_concat_loss_lives_at_the_latent_resolution(name, known_noise):
    """concat: the grid z (N, r, G, G) is lifted to (N, r, H, W) before noising; its noise, z_t, target
    and loss are at the latent resolution, and loss_z is the mean error of the model's eps_z there."""
    learn_sigma = name == "ddpm"
    inner = tiny_model("concat", rep_channels=3, learn_sigma=learn_sigma)  # r != C: noises told apart
    randomise(inner, seed=45)
    inner.eval()  # no label dropout: a second forward sees the same conditioning
    model = Recorder(inner)  # wraps it as `module`, like DDP: the objective unwraps it to lift z
    obj = build_objective(name, rep_weight=1.7)
    gen = torch.Generator().manual_seed(46)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    z = torch.randn(3, 3, 4, 4, generator=gen)  # on the 4x4 token grid (patch 2)
    y = torch.randint(0, 10, (3,), generator=gen)
    losses = obj.loss(model, x, z, y)
    x_t, t, _, z_t = model.args
    assert z_t.shape == (3, 3, 8, 8)  # the latent's resolution, not the token grid
    ez = noise_of_shape(known_noise, (3, 3, 8, 8))  # the z noise is drawn there too
    assert not any(tuple(d.shape) == tuple(z.shape) for d in known_noise)
    lifted = inner.lift_representation(z)
    if name == "interpolant":
        a, b = t.view(-1, 1, 1, 1), 1 - t.view(-1, 1, 1, 1)
        target = lifted - ez
    else:
        abar = torch.as_tensor(np_schedule()["abar"])[t].float().view(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        target = ez
    torch.testing.assert_close(z_t, a * lifted + b * ez, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        pred = inner(x_t, t, y, z_t)
    assert pred.z.shape == (3, 3, 8, 8)
    loss_z = ((pred.z - target) ** 2).mean()
    assert losses["loss_z"].item() == pytest.approx(loss_z.item(), rel=1e-5)
    ex = noise_of_shape(known_noise, x.shape)
    target_x = ex if name == "ddpm" else x - ex
    assert losses["loss_x"].item() == pytest.approx(((pred.x[:, :4] - target_x) ** 2).mean().item(), rel=1e-5)
    total = losses["loss_x"] + 1.7 * losses["loss_z"] + losses.get("vb", 0.0)
    assert losses["loss"].item() == pytest.approx(total.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "interpolant"])
def test_concat_joint_loss_gradients_split_by_channel(name):
    """concat has one head: loss_z trains its z rows only, loss_x its x (and variance) rows only."""
    learn_sigma = name == "ddpm"
    model = tiny_model("concat", rep_channels=3, learn_sigma=learn_sigma)
    randomise(model, seed=47)
    gen = torch.Generator().manual_seed(48)
    x, z = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 3, 4, 4, generator=gen)
    torch.manual_seed(7)
    losses = build_objective(name).loss(model, x, z, torch.randint(0, 10, (4,), generator=gen))
    weight = model.final_layer.linear.weight
    channel = torch.arange(weight.shape[0]) % model.out_channels  # [x(4), z(3)] (+ [var_x(4), var_z(3)])
    z_rows = (channel >= 4) & (channel < 7)
    (gz,) = torch.autograd.grad(losses["loss_z"], [weight], retain_graph=True)
    (gx,) = torch.autograd.grad(losses["loss_x"], [weight], retain_graph=True)
    gz, gx = gz.abs().sum(1), gx.abs().sum(1)
    assert (gz[z_rows] > 0).all() and not gz[~z_rows].any()
    assert (gx[channel < 4] > 0).all() and not gx[~(channel < 4)].any()
    if learn_sigma:  # the VLB trains the x variance rows; the z variance rows are unused
        (gv,) = torch.autograd.grad(losses["vb"], [weight], retain_graph=True)
        gv = gv.abs().sum(1)
        assert (gv[(channel >= 7) & (channel < 11)] > 0).all() and not gv[channel >= 11].any()


# === 7. build_objective and timestep laws ===========================================================


def test_build_objective():
    assert set(OBJECTIVES) == {"ddpm", "interpolant"}
    ddpm = build_objective("ddpm", rep_weight=0.5, rep_dropout=0.2, learn_sigma=False)
    assert isinstance(ddpm, GaussianDiffusion)
    assert (ddpm.rep_weight, ddpm.rep_dropout, ddpm.learn_sigma) == (0.5, 0.2, False)
    sit = build_objective("interpolant", rep_dropout_norm="kept")
    assert isinstance(sit, LinearInterpolant) and sit.rep_dropout_norm == "kept"
    assert build_objective("ddpm").learn_sigma is True
    d = build_objective("interpolant")
    defaults = (d.rep_weight, d.rep_dropout, d.rep_dropout_mode, d.rep_dropout_norm)
    assert defaults == (1.0, 0.0, "sample", "batch")
    with pytest.raises(TypeError):  # REPA was removed: no weight to set
        build_objective("interpolant", repa_weight=0.5)
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("edm")


def test_timestep_laws():
    torch.manual_seed(6)
    t = GaussianDiffusion().sample_t(100_000, torch.device("cpu"))
    assert t.shape == (100_000,) and not t.is_floating_point()
    assert t.min().item() == 0 and t.max().item() == T_STEPS - 1
    assert abs(t.double().mean().item() - 499.5) < 5
    u = LinearInterpolant().sample_t(100_000, torch.device("cpu"))
    assert u.shape == (100_000,) and u.is_floating_point()
    assert u.min().item() >= 0.0 and u.max().item() <= 1.0
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min().item() < 0.01 and u.max().item() > 0.99


def test_z_for_a_model_without_fusion_is_a_clear_error():
    model = build_model("S", 2, input_size=8, depth=1, hidden_size=32, num_heads=2,
                        num_classes=10)
    x, z, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="fusion='none'"):
        build_objective("interpolant").loss(model, x, z, y)


def test_negative_loss_weights_are_rejected():
    with pytest.raises(ValueError, match=r"rep_weight \(the representation loss weight\) must be >= 0"):
        build_objective("interpolant", rep_weight=-1.0)
