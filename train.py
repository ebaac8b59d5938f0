"""
Train a diffusion model (DDPM Algorithm 1) or a noisy classifier for guidance (ADM §4), on one GPU, on several
with torchrun, or slowly on a CPU.

    python train.py --dataset cifar10                      # the DDPM CIFAR-10 recipe (35.7M U-Net, L_simple)
    python train.py --dataset cifar10 --loss hybrid --schedule cosine     # iDDPM: learned variance
    python train.py --dataset cifar10 --class-cond --p-uncond 0.1         # for classifier-free guidance (G5)
    python train.py --dataset cifar10 --task classifier    # the noisy classifier of classifier guidance (G4)
    torchrun --nproc_per_node=8 train.py --dataset cifar10 # DistributedDataParallel, global batch 128

Algorithm 1, one step:  x_0 ~ data, t ~ U{1..T}, eps ~ N(0, I),  gradient step on || eps - eps_theta(x_t, t) ||^2.
ddpm.GaussianDiffusion.training_losses does the math; this file is the loop around it: the data resident on the
device (data.Batches), AdamW with warm-up and gradient clipping, an exponential moving average of the weights
(the model every sample is drawn from), checkpoints, logs and sample grids.

A run lives in --out (default runs/<dataset>): ckpt.pt (the latest checkpoint, replaced atomically: written to a
temporary file, then renamed, so a kill at any moment leaves the previous one intact), metrics.jsonl (one line per
--log-every steps), samples.png (the EMA model's latest grid) and config.json. `--resume` continues exactly where
the checkpoint stopped: same weights, optimizer, EMA, data order and random state.

Fast path on CUDA: bf16 autocast, channels_last, fused AdamW, optional torch.compile (--compile), TF32 matmuls,
and no host synchronisation inside the loop: the loss is accumulated on the device and read every --log-every
steps. The CPU path is the same code in fp32.
"""

import argparse
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

import data
from ddim import ddim_sample_loop
from ddpm import GaussianDiffusion, ImportanceSampler
from guidance import classifier_accuracy_at, noisy_classifier_loss
from schedules import SCHEDULES, get_named_beta_schedule
from unet import EncoderUNet, UNet

CHECKPOINT = "ckpt.pt"
# the flags that define the network and the diffusion: a run cannot be resumed with different values
ARCH_KEYS = ("task", "dataset", "image_size", "ch", "ch_mult", "num_res_blocks", "attn", "dropout", "num_heads",
             "num_head_channels", "resblock_updown", "scale_shift_norm", "class_cond", "schedule",
             "diffusion_steps", "loss", "pool")


