"""The encoder-decoder in transformers' T5ForConditionalGeneration format: export to it, import from it.

Every jaxgen parameter is one tensor of T5's state dict, or one per layer of a
stacked one (`t5_plan`); projection kernels (in, out) are transposed to PyTorch's
(out, in). The relative-position tables live in each stack's block 0, as T5 keeps
them. The tests load exports with `T5ForConditionalGeneration.from_pretrained` and
compare logits and greedy generations.

Tying: transformers decides it from the checkpoint (`lm_head.weight` present or not)
and scales the decoder's output by d_model ** -0.5 when config.json asks
(`scale_decoder_outputs`, or by older versions' `tie_word_embeddings`). jaxgen's
tied model is tied and scaled, its untied one neither. A checkpoint tied but not
scaled (what transformers 5 saves for a T5 v1.1 it initialised itself) is imported
untied, its output layer a copy of the embedding: the same function.

An import trusts nothing, as `hf_import` does: config.json is read key by key (a key
jaxgen's model cannot honour is refused, never dropped), every tensor's name, shape
and dtype is checked from the safetensors headers before anything is written or
allocated, and pickles are never read.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib

import pydantic

from jaxgen.config import Config, EncoderDecoderConfig
from jaxgen.data.tokenizer import Tokenizer, keep_tokenizer, load_tokenizer
from jaxgen.errors import ExportError
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
from jaxgen.tasks.layout import MAIN_GROUP, plan_models

log = logging.getLogger("jaxgen")

ARCHITECTURE = "T5ForConditionalGeneration"
# feed_forward_proj -> model.mlp_activation: T5 v1.1's gated-gelu is transformers' gelu_new (the tanh form).
FEED_FORWARD = {"gated-gelu": "gelu_tanh", "gated-gelu_new": "gelu_tanh", "gated-silu": "silu"}
DENSE_ACT_FN = {"gelu_tanh": "gelu_new", "silu": "silu"}
# config.json key -> EncoderDecoderConfig field, where one holds the other's value as is.
FIELDS = {"vocab_size": "vocab_size", "d_model": "d_model", "num_layers": "n_layers",
          "num_decoder_layers": "n_decoder_layers", "num_heads": "n_heads", "d_kv": "head_dim", "d_ff": "d_ff",
          "relative_attention_num_buckets": "relative_buckets",
          "relative_attention_max_distance": "relative_max_distance", "layer_norm_epsilon": "norm_eps",
          "initializer_factor": "init_std", "decoder_start_token_id": "decoder_start_id"}
# T5Config's defaults for the keys above that a config.json may leave out.
DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0}
# Keys that change nothing jaxgen computes: what the file is, training-time dropout, token roles
# (the tokenizer's own are used), generation and output options.
DESCRIPTIVE_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "dropout_rate",
                    "classifier_dropout", "pad_token_id", "eos_token_id", "bos_token_id", "n_positions",
                    "output_past", "task_specific_params", "tokenizer_class", "gradient_checkpointing",
                    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id")
# Keys with the one value jaxgen's model has: model_type always, the others where present.
FIXED = {"model_type": "t5", "architectures": [ARCHITECTURE], "is_encoder_decoder": True, "is_decoder": False,
         "is_gated_act": True}


def is_t5_dir(directory: str | pathlib.Path) -> bool:
    """Whether `directory`'s config.json is a T5's (so `jaxgen import` reads it here)."""
    try:
        return json.loads((pathlib.Path(directory) / "config.json").read_text()).get("model_type") == "t5"
    except (OSError, ValueError, AttributeError):
        return False  # hf_import reports what is wrong with it


# ----------------------------------------------------------------------------- names and tensors

# (T5 sub-layer name, jaxgen path under the stack's `layers`, transposed) of each block's tensors.
_SELF = [("0.layer_norm.weight", "attn_norm/scale", False)] + [
    (f"0.SelfAttention.{name}.weight", f"attn/w{name}/kernel", True) for name in "qkvo"]
_CROSS = [("1.layer_norm.weight", "cross_norm/scale", False)] + [
    (f"1.EncDecAttention.{name}.weight", f"cross_attn/w{name}/kernel", True) for name in "qkvo"]


def _mlp(index: int) -> list[tuple[str, str, bool]]:
    return [(f"{index}.layer_norm.weight", "mlp_norm/scale", False),
            (f"{index}.DenseReluDense.wi_0.weight", "mlp/w_gate/kernel", True),
            (f"{index}.DenseReluDense.wi_1.weight", "mlp/w_up/kernel", True),
            (f"{index}.DenseReluDense.wo.weight", "mlp/w_down/kernel", True)]


BLOCKS = {"encoder": _SELF + _mlp(1), "decoder": _SELF + _CROSS + _mlp(2)}


def t5_plan(model: EncoderDecoderConfig, flat: dict, head_from_embedding: bool = False) -> list[HFTensor]:
    """Every T5 tensor of the model whose parameters (or abstract ones) are `flat`, by path.

    `head_from_embedding`: the untied output layer is read from `shared.weight` (a tied, unscaled checkpoint).
    """
    def shape(path: str, per_layer: bool, transpose: bool) -> tuple[int, ...]:
        dims = tuple(flat[path].shape[1:] if per_layer else flat[path].shape)
        return dims[::-1] if transpose else dims

    plan = [HFTensor("shared.weight", "embed", None, False, shape("embed", False, False))]
    for stack, n_layers in (("encoder", model.n_layers), ("decoder", model.decoder_layers)):
        table = f"{stack}/relative_bias"
        plan.append(HFTensor(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", table, None,
                             False, shape(table, False, False)))
        for i, (name, path, transpose) in itertools.product(range(n_layers), BLOCKS[stack]):
            path = f"{stack}/layers/{path}"
            plan.append(HFTensor(f"{stack}.block.{i}.layer.{name}", path, i, transpose, shape(path, True, transpose)))
        plan.append(HFTensor(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale", None, False,
                             shape(f"{stack}/final_norm/scale", False, False)))
    if not model.tie_embeddings:
        name = "shared.weight" if head_from_embedding else "lm_head.weight"
        plan.append(HFTensor(name, "lm_head/kernel", None, True, shape("lm_head/kernel", False, True)))
    return plan


# ----------------------------------------------------------------------------- config.json


def t5_config(model: EncoderDecoderConfig, tokenizer: Tokenizer) -> dict:
    """T5ForConditionalGeneration's config.json for the model and its tokenizer."""
    if model.kind != "encoder_decoder":
        raise ExportError(f"T5ForConditionalGeneration is an encoder-decoder, but model.kind={model.kind!r}")
    if tokenizer.vocab_size > model.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{model.vocab_size}; the tokenizer does not belong to this model")
    start = tokenizer.bos_id if model.decoder_start_id is None else model.decoder_start_id
    feed_forward = {"gelu_tanh": "gated-gelu", "silu": "gated-silu"}[model.mlp_activation]
    return {
        "architectures": [ARCHITECTURE], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": model.vocab_size, "d_model": model.d_model, "d_kv": model.resolved_head_dim,
        "d_ff": model.d_ff, "num_layers": model.n_layers, "num_decoder_layers": model.decoder_layers,
        "num_heads": model.n_heads, "relative_attention_num_buckets": model.relative_buckets,
        "relative_attention_max_distance": model.relative_max_distance, "layer_norm_epsilon": model.norm_eps,
        "feed_forward_proj": feed_forward, "dense_act_fn": DENSE_ACT_FN[model.mlp_activation],
        "is_gated_act": True, "initializer_factor": model.init_std, "dropout_rate": 0.0,
        # transformers 5 reads the output scaling from scale_decoder_outputs, older ones from tie_word_embeddings.
        "tie_word_embeddings": model.tie_embeddings, "scale_decoder_outputs": model.tie_embeddings,
        "decoder_start_token_id": start, "eos_token_id": tokenizer.eos_id, "pad_token_id": 0,
        "use_cache": True,
    }


