"""
Speed, side by side: training and DDIM-sampling throughput of this repository's DDPM CIFAR-10 U-Net against
diffusers' port of the same network and lucidrains' denoising_diffusion_pytorch U-Net of the same width, in one run.

    python benchmarks/bench.py                     # GPU: the full benchmark, a markdown table for BENCHMARKS.md
    python benchmarks/bench.py --json bench.json   # ... and every number (repeat times included) as JSON
    python benchmarks/bench.py --profile prof      # ... then profiles this repo's rows: traces, time by category
    python benchmarks/bench.py --peers none --no-compile                  # this repository only, eager only
    python benchmarks/bench.py --tiny              # seconds on a CPU: a tiny U-Net, batch 4 (what the tests run)

train: images/s of one training step at --batch-size 128, the median of --repeats timed runs after --warmup steps.
For this repository "one step" is train.py's own `train_step`; the peers run the same harness (optimizer, clipping,
EMA, data, bf16 autocast, layout) around their own network and loss. sample: images/s of DDIM-50 against diffusers'
DDIMPipeline and lucidrains' sampler. FLOPs are counted on the meta device (FlopCounterMode); MFU is over the
device's datasheet bf16 peak, beside "% of ceiling" over a measured matmul. Rows are timed interleaved (all set up
and warmed up first, then rounds with the order rotated), synchronising only around each timed repeat.

The peers are optional (`pip install diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4`); a missing one gets a row
saying how to install it. BENCHMARKS.md says exactly what each row measures, how to run this on a GPU machine
without network (wheels carried), and records every result.
"""

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library files

import torch  # noqa: E402
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
import cli
import data
import sampling
import train
from cli import UsageError
from ddim import ddim_sample_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PEERS = ("diffusers", "lucidrains")
PEER_PACKAGES = {"diffusers": "diffusers==0.42.1", "lucidrains": "denoising-diffusion-pytorch==2.3.4"}
PEERS_HINT = "pip install " + " ".join(PEER_PACKAGES.values())
# the default (full) run and the --tiny run; an explicit flag wins over both
FULL_SIZE = dict(batch_size=128, repeats=5, steps_per_repeat=20, warmup=5, sample_n=1000, sample_batch=500,
                sample_steps=50)
TINY_SIZE = dict(batch_size=4, repeats=2, steps_per_repeat=2, warmup=1, sample_n=8, sample_batch=4,
                     sample_steps=5)
FORMATS = ("channels_last", "contiguous")
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s: the MFU denominator. The first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first. H100 SXM's name is
# "NVIDIA H100 80GB HBM3".
DATASHEET_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4),
                    ("H200", 989.4), ("A100", 312.0))
# the tiny network (all three implementations get its analogue): 16x16 images, two levels, attention at 8x8
TINY_ARCH = ["--image-size", "16", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn", "8"]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    p = cli.Parser(description="Training and sampling throughput of this repo's U-Net against diffusers and "
                                 "denoising_diffusion_pytorch (see the module docstring).")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net and tiny counts: the script's own test, seconds "
                   "on a CPU (defaults: " + ", ".join(f"{k} {v}" for k, v in TINY_SIZE.items()) + ")")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats; the median is reported (default 5)")
    p.add_argument("--steps-per-repeat", type=int, default=None, help="training steps per timed repeat (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 5)")
    p.add_argument("--sample-n", type=int, default=None, help="images per timed sampling repeat (default 1000; "
                   "0: no sampling rows)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default 500)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the torch.compile rows for this repo: train.py --compile's training step, and sampling "
                        "with sample.py --compile (CUDA graphs on CUDA) (default: on CUDA yes, on CPU no: inductor "
                        "compiles for a minute there)")
    p.add_argument("--formats", default=None, metavar="LIST",
                   help="memory formats of this repo's eager rows, comma-separated from channels_last, contiguous; "
                        "the first is the baseline and the one every other row uses (default: on CUDA "
                        "channels_last,contiguous, i.e. both measured; on CPU contiguous)")
    p.add_argument("--tasks", default="train,sample", metavar="LIST",
                   help="which tables: train, sample or both (default train,sample)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOPS",
                   help="the device's dense bf16 datasheet peak for the MFU column, where bench.DATASHEET_TFLOPS does "
                        "not know the device")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile this repo's training step and sampling step with torch.profiler: "
                        "a trace per row in DIR (.json.gz, for chrome://tracing or Perfetto), and device time by "
                        "category and the top kernels in the report")
    p.add_argument("--peers", default="all", choices=("all", "none") + PEERS, help="which libraries to compare with")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all results to this JSON file")
    p.add_argument("--commit", default=None, help="commit to print (default: read from .git when there is one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --json file, or traces in --profile")
    return p


