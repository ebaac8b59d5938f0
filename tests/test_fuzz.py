"""Every command-line value a user could type that the other tests do not name, tried the way a fuzzer would: for
each flag of train.py, sample.py, evaluate.py (fid, bpd), figures.py (every figure), toy2d.py and
benchmarks/*.py, the wrong type, out of range (0, negative, 10**12), empty, enormous (100k characters), non-finite
(nan, inf, 1e30), and for each file or folder a flag reads: one that does not exist, a folder where a file is
expected, a file where a folder is expected, an empty file, a truncated or garbage file.

Each case is written down below (CASES: script, the flag, the value, what must happen) and either works (OK) or is
refused: exit 2, stderr exactly ONE line `error: ...` naming the flag (no traceback), before any work: the runs are
tiny and stopped by an alarm after a few seconds, with a cap on memory, so a value that slipped past the checks
fails here as a timeout or a MemoryError instead of an hour-long run or a swapped machine.

SPEED. The cases go to tests/script_server.py (started once; a fork per case, see tests/test_matrix.py): a refusal
costs a few milliseconds. Each script's BASE arguments make a valid, tiny command; a case appends its flag, which
argparse reads last, so it replaces the base's value.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", SCRIPT_SERVER_TIMEOUT="20", SCRIPT_SERVER_MEMORY_GB="6",
           SCRIPT_SERVER_PRELOAD="train,sample,evaluate,figures,toy2d")
pytestmark = pytest.mark.xdist_group("fuzz")

OK = "ok"  # the expectation of a value that must work (exit 0)
HUGE = "9" * 100_000  # an enormous value: 100k characters
BIG = str(10 ** 12)

# ----------------------------------------------------------------------------------------------------------------
# The values tried
# ----------------------------------------------------------------------------------------------------------------

# an integer flag: the wrong type, empty, enormous, and out of range (each flag says which of 0, -1, 10**12 are bad)
BAD_INT = {"word": "abc", "empty": "", "float": "1.5", "nan": "nan", "huge": HUGE, "space": " "}
# a number flag
BAD_FLOAT = {"word": "abc", "empty": "", "nan": "nan", "inf": "inf", "-inf": "-inf", "1e30": "1e30", "-1e30": "-1e30",
             "huge": HUGE, "neg": "-1"}
# a free string (a list, a device name)
BAD_STR = {"empty": "", "huge": "x" * 100_000, "space": " ", "comma": ","}

# files and folders, made by the fixture: {name} in a value is replaced by its path
FILES = {
    "missing": "{root}/no-such-file",
    "empty-name": "",
    "huge-name": "{root}/" + "x" * 100_000,
    "long-part": "{root}/" + "y" * 300,  # one path component longer than the file system allows (ENAMETOOLONG)
    "dir": "{root}/a-folder",  # a folder where a file is expected
    "empty-file": "{root}/empty.bin",
    "garbage": "{root}/garbage.bin",
    "truncated-zip": "{root}/truncated.npz",
    "text": "{root}/text.txt",
}
DIR_CASES = {"file": "{root}/garbage.bin", "huge-name": "{root}/" + "x" * 100_000, "long-part": "{root}/" + "y" * 300,
             "under-file": "{root}/garbage.bin/sub", "empty-name": ""}


def ints(flag, lo=1, hi=None, skip=()):
    """The bad integers of a flag whose values lie in [lo, hi] (hi None: a bound the fix adds at 10**12 and below)."""
    cases = dict(BAD_INT)
    if lo > 0:
        cases["zero"] = "0"
    if lo > -1:
        cases["neg"] = "-1"
    cases["1e12"] = BIG
    if hi is not None:
        cases["above"] = str(hi + 1)
    return {k: v for k, v in cases.items() if k not in skip}


def floats(flag, neg_ok=False, skip=()):
    return {k: v for k, v in BAD_FLOAT.items() if not (k == "neg" and neg_ok) and k not in skip}


def cases_of(script, base, flags, extra=(), label=None):
    """pytest params for every (flag, value) of flags: {flag: {case name: value or (value, expected)}}; ids read
    LABEL:FLAG=CASE (the label is the script, or the script and its subcommand)."""
    label = label or script
    for flag, values in flags.items():
        for name, value in values.items():
            expected = flag
            if isinstance(value, tuple):
                value, expected = value
            yield pytest.param(script, base, [flag, value], expected, id=f"{label}:{flag}={name}")
    for name, args, expected in extra:
        yield pytest.param(script, base, args, expected, id=f"{label}:{name}")


# ----------------------------------------------------------------------------------------------------------------
# The cases, script by script
# ----------------------------------------------------------------------------------------------------------------

TRAIN = ["--dataset", "synthetic", "--synthetic-n", "8", "--image-size", "8", "--ch", "8", "--ch-mult", "1,2",
         "--num-res-blocks", "1", "--attn", "4", "--batch-size", "4", "--steps", "1", "--log-every", "1",
         "--sample-every", "0", "--n-sample", "0", "--no-progress", "--device", "cpu", "--diffusion-steps", "10",
         "--out", "{tmp}/train"]
TRAIN_DDGAN = TRAIN + ["--task", "ddgan", "--grad-clip", "0", "--d-ch", "8", "--latent-dim", "4"]
TRAIN_FLAGS = {
    "--image-size": ints("--image-size", hi=4096),
    "--synthetic-n": ints("--synthetic-n"),
    "--diffusion-steps": ints("--diffusion-steps", hi=100_000),
    "--ch": ints("--ch"),
    "--num-res-blocks": ints("--num-res-blocks"),
    "--num-heads": ints("--num-heads"),
    "--num-head-channels": {**ints("--num-head-channels", lo=-1, skip=("neg",)), "zero": "0", "-2": "-2"},
    "--steps": ints("--steps"),
    "--batch-size": ints("--batch-size", hi=2 ** 20),
    "--warmup": ints("--warmup", lo=0),
    "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 62 + 1)},
    "--log-every": ints("--log-every"),
    "--save-every": ints("--save-every"),
    "--sample-every": ints("--sample-every", lo=0),
    "--n-sample": ints("--n-sample", lo=0),
    "--eval-every": ints("--eval-every"),
    "--p-uncond": {**floats("--p-uncond"), "one": "1"},
    "--dropout": {**floats("--dropout"), "one": "1"},
    "--lr": {**floats("--lr"), "zero": "0", "above-1e6": "1e7"},
    "--weight-decay": {**floats("--weight-decay"), "big": "1e6"},
    "--grad-clip": floats("--grad-clip"),
    "--ema": {**floats("--ema"), "one": "1"},
    "--max-minutes": floats("--max-minutes"),
    "--save-minutes": floats("--save-minutes"),
    "--sample-minutes": floats("--sample-minutes"),
    "--ch-mult": {**BAD_STR, "zero": "0", "neg": "1,-2", "word": "1,a", "1e12": f"1,{BIG}", "levels": "1," * 50_000,
                  "float": "1,2.5"},
    "--attn": {"huge": "x" * 100_000, "word": "a", "neg": "-1", "1e12": BIG, "not-a-level": "3", "float": "4.0"},
    "--device": {**BAD_STR, "unknown": "tpu", "cuda-99": "cuda:99", "neg": "cuda:-1"},
    "--dataset": {"empty": "", "huge": "x" * 100_000},
    "--task": {"empty": ""},
    "--schedule": {"empty": "", "huge": "x" * 100_000},
    "--precision": {"word": "fp8"},
    "--out": {"empty": "", "space": " ", "file": "{root}/garbage.bin", "under-file": "{root}/garbage.bin/run",
              "huge-name": "{root}/" + "x" * 100_000, "long-part": "{root}/" + "y" * 300},
}
TRAIN_EXTRA = [
    # --data-dir: CIFAR-10's .npz or shards, or an image folder
    *[(f"--data-dir-{name}", ["--dataset", "cifar10", "--image-size", "32", "--attn", "16", "--data-dir", value],
       "--data-dir") for name, value in FILES.items() if name != "empty-name"],
    ("--data-dir-empty-name", ["--dataset", "cifar10", "--image-size", "32", "--attn", "16", "--data-dir", ""],
     "--data-dir"),
    ("--data-dir-empty-folder", ["--dataset", "folder", "--data-dir", "{root}/a-folder"], "--data-dir"),
    ("--data-dir-folder-of-garbage", ["--dataset", "folder", "--data-dir", "{root}/junk-images"], "--data-dir"),
    # the DDGAN flags, read with --task ddgan only
    *[(f"ddgan{flag}-{name}", ["--task", "ddgan", "--grad-clip", "0", flag, value], flag)
      for flag, values in {"--latent-dim": ints("--latent-dim"), "--d-ch": ints("--d-ch"),
                           "--lazy-reg": ints("--lazy-reg"),
                           "--lr-d": {**floats("--lr-d"), "zero": "0", "ten": "100"},
                           "--r1-gamma": floats("--r1-gamma")}.items()
      for name, value in values.items()],
    ("synthetic-too-big", ["--synthetic-n", "10000000", "--image-size", "1024", "--attn", "512"], "--synthetic-n"),
]

SAMPLE = ["--checkpoint", "{run}", "--n", "2", "--batch-size", "2", "--steps", "2", "--device", "cpu",
          "--no-progress", "--out", "{tmp}/sample/s"]
SAMPLE_FLAGS = {
    "--n": ints("--n", hi=10 ** 7),
    "--batch-size": ints("--batch-size", hi=2 ** 20),
    "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 64)},
    "--steps": {**ints("--steps"), "above-T": str(tiny.TIMESTEPS + 1)},
    "--eta": floats("--eta"),
    "--sampler": {"empty": "", "huge": "x" * 100_000},
    "--skip": {"empty": ""},
    "--checkpoint": {**FILES, "classifier": "{clf}"},
    "--classifier": {**FILES, "diffusion-model": "{run}"},
    "--device": {**BAD_STR, "unknown": "tpu", "cuda-99": "cuda:99"},
    "--out": {"empty": "", "dir": "{root}/a-folder/", "under-file": "{root}/garbage.bin/s",
              "huge-name": "{root}/" + "x" * 100_000, "long-part": "{root}/" + "y" * 300},
    "--invert": {k: v for k, v in FILES.items()},
    "--edit": {**FILES, "bomb-header": "{root}/bomb.png", "cifar-word": "cifar10:abc", "cifar-neg": "cifar10:-1",
               "cifar-1e12": f"cifar10:{BIG}"},
}
SAMPLE_EXTRA = [
    # the sampler's own numbers
    *[(f"langevin--langevin-steps-{n}", ["--sampler", "langevin", "--langevin-steps", v], "--langevin-steps")
      for n, v in ints("--langevin-steps").items()],
    *[(f"langevin--delta-{n}", ["--sampler", "langevin", "--delta", v], "--delta")
      for n, v in {**floats("--delta"), "zero": "0"}.items()],
    *[(f"pc--corrector-steps-{n}", ["--sampler", "pc", "--corrector-steps", v], "--corrector-steps")
      for n, v in ints("--corrector-steps", lo=0).items()],
    *[(f"pc--snr-{n}", ["--sampler", "pc", "--snr", v], "--snr") for n, v in {**floats("--snr"), "zero": "0"}.items()],
    *[(f"ddim--eta-{n}", ["--sampler", "ddim", "--eta", v], "--eta") for n, v in floats("--eta").items()],
    *[(f"cfg--cfg-scale-{n}", ["--checkpoint", "{cond}", "--cfg-scale", v], "--cfg-scale")
      for n, v in floats("--cfg-scale").items()],
    *[(f"cond--class-{n}", ["--checkpoint", "{cond}", "--class", v], "--class")
      for n, v in {**ints("--class", lo=0), "above": "2"}.items()],
    *[(f"guided--classifier-scale-{n}", ["--classifier", "{clf}", "--classifier-scale", v], "--classifier-scale")
      for n, v in floats("--classifier-scale").items()],
    *[(f"edit--strength-{n}", ["--edit", "{picture}", "--strength", v], "--strength")
      for n, v in {**floats("--strength"), "above": "1.5"}.items()],
    *[(f"edit--mask-{n}", ["--edit", "{picture}", "--mask", v], "--mask") for n, v in FILES.items()],
    *[(f"invert--data-dir-{n}", ["--sampler", "ddim", "--invert", "cifar10:0", "--data-dir", v], "--data-dir")
      for n, v in FILES.items() if n != "empty-name"],
    *[(f"interpolate--n-{n}", ["--sampler", "ddim", "--interpolate", "--n", v], "--n")
      for n, v in {"one": "1", "1e12": BIG}.items()],
]

EVALUATE_FID = ["fid", "--checkpoint", "{run}", "--n", "2", "--sample-batch-size", "2", "--steps", "2",
                "--ref", "{ref}", "--inception", "{inception}", "--device", "cpu", "--no-progress", "--out", ""]
FID_SAMPLES = ["fid", "--samples", "{samples}", "--ref", "{ref}", "--inception", "{inception}", "--device", "cpu",
               "--no-progress", "--out", ""]
FID_FLAGS = {
    "--n": ints("--n", hi=10 ** 7),
    "--sample-batch-size": ints("--sample-batch-size", hi=2 ** 20),
    "--batch-size": ints("--batch-size", hi=2 ** 20),
    "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 64)},
    "--steps": {**ints("--steps"), "above-T": str(tiny.TIMESTEPS + 1)},
    "--eta": floats("--eta"),
    "--checkpoint": {**FILES, "classifier": "{clf}"},
    "--ref": {**FILES, "unknown-name": "imagenet-train"},
    "--inception": FILES,
    # the cache is read for the named references only (cifar10-train): beside an .npz --ref it is not used
    "--cache-dir": {**{k: v for k, v in DIR_CASES.items() if k not in ("file", "under-file")},
                    "file": ("{root}/garbage.bin", OK), "under-file": ("{root}/garbage.bin/sub", OK)},
    "--out": {"dir": "{root}/a-folder", "under-file": "{root}/garbage.bin/r.jsonl",
              "huge-name": "{root}/" + "x" * 100_000, "long-part": "{root}/" + "y" * 300},
    "--save-samples": {"empty": "", "dir": "{root}/a-folder/", "under-file": "{root}/garbage.bin/s",
                       "huge-name": "{root}/" + "x" * 100_000},
    "--device": {**BAD_STR, "unknown": "tpu"},
}
FID_SAMPLES_FLAGS = {"--samples": FILES}
FID_SAMPLES_EXTRA = [("--cache-dir-file-ref-name", ["--ref", "cifar10-train", "--cache-dir", "{root}/garbage.bin",
                                                     "--data-dir", "{root}/a-folder"], "--ref")]

EVALUATE_BPD = ["bpd", "--checkpoint", "{run}", "--n", "2", "--batch-size", "2", "--device", "cpu", "--no-progress",
                "--out", ""]
BPD_FLAGS = {
    "--n": ints("--n", hi=10 ** 7),
    "--batch-size": ints("--batch-size", hi=2 ** 20),
    "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 64)},
    "--checkpoint": {**FILES, "classifier": "{clf}"},
    "--data-dir": {k: v for k, v in FILES.items() if k != "empty-name"},
    "--out": {"dir": "{root}/a-folder", "under-file": "{root}/garbage.bin/r.jsonl",
              "huge-name": "{root}/" + "x" * 100_000},
    "--var": {"empty": ""},
}

FIGURES = ("ddpm-x0", "ddpm-shared", "ddim-consistency", "ddim-interp", "guidance")


def figure_base(figure):
    base = [figure, "--checkpoint", "{run}", "--n", "1", "--device", "cpu", "--no-progress",
            "--out", "{tmp}/figures"]
    if figure in ("ddpm-x0", "ddpm-shared"):
        base += ["--steps", "2", "--columns", "99,1"]
    if figure == "ddim-consistency":
        base += ["--columns", "2"]
    if figure == "guidance":
        base = [figure, "--checkpoint", "{cond}", "--n", "1", "--device", "cpu", "--no-progress",
                "--out", "{tmp}/figures", "--scales", "0,1"]
    return base


def figure_flags(figure):
    flags = {
        "--n": ints("--n", hi=10 ** 4),
        "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 64)},
        "--checkpoint": {**FILES, "classifier": "{clf}"},
        "--out": {k: v for k, v in DIR_CASES.items()},
        "--device": {"unknown": "tpu", "huge": "x" * 100_000, "empty": ""},
    }
    if figure in ("ddpm-x0", "ddpm-shared"):
        flags["--steps"] = {**ints("--steps"), "above-T": str(tiny.TIMESTEPS + 1)}
        flags["--columns"] = {**BAD_STR, "word": "a", "neg": "-1", "above-T": str(tiny.TIMESTEPS + 1), "1e12": BIG,
                              "float": "1.5", "twice": "5,5"}
    if figure == "ddim-consistency":
        flags["--columns"] = {**BAD_STR, "word": "a", "zero": "0", "neg": "-1", "above-T": str(tiny.TIMESTEPS + 1),
                              "1e12": BIG, "levels": "1," * 50_000}
    if figure == "ddim-interp":
        flags["--steps"] = {**ints("--steps"), "above-T": str(tiny.TIMESTEPS + 1)}
    if figure == "guidance":
        flags["--scales"] = {**BAD_STR, "word": "a", "nan": "nan", "inf": "inf", "1e30": "1e30", "neg": "-1",
                             "many": ",".join(["1"] * 50_000)}
        flags["--class"] = {**ints("--class", lo=0), "above": "2"}
        flags["--classifier"] = FILES
    return flags


TOY = ["--steps", "1", "--batch-size", "4", "--hidden", "8", "--depth", "1", "--diffusion-steps", "4",
       "--n-samples", "4", "--classifier-steps", "1", "--ddgan-steps", "0", "--no-progress", "--out",
       "{tmp}/toy.png"]
TOY_FLAGS = {
    "--steps": ints("--steps"),
    "--batch-size": {**ints("--batch-size", hi=2 ** 20), "one": "1"},
    "--lr": {**floats("--lr"), "zero": "0", "above-1e6": "1e7"},
    "--hidden": ints("--hidden"),
    "--depth": ints("--depth"),
    "--diffusion-steps": {**ints("--diffusion-steps", hi=100_000), "one": "1"},
    "--n-samples": {**ints("--n-samples", hi=10 ** 7), "one": "1"},
    "--p-uncond": {**floats("--p-uncond"), "one": "1"},
    "--guide-class": {**ints("--guide-class", lo=0), "above": "2"},
    "--cfg-scales": {**BAD_STR, "word": "a", "nan": "nan", "inf": "inf", "1e30": "1e30", "neg": "-1",
                     "many": ",".join(["1"] * 50_000)},
    "--classifier-scales": {**BAD_STR, "word": "a", "nan": "nan", "inf": "inf", "1e30": "1e30", "neg": "-1"},
    "--classifier-steps": ints("--classifier-steps"),
    "--ddgan-steps": ints("--ddgan-steps", lo=0),
    "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 64)},
    "--threads": {**ints("--threads"), "many": "100000"},
    "--out": {"empty": "", "dir": "{root}/a-folder", "under-file": "{root}/garbage.bin/t.png",
              "huge-name": "{root}/" + "x" * 100_000, "long-part": "{root}/" + "y" * 300},
    "--data": {"empty": ""},
}

BENCH = ["--tiny", "--device", "cpu", "--peers", "none", "--tasks", "train"]
BENCH_FLAGS = {
    "--batch-size": ints("--batch-size", hi=2 ** 20),
    "--repeats": ints("--repeats"),
    "--steps-per-repeat": ints("--steps-per-repeat"),
    "--warmup": ints("--warmup", lo=0),
    "--sample-n": ints("--sample-n", lo=0),
    "--sample-batch": ints("--sample-batch", hi=2 ** 20),
    "--sample-steps": ints("--sample-steps"),
    "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 64)},
    "--peak-tflops": {**floats("--peak-tflops"), "zero": "0"},
    "--formats": {**BAD_STR, "word": "nchw"},
    "--tasks": {**BAD_STR, "word": "eval"},
    "--profile": {k: v for k, v in DIR_CASES.items() if k != "empty-name"},
    "--json": {"empty": "", "dir": "{root}/a-folder", "under-file": "{root}/garbage.bin/b.json",
               "huge-name": "{root}/" + "x" * 100_000, "long-part": "{root}/" + "y" * 300},
    "--device": {"unknown": "tpu", "huge": "x" * 100_000, "empty": ""},
    "--peers": {"empty": ""},
}

TABLE = ["--checkpoint", "{run}", "--samplers", "ddim", "--steps", "2", "--n", "2", "--sample-batch-size", "2",
         "--ref", "{ref}", "--inception", "{inception}", "--device", "cpu", "--no-progress",
         "--out", "{tmp}/table/results.jsonl"]
TABLE_FLAGS = {
    "--n": {**ints("--n", hi=10 ** 7), "one": "1"},
    "--sample-batch-size": ints("--sample-batch-size", hi=2 ** 20),
    "--batch-size": ints("--batch-size", hi=2 ** 20),
    "--seed": {**ints("--seed", lo=0, skip=("1e12",)), "above": str(2 ** 64)},
    "--steps": {**BAD_STR, "word": "a", "zero": "0", "neg": "-1", "above-T": str(tiny.TIMESTEPS + 1), "1e12": BIG,
                "many": ",".join(str(i) for i in range(1, 50_000))},
    "--samplers": {**BAD_STR, "word": "euler"},
    "--eta": {**BAD_STR, "word": "a", "nan": "nan", "inf": "inf", "1e30": "1e30", "neg": "-1"},
    "--checkpoint": {**FILES, "classifier": "{clf}"},
    "--ref": FILES,
    "--inception": FILES,
    "--out": {"dir": "{root}/a-folder", "under-file": "{root}/garbage.bin/r.jsonl",
              "huge-name": "{root}/" + "x" * 100_000, "long-part": "{root}/" + "y" * 300},
    "--table": {"dir": "{root}/a-folder", "under-file": "{root}/garbage.bin/t.md",
                "huge-name": "{root}/" + "x" * 100_000},
}


def all_cases():
    yield from cases_of("train.py", TRAIN, TRAIN_FLAGS, TRAIN_EXTRA)
    yield from cases_of("sample.py", SAMPLE, SAMPLE_FLAGS, SAMPLE_EXTRA)
    yield from cases_of("evaluate.py", EVALUATE_FID, FID_FLAGS, label="evaluate.py fid")
    yield from cases_of("evaluate.py", FID_SAMPLES, FID_SAMPLES_FLAGS, FID_SAMPLES_EXTRA, label="evaluate.py fid")
    yield from cases_of("evaluate.py", EVALUATE_BPD, BPD_FLAGS, label="evaluate.py bpd")
    for figure in FIGURES:
        yield from cases_of("figures.py", figure_base(figure), figure_flags(figure), label=f"figures.py {figure}")
    yield from cases_of("toy2d.py", TOY, TOY_FLAGS)
    yield from cases_of("benchmarks/bench.py", BENCH, BENCH_FLAGS)
    yield from cases_of("benchmarks/fid_table.py", TABLE, TABLE_FLAGS)


CASES = list(all_cases())
# the ids name the values: 100k-character values are named by their case name, never spelled out
_ids = [p.id for p in CASES]
assert len(set(_ids)) == len(_ids), sorted({i for i in _ids if _ids.count(i) > 1})


# ----------------------------------------------------------------------------------------------------------------
# The world the cases run in
# ----------------------------------------------------------------------------------------------------------------

class TinyInception(torch.nn.Module):
    """The FID Inception network's interface at no cost (as tests/test_matrix.py's)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w


