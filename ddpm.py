"""
Denoising diffusion probabilistic models (DDPM, Ho et al. 2020), with the improvements of iDDPM
(Nichol & Dhariwal 2021): the forward process, its posterior, the reverse process, the losses,
Algorithms 1 and 2, and the variational bound in bits/dim.

INDEX CONVENTION. The paper counts t = 1..T; the code counts t = 0..T-1. Code index t is the paper's
t + 1, so `alphas_cumprod[t]` is the paper's abar_{t+1}, `alphas_cumprod_prev[t]` is abar_t (with the paper's
abar_0 = 1), and the last reverse step, code t = 0, is the paper's t = 1: it draws x_0 from p(x_0 | x_1) and adds
no noise (Algorithm 2). Comments below use the paper's symbols: read "t" as the step being computed.

THE STORY IN SIX LINES (paper equation numbers in brackets).
  forward, one step     q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)                        [DDPM 2]
  forward, any step     q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I)                          [DDPM 4]
  posterior             q(x_{t-1} | x_t, x_0) = N(mu~_t(x_t, x_0), beta~_t I)                         [DDPM 6-7]
  reverse               p(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)), p(x_T) = N(0, I)  [DDPM 1]
  bound                 -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0, each L a KL or a decoder NLL     [DDPM 3, 5]
  simple loss           || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2             [DDPM 14]
The network predicts the noise eps. Given eps, x_0 is predicted by inverting eq. 4, and the reverse mean is the
posterior mean at that x_0 (which is exactly DDPM eq. 11). The variance is fixed (beta_t or beta~_t, DDPM §3.2)
or learned as an interpolation between the two in log space (iDDPM eq. 15).

MODEL CONVENTION. `model(x_t, t, **model_kwargs)` returns eps (and, with var_type="learned_range", a second block
of channels with v). `t` is always the ORIGINAL index 0..T-1, also when this diffusion is a respaced one
(`respace`): a respaced diffusion keeps `timestep_map` and translates before it calls the model or cond_fn,
so ancestral sampling, DDIM, the bound and guidance run on skipped schedules with no extra code.

Everything here takes any eps-model: this file imports neither the U-Net nor a command line.
"""

import math

import torch
from tqdm.auto import tqdm

from schedules import betas_from_alphas_cumprod, space_timesteps

VAR_TYPES = ("fixed_large", "fixed_small", "learned_range")
LOSS_TYPES = ("mse", "hybrid", "kl")


# ----------------------------------------------------------------------------------------------------------------
# Small helpers: distributions that do not depend on the schedule
# ----------------------------------------------------------------------------------------------------------------

def mean_flat(x):
    """Mean over all but the batch dimension: per-example losses in "per dimension" units."""
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ), elementwise, in nats.

    KL = 1/2 ( log(s2/s1) + s1/s2 + (m1 - m2)^2 / s2 - 1 )  for variances s1, s2.
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of data on the 256-level grid {-1, -1 + 2/255, ..., 1} under N(mean, e^{2 log_scale}) (L3).

    DDPM eq. 13: p(x_0 | x_1) = prod_i integral over [delta_-(x_0^i), delta_+(x_0^i)] of N(x; mu^i, sigma_1^2) dx, with
      delta_+(x) = +inf if x = 1  else x + 1/255,
      delta_-(x) = -inf if x = -1 else x - 1/255,
    i.e. each pixel value owns a bin of width 2/255 and the two end bins are open-ended.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255)  # standardised delta_+(x)
    lower = inv_std * (x - mean - 1.0 / 255)  # standardised delta_-(x)
    # x = -1: log Phi(upper)             (bin (-inf, -1 + 1/255])
    log_cdf_upper = torch.special.log_ndtr(upper)
    # x = +1: log (1 - Phi(lower))       (bin [1 - 1/255, +inf))
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    # otherwise: log (Phi(upper) - Phi(lower)), floored so that an empty bin gives a large finite cost
    log_cdf_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_cdf_delta))


