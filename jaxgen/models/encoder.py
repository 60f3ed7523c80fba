"""Bidirectional transformer encoder with a masked-LM head, in Flax NNX.

By default BERT (`BertForMaskedLM`): word + learned position + token-type
embeddings and a LayerNorm over their sum, post-norm blocks (a LayerNorm after
each residual add), an exact-erf GELU MLP, biases everywhere, and an MLM head
(dense + activation + norm) whose decoder is the word embedding table plus an
output bias. The config's switches make it a modern encoder instead: rotary
positions, norms before each sub-layer with a final one, RMSNorm, a gated MLP,
no biases. Every query attends to every key of its own document (segment),
before and after it, and to nothing else.

Shape letters: B batch, L length, D d_model, H heads, Dh head_dim, F d_ff,
V vocab, T token types, P max positions. Logical parameter axes: vocab, embed,
q_heads, mlp, norm, layers (positions and token types stay replicated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config_encoders import EncoderConfig
from jaxgen.models.cpu_kernels import matmul_by_rows
from jaxgen.models.layers import (
    Dtypes,
    Linear,
    RMSNorm,
    apply_rope,
    dot_product_attention,
    rope_frequencies,
    rope_tables,
    run_stacked,
)
from jaxgen.sharding import constrain

ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu}
ACT_BLD = ("act_batch", "act_length", "act_embed")


class LayerNorm(nnx.Module):
    """Mean and variance normalization with a learned scale and (optionally) shift; statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype, bias: bool):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        normed = normed * self.scale[...].astype(jnp.float32)
        return normed if self.bias is None else normed + self.bias[...].astype(jnp.float32)


def norm(cfg: EncoderConfig, dtypes: Dtypes) -> LayerNorm | RMSNorm:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dtypes.param)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dtypes.param, bias=cfg.bias)


class Attention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.cfg, self.compute_dtype = cfg, dtypes.compute
        d, std, bias = cfg.d_model, cfg.init_std, cfg.bias
        self.wq = Linear(d, d, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)
        self.wk = Linear(d, d, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)
        self.wv = Linear(d, d, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)
        self.wo = Linear(d, d, ("q_heads", "embed"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)

    def __call__(self, x_BLD: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
                 segments_BL: jax.Array) -> jax.Array:
        cfg, cd = self.cfg, self.compute_dtype
        b, l, _ = x_BLD.shape
        heads = [self.wq(x_BLD), self.wk(x_BLD), self.wv(x_BLD)]
        q_BLHd, k_BLHd, v_BLHd = (h.reshape(b, l, cfg.n_heads, cfg.head_dim) for h in heads)
        if rope is not None:
            q_BLHd, k_BLHd = apply_rope(q_BLHd, *rope), apply_rope(k_BLHd, *rope)
        q_BLHd, k_BLHd, v_BLHd = (constrain(h, ("act_batch", "act_length", "act_heads", None)).astype(cd)
                                  for h in (q_BLHd, k_BLHd, v_BLHd))
        # "xla": the exact kernel on every platform (the CPU one runs its matmuls in bfloat16). A padding
        # query (segment 0) attends to the padding keys, so no row of the mask is empty.
        out_BLHd = dot_product_attention(q_BLHd, k_BLHd, v_BLHd, is_causal=False, segments_BL=segments_BL,
                                         implementation="xla")
        return self.wo(out_BLHd.reshape(b, l, cfg.d_model))


class MLP(nnx.Module):
    def __init__(self, cfg: EncoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[cfg.mlp_activation]
        d, f, std, bias = cfg.d_model, cfg.d_ff, cfg.init_std, cfg.bias
        self.w_gate = Linear(d, f, ("embed", "mlp"), std=std, dtypes=dtypes, rngs=rngs, bias=bias) \
            if cfg.gated_mlp else None
        self.w_up = Linear(d, f, ("embed", "mlp"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)
        self.w_down = Linear(f, d, ("mlp", "embed"), std=std, dtypes=dtypes, rngs=rngs, bias=bias)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        if self.w_gate is None:
            h_BLF = self.activation(self.w_up(x_BLD))
        else:
            h_BLF = self.activation(self.w_gate(x_BLD)) * self.w_up(x_BLD)
        return self.w_down(constrain(h_BLF, ("act_batch", "act_length", "act_mlp")))


class Block(nnx.Module):
    """Attention then MLP, each a residual branch with its norm after the add (post) or on its input (pre)."""

    def __init__(self, cfg: EncoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.pre = cfg.norm_placement == "pre"
        self.attn = Attention(cfg, dtypes, rngs)
        self.attn_norm = norm(cfg, dtypes)
        self.mlp = MLP(cfg, dtypes, rngs)
        self.mlp_norm = norm(cfg, dtypes)

    def __call__(self, x_BLD: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
                 segments_BL: jax.Array) -> jax.Array:
        if self.pre:
            x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), rope, segments_BL)
            x_BLD = x_BLD + self.mlp(self.mlp_norm(x_BLD))
        else:
            x_BLD = self.attn_norm(x_BLD + self.attn(x_BLD, rope, segments_BL))
            x_BLD = self.mlp_norm(x_BLD + self.mlp(x_BLD))
        return constrain(x_BLD, ACT_BLD)


class MLMHead(nnx.Module):
    """BERT's prediction head: dense + activation + norm, then the (tied) word embeddings and an output bias."""

    def __init__(self, cfg: EncoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[cfg.mlp_activation]
        self.compute_dtype = dtypes.compute
        self.dense = Linear(cfg.d_model, cfg.d_model, ("embed", "embed"), std=cfg.init_std, dtypes=dtypes,
                            rngs=rngs, bias=cfg.bias)
        self.norm = norm(cfg, dtypes)
        self.output_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), dtypes.param), out_sharding=("vocab",)) \
            if cfg.bias else None

    def __call__(self, x_BLD: jax.Array, embed_VD: jax.Array) -> jax.Array:
        x_BLD = self.norm(self.activation(self.dense(x_BLD)))
        logits_BLV = matmul_by_rows(x_BLD, embed_VD, self.compute_dtype)
        if self.output_bias is not None:
            logits_BLV = logits_BLV + self.output_bias[...].astype(jnp.float32)
        return constrain(logits_BLV, ("act_batch", "act_length", "act_vocab"))


