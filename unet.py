"""
The U-Net that predicts the noise.

The short story
---------------
Every diffusion model in this repository (DDPM, DDIM sampling, iDDPM's learned
variances, classifier-free and classifier guidance) needs one function
eps_theta(x_t, t[, y]): given a noisy image x_t and its timestep t, predict the
noise eps that was mixed into it. Its output has the same shape as its input, so
the natural architecture is an image-to-image network: a U-Net.

The network here is the one from DDPM (Ho et al. 2020, App. B), itself a
PixelCNN++ / Wide-ResNet style U-Net:

    x --conv_in--> [ResBlock x num_res_blocks (+Attn) , Downsample] per level
                   middle: ResBlock - Attn - ResBlock
                   [ResBlock x (num_res_blocks + 1) (+Attn), Upsample] per level,
                   each ResBlock eating one skip connection from the encoder
      --GroupNorm-SiLU-conv_out--> eps

The timestep enters through a sinusoidal embedding (as in the Transformer's
positional encoding) fed to a small MLP; every ResBlock adds a projection of
it to its feature maps. With the default arguments (ch=128, ch_mult=(1,2,2,2),
two res blocks per level, attention at 16x16, dropout 0.1) this is exactly the
35.7M-parameter DDPM CIFAR-10 model.

"Diffusion Models Beat GANs" (ADM, Dhariwal & Nichol 2021, §3) then made a
handful of architectural improvements, all available as switches here:
  * multi-head attention (num_heads, or num_head_channels = channels per head),
    at several resolutions (attn_resolutions=(32, 16, 8)),
  * BigGAN-style residual blocks for up/downsampling (resblock_updown=True),
  * adaptive group normalisation, AdaGN (use_scale_shift_norm=True): the
    embedding predicts a per-channel scale and shift applied after GroupNorm.

Two more options serve other papers:
  * learn_sigma=True doubles the output channels: iDDPM (Nichol & Dhariwal
    2021, §3.1) also predicts v, the interpolation between beta_t and
    beta~_t in log space for the reverse-process variance.
  * num_classes=K adds a class embedding to the time embedding. Row K of that
    table is a learned "null" class: classifier-free guidance (Ho & Salimans
    2022) trains with labels randomly dropped to it, and samples by mixing the
    conditional and the unconditional (null) predictions.

DDPM's code or ADM's code? Three parameter-free details differ between the two
and change the function a given set of weights computes (default net, diffusers'
random init: outputs of size ~1.6 move by up to 0.7; with DDPM's three, ours
equals diffusers' port of DDPM to 3e-6). By default this file follows DDPM's
TensorFlow code (diffusion_tf), so that DDPM's released weights (pretrained.py)
compute what they computed for the paper; each is a constructor argument:
                      DDPM (default)                       ADM (guided-diffusion)
  downsample          pad (0,1,0,1) ("SAME"), conv pad 0   conv padding=1       "ddpm" | "adm"
  embed_freq          10000^(-i / (half - 1))              10000^(-i / half)    "ddpm" | "adm"
  norm_eps            GroupNorm eps 1e-6 (TF default)      1e-5 (torch default) a float
ADM_CHOICES holds ADM's three. UNet(..., **ADM_CHOICES) is the function every
checkpoint this repository wrote before the DDPM choices became the default
was trained with, and ADM's function when combined with the ADM options above
(guided-diffusion also puts the cosines before the sines in the embedding: a
permutation of time_embed.0's input columns, to apply when loading its weights).

Finally EncoderUNet is the down half of the same network with a pooling head:
the noise-aware classifier p_phi(y | x_t, t) of classifier guidance (ADM §4).
It is built from the very same blocks (see `_build_encoder`).

Tensor shape conventions: N batch, C channels, H, W spatial, L = H*W tokens.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------
# small helpers


# ADM's three parameter-free choices (see the module docstring). Checkpoints trained before the DDPM choices became
# the default rebuild their exact function with UNet(**model_args, **ADM_CHOICES).
ADM_CHOICES = {"downsample": "adm", "embed_freq": "adm", "norm_eps": 1e-5}
CHOICES = ("ddpm", "adm")


def check_choices(ch, downsample, embed_freq, norm_eps):
    """One clear error for a bad downsample / embed_freq / norm_eps (they come from checkpoints and configs)."""
    if downsample not in CHOICES:
        raise ValueError(f"downsample: unknown {downsample!r}; use 'ddpm' (DDPM's asymmetric padding) or 'adm' (padding=1)")
    if embed_freq not in CHOICES:
        raise ValueError(f"embed_freq: unknown {embed_freq!r}; use 'ddpm' (10000^(-i/(half-1))) or 'adm' (10000^(-i/half))")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise ValueError(f"norm_eps: must be a positive float (DDPM 1e-6, ADM 1e-5), got {norm_eps!r}")
    if embed_freq == "ddpm" and ch < 4:
        raise ValueError(f"ch: DDPM's embedding frequencies need ch >= 4 (two sine/cosine pairs), got {ch}; "
                         "use a larger ch or embed_freq='adm'")


def timestep_embedding(t, dim, max_period=10000, freq="ddpm"):
    """Sinusoidal embedding of (possibly fractional) timesteps, [N] -> [N, dim] float32.

    DDPM App. B: "diffusion time t is specified by adding the Transformer
    sinusoidal position embedding into each residual block".
    freq="ddpm" spaces the frequencies as DDPM's code does, "adm" as ADM's (and the Transformer's).
    """
    half = dim // 2
    if freq == "ddpm":
        if half < 2:
            raise ValueError(f"dim: DDPM's embedding frequencies need dim >= 4, got {dim}; use freq='adm'")
        # DDPM's get_timestep_embedding (diffusion_tf/nn.py) divides by half - 1:
        #   freq_i = max_period ** (-i / (half - 1)),  i = 0 .. half-1  (the last one is exactly 1/max_period)
        denom = half - 1
    elif freq == "adm":
        # ADM (guided-diffusion nn.timestep_embedding) and the Transformer (Vaswani et al. 2017, §3.5):
        #   freq_i = max_period ** (-i / half),  i = 0 .. half-1
        denom = half
    else:
        raise ValueError(f"freq: unknown {freq!r}; use 'ddpm' or 'adm'")
    # one frequency per pair of channels:
    #   emb(t) = [sin(t * freq_0), ..., sin(t * freq_{half-1}),
    #             cos(t * freq_0), ..., cos(t * freq_{half-1})]
    # (all sines first, then all cosines, like the DDPM code; frequencies run
    # from 1 down to ~1/max_period, so both fine and coarse timing is encoded)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / denom)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:  # odd dim: pad one zero channel
        emb = F.pad(emb, (0, 1))
    return emb


def normalization(channels, eps=1e-6):
    """GroupNorm with 32 groups, as in DDPM/ADM. If `channels` is not a multiple
    of 32 (only happens in tiny test configs) fall back to gcd(32, channels)
    groups so that small models still build.

    eps: 1e-6 in DDPM's code (tf.contrib.layers.group_norm's default, diffusion_tf/nn.py),
    1e-5 in ADM's (torch's nn.GroupNorm default, guided-diffusion nn.GroupNorm32)."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps)


