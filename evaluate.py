"""
Evaluate a run: the FID of its samples (fid.py) and the bound on its likelihood in bits/dim (DDPM eq. 5).

    python evaluate.py fid --samples runs/cifar10/samples/ddim50_seed0.npz        # FID of saved samples
    python evaluate.py fid --checkpoint runs/cifar10 --sampler ddim --steps 50 --n 10000   # sample, then score
    python evaluate.py bpd --checkpoint runs/cifar10 --n 1000                     # bits/dim of test images
    torchrun --nproc_per_node=8 evaluate.py fid --checkpoint runs/cifar10 --num-samples 50000

fid: Frechet Inception Distance against the CIFAR-10 training set's statistics (--ref), with the network, the
preprocessing and the statistics pinned as the papers' (fid.py). `fid --checkpoint` draws with sample.py's samplers
and flags (sampling.py): the same flags draw the same images. Samples are scored only against statistics of images
of their own size. FID is biased high below 50,000 samples: compare only equal N.

bpd (B1): L = L_T + sum_{t>1} L_{t-1} + L_0 of DDPM eq. 5 over D ln 2, per test image, with its prior, decoder and
KL terms; T network evaluations per image.

Each result is printed as a JSON line and appended to results.jsonl beside what was scored (the run folder, or the
folder of --samples; --out to choose), whole or not at all; a non-finite result is refused, never written. Ctrl-C
or SIGTERM at any moment ends in one line and leaves no partial file. Bad input: one line naming the flag, exit 2,
before the work. The FID table of DDIM's Table 1 is benchmarks/fid_table.py.
"""

import os
import time

import torch

import checkpoint
import cli
import data
import fid
import outputs
import sampling
from cli import (Parser, StepProgress, UsageError, check_appendable, check_compiler, check_number, distributed,
                 human_time, main_guard, progress, resolve_device, say, wrote)

def load_sampler(args, device):
    """The checkpoint's network, diffusion and guidance as a sampling.Sampler (checked before any work)."""
    ckpt = checkpoint.load(args.checkpoint)
    clf = checkpoint.load(args.classifier, flag="--classifier") if args.classifier else None
    s = sampling.from_checkpoint(ckpt, sampling.settings_from_args(args), device, args.precision, clf,
                                 compile=args.compile)
    return s, ckpt


def cmd_fid(args):
    """`fid`: score generated images (a file, or freshly drawn from a checkpoint) against the reference statistics."""
    for flag, value, hi in (("--batch-size", args.batch_size, cli.MAX_BATCH), ("--n", args.n, cli.MAX_IMAGES),
                            ("--sample-batch-size", args.sample_batch_size, cli.MAX_BATCH)):
        check_number(flag, value, lo=1, hi=hi, integer=True)
    cli.check_seed("--seed", args.seed)
    if getattr(args, "compile", False):
        check_compiler()
    # under torchrun the ranks share the sampling (sampling.Sampler.generate); rank 0 alone scores and writes
    rank, _, device = distributed(args.device) if args.checkpoint is not None else (0, 1, resolve_device(args.device))
    show = not args.no_progress
    if args.samples is not None:  # a sampling flag without --checkpoint would be silently ignored: refuse it
        for action in args.sampling_flags:
            if getattr(args, action.dest) != action.default:
                raise UsageError(f"{action.option_strings[0]}: draws samples from --checkpoint; with --samples it "
                                 f"has nothing to do: drop it")
    if args.checkpoint is not None:
        s, ckpt = load_sampler(args, device)
        fid.check_sizes(s.image_shape[1:], args.ref, "the checkpoint's images")
        if args.save_samples:  # claimed now, before the work (rank 0 alone writes, every rank checks)
            outputs.check_outputs(args.save_samples, args.force, "--save-samples", hold=rank == 0)
    else:
        samples = fid.load_samples(args.samples)
        fid.check_sizes(fid.image_size(samples), args.ref, f"the images in {args.samples}")
    say(f"loading the FID Inception network (device {device.type})")
    net = fid.load_inception(args.inception, device)  # fail early on a bad --inception

    if args.checkpoint is not None:
        say(f"sampling {args.n} images from {ckpt['path']} ({checkpoint.describe_step(ckpt)}): {s.describe()}, "
            f"seed {args.seed}")
        t0 = time.time()
        samples, labels = s.generate(args.n, args.sample_batch_size, args.seed, show)
        seconds = time.time() - t0
        if rank != 0:  # every rank holds the gathered samples: rank 0 alone scores and writes them
            return None
        say(f"sampled {args.n} images in {human_time(seconds)}")
        if args.save_samples:
            for path in outputs.save_samples(samples, labels, args.save_samples, force=args.force):
                wrote(path)
        o = s.settings
        extra = {"checkpoint": args.checkpoint, "checkpoint_step": ckpt.get("step"), "sampler": o.sampler,
                 "steps": s.steps, "eta": o.eta, "skip": s.skip, "settings": s.name(), "seed": args.seed,
                 "ema": o.ema, "cfg_scale": o.cfg_scale, "classifier_scale": o.classifier_scale,
                 "sample_batch_size": args.sample_batch_size, "sample_seconds": round(seconds, 1)}
    else:
        extra = {"samples": args.samples}
    if samples.shape[0] < fid.FEATURE_DIM:
        say(f"note: {samples.shape[0]} samples < {fid.FEATURE_DIM} feature dims: the covariance is "
            "singular and FID biased high; use 50,000 samples for numbers comparable to papers")
    t0 = time.time()
    try:
        value = fid.fid_from_samples(samples, ref=args.ref, net=net, data_dir=args.data_dir,
                                 cache_dir=args.cache_dir, batch_size=args.batch_size, show_progress=show)
    except ValueError as e:  # statistics that are no covariance (a hand-made --ref)
        raise UsageError(f"--ref: {e}") from None
    say(f"fid: {value:.4f} ({samples.shape[0]} samples vs {args.ref}, {human_time(time.time() - t0)})")
    return {"metric": "fid", "value": value, **extra, "n": int(samples.shape[0]), "ref": args.ref}


