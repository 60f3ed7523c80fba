"""Typed, frozen run configuration: YAML file + dotted `key=value` overrides.

The defaults below *are* the embedded default run (`jaxgen train` with no
arguments): a small Llama-style LM on the bundled King James Bible corpus.
Every user mistake becomes one `ConfigError` naming the key, the bad value and
what would be valid, before any device work starts.
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field


class ConfigError(ValueError):
    """A configuration the user wrote cannot be used; the message says why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"]


class TransformerConfig(_Section):
    """Decoder-only Llama-family LM."""

    kind: Literal["transformer"] = "transformer"
    vocab_size: int = Field(2048, gt=0)
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    # Fewer key/value heads than query heads gives grouped-query attention.
    n_kv_heads: int = Field(2, gt=0)
    head_dim: int | None = Field(None, gt=0, description="default d_model // n_heads")
    d_ff: int = Field(768, gt=0)
    max_seq_len: int = Field(128, gt=0)
    rope_theta: float = Field(10_000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    param_dtype: DType = "float32"
    # Matmul inputs are cast to this dtype; they always accumulate in float32.
    compute_dtype: DType = "float32"
    # Layers are stacked on a leading axis; scan compiles one layer, unrolling compiles all.
    scan_layers: bool = True
    remat: RematPolicy = "none"
    # "cudnn" selects the fused flash-attention kernel on NVIDIA GPUs.
    attention: Literal["xla", "cudnn"] = "xla"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @pydantic.model_validator(mode="after")
    def _check_heads(self) -> TransformerConfig:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dimension {self.resolved_head_dim} must be even for rotary embeddings")
        return self


class MeshConfig(_Section):
    """Device mesh sizes; one axis may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @pydantic.field_validator("data", "fsdp", "tensor")
    @classmethod
    def _positive_or_fill(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError(f"mesh size must be a positive integer or -1 (fill), got {v}")
        return v


class ShardingConfig(_Section):
    preset: Literal["dp", "fsdp", "tp", "fsdp_tp"] = "fsdp"
    # Logical axis -> mesh axis (or list of mesh axes, or null); overrides the preset's entries.
    rules: dict[str, str | list[str] | None] = Field(default_factory=dict)


class OptimizerConfig(_Section):
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    # Final learning rate as a fraction of the peak.
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    # Norm scales are never decayed; embeddings only when asked.
    decay_embeddings: bool = False
    clip_norm: float | None = Field(1.0, gt=0)


class DataConfig(_Section):
    # Text files (glob, .gz accepted); null = the bundled King James Bible.
    path: str | None = None
    # A sentencepiece model; null = train one on the training text into the run directory.
    tokenizer: str | None = None
    seq_len: int = Field(128, gt=0)
    # Global batch (all devices, all processes), in sequences.
    batch_size: int = Field(32, gt=0)
    # Every n-th document goes to the held-out split.
    eval_every_nth_doc: int = Field(50, ge=2)
    seed: int = 0


class TrainConfig(_Section):
    steps: int = Field(120, gt=0)
    # Gradient accumulation: the global batch is split into this many sequential microbatches.
    microbatches: int = Field(1, gt=0)
    seed: int = 0
    eval_every: int = Field(40, gt=0)
    eval_batches: int = Field(8, gt=0)
    # Per-device peak FLOP/s for MFU; null = known accelerator table, or measured on CPU.
    peak_flops_per_device: float | None = Field(None, gt=0)
    # Tokens generated from the final model as a sample; 0 disables.
    sample_tokens: int = Field(48, ge=0)
    sample_prompt: str = "And God said"


class LoggingConfig(_Section):
    every: int = Field(10, gt=0)
    tensorboard: bool = True
    progress_bar: bool = True


class Config(_Section):
    model: TransformerConfig = Field(default_factory=TransformerConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @pydantic.model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.data.batch_size % self.train.microbatches:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"train.microbatches={self.train.microbatches}"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.steps=50", "mesh.fsdp=4"]` -> nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=50)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML: {err}") from None
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[leaf] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then dotted overrides; validated once."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    raw = _deep_merge(raw, parse_overrides(list(overrides)))
    try:
        return Config.model_validate(raw)
    except pydantic.ValidationError as err:
        raise ConfigError(_explain(err)) from None


def _schema_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the last element of a validation-error location."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _explain(err: pydantic.ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if isinstance(p, str))
        dotted = ".".join(loc) or "<config>"
        if e["type"] == "extra_forbidden":
            holder = _schema_at(loc)
            valid = sorted(holder.model_fields) if holder else []
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            parent = ".".join(loc[:-1])
            hint = f"Did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else ""
            lines.append(
                f"unknown config key '{dotted}'. {hint} Valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}"
            )
        elif e["type"] == "value_error":
            lines.append(f"{dotted}: {e['msg'].removeprefix('Value error, ')}")
        else:
            holder = _schema_at(loc)
            field = holder.model_fields.get(loc[-1]) if holder and loc else None
            expected = _type_name(field.annotation) if field else "a valid value"
            lines.append(f"config key '{dotted}' = {e['input']!r}: {e['msg']} (expected {expected})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