def zero_module(module):
    """Zero all parameters of `module` and return it. Used on the last conv of
    each residual branch and on the output conv, so that every block starts out
    as the identity and the network starts out predicting eps = 0. (DDPM's code
    uses init scale 1e-10 for those layers; ADM uses exactly 0.)"""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resolve_heads(channels, num_heads, num_head_channels):
    """ADM lets you fix either the number of heads or the width of one head
    (num_head_channels, e.g. 64); the latter wins when it is not -1."""
    if num_head_channels == -1:
        assert channels % num_heads == 0, f"{channels} channels do not split into {num_heads} heads"
        return num_heads
    assert channels % num_head_channels == 0, f"{channels} channels do not split into heads of {num_head_channels}"
    return channels // num_head_channels


def time_mlp(ch, emb_dim):
    """The timestep MLP of DDPM: Linear(ch, 4ch) - SiLU - Linear(4ch, 4ch).
    The final SiLU is applied inside each ResBlock, before its projection."""
    return nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


# -----------------------------------------------------------------------------
# building blocks (shared by UNet and EncoderUNet)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, optionally followed by a 3x3 conv (DDPM)."""

    def __init__(self, channels, with_conv=True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else nn.Identity()

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """2x downsampling: a strided 3x3 conv (DDPM), or 2x2 average pooling when
    with_conv=False (used inside the BigGAN-style ResBlocks, where the conv
    comes right after anyway).

    padding="ddpm" or "adm" places the conv's window (same parameters, same
    output size, a different function: see below)."""

    def __init__(self, channels, with_conv=True, padding="ddpm"):
        super().__init__()
        self.pad = None
        if not with_conv:
            self.op = nn.AvgPool2d(2)
        elif padding == "ddpm":
            # DDPM (diffusion_tf/models/unet.py, downsample): a stride-2 conv with TensorFlow's "SAME" padding, which
            # for an even size pads one row and column, at the bottom and right only: F.pad order (left, right, top,
            # bottom) = (0, 1, 0, 1). Output pixel (i, j) sees input rows 2i..2i+2 and columns 2j..2j+2.
            self.pad = (0, 1, 0, 1)
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        else:
            # ADM (guided-diffusion unet.py, Downsample): padding=1 on every side. Output pixel (i, j) sees input
            # rows 2i-1..2i+1: the window sits one pixel up and left of DDPM's.
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.op(x)


class ResBlock(nn.Module):
    """Wide-ResNet block conditioned on the (time [+ class]) embedding.

        h = conv1(SiLU(GroupNorm(x)))          (optionally resampled, see below)
        h = h + Linear(SiLU(emb))              (DDPM)
          or GroupNorm(h) * (1 + scale) + shift  with (scale, shift) = Linear(SiLU(emb))  (ADM AdaGN)
        h = conv2(dropout(SiLU(GroupNorm(h))))
        out = skip(x) + h                      (skip = 1x1 conv when channels change)

    With up=True / down=True this is the BigGAN-style resampling block of ADM
    §3: both the residual branch (after its first norm+activation) and the skip
    path are resampled, without a conv of their own.
    """

    def __init__(self, in_ch, out_ch, emb_dim, dropout=0.0, use_scale_shift_norm=False, up=False, down=False,
                 norm_eps=1e-6):
        super().__init__()
        assert not (up and down)
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = normalization(in_ch, norm_eps)
        if up:
            self.resample = Upsample(in_ch, with_conv=False)
        elif down:
            self.resample = Downsample(in_ch, with_conv=False)
        else:
            self.resample = nn.Identity()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # AdaGN needs a scale and a shift per channel, plain DDPM only a bias
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = normalization(out_ch, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(x))
        # resample after the first activation (ADM); a no-op for ordinary blocks
        h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # [N, C or 2C, 1, 1], broadcasts over H, W
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift  # "1 +": starts out as plain GroupNorm
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all H*W positions, residual, pre-norm.

    DDPM uses one head at 16x16; ADM §3 uses several heads (or 64 channels per
    head) at 32, 16 and 8. Q, K, V come from one 1x1 conv; the attention itself
    is torch's fused scaled_dot_product_attention (flash / memory-efficient on
    CUDA), which also does the 1/sqrt(d) scaling.
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1, norm_eps=1e-6):
        super().__init__()
        self.num_heads = resolve_heads(channels, num_heads, num_head_channels)
        self.norm = normalization(channels, norm_eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        H = x.shape[2]
        qkv = self.qkv(self.norm(x))
        # [N, 3*C, H, W] -> 3 x [N, heads, H*W, C/heads]; pure views, no copy
        q, k, v = rearrange(qkv, "n (three h d) x y -> three n h (x y) d", three=3, h=self.num_heads)
        # the fused CUDA kernels need unit stride along the head dim: channels_last
        # inputs already have it (channels are innermost), NCHW ones get a copy.
        # (a check on metadata only, no host-device sync)
        if q.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = F.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "n h (x y) d -> n (h d) x y", x=H)
        return x + self.proj(h)