def resolve_args(args):
    """Fill the defaults (full or --tiny) and check the numbers; a UsageError names the flag."""
    for key, value in (TINY_SIZE if args.tiny else FULL_SIZE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, lo, hi in (("batch_size", 1, cli.MAX_BATCH), ("repeats", 1, 10_000), ("steps_per_repeat", 1, 10 ** 6),
                         ("sample_batch", 1, cli.MAX_BATCH), ("sample_steps", 1, 1000), ("warmup", 0, 10 ** 6),
                         ("sample_n", 0, cli.MAX_IMAGES)):
        cli.check_number(f"--{flag.replace('_', '-')}", getattr(args, flag), lo=lo, hi=hi, integer=True)
    cli.check_seed("--seed", args.seed)
    cli.check_names([("--json", args.json), ("--profile", args.profile)])
    if args.sample_steps > 1000:
        raise UsageError(f"--sample-steps: must be at most the 1000 diffusion steps, got {args.sample_steps}")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json: folder {folder} does not exist; create it or pick another path")
        if os.path.exists(args.json) and not args.force:  # an earlier run's numbers are never replaced silently
            raise UsageError(f"--json: {args.json} already exists; pass --force to replace it or choose another name")
    if args.formats is not None:
        args.formats = tuple(cli.parse_list(args.formats, "--formats", allowed=FORMATS))
    args.tasks = tuple(cli.parse_list(args.tasks, "--tasks", allowed=("train", "sample")))
    if args.sample_n == 0:
        args.tasks = tuple(t for t in args.tasks if t != "sample")  # --sample-n 0: no sampling rows
    if not args.tasks:
        raise UsageError("--sample-n 0 leaves no table to run with --tasks sample; give --sample-n > 0")
    if args.peak_tflops is not None:  # TFLOP/s, dense bf16: no chip is near 10^6
        cli.check_number("--peak-tflops", args.peak_tflops, lo=0, hi=1e6, lo_open=True)
    if args.profile is not None:
        parent = os.path.dirname(os.path.abspath(args.profile))
        if not os.path.isdir(parent):
            raise UsageError(f"--profile: folder {parent} does not exist; create it or pick another path")
        if os.path.exists(args.profile) and not os.path.isdir(args.profile):
            raise UsageError(f"--profile: {args.profile} is a file; give a folder for the traces")
        if os.path.isdir(args.profile) and os.listdir(args.profile) and not args.force:
            raise UsageError(f"--profile: {args.profile} already holds files (an earlier profile?); pass --force to "
                             f"write over its traces or choose another folder")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The three networks, all from one description (the default config, or the tiny one)
# ----------------------------------------------------------------------------------------------------------------

def our_config(tiny):
    """train.py's flags at their defaults (the DDPM CIFAR-10 recipe), or for the tiny network, with the network they
    build: cfg.model_args (UNet(**cfg.model_args)) and cfg.diffusion_args."""
    cfg = train.build_parser().parse_args(TINY_ARCH if tiny else [])
    cfg.num_classes = 10
    _, cfg.model_args = train.build_model_args(cfg, num_classes=10, channels=3)
    cfg.diffusion_args = dict(schedule=cfg.schedule, timesteps=cfg.diffusion_steps)
    return cfg


def arch_of(cfg):
    """(image size, channels per level, res blocks, resolutions with attention, dropout) of a config."""
    m = cfg.model_args
    return (m["image_size"], [m["ch"] * k for k in m["ch_mult"]], m["num_res_blocks"], set(m["attn_resolutions"]),
            m["dropout"])


def build_ours(cfg):
    return checkpoint.KINDS["diffusion"](**cfg.model_args)


def import_diffusers():
    import diffusers
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    return diffusers.__version__, UNet2DModel, DDPMScheduler, DDIMScheduler, DDIMPipeline


def import_lucidrains():
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from denoising_diffusion_pytorch.version import __version__
    return __version__, Unet, GaussianDiffusion


def build_diffusers_unet(cfg):
    """UNet2DModel as in google/ddpm-cifar10-32's config.json (for the default config), dropout as ours."""
    UNet2DModel = import_diffusers()[1]
    size, channels, blocks, attn, dropout = arch_of(cfg)
    res = [size // 2 ** i for i in range(len(channels))]
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res))
    # the remaining values are the DDPM port's: one attention head (attention_head_dim None = all channels),
    # DDPM's downsampling (padding 0 in the convolution, after DDPM's asymmetric (0, 1, 0, 1) pad), sin-then-cos embedding shifted by 1, GroupNorm eps 1e-6
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                       layers_per_block=blocks, down_block_types=down, up_block_types=up, attention_head_dim=None,
                       downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
                       dropout=dropout, act_fn="silu", time_embedding_type="positional")


def build_lucidrains_unet(cfg):
    """lucidrains' Unet with our width and multipliers (its own block layout; see the module docstring)."""
    Unet = import_lucidrains()[1]
    _, _, _, _, dropout = arch_of(cfg)
    mult = tuple(cfg.model_args["ch_mult"])
    with contextlib.redirect_stdout(sys.stderr):  # it prints which attention kernel it picked: keep stdout the table
        return Unet(dim=cfg.model_args["ch"], dim_mults=mult, dropout=dropout, flash_attn=True)


def lucidrains_diffusion(unet, cfg, sampling_steps=None):
    GaussianDiffusion = import_lucidrains()[2]
    # pred_noise + linear betas: the DDPM recipe (its defaults are pred_v and a sigmoid schedule); the data are
    # already in [-1, 1], so no normalisation inside
    return GaussianDiffusion(unet, image_size=cfg.image_size, timesteps=cfg.diffusion_steps,
                             sampling_timesteps=sampling_steps, objective="pred_noise", beta_schedule="linear",
                             auto_normalize=False)


# model(x, t) -> eps for each network, for FLOP counting
FORWARD = {
    "ours": lambda m, x, t: m(x, t),
    "diffusers": lambda m, x, t: m(x, t, return_dict=False)[0],
    "lucidrains": lambda m, x, t: m(x, t),
}
BUILD = {"ours": build_ours, "diffusers": build_diffusers_unet, "lucidrains": build_lucidrains_unet}


