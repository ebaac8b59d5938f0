"""
The official DDPM weights (Ho et al. 2020), from diffusers' format into this repository's UNet and checkpoint.

THE STORY. The DDPM authors released TensorFlow checkpoints of their CIFAR-10 and 256x256 LSUN / CelebA-HQ models.
HuggingFace converted them for diffusers (google/ddpm-cifar10-32, google/ddpm-{church,bedroom,cat,celebahq}-256,
and the -ema- twins such as google/ddpm-ema-church-256): a UNet2DModel (config.json + weights) and a DDPMScheduler
(scheduler_config.json). That network IS DDPM's U-Net, and so is unet.UNet with its default (DDPM) choices: the
same layers in the same order with the same shapes, under other names. So loading is renaming, and this file:

  1. finds the files, in any of the layouts below (or downloads them: "hf:google/ddpm-cifar10-32"),
  2. turns the UNet2DModel config into UNet(**model_args), refusing any option our UNet does not compute,
  3. renames the weights (fusing attention's q, k, v into our one 1x1 conv), checking every name and shape,
  4. turns the scheduler config into diffusion_args (beta schedule, T, variance),

and returns a checkpoint in the project's format 2 (see load_diffusers). Nothing of diffusers is needed: the
configs are JSON, the weights a safetensors file (or a torch pickle, .bin, read with weights_only=True).
tests/test_pretrained.py proves the result equal to diffusers' own network and samplers.

LAYOUTS. (a) A repository root: model_index.json, unet/{config.json, diffusion_pytorch_model.safetensors|.bin},
scheduler/scheduler_config.json. (b) The older flat layout, as google/ddpm-cifar10-32 ships: config.json (the
UNet's), diffusion_pytorch_model.safetensors|.bin and scheduler_config.json side by side. (c) The unet/ folder itself;
its scheduler is then ../scheduler/scheduler_config.json. Without a scheduler config, DDPMScheduler's defaults are
used (linear 1e-4 .. 0.02, T = 1000, fixed_small), as diffusers would.

NAMES (ours <- diffusers'), for every level l, block i, in forward order:
  time_embed.0 / .2                      <- time_embedding.linear_1 / linear_2
  down.0.0                               <- conv_in
  down.k.0 (ResBlock), down.k.1 (Attn)   <- down_blocks.l.resnets.i, down_blocks.l.attentions.i
  down.k.0.op (downsampling conv)        <- down_blocks.l.downsamplers.0.conv
  middle.0 / .1 / .2                     <- mid_block.resnets.0 / attentions.0 / resnets.1
  up.k.0, up.k.1, up.k.{1,2}.conv        <- up_blocks.j.resnets.i, .attentions.i, .upsamplers.0.conv
  out.0 / out.2                          <- conv_norm_out / conv_out
  ResBlock: norm1, conv1, emb_proj, norm2, conv2, skip <- norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
  Attn:     norm <- group_norm;  qkv <- [to_q; to_k; to_v];  proj <- to_out.0
            (older diffusers releases, and the files converted then, name them query, key, value, proj_attn;
            both load)
"""

import json
import os

import torch

from schedules import get_named_beta_schedule
from unet import UNet

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# UNet2DModel's constructor defaults (diffusers 0.42): a key missing from config.json means this value, exactly as
# it does for diffusers (so a config without attention_head_dim gets heads of 8 channels; the DDPM configs say null:
# one head, DDPM's). Every option is listed; one not listed here is refused rather than silently ignored.
UNET2D_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Options of UNet2DModel that our UNet computes in one way only: the value it must have.
UNET2D_FIXED = {
    "center_input_sample": False, "time_embedding_type": "positional", "flip_sin_to_cos": False,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
    "upsample_type": "conv", "act_fn": "silu", "norm_num_groups": 32, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}

# DDPMScheduler's defaults, for the keys this loader reads.
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}

# diffusers' beta_schedule name -> ours (schedules.py)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine",
                  "sigmoid": "sigmoid"}

# diffusers' variance_type -> our var_type. "_log" only changes how diffusers computes the same variance.
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                  "fixed_large": "fixed_large", "fixed_large_log": "fixed_large"}


# ----------------------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------------------

