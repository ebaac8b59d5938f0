"""
Speed, side by side: training and DDIM-sampling throughput of this repository's DDPM CIFAR-10 U-Net against
diffusers' port of the same network and lucidrains' denoising_diffusion_pytorch U-Net of the same width, in one run.

    python bench.py                          # GPU: the full benchmark; prints a markdown table for BENCHMARKS.md
    python bench.py --json bench.json        # ... and writes every number (repeat times included) as JSON
    python bench.py --peers none --no-compile          # this repository only, eager only
    python bench.py --tiny                   # seconds on a CPU: a tiny U-Net, batch 4 (what the tests run)

WHAT IS MEASURED
  train    images/s of one training step at batch 128 (--batch-size), median of --repeats timed runs of
           --steps-per-repeat steps each, after --warmup untimed steps. For this repository "one step" is train.py's
           own `train_step` (the function its loop calls): after a batch drawn from the device-resident data
           (data.Batches, random flips), the warm-up learning rate, bf16 autocast forward, loss, zero_grad, backward,
           gradient clipping at norm 1, fused AdamW, the EMA update (train.EMA), and the on-device loss sum. The
           peers run the same harness in `peer_training_step` (the same optimizer, clipping and EMA, built by
           train.make_optimizer / train.EMA), around their own network and loss. Rows:
             this repo (eager)          UNet(**model_args) of train.py's defaults + train.train_step (L_simple)
             this repo (torch.compile)  the same with torch.compile(model), as `train.py --compile`
             diffusers                  UNet2DModel configured as google/ddpm-cifar10-32 (the DDPM CIFAR-10 network
                                        ported to diffusers), dropout 0.1, noised by DDPMScheduler.add_noise,
                                        loss = MSE(eps_pred, eps)
             denoising_diffusion_pytorch  lucidrains' Unet(dim=128, dim_mults=(1, 2, 2, 2), dropout=0.1,
                                        flash_attn=True) inside GaussianDiffusion(image_size=32, timesteps=1000,
                                        objective='pred_noise', beta_schedule='linear'); loss = diffusion(x).
                                        NOT the same network: linear attention at every level, full attention at
                                        the bottom, 2 res blocks per level; its FLOPs are counted and shown.
           Every row uses the same harness (optimizer, clipping, EMA, data, batch, bf16 autocast, channels_last,
           TF32 on): only the network and the loss differ.
  sample   images/s of DDIM with 50 steps (eta 0, x_0 clipped) for --sample-n 1000 images in batches of
           --sample-batch 500, eval mode, bf16 autocast, channels_last: ddim.ddim_sample_loop against diffusers'
           DDIMPipeline (output_type="pt", so the images stay on the GPU) and lucidrains' GaussianDiffusion.sample
           with sampling_timesteps=50. The weights are random (initialised, not trained): throughput does not depend
           on them. Weight tensors that a library initialises to exactly zero (this repo's output convolutions) are
           filled with small random values first in every row, so no row runs its matmuls on zeros (faster on GPUs).
  FLOPs    counted with torch.utils.flop_counter.FlopCounterMode on one forward, and one forward + backward, of each
           network at batch 1 on the meta device (no arithmetic is done, so it takes a second on any machine). The
           counter counts a convolution or matmul as 2 FLOPs per multiply-add; attention's two batched matmuls are
           included, normalisation and activations are not. The default U-Net: 12.44 GFLOP forward per 32x32 image,
           37.32 GFLOP forward + backward (the training step's model FLOPs; the 3x rule gives 37.33). diffusers'
           google/ddpm-cifar10-32 network counts exactly the same (and has the same 35.75M parameters); lucidrains'
           Unet: 8.97 / 26.87 GFLOP, 28.54M parameters.
  MFU      model FLOP utilisation: counted FLOPs per image x images/s, over the bf16 matmul peak MEASURED here at
           the start of the run (an 8192^3 bf16 torch.matmul, timed), not the datasheet's number.
  syncs    on CUDA, the host-device synchronisations in one training step (or one sampling call) counted with
           torch.cuda.set_sync_debug_mode("warn") outside the timed loops: 0 means the CPU can run ahead of the GPU.
Timing: torch.cuda.synchronize() before and after each timed repeat and nowhere inside it.

THE PEERS ARE OPTIONAL. Neither is in requirements.txt; a missing one gets a row that says how to install it:
    pip install diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4
These are the versions this script was written against (2.3.4's denoising_diffusion_pytorch also installs
ema-pytorch, accelerate and pytorch-fid; the last is needed only by its Trainer, never here).

ON A GPU MACHINE WITHOUT NETWORK the wheels are carried. All three are pure-Python (py3-none-any), so one download
serves any platform. On a machine with network, in the repository root:
    python3 -m pip download --no-deps -d .whl diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3
(keep .whl/ out of git: `echo /.whl/ >> .git/info/exclude`), copy .whl/ along with the repository, and there:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 bench.py --json bench.json
That installs only these three. What they import besides is: diffusers: huggingface_hub (>= 1.32; which imports
httpx, and that httpcore, h11, anyio), safetensors (>= 0.8), regex, requests, filelock, numpy, Pillow;
denoising_diffusion_pytorch: ema_pytorch, accelerate (which imports psutil), einops, scipy, torchvision, Pillow,
packaging. A machine lacking any of those needs its wheel carried too (`pip download --no-deps NAME==VERSION`, with
--platform/--python-version flags for the compiled ones: safetensors, regex, psutil).
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

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
import cli
import data
import train
from cli import UsageError
from ddim import ddim_sample_loop

ROOT = os.path.dirname(os.path.abspath(__file__))
PEERS = ("diffusers", "lucidrains")
PEER_PACKAGES = {"diffusers": "diffusers==0.42.1", "lucidrains": "denoising-diffusion-pytorch==2.3.4"}
INSTALL_HINT = "pip install " + " ".join(PEER_PACKAGES.values())
# the default (full) run and the --tiny run; an explicit flag wins over both
DEFAULTS = dict(batch_size=128, repeats=5, steps_per_repeat=20, warmup=5, sample_n=1000, sample_batch=500,
                sample_steps=50)
TINY_DEFAULTS = dict(batch_size=4, repeats=2, steps_per_repeat=2, warmup=1, sample_n=8, sample_batch=4,
                     sample_steps=5)
# the tiny network (all three implementations get its analogue): 16x16 images, two levels, attention at 8x8
TINY_ARCH = ["--image-size", "16", "--ch", "32", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn", "8"]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    p = cli.Parser(description="Training and sampling throughput of this repo's U-Net against diffusers and "
                                 "denoising_diffusion_pytorch (see the module docstring).")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net and tiny counts: the script's own test, seconds "
                   "on a CPU (defaults: " + ", ".join(f"{k} {v}" for k, v in TINY_DEFAULTS.items()) + ")")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats; the median is reported (default 5)")
    p.add_argument("--steps-per-repeat", type=int, default=None, help="training steps per timed repeat (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 5)")
    p.add_argument("--sample-n", type=int, default=None, help="images per timed sampling repeat (default 1000; "
                   "0: no sampling rows)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default 500)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the torch.compile row for this repo's training step (default: on CUDA yes, on CPU no)")
    p.add_argument("--peers", default="all", choices=("all", "none") + PEERS, help="which libraries to compare with")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="also write all results to this JSON file")
    p.add_argument("--commit", default=None, help="commit to print (default: read from .git when there is one)")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve_args(args):
    """Fill the defaults (full or --tiny) and check the numbers; a UsageError names the flag."""
    for key, value in (TINY_DEFAULTS if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("batch_size", "repeats", "steps_per_repeat", "sample_batch", "sample_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    for flag in ("warmup", "sample_n"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')}: must be >= 0, got {getattr(args, flag)}")
    if args.sample_steps > 1000:
        raise UsageError(f"--sample-steps: must be at most the 1000 diffusion steps, got {args.sample_steps}")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json: folder {folder} does not exist; create it or pick another path")
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
    # DDPM's asymmetric-free downsampling padding 0, sin-then-cos embedding shifted by 1, GroupNorm eps 1e-6
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


def matmul_peak(device, dtype, n, iters, repeats=3):
    """Measured FLOP/s of a square n x n x n matmul of random data in `dtype` (the MFU denominator): the best of
    `repeats` timings of `iters` products, after as many untimed ones (the clocks ramp up first)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = timed_repeats(lambda: a @ b, device, iters, repeats, iters)
    return 2 * n ** 3 * iters / min(times)


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


