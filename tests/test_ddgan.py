"""
ddgan.py (Denoising Diffusion GANs) against closed forms, and one end-to-end run with the image networks.

THE ORACLE. For Gaussian data x_0 ~ N(mu, s^2), x_0 | x_t is Gaussian in closed form (tests/analytic.gaussian_x0_posterior).
A "generator" that returns a sample of it is the ideal G: then p_theta(x_{t-1} | x_t) = q(x_{t-1} | x_t) (DDGAN eq. 6),
and the 4-step chain must reproduce the data whatever the step sizes. Each step is affine plus independent Gaussian
noise, so the exact moments of the chain also follow from a scalar recursion.
"""

import math

import pytest
import torch
import torch.nn as nn

import ddgan
from data import synthetic_dataset
from ddpm import GaussianDiffusion
from schedules import get_named_beta_schedule
from tests.analytic import gaussian_moment_recursion, gaussian_x0_posterior
from tests.test_ddpm import assert_moments

MU, S = 0.3, 0.2


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ddgan_diffusion(T=4):
    return GaussianDiffusion(get_named_beta_schedule("vp", T))


class OracleG:
    """G(x_t, t, z) = a sample of x_0 | x_t for x_0 ~ N(MU, S^2): mean + std * z (z of the data's shape)."""

    def __init__(self, diffusion, dim):
        self.abar, self.latent_dim = diffusion.alphas_cumprod, dim

    def __call__(self, x_t, t, z):
        mean, var = gaussian_x0_posterior(x_t, self.abar[int(t[0])].item(), MU, S)
        return mean + math.sqrt(var) * z.reshape(x_t.shape)


def oracle_chain_moments(d, m, v):
    """Moments after the whole chain with the oracle, from x_T ~ N(m, v): each step is
    x_{t-1} = c1 x_0' + c2 x_t + sqrt(beta~) eps,  x_0' = MU + k (x_t - sqrt(abar) MU) + sqrt(var) z."""
    steps = []
    for i in range(d.num_timesteps - 1, -1, -1):
        a = d.alphas_cumprod[i].item()
        c1, c2 = d.posterior_mean_coef1[i].item(), d.posterior_mean_coef2[i].item()
        k = math.sqrt(a) * S * S / (a * S * S + 1 - a)
        var = S * S * (1 - a) / (a * S * S + 1 - a)
        noise = math.sqrt(c1 * c1 * var + d.posterior_variance[i].item())
        steps.append((c1 * k + c2, c1 * (MU - k * math.sqrt(a) * MU), noise))
    return gaussian_moment_recursion(steps, m, v)


@pytest.mark.parametrize("T", [4, 2])
def test_oracle_generator_reproduces_the_data_in_T_steps(T):
    d = ddgan_diffusion(T)
    G = OracleG(d, 4)
    aT = d.alphas_cumprod[-1].item()
    # DG1: with the true x_0 | x_t, the chain started from q(x_T) is exact: its moments are the data's to round-off
    m, v = oracle_chain_moments(d, math.sqrt(aT) * MU, aT * S * S + 1 - aT)
    assert m == pytest.approx(MU, abs=1e-12) and v == pytest.approx(S * S, abs=1e-12)
    # ... and from the prior N(0, I) (abar_T = 4e-5 for T = 4: the difference is below 1e-4)
    m0, v0 = oracle_chain_moments(d, 0.0, 1.0)
    assert abs(m0 - MU) < 1e-4 * (1 if T == 4 else 1e3) and abs(v0 - S * S) < 1e-4 * (1 if T == 4 else 1e3)
    # the code's chain: G's x_0' through the posterior F3, T calls of G
    x = ddgan.ddgan_sample_loop(d, G, (20000, 4), clip_denoised=False, generator=gen(0), dtype=torch.float64)
    assert_moments(x, m0, v0)
    x_T = math.sqrt(aT) * MU + math.sqrt(aT * S * S + 1 - aT) * torch.randn(20000, 4, generator=gen(1),
                                                                          dtype=torch.float64)
    x = ddgan.ddgan_sample_loop(d, G, x_T.shape, noise=x_T, clip_denoised=False, generator=gen(2))
    assert_moments(x, MU, S * S)


