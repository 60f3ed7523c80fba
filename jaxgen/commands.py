"""What each `jaxgen` command does with its parsed arguments: checks that need no library, then one call into
the library and what it prints. The parser (`jaxgen.cli`) names these as each command's `func`."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import logging
import os
import pathlib
import shlex
import sys
import time
from collections.abc import Callable, Iterator

from jaxgen import distributed, strict_json
from jaxgen.cli_arguments import directory_to_write
from jaxgen.config import RUN_CONFIG_DAMAGED, load_config
from jaxgen.errors import ConfigError, OutputWriteError, UsageError, os_error_words
from jaxgen.interrupts import advise, again, end_cleanly_on_ctrl_c, name_the_run_dir, streamed
from jaxgen.outputs.run_dir_check import check_outside_checkpoints, check_run_dir, check_step

RUNS_FOLDER = "runs"  # where a train without --run-dir puts its run, under the working directory


def report(text: str, done: str) -> None:
    """Print what a finished command made; `done` says where it is. Where stdout cannot take it (a reader that
    has gone, a full disk behind it) the work is still whole: a warning says so and where, and the command
    succeeds (a job script would otherwise retry, and be refused by the output it already made)."""
    try:
        print(text, flush=True)
    except OSError as err:
        logging.getLogger("jaxgen").warning("standard output could not be written (%s); %s", stdout_failure(err),
                                            done)


def stdout_failure(err: OSError) -> str:
    """Why stdout failed, in words; and stdout is pointed at nothing from here on, so that Python's own flush as
    the process ends does not fail again (with a traceback and status 120)."""
    with contextlib.suppress(OSError, ValueError):
        sink = os.open(os.devnull, os.O_WRONLY)
        os.dup2(sink, sys.stdout.fileno())
        os.close(sink)
    return "its reader has gone: broken pipe" if err.errno == errno.EPIPE else (
        os_error_words(err.errno) if err.errno else str(err))


class ShownWhileItCan:
    """`on_result` for results that are also recorded: once showing one fails (stdout's reader gone, a full
    disk behind it), the rest are scored and recorded without it, and `raise_failure` names it at the end."""

    def __init__(self, show: Callable[[dict], None], recorded: str):
        self.show, self.recorded, self.failure = show, recorded, None

    def __call__(self, result: dict) -> None:
        if self.failure is None:
            try:
                self.show(result)
            except OSError as err:
                self.failure = stdout_failure(err)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise OutputWriteError(f"standard output could not be written ({self.failure}); {self.recorded}")


def default_run_dir(config_path: str | None) -> pathlib.Path:
    name = pathlib.Path(config_path).stem if config_path else "lm_default"
    return pathlib.Path(RUNS_FOLDER) / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def cmd_train(args: argparse.Namespace) -> int:
    startup = {"imports": time.time()}  # the phases before training starts, for the run's start-up times
    advise("; run the same command again to continue")  # stopped before the loop: it starts or resumes anew
    try:
        directory_to_write(args.run_dir or str(default_run_dir(args.config).parent))
    except argparse.ArgumentTypeError as err:
        given = "--run-dir" if args.run_dir else f"--run-dir (left out: a new run under {RUNS_FOLDER!r})"
        raise UsageError(f"{given} {err}{'' if args.run_dir else '; give --run-dir in a folder you can write'}") \
            from None
    config, damaged_advice = args.config, None
    if config is None and args.run_dir and (pathlib.Path(args.run_dir) / "config.yaml").is_file():
        config = str(pathlib.Path(args.run_dir) / "config.yaml")  # a run continues with its own settings
        damaged_advice = RUN_CONFIG_DAMAGED
        logging.getLogger("jaxgen").info("continuing %s with its config.yaml (overrides apply on top)", args.run_dir)
    cfg = load_config(config, args.overrides, damaged_advice)  # every config error surfaces before JAX starts
    startup["config"] = time.time()
    distributed.initialize(distributed_settings(args))
    with ipython_hidden():
        from jaxgen.train.loop import train
    startup["train_imports"] = time.time()

    run_dir = pathlib.Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    # Processes start seconds apart; all must use process 0's timestamped default.
    run_dir = pathlib.Path(os.fsdecode(distributed.bytes_from_process_0(os.fsencode(run_dir))))  # any path's bytes
    if not args.run_dir:  # the same command would start a new run: a stop's advice names this one
        name_the_run_dir(str(run_dir))
        advise(f"; {again()} to continue")
    summary = train(cfg, run_dir, startup)
    if not distributed.reports_results():
        return 0
    sample = summary.pop("sample", None)
    report(strict_json.dumps(summary, indent=2) + ("" if sample is None else f"\n\nsample: {sample}")
           + f"\n\nrun directory: {run_dir}", f"the run is complete in {run_dir}")
    return 0


# `data prepare` options of text datasets and of latent datasets; each kind refuses the other's.
PREPARE_TEXT_OPTIONS = ("input", "field", "invalid_utf8", "tokenizer", "validation_every_nth", "validation_block")
PREPARE_IMAGE_OPTIONS = ("autoencoder", "step", "caption_key", "label_key")


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jaxgen.data.prepare import prepare_dataset
    from jaxgen.data.tokenizer import load_tokenizer

    if args.images is not None:
        return cmd_data_prepare_latents(args)
    image_options = [f"--{name.replace('_', '-')}" for name in PREPARE_IMAGE_OPTIONS if getattr(args, name) is not None]
    if image_options:
        raise UsageError(f"{', '.join(image_options)} go with --images SOURCE (a latent dataset), not --input")
    if args.input is None:
        raise UsageError("jaxgen data prepare: give --input GLOB (a text dataset) or --images SOURCE "
                         "--autoencoder RUN_DIR (a latent dataset)")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    summary = prepare_dataset(args.input, args.out, field=args.field, tokenizer=tokenizer,
                              validation_every_nth=args.validation_every_nth, validation_block=args.validation_block,
                              invalid_utf8=args.invalid_utf8)
    report(json.dumps(summary, indent=2), f"the dataset is complete in {args.out}")
    return 0


def cmd_data_prepare_latents(args: argparse.Namespace) -> int:
    import inspect

    from jaxgen.data.prepare import prepare_dataset
    from jaxgen.outputs.latent_dataset_writer import prepare_latent_dataset

    text_defaults = {name: p.default for name, p in inspect.signature(prepare_dataset).parameters.items()}
    text_options = [f"--{name.replace('_', '-')}" for name in PREPARE_TEXT_OPTIONS
                    if getattr(args, name) != text_defaults.get(name)]
    if text_options:
        raise UsageError(f"{', '.join(text_options)} are options of text datasets (--input), not of --images")
    if args.autoencoder is None:
        raise UsageError("--images SOURCE needs --autoencoder RUN_DIR: the autoencoder run that encodes the images")
    manifest = prepare_latent_dataset(args.images, args.autoencoder, args.out, caption_key=args.caption_key,
                                      label_key=args.label_key, step=args.step)
    report(json.dumps(manifest, indent=2), f"the dataset is complete in {args.out}")
    return 0


def cmd_data_g2p(args: argparse.Namespace) -> int:
    from jaxgen.data.g2p import write_g2p_jsonl

    count = write_g2p_jsonl(pathlib.Path(args.out))
    report(json.dumps({"out": args.out, "pairs": count}), f"{args.out} is complete")
    return 0


def cmd_data_synth_shapes(args: argparse.Namespace) -> int:
    from jaxgen.data.synth_shapes import write_shapes_folder

    summary = write_shapes_folder(pathlib.Path(args.out), args.count, args.seed, args.size, progress=True)
    report(json.dumps(summary), f"the images are complete in {args.out}")
    return 0


def cmd_data_fashion_captions(args: argparse.Namespace) -> int:
    from jaxgen.data.fashion_captions import write_fashion_captions

    report(json.dumps(write_fashion_captions(pathlib.Path(args.idx), pathlib.Path(args.out))),
           f"the images are complete in {args.out}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from jaxgen.data.inspect import inspect_data, inspection_tokenizer

    print(json.dumps(inspect_data(cfg, args.batches, inspection_tokenizer(cfg))))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxgen.data.corpus import iter_documents, resolve_files
    from jaxgen.data.tokenizer import train_tokenizer

    files = resolve_files(args.input, "--input", text=True)
    if any(os.path.exists(args.out) and os.path.samefile(args.out, f) for f in files):
        raise UsageError(f"--out {args.out!r} is one of the --input files; the tokenizer would overwrite the corpus")
    if os.path.lexists(args.out):  # runs and datasets made with it could no longer be read, sampled or resumed
        raise UsageError(f"--out {args.out!r} already exists (runs or datasets made with that tokenizer need it); "
                         "choose a new path, or delete it first")
    documents = iter_documents(files, args.field, args.invalid_utf8)
    try:
        tokenizer = train_tokenizer(documents, args.vocab_size, args.out, args.model_type,
                                    source=f"--input {args.input!r}", vocab_option="--vocab-size", replace=False)
    except FileExistsError:  # a tokenizer someone trained meanwhile (two jobs, one --out) is never replaced
        raise UsageError(f"--out {args.out!r} was written by another process while this one trained; it is kept "
                         "as that process wrote it, and this one's tokenizer is not: choose a new path") from None
    report(json.dumps({"out": str(tokenizer.path), "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256}),
           f"the tokenizer is complete in {tokenizer.path}")
    return 0


# The commands whose processes join one JAX run; any other would run once per process, side by side.
MULTI_PROCESS_COMMANDS = ("train", "eval")


def cmd_launch_local(args: argparse.Namespace) -> int:
    from jaxgen.launch import launch_local

    command = args.jaxgen_args[1:] if args.jaxgen_args[:1] == ["--"] else args.jaxgen_args
    if not command:
        raise ConfigError("jaxgen launch local: give the command after --, e.g. -- train --config configs/lm_tiny.yaml")
    from jaxgen.cli import command_names, parse_args  # the parser names these handlers: imported here

    def refuse(name: str) -> None:
        raise UsageError(f"jaxgen launch local runs {' or '.join(MULTI_PROCESS_COMMANDS)}, whose processes join one "
                         f"run; not `jaxgen {name}`, which each process would run on its own, side by side")

    if command[0] in command_names() and command[0] not in MULTI_PROCESS_COMMANDS:  # before its own arguments,
        refuse(command[0])  # whose check would be beside the point
    launched = parse_args(command)  # a mistyped command is one line here, not one per process after they all started
    if launched.command not in MULTI_PROCESS_COMMANDS:
        refuse(" ".join(a for a in (launched.command, getattr(launched, "action", None)) if a))
    # Each process's place in the run is the launcher's to give: one flag given to all of them (--process-id 1)
    # left every process waiting for the others to join, until the join timeout.
    placed = {"coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
              "process_id": "--process-id", "cluster": "--cluster", "cpu_devices": "--cpu-devices"}
    given = [flag for name, flag in placed.items() if getattr(launched, name, None) is not None]
    if given:
        raise UsageError(f"jaxgen launch local gives each process its {', '.join(given)} itself; remove "
                         f"{'it' if len(given) == 1 else 'them'} from the command (choose --processes, "
                         "--devices-per-process and --port of the launcher instead)")
    return launch_local([sys.executable, "-m", "jaxgen", *command], args.processes, args.devices_per_process, args.port)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.all and args.step is not None:
        raise UsageError(f"--step {args.step} and --all choose the checkpoints twice; give --step N for one, "
                         "--all for every one")
    if args.task_data and not args.tasks:
        raise UsageError("--task-data names where benchmark tasks' files are; give the tasks with --tasks")
    check_checkpoint_arguments(args)
    distributed.initialize(distributed_settings(args))
    # Joining a multi-process run gave SIGTERM to JAX's preemption notice, which only a training loop acts on:
    # an eval ignored it. Taken back, it ends the eval at once, with its line.
    end_cleanly_on_ctrl_c()
    if args.tasks:
        from jaxgen.evals.benchmark import evaluate_benchmarks, print_table

        shown = ShownWhileItCan(print_table, f"the results are recorded in {args.run_dir}/evals/")
        evaluate_benchmarks(args.run_dir, args.tasks, args.task_data, args.step, args.overrides, all_steps=args.all,
                            batch_size=args.batch_size, on_result=shown if distributed.reports_results() else None)
        shown.raise_failure()
        return 0
    from jaxgen.outputs.evaluate import evaluate_run

    shown = ShownWhileItCan(lambda result: print(strict_json.dumps(result), flush=True),
                            f"the results are recorded in {args.run_dir}/eval.jsonl")
    evaluate_run(args.run_dir, args.step, args.overrides, all_steps=args.all,
                 on_result=shown if distributed.reports_results() else None)
    shown.raise_failure()
    return 0


# Every `jaxgen sample` option a model family may take; which ones a run takes is its task's business.
SAMPLE_OPTIONS = ("prompt", "negative_prompt", "temperature", "top_k", "top_p", "max_new_tokens",
                  "labels", "num_per_label", "guidance", "sampler", "steps", "out", "save_array", "images", "seed")


def on_process_0_alone(command: str) -> bool:
    """Whether this process runs one-process `command`; one started on every process of a job runs on process 0."""
    if (rank := distributed.another_process_does_it()) is None:
        return True
    logging.getLogger("jaxgen").info("%s runs in one process, process 0 of the job; this is %s: nothing to do here",
                                     command, rank)
    return False


def cmd_sample(args: argparse.Namespace) -> int:
    check_checkpoint_arguments(args)
    if not on_process_0_alone("sample"):
        return 0
    from jaxgen.outputs.sample import sample_run

    given = {name: getattr(args, name) for name in SAMPLE_OPTIONS}
    streaming = given["prompt"] is None or len(given["prompt"]) == 1
    pieces: list[str] = []

    failure: list[str] = []

    def show(piece: str) -> None:  # called inside the decoder (a JAX callback): a failure is kept, not raised
        if not failure:
            try:
                print(piece, end="", flush=True)
            except OSError as err:
                failure.append(stdout_failure(err))
        streamed(piece)
        pieces.append(piece)

    records = sample_run(args.run_dir, given, args.step, args.overrides,
                         on_text=show if streaming else None)
    if failure:
        raise OutputWriteError(f"standard output could not be written ({failure[0]}) while the text was drawn")
    if pieces:  # the text was shown as it came: the record is that text
        print()
    for record in records if not pieces else []:
        print(json.dumps(record))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_checkpoint_arguments(args)
    check_outside_checkpoints(args.out, "--out")
    if not on_process_0_alone("export"):
        return 0
    from jaxgen.outputs.export import export_run

    out = export_run(args.run_dir, args.out, args.format, args.dtype, args.step, args.overrides)
    report(f"exported to {out}", f"the export is complete in {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from jaxgen.outputs.diffusers_vae import import_diffusers, is_diffusers_vae
    from jaxgen.outputs.export import refuse_output_inside
    from jaxgen.outputs.hf_bert import import_bert, is_bert_dir
    from jaxgen.outputs.hf_import import import_hf
    from jaxgen.outputs.hf_t5 import import_t5, is_t5_dir

    refuse_output_inside(args.out, args.source, "--from")
    # Its own config.yaml first: a config of other settings alike in shapes would fine-tune another function.
    if is_diffusers_vae(args.source):
        out = import_diffusers(args.source, args.out)
        where = shlex.quote(str(out))  # a line to paste into a shell, whatever the path holds
        report(f"imported into {out}; fine-tune with --config {shlex.quote(str(out / 'config.yaml'))} "
               f"checkpoint.init_from={where}", f"the import is complete in {out}")
        return 0
    importer = import_bert if is_bert_dir(args.source) else import_t5 if is_t5_dir(args.source) else import_hf
    out = importer(args.source, args.out)
    where = shlex.quote(str(out))
    report(f"imported into {out}; fine-tune with --config {shlex.quote(str(out / 'config.yaml'))} "
           f"checkpoint.init_from={where} data.tokenizer={where}", f"the import is complete in {out}")
    return 0


def check_checkpoint_arguments(args: argparse.Namespace) -> None:
    """`--run-dir` is a run, holding checkpoint `--step` where one is given: a mistake there is named at once,
    not after JAX's import. A run with no checkpoint yet is named so later, after the options are checked
    against its model; the run is checked again as it is opened (it may be training meanwhile)."""
    check_run_dir(args.run_dir)
    if args.step is not None:
        check_step(pathlib.Path(args.run_dir), args.step)


def distributed_settings(args: argparse.Namespace) -> distributed.DistributedSettings:
    return distributed.settings_from({name: getattr(args, name) for name in distributed.ENV})


@contextlib.contextmanager
def ipython_hidden() -> Iterator[None]:
    """Imports in this block find no IPython, as if it were not installed.

    Flax imports IPython (a large share of the train command's imports) only to ask whether
    an IPython shell is running, to colour its printouts; in a command-line process none
    ever is, so the failed import gives the same answer at once.
    """
    if "IPython" in sys.modules:
        yield
        return
    sys.modules["IPython"] = None  # makes `import IPython` raise ImportError
    try:
        yield
    finally:
        del sys.modules["IPython"]
