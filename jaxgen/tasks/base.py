"""The Task contract: everything the trainer, evaluation and generation know about a model family.

A task owns one or several models, each a named group: `model` alone for a
language model or a DiT; a `generator` and a `discriminator` for a GAN; a
frozen `autoencoder` and a trained `denoiser` for latent diffusion. For each
group it says how the model is built, whether it is trained (frozen groups get
no optimizer state and no gradients) and whether a parameter average is kept
for sampling and evaluation. Its phases are the updates of one train step, run
in order: each computes one loss and updates only the groups it trains (a GAN
updates its discriminator, then its generator). The task also makes its data,
says what a run records about its inputs, evaluates, samples and generates.

The trainer, checkpointing, data plumbing and launchers know nothing
model-specific and never probe a task with `getattr`: what is here is all a
task is asked.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from jaxgen.config_optimizer import OptimizerConfig
from jaxgen.data.pipeline import BatchIterator

# (models by group, batch, rng, step) -> (sum of per-unit losses, sum of their weights): sums, so that
# microbatches and devices combine exactly. `step` (an int32 scalar) is the step being taken, for
# losses that change over training (an adversarial term switched on at some step).
LossFn = Callable[[dict[str, nnx.Module], dict, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    build: Callable[[nnx.Rngs], nnx.Module]
    trained: bool = True
    # (decay, warm-up steps) of an exponential moving average of the parameters; None keeps none.
    ema: tuple[float, int] | None = None
    # This group's own optimizer settings (a discriminator's); None: the config's `optimizer:` section.
    optimizer: OptimizerConfig | None = None


@dataclasses.dataclass(frozen=True)
class Phase:
    """One update of a train step: the gradient of `loss` updates the groups in `trains`; the others hold."""

    name: str
    trains: tuple[str, ...]
    loss: LossFn
    # Steps before this one skip the phase: its groups and their optimizer states hold, its loss reads 0.
    start_step: int = 0


@dataclasses.dataclass(frozen=True)
class Weights:
    """A task's models as data: graph definitions and parameters per group, as samples and evaluation read them."""

    graphdefs: dict[str, nnx.GraphDef]
    params: dict[str, Any]

    def models(self) -> dict[str, nnx.Module]:
        return {group: nnx.merge(self.graphdefs[group], params) for group, params in self.params.items()}


class TaskData(Protocol):
    train: BatchIterator  # this process's rows of every training batch, resumable
    eval: list[dict[str, np.ndarray]]  # fixed held-out batches, this process's rows


class Task(Protocol):
    unit: str  # what throughput counts: "tokens", "images"
    loss_name: str  # the training loss, as plot axes name it
    sample_every: int  # periodic samples every this many steps while training (0: only at the end)
    sample_options: dict[str, Any]  # the `jaxgen sample` options this family takes, with their defaults

    def models(self) -> dict[str, ModelSpec]: ...

    def phases(self) -> list[Phase]: ...

    def eval_loss(self, models: dict[str, nnx.Module], batch: dict) -> tuple[jax.Array, jax.Array]:
        """(loss sum, weight sum) of a fixed held-out batch: the same measurement at every evaluation."""

    def units_per_batch(self) -> int: ...

    def flops_per_unit(self) -> float: ...

    def make_data(self, run_dir: pathlib.Path) -> TaskData: ...

    def inputs(self, data: TaskData) -> dict:
        """What a run records about its inputs in every checkpoint (e.g. the tokenizer's hash)."""

    def check_inputs(self, saved: dict, current: dict) -> None:
        """Refuse (CheckpointError) to resume a run from a checkpoint made with other inputs."""

    def sample(self, weights: Weights, data: TaskData, run_dir: pathlib.Path, step: int | None) -> dict:
        """Show what the models do now (text, an image grid; step None: the end of training); summary entries."""

    def evaluate(self, weights: Weights, data: TaskData, loss_sum: float, weight_sum: float) -> dict:
        """`jaxgen eval`'s figures, given the held-out sums the training loop also logs."""

    def check_sample_options(self, options: dict[str, Any]) -> Any:
        """Refuse `jaxgen sample` options (sample_options, filled in) that cannot work, before any checkpoint
        is read; `generate` checks them too, for library callers. A task may return what the check worked out
        (the files a glob matched, the sampler overrides) for its `generate` to use; the CLI ignores it."""

    def check_sample_inputs(self, options: dict[str, Any], run_dir: pathlib.Path) -> None:
        """Refuse inputs of `jaxgen sample` that only the run's own files can judge (a prompt too long for the
        context, in the run's tokens), before any checkpoint is read: a large model's takes minutes."""

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        """`jaxgen sample` with `options` (sample_options, filled in); records to print."""
