"""Open a finished (or running) run directory: its config, task and a checkpoint's parameters, on the devices present.

Shared by `jaxgen eval`, `sample` and `export`: only the parameters are read
(the EMA where the run keeps one), straight into shardings for the current
devices (pure data parallel unless the caller overrides the mesh), whatever
mesh they were written on. No optimizer and no train step are built. Readers
only read committed checkpoints, verify what they read, and never change the
directory: they may run while the run trains, and a checkpoint that retention
removes while it is being read is replaced by the newest one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable, Iterable, Iterator

from jax.sharding import Mesh

from jaxgen.checkpoint import (
    Checkpointer,
    CheckpointMismatch,
    DamagedCheckpoint,
    on_every_process,
    read_step_meta,
    restore_subtree,
)
from jaxgen.checkpoint_layout import checkpoint_digest, checkpoint_dir, committed_steps
from jaxgen.config import RUN_CONFIG_DAMAGED, Config, changed_settings, load_config
from jaxgen.config_models import HOW_COMPUTED
from jaxgen.data.tokenizer import kept_tokenizer_files, load_tokenizer, tokenizer_file_in
from jaxgen.device_memory import check_fits
from jaxgen.distributed import stop_together
from jaxgen.errors import CheckpointError, CheckpointWriteError, listed
from jaxgen.outputs.run_dir_check import check_run_dir, check_step, require_checkpoint
from jaxgen.sharding import make_mesh, resolve_rules
from jaxgen.tasks import Task, Weights, make_task
from jaxgen.tasks.layout import ModelLayout, compile_eval_step, plan_models

log = logging.getLogger("jaxgen")

# Replicated params and a batch split over every device: works for any checkpoint
# that fits one device; pass mesh.* overrides for larger ones.
DEFAULT_MESH = ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"]


@dataclasses.dataclass
class OpenedRun:
    run_dir: pathlib.Path
    cfg: Config
    task: Task
    mesh: Mesh
    layout: ModelLayout
    step: int
    weights: Weights | None  # None until a checkpoint's parameters are read
    eval_step: Callable  # (params by group, global batch) -> (loss sum, weight sum)
    checkpoint: str | None = None  # the digest of the checkpoint read, taken as it was read (scored_checkpoint)
    config_edits: list[str] = dataclasses.field(default_factory=list)  # config.yaml's model unlike the checkpoint's


def scored_as(run: OpenedRun) -> dict:
    """What a result records of what it scored: the checkpoint (`scored_checkpoint`) and, where config.yaml's
    model settings are not those it was trained with, them (`config_edits`: 'key: trained -> now'), so that
    the result is never taken for the checkpoint's own. Both taken as its parameters were read."""
    return {"checkpoint": scored_checkpoint(run), **({"config_edits": run.config_edits} if run.config_edits else {})}


def scored_checkpoint(run: OpenedRun) -> str | None:
    """What a result names as the checkpoint it scored: its digest, unlike any other checkpoint's at that step
    (one saved again by a run continued from an earlier checkpoint). Taken as its parameters were read: the
    run's retention may delete the checkpoint while it is scored."""
    return run.checkpoint or checkpoint_digest(checkpoint_dir(run.run_dir), run.step)


def load_run_config(run_dir: str | pathlib.Path, overrides: list[str] = ()) -> Config:
    """The run's config.yaml with `overrides`; a process that cannot read it stops every process."""
    return stop_together(lambda: _load_run_config(pathlib.Path(run_dir), overrides))


def _load_run_config(run_dir: pathlib.Path, overrides: list[str]) -> Config:
    check_run_dir(run_dir)
    return load_config(run_dir / "config.yaml", [*DEFAULT_MESH, *overrides], RUN_CONFIG_DAMAGED)


# Overrides of what the parameters' shapes follow: a reader given one meets a checkpoint of another model.
MODEL_SECTIONS = ("model.", "conditioning.", "diffusion.autoencoder", "autoencoder.")


