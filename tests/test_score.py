"""
score.py against analytic ground truth: the exact eps of Gaussian and Gaussian-mixture data (tests/analytic.py).

Tolerances. Sample moments: 5 standard errors of the sample count (assert_moments, as in test_ddpm.py) around a
moment recursion written from the papers' update rules, which is exact for Gaussian data and the exact eps (every step
is affine in x). Against the DATA itself a sampler is also allowed its known bias, and the bias is derived here:
  * Langevin with step d on N(m, v): x' - m = (1 - d/(2v)) (x - m) + sqrt(d) z has the fixed point
        Var = (1 - d/(2v))^2 Var + d   =>   Var_inf = v / (1 - d/(4v))                        (an O(d) inflation)
    test_single_level_langevin_has_the_derived_stationary_bias measures exactly this.
  * Annealing adds a lag: each level starts from the previous level's samples and Langevin with few steps does not
    forget its start. It shrinks as the number of steps grows (test_annealed_langevin_converges_to_the_data).
  * The SNR corrector (SDE Algorithm 5) is Langevin with d = 2 eps, eps ~ 2 alpha r^2 v for a Gaussian level, so its
    own stationary inflation is 1 / (1 - alpha r^2) <= 1 / (1 - r^2): 2.6% of the variance at r = 0.16.
Deterministic identities: float64 round-off (1e-10). Each test was seen to fail with a deliberately broken formula
(the sign of the score, sqrt(1 - abar) for (1 - abar), the rescaling between levels left out or inverted, delta_i
without the sigma_i^2 / sigma_L^2 factor, the corrector's alpha_i or its batch-mean norms, Tweedie left out).
"""

import math

import pytest
import torch
from scipy.special import gammaln, hyp1f1

import ddim
import score
from ddpm import GaussianDiffusion
from schedules import get_named_beta_schedule
from tests.analytic import GaussianEps, MixtureEps
from tests.test_ddpm import assert_moments

T = 1000
MU, S = 0.3, 0.1          # narrow data, as in test_ddpm.py: a loose sampler shows up clearly
N, D = 4000, 8            # samples x coordinates for moment tests: 32000 numbers, SE of the variance ~0.8%


def diffusion(var_type="fixed_small", schedule="linear"):
    return GaussianDiffusion(get_named_beta_schedule(schedule, T), var_type)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Moment recursions, written from the papers (not from score.py)
# ----------------------------------------------------------------------------------------------------------------

class Moments:
    """Mean and variance of one coordinate, pushed through x' = A x + B + sigma z."""

    def __init__(self, m=0.0, v=1.0):
        self.m, self.v = m, v

    def affine(self, A, B=0.0, sigma=0.0):
        self.m, self.v = A * self.m + B, A * A * self.v + sigma * sigma


def gaussian_level(abar, mu=MU, s=S):
    """q_t for N(mu, s^2) data: N(c, v), c = sqrt(abar) mu, v = abar s^2 + 1 - abar (DDPM eq. 4)."""
    return math.sqrt(abar) * mu, abar * s * s + 1 - abar


def langevin_on_gaussian(mom, d, c, v, grad_shift=0.0):
    """NCSN Algorithm 1, line 6 with score -(x - c)/v (+ a constant cond_fn): x + d/2 score + sqrt(d) z."""
    mom.affine(1 - d / (2 * v), d / 2 * (c / v + grad_shift), math.sqrt(d))


def tweedie_on_gaussian(mom, abar, c, v, grad_shift=0.0):
    """x_0 = (x + (1 - abar) score) / sqrt(abar), score = -(x - c)/v + grad_shift."""
    mom.affine((1 - (1 - abar) / v) / math.sqrt(abar), (1 - abar) * (c / v + grad_shift) / math.sqrt(abar))


def annealed_langevin_recursion(spaced, langevin_steps, delta, mu=MU, s=S):
    """NCSN Algorithm 1 on the VP levels of `spaced`, rescaling by sqrt(abar_{i-1}/abar_i) between levels, then Tweedie."""
    abar = spaced.alphas_cumprod.tolist()
    sigma2_L = 1 - abar[0]
    mom = Moments(0.0, 1.0)                                      # x_T ~ N(0, I)
    for i in range(len(abar) - 1, -1, -1):
        c, v = gaussian_level(abar[i], mu, s)
        d = delta * (1 - abar[i]) / sigma2_L                     # NCSN Algorithm 1, line 3
        for _ in range(langevin_steps):
            langevin_on_gaussian(mom, d, c, v)
        if i > 0:
            mom.affine(math.sqrt(abar[i - 1] / abar[i]))         # the same x / sqrt(abar) on the next level
    c, v = gaussian_level(abar[0], mu, s)
    tweedie_on_gaussian(mom, abar[0], c, v)
    return mom.m, mom.v


