"""
Editing an image with a trained (unconditional) diffusion model: SDEdit (Meng et al. 2022, arXiv 2108.01073), its
masked form (RePaint's simplest case, Lugmayr et al. 2022, arXiv 2201.09865), and classifier-guided translation.

SDEDIT. To turn a rough input x_in (a stroke painting, an image of the wrong class) into a realistic image that keeps
its layout, noise it part of the way and denoise it back (SDEdit §3, Alg. 1; there in the VE-SDE, here VP):

    x_{t0} = sqrt(abar_{t0}) x_in + sqrt(1 - abar_{t0}) eps                         F2, DDPM eq. 4
    x_{t-1} ~ p_theta(x_{t-1} | x_t),  t = t0, ..., 1                               A2 (DDPM) or D2 (DDIM)

At t0 the noise has drowned the details by which x_in differs from real data, but not its coarse structure; the
reverse chain then fills in realistic details consistent with that structure. strength = t0 / T sets the
trade-off: 0 returns x_in unchanged (faithful), 1 ignores it (a plain sample: x_T ~ N(0, I) is the prior of the
reverse process, DDPM eq. 1, and there q(x_T | x_in) differs from it only by sqrt(abar_T) x_in ~ 0.006 x_in). With the
exact model the output given x_in has the law  integral q(x_{t0} | x_in) p(x_0 | x_{t0}) dx_{t0}: tests/test_edit.py
checks it against that law, computed in closed form for Gaussian data.

The diffusion may be a respaced one (D4): t0 counts ITS steps, t0 = round(strength * diffusion.num_timesteps), and
the chain runs on its steps below t0 (the first t0 steps of a diffusion are themselves a diffusion: the chain from
t0 is the loop of ddpm.p_sample_loop / ddim.ddim_sample_loop started at step t0 instead of T).

MASK (1 = keep the input, 0 = repaint: SDEdit's editing with a mask, and RePaint eqs. 8-10 without its resampling).
After each reverse step to level t-1 the known region is replaced by the input noised to that same level, with
fresh noise each time,
    x_{t-1} = m * x_{t-1}^known + (1 - m) * x_{t-1}^unknown,   x_{t-1}^known ~ q(x_{t-1} | x_in)   (F2)
so the model always sees a consistent x_{t-1} whose known part is a true sample of the forward process, and the
repainted part is harmonised with it. After the last step (level 0, abar = 1) the known region is x_in exactly.

TRANSLATION (Dhariwal & Nichol's classifier guidance on SDEdit's chain). A cond_fn steering towards a target class y
(guidance.classifier_cond_fn, with y in model_kwargs) shifts each DDPM mean by s Sigma grad log p(y | x_t) (G1) or
each DDIM eps by -sqrt(1 - abar_t) s grad log p(y | x_t) (G2): the chain from x_{t0} then lands in class y while
keeping what the noise did not erase. model_kwargs go to the model and to cond_fn alike, as in every sampler here; an
unconditional model that must not see y is wrapped by the caller (sample.py does so).
"""

import math

import torch
from tqdm.auto import tqdm

from ddim import check_eta, ddim_step
from ddpm import randn_like

# the reverse chains SDEdit can run from t0 (the `sampler` of sdedit): DDPM's ancestral step (A2) or DDIM's (D2);
# not to be confused with menu.SAMPLERS, the menu of whole samplers from x_T
REVERSE_CHAINS = ("ddpm", "ddim")


