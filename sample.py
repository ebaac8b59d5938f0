"""
Draw samples from a trained run: DDPM ancestral sampling (Algorithm 2), DDIM (any eta, skipped steps), annealed
Langevin and predictor-corrector (the score view), the DPM-Solver++(2M) and Heun ODE solvers, with classifier or
classifier-free guidance; DDIM's latent interpolation and inversion; SDEdit image editing and classifier-guided
translation. The line that draws is the first function below (`sample_images`): the chosen sampler's loop on the
run's diffusion respaced to --steps. The menu of samplers is menu.py, the sampler built from a checkpoint
sampling.py; this file is the command line around them.

    python sample.py --sampler ddim --steps 50          # newest run, EMA weights: a grid PNG + an .npz of uint8 images
    python sample.py --sampler ddpm --steps 100 --var small          # respaced ancestral sampling (Algorithm 2)
    python sample.py --sampler heun --steps 18          # EDM's Heun on Karras rho = 7 steps: 2 * 18 - 1 = 35 NFE
    python sample.py --interpolate                      # slerp between latents, decoded by DDIM (DDIM §5.3)
    python sample.py --invert cifar10:7                 # DDIM inversion x_0 -> x_T and back (DDIM §4.3), test image 7
    python sample.py --classifier runs/cifar10-classifier --classifier-scale 4 --class 3   # classifier guidance
    python sample.py --checkpoint runs/cifar10-cond --cfg-scale 3 --class 3               # classifier-free guidance
    python sample.py --edit cifar10:7 --strength 0.5    # SDEdit: noise to t0 = 0.5 T, denoise: 8 variations
    python sample.py --edit stroke.png --mask keep.png --strength 0.6      # repaint only the black part of the mask
    python sample.py --checkpoint runs/cifar10-ddgan --sampler ddgan    # DDGAN's 4-step chain (train.py --task ddgan)

Each command writes NAME.png (a grid) and NAME.npz (`x`: uint8 [N, H, W, 3], `y`: the labels of a conditional run)
into <run>/samples/, NAME saying what made them (ddim50_eta1_quad_cg4_class3_seed0); never over an existing file
without --force, whole or not at all (outputs.py). Under torchrun the ranks share the batches and rank 0 writes: the
same images as one process. Editing, the output names and many GPUs in detail: docs/sample.md.
"""

import dataclasses
import math
import os

import numpy as np
import torch

import checkpoint
import data
import outputs
import sampling
from cli import (MAX_BATCH, MAX_IMAGES, Parser, UsageError, check_compiler, check_names, check_number, check_seed,
                 distributed, main_guard, precision_name, say)
from ddim import ddim_invert, slerp
from edit import REVERSE_CHAINS, sdedit, sdedit_steps
from pictures import read_image, read_mask

FRAMES = 8  # --interpolate: images per row, alpha = 0, 1/7, ..., 1 (DDIM Figure 6); --edit: variations per row
N_SAMPLES, N_EDITS = 64, 8  # --n when not given: images to sample; variations of an --edit
FEW_STEPS = 1000  # fewer training steps than this: sample.py warns that the images will be noise
STRENGTH = 0.5  # --edit's default t0 / T, inside SDEdit's useful range 0.3-0.6 (SDEdit §4, Figure 3)


