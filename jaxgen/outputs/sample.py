"""`jaxgen sample`: the run's task generates (text for a language model, image grids for a DiT).

The options a family takes are the task's `sample_options`; one given to a
run of another family is refused, naming the run's kind and its options. Every
option is checked before the checkpoint is read, and the files one command
writes (a grid and its arrays) appear together or not at all.
"""

from __future__ import annotations

import glob
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

from jaxgen.config import Config
from jaxgen.diffusion.samplers import max_sample_steps, samplers_for
from jaxgen.distributed import stop_together
from jaxgen.errors import UsageError
from jaxgen.files import unwritable_place, written_together
from jaxgen.outputs.run_dir_check import require_checkpoint
from jaxgen.outputs.runs import load_run_config, open_run
from jaxgen.tasks import make_task
from jaxgen.tasks.image_outputs import requested_labels

log = logging.getLogger("jaxgen")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def sample_run(run_dir: str | pathlib.Path, given: dict[str, Any], step: int | None = None,
               overrides: list[str] = (), on_text: Callable[[str], None] | None = None) -> list[dict]:
    """`given`: options set by the user (None = not given); returns the records to print."""
    cfg = load_run_config(run_dir, overrides)
    task = make_task(cfg, pathlib.Path(run_dir))  # to check the options: nothing is read of the checkpoints
    accepted = task.sample_options
    foreign = [name for name, value in given.items() if value is not None and name not in accepted]
    if foreign:  # before the restore, the expensive part
        raise UsageError(f"{', '.join(map(flag, foreign))} cannot be used with {run_dir}, a model.kind="
                         f"{cfg.model.kind} run; its options: {', '.join(map(flag, accepted))}")
    options = {name: default if given.get(name) is None else given[name] for name, default in accepted.items()}
    check_sampler(cfg, options)  # before the task's own check, which names the config keys they override
    task.check_sample_options(options)  # before the restore, the expensive part
    check_images(options)
    stop_together(lambda: require_checkpoint(pathlib.Path(run_dir)))  # the commoner mistake is named first
    if "out" in options and not options["out"]:  # an image's default place, tried before the model is read
        check_samples_folder(pathlib.Path(run_dir) / "samples")
    stop_together(lambda: task.check_sample_inputs(options, pathlib.Path(run_dir)))
    run = open_run(run_dir, step, overrides)
    if "steps" in options:  # a diffusion model: a draw takes steps times images model calls
        log.info("drawing %s images, %s %s steps each", f"{images_asked(cfg, options):,}",
                 f"{options['steps'] or cfg.diffusion.sample_steps:,}", options["sampler"] or cfg.diffusion.sampler)
    with written_together():
        return run.task.generate(run.weights, run.run_dir, run.step, options, on_text)


def check_samples_folder(folder: pathlib.Path) -> None:
    """The run's samples/ folder, where images go without --out, must take new files (a read-only run, a
    colleague's: drawing every image first, it failed at the end)."""
    if (why := unwritable_place(str(folder), directory=True)) is not None:
        raise UsageError(f"images go to the run's samples folder without --out, but {why}; give --out a path you "
                         "can write")


def check_sampler(cfg: Config, options: dict[str, Any]) -> None:
    """`--sampler` and `--steps` (or the config's) against the run's diffusion objective."""
    if "steps" not in options:
        return
    d = cfg.diffusion
    if options["sampler"] and options["sampler"] not in samplers_for(d.objective):
        raise UsageError(f"--sampler {options['sampler']} does not fit this run's diffusion.objective="
                         f"{d.objective!r}; valid: {', '.join(samplers_for(d.objective))}")
    steps, limit = options["steps"] or d.sample_steps, max_sample_steps(d)
    if steps > limit:
        given = f"--steps {steps:,}" if options["steps"] else f"the run's diffusion.sample_steps={steps:,}"
        bound = ("more than jaxgen samples a flow model with"
                 if d.objective == "flow" else f"more than the run's diffusion.timesteps={limit:,}")
        raise UsageError(f"{given} is {bound}; give --steps 1 to {limit:,}")


def check_images(options: dict[str, Any]) -> None:
    """The files `--images` names: each a regular image file whose size Pillow accepts, none an output."""
    if not options.get("images"):
        return
    from jaxgen.data.folder_images import open_image

    files = sorted(glob.glob(options["images"], recursive=True))
    for name in ("out", "save_array"):
        out = options.get(name)
        if out and os.path.exists(out) and any(os.path.samefile(out, file) for file in files):
            raise UsageError(f"{flag(name)} {out!r} is one of the --images files, which it would overwrite; "
                             "give another path")
    for file in files:
        open_image(file).close()


def images_asked(cfg: Config, options: dict[str, Any]) -> int:
    rows = len(options["prompt"] or [""]) if "prompt" in options else len(
        requested_labels(options["labels"], cfg.model.num_classes))
    return rows * options["num_per_label"]
