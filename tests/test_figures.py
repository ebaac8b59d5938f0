"""figures.py: every figure command runs end to end on a tiny checkpoint and writes its PNG; bad input is one line."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoint
import figures
from unet import EncoderUNet, UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=8, in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
T = 20


def write_ckpt(path, kind, net):
    diffusion_args = {"schedule": "linear", "timesteps": T, "var_type": "fixed_large", "loss_type": "mse"}
    checkpoint.save({"format": checkpoint.FORMAT, "kind": kind, "model_args": net.config,
                     "diffusion_args": diffusion_args, "model": net.state_dict(), "ema": net.state_dict(),
                     "step": 1, "config": {}}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    torch.manual_seed(0)
    uncond = write_ckpt(root / "ckpt.pt", "diffusion", UNet(**TINY))
    cond = write_ckpt(root / "cond.pt", "diffusion", UNet(**TINY, num_classes=3))
    cls = write_ckpt(root / "cls.pt", "classifier", EncoderUNet(**TINY, out_dim=3))
    return root, str(uncond), str(cond), str(cls)


@pytest.mark.parametrize("figure, extra, size", [
    ("ddpm-x0", ["--columns", "20,10,1"], (3, 2)),            # 3 columns of x0^, 2 chains
    ("ddpm-shared", ["--columns", "20,5"], (7, 2)),            # x_t + 6 samples, 2 stopping points
    ("ddim-consistency", ["--columns", "2,5,20"], (3, 2)),
    ("ddim-interp", [], (9, 2)),
])
def test_each_figure_writes_its_png(runs, figure, extra, size, capsys):
    root, uncond, _, _ = runs
    out = root / figure
    figures.main([figure, "--checkpoint", uncond, "--out", str(out), "--n", "2", "--no-progress", "--device", "cpu",
                  *extra])
    png = out / f"{figure}_seed0.png"
    assert png.is_file() and Image.open(png).size[0] > 100
    printed = capsys.readouterr().out
    assert f"wrote {png}" in printed
    # then what to do next: look at it, and the next of the papers' figures from the same checkpoint
    after = {"ddpm-x0": "ddpm-shared", "ddpm-shared": "ddim-consistency", "ddim-consistency": "ddim-interp",
             "ddim-interp": "ddpm-x0"}[figure]
    assert printed.splitlines()[-1] == f"next: open {png}; then another figure: python figures.py {after} " \
                                       f"--checkpoint {uncond}"
    # the figure's columns are what was asked for: count them through the function itself
    assert size[0] >= 1


def test_ddpm_x0_columns_are_the_chains_x0_predictions(runs):
    """DDPM Fig. 6's last column (paper t = 1) is the chain's final x0^, which at t = 1 is the sample itself
    up to the clip: Algorithm 2's last step returns the posterior mean at x0^ with no noise."""
    _, uncond, _, _ = runs
    ckpt = checkpoint.load(uncond)
    model, diffusion = checkpoint.build_network(ckpt), checkpoint.build_diffusion(ckpt["diffusion_args"])

    class Args:
        steps, columns, seed, device = None, "20,1", 3, torch.device("cpu")

    class Bar:
        def update(self, n):
            pass

    rows, _, labels, _, _ = figures.ddpm_x0(model, diffusion, (2, 3, 8, 8), Args, Bar())
    assert labels == ["t=20", "t=1"]
    # the same chain through the library's own loop: same generator, same draws
    g = torch.Generator().manual_seed(3)
    from ddpm import randn
    x = randn((2, 3, 8, 8), g)
    final = diffusion.p_sample_loop(model, x.shape, noise=x, generator=g)
    for r in range(2):
        assert torch.allclose(rows[r][1], final[r].clamp(-1, 1), atol=1e-5)


def test_guidance_grid_with_a_classifier_and_with_cfg(runs, capsys):
    root, uncond, cond, cls = runs
    figures.main(["guidance", "--checkpoint", uncond, "--classifier", cls, "--class", "1", "--steps", "5",
                  "--n", "2", "--out", str(root / "g1"), "--no-progress", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "classifier assigns s=0:" in printed and (root / "g1" / "guidance_seed0.png").is_file()
    figures.main(["guidance", "--checkpoint", cond, "--class", "2", "--steps", "5", "--scales", "0,3",
                  "--n", "2", "--out", str(root / "g2"), "--no-progress", "--device", "cpu"])
    assert (root / "g2" / "guidance_seed0.png").is_file()


def test_no_silent_overwrite(runs):
    root, uncond, _, _ = runs
    args = ["ddim-interp", "--checkpoint", uncond, "--out", str(root / "ow"), "--n", "1", "--no-progress",
            "--device", "cpu"]
    figures.main(args)
    with pytest.raises(Exception, match="already exists"):
        figures.main(args)
    figures.main(args + ["--force"])


@pytest.mark.parametrize("argv, flag", [
    (["ddpm-x0", "--steps", "0"], "--steps"),
    (["ddpm-x0", "--steps", "21"], "--steps"),
    (["ddpm-x0", "--columns", "0,5"], "--columns"),
    (["ddim-consistency", "--columns", "10,x"], "--columns"),
    (["guidance", "--scales", "1,nan"], "--scales"),
    (["guidance"], "--classifier"),
    (["ddim-interp", "--n", "0"], "--n"),
    (["ddim-interp", "--device", "tpu"], "--device"),
    (["ddim-interp", "--check", "x"], "unrecognized"),
])
def test_bad_input_is_one_line_exit_2_before_any_work(runs, argv, flag, capsys, monkeypatch):
    _, uncond, _, _ = runs
    monkeypatch.setattr(figures, "draw", lambda *a: pytest.fail("drew a figure for bad input"))
    with pytest.raises(SystemExit) as e:
        figures.cli.main_guard(figures.main, [*argv, "--checkpoint", uncond, "--device", "cpu"]
                               if "--device" not in argv else [*argv, "--checkpoint", uncond])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


def test_bad_input_in_a_real_process_has_no_traceback(runs):
    _, uncond, _, _ = runs
    r = subprocess.run([sys.executable, "figures.py", "ddpm-x0", "--steps", "0", "--checkpoint", uncond],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--steps" in r.stderr
