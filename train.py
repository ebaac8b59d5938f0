"""
Train a diffusion model (DDPM Algorithm 1) or a noisy classifier for guidance (ADM §4), on one GPU, on several
with torchrun, or slowly on a CPU.

    python train.py --dataset cifar10                      # the DDPM CIFAR-10 recipe (35.7M U-Net, L_simple)
    python train.py --dataset cifar10 --loss hybrid --schedule cosine     # iDDPM: learned variance
    python train.py --dataset cifar10 --class-cond --p-uncond 0.1         # for classifier-free guidance (G5)
    python train.py --dataset cifar10 --task classifier    # the noisy classifier of classifier guidance (G4)
    python train.py --dataset cifar10 --task ddgan         # a Denoising Diffusion GAN, T = 4 (DDGAN's recipe)
    torchrun --nproc_per_node=8 train.py --dataset cifar10 # DistributedDataParallel, global batch 128
    python train.py --out runs/cifar10 --resume            # continue exactly where the checkpoint stopped
    python train.py --out runs/cifar10 --resume --lr 1e-4  # ... with a new learning rate (kept in config.json)

DDPM's Algorithm 1 (Training):
    1: repeat
    2:   x_0 ~ q(x_0)
    3:   t ~ Uniform({1, ..., T})
    4:   eps ~ N(0, I)
    5:   take a gradient descent step on  grad_theta || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2
    6: until converged
ddpm.GaussianDiffusion.training_losses computes the loss of lines 3-5; `train_step` below is line 5's gradient step
(AdamW with warm-up and gradient clipping, then the exponential moving average of the weights that samples are drawn
from); the loop in `train` is lines 1, 2 and 6, plus what a real run needs: logs, checkpoints, pictures, a time
budget and a clean stop. Everything else in this file is setup, read top to bottom.

THE RUN FOLDER (--out, default runs/<dataset>):
    ckpt.pt            the latest checkpoint (checkpoint.py's format 2: it describes its own network), replaced
                       atomically, so a kill at any moment leaves the previous one intact
    metrics.jsonl      one line per --log-every steps: step, loss, lr, img/s, elapsed seconds (and accuracy)
    samples.png        the EMA model's latest grid (DDIM, 50 steps), also kept as samples_<step>.png
    loss.png           the loss against the step on a log scale with its moving average, redrawn at every save
    config.json        the run's flags, and the history of every start and resume with the flags it changed
    train.lock         held (flock) by the process training into the folder; a second one is refused

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
    change the network, the data or the random stream are refused.

Fast path on CUDA: bf16 autocast, channels_last, fused AdamW, optional torch.compile (--compile), TF32 matmuls, and
no host synchronisation inside the loop: the loss is summed on the device and read every --log-every steps. The CPU
path is the same code in fp32.

--task ddgan: DENOISING DIFFUSION GANs (Xiao, Kreis & Vahdat, ICLR 2022, arXiv 2112.07804; ddgan.py). A diffusion of
T = 4 steps on the "vp" schedule whose reverse steps p_theta(x_{t-1} | x_t) are a generator's x_0' = G(x_t, z, t)
pushed through DDPM's posterior q(x_{t-1} | x_t, x_0') (DDGAN eq. 6), trained against a time-conditional
discriminator D(x_{t-1}, x_t, t) (DDGAN eqs. 4-5, R1 of Mescheder et al. 2018 eq. 9 on every --lazy-reg-th D step).
G = unet.UNet(latent_dim=--latent-dim), D = unet.EncoderUNet(in_channels=2C, out_dim=1, ch=--d-ch), Adam with
betas (0.5, 0.9) for both (--lr for G, --lr-d for D), cosine learning-rate decay to 1e-5 over --steps, the EMA of G's
weights for samples. Every flag the user does not type takes the paper's CIFAR-10 value (ddgan.CIFAR10_RECIPE, the
authors' README command; DDGAN_DEFAULTS below): T=4 vp, ch 128 (1,2,2,2), 2 res blocks, attention at 16, no
dropout, AdaGN (--scale-shift-norm), batch 256, lr 1.6e-4 (G) / 1.25e-4 (D), no warm-up, no clipping, EMA 0.9999,
nz 100, R1 gamma 0.02 every 15 D steps, 1800 epochs of CIFAR-10 (351,563 steps). `train_step_ddgan` is its step
(a D step, then a G step: ddgan.ddgan_train_step); the loop, saves, checks, signals and --resume are the same as for
the diffusion model. metrics.jsonl logs d_loss and g_loss; samples.png is the EMA generator's 4-step chain (DG4).
One process (torchrun is refused: R1 differentiates D's gradient, which DistributedDataParallel does not support).
"""

import argparse
import copy
import fcntl
import json
import math
import os
import shlex
import signal
import sys
import time
from datetime import datetime
from types import SimpleNamespace

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
from ddpm import ImportanceSampler
from guidance import classifier_accuracy_at, noisy_classifier_loss
from schedules import SCHEDULES
from unet import EncoderUNet

GRID_STEPS = 50          # the sample grid: DDIM with 50 steps (DDIM §5: close to 1000-step DDPM quality)
EXTRA_MIN_SECONDS = 20   # a grid or an accuracy check may take max(this, 5% of the run so far), shrunk to fit
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "config.json", "samples.png", "loss.png")

# On --resume these flags may change: the run goes on with the new value and config.json records the change.
CHANGEABLE = ("steps", "lr", "warmup", "weight_decay", "grad_clip", "ema", "p_uncond", "max_minutes", "log_every",
              "save_every", "save_minutes", "sample_every", "sample_minutes", "n_sample", "eval_every", "precision",
              "compile", "lr_d")
# These belong to one process, not to the run (never saved, never compared).
RUNTIME = ("out", "resume", "device", "no_progress")
# Every other flag defines the network, the diffusion, the data or the random stream: --resume refuses a change.

