"""
Denoising diffusion GANs (DDGAN, Xiao, Kreis & Vahdat, ICLR 2022, arXiv 2112.07804): a diffusion of only T = 4 steps
whose denoising distributions are learned by a conditional GAN, sampled in 4 network calls.

WHY A GAN. DDPM's reverse step p_theta(x_{t-1} | x_t) is a Gaussian, which is right only when beta_t is small: the
true q(x_{t-1} | x_t) is close to Gaussian for small steps and as multimodal as the data for large ones (DDGAN §3.1).
With T = 4 (schedules "vp": betas 0.48, 0.85, 0.96, 0.99) the steps are large, so DDGAN models q(x_{t-1} | x_t)
implicitly, through a generator that predicts a clean x_0' from x_t and a latent z ~ N(0, I):

    p_theta(x_{t-1} | x_t) = integral p(z) q(x_{t-1} | x_t, x_0 = G_theta(x_t, z, t)) dz            [DDGAN eq. 6]

with q(x_{t-1} | x_t, x_0) DDPM's posterior (F3, DDPM eqs. 6-7). If x_0' is distributed like q(x_0 | x_t), this IS
q(x_{t-1} | x_t) (marginalise x_0 out of q(x_{t-1} | x_t, x_0) q(x_0 | x_t)): tests/test_ddgan.py checks that an oracle
generator, sampling the exact x_0 | x_t of Gaussian data, reproduces the data in 4 steps. The posterior also keeps
x_{t-1} consistent with x_t, so G need not learn the noise, only the data.

TRAINING (DDGAN §3.2). For each t, a time-conditional discriminator D_phi(x_{t-1}, x_t, t) tells real pairs from
generated ones. Real pairs come from the forward process, x_0 ~ data, x_{t-1} ~ q(x_{t-1} | x_0) (F2), x_t ~
q(x_t | x_{t-1}) (F1), i.e. q(x_t) q(x_{t-1} | x_t) sampled without ever writing down q(x_{t-1} | x_t); fake pairs share
that x_t and take x_{t-1} ~ p_theta(x_{t-1} | x_t). With D = sigmoid(logit), -log D = softplus(-logit) and
-log(1 - D) = softplus(logit):

    D:  min_phi  sum_t E[ softplus(-D(x_{t-1}, x_t, t)) ]_real + E[ softplus(D(x_{t-1}, x_t, t)) ]_fake      [DDGAN eq. 4]
        + gamma/2 E_real || grad_{x_{t-1}} D(x_{t-1}, x_t, t) ||^2                            [R1, Mescheder et al. 2018, eq. 9]
    G:  min_theta sum_t E[ softplus(-D(x_{t-1}, x_t, t)) ]_fake      (non-saturating: max log D)              [DDGAN eq. 5]

t is drawn uniformly, one t per example (an unbiased estimate of the sum over t).

NETWORKS. Any G(x_t, t, z=z, **model_kwargs) -> x_0' and D(pair, t) -> one logit per example, pair = the two images
concatenated along dim 1, t the ORIGINAL timestep index (as for every model here). For images: unet.UNet(latent_dim=nz)
as G (z -> MLP -> added to the time embedding, where DDGAN's NCSN++ uses AdaGN; its output is not squashed, so
sampling clips x_0' to [-1, 1], clip_denoised) and unet.EncoderUNet(in_channels=2C, out_dim=1) as D; for 2-D, toy2d.MLP.
This file imports neither.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ddpm import device_of, randn, randn_like

# The CIFAR-10 recipe of the paper, from its appendix and the authors' README command (github.com/NVlabs/
# denoising-diffusion-gan): 4 V100s x batch 64. Their G is NCSN++ with AdaGN on z (here: unet.UNet with latent_dim)
# and their D a ResNet on the concatenated pair (here: unet.EncoderUNet with in_channels=6, out_dim=1).
CIFAR10_RECIPE = {
    "num_timesteps": 4,            # T
    "schedule": "vp",              # schedules.vp_betas: beta_min = 0.1, beta_max = 20
    "latent_dim": 100,             # nz, z ~ N(0, I_100)
    "z_emb_dim": 256,              # their z mapping network: 4 layers ("n_mlp") of width 256
    "ch": 128,                     # G's base channels ("num_channels_dae")
    "ch_mult": (1, 2, 2, 2),
    "num_res_blocks": 2,
    "attn_resolutions": (16,),
    "dropout": 0.0,
    "use_scale_shift_norm": True,  # their generator conditions on (t, z) by AdaGN
    "d_ch": 64,                    # D's base channels ("ngf")
    "lr_g": 1.6e-4,
    "lr_d": 1.25e-4,
    "adam_betas": (0.5, 0.9),
    "lr_schedule": "cosine to 1e-5 over training (both G and D)",
    "ema_decay": 0.9999,           # EMA of G's weights, used for sampling
    "batch_size": 256,             # 64 per GPU x 4 GPUs
    "r1_gamma": 0.02,              # README command (the code's default is 0.05)
    "lazy_reg": 15,                # R1 only on every 15th D step (with the same gamma)
    "epochs": 1800,
    "published_fid": 3.75,         # FID (50k) at T = 4, IS 9.63 (DDGAN Table 1)
}


# ----------------------------------------------------------------------------------------------------------------
# The diffusion side: real pairs, the posterior step, the 4-step chain
# ----------------------------------------------------------------------------------------------------------------

def q_sample_pairs(diffusion, x0, t, generator=None):
    """A real pair (x_{t-1}, x_t) ~ q(x_{t-1}, x_t): the forward process run from x_0 to t-1, then one more step."""
    # x_{t-1} ~ q(x_{t-1} | x_0)  (F2, DDPM eq. 4); at the first step (paper t = 1, code t = 0) x_{t-1} is x_0 itself
    x_prev = diffusion.q_sample(x0, (t - 1).clamp(min=0), randn_like(x0, generator))
    first = (t == 0).reshape(-1, *([1] * (x0.dim() - 1)))
    x_prev = torch.where(first, x0, x_prev)
    # x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)  (F1, DDPM eq. 2)
    x_t = diffusion.q_step_sample(x_prev, t, randn_like(x0, generator))
    return x_prev, x_t


def sample_posterior(diffusion, x0, x_t, t, generator=None):
    """x_{t-1} ~ q(x_{t-1} | x_t, x_0) (F3): the step DDGAN takes with the generator's x_0' in place of x_0."""
    # DDPM eqs. 6-7 (F3): N(mu~_t(x_t, x_0), beta~_t I); beta~ = 0 at the first step (abar_0 = 1): x_{-1} = x_0
    mean, variance, _ = diffusion.q_posterior_mean_variance(x0, x_t, t)
    return mean + variance.sqrt() * randn_like(x_t, generator)


def latent_size(G, latent_dim=None):
    """nz: latent_dim if given, else G.latent_dim (unet.UNet and toy2d.MLP built with latent_dim carry it)."""
    nz = latent_dim if latent_dim is not None else getattr(G, "latent_dim", None)
    if not isinstance(nz, int) or isinstance(nz, bool) or nz < 1:
        raise ValueError(f"latent_dim: the generator's latent size must be a positive integer (pass latent_dim= or "
                         f"give the generator a .latent_dim), got {nz!r}")
    return nz


def predict_x0(diffusion, G, x_t, t, latent_dim, generator=None, model_kwargs=None):
    """x_0' = G_theta(x_t, z, t) with a fresh z ~ N(0, I_nz) per example (DDGAN eq. 6)."""
    z = randn((x_t.shape[0], latent_dim), generator, x_t.device, x_t.dtype)
    return G(x_t, diffusion.original_t(t), z=z, **(model_kwargs or {}))


