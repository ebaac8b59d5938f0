"""
A run's checkpoint: self-describing, written atomically, never holding a non-finite weight, loaded safely.

WHAT A CHECKPOINT HOLDS (format 2), as nanoGPT's does: everything a reader needs to rebuild what was trained with the
library files alone, no script and no command line:

    {"format": 2,
     "kind": "diffusion" | "classifier" | "ddgan",  # UNet (eps-model), EncoderUNet (noisy classifier), or a DDGAN
                                                    # generator UNet(latent_dim=...) with its discriminator
     "model_args": {...},                       # UNet(**model_args) / EncoderUNet(**model_args) rebuilds the network
     "diffusion_args": {"schedule": "linear", "timesteps": 1000, "var_type": "fixed_large", "loss_type": "mse"},
     "model": state_dict, "ema": state_dict,    # readers sample from the EMA weights
     "step": int, "config": {train.py's flags}, # and train.py's own state to resume exactly (optimizer, data, rng)}

`load` also accepts checkpoints written before format 2 (it rebuilds model_args from their config) and, through
pretrained.py, a diffusers-format folder such as the official DDPM weights.

SAVING. `save` refuses weights that are not all finite (a diverged step must never replace the last good
checkpoint), writes to a temporary file beside the target, fsyncs it and renames it over the target: a kill at any
moment leaves the previous checkpoint intact, and a failed write (a full disk) removes its partial file.
Everything is loaded with torch.load(weights_only=True): tensors and plain containers, never arbitrary objects.
"""

import glob
import os
import re
import warnings

import torch

from cli import UsageError, say
from ddpm import GaussianDiffusion
from schedules import get_named_beta_schedule
from unet import ADM_CHOICES, EncoderUNet, UNet

FORMAT = 2
FILENAME = "ckpt.pt"
KINDS = {"diffusion": UNet, "classifier": EncoderUNet}
# DDGAN (Xiao et al. 2022, ddgan.py): the generator G(x_t, z, t) is a UNet(latent_dim=nz); "model"/"ema" hold G, and
# train.py adds "discriminator_args", "discriminator" (an EncoderUNet) and "optimizer_d" to resume. build_network
# gives the EMA generator, which sampling.py's "ddgan" sampler (its 4-step chain, DG4) draws with.
KINDS["ddgan"] = UNet


class NonFiniteError(Exception):
    """The weights about to be saved are not all finite: the run diverged."""


# ----------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------

def non_finite_count(state_dict):
    """How many entries of a state dict's floating-point tensors are NaN or +-inf (one device sync per tensor group)."""
    floats = [v for v in state_dict.values() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return 0
    return int(sum((~torch.isfinite(v)).sum() for v in floats))


def temporary_name(path):
    """Where `save` writes before the rename: beside the target, marked with the writer's pid."""
    return f"{path}.tmp{os.getpid()}"


def save(obj, path):
    """Write `obj` to `path` atomically, refusing non-finite weights (NonFiniteError) and cleaning up on failure.

    A failed write (OSError: a full disk, a vanished folder) removes the partial file, leaves the previous
    checkpoint as it was, and raises OSError for the caller to report.
    """
    for key in ("model", "ema"):
        if key in obj and (bad := non_finite_count(obj[key])):
            raise NonFiniteError(f"{bad} non-finite values in the {key} weights")
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # ENOSPC, a kill signal turned into an exception, anything: never leave a partial file behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def remove_stale_temporaries(folder):
    """Delete temporary checkpoint files whose writer is dead (a SIGKILL during a save); returns what was removed."""
    removed = []
    for tmp in glob.glob(os.path.join(folder, "*.tmp*")):
        pid = tmp.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def find(path, flag="--checkpoint"):
    """A checkpoint file from a file or run-folder path; a diffusers folder or hf:NAME is returned as it is."""
    path = str(path)
    if path.startswith("hf:"):
        return path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, FILENAME)):
            return os.path.join(path, FILENAME)
        if _is_diffusers_folder(path):
            return path
        raise UsageError(f"{flag}: no {FILENAME} in {path}; train one with `python train.py` or pass {flag} PATH "
                         f"(a ckpt.pt, a run folder or a diffusers UNet2DModel folder)")
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: {path} does not exist; pass a ckpt.pt, a run folder or a diffusers model folder")
    return path


