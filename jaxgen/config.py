"""Typed, frozen run configuration: YAML file + dotted `key=value` overrides.

The defaults below *are* the embedded default run (`jaxgen train` with no
arguments): a small Llama-style LM on the bundled King James Bible corpus.
Every user mistake becomes one `ConfigError` naming the key, the bad value and
what would be valid, before any device work starts.
"""

from __future__ import annotations

import difflib
import json
import pathlib
import types
import typing
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, Field

from jaxgen.config_adversarial import (  # noqa: F401
    AdversarialConfig,
    AutoencoderTrainingConfig,
    GANTrainingConfig,
    patchgan_side,
)
from jaxgen.config_conditioning import ConditioningConfig
from jaxgen.config_data import SOURCE_KINDS, DataConfig, SourceConfig  # noqa: F401
from jaxgen.config_encoders import EncoderConfig, EncoderDecoderConfig, MLMConfig, SpanConfig  # noqa: F401
from jaxgen.config_models import (  # noqa: F401  (the model sections are part of the config's interface)
    HF_FAMILIES,
    IMAGE_MODEL_KINDS,
    MODEL_CONFIGS,
    AttentionImpl,
    AutoencoderConfig,
    DiTConfig,
    DType,
    GANConfig,
    ModelConfig,
    RematPolicy,
    RopeScaling,
    TransformerConfig,
)
from jaxgen.config_optimizer import OptimizerConfig
from jaxgen.config_section import MAX_SEED
from jaxgen.config_section import Section as _Section
from jaxgen.config_text import MAX_CONFIG_BYTES, deep_merge, excerpt, load_yaml, parse_overrides
from jaxgen.errors import ConfigError, describe_os_error


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


