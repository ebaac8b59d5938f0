"""
What a training run needs that DDPM's Algorithm 1 does not. train.py parses the flags, builds the networks and takes
the steps; this module keeps the run safe, resumable and visible around them, and knows nothing of how a step is
taken.

THE RUN FOLDER (--out, default runs/<dataset>) holds ckpt.pt, metrics.jsonl, samples.png, loss.png, config.json and
train.lock, the lock a second run into the folder is refused by (README.md, "What a run folder holds").

NEVER LOSE WORK, NEVER KEEP BAD WORK:
  * every save is checked first: a non-finite loss or weight, or weights whose loss on a fixed probe batch has
    exploded (a diverging step can leave finite but useless weights), stop the run (exit 1) without saving; the
    message names the last good checkpoint and the command that resumes it with a lower learning rate;
  * SIGINT (Ctrl-C) and SIGTERM finish the current step, save, and print the command that resumes (exit 130 / 143);
    a second Ctrl-C stops at once;
  * a failed save (a full disk) removes its partial file and stops with one line (exit 1), the previous checkpoint
    intact; temporary files of dead writers are removed when a run starts;
  * --resume continues bit for bit (weights, optimizer, EMA, data order, random state); metrics.jsonl is cut back to
    the checkpoint's step. Optimisation flags may change on --resume (said, and kept in config.json); flags that would
    change the network, the data or the random stream are refused;
  * under torchrun every rank takes every decision (save, sample, stop) at the same step.

What is where:
    RunFolder  the folder: its lock, the refusal of another run's files, metrics.jsonl, config.json's history
    Training   what a run trains (networks, optimizers, EMA, diffusion, data order): what a checkpoint holds
    Clock      the wall clock: the --max-minutes deadline, the last save and grid, the measured step and save times
    Signals    SIGINT / SIGTERM: the first finishes the step and saves, a second stops at once
    StepEnd    what a step ends with: a save, a grid, an evaluation, a stop (and why)
    Probe      a fixed batch whose loss proves weights sane before they are saved (the divergence check)
    Run        one process's run: resume, announcements, the stages of train.py's loop other than the step
               (end_of_step, log, save, sample_grid, evaluate_classifier), and the end (finish, close)
"""

import argparse
import contextlib
import fcntl
import json
import math
import os
import shlex
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg  # loss.png, drawn without a display
from matplotlib.figure import Figure

import checkpoint
import cli
import data
import ddgan
from cli import UsageError, say
from ddim import ddim_sample_loop
from guidance import classifier_accuracy_at, noisy_classifier_loss

GRID_STEPS = 50          # the sample grid: DDIM with 50 steps (DDIM §5: close to 1000-step DDPM quality)
LEAST_GRID, LEAST_GRID_STEPS = 4, 10  # the smallest grid a run draws when it promised one: 4 images, DDIM-10
EXTRA_MIN_SECONDS = 20   # a grid or an accuracy check may take max(this, 5% of the run so far), shrunk to fit
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "config.json", "samples.png", "loss.png")

# On --resume these flags may change: the run goes on with the new value and config.json records the change.
CHANGEABLE = ("steps", "lr", "warmup", "weight_decay", "grad_clip", "ema", "p_uncond", "max_minutes", "log_every",
              "save_every", "save_minutes", "sample_every", "sample_minutes", "n_sample", "eval_every", "precision",
              "compile", "lr_d", "tensorboard")
# These belong to one process, not to the run (never saved, never compared).
RUNTIME = ("out", "resume", "device", "no_progress", "config")
# Every other flag defines the network, the diffusion, the data or the random stream: --resume refuses a change.


class RunFailed(Exception):
    """The run cannot go on (it diverged, or a save failed): one line, exit 1."""


# ----------------------------------------------------------------------------------------------------------------
# The flags of a resumed run
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# The flags, checked
# ----------------------------------------------------------------------------------------------------------------

# upper bounds of train.py's flags: what fits in memory and finishes, far above any recipe (the fix: a smaller value).
# --lr up to 1e6: a rate that makes the run diverge is the divergence probe's to report (one line, nothing saved)
UPPER_BOUNDS = {"--steps": cli.MAX_STEPS, "--warmup": cli.MAX_STEPS, "--log-every": cli.MAX_STEPS,
                "--save-every": cli.MAX_STEPS, "--sample-every": cli.MAX_STEPS, "--eval-every": cli.MAX_STEPS,
                "--batch-size": cli.MAX_BATCH, "--n-sample": 10_000, "--image-size": cli.MAX_IMAGE_SIZE,
                "--synthetic-n": cli.MAX_IMAGES, "--ch": 4096, "--num-res-blocks": 64, "--num-heads": 4096,
                "--lr": 1e6, "--weight-decay": 100.0, "--grad-clip": 1e6, "--max-minutes": 1e7,
                "--save-minutes": 1e7, "--sample-minutes": 1e7}
AT_LEAST_ONE = ("--steps", "--log-every", "--save-every", "--eval-every", "--batch-size", "--image-size",
                "--synthetic-n", "--ch", "--num-res-blocks", "--num-heads")


def check_upper_bounds(args):
    """UPPER_BOUNDS, and synthetic data that fits in memory: one line naming the flag."""
    for flag, hi in UPPER_BOUNDS.items():
        cli.check_number(flag, getattr(args, flag[2:].replace("-", "_")), 1 if flag in AT_LEAST_ONE else 0, hi,
                         integer=isinstance(hi, int))
    gib = args.synthetic_n * 3 * args.image_size ** 2 / 2 ** 30
    if gib > 16:
        raise UsageError(f"--synthetic-n: {args.synthetic_n} images of {args.image_size}x{args.image_size} take "
                         f"{gib:.0f} GiB; generate fewer")