def denoising_step(diffusion, G, x_t, t, latent_dim, clip_denoised=True, generator=None, model_kwargs=None):
    """x_{t-1} ~ p_theta(x_{t-1} | x_t): x_0' from G, then the posterior (DDGAN eq. 6). Returns (x_{t-1}, x_0')."""
    x0 = predict_x0(diffusion, G, x_t, t, latent_dim, generator, model_kwargs)
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
    return sample_posterior(diffusion, x0, x_t, t, generator), x0


@torch.no_grad()
def ddgan_sample_loop(diffusion, generator_fn, shape, latent_dim=None, noise=None, model_kwargs=None,
                      clip_denoised=True, generator=None, progress=False, device=None, dtype=torch.float32):
    """DG4: x_T ~ N(0, I), then x_{t-1} ~ p_theta(x_{t-1} | x_t) for every step of `diffusion` (T = 4: 4 calls of G).

    generator_fn is G (generator is the torch.Generator of the noise, as in every sampler here). The last step
    (paper t = 1) has beta~ = 0, so the sample is G's x_0' there, clipped to [-1, 1] when clip_denoised.
    """
    nz = latent_size(generator_fn, latent_dim)
    x = noise if noise is not None else randn(shape, generator, device_of(generator_fn, device), dtype)
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc="ddgan", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x, _ = denoising_step(diffusion, generator_fn, x, t, nz, clip_denoised, generator, model_kwargs)
    return x


