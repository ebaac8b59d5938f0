"""Seeing a model learn on a CPU: the digits data, recipes by name, a progress bar that tells the truth, TensorBoard.

Tiny networks and few steps, in process (tests/tiny.run), as test_train.py's own."""

import json
import os
import signal
import sys
import time

import pytest
import torch

import data
import recipes
import runs
import train
from tests import tiny

TINY = ["--dataset", "synthetic", "--synthetic-n", "32", "--image-size", "8", "--ch", "8", "--ch-mult", "1,2",
        "--num-res-blocks", "1", "--attn", "", "--batch-size", "4", "--diffusion-steps", "20", "--warmup", "2",
        "--log-every", "4", "--save-every", "8", "--sample-every", "0", "--n-sample", "0", "--no-progress",
        "--device", "cpu"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------------
# --dataset digits
# ----------------------------------------------------------------------------------------------------------------

def test_digits_are_real_grey_16x16_and_never_flipped():
    pytest.importorskip("sklearn")
    x, y = data.load_digits(16, "train")
    xt, yt = data.load_digits(16, "test")
    assert x.shape == (1500, 1, 16, 16) and xt.shape == (297, 1, 16, 16) and x.dtype == torch.uint8
    assert sorted(y.unique().tolist()) == list(range(10)) and len(y) + len(yt) == 1797
    assert x.min() == 0 and x.max() > 200  # paper -> -1, ink -> +1 under data.to_float
    assert not data.flips("digits") and data.flips("cifar10")  # a mirrored 2 is not a digit
    with pytest.raises(data.DataError, match="--image-size"):
        data.load_digits(12)
    # small images are enlarged in grids (nearest neighbour), CIFAR-10's stay 1:1
    assert data.readable(x[:2]).shape == (2, 1, 32, 32) and data.readable(torch.zeros(1, 3, 32, 32)).shape[-1] == 32


def test_the_digits_recipe_trains_a_one_channel_model(tmp_path):
    pytest.importorskip("sklearn")
    out = str(tmp_path / "d")
    argv = ["--recipe", "digits", "--ch", "8", "--steps", "3", "--batch-size", "8", "--log-every", "1",
            "--n-sample", "4", "--no-progress", "--device", "cpu", "--diffusion-steps", "20", "--out", out]
    assert tiny.run(train, argv) == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["in_channels"] == 1 and ckpt["model_args"]["image_size"] == 16
    assert list(ckpt["model_args"]["ch_mult"]) == [1, 2] and not ckpt["model_args"]["attn_resolutions"]
    cfg = ckpt["config"]
    assert cfg["dataset"] == "digits" and cfg["recipe"] == "digits" and cfg["lr"] == 1e-3 and cfg["ch"] == 8
    from PIL import Image
    assert Image.open(os.path.join(out, "samples.png")).size[0] >= 2 * 32  # 4 enlarged 16x16 images


def test_sampling_a_digits_run_points_to_the_digit_classifier_and_edits_held_out_digits(tmp_path):
    """sample.py on a digits run (a real subprocess) ends with `next: python benchmarks/digits_score.py NPZ` (FID's
    Inception would refuse 1-channel 16x16 images), and that line, run as printed, scores the samples; --edit and
    --invert take digits:N."""
    pytest.importorskip("sklearn")
    import shlex
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "d")
    assert tiny.run(train, ["--recipe", "digits", "--ch", "8", "--steps", "2", "--batch-size", "8", "--n-sample", "0",
                            "--no-progress", "--device", "cpu", "--diffusion-steps", "20", "--out", out]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--checkpoint", out, "--sampler", "ddim",
                           "--steps", "2", "--n", "4", "--no-progress"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    advice = [line for line in done.stdout.splitlines() if line.startswith("next: ")]
    assert len(advice) == 1 and advice[0].startswith("next: python benchmarks/digits_score.py "), done.stdout
    argv = shlex.split(advice[0][len("next: "):])
    scored = subprocess.run([sys.executable] + argv[1:], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert scored.returncode == 0 and argv[2] in scored.stdout, scored.stderr
    # --edit / --invert digits:N: a held-out digit, as cifar10:N is a CIFAR-10 test image; out of range: one line
    for mode, written in (("--edit", "edit_digits-7_s0.5"), ("--invert", "invert_digits-3")):
        spec = "digits:7" if mode == "--edit" else "digits:3"
        argv = [sys.executable, os.path.join(root, "sample.py"), "--checkpoint", out, mode, spec, "--steps", "2",
                "--no-progress"] + (["--n", "2"] if mode == "--edit" else [])
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert any(f.startswith(written) and f.endswith(".png") for f in os.listdir(os.path.join(out, "samples")))
        if mode == "--invert":
            assert f"inverting digits:3 (a {int(data.load_digits(16, 'test')[1][3])})" in done.stdout
    done = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--checkpoint", out, "--edit",
                           "digits:297"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == ("error: --edit: digits:N takes N in 0..296 (the test "
                                                            "set), got 297"), done.stderr


# ----------------------------------------------------------------------------------------------------------------
# Recipes and --config
# ----------------------------------------------------------------------------------------------------------------

def parsed(argv):
    parser = train.build_parser()
    args, given = parser.parse_args(argv), runs.given_flags(parser, argv)
    args.recipe = recipes.apply(args, given, runs.dests(parser), runs.RUNTIME)
    return args


def test_a_recipe_fills_what_is_not_typed_and_help_lists_them(capsys):
    args = parsed(["--recipe", "digits", "--lr", "3e-4"])
    assert (args.dataset, args.ch, args.ch_mult, args.lr, args.max_minutes) == ("digits", 32, "1,2", 3e-4, 5.0)
    assert parsed([]).recipe == "ddpm-cifar10" and parsed([]).ch == 128
    ddgan_args = parsed(["--task", "ddgan"])  # --task ddgan alone: DDGAN's recipe
    assert ddgan_args.recipe == "ddgan-cifar10" and ddgan_args.diffusion_steps == 4
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens
    assert all(name + ":" in shown for name in recipes.RECIPES)


def test_a_bad_recipe_or_config_is_one_line(tmp_path, capsys):
    assert tiny.run(train, ["--recipe", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--recipe" in err and "digits" in err and "Traceback" not in err
    assert tiny.run(train, ["--config", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_starts_a_new_run_with_a_runs_flags(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    assert tiny.run(train, TINY + ["--steps", "2", "--lr", "7e-4", "--out", first]) == 0
    args = parsed(["--config", os.path.join(first, "config.json"), "--steps", "5", "--out", second])
    assert (args.lr, args.ch, args.dataset, args.steps, args.out, args.resume) == (7e-4, 8, "synthetic", 5, second,
                                                                                   False)


# ----------------------------------------------------------------------------------------------------------------
# Progress that tells the truth
# ----------------------------------------------------------------------------------------------------------------

def test_the_bar_counts_to_the_time_budget_and_shows_the_loss_early(tmp_path, monkeypatch):
    seen = []
    real_show = runs.Run.show

    def show(run, bar, training, loss_sum):
        real_show(run, bar, training, loss_sum)
        seen.append((run.step, bar.total, bar.postfix))

    monkeypatch.setattr(runs.Run, "show", show)
    out = str(tmp_path / "r")
    assert tiny.run(train, TINY + ["--steps", "1000000", "--max-minutes", "0.04", "--log-every", "1000",
                                   "--out", out]) == 0
    # the loss is on the bar from step 1 (no log line before step 1000), and the total is what 2.4 s allow
    assert "loss" in seen[0][2] and "running" in seen[0][2]
    assert seen[-1][1] < 10 * seen[-1][0] + 50  # an estimate from the step time: near, never 1,000,000


def test_ctrl_c_never_draws_a_grid_and_time_short_still_draws_the_promised_one(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r")
    grids = []
    monkeypatch.setattr(runs.Run, "sample_grid", lambda run, training, final: grids.append(run.step))
    real_end = runs.Run.end_of_step

    def end_of_step(run):  # a SIGINT during step 3, before any checkpoint or grid
        if run.step == 3:
            run.signals.signum = signal.SIGINT
        return real_end(run)

    monkeypatch.setattr(runs.Run, "end_of_step", end_of_step)
    assert tiny.run(train, TINY + ["--steps", "50", "--n-sample", "4", "--out", out]) == 130
    assert grids == [] and os.path.isfile(os.path.join(out, "ckpt.pt"))
    # a promised grid with almost no time left: 4 images with fewer DDIM steps, said, rather than none
    monkeypatch.setattr(runs.Run, "end_of_step", real_end)
    monkeypatch.undo()
    monkeypatch.setattr(runs.Run, "extra_budget", lambda run, final: 1e-9)
    out2 = str(tmp_path / "s")
    assert tiny.run(train, TINY + ["--steps", "2", "--n-sample", "16", "--out", out2]) == 0
    said = capsys.readouterr().out
    assert "time is short: 4 images" in said and os.path.isfile(os.path.join(out2, "samples.png"))


def test_a_short_run_keeps_time_for_a_full_final_grid_when_it_is_cheap():
    # the digits recipe on a CPU: 64 images x DDIM-50 cost ~2 s of a 5-minute budget, so the whole grid is reserved;
    # CIFAR-10 on a CPU: the same grid would take minutes, so only the least grid (4 images, DDIM-10) is
    from types import SimpleNamespace
    run = lambda step_s, minutes: SimpleNamespace(  # noqa: E731
        args=SimpleNamespace(task="diffusion", n_sample=64, max_minutes=minutes),
        image_step_s=lambda: step_s / (3 * 64))
    full = lambda step_s: 64 * runs.GRID_STEPS * step_s / 192  # noqa: E731 (a DDIM step: 1/3 of a training step)
    least = lambda step_s: runs.LEAST_GRID * runs.LEAST_GRID_STEPS * step_s / 192  # noqa: E731
    cheap, dear = runs.Run.least_grid_s(run(0.15, 5)), runs.Run.least_grid_s(run(45.0, 5))
    assert full(0.15) < cheap <= 0.05 * 5 * 60  # room for the whole grid, within 5% of the budget
    assert least(45.0) <= dear < full(45.0) and dear <= 0.05 * 5 * 60 + least(45.0)


def test_a_smaller_final_grid_never_replaces_a_larger_samples_png(tmp_path, monkeypatch, capsys):
    # full grids at steps 2 and 4, then time is short at the end (step 5): its 4 images go to samples_0000005.png and
    # samples.png keeps the 16 of step 4
    monkeypatch.setattr(runs.Run, "extra_budget", lambda run, final: 1e-9 if final else 1e9)
    out = str(tmp_path / "r")
    assert tiny.run(train, TINY + ["--steps", "5", "--sample-every", "2", "--n-sample", "16", "--out", out]) == 0
    said = capsys.readouterr().out
    assert "time is short: 4 images" in said and "samples.png keeps the 16 images of step 4" in said
    from PIL import Image
    sizes = {f: Image.open(os.path.join(out, f)).size for f in ("samples.png", "samples_0000004.png",
                                                               "samples_0000005.png")}
    assert sizes["samples.png"] == sizes["samples_0000004.png"] != sizes["samples_0000005.png"], sizes
    with open(os.path.join(out, "samples.png"), "rb") as a, open(os.path.join(out, "samples_0000004.png"), "rb") as b:
        assert a.read() == b.read()


def test_elapsed_s_is_cumulative_across_resume(tmp_path):
    out = str(tmp_path / "r")
    assert tiny.run(train, TINY + ["--steps", "8", "--out", out]) == 0
    before = metrics(out)[-1]["elapsed_s"]
    time.sleep(0.2)
    assert tiny.run(train, TINY + ["--steps", "12", "--resume", "--out", out]) == 0
    after = [r for r in metrics(out) if r["step"] > 8]
    assert after and all(r["elapsed_s"] >= before for r in after)


# ----------------------------------------------------------------------------------------------------------------
# --tensorboard
# ----------------------------------------------------------------------------------------------------------------

def test_tensorboard_holds_the_metrics_and_the_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "r")
    assert tiny.run(train, TINY + ["--steps", "8", "--n-sample", "4", "--tensorboard", "--out", out]) == 0
    events = EventAccumulator(out, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    logged = metrics(out)
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in logged]
    assert [round(e.value, 4) for e in events.Scalars("loss")] == [round(r["loss"], 4) for r in logged]
    assert "elapsed_s" in events.Tags()["scalars"] and events.Images("samples")


def test_tensorboard_missing_is_one_line_before_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    out = str(tmp_path / "r")
    assert tiny.run(train, TINY + ["--steps", "2", "--tensorboard", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and "--tensorboard" in err and not os.path.exists(out)


def test_digits_score_recognises_real_digits_and_not_noise(tmp_path, capsys):
    """benchmarks/digits_score.py: real held-out digits, pooled back to 8x8, get a confident label; uniform noise less."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import digits_score
    x, _ = data.load_digits(16, "test")
    path = str(tmp_path / "real.npz")
    import numpy as np
    np.savez(path, x=x.permute(0, 2, 3, 1).numpy())  # sample.py's layout: uint8 [N, H, W, C]
    digits_score.main([path])
    rows = {line.split("|")[1].strip(): line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "images" not in line}
    real, noise, ours = (float(rows[k][3]) for k in ("real (held out)", "uniform noise", path))
    assert ours == real and real > noise and float(rows[path][4]) > 0.9  # the same images, all ten digits
