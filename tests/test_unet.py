"""Tests for unet.py: shapes for every option, parameter count of the DDPM
CIFAR-10 net, channels_last / bf16 autocast, the null class, config round trip,
and that every parameter gets a gradient (DistributedDataParallel insists).

Everything runs on CPU with tiny configs; the full-size net is only constructed.
"""

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn as nn  # noqa: E402

from unet import ADM_CHOICES, Downsample, EncoderUNet, UNet, timestep_embedding  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny convs gain nothing from intra-op parallelism, and OpenMP
    threads spin-waiting for a busy core make them ~5x slower when anything
    else runs on the machine (measured: 25 s vs 4 s for this file on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def randomize(model, std=0.02, seed=0):
    """Add noise to every parameter. The output conv and the last conv of every
    residual branch are zero-initialised, so a fresh model predicts exactly 0
    for every input, which would make most comparisons below vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(n=2, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)


# -----------------------------------------------------------------------------
# timestep embedding


def test_timestep_embedding_hand_computed():
    # ADM / Transformer: dim=4 -> half=2 frequencies 10000^(-i/2): 1 and 0.01
    emb = timestep_embedding(torch.tensor([3]), 4, freq="adm")
    expected = torch.tensor([[math.sin(3.0), math.sin(0.03), math.cos(3.0), math.cos(0.03)]])
    assert emb.dtype == torch.float32 and emb.shape == (1, 4)
    torch.testing.assert_close(emb, expected)
    # DDPM (the default; its code divides by half - 1): dim=6 -> half=3 frequencies 10000^(-i/2): 1, 0.01, 1e-4
    # (ADM's division by half would give 1, 10000^(-1/3), 10000^(-2/3) here). This pinned ADM's numbers until the
    # default became DDPM's (checkpoint format 2); the ADM case above keeps them.
    emb = timestep_embedding(torch.tensor([3]), 6)
    args = [3.0, 0.03, 3e-4]
    expected = torch.tensor([[math.sin(a) for a in args] + [math.cos(a) for a in args]])
    torch.testing.assert_close(emb, expected)
    with pytest.raises(ValueError, match="dim >= 4"):  # half - 1 = 0: DDPM's formula divides by zero
        timestep_embedding(torch.tensor([3]), 3)


def test_timestep_embedding_shapes_and_distinct():
    t = torch.arange(10)
    emb = timestep_embedding(t, 128)
    assert emb.shape == (10, 128) and emb.dtype == torch.float32
    assert torch.cdist(emb, emb).add(torch.eye(10)).min() > 0.1  # all rows pairwise different
    # float timesteps give the same result as integer ones
    torch.testing.assert_close(timestep_embedding(t.float(), 128), emb)
    assert timestep_embedding(t, 7).shape == (10, 7)  # odd dim is zero padded


# -----------------------------------------------------------------------------
# DDPM's or ADM's parameter-free details (downsample, embed_freq, norm_eps)


@pytest.mark.parametrize("padding", ["ddpm", "adm"])
def test_downsample_window_placement(padding):
    # a 3x3 kernel that only reads its top-left tap, one channel: output (i, j) is the input at the window's corner
    down = Downsample(1, padding=padding)
    with torch.no_grad():
        down.op.weight.zero_()
        down.op.weight[0, 0, 0, 0] = 1.0
        down.op.bias.zero_()
    x = torch.arange(64.0).reshape(1, 1, 8, 8) + 1
    out = down(x)
    assert out.shape == (1, 1, 4, 4)
    if padding == "ddpm":
        # TF "SAME" pads only bottom/right: window (i, j) starts at input (2i, 2j)
        torch.testing.assert_close(out, x[:, :, ::2, ::2])
    else:
        # padding=1: window (i, j) starts at input (2i - 1, 2j - 1), the zero padding for i = 0 or j = 0
        expected = torch.zeros(1, 1, 4, 4)
        expected[:, :, 1:, 1:] = x[:, :, 1:-1:2, 1:-1:2]
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("cls", [UNet, EncoderUNet])
def test_norm_eps_reaches_every_groupnorm(cls):
    for kw, eps in [({}, 1e-6), (ADM_CHOICES, 1e-5)]:
        model = cls(**TINY, resblock_updown=True, **kw)
        norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert len(norms) > 5 and all(m.eps == eps for m in norms), (kw, [m.eps for m in norms])
        # the (non-ResBlock) downsamplers follow `downsample` as well
        model = cls(**TINY, **kw)
        pads = [m.pad for m in model.modules() if isinstance(m, Downsample)]
        assert pads == [(0, 1, 0, 1) if not kw else None]


@pytest.mark.parametrize("cls", [UNet, EncoderUNet])
@pytest.mark.parametrize("name", sorted(ADM_CHOICES))
def test_each_adm_choice_changes_the_function_not_the_parameters(cls, name):
    # each of the three alone must reach the forward pass (the DDPM-vs-diffusers test in test_pretrained.py then
    # shows that the defaults are DDPM's)
    ddpm = randomize(cls(**TINY)).eval()
    adm = cls(**TINY, **{name: ADM_CHOICES[name]}).eval()
    adm.load_state_dict(ddpm.state_dict())  # same names and shapes
    x, t = inputs()
    with torch.no_grad():
        a, b = ddpm(x, t), adm(x, t)
    # (eps 1e-6 vs 1e-5 moves GroupNorm's output by ~ (1e-5 - 1e-6) / (2 var) relative: small but far above round-off)
    assert (a - b).abs().max() > 1e-6, (a - b).abs().max()


@pytest.mark.parametrize("kw, match", [
    (dict(downsample="same"), "downsample"),
    (dict(embed_freq="tf"), "embed_freq"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(norm_eps="1e-6"), "norm_eps"),
    (dict(ch=2, ch_mult=(1,), attn_resolutions=()), "ch >= 4"),
])
def test_bad_choices_raise(kw, match):
    for cls in (UNet, EncoderUNet):
        with pytest.raises(ValueError, match=match):
            cls(**{**TINY, **kw})


# -----------------------------------------------------------------------------
# the full-size network


def test_default_param_count_is_ddpm_cifar10():
    # DDPM's CIFAR-10 model has 35.75M parameters (Ho et al. 2020, App. B)
    assert abs(n_params(UNet()) - 35.7e6) <= 0.1e6


# -----------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("kw, out_c", [
    (dict(), 3),
    (dict(learn_sigma=True), 6),
    (dict(num_classes=10), 3),
    (dict(num_head_channels=16), 3),
    (dict(num_heads=4), 3),
    (dict(resblock_updown=True), 3),
    (dict(use_scale_shift_norm=True), 3),
    (dict(attn_resolutions=(16, 8)), 3),
    (dict(in_channels=1), 1),
    (dict(in_channels=1, learn_sigma=True), 2),
    (dict(image_size=8, attn_resolutions=(8, 4)), 3),
    (dict(image_size=32, ch_mult=(1, 2, 2), attn_resolutions=(16, 8)), 3),
    (dict(ch_mult=(1, 2, 2), num_res_blocks=2, resblock_updown=True, use_scale_shift_norm=True,
          attn_resolutions=(16, 8, 4), num_head_channels=16, num_classes=5, learn_sigma=True), 6),
])
def test_unet_output_shapes(kw, out_c):
    cfg = {**TINY, **kw}
    model = UNet(**cfg).eval()
    x, t = inputs(c=cfg["in_channels"] if "in_channels" in cfg else 3, size=cfg["image_size"])
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == (2, out_c, cfg["image_size"], cfg["image_size"])
        if "num_classes" in kw:
            assert model(x, t, torch.tensor([0, 4])).shape == out.shape
        assert model(x, t.float()).shape == out.shape  # float timesteps are fine too


@pytest.mark.parametrize("pool", ["adaptive", "attention"])
def test_encoder_unet_shapes(pool):
    model = EncoderUNet(**TINY, out_dim=7, pool=pool, num_head_channels=16).eval()
    x, t = inputs()
    with torch.no_grad():
        assert model(x, t).shape == (2, 7)
    model = EncoderUNet(**{**TINY, "attn_resolutions": (16, 8)}, out_dim=3, pool=pool,
                        resblock_updown=True, use_scale_shift_norm=True, in_channels=1)
    assert model(inputs(c=1)[0], t).shape == (2, 3)


def test_encoder_unet_rejects_unknown_pool():
    with pytest.raises(ValueError):
        EncoderUNet(**TINY, pool="max")


# -----------------------------------------------------------------------------
# memory format and mixed precision


def test_channels_last_matches_contiguous():
    model = randomize(UNet(**TINY, num_head_channels=16, use_scale_shift_norm=True)).eval()
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
        assert ref.abs().mean() > 1e-3  # non-trivial output
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_close_to_fp32():
    model = randomize(UNet(**TINY, num_classes=3, learn_sigma=True)).eval()
    x, t = inputs()
    y = torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert torch.isfinite(out).all()
    # bf16 keeps 8 mantissa bits, i.e. a relative rounding error of 2^-9 ~ 0.2%
    # per op. Through the ~15 conv/linear/attention layers of this net these
    # errors add up (partly cancelling, GroupNorm in fp32 re-normalises), so a
    # few percent of relative error is expected; 5% still catches a real bug
    # (e.g. a wrong dtype cast or an overflow), which gives O(100%).
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


# -----------------------------------------------------------------------------
# class conditioning


def test_null_class_and_conditioning():
    k = 5
    model = randomize(UNet(**TINY, num_classes=k)).eval()
    x, t = inputs()
    with torch.no_grad():
        uncond = model(x, t)  # y=None: the whole batch gets the null class
        torch.testing.assert_close(uncond, model(x, t, torch.full((2,), k)))
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4
    assert (a - uncond).abs().max() > 1e-4


def test_y_on_unconditional_model_raises():
    model = UNet(**TINY)
    x, t = inputs()
    with pytest.raises(ValueError):
        model(x, t, torch.tensor([0, 1]))


def test_different_timesteps_give_different_outputs():
    model = randomize(UNet(**TINY)).eval()
    x, _ = inputs()
    with torch.no_grad():
        a = model(x, torch.tensor([0, 0]))
        b = model(x, torch.tensor([500, 500]))
    assert (a - b).abs().max() > 1e-4


# -----------------------------------------------------------------------------
# config / checkpoint round trip


@pytest.mark.parametrize("cls, kw", [
    (UNet, dict(num_classes=4, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True)),
    (UNet, ADM_CHOICES),
    (EncoderUNet, dict(pool="attention", out_dim=5, num_head_channels=16)),
    (EncoderUNet, ADM_CHOICES),
])
def test_config_and_state_dict_round_trip(cls, kw):
    model = randomize(cls(**TINY, **kw)).eval()
    # the config is plain python (survives JSON) and rebuilds the same model
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    buf = io.BytesIO()
    torch.save({"config": model.config, "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    rebuilt = cls(**ckpt["config"]).eval()
    assert n_params(rebuilt) == n_params(model)
    rebuilt.load_state_dict(ckpt["model"])
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), model(x, t))


def test_default_config_rebuilds():
    config = UNet(**TINY).config
    assert config["ch_mult"] == [1, 2] and config["num_classes"] is None
    assert (config["downsample"], config["embed_freq"], config["norm_eps"]) == ("ddpm", "ddpm", 1e-6)
    assert n_params(UNet(**config)) == n_params(UNet(**TINY))


# -----------------------------------------------------------------------------
# gradients: every parameter must receive one (DDP errors on unused parameters)


@pytest.mark.parametrize("make", [
    lambda: UNet(**TINY, num_classes=3, learn_sigma=True, num_head_channels=16),
    lambda: UNet(**TINY, num_classes=3, resblock_updown=True, use_scale_shift_norm=True),
    lambda: EncoderUNet(**TINY, pool="adaptive"),
    lambda: EncoderUNet(**TINY, pool="attention", resblock_updown=True, use_scale_shift_norm=True),
])
def test_gradient_reaches_every_parameter(make):
    # randomize so that no gradient is zero just because of zero-initialised layers
    model = randomize(make()).train()
    x, t = inputs()
    out = model(x, t, torch.tensor([0, 3])) if isinstance(model, UNet) else model(x, t)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


# -----------------------------------------------------------------------------
# checkpoints written before DDPM's choices became the default (checkpoint format 1)

# The TINY net's output as unet.py computed it before DDPM's choices became the default (git f4f9d73), every 191st element, for the weights
# and inputs below: torch.manual_seed(0), UNet(**TINY), randomize(), inputs(). (DDPM's choices move these by up to
# 0.5; norm_eps alone by up to 3.5e-5.)
PRE_ISSUE_11 = [0.0037863969, -0.020637898, -0.36979294, 0.16200072, 0.050543815, 0.37875572, 0.0071804156,
                -0.09010794, -0.1188966]


def test_adm_choices_reproduce_the_function_before_issue_11():
    torch.manual_seed(0)
    model = randomize(UNet(**TINY, **ADM_CHOICES)).eval()
    x, t = inputs()
    with torch.no_grad():
        out = model(x, t).flatten()[::191]
    torch.testing.assert_close(out, torch.tensor(PRE_ISSUE_11), rtol=0, atol=2e-6)


def test_old_format_checkpoint_loads_with_adm_choices(tmp_path):
    import checkpoint  # (checkpoint.upgrade: a checkpoint of train.py before format 2)

    torch.manual_seed(0)
    old = randomize(UNet(**TINY, **ADM_CHOICES)).eval()
    config = dict(image_size=16, ch=32, ch_mult="1,2", num_res_blocks=1, attn="8", dropout=0.0, num_heads=1,
                  num_head_channels=-1, resblock_updown=False, scale_shift_norm=False, schedule="linear",
                  diffusion_steps=1000, loss="mse", num_classes=10, class_cond=False, task="diffusion")
    torch.save({"model": old.state_dict(), "ema": old.state_dict(), "step": 1, "config": config}, tmp_path / "ckpt.pt")
    ckpt = checkpoint.load(tmp_path / "ckpt.pt")
    assert {k: ckpt["model_args"][k] for k in ADM_CHOICES} == ADM_CHOICES
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.build_network(ckpt)(x, t), old(x, t), rtol=0, atol=0)
