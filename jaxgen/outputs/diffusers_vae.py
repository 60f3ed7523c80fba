"""The autoencoder in diffusers' AutoencoderKL format: export to it, import from it.

jaxgen's parameter paths are diffusers' state-dict names (`models/autoencoder.py`),
so the mapping is mechanical: `/` becomes `.`, a kernel or a GroupNorm scale is
a `weight`, convolution kernels go HWIO <-> OIHW and projection kernels
(in, out) <-> (out, in). The tests load exports with
`diffusers.AutoencoderKL.from_pretrained` and compare encodings and decodings.

An import trusts nothing, as `hf_import` does: config.json is read key by key
(a key jaxgen's model cannot honour is refused, never dropped), and every
tensor's name, shape and dtype is checked from the safetensors headers before
anything is written or allocated.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pydantic

from jaxgen.config import IMAGE_SOURCES, AutoencoderConfig, Config
from jaxgen.errors import ExportError
from jaxgen.files import building
from jaxgen.outputs.export import DEFAULT_MAX_SHARD_BYTES, EXPORT_DTYPES, refuse_nonempty_output, to_host
from jaxgen.outputs.hf_families import flat_params
from jaxgen.outputs.hf_import import check_tensors, in_config_json_terms
from jaxgen.outputs.runs import OpenedRun, save_imported_run
from jaxgen.outputs.safetensors_stream import file_inside, read_tensor, stored_tensors, write_sharded
from jaxgen.sharding import make_mesh, param_path, resolve_rules
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP, plan_models

log = logging.getLogger("jaxgen")

CLASS_NAME = "AutoencoderKL"
DIFFUSERS_VERSION = "0.35.0"  # the release whose AutoencoderKL layout this follows
WEIGHTS_STEM = "diffusion_pytorch_model"
DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
# config.json key -> AutoencoderConfig field, where one holds the other's value as is.
FIELDS = {"block_out_channels": "block_channels", "layers_per_block": "layers_per_block",
          "latent_channels": "latent_channels", "norm_num_groups": "norm_groups", "sample_size": "image_size",
          "scaling_factor": "scaling_factor", "shift_factor": "shift_factor",
          "mid_block_add_attention": "mid_attention"}
# Keys that describe the file, not the model; force_upcast tells pipelines to run the VAE in float32.
DESCRIPTIVE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "force_upcast")


def is_diffusers_vae(directory: str | pathlib.Path) -> bool:
    """Whether `directory`'s config.json names diffusers' AutoencoderKL (so `jaxgen import` reads it here)."""
    path = pathlib.Path(directory) / "config.json"
    try:
        return json.loads(path.read_text()).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False  # hf_import reports what is wrong with it


# ----------------------------------------------------------------------------- names and tensors


class VAETensor(NamedTuple):
    hf_name: str  # diffusers' state-dict name
    path: str  # of the jaxgen parameter
    hf_shape: tuple[int, ...]


def diffusers_name(path: str) -> str:
    """`encoder/down_blocks/0/resnets/1/norm1/scale` -> `encoder.down_blocks.0.resnets.1.norm1.weight`."""
    *module, leaf = path.split("/")
    return ".".join([*module, "bias" if leaf == "bias" else "weight"])


def to_diffusers(array: np.ndarray) -> np.ndarray:
    """A jaxgen parameter as PyTorch stores it: convolution kernels HWIO -> OIHW, projections (in, out) -> (out, in)."""
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T if array.ndim == 2 else array


def from_diffusers(array: np.ndarray) -> np.ndarray:
    """The inverse of `to_diffusers`."""
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T if array.ndim == 2 else array


def diffusers_plan(flat: dict) -> list[VAETensor]:
    """Every diffusers tensor of the model whose parameters (or abstract ones) are `flat`, by path."""
    shape = lambda s: tuple(to_diffusers(np.empty(s, np.bool_)).shape)
    return [VAETensor(diffusers_name(path), path, shape(leaf.shape)) for path, leaf in flat.items()]


# ----------------------------------------------------------------------------- config.json


def diffusers_config(model: AutoencoderConfig) -> dict:
    """AutoencoderKL's config.json for the model; refuses other model kinds with the format that suits them."""
    if model.kind != "autoencoder":
        raise ExportError(f"--format diffusers writes diffusers' AutoencoderKL, but model.kind={model.kind!r}; "
                          "use --format " + ("hf" if model.kind == "transformer" else "safetensors"))
    levels = len(model.block_channels)
    return {
        "_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": model.channels, "out_channels": model.channels,
        "down_block_types": [DOWN_BLOCK] * levels, "up_block_types": [UP_BLOCK] * levels,
        "block_out_channels": list(model.block_channels), "layers_per_block": model.layers_per_block,
        "act_fn": "silu", "latent_channels": model.latent_channels, "norm_num_groups": model.norm_groups,
        "sample_size": model.image_size, "scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor,
        "latents_mean": None, "latents_std": None, "force_upcast": True,
        "use_quant_conv": model.quant_conv, "use_post_quant_conv": model.quant_conv,
        "mid_block_add_attention": model.mid_attention,
    }


