"""Diffusion Transformer (Peebles & Xie 2023) in Flax NNX.

Images are cut into patches, embedded, given fixed 2-D sin-cos positions and
run through transformer blocks whose LayerNorms are modulated by the sum of a
timestep embedding and a class embedding (adaLN-Zero). The modulation and the
final projection start at zero, so every block starts as the identity and the
untrained model predicts exactly zero. Label `num_classes` is the null class
that classifier-free guidance conditions on for the unconditional prediction.

A text-to-image DiT (`conditioning.by: text`) takes a caption instead of a label
(models/text_conditioning.py): its pooled embedding replaces the class
embedding in the adaLN conditioning, and every block attends to its per-token
embeddings with a cross-attention between self-attention and the MLP
(PixArt-alpha), unmodulated, its output projection starting at zero.

Shape letters: B batch, H W image height and width, C channels, N patches, L caption tokens,
P patch pixels (patch_size^2 x channels), D d_model, F d_ff, A attention heads,
Dh head width, E timestep frequency features. Logical parameter axes: embed,
q_heads, mlp, layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.config import DiTConfig
from jaxgen.config_conditioning import ConditioningConfig
from jaxgen.models.cpu_kernels import resolve_batch_slices
from jaxgen.models.layers import Dtypes, Linear, dot_product_attention, merge_batch, run_stacked, split_batch
from jaxgen.models.text_conditioning import TextConditioner
from jaxgen.sharding import constrain


def patchify(x_BHWC: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, p*p*C), patches in row-major order."""
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x_BNP: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """Inverse of `patchify`."""
    b, _, pp_c = x_BNP.shape
    c = pp_c // (p * p)
    x = x_BNP.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
    """(n,) -> (n, dim): sines then cosines at geometrically spaced frequencies."""
    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = positions.astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """(grid*grid, dim) fixed position embedding: half the width for rows, half for columns."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([sincos_1d(rows.ravel(), dim // 2), sincos_1d(cols.ravel(), dim // 2)], axis=1).astype(np.float32)


def timestep_features(t_B: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """(B,) times on a 0..1000 scale -> (B, dim) cosines then sines."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles_BE = t_B.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles_BE), jnp.sin(angles_BE)], axis=-1)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without its own scale and shift: adaLN supplies both."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def modulate(x_BND: jax.Array, shift_BD: jax.Array, scale_BD: jax.Array) -> jax.Array:
    return x_BND * (1 + scale_BD[:, None, :]) + shift_BD[:, None, :]


