"""
guidance.py against analytic ground truth: a two-class Gaussian mixture whose every quantity is closed-form.

THE TEST WORLD. x_0 ~ 0.7 N(mu_0, s^2 I) + 0.3 N(mu_1, s^2 I) in 2-D, mu_0 = (-0.5, -0.5), mu_1 = (0.5, 0.5), s = 0.1; the
class is the component. tests/analytic.py gives, at every noise level t,
    the unconditional optimal eps       MixtureEps(x, t)                 = -sqrt(1 - abar_t) grad log p(x_t)
    the exact conditional eps           MixtureEps.component_eps(x, t, y) = -sqrt(1 - abar_t) grad log p(x_t | y)
    the exact noisy classifier          softmax(MixtureEps.log_joint(x, t)) = p(y | x_t)
so guidance can be checked against numbers instead of "it runs". Class 1 is the minority (30%): guidance has work to do.

THE KEY IDENTITY. Bayes, p(x_t | y) = p(x_t) p(y | x_t) / p(y), differentiated in x_t:
    grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t);
multiplied by -sqrt(1 - abar_t):
    eps(x_t | y) = eps(x_t) - sqrt(1 - abar_t) grad log p(y | x_t),
which is ADM Algorithm 2's guided eps (G2) with s = 1. So DDIM with the exact classifier at scale 1 IS DDIM with the
component's own Gaussian eps, and its samples follow the same scalar moment recursion as tests/test_ddim.py's
(DDIM eq. 12, per coordinate, with the component's mean and std). And classifier-free guidance with weight w and exact
models is classifier guidance with scale 1 + w (Ho & Salimans §3.2):
    (1 + w) eps(x | y) - w eps(x) = eps(x) - (1 + w) sqrt(1 - abar_t) grad log p(y | x_t).

TOLERANCES. Sample moments: within 5 standard errors of the sample size (as in test_ddpm.py: ~1e-6 false alarms per
check). Deterministic identities: float64 round-off (1e-10 or tighter; 1e-9 after 50 chained sampler steps).
Finite differences: 1e-6 relative (central differences with h = 1e-6: truncation ~1e-8, round-off ~1e-10).
DDPM's G1 is NOT exact (its mean shift uses Sigma_t where the conditional model has beta_t / sqrt(alpha_t), see
test_ddpm_guided_step_differs_from_the_conditional_model_only_in_the_coefficient): its samples are compared with the
exact conditional model run on the same noise, where the discrepancy was measured (a lag of the samples towards the
decision boundary by <= 3.4e-4, +0.1% in variance, stable across seeds and sample sizes) and is bounded with a 3x and
10x margin.

Every formula was broken on purpose once (in a scratch copy) and at least one test failed: the G2 sign flipped in
ddim.py, Sigma -> 2 Sigma in G1 in ddpm.py, the scale dropped, squared or negated in cond_fn, the gradient of p(y)
instead of log p(y), (1 + w) -> w in the classifier-free mix, its halves or its labels swapped, w = 0 not skipping the
null half, v guided too, the classifier trained on clean x_0 or told the wrong t.
"""

import math

import pytest
import torch

from ddim import ddim_sample_loop
from ddpm import GaussianDiffusion, device_of
from guidance import ClassifierFreeGuidance, classifier_accuracy_at, classifier_cond_fn, noisy_classifier_loss
from schedules import get_named_beta_schedule
from tests.analytic import MixtureEps
from tests.test_ddim import ddim_recursion
from tests.test_ddpm import assert_moments, ddpm_recursion

T = 1000
MUS = [[-0.5, -0.5], [0.5, 0.5]]     # mode of class 0, mode of class 1
S = 0.1                              # each component's std per coordinate
WEIGHTS = [0.7, 0.3]
NULL = 2                             # the null label of classifier-free guidance (num_classes = 2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of tiny steps: intra-op threads only add spin-waiting (see tests/test_unet.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def setup(var_type="fixed_small"):
    d = GaussianDiffusion(get_named_beta_schedule("linear", T), var_type)
    return d, MixtureEps(MUS, S, WEIGHTS, d.alphas_cumprod)


