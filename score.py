"""
The score view of a trained eps-model (SC1, SC2): annealed Langevin dynamics (NCSN) and predictor-corrector sampling
(Song et al. 2021) with the very same network that DDPM and DDIM sample from.

PAPERS. NCSN = Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution" (1907.05600).
SDE = Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations" (2011.13456). Index convention as in ddpm.py: code t = 0..T-1 is the paper's t = 1..T.

SC1, THE SCORE IS THE NOISE (up to a scale). The forward marginal q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
(DDPM eq. 4) has the conditional score
    grad_{x_t} log q(x_t | x_0) = -(x_t - sqrt(abar_t) x_0) / (1 - abar_t) = -eps / sqrt(1 - abar_t).
Denoising score matching (Vincent 2011; NCSN eq. 2) says the regression onto the conditional score has the marginal
score as its minimiser: E[grad log q(x_t | x_0) | x_t] = grad log q(x_t). The DDPM loss (eq. 14) makes
eps_theta(x_t, t) ~ E[eps | x_t], so
    score(x_t, t) = grad log q_t(x_t) ~ -eps_theta(x_t, t) / sqrt(1 - abar_t).                                 (SC1)
Guidance adds a likelihood: grad log q_t(x_t | y) = grad log q_t(x_t) + grad log p_t(y | x_t), and cond_fn returns
s * grad log p_t(y | x_t) (ADM's convention, G3), so the guided score is score + cond_fn.
Tweedie's formula turns the score into the posterior mean of the data (this is predict_x0_from_eps, DDPM eq. 4):
    E[x_0 | x_t] = (x_t + (1 - abar_t) score(x_t, t)) / sqrt(abar_t).

SC2, LANGEVIN DYNAMICS. For any density p with score s = grad log p, the chain
    x <- x + (delta/2) s(x) + sqrt(delta) z,    z ~ N(0, I)                                   (NCSN eq. 4, Alg. 1 line 6)
has p as its stationary law as delta -> 0 (and with many steps). At a finite delta it is biased: for a Gaussian target
N(m, v), x' - m = (1 - delta/(2v)) (x - m) + sqrt(delta) z, whose fixed point Var = (1 - delta/(2v))^2 Var + delta is
    Var_inf = v / (1 - delta / (4 v))      (an O(delta) inflation; the chain diverges once delta >= 4 v).
NCSN anneals: it runs Langevin on q_{sigma_1}, ..., q_{sigma_L} (data blurred by N(0, sigma_i^2), sigma_1 > ... > sigma_L),
each level started from the last sample of the previous one, with steps delta_i = delta sigma_i^2 / sigma_L^2 (Alg. 1 line 3).
Plain Langevin cannot get the weights of separated modes right in reasonable time (NCSN §3.2.2, Fig. 3); the noisy
levels, where the modes still overlap, can.

THE VP SCALING. NCSN's x lives at one scale for all levels, x = x_0 + sigma z (variance exploding, VE); ours is
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z (variance preserving, VP). Langevin at ONE level only needs the score of its
target, so running it on q_t in VP coordinates is fine. Between levels, the two are tied by the change of variables
    x~ = x_t / sqrt(abar_t) = x_0 + sigma~_t z,        sigma~_t^2 = (1 - abar_t) / abar_t,
which turns q_t into NCSN's q_{sigma~_t}, with score s~(x~) = sqrt(abar_t) score(x_t). Two consequences:
  * a VP Langevin step of size d is a VE step of size d / abar_t (substitute x = sqrt(abar) x~ into the update), so
    NCSN's rule d~_i = delta~ sigma~_i^2 / sigma~_L^2 becomes d_i = abar_i d~_i = delta (1 - abar_i) / (1 - abar_L)
    with delta = abar_L delta~: the same rule, delta_i = delta sigma_i^2 / sigma_L^2, with the VP noise variances
    sigma_i^2 = 1 - abar_i. delta is the step at the smallest noise level, in data units.
  * NCSN carries x~ unchanged from level i to level i-1; in VP coordinates that is
        x_{t-1} <- sqrt(abar_{t-1} / abar_t) x_t = x_t / sqrt(alpha_t),
    the same 1/sqrt(alpha_t) that leads DDPM's reverse mean (eq. 11). Without it the signal sqrt(abar_t) x_0 would enter
    level t-1 shrunk by sqrt(alpha_t), an error Langevin then has to undo (for Gaussian data it biases the mean, since
    Langevin with few steps does not forget its start). With it, this loop IS NCSN Algorithm 1 run on x~, step for
    step (tests/test_score.py checks the two agree to round-off), and the mean of Gaussian data is carried exactly.
The SDE paper's VP corrector-only sampler (its Algorithm 5) passes x on unscaled instead; both initialisations are
"correct" in that each level's Langevin targets q_t, they differ in how far from q_t each level starts. We follow NCSN,
whose levels share x's scale.

WHAT IT COSTS. Two biases, both measured on Gaussian data with the exact score in tests/test_score.py:
  * the O(delta) stationary bias above, at every level (at the noisiest levels, q_t ~ N(0, sigma_t^2 I) and
    delta_t / (4 sigma_t^2) = delta / (4 sigma_L^2), a 33% variance inflation at the default delta = sigma_L^2, undone
    by the later levels), which also pulls the weights of separated modes towards equal at the levels where they split;
  * the annealing lag: each level starts from the previous level's samples, and a few steps of size ~sigma_t^2 cannot
    move data much wider than sigma_t. At low noise the excess carried over from the noisier levels is then never
    removed. On N(0.3, 0.1^2) with the cosine schedule, 100 levels x 2 steps leave 1.5x the data's variance, 200 x 20
    steps 1.05x. Smaller delta: less of the first bias, more of the second.
A DDPM step, by contrast, moves exactly from q_t to q_{t-1}: that is the predictor of the PC sampler below, and why
the SDE paper's corrector-only sampler ("C2000") scored far worse FIDs than the P and PC samplers (its Tables 1
and 4: ~20 against ~3 on CIFAR-10).

DENOISING. Langevin's last samples carry noise of level sigma_L. As Jolicoeur-Martineau et al. 2020 (arXiv 2009.05475)
proposed, NCSNv2's code does (its `denoise` option) and the SDE paper does (App. G, "Denoising": "a single denoising
step at the end of sampling, using Tweedie's formula"), we output E[x_0 | x_L] by Tweedie's formula above.

PREDICTOR-CORRECTOR (SDE paper, App. G, Algorithm 1). A predictor moves x from level t to level t-1 and a corrector of
M Langevin steps then pulls x towards q_{t-1}. The paper's VP instance (its Algorithm 3) predicts with "reverse
diffusion"; its Table 1 also runs "ancestral sampling", which is DDPM's step, and that is our predictor (DDPM
Algorithm 2), or one DDIM step (DDIM eq. 12). The corrector is the SDE paper's Algorithm 5 (VP SDE): with z ~ N(0, I) and g = score,
    eps_i = 2 alpha_i (r ||z|| / ||g||)^2,        x <- x + eps_i g + sqrt(2 eps_i) z                          (Alg. 5)
r is the "signal-to-noise ratio" (0.16: the default of the authors' code; the paper tunes r per sampler, its
Table 5). This is Langevin with
delta = 2 eps_i; "when sampling a large batch ... we replace the norm with the average norm across the mini-batch"
(App. G), which also keeps eps_i finite when one sample sits at a mode where its own ||g|| is ~0. For a Gaussian level,
||g||^2 ~ D / v and ||z||^2 ~ D, so eps_i ~ 2 alpha_i r^2 v and the corrector's stationary bias is
1 / (1 - alpha_i r^2) <= 1 / (1 - r^2), 2.6% of the variance at r = 0.16.

Respacing: both samplers visit every level of the diffusion they are given; the caller respaces it (D4) once, so
"t - 1" is the previous kept level and the model and cond_fn receive ORIGINAL timesteps (GaussianDiffusion.denoise translates them).
This file imports only ddpm.py and ddim.py: no network, no guidance, no command line.
"""