def read_params(run_dir: pathlib.Path, step: int | None, target: dict,
                overrides: list[str] = ()) -> tuple[dict, int, str | None, list[str]]:
    """Verified parameters of every group (its EMA where the run keeps one) of checkpoint `step` (default: newest),
    which must have been trained with the run's tokenizer (and, or a warning says so, its config.yaml's model);
    with the step read, the checkpoint's digest and config.yaml's model settings unlike those it was trained with.
    `overrides`: the command's; one that changed the model's shapes is named where the checkpoint does not fit."""
    try:
        params, step, digest, edits = _read_params(run_dir, step, target)
    except CheckpointMismatch as mismatch:
        reshaping = [o for o in overrides if o.startswith(MODEL_SECTIONS)]
        if not reshaping:
            raise
        them = "it" if len(reshaping) == 1 else "them"
        raise CheckpointMismatch(
            f"{', '.join(reshaping)}: the run's checkpoints hold a model of other shapes ({len(mismatch.problems)} "
            f"arrays differ, e.g. {mismatch.problems[0]}); a reader keeps the model the run trained: drop "
            f"{them}") from None
    if given := overridden_model_settings(run_dir, step, overrides):
        log.warning("%s given on the command line: checkpoint %d was trained with the first, so this command "
                    "computes another model than the one trained", listed(given, 4), step)
    return params, step, digest, edits


def overridden_model_settings(run_dir: pathlib.Path, step: int, overrides: list[str]) -> list[str]:
    """The model settings `overrides` give otherwise than checkpoint `step` was trained with ('key: trained -> now').
    One that changes shapes is refused by the restore; these (model.norm_eps, say) change only what it computes."""
    given = [o for o in overrides if o.startswith("model.")]
    if not given:
        return []
    trained = read_step_meta(checkpoint_dir(run_dir), step).get("config", {}).get("model") or {}
    now = load_config(run_dir / "config.yaml", given).model.model_dump(mode="json")
    keys = {o.split("=", 1)[0].split(".")[1] for o in given} & set(trained) & set(now) - set(HOW_COMPUTED)
    return changed_settings({"model": {k: trained[k] for k in keys}}, {"model": {k: now[k] for k in keys}})


def _read_params(run_dir: pathlib.Path, step: int | None, target: dict) -> tuple[dict, int, str | None, list[str]]:
    directory = checkpoint_dir(run_dir)
    while True:
        wanted = check_step(run_dir, step)
        try:
            edits = check_against_checkpoint(run_dir, wanted)  # in here: retention may delete the step meanwhile
            digest = checkpoint_digest(directory, wanted)
            params = {group: restore_subtree(directory, (f"ema_params/{group}", f"params/{group}"), group_target,
                                             wanted)[0]
                      for group, group_target in target.items()}
            return params, wanted, digest, edits
        except CheckpointError:
            if (directory / str(wanted)).is_dir():
                raise
            if step is not None:
                raise CheckpointError(f"checkpoint {wanted} of {run_dir} was deleted while it was being read "
                                      f"(the run's retention keeps only the newest); available now: "
                                      f"{committed_steps(directory)}") from None
            log.info("checkpoint %d was deleted while it was being read; reading the newest again", wanted)


def open_run(run_dir: str | pathlib.Path, step: int | None = None, overrides: list[str] = ()) -> OpenedRun:
    """The run's config, task and the parameters of checkpoint `step` (default: the newest)."""
    opened = _without_params(pathlib.Path(run_dir), overrides)
    try:
        params, step, digest, edits = read_params(opened.run_dir, step, opened.layout.target, overrides)
    except DamagedCheckpoint as err:
        steps = committed_steps(checkpoint_dir(opened.run_dir))
        others = [s for s in steps if s != (steps[-1] if step is None else step)]
        if not others:
            raise
        raise DamagedCheckpoint(f"{err}; read another with --step (available: {others})") from None
    return dataclasses.replace(opened, step=step, weights=opened.layout.weights(params), checkpoint=digest,
                               config_edits=edits)


