"""Decoder-only Llama-family transformer in Flax NNX.

RMSNorm, rotary positions, grouped-query causal attention (layers.dot_product_attention:
a CPU-tuned kernel on CPU, `jax.nn.dot_product_attention` elsewhere, cuDNN flash
attention on GPUs when asked), SwiGLU MLP, optional tied embeddings, layers stacked
and scanned. The config's switches make the same model Mistral (sliding windows),
Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms) or Gemma 2 ((1 + w) norms, scaled
embeddings, GeGLU, post-norms, soft-capping, alternating local and global layers).

Shape letters: B batch, L length, D d_model, H query heads, K kv heads,
Dh head_dim, F d_ff, V vocab. Logical parameter axes: vocab, embed, q_heads,
kv_heads, mlp, norm, layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.config import TransformerConfig
from jaxgen.models.cpu_kernels import matmul_by_rows, resolve_batch_slices, within_window
from jaxgen.models.layers import (
    Dtypes,
    Linear,
    RMSNorm,
    apply_rope,
    cached_attention,
    dot_product_attention,
    each_layer,
    merge_batch,
    rope_frequencies,
    rope_tables,
    run_stacked,
    split_batch,
)

# The window of a layer that attends globally, in a model whose other layers slide.
GLOBAL_WINDOW = 2**30


def norm(cfg: TransformerConfig, dim: int, dtypes: Dtypes) -> RMSNorm:
    return RMSNorm(dim, eps=cfg.norm_eps, param_dtype=dtypes.param, unit_offset=cfg.norm_unit_offset)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def layer_windows(cfg: TransformerConfig) -> np.ndarray | None:
    """Each layer's attention window (GLOBAL_WINDOW for a global layer), or None when no layer slides."""
    if cfg.sliding_window is None:
        return None
    sliding = range(cfg.n_layers) if cfg.sliding_window_layers is None else cfg.sliding_window_layers
    return np.asarray([cfg.sliding_window if i in sliding else GLOBAL_WINDOW for i in range(cfg.n_layers)], np.int32)