class World:
    def __init__(self, root):
        self.root = root
        self.server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "script_server.py")], cwd=ROOT,
                                       env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.build()
        except BaseException:
            self.server.kill()
            self.server.wait()
            raise

    def build(self):
        import warnings  # noqa: PLC0415

        root = self.root
        j = lambda name: os.path.join(root, name)  # noqa: E731
        self.paths = {"root": root, "run": tiny.write(j("runs/run")), "cond": tiny.write(j("runs/cond"), num_classes=2),
                      "clf": tiny.write(j("runs/clf"), kind="classifier", num_classes=2),
                      "picture": j("picture.png"), "ref": j("ref8.npz"), "inception": j("inception.pt"),
                      "samples": j("samples.npz")}
        os.makedirs(j("a-folder"))
        os.makedirs(j("junk-images"))
        with open(j("junk-images/a.png"), "wb") as f:
            f.write(b"not a png")
        open(j("empty.bin"), "wb").close()
        with open(j("garbage.bin"), "wb") as f:
            f.write(np.random.default_rng(0).bytes(4096))
        with open(j("text.txt"), "w") as f:
            f.write("hello\n")
        g = np.random.default_rng(0)
        np.savez(j("samples.npz"), x=g.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
        with open(j("samples.npz"), "rb") as f:
            whole = f.read()
        with open(j("truncated.npz"), "wb") as f:
            f.write(whole[: len(whole) // 2])
        Image.fromarray(g.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(j("picture.png"))
        # a PNG whose header claims 100000 x 100000 pixels (the decompression bomb's size, not its bytes)
        Image.new("1", (1, 1)).save(j("bomb.png"))
        with open(j("bomb.png"), "rb") as f:
            png = bytearray(f.read())
        import struct  # noqa: PLC0415
        import zlib  # noqa: PLC0415
        png[16:24] = struct.pack(">II", 100_000, 100_000)
        png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
        with open(j("bomb.png"), "wb") as f:
            f.write(png)
        np.savez_compressed(j("ref8.npz"), mu=np.zeros(2048), sigma=np.zeros((2048, 2048)), image_size=np.array(8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(TinyInception()).save(j("inception.pt"))

    def folder(self):
        self.cases = getattr(self, "cases", 0) + 1
        path = os.path.join(self.root, "cases", str(self.cases))
        os.makedirs(path)
        return path

    def run(self, script, args, cwd):
        out, err = os.path.join(cwd, ".stdout"), os.path.join(cwd, ".stderr")
        self.server.stdin.write(json.dumps({"script": script, "args": args, "cwd": cwd, "stdout": out,
                                            "stderr": err}) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        assert line, "the script server died"
        with open(out) as f, open(err) as e:
            reply = json.loads(line)
            return reply["rc"], f.read(), e.read(), reply["seconds"]

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(str(tmp_path_factory.mktemp("fuzz")))
    yield w
    w.close()


def fill(value, paths):
    for key, path in paths.items():
        value = value.replace("{" + key + "}", path)
    return value


@pytest.mark.parametrize("script, base, args, expected", CASES)
def test_case(world, script, base, args, expected):
    folder = world.folder()  # a fresh folder per case (pytest's tmp_path costs more than a refusal)
    argv = [fill(a, dict(world.paths, tmp=folder)) for a in base + args]
    rc, out, err, seconds = world.run(script, argv, folder)
    shown = err if len(err) < 3000 else err[:1500] + " ... " + err[-1500:]
    if expected == OK:
        assert rc == 0, shown
        return
    assert rc == 2, f"exit {rc}, expected 2 naming {expected}: {shown}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one line: {shown}"
    assert "Traceback" not in err
    assert len(lines[0]) <= 1000, f"a line of {len(lines[0])} characters: {shown}"
    assert expected in lines[0], f"does not name {expected}: {shown}"
    assert seconds < 10, f"refused after {seconds} s: not before the work"


BASES = [pytest.param("train.py", TRAIN, id="train.py"), pytest.param("train.py", TRAIN_DDGAN, id="train.py ddgan"),
         pytest.param("sample.py", SAMPLE, id="sample.py"),
         pytest.param("evaluate.py", EVALUATE_FID, id="evaluate.py fid"),
         pytest.param("evaluate.py", FID_SAMPLES, id="evaluate.py fid --samples"),
         pytest.param("evaluate.py", EVALUATE_BPD, id="evaluate.py bpd"),
         *[pytest.param("figures.py", figure_base(f), id=f"figures.py {f}") for f in FIGURES],
         pytest.param("toy2d.py", TOY, id="toy2d.py"),
         pytest.param("benchmarks/fid_table.py", TABLE, id="benchmarks/fid_table.py")]


@pytest.mark.parametrize("script, base", BASES)
def test_base_works(world, tmp_path, script, base):
    """Each script's base command works as it is: a case's refusal is its own value's, not the base's."""
    argv = [fill(a, dict(world.paths, tmp=str(tmp_path))) for a in base]
    rc, out, err, seconds = world.run(script, argv, str(tmp_path))
    assert rc == 0, err[-3000:]
