"""
Guidance: steering a diffusion model towards a class y, with a noisy classifier (ADM, Dhariwal & Nichol 2021,
arXiv 2105.05233) or without one (classifier-free guidance, Ho & Salimans 2022, arXiv 2207.12598).

The samplers in ddpm.py and ddim.py already know where a guidance gradient goes (G1, G2); they take a `cond_fn`
and never import this file. This file builds the things they are given:
  classifier_cond_fn       cond_fn(x_t, t, y) = s grad_{x_t} log p_phi(y | x_t)               (G3)
  ClassifierFreeGuidance   a model wrapper returning (1 + w) eps(x_t, y) - w eps(x_t, null)    (G5)
  noisy_classifier_loss    the loss that trains p_phi(y | x_t) on noised images               (G4)
  classifier_accuracy_at   how well that classifier does at fixed noise levels

THE SHORT DERIVATION (code index t as in ddpm.py; abar_t is DDPM's alpha-bar).

1. Bayes for the noisy marginals: p(x_t | y) = p(x_t) p(y | x_t) / p(y), so the scores add,
       grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t).
2. The optimal eps-predictor is a scaled score (Tweedie's formula):
       eps*(x_t, t) = E[eps | x_t] = -sqrt(1 - abar_t) grad log p(x_t).
   Multiplying 1. by -sqrt(1 - abar_t):
       eps*(x_t, t | y) = eps*(x_t, t) - sqrt(1 - abar_t) grad log p(y | x_t).
   That is ADM Algorithm 2 (G2) with s = 1: an unconditional model plus the gradient of an exact noisy classifier
   IS the conditional model, and any eps-sampler (DDIM, ddim.py) then samples p(x_0 | y). A scale s > 1 uses the
   score of p(x_t) p(y | x_t)^s instead, a sharper distribution with more mass where the classifier is confident
   (approximately: these tilted marginals are not the marginals of one diffusion, so the samples are not exactly
   from p(x_0) p(y | x_0)^s).
3. Ancestral sampling (ADM §4.1, Algorithm 1, G1). p(x_{t-1} | x_t, y) ∝ p_theta(x_{t-1} | x_t) p_phi(y | x_{t-1}).
   The first factor is N(mu, Sigma). Expanding log p_phi(y | x_{t-1}) to first order around x_{t-1} = mu,
       log p_phi(y | x_{t-1}) ≈ const + (x_{t-1} - mu)^T g,    g = grad log p_phi(y | x)|_{x = mu},
   and a Gaussian times exp(linear) is the Gaussian N(mu + Sigma g, Sigma): the mean moves by Sigma g. This is an
   approximation (first order in the step; exact only as beta_t -> 0), and g is taken at x_t, not mu (see
   classifier_cond_fn for why that is the consistent choice); with the exact classifier of a Gaussian mixture
   tests/test_guidance.py measures how far G1 is from the exact conditional model.
4. Classifier-free guidance (Ho & Salimans §3.2). With the exact conditional and unconditional eps, 2. gives the
   "implicit classifier" gradient
       grad log p(y | x_t) = -(eps(x_t, y) - eps(x_t, null)) / sqrt(1 - abar_t).
   Using it in G2 with scale w on top of the CONDITIONAL model gives
       eps~ = eps(x_t, y) - w sqrt(1 - abar_t) grad log p(y | x_t) = (1 + w) eps(x_t, y) - w eps(x_t, null)      (G5)
   which, with exact models, is classifier guidance with scale s = 1 + w on the unconditional model: w = 0 is plain
   conditional sampling, w > 0 sharpens. One network plays both roles: it is trained with the label replaced by the
   null class some of the time (unet.UNet's extra embedding row; train.py), so no classifier is needed.
5. The classifier (ADM §4, G4) must judge NOISY images at every noise level the sampler visits, so it is trained
   with cross-entropy on x_t = q_sample(x_0, t), t uniform, and told t (unet.EncoderUNet).

The import tower is schedules <- ddpm <- ddim <- guidance: this file takes any classifier and any eps-model and
imports neither the U-Net nor a command line.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddpm import randn_like


def _check_scale(value, name, what):
    """A guidance strength must be a finite number >= 0 (0 switches guidance off)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {what} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name}: {what} must be a finite number >= 0, got {value!r}")
    return v