class UsageError(Exception):
    """A problem the user fixes on the command line: printed as one line, exit code 2, no traceback."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (the flag and what to do), not the whole usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    p = Parser(description="Train a DDPM/iDDPM diffusion model or a noisy classifier.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    g.add_argument("--data-dir", default=None, help="CIFAR-10 .npz file or folder of shards; the image folder for "
                   "--dataset folder (default for cifar10: ./data/cifar10, then ../shared/data/cifar10, then download)")
    g.add_argument("--image-size", type=int, default=32)
    g.add_argument("--synthetic-n", type=int, default=256, help="images in --dataset synthetic")
    g = p.add_argument_group("what to train")
    g.add_argument("--task", default="diffusion", choices=("diffusion", "classifier"))
    g.add_argument("--class-cond", action="store_true", help="condition on the class (for classifier-free guidance)")
    g.add_argument("--p-uncond", type=float, default=0.1, help="with --class-cond: probability of the null label")
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES)
    g.add_argument("--diffusion-steps", type=int, default=1000, help="T")
    g.add_argument("--loss", default="mse", choices=("mse", "hybrid", "kl"),
                   help="mse = L_simple (DDPM); hybrid = L_simple + 0.001 L_vlb with learned variance (iDDPM); kl = the bound")
    g.add_argument("--t-sampler", default="uniform", choices=("uniform", "importance"),
                   help="importance: p_t ∝ sqrt(E[L_t^2]) (iDDPM §3.3)")
    g = p.add_argument_group("network (defaults: the DDPM CIFAR-10 U-Net, 35.7M parameters)")
    g.add_argument("--ch", type=int, default=128)
    g.add_argument("--ch-mult", default="1,2,2,2")
    g.add_argument("--num-res-blocks", type=int, default=2)
    g.add_argument("--attn", default="16", help="resolutions with self-attention, comma separated ('' for none)")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--num-heads", type=int, default=1)
    g.add_argument("--num-head-channels", type=int, default=-1, help="if > 0, overrides --num-heads")
    g.add_argument("--resblock-updown", action="store_true", help="BigGAN-style residual up/down sampling (ADM)")
    g.add_argument("--scale-shift-norm", action="store_true", help="AdaGN (ADM)")
    g.add_argument("--pool", default="attention", choices=("adaptive", "attention"), help="classifier head")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=800_000, help="training steps (DDPM: 800k on CIFAR-10)")
    g.add_argument("--batch-size", type=int, default=128, help="global batch size, split over processes")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay, warmed up as min(decay, (1+n)/(10+n))")
    g.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this wall-clock time (0: off; "
                   "checked at log steps under torchrun)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default runs/<dataset>, runs/<dataset>-classifier)")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--log-every", type=int, default=100, help="read the loss from the device every K steps")
    g.add_argument("--save-every", type=int, default=5000, help="checkpoint every N steps ...")
    g.add_argument("--save-minutes", type=float, default=10.0, help="... and after this many minutes without one "
                   "(so slow CPU runs checkpoint too; checked at log steps under torchrun; 0: off)")
    g.add_argument("--sample-every", type=int, default=10000, help="EMA sample grid every M steps (0: off)")
    g.add_argument("--n-sample", type=int, default=64, help="images in the sample grid")
    g.add_argument("--eval-every", type=int, default=5000, help="classifier: test accuracy every K steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_ints(text, flag):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}")


def check_args(args, world_size):
    positive = {"--batch-size": args.batch_size, "--steps": args.steps, "--diffusion-steps": args.diffusion_steps,
                "--ch": args.ch, "--num-res-blocks": args.num_res_blocks, "--image-size": args.image_size,
                "--log-every": args.log_every, "--save-every": args.save_every, "--n-sample": args.n_sample}
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag}: must be >= 1, got {value}")
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size: {args.batch_size} is not divisible by the {world_size} processes; "
                         f"use a multiple of {world_size}")
    if not 0 <= args.p_uncond < 1:
        raise UsageError(f"--p-uncond: must be in [0, 1), got {args.p_uncond}")
    if not 0 <= args.ema < 1:
        raise UsageError(f"--ema: must be in [0, 1), got {args.ema}")
    if args.lr <= 0:
        raise UsageError(f"--lr: must be > 0, got {args.lr}")
    if min(args.warmup, args.sample_every, args.grad_clip, args.max_minutes, args.save_minutes) < 0:
        raise UsageError("--warmup, --sample-every, --grad-clip, --max-minutes and --save-minutes must be >= 0")
    mult = parse_ints(args.ch_mult, "--ch-mult")
    if not mult or min(mult) < 1:
        raise UsageError(f"--ch-mult: expected positive integers like 1,2,2,2, got {args.ch_mult!r}")
    if args.image_size % 2 ** (len(mult) - 1):
        raise UsageError(f"--image-size: {args.image_size} must be divisible by 2^{len(mult) - 1} for --ch-mult {args.ch_mult}")
    parse_ints(args.attn, "--attn")
    if args.task == "classifier" and args.class_cond:
        raise UsageError("--class-cond: applies to --task diffusion only")


# ----------------------------------------------------------------------------------------------------------------
# Building the pieces from a config (shared with sample.py and evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

def model_kwargs_from_config(cfg, num_classes):
    """UNet / EncoderUNet keyword arguments from a run's config dict."""
    kw = dict(image_size=cfg["image_size"], in_channels=cfg.get("channels", 3), ch=cfg["ch"],
              ch_mult=tuple(parse_ints(cfg["ch_mult"], "--ch-mult")), num_res_blocks=cfg["num_res_blocks"],
              attn_resolutions=tuple(parse_ints(cfg["attn"], "--attn")), dropout=cfg["dropout"],
              num_heads=cfg["num_heads"], num_head_channels=cfg["num_head_channels"],
              resblock_updown=cfg["resblock_updown"], use_scale_shift_norm=cfg["scale_shift_norm"])
    if cfg["task"] == "classifier":
        return dict(kw, out_dim=num_classes, pool=cfg["pool"])
    return dict(kw, num_classes=num_classes if cfg["class_cond"] else None, learn_sigma=cfg["loss"] != "mse")


def build_model(cfg, num_classes):
    kw = model_kwargs_from_config(cfg, num_classes)
    return EncoderUNet(**kw) if cfg["task"] == "classifier" else UNet(**kw)