# --task ddgan: the value each flag takes when the user does not type it, the DDGAN paper's CIFAR-10 recipe
# (ddgan.CIFAR10_RECIPE: its appendix and the authors' README command) where train.py's defaults are DDPM's.
_R = ddgan.CIFAR10_RECIPE
DDGAN_DEFAULTS = {
    "diffusion_steps": _R["num_timesteps"], "schedule": _R["schedule"],    # T = 4 on the vp schedule (DDGAN §4)
    "ch": _R["ch"], "ch_mult": ",".join(map(str, _R["ch_mult"])), "num_res_blocks": _R["num_res_blocks"],
    "attn": ",".join(map(str, _R["attn_resolutions"])), "dropout": _R["dropout"],
    "scale_shift_norm": _R["use_scale_shift_norm"],                       # their G conditions on (t, z) by AdaGN
    "batch_size": _R["batch_size"], "lr": _R["lr_g"], "ema": _R["ema_decay"],
    "warmup": 0, "grad_clip": 0.0,                                        # the authors' code has neither
    "steps": math.ceil(_R["epochs"] * 50_000 / _R["batch_size"]),        # 1800 epochs of CIFAR-10's 50k images
}
DDGAN_MIN_LR = 1e-5  # their cosine decay ends at 1e-5 (CosineAnnealingLR(eta_min=1e-5), for G and D alike)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    p = cli.Parser(description="Train a DDPM/iDDPM diffusion model (DDPM Algorithm 1) or a noisy classifier for "
                               "classifier guidance (ADM §4).")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS,
                   help="x_0 ~ q(x_0): CIFAR-10, a folder of images (--data-dir), or a small generated set")
    g.add_argument("--data-dir", default=None, help="CIFAR-10 .npz file or folder of shards, or the image folder of "
                   "--dataset folder (default for cifar10: ./data/cifar10, then ../shared/data/cifar10, then download)")
    g.add_argument("--image-size", type=int, default=32, help="image side in pixels (CIFAR-10: 32)")
    g.add_argument("--synthetic-n", type=int, default=256, help="images in --dataset synthetic")
    g = p.add_argument_group("what to train")
    g.add_argument("--task", default="diffusion", choices=("diffusion", "classifier", "ddgan"),
                   help="diffusion: the eps-model eps_theta(x_t, t); classifier: p_phi(y | x_t, t) for guidance (G4); "
                        "ddgan: a Denoising Diffusion GAN (Xiao et al. 2022), whose untyped flags take DDGAN's "
                        "CIFAR-10 recipe: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                        DDGAN_DEFAULTS.items()))
    g.add_argument("--class-cond", action="store_true",
                   help="condition eps_theta on the class label y (for classifier-free guidance, G5)")
    g.add_argument("--p-uncond", type=float, default=0.1, help="with --class-cond: probability of replacing y by the "
                   "null label, so one network also learns the unconditional model (CFG: 0.1 to 0.2)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES,
                   help="the variances beta_t: linear 1e-4..0.02 (DDPM §4), cosine (iDDPM eq. 17), or the quadratic "
                   "and sigmoid shapes of DDPM's code between the same end points")
    g.add_argument("--diffusion-steps", type=int, default=1000, help="T, the number of forward-process steps (DDPM: 1000)")
    g.add_argument("--loss", default="mse", choices=("mse", "hybrid", "kl"), help="mse: L_simple (DDPM eq. 14); "
                   "hybrid: L_simple + 0.001 L_vlb with learned variances (iDDPM eq. 16); kl: the bound L_vlb")
    g.add_argument("--t-sampler", default="uniform", choices=("uniform", "importance"),
                   help="how t is drawn: uniformly (Algorithm 1 line 3) or p_t ∝ sqrt(E[L_t^2]) (iDDPM §3.3)")
    g = p.add_argument_group("network (defaults: the DDPM CIFAR-10 U-Net, 35.7M parameters)")
    g.add_argument("--ch", type=int, default=128, help="base channel count of the U-Net (DDPM: 128)")
    g.add_argument("--ch-mult", default="1,2,2,2", help="channel multiplier per resolution (DDPM CIFAR-10: 1,2,2,2)")
    g.add_argument("--num-res-blocks", type=int, default=2, help="residual blocks per resolution (DDPM: 2)")
    g.add_argument("--attn", default="16", help="resolutions with self-attention, comma separated, '' for none "
                   "(DDPM: 16; ADM: 32,16,8)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the residual blocks (DDPM CIFAR-10: 0.1)")
    g.add_argument("--num-heads", type=int, default=1, help="attention heads (DDPM: 1; ADM: 4)")
    g.add_argument("--num-head-channels", type=int, default=-1,
                   help="channels per attention head, overriding --num-heads when > 0 (ADM: 64); -1: off")
    g.add_argument("--resblock-updown", action="store_true", help="BigGAN residual blocks for up/downsampling (ADM)")
    g.add_argument("--scale-shift-norm", action="store_true", help="AdaGN: GroupNorm(h)(1 + s) + b from the "
                   "timestep embedding (ADM)")
    g.add_argument("--pool", default="attention", choices=("adaptive", "attention"),
                   help="classifier head: average pooling, or ADM's attention pooling")
    g = p.add_argument_group("DDGAN (--task ddgan; defaults: the paper's CIFAR-10 recipe)")
    g.add_argument("--latent-dim", type=int, default=_R["latent_dim"], help="nz: G(x_t, z, t) draws z ~ N(0, I_nz) "
                   "(DDGAN eq. 6; the paper: 100)")
    g.add_argument("--d-ch", type=int, default=_R["d_ch"], help="base channels of the discriminator D(x_{t-1}, x_t, "
                   "t), an EncoderUNet on the concatenated pair (the paper's ngf: 64)")
    g.add_argument("--lr-d", type=float, default=_R["lr_d"], help="the discriminator's Adam learning rate (the paper: "
                   "1.25e-4; --lr is the generator's, 1.6e-4 under --task ddgan)")
    g.add_argument("--r1-gamma", type=float, default=_R["r1_gamma"], help="gamma of the R1 penalty gamma/2 "
                   "||grad D(real)||^2 (Mescheder et al. 2018 eq. 9; the authors' CIFAR-10 command: 0.02)")
    g.add_argument("--lazy-reg", type=int, default=_R["lazy_reg"], help="R1 on every N-th discriminator step only "
                   "(lazy regularisation, StyleGAN2 §B; the paper: 15)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=800_000, help="training steps (DDPM: 800k on CIFAR-10)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch size, split over processes (DDPM: 128)")
    g.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (DDPM CIFAR-10: 2e-4)")
    g.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps (DDPM: 5000)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (DDPM: none)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (DDPM: 1); 0: off")
    g.add_argument("--ema", type=float, default=0.9999, help="decay of the exponential moving average of the weights "
                   "that samples are drawn from (DDPM: 0.9999), warmed up as min(decay, (1+n)/(10+n))")
    g.add_argument("--max-minutes", type=float, default=0.0, help="time budget: stop (and save) so the whole run, "
                   "end-of-run grid and checkpoint included, ends within it (checked every step; at log steps under "
                   "torchrun); 0: no budget")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run folder (default: runs/<dataset>, runs/<dataset>-classifier)")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly; optimisation "
                   "flags given with it apply from here on")
    g.add_argument("--seed", type=int, default=0, help="initial weights, t, eps and the data order")
    g.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda or cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA)")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU")
    g.add_argument("--log-every", type=int, default=100, help="read the loss from the device and log it every N steps")
    g.add_argument("--save-every", type=int, default=5000, help="checkpoint every N steps ...")
    g.add_argument("--save-minutes", type=float, default=10.0, help="... and after this many minutes without one "
                   "(checked at log steps under torchrun); 0: off")
    g.add_argument("--sample-every", type=int, default=10000, help="EMA sample grid (samples.png) every N steps, "
                   "besides the one at the first checkpoint and at the end; 0: off")
    g.add_argument("--sample-minutes", type=float, default=30.0, help="... and after this many minutes without one; 0: off")
    g.add_argument("--n-sample", type=int, default=64, help="images in the sample grid (fewer when time is short); "
                   "0: no grids at all")
    g.add_argument("--eval-every", type=int, default=5000, help="classifier: test accuracy at 4 noise levels every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar; a log line per --log-every instead")
    return p


def given_flags(parser, argv):
    """The flags the user typed (their dest names): argparse fills a default only where the namespace has nothing,
    so a namespace pre-filled with a sentinel keeps exactly the typed ones."""
    unset = object()
    dests = vars(parser.parse_args(argv)).keys()
    ns = parser.parse_args(argv, argparse.Namespace(**{d: unset for d in dests}))
    return {d for d in dests if getattr(ns, d) is not unset}


