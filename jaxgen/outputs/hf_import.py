"""A local Hugging Face Llama checkpoint into a jaxgen run directory, trusting none of it.

Before anything is written or allocated: config.json is read key by key (a bad
one is one line naming the file and the key), every tensor's shape and dtype is
taken from the safetensors headers and compared with what the config implies,
and every file read must lie inside the directory. Pickled weights are never
loaded. The run directory is built under a hidden name and renamed into place
when complete. Tensors then move one at a time, file -> device.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import pydantic
import sentencepiece as spm

from jaxgen.checkpoint import Checkpointer, checkpoint_dir
from jaxgen.config import Config, TransformerConfig
from jaxgen.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, Tokenizer
from jaxgen.errors import ExportError
from jaxgen.files import building
from jaxgen.outputs.export import refuse_nonempty_output
from jaxgen.outputs.llama import LlamaTensor, flat_params, llama_plan
from jaxgen.outputs.safetensors_stream import StoredTensor, file_inside, read_tensor, stored_tensors
from jaxgen.sharding import make_mesh, param_path, resolve_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP, ModelLayout, plan_models

log = logging.getLogger("jaxgen")

# config.json key -> jaxgen's TransformerConfig field.
HF_TO_JAXGEN = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "d_ff", "max_position_embeddings": "max_seq_len", "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings", "initializer_range": "init_std",
}
JAXGEN_TO_HF = {field: key for key, field in HF_TO_JAXGEN.items()}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
# transformers' LlamaConfig defaults, for the keys a config.json may leave out.
LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
                  "tie_word_embeddings": False, "initializer_range": 0.02}
# Each widens exactly into jaxgen's float32 parameters; anything else would lose precision or is not a float.
IMPORTABLE_DTYPES = ("float32", "bfloat16", "float16")


def import_hf(hf_dir: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A jaxgen run directory (config, tokenizer, the parameters as checkpoint 0) from a local Llama checkpoint.

    The parameters are placed as training places them (the same model layout);
    fine-tune from them with `checkpoint.init_from=OUT`.
    """
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out)
    refuse_nonempty_output(out)
    model_cfg, declared_dtype = read_hf_config(hf_dir)
    tokenizer_path = _checked_tokenizer(hf_dir, model_cfg.vocab_size)
    stored = stored_tensors(hf_dir)
    cfg = Config(model=model_cfg, data={"seq_len": min(model_cfg.max_seq_len, 128),
                                        "tokenizer": str(out / "tokenizer.model")})
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    layout = plan_models(make_task(cfg), make_mesh(cfg.mesh), rules, cfg.train.seed)  # nothing allocated yet
    plan = llama_plan(model_cfg, flat_params(layout.abstract[MAIN_GROUP]))
    _check_tensors(hf_dir, plan, stored, declared_dtype)

    with building(out) as partial:
        params = _imported_params(layout, plan, stored)
        shutil.copyfile(tokenizer_path, partial / "tokenizer.model")
        (partial / "config.yaml").write_text(cfg.to_yaml())
        meta = {"config": cfg.model_dump(mode="json"), "imported_from": str(hf_dir),
                "inputs": {"tokenizer_sha256": Tokenizer(tokenizer_path).sha256,
                           "tokenizer_path": str(out / "tokenizer.model")}}
        ckpt = Checkpointer(checkpoint_dir(partial), cfg.checkpoint)
        ckpt.save(0, {"params": params}, {}, meta)
        ckpt.wait()
        ckpt.close()
    log.info("imported %s into %s", hf_dir, out)
    return out


# ----------------------------------------------------------------------------- config.json