class Bias(nnx.Module):
    def __init__(self, dim: int, axis: str | None, param_dtype):
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.bias[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm attention and MLP, each modulated by the condition and gated by it (gates start at zero)."""

    def __init__(self, cfg: DiTConfig, dtypes: Dtypes, rngs: nnx.Rngs, cross_attention: bool = False):
        self.cfg, self.compute_dtype = cfg, dtypes.compute
        d, f, std, pd = cfg.d_model, cfg.resolved_d_ff, cfg.init_std, dtypes.param
        if cross_attention:
            self.cross_q = Linear(d, d, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs)
            self.cross_kv = Linear(d, 2 * d, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs)
            self.cross_o = Linear(d, d, ("q_heads", "embed"), std=0.0, dtypes=dtypes, rngs=rngs)
        else:
            self.cross_q = self.cross_kv = self.cross_o = None
        self.modulation = Linear(d, 6 * d, ("embed", "mlp"), std=0.0, dtypes=dtypes, rngs=rngs)
        self.modulation_bias = Bias(6 * d, "mlp", pd)
        self.wqkv = Linear(d, 3 * d, ("embed", "q_heads"), std=std, dtypes=dtypes, rngs=rngs)
        self.wo = Linear(d, d, ("q_heads", "embed"), std=std, dtypes=dtypes, rngs=rngs)
        self.w_in = Linear(d, f, ("embed", "mlp"), std=std, dtypes=dtypes, rngs=rngs)
        self.b_in = Bias(f, "mlp", pd)
        self.w_out = Linear(f, d, ("mlp", "embed"), std=std, dtypes=dtypes, rngs=rngs)

    def attention(self, x_BND: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, n, d = x_BND.shape
        a = cfg.n_heads
        qkv = self.wqkv(x_BND).reshape(b, n, 3, a, d // a)
        q_BNAd, k_BNAd, v_BNAd = (
            constrain(qkv[:, :, i], ("act_batch", "act_length", "act_heads", None)).astype(self.compute_dtype)
            for i in range(3)
        )
        # On CPU, two independent batch slices: XLA:CPU runs a batched attention product on about
        # one core's worth, so a second slice's products keep the other core busy (docs/performance.md).
        slices = resolve_batch_slices("auto", b, auto=(2, 1))
        out_BNAd = merge_batch(tuple(
            dot_product_attention(q, k, v, is_causal=False, implementation=cfg.attention)
            for q, k, v in zip(split_batch(q_BNAd, slices), split_batch(k_BNAd, slices), split_batch(v_BNAd, slices))
        ))
        return self.wo(out_BNAd.reshape(b, n, d))

    def cross_attention(self, x_BND: jax.Array, context_BLD: jax.Array, mask_BL: jax.Array) -> jax.Array:
        b, n, d = x_BND.shape
        a, length = self.cfg.n_heads, context_BLD.shape[1]
        q_BNAd = self.cross_q(x_BND).reshape(b, n, a, d // a).astype(self.compute_dtype)
        k_BLAd, v_BLAd = (kv.reshape(b, length, a, d // a).astype(self.compute_dtype)
                          for kv in jnp.split(self.cross_kv(context_BLD), 2, axis=-1))
        out_BNAd = jax.nn.dot_product_attention(q_BNAd, k_BLAd, v_BLAd, mask=mask_BL[:, None, None, :])
        return self.cross_o(out_BNAd.reshape(b, n, d))

    def mlp(self, x_BND: jax.Array) -> jax.Array:
        h_BNF = jax.nn.gelu(self.b_in(self.w_in(x_BND)), approximate=True)
        h_BNF = constrain(h_BNF, ("act_batch", "act_length", "act_mlp"))
        return self.w_out(h_BNF)

    def __call__(self, x_BND: jax.Array, c_BD: jax.Array, context: tuple[jax.Array, jax.Array] | None = None
                 ) -> jax.Array:
        eps = self.cfg.norm_eps
        mod_B6D = self.modulation_bias(self.modulation(jax.nn.silu(c_BD)))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod_B6D, 6, axis=-1)
        x_BND = x_BND + gate_a[:, None, :] * self.attention(modulate(layer_norm(x_BND, eps), shift_a, scale_a))
        if context is not None:
            x_BND = x_BND + self.cross_attention(layer_norm(x_BND, eps), *context)
        x_BND = x_BND + gate_m[:, None, :] * self.mlp(modulate(layer_norm(x_BND, eps), shift_m, scale_m))
        return constrain(x_BND, ("act_batch", "act_length", "act_embed"))


class DiT(nnx.Module):
    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs, text: ConditioningConfig | None = None,
                 text_width: int | None = None):
        """`text`: a text-to-image DiT conditioned on captions embedded by a frozen encoder of width `text_width`
        (None: by the small encoder trained with it); None: class-conditional."""
        self.cfg = cfg
        dtypes = Dtypes.of(cfg)
        d, e, p = cfg.d_model, cfg.freq_dim, cfg.patch_size
        pd, std = dtypes.param, cfg.init_std
        patch_pixels = p * p * cfg.channels
        # Patch embedding: the DiT paper's strided convolution is this matmul on flattened patches.
        self.patch_embed = Linear(patch_pixels, d, (None, "embed"), std=(1 / patch_pixels) ** 0.5, dtypes=dtypes,
                                  rngs=rngs)
        self.patch_bias = Bias(d, "embed", pd)
        self.t_in = Linear(e, d, (None, "embed"), std=std, dtypes=dtypes, rngs=rngs)
        self.t_in_bias = Bias(d, "embed", pd)
        self.t_out = Linear(d, d, ("embed", "embed"), std=std, dtypes=dtypes, rngs=rngs)
        self.t_out_bias = Bias(d, "embed", pd)
        init = nnx.initializers.normal(std)
        if text is None:
            # One extra row: the null class. Rows stay whole: class counts (11, 1001) rarely divide a mesh axis.
            self.class_embed = nnx.Param(init(rngs.params(), (cfg.num_classes + 1, d), pd),
                                         out_sharding=(None, "embed"))
            self.text = None
        else:
            self.class_embed = None
            self.text = TextConditioner(text, text_width, d, std, dtypes, rngs)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, dtypes, rngs, cross_attention=text is not None)

        self.layers = make_layers(rngs)
        self.final_modulation = Linear(d, 2 * d, ("embed", "mlp"), std=0.0, dtypes=dtypes, rngs=rngs)
        self.final_modulation_bias = Bias(2 * d, "mlp", pd)
        self.final = Linear(d, p * p * cfg.out_channels, ("embed", None), std=0.0, dtypes=dtypes, rngs=rngs)
        self.final_bias = Bias(p * p * cfg.out_channels, None, pd)

    def __call__(self, x_BHWC: jax.Array, t_B: jax.Array, condition: jax.Array | dict) -> jax.Array:
        """Prediction (B, H, W, out_channels) in float32; `t_B` on a 0..1000 scale. `condition`: labels (B,) in
        0..num_classes, or for a text-to-image DiT a caption (models/text_conditioning.py)."""
        cfg = self.cfg
        p = cfg.patch_size
        _, h, w, _ = x_BHWC.shape
        x_BND = self.patch_bias(self.patch_embed(patchify(x_BHWC.astype(jnp.float32), p)))
        x_BND = x_BND + jnp.asarray(sincos_2d(h // p, cfg.d_model))[None]
        x_BND = constrain(x_BND, ("act_batch", "act_length", "act_embed"))

        t_BD = self.t_in_bias(self.t_in(timestep_features(t_B, cfg.freq_dim)))
        t_BD = self.t_out_bias(self.t_out(jax.nn.silu(t_BD)))
        if self.text is None:
            # Gather from the whole (small) table, as the LM does for its embedding.
            y_BD = jnp.take(constrain(self.class_embed[...], (None, None)), condition, axis=0).astype(jnp.float32)
            context = None
        else:
            context_BLD, mask_BL, y_BD = self.text(condition)
            context = (constrain(context_BLD, ("act_batch", None, "act_embed")), mask_BL)
        c_BD = t_BD + y_BD

        x_BND = run_stacked(self.layers, lambda layer, x, _: layer(x, c_BD, context), x_BND,
                            scan=cfg.scan_layers, remat_policy=cfg.remat)
        mod = self.final_modulation_bias(self.final_modulation(jax.nn.silu(c_BD)))
        shift_BD, scale_BD = jnp.split(mod, 2, axis=-1)
        x_BND = modulate(layer_norm(x_BND, cfg.norm_eps), shift_BD, scale_BD)
        out_BNP = self.final_bias(self.final(x_BND))
        return unpatchify(out_BNP, p, h, w)


def flops_per_image(cfg: DiTConfig, caption_tokens: int = 0, text_width: int = 0) -> float:
    """Training FLOPs per image (forward + backward): 6 x matmul parameters x the tokens they see,
    plus the attention scores and weighted sum over the full N x N square. A text-to-image DiT adds
    its cross-attention over `caption_tokens` tokens and their projection from `text_width` (the caption
    encoder's own FLOPs are not counted)."""
    d, f, p = cfg.d_model, cfg.resolved_d_ff, cfg.patch_size
    n, length = (cfg.image_size // p) ** 2, caption_tokens
    per_token = p * p * cfg.channels * d + cfg.n_layers * (4 * d * d + 2 * d * f) + d * p * p * cfg.out_channels
    per_image = cfg.freq_dim * d + d * d + cfg.n_layers * 6 * d * d + 2 * d * d  # conditioning paths
    if length:
        per_token += cfg.n_layers * 2 * d * d  # cross-attention query and output
        per_image += length * (text_width * d + cfg.n_layers * 2 * d * d) + text_width * d  # keys, values, pooled
    return 6.0 * (n * per_token + per_image) + 12.0 * cfg.n_layers * d * n * (n + length)