import torch
from tqdm.auto import tqdm

import ddim
from ddpm import device_of, randn, randn_like

PREDICTORS = ("ddpm", "ddim")


# ----------------------------------------------------------------------------------------------------------------
# SC1: the score of q_t from the eps-model
# ----------------------------------------------------------------------------------------------------------------

def score_from_eps(diffusion, model, x_t, t, model_kwargs=None, cond_fn=None):
    """grad_{x_t} log q_t(x_t) (or log q_t(x_t | y) with cond_fn) from the model's eps (SC1).

    t is a batch of code indices of `diffusion` (which may be respaced: GaussianDiffusion.denoise hands the model the original t).
    """
    model_kwargs = model_kwargs or {}
    # the raw eps (no clipping): also the first block of a learned-sigma model's output (iDDPM)
    eps = diffusion.denoise(model, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["eps"]
    # SC1: score = grad log q_t(x_t) ~ -eps_theta(x_t, t) / sqrt(1 - abar_t)
    score = -eps / diffusion.extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t)
    if cond_fn is not None:
        # Bayes: grad log q_t(x | y) = grad log q_t(x) + grad log p_t(y | x); cond_fn gives s * grad log p_t(y | x) (G3)
        score = score + cond_fn(x_t, diffusion.original_t(t), **model_kwargs).to(x_t.dtype)
    return score