def check_args(args):
    """Every number and combination a flag can get wrong: one line naming the flag, before any work."""
    num = cli.check_number
    num("--lr", args.lr, 0, lo_open=True)
    num("--dropout", args.dropout, 0, 1, hi_open=True)
    num("--p-uncond", args.p_uncond, 0, 1, hi_open=True)
    num("--ema", args.ema, 0, 1, hi_open=True)
    if not 0 <= args.seed <= 2 ** 62:  # torch seeds are 64-bit; ranks add 1000 x rank
        raise UsageError(f"--seed: must be an integer from 0 to 2^62, got {args.seed}")
    num("--diffusion-steps", args.diffusion_steps, 1, 100_000)  # DDPM 1000, iDDPM 4000; more is a typo
    for flag in ("--weight-decay", "--grad-clip", "--max-minutes", "--save-minutes", "--sample-minutes", "--warmup",
                 "--sample-every", "--n-sample"):
        num(flag, getattr(args, flag[2:].replace("-", "_")), 0)
    for flag in ("--steps", "--batch-size", "--diffusion-steps", "--ch", "--num-res-blocks", "--image-size",
                 "--log-every", "--save-every", "--eval-every", "--synthetic-n", "--num-heads"):
        num(flag, getattr(args, flag[2:].replace("-", "_")), 1)
    mult = cli.parse_ints(args.ch_mult, "--ch-mult")
    if not mult or min(mult) < 1:
        raise UsageError(f"--ch-mult: expected positive integers like 1,2,2,2, got {args.ch_mult!r}")
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
        num("--lr-d", args.lr_d, 0, lo_open=True)
        num("--r1-gamma", args.r1_gamma, 0)
        for flag in ("--latent-dim", "--d-ch", "--lazy-reg"):
            num(flag, getattr(args, flag[2:].replace("-", "_")), 1)
        if args.compile:  # R1 differentiates D's gradient: torch.compile has no double backward
            raise UsageError("--compile: --task ddgan trains eagerly (R1 needs a double backward); drop --compile")
        if args.grad_clip > 0:  # ddgan.ddgan_train_step steps its optimizers itself, unclipped, as the paper
            raise UsageError("--grad-clip: --task ddgan does not clip gradients (nor does the paper); drop --grad-clip")
    if args.dataset == "synthetic" and args.data_dir is not None:
        raise UsageError("--data-dir: --dataset synthetic generates its images; drop --data-dir")
    if args.compile:
        cli.check_compiler()


# ----------------------------------------------------------------------------------------------------------------
# The network, the optimiser, the EMA and the one training step (bench.py times `train_step` itself)
# ----------------------------------------------------------------------------------------------------------------

def build_model_args(args, num_classes, channels):
    """(kind, keyword arguments) of the network the flags describe: checkpoint.KINDS[kind](**kwargs) builds it."""
    kw = dict(image_size=args.image_size, in_channels=channels, ch=args.ch,
              ch_mult=tuple(cli.parse_ints(args.ch_mult, "--ch-mult")), num_res_blocks=args.num_res_blocks,
              attn_resolutions=tuple(cli.parse_ints(args.attn, "--attn")), dropout=args.dropout,
              num_heads=args.num_heads, num_head_channels=args.num_head_channels,
              resblock_updown=args.resblock_updown, use_scale_shift_norm=args.scale_shift_norm)
    if args.task == "classifier":
        return "classifier", dict(kw, out_dim=num_classes, pool=args.pool)
    if args.task == "ddgan":
        # DDGAN's generator G(x_t, z, t) -> x_0' (DDGAN eq. 6): the U-Net with z ~ N(0, I_nz) added to its embedding
        return "ddgan", dict(kw, latent_dim=args.latent_dim)
    # --class-cond: K classes plus the null label of classifier-free guidance; learned variances double the output
    return "diffusion", dict(kw, num_classes=num_classes if args.class_cond else None, learn_sigma=args.loss != "mse")


def discriminator_args_of(args, channels):
    """D(x_{t-1}, x_t, t) of --task ddgan: unet.EncoderUNet on the pair concatenated along the channels (2C in), one
    logit out (DDGAN §3.2), --d-ch base channels, G's resolutions and blocks, average pooling and no attention (their
    CIFAR-10 discriminator is a plain ResNet; R1's double backward through attention would also need the slow
    math kernel)."""
    return dict(image_size=args.image_size, in_channels=2 * channels, ch=args.d_ch,
                ch_mult=tuple(cli.parse_ints(args.ch_mult, "--ch-mult")), num_res_blocks=args.num_res_blocks,
                attn_resolutions=(), dropout=0.0, use_scale_shift_norm=args.scale_shift_norm, out_dim=1,
                pool="adaptive")


def diffusion_args_of(args):
    """The diffusion's own settings, as a checkpoint stores them: L_simple samples with sigma_t^2 = beta_t
    (DDPM's CIFAR-10 choice); the hybrid and kl losses learn the variance (iDDPM eq. 15). DDGAN's chain needs only
    the schedule: its reverse step is the posterior q(x_{t-1} | x_t, x_0') (F3), no variance choice."""
    if args.task == "ddgan":
        return dict(schedule=args.schedule, timesteps=args.diffusion_steps)
    return dict(schedule=args.schedule, timesteps=args.diffusion_steps,
                var_type="fixed_large" if args.loss == "mse" else "learned_range", loss_type=args.loss)


def make_optimizer(model, args, lr=None):
    """AdamW, fused: one kernel per step on CUDA, one multithreaded loop on a CPU (3x faster there than the default
    for-each AdamW: 7.5 vs 25 ms a step for a 9M-parameter U-Net on 2 cores, BENCHMARKS.md), and on both its step
    count stays a tensor the host never reads. The learning rate is set every step by `get_lr`.
    --task ddgan: betas (0.5, 0.9) for G and D, as DDGAN trains both (and most GANs since DCGAN)."""
    betas = ddgan.CIFAR10_RECIPE["adam_betas"] if args.task == "ddgan" else (0.9, 0.999)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=args.lr if lr is None else lr, betas=betas,
                             weight_decay=args.weight_decay, fused=fused)


def get_lr(step, args, base=None):
    """The learning rate of step `step` (0-based): linear warm-up over --warmup steps (DDPM: 5000), then constant.
    --task ddgan: cosine decay from `base` (--lr for G, --lr-d for D) to 1e-5 at --steps, as the authors' code
    (CosineAnnealingLR, here per step rather than per epoch), after the warm-up (none in their recipe)."""
    base = args.lr if base is None else base
    lr = base * min(1.0, (step + 1) / max(1, args.warmup))
    if args.task == "ddgan":
        low = min(DDGAN_MIN_LR, base)
        lr = low + (lr - low) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    return lr


class EMA:
    """The exponential moving average of the weights; every sample is drawn from it (DDPM §4: decay 0.9999).

        theta_ema <- d theta_ema + (1 - d) theta,     d = min(decay, (1 + n) / (10 + n)) at update n

    The warm-up (d = 0.1, 0.18, 0.25, ... for the first updates) lets the average follow the fast-changing early
    weights; with a constant 0.9999 the EMA of a 10k-step run would still be 37% random initialisation. One fused
    _foreach_lerp_ over parameter lists built once; the count n lives on the host, so an update never waits.
    """

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        self.averaged = [p.detach() for p in self.module.parameters()]
        self.current = [p.detach() for p in model.parameters()]
        self.buffers = list(zip(self.module.buffers(), model.buffers()))  # none in this U-Net; copied if any

    @torch.no_grad()
    def update(self):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.averaged, self.current, 1.0 - d)  # theta_ema + (1 - d) (theta - theta_ema)
        for b_ema, b in self.buffers:
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self):
        """The averaged weights (what a checkpoint's "ema" holds); `updates` is saved beside them."""
        return self.module.state_dict()

    def load_state_dict(self, state, updates):
        self.module.load_state_dict(state)  # copies into the same tensors: the lists above stay valid
        self.updates = int(updates)


