"""
The papers' figures, one command each, from any run of this repository or from the official DDPM weights.

    python figures.py ddpm-x0          --checkpoint RUN   # DDPM Fig. 6: the predicted x_0 along the reverse chain
    python figures.py ddpm-shared      --checkpoint RUN   # DDPM Fig. 7: samples p(x_0 | x_t) sharing one x_t
    python figures.py ddim-consistency --checkpoint RUN   # DDIM Fig. 5: one x_T decoded with 10 ... 1000 steps
    python figures.py ddim-interp      --checkpoint RUN   # DDIM Fig. 6: slerp between two latents x_T
    python figures.py guidance         --checkpoint RUN --classifier CLS --class 3   # ADM Fig. 3: scales 0, 1, 4, 10

RUN is a run folder or ckpt.pt of train.py, a diffusers UNet2DModel folder (the official DDPM weights, e.g.
google/ddpm-cifar10-32 downloaded once) or hf:google/ddpm-cifar10-32 with a network. Each command writes one PNG
(into --out, default <run>/figures/ or runs/figures/), never over an existing one without --force, and prints
what the picture shows. DDIM's Table 1 (FID over steps x eta) is a measurement, not a picture: it is
`python benchmarks/fid_table.py`.

What each figure is, in the papers' words and in this repository's functions:

  DDPM Fig. 6, "progressive generation": during Algorithm 2, each step's model output gives a prediction of x_0,
      x0^ = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)         [DDPM eq. 4 solved for x_0; R2]
      (GaussianDiffusion.p_mean_variance's "pred_x0"). Large-scale features appear first, details last.
  DDPM Fig. 7, "samples sharing a latent": run one chain down to x_t, then finish it several times with fresh
      noise: draws from p_theta(x_0 | x_t). For large t they share only coarse attributes, for small t nearly all.
  DDIM Fig. 5, "consistency": with eta = 0 the sampler is a deterministic map x_T -> x_0 (DDIM eq. 12 with sigma = 0,
      §4.3), and it changes little with the number of steps: the same x_T gives nearly the same image for
      10, 20, 50, 100 and 1000 steps.
  DDIM Fig. 6, "interpolation": decode slerp(x_T^(0), x_T^(1); alpha) (ddim.slerp, §5.3): the images change smoothly.
  ADM Fig. 3, "classifier scale": classifier guidance (ADM Algorithm 1/2, G1-G3) toward one class at scales
      0, 1, 4, 10 from the same noise; higher scales trade diversity for fidelity to the class. A class-conditional
      run without --classifier shows classifier-free guidance (G5) at the same scales instead. The line printed
      gives the fraction of each column the classifier (or, failing one, nobody) assigns to the class.
"""

import os
import shlex
import sys

import torch

import checkpoint
import cli
import outputs
from ddim import ddim_sample_loop, slerp
from ddpm import randn
from guidance import ClassifierFreeGuidance, classifier_cond_fn

FIGURES = ("ddpm-x0", "ddpm-shared", "ddim-consistency", "ddim-interp", "guidance")