def mean_chi(k):
    """E ||z|| for z ~ N(0, I_k): sqrt(2) Gamma((k+1)/2) / Gamma(k/2)."""
    return math.sqrt(2) * math.exp(gammaln((k + 1) / 2) - gammaln(k / 2))


def corrector_on_gaussian(mom, alpha, snr, c, v, dim=D):
    """SDE Algorithm 5 on N(c, v), step from the batch-mean norms' expectations.

    g = -(x - c)/v with x - c ~ N(delta, V I_dim): E||g|| = sqrt(V) E||N(delta/sqrt(V), I)|| / v, and the mean of a
    non-central chi is E[chi_k] 1F1(-1/2; k/2; -lambda^2/2), lambda^2 = k delta^2 / V; E||z|| = E[chi_k].
    """
    lam2 = dim * (mom.m - c) ** 2 / mom.v
    ratio2 = v * v / (mom.v * hyp1f1(-0.5, dim / 2, -lam2 / 2) ** 2)      # (E||z|| / E||g||)^2
    eps = 2 * alpha * snr * snr * ratio2                                  # SDE Algorithm 5, line 5
    mom.affine(1 - eps / v, eps * c / v, math.sqrt(2 * eps))              # SDE Algorithm 5, line 6


def pc_recursion(spaced, corrector_steps, snr, predictor, var_type, mu=MU, s=S):
    """SDE App. G Algorithm 1: predictor (DDPM eq. 11 with sigma^2 = beta or beta~, or DDIM eq. 12 with eta = 0),
    then corrector steps at the new level; x_T ~ N(0, I)."""
    abar, abar_prev = spaced.alphas_cumprod.tolist(), spaced.alphas_cumprod_prev.tolist()
    mom = Moments(0.0, 1.0)
    for i in range(len(abar) - 1, -1, -1):
        a, ap = abar[i], abar_prev[i]
        c, v = gaussian_level(a, mu, s)
        k = math.sqrt(1 - a) / v                                  # eps* = k (x - c)
        if predictor == "ddpm":
            alpha, beta = a / ap, 1 - a / ap
            # DDPM eq. 11: mu = (x - beta / sqrt(1 - abar) eps) / sqrt(alpha)
            A = (1 - beta / math.sqrt(1 - a) * k) / math.sqrt(alpha)
            B = beta / math.sqrt(1 - a) * k * c / math.sqrt(alpha)
            var = beta if var_type == "fixed_large" else (1 - ap) / (1 - a) * beta
            mom.affine(A, B, math.sqrt(var) if i > 0 else 0.0)
        else:
            # DDIM eq. 12, sigma = 0: x' = sqrt(abar') x0 + sqrt(1 - abar') eps, x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
            A0, B0 = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * c / math.sqrt(a)
            mom.affine(math.sqrt(ap) * A0 + math.sqrt(1 - ap) * k, math.sqrt(ap) * B0 - math.sqrt(1 - ap) * k * c)
        if i > 0:
            c_new, v_new = gaussian_level(ap, mu, s)
            for _ in range(corrector_steps):
                corrector_on_gaussian(mom, ap / abar_prev[i - 1], snr, c_new, v_new)
    return mom.m, mom.v


# ----------------------------------------------------------------------------------------------------------------
# SC1: the score
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("respaced", [False, True])
def test_score_is_the_closed_form_score_of_the_gaussian_marginal(respaced):
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)                # sees ORIGINAL t
    sp = d.respace(50) if respaced else d
    g = gen(0)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, sp.num_timesteps, (64,), generator=g)
    abar = d.alphas_cumprod[sp.timestep_map[t]][:, None]
    # grad log N(x; sqrt(abar) mu, abar s^2 + 1 - abar) = -(x - sqrt(abar) mu) / (abar s^2 + 1 - abar)
    exact = -(x - abar.sqrt() * MU) / (abar * S * S + 1 - abar)
    assert torch.allclose(score.score_from_eps(sp, model, x, t), exact, rtol=1e-10, atol=1e-12)
    # a learned-sigma model: the score reads only the eps half
    learned = GaussianDiffusion(d.betas, "learned_range", "hybrid")
    sp_l = learned.respace(50) if respaced else learned
    two_block = lambda x, t: torch.cat([model(x, t), torch.full_like(x, 0.3)], dim=1)
    assert torch.allclose(score.score_from_eps(sp_l, two_block, x, t), exact, rtol=1e-10, atol=1e-12)
    # Tweedie with the score is DDPM eq. 4 solved for x_0 with the eps
    assert torch.allclose(score.tweedie_x0(sp, x, t, exact), sp.predict_x0_from_eps(x, t, model(x, sp.original_t(t))),
                          rtol=1e-10, atol=1e-10)


