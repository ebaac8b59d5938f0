"""
The command-line conventions every script shares (train.py, sample.py, evaluate.py, figures.py, toy2d.py, benchmarks/),
defined once.

  * Bad input is the user's to fix, not a crash: it gets ONE line that names the flag and the fix, exit code 2, no
    traceback, and it is checked before any work starts. `UsageError` carries such a line; `main_guard` prints it.
    A `Parser` (argparse with abbreviations off, so `--ch` is never read as `--checkpoint`) does the same for the
    errors argparse finds itself, and its --help shows every default.
  * Device and precision are resolved the same way everywhere: `--device auto` is CUDA when there is one, and
    `--precision auto` is bf16 autocast on CUDA, fp32 on a CPU.
  * A file that cannot be written after the work (a full disk) is ONE line too, `error: cannot write PATH: ...;
    nothing was written`, exit code 1 (`OutputError`, raised by outputs.py, which writes every result all or
    nothing).
  * Long jobs show a bar with a rate and an ETA in readable units ("3.2 h", "41 days"), on by default and off with
    --no-progress; every file written gets one line (`wrote`).

Nothing here knows about diffusion: this file imports no math and no network.
"""

import argparse
import math
import os
import sys
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm


class UsageError(Exception):
    """A problem the user fixes on the command line: printed as one line, exit code 2, no traceback."""


class OutputError(Exception):
    """A result that could not be written (a full disk, a lost permission; outputs.py): printed as one line, exit
    code 1, no traceback. Not a usage error's 2: the command line was right, and the same command works once the
    machine lets it write (the failed write left nothing behind)."""


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, exactly once (flags that store True say 'off')."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings and action.nargs != 0:
            default = "none" if action.default is None else "%(default)s"
            return f"{text} (default: {default})" if text else f"(default: {default})"
        if action.option_strings and action.const is True and action.default is False:  # action="store_true"
            return f"{text} (default: off)" if text else "(default: off)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the flag and what to do, exit 2), no abbreviations, defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {one_line(message)} (see --help)\n")


def one_line(message, limit=400):
    """A message as the one line a user reads: no line breaks, and a value of 100k characters (a pasted file, a
    runaway shell variable) shown by its two ends and its length, not spelled out."""
    message = " ".join(str(message).split("\n"))
    if len(message) <= limit:
        return message
    half = limit // 2 - 20
    return f"{message[:half]} ...[{len(message) - 2 * half:,} characters]... {message[-half:]}"


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered the way Python delivers SIGINT: as an exception at the next bytecode of the main thread."""

    signum = 15


def _raise_interrupted(signum, frame):
    raise Interrupted


def main_guard(main, argv=None, catch_signals=True):
    """Run `main(argv)` as a script's entry point.

    A UsageError (or one of the library's input errors) becomes one line on stderr, exit 2; an OutputError (a result
    that could not be written) one line, exit 1. Ctrl-C (SIGINT) and SIGTERM become one line on stderr saying what
    was stopped and what was kept, exit 130 / 143 (128 + the signal's number, the shell's convention): the scripts
    write every output to a temporary name and rename it only when it is whole (outputs.py), so the files announced
    with `wrote` before the signal are complete and nothing partial is left; the output names the run claimed are
    given back, whatever ended it.
    train.py, which saves a checkpoint on a signal, installs its own handlers (`catch_signals=False`).
    """
    import signal  # noqa: PLC0415

    import data  # noqa: PLC0415 (data.DataError is a usage error too: a missing or malformed dataset)
    import outputs  # noqa: PLC0415 (which imports this file)

    script = os.path.basename(sys.argv[0]) or "the script"
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if catch_signals else None
    try:
        return main(argv)
    except (UsageError, data.DataError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OutputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if not catch_signals:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"\n{name}: {script} stopped before it finished; every file it announced as written is complete, "
              "and nothing partial was left", file=sys.stderr)
        sys.exit(128 + int(signum))
    finally:
        if catch_signals:
            signal.signal(signal.SIGTERM, previous)
        outputs.release()  # the output names this run claimed (outputs.claim), whatever ended it


# ----------------------------------------------------------------------------------------------------------------
# Checking values (each names its flag and the fix)
# ----------------------------------------------------------------------------------------------------------------

# Upper bounds of what the scripts take, far above any real use and below what would not fit in memory or finish
# (a typo's extra zeros, a runaway shell variable): refused in one line before the work
MAX_SEED = 2 ** 62  # torch seeds are 64-bit; the scripts derive more from one (ranks, batches)
MAX_IMAGES = 10 ** 7  # images drawn or scored by one command (CIFAR-10's FID: 50,000)
MAX_BATCH = 2 ** 20  # images (or 2-D points) in one batch
MAX_STEPS = 10 ** 9  # training steps, and every step count or interval of one
MAX_IMAGE_SIZE = 4096  # pixels on a side


def _bound(value, integer):
    if value is None:
        return "inf"
    return f"{int(value):,}" if integer and float(value).is_integer() else f"{value:g}"


def check_number(flag, value, lo=None, hi=None, lo_open=False, hi_open=False, integer=False, fix=None):
    """A finite number in [lo, hi] (or the open ends asked for); NaN and inf are refused, never silently ignored.
    `fix`: what to do instead, added to the message (default: choose a value in the range)."""
    bounds = (("(" if lo_open else "[") + ("-inf" if lo is None else _bound(lo, integer)) + ", "
              + _bound(hi, integer) + (")" if hi_open else "]"))
    ok = not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if ok and integer:
        ok = float(value).is_integer()
    if not ok:
        kind = "an integer" if integer else "a finite number"
        big = isinstance(value, int) and value.bit_length() > 128
        shown = f"a number of about {int(value.bit_length() * 0.30103) + 1} digits" if big else f"{value!r}"
        raise UsageError(f"{flag}: must be {kind} in {bounds}, got {shown}" + (f"; {fix}" if fix else ""))
    return value


def check_seed(flag, value):
    return check_number(flag, value, lo=0, hi=MAX_SEED, integer=True)


def parse_list(text, flag, kind=str, allowed=None):
    """'10,20,50' -> [10, 20, 50] with kind int (floats, names with str): never empty, no value twice, each in
    `allowed` when given; anything else is one line naming the flag."""
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = None
    if not values:
        example = ",".join(allowed) if allowed else {int: "10,20,50,100", float: "0,0.2,0.5,1"}.get(kind, "a,b")
        raise UsageError(f"{flag}: expected a comma-separated list like {example}, got {text!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"{flag}: {text!r} names a value twice; give each once")
    unknown = [v for v in values if allowed is not None and v not in allowed]
    if unknown:
        raise UsageError(f"{flag}: unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    return values


def parse_ints(text, flag):
    """'1,2,2,2' -> [1, 2, 2, 2]; anything else names the flag."""
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers like 1,2,2,2, got {text!r}") from None


def check_name(path, flag):
    """A path typed by the user that a file system can hold: not empty (an unset shell variable), no part longer than
    255 bytes and 4,000 in all (a pasted file, a runaway variable), no NUL; whether it exists is the reader's check."""
    text = str(path)
    if not text.strip():
        raise UsageError(f"{flag}: empty; give a path, or leave {flag} out for its default")
    if "\0" in text:
        raise UsageError(f"{flag}: the name holds a NUL character; choose another")
    if any(len(part.encode()) > 255 for part in text.split(os.sep)) or len(os.path.abspath(text).encode()) > 4000:
        raise UsageError(f"{flag}: the name {text} is longer than a file system allows; choose a shorter one")
    return path


