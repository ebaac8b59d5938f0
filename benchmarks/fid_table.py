"""
DDIM's Table 1 on any run: FID over a grid of samplers (rows) and steps (columns), the paper's numbers beside ours.

    python benchmarks/fid_table.py --checkpoint runs/cifar10                     # eta 0, 0.2, 0.5, 1 and sigma-hat
    python benchmarks/fid_table.py --checkpoint runs/cifar10 --samplers ddim,dpmpp2m,heun --steps 10,20,50
    torchrun --nproc_per_node=8 benchmarks/fid_table.py --checkpoint runs/cifar10  # the same cells on 8 GPUs

DDIM Table 1 (Song, Meng, Ermon 2021, §5.1) scores ONE trained DDPM network with several samplers: rows eta = 0.0,
0.2, 0.5, 1.0 of the generalised process (D3, DDIM eq. 16), plus "sigma-hat", DDPM's ancestral sampler (A2) with
sigma_t^2 = beta_t (DDPM §3.2, R3), each respaced (D4) to S = 10, 20, 50, 100 steps; a cell is the FID of 50,000
samples. Every cell here is exactly `evaluate.py fid --checkpoint RUN --sampler ... --steps S` (the same images), is
appended to --out as it is done, and is read back when the table is run again (same checkpoint, settings, n, seed,
batch size and reference): an interrupted table resumes. The 50,000-sample table is a GPU job: each cell draws --n
images with S network calls each, then runs them through Inception (BENCHMARKS.md has the timings).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's library files

import torch  # noqa: E402

import checkpoint  # noqa: E402
import cli  # noqa: E402
import fid  # noqa: E402
import outputs  # noqa: E402
import sampling  # noqa: E402
from cli import (Parser, UsageError, check_appendable, check_compiler, check_number, distributed,  # noqa: E402
                 main_guard, progress, say, wrote)

# The paper's numbers printed beside ours: DDIM Table 1's CIFAR-10 column where the equation notes quote it; every
# other cell shows ours alone (not quoted, so not guessed).
PAPER_SOURCE = "DDIM Table 1, CIFAR-10, FID-50k of the DDPM L_simple model (Song, Meng and Ermon 2021)"
PAPER = {("ddim", 0.0): {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16},
         ("ddim", 1.0): {50: 8.01}}
TABLE1_SAMPLERS = ("ddim", "ddpm")      # the eta rows, then the sigma-hat row
TABLE1_ETAS = (0.0, 0.2, 0.5, 1.0)
TABLE1_STEPS = (10, 20, 50, 100)
# the ODE solvers' anchor: another network (a ScoreSDE CIFAR-10 model), so a reference line, not a column
SOLVER_ANCHOR = ("reference, another network: DPM-Solver (Lu et al. 2022) on a ScoreSDE CIFAR-10 model reports FID 4.70 "
                 "at 10 NFE and 2.87 at 20 NFE (Lu et al. 2022, Table 3)")
SOLVERS = ("dpmpp2m", "heun")


class CountCalls(torch.nn.Module):
    """The network, counting its calls: the number of function evaluations (NFE) a sampler spends, which is not its
    step count for a second-order method (Heun's method calls the network twice per step but the last, EDM Alg. 1)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def table_rows(args, var_type):
    """The rows as (sampler, eta, var, label): one per eta for a sampler whose loop takes eta, one otherwise.

    ddpm is DDIM's sigma-hat row: Algorithm 2 with sigma_t^2 = beta_t (--var large), on a fixed-variance run; a run that
    learned its variance (iDDPM eq. 15) keeps its own (no --var), and the row says so."""
    samplers = cli.parse_list(args.samplers, "--samplers", str)
    for name in samplers:
        if name not in sampling.SAMPLERS:
            raise UsageError(f"--samplers: unknown {name!r}; choose from {', '.join(sampling.SAMPLERS)}")
    default_layout = args.samplers == ",".join(TABLE1_SAMPLERS)
    etas = cli.parse_list(args.eta, "--eta", float) if args.eta is not None else (
        list(TABLE1_ETAS) if default_layout else [0.0])
    for eta in etas:
        check_number("--eta", eta, lo=0)  # the upper end depends on the respaced steps: checked per cell
    # pc takes eta only with its ddim predictor (menu.py): it gets one row, like the samplers without eta
    takes_eta = [name for name in samplers if "eta" in sampling.SAMPLERS[name].options and name != "pc"]
    if etas != [0.0] and not takes_eta:
        raise UsageError(f"--eta: none of {', '.join(samplers)} takes eta (ddim does, DDIM eq. 16); drop --eta")
    rows = []
    for name in samplers:
        if name in takes_eta:
            rows += [(name, eta, None, f"{eta:.1f}" if round(eta, 1) == eta else f"{eta:g}") for eta in etas]
        elif name == "ddpm":
            learned = var_type == "learned_range"
            rows.append((name, 0.0, None if learned else "large", "learned" if learned else "sigma-hat"))
        else:
            rows.append((name, 0.0, None, "-"))
    return rows


def done_cells(path):
    """The fid lines already in --out, by what decides their value (for resuming a table): key -> record."""
    found = {}
    if not path or not os.path.isfile(path):
        return found
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line another tool wrote, or half a line: not ours to read
            if isinstance(r, dict) and r.get("metric") == "fid" and "settings" in r:
                found[cell_key(r)] = r
    return found


def cell_key(r):
    """What decides a cell's FID: the checkpoint (and its step), the sampler's settings name, n, seed, the batch size
    that splits the seeded batches, and the reference."""
    return tuple(str(r.get(k)) for k in ("checkpoint", "checkpoint_step", "settings", "n", "seed", "sample_batch_size",
                                         "ref"))


def format_table(rows, steps, values, paper, title, notes):
    """A markdown table: one row per (sampler, eta), one column per S; each cell 'ours (paper)' when the paper has it."""
    head = ["sampler", "eta"] + [f"S = {s}" for s in steps]
    body = []
    for sampler, eta, var, label in rows:
        cells = []
        for s in steps:
            ours = values.get((sampler, eta, var, s))
            text = "-" if ours is None else f"{ours:.2f}"
            ref = paper.get((sampler, eta), {}).get(s) if var is None else None
            cells.append(text + ("" if ref is None else f" ({ref:.2f})") if paper else text)
        body.append([sampler, label] + cells)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([title, "", line(head), rule] + [line(r) for r in body] + [""] + notes) + "\n"


def main(argv=None):
    """FID of every (row, S) cell, each appended to --out as it is done, then the table (printed, --table)."""
    args = build_parser().parse_args(argv)
    steps, table_path = check_flags(args)
    rank, world, device = distributed(args.device)
    # every cell's sampler is built (and so checked: steps <= T, eta in range for S steps, --var) before any work
    ckpt = checkpoint.load(args.checkpoint)
    rows = table_rows(args, ckpt["diffusion_args"].get("var_type"))
    cells = build_cells(args, ckpt, rows, steps, device)
    values = score_cells(args, ckpt, cells, rank, world, device)
    if rank == 0:
        write_table(args, ckpt, rows, steps, values, table_path)


def check_flags(args):
    """The flags that need no checkpoint, checked before any work: (the columns S, the table's path)."""
    cli.check_names([("--checkpoint", args.checkpoint), ("--ref", args.ref), ("--inception", args.inception),
                     ("--data-dir", args.data_dir), ("--cache-dir", args.cache_dir), ("--table", args.table)])
    if args.out:
        check_appendable(args.out, "--out")  # before the work, not after it
    for flag, value, hi in (("--batch-size", args.batch_size, cli.MAX_BATCH), ("--n", args.n, cli.MAX_IMAGES),
                            ("--sample-batch-size", args.sample_batch_size, cli.MAX_BATCH)):
        check_number(flag, value, lo=1, hi=hi, integer=True)
    cli.check_seed("--seed", args.seed)
    if getattr(args, "compile", False):
        check_compiler()
    steps = cli.parse_list(args.steps, "--steps", int)
    for s in steps:
        check_number("--steps", s, lo=1, integer=True)
    if args.n < 2:
        raise UsageError(f"--n: FID needs a covariance, so at least 2 samples per cell; got {args.n}")
    table_path = args.table or os.path.join(os.path.dirname(os.path.abspath(args.out or "results.jsonl")), "table.md")
    check_appendable(table_path, "--table")  # writable now, not after hours of sampling
    return steps, table_path


def build_cells(args, ckpt, rows, steps, device):
    """One sampling.Sampler per (row, S), all on one network loaded (and with --compile compiled) once; a cell whose
    settings are refused names the cell. [((sampler, eta, var, S), Sampler)]."""
    first = sampling.Settings(sampler=rows[0][0], steps=steps[0], eta=rows[0][1], var=rows[0][2], skip=args.skip,
                              ema=not args.no_ema)
    base = sampling.from_checkpoint(ckpt, first, device, args.precision, compile=args.compile)
    diffusion = checkpoint.build_diffusion(ckpt["diffusion_args"])
    cells = []
    for sampler, eta, var, label in rows:
        for s in steps:
            o = sampling.Settings(sampler=sampler, steps=s, eta=eta, var=var, skip=args.skip, ema=not args.no_ema)
            try:
                sampler_of_cell = sampling.Sampler(base.model, diffusion, base.image_shape, o, base.num_classes,
                                                   device=device, precision=args.precision)
            except UsageError as e:  # name the cell: '--steps: ...' alone would not say which of the grid's
                raise UsageError(f"{e} (in the cell {sampler} eta {eta:g}, S = {s})") from None
            cells.append(((sampler, eta, var, s), sampler_of_cell))
    fid.check_sizes(base.image_shape[1:], args.ref, "the checkpoint's images")
    return cells


def score_cells(args, ckpt, cells, rank, world, device):
    """Each cell's FID, sampled (the ranks sharing its batches), scored by rank 0 and appended to --out as soon as it
    is known; a cell already in --out is read, not drawn again (unless --recompute). {cell key: FID} on rank 0."""
    show = not args.no_progress and rank == 0
    record_base = {"metric": "fid", "checkpoint": args.checkpoint, "checkpoint_step": ckpt.get("step"),
                   "n": args.n, "seed": args.seed, "sample_batch_size": args.sample_batch_size, "ref": args.ref}
    done = {} if args.recompute else done_cells(args.out)
    say(f"loading the FID Inception network (device {device.type})")
    net = fid.load_inception(args.inception, device) if rank == 0 else None
    reference, values = None, {}
    bar = progress(len(cells), "cells", unit="cell", disable=not show)
    for key, cell in cells:
        record = dict(record_base, settings=cell.name())
        if cell_key(record) in done:  # resumed: this cell's line is already in --out
            values[key] = done[cell_key(record)]["value"]
            say(f"{cell.describe()}: FID {values[key]:.4f} (read from {args.out})")
            bar.update(1)
            continue
        say(f"sampling {args.n} images: {cell.describe()}, seed {args.seed}"
            + (f", {world} ranks" if world > 1 else ""))
        cell.model = counter = CountCalls(cell.model)
        t0 = time.time()
        samples, _ = cell.generate(args.n, args.sample_batch_size, args.seed, show)
        seconds = time.time() - t0
        nfe = counter.calls / max(1, len(range(rank, -(-args.n // args.sample_batch_size), world)))
        if rank != 0:  # rank 0 scores; the others go on to the next cell's share
            bar.update(1)
            continue
        if reference is None:
            reference = fid.reference_stats(args.ref, data_dir=args.data_dir, cache_dir=args.cache_dir, net=net,
                                            batch_size=args.batch_size, show_progress=show)
        t1 = time.time()
        mu, sigma = fid.feature_stats(fid.inception_features(samples, net, args.batch_size, show_progress=show))
        try:
            value = fid.frechet_distance(mu, sigma, *reference)
        except ValueError as e:  # statistics that are no covariance (a hand-made --ref)
            raise UsageError(f"--ref: {e}") from None
        o = cell.settings
        record.update(value=value, sampler=o.sampler, steps=cell.steps, eta=o.eta, var=o.var, skip=o.skip, ema=o.ema,
                      nfe=nfe, sample_seconds=round(seconds, 1), fid_seconds=round(time.time() - t1, 1))
        fid.write_record(record, args.out)
        values[key] = value
        bar.update(1)
    bar.close()
    return values


def write_table(args, ckpt, rows, steps, values, table_path):
    """The table of all cells, the paper's numbers beside ours where it has them, with its notes: printed, and
    written to --table whole (outputs.write: a reader, a full disk or Ctrl-C never leaves half a table)."""
    paper = PAPER if any(r[0] == "ddim" for r in rows) else {}  # DDIM Table 1 has DDIM's rows only
    title = (f"FID of {args.n} samples against {args.ref}: {args.checkpoint} ({checkpoint.describe_step(ckpt)}), "
             f"seed {args.seed}, S = steps of the respaced diffusion (--skip {args.skip}, DDIM §4.2)")
    notes = []
    if paper:
        notes.append(f"In parentheses: {PAPER_SOURCE}; a cell without one has no number quoted there (none is "
                     "guessed). Comparable only with --n 50000 on a CIFAR-10 run against cifar10-train.")
    if any(r[0] in SOLVERS for r in rows):
        notes.append(SOLVER_ANCHOR + ".")
    if any(r[3] == "sigma-hat" for r in rows):
        notes.append("sigma-hat: DDPM ancestral sampling (Algorithm 2) with sigma_t^2 = beta_t (--var large), "
                     "DDIM Table 1's last row.")
    if args.n < fid.FEATURE_DIM:
        notes.append(f"{args.n} samples < {fid.FEATURE_DIM} feature dimensions: every FID here is biased high.")
    text = format_table(rows, steps, values, paper, title, notes)
    print(text, flush=True)
    outputs.write({table_path: lambda f: f.write(text.encode())}, force=True)
    wrote(table_path, f"{len(rows)} x {len(steps)} table")


def build_parser():
    p = Parser(description="FID of one run under a grid of samplers: rows (sampler, eta), columns S steps, each "
                           "cell `evaluate.py fid --checkpoint` with those flags; by default DDIM Table 1's CIFAR-10 "
                           "layout, printed with the paper's numbers beside ours.")
    p.add_argument("--checkpoint", required=True, help="a run directory, ckpt.pt or diffusers model folder")
    p.add_argument("--samplers", default=",".join(TABLE1_SAMPLERS),
                   help=f"comma-separated rows, from {', '.join(sampling.SAMPLERS)}: a sampler that takes eta gets "
                        "one row per --eta, ddpm is the sigma-hat row (--var large)")
    p.add_argument("--steps", default=",".join(str(s) for s in TABLE1_STEPS),
                   help="comma-separated columns S: steps of the respaced diffusion (DDIM §4.2)")
    p.add_argument("--eta", default=None,
                   help="comma-separated eta of DDIM eq. 16 for the samplers that take it (default: 0,0.2,0.5,1 with "
                        "the default --samplers, DDIM Table 1; else 0)")
    p.add_argument("--skip", default="uniform", choices=("uniform", "quad"), help="which steps a respaced diffusion "
                   "keeps, evenly spaced or quadratic (DDIM §4.2, App. D)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=50000,
                   help="samples per cell (50,000 as the papers; under torchrun write --num-samples, as torchrun "
                        "reads --n as an abbreviation of its own flags)")
    p.add_argument("--sample-batch-size", type=int, default=500, help="images sampled at once")
    p.add_argument("--seed", type=int, default=0, help="batch i of every cell is drawn from the generator seeded by "
                   "(seed, i)")
    p.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of their EMA")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on CUDA, fp32 on a CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (on CUDA also replayed as a "
                   "CUDA graph), compiled once for every cell")
    fid.add_arguments(p)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (under torchrun: "
                   "each rank's cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default="results.jsonl", help="append each cell as a JSON line here ('' to skip)")
    p.add_argument("--table", default=None, help="write the table (markdown) here (default: table.md beside --out; "
                   "replaced on every run, as it is read from the cells)")
    p.add_argument("--recompute", action="store_true", help="draw every cell again, even those already in --out")
    return p


if __name__ == "__main__":
    main_guard(main)