def read_diffusers_config(directory: pathlib.Path) -> AutoencoderConfig:
    """jaxgen's model config from an AutoencoderKL config.json, refusing whatever jaxgen's model cannot represent."""
    path = file_inside(directory, "config.json", "config file")
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} cannot be read as JSON: {err}") from None
    if not isinstance(hf, dict) or hf.get("_class_name") != CLASS_NAME:
        raise ExportError(f"{path} does not describe a diffusers {CLASS_NAME}")
    fixed = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
    for key, wanted in fixed.items():
        if key in hf and hf[key] != wanted:
            raise ExportError(f"{path}: {key}={hf[key]!r} is not supported by jaxgen's autoencoder (only {wanted!r})")
    widths = hf.get("block_out_channels", [64])  # AutoencoderKL's defaults, here and below
    if not isinstance(widths, list) or not widths:
        raise ExportError(f"{path}: key 'block_out_channels' = {widths!r}: expected a list of channel counts")
    levels = len(widths)
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        if hf.get(key, [block]) != [block] * levels:
            raise ExportError(f"{path}: {key}={hf.get(key)!r} is not supported; jaxgen's autoencoder has "
                              f"{block} on every level ({levels}, one per block_out_channels)")
    channels = hf.get("in_channels", 3)
    if hf.get("out_channels", 3) != channels:
        raise ExportError(f"{path}: in_channels={channels} and out_channels={hf.get('out_channels', 3)} differ; "
                          "jaxgen's autoencoder reconstructs the channels it reads")
    quant = hf.get("use_quant_conv", True)
    if hf.get("use_post_quant_conv", True) != quant:
        raise ExportError(f"{path}: use_quant_conv={quant} and use_post_quant_conv={hf.get('use_post_quant_conv')} "
                          "differ; jaxgen's model.quant_conv has both or neither")
    known = {*FIELDS, *fixed, *DESCRIPTIVE_KEYS, "down_block_types", "up_block_types", "in_channels", "out_channels",
             "use_quant_conv", "use_post_quant_conv"}
    if unknown := [key for key in hf if key not in known]:
        raise ExportError(f"{path}: key {unknown[0]!r} = {hf[unknown[0]]!r} is an {CLASS_NAME} option jaxgen's "
                          "autoencoder does not have, so the model cannot be imported faithfully")
    defaults = {"layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
                "scaling_factor": 0.18215, "mid_block_add_attention": True}
    values = {**defaults, **{key: value for key, value in hf.items() if key in FIELDS}}
    fields = {**{FIELDS[key]: value for key, value in values.items()}, "block_channels": tuple(widths)}
    try:
        return AutoencoderConfig.model_validate({**fields, "channels": channels, "quant_conv": quant}, strict=True)
    except pydantic.ValidationError as err:
        raise ExportError(f"{path}: " + "; ".join(_in_diffusers_terms(e) for e in err.errors())) from None


def _in_diffusers_terms(error: dict) -> str:
    to_key = {field: key for key, field in FIELDS.items()} | {"channels": "in_channels", "quant_conv": "use_quant_conv"}
    return in_config_json_terms(error, to_key)


# ----------------------------------------------------------------------------- export


def export_diffusers(run: OpenedRun, out: str | pathlib.Path, dtype: str = "float32",
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """A directory `diffusers.AutoencoderKL.from_pretrained` loads."""
    config = diffusers_config(run.cfg.model)
    refuse_nonempty_output(out)
    target = EXPORT_DTYPES[dtype]
    flat = flat_params(run.weights.params[MAIN_GROUP])
    by_name = {t.hf_name: t for t in diffusers_plan(flat)}
    specs = [(name, t.hf_shape, target) for name, t in by_name.items()]

    def fetch(name: str) -> np.ndarray:
        return to_diffusers(to_host(flat[by_name[name].path].astype(jnp.float32))).astype(target)

    if jax.process_index() == 0:
        with building(out) as partial:
            write_sharded(partial, WEIGHTS_STEM, specs, fetch, max_shard_bytes)
            (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:  # every process takes part in gathering sharded tensors
        for name, *_ in specs:
            fetch(name)
    return pathlib.Path(out)


# ----------------------------------------------------------------------------- import


def import_diffusers(source: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """A jaxgen run directory (config, the parameters as checkpoint 0) from a local diffusers AutoencoderKL.

    The parameters are placed as training places them; fine-tune from them with `checkpoint.init_from=OUT`.
    """
    source, out = pathlib.Path(source), pathlib.Path(out)
    refuse_nonempty_output(out)
    model = read_diffusers_config(source)
    stored = stored_tensors(source, WEIGHTS_STEM)
    cfg = Config(model=model, images=_images_for(model))
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    layout = plan_models(make_task(cfg), make_mesh(cfg.mesh), rules, cfg.train.seed)  # nothing allocated yet
    plan = diffusers_plan(flat_params(layout.abstract[MAIN_GROUP]))
    check_tensors(source, plan, stored, None)
    by_path = {t.path: t for t in plan}

    def load(key_path: tuple, abstract: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding) -> jax.Array:
        name = by_path[param_path(key_path)].hf_name
        host = from_diffusers(read_tensor(name, stored[name])).astype(abstract.dtype)  # widens float16/bfloat16
        return jax.device_put(np.ascontiguousarray(host), sharding)

    with building(out) as partial:
        params = {MAIN_GROUP: jax.tree_util.tree_map_with_path(load, layout.abstract[MAIN_GROUP],
                                                               layout.shardings[MAIN_GROUP])}
        save_imported_run(partial, cfg, params, source, inputs={})
    log.info("imported %s into %s", source, out)
    return out


def _images_for(model: AutoencoderConfig) -> dict:
    """A built-in image source of the model's shape, else none: a command that reads images then asks for some
    (naming the import's own directory as an image folder sent `jaxgen eval` looking for images in it)."""
    for name, (side, channels, _) in IMAGE_SOURCES.items():
        if (side, channels) == (model.image_size, model.channels):
            return {"source": name}
    log.info("no built-in image source has the model's %dx%dx%d images: give yours (images.source=folder "
             "images.folder=DIR, or idx, tfds) to evaluate or fine-tune it", model.image_size, model.image_size,
             model.channels)
    return {"source": "none"}