def test_cond_fn_adds_to_the_score_and_gets_the_original_t():
    d = diffusion()
    sp = d.respace(10)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 7, 8, 9])
    seen = []

    def cond_fn(x, t, y=None):
        seen.append((t.clone(), y))
        return torch.full_like(x, 0.5)

    plain = score.score_from_eps(sp, model, x, t)
    guided = score.score_from_eps(sp, model, x, t, {"y": 3}, cond_fn)
    # grad log q(x | y) = grad log q(x) + grad log p(y | x)
    assert torch.allclose(guided - plain, torch.full_like(x, 0.5), atol=1e-12)
    assert torch.equal(seen[0][0], sp.timestep_map[t]) and seen[0][1] == 3


# ----------------------------------------------------------------------------------------------------------------
# SC2: annealed Langevin
# ----------------------------------------------------------------------------------------------------------------

def test_single_level_langevin_has_the_derived_stationary_bias():
    """One level (original t = 500), many steps: Var(x_L) = v / (1 - d/(4v)), mean unbiased; then Tweedie is affine."""
    d = diffusion("fixed_small")
    model = GaussianEps(MU, S, d.alphas_cumprod)
    abar = d.alphas_cumprod[500].item()
    c, v = gaussian_level(abar)
    delta = 1.0                                                   # d/(4v) = 0.27: a 37% inflation, clearly visible
    # 40 steps contract the start by (1 - d/(2v))^40 ~ 1e-14: stationary
    x = score.langevin_sample_loop(d.respace([500]), model, (N, D), langevin_steps=40, delta=delta, generator=gen(1),
                                   dtype=torch.float64, clip_denoised=False)
    var_inf = v / (1 - delta / (4 * v))
    slope = (1 - (1 - abar) / v) / math.sqrt(abar)               # Tweedie: x_0 = slope x + const
    assert_moments(x, MU, slope ** 2 * var_inf)
    # and the bias is real: the unbiased value slope^2 v is far outside 5 SE
    se = slope ** 2 * v * math.sqrt(2.0 / (x.numel() - 1))
    assert abs(x.var().item() - slope ** 2 * v) > 10 * se


@pytest.mark.parametrize("schedule,steps,langevin_steps,ratio", [("linear", 100, 2, None), ("cosine", 50, 5, 0.5)])
def test_annealed_langevin_matches_moment_recursion(schedule, steps, langevin_steps, ratio):
    d = diffusion("fixed_small", schedule)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    sp = d.respace(steps)
    sigma2_L = 1 - sp.alphas_cumprod[0].item()
    delta = None if ratio is None else ratio * sigma2_L
    x = score.langevin_sample_loop(d.respace(steps), model, (N, D), langevin_steps=langevin_steps, delta=delta,
                                   generator=gen(2), dtype=torch.float64, clip_denoised=False)
    m, v = annealed_langevin_recursion(sp, langevin_steps, sigma2_L if delta is None else delta)
    assert_moments(x, m, v)
    # the VP rescaling carries the mean of Gaussian data exactly; the variance keeps the annealing lag
    assert m == pytest.approx(MU, rel=1e-3)


def test_annealed_langevin_converges_to_the_data():
    """The annealing lag shrinks with the budget: 100 levels x 2 steps leave Var ~1.5 s^2 (cosine, delta = sigma_L^2);
    200 levels x 20 steps at delta = 2 sigma_L^2 leave 4.9% (the recursion's number), and the stationary O(delta) bias
    at the last level is d/(4 v_L) = 0.2%. Tolerance: 5 SE + 6% of s^2."""
    d = diffusion("fixed_small", "cosine")
    model = GaussianEps(MU, S, d.alphas_cumprod)
    sigma2_L = 1 - d.alphas_cumprod[0].item()
    n, dim = 2000, 4
    small = score.langevin_sample_loop(d.respace(100), model, (n, dim), langevin_steps=2, generator=gen(3),
                                       dtype=torch.float64, clip_denoised=False)
    large = score.langevin_sample_loop(d.respace(200), model, (n, dim), langevin_steps=20, delta=2 * sigma2_L,
                                       generator=gen(4), dtype=torch.float64, clip_denoised=False)
    se_v = S * S * math.sqrt(2.0 / (n * dim))
    assert small.var().item() > S * S * 1.3
    assert abs(large.var().item() - S * S) < 5 * se_v + 0.06 * S * S, large.var().item() / S ** 2
    assert abs(large.mean().item() - MU) < 5 * S / math.sqrt(n * dim)