def check_args(args):
    """Every number and combination a train.py flag can get wrong: one line naming the flag, before any work (and
    again after --resume takes the checkpoint's flags)."""
    num = cli.check_number
    cli.check_names([("--data-dir", args.data_dir), ("--out", args.out)])
    num("--lr", args.lr, 0, lo_open=True)
    num("--dropout", args.dropout, 0, 1, hi_open=True)
    num("--p-uncond", args.p_uncond, 0, 1, hi_open=True)
    num("--ema", args.ema, 0, 1, hi_open=True)
    cli.check_seed("--seed", args.seed)  # torch seeds are 64-bit; ranks add 1000 x rank
    num("--diffusion-steps", args.diffusion_steps, 1, 100_000)  # DDPM 1000, iDDPM 4000; more is a typo
    for flag in ("--weight-decay", "--grad-clip", "--max-minutes", "--save-minutes", "--sample-minutes", "--warmup",
                 "--sample-every", "--n-sample"):
        num(flag, getattr(args, flag[2:].replace("-", "_")), 0)
    for flag in ("--steps", "--batch-size", "--diffusion-steps", "--ch", "--num-res-blocks", "--image-size",
                 "--log-every", "--save-every", "--eval-every", "--synthetic-n", "--num-heads"):
        num(flag, getattr(args, flag[2:].replace("-", "_")), 1)
    check_upper_bounds(args)
    mult = cli.parse_ints(args.ch_mult, "--ch-mult")
    if not mult or min(mult) < 1 or max(mult) > 64 or len(mult) > 12:
        raise UsageError(f"--ch-mult: expected up to 12 integers from 1 to 64 like 1,2,2,2, got {args.ch_mult!r}")
    if args.image_size % 2 ** (len(mult) - 1):
        raise UsageError(f"--image-size: {args.image_size} must be divisible by 2^{len(mult) - 1} for --ch-mult "
                         f"{args.ch_mult}; pick a multiple of {2 ** (len(mult) - 1)}")
    resolutions = [args.image_size // 2 ** i for i in range(len(mult))]
    attn = cli.parse_ints(args.attn, "--attn")
    for r in attn:
        if r not in resolutions:
            raise UsageError(f"--attn: {r} is not a resolution of this network ({', '.join(map(str, resolutions))}); "
                             f"pick among them or pass --attn ''")
    # attention runs at the --attn levels and always in the middle block (at the lowest resolution)
    widths = sorted({args.ch * m for m, r in zip(mult, resolutions) if r in attn} | {args.ch * mult[-1]})
    if args.num_head_channels == -1:
        if any(w % args.num_heads for w in widths):
            raise UsageError(f"--num-heads: {args.num_heads} heads do not divide the attention widths "
                             f"{widths}; pick a divisor of {math.gcd(*widths)}")
    elif args.num_head_channels < 1 or any(w % args.num_head_channels for w in widths):
        raise UsageError(f"--num-head-channels: {args.num_head_channels} does not divide the attention widths "
                         f"{widths}; pick a divisor of {math.gcd(*widths)} or -1 (use --num-heads)")
    if args.task in ("classifier", "ddgan"):
        for flag, value, default in (("--class-cond", args.class_cond, False), ("--loss", args.loss, "mse"),
                                     ("--t-sampler", args.t_sampler, "uniform")):
            if value != default:
                raise UsageError(f"{flag}: applies to --task diffusion only; drop it for --task {args.task}")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out: empty; give a run folder, or leave --out out for runs/<dataset>")
    if args.task == "ddgan":
        num("--lr-d", args.lr_d, 0, 1, lo_open=True)
        num("--r1-gamma", args.r1_gamma, 0, 1e6)
        for flag, hi in (("--latent-dim", 4096), ("--d-ch", 4096), ("--lazy-reg", cli.MAX_STEPS)):
            num(flag, getattr(args, flag[2:].replace("-", "_")), 1, hi, integer=True)
        if args.compile:  # R1 differentiates D's gradient: torch.compile has no double backward
            raise UsageError("--compile: --task ddgan trains eagerly (R1 needs a double backward); drop --compile")
        if args.grad_clip > 0:  # ddgan.ddgan_train_step steps its optimizers itself, unclipped, as the paper
            raise UsageError("--grad-clip: --task ddgan does not clip gradients (nor does the paper); drop --grad-clip")
    if args.dataset == "synthetic" and args.data_dir is not None:
        raise UsageError("--data-dir: --dataset synthetic generates its images; drop --data-dir")
    if args.compile:
        cli.check_compiler()
    if args.tensorboard:
        check_tensorboard()


def gather_all(t, losses):
    """Every rank's (t, loss) pairs, so every rank's importance sampler keeps the same history."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, losses
    n = dist.get_world_size()
    ts, ls = [torch.empty_like(t) for _ in range(n)], [torch.empty_like(losses) for _ in range(n)]
    dist.all_gather(ts, t)
    dist.all_gather(ls, losses)
    return torch.cat(ts), torch.cat(ls)


def on_device(net, device):
    """The network on the device; on CUDA in channels_last, cuDNN's fast layout for bf16 convolutions."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def discriminator_args_of(args, channels):
    """D(x_{t-1}, x_t, t) of --task ddgan: unet.EncoderUNet on the pair concatenated along the channels (2C in), one
    logit out (DDGAN §3.2), --d-ch base channels, G's resolutions and blocks, average pooling and no attention (their
    CIFAR-10 discriminator is a plain ResNet; R1's double backward through attention would also need the slow
    math kernel)."""
    return dict(image_size=args.image_size, in_channels=2 * channels, ch=args.d_ch,
                ch_mult=tuple(cli.parse_ints(args.ch_mult, "--ch-mult")), num_res_blocks=args.num_res_blocks,
                attn_resolutions=(), dropout=0.0, use_scale_shift_norm=args.scale_shift_norm, out_dim=1,
                pool="adaptive")


def check_tensorboard():
    """--tensorboard needs the tensorboard package (optional): one line naming the install, before any work."""
    try:
        import tensorboard  # noqa: F401, PLC0415
    except ImportError:
        raise UsageError("--tensorboard: tensorboard is not installed; pip install tensorboard, or drop "
                         "--tensorboard (metrics.jsonl and samples.png hold the same)") from None


def dests(parser):
    """The dest names of every flag of `parser` (the attributes of its namespace)."""
    return set(vars(parser.parse_args([])))


def given_flags(parser, argv):
    """The flags the user typed (their dest names): argparse fills a default only where the namespace has nothing,
    so a namespace pre-filled with a sentinel keeps exactly the typed ones."""
    unset = object()
    dests = vars(parser.parse_args(argv)).keys()
    namespace = parser.parse_args(argv, argparse.Namespace(**{d: unset for d in dests}))
    return {d for d in dests if getattr(namespace, d) is not unset}


def apply_resume_flags(args, given, saved, out):
    """Take the checkpoint's flags, with the changeable ones the user typed; refuse a typed change of any other.
    Returns {flag: (old, new)} for what changed."""
    changed = {}
    for key, old in saved.items():
        if not hasattr(args, key) or key in RUNTIME:
            continue
        new = getattr(args, key)
        if key not in given or new == old:
            setattr(args, key, old)
            continue
        flag = "--" + key.replace("_", "-")
        if key not in CHANGEABLE:
            raise UsageError(f"{flag}: the run in {out} was trained with {flag} {old}, and {new} would change its "
                             f"network, data or random stream; drop {flag} to resume, or start a new run in another --out")
        changed[key] = (old, new)
    return changed


# ----------------------------------------------------------------------------------------------------------------
# The run folder: one writer at a time, never another run's files, the history of every start in config.json
# ----------------------------------------------------------------------------------------------------------------

def missing_folders(path):
    """The folders of `path` that do not exist yet, deepest first: what os.makedirs(path) would create."""
    made, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


class RunFolder:
    """--out, as one process trains into it: locked (train.lock, flock: the OS drops it when the process dies),
    metrics.jsonl appended line by line, config.json replaced whole."""

    def __init__(self, out, is_main):
        self.out = out
        self.ckpt_path = os.path.join(out, checkpoint.FILENAME)
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        self.lock = None      # the open train.lock while this process holds it
        self.metrics = None   # metrics.jsonl, open for appending while the run trains
        self.tensorboard = None  # --tensorboard: a SummaryWriter into the run folder (events.out.tfevents.*)
        self.made = missing_folders(out) if is_main else []  # what `open` creates, removed if the start is refused

    def open(self, resume):
        """Create and lock the folder, before anything in it is read or written; refuse to mix two runs' files."""
        cli.check_writable_dir(self.out, "--out")
        self.lock = open(os.path.join(self.out, "train.lock"), "a+")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.seek(0)
            holder = self.lock.read().strip() or "?"
            self.lock.close()
            self.lock = None
            raise UsageError(f"--out: {self.out} is in use by another train.py (pid {holder}); wait for it to finish, "
                             f"stop it, or choose another --out") from None
        self.lock.seek(0)
        self.lock.truncate()
        self.lock.write(f"{os.getpid()}\n")
        self.lock.flush()
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(self.out, f))]
        if found and not resume:  # a new run never appends to or overwrites another run's files
            raise UsageError(f"--out: {self.out} already holds another run's {', '.join(found)}; pass --resume to "
                             f"continue it (with its ckpt.pt) or choose another --out")
        for tmp in checkpoint.remove_stale_temporaries(self.out):
            say(f"removed {tmp} (a temporary checkpoint left by a process that died while saving)")

    def trim_metrics(self, step):
        """Cut metrics.jsonl back to the checkpoint's step: steps redone after a resume must not appear twice.
        Returns the elapsed_s of the last line kept (the run's seconds up to its checkpoint, which a log line always
        precedes), from which a resumed run counts on: elapsed_s is the run's time over all its starts."""
        if not os.path.isfile(self.metrics_path):
            return 0.0
        keep, elapsed = [], 0.0
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if record["step"] <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                        elapsed = float(record.get("elapsed_s", elapsed))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill is dropped
        with open(self.metrics_path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.metrics_path + ".tmp", self.metrics_path)
        return elapsed

    def write_config(self, cfg, event, step, processes, changed):
        """config.json: the run's flags now, and its history (each start/resume: step, time, processes, flags
        changed)."""
        path = os.path.join(self.out, "config.json")
        history = []
        if event == "resume" and os.path.isfile(path):
            try:
                with open(path) as f:
                    history = json.load(f).get("history", [])
            except (OSError, ValueError, AttributeError):
                pass
        entry = {"event": event, "step": step, "time": datetime.now().isoformat(timespec="seconds"),
                 "processes": processes}
        if changed:
            entry["changed"] = {k: {"from": a, "to": b} for k, (a, b) in changed.items()}
        with open(path + ".tmp", "w") as f:
            json.dump(dict(cfg, history=history + [entry]), f, indent=1)
        os.replace(path + ".tmp", path)

    def open_metrics(self, tensorboard=False):
        self.metrics = open(self.metrics_path, "a")
        if tensorboard:  # checked importable before any work (check_tensorboard)
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional dependency)
            self.tensorboard = SummaryWriter(self.out)

    def append_metrics(self, record):
        """One line of metrics.jsonl; with --tensorboard the same numbers as scalars at the record's step."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def add_grid(self, images, step):
        """--tensorboard: the sample grid (float [N, C, H, W] in [-1, 1]) as the image "samples" at `step`."""
        if self.tensorboard is not None:
            import torchvision.utils  # noqa: PLC0415
            grid = torchvision.utils.make_grid(data.readable((images.float().cpu() + 1) / 2).clamp(0, 1),
                                               nrow=data.grid_columns(images.shape[0]))
            self.tensorboard.add_image("samples", grid, step)
            self.tensorboard.flush()

    def close(self):
        """Close metrics.jsonl (and the TensorBoard events) and drop the lock (closing the file drops the flock)."""
        for f in (self.metrics, self.tensorboard, self.lock):
            if f is not None:
                f.close()
        self.metrics = self.tensorboard = self.lock = None

    def abandon(self):
        """After a refused start: close, and remove the folders this process created (deepest first), each only if
        it holds nothing but train.lock."""
        self.close()
        for folder in self.made:
            try:
                if os.path.isfile(os.path.join(folder, "train.lock")) and os.listdir(folder) == ["train.lock"]:
                    os.remove(os.path.join(folder, "train.lock"))
                os.rmdir(folder)  # fails, harmlessly, on a folder that holds anything else
            except OSError:
                return


# ----------------------------------------------------------------------------------------------------------------
# The records a run keeps: what it trains, its clock, its signals, the decision that ends a step, its probe
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Training:
    """What a run trains, built by train.py: everything a checkpoint holds beyond the flags and the random state."""
    kind: str                     # checkpoint.KINDS: "diffusion", "classifier" or "ddgan"
    model: torch.nn.Module        # the network whose parameters train (DDGAN: the generator G)
    net: torch.nn.Module          # what runs the forward: `model`, or it in DistributedDataParallel / torch.compile
    ema: Any                      # train.EMA of `model`'s weights: what samples are drawn from
    optimizer: torch.optim.Optimizer
    diffusion: Any                # ddpm.GaussianDiffusion
    diffusion_args: dict          # what rebuilds it (checkpoint.build_diffusion)
    batches: data.Batches         # x_0 ~ q(x_0): the data order, resumable
    t_sampler: Any = None         # ddpm.ImportanceSampler for --t-sampler importance (iDDPM §3.3)
    disc: Optional[torch.nn.Module] = None    # DDGAN's discriminator D(x_{t-1}, x_t, t) ...
    disc_args: Optional[dict] = None          # ... what rebuilds it ...
    opt_d: Optional[torch.optim.Optimizer] = None  # ... and its optimizer

    @property
    def loss_names(self):
        """What a step returns, in order: [loss], or [d_loss, g_loss] for DDGAN's two players."""
        return ("d_loss", "g_loss") if self.kind == "ddgan" else ("loss",)


