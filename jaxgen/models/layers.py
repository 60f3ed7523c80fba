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

from jaxgen.config import AttentionImpl, DiTConfig, RopeScaling, TransformerConfig
from jaxgen.models.cpu_kernels import cpu_attention, matmul, within_window


@dataclasses.dataclass(frozen=True)
class Dtypes:
    """A model's dtypes, resolved once from its config's names."""

    param: jnp.dtype  # parameters are stored in it
    compute: jnp.dtype  # matmul inputs are cast to it; they accumulate in float32

    @classmethod
    def of(cls, cfg: TransformerConfig | DiTConfig) -> Dtypes:
        return cls(param=jnp.dtype(cfg.param_dtype), compute=jnp.dtype(cfg.compute_dtype))


class Linear(nnx.Module):
    """A projection whose weight (and bias, if any) carries logical axis names."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, std: float, dtypes: Dtypes, rngs: nnx.Rngs,
                 bias: bool = False):
        init = nnx.initializers.normal(std)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtypes.param), out_sharding=axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), dtypes.param), out_sharding=axes[1:]) if bias else None
        self.compute_dtype = dtypes.compute

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel[...], self.compute_dtype)
        return y if self.bias is None else y + self.bias[...].astype(jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square normalization with a learned scale; `unit_offset` multiplies by (1 + scale) (Gemma)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axis_name: str = "norm", unit_offset: bool = False):
        self.eps, self.unit_offset = eps, unit_offset
        start = jnp.zeros if unit_offset else jnp.ones
        self.scale = nnx.Param(start((dim,), param_dtype), out_sharding=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return normed * (1.0 + scale if self.unit_offset else scale)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """The (Dh/2,) rotary angular frequencies, rescaled as Llama 3.1 does when `scaling` is given."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_seq_len
    wavelength = 2 * jnp.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, the band between blended.
    smooth = (old_len / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelength > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, blended)
    return jnp.where(wavelength < old_len / scaling.high_freq_factor, inv_freq, scaled)


