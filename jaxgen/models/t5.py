"""T5 v1.1 encoder-decoder in Flax NNX, laid out as transformers' T5ForConditionalGeneration.

One token embedding shared by both stacks. Each stack: pre-norm blocks (T5's RMSNorm:
no mean subtraction, no bias) with a final norm; the encoder's blocks attend within
their document in both directions, the decoder's causally within their target and
then across to their own pair's input (cross-attention); a gated MLP
act(x Wi0) * (x Wi1) Wo; no biases anywhere. Attention logits are not scaled by
head_dim ** -0.5 (T5 folds that into the query's initialisation) and carry a learned
bias per relative-position bucket and head: one table per stack, used by every layer
(T5 computes it in the first layer and passes it on). Buckets come from positions,
so packed rows whose positions restart in each document are right. The output
projection is untied (v1.1); tied, the decoder's output is scaled by d_model ** -0.5
and multiplied by the embedding (v1.0).

Initialisation is transformers' T5PreTrainedModel._init_weights, with cfg.init_std as
its initializer_factor f: embedding and untied output N(0, f); query N(0, f (D Dh)^-0.5);
key and value N(0, f D^-0.5); attention output N(0, f (H Dh)^-0.5); Wi0 and Wi1
N(0, f D^-0.5); Wo N(0, f F^-0.5); relative bias N(0, f D^-0.5); norms 1 (T5 sets f).

Masks (segment ids: 0 padding, 1, 2, ... documents): a query sees keys of its own
segment only; a decoder query sees encoder tokens whose segment equals its own, so
pair k's target reads only pair k's input when pairs are packed.

Shape letters: B batch; L encoder length, T decoder length (within a layer: L queries, S
keys, which are the encoder's tokens to a cross-attention, the cache's slots to decoding);
D d_model, H heads, Dh head_dim, I heads x head_dim, F d_ff, V vocab. Logical parameter
axes: vocab, embed, q_heads, kv_heads, mlp, norm, layers (the bias tables stay replicated).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.config_encoders import EncoderDecoderConfig
from jaxgen.models.cpu_kernels import matmul_by_rows
from jaxgen.models.layers import Dtypes, Linear, RMSNorm, cached_attention, each_layer, run_stacked
from jaxgen.sharding import constrain

ACTIVATIONS = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu}
ACT_BLD = ("act_batch", "act_length", "act_embed")
ACT_BLHd = ("act_batch", "act_length", "act_heads", None)


# ----------------------------------------------------------------------------- relative positions


def distance_buckets(n_buckets: int, max_distance: int, reach: int | None = None) -> np.ndarray:
    """T5's bucket of each distance 0..max_distance (farther ones share the last), as T5 computes it.

    Below n_buckets / 2 each distance has its own bucket; above, buckets grow
    logarithmically up to max_distance. Worked out on the host in float32 as T5 does
    (the boundaries then never depend on a device's log), and looked up on the device.
    `reach`: the largest distance that can occur; the table stops there (a table up to a
    max_distance of billions took the host's memory).
    """
    exact = n_buckets // 2
    distance = np.arange(min(max_distance, max_distance if reach is None else reach) + 1)
    log_ratio = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
                 / np.float32(math.log(max_distance / exact)))
    large = np.minimum(exact + (log_ratio * np.float32(n_buckets - exact)).astype(np.int32), n_buckets - 1)
    return np.where(distance < exact, distance, large).astype(np.int32)


def relative_buckets(relative: jax.Array, *, bidirectional: bool, n_buckets: int, max_distance: int,
                     reach: int | None = None) -> jax.Array:
    """The bucket of each key's offset from its query (key position - query position).

    Bidirectional: half the buckets for keys after the query, half for keys at or before
    it. Causal: every bucket for keys at or before it (later keys are masked anyway).
    `reach`: no offset is larger (positions lie within a row, or within the decoder's cache).
    """
    if bidirectional:
        n_buckets //= 2
        offset = jnp.where(relative > 0, n_buckets, 0)
        distance = jnp.abs(relative)
    else:
        offset = 0
        distance = jnp.maximum(-relative, 0)
    table = jnp.asarray(distance_buckets(n_buckets, max_distance, reach))
    return offset + jnp.take(table, jnp.minimum(distance, len(table) - 1))


# ----------------------------------------------------------------------------- layers


class Attention(nnx.Module):
    """Multi-head attention, self- or cross-, unscaled, with an additive bias and a keep-mask."""

    def __init__(self, cfg: EncoderDecoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.n_heads, self.head_dim, self.compute_dtype = cfg.n_heads, cfg.resolved_head_dim, dtypes.compute
        d, inner, f = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim, cfg.init_std
        self.wq = Linear(d, inner, ("embed", "q_heads"), std=f * (d * self.head_dim) ** -0.5, dtypes=dtypes, rngs=rngs)
        self.wk = Linear(d, inner, ("embed", "kv_heads"), std=f * d ** -0.5, dtypes=dtypes, rngs=rngs)
        self.wv = Linear(d, inner, ("embed", "kv_heads"), std=f * d ** -0.5, dtypes=dtypes, rngs=rngs)
        self.wo = Linear(inner, d, ("q_heads", "embed"), std=f * inner ** -0.5, dtypes=dtypes, rngs=rngs)

    def heads(self, x_BLI: jax.Array) -> jax.Array:
        b, l, _ = x_BLI.shape
        return constrain(x_BLI.reshape(b, l, self.n_heads, self.head_dim), ACT_BLHd).astype(self.compute_dtype)

    def keys_values(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.heads(self.wk(x_BSD)), self.heads(self.wv(x_BSD))

    def attend(self, x_BLD: jax.Array, k_BSHd: jax.Array, v_BSHd: jax.Array, bias_BHLS: jax.Array | None,
               keep_B1LS: jax.Array) -> jax.Array:
        """The output projection of x's queries attending to the given keys and values."""
        q_BLHd = self.heads(self.wq(x_BLD))
        bias = None if bias_BHLS is None else bias_BHLS.astype(q_BLHd.dtype)
        # A query with no key to see (a padding row) gets equal weights on all, never NaN.
        out_BLHd = jax.nn.dot_product_attention(q_BLHd, k_BSHd.astype(q_BLHd.dtype), v_BSHd.astype(q_BLHd.dtype),
                                                bias=bias, mask=keep_B1LS, scale=1.0)
        b, l = x_BLD.shape[:2]
        return self.wo(out_BLHd.reshape(b, l, self.n_heads * self.head_dim))

    def __call__(self, x_BLD: jax.Array, context_BSD: jax.Array, bias_BHLS: jax.Array | None,
                 keep_B1LS: jax.Array) -> jax.Array:
        return self.attend(x_BLD, *self.keys_values(context_BSD), bias_BHLS, keep_B1LS)

    def attend_cached(self, x_BLD: jax.Array, k_BHSd: jax.Array, v_BHSd: jax.Array, bias_BHLS: jax.Array | None,
                      keep_B1LS: jax.Array) -> jax.Array:
        """`attend` over keys and values laid out head-major, as the decoder's caches hold them."""
        q_BLHd = self.heads(self.wq(x_BLD))
        bias = None if bias_BHLS is None else bias_BHLS.astype(jnp.float32)
        out_BLHd = cached_attention(q_BLHd, k_BHSd, v_BHSd, keep_B1LS, scale=1.0, bias_BHLT=bias)
        b, l = x_BLD.shape[:2]
        return self.wo(out_BLHd.reshape(b, l, self.n_heads * self.head_dim))


class MLP(nnx.Module):
    """T5's gated feed-forward: act(x Wi0) * (x Wi1) Wo."""

    def __init__(self, cfg: EncoderDecoderConfig, dtypes: Dtypes, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[cfg.mlp_activation]
        d, f, s = cfg.d_model, cfg.d_ff, cfg.init_std
        self.w_gate = Linear(d, f, ("embed", "mlp"), std=s * d ** -0.5, dtypes=dtypes, rngs=rngs)
        self.w_up = Linear(d, f, ("embed", "mlp"), std=s * d ** -0.5, dtypes=dtypes, rngs=rngs)
        self.w_down = Linear(f, d, ("mlp", "embed"), std=s * f ** -0.5, dtypes=dtypes, rngs=rngs)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        h_BLF = self.activation(self.w_gate(x_BLD)) * self.w_up(x_BLD)
        return self.w_down(constrain(h_BLF, ("act_batch", "act_length", "act_mlp")))


def norm(cfg: EncoderDecoderConfig, dtypes: Dtypes) -> RMSNorm:
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dtypes.param)


class Block(nnx.Module):
    """Self-attention, then (decoder blocks) cross-attention, then the MLP, each pre-normed and residual."""

    def __init__(self, cfg: EncoderDecoderConfig, dtypes: Dtypes, rngs: nnx.Rngs, cross: bool):
        self.attn_norm = norm(cfg, dtypes)
        self.attn = Attention(cfg, dtypes, rngs)
        self.cross_norm = norm(cfg, dtypes) if cross else None
        self.cross_attn = Attention(cfg, dtypes, rngs) if cross else None
        self.mlp_norm = norm(cfg, dtypes)
        self.mlp = MLP(cfg, dtypes, rngs)

    def __call__(self, x_BLD: jax.Array, bias_BHLL: jax.Array, keep_B1LL: jax.Array,
                 encoded_BSD: jax.Array | None = None, cross_keep_B1LS: jax.Array | None = None) -> jax.Array:
        normed_BLD = self.attn_norm(x_BLD)
        x_BLD = x_BLD + self.attn(normed_BLD, normed_BLD, bias_BHLL, keep_B1LL)
        if self.cross_attn is not None:
            x_BLD = x_BLD + self.cross_attn(self.cross_norm(x_BLD), encoded_BSD, None, cross_keep_B1LS)
        return self.mlp_residual(x_BLD)

    def decode(self, x_BLD, bias_BHLS, keep_B1LS, cache, start, cross_kv, cross_keep_B1LS):
        """New tokens written at cache slots [start, start + L), attending to the cache and the encoder.

        `cache` and `cross_kv` are this layer's keys and values laid out (B, H, S, Dh), as
        `cached_attention` reads them in place.
        """
        normed_BLD = self.attn_norm(x_BLD)
        k_BHLd, v_BHLd = (a.transpose(0, 2, 1, 3) for a in self.attn.keys_values(normed_BLD))
        k_BHSd = jax.lax.dynamic_update_slice_in_dim(cache[0], k_BHLd.astype(cache[0].dtype), start, axis=2)
        v_BHSd = jax.lax.dynamic_update_slice_in_dim(cache[1], v_BHLd.astype(cache[1].dtype), start, axis=2)
        x_BLD = x_BLD + self.attn.attend_cached(normed_BLD, k_BHSd, v_BHSd, bias_BHLS, keep_B1LS)
        x_BLD = x_BLD + self.cross_attn.attend_cached(self.cross_norm(x_BLD), *cross_kv, None, cross_keep_B1LS)
        return self.mlp_residual(x_BLD), (k_BHSd, v_BHSd)

    def mlp_residual(self, x_BLD: jax.Array) -> jax.Array:
        return constrain(x_BLD + self.mlp(self.mlp_norm(x_BLD)), ACT_BLD)


class Stack(nnx.Module):
    """An encoder or decoder: its relative-position bias table, its layers (stacked) and its final norm."""

    def __init__(self, cfg: EncoderDecoderConfig, dtypes: Dtypes, rngs: nnx.Rngs, n_layers: int, decoder: bool):
        self.cfg, self.bidirectional = cfg, not decoder
        init = nnx.initializers.normal(cfg.init_std * cfg.d_model ** -0.5)
        self.relative_bias = nnx.Param(init(rngs.params(), (cfg.relative_buckets, cfg.n_heads), dtypes.param),
                                       out_sharding=("buckets", None))

        @nnx.split_rngs(splits=n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtypes, rngs, cross=decoder)

        self.layers = make_layers(rngs)
        self.final_norm = norm(cfg, dtypes)

    def position_bias(self, q_positions_BL: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
        """(B, H, L, S) float32: the learned bias of each key's bucket relative to each query."""
        cfg = self.cfg
        relative_BLS = k_positions_BS[:, None, :] - q_positions_BL[:, :, None]
        buckets_BLS = relative_buckets(relative_BLS, bidirectional=self.bidirectional, n_buckets=cfg.relative_buckets,
                                       max_distance=cfg.relative_max_distance, reach=max(relative_BLS.shape[1:]) - 1)
        bias_BLSH = jnp.take(self.relative_bias[...].astype(jnp.float32), buckets_BLS, axis=0)
        return constrain(bias_BLSH.transpose(0, 3, 1, 2), ("act_batch", "act_heads", None, None))


def _positions(tokens_BL: jax.Array, positions_BL: jax.Array | None) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape) if positions_BL is None else positions_BL


def _same_segment(q_segments_BL: jax.Array, k_segments_BS: jax.Array) -> jax.Array:
    return (q_segments_BL[:, :, None] == k_segments_BS[:, None, :])[:, None]


class T5(nnx.Module):
    def __init__(self, cfg: EncoderDecoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dtypes = Dtypes.of(cfg)
        self.compute_dtype = dtypes.compute
        self.embed = nnx.Param(nnx.initializers.normal(cfg.init_std)(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                                                    dtypes.param), out_sharding=("vocab", "embed"))
        self.encoder = Stack(cfg, dtypes, rngs, cfg.n_layers, decoder=False)
        self.decoder = Stack(cfg, dtypes, rngs, cfg.decoder_layers, decoder=True)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"),
                                                               std=cfg.init_std, dtypes=dtypes, rngs=rngs)

    def __call__(self, inputs_BL: jax.Array, input_segments_BL: jax.Array, targets_in_BT: jax.Array,
                 target_segments_BT: jax.Array, input_positions_BL: jax.Array | None = None,
                 target_positions_BT: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits (B, T, V) float32 of the targets given the inputs."""
        encoded_BLD = self.encode(inputs_BL, input_segments_BL, input_positions_BL)
        return self.decode(targets_in_BT, target_segments_BT, encoded_BLD, input_segments_BL, target_positions_BT)

    def encode(self, tokens_BL: jax.Array, segments_BL: jax.Array, positions_BL: jax.Array | None = None) -> jax.Array:
        """The encoder's output (B, L, D) float32, final norm applied."""
        positions_BL = _positions(tokens_BL, positions_BL)
        bias_BHLL = self.encoder.position_bias(positions_BL, positions_BL)
        keep_B1LL = _same_segment(segments_BL, segments_BL)

        def layer_body(layer: Block, x_BLD: jax.Array, _) -> jax.Array:
            return layer(x_BLD, bias_BHLL, keep_B1LL)

        x_BLD = run_stacked(self.encoder.layers, layer_body, self.embed_tokens(tokens_BL), scan=self.cfg.scan_layers,
                            remat_policy=self.cfg.remat)
        return self.encoder.final_norm(x_BLD)

    def decode(self, targets_in_BT: jax.Array, target_segments_BT: jax.Array, encoded_BLD: jax.Array,
               input_segments_BL: jax.Array, target_positions_BT: jax.Array | None = None) -> jax.Array:
        """Teacher-forced decoder logits (B, T, V) float32: causal within each target, across to its own input."""
        positions_BT = _positions(targets_in_BT, target_positions_BT)
        bias_BHTT = self.decoder.position_bias(positions_BT, positions_BT)
        t = targets_in_BT.shape[1]
        keep_B1TT = _same_segment(target_segments_BT, target_segments_BT) & jnp.tril(jnp.ones((t, t), bool))
        cross_keep_B1TL = _same_segment(target_segments_BT, input_segments_BL)

        def layer_body(layer: Block, x_BTD: jax.Array, _) -> jax.Array:
            return layer(x_BTD, bias_BHTT, keep_B1TT, encoded_BLD, cross_keep_B1TL)

        x_BTD = run_stacked(self.decoder.layers, layer_body, self.embed_tokens(targets_in_BT),
                            scan=self.cfg.scan_layers, remat_policy=self.cfg.remat)
        return self.logits(x_BTD)

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        x_BTD = self.decoder.final_norm(x_BTD)
        if self.lm_head is None:
            logits_BTV = matmul_by_rows(x_BTD * self.cfg.d_model ** -0.5, self.embed[...], self.compute_dtype)
        else:
            logits_BTV = self.lm_head(x_BTD)
        return constrain(logits_BTV, ("act_batch", "act_length", "act_vocab"))

    def embed_tokens(self, tokens_BL: jax.Array) -> jax.Array:
        # From the whole table: a lookup into a sharded one makes the partitioner replicate it anyway.
        table_VD = constrain(self.embed[...], (None, None))
        return constrain(jnp.take(table_VD, tokens_BL, axis=0).astype(jnp.float32), ACT_BLD)

    # ------------------------------------------------------------------------- KV-cache decoding

    def init_cache(self, batch: int, length: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Empty self-attention keys and values, one (B, H, T, Dh) pair per decoder layer, in the compute dtype."""
        cfg = self.cfg
        shape = (batch, cfg.n_heads, length, cfg.resolved_head_dim)
        return tuple((jnp.zeros(shape, self.compute_dtype), jnp.zeros(shape, self.compute_dtype))
                     for _ in range(cfg.decoder_layers))

    def cross_kv(self, encoded_BLD: jax.Array, layers: list[nnx.Module] | None = None
                 ) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Every decoder layer's cross-attention keys and values of the encoder output, (B, H, L, Dh) each,
        computed once per input."""
        layers = each_layer(self.decoder.layers) if layers is None else layers
        return tuple(tuple(a.transpose(0, 2, 1, 3) for a in layer.cross_attn.keys_values(encoded_BLD))
                     for layer in layers)

    def decode_step(self, tokens_BT: jax.Array, start: jax.Array | int, cache: tuple, cross: tuple,
                    input_segments_BL: jax.Array, layers: list[nnx.Module] | None = None):
        """Logits (B, T, V) of T new target tokens at positions [start, start + T), and the updated cache.

        Every row holds one target, from position 0, for the input whose real tokens have
        a nonzero segment id; `cross` is `cross_kv` of that input's encoding. The decoder layers
        run unrolled, as the LM's do when decoding; a token loop passes `layers`
        (`each_layer(model.decoder.layers)`, sliced once before the loop).
        """
        b, t = tokens_BT.shape
        slots = cache[0][0].shape[2]
        positions_BT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        slots_BS = jnp.broadcast_to(jnp.arange(slots), (b, slots))
        bias_BHTS = self.decoder.position_bias(positions_BT, slots_BS)
        keep_B1TS = (slots_BS[:, None, :] <= positions_BT[:, :, None])[:, None]
        cross_keep_B11L = (input_segments_BL != 0)[:, None, None, :]
        layers = each_layer(self.decoder.layers) if layers is None else layers
        x_BTD, new_cache = self.embed_tokens(tokens_BT), []
        for layer, layer_cache, layer_cross in zip(layers, cache, cross, strict=True):
            x_BTD, layer_cache = layer.decode(x_BTD, bias_BHTS, keep_B1TS, layer_cache, start, layer_cross,
                                              cross_keep_B11L)
            new_cache.append(layer_cache)
        return self.logits(x_BTD), tuple(new_cache)


# ----------------------------------------------------------------------------- sizes


def param_count(cfg: EncoderDecoderConfig) -> int:
    """Closed-form parameter count, used by tests and reports."""
    d, f, inner = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.resolved_head_dim
    attn, mlp = 4 * d * inner, 3 * d * f
    encoder = cfg.n_layers * (attn + mlp + 2 * d)
    decoder = cfg.decoder_layers * (2 * attn + mlp + 3 * d)
    tables = 2 * cfg.relative_buckets * cfg.n_heads
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return cfg.vocab_size * d + encoder + decoder + tables + 2 * d + head


def flops_per_token(cfg: EncoderDecoderConfig, input_len: int, target_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a row pair, input and target tokens both counted.

    The convention of `transformer.flops_per_token`: 6 x the matmul parameters each
    token goes through (encoder layers for input tokens; the cross-attention's key and
    value projections also for input tokens; the rest of the decoder and the output
    projection for target tokens; not the embedding gather), plus 12 x heads x head_dim
    x keys per query and layer for attention scores and weighted sums over the full
    square (encoder L x L, decoder T x T, cross T x L). Divided by input_len + target_len,
    the tokens a row pair holds.
    """
    d, f, inner = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.resolved_head_dim
    n_enc, n_dec, l, t = cfg.n_layers, cfg.decoder_layers, input_len, target_len
    per_input_token = n_enc * (4 * d * inner + 3 * d * f) + n_dec * 2 * d * inner
    per_target_token = n_dec * (6 * d * inner + 3 * d * f) + d * cfg.vocab_size
    matmul = 6.0 * (l * per_input_token + t * per_target_token)
    attention = 12.0 * inner * (n_enc * l * l + n_dec * t * t + n_dec * t * l)
    return (matmul + attention) / (l + t)