def cmd_bpd(args):
    """`bpd`: the variational bound on -log p(x_0) in bits/dim of test images, with its terms (B1, L1-L3)."""
    check_number("--n", args.n, lo=1, hi=cli.MAX_IMAGES, integer=True)
    check_number("--batch-size", args.batch_size, lo=1, hi=cli.MAX_BATCH, integer=True)
    cli.check_seed("--seed", args.seed)
    device = resolve_device(args.device)
    ckpt = checkpoint.load(args.checkpoint)
    if ckpt["kind"] != "diffusion":
        raise UsageError(f"--checkpoint: {ckpt['path']} holds a {ckpt['kind']}, not a diffusion model")
    if args.var is not None and ckpt["diffusion_args"].get("var_type") == "learned_range":
        raise UsageError("--var: this run learned its variance (iDDPM eq. 15); drop --var")
    cfg = ckpt.get("config") or {}
    name, size = cfg.get("dataset", "cifar10"), ckpt["model_args"]["image_size"]
    if name == "cifar10" and size != 32:
        # a network that names no dataset (a diffusers folder) is scored on CIFAR-10, whose images are 32x32: at
        # another size (the 256x256 LSUN and CelebA-HQ models) data.py would ask for train.py's --image-size
        raise UsageError(f"--checkpoint: {ckpt['path']} makes {size}x{size} images and names no dataset; bpd has "
                         "test images only for 32x32 CIFAR-10 models and train.py runs (their --dataset)")
    if name == "synthetic" and args.data_dir is not None:  # as train.py refuses it: a --data-dir read by nothing
        raise UsageError(f"--data-dir: {ckpt['path']} was trained on --dataset synthetic, whose images are generated; "
                         "drop --data-dir")
    model = checkpoint.build_network(ckpt, use_ema=not args.no_ema, device=device)
    diffusion = checkpoint.build_diffusion(ckpt["diffusion_args"], sampling.VARIANCE_FLAGS.get(args.var))
    say(f"loading the {name} test split")
    x, _ = data.load_dataset(name, args.data_dir or cfg.get("data_dir"), size, split="test")
    # the test files are grouped by class: a stride keeps every class in a subset
    x = x[:: max(1, x.shape[0] // args.n)][: args.n]
    if x.shape[0] < args.n:
        say(f"note: the {name} test split has {x.shape[0]} images; --n {args.n} scores all of them")
    say(f"bits/dim of {x.shape[0]} test images under {ckpt['path']} ({checkpoint.describe_step(ckpt)}): "
        f"{diffusion.num_timesteps} model evaluations per image")
    g = torch.Generator(device).manual_seed(args.seed)
    bar = progress(x.shape[0], "bpd", unit="img", disable=args.no_progress)
    step_progress = StepProgress(model, diffusion, bar)
    totals, priors, decoders, kls = [], [], [], []
    t0 = time.time()
    for start in range(0, x.shape[0], args.batch_size):
        x0 = data.to_float(x[start:start + args.batch_size]).to(device)
        step_progress.start(x0.shape[0])
        # B1: L = L_T + sum_{t>1} L_{t-1} + L_0, in bits per dimension
        out = diffusion.calc_bpd_loop(step_progress, x0, clip_denoised=True, generator=g)
        step_progress.finish()
        totals.append(out["total_bpd"].cpu())
        priors.append(out["prior_bpd"].cpu())
        decoders.append(out["vb"][:, 0].cpu())
        kls.append(out["vb"][:, 1:].sum(1).cpu())
        bar.set_postfix_str(f"bpd {torch.cat(totals).mean():.4f}", refresh=False)
    bar.close()
    total = torch.cat(totals).double()
    n = total.numel()
    if not torch.isfinite(total).all():
        raise UsageError(f"--checkpoint: {int((~torch.isfinite(total)).sum())} of {n} images got a non-finite bound "
                         f"(the network's outputs are not finite: a diverged run?); nothing was written")
    return {"metric": "bpd", "value": total.mean().item(),
            "stderr": total.std().item() / n ** 0.5 if n > 1 else None,  # None, not NaN: one image has no spread
            "prior_bpd": torch.cat(priors).mean().item(), "decoder_bpd": torch.cat(decoders).mean().item(),
            "kl_terms_bpd": torch.cat(kls).mean().item(), "n": n, "checkpoint": args.checkpoint,
            "checkpoint_step": ckpt.get("step"), "var_type": diffusion.var_type, "ema": not args.no_ema,
            "seconds": round(time.time() - t0, 1)}

# -----------------------------------------------------------------------------
# command line

def build_parser():
    """fid and bpd, each flag declared once: the flags both take come from one parent parser."""
    parser = Parser(description="Evaluate a run: FID of its samples, bits/dim of test images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = Parser(add_help=False)
    common.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (under "
                        "torchrun: each rank's cuda:LOCAL_RANK)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--out", default=None, help="append the result as a JSON line here, '' to skip (default: "
                        "results.jsonl in the run folder, or beside --samples)")

    p = sub.add_parser("fid", parents=[common], help="Frechet Inception Distance of generated images",
                       description="Frechet Inception Distance (Heusel et al. 2017) of generated images against "
                                   "the CIFAR-10 training set's Inception statistics.")
    source = p.add_mutually_exclusive_group(required=True)  # what to score: exactly one source
    source.add_argument("--samples", default=None,
                        help=".npz with x (or arr_0) uint8 [N, H, W, 3], as written by sample.py")
    source.add_argument("--checkpoint", default=None, help="a run (or ckpt.pt) to sample --n images from, then score")
    g = p.add_argument_group("sampling (with --checkpoint; the flags of sample.py)")
    sampling_flags = sampling.add_arguments(g) + [
        g.add_argument("--n", "--num-samples", dest="n", type=int, default=10000,
                       help="number of samples (50,000 for paper-comparable FID; under torchrun write --num-samples, "
                            "as torchrun reads --n as an abbreviation of its own flags)"),
        g.add_argument("--sample-batch-size", type=int, default=500, help="images sampled at once"),
        g.add_argument("--seed", type=int, default=0, help="batch i is drawn from the generator seeded by (seed, i)"),
        g.add_argument("--save-samples", default=None, help="also write the samples to PATH.png and PATH.npz"),
        g.add_argument("--force", action="store_true", help="let --save-samples replace existing files")]
    fid.add_arguments(p)
    p.set_defaults(func=cmd_fid, sampling_flags=sampling_flags)

    p = sub.add_parser("bpd", parents=[common], help="negative log-likelihood bound in bits/dim on the test split",
                       description="The variational bound on -log p(x_0) (DDPM eq. 5) in bits/dim of test images, "
                                   "with its prior, decoder and KL terms.")
    p.add_argument("--checkpoint", required=True, help="a run directory or ckpt.pt")
    p.add_argument("--n", type=int, default=1000, help="test images (a class-balanced stride)")
    p.add_argument("--batch-size", type=int, default=250, help="images per batch")
    p.add_argument("--var", default=None, choices=tuple(sampling.VARIANCE_FLAGS),
                   help="fixed-variance runs: sigma_t^2 = beta_t (large) or beta~_t (small), DDPM §3.2 "
                        "(default: the run's own)")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of their EMA")
    p.add_argument("--data-dir", default=None, help="the data's folder (default: the run's, then data.py's search)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise drawn for each term")
    p.set_defaults(func=cmd_bpd)
    return parser


def results_file(args):
    """--out, else results.jsonl beside what is scored: the run folder of --checkpoint (samples/<model>/ for a
    diffusers folder, as sample.py writes its images there), or the folder of --samples."""
    if args.out is not None:
        return args.out
    if getattr(args, "samples", None):
        return os.path.join(os.path.dirname(os.path.abspath(args.samples)), "results.jsonl")
    path = checkpoint.find(args.checkpoint)
    folder = os.path.dirname(path) if os.path.isfile(path) else os.path.dirname(checkpoint.samples_dir(path))
    return os.path.join(folder or ".", "results.jsonl")


def main(argv=None):
    """Run a subcommand; its record (a dict) is printed as a JSON line and appended to results.jsonl (--out). The
    ranks other than 0 under torchrun return None."""
    args = build_parser().parse_args(argv)
    # every path typed: an empty one (an unset shell variable) is refused, never silently dropped (--out '' skips)
    cli.check_names([(f"--{name.replace('_', '-')}", getattr(args, name, None))
                     for name in ("samples", "checkpoint", "classifier", "ref", "inception", "data_dir", "cache_dir",
                                  "save_samples")])
    args.out = results_file(args)
    if args.out:
        check_appendable(args.out, "--out")  # before the work, not after it
    record = args.func(args)
    if record is None:
        return None
    fid.write_record(record, args.out)
    if record["metric"] == "fid" and record["n"] < 50000:
        say("next: 50,000 samples give FID comparable to papers (--n 50000; BENCHMARKS.md has the timings)")
    return record


if __name__ == "__main__":
    main_guard(main)
