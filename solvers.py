"""
Second-order solvers for the probability-flow ODE of a trained eps-model: DPM-Solver++(2M) (Lu et al. 2022,
arXiv 2211.01095, Algorithm 2) and Heun's method as EDM uses it (Karras et al. 2022, arXiv 2206.00364, Algorithm 1).

ONE ODE, THREE COORDINATES. Write alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), so x_t = alpha_t x_0 + sigma_t eps
(DDPM eq. 4), and let D(x_t, t) = x0_pred = (x_t - sigma_t eps_theta(x_t, t)) / alpha_t be the model's denoised guess.
DDIM with eta = 0 follows the probability-flow ODE (DDIM §4.3), which in any of these variables reads:

    EDM (VE form)      x~ = x / alpha,  s = sigma / alpha:         dx~/ds = (x~ - D) / s = eps                  [EDM eq. 4]
    DPM-Solver++       lambda = log(alpha / sigma) = -log s:       d(x / sigma) / d e^lambda = D
    DDIM               the same as EDM's, with DDIM's sigma-bar = s                                              [DDIM eq. 14]

(the first says the noise in x~ = x_0 + s eps is spent at rate eps; the second is the first multiplied by
alpha / sigma = e^lambda). The solvers below differ only in how they integrate it between the kept steps of a
(respaced) diffusion. In all three the last step goes to s = 0, lambda = +inf, abar = 1, and lands exactly on D at
the cleanest kept step: the same end as DDIM's last step.

DPM-SOLVER++ (data prediction). Variation of constants on the second form gives the exact step from level s to t
    x_t = sigma_t / sigma_s x_s + sigma_t  integral_{lambda_s}^{lambda_t} e^lambda D(x_lambda) d lambda     [DPM-Solver++ eq. 8]
Freezing D at its value at s, with h = lambda_t - lambda_s, the integral is e^{lambda_t} (1 - e^{-h}) D, and since
sigma_t e^{lambda_t} = alpha_t:
    x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) D(x_s)                                  DPM-Solver-1 = DDIM, eta = 0
(expand D = (x_s - sigma_s eps) / alpha_s and it is DDIM eq. 12: x_t = alpha_t D + sigma_t eps). The multistep
second-order method (2M) keeps the previous step's D and replaces D by a linear extrapolation in lambda,
    D_i = (1 + 1 / (2 r_i)) D(x_{i-1}) - 1 / (2 r_i) D(x_{i-2}),    r_i = h_{i-1} / h_i          [DPM-Solver++ Alg. 2]
one model call per step, like DDIM, but a local error O(h^3) instead of O(h^2). The first step has no previous D and
is first order; so is the last one, into sigma = 0, where h = +inf and r_i = 0 (DPM-Solver's "lower_order_final",
here forced by the end point). Global error: O(h^2) for 2M, O(h) for DDIM (tests/test_solvers.py measures both).

HEUN (EDM). In the first form, Euler from s_i to s_{i+1} is x~' = x~ + (s_{i+1} - s_i) d_i with d_i = (x~ - D) / s_i
(that is DDIM again, EDM §3); Heun averages d_i with the slope at the Euler point, a second-order method that costs a
second model call per step. The last step, to s = 0, where the slope at the end is 0/0, stays Euler. A
discrete-time model only knows the levels of its T steps, so the solver visits exactly the kept steps of the
diffusion it is given (EDM rounds its noise levels to the model's, appendix C; schedules.karras_timesteps makes that
list) plus s = 0: N kept steps cost 2N - 1 model calls.

Step schedules (which steps to keep) live in schedules.py: logsnr_timesteps for DPM-Solver, karras_timesteps (rho = 7)
for Heun. Like every sampling loop here, these run on ALL the steps of the diffusion they are given:
    dpmpp2m_sample_loop(diffusion.respace(logsnr_timesteps(diffusion.alphas_cumprod, 20)), model, shape)
`clip_denoised` clips D to [-1, 1] before it is used (DPM-Solver++ §5's thresholding in its simplest, static form).
"""

import torch
from tqdm.auto import tqdm

from ddpm import device_of, randn

ORDERS = (1, 2)


def denoise(diffusion, model, x_t, t, clip_denoised=True, model_kwargs=None):
    """D(x_t, t) = x0_pred = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t), the data prediction (DDPM eq. 4).

    Through GaussianDiffusion.denoise, so the model gets the ORIGINAL t of a respaced diffusion (and a learned-variance
    model its eps channels only); clipped to [-1, 1] when clip_denoised.
    """
    return diffusion.denoise(model, x_t, t, clip_denoised, model_kwargs)["pred_x0"]


