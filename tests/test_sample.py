"""sample.py and sampling.py on tiny format-2 checkpoints (tests/tiny.py: random 8x8 U-Nets, no training; CPU).

What is pinned: every sampler runs and is seeded; guidance reaches the images; output names say what made them and
nothing is replaced without --force; grids have no empty tiles; --interpolate honours --n; --invert reads a CIFAR-10
test image by index and center-crops a non-square picture; every bad input is one line naming its flag, exit code 2,
before any work (no file written); a diverged sampler writes nothing; progress and announcements reach the user.
"""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import batches
import cli
import data
import ddim
import sample
import sampling
import schedules
import solvers
from tests import tiny

# a grid tile of an 8x8 image: enlarged 4x to 32 pixels for a readable grid (data.readable), then 2 of padding
TILE = 4 * 8 + 2


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TEST = os.path.join(ROOT, "..", "shared", "data", "cifar10", "test.npz")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs: an unconditional network, a class-conditional one (3 classes), a noisy classifier (3 classes)."""
    root = tmp_path_factory.mktemp("runs")
    # --edit's inputs: a random 8x8 picture, a mask keeping its left half (white = keep), a mask of the wrong size
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "pic.png")
    left = np.zeros((8, 8), np.uint8)
    left[:, :4] = 255
    Image.fromarray(left).save(root / "left.png")
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / "small.png")
    return {"pic": str(root / "pic.png"), "left": str(root / "left.png"), "small-mask": str(root / "small.png"),
            "uncond": tiny.write(str(root / "uncond")),
            "cond": tiny.write(str(root / "cond"), num_classes=3, seed=1),
            "clf": tiny.write(str(root / "clf"), kind="classifier", num_classes=3, seed=2),
            "learned": tiny.write(str(root / "learned"), learn_sigma=True, seed=3)}


def run(argv):
    """sample.py's command line in-process, as `python sample.py ...` runs it (cli.main_guard)."""
    return cli.main_guard(sample.main, ["--device", "cpu"] + argv)


def exits_2(argv, capsys, flag):
    """One line on stderr naming `flag`, exit code 2, no traceback."""
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    return err[0]


def images(out):
    return np.load(out + ".npz")["x"]


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,steps", [("ddim", "5"), ("ddpm", "8"), ("langevin", "4"), ("pc", "4"),
                                           ("dpmpp2m", "6"), ("heun", "4")])
def test_every_sampler_is_seeded(runs, tmp_path, sampler, steps):
    common = ["--checkpoint", runs["uncond"], "--sampler", sampler, "--steps", steps, "--n", "5", "--batch-size", "3",
              "--no-progress"]
    run(common + ["--out", str(tmp_path / "a")])
    run(common + ["--out", str(tmp_path / "b"), "--checkpoint", os.path.join(runs["uncond"], "ckpt.pt")])
    run(common + ["--out", str(tmp_path / "c"), "--seed", "1"])
    a = images(str(tmp_path / "a"))
    assert a.shape == (5, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, images(str(tmp_path / "b"))), "same seed, same images"
    assert not np.array_equal(a, images(str(tmp_path / "c"))), "another seed, other images"
    assert os.path.getsize(tmp_path / "a.png") > 0


