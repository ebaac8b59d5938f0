"""
Train a diffusion model (DDPM Algorithm 1) or a noisy classifier for guidance (ADM §4), on one GPU, on several
with torchrun, or slowly on a CPU.

    python train.py                                        # the DDPM CIFAR-10 recipe (35.7M U-Net, L_simple)
    python train.py --recipe digits                        # handwritten digits that a CPU learns in 5 minutes
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
`loss_of` is lines 3-5 and `train_step` line 5's gradient step (AdamW with warm-up and clipping, then the EMA of the
weights that samples are drawn from); `setup` builds everything, straight-line; `train` is the loop of lines 1, 2 and
6. What a real run needs around them (the locked run folder, checkpoints that are never bad, exact --resume, signals,
the time budget, the checks of the flags, logs, loss.png, sample grids) is runs.py; named sets of flags are
recipes.py. On CUDA: bf16 autocast, channels_last, fused AdamW, TF32,
--compile, and no host synchronisation inside the loop (the loss is read every --log-every steps only).

--task ddgan: a DENOISING DIFFUSION GAN (Xiao, Kreis & Vahdat, ICLR 2022; ddgan.py): T = 4 steps whose reverse steps
push a generator's x_0' = G(x_t, z, t) through DDPM's posterior (DDGAN eq. 6), trained against a discriminator
D(x_{t-1}, x_t, t) (DDGAN eqs. 4-5, R1 on every --lazy-reg-th D step); Adam (0.5, 0.9) for both, cosine decay to
1e-5, untyped flags from the paper's CIFAR-10 recipe (recipes.py: ddgan-cifar10), `train_step_ddgan` its step; one
process (R1 differentiates D's gradient, which DistributedDataParallel does not support).
"""

import copy
import math
import os
import sys
import time

import torch

import checkpoint
import cli
import data
import ddgan
import recipes
import runs
from cli import say
from ddpm import ImportanceSampler
from guidance import noisy_classifier_loss
from schedules import SCHEDULES
from unet import EncoderUNet

RECIPE = ddgan.CIFAR10_RECIPE  # DDGAN's CIFAR-10 recipe (the defaults of its own flags below)
DDGAN_MIN_LR = 1e-5  # their cosine decay ends at 1e-5 (CosineAnnealingLR(eta_min=1e-5), for G and D alike)


