"""The `model:` sections of the bidirectional families, and their objectives' sections.

`model.kind: encoder` is a BERT-style encoder trained as a masked LM (`mlm:`);
`model.kind: encoder_decoder` is a T5 v1.1-style encoder-decoder trained on span
corruption (`span:`) or on supervised (input, target) pairs (`data.input_field`,
`data.target_field`).
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from jaxgen.config_section import Section as _Section

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"]


class EncoderConfig(_Section):
    """A bidirectional transformer encoder with a masked-LM head.

    The defaults are BERT's architecture (learned absolute positions, token-type
    embeddings, LayerNorm after each residual add, GELU MLP, biases everywhere,
    the MLM decoder tied to the word embeddings), so `jaxgen export --format hf`
    writes a `BertForMaskedLM`. `positions: rope`, `norm_placement: pre`,
    `norm: rmsnorm`, `gated_mlp: true`, `bias: false` give a modern encoder.
    """

    kind: Literal["encoder"] = "encoder"
    vocab_size: int = Field(2048, gt=0)
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    d_ff: int = Field(1024, gt=0)
    # Learned positions hold this many; rotary positions take any length up to it too.
    max_seq_len: int = Field(128, gt=0)
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = Field(10_000.0, gt=0)
    # post: a norm after each residual add (BERT); pre: before each sub-layer, plus one at the end.
    norm_placement: Literal["post", "pre"] = "post"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-12, gt=0)
    # BERT's exact-erf GELU; gelu_tanh its tanh approximation; silu for a gated (SwiGLU) MLP.
    mlp_activation: Literal["gelu", "gelu_tanh", "silu"] = "gelu"
    gated_mlp: bool = False
    bias: bool = True
    # Segment A/B embeddings (BERT's token types); 0 = none.
    type_vocab_size: int = Field(2, ge=0)
    init_std: float = Field(0.02, gt=0)
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    scan_layers: bool = True
    remat: RematPolicy = "none"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> EncoderConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary positions (model.positions)")
        return self


class EncoderDecoderConfig(_Section):
    """T5 v1.1: RMSNorm before each sub-layer, relative position buckets, gated-GELU MLP, no biases.

    The encoder attends bidirectionally, the decoder causally to itself and to all of
    the encoder's output (cross-attention). One relative-position bias table per stack
    (its first layer's, shared by the rest, as in T5). Attention logits are not scaled
    by head_dim ** -0.5 (T5 folds that into the initialisation).
    """

    kind: Literal["encoder_decoder"] = "encoder_decoder"
    vocab_size: int = Field(2048, gt=0)
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0, description="encoder layers")
    n_decoder_layers: int | None = Field(None, gt=0, description="default n_layers")
    n_heads: int = Field(4, gt=0)
    head_dim: int | None = Field(None, gt=0, description="default d_model // n_heads (T5's d_kv)")
    d_ff: int = Field(640, gt=0)
    # Relative distances fall in buckets: half for each direction in the encoder, all one way in the
    # decoder; within each, half exact, the rest log-spaced up to relative_max_distance.
    relative_buckets: int = Field(32, ge=4)
    relative_max_distance: int = Field(128, gt=1)
    norm_eps: float = Field(1e-6, gt=0)
    # The gate of the gated MLP: gelu_tanh (T5 v1.1's gated-gelu) or silu.
    mlp_activation: Literal["gelu_tanh", "silu"] = "gelu_tanh"
    # T5 v1.1 unties the output projection; tied, the decoder's output is scaled by d_model ** -0.5 (T5 v1.0).
    tie_embeddings: bool = False
    # The decoder's first input token; null = the tokenizer's BOS (an imported T5 sets its pad id, 0).
    decoder_start_id: int | None = Field(None, ge=0)
    # T5's initializer_factor: each weight's normal std is this times T5's fan-in scale.
    init_std: float = Field(1.0, gt=0)
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    scan_layers: bool = True
    remat: RematPolicy = "none"

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> EncoderDecoderConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                             "set model.head_dim explicitly")
        if self.relative_max_distance <= self.relative_buckets // 2:
            raise ValueError(f"model.relative_max_distance={self.relative_max_distance} must exceed half of "
                             f"model.relative_buckets={self.relative_buckets}: the log-spaced buckets need room")
        if self.decoder_start_id is not None and self.decoder_start_id >= self.vocab_size:
            raise ValueError(f"model.decoder_start_id={self.decoder_start_id} is not a token of the vocabulary; "
                             f"valid: 0 to model.vocab_size - 1 = {self.vocab_size - 1}, or null for the "
                             "tokenizer's BOS")
        return self


class MLMConfig(_Section):
    """BERT's masking: of every row's real tokens (never [CLS], [SEP] or padding) `mask_rate` are
    chosen and predicted; of those `replace_mask` become [MASK], `replace_random` a random
    token, the rest stay as they are."""

    mask_rate: float = Field(0.15, gt=0, lt=1)
    replace_mask: float = Field(0.8, ge=0, le=1)
    replace_random: float = Field(0.1, ge=0, le=1)

    @pydantic.model_validator(mode="after")
    def _check_split(self) -> MLMConfig:
        if self.replace_mask + self.replace_random > 1:
            raise ValueError(f"mlm.replace_mask={self.replace_mask} + mlm.replace_random={self.replace_random} "
                             "exceeds 1; the rest of the chosen tokens are kept as they are")
        return self


class SpanConfig(_Section):
    """T5's span corruption: `noise_density` of each document piece's tokens, in spans of mean
    length `mean_length`, are replaced in the input by one sentinel each (<extra_id_0>, ...);
    the target lists each sentinel followed by the span it hides."""

    noise_density: float = Field(0.15, gt=0, lt=1)
    mean_length: float = Field(3.0, ge=1)
