"""A diffusers folder is a file from the internet: every field pretrained.py reads and every weight tensor is checked.

Each case breaks one thing in a valid small folder (tests/test_pretrained.py's SMALL network, saved by diffusers'
save_pretrained) and runs `python sample.py --checkpoint FOLDER --sampler ddim --steps 2 --n 2 --no-progress` in an
empty working directory. It must end as every bad input does in this repository: exit code 2, ONE line on stderr
that starts with `error: --checkpoint:` and names the field (or tensor), no traceback, and no file written (neither
in the working directory, where the samples would go, nor in the folder).

The cases are many, so each runs sample.py's real entry point (runpy, as `python sample.py` does) in a forked child
of the test process: a real process with its own exit status and stderr, without a fresh interpreter's seconds of
importing torch. One case runs as a plain `python sample.py` in a fresh interpreter, and one valid folder runs to
completion through the same harness (exit 0, the two files written), so that "nothing written" means something.
"""

import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch
from safetensors.torch import load_file, save_file

import pretrained
from tests.test_pretrained import SMALL, write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample.py")
ARGS = ["--sampler", "ddim", "--steps", "2", "--n", "2", "--no-progress", "--device", "cpu"]
NAN, INF = float("nan"), float("inf")
CHILD_TIMEOUT = 60  # seconds; a refused case takes milliseconds
WEIGHTS = os.path.join("unet", "diffusion_pytorch_model.safetensors")


# -----------------------------------------------------------------------------
# the harness


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory):
    """The valid folder, built once: a repository layout (unet/, scheduler/) with safetensors weights."""
    root = tmp_path_factory.mktemp("valid")
    write_folder(str(root), SMALL, seed=5)
    # loaded once here, so that the forked children start warm: sample.py's modules imported, and torch's
    # first-call costs of building a network on the meta device paid (a tenth of a second per child otherwise)
    import sample  # noqa: F401, PLC0415
    pretrained.load_diffusers(root)
    return root


@pytest.fixture
def folder(tmp_path, valid_folder):
    """A copy of the valid folder for one case to break. The weights file is hard-linked (the cases that change it
    replace it with a new file, never write into it), the JSON files are copied."""
    dst = tmp_path / "model"

    def link_or_copy(src, dst):
        return os.link(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst)

    shutil.copytree(valid_folder, dst, copy_function=link_or_copy)
    return dst


def run_sample(folder, cwd):
    """`python sample.py --checkpoint folder ARGS` run in `cwd` by a forked child: (exit status, stderr)."""
    with tempfile.TemporaryFile("w+") as err, tempfile.TemporaryFile("w+") as out:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            signal.alarm(CHILD_TIMEOUT)  # a case that hangs is ended (SIGALRM, status -14), not the suite
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                os.chdir(cwd)
                sys.argv = ["sample.py", "--checkpoint", str(folder), *ARGS]
                runpy.run_path(SAMPLE, run_name="__main__")  # what `python sample.py` runs
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()  # as the interpreter would, exit status 1
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read()


def files_under(path):
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names)


def assert_refused(folder, tmp_path, name, run=run_sample):
    """sample.py on `folder` exits 2 with one `error: --checkpoint:` line naming `name`, and writes nothing."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = files_under(folder)
    rc, err = run(folder, cwd)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err[-3000:])
    assert lines[0].startswith("error: --checkpoint:") and name in lines[0], lines[0]
    assert files_under(cwd) == [] and files_under(folder) == before
    return lines[0]


def edit_json(path, **changes):
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **changes}, f)  # NaN and Infinity are written as Python's json writes them


def test_valid_folder_samples(folder, tmp_path):
    # the control: the harness on the unbroken folder samples and writes its two files into the working directory
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    rc, err = run_sample(folder, cwd)
    assert rc == 0, err[-3000:]
    written = files_under(cwd)
    assert len(written) == 2 and {os.path.splitext(f)[1] for f in written} == {".png", ".npz"}, written


# -----------------------------------------------------------------------------
# config.json (the UNet2DModel's): every field's type and range


def label(changes):
    """A case's test id: the fields changed and their new values, as JSON spells them."""
    return ",".join(f"{k}={json.dumps(v)}" for k, v in changes.items())[:60]