class EmbedSequential(nn.Sequential):
    """nn.Sequential that hands the embedding to the ResBlocks inside it
    (ADM's TimestepEmbedSequential), so a level is one entry in a ModuleList."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _build_encoder(image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
                   num_heads, num_head_channels, resblock_updown, use_scale_shift_norm, emb_dim, downsample, norm_eps):
    """The down path + middle block shared by UNet and EncoderUNet.

    Returns (down, middle, skip_channels, ch_out, res_out):
      down:          ModuleList of EmbedSequential; down[0] is conv_in
      middle:        EmbedSequential(ResBlock, Attn, ResBlock)
      skip_channels: channels of each down-block output (the U-Net's skips)
      ch_out, res_out: channels and spatial size at the bottom
    """
    assert image_size % 2 ** (len(ch_mult) - 1) == 0, "image_size must be divisible by 2**(len(ch_mult)-1)"
    res_kw = dict(emb_dim=emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, norm_eps=norm_eps)
    attn_kw = dict(num_heads=num_heads, num_head_channels=num_head_channels, norm_eps=norm_eps)

    down = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skip_channels = [ch]
    cur, res = ch, image_size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            layers = [ResBlock(cur, ch * mult, **res_kw)]
            cur = ch * mult
            if res in attn_resolutions:  # attention after the res block (DDPM: at 16x16)
                layers.append(AttentionBlock(cur, **attn_kw))
            down.append(EmbedSequential(*layers))
            skip_channels.append(cur)
        if level != len(ch_mult) - 1:  # no downsampling after the last level
            if resblock_updown:
                down.append(EmbedSequential(ResBlock(cur, cur, down=True, **res_kw)))
            else:
                down.append(EmbedSequential(Downsample(cur, padding=downsample)))
            skip_channels.append(cur)
            res //= 2

    middle = EmbedSequential(
        ResBlock(cur, cur, **res_kw),
        AttentionBlock(cur, **attn_kw),
        ResBlock(cur, cur, **res_kw),
    )
    return down, middle, skip_channels, cur, res


def _config(local_vars, names):
    """Constructor kwargs as a plain, JSON/pickle-friendly dict (tuples -> lists)."""
    cfg = {}
    for name in names:
        v = local_vars[name]
        cfg[name] = list(v) if isinstance(v, (tuple, list)) else v
    return cfg


# -----------------------------------------------------------------------------
# the networks


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): the noise-prediction U-Net.

    Defaults are the DDPM CIFAR-10 network (35.7M parameters), computing the
    function of DDPM's code. ADM's improvements: num_heads /
    num_head_channels, more attn_resolutions, resblock_updown,
    use_scale_shift_norm; ADM's function also needs **ADM_CHOICES
    (downsample="adm", embed_freq="adm", norm_eps=1e-5), which are also what
    checkpoints of format 1 were trained with. num_classes enables
    class conditioning (with a null class for classifier-free guidance);
    learn_sigma doubles the output channels for iDDPM's learned variance.
    """

    def __init__(self, image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, num_heads=1, num_head_channels=-1,
                 resblock_updown=False, use_scale_shift_norm=False, num_classes=None, learn_sigma=False,
                 downsample="ddpm", embed_freq="ddpm", norm_eps=1e-6, latent_dim=None):
        super().__init__()
        check_choices(ch, downsample, embed_freq, norm_eps)
        self.config = _config(locals(), [
            "image_size", "in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
            "num_heads", "num_head_channels", "resblock_updown", "use_scale_shift_norm", "num_classes",
            "learn_sigma", "downsample", "embed_freq", "norm_eps", "latent_dim"])
        self.ch, self.embed_freq = ch, embed_freq
        self.num_classes = num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        emb_dim = 4 * ch

        self.time_embed = time_mlp(ch, emb_dim)
        if num_classes is not None:
            # one extra row: index num_classes is the learned null label of
            # classifier-free guidance (Ho & Salimans 2022)
            self.label_embed = nn.Embedding(num_classes + 1, emb_dim)
        self.latent_dim = latent_dim
        if latent_dim is not None:
            # DDGAN's generator G(x_t, z, t) (ddgan.py): the latent z through an MLP, added to the time embedding like
            # the class embedding (DDGAN's NCSN++ feeds it to AdaGN instead)
            self.latent_embed = time_mlp(latent_dim, emb_dim)

        self.down, self.middle, skip_channels, cur, res = _build_encoder(
            image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
            num_heads, num_head_channels, resblock_updown, use_scale_shift_norm, emb_dim, downsample, norm_eps)

        res_kw = dict(emb_dim=emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, norm_eps=norm_eps)
        attn_kw = dict(num_heads=num_heads, num_head_channels=num_head_channels, norm_eps=norm_eps)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            # one more block than on the way down: it eats the skip from the
            # downsampler (or conv_in) of the level
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(cur + skip_channels.pop(), ch * mult, **res_kw)]
                cur = ch * mult
                if res in attn_resolutions:
                    layers.append(AttentionBlock(cur, **attn_kw))
                if level != 0 and i == num_res_blocks:  # upsample at the end of every level but the top
                    if resblock_updown:
                        layers.append(ResBlock(cur, cur, up=True, **res_kw))
                    else:
                        layers.append(Upsample(cur))
                    res *= 2
                self.up.append(EmbedSequential(*layers))
        assert not skip_channels

        self.out = nn.Sequential(
            normalization(cur, norm_eps),
            nn.SiLU(),
            zero_module(nn.Conv2d(cur, self.out_channels, 3, padding=1)),
        )

    def embed(self, t, y, n, dtype):
        """Time (+ class) embedding, [N, 4ch]."""
        if t.ndim == 0:  # a single timestep for the whole batch
            t = t.expand(n)
        emb = self.time_embed(timestep_embedding(t, self.ch, freq=self.embed_freq).to(dtype))
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y was given but this UNet is unconditional (num_classes=None)")
        else:
            if y is None:  # whole batch unconditional: the null class
                y = torch.full((n,), self.num_classes, dtype=torch.long, device=t.device)
            emb = emb + self.label_embed(y)
        return emb

    def forward(self, x, t, y=None, z=None):
        """x: [N, C, H, W] noisy images, t: [N] timestep indices (long or float),
        y: [N] class labels in 0..num_classes (num_classes = null) or None,
        z: [N, latent_dim] latents when built with latent_dim (a DDGAN generator), else None.
        Returns [N, C, H, W] predicted noise, or [N, 2C, H, W] = (eps, v) when learn_sigma."""
        emb = self.embed(t, y, x.shape[0], self.time_embed[0].weight.dtype)
        if (z is None) != (self.latent_dim is None):
            raise ValueError(f"z: this UNet has latent_dim={self.latent_dim}; pass z of shape [N, latent_dim] "
                             f"exactly when latent_dim is set")
        if z is not None:
            emb = emb + self.latent_embed(z.to(emb.dtype))
        h = x
        skips = []
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # U-Net skip: concatenate along channels
        return self.out(h)


