"""
A laptop playground: every sampler of this repository on 2-D toy data, trained in well under a minute on a CPU (the
DDGAN panel, a GAN, takes a few minutes more; --ddgan-steps 0 leaves it out).

    python toy2d.py --data moons                 # -> runs/toy2d/toy2d_moons.png
    python toy2d.py --data gaussians8 --cond     # + classifier-free and classifier guidance for one class
    python toy2d.py --data moons --out assets/toy2d_moons.png --force     # the README's picture

Only the model and the data differ from the image pipeline: a small MLP predicts eps from (x_t, t[, y]) with the same
sinusoidal timestep embedding as the U-Net (unet.timestep_embedding, DDPM App. B), it is trained with
ddpm.GaussianDiffusion.training_losses (DDPM Algorithm 1, L_simple, eq. 14), and it is sampled by

    DDPM      ddpm.GaussianDiffusion.p_sample_loop     ancestral sampling, all T steps (DDPM Algorithm 2)
    DDIM      ddim.ddim_sample_loop                    eta = 0 on 50 and 10 of the T steps (DDIM eq. 12, §4.2)
    Langevin  score.langevin_sample_loop               annealed Langevin dynamics on the VP levels (NCSN Algorithm 1)
    PC        score.pc_sample_loop                     DDPM predictor + Langevin corrector (SDE paper, App. G)
    DDGAN     ddgan.ddgan_sample_loop                  a separate 4-step model: a generator MLP(x_t, z, t) -> x_0' and a
                                                       discriminator MLP(x_{t-1}, x_t, t), trained adversarially
                                                       (Denoising Diffusion GANs, ddgan.py)

and, with --cond, guided by guidance.py: classifier-free guidance, eps~ = (1 + w) eps(x, t, y) - w eps(x, t, null)
(CFG, G5; the model is trained with the label dropped to the null class with probability p_uncond), and classifier
guidance with a small noisy classifier trained on x_t = q_sample(x_0, t) (ADM §4, G3-G4).

The picture is a grid of 2-D histograms: the data, each sampler's samples, and the forward process q(x_t) at a few t.
The command prints the training time and each sampler's two-sample statistic against fresh data, beside its floor
(two data draws) and ceiling (data against N(0, I) noise).

THREADS (one by default: the tensors are tiny) and THE TWO-SAMPLE STATISTIC (MMD^2 with a sum of RBF kernels,
and the energy distance) are explained in docs/toy2d.md.
"""

import copy
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ddgan
import ddim
import score
from cli import (MAX_BATCH, MAX_IMAGES, MAX_STEPS, Parser, UsageError, check_new_file, check_number, check_seed,
                 main_guard, progress, say, wrote)
from ddpm import GaussianDiffusion, randn
from schedules import SCHEDULES, get_named_beta_schedule
from unet import timestep_embedding

DATASETS = ("moons", "swissroll", "gaussians8", "checkerboard")
# classes of the labelled variants (--cond): which moon, which third of the roll, which Gaussian, which black square
NUM_CLASSES = {"moons": 2, "swissroll": 3, "gaussians8": 8, "checkerboard": 8}
EXTENT = 1.25             # the histograms show [-EXTENT, EXTENT]^2
DDGAN_STEPS = 6000        # DDGAN training steps (a GAN needs many more than the eps-model)


# ----------------------------------------------------------------------------------------------------------------
# Data: four 2-D distributions, scaled to roughly [-1, 1]^2, made in code
# ----------------------------------------------------------------------------------------------------------------

def _uniform(n, generator):
    return torch.rand(n, generator=generator)


def _normal(shape, generator):
    return torch.randn(shape, generator=generator)


def make_moons(n, generator=None, noise=0.06):
    """Two interleaving half circles (as scikit-learn's make_moons), centred and scaled by 1/1.6, so that with the
    noise they stay (almost all) inside [-1, 1]^2."""
    y = (_uniform(n, generator) < 0.5).long()
    theta = math.pi * _uniform(n, generator)
    # upper moon: (cos, sin) of theta in [0, pi]; lower moon: (1 - cos, 1/2 - sin), shifted into the upper one's gap
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    x = torch.where(y[:, None] == 0, upper, lower) + noise * _normal((n, 2), generator)
    # the pair spans x in [-1, 2], y in [-0.5, 1]: centre (0.5, 0.25), half-width 1.5, plus a margin for the noise
    return (x - torch.tensor([0.5, 0.25])) / 1.6, y


