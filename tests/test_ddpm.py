"""
ddpm.py against analytic ground truth.

Tolerances: sample moments are compared within 5 standard errors of the sample count (a false alarm rate of
~1e-6 per check); deterministic identities within float64 round-off (1e-10 or tighter). Each test was seen to
fail with a deliberately broken formula (a flipped sign, beta for sqrt(beta), a shifted index).
"""

import math

import numpy as np
import pytest
import torch

from ddpm import (GaussianDiffusion, ImportanceSampler, discretized_gaussian_log_likelihood, normal_kl)
from schedules import get_named_beta_schedule
from tests.analytic import GaussianEps, MixtureEps, ddpm_steps, gaussian_moment_recursion

T = 1000
MU, S = 0.3, 0.1          # narrow data: a loose or wrong sampler shows up clearly


def diffusion(var_type="fixed_large", loss_type="mse", schedule="linear", T=T):
    return GaussianDiffusion(get_named_beta_schedule(schedule, T), var_type, loss_type)


def assert_moments(x, m, v, n_se=5.0):
    """Sample mean and variance of all entries of x equal (m, v) within n_se standard errors."""
    n = x.numel()
    x = x.double().flatten()
    se_m, se_v = math.sqrt(v / n), v * math.sqrt(2.0 / (n - 1))
    assert abs(x.mean().item() - m) < n_se * se_m, (x.mean().item(), m, se_m)
    assert abs(x.var().item() - v) < n_se * se_v, (x.var().item(), v, se_v)


def ddpm_recursion(abar, abar_prev, var_type, mu=MU, s=S):
    """Mean/variance of DDPM ancestral sampling with the exact eps on Gaussian data, from x_T ~ N(0, 1), step by step
    (the steps: tests/analytic.ddpm_steps, written from DDPM eq. 11)."""
    return gaussian_moment_recursion(ddpm_steps(abar, abar_prev, var_type, mu, s), 0.0, 1.0)


def test_forward_marginal_equals_composed_steps():
    d = diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(4000, 8, generator=g, dtype=torch.float64)
    k = 300
    x = x0
    for i in range(k + 1):                                      # F1 applied k+1 times: code t = 0..k
        x = d.q_step_sample(x, torch.full((x.shape[0],), i), torch.randn(x.shape, generator=g, dtype=torch.float64))
    one_shot = d.q_sample(x0, torch.full((x0.shape[0],), k), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    # F2: x_t ~ N(sqrt(abar_t) mu, abar_t s^2 + 1 - abar_t), with abar the product of (1 - beta)
    abar = float(np.prod(1 - d.betas[: k + 1].numpy()))
    m, v = math.sqrt(abar) * MU, abar * S * S + 1 - abar
    assert_moments(x, m, v)
    assert_moments(one_shot, m, v)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_equals_numerical_bayes(t):
    d = diffusion("fixed_small")
    x0, xt = 0.4, -0.7
    beta = d.betas[t].item()
    abar_prev = d.alphas_cumprod[t - 1].item()
    # p(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), on a fine grid
    grid = np.linspace(-6, 6, 400001)
    log_p = (-(xt - math.sqrt(1 - beta) * grid) ** 2 / (2 * beta)
             - (grid - math.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev)))
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    mean_num = (p * grid).sum()
    var_num = (p * (grid - mean_num) ** 2).sum()
    tt = torch.tensor([t])
    mean, var, log_var = d.q_posterior_mean_variance(torch.tensor([[x0]], dtype=torch.float64),
                                                     torch.tensor([[xt]], dtype=torch.float64), tt)
    assert mean.item() == pytest.approx(mean_num, abs=1e-7)
    assert var.item() == pytest.approx(var_num, rel=1e-5)
    assert log_var.exp().item() == pytest.approx(var_num, rel=1e-5)


