"""
The sampler menu: "sampler NAME, these settings, this guidance, on this checkpoint's network" turned into images,
the same way for every script (sample.py, evaluate.py, figures.py).

    ckpt = checkpoint.load("runs/cifar10")
    s = sampling.from_checkpoint(ckpt, sampling.Settings(sampler="ddim", steps=50), device="cpu")
    batches = s.batches(n=64, batch_size=256, seed=0)
    for b in batches:   # the chosen loop on every step of the respaced diffusion (D4)
        b.x0 = s.loop(s.diffusion, batches.model, b.x_T.shape, noise=b.x_T, model_kwargs=b.model_kwargs,
                      generator=b.generator, **s.options)
    images, labels = batches.images()                               # uint8 [64, 32, 32, 3], None

THE MENU (SAMPLERS) has one written-out entry per sampler: its library loop, the settings it takes, whether it takes
classifier guidance, and its paper's default steps and step schedule. Every loop has one signature,
`loop(diffusion, model, shape, noise=, model_kwargs=, generator=, **options)`, and runs on EVERY step of the
diffusion it is given, so the one rule for respacing lives here: the checkpoint's diffusion is respaced to --steps
with --skip (DDIM §4.2, D4) and the loop walks all of its steps. A setting the chosen sampler does not take is
refused, never silently ignored. Each setting is declared once, in `Settings`: its flag, help and name tag.

GUIDANCE (guidance.py) wraps the network or adds a cond_fn; the loops never know which: classifier guidance (ADM,
G1-G3) is cond_fn = s grad_x log p_phi(y | x_t); classifier-free guidance (G5) is eps~ = (1 + w) eps(x_t, y) - w eps(x_t).

BATCHES AND SEEDS. Batch i draws x_T, its labels and every step's noise from its own generator, seeded with
(seed, i): the same seed and batch size give the same images on the same device. Under torchrun, rank r draws
batches r, r + W, ...; every rank gets the union back, in batch order, and rank 0 alone writes files.

Everything is checked before any work (a UsageError naming the flag); the images are checked once, at the end:
non-finite values are refused with their likely cause instead of being written as black pictures.
"""

import dataclasses
import os
from typing import Callable

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


@dataclasses.dataclass(frozen=True)
class Entry:
    """One sampler of the menu: its loop, the Settings it takes (passed to the loop under their `keyword`),
    whether it takes a cond_fn (classifier guidance), its default --steps (None: all T) and --skip."""
    loop: Callable
    options: tuple = ()
    guided: bool = False
    steps: int = 50
    skip: str = "uniform"


# "clip": the loop clips its predicted x_0 to [-1, 1] (R2) unless --no-clip. The default steps are each paper's: all T
# for Algorithm 2 and DDGAN's own chain, 100 noise levels for the score samplers, DPM-Solver's 20 NFE (logSNR steps),
# EDM's N = 18 (Karras steps).
SAMPLERS = {
    # DDPM Algorithm 2 (A2): ancestral sampling, sigma_t^2 per R3
    "ddpm": Entry(GaussianDiffusion.p_sample_loop, ("clip",), guided=True, steps=None),
    # DDIM eq. 12 (D2) with sigma_t(eta) of eq. 16 (D3)
    "ddim": Entry(ddim.ddim_sample_loop, ("eta", "clip"), guided=True),
    # annealed Langevin dynamics, NCSN Algorithm 1, on the eps-model's score (SC2)
    "langevin": Entry(score.langevin_sample_loop, ("langevin_steps", "delta", "clip"), guided=True, steps=100),
    # predictor-corrector, SDE paper App. G, Algorithms 1 and 5
    "pc": Entry(score.pc_sample_loop, ("corrector_steps", "snr", "predictor", "eta", "clip"), guided=True, steps=100),
    # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (P1): one network call per step
    "dpmpp2m": Entry(solvers.dpmpp2m_sample_loop, ("clip",), steps=20, skip="logsnr"),
    # EDM's Heun, Karras et al. 2022, Algorithm 1 (P1): 2N - 1 network calls on N steps
    "heun": Entry(solvers.heun_sample_loop, ("clip",), steps=18, skip="karras"),
    # DDGAN eq. 6 (DG4): x_0' = G(x_t, z, t), then q(x_{t-1} | x_t, x_0'), on all T steps its generator learned
    "ddgan": Entry(ddgan.ddgan_sample_loop, ("clip",), steps=None),
}

