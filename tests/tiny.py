"""Tiny format-2 checkpoints for the readers' tests (sample.py, evaluate.py): a U-Net of a few thousand parameters on
8x8 images, with random (not trained) weights, written by checkpoint.save. No training: the readers only need a
network of the right shape whose outputs depend on its input."""

import os

import torch

import checkpoint
from unet import EncoderUNet, UNet

IMAGE = 8
TIMESTEPS = 100
NET = dict(image_size=IMAGE, in_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
           dropout=0.0, num_heads=1, num_head_channels=-1, resblock_updown=False, use_scale_shift_norm=True)


def randomize(net, seed, scale=0.1):
    """PyTorch's default initialisation, seeded, with random weights where the U-Net starts at zero (its output
    layers: eps = 0 would make every image the same function of x_T)."""
    torch.manual_seed(seed)
    net.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return net


def write(path, kind="diffusion", num_classes=None, learn_sigma=False, seed=0, step=10, **edits):
    """A run folder `path` holding ckpt.pt; `edits` replace top-level entries of the checkpoint dict."""
    os.makedirs(path, exist_ok=True)
    if kind == "classifier":
        args = dict(NET, out_dim=num_classes or 2, pool="adaptive")
        net = randomize(EncoderUNet(**args), seed)
    else:
        args = dict(NET, num_classes=num_classes, learn_sigma=learn_sigma)
        net = randomize(UNet(**args), seed)
    loss = "hybrid" if learn_sigma else "mse"
    ckpt = {"format": 2, "kind": kind, "model_args": args,
            "diffusion_args": {"schedule": "linear", "timesteps": TIMESTEPS,
                               "var_type": "learned_range" if learn_sigma else "fixed_large", "loss_type": loss},
            "model": net.state_dict(), "ema": net.state_dict(), "step": step,
            "config": {"dataset": "synthetic", "image_size": IMAGE, "data_dir": None}}
    ckpt.update(edits)
    checkpoint.save(ckpt, os.path.join(path, checkpoint.FILENAME))
    return path


def run(module, argv):
    """A script's command line in-process, as `python SCRIPT ...` runs it: 0, or the exit code of a bad input."""
    from cli import main_guard  # noqa: PLC0415

    try:
        main_guard(module.main, argv)
    except SystemExit as e:
        return e.code
    return 0


def one_line_error(capsys):
    """The captured stderr of a bad input: exactly one line, `error: ...`, no traceback; returned for more checks."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("error: "), err
    return err