def test_real_pairs_are_the_forward_process_and_the_posterior_is_f3():
    d = ddgan_diffusion()
    n = 20000
    x0 = torch.full((n, 2), 0.5, dtype=torch.float64)
    for t_ in range(4):
        t = torch.full((n,), t_)
        x_prev, x_t = ddgan.q_sample_pairs(d, x0, t, gen(3 + t_))
        a_prev = d.alphas_cumprod_prev[t_].item()
        a, alpha = d.alphas_cumprod[t_].item(), 1 - d.betas[t_].item()
        if t_ == 0:
            assert torch.equal(x_prev, x0)            # paper t = 1: x_{t-1} is x_0
        else:
            assert_moments(x_prev, math.sqrt(a_prev) * 0.5, 1 - a_prev)       # F2 at t - 1
        assert_moments(x_t, math.sqrt(a) * 0.5, 1 - a)                         # F2 at t: F1 composed with F2
        # F1: x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps, so Cov(x_{t-1}, x_t) = sqrt(alpha_t) Var(x_{t-1})
        cov = ((x_prev - x_prev.mean()) * (x_t - x_t.mean())).mean().item()
        assert cov == pytest.approx(math.sqrt(alpha) * (1 - a_prev), abs=5 * math.sqrt(2 / n))
        # the posterior step (F3) from the true x_0: q(x_{t-1} | x_t, x_0), exact x_0 at the first step
        post = ddgan.sample_posterior(d, x0, x_t, t, gen(10 + t_))
        mean, var, _ = d.q_posterior_mean_variance(x0, x_t, t)
        if t_ == 0:
            assert torch.equal(post, x0)
        else:
            assert_moments((post - mean) / var.sqrt(), 0.0, 1.0)


