"""
The sampler menu: "sampler NAME, these settings, this guidance, on this checkpoint's network" turned into images,
the same way for every script (sample.py, evaluate.py, figures.py). One name means one thing everywhere:
`ddim50_eta1_quad_cg4_class3_seed0` is the same 64 images whether sample.py draws them or evaluate.py scores them.

    ckpt = checkpoint.load("runs/cifar10")
    s = sampling.from_checkpoint(ckpt, sampling.Settings(sampler="ddim", steps=50), device="cpu")
    images, labels = s.generate(n=64, batch_size=256, seed=0)     # uint8 [64, 32, 32, 3], None
    sampling.save_samples(images, labels, "samples/" + s.name(seed=0))

THE MENU. Every sampler of this repository is a library loop with one signature,

    loop(diffusion, model, shape, noise=x_T, model_kwargs={"y": labels}, generator=g, progress=False, **options)

that runs on EVERY step of the diffusion it is given. So the one rule for respacing lives here, once: the
checkpoint's diffusion is respaced to --steps with --skip (DDIM §4.2, D4; iDDPM §4 for ancestral sampling) and the
loop walks all of its steps. The options a sampler takes are the keyword parameters of its loop (`eta`,
`langevin_steps`, ...): a setting the chosen loop does not take is refused, never silently ignored, and classifier
guidance needs a loop with a `cond_fn` parameter. Adding a sampler is one line in SAMPLERS:

    "dpmpp2m": solvers.dpmpp2m_sample_loop,       # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2

(plus, if its paper says so, its default step count in DEFAULT_STEPS and its step schedule in DEFAULT_SKIP).

STEP SCHEDULES (--skip, SPACINGS). Which of the T steps a respaced diffusion keeps: uniform or quad (DDIM §4.2, D4),
logsnr (uniform in lambda = log(alpha / sigma), DPM-Solver's "logSNR" rule, P3) or karras (EDM eq. 5 with rho = 7,
P3). Each sampler defaults to the one its paper recommends: uniform for DDPM/DDIM and the score samplers, logsnr for
DPM-Solver++, karras for Heun. logsnr and karras round their targets to the model's T levels and merge collisions at
the low-noise end, so they may keep fewer steps than asked: the Sampler says so, and `kept` is the true count.

GUIDANCE (guidance.py) wraps the network or adds a cond_fn; the loops never know which:
  * classifier guidance (ADM, G1-G3): cond_fn = s grad_x log p_phi(y | x_t) from a noisy classifier checkpoint. On an
    unconditional network the labels are the classifier's alone (IgnoreLabels).
  * classifier-free guidance (Ho & Salimans, G5): eps~ = (1 + w) eps(x_t, t, y) - w eps(x_t, t, null).

BATCHES AND SEEDS. Batch i of a call draws x_T, its labels and every step's noise from its own generator, seeded with
(seed, i). The same seed and batch size give the same images on the same device; another batch size gives other
(equally good) images, because a loop draws one noise tensor per step for its whole batch.

PROGRESS. One bar counts images (done / total, img/s, ETA in readable units). Every loop walks the diffusion's levels
from the noisiest down, so the network being called at level i of S says that (S - i) / S of the batch is done: the
bar moves inside a batch too, which matters on a CPU, where one batch of the default model takes minutes. (On a GPU,
reading the level back would stall the device every step, so there the bar moves once per batch.)

CHECKS. Every setting is checked against the checkpoint and the respaced diffusion before any work (a UsageError
naming the flag: the flags are sample.py's, shared by evaluate.py); the images are checked once, at the end, and
non-finite values are refused with their likely cause instead of being written as black pictures.
"""

import dataclasses
import inspect

import numpy as np
import torch
import torch.nn as nn

import checkpoint
import data
import ddgan
import ddim
import outputs
import schedules
import score
import solvers
from cli import UsageError, autocast, check_number, progress, say, uses_bf16
from ddpm import GaussianDiffusion
from guidance import ClassifierFreeGuidance, classifier_cond_fn

