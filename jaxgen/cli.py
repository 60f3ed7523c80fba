"""`jaxgen` command line: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import pathlib
import sys

from jaxgen.config import ConfigError, load_config
from jaxgen.data.corpus import DataError


def default_run_dir(config_path: str | None) -> pathlib.Path:
    name = pathlib.Path(config_path).stem if config_path else "lm_default"
    return pathlib.Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # every config error surfaces before JAX starts
    from jaxgen.train.loop import train

    run_dir = pathlib.Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    summary = train(cfg, run_dir)
    sample = summary.pop("sample", None)
    print(json.dumps(summary, indent=2))
    if sample is not None:
        print(f"\nsample: {sample}")
    print(f"\nrun directory: {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxgen", description="Train generative models with JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (defaults: a small LM on the bundled corpus)")
    train.add_argument("--config", help="YAML config file (default: the embedded default config)")
    train.add_argument("--run-dir", help="output directory (default: runs/<config-name>-<timestamp>)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jaxgen").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        print(f"jaxgen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