class LinearD(nn.Module):
    """D(pair, t) = <w, pair> + b: R1 and the losses have closed forms."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, 2 * dim, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, pair, t):
        return pair @ self.w + self.b


def test_losses_and_r1_against_their_closed_form_on_a_linear_discriminator():
    d = ddgan_diffusion()
    C, n, gamma = 3, 64, 0.7
    D = LinearD(C)
    g = gen(4)
    x_real, x_fake, x_t = (torch.randn(n, C, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.randint(0, 4, (n,), generator=g)
    out = ddgan.discriminator_loss(d, D, x_real, x_fake, x_t, t, r1_gamma=gamma)
    w, b = D.w.detach(), D.b.detach()
    logit_real = torch.cat([x_real, x_t], 1) @ w + b
    logit_fake = torch.cat([x_fake, x_t], 1) @ w + b
    # DG2 (DDGAN eq. 4): -log sigmoid(real) and -log(1 - sigmoid(fake))
    assert out["real"].item() == pytest.approx(-torch.log(torch.sigmoid(logit_real)).mean().item(), rel=1e-12)
    assert out["fake"].item() == pytest.approx(-torch.log(1 - torch.sigmoid(logit_fake)).mean().item(), rel=1e-12)
    # R1: the gradient of a linear D with respect to x_{t-1} is w's first half, for every example
    assert out["r1"].item() == pytest.approx(gamma / 2 * (w[:C] ** 2).sum().item(), rel=1e-12)
    assert out["loss"].item() == pytest.approx((out["real"] + out["fake"] + out["r1"]).item(), rel=1e-12)
    # R1 penalises D itself (create_graph): d r1 / d w = gamma * w on the x_{t-1} half, 0 on the x_t half
    D.zero_grad()
    out["r1"].backward()
    assert torch.allclose(D.w.grad, torch.cat([gamma * w[:C], torch.zeros(C, dtype=torch.float64)]), atol=1e-12)
    # DG3 (DDGAN eq. 5): the non-saturating -log sigmoid(fake)
    x_fake = x_fake.clone().requires_grad_(True)
    g_loss = ddgan.generator_loss(d, D, x_fake, x_t, t)
    assert g_loss.item() == pytest.approx(-torch.log(torch.sigmoid(logit_fake)).mean().item(), rel=1e-12)
    # the signs: G's gradient pushes x_{t-1} towards higher D (along +w), D's raises real and lowers fake logits
    g_loss.backward()
    assert torch.allclose(-x_fake.grad / (1 - torch.sigmoid(logit_fake))[:, None] * n, w[:C].expand(n, C), atol=1e-10)
    # D's gradient in closed form: real pairs pulled up (weight sigmoid(-logit)), fake ones pushed down (sigmoid(logit))
    D.zero_grad()
    ddgan.discriminator_loss(d, D, x_real, x_fake.detach(), x_t, t)["loss"].backward()
    up, down = torch.sigmoid(-logit_real), torch.sigmoid(logit_fake)
    assert D.b.grad.item() == pytest.approx((down.mean() - up.mean()).item(), rel=1e-10)
    pair_real, pair_fake = torch.cat([x_real, x_t], 1), torch.cat([x_fake.detach(), x_t], 1)
    expected = (down[:, None] * pair_fake).mean(0) - (up[:, None] * pair_real).mean(0)
    assert torch.allclose(D.w.grad, expected, atol=1e-12)


def test_a_tiny_image_ddgan_trains_and_samples():
    from unet import EncoderUNet, UNet
    torch.manual_seed(0)
    x, _ = synthetic_dataset(n=32, image_size=16, channels=3)
    x0 = x.float() / 127.5 - 1
    d = ddgan_diffusion(ddgan.CIFAR10_RECIPE["num_timesteps"])
    tiny = dict(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    # AdaGN (use_scale_shift_norm), as DDGAN's generator: with the plain DDPM block, h + emb, a GroupNorm with one
    # channel per group (these 8 channels) would subtract the embedding right away
    G = UNet(in_channels=3, latent_dim=8, use_scale_shift_norm=True, **tiny)
    D = EncoderUNet(in_channels=6, out_dim=1, **tiny)
    lr_g, lr_d, betas = ddgan.CIFAR10_RECIPE["lr_g"], ddgan.CIFAR10_RECIPE["lr_d"], ddgan.CIFAR10_RECIPE["adam_betas"]
    opt_G = torch.optim.Adam(G.parameters(), lr=lr_g * 10, betas=betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=lr_d * 10, betas=betas)
    before = [p.detach().clone() for p in G.parameters()]
    g = gen(5)
    for step in range(2):
        out = ddgan.ddgan_train_step(d, G, D, opt_G, opt_D, x0[step * 8:(step + 1) * 8], r1_gamma=0.02,
                                     apply_r1=step % 2 == 0, generator=g)
        assert set(out) == {"d_loss", "d_real", "d_fake", "r1", "g_loss"}
        assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
        assert (out["r1"] > 0) == (step % 2 == 0)
    assert all(p.requires_grad for p in D.parameters())       # D unfrozen after the G step
    assert any(not torch.equal(a, b) for a, b in zip(before, G.parameters()))
    with torch.no_grad():
        s = ddgan.ddgan_sample_loop(d, G, (4, 3, 16, 16), generator=gen(6))
    assert s.shape == (4, 3, 16, 16) and torch.isfinite(s).all() and s.abs().max() <= 1
    # G is multimodal through z: the same x_t with two latents gives two different x_0' (once the zero-initialised
    # last convolutions of the residual branches have moved: here by a random kick, as training would)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        t = torch.full((2,), 3)
        a, b = (G(x0[:2], t, z=torch.randn(2, 8, generator=gen(7 + i))) for i in range(2))
    assert (a - b).abs().max() > 1e-3
    # the UNet's z is required exactly when it has a latent_dim
    with pytest.raises(ValueError, match="z"):
        G(x0[:2], torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="z"):
        UNet(**tiny)(x0[:2], torch.zeros(2, dtype=torch.long), z=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="latent_dim"):
        ddgan.ddgan_sample_loop(d, lambda x, t, z: x, (2, 3))


def test_cifar10_recipe_builds_its_schedule():
    r = ddgan.CIFAR10_RECIPE
    d = GaussianDiffusion(get_named_beta_schedule(r["schedule"], r["num_timesteps"]))
    assert d.num_timesteps == 4 and d.alphas_cumprod[-1].item() < 1e-4
    assert r["latent_dim"] == 100 and r["lr_g"] == 1.6e-4 and r["lr_d"] == 1.25e-4 and r["adam_betas"] == (0.5, 0.9)