def check_names(flags):
    """check_name of each (flag, value) whose value was given (not None)."""
    for flag, value in flags:
        if value is not None:
            check_name(value, flag)


def check_writable_dir(path, flag):
    """Create `path` if needed and prove it is writable now, before the work, not after it."""
    check_name(path, flag)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag}: cannot write to {path} ({e.strerror or e}); choose a writable directory") from None
    except ValueError as e:  # a NUL in the name
        raise UsageError(f"{flag}: {path!r} is no folder name ({e}); choose another") from None
    return path


def check_new_file(path, flag, force=False):
    """An output file that must not silently replace another: it may exist only with --force; its folder is made, and
    a name the file system refuses (too long) is refused now, not after the work."""
    check_name(path, flag)
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory; give a file name")
    if os.path.exists(path) and not force:
        raise UsageError(f"{flag}: {path} already exists; pass --force to replace it or choose another name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------------------------

def resolve_device(name="auto", flag="--device"):
    """auto -> cuda if available else cpu; an unknown or unavailable device is a usage error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag}: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag}: CUDA is not available on this machine; use {flag} cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag}: only cpu and cuda are supported, got {name!r}")
    if device.type == "cuda":
        # every script here runs the same shapes again and again (a training batch, a sampling batch): cuDNN's
        # autotuner times the algorithms of each convolution shape once and keeps the fastest
        torch.backends.cudnn.benchmark = True
    return device


def distributed(name="auto", flag="--device"):
    """(rank, world_size, device) of this process. Under torchrun (WORLD_SIZE > 1) the process group is initialised
    here (nccl on CUDA, each rank on cuda:LOCAL_RANK; gloo on a CPU) and destroyed at exit; from then on every rank
    but 0 is quiet (say and wrote ask torch.distributed: `talks`). The scripts split their work across ranks and rank
    0 alone writes files and prints. One process otherwise: (0, 1, resolve_device(name))."""
    device = resolve_device(name, flag)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import atexit  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return rank, world, device


def check_compiler(flag="--compile"):
    """torch.compile's code generator builds C/C++ (its CPU kernels; on CUDA, Triton's launchers) against Python's
    headers: without a C compiler or Python.h, --compile would fail minutes into a run, after setup and data loading.
    Checked first, as every bad input is."""
    import shutil  # noqa: PLC0415
    import sysconfig  # noqa: PLC0415

    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler.split()[0]) is None:
        raise UsageError(f"{flag}: torch.compile needs a C compiler and none is on PATH (cc, gcc, clang, or $CC); "
                         f"install one (apt install gcc) or drop {flag}")
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.isfile(headers):
        raise UsageError(f"{flag}: torch.compile needs Python's C headers and {headers} is missing; install them "
                         f"(apt install python3-dev, or your Python's -dev package) or drop {flag}")


def uses_bf16(device, precision):
    """--precision auto is bf16 on CUDA (the fast path) and fp32 on a CPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device, precision):
    """bf16 autocast on CUDA (the fast path), nothing on the CPU unless asked for."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def precision_name(device, precision):
    return "bf16 autocast" if uses_bf16(device, precision) else "fp32"


# ----------------------------------------------------------------------------------------------------------------
# Telling the user what is happening
# ----------------------------------------------------------------------------------------------------------------

def human_time(seconds):
    """A duration a person reads at a glance: '42 s', '12.5 min', '3.2 h', '41 days'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    days = seconds / 86400
    return f"{days:.1f} days" if days < 10 else f"{days:,.0f} days"


