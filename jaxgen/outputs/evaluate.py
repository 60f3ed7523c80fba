"""`jaxgen eval`: a run's checkpoints scored on the training loop's own held-out batches.

The held-out batches and the eval step are the trainer's (`task.make_data`,
`task.eval_loss`), so evaluating step N reproduces the eval_loss the training
loop logged at step N; the task adds its own figures (perplexity and bits per
byte for a language model, sample quality for a digits DiT). The run is opened
once; each further checkpoint only reads its parameters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from jaxgen import strict_json
from jaxgen.checkpoint_layout import checkpoint_digest, checkpoint_dir, committed_steps
from jaxgen.data.pipeline import padded, to_global
from jaxgen.distributed import bytes_from_process_0
from jaxgen.errors import DirectoryInUse
from jaxgen.files import DirectoryLock, append_line
from jaxgen.metrics import read_metrics
from jaxgen.outputs.run_dir_check import unrecordable
from jaxgen.outputs.runs import OpenedRun, chosen_checkpoints, each_checkpoint, edited_model_settings, scored_as
from jaxgen.sharding import data_parallel_size
from jaxgen.tasks.layout import held_out_sums

log = logging.getLogger("jaxgen")


def evaluate(run: OpenedRun, data) -> dict:
    """The task's figures for the run's current parameters."""
    batches = [to_global(split_evenly(batch, run.mesh), run.mesh) for batch in data.eval]
    loss_sum, weight_sum = held_out_sums(run.eval_step, run.weights.params, batches)
    return {"step": run.step, **scored_as(run), **run.task.evaluate(run.weights, data, loss_sum, weight_sum)}


SAVED_AGAIN = "the result eval.jsonl holds is of another checkpoint saved at that step (the run was continued from " \
              "an earlier one)"
NOT_NAMED = "the result eval.jsonl holds does not say which checkpoint it is of (written by an earlier jaxgen)"
EDITED_OTHERWISE = "the result eval.jsonl holds was scored with other model settings in config.yaml than it holds now"


def scored_before(run_dir: pathlib.Path, steps: list[int], overrides: list[str]) -> dict[int, dict]:
    """{step: its latest result in RUN_DIR/eval.jsonl scored with `overrides` on the checkpoint now at that step}
    for each of `steps`, as process 0 reads the file (every process then skips the same checkpoints).

    Each result names the checkpoint it scored (`checkpoint`: its digest); a result of another checkpoint saved
    at the same step (a run continued from an earlier checkpoint, with other settings) is not this one's; nor is
    one scored while config.yaml's model settings were edited otherwise than they are now (`config_edits`)."""
    found, other = {}, {SAVED_AGAIN: set(), NOT_NAMED: set(), EDITED_OTHERWISE: set()}
    if jax.process_index() == 0:
        digests = {step: checkpoint_digest(checkpoint_dir(run_dir), step) for step in steps}
        edits = {}
        for record in read_metrics(run_dir / "eval.jsonl"):
            if isinstance(record, dict) and record.get("step") in steps and record.get("overrides", []) == overrides:
                step = record["step"]
                if record.get("checkpoint") is None:
                    other[NOT_NAMED].add(step)
                elif record["checkpoint"] != digests[step]:
                    other[SAVED_AGAIN].add(step)
                elif record.get("config_edits", []) != edits.setdefault(step, edited_model_settings(run_dir, step)):
                    other[EDITED_OTHERWISE].add(step)
                else:
                    found[step] = record
        for why, scored in other.items():
            if scored := sorted(scored - set(found)):
                log.info("checkpoint%s %s: %s; scored anew", "s" * (len(scored) > 1), ", ".join(map(str, scored)), why)
    agreed = json.loads(bytes_from_process_0(json.dumps([found[s] for s in steps if s in found]).encode()))
    return {record["step"]: record for record in agreed}


EVAL_LOCK = ".jaxgen-eval.lock"


@contextlib.contextmanager
def scoring_alone(run_dir: pathlib.Path) -> Iterator[bool]:
    """Held while an `eval` scores a run and appends to its eval.jsonl; a second `eval` of the run meanwhile is
    refused, on every process, naming the first. Two at once scored the same checkpoints and wrote each record
    twice; one run after the first ends shows what the first scored (with --all) instead of scoring it again.
    The lock dies with its holder. A run directory this user cannot write to (a read-only file system, a
    colleague's run) is scored unguarded and unrecorded: it yields whether process 0 records results."""
    lock, refusal, recording = None, b"", True
    if jax.process_index() == 0 and run_dir.is_dir() and (why := unrecordable(run_dir)) is not None:
        log.warning("run directory %s cannot be written (%s): results are shown, not recorded in its eval.jsonl",
                    run_dir, why)
        recording = False
    elif jax.process_index() == 0 and run_dir.is_dir():
        lock = DirectoryLock(run_dir / EVAL_LOCK, f"eval.jsonl of run {str(run_dir)!r}",
                             "run this again once it ends (with --all, what it scored is then shown from eval.jsonl, "
                             "not scored again)")
        try:
            lock.acquire()
        except DirectoryInUse as err:
            lock, refusal = None, str(err).encode()
        except OSError:  # read-only: nothing will be written
            lock = None
    refusal = bytes_from_process_0(refusal).decode()
    if refusal:
        raise DirectoryInUse(refusal)
    try:
        yield recording
    finally:
        if lock is not None:
            lock.release()


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
    and named in the error raised once the others are done).

    With `all_steps`, a checkpoint eval.jsonl holds a result of, scored with the same `overrides`, is not
    scored again: its recorded result is given instead. So an `--all` stopped part-way (a preempted job)
    goes on where it stopped, and one run again as training goes on scores only the new checkpoints.
    """
    run_dir = pathlib.Path(run_dir)
    with scoring_alone(run_dir) as recording:
        return _scored(run_dir, step, overrides, all_steps, on_result, recording)


def _scored(run_dir: pathlib.Path, step: int | None, overrides: list[str], all_steps: bool,
            on_result: Callable[[dict], None] | None, recording: bool) -> list[dict]:
    data, results = None, []
    if all_steps:
        steps = committed_steps(checkpoint_dir(run_dir))
        earlier = scored_before(run_dir, steps, list(overrides))
        if earlier:
            log.info("checkpoint%s %s, scored before with these settings, shown from eval.jsonl, not scored again "
                     "(remove their lines there to score them again)", "s" * (len(earlier) > 1),
                     ", ".join(map(str, earlier)))
        for result in earlier.values():
            if on_result is not None:
                on_result(result)
            results.append(result)
        left = [s for s in steps if s not in earlier]
        runs = each_checkpoint(run_dir, left, overrides) if left or not steps else []  # none: the run's error
    else:
        runs = chosen_checkpoints(run_dir, step, overrides, all_steps)
    for run in runs:
        data = run.task.make_data(run_dir) if data is None else data
        result = evaluate(run, data)
        if overrides:  # what it was scored on: a record of `eval data.text=OTHER` is told from the run's own
            result["overrides"] = list(overrides)
        if "guidance_sweep" in result and jax.process_index() == 0 and recording:
            from jaxgen.quality.prompt_adherence import plot_guidance_sweep

            path = run_dir / "evals" / f"guidance_step{result['step']:07d}.png"
            result["guidance_plot"] = str(plot_guidance_sweep(result["guidance_sweep"], path))
        if on_result is not None:  # first: a full disk failing the record below still leaves the figures shown
            on_result(result)
        if jax.process_index() == 0 and recording:
            append_line(run_dir / "eval.jsonl", strict_json.dumps(result))
        results.append(result)
    return results