def each_checkpoint(run_dir: str | pathlib.Path, steps: list[int], overrides: list[str] = ()) -> Iterator[OpenedRun]:
    """The run opened once, with the parameters of each of `steps` in turn.

    A step the run's retention deleted meanwhile is skipped (where it deleted every one, its newest is read
    instead: something is always scored). So is a damaged one, with a warning: one bad
    checkpoint does not cost the evaluation of the others, but once they are done a DamagedCheckpoint names
    every one skipped, so that the result never looks complete when it is not.
    """
    opened = _without_params(pathlib.Path(run_dir), overrides)
    damaged: dict[int, str] = {}
    scored, deleted = 0, 0
    for step in steps:
        failure = None
        try:
            params, _, digest, edits = read_params(opened.run_dir, step, opened.layout.target, overrides)
        except DamagedCheckpoint as err:
            failure = str(err)
        except CheckpointError:
            if (checkpoint_dir(opened.run_dir) / str(step)).is_dir():
                raise
            log.warning("checkpoint %d was deleted by the run's retention before it was read; skipped", step)
            deleted += 1
            continue
        if not on_every_process(failure is None):  # all skip it together, or they would wait for each other
            damaged[step] = failure or f"checkpoint {step} could not be read by another process"
            log.warning("%s; skipped", damaged[step])
            continue
        opened.step, opened.weights = step, opened.layout.weights(params)
        opened.checkpoint, opened.config_edits = digest, edits
        scored += 1
        yield opened
    if not scored and deleted:  # a run keeping few checkpoints deleted every one listed: it keeps a newer one
        log.info("the run's retention deleted every checkpoint listed before it was read; reading its newest")
        params, step, digest, edits = read_params(opened.run_dir, None, opened.layout.target, overrides)
        opened.step, opened.weights = step, opened.layout.weights(params)
        opened.checkpoint, opened.config_edits = digest, edits
        yield opened
    if damaged:
        which = f"checkpoint{'s' * (len(damaged) > 1)} {', '.join(map(str, damaged))}"
        raise DamagedCheckpoint(f"skipped {which} ({len(damaged)} of {len(steps)}): {next(iter(damaged.values()))}")


def chosen_checkpoints(run_dir: str | pathlib.Path, step: int | None, overrides: list[str],
                       all_steps: bool) -> Iterable[OpenedRun]:
    """What `--step` / `--all` chose: checkpoint `step` (default: the newest), or each committed one in turn."""
    if all_steps:
        return each_checkpoint(run_dir, committed_steps(checkpoint_dir(pathlib.Path(run_dir))), overrides)
    return [open_run(run_dir, step, overrides)]


def _without_params(run_dir: pathlib.Path, overrides: list[str]) -> OpenedRun:
    """The run's config, task, mesh and model layout, checked to hold a checkpoint; no parameters read yet."""
    cfg = load_run_config(run_dir, overrides)
    stop_together(lambda: require_checkpoint(run_dir))
    task, mesh = make_task(cfg, run_dir), make_mesh(cfg.mesh)
    rules = resolve_rules(cfg.sharding.preset, cfg.sharding.rules)
    layout = plan_models(task, mesh, rules, cfg.train.seed)
    check_fits("reading this model's parameters", {"parameters": layout.bytes_per_device()})
    return OpenedRun(run_dir=run_dir, cfg=cfg, task=task, mesh=mesh, layout=layout, step=-1, weights=None,
                     eval_step=compile_eval_step(task, layout, mesh, rules))