class TrainConfig(_Section):
    steps: int = Field(120, gt=0)
    # Gradient accumulation: the global batch is split into this many sequential microbatches.
    microbatches: int = Field(1, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    eval_every: int = Field(40, gt=0)
    # The most global batches the held-out loss is measured on. They hold the held-out documents
    # (or images) each once, the last batch padded with zero weight: all of them when they fit in
    # this many batches, else a fixed sample. The run logs how many documents and tokens (or
    # images) that is.
    eval_batches: int = Field(8, gt=0)
    # Per-device peak FLOP/s for MFU; null = known accelerator table, or measured on CPU (the best of
    # this run's matmul measurements and of earlier runs' on this machine, kept in the user cache dir).
    peak_flops_per_device: float | None = Field(None, gt=0)
    # JAX's persistent compilation cache: compiled programs kept on disk, so a run that compiles what
    # an earlier one did (same model and shapes, JAX version and devices) loads them instead; compiling
    # is most of a small run's time to its first step. "auto": JAX's own setting where one is made
    # (JAX_COMPILATION_CACHE_DIR), else $XDG_CACHE_HOME/jaxgen/compilation (~/.cache/...): one cache
    # per user and machine, shared by every run whatever its directory (sweeps and the timestamped
    # default names are new directories each time), on local disk, and outside run directories that
    # get copied or archived. A path: that directory. null or "": no persistent cache. Every program
    # is cached, however quick to compile. Anyone who can write to the directory can make the runs
    # that read it run their code: keep it private. A process takes the setting at its first
    # compilation (every `jaxgen train` does; a notebook that compiled before keeps JAX's).
    compilation_cache_dir: str | None = "auto"
    # Tokens generated from the final model as a sample; 0 disables.
    sample_tokens: int = Field(48, ge=0)
    sample_prompt: str = "And God said"
    # A step whose loss, gradient or update (new params / optimizer state) is not finite:
    # "skip" keeps params and optimizer state as they were, warns and counts it;
    # "abort" stops the run (exit 1) without saving.
    nonfinite: Literal["skip", "abort"] = "skip"
    # Under "skip", this many skipped steps in a row stop the run (exit 1): it is not training.
    max_consecutive_nonfinite: int = Field(20, gt=0)
    # Benchmark tasks scored on the evaluated (EMA or current) parameters while training, named as
    # `jaxgen eval --tasks` names them (hellaswag, arc_easy, arc_challenge, piqa, lambada,
    # multiple_choice=FILE.jsonl); logged as <task>/acc, <task>/acc_norm (and <task>/perplexity).
    # Language models only; empty = none.
    eval_tasks: tuple[str, ...] = ()
    # Steps between task evaluations (the last step is always scored); null = train.eval_every.
    eval_tasks_every: int | None = Field(None, gt=0)
    # Directory holding the named tasks' files, as `jaxgen eval --task-data` (multiple_choice= files need none).
    eval_task_data: str | None = None

    @pydantic.field_validator("compilation_cache_dir")
    @classmethod
    def _cache_directory(cls, value: str | None) -> str | None:
        valid = "give a directory, 'auto', or null to disable the cache"
        if value and not value.strip():
            raise ValueError(f"{value!r} is blank; {valid}")
        if value and value != "auto" and pathlib.Path(value).expanduser().exists() \
                and not pathlib.Path(value).expanduser().is_dir():
            raise ValueError(f"{value!r} is a file, not a directory; {valid}")
        return value

    @pydantic.field_validator("eval_tasks", mode="before")
    @classmethod
    def _known_tasks(cls, names: Any) -> Any:
        from jaxgen.evals.tasks import parse_task_names

        if isinstance(names, str):  # train.eval_tasks=hellaswag,piqa
            names = [names]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            return names  # pydantic names the type
        try:
            return tuple(parse_task_names(list(names)))
        except ConfigError as err:
            raise ValueError(str(err)) from None


class CheckpointConfig(_Section):
    # Save every N steps and/or every M minutes (null disables either); the last step always saves.
    every: int | None = Field(100, gt=0)
    every_minutes: float | None = Field(None, gt=0)
    # Retention: the latest `keep` checkpoints, plus every step divisible by `keep_every`.
    keep: int = Field(3, gt=0)
    keep_every: int | None = Field(None, gt=0)
    # "auto": the same command with the same --run-dir continues from the latest checkpoint.
    resume: Literal["auto", "never"] = "auto"
    # Start from another run's parameters only (fine-tuning): a run directory or a checkpoint step directory.
    init_from: str | None = None
    # Write in the background while training continues.
    async_save: bool = True
    # How long a background save may take, all processes together, before it counts as failed. In a
    # multi-process run a write that fails on one process (its host's full disk) holds the others at the
    # save's end until then; checkpoint.async_save=false fails every process at once instead.
    save_timeout_minutes: float = Field(20.0, gt=0)


class ImagesConfig(_Section):
    """Image datasets for diffusion models: uint8 images and integer labels, scaled to [-1, 1] as they load."""

    # digits: sklearn's bundled 8x8 grey digits (10 classes); shapes: procedural 32x32 RGB shapes (6 classes);
    # tfds: a TFDS image dataset (images.tfds), whose size, channels and classes the model must match;
    # folder: PNG/JPEG files in images.folder (class sub-folders or a metadata.jsonl, see folder_images.py);
    # idx: MNIST-format IDX files in images.idx (Fashion-MNIST: apt-get install dataset-fashion-mnist,
    # images.idx=/usr/share/datasets/fashion-mnist).
    # latents: a latent dataset written by `jaxgen data prepare --images ... --autoencoder RUN --out DIR`
    # (images.latents=DIR): the frozen autoencoder's scaled latents, labels and captions, encoded once.
    # none: no images yet (an imported autoencoder whose image size no built-in source has); a command that
    # reads images then asks for a source.
    source: Literal["digits", "shapes", "tfds", "folder", "idx", "latents", "none"] = "digits"
    folder: str | None = None
    idx: str | None = None
    latents: str | None = None
    # images.source=folder: scale each image's shorter side to model.image_size and crop its centre;
    # false: every image must already be model.image_size square.
    resize: bool = True
    # images.source=folder: an unreadable image stops the run naming it (error), or is replaced by
    # the next readable image listed after it, with a warning (skip).
    bad_images: Literal["error", "skip"] = "error"
    # images.source=folder with a metadata.jsonl: the column holding each image's caption.
    caption_key: str = "text"
    # Every n-th image goes to the held-out split (digits, shapes; TFDS datasets have their own splits).
    # Evaluation reads the held-out images in order, each once, into at most train.eval_batches batches.
    eval_every_nth: int = Field(5, ge=2)
    # Sample-quality figures (Frechet distance, class accuracy) draw one sample per held-out image, for its
    # label, for the first this many held-out images; the real-data floor uses the same images.
    quality_images: int = Field(2000, gt=1)
    # Random horizontal flips of training images (not for digits, whose mirror images are other glyphs).
    hflip: bool = False
    # Number of images the procedural shapes source draws.
    shapes_count: int = Field(12_000, gt=0)
    # images.source=tfds: a dataset by name ("mnist", "name/config:1.0.0") already prepared in tfds_data_dir
    # (ArrayRecord needs no TensorFlow; TFRecord needs the tf extra).
    tfds: str | None = None
    # TFDS data directory; null = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    tfds_data_dir: str | None = None
    # TFDS split names (sub-splits such as "train[:90%]" too).
    train_split: str = "train"
    eval_split: str = "test"
    # TFDS features holding the uint8 (H, W, C) image and the class label (label_key: also the
    # label column of an images.folder metadata.jsonl).
    image_key: str = "image"
    label_key: str = "label"

    @pydantic.model_validator(mode="after")
    def _location_named(self) -> ImagesConfig:
        for source, where in (("tfds", "NAME"), ("folder", "DIR"), ("idx", "DIR"), ("latents", "DIR")):
            if self.source == source and getattr(self, source) is None:
                raise ValueError(f"images.source={source} needs images.{source}={where}")
            if self.source != source and getattr(self, source) is not None:  # a config file's, with another source
                raise ValueError(f"images.{source}={getattr(self, source)!r} is read only with images.source={source}, "
                                 f"and images.source is {self.source!r}; give images.source={source}, or "
                                 f"images.{source}=null to read {self.source!r}")
        return self


# Built-in image source -> (side, channels, classes); the model must match its data
# (TFDS datasets are checked against their feature spec when they are opened).
IMAGE_SOURCES = {"digits": (8, 1, 10), "shapes": (32, 3, 6)}


# Classifier-free guidance is used at 1 to about 10 (DiT 1.5 to 4, Imagen up to 20); 100 is far past any useful
# push, and larger scales only overflow the sampler into NaN images.
MAX_GUIDANCE = 100.0
# DDPM-family samplers take at most diffusion.timesteps steps (1000 by default: every level of the schedule).
# Flow's Euler and Heun steps are as many equal slices of one integral, whose samplers take tens of steps; the
# same bound holds them (100,000,000 ran for ever without a word).
MAX_FLOW_STEPS = 1000


class DiffusionConfig(_Section):
    """How images are noised, what the model predicts, and how samples are drawn."""

    # eps / v: DDPM-style prediction of the noise or of v; flow: rectified-flow velocity.
    objective: Literal["eps", "v", "flow"] = "flow"
    schedule: Literal["linear", "cosine"] = "cosine"  # DDPM objectives only
    timesteps: int = Field(1000, ge=2)  # DDPM objectives only
    # Flow objective: where training times t in (0, 1) are drawn from.
    flow_time: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    # Weight of the per-step variational-bound term that trains a learned variance (model.learn_sigma);
    # 1 is Improved DDPM's lambda = 1/T on the whole bound.
    vlb_weight: float = Field(1.0, ge=0)
    # Latent diffusion: a jaxgen autoencoder run (or an imported diffusers AutoencoderKL) whose frozen
    # encoder maps images to the latents the model denoises, and whose decoder turns samples back into
    # images. With images.source=latents the latents were encoded once by `jaxgen data prepare`; with
    # any other source each batch is encoded as it is read. null: the model works on pixels.
    autoencoder: str | None = None
    # The model settings of diffusion.autoencoder's run, which training keeps here in the run's config.yaml:
    # the run then opens (eval, sample, resume) where that run has moved or is gone, as its checkpoints hold
    # the autoencoder's parameters. Not for setting by hand: a new run refuses settings that are not its run's.
    autoencoder_model: AutoencoderConfig | None = None
    # Probability a training label is replaced by the null class, so one model is also unconditional.
    label_dropout: float = Field(0.1, ge=0, le=1)
    # Exponential moving average of parameters: decay ramps linearly from 0 to ema_decay over ema_warmup steps.
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: int = Field(100, ge=0)
    sampler: Literal["ddpm", "ddim", "euler", "heun"] = "heun"
    sample_steps: int = Field(32, gt=0)  # flow: at most MAX_FLOW_STEPS; DDPM: at most diffusion.timesteps
    ddim_eta: float = Field(0.0, ge=0)
    guidance_scale: float = Field(2.0, ge=0, le=MAX_GUIDANCE)
    # Text-to-image runs: `jaxgen eval` also scores samples at each of these guidance scales (quality and,
    # for the synthetic shapes, prompt adherence) and plots them against the scale.
    eval_guidance_scales: tuple[float, ...] = ()
    # Noise levels (0 = data, 1 = pure noise) where guidance applies; elsewhere the conditional prediction is used.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # Sample grids every this many steps (and always at the end); 0 = only at the end.
    sample_every: int = Field(0, ge=0)
    # A grid's row per class (or held-out caption) holds this many samples: a picture to look at, held in
    # memory whole, so at most 100 (`jaxgen sample` draws any number).
    samples_per_class: int = Field(10, gt=0, le=100)
    # Held-out loss is measured on this many evenly spaced noise levels, with fixed noise.
    eval_timesteps: int = Field(8, gt=0)
    # At the end of a run (`jaxgen eval` always): Frechet distance and conditional accuracy of samples in the
    # features of a classifier trained on the train split (images.quality_images of them).
    quality_eval: bool = True

    @pydantic.model_validator(mode="after")
    def _check_sampler(self) -> DiffusionConfig:
        if self.objective != "flow" and self.sample_steps > self.timesteps:
            raise ValueError(
                f"diffusion.sample_steps={self.sample_steps} exceeds diffusion.timesteps={self.timesteps}"
            )
        if self.objective == "flow" and self.sample_steps > MAX_FLOW_STEPS:
            raise ValueError(f"diffusion.sample_steps={self.sample_steps} is more than jaxgen samples a flow model "
                             f"with; give 1 to {MAX_FLOW_STEPS}")
        lo, hi = self.guidance_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"diffusion.guidance_interval={[lo, hi]} must be [low, high] with 0 <= low <= high <= 1")
        flow_sampler = self.sampler in ("euler", "heun")
        if flow_sampler != (self.objective == "flow"):
            valid = "euler, heun" if self.objective == "flow" else "ddpm, ddim"
            raise ValueError(
                f"diffusion.sampler={self.sampler!r} does not fit diffusion.objective={self.objective!r}; valid: {valid}"
            )
        return self


