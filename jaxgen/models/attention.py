"""Scaled dot-product attention: a CPU-tuned formulation and the dispatch between implementations.

`jax.nn.dot_product_attention` (implementation "xla") is the portable choice and the only
one on TPU; "cudnn" is its fused flash kernel on NVIDIA GPUs. On CPU, XLA's lowering of
it runs its score and backward matmuls through transposed operands, which XLA:CPU's GEMM
library (YNNPACK) does not take: those dots run as float32 Eigen contractions at about
a third of the machine's bf16 rate, plus copies. `cpu_attention` lays every operand out
so that each of its matmuls is a row-major batched GEMM and writes the backward pass by
hand, keeping the probabilities for it (CPU sequences are short, so the L x L
square is small; a flash-style recomputation would cost an extra score GEMM).

Shape letters as in layers.py, plus G query heads per key/value head (H = K x G),
R = G x L query rows per key/value head, T key positions.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Implementation = Literal["auto", "xla", "cudnn", "cpu"]
_F32 = jnp.float32


def dot_product_attention(q_BLHd: jax.Array, k_BLKd: jax.Array, v_BLKd: jax.Array, *, is_causal: bool,
                          segments_BL: jax.Array | None = None, implementation: Implementation = "auto") -> jax.Array:
    """Attention over the sequence, optionally causal and/or within segments (documents).

    "auto" is "cpu" when compiling for CPU and "xla" elsewhere; the choice is made at
    lowering time, so one traced model serves every platform.
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


def cpu_attention(q_BLHd: jax.Array, k_BLKd: jax.Array, v_BLKd: jax.Array, segments_BL: jax.Array | None,
                  *, is_causal: bool) -> jax.Array:
    """Same result as `jax.nn.dot_product_attention` (grouped-query heads included), in q's dtype."""
    b, l, h, dh = q_BLHd.shape
    kv = k_BLKd.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads cannot share {kv} key/value heads evenly")
    q_BKRd = _row_major(q_BLHd.reshape(b, l, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)).reshape(b, kv, -1, dh)
    k_BKTd = _row_major(k_BLKd.transpose(0, 2, 1, 3))
    v_BKTd = _row_major(v_BLKd.astype(q_BLHd.dtype).transpose(0, 2, 1, 3))
    out_BKRd = _attention(q_BKRd, k_BKTd.astype(q_BLHd.dtype), v_BKTd, segments_BL, is_causal)
    return out_BKRd.reshape(b, kv, h // kv, l, dh).transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BKRd, k_BKTd, v_BKTd, segments_BL, is_causal):
    return _attention_fwd(q_BKRd, k_BKTd, v_BKTd, segments_BL, is_causal)[0]


def _attention_fwd(q_BKRd, k_BKTd, v_BKTd, segments_BL, is_causal):
    scale = q_BKRd.shape[-1] ** -0.5
    # Scores in float32 whatever the compute dtype; masked entries get -inf-like logits.
    s_BKRT = _dot(q_BKRd, k_BKTd, contract=(3, 3)) * scale
    keep_BKRT = _keep(segments_BL, q_BKRd.shape[2], k_BKTd.shape[2], is_causal)
    s_BKRT = jnp.where(keep_BKRT, s_BKRT, -1e30) if keep_BKRT is not None else s_BKRT
    p_BKRT = jax.nn.softmax(s_BKRT, axis=-1).astype(v_BKTd.dtype)
    out_BKRd = _dot(p_BKRT, v_BKTd, contract=(3, 2)).astype(q_BKRd.dtype)
    return out_BKRd, (q_BKRd, k_BKTd, v_BKTd, out_BKRd, p_BKRT, segments_BL)


def _attention_bwd(is_causal, residuals, dout_BKRd):
    q_BKRd, k_BKTd, v_BKTd, out_BKRd, p_BKRT, segments_BL = residuals
    cd, scale = q_BKRd.dtype, q_BKRd.shape[-1] ** -0.5
    dout_BKRd = _row_major(dout_BKRd.astype(cd))
    # Key-major (T x R) from here on, so that the two products summing over query rows
    # (dV, dK) take their left operand as is; P and dS each need one transposed copy.
    p_BKTR = _row_major(jnp.swapaxes(p_BKRT, -1, -2))  # masked entries are exactly 0
    dv_BKTd = _dot(p_BKTR, dout_BKRd, contract=(3, 2))
    dp_BKTR = _dot(v_BKTd, dout_BKRd, contract=(3, 3))
    delta_BKR = jnp.sum(dout_BKRd.astype(_F32) * out_BKRd.astype(_F32), axis=-1)  # = rowsum(P * dP)
    ds_BKTR = (p_BKTR.astype(_F32) * (dp_BKTR - delta_BKR[:, :, None, :]) * scale).astype(cd)
    dk_BKTd = _dot(ds_BKTR, q_BKRd, contract=(3, 2))
    dq_BKRd = _dot(_row_major(jnp.swapaxes(ds_BKTR, -1, -2)), k_BKTd, contract=(3, 2))
    segments_grad = None if segments_BL is None else np.zeros(segments_BL.shape, jax.dtypes.float0)
    return dq_BKRd.astype(cd), dk_BKTd.astype(k_BKTd.dtype), dv_BKTd.astype(v_BKTd.dtype), segments_grad


_attention.defvjp(_attention_fwd, _attention_bwd)


def _dot(a: jax.Array, b: jax.Array, *, contract: tuple[int, int]) -> jax.Array:
    """Batched over the two leading axes, accumulating in float32."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0, 1), (0, 1))), preferred_element_type=_F32)


def _keep(segments_BL, rows: int, t: int, is_causal: bool) -> jax.Array | None:
    """Which (query row, key) pairs may attend, broadcastable to [B, K, R, T]."""
    qpos_R = jnp.arange(rows) % t  # rows are (group, position) pairs
    kpos_T = jnp.arange(t)
    keep = None
    if is_causal:
        keep = (qpos_R[:, None] >= kpos_T[None, :])[None, None]
    if segments_BL is not None:
        same = (segments_BL[:, qpos_R][:, :, None] == segments_BL[:, None, :])[:, None]
        keep = same if keep is None else keep & same
    return keep


def _row_major(a: jax.Array) -> jax.Array:
    """a with its (possibly transposed) axes materialized in row-major order.

    XLA would otherwise fold the transpose into the consuming dot as a layout change,
    and XLA:CPU runs dots on non-row-major bf16 operands in float32. The unit axis and
    barrier force the copy without touching how a is sharded.
    """
    return jax.lax.optimization_barrier(a[..., None])[..., 0]
