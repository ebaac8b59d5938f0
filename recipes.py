"""
Training recipes by name: `python train.py --recipe digits`. One dict, read top to bottom: each recipe is the set of
train.py flags (by their dest names, values as typed) that differ from train.py's defaults, which are DDPM's CIFAR-10
recipe. A flag typed on the command line beats the recipe; `--config runs/x/config.json` starts a new run with the
flags of run x instead. The README's command lines are these names.

    ddpm-cifar10    DDPM's CIFAR-10 recipe (Ho et al. 2020, §4 and Appendix B): 35.7M U-Net, batch 128, 800k steps
    cifar10-small   CIFAR-10 on a CPU: a 1.1M U-Net for 20 minutes (shows the pipeline; samples stay colour fields)
    digits          scikit-learn's handwritten digits on a CPU: a 0.4M U-Net that draws digits in about 5 minutes
    ddgan-cifar10   Denoising Diffusion GANs' CIFAR-10 recipe (Xiao et al. 2022, Appendix C; T = 4)
"""

import json
import math

import ddgan
from cli import UsageError

# DDGAN's CIFAR-10 recipe (ddgan.CIFAR10_RECIPE: the paper's appendix and the authors' README command), in train.py's
# flags. `--task ddgan` with no --recipe takes it too, wherever a flag is not typed.
_D = ddgan.CIFAR10_RECIPE
DDGAN_CIFAR10 = {
    "task": "ddgan", "dataset": "cifar10",
    "diffusion_steps": _D["num_timesteps"], "schedule": _D["schedule"],   # T = 4 on the vp schedule (§4)
    "ch": _D["ch"], "ch_mult": ",".join(map(str, _D["ch_mult"])), "num_res_blocks": _D["num_res_blocks"],
    "attn": ",".join(map(str, _D["attn_resolutions"])), "dropout": _D["dropout"],
    "scale_shift_norm": _D["use_scale_shift_norm"],                       # their G conditions on (t, z) by AdaGN
    "batch_size": _D["batch_size"], "lr": _D["lr_g"], "ema": _D["ema_decay"],
    "warmup": 0, "grad_clip": 0.0,                                        # the authors' code has neither
    "steps": math.ceil(_D["epochs"] * 50_000 / _D["batch_size"]),         # 1800 epochs of CIFAR-10's 50k images
}

RECIPES = {
    # DDPM §4: the defaults of every flag (35.7M U-Net, L_simple, linear schedule T = 1000, batch 128, lr 2e-4 after a
    # 5000-step warm-up, EMA 0.9999, dropout 0.1, random flips, 800k steps)
    "ddpm-cifar10": {"dataset": "cifar10"},
    # the same network family at 1/32 of the compute: 1.11M parameters, trains at ~70 img/s on 2 cores
    "cifar10-small": {"dataset": "cifar10", "ch": 32, "ch_mult": "1,2,2", "num_res_blocks": 1, "batch_size": 32,
                      "warmup": 500, "lr": 5e-4, "max_minutes": 20.0, "out": "runs/cifar10-small"},
    # 1,500 grey 16x16 digits: one level of downsampling (16 -> 8), no attention, a high learning rate with a short
    # warm-up, and an EMA short enough (0.995: an average over ~200 steps) to follow a 5-minute run; a checkpoint and
    # a grid every 500 steps or 2 minutes, so the first samples.png appears early
    "digits": {"dataset": "digits", "image_size": 16, "ch": 32, "ch_mult": "1,2", "num_res_blocks": 1, "attn": "",
               "dropout": 0.0, "batch_size": 64, "lr": 1e-3, "warmup": 100, "ema": 0.995, "max_minutes": 5.0,
               "log_every": 20, "save_every": 500, "save_minutes": 2.0, "sample_every": 500, "sample_minutes": 2.0},
    "ddgan-cifar10": DDGAN_CIFAR10,
}
DEFAULT = "ddpm-cifar10"


def describe():
    """One line per recipe, for --help."""
    return "; ".join(f"{name}: " + (" ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()) or "defaults")
                     for name, flags in RECIPES.items())


def flags_of(name):
    """The flags of the recipe `name`; UsageError naming --recipe and the choices when there is none."""
    if name not in RECIPES:
        raise UsageError(f"--recipe: no recipe {name!r}; pass one of {', '.join(RECIPES)}")
    return RECIPES[name]


def flags_of_config(path, dests, runtime):
    """The flags a run's config.json records (what its run started with, less `runtime` ones such as --out and
    --resume), restricted to train.py's flags `dests`; UsageError naming --config when it cannot be read."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config: {path} does not exist; pass a run's config.json (runs/NAME/config.json)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--config: cannot read {path} ({type(e).__name__}); pass a run's config.json") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--config: {path} is not a run's config.json (not a JSON object)")
    return {k: v for k, v in cfg.items() if k in dests and k not in runtime and k not in ("recipe", "config")}


def apply(args, given, dests, runtime):
    """Fill every flag the user did not type from --config (a run's flags) or --recipe (a named set), in that order
    of precedence: typed > config > recipe > train.py's default. `--task ddgan` alone means the ddgan-cifar10
    recipe. Returns the recipe's name (recorded in config.json)."""
    name = args.recipe or ("ddgan-cifar10" if args.task == "ddgan" else DEFAULT)
    layers = [flags_of(name)]
    if args.config:
        layers.append(flags_of_config(args.config, dests, runtime))
    for layer in layers:
        for key, value in layer.items():
            if key not in given:
                setattr(args, key, value)
    return name