def load_diffusers(path):
    """A diffusers-format DDPM (a folder, or "hf:<repo id>") as a checkpoint dict of the project's format 2:

        {"format": 2, "kind": "diffusion",
         "model_args": {...},      UNet(**model_args) rebuilds the network
         "diffusion_args": {...},  schedule, timesteps, var_type, loss_type (+ "betas" when not a named schedule)
         "ema": state_dict,        the converted weights (readers sample from "ema")
         "step": None, "source": path}

    Anything that does not match (layout, missing file, an option our UNet lacks, a weight's name or shape) raises a
    ValueError with one line naming it.
    """
    source = str(path)
    folder = download(source[3:]) if source.startswith("hf:") else source
    unet_dir, weights_path, scheduler_path = find_files(folder)
    config = read_json(os.path.join(unet_dir, "config.json"))
    model_args = unet_args(config)
    scheduler = read_json(scheduler_path) if scheduler_path else {}
    return {
        "format": 2,
        "kind": "diffusion",
        "model_args": model_args,
        "diffusion_args": diffusion_args(scheduler),
        "ema": convert_weights(read_weights(weights_path), model_args),
        "step": None,
        "source": source,
    }


# ----------------------------------------------------------------------------------------------------------------
# 1. Files
# ----------------------------------------------------------------------------------------------------------------

