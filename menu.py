"""
The sampler menu: one written-out entry per sampler (its library loop, the settings it takes, whether it takes
classifier guidance, its paper's default steps and step schedule), the step schedules of --skip, and `Settings`, in
which each setting is declared once: its flag, help, the loop keyword it is passed as, and its tag in output names.

Every loop has one signature, `loop(diffusion, model, shape, noise=, model_kwargs=, generator=, **options)`, and runs
on EVERY step of the diffusion it is given; sampling.Sampler respaces the checkpoint's diffusion to --steps with
--skip (DDIM §4.2, D4) and calls the chosen entry's loop on it. A setting the chosen sampler does not take is refused,
never silently ignored: `SettingChecks` (the Sampler's checks, each a one-line UsageError naming its flag and the
fix) is here, beside the settings it checks.
"""

import dataclasses
from typing import Callable

import ddgan
import ddim
import schedules
import score
import solvers
from cli import UsageError, check_number, uses_bf16
from ddpm import GaussianDiffusion


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
# What each setting allows (each check names its flag and the fix)
# ----------------------------------------------------------------------------------------------------------------

class SettingChecks:
    """The checks of sampling.Sampler, which inherits them: they read its settings, entry, steps, skip, T, classes,
    num_classes, diffusion, device and precision. Every setting is checked before any work."""

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
        # per noise level: NCSN takes 100, the SDE paper 1; 10^4 times T network calls would not finish
        check_number("--langevin-steps", o.langevin_steps, lo=1, hi=10_000, integer=True)
        check_number("--corrector-steps", o.corrector_steps, lo=0, hi=10_000, integer=True)
        check_number("--snr", o.snr, lo=0, hi=100, lo_open=True)

    def check_guidance(self, classifier):
        o = self.settings
        if o.classifier_scale is not None:
            check_number("--classifier-scale", o.classifier_scale, lo=0, hi=1e6)  # beyond: eps overflows
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
            check_number("--cfg-scale", o.cfg_scale, lo=0, hi=1e6)  # beyond: eps overflows
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
