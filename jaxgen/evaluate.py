"""Evaluate checkpoints: held-out loss, perplexity and bits per byte for LMs.

The held-out batches and the eval step are the trainer's own (`task.make_data`
and `Training.eval_step`), so `jaxgen eval` at step N reproduces the eval_loss
the training loop logged at step N.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import jax
import numpy as np

from jaxgen.checkpoint import checkpoint_dir, committed_steps
from jaxgen.data.pipeline import to_global
from jaxgen.data.tokenizer import Tokenizer
from jaxgen.errors import CheckpointError
from jaxgen.runs import OpenedRun, load_run_config, open_run
from jaxgen.train.step import held_out_sums
from jaxgen.train.tasks import make_task

log = logging.getLogger("jaxgen")


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for: 0 for control tokens, 1 for a byte-fallback piece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_bytes)
    lengths = np.zeros(sp.get_piece_size(), np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def run_held_out_sums(run: OpenedRun, data) -> tuple[float, float]:
    """The training loop's held-out sums, for a restored checkpoint."""
    batches = [to_global(batch, run.training.mesh) for batch in data.eval]
    return held_out_sums(run.training.eval_step, run.params, batches)


def evaluate_lm(run: OpenedRun, data) -> dict:
    """Loss (nats/token), perplexity and bits per byte over the fixed held-out batches."""
    byte_lengths = token_byte_lengths(data.tokenizer)
    loss_sum, weight_sum = run_held_out_sums(run, data)
    # Every process sees only its rows; the byte count must cover all of them.
    n_bytes = sum(int(np.sum(byte_lengths[batch["targets"]] * batch["weights"])) for batch in data.eval)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        n_bytes = int(np.sum(multihost_utils.process_allgather(np.asarray([n_bytes]))))
    loss = loss_sum / max(weight_sum, 1.0)
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1),
        "eval_tokens": int(weight_sum),
    }


def evaluate_images(run: OpenedRun, data) -> dict:
    """Held-out diffusion loss (fixed noise levels and noise); for digits, sample quality too."""
    loss_sum, weight_sum = run_held_out_sums(run, data)
    result = {"eval_loss": loss_sum / max(weight_sum, 1.0)}
    if run.cfg.images.source == "digits":
        from jaxgen.evaluate_images import sample_quality

        task = make_task(run.cfg)
        result.update(sample_quality(task, run.training.layout.graphdef, run.params, data,
                                     run.cfg.diffusion.guidance_scale))
    return result


def evaluate_run(run_dir: str | pathlib.Path, step: int | None = None, overrides: list[str] = (),
                 all_steps: bool = False) -> list[dict]:
    """Evaluate one checkpoint (latest by default) or all of them; appends each result to RUN_DIR/eval.jsonl."""
    run_dir = pathlib.Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    steps = committed_steps(checkpoint_dir(run_dir)) if all_steps else [step]
    task = make_task(cfg)
    data = task.make_data(run_dir)
    results = []
    for s in steps:
        try:
            run = open_run(run_dir, s, overrides)
        except CheckpointError:
            if not all_steps or (checkpoint_dir(run_dir) / str(s)).is_dir():
                raise
            log.warning("checkpoint %d was deleted by the run's retention before it was evaluated; skipped", s)
            continue
        metrics = evaluate_lm(run, data) if cfg.model.kind == "transformer" else evaluate_images(run, data)
        result = {"step": run.step, **metrics}
        if jax.process_index() == 0:
            with (run_dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
        results.append(result)
    return results