def peer_version(name):
    return (import_diffusers if name == "diffusers" else import_lucidrains)()[0]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and the device's peak
# ----------------------------------------------------------------------------------------------------------------

def count_flops(fn):
    """FLOPs of everything fn() runs, as torch's FlopCounterMode counts them (2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def model_flops(build, forward, image_size, channels=3, device="meta"):
    """(forward FLOPs, forward + backward FLOPs) of one image through the network `build()` makes.

    On the meta device nothing is computed: shapes only, so the 35.7M-parameter U-Net counts in a second on a CPU.
    """
    with torch.device(device):
        model = build()
        x = torch.randn(1, channels, image_size, image_size)
        t = torch.full((1,), 500, dtype=torch.long)
    model.train()
    fwd = count_flops(lambda: forward(model, x, t))

    def fwd_bwd():
        forward(model, x, t).float().square().mean().backward()

    return fwd, count_flops(fwd_bwd)


def network_flops(name, cfg):
    """model_flops on meta tensors, or with a real batch of one on the CPU where a library breaks on meta."""
    build, forward = (lambda: BUILD[name](cfg)), FORWARD[name]
    try:
        return model_flops(build, forward, cfg.image_size)
    except Exception:
        return model_flops(build, forward, cfg.image_size, device="cpu")


def datasheet_tflops(name):
    """The dense bf16 datasheet peak of a GPU named `name` (TFLOP/s), or None for a device not in the table."""
    return next((tf for key, tf in DATASHEET_TFLOPS if key in name), None)


def matmul_peak(device, dtype, n, iters, repeats=3):
    """Measured FLOP/s of a square n x n x n matmul of random data in `dtype` (the MFU denominator): the best of
    `repeats` timings of `iters` products, after as many untimed ones (the clocks ramp up first)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = timed_repeats(lambda: a @ b, device, iters, repeats, iters)
    return 2 * n ** 3 * iters / min(times)


def conv_peak(device, dtype, batch, iters, repeats=3):
    """Measured FLOP/s of a 256 -> 256 channel 3x3 convolution on 32x32 maps, `batch` images (no bias, no grad): the
    U-Net's own kind of work. On a CPU this is the ceiling: oneDNN's convolutions beat MKL's matmul (on AMD EPYC,
    where MKL takes a slower path: 0.17-0.20 against 0.29-0.44 TFLOP/s on 2 cores), so a matmul alone reads as >100%."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(batch, 256, 32, 32, device=device, dtype=dtype)
    times = timed_repeats(lambda: conv(x), device, iters, repeats, iters)
    return 2 * 256 * 256 * 9 * 32 * 32 * batch * iters / min(times)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_repeats(fn, device, warmup, repeats, calls):
    """Seconds of each of `repeats` runs of `calls` calls of fn, after `warmup` untimed calls.

    The only host-device synchronisations are the ones before and after each repeat.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_syncs(fn, device):
    """Host-device synchronisations fn() makes (CUDA only; None elsewhere), from torch's sync debug mode."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def dezero(model):
    """Fill weight tensors that are exactly zero (zero-initialised output layers) with small random values: GPUs
    multiply zeros faster than data, which would flatter the network that zero-initialises more layers."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 1e-3)
    return model


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------------
# One training step, the same harness for every network
# ----------------------------------------------------------------------------------------------------------------

def random_batches(cfg, args, device, fmt):
    """A device-resident uint8 "dataset" of random images, drawn by data.Batches as train.py draws CIFAR-10."""
    n = max(64, 8 * args.batch_size)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    return data.Batches(x, torch.zeros(n, dtype=torch.long), args.batch_size, device, seed=args.seed, flip=True,
                        channels_last=fmt == "channels_last")


def in_format(module, fmt):
    return module.to(memory_format=torch.channels_last) if fmt == "channels_last" else module


def our_training_step(cfg, args, device, fmt, compiled=False):
    """A function running one step of train.py exactly: its `train_step` on its network, optimizer and EMA."""
    torch.manual_seed(0)
    model = in_format(dezero(build_ours(cfg)).to(device), fmt)
    net = torch.compile(model) if compiled else model  # as train.py --compile
    diffusion = checkpoint.build_diffusion(cfg.diffusion_args)
    batches = random_batches(cfg, args, device, fmt)
    optimizer, ema = train.make_optimizer(model, cfg), train.EMA(model, cfg.ema)
    state = {"step": 0, "loss_sum": torch.zeros((), device=device)}
    model.train()

    def step():
        x0, y = batches.next()
        state["loss_sum"] += train.train_step(state["step"], x0, y, model, net, diffusion, optimizer, ema, cfg)
        state["step"] += 1

    step.loss_sum = lambda: state["loss_sum"]
    step.model = model
    return step


