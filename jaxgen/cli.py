"""`jaxgen` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import sys
import traceback

from jaxgen import distributed
from jaxgen.config import ConfigError, load_config
from jaxgen.data.corpus import DataError


def default_run_dir(config_path: str | None) -> pathlib.Path:
    name = pathlib.Path(config_path).stem if config_path else "lm_default"
    return pathlib.Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # every config error surfaces before JAX starts
    distributed.initialize(distributed_settings(args))
    from jaxgen.train.loop import train

    run_dir = pathlib.Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    summary = train(cfg, run_dir)
    sample = summary.pop("sample", None)
    print(json.dumps(summary, indent=2))
    if sample is not None:
        print(f"\nsample: {sample}")
    print(f"\nrun directory: {run_dir}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jaxgen.data.prepare import prepare_dataset
    from jaxgen.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else None
    summary = prepare_dataset(args.input, args.out, field=args.field, tokenizer=tokenizer,
                              validation_every_nth=args.validation_every_nth, invalid_utf8=args.invalid_utf8)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxgen.data.corpus import iter_documents, resolve_files
    from jaxgen.data.tokenizer import train_tokenizer

    documents = iter_documents(resolve_files(args.input, "--input"), args.field, args.invalid_utf8)
    tokenizer = train_tokenizer(documents, args.vocab_size, args.out, args.model_type)
    print(json.dumps({"out": str(tokenizer.path), "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256}))
    return 0


def cmd_launch_local(args: argparse.Namespace) -> int:
    from jaxgen.launch import launch_local

    command = args.jaxgen_args[1:] if args.jaxgen_args[:1] == ["--"] else args.jaxgen_args
    if not command:
        raise ConfigError("jaxgen launch local: give the command after --, e.g. -- train --config configs/lm_tiny.yaml")
    return launch_local([sys.executable, "-m", "jaxgen", *command], args.processes, args.devices_per_process, args.port)


def distributed_settings(args: argparse.Namespace) -> distributed.DistributedSettings:
    return distributed.settings_from({name: getattr(args, name) for name in distributed.ENV})


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process runs (each flag falls back to its JAXGEN_* environment variable; a single process needs none)"
    )
    env = distributed.ENV
    group.add_argument("--coordinator-address", metavar="HOST:PORT", help=f"process 0's address [{env['coordinator_address']}]")
    group.add_argument("--num-processes", type=int, metavar="N", help=f"processes in the run [{env['num_processes']}]")
    group.add_argument("--process-id", type=int, metavar="I", help=f"this process, 0..N-1 [{env['process_id']}]")
    group.add_argument("--cluster", choices=distributed.CLUSTERS,
                       help=f"auto (default): explicit settings or a detected multi-process SLURM / Open MPI / "
                            f"Kubernetes / GKE TPU job; jax: always use JAX's detection (Cloud TPU VMs); none [{env['cluster']}]")
    group.add_argument("--init-timeout", dest="init_timeout_s", type=int, metavar="S",
                       help=f"seconds to wait for all processes to join (default 300) [{env['init_timeout_s']}]")
    group.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=int, metavar="S",
                       help=f"seconds of silence before a process counts as dead (default 30) [{env['heartbeat_timeout_s']}]")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgen", description="Train generative models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (defaults: a small LM on the bundled corpus)")
    train.add_argument("--config", help="YAML config file (default: the embedded default config)")
    train.add_argument("--run-dir", help="output directory (default: runs/<config-name>-<timestamp>)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50")
    add_distributed_flags(train)
    train.set_defaults(func=cmd_train)

    launch = commands.add_parser("launch", help="start a multi-process run").add_subparsers(dest="where", required=True)
    local = launch.add_parser(
        "local", help="N processes on this machine over loopback, each with M CPU devices",
        usage="jaxgen launch local [--processes N] [--devices-per-process M] [--port P] -- train ARGS...",
    )
    local.add_argument("--processes", type=positive_int, default=2, metavar="N", help="JAX processes (default 2)")
    local.add_argument("--devices-per-process", type=positive_int, default=4, metavar="M",
                       help="simulated CPU devices per process (default 4)")
    local.add_argument("--port", type=positive_int, metavar="P", help="coordinator port on 127.0.0.1 (default: a free one)")
    local.add_argument("jaxgen_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS", help="the jaxgen command each process runs")
    local.set_defaults(func=cmd_launch_local)

    inputs = argparse.ArgumentParser(add_help=False)
    inputs.add_argument("--input", required=True, metavar="GLOB", help="text files (a document per line) or .jsonl files; .gz accepted")
    inputs.add_argument("--field", default="text", help="the document field of .jsonl lines (default: text)")
    inputs.add_argument("--invalid-utf8", choices=["skip", "error"], default="skip",
                        help="skip lines that are not UTF-8 (counted in a warning; default) or fail")

    data = commands.add_parser("data", help="prepare datasets").add_subparsers(dest="action", required=True)
    prepare = data.add_parser("prepare", parents=[inputs], help="convert text/JSONL files into an ArrayRecord dataset (data.path)")
    prepare.add_argument("--out", required=True, metavar="DIR", help="new dataset directory")
    prepare.add_argument("--tokenizer", metavar="FILE.model", help="store token ids made with this sentencepiece model instead of text")
    prepare.add_argument("--validation-every-nth", type=positive_int, default=50, metavar="N",
                         help="every N-th document goes to the validation split (default 50)")
    prepare.set_defaults(func=cmd_data_prepare)

    tokenizer = commands.add_parser("tokenizer", help="train tokenizers").add_subparsers(dest="action", required=True)
    tok_train = tokenizer.add_parser("train", parents=[inputs], help="train a lossless sentencepiece model (data.tokenizer)")
    tok_train.add_argument("--vocab-size", type=positive_int, required=True, metavar="N")
    tok_train.add_argument("--out", required=True, metavar="FILE.model")
    tok_train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tok_train.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point. In a multi-process run a failing process leaves at once (see `distributed.exit_status`)."""
    try:
        status = run_command(argv)
    except Exception:
        if not distributed.is_multiprocess():
            raise
        traceback.print_exc()
        status = 1
    return distributed.exit_status(status)


def run_command(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jaxgen").setLevel(logging.INFO)
    from jaxgen.checkpoint import CheckpointError, CheckpointWriteError
    from jaxgen.train.loop import NonFiniteError
    from jaxgen.train.preemption import EXIT_PREEMPTED, Preempted

    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"jaxgen: error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointWriteError) as err:
        print(f"jaxgen: error: {err}", file=sys.stderr)
        return 1
    except Preempted as err:
        print(f"jaxgen: {err}; run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