UNET_CASES = [
    # attention_head_dim: None (one head) or a positive integer dividing the attention levels' channels
    (dict(attention_head_dim=0), "attention_head_dim"),
    (dict(attention_head_dim="8"), "attention_head_dim"),
    (dict(attention_head_dim=-16), "attention_head_dim"),
    (dict(attention_head_dim=True), "attention_head_dim"),
    (dict(attention_head_dim=16.0), "attention_head_dim"),
    (dict(attention_head_dim=12), "attention_head_dim"),
    # block_out_channels: a non-empty list of positive integers, multiples of the first, the first of 32
    (dict(block_out_channels=[0, 0]), "block_out_channels"),
    (dict(block_out_channels=[]), "block_out_channels"),
    (dict(block_out_channels=None), "block_out_channels"),
    (dict(block_out_channels="32"), "block_out_channels"),
    (dict(block_out_channels=32), "block_out_channels"),
    (dict(block_out_channels=[32.0, 32.0]), "block_out_channels"),
    (dict(block_out_channels=[True, True]), "block_out_channels"),
    (dict(block_out_channels=[-32, -32]), "block_out_channels"),
    (dict(block_out_channels=[32, "32"]), "block_out_channels"),
    (dict(block_out_channels=[32, 48]), "block_out_channels"),
    # down_block_types / up_block_types: lists of known block names, one per level
    (dict(down_block_types=None), "down_block_types"),
    (dict(down_block_types="DownBlock2D"), "down_block_types"),
    (dict(down_block_types=["DownBlock2D", 1]), "down_block_types"),
    (dict(up_block_types=None), "up_block_types"),
    (dict(up_block_types=[1, 2]), "up_block_types"),
    (dict(up_block_types=[["AttnUpBlock2D"], "UpBlock2D"]), "up_block_types"),
    # in_channels / out_channels: integers in [1, 64], equal
    (dict(in_channels="3"), "in_channels"),
    (dict(in_channels="3", out_channels="3"), "in_channels"),
    (dict(in_channels=0, out_channels=0), "in_channels"),
    (dict(in_channels=True, out_channels=True), "in_channels"),
    (dict(in_channels=3.0, out_channels=3.0), "in_channels"),
    (dict(in_channels=10 ** 6, out_channels=10 ** 6), "in_channels"),
    (dict(out_channels=None), "out_channels"),
    # dropout: a number in [0, 1)
    (dict(dropout=NAN), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout="0.1"), "dropout"),
    (dict(dropout=None), "dropout"),
    (dict(dropout=10 ** 400), "dropout"),  # an integer of 401 digits: too large for a float
    # sample_size: an integer in [1, 2048] (or a square [h, w] of them) divisible by 2^(levels - 1)
    (dict(sample_size=65536), "sample_size"),
    (dict(sample_size=10 ** 9), "sample_size"),
    (dict(sample_size=0), "sample_size"),
    (dict(sample_size=-8), "sample_size"),
    (dict(sample_size="8"), "sample_size"),
    (dict(sample_size=True), "sample_size"),
    (dict(sample_size=8.0), "sample_size"),
    (dict(sample_size=None), "sample_size"),
    (dict(sample_size=[8, 16]), "sample_size"),
    (dict(sample_size=[8.0, 8.0]), "sample_size"),
    (dict(sample_size=[65536, 65536]), "sample_size"),
    (dict(sample_size=7), "sample_size"),
    (dict(sample_size=10 ** 400), "sample_size"),
    # layers_per_block: an integer in [1, 16]
    (dict(layers_per_block=True), "layers_per_block"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(layers_per_block=1.5), "layers_per_block"),
    (dict(layers_per_block="1"), "layers_per_block"),
    (dict(layers_per_block=10 ** 6), "layers_per_block"),
    # norm_eps: a number in (0, 1)
    (dict(norm_eps=NAN), "norm_eps"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(norm_eps=-1e-6), "norm_eps"),
    (dict(norm_eps="1e-6"), "norm_eps"),
    (dict(norm_eps=None), "norm_eps"),
    # DDPM's or ADM's choices: the integers 0 or 1, not booleans, not floats
    (dict(freq_shift=True), "freq_shift"),
    (dict(freq_shift=1.0), "freq_shift"),
    (dict(freq_shift=2), "freq_shift"),
    (dict(downsample_padding=True), "downsample_padding"),
    (dict(downsample_padding="0"), "downsample_padding"),
    # time_embedding_dim: None or 4 * block_out_channels[0] (an integer)
    (dict(time_embedding_dim="128"), "time_embedding_dim"),
    (dict(time_embedding_dim=128.0), "time_embedding_dim"),
    (dict(time_embedding_dim=64), "time_embedding_dim"),
    # the options our UNet computes one way: that value, of that type (0 is not false, true is not 1)
    (dict(norm_num_groups=16), "norm_num_groups"),
    (dict(norm_num_groups=32.0), "norm_num_groups"),
    (dict(norm_num_groups="32"), "norm_num_groups"),
    (dict(attn_norm_num_groups=32.0), "attn_norm_num_groups"),
    (dict(act_fn=None), "act_fn"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(flip_sin_to_cos=0), "flip_sin_to_cos"),
    (dict(center_input_sample=0), "center_input_sample"),
    (dict(mid_block_scale_factor=True), "mid_block_scale_factor"),
    (dict(add_attention=1), "add_attention"),
    (dict(class_embed_type=0), "class_embed_type"),
    # the UNet2DModel's own num_train_timesteps (unused here, still typed): None or an integer in [1, 100000]
    (dict(num_train_timesteps="1000"), "num_train_timesteps"),
    (dict(num_train_timesteps=10 ** 7), "num_train_timesteps"),
    (dict(_class_name=None), "_class_name"),
]