def test_posterior_at_first_step_is_x0():
    d = diffusion()
    x0, xt = torch.tensor([[0.25]], dtype=torch.float64), torch.tensor([[0.9]], dtype=torch.float64)
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, torch.tensor([0]))
    # paper t = 1: abar_0 = 1, so q(x_0 | x_1, x_0) is a point mass at x_0
    assert mean.item() == pytest.approx(0.25, abs=1e-12) and var.item() == 0.0


def test_eps_x0_conversions_invert_forward_process():
    d = diffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (16,), generator=g)
    xt = d.q_sample(x0, t, eps)
    assert torch.allclose(d.predict_x0_from_eps(xt, t, eps), x0, atol=1e-9)
    assert torch.allclose(d.predict_eps_from_x0(xt, t, x0), eps, atol=1e-9)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_reverse_mean_is_ddpm_eq_11(var_type):
    d = diffusion(var_type)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    g = torch.Generator().manual_seed(2)
    xt = torch.randn(32, 5, generator=g, dtype=torch.float64)
    t = torch.randint(1, T, (32,), generator=g)
    out = d.p_mean_variance(model, xt, t, clip_denoised=False)
    beta, abar = d.betas[t][:, None], d.alphas_cumprod[t][:, None]
    # DDPM eq. 11: mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps)
    expected = (xt - beta / (1 - abar).sqrt() * model(xt, t)) / (1 - beta).sqrt()
    assert torch.allclose(out["mean"], expected, atol=1e-10)
    # R3: sigma^2 = beta_t (large) or beta~_t (small)
    var = beta if var_type == "fixed_large" else beta * (1 - d.alphas_cumprod_prev[t][:, None]) / (1 - abar)
    assert torch.allclose(out["variance"], var.expand_as(xt), rtol=1e-12)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_ancestral_sampling_matches_moment_recursion(var_type):
    d = diffusion(var_type)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    g = torch.Generator().manual_seed(3)
    x = d.p_sample_loop(model, (2000, 8), clip_denoised=False, generator=g, dtype=torch.float64)
    m, v = ddpm_recursion(d.alphas_cumprod.tolist(), d.alphas_cumprod_prev.tolist(), var_type)
    assert_moments(x, m, v)
    # and 1000 exact steps land on the data itself: within 2% of the mean and 10% of the variance
    assert m == pytest.approx(MU, rel=0.02) and v == pytest.approx(S * S, rel=0.10)


def test_ancestral_sampling_mixture_weights():
    d = diffusion("fixed_small")
    mus, w = [[-0.5, -0.5], [0.5, 0.5]], [0.3, 0.7]
    model = MixtureEps(mus, 0.1, w, d.alphas_cumprod)
    g = torch.Generator().manual_seed(4)
    x = d.p_sample_loop(model, (3000, 2), clip_denoised=False, generator=g, dtype=torch.float64)
    frac = (x.mean(1) > 0).double().mean().item()
    se = math.sqrt(0.7 * 0.3 / 3000)
    assert abs(frac - 0.7) < 5 * se, frac
    # every sample sits on a component (within 5 s of a mode per coordinate)
    near = torch.minimum((x - 0.5).abs().max(1).values, (x + 0.5).abs().max(1).values)
    assert (near < 0.5).double().mean().item() > 0.999


def test_respaced_betas_keep_alphas_cumprod_and_original_t():
    d = diffusion("fixed_small", schedule="cosine")
    sp = d.respace(50)
    kept = torch.arange(0, T, 20)
    assert sp.num_timesteps == 50
    assert torch.equal(sp.timestep_map, kept)
    # D4: the kept steps keep their abar exactly
    assert torch.allclose(sp.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert torch.allclose(sp.alphas_cumprod_prev[1:], d.alphas_cumprod[kept[:-1]], rtol=1e-12, atol=0)
    # respacing a respaced diffusion composes the maps
    assert torch.equal(sp.respace([0, 10, 49]).timestep_map, torch.tensor([0, 200, 980]))
    seen = []
    def recording_model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)
    sp.p_sample_loop(recording_model, (2, 1), dtype=torch.float64)
    assert torch.equal(torch.stack(seen)[:, 0], kept.flip(0)), "the model must receive the ORIGINAL t"


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_respaced_ancestral_sampling_matches_recursion(var_type):
    d = diffusion(var_type)
    sp = d.respace(100)
    model = GaussianEps(MU, S, d.alphas_cumprod)  # the model sees original t
    g = torch.Generator().manual_seed(5)
    x = sp.p_sample_loop(model, (4000, 8), clip_denoised=False, generator=g, dtype=torch.float64)
    m, v = ddpm_recursion(sp.alphas_cumprod.tolist(), sp.alphas_cumprod_prev.tolist(), var_type)
    assert_moments(x, m, v)
    assert m == pytest.approx(MU, rel=0.05)


