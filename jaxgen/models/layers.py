"""Building blocks shared by the model families.

Shape letters: B batch, L length, D model width, H query heads, K key/value
heads, Dh head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config import AttentionImpl, DiTConfig, TransformerConfig
from jaxgen.models.cpu_kernels import cpu_attention, matmul


@dataclasses.dataclass(frozen=True)
class Dtypes:
    """A model's dtypes, resolved once from its config's names."""

    param: jnp.dtype  # parameters are stored in it
    compute: jnp.dtype  # matmul inputs are cast to it; they accumulate in float32

    @classmethod
    def of(cls, cfg: TransformerConfig | DiTConfig) -> Dtypes:
        return cls(param=jnp.dtype(cfg.param_dtype), compute=jnp.dtype(cfg.compute_dtype))


class Linear(nnx.Module):
    """A bias-free projection whose weight carries logical axis names."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, std: float, dtypes: Dtypes, rngs: nnx.Rngs):
        init = nnx.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtypes.param), out_sharding=axes)
        self.compute_dtype = dtypes.compute

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x, self.kernel[...], self.compute_dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square normalization with a learned scale."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axis_name: str = "norm"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed * self.scale[...].astype(jnp.float32)


def rope_tables(positions_BL: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape (B, L, Dh/2) for rotary position embedding."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BLd = positions_BL[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles_BLd), jnp.sin(angles_BLd)


def apply_rope(x_BLHd: jax.Array, cos_BLd: jax.Array, sin_BLd: jax.Array) -> jax.Array:
    """Rotate the two halves of each head (the Hugging Face Llama layout, so exports need no permutation)."""
    half = x_BLHd.shape[-1] // 2
    x1, x2 = x_BLHd[..., :half], x_BLHd[..., half:]
    cos, sin = cos_BLd[:, :, None, :], sin_BLd[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHd.dtype)


def dot_product_attention(q_BLHd: jax.Array, k_BLKd: jax.Array, v_BLKd: jax.Array, *, is_causal: bool,
                          segments_BL: jax.Array | None = None, implementation: AttentionImpl = "auto") -> jax.Array:
    """Attention over the sequence, optionally causal and/or within segments (documents).

    "xla" (`jax.nn.dot_product_attention`) is the portable choice and the only one on
    TPU; "cudnn" is its fused flash kernel on NVIDIA GPUs; "cpu" is `cpu_attention`,
    whose every matmul XLA:CPU runs in bf16. "auto" is "cpu" when compiling for CPU and
    "xla" elsewhere; the choice is made at lowering time, so one traced model serves
    every platform.
    """
    def library(q, k, v, segments, impl):
        mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)

    if implementation == "xla" or implementation == "cudnn":
        return library(q_BLHd, k_BLKd, v_BLKd, segments_BL, implementation)
    if implementation == "cpu":
        return cpu_attention(q_BLHd, k_BLKd, v_BLKd, segments_BL, is_causal=is_causal)
    return jax.lax.platform_dependent(
        q_BLHd, k_BLKd, v_BLKd, segments_BL,
        cpu=functools.partial(cpu_attention, is_causal=is_causal),
        default=lambda q, k, v, segments: library(q, k, v, segments, "xla"))


def split_batch(x_B: jax.Array | None, n: int) -> tuple:
    """n slices of the leading axis, slice i holding rows i, i+n, i+2n, ...

    Interleaved rather than contiguous: each device's rows stay on that device (when
    its share divides by n), so slicing a batch-sharded array moves no data.
    """
    if x_B is None or n == 1:
        return (x_B,) * n
    return tuple(x_B.reshape(x_B.shape[0] // n, n, *x_B.shape[1:])[:, i] for i in range(n))


def merge_batch(slices: tuple[jax.Array, ...]) -> jax.Array:
    """Inverse of `split_batch`."""
    if len(slices) == 1:
        return slices[0]
    return jnp.stack(slices, axis=1).reshape(-1, *slices[0].shape[1:])


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn, policy: str, *, in_scan: bool):
    """Wrap a layer function in jax.checkpoint per the configured policy ('none' leaves it alone).

    Inside a scan the loop itself keeps XLA from merging the recomputation with the
    forward pass, and the CSE barrier only slows it down; unrolled, without the barrier
    XLA's common-subexpression pass undoes the remat (measured: the same temporary memory
    for every policy).
    """
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=not in_scan)


def run_stacked(layers: nnx.Module, body, carry, *, scan: bool, remat_policy: str):
    """Apply a stack of layers created with a leading 'layers' axis.

    `body(layer, carry) -> carry`. With `scan` one layer is compiled and looped
    (fast compile, what large models need); without it the stack is unrolled,
    which gives XLA more room to fuse on small models. Parameters are laid out
    the same way either way, so checkpoints do not depend on the choice.
    """
    graphdef, state = nnx.split(layers)

    def step(carry, layer_state):
        return body(nnx.merge(graphdef, layer_state), carry), None

    step = remat(step, remat_policy, in_scan=scan)
    if scan:
        carry, _ = jax.lax.scan(step, carry, state)
        return carry
    n_layers = jax.tree.leaves(state)[0].shape[0]
    for i in range(n_layers):
        carry, _ = step(carry, jax.tree.map(lambda a: a[i], state))
    return carry


def scan_stacked(layers: nnx.Module, body, carry, xs):
    """Like `run_stacked`, with a per-layer input and output: `body(layer, carry, x) -> (carry, y)`.

    Used by decoding, where each layer reads and returns its own slice of the KV cache.
    """
    graphdef, state = nnx.split(layers)

    def step(carry, layer_and_x):
        layer_state, x = layer_and_x
        return body(nnx.merge(graphdef, layer_state), carry, x)

    return jax.lax.scan(step, carry, (state, xs))
