"""Tasks: what the trainer needs to know about a model family, and nothing more.

A task builds the model, computes a summed loss and its weight from a batch
(so microbatches and devices combine exactly), and reports the work one
batch represents. The trainer, checkpoints and launchers are task-agnostic.
"""

from __future__ import annotations

import pathlib
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen.config import Config
from jaxgen.data.lm import LMData, build_lm_data
from jaxgen.generate import generate_text
from jaxgen.models import build_model
from jaxgen.models.transformer import flops_per_token


class Task(Protocol):
    # Name of the unit counted for throughput ("tokens", "images").
    unit: str
    # What the loss is, for plot axes ("cross-entropy (nats / token)").
    loss_name: str

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(sum of per-unit losses, sum of their weights)."""

    def units_per_batch(self) -> int: ...

    def flops_per_unit(self) -> float: ...

    def make_data(self, run_dir: pathlib.Path):
        """An object with `.train` (a resumable BatchIterator) and `.eval` (fixed host-local batches)."""

    def sample(self, graphdef: nnx.GraphDef, params: dict, data, run_dir: pathlib.Path) -> dict:
        """Show what the model does now (text, an image grid); returns summary entries."""


class LanguageModelTask:
    unit = "tokens"
    loss_name = "cross-entropy (nats / token)"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return build_model(self.cfg.model, rngs)

    def loss(self, model, batch, rng):
        del rng  # no dropout in this model family
        if self.cfg.model.document_mask:
            logits_BLV = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        else:
            logits_BLV = model(batch["inputs"])
        token_loss_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"])
        weights_BL = batch["weights"].astype(jnp.float32)
        return jnp.sum(token_loss_BL * weights_BL), jnp.sum(weights_BL)

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.seq_len

    def flops_per_unit(self) -> float:
        return flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def make_data(self, run_dir: pathlib.Path) -> LMData:
        return build_lm_data(self.cfg, run_dir)

    def sample(self, graphdef, params, data: LMData, run_dir) -> dict:
        train = self.cfg.train
        if not train.sample_tokens:
            return {}
        text = generate_text(graphdef, params, data.tokenizer, train.sample_prompt, train.sample_tokens,
                             self.cfg.model.max_seq_len, seed=train.seed)
        return {"sample": text}


def make_task(cfg: Config) -> Task:
    if cfg.model.kind == "dit":
        from jaxgen.train.diffusion_task import DiffusionTask  # keeps image dependencies out of LM runs

        return DiffusionTask(cfg)
    return LanguageModelTask(cfg)
