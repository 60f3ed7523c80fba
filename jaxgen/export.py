"""Weights out and in: raw safetensors for any model, Hugging Face Llama format for LMs.

Tensors move one at a time (device -> host -> file, or file -> device), so the
host never holds the whole model twice. The Hugging Face layout is checked by
loading it into `transformers` in the tests: the logits match jaxgen's.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import sentencepiece as spm
from jax.experimental import multihost_utils

from jaxgen.checkpoint import Checkpointer, checkpoint_dir
from jaxgen.config import Config, TransformerConfig
from jaxgen.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer
from jaxgen.errors import ExportError
from jaxgen.runs import OpenedRun, load_run_config, open_run
from jaxgen.safetensors_stream import tensor_names_in, write_sharded
from jaxgen.sharding import make_mesh, param_path
from jaxgen.train.state import TrainState

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


def _flat(params: dict) -> dict[str, jax.Array]:
    return {param_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _to_host(array: jax.Array) -> np.ndarray:
    """A whole tensor on this host, gathered across processes when it is sharded over them."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _llama_plan(cfg: TransformerConfig, flat: dict[str, jax.Array]) -> list[tuple[str, str, int | None, bool]]:
    """(HF name, jaxgen path, layer index or None, transpose) for every exported tensor."""
    plan = []
    for hf_name, path, per_layer, transpose in LLAMA_TENSORS:
        if path not in flat:
            continue  # lm_head of a model with tied embeddings
        layers = range(cfg.n_layers) if per_layer else [None]
        plan += [(hf_name.format(i=i), path, i, transpose) for i in layers]
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


def _prepare_out(out: pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output directory {str(out)!r} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_hf(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """A directory `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    hf_config = llama_config(run.cfg)  # refuse before writing anything
    target = EXPORT_DTYPES[dtype]
    flat = _flat(run.params)
    plan = _llama_plan(run.cfg.model, flat)
    by_name = {name: (path, layer, transpose) for name, path, layer, transpose in plan}
    specs = []
    for name, path, layer, transpose in plan:
        shape = flat[path].shape[1:] if layer is not None else flat[path].shape
        specs.append((name, tuple(reversed(shape)) if transpose else tuple(shape), target))

    def fetch(name: str) -> np.ndarray:
        path, layer, transpose = by_name[name]
        array = flat[path] if layer is None else flat[path][layer]
        host = _to_host(array.astype(jnp.float32))
        return (host.T if transpose else host).astype(target)

    if jax.process_index() == 0:
        out = _prepare_out(out)
        write_sharded(out, "model", specs, fetch, max_shard_bytes)
        (out / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": dtype}, indent=2) + "\n")
        generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "max_length": run.cfg.model.max_seq_len}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _write_hf_tokenizer(run.run_dir / "tokenizer.model", out, run.cfg.model.max_seq_len)
    else:  # every process takes part in gathering sharded tensors
        for name, *_ in specs:
            fetch(name)
    return pathlib.Path(out)


def export_safetensors(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """The raw parameter tree (any model), keys like `layers/attn/wq/kernel`, plus jaxgen's config."""
    target = EXPORT_DTYPES[dtype]
    flat = _flat(run.params)
    specs = [(path, tuple(array.shape), target) for path, array in flat.items()]
    fetch = lambda path: _to_host(flat[path].astype(jnp.float32)).astype(target)  # noqa: E731
    if jax.process_index() == 0:
        out = _prepare_out(out)
        write_sharded(out, "model", specs, fetch, max_shard_bytes)
        (out / "config.yaml").write_text(run.cfg.to_yaml())
        if (run.run_dir / "tokenizer.model").exists():
            shutil.copyfile(run.run_dir / "tokenizer.model", out / "tokenizer.model")
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
    if out is not None and pathlib.Path(out).exists() and any(pathlib.Path(out).iterdir()):
        raise ExportError(f"output directory {str(out)!r} exists and is not empty")
    run = open_run(run_dir, step, overrides)
    writer = export_hf if fmt == "hf" else export_safetensors
    path = writer(run, out, dtype)
    log.info("exported step %d of %s to %s (%s, %s)", run.step, run_dir, path, fmt, dtype)
    return path


# ----------------------------------------------------------------------------- import


def transformer_config_from_hf(hf: dict, where: str) -> TransformerConfig:
    """jaxgen's model config for a Llama-family config.json; anything Llama-incompatible is refused."""
    architectures = hf.get("architectures") or [hf.get("model_type", "unknown")]
    if hf.get("model_type") != "llama" or architectures != ["LlamaForCausalLM"]:
        raise ExportError(
            f"{where}: architecture {architectures} (model_type {hf.get('model_type')!r}) is not supported; "
            "jaxgen imports LlamaForCausalLM checkpoints"
        )
    unsupported = {
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "rope_scaling": (hf.get("rope_scaling"), None),
    }
    for option, (value, supported) in unsupported.items():
        if value != supported:
            raise ExportError(f"{where}: {option}={value!r} is not supported by jaxgen (only {supported!r})")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{where}: rope_parameters.rope_type={rope['rope_type']!r} is not supported (only 'default')")
    return TransformerConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10_000.0)), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02),
    )