def peer_training_step(model, loss_of, cfg, args, device, fmt="contiguous"):
    """train.train_step's harness around a peer's `model` and `loss_of(x0) -> 0-dim loss`: the same data, warm-up
    learning rate, autocast, clipping, AdamW and EMA (built by train.py's own make_optimizer and EMA)."""
    batches = random_batches(cfg, args, device, fmt)
    optimizer, ema = train.make_optimizer(model, cfg), train.EMA(model, cfg.ema)
    state = {"step": 0, "loss_sum": torch.zeros((), device=device)}
    model.train()

    def step():
        x0, _ = batches.next()
        for group in optimizer.param_groups:
            group["lr"] = train.get_lr(state["step"], cfg)
        with cli.autocast(device, cfg.precision):
            loss = loss_of(x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema.update()
        state["loss_sum"] += loss.detach()
        state["step"] += 1

    step.loss_sum = lambda: state["loss_sum"]
    step.model, step.optimizer, step.ema = model, optimizer, ema
    return step


def peer_setup(impl, cfg, device, fmt):
    """(model whose parameters train, loss_of(x0)) for a peer implementation."""
    torch.manual_seed(0)
    if impl == "diffusers":
        DDPMScheduler = import_diffusers()[2]
        model = in_format(dezero(build_diffusers_unet(cfg)).to(device), fmt)
        scheduler = DDPMScheduler(num_train_timesteps=cfg.diffusion_steps, beta_schedule="linear",
                                  beta_start=1e-4, beta_end=0.02)
        T = cfg.diffusion_steps

        def loss_of(x0):
            noise = torch.randn_like(x0)
            t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
            eps = model(scheduler.add_noise(x0, noise, t), t, return_dict=False)[0]
            return F.mse_loss(eps.float(), noise)

        return model, loss_of
    if impl == "lucidrains":
        unet = dezero(build_lucidrains_unet(cfg))
        diffusion = in_format(lucidrains_diffusion(unet, cfg).to(device), fmt)
        return diffusion, lambda x0: diffusion(x0)
    raise ValueError(impl)


def sample_setup(impl, cfg, args, device, fmt, compiled=False):
    """draw(n): n images with DDIM (args.sample_steps steps) for one implementation, random weights.

    draw.params is the network's parameter count.
    """
    amp = cli.autocast(device, "auto")
    size = cfg.image_size
    torch.manual_seed(0)
    if impl == "ours":
        # what sample.py does with a run's EMA weights: eval, no grad, channels_last on CUDA; DDIM under bf16
        # autocast; with --compile, sample.py's sampling.Compiled (torch.compile; on CUDA with CUDA graphs)
        model = in_format(dezero(build_ours(cfg)).to(device).eval().requires_grad_(False), fmt)
        net = sampling.Compiled(model, device) if compiled else model
        diffusion = checkpoint.build_diffusion(cfg.diffusion_args).respace(args.sample_steps)

        def draw(n):
            with amp:
                return ddim_sample_loop(diffusion, net, (n, 3, size, size), device=device)

        draw.params = sum(p.numel() for p in model.parameters())
        draw.net = net
        return draw
    if impl == "diffusers":
        _, _, _, DDIMScheduler, DDIMPipeline = import_diffusers()
        unet = in_format(dezero(build_diffusers_unet(cfg)).to(device).eval().requires_grad_(False), fmt)
        scheduler = DDIMScheduler(num_train_timesteps=cfg.diffusion_steps, beta_schedule="linear",
                                  beta_start=1e-4, beta_end=0.02, clip_sample=True)
        pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)

        def draw(n):
            with amp:
                return pipe(batch_size=n, num_inference_steps=args.sample_steps, eta=0.0, output_type="pt").images

        draw.params = sum(p.numel() for p in unet.parameters())
        return draw
    if impl == "lucidrains":
        import denoising_diffusion_pytorch.denoising_diffusion_pytorch as lucid
        lucid.tqdm = lambda iterable, *a, **k: iterable  # its sampling loop has a progress bar and no switch
        unet = dezero(build_lucidrains_unet(cfg))
        diffusion = lucidrains_diffusion(unet, cfg, sampling_steps=args.sample_steps).to(device).eval()
        diffusion = in_format(diffusion.requires_grad_(False), fmt)

        def draw(n):
            with amp:
                return diffusion.sample(batch_size=n)

        draw.params = sum(p.numel() for p in unet.parameters())
        return draw
    raise ValueError(impl)


# ----------------------------------------------------------------------------------------------------------------
# Rows: what each line of a table runs
# ----------------------------------------------------------------------------------------------------------------

def label_of(impl, version=None, compiled=False, fmt=None):
    if impl == "ours":
        how = "torch.compile" if compiled else "eager"
        return f"this repo ({how}{', ' + fmt if fmt else ''})"
    name = "diffusers" if impl == "diffusers" else "denoising_diffusion_pytorch"
    return f"{name} {version}" if version else name


class Runner:
    """What the timing loop needs of a row: warm it up, run one timed repeat, then its row's other numbers."""

    def __init__(self, call, calls, images, warmup, finish, profile_calls):
        self.call, self.calls, self.images = call, calls, images
        self.warmup, self.finish, self.profile_calls = warmup, finish, profile_calls

    def repeat(self):
        for _ in range(self.calls):
            self.call()


def train_runner(impl, cfg, args, device, fmt, compiled=False):
    """A training row: `steps_per_repeat` steps of batch_size images per repeat, after `warmup` steps (at least one
    for a compiled step: compilation is never timed)."""
    if impl == "ours":
        step = our_training_step(cfg, args, device, fmt, compiled)
    else:
        step = peer_training_step(*peer_setup(impl, cfg, device, fmt), cfg, args, device, fmt)

    def warmup():
        for _ in range(max(args.warmup, 1 if compiled else 0)):
            step()

    def finish():
        syncs = count_syncs(step, device)
        loss = float(step.loss_sum())  # read once, after timing: the steps really ran and produced numbers
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss is {loss}")
        return {"syncs": syncs, "params": sum(p.numel() for p in step.model.parameters() if p.requires_grad)}

    return Runner(step, args.steps_per_repeat, args.batch_size * args.steps_per_repeat, warmup, finish,
                  profile_calls=min(args.steps_per_repeat, 5))


