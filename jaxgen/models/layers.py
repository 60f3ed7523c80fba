"""Building blocks shared by the model families.

Shape letters: B batch, L length, D model width, H query heads, K key/value
heads, Dh head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.sharding import activation_shards

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def matmul(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """x @ w with inputs in compute_dtype, accumulated and returned in float32.

    Contracting the last axis of x against the first of w keeps every matmul a
    plain 2-D GEMM after XLA folds the leading axes, which is much faster on CPU
    than batched 3-D contractions.
    """
    x_2d = x.reshape(-1, x.shape[-1])
    if jnp.dtype(compute_dtype) == jnp.float32:
        # Full precision needs no custom gradient: JAX's own rule is already all-f32.
        y_2d = jnp.dot(x_2d.astype(jnp.float32), w.astype(jnp.float32))
    else:
        y_2d = _low_precision_matmul(x_2d, w, jnp.dtype(compute_dtype), x_2d.dtype, w.dtype)
    return y_2d.reshape(*x.shape[:-1], w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _low_precision_matmul(x_MK: jax.Array, w_KN: jax.Array, compute_dtype, x_dtype, w_dtype) -> jax.Array:
    return jnp.dot(x_MK.astype(compute_dtype), w_KN.astype(compute_dtype), preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(x_MK, w_KN, compute_dtype, x_dtype, w_dtype):
    x_c, w_c = x_MK.astype(compute_dtype), w_KN.astype(compute_dtype)
    return jnp.dot(x_c, w_c, preferred_element_type=jnp.float32), (x_c, w_c)


def _low_precision_matmul_bwd(compute_dtype, x_dtype, w_dtype, residuals, g_MN):
    # Mixed precision as usually meant: the two backward matmuls also take inputs in the
    # compute dtype and accumulate in float32. JAX's own rule would pair the float32
    # cotangent with the low-precision operand, which promotes both to float32.
    x_c, w_c = residuals
    g_c = g_MN.astype(compute_dtype)
    # g @ w.T written as a contraction of both last axes rather than with `.T`: a
    # transpose op would hand XLA:CPU a column-major operand, which it runs in float32.
    dx = jax.lax.dot_general(g_c, w_c, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = jax.lax.platform_dependent(x_c, g_c, cpu=_weight_grad_cpu, default=_weight_grad)
    return dx.astype(x_dtype), dw.astype(w_dtype)


def _weight_grad(x_MK: jax.Array, g_MN: jax.Array) -> jax.Array:
    """x.T @ g: both operands contract their leading (token) axis."""
    return jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _weight_grad_cpu(x_MK: jax.Array, g_MN: jax.Array) -> jax.Array:
    """x.T @ g as a plain row-major GEMM, the only low-precision form XLA:CPU keeps.

    XLA:CPU runs bf16 dots in its GEMM library (YNNPACK) only when the left operand
    contracts its last axis; a transposed left operand is silently upcast to float32,
    which measured 2-3x slower. So the smaller operand is transposed in memory first:
    a copy of a few MiB against a GEMM over every token.
    """
    k, n = x_MK.shape[1], g_MN.shape[1]
    if k <= n:
        return jnp.dot(_transposed_copy(x_MK), g_MN, preferred_element_type=jnp.float32)
    # (g.T @ x).T; the barrier keeps XLA from folding the final transpose back into the dot.
    dw_NK = jax.lax.optimization_barrier(jnp.dot(_transposed_copy(g_MN), x_MK, preferred_element_type=jnp.float32))
    return _transposed_copy(dw_NK)


def _transposed_copy(a: jax.Array) -> jax.Array:
    """a.T materialized row-major.

    A bare transpose is only a layout change that XLA folds into the consuming dot.
    Passing it through an optimization barrier with a unit axis (which keeps any
    sharding of a intact) forces the data to be moved.
    """
    return jax.lax.optimization_barrier(a.T[:, :, None])[:, :, 0]


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def resolve_batch_slices(setting: int | str, batch: int) -> int:
    """The number of independent batch slices each layer runs (`model.batch_slices`)."""
    shards, platform = activation_shards("act_batch")
    per_device = batch // shards
    if setting == "auto":
        if (platform or jax.default_backend()) != "cpu":
            return 1
        return next(n for n in (4, 2, 1) if per_device % n == 0)
    if per_device % setting:
        raise ValueError(f"model.batch_slices={setting} does not divide the per-device batch {per_device} "
                         f"(batch {batch} over {shards} devices); use a divisor of it or auto")
    return setting


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


class Linear(nnx.Module):
    """A bias-free projection whose weight carries logical axis names."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, std: float, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), param_dtype), out_sharding=axes)

    def __call__(self, x: jax.Array, compute_dtype) -> jax.Array:
        return matmul(x, self.kernel[...], compute_dtype)


class RMSNorm(nnx.Module):
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