# name -> the library loop (one line each; see the module docstring)
SAMPLERS = {
    "ddpm": GaussianDiffusion.p_sample_loop,   # DDPM Algorithm 2 (A2): ancestral sampling, sigma_t^2 per R3
    "ddim": ddim.ddim_sample_loop,             # DDIM eq. 12 (D2) with sigma_t(eta) of eq. 16 (D3)
    "langevin": score.langevin_sample_loop,    # annealed Langevin dynamics, NCSN Algorithm 1, on the eps-model (SC2)
    "pc": score.pc_sample_loop,                # predictor-corrector, SDE paper App. G, Algorithms 1 and 5
    "dpmpp2m": solvers.dpmpp2m_sample_loop,    # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (P1): 1 NFE per step
    "heun": solvers.heun_sample_loop,          # EDM's Heun, Karras et al. 2022, Algorithm 1 (P1): 2N - 1 NFE
    "ddgan": ddgan.ddgan_sample_loop,          # DDGAN eq. 6 (DG4): x_0' = G(x_t, z, t), then q(x_{t-1} | x_t, x_0')
}
# steps when --steps is not given: all T for Algorithm 2, 100 noise levels for the score samplers, 20 for DPM-Solver++
# (DPM-Solver's 20 NFE, 2.87 FID on CIFAR-10), EDM's CIFAR-10 setting N = 18 for Heun (35 NFE), else 50
# DDGAN: all T (= 4) steps of the chain its generator learned
DEFAULT_STEPS = {"ddpm": None, "langevin": 100, "pc": 100, "dpmpp2m": 20, "heun": 18, "ddgan": None}

# --skip: name -> kept indices (0..T-1) for `steps` steps of a diffusion with these abar (D4, P3)
SPACINGS = {
    # D4, DDIM §4.2: tau_i = floor(i T / S)
    "uniform": lambda abar, steps: schedules.space_timesteps(len(abar), steps, "uniform"),
    # D4, DDIM App. D: tau_i = floor((i sqrt(0.8 T) / (S - 1))^2), dense at low noise
    "quad": lambda abar, steps: schedules.space_timesteps(len(abar), steps, "quad"),
    # P3, DPM-Solver §3.4 ("logSNR"): lambda = log(alpha / sigma) uniform between the noisiest and cleanest step
    "logsnr": schedules.logsnr_timesteps,
    # P3, EDM eq. 5: sigma_i = (sigma_max^(1/7) + i/(N-1) (sigma_min^(1/7) - sigma_max^(1/7)))^7
    "karras": schedules.karras_timesteps,
}
# the step schedule each paper recommends; every other sampler keeps "uniform"
DEFAULT_SKIP = {"dpmpp2m": "logsnr", "heun": "karras"}