def tweedie_x0(diffusion, x_t, t, score):
    """E[x_0 | x_t] from the score: the denoising step that ends a score sampler."""
    # Tweedie: E[sqrt(abar_t) x_0 | x_t] = x_t + (1 - abar_t) grad log q_t(x_t); with SC1 this is DDPM eq. 4 solved for x_0
    return (x_t + diffusion.extract(diffusion.one_minus_alphas_cumprod, t, x_t) * score) \
        / diffusion.extract(diffusion.sqrt_alphas_cumprod, t, x_t)


# ----------------------------------------------------------------------------------------------------------------
# SC2: annealed Langevin dynamics (NCSN Algorithm 1, in VP coordinates)
# ----------------------------------------------------------------------------------------------------------------

def langevin_step(x, score, delta, generator=None):
    """One step of unadjusted Langevin dynamics with step size delta (a number or a tensor broadcasting against x)."""
    z = randn_like(x, generator)
    # NCSN Algorithm 1, line 6: x <- x + (delta/2) score(x) + sqrt(delta) z
    return x + 0.5 * delta * score + delta ** 0.5 * z


def to_next_level(spaced, x, t):
    """Carry x from level t to level t-1 at fixed x~ = x / sqrt(abar) (NCSN keeps x~; see "THE VP SCALING")."""
    # x~ = x_t / sqrt(abar_t) = x_{t-1} / sqrt(abar_{t-1})  =>  x_{t-1} = sqrt(abar_{t-1} / abar_t) x_t = x_t / sqrt(alpha_t)
    return x / spaced.extract(spaced.sqrt_alphas, t, x)