# ----------------------------------------------------------------------------------------------------------------
# The GAN side: losses and one training step
# ----------------------------------------------------------------------------------------------------------------

def discriminate(diffusion, D, x_prev, x_t, t):
    """D(x_{t-1}, x_t, t): one logit per example; the pair enters D concatenated along dim 1."""
    return D(torch.cat([x_prev, x_t], dim=1), diffusion.original_t(t)).reshape(x_t.shape[0])


def discriminator_loss(diffusion, D, x_prev_real, x_prev_fake, x_t, t, r1_gamma=0.0):
    """DG2: D's loss on a real pair (x_prev_real, x_t) and a fake one (x_prev_fake, x_t), plus R1 on the real pairs.

    Returns a dict of scalars: loss (what D minimises), real, fake, r1.
    """
    x_prev_real = x_prev_real.detach().requires_grad_(r1_gamma > 0)
    # R1's gradient is differentiated again (its gradient trains D): attention in D must then run in the math kernel,
    # the only scaled_dot_product_attention kernel with a double backward
    with sdpa_kernel(SDPBackend.MATH) if r1_gamma > 0 else nullcontext():
        logit_real = discriminate(diffusion, D, x_prev_real, x_t, t)
    logit_fake = discriminate(diffusion, D, x_prev_fake.detach(), x_t, t)
    # DDGAN eq. 4: E_real[-log D] + E_fake[-log(1 - D)], with D = sigmoid(logit)
    real, fake = F.softplus(-logit_real).mean(), F.softplus(logit_fake).mean()
    r1 = torch.zeros((), device=x_t.device, dtype=real.dtype)
    if r1_gamma > 0:
        grad = torch.autograd.grad(logit_real.sum(), x_prev_real, create_graph=True)[0]
        # R1 (Mescheder et al. 2018, eq. 9): gamma/2 E_real || grad_{x_{t-1}} D(x_{t-1}, x_t, t) ||^2
        r1 = r1_gamma / 2 * grad.pow(2).flatten(1).sum(1).mean()
    return {"loss": real + fake + r1, "real": real, "fake": fake, "r1": r1}


def generator_loss(diffusion, D, x_prev_fake, x_t, t):
    """DG3: the non-saturating generator loss E_fake[-log D(x_{t-1}, x_t, t)] (DDGAN eq. 5)."""
    # DDGAN eq. 5: max E[log D] = min E[softplus(-logit)]
    return F.softplus(-discriminate(diffusion, D, x_prev_fake, x_t, t)).mean()


def ddgan_train_step(diffusion, G, D, opt_G, opt_D, x0, latent_dim=None, r1_gamma=0.05, apply_r1=True,
                     generator=None, model_kwargs=None):
    """One DDGAN iteration: a D step, then a G step (each with its own t, pairs and z), as the authors' code does.

    x0: a batch of data in [-1, 1]. apply_r1=False skips R1 (lazy regularisation: the caller passes
    step % lazy_reg == 0). Returns detached scalars (no host sync): d_loss, d_real, d_fake, r1, g_loss.
    """
    nz = latent_size(G, latent_dim)
    T, n = diffusion.num_timesteps, x0.shape[0]
    draw_t = lambda: torch.randint(0, T, (n,), generator=generator,
                                   device=generator.device if generator is not None else x0.device).to(x0.device)
    # ---- D step: t ~ U{1..T}, a real pair, a fake x_{t-1} from the same x_t (G frozen: no graph through it)
    D.requires_grad_(True)
    t = draw_t()
    x_prev, x_t = q_sample_pairs(diffusion, x0, t, generator)
    with torch.no_grad():
        x_prev_fake, _ = denoising_step(diffusion, G, x_t, t, nz, False, generator, model_kwargs)
    d = discriminator_loss(diffusion, D, x_prev, x_prev_fake, x_t, t, r1_gamma if apply_r1 else 0.0)
    opt_D.zero_grad(set_to_none=True)
    d["loss"].backward()
    opt_D.step()
    # ---- G step: D frozen, gradients flow through the posterior sample into x_0' and G
    D.requires_grad_(False)
    t = draw_t()
    _, x_t = q_sample_pairs(diffusion, x0, t, generator)
    x_prev_fake, _ = denoising_step(diffusion, G, x_t, t, nz, False, generator, model_kwargs)
    g_loss = generator_loss(diffusion, D, x_prev_fake, x_t, t)
    opt_G.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return {"d_loss": d["loss"].detach(), "d_real": d["real"].detach(), "d_fake": d["fake"].detach(),
            "r1": d["r1"].detach(), "g_loss": g_loss.detach()}