def peak_memory_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------------------------
# One training step, the same harness for every network
# ----------------------------------------------------------------------------------------------------------------

def random_batches(cfg, args, device):
    """A device-resident uint8 "dataset" of random images, drawn by data.Batches as train.py draws CIFAR-10."""
    n = max(64, 8 * args.batch_size)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    return data.Batches(x, torch.zeros(n, dtype=torch.long), args.batch_size, device, seed=args.seed, flip=True,
                        channels_last=device.type == "cuda")


def our_training_step(cfg, args, device, compiled=False):
    """A function running one step of train.py exactly: its `train_step` on its network, optimizer and EMA."""
    torch.manual_seed(0)
    model = dezero(build_ours(cfg)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    diffusion = checkpoint.build_diffusion(cfg.diffusion_args)
    batches = random_batches(cfg, args, device)
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


def peer_training_step(model, loss_of, cfg, args, device):
    """train.train_step's harness around a peer's `model` and `loss_of(x0) -> 0-dim loss`: the same data, warm-up
    learning rate, autocast, clipping, AdamW and EMA (built by train.py's own make_optimizer and EMA)."""
    batches = random_batches(cfg, args, device)
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


def peer_setup(impl, cfg, device):
    """(model whose parameters train, loss_of(x0)) for a peer implementation."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if impl == "diffusers":
        DDPMScheduler = import_diffusers()[2]
        model = dezero(build_diffusers_unet(cfg)).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
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
        diffusion = lucidrains_diffusion(unet, cfg).to(device)
        if cuda:
            diffusion = diffusion.to(memory_format=torch.channels_last)
        return diffusion, lambda x0: diffusion(x0)
    raise ValueError(impl)


def sample_setup(impl, cfg, args, device):
    """draw(n): n images with DDIM (args.sample_steps steps) for one implementation, random weights.

    draw.params is the network's parameter count.
    """
    cuda = device.type == "cuda"
    amp = cli.autocast(device, "auto")
    size = cfg.image_size
    torch.manual_seed(0)
    if impl == "ours":
        # what sample.py does with a run's EMA weights: eval, no grad, channels_last; DDIM under bf16 autocast
        model = dezero(build_ours(cfg)).to(device).eval().requires_grad_(False)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        diffusion = checkpoint.build_diffusion(cfg.diffusion_args)

        def draw(n):
            with amp:
                return ddim_sample_loop(diffusion.respace(args.sample_steps), model, (n, 3, size, size), device=device)

        draw.params = sum(p.numel() for p in model.parameters())
        return draw
    if impl == "diffusers":
        _, _, _, DDIMScheduler, DDIMPipeline = import_diffusers()
        unet = dezero(build_diffusers_unet(cfg)).to(device).eval().requires_grad_(False)
        if cuda:
            unet = unet.to(memory_format=torch.channels_last)
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
        diffusion.requires_grad_(False)
        if cuda:
            diffusion = diffusion.to(memory_format=torch.channels_last)

        def draw(n):
            with amp:
                return diffusion.sample(batch_size=n)

        draw.params = sum(p.numel() for p in unet.parameters())
        return draw
    raise ValueError(impl)


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------

def label_of(impl, version=None, compiled=False):
    if impl == "ours":
        return "this repo (torch.compile)" if compiled else "this repo (eager)"
    return f"{'diffusers' if impl == 'diffusers' else 'denoising_diffusion_pytorch'} {version}"


def run_train_row(impl, cfg, args, device, flops, compiled=False):
    if impl == "ours":
        step = our_training_step(cfg, args, device, compiled)
    else:
        step = peer_training_step(*peer_setup(impl, cfg, device), cfg, args, device)
    times = timed_repeats(step, device, args.warmup, args.repeats, args.steps_per_repeat)
    syncs = count_syncs(step, device)
    loss = float(step.loss_sum())  # read once, after timing: the steps really ran and produced numbers
    if not math.isfinite(loss):
        raise RuntimeError(f"the loss is {loss}")
    img_s = args.batch_size * args.steps_per_repeat / statistics.median(times)
    params = sum(p.numel() for p in step.model.parameters() if p.requires_grad)
    row = {"img_per_s": img_s, "times_s": times, "params": params, "syncs": syncs,
           "flop_per_img": flops[1] if flops else None, "peak_mem_gib": peak_memory_gib(device)}
    del step
    if compiled:
        torch._dynamo.reset()
    return row


def run_sample_row(impl, cfg, args, device, flops):
    draw = sample_setup(impl, cfg, args, device)
    sizes = [min(args.sample_batch, args.sample_n - i) for i in range(0, args.sample_n, args.sample_batch)]

    def all_images():
        for n in sizes:
            out = draw(n)
        return out

    out = draw(sizes[0])  # warm-up (and a check that it draws images of the right shape)
    if tuple(out.shape[1:]) != (3, cfg.image_size, cfg.image_size):
        raise RuntimeError(f"drew images of shape {tuple(out.shape)}")
    times = timed_repeats(all_images, device, 0, args.repeats, 1)
    syncs = count_syncs(lambda: draw(sizes[0]), device)
    row = {"img_per_s": args.sample_n / statistics.median(times), "times_s": times, "syncs": syncs,
           "params": draw.params,
           "flop_per_img": flops[0] * args.sample_steps if flops else None, "peak_mem_gib": peak_memory_gib(device),
           "batch": args.sample_batch}
    del draw
    return row


def guarded(run):
    """Run a row; an exception becomes the row's status (with its traceback on stderr), not the end of the run."""
    try:
        return dict(run(), status="ok")
    except Exception as e:
        traceback.print_exc()
        return {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def peer_status(name):
    """(version, None) when the library imports, else (None, 'not installed (...)')."""
    try:
        return peer_version(name), None
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        return None, f"not installed ({INSTALL_HINT}; import failed: {missing})"


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def git_commit():
    """The checked-out commit, read from .git without running git (None where there is no .git)."""
    git = os.path.join(ROOT, ".git")
    try:
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        path = os.path.join(git, ref)
        if os.path.isfile(path):
            with open(path) as f:
                return f.read().strip()[:12]
        with open(os.path.join(git, "packed-refs")) as f:
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
    peak_name = "bf16" if m["precision"] == "bf16" else "fp32"
    lines = [
        f"### {m['date']}: {m['device']}, torch {m['torch']}, commit {m['commit'] or 'unknown'}"
        + (" (--tiny: a tiny U-Net, not the benchmark)" if a["tiny"] else ""),
        "",
        f"Precision {'bf16 autocast' if m['precision'] == 'bf16' else 'fp32'}, "
        f"channels_last {'on' if m['channels_last'] else 'off'}. "
        f"Measured {peak_name} matmul peak (the MFU denominator): {m['peak_tflops']:.4g} TFLOP/s.",
        f"Training: batch {a['batch_size']}, median of {a['repeats']} x {a['steps_per_repeat']} steps after "
        f"{a['warmup']} warm-up steps. Sampling: DDIM {a['sample_steps']} steps, {a['sample_n']} images in batches "
        f"of {a['sample_batch']}, median of {a['repeats']}; random weights.",
        "",
        "| task | implementation | params | GFLOP/img (fwd / train step) | img/s | vs this repo | TFLOP/s | MFU "
        "| host syncs | peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        fl = r.get("flops")
        gflop = f"{fl[0] / 1e9:.2f} / {fl[1] / 1e9:.2f}" if fl else "-"
        task = (f"train (batch {a['batch_size']})" if r["task"] == "train"
                else f"sample (DDIM {a['sample_steps']})")
        if r["status"] != "ok":
            lines.append(f"| {task} | {r['impl']} | | | {r['status']} | | | | | |")
            continue
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        mfu = r.get("mfu")
        lines.append(f"| {task} | {r['impl']} | {params} | {gflop} | {r['img_per_s']:.1f} | "
                     f"{fmt(r.get('ratio'), '.2f')}{'x' if r.get('ratio') else ''} | {fmt(r.get('tflops'), '.3g')} | "
                     f"{fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} | {fmt(r.get('syncs'), 'd')} | "
                     f"{fmt(r.get('peak_mem_gib'), '.2f')} |")
    lines.append("")
    lines.append("vs this repo: img/s over this repository's eager row of the same task (above 1: faster than it). "
                 "GFLOP/img: counted by FlopCounterMode (2 per multiply-add); a sampling row's TFLOP/s and MFU use "
                 f"{a['sample_steps']} forwards per image. Host syncs: per training step / per sampling call.")
    for line in results["summary"]:
        lines.append(f"- {line}")
    return "\n".join(lines)


def summarise(rows):
    """Ratios against this repo's eager rows, and one sentence per comparison."""
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
                out.append(f"{r['task']}: {r['impl']} is {speed:.2f}x {word} than this repo (eager)")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def benchmark(args):
    device = cli.resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    compiled = cuda if args.compile is None else args.compile
    cfg = our_config(args.tiny)
    peers = PEERS if args.peers == "all" else () if args.peers == "none" else (args.peers,)

    log(f"bench: {device_name(device)}, torch {torch.__version__}")
    peak = matmul_peak(device, torch.bfloat16, 8192, 20) if cuda else matmul_peak(device, torch.float32, 512, 5)
    log(f"matmul peak {peak / 1e12:.4g} TFLOP/s")

    impls = [("ours", "this repo", None)]
    for name in peers:
        version, missing = peer_status(name)
        impls.append((name, label_of(name, version), missing))

    flops = {}
    for key, _, missing in impls:
        if missing is None:
            flops[key] = network_flops(key, cfg)
            log(f"{key}: {flops[key][0] / 1e9:.3f} GFLOP forward, {flops[key][1] / 1e9:.3f} forward+backward per image")

    rows = []

    def add(task, key, label, missing, run):
        """Run one row (`run()` returns its numbers), unless its library is missing; derive TFLOP/s and MFU."""
        log(f"{task}: {label} ...")
        free_memory(device)
        row = {"status": missing} if missing else guarded(run)
        row.update(task=task, key=key, impl=label, flops=flops.get(key.split("+")[0]))
        if row["status"] == "ok":
            if row.get("flop_per_img"):
                row["tflops"] = row["flop_per_img"] * row["img_per_s"] / 1e12
                row["mfu"] = row["flop_per_img"] * row["img_per_s"] / peak
            log(f"  {row['img_per_s']:.1f} img/s" + (f", MFU {100 * row['mfu']:.1f}%" if "mfu" in row else ""))
        else:
            log(f"  {row['status']}")
        rows.append(row)

    for key, label, missing in impls:
        add("train", key, label_of("ours") if key == "ours" else label, missing,
            lambda: run_train_row(key, cfg, args, device, flops.get(key)))
        if key == "ours" and compiled:
            add("train", "ours+compile", label_of("ours", compiled=True), None,
                lambda: run_train_row("ours", cfg, args, device, flops.get("ours"), compiled=True))
    if args.sample_n:
        for key, label, missing in impls:
            add("sample", key, label_of("ours") if key == "ours" else label, missing,
                lambda: run_sample_row(key, cfg, args, device, flops.get(key)))

    results = {
        "meta": {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": device_name(device),
                 "commit": args.commit or git_commit(), "python": platform.python_version(),
                 "precision": "bf16" if cuda else "fp32", "channels_last": cuda, "peak_tflops": peak / 1e12,
                 "args": vars(args), "model_args": cfg.model_args},
        "flops": {k: {"forward": v[0], "train_step": v[1]} for k, v in flops.items()},
        "rows": rows,
    }
    results["summary"] = summarise(rows)
    return results


def main(argv=None):
    """Run the benchmark; print the markdown table (stdout) and return the results dict.

    Exit codes as a script: 0 all requested rows ran (missing peers included), 1 a row failed, 2 bad usage.
    """
    args = build_parser().parse_args(argv)
    try:
        resolve_args(args)
        results = benchmark(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any(r["status"].startswith("error") for r in res["rows"]) else 0)