def gather_all(t, losses):
    """Every rank's (t, loss) pairs, so every rank's importance sampler keeps the same history."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, losses
    n = dist.get_world_size()
    ts, ls = [torch.empty_like(t) for _ in range(n)], [torch.empty_like(losses) for _ in range(n)]
    dist.all_gather(ts, t)
    dist.all_gather(ls, losses)
    return torch.cat(ts), torch.cat(ls)


def loss_of(net, diffusion, x0, y, args, t_sampler=None):
    """The minibatch loss (0-dim) that line 5 of Algorithm 1 descends, or G4's cross-entropy for the classifier."""
    if args.task == "classifier":
        # G4 (ADM §4): -log p_phi(y | x_t, t) at x_t = q_sample(x_0, t), t ~ Uniform({1, ..., T})
        return noisy_classifier_loss(diffusion, net, x0, y)["loss"].mean()
    kwargs = {}
    if args.class_cond:
        # G5 (CFG): with probability p_uncond the label becomes the null class (index K), so the same network
        # learns eps_theta(x_t, t) and eps_theta(x_t, t, y)
        drop = torch.rand(y.shape, device=y.device) < args.p_uncond
        kwargs["y"] = torch.where(drop, torch.full_like(y, args.num_classes), y)
    if t_sampler is None:
        # lines 3-5: t ~ Uniform, eps ~ N(0, I), || eps - eps_theta(x_t, t) ||^2 (DDPM eq. 14; or iDDPM's hybrid)
        return diffusion.training_losses(net, x0, model_kwargs=kwargs)["loss"].mean()
    # I3 (iDDPM §3.3): t ~ p_t ∝ sqrt(E[L_t^2]), each term weighted by 1 / (T p_t): an unbiased estimate of the
    # uniform-t loss with less variance
    t, weights = t_sampler.sample(x0.shape[0])
    terms = diffusion.training_losses(net, x0, t, model_kwargs=kwargs)
    t_sampler.update(*gather_all(t, terms.get("vb", terms["loss"]).detach()))
    return (terms["loss"] * weights).mean()


def train_step(step, x0, y, model, net, diffusion, optimizer, ema, args, t_sampler=None):
    """One gradient step of Algorithm 1 (line 5) on the batch (x0, y); returns its loss, left on the device.

    model: the network whose parameters train (clipped, averaged); net: what runs the forward (model itself, or model
    wrapped by DistributedDataParallel and/or torch.compile). Nothing here waits for the device.
    """
    # the learning rate of this step (warm-up, then constant)
    lr = get_lr(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # forward: the loss (bf16 autocast on CUDA)
    with cli.autocast(x0.device, args.precision):
        loss = loss_of(net, diffusion, x0, y, args, t_sampler)
    # backward, clip the global gradient norm (DDPM: 1), AdamW update
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    # the moving average the samples come from
    ema.update()
    return loss.detach()


def train_step_ddgan(step, x0, G, D, diffusion, opt_g, opt_d, ema, args):
    """One DDGAN iteration on the batch x0 (a D step, then a G step: ddgan.ddgan_train_step, DDGAN eqs. 4-6 with R1);
    returns [d_loss, g_loss], left on the device.

    A function of its own rather than a branch of `train_step`: two networks, two optimizers and a penalty on every
    --lazy-reg-th step share nothing with Algorithm 1's one loss, and `train_step` stays what bench.py times.
    """
    # the learning rates of this step: cosine decay to 1e-5 from --lr (G) and --lr-d (D)
    for opt, base in ((opt_g, args.lr), (opt_d, args.lr_d)):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, args, base)
    with cli.autocast(x0.device, args.precision):
        # D: softplus(-D(real)) + softplus(D(fake)) (DDGAN eq. 4), + gamma/2 ||grad D(real)||^2 (R1, Mescheder et al.
        # eq. 9) on every --lazy-reg-th step only (lazy regularisation, same gamma, as the authors' code);
        # G: softplus(-D(fake)) (DDGAN eq. 5), x_{t-1} ~ q(x_{t-1} | x_t, x_0' = G(x_t, z, t)) (DDGAN eq. 6)
        out = ddgan.ddgan_train_step(diffusion, G, D, opt_g, opt_d, x0, args.latent_dim, args.r1_gamma,
                                     apply_r1=step % args.lazy_reg == 0)
    # the moving average of G's weights, which samples are drawn from
    ema.update()
    return torch.stack([out["d_loss"], out["g_loss"]]).float()


# ----------------------------------------------------------------------------------------------------------------
# The run folder: one writer at a time, never another run's files, the history of every start in config.json
# ----------------------------------------------------------------------------------------------------------------