def test_the_ode_solvers_walk_their_papers_schedules(runs, tmp_path, capsys):
    # DPM-Solver++ on logSNR-uniform steps, Heun on EDM's rho = 7 levels (P3), by default; --skip overrides either
    ckpt = sampling.checkpoint.load(runs["uncond"])
    abar = sampling.checkpoint.build_diffusion(ckpt["diffusion_args"]).alphas_cumprod
    for sampler, steps, kept, nfe in (("dpmpp2m", 6, schedules.logsnr_timesteps(abar, 6), 6),
                                      ("heun", 4, schedules.karras_timesteps(abar, 4), 7),
                                      ("heun", None, schedules.karras_timesteps(abar, 18), 35),
                                      ("dpmpp2m", 6, schedules.space_timesteps(100, 6, "quad"), 6)):
        skip = "quad" if kept == schedules.space_timesteps(100, 6, "quad") else None
        s = sampling.from_checkpoint(ckpt, sampling.Settings(sampler=sampler, steps=steps, skip=skip))
        assert s.diffusion.timestep_map.tolist() == kept and s.nfe() == nfe, (sampler, steps)
    # the menu runs the solvers' own loops: batch 0's x_T through solvers.py gives the same images
    for sampler, loop in (("dpmpp2m", solvers.dpmpp2m_sample_loop), ("heun", solvers.heun_sample_loop)):
        s = sampling.from_checkpoint(ckpt, sampling.Settings(sampler=sampler, steps=4))
        x, _ = s.generate(2, seed=3, show_progress=False)
        x_T = torch.randn((2, 3, 8, 8), generator=batches.batch_generator("cpu", 3, 0))
        assert np.array_equal(x, data.to_uint8_images(loop(s.diffusion, s.model, x_T.shape, noise=x_T))), sampler
    # --steps: 30 logSNR-uniform targets round to fewer distinct levels of T = 100: said, and the true count used
    out = str(tmp_path / "d")
    run(["--checkpoint", runs["uncond"], "--sampler", "dpmpp2m", "--steps", "30", "--n", "2", "--out", out,
         "--no-progress"])
    text = capsys.readouterr().out
    kept = len(schedules.logsnr_timesteps(abar, 30))
    assert kept < 30 and f"30 steps round to {kept} distinct levels" in text
    assert f"dpmpp2m on {kept} of 100 steps ({kept} NFE)" in text and images(out).shape == (2, 8, 8, 3)
    # the names: sampler + steps asked; the schedule only when it is not the sampler's own (a run of its own here)
    own = tiny.write(str(tmp_path / "own"))
    for extra in (["--sampler", "heun"], ["--sampler", "heun", "--skip", "uniform"], ["--skip", "karras"]):
        run(["--checkpoint", own, "--steps", "3", "--n", "2", "--no-progress"] + extra)
    names = sorted(os.listdir(os.path.join(own, "samples")))
    assert names == [f"{n}_seed0_n2.{e}" for n in ("ddim3_karras", "heun3", "heun3_uniform") for e in ("npz", "png")]


def test_output_names_say_what_made_them_and_two_commands_leave_two_files(runs, capsys):
    samples = os.path.join(runs["uncond"], "samples")
    run(["--checkpoint", runs["uncond"], "--steps", "5", "--eta", "1", "--skip", "quad", "--n", "4", "--no-progress"])
    run(["--checkpoint", runs["uncond"], "--steps", "5", "--classifier", runs["clf"], "--classifier-scale", "4",
         "--class", "2", "--n", "4", "--no-progress"])
    names = sorted(os.listdir(samples))
    assert names == ["ddim5_cg4_class2_seed0_n4.npz", "ddim5_cg4_class2_seed0_n4.png",
                     "ddim5_eta1_quad_seed0_n4.npz", "ddim5_eta1_quad_seed0_n4.png"], names
    out = capsys.readouterr().out
    # the printed lines say exactly what was written, and what to run next
    for name in names:
        assert f"wrote {os.path.join(samples, name)} (" in out
    assert f"next: python evaluate.py fid --samples {os.path.join(samples, 'ddim5_cg4_class2_seed0_n4.npz')}" in out


def test_an_existing_output_is_replaced_only_with_force(runs, tmp_path, capsys):
    out = str(tmp_path / "s")
    argv = ["--checkpoint", runs["uncond"], "--steps", "3", "--n", "2", "--out", out, "--no-progress"]
    run(argv)
    first = images(out)
    msg = exits_2(argv + ["--seed", "5"], capsys, "--out")
    assert "--force" in msg and np.array_equal(images(out), first), "refused, and the file left as it was"
    run(argv + ["--seed", "5", "--force"])
    assert not np.array_equal(images(out), first)


def test_guidance_reaches_the_images(runs, tmp_path):
    def draw(name, *extra):
        out = str(tmp_path / name)
        run(["--checkpoint", runs["uncond"], "--steps", "5", "--n", "6", "--out", out, "--no-progress", *extra])
        return np.load(out + ".npz")

    plain = draw("plain")
    for sampler in ("ddim", "ddpm"):
        guided = draw(f"cg_{sampler}", "--classifier", runs["clf"], "--classifier-scale", "50", "--class", "1",
                      "--sampler", sampler)
        assert (guided["y"] == 1).all()
    assert not np.array_equal(draw("cg", "--classifier", runs["clf"], "--classifier-scale", "50")["x"], plain["x"])
    y = draw("cg1", "--classifier", runs["clf"])["y"]
    assert (np.diff(y) >= 0).all() and "y" not in plain, "without --class the grid is laid out by class"
    # classifier-free guidance on the class-conditional run: w changes the images, the labels are --class
    out = str(tmp_path / "cfg")
    for w in ("0", "3"):
        run(["--checkpoint", runs["cond"], "--cfg-scale", w, "--class", "0", "--steps", "5", "--n", "4",
             "--out", out + w, "--no-progress"])
    a, b = np.load(out + "0.npz"), np.load(out + "3.npz")
    assert (a["y"] == 0).all() and not np.array_equal(a["x"], b["x"])


