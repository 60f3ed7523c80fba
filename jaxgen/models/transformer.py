"""Decoder-only Llama-family transformer in Flax NNX.

RMSNorm, rotary positions, grouped-query causal attention (layers.dot_product_attention:
a CPU-tuned kernel on CPU, `jax.nn.dot_product_attention` elsewhere, cuDNN flash
attention on GPUs when asked), SwiGLU MLP, optional tied embeddings, layers stacked
and scanned.

Shape letters: B batch, L length, D d_model, H query heads, K kv heads,
Dh head_dim, F d_ff, V vocab. Logical parameter axes: vocab, embed, q_heads,
kv_heads, mlp, norm, layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config import TransformerConfig
from jaxgen.models.cpu_kernels import matmul, resolve_batch_slices
from jaxgen.models.layers import (
    Dtypes, Linear, RMSNorm, apply_rope, dot_product_attention, merge_batch, rope_tables, run_stacked, scan_stacked,
    split_batch,
)
from jaxgen.sharding import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.cfg, self.compute_dtype = cfg, dtypes.compute
        d, h, k, dh, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5  # residual branches start small
        self.wq = Linear(d, h * dh, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs)
        self.wk = Linear(d, k * dh, ("embed", "kv_heads"), std=std, dtypes=dtypes, rngs=rngs)
        self.wv = Linear(d, k * dh, ("embed", "kv_heads"), std=std, dtypes=dtypes, rngs=rngs)
        self.wo = Linear(h * dh, d, ("q_heads", "embed"), std=out_std, dtypes=dtypes, rngs=rngs)

    def project(self, x_BLD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values of new tokens, rotated to their positions."""
        cfg, cd = self.cfg, self.compute_dtype
        b, l, _ = x_BLD.shape
        dh = cfg.resolved_head_dim
        q_BLHd = self.wq(x_BLD).reshape(b, l, cfg.n_heads, dh)
        k_BLKd = self.wk(x_BLD).reshape(b, l, cfg.n_kv_heads, dh)
        v_BLKd = self.wv(x_BLD).reshape(b, l, cfg.n_kv_heads, dh)
        q_BLHd = constrain(apply_rope(q_BLHd, cos, sin), ("act_batch", "act_length", "act_heads", None))
        k_BLKd = constrain(apply_rope(k_BLKd, cos, sin), ("act_batch", "act_length", "act_kv_heads", None))
        v_BLKd = constrain(v_BLKd, ("act_batch", "act_length", "act_kv_heads", None))
        return q_BLHd.astype(cd), k_BLKd.astype(cd), v_BLKd.astype(cd)

    def __call__(self, x_BLD: jax.Array, cos: jax.Array, sin: jax.Array, segments_BL: jax.Array | None) -> jax.Array:
        q_BLHd, k_BLKd, v_BLKd = self.project(x_BLD, cos, sin)
        # Segments add a same-document mask on top of the causal one.
        out_BLHd = dot_product_attention(q_BLHd, k_BLKd, v_BLKd, is_causal=True, segments_BL=segments_BL,
                                         implementation=self.cfg.attention)
        return self.output(out_BLHd)

    def output(self, out_BLHd: jax.Array) -> jax.Array:
        b, l, h, dh = out_BLHd.shape
        return self.wo(out_BLHd.reshape(b, l, h * dh))

    def decode(self, x_BLD, cos, sin, cache: tuple[jax.Array, jax.Array], start: jax.Array, key_valid_BT: jax.Array):
        """Attend from L new tokens, written at buffer slots [start, start+L), to everything cached so far."""
        q_BLHd, k_BLKd, v_BLKd = self.project(x_BLD, cos, sin)
        k_BTKd = jax.lax.dynamic_update_slice_in_dim(cache[0], k_BLKd.astype(cache[0].dtype), start, axis=1)
        v_BTKd = jax.lax.dynamic_update_slice_in_dim(cache[1], v_BLKd.astype(cache[1].dtype), start, axis=1)
        l, t = x_BLD.shape[1], k_BTKd.shape[1]
        causal_LT = jnp.arange(t)[None, :] <= start + jnp.arange(l)[:, None]
        mask_B1LT = (causal_LT[None] & key_valid_BT[:, None, :])[:, None]
        out_BLHd = jax.nn.dot_product_attention(q_BLHd, k_BTKd.astype(q_BLHd.dtype), v_BTKd.astype(q_BLHd.dtype),
                                                mask=mask_B1LT)
        return self.output(out_BLHd), (k_BTKd, v_BTKd)