def download(repo_id):
    """The local folder of the HuggingFace repository `repo_id`, downloaded (or found in the cache) by huggingface_hub.

    Only the configs and one weights file are fetched: safetensors when the repository has it, else the .bin.
    """
    how = (f"on a machine with network run `hf download {repo_id} --local-dir {repo_id.split('/')[-1]}` "
           f"(pip install huggingface_hub) and pass that folder instead of hf:{repo_id}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"hf:{repo_id}: huggingface_hub is not installed; {how}") from None
    try:
        for weights in WEIGHT_FILES:
            folder = snapshot_download(repo_id, allow_patterns=["*.json", f"*{weights}"])
            if any(name == weights for _, _, names in os.walk(folder) for name in names):
                break
    except Exception as e:  # offline, unknown repository, ...: all the same to the user
        raise ValueError(f"hf:{repo_id}: download failed ({type(e).__name__}); {how}") from None
    return folder


def find_files(folder):
    """(the UNet's folder, its weights file, the scheduler config or None) for the three layouts (module docstring)."""
    if not os.path.isdir(folder):
        raise ValueError(f"path: {folder!r} is not a folder; pass a diffusers model folder or hf:<repo id>")
    if os.path.isfile(os.path.join(folder, "unet", "config.json")):
        # (a) a repository root with unet/ and scheduler/ subfolders
        unet_dir = os.path.join(folder, "unet")
        schedulers = [os.path.join(folder, "scheduler", "scheduler_config.json")]
    elif os.path.isfile(os.path.join(folder, "config.json")):
        # (b) flat: the scheduler config beside the UNet's; (c) the unet/ subfolder: its sibling scheduler/
        unet_dir = folder
        schedulers = [os.path.join(folder, "scheduler_config.json"),
                      os.path.join(folder, os.pardir, "scheduler", "scheduler_config.json")]
    else:
        raise ValueError(f"path: no config.json or unet/config.json in {folder!r}; "
                         "expected a diffusers UNet2DModel folder or a pipeline folder with unet/")
    weights = [os.path.join(unet_dir, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(unet_dir, name))]
    if not weights:
        raise ValueError(f"path: no {' or '.join(WEIGHT_FILES)} in {unet_dir!r}")
    scheduler = next((s for s in schedulers if os.path.isfile(s)), None)
    return unet_dir, weights[0], scheduler  # safetensors first when both are there


def read_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_weights(path):
    """The weights file as {name: tensor}: safetensors (the format the official weights ship in) or a torch pickle."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            # weights_only: a .bin is a pickle, and unpickling arbitrary objects runs arbitrary code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors (a state_dict)")
    return state


# ----------------------------------------------------------------------------------------------------------------
# 2. The network's config
# ----------------------------------------------------------------------------------------------------------------

def unet_args(config):
    """UNet(**model_args) for a UNet2DModel config.json, or a ValueError naming the first option we cannot match."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"config.json: _class_name is {config['_class_name']!r}; only UNet2DModel is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        raise ValueError(f"config.json: unknown UNet2DModel option {unknown[0]!r}; this loader knows diffusers 0.42's")
    cfg = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, value in UNET2D_FIXED.items():
        if cfg[key] != value:
            raise ValueError(f"config.json: {key}={cfg[key]!r} is not supported (our UNet computes {key}={value!r})")

    channels = list(cfg["block_out_channels"])
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    levels = len(channels)
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"config.json: {len(down)} down and {len(up)} up block types for {levels} block_out_channels")
    for name in down:
        if name not in ("DownBlock2D", "AttnDownBlock2D"):
            raise ValueError(f"config.json: down block type {name!r} is not supported (DownBlock2D, AttnDownBlock2D)")
    for name in up:
        if name not in ("UpBlock2D", "AttnUpBlock2D"):
            raise ValueError(f"config.json: up block type {name!r} is not supported (UpBlock2D, AttnUpBlock2D)")
    # our U-Net puts attention by resolution, so the up path must mirror the down path
    attn_levels = [name == "AttnDownBlock2D" for name in down]
    if [name == "AttnUpBlock2D" for name in reversed(up)] != attn_levels:
        raise ValueError(f"config.json: up_block_types {up} do not mirror down_block_types {down}")

    # conv_in maps to block_out_channels[0] and the first level keeps it: that is our ch with ch_mult[0] = 1
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"config.json: block_out_channels {channels} are not multiples of the first, {ch}")
    # every GroupNorm in the net sees a multiple of ch channels: with ch % 32 == 0 our gcd(32, C) groups are 32
    if ch % 32:
        raise ValueError(f"config.json: block_out_channels[0]={ch} is not a multiple of 32 (norm_num_groups)")
    if cfg["time_embedding_dim"] not in (None, 4 * ch):
        raise ValueError(f"config.json: time_embedding_dim={cfg['time_embedding_dim']} is not 4 * {ch}")
    if cfg["attn_norm_num_groups"] not in (None, 32):
        raise ValueError(f"config.json: attn_norm_num_groups={cfg['attn_norm_num_groups']} is not supported (32)")
    if cfg["out_channels"] != cfg["in_channels"]:
        raise ValueError(f"config.json: out_channels={cfg['out_channels']} differs from in_channels="
                         f"{cfg['in_channels']}; only eps-prediction models are supported")

    if not isinstance(cfg["layers_per_block"], int) or cfg["layers_per_block"] < 1:
        raise ValueError(f"config.json: layers_per_block={cfg['layers_per_block']!r} must be a positive integer")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"config.json: sample_size={size} is not square")
        size = size[0]
    if not isinstance(size, int) or size < 1 or size % 2 ** (levels - 1):
        raise ValueError(f"config.json: sample_size={size!r} must be an integer divisible by 2^{levels - 1}")

    # DDPM's choices, or ADM's (unet.py's module docstring): diffusers spells them as these three options
    if cfg["downsample_padding"] not in (0, 1):
        raise ValueError(f"config.json: downsample_padding={cfg['downsample_padding']} is not supported (0 or 1)")
    if cfg["freq_shift"] not in (0, 1):
        raise ValueError(f"config.json: freq_shift={cfg['freq_shift']} is not supported (1: DDPM's, 0: ADM's)")
    head_dim = cfg["attention_head_dim"]
    if head_dim is not None:
        # the attention levels' channels, and the middle block's (always with attention)
        attn_channels = [c for c, a in zip(channels, attn_levels) if a] + [channels[-1]]
        bad = [c for c in attn_channels if c % head_dim]
        if bad:
            raise ValueError(f"config.json: attention_head_dim={head_dim} does not divide {bad[0]} channels")

    model_args = dict(
        image_size=size,
        in_channels=cfg["in_channels"],
        ch=ch,
        ch_mult=[c // ch for c in channels],
        num_res_blocks=cfg["layers_per_block"],
        # level l works at resolution size / 2^l
        attn_resolutions=[size // 2 ** level for level in range(levels) if attn_levels[level]],
        dropout=float(cfg["dropout"]),
        # attention_head_dim None: one head of all channels (DDPM's); a number: heads of that many channels
        num_heads=1,
        num_head_channels=-1 if head_dim is None else head_dim,
        resblock_updown=False,
        use_scale_shift_norm=False,
        num_classes=None,
        learn_sigma=False,
        # downsample_padding=0 is diffusers' name for DDPM's (0, 1, 0, 1) padding before the conv; 1 is ADM's
        downsample="ddpm" if cfg["downsample_padding"] == 0 else "adm",
        # get_timestep_embedding divides the exponent by half - freq_shift: 1 is DDPM's half - 1, 0 is ADM's half
        embed_freq="ddpm" if cfg["freq_shift"] == 1 else "adm",
        norm_eps=float(cfg["norm_eps"]),
    )
    try:
        with torch.device("meta"):  # shapes only: checks the arguments without allocating 100M parameters
            return UNet(**model_args).config
    except (AssertionError, ValueError) as e:
        raise ValueError(f"config.json: our UNet cannot be built from it ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------------------------------------
# 3. The weights
# ----------------------------------------------------------------------------------------------------------------

def module_pairs(model_args):
    """(our module, diffusers' module, kind) for every module with weights, in forward order (the NAMES table)."""
    levels, blocks = len(model_args["ch_mult"]), model_args["num_res_blocks"]
    attn = [model_args["image_size"] // 2 ** level in model_args["attn_resolutions"] for level in range(levels)]
    pairs = [("time_embed.0", "time_embedding.linear_1", "copy"),
             ("time_embed.2", "time_embedding.linear_2", "copy"),
             ("down.0.0", "conv_in", "copy")]
    k = 1  # down[0] is conv_in
    for level in range(levels):
        for i in range(blocks):
            pairs.append((f"down.{k}.0", f"down_blocks.{level}.resnets.{i}", "resblock"))
            if attn[level]:
                pairs.append((f"down.{k}.1", f"down_blocks.{level}.attentions.{i}", "attention"))
            k += 1
        if level != levels - 1:
            pairs.append((f"down.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "copy"))
            k += 1
    pairs += [("middle.0", "mid_block.resnets.0", "resblock"),
              ("middle.1", "mid_block.attentions.0", "attention"),
              ("middle.2", "mid_block.resnets.1", "resblock")]
    k = 0
    for j, level in enumerate(reversed(range(levels))):  # up block j works at level L-1-j
        for i in range(blocks + 1):
            pairs.append((f"up.{k}.0", f"up_blocks.{j}.resnets.{i}", "resblock"))
            n = 1
            if attn[level]:
                pairs.append((f"up.{k}.1", f"up_blocks.{j}.attentions.{i}", "attention"))
                n = 2
            if level != 0 and i == blocks:
                pairs.append((f"up.{k}.{n}.conv", f"up_blocks.{j}.upsamplers.0.conv", "copy"))
            k += 1
    pairs += [("out.0", "conv_norm_out", "copy"), ("out.2", "conv_out", "copy")]
    return pairs


RESBLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "skip": "conv_shortcut"}

# the two generations of diffusers' attention names: (q, k, v, output projection)
ATTENTION_NAMES = (("to_q", "to_k", "to_v", "to_out.0"), ("query", "key", "value", "proj_attn"))


def convert_weights(theirs, model_args):
    """Our UNet's state_dict (float32) from a UNet2DModel's, checking every name and shape against model_args."""
    with torch.device("meta"):
        shapes = {name: tuple(v.shape) for name, v in UNet(**model_args).state_dict().items()}
    used, ours = set(), {}

    def take(name):
        if name not in theirs:
            raise ValueError(f"weights: {name!r} is missing (the config implies it); wrong config.json or weights?")
        used.add(name)
        return theirs[name]

    def put(name, value):
        if name not in shapes:  # a bug in the name map, not in the files
            raise ValueError(f"weights: internal name map produced {name!r}, which our UNet does not have")
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"weights: {name!r} needs shape {list(shapes[name])}, the file gives {list(value.shape)}")
        ours[name] = value.detach().to(torch.float32).contiguous()

    for mine, src, kind in module_pairs(model_args):
        if kind == "copy":
            for p in ("weight", "bias"):
                put(f"{mine}.{p}", take(f"{src}.{p}"))
        elif kind == "resblock":
            for a, b in RESBLOCK_NAMES.items():
                if f"{mine}.{a}.weight" in shapes:  # (skip is a 1x1 conv only where the channel count changes)
                    for p in ("weight", "bias"):
                        put(f"{mine}.{a}.{p}", take(f"{src}.{b}.{p}"))
        else:  # attention
            names = next((n for n in ATTENTION_NAMES if f"{src}.{n[0]}.weight" in theirs), None)
            if names is None:
                raise ValueError(f"weights: attention {src!r} has neither to_q/to_k/to_v/to_out.0 nor "
                                 "query/key/value/proj_attn weights")
            q, k, v, out = names
            for p in ("weight", "bias"):
                put(f"{mine}.norm.{p}", take(f"{src}.group_norm.{p}"))
            C = shapes[f"{mine}.proj.bias"][0]
            # our qkv is one 1x1 conv whose output channels are [q; k; v] (unet.AttentionBlock splits them in
            # that order, heads inside each): stack the three [C, C] linear maps, as a [3C, C, 1, 1] kernel
            w = [take(f"{src}.{n}.weight") for n in (q, k, v)]
            b = [take(f"{src}.{n}.bias") for n in (q, k, v)]
            if any(tuple(x.shape) != (C, C) for x in w):
                raise ValueError(f"weights: {src}.{q}/{k}/{v}.weight must be [{C}, {C}] linear maps, "
                                 f"got {[list(x.shape) for x in w]}")
            put(f"{mine}.qkv.weight", torch.cat(w)[:, :, None, None])
            put(f"{mine}.qkv.bias", torch.cat(b))
            # the output projection: a [C, C] linear map is a 1x1 conv
            w_out = take(f"{src}.{out}.weight")
            if tuple(w_out.shape) != (C, C):
                raise ValueError(f"weights: {src}.{out}.weight must be [{C}, {C}], got {list(w_out.shape)}")
            put(f"{mine}.proj.weight", w_out[:, :, None, None])
            put(f"{mine}.proj.bias", take(f"{src}.{out}.bias"))

    extra = sorted(set(theirs) - used)
    if extra:
        raise ValueError(f"weights: {len(extra)} not used by our UNet, e.g. {extra[0]!r}; "
                         "the file does not match its config.json")
    missing = sorted(set(shapes) - set(ours))
    if missing:  # also a bug in the name map
        raise ValueError(f"weights: no value for our {missing[0]!r} (and {len(missing) - 1} more)")
    return ours


# ----------------------------------------------------------------------------------------------------------------
# 4. The diffusion
# ----------------------------------------------------------------------------------------------------------------

def diffusion_args(scheduler):
    """diffusion_args for a DDPMScheduler config (an empty dict: DDPMScheduler's defaults).

    Only the forward process is read (the betas, T) and the reverse variance. Sampling choices of the scheduler
    (clip_sample, thresholding, timestep_spacing, ...) belong to the sampler, not to the diffusion.
    """
    known = {k: v for k, v in scheduler.items() if not k.startswith("_")}
    cfg = {**SCHEDULER_DEFAULTS, **known}
    T = cfg["num_train_timesteps"]
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"scheduler_config.json: num_train_timesteps={T!r} must be a positive integer")
    if cfg["prediction_type"] != "epsilon":
        raise ValueError(f"scheduler_config.json: prediction_type={cfg['prediction_type']!r} is not supported "
                         "(our models predict the noise: 'epsilon')")
    if cfg["rescale_betas_zero_snr"]:
        raise ValueError("scheduler_config.json: rescale_betas_zero_snr=true is not supported")
    if cfg["variance_type"] not in VARIANCE_TYPES:
        raise ValueError(f"scheduler_config.json: variance_type={cfg['variance_type']!r} is not supported "
                         f"({', '.join(VARIANCE_TYPES)})")
    if cfg["beta_schedule"] not in BETA_SCHEDULES and cfg["trained_betas"] is None:
        raise ValueError(f"scheduler_config.json: beta_schedule={cfg['beta_schedule']!r} is not supported "
                         f"({', '.join(BETA_SCHEDULES)})")
    name = BETA_SCHEDULES.get(cfg["beta_schedule"], "linear")
    betas = scheduler_betas(cfg, T)
    args = {"schedule": name, "timesteps": T, "var_type": VARIANCE_TYPES[cfg["variance_type"]], "loss_type": "mse"}
    # the named schedule when it is the same one (schedules.py scales DDPM's 1e-4 .. 0.02 by 1000 / T, diffusers does
    # not, so for T != 1000 they differ); otherwise the betas themselves, which readers use when present
    if not torch.allclose(betas, get_named_beta_schedule(name, T), rtol=1e-12, atol=0):
        args["betas"] = betas.tolist()
    return args


def scheduler_betas(cfg, T):
    """The betas a DDPMScheduler with this config uses, in float64 (diffusers computes them in float32)."""
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        if betas.shape != (T,):
            raise ValueError(f"scheduler_config.json: {len(betas)} trained_betas for num_train_timesteps={T}")
    else:
        b0, b1, kind = float(cfg["beta_start"]), float(cfg["beta_end"]), cfg["beta_schedule"]
        if kind == "linear":
            # DDPM §4: beta_t linear from beta_start to beta_end
            betas = torch.linspace(b0, b1, T, dtype=torch.float64)
        elif kind == "scaled_linear":
            # linear in sqrt(beta): our "quadratic"
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
        elif kind == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (b1 - b0) + b0
        else:  # squaredcos_cap_v2: iDDPM's cosine schedule (it ignores beta_start and beta_end)
            betas = get_named_beta_schedule("cosine", T)
    if not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError("scheduler_config.json: every beta must lie in (0, 1]")
    return betas
