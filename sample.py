"""
Draw samples from a trained run: DDPM ancestral sampling (Algorithm 2), DDIM (any eta, skipped steps), annealed
Langevin and predictor-corrector (the score view), with classifier or classifier-free guidance; DDIM's latent
interpolation and inversion experiments. The samplers, guidance and batching are sampling.py's menu; this file is the
command line around it.

    python sample.py --sampler ddim --steps 50          # newest run, EMA weights: a grid PNG + an .npz of uint8 images
    python sample.py --sampler ddpm                     # all T steps of Algorithm 2
    python sample.py --sampler ddpm --steps 100 --var small          # respaced ancestral sampling
    python sample.py --sampler ddim --eta 1 --skip quad
    python sample.py --interpolate                      # slerp between latents, decoded by DDIM (DDIM §5.3)
    python sample.py --invert cifar10:7                 # DDIM inversion x_0 -> x_T and back (DDIM §4.3), test image 7
    python sample.py --invert picture.png               # ... or any picture (center-cropped to a square, resized)
    python sample.py --classifier runs/cifar10-classifier --classifier-scale 4 --class 3   # classifier guidance
    python sample.py --checkpoint runs/cifar10-cond --cfg-scale 3 --class 3               # classifier-free guidance
    python sample.py --checkpoint runs/cifar10-ddgan --sampler ddgan    # DDGAN's 4-step chain (train.py --task ddgan)

OUTPUTS. Each command writes NAME.png (a grid) and NAME.npz (`x`: uint8 [N, H, W, 3], `y`: the labels of a
conditional run: what evaluate.py reads) into <run>/samples/, where NAME says what made them: the sampler and its
steps, every setting that differs from its default, and the seed, e.g.

    runs/cifar10/samples/ddim50_seed0.png                 python sample.py
    runs/cifar10/samples/ddim50_eta1_quad_cg4_class3_seed0.png
    runs/cifar10/samples/interpolate_ddim50_seed0.png     python sample.py --interpolate
    runs/cifar10/samples/invert_cifar10-7_ddim50.png      python sample.py --invert cifar10:7

An existing file is never replaced without --force. The same --seed and --batch-size give the same images.
"""

import glob
import math
import os
import re

import torch

import checkpoint
import data
import sampling
from cli import (Parser, UsageError, check_number, main_guard, precision_name, resolve_device, say, wrote)
from ddim import ddim_invert, slerp

FRAMES = 8  # --interpolate: images per row, alpha = 0, 1/7, ..., 1 (DDIM Figure 6)


def build_parser():
    p = Parser(description="Sample from a trained diffusion run (DDPM, DDIM, Langevin, predictor-corrector; "
                           "classifier and classifier-free guidance; DDIM interpolation and inversion).")
    p.add_argument("--checkpoint", default=None, help="a ckpt.pt, a run folder or a diffusers model folder "
                   "(default: runs/cifar10, else the newest diffusion run under runs/)")
    sampling.add_arguments(p)
    p.add_argument("--n", type=int, default=64, help="number of images (--interpolate: whole rows of 8)")
    p.add_argument("--batch-size", type=int, default=256, help="images sampled at once")
    p.add_argument("--seed", type=int, default=0, help="batch i is drawn from the generator seeded by (seed, i)")
    p.add_argument("--out", default=None, help="output path without extension, for OUT.png and OUT.npz "
                   "(default: <run>/samples/<sampler><steps>_<settings>_seed<seed>)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--interpolate", action="store_true",
                   help="rows of 8 images decoded by DDIM from slerp(z0, z1, alpha), alpha = 0 .. 1 (DDIM §5.3)")
    p.add_argument("--invert", default=None, metavar="IMAGE",
                   help="encode IMAGE to x_T with the reversed eta = 0 DDIM update, then decode it (DDIM §4.3); "
                        "IMAGE is a picture file or cifar10:N, the N-th CIFAR-10 test image")
    p.add_argument("--data-dir", default=None, help="--invert cifar10:N: the CIFAR-10 folder "
                   "(default: data/cifar10, then ../shared/data/cifar10)")
    return p


