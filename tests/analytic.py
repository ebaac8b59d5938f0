"""
Exact optimal eps-predictors for data whose diffused marginals are known in closed form.

If x_0 ~ N(mu, s^2 I), then x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps is Gaussian, and the minimiser of the
DDPM loss (DDPM eq. 14) is the posterior mean of the noise:

    eps*(x_t, t) = E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)

For a mixture sum_k w_k N(mu_k, s_k^2 I), x_t is a mixture of N(sqrt(abar_t) mu_k, (abar_t s_k^2 + 1 - abar_t) I)
and eps* is the responsibility-weighted sum of the per-component eps*. With these "models" every sampler, the bound
and guidance can be checked against exact numbers instead of "it runs".

`t` is the ORIGINAL timestep index, so pass the alphas_cumprod of the full (unrespaced) diffusion.
"""

import math

import torch


class GaussianEps:
    """eps*(x_t, t) for x_0 ~ N(mu, s^2 I) (per coordinate: mu and s are scalars)."""

    def __init__(self, mu, s, alphas_cumprod):
        self.mu, self.s, self.abar = mu, s, alphas_cumprod

    def __call__(self, x, t, **kwargs):
        abar = self.abar.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - abar).sqrt() * (x - abar.sqrt() * self.mu) / (abar * self.s ** 2 + 1 - abar)


class MixtureEps:
    """eps*(x_t, t) for x_0 ~ sum_k w_k N(mu_k, s_k^2 I); mus [K, D], s [K], weights [K]."""

    def __init__(self, mus, s, weights, alphas_cumprod):
        self.mus = torch.as_tensor(mus, dtype=torch.float64)
        K = self.mus.shape[0]
        self.s = torch.as_tensor(s, dtype=torch.float64).expand(K)
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.abar = alphas_cumprod

    def log_joint(self, x, t):
        """[N, K]: log w_k + log N(x_t; sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I)."""
        abar = self.abar.to(x.device)[t].to(x.dtype)[:, None]                       # [N, 1]
        mus, s, w = self.mus.to(x), self.s.to(x), self.w.to(x)
        var = abar * s[None] ** 2 + 1 - abar                                         # [N, K]
        diff = x.flatten(1)[:, None, :] - abar.sqrt()[..., None] * mus[None]         # [N, K, D]
        D = diff.shape[-1]
        return w.log()[None] - 0.5 * (diff ** 2).sum(-1) / var - 0.5 * D * torch.log(2 * math.pi * var)

    def responsibilities(self, x, t):
        """p(k | x_t): the exact classifier of the components at noise level t."""
        return torch.softmax(self.log_joint(x, t), dim=1)

    def component_eps(self, x, t, k):
        """eps* of component k alone: the exact class-conditional optimum."""
        abar = self.abar.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        mu = self.mus.to(x)[k].reshape(-1, *x.shape[1:]) if torch.is_tensor(k) else self.mus.to(x)[k].reshape(1, *x.shape[1:])
        s = self.s.to(x)[k].reshape(-1, *([1] * (x.dim() - 1))) if torch.is_tensor(k) else self.s[k].item()
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s ** 2 + 1 - abar)

    def __call__(self, x, t, **kwargs):
        r = self.responsibilities(x, t)                                              # [N, K]
        K = r.shape[1]
        eps = torch.stack([self.component_eps(x, t, k) for k in range(K)], dim=1)    # [N, K, ...]
        return (r.reshape(*r.shape, *([1] * (x.dim() - 1))) * eps).sum(1)


def gaussian_moment_recursion(steps, m, v):
    """Push mean m and variance v through affine steps x' = A x + B + sigma z (all scalars)."""
    for A, B, sigma in steps:
        m, v = A * m + B, A * A * v + sigma * sigma
    return m, v


# With the exact eps of x_0 ~ N(mu, s^2) every reverse step is affine in x_t plus independent noise. The two functions
# below list those steps (A, B, sigma), from the last of the given steps (the noisiest) down to code index 0, for the
# steps of a diffusion with these abar and abar_prev (pass a prefix abar[:k] for a chain that starts at step k - 1,
# as SDEdit's does). gaussian_moment_recursion then gives the exact mean and variance of the samples.

def ddpm_steps(abar, abar_prev, var_type, mu, s):
    """Ancestral sampling (DDPM Algorithm 2), written from DDPM eq. 11 (not from the code's posterior form):
    mu_theta = (x - beta / sqrt(1 - abar) eps) / sqrt(alpha); variance beta ("fixed_large") or beta~; no noise at t = 0."""
    steps = []
    for i in range(len(abar) - 1, -1, -1):
        a, ap = abar[i], abar_prev[i]
        alpha, beta = a / ap, 1 - a / ap
        c = math.sqrt(1 - a) / (a * s * s + 1 - a)              # eps* = c x - c sqrt(abar) mu
        A = (1 - beta / math.sqrt(1 - a) * c) / math.sqrt(alpha)
        B = beta / math.sqrt(1 - a) * c * math.sqrt(a) * mu / math.sqrt(alpha)
        var = beta if var_type == "fixed_large" else (1 - ap) / (1 - a) * beta
        steps.append((A, B, math.sqrt(var) if i > 0 else 0.0))
    return steps


def ddim_steps(abar, abar_prev, eta, mu, s):
    """DDIM (eq. 12 with sigma_t(eta) of eq. 16)."""
    steps = []
    for i in range(len(abar) - 1, -1, -1):
        a, ap = abar[i], abar_prev[i]
        c = math.sqrt(1 - a) / (a * s * s + 1 - a)                   # eps* = c x - c sqrt(a) mu
        a0, b0 = (1 - math.sqrt(1 - a) * c) / math.sqrt(a), math.sqrt(1 - a) * c * mu  # x0_pred = a0 x + b0
        # DDIM eq. 16
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        k = math.sqrt(1 - ap - sigma ** 2)
        # DDIM eq. 12: x' = sqrt(ap) x0_pred + k eps* + sigma z
        steps.append((math.sqrt(ap) * a0 + k * c, math.sqrt(ap) * b0 - k * c * math.sqrt(a) * mu, sigma))
    return steps


def gaussian_x0_posterior(x_t, abar, mu, s):
    """Mean and variance of x_0 | x_t for x_0 ~ N(mu, s^2) and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (Bayes).

    The mean is the optimal denoiser D(x_t) = E[x_0 | x_t] (Tweedie); a sample of this distribution is what an ideal
    DDGAN generator returns.
    """
    var_t = abar * s * s + 1 - abar
    return mu + math.sqrt(abar) * s * s * (x_t - math.sqrt(abar) * mu) / var_t, s * s * (1 - abar) / var_t


def gaussian_flow(x, abar_from, abar_to, mu, s):
    """The exact probability-flow ODE map of Gaussian data from noise level abar_from to abar_to.

    x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar) at every level and the flow is affine, so it keeps the z-score:
        x_to = sqrt(abar_to) mu + sqrt(abar_to s^2 + 1 - abar_to) z,   z = (x - sqrt(abar_from) mu) / sqrt(abar_from s^2 + 1 - abar_from)
    """
    z = (x - math.sqrt(abar_from) * mu) / math.sqrt(abar_from * s * s + 1 - abar_from)
    return math.sqrt(abar_to) * mu + math.sqrt(abar_to * s * s + 1 - abar_to) * z