@torch.no_grad()
def langevin_sample_loop(diffusion, model, shape, langevin_steps=2, delta=None, noise=None, cond_fn=None,
                         model_kwargs=None, generator=None, progress=False, device=None,
                         dtype=torch.float32, clip_denoised=True):
    """Annealed Langevin dynamics over the noise levels of `diffusion` (SC2, NCSN Algorithm 1), then Tweedie.

    Levels: every step of `diffusion` (respace it first for fewer levels: diffusion.respace(100)), with
    noise variances sigma_i^2 = 1 - abar_i, visited from the noisiest down. At each level `langevin_steps` Langevin steps
    with delta_i = delta sigma_i^2 / sigma_L^2; then x is rescaled by sqrt(abar_{i-1} / abar_i) to the next level (the
    VP form of NCSN's annealing: see the module docstring). Finally x_0 = E[x_0 | x_L] by Tweedie's formula.
    delta: the step size at the smallest level sigma_L, in data units (NCSN's eps); default sigma_L^2, i.e.
           delta_i = sigma_i^2 at every level. Stability: q_t is never more curved than N(., sigma_t^2) (its
           -Hessian of log q_t is <= I / sigma_t^2), and Langevin on a Gaussian of variance v diverges for steps >= 4 v;
           so delta < 4 sigma_L^2 is always stable, and larger values diverge at the noisiest levels, where q_t is close
           to N(0, I). Smaller delta: less O(delta) bias per level, but slower mixing, so more annealing lag.
    noise: the starting x at the noisiest level (default N(0, I), which is q_T for a good schedule).
    cond_fn: s * grad log p(y | x_t) (G3), added to the score at every level and in the final denoising step.
    clip_denoised: clip the final E[x_0 | x_L] to [-1, 1] (R2).
    """
    if isinstance(langevin_steps, bool) or not isinstance(langevin_steps, int) or langevin_steps < 1:
        raise ValueError(f"langevin_steps: must be an integer >= 1 (Langevin steps per noise level), got {langevin_steps!r}")
    # the noise levels: the steps of the (respaced, D4) diffusion; its code index 0 is the smallest level sigma_L
    sigma2_L = diffusion.one_minus_alphas_cumprod[0].item()
    delta = sigma2_L if delta is None else delta
    if not delta > 0:
        raise ValueError(f"delta: the Langevin step size must be > 0, got {delta!r}")
    x = noise if noise is not None else randn(shape, generator, device_of(model, device), dtype)
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc="langevin", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        # NCSN Algorithm 1, line 3: alpha_i <- eps sigma_i^2 / sigma_L^2  (our delta is NCSN's eps; sigma_i^2 = 1 - abar_i)
        delta_i = delta / sigma2_L * diffusion.extract(diffusion.one_minus_alphas_cumprod, t, x)
        # NCSN Algorithm 1, lines 4-7: T (here langevin_steps) Langevin steps targeting q_{sigma_i} (here q_t)
        for _ in range(langevin_steps):
            x = langevin_step(x, score_from_eps(diffusion, model, x, t, model_kwargs, cond_fn), delta_i, generator)
        if i > 0:
            # NCSN Algorithm 1, line 8: x~_0 <- x~_T, the last sample starts the next level (at fixed x / sqrt(abar))
            x = to_next_level(diffusion, x, t)
    # the final denoising step (SDE App. G; NCSNv2's `denoise`): x_0 = E[x_0 | x_L] by Tweedie's formula
    t = torch.zeros((x.shape[0],), device=x.device, dtype=torch.long)
    x0 = tweedie_x0(diffusion, x, t, score_from_eps(diffusion, model, x, t, model_kwargs, cond_fn))
    # R2: optional clipping to the data range
    return x0.clamp(-1, 1) if clip_denoised else x0


# ----------------------------------------------------------------------------------------------------------------
# Predictor-corrector sampling (SDE paper, App. G, Algorithms 1, 3 and 5)
# ----------------------------------------------------------------------------------------------------------------

def snr_step_size(score, z, alpha, snr):
    """The corrector's step size eps_i = 2 alpha_i (r ||z|| / ||g||)^2, norms averaged over the batch (SDE App. G)."""
    # ||.||_2 per sample, then the batch mean: "we replace the norm with the average norm across the mini-batch"
    score_norm = score.flatten(1).norm(dim=1).mean()
    noise_norm = z.flatten(1).norm(dim=1).mean()
    # SDE Algorithm 5, line 5: eps <- 2 alpha_i (r ||z||_2 / ||g||_2)^2
    return 2 * alpha * (snr * noise_norm / score_norm) ** 2