def check_args(args):
    """What can be checked before loading anything."""
    check_number("--n", args.n, lo=1, integer=True)
    check_number("--batch-size", args.batch_size, lo=1, integer=True)
    if args.interpolate and args.invert:
        raise UsageError("--interpolate: choose one experiment; drop --interpolate or --invert")
    if (args.interpolate or args.invert) and args.sampler != "ddim":
        raise UsageError("--sampler: --interpolate and --invert are DDIM experiments (DDIM §4.3, §5.3); "
                         "use --sampler ddim")
    if args.interpolate and args.n < 2:
        raise UsageError("--n: --interpolate needs at least 2 images (its two end points)")
    if args.invert and (args.eta != 0 or args.classifier or args.cfg_scale is not None):
        raise UsageError("--invert: inversion runs the unguided eta = 0 ODE (DDIM §4.3); drop --eta, --classifier "
                         "and --cfg-scale")


def default_checkpoint():
    """runs/cifar10, else the newest run under runs/ that holds a diffusion model."""
    if os.path.isfile(os.path.join("runs", "cifar10", checkpoint.FILENAME)):
        return os.path.join("runs", "cifar10")
    for path in sorted(glob.glob(os.path.join("runs", "*", checkpoint.FILENAME)), key=os.path.getmtime, reverse=True):
        try:
            if checkpoint.load(path)["kind"] == "diffusion":
                say(f"using {os.path.dirname(path)}, the newest diffusion run under runs/ (choose with --checkpoint)")
                return os.path.dirname(path)
        except UsageError:
            continue
    raise UsageError("--checkpoint: no run found under runs/; train one with `python train.py --dataset cifar10` "
                     "or pass --checkpoint PATH")


def samples_dir(ckpt):
    """<run>/samples for a run's ckpt.pt; samples/<model> for a diffusers folder or hf:NAME (not ours to write in)."""
    path = ckpt["path"]
    if os.path.isfile(path):
        return os.path.join(os.path.dirname(path), "samples")
    return os.path.join("samples", re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/")) or "model")


# ----------------------------------------------------------------------------------------------------------------
# The experiments
# ----------------------------------------------------------------------------------------------------------------

def read_image(spec, size, channels, data_dir=None):
    """The image to invert as floats [1, C, size, size] in [-1, 1], its label (or None) and a name for files.

    `spec` is a picture file, or cifar10:N for the N-th CIFAR-10 test image (read by data.py). A non-square picture
    is cut to its central square (said in one line, never squashed); then it is resized to the network's size.
    """
    import torchvision.transforms.functional as TF
    from PIL import Image
    m = re.fullmatch(r"cifar10:(\d+)", spec)
    if m:
        x, y = data.load_cifar10(data_dir, split="test")
        i = int(m.group(1))
        if i >= x.shape[0]:
            raise UsageError(f"--invert: cifar10:N takes N in 0..{x.shape[0] - 1} (the test set), got {i}")
        img, label, name = TF.to_pil_image(x[i]), int(y[i]), f"cifar10-{i}"
    else:
        if spec.startswith("cifar10"):
            raise UsageError(f"--invert: expected cifar10:N with N a test-set index, got {spec!r}")
        try:
            with Image.open(spec) as im:
                img = im.convert("RGB")
        except (OSError, ValueError):
            raise UsageError(f"--invert: cannot read an image from {spec}; pass a picture file or cifar10:N "
                             "(a CIFAR-10 test image)") from None
        label, name = None, re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(spec))[0])
    w, h = img.size
    if w != h:
        side = min(w, h)
        say(f"note: --invert: {spec} is {w}x{h}; using its central {side}x{side} square"
            + (f", resized to {size}x{size}" if side != size else ""))
        img = TF.center_crop(img, [side, side])
    elif w != size:
        say(f"note: --invert: {spec} is {w}x{h}; resized to the network's {size}x{size}")
    if img.size[0] != size:
        img = TF.resize(img, [size, size], antialias=True)
    if channels == 1:
        img = img.convert("L")
    return data.to_float(TF.pil_to_tensor(img)[None]), label, name


def interpolation_grid(n):
    """--interpolate draws whole rows of FRAMES images (one row of n when n < FRAMES): (rows, frames)."""
    frames = min(FRAMES, n)
    rows = n // frames
    if rows * frames != n:
        say(f"note: --interpolate draws whole rows of {frames}: {rows * frames} images for --n {n}")
    return rows, frames


def interpolation_latents(s, rows, frames, seed):
    """DDIM §5.3: rows of slerp(z0, z1, alpha), alpha = 0 .. 1, as latents (and labels) for s.generate."""
    g = torch.Generator(s.device).manual_seed(seed)
    z0 = torch.randn((rows, *s.image_shape), generator=g, device=s.device)
    z1 = torch.randn((rows, *s.image_shape), generator=g, device=s.device)
    alphas = torch.linspace(0, 1, frames, device=s.device)
    # D5: x_T(alpha) = slerp(z0, z1, alpha) for every (row, alpha) pair
    z = slerp(z0.repeat_interleave(frames, 0), z1.repeat_interleave(frames, 0), alphas.repeat(rows))
    y = s.labels(rows, g)
    return z, (None if y is None else y.repeat_interleave(frames))