def sample_images(s, args, dataset=None):
    """--n images from x_T ~ N(0, I), batch by batch, by the chosen sampler `s` (sampling.Sampler: the loop, the
    respaced diffusion, the network and the loop's options, all checked against the checkpoint). `dataset`: what
    the run trained on, for the next command (FID for colour images, the digit classifier for digits)."""
    say(f"sampling {args.n} images: {s.describe()}, seed {args.seed}")
    batches = s.batches(args.n, args.batch_size, args.seed, not args.no_progress)
    for b in batches:
        with s.amp:
            # the chosen sampler (menu.SAMPLERS, e.g. ddim.ddim_sample_loop: DDIM eq. 12) from x_T down every
            # step of the run's diffusion respaced to --steps by --skip (D4)
            b.x0 = s.loop(s.diffusion, batches.model, b.x_T.shape, noise=b.x_T, model_kwargs=b.model_kwargs,
                          generator=b.generator, **s.options)
    images, labels = batches.images()
    # next: the digit classifier for digits, FID (Inception wants colour) for colour images, else the grid itself
    score = ("python benchmarks/digits_score.py {npz}" if dataset == "digits" else
             "python evaluate.py fid --samples {npz}" if images.shape[-1] == 3 else "look at {png}")
    return outputs.Samples(images, labels, png_what=f"grid of {len(images)} images",
                           npz_what=f"x: uint8 {list(images.shape)}" + ("" if labels is None else ", y: labels"),
                           next=score)


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    p = Parser(description="Sample from a trained diffusion run (DDPM, DDIM, Langevin, predictor-corrector, "
                           "DPM-Solver++(2M), Heun; classifier and classifier-free guidance; DDIM interpolation and "
                           "inversion; SDEdit editing and classifier-guided translation).")
    p.add_argument("--checkpoint", default=None, help="a ckpt.pt, a run folder or a diffusers model folder "
                   "(default: runs/cifar10, else the newest diffusion run under runs/)")
    sampling.add_arguments(p)
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help=f"number of images (default: {N_SAMPLES}; --interpolate: whole rows of 8; --edit: {N_EDITS} "
                   "variations, from the seed's generators); under torchrun write --num-samples, as torchrun reads "
                   "--n as an abbreviation of its own flags")
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
                        "IMAGE is a picture file, cifar10:N (the N-th CIFAR-10 test image) or digits:N (the N-th "
                        "held-out handwritten digit)")
    p.add_argument("--data-dir", default=None, help="--invert / --edit cifar10:N: the CIFAR-10 folder "
                   "(default: data/cifar10, then ../shared/data/cifar10)")
    p.add_argument("--edit", default=None, metavar="IMAGE",
                   help="SDEdit (Meng et al. 2022): noise IMAGE to t0 = strength * T (DDPM eq. 4) and run the reverse "
                        "chain from there; IMAGE is a picture file, cifar10:N or digits:N")
    p.add_argument("--strength", type=float, default=None,
                   help=f"--edit: t0 / T in [0, 1]; 0 returns the input, 1 is ordinary sampling (default: {STRENGTH})")
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="--edit: a picture the size of IMAGE; white keeps the input, black is repainted, gray blends "
                        "(RePaint eq. 10) (default: none, the whole image is edited)")
    p.add_argument("--edit-sampler", default=None, choices=REVERSE_CHAINS,
                   help="--edit: the reverse chain from t0, ddpm (ancestral, DDPM Algorithm 2, SDEdit's stochastic "
                        "one) or ddim (eq. 12 with --eta) (default: ddpm, on all T steps unless --steps)")
    return p


def check_args(args):
    """What can be checked before loading anything."""
    check_names([("--checkpoint", args.checkpoint), ("--classifier", args.classifier), ("--invert", args.invert),
                 ("--edit", args.edit), ("--mask", args.mask), ("--data-dir", args.data_dir), ("--out", args.out)])
    # an empty one (an unset shell variable) is refused, never silently dropped
    if args.n is None:
        args.n = N_EDITS if args.edit else N_SAMPLES
    check_number("--n", args.n, lo=1, hi=MAX_IMAGES, integer=True, fix="draw more in several runs with other --seed")
    check_number("--batch-size", args.batch_size, lo=1, hi=MAX_BATCH, integer=True)
    check_seed("--seed", args.seed)
    if args.compile:
        check_compiler()
    chosen = [flag for flag, on in (("--interpolate", args.interpolate), ("--invert", args.invert),
                                    ("--edit", args.edit)) if on]
    if len(chosen) > 1:
        raise UsageError(f"{chosen[0]}: choose one experiment; drop {' or '.join(chosen)}")
    for flag, value in (("--strength", args.strength), ("--mask", args.mask), ("--edit-sampler", args.edit_sampler)):
        if value is not None and not args.edit:
            raise UsageError(f"{flag}: only --edit takes it; add --edit IMAGE or drop {flag}")
    if args.edit:
        args.strength = STRENGTH if args.strength is None else args.strength
        args.edit_sampler = args.edit_sampler or "ddpm"
        # E1: strength = t0 / T, a fraction of the chain
        check_number("--strength", args.strength, lo=0, hi=1)
        if args.sampler != sampling.Settings().sampler:
            raise UsageError("--sampler: --edit runs SDEdit's chain, chosen with --edit-sampler ddpm|ddim; "
                             "drop --sampler")
        if args.classifier and args.label is None:
            raise UsageError("--class: --edit with --classifier translates the image to a class; say which with "
                             "--class K")
    if (args.interpolate or args.invert) and args.sampler != "ddim":
        raise UsageError("--sampler: --interpolate and --invert are DDIM experiments (DDIM §4.3, §5.3); "
                         "use --sampler ddim")
    if args.interpolate and args.n < 2:
        raise UsageError("--n: --interpolate needs at least 2 images (its two end points)")
    if args.invert and (args.eta != 0 or args.classifier or args.cfg_scale is not None):
        raise UsageError("--invert: inversion runs the unguided eta = 0 ODE (DDIM §4.3); drop --eta, --classifier "
                         "and --cfg-scale")


# ----------------------------------------------------------------------------------------------------------------
# The experiments of the DDIM and SDEdit papers
# ----------------------------------------------------------------------------------------------------------------

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