# ----------------------------------------------------------------------------------------------------------------
# The flags: every one checked before any work (one line naming it, exit 2)
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    """The flags, group by group. Longer than a function should be, and better whole: a list read top to bottom, which
    splitting would only scatter."""
    p = cli.Parser(description="Train a DDPM/iDDPM diffusion model (DDPM Algorithm 1) or a noisy classifier for "
                               "classifier guidance (ADM §4).")
    g = p.add_argument_group("recipe (flags typed beside it win)")
    g.add_argument("--recipe", default=None, metavar="NAME", help="a named set of flags (recipes.py; default "
                   f"{recipes.DEFAULT}): " + recipes.describe())
    g.add_argument("--config", default=None, metavar="RUN/config.json", help="start a new run with the flags of the run "
                   "that wrote this config.json (its --out aside)")
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
                        "ddgan: a Denoising Diffusion GAN (Xiao et al. 2022), whose untyped flags take the "
                        "ddgan-cifar10 recipe")
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
    g.add_argument("--latent-dim", type=int, default=RECIPE["latent_dim"], help="nz: G(x_t, z, t) draws z ~ N(0, I_nz) "
                   "(DDGAN eq. 6; the paper: 100)")
    g.add_argument("--d-ch", type=int, default=RECIPE["d_ch"], help="base channels of the discriminator "
                   "D(x_{t-1}, x_t, t), an EncoderUNet on the concatenated pair (the paper's ngf: 64)")
    g.add_argument("--lr-d", type=float, default=RECIPE["lr_d"], help="the discriminator's Adam learning rate (the "
                   "paper: 1.25e-4; --lr is the generator's, 1.6e-4 under --task ddgan)")
    g.add_argument("--r1-gamma", type=float, default=RECIPE["r1_gamma"], help="gamma of the R1 penalty gamma/2 "
                   "||grad D(real)||^2 (Mescheder et al. 2018 eq. 9; the authors' CIFAR-10 command: 0.02)")
    g.add_argument("--lazy-reg", type=int, default=RECIPE["lazy_reg"], help="R1 on every N-th discriminator step only "
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
    g.add_argument("--tensorboard", action="store_true", help="also write metrics.jsonl's numbers and the sample "
                   "grids as TensorBoard events into the run folder (tensorboard --logdir runs; pip install tensorboard)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar; a log line per --log-every instead")
    return p


# ----------------------------------------------------------------------------------------------------------------
# The network, the optimiser, the EMA and the one training step (benchmarks/bench.py times `train_step` itself)
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
        # theta_ema <- d theta_ema + (1 - d) theta = theta_ema + (1 - d) (theta - theta_ema) (DDPM §4)
        torch._foreach_lerp_(self.averaged, self.current, 1.0 - d)
        for b_ema, b in self.buffers:
            b_ema.copy_(b)
        self.updates += 1

    def state_dict(self):
        """The averaged weights (what a checkpoint's "ema" holds); `updates` is saved beside them."""
        return self.module.state_dict()

    def load_state_dict(self, state, updates):
        self.module.load_state_dict(state)  # copies into the same tensors: the lists above stay valid
        self.updates = int(updates)


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
        # lines 3-5: t ~ Uniform({1, ..., T}), eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4),
        # L_simple = || eps - eps_theta(x_t, t) ||^2 (DDPM eq. 14; iDDPM eq. 16 adds 0.001 L_vlb for --loss hybrid)
        return diffusion.training_losses(net, x0, model_kwargs=kwargs)["loss"].mean()
    # I3 (iDDPM §3.3): t ~ p_t ∝ sqrt(E[L_t^2]), each term weighted by 1 / (T p_t): an unbiased estimate of the
    # uniform-t loss with less variance
    t, weights = t_sampler.sample(x0.shape[0])
    terms = diffusion.training_losses(net, x0, t, model_kwargs=kwargs)
    t_sampler.update(*runs.gather_all(t, terms.get("vb", terms["loss"]).detach()))
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
    returns [d_loss, g_loss], left on the device. Not a branch of `train_step`: two networks and two optimizers share
    nothing with Algorithm 1's one loss, and `train_step` stays what benchmarks/bench.py times."""
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
# Setup, the loop, main
# ----------------------------------------------------------------------------------------------------------------

def setup(argv):
    """Everything before the first step; every check that can fail on the user's input runs here, before any work,
    and a refused start leaves no run folder behind. Returns (run, training): runs.Run and runs.Training."""
    started = time.perf_counter()  # --max-minutes counts from here
    parser = build_parser()
    args, given = parser.parse_args(argv), runs.given_flags(parser, argv)
    # --recipe NAME / --config RUN/config.json: every flag not typed (recipes.py; --task ddgan alone: DDGAN's recipe)
    args.recipe = recipes.apply(args, given, runs.dests(parser), runs.RUNTIME)
    runs.check_args(args)
    out = args.out or os.path.join("runs", args.dataset + ("" if args.task == "diffusion" else f"-{args.task}"))
    run = runs.Run(args, given, out, started)  # torchrun: the process group, cuda:LOCAL_RANK
    try:
        return run, build(run)
    except BaseException:
        run.abandon()
        raise


def build(run):
    """Lock the run folder, load the data, build (or resume) the networks, the optimizers and the EMA."""
    args, device = run.args, run.device
    ckpt, changed = run.open(runs.check_args)  # --resume: the checkpoint's flags, with the changeable ones typed now

    # x_0 ~ q(x_0): the whole uint8 training set on the device, batches drawn (and flipped) there
    if run.is_main:
        say(f"loading the {args.dataset} training images ...")
    x, y, source = data.load_dataset_and_source(args.dataset, args.data_dir, args.image_size, split="train",
                                                synthetic_n=args.synthetic_n)
    args.num_classes = ckpt["config"]["num_classes"] if ckpt else int(y.max()) + 1
    batches = data.Batches(x, y, args.batch_size // run.world_size, device, seed=args.seed, rank=run.rank,
                           world_size=run.world_size, flip=data.flips(args.dataset), channels_last=device.type == "cuda")

    # the network (the same initial weights on every rank; a resumed run's as its checkpoint describes it), the
    # diffusion, AdamW, the EMA; DDGAN's discriminator and its own Adam (--lr-d)
    torch.manual_seed(args.seed)
    channels = int(x.shape[1])
    kind, model_args = ((ckpt["kind"], ckpt["model_args"]) if ckpt else
                        build_model_args(args, args.num_classes, channels))
    runs.check_memory(kind, model_args, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = runs.on_device(checkpoint.KINDS[kind](**model_args), device)
    diffusion_args = diffusion_args_of(args)
    training = runs.Training(kind=kind, model=model, net=model, optimizer=make_optimizer(model, args),
                             ema=EMA(model, args.ema), diffusion=checkpoint.build_diffusion(diffusion_args),
                             diffusion_args=diffusion_args, batches=batches)
    if kind == "ddgan":
        training.disc_args = ckpt["discriminator_args"] if ckpt else runs.discriminator_args_of(args, channels)
        training.disc = runs.on_device(EncoderUNet(**training.disc_args), device)
        training.opt_d = make_optimizer(training.disc, args, lr=args.lr_d)
    if args.t_sampler == "importance":  # I3 (iDDPM §3.3)
        training.t_sampler = ImportanceSampler(training.diffusion.num_timesteps, device=device)
    if ckpt:
        run.resume(training, ckpt)  # weights, optimizers, EMA, data order, random state: bit for bit
    else:
        torch.manual_seed(args.seed + 1000 * run.rank)  # different t and eps on every rank
    training.net = run.wrap(model)  # what runs the forward: DistributedDataParallel under torchrun, --compile
    run.begin(training, x, y, source, changed)  # the probe, the clock, config.json, the announcements
    return training


def train(run, training):
    """Algorithm 1 until --steps, the time budget, a signal or a failure. Returns why it stopped: "steps", "time",
    the signal, or "interrupted" (a second signal)."""
    args = run.args
    # summed on the device, read every --log-every steps: [loss], or [d_loss, g_loss] for --task ddgan
    loss_sum = torch.zeros(len(training.loss_names), device=run.device)
    training.model.train()
    try:
        with run.loop() as bar:  # a SIGINT / SIGTERM lets the step finish; the run then saves and stops
            while True:
                # lines 2-5: x_0 ~ q(x_0) (drawn on the device) and one gradient step
                x0, y = training.batches.next()
                if training.kind == "ddgan":  # DDGAN: a D step and a G step (DDGAN eqs. 4-6)
                    loss_sum += train_step_ddgan(run.step, x0, training.model, training.disc, training.diffusion,
                                                 training.optimizer, training.opt_d, training.ema, args)
                else:
                    loss_sum += train_step(run.step, x0, y, training.model, training.net, training.diffusion,
                                           training.optimizer, training.ema, args, training.t_sampler)
                run.step += 1
                bar.update(1)

                # what this step ends with: cadences, wall clock and signals, agreed by every rank
                end = run.end_of_step()

                # the classifier's accuracy on held-out images at 4 noise levels (G4), for the log line
                accuracy = run.evaluate_classifier(training, final=bool(end.stop)) if end.evaluate else {}

                # log: the one host-device sync, every --log-every steps and before every save; a loss that is
                # not finite stops the run here
                if run.step % args.log_every == 0 or end.save or end.evaluate:
                    run.log(bar, training, loss_sum, accuracy)
                    loss_sum.zero_()
                run.show(bar, training, loss_sum)  # the bar: its total (--steps or the time budget), the early loss

                # a checkpoint (never a bad one) and loss.png; a grid from the EMA weights (shrunk to the time left)
                if end.save:
                    run.save(training)
                if end.sample:
                    run.sample_grid(training, final=bool(end.stop))

                if end.stop:
                    return end.stop
    except KeyboardInterrupt:  # a second signal: stop at once, nothing more saved
        return "interrupted"


def main(argv=None):
    """python train.py ...: exit 0 when done; 2 on bad input (one line, before any work); 1 when the run diverged,
    a save failed or the device ran out of memory (one line); 130 / 143 after a SIGINT / SIGTERM (checkpoint saved)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run, training = cli.main_guard(setup, argv, catch_signals=False)
    except KeyboardInterrupt:
        print("interrupted before training started: nothing was written", file=sys.stderr)
        sys.exit(130)
    try:
        outcome = train(run, training)
    except (runs.RunFailed, torch.OutOfMemoryError) as e:
        print(f"error: {e if isinstance(e, runs.RunFailed) else run.out_of_memory()}", file=sys.stderr)
        sys.exit(1)
    finally:
        run.close()
    code = run.finish(outcome)
    if code:
        sys.exit(code)
    return run


if __name__ == "__main__":
    main()
