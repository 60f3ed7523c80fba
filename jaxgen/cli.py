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
from jaxgen.config import load_config
from jaxgen.errors import ConfigError, JaxgenError


def default_run_dir(config_path: str | None) -> pathlib.Path:
    name = pathlib.Path(config_path).stem if config_path else "lm_default"
    return pathlib.Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # every config error surfaces before JAX starts
    distributed.initialize(distributed_settings(args))
    from jaxgen.train.loop import train

    run_dir = pathlib.Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    # Processes start seconds apart; all must use process 0's timestamped default.
    run_dir = pathlib.Path(distributed.bytes_from_process_0(str(run_dir).encode()).decode())
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


def cmd_eval(args: argparse.Namespace) -> int:
    distributed.initialize(distributed_settings(args))
    from jaxgen.evaluate import evaluate_run

    for result in evaluate_run(args.run_dir, args.step, args.overrides, all_steps=args.all):
        print(json.dumps(result))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from jaxgen.runs import load_run_config

    if load_run_config(args.run_dir, args.overrides).model.kind != "transformer":
        from jaxgen.generate_images import sample_images

        try:
            labels = [int(x) for x in args.labels.split(",")] if args.labels else []
        except ValueError:
            raise ConfigError(f"--labels {args.labels!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
        print(json.dumps(sample_images(
            args.run_dir, labels, args.num_per_label, guidance=args.guidance, sampler=args.sampler, steps=args.steps,
            seed=args.seed, out=args.out, save_array=args.save_array, step=args.step, overrides=args.overrides,
        )))
        return 0
    from jaxgen.data.tokenizer import BOS_ID, Tokenizer
    from jaxgen.generate import Sampling, generate
    from jaxgen.runs import open_run

    run = open_run(args.run_dir, args.step, args.overrides)
    tokenizer = Tokenizer(pathlib.Path(args.run_dir) / "tokenizer.model")
    prompts = args.prompt or [""]
    ids = [[BOS_ID, *tokenizer.encode([p])[0]] for p in prompts]
    room = run.cfg.model.max_seq_len - max(len(i) for i in ids)
    if room < 1:
        raise ConfigError(f"the longest prompt fills the model's context (model.max_seq_len={run.cfg.model.max_seq_len})")
    streamed: list[int] = []

    def stream(i, tokens_B, done_B) -> None:  # one prompt: print each piece as it is generated
        if not bool(done_B[0]) and int(tokens_B[0]) != 2:
            before = tokenizer.decode(ids[0][1:] + streamed)
            streamed.append(int(tokens_B[0]))
            print(tokenizer.decode(ids[0][1:] + streamed)[len(before):], end="", flush=True)

    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    outputs = generate(run.training.layout.graphdef, run.params, ids, min(args.max_new_tokens, room), sampling,
                       args.seed, on_token=stream if len(prompts) == 1 else None)
    if len(prompts) == 1:
        print()
    else:
        for prompt_ids, new in zip(ids, outputs):
            print(json.dumps({"prompt": tokenizer.decode(prompt_ids[1:]), "text": tokenizer.decode(prompt_ids[1:] + new)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxgen.export import export_run

    out = export_run(args.run_dir, args.out, args.format, args.dtype, args.step, args.overrides)
    print(f"exported to {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from jaxgen.export import import_hf

    out = import_hf(args.source, args.out)
    print(f"imported into {out}; fine-tune with checkpoint.init_from={out} data.tokenizer={out}/tokenizer.model")
    return 0


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

    checkpoint = argparse.ArgumentParser(add_help=False)
    checkpoint.add_argument("--run-dir", required=True, metavar="DIR", help="a run directory with checkpoints")
    checkpoint.add_argument("--step", type=int, metavar="N", help="checkpoint step (default: the latest)")
    checkpoint.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data or mesh keys")

    evaluate = commands.add_parser("eval", parents=[checkpoint], help="held-out loss, perplexity, bits per byte")
    evaluate.add_argument("--all", action="store_true", help="evaluate every checkpoint of the run")
    add_distributed_flags(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    sample = commands.add_parser("sample", parents=[checkpoint], help="generate text (LM) or an image grid (DiT)")
    sample.add_argument("--prompt", action="append", help="LM prompt; repeat for a batch (default: empty)")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sample.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    sample.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    sample.add_argument("--max-new-tokens", type=positive_int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--labels", help="DiT: comma-separated class labels, e.g. 0,1,2")
    sample.add_argument("--num-per-label", type=positive_int, default=8, help="DiT: samples per label")
    sample.add_argument("--guidance", type=float, help="DiT: classifier-free guidance scale (default: the config's)")
    sample.add_argument("--sampler", help="DiT: ddpm, ddim, euler or heun (default: the config's)")
    sample.add_argument("--steps", type=positive_int, help="DiT: sampling steps (default: the config's)")
    sample.add_argument("--out", help="DiT: the PNG grid to write (default: RUN_DIR/samples/sample.png)")
    sample.add_argument("--save-array", metavar="FILE.npz", help="DiT: also save images (N,H,W[,C] in [0,1]) and labels")
    sample.set_defaults(func=cmd_sample)

    export = commands.add_parser("export", parents=[checkpoint], help="write weights for other tools")
    export.add_argument("--format", choices=["hf", "safetensors"], default="hf",
                        help="hf: a Hugging Face LlamaForCausalLM directory; safetensors: the raw parameter tree")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    export.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) output directory")
    export.set_defaults(func=cmd_export)

    import_ = commands.add_parser("import", help="a local Hugging Face Llama checkpoint into a jaxgen run directory")
    import_.add_argument("--from", dest="source", required=True, metavar="HF_DIR")
    import_.add_argument("--out", required=True, metavar="DIR")
    import_.set_defaults(func=cmd_import)
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
    from jaxgen.train.preemption import EXIT_PREEMPTED, Preempted

    try:
        return args.func(args)
    except JaxgenError as err:
        print(f"jaxgen: error: {err}", file=sys.stderr)
        return err.exit_status
    except Preempted as err:
        print(f"jaxgen: {err}; run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
