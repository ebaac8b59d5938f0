"""
Denoising diffusion implicit models (DDIM, Song, Meng & Ermon 2021): the same trained eps-model, a family of
non-Markovian forward processes with the same marginals, and a sampler that skips steps.

NAMES. DDIM's alpha_t is DDPM's alpha-bar_t. This file uses DDPM's names throughout: `abar` is DDIM's alpha.

THE IDEA. DDPM's loss only ever sees the marginals q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). Any
family of reverse conditionals that keeps those marginals gives the same training objective. DDIM picks

    q_sigma(x_{t-1} | x_t, x_0) = N( sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps_t, sigma_t^2 I )   [DDIM 7]
    with eps_t = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), the noise that is in x_t,

and samples by plugging in the model's x_0 and eps (eq. 12). sigma_t = eta * (the DDPM posterior std) (eq. 16):
eta = 1 is DDPM with beta~, eta = 0 is deterministic (an ODE solver for the probability flow, §4.3), which is
what makes inversion x_0 -> x_T and interpolation in x_T meaningful (§5.3).

SKIPPING. Only the marginals matter, so the sampler may visit a sub-sequence tau of the T steps (§4.2); abar_{t-1}
becomes abar of the previous kept step. That is exactly the respaced GaussianDiffusion of ddpm.py (D4), so this
file adds only the update rule, not a second schedule: every loop here runs on all the steps of the diffusion it
is given, and the caller respaces once (`ddim_sample_loop(diffusion.respace(50), model, shape)`).

The samplers take an optional cond_fn (classifier guidance, G2) and never import guidance.py.
"""

import math

import torch
from tqdm.auto import tqdm

from ddpm import device_of, randn, randn_like


def ddim_sigma(abar_t, abar_prev, eta):
    # DDIM eq. 16 (D3): sigma_t(eta) = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
    return eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()


def q_sigma_mean_variance(diffusion, x0, x_t, t, eta):
    """The DDIM family's reverse conditional q_sigma(x_{t-1} | x_t, x_0) (D1): mean and variance.

    For every sigma its marginals are DDPM's q(x_t | x_0) (DDIM Lemma 1); eta = 1 gives DDPM's posterior (F3).
    """
    abar_t = diffusion.extract(diffusion.alphas_cumprod, t, x_t)
    abar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x_t)
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    # the noise in x_t given x_0: eps_t = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)
    eps = (x_t - abar_t.sqrt() * x0) / (1 - abar_t).sqrt()
    # DDIM eq. 7: mean = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps_t, variance sigma_t^2
    # (at eta = ddim_max_eta the root's argument is 0 up to round-off, which must not become a NaN)
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    return mean, sigma ** 2


def ddim_max_eta(diffusion):
    """The largest eta for which DDIM's step is defined on `diffusion`'s steps: 1 - abar_{t-1} - sigma_t^2 >= 0.

    From eq. 16, 1 - abar_{t-1} - sigma_t^2 = (1 - abar_{t-1}) (1 - eta^2 (1 - abar_t / abar_{t-1}) / (1 - abar_t)), so
        eta^2 <= abar_{t-1} (1 - abar_t) / (abar_{t-1} - abar_t)   at every step with abar_{t-1} < 1.
    The right side is >= 1 (eta = 1, DDPM's posterior, is always allowed): close to 1 on long steps, large on short ones.
    """
    abar, abar_prev = diffusion.alphas_cumprod[1:], diffusion.alphas_cumprod_prev[1:]
    if abar.numel() == 0:
        return math.inf
    return (abar_prev * (1 - abar) / (abar_prev - abar)).min().sqrt().item()


def check_eta(diffusion, eta):
    """eta must be a number in [0, ddim_max_eta(diffusion)]: beyond it eq. 12 takes the square root of a negative."""
    if not (isinstance(eta, (int, float)) and 0 <= eta <= ddim_max_eta(diffusion)):
        raise ValueError(f"eta: must lie in [0, {ddim_max_eta(diffusion):.4g}] on these {diffusion.num_timesteps} steps "
                         f"(0 = deterministic DDIM, 1 = DDPM's posterior variance), got {eta!r}")