def build_diffusion(cfg, var_type=None):
    """The GaussianDiffusion of a run: fixed_large for L_simple (DDPM's CIFAR-10 choice), learned_range otherwise."""
    betas = get_named_beta_schedule(cfg["schedule"], cfg["diffusion_steps"])
    if cfg["loss"] == "mse":
        return GaussianDiffusion(betas, var_type or "fixed_large", "mse")
    return GaussianDiffusion(betas, "learned_range", cfg["loss"])


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: CUDA is not available on this machine; use --device cpu")
    return device


def autocast(device, precision):
    """bf16 autocast on CUDA (the fast path), nothing on the CPU unless asked for."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, then rename: the old file survives any kill."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, flag="--checkpoint"):
    """A checkpoint as a dict, loaded with weights_only=True (tensors and plain containers only)."""
    try:
        with warnings.catch_warnings():  # a corrupt file makes torch warn before it raises: one line is enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{flag}: {path} does not exist")
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise UsageError(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__}); "
                         "pick another file or run directory") from None


def find_checkpoint(path, flag="--checkpoint"):
    """A checkpoint file from a file or run-directory path (`flag` names the option it came from, for errors)."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no checkpoint at {path}; train one with `python train.py` or pass "
                         f"{flag} PATH (a ckpt.pt or a run directory)")
    return path


# ----------------------------------------------------------------------------------------------------------------
# EMA (torch's AveragedModel, with DDPM's decay and a warm-up so short runs are usable)
# ----------------------------------------------------------------------------------------------------------------

def make_ema(model, decay):
    """AveragedModel with decay_n = min(decay, (1 + n) / (10 + n)) at update n (call `ema_update`).

    The warm-up lets the average follow the fast-changing early weights; with a constant 0.9999 the EMA of a
    10k-step run would still be 37% random initialisation. The update count n is kept on the host (no sync).
    """
    ema = AveragedModel(model, use_buffers=False)
    ema.decay, ema.updates = decay, 0

    def lerp(averaged, current, num_averaged):
        d = min(ema.decay, (1 + ema.updates) / (10 + ema.updates))
        # theta_ema <- d theta_ema + (1 - d) theta
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    ema.multi_avg_fn = lerp
    ema.requires_grad_(False)
    return ema


def ema_update(ema, model):
    """AveragedModel.update_parameters without its per-call n_averaged.to(device), a blocking copy that would be
    one host sync per step: the same update, with the counter kept on the host."""
    current = [p.detach() for p in model.parameters()]
    averaged = [p.detach() for p in ema.module.parameters()]
    if ema.n_averaged == 0:  # a CPU tensor: no device sync
        torch._foreach_copy_(averaged, current)
    else:
        ema.multi_avg_fn(averaged, current, None)
    for b_ema, b in zip(ema.module.buffers(), model.buffers()):
        b_ema.detach().copy_(b.detach())
    ema.n_averaged += 1
    ema.updates += 1


