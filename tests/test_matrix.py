"""Every command against every kind of checkpoint, run as a user runs it: a command x checkpoint matrix.

Rows: sample.py with each sampler and each experiment (interpolation, inversion, SDEdit, masked SDEdit, guided
translation, classifier guidance, classifier-free guidance), evaluate.py fid / bpd / table, and every figure of
figures.py. Columns: the checkpoints a user can point them at, all tiny networks with random weights: a run folder,
a run's ckpt.pt named directly, a class-conditional run (learned variances), a noisy classifier, a DDGAN run made by
train.py itself, a checkpoint of the format before 2, a diffusers folder written by diffusers' own save_pretrained
(safetensors, today's attention names, the flat layout of google/ddpm-cifar10-32), one as the hub's older files
(.bin, the attention names of diffusers < 0.15, a pipeline folder) and the unet/ folder of a 256-family pipeline
(six levels, attention at the fifth, fixed_small variances, 64x64: not CIFAR-10's size, as 256 is not).

Each cell is written down in EXPECT: OK (exit 0; every file announced with `wrote` exists and loads: a PNG opens, an
.npz holds uint8 images, a .jsonl holds JSON lines with a finite value) or the flag a one-line refusal names (exit 2,
stderr exactly `error: --flag: ...`, nothing written), for the combinations that make no sense: a classifier as
--checkpoint, an eps-model's sampler on a DDGAN generator, bits/dim of a DDGAN, classifier-free guidance of an
unconditional run, ... Not every cell runs (EXPECT says which and why): the whole grid would cost minutes of CPU.

SPEED. A fresh `python sample.py` spends seconds importing torch before it reads its first flag. So the cells go to
tests/script_server.py, started once: it imports what the scripts import, then forks a child per cell that runs the
real script with runpy as __main__ (the same code as `python sample.py ...` after the interpreter's start). A few
cells (REAL) are true subprocesses, to keep that claim honest. FID's two costly parts are made cheap without
changing the code that runs: --inception is a tiny TorchScript network with the Inception's interface (uint8 images
resized to 299x299 in, [N, 2048] out), and the reference statistics have a zero covariance, whose product with the
samples' covariance is the zero matrix: the server answers its square root (exactly zero) without scipy's 2048x2048
Schur decomposition, which alone takes 15-90 s on a 2-core machine.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
from tests import tiny
from unet import ADM_CHOICES, EncoderUNet, UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
T = 20  # diffusion steps of every network here: bits/dim and the figures walk all of them

# the cells share one server and one set of checkpoints: under pytest-xdist (pytest.ini: -n 2 --dist loadgroup) they
# all go to one worker instead of building everything twice
pytestmark = pytest.mark.xdist_group("matrix")

# ----------------------------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------------------------

KINDS = ("run", "ckpt", "cond", "clf", "ddgan", "old", "hub", "hub-bin", "lsun")
SIZES = {"hub": 32, "hub-bin": 32, "lsun": 64}  # image sizes of the diffusers folders; the runs' are tiny.IMAGE

FAST = ["--steps", "3", "--n", "2", "--no-progress"]
FID = ["--ref", "{ref}", "--inception", "{inception}", "--no-progress"]
FIG = ["--steps", "3", "--n", "1", "--no-progress"]  # one row: matplotlib's axes cost more than the sampling
# name -> (script, arguments, what it writes); {ckpt}, {clf}, ... are the column's paths (World.paths)
COMMANDS = {
    "ddpm": ("sample.py", ["--checkpoint", "{ckpt}", "--sampler", "ddpm", *FAST], (".png", ".npz")),
    "ddim": ("sample.py", ["--checkpoint", "{ckpt}", "--sampler", "ddim", "--eta", "0.5", *FAST], (".png", ".npz")),
    "dpmpp2m": ("sample.py", ["--checkpoint", "{ckpt}", "--sampler", "dpmpp2m", *FAST], (".png", ".npz")),
    "heun": ("sample.py", ["--checkpoint", "{ckpt}", "--sampler", "heun", *FAST], (".png", ".npz")),
    "langevin": ("sample.py", ["--checkpoint", "{ckpt}", "--sampler", "langevin", "--langevin-steps", "1", *FAST],
                 (".png", ".npz")),
    "pc": ("sample.py", ["--checkpoint", "{ckpt}", "--sampler", "pc", *FAST], (".png", ".npz")),
    # the chain is the T steps the generator learned: no --steps
    "ddgan": ("sample.py", ["--checkpoint", "{ckpt}", "--sampler", "ddgan", "--n", "2", "--no-progress"],
              (".png", ".npz")),
    "interpolate": ("sample.py", ["--checkpoint", "{ckpt}", "--interpolate", *FAST], (".png", ".npz")),
    "invert": ("sample.py", ["--checkpoint", "{ckpt}", "--invert", "{picture}", "--steps", "3", "--no-progress"],
               (".png", ".npz")),
    "edit": ("sample.py", ["--checkpoint", "{ckpt}", "--edit", "{picture}", *FAST], (".png", ".npz")),
    "edit-mask": ("sample.py", ["--checkpoint", "{ckpt}", "--edit", "{picture}", "--mask", "{mask}", *FAST],
                  (".png", ".npz")),
    "edit-cg": ("sample.py", ["--checkpoint", "{ckpt}", "--edit", "{picture}", "--classifier", "{clf}", "--class", "1",
                              *FAST], (".png", ".npz")),
    "cg": ("sample.py", ["--checkpoint", "{ckpt}", "--classifier", "{clf}", "--classifier-scale", "2", "--class", "1",
                         *FAST], (".png", ".npz")),
    "cfg": ("sample.py", ["--checkpoint", "{ckpt}", "--cfg-scale", "2", "--class", "1", *FAST], (".png", ".npz")),
    "fid": ("evaluate.py", ["fid", "--checkpoint", "{ckpt}", *FAST, *FID], (".jsonl",)),
    "fid-ddgan": ("evaluate.py", ["fid", "--checkpoint", "{ckpt}", "--sampler", "ddgan", "--n", "2", *FID],
                  (".jsonl",)),
    # a run names its data (these: synthetic, so --data-dir is refused); a diffusers folder names none
    "bpd": ("evaluate.py", ["bpd", "--checkpoint", "{ckpt}", "--n", "2", "--no-progress"], (".jsonl",)),
    "bpd-data": ("evaluate.py", ["bpd", "--checkpoint", "{ckpt}", "--n", "2", "--data-dir", "{cifar}",
                                 "--no-progress"], (".jsonl",)),
    "table": ("benchmarks/fid_table.py", ["--checkpoint", "{ckpt}", "--samplers", "ddim", "--steps", "3", "--n", "2",
                              *FID], (".jsonl", ".md")),
    "fig-ddpm-x0": ("figures.py", ["ddpm-x0", "--checkpoint", "{ckpt}", "--columns", "20,1", *FIG], (".png",)),
    "fig-ddpm-shared": ("figures.py", ["ddpm-shared", "--checkpoint", "{ckpt}", "--columns", "20,5", *FIG],
                        (".png",)),
    "fig-ddim-consistency": ("figures.py", ["ddim-consistency", "--checkpoint", "{ckpt}", "--columns", "2,3", "--n",
                                            "1", "--no-progress"], (".png",)),
    # its step counts are --columns: a --steps would be ignored
    "fig-ddim-consistency-steps": ("figures.py", ["ddim-consistency", "--checkpoint", "{ckpt}", "--columns", "2,3",
                                                  *FIG], ()),
    "fig-ddim-interp": ("figures.py", ["ddim-interp", "--checkpoint", "{ckpt}", *FIG], (".png",)),
    "fig-guidance": ("figures.py", ["guidance", "--checkpoint", "{ckpt}", "--classifier", "{clf}", "--class", "1",
                                    "--scales", "0,2", *FIG], (".png",)),
    # without --classifier: classifier-free guidance, for class-conditional runs only (seed 1: fig-guidance's file
    # is guidance_seed0.png)
    "fig-guidance-cfg": ("figures.py", ["guidance", "--checkpoint", "{ckpt}", "--class", "1", "--scales", "0,2",
                                        "--seed", "1", *FIG], (".png",)),
}

OK, NOT_RUN = "ok", None
CK, SAMPLER, CLASS, CFG, CLF, DATA = "--checkpoint", "--sampler", "--class", "--cfg-scale", "--classifier", "--data-dir"
INTERP, INVERT, EDIT, STEPS = "--interpolate", "--invert", "--edit", "--steps"
_ = NOT_RUN
# The expected outcome of every cell: OK, or the flag its one-line refusal names. A cell left out (_) would run the
# same code as one that is in, and the matrix has a CPU budget: "ckpt" differs from "run" only in where the outputs
# go, "hub-bin" from "hub" only in the loader, a check shared by every row (a classifier as --checkpoint) runs on a
# few rows, a sampler's loop on a run and a class-conditional run, a figure on one run; the costly cells (FID, the
# 64x64 network) run where they differ. Every column runs the "ddim", "bpd" (or "bpd-data") and "fig-ddpm-x0" rows.
EXPECT = {
    #                              run      ckpt     cond     clf      ddgan    old      hub      hub-bin  lsun
    "ddpm":                       (OK,      _,       OK,      _,       SAMPLER, OK,      OK,      _,       OK),
    "ddim":                       (OK,      OK,      OK,      CK,      SAMPLER, OK,      OK,      OK,      OK),
    "dpmpp2m":                    (OK,      _,       OK,      _,       _,       _,       _,       _,       _),
    "heun":                       (OK,      _,       OK,      _,       _,       _,       _,       _,       _),
    "langevin":                   (OK,      _,       OK,      _,       _,       _,       _,       _,       _),
    "pc":                         (OK,      _,       OK,      _,       _,       _,       _,       _,       _),
    "ddgan":                      (SAMPLER, _,       _,       CK,      OK,      _,       SAMPLER, _,       _),
    "interpolate":                (OK,      _,       OK,      _,       INTERP,  _,       OK,      _,       _),
    # a class-conditional network needs the class of the picture it inverts or edits
    "invert":                     (OK,      _,       CLASS,   _,       INVERT,  _,       OK,      _,       _),
    "edit":                       (OK,      OK,      CLASS,   CK,      EDIT,    OK,      OK,      _,       _),
    "edit-mask":                  (OK,      _,       _,       _,       _,       _,       OK,      _,       _),
    # the 64x64 network and the 32x32 classifier: guidance by a classifier of other images is refused
    "edit-cg":                    (OK,      _,       OK,      _,       _,       _,       _,       _,       CLF),
    "cg":                         (OK,      _,       OK,      _,       SAMPLER, _,       OK,      _,       CLF),
    "cfg":                        (CFG,     _,       OK,      _,       _,       _,       CFG,     _,       _),
    "fid":                        (OK,      _,       OK,      CK,      SAMPLER, _,       OK,      _,       OK),
    "fid-ddgan":                  (SAMPLER, _,       _,       _,       OK,      _,       _,       _,       _),
    # bits/dim of a generator is not defined; a 64x64 network that names no dataset has no test images here
    "bpd":                        (OK,      OK,      OK,      CK,      CK,      OK,      _,       _,       _),
    "bpd-data":                   (DATA,    _,       _,       _,       _,       _,       OK,      _,       CK),
    "table":                      (_,       _,       _,       CK,      _,       _,       OK,      _,       _),
    "fig-ddpm-x0":                (OK,      OK,      OK,      CK,      CK,      OK,      OK,      OK,      OK),
    "fig-ddpm-shared":            (OK,      _,       _,       _,       _,       _,       _,       _,       _),
    "fig-ddim-consistency":       (OK,      _,       _,       _,       _,       _,       _,       _,       _),
    "fig-ddim-consistency-steps": (STEPS,   _,       _,       _,       _,       _,       _,       _,       _),
    "fig-ddim-interp":            (OK,      _,       _,       _,       _,       _,       _,       _,       _),
    "fig-guidance":               (OK,      _,       _,       _,       _,       _,       OK,      _,       CLF),
    "fig-guidance-cfg":           (CLF,     _,       OK,      _,       _,       _,       _,       _,       _),
}
assert set(EXPECT) == set(COMMANDS) and all(len(row) == len(KINDS) for row in EXPECT.values())

# cells run as true `python SCRIPT ...` processes, not through the server (seconds each: a handful)
REAL = {("ddim", "hub"), ("bpd", "run")}

# cells that fail today, each with its reason (strict: one that starts passing must be moved back)
XFAIL = {}


def cells():
    for command, row in EXPECT.items():
        for kind, expected in zip(KINDS, row):
            if expected is NOT_RUN:
                continue
            marks = [pytest.mark.xfail(strict=True, reason=XFAIL[command, kind])] if (command, kind) in XFAIL else []
            yield pytest.param(command, kind, expected, id=f"{command}-{kind}", marks=marks)


# ----------------------------------------------------------------------------------------------------------------
# The checkpoints, the inputs and the server
# ----------------------------------------------------------------------------------------------------------------

class TinyInception(torch.nn.Module):
    """The FID Inception network's interface at no cost: [N, 3, 299, 299] in [-1, 1] -> [N, 2048] features, a fixed
    projection of the pooled colours."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w


