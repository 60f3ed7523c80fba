"""`jaxgen eval`: a run's checkpoints scored on the training loop's own held-out batches.

The held-out batches and the eval step are the trainer's (`task.make_data`,
`task.eval_loss`), so evaluating step N reproduces the eval_loss the training
loop logged at step N; the task adds its own figures (perplexity and bits per
byte for a language model, sample quality for a digits DiT). The run is opened
once; each further checkpoint only reads its parameters.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from jax.sharding import Mesh

from jaxgen.checkpoint import checkpoint_dir, committed_steps
from jaxgen.data.pipeline import to_global
from jaxgen.outputs.runs import OpenedRun, each_checkpoint, open_run
from jaxgen.tasks.layout import held_out_sums


def evaluate(run: OpenedRun, data) -> dict:
    """The task's figures for the run's current parameters."""
    batches = [to_global(padded_to_split(batch, data_parallel_rows(run.mesh)), run.mesh) for batch in data.eval]
    loss_sum, weight_sum = held_out_sums(run.eval_step, run.weights.params, batches)
    return {"step": run.step, **run.task.evaluate(run.weights, data, loss_sum, weight_sum)}


def data_parallel_rows(mesh: Mesh) -> int:
    """The multiple of rows this process's part of a batch must be to split over the mesh's batch axes."""
    return max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())


def padded_to_split(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """`batch` with rows added (copies of its last, of weight 0) up to a multiple of `multiple` rows.

    A run is trained with a batch its devices split evenly, but may be evaluated on another number
    of devices (`jaxgen eval` uses every device present); the held-out rows and the sums stay the same.
    """
    missing = -len(batch["weights"]) % multiple
    if not missing:
        return batch
    return {name: np.concatenate([rows, np.zeros_like(rows[-1:]).repeat(missing, 0) if name == "weights"
                                  else rows[-1:].repeat(missing, 0)])
            for name, rows in batch.items()}


def evaluate_run(run_dir: str | pathlib.Path, step: int | None = None, overrides: list[str] = (),
                 all_steps: bool = False) -> list[dict]:
    """Evaluate one checkpoint (the newest by default) or all of them; appends each result to RUN_DIR/eval.jsonl."""
    run_dir = pathlib.Path(run_dir)
    every = committed_steps(checkpoint_dir(run_dir)) if all_steps else []
    run = open_run(run_dir, every[0] if every else step, overrides)
    steps = every or [run.step]
    data = run.task.make_data(run_dir)
    results = []
    for checkpoint in each_checkpoint(run, steps):
        result = evaluate(checkpoint, data)
        if "guidance_sweep" in result and jax.process_index() == 0:
            from jaxgen.quality.prompt_adherence import plot_guidance_sweep

            path = run_dir / "evals" / f"guidance_step{result['step']:07d}.png"
            result["guidance_plot"] = str(plot_guidance_sweep(result["guidance_sweep"], path))
        if jax.process_index() == 0:
            with (run_dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
        results.append(result)
    return results
