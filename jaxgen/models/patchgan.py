"""The PatchGAN discriminator of pix2pix and latent diffusion's autoencoders: a real/fake score per patch.

A stride-2 4x4 convolution and `layers - 1` more, each doubling the channels
(at most 8x), then a stride-1 4x4 convolution and a one-channel 4x4 output: each
output pixel judges one overlapping patch of the input. GroupNorm stands where
the original has BatchNorm, so a patch's score never depends on the other
images of the batch (nor on how the batch is split over devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config_adversarial import AdversarialConfig
from jaxgen.models.conv import Conv2d, GroupNorm
from jaxgen.models.layers import Dtypes

PAD_1 = ((1, 1), (1, 1))
LEAK = 0.2


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class PatchGAN(nnx.Module):
    def __init__(self, image_channels: int, cfg: AdversarialConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        widths = [cfg.channels * min(2 ** i, 8) for i in range(cfg.layers + 1)]
        self.stem = Conv2d(image_channels, widths[0], 4, stride=2, padding=PAD_1, axes=(None, "mlp"),
                           dtypes=dtypes, rngs=rngs)
        self.convs = nnx.List([
            Conv2d(widths[i - 1], widths[i], 4, stride=2 if i < cfg.layers else 1, padding=PAD_1, bias=False,
                   dtypes=dtypes, rngs=rngs) for i in range(1, cfg.layers + 1)])
        self.norms = nnx.List([GroupNorm(w, _groups(w), eps=1e-5, dtypes=dtypes) for w in widths[1:]])
        self.head = Conv2d(widths[-1], 1, 4, padding=PAD_1, axes=("embed", None), dtypes=dtypes, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        """Scores (B, h, w) of the patches, real > fake."""
        h = jax.nn.leaky_relu(self.stem(x_BHWC), LEAK)
        for conv, norm in zip(self.convs, self.norms):
            h = jax.nn.leaky_relu(norm(conv(h)), LEAK)
        return self.head(h)[..., 0].astype(jnp.float32)
