"""
The official DDPM weights (Ho et al. 2020), from diffusers' format into this repository's UNet and checkpoint.

THE STORY. The DDPM authors released TensorFlow checkpoints of their CIFAR-10 and 256x256 LSUN / CelebA-HQ models.
HuggingFace converted them for diffusers (google/ddpm-cifar10-32, google/ddpm-{church,bedroom,cat,celebahq}-256,
and the -ema- twins such as google/ddpm-ema-church-256): a UNet2DModel (config.json + weights) and a DDPMScheduler
(scheduler_config.json). That network IS DDPM's U-Net, and so is unet.UNet with its default (DDPM) choices: the
same layers in the same order with the same shapes, under other names. So loading is renaming, and this file:

  1. finds the files, in any of the layouts below (or downloads them: "hf:google/ddpm-cifar10-32"),
  2. turns the UNet2DModel config into UNet(**model_args), checking every value's type and range (a table of
     rules: UNET2D_RULES) and refusing any option our UNet does not compute,
  3. renames the weights (fusing attention's q, k, v into our one 1x1 conv), checking every name, shape and dtype
     and that every value is finite,
  4. turns the scheduler config into diffusion_args (beta schedule, T, variance), checked the same way
     (SCHEDULER_RULES),

and returns a checkpoint in the project's format 2 (see load_diffusers). Nothing of diffusers is needed: the
configs are JSON, the weights a safetensors file (or a torch pickle, .bin, read with weights_only=True).
tests/test_pretrained.py proves the result equal to diffusers' own network and samplers.
tests/test_pretrained_inputs.py tries bad values of every field and tensor, through sample.py.

LAYOUTS. (a) A repository root: model_index.json, unet/{config.json, diffusion_pytorch_model.safetensors|.bin},
scheduler/scheduler_config.json. (b) The older flat layout, as google/ddpm-cifar10-32 ships: config.json (the
UNet's), diffusion_pytorch_model.safetensors|.bin and scheduler_config.json side by side. (c) The unet/ folder itself;
its scheduler is then ../scheduler/scheduler_config.json. Without a scheduler config, DDPMScheduler's defaults are
used (linear 1e-4 .. 0.02, T = 1000, fixed_small), as diffusers would.

NAMES: every parameter's name in diffusers and in our UNet, in forward order, is tabled in docs/pretrained.md.
"""

import json
import math
import os

import torch

from schedules import get_named_beta_schedule
from unet import UNet

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# The files come from the internet, so every value read is checked for its type and range before it is used
# (a string where a number belongs, NaN, 0 channels, a 65536-pixel image would otherwise end in a traceback, or in
# gigabytes allocated, long after loading). The bounds are generous and only keep the work sane:
MAX_JSON_BYTES = 16 * 2 ** 20  # a config is a few KB; 100000 trained_betas are about 2.5 MB of JSON
MAX_SAMPLE_SIZE = 2048         # the largest official DDPM models work at 256x256
MAX_CHANNELS = 2 ** 16         # of a level; DDPM's largest is 512, ADM's 1024
MAX_LEVELS = 12                # an image of MAX_SAMPLE_SIZE = 2^11 cannot be halved more than 11 times
MAX_LAYERS_PER_BLOCK = 16      # DDPM uses 2, ADM and iDDPM 2 or 3
MAX_IMAGE_CHANNELS = 64        # of the images: 3 (RGB), 1 (gray), 4 (latents)
MAX_TIMESTEPS = 100000         # T; DDPM's is 1000 (the diffusion holds a dozen arrays of T floats)
# the dtypes a weight may have; the network computes in float32, to which all four convert exactly or by rounding
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Rules for the values of a JSON config: each is (test, what the value must be), the latter for the error line
# ----------------------------------------------------------------------------------------------------------------

def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)  # JSON's true is Python's True, an int: not a number here


def is_number(v):
    # Python's json reads NaN and Infinity; an int of 400 digits is finite (and too large for math.isfinite)
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def integer(lo, hi):
    return (lambda v: is_int(v) and lo <= v <= hi), f"an integer in [{lo}, {hi}]"