def test_grids_have_no_empty_tiles(runs, tmp_path):
    assert [data.grid_columns(n) for n in (1, 2, 6, 8, 9, 12, 64, 61)] == [1, 2, 3, 4, 3, 4, 8, 8]
    out = str(tmp_path / "g")
    run(["--checkpoint", runs["uncond"], "--steps", "2", "--n", "8", "--out", out, "--no-progress"])
    # torchvision's grid: 2 px padding around 8x8 tiles; 8 images -> 4 columns x 2 rows
    assert Image.open(out + ".png").size == (4 * TILE + 2, 2 * TILE + 2)


def test_interpolate_honours_n(runs, tmp_path, capsys):
    out = str(tmp_path / "i")
    run(["--checkpoint", runs["uncond"], "--interpolate", "--steps", "3", "--n", "16", "--out", out,
         "--no-progress"])
    x = images(out)
    assert x.shape == (16, 8, 8, 3)
    assert Image.open(out + ".png").size == (8 * TILE + 2, 2 * TILE + 2), "rows of 8 frames"
    run(["--checkpoint", runs["uncond"], "--interpolate", "--steps", "3", "--n", "20", "--no-progress"])
    assert "whole rows of 8: 16 images for --n 20" in capsys.readouterr().out
    assert images(os.path.join(runs["uncond"], "samples", "interpolate_ddim3_seed0_n16")).shape[0] == 16


@pytest.mark.skipif(not os.path.isfile(CIFAR_TEST), reason="CIFAR-10 test.npz not found")
def test_invert_a_cifar10_test_image_by_index(runs, tmp_path, capsys):
    run(["--checkpoint", runs["uncond"], "--invert", "cifar10:7", "--steps", "10", "--no-progress"])
    out = os.path.join(runs["uncond"], "samples", "invert_cifar10-7_ddim10")
    x = images(out)
    text = capsys.readouterr().out
    assert x.shape == (2, 8, 8, 3) and "PSNR" in text and "resized to the network's 8x8" in text
    # the first image is CIFAR-10 test image 7, resized to the network's 8x8
    import torchvision.transforms.functional as TF
    cifar, _ = data.load_cifar10(split="test")
    expected = TF.resize(TF.to_pil_image(cifar[7]), [8, 8], antialias=True)
    assert np.array_equal(x[0], np.asarray(expected))


def test_invert_center_crops_a_non_square_picture(runs, tmp_path, capsys):
    # 24x8: red side bands, a blue 8x8 centre: cropping keeps only blue, squashing would mix the red in
    pic = np.zeros((8, 24, 3), np.uint8)
    pic[:, :8, 0] = pic[:, 16:, 0] = 255
    pic[:, 8:16, 2] = 255
    Image.fromarray(pic).save(tmp_path / "wide.png")
    out = str(tmp_path / "inv")
    run(["--checkpoint", runs["uncond"], "--invert", str(tmp_path / "wide.png"), "--steps", "5", "--out", out,
         "--no-progress"])
    assert "is 24x8; using its central 8x8 square" in capsys.readouterr().out
    original = images(out)[0]
    assert (original[..., 0] == 0).all() and (original[..., 2] == 255).all()


