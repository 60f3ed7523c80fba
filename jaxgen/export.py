"""Weights out: raw safetensors for any model, Hugging Face Llama format for LMs.

Tensors move one at a time (device -> host -> file), so the host never holds
the whole model twice. The output directory is built under a hidden name and
renamed into place when complete, so a killed export leaves nothing that looks
finished. The Hugging Face layout is checked by loading it into `transformers`
in the tests: the logits match jaxgen's. Importing it back is `jaxgen.hf_import`.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from jaxgen.config import Config, TransformerConfig
from jaxgen.data.tokenizer import BOS_ID, EOS_ID
from jaxgen.errors import ExportError
from jaxgen.files import building
from jaxgen.hf_import import import_hf  # noqa: F401  (re-exported: `jaxgen import` finds it here)
from jaxgen.runs import OpenedRun, load_run_config, open_run
from jaxgen.safetensors_stream import write_sharded
from jaxgen.sharding import param_path

log = logging.getLogger("jaxgen")

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30


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


def _to_host(array: jax.Array) -> np.ndarray:
    """A whole tensor on this host, gathered across processes when it is sharded over them."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


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


def _write_hf_tokenizer(tokenizer_path: pathlib.Path, out: pathlib.Path, max_len: int) -> None:
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False, "legacy": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def refuse_nonempty_output(out: str | pathlib.Path) -> None:
    """Refuse, before any work, an output that `files.building` could not rename into place."""
    out = pathlib.Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"output {str(out)!r} exists and is not an empty directory; name a new or empty one")


def export_hf(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """A directory `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    hf_config = llama_config(run.cfg)  # refuse before writing anything
    refuse_nonempty_output(out)
    target = EXPORT_DTYPES[dtype]
    flat = flat_params(run.params)
    by_name = {t.hf_name: t for t in llama_plan(run.cfg.model, flat)}
    specs = [(t.hf_name, t.hf_shape, target) for t in by_name.values()]

    def fetch(name: str) -> np.ndarray:
        t = by_name[name]
        array = flat[t.path] if t.layer is None else flat[t.path][t.layer]
        host = _to_host(array.astype(jnp.float32))
        return (host.T if t.transpose else host).astype(target)

    if jax.process_index() == 0:
        with building(out) as partial:
            write_sharded(partial, "model", specs, fetch, max_shard_bytes)
            (partial / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": dtype}, indent=2) + "\n")
            generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "max_length": run.cfg.model.max_seq_len}
            (partial / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            _write_hf_tokenizer(run.run_dir / "tokenizer.model", partial, run.cfg.model.max_seq_len)
    else:  # every process takes part in gathering sharded tensors
        for name, *_ in specs:
            fetch(name)
    return pathlib.Path(out)


def export_safetensors(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """The raw parameter tree (any model), keys like `layers/attn/wq/kernel`, plus jaxgen's config."""
    refuse_nonempty_output(out)
    target = EXPORT_DTYPES[dtype]
    flat = flat_params(run.params)
    specs = [(path, tuple(array.shape), target) for path, array in flat.items()]
    fetch = lambda path: _to_host(flat[path].astype(jnp.float32)).astype(target)  # noqa: E731
    if jax.process_index() == 0:
        with building(out) as partial:
            write_sharded(partial, "model", specs, fetch, max_shard_bytes)
            (partial / "config.yaml").write_text(run.cfg.to_yaml())
            if (run.run_dir / "tokenizer.model").exists():
                shutil.copyfile(run.run_dir / "tokenizer.model", partial / "tokenizer.model")
    else:
        for path, *_ in specs:
            fetch(path)
    return pathlib.Path(out)


def export_run(run_dir: str | pathlib.Path, out: str | pathlib.Path, fmt: str = "hf", dtype: str = "float32",
               step: int | None = None, overrides: list[str] = ()) -> pathlib.Path:
    if fmt not in ("hf", "safetensors"):
        raise ExportError(f"unknown export format {fmt!r}; valid: hf, safetensors")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")
    if fmt == "hf":
        llama_config(load_run_config(run_dir, overrides))  # a DiT fails here, before any restore
    refuse_nonempty_output(out)  # before the restore, the expensive part
    run = open_run(run_dir, step, overrides)
    writer = export_hf if fmt == "hf" else export_safetensors
    path = writer(run, out, dtype)
    log.info("exported step %d of %s to %s (%s, %s)", run.step, run_dir, path, fmt, dtype)
    return path
