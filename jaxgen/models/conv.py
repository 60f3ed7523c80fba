"""Convolutional building blocks (NHWC images, HWIO kernels) with logical axis names for sharding.

Shape letters: B batch, H height, W width, C channels. The kernels of layers
between two hidden widths carry ("embed", "mlp") on their input and output
channels, as a transformer's projections do, so the sharding presets split
them the same way; layers that touch the few channels of an image or a latent
pass `axes=None` and stay whole on every device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.layers import Dtypes

Axes = tuple[str | None, str | None] | None  # logical names of (input channels, output channels)
HIDDEN: Axes = ("embed", "mlp")


class Conv2d(nnx.Module):
    """A 2-D convolution. `padding`: "SAME", or ((top, bottom), (left, right)) pixels of zeros."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, dtypes: Dtypes, rngs: nnx.Rngs, stride: int = 1,
                 padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME", axes: Axes = HIDDEN,
                 bias: bool = True, init_scale: float = 1.0):
        fan_in = c_in * kernel * kernel
        # He-style initialisation, optionally scaled down (a zero-ish last layer of a residual branch).
        std = init_scale * math.sqrt(1.0 / fan_in)
        c_axes = axes or (None, None)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (kernel, kernel, c_in, c_out), dtypes.param),
                                out_sharding=(None, None, *c_axes))
        self.bias = nnx.Param(jnp.zeros((c_out,), dtypes.param), out_sharding=(c_axes[1],)) if bias else None
        self.stride, self.padding, self.compute_dtype = stride, padding, dtypes.compute

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.with_kernel(x_BHWC, self.kernel[...])

    def with_kernel(self, x_BHWC: jax.Array, kernel_HWIO: jax.Array) -> jax.Array:
        """The layer with `kernel_HWIO` in place of its own (gradients at one layer's weights)."""
        y = jax.lax.conv_general_dilated(
            x_BHWC.astype(self.compute_dtype), kernel_HWIO.astype(self.compute_dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
        return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


class GroupNorm(nnx.Module):
    """Normalise each group of channels over (H, W, channels in the group); statistics in float32."""

    def __init__(self, channels: int, groups: int, *, eps: float, dtypes: Dtypes, axis: str | None = "mlp"):
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.scale = nnx.Param(jnp.ones((channels,), dtypes.param), out_sharding=(axis,))
        self.bias = nnx.Param(jnp.zeros((channels,), dtypes.param), out_sharding=(axis,))

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        x = x_BHWC.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 4), keepdims=True)
        x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def upsample_nearest(x_BHWC: jax.Array, factor: int = 2) -> jax.Array:
    """Each pixel repeated factor x factor times (PyTorch's interpolate(mode="nearest"))."""
    return jnp.repeat(jnp.repeat(x_BHWC, factor, axis=1), factor, axis=2)


def conv_flops(h_out: int, w_out: int, c_in: int, c_out: int, kernel: int) -> float:
    """Multiply-adds of one convolution's forward pass on one image, as FLOPs (2 per multiply-add)."""
    return 2.0 * h_out * w_out * c_in * c_out * kernel * kernel
