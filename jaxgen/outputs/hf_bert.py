"""The encoder in transformers' BertForMaskedLM format: export to it, import from it.

One table (`TENSORS`) names each BERT tensor and the jaxgen parameter it is, so
export and import always agree. BERT is jaxgen's encoder with its default
switches (learned positions, post-norm LayerNorm, plain GELU MLP, biases); any
other switch is refused by name. A model without token types (`type_vocab_size:
0`) is written with a one-row table of zeros, which BERT adds as nothing; it
imports back with that row (`type_vocab_size: 1`), computing the same function.

The config.json written is the one transformers writes for the same BertConfig
(its dropout rates BERT's defaults: jaxgen trains without dropout, and these
are settings for whoever fine-tunes the export). `position_embedding_type` is
left out: it is "absolute" wherever transformers reads it, and transformers 5
has no other. The tokenizer's BOS and EOS are BERT's [CLS] and [SEP]; padding
is token 0, on the right (BERT's positions count from the row's start).

An import trusts nothing, as `hf_import` does: config.json is read key by key
(a key jaxgen's encoder cannot honour is refused, never dropped), and every
tensor's name, shape and dtype is checked from the safetensors headers before
anything is written or allocated.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pydantic
import tokenizers

from jaxgen.config import Config
from jaxgen.config_encoders import EncoderConfig
from jaxgen.data.hf_json_tokenizer import CONFIG_NAME, HFJsonTokenizer
from jaxgen.data.tokenizer import MASK_PIECE, Tokenizer, keep_tokenizer, load_tokenizer
from jaxgen.errors import DataError, ExportError
from jaxgen.files import building
from jaxgen.outputs.export import DEFAULT_MAX_SHARD_BYTES, refuse_nonempty_output, write_planned
from jaxgen.outputs.hf_families import HFTensor, flat_params
from jaxgen.outputs.hf_import import (
    check_tensors,
    checked_tokenizer,
    declared_dtype,
    imported_params,
    in_config_json_terms,
)
from jaxgen.outputs.hf_tokenizer import check_exportable, frame_texts, write_hf_tokenizer
from jaxgen.outputs.runs import OpenedRun, save_imported_run
from jaxgen.outputs.safetensors_stream import file_inside, stored_tensors
from jaxgen.sharding import make_mesh, resolve_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP, ModelLayout, plan_models

log = logging.getLogger("jaxgen")

ARCHITECTURE, MODEL_TYPE = "BertForMaskedLM", "bert"
TYPE_TABLE = "bert.embeddings.token_type_embeddings.weight"
# BERT name, jaxgen parameter path, one tensor per layer?, stored transposed? (torch Linear is (out, in)).
# The MLM decoder is the word embedding table and its bias `cls.predictions.bias` (tied, not stored).
_LAYER = "bert.encoder.layer.{i}."
TENSORS = [
    ("bert.embeddings.word_embeddings.weight", "embed", False, False),
    ("bert.embeddings.position_embeddings.weight", "position_embed", False, False),
    (TYPE_TABLE, "type_embed", False, False),
    ("bert.embeddings.LayerNorm.weight", "embed_norm/scale", False, False),
    ("bert.embeddings.LayerNorm.bias", "embed_norm/bias", False, False),
    *[(f"{_LAYER}attention.self.{name}.{kind}", f"layers/attn/{path}/{leaf}", True, kind == "weight")
      for name, path in (("query", "wq"), ("key", "wk"), ("value", "wv"))
      for kind, leaf in (("weight", "kernel"), ("bias", "bias"))],
    (f"{_LAYER}attention.output.dense.weight", "layers/attn/wo/kernel", True, True),
    (f"{_LAYER}attention.output.dense.bias", "layers/attn/wo/bias", True, False),
    (f"{_LAYER}attention.output.LayerNorm.weight", "layers/attn_norm/scale", True, False),
    (f"{_LAYER}attention.output.LayerNorm.bias", "layers/attn_norm/bias", True, False),
    (f"{_LAYER}intermediate.dense.weight", "layers/mlp/w_up/kernel", True, True),
    (f"{_LAYER}intermediate.dense.bias", "layers/mlp/w_up/bias", True, False),
    (f"{_LAYER}output.dense.weight", "layers/mlp/w_down/kernel", True, True),
    (f"{_LAYER}output.dense.bias", "layers/mlp/w_down/bias", True, False),
    (f"{_LAYER}output.LayerNorm.weight", "layers/mlp_norm/scale", True, False),
    (f"{_LAYER}output.LayerNorm.bias", "layers/mlp_norm/bias", True, False),
    ("cls.predictions.transform.dense.weight", "head/dense/kernel", False, True),
    ("cls.predictions.transform.dense.bias", "head/dense/bias", False, False),
    ("cls.predictions.transform.LayerNorm.weight", "head/norm/scale", False, False),
    ("cls.predictions.transform.LayerNorm.bias", "head/norm/bias", False, False),
    ("cls.predictions.bias", "head/output_bias", False, False),
]

# config.json key -> EncoderConfig field, and transformers' BertConfig defaults for keys a file leaves out.
FIELDS = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
          "num_attention_heads": "n_heads", "intermediate_size": "d_ff", "max_position_embeddings": "max_seq_len",
          "type_vocab_size": "type_vocab_size", "layer_norm_eps": "norm_eps", "initializer_range": "init_std"}
DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "initializer_range": 0.02}
# transformers' hidden_act -> jaxgen's mlp_activation (gelu_new and gelu_pytorch_tanh are both the tanh form).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
WRITTEN_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# Keys that, when present, must hold one of these values: what jaxgen's encoder computes.
CONSTANTS = {"position_embedding_type": ("absolute",), "is_decoder": (False,), "add_cross_attention": (False,),
             "tie_word_embeddings": (True,), "chunk_size_feed_forward": (0,)}
# Keys about the file, fine-tuning (dropout) or generation, not about the function the model computes.
DESCRIPTIVE_KEYS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
                    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "use_cache",
                    "pad_token_id", "bos_token_id", "eos_token_id", "gradient_checkpointing")
# The rest of an export's config.json: transformers' BertConfig defaults, as it writes them.
WRITTEN_KEYS = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "classifier_dropout": None,
                       "use_cache": True, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
                       "is_decoder": False, "add_cross_attention": False, "tie_word_embeddings": True}
# The encoder switches BERT has, at BERT's values (mlp_activation: either GELU).
BERT_SWITCHES = {"positions": ("learned",), "norm_placement": ("post",), "norm": ("layernorm",),
                 "gated_mlp": (False,), "bias": (True,), "mlp_activation": tuple(WRITTEN_ACTIVATIONS)}


def is_bert_dir(directory: str | pathlib.Path) -> bool:
    """Whether `directory`'s config.json describes a BERT model (so `jaxgen import` reads it here)."""
    try:
        return json.loads((pathlib.Path(directory) / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False  # hf_import reports what is wrong with it


def bert_plan(model: EncoderConfig, flat: dict) -> list[HFTensor]:
    """Every BERT tensor of the encoder whose parameters (or abstract ones) are `flat`, by path."""
    plan = []
    for hf_name, path, per_layer, transpose in TENSORS:
        if path not in flat:
            continue
        shape = tuple(flat[path].shape[1:] if per_layer else flat[path].shape)
        hf_shape = shape[::-1] if transpose else shape
        layers = range(model.n_layers) if per_layer else [None]
        plan += [HFTensor(hf_name.format(i=i), path, i, transpose, hf_shape) for i in layers]
    return plan


def encoder_layout(cfg: Config) -> ModelLayout:
    """The encoder's parameter shapes and shardings for `cfg`'s mesh and rules; nothing is allocated."""
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    return plan_models(make_task(cfg), make_mesh(cfg.mesh), rules, cfg.train.seed)


# ----------------------------------------------------------------------------- config.json


def bert_config(model: EncoderConfig) -> dict:
    """BertForMaskedLM's config.json for the encoder; refuses, naming every one, switches BERT does not have."""
    if model.kind != "encoder":
        raise ExportError(f"model.kind={model.kind!r} is not a BERT-style encoder; jaxgen writes BertForMaskedLM "
                          "for model.kind=encoder")
    if unlike := [switch for switch, values in BERT_SWITCHES.items() if getattr(model, switch) not in values]:
        have = [f"model.{switch}={getattr(model, switch)!r}" for switch in unlike]
        bert = [f"{switch}={' or '.join(map(repr, BERT_SWITCHES[switch]))}" for switch in unlike]
        raise ExportError(f"{', '.join(have)} cannot be written as a Hugging Face {ARCHITECTURE}, which has "
                          f"{', '.join(bert)}; use --format safetensors")
    values = model.model_dump()
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        **{key: values[field] for key, field in FIELDS.items()},
        "type_vocab_size": max(model.type_vocab_size, 1),  # BERT always adds a token type: row 0, zeros
        "hidden_act": WRITTEN_ACTIVATIONS[model.mlp_activation],
        **WRITTEN_KEYS,
    }


def read_bert_config(directory: pathlib.Path) -> tuple[EncoderConfig, str | None]:
    """jaxgen's encoder config from a BERT config.json, and the dtype it declares; refuses what jaxgen cannot honour."""
    path = file_inside(directory, "config.json", "config file")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} cannot be read as JSON: {err}") from None
    if not isinstance(hf, dict) or hf.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{path} does not describe a BERT model (model_type {MODEL_TYPE!r})")
    if hf.get("architectures", [ARCHITECTURE]) != [ARCHITECTURE]:
        raise ExportError(f"{path}: architectures={hf['architectures']!r} is not supported; jaxgen imports "
                          f"{ARCHITECTURE} checkpoints")
    for key, accepted in CONSTANTS.items():
        if key in hf and hf[key] not in accepted:
            raise ExportError(f"{path}: {key}={hf[key]!r} is not supported by jaxgen's encoder "
                              f"(only {' or '.join(map(repr, accepted))})")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ExportError(f"{path}: hidden_act={act!r} is not supported by jaxgen's encoder "
                          f"(only {', '.join(map(repr, ACTIVATIONS))})")
    known = {*FIELDS, *CONSTANTS, *DESCRIPTIVE_KEYS, "hidden_act"}
    # An option switched off (null or false) changes nothing; any other is one jaxgen would have to drop.
    if unknown := [key for key, value in hf.items() if key not in known and value is not None and value is not False]:
        raise ExportError(f"{path}: key {unknown[0]!r} = {hf[unknown[0]]!r} is a BERT option jaxgen's encoder "
                          "does not have, so the model cannot be imported faithfully")
    values = {**DEFAULTS, **{key: value for key, value in hf.items() if key in FIELDS}}
    fields = {FIELDS[key]: value for key, value in values.items()}
    try:
        model = EncoderConfig.model_validate({**fields, "mlp_activation": ACTIVATIONS[act]}, strict=True)
    except pydantic.ValidationError as err:
        raise ExportError(f"{path}: " + "; ".join(_in_bert_terms(e) for e in err.errors())) from None
    return model, declared_dtype(hf, path)