def build_parser():
    p = cli.Parser(description="Redraw the DDPM / DDIM / ADM papers' figures from a run or the official weights.")
    p.add_argument("figure", choices=FIGURES, help="which figure (see the module docstring)")
    p.add_argument("--checkpoint", default=None, help="run folder, ckpt.pt, diffusers UNet2DModel folder or "
                   "hf:NAME (default: runs/cifar10)")
    p.add_argument("--out", default=None, help="folder for the PNG (default: <run>/figures, or runs/figures for a "
                   "diffusers model)")
    p.add_argument("--n", type=int, default=None, help="rows: chains (ddpm-x0, ddim-consistency, ddim-interp) or "
                   "images per scale (guidance) (default: 4, 4, 4, 8)")
    p.add_argument("--steps", type=int, default=None, help="ddpm-x0 / ddpm-shared: respace Algorithm 2 to this many "
                   "steps (default: all T, as in the paper; 100 is 10x faster on a CPU); ddim-interp, guidance: "
                   "DDIM steps (default 50)")
    p.add_argument("--columns", default=None, help="ddpm-x0 / ddpm-shared: the paper t's to show, comma separated "
                   "(default: 8 evenly spaced); ddim-consistency: step counts (default 10,20,50,100,1000)")
    p.add_argument("--classifier", default=None, help="guidance: noisy classifier run (train.py --task classifier)")
    p.add_argument("--class", dest="label", type=int, default=0, help="guidance: the class to steer toward")
    p.add_argument("--scales", default="0,1,4,10", help="guidance: classifier scales s (or CFG weights w)")
    p.add_argument("--seed", type=int, default=0, help="the noise: the same seed draws the same figure")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA, fp32 "
                   "on a CPU")
    p.add_argument("--force", action="store_true", help="replace an existing PNG of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------------------------------------------
# The figures: each returns (rows of image tensors, row labels, column labels, title, what it shows)
# ----------------------------------------------------------------------------------------------------------------

def paper_ts(text, T, count=8):
    """The paper's t's (1..T) for the columns: given, or `count` evenly spaced from T down to 1."""
    if text is not None:
        ts = cli.parse_list(text, "--columns", int)  # never empty, no t twice
    else:
        ts = sorted({round(T - i * (T - 1) / (count - 1)) for i in range(count)}, reverse=True)
    if not ts or len(ts) > 64 or any(not 1 <= t <= T for t in ts):
        raise cli.UsageError(f"--columns: up to 64 paper timesteps in 1..{T}, got {text!r}")
    return sorted(set(ts), reverse=True)


def nearest_step(spaced, paper_t):
    """The code index of the kept step whose original (paper) t is nearest to `paper_t` (code t = paper t - 1)."""
    return int((spaced.timestep_map - (paper_t - 1)).abs().argmin())


@torch.no_grad()
def ddpm_x0(model, diffusion, shape, args, bar):
    """DDPM Fig. 6: x0^ at the chosen t's along one Algorithm 2 chain per row."""
    spaced = diffusion.respace(args.steps) if args.steps else diffusion
    ts = paper_ts(args.columns, diffusion.num_timesteps)
    show = {nearest_step(spaced, t): t for t in ts}
    g = torch.Generator(args.device).manual_seed(args.seed)
    x = randn(shape, g, args.device)
    columns = {}
    for i in range(spaced.num_timesteps - 1, -1, -1):
        t = torch.full((shape[0],), i, device=args.device, dtype=torch.long)
        # Algorithm 2, one step; "pred_x0" is x0^ of DDPM eq. 4 solved for x_0 (R2)
        out = spaced.p_sample(model, x, t, generator=g)
        x = out["sample"]
        if i in show:
            columns[show[i]] = out["pred_x0"]
        bar.update(1)
    labels = [f"t={t}" for t in columns]
    rows = [[columns[t][r] for t in columns] for r in range(shape[0])]
    return rows, None, labels, "DDPM Fig. 6: predicted x_0 along the reverse chain (Algorithm 2)", \
        f"x0^ at paper t = {', '.join(map(str, columns))} along {shape[0]} chains of {spaced.num_timesteps} steps"


@torch.no_grad()
def ddpm_shared(model, diffusion, shape, args, bar, samples=6):
    """DDPM Fig. 7: one chain stopped at several x_t, each finished `samples` times with fresh noise."""
    spaced = diffusion.respace(args.steps) if args.steps else diffusion
    T = diffusion.num_timesteps
    ts = paper_ts(args.columns, T, count=4) if args.columns else [T, (3 * T) // 4, T // 2, T // 4]
    stops = {nearest_step(spaced, t): t for t in ts}
    g = torch.Generator(args.device).manual_seed(args.seed)
    x = randn((1, *shape[1:]), g, args.device)
    rows, labels = [], []
    for i in range(spaced.num_timesteps - 1, -1, -1):
        if i in stops:
            # p_theta(x_0 | x_t): finish the chain from this x_t `samples` times (Algorithm 2 with fresh noise)
            branch = x.expand(samples, *x.shape[1:]).clone()
            for j in range(i, -1, -1):
                t = torch.full((samples,), j, device=args.device, dtype=torch.long)
                branch = spaced.p_sample(model, branch, t, generator=g)["sample"]
            rows.append([x[0].clamp(-1, 1)] + list(branch))
            labels.append(f"t={stops[i]}")
        t = torch.full((1,), i, device=args.device, dtype=torch.long)
        x = spaced.p_sample(model, x, t, generator=g)["sample"]
        bar.update(1)
    columns = ["x_t"] + [f"x_0 #{k + 1}" for k in range(samples)]
    return rows, labels, columns, "DDPM Fig. 7: samples from p(x_0 | x_t) sharing one x_t", \
        f"one chain stopped at paper {', '.join(labels)}, each x_t (left) finished {samples} times"


@torch.no_grad()
def ddim_consistency(model, diffusion, shape, args, bar):
    """DDIM Fig. 5: the same x_T through eta = 0 DDIM with 10, 20, 50, 100 and 1000 steps."""
    counts = cli.parse_ints(args.columns or "10,20,50,100,1000", "--columns")
    x_T = randn(shape, torch.Generator(args.device).manual_seed(args.seed), args.device)
    columns = []
    for s in counts:
        # DDIM eq. 12 with sigma = 0 (eta = 0) on s of the T steps (D4): a deterministic map x_T -> x_0
        columns.append(ddim_sample_loop(diffusion.respace(s), model, shape, eta=0.0, noise=x_T))
        bar.update(1)
    rows = [[c[r] for c in columns] for r in range(shape[0])]
    return rows, None, [f"{s} steps" for s in counts], "DDIM Fig. 5: one x_T, different numbers of steps (eta = 0)", \
        f"{shape[0]} latents x_T decoded by DDIM (eta = 0) with {', '.join(map(str, counts))} steps"


@torch.no_grad()
def ddim_interp(model, diffusion, shape, args, bar, frames=9, steps=50):
    """DDIM Fig. 6: decode slerp(z0, z1; alpha) for alpha = 0 .. 1, one pair of latents per row."""
    g = torch.Generator(args.device).manual_seed(args.seed)
    z0, z1 = randn(shape, g, args.device), randn(shape, g, args.device)
    spaced = diffusion.respace(min(args.steps or steps, diffusion.num_timesteps))
    alphas = [k / (frames - 1) for k in range(frames)]
    columns = []
    for a in alphas:
        # D5 (DDIM §5.3): interpolate on the sphere, then decode deterministically (eta = 0)
        columns.append(ddim_sample_loop(spaced, model, shape, eta=0.0, noise=slerp(z0, z1, a)))
        bar.update(1)
    rows = [[c[r] for c in columns] for r in range(shape[0])]
    return rows, None, [f"alpha={a:.2g}" for a in alphas], "DDIM Fig. 6: slerp between two latents x_T", \
        f"{shape[0]} pairs of latents, {frames} slerp points each, decoded by DDIM-{spaced.num_timesteps} (eta = 0)"


@torch.no_grad()
def guidance_grid(model, diffusion, shape, args, bar, classifier=None, num_classes=None):
    """ADM Fig. 3: the same noise guided toward one class at several scales (classifier or classifier-free)."""
    scales = [float(s) for s in args.scales.split(",")]
    spaced = diffusion.respace(min(args.steps or 50, diffusion.num_timesteps))
    g = torch.Generator(args.device).manual_seed(args.seed)
    x_T = randn(shape, g, args.device)
    y = torch.full((shape[0],), args.label, device=args.device, dtype=torch.long)
    columns, fractions = [], []
    for s in scales:
        if classifier is not None:
            # G1-G3: eps^ = eps - sqrt(1 - abar_t) s grad log p_phi(y | x_t) inside every DDIM step (ADM Algorithm 2)
            cond_fn, net = classifier_cond_fn(classifier, s), (lambda x, t, y=None, _m=model: _m(x, t))
        else:
            # G5: eps~ = (1 + w) eps(x_t, t, y) - w eps(x_t, t, null)
            cond_fn, net = None, ClassifierFreeGuidance(model, s, null_class=num_classes)
        x0 = ddim_sample_loop(spaced, net, shape, eta=0.0, noise=x_T, cond_fn=cond_fn, model_kwargs={"y": y})
        columns.append(x0)
        if classifier is not None:
            t0 = torch.zeros(shape[0], device=args.device, dtype=torch.long)
            fractions.append((classifier(x0.clamp(-1, 1), t0).argmax(-1) == args.label).float().mean().item())
        bar.update(1)
    kind = "classifier scale s" if classifier is not None else "CFG weight w"
    rows = [[c[r] for c in columns] for r in range(shape[0])]
    said = (", classifier assigns " + ", ".join(f"s={s:g}: {f:.0%}" for s, f in zip(scales, fractions))
            if fractions else "")
    return rows, None, [f"{'s' if classifier is not None else 'w'}={s:g}" for s in scales], \
        f"ADM Fig. 3: guidance toward class {args.label}", \
        f"{shape[0]} samples per {kind} in {', '.join(f'{s:g}' for s in scales)} from the same noise, DDIM-" \
        f"{spaced.num_timesteps}{said}"


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------

def draw(rows, row_labels, col_labels, title, path, force=False):
    """A labelled grid of images (rows x columns) with matplotlib, written whole or not at all (outputs.write: a
    temporary, fsynced, then named; never over an existing PNG unless `force`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(rows[0])
    size = 1.1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols + 0.8, size * n_rows + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            pixels = ((img.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
            ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and col_labels:
                ax.set_title(col_labels[c], fontsize=7)
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    try:
        outputs.write({path: lambda f: fig.savefig(f, dpi=110, format="png")}, force)
    finally:
        plt.close(fig)


def load_diffusion(args):
    """The --checkpoint's diffusion model and its diffusion, --n and --steps checked first."""
    for flag, value, hi in (("--n", args.n, 10_000), ("--steps", args.steps, None)):  # --steps: <= T, below
        if value is not None:
            cli.check_number(flag, value, lo=1, hi=hi, integer=True)
    cli.check_seed("--seed", args.seed)
    ckpt = checkpoint.load(args.checkpoint or os.path.join("runs", "cifar10"))
    if ckpt["kind"] != "diffusion":
        raise cli.UsageError(f"--checkpoint: {ckpt['path']} holds a {ckpt['kind']}, not a diffusion model")
    diffusion = checkpoint.build_diffusion(ckpt["diffusion_args"])
    T = diffusion.num_timesteps
    if args.steps is not None and args.steps > T:
        raise cli.UsageError(f"--steps: must be in 1..{T} (the model's diffusion steps), got {args.steps}")
    return ckpt, diffusion


def check_figure_flags(args, T, num_classes):
    """The flags of the chosen figure (--columns, --scales), against the model's T steps and classes."""
    if args.figure.startswith("ddpm"):
        paper_ts(args.columns, T)  # checked now, used when drawing
    if args.figure == "ddim-consistency":
        if args.steps is not None:  # its step counts are its columns: a --steps would be silently ignored
            raise cli.UsageError("--steps: ddim-consistency decodes with each step count of --columns; drop --steps")
        counts = cli.parse_list("10,20,50,100,1000" if args.columns is None else args.columns, "--columns", int)
        if len(counts) > 64 or any(not 1 <= c <= T for c in counts):
            raise cli.UsageError(f"--columns: up to 64 step counts in 1..{T}, got {args.columns!r}")
    if args.figure == "guidance":
        try:
            scales = [float(s) for s in args.scales.split(",")]
        except ValueError:
            raise cli.UsageError(f"--scales: expected comma-separated numbers like 0,1,4,10, got {args.scales!r}")
        if len(scales) > 16:  # one column each
            raise cli.UsageError(f"--scales: at most 16 scales, got {len(scales)}")
        for s in scales:
            cli.check_number("--scales", s, lo=0, hi=1e6)  # beyond: the guided eps overflows
        if args.classifier is None and num_classes is None:
            raise cli.UsageError("--classifier: an unconditional model needs a noisy classifier for guidance "
                                 "(train.py --task classifier), or use a class-conditional run (--class-cond)")


def claim_output(args, ckpt):
    """The PNG's path, claimed now (outputs.claim): an existing one is refused without --force, and one that another
    figures.py is drawing right now is refused even with it; --out is named only when it was typed."""
    folder = args.out or (os.path.join(os.path.dirname(ckpt["path"]), "figures") if os.path.isfile(ckpt["path"])
                          else os.path.join("runs", "figures"))
    cli.check_writable_dir(folder, "--out")
    path = os.path.join(folder, f"{args.figure}_seed{args.seed}.png")
    outputs.claim([path], "--out", args.force, typed=args.out is not None)
    return path


def load_classifier(args, ckpt, device):
    """guidance with --classifier: the noisy classifier, checked against the diffusion run, and the classes to guide
    towards (the classifier's, else the run's own); (None, the run's classes) otherwise."""
    classifier, num_classes = None, checkpoint.num_classes_of(ckpt)
    if args.figure == "guidance" and args.classifier is not None:
        cls_ckpt = checkpoint.load(args.classifier, "--classifier")
        if cls_ckpt["kind"] != "classifier":
            raise cli.UsageError(f"--classifier: {cls_ckpt['path']} holds a {cls_ckpt['kind']}, not a classifier")
        # a classifier of other images (another size, other classes) steers toward nothing: refused, as sample.py
        # refuses it (sampling.from_checkpoint)
        size, cls_size = ckpt["model_args"]["image_size"], cls_ckpt["model_args"]["image_size"]
        classes = checkpoint.num_classes_of(cls_ckpt)
        if cls_size != size or num_classes not in (None, classes):
            raise cli.UsageError(f"--classifier: {cls_ckpt['path']} was trained on {classes} classes of "
                                 f"{cls_size}x{cls_size} images, the diffusion run on {num_classes or 'unlabelled'} "
                                 f"{size}x{size} images")
        classifier = checkpoint.build_network(cls_ckpt, device=device, flag="--classifier")
        num_classes = checkpoint.num_classes_of(cls_ckpt)
    if args.figure == "guidance" and not 0 <= args.label < num_classes:
        raise cli.UsageError(f"--class: must be in 0..{num_classes - 1}, got {args.label}")
    return classifier, num_classes


def draw_figure(args, ckpt, model, diffusion, classifier, num_classes):
    """The chosen figure's rows of images (finite, float) and its labels: (rows, row_labels, col_labels, title,
    what it shows)."""
    device, args_m = args.device, ckpt["model_args"]
    n = args.n or (8 if args.figure == "guidance" else 4)
    shape = (n, args_m.get("in_channels", 3), args_m["image_size"], args_m["image_size"])
    spaced_steps = args.steps or diffusion.num_timesteps
    work = {"ddpm-x0": spaced_steps, "ddpm-shared": spaced_steps,
            "ddim-consistency": len(cli.parse_ints(args.columns or "10,20,50,100,1000", "--columns")),
            "ddim-interp": 9, "guidance": len(args.scales.split(","))}[args.figure]
    cli.say(f"{args.figure}: {ckpt['path']} on {device} ({cli.precision_name(device, args.precision)}), "
            f"{n} rows of {shape[2]}x{shape[3]}")
    bar = cli.progress(work, args.figure, unit="step" if args.figure.startswith("ddpm") else "col",
                       disable=args.no_progress)
    fn = {"ddpm-x0": ddpm_x0, "ddpm-shared": ddpm_shared, "ddim-consistency": ddim_consistency,
          "ddim-interp": ddim_interp}.get(args.figure)
    with cli.autocast(device, args.precision):
        if fn is not None:
            rows, row_labels, col_labels, title, shows = fn(model, diffusion, shape, args, bar)
        else:
            rows, row_labels, col_labels, title, shows = guidance_grid(model, diffusion, shape, args, bar,
                                                                       classifier, num_classes)
    bar.close()
    rows = [[img.float() for img in row] for row in rows]
    if not all(torch.isfinite(img).all() for row in rows for img in row):
        raise cli.UsageError(f"--checkpoint: the images of {ckpt['path']} are not finite (a diverged model?); "
                             "nothing was written")
    return rows, row_labels, col_labels, title, shows


def main(argv=None):
    args = build_parser().parse_args(argv)
    # -- check everything before any work ----------------------------------------------------------------------------
    cli.check_names([("--checkpoint", args.checkpoint), ("--out", args.out), ("--classifier", args.classifier)])
    args.device = cli.resolve_device(args.device)
    ckpt, diffusion = load_diffusion(args)
    check_figure_flags(args, diffusion.num_timesteps, checkpoint.num_classes_of(ckpt))
    path = claim_output(args, ckpt)
    model = checkpoint.build_network(ckpt, device=args.device)
    classifier, num_classes = load_classifier(args, ckpt, args.device)
    # -- draw -------------------------------------------------------------------------------------------------------
    rows, row_labels, col_labels, title, shows = draw_figure(args, ckpt, model, diffusion, classifier, num_classes)
    draw(rows, row_labels, col_labels, title, path, args.force)
    cli.wrote(path, shows)
    # the next of the papers' figures drawn without a classifier, from the same checkpoint
    papers = FIGURES[:-1]
    after = papers[(papers.index(args.figure) + 1) % len(papers)] if args.figure in papers else papers[0]
    on = f" --checkpoint {shlex.quote(args.checkpoint)}" if args.checkpoint else ""
    cli.say(f"next: open {path}; then another figure: python figures.py {after}{on}")


if __name__ == "__main__":
    cli.main_guard(main, sys.argv[1:])