def dpmpp_step(diffusion, x_s, t, d_now, d_before=None, t_before=None):
    """One DPM-Solver++ step from kept step t to the previous kept step (abar = 1 after step 0).

    d_now = D(x_s, t). With d_before = D at the step before (t_before = t + 1), it is the 2M step; without, the
    first-order step (= DDIM, eta = 0).
    """
    abar_s = diffusion.extract(diffusion.alphas_cumprod, t, x_s)
    abar_t = diffusion.extract(diffusion.alphas_cumprod_prev, t, x_s)
    # alpha = sqrt(abar), sigma = sqrt(1 - abar) at the level we are at (s) and the level we go to (t)
    alpha_s, sigma_s = abar_s.sqrt(), (1 - abar_s).sqrt()
    alpha_t, sigma_t = abar_t.sqrt(), (1 - abar_t).sqrt()
    # e^{-h} = e^{lambda_s - lambda_t} = (alpha_s / sigma_s) (sigma_t / alpha_t): exactly 0 when the step ends at sigma = 0
    exp_neg_h = alpha_s * sigma_t / (sigma_s * alpha_t)
    d = d_now
    if d_before is not None:
        # lambda = log(alpha / sigma) = 1/2 log(abar / (1 - abar)) at t + 1, t, t - 1
        abar_u = diffusion.extract(diffusion.alphas_cumprod, t_before, x_s)
        lam_u, lam_s = 0.5 * torch.log(abar_u / (1 - abar_u)), 0.5 * torch.log(abar_s / (1 - abar_s))
        h, h_before = -torch.log(exp_neg_h), lam_s - lam_u
        # DPM-Solver++ Alg. 2: r_i = h_{i-1} / h_i
        r = h_before / h
        # DPM-Solver++ Alg. 2: D_i = (1 + 1/(2 r_i)) x_theta(x_{i-1}) - 1/(2 r_i) x_theta(x_{i-2})
        d = (1 + 1 / (2 * r)) * d_now - 1 / (2 * r) * d_before
    # DPM-Solver++ Alg. 2: x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) D
    return sigma_t / sigma_s * x_s - alpha_t * (exp_neg_h - 1) * d


@torch.no_grad()
def dpmpp2m_sample_loop(diffusion, model, shape, noise=None, model_kwargs=None, clip_denoised=True, generator=None,
                        progress=False, device=None, dtype=torch.float32, order=2):
    """DPM-Solver++(2M) on every step of `diffusion` (P1): x_T -> x_0 in diffusion.num_timesteps model calls.

    `noise` is x_T at the noisiest kept step. order=1 is DPM-Solver-1, which is DDIM with eta = 0 (P2).
    """
    if order not in ORDERS:
        raise ValueError(f"order: must be 1 (DPM-Solver-1 = DDIM) or 2 (DPM-Solver++(2M)), got {order!r}")
    x = noise if noise is not None else randn(shape, generator, device_of(model, device), dtype)
    d_before = None
    for i in tqdm(range(diffusion.num_timesteps - 1, -1, -1), desc="dpm-solver++", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        d_now = denoise(diffusion, model, x, t, clip_denoised, model_kwargs)
        # first step: no previous D yet; last step (into sigma = 0, h = inf): first order ("lower_order_final")
        second_order = order == 2 and d_before is not None and i > 0
        x = dpmpp_step(diffusion, x, t, d_now, d_before if second_order else None, t + 1)
        d_before = d_now
    return x


def heun_step(diffusion, model, x, t, clip_denoised=True, model_kwargs=None, second_order=True):
    """One step of EDM Algorithm 1 in VE coordinates x~ = x / sqrt(abar): kept step t to the previous one (s = 0 last).

    second_order=False is the Euler step alone (EDM takes it on the last step, into s = 0).
    x here is x~ at s_t = sqrt((1 - abar_t) / abar_t). The model is called on x = sqrt(abar_t) x~, the point of the
    VP diffusion at the same level, so D(x~; s_t) = x0_pred there (EDM's VP model seen as a VE one).
    """
    abar = diffusion.extract(diffusion.alphas_cumprod, t, x)
    abar_next = diffusion.extract(diffusion.alphas_cumprod_prev, t, x)
    # s = sqrt((1 - abar) / abar) = sigma / alpha: 0 after the last step, where abar_{t-1} = 1
    s, s_next = ((1 - abar) / abar).sqrt(), ((1 - abar_next) / abar_next).sqrt()
    # EDM Alg. 1 line 4: d_i = (x_i - D(x_i; t_i)) / t_i
    d = (x - denoise(diffusion, model, abar.sqrt() * x, t, clip_denoised, model_kwargs)) / s
    # EDM Alg. 1 line 5: x_{i+1} = x_i + (t_{i+1} - t_i) d_i   (Euler; DDIM, eta = 0)
    x_next = x + (s_next - s) * d
    if second_order:
        # EDM Alg. 1 lines 6-8: if t_{i+1} != 0, d'_i = (x_{i+1} - D(x_{i+1}; t_{i+1})) / t_{i+1}, and
        #   x_{i+1} = x_i + (t_{i+1} - t_i) (d_i / 2 + d'_i / 2)
        d_next = (x_next - denoise(diffusion, model, abar_next.sqrt() * x_next, t - 1, clip_denoised, model_kwargs)) / s_next
        x_next = x + (s_next - s) * (d + d_next) / 2
    return x_next


@torch.no_grad()
def heun_sample_loop(diffusion, model, shape, noise=None, model_kwargs=None, clip_denoised=True, generator=None,
                     progress=False, device=None, dtype=torch.float32):
    """EDM's deterministic Heun sampler (Algorithm 1, S_churn = 0) on every step of `diffusion` (P1).

    `noise` is x_T (VP scaling, N(0, I)) at the noisiest kept step; N kept steps cost 2N - 1 model calls.
    """
    x = noise if noise is not None else randn(shape, generator, device_of(model, device), dtype)
    T = diffusion.num_timesteps
    t = torch.full((x.shape[0],), T - 1, device=x.device, dtype=torch.long)
    # EDM Alg. 1 line 2 (x_0 ~ N(0, t_0^2 I) for a VE model); here the VP prior in VE coordinates: x~ = x_T / sqrt(abar_T)
    x = x / diffusion.extract(diffusion.alphas_cumprod, t, x).sqrt()
    for i in tqdm(range(T - 1, -1, -1), desc="heun", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        # EDM Alg. 1 line 6: no correction on the last step, into s = 0
        x = heun_step(diffusion, model, x, t, clip_denoised, model_kwargs, second_order=i > 0)
    # at s = 0, x~ = x / sqrt(abar) with abar = 1: the sample itself
    return x
