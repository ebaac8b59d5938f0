"""Tests for pretrained.py: DDPM's released weights in diffusers' format, proven equal to diffusers offline.

No download: each test builds a diffusers UNet2DModel in one of the supported configurations with tiny channel
counts and random weights, saves it with save_pretrained (safetensors or .bin; today's attention names or,
renamed in the saved file, the older ones) next to a DDPMScheduler config, loads the folder with
pretrained.load_diffusers, and compares
  * the networks' outputs at several t (to float32 round-off),
  * DDIM-50 and DDPM samples from the same x_T (and, for DDPM, the same noise generator) against diffusers'
    DDIMScheduler / DDPMScheduler loops.
diffusers is a test-only requirement (requirements-test.txt); pretrained.py itself never imports it.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import pretrained
from cli import UsageError
from ddim import ddim_sample_loop

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only requirement: requirements-test.txt")
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

# google/ddpm-cifar10-32's config.json with 32 instead of 128 channels: ch_mult (1, 2, 2, 2), attention at 16x16
CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=[32, 64, 64, 64], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    norm_num_groups=32, act_fn="silu", center_input_sample=False, mid_block_scale_factor=1,
    time_embedding_type="positional",
)
# google/ddpm-{church,bedroom,cat,celebahq}-256's block layout: ch_mult (1, 1, 2, 2, 4, 4), attention at the 5th
# level (16x16 at 256); here 32 channels and 32x32 images, so that level works at 2x2
LSUN256 = dict(
    CIFAR10, sample_size=32, block_out_channels=[32, 32, 64, 64, 128, 128],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
)
# the same tiny CIFAR-10 net with ADM's three choices and 16-channel heads: unet.ADM_CHOICES and num_head_channels
ADM = dict(CIFAR10, downsample_padding=1, freq_shift=0, norm_eps=1e-5, attention_head_dim=16)
CONFIGS = {"cifar10": CIFAR10, "lsun256": LSUN256, "adm": ADM}

# the samplers and the bad-folder tests need a network, not a big one: two levels at 8x8 (attention at 4x4)
SMALL = dict(CIFAR10, sample_size=8, block_out_channels=[32, 32], layers_per_block=1,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])

# google/ddpm-cifar10-32's scheduler_config.json (the 256x256 models: variance_type fixed_small)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, variance_type="fixed_large", clip_sample=True)


def random_unet(config, seed, std=0.03):
    """A UNet2DModel with random weights: diffusers' init (seeded) plus noise (norm scales stay around 1), so that no
    layer is zero or trivial. The same seed gives the same weights whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UNet2DModel(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def rename_to_old_attention_names(path):
    """Rewrite a saved weights file with the attention names of diffusers < 0.15 (query/key/value/proj_attn)."""
    state = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
    old = {}
    for name, value in state.items():
        for new_name, old_name in zip(*pretrained.ATTENTION_NAMES):
            name = name.replace(f".{new_name}.", f".{old_name}.")
        old[name] = value
    assert any(".query." in name for name in old) and not any(".to_q." in name for name in old)
    save_file(old, path) if path.endswith(".safetensors") else torch.save(old, path)


def write_folder(root, config, scheduler=SCHEDULER, layout="repo", fmt="safetensors", old_names=False, seed=0):
    """Save a random UNet2DModel (or `config` itself when it is one) and a DDPMScheduler in a diffusers layout.

    Returns (unet, scheduler)."""
    unet = config if isinstance(config, UNet2DModel) else random_unet(config, seed)
    sched = DDPMScheduler(**scheduler)
    unet_dir = os.path.join(root, "unet") if layout == "repo" else root
    unet.save_pretrained(unet_dir, safe_serialization=(fmt == "safetensors"))
    sched.save_pretrained(os.path.join(root, "scheduler") if layout == "repo" else root)
    if layout == "repo":
        with open(os.path.join(root, "model_index.json"), "w") as f:
            json.dump({"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                       "unet": ["diffusers", "UNet2DModel"]}, f)
    if old_names:
        rename_to_old_attention_names(os.path.join(unet_dir, pretrained.WEIGHT_FILES[fmt == "bin"]))
    return unet, sched


# what every reader of a format-2 checkpoint does (checkpoint.py): UNet(**model_args) with the EMA weights, strict;
# the GaussianDiffusion of diffusion_args, its explicit betas winning over the named schedule
our_model = checkpoint.build_network
our_diffusion = checkpoint.build_diffusion


# -----------------------------------------------------------------------------
# the network


# every config, both file formats, both attention name generations and all three layouts
@pytest.mark.parametrize("name, layout, fmt, old_names", [
    ("cifar10", "flat", "safetensors", False),   # google/ddpm-cifar10-32's own layout
    ("cifar10", "repo", "bin", True),
    ("lsun256", "unet", "safetensors", True),    # the unet/ subfolder itself is passed
    ("adm", "repo", "bin", False),
])
def test_network_equals_diffusers(tmp_path, name, layout, fmt, old_names):
    config = CONFIGS[name]
    theirs, _ = write_folder(str(tmp_path), config, layout="flat" if layout == "flat" else "repo", fmt=fmt,
                             old_names=old_names)
    path = tmp_path / "unet" if layout == "unet" else tmp_path
    ckpt = pretrained.load_diffusers(path)

    assert (ckpt["format"], ckpt["kind"], ckpt["step"], ckpt["source"]) == (2, "diffusion", None, str(path))
    assert json.loads(json.dumps(ckpt["model_args"])) == ckpt["model_args"]  # plain JSON
    assert ckpt["diffusion_args"] == {"schedule": "linear", "timesteps": 1000, "var_type": "fixed_large",
                                      "loss_type": "mse"}
    ours = our_model(ckpt)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([0, 500, 999])  # several t in one batch: each example is embedded at its own t
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert b.abs().mean() > 0.1  # a non-trivial function
    # float32 round-off through ~30 layers (measured: max |a - b| 1.9e-6 .. 3.3e-6 for outputs of size ~2-3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -----------------------------------------------------------------------------
# the samplers


@pytest.fixture(scope="module")
def small_unet():
    return random_unet(SMALL, seed=5)


# A random network's x0 predictions are far outside [-1, 1] at large t, so with clipping most of a sample ends at
# +-1 (DDPM's choice, and the official pipelines'); without it every number of the arithmetic shows, amplified by
# 1 / sqrt(abar_t) (samples of size ~100). Both are compared.
@pytest.mark.parametrize("clip", [True, False])
def test_ddim50_equals_diffusers(tmp_path, small_unet, clip):
    theirs, _ = write_folder(str(tmp_path), small_unet)
    ckpt = pretrained.load_diffusers(tmp_path)
    ours, diffusion = our_model(ckpt), our_diffusion(ckpt["diffusion_args"])
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))

    # ours: D4's uniform respacing keeps t = floor(i * 1000 / 50) = 0, 20, ..., 980, and abar_{t-1} = 1 before t = 0
    sample = ddim_sample_loop(diffusion.respace(50, "uniform"), ours, x_T.shape, eta=0.0, noise=x_T.clone(),
                              clip_denoised=clip)

    # diffusers, configured to be the same sampler:
    #   timestep_spacing="leading", steps_offset=0: t = i * (1000 // 50), i.e. our uniform spacing (T divisible by S)
    #   set_alpha_to_one=True: abar before the first step is 1 (ours), not abar_0
    #   clip_sample with use_clipped_model_output=True: x0 clipped to [-1, 1] and eps re-derived from it, which is
    #   what our ddim_step does with clip_denoised=True
    ddim = DDIMScheduler.from_config(ckpt_scheduler(tmp_path), timestep_spacing="leading", steps_offset=0,
                                     set_alpha_to_one=True, clip_sample=clip)
    ddim.set_timesteps(50)
    assert ddim.timesteps.tolist() == diffusion.respace(50, "uniform").timestep_map.flip(0).tolist()
    x = x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(theirs(x, t).sample, t, x, eta=0.0, use_clipped_model_output=True).prev_sample

    # clipped: not every value at the bounds; unclipped: values far outside them
    assert (x.abs() < 0.99).any() if clip else x.abs().max() > 10
    # diffusers keeps abar in float32, we in float64 (cast at use). Measured max |difference|: 7.8e-6 clipped,
    # 2.4e-4 unclipped on samples of size up to 545
    torch.testing.assert_close(sample, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheduler, steps", [
    # the CIFAR-10 diffusion (T = 1000, fixed_large), 25 of its steps: t = 0, 40, ..., 960 on both sides, clipped
    (SCHEDULER, 25),
    # the 256 models' fixed_small, every step of a T = 20 diffusion, unclipped. DDPM's 1e-4 .. 0.02 over 20 steps is
    # not our "linear" (which scales the ends by 1000 / T), so the betas travel explicitly in diffusion_args
    (dict(SCHEDULER, num_train_timesteps=20, variance_type="fixed_small", clip_sample=False), None),
])
def test_ddpm_equals_diffusers(tmp_path, small_unet, scheduler, steps):
    theirs, sched = write_folder(str(tmp_path), small_unet, scheduler=scheduler)
    ckpt = pretrained.load_diffusers(tmp_path)
    T = scheduler["num_train_timesteps"]
    assert ("betas" in ckpt["diffusion_args"]) == (T != 1000)
    assert ckpt["diffusion_args"]["var_type"] == scheduler["variance_type"]
    ours, diffusion = our_model(ckpt), our_diffusion(ckpt["diffusion_args"])
    if steps is not None:
        diffusion = diffusion.respace(steps, "uniform")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))

    # the same noise: both draw one randn of x's shape per step from the generator, in the same order
    # (diffusers skips the draw at t = 0, the last step, where ours draws and multiplies it by 0)
    sample = diffusion.p_sample_loop(ours, x_T.shape, noise=x_T.clone(), clip_denoised=scheduler["clip_sample"],
                                     generator=torch.Generator().manual_seed(4))

    sched.set_timesteps(steps or T)  # "leading" spacing: t = i * (T // steps), our uniform respacing
    g = torch.Generator().manual_seed(4)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(theirs(x, t).sample, t, x, generator=g).prev_sample

    assert x.abs().mean() > 0.1 and (x.abs() < 0.99).any()  # not every value at the bounds
    # measured max |difference|: 2.6e-6 (clipped), 1.8e-5 (unclipped, samples of size up to 4)
    torch.testing.assert_close(sample, x, rtol=1e-4, atol=1e-4)


