"""Schedules (S1-S4) and timestep spacing (D4) against their closed forms."""

import math

import pytest
import torch

from schedules import SCHEDULES, get_named_beta_schedule, space_timesteps


def test_linear_endpoints_and_dtype():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    # S1: DDPM §4, beta_1 = 1e-4, beta_T = 0.02, linear in between
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(b[1:] - b[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64), atol=1e-15)


def test_cosine_alphas_cumprod_matches_closed_form():
    T, s = 1000, 0.008
    b = get_named_beta_schedule("cosine", T)
    abar = torch.cumprod(1 - b, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    # S2 (iDDPM eq. 17): abar_t = f(t)/f(0); only the last beta is clipped at 0.999, so compare t < T
    expected = torch.tensor([f(t) / f(0) for t in range(1, T + 1)], dtype=torch.float64)
    assert torch.allclose(abar[:-1], expected[:-1], rtol=1e-10, atol=0)
    assert b.max().item() == pytest.approx(0.999)


def test_quadratic_and_sigmoid_formulas():
    q = get_named_beta_schedule("quadratic", 1000)
    # S3: sqrt(beta) is linear from sqrt(1e-4) to sqrt(0.02)
    r = q.sqrt()
    assert r[0].item() == pytest.approx(0.01) and r[-1].item() == pytest.approx(math.sqrt(0.02))
    assert torch.allclose(r[1:] - r[:-1], (r[1:] - r[:-1]).mean().expand(999), atol=1e-14)
    sg = get_named_beta_schedule("sigmoid", 1000)
    # S4: sigmoid(linspace(-6, 6)) * (0.02 - 1e-4) + 1e-4
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert sg[0].item() == pytest.approx(sig(-6) * (0.02 - 1e-4) + 1e-4, rel=1e-12)
    assert sg[-1].item() == pytest.approx(sig(6) * (0.02 - 1e-4) + 1e-4, rel=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [10, 100, 1000, 4000])
def test_all_betas_in_open_unit_interval(name, T):
    b = get_named_beta_schedule(name, T)
    assert b.dtype == torch.float64 and b.shape == (T,)
    assert bool((b > 0).all()) and bool((b < 1).all())
    abar = torch.cumprod(1 - b, 0)
    assert bool((abar[1:] < abar[:-1]).all()), "abar must decrease"


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ValueError, match="schedule.*linear, cosine, quadratic, sigmoid"):
        get_named_beta_schedule("exponential", 1000)


def test_space_timesteps_uniform_and_quad():
    # D4: uniform 50 of 1000 keeps 0, 20, ..., 980 (the DDIM authors' range(0, T, T // S))
    assert space_timesteps(1000, 50) == list(range(0, 1000, 20))
    assert space_timesteps(1000, 1000) == list(range(1000))
    assert space_timesteps(1000, 1) == [0]
    u = space_timesteps(1000, 300)
    assert len(u) == 300 and u == sorted(set(u))
    # D4 quad: floor(linspace(0, sqrt(0.8 T), S)^2), made strictly increasing where the first values collide
    q = space_timesteps(1000, 10, "quad")
    assert q == [int((i * math.sqrt(800) / 9) ** 2) for i in range(10)]
    q = space_timesteps(1000, 50, "quad")
    assert len(q) == 50 and q == sorted(set(q)) and q[0] == 0 and q[-1] in (799, 800)
    gaps = [b - a for a, b in zip(q, q[1:])]
    assert gaps[-1] > 10 * gaps[5], "quadratic spacing spends its steps at low noise"


@pytest.mark.parametrize("steps", [0, 1001, -3, 2.5, "50"])
def test_space_timesteps_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        space_timesteps(1000, steps)


def test_space_timesteps_rejects_unknown_kind():
    with pytest.raises(ValueError, match="skip"):
        space_timesteps(1000, 50, "cubic")


@pytest.mark.parametrize("T", [4, 1000])
def test_vp_schedule_is_the_vp_sde_at_t_over_T(T):
    b = get_named_beta_schedule("vp", T)
    abar = torch.cumprod(1 - b, 0)
    # S5 (DDGAN's schedule): abar_t = exp(-beta_min t/T - (beta_max - beta_min) t^2 / (2 T^2)), beta_min 0.1, beta_max 20
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    assert torch.allclose(abar, torch.exp(-0.1 * t - 19.9 * t ** 2 / 2), rtol=1e-12, atol=0)
    if T == 1000:
        # the continuous-time version of the linear schedule S1: the same abar curve (measured: max difference 8e-4)
        lin = torch.cumprod(1 - get_named_beta_schedule("linear", T), 0)
        assert (abar - lin).abs().max().item() < 2e-3