def edit(s, x_in, mask, label, strength, n, batch_size, seed, show_progress):
    """SDEdit (E1), masked (E2) and/or classifier-guided: n variations of x_in [1, C, H, W] as uint8 [n, H, W, C].

    The same batches as plain sampling (batches.Batches): batch i draws x_{t0} and every step's noise from the
    generator (seed, i), and under torchrun the ranks share the batches.
    """
    o = s.settings
    x_in = x_in.to(s.device)
    mask = None if mask is None else mask.to(s.device)
    labels = None if label is None else torch.full((n,), label, dtype=torch.long)
    batches = s.batches(n, batch_size, seed, show_progress, labels=labels, desc="editing", draw_x_T=False)
    for b in batches:
        with s.amp:
            # SDEdit Alg. 1: x_{t0} ~ q(x_{t0} | x_in) (DDPM eq. 4), then the reverse chain from t0 (A2 / D2), the
            # known region pasted back at every level (RePaint eq. 10), guided by cond_fn when translating (G1 / G2)
            b.x0 = sdedit(s.diffusion, batches.model, x_in.expand(b.size, *x_in.shape[1:]), strength,
                          sampler=o.sampler, eta=o.eta, mask=mask, cond_fn=s.cond_fn, model_kwargs=b.model_kwargs,
                          clip_denoised=o.clip, generator=b.generator)
    return batches.images()[0]


def edit_grid(original, mask, edits, channels):
    """Rows of input | mask | up to FRAMES variations (uint8 [M, H, W, C]); a short last row is padded with black."""
    head = [original[0]] + ([] if mask is None else [np.repeat(mask[0], channels, axis=-1)])
    per_row = min(FRAMES, len(edits))
    tiles = []
    for r in range(0, len(edits), per_row):
        row = list(edits[r:r + per_row])
        tiles += head + row + [np.zeros_like(original[0])] * (per_row - len(row))
    return np.stack(tiles), len(head) + per_row


def invert(s, x0, label, show_progress):
    """DDIM §4.3: x_0 -> x_T by the reversed eta = 0 update, then x_T -> x_0 again: [original, reconstruction]."""
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
    images = np.concatenate([original, recon])
    return outputs.Samples(images, nrow=2, png_what="grid of 2 images", npz_what=f"x: uint8 {list(images.shape)}",
                           next="open {png}: the picture, then its reconstruction from the inverted x_T")


def interpolate(s, args, rows, frames):
    """DDIM §5.3: rows of images decoded from slerp(z0, z1, alpha), alpha = 0 .. 1."""
    z, y = interpolation_latents(s, rows, frames, args.seed)
    say(f"decoding {z.shape[0]} interpolated latents: {s.describe()}")
    images, labels = s.generate(z.shape[0], args.batch_size, args.seed, not args.no_progress, latents=z, labels=y)
    return outputs.Samples(images, labels, nrow=frames, png_what=f"grid of {len(images)} images",
                           npz_what=f"x: uint8 {list(images.shape)}" + ("" if labels is None else ", y: labels"),
                           next="open {png}: each row walks from one latent to another")