def old_format(path, seed=5):
    """A ckpt.pt as train.py wrote it before format 2: no model_args, the flags in "config", and the network of that
    time (ADM's parameter-free choices), which checkpoint.upgrade rebuilds."""
    config = dict(image_size=tiny.IMAGE, ch=16, ch_mult="1,2", num_res_blocks=1, attn="4", dropout=0.0, num_heads=1,
                  num_head_channels=-1, resblock_updown=False, scale_shift_norm=True, schedule="linear",
                  diffusion_steps=T, loss="mse", num_classes=10, class_cond=False, task="diffusion",
                  dataset="synthetic", data_dir=None)
    args = dict(tiny.NET, **ADM_CHOICES)
    net = tiny.randomize(UNet(**args), seed)
    os.makedirs(path, exist_ok=True)
    torch.save({"model": net.state_dict(), "ema": net.state_dict(), "step": 3, "config": config},
               os.path.join(path, checkpoint.FILENAME))
    return path


def diffusers_folders(root):
    """Three diffusers folders written by diffusers itself (tests/test_pretrained.py's write_folder): the flat
    google/ddpm-cifar10-32 layout (safetensors, today's attention names), a pipeline folder with the hub's older
    files (.bin, query/key/value/proj_attn), both 32x32, and the unet/ folder of a 256-family pipeline; T steps."""
    from tests.test_pretrained import CIFAR10, LSUN256, SCHEDULER, write_folder  # noqa: PLC0415 (imports diffusers)

    small = dict(CIFAR10, block_out_channels=[32, 32], layers_per_block=1,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    scheduler = dict(SCHEDULER, num_train_timesteps=T)
    hub, old, lsun = (os.path.join(root, name) for name in ("ddpm-cifar10-32", "ddpm-old", "ddpm-church-256"))
    write_folder(hub, small, scheduler, layout="flat", fmt="safetensors", seed=1)
    write_folder(old, small, scheduler, layout="repo", fmt="bin", old_names=True, seed=2)
    # the 256 models' six levels with attention at the fifth, at 32 and 64 channels and 64x64 (the fifth level is 4x4)
    lsun_config = dict(LSUN256, sample_size=64, block_out_channels=[32] * 4 + [64] * 2, layers_per_block=1)
    write_folder(lsun, lsun_config, dict(scheduler, variance_type="fixed_small"), layout="repo", seed=3)
    return {"hub": hub, "hub-bin": old, "lsun": os.path.join(lsun, "unet")}


class World:
    """The server, the checkpoints of every column and the inputs the commands read."""

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
        """Every column's checkpoint and the commands' inputs, written while the server imports."""
        root = self.root
        r = lambda name: os.path.join(root, "runs", name)  # noqa: E731
        steps = {"diffusion_args": {"schedule": "linear", "timesteps": T, "var_type": "fixed_large",
                                    "loss_type": "mse"}}
        self.ckpts = {
            "run": tiny.write(r("run"), seed=0, **steps),
            # another folder than "run": both write into <run>/samples/ under the same names
            "ckpt": os.path.join(tiny.write(r("named"), seed=1, **steps), checkpoint.FILENAME),
            "cond": tiny.write(r("cond"), num_classes=2, learn_sigma=True, seed=2, diffusion_args=dict(
                steps["diffusion_args"], var_type="learned_range", loss_type="hybrid")),
            "clf": tiny.write(r("clf"), kind="classifier", num_classes=2, seed=3),
            "old": old_format(r("old")),
        }
        self.ckpts.update(diffusers_folders(root))
        self.classifier32 = self.classifier(os.path.join(root, "runs", "clf32"), 32)
        self.write_inputs()
        # a real DDGAN run: train.py --task ddgan, one step, through the server
        self.ckpts["ddgan"] = r("ddgan")
        rc, _, err = self.run("train.py", [
            "--task", "ddgan", "--dataset", "synthetic", "--synthetic-n", "16", "--image-size", str(tiny.IMAGE),
            "--ch", "16", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn", "4", "--batch-size", "4",
            "--d-ch", "8", "--latent-dim", "4", "--steps", "1", "--log-every", "1", "--sample-every", "0",
            "--n-sample", "0", "--no-progress", "--device", "cpu", "--out", self.ckpts["ddgan"]], root)
        assert rc == 0, err

    def classifier(self, path, size):
        """A noisy classifier of size x size images (2 classes), for guidance of the diffusers folders' networks."""
        args = dict(tiny.NET, image_size=size, attn_resolutions=(size // 2,), out_dim=2, pool="adaptive")
        net = tiny.randomize(EncoderUNet(**args), 4)
        os.makedirs(path, exist_ok=True)
        checkpoint.save({"format": 2, "kind": "classifier", "model_args": args,
                         "diffusion_args": {"schedule": "linear", "timesteps": T, "var_type": "fixed_large",
                                            "loss_type": "mse"},
                         "model": net.state_dict(), "ema": net.state_dict(), "step": 5, "config": {}},
                        os.path.join(path, checkpoint.FILENAME))
        return path

    def write_inputs(self):
        root = self.root
        g = np.random.default_rng(0)
        # a non-square picture (center-cropped) and its mask: white keeps the left half, black repaints the rest
        Image.fromarray(g.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(os.path.join(root, "picture.png"))
        mask = np.zeros((12, 16), np.uint8)
        mask[:, :8] = 255
        Image.fromarray(mask).save(os.path.join(root, "keep.png"))
        # CIFAR-10's test split as --data-dir reads it (for the diffusers folders, which do not name their data)
        os.makedirs(os.path.join(root, "cifar10"))
        np.savez(os.path.join(root, "cifar10", "test.npz"), x=g.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(4))
        # reference statistics with a zero covariance (see the module docstring), one per image size
        for size in (8, 32, 64):
            np.savez_compressed(os.path.join(root, f"ref{size}.npz"), mu=np.zeros(2048), sigma=np.zeros((2048, 2048)),
                                image_size=np.array(size))
        with warnings.catch_warnings():  # torch.jit's deprecation notice: evaluate.py reads TorchScript files
            warnings.simplefilter("ignore")
            torch.jit.script(TinyInception()).save(os.path.join(root, "inception.pt"))

    def paths(self, kind):
        size = SIZES.get(kind, tiny.IMAGE)
        j = lambda name: os.path.join(self.root, name)  # noqa: E731
        # the classifier of the network's images where there is one; the 64x64 network gets the 32x32 one (refused)
        return {"ckpt": self.ckpts[kind], "clf": self.ckpts["clf"] if size == tiny.IMAGE else self.classifier32,
                "picture": j("picture.png"), "mask": j("keep.png"), "cifar": j("cifar10"), "ref": j(f"ref{size}.npz"),
                "inception": j("inception.pt")}

    def run(self, script, args, cwd, real=False):
        """(exit status, stdout, stderr) of `python SCRIPT ARGS` in the folder cwd."""
        cwd = str(cwd)
        if real:
            p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=ENV,
                               capture_output=True, text=True, timeout=300)
            return p.returncode, p.stdout, p.stderr
        out, err = os.path.join(cwd, ".stdout"), os.path.join(cwd, ".stderr")
        self.server.stdin.write(json.dumps({"script": script, "args": args, "cwd": cwd, "stdout": out,
                                            "stderr": err}) + "\n")
        self.server.stdin.flush()
        line = self.server.stdout.readline()
        assert line, "the script server died"
        with open(out) as f, open(err) as e:
            return json.loads(line)["rc"], f.read(), e.read()

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(str(tmp_path_factory.mktemp("matrix")))
    yield w
    w.close()


# ----------------------------------------------------------------------------------------------------------------
# The cells
# ----------------------------------------------------------------------------------------------------------------

WROTE = re.compile(r"^wrote (.+?) \(\d+ [kM]B")


def check_output(path):
    """A file a command announced: it exists and loads as what its name says."""
    assert os.path.isfile(path), path
    if path.endswith(".png"):
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 0 and im.getbbox() is not None, path
    elif path.endswith(".npz"):
        with np.load(path) as arrays:
            x = arrays["x"]
            assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[0] >= 1 and x.shape[-1] == 3, (path, x.shape)
            for name in arrays.files:
                a = arrays[name]
                assert a.dtype in (np.uint8, np.int64), (path, name, a.dtype)
    elif path.endswith(".jsonl"):
        with open(path) as f:
            records = [json.loads(line) for line in f]
        assert records and all(isinstance(r["value"], float) and np.isfinite(r["value"]) for r in records), records
    elif path.endswith(".md"):
        with open(path) as f:
            text = f.read()
        assert "| S = 3" in text and "step None" not in text, text
    else:
        raise AssertionError(f"unexpected output {path}")


@pytest.mark.parametrize("command, kind, expected", list(cells()))
def test_cell(world, tmp_path, command, kind, expected):
    script, template, outputs = COMMANDS[command]
    paths = world.paths(kind)
    args = [a.format(**paths) for a in template]
    rc, out, err = world.run(script, args, tmp_path, real=(command, kind) in REAL)
    cmd = f"python {script} {' '.join(args)}"
    written = [os.path.join(tmp_path, m.group(1)) for m in map(WROTE.match, out.splitlines()) if m]
    if expected == OK:
        assert rc == 0 and "Traceback" not in err, (cmd, rc, err)
        assert {os.path.splitext(p)[1] for p in written} == set(outputs), (cmd, out)
        for path in written:
            check_output(path)
        # a run's step, or a word for weights that have none (a diffusers folder): never "step None"
        assert "step None" not in out, (cmd, out)
        if script == "evaluate.py":  # the result is printed as a JSON line too
            assert any(json.loads(line)["metric"] in ("fid", "bpd") for line in out.splitlines()
                       if line.startswith("{")), out
    else:
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}:"), (cmd, rc, err)
        assert not written, (cmd, out)


def test_the_next_command_sample_prints_runs(world, tmp_path):
    """sample.py ends with `next: python evaluate.py fid --samples NPZ`: that command, as printed and run from the same
    folder, scores the samples (here of a diffusers folder, whose samples go to samples/ under the working folder)."""
    paths = world.paths("hub")
    rc, out, err = world.run("sample.py", ["--checkpoint", paths["ckpt"], *FAST], tmp_path)
    assert rc == 0, err
    advice = next(line for line in out.splitlines() if line.startswith("next: "))
    argv = shlex.split(advice[len("next: "):])
    assert argv[:3] == ["python", "evaluate.py", "fid"], advice
    # with the cheap Inception and reference statistics of every FID cell here
    rc, out, err = world.run("evaluate.py", argv[2:] + [a.format(**paths) for a in FID], tmp_path)
    assert rc == 0, err
    record = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert record["n"] == 2 and record["samples"] == argv[4] and np.isfinite(record["value"]), record