# --skip: name -> kept indices (0..T-1) for `steps` steps of a diffusion with these abar (D4, P3)
STEP_SCHEDULES = {
    # D4, DDIM §4.2: tau_i = floor(i T / S)
    "uniform": lambda abar, steps: schedules.space_timesteps(len(abar), steps, "uniform"),
    # D4, DDIM App. D: tau_i = floor((i sqrt(0.8 T) / (S - 1))^2), dense at low noise
    "quad": lambda abar, steps: schedules.space_timesteps(len(abar), steps, "quad"),
    # P3, DPM-Solver §3.4 ("logSNR"): lambda = log(alpha / sigma) uniform between the noisiest and cleanest step
    "logsnr": schedules.logsnr_timesteps,
    # P3, EDM eq. 5: sigma_i = (sigma_max^(1/7) + i/(N-1) (sigma_min^(1/7) - sigma_max^(1/7)))^7
    "karras": schedules.karras_timesteps,
}

# --var: the fixed reverse variance of DDPM §3.2 (R3), for the samplers that draw from p(x_{t-1} | x_t)
VARIANCE_FLAGS = {"large": "fixed_large", "small": "fixed_small"}


def setting(default, flag, help, tag=None, keyword=None, **argparse_kwargs):
    """A field of Settings and everything about it, in one place: its flag (and argparse's type/choices/action),
    its help, the loop keyword it is passed as (default: its own name) and its tag in output names (a format of the
    value, used when the value is not the default; None: never in the name)."""
    meta = dict(flag=flag, help=help, tag=tag, keyword=keyword, argparse=argparse_kwargs)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides what a sampler draws, besides the network and the seed: one field per flag."""
    sampler: str = setting("ddim", "--sampler", choices=tuple(SAMPLERS), help=(
        "ddpm: ancestral sampling (DDPM Algorithm 2); ddim: DDIM eq. 12; langevin: annealed Langevin dynamics (NCSN "
        "Algorithm 1); pc: predictor-corrector (SDE paper Algorithm 1); dpmpp2m: DPM-Solver++(2M) (Lu et al. 2022, "
        "Algorithm 2); heun: EDM's 2nd-order Heun ODE solver (Karras et al. 2022, Algorithm 1); ddgan: a DDGAN "
        "run's few-step chain"))
    steps: int = setting(None, "--steps", type=int, help=(
        "steps of the respaced diffusion the sampler walks (default: 50; all T for ddpm and ddgan; 100 noise levels "
        "for langevin and pc; 20 for dpmpp2m; 18 for heun). Network evaluations (NFE): one per step for ddpm, ddim "
        "and dpmpp2m; 2N - 1 for heun with N steps (its last step is Euler)"))
    eta: float = setting(0.0, "--eta", type=float, tag="eta{:g}", help=(
        "ddim (and pc --predictor ddim): sigma_t = eta * DDPM's posterior std (DDIM eq. 16); 0 = deterministic "
        "DDIM, 1 = DDPM-like"))
    skip: str = setting(None, "--skip", choices=tuple(STEP_SCHEDULES), help=(
        "which of the T steps a respaced diffusion keeps: evenly spaced (uniform) or quadratic, dense at low noise "
        "(quad), DDIM §4.2; uniform in log-SNR (logsnr, DPM-Solver); EDM's rho = 7 noise levels (karras, EDM eq. 5) "
        "(default: logsnr for dpmpp2m, karras for heun, else uniform)"))
    var: str = setting(None, "--var", tag="var{}", choices=tuple(VARIANCE_FLAGS), help=(
        "ddpm and pc on a fixed-variance run: sigma_t^2 = beta_t (large) or beta~_t (small), DDPM §3.2 (default: "
        "the run's own, large)"))
    clip: bool = setting(True, "--no-clip", tag="noclip", keyword="clip_denoised", action="store_false",
                         help="do not clip the predicted x_0 to [-1, 1] (default: clip)")
    langevin_steps: int = setting(2, "--langevin-steps", type=int, tag="ls{}",
                                  help="langevin: Langevin steps per noise level (NCSN Algorithm 1's T)")
    delta: float = setting(None, "--delta", type=float, tag="delta{:g}", help=(
        "langevin: step size at the smallest noise level sigma_L (NCSN's epsilon), below 4 sigma_L^2 (default: "
        "sigma_L^2)"))
    corrector_steps: int = setting(1, "--corrector-steps", type=int, tag="cs{}",
                                   help="pc: Langevin corrector steps per level (SDE Algorithm 1's M; 0 = predictor only)")
    snr: float = setting(0.16, "--snr", type=float, tag="snr{:g}",
                         help="pc: signal-to-noise ratio r of the corrector step (SDE Algorithm 5)")
    predictor: str = setting("ddpm", "--predictor", tag="{}pred", choices=score.PREDICTORS,
                             help="pc: the predictor step, ancestral (ddpm) or DDIM with --eta")
    classifier_scale: float = setting(None, "--classifier-scale", type=float, help=(
        "s in eps - sqrt(1 - abar_t) s grad log p(y | x_t) (ADM Algorithms 1-2) (default: 1 with --classifier)"))
    cfg_scale: float = setting(None, "--cfg-scale", type=float, tag="cfg{:g}", help=(
        "w in (1 + w) eps(x_t, y) - w eps(x_t) (classifier-free guidance, Ho & Salimans eq. 6; class-conditional "
        "runs)"))
    label: int = setting(None, "--class", type=int, tag="class{}", help=(
        "the class of every image, for a class-conditional run or classifier guidance (default: a random class per "
        "image)"))
    ema: bool = setting(True, "--no-ema", tag="noema", action="store_false",
                        help="sample from the raw weights instead of their EMA (default: EMA)")


SETTINGS = dataclasses.fields(Settings)


# ----------------------------------------------------------------------------------------------------------------
# The flags of the menu (sample.py, evaluate.py fid and figures.py share them)
# ----------------------------------------------------------------------------------------------------------------

def add_arguments(p):
    """Every Settings field as a flag of parser (or group) p, plus --classifier, --precision and --compile.
    Returns their argparse actions (evaluate.py refuses them without --checkpoint)."""
    actions = [p.add_argument(f.metadata["flag"], dest=f.name, default=f.default, help=f.metadata["help"],
                              **f.metadata["argparse"]) for f in SETTINGS]
    return actions + [
        p.add_argument("--classifier", default=None,
                       help="noisy classifier (a run trained with --task classifier) for classifier guidance (ADM §4)"),
        p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                       help="auto: bf16 autocast on CUDA, fp32 on a CPU"),
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the network (on CUDA also replayed as a CUDA graph): the same images up to "
                            "round-off, faster after a first call that compiles (tens of seconds); needs a C compiler"),
    ]


def settings_from_args(args):
    """Settings from the flags of add_arguments."""
    return Settings(**{f.name: getattr(args, f.name) for f in SETTINGS})


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


class StepProgress(nn.Module):
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
    """A checkpoint's network, its respaced diffusion, the guidance and the settings: what a loop needs.

    model:       the eps-network (UNet) in eval mode; num_classes: its classes (None: unconditional).
    diffusion:   the diffusion it was trained with (checkpoint.build_diffusion); respaced here to settings.steps.
    image_shape: (C, H, W) of one image.
    classifier:  a noisy classifier (EncoderUNet) for classifier guidance, or None; classifier_classes: its classes.
    Every setting is checked first (UsageError naming the flag), before any work. After that, `loop`, `diffusion`,
    `model` and `options` are exactly what the chosen sampler is called with.
    """

    def __init__(self, model, diffusion, image_shape, settings=Settings(), num_classes=None, classifier=None,
                 classifier_classes=None, device="cpu", precision="auto", compile=False):
        self.settings, self.image_shape, self.num_classes = settings, tuple(image_shape), num_classes
        # the labels: the network's classes, or (classifier guidance on an unconditional network) the classifier's
        self.classes = num_classes if num_classes is not None else classifier_classes
        self.device, self.precision = torch.device(device), precision
        self.amp = autocast(self.device, precision)
        if settings.sampler not in SAMPLERS:
            raise UsageError(f"--sampler: unknown {settings.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        self.entry = SAMPLERS[settings.sampler]
        self.loop = self.entry.loop
        self.T = diffusion.num_timesteps
        self.steps = settings.steps if settings.steps is not None else min(self.entry.steps or self.T, self.T)
        self.skip = settings.skip if settings.skip is not None else self.entry.skip
        self.check_settings(diffusion, classifier)
        self.diffusion = self.respaced(diffusion)
        self.kept = self.diffusion.num_timesteps
        self.check_ranges()

        # --compile: the network itself is compiled (guidance's arithmetic around it stays eager); once only, so that
        # samplers built on one compiled network share its graphs (evaluate.py's table)
        self.latent_dim = getattr(model, "latent_dim", None)  # a DDGAN generator's nz
        if compile and not isinstance(model, Compiled):
            model = Compiled(model, self.device)
        # guidance: wrap the network (G5) and/or add a cond_fn (G3); the loop does not know which
        self.model, self.cond_fn = model, None
        if settings.cfg_scale is not None:
            self.model = ClassifierFreeGuidance(model, settings.cfg_scale, null_class=num_classes)
        if classifier is not None:
            scale = 1.0 if settings.classifier_scale is None else settings.classifier_scale
            self.cond_fn = classifier_cond_fn(classifier, scale)
            if num_classes is None:
                self.model = IgnoreLabels(model)  # y is for the classifier only
        self.conditional = num_classes is not None or classifier is not None
        self.options = self.loop_options()

    def respaced(self, diffusion):
        """The diffusion the loop walks: --var's fixed variance, respaced ONCE to --steps by --skip (D4)."""
        if self.settings.var is not None:
            diffusion = GaussianDiffusion(diffusion.betas, VARIANCE_FLAGS[self.settings.var], diffusion.loss_type,
                                          diffusion.timestep_map)
        if self.steps == self.T:
            return diffusion
        try:
            kept = STEP_SCHEDULES[self.skip](diffusion.alphas_cumprod, self.steps)
        except ValueError as e:  # quad cannot place that many distinct steps
            raise UsageError(f"--steps: {e}") from None
        respaced = diffusion.respace(kept)
        # logsnr and karras merge targets that round to the same level of the T: say so, never hide it
        if respaced.num_timesteps < self.steps:
            say(f"note: --skip {self.skip}: {self.steps} steps round to {respaced.num_timesteps} distinct levels of "
                f"the T = {self.T} (the low-noise end is denser than one step); sampling on {respaced.num_timesteps}")
        return respaced

    def loop_options(self):
        """The settings the chosen loop takes, under its keyword names, and the cond_fn of classifier guidance."""
        options = {}
        for f in SETTINGS:
            if f.name in self.entry.options:
                options[f.metadata["keyword"] or f.name] = getattr(self.settings, f.name)
        if self.settings.sampler == "ddgan":
            options["latent_dim"] = self.latent_dim  # the generator's nz, a property of the network
        if self.cond_fn is not None:
            options["cond_fn"] = self.cond_fn
        return options

    # -- checks (each names its flag and the fix) ------------------------------------------------------------------

    def check_settings(self, diffusion, classifier):
        """What can be checked against the checkpoint before respacing."""
        o, defaults = self.settings, Settings()
        check_number("--steps", self.steps, lo=1, hi=self.T, integer=True)
        if self.skip not in STEP_SCHEDULES:
            raise UsageError(f"--skip: unknown {self.skip!r}; choose one of {', '.join(STEP_SCHEDULES)}")
        for f in SETTINGS:
            takers = [name for name, entry in SAMPLERS.items() if f.name in entry.options]
            if takers and getattr(o, f.name) != f.default and f.name not in self.entry.options:
                raise UsageError(f"{f.metadata['flag']}: the {o.sampler} sampler has no such setting (it is for "
                                 f"{', '.join(takers)}); drop {f.metadata['flag']}")
        if o.sampler == "ddgan" and self.steps != self.T:
            # DDGAN's G learned the T large steps of its own schedule (DDGAN §3.1): a respaced chain is not its model
            raise UsageError(f"--steps: the ddgan sampler walks all T = {self.T} steps its generator was trained on; "
                             f"drop --steps or pass --steps {self.T}")
        if o.sampler == "pc" and o.predictor != "ddim" and o.eta != defaults.eta:
            raise UsageError("--eta: pc uses eta only with --predictor ddim; add it or drop --eta")
        if o.var is not None:
            if diffusion.var_type == "learned_range":
                raise UsageError("--var: this run learned its variance (iDDPM eq. 15); drop --var")
            if not (o.sampler == "ddpm" or (o.sampler == "pc" and o.predictor == "ddpm")):
                raise UsageError(f"--var: only ancestral steps (ddpm, pc --predictor ddpm) draw with sigma_t^2; "
                                 f"{o.sampler} does not: drop --var")
        self.check_guidance(classifier)
        check_number("--langevin-steps", o.langevin_steps, lo=1, integer=True)
        check_number("--corrector-steps", o.corrector_steps, lo=0, integer=True)
        check_number("--snr", o.snr, lo=0, lo_open=True)

    def check_guidance(self, classifier):
        o = self.settings
        if o.classifier_scale is not None:
            check_number("--classifier-scale", o.classifier_scale, lo=0)
            if classifier is None:
                raise UsageError("--classifier-scale: classifier guidance needs --classifier RUN (a run trained with "
                                 "--task classifier)")
        if classifier is not None:
            if self.classes is None:
                raise ValueError("classifier_classes: give the classifier's number of classes")
            if not self.entry.guided:
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

    def labels(self, n, generator):
        """The class of each image: --class, or uniform labels sorted so that a grid is laid out by class."""
        if not self.conditional:
            return None
        if self.settings.label is not None:
            return torch.full((n,), self.settings.label, dtype=torch.long, device=self.device)
        y = torch.randint(0, self.classes, (n,), generator=generator, device=generator.device)
        return y.sort().values.to(self.device)

    def batches(self, n, batch_size=256, seed=0, show_progress=True, latents=None, labels=None, desc="sampling",
                draw_x_T=True):
        """This process's batches of n images (Batches: iterate, set each batch's x0, then .images()).
        draw_x_T=False: the batches carry no x_T (an edit starts from a picture), their generators untouched."""
        return Batches(self, n, batch_size, seed, show_progress, latents, labels, desc, draw_x_T)

    def generate(self, n, batch_size=256, seed=0, show_progress=True, latents=None, labels=None, desc="sampling"):
        """n images as uint8 numpy [n, H, W, C] and their labels (int64 numpy [n], or None): every batch's x_T
        through the chosen loop on every step of the respaced diffusion. `latents` / `labels` (tensors [n, ...])
        replace the drawn x_T / labels (interpolation, inversion)."""
        batches = self.batches(n, batch_size, seed, show_progress, latents, labels, desc)
        for b in batches:
            with self.amp:
                b.x0 = self.loop(self.diffusion, batches.model, b.x_T.shape, noise=b.x_T,
                                 model_kwargs=b.model_kwargs, generator=b.generator, **self.options)
        return batches.images()

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

    def describe(self, steps=None):
        """One line for the user: 'ddim on 50 of 1000 steps, eta1, quad, cg4, class3' (+ NFE where it differs).
        `steps`: the steps actually run, when fewer than the chain's (an edit starts part-way down)."""
        ran = self.kept if steps is None else steps
        head = f"{self.settings.sampler} on {ran} of {self.T} steps"
        if steps is not None and steps != self.kept:
            head += f" (from t0 of a {self.kept}-step chain)"
        if self.settings.sampler in ("dpmpp2m", "heun"):
            head += f" ({self.nfe()} NFE)"
        return ", ".join([head] + self.tags()[1:])

    def tags(self):
        """The parts of an output name: sampler + steps, then every setting that differs from its default."""
        o = self.settings
        tags = [f"{o.sampler}{self.steps}"]
        for f in SETTINGS:
            value = getattr(o, f.name)
            if f.name == "skip":  # the step schedule, where it is not the sampler's own
                if self.steps < self.T and self.skip != self.entry.skip:
                    tags.append(self.skip)
            elif f.name == "classifier_scale":  # classifier guidance: the scale in use, whenever there is one
                if self.cond_fn is not None:
                    tags.append(f"cg{self.cond_fn.scale:g}")
            elif f.metadata["tag"] and value != f.default:
                tags.append(f.metadata["tag"].format(value))
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


