"""Benchmark tasks scored on a run's checkpoints: `jaxgen eval --tasks ...` and the training loop's task evals.

A `Benchmarks` holds the tasks' examples, already tokenized, and a compiled
scorer; `run(params)` scores them all with any parameters of the model it was
built for, so the loop and `--all` score every checkpoint without reading or
tokenizing anything again. Results go to RUN_DIR/evals/<step>.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable

import jax

from jaxgen import strict_json
from jaxgen.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_file_in
from jaxgen.distributed import stop_together
from jaxgen.errors import ConfigError, DataError
from jaxgen.evals.loglikelihood import Score, Scorer, TokenRequest, encode_requests
from jaxgen.evals.metrics import choice_predictions, cloze_figures, format_table, multiple_choice_figures
from jaxgen.evals.plots import plot_benchmarks
from jaxgen.evals.tasks import Cloze, Task, known_names, load_task, parse_task_names
from jaxgen.files import updating_alone, write_atomic
from jaxgen.outputs.run_dir_check import unrecordable
from jaxgen.outputs.runs import chosen_checkpoints, load_run_config, scored_as
from jaxgen.sharding import resolve_rules
from jaxgen.tasks.layout import MAIN_GROUP

log = logging.getLogger("jaxgen")


@dataclasses.dataclass(frozen=True)
class TaskScores:
    figures: dict  # acc, acc_norm, n, ... (see jaxgen.evals.metrics)
    scores: list[list[Score]]  # per example, per request (choice)


def task_figures(task: Task, scores: list[list[Score]]) -> dict:
    truncated = sum(s.truncated for example in scores for s in example)
    if isinstance(task.examples[0], Cloze):
        figures = cloze_figures([s[0].loglikelihood for s in scores], [s[0].greedy for s in scores])
    else:
        predictions = [choice_predictions([s.loglikelihood for s in example_scores], example.choices)
                       for example, example_scores in zip(task.examples, scores)]
        figures = multiple_choice_figures([e.label for e in task.examples], predictions)
    return {**figures, "truncated": truncated}


class Benchmarks:
    """Tasks tokenized once and a scorer compiled for one model's parameters and shardings."""

    def __init__(self, tasks: list[Task], tokenizer: Tokenizer, scorer: Scorer):
        self.tasks, self.scorer = tasks, scorer
        self.warned: set[str] = set()  # tasks whose truncation was reported (the loop scores them again and again)
        self.requests: list[list[TokenRequest]] = [
            encode_requests(tokenizer, [pair for example in task.examples for pair in example.requests()])
            for task in tasks]

    def run(self, params, progress: bool = True) -> dict[str, TaskScores]:
        results = {}
        for task, requests in zip(self.tasks, self.requests):
            flat = self.scorer.score(params, requests, task.name if progress else None)
            scores, start = [], 0
            for example in task.examples:
                n = len(example.requests())
                scores.append(flat[start:start + n])
                start += n
            results[task.name] = TaskScores(task_figures(task, scores), scores)
            if results[task.name].figures["truncated"] and task.name not in self.warned:
                self.warned.add(task.name)
                log.warning("%s: %d sequences were longer than the model's window and lost tokens from the left",
                            task.name, results[task.name].figures["truncated"])
        return results


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def require_language_model(cfg) -> None:
    if cfg.model.kind != "transformer":
        raise ConfigError(f"benchmark tasks score language models; this run's model is {article(cfg.model.kind)} {cfg.model.kind}")


def run_tokenizer(run_dir: pathlib.Path) -> Tokenizer:
    if tokenizer_file_in(run_dir) is None:
        raise DataError(f"run directory {str(run_dir)!r} keeps no tokenizer (tokenizer.model or tokenizer.json); "
                        "benchmark tasks need the run's tokenizer to read their text")
    return load_tokenizer(run_dir)


def load_tasks(task_names: list[str], task_data: str | pathlib.Path | None) -> list[Task]:
    return [load_task(name, task_data) for name in parse_task_names(task_names)]


def make_scorer(cfg, mesh, graphdef, param_shardings, batch_size: int) -> Scorer:
    """A scorer for the language model of config `cfg`, its parameters sharded as `param_shardings`."""
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    return Scorer(graphdef, param_shardings, mesh, rules, cfg.model.max_seq_len, batch_size)


def result_record(step: int, results: dict[str, TaskScores]) -> dict:
    """What RUN_DIR/evals/<step>.json holds: the step and each task's figures."""
    return {"step": step, "tasks": {name: r.figures for name, r in results.items()}}