@dataclass
class Clock:
    """The run's wall clock (time.perf_counter seconds); the --max-minutes budget counts from the start of setup."""
    start: float
    deadline: float      # start + --max-minutes, or inf
    saved: float         # the last checkpoint (or the start)
    sampled: float       # the last grid (or the start)
    save_s: float        # seconds a save takes: a first guess from the network's size, then measured
    step_s: float = 0.0  # seconds a step takes, measured at each log
    logged: float = 0.0  # the start of the current log interval, moved on by time spent not training


@dataclass
class StepEnd:
    """What the step just done ends with."""
    save: bool
    sample: bool
    evaluate: bool
    stop: Any = None  # None, "steps", "time", or the signal.Signals that asked


class Signals:
    """SIGINT (Ctrl-C) and SIGTERM while the loop runs (`with signals:`): the first finishes the step, then the run
    saves and stops; a second stops at once, without saving (a KeyboardInterrupt). The previous handlers are given
    back at the end."""

    def __init__(self, window, quiet):
        self.window = window  # seconds in which a repeat is the same request (torchrun passes a Ctrl-C on: twice)
        self.quiet = quiet    # the ranks other than 0 say nothing
        self.signum = 0       # the first signal received, 0 while none
        self.second = 0       # a second one, which stopped the run at once
        self.at = 0.0         # when the first came (time.monotonic)
        self.previous = {}

    def __enter__(self):
        self.signum = self.second = 0
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame):
        now = time.monotonic()
        if self.signum:
            if now - self.at < self.window:
                return  # under torchrun a Ctrl-C reaches each worker twice (the terminal's and torchrun's): one request
            self.second = signum
            raise KeyboardInterrupt
        self.signum, self.at = signum, now
        if not self.quiet:  # a raw write: safe even if the signal interrupted a print
            os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (Ctrl-C "
                        f"again to stop at once, without saving)\n".encode())