class AttentionPool2d(nn.Module):
    """ADM's attention pooling (from CLIP): the mean of all positions, as an
    extra token, attends to all H*W + 1 (position-embedded) tokens; its output,
    projected to out_dim, is the result. Only that one query is computed."""

    def __init__(self, spatial, channels, num_heads, out_dim):
        super().__init__()
        self.num_heads = num_heads
        self.pos_embed = nn.Parameter(torch.randn(spatial * spatial + 1, channels) / channels ** 0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x):
        tokens = rearrange(x, "n c x y -> n (x y) c")
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos_embed  # [N, L+1, C]
        q, k, v = rearrange(self.qkv(tokens), "n l (three h d) -> three n h l d", three=3, h=self.num_heads)
        h = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only the mean token queries: [N, heads, 1, d]
        return self.proj(rearrange(h, "n h 1 d -> n (h d)"))


class EncoderUNet(nn.Module):
    """The down half of the U-Net plus a pooling head: the noisy-image
    classifier p_phi(y | x_t, t) of classifier guidance (ADM §4).

    pool="adaptive": GroupNorm - SiLU - global average pool - Linear.
    pool="attention": GroupNorm - SiLU - AttentionPool2d (what ADM uses).
    downsample, embed_freq, norm_eps: DDPM's or ADM's details, as in UNet.
    """

    def __init__(self, image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.0, num_heads=1, num_head_channels=-1,
                 resblock_updown=False, use_scale_shift_norm=False, out_dim=10, pool="adaptive",
                 downsample="ddpm", embed_freq="ddpm", norm_eps=1e-6):
        super().__init__()
        check_choices(ch, downsample, embed_freq, norm_eps)
        self.config = _config(locals(), [
            "image_size", "in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
            "num_heads", "num_head_channels", "resblock_updown", "use_scale_shift_norm", "out_dim", "pool",
            "downsample", "embed_freq", "norm_eps"])
        self.ch, self.embed_freq = ch, embed_freq
        emb_dim = 4 * ch
        self.time_embed = time_mlp(ch, emb_dim)
        self.down, self.middle, _, cur, res = _build_encoder(
            image_size, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout,
            num_heads, num_head_channels, resblock_updown, use_scale_shift_norm, emb_dim, downsample, norm_eps)
        if pool == "adaptive":
            head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cur, out_dim)]
        elif pool == "attention":
            head = [AttentionPool2d(res, cur, resolve_heads(cur, num_heads, num_head_channels), out_dim)]
        else:
            raise ValueError(f"unknown pool {pool!r}, expected 'adaptive' or 'attention'")
        self.out = nn.Sequential(normalization(cur, norm_eps), nn.SiLU(), *head)

    def forward(self, x, t):
        """x: [N, C, H, W] noisy images, t: [N] timesteps -> [N, out_dim] logits."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.ch, freq=self.embed_freq).to(self.time_embed[0].weight.dtype))
        h = x
        for block in self.down:
            h = block(h, emb)
        return self.out(self.middle(h, emb))