def ckpt_scheduler(root):
    with open(os.path.join(root, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# the schedule


@pytest.mark.parametrize("kw, named", [
    (dict(), True),                                                      # DDPM's: "linear", no explicit betas
    (dict(beta_start=0.0002, beta_end=0.03), False),                     # other ends: explicit betas
    (dict(num_train_timesteps=100), False),                              # ours scales the ends by 1000 / T
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), False),
    (dict(beta_schedule="scaled_linear"), True),                         # our "quadratic"
    (dict(beta_schedule="squaredcos_cap_v2"), True),                     # our "cosine"
    (dict(beta_schedule="sigmoid"), True),
    (dict(trained_betas=[0.01 * (i + 1) for i in range(10)], num_train_timesteps=10), False),
])
def test_schedule_equals_diffusers(kw, named):
    sched = DDPMScheduler(**kw)
    args = pretrained.diffusion_args(dict(sched.config))
    assert ("betas" not in args) == named, args.keys()
    betas = our_diffusion(args).betas
    # diffusers holds its betas in float32
    torch.testing.assert_close(betas.float(), sched.betas, rtol=1e-6, atol=0)
    assert args["var_type"] == "fixed_small" and args["timesteps"] == sched.config.num_train_timesteps


def test_no_scheduler_config_means_ddpm_scheduler_defaults(tmp_path, small_unet):
    write_folder(str(tmp_path), small_unet, layout="flat")
    os.remove(tmp_path / "scheduler_config.json")
    assert pretrained.load_diffusers(tmp_path)["diffusion_args"] == {
        "schedule": "linear", "timesteps": 1000, "var_type": "fixed_small", "loss_type": "mse"}


