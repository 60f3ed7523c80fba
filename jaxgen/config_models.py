"""The `model:` section: one config class per model kind, chosen by `model.kind`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, Discriminator, Field, Tag

from jaxgen.config_encoders import EncoderConfig, EncoderDecoderConfig
from jaxgen.config_section import Section as _Section

DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"]
AttentionImpl = Literal["auto", "xla", "cudnn", "cpu"]


# Model settings of how the function is computed (precision, memory, kernels), not of which function: a reader,
# or a fine-tune of the parameters, may choose its own.
HOW_COMPUTED = ("compute_dtype", "param_dtype", "scan_layers", "remat", "attention", "batch_slices", "init_std")


class RopeScaling(_Section):
    """Llama 3.1's rescaled rotary frequencies for long contexts (Hugging Face rope_type "llama3")."""

    type: Literal["llama3"] = "llama3"
    # Wavelengths longer than original_max_seq_len / low_freq_factor are stretched by `factor`,
    # those shorter than original_max_seq_len / high_freq_factor kept, those between interpolated.
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_seq_len: int = Field(8192, gt=0)

    @pydantic.model_validator(mode="after")
    def _check_band(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")
        return self


HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")


class TransformerConfig(_Section):
    """Decoder-only LM: Llama by default; the switches below give Mistral, Qwen2/3 and Gemma 2."""

    kind: Literal["transformer"] = "transformer"
    vocab_size: int = Field(2048, gt=0)
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    # Fewer key/value heads than query heads gives grouped-query attention.
    n_kv_heads: int = Field(2, gt=0)
    head_dim: int | None = Field(None, gt=0, description="default d_model // n_heads")
    d_ff: int = Field(768, gt=0)
    max_seq_len: int = Field(128, gt=0)
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    param_dtype: DType = "float32"
    # Matmul inputs are cast to this dtype; they always accumulate in float32.
    compute_dtype: DType = "float32"
    # Layers are stacked on a leading axis; scan compiles one layer, unrolling compiles all.
    scan_layers: bool = True
    # Keep matmul outputs, recompute the cheap elementwise work in the backward pass: unlike
    # "none", the scan need not stack every intermediate, so less memory is held and less is
    # written and read back (docs/performance.md compares the policies).
    remat: RematPolicy = "dots_saveable"
    # "auto": jaxgen's CPU-tuned attention when compiling for CPU, XLA's elsewhere.
    # "xla" is jax.nn.dot_product_attention's portable lowering, "cudnn" its fused
    # flash-attention kernel on NVIDIA GPUs, "cpu" models/cpu_kernels.py on any platform.
    attention: AttentionImpl = "auto"
    # Packed rows hold several documents: attend only within one's own document, with
    # positions restarting at each document (from the batch's segment_ids/positions).
    document_mask: bool = False
    # Each layer runs the batch as this many independent slices (rows i, i+n, i+2n, ...,
    # so no data moves between devices). One layer's products depend on each other, which
    # leaves XLA:CPU's cores idle; the slices give them another slice's matmuls to run
    # meanwhile (docs/performance.md). On GPUs and TPUs it would only shrink the matmuls.
    # "auto": 4 when compiling for CPU (2 or 1 if the per-device batch does not divide by 4), else 1.
    batch_slices: Annotated[int, Field(gt=0)] | Literal["auto"] = "auto"
    # Llama 3.1's rope scaling; null = the plain rotary frequencies of rope_theta.
    rope_scaling: RopeScaling | None = None
    # Sliding-window attention (Mistral, Gemma 2): a query sees itself and the sliding_window - 1
    # tokens before it. null = every query sees the whole prefix.
    sliding_window: int | None = Field(None, gt=0)
    # The layers (0-based) that use the window, the others attending globally; null = all of
    # them (Mistral). Gemma 2 windows the even layers.
    sliding_window_layers: tuple[int, ...] | None = None
    # Biases on the query, key and value projections (Qwen2).
    qkv_bias: bool = False
    # An RMSNorm over each query and key head, before rotary positions (Qwen3).
    qk_norm: bool = False
    # Every RMSNorm multiplies by (1 + scale), its scale starting at 0 (Gemma).
    norm_unit_offset: bool = False
    # Token embeddings multiplied by sqrt(d_model) (Gemma).
    scale_embeddings: bool = False
    # The MLP's gate: silu (SwiGLU) or tanh-approximated GELU (GeGLU, Gemma).
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"
    # An RMSNorm on the output of attention and of the MLP too, before each residual add (Gemma 2).
    post_norms: bool = False
    # Attention scores, and the final logits, squashed into (-c, c) by c * tanh(x / c) (Gemma 2); null = off.
    attn_logit_softcap: float | None = Field(None, gt=0)
    final_logit_softcap: float | None = Field(None, gt=0)
    # Attention scores scaled by query_pre_attn_scalar ** -0.5 rather than head_dim ** -0.5 (Gemma 2).
    query_pre_attn_scalar: int | None = Field(None, gt=0)
    # The Hugging Face family `jaxgen export --format hf` writes (config.json's model_type); the
    # switches above must be ones it has. `jaxgen import` sets it from the checkpoint.
    family: Literal[HF_FAMILIES] = "llama"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> TransformerConfig:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dimension {self.resolved_head_dim} must be even for rotary embeddings")
        return self

    @pydantic.model_validator(mode="after")
    def _check_switches(self) -> TransformerConfig:
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ValueError("model.sliding_window_layers needs model.sliding_window (the window's length)")
            if sorted(set(self.sliding_window_layers)) != list(self.sliding_window_layers) or not all(
                    0 <= i < self.n_layers for i in self.sliding_window_layers):
                raise ValueError(f"model.sliding_window_layers={list(self.sliding_window_layers)} must list distinct "
                                 f"layers in increasing order, each in 0..{self.n_layers - 1}")
        if self.attention == "cudnn" and self.attn_logit_softcap is not None:
            raise ValueError("model.attention=cudnn cannot soft-cap attention scores (model.attn_logit_softcap); "
                             "use model.attention=xla")
        return self


# Named DiT sizes (Peebles & Xie 2023) plus a CPU-sized one: width, depth, heads.
DIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4},
    "S": {"d_model": 384, "n_layers": 12, "n_heads": 6},
    "B": {"d_model": 768, "n_layers": 12, "n_heads": 12},
    "L": {"d_model": 1024, "n_layers": 24, "n_heads": 16},
    "XL": {"d_model": 1152, "n_layers": 28, "n_heads": 16},
}