def samples_dir(path):
    """Where images drawn from the checkpoint at `path` (checkpoint.find's answer) go: <run>/samples for a run's
    ckpt.pt; samples/<model> for a diffusers folder or hf:NAME (not ours to write in)."""
    if os.path.isfile(path):
        return os.path.join(os.path.dirname(path), "samples")
    return os.path.join("samples", re.sub(r"[^A-Za-z0-9._-]+", "_", path.strip("/")) or "model")


def newest_run(kind):
    """The most recently written run under runs/ whose checkpoint holds a `kind` network ("diffusion": an eps-model;
    "ddgan": a DDGAN generator), saying which runs it saw and which it took: sample.py without --checkpoint."""
    found = sorted(glob.glob(os.path.join("runs", "*", FILENAME)), key=os.path.getmtime, reverse=True)
    usable = []
    for path in found:
        try:
            ckpt = load(path)
        except UsageError:
            continue
        if ckpt["kind"] == kind:
            usable.append((os.path.dirname(path), ckpt.get("step")))
    if not usable:
        raise UsageError("--checkpoint: no run found under runs/; train one with `python train.py --dataset cifar10` "
                         "or pass --checkpoint PATH")
    others = ", ".join(run for run, _ in usable[1:])
    say(f"using {usable[0][0]}, the most recently written run under runs/"
        + (f" (also there: {others}; choose with --checkpoint)" if others else " (choose with --checkpoint)"))
    return usable[0][0]



def _is_diffusers_folder(path):
    return any(os.path.isfile(os.path.join(path, *p)) for p in
               (("config.json",), ("model_index.json",), ("unet", "config.json")))


def load(path, flag="--checkpoint"):
    """The checkpoint at `path` (file, run folder, diffusers folder or hf:NAME) as a format-2 dict.

    Every problem is a UsageError of one line naming `flag`: a missing file, a file torch cannot read, one that is
    not a checkpoint, one whose model_args disagree with its weights (checked when the network is built).
    """
    path = find(path, flag)
    if path.startswith("hf:") or os.path.isdir(path):
        import pretrained  # noqa: PLC0415 (only readers of diffusers folders need it)
        try:
            ckpt = pretrained.load_diffusers(path)
        except (ValueError, OSError) as e:
            raise UsageError(f"{flag}: {e}") from None
        ckpt["path"] = path
        return ckpt
    try:
        with warnings.catch_warnings():  # a corrupt file makes torch warn before it raises: one line is enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise UsageError(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__}); "
                         "pick another file or run folder") from None
    if not isinstance(ckpt, dict) or not ("ema" in ckpt or "model" in ckpt):
        raise UsageError(f"{flag}: {path} holds a {type(ckpt).__name__}, not a checkpoint written by train.py")
    if ckpt.get("format") != FORMAT:
        ckpt = upgrade(ckpt, path, flag)
    for key in ("kind", "model_args", "diffusion_args"):
        if key not in ckpt:
            raise UsageError(f"{flag}: {path} has no {key!r}; it was not written by train.py")
    if ckpt["kind"] not in KINDS:
        raise UsageError(f"{flag}: {path} holds a {ckpt['kind']!r} network; expected one of {', '.join(KINDS)}")
    ckpt["path"] = path
    return ckpt


