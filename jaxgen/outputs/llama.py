"""The Hugging Face Llama layout of jaxgen's transformer: tensor names, shapes and config.json.

One table serves export and import, so the two always agree.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from jaxgen.config import Config, TransformerConfig
from jaxgen.data.tokenizer import BOS_ID, EOS_ID
from jaxgen.errors import ExportError
from jaxgen.sharding import param_path


# Hugging Face Llama name, jaxgen param path, one tensor per layer?, stored transposed?
# jaxgen keeps kernels as (in, out) for x @ W; torch Linear weights are (out, in).
LLAMA_TENSORS = [
    ("model.embed_tokens.weight", "embed", False, False),
    ("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", True, False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/attn/wq/kernel", True, True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/attn/wk/kernel", True, True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/attn/wv/kernel", True, True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/attn/wo/kernel", True, True),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", True, False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/w_gate/kernel", True, True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/w_up/kernel", True, True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/w_down/kernel", True, True),
    ("model.norm.weight", "final_norm/scale", False, False),
    ("lm_head.weight", "lm_head/kernel", False, True),
]


class LlamaTensor(NamedTuple):
    hf_name: str
    path: str  # of the jaxgen parameter
    layer: int | None  # index into the parameter's stacked layer axis
    transpose: bool
    hf_shape: tuple[int, ...]


def flat_params(params: dict) -> dict[str, jax.Array]:
    """Leaves by path (`layers/attn/wq/kernel`); works on arrays, abstract arrays and shardings alike."""
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


def llama_plan(cfg: TransformerConfig, flat: dict) -> list[LlamaTensor]:
    """Every Hugging Face tensor of the model whose parameters (or abstract ones) are `flat`."""
    plan = []
    for hf_name, path, per_layer, transpose in LLAMA_TENSORS:
        if path not in flat:
            continue  # lm_head of a model with tied embeddings
        shape = tuple(flat[path].shape[1:] if per_layer else flat[path].shape)
        hf_shape = shape[::-1] if transpose else shape
        layers = range(cfg.n_layers) if per_layer else [None]
        plan += [LlamaTensor(hf_name.format(i=i), path, i, transpose, hf_shape) for i in layers]
    return plan


def llama_config(cfg: Config) -> dict:
    """config.json of LlamaForCausalLM; refuses models Llama cannot express."""
    model = cfg.model
    if model.kind != "transformer":
        raise ExportError(
            f"model.kind={model.kind!r} has no Hugging Face Llama equivalent; use --format safetensors"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.d_ff,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "tie_word_embeddings": model.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": model.init_std,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