def _in_bert_terms(error: dict) -> str:
    return in_config_json_terms(error, {field: key for key, field in FIELDS.items()})


# ----------------------------------------------------------------------------- export


def export_bert(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """A directory (weights, config.json, tokenizer) `transformers.BertForMaskedLM.from_pretrained` loads."""
    model = run.cfg.model
    config = {**bert_config(model), "dtype": dtype}  # refuse before writing anything
    tokenizer = load_tokenizer(run.run_dir)
    check_exportable(tokenizer)
    refuse_nonempty_output(out)
    flat = flat_params(run.weights.params[MAIN_GROUP])
    plan = bert_plan(model, flat)
    # A model without token types exports a one-row table of zeros: BERT adds row 0, which adds nothing.
    zeros = {} if any(t.hf_name == TYPE_TABLE for t in plan) else {TYPE_TABLE: np.zeros((1, model.d_model))}

    def write_rest(directory: pathlib.Path) -> None:
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_hf_tokenizer(tokenizer, directory, model.max_seq_len)
        frame_texts(directory, tokenizer, bos=True, eos=True)  # [CLS] text [SEP], as trained
        _name_bert_roles(directory, tokenizer)

    return write_planned(out, flat, plan, dtype, max_shard_bytes, write_rest, zeros)


def _name_bert_roles(out: pathlib.Path, tokenizer: Tokenizer) -> None:
    """Name BERT's special tokens in the written tokenizer files: [CLS] = BOS, [SEP] = EOS, [MASK], pad = id 0.

    Roles the files already name are kept (a BERT tokenizer's own); padding goes on the right, where BERT's
    positions need it. [MASK] is a special token here, which transformers' split_special_tokens would
    spell out letter by letter: it is off, so "[MASK]" in text is the mask token (as for jaxgen) and,
    unlike jaxgen, "<s>" or "</s>" in text is [CLS] or [SEP].
    """
    vocabulary = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    roles = {"cls_token": vocabulary.id_to_token(tokenizer.bos_id),
             "sep_token": vocabulary.id_to_token(tokenizer.eos_id)}
    if tokenizer.piece_id(MASK_PIECE) is not None:
        roles["mask_token"] = MASK_PIECE
    fixed = {"pad_token": vocabulary.id_to_token(0)}  # config.json's pad_token_id
    config_extra = {"padding_side": "right", "split_special_tokens": False}
    for name, extra in (("special_tokens_map.json", {}), (CONFIG_NAME, config_extra)):
        path = out / name
        if path.is_file():
            written = json.loads(path.read_text(encoding="utf-8"))
            named = {**roles, **written, **fixed, **extra}
            path.write_text(json.dumps(named, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- import


def import_bert(source: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A jaxgen run directory (config, tokenizer, the parameters as checkpoint 0) from a local BertForMaskedLM.

    The parameters are placed as training places them; fine-tune from them with `checkpoint.init_from=OUT`.
    """
    source, out = pathlib.Path(source), pathlib.Path(out)
    refuse_nonempty_output(out)
    model, declared_dtype = read_bert_config(source)
    tokenizer = _bert_tokenizer(source, model.vocab_size)
    if tokenizer.piece_id(MASK_PIECE) is None:  # a masked LM fills [MASK]s: without one, sample fills nothing
        raise ExportError(f"the tokenizer in {source} ({tokenizer.file_name}) has no {MASK_PIECE} token, which a "
                          f"masked LM fills in; give the checkpoint's own tokenizer (a tokenizer.json or "
                          f"sentencepiece model holding {MASK_PIECE})")
    stored = stored_tensors(source)
    kept_as = out / tokenizer.file_name
    cfg = Config(model=model, data={"seq_len": min(model.max_seq_len, 128), "tokenizer": str(kept_as)})
    layout = encoder_layout(cfg)
    plan = bert_plan(model, flat_params(layout.abstract[MAIN_GROUP]))
    check_tensors(source, plan, stored, declared_dtype)

    with building(out) as partial:
        params = imported_params(layout, plan, stored)
        keep_tokenizer(tokenizer, partial)
        save_imported_run(partial, cfg, params, source, inputs={
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_path": str(kept_as), "tokenizer_kind": tokenizer.kind})
    log.info("imported %s into %s", source, out)
    return out


def _bert_tokenizer(source: pathlib.Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer. BERT's tokenizer_config.json names [CLS] and [SEP] rather than a BOS and an
    EOS: jaxgen reads them as its BOS and EOS (where the file names none of its own)."""
    json_file, config_file = (file_inside(source, name, "tokenizer") for name in ("tokenizer.json", CONFIG_NAME))
    if (source / "tokenizer.model").is_file() or not json_file.is_file() or not config_file.is_file():
        return checked_tokenizer(source, vocab_size)
    try:
        config = json.loads(config_file.read_bytes())
    except ValueError:
        return checked_tokenizer(source, vocab_size)  # it names the broken file
    if not isinstance(config, dict) or config.get("eos_token") is not None:
        return checked_tokenizer(source, vocab_size)
    roles = {"bos_token": config.get("cls_token"), "eos_token": config.get("sep_token")}
    files = {json_file.name: json_file.read_bytes(),
             CONFIG_NAME: json.dumps({**config, **roles}, indent=2, ensure_ascii=False).encode() + b"\n"}
    try:
        tokenizer = HFJsonTokenizer.from_files(files, source)
    except DataError as err:
        raise ExportError(f"{err} (BERT's sep_token is read as the end-of-text token)") from None
    if tokenizer.vocab_size > vocab_size:
        raise ExportError(f"{json_file} has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                          f"{vocab_size}; the tokenizer does not belong to this model")
    return tokenizer
