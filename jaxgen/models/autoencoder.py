"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), laid out as diffusers' AutoencoderKL.

Every parameter's path is diffusers' state-dict name with `/` for `.` and
kernel/scale for weight (`encoder/down_blocks/0/resnets/1/norm1/scale` is
`encoder.down_blocks.0.resnets.1.norm1.weight`), so `jaxgen.outputs.diffusers_vae`
converts by renaming and transposing alone. The math is diffusers': GroupNorm
eps 1e-6 and SiLU everywhere, ResNet blocks with a 1x1 shortcut where the
width changes, downsampling by a stride-2 3x3 convolution after padding one
pixel on the bottom and right, nearest-neighbour upsampling then a 3x3
convolution, one single-head self-attention in each mid block, and the
log-variance clamped to [-30, 20].

Shape letters: B batch, H W image height and width, C image channels, h w latent
height and width, Z latent channels, D hidden channels, L = h*w attention positions.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config import AutoencoderConfig
from jaxgen.models.conv import Conv2d, GroupNorm, conv_flops, upsample_nearest
from jaxgen.models.layers import Dtypes, Linear, dot_product_attention
from jaxgen.sharding import constrain

EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)
# Downsample2D pads only the bottom and the right before its unpadded stride-2 convolution.
DOWN_PADDING = ((0, 1), (0, 1))


def _constrain(x_BHWD: jax.Array) -> jax.Array:
    return constrain(x_BHWD, ("act_batch", None, None, None))