def test_annealed_langevin_is_ncsn_algorithm_1_in_ve_coordinates():
    """With x~ = x / sqrt(abar), sigma~^2 = (1 - abar) / abar and the same noise, our VP loop is NCSN's Algorithm 1."""
    d = diffusion("fixed_small", "cosine")
    model = GaussianEps(MU, S, d.alphas_cumprod)
    sp = d.respace(20)
    delta, M = 3e-5, 3
    x_T = torch.randn(16, 3, generator=gen(5), dtype=torch.float64)
    ours = score.langevin_sample_loop(d.respace(20), model, x_T.shape, langevin_steps=M, delta=delta, noise=x_T,
                                      generator=gen(6), dtype=torch.float64, clip_denoised=False)
    # NCSN, Algorithm 1, on x~ with the VE levels sigma~_i and step eps~ = delta / abar_L
    abar = sp.alphas_cumprod
    sigma2_ve = (1 - abar) / abar
    eps_ve = delta / abar[0].item()
    g = gen(6)
    x_ve = x_T / abar[-1].sqrt()
    for i in range(sp.num_timesteps - 1, -1, -1):
        t = torch.full((16,), i)
        a = abar[i].item()
        alpha_i = eps_ve * sigma2_ve[i].item() / sigma2_ve[0].item()   # line 3: alpha_i = eps sigma_i^2 / sigma_L^2
        for _ in range(M):
            # s~(x~, sigma~) = sqrt(abar) grad log q_t(sqrt(abar) x~)  (chain rule)
            s_ve = math.sqrt(a) * (-model(math.sqrt(a) * x_ve, sp.timestep_map[t]) / math.sqrt(1 - a))
            z = torch.randn(x_ve.shape, generator=g, dtype=torch.float64)
            x_ve = x_ve + alpha_i / 2 * s_ve + math.sqrt(alpha_i) * z   # line 6
    # NCSN-style denoising: x~ + sigma~_L^2 s~(x~)
    a = abar[0].item()
    s_ve = math.sqrt(a) * (-model(math.sqrt(a) * x_ve, torch.zeros(16, dtype=torch.long)) / math.sqrt(1 - a))
    x0_ve = x_ve + sigma2_ve[0].item() * s_ve
    assert torch.allclose(ours, x0_ve, rtol=1e-9, atol=1e-10)


def test_annealed_langevin_mixture_weights():
    """Annealed Langevin recovers the relative weights of separated modes (NCSN §3.2.2, Fig. 3) when its steps are small
    enough for the O(delta) bias at the levels where the modes separate (delta = sigma_L^2 / 4, 20 steps per level)."""
    d = diffusion("fixed_small", "cosine")
    mus, w = [[-0.5, -0.5], [0.5, 0.5]], [0.3, 0.7]
    model = MixtureEps(mus, 0.1, w, d.alphas_cumprod)
    sigma2_L = 1 - d.alphas_cumprod[0].item()
    n = 2000
    x = score.langevin_sample_loop(d.respace(100), model, (n, 2), langevin_steps=20, delta=sigma2_L / 4,
                                   generator=gen(7), dtype=torch.float64, clip_denoised=False)
    frac = (x.mean(1) > 0).double().mean().item()
    assert abs(frac - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n), frac
    near = torch.minimum((x - 0.5).abs().max(1).values, (x + 0.5).abs().max(1).values)
    assert (near < 0.5).double().mean().item() > 0.995