# --var: the fixed reverse variance of DDPM §3.2 (R3), for the samplers that draw from p(x_{t-1} | x_t)
VAR_TYPES = {"large": "fixed_large", "small": "fixed_small"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides what a sampler draws, besides the network and the seed. Defaults = the flags'."""
    sampler: str = "ddim"
    steps: int = None               # None: DEFAULT_STEPS (at most T)
    skip: str = None                # which steps a respaced diffusion keeps (SPACINGS); None: DEFAULT_SKIP
    eta: float = 0.0                # DDIM eq. 16
    var: str = None                 # "large" (sigma^2 = beta) or "small" (beta~), DDPM §3.2; None: the run's
    clip: bool = True               # clip the predicted x_0 to [-1, 1] (R2)
    langevin_steps: int = 2         # NCSN Algorithm 1's T: Langevin steps per noise level
    delta: float = None             # Langevin step at the smallest level (NCSN's epsilon); None: sigma_L^2
    corrector_steps: int = 1        # SDE Algorithm 1's M
    snr: float = 0.16               # SDE Algorithm 5's r
    predictor: str = "ddpm"         # pc's predictor step
    classifier_scale: float = None  # ADM's s (G3); needs a classifier (None: 1)
    cfg_scale: float = None         # Ho & Salimans' w (G5); needs a class-conditional network
    label: int = None               # the class of every image; None: a random class per image
    ema: bool = True                # sample from the EMA weights (DDPM App. B)


DEFAULTS = Settings()
# Settings field -> (its flag, the keyword of the loops that take it)
OPTIONS = {"eta": ("--eta", "eta"), "clip": ("--no-clip", "clip_denoised"),
           "langevin_steps": ("--langevin-steps", "langevin_steps"), "delta": ("--delta", "delta"),
           "corrector_steps": ("--corrector-steps", "corrector_steps"), "snr": ("--snr", "snr"),
           "predictor": ("--predictor", "predictor")}


def takes(sampler, keyword):
    """Whether the sampler's loop has this keyword parameter."""
    return keyword in inspect.signature(SAMPLERS[sampler]).parameters


# ----------------------------------------------------------------------------------------------------------------
# The flags of the menu (sample.py, evaluate.py fid and figures.py share them)
# ----------------------------------------------------------------------------------------------------------------

def add_arguments(p):
    """The sampler, its settings and guidance as flags of parser (or group) p, each defaulting to Settings()'s value.
    Returns their argparse actions (evaluate.py refuses them without --checkpoint)."""
    flag = p.add_argument
    return [
        flag("--sampler", default=DEFAULTS.sampler, choices=tuple(SAMPLERS),
             help="ddpm: ancestral sampling (DDPM Algorithm 2); ddim: DDIM eq. 12; langevin: annealed Langevin "
                  "dynamics (NCSN Algorithm 1); pc: predictor-corrector (SDE paper Algorithm 1); dpmpp2m: "
                  "DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2); heun: EDM's 2nd-order Heun ODE solver "
                  "(Karras et al. 2022, Algorithm 1)"),
        flag("--steps", type=int, default=None,
             help="steps of the respaced diffusion the sampler walks (default: 50; all T for ddpm; 100 noise "
                  "levels for langevin and pc; 20 for dpmpp2m; 18 for heun). Network evaluations (NFE): one per "
                  "step for ddpm, ddim and dpmpp2m; 2N - 1 for heun with N steps (its last step is Euler)"),
        flag("--skip", default=None, choices=tuple(SPACINGS),
             help="which of the T steps a respaced diffusion keeps: evenly spaced (uniform) or quadratic, dense at "
                  "low noise (quad), DDIM §4.2; uniform in log-SNR (logsnr, DPM-Solver); EDM's rho = 7 noise "
                  "levels (karras, EDM eq. 5) (default: logsnr for dpmpp2m, karras for heun, else uniform)"),
        flag("--eta", type=float, default=DEFAULTS.eta,
             help="ddim (and pc --predictor ddim): sigma_t = eta * DDPM's posterior std (DDIM eq. 16); 0 = "
                  "deterministic DDIM, 1 = DDPM-like"),
        flag("--var", default=None, choices=tuple(VAR_TYPES),
             help="ddpm and pc on a fixed-variance run: sigma_t^2 = beta_t (large) or beta~_t (small), DDPM §3.2 "
                  "(default: the run's own, large)"),
        flag("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]"),
        flag("--langevin-steps", type=int, default=DEFAULTS.langevin_steps,
             help="langevin: Langevin steps per noise level (NCSN Algorithm 1's T)"),
        flag("--delta", type=float, default=None,
             help="langevin: step size at the smallest noise level sigma_L (NCSN's epsilon), below 4 sigma_L^2 "
                  "(default: sigma_L^2)"),
        flag("--corrector-steps", type=int, default=DEFAULTS.corrector_steps,
             help="pc: Langevin corrector steps per level (SDE Algorithm 1's M; 0 = predictor only)"),
        flag("--snr", type=float, default=DEFAULTS.snr,
             help="pc: signal-to-noise ratio r of the corrector step (SDE Algorithm 5)"),
        flag("--predictor", default=DEFAULTS.predictor, choices=score.PREDICTORS,
             help="pc: the predictor step, ancestral (ddpm) or DDIM with --eta"),
        flag("--class", dest="label", type=int, default=None,
             help="the class of every image, for a class-conditional run or classifier guidance "
                  "(default: a random class per image)"),
        flag("--classifier", default=None,
             help="noisy classifier (a run trained with --task classifier) for classifier guidance (ADM §4)"),
        flag("--classifier-scale", type=float, default=None,
             help="s in eps - sqrt(1 - abar_t) s grad log p(y | x_t) (ADM Algorithms 1-2) (default: 1 with "
                  "--classifier)"),
        flag("--cfg-scale", type=float, default=None,
             help="w in (1 + w) eps(x_t, y) - w eps(x_t) (classifier-free guidance, Ho & Salimans eq. 6; "
                  "class-conditional runs)"),
        flag("--no-ema", action="store_true", help="sample from the raw weights instead of their EMA"),
        flag("--precision", default="auto", choices=("auto", "bf16", "fp32"),
             help="auto: bf16 autocast on CUDA, fp32 on a CPU"),
        flag("--compile", action="store_true",
             help="torch.compile the network (on CUDA also replayed as a CUDA graph): the same images up to "
                  "round-off, faster after a first call that compiles (tens of seconds); needs a C compiler"),
    ]


def settings_from_args(args):
    """Settings from the flags of add_arguments."""
    return Settings(sampler=args.sampler, steps=args.steps, skip=args.skip, eta=args.eta, var=args.var,
                    clip=not args.no_clip, langevin_steps=args.langevin_steps, delta=args.delta,
                    corrector_steps=args.corrector_steps, snr=args.snr, predictor=args.predictor,
                    classifier_scale=args.classifier_scale, cfg_scale=args.cfg_scale, label=args.label,
                    ema=not args.no_ema)


# ----------------------------------------------------------------------------------------------------------------
# Wrappers around the network
# ----------------------------------------------------------------------------------------------------------------

class IgnoreLabels(nn.Module):
    """An unconditional network under classifier guidance: the labels in model_kwargs are the cond_fn's, not its."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y=None, **kwargs):
        return self.model(x, t, **kwargs)


class Compiled(nn.Module):
    """The network under torch.compile, for sampling (--compile): the same function in fewer, fused kernels.

    A sampler calls the network with the same shapes at every step, which is what compilation wants: dynamic=False
    compiles one graph per batch shape (a call's last, smaller batch gets its own), the first call of each shape
    paying the compilation (tens of seconds). On CUDA the mode is "reduce-overhead", which also records the compiled
    network as a CUDA graph and replays it: one launch per call instead of one per kernel, what a sampling step at a
    small batch is bound by. A replay writes its output into the same memory every time, so each call's output is
    copied out before the next call can overwrite it (the loops keep a step's output while they call again: Heun's
    second evaluation, DPM-Solver++'s previous x_0). The weights must not change once compiled (they are the EMA's).
    """

    def __init__(self, model, device):
        super().__init__()
        self.cuda_graphs = torch.device(device).type == "cuda"
        self.net = torch.compile(model, mode="reduce-overhead" if self.cuda_graphs else None, dynamic=False)

    def forward(self, x, t, **kwargs):
        if not self.cuda_graphs:
            return self.net(x, t, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last replay's output has been copied out
        return self.net(x, t, **kwargs).clone()


class Ticker(nn.Module):
    """The network, moving an images bar along as a batch walks down the diffusion's levels.

    Every loop calls the network at levels S-1, ..., 0 of its diffusion (ddpm.calc_bpd_loop too), so a call at level i
    means that (top - i + 1) / (top + 1) of the batch is done, top being the first level the batch was called at
    (S - 1, or lower for a loop that starts part-way). Reading the level is a host sync: done on a CPU only.
    """

    def __init__(self, model, diffusion, bar):
        super().__init__()
        self.model, self.bar = model, bar
        self.level = {t: i for i, t in enumerate(diffusion.timestep_map.tolist())}
        self.start(0)

    def start(self, m):
        """A batch of m images begins."""
        self.m, self.top, self.shown = m, None, 0

    def forward(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        if torch.is_tensor(t) and t.device.type == "cpu" and not self.bar.disable:
            i = self.level.get(int(t.reshape(-1)[0]))
            if i is not None:
                self.top = i if self.top is None else self.top
                self.advance(int(self.m * (self.top - i + 1) / (self.top + 1)))
        return out

    def advance(self, done):
        if done > self.shown:
            self.bar.update(done - self.shown)
            self.shown = done

    def finish(self):
        """The batch is done: the bar shows all of its images."""
        self.advance(self.m)


# ----------------------------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------------------------

def batch_generator(device, seed, i):
    """The generator of batch i of a call with this seed: x_T, labels and every step's noise of that batch."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + i) % (1 << 63))


class Sampler:
    """A checkpoint's network, its (respaced) diffusion, the guidance and the settings: turns latents into images.

    model:       the eps-network (UNet) in eval mode; num_classes: its classes (None: unconditional).
    diffusion:   the diffusion it was trained with (checkpoint.build_diffusion); respaced here to settings.steps.
    image_shape: (C, H, W) of one image.
    classifier:  a noisy classifier (EncoderUNet) for classifier guidance, or None; classifier_classes: its classes.
    Every setting is checked first (UsageError naming the flag), before any work.
    """

    def __init__(self, model, diffusion, image_shape, settings=DEFAULTS, num_classes=None, classifier=None,
                 classifier_classes=None, device="cpu", precision="auto", compile=False):
        o = settings
        self.settings, self.image_shape, self.num_classes = o, tuple(image_shape), num_classes
        # the labels: the network's classes, or (classifier guidance on an unconditional network) the classifier's
        self.classes = num_classes if num_classes is not None else classifier_classes
        self.device, self.precision = torch.device(device), precision
        self.amp = autocast(self.device, precision)
        if o.sampler not in SAMPLERS:
            raise UsageError(f"--sampler: unknown {o.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.T = T = diffusion.num_timesteps
        self.steps = o.steps if o.steps is not None else min(DEFAULT_STEPS.get(o.sampler, 50) or T, T)
        check_number("--steps", self.steps, lo=1, hi=T, integer=True)
        # the step schedule: --skip, else the one the sampler's paper recommends
        self.skip = o.skip if o.skip is not None else DEFAULT_SKIP.get(o.sampler, "uniform")
        if self.skip not in SPACINGS:
            raise UsageError(f"--skip: unknown {self.skip!r}; choose one of {', '.join(SPACINGS)}")
        self.check_options(diffusion, classifier)
        if o.sampler == "ddgan" and self.steps != T:
            # DDGAN's G learned the T large steps of its own schedule (DDGAN §3.1): a respaced chain is not its model
            raise UsageError(f"--steps: the ddgan sampler walks all T = {T} steps its generator was trained on; "
                             f"drop --steps or pass --steps {T}")
        if o.var is not None:
            diffusion = GaussianDiffusion(diffusion.betas, VAR_TYPES[o.var], diffusion.loss_type,
                                          diffusion.timestep_map)
        # D4: respace ONCE, by the rule; the loop then walks every step of `self.diffusion`
        if self.steps == T:
            self.diffusion = diffusion
        else:
            try:
                kept = SPACINGS[self.skip](diffusion.alphas_cumprod, self.steps)
            except ValueError as e:  # quad cannot place that many distinct steps
                raise UsageError(f"--steps: {e}") from None
            self.diffusion = diffusion.respace(kept)
        # logsnr and karras merge targets that round to the same level of the T: say so, never hide it
        self.kept = self.diffusion.num_timesteps
        if self.kept < self.steps:
            say(f"note: --skip {self.skip}: {self.steps} steps round to {self.kept} distinct levels of the T = {T} "
                f"(the low-noise end is denser than one step); sampling on {self.kept}")
        self.check_ranges()

        # --compile: the network itself is compiled (guidance's arithmetic around it stays eager); once only, so that
        # samplers built on one compiled network share its graphs (evaluate.py's table)
        self.latent_dim = getattr(model, "latent_dim", None)  # a DDGAN generator's nz
        if compile and not isinstance(model, Compiled):
            model = Compiled(model, self.device)
        # guidance: wrap the network (G5) and/or add a cond_fn (G3); the loop does not know which
        self.model, self.cond_fn = model, None
        if o.cfg_scale is not None:
            self.model = ClassifierFreeGuidance(model, o.cfg_scale, null_class=num_classes)
        if classifier is not None:
            self.cond_fn = classifier_cond_fn(classifier, 1.0 if o.classifier_scale is None else o.classifier_scale)
            if num_classes is None:
                self.model = IgnoreLabels(model)  # y is for the classifier only
        self.conditional = num_classes is not None or classifier is not None

    # -- checks (each names its flag and the fix) ------------------------------------------------------------------

    def check_options(self, diffusion, classifier):
        o = self.settings
        for field, (flag, keyword) in OPTIONS.items():
            if getattr(o, field) != getattr(DEFAULTS, field) and not takes(o.sampler, keyword):
                users = [name for name in SAMPLERS if takes(name, keyword)]
                raise UsageError(f"{flag}: the {o.sampler} sampler has no such setting (it is for "
                                 f"{', '.join(users)}); drop {flag}")
        if o.sampler == "pc" and o.predictor != "ddim" and o.eta != DEFAULTS.eta:
            raise UsageError("--eta: pc uses eta only with --predictor ddim; add it or drop --eta")
        if o.var is not None:
            if diffusion.var_type == "learned_range":
                raise UsageError("--var: this run learned its variance (iDDPM eq. 15); drop --var")
            if not (o.sampler == "ddpm" or (o.sampler == "pc" and o.predictor == "ddpm")):
                raise UsageError(f"--var: only ancestral steps (ddpm, pc --predictor ddpm) draw with sigma_t^2; "
                                 f"{o.sampler} does not: drop --var")
        if o.classifier_scale is not None:
            check_number("--classifier-scale", o.classifier_scale, lo=0)
            if classifier is None:
                raise UsageError("--classifier-scale: classifier guidance needs --classifier RUN (a run trained with "
                                 "--task classifier)")
        if classifier is not None:
            if self.classes is None:
                raise ValueError("classifier_classes: give the classifier's number of classes")
            if not takes(o.sampler, "cond_fn"):
                raise UsageError(f"--classifier: the {o.sampler} sampler takes no classifier guidance; "
                                 "drop --classifier")
        if o.cfg_scale is not None:
            check_number("--cfg-scale", o.cfg_scale, lo=0)
            if self.num_classes is None:
                raise UsageError("--cfg-scale: this run is unconditional; classifier-free guidance needs a run trained "
                                 "with --class-cond")
        if o.label is not None:
            if self.classes is None:
                raise UsageError("--class: this run is unconditional; add --classifier RUN for classifier guidance or "
                                 "use a --class-cond run")
            check_number("--class", o.label, lo=0, hi=self.classes - 1, integer=True)
        check_number("--langevin-steps", o.langevin_steps, lo=1, integer=True)
        check_number("--corrector-steps", o.corrector_steps, lo=0, integer=True)
        check_number("--snr", o.snr, lo=0, lo_open=True)

    def check_ranges(self):
        """Ranges that depend on the respaced diffusion: DDIM's eta, the largest stable Langevin step."""
        o, d = self.settings, self.diffusion
        if o.sampler == "ddim" or (o.sampler == "pc" and o.predictor == "ddim"):
            try:  # D3: sigma_t(eta) of eq. 16 must leave 1 - abar_{t-1} - sigma_t^2 >= 0 (NaN and inf fail too)
                ddim.check_eta(d, o.eta)
            except ValueError as e:
                raise UsageError(f"--{e}; pick --eta in that range") from None
        if o.delta is not None:
            # SC2: Langevin on q_t, whose -Hessian is at most I / sigma_t^2, is stable for steps below 4 sigma_t^2;
            # delta_i = delta sigma_i^2 / sigma_L^2, so delta < 4 sigma_L^2 keeps every level stable (and at the
            # noisiest levels, where q_t is close to N(0, I), larger steps diverge)
            top = 4 * d.one_minus_alphas_cumprod[0].item()
            if not (isinstance(o.delta, (int, float)) and 0 < o.delta < top):
                raise UsageError(f"--delta: must lie in (0, {top:.4g}): below 4 sigma_L^2 on these {d.num_timesteps} "
                                 f"levels, beyond which Langevin diverges (NCSN Algorithm 1); got {o.delta!r}")

    # -- drawing ---------------------------------------------------------------------------------------------------

    def loop_kwargs(self):
        """The options the chosen loop takes, under its own keyword names (and the cond_fn of classifier guidance)."""
        o = self.settings
        kw = {keyword: getattr(o, field) for field, (_, keyword) in OPTIONS.items() if takes(o.sampler, keyword)}
        if takes(o.sampler, "latent_dim"):  # a DDGAN generator's nz (the Ticker around it does not carry it)
            kw["latent_dim"] = self.latent_dim
        if self.cond_fn is not None:
            kw["cond_fn"] = self.cond_fn
        return kw

    def labels(self, n, generator):
        """The class of each image: --class, or uniform labels sorted so that a grid is laid out by class."""
        if not self.conditional:
            return None
        if self.settings.label is not None:
            return torch.full((n,), self.settings.label, dtype=torch.long, device=self.device)
        y = torch.randint(0, self.classes, (n,), generator=generator, device=generator.device)
        return y.sort().values.to(self.device)

    def generate(self, n, batch_size=256, seed=0, show_progress=True, latents=None, labels=None, desc="sampling"):
        """n images as uint8 numpy [n, H, W, C] and their labels (int64 numpy [n], or None).

        Batch i draws x_T, its labels and every step's noise from a generator seeded with (seed, i). `latents` /
        `labels` (tensors [n, ...]) replace the drawn x_T / labels (interpolation, inversion). The output is checked
        once, at the end: non-finite values are refused with their likely cause, never written as black images.

        UNDER TORCHRUN (a torch.distributed process group is initialised): rank r draws batches r, r + W, r + 2W, ...
        of the W ranks, each with the same (seed, i) generator as one process would use, so the union is exactly the
        single-process run's images (on one kind of device). Every rank then receives every batch (all_gather_object
        of uint8 arrays: gloo on a CPU, nccl on CUDA) and returns all n images in batch order, so that a check or an
        error is the same on every rank; the caller lets rank 0 alone write files and print.
        """
        import torch.distributed as dist  # noqa: PLC0415
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        loop = SAMPLERS[self.settings.sampler]
        kwargs = self.loop_kwargs()
        starts = list(range(0, n, batch_size))
        mine = [i for i in range(len(starts)) if i % world == rank]  # batch i on rank i % W
        share = sum(min(batch_size, n - starts[i]) for i in mine)
        bar = progress(share, desc if world == 1 else f"{desc} (rank 0 of {world})", unit="img",
                       disable=not show_progress or rank != 0)
        ticker = Ticker(self.model, self.diffusion, bar)
        batches, bad = {}, torch.zeros((), device=self.device)
        for i in mine:
            start = starts[i]
            m = min(batch_size, n - start)
            g = batch_generator(self.device, seed, i)
            x_T = (torch.randn((m, *self.image_shape), generator=g, device=self.device) if latents is None
                   else latents[start:start + m].to(self.device))
            y = self.labels(m, g) if labels is None else labels[start:start + m].to(self.device)
            ticker.start(m)
            with self.amp:
                x = loop(self.diffusion, ticker, x_T.shape, noise=x_T, model_kwargs={} if y is None else {"y": y},
                         generator=g, **kwargs).float()
            ticker.finish()
            bad = bad + (~torch.isfinite(x)).sum()  # no host sync here: checked once, after the last batch
            batches[i] = (data.to_uint8_images(x), None if y is None else y.cpu().numpy())
        bar.close()
        bad = int(bad)
        if world > 1:  # every rank gets every rank's batches (and non-finite count): the union, in batch order
            gathered = [None] * world
            dist.all_gather_object(gathered, (batches, bad))
            batches = {i: b for part, _ in gathered for i, b in part.items()}
            bad = sum(count for _, count in gathered)
        if bad > 0:
            raise UsageError(f"sampling produced {bad} non-finite values (the sampler diverged) and nothing was "
                             f"written; {self.likely_cause()}")
        images = np.concatenate([batches[i][0] for i in range(len(starts))])
        classes = [batches[i][1] for i in range(len(starts)) if batches[i][1] is not None]
        return images, (np.concatenate(classes) if classes else None)

    def likely_cause(self):
        """The flag most likely behind a diverged sample, and what to do about it."""
        o = self.settings
        if o.sampler == "langevin":
            return "likely cause: --delta, too large a Langevin step for this network; try a smaller --delta"
        if o.sampler == "pc":
            return "likely cause: --snr, too large a corrector step for this network; try a smaller --snr"
        if o.classifier_scale is not None and o.classifier_scale > 10:
            return f"likely cause: --classifier-scale {o.classifier_scale:g}, far beyond ADM's 1-10; try a smaller s"
        if o.cfg_scale is not None and o.cfg_scale > 10:
            return f"likely cause: --cfg-scale {o.cfg_scale:g}, far beyond the usual 0-10; try a smaller w"
        if uses_bf16(self.device, self.precision):
            return "likely cause: --precision, bf16 overflowed; try --precision fp32"
        return ("likely cause: --checkpoint, whose network gives non-finite outputs (a diverged run?); try an "
                "earlier checkpoint or --no-ema")

    # -- naming ----------------------------------------------------------------------------------------------------

    def nfe(self):
        """Network evaluations per image: 2N - 1 for Heun on N kept steps (EDM Alg. 1), N for the one-call loops."""
        if self.settings.sampler == "heun":
            return 2 * self.kept - 1
        if self.settings.sampler in ("ddpm", "ddim", "dpmpp2m"):
            return self.kept
        return None  # the score samplers' count depends on their corrector / Langevin steps

    def describe(self):
        """One line for the user: 'ddim on 50 of 1000 steps, eta1, quad, cg4, class3' (+ NFE where it differs)."""
        head = f"{self.settings.sampler} on {self.kept} of {self.T} steps"
        if self.settings.sampler in ("dpmpp2m", "heun"):
            head += f" ({self.nfe()} NFE)"
        return ", ".join([head] + self.tags()[1:])

    def tags(self):
        """The parts of an output name: sampler + steps, then every setting that differs from its default."""
        o = self.settings
        tags = [f"{o.sampler}{self.steps}"]
        if o.eta != DEFAULTS.eta:
            tags.append(f"eta{o.eta:g}")
        if self.steps < self.T and self.skip != DEFAULT_SKIP.get(o.sampler, "uniform"):
            tags.append(self.skip)
        if o.var is not None:
            tags.append(f"var{o.var}")
        if not o.clip:
            tags.append("noclip")
        if o.langevin_steps != DEFAULTS.langevin_steps:
            tags.append(f"ls{o.langevin_steps}")
        if o.delta is not None:
            tags.append(f"delta{o.delta:g}")
        if o.corrector_steps != DEFAULTS.corrector_steps:
            tags.append(f"cs{o.corrector_steps}")
        if o.snr != DEFAULTS.snr:
            tags.append(f"snr{o.snr:g}")
        if o.predictor != DEFAULTS.predictor:
            tags.append(f"{o.predictor}pred")
        if self.cond_fn is not None:
            tags.append(f"cg{self.cond_fn.scale:g}")
        if o.cfg_scale is not None:
            tags.append(f"cfg{o.cfg_scale:g}")
        if o.label is not None:
            tags.append(f"class{o.label}")
        if not o.ema:
            tags.append("noema")
        return tags

    def name(self, seed=None, n=None, default_n=64, batch_size=None, default_batch_size=256, prefix=None):
        """A file name (no extension) that says what made the images: ddim50_eta1_quad_cg4_class3_seed0[_n100]."""
        parts = ([prefix] if prefix else []) + self.tags()
        if seed is not None:
            parts.append(f"seed{seed}")
        if n is not None and n != default_n:
            parts.append(f"n{n}")
        if batch_size is not None and batch_size != default_batch_size and n is not None and n > batch_size:
            parts.append(f"bs{batch_size}")  # the batch size changes the images where it splits them
        return "_".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# From a checkpoint, and to files
# ----------------------------------------------------------------------------------------------------------------

def from_checkpoint(ckpt, settings=DEFAULTS, device="cpu", precision="auto", classifier=None, compile=False):
    """A Sampler for a loaded diffusion checkpoint (checkpoint.load) and, for guidance, a loaded classifier one.
    compile: torch.compile the network (Compiled: CUDA graphs on CUDA)."""
    where = ckpt.get("path", "the checkpoint")
    # DDGAN (Xiao et al. 2022): its generator G(x_t, z, t) predicts x_0', not eps: only its own chain can draw with it,
    # and its chain needs a generator
    if (ckpt["kind"] == "ddgan") != (settings.sampler == "ddgan"):
        if ckpt["kind"] == "ddgan":
            raise UsageError(f"--sampler: {where} holds a DDGAN generator, which only --sampler ddgan draws with "
                             f"(its {ckpt['diffusion_args']['timesteps']}-step chain); pass --sampler ddgan")
        if ckpt["kind"] == "diffusion":
            raise UsageError(f"--sampler: ddgan needs a DDGAN run (python train.py --task ddgan), and {where} holds "
                             f"an eps-model; pick another --sampler")
    if ckpt["kind"] not in ("diffusion", "ddgan"):
        raise UsageError(f"--checkpoint: {where} holds a {ckpt['kind']}, not a diffusion model; pass a diffusion run "
                         "(a classifier goes to --classifier)")
    model = checkpoint.build_network(ckpt, use_ema=settings.ema, device=device)
    diffusion = checkpoint.build_diffusion(ckpt["diffusion_args"])
    args = ckpt["model_args"]
    shape = (args.get("in_channels", 3), args["image_size"], args["image_size"])
    net, classes = None, None
    if classifier is not None:
        cwhere = classifier.get("path", "the classifier")
        if classifier["kind"] != "classifier":
            raise UsageError(f"--classifier: {cwhere} holds a {classifier['kind']} network, not a noisy classifier; "
                             "train one with `python train.py --task classifier`")
        cargs, classes = classifier["model_args"], checkpoint.num_classes_of(classifier)
        own = checkpoint.num_classes_of(ckpt)
        if cargs["image_size"] != args["image_size"] or (own is not None and classes != own):
            raise UsageError(f"--classifier: {cwhere} was trained on {classes} classes of "
                             f"{cargs['image_size']}x{cargs['image_size']} images, the diffusion run on "
                             f"{own or 'unlabelled'} {args['image_size']}x{args['image_size']} images")
        net = checkpoint.build_network(classifier, device=device, flag="--classifier")
    return Sampler(model, diffusion, shape, settings, checkpoint.num_classes_of(ckpt), net, classes, device, precision,
                   compile)


def check_outputs(out, force=False, flag="--out", typed=True, hold=True):
    """The .png and .npz an output name stands for, checked and claimed before any work (outputs.claim): refused if
    either exists (without --force) or another process is writing it right now. `typed`: the user gave `flag` (a
    default name's refusal names the file and --force only); `hold` False checks without claiming (torchrun's ranks
    other than 0, which never write)."""
    return outputs.claim([out + ".png", out + ".npz"], flag, force, typed, hold)


def save_samples(images, labels, out, nrow=None, grid=None, extra=None, force=False):
    """out.png (a grid) and out.npz (`x` uint8 [N, H, W, C], `y` int64 [N] when labelled), written as a pair: both
    or neither (outputs.write: temporaries, fsynced, then named; a full disk or an interrupt leaves nothing), and
    never over an existing file unless `force`.

    The .npz is what FID tools read (evaluate.py; OpenAI's evaluator reads the same layout). `grid` (uint8
    [M, H, W, C]) replaces the images in the PNG only (sample.py --edit shows the input and mask beside them);
    `extra` adds arrays to the .npz.
    """
    import torchvision.utils  # noqa: PLC0415

    # the PNG is data.save_grid's picture (uint8 -> [0, 1], a full grid by default), written to an open file
    picture = torch.from_numpy(images if grid is None else grid).permute(0, 3, 1, 2).float() / 255.0
    columns = nrow if nrow is not None else data.grid_columns(picture.shape[0])
    arrays = {"x": images} if labels is None else {"x": images, "y": labels}
    arrays.update(extra or {})
    png, npz = outputs.write({
        out + ".png": lambda f: torchvision.utils.save_image(picture, f, nrow=columns, format="png"),
        out + ".npz": lambda f: np.savez(f, **arrays),
    }, force)
    return png, npz
