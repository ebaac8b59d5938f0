"""
toy2d.py: the datasets, the two-sample statistics, a short training run whose DDPM and DDIM samples must match the
data, and the command line (a smoke run that writes the figure; bad input -> one line, exit code 2).

THE THRESHOLD. MMD^2 (toy2d.mmd2: RBF kernels at h = 0.02 ... 0.5, unbiased) on moons with n = 1000 per sample,
measured while writing this test (torch 2.14.1, CPU):
    data vs data (two independent draws, 20 pairs)     mean -0.00004, sd 0.0032, max 0.011
    data vs N(0, I) noise (5 pairs)                    0.29 - 0.33
    data shifted by (0.05, 0.05) vs data               0.026 - 0.031   (0.05: about the moons' own thickness)
    moons twice as thick vs data                       0.005 - 0.006   (the statistic is coarse at that scale)
    the model below after 2000 steps of 256 (~10 s)    DDPM 0.004 / -0.001 / 0.006 / 0.007 (seeds 0-3)
                                                       DDIM 50: 0.002 / 0.003 / 0.007 / 0.010
    the same model after only 400 steps                DDPM 0.047 - 0.058, DDIM 0.038 - 0.061   (blurred: must fail)
A threshold of 0.03 sits ~9 sd above the data-vs-data floor, at a shift of the whole distribution by its own
thickness, 10x below noise, and 3x above the worst trained run: samples that pass are hard to tell from the data at
the scale of the moons' width (not of their thickness).
"""

import os
import subprocess
import sys

import pytest
import torch

import ddim
import toy2d