def test_cond_fn_shifts_the_mean_by_sigma_times_gradient():
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.full((6,), 500)
    grad = torch.linspace(-1, 1, 18, dtype=torch.float64).reshape(6, 3)
    plain = d.p_sample(model, x, t, False, generator=torch.Generator().manual_seed(0))["sample"]
    guided = d.p_sample(model, x, t, False, cond_fn=lambda x, t: grad, generator=torch.Generator().manual_seed(0))["sample"]
    # G1 (ADM Algorithm 1): mean + Sigma * grad
    assert torch.allclose(guided - plain, d.betas[500] * grad, atol=1e-12)


def test_discretized_decoder_bins_sum_to_one_and_edges_are_open():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.05)), (0.97, math.log(0.02)), (-1.2, math.log(0.3)), (0.3, math.log(1e-3))]:
        lp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # L3 (DDPM eq. 13): the bin of -1 is (-inf, -1 + 1/255], the bin of 1 is [1 - 1/255, inf)
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    m, sd = -0.9, 0.2
    edge = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(edge[:2], torch.full((2,), m, dtype=torch.float64),
                                             torch.full((2,), math.log(sd), dtype=torch.float64))
    assert lp[0].item() == pytest.approx(math.log(Phi((-1 + 1 / 255 - m) / sd)), rel=1e-10)
    upper_tail = 0.5 * math.erfc((1 - 1 / 255 - m) / sd / math.sqrt(2))  # 1 - Phi(z), without underflow
    assert lp[1].item() == pytest.approx(math.log(upper_tail), rel=1e-8)
    x = levels[100].item()
    lp = discretized_gaussian_log_likelihood(levels[100:101], torch.tensor([m], dtype=torch.float64),
                                             torch.tensor([math.log(sd)], dtype=torch.float64))
    assert lp.item() == pytest.approx(math.log(Phi((x + 1 / 255 - m) / sd) - Phi((x - 1 / 255 - m) / sd)), rel=1e-8)


def test_prior_term_is_the_closed_form_kl():
    d = diffusion()
    x0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    abar = d.alphas_cumprod[-1].item()
    # L_T = KL(N(sqrt(abar) x0, 1 - abar) || N(0, 1)) = 1/2 (-1 - log(1 - abar) + (1 - abar) + abar x0^2), in bits
    kl = 0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x0 ** 2) / math.log(2)
    assert torch.allclose(d.prior_bpd(x0), kl.mean(1), rtol=1e-10)
    assert torch.allclose(normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1)), torch.tensor([0.5]))