@pytest.mark.parametrize("changes, name", UNET_CASES, ids=[label(c) for c, _ in UNET_CASES])
def test_bad_unet_config(folder, tmp_path, changes, name):
    edit_json(folder / "unet" / "config.json", **changes)
    assert_refused(folder, tmp_path, name)


def test_every_unet_option_has_a_rule():
    # an option without a rule would be read unchecked. diffusers' defaults pass their rules, except sample_size
    # (None: a config must say it, we need the image size) and flip_sin_to_cos (true: DDPM's embedding is
    # [sin, cos], and the official configs say false)
    assert set(pretrained.UNET2D_RULES) == set(pretrained.UNET2D_DEFAULTS)
    failing = [k for k, (test, _) in pretrained.UNET2D_RULES.items() if not test(pretrained.UNET2D_DEFAULTS[k])]
    assert failing == ["sample_size", "flip_sin_to_cos"]
    # and DDPMScheduler's defaults pass theirs
    defaults = pretrained.SCHEDULER_DEFAULTS
    assert all(test(defaults[k]) for k, (test, _) in pretrained.SCHEDULER_RULES.items() if k in defaults)


# -----------------------------------------------------------------------------
# scheduler_config.json (the DDPMScheduler's)


SCHEDULER_CASES = [
    # num_train_timesteps: an integer in [1, 100000]
    (dict(num_train_timesteps=10 ** 7), "num_train_timesteps"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(num_train_timesteps=True), "num_train_timesteps"),
    (dict(num_train_timesteps=1000.0), "num_train_timesteps"),
    (dict(num_train_timesteps="1000"), "num_train_timesteps"),
    (dict(num_train_timesteps=None), "num_train_timesteps"),
    # beta_start, beta_end: numbers in (0, 1), beta_start <= beta_end
    (dict(beta_start=NAN), "beta_start"),
    (dict(beta_start=INF), "beta_start"),
    (dict(beta_start=0), "beta_start"),
    (dict(beta_start=-0.1), "beta_start"),
    (dict(beta_start="0.0001"), "beta_start"),
    (dict(beta_start=None), "beta_start"),
    (dict(beta_start=10 ** 400), "beta_start"),
    (dict(beta_end=NAN), "beta_end"),
    (dict(beta_end=1.0), "beta_end"),
    (dict(beta_end=2), "beta_end"),
    (dict(beta_end=True), "beta_end"),
    (dict(beta_start=0.02, beta_end=0.0001), "beta_start"),
    # trained_betas: None or a list of num_train_timesteps numbers in (0, 1)
    (dict(num_train_timesteps=10, trained_betas=[0.01] * 9 + [NAN]), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=[0.01] * 9 + [INF]), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=[0.01] * 9 + [1.0]), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=[0] * 10), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=["0.1"] * 10), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=[[0.1]] * 10), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=[True] * 10), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=[0.01] * 9), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas={"0": 0.1}), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas="0.1"), "trained_betas"),
    (dict(num_train_timesteps=10, trained_betas=0.1), "trained_betas"),
    # variance_type, beta_schedule, prediction_type: strings from the known sets
    (dict(variance_type=None), "variance_type"),
    (dict(variance_type=[]), "variance_type"),
    (dict(variance_type=1), "variance_type"),
    (dict(variance_type="learned"), "variance_type"),
    (dict(beta_schedule=[]), "beta_schedule"),
    (dict(beta_schedule=None), "beta_schedule"),
    (dict(beta_schedule=1), "beta_schedule"),
    (dict(beta_schedule="exponential"), "beta_schedule"),
    (dict(prediction_type=[]), "prediction_type"),
    (dict(prediction_type="v_prediction"), "prediction_type"),
    # booleans are booleans
    (dict(clip_sample="yes"), "clip_sample"),
    (dict(clip_sample=1), "clip_sample"),
    (dict(clip_sample=None), "clip_sample"),
    (dict(rescale_betas_zero_snr="false"), "rescale_betas_zero_snr"),
    (dict(rescale_betas_zero_snr=0), "rescale_betas_zero_snr"),
]