def edit_output(s, args, x_in, mask, label):
    """--edit: the banner (the steps SDEdit actually runs, from t0), the edits, and their grid beside the input."""
    # E1: t0 = round(strength * the chain's steps)
    t0 = sdedit_steps(s.diffusion, args.strength)
    say(f"editing {args.edit}: SDEdit from t0 = {t0} (--strength {args.strength:g}), {s.describe(steps=t0)}, "
        f"{args.n} variation{'s' if args.n > 1 else ''}, seed {args.seed}")
    if t0 == 0:
        say(f"note: --strength {args.strength:g}: t0 = 0, so every output is the input itself, unchanged "
            "(SDEdit's faithful end; no network call)")
    elif t0 == s.kept:
        say(f"note: --strength {args.strength:g}: t0 = T, so the input is ignored: ordinary sampling from "
            "x_T ~ N(0, I) (SDEdit's realistic end)")
    edits = edit(s, x_in, mask, label, args.strength, args.n, args.batch_size, args.seed, not args.no_progress)
    original = data.to_uint8_images(x_in)
    mask_u8 = None if mask is None else (mask * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid, nrow = edit_grid(original, mask_u8, edits, s.image_shape[0])
    extra = {"input": original} if mask is None else {"input": original, "mask": mask_u8}
    labels = None if label is None else np.full(len(edits), label, dtype=np.int64)
    npz_what = (f"x: uint8 {list(edits.shape)} edits, input" + ("" if mask is None else ", mask (255 = keep)")
                + ("" if labels is None else ", y: labels"))
    return outputs.Samples(edits, labels, nrow, grid, extra, npz_what=npz_what,
                           png_what=f"rows of input | {'mask | ' if mask is not None else ''}edits, {len(edits)} edits",
                           next="open {png}: each row is the input, then its edits")


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------

def plan(args, s, dataset=None):
    """The chosen experiment, its inputs read and checked before any work: (output name, the experiment to run).
    `dataset`: what the run trained on (its config), None when unknown."""
    size, channels = s.image_shape[1], s.image_shape[0]
    settings, show = s.settings, not args.no_progress
    if args.invert:
        x0, label, source, _ = read_image(args.invert, size, channels, args.data_dir)
        label = settings.label if settings.label is not None else label
        if s.conditional and (label is None or label >= s.classes):
            raise UsageError(f"--class: this run is class-conditional ({s.classes} classes); say which class "
                             f"{args.invert} shows with --class")
        what = f"inverting {args.invert}" + (f" ({data.CIFAR10_CLASSES[label]})" if source.startswith("cifar10-")
                                             else f" (a {label})" if source.startswith("digits-") else "")
        return s.name(prefix=f"invert_{source}"), lambda: say(what) or invert(s, x0, label, show)
    if args.edit:
        x_in, label, source, picture_size = read_image(args.edit, size, channels, args.data_dir, flag="--edit")
        mask, mask_name = read_mask(args.mask, picture_size, size, args.edit) if args.mask else (None, None)
        if s.conditional and label is None and settings.label is None:
            raise UsageError("--class: this run is class-conditional; say which class the picture shows (or, with "
                             "--classifier, which class to translate it to)")
        label = (settings.label if settings.label is not None else label) if s.conditional else None
        prefix = f"edit_{source}_s{args.strength:g}" + (f"_mask-{mask_name}" if mask is not None else "")
        name = s.name(args.seed, args.n, default_n=N_EDITS, batch_size=args.batch_size, prefix=prefix)
        return name, lambda: edit_output(s, args, x_in, mask, label)
    if args.interpolate:
        rows, frames = interpolation_grid(args.n)
        return s.name(args.seed, rows * frames, prefix="interpolate"), lambda: interpolate(s, args, rows, frames)
    return s.name(args.seed, args.n, batch_size=args.batch_size), lambda: sample_images(s, args, dataset)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    # under torchrun each rank draws batches i = rank, rank + W, ... (batches.py) and rank 0 writes
    rank, world, device = distributed(args.device)
    settings = sampling.settings_from_args(args)
    if args.edit:
        # --edit's chain: SDEdit with DDPM's ancestral step or DDIM's, respaced to --steps like any sampler (D4)
        settings = dataclasses.replace(settings, sampler=args.edit_sampler)

    # what to sample from, checked and built before any work (checkpoint.py: every problem is one line)
    kind = "ddgan" if settings.sampler == "ddgan" else "diffusion"
    ckpt = checkpoint.load(args.checkpoint or checkpoint.newest_run(kind))
    mode = "--interpolate" if args.interpolate else "--invert" if args.invert else "--edit" if args.edit else None
    if mode and ckpt["kind"] == "ddgan":
        # from_checkpoint would advise --sampler ddgan, which these experiments refuse: name the real conflict
        raise UsageError(f"{mode}: needs an eps-model (DDIM's or SDEdit's chain) and {ckpt['path']} holds a "
                         "DDGAN generator, which only draws with --sampler ddgan; pass a diffusion run as --checkpoint")
    clf = checkpoint.load(args.classifier, flag="--classifier") if args.classifier else None
    s = sampling.from_checkpoint(ckpt, settings, device, args.precision, clf, compile=args.compile)
    name, experiment = plan(args, s, (ckpt.get("config") or {}).get("dataset"))
    # where the outputs go, checked before the work
    out = args.out or os.path.join(checkpoint.samples_dir(ckpt["path"]), name)
    out = out[:-4] if out.endswith((".png", ".npz")) else out
    # claimed now, before the work: a second sample.py writing the same name is refused here, not silently replaced at
    # the end; rank 0 alone claims (it alone writes), every rank checks
    outputs.check_outputs(out, args.force, "--out", typed=args.out is not None, hold=rank == 0)

    params = sum(p.numel() for p in s.model.parameters())
    say(f"checkpoint {ckpt['path']}: {checkpoint.describe_step(ckpt)}, {params / 1e6:.1f}M parameters, "
        f"{'EMA' if settings.ema else 'raw'} weights; {device.type}, {precision_name(device, args.precision)}")
    if isinstance(ckpt.get("step"), int) and ckpt["step"] < FEW_STEPS:
        say(f"note: {ckpt['path']} has trained {ckpt['step']} steps only: expect noise, not pictures (a model needs "
            "thousands of steps)")
    result = experiment()
    if rank != 0:  # every rank holds the gathered images; rank 0 alone writes them
        return
    outputs.write_samples(result, out, force=args.force)


if __name__ == "__main__":
    main_guard(main)