def _labels(y, n, device, who, kind):
    """y as a LongTensor [n] on `device`; an int is broadcast to the whole batch."""
    if y is None:
        raise ValueError(f"{who}: {kind} guidance needs class labels y (pass model_kwargs={{'y': labels}})")
    y = torch.as_tensor(y, device=device).long()
    if y.dim() == 0:
        y = y.expand(n)
    if y.shape != (n,):
        raise ValueError(f"{who}: y must have shape [{n}] (one label per example), got {tuple(y.shape)}")
    return y


def _compute_dtype(module, x):
    """The dtype to run `module` in: its parameters' dtype if it has any, else x's dtype promoted to >= float32."""
    params = getattr(module, "parameters", None)
    if params is not None:
        for p in params():
            if p.is_floating_point():
                return p.dtype
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Classifier guidance (G1-G3)
# ----------------------------------------------------------------------------------------------------------------

def classifier_cond_fn(classifier, scale):
    """cond_fn(x_t, t, y=None, **kwargs) = s * grad_{x_t} log p_phi(y | x_t): what ddpm and ddim add (G1, G2, G3).

    classifier: classifier(x_t, t) -> logits [N, K], t the ORIGINAL timestep index (what the samplers pass).
    scale:      s >= 0, the "classifier scale" of ADM (s = 1 is exact Bayes, see the module docstring; ADM used 1-10).

    WHERE THE GRADIENT IS TAKEN. ADM's derivation (module docstring, 3.) wants g at the reverse mean mu (and at noise
    level t-1). Like guided-diffusion we evaluate the classifier at the current sample x_t and at level t, where it was
    trained and without first running the model. The two points differ by one denoising step,
    mu - x_t = O(beta_t / sqrt(1 - abar_t)), which over most of the chain is small next to the scale on which
    log p(y | x) changes (the noise std sqrt(1 - abar_t)); in the last few steps, where it is not small, the classifier
    is saturated (p(y | x_t) ≈ 0 or 1) and its gradient ≈ 0. Taken at x_t the gradient is in fact the consistent
    choice: by 2. of the module docstring the exact conditional model has
        eps(x_t | y) = eps(x_t) - sqrt(1 - abar_t) g(x_t),
    so its DDPM mean (DDPM eq. 11) is mu + beta_t / sqrt(alpha_t) g(x_t), and G1 differs from it ONLY in the
    coefficient: Sigma_t instead of beta_t / sqrt(alpha_t). The ratio is sqrt(alpha_t) ≈ 1 - beta_t / 2 for
    Sigma = beta_t, and sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) for Sigma = beta~_t, which is far from 1 only in
    the first ~10 steps (0, 0.45, 0.61, ..., 0.86 at t = 10 on the linear schedule), exactly where the gradient has
    died out (tests/test_guidance.py measures the effect: samples lag ~3e-4 towards the decision boundary for classes
    of std 0.1). For DDIM (G2) x_t is the right point anyway: 2. is an identity at x_t.

    The gradient is computed under torch.enable_grad() (the sampling loops run under no_grad; inference_mode is left
    as well) on a detached copy of x_t, in the classifier's own dtype (float32 for a float32 network; an autocast the
    caller set up applies to the forward) with log-softmax in >= float32, and returned in x_t's dtype. Keyword
    arguments meant for the diffusion model (anything but y) are ignored. The classifier should be in eval mode.
    """
    s = _check_scale(scale, "classifier-scale", "the classifier guidance scale s")

    def cond_fn(x_t, t, y=None, **kwargs):
        y = _labels(y, x_t.shape[0], x_t.device, "cond_fn", "classifier")
        # autograd back on: the sampling loops run under no_grad, or even inference_mode (which enable_grad alone
        # cannot leave)
        with torch.inference_mode(False), torch.enable_grad():
            # a leaf copy of x_t, so grad_{x_t} leaves the sampler's tensor alone (a clone: it may be an inference
            # tensor)
            x_in = x_t.detach().clone().to(_compute_dtype(classifier, x_t)).requires_grad_(True)
            # (t and y are cloned for the same reason: autograd may save them for the backward pass)
            t_in, y_in = (t.clone() if torch.is_tensor(t) else t), y.clone()
            logits = classifier(x_in, t_in)
            # log p_phi(y | x_t) = log softmax(logits)[y]   (G3), in at least float32 (bf16 log-softmax loses digits)
            log_probs = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
            selected = log_probs[torch.arange(x_t.shape[0], device=x_t.device), y_in]
            # examples are independent, so the gradient of the sum is each example's own grad log p_phi(y_i | x_t^i)
            grad = torch.autograd.grad(selected.sum(), x_in)[0]
        # G3: cond_fn = s * grad_{x_t} log p_phi(y | x_t)
        return (s * grad).to(x_t.dtype)

    cond_fn.scale = s
    return cond_fn


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance (G5)
# ----------------------------------------------------------------------------------------------------------------