# -----------------------------------------------------------------------------
# bad folders: one ValueError line naming what did not match


def one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as e:
        pretrained.load_diffusers(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def edit_config(root, **changes):
    path = os.path.join(root, "unet", "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **changes}, f)


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory, small_unet):
    root = tmp_path_factory.mktemp("valid")
    write_folder(str(root), small_unet)
    return root


@pytest.fixture
def folder(tmp_path, valid_folder):
    """A fresh copy of a valid small repository-layout folder (safetensors), for a test to break."""
    shutil.copytree(valid_folder, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_missing_weights(folder):
    os.remove(folder / "unet" / "diffusion_pytorch_model.safetensors")
    one_line_error(folder, "no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin")


def test_not_a_model_folder(tmp_path):
    one_line_error(tmp_path, "no config.json or unet/config.json")
    one_line_error(tmp_path / "nowhere", "is not a folder")


@pytest.mark.parametrize("changes, match", [
    (dict(down_block_types=["DownBlock2D", "SkipDownBlock2D"]), "SkipDownBlock2D"),
    (dict(up_block_types=["UpBlock2D", "AttnUpBlock2D"]), "do not mirror"),
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos"),
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
    (dict(norm_num_groups=16), "norm_num_groups"),
    (dict(freq_shift=2), "freq_shift"),
    (dict(out_channels=6), "out_channels"),
    (dict(some_new_option=1), "unknown UNet2DModel option 'some_new_option'"),
    (dict(_class_name="UNet2DConditionModel"), "UNet2DConditionModel"),
])
def test_unsupported_config(folder, changes, match):
    edit_config(folder, **changes)
    one_line_error(folder, match)


def test_shape_mismatch(folder):
    edit_config(folder, block_out_channels=[64, 64])  # the weights were saved with 32 channels
    one_line_error(folder, r"'time_embed.0.weight' needs shape \[256, 64\], the file gives \[128, 32\]")


@pytest.mark.parametrize("rename, match", [
    ((".to_q.", ".q_proj."), "has neither to_q/to_k/to_v/to_out.0 nor query/key/value/proj_attn"),
    ((".to_k.", ".k_proj."), "attentions.0.to_k.weight' is missing"),
    (("conv_out.", "final_conv."), "'conv_out.weight' is missing"),
])
def test_wrong_weight_names(folder, rename, match):
    path = str(folder / "unet" / "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    save_file({name.replace(*rename): v for name, v in state.items()}, path)
    one_line_error(folder, match)


def test_extra_weights(folder):
    path = str(folder / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({**load_file(path), "class_embedding.weight": torch.zeros(10, 128)}, path)
    one_line_error(folder, "1 not used by our UNet, e.g. 'class_embedding.weight'")


def test_unsupported_scheduler(folder):
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    one_line_error(folder, 'prediction_type must be "epsilon".*got "v_prediction"')
    path.write_text(json.dumps({**config, "variance_type": "learned"}))
    one_line_error(folder, 'variance_type must be "fixed_small" or .*got "learned"')


def test_checkpoint_load_reads_diffusers_folders(folder):
    # checkpoint.load (what sample.py / figures.py call) hands folders and hf: names to load_diffusers ...
    ckpt, direct = checkpoint.load(folder), pretrained.load_diffusers(folder)
    assert ckpt["model_args"] == direct["model_args"] and ckpt["diffusion_args"] == direct["diffusion_args"]
    assert all(torch.equal(ckpt["ema"][k], direct["ema"][k]) for k in direct["ema"])
    # ... and turns its ValueError into the scripts' one-line usage error
    os.remove(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UsageError, match="--checkpoint: path: no diffusion_pytorch_model"):
        checkpoint.load(folder)


# -----------------------------------------------------------------------------
# hf:<repo id>


def test_hf_source_downloads_with_huggingface_hub(folder, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = pretrained.load_diffusers("hf:google/ddpm-cifar10-32")
    assert ckpt["source"] == "hf:google/ddpm-cifar10-32" and ckpt["model_args"]["ch"] == 32
    # configs and the safetensors weights only (found, so the .bin is not fetched)
    assert calls == [("google/ddpm-cifar10-32", ["*.json", "*diffusion_pytorch_model.safetensors"])]


def test_hf_source_offline_is_one_line(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):  # what snapshot_download raises without a network (and no cache)
        raise huggingface_hub.errors.LocalEntryNotFoundError("Name or service not known\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    msg = one_line_error("hf:google/ddpm-cifar10-32", "download failed")
    assert "hf download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32" in msg
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # not installed
    one_line_error("hf:google/ddpm-cifar10-32", "huggingface_hub is not installed")