class ResnetBlock(nnx.Module):
    """GroupNorm, SiLU, 3x3 convolution, twice, plus the input (through a 1x1 convolution when widths differ)."""

    def __init__(self, d_in: int, d_out: int, groups: int, dtypes: Dtypes, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(d_in, groups, eps=EPS, dtypes=dtypes)
        self.conv1 = Conv2d(d_in, d_out, 3, dtypes=dtypes, rngs=rngs)
        self.norm2 = GroupNorm(d_out, groups, eps=EPS, dtypes=dtypes)
        self.conv2 = Conv2d(d_out, d_out, 3, dtypes=dtypes, rngs=rngs)
        self.conv_shortcut = Conv2d(d_in, d_out, 1, dtypes=dtypes, rngs=rngs) if d_in != d_out else None

    def __call__(self, x_BHWD: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWD)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x_BHWD if self.conv_shortcut is None else self.conv_shortcut(x_BHWD)
        return _constrain(skip.astype(jnp.float32) + h)


class Attention(nnx.Module):
    """Single-head self-attention over every position, after a GroupNorm, added to its input."""

    def __init__(self, d: int, groups: int, dtypes: Dtypes, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(d, groups, eps=EPS, dtypes=dtypes)
        linear = lambda: Linear(d, d, ("embed", "mlp"), std=d ** -0.5, dtypes=dtypes, rngs=rngs, bias=True)
        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.to_out = nnx.List([linear()])  # diffusers' to_out is (Linear, Dropout)
        self.compute_dtype = dtypes.compute

    def __call__(self, x_BhwD: jax.Array) -> jax.Array:
        b, h, w, d = x_BhwD.shape
        x_BLD = self.group_norm(x_BhwD).reshape(b, h * w, d)
        q, k, v = (proj(x_BLD)[:, :, None, :].astype(self.compute_dtype) for proj in (self.to_q, self.to_k, self.to_v))
        # "xla", not jaxgen's CPU kernel: that one multiplies in bf16, and the VAE must match diffusers' float32.
        out_BLD = dot_product_attention(q, k, v, is_causal=False, implementation="xla")[:, :, 0, :]
        return _constrain(x_BhwD.astype(jnp.float32) + self.to_out[0](out_BLD).reshape(b, h, w, d))


class MidBlock(nnx.Module):
    """ResNet, self-attention (when the config has it), ResNet, at the narrowest resolution."""

    def __init__(self, cfg: AutoencoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        d, g = cfg.block_channels[-1], cfg.norm_groups
        self.resnets = nnx.List([ResnetBlock(d, d, g, dtypes, rngs), ResnetBlock(d, d, g, dtypes, rngs)])
        self.attentions = nnx.List([Attention(d, g, dtypes, rngs)]) if cfg.mid_attention else None

    def __call__(self, x_BhwD: jax.Array) -> jax.Array:
        x_BhwD = self.resnets[0](x_BhwD)
        if self.attentions is not None:
            x_BhwD = self.attentions[0](x_BhwD)
        return self.resnets[1](x_BhwD)


class Resample(nnx.Module):
    """diffusers' Downsample2D / Upsample2D: one 3x3 convolution named `conv`, strided or after upsampling."""

    def __init__(self, d: int, down: bool, dtypes: Dtypes, rngs: nnx.Rngs):
        self.down = down
        self.conv = Conv2d(d, d, 3, stride=2 if down else 1, padding=DOWN_PADDING if down else "SAME",
                           dtypes=dtypes, rngs=rngs)

    def __call__(self, x_BHWD: jax.Array) -> jax.Array:
        return _constrain(self.conv(x_BHWD if self.down else upsample_nearest(x_BHWD)))


def _resnets(d_in: int, d_out: int, n: int, groups: int, dtypes: Dtypes, rngs: nnx.Rngs) -> nnx.List:
    widths = [d_in] + [d_out] * n
    return nnx.List([ResnetBlock(a, b, groups, dtypes, rngs) for a, b in itertools.pairwise(widths)])


class DownEncoderBlock(nnx.Module):
    """ResNet blocks, then a downsampling unless it is the last level."""

    def __init__(self, d_in: int, d_out: int, n: int, down: bool, groups: int, dtypes: Dtypes, rngs: nnx.Rngs):
        self.resnets = _resnets(d_in, d_out, n, groups, dtypes, rngs)
        self.downsamplers = nnx.List([Resample(d_out, True, dtypes, rngs)]) if down else None

    def __call__(self, x_BHWD: jax.Array) -> jax.Array:
        for layer in [*self.resnets, *(self.downsamplers or ())]:
            x_BHWD = layer(x_BHWD)
        return x_BHWD


class UpDecoderBlock(nnx.Module):
    """ResNet blocks, then an upsampling unless it is the last level."""

    def __init__(self, d_in: int, d_out: int, n: int, up: bool, groups: int, dtypes: Dtypes, rngs: nnx.Rngs):
        self.resnets = _resnets(d_in, d_out, n, groups, dtypes, rngs)
        self.upsamplers = nnx.List([Resample(d_out, False, dtypes, rngs)]) if up else None

    def __call__(self, x_BHWD: jax.Array) -> jax.Array:
        for layer in [*self.resnets, *(self.upsamplers or ())]:
            x_BHWD = layer(x_BHWD)
        return x_BHWD


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        widths, g, n = cfg.block_channels, cfg.norm_groups, len(cfg.block_channels)
        self.conv_in = Conv2d(cfg.channels, widths[0], 3, axes=None, dtypes=dtypes, rngs=rngs)
        self.down_blocks = nnx.List([
            DownEncoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block, i < n - 1, g, dtypes, rngs)
            for i in range(n)])
        self.mid_block = MidBlock(cfg, dtypes, rngs)
        self.conv_norm_out = GroupNorm(widths[-1], g, eps=EPS, dtypes=dtypes)
        self.conv_out = Conv2d(widths[-1], 2 * cfg.latent_channels, 3, axes=None, dtypes=dtypes, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        """The moments (B, h, w, 2Z): means, then log-variances, before quant_conv."""
        x = _constrain(self.conv_in(x_BHWC))
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        widths, g, n = cfg.block_channels[::-1], cfg.norm_groups, len(cfg.block_channels)
        self.conv_in = Conv2d(cfg.latent_channels, widths[0], 3, axes=None, dtypes=dtypes, rngs=rngs)
        self.mid_block = MidBlock(cfg, dtypes, rngs)
        self.up_blocks = nnx.List([
            UpDecoderBlock(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1, i < n - 1, g, dtypes, rngs)
            for i in range(n)])
        self.conv_norm_out = GroupNorm(widths[-1], g, eps=EPS, dtypes=dtypes)
        self.conv_out = Conv2d(widths[-1], cfg.channels, 3, axes=None, dtypes=dtypes, rngs=rngs)

    def features(self, z_BhwZ: jax.Array) -> jax.Array:
        """What `conv_out` turns into the image: the last activations, normalised and through SiLU."""
        x = self.mid_block(_constrain(self.conv_in(z_BhwZ)))
        for level in self.up_blocks:
            x = level(x)
        return jax.nn.silu(self.conv_norm_out(x))

    def __call__(self, z_BhwZ: jax.Array) -> jax.Array:
        return self.conv_out(self.features(z_BhwZ))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtypes = Dtypes.of(cfg)
        z = cfg.latent_channels
        self.encoder = Encoder(cfg, dtypes, rngs)
        self.decoder = Decoder(cfg, dtypes, rngs)
        self.quant_conv = Conv2d(2 * z, 2 * z, 1, axes=None, dtypes=dtypes, rngs=rngs) if cfg.quant_conv else None
        self.post_quant_conv = Conv2d(z, z, 1, axes=None, dtypes=dtypes, rngs=rngs) if cfg.quant_conv else None

    def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The posterior's mean and log-variance, each (B, h, w, Z) in float32."""
        moments = self.encoder(x_BHWC)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean_BhwZ, logvar_BhwZ = jnp.split(moments, 2, axis=-1)
        return mean_BhwZ, jnp.clip(logvar_BhwZ, *LOGVAR_RANGE)

    def decoder_features(self, z_BhwZ: jax.Array) -> jax.Array:
        """The input of `decoder.conv_out`: decode(z) == decoder.conv_out(decoder_features(z))."""
        if self.post_quant_conv is not None:
            z_BhwZ = self.post_quant_conv(z_BhwZ)
        return self.decoder.features(z_BhwZ)

    def decode(self, z_BhwZ: jax.Array) -> jax.Array:
        """Images (B, H, W, C) in float32."""
        return self.decoder.conv_out(self.decoder_features(z_BhwZ))

    def __call__(self, x_BHWC: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(reconstruction, mean, logvar): decoded from a sample of the posterior when `rng` is given, else its mean."""
        mean, logvar = self.encode(x_BHWC)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


def flops_per_image(cfg: AutoencoderConfig) -> float:
    """Training FLOPs per image: 3 x the forward pass's convolutions and attention (the backward pass
    computes two products per forward one: the gradients of the input and of the weights).
    GroupNorms, activations and additions are left out, as they are for the other models."""
    s, z, g = cfg.image_size, cfg.latent_channels, cfg.downsample_factor
    widths, n, layers = cfg.block_channels, len(cfg.block_channels), cfg.layers_per_block

    def resnet(side: int, d_in: int, d_out: int) -> float:
        shortcut = conv_flops(side, side, d_in, d_out, 1) if d_in != d_out else 0.0
        return conv_flops(side, side, d_in, d_out, 3) + conv_flops(side, side, d_out, d_out, 3) + shortcut

    def mid(side: int, d: int) -> float:
        positions = side * side
        attention = 4 * 2.0 * positions * d * d + 2 * 2.0 * positions * positions * d if cfg.mid_attention else 0.0
        return 2 * resnet(side, d, d) + attention

    quant = conv_flops(s // g, s // g, 2 * z, 2 * z, 1) + conv_flops(s // g, s // g, z, z, 1) if cfg.quant_conv else 0.0
    total = conv_flops(s, s, cfg.channels, widths[0], 3) + quant  # encoder's conv_in
    side, d = s, widths[0]
    for i, width in enumerate(widths):  # encoder levels
        for _ in range(layers):
            total, d = total + resnet(side, d, width), width
        if i < n - 1:
            side //= 2
            total += conv_flops(side, side, d, d, 3)
    total += mid(side, d) + conv_flops(side, side, d, 2 * z, 3)
    total += conv_flops(side, side, z, d, 3) + mid(side, d)  # decoder's conv_in and mid block
    for i, width in enumerate(widths[::-1]):  # decoder levels
        for _ in range(layers + 1):
            total, d = total + resnet(side, d, width), width
        if i < n - 1:
            side *= 2
            total += conv_flops(side, side, d, d, 3)
    total += conv_flops(side, side, d, cfg.channels, 3)
    return 3.0 * total
