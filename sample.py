"""
Draw samples from a trained run: DDPM ancestral sampling (Algorithm 2), DDIM (any eta, skipped steps), annealed
Langevin and predictor-corrector (the score view), with classifier or classifier-free guidance; DDIM's latent
interpolation and inversion experiments.

    python sample.py --sampler ddim --steps 50          # latest run, EMA weights: grid PNG + .npz of uint8 images
    python sample.py --sampler ddpm                     # all T steps of Algorithm 2
    python sample.py --sampler ddpm --steps 100 --var small          # respaced ancestral sampling
    python sample.py --sampler ddim --eta 1 --skip quad
    python sample.py --interpolate                      # slerp between latents, decoded by DDIM (DDIM §5.3)
    python sample.py --invert picture.png               # DDIM inversion x_0 -> x_T, then back (DDIM §4.3)
    python sample.py --classifier runs/cifar10-classifier --classifier-scale 4 --class 3   # classifier guidance
    python sample.py --checkpoint runs/cifar10-cond --cfg-scale 3 --class 3               # classifier-free guidance

The .npz holds `x`: uint8 [N, H, W, 3], the format FID tools (and evaluate.py) read. Same --seed, same images.
"""

import glob
from argparse import ArgumentDefaultsHelpFormatter
import math
import os
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

import data
from ddim import ddim_invert, ddim_sample_loop, slerp
from train import Parser, UsageError, autocast, build_diffusion, build_model, find_checkpoint, load_checkpoint, resolve_device

SAMPLERS = ("ddpm", "ddim", "langevin", "pc")


