"""
Beta schedules (S1-S5) and the sub-sequences of timesteps that fast samplers visit (D4; P3 for the ODE solvers).

A diffusion is fixed by its variances beta_1..beta_T. Everything else follows:

    alpha_t     = 1 - beta_t
    abar_t      = prod_{s <= t} alpha_s          (DDPM's alpha-bar; DDIM calls this alpha_t)

and x_t ~ N(sqrt(abar_t) x_0, (1 - abar_t) I). A schedule is good when abar_t falls from ~1 to ~0
without wasting steps at either end: the linear schedule of DDPM destroys a 32x32 image well before
t = T, which is why iDDPM proposed the cosine schedule, defined through abar_t directly.

Every schedule is returned as a float64 tensor of length T: products of 1000 numbers near 1 lose
digits in float32, and the samplers cast to the data's dtype only when they gather a value.

Code index t = 0..T-1 stands for the paper's t = 1..T (see ddpm.py).
"""

import math

import torch

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid", "vp")
SPACINGS = ("uniform", "quad")


def betas_from_alphas_cumprod(alphas_cumprod, max_beta=1.0):
    """beta_t = 1 - abar_t / abar_{t-1} with abar_0 = 1 (paper index), optionally clipped at max_beta.

    This is how a schedule given through abar (cosine) and a respaced schedule (ddpm.py, D4) get their betas.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    # alpha_t = abar_t / abar_{t-1}, beta_t = 1 - alpha_t
    betas = 1.0 - alphas_cumprod / prev
    return betas.clamp(max=max_beta)


def get_named_beta_schedule(name, num_timesteps):
    """The betas of a named schedule as a float64 tensor of shape [num_timesteps].

    The linear, quadratic and sigmoid schedules use DDPM's end points 1e-4 and 0.02, which were chosen for
    T = 1000; like guided-diffusion we scale them by 1000 / T so that other T give the same abar curve.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule: unknown name {name!r}; choose one of {', '.join(SCHEDULES)}")
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps: must be >= 1, got {num_timesteps}")
    scale = 1000.0 / T
    # (for T <= 20 the scaled beta_T would reach 1: those tiny test schedules are clipped at 0.999)
    beta_1, beta_T = scale * 1e-4, min(scale * 0.02, 0.999)
    if name == "linear":
        # S1 (DDPM §4): beta_t linear from 1e-4 to 0.02 over T = 1000 steps
        return torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    if name == "quadratic":
        # S3: beta = linspace(sqrt(1e-4), sqrt(0.02), T)^2  (DDPM's official code, "quad")
        return torch.linspace(math.sqrt(beta_1), math.sqrt(beta_T), T, dtype=torch.float64) ** 2
    if name == "sigmoid":
        # S4: beta = sigmoid(linspace(-6, 6, T)) * (0.02 - 1e-4) + 1e-4  (DDPM's official code)
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_T - beta_1) + beta_1
    if name == "vp":
        return vp_betas(T)
    # name == "cosine"
    # S2 (iDDPM eq. 17): abar_t = f(t) / f(0),  f(t) = cos^2( (t/T + s) / (1 + s) * pi/2 ),  s = 0.008
    s = 0.008
    steps = torch.arange(T + 1, dtype=torch.float64) / T  # t/T for paper t = 0..T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f[1:] / f[0]
    # iDDPM §3.2: beta_t = min(1 - abar_t / abar_{t-1}, 0.999), clipped to avoid a singularity at t = T
    return betas_from_alphas_cumprod(alphas_cumprod, max_beta=0.999)


def vp_betas(num_timesteps, beta_min=0.1, beta_max=20.0):
    """S5: the variance-preserving SDE (Song et al. 2021) sampled at t/T, the schedule of Denoising Diffusion GANs.

    The VP SDE dx = -1/2 beta(s) x ds + sqrt(beta(s)) dw with beta(s) = beta_min + s (beta_max - beta_min), s in [0, 1],
    has abar(s) = exp(-beta_min s - (beta_max - beta_min) s^2 / 2). Taking abar_t = abar(t/T) for t = 1..T gives

        beta_t = 1 - abar_t / abar_{t-1} = 1 - exp(-beta_min / T - (beta_max - beta_min) (2t - 1) / (2 T^2))

    (DDGAN, Xiao, Kreis & Vahdat 2022, experimental details in the appendix: beta_min = 0.1, beta_max = 20; their
    code also starts the grid at s = 1e-3 instead of 0, a detail left out here). Unlike S1-S4 it stays meaningful for
    tiny T: for DDGAN's T = 4 the betas are 0.48, 0.85, 0.96, 0.99 and abar_T = 4e-5, while the linear schedule scaled
    to T = 4 would need betas above 1. For T = 1000 it is the linear schedule S1 in the limit
    (beta_t ~ (beta_min + t/T (beta_max - beta_min)) / T; abar within 8e-4 of S1's).
    """
    T = int(num_timesteps)
    if T < 1:
        raise ValueError(f"num_timesteps: must be >= 1, got {num_timesteps}")
    t = torch.arange(1, T + 1, dtype=torch.float64)
    # DDGAN (appendix): beta_t = 1 - exp(-beta_min / T - 0.5 (beta_max - beta_min) (2t - 1) / T^2)
    return 1.0 - torch.exp(-beta_min / T - 0.5 * (beta_max - beta_min) * (2 * t - 1) / T ** 2)