class Bar(tqdm):
    """tqdm whose elapsed time and ETA read '3.2 h' / '41 days' instead of '8673:39:43'."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed_h}, ETA {eta_h}, {rate_fmt}{postfix}]"

    @property
    def format_dict(self):
        d = super().format_dict
        rate = d.get("rate") or (d["n"] / d["elapsed"] if d["elapsed"] and d["n"] else None)
        remaining = (d["total"] - d["n"]) / rate if rate and d.get("total") else None
        d.update(elapsed_h=human_time(d["elapsed"]), eta_h=human_time(remaining))
        return d


def progress(total, desc, unit="it", disable=False, initial=0, unit_scale=False):
    """A progress bar on stderr: rate and ETA; redrawn at most every 30 s when stderr is not a terminal (logs)."""
    tty = sys.stderr.isatty()
    return Bar(total=total, desc=desc, unit=unit, disable=disable, initial=initial, unit_scale=unit_scale,
               bar_format=Bar.FORMAT, dynamic_ncols=tty, mininterval=0.2 if tty else 30.0, file=sys.stderr)


def talks():
    """Whether this process speaks to the user: always, except under torchrun, where rank 0 alone does (the rank is
    torch.distributed's, set up by `distributed`; no state of our own)."""
    import torch.distributed as dist  # noqa: PLC0415
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class StepProgress(torch.nn.Module):
    """The network, moving an images bar along as a batch walks down the diffusion's levels.

    Every loop calls the network at levels S-1, ..., 0 of its diffusion (ddpm.calc_bpd_loop too), so a call at level i
    means that (top - i + 1) / (top + 1) of the batch is done, top being the first level the batch was called at
    (S - 1, or lower for a loop that starts part-way). Reading the level is a host sync: done on a CPU only.
    """

    def __init__(self, model, diffusion, bar):
        super().__init__()
        self.model, self.bar = model, bar
        self.level = {t: i for i, t in enumerate(diffusion.timestep_map.tolist())}
        self.start(0)

    def start(self, m):
        """A batch of m images begins."""
        self.m, self.top, self.shown = m, None, 0

    def forward(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        if torch.is_tensor(t) and t.device.type == "cpu" and not self.bar.disable:
            i = self.level.get(int(t.reshape(-1)[0]))
            if i is not None:
                self.top = i if self.top is None else self.top
                self.advance(int(self.m * (self.top - i + 1) / (self.top + 1)))
        return out

    def advance(self, done):
        if done > self.shown:
            self.bar.update(done - self.shown)
            self.shown = done

    def finish(self):
        """The batch is done: the bar shows all of its images."""
        self.advance(self.m)



def say(message):
    """One line for the user on stdout, that does not tear a progress bar; nothing on torchrun's ranks other than 0."""
    if not talks():
        return
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


def wrote(path, what=""):
    """The one line every written file gets (by rank 0 alone under torchrun)."""
    if not talks():
        return
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    unit = f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.0f} kB"
    say(f"wrote {path} ({unit}{', ' + what if what else ''})")


def check_appendable(path, flag):
    """A file that results are appended to (results.jsonl): an existing file must be writable, a new one creatable;
    checked before the work, not after it."""
    check_name(path, flag)
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory; give a file name")
    if os.path.exists(path):
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            raise UsageError(f"{flag}: cannot append to {path} ({e.strerror or e}); choose a writable file") from None
        return path
    check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    return path