@pytest.mark.parametrize("changes, name", SCHEDULER_CASES, ids=[label(c) for c, _ in SCHEDULER_CASES])
def test_bad_scheduler_config(folder, tmp_path, changes, name):
    edit_json(folder / "scheduler" / "scheduler_config.json", **changes)
    assert_refused(folder, tmp_path, name)


# -----------------------------------------------------------------------------
# malformed JSON files


HUGE = object()  # a sparse file larger than any config (the size is checked before anything is read)


@pytest.mark.parametrize("file", ["unet/config.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("content", [
    "[1, 2]",           # not an object
    "null",
    "NaN",
    "{",                # invalid
    "",                 # empty
    "[" * 100000,       # nested deeper than the parser's recursion limit
    b"\xff\xfe{}",      # not UTF-8
    HUGE,
], ids=["array", "null", "NaN", "invalid", "empty", "deep", "not-utf8", "huge"])
def test_malformed_json(folder, tmp_path, file, content):
    path = folder / file
    if content is HUGE:
        with open(path, "wb") as f:
            f.truncate(64 * 2 ** 20)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    assert_refused(folder, tmp_path, os.path.basename(file))


# -----------------------------------------------------------------------------
# the weights: floating dtypes only, finite values only


def replace_weights(folder, name, change):
    """Rewrite the folder's weights with change(tensor) for `name` (a new file: the valid folder's stays as it is)."""
    path = str(folder / WEIGHTS)
    state = load_file(path)
    state[name] = change(state[name])
    os.remove(path)  # the hard link to the valid folder's file
    save_file(state, path)


def with_value(value, dtype=None):
    def change(w):
        w = w.clone() if dtype is None else w.to(dtype)
        w.view(-1)[3] = value
        return w
    return change


