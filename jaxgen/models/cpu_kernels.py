"""Formulations of the model's matmuls and attention that XLA:CPU runs at its bf16 rate.

XLA:CPU hands a bf16 dot to its GEMM library (YNNPACK) only when both operands are
row-major and the left one contracts its last axis; any other bf16 dot is silently
upcast to a float32 contraction. JAX's own gradients of a matmul, and its lowering
of `jax.nn.dot_product_attention`, produce exactly those transposed operands. This
module writes them so that every product is a row-major GEMM:

- `matmul`: x @ w with inputs in the compute dtype and float32 accumulation, with a
  custom gradient whose weight gradient is laid out for CPU (`lax.platform_dependent`:
  other platforms get the plain contraction); `matmul_by_rows` the same for x @ w.T.
- `cpu_attention`: attention with grouped-query heads laid out per key/value head and
  a hand-written backward pass.
- `resolve_batch_slices`: how many independent batch slices each layer runs, so that
  XLA:CPU has matmuls from another slice to run while one slice waits.

Shape letters. Matmul: M rows (tokens), K inner width, N output width. Attention:
B batch, L length, H query heads, K key/value heads, Dh head width, G query heads per
key/value head (H = K x G), R = G x L query rows per key/value head, T key positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.sharding import activation_shards

_F32 = jnp.float32


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


def matmul_by_rows(x: jax.Array, w_NK: jax.Array, compute_dtype) -> jax.Array:
    """x @ w.T for a weight stored (out, in), such as a tied embedding used as the output layer.

    Written as its own product rather than `matmul(x, w.T)`: XLA folds that transpose
    into the weight gradient's GEMM, giving a dot with a transposed operand, which
    XLA:CPU cannot run in bf16 at all.
    """
    x_2d = x.reshape(-1, x.shape[-1])
    if jnp.dtype(compute_dtype) == jnp.float32:
        y_2d = _dot_by_rows(x_2d.astype(jnp.float32), w_NK.astype(jnp.float32))
    else:
        y_2d = _low_precision_matmul_by_rows(x_2d, w_NK, jnp.dtype(compute_dtype), x_2d.dtype, w_NK.dtype)
    return y_2d.reshape(*x.shape[:-1], w_NK.shape[0])


def _dot_by_rows(x_MK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """x @ w.T as a contraction of both last axes (no transpose op: see `_low_precision_matmul_bwd`)."""
    return jax.lax.dot_general(x_MK, w_NK, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _low_precision_matmul_by_rows(x_MK, w_NK, compute_dtype, x_dtype, w_dtype) -> jax.Array:
    return _dot_by_rows(x_MK.astype(compute_dtype), w_NK.astype(compute_dtype))


def _low_precision_matmul_by_rows_fwd(x_MK, w_NK, compute_dtype, x_dtype, w_dtype):
    x_c, w_c = x_MK.astype(compute_dtype), w_NK.astype(compute_dtype)
    return _dot_by_rows(x_c, w_c), (x_c, w_c)


def _low_precision_matmul_by_rows_bwd(compute_dtype, x_dtype, w_dtype, residuals, g_MN):
    x_c, w_c = residuals
    g_c = g_MN.astype(compute_dtype)
    dx = jnp.dot(g_c, w_c, preferred_element_type=jnp.float32)  # (M, N) @ (N, K): already row-major
    dw = jax.lax.platform_dependent(g_c, x_c, cpu=_weight_grad_cpu, default=_weight_grad)  # g.T @ x: (N, K)
    return dx.astype(x_dtype), dw.astype(w_dtype)


_low_precision_matmul_by_rows.defvjp(_low_precision_matmul_by_rows_fwd, _low_precision_matmul_by_rows_bwd)


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


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def _weight_grad(x_MK: jax.Array, g_MN: jax.Array) -> jax.Array:
    """x.T @ g: both operands contract their leading (token) axis."""
    return jax.lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _weight_grad_cpu(x_MK: jax.Array, g_MN: jax.Array) -> jax.Array:
    """x.T @ g as a plain row-major GEMM, the only low-precision form XLA:CPU keeps.

    A transposed left operand would be upcast to float32, so the smaller operand is
    transposed in memory first: one pass over it, small beside a GEMM over every token.
    """
    k, n = x_MK.shape[1], g_MN.shape[1]
    if k <= n:
        return jnp.dot(_row_major(x_MK.T), g_MN, preferred_element_type=jnp.float32)
    # (g.T @ x).T; the barrier keeps XLA from folding the final transpose back into the dot.
    dw_NK = jax.lax.optimization_barrier(jnp.dot(_row_major(g_MN.T), x_MK, preferred_element_type=jnp.float32))
    return _row_major(dw_NK.T)


def cpu_attention(q_BLHd: jax.Array, k_BLKd: jax.Array, v_BLKd: jax.Array, segments_BL: jax.Array | None,
                  window: jax.Array | None = None, *, is_causal: bool, scale: float | None = None,
                  softcap: float | None = None) -> jax.Array:
    """Same result as `jax.nn.dot_product_attention` (grouped-query heads included), in q's dtype.

    The probabilities are kept for the backward pass rather than recomputed flash-style:
    CPU sequences are short, so the L x L square is small, and recomputing it would cost
    an extra score GEMM. `window` keeps each query to the window - 1 keys before it;
    `softcap` squashes the scores by softcap * tanh(s / softcap) (its tanh is kept too).
    """
    b, l, h, dh = q_BLHd.shape
    kv = k_BLKd.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads cannot share {kv} key/value heads evenly")
    q_BKRd = _row_major(q_BLHd.reshape(b, l, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)).reshape(b, kv, -1, dh)
    k_BKTd = _row_major(k_BLKd.transpose(0, 2, 1, 3))
    v_BKTd = _row_major(v_BLKd.astype(q_BLHd.dtype).transpose(0, 2, 1, 3))
    scale = dh ** -0.5 if scale is None else scale
    out_BKRd = _attention(q_BKRd, k_BKTd.astype(q_BLHd.dtype), v_BKTd, segments_BL, window, is_causal, scale, softcap)
    return out_BKRd.reshape(b, kv, h // kv, l, dh).transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q_BKRd, k_BKTd, v_BKTd, segments_BL, window, is_causal, scale, softcap):
    return _attention_fwd(q_BKRd, k_BKTd, v_BKTd, segments_BL, window, is_causal, scale, softcap)[0]


def _attention_fwd(q_BKRd, k_BKTd, v_BKTd, segments_BL, window, is_causal, scale, softcap):
    # Scores in float32 whatever the compute dtype; masked entries get -inf-like logits.
    s_BKRT = _dot(q_BKRd, k_BKTd, contract=(3, 3)) * scale
    tanh_BKRT = None
    if softcap is not None:
        tanh_BKRT = jnp.tanh(s_BKRT / softcap)
        s_BKRT = softcap * tanh_BKRT
    keep_BKRT = _keep(segments_BL, window, q_BKRd.shape[2], k_BKTd.shape[2], is_causal)
    s_BKRT = jnp.where(keep_BKRT, s_BKRT, -1e30) if keep_BKRT is not None else s_BKRT
    p_BKRT = jax.nn.softmax(s_BKRT, axis=-1).astype(v_BKTd.dtype)
    out_BKRd = _dot(p_BKRT, v_BKTd, contract=(3, 2)).astype(q_BKRd.dtype)
    return out_BKRd, (q_BKRd, k_BKTd, v_BKTd, out_BKRd, p_BKRT, tanh_BKRT, segments_BL, window)


def _attention_bwd(is_causal, scale, softcap, residuals, dout_BKRd):
    q_BKRd, k_BKTd, v_BKTd, out_BKRd, p_BKRT, tanh_BKRT, segments_BL, window = residuals
    cd = q_BKRd.dtype
    dout_BKRd = _row_major(dout_BKRd.astype(cd))
    # Key-major (T x R) from here on, so that the two products summing over query rows
    # (dV, dK) take their left operand as is; P and dS each need one transposed copy.
    p_BKTR = _row_major(jnp.swapaxes(p_BKRT, -1, -2))  # masked entries are exactly 0
    dv_BKTd = _dot(p_BKTR, dout_BKRd, contract=(3, 2))
    dp_BKTR = _dot(v_BKTd, dout_BKRd, contract=(3, 3))
    delta_BKR = jnp.sum(dout_BKRd.astype(_F32) * out_BKRd.astype(_F32), axis=-1)  # = rowsum(P * dP)
    ds_BKTR = p_BKTR.astype(_F32) * (dp_BKTR - delta_BKR[:, :, None, :])
    if softcap is not None:  # through softcap * tanh(s / softcap)
        ds_BKTR = ds_BKTR * (1 - jnp.swapaxes(tanh_BKRT, -1, -2) ** 2)
    ds_BKTR = (ds_BKTR * scale).astype(cd)
    dk_BKTd = _dot(ds_BKTR, q_BKRd, contract=(3, 2))
    dq_BKRd = _dot(_row_major(jnp.swapaxes(ds_BKTR, -1, -2)), k_BKTd, contract=(3, 2))
    segments_grad, window_grad = (None if x is None else np.zeros(x.shape, jax.dtypes.float0)
                                  for x in (segments_BL, window))
    return dq_BKRd.astype(cd), dk_BKTd.astype(k_BKTd.dtype), dv_BKTd.astype(v_BKTd.dtype), segments_grad, window_grad


_attention.defvjp(_attention_fwd, _attention_bwd)


def _dot(a: jax.Array, b: jax.Array, *, contract: tuple[int, int]) -> jax.Array:
    """Batched over the two leading axes, accumulating in float32."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0, 1), (0, 1))), preferred_element_type=_F32)


