"""The Hugging Face layouts of jaxgen's transformer: Llama, Mistral, Qwen2, Qwen3 and Gemma 2.

Tensor names, shapes and config.json keys; one table serves export and import, so
the two always agree. Every family is Llama's layout with a few differences, kept
as data in `FAMILIES`: the switches it always has, the config.json keys that set
its other switches, what transformers assumes for keys a config.json leaves out,
and the tensors it names differently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxgen.config import Config, TransformerConfig
from jaxgen.errors import ExportError
from jaxgen.sharding import param_path

# Hugging Face (Llama) name, jaxgen param path, one tensor per layer?, stored transposed?
# jaxgen keeps kernels as (in, out) for x @ W; torch Linear weights are (out, in). A row
# whose parameter the model lacks (a bias, a q/k norm, a post-norm, a tied lm_head) is skipped.
TENSORS = [
    ("model.embed_tokens.weight", "embed", False, False),
    ("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", True, False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/attn/wq/kernel", True, True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/attn/wq/bias", True, False),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/attn/wk/kernel", True, True),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/attn/wk/bias", True, False),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/attn/wv/kernel", True, True),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/attn/wv/bias", True, False),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/attn/q_norm/scale", True, False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/attn/k_norm/scale", True, False),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/attn/wo/kernel", True, True),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", True, False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/w_gate/kernel", True, True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/w_up/kernel", True, True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/w_down/kernel", True, True),
    ("model.norm.weight", "final_norm/scale", False, False),
    ("lm_head.weight", "lm_head/kernel", False, True),
    # Norms after each sub-layer (Gemma 2, whose pre-MLP norm is renamed below to free this name).
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/post_attn_norm/scale", True, False),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers/post_mlp_norm/scale", True, False),
]

# config.json key -> TransformerConfig field, in every family.
COMMON_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "d_ff", "max_position_embeddings": "max_seq_len", "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings", "initializer_range": "init_std",
}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# transformers' defaults for keys a config.json may leave out, where a family does not say otherwise.
COMMON_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
                   "tie_word_embeddings": False, "initializer_range": 0.02}
# Keys about the checkpoint, its training or its runtime, not about the function the model computes.
DESCRIPTIVE_KEYS = ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
                    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "pretraining_tp",
                    "_name_or_path", "cache_implementation")
# The switches families differ in; a family neither fixes nor sets one keeps it at its default.
SWITCHES = ("rope_scaling", "sliding_window", "sliding_window_layers", "qkv_bias", "qk_norm", "norm_unit_offset",
            "scale_embeddings", "mlp_activation", "post_norms", "attn_logit_softcap", "final_logit_softcap",
            "query_pre_attn_scalar")
# Rope types jaxgen computes, and the keys of each in `rope_parameters` (or the older `rope_scaling`).
ROPE_KEYS = {"default": ("rope_type", "type", "rope_theta"),
             "llama3": ("rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}
SILU = {"hidden_act": ("silu",)}


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str  # config.json "architectures"
    fixed: dict[str, Any]  # TransformerConfig switches the family always has, at these values
    keys: dict[str, str]  # its own config.json keys -> TransformerConfig fields
    # Its config.json keys about sliding windows: some of sliding_window, use_sliding_window (Qwen: the window
    # is off without it), max_window_layers and layer_types.
    window_keys: tuple[str, ...]
    # Whether layer i slides, from config.json (defaults included) when it lists no layer_types.
    slides: Callable[[dict, int], bool]
    defaults: dict[str, Any]  # transformers' defaults for the family's keys, beyond COMMON_DEFAULTS
    constants: dict[str, tuple]  # keys that must hold one of these values when present (what jaxgen computes)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # param path -> its tensor, where not Llama's
    # Its keys whose null switches a feature off in transformers (no soft-capping), not "the default".
    null_means_off: tuple[str, ...] = ()


QWEN_WINDOWS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")
QWEN_DEFAULTS = {"max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
                 "max_window_layers": 28}


def _qwen_slides(hf: dict, i: int) -> bool:
    return i >= hf["max_window_layers"]


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", {}, {}, (), lambda hf, i: False, {},
                    {**SILU, "attention_bias": (False,), "mlp_bias": (False,)}),
    "mistral": Family("MistralForCausalLM", {}, {}, ("sliding_window",), lambda hf, i: True,
                      {"max_position_embeddings": 131072, "sliding_window": 4096}, SILU),
    "qwen2": Family("Qwen2ForCausalLM", {"qkv_bias": True}, {}, QWEN_WINDOWS, _qwen_slides, QWEN_DEFAULTS, SILU),
    "qwen3": Family("Qwen3ForCausalLM", {"qk_norm": True}, {}, QWEN_WINDOWS, _qwen_slides,
                    {**QWEN_DEFAULTS, "head_dim": 128}, {**SILU, "attention_bias": (False,)}),
    "gemma2": Family(
        "Gemma2ForCausalLM",
        {"norm_unit_offset": True, "scale_embeddings": True, "mlp_activation": "gelu_tanh", "post_norms": True},
        {"query_pre_attn_scalar": "query_pre_attn_scalar", "attn_logit_softcapping": "attn_logit_softcap",
         "final_logit_softcapping": "final_logit_softcap"},
        ("sliding_window", "layer_types"), lambda hf, i: i % 2 == 0,
        {"max_position_embeddings": 8192, "head_dim": 256, "tie_word_embeddings": True, "sliding_window": 4096,
         "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
        {"hidden_activation": ("gelu_pytorch_tanh",), "hidden_act": ("gelu_pytorch_tanh",),
         "attention_bias": (False,), "use_bidirectional_attention": (None, False)},
        renamed={"layers/mlp_norm/scale": "model.layers.{i}.pre_feedforward_layernorm.weight"},
        null_means_off=("attn_logit_softcapping", "final_logit_softcapping"),
    ),
}
ARCHITECTURES = ", ".join(f.architecture for f in FAMILIES.values())
# Everything `jaxgen import` reads, for the message refusing the rest: the families above, BERT (hf_bert), T5
# (hf_t5) and diffusers' AutoencoderKL (diffusers_vae), which build on this module and cannot be imported here.
IMPORTABLE = f"{ARCHITECTURES}, BertForMaskedLM, T5ForConditionalGeneration and diffusers' AutoencoderKL"


class HFTensor(NamedTuple):
    hf_name: str
    path: str  # of the jaxgen parameter
    layer: int | None  # index into the parameter's stacked layer axis
    transpose: bool
    hf_shape: tuple[int, ...]


def flat_params(params: dict) -> dict[str, jax.Array]:
    """Leaves by path (`layers/attn/wq/kernel`); works on arrays, abstract arrays and shardings alike."""
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


def hf_plan(cfg: TransformerConfig, flat: dict) -> list[HFTensor]:
    """Every Hugging Face tensor of the model whose parameters (or abstract ones) are `flat`."""
    renamed = FAMILIES[cfg.family].renamed
    plan = []
    for hf_name, path, per_layer, transpose in TENSORS:
        if path not in flat:
            continue
        shape = tuple(flat[path].shape[1:] if per_layer else flat[path].shape)
        hf_shape = shape[::-1] if transpose else shape
        layers = range(cfg.n_layers) if per_layer else [None]
        plan += [HFTensor(renamed.get(path, hf_name).format(i=i), path, i, transpose, hf_shape) for i in layers]
    return plan


def settable(family: Family) -> set[str]:
    """The switches a family's config.json can set (beyond those it fixes)."""
    windows = {"sliding_window"} if "sliding_window" in family.window_keys else set()
    windows |= {"sliding_window_layers"} if "layer_types" in family.window_keys else set()
    return {"rope_scaling", *family.keys.values(), *windows}