def test_bound_terms_match_their_closed_form_and_bound_the_entropy():
    """For quantised Gaussian data and the exact eps the expected KL terms are closed-form; the whole bound
    (in bits/dim) must lie above the data's own entropy."""
    d = diffusion("fixed_small", T=1000)
    s = 0.2
    model = GaussianEps(0.0, s, d.alphas_cumprod)
    g = torch.Generator().manual_seed(6)
    x0 = (0.0 + s * torch.randn(200, 4, generator=g, dtype=torch.float64)).clamp(-1, 1)
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1              # onto the 256-level grid
    out = d.calc_bpd_loop(model, x0, clip_denoised=False, generator=g)
    assert out["vb"].shape == (200, 1000) and torch.isfinite(out["total_bpd"]).all()
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], rtol=1e-12)
    assert bool((out["vb"][:, 1:] >= -1e-12).all()), "KL terms are non-negative"
    # With the exact eps the model mean is E[x_{t-1} | x_t]; mu~ - mu_theta = coef1 (x_0 - E[x_0 | x_t]), so
    # E[L_{t-1}] = E||mu~ - mu_theta||^2 / (2 sigma_t^2) = coef1^2 Var(x_0 | x_t) / (2 beta~_t)   (DDPM eq. 8, sigma^2 = beta~)
    # with Var(x_0 | x_t) = s^2 (1 - abar_t) / (abar_t s^2 + 1 - abar_t). (Quantisation adds (2/255)^2/12 to s^2: negligible.)
    abar = d.alphas_cumprod
    var_x0 = s * s * (1 - abar) / (abar * s * s + 1 - abar)
    expected_kl = (d.posterior_mean_coef1 ** 2 * var_x0 / (2 * d.posterior_variance))[1:].sum().item() / math.log(2)
    kl_sum = out["vb"][:, 1:].sum(1)
    assert abs(kl_sum.mean().item() - expected_kl) < 5 * kl_sum.std().item() / math.sqrt(200), (kl_sum.mean(), expected_kl)
    # entropy of the quantised N(0, s^2) in bits: -sum P log2 P over the 256 bins; the bound must not undercut it
    levels = np.linspace(-1, 1, 256)
    Phi = lambda z: 0.5 * (1 + math.erf(z / (s * math.sqrt(2))))
    P = np.array([Phi(l + 1 / 255) - Phi(l - 1 / 255) for l in levels])
    H = -(P[P > 0] * np.log2(P[P > 0])).sum()
    bound = out["total_bpd"]
    assert bound.mean().item() > H - 5 * bound.std().item() / math.sqrt(200), (bound.mean(), H)


def test_simple_loss_with_exact_eps_equals_its_closed_form():
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)
    g = torch.Generator().manual_seed(7)
    for t_ in (50, 400, 900):
        x0 = MU + S * torch.randn(20000, 4, generator=g, dtype=torch.float64)
        t = torch.full((20000,), t_)
        losses = d.training_losses(model, x0, t, generator=g)
        a = d.alphas_cumprod[t_].item()
        # E || eps - E[eps | x_t] ||^2 per dim = Var(eps | x_t) = abar s^2 / (abar s^2 + 1 - abar)
        expected = a * S * S / (a * S * S + 1 - a)
        mse = losses["mse"]
        assert torch.equal(losses["loss"], mse)
        assert abs(mse.mean().item() - expected) < 5 * mse.std().item() / math.sqrt(len(mse)), (t_, mse.mean(), expected)


class LearnedRangeModel(torch.nn.Module):
    """eps = a * eps*, v = b: two parameters, to check what each loss trains."""

    def __init__(self, d):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.9, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
        self.exact = GaussianEps(MU, S, d.alphas_cumprod)

    def forward(self, x, t):
        return torch.cat([self.a * self.exact(x, t), self.b.expand_as(x)], dim=1)


def test_learned_range_interpolates_log_variance():
    d = diffusion("learned_range", "hybrid")
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    exact = GaussianEps(MU, S, d.alphas_cumprod)
    for v, expected in [(1.0, d.betas[t]), (-1.0, d.posterior_variance[t])]:
        model = lambda x, t: torch.cat([exact(x, t), torch.full_like(x, v)], 1)
        out = d.p_mean_variance(model, x, t)
        # iDDPM eq. 15: v = 1 -> beta_t, v = 0 (network -1) -> beta~_t
        assert torch.allclose(out["variance"][:, 0], expected, rtol=1e-10)
    with pytest.raises(ValueError, match="learned_range"):
        d.p_mean_variance(exact, x, t)