def _keep(segments_BL, window, rows: int, t: int, is_causal: bool) -> jax.Array | None:
    """Which (query row, key) pairs may attend, broadcastable to [B, K, R, T]."""
    qpos_R = jnp.arange(rows) % t  # rows are (group, position) pairs
    kpos_T = jnp.arange(t)
    keep = None
    if is_causal:
        keep = (qpos_R[:, None] >= kpos_T[None, :])[None, None]
    if window is not None:
        near = within_window(qpos_R, kpos_T, window)[None, None]
        keep = near if keep is None else keep & near
    if segments_BL is not None:
        same = (segments_BL[:, qpos_R][:, :, None] == segments_BL[:, None, :])[:, None]
        keep = same if keep is None else keep & same
    return keep


def within_window(q_positions_L: jax.Array, k_positions_T: jax.Array, window: jax.Array) -> jax.Array:
    """(L, T): whether each key lies fewer than `window` positions before (or anywhere after) each query."""
    return q_positions_L[:, None] - k_positions_T[None, :] < window


def _row_major(a: jax.Array) -> jax.Array:
    """a (typically a transpose) materialized in row-major order.

    A bare transpose is only a layout change that XLA folds into the consuming dot,
    handing XLA:CPU the transposed operand it runs in float32. Passing it through an
    optimization barrier with a unit axis (which keeps any sharding of a intact)
    forces the data to be moved.
    """
    return jax.lax.optimization_barrier(a[..., None])[..., 0]


def resolve_batch_slices(setting: int | str, batch: int, auto: tuple[int, ...] = (4, 2, 1)) -> int:
    """The number of independent batch slices each layer runs (`model.batch_slices`).

    One layer's matmuls depend on each other, so XLA:CPU runs each GEMM on one core while
    the other often waits; independent slices give it a second chain of GEMMs. "auto" is
    the first of `auto` that divides the per-device batch on CPU; GPUs and TPUs get 1:
    slicing would only shrink their matmuls.
    """
    shards, platform = activation_shards("act_batch")
    per_device = batch // shards
    if setting == "auto":
        if (platform or jax.default_backend()) != "cpu":
            return 1
        return next((n for n in auto if per_device % n == 0), 1)
    if per_device % setting:
        raise ValueError(f"model.batch_slices={setting} does not divide the per-device batch {per_device} "
                         f"(batch {batch} over {shards} devices); use a divisor of it or auto")
    return setting