def read_hf_config(hf_dir: pathlib.Path) -> tuple[TransformerConfig, str | None]:
    """jaxgen's model config, and the dtype the checkpoint declares (None when it declares none)."""
    path = file_inside(hf_dir, "config.json", "config file")
    if not path.is_file():
        raise ExportError(f"{str(hf_dir)!r} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as err:  # invalid JSON or invalid UTF-8
        raise ExportError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(hf, dict):
        raise ExportError(f"{path} must hold a JSON object, not {type(hf).__name__}")
    _refuse_non_llama(hf, path)
    return _transformer_config(hf, path), _declared_dtype(hf, path)


def _refuse_non_llama(hf: dict, path: pathlib.Path) -> None:
    architectures = hf.get("architectures") or [hf.get("model_type", "unknown")]
    if hf.get("model_type") != "llama" or architectures != ["LlamaForCausalLM"]:
        raise ExportError(
            f"{path}: architecture {architectures} (model_type {hf.get('model_type')!r}) is not supported; "
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
            raise ExportError(f"{path}: {option}={value!r} is not supported by jaxgen (only {supported!r})")
    rope = _rope_parameters(hf, path)
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"{path}: rope_parameters.rope_type={rope['rope_type']!r} is not supported (only 'default')")


def _rope_parameters(hf: dict, path: pathlib.Path) -> dict:
    """Newer transformers keep rope_theta (and the rope type) in `rope_parameters`."""
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ExportError(f"{path}: key 'rope_parameters' = {rope!r}: expected an object")
    return rope


def _transformer_config(hf: dict, path: pathlib.Path) -> TransformerConfig:
    missing = [key for key in REQUIRED_KEYS if hf.get(key) is None]
    if missing:
        raise ExportError(f"{path}: required key {missing[0]!r} is missing")
    given = {key: value for key, value in hf.items() if key in HF_TO_JAXGEN and value is not None}
    values = {**LLAMA_DEFAULTS, "num_key_value_heads": hf["num_attention_heads"], **given}
    if "rope_theta" in _rope_parameters(hf, path):
        values["rope_theta"] = hf["rope_parameters"]["rope_theta"]
    try:
        # strict: a JSON "64" or 64.5 where an integer belongs is refused, not coerced
        return TransformerConfig.model_validate({HF_TO_JAXGEN[k]: v for k, v in values.items()}, strict=True)
    except pydantic.ValidationError as err:
        raise ExportError(f"{path}: " + "; ".join(_in_hf_terms(e) for e in err.errors())) from None


def _in_hf_terms(error: dict) -> str:
    """One pydantic error about jaxgen's fields, told with the config.json keys the user can find."""
    if error["loc"]:
        return f"key {JAXGEN_TO_HF[error['loc'][0]]!r} = {error['input']!r}: {error['msg']}"
    message = error["msg"].removeprefix("Value error, ")  # a rule across fields names jaxgen's keys
    keys = [f"model.{field} is {key!r}" for key, field in HF_TO_JAXGEN.items() if f"model.{field}=" in message]
    return f"{message} (in config.json, {', '.join(keys)})" if keys else message


def _declared_dtype(hf: dict, path: pathlib.Path) -> str | None:
    key = "dtype" if "dtype" in hf else "torch_dtype"  # `dtype` in newer transformers
    declared = hf.get(key)
    if declared is None:
        return None
    if declared not in IMPORTABLE_DTYPES:
        raise ExportError(f"{path}: key {key!r} = {declared!r} cannot be imported without loss; "
                          f"jaxgen imports {', '.join(IMPORTABLE_DTYPES)}")
    return declared


def _checked_tokenizer(hf_dir: pathlib.Path, vocab_size: int) -> pathlib.Path:
    path = file_inside(hf_dir, "tokenizer.model", "tokenizer")
    if not path.is_file():
        raise ExportError(f"{str(hf_dir)!r} has no sentencepiece tokenizer.model, which jaxgen's data pipeline needs")
    pieces = Tokenizer(path).vocab_size
    sp = spm.SentencePieceProcessor(model_file=str(path))
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if pieces != vocab_size or ids != (UNK_ID, BOS_ID, EOS_ID):
        raise ExportError(
            f"{path} has {pieces} pieces with unk, bos, eos = {ids}; jaxgen needs "
            f"vocab_size={vocab_size} with unk, bos, eos = {(UNK_ID, BOS_ID, EOS_ID)}"
        )
    return path


# ----------------------------------------------------------------------------- tensors


def _check_tensors(hf_dir: pathlib.Path, plan: list[LlamaTensor], stored: dict[str, StoredTensor],
                  declared_dtype: str | None) -> None:
    """Refuse unless the files hold exactly the planned tensors, each of its shape, all of one float dtype."""
    expected = {t.hf_name: t.hf_shape for t in plan}
    missing = [name for name in expected if name not in stored]
    if missing:
        raise ExportError(f"{str(hf_dir)!r}: tensors that config.json implies are missing: {_some(missing)}")
    extra = [name for name in stored if name not in expected]
    if extra:
        raise ExportError(f"{stored[extra[0]].file} holds tensors that config.json does not describe: {_some(extra)}")
    for name, shape in expected.items():
        if stored[name].shape != shape:
            raise ExportError(f"tensor {name!r} in {stored[name].file} has shape {stored[name].shape}, "
                              f"but config.json implies {shape}")
    _check_dtypes(list(expected), stored, declared_dtype)


def _check_dtypes(names: list[str], stored: dict[str, StoredTensor], declared: str | None) -> None:
    first = stored[names[0]]
    if declared is None and first.dtype not in IMPORTABLE_DTYPES:
        raise ExportError(f"tensor {names[0]!r} in {first.file} has dtype {first.dtype}; "
                          f"jaxgen imports {', '.join(IMPORTABLE_DTYPES)}")
    wanted = declared or first.dtype
    why = (f"config.json declares {declared}" if declared else
           f"{names[0]!r} has {first.dtype} and config.json declares no dtype, so all must agree")
    for name in names:
        if stored[name].dtype != wanted:
            raise ExportError(f"tensor {name!r} in {stored[name].file} has dtype {stored[name].dtype}, but {why}")


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _imported_params(layout: ModelLayout, plan: list[LlamaTensor], stored: dict[str, StoredTensor]) -> dict:
    """The checked tensors as the model group's parameters, one parameter (all layers) on the host at a time."""

    def load(key_path: tuple, abstract: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.Array:
        path = param_path(key_path)
        host = np.empty(abstract.shape, abstract.dtype)
        for t in (t for t in plan if t.path == path):
            tensor = read_tensor(t.hf_name, stored[t.hf_name])  # float16/bfloat16 widen exactly into host
            host[() if t.layer is None else t.layer] = tensor.T if t.transpose else tensor
        return jax.device_put(host, sharding)

    return {MAIN_GROUP: jax.tree_util.tree_map_with_path(load, layout.abstract[MAIN_GROUP],
                                                         layout.shardings[MAIN_GROUP])}