def test_hybrid_loss_stops_the_gradient_of_the_mean_in_vlb():
    d = diffusion("learned_range", "hybrid")
    model = LearnedRangeModel(d)
    g = torch.Generator().manual_seed(8)
    x0 = MU + S * torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    terms = d.training_losses(model, x0, t, noise)
    # iDDPM eq. 16: L_hybrid = L_simple + 0.001 L_vlb
    assert torch.allclose(terms["loss"], terms["mse"] + 0.001 * terms["vb"])
    ga, gb = torch.autograd.grad(terms["loss"].mean(), [model.a, model.b], retain_graph=True)
    ga_mse, = torch.autograd.grad(terms["mse"].mean(), [model.a])
    assert ga.item() == pytest.approx(ga_mse.item(), rel=1e-12), "L_vlb must not train the mean"
    assert gb.item() != 0.0, "L_vlb trains the variance"
    kl = GaussianDiffusion(d.betas, "learned_range", "kl")
    terms = kl.training_losses(model, x0, t, noise)
    assert torch.allclose(terms["loss"], T * terms["vb"])
    ga, = torch.autograd.grad(terms["loss"].mean(), [model.a])
    assert ga.item() != 0.0, "the pure bound trains the mean"


def test_loss_config_errors():
    b = get_named_beta_schedule("linear", 10)
    for kw, word in [({"var_type": "learned"}, "var_type"), ({"loss_type": "l1"}, "loss_type"),
                     ({"loss_type": "hybrid"}, "hybrid"), ({"var_type": "learned_range"}, "mse")]:
        with pytest.raises(ValueError, match=word):
            GaussianDiffusion(b, **kw)


def test_importance_sampler_weights_and_history():
    Tn, K = 20, 10
    s = ImportanceSampler(Tn, history=K, uniform_prob=0.001)
    assert torch.allclose(s.probs(), torch.full((Tn,), 1 / Tn, dtype=torch.float64)), "uniform until warm"
    # fill each t's history with constant losses L_t = t + 1, plus old values that must be pushed out
    for rep in range(K + 3):
        t = torch.arange(Tn).repeat(2)
        vals = torch.where(torch.tensor(rep < 3), torch.full((2 * Tn,), 100.0), (t + 1).double())
        s.update(t, vals)
    p = s.probs()
    L = torch.arange(1, Tn + 1, dtype=torch.float64)
    # I3: p_t ∝ sqrt(E[L_t^2]) = L_t here (the ring buffer forgot the 100s), mixed with 0.1% uniform
    assert torch.allclose(p, 0.999 * L / L.sum() + 0.001 / Tn, rtol=1e-10)
    t, w = s.sample(1000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(w.double(), 1 / (Tn * p[t]), rtol=1e-6)
    # unbiased: E_p[w L_t] = mean_t L_t
    assert (p * (1 / (Tn * p)) * L).sum().item() == pytest.approx(L.mean().item())
    assert abs(t.double().mean().item() - (p * torch.arange(Tn)).sum().item()) < 0.5


def test_kl_term_is_eps_weight_times_eps_error():
    """L2: with sigma^2 = beta~ and no clipping, L_{t-1} = beta^2/(2 sigma^2 alpha (1 - abar)) ||eps - eps_theta||^2."""
    d = diffusion("fixed_small")
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(64, 6, generator=g, dtype=torch.float64)
    t = torch.randint(1, T, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = d.q_sample(x0, t, noise)
    wrong = lambda x, t: noise + 0.3 * torch.sin(x)      # any eps-model
    kl_bits = d._vb_terms_bpd(wrong, x0, xt, t, clip_denoised=False)["output"]
    # DDPM eq. 12 weight times the per-dim squared eps error, in bits
    expected = (d.eps_loss_weight(t, x0) * (noise - wrong(xt, t)) ** 2).mean(1) / math.log(2)
    assert torch.allclose(kl_bits, expected, rtol=1e-8)