def sample_runner(impl, cfg, args, device, fmt, compiled=False):
    """A sampling row: all --sample-n images in batches of --sample-batch per repeat, after one untimed draw of every
    batch size the repeat uses (a compiled network compiles once per shape: never while timed)."""
    draw = sample_setup(impl, cfg, args, device, fmt, compiled)
    sizes = [min(args.sample_batch, args.sample_n - i) for i in range(0, args.sample_n, args.sample_batch)]

    def all_images():
        for n in sizes:
            draw(n)

    def warmup():
        for n in dict.fromkeys(sizes):
            out = draw(n)
            if tuple(out.shape) != (n, 3, cfg.image_size, cfg.image_size):
                raise RuntimeError(f"drew images of shape {tuple(out.shape)}")

    def finish():
        return {"syncs": count_syncs(lambda: draw(sizes[0]), device), "params": draw.params,
                "batch": args.sample_batch}

    runner = Runner(all_images, 1, args.sample_n, warmup, finish, profile_calls=1)
    runner.profile_call = lambda: draw(sizes[0])  # one batch: the sampling loop, its 50 network calls and steps
    return runner


def plan_rows(args, cfg, device, flops, peers, compiled):
    """The rows of both tables, in order, each with `make` (-> Runner) or a status saying why it cannot run."""
    formats = args.formats
    rows = []
    for task in args.tasks:
        runner = train_runner if task == "train" else sample_runner
        for fmt in formats:
            key = "ours" if fmt == formats[0] else f"ours@{fmt}"
            rows.append(dict(task=task, key=key, impl=label_of("ours", fmt=fmt if len(formats) > 1 else None),
                             flops=flops.get("ours"), to_profile=fmt == formats[0], format=fmt,
                             make=lambda r=runner, f=fmt: r("ours", cfg, args, device, f)))
        if compiled:
            rows.append(dict(task=task, key="ours+compile", impl=label_of("ours", compiled=True),
                             flops=flops.get("ours"), to_profile=True, format=formats[0],
                             make=lambda r=runner: r("ours", cfg, args, device, formats[0], compiled=True)))
        for name, label, missing in peers:
            row = dict(task=task, key=name, impl=label, flops=flops.get(name), format=formats[0])
            if missing:
                row["status"] = missing
            else:
                row["make"] = lambda r=runner, n=name: r(n, cfg, args, device, formats[0])
            rows.append(row)
    return rows


def peer_status(name):
    """(version, None) when the library imports, else (None, 'not installed (...)')."""
    try:
        return peer_version(name), None
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        return None, f"not installed ({PEERS_HINT}; import failed: {missing})"


# ----------------------------------------------------------------------------------------------------------------
# Timing, interleaved
# ----------------------------------------------------------------------------------------------------------------

def error_status(e):
    traceback.print_exc()
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def guarded(run):
    """Run a row; an exception becomes the row's status (with its traceback on stderr), not the end of the run."""
    try:
        return dict(run(), status="ok")
    except Exception as e:
        return {"status": error_status(e)}