def exact_classifier(mix):
    """classifier(x_t, t) -> logits whose softmax is the exact p(y | x_t): log w_y + log N(x_t; sqrt(abar) mu_y, ...)."""
    return lambda x, t: mix.log_joint(x, t)


def half_and_half(n):
    """Labels: the first half asks for class 1 (the minority), the second for class 0."""
    return torch.cat([torch.ones(n // 2, dtype=torch.long), torch.zeros(n - n // 2, dtype=torch.long)])


def margin(x, y):
    """Signed distance from the decision boundary x1 + x2 = 0, positive on class y's side (the mode sits at 0.707)."""
    return x.sum(1) / math.sqrt(2) * (2 * y - 1).to(x.dtype)


def assert_component_moments(x, y, recursion):
    """Each class's samples have the mean and variance `recursion(mu)` predicts for its Gaussian component."""
    for k in (0, 1):
        m, v = recursion(MUS[k][0])            # both coordinates of mu_k are equal: one scalar recursion
        assert_moments(x[y == k], m, v)


class ExactConditionalEps:
    """model(x_t, t, y): the exact class-conditional eps for y in {0, 1}, the exact unconditional eps for y = NULL.
    Records every call (batch size and labels) to check how ClassifierFreeGuidance calls it."""

    def __init__(self, mix):
        self.mix, self.calls = mix, []

    def __call__(self, x, t, y=None):
        self.calls.append((x.shape[0], y.clone()))
        conditional = self.mix.component_eps(x, t, y.clamp(max=1))
        return torch.where((y == NULL)[:, None], self.mix(x, t), conditional)


# ----------------------------------------------------------------------------------------------------------------
# cond_fn (G3)
# ----------------------------------------------------------------------------------------------------------------

def test_cond_fn_is_the_scaled_gradient_of_log_p_y_and_points_to_its_class():
    d, mix = setup()
    clf = exact_classifier(mix)
    s = 2.5
    cond_fn = classifier_cond_fn(clf, s)
    g = torch.Generator().manual_seed(0)
    x = 0.6 * torch.randn(12, 2, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 2
    for t_ in (100, 400, 800):
        t = torch.full((12,), t_)
        grad = cond_fn(x, t, y=y, unused_model_kwarg=None)      # extra model kwargs are ignored
        assert grad.dtype == torch.float64 and grad.shape == x.shape

        # G3: s * d/dx log p(y | x_t), by central differences in float64
        def f(z):
            return s * torch.log_softmax(clf(z, t), dim=1)[torch.arange(12), y]
        h = 1e-6
        fd = torch.stack([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)], dim=1)
        assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-6), (grad - fd).abs().max()

        # direction: equal-width components, so grad log p(y | x_t) = (1 - p(y | x_t)) sqrt(abar) (mu_y - mu_other) / var,
        # a positive multiple of mu_y - mu_other: it pushes away from the other class ...
        away = torch.tensor(MUS, dtype=torch.float64)[y] - torch.tensor(MUS, dtype=torch.float64)[1 - y]
        assert bool(((grad * away).sum(1) > 0).all())
        assert torch.allclose(grad[:, 0] * away[:, 1], grad[:, 1] * away[:, 0], atol=1e-12)
        # ... and so, from anywhere between the two (diffused) modes, towards the class's own mode
        abar = d.alphas_cumprod[t_].item()
        between = torch.linspace(-0.45, 0.45, 12, dtype=torch.float64)[:, None].expand(12, 2) * math.sqrt(abar)
        to_mode = math.sqrt(abar) * torch.tensor(MUS, dtype=torch.float64)[y] - between
        assert bool(((cond_fn(between, t, y=y) * to_mode).sum(1) > 0).all())


def test_guided_eps_with_the_exact_classifier_is_the_conditional_eps():
    d, mix = setup()
    cond_fn = classifier_cond_fn(exact_classifier(mix), 1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    y = torch.arange(16) % 2
    for t_ in (0, 10, 200, 600, 999):
        t = torch.full((16,), t_)
        abar = d.alphas_cumprod[t][:, None]
        # G2 (ADM Algorithm 2), s = 1: eps^ = eps(x_t) - sqrt(1 - abar_t) grad log p(y | x_t)  =  eps(x_t | y)
        # (module docstring: grad log p(x_t) + grad log p(y | x_t) = grad log p(x_t | y), times -sqrt(1 - abar_t))
        guided = mix(x, t) - (1 - abar).sqrt() * cond_fn(x, t, y=y)
        assert torch.allclose(guided, mix.component_eps(x, t, y), rtol=0, atol=1e-10), t_


def test_cond_fn_float32_network_and_inference_mode():
    """A float32 nn.Module classifier inside an inference_mode sampling loop: the gradient still flows, comes back
    in x_t's dtype and equals the float64 one to float32 precision."""
    d, mix = setup()

    class Net(torch.nn.Module):                 # the exact classifier with one (float32) parameter
        def __init__(self):
            super().__init__()
            self.temperature = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return mix.log_joint(x, t) / self.temperature

    x64 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, y = torch.full((8,), 300), torch.arange(8) % 2
    ref = classifier_cond_fn(exact_classifier(mix), 3.0)(x64, t, y=y)
    cond_fn = classifier_cond_fn(Net(), 3.0)
    with torch.inference_mode():
        x32, t_inf, y_inf = x64.float(), t.clone(), y.clone()   # inference tensors, as a sampling loop would make
        grad = cond_fn(x32, t_inf, y=y_inf)
    assert grad.dtype == torch.float32
    assert torch.allclose(grad.double(), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# classifier guidance in the samplers (G1, G2)
# ----------------------------------------------------------------------------------------------------------------

def test_ddim_classifier_guidance_samples_the_chosen_component():
    d, mix = setup()
    N = 4000
    y = half_and_half(N)
    x = ddim_sample_loop(d.respace(50), mix, (N, 2), eta=0.0, clip_denoised=False,
                         cond_fn=classifier_cond_fn(exact_classifier(mix), 1.0), model_kwargs={"y": y},
                         generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # unguided, 70% would land on class 0; guided, essentially none lands nearer the other mode (< 0.5%; the
    # component's own tail beyond the boundary is 7 std away)
    assert (margin(x, y) < 0).double().mean().item() < 0.005
    # s = 1 and the exact classifier make the guided eps the component's Gaussian eps exactly (module docstring),
    # so the samples follow DDIM eq. 12's recursion for N(mu_y, s^2) (a 50-step DDIM is not exact: the recursion, not
    # the data's moments, is the ground truth)
    sp = d.respace(50)
    assert_component_moments(x, y, lambda mu: ddim_recursion(sp.alphas_cumprod.tolist(),
                                                             sp.alphas_cumprod_prev.tolist(), 0.0, mu=mu, s=S))


def test_ddpm_guided_step_differs_from_the_conditional_model_only_in_the_coefficient():
    """G1 moves the mean by Sigma_t g, the exact conditional model (DDPM eq. 11 with eps(x_t | y)) by
    beta_t / sqrt(alpha_t) g, with the same g = grad log p(y | x_t): one step of each, same noise, differ by exactly
    (Sigma_t - beta_t / sqrt(alpha_t)) g."""
    for var_type in ("fixed_small", "fixed_large"):
        d, mix = setup(var_type)
        cond_fn = classifier_cond_fn(exact_classifier(mix), 1.0)
        g = torch.Generator().manual_seed(4)
        x = 0.8 * torch.randn(64, 2, generator=g, dtype=torch.float64)
        t = torch.randint(1, T, (64,), generator=g)
        y = torch.arange(64) % 2
        guided = d.p_sample(mix, x, t, False, cond_fn, {"y": y}, torch.Generator().manual_seed(5))["sample"]
        exact = d.p_sample(lambda x, t, y: mix.component_eps(x, t, y), x, t, False, None, {"y": y},
                           torch.Generator().manual_seed(5))["sample"]
        beta, sigma2 = d.betas[t][:, None], d.p_mean_variance(mix, x, t, False)["variance"]
        assert torch.allclose(guided - exact, (sigma2 - beta / (1 - beta).sqrt()) * cond_fn(x, t, y=y), atol=1e-12)


def test_ddpm_classifier_guidance_samples_the_chosen_component():
    d, mix = setup("fixed_small")
    N = 2000
    y = half_and_half(N)
    xT = torch.randn(N, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = d.p_sample_loop(mix, (N, 2), noise=xT, clip_denoised=False, model_kwargs={"y": y},
                        cond_fn=classifier_cond_fn(exact_classifier(mix), 1.0), generator=torch.Generator().manual_seed(7))
    assert (margin(x, y) < 0).double().mean().item() < 0.005
    assert_component_moments(x, y, lambda mu: ddpm_recursion(d.alphas_cumprod.tolist(), d.alphas_cumprod_prev.tolist(),
                                                              "fixed_small", mu=mu, s=S))
    # G1 is a first-order approximation: with Sigma = beta~_t its push is weaker than the exact conditional model's
    # by the factor sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t), which is < 1 and far from 1 only in the first ~10
    # steps, where p(y | x_t) is saturated. So against the exact conditional model on the SAME x_T and noise the guided
    # samples lag towards the decision boundary by a hair. Measured (three seeds, N = 2000 and 8000): mean lag
    # 3.4e-4 for class 1 and 1.6e-4 for class 0 (0.003 s, a tenth of this test's standard error), per-class variance
    # +0.05% to +0.1%. Bounds, with a 3x and 10x margin: lag in (0, 1e-3), variance within 1%.
    exact = d.p_sample_loop(lambda x, t, y: mix.component_eps(x, t, y), (N, 2), noise=xT, clip_denoised=False,
                            model_kwargs={"y": y}, generator=torch.Generator().manual_seed(7))
    for k in (0, 1):
        c = y == k
        lag = (margin(exact, y) - margin(x, y))[c].mean().item()
        assert 0 < lag < 1e-3, (k, lag)
        assert abs(x[c].var().item() / exact[c].var().item() - 1) < 0.01


def test_larger_scale_concentrates_the_samples():
    """s > 1 samples (approximately) p(x) p(y | x)^s: away from the decision boundary and narrower across it."""
    d, mix = setup("fixed_small")
    N = 2000
    y = half_and_half(N)
    clf = exact_classifier(mix)
    xT = torch.randn(N, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ddim, ddpm = {}, {}
    for s in (1.0, 4.0):
        kw = dict(noise=xT, clip_denoised=False, cond_fn=classifier_cond_fn(clf, s), model_kwargs={"y": y})
        ddim[s] = margin(ddim_sample_loop(d.respace(50), mix, (N, 2), **kw), y)
        # a 100-step respaced DDPM (the same noise for both scales): the comparison is paired, so small effects show
        ddpm[s] = margin(d.respace(100).p_sample_loop(mix, (N, 2), generator=torch.Generator().manual_seed(9), **kw), y)
    for k in (0, 1):                            # per class: the minority class 1 is pushed harder
        c = y == k
        # DDIM (deterministic: the push at high noise is carried to the end). Measured along the axis through the
        # modes: mean 0.71 -> 0.86 (class 1) and 0.78 (class 0), variance across the boundary x 0.29 and x 0.40
        assert ddim[4.0][c].mean().item() > ddim[1.0][c].mean().item() + 0.05
        assert ddim[4.0][c].var().item() < 0.5 * ddim[1.0][c].var().item()
        # DDPM (fresh noise at every step forgets part of the early push): measured over five noise seeds mean
        # +0.027 (class 1) and +0.014 (class 0), variance x 0.65-0.86 and x 0.83-0.95
        assert ddpm[4.0][c].mean().item() > ddpm[1.0][c].mean().item() + 0.01
        assert ddpm[4.0][c].var().item() < ddpm[1.0][c].var().item()


# ----------------------------------------------------------------------------------------------------------------
# classifier-free guidance (G5)
# ----------------------------------------------------------------------------------------------------------------

def test_cfg_w0_is_the_conditional_model_in_one_unguided_pass():
    d, mix = setup()
    N = 4000
    y = half_and_half(N)
    model = ExactConditionalEps(mix)
    x = ddim_sample_loop(d.respace(50), ClassifierFreeGuidance(model, 0.0, NULL), (N, 2), clip_denoised=False,
                         model_kwargs={"y": y}, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    # w = 0: one call per step on the plain batch, the null label never asked for
    assert len(model.calls) == 50
    assert all(n == N and torch.equal(labels, y) for n, labels in model.calls)
    assert (margin(x, y) < 0).double().mean().item() < 0.005
    sp = d.respace(50)
    assert_component_moments(x, y, lambda mu: ddim_recursion(sp.alphas_cumprod.tolist(),
                                                             sp.alphas_cumprod_prev.tolist(), 0.0, mu=mu, s=S))


def test_cfg_is_classifier_guidance_with_scale_one_plus_w():
    d, mix = setup()
    N, w = 2000, 3.0
    y = half_and_half(N)
    xT = torch.randn(N, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    model = ExactConditionalEps(mix)
    cfg = ddim_sample_loop(d.respace(50), ClassifierFreeGuidance(model, w, NULL), (N, 2), noise=xT, clip_denoised=False,
                           model_kwargs={"y": y})
    # ONE forward pass per step, on [x, x] with labels [y, null]
    assert len(model.calls) == 50
    assert all(n == 2 * N and torch.equal(labels, torch.cat([y, torch.full_like(y, NULL)])) for n, labels in model.calls)
    # G5 with exact models: (1 + w) eps(x | y) - w eps(x) = eps(x) - (1 + w) sqrt(1 - abar) grad log p(y | x_t):
    # classifier guidance with s = 1 + w, sample for sample (deterministic DDIM from the same x_T)
    cg = ddim_sample_loop(d.respace(50), mix, (N, 2), noise=xT, clip_denoised=False, model_kwargs={"y": y},
                          cond_fn=classifier_cond_fn(exact_classifier(mix), 1 + w))
    assert torch.allclose(cfg, cg, rtol=0, atol=1e-9), (cfg - cg).abs().max()
    # and so, like a larger classifier scale, w > 0 moves the samples away from the boundary and narrows them
    plain = ddim_sample_loop(d.respace(50), ClassifierFreeGuidance(model, 0.0, NULL), (N, 2), noise=xT,
                             clip_denoised=False, model_kwargs={"y": y})
    for k in (0, 1):
        c = y == k
        assert margin(cfg, y)[c].mean().item() > margin(plain, y)[c].mean().item() + 0.05
        assert margin(cfg, y)[c].var().item() < 0.5 * margin(plain, y)[c].var().item()


def test_cfg_formula_learned_sigma_kwargs_and_parameters():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t0, y = torch.tensor([5, 500, 900]), torch.tensor([0, 1, 1])
    eps_y, eps_null = torch.randn(2, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    v_y, v_null = torch.rand(2, 3, 2, 4, 4, generator=g, dtype=torch.float64)

    class Fake(torch.nn.Module):
        """Returns fixed (eps, v) for the conditional and the null label; checks the doubled kwargs."""
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def forward(self, x, t, y, mask=None, scale=None):
            assert torch.equal(t, torch.cat([t0, t0])) and torch.equal(mask, torch.tensor([1, 2, 3, 1, 2, 3]))
            null = (y == NULL)[:, None, None, None]
            eps = torch.where(null, eps_null.repeat(2, 1, 1, 1), eps_y.repeat(2, 1, 1, 1))
            v = torch.where(null, v_null.repeat(2, 1, 1, 1), v_y.repeat(2, 1, 1, 1))
            return torch.cat([eps, v], dim=1) * scale

    fake = Fake()
    cfg = ClassifierFreeGuidance(fake, 1.5, NULL)
    out = cfg(x, t0, y=y, mask=torch.tensor([1, 2, 3]), scale=1.0)
    # G5 (Ho & Salimans eq. 6) on the eps half; the conditional v is kept (learned variance, iDDPM eq. 15)
    assert torch.allclose(out[:, :2], 2.5 * eps_y - 1.5 * eps_null, atol=1e-12)
    assert torch.equal(out[:, 2:], v_y)
    # an nn.Module holding the network: parameters (hence the sampler's device) and modes reach it
    assert list(cfg.parameters()) == list(fake.parameters())
    assert device_of(cfg) == torch.device("cpu")
    assert not cfg.eval().model.training


# ----------------------------------------------------------------------------------------------------------------
# the noisy classifier (G4)
# ----------------------------------------------------------------------------------------------------------------

def test_noisy_classifier_loss_is_cross_entropy_at_q_sample():
    d, mix = setup()
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    y = torch.arange(32) % 2
    out = noisy_classifier_loss(d, exact_classifier(mix), x0, y, generator=torch.Generator().manual_seed(14))
    # G4: t ~ Uniform{0..T-1} and eps ~ N(0, I) from the generator, x_t = q_sample(x_0, t, eps), CE of the logits
    g = torch.Generator().manual_seed(14)
    t = torch.randint(0, T, (32,), generator=g)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    logits = mix.log_joint(x_t, t)
    assert torch.equal(out["t"], t)
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(logits, y, reduction="none"), atol=1e-12)
    assert torch.equal(out["accuracy"], (logits.argmax(1) == y).double())


def test_noisy_classifier_trains_and_is_accurate_at_low_noise_only():
    from unet import EncoderUNet                # (guidance.py itself must not import the U-Net)

    d = GaussianDiffusion(get_named_beta_schedule("linear", T))
    g = torch.Generator().manual_seed(15)

    def images(n):
        """8x8 RGB images of two colours (class 0 reddish, class 1 bluish) with pixel noise: same brightness."""
        y = torch.randint(0, 2, (n,), generator=g)
        colour = torch.tensor([[0.5, 0.0, -0.5], [-0.5, 0.0, 0.5]])[y]
        return (colour[:, :, None, None] + 0.3 * torch.randn(n, 3, 8, 8, generator=g)).clamp(-1, 1), y

    torch.manual_seed(0)
    classifier = EncoderUNet(image_size=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), out_dim=2)
    x0, y = images(128)
    opt = torch.optim.AdamW(classifier.parameters(), lr=2e-3)
    for _ in range(60):
        idx = torch.randint(0, 128, (64,), generator=g)
        loss = noisy_classifier_loss(d, classifier, x0[idx], y[idx], generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_val, y_val = images(512)
    acc = classifier_accuracy_at(d, classifier, x_val, y_val, ts=(0, 250, 999), generator=g)
    # measured 1.0, 1.0 and ~0.5: clean images are easy; x_T keeps sqrt(abar_T) = 0.6% of the signal: chance
    # (0.75 is 11 standard errors of a 512-sample accuracy above chance)
    assert acc[0] > 0.9 and acc[250] > 0.9, acc
    assert acc[999] < 0.75, acc
    assert classifier.training, "the caller's mode is given back"


# ----------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    d, mix = setup()
    clf = exact_classifier(mix)
    for bad in (-1.0, float("nan"), "big"):
        with pytest.raises(ValueError, match="classifier-scale"):
            classifier_cond_fn(clf, bad)
        with pytest.raises(ValueError, match="cfg-scale"):
            ClassifierFreeGuidance(ExactConditionalEps(mix), bad, NULL)
    with pytest.raises(ValueError, match="null_class"):
        ClassifierFreeGuidance(ExactConditionalEps(mix), 1.0, -1)
    x, t = torch.zeros(4, 2, dtype=torch.float64), torch.full((4,), 10)
    with pytest.raises(ValueError, match="cond_fn: classifier guidance needs class labels y"):
        classifier_cond_fn(clf, 1.0)(x, t)
    with pytest.raises(ValueError, match="y must have shape"):
        classifier_cond_fn(clf, 1.0)(x, t, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs class labels y"):
        ClassifierFreeGuidance(ExactConditionalEps(mix), 1.0, NULL)(x, t)
    with pytest.raises(ValueError, match="ts"):
        classifier_accuracy_at(d, clf, x, torch.zeros(4, dtype=torch.long), ts=(0, T))
    with pytest.raises(ValueError, match="y"):
        noisy_classifier_loss(d, clf, x, torch.zeros(5, dtype=torch.long))