def corrector_step(diffusion, model, x, t, snr, cond_fn=None, model_kwargs=None, generator=None):
    """One Langevin corrector step at level t with the signal-to-noise step size rule (SDE Algorithm 5)."""
    # SDE Algorithm 5, line 3: z ~ N(0, I)
    z = randn_like(x, generator)
    # SDE Algorithm 5, line 4: g <- s_theta(x, i)   (SC1)
    g = score_from_eps(diffusion, model, x, t, model_kwargs, cond_fn)
    # alpha_i = 1 - beta_i of the chain being sampled (for a respaced chain, abar_i / abar_{i-1} of the kept levels)
    alpha = diffusion.extract(diffusion.alphas, t, x)
    step = snr_step_size(g, z, alpha, snr)
    # SDE Algorithm 5, line 6: x <- x + eps g + sqrt(2 eps) z   (Langevin with delta = 2 eps)
    return x + step * g + (2 * step).sqrt() * z


def predictor_step(diffusion, model, x, t, predictor, eta, clip_denoised, cond_fn, model_kwargs, generator):
    """x at level t -> x at level t-1 by one DDPM ancestral step (DDPM Algorithm 2, G1) or one DDIM step (eq. 12, G2)."""
    if predictor == "ddpm":
        return diffusion.p_sample(model, x, t, clip_denoised, cond_fn, model_kwargs, generator)["sample"]
    return ddim.ddim_step(diffusion, model, x, t, eta, clip_denoised, cond_fn, model_kwargs, generator)["sample"]


@torch.no_grad()
def pc_sample_loop(diffusion, model, shape, corrector_steps=1, snr=0.16, predictor="ddpm", eta=0.0, noise=None,
                   cond_fn=None, model_kwargs=None, generator=None, progress=False,
                   device=None, dtype=torch.float32, clip_denoised=True):
    """Predictor-corrector sampling on every level of `diffusion` (SDE paper App. G, Algorithm 1; respace it first).

    x_T ~ N(0, I); then for each kept level from the noisiest down: a predictor step to the next level ("ddpm":
    ancestral, DDPM Algorithm 2; "ddim": DDIM eq. 12 with this eta), followed by `corrector_steps` Langevin corrector
    steps at the new level with the signal-to-noise step size (SDE Algorithm 5, snr = r). The last predictor step lands
    on x_0, which has no noise level and so no score: there is no corrector after it (the SDE paper stops its time grid
    at t = eps > 0 and adds a Tweedie denoising step instead; DDPM's last step, which adds no noise, plays that role).
    corrector_steps = 0 is the predictor alone (the paper's "P1000"): exactly ddpm.p_sample_loop / ddim.ddim_sample_loop.
    cond_fn guides both: the predictor as in G1 / G2, the corrector through the score of q_t(x | y).
    """
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps: must be an integer >= 0 (0 = predictor only), got {corrector_steps!r}")
    if not snr > 0:
        raise ValueError(f"snr: the corrector's signal-to-noise ratio r must be > 0, got {snr!r}")
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor: unknown {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    if predictor == "ddim":
        ddim.check_eta(diffusion, eta)
    # SDE Algorithm 1: initialize x_N ~ p_T = N(0, I)
    x = noise if noise is not None else randn(shape, generator, device_of(model, device), dtype)
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc=f"pc-{predictor}", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        # SDE Algorithm 1: x_i <- Predictor(x_{i+1})
        x = predictor_step(diffusion, model, x, t, predictor, eta, clip_denoised, cond_fn, model_kwargs, generator)
        if i > 0:
            t_new = t - 1
            # SDE Algorithm 1: for j = 1 to M: x_i <- Corrector(x_i), at the level the predictor just reached
            for _ in range(corrector_steps):
                x = corrector_step(diffusion, model, x, t_new, snr, cond_fn, model_kwargs, generator)
    return x
