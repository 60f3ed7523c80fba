"""`jaxgen eval`: a run's checkpoints scored on the training loop's own held-out batches.

The held-out batches and the eval step are the trainer's (`task.make_data`,
`task.eval_loss`), so evaluating step N reproduces the eval_loss the training
loop logged at step N; the task adds its own figures (perplexity and bits per
byte for a language model, sample quality for a digits DiT). The run is opened
once; each further checkpoint only reads its parameters.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxgen import strict_json
from jaxgen.data.pipeline import padded, to_global
from jaxgen.files import append_line
from jaxgen.outputs.runs import OpenedRun, chosen_checkpoints
from jaxgen.sharding import data_parallel_size
from jaxgen.tasks.layout import held_out_sums


def evaluate(run: OpenedRun, data) -> dict:
    """The task's figures for the run's current parameters."""
    batches = [to_global(split_evenly(batch, run.mesh), run.mesh) for batch in data.eval]
    loss_sum, weight_sum = held_out_sums(run.eval_step, run.weights.params, batches)
    return {"step": run.step, **run.task.evaluate(run.weights, data, loss_sum, weight_sum)}


def split_evenly(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
    """`batch` (this process's rows) padded with zero-weight rows until the mesh's batch axes split it evenly.

    A run is trained with a batch its devices split evenly, but may be evaluated on another number
    of devices (`jaxgen eval` uses every device present); the held-out rows and the sums stay the same.
    """
    multiple = max(1, data_parallel_size(mesh) // jax.process_count())
    return padded(batch, -(-len(batch["weights"]) // multiple) * multiple)


def evaluate_run(run_dir: str | pathlib.Path, step: int | None = None, overrides: list[str] = (),
                 all_steps: bool = False, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Evaluate one checkpoint (the newest by default) or all of them; each result is appended to
    RUN_DIR/eval.jsonl and given to `on_result` as it comes (a damaged checkpoint among all is skipped,
    and named in the error raised once the others are done)."""
    run_dir = pathlib.Path(run_dir)
    data, results = None, []
    for run in chosen_checkpoints(run_dir, step, overrides, all_steps):
        data = run.task.make_data(run_dir) if data is None else data
        result = evaluate(run, data)
        if overrides:  # what it was scored on: a record of `eval data.text=OTHER` is told from the run's own
            result["overrides"] = list(overrides)
        if "guidance_sweep" in result and jax.process_index() == 0:
            from jaxgen.quality.prompt_adherence import plot_guidance_sweep

            path = run_dir / "evals" / f"guidance_step{result['step']:07d}.png"
            result["guidance_plot"] = str(plot_guidance_sweep(result["guidance_sweep"], path))
        if on_result is not None:  # first: a full disk failing the record below still leaves the figures shown
            on_result(result)
        if jax.process_index() == 0:
            append_line(run_dir / "eval.jsonl", strict_json.dumps(result))
        results.append(result)
    return results