def check_against_checkpoint(run_dir: pathlib.Path, step: int) -> list[str]:
    """What checkpoint `step` records against the run directory: the run's tokenizer must be the one it was
    trained with; config.yaml's model settings that differ from those it was trained with are named in a
    warning (shapes that differ are refused by the restore). config.yaml holds a run's latest settings: an
    older step of a run continued with, say, another `model.rope_theta` was trained with the earlier one, and
    so was every checkpoint of a run whose config.yaml was edited by hand. Returns those settings."""
    meta = read_step_meta(checkpoint_dir(run_dir), step)
    check_kept_tokenizer(run_dir, step, meta.get("inputs", {}))
    if changes := _model_edits(run_dir, meta):
        log.warning("checkpoint %d was trained with other model settings than %s holds: %s",
                    step, run_dir / "config.yaml", listed(changes, 6))
    return changes


def edited_model_settings(run_dir: pathlib.Path, step: int) -> list[str] | None:
    """config.yaml's model settings unlike those checkpoint `step` was trained with, as a result scored now
    would record them (`scored_as`); None where the checkpoint cannot be read (deleted meanwhile, say)."""
    try:
        return _model_edits(run_dir, read_step_meta(checkpoint_dir(run_dir), step))
    except CheckpointError:
        return None


def _model_edits(run_dir: pathlib.Path, meta: dict) -> list[str]:
    trained = meta.get("config", {}).get("model")
    if not trained:
        return []
    # Against config.yaml alone: a setting given on the command line is no surprise (a result records those).
    configured = load_config(run_dir / "config.yaml").model.model_dump(mode="json")
    shared = set(trained) & set(configured)  # a setting added to jaxgen since is not a change
    return changed_settings({"model": {k: trained[k] for k in shared}}, {"model": {k: configured[k] for k in shared}})


def check_kept_tokenizer(run_dir: pathlib.Path, step: int, inputs: dict) -> None:
    """The run directory's tokenizer is the one checkpoint `step` was trained with (`inputs`: what it recorded).
    A damaged file that still parses, or another one copied over it, would make sample, eval and export use
    other tokens than the model learnt, without a word (training itself refuses to resume with it)."""
    recorded, kept = inputs.get("tokenizer_sha256"), tokenizer_file_in(run_dir)
    if recorded is None or kept is None:
        return  # a model without a tokenizer (images), or one the run does not keep
    versions = tuple((path.name, path.stat().st_mtime_ns, path.stat().st_size)
                     for path in kept_tokenizer_files(run_dir) if path.is_file())
    digest = _tokenizer_digest(str(run_dir), versions)
    if digest != recorded:
        source = f" (the run took it from {inputs['tokenizer_path']!r})" if inputs.get("tokenizer_path") else ""
        raise CheckpointError(f"{str(kept)!r} is not the tokenizer checkpoint {step} was trained with (its sha256 "
                              f"{digest[:16]}..., the checkpoint's {recorded[:16]}...): it was damaged or "
                              f"replaced; put the run's own tokenizer back{source}")


@functools.lru_cache(maxsize=8)
def _tokenizer_digest(run_dir: str, versions: tuple) -> str:
    """The digest of the tokenizer a run keeps, computed once per version of its files (`versions`: name,
    mtime, size of each; `eval --all` asks once per step)."""
    return load_tokenizer(run_dir).sha256


def save_imported_run(run_dir: pathlib.Path, cfg: Config, params: dict, source: str | pathlib.Path,
                      inputs: dict) -> None:
    """An imported model as a run: its config.yaml and checkpoint 0 holding the parameters (nothing else)."""
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    meta = {"config": cfg.model_dump(mode="json"), "imported_from": str(source), "inputs": inputs}
    ckpt = Checkpointer(checkpoint_dir(run_dir), cfg.checkpoint)
    try:
        ckpt.save(0, {"params": params}, {}, meta)
        ckpt.wait()
    except CheckpointWriteError as err:
        # Said as a failed write of the new run (the caller names it), not as a training run's lost checkpoint.
        if err.errno:
            raise OSError(err.errno, err.reason, str(run_dir)) from err
        raise CheckpointWriteError(f"writing the imported checkpoint failed: {err.reason}") from err
    ckpt.close()