from jaxgen.sharding import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.cfg, self.compute_dtype = cfg, dtypes.compute
        d, h, k, dh, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5  # residual branches start small
        bias = cfg.qkv_bias
        self.wq = Linear(d, h * dh, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)
        self.wk = Linear(d, k * dh, ("embed", "kv_heads"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)
        self.wv = Linear(d, k * dh, ("embed", "kv_heads"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)
        self.wo = Linear(h * dh, d, ("q_heads", "embed"), std=out_std, dtypes=dtypes, rngs=rngs)
        self.q_norm = norm(cfg, dh, dtypes) if cfg.qk_norm else None
        self.k_norm = norm(cfg, dh, dtypes) if cfg.qk_norm else None
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5

    def project(self, x_BLD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values of new tokens, rotated to their positions."""
        cfg, cd = self.cfg, self.compute_dtype
        b, l, _ = x_BLD.shape
        dh = cfg.resolved_head_dim
        q_BLHd = self.wq(x_BLD).reshape(b, l, cfg.n_heads, dh)
        k_BLKd = self.wk(x_BLD).reshape(b, l, cfg.n_kv_heads, dh)
        v_BLKd = self.wv(x_BLD).reshape(b, l, cfg.n_kv_heads, dh)
        if cfg.qk_norm:
            q_BLHd, k_BLKd = self.q_norm(q_BLHd), self.k_norm(k_BLKd)
        q_BLHd = constrain(apply_rope(q_BLHd, cos, sin), ("act_batch", "act_length", "act_heads", None))
        k_BLKd = constrain(apply_rope(k_BLKd, cos, sin), ("act_batch", "act_length", "act_kv_heads", None))
        v_BLKd = constrain(v_BLKd, ("act_batch", "act_length", "act_kv_heads", None))
        return q_BLHd.astype(cd), k_BLKd.astype(cd), v_BLKd.astype(cd)

    def __call__(self, x_BLD: jax.Array, cos: jax.Array, sin: jax.Array, segments_BL: jax.Array | None,
                 window: jax.Array | None) -> jax.Array:
        q_BLHd, k_BLKd, v_BLKd = self.project(x_BLD, cos, sin)
        # Segments add a same-document mask on top of the causal one.
        out_BLHd = dot_product_attention(q_BLHd, k_BLKd, v_BLKd, is_causal=True, segments_BL=segments_BL,
                                         implementation=self.cfg.attention, window=window, scale=self.scale,
                                         softcap=self.cfg.attn_logit_softcap)
        return self.output(out_BLHd)

    def output(self, out_BLHd: jax.Array) -> jax.Array:
        b, l, h, dh = out_BLHd.shape
        return self.wo(out_BLHd.reshape(b, l, h * dh))

    def decode(self, x_BLD, cos, sin, cache: tuple[jax.Array, jax.Array], start: jax.Array, key_valid_BT: jax.Array,
               window: jax.Array | None):
        """Attend from L new tokens, written at buffer slots [start, start+L), to everything cached so far.

        `cache` is this layer's keys and values, (B, K, T, Dh) each: the layout `cached_attention`
        reads in place.
        """
        q_BLHd, k_BLKd, v_BLKd = self.project(x_BLD, cos, sin)
        k_BKTd = jax.lax.dynamic_update_slice_in_dim(cache[0], k_BLKd.transpose(0, 2, 1, 3).astype(cache[0].dtype),
                                                     start, axis=2)
        v_BKTd = jax.lax.dynamic_update_slice_in_dim(cache[1], v_BLKd.transpose(0, 2, 1, 3).astype(cache[1].dtype),
                                                     start, axis=2)
        l, t = x_BLD.shape[1], k_BKTd.shape[2]
        # A start known when tracing (a prompt's prefill) sees only the slots written so far: the
        # rest of the buffer, the room for new tokens, would be scored and masked for nothing.
        t = t if isinstance(start, jax.Array) else start + l
        slots_L, slots_T = start + jnp.arange(l), jnp.arange(t)
        causal_LT = slots_T[None, :] <= slots_L[:, None]
        if window is not None:  # slots and positions differ by the row's padding alone
            causal_LT = causal_LT & within_window(slots_L, slots_T, window)
        mask_B1LT = (causal_LT[None] & key_valid_BT[:, None, :t])[:, None]
        out_BLHd = cached_attention(q_BLHd, k_BKTd[:, :, :t], v_BKTd[:, :, :t], mask_B1LT, scale=self.scale,
                                    softcap=self.cfg.attn_logit_softcap)
        return self.output(out_BLHd), (k_BKTd, v_BKTd)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[cfg.mlp_activation]
        d, f, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.w_gate = Linear(d, f, ("embed", "mlp"), std=std, dtypes=dtypes, rngs=rngs)
        self.w_up = Linear(d, f, ("embed", "mlp"), std=std, dtypes=dtypes, rngs=rngs)
        self.w_down = Linear(f, d, ("mlp", "embed"), std=std / (2 * cfg.n_layers) ** 0.5, dtypes=dtypes, rngs=rngs)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        h_BLF = self.activation(self.w_gate(x_BLD)) * self.w_up(x_BLD)
        h_BLF = constrain(h_BLF, ("act_batch", "act_length", "act_mlp"))
        return self.w_down(h_BLF)


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.attn_norm = norm(cfg, cfg.d_model, dtypes)
        self.attn = Attention(cfg, dtypes, rngs)
        self.mlp_norm = norm(cfg, cfg.d_model, dtypes)
        self.mlp = MLP(cfg, dtypes, rngs)
        self.post_attn_norm = norm(cfg, cfg.d_model, dtypes) if cfg.post_norms else None
        self.post_mlp_norm = norm(cfg, cfg.d_model, dtypes) if cfg.post_norms else None

    def __call__(self, x_BLD: jax.Array, cos: jax.Array, sin: jax.Array, segments_BL: jax.Array | None,
                 window: jax.Array | None) -> jax.Array:
        x_BLD = x_BLD + self.post_norm(self.attn(self.attn_norm(x_BLD), cos, sin, segments_BL, window),
                                       self.post_attn_norm)
        return constrain(self.mlp_residual(x_BLD), ("act_batch", "act_length", "act_embed"))

    def decode(self, x_BLD, cos, sin, cache, start, key_valid_BT, window):
        attn_BLD, cache = self.attn.decode(self.attn_norm(x_BLD), cos, sin, cache, start, key_valid_BT, window)
        return self.mlp_residual(x_BLD + self.post_norm(attn_BLD, self.post_attn_norm)), cache

    def mlp_residual(self, x_BLD: jax.Array) -> jax.Array:
        return x_BLD + self.post_norm(self.mlp(self.mlp_norm(x_BLD)), self.post_mlp_norm)

    @staticmethod
    def post_norm(branch_BLD: jax.Array, post: RMSNorm | None) -> jax.Array:
        return branch_BLD if post is None else post(branch_BLD)


class Transformer(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtypes = Dtypes.of(cfg)
        self.compute_dtype = dtypes.compute
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), dtypes.param),
                               out_sharding=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtypes, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = norm(cfg, cfg.d_model, dtypes)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), std=cfg.init_std, dtypes=dtypes,
                                  rngs=rngs)

    def __call__(self, tokens_BL: jax.Array, positions_BL: jax.Array | None = None,
                 segments_BL: jax.Array | None = None) -> jax.Array:
        """Logits (B, L, V) in float32; `segments_BL` (document ids) restricts attention to each document."""
        cfg = self.cfg
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x_BLD = self.embed_tokens(tokens_BL)
        cos, sin = self.rope(positions_BL)
        # Independent batch slices through every layer (model.batch_slices): more
        # matmuls that XLA:CPU can run side by side. One slice is the plain model.
        n = resolve_batch_slices(cfg.batch_slices, tokens_BL.shape[0])
        per_slice = list(zip(split_batch(cos, n), split_batch(sin, n), split_batch(segments_BL, n)))

        def layer_body(layer, xs, window):
            return tuple(layer(x, cos, sin, segments, window) for x, (cos, sin, segments) in zip(xs, per_slice))

        xs = run_stacked(self.layers, layer_body, split_batch(x_BLD, n), scan=cfg.scan_layers,
                         remat_policy=cfg.remat, xs=layer_windows(cfg))
        return self.logits(merge_batch(xs))

    def rope(self, positions_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        return rope_tables(positions_BL, rope_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = self.final_norm(x_BLD)
        if self.cfg.tie_embeddings:
            logits_BLV = matmul_by_rows(x_BLD, self.embed[...], self.compute_dtype)
        else:
            logits_BLV = self.lm_head(x_BLD)
        logits_BLV = softcap(logits_BLV, self.cfg.final_logit_softcap)
        return constrain(logits_BLV, ("act_batch", "act_length", "act_vocab"))

    def embed_tokens(self, tokens_BL: jax.Array) -> jax.Array:
        # Gather from a whole table: a lookup into a vocab- or embed-sharded table
        # makes the SPMD partitioner fall back to replicating it anyway, less efficiently.
        table_VD = constrain(self.embed[...], (None, None))
        x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(jnp.float32)
        if self.cfg.scale_embeddings:
            x_BLD = x_BLD * self.cfg.d_model ** 0.5
        return constrain(x_BLD, ("act_batch", "act_length", "act_embed"))

    def init_cache(self, batch: int, length: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Empty key and value caches, one (B, K, T, Dh) pair per layer, in the compute dtype."""
        cfg = self.cfg
        shape = (batch, cfg.n_kv_heads, length, cfg.resolved_head_dim)
        return tuple((jnp.zeros(shape, self.compute_dtype), jnp.zeros(shape, self.compute_dtype))
                     for _ in range(cfg.n_layers))

    def decode(self, tokens_BL, positions_BL, cache, start, key_valid_BT, layers: list[nnx.Module] | None = None,
               last_only: bool = False):
        """Logits of L new tokens written at buffer slots [start, start+L) of the cache, and the new cache.

        `key_valid_BT` marks the slots holding real tokens (False for left padding). The layers run
        unrolled, each on its own cache buffer; a token loop passes `layers` (`each_layer(model.layers)`,
        sliced once before the loop: XLA does not hoist the slices out of it by itself). `last_only`
        gives the logits of the last token alone (B, 1, V): a prompt's prefill needs no others, and
        the output layer over every prompt token is a vocabulary-wide GEMM per token.
        """
        x_BLD = self.embed_tokens(tokens_BL)
        cos, sin = self.rope(positions_BL)
        windows = layer_windows(self.cfg)
        new_cache = []
        layers = each_layer(self.layers) if layers is None else layers
        for i, (layer, layer_cache) in enumerate(zip(layers, cache, strict=True)):
            window = None if windows is None else windows[i]
            x_BLD, layer_cache = layer.decode(x_BLD, cos, sin, layer_cache, start, key_valid_BT, window)
            new_cache.append(layer_cache)
        if last_only:
            x_BLD = x_BLD[:, -1:]
        return self.logits(x_BLD), tuple(new_cache)


def param_count(cfg: TransformerConfig) -> int:
    """Closed-form parameter count, used by tests and reports."""
    d, f, dh = cfg.d_model, cfg.d_ff, cfg.resolved_head_dim
    attn = d * cfg.n_heads * dh * 2 + d * cfg.n_kv_heads * dh * 2
    attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * dh * cfg.qkv_bias + 2 * dh * cfg.qk_norm
    per_layer = attn + 3 * d * f + 2 * d * (1 + cfg.post_norms)
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return cfg.vocab_size * d + cfg.n_layers * per_layer + d + head


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B convention.

    6 x (parameters that take part in matmuls: every layer weight and the
    output projection, not the embedding gather) + 12 x layers x heads x
    head_dim x seq_len for the attention scores and weighted sum (counted for
    the full square, which is what the XLA kernel computes).
    """
    d, f, dh = cfg.d_model, cfg.d_ff, cfg.resolved_head_dim
    matmul_params = cfg.n_layers * (d * cfg.n_heads * dh * 2 + d * cfg.n_kv_heads * dh * 2 + 3 * d * f)
    matmul_params += d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.n_heads * dh * seq_len