def make_swissroll(n, generator=None, noise=0.02):
    """A 2-D Swiss roll: radius growing with the angle, theta in [1.5 pi, 4.5 pi], scaled by the largest radius."""
    u = _uniform(n, generator)
    theta = 1.5 * math.pi * (1 + 2 * u)
    x = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1) / (4.5 * math.pi)
    # classes: the inner, middle and outer third of the roll
    y = (u * 3).long().clamp(max=2)
    return x + noise * _normal((n, 2), generator), y


def make_gaussians8(n, generator=None, radius=0.8, std=0.05):
    """Eight Gaussians with std 0.05 centred on a circle of radius 0.8, at angles k pi/4; the class is k."""
    y = torch.randint(0, 8, (n,), generator=generator)
    angle = y.float() * math.pi / 4
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + std * _normal((n, 2), generator), y


def make_checkerboard(n, generator=None):
    """Uniform on the 8 'black' squares of a 4 x 4 board covering [-1, 1]^2; the class is the square's index."""
    y = torch.randint(0, 8, (n,), generator=generator)
    # square k: row k // 2, column 2 (k % 2) + (row % 2), so that neighbours alternate colour
    row = y // 2
    col = 2 * (y % 2) + row % 2
    corner = torch.stack([col, row], dim=1).float() * 0.5 - 1.0
    return corner + 0.5 * torch.rand((n, 2), generator=generator), y


_MAKERS = {"moons": make_moons, "swissroll": make_swissroll, "gaussians8": make_gaussians8,
           "checkerboard": make_checkerboard}


def make_data(name, n, generator=None, with_labels=False):
    """n points [n, 2] (float32, roughly in [-1, 1]) of the named dataset; (x, y) with class labels if with_labels."""
    if name not in _MAKERS:
        raise ValueError(f"data: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    x, y = _MAKERS[name](n, generator)
    return (x.float(), y) if with_labels else x.float()


# ----------------------------------------------------------------------------------------------------------------
# The eps-model (and the noisy classifier): a residual MLP with the U-Net's timestep embedding
# ----------------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """h + W2 SiLU(W1 SiLU(h) + emb): a residual MLP block that adds the time (and class) embedding, like a ResBlock."""

    def __init__(self, hidden):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, h, emb):
        return h + self.lin2(F.silu(self.lin1(F.silu(h)) + emb))


class MLP(nn.Module):
    """f(x_t, t[, y]) for 2-D x: eps (out_dim = 2) for the diffusion, or K logits for the noisy classifier.

    t: the ORIGINAL timestep index (what every sampler passes), embedded by unet.timestep_embedding (DDPM App. B)
       and a two-layer MLP, as in the U-Net.
    num_classes: K adds a label embedding with K + 1 rows; row K is the null label of classifier-free guidance, and
       y=None means the null label (the unconditional model).
    latent_dim: nz adds a latent z [N, nz] through a two-layer MLP into the same embedding: the DDGAN generator
       G(x_t, z, t) -> x_0' (ddgan.py), as unet.UNet(latent_dim=nz) does for images.
    """

    def __init__(self, dim=2, hidden=64, depth=3, emb_dim=64, num_classes=None, out_dim=None, latent_dim=None):
        super().__init__()
        self.emb_dim, self.num_classes, self.latent_dim = emb_dim, num_classes, latent_dim
        self.time_embed = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.latent_embed = (nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                             if latent_dim else None)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList([Block(hidden) for _ in range(depth)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, out_dim or dim))

    def forward(self, x, t, y=None, z=None):
        # U1: sinusoidal embedding of t, then an MLP
        emb = self.time_embed(timestep_embedding(t, self.emb_dim).to(x.dtype))
        if self.label_embed is not None:
            y = torch.full((x.shape[0],), self.num_classes, device=x.device) if y is None else y
            emb = emb + self.label_embed(y)
        if self.latent_embed is not None:
            # DDGAN eq. 6: G(x_t, z, t), z entering like the class embedding
            emb = emb + self.latent_embed(z)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