def write_result(run_dir: pathlib.Path, record: dict) -> dict:
    """RUN_DIR/evals/<step>.json holding `record`'s tasks beside those scored on the step before (a task scored
    again is replaced), written atomically on process 0, one process at a time; returns `record`.

    A checkpoint's record (`eval --tasks`) names it (`checkpoint`: its digest); tasks scored before on another
    checkpoint saved at the step (a run continued from an earlier one) move under "replaced", out of the plots,
    rather than pass for its own."""
    if jax.process_index() == 0:
        path = run_dir / "evals" / f"{record['step']}.json"
        path.parent.mkdir(exist_ok=True)
        with updating_alone(path.parent / ".update.lock"):  # another `eval --tasks` on the step may be merging
            earlier = earlier_record(path)
            scored = earlier.get("checkpoint"), record.get("checkpoint")
            kept, replaced = earlier.get("tasks", {}), earlier.get("replaced", [])
            if None not in scored and scored[0] != scored[1] and kept:
                log.warning("%s held %s, scored on another checkpoint saved at step %d: kept there under "
                            "'replaced', out of the plots", path, ", ".join(sorted(kept)), record["step"])
                kept, replaced = {}, [*replaced, {"checkpoint": scored[0], "tasks": kept}]
            # Named by the checkpoint of the newest record only: the trainer's, of its training state, names none.
            merged = {**{k: v for k, v in earlier.items() if k != "checkpoint"}, **record}
            merged = {**merged, "tasks": {**kept, **record["tasks"]}, **({"replaced": replaced} if replaced else {})}
            write_atomic(path, strict_json.dumps(merged, indent=2) + "\n")
    return record


def earlier_record(path: pathlib.Path) -> dict:
    """What an earlier evaluation wrote to `path` (nothing where there is no readable file), its tasks a dict:
    `eval --tasks arc_easy` after `eval --tasks hellaswag` keeps both."""
    try:
        earlier = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("%s cannot be read (%s); this evaluation's results replace it", path, err)
        return {}
    if not isinstance(earlier, dict):
        return {}
    tasks = earlier.get("tasks")
    return {**earlier, "tasks": tasks if isinstance(tasks, dict) else {}}


def metric_values(record: dict) -> dict[str, float]:
    """A result's figures as scalars to log: <task>/<metric> (a multiple_choice=FILE task by the file's stem)."""
    values = {}
    for name, figures in record["tasks"].items():
        kind, _, path = name.partition("=")
        label = pathlib.Path(path).stem if path else kind
        values.update({f"{label}/{metric}": figures[metric] for metric in ("acc", "acc_norm", "perplexity")
                       if metric in figures})
    return values


def evaluate_benchmarks(run_dir: str | pathlib.Path, task_names: list[str], task_data: str | None = None,
                        step: int | None = None, overrides: list[str] = (), all_steps: bool = False,
                        batch_size: int = 32, on_result: Callable[[dict], None] | None = None) -> list[dict]:
    """Score the tasks on one checkpoint (the newest by default) or all of them; one JSON per checkpoint.

    Then plots every result the run holds: RUN_DIR/evals_<metric>.png.

    Every input is checked (task names, the run, its tokenizer, the task files) before the model is read.
    """
    run_dir = pathlib.Path(run_dir)
    if not parse_task_names(task_names):
        raise ConfigError(f"--tasks {','.join(task_names)!r} names no task; known tasks: {known_names()}")
    require_language_model(load_run_config(run_dir, overrides))
    tokenizer, tasks = stop_together(lambda: (run_tokenizer(run_dir), load_tasks(task_names, task_data)))
    why = unrecordable(run_dir) if jax.process_index() == 0 else None
    if why is not None:
        log.warning("run directory %s cannot be written (%s): results are shown, not recorded in its evals/",
                    run_dir, why)
    benchmarks, records = None, []
    try:
        for run in chosen_checkpoints(run_dir, step, overrides, all_steps):
            if benchmarks is None:
                benchmarks = Benchmarks(tasks, tokenizer, make_scorer(
                    run.cfg, run.mesh, run.layout.graphdefs[MAIN_GROUP], run.layout.shardings[MAIN_GROUP], batch_size))
            record = {**result_record(run.step, benchmarks.run(run.weights.params[MAIN_GROUP])), **scored_as(run)}
            if on_result is not None:  # first: a full disk failing the file below still leaves the figures shown
                on_result(record)
            records.append(write_result(run_dir, record) if why is None else record)
    except Exception as stopped:  # the checkpoints scored before one that could not be read are plotted too
        if why is None:
            plot_scored(run_dir, records, stopped)
        raise
    if why is None:
        plot_scored(run_dir, records)
    return records


def plot_scored(run_dir: pathlib.Path, records: list[dict], stopped: Exception | None = None) -> None:
    """The plots of the run's results, once some were scored; when scoring `stopped` early, a failure to plot
    is a warning, never the error reported in place of why it stopped."""
    if not records or jax.process_index() != 0:
        return
    try:
        plot_benchmarks(run_dir)
    except Exception as err:
        if stopped is None:
            raise
        log.warning("could not plot the results scored so far: %s", err)


def print_table(record: dict) -> None:
    print(format_table(record["step"], record["tasks"]), flush=True)
