"""Guidance (CFG, Representation Guidance) and the ODE / DDIM samplers."""

import math

import numpy as np
import pytest
import torch

from redi.diffusion import GaussianDiffusion
from redi.diffusion.ddpm import respaced_timesteps
from redi.guidance import Guidance, guided_prediction
from redi.models import build_model
from redi.samplers import PerSampleNoise, ddim_sample, ddpm_sample, generator_noise, ode_sample, sde_sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model("S", 2, input_size=8, depth=2, hidden_size=32, num_heads=2, num_classes=5,
                      fusion="merged", rep_channels=3).double().eval()
    with torch.no_grad():  # leave DiT's zero init, so the heads respond to every input
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=torch.float64)
    z = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return x, z, torch.rand(n, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3][:n])


def test_scale_one_is_the_plain_conditional_prediction(model):
    x, z, t, y = inputs()
    plain = model(x, t, y, z)
    for guidance in (Guidance(), Guidance(cfg_scale=1.0, rg_scale=1.0, cfg_all_channels=True)):
        px, pz = guided_prediction(model, x, t, y, z, guidance, null_label=5)
        torch.testing.assert_close(px, plain.x, rtol=0, atol=0)
        torch.testing.assert_close(pz, plain.z, rtol=0, atol=0)


def test_cfg_and_rg_in_one_batch_equal_three_separate_forwards(model):
    x, z, t, y = inputs()
    c = model(x, t, y, z)
    u = model(x, t, torch.full_like(y, 5), z)
    zero = model(x, t, y, torch.zeros_like(z))
    w_cfg, w_rg = 2.5, 1.7
    px, pz = guided_prediction(model, x, t, y, z, Guidance(cfg_scale=w_cfg, rg_scale=w_rg), null_label=5)
    pc, pu, p0 = c.x[:, :4], u.x[:, :4], zero.x[:, :4]
    expected = pc + (w_cfg - 1) * (pc - pu) + (w_rg - 1) * (pc - p0)
    torch.testing.assert_close(px[:, :4], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(px[:, 4:], c.x[:, 4:], rtol=1e-9, atol=1e-9)  # variance channels: p_c's
    torch.testing.assert_close(pz, c.z, rtol=1e-9, atol=1e-9)  # CFG on the image only by default
    # CFG alone is the textbook p_u + w (p_c - p_u); on all channels it guides z as well
    px, pz = guided_prediction(model, x, t, y, z, Guidance(cfg_scale=w_cfg, cfg_all_channels=True), 5)
    torch.testing.assert_close(px[:, :4], pu + w_cfg * (pc - pu), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pz, u.z + w_cfg * (c.z - u.z), rtol=1e-9, atol=1e-9)
    # RG alone is p_0 + w (p_c - p_0)
    px, _ = guided_prediction(model, x, t, y, z, Guidance(rg_scale=w_rg))
    torch.testing.assert_close(px[:, :4], p0 + w_rg * (pc - p0), rtol=1e-9, atol=1e-9)


def test_guidance_interval_switches_cfg_per_sample(model):
    x, z, _, y = inputs()
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    plain = model(x, t, y, z).x[:, :4]
    full, _ = guided_prediction(model, x, t, y, z, Guidance(cfg_scale=3.0), null_label=5)
    px, _ = guided_prediction(model, x, t, y, z, Guidance(cfg_scale=3.0, interval=(0.3, 0.7)), 5)
    torch.testing.assert_close(px[[0, 3], :4], plain[[0, 3]], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(px[[1, 2], :4], full[[1, 2], :4], rtol=1e-9, atol=1e-9)


def test_cfg_on_the_first_image_channels_leaves_the_others_conditional(model):
    x, z, t, y = inputs()
    plain = model(x, t, y, z)
    full, _ = guided_prediction(model, x, t, y, z, Guidance(cfg_scale=3.0), null_label=5)
    first3, _ = guided_prediction(model, x, t, y, z, Guidance(cfg_scale=3.0, cfg_image_channels=3),
                                  null_label=5)
    torch.testing.assert_close(first3[:, :3], full[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(first3[:, 3:], plain.x[:, 3:], rtol=0, atol=0)  # channel 4 + variance
    assert not torch.allclose(full[:, 3], plain.x[:, 3])


def test_guidance_without_what_it_needs_is_a_clear_error(model):
    x, z, t, y = inputs()
    with pytest.raises(ValueError, match="null label"):
        guided_prediction(model, x, t, y, z, Guidance(cfg_scale=2.0))
    with pytest.raises(ValueError, match="generates z"):
        guided_prediction(model, x, t, y, None, Guidance(rg_scale=2.0))


# --- samplers on a Gaussian toy target with the exact field -------------------------------------
MU, SIGMA = 1.5, 0.5


def exact_velocity(x, z, t):
    """E[x1 - eps | x_t = x] for x1 ~ N(MU, SIGMA^2), x_t = t x1 + (1 - t) eps."""
    a, b = t.view(-1, 1), 1 - t.view(-1, 1)
    v = MU + (a * SIGMA**2 - b) / (a**2 * SIGMA**2 + b**2) * (x - a * MU)
    return v, None if z is None else torch.zeros_like(z)


@pytest.mark.parametrize("method, steps", [("euler", 400), ("heun", 50)])
def test_ode_reaches_the_target_distribution(method, steps):
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out, _ = ode_sample(exact_velocity, noise, None, steps=steps, method=method)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(SIGMA, abs=0.02)


def test_sde_reaches_the_target_distribution_and_draws_noise():
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = [generator_noise(torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    out, _ = sde_sample(exact_velocity, noise, None, steps=250, noise=draws[0])
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(SIGMA, abs=0.03)
    again, _ = sde_sample(exact_velocity, noise, None, steps=250, noise=draws[1])
    assert not torch.equal(out, again)  # stochastic: another generator, other samples
    ode, _ = ode_sample(exact_velocity, noise, None, steps=250, method="euler")
    assert (out - ode).abs().mean().item() > 0.01  # not the ODE in disguise


def test_ode_moves_z_along_with_x():
    x, z = torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    out_x, out_z = ode_sample(lambda x, z, t: (torch.ones_like(x), 2 * torch.ones_like(z)), x, z, steps=10)
    torch.testing.assert_close(out_x, torch.ones_like(x))
    torch.testing.assert_close(out_z, 2 * torch.ones_like(z))


def exact_epsilon_of(z, a, mu=-1.0, sigma=2.0):
    """E[eps | z_t] for z0 ~ N(mu, sigma^2): a second target, for the representation channels."""
    return (1 - a).sqrt() * (z - a.sqrt() * mu) / (a * sigma**2 + 1 - a)


def exact_epsilon(diffusion):
    abar = torch.from_numpy(diffusion.schedule["alphas_cumprod"])

    def predict(x, z, t):
        a = abar[t].view(-1, *[1] * (x.dim() - 1))
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)
        return eps, None if z is None else exact_epsilon_of(z, a)

    return predict


def test_ddim_eta0_is_deterministic_and_reaches_the_target():
    diffusion = GaussianDiffusion(learn_sigma=False)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first, _ = ddim_sample(diffusion, exact_epsilon(diffusion), noise, None, steps=100)
    second, _ = ddim_sample(diffusion, exact_epsilon(diffusion), noise.clone(), None, steps=100)
    assert torch.equal(first, second)
    assert first.mean().item() == pytest.approx(MU, abs=0.03)
    assert first.std().item() == pytest.approx(SIGMA, abs=0.03)


def test_ddim_with_eta_draws_noise():
    diffusion = GaussianDiffusion(learn_sigma=False)
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, _ = ddim_sample(diffusion, exact_epsilon(diffusion), noise, None, steps=20, eta=1.0,
                       noise=generator_noise(torch.Generator().manual_seed(1)))
    b, _ = ddim_sample(diffusion, exact_epsilon(diffusion), noise, None, steps=20, eta=1.0,
                       noise=generator_noise(torch.Generator().manual_seed(2)))
    assert not torch.equal(a, b) and math.isfinite(a.sum().item())


def test_respacing_matches_adm_stride_and_keeps_both_ends():
    for steps in (1, 21, 25, 50, 250, 278, 1000):  # 21: a .5 tie ADM's accumulation rounds down
        kept = respaced_timesteps(1000, steps)
        # ADM's space_timesteps("N"): accumulate the fractional stride, round each position
        stride, position, reference = (1000 - 1) / max(steps - 1, 1), 0.0, []
        for _ in range(steps):
            reference.append(round(position))
            position += stride
        assert kept.tolist() == reference and len(kept) == steps
    with pytest.raises(ValueError, match="steps"):
        respaced_timesteps(1000, 0)


def test_respaced_diffusion_keeps_the_cumulative_alphas():
    full = GaussianDiffusion()
    respaced, kept = full.respaced(50)
    np.testing.assert_allclose(respaced.schedule["alphas_cumprod"], full.schedule["alphas_cumprod"][kept],
                               rtol=1e-12)
    assert respaced.num_steps == 50


def test_ddpm_ancestral_reaches_both_targets_with_learned_variance_channels():
    diffusion = GaussianDiffusion(learn_sigma=True)
    eps = exact_epsilon(diffusion)

    def predict(x, z, t):  # variance channels at -1: the posterior's variance (fixed small)
        ex, ez = eps(x, z, t)
        return torch.cat([ex, -torch.ones_like(ex)], dim=1), ez

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    z = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    out_x, out_z = ddpm_sample(diffusion, predict, x, z, steps=250, noise=generator_noise(g))
    assert out_x.mean().item() == pytest.approx(MU, abs=0.03)
    assert out_x.std().item() == pytest.approx(SIGMA, abs=0.03)
    assert out_z.mean().item() == pytest.approx(-1.0, abs=0.06)
    assert out_z.std().item() == pytest.approx(2.0, abs=0.06)


def test_ddpm_uses_the_learned_variance():
    diffusion = GaussianDiffusion(learn_sigma=True)
    eps = exact_epsilon(diffusion)
    x = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spread = []
    for v in (-1.0, 1.0):  # the fixed-small vs the fixed-large end of the learned range
        def predict(x, z, t, v=v):
            ex, _ = eps(x, z, t)
            return torch.cat([ex, torch.full_like(ex, v)], dim=1), None
        out, _ = ddpm_sample(diffusion, predict, x, None, steps=50,
                             noise=generator_noise(torch.Generator().manual_seed(1)))
        spread.append(out.std().item())
    assert spread[1] > spread[0] + 0.01  # larger variance, wider samples


def test_per_sample_noise_does_not_depend_on_the_batch():
    like = torch.zeros(3, 2, 4)
    together = PerSampleNoise([10, 11, 12])(like)
    alone = torch.cat([PerSampleNoise([s])(like[:1]) for s in (10, 11, 12)])
    assert torch.equal(together, alone)
    assert not torch.equal(together[0], together[1])
    labels = PerSampleNoise([10, 11, 12]).integers(1000)
    assert labels.shape == (3,) and labels.tolist() == [PerSampleNoise([s]).integers(1000).item()
                                                        for s in (10, 11, 12)]
    with pytest.raises(ValueError, match="seeds"):
        PerSampleNoise([1])(like)