def lock_run_folder(out):
    """Hold an exclusive lock on out/train.lock for as long as this process trains (the OS drops it if we die)."""
    f = open(os.path.join(out, "train.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UsageError(f"--out: {out} is in use by another train.py (pid {holder}); wait for it to finish, stop it, "
                         f"or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def trim_metrics(path, step):
    """Cut metrics.jsonl back to the checkpoint's step: steps redone after a resume must not appear twice."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill is dropped
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def write_config(run, event, changed):
    """config.json: the run's flags now, and its history (each start/resume: step, time, processes, flags changed)."""
    path = os.path.join(run.out, "config.json")
    history = []
    if event == "resume" and os.path.isfile(path):
        try:
            with open(path) as f:
                history = json.load(f).get("history", [])
        except (OSError, ValueError, AttributeError):
            pass
    entry = {"event": event, "step": run.step, "time": datetime.now().isoformat(timespec="seconds"),
             "processes": run.world_size}
    if changed:
        entry["changed"] = {k: {"from": a, "to": b} for k, (a, b) in changed.items()}
    with open(path + ".tmp", "w") as f:
        json.dump(dict(run.cfg, history=history + [entry]), f, indent=1)
    os.replace(path + ".tmp", path)


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


def resume_command(run):
    """The exact command that continues this run."""
    launcher = f"torchrun --nproc_per_node={run.world_size} train.py" if run.world_size > 1 else "python train.py"
    device = f" --device {run.args.device}" if "device" in run.given else ""
    return f"{launcher} --resume --out {shlex.quote(run.out)}{device}"


# ----------------------------------------------------------------------------------------------------------------
# Setup: every check that can fail on the user's input runs here, before any work
# ----------------------------------------------------------------------------------------------------------------

def setup(argv):
    """Parse and check the command line, lock the run folder, load the data, build (or resume) everything."""
    t_start = time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if args.task == "ddgan":  # the paper's recipe wherever the user typed nothing (DDGAN_DEFAULTS)
        for key, value in DDGAN_DEFAULTS.items():
            if key not in given:
                setattr(args, key, value)
    check_args(args)
    out = args.out or os.path.join("runs", args.dataset + ("" if args.task == "diffusion" else f"-{args.task}"))
    ckpt_path = os.path.join(out, checkpoint.FILENAME)
    rank, world_size, device = cli.distributed(args.device)  # torchrun: the process group, cuda:LOCAL_RANK
    run = SimpleNamespace(args=args, given=given, out=out, ckpt_path=ckpt_path, rank=rank, world_size=world_size,
                          is_main=rank == 0, device=device, step=0, saved_step=None, lock=None, metrics=None,
                          grids=0, last_loss=None)
    made = missing_folders(out) if run.is_main else []  # what check_writable_dir will create
    try:
        setup_run(run, t_start)
    except BaseException:
        close(run)
        remove_if_unused(made)  # a refused start leaves no run folder behind (train.lock was all it held)
        raise
    return run


def missing_folders(path):
    """The folders of `path` that do not exist yet, deepest first: what os.makedirs(path) would create."""
    made, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def remove_if_unused(made):
    """Remove the folders this process created (deepest first), each only if it holds nothing but train.lock."""
    for folder in made:
        try:
            if os.path.isfile(os.path.join(folder, "train.lock")) and os.listdir(folder) == ["train.lock"]:
                os.remove(os.path.join(folder, "train.lock"))
            os.rmdir(folder)  # fails, harmlessly, on a folder that holds anything else
        except OSError:
            return


def setup_run(run, t_start):
    args, device = run.args, run.device
    if run.is_main:
        cli.check_writable_dir(run.out, "--out")
        run.lock = lock_run_folder(run.out)  # before anything in the folder is read or written
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(run.out, f))]
        if found and not args.resume:  # a new run never appends to or overwrites another run's files
            raise UsageError(f"--out: {run.out} already holds another run's {', '.join(found)}; pass --resume to "
                             f"continue it (with its ckpt.pt) or choose another --out")
        for tmp in checkpoint.remove_stale_temporaries(run.out):
            say(f"removed {tmp} (a temporary checkpoint left by a process that died while saving)")
    if args.resume and not os.path.isfile(run.ckpt_path):
        raise UsageError(f"--resume: no checkpoint at {run.ckpt_path}; start without --resume or point --out at "
                         f"the run")

    # -- resume: the checkpoint's flags, with the optimisation flags typed now -------------------------------------
    ckpt, changed = None, {}
    if args.resume:
        ckpt = checkpoint.load(run.ckpt_path, "--resume")
        changed = apply_resume_flags(args, run.given, ckpt["config"], run.out)
        check_args(args)
        run.step = run.saved_step = ckpt["step"]
        if args.steps <= run.step:
            raise UsageError(f"--steps: the run in {run.out} is already at step {run.step}; pass --steps above "
                             f"{run.step} to train on")
    if args.task == "ddgan" and run.world_size > 1:
        raise UsageError("--task: ddgan trains in one process (R1's double backward is not supported by "
                         "DistributedDataParallel); run python train.py without torchrun")
    if args.batch_size % run.world_size:
        raise UsageError(f"--batch-size: {args.batch_size} is not divisible by the {run.world_size} processes; "
                         f"use a multiple of {run.world_size}")

    # -- data: the whole uint8 set on the device, batches drawn there (data.Batches) ---------------------------------
    if run.is_main:
        say(f"run folder: {run.out} ({f'resuming step {run.step:,}' if args.resume else 'new run'})")
        say(f"loading the {args.dataset} training images ...")
    x, y = data.load_dataset(args.dataset, args.data_dir, args.image_size, split="train", synthetic_n=args.synthetic_n)
    run.source = data.last_loaded  # the path actually found, announced below
    args.num_classes = ckpt["config"]["num_classes"] if ckpt else int(y.max()) + 1
    run.batches = data.Batches(x, y, args.batch_size // run.world_size, device, seed=args.seed, rank=run.rank,
                               world_size=run.world_size, flip=True, channels_last=device.type == "cuda")
    run.cfg = {k: v for k, v in vars(args).items() if k not in RUNTIME}
    run.cfg.update(n_train=int(x.shape[0]), channels=int(x.shape[1]))

    # -- the network (the same initial weights on every rank), the diffusion, AdamW, the EMA -----------------------
    torch.manual_seed(args.seed)
    if ckpt:  # the network the checkpoint describes, not what today's defaults would build
        run.kind, model_args = ckpt["kind"], ckpt["model_args"]
    else:
        run.kind, model_args = build_model_args(args, args.num_classes, int(x.shape[1]))
    check_memory(run.kind, model_args, device)
    model = checkpoint.KINDS[run.kind](**model_args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run.diffusion_args = diffusion_args_of(args)
    run.diffusion = checkpoint.build_diffusion(run.diffusion_args)
    run.optimizer = make_optimizer(model, args)
    run.ema = EMA(model, args.ema)
    run.disc = run.opt_d = None
    run.loss_names = ("d_loss", "g_loss") if run.kind == "ddgan" else ("loss",)
    if run.kind == "ddgan":  # DDGAN's discriminator D(x_{t-1}, x_t, t) and its own Adam (--lr-d)
        run.disc_args = ckpt["discriminator_args"] if ckpt else discriminator_args_of(args, int(x.shape[1]))
        run.disc = EncoderUNet(**run.disc_args).to(device)
        if device.type == "cuda":
            run.disc = run.disc.to(memory_format=torch.channels_last)
        run.opt_d = make_optimizer(run.disc, args, lr=args.lr_d)
    run.t_sampler = (ImportanceSampler(run.diffusion.num_timesteps, device=device)
                     if args.t_sampler == "importance" else None)
    if ckpt:
        resume_state(run, model, ckpt)
    else:
        torch.manual_seed(args.seed + 1000 * run.rank)  # different t and eps on every rank
    run.model, run.net = model, model
    if run.world_size > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    if args.compile:
        run.net = torch.compile(run.net)
    run.probe = make_probe(run, x, y)
    run.probe_ref = probe_loss(run)  # the loss of the starting weights on the probe: what "exploded" compares with
    run.good_lr = ckpt["config"]["lr"] if ckpt else None

    # -- the clock: the budget counts from the start of setup ------------------------------------------------------
    now = time.perf_counter()
    run.times = SimpleNamespace(start=t_start, saved=now, sampled=now, step_s=0.0,
                                save_s=estimate_save_seconds(model), deadline=t_start + 60 * args.max_minutes
                                if args.max_minutes else math.inf)
    if run.is_main:
        if args.resume:
            trim_metrics(os.path.join(run.out, "metrics.jsonl"), run.step)
        write_config(run, "resume" if args.resume else "start", changed)
        run.metrics = open(os.path.join(run.out, "metrics.jsonl"), "a")
        announce(run, x, changed, ckpt)
    run.test_set = load_test_set(run) if args.task == "classifier" and run.is_main else None


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


def resume_state(run, model, ckpt):
    """Everything an uninterrupted run would hold at the checkpoint's step: weights, EMA, optimizer, data order,
    importance-sampler history and every rank's random state."""
    args = run.args
    model.load_state_dict(ckpt["model"])
    run.ema.load_state_dict(ckpt["ema"], ckpt["ema_updates"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.disc is not None:  # --task ddgan: the discriminator and its optimizer
        run.disc.load_state_dict(ckpt["discriminator"])
        run.opt_d.load_state_dict(ckpt["optimizer_d"])
    for opt in (run.optimizer, run.opt_d):
        for group in opt.param_groups if opt is not None else ():  # --weight-decay may have changed; lr: every step
            group["weight_decay"] = args.weight_decay
    state = ckpt["batches"]
    if state["world_size"] != run.world_size:
        # another number of processes: the same epoch and the same fraction of it, split the new way
        state = dict(state, world_size=run.world_size,
                     pos=state["pos"] * (state["n"] // run.world_size) // (state["n"] // state["world_size"]))
        if run.is_main:
            say(f"resuming on {run.world_size} process(es), saved on {ckpt['batches']['world_size']}: training "
                f"continues, but the data order and noise are no longer those of the uninterrupted run")
    run.batches.load_state_dict(state)
    if run.t_sampler is not None:
        run.t_sampler.load_state_dict(ckpt["t_sampler"])
    rngs = ckpt["rng"]
    if run.rank < len(rngs) and len(rngs) == run.world_size:
        torch.set_rng_state(rngs[run.rank]["cpu"])
        if run.device.type == "cuda" and "cuda" in rngs[run.rank]:
            torch.cuda.set_rng_state(rngs[run.rank]["cuda"], run.device)
    else:
        torch.manual_seed(args.seed + 1000 * run.rank + run.step)


def load_test_set(run):
    """Held-out images for the classifier's accuracy: 2,000 test images with every class (the files are grouped by
    class, hence a stride)."""
    args = run.args
    say(f"loading the {args.dataset} test images for the classifier's accuracy ...")
    x, y = data.load_dataset(args.dataset, args.data_dir, args.image_size, split="test", synthetic_n=args.synthetic_n)
    stride = max(1, x.shape[0] // 2000)
    return data.to_float(x[::stride]).to(run.device), y[::stride].to(run.device)


def make_probe(run, x, y):
    """A fixed batch (8 training images, 8 spread t, fixed eps) on which `save` measures the loss of the weights it
    is about to write: comparable from save to save, and drawn from its own generator (the training stream is
    untouched, so saves never change what the run computes). Small: on a CPU it costs 1/50 of a training step."""
    n, T = min(8, x.shape[0]), run.diffusion.num_timesteps
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(x0=data.to_float(x[:n]).to(run.device), y=y[:n].to(run.device),
                           t=(torch.arange(n) * (T - 1) // max(n - 1, 1)).to(run.device),  # 0 ... T-1
                           noise=torch.randn((n, *x.shape[1:]), generator=g).to(run.device))


@torch.no_grad()
def probe_loss(run):
    """The loss of the current weights on the probe batch, in eval mode (no dropout) and fp32: the check that what a
    checkpoint holds still computes a sane loss (a diverging step can leave finite but useless weights)."""
    p, model = run.probe, run.model
    model.eval()
    if run.kind == "ddgan":
        # D's loss (DDGAN eq. 4, no R1) + G's (eq. 5) on fixed pairs at every t, with z and noise from a fixed seed
        g = torch.Generator(run.device).manual_seed(0)
        x_prev, x_t = ddgan.q_sample_pairs(run.diffusion, p.x0, p.t, g)
        fake, _ = ddgan.denoising_step(run.diffusion, model, x_t, p.t, run.args.latent_dim, False, g)
        loss = ddgan.discriminator_loss(run.diffusion, run.disc, x_prev, fake, x_t, p.t)["loss"]
        loss = loss + ddgan.generator_loss(run.diffusion, run.disc, fake, x_t, p.t)
        model.train()
        return loss.item()
    if run.args.task == "classifier":
        loss = noisy_classifier_loss(run.diffusion, model, p.x0, p.y, p.t, torch.Generator(run.device).manual_seed(0))
    else:
        kwargs = {"y": p.y} if run.args.class_cond else {}
        loss = run.diffusion.training_losses(model, p.x0, p.t, noise=p.noise, model_kwargs=kwargs)
    model.train()
    return loss["loss"].mean().item()


def estimate_save_seconds(model):
    """A first guess of a save's time before one is measured: model + EMA + AdamW's two moments at ~200 MB/s, and
    a second or so to draw loss.png."""
    return 1.5 + 16 * sum(p.numel() for p in model.parameters()) / 200e6


def announce(run, x, changed, ckpt):
    """What the user needs to know before the first step: data, device, model, and when outputs will appear."""
    args = run.args
    say(f"data: {run.source}: {x.shape[0]:,} images {x.shape[1]}x{x.shape[2]}x{x.shape[3]}, "
        f"{args.num_classes} classes")
    threads = f" ({torch.get_num_threads()} threads)" if run.device.type == "cpu" else ""
    say(f"device: {run.device}{threads}, precision: {cli.precision_name(run.device, args.precision)}, "
        f"{run.world_size} process(es), batch {args.batch_size} ({args.batch_size // run.world_size} per process)")
    params = sum(p.numel() for p in run.model.parameters())
    what = (f"{args.loss} loss, {args.schedule} schedule, T={args.diffusion_steps}" if args.task == "diffusion"
            else f"noisy classifier over {args.num_classes} classes, T={args.diffusion_steps}")
    if args.task == "ddgan":
        d_params = sum(p.numel() for p in run.disc.parameters())
        what = (f"DDGAN generator (nz {args.latent_dim}) + EncoderUNet discriminator, {d_params / 1e6:.2f}M parameters; "
                f"{args.schedule} schedule, T={args.diffusion_steps}, R1 gamma {args.r1_gamma:g} every {args.lazy_reg} "
                f"steps")
    say(f"model: {type(run.model).__name__}, {params / 1e6:.2f}M parameters; {what}")
    if changed:
        say("resume: " + ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())
            + " (applied from here on; recorded in config.json)")
    minutes = f" or after {args.save_minutes:g} min, whichever comes first" if args.save_minutes else ""
    first = min(args.steps, (run.step // args.save_every + 1) * args.save_every)
    grid = ", with a sample grid (samples.png)" if args.task in ("diffusion", "ddgan") and args.n_sample else ""
    say(f"first checkpoint: step {first:,}{minutes}{grid}; then every {args.save_every:,} steps; loss.png is "
        f"redrawn at every save" + (f"; the run stops within --max-minutes {args.max_minutes:g}" if args.max_minutes
                                    else ""))


# ----------------------------------------------------------------------------------------------------------------
# What a step ends with: saves, grids, stops (the one place that reads the wall clock and signals)
# ----------------------------------------------------------------------------------------------------------------

STOP = {"signum": 0, "at": 0.0, "second": 0, "window": 0.0, "quiet": False}


def on_signal(signum, frame):
    """SIGINT / SIGTERM: the first one finishes the step and saves; a second one stops at once (no save)."""
    now = time.monotonic()
    if STOP["signum"]:
        if now - STOP["at"] < STOP["window"]:
            return  # under torchrun a Ctrl-C reaches each worker twice (the terminal's and torchrun's): one request
        STOP["second"] = signum
        raise KeyboardInterrupt
    STOP["signum"], STOP["at"] = signum, now
    if not STOP["quiet"]:  # a raw write: safe even if the signal interrupted a print
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (Ctrl-C again "
                    f"to stop at once, without saving)\n".encode())


def what_now(run):
    """What the step just done ends with: save? sample? evaluate? stop (and why)?

    The step cadences are plain arithmetic. The wall clock (--max-minutes, --save-minutes, --sample-minutes) and the
    stop signal are read every step in one process (host only, no device sync); under torchrun they are read at log
    steps and combined over the ranks in one all_reduce(MAX), so every rank takes the same decision at the same step.
    """
    args, step, t = run.args, run.step, run.times
    grids = args.task in ("diffusion", "ddgan") and args.n_sample > 0
    due = SimpleNamespace(save=step % args.save_every == 0, stop=None,
                          sample=grids and args.sample_every > 0 and step % args.sample_every == 0,
                          evaluate=args.task == "classifier" and step % args.eval_every == 0)
    if run.world_size == 1 or step % args.log_every == 0:
        now = time.perf_counter()
        save_due = args.save_minutes > 0 and now - t.saved >= 60 * args.save_minutes
        # out of time: going on to the next check, with the save due now (if any) and the final one, would overrun
        reserve = t.step_s * (1 if run.world_size == 1 else args.log_every) + t.save_s * (1 + (due.save or save_due))
        flags = [args.max_minutes > 0 and now + reserve >= t.deadline, save_due,
                 args.sample_minutes > 0 and now - t.sampled >= 60 * args.sample_minutes, STOP["signum"]]
        if run.world_size > 1:
            flags = torch.tensor([int(f) for f in flags], device=run.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.tolist()
        out_of_time, save_due, sample_due, signum = flags
        due.save |= bool(save_due)
        due.sample |= bool(sample_due) and grids
        if signum:
            due.stop = signal.Signals(signum)
        elif out_of_time:
            due.stop = "time"
    if due.stop is None and step >= args.steps:
        due.stop = "steps"
    if due.stop:
        # the end: always a checkpoint; a final grid / accuracy unless a signal asked to stop
        due.save = True
        due.sample = grids and not isinstance(due.stop, signal.Signals)
        due.evaluate = args.task == "classifier" and not isinstance(due.stop, signal.Signals)
    due.sample |= due.save and run.grids == 0 and grids  # a first grid with the first checkpoint
    return due


# ----------------------------------------------------------------------------------------------------------------
# The loop: Algorithm 1
# ----------------------------------------------------------------------------------------------------------------

class RunFailed(Exception):
    """The run cannot go on (it diverged, or a save failed): one line, exit 1."""


def train(run):
    """Algorithm 1 until --steps, the time budget, a signal or a failure. Returns why it stopped."""
    args, model = run.args, run.model
    # summed on the device, read every --log-every steps: [loss], or [d_loss, g_loss] for --task ddgan
    loss_sum = torch.zeros(len(run.loss_names), device=run.device)
    n_since, t_log = 0, time.perf_counter()
    bar = cli.progress(args.steps, "train", unit="step", disable=not run.is_main or args.no_progress,
                       initial=run.step)
    STOP.update(signum=0, second=0, window=2.0 if run.world_size > 1 else 0.0, quiet=not run.is_main)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    model.train()
    try:
        while True:
            # -- lines 2-5: x_0 ~ q(x_0) (drawn on the device) and one gradient step
            x0, y = run.batches.next()
            if run.kind == "ddgan":  # DDGAN: a D step and a G step (DDGAN eqs. 4-6)
                loss_sum += train_step_ddgan(run.step, x0, model, run.disc, run.diffusion, run.optimizer, run.opt_d,
                                             run.ema, args)
            else:
                loss_sum += train_step(run.step, x0, y, model, run.net, run.diffusion, run.optimizer, run.ema, args,
                                       run.t_sampler)
            run.step += 1
            n_since += 1
            bar.update(1)

            # -- what this step ends with: cadences, wall clock and signals, agreed by every rank
            due = what_now(run)

            # -- the classifier's accuracy on held-out images at 4 noise levels (G4), for the log line
            t0, accuracy = time.perf_counter(), {}
            if due.evaluate and run.is_main:
                accuracy = evaluate_classifier(run, final=bool(due.stop))
            t_log += time.perf_counter() - t0  # img/s counts training only

            # -- log: the one host-device sync, every --log-every steps and before every save
            if run.step % args.log_every == 0 or due.save or due.evaluate:
                if run.world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= run.world_size
                now = time.perf_counter()
                means, run.times.step_s = (loss_sum / n_since).tolist(), (now - t_log) / n_since
                for name, value in zip(run.loss_names, means):
                    if not math.isfinite(value):
                        raise RunFailed(diverged(run, f"the {name} is {value}"))
                run.last_loss = means[0] if len(means) == 1 else dict(zip(run.loss_names, means))
                log(run, bar, dict(zip(run.loss_names, means)), n_since * args.batch_size / (now - t_log), accuracy)
                loss_sum.zero_()
                n_since, t_log = 0, time.perf_counter()

            # -- checkpoint (never a bad one) and the loss curve; a sample grid from the EMA weights (shrunk or
            #    skipped when time is short)
            t0 = time.perf_counter()
            if due.save:
                save(run)
            if due.sample and run.is_main:
                sample_grid(run, final=bool(due.stop))
            t_log += time.perf_counter() - t0

            if due.stop:
                return due.stop
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)


def log(run, bar, losses, img_s, accuracy):
    """One line of metrics.jsonl, and the bar's postfix (or a printed line with --no-progress).
    losses: {"loss": ...}, or {"d_loss": ..., "g_loss": ...} for --task ddgan."""
    args = run.args
    if not run.is_main:
        return
    elapsed = time.perf_counter() - run.times.start
    record = {"step": run.step, **{k: round(v, 6) for k, v in losses.items()}, "lr": get_lr(run.step - 1, args),
              "img_per_s": round(img_s, 2), "elapsed_s": round(elapsed, 1), **accuracy}
    if run.device.type == "cuda":
        record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(run.device) / 2 ** 30, 2)
    run.metrics.write(json.dumps(record) + "\n")
    run.metrics.flush()
    rate = f"{img_s:,.0f}" if img_s >= 10 else f"{img_s:.2g}"
    shown = ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
    bar.set_postfix_str(f"{shown}, {rate} img/s", refresh=False)
    if args.no_progress:
        eta = cli.human_time((args.steps - run.step) * run.times.step_s)
        say(f"step {run.step:,}/{args.steps:,} | {shown.replace(', ', ' | ')} | {rate} img/s | ETA {eta}")


def diverged(run, what):
    """The one-line story of a diverged run: what, where, and how to go on from the last good checkpoint."""
    # a tenth of the current learning rate, or the one the last good checkpoint was trained with if that is lower
    lr = f"{min(run.args.lr / 10, run.good_lr or math.inf):.3g}"
    if run.saved_step is not None and os.path.isfile(run.ckpt_path):
        advice = (f"the last good checkpoint is {run.ckpt_path} (step {run.saved_step:,}); resume it with a lower "
                  f"learning rate: {resume_command(run)} --lr {lr}")
    else:
        advice = f"no checkpoint was saved before it; start again with a lower learning rate (e.g. --lr {lr})"
    return f"{what} at step {run.step:,}: the run diverged, and nothing from it was saved; {advice}"


def save(run):
    """Write the checkpoint (rank 0; every rank's random state is gathered first), then redraw loss.png."""
    t0 = time.perf_counter()
    # never keep bad work: the weights about to be saved must be finite and still compute a sane loss on the probe
    # batch (not 10x above the last good checkpoint's). The weights are identical on every rank: each rank checks,
    # all stop alike. (The loss of the steps that produced them was checked by the log just before.)
    bad = checkpoint.non_finite_count(run.model.state_dict()) + checkpoint.non_finite_count(run.ema.state_dict())
    if run.disc is not None:
        bad += checkpoint.non_finite_count(run.disc.state_dict())
    if bad:
        raise RunFailed(diverged(run, f"{bad:,} weights are not finite (the last logged loss was {run.last_loss})"))
    probe = probe_loss(run)
    if not math.isfinite(probe) or probe > 10 * run.probe_ref + 10:
        raise RunFailed(diverged(run, f"the new weights give a loss of {probe:.4g} on a fixed batch ({run.probe_ref:.4g} "
                                      f"at the last good checkpoint)"))
    rng = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    rngs = [rng]
    if run.world_size > 1:  # every rank's random state, so a resumed run draws exactly the same t and noise
        rngs = [None] * run.world_size
        dist.all_gather_object(rngs, rng)
    if run.is_main:
        ckpt = {"format": checkpoint.FORMAT, "kind": run.kind, "model_args": run.model.config,
                "diffusion_args": run.diffusion_args, "model": run.model.state_dict(), "ema": run.ema.state_dict(),
                "step": run.step, "config": run.cfg,
                # train.py's own state, for an exact --resume
                "ema_updates": run.ema.updates, "optimizer": run.optimizer.state_dict(),
                "batches": run.batches.state_dict(), "rng": rngs,
                "t_sampler": run.t_sampler.state_dict() if run.t_sampler is not None else None}
        if run.disc is not None:  # --task ddgan: model/ema are G; D and its optimizer, to resume exactly
            ckpt.update(discriminator_args=run.disc_args, discriminator=run.disc.state_dict(),
                        optimizer_d=run.opt_d.state_dict())
        try:
            checkpoint.save(ckpt, run.ckpt_path)
        except checkpoint.NonFiniteError as e:  # the check above already caught it; this is the library's guard
            raise RunFailed(diverged(run, str(e))) from None
        except OSError as e:
            before = (f"the previous checkpoint (step {run.saved_step:,}) is intact; free some space, then resume: "
                      f"{resume_command(run)}" if run.saved_step is not None else
                      "no checkpoint exists yet; free some space and start again")
            raise RunFailed(f"could not write {run.ckpt_path} at step {run.step:,} ({e.strerror or e}): the partial "
                            f"file was removed and {before}") from None
        cli.wrote(run.ckpt_path, f"step {run.step:,}")
        plot_loss(os.path.join(run.out, "metrics.jsonl"), os.path.join(run.out, "loss.png"))
    run.saved_step, run.probe_ref, run.good_lr = run.step, probe, run.args.lr
    run.times.saved = time.perf_counter()
    run.times.save_s = run.times.saved - t0


def extra_budget(run, final):
    """Seconds a grid or an accuracy check may take now: 5% of the run so far (at least EXTRA_MIN_SECONDS), and
    never past the --max-minutes deadline (with room for one more save, unless this is the end)."""
    now = time.perf_counter()
    budget = max(EXTRA_MIN_SECONDS, 0.05 * (now - run.times.start))
    return min(budget, run.times.deadline - now - (0 if final else run.times.save_s + run.times.step_s))


def sample_grid(run, final):
    """samples.png (and samples_<step>.png): DDIM from the EMA weights, fixed noise so grids compare across steps.
    The number of images fits the time budget, estimated from the measured step time (a training step costs about
    3 forwards per image, one DDIM step 1)."""
    args = run.args
    run.grids += 1
    run.times.sampled = time.perf_counter()
    steps = min(GRID_STEPS, run.diffusion.num_timesteps)
    method = "DDGAN" if run.kind == "ddgan" else "DDIM"  # DDGAN: all T steps of its chain (T = 4)
    per_image = steps * run.times.step_s / (3 * (args.batch_size // run.world_size))
    budget = extra_budget(run, final)
    n = min(args.n_sample, int(budget / per_image) if per_image > 0 else args.n_sample)
    if n < min(4, args.n_sample):
        least = min(4, args.n_sample)
        allowed = (f"only {cli.human_time(max(budget, 0))} of --max-minutes is left" if budget < EXTRA_MIN_SECONDS
                   else f"a grid may take {cli.human_time(budget)} now (5% of the run so far, at least "
                        f"{EXTRA_MIN_SECONDS} s)")
        say(f"step {run.step:,}: sample grid skipped: {least} images would take ~{cli.human_time(least * per_image)} "
            f"({method} {steps} steps), and {allowed}")
        return
    if n < args.n_sample:
        n = max(4, math.isqrt(n) ** 2)  # a full square grid
    if n < args.n_sample or n * per_image > 2:  # a smaller grid than asked is always said, however fast
        shrunk = f" (of --n-sample {args.n_sample}: the time left allows {n})" if n < args.n_sample else ""
        say(f"step {run.step:,}: sampling {n} images{shrunk} with {method} {steps} steps from the EMA weights, "
            f"~{cli.human_time(n * per_image)} ...")
    g = torch.Generator(run.device).manual_seed(args.seed)
    kwargs = {"y": torch.arange(n, device=run.device) % args.num_classes} if args.class_cond else {}
    shape = (n, run.cfg["channels"], args.image_size, args.image_size)
    with cli.autocast(run.device, args.precision):
        if run.kind == "ddgan":  # DG4: the EMA generator's T-step chain, x_0' -> posterior (DDGAN eq. 6)
            imgs = ddgan.ddgan_sample_loop(run.diffusion, run.ema.module, shape, args.latent_dim, generator=g,
                                           device=run.device)
        else:
            imgs = ddim_sample_loop(run.diffusion.respace(steps), run.ema.module, shape, generator=g,
                                    model_kwargs=kwargs, device=run.device)
    try:
        data.save_grid(imgs.float(), os.path.join(run.out, f"samples_{run.step:07d}.png"))
        data.save_grid(imgs.float(), os.path.join(run.out, "samples.png"))
    except OSError as e:
        say(f"warning: could not write samples.png ({e.strerror or e})")
        return
    cli.wrote(os.path.join(run.out, "samples.png"), f"{n} EMA samples at step {run.step:,}")


def evaluate_classifier(run, final):
    """{acc_t<t>: accuracy} of the EMA classifier on held-out images noised to t = 0, T/4, T/2, 3T/4 (G4), on as
    many of the 2,000 test images as the time budget allows."""
    xt, yt = run.test_set
    per_image = 4 * run.times.step_s / (3 * (run.args.batch_size // run.world_size))
    budget = extra_budget(run, final)
    n = min(xt.shape[0], int(budget / per_image) if per_image > 0 else xt.shape[0])
    if n < min(50, xt.shape[0]):
        say(f"step {run.step:,}: classifier accuracy skipped: {min(50, xt.shape[0])} test images would take "
            f"~{cli.human_time(min(50, xt.shape[0]) * per_image)}")
        return {}
    if n * per_image > 2:
        say(f"step {run.step:,}: classifier accuracy on {n:,} test images at 4 noise levels, "
            f"~{cli.human_time(n * per_image)} ...")
    stride = xt.shape[0] // n
    with cli.autocast(run.device, run.args.precision):
        acc = classifier_accuracy_at(run.diffusion, run.ema.module, xt[::stride][:n], yt[::stride][:n],
                                     generator=torch.Generator(run.device).manual_seed(0))
    say(f"step {run.step:,}: test accuracy at noise level " + ", ".join(f"t={t}: {a:.3f}" for t, a in acc.items()))
    return {f"acc_t{t}": round(float(a), 4) for t, a in acc.items()}


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


# ----------------------------------------------------------------------------------------------------------------
# The end: what was written, and what to run next
# ----------------------------------------------------------------------------------------------------------------

def finish(run, outcome):
    """Print what happened and the next command; returns the exit code (0, or 128 + signal)."""
    args, out = run.args, run.out
    if outcome == "interrupted":  # a second signal during a step or a save: stop now, nothing more written
        code = 128 + (STOP["second"] or signal.SIGINT)
        if run.is_main:
            last = (f"the last checkpoint is {run.ckpt_path} (step {run.saved_step:,})" if run.saved_step is not None
                    else "no checkpoint was saved")
            say(f"stopped at once at step {run.step:,} by a second signal: nothing saved since; {last}")
        return code
    if not run.is_main:
        return 128 + outcome if isinstance(outcome, signal.Signals) else 0
    elapsed = cli.human_time(time.perf_counter() - run.times.start)
    files = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if args.task == "diffusion":
        nxt = f"python sample.py --checkpoint {shlex.quote(out)} --sampler ddim --steps 50"
    elif args.task == "ddgan":
        nxt = f"python sample.py --checkpoint {shlex.quote(out)} --sampler ddgan"
    else:  # a classifier guides a diffusion run of the same data
        nxt = (f"python sample.py --checkpoint runs/{args.dataset} --classifier {shlex.quote(out)} --classifier-scale 4 "
               f"--class {min(3, args.num_classes - 1)}")
    if isinstance(outcome, signal.Signals):
        say(f"stopped by {outcome.name} at step {run.step:,} after {elapsed}: saved {run.ckpt_path}")
        say(f"resume with: {resume_command(run)}")
        return 128 + outcome
    why = f"--max-minutes {args.max_minutes:g} reached" if outcome == "time" else "done"
    say(f"{why}: step {run.step:,}/{args.steps:,} in {elapsed}; wrote in {out}: {', '.join(files)}")
    if outcome == "time":
        say(f"resume with: {resume_command(run)}")
    say(f"next: {nxt}")
    return 0


def out_of_memory(run):
    """The one line for a device that ran out of memory mid-run (the batch, not the network, is what to shrink)."""
    if run.saved_step is not None:
        last = (f"the checkpoint {run.ckpt_path} (step {run.saved_step:,}) is intact: resume it on more processes "
                f"(torchrun splits the same batch), or start a new run with a lower --batch-size")
    else:
        last = "nothing was saved: start again with a lower --batch-size"
    return (f"out of {run.device.type} memory at step {run.step + 1:,} with {run.args.batch_size // run.world_size} "
            f"images per process; {last}")


def close(run):
    """Release what the process holds: the metrics file, the run folder's lock, the process group."""
    if run.metrics is not None:
        run.metrics.close()
        run.metrics = None
    if run.lock is not None:
        run.lock.close()  # closing the file drops the flock
        run.lock = None
    if run.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    """python train.py ...: exit 0 when done; 2 on bad input (one line, before any work); 1 when the run diverged
    or a save failed (one line); 130 / 143 after a SIGINT / SIGTERM (checkpoint saved)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run = cli.main_guard(setup, argv, catch_signals=False)
    except KeyboardInterrupt:
        print("interrupted before training started: nothing was written", file=sys.stderr)
        sys.exit(130)
    try:
        outcome = train(run)
    except (RunFailed, torch.OutOfMemoryError) as e:
        print(f"error: {e if isinstance(e, RunFailed) else out_of_memory(run)}", file=sys.stderr)
        sys.exit(1)
    finally:
        close(run)
    code = finish(run, outcome)
    if code:
        sys.exit(code)
    return run


if __name__ == "__main__":
    main()
