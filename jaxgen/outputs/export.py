"""Weights out: raw safetensors for any model, Hugging Face format for LMs (the model's family: Llama, Mistral,
Qwen2, Qwen3 or Gemma 2) and for encoders (BertForMaskedLM, `hf_bert`) and encoder-decoders
(T5ForConditionalGeneration, `hf_t5`), diffusers' AutoencoderKL for the autoencoder (`diffusers_vae`).

Tensors move one at a time (device -> host -> file), so the host never holds
the whole model twice. The output directory is built under a hidden name and
renamed into place when complete, so a killed export leaves nothing that looks
finished. The Hugging Face layout is checked by loading it into `transformers`
in the tests: the logits match jaxgen's and its tokenizer splits and decodes text
exactly as jaxgen's does. Importing it back is `jaxgen.outputs.hf_import`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from jaxgen.data.tokenizer import Tokenizer, kept_tokenizer_files, load_tokenizer, tokenizer_file_in
from jaxgen.errors import ExportError, listed
from jaxgen.files import building
from jaxgen.outputs.hf_families import HFTensor, flat_params, hf_config, hf_plan
from jaxgen.outputs.hf_tokenizer import check_exportable, write_hf_tokenizer
from jaxgen.outputs.run_dir_check import check_step, require_checkpoint
from jaxgen.outputs.runs import OpenedRun, load_run_config, open_run, overridden_model_settings
from jaxgen.outputs.safetensors_stream import write_sharded
from jaxgen.tasks.layout import MAIN_GROUP

log = logging.getLogger("jaxgen")

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
# The formats each model.kind exports to (every kind: safetensors), so a format that does not fit names those that do.
FORMATS = {"transformer": ("hf", "safetensors"), "encoder": ("hf", "safetensors"),
           "encoder_decoder": ("hf", "safetensors"), "autoencoder": ("diffusers", "safetensors")}


def formats_for(kind: str) -> str:
    """'--format hf or --format safetensors': what a model of `kind` can be exported as."""
    return " or ".join(f"--format {fmt}" for fmt in FORMATS.get(kind, ("safetensors",)))


def special_token_ids(tokenizer: Tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def generation_config(tokenizer: Tokenizer) -> dict:
    # No max_length: generate(max_new_tokens=...) would warn of the conflict. EOS pads finished
    # sequences, as generate assumes (with a warning, in some versions) when pad_token_id is unset.
    return {**special_token_ids(tokenizer), "pad_token_id": tokenizer.eos_id}


def to_host(array: jax.Array) -> np.ndarray:
    """A whole tensor on this host, gathered across processes when it is sharded over them."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def refuse_nonempty_output(out: str | pathlib.Path) -> None:
    """Refuse, before any work, an output that `files.building` could not rename into place."""
    out = pathlib.Path(out)
    if out.is_symlink():  # a link cannot be replaced by the directory built beside it
        raise ExportError(f"output {str(out)!r} is a symbolic link (to {os.readlink(out)!r}); name the directory "
                          "itself, or a new one")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"output {str(out)!r} exists and is not an empty directory; name a new or empty one")
    if out.is_dir() and os.path.ismount(out):
        raise ExportError(f"output {str(out)!r} is a mount point, which the output (built beside it, then renamed "
                          f"into place) cannot replace; name a new directory inside it, e.g. {str(out / 'export')!r}")


def refuse_output_inside(out: str | pathlib.Path, source: str | pathlib.Path, source_flag: str) -> None:
    """Refuse an output inside the directory it is made from, which would then hold a copy of itself."""
    inner, outer = pathlib.Path(os.path.realpath(out)), pathlib.Path(os.path.realpath(source))
    if outer in inner.parents:
        raise ExportError(f"--out {str(out)!r} lies inside {source_flag} {str(source)!r}, the directory it is made "
                          "from; name a directory outside it")