def test_default_checkpoint_is_the_most_recently_written_diffusion_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny.write("runs/older")
    tiny.write("runs/newer")
    tiny.write("runs/newest-classifier", kind="classifier")
    os.utime("runs/older/ckpt.pt", (1, 1))
    os.utime("runs/newer/ckpt.pt", (2, 2))  # the classifier, written now, is the newest: it cannot be sampled
    run(["--steps", "2", "--n", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert "using runs/newer, the most recently written run under runs/ (also there: runs/older;" in out
    assert os.path.isfile("runs/newer/samples/ddim2_seed0_n2.npz")
    # runs/cifar10 is no exception: an older one loses to a newer run, a newer one wins
    tiny.write("runs/cifar10")
    os.utime("runs/cifar10/ckpt.pt", (0, 0))
    run(["--steps", "2", "--n", "2", "--seed", "1", "--no-progress"])
    assert "also there: runs/older, runs/cifar10" in capsys.readouterr().out
    assert os.path.isfile("runs/newer/samples/ddim2_seed1_n2.npz")
    assert not os.path.isfile("runs/cifar10/samples/ddim2_seed0_n2.npz")
    os.utime("runs/cifar10/ckpt.pt", (3, 3))
    run(["--steps", "2", "--n", "2", "--no-progress"])
    assert os.path.isfile("runs/cifar10/samples/ddim2_seed0_n2.npz")


def test_a_barely_trained_checkpoint_is_said_to_be_one(tmp_path, capsys):
    young, old = tiny.write(str(tmp_path / "young"), step=999), tiny.write(str(tmp_path / "old"), step=1000)
    run(["--checkpoint", young, "--steps", "2", "--n", "2", "--no-progress"])
    assert "has trained 999 steps only: expect noise" in capsys.readouterr().out
    run(["--checkpoint", old, "--steps", "2", "--n", "2", "--no-progress"])
    assert "expect noise" not in capsys.readouterr().out


def test_a_diverged_sampler_writes_nothing(runs, tmp_path, capsys):
    # finite but huge weights pass checkpoint.build_network and overflow in the forward pass
    huge = tiny.write(str(tmp_path / "huge"))
    ckpt = torch.load(os.path.join(huge, "ckpt.pt"), weights_only=True)
    ckpt["ema"] = {k: v * 1e15 for k, v in ckpt["ema"].items()}
    torch.save(ckpt, os.path.join(huge, "ckpt.pt"))
    msg = exits_2(["--checkpoint", huge, "--steps", "3", "--n", "2", "--no-progress"], capsys, "--checkpoint")
    assert "non-finite" in msg and "nothing was written" in msg
    assert not os.path.exists(os.path.join(huge, "samples", "ddim3_seed0_n2.png"))


# ----------------------------------------------------------------------------------------------------------------
# Editing: SDEdit, masks, translation
# ----------------------------------------------------------------------------------------------------------------

def test_edit_strength_0_returns_the_input_and_1_is_ordinary_sampling(runs, tmp_path, capsys):
    picture = np.asarray(Image.open(runs["pic"]))
    out = str(tmp_path / "e0")
    run(["--checkpoint", runs["uncond"], "--edit", runs["pic"], "--strength", "0", "--n", "2", "--out", out,
         "--no-progress"])
    assert "every output is the input itself" in capsys.readouterr().out
    saved = np.load(out + ".npz")
    assert np.array_equal(saved["input"][0], picture) and saved["x"].dtype == np.uint8
    assert np.array_equal(saved["x"], np.stack([picture] * 2)), "strength 0: the input, to the last bit"
    # strength 1: x_T ~ N(0, I), the first draw of batch 0's generator, as sampling's: the same images as sample.py
    run(["--checkpoint", runs["uncond"], "--edit", runs["pic"], "--strength", "1", "--edit-sampler", "ddim",
         "--steps", "3", "--n", "2", "--out", out + "1", "--no-progress"])
    run(["--checkpoint", runs["uncond"], "--steps", "3", "--n", "2", "--out", out + "s", "--no-progress"])
    assert "the input is ignored: ordinary sampling" in capsys.readouterr().out
    assert np.array_equal(images(out + "1"), images(out + "s"))


def test_edit_mask_keeps_the_known_region_exactly_and_is_seeded(runs, tmp_path, capsys):
    picture = np.asarray(Image.open(runs["pic"]))
    common = ["--checkpoint", runs["uncond"], "--edit", runs["pic"], "--mask", runs["left"], "--strength", "0.5",
              "--steps", "4", "--n", "3", "--batch-size", "2", "--no-progress"]
    run(common)
    name = os.path.join(runs["uncond"], "samples", "edit_pic_s0.5_mask-left_ddpm4_seed0_n3_bs2")
    run(common + ["--out", str(tmp_path / "again")])
    run(common + ["--out", str(tmp_path / "other"), "--seed", "1"])
    saved, x = np.load(name + ".npz"), images(name)
    # white (left half) keeps the input exactly; black (right half) is repainted
    assert x.shape == (3, 8, 8, 3) and np.array_equal(x[:, :, :4], np.stack([picture[:, :4]] * 3))
    assert (x[:, :, 4:] != picture[:, 4:]).mean() > 0.5
    assert np.array_equal(saved["mask"][0, :, :, 0], np.asarray(Image.open(runs["left"])))
    assert np.array_equal(x, images(str(tmp_path / "again"))), "same seed, same edits"
    assert not np.array_equal(x, images(str(tmp_path / "other"))), "another seed, other edits"
    assert not np.array_equal(x[0], x[1]), "the variations differ"
    # one row: input | mask | 3 edits, 10 px a tile
    assert Image.open(name + ".png").size == (5 * TILE + 2, 1 * TILE + 2)


def test_edit_with_a_classifier_translates_a_center_cropped_picture(runs, tmp_path, capsys):
    # 12x8: the central 8x8 square is the picture of the other tests; its sides are red
    wide = np.zeros((8, 12, 3), np.uint8)
    wide[:, :2, 0] = wide[:, 10:, 0] = 255
    wide[:, 2:10] = np.asarray(Image.open(runs["pic"]))
    Image.fromarray(wide).save(tmp_path / "wide.png")
    common = ["--checkpoint", runs["uncond"], "--edit", str(tmp_path / "wide.png"), "--edit-sampler", "ddim",
              "--strength", "0.6", "--steps", "5", "--n", "2", "--no-progress"]
    run(common + ["--out", str(tmp_path / "plain")])
    run(common + ["--classifier", runs["clf"], "--classifier-scale", "50", "--class", "1", "--out", str(tmp_path / "cg")])
    assert "is 12x8; using its central 8x8 square" in capsys.readouterr().out
    plain, guided = np.load(str(tmp_path / "plain.npz")), np.load(str(tmp_path / "cg.npz"))
    assert np.array_equal(guided["input"][0], wide[:, 2:10]) and (guided["y"] == 1).all() and "y" not in plain
    assert not np.array_equal(plain["x"], guided["x"]), "the classifier's gradient reaches the edits"


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, exit 2, before any work
# ----------------------------------------------------------------------------------------------------------------

def broken_checkpoints(root):
    """The checkpoints a user can break, each broken in one way."""
    paths = {}

    def edit(name, fn):
        path = tiny.write(str(root / name))
        ckpt = torch.load(os.path.join(path, "ckpt.pt"), weights_only=True)
        torch.save(fn(ckpt), os.path.join(path, "ckpt.pt"))
        paths[name] = path

    edit("plain-tensor", lambda c: torch.zeros(3))
    paths["corrupt"] = tiny.write(str(root / "corrupt"))
    with open(os.path.join(paths["corrupt"], "ckpt.pt"), "wb") as f:
        f.write(b"\x80not a checkpoint")
    edit("config-disagrees", lambda c: {**c, "model_args": {**c["model_args"], "ch": 32}})
    edit("missing-key", lambda c: {k: v for k, v in c.items() if k != "model_args"})
    edit("extra-key", lambda c: {**c, "ema": {**c["ema"], "extra.weight": torch.zeros(2)}})
    edit("nan-weights", lambda c: {**c, "ema": {k: v * float("nan") for k, v in c["ema"].items()}})
    return paths


BAD = [
    (["--cfg-scale", "nan"], "--cfg-scale"), (["--checkpoint", "@cond", "--cfg-scale", "nan"], "--cfg-scale"),
    (["--checkpoint", "@cond", "--cfg-scale", "inf"], "--cfg-scale"),
    (["--checkpoint", "@cond", "--cfg-scale", "-1"], "--cfg-scale"), (["--checkpoint", "@cond", "--class", "3"], "--class"),
    (["--classifier-scale", "nan"], "--classifier-scale"),
    (["--classifier", "@clf", "--classifier-scale", "nan"], "--classifier-scale"),
    (["--classifier", "@clf", "--classifier-scale", "inf"], "--classifier-scale"),
    (["--sampler", "pc", "--snr", "nan"], "--snr"), (["--sampler", "pc", "--snr", "0"], "--snr"),
    (["--sampler", "langevin", "--delta", "nan"], "--delta"), (["--sampler", "langevin", "--delta", "1"], "--delta"),
    (["--sampler", "langevin", "--delta", "-1"], "--delta"),
    (["--sampler", "langevin", "--langevin-steps", "0"], "--langevin-steps"),
    (["--sampler", "pc", "--corrector-steps", "-1"], "--corrector-steps"),
    (["--eta", "nan"], "--eta"), (["--eta", "100"], "--eta"), (["--eta", "-0.5"], "--eta"),
    (["--eta", "inf"], "--eta"), (["--sampler", "ddpm", "--eta", "1"], "--eta"),
    (["--sampler", "ddim", "--snr", "0.3"], "--snr"), (["--var", "small"], "--var"),
    (["--steps", "0"], "--steps"), (["--steps", "101"], "--steps"), (["--steps", "nan"], "--steps"),
    (["--n", "0"], "--n"), (["--n", "-3"], "--n"), (["--batch-size", "0"], "--batch-size"),
    (["--class", "1"], "--class"), (["--classifier", "@clf", "--class", "3"], "--class"),
    (["--classifier", "@clf", "--class", "-1"], "--class"),
    (["--classifier", "@uncond"], "--classifier"), (["--classifier", "/nonexistent/clf"], "--classifier"),
    (["--sampler", "euler"], "--sampler"), (["--sampler", "heun", "--eta", "1"], "--eta"),
    (["--sampler", "dpmpp2m", "--classifier", "@clf"], "--classifier"), (["--sampler", "heun", "--steps", "0"], "--steps"),
    (["--skip", "karras2"], "--skip"), (["--ch", "64"], "--ch"),
    (["--out", "/proc/forbidden/samples"], "--out"), (["--device", "tpu"], "--device"),
    (["--invert", "/nonexistent.png"], "--invert"), (["--invert", "cifar10:x"], "--invert"),
    (["--invert", "cifar10:1", "--eta", "1"], "--invert"), (["--interpolate", "--sampler", "ddpm"], "--sampler"),
    (["--interpolate", "--n", "1"], "--n"),
    (["--checkpoint", "/nonexistent/run"], "--checkpoint"), (["--checkpoint", "@clf"], "--checkpoint"),
    (["--checkpoint", "@plain-tensor"], "--checkpoint"), (["--checkpoint", "@corrupt"], "--checkpoint"), (["--checkpoint", "@config-disagrees"], "--checkpoint"),
    (["--checkpoint", "@missing-key"], "--checkpoint"), (["--checkpoint", "@extra-key"], "--checkpoint"),
    (["--checkpoint", "@nan-weights"], "--checkpoint"),
    (["--checkpoint", "@learned", "--sampler", "ddpm", "--var", "small"], "--var"),
    # test image 9999 is a truck (class 9): the 3-class run cannot take its label
    *([(["--checkpoint", "@cond", "--invert", "cifar10:9999"], "--class")] if os.path.isfile(CIFAR_TEST) else []),
    (["--edit", "@pic", "--strength", "1.5"], "--strength"), (["--edit", "@pic", "--strength", "nan"], "--strength"),
    (["--edit", "@pic", "--strength", "-0.1"], "--strength"), (["--edit", "/nonexistent.png"], "--edit"),
    (["--edit", "@pic", "--mask", "@small-mask"], "--mask"), (["--edit", "@pic", "--mask", "/nonexistent.png"], "--mask"),
    (["--edit", "@pic", "--interpolate"], "--edit"), (["--edit", "@pic", "--invert", "@pic"], "--edit"),
    (["--strength", "0.5"], "--strength"), (["--mask", "@left"], "--mask"), (["--edit-sampler", "ddim"], "--edit-sampler"),
    (["--edit", "@pic", "--sampler", "heun"], "--sampler"), (["--edit", "@pic", "--classifier", "@clf"], "--class"),
    (["--edit", "cifar10:7", "--classifier", "@clf"], "--class"),
    (["--edit", "@pic", "--edit-sampler", "ddpm", "--eta", "1"], "--eta"),
    (["--edit", "@pic", "--edit-sampler", "ddim", "--eta", "nan"], "--eta"),
]


@pytest.fixture()
def no_work(monkeypatch):
    """Sampling or inverting is the work: a bad input must be refused before either starts."""
    def work(*args, **kwargs):
        raise AssertionError("the work started before the input was checked")
    monkeypatch.setattr(sampling.Sampler, "generate", work)
    monkeypatch.setattr(sample, "invert", work)
    monkeypatch.setattr(sample, "edit", work)


@pytest.mark.parametrize("extra,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_before_any_work(runs, tmp_path, capsys, no_work, extra, flag):
    # "@name" stands for the path of a run (tiny or broken)
    paths = runs
    if any(a.startswith("@") and a[1:] not in runs for a in extra):
        paths = dict(runs, **broken_checkpoints(tmp_path))
    argv = ["--checkpoint", runs["uncond"], "--steps", "5", "--n", "2", "--out", str(tmp_path / "s"), "--no-progress"]
    argv += [paths[a[1:]] if a.startswith("@") else a for a in extra]
    exits_2(argv, capsys, flag)
    assert not os.path.exists(tmp_path / "s.png") and not os.path.exists(tmp_path / "s.npz")


def test_bad_input_in_a_real_process_has_no_traceback(runs):
    # one real process proves the `python sample.py` wiring (main_guard); the in-process tests above cover every input
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", runs["uncond"], "--cfg-scale", "nan"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert lines == ["error: --cfg-scale: must be a finite number in [0, 1e+06], got nan"], lines


# ----------------------------------------------------------------------------------------------------------------
# What the user sees
# ----------------------------------------------------------------------------------------------------------------

def test_progress_and_announcements_in_a_real_process(runs, tmp_path):
    out = str(tmp_path / "p")
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", runs["uncond"], "--steps", "4", "--n", "6",
                        "--batch-size", "4", "--out", out, "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    # the bar (on by default): images done / total, a rate, an ETA
    assert "sampling: 100%" in r.stderr and "6/6" in r.stderr and "img/s" in r.stderr and "ETA" in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"checkpoint {runs['uncond']}") and "step 10" in lines[0] and "parameters" in lines[0]
    # a 10-step run: the warning comes right after the checkpoint it is about
    assert lines[1].startswith(f"note: {runs['uncond']}") and "trained 10 steps only" in lines[1]
    assert lines[2] == "sampling 6 images: ddim on 4 of 100 steps, seed 0"
    assert lines[3].startswith(f"wrote {out}.png (") and lines[4].startswith(f"wrote {out}.npz (")
    assert lines[5] == f"next: python evaluate.py fid --samples {out}.npz"


def test_no_progress_turns_the_bar_off(runs, tmp_path, capsys):
    run(["--checkpoint", runs["uncond"], "--steps", "2", "--n", "2", "--out", str(tmp_path / "q"), "--no-progress"])
    assert capsys.readouterr().err == ""


class CountingBar:
    disable = False

    def __init__(self):
        self.n = 0
        self.seen = []

    def update(self, k):
        self.n += k
        self.seen.append(self.n)


def test_the_bar_moves_inside_a_batch():
    # 4 images on 5 levels: after the model's call at level i, (5 - i) / 5 of the batch is done
    calls = []
    bar = CountingBar()
    diffusion = sampling.checkpoint.build_diffusion({"schedule": "linear", "timesteps": 100}).respace(5)
    step_progress = cli.StepProgress(lambda x, t, **kw: calls.append(int(t[0])) or torch.zeros_like(x), diffusion, bar)
    step_progress.start(4)
    ddim.ddim_sample_loop(diffusion, step_progress, (4, 2), noise=torch.zeros(4, 2))
    step_progress.finish()
    assert calls == sorted(diffusion.timestep_map.tolist(), reverse=True)
    assert bar.seen == [1, 2, 3, 4] and bar.n == 4  # int(4 * k / 5) for k = 1..5: 0, 1, 2, 3, 4


def test_every_default_is_in_help():
    for parser in (sample.build_parser(),):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in formatter._expand_help(action), action.option_strings


@pytest.mark.parametrize("name", list(sampling.SAMPLERS))
def test_the_menu_says_what_each_loop_takes(name):
    # the menu is written out by hand (no reflection in the product): here its entries are held to the loops' own
    # signatures, so an entry can neither pass a keyword its loop lacks nor hide a setting the loop has
    entry = sampling.SAMPLERS[name]
    params = inspect.signature(entry.loop).parameters
    keywords = {f.metadata["keyword"] or f.name for f in sampling.SETTINGS if f.name in entry.options}
    assert keywords <= set(params), (name, keywords - set(params))
    settable = {f.metadata["keyword"] or f.name for f in sampling.SETTINGS} & set(params)
    assert settable == keywords, (name, settable - keywords)
    assert entry.guided == ("cond_fn" in params)


def test_a_new_sampler_is_one_line(runs, monkeypatch):
    # a loop with the menu's signature and no options of its own (not even clip_denoised): the menu passes it what its
    # entry says it takes, no more
    def euler_loop(diffusion, model, shape, noise=None, model_kwargs=None, generator=None, progress=False):
        x = noise
        for i in range(diffusion.num_timesteps - 1, -1, -1):
            t = torch.full((x.shape[0],), i, dtype=torch.long)
            eps = diffusion.p_mean_variance(model, x, t, True, model_kwargs)["eps"]
            x = x - 0.01 * eps
        return x

    monkeypatch.setitem(sampling.SAMPLERS, "euler", sampling.Entry(euler_loop))
    ckpt = sampling.checkpoint.load(runs["uncond"])
    s = sampling.from_checkpoint(ckpt, sampling.Settings(sampler="euler", steps=3))
    x, y = s.generate(2, show_progress=False)
    assert x.shape == (2, 8, 8, 3) and y is None and s.name(0) == "euler3_seed0"
    with pytest.raises(cli.UsageError, match="--eta: the euler sampler has no such setting"):
        sampling.from_checkpoint(ckpt, sampling.Settings(sampler="euler", steps=3, eta=1.0))
    with pytest.raises(cli.UsageError, match="--classifier: the euler sampler takes no classifier guidance"):
        sampling.from_checkpoint(ckpt, sampling.Settings(sampler="euler", steps=3),
                                 classifier=sampling.checkpoint.load(runs["clf"]))


# ----------------------------------------------------------------------------------------------------------------
# DDGAN (Xiao et al. 2022): its generator draws only with its own 4-step chain
# ----------------------------------------------------------------------------------------------------------------

def ddgan_run(path, seed=4):
    """A tiny kind-"ddgan" run as train.py --task ddgan writes it: a random UNet(latent_dim=4) generator on the
    4-step vp diffusion (the discriminator is not needed to sample)."""
    args = dict(tiny.NET, latent_dim=4)
    G = tiny.randomize(sampling.checkpoint.UNet(**args), seed)
    os.makedirs(path, exist_ok=True)
    sampling.checkpoint.save({"format": 2, "kind": "ddgan", "model_args": args,
                              "diffusion_args": {"schedule": "vp", "timesteps": 4}, "model": G.state_dict(),
                              "ema": G.state_dict(), "step": 10, "config": {"dataset": "synthetic"}},
                             os.path.join(path, "ckpt.pt"))
    return path


def test_ddgan_sampler_is_seeded_and_draws_images_in_range(runs, tmp_path, monkeypatch):
    gan = ddgan_run(str(tmp_path / "gan"))
    floats, calls = [], []
    to_uint8 = data.to_uint8_images
    monkeypatch.setattr(data, "to_uint8_images", lambda x: floats.append(x.clone()) or to_uint8(x))
    common = ["--checkpoint", gan, "--sampler", "ddgan", "--n", "5", "--batch-size", "3", "--no-progress"]
    run(common + ["--out", str(tmp_path / "a")])
    run(common + ["--out", str(tmp_path / "b")])
    run(common + ["--out", str(tmp_path / "c"), "--seed", "1"])
    a = images(str(tmp_path / "a"))
    assert a.shape == (5, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, images(str(tmp_path / "b"))), "same seed, same images"
    assert not np.array_equal(a, images(str(tmp_path / "c"))), "another seed, other images"
    x = torch.cat(floats[:2])  # the first command's two batches, as the chain returned them
    assert torch.isfinite(x).all() and x.abs().max() <= 1 and x.std() > 0.01, (x.min(), x.max(), x.std())
    # 4 NFE: the generator is called once per step of the chain, with a latent z
    G = sampling.from_checkpoint(sampling.checkpoint.load(gan), sampling.Settings(sampler="ddgan"))
    assert G.steps == 4 and G.name(0) == "ddgan4_seed0"
    real = G.model.forward
    monkeypatch.setattr(G.model, "forward", lambda x, t, z=None: calls.append((int(t[0]), z)) or real(x, t, z=z))
    G.generate(2, show_progress=False)
    assert [(t, tuple(z.shape)) for t, z in calls] == [(3, (2, 4)), (2, (2, 4)), (1, (2, 4)), (0, (2, 4))]
    # a fresh z ~ N(0, I) at every step (DDGAN eq. 6), not a constant
    z = torch.stack([z for _, z in calls])
    assert all(not torch.equal(z[0], z[i]) for i in (1, 2, 3)) and 0.3 < z.std() < 3, z


@pytest.mark.parametrize("which, extra, flag", [
    ("gan", ["--sampler", "ddim"], "--sampler"),        # a generator is not an eps-model
    ("gan", ["--sampler", "ddpm"], "--sampler"),
    ("uncond", ["--sampler", "ddgan"], "--sampler"),    # an eps-model is not a generator
    ("gan", ["--sampler", "ddgan", "--steps", "2"], "--steps"),  # the chain is the T steps G learned
    ("gan", ["--sampler", "ddgan", "--eta", "1"], "--eta"),
])
def test_ddgan_and_other_samplers_refuse_each_others_checkpoints(runs, tmp_path, capsys, which, extra, flag):
    path = ddgan_run(str(tmp_path / "gan")) if which == "gan" else runs[which]
    line = exits_2(["--checkpoint", path, "--out", str(tmp_path / "x")] + extra, capsys, flag)
    assert not os.path.exists(tmp_path / "x.png"), line