@dataclasses.dataclass
class Batch:
    """One batch: its index, size, x_T, model_kwargs (the labels) and generator; the caller sets x0, the loop's
    output."""
    index: int
    size: int
    x_T: torch.Tensor
    model_kwargs: dict
    generator: torch.Generator
    x0: torch.Tensor = None


class Batches:
    """This process's batches of an n-image call, each with its own generator (seed, i), a bar counting images, and
    the check and gathering of the results.

    Iterating yields Batch objects; the caller runs a loop and sets `batch.x0` (floats in [-1, 1]). `model` is the
    network to call: the sampler's, with the bar moved along as the batch walks down the levels (StepProgress).
    `images()` returns all n images (uint8 numpy [n, H, W, C]) and labels in batch order, on every rank: under
    torchrun rank r runs batches r, r + W, ... and the ranks exchange them (all_gather_object of uint8 arrays).
    Non-finite values are counted on the device and checked once, at the end, with their likely cause.
    """

    def __init__(self, sampler, n, batch_size, seed, show_progress, latents, labels, desc, draw_x_T=True):
        import torch.distributed as dist  # noqa: PLC0415
        self.sampler, self.n, self.seed, self.desc = sampler, n, seed, desc
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.latents, self.given_labels, self.draw_x_T = latents, labels, draw_x_T
        self.starts = list(range(0, n, batch_size))
        self.batch_size = batch_size
        self.mine = [i for i in range(len(self.starts)) if i % self.world == self.rank]  # batch i on rank i % W
        share = sum(self.size(i) for i in self.mine)
        self.bar = progress(share, desc if self.world == 1 else f"{desc} (rank 0 of {self.world})", unit="img",
                            disable=not show_progress or self.rank != 0)
        self.model = StepProgress(sampler.model, sampler.diffusion, self.bar)
        self.done, self.bad = {}, torch.zeros((), device=sampler.device)

    def size(self, i):
        return min(self.batch_size, self.n - self.starts[i])

    def __iter__(self):
        s = self.sampler
        for i in self.mine:
            start, m = self.starts[i], self.size(i)
            g = batch_generator(s.device, self.seed, i)
            x_T = (self.latents[start:start + m].to(s.device) if self.latents is not None
                   else torch.randn((m, *s.image_shape), generator=g, device=s.device) if self.draw_x_T else None)
            y = s.labels(m, g) if self.given_labels is None else self.given_labels[start:start + m].to(s.device)
            batch = Batch(i, m, x_T, {} if y is None else {"y": y}, g)
            self.model.start(m)
            yield batch
            self.model.finish()
            x = batch.x0.float()
            self.bad = self.bad + (~torch.isfinite(x)).sum()  # no host sync here: checked once, after the last batch
            self.done[i] = (data.to_uint8_images(x), None if y is None else y.cpu().numpy())
        self.bar.close()

    def images(self):
        """All n images and their labels (or None), in batch order; non-finite results are refused here."""
        import torch.distributed as dist  # noqa: PLC0415
        batches, bad = self.done, int(self.bad)
        if self.world > 1:  # every rank gets every rank's batches (and non-finite count): the union, in batch order
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (batches, bad))
            batches = {i: b for part, _ in gathered for i, b in part.items()}
            bad = sum(count for _, count in gathered)
        if bad > 0:
            raise UsageError(f"{self.desc} produced {bad} non-finite values (the chain diverged) "
                             f"and nothing was written; {self.sampler.likely_cause()}")
        images = np.concatenate([batches[i][0] for i in range(len(self.starts))])
        classes = [batches[i][1] for i in range(len(self.starts)) if batches[i][1] is not None]
        return images, (np.concatenate(classes) if classes else None)


# ----------------------------------------------------------------------------------------------------------------
# From a checkpoint, and to files
# ----------------------------------------------------------------------------------------------------------------

def from_checkpoint(ckpt, settings=Settings(), device="cpu", precision="auto", classifier=None, compile=False):
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

    # the PNG is data.save_grid's picture (uint8 -> [0, 1], small images enlarged, a full grid by default), written
    # to an open file
    picture = data.readable(torch.from_numpy(images if grid is None else grid).permute(0, 3, 1, 2).float() / 255.0)
    columns = nrow if nrow is not None else data.grid_columns(picture.shape[0])
    arrays = {"x": images} if labels is None else {"x": images, "y": labels}
    arrays.update(extra or {})
    png, npz = outputs.write({
        out + ".png": lambda f: torchvision.utils.save_image(picture, f, nrow=columns, format="png"),
        out + ".npz": lambda f: np.savez(f, **arrays),
    }, force)
    return png, npz