class WandbConfig(_Section):
    """Weights & Biases: the run's scalars, loss curve and sample grids; files under RUN_DIR/wandb."""

    project: str = "jaxgen"
    name: str | None = None  # the W&B run's display name; null = the run directory's name
    # offline: no network; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later. null = W&B's own
    # choice ($WANDB_MODE, else online).
    mode: Literal["online", "offline"] | None = None


class MlflowConfig(_Section):
    """MLflow: the run's scalars, loss curve, sample grids and flattened config (as params)."""

    # null = sqlite:///RUN_DIR/mlflow.db (artifacts in RUN_DIR/mlartifacts). Also sqlite:///PATH,
    # file:PATH (MLflow's legacy file store) or a tracking server's http(s):// address.
    tracking_uri: str | None = None
    experiment: str = "jaxgen"


class LoggingConfig(_Section):
    every: int = Field(10, gt=0)
    tensorboard: bool = True
    progress_bar: bool = True
    # Experiment trackers (optional extras), off unless configured; only process 0 logs.
    wandb: WandbConfig | None = None
    mlflow: MlflowConfig | None = None


class Config(_Section):
    model: ModelConfig = Field(default_factory=TransformerConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    conditioning: ConditioningConfig = Field(default_factory=ConditioningConfig)
    autoencoder: AutoencoderTrainingConfig = Field(default_factory=AutoencoderTrainingConfig)
    gan: GANTrainingConfig = Field(default_factory=GANTrainingConfig)
    mlm: MLMConfig = Field(default_factory=MLMConfig)
    span: SpanConfig = Field(default_factory=SpanConfig)

    @pydantic.model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if isinstance(self.model, TransformerConfig) and self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.data.batch_size % self.train.microbatches:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"train.microbatches={self.train.microbatches}"
            )
        slices = getattr(self.model, "batch_slices", "auto")
        microbatch = self.data.batch_size // self.train.microbatches
        if slices != "auto" and microbatch % slices:
            raise ValueError(
                f"model.batch_slices={slices} does not divide the batch each step sees "
                f"({microbatch} = data.batch_size / train.microbatches); use a divisor of it or auto"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _check_text_model(self) -> Config:
        data, m = self.data, self.model
        if isinstance(m, EncoderConfig) and data.seq_len > m.max_seq_len:
            raise ValueError(f"data.seq_len={data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        pairs = (data.input_field, data.target_field)
        if any(f is not None for f in pairs):
            if None in pairs:
                given, missing = ("input_field", "target_field") if data.input_field else ("target_field", "input_field")
                raise ValueError(f"data.{given} needs data.{missing} too: supervised pairs name both fields")
            if not isinstance(m, EncoderDecoderConfig):
                raise ValueError(f"data.input_field/target_field are supervised pairs for model.kind=encoder_decoder, "
                                 f"not {m.kind}; unset them")
            if data.jsonl is None:
                raise ValueError("data.input_field/target_field read pairs from JSONL files; set data.jsonl "
                                 "(one source, not data.mixture)")
        return self

    @pydantic.model_validator(mode="after")
    def _check_conditioning(self) -> Config:
        if self.conditioning.by == "class":
            return self
        if self.model.kind != "dit":
            raise ValueError(f"conditioning.by=text conditions a DiT (model.kind=dit), not model.kind={self.model.kind}")
        if self.images.source not in ("folder", "latents", "tfds", "idx"):
            raise ValueError(f"conditioning.by=text needs captioned images; images.source={self.images.source!r} "
                             "has none (valid: folder with a metadata.jsonl caption column, latents, tfds, idx)")
        return self

    @pydantic.model_validator(mode="after")
    def _check_image_model(self) -> Config:
        if self.model.kind not in IMAGE_MODEL_KINDS:
            return self
        m = self.model
        latent = m.kind == "dit" and self.diffusion.autoencoder is not None  # the model sees latents, not pixels
        if self.images.source in IMAGE_SOURCES and not latent:
            size, channels, classes = IMAGE_SOURCES[self.images.source]
            classes_named = hasattr(m, "num_classes")  # an autoencoder has no classes to match
            if (m.image_size, m.channels, getattr(m, "num_classes", classes)) != (size, channels, classes):
                raise ValueError(
                    f"images.source={self.images.source!r} holds {size}x{size}x{channels} images in {classes} "
                    f"classes; set model.image_size={size}, model.channels={channels}"
                    + (f", model.num_classes={classes}" if classes_named else "")
                )
        adversarial = self.autoencoder.adversarial
        too_deep = isinstance(m, AutoencoderConfig) and adversarial.enabled and patchgan_side(m.image_size,
                                                                                            adversarial.layers) < 1
        if too_deep:
            fits = max((n for n in range(1, adversarial.layers) if patchgan_side(m.image_size, n) >= 1), default=None)
            raise ValueError(
                f"autoencoder.adversarial.layers={adversarial.layers} leaves no patch of model.image_size="
                f"{m.image_size} images to score; "
                + (f"use at most {fits} layers" if fits else "the images are too small for a PatchGAN"))
        if isinstance(m, DiTConfig) and m.learn_sigma and self.diffusion.objective == "flow":
            raise ValueError("model.learn_sigma=true needs a DDPM objective (diffusion.objective: eps or v)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


# What to do about a run's own config.yaml found empty or not YAML (jaxgen writes it whole, so someone emptied,
# cut or edited it).
RUN_CONFIG_DAMAGED = ("jaxgen train wrote the run's settings there: put back a copy (those each checkpoint was "
                    "trained with are under \"config\" in checkpoints/<step>/meta/metadata)")


def load_config(path: str | pathlib.Path | None = None, overrides: list[str] = (),
                damaged_advice: str | None = None) -> Config:
    """Defaults, then the YAML file (if any), then dotted overrides; validated once. A file with no settings is
    refused, saying `damaged_advice` (by default, what to do about a --config file), as is one that is not YAML
    where `damaged_advice` is given (a run's own config.yaml)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = pathlib.Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file, "
                              "e.g. configs/lm_tiny.yaml")
        if str(path) == "-":
            raise ConfigError("--config - (standard input) is not read; give a YAML file, e.g. configs/lm_tiny.yaml")
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:  # a pipe (`--config <(...)`) or a device reads as a file does; its size is known once read
            with path.open("rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({describe_os_error(err)})") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(path)!r} is over {MAX_CONFIG_BYTES:,} bytes; "
                              f"a config is a few kB (at most {MAX_CONFIG_BYTES:,})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
        try:
            raw = load_yaml(text, f"config file {str(path)!r}")
        except ConfigError as err:
            raise ConfigError(f"{err}; {damaged_advice}" if damaged_advice else str(err)) from None
        if raw is None:  # a copy cut short or a `>` that emptied the file would otherwise train the defaults
            advice = damaged_advice or "give its settings, or leave --config out for the embedded default"
            raise ConfigError(f"config file {str(path)!r} holds no settings (it is empty, or only comments); {advice}")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    raw = deep_merge(raw, parse_overrides(list(overrides)))
    try:
        return Config.model_validate(raw)
    except pydantic.ValidationError as err:
        raise ConfigError(_explain(err)) from None


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with dotted `key=value` overrides applied, validated as a whole again."""
    try:
        return Config.model_validate(deep_merge(cfg.model_dump(mode="json"), parse_overrides(overrides)))
    except pydantic.ValidationError as err:
        raise ConfigError(_explain(err)) from None


def as_saved_now(settings: dict) -> dict:
    """A config a checkpoint saved (as JSON) with the settings jaxgen gained since at their defaults, as this
    jaxgen would write it, so that comparing it with today's names only what the user changed; as saved where it
    no longer validates (a setting since removed)."""
    try:
        return Config.model_validate(settings).model_dump(mode="json")
    except pydantic.ValidationError:
        return settings


def changed_settings(before: dict, after: dict, ignored: tuple[str, ...] = ("train.steps",)) -> list[str]:
    """'key: old -> new' for every setting that differs between two configs as JSON (`model_dump(mode="json")`),
    in key order, except `ignored` ones (extending a run's steps is how it is continued)."""
    old, new = _flat(before), _flat(after)
    return [f"{key}: {_shown(old, key)} -> {_shown(new, key)}" for key in sorted(set(old) | set(new))
            if key not in ignored and (key in old, old.get(key)) != (key in new, new.get(key))]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {key: value for name, child in tree.items()
                for key, value in _flat(child, f"{prefix}.{name}" if prefix else name).items()}
    return {prefix: tree}


def _shown(settings: dict[str, Any], key: str) -> str:
    return shown(settings[key]) if key in settings else "(absent)"


def shown(value: Any) -> str:
    """A setting's value (as JSON; a section as its settings) for a message, cut to 60 characters."""
    text = json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _schema_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the last element of a validation-error location."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        if model is None and part in MODEL_CONFIGS:  # the tag of a `model.kind` union member
            model = MODEL_CONFIGS[part]
            continue
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        # An optional section (`WandbConfig | None`) holds its section's keys.
        annotation = next((a for a in typing.get_args(annotation) if isinstance(a, type)
                           and issubclass(a, BaseModel)), annotation)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _explain(err: pydantic.ValidationError) -> str:
    lines = []
    for e in err.errors():
        tagged = tuple(p for p in e["loc"] if isinstance(p, str))
        # Users write `model.d_model`, not the union member's tag `model.dit.d_model`.
        is_tagged = len(tagged) > 1 and tagged[0] == "model" and tagged[1] in MODEL_CONFIGS
        loc = tagged[:1] + tagged[2:] if is_tagged else tagged
        dotted = ".".join(loc) or "<config>"
        if e["type"] == "extra_forbidden":
            holder = _schema_at(tagged)
            valid = sorted(holder.model_fields) if holder else []
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
            parent = ".".join(loc[:-1])
            hint = f" Did you mean '{'.'.join([*loc[:-1], close[0]])}'?" if close else ""
            lines.append(
                f"unknown config key '{dotted}'.{hint} Valid keys{' in ' + parent if parent else ''}: {', '.join(valid)}"
            )
        elif e["type"] == "value_error":  # a check across sections names its keys itself
            lines.append(("" if not loc else f"{dotted}: ") + e["msg"].removeprefix("Value error, "))
        elif e["type"] == "union_tag_invalid":  # model.kind names no model family
            lines.append(f"{dotted}.kind={e['ctx']['tag']!r} is not a model kind; valid: {', '.join(MODEL_CONFIGS)}")
        else:
            holder = _schema_at(tagged)
            field = holder.model_fields.get(loc[-1]) if holder and loc else None
            expected = _type_name(field.annotation) if field else "a valid value"
            lines.append(f"config key '{dotted}' = {excerpt(e['input'])}: {e['msg']} (expected {expected})")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return f"invalid config ({len(lines)} problems): " + "; ".join(lines)


def _type_name(annotation: Any) -> str:
    """A field's type as a person reads it: `int or null`, `'online' or 'offline' or null` (not `Optional`)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join([_type_name(a) for a in args if a is not type(None)] + ["null"] * (type(None) in args))
    if origin is typing.Literal:
        return " or ".join(map(repr, args))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