MMD_THRESHOLD = 0.03


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", toy2d.DATASETS)
def test_datasets_shapes_ranges_and_labels(name):
    x, y = toy2d.make_data(name, 5000, gen(0), with_labels=True)
    assert x.shape == (5000, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.shape == (5000,) and y.dtype == torch.long
    # roughly [-1, 1]^2: Gaussian tails may step slightly outside, nothing far
    assert x.abs().max().item() < 1.25
    assert (x.abs() <= 1).all(dim=1).double().mean().item() > 0.97
    # spread out over the square, not collapsed
    assert bool((x.std(dim=0) > 0.2).all()) and bool((x.max(dim=0).values - x.min(dim=0).values > 1.0).all())
    # every class present, and nothing else
    assert set(y.tolist()) == set(range(toy2d.NUM_CLASSES[name]))
    # reproducible from the generator; the unlabelled call gives the same points
    assert torch.equal(toy2d.make_data(name, 5000, gen(0)), x)


def test_dataset_geometry():
    # 8 Gaussians: class k sits at 0.8 (cos k pi/4, sin k pi/4)
    x, y = toy2d.make_data("gaussians8", 4000, gen(1), with_labels=True)
    angle = y.float() * torch.pi / 4
    centres = 0.8 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    assert (x - centres).norm(dim=1).max().item() < 0.3
    # checkerboard: only the squares where row + column is even, inside [-1, 1]^2
    x = toy2d.make_data("checkerboard", 4000, gen(2))
    col, row = ((x + 1) / 0.5).floor().long().unbind(dim=1)
    assert bool(((row + col) % 2 == 0).all()) and x.abs().max().item() <= 1.0
    with pytest.raises(ValueError, match="data"):
        toy2d.make_data("spiral", 10)


def test_two_sample_statistics():
    a, b = toy2d.make_data("moons", 1000, gen(3)), toy2d.make_data("moons", 1000, gen(4))
    noise = torch.randn(1000, 2, generator=gen(5))
    assert abs(toy2d.mmd2(a, b)) < 0.015 and abs(toy2d.energy_distance(a, b)) < 0.005
    assert toy2d.mmd2(a, noise) > 0.2 and toy2d.energy_distance(a, noise) > 0.05
    # symmetric, and sensitive to a small shift (see the module docstring)
    assert toy2d.mmd2(a, noise) == pytest.approx(toy2d.mmd2(noise, a), rel=1e-12)
    assert toy2d.mmd2(a + 0.05, b) > 0.015


def test_short_training_samples_match_the_data():
    d = toy2d.make_diffusion()                                     # T = 1000, cosine
    torch.manual_seed(0)
    model = toy2d.MLP()
    toy2d.train_eps_model(model, d, "moons", steps=2000, batch_size=256, generator=gen(0))
    n = 1000
    ref = toy2d.make_data("moons", n, gen(10))
    with torch.no_grad():
        x_ddpm = d.p_sample_loop(model, (n, 2), generator=gen(11))
        x_ddim = ddim.ddim_sample_loop(d.respace(50), model, (n, 2), generator=gen(12))
    floor = toy2d.mmd2(toy2d.make_data("moons", n, gen(13)), ref)
    ceiling = toy2d.mmd2(torch.randn(n, 2, generator=gen(14)), ref)
    assert floor < MMD_THRESHOLD < ceiling / 5
    assert toy2d.mmd2(x_ddpm, ref) < MMD_THRESHOLD, toy2d.mmd2(x_ddpm, ref)
    assert toy2d.mmd2(x_ddim, ref) < MMD_THRESHOLD, toy2d.mmd2(x_ddim, ref)


@pytest.mark.parametrize("cond", [False, True])
def test_cli_smoke_run_writes_the_figure(tmp_path, capsys, cond):
    """A tiny run of the whole command (T = 20, a few training steps): every sampler and the 4-step DDGAN, the forward
    row, with --cond the guidance row; the PNG has 7 columns of 160 x 174 panels (label strip + histogram) and 2 or 3
    rows."""
    from PIL import Image
    out = tmp_path / "fig.png"
    argv = ["--data", "gaussians8" if cond else "moons", "--steps", "5", "--diffusion-steps", "20", "--n-samples",
            "64", "--ddgan-steps", "3", "--out", str(out)] + (["--cond", "--classifier-steps", "5"] if cond else [])
    toy2d.main(argv)
    text = capsys.readouterr()
    assert "trained in" in text.out and "data vs data" in text.out and "DDPM 20" in text.out and "PC 20+1" in text.out
    assert "DDGAN 4" in text.out and "training the DDGAN: 100%" in text.err
    # progress is on by default, and the picture is announced
    assert "training the eps-model: 100%" in text.err and f"wrote {out} (" in text.out
    rows = 3 if cond else 2
    assert Image.open(out).size == (7 * (160 + 6) + 6, rows * (174 + 6) + 6)


def test_cli_writes_under_runs_by_default_never_over_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert toy2d.parse_args([]).out == os.path.join("runs", "toy2d", "toy2d_moons.png")
    assert toy2d.parse_args(["--data", "gaussians8", "--cond"]).out == os.path.join("runs", "toy2d",
                                                                                     "toy2d_gaussians8_cond.png")
    (tmp_path / "runs" / "toy2d" / "toy2d_moons.png").write_bytes(b"an earlier picture")
    with pytest.raises(SystemExit) as exc:
        toy2d.parse_args([])
    assert exc.value.code == 2 and "--force" in capsys.readouterr().err
    assert toy2d.parse_args(["--force"]).out == os.path.join("runs", "toy2d", "toy2d_moons.png")


def test_cli_diverged_training_writes_nothing(tmp_path, capsys):
    out = tmp_path / "fig.png"
    with pytest.raises(SystemExit) as exc:
        toy2d.main_guard(toy2d.main, ["--lr", "1e6", "--steps", "20", "--batch-size", "16", "--diffusion-steps", "20",
                                      "--n-samples", "8", "--out", str(out), "--no-progress"])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr: training diverged (loss nan)" in err[0], err
    # and NaN samples never become a picture, whatever made them: one check before anything is drawn
    x = torch.zeros(4, 2)
    x[1, 0] = float("nan")
    toy2d.check_finite({"DDPM 20": torch.zeros(4, 2)}, "cause")
    with pytest.raises(toy2d.UsageError, match=r"^--cfg-scales: too large \(non-finite samples from DDIM 10: 1;"):
        toy2d.check_finite({"DDPM 20": torch.zeros(4, 2), "DDIM 10": x}, "--cfg-scales: too large")


@pytest.mark.parametrize("argv,flag", [(["--data", "spiral"], "--data"), (["--steps", "0"], "--steps"),
                                       (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
                                       (["--p-uncond", "1.5"], "--p-uncond"), (["--p-uncond", "nan"], "--p-uncond"),
                                       (["--cfg-scales", "1,x"], "--cfg-scales"),
                                       (["--cfg-scales", "1,inf"], "--cfg-scales"),
                                       (["--classifier-scales", "nan"], "--classifier-scales"),
                                       (["--guide-class", "9", "--data", "gaussians8"], "--guide-class"),
                                       (["--threads", "0"], "--threads"), (["--n-samples", "1"], "--n-samples"),
                                       (["--ddgan-steps", "-1"], "--ddgan-steps"),
                                       (["--out", "/proc/forbidden/fig.png"], "--out"), (["--out", "@file/fig.png"], "--out"),
                                       (["--out", "@dir"], "--out")])
def test_cli_bad_input_is_one_line_and_exit_code_2(argv, flag, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    argv = [a.replace("@", str(tmp_path) + os.sep) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "fig.png")]
    with pytest.raises(SystemExit) as exc:
        toy2d.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err


def test_cli_bad_input_in_a_real_process(tmp_path):
    # an --out that cannot be written is refused before the training, not after it
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "file").write_text("")
    r = subprocess.run([sys.executable, "toy2d.py", "--out", str(tmp_path / "file" / "fig.png")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr and r.stdout == ""


def test_every_default_is_in_help():
    parser = toy2d.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in formatter._expand_help(action), action.option_strings


def test_ddgan_playground_learns_the_coarse_shape_of_the_moons():
    """The 4-step DDGAN of the picture, trained briefly. A GAN needs thousands of steps for the moons' thin shape
    (toy2d.train_ddgan: MMD^2 0.0024 after the CLI's 6000 steps of 256; still a blob at 0.10-0.15 after 800, measured),
    far beyond a test's budget, so this checks what 800 steps reach: the coarse shape, MMD^2 with only the wide kernels
    (h = 0.2, 0.5). Measured (n = 1000): untrained 0.79, N(0, I) noise 0.26, a Gaussian with the data's mean and
    covariance 0.04, data vs data 0.00, trained 0.061 (0.053-0.082 over seeds). A DDGAN whose generator ascends its
    loss instead (a flipped sign in ddgan.generator_loss) fails it. The fine shape is proven elsewhere:
    tests/test_ddgan.py shows the chain exact with an ideal generator."""
    import ddgan
    coarse = (0.2, 0.5)
    torch.manual_seed(0)
    d4, G, D = toy2d.make_ddgan(d_hidden=64)            # (the picture's D is 128 wide; 64 is cheaper here)
    ref = toy2d.make_data("moons", 1000, gen(10))
    with torch.no_grad():
        untrained = toy2d.mmd2(ddgan.ddgan_sample_loop(d4, G, (1000, 2), generator=gen(11)), ref, coarse)
    G = toy2d.train_ddgan(G, D, d4, "moons", steps=800, batch_size=256, generator=gen(0))
    with torch.no_grad():
        x = ddgan.ddgan_sample_loop(d4, G, (1000, 2), generator=gen(12))
    noise = toy2d.mmd2(torch.randn(1000, 2, generator=gen(13)), ref, coarse)
    trained = toy2d.mmd2(x, ref, coarse)
    assert trained < min(0.15, noise / 2, untrained / 5), (trained, noise, untrained)
