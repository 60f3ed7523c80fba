"""The text side of a text-to-image DiT: captions to per-token context and a pooled vector.

A caption arrives as either token ids for the small encoder trained with the DiT
(`{"ids", "mask", "keep"}`; data/caption_words.py) or as the per-token and pooled
embeddings of a frozen encoder run (`{"tokens", "mask", "pooled", "keep"}`).
Both are projected to the DiT's width: the tokens become the keys and values of
every block's cross-attention (PixArt-alpha), the pooled vector joins the
timestep embedding in the adaLN conditioning (as Stable Diffusion 3 does with
CLIP's pooled output). Captions whose `keep` is false are the null caption: one
learned context token and a learned pooled vector, which classifier-free
guidance uses as the unconditional input.

Shape letters: B batch, L caption tokens, T text width, D DiT width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config_conditioning import ConditioningConfig
from jaxgen.config_encoders import EncoderConfig
from jaxgen.models.layers import Dtypes, Linear


def joint_encoder_config(cond: ConditioningConfig) -> EncoderConfig:
    """The jointly trained caption encoder: a small pre-norm transformer with learned positions."""
    return EncoderConfig(vocab_size=cond.joint_vocab, d_model=cond.joint_width, n_layers=cond.joint_layers,
                         n_heads=cond.joint_heads, d_ff=4 * cond.joint_width, max_seq_len=cond.max_length,
                         norm_placement="pre", norm_eps=1e-6, mlp_activation="gelu_tanh", type_vocab_size=0)


class TextConditioner(nnx.Module):
    def __init__(self, cond: ConditioningConfig, text_width: int | None, d_model: int, init_std: float,
                 dtypes: Dtypes, rngs: nnx.Rngs):
        from jaxgen.models.encoder import Encoder

        self.encoder = Encoder(joint_encoder_config(cond), rngs, head=False) if text_width is None else None
        width = cond.joint_width if text_width is None else text_width
        self.context = Linear(width, d_model, (None, "embed"), std=width ** -0.5, dtypes=dtypes, rngs=rngs,
                              bias=True)
        self.pooled = Linear(width, d_model, (None, "embed"), std=init_std, dtypes=dtypes, rngs=rngs, bias=True)
        init = nnx.initializers.normal(init_std)
        self.null_context = nnx.Param(init(rngs.params(), (1, d_model), dtypes.param), out_sharding=(None, "embed"))
        self.null_pooled = nnx.Param(init(rngs.params(), (d_model,), dtypes.param), out_sharding=("embed",))

    def __call__(self, caption: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(context (B, L, D), context mask (B, L) bool, pooled (B, D)), float32."""
        mask_BL = caption["mask"].astype(bool)
        if "ids" in caption:
            tokens_BLT = self.encoder.hidden(caption["ids"], mask_BL.astype(jnp.int32))
            keep_BL1 = mask_BL[..., None].astype(jnp.float32)
            pooled_BT = (tokens_BLT * keep_BL1).sum(1) / jnp.maximum(keep_BL1.sum(1), 1.0)
        else:
            tokens_BLT, pooled_BT = caption["tokens"], caption["pooled"]
        context_BLD, pooled_BD = self.context(tokens_BLT), self.pooled(pooled_BT)
        keep_B = caption["keep"].astype(bool) & mask_BL.any(1)  # a caption without words is the null caption
        b, length, d = context_BLD.shape
        null_BLD = jnp.zeros_like(context_BLD).at[:, 0].set(self.null_context[...][0].astype(jnp.float32))
        null_mask_BL = jnp.zeros((b, length), bool).at[:, 0].set(True)
        context_BLD = jnp.where(keep_B[:, None, None], context_BLD, null_BLD)
        mask_BL = jnp.where(keep_B[:, None], mask_BL, null_mask_BL)
        pooled_BD = jnp.where(keep_B[:, None], pooled_BD, self.null_pooled[...].astype(jnp.float32)[None])
        return context_BLD, mask_BL, pooled_BD