def upgrade(ckpt, path, flag):
    """A checkpoint written before format 2 (no model_args): rebuild model_args and diffusion_args from its config."""
    cfg = ckpt.get("config")
    need = ("image_size", "ch", "ch_mult", "num_res_blocks", "attn", "dropout", "num_heads", "num_head_channels",
            "resblock_updown", "scale_shift_norm", "schedule", "diffusion_steps", "loss", "num_classes")
    missing = [k for k in need if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise UsageError(f"{flag}: {path} is an old-format checkpoint missing config key(s) {', '.join(missing)}; "
                         "it cannot be converted: retrain it with this version of train.py")
    kind = cfg.get("task", "diffusion")
    ints = lambda text: tuple(int(v) for v in str(text).split(",") if v.strip())  # noqa: E731
    args = dict(image_size=cfg["image_size"], in_channels=cfg.get("channels", 3), ch=cfg["ch"],
                ch_mult=ints(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"], attn_resolutions=ints(cfg["attn"]),
                dropout=cfg["dropout"], num_heads=cfg["num_heads"], num_head_channels=cfg["num_head_channels"],
                resblock_updown=cfg["resblock_updown"], use_scale_shift_norm=cfg["scale_shift_norm"])
    # every checkpoint before format 2 was trained while unet.py made ADM's three parameter-free choices (DDPM's
    # are the default now); these flags rebuild the function it was trained as
    args.update(ADM_CHOICES)
    if kind == "classifier":
        args.update(out_dim=cfg["num_classes"], pool=cfg.get("pool", "attention"))
    else:
        args.update(num_classes=cfg["num_classes"] if cfg.get("class_cond") else None, learn_sigma=cfg["loss"] != "mse")
    loss = cfg["loss"]
    diffusion_args = dict(schedule=cfg["schedule"], timesteps=cfg["diffusion_steps"],
                          var_type="fixed_large" if loss == "mse" else "learned_range", loss_type=loss)
    return dict(ckpt, format=FORMAT, kind=kind, model_args=args, diffusion_args=diffusion_args)


# ----------------------------------------------------------------------------------------------------------------
# Building what a checkpoint describes
# ----------------------------------------------------------------------------------------------------------------

def build_network(ckpt, use_ema=True, device="cpu", flag="--checkpoint"):
    """The trained network in eval mode, without gradients: UNet/EncoderUNet(**model_args) with the (EMA) weights."""
    where = ckpt.get("path", "the checkpoint")
    try:
        net = KINDS[ckpt["kind"]](**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag}: {where} has model_args this unet.py cannot build ({e})") from None
    state = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(state, dict):
        raise UsageError(f"{flag}: {where} holds no weights")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        parts = [f"{len(v)} {what} (first: {v[0]})" for v, what in
                 ((missing, "missing"), (extra, "unexpected"), (wrong, "wrongly shaped")) if v]
        raise UsageError(f"{flag}: {where}: its weights do not match its model_args: {'; '.join(parts)}")
    if bad := non_finite_count(state):
        raise UsageError(f"{flag}: {where} holds {bad} non-finite weights (a diverged run); "
                         "use an earlier checkpoint")
    net.load_state_dict(state)
    net.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net


def build_diffusion(diffusion_args, var_type=None):
    """The GaussianDiffusion a checkpoint was trained with; `var_type` overrides a fixed variance (R3) for sampling."""
    args = dict(diffusion_args)
    if args.get("betas") is not None:
        betas = torch.as_tensor(args["betas"], dtype=torch.float64)
    else:
        betas = get_named_beta_schedule(args["schedule"], args["timesteps"])
    var = args.get("var_type", "fixed_large")
    if var_type is not None and var != "learned_range":
        var = var_type
    return GaussianDiffusion(betas, var, args.get("loss_type", "mse"))


def describe_step(ckpt):
    """How the scripts' banners name the weights: 'step 1200' for a run's checkpoint, 'pretrained weights' for a
    diffusers folder (the official DDPM weights), which says nothing of its training and so has step None."""
    step = ckpt.get("step")
    return "pretrained weights" if step is None else f"step {step}"


def num_classes_of(ckpt):
    """How many classes the network knows: a class-conditional UNet's num_classes, a classifier's out_dim, or None."""
    args = ckpt["model_args"]
    return args.get("out_dim") if ckpt["kind"] == "classifier" else args.get("num_classes")