def read_t5_config(directory: pathlib.Path, stored: dict) -> tuple[EncoderDecoderConfig, str | None, bool]:
    """jaxgen's model config, the dtype config.json declares, and whether the output layer is read from the embedding.

    `stored` (the checkpoint's tensors) says whether the output layer is tied.
    """
    path = file_inside(directory, "config.json", "config file")
    if not path.is_file():
        raise ExportError(f"{str(directory)!r} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as err:
        raise ExportError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(hf, dict):
        raise ExportError(f"{path} must hold a JSON object, not {type(hf).__name__}")
    for key, wanted in FIXED.items():
        if (key in hf or key == "model_type") and hf.get(key) != wanted:
            raise ExportError(f"{path}: {key}={hf.get(key)!r} is not supported; jaxgen imports {ARCHITECTURE} "
                              f"checkpoints ({key}={wanted!r})")
    activation = _activation(hf, path)
    scaled = _flag(hf, "scale_decoder_outputs", _flag(hf, "tie_word_embeddings", True, path), path)
    own_head = "lm_head.weight" in stored
    if own_head and scaled:
        raise ExportError(f"{path}: the decoder's output is scaled by d_model ** -0.5 (tie_word_embeddings or "
                          "scale_decoder_outputs true) but the checkpoint has its own lm_head.weight; jaxgen "
                          "scales only an output layer tied to the embedding")
    known = {*FIELDS, *FIXED, *DESCRIPTIVE_KEYS, "feed_forward_proj", "dense_act_fn", "tie_word_embeddings",
             "scale_decoder_outputs"}
    # An option switched off (null or false) changes nothing; any other is one jaxgen would have to drop.
    if unknown := [key for key, value in hf.items() if key not in known and value is not None and value is not False]:
        raise ExportError(f"{path}: key {unknown[0]!r} = {hf[unknown[0]]!r} is a T5 option jaxgen's encoder-decoder "
                          "does not have, so the model cannot be imported faithfully")
    values = {**DEFAULTS, **{key: value for key, value in hf.items() if key in FIELDS and value is not None}}
    fields = {FIELDS[key]: value for key, value in values.items()}
    fields.update(kind="encoder_decoder", mlp_activation=activation, tie_embeddings=scaled and not own_head)
    try:
        model = EncoderDecoderConfig.model_validate(fields, strict=True)
    except pydantic.ValidationError as err:
        raise ExportError(f"{path}: " + "; ".join(_in_t5_terms(e) for e in err.errors())) from None
    return model, declared_dtype(hf, path), not own_head and not scaled


def _activation(hf: dict, path: pathlib.Path) -> str:
    proj = hf.get("feed_forward_proj", "relu")  # T5Config's default: T5 v1.0
    if proj not in FEED_FORWARD:
        version = " (T5 v1.0's ungated MLP)" if not str(proj).startswith("gated-") else ""
        raise ExportError(f"{path}: feed_forward_proj={proj!r}{version} is not supported; jaxgen's encoder-decoder "
                          f"has a gated MLP: {', '.join(map(repr, FEED_FORWARD))}")
    activation = FEED_FORWARD[proj]
    if hf.get("dense_act_fn", DENSE_ACT_FN[activation]) != DENSE_ACT_FN[activation]:
        raise ExportError(f"{path}: dense_act_fn={hf['dense_act_fn']!r} contradicts feed_forward_proj={proj!r} "
                          f"(which means {DENSE_ACT_FN[activation]!r})")
    return activation


def _flag(hf: dict, key: str, default: bool, path: pathlib.Path) -> bool:
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise ExportError(f"{path}: key {key!r} = {value!r}: expected true or false")
    return value


def _in_t5_terms(error: dict) -> str:
    return in_config_json_terms(error, {field: key for key, field in FIELDS.items()})


# ----------------------------------------------------------------------------- export


def export_t5(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """A directory `transformers.T5ForConditionalGeneration.from_pretrained` loads, with the run's tokenizer.

    The tokenizer's sentinels (<extra_id_0>, ...) go out as `hf_tokenizer` writes pieces trained whole:
    added tokens, found whole in any text, not special (so `split_special_tokens` leaves them whole).
    """
    tokenizer = load_tokenizer(run.run_dir)
    config = t5_config(run.cfg.model, tokenizer)  # refuse before writing anything
    check_exportable(tokenizer)
    refuse_nonempty_output(out)
    flat = flat_params(run.weights.params[MAIN_GROUP])
    generation = {key: config[key] for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id")}

    def write_rest(directory: pathlib.Path) -> None:
        (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_hf_tokenizer(tokenizer, directory, run.cfg.data.seq_len)
        frame_texts(directory, tokenizer, bos=False, eos=True)  # inputs are text EOS, as trained

    return write_planned(out, flat, t5_plan(run.cfg.model, flat), dtype, max_shard_bytes, write_rest)


# ----------------------------------------------------------------------------- import


def import_t5(source: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A jaxgen run directory (config, tokenizer, the parameters as checkpoint 0) from a local T5 checkpoint.

    The parameters are placed as training places them; fine-tune from them with `checkpoint.init_from=OUT`.
    """
    source, out = pathlib.Path(source), pathlib.Path(out)
    refuse_nonempty_output(out)
    stored = stored_tensors(source)
    model, declared_dtype, head_from_embedding = read_t5_config(source, stored)
    tokenizer = checked_tokenizer(source, model.vocab_size)
    kept_as = out / tokenizer.file_name
    cfg = Config(model=model, data={"tokenizer": str(kept_as)})
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    layout = plan_models(make_task(cfg), make_mesh(cfg.mesh), rules, cfg.train.seed)  # nothing allocated yet
    plan = t5_plan(model, flat_params(layout.abstract[MAIN_GROUP]), head_from_embedding)
    check_tensors(source, plan, stored, declared_dtype)

    with building(out) as partial:
        params = imported_params(layout, plan, stored)
        keep_tokenizer(tokenizer, partial)
        save_imported_run(partial, cfg, params, source, inputs={
            "tokenizer_sha256": tokenizer.sha256, "tokenizer_path": str(kept_as), "tokenizer_kind": tokenizer.kind})
    log.info("imported %s into %s", source, out)
    return out