def refuse_unrepresentable(model: TransformerConfig) -> None:
    """Refuse, naming the switch, a model that its family's config.json cannot describe."""
    family = FAMILIES[model.family]
    for switch in SWITCHES:
        value = getattr(model, switch)
        if switch in family.fixed:
            wanted = family.fixed[switch]
        elif switch in settable(family):
            continue
        else:
            wanted = TransformerConfig.model_fields[switch].default
        if value != wanted:
            having = [name for name, f in FAMILIES.items()
                      if f.fixed.get(switch, value if switch in settable(f) else None) == value]
            raise ExportError(f"model.{switch}={_shown(value)} cannot be written as a Hugging Face {model.family} "
                              f"model (model.family), which has {switch}={_shown(wanted)}; "
                              f"families that have it: {', '.join(having) or 'none'}")


def _shown(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def hf_config(cfg: Config) -> dict:
    """config.json of the model's family, but the tokenizer's special ids; refuses models that family cannot express."""
    model = cfg.model
    if model.kind != "transformer":
        raise ExportError(f"model.kind={model.kind!r} has no Hugging Face Llama equivalent (nor a Mistral, Qwen or "
                          "Gemma one); use --format safetensors")
    refuse_unrepresentable(model)
    family = FAMILIES[model.family]
    values = {**model.model_dump(), "head_dim": model.resolved_head_dim,
              "query_pre_attn_scalar": model.query_pre_attn_scalar or model.resolved_head_dim}
    return {
        "architectures": [family.architecture],
        "model_type": model.family,
        **{key: values[field] for key, field in {**COMMON_KEYS, **family.keys}.items()},
        **{key: accepted[0] for key, accepted in family.constants.items()},
        **_window_keys(model, family),
        **_rope_keys(model),
    }


def _window_keys(model: TransformerConfig, family: Family) -> dict:
    sliding = _sliding_layers(model)
    written = {"sliding_window": model.sliding_window, "use_sliding_window": model.sliding_window is not None,
               "max_window_layers": min(sliding, default=model.n_layers),
               "layer_types": ["sliding_attention" if i in sliding else "full_attention" for i in range(model.n_layers)]}
    return {key: written[key] for key in family.window_keys}


def _sliding_layers(model: TransformerConfig) -> list[int]:
    if model.sliding_window is None:
        return []
    return list(range(model.n_layers) if model.sliding_window_layers is None else model.sliding_window_layers)


def _rope_keys(model: TransformerConfig) -> dict:
    if model.rope_scaling is None:
        return {}
    # The form Llama 3.1 is published in; transformers 5 reads it into rope_parameters.
    s = model.rope_scaling
    return {"rope_scaling": {"rope_type": s.type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_seq_len}}