def space_timesteps(num_timesteps, steps, kind="uniform"):
    """The sorted original indices (0..T-1) a sampler with `steps` steps visits (D4, DDIM §4.2 and App. D).

    uniform: every T/S-th index, tau_i = floor(i T / S): 0, 20, ..., 980 for S = 50 of T = 1000
             (the DDIM authors' `range(0, T, T // S)` when S divides T).
    quad:    tau_i = floor( (i * sqrt(0.8 T) / (S - 1))^2 ), the DDIM authors' quadratic spacing, which
             spends more steps at low noise. For S above about sqrt(0.8 T) the first values collide
             (0, 0, 1, 3, ...); we then push each index to at least one past its predecessor, so exactly
             S distinct steps are kept and the shape stays quadratic.
    """
    T = int(num_timesteps)
    if kind not in SPACINGS:
        raise ValueError(f"skip: unknown spacing {kind!r}; choose one of {', '.join(SPACINGS)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps: must be an integer in 1..{T} (the number of diffusion steps), got {steps!r}")
    if kind == "uniform":
        # D4: tau_i = floor(i * T / S), i = 0..S-1  (integer arithmetic: exact)
        return [(i * T) // steps for i in range(steps)]
    if steps == 1:
        return [0]
    # D4 quadratic: tau_i = floor( linspace(0, sqrt(0.8 T), S)_i ^ 2 )
    top = math.sqrt(0.8 * T)
    seq = [int((i * top / (steps - 1)) ** 2) for i in range(steps)]
    for i in range(1, steps):  # make strictly increasing (see docstring)
        seq[i] = max(seq[i], seq[i - 1] + 1)
    if seq[-1] > T - 1:
        raise ValueError(f"steps: {steps} is too many for quad spacing of {T} steps; use fewer or skip='uniform'")
    return seq


def _check_steps(steps, T):
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps: must be an integer in 1..{T} (the number of diffusion steps), got {steps!r}")


def _nearest(values, targets):
    """For each target, the index of the nearest entry of `values` (a 1-D float64 tensor); sorted and de-duplicated."""
    return sorted(set((values[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()))


def logsnr_timesteps(alphas_cumprod, steps):
    """P3: kept indices (0..T-1) uniform in lambda = log(alpha / sigma), the DPM-Solver step schedule.

    lambda_t = log( sqrt(abar_t) / sqrt(1 - abar_t) ) is half the log signal-to-noise ratio, the variable in which
    DPM-Solver (Lu et al. 2022, arXiv 2206.00927) and DPM-Solver++ (arXiv 2211.01095) integrate the ODE; their step
    rule "logSNR" spaces lambda uniformly between the noisiest and the cleanest step, and the authors recommend it for
    low-resolution images such as CIFAR-10 ("time_uniform", our space_timesteps(T, S, "uniform"), for high
    resolution). Their code evaluates a discrete-time model at fractional t; ours only knows its T levels, so each
    target lambda goes to the step with the nearest lambda, and collisions (near t = 0, where lambda changes by
    ~0.4 per step on the linear schedule) are merged: the list can be shorter than `steps`.

    NFE: dpmpp2m_sample_loop(diffusion.respace(this list), ...) calls the model once per kept step, N = len(list).
    """
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    _check_steps(steps, abar.shape[0])
    # lambda_t = log(alpha_t / sigma_t) = 1/2 log(abar_t / (1 - abar_t))
    lam = 0.5 * (abar.log() - (1 - abar).log())
    # DPM-Solver "logSNR" steps: lambda_i uniform from lambda_T (noisiest) to lambda_1 (cleanest)
    targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
    return _nearest(lam, targets)


def karras_timesteps(alphas_cumprod, steps, rho=7.0):
    """P3: kept indices (0..T-1) at EDM's noise levels (Karras et al. 2022, arXiv 2206.00364, eq. 5), rho = 7.

    In EDM's coordinates the VP model's noise level is sigma_t = sqrt((1 - abar_t) / abar_t). EDM eq. 5 places
        sigma_i = ( sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)) )^rho,   i = 0..N-1,
    dense at low noise for rho = 7, with sigma_max, sigma_min those of the noisiest and cleanest step. A
    discrete-time model only knows its T levels: as EDM does for the ADM/iDDPM models (appendix C), each sigma_i is
    rounded to the nearest sigma_t, and collisions at the low-noise end are merged: the list can be shorter than
    `steps` (79 distinct of 80 requested on the linear T = 1000 schedule; 76 of 80 for logsnr_timesteps).

    NFE: heun_sample_loop(diffusion.respace(this list), ...) with N kept steps takes N steps (the last one to
    sigma = 0) and 2N - 1 model calls: Heun's correction costs one extra call on every step but the last (EDM's
    CIFAR-10 setting N = 18 is 35 NFE).
    """
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    _check_steps(steps, abar.shape[0])
    if not rho > 0:
        raise ValueError(f"rho: must be > 0 (EDM uses 7), got {rho!r}")
    # EDM's VP-as-VE noise level: sigma_t = sqrt((1 - abar_t) / abar_t)
    sigma = ((1 - abar) / abar).sqrt()
    if steps == 1:
        return [abar.shape[0] - 1]
    i = torch.arange(steps, dtype=torch.float64)
    s_max, s_min = sigma[-1].item() ** (1 / rho), sigma[0].item() ** (1 / rho)
    # EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    targets = (s_max + i / (steps - 1) * (s_min - s_max)) ** rho
    return _nearest(sigma, targets)
