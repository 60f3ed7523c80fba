"""What the text families share: one model trained on one loss, the tokenizer a run records, and held-out
batches placed beside the parameters.

Each text family trains one model (group `model`) on the cross-entropy of its
logits for the batch's weighted targets, and records its tokenizer's hash in every
checkpoint, never resuming on another (`OneTextModel`). Figures computed on the host's rows of held-out batches are
summed over processes (`summed_over_processes`); figures computed by the model take
the batches as global arrays on the parameters' mesh (`global_batches`).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.config import Config
from jaxgen.data.pipeline import to_global
from jaxgen.errors import CheckpointError, UsageError
from jaxgen.models import build_model
from jaxgen.tasks.base import ModelSpec, Phase
from jaxgen.tasks.layout import MAIN_GROUP


class OneTextModel:
    """A text family's models, phases and inputs: one model trained on `loss`; its tokenizer recorded.

    Subclasses give `logits(model, batch)` for the tokens in batch["targets"] (weighted by batch["weights"]).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def models(self) -> dict[str, ModelSpec]:
        return {MAIN_GROUP: ModelSpec(build=lambda rngs: build_model(self.cfg.model, rngs))}

    def phases(self) -> list[Phase]:
        return [Phase("loss", (MAIN_GROUP,), self.loss)]

    def logits(self, model, batch: dict) -> jax.Array:
        raise NotImplementedError

    def loss(self, models, batch, rng, step=None):
        del rng  # no dropout in these families
        logits = self.logits(models[MAIN_GROUP], batch)
        token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        weights = batch["weights"].astype(jnp.float32)
        return jnp.sum(token_loss * weights), jnp.sum(weights)

    def check_sample_inputs(self, options: dict[str, Any], run_dir: pathlib.Path) -> None:
        """Nothing here needs the run's files (Task.check_sample_inputs)."""

    def check_sample_options(self, options: dict[str, Any]) -> None:
        vocab = self.cfg.model.vocab_size
        if options.get("top_k", 0) > vocab:
            raise UsageError(f"--top-k {options['top_k']} is more than the {vocab} tokens of this run's model; "
                             f"give 0 (off) to {vocab}")

    def eval_loss(self, models, batch):
        return self.loss(models, batch, jax.random.PRNGKey(0))

    # What a run records about its inputs in every checkpoint: the tokenizer.
    def inputs(self, data) -> dict:
        return {"tokenizer_sha256": data.tokenizer.sha256, "tokenizer_path": str(data.tokenizer.path),
                "tokenizer_kind": data.tokenizer.kind}

    def check_inputs(self, saved: dict, current: dict) -> None:
        if saved.get("tokenizer_sha256") != current.get("tokenizer_sha256"):
            raise CheckpointError(
                f"the checkpoint was trained with tokenizer {saved.get('tokenizer_path')} "
                f"(sha256 {saved.get('tokenizer_sha256')}), but this run uses {current.get('tokenizer_path')} "
                f"(sha256 {current.get('tokenizer_sha256')}); resume with the checkpoint's tokenizer")


def spaces_taken(ids: list[int], pieces: set[int], tokenizer) -> list[int]:
    """A prompt's ids without the lone space pieces before each of `pieces` ([MASK], sentinels).

    "be [MASK]" tokenizes to "▁be", "▁", "[MASK]": the hidden word would be one without its leading
    space, unlike every word the model learnt to fill in; without the lone space the piece stands for
    "▁light", as in training. An exported tokenizer does the same (each such piece takes the spaces
    before it: `jaxgen.outputs.hf_tokenizer`).
    """
    space, kept = tokenizer.piece_id("\u2581"), []
    for t in reversed(ids):
        if not (t == space and kept and kept[-1] in pieces):
            kept.append(t)
    return kept[::-1]


def global_batches(params, batches: list[dict[str, np.ndarray]]) -> list[dict[str, jax.Array]]:
    """This process's rows of each batch joined into global arrays on the mesh the parameters live on."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return [to_global(batch, mesh) for batch in batches]


def summed_over_processes(values: list[float]) -> list[float]:
    """Each value summed over every process (each computed its own rows' share)."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.float64))
    return [float(v) for v in np.sum(gathered, axis=0)]