def allocated(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure(rows, args, device):
    """Time the rows of one table interleaved: set up and warm up every row, then run `repeats` rounds, each timing
    one repeat of every row in turn, the order rotated by one each round. A clock that ramps or throttles, or a busy
    neighbour, then touches every row alike instead of whichever ran last. Each row's img/s is from its median repeat.

    All rows of the table are resident together. A row's peak memory is what it holds (its weights, optimizer, EMA,
    data; measured across its set-up and warm-up) plus the most any of its repeats allocated on top (CUDA only).
    With --profile, the rows marked for it are profiled after timing (profile_runner).
    """
    live = set_up(rows, device)
    for k in range(args.repeats):
        time_round(live, k, args, device)
    finish_rows(live, args, device)
    live.clear()  # the last row's network and optimizer go now, before the next table's
    free_memory(device)
    torch._dynamo.reset()


def set_up(rows, device):
    """Every row's runner built and warmed up, and the memory it holds: [(row, runner)]; a row that fails to set up
    gets its status and no runner."""
    live = []
    for row in rows:
        if "make" not in row:
            continue
        log(f"{row['task']}: {row['impl']}: setting up, warming up ...")
        before = allocated(device)
        try:
            runner = row.pop("make")()
            runner.warmup()
            sync(device)
        except Exception as e:
            row["status"] = error_status(e)
            continue
        row.update(times_s=[], resident=allocated(device) - before, transient=0)
        live.append((row, runner))
    return live


def time_round(live, k, args, device):
    """Round k: one timed repeat of every live row, starting at row k (the order rotated each round)."""
    turn = live[k % len(live):] + live[:k % len(live)] if live else []
    for row, runner in turn:
        if "status" in row:
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = allocated(device)
        try:
            t0 = time.perf_counter()
            runner.repeat()
            sync(device)
            row["times_s"].append(time.perf_counter() - t0)
        except Exception as e:
            row["status"] = error_status(e)
            continue
        if device.type == "cuda":
            row["transient"] = max(row["transient"], torch.cuda.max_memory_allocated(device) - base)
    log(f"round {k + 1}/{args.repeats}: " + ", ".join(
        f"{row['impl']} {runner.images / row['times_s'][-1]:.1f} img/s" for row, runner in turn
        if "status" not in row))


def finish_rows(live, args, device):
    """Each live row's result: its runner's own numbers, img/s from the median repeat, peak memory, and (--profile)
    its profile."""
    for row, runner in live:
        if "status" not in row:
            try:
                row.update(runner.finish())
                row["img_per_s"] = runner.images / statistics.median(row["times_s"])
                row["status"] = "ok"
            except Exception as e:
                row["status"] = error_status(e)
        resident, transient = row.pop("resident"), row.pop("transient")
        row["peak_mem_gib"] = round((resident + transient) / 2 ** 30, 2) if device.type == "cuda" else None
        if row.pop("to_profile", False) and args.profile and row["status"] == "ok":
            row["profile"] = guarded(lambda: profile_runner(runner, row, args.profile, device))


# ----------------------------------------------------------------------------------------------------------------
# Where the time goes (--profile)
# ----------------------------------------------------------------------------------------------------------------

# kernel or operator name -> category, first match wins (names lower-cased). On CUDA these are kernel names
# (cuDNN/CUTLASS convolutions are "...fprop/dgrad/wgrad..." or "...conv..."; layout changes are nchwToNhwc /
# nhwcToNchw or copies); on a CPU, aten operator names.
CATEGORIES = (
    # inductor's kernels (CUDA: triton_*; CPU: fused C++ inside "## Call CompiledFxGraph ... ##") name the ops they
    # fuse: first, or they would scatter over the categories below
    ("compiled (inductor)", ("triton", "compiledfxgraph", "cpp_fused", "compiledfunction", "torchdynamo")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("copy / layout / cast", ("nchwtonhwc", "nhwctonchw", "copy", "contiguous", "clone", "transpose", "permute")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
    ("matmul", ("gemm", "matmul", "addmm", "bmm", "aten::mm", "cutlass", "cublas", "linear")),
    # PyTorch's CUDA GroupNorm is RowwiseMoments + ComputeFusedParams (+ GammaBetaBackward, ...) kernels
    ("normalization", ("group_norm", "groupnorm", "layer_norm", "batch_norm", "rowwisemoments", "fusedparams",
                       "gammabeta")),
    ("optimizer / EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("reduction", ("reduce", "sum", "mean", "norm")),
    ("elementwise", ("elementwise", "silu", "sigmoid", "add", "mul", "sub", "div", "where", "fill", "cat", "index",
                     "vectorized", "random", "bernoulli", "dropout", "gelu", "relu", "pow", "sqrt", "exp", "clamp",
                     "upsample")),
)


def category_of(name):
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_runner(runner, row, folder, device):
    """torch.profiler over a few calls of a row (training steps, or one sampling batch): the trace, and the time per
    call by category and by kernel (device time on CUDA: kernels; self CPU time on a CPU: operators)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    call = getattr(runner, "profile_call", runner.call)
    calls = runner.profile_calls
    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities, acc_events=True) as prof:  # one cycle; True silences torch 2.11's warning
        for _ in range(calls):
            call()
        sync(device)
    wall = (time.perf_counter() - t0) / calls
    name = f"{row['task']}_{row['key'].replace('+', '_').replace('@', '_')}.json.gz"
    trace = os.path.join(folder, name)
    prof.export_chrome_trace(trace)
    events = list(prof.key_averages())
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA] or \
                  [e for e in events if getattr(e, "self_device_time_total", 0) > 0]
        times = {e.key: (e.self_device_time_total, e.count) for e in kernels}
    else:
        times = {e.key: (e.self_cpu_time_total, e.count) for e in events if e.device_type == DeviceType.CPU}
    total = sum(t for t, _ in times.values()) or 1e-9
    by_cat = {}
    for key, (t, _) in times.items():
        by_cat[category_of(key)] = by_cat.get(category_of(key), 0.0) + t
    top = sorted(times.items(), key=lambda kv: -kv[1][0])[:15]
    log(f"  profiled {row['impl']} ({calls} call{'s' if calls > 1 else ''}): {trace}")
    return {
        "trace": trace, "calls": calls, "what": "kernels (device time)" if cuda else "operators (self CPU time)",
        "wall_ms_per_call": 1e3 * wall, "busy_ms_per_call": total / 1e3 / calls,
        "launches_per_call": sum(c for _, c in times.values()) / calls,
        "categories": sorted(((cat, t / 1e3 / calls, t / total) for cat, t in by_cat.items()), key=lambda c: -c[1]),
        "top": [(key, t / 1e3 / calls, c / calls, t / total) for key, (t, c) in top],
    }


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def git_commit():
    """The checked-out commit, read from .git without running git (None where there is none). In a worktree .git is
    a file naming the real git folder; branch refs may live in the common folder it shares with the main tree."""
    git = os.path.join(ROOT, ".git")
    try:
        if os.path.isfile(git):
            with open(git) as f:
                git = os.path.join(ROOT, f.read().strip().removeprefix("gitdir: "))
        common = git
        if os.path.isfile(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as f:
                common = os.path.normpath(os.path.join(git, f.read().strip()))
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        for folder in (git, common):
            if os.path.isfile(os.path.join(folder, ref)):
                with open(os.path.join(folder, ref)) as f:
                    return f.read().strip()[:12]
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                if line.strip().endswith(" " + ref):
                    return line.split()[0][:12]
    except OSError:
        pass
    return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fmt(value, spec, empty="-"):
    return empty if value is None else format(value, spec)


def markdown(results):
    m = results["meta"]
    a = m["args"]
    ceiling = m["ceiling"]
    sheet = (f"datasheet dense bf16 peak {m['datasheet_tflops']:.4g} TFLOP/s ({m['datasheet_source']}); "
             if m["datasheet_tflops"] else "no datasheet peak for this device (MFU column empty; --peak-tflops); ")
    lines = [
        f"### {m['date']}: {m['device']}, torch {m['torch']}, commit {m['commit'] or 'unknown'}"
        + (" (--tiny: a tiny U-Net, not the benchmark)" if a["tiny"] else ""),
        "",
        f"Precision {'bf16 autocast' if m['precision'] == 'bf16' else 'fp32'}; memory format of the baseline and "
        f"every other row: {m['formats'][0]}. Peaks: {sheet}measured ceiling {m['peak_tflops']:.4g} TFLOP/s: "
        f"{ceiling}.",
        f"Training: batch {a['batch_size']}, median of {a['repeats']} x {a['steps_per_repeat']} steps after "
        f"{a['warmup']} warm-up steps. Sampling: DDIM {a['sample_steps']} steps, {a['sample_n']} images in batches "
        f"of {a['sample_batch']}, median of {a['repeats']}; random weights. The rows of a table are timed "
        "interleaved, round by round.",
        "",
        "| task | implementation | params | GFLOP/img (fwd / train step) | img/s | vs this repo | TFLOP/s | MFU "
        "| % of ceiling | host syncs | peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        fl = r.get("flops")
        gflop = f"{fl[0] / 1e9:.2f} / {fl[1] / 1e9:.2f}" if fl else "-"
        task = (f"train (batch {a['batch_size']})" if r["task"] == "train"
                else f"sample (DDIM {a['sample_steps']})")
        if r["status"] != "ok":
            lines.append(f"| {task} | {r['impl']} | | | {r['status']} | | | | | | |")
            continue
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        mfu, of_ceiling = r.get("mfu"), r.get("of_ceiling")
        lines.append(f"| {task} | {r['impl']} | {params} | {gflop} | {r['img_per_s']:.1f} | "
                     f"{fmt(r.get('ratio'), '.2f')}{'x' if r.get('ratio') else ''} | {fmt(r.get('tflops'), '.3g')} | "
                     f"{fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} | "
                     f"{fmt(of_ceiling and 100 * of_ceiling, '.1f')}{'%' if of_ceiling else ''} | "
                     f"{fmt(r.get('syncs'), 'd')} | {fmt(r.get('peak_mem_gib'), '.2f')} |")
    lines.append("")
    lines.append("vs this repo: img/s over this repository's eager row of the same task (above 1: faster than it). "
                 "GFLOP/img: counted by FlopCounterMode (2 per multiply-add); a sampling row's TFLOP/s and MFU use "
                 f"{a['sample_steps']} forwards per image. MFU: over the datasheet peak; % of ceiling: over the "
                 "measured ceiling. Host syncs: per training step / per sampling call.")
    for line in results["summary"]:
        lines.append(f"- {line}")
    lines += profile_lines(results)
    return "\n".join(lines)

def profile_lines(results):
    """--profile: the markdown of each profiled row (where its time goes: categories, top kernels)."""
    a, lines = results["meta"]["args"], []
    for r in results["rows"]:
        p = r.get("profile")
        if not isinstance(p, dict):
            continue
        lines += ["", f"#### Profile: {r['task']}, {r['impl']}"]
        if p.get("status") != "ok":
            lines.append(f"{p.get('status')}")
            continue
        per = "step" if r["task"] == "train" else f"sampling call ({a['sample_batch']} images, "\
            f"{a['sample_steps']} steps)"
        lines += [f"Per {per}: wall {p['wall_ms_per_call']:.2f} ms under the profiler, {p['what']} "
                  f"{p['busy_ms_per_call']:.2f} ms in {p['launches_per_call']:.0f} calls; trace: `{p['trace']}` "
                  f"({p['calls']} {'step' if r['task'] == 'train' else 'call'}{'s' if p['calls'] > 1 else ''}).", "",
                  "| category | ms | share |", "| --- | ---: | ---: |"]
        lines += [f"| {cat} | {ms:.3f} | {100 * share:.1f}% |" for cat, ms, share in p["categories"]]
        lines += ["", "| top kernels / operators | ms | calls | share |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{name[:100]}` | {ms:.3f} | {calls:.0f} | {100 * share:.1f}% |"
                  for name, ms, calls, share in p["top"]]
    return lines


def summarise(rows):
    """Ratios against this repo's baseline rows (eager, first format), and one sentence per comparison."""
    base = {task: next((r for r in rows if r["task"] == task and r["key"] == "ours" and r["status"] == "ok"), None)
            for task in ("train", "sample")}
    out = []
    for r in rows:
        b = base[r["task"]]
        if r["status"] == "ok" and b is not None:
            r["ratio"] = r["img_per_s"] / b["img_per_s"]
            if r is not b:
                word = "faster" if r["ratio"] > 1 else "slower"
                speed = r["ratio"] if r["ratio"] > 1 else 1 / r["ratio"]
                out.append(f"{r['task']}: {r['impl']} is {speed:.2f}x {word} than {b['impl']}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def default_compile(device):
    """The torch.compile rows run by default on CUDA; on a CPU inductor's compilation takes a minute (--compile)."""
    return device.type == "cuda"


def benchmark(args):
    """Every row of the tables, timed (measure), with its FLOP rates against the peaks; the results and metadata
    as one dict (markdown and --json read it)."""
    device = cli.resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    compiled, cannot_compile = compile_status(args, device)
    args.formats = args.formats or (FORMATS if cuda else ("contiguous",))
    cfg = our_config(args.tiny)
    names = PEERS if args.peers == "all" else () if args.peers == "none" else (args.peers,)

    name = device_name(device)
    log(f"bench: {name}, torch {torch.__version__}")
    n, peak, ceiling = measured_ceiling(args, device)
    sheet = args.peak_tflops or (datasheet_tflops(name) if cuda else None)
    source = "--peak-tflops" if args.peak_tflops else "NVIDIA datasheet" if sheet else None
    log(f"measured ceiling: {ceiling}" + (f"; datasheet peak {sheet} TFLOP/s ({source})" if sheet else ""))

    peers = []
    for pname in names:
        version, missing = peer_status(pname)
        peers.append((pname, label_of(pname, version), missing))

    flops = {"ours": network_flops("ours", cfg)}
    for pname, _, missing in peers:
        if missing is None:
            flops[pname] = network_flops(pname, cfg)
    for key, (fwd, step) in flops.items():
        log(f"{key}: {fwd / 1e9:.3f} GFLOP forward, {step / 1e9:.3f} forward+backward per image")

    rows = plan_rows(args, cfg, device, flops, peers, compiled)
    for row in rows:
        if row["key"] == "ours+compile" and cannot_compile:
            row.pop("make")
            row["status"] = cannot_compile
    for task in args.tasks:
        measure([r for r in rows if r["task"] == task], args, device)
    add_rates(rows, args, peak, sheet)

    results = {
        "meta": {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": name,
                 "commit": args.commit or git_commit(), "python": platform.python_version(),
                 "precision": "bf16" if cuda else "fp32", "formats": list(args.formats), "matmul_n": n,
                 "ceiling": ceiling,
                 "peak_tflops": peak / 1e12, "datasheet_tflops": sheet, "datasheet_source": source,
                 "args": vars(args), "model_args": cfg.model_args},
        "flops": {k: {"forward": v[0], "train_step": v[1]} for k, v in flops.items()},
        "rows": rows,
    }
    results["summary"] = summarise(rows)
    return results


def compile_status(args, device):
    """(whether the torch.compile rows are planned, why they cannot run or None). --compile asked for by name and
    impossible is refused in one line before any work; the default (compile on CUDA) only marks those rows."""
    compiled = default_compile(device) if args.compile is None else args.compile
    cannot_compile = None
    if compiled:
        try:
            cli.check_compiler()
        except UsageError as e:
            if args.compile:  # asked for by name: refused in one line before any work, as every bad input
                raise
            cannot_compile = f"not run ({e})"  # the default: the compile rows say why, the others still run
            log(f"torch.compile rows: {cannot_compile}")
    return compiled, cannot_compile


def measured_ceiling(args, device):
    """The measured ceiling: a large square bf16 matmul on CUDA (cuBLAS); on a CPU the better of an fp32 matmul and
    a 3x3 convolution (conv_peak). (matmul size, FLOP/s, what was measured in words)."""
    n = 8192 if device.type == "cuda" else 1024 if args.tiny else 2048
    if device.type == "cuda":
        peak = matmul_peak(device, torch.bfloat16, n, 20)
        return n, peak, f"{n}^3 bf16 matmul {peak / 1e12:.4g} TFLOP/s"
    mm, conv = matmul_peak(device, torch.float32, n, 2), conv_peak(device, torch.float32, 4 if args.tiny else 16, 2)
    ceiling = (f"the better of a {n}^3 fp32 matmul ({mm / 1e12:.4g} TFLOP/s) and a 256-channel 3x3 convolution "
               f"({conv / 1e12:.4g} TFLOP/s)")
    return n, max(mm, conv), ceiling


def add_rates(rows, args, peak, sheet):
    """Each timed row's FLOP per image, TFLOP/s, share of the measured ceiling and MFU (over the datasheet peak)."""
    for row in rows:
        row.pop("to_profile", None)  # a plan's mark, not a result (rows that never ran still carry it)
        if row["status"] == "ok" and row.get("flops"):
            per_image = row["flops"][1] if row["task"] == "train" else row["flops"][0] * args.sample_steps
            row["flop_per_img"] = per_image
            row["tflops"] = per_image * row["img_per_s"] / 1e12
            row["of_ceiling"] = per_image * row["img_per_s"] / peak
            if sheet:
                row["mfu"] = row["tflops"] / sheet
        log(f"{row['task']}: {row['impl']}: " + (f"{row['img_per_s']:.1f} img/s" if row["status"] == "ok"
                                                 else row["status"]))


def main(argv=None):
    """Run the benchmark; print the markdown table (stdout) and return the results dict.

    Exit codes as a script: 0 all requested rows ran (missing peers included), 1 a row failed, 2 bad usage.
    """
    args = build_parser().parse_args(argv)
    try:
        resolve_args(args)
        results = benchmark(args)
    except UsageError as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(markdown(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        log(f"wrote {args.json} (every number, repeat times included)")
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(r["status"].startswith("error") for r in res["rows"]) else 0)