@dataclass
class Probe:
    """A fixed batch (8 training images, 8 spread t, fixed eps) on which every save measures the loss of the weights
    it is about to write: comparable from save to save, and drawn from its own generator (the training stream is
    untouched, so saves never change what the run computes). Small: on a CPU it costs 1/50 of a training step."""
    x0: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    reference: float = math.nan  # the loss of the last good weights (the starting ones, then each saved)

    @classmethod
    def of(cls, x, y, num_timesteps, device):
        n, T = min(8, x.shape[0]), num_timesteps
        g = torch.Generator().manual_seed(0)
        return cls(x0=data.to_float(x[:n]).to(device), y=y[:n].to(device),
                   t=(torch.arange(n) * (T - 1) // max(n - 1, 1)).to(device),  # 0 ... T-1
                   noise=torch.randn((n, *x.shape[1:]), generator=g).to(device))

    @torch.no_grad()
    def loss(self, training, args):
        """The loss of the current weights on the probe batch, in eval mode (no dropout) and fp32: the check that
        what a checkpoint holds still computes a sane loss."""
        model, diffusion, device = training.model, training.diffusion, self.x0.device
        model.eval()
        if training.kind == "ddgan":
            # D's loss (DDGAN eq. 4, no R1) + G's (eq. 5) on fixed pairs at every t, with z and noise from a fixed seed
            g = torch.Generator(device).manual_seed(0)
            x_prev, x_t = ddgan.q_sample_pairs(diffusion, self.x0, self.t, g)
            fake, _ = ddgan.denoising_step(diffusion, model, x_t, self.t, args.latent_dim, False, g)
            loss = ddgan.discriminator_loss(diffusion, training.disc, x_prev, fake, x_t, self.t)["loss"]
            loss = loss + ddgan.generator_loss(diffusion, training.disc, fake, x_t, self.t)
        elif training.kind == "classifier":
            loss = noisy_classifier_loss(diffusion, model, self.x0, self.y, self.t,
                                         torch.Generator(device).manual_seed(0))["loss"].mean()
        else:
            kwargs = {"y": self.y} if args.class_cond else {}
            loss = diffusion.training_losses(model, self.x0, self.t, noise=self.noise, model_kwargs=kwargs)["loss"]
            loss = loss.mean()
        model.train()
        return loss.item()


def check_memory(kind, model_args, device):
    """Refuse, before allocating anything, a network whose weights, gradients, EMA and AdamW moments (5 copies of
    the parameters) cannot fit in this device's memory: built on the meta device, it costs nothing to count."""
    with torch.device("meta"):
        n = sum(p.numel() for p in checkpoint.KINDS[kind](**model_args).parameters())
    need = 5 * 4 * n
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[1]
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UsageError(f"--ch: the network has {n / 1e6:,.0f}M parameters; its weights, gradients, EMA and AdamW "
                         f"state need {need / 2 ** 30:,.0f} GiB, and {device.type} memory is {have / 2 ** 30:,.0f} GiB; "
                         f"choose a smaller --ch, --ch-mult or --num-res-blocks")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

class Run:
    """One process's run into one folder: its place among the torchrun processes, its progress (step, the last good
    checkpoint) and the records above; its methods are the stages of train.py's loop other than the step."""

    def __init__(self, args, given, out, started):
        self.args = args                # the flags (a resumed run's: the checkpoint's, with the changes typed now)
        self.given = given              # the flags the user typed
        self.rank, self.world_size, self.device = cli.distributed(args.device)  # torchrun: cuda:LOCAL_RANK
        self.is_main = self.rank == 0   # rank 0 alone writes files and talks
        self.folder = RunFolder(out, self.is_main)
        self.started = started          # perf_counter at the start of setup: the budget counts from there
        self.step = 0                   # steps done
        self.logged_step = 0            # the step of the last log (the losses summed since are the steps after it)
        self.saved_step = None          # the step of the last good checkpoint on disk
        self.good_lr = None             # the learning rate that trained it
        self.last_loss = None           # the last logged loss, for the story of a divergence
        self.grids = 0                  # sample grids drawn
        self.last_grid = (0, 0)         # (images, step) of the grid in samples.png
        self.logs = 0                   # log lines written by this process
        self.elapsed_before = 0.0       # seconds the run trained before this start (--resume), for elapsed_s
        self.cfg = None                 # the flags a checkpoint stores (less RUNTIME), with the data's size
        self.clock = self.probe = self.test_set = None  # set by `begin`
        self.signals = Signals(window=2.0 if self.world_size > 1 else 0.0, quiet=not self.is_main)

    @property
    def out(self):
        return self.folder.out

    @property
    def ckpt_path(self):
        return self.folder.ckpt_path

    # -- setup ------------------------------------------------------------------------------------------------------

    def open(self, check_args):
        """Lock the run folder (rank 0) and read the checkpoint to resume: its flags, with the changeable ones typed
        now, checked again by `check_args`. Returns (the checkpoint or None, {flag: (old, new)})."""
        args, ckpt, changed = self.args, None, {}
        if self.is_main:
            self.folder.open(args.resume)
        if args.resume and not os.path.isfile(self.ckpt_path):
            raise UsageError(f"--resume: no checkpoint at {self.ckpt_path}; start without --resume or point --out at "
                             f"the run")
        if args.resume:
            ckpt = checkpoint.load(self.ckpt_path, "--resume")
            changed = apply_resume_flags(args, self.given, ckpt["config"], self.out)
            check_args(args)
            self.step = self.saved_step = ckpt["step"]
            self.good_lr = ckpt["config"]["lr"]
            if args.steps <= self.step:
                raise UsageError(f"--steps: the run in {self.out} is already at step {self.step}; pass --steps above "
                                 f"{self.step} to train on")
        if args.task == "ddgan" and self.world_size > 1:
            raise UsageError("--task: ddgan trains in one process (R1's double backward is not supported by "
                             "DistributedDataParallel); run python train.py without torchrun")
        if args.batch_size % self.world_size:
            raise UsageError(f"--batch-size: {args.batch_size} is not divisible by the {self.world_size} processes; "
                             f"use a multiple of {self.world_size}")
        if self.is_main:
            say(f"run folder: {self.out} ({f'resuming step {self.step:,}' if args.resume else 'new run'})")
        return ckpt, changed

    def resume(self, training, ckpt):
        """Everything an uninterrupted run would hold at the checkpoint's step: weights, EMA, optimizers, data order,
        importance-sampler history and every rank's random state."""
        args = self.args
        training.model.load_state_dict(ckpt["model"])
        training.ema.load_state_dict(ckpt["ema"], ckpt["ema_updates"])
        training.optimizer.load_state_dict(ckpt["optimizer"])
        if training.disc is not None:  # --task ddgan: the discriminator and its optimizer
            training.disc.load_state_dict(ckpt["discriminator"])
            training.opt_d.load_state_dict(ckpt["optimizer_d"])
        for opt in (training.optimizer, training.opt_d):
            for group in opt.param_groups if opt is not None else ():  # --weight-decay may have changed; lr: every step
                group["weight_decay"] = args.weight_decay
        state = ckpt["batches"]
        if state["world_size"] != self.world_size:
            # another number of processes: the same epoch and the same fraction of it, split the new way
            state = dict(state, world_size=self.world_size,
                         pos=state["pos"] * (state["n"] // self.world_size) // (state["n"] // state["world_size"]))
            if self.is_main:
                say(f"resuming on {self.world_size} process(es), saved on {ckpt['batches']['world_size']}: training "
                    f"continues, but the data order and noise are no longer those of the uninterrupted run")
        training.batches.load_state_dict(state)
        if training.t_sampler is not None:
            training.t_sampler.load_state_dict(ckpt["t_sampler"])
        rngs = ckpt["rng"]
        if self.rank < len(rngs) and len(rngs) == self.world_size:
            torch.set_rng_state(rngs[self.rank]["cpu"])
            if self.device.type == "cuda" and "cuda" in rngs[self.rank]:
                torch.cuda.set_rng_state(rngs[self.rank]["cuda"], self.device)
        else:
            torch.manual_seed(args.seed + 1000 * self.rank + self.step)

    def begin(self, training, x, y, source, changed):
        """The end of setup: the flags a checkpoint stores, the probe and its reference loss, the clock; on rank 0
        metrics.jsonl cut back to the checkpoint, config.json's history, the announcements and, for a classifier,
        its held-out images."""
        args = self.args
        self.cfg = {k: v for k, v in vars(args).items() if k not in RUNTIME}
        self.cfg.update(n_train=int(x.shape[0]), channels=int(x.shape[1]))
        self.probe = Probe.of(x, y, training.diffusion.num_timesteps, self.device)
        self.probe.reference = self.probe.loss(training, args)  # what "exploded" compares with
        now = time.perf_counter()
        # a first guess of a save's time: model + EMA + AdamW's two moments at ~200 MB/s, and a second for loss.png
        save_s = 1.5 + 16 * sum(p.numel() for p in training.model.parameters()) / 200e6
        self.clock = Clock(start=self.started, saved=now, sampled=now, save_s=save_s,
                           deadline=self.started + 60 * args.max_minutes if args.max_minutes else math.inf)
        if not self.is_main:
            return
        if args.resume:  # metrics.jsonl's elapsed_s goes on from the checkpoint's
            self.elapsed_before = self.folder.trim_metrics(self.step)
        self.folder.write_config(self.cfg, "resume" if args.resume else "start", self.step, self.world_size, changed)
        self.folder.open_metrics(args.tensorboard)
        self.announce(training, x, source, changed)
        if args.task == "classifier":
            self.test_set = self.load_test_set()

    def announce(self, training, x, source, changed):
        """What the user needs to know before the first step: data, device, model, and when outputs will appear."""
        args = self.args
        say(f"data: {source}: {x.shape[0]:,} images {x.shape[1]}x{x.shape[2]}x{x.shape[3]}, "
            f"{args.num_classes} classes")
        threads = f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""
        say(f"device: {self.device}{threads}, precision: {cli.precision_name(self.device, args.precision)}, "
            f"{self.world_size} process(es), batch {args.batch_size} ({args.batch_size // self.world_size} per process)")
        params = sum(p.numel() for p in training.model.parameters())
        what = (f"{args.loss} loss, {args.schedule} schedule, T={args.diffusion_steps}" if args.task == "diffusion"
                else f"noisy classifier over {args.num_classes} classes, T={args.diffusion_steps}")
        if args.task == "ddgan":
            d_params = sum(p.numel() for p in training.disc.parameters())
            what = (f"DDGAN generator (nz {args.latent_dim}) + EncoderUNet discriminator, {d_params / 1e6:.2f}M "
                    f"parameters; {args.schedule} schedule, T={args.diffusion_steps}, R1 gamma {args.r1_gamma:g} "
                    f"every {args.lazy_reg} steps")
        say(f"model: {type(training.model).__name__}, {params / 1e6:.2f}M parameters; {what}")
        if changed:
            say("resume: " + ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())
                + " (applied from here on; recorded in config.json)")
        minutes = f" or after {args.save_minutes:g} min, whichever comes first" if args.save_minutes else ""
        first = min(args.steps, (self.step // args.save_every + 1) * args.save_every)
        grid = ", with a sample grid (samples.png)" if args.task in ("diffusion", "ddgan") and args.n_sample else ""
        say(f"first checkpoint: step {first:,}{minutes}{grid}; then every {args.save_every:,} steps; loss.png is "
            f"redrawn at every save" + (f"; the run stops within --max-minutes {args.max_minutes:g}"
                                        if args.max_minutes else ""))

    def load_test_set(self):
        """Held-out images for the classifier's accuracy: 2,000 test images with every class (the files are grouped
        by class, hence a stride)."""
        args = self.args
        say(f"loading the {args.dataset} test images for the classifier's accuracy ...")
        x, y = data.load_dataset(args.dataset, args.data_dir, args.image_size, split="test",
                                 synthetic_n=args.synthetic_n)
        stride = max(1, x.shape[0] // 2000)
        return data.to_float(x[::stride]).to(self.device), y[::stride].to(self.device)

    def wrap(self, model):
        """The module the training forward runs: `model`, in DistributedDataParallel under torchrun (its gradients
        averaged over the ranks), torch.compile'd with --compile; the checkpoint always holds `model` itself."""
        net = model
        if self.world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return torch.compile(net) if self.args.compile else net

    # -- the loop's stages ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def loop(self):
        """Around train.py's loop: the signals caught and the progress bar (yielded); the first log interval starts."""
        bar = cli.progress(self.args.steps, "train", unit="step", disable=not self.is_main or self.args.no_progress,
                           initial=self.step)
        self.logged_step, self.clock.logged = self.step, time.perf_counter()
        try:
            with self.signals:
                yield bar
        finally:
            bar.close()

    def end_of_step(self):
        """What the step just done ends with: save? sample? evaluate? stop (and why)?

        The step cadences are plain arithmetic. The wall clock (--max-minutes, --save-minutes, --sample-minutes) and
        the stop signal are read every step in one process (host only, no device sync); under torchrun they are read
        at log steps and combined over the ranks in one all_reduce(MAX), so every rank takes the same decision at the
        same step.
        """
        args, step = self.args, self.step
        grids = args.task in ("diffusion", "ddgan") and args.n_sample > 0
        end = StepEnd(save=step % args.save_every == 0,
                      sample=grids and args.sample_every > 0 and step % args.sample_every == 0,
                      evaluate=args.task == "classifier" and step % args.eval_every == 0)
        if self.world_size == 1 or step % args.log_every == 0:
            out_of_time, save_due, sample_due, signum = self.clock_and_signals(save_due_by_step=end.save)
            end.save |= save_due
            end.sample |= sample_due and grids
            end.stop = signal.Signals(signum) if signum else "time" if out_of_time else None
        if end.stop is None and step >= args.steps:
            end.stop = "steps"
        by_signal = isinstance(end.stop, signal.Signals)
        if end.stop:
            # the end: always a checkpoint; a final grid / accuracy unless a signal asked to stop
            end.save, end.sample = True, grids and not by_signal
            end.evaluate = args.task == "classifier" and not by_signal
        # a first grid with the first checkpoint; never after Ctrl-C / SIGTERM: the user asked to stop now
        end.sample = (end.sample or (end.save and self.grids == 0 and grids)) and not by_signal
        return end

    def clock_and_signals(self, save_due_by_step):
        """(out of time, a save due by the clock, a grid due by the clock, the signal received), the same on every
        rank."""
        args, clock, now = self.args, self.clock, time.perf_counter()
        save_due = args.save_minutes > 0 and now - clock.saved >= 60 * args.save_minutes
        # out of time: going on to the next check, with the save due now (if any) and the final one, would overrun
        reserve = (clock.step_s * (1 if self.world_size == 1 else args.log_every)
                   + clock.save_s * (1 + (save_due_by_step or save_due)) + self.least_grid_s())
        flags = [args.max_minutes > 0 and now + reserve >= clock.deadline, save_due,
                 args.sample_minutes > 0 and now - clock.sampled >= 60 * args.sample_minutes, self.signals.signum]
        if self.world_size > 1:
            flags = torch.tensor([int(f) for f in flags], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.tolist()
        return bool(flags[0]), bool(flags[1]), bool(flags[2]), int(flags[3])

    @contextlib.contextmanager
    def not_training(self):
        """Time spent here (an accuracy check, a save, a grid) is left out of the img/s of the log interval."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.clock.logged += time.perf_counter() - started

    def log(self, bar, training, loss_sum, accuracy):
        """The one host-device sync: the mean losses of every rank since the last log, checked finite, as one line
        of metrics.jsonl and the bar's postfix (or a printed line with --no-progress). A non-finite loss stops the
        run (RunFailed)."""
        args, clock = self.args, self.clock
        steps = self.step - self.logged_step
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.world_size
        now = time.perf_counter()
        means, clock.step_s = (loss_sum / steps).tolist(), (now - clock.logged) / steps
        for name, value in zip(training.loss_names, means):
            if not math.isfinite(value):
                raise RunFailed(self.diverged(f"the {name} is {value}"))
        losses = dict(zip(training.loss_names, means))
        self.last_loss = means[0] if len(means) == 1 else losses
        img_s = steps * args.batch_size / (now - clock.logged)
        if self.is_main:
            # the learning rate of the last step (G's for DDGAN), as the step set it
            self.write_log(bar, losses, training.optimizer.param_groups[0]["lr"], img_s, accuracy)
        self.logged_step, clock.logged, self.logs = self.step, time.perf_counter(), self.logs + 1

    def write_log(self, bar, losses, lr, img_s, accuracy):
        """One line of metrics.jsonl, and the bar's postfix (or a printed line with --no-progress).
        losses: {"loss": ...}, or {"d_loss": ..., "g_loss": ...} for --task ddgan."""
        args = self.args
        record = {"step": self.step, **{k: round(v, 6) for k, v in losses.items()}, "lr": lr,
                  "img_per_s": round(img_s, 2), "elapsed_s": round(self.elapsed_before + time.perf_counter() - self.clock.start, 1),
                  **accuracy}
        if self.device.type == "cuda":
            record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 30, 2)
        self.folder.append_metrics(record)
        rate = f"{img_s:,.0f}" if img_s >= 10 else f"{img_s:.2g}"
        shown = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
        bar.set_postfix_str(f"{shown}, {rate} img/s", refresh=False)
        if args.no_progress:
            total = self.bar_total()
            eta = cli.human_time((total - self.step) * self.clock.step_s)
            say(f"step {self.step:,}/{total:,} | {shown.replace(', ', ' | ')} | {rate} img/s | ETA {eta}")

    def save(self, training):
        """Write the checkpoint (rank 0; every rank's random state is gathered first), then redraw loss.png. Never
        bad work: the weights about to be saved must be finite and still compute a sane loss on the probe batch."""
        with self.not_training():
            started = time.perf_counter()
            probe = self.check_weights(training)
            rngs = self.random_states()
            if self.is_main:
                self.write_checkpoint(training, rngs)
                cli.wrote(self.ckpt_path, f"step {self.step:,}")
                plot_loss(self.folder.metrics_path, os.path.join(self.out, "loss.png"))
            self.saved_step, self.probe.reference, self.good_lr = self.step, probe, self.args.lr
            self.clock.saved = time.perf_counter()
            self.clock.save_s = self.clock.saved - started

    def check_weights(self, training):
        """The probe loss of the weights about to be saved; RunFailed if any weight is not finite or the loss has
        exploded (10x above the last good checkpoint's). The weights are identical on every rank: each rank checks,
        all stop alike. (The loss of the steps that produced them was checked by the log just before.)"""
        nets = [training.model, training.ema] + ([training.disc] if training.disc is not None else [])
        bad = sum(checkpoint.non_finite_count(net.state_dict()) for net in nets)
        if bad:
            raise RunFailed(self.diverged(f"{bad:,} weights are not finite (the last logged loss was {self.last_loss})"))
        probe = self.probe.loss(training, self.args)
        if not math.isfinite(probe) or probe > 10 * self.probe.reference + 10:
            raise RunFailed(self.diverged(f"the new weights give a loss of {probe:.4g} on a fixed batch "
                                          f"({self.probe.reference:.4g} at the last good checkpoint)"))
        return probe

    def random_states(self):
        """Every rank's random state (gathered under torchrun), so a resumed run draws exactly the same t and noise."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = [rng]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, rng)
        return rngs

    def write_checkpoint(self, training, rngs):
        """ckpt.pt, atomically (checkpoint.save); a failed write (a full disk) is one line, the previous file intact."""
        ckpt = {"format": checkpoint.FORMAT, "kind": training.kind, "model_args": training.model.config,
                "diffusion_args": training.diffusion_args, "model": training.model.state_dict(),
                "ema": training.ema.state_dict(), "step": self.step, "config": self.cfg,
                # the run's own state, for an exact --resume
                "ema_updates": training.ema.updates, "optimizer": training.optimizer.state_dict(),
                "batches": training.batches.state_dict(), "rng": rngs,
                "t_sampler": training.t_sampler.state_dict() if training.t_sampler is not None else None}
        if training.disc is not None:  # --task ddgan: model/ema are G; D and its optimizer, to resume exactly
            ckpt.update(discriminator_args=training.disc_args, discriminator=training.disc.state_dict(),
                        optimizer_d=training.opt_d.state_dict())
        try:
            checkpoint.save(ckpt, self.ckpt_path)
        except checkpoint.NonFiniteError as e:  # check_weights already caught it; this is the library's guard
            raise RunFailed(self.diverged(str(e))) from None
        except OSError as e:
            before = (f"the previous checkpoint (step {self.saved_step:,}) is intact; free some space, then resume: "
                      f"{self.resume_command()}" if self.saved_step is not None else
                      "no checkpoint exists yet; free some space and start again")
            raise RunFailed(f"could not write {self.ckpt_path} at step {self.step:,} ({e.strerror or e}): the partial "
                            f"file was removed and {before}") from None

    def extra_budget(self, final):
        """Seconds a grid or an accuracy check may take now: 5% of the run so far (at least EXTRA_MIN_SECONDS), and
        never past the --max-minutes deadline (with room for one more save, unless this is the end)."""
        now, clock = time.perf_counter(), self.clock
        budget = max(EXTRA_MIN_SECONDS, 0.05 * (now - clock.start))
        return min(budget, clock.deadline - now - (0 if final else clock.save_s + clock.step_s))

    def sample_grid(self, training, final):
        """samples.png (and samples_<step>.png): DDIM from the EMA weights (DDGAN: its T-step chain), fixed noise so
        grids compare across steps; as many images as the time budget allows (rank 0)."""
        if not self.is_main:
            return
        with self.not_training():
            self.grids += 1
            self.clock.sampled = time.perf_counter()
            n, steps = self.grid_size(training, final)
            if n == 0:
                return
            args = self.args
            g = torch.Generator(self.device).manual_seed(args.seed)
            kwargs = {"y": torch.arange(n, device=self.device) % args.num_classes} if args.class_cond else {}
            shape = (n, self.cfg["channels"], args.image_size, args.image_size)
            with cli.autocast(self.device, args.precision):
                if training.kind == "ddgan":  # DG4: the EMA generator's T-step chain, x_0' -> posterior (DDGAN eq. 6)
                    imgs = ddgan.ddgan_sample_loop(training.diffusion, training.ema.module, shape, args.latent_dim,
                                                   generator=g, device=self.device)
                else:
                    imgs = ddim_sample_loop(training.diffusion.respace(steps), training.ema.module, shape,
                                            generator=g, model_kwargs=kwargs, device=self.device)
            # a grid smaller than the last one (time was short) goes beside it: samples.png keeps the larger grid
            smaller = n < self.last_grid[0]
            names = [f"samples_{self.step:07d}.png"] + ([] if smaller else ["samples.png"])
            try:
                for name in names:
                    data.save_grid(imgs.float(), os.path.join(self.out, name))
            except OSError as e:
                say(f"warning: could not write {name} ({e.strerror or e})")
                return
            cli.wrote(os.path.join(self.out, names[-1]), f"{n} EMA samples at step {self.step:,}")
            if smaller:
                say(f"samples.png keeps the {self.last_grid[0]} images of step {self.last_grid[1]:,}")
            else:
                self.last_grid = (n, self.step)
            self.folder.add_grid(imgs, self.step)

    def image_step_s(self):
        """Seconds one network call on one image takes, from the measured training step (forward + backward: about
        3 forwards per image): the unit of a grid's cost."""
        return self.clock.step_s / (3 * (self.args.batch_size // self.world_size))

    def least_grid_s(self):
        """Seconds kept in reserve by the --max-minutes check so that the promised final grid fits: the full grid
        (--n-sample images, DDIM-50, with a quarter to spare) when it costs at most 5% of the budget, so that a short
        run ends on a grid as large as the ones before it; otherwise the smallest one (LEAST_GRID images,
        LEAST_GRID_STEPS DDIM steps)."""
        args = self.args
        if args.task not in ("diffusion", "ddgan") or not args.n_sample:
            return 0.0
        full = 1.25 * args.n_sample * GRID_STEPS * self.image_step_s()
        if args.max_minutes and full <= 0.05 * 60 * args.max_minutes:
            return full
        return min(LEAST_GRID, args.n_sample) * LEAST_GRID_STEPS * self.image_step_s()

    def bar_total(self):
        """The step the run will stop at, as far as the clock can tell: --steps, or earlier where the --max-minutes
        budget runs out first at the measured step time (the bar's total, so its ETA is the run's)."""
        args, clock = self.args, self.clock
        if not args.max_minutes or not clock.step_s:
            return args.steps
        left = clock.deadline - time.perf_counter() - clock.save_s - self.least_grid_s()
        return max(self.step, min(args.steps, self.step + int(left / clock.step_s)))

    def show(self, bar, training, loss_sum):
        """The bar between log steps: its total (bar_total) and, at steps 1, 2, 4, 8 ... before the first log, the
        running mean loss so far (one read of the device sum each: a handful per run, none after the first log)."""
        steps = self.step - self.logged_step
        early = not self.logs and 0 < steps < self.args.log_every and steps & (steps - 1) == 0
        if early:
            self.clock.step_s = (time.perf_counter() - self.clock.logged) / steps
            shown = ", ".join(f"{k} {v:.4f}" for k, v in zip(training.loss_names, (loss_sum / steps).tolist()))
            bar.set_postfix_str(f"{shown} (running)", refresh=False)
        if early or self.step % self.args.log_every == 0:
            bar.total = self.bar_total()

    def grid_size(self, training, final):
        """(images, sampling steps) of the grid the time budget allows, said when smaller than asked or slow; 0
        images (said) when even 4 would not fit. The time is estimated from the measured step time: a training step
        costs about 3 forwards per image, one DDIM step 1."""
        args = self.args
        steps = min(GRID_STEPS, training.diffusion.num_timesteps)
        method = "DDGAN" if training.kind == "ddgan" else "DDIM"  # DDGAN: all T steps of its chain (T = 4)
        per_image = steps * self.image_step_s()
        budget = self.extra_budget(final)
        n = min(args.n_sample, int(budget / per_image) if per_image > 0 else args.n_sample)
        least = min(LEAST_GRID, args.n_sample)
        if n < least and (final or self.grids == 1) and method == "DDIM":
            # the grid the banner promised (the first, the last): the least one, with fewer DDIM steps if need be
            steps = max(LEAST_GRID_STEPS, min(steps, int(budget / (least * self.image_step_s() or 1))))
            say(f"step {self.step:,}: time is short: {least} images (of --n-sample {args.n_sample}) with {method} "
                f"{steps} steps, ~{cli.human_time(least * steps * self.image_step_s())} ...")
            return least, steps
        if n < least:
            allowed = (f"only {cli.human_time(max(budget, 0))} of --max-minutes is left" if budget < EXTRA_MIN_SECONDS
                       else f"a grid may take {cli.human_time(budget)} now (5% of the run so far, at least "
                            f"{EXTRA_MIN_SECONDS} s)")
            say(f"step {self.step:,}: sample grid skipped: {least} images would take "
                f"~{cli.human_time(least * per_image)} ({method} {steps} steps), and {allowed}")
            return 0, steps
        if n < args.n_sample:
            n = max(4, math.isqrt(n) ** 2)  # a full square grid
        if n < args.n_sample or n * per_image > 2:  # a smaller grid than asked is always said, however fast
            shrunk = f" (of --n-sample {args.n_sample}: the time left allows {n})" if n < args.n_sample else ""
            say(f"step {self.step:,}: sampling {n} images{shrunk} with {method} {steps} steps from the EMA weights, "
                f"~{cli.human_time(n * per_image)} ...")
        return n, steps

    def evaluate_classifier(self, training, final):
        """{acc_t<t>: accuracy} of the EMA classifier on held-out images noised to t = 0, T/4, T/2, 3T/4 (G4), on as
        many of the 2,000 test images as the time budget allows (rank 0; {} elsewhere)."""
        if not self.is_main:
            return {}
        with self.not_training():
            (xt, yt), args = self.test_set, self.args
            per_image = 4 * self.clock.step_s / (3 * (args.batch_size // self.world_size))
            budget = self.extra_budget(final)
            n = min(xt.shape[0], int(budget / per_image) if per_image > 0 else xt.shape[0])
            if n < min(50, xt.shape[0]):
                say(f"step {self.step:,}: classifier accuracy skipped: {min(50, xt.shape[0])} test images would take "
                    f"~{cli.human_time(min(50, xt.shape[0]) * per_image)}")
                return {}
            if n * per_image > 2:
                say(f"step {self.step:,}: classifier accuracy on {n:,} test images at 4 noise levels, "
                    f"~{cli.human_time(n * per_image)} ...")
            stride = xt.shape[0] // n
            with cli.autocast(self.device, args.precision):
                acc = classifier_accuracy_at(training.diffusion, training.ema.module, xt[::stride][:n],
                                             yt[::stride][:n], generator=torch.Generator(self.device).manual_seed(0))
            say(f"step {self.step:,}: test accuracy at noise level "
                + ", ".join(f"t={t}: {a:.3f}" for t, a in acc.items()))
            return {f"acc_t{t}": round(float(a), 4) for t, a in acc.items()}

    # -- the end ----------------------------------------------------------------------------------------------------

    def resume_command(self):
        """The exact command that continues this run."""
        launcher = f"torchrun --nproc_per_node={self.world_size} train.py" if self.world_size > 1 else "python train.py"
        device = f" --device {self.args.device}" if "device" in self.given else ""
        return f"{launcher} --resume --out {shlex.quote(self.out)}{device}"

    def diverged(self, what):
        """The one-line story of a diverged run: what, where, and how to go on from the last good checkpoint."""
        # a tenth of the current learning rate, or the one the last good checkpoint was trained with if that is lower
        lr = f"{min(self.args.lr / 10, self.good_lr or math.inf):.3g}"
        if self.saved_step is not None and os.path.isfile(self.ckpt_path):
            advice = (f"the last good checkpoint is {self.ckpt_path} (step {self.saved_step:,}); resume it with a "
                      f"lower learning rate: {self.resume_command()} --lr {lr}")
        else:
            advice = f"no checkpoint was saved before it; start again with a lower learning rate (e.g. --lr {lr})"
        return f"{what} at step {self.step:,}: the run diverged, and nothing from it was saved; {advice}"

    def out_of_memory(self):
        """The one line for a device that ran out of memory mid-run (the batch, not the network, is what to
        shrink)."""
        if self.saved_step is not None:
            last = (f"the checkpoint {self.ckpt_path} (step {self.saved_step:,}) is intact: resume it on more "
                    f"processes (torchrun splits the same batch), or start a new run with a lower --batch-size")
        else:
            last = "nothing was saved: start again with a lower --batch-size"
        return (f"out of {self.device.type} memory at step {self.step + 1:,} with "
                f"{self.args.batch_size // self.world_size} images per process; {last}")

    def finish(self, outcome):
        """Print what happened and the next command; returns the exit code (0, or 128 + signal)."""
        args, out = self.args, self.out
        if outcome == "interrupted":  # a second signal during a step or a save: stop now, nothing more written
            if self.is_main:
                last = (f"the last checkpoint is {self.ckpt_path} (step {self.saved_step:,})"
                        if self.saved_step is not None else "no checkpoint was saved")
                say(f"stopped at once at step {self.step:,} by a second signal: nothing saved since; {last}")
            return 128 + (self.signals.second or signal.SIGINT)
        if not self.is_main:
            return 128 + outcome if isinstance(outcome, signal.Signals) else 0
        elapsed = cli.human_time(time.perf_counter() - self.clock.start)
        if isinstance(outcome, signal.Signals):
            say(f"stopped by {outcome.name} at step {self.step:,} after {elapsed}: saved {self.ckpt_path}")
            say(f"resume with: {self.resume_command()}")
            return 128 + outcome
        files = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        why = f"--max-minutes {args.max_minutes:g} reached" if outcome == "time" else "done"
        say(f"{why}: step {self.step:,}/{args.steps:,} in {elapsed}; wrote in {out}: {', '.join(files)}")
        if outcome == "time":
            say(f"resume with: {self.resume_command()}")
        if args.task == "diffusion":
            say(f"next: python sample.py --checkpoint {shlex.quote(out)} --sampler ddim --steps 50")
        elif args.task == "ddgan":
            say(f"next: python sample.py --checkpoint {shlex.quote(out)} --sampler ddgan")
        else:  # a classifier guides a diffusion run of the same data
            say(f"next: python sample.py --checkpoint runs/{args.dataset} --classifier {shlex.quote(out)} "
                f"--classifier-scale 4 --class {min(3, args.num_classes - 1)}")
        return 0

    def close(self):
        """Release what the process holds: the metrics file, the run folder's lock, the process group."""
        self.folder.close()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def abandon(self):
        """After a refused start: release everything, and leave no run folder behind (train.lock was all it held)."""
        self.close()
        self.folder.abandon()


def plot_loss(metrics_path, png_path):
    """loss.png: the logged loss against the step on a log scale, and its exponential moving average (the trend);
    for --task ddgan, D's and G's losses (DDGAN eqs. 4 and 5), one colour each."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f]
    names = [k for k in ("loss", "d_loss", "g_loss") if records and k in records[0]]
    if not names:
        return
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, color in zip(names, ("tab:blue", "tab:orange")):
        steps = [r["step"] for r in records]
        losses = [max(r[name], 1e-12) for r in records]
        # the trend: an exponential moving average in log space (the loss spans decades), bias-corrected so it
        # starts at the first point, averaging over about 1/20 of the points so far
        beta, avg, smooth = 1 - 1 / (1 + len(losses) / 20), 0.0, []
        for k, v in enumerate(losses, 1):
            avg = beta * avg + (1 - beta) * math.log(v)
            smooth.append(math.exp(avg / (1 - beta ** k)))
        # a dot on each point while there are few: a line through one point draws nothing (a run stopped early)
        ax.plot(steps, losses, color=color, alpha=0.35, linewidth=1, label=f"{name} (mean over each log interval)",
                marker="o" if len(losses) < 50 else None, markersize=4)
        ax.plot(steps, smooth, color=color, linewidth=2, label=f"{name}: moving average")
    ax.set_yscale("log")
    values = [max(r[k], 1e-12) for r in records for k in names]
    ax.set_ylim(min(values) / 1.5, max(values) * 1.5)  # room above and below, even for a single point
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    tmp = f"{png_path}.tmp{os.getpid()}"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, png_path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        say(f"warning: could not write {png_path} ({e.strerror or e})")
