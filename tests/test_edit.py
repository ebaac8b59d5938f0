"""
edit.py (SDEdit, masked SDEdit, classifier-guided translation) against closed forms.

For Gaussian data and the exact eps every reverse step is affine plus independent noise (tests/analytic.ddpm_steps,
ddim_steps), and the start of SDEdit is x_{t0} ~ N(sqrt(abar_{t0}) x_in, 1 - abar_{t0}) (F2): the exact law of the
output given x_in is the moment recursion started there. Samples are compared with it within 5 standard errors.
"""

import math

import pytest
import torch

from ddim import ddim_sample_loop
from edit import sdedit, sdedit_steps
from guidance import classifier_cond_fn
from tests.analytic import GaussianEps, MixtureEps, ddim_steps, ddpm_steps, gaussian_moment_recursion
from tests.test_ddpm import MU, S, assert_moments, diffusion

X_IN = 0.8          # an input far off the data N(0.3, 0.1^2): an "unrealistic" picture to be edited


def gen(seed):
    return torch.Generator().manual_seed(seed)


def exact_sdedit_moments(d, t0, sampler, eta=0.0, var_type="fixed_large"):
    """Mean and variance of SDEdit's output for x_in = X_IN: F2 to step t0 - 1, then t0 exact reverse steps."""
    abar, prev = d.alphas_cumprod.tolist(), d.alphas_cumprod_prev.tolist()
    a0 = abar[t0 - 1]
    steps = (ddpm_steps(abar[:t0], prev[:t0], var_type, MU, S) if sampler == "ddpm"
             else ddim_steps(abar[:t0], prev[:t0], eta, MU, S))
    # E1: x_{t0} ~ N(sqrt(abar_{t0}) x_in, 1 - abar_{t0}), then the affine steps
    return gaussian_moment_recursion(steps, math.sqrt(a0) * X_IN, 1 - a0)


def test_strength_0_returns_the_input_and_1_is_ordinary_sampling():
    d = diffusion(T=200)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    x_in = torch.rand(64, 3, generator=gen(0), dtype=torch.float64) * 2 - 1
    out = sdedit(d, model, x_in, 0.0)
    assert torch.equal(out, x_in) and out is not x_in
    # strength 1: x_T is the generator's first draw, then the same loop as the plain samplers, draw for draw
    a = sdedit(d, model, x_in, 1.0, "ddpm", generator=gen(1))
    b = d.p_sample_loop(model, x_in.shape, generator=gen(1), dtype=torch.float64)
    assert torch.equal(a, b)
    sp = d.respace(20)
    for eta in (0.0, 1.0):
        a = sdedit(sp, model, x_in, 1.0, "ddim", eta=eta, generator=gen(2))
        b = ddim_sample_loop(sp, model, x_in.shape, eta=eta, generator=gen(2), dtype=torch.float64)
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampler,strength,eta,respaced", [("ddpm", 0.05, 0.0, False), ("ddim", 0.1, 0.0, True),
                                                           ("ddim", 0.6, 1.0, True), ("ddpm", 0.9, 0.0, True)])
def test_output_law_given_the_input_is_the_exact_conditional(sampler, strength, eta, respaced):
    d = diffusion()
    model = GaussianEps(MU, S, d.alphas_cumprod)       # the model sees ORIGINAL t, also on the respaced chains
    sp = d.respace(50) if respaced else d
    x_in = torch.full((4000, 4), X_IN, dtype=torch.float64)
    x = sdedit(sp, model, x_in, strength, sampler, eta=eta, clip_denoised=False, generator=gen(3))
    t0 = sdedit_steps(sp, strength)
    assert t0 == round(strength * sp.num_timesteps)
    m, v = exact_sdedit_moments(sp, t0, sampler, eta)
    assert_moments(x, m, v)
    # the trade-off: weak edits keep some of the input (mean 0.43 for 0.8 at strength 0.05 and 0.1 here; this narrow
    # data pulls hard), strong ones forget it (the data's mean 0.3)
    if strength <= 0.1:
        assert 0.4 < m < 0.5
    if strength >= 0.9:
        assert abs(m - MU) < 0.01


def test_mask_keeps_the_known_region_exactly_and_harmonises_the_rest():
    d = diffusion(T=250)
    # two classes of 2-D points: (-0.5, -0.5) and (0.5, 0.5). Keep the first coordinate of an input of the class
    # the input's sign says, repaint the second from pure noise: the repainted coordinate must join the same class.
    mix = MixtureEps([[-0.5, -0.5], [0.5, 0.5]], 0.1, [0.5, 0.5], d.alphas_cumprod)
    n = 1000
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()
    x_in = torch.stack([0.5 * sign, torch.zeros(n, dtype=torch.float64)], dim=1)   # second coordinate: a blank
    mask = torch.tensor([1.0, 0.0])
    x = sdedit(d, mix, x_in, 1.0, "ddpm", mask=mask, clip_denoised=False, generator=gen(4))
    # E2: the known region is the input exactly
    assert torch.equal(x[:, 0], x_in[:, 0])
    # the known half is re-noised to every level on the way, so the model sees it and completes the same class
    # (measured 0.987; unmasked, the blank half picks a class at random: measured 0.472)
    same = (torch.sign(x[:, 1]) == sign).double().mean().item()
    assert same > 0.95, same
    free = sdedit(d, mix, x_in, 1.0, "ddpm", clip_denoised=False, generator=gen(4))
    assert abs((torch.sign(free[:, 1]) == sign).double().mean().item() - 0.5) < 0.1