def invert(s, x0, label, show_progress):
    """DDIM §4.3: x_0 -> x_T by the reversed eta = 0 update, then x_T -> x_0 again. Returns [original, recon]."""
    x0 = x0.to(s.device)
    y = None
    if s.conditional:
        y = torch.full((1,), label, dtype=torch.long, device=s.device)
    say(f"inverting x_0 -> x_T on {s.steps} DDIM steps (D5: eq. 12 reversed, 2 fixed-point refinements per step)")
    with s.amp:
        x_T = ddim_invert(s.diffusion, s.model, x0, {} if y is None else {"y": y}, refine=2,
                          progress=show_progress).float()
    if not torch.isfinite(x_T).all():
        raise UsageError("--checkpoint: the inversion produced non-finite latents; try more --steps")
    recon, _ = s.generate(1, latents=x_T, labels=y, show_progress=show_progress, desc="decoding")
    original = data.to_uint8_images(x0)
    mse = ((data.to_float(torch.from_numpy(recon)) - data.to_float(torch.from_numpy(original))) ** 2).mean().item()
    # PSNR over the [-1, 1] range (peak-to-peak 2), of the 8-bit images written
    psnr = 10 * math.log10(4 / max(mse, 1e-12))
    say(f"inversion: latent std {x_T.std().item():.3f} (N(0, I) has 1), reconstruction MSE {mse:.5f}, "
        f"PSNR {psnr:.2f} dB")
    return torch.cat([torch.from_numpy(original), torch.from_numpy(recon)]).numpy()


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    show = not args.no_progress
    settings = sampling.settings_from_args(args)

    # what to sample from, checked and built before any work (checkpoint.py: every problem is one line)
    ckpt = checkpoint.load(args.checkpoint or default_checkpoint())
    clf = checkpoint.load(args.classifier, flag="--classifier") if args.classifier else None
    s = sampling.from_checkpoint(ckpt, settings, device, args.precision, clf)
    size, channels = s.image_shape[1], s.image_shape[0]

    # where the outputs go, checked before the work
    if args.invert:
        x0, label, source = read_image(args.invert, size, channels, args.data_dir)
        if s.conditional and label is None and settings.label is None:
            raise UsageError("--class: this run is class-conditional; say which class the picture shows")
        label = settings.label if settings.label is not None else label
        name = s.name(prefix=f"invert_{source}")
    elif args.interpolate:
        rows, frames = interpolation_grid(args.n)
        name = s.name(args.seed, rows * frames, prefix="interpolate")
    else:
        name = s.name(args.seed, args.n, batch_size=args.batch_size)
    out = args.out or os.path.join(samples_dir(ckpt), name)
    out = out[:-4] if out.endswith((".png", ".npz")) else out
    sampling.check_outputs(out, args.force)

    params = sum(p.numel() for p in s.model.parameters())
    say(f"checkpoint {ckpt['path']}: step {ckpt.get('step', '?')}, {params / 1e6:.1f}M parameters, "
        f"{'EMA' if settings.ema else 'raw'} weights; {device.type}, {precision_name(device, args.precision)}")

    if args.invert:
        say(f"inverting {args.invert}" + (f" ({data.CIFAR10_CLASSES[label]})" if source.startswith("cifar10") else ""))
        images, nrow = invert(s, x0, label, show), 2
        labels = None
    elif args.interpolate:
        z, y = interpolation_latents(s, rows, frames, args.seed)
        nrow = frames
        say(f"decoding {z.shape[0]} interpolated latents: {s.describe()}")
        images, labels = s.generate(z.shape[0], args.batch_size, args.seed, show, latents=z, labels=y)
    else:
        say(f"sampling {args.n} images: {s.describe()}, seed {args.seed}")
        images, labels = s.generate(args.n, args.batch_size, args.seed, show)
        nrow = None
    png, npz = sampling.save_samples(images, labels, out, nrow)
    wrote(png, f"grid of {len(images)} images")
    wrote(npz, f"x: uint8 {list(images.shape)}" + ("" if labels is None else ", y: labels"))
    if not (args.invert or args.interpolate):
        say(f"next: python evaluate.py fid --samples {npz}")


if __name__ == "__main__":
    main_guard(main)
