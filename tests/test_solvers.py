"""
solvers.py (DPM-Solver++(2M), EDM's Heun) and the step schedules of schedules.py against the exact ODE solution.

THE GROUND TRUTH. For Gaussian data N(mu, s^2) with the exact eps (tests/analytic.py) the probability-flow ODE is
solved in closed form: it keeps the z-score of x_t (tests/analytic.gaussian_flow). All three solvers (DDIM eta = 0,
DPM-Solver++(2M), Heun) end the same way, with one step from the cleanest kept step (code index 0, abar = 1 - 1e-4)
into abar = 1 that returns the denoised D(x) there; that last step does not shrink with the number of steps (it is
the discrete model's own end point), so the reference is the exact flow from x_T to the cleanest kept step followed
by the exact D there, and what is measured is the error of the ODE integration itself.

THE ORDER. Errors (max over a batch of 64, float64) on uniformly spaced steps (schedules.space_timesteps) of the
linear T = 1000 schedule, mu = 0.1, s = 0.5, measured while writing this test:
    steps              20        40        80        160       fitted order
    DDIM (eta = 0)     0.208     0.107     0.0545    0.0276    0.97
    DPM-Solver++(2M)   0.357     0.126     0.0338    0.0080    1.84   (pairwise 1.50, 1.90, 2.08)
    Heun (EDM)         0.0281    0.0071    0.0018    0.00046   1.98
At 10 steps 2M is still pre-asymptotic (error 0.60): uniform steps in t are very uneven in lambda, and the 2M
extrapolation with step ratio r = h_{i-1}/h_i << 1 amplifies; hence 20-160 here.
"""


import numpy as np
import pytest
import torch

from ddim import ddim_sample_loop
from schedules import karras_timesteps, logsnr_timesteps, space_timesteps
from solvers import dpmpp2m_sample_loop, heun_sample_loop
from tests.analytic import GaussianEps, MixtureEps, gaussian_flow, gaussian_x0_posterior
from tests.test_ddpm import assert_moments, diffusion

MU, S = 0.1, 0.5
STEPS = (20, 40, 80, 160)


def run(name, d, model, x_T, clip=False):
    if name == "ddim":
        return ddim_sample_loop(d, model, x_T.shape, eta=0.0, noise=x_T, clip_denoised=clip)
    if name == "dpm1":
        return dpmpp2m_sample_loop(d, model, x_T.shape, noise=x_T, clip_denoised=clip, order=1)
    if name == "dpmpp2m":
        return dpmpp2m_sample_loop(d, model, x_T.shape, noise=x_T, clip_denoised=clip)
    return heun_sample_loop(d, model, x_T.shape, noise=x_T, clip_denoised=clip)


def exact_end(x_T, sp):
    """The exact flow from the noisiest kept step to the cleanest, then the exact denoiser there."""
    a_top, a_0 = sp.alphas_cumprod[-1].item(), sp.alphas_cumprod[0].item()
    x_0 = gaussian_flow(x_T, a_top, a_0, MU, S)
    return gaussian_x0_posterior(x_0, a_0, MU, S)[0]


@pytest.mark.parametrize("name,order", [("ddim", 1.0), ("dpmpp2m", 2.0), ("heun", 2.0)])
def test_ode_solvers_converge_at_their_order(name, order):
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    errors = []
    for steps in STEPS:
        sp = d.respace(space_timesteps(d.num_timesteps, steps, "uniform"))
        errors.append((run(name, sp, model, x_T) - exact_end(x_T, sp)).abs().max().item())
    # the slope of log error against log steps is minus the order of convergence
    fitted = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    assert order - 0.4 <= fitted <= order + 0.6 and (order > 1 or fitted <= 1.2), (fitted, errors)
    assert errors == sorted(errors, reverse=True), errors