def ddim_step(diffusion, model, x_t, t, eta=0.0, clip_denoised=True, cond_fn=None, model_kwargs=None, generator=None):
    """One DDIM update x_t -> x_{t-1} on `diffusion`'s schedule (D2-D3; G2 when cond_fn is given).

    DDIM eq. 12 is q_sigma (D1, eq. 7) with the model's x_0 in place of the true one, and that is literally the code:
    predict x_0 (guided and clipped as asked), then take q_sigma's mean and variance at it. (eq. 7's eps_t, the noise
    that x_t holds given x_0, is then the model's eps re-derived from the clipped x_0: the step stays on the line
    through the x_0 it trusts.) `diffusion` is usually a respaced one, so "t - 1" is the previous kept step.
    """
    model_kwargs = model_kwargs or {}
    out = diffusion.denoise(model, x_t, t, clip_denoised, model_kwargs)
    pred_x0 = out["pred_x0"]
    if cond_fn is not None:
        abar_t = diffusion.extract(diffusion.alphas_cumprod, t, x_t)
        # G2 (ADM Algorithm 2): eps^ = eps_theta - sqrt(1 - abar_t) s grad_{x_t} log p_phi(y | x_t)
        eps = out["eps"] - (1 - abar_t).sqrt() * cond_fn(x_t, diffusion.original_t(t), **model_kwargs).to(x_t.dtype)
        # ... and x0^ from eps^ (DDPM eq. 4 solved for x_0), clipped like any prediction of x_0
        pred_x0 = diffusion.predict_x0_from_eps(x_t, t, eps)
        pred_x0 = pred_x0.clamp(-1, 1) if clip_denoised else pred_x0
    # DDIM eq. 12 (D2) = eq. 7 (D1) at x0_pred:
    #   x_{t-1} = sqrt(abar_{t-1}) x0_pred + sqrt(1 - abar_{t-1} - sigma_t^2) eps_theta + sigma_t z
    mean, variance = q_sigma_mean_variance(diffusion, pred_x0, x_t, t, eta)
    x_prev = mean
    if eta > 0:
        x_prev = mean + variance.sqrt() * randn_like(x_t, generator)  # sigma is 0 at the last step: abar_{t-1} = 1
    return {"sample": x_prev, "pred_x0": pred_x0}


@torch.no_grad()
def ddim_sample_loop(diffusion, model, shape, eta=0.0, noise=None, cond_fn=None, model_kwargs=None,
                     clip_denoised=True, generator=None, progress=False, device=None, dtype=torch.float32):
    """Sample with DDIM on every step of `diffusion` (D1-D4). `noise` is x_T.

    To skip steps (D4, §4.2), respace first: ddim_sample_loop(diffusion.respace(50, "quad"), model, shape).
    """
    check_eta(diffusion, eta)
    x = noise if noise is not None else randn(shape, generator, device_of(model, device), dtype)
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc="ddim", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x = ddim_step(diffusion, model, x, t, eta, clip_denoised, cond_fn, model_kwargs, generator)["sample"]
    return x


@torch.no_grad()
def ddim_invert(diffusion, model, x0, model_kwargs=None, refine=0, progress=False):
    """Run the eta = 0 update forward in t on every step of `diffusion`: x_0 -> x_T, the latent DDIM would decode
    back to x_0 (D5, §4.3). Respace first to invert on fewer steps.

    Reversing eq. 12 with sigma = 0 from the level of step i-1 to the level of step i:
        x_i = sqrt(abar_i) x0_pred + sqrt(1 - abar_i) eps,    x0_pred = (x_{i-1} - sqrt(1 - abar_{i-1}) eps) / sqrt(abar_{i-1})
    where the sampler's step back from x_i used eps(x_i, i), which is not known yet. As in the DDIM paper's ODE view
    we use eps(x_{i-1}, i): an O(step) error that vanishes as the steps shrink. `refine` > 0 re-evaluates eps at the
    new estimate of x_i that many times (a fixed-point iteration), which makes the inversion the exact inverse of
    the sampler's step wherever the iteration converges (for small steps and smooth models). No clipping:
    inversion must be invertible.
    """
    model_kwargs = model_kwargs or {}
    x = x0
    for i in tqdm(range(diffusion.num_timesteps), desc="ddim-invert", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        abar_t = diffusion.extract(diffusion.alphas_cumprod, t, x)
        abar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x)
        x_next = x
        for _ in range(1 + refine):
            eps = diffusion.denoise(model, x_next, t, False, model_kwargs)["eps"]
            # D5: x0_pred from the current point, which sits at noise level abar_{t-1}  (DDPM eq. 4 solved for x_0)
            pred_x0 = (x - (1 - abar_prev).sqrt() * eps) / abar_prev.sqrt()
            # D5: DDIM eq. 12 with sigma = 0, one level up: x_t = sqrt(abar_t) x0_pred + sqrt(1 - abar_t) eps
            x_next = abar_t.sqrt() * pred_x0 + (1 - abar_t).sqrt() * eps
        x = x_next
    return x


def slerp(z0, z1, alpha):
    """Spherical interpolation between two latents x_T (D5, DDIM §5.3), per example.

    slerp(z0, z1; a) = sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1,
    theta = arccos( <z0, z1> / (|z0| |z1|) ). Unlike a straight line it keeps the norm a Gaussian latent has.
    """
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device).reshape(-1, *([1] * (z0.dim() - 1)))
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z0.dim() - 1)))
    sin = torch.sin(theta)
    # nearly parallel latents: the formula is 0/0, and the straight line is the same path
    lerp = (1 - alpha) * z0 + alpha * z1
    safe = sin.abs() > 1e-6
    sin = torch.where(safe, sin, torch.ones_like(sin))
    spherical = torch.sin((1 - alpha) * theta) / sin * z0 + torch.sin(alpha * theta) / sin * z1
    return torch.where(safe, spherical, lerp)