def export_hf(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """A directory `transformers.AutoModelForCausalLM.from_pretrained` loads."""
    tokenizer = load_tokenizer(run.run_dir)
    config = {**hf_config(run.cfg), **special_token_ids(tokenizer)}  # refuse before writing anything
    check_exportable(tokenizer)
    refuse_nonempty_output(out)
    flat = flat_params(run.weights.params[MAIN_GROUP])

    def write_rest(directory: pathlib.Path) -> None:
        (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
        (directory / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
        write_hf_tokenizer(tokenizer, directory, run.cfg.model.max_seq_len)

    return write_planned(out, flat, hf_plan(run.cfg.model, flat), dtype, max_shard_bytes, write_rest)


def write_planned(out: str | pathlib.Path, flat: dict, plan: list[HFTensor], dtype: str, max_shard_bytes: int,
                  write_rest: Callable[[pathlib.Path], None],
                  constants: dict[str, np.ndarray] | None = None) -> pathlib.Path:
    """The tensors `plan` names (each renamed, sliced to its layer, transposed as planned) and `constants`
    streamed into safetensors files under `out`, then `write_rest(directory)` (config, tokenizer).

    `out` is built under a hidden name and renamed into place when complete. Every process takes part in
    gathering sharded tensors; process 0 writes.
    """
    target = EXPORT_DTYPES[dtype]
    by_name = {t.hf_name: t for t in plan}
    constants = constants or {}
    specs = [(t.hf_name, t.hf_shape, target) for t in plan] + [(name, c.shape, target) for name, c in constants.items()]

    def fetch(name: str) -> np.ndarray:
        if name in constants:
            return constants[name].astype(target)
        t = by_name[name]
        host = to_host((flat[t.path] if t.layer is None else flat[t.path][t.layer]).astype(jnp.float32))
        return (host.T if t.transpose else host).astype(target)

    if jax.process_index() == 0:
        with building(out) as partial:
            write_sharded(partial, "model", specs, fetch, max_shard_bytes)
            write_rest(partial)
    else:
        for name, *_ in specs:
            fetch(name)
    return pathlib.Path(out)


def export_safetensors(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """The raw parameters of every model group, keys like `model/layers/attn/wq/kernel`, plus jaxgen's config."""
    refuse_nonempty_output(out)
    target = EXPORT_DTYPES[dtype]
    flat = flat_params(run.weights.params)
    specs = [(path, tuple(array.shape), target) for path, array in flat.items()]
    fetch = lambda path: to_host(flat[path].astype(jnp.float32)).astype(target)  # noqa: E731
    if jax.process_index() == 0:
        with building(out) as partial:
            write_sharded(partial, "model", specs, fetch, max_shard_bytes)
            (partial / "config.yaml").write_text(run.cfg.to_yaml())
            for path in kept_tokenizer_files(run.run_dir):
                if path.exists():
                    shutil.copyfile(path, partial / path.name)
    else:
        for path, *_ in specs:
            fetch(path)
    return pathlib.Path(out)


def run_tokenizer(run_dir: str | pathlib.Path) -> Tokenizer:
    """The run's tokenizer; a run without one that holds no checkpoint either is reported as that."""
    if tokenizer_file_in(pathlib.Path(run_dir)) is None:
        require_checkpoint(pathlib.Path(run_dir))  # e.g. killed before it saved anything
    return load_tokenizer(run_dir)


def export_run(run_dir: str | pathlib.Path, out: str | pathlib.Path, fmt: str = "hf", dtype: str = "float32",
               step: int | None = None, overrides: list[str] = ()) -> pathlib.Path:
    if fmt not in ("hf", "safetensors", "diffusers"):
        raise ExportError(f"unknown export format {fmt!r}; valid: hf, safetensors, diffusers")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; valid: {', '.join(EXPORT_DTYPES)}")
    writer = export_safetensors
    if fmt == "hf":
        cfg = load_run_config(run_dir, overrides)
        if cfg.model.kind == "autoencoder":
            raise ExportError("model.kind='autoencoder' has no Hugging Face transformers equivalent; "
                              "use --format diffusers (diffusers' AutoencoderKL) or --format safetensors")
        writer = export_hf
        if cfg.model.kind in ("encoder", "encoder_decoder"):  # their layouts build on this module
            from jaxgen.outputs.hf_bert import bert_config, export_bert
            from jaxgen.outputs.hf_t5 import export_t5, t5_config

            tokenizer = run_tokenizer(run_dir)
            if cfg.model.kind == "encoder":
                bert_config(cfg.model)  # switches BERT lacks fail here, before any restore
                writer = export_bert
            else:
                t5_config(cfg.model, tokenizer)
                writer = export_t5
        else:
            hf_config(cfg)  # a DiT fails here, before any restore
        check_exportable(run_tokenizer(run_dir))
    elif fmt == "diffusers":
        from jaxgen.outputs.diffusers_vae import diffusers_config, export_diffusers  # it builds on this module

        model = load_run_config(run_dir, overrides).model
        if model.kind != "autoencoder":
            raise ExportError(f"--format diffusers writes diffusers' AutoencoderKL, but model.kind={model.kind!r}; "
                              f"use {formats_for(model.kind)}")
        diffusers_config(model)  # a model AutoencoderKL cannot hold fails here, before any restore
        writer = export_diffusers
    refuse_nonempty_output(out)  # before the restore, the expensive part
    wanted = check_step(pathlib.Path(run_dir), step)
    if given := overridden_model_settings(pathlib.Path(run_dir), wanted, overrides):
        raise ExportError(f"{listed(given, 4)}: an export writes the model checkpoint {wanted} trained, and these "
                          "overrides would write another; drop them (to run it otherwise, edit the exported config)")
    run = open_run(run_dir, step, overrides)
    path = writer(run, out, dtype)
    log.info("exported step %d of %s to %s (%s, %s)", run.step, run_dir, path, fmt, dtype)
    return path