@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_1_is_ddim(clip):
    d = diffusion()
    # components near +-1: with clip_denoised the clipping is active (as in test_ddim's eta = 1 test)
    model = MixtureEps([[-0.9, 0.9], [0.8, -0.95]], 0.1, [0.5, 0.5], d.alphas_cumprod)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    for steps in (10, 50):
        sp = d.respace(space_timesteps(d.num_timesteps, steps, "quad"))
        # P2: x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h} - 1) D  is  DDIM eq. 12 with sigma = 0, written with D
        a, b = run("dpm1", sp, model, x_T, clip), run("ddim", sp, model, x_T, clip)
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("name,keep", [("heun", "karras"), ("dpmpp2m", "logsnr")])
def test_solvers_on_their_own_step_schedules_hit_the_data_moments(name, keep):
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)
    # 100 requested steps: Heun on 99 distinct Karras steps (197 NFE), 2M on 94 distinct logSNR steps (94 NFE).
    # (At EDM's CIFAR-10 budget, 18 Karras steps = 35 NFE, this Gaussian comes out 13% too wide, var 0.284 for 0.25:
    # an ODE error, mean abs 0.025 against the exact flow; 2M on 18 logSNR steps: +4%, 0.007.)
    kept = karras_timesteps(d.alphas_cumprod, 100) if keep == "karras" else logsnr_timesteps(d.alphas_cumprod, 100)
    sp = d.respace(kept)
    x_T = torch.randn(10000, 1, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    x = run(name, sp, model, x_T)
    assert_moments(x, MU, S * S)
    # and sample by sample on the exact flow (measured: mean abs 6.6e-4 Heun, 2.6e-4 2M)
    assert (x - exact_end(x_T, sp)).abs().mean().item() < 2e-3


class CountingEps(GaussianEps):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        return super().__call__(x, t, **kwargs)


def test_nfe_is_steps_for_dpm_and_two_steps_minus_one_for_heun():
    d = diffusion()
    x_T = torch.randn(4, 1, dtype=torch.float64)
    for n in (1, 2, 18):
        sp = d.respace(karras_timesteps(d.alphas_cumprod, n))
        assert sp.num_timesteps == n
        m = CountingEps(MU, S, d.alphas_cumprod)
        heun_sample_loop(sp, m, x_T.shape, noise=x_T)
        assert m.calls == 2 * n - 1
        m = CountingEps(MU, S, d.alphas_cumprod)
        dpmpp2m_sample_loop(sp, m, x_T.shape, noise=x_T)
        assert m.calls == n


def test_step_schedules():
    d = diffusion()
    abar = d.alphas_cumprod
    lam = 0.5 * torch.log(abar / (1 - abar))
    sigma = ((1 - abar) / abar).sqrt()
    for n in (2, 10, 20):
        for kept in (logsnr_timesteps(abar, n), karras_timesteps(abar, n)):
            # both end points, strictly increasing, all distinct (at these counts nothing collides)
            assert kept[0] == 0 and kept[-1] == 999 and kept == sorted(set(kept)) and len(kept) == n
    kept = logsnr_timesteps(abar, 10)
    gaps = (lam[kept[:-1]] - lam[kept[1:]]).numpy()
    # P3: uniform in lambda up to the rounding to a step (one step moves lambda by <= 0.4 at the clean end)
    assert np.allclose(gaps, (lam[0] - lam[-1]).item() / 9, atol=0.4), gaps
    kept = karras_timesteps(abar, 18)
    rho, s_max, s_min = 7.0, sigma[-1].item(), sigma[0].item()
    # EDM eq. 5, i = 0..17, from sigma_max down
    target = [(s_max ** (1 / rho) + i / 17 * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(18)]
    got = sigma[kept].flip(0).tolist()
    assert got == pytest.approx(target, rel=0.06), (got, target)
    # collisions at the clean end are merged, never repeated
    many = karras_timesteps(abar, 200)
    assert len(many) < 200 and many == sorted(set(many))
    with pytest.raises(ValueError, match="steps"):
        logsnr_timesteps(abar, 0)
    with pytest.raises(ValueError, match="steps"):
        karras_timesteps(abar, 1001)
    with pytest.raises(ValueError, match="rho"):
        karras_timesteps(abar, 10, rho=0)


def test_bad_order():
    d = diffusion()
    with pytest.raises(ValueError, match="order"):
        dpmpp2m_sample_loop(d.respace(10), GaussianEps(MU, S, d.alphas_cumprod), (2, 1), order=3)