# ----------------------------------------------------------------------------------------------------------------
# Training: DDPM Algorithm 1 for the eps-model, cross-entropy on x_t for the classifier (G4)
# ----------------------------------------------------------------------------------------------------------------

def make_diffusion(schedule="cosine", T=1000):
    return GaussianDiffusion(get_named_beta_schedule(schedule, T))


def train_eps_model(model, diffusion, data, steps=3000, batch_size=512, lr=5e-3, p_uncond=0.0, generator=None,
                    log_every=0, show_progress=False, desc="training"):
    """Fit eps_theta with L_simple on fresh draws of `data` (DDPM Algorithm 1); returns the final (smoothed) loss.

    p_uncond > 0 (classifier-free guidance, CFG §3.2): each label is replaced by the null label with that probability,
    so the same network also learns the unconditional eps.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # cosine decay of the learning rate: short runs end at a low-noise optimum instead of a noisy one
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.05)
    model.train()
    running = 0.0
    bar = progress(steps, desc, unit="step", disable=not show_progress)
    for step in range(steps):
        # Algorithm 1, line 2: x_0 ~ q(x_0)
        x0, y = make_data(data, batch_size, generator, with_labels=True)
        kwargs = {}
        if model.num_classes:
            # CFG: drop the label to the null class (index K) with probability p_uncond
            drop = torch.rand(batch_size, generator=generator) < p_uncond
            kwargs["y"] = torch.where(drop, torch.full_like(y, model.num_classes), y)
        # Algorithm 1, lines 3-5: t ~ U{1..T}, eps ~ N(0, I), gradient step on || eps - eps_theta(x_t, t) ||^2
        loss = diffusion.training_losses(model, x0, model_kwargs=kwargs, generator=generator)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1:5d}  loss {running:.4f}", flush=True)
        bar.update(1)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix_str(f"loss {running:.4f}", refresh=False)
    bar.close()
    model.eval()
    return running


def train_classifier(classifier, diffusion, data, steps=1000, batch_size=512, lr=5e-3, generator=None,
                     show_progress=False):
    """The noisy classifier p_phi(y | x_t, t) of classifier guidance: cross-entropy on x_t = q_sample(x_0, t) (G4)."""
    from guidance import noisy_classifier_loss
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.0)
    classifier.train()
    bar = progress(steps, "training the noisy classifier", unit="step", disable=not show_progress)
    for _ in range(steps):
        x0, y = make_data(data, batch_size, generator, with_labels=True)
        loss = noisy_classifier_loss(diffusion, classifier, x0, y, generator=generator)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
    bar.close()
    classifier.eval()
    return classifier


def make_ddgan(hidden=64, depth=3, latent_dim=2, d_hidden=128):
    """A DDGAN for 2-D data: the T = 4 "vp" diffusion (schedules.vp_betas), the generator G(x_t, z, t) -> x_0' (an MLP
    with a latent) and the discriminator D(x_{t-1}, x_t, t) -> logit (an MLP on the concatenated pair)."""
    diffusion = GaussianDiffusion(get_named_beta_schedule("vp", 4))
    return diffusion, MLP(hidden=hidden, depth=depth, latent_dim=latent_dim), MLP(dim=4, hidden=d_hidden, depth=depth,
                                                                                  out_dim=1)


def train_ddgan(G, D, diffusion, data, steps=DDGAN_STEPS, batch_size=256, lr_g=2e-4, lr_d=1e-3, r1_gamma=0.05,
                lazy_reg=4, ema_decay=0.99, generator=None, show_progress=False):
    """Train a DDGAN (ddgan.ddgan_train_step: a D step, then a G step) on fresh draws of `data`; returns G's EMA copy.

    The recipe of the paper (ddgan.CIFAR10_RECIPE) scaled to 2-D: Adam with betas (0.5, 0.9), D's learning rate
    above G's, R1 on every `lazy_reg`-th D step, an exponential moving average of G's weights for sampling (GAN
    iterates wander around the equilibrium; their average sits closer to it: on moons after 3000 steps MMD^2 0.008
    with it, 0.034 without, measured), and a cosine decay of both rates. Like any GAN it needs many more steps than
    the eps-model: 6000 steps of 256 for moons (still a blob after 1000).
    """
    opt_G = torch.optim.Adam(G.parameters(), lr=lr_g, betas=(0.5, 0.9))
    opt_D = torch.optim.Adam(D.parameters(), lr=lr_d, betas=(0.5, 0.9))
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps, eta_min=o.defaults["lr"] * 0.05) for o in (opt_G, opt_D)]
    ema = copy.deepcopy(G).requires_grad_(False)
    G.train(), D.train()
    bar = progress(steps, "training the DDGAN", unit="step", disable=not show_progress)
    for step in range(steps):
        x0 = make_data(data, batch_size, generator)
        ddgan.ddgan_train_step(diffusion, G, D, opt_G, opt_D, x0, r1_gamma=r1_gamma, apply_r1=step % lazy_reg == 0,
                               generator=generator)
        for sched in scheds:
            sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - ema_decay)
        bar.update(1)
    bar.close()
    return ema.eval()


# ----------------------------------------------------------------------------------------------------------------
# Two-sample statistics
# ----------------------------------------------------------------------------------------------------------------

MMD_BANDWIDTHS = (0.02, 0.05, 0.1, 0.2, 0.5)


def mmd2(x, y, bandwidths=MMD_BANDWIDTHS):
    """Unbiased MMD^2 between samples x [n, d] and y [m, d] for a sum of RBF kernels (Gretton et al. 2012, Lemma 6).

    MMD_u^2 = 1/(n(n-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j) - 2/(nm) sum_{i,j} k(x_i, y_j)
    with k = sum_h exp(-||a - b||^2 / (2 h^2)). Computed in float64; it can be slightly negative when P = Q.
    """
    x, y = x.double().flatten(1), y.double().flatten(1)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError("mmd2: needs at least two points in each sample")

    def kernel_sum(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy, kxy = kernel_sum(x, x), kernel_sum(y, y), kernel_sum(x, y)
    # leave out the diagonal k(x_i, x_i) = len(bandwidths): the unbiased U-statistic
    k_diag = float(len(bandwidths))
    term_xx = (kxx.sum() - n * k_diag) / (n * (n - 1))
    term_yy = (kyy.sum() - m * k_diag) / (m * (m - 1))
    return (term_xx + term_yy - 2 * kxy.mean()).item()


def energy_distance(x, y):
    """E||x - y|| - 1/2 E||x - x'|| - 1/2 E||y - y'|| (Szekely & Rizzo), U-statistics within each sample; >= 0 in
    expectation, 0 iff the distributions are equal."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    n, m = x.shape[0], y.shape[0]
    exy = torch.cdist(x, y).mean()
    exx = torch.cdist(x, x).sum() / (n * (n - 1))
    eyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return (exy - 0.5 * exx - 0.5 * eyy).item()


# ----------------------------------------------------------------------------------------------------------------
# Sampling with every sampler
# ----------------------------------------------------------------------------------------------------------------

def samplers(diffusion, ddim_steps=(50, 10), score_steps=100):
    """name -> function(model, n, generator, model_kwargs, cond_fn) returning [n, 2] samples, for each sampler."""
    def ddpm_fn(model, n, g, kw=None, cond_fn=None):
        return diffusion.p_sample_loop(model, (n, 2), generator=g, model_kwargs=kw, cond_fn=cond_fn)

    def ddim_fn(steps):
        return lambda model, n, g, kw=None, cond_fn=None: ddim.ddim_sample_loop(
            diffusion.respace(steps), model, (n, 2), generator=g, model_kwargs=kw, cond_fn=cond_fn)

    def langevin_fn(model, n, g, kw=None, cond_fn=None):
        return score.langevin_sample_loop(diffusion.respace(score_steps), model, (n, 2), generator=g, model_kwargs=kw,
                                          cond_fn=cond_fn)

    def pc_fn(model, n, g, kw=None, cond_fn=None):
        return score.pc_sample_loop(diffusion.respace(score_steps), model, (n, 2), generator=g, model_kwargs=kw,
                                    cond_fn=cond_fn)

    # a short diffusion (a quick test run) cannot be respaced to more steps than it has
    T = diffusion.num_timesteps
    ddim_steps = sorted({min(s, T) for s in ddim_steps}, reverse=True)
    score_steps = min(score_steps, T)
    out = {f"DDPM {T}": ddpm_fn}
    out.update({f"DDIM {s}": ddim_fn(s) for s in ddim_steps})
    out[f"Langevin {score_steps}x2"] = langevin_fn
    out[f"PC {score_steps}+1"] = pc_fn
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rendering: 2-D histograms as images, no plotting library
# ----------------------------------------------------------------------------------------------------------------

def histogram_image(x, size=160, color=(0.1, 0.2, 0.6), pixels_per_bin=2):
    """[3, size, size] image in [0, 1] of the 2-D histogram of x over [-EXTENT, EXTENT]^2: white background,
    density as ink of `color` (square-root scaled, saturating at the 99th percentile of the occupied bins).
    Each bin is drawn as pixels_per_bin^2 pixels, so a few thousand points fill the shapes instead of speckling them."""
    x = x.detach().float().cpu()
    bins = size // pixels_per_bin
    counts, _ = torch.histogramdd(x, bins=[bins, bins], range=[-EXTENT, EXTENT, -EXTENT, EXTENT])
    # histogramdd's counts[i, j]: i along x (columns), j along y (rows); images have row 0 at the top
    counts = counts.T.flip(0).repeat_interleave(pixels_per_bin, 0).repeat_interleave(pixels_per_bin, 1)
    occupied = counts[counts > 0]
    top = torch.quantile(occupied.sqrt(), 0.99).item() if occupied.numel() else 1.0
    ink = (counts.sqrt() / max(top, 1e-8)).clamp(0, 1)
    color = torch.tensor(color).reshape(3, 1, 1)
    return 1 - ink[None] * (1 - color)


def label_strip(text, width, height=14):
    """[3, height, width] white strip with `text` in PIL's default font (black); blank if PIL is unavailable."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pillow ships with torchvision, but the figure must not depend on it
        return torch.ones(3, height, width)
    img = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(img).text((3, 1), text, fill=(0, 0, 0))
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3).permute(2, 0, 1) / 255.0


def panel(x, title, size=160, color=(0.1, 0.2, 0.6)):
    """A labelled histogram: the title strip above the 2-D histogram of x, with a light frame."""
    img = histogram_image(x, size, color)
    img[:, [0, -1], :] = 0.75
    img[:, :, [0, -1]] = 0.75
    return torch.cat([label_strip(title, size), img], dim=1)


def save_figure(panels, path, nrow):
    from torchvision.utils import make_grid, save_image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(make_grid(torch.stack(panels), nrow=nrow, padding=6, pad_value=1.0), path)


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    p = Parser(description="Train a tiny diffusion model on 2-D data and draw every sampler's samples.")
    p.add_argument("--data", default="moons", choices=DATASETS, help="the 2-D dataset")
    p.add_argument("--cond", action="store_true",
                   help="also a class-conditional model: classifier-free (CFG eq. 6) and classifier guidance (ADM §4)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (DDPM Algorithm 1)")
    p.add_argument("--batch-size", type=int, default=512, help="training batch size")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate, cosine-decayed")
    p.add_argument("--hidden", type=int, default=64, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="residual MLP blocks")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES, help="beta schedule")
    p.add_argument("--diffusion-steps", type=int, default=1000, help="T, the number of diffusion steps")
    p.add_argument("--n-samples", type=int, default=2000, help="samples per sampler")
    p.add_argument("--p-uncond", type=float, default=0.1,
                   help="--cond: probability of dropping the label to the null class in training (CFG §3.2)")
    p.add_argument("--guide-class", type=int, default=0, help="--cond: the class to guide towards")
    p.add_argument("--cfg-scales", default="0,1,4", help="--cond: CFG weights w, comma-separated")
    p.add_argument("--classifier-scales", default="1,4", help="--cond: classifier scales s, comma-separated")
    p.add_argument("--classifier-steps", type=int, default=1500, help="--cond: classifier training steps")
    p.add_argument("--ddgan-steps", type=int, default=DDGAN_STEPS,
                   help="training steps of the 4-step DDGAN panel (Denoising Diffusion GANs), 0 to leave it out")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see the module docstring)")
    p.add_argument("--out", default=None, help="PNG path (default: runs/toy2d/toy2d_<data>[_cond].png)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        for flag, value, low, high in [
                ("--steps", args.steps, 1, MAX_STEPS), ("--batch-size", args.batch_size, 2, MAX_BATCH),
                ("--hidden", args.hidden, 1, 65_536), ("--depth", args.depth, 1, 1000),
                ("--diffusion-steps", args.diffusion_steps, 2, 100_000), ("--n-samples", args.n_samples, 2, MAX_IMAGES),
                ("--classifier-steps", args.classifier_steps, 1, MAX_STEPS), ("--threads", args.threads, 1, 1024),
                ("--ddgan-steps", args.ddgan_steps, 0, MAX_STEPS)]:
            check_number(flag, value, lo=low, hi=high, integer=True)
        check_seed("--seed", args.seed)
        check_number("--lr", args.lr, lo=0, hi=1e6, lo_open=True)  # diverging: said after training
        check_number("--p-uncond", args.p_uncond, lo=0, hi=1, hi_open=True)
        check_number("--guide-class", args.guide_class, lo=0, hi=NUM_CLASSES[args.data] - 1, integer=True)
        for flag in ("cfg_scales", "classifier_scales"):
            name = "--" + flag.replace("_", "-")
            try:
                scales = [float(v) for v in getattr(args, flag).split(",") if v.strip()]
            except ValueError:
                raise UsageError(f"{name}: expected comma-separated numbers, got {getattr(args, flag)!r}") from None
            if not scales or len(scales) > 16:  # one panel each
                raise UsageError(f"{name}: expected 1 to 16 comma-separated numbers >= 0, got {getattr(args, flag)!r}")
            for v in scales:
                check_number(name, v, lo=0, hi=1e6)
            setattr(args, flag, scales)
        if args.out is None:
            args.out = os.path.join("runs", "toy2d", f"toy2d_{args.data}{'_cond' if args.cond else ''}.png")
        check_new_file(args.out, "--out", args.force)  # before the training, not after it
        from PIL import Image  # noqa: PLC0415
        if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
            raise UsageError(f"--out: {args.out} has no picture extension; end it with .png")
    except UsageError as e:
        p.error(str(e))
    return args


def fmt_stats(name, x, ref):
    return f"  {name:<22s} MMD^2 {mmd2(x, ref):9.5f}   energy {energy_distance(x, ref):8.5f}"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    diffusion = make_diffusion(args.schedule, args.diffusion_steps)
    model = MLP(hidden=args.hidden, depth=args.depth)
    train_model(args, model, diffusion, g)
    ref = make_data(args.data, args.n_samples, g)         # the reference draw every sampler is compared with
    results = sample_and_score(args, model, diffusion, g, ref)
    panels, nrow = sample_panels(args, diffusion, g, ref, results)
    if args.cond:
        panels += guided_panels(args, model, diffusion, g, nrow)
    save_figure(panels, args.out, nrow)
    wrote(args.out, f"{len(panels) // nrow} rows of {nrow} panels")
    if not args.cond:
        say(f"next: python toy2d.py --data {args.data} --cond    # adds classifier-free and classifier guidance")


def train_model(args, model, diffusion, g):
    """Algorithm 1 on the 2-D data (train_eps_model), timed; a diverged loss stops here, before anything is drawn."""
    print(f"training on {args.data}: {args.steps} steps of {args.batch_size}, T = {args.diffusion_steps} "
          f"({args.schedule}), {sum(p.numel() for p in model.parameters()) / 1e3:.0f}k parameters, "
          f"{torch.get_num_threads()} threads", flush=True)
    t0 = time.perf_counter()
    loss = train_eps_model(model, diffusion, args.data, args.steps, args.batch_size, args.lr,
                           0.0, g, show_progress=not args.no_progress, desc="training the eps-model")
    train_time = time.perf_counter() - t0
    print(f"trained in {train_time:.1f} s (final loss {loss:.4f})", flush=True)
    if not math.isfinite(loss):
        raise UsageError(f"--lr: training diverged (loss {loss}); nothing was written: try a smaller --lr "
                         "(default 5e-3)")


def sample_and_score(args, model, diffusion, g, ref):
    """Every sampler's points (and DDGAN's, from its own 4-step model, unless --ddgan-steps 0), each printed with its
    two-sample statistic against `ref` beside the floor and the ceiling: {name: points [n, 2]}."""
    n, results = len(ref), {}
    fns = samplers(diffusion)
    say(f"sampling {n} points with each of {len(fns)} samplers ({', '.join(fns)})")
    t0 = time.perf_counter()
    for name, fn in fns.items():
        results[name] = fn(model, n, g)
    sample_time, n_sampled = time.perf_counter() - t0, len(results)
    check_finite(results, "--lr: training diverged; try a smaller --lr (default 5e-3)")
    if args.ddgan_steps:
        # DDGAN: its own 4-step diffusion and networks, trained on the same data (after the samplers above, so their
        # random draws, and numbers, do not depend on it)
        t0 = time.perf_counter()
        d4, G, D = make_ddgan(args.hidden, args.depth)
        G = train_ddgan(G, D, d4, args.data, args.ddgan_steps, generator=g, show_progress=not args.no_progress)
        with torch.no_grad():
            results["DDGAN 4"] = ddgan.ddgan_sample_loop(d4, G, (n, 2), generator=g)
        print(f"DDGAN (T = 4, {args.ddgan_steps} steps of 256) trained and sampled in {time.perf_counter() - t0:.1f} s")
        check_finite({"DDGAN 4": results["DDGAN 4"]}, "--ddgan-steps: the DDGAN training diverged")
    print(f"sampled {n_sampled} x {n} points in {sample_time:.1f} s\ntwo-sample statistics against a fresh data draw "
          f"(n = {n}):")
    print(fmt_stats("data vs data (floor)", make_data(args.data, n, g), ref))
    print(fmt_stats("N(0, I) noise (ceiling)", randn((n, 2), g), ref))
    for name, x in results.items():
        print(fmt_stats(name, x, ref))
    return results


def sample_panels(args, diffusion, g, ref, results):
    """The first rows of the picture: the data and each sampler's points, then the forward process q(x_t) at a few t
    (padded to one row length): (panels, panels per row)."""
    n = len(ref)
    panels = [panel(ref, "data", color=(0.0, 0.0, 0.0))]
    panels += [panel(x, name) for name, x in results.items()]
    forward_ts = [0, 50, 100, 200, 400, args.diffusion_steps - 1]
    forward_ts = sorted({min(t, args.diffusion_steps - 1) for t in forward_ts})
    for t_ in forward_ts:
        t = torch.full((n,), t_, dtype=torch.long)
        # the forward process q(x_t | x_0) (DDPM eq. 4), applied to the reference draw
        panels.append(panel(diffusion.q_sample(ref, t, randn((n, 2), g)), f"q(x_t), t = {t_ + 1}", color=(0.55, 0.1, 0.1)))
    nrow = max(len(results) + 1, len(forward_ts))
    panels += [torch.ones_like(panels[0])] * (nrow - len(forward_ts))
    return panels, nrow


def check_finite(results, cause):
    """One check before anything is drawn: a diverged model gives NaN points, which must not become a picture."""
    bad = {name: int((~torch.isfinite(x)).any(dim=1).sum()) for name, x in results.items()}
    bad = ", ".join(f"{name}: {k}" for name, k in bad.items() if k)
    if bad:
        raise UsageError(f"{cause} (non-finite samples from {bad}; nothing was written)")


def guided_panels(args, model, diffusion, g, nrow):
    """The --cond row: class-y data, classifier-free guidance at each w, classifier guidance at each s (DDIM 50 quad).

    Each guidance gets the setting of its paper: CFG a class-conditional model trained with label dropout (its null
    label is the unconditional model, G5); classifier guidance the unconditional `model` plus a noisy classifier (G3-G4).
    On a toy like 8 Gaussians the conditional model's null branch, trained on only p_uncond of the batches, is the
    weakest part (it is as hard to learn as the whole unconditional model): it shows in CFG at large w.
    """
    from guidance import ClassifierFreeGuidance, classifier_cond_fn
    K, yc, n = NUM_CLASSES[args.data], args.guide_class, args.n_samples
    t0 = time.perf_counter()
    cond_model = MLP(hidden=args.hidden, depth=args.depth, num_classes=K)
    train_eps_model(cond_model, diffusion, args.data, args.steps, args.batch_size, args.lr, args.p_uncond, g,
                    show_progress=not args.no_progress, desc="training the conditional eps-model")
    print(f"conditional model (p_uncond = {args.p_uncond}) trained in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    classifier = MLP(hidden=args.hidden, depth=args.depth, out_dim=K)
    train_classifier(classifier, diffusion, args.data, args.classifier_steps, args.batch_size, args.lr, g,
                     show_progress=not args.no_progress)
    print(f"classifier trained in {time.perf_counter() - t0:.1f} s")
    x_all, y_all = make_data(args.data, 20 * n, g, with_labels=True)
    ref = x_all[y_all == yc][:n]
    kw = {"y": torch.full((n,), yc, dtype=torch.long)}
    # DDIM with the quadratic spacing (D4): more of its 50 steps at low noise, where these small blobs are resolved
    steps = min(50, diffusion.num_timesteps)
    sample = lambda m, cond_fn=None: ddim.ddim_sample_loop(diffusion.respace(steps, "quad"), m, (n, 2), generator=g,
                                                           model_kwargs=kw, cond_fn=cond_fn)
    guided = {}
    for w in args.cfg_scales:
        # G5: eps~ = (1 + w) eps(x, t, y) - w eps(x, t, null)
        guided[f"CFG w={w:g}"] = sample(ClassifierFreeGuidance(cond_model, w, null_class=K))
    uncond = lambda x, t, y=None: model(x, t)             # the unconditional model ignores the label
    for s in args.classifier_scales:
        # G3: cond_fn = s grad log softmax(classifier(x_t, t))[y], on the unconditional model
        guided[f"classifier s={s:g}"] = sample(uncond, classifier_cond_fn(classifier, s))
    check_finite(guided, "--cfg-scales / --classifier-scales: a guidance scale too large for these models, or --lr "
                         "(the training diverged); try smaller values")
    print(f"guided towards class {yc} (DDIM 50, quad spacing), against class-{yc} data:")
    for name, x in guided.items():
        print(fmt_stats(name, x, ref) + f"   in class {yc}: {class_fraction(args.data, x, yc):.3f}")
    panels = [panel(ref, f"data, class {yc}", color=(0.0, 0.0, 0.0))]
    panels += [panel(x, name, color=(0.1, 0.45, 0.15)) for name, x in guided.items()]
    return panels[:nrow] + [torch.ones_like(panels[0])] * max(0, nrow - len(panels))


def class_fraction(data, x, y):
    """Fraction of x whose nearest labelled data point (of a large reference draw) has class y."""
    ref, labels = make_data(data, 20000, torch.Generator().manual_seed(12345), with_labels=True)
    nearest = torch.cdist(x.double(), ref.double()).argmin(dim=1)
    return (labels[nearest] == y).double().mean().item()


if __name__ == "__main__":
    main_guard(main)