def load_ema(ema, state, updates):
    ema.module.load_state_dict(state)
    ema.updates = updates
    ema.n_averaged.fill_(max(1, updates))  # > 0: AveragedModel must average from here on, not copy


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def setup_distributed(args):
    """(rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, resolve_device(args.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def prepare_out(args, rank):
    out = args.out or os.path.join("runs", args.dataset + ("-classifier" if args.task == "classifier" else ""))
    ckpt = os.path.join(out, CHECKPOINT)
    if args.resume and not os.path.isfile(ckpt):
        raise UsageError(f"--resume: no checkpoint at {ckpt}; start without --resume or point --out at the run")
    if not args.resume and os.path.isfile(ckpt):
        raise UsageError(f"--out: {out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if rank == 0:
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test{os.getpid()}")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise UsageError(f"--out: cannot write to {out} ({e.strerror}); choose a writable directory") from None
    return out, ckpt


def config_of(args, num_classes, n_train, channels):
    cfg = {k: v for k, v in vars(args).items() if k not in ("resume", "device", "no_progress")}
    cfg.update(num_classes=num_classes, n_train=n_train, channels=channels)
    return cfg


def check_resume_config(saved, cfg):
    for key in ARCH_KEYS:
        if saved.get(key) != cfg.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: the checkpoint was trained with {flag} {saved.get(key)!r}, not "
                             f"{cfg.get(key)!r}; use the same flags or another --out")


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(args):
    rank, world_size, device = setup_distributed(args)
    check_args(args, world_size)
    is_main = rank == 0
    out, ckpt_path = prepare_out(args, rank)

    # -- data: the whole uint8 set on the device -------------------------------------------------------------------
    if args.dataset == "synthetic":
        x, y = data.synthetic_dataset(n=args.synthetic_n, image_size=args.image_size, seed=args.seed)
    else:
        x, y = data.load_dataset(args.dataset, args.data_dir, args.image_size, split="train")
    num_classes = int(y.max()) + 1
    cfg = config_of(args, num_classes, int(x.shape[0]), int(x.shape[1]))
    batches = data.Batches(x, y, args.batch_size // world_size, device, seed=args.seed, rank=rank,
                           world_size=world_size, flip=True, channels_last=device.type == "cuda")

    # -- model, diffusion, optimiser, EMA ------------------------------------------------------------------------
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(cfg, num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    diffusion = build_diffusion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    # linear warm-up of the learning rate to --lr over --warmup steps (DDPM: 5000), constant afterwards
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    ema = make_ema(model, args.ema)
    t_sampler = ImportanceSampler(diffusion.num_timesteps, device=device) if args.t_sampler == "importance" else None

    step = 0
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        check_resume_config(ckpt["config"], cfg)
        model.load_state_dict(ckpt["model"])
        load_ema(ema, ckpt["ema"], ckpt["ema_updates"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        batches.load_state_dict(ckpt["batches"])
        if t_sampler is not None:
            t_sampler.load_state_dict(ckpt["t_sampler"])
        step = ckpt["step"]
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0], device)
        if is_main:
            print(f"resumed {ckpt_path} at step {step}")
    else:
        torch.manual_seed(args.seed + 1000 * rank)  # different t and noise on every rank
    if is_main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.task}: {n_params / 1e6:.2f}M parameters, {x.shape[0]} images, device {device}, "
              f"{world_size} process(es), batch {args.batch_size}")

    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    amp = autocast(device, args.precision)

    def loss_fn(x0, y):
        """One minibatch's loss (a 0-dim tensor) and the per-example terms for logging."""
        if args.task == "classifier":
            terms = noisy_classifier_loss(diffusion, net, x0, y)
            return terms["loss"].mean(), terms
        kwargs = {}
        if args.class_cond:
            # G5 (CFG): drop the label to the null class (index num_classes) with probability p_uncond
            drop = torch.rand(y.shape, device=device) < args.p_uncond
            kwargs["y"] = torch.where(drop, torch.full_like(y, num_classes), y)
        if t_sampler is None:
            terms = diffusion.training_losses(net, x0, model_kwargs=kwargs)
            return terms["loss"].mean(), terms
        # I3: t ~ p_t, loss weighted by 1 / (T p_t) (an unbiased estimate of the uniform-t loss)
        t, weights = t_sampler.sample(x0.shape[0])
        terms = diffusion.training_losses(net, x0, t, model_kwargs=kwargs)
        t_sampler.update(*gather_all(t, terms.get("vb", terms["loss"]).detach(), world_size))
        return (terms["loss"] * weights).mean(), terms

    def save():
        rng = [rng_state(device)]
        if world_size > 1:  # every rank's random state, so a resumed run draws exactly the same t and noise
            rng = [None] * world_size
            dist.all_gather_object(rng, rng_state(device))  # a collective: every rank takes part
        if not is_main:
            return
        atomic_save({"model": model.state_dict(), "ema": ema.module.state_dict(), "ema_updates": ema.updates,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "batches": batches.state_dict(), "step": step, "rng": rng, "config": cfg,
                     "t_sampler": t_sampler.state_dict() if t_sampler is not None else None}, ckpt_path)

    def sample_grid():
        if not is_main or args.task != "diffusion":
            return
        g = torch.Generator(device).manual_seed(args.seed)
        kwargs = {"y": torch.arange(args.n_sample, device=device) % num_classes} if args.class_cond else {}
        ema.module.eval()
        with amp:
            imgs = ddim_sample_loop(diffusion.respace(min(50, diffusion.num_timesteps)), ema.module,
                                    (args.n_sample, x.shape[1], args.image_size, args.image_size), generator=g, model_kwargs=kwargs, device=device)
        data.save_grid(imgs.float(), os.path.join(out, "samples.png"))
        data.save_grid(imgs.float(), os.path.join(out, f"samples_{step:07d}.png"))

    def evaluate_classifier():
        if not is_main or args.task != "classifier":
            return {}
        xt, yt = test_set
        ema.module.eval()
        with amp:
            acc = classifier_accuracy_at(diffusion, ema.module, xt, yt, generator=torch.Generator(device).manual_seed(0))
        return {f"acc_t{t}": round(float(a), 4) for t, a in acc.items()}

    if args.task == "classifier" and is_main:
        if args.dataset == "synthetic":
            xt, yt = data.synthetic_dataset(n=args.synthetic_n, image_size=args.image_size, seed=args.seed + 1)
        else:
            xt, yt = data.load_dataset(args.dataset, args.data_dir, args.image_size, split="test")
        stride = max(1, xt.shape[0] // 2000)  # 2,000 test images, every class (the files are grouped by class)
        test_set = (data.to_float(xt[::stride]).to(device), yt[::stride].to(device))

    # -- Algorithm 1 --------------------------------------------------------------------------------------------------
    model.train()
    loss_sum = torch.zeros((), device=device)
    n_since, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
    t_saved = t_start
    metrics = open(os.path.join(out, "metrics.jsonl"), "a") if is_main else None
    bar = tqdm(total=args.steps, initial=step, disable=not is_main or args.no_progress, dynamic_ncols=True)
    stop_reason = None
    while step < args.steps:
        x0, y0 = batches.next()
        with amp:
            loss, terms = loss_fn(x0, y0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        ema_update(ema, model)
        loss_sum += loss.detach()
        step += 1
        n_since += 1

        last = step == args.steps
        save_now = step % args.save_every == 0 or last
        over_time = False
        if world_size == 1 or step % args.log_every == 0:
            # wall-clock decisions: every step in one process (no sync: host clock only); with several processes
            # made on rank 0 at log steps and broadcast, so every rank agrees
            now = time.perf_counter()
            flags = torch.tensor([args.max_minutes > 0 and now - t_start > 60 * args.max_minutes,
                                  args.save_minutes > 0 and now - t_saved > 60 * args.save_minutes],
                                 device=device if world_size > 1 else "cpu")
            if world_size > 1:
                dist.broadcast(flags, 0)
                flags = flags.cpu()
            over_time, save_now = bool(flags[0]), save_now or bool(flags[1]) or bool(flags[0])
        if step % args.log_every == 0 or save_now:
            # the one host sync: every --log-every steps (and before every save)
            if world_size > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world_size
            mean_loss = (loss_sum / n_since).item()
            if not math.isfinite(mean_loss):
                stop_reason = (f"loss is {mean_loss} at step {step}: training stopped; the last good checkpoint "
                               f"{ckpt_path} is intact (lower --lr or check the data, then --resume)")
                break
            now = time.perf_counter()
            img_s = n_since * args.batch_size / (now - t_log)
            record = {"step": step, "loss": round(mean_loss, 6), "lr": scheduler.get_last_lr()[0],
                      "img_per_s": round(img_s, 1), "elapsed_s": round(now - t_start, 1)}
            if device.type == "cuda":
                record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if args.task == "classifier" and (step % args.eval_every == 0 or last or over_time):
                accuracy = evaluate_classifier()
                record.update(accuracy)
                if is_main:
                    tqdm.write(f"step {step}: test accuracy at noise level " +
                               ", ".join(f"t={k[5:]}: {v:.3f}" for k, v in accuracy.items()))
                model.train()
            if is_main:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.0f}")
            loss_sum.zero_()
            n_since, t_log = 0, time.perf_counter()
        if save_now:
            save()
            t_saved = time.perf_counter()
            if world_size > 1:
                dist.barrier()
        if args.sample_every and (step % args.sample_every == 0 or last or over_time):
            sample_grid()
            model.train()
        bar.update(1)
        if over_time:
            stop_reason = None
            if is_main:
                print(f"\n--max-minutes {args.max_minutes} reached at step {step}; checkpoint saved")
            break
    bar.close()
    if metrics:
        metrics.close()
    if world_size > 1:
        dist.destroy_process_group()
    if stop_reason:
        raise TrainingDiverged(stop_reason)
    if is_main:
        print(f"done: step {step}, run in {out}")
    return {"step": step, "model": model, "ema": ema.module, "out": out}


class TrainingDiverged(Exception):
    pass


def gather_all(t, losses, world_size):
    """All ranks' (t, loss) pairs, so every rank's importance sampler sees the same history."""
    if world_size == 1:
        return t, losses
    ts, ls = [torch.empty_like(t) for _ in range(world_size)], [torch.empty_like(losses) for _ in range(world_size)]
    dist.all_gather(ts, t)
    dist.all_gather(ls, losses)
    return torch.cat(ts), torch.cat(ls)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