def test_langevin_hands_the_model_the_original_t_and_edges():
    d = diffusion()
    seen = []

    def recording_model(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    score.langevin_sample_loop(d.respace(4), recording_model, (2, 1), langevin_steps=2, dtype=torch.float64)
    # levels 750, 500, 250, 0 (uniform spacing of 4), twice each, then the denoising step at the last level
    assert seen == [750, 750, 500, 500, 250, 250, 0, 0, 0]
    # a single level and a batch of one: Langevin at that level, then Tweedie
    x = score.langevin_sample_loop(d.respace(1), GaussianEps(MU, S, d.alphas_cumprod), (1, 3), generator=gen(8))
    assert x.shape == (1, 3) and x.dtype == torch.float32 and torch.isfinite(x).all() and x.abs().max() <= 1


def test_langevin_guidance_shifts_towards_the_guided_side():
    """A constant cond_fn c is the score of a linear log-likelihood: at one level it tilts N(m, v) into N(m + v c, v)
    (exactly, also for Langevin with a finite step, whose mean is unbiased on a Gaussian), and Tweedie with the guided
    score maps that to mean mu + v c / sqrt(abar)."""
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)
    abar = d.alphas_cumprod[500].item()
    c, v = gaussian_level(abar)
    shift = 0.2
    x = score.langevin_sample_loop(d.respace([500]), model, (N, D), langevin_steps=40, delta=1.0, generator=gen(9),
                                   cond_fn=lambda x, t: torch.full_like(x, shift), dtype=torch.float64,
                                   clip_denoised=False)
    mom = Moments(c + v * shift, v / (1 - 1.0 / (4 * v)))        # the tilted stationary law
    tweedie_on_gaussian(mom, abar, c, v, shift)
    assert mom.m == pytest.approx(MU + v * shift / math.sqrt(abar), rel=1e-12)
    assert_moments(x, mom.m, mom.v)


# ----------------------------------------------------------------------------------------------------------------
# Predictor-corrector
# ----------------------------------------------------------------------------------------------------------------