def import_hf(hf_dir: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A jaxgen run directory (config, tokenizer, checkpoint at step 0) from a local Llama checkpoint.

    Fine-tune from it with `checkpoint.init_from=OUT`.
    """
    from safetensors import safe_open

    hf_dir = pathlib.Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{str(hf_dir)!r} is not a Hugging Face model directory (no config.json)")
    model_cfg = transformer_config_from_hf(json.loads((hf_dir / "config.json").read_text()), str(hf_dir))
    if not (hf_dir / "tokenizer.model").is_file():
        raise ExportError(f"{str(hf_dir)!r} has no sentencepiece tokenizer.model, which jaxgen's data pipeline needs")
    tokenizer = Tokenizer(hf_dir / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if tokenizer.vocab_size != model_cfg.vocab_size or ids != (UNK_ID, BOS_ID, EOS_ID):
        raise ExportError(
            f"{hf_dir}/tokenizer.model has {tokenizer.vocab_size} pieces with unk, bos, eos = {ids}; jaxgen needs "
            f"vocab_size={model_cfg.vocab_size} with unk, bos, eos = {(UNK_ID, BOS_ID, EOS_ID)}"
        )
    files = dict(tensor_names_in(hf_dir))
    out = _prepare_out(out)
    cfg = Config(model=model_cfg, data={"seq_len": min(model_cfg.max_seq_len, 128),
                                        "tokenizer": str(out / "tokenizer.model")})

    from jaxgen.train.build import build_training

    training = build_training(cfg, make_mesh(cfg.mesh))
    layout = training.layout
    wanted = _flat(layout.abstract.params)
    shardings = _flat(layout.shardings.params)
    plan = _llama_plan(model_cfg, wanted)
    missing = [name for name, *_ in plan if name not in files]
    if missing:
        raise ExportError(f"{hf_dir}: tensors missing for this config: {', '.join(missing[:5])}")

    def read(name: str) -> np.ndarray:
        with safe_open(files[name], framework="numpy") as f:
            return f.get_tensor(name)

    flat_params = {}
    for path, abstract in wanted.items():
        entries = [(name, layer, transpose) for name, p, layer, transpose in plan if p == path]
        host = np.empty(abstract.shape, abstract.dtype)  # one parameter (all layers) on the host at a time
        for name, layer, transpose in entries:
            tensor = read(name)
            tensor = tensor.T if transpose else tensor
            if layer is None:
                host[...] = tensor
            else:
                host[layer] = tensor
        flat_params[path] = jax.device_put(host, shardings[path])
    params = _unflatten(flat_params, layout.abstract.params)
    opt_state = jax.jit(training.tx.init, out_shardings=layout.shardings.opt_state)(params)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=opt_state, rng=jax.random.PRNGKey(cfg.train.seed),
                       nonfinite_steps=zero)

    shutil.copyfile(hf_dir / "tokenizer.model", out / "tokenizer.model")
    (out / "config.yaml").write_text(cfg.to_yaml())
    ckpt = Checkpointer(checkpoint_dir(out), cfg.checkpoint)
    meta = {"config": cfg.model_dump(mode="json"), "tokenizer_sha256": tokenizer.sha256,
            "tokenizer_path": str(out / "tokenizer.model"), "imported_from": str(hf_dir)}
    ckpt.save(0, state, {}, meta)
    ckpt.wait()
    ckpt.close()
    log.info("imported %s into %s", hf_dir, out)
    return out


def _unflatten(flat: dict[str, jax.Array], like: dict) -> dict:
    return jax.tree_util.tree_map_with_path(lambda p, _: flat[param_path(p)], like)