def randn(shape, generator=None, device="cpu", dtype=torch.float32):
    """Standard normal noise, drawn from `generator` (on the generator's device) when given, for reproducibility."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def randn_like(x, generator=None):
    return randn(x.shape, generator, x.device, x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# The diffusion
# ----------------------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """A Gaussian diffusion with the given betas: all of DDPM and iDDPM's closed forms for one schedule.

    betas:      float64 tensor [T] (schedules.get_named_beta_schedule).
    var_type:   "fixed_large" (sigma_t^2 = beta_t), "fixed_small" (sigma_t^2 = beta~_t)  (R3, DDPM §3.2), or
                "learned_range" (iDDPM eq. 15: the model's second block of channels interpolates the two).
    loss_type:  "mse" (L_simple, DDPM eq. 14), "hybrid" (L_simple + 0.001 L_vlb, iDDPM eq. 16), "kl" (the bound).
    timestep_map: for a respaced diffusion, the original index of each kept step (see `respace`).
    """

    def __init__(self, betas, var_type="fixed_large", loss_type="mse", timestep_map=None):
        if var_type not in VAR_TYPES:
            raise ValueError(f"var_type: unknown {var_type!r}; choose one of {', '.join(VAR_TYPES)}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: unknown {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if loss_type == "hybrid" and var_type != "learned_range":
            raise ValueError("loss_type: 'hybrid' trains a learned variance; use var_type='learned_range' with it")
        if loss_type == "mse" and var_type == "learned_range":
            raise ValueError("loss_type: 'mse' gives the learned variance no gradient; use 'hybrid' or 'kl'")
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas: must be a 1-D tensor with every beta_t in (0, 1]")
        self.var_type, self.loss_type = var_type, loss_type
        self.num_timesteps = T = betas.shape[0]
        self.timestep_map = torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long)
        self._device_cache = {}

        self.betas = betas
        # alpha_t = 1 - beta_t
        self.alphas = 1.0 - betas
        # abar_t = prod_{s<=t} alpha_s
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # abar_{t-1}, with the paper's abar_0 = 1 in front
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas, self.sqrt_betas, self.log_betas = self.alphas.sqrt(), betas.sqrt(), betas.log()
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.log_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.log()
        # 1/sqrt(abar_t) and sqrt(1/abar_t - 1): the coefficients that turn (x_t, eps) into x_0 (see predict_x0_from_eps)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # DDPM eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~ is 0 at the first step (abar_0 = 1), so its log is clipped to the next value, as the DDPM code does
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if T > 1 else self.betas)
        # DDPM eq. 7: mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # R3 (DDPM §3.2) "large" variance sigma_t^2 = beta_t. At the first step DDPM's code uses beta~_2 instead,
        # for a better decoder likelihood L_0; sampling is unaffected (no noise is added there).
        self.large_variance = torch.cat([self.posterior_variance[1:2], betas[1:]]) if T > 1 else betas
        self.large_log_variance = self.large_variance.log()

    # -- gathering schedule values ---------------------------------------------------------------------------------

    def _on(self, arr, device):
        """arr (one of this object's float64 schedules) on `device`, cached so the hot loop never copies it again.

        Only attributes of this object may be passed (the cache is keyed by identity, and they live as long as it).
        """
        if device.type == "cpu":
            return arr
        key = (id(arr), str(device))
        if key not in self._device_cache:
            self._device_cache[key] = arr.to(device)
        return self._device_cache[key]

    def extract(self, arr, t, x):
        """arr[t] for a batch of code indices t, cast to x's dtype and shaped to broadcast against x."""
        out = self._on(arr, t.device)[t].to(x.dtype)
        return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))

    def original_t(self, t):
        """The original timestep index of code index t: what the model and cond_fn are given."""
        return self._on(self.timestep_map, t.device)[t]

    # -- forward process (F1, F2) ----------------------------------------------------------------------------------

    def q_step_sample(self, x_prev, t, noise=None):
        """One forward step, x_t ~ q(x_t | x_{t-1}) (F1)."""
        noise = torch.randn_like(x_prev) if noise is None else noise
        # DDPM eq. 2: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
        return self.extract(self.sqrt_alphas, t, x_prev) * x_prev + self.extract(self.sqrt_betas, t, x_prev) * noise

    def q_mean_variance(self, x0, t):
        """Mean, variance and log-variance of q(x_t | x_0) (F2)."""
        # DDPM eq. 4: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
        mean = self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self.extract(self.one_minus_alphas_cumprod, t, x0)
        log_variance = self.extract(self.log_one_minus_alphas_cumprod, t, x0)
        return mean, variance, log_variance

    def q_sample(self, x0, t, noise=None):
        """x_t ~ q(x_t | x_0) in one shot (F2)."""
        noise = torch.randn_like(x0) if noise is None else noise
        # DDPM eq. 4, reparameterised: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        return (self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and log-variance of the forward posterior q(x_{t-1} | x_t, x_0) (F3)."""
        # DDPM eq. 7: mu~_t(x_t, x_0) = coef1 x_0 + coef2 x_t
        mean = self.extract(self.posterior_mean_coef1, t, x_t) * x0 + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        # DDPM eq. 7: beta~_t
        variance = self.extract(self.posterior_variance, t, x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # -- eps <-> x_0 (inverting eq. 4) -----------------------------------------------------------------------------

    def predict_x0_from_eps(self, x_t, t, eps):
        # DDPM eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        return self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        # DDPM eq. 4 solved for eps: eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # -- reverse process (R1-R3, I1) -------------------------------------------------------------------------------

    def denoise(self, model, x_t, t, clip_denoised=True, model_kwargs=None):
        """What the network says at x_t: its eps, the x_0 that eps implies, and its raw output (R2).

        Returns a dict: eps, pred_x0 (clipped to [-1, 1] when clip_denoised), model_output. This is all that DDIM,
        the solvers, inversion and the score samplers use; p_mean_variance adds the variance and the posterior mean.
        The model is given the ORIGINAL timestep of code index t (the same t on a respaced diffusion, D4).
        """
        model_kwargs = model_kwargs or {}
        model_output = model(x_t, self.original_t(t), **model_kwargs).to(x_t.dtype)
        C = x_t.shape[1]
        if self.var_type == "learned_range" and model_output.shape[1] != 2 * C:
            raise ValueError(f"model: var_type 'learned_range' needs {2 * C} output channels (eps and v), "
                             f"got {model_output.shape[1]}")
        eps = model_output[:, :C]
        # DDPM eq. 4 solved for x_0: x0_pred = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            # R2: clipping the predicted x_0 to the data range [-1, 1] (an implementation choice of DDPM's code)
            pred_x0 = pred_x0.clamp(-1, 1)
        return {"eps": eps, "pred_x0": pred_x0, "model_output": model_output}

    def p_mean_variance(self, model, x_t, t, clip_denoised=True, model_kwargs=None):
        """The reverse step p(x_{t-1} | x_t) = N(mean, variance) (R1) the model defines at x_t.

        Returns a dict: mean, variance, log_variance, pred_x0, eps (the model's eps), and model_output (raw).
        """
        out = self.denoise(model, x_t, t, clip_denoised, model_kwargs)
        C = x_t.shape[1]
        if self.var_type == "learned_range":
            v = out["model_output"][:, C:]
            # the network's v in [-1, 1] is mapped to the interpolation weight in [0, 1]
            frac = (v + 1) / 2
            log_beta = self.extract(self.log_betas, t, x_t)
            log_beta_tilde = self.extract(self.posterior_log_variance_clipped, t, x_t)
            # iDDPM eq. 15: Sigma_theta = exp(v log beta_t + (1 - v) log beta~_t)
            log_variance = frac * log_beta + (1 - frac) * log_beta_tilde
            variance = torch.exp(log_variance)
        elif self.var_type == "fixed_large":
            # R3 (DDPM §3.2): sigma_t^2 = beta_t (with beta~_2 at the first step, see __init__)
            variance = self.extract(self.large_variance, t, x_t)
            log_variance = self.extract(self.large_log_variance, t, x_t)
        else:
            # R3 (DDPM §3.2): sigma_t^2 = beta~_t, the posterior variance
            variance = self.extract(self.posterior_variance, t, x_t)
            log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t)
        # R2: mu_theta = mu~_t(x_t, x0_pred); unclipped this is DDPM eq. 11:
        #     mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t))
        mean, _, _ = self.q_posterior_mean_variance(out["pred_x0"], x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, **out}

    def p_sample(self, model, x_t, t, clip_denoised=True, cond_fn=None, model_kwargs=None, generator=None):
        """One step of Algorithm 2 (A2): x_{t-1} ~ p(x_{t-1} | x_t), with classifier guidance when cond_fn is given."""
        model_kwargs = model_kwargs or {}
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs)
        mean = out["mean"]
        if cond_fn is not None:
            # G1 (ADM Algorithm 1): mu <- mu + s Sigma grad_{x_t} log p_phi(y | x_t); cond_fn returns s * grad
            mean = mean + out["variance"] * cond_fn(x_t, self.original_t(t), **model_kwargs).to(x_t.dtype)
        noise = randn_like(x_t, generator)
        # Algorithm 2: no noise at the last step (paper t = 1, code t = 0)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        # Algorithm 2, line 4: x_{t-1} = mu_theta + sigma_t z
        sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_x0": out["pred_x0"]}

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, cond_fn=None, model_kwargs=None,
                      generator=None, progress=False, device=None, dtype=torch.float32):
        """Algorithm 2 (A2): x_T ~ N(0, I), then x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1. Returns x_0.

        `noise`, when given, is the starting x_T.
        """
        x = noise if noise is not None else randn(shape, generator, device_of(model, device), dtype)
        steps = range(self.num_timesteps - 1, -1, -1)
        for i in tqdm(steps, desc="ddpm", disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(model, x, t, clip_denoised, cond_fn, model_kwargs, generator)["sample"]
        return x

    # -- losses (A1, L1-L4, I2) ------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model, x0, x_t, t, clip_denoised=False, model_kwargs=None):
        """One term of the bound in bits/dim: L_{t-1} for t > 1 (a KL), L_0 for t = 1 (the decoder NLL) (L1, L3)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs)
        # DDPM eq. 5 / L1: L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t) ), per dim, in bits
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        # DDPM eq. 13 / L3: L_0 = -log p_theta(x_0 | x_1), the discretised decoder, per dim, in bits
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_x0": out["pred_x0"], "eps": out["eps"]}

    def eps_loss_weight(self, t, x):
        """The weight of ||eps - eps_theta||^2 in L_{t-1} for a fixed variance sigma_t^2 (L2).

        Substituting DDPM eq. 11 and x_0(x_t, eps) into eq. 8 turns || mu~_t - mu_theta ||^2 / (2 sigma_t^2) into
        this weight times || eps - eps_theta ||^2. L_simple (eq. 14) drops it: that is the whole difference.
        """
        if self.var_type == "learned_range":
            raise ValueError("var_type: the eps weight of L_{t-1} needs a fixed variance")
        sigma2 = self.posterior_variance if self.var_type == "fixed_small" else self.betas
        # DDPM eq. 12: beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t))
        return self.extract(self.betas ** 2 / (2 * sigma2 * self.alphas * (1 - self.alphas_cumprod)), t, x)

    def training_losses(self, model, x0, t=None, noise=None, model_kwargs=None, generator=None):
        """Per-example training losses at x_t = q_sample(x0, t, noise) (Algorithm 1, A1).

        Returns a dict of [N] tensors: "loss" (what to minimise), plus "mse" and/or "vb" where they apply.
          mse:    L_simple (DDPM eq. 14)
          hybrid: L_simple + lambda L_vlb, lambda = 0.001, stop-gradient on the mean inside L_vlb (iDDPM eq. 16)
          kl:     the bound itself, T * L_t for the sampled t: an unbiased estimate of sum_t L_t (L1)
        """
        model_kwargs = model_kwargs or {}
        if t is None:
            # Algorithm 1, line 3: t ~ Uniform({1, ..., T})
            device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=device, generator=generator).to(x0.device)
        if noise is None:
            # Algorithm 1, line 4: eps ~ N(0, I)
            noise = randn_like(x0, generator)
        x_t = self.q_sample(x0, t, noise)
        terms = {}
        if self.loss_type == "kl":
            terms["vb"] = self._vb_terms_bpd(model, x0, x_t, t, False, model_kwargs)["output"]
            # L1: the bound is a sum over T terms; T * (one term at a uniform t) estimates it without bias
            terms["loss"] = terms["vb"] * self.num_timesteps
            return terms
        model_output = model(x_t, self.original_t(t), **model_kwargs).to(x0.dtype)  # (bf16 under autocast)
        C = x0.shape[1]
        eps = model_output[:, :C]
        # DDPM eq. 14 (L4), Algorithm 1, line 5: || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"]
        if self.loss_type == "hybrid":
            # iDDPM eq. 16: L_vlb with the mean frozen (stop-gradient on eps), so L_vlb trains only the variance
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            vb = self._vb_terms_bpd(lambda *args, **kwargs: frozen, x0, x_t, t, False)["output"]
            terms["vb"] = vb * self.num_timesteps  # the same unbiased estimate of the whole bound as for "kl"
            # iDDPM eq. 16: L_hybrid = L_simple + lambda L_vlb, lambda = 0.001
            terms["loss"] = terms["mse"] + 0.001 * terms["vb"]
        return terms

    # -- the bound in bits/dim (B1) --------------------------------------------------------------------------------

    def prior_bpd(self, x0):
        """L_T = KL( q(x_T | x_0) || N(0, I) ) in bits/dim: no parameters, near 0 for a good schedule (L1)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        # DDPM eq. 5: L_T = D_KL( q(x_T | x_0) || p(x_T) ), p(x_T) = N(0, I)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x0, clip_denoised=True, model_kwargs=None, generator=None, progress=False):
        """The negative log-likelihood bound of x0 in bits/dim, every term of it (B1, L1).

        Returns a dict of tensors: total_bpd [N], prior_bpd [N] (L_T), vb [N, T] (L_0, L_1, ..., L_{T-1} in code
        order), and the per-step mse of eps and of x_0 [N, T]. DDPM eq. 5 summed, divided by D ln 2 (B1).
        """
        vb, eps_mse, x0_mse = [], [], []
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc="bpd", disable=not progress, leave=False):
            t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
            noise = randn_like(x0, generator)
            x_t = self.q_sample(x0, t, noise)
            out = self._vb_terms_bpd(model, x0, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            eps_mse.append(mean_flat((out["eps"] - noise) ** 2))
            x0_mse.append(mean_flat((out["pred_x0"] - x0) ** 2))
        vb = torch.stack(vb[::-1], dim=1)
        prior = self.prior_bpd(x0)
        # B1 / DDPM eq. 5: L = L_T + sum_{t>1} L_{t-1} + L_0, already per dimension and in bits (÷ D ln 2)
        total = vb.sum(dim=1) + prior
        return {"total_bpd": total, "prior_bpd": prior, "vb": vb,
                "mse": torch.stack(eps_mse[::-1], dim=1), "xstart_mse": torch.stack(x0_mse[::-1], dim=1)}

    # -- respacing (D4) --------------------------------------------------------------------------------------------

    def respace(self, steps, kind="uniform"):
        """A GaussianDiffusion over a kept subset of this one's steps (D4; guided-diffusion's SpacedDiffusion).

        `steps` is a number of steps (spaced by `kind`, see schedules.space_timesteps) or a list of kept indices.
        The kept steps keep their abar exactly; each new beta is re-derived from consecutive kept abar:
            beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}},  abar_{tau_0 - 1} = 1,
        which is the only Markov chain with those marginals. The model still receives the ORIGINAL index.
        """
        kept = space_timesteps(self.num_timesteps, steps, kind) if isinstance(steps, int) else sorted(set(steps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"steps: kept indices must lie in 0..{self.num_timesteps - 1}")
        kept_t = torch.tensor(kept, dtype=torch.long)
        betas = betas_from_alphas_cumprod(self.alphas_cumprod[kept_t])
        return GaussianDiffusion(betas, self.var_type, self.loss_type, timestep_map=self.timestep_map[kept_t])


def device_of(model, device=None):
    """The device to sample on: `device` if given, else the model's (when it has parameters), else the CPU."""
    if device is not None:
        return torch.device(device)
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Importance sampling of t (I3)
# ----------------------------------------------------------------------------------------------------------------

class ImportanceSampler:
    """Draw t with p_t proportional to sqrt(E[L_t^2]) from the last `history` losses at each t (I3, iDDPM §3.3).

    Until every t has `history` values, t is uniform. A small uniform mixture (`uniform_prob`) keeps every t
    reachable. The returned weights 1 / (T p_t) make the weighted loss an unbiased estimate of the uniform one.
    All state lives on one device and nothing here synchronises with the host, so it can run every step.
    """

    def __init__(self, num_timesteps, history=10, uniform_prob=0.001, device="cpu"):
        self.T, self.K, self.uniform_prob = num_timesteps, history, uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long, device=device)

    def probs(self):
        # iDDPM §3.3: p_t ∝ sqrt(E[L_t^2]), sum p_t = 1 (once every t has a full history; uniform before)
        w = (self.losses ** 2).mean(dim=1).sqrt()
        w = torch.where((self.counts >= self.K).all(), w / w.sum(), torch.full_like(w, 1.0 / self.T))
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch_size, generator=None):
        p = self.probs()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        # importance weight 1 / (T p_t): E_{t ~ p}[ L_t / (T p_t) ] = (1/T) sum_t L_t
        weights = 1.0 / (self.T * p[t])
        return t, weights.float()

    def update(self, t, losses):
        """Append each example's loss to the history of its t (a ring buffer of the last K values)."""
        t, losses = t.to(self.losses.device), losses.detach().to(self.losses.device, torch.float64)
        order = torch.argsort(t, stable=True)
        t_sorted = t[order]
        # position of each example among those with the same t in this batch (0, 1, ...)
        first = torch.searchsorted(t_sorted, t_sorted)
        rank = torch.arange(len(t), device=t.device) - first
        slot = (self.counts[t_sorted] + rank) % self.K
        self.losses[t_sorted, slot] = losses[order]
        self.counts.index_add_(0, t, torch.ones_like(t))  # (not bincount: on CUDA it reads the max back to the host)

    def state_dict(self):
        return {"losses": self.losses.cpu(), "counts": self.counts.cpu()}

    def load_state_dict(self, state):
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])