class RecordingEps(GaussianEps):
    """The exact eps, recording the first coordinate of its input x_t at each original t it is called with."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = {}

    def __call__(self, x, t, **kwargs):
        self.seen[int(t[0])] = x[:, 0].clone()
        return super().__call__(x, t, **kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_mask_renoises_the_known_region_to_each_level_with_fresh_noise(sampler):
    d = diffusion()
    sp = d.respace(40)
    model = RecordingEps(MU, S, d.alphas_cumprod)
    n = 4000
    x_in = torch.full((n, 2), X_IN, dtype=torch.float64)
    sdedit(sp, model, x_in, 0.5, sampler, mask=torch.tensor([1.0, 0.0]), clip_denoised=False, generator=gen(7))
    # what the model saw of the known coordinate at two later kept steps (original t = 100 and 300)
    for t in (100, 300):
        a = d.alphas_cumprod[t].item()
        # RePaint eq. 8: x_t^known ~ q(x_t | x_in) = N(sqrt(abar_t) x_in, 1 - abar_t)
        assert_moments(model.seen[t], math.sqrt(a) * X_IN, 1 - a)
    # fresh noise at each level: the known coordinate at t = 100 and t = 300 are independent given x_in
    u, v = model.seen[100], model.seen[300]
    corr = ((u - u.mean()) * (v - v.mean())).mean() / (u.std() * v.std())
    assert abs(corr.item()) < 5 / math.sqrt(n), corr.item()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_guided_translation_lands_in_the_target_class(sampler):
    d = diffusion("fixed_small", T=250)
    mus = [[-0.5, -0.5], [0.5, 0.5]]
    mix = MixtureEps(mus, 0.1, [0.5, 0.5], d.alphas_cumprod)
    n = 1000
    # inputs: samples of class 0; target: class 1
    x_in = torch.tensor(mus[0], dtype=torch.float64) + 0.1 * torch.randn(n, 2, generator=gen(5), dtype=torch.float64)
    kwargs = {"y": torch.ones(n, dtype=torch.long)}
    # the exact noisy classifier: softmax of the mixture's log-joint is p(y | x_t)
    cond_fn = classifier_cond_fn(lambda x, t: mix.log_joint(x, t), 3.0)
    strength = 0.2
    plain = sdedit(d, mix, x_in, strength, sampler, model_kwargs=kwargs, clip_denoised=False, generator=gen(6))
    guided = sdedit(d, mix, x_in, strength, sampler, cond_fn=cond_fn, model_kwargs=kwargs, clip_denoised=False,
                    generator=gen(6))
    in_target = lambda x: (x.sum(1) > 0).double().mean().item()
    # unguided, this much noise keeps most inputs in their class (measured: 21% ddpm, 16% ddim cross); guided with
    # s = 3 all of them cross (measured 100%)
    assert in_target(plain) < 0.35, in_target(plain)
    assert in_target(guided) > 0.95, in_target(guided)
    # and they land ON the target component, not between: its mean (measured off by 0.004 ddpm, 0.05 ddim) and a
    # spread no wider than its std 0.1 (guidance with s > 1 sharpens: measured 0.088 ddpm, 0.072 ddim)
    on = guided[guided.sum(1) > 0]
    assert (on.mean(0) - 0.5).abs().max().item() < 0.1 and on.std(0).max().item() < 0.12


def test_t0_counts_the_steps_of_the_diffusion_given():
    d = diffusion()
    sp = d.respace(50)
    assert sdedit_steps(d, 0.3) == 300 and sdedit_steps(sp, 0.3) == 15
    # rounded to the nearest step: 19.9 -> 20, 19.45 -> 19; the ends are exact
    assert sdedit_steps(sp, 0.398) == 20 and sdedit_steps(sp, 0.389) == 19
    assert sdedit_steps(sp, 0.0) == 0 and sdedit_steps(sp, 1.0) == 50 and sdedit_steps(sp, 1) == 50


def test_bad_arguments():
    d = diffusion(T=20)
    model = GaussianEps(MU, S, d.alphas_cumprod)
    x = torch.zeros(2, 3)
    for strength in (-0.1, 1.5, float("nan"), "half", True):
        with pytest.raises(ValueError, match="strength"):
            sdedit(d, model, x, strength)
    with pytest.raises(ValueError, match="sampler"):
        sdedit(d, model, x, 0.5, "euler")
    with pytest.raises(ValueError, match="eta"):
        sdedit(d, model, x, 0.5, "ddim", eta=-1.0)
    with pytest.raises(ValueError, match="mask"):
        sdedit(d, model, x, 0.5, mask=torch.ones(4))
    with pytest.raises(ValueError, match="mask"):
        sdedit(d, model, x, 0.5, mask=torch.full((3,), 2.0))