def sdedit_steps(diffusion, strength):
    """t0 as a number of reverse steps: round(strength * number of steps of `diffusion`), in 0..num_timesteps."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength: must be a number in [0, 1] (0 returns the input, 1 samples from pure noise), "
                         f"got {strength!r}")
    return int(math.floor(strength * diffusion.num_timesteps + 0.5))


def known_region(diffusion, x_in, t, generator=None):
    """x_in noised to the level of code step t - 1, the level a reverse step from t arrives at (RePaint eq. 8):
    q(x_{t-1} | x_in) by F2 with fresh noise, and x_in itself after the last step (abar_0 = 1).

    t is the step as a Python int (the loop's own counter: reading it back from a device tensor would make the host
    wait for the GPU at every step)."""
    if t == 0:
        return x_in
    t = torch.full((x_in.shape[0],), t, device=x_in.device, dtype=torch.long)
    # RePaint eq. 8 / DDPM eq. 4: x_{t-1}^known = sqrt(abar_{t-1}) x_in + sqrt(1 - abar_{t-1}) eps, eps fresh
    return diffusion.q_sample(x_in, t - 1, randn_like(x_in, generator))


@torch.no_grad()
def sdedit(diffusion, model, x_in, strength, sampler="ddpm", eta=0.0, mask=None, cond_fn=None, model_kwargs=None,
           clip_denoised=True, generator=None, progress=False):
    """SDEdit (E1): noise x_in to t0 = strength * T' (T' = the steps of `diffusion`) with F2, denoise with `sampler`.

    sampler: "ddpm" (ancestral, DDPM Algorithm 2, the diffusion's variance) or "ddim" (eq. 12 with this eta).
    mask:    optional, broadcastable to x_in, values in [0, 1]: 1 keeps the input, 0 repaints (E2).
    cond_fn: classifier guidance towards model_kwargs["y"] (G1 for ddpm, G2 for ddim): translation.
    strength 0 returns a copy of x_in; strength 1 is ddpm.p_sample_loop / ddim.ddim_sample_loop from x_T = the first
    draw of `generator`, the same samples those loops give with the same generator.
    """
    if sampler not in REVERSE_CHAINS:
        raise ValueError(f"sampler: unknown {sampler!r}; choose one of {', '.join(REVERSE_CHAINS)}")
    if sampler == "ddim":
        check_eta(diffusion, eta)
    if mask is not None:
        mask = torch.as_tensor(mask)  # checked where it was given (a mask read from a file: on the host, no GPU sync)
        try:
            fits = torch.broadcast_shapes(mask.shape, x_in.shape) == x_in.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to the input's {tuple(x_in.shape)}")
        if not bool(((mask >= 0) & (mask <= 1)).all()):
            raise ValueError("mask: values must lie in [0, 1] (1 keeps the input, 0 repaints)")
        mask = mask.to(device=x_in.device, dtype=x_in.dtype)
    t0 = sdedit_steps(diffusion, strength)
    if t0 == 0:
        return x_in.clone()
    noise = randn_like(x_in, generator)
    if t0 == diffusion.num_timesteps:
        # strength 1: x_T ~ N(0, I), the reverse process's prior (DDPM eq. 1), as in p_sample_loop
        x = noise
    else:
        # SDEdit: x_{t0} ~ q(x_{t0} | x_in)   (DDPM eq. 4, F2)
        x = diffusion.q_sample(x_in, torch.full((x_in.shape[0],), t0 - 1, device=x_in.device, dtype=torch.long), noise)
    for i in tqdm(range(t0 - 1, -1, -1), desc="sdedit", disable=not progress, leave=False):
        t = torch.full((x_in.shape[0],), i, device=x_in.device, dtype=torch.long)
        if sampler == "ddpm":
            # DDPM Algorithm 2 (A2), with G1 when cond_fn is given
            x = diffusion.p_sample(model, x, t, clip_denoised, cond_fn, model_kwargs, generator)["sample"]
        else:
            # DDIM eq. 12 (D2), with G2 when cond_fn is given
            x = ddim_step(diffusion, model, x, t, eta, clip_denoised, cond_fn, model_kwargs, generator)["sample"]
        if mask is not None:
            # RePaint eq. 10: x_{t-1} = m * x_{t-1}^known + (1 - m) * x_{t-1}^unknown
            x = mask * known_region(diffusion, x_in, i, generator) + (1 - mask) * x
    return x