class Encoder(nnx.Module):
    """Embeddings, a stack of bidirectional blocks and the masked-LM head; `hidden` stops before the head."""

    def __init__(self, cfg: EncoderConfig, rngs: nnx.Rngs, head: bool = True):
        """`head` False: no MLM head (an encoder serving only its hidden states, e.g. a DiT's caption encoder)."""
        self.cfg = cfg
        dtypes = Dtypes.of(cfg)
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), dtypes.param),
                               out_sharding=("vocab", "embed"))
        self.position_embed = nnx.Param(init(rngs.params(), (cfg.max_seq_len, cfg.d_model), dtypes.param),
                                        out_sharding=(None, "embed")) if cfg.positions == "learned" else None
        self.type_embed = nnx.Param(init(rngs.params(), (cfg.type_vocab_size, cfg.d_model), dtypes.param),
                                    out_sharding=(None, "embed")) if cfg.type_vocab_size else None
        self.embed_norm = norm(cfg, dtypes)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtypes, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = norm(cfg, dtypes) if cfg.norm_placement == "pre" else None
        self.head = MLMHead(cfg, dtypes, rngs) if head else None

    def __call__(self, tokens_BL: jax.Array, segments_BL: jax.Array, positions_BL: jax.Array | None = None,
                 token_types_BL: jax.Array | None = None) -> jax.Array:
        """Masked-LM logits (B, L, V) in float32; each token sees only its own document (`segments_BL`)."""
        return self.head(self.hidden(tokens_BL, segments_BL, positions_BL, token_types_BL), self.embed[...])

    def hidden(self, tokens_BL: jax.Array, segments_BL: jax.Array, positions_BL: jax.Array | None = None,
               token_types_BL: jax.Array | None = None) -> jax.Array:
        """The final hidden states (B, L, D) in float32, before the MLM head.

        `positions_BL` restart at 0 in each document (None: 0..L-1); `token_types_BL` None is type 0 throughout.
        """
        cfg = self.cfg
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        x_BLD = self.embed_inputs(tokens_BL, positions_BL, token_types_BL)
        rope = None
        if cfg.positions == "rope":
            rope = rope_tables(positions_BL, rope_frequencies(cfg.head_dim, cfg.rope_theta))

        def layer_body(layer: Block, x_BLD: jax.Array, _) -> jax.Array:
            return layer(x_BLD, rope, segments_BL)

        x_BLD = run_stacked(self.layers, layer_body, x_BLD, scan=cfg.scan_layers, remat_policy=cfg.remat)
        return x_BLD if self.final_norm is None else constrain(self.final_norm(x_BLD), ACT_BLD)

    def embed_inputs(self, tokens_BL: jax.Array, positions_BL: jax.Array,
                     token_types_BL: jax.Array | None) -> jax.Array:
        # Gathers from whole tables: a lookup into a sharded table makes the SPMD partitioner replicate it anyway.
        x_BLD = _lookup(self.embed[...], tokens_BL)
        if self.position_embed is not None:
            x_BLD = x_BLD + _lookup(self.position_embed[...], positions_BL)
        if self.type_embed is not None:
            types_BL = jnp.zeros_like(tokens_BL) if token_types_BL is None else token_types_BL
            x_BLD = x_BLD + _lookup(self.type_embed[...], types_BL)
        return constrain(self.embed_norm(x_BLD), ACT_BLD)


def _lookup(table: jax.Array, ids_BL: jax.Array) -> jax.Array:
    return jnp.take(constrain(table, (None, None)), ids_BL, axis=0).astype(jnp.float32)


def param_count(cfg: EncoderConfig) -> int:
    """Closed-form parameter count, used by tests and reports."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    norm_size = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    ff_in = 2 if cfg.gated_mlp else 1
    attn = 4 * d * d + 4 * d * cfg.bias
    mlp = (ff_in + 1) * d * f + (ff_in * f + d) * cfg.bias
    per_layer = attn + mlp + 2 * norm_size
    embeddings = (v + cfg.type_vocab_size + cfg.max_seq_len * (cfg.positions == "learned")) * d + norm_size
    head = d * d + (d + v) * cfg.bias + norm_size
    final = norm_size if cfg.norm_placement == "pre" else 0
    return embeddings + cfg.n_layers * per_layer + final + head


def flops_per_token(cfg: EncoderConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the convention of `transformer.flops_per_token`.

    6 x the parameters that take part in matmuls (every layer's projections, the
    MLM head's dense and its tied decoder, not the embedding gathers) + 12 x layers
    x d_model x seq_len for the attention scores and weighted sum.
    """
    d, f = cfg.d_model, cfg.d_ff
    matmul_params = cfg.n_layers * (4 * d * d + (3 if cfg.gated_mlp else 2) * d * f) + d * d + d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * d * seq_len