def test_corrector_step_is_sde_algorithm_5():
    """One corrector step, term by term, at a coarse respacing where alpha_i is far from 1 (0.37 at the top level)."""
    d = diffusion()
    sp = d.respace(20)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    x = torch.randn(32, 2, 3, generator=gen(16), dtype=torch.float64)
    for i in (19, 10, 1):
        t = torch.full((32,), i)
        out = score.corrector_step(sp, model, x, t, snr=0.16, generator=gen(17))
        z = torch.randn(x.shape, generator=gen(17), dtype=torch.float64)            # the same draw
        abar = d.alphas_cumprod[sp.timestep_map[i]].item()
        g = -model(x, sp.timestep_map[t]) / math.sqrt(1 - abar)                     # SC1
        alpha = sp.alphas[i].item()
        assert alpha == pytest.approx(abar / d.alphas_cumprod[sp.timestep_map[i - 1]].item(), rel=1e-12)
        # SDE Algorithm 5: eps = 2 alpha (r ||z|| / ||g||)^2 with batch-mean norms (App. G), x + eps g + sqrt(2 eps) z
        eps = 2 * alpha * (0.16 * z.flatten(1).norm(dim=1).mean() / g.flatten(1).norm(dim=1).mean()) ** 2
        assert torch.allclose(out, x + eps * g + (2 * eps).sqrt() * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("predictor", ["ddpm", "ddim"])
def test_pc_without_corrector_is_the_predictor_alone(predictor):
    """corrector_steps = 0 (the SDE paper's "P" samplers) must be exactly ddpm.p_sample_loop / ddim.ddim_sample_loop;
    steps = 1 has no intermediate level, so no corrector runs either."""
    d = diffusion("fixed_large")
    model = GaussianEps(MU, S, d.alphas_cumprod)
    x_T = torch.randn(50, 4, generator=gen(10), dtype=torch.float64)
    for steps, corrector_steps in [(25, 0), (1, 3)]:
        pc = score.pc_sample_loop(d.respace(steps), model, x_T.shape, corrector_steps=corrector_steps,
                                  predictor=predictor, eta=0.5, noise=x_T, generator=gen(11), dtype=torch.float64)
        if predictor == "ddpm":
            ref = d.respace(steps).p_sample_loop(model, x_T.shape, noise=x_T, generator=gen(11), dtype=torch.float64)
        else:
            ref = ddim.ddim_sample_loop(d.respace(steps), model, x_T.shape, eta=0.5, noise=x_T, generator=gen(11),
                                        dtype=torch.float64)
        assert torch.equal(pc, ref)


@pytest.mark.parametrize("predictor,var_type,corrector_steps", [("ddpm", "fixed_small", 1), ("ddpm", "fixed_large", 1),
                                                                ("ddim", "fixed_small", 2)])
def test_pc_matches_moment_recursion_and_the_corrector_helps(predictor, var_type, corrector_steps):
    d = diffusion(var_type)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    sp = d.respace(100)
    x = score.pc_sample_loop(d.respace(100), model, (N, D), corrector_steps=corrector_steps, predictor=predictor,
                             generator=gen(12), dtype=torch.float64, clip_denoised=False)
    m, v = pc_recursion(sp, corrector_steps, 0.16, predictor, var_type)
    assert_moments(x, m, v)
    # the corrector pulls towards q_t: the PC variance is closer to the data's than the predictor's alone
    m0, v0 = pc_recursion(sp, 0, 0.16, predictor, var_type)
    assert abs(v - S * S) < abs(v0 - S * S)
    x0 = score.pc_sample_loop(d.respace(100), model, (N, D), corrector_steps=0, predictor=predictor, generator=gen(13),
                              dtype=torch.float64, clip_denoised=False)
    se_v = S * S * math.sqrt(2.0 / (N * D))
    assert abs(x.var().item() - S * S) < abs(x0.var().item() - S * S) - 5 * se_v


def test_pc_reproduces_the_data():
    """1000 levels, DDPM predictor with beta~, one corrector step per level. On this narrow data the predictor alone
    ends at Var = 0.93 s^2 (its recursion; test_ddpm allows 10%); the corrector pulls each level towards q_t up to its
    own stationary inflation alpha r^2 / (1 - alpha r^2) <= 2.6%, and the recursion gives 0.984 s^2 in the end.
    Tolerance: 5 SE + 3% of s^2."""
    d = diffusion("fixed_small")
    model = GaussianEps(MU, S, d.alphas_cumprod)
    n, dim = 2000, 4
    x = score.pc_sample_loop(d.respace(T), model, (n, dim), corrector_steps=1, generator=gen(14), dtype=torch.float64,
                             clip_denoised=False)
    se_v = S * S * math.sqrt(2.0 / (n * dim))
    assert abs(x.var().item() - S * S) < 5 * se_v + 0.03 * S * S, x.var().item() / S ** 2
    assert abs(x.mean().item() - MU) < 5 * S / math.sqrt(n * dim)


@pytest.mark.parametrize("sampler", ["pc", "langevin"])
def test_guided_mixture_sampling_lands_in_the_guided_component(sampler):
    """cond_fn = grad log p(y | x_t) of the exact noisy classifier (the mixture's responsibilities): scores add, so the
    guided sampler targets p(x_0 | y), one component; unguided, the minority component y = 0 has 30%."""
    d = diffusion("fixed_small", "cosine")
    mus, w = [[-0.5, -0.5], [0.5, 0.5]], [0.3, 0.7]
    model = MixtureEps(mus, 0.1, w, d.alphas_cumprod)

    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_p = torch.log_softmax(model.log_joint(x_in, t), dim=1)[torch.arange(x.shape[0]), y]
            return torch.autograd.grad(log_p.sum(), x_in)[0]

    n = 1000
    y = torch.zeros(n, dtype=torch.long)
    kw = dict(generator=gen(15), dtype=torch.float64, clip_denoised=False, model_kwargs={"y": y}, cond_fn=cond_fn)
    if sampler == "pc":
        x = score.pc_sample_loop(d.respace(100), lambda x, t, y=None: model(x, t), (n, 2), **kw)
    else:
        x = score.langevin_sample_loop(d.respace(100), lambda x, t, y=None: model(x, t), (n, 2), langevin_steps=5, **kw)
    frac_guided = (x.mean(1) < 0).double().mean().item()
    assert frac_guided > 0.98, frac_guided


def test_bad_input_names_the_argument():
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)
    cases = [(score.langevin_sample_loop, {"langevin_steps": 0}, "langevin_steps"),
             (score.langevin_sample_loop, {"langevin_steps": 1.5}, "langevin_steps"),
             (score.langevin_sample_loop, {"delta": 0.0}, "delta"), (score.langevin_sample_loop, {"delta": -1e-5}, "delta"),
             (score.pc_sample_loop, {"snr": 0.0}, "snr"),
             (score.pc_sample_loop, {"snr": -0.1}, "snr"), (score.pc_sample_loop, {"corrector_steps": -1}, "corrector_steps"),
             (score.pc_sample_loop, {"predictor": "euler"}, "predictor"), (score.pc_sample_loop, {"eta": -1.0, "predictor": "ddim"}, "eta"),
             (score.pc_sample_loop, {"eta": float("nan"), "predictor": "ddim"}, "eta")]
    for fn, kw, word in cases:
        with pytest.raises(ValueError, match=word):
            fn(d, model, (2, 2), **kw)