class DiTConfig(_Section):
    """Diffusion transformer over image patches, conditioned on time and class."""

    kind: Literal["dit"] = "dit"
    # "DiT-XL/2" style names fill d_model, n_layers, n_heads and patch_size; keys given explicitly win.
    size: str | None = None
    image_size: int = Field(8, gt=0)
    channels: int = Field(1, gt=0)
    patch_size: int = Field(2, gt=0)
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    d_ff: int | None = Field(None, gt=0, description="default 4 * d_model")
    # Class labels 0..num_classes-1; label num_classes is the null class of classifier-free guidance.
    num_classes: int = Field(10, gt=0)
    # Width of the sinusoidal timestep features fed to the timestep MLP.
    freq_dim: int = Field(256, gt=0)
    # Also predict the per-pixel variance interpolation of Improved DDPM (doubles the output channels).
    learn_sigma: bool = False
    norm_eps: float = Field(1e-6, gt=0)
    init_std: float = Field(0.02, gt=0)
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    scan_layers: bool = True
    # As the LM's: saving only the matmul outputs for the backward pass and recomputing the
    # elementwise work (adaLN modulation, norms, GELU) is faster on CPU than storing every
    # intermediate of the scanned blocks, and needs about half the temporary memory.
    remat: RematPolicy = "dots_saveable"
    attention: AttentionImpl = "auto"

    @pydantic.model_validator(mode="before")
    @classmethod
    def _fill_from_size(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("size") is None:
            return data
        name = data["size"]
        valid = ["tiny"] + [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
        if name not in valid:
            raise ValueError(f"model.size={name!r} is not a known DiT size; valid: {', '.join(valid)}")
        family, _, patch = name.removeprefix("DiT-").partition("/")
        preset = {**DIT_SIZES[family], **({"patch_size": int(patch)} if patch else {})}
        return {**preset, **data}

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def out_channels(self) -> int:
        return 2 * self.channels if self.learn_sigma else self.channels

    @pydantic.model_validator(mode="after")
    def _check_shapes(self) -> DiTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by model.patch_size={self.patch_size}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.d_model % 4:
            raise ValueError(f"model.d_model={self.d_model} must be a multiple of 4 for 2-D sin-cos positions")
        return self


def _check_channels(name: str, channels: tuple[int, ...], groups: int | None = None) -> None:
    if not channels:
        raise ValueError(f"model.{name} is empty; give one channel count per level, e.g. [32, 64]")
    if groups is not None and (bad := [c for c in channels if c % groups]):
        raise ValueError(f"model.{name}={list(channels)}: {bad[0]} is not divisible by model.norm_groups={groups}")


class AutoencoderConfig(_Section):
    """The KL-regularised convolutional autoencoder of latent diffusion, laid out as diffusers' AutoencoderKL.

    Encoder: a 3x3 convolution, then per level `layers_per_block` ResNet blocks (GroupNorm, SiLU,
    3x3 convolutions) and a stride-2 downsampling on every level but the last, a mid block
    (ResNet, self-attention, ResNet) and heads for the latents' mean and log-variance. The
    decoder mirrors it with `layers_per_block + 1` blocks per level and nearest-neighbour
    upsampling. Images shrink by 2 ** (len(block_channels) - 1) on each side.
    """

    kind: Literal["autoencoder"] = "autoencoder"
    image_size: int = Field(28, gt=0)
    channels: int = Field(1, gt=0)
    # Output channels of each level's ResNet blocks (diffusers block_out_channels).
    block_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(1, gt=0)
    latent_channels: int = Field(4, gt=0)
    # GroupNorm groups (diffusers norm_num_groups); every entry of block_channels must divide by it.
    norm_groups: int = Field(16, gt=0)
    # Self-attention in the mid blocks (diffusers mid_block_add_attention).
    mid_attention: bool = True
    # 1x1 convolutions on the moments after the encoder and on the latents before the decoder
    # (diffusers use_quant_conv / use_post_quant_conv; FLUX-style VAEs have neither).
    quant_conv: bool = True
    # A diffusion model sees (latent - shift_factor) * scaling_factor (diffusers' names); export writes
    # both, latent diffusion measures the scale from the data.
    scaling_factor: float = Field(1.0, gt=0)
    shift_factor: float | None = None
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample_factor

    @pydantic.model_validator(mode="after")
    def _check_shapes(self) -> AutoencoderConfig:
        _check_channels("block_channels", self.block_channels, self.norm_groups)
        if self.image_size % self.downsample_factor:
            raise ValueError(f"model.image_size={self.image_size} is not divisible by {self.downsample_factor}, "
                             f"the downsampling of {len(self.block_channels)} levels (model.block_channels)")
        return self


class GANConfig(_Section):
    """A class-conditional convolutional GAN: a generator from noise and a discriminator.

    The generator projects noise (and the class's embedding) to a square of
    image_size / 2 ** (len(generator_channels) - 1) pixels with generator_channels[0] channels,
    then doubles the side per further entry. The discriminator halves the side per entry of
    discriminator_channels and scores images with a class projection (Miyato & Koyama 2018).
    """

    kind: Literal["gan"] = "gan"
    image_size: int = Field(28, gt=0)
    channels: int = Field(1, gt=0)
    num_classes: int = Field(10, gt=0)
    noise_dim: int = Field(64, gt=0)
    generator_channels: tuple[int, ...] = (128, 64, 32)
    discriminator_channels: tuple[int, ...] = (32, 64, 128)
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"

    @property
    def base_size(self) -> int:
        return self.image_size // 2 ** (len(self.generator_channels) - 1)

    @pydantic.model_validator(mode="after")
    def _check_shapes(self) -> GANConfig:
        _check_channels("generator_channels", self.generator_channels)
        _check_channels("discriminator_channels", self.discriminator_channels)
        up = 2 ** (len(self.generator_channels) - 1)
        if self.image_size % up:
            raise ValueError(f"model.image_size={self.image_size} is not divisible by {up}, the upsampling of "
                             f"{len(self.generator_channels)} levels (model.generator_channels)")
        return self


def _model_kind(value: Any) -> str:
    """Configs that name no `kind` are language models, as they were before DiT existed."""
    return value.get("kind", "transformer") if isinstance(value, dict) else getattr(value, "kind", "transformer")


ModelConfig = Annotated[
    Annotated[TransformerConfig, Tag("transformer")] | Annotated[DiTConfig, Tag("dit")]
    | Annotated[AutoencoderConfig, Tag("autoencoder")] | Annotated[GANConfig, Tag("gan")]
    | Annotated[EncoderConfig, Tag("encoder")] | Annotated[EncoderDecoderConfig, Tag("encoder_decoder")],
    Discriminator(_model_kind),
]
MODEL_CONFIGS: dict[str, type[BaseModel]] = {"transformer": TransformerConfig, "dit": DiTConfig,
                                             "autoencoder": AutoencoderConfig, "gan": GANConfig,
                                             "encoder": EncoderConfig, "encoder_decoder": EncoderDecoderConfig}
# The model kinds that read images (images: section) rather than text.
IMAGE_MODEL_KINDS = ("dit", "autoencoder", "gan")
# The model kinds that read text through a tokenizer.
TEXT_MODEL_KINDS = ("transformer", "encoder", "encoder_decoder")