def number(lo, hi, lo_open=False, hi_open=False):
    def test(v):
        return is_number(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return test, f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def one_of(*values, note=""):
    """Exactly one of `values`, type included: 1 is not true, 0 is not false, 32.0 is not 32."""
    def test(v):
        return any(v == x and type(v) is type(x) for x in values)
    return test, " or ".join(json.dumps(x) for x in values) + note


BOOLEAN = one_of(True, False)
STRING = (lambda v: isinstance(v, str)), "a string"


def optional(rule):
    """null (diffusers' None), or what `rule` allows."""
    test, must = rule
    return (lambda v: v is None or test(v)), f"null or {must}"


def list_of(rule, lo, hi):
    """A list of lo to hi values, each allowed by `rule`."""
    test, must = rule
    count = f"{lo}" if lo == hi else f"{lo} to {hi}"
    return (lambda v: isinstance(v, list) and lo <= len(v) <= hi and all(test(x) for x in v)), \
        f"a list of {count} values, each {must}"


def either(*rules):
    return (lambda v: any(test(v) for test, _ in rules)), " or ".join(must for _, must in rules)


def check_fields(values, rules, file):
    """Each field of `values` that `rules` names passes its rule; else a ValueError naming the field and the rule."""
    for field, (test, must) in rules.items():
        if field in values and not test(values[field]):
            raise ValueError(f"{file}: {field} must be {must}, got {shown(values[field])}")


def shown(value, width=60):
    """A value as JSON spells it (true, null, NaN), cut to `width` characters."""
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."

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

# What each UNet2DModel option may be (every option of UNET2D_DEFAULTS has a rule). Options our UNet computes in
# one way only must have that value; the others are checked here for type and range, and below for how they fit
# together (the block types mirror, the channels are multiples of the first, the heads divide them, ...).
ONLY = " (the only choice our UNet computes)"
UNET2D_RULES = {
    # the architecture
    "sample_size": either(integer(1, MAX_SAMPLE_SIZE), list_of(integer(1, MAX_SAMPLE_SIZE), 2, 2)),
    "in_channels": integer(1, MAX_IMAGE_CHANNELS),
    "out_channels": integer(1, MAX_IMAGE_CHANNELS),
    "block_out_channels": list_of(integer(1, MAX_CHANNELS), 1, MAX_LEVELS),
    "down_block_types": list_of(one_of("DownBlock2D", "AttnDownBlock2D"), 1, MAX_LEVELS),
    "up_block_types": list_of(one_of("UpBlock2D", "AttnUpBlock2D"), 1, MAX_LEVELS),
    "layers_per_block": integer(1, MAX_LAYERS_PER_BLOCK),
    "attention_head_dim": optional(integer(1, MAX_CHANNELS)),
    "time_embedding_dim": optional(integer(1, 4 * MAX_CHANNELS)),
    "dropout": number(0, 1, hi_open=True),
    "norm_eps": number(0, 1, lo_open=True, hi_open=True),
    "num_train_timesteps": optional(integer(1, MAX_TIMESTEPS)),  # not used by the network; only typed
    # DDPM's choice or ADM's (see unet_args)
    "freq_shift": one_of(1, 0),
    "downsample_padding": one_of(0, 1),
    # the options our UNet computes in one way only
    "center_input_sample": one_of(False, note=ONLY),
    "time_embedding_type": one_of("positional", note=ONLY),
    "flip_sin_to_cos": one_of(False, note=ONLY),
    "mid_block_type": one_of("UNetMidBlock2D", note=ONLY),
    "mid_block_scale_factor": one_of(1, 1.0, note=ONLY),
    "downsample_type": one_of("conv", note=ONLY),
    "upsample_type": one_of("conv", note=ONLY),
    "act_fn": one_of("silu", note=ONLY),
    "norm_num_groups": one_of(32, note=ONLY),
    "attn_norm_num_groups": one_of(None, 32, note=ONLY),
    "resnet_time_scale_shift": one_of("default", note=ONLY),
    "add_attention": one_of(True, note=ONLY),
    "class_embed_type": one_of(None, note=ONLY),
    "num_class_embeds": one_of(None, note=ONLY),
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

# What each DDPMScheduler field read here may be: the ones the diffusion is made of, and clip_sample (a sampling
# choice, not read, but typed: the official configs state it). beta_schedule is any string when trained_betas are
# given (diffusers then ignores it), else one of BETA_SCHEDULES (checked in diffusion_args), and beta_start <=
# beta_end; trained_betas must number num_train_timesteps.
BETA = number(0, 1, lo_open=True, hi_open=True)
SCHEDULER_RULES = {
    "num_train_timesteps": integer(1, MAX_TIMESTEPS),
    "beta_start": BETA,
    "beta_end": BETA,
    "beta_schedule": STRING,
    "trained_betas": optional(list_of(BETA, 1, MAX_TIMESTEPS)),
    "variance_type": one_of(*VARIANCE_TYPES),
    "prediction_type": one_of("epsilon", note=" (our models predict the noise)"),
    "rescale_betas_zero_snr": one_of(False, note=" (zero-SNR rescaling is not supported)"),
    "clip_sample": BOOLEAN,
}


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

    Anything that does not match (layout, missing file, a config value of the wrong type or range, an option our
    UNet lacks, a weight's name, shape, dtype or a non-finite value) raises a ValueError with one line naming it.
    """
    source = str(path)
    folder = download(source[3:]) if source.startswith("hf:") else source
    unet_dir, weights_path, scheduler_path = find_files(folder)
    # the cheap checks first: both JSON files and the diffusion; then the network (its shapes, on the meta device)
    # and the weights
    config = read_json(os.path.join(unet_dir, "config.json"))
    scheduler = read_json(scheduler_path) if scheduler_path else {}
    diffusion = diffusion_args(scheduler)
    model_args = unet_args(config)
    return {
        "format": 2,
        "kind": "diffusion",
        "model_args": model_args,
        "diffusion_args": diffusion,
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
    """A JSON object from a UTF-8 file of at most MAX_JSON_BYTES, or a ValueError of one line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)  # never more: a config is a few KB
    except OSError as e:
        raise ValueError(f"{path}: not readable ({e.strerror or type(e).__name__})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{path}: larger than {MAX_JSON_BYTES} bytes, too large for a config; not a diffusers "
                         "config file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:  # arrays nested thousands deep
        raise ValueError(f"{path}: not readable as JSON (nested too deeply)") from None
    except ValueError as e:  # json's errors and UnicodeDecodeError are ValueErrors
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not readable as JSON ({type(e).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, got {shown(data, 40)}")
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
    except Exception as e:  # (an empty .bin raises an EOFError without a message)
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: expected a flat dict of tensors (a state_dict)")
    # every tensor, used or not: a floating dtype (a bool or complex tensor would be cast to float silently, its
    # values changed), dense, and finite once in float32 (a float64 of 1e300 is not)
    file = os.path.basename(path)
    for name, value in state.items():
        if value.dtype not in FLOAT_DTYPES or value.layout != torch.strided:
            kind = str(value.dtype).replace("torch.", "") + ("" if value.layout == torch.strided else " sparse")
            raise ValueError(f"weights: {name!r} in {file} is a {kind} tensor; this loader reads dense float16, "
                             "bfloat16, float32 or float64 weights only (convert the file, or download the original)")
        if not bool(torch.isfinite(value.to(torch.float32)).all()):
            raise ValueError(f"weights: {name!r} in {file} holds NaN or infinite values (in float32); "
                             "the file is damaged: download it again")
    return state


# ----------------------------------------------------------------------------------------------------------------
# 2. The network's config
# ----------------------------------------------------------------------------------------------------------------

def unet_args(config):
    """UNet(**model_args) for a UNet2DModel config.json, or a ValueError naming the first option we cannot match."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"config.json: _class_name is {shown(config['_class_name'])}; only UNet2DModel is "
                         "supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        raise ValueError(f"config.json: unknown UNet2DModel option {unknown[0]!r}; this loader knows diffusers 0.42's")
    cfg = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    # every value's type and range (the defaults too: a config without sample_size is refused, as we need it)
    check_fields(cfg, UNET2D_RULES, "config.json")

    # then how they fit together
    channels, down, up = cfg["block_out_channels"], cfg["down_block_types"], cfg["up_block_types"]
    levels = len(channels)
    if len(down) != levels or len(up) != levels:
        raise ValueError(f"config.json: {len(down)} down_block_types and {len(up)} up_block_types for {levels} "
                         "block_out_channels; there must be one of each per level")
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
    if cfg["out_channels"] != cfg["in_channels"]:
        raise ValueError(f"config.json: out_channels={cfg['out_channels']} differs from in_channels="
                         f"{cfg['in_channels']}; only eps-prediction models are supported")

    size = cfg["sample_size"]
    if isinstance(size, list):  # [height, width]
        if size[0] != size[1]:
            raise ValueError(f"config.json: sample_size={size} is not square")
        size = size[0]
    if size % 2 ** (levels - 1):
        raise ValueError(f"config.json: sample_size={size} must be divisible by 2^{levels - 1} (one halving per "
                         f"level after the first)")

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
        dropout=float(cfg["dropout"]),  # a JSON 0 is an int
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
    # every value's type and range, then how they fit together
    check_fields(cfg, SCHEDULER_RULES, "scheduler_config.json")
    T = cfg["num_train_timesteps"]
    if cfg["beta_start"] > cfg["beta_end"]:
        raise ValueError(f"scheduler_config.json: beta_start={cfg['beta_start']} is above beta_end={cfg['beta_end']}; "
                         "the noise grows along the chain (beta_start <= beta_end)")
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
            raise ValueError(f"scheduler_config.json: {len(betas)} trained_betas for num_train_timesteps={T}; "
                             "there must be one beta per timestep")
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
    if not bool(((betas > 0) & (betas < 1)).all()):  # beta = 1 leaves no signal: x_0 cannot be predicted
        raise ValueError("scheduler_config.json: every beta must lie in (0, 1); these beta_start, beta_end and "
                         "beta_schedule give others")
    return betas