@pytest.mark.parametrize("name, change", [
    pytest.param("conv_in.weight", lambda w: w > 0, id="bool"),  # was cast silently to 0.0 / 1.0 and sampled
    pytest.param("conv_in.weight", lambda w: w.to(torch.complex64), id="complex64"),  # imaginary part dropped
    pytest.param("conv_in.weight", lambda w: (w * 100).to(torch.int64), id="int64"),
    pytest.param("conv_out.bias", lambda w: w.to(torch.uint8), id="uint8"),
    pytest.param("mid_block.attentions.0.to_q.weight", lambda w: w.to(torch.int8), id="int8"),
    pytest.param("conv_in.weight", lambda w: w.to(torch.float8_e4m3fn), id="float8_e4m3fn"),
    pytest.param("conv_in.weight", with_value(NAN), id="float32-NaN"),
    pytest.param("time_embedding.linear_1.bias", with_value(INF), id="float32-inf"),
    pytest.param("conv_out.weight", with_value(-INF, torch.float16), id="float16-minus-inf"),
    pytest.param("conv_out.weight", with_value(NAN, torch.bfloat16), id="bfloat16-NaN"),
    pytest.param("down_blocks.0.resnets.0.conv1.weight", with_value(1e300, torch.float64),
                 id="float64-1e300"),  # inf once in float32
])
def test_bad_weights(folder, tmp_path, name, change):
    replace_weights(folder, name, change)
    line = assert_refused(folder, tmp_path, name)
    assert "weights" in line


def test_bad_weights_in_a_torch_pickle(folder, tmp_path):
    # the .bin format (a torch pickle) is checked the same way
    state = load_file(str(folder / WEIGHTS))
    state["conv_in.weight"] = state["conv_in.weight"].to(torch.complex64)
    os.remove(folder / WEIGHTS)
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    assert_refused(folder, tmp_path, "conv_in.weight")


def write_bytes(data):
    return lambda path: open(path, "wb").write(data)


@pytest.mark.parametrize("file, write", [
    pytest.param("diffusion_pytorch_model.safetensors", write_bytes(b""), id="empty-safetensors"),
    pytest.param("diffusion_pytorch_model.safetensors", write_bytes(b"\x00" * 100), id="garbage-safetensors"),
    pytest.param("diffusion_pytorch_model.bin", write_bytes(b""), id="empty-bin"),  # an EOFError without a message
    pytest.param("diffusion_pytorch_model.bin", write_bytes(b"not a pickle"), id="garbage-bin"),
    pytest.param("diffusion_pytorch_model.bin", lambda path: torch.save([torch.zeros(2)], path), id="bin-list"),
    pytest.param("diffusion_pytorch_model.bin", lambda path: torch.save({0: torch.zeros(2)}, path),
                 id="bin-int-keys"),
    pytest.param("diffusion_pytorch_model.bin", lambda path: torch.save({"a": {"b": torch.zeros(2)}}, path),
                 id="bin-nested"),
])
def test_malformed_weights_file(folder, tmp_path, file, write):
    os.remove(folder / WEIGHTS)
    write(str(folder / "unet" / file))
    assert_refused(folder, tmp_path, file)


def test_valid_weights_in_other_float_dtypes_load(folder):
    # float16, bfloat16 and float64 files are read (as float32), not refused
    state = load_file(str(folder / WEIGHTS))
    dtypes = [torch.float16, torch.bfloat16, torch.float64]
    state = {k: v.to(dtypes[i % 3]) for i, (k, v) in enumerate(state.items())}
    os.remove(folder / WEIGHTS)
    save_file(state, str(folder / WEIGHTS))
    ckpt = pretrained.load_diffusers(folder)
    assert all(v.dtype == torch.float32 and math.isfinite(v.abs().max()) for v in ckpt["ema"].values())


# -----------------------------------------------------------------------------
# one case as a plain `python sample.py` in a fresh interpreter


def test_bad_config_from_a_fresh_interpreter(folder, tmp_path):
    edit_json(folder / "unet" / "config.json", in_channels="3", out_channels="3")

    def run(folder, cwd):
        proc = subprocess.run([sys.executable, SAMPLE, "--checkpoint", str(folder), *ARGS], cwd=cwd,
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        return proc.returncode, proc.stderr

    assert_refused(folder, tmp_path, "in_channels", run=run)