class MLP(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        d, f, std = cfg.d_model, cfg.d_ff, cfg.init_std
        self.w_gate = Linear(d, f, ("embed", "mlp"), std=std, dtypes=dtypes, rngs=rngs)
        self.w_up = Linear(d, f, ("embed", "mlp"), std=std, dtypes=dtypes, rngs=rngs)
        self.w_down = Linear(f, d, ("mlp", "embed"), std=std / (2 * cfg.n_layers) ** 0.5, dtypes=dtypes, rngs=rngs)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        h_BLF = jax.nn.silu(self.w_gate(x_BLD)) * self.w_up(x_BLD)
        h_BLF = constrain(h_BLF, ("act_batch", "act_length", "act_mlp"))
        return self.w_down(h_BLF)


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dtypes.param)
        self.attn = Attention(cfg, dtypes, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dtypes.param)
        self.mlp = MLP(cfg, dtypes, rngs)

    def __call__(self, x_BLD: jax.Array, cos: jax.Array, sin: jax.Array, segments_BL: jax.Array | None) -> jax.Array:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), cos, sin, segments_BL)
        x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        return constrain(x_BLD, ("act_batch", "act_length", "act_embed"))

    def decode(self, x_BLD, cos, sin, cache, start, key_valid_BT):
        attn_BLD, cache = self.attn.decode(self.attn_norm(x_BLD), cos, sin, cache, start, key_valid_BT)
        x_BLD = x_BLD + attn_BLD
        return x_BLD + self.mlp(self.mlp_norm(x_BLD)), cache


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
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dtypes.param)
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
        cos, sin = rope_tables(positions_BL, cfg.resolved_head_dim, cfg.rope_theta)
        # Independent batch slices through every layer (model.batch_slices): more
        # matmuls that XLA:CPU can run side by side. One slice is the plain model.
        n = resolve_batch_slices(cfg.batch_slices, tokens_BL.shape[0])
        per_slice = list(zip(split_batch(cos, n), split_batch(sin, n), split_batch(segments_BL, n)))

        def layer_body(layer, xs):
            return tuple(layer(x, cos, sin, segments) for x, (cos, sin, segments) in zip(xs, per_slice))

        xs = run_stacked(self.layers, layer_body, split_batch(x_BLD, n), scan=cfg.scan_layers,
                         remat_policy=cfg.remat)
        return self.logits(merge_batch(xs))

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        x_BLD = self.final_norm(x_BLD)
        if self.cfg.tie_embeddings:
            logits_BLV = matmul(x_BLD, self.embed[...].T, self.compute_dtype)
        else:
            logits_BLV = self.lm_head(x_BLD)
        return constrain(logits_BLV, ("act_batch", "act_length", "act_vocab"))

    def embed_tokens(self, tokens_BL: jax.Array) -> jax.Array:
        # Gather from a whole table: a lookup into a vocab- or embed-sharded table
        # makes the SPMD partitioner fall back to replicating it anyway, less efficiently.
        table_VD = constrain(self.embed[...], (None, None))
        x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(jnp.float32)
        return constrain(x_BLD, ("act_batch", "act_length", "act_embed"))

    def init_cache(self, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
        """Empty key and value caches, (layers, B, T, K, Dh) each, in the compute dtype."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.resolved_head_dim)
        return jnp.zeros(shape, self.compute_dtype), jnp.zeros(shape, self.compute_dtype)

    def decode(self, tokens_BL, positions_BL, cache, start, key_valid_BT):
        """Logits of L new tokens written at buffer slots [start, start+L) of the cache, and the new cache.

        `key_valid_BT` marks the slots holding real tokens (False for left padding).
        """
        x_BLD = self.embed_tokens(tokens_BL)
        cos, sin = rope_tables(positions_BL, self.cfg.resolved_head_dim, self.cfg.rope_theta)
        x_BLD, cache = scan_stacked(
            self.layers, lambda layer, x, c: layer.decode(x, cos, sin, c, start, key_valid_BT), x_BLD, cache
        )
        return self.logits(x_BLD), cache


def param_count(cfg: TransformerConfig) -> int:
    """Closed-form parameter count, used by tests and reports."""
    d, f, dh = cfg.d_model, cfg.d_ff, cfg.resolved_head_dim
    attn = d * cfg.n_heads * dh * 2 + d * cfg.n_kv_heads * dh * 2
    per_layer = attn + 3 * d * f + 2 * d
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
