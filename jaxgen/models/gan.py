"""A class-conditional convolutional GAN: generator and discriminator.

Generator: noise and the class's embedding -> a dense projection to a small
square -> per level, nearest-neighbour upsampling and two 3x3 convolutions with
GroupNorm and ReLU -> a 3x3 convolution to the image's channels and tanh, so
images lie in [-1, 1] as the data does. Discriminator: per level, a 3x3 and a
stride-2 4x4 convolution with leaky ReLU (no normalisation: the R1 penalty
keeps it smooth), a dense feature layer, and a projection score: a linear
score plus the inner product of the features with the class's embedding
(Miyato & Koyama 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config import GANConfig
from jaxgen.models.conv import Conv2d, GroupNorm, conv_flops, upsample_nearest
from jaxgen.models.layers import Dtypes, Linear

LEAK = 0.2
PAD_1 = ((1, 1), (1, 1))


def class_rows(table_KD: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Rows of a class-embedding table, as a one-hot product rather than a gather.

    With a gather (jnp.take, even from a replicated table) the generator's gradients came out
    wrong on a data x fsdp x tensor mesh of 2x2x2 CPU devices while its loss was right (XLA's
    partitioning of the gather's gradient); the product is one small matmul and correct on
    every mesh (tests/test_adversarial.py compares 2x2x2 with one device).
    """
    one_hot_BK = jax.nn.one_hot(labels_B, table_KD.shape[0], dtype=jnp.float32)
    return one_hot_BK @ table_KD.astype(jnp.float32)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class Generator(nnx.Module):
    def __init__(self, cfg: GANConfig, rngs: nnx.Rngs):
        dtypes = Dtypes.of(cfg)
        c0, self.base = cfg.generator_channels[0], cfg.base_size
        self.class_embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_classes, cfg.noise_dim), dtypes.param),
                                     out_sharding=(None, None))
        self.project = Linear(2 * cfg.noise_dim, self.base * self.base * c0, (None, "mlp"),
                              std=(1.0 / (2 * cfg.noise_dim)) ** 0.5, dtypes=dtypes, rngs=rngs, bias=True)
        self.project_norm = GroupNorm(c0, _groups(c0), eps=1e-5, dtypes=dtypes)
        pairs = list(zip(cfg.generator_channels[:-1], cfg.generator_channels[1:]))
        # No biases before a GroupNorm: it would subtract them again.
        self.up_convs = nnx.List([Conv2d(a, b, 3, bias=False, dtypes=dtypes, rngs=rngs) for a, b in pairs])
        self.up_norms = nnx.List([GroupNorm(b, _groups(b), eps=1e-5, dtypes=dtypes) for _, b in pairs])
        self.convs = nnx.List([Conv2d(b, b, 3, bias=False, dtypes=dtypes, rngs=rngs) for _, b in pairs])
        self.norms = nnx.List([GroupNorm(b, _groups(b), eps=1e-5, dtypes=dtypes) for _, b in pairs])
        self.to_image = Conv2d(cfg.generator_channels[-1], cfg.channels, 3, axes=("embed", None),
                               dtypes=dtypes, rngs=rngs)

    def __call__(self, noise_BZ: jax.Array, labels_B: jax.Array) -> jax.Array:
        """Images (B, H, W, C) in [-1, 1]."""
        z = jnp.concatenate([noise_BZ, class_rows(self.class_embed[...], labels_B).astype(noise_BZ.dtype)], axis=-1)
        h = self.project(z).reshape(z.shape[0], self.base, self.base, -1)
        h = jax.nn.relu(self.project_norm(h))
        for up, up_norm, conv, norm in zip(self.up_convs, self.up_norms, self.convs, self.norms):
            h = jax.nn.relu(up_norm(up(upsample_nearest(h))))
            h = jax.nn.relu(norm(conv(h)))
        return jnp.tanh(self.to_image(h))


class Discriminator(nnx.Module):
    def __init__(self, cfg: GANConfig, rngs: nnx.Rngs):
        dtypes = Dtypes.of(cfg)
        widths = cfg.discriminator_channels
        self.stem = Conv2d(cfg.channels, widths[0], 3, axes=(None, "mlp"), dtypes=dtypes, rngs=rngs)
        self.convs = nnx.List([Conv2d(w, w, 3, dtypes=dtypes, rngs=rngs) for w in widths])
        outs = [*widths[1:], widths[-1]]
        self.downs = nnx.List([Conv2d(w, o, 4, stride=2, padding=PAD_1, dtypes=dtypes, rngs=rngs)
                               for w, o in zip(widths, outs)])
        side = cfg.image_size
        for _ in widths:
            side //= 2
        d = widths[-1]
        self.features = Linear(side * side * d, d, ("embed", "mlp"), std=(1.0 / (side * side * d)) ** 0.5,
                               dtypes=dtypes, rngs=rngs, bias=True)
        self.score = Linear(d, 1, ("mlp", None), std=d ** -0.5, dtypes=dtypes, rngs=rngs, bias=True)
        self.class_embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.num_classes, d), dtypes.param) * d ** -0.5,
                                     out_sharding=(None, "mlp"))

    def __call__(self, images_BHWC: jax.Array, labels_B: jax.Array) -> jax.Array:
        """Scores (B,), real > fake."""
        h = jax.nn.leaky_relu(self.stem(images_BHWC), LEAK)
        for conv, down in zip(self.convs, self.downs):
            h = jax.nn.leaky_relu(conv(h), LEAK)
            h = jax.nn.leaky_relu(down(h), LEAK)
        f = jax.nn.leaky_relu(self.features(h.reshape(h.shape[0], -1)), LEAK)
        projection = jnp.sum(f * class_rows(self.class_embed[...], labels_B), axis=-1)
        return self.score(f)[:, 0] + projection


def generator_flops(cfg: GANConfig) -> float:
    """Forward FLOPs of the generator for one image (convolutions and the projection)."""
    side, total = cfg.base_size, 2.0 * 2 * cfg.noise_dim * cfg.base_size ** 2 * cfg.generator_channels[0]
    for a, b in zip(cfg.generator_channels[:-1], cfg.generator_channels[1:]):
        side *= 2
        total += conv_flops(side, side, a, b, 3) + conv_flops(side, side, b, b, 3)
    return total + conv_flops(side, side, cfg.generator_channels[-1], cfg.channels, 3)


def discriminator_flops(cfg: GANConfig) -> float:
    """Forward FLOPs of the discriminator for one image."""
    widths, side = cfg.discriminator_channels, cfg.image_size
    total = conv_flops(side, side, cfg.channels, widths[0], 3)
    for w, o in zip(widths, [*widths[1:], widths[-1]]):
        total += conv_flops(side, side, w, w, 3)
        side //= 2
        total += conv_flops(side, side, w, o, 4)
    return total + 2.0 * side * side * widths[-1] * widths[-1]