class ClassifierFreeGuidance(nn.Module):
    """An eps-model wrapper: (x_t, t, y) -> (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null)   (G5).

    model:      model(x_t, t, y=labels, **kwargs) -> eps [N, C, ...] or, learning sigma, [eps | v] with 2C channels.
                Label `null_class` must mean "no label" (unet.UNet(num_classes=K): null_class = K).
    w:          the guidance weight w >= 0 of Ho & Salimans (their eq. 6); w = 0 is the plain conditional model.
                (Other code bases use a "guidance scale" 1 + w: eps_null + (1 + w) (eps_y - eps_null) is the same.)
    null_class: the index of the null label.

    The conditional and unconditional evaluations run as ONE forward pass on a doubled batch ([x, x], [t, t],
    [y, null]): the arithmetic is still doubled, but there is one sequence of kernel launches instead of two and
    small sampling batches fill the GPU better. With w = 0 the unconditional half would be multiplied by 0: it is not
    computed at all.

    With a learned variance (2C output channels) only eps is guided; v (the variance interpolation, iDDPM eq. 15) is
    taken from the conditional half. Extrapolating v as well would push it outside [-1, 1], i.e. the variance
    outside [beta~_t, beta_t], and Ho & Salimans guide the noise prediction only.

    Subclassing nn.Module makes the wrapped network a submodule: .parameters() (and so ddpm.device_of), .eval(),
    .to() reach it.
    """

    def __init__(self, model, w, null_class):
        super().__init__()
        self.model = model
        self.w = _check_scale(w, "cfg-scale", "the classifier-free guidance weight w")
        if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0:
            raise ValueError(f"null_class: must be the integer index of the null label (>= 0), got {null_class!r}")
        self.null_class = null_class

    def forward(self, x, t, y=None, **kwargs):
        y = _labels(y, x.shape[0], x.device, "ClassifierFreeGuidance", "classifier-free")
        if self.w == 0:
            # w = 0: eps~ = eps_theta(x_t, t, y), the conditional model as it is
            return self.model(x, t, y=y, **kwargs)
        n, C = x.shape[0], x.shape[1]
        null = torch.full_like(y, self.null_class)
        # one batched pass: the first n rows are conditional, the last n unconditional
        x_in = torch.cat([x, x], dim=0)
        t_in = torch.cat([t, t], dim=0) if torch.is_tensor(t) and t.dim() > 0 else t
        y_in = torch.cat([y, null], dim=0)
        # other per-example keyword tensors (batch-first) are doubled too; anything else is passed as it is
        kw_in = {k: torch.cat([v, v], dim=0) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                 for k, v in kwargs.items()}
        out = self.model(x_in, t_in, y=y_in, **kw_in)
        if out.shape[1] not in (C, 2 * C):
            raise ValueError(f"model: expected {C} (eps) or {2 * C} (eps and v) output channels, got {out.shape[1]}")
        # the combination amplifies rounding by 1 + 2w: do it in at least float32 (bf16 under autocast)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        eps_cond, eps_uncond = out[:n, :C], out[n:, :C]
        # G5 (Ho & Salimans eq. 6): eps~ = (1 + w) eps_theta(x_t, t, y) - w eps_theta(x_t, t, null)
        eps = (1 + self.w) * eps_cond - self.w * eps_uncond
        if out.shape[1] == 2 * C:
            # learned variance: keep the conditional v (see the class docstring)
            return torch.cat([eps, out[:n, C:]], dim=1)
        return eps


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluating the noisy classifier (G4)
# ----------------------------------------------------------------------------------------------------------------

