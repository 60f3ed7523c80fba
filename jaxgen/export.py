"""Weights out: raw safetensors for any model, Hugging Face Llama format for LMs.

Tensors move one at a time (device -> host -> file), so the host never holds
the whole model twice. The output directory is built under a hidden name and
renamed into place when complete, so a killed export leaves nothing that looks
finished. The Hugging Face layout is checked by loading it into `transformers`
in the tests: the logits match jaxgen's and its tokenizer splits and decodes text
exactly as jaxgen's does. Importing it back is `jaxgen.hf_import`.
"""

from __future__ import annotations

import base64
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
from sentencepiece import sentencepiece_model_pb2

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
# No max_length: generate(max_new_tokens=...) would warn of the conflict. EOS pads finished
# sequences, as generate assumes (with a warning, in some versions) when pad_token_id is unset.
GENERATION_CONFIG = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}


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


# ----------------------------------------------------------------------------- tokenizer

Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
TrainerSpec = sentencepiece_model_pb2.TrainerSpec


def sentencepiece_model(path: pathlib.Path) -> sentencepiece_model_pb2.ModelProto:
    """The run's tokenizer, refused unless `hf_tokenizer_json` reproduces it exactly."""
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist; a Hugging Face export needs the run's tokenizer")
    model = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    norm, trainer = model.normalizer_spec, model.trainer_spec
    unsupported = {
        f"model_type={TrainerSpec.ModelType.Name(trainer.model_type)}":
            trainer.model_type not in (TrainerSpec.BPE, TrainerSpec.UNIGRAM),
        "byte_fallback=False": not trainer.byte_fallback,
        "remove_extra_whitespaces=True": norm.remove_extra_whitespaces,
        "escape_whitespaces=False": not norm.escape_whitespaces,
        "treat_whitespace_as_suffix=True": trainer.treat_whitespace_as_suffix,
        "user-defined or unused pieces": any(p.type in (Piece.USER_DEFINED, Piece.UNUSED) for p in model.pieces),
    }
    if found := [setting for setting, present in unsupported.items() if present]:
        raise ExportError(
            f"tokenizer {str(path)!r} has {', '.join(found)}, which a Hugging Face tokenizer cannot reproduce; "
            "use --format safetensors, or a tokenizer from `jaxgen tokenizer train` for the next run"
        )
    return model


def hf_tokenizer_json(model: sentencepiece_model_pb2.ModelProto) -> dict:
    """A tokenizer.json that encodes and decodes exactly as sentencepiece does with `model`.

    Written here rather than converted by transformers, whose Llama tokenizer prepends the
    dummy-prefix space only to text that does not already start with one ("  x" loses a space).
    Sentencepiece normalises the whole text (prefix space, spaces to "▁") and runs its model
    over it without splitting words: the highest-scored pair merges first (BPE), or the best
    path over the piece scores wins (unigram).
    """
    pieces, trainer, norm = model.pieces, model.trainer_spec, model.normalizer_spec
    normal = {p.piece: i for i, p in enumerate(pieces) if p.type == Piece.NORMAL}
    if trainer.model_type == TrainerSpec.BPE:
        # Each piece from any two pieces, highest-scored piece first: tokenizers merges by rank.
        merges = [[piece[:i], piece[i:]] for piece in sorted(normal, key=lambda p: -pieces[normal[p]].score)
                  for i in range(1, len(piece)) if piece[:i] in normal and piece[i:] in normal]
        backend = {"type": "BPE", "dropout": None, "unk_token": pieces[trainer.unk_id].piece,
                   "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                   "byte_fallback": True, "ignore_merges": False,
                   "vocab": {p.piece: i for i, p in enumerate(pieces)}, "merges": merges}
    else:
        # Sentencepiece never finds control or byte pieces ("<s>", "<0x41>") in text; tokenizers'
        # unigram would. Scored below any spelling of their text in normal pieces, they never win.
        lowest = min(pieces[i].score for i in normal.values())
        vocab = [[p.piece, p.score if p.type == Piece.NORMAL else (len(p.piece) + 1) * lowest] for p in pieces]
        backend = {"type": "Unigram", "unk_id": trainer.unk_id, "byte_fallback": True, "vocab": vocab}
    normalizers = [{"type": "Prepend", "prepend": "▁"}] if norm.add_dummy_prefix else []
    if norm.precompiled_charsmap:
        charsmap = base64.b64encode(norm.precompiled_charsmap).decode()
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = pieces[trainer.bos_id].piece
    first, second = ([{"SpecialToken": {"id": bos, "type_id": type_id}}, {"Sequence": {"id": seq, "type_id": type_id}}]
                     for type_id, seq in enumerate("AB"))
    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, p in enumerate(pieces) if p.type in (Piece.CONTROL, Piece.UNKNOWN)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": first, "pair": first + second,
                           "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": decoders}, "model": backend,
    }


def write_hf_tokenizer(tokenizer_path: pathlib.Path, out: pathlib.Path, max_len: int) -> None:
    """Tokenizer files with which `transformers.AutoTokenizer` tokenizes exactly like jaxgen.

    Like jaxgen, it reads "<s>" in text as text (split_special_tokens) and starts each
    sequence with BOS. EOS pads, on the left, for batched generation.
    """
    model = sentencepiece_model(tokenizer_path)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    (out / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(model), ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    names, trainer = [p.piece for p in model.pieces], model.trainer_spec
    special = {"bos_token": names[trainer.bos_id], "eos_token": names[trainer.eos_id],
               "unk_token": names[trainer.unk_id], "pad_token": names[trainer.eos_id]}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {  # PreTrainedTokenizerFast takes tokenizer.json as it is; LlamaTokenizer rebuilds its normaliser
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
        "split_special_tokens": True, "padding_side": "left", "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
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
    sentencepiece_model(run.run_dir / "tokenizer.model")
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
            (partial / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
            write_hf_tokenizer(run.run_dir / "tokenizer.model", partial, run.cfg.model.max_seq_len)
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
        sentencepiece_model(pathlib.Path(run_dir) / "tokenizer.model")
    refuse_nonempty_output(out)  # before the restore, the expensive part
    run = open_run(run_dir, step, overrides)
    writer = export_hf if fmt == "hf" else export_safetensors
    path = writer(run, out, dtype)
    log.info("exported step %d of %s to %s (%s, %s)", run.step, run_dir, path, fmt, dtype)
    return path
