"""A local Hugging Face checkpoint into a jaxgen run directory, trusting none of it.

Llama, Mistral, Qwen2, Qwen3 and Gemma 2 checkpoints are read (`hf_families`).

Before anything is written or allocated: config.json is read key by key (a bad
one is one line naming the file and the key; a key jaxgen's transformer cannot
honour is refused, never dropped), every tensor's shape and dtype is
taken from the safetensors headers and compared with what the config implies,
and every file read must lie inside the directory. Pickled weights are never
loaded. The run directory is built under a hidden name and renamed into place
when complete. Tensors then move one at a time, file -> device.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
from collections.abc import Mapping

import jax
import numpy as np
import pydantic

from jaxgen.config import Config, TransformerConfig
from jaxgen.data.tokenizer import Tokenizer, keep_tokenizer, load_tokenizer
from jaxgen.errors import DataError, ExportError
from jaxgen.files import building
from jaxgen.outputs.export import refuse_nonempty_output
from jaxgen.outputs.hf_families import (
    COMMON_DEFAULTS,
    COMMON_KEYS,
    DESCRIPTIVE_KEYS,
    FAMILIES,
    IMPORTABLE,
    REQUIRED_KEYS,
    ROPE_KEYS,
    Family,
    HFTensor,
    flat_params,
    hf_plan,
)
from jaxgen.outputs.runs import save_imported_run
from jaxgen.outputs.safetensors_stream import StoredTensor, file_inside, read_tensor, stored_tensors
from jaxgen.sharding import make_mesh, param_path, resolve_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP, ModelLayout, plan_models

log = logging.getLogger("jaxgen")

# config.json key -> jaxgen's TransformerConfig field, for naming fields in messages.
HF_TO_JAXGEN = {**COMMON_KEYS, **{key: field for f in FAMILIES.values() for key, field in f.keys.items()},
                "sliding_window": "sliding_window", "layer_types": "sliding_window_layers",
                "rope_scaling": "rope_scaling"}
JAXGEN_TO_HF = {field: key for key, field in HF_TO_JAXGEN.items()}
LAYER_TYPES = {"sliding_attention": True, "full_attention": False}
# Each widens exactly into jaxgen's float32 parameters; anything else would lose precision or is not a float.
IMPORTABLE_DTYPES = ("float32", "bfloat16", "float16")
# The rotary frequencies older transformers saved with the weights, per layer or once.
ROTARY_BUFFER = re.compile(r"(.+\.)?rotary_emb\.inv_freq")


def import_hf(hf_dir: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A jaxgen run directory (config, tokenizer, the parameters as checkpoint 0) from a local Hugging Face checkpoint.

    The parameters are placed as training places them (the same model layout);
    fine-tune from them with `checkpoint.init_from=OUT`.
    """
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out)
    refuse_nonempty_output(out)
    model_cfg, declared_dtype = read_hf_config(hf_dir)
    tokenizer = checked_tokenizer(hf_dir, model_cfg.vocab_size)
    stored = without_rotary_buffers(stored_tensors(hf_dir), model_cfg.resolved_head_dim)
    kept_as = out / tokenizer.file_name
    cfg = Config(model=model_cfg, data={"seq_len": min(model_cfg.max_seq_len, 128), "tokenizer": str(kept_as)})
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    layout = plan_models(make_task(cfg), make_mesh(cfg.mesh), rules, cfg.train.seed)  # nothing allocated yet
    plan = hf_plan(model_cfg, flat_params(layout.abstract[MAIN_GROUP]))
    check_tensors(hf_dir, plan, stored, declared_dtype)

    with building(out) as partial:
        params = imported_params(layout, plan, stored)
        keep_tokenizer(tokenizer, partial)
        save_imported_run(partial, cfg, params, hf_dir, inputs={
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_path": str(kept_as), "tokenizer_kind": tokenizer.kind})
    log.info("imported %s into %s", hf_dir, out)
    return out


# ----------------------------------------------------------------------------- config.json


def read_hf_config(hf_dir: pathlib.Path) -> tuple[TransformerConfig, str | None]:
    """jaxgen's model config, and the dtype the checkpoint declares (None when it declares none)."""
    path = file_inside(hf_dir, "config.json", "config file")
    if not path.is_file():
        raise ExportError(_not_a_model_directory(hf_dir))
    try:
        hf = json.loads(path.read_text())
    except ValueError as err:  # invalid JSON or invalid UTF-8
        raise ExportError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(hf, dict):
        raise ExportError(f"{path} must hold a JSON object, not {type(hf).__name__}")
    family = _family(hf, path)
    return _transformer_config(hf, path, family), declared_dtype(hf, path)


def _not_a_model_directory(hf_dir: pathlib.Path) -> str:
    """Why `hf_dir`, which has no config.json, cannot be imported."""
    if not hf_dir.exists():
        return f"{str(hf_dir)!r} does not exist; give a local Hugging Face model directory (with its config.json)"
    if not hf_dir.is_dir():
        return f"{str(hf_dir)!r} is a file; give a local Hugging Face model directory (with its config.json)"
    if (hf_dir / "config.yaml").is_file() and (hf_dir / "checkpoints").is_dir():
        return (f"{str(hf_dir)!r} is a jaxgen run directory, which needs no import: sample, eval and export it as it "
                "is, or fine-tune from it with checkpoint.init_from=RUN_DIR")
    if (hf_dir / "config.yaml").is_file():  # what `jaxgen export --format safetensors` writes beside the weights
        return (f"{str(hf_dir)!r} is a weights-only jaxgen export (--format safetensors), which import cannot read; "
                "export the run with --format hf (or --format diffusers for an autoencoder), or fine-tune from the "
                "run directory itself with checkpoint.init_from=RUN_DIR")
    return f"{str(hf_dir)!r} is not a Hugging Face model directory (no config.json)"


def _family(hf: dict, path: pathlib.Path) -> str:
    """The checkpoint's family, refused unless every key of its config.json is one jaxgen honours."""
    name = hf.get("model_type")
    # No architectures: as transformers' Auto classes do, the model_type's (a base model's tensors, without the
    # language-model head's names, are refused by the tensor check that follows).
    architectures = hf.get("architectures") or (
        [FAMILIES[name].architecture] if name in FAMILIES else [name] if name is not None else [])
    if name not in FAMILIES or architectures != [FAMILIES[name].architecture]:
        if architectures or name is not None:
            what = f"architecture {architectures} (model_type {name!r})"
        elif "_class_name" in hf:  # diffusers names the class of the model instead
            what = f"diffusers' {hf['_class_name']!r}"
        else:
            what = "a model that names no architectures, model_type or _class_name"
        raise ExportError(f"{path}: {what} is not supported; jaxgen imports {IMPORTABLE} checkpoints")
    family = FAMILIES[name]
    for key, accepted in family.constants.items():
        if key in hf and hf[key] not in accepted:
            raise ExportError(f"{path}: {key}={hf[key]!r} is not supported by jaxgen "
                              f"(only {' or '.join(map(repr, accepted))})")
    known = {*COMMON_KEYS, *family.keys, *family.window_keys, *family.constants, *DESCRIPTIVE_KEYS,
             "rope_parameters", "rope_scaling"}
    # An option switched off (null or false) changes nothing; any other is one jaxgen would have to drop.
    unknown = [key for key, value in hf.items() if key not in known and value is not None and value is not False]
    if unknown:
        raise ExportError(f"{path}: key {unknown[0]!r} = {hf[unknown[0]]!r} is a {name} option jaxgen's transformer "
                          "does not have, so the model cannot be imported faithfully")
    return name


def _transformer_config(hf: dict, path: pathlib.Path, name: str) -> TransformerConfig:
    missing = [key for key in REQUIRED_KEYS if hf.get(key) is None]
    if missing:
        raise ExportError(f"{path}: required key {missing[0]!r} is missing")
    family = FAMILIES[name]
    keys = {**COMMON_KEYS, **family.keys}
    given = {key: value for key, value in hf.items()
             if key in keys and (value is not None or key in family.null_means_off)}
    values = {**COMMON_DEFAULTS, **family.defaults, "num_key_value_heads": hf["num_attention_heads"], **given}
    fields = {keys[key]: value for key, value in values.items() if key in keys}
    fields.update(_rope_fields(hf, path), **family.fixed, family=name)
    model = _validated(fields, path)
    windows = _window_fields({**family.defaults, **hf}, family, model.n_layers, path)
    return _validated({**fields, **windows}, path) if windows else model


def _validated(fields: dict, path: pathlib.Path) -> TransformerConfig:
    try:
        # strict: a JSON "64" or 64.5 where an integer belongs is refused, not coerced
        return TransformerConfig.model_validate(fields, strict=True)
    except pydantic.ValidationError as err:
        raise ExportError(f"{path}: " + "; ".join(_in_hf_terms(e) for e in err.errors())) from None


def _rope_fields(hf: dict, path: pathlib.Path) -> dict:
    """rope_theta and rope_scaling from `rope_parameters` (newer transformers) or `rope_scaling` (older). Where a
    config.json holds both, transformers reads `rope_scaling` (`convert_rope_params_to_dict`): so does this."""
    key = "rope_scaling" if hf.get("rope_scaling") is not None else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise ExportError(f"{path}: key {key!r} = {rope!r}: expected an object")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_KEYS:
        raise ExportError(f"{path}: {key}.rope_type={kind!r} is not supported (only {', '.join(map(repr, ROPE_KEYS))})")
    if unknown := [name for name in rope if name not in ROPE_KEYS[kind]]:
        raise ExportError(f"{path}: {key}.{unknown[0]}={rope[unknown[0]]!r} is not supported for rope_type {kind!r}")
    fields = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    if kind == "llama3":
        if absent := [name for name in ROPE_KEYS[kind][3:6] if name not in rope]:
            raise ExportError(f"{path}: {key}.{absent[0]} is missing (rope_type 'llama3' needs it)")
        fields["rope_scaling"] = {
            "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
            "high_freq_factor": rope["high_freq_factor"],
            "original_max_seq_len": rope.get("original_max_position_embeddings", hf.get("max_position_embeddings")),
        }
    return fields


def _window_fields(hf: dict, family: Family, n_layers: int, path: pathlib.Path) -> dict:
    """sliding_window and sliding_window_layers, read as transformers reads them (defaults merged into `hf`)."""
    window = hf.get("sliding_window") if family.window_keys else None
    if "use_sliding_window" in family.window_keys and not hf["use_sliding_window"]:
        window = None  # Qwen: the window is off without use_sliding_window
    if window is None:
        return {}
    types = hf.get("layer_types")
    if types is None:
        sliding = [i for i in range(n_layers) if family.slides(hf, i)]
    elif isinstance(types, list) and len(types) == n_layers and all(t in LAYER_TYPES for t in types):
        sliding = [i for i, t in enumerate(types) if LAYER_TYPES[t]]
    else:
        raise ExportError(f"{path}: key 'layer_types' = {types!r}: expected a list of {n_layers} entries, each "
                          f"{' or '.join(map(repr, LAYER_TYPES))}")
    if not sliding:
        return {}
    return {"sliding_window": window, "sliding_window_layers": None if len(sliding) == n_layers else tuple(sliding)}


def _in_hf_terms(error: dict) -> str:
    return in_config_json_terms(error, JAXGEN_TO_HF)


def in_config_json_terms(error: dict, to_key: Mapping[str, str]) -> str:
    """One pydantic error about jaxgen's fields, told with the config.json keys the user can find
    (`to_key`: jaxgen field -> config.json key)."""
    if error["loc"]:
        key = ".".join([to_key.get(error["loc"][0], str(error["loc"][0])), *map(str, error["loc"][1:])])
        return f"key {key!r} = {error['input']!r}: {error['msg']}"
    message = error["msg"].removeprefix("Value error, ")  # a rule across fields names jaxgen's keys
    keys = [f"model.{field} is {key!r}" for field, key in to_key.items() if f"model.{field}=" in message]
    return f"{message} (in config.json, {', '.join(keys)})" if keys else message


def declared_dtype(hf: dict, path: pathlib.Path) -> str | None:
    key = "dtype" if "dtype" in hf else "torch_dtype"  # `dtype` in newer transformers
    declared = hf.get(key)
    if declared is None:
        return None
    if declared not in IMPORTABLE_DTYPES:
        raise ExportError(f"{path}: key {key!r} = {declared!r} cannot be imported without loss; "
                          f"jaxgen imports {', '.join(IMPORTABLE_DTYPES)}")
    return declared


def checked_tokenizer(hf_dir: pathlib.Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's own tokenizer: its sentencepiece tokenizer.model if jaxgen can use it, else tokenizer.json.

    (Llama 2 ships both; Llama 3 and Qwen only tokenizer.json, whose BOS/EOS come from tokenizer_config.json.)
    """
    model, json_file = (file_inside(hf_dir, name, "tokenizer") for name in ("tokenizer.model", "tokenizer.json"))
    if not model.is_file() and not json_file.is_file():
        raise ExportError(f"{str(hf_dir)!r} has neither tokenizer.model nor tokenizer.json; jaxgen imports a "
                          "model with its own tokenizer")
    try:
        tokenizer = load_tokenizer(model)
    except (DataError, OSError) as err:
        if not json_file.is_file():
            raise ExportError(str(err)) from None
        tokenizer = load_tokenizer(json_file)  # e.g. a tokenizer.model with other special ids than jaxgen's
    if tokenizer.vocab_size > vocab_size or (tokenizer.kind == "sentencepiece" and tokenizer.vocab_size != vocab_size):
        raise ExportError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                          f"{vocab_size}; the tokenizer does not belong to this model")
    return tokenizer


# ----------------------------------------------------------------------------- tensors


def without_rotary_buffers(stored: dict[str, StoredTensor], head_dim: int) -> dict[str, StoredTensor]:
    """`stored` less the rotary frequencies older transformers saved (`...rotary_emb.inv_freq`), each refused
    unless of the shape config.json implies.

    They are no weights: transformers ignores them on loading and computes the frequencies from config.json's
    rope settings, and so does jaxgen's transformer.
    """
    buffers = [name for name in stored if ROTARY_BUFFER.fullmatch(name)]
    for name in buffers:
        if stored[name].shape != (head_dim // 2,):
            raise ExportError(f"tensor {name!r} in {stored[name].file} has shape {stored[name].shape}, but "
                              f"config.json implies ({head_dim // 2},) (half the head dimension {head_dim})")
    if buffers:
        log.info("%d rotary_emb.inv_freq buffers ignored, as transformers ignores them: the frequencies come from "
                 "config.json's rope settings", len(buffers))
    return {name: tensor for name, tensor in stored.items() if name not in buffers}


def check_tensors(hf_dir: pathlib.Path, plan: list[HFTensor], stored: dict[str, StoredTensor],
                  declared_dtype: str | None) -> None:
    """Refuse unless the files hold exactly the planned tensors, each of its shape, all of one float dtype.

    A plan is anything naming each tensor's hf_name and hf_shape (diffusers_vae's VAETensor too).
    """
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


def imported_params(layout: ModelLayout, plan: list[HFTensor], stored: dict[str, StoredTensor]) -> dict:
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