def rope_tables(positions_BL: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape (B, L, Dh/2) for rotary position embedding."""
    angles_BLd = positions_BL[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles_BLd), jnp.sin(angles_BLd)


def apply_rope(x_BLHd: jax.Array, cos_BLd: jax.Array, sin_BLd: jax.Array) -> jax.Array:
    """Rotate the two halves of each head (the Hugging Face Llama layout, so exports need no permutation)."""
    half = x_BLHd.shape[-1] // 2
    x1, x2 = x_BLHd[..., :half], x_BLHd[..., half:]
    cos, sin = cos_BLd[:, :, None, :], sin_BLd[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHd.dtype)


def dot_product_attention(q_BLHd: jax.Array, k_BLKd: jax.Array, v_BLKd: jax.Array, *, is_causal: bool,
                          segments_BL: jax.Array | None = None, implementation: AttentionImpl = "auto",
                          window: jax.Array | None = None, scale: float | None = None,
                          softcap: float | None = None) -> jax.Array:
    """Attention over the sequence, optionally causal and/or within segments (documents).

    "xla" (`jax.nn.dot_product_attention`) is the portable choice and the only one on
    TPU; "cudnn" is its fused flash kernel on NVIDIA GPUs; "cpu" is `cpu_attention`,
    whose every matmul XLA:CPU runs in bf16. "auto" is "cpu" when compiling for CPU and
    "xla" elsewhere; the choice is made at lowering time, so one traced model serves
    every platform. `window` (a scalar, possibly traced: layers are scanned) keeps each
    query to itself and the window - 1 keys before it; `scale` replaces Dh ** -0.5;
    `softcap` squashes the scores into (-softcap, softcap).
    """
    def library(q, k, v, segments, window, impl):
        mask = None if segments is None else (segments[:, :, None] == segments[:, None, :])[:, None]
        if window is not None:
            positions = jnp.arange(q.shape[1])
            mask = _and(mask, within_window(positions, positions, window)[None, None])
        if softcap is None:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                                                implementation=impl)
        if is_causal:
            mask = _and(mask, jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None])
        return softcapped_attention(q, k, v, mask, scale=scale, softcap=softcap)

    window = None if window is None else jnp.asarray(window, jnp.int32)
    if implementation == "xla" or implementation == "cudnn":
        return library(q_BLHd, k_BLKd, v_BLKd, segments_BL, window, implementation)
    cpu = functools.partial(cpu_attention, is_causal=is_causal, scale=scale, softcap=softcap)
    if implementation == "cpu":
        return cpu(q_BLHd, k_BLKd, v_BLKd, segments_BL, window)
    return jax.lax.platform_dependent(
        q_BLHd, k_BLKd, v_BLKd, segments_BL, window, cpu=cpu,
        default=lambda q, k, v, segments, window: library(q, k, v, segments, window, "xla"))


def _and(mask: jax.Array | None, other: jax.Array) -> jax.Array:
    return other if mask is None else mask & other


def cached_attention(q_BLHd: jax.Array, k_BKTd: jax.Array, v_BKTd: jax.Array, keep_B1LT: jax.Array, *,
                     scale: float | None, softcap: float | None = None, bias_BHLT: jax.Array | None = None
                     ) -> jax.Array:
    """Attention of L new queries over a KV cache laid out key-head-major ([B, K, T, Dh]), under a mask.

    The cache layout is the one both products want (batched over B and K, contracting Dh and
    then T, every operand row-major), so a decoding step reads the cache in place: with the
    cache as [B, T, K, Dh], every layer copied it transposed on every token. Scores and softmax
    in float32; grouped-query heads attend per key/value head; `softcap` squashes the scores;
    `bias_BHLT` (T5's relative positions) is added to them.
    """
    b, l, h, dh = q_BLHd.shape
    kv = k_BKTd.shape[1]
    scale = dh ** -0.5 if scale is None else scale
    q_BKGLd = q_BLHd.reshape(b, l, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)
    s_BKGLT = jnp.einsum("bkgld,bktd->bkglt", q_BKGLd, k_BKTd.astype(q_BLHd.dtype),
                         preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s_BKGLT = softcap * jnp.tanh(s_BKGLT / softcap)
    if bias_BHLT is not None:
        s_BKGLT = s_BKGLT + bias_BHLT.reshape(*bias_BHLT.shape[:1], kv, h // kv, *bias_BHLT.shape[2:])
    s_BKGLT = jnp.where(keep_B1LT[:, :, None], s_BKGLT, -1e30)
    p_BKGLT = jax.nn.softmax(s_BKGLT, axis=-1).astype(q_BLHd.dtype)
    out_BKGLd = jnp.einsum("bkglt,bktd->bkgld", p_BKGLT, v_BKTd.astype(q_BLHd.dtype),
                           preferred_element_type=jnp.float32)
    return out_BKGLd.transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh).astype(q_BLHd.dtype)


def softcapped_attention(q_BLHd: jax.Array, k_BTKd: jax.Array, v_BTKd: jax.Array, keep_B1LT: jax.Array | None, *,
                         scale: float | None, softcap: float) -> jax.Array:
    """Attention with scores squashed by softcap * tanh(s / softcap), written out: jax.nn's has no soft-capping.

    Scores and softmax in float32; grouped-query heads attend per key/value head (G query heads each).
    """
    b, l, h, dh = q_BLHd.shape
    kv = k_BTKd.shape[2]
    scale = dh ** -0.5 if scale is None else scale
    q_BLKGd = q_BLHd.reshape(b, l, kv, h // kv, dh)
    s_BKGLT = jnp.einsum("blkgd,btkd->bkglt", q_BLKGd, k_BTKd.astype(q_BLHd.dtype),
                         preferred_element_type=jnp.float32) * scale
    s_BKGLT = softcap * jnp.tanh(s_BKGLT / softcap)
    if keep_B1LT is not None:
        s_BKGLT = jnp.where(keep_B1LT[:, :, None], s_BKGLT, -1e30)
    p_BKGLT = jax.nn.softmax(s_BKGLT, axis=-1).astype(q_BLHd.dtype)
    out_BLKGd = jnp.einsum("bkglt,btkd->blkgd", p_BKGLT, v_BTKd.astype(q_BLHd.dtype),
                           preferred_element_type=jnp.float32)
    return out_BLKGd.reshape(b, l, h, dh).astype(q_BLHd.dtype)


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


def run_stacked(layers: nnx.Module, body, carry, *, scan: bool, remat_policy: str, xs=None):
    """Apply a stack of layers created with a leading 'layers' axis.

    `body(layer, carry, x) -> carry`, x being the layer's slice of `xs` (None without
    it: a per-layer setting such as an attention window). With `scan` one layer is compiled and looped
    (fast compile, what large models need); without it the stack is unrolled,
    which gives XLA more room to fuse on small models. Parameters are laid out
    the same way either way, so checkpoints do not depend on the choice.
    """
    graphdef, state = nnx.split(layers)

    def step(carry, layer_state_and_x):
        layer_state, x = layer_state_and_x
        return body(nnx.merge(graphdef, layer_state), carry, x), None

    step = remat(step, remat_policy, in_scan=scan)
    if scan:
        carry, _ = jax.lax.scan(step, carry, (state, xs))
        return carry
    n_layers = jax.tree.leaves(state)[0].shape[0]
    for i in range(n_layers):
        carry, _ = step(carry, jax.tree.map(lambda a: a[i], (state, xs)))
    return carry


def each_layer(layers: nnx.Module) -> list[nnx.Module]:
    """The layers of a stack, one module each (static slices of the stacked parameters).

    Decoders run their layers unrolled over these, sliced once before the token loop (XLA does
    not hoist slices out of a while loop), each layer with a KV-cache buffer of its own updated
    in place; a scanned stack would slice every layer's weights and cache out on every token.
    """
    graphdef, state = nnx.split(layers)
    n_layers = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(n_layers)]