def noisy_classifier_loss(diffusion, classifier, x0, y, t=None, generator=None):
    """Per-example cross-entropy of the classifier on noised data, x_t = q_sample(x_0, t), t ~ Uniform (G4, ADM §4).

    diffusion:  a ddpm.GaussianDiffusion; t are its code indices, the classifier is given the ORIGINAL index
                (diffusion.original_t), like every model in this repository.
    classifier: classifier(x_t, t) -> logits [N, K].
    x0, y:      clean data [N, ...] and labels [N].
    t:          optional [N] code indices; drawn uniformly from 0..T-1 (with `generator`) when None.

    Returns a dict of [N] tensors: "loss" (cross-entropy, what to minimise: .mean() it), "accuracy" (1.0 where the
    arg-max is y: .mean() it), and "t" (the code indices used, e.g. to bucket the log by noise level).
    """
    n = x0.shape[0]
    y = torch.as_tensor(y, device=x0.device).long()
    if y.shape != (n,):
        raise ValueError(f"y: must have shape [{n}] (one label per example), got {tuple(y.shape)}")
    if t is None:
        # G4 (ADM §4): t ~ Uniform({1, ..., T}), drawn on the generator's device and moved to the data's
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=dev, generator=generator).to(x0.device)
    # DDPM eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)
    x_t = diffusion.q_sample(x0, t, randn_like(x0, generator))
    logits = classifier(x_t, diffusion.original_t(t))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # G4: L = -log p_phi(y | x_t, t), the cross-entropy of the noised example
    loss = F.cross_entropy(logits, y, reduction="none")
    accuracy = (logits.argmax(dim=-1) == y).to(logits.dtype)
    return {"loss": loss, "accuracy": accuracy.detach(), "t": t}


@torch.no_grad()
def classifier_accuracy_at(diffusion, classifier, x0, y, ts=None, generator=None, batch_size=256):
    """{t: accuracy} of the classifier on x_t = q_sample(x0, t) at each fixed code index t in `ts` (G4).

    ts defaults to the quartiles 0, T/4, T/2, 3T/4 (0, 250, 500, 750 for T = 1000). Accuracy should fall from the clean
    classifier's at t = 0 towards chance (1/K) as abar_t -> 0: x_T carries almost no trace of x_0. The classifier is
    put in eval mode for the measurement and given back in the mode it came in.
    """
    T = diffusion.num_timesteps
    ts = [0, T // 4, T // 2, (3 * T) // 4] if ts is None else [int(t) for t in ts]
    if any(not 0 <= t < T for t in ts):
        raise ValueError(f"ts: timesteps must lie in 0..{T - 1}, got {ts}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    y = torch.as_tensor(y, device=x0.device).long()
    was_training = getattr(classifier, "training", None)
    if was_training:
        classifier.eval()
    try:
        result = {}
        for t_ in ts:
            correct = 0.0
            for i in range(0, x0.shape[0], batch_size):
                xb, yb = x0[i:i + batch_size], y[i:i + batch_size]
                t = torch.full((xb.shape[0],), t_, device=x0.device, dtype=torch.long)
                correct += noisy_classifier_loss(diffusion, classifier, xb, yb, t, generator)["accuracy"].sum().item()
            result[t_] = correct / x0.shape[0]
    finally:
        if was_training:
            classifier.train()
    return result