def build_parser():
    p = Parser(description="Sample from a trained diffusion run.",
                                formatter_class=ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a ckpt.pt or a run directory (default: runs/cifar10, "
                   "else the most recently written runs/*/ckpt.pt)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50 for ddim, all T for "
                   "ddpm, 100 noise levels for langevin/pc); ddpm with fewer steps uses the respaced schedule")
    p.add_argument("--eta", type=float, default=0.0, help="ddim: 0 deterministic, 1 DDPM-like (DDIM eq. 16)")
    p.add_argument("--skip", default="uniform", choices=("uniform", "quad"), help="which steps to keep (DDIM §4.2)")
    p.add_argument("--var", default=None, choices=("large", "small"), help="ddpm with a fixed-variance model: "
                   "sigma^2 = beta (large, the run's default) or beta~ (small)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    p.add_argument("--langevin-steps", type=int, default=2, help="langevin: inner steps per noise level")
    p.add_argument("--delta", type=float, default=None, help="langevin: step size at the smallest noise level")
    p.add_argument("--corrector-steps", type=int, default=1, help="pc: Langevin corrector steps per level")
    p.add_argument("--snr", type=float, default=0.16, help="pc: signal-to-noise ratio of the corrector step")
    p.add_argument("--predictor", default="ddpm", choices=("ddpm", "ddim"), help="pc: the predictor step (ddim uses --eta)")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output path without extension (default: <run>/samples_<sampler><steps>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--interpolate", action="store_true", help="8 rows of slerp between two latents (DDIM §5.3)")
    p.add_argument("--invert", default=None, metavar="IMAGE", help="DDIM-invert an image, then reconstruct it")
    p.add_argument("--class", dest="label", type=int, default=None, help="class to sample (class-conditional "
                   "model or classifier guidance); omitted: a label per image")
    p.add_argument("--classifier", default=None, help="noisy classifier run or ckpt.pt for classifier guidance")
    p.add_argument("--classifier-scale", type=float, default=None, help="s in s * grad log p(y | x_t) (default 1 "
                   "with --classifier)")
    p.add_argument("--cfg-scale", type=float, default=None, help="w of classifier-free guidance (class-conditional run)")
    p.add_argument("--progress", action="store_true", help="progress bar for every sampling loop")
    return p


def default_checkpoint():
    if os.path.isdir(os.path.join("runs", "cifar10")) and os.path.isfile(os.path.join("runs", "cifar10", "ckpt.pt")):
        return os.path.join("runs", "cifar10")
    found = [p for p in glob.glob(os.path.join("runs", "*", "ckpt.pt"))
             if load_checkpoint(p)["config"].get("task", "diffusion") == "diffusion"]
    if not found:
        raise UsageError("--checkpoint: no run found under runs/; train one with `python train.py --dataset cifar10` "
                         "or pass --checkpoint PATH")
    return os.path.dirname(max(found, key=os.path.getmtime))


def load_run(path, use_ema=True, device="cpu", task="diffusion"):
    """(model in eval mode on device, its config, its step) from a checkpoint file or run directory."""
    flag = "--classifier" if task == "classifier" else "--checkpoint"
    ckpt_path = find_checkpoint(path, flag)
    ckpt = load_checkpoint(ckpt_path, flag)
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or "ema" not in ckpt:
        raise UsageError(f"{flag}: {ckpt_path} is not a checkpoint written by train.py")
    if cfg.get("task", "diffusion") != task:
        raise UsageError(f"{flag}: {ckpt_path} holds a {cfg.get('task')} run, not a {task}")
    model = build_model(cfg, cfg["num_classes"])
    model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    model.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, cfg, ckpt["step"]


def check_args(args, cfg, T):
    if args.steps is not None and not 1 <= args.steps <= T:
        raise UsageError(f"--steps: must be in 1..{T} (the run's diffusion steps), got {args.steps}")
    if args.eta < 0:
        raise UsageError(f"--eta: must be >= 0 (0 = deterministic DDIM), got {args.eta}")
    if args.n < 1 or args.batch_size < 1:
        raise UsageError("--n and --batch-size: must be >= 1")
    if args.var is not None and cfg["loss"] != "mse":
        raise UsageError("--var: this run learned its variance (--loss hybrid/kl); drop --var")
    if args.label is not None and not 0 <= args.label < cfg["num_classes"]:
        raise UsageError(f"--class: must be in 0..{cfg['num_classes'] - 1}, got {args.label}")
    if args.classifier_scale is not None:
        if args.classifier is None:
            raise UsageError("--classifier-scale: classifier guidance needs --classifier RUN (a run trained with "
                             "--task classifier)")
        if args.classifier_scale < 0:
            raise UsageError(f"--classifier-scale: must be >= 0, got {args.classifier_scale}")
    if args.cfg_scale is not None:
        if args.cfg_scale < 0:
            raise UsageError(f"--cfg-scale: must be >= 0, got {args.cfg_scale}")
        if not cfg["class_cond"]:
            raise UsageError("--cfg-scale: this run is unconditional; classifier-free guidance needs a run trained "
                             "with --class-cond")
    if args.label is not None and not cfg["class_cond"] and args.classifier is None:
        raise UsageError("--class: this run is unconditional; add --classifier RUN for classifier guidance or use a "
                         "--class-cond run")
    if args.sampler in ("langevin", "pc") and (args.langevin_steps < 1 or args.corrector_steps < 1 or args.snr <= 0
                                               or (args.delta is not None and args.delta <= 0)):
        raise UsageError("--langevin-steps/--corrector-steps: must be >= 1; --snr, --delta: must be > 0")


class IgnoreLabels(torch.nn.Module):
    """An unconditional model under classifier guidance: the labels in model_kwargs are the cond_fn's, not its."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y=None, **kwargs):
        return self.model(x, t, **kwargs)


class Sampler:
    """Everything needed to turn latents into images for one run: the model (maybe wrapped for guidance),
    the diffusion, the sampler's settings and the labels. Used by sample.py and evaluate.py."""

    def __init__(self, model, cfg, device, sampler="ddim", steps=None, eta=0.0, skip="uniform", var=None,
                 clip=True, precision="auto", classifier=None, classifier_scale=1.0, cfg_scale=None, label=None,
                 langevin_steps=2, delta=None, corrector_steps=1, snr=0.16, predictor="ddpm", progress=False):
        self.cfg, self.device, self.sampler, self.eta, self.skip, self.clip = cfg, device, sampler, eta, skip, clip
        var_type = {"large": "fixed_large", "small": "fixed_small", None: None}[var]
        self.diffusion = build_diffusion(cfg, var_type)
        T = self.diffusion.num_timesteps
        self.steps = steps or {"ddim": min(50, T), "ddpm": T}.get(sampler, min(100, T))
        # D4: the sampler runs on every step of this respaced diffusion
        self.spaced = self.diffusion if self.steps == T else self.diffusion.respace(self.steps, skip)
        self.amp = autocast(torch.device(device), precision)
        self.num_classes, self.label, self.progress = cfg["num_classes"], label, progress
        self.langevin = dict(langevin_steps=langevin_steps, delta=delta, corrector_steps=corrector_steps, snr=snr,
                             predictor=predictor)
        self.model, self.cond_fn = model, None
        self.conditional = cfg["class_cond"] or classifier is not None
        if cfg_scale is not None:
            from guidance import ClassifierFreeGuidance
            self.model = ClassifierFreeGuidance(model, cfg_scale, null_class=cfg["num_classes"])
        if classifier is not None:
            from guidance import classifier_cond_fn
            self.cond_fn = classifier_cond_fn(classifier, classifier_scale)
            if not cfg["class_cond"]:
                self.model = IgnoreLabels(model)  # y is for the classifier only

    def labels(self, n, generator):
        """The class of each image: --class, or uniform labels sorted so the grid is laid out by class."""
        if not self.conditional:
            return None
        if self.label is not None:
            return torch.full((n,), self.label, dtype=torch.long, device=self.device)
        y = torch.randint(0, self.num_classes, (n,), generator=generator, device=generator.device)
        return y.sort().values.to(self.device)

    def decode(self, x_T, y=None, generator=None):
        """Run the chosen sampler from the latent x_T; returns floats in [-1, 1]."""
        kwargs = {"y": y} if y is not None else {}
        common = dict(noise=x_T, cond_fn=self.cond_fn, model_kwargs=kwargs, generator=generator, progress=self.progress)
        with self.amp:
            if self.sampler == "ddim":
                return ddim_sample_loop(self.spaced, self.model, x_T.shape, self.eta,
                                        clip_denoised=self.clip, **common).float()
            if self.sampler == "ddpm":
                return self.spaced.p_sample_loop(self.model, x_T.shape, clip_denoised=self.clip, **common).float()
            import score
            lv = self.langevin
            if self.sampler == "langevin":
                delta = {} if lv["delta"] is None else {"delta": lv["delta"]}
                return score.langevin_sample_loop(self.spaced, self.model, x_T.shape,
                                                  langevin_steps=lv["langevin_steps"],
                                                  clip_denoised=self.clip, **delta, **common).float()
            return score.pc_sample_loop(self.spaced, self.model, x_T.shape,
                                        corrector_steps=lv["corrector_steps"], snr=lv["snr"], predictor=lv["predictor"],
                                        eta=self.eta, clip_denoised=self.clip, **common).float()

    def shape(self, n):
        return (n, self.cfg.get("channels", 3), self.cfg["image_size"], self.cfg["image_size"])

    def generate(self, n, batch_size=256, seed=0):
        """n images as uint8 [n, H, W, C] and their labels (or None). Batch i is drawn from seed (seed, i)."""
        images, labels = [], []
        for i, start in enumerate(tqdm(range(0, n, batch_size), desc="batches", disable=n <= batch_size, leave=False)):
            g = torch.Generator(self.device).manual_seed(seed * 1_000_003 + i)
            m = min(batch_size, n - start)
            x_T = torch.randn(self.shape(m), generator=g, device=self.device)
            y = self.labels(m, g)
            images.append(data.to_uint8_images(self.decode(x_T, y, g)))
            if y is not None:
                labels.append(y.cpu().numpy())
        return np.concatenate(images), (np.concatenate(labels) if labels else None)


def save_outputs(images_uint8, labels, out, nrow=None):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2)
    data.save_grid(data.to_float(x), out + ".png", nrow=nrow)
    arrays = {"x": images_uint8} if labels is None else {"x": images_uint8, "y": labels}
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out + ".npz")


def interpolate(s, seed, rows=8, frames=8):
    """DDIM §5.3: decode slerp(z0, z1, alpha) for alpha in [0, 1]; rows of `frames` images."""
    g = torch.Generator(s.device).manual_seed(seed)
    z0 = torch.randn(s.shape(rows), generator=g, device=s.device)
    z1 = torch.randn(s.shape(rows), generator=g, device=s.device)
    alphas = torch.linspace(0, 1, frames, device=s.device)
    # D5: x_T(alpha) = slerp(z0, z1, alpha), every (row, alpha) pair decoded in one batch
    z = slerp(z0.repeat_interleave(frames, 0), z1.repeat_interleave(frames, 0), alphas.repeat(rows))
    y = s.labels(rows, g)
    y = y.repeat_interleave(frames) if y is not None else None
    return data.to_uint8_images(s.decode(z, y, g)), frames


def invert(s, image_path):
    """DDIM §4.3: x_0 -> x_T by the reversed eta = 0 update, then x_T -> x_0 again. Returns [original, recon]."""
    from PIL import Image
    try:
        img = Image.open(image_path).convert("RGB" if s.cfg.get("channels", 3) == 3 else "L")
    except (OSError, ValueError):
        raise UsageError(f"--invert: cannot read an image from {image_path}")
    size = s.cfg["image_size"]
    import torchvision.transforms.functional as TF
    img = TF.center_crop(TF.resize(img, size, antialias=True), size)
    x0 = data.to_float(TF.pil_to_tensor(img)[None]).to(s.device)
    with s.amp:
        x_T = ddim_invert(s.spaced, s.model, x0, refine=2).float()
    recon = s.decode(x_T)
    mse = ((recon - x0) ** 2).mean().item()
    # PSNR over the [-1, 1] range (peak-to-peak 2)
    print(f"inversion: latent std {x_T.std().item():.3f}, reconstruction MSE {mse:.5f}, PSNR {10 * math.log10(4 / max(mse, 1e-12)):.2f} dB")
    return data.to_uint8_images(torch.cat([x0, recon])), 2


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        run = args.checkpoint or default_checkpoint()
        model, cfg, step = load_run(run, use_ema=not args.no_ema, device=device)
        check_args(args, cfg, cfg["diffusion_steps"])
        classifier = None
        if args.classifier is not None:
            classifier, clf_cfg, _ = load_run(args.classifier, device=device, task="classifier")
            if clf_cfg["num_classes"] != cfg["num_classes"] or clf_cfg["image_size"] != cfg["image_size"]:
                raise UsageError("--classifier: trained on other classes or image size than the diffusion run")
        if args.sampler != "ddim" and (args.interpolate or args.invert):
            raise UsageError("--interpolate/--invert: these are DDIM experiments; use --sampler ddim")
        s = Sampler(model, cfg, device, args.sampler, args.steps, args.eta, args.skip, args.var, not args.no_clip,
                    args.precision, classifier, 1.0 if args.classifier_scale is None else args.classifier_scale,
                    args.cfg_scale, args.label,
                    args.langevin_steps, args.delta, args.corrector_steps, args.snr, args.predictor, args.progress)
        run_dir = os.path.dirname(find_checkpoint(run))
        if args.out is not None:  # fail before sampling, not after
            try:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out: cannot create the folder of {args.out} ({e.strerror}); choose a writable path") from None
        if args.interpolate:
            images, nrow = interpolate(s, args.seed)
            labels, name = None, "interpolate"
        elif args.invert:
            images, nrow = invert(s, args.invert)
            labels, name = None, "invert"
        else:
            images, labels = s.generate(args.n, args.batch_size, args.seed)
            nrow, name = None, f"samples_{args.sampler}{s.steps}"
        out = args.out or os.path.join(run_dir, name)
        try:
            save_outputs(images, labels, out, nrow)
        except OSError as e:
            raise UsageError(f"--out: cannot write {out}.png/.npz ({e.strerror}); choose a writable path") from None
        print(f"{len(images)} images from step {step} of {run_dir} ({args.sampler}, {s.steps} steps) -> {out}.png, {out}.npz")
    except (UsageError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
