"""How long does `jaxgen train` take from process start to its first completed step? Prints JSON lines.

Runs `python -m jaxgen train --config configs/lm_tiny.yaml train.steps=2` as a user runs it
(a subprocess, a new run directory each time), first with an empty persistent compilation
cache (cold), then the same command again with the cache the cold run left (warm); `--repeats`
pairs follow each other. Each pair starts from an empty user cache directory ($XDG_CACHE_HOME,
where `train.compilation_cache_dir: auto` keeps the cache) without JAX_COMPILATION_CACHE_DIR, so
it measures the default set-up of a new user. Only the operating system's file cache carries
over from pair to pair; run it once before timing if the installation itself is cold.

The phases come from the run's summary.json (`startup_s`: seconds from process start to the
end of each: interpreter and CLI imports, config, the train loop's imports, setup (mesh,
abstract model, run directory, Orbax), checkpoint search, data (tokenizer, pipelines, held-out
batches), state init, logs (writers, trackers), compile, actions, the step-0 evaluation, the first step).
`help_s` is the wall time of `jaxgen train --help` (the CLI's own import cost).

One record per run, then the summary: `first_step_s_cold`, `first_step_s_warm` (medians over
repeats), their phase medians and whether the warm figure is within `--target-s`.

    flock /tmp/jaxgen-bench.lock python benchmarks/startup.py
    flock /tmp/jaxgen-bench.lock python benchmarks/startup.py --repeats 3 model.compute_dtype=bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def child_env(cache_home: pathlib.Path) -> dict[str, str]:
    """The environment of a new user's run: its own user cache dir, JAX's cache left to jaxgen."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(cache_home)
    return env


def run_train(config: str, run_dir: pathlib.Path, steps: int, overrides: list[str], env: dict) -> dict:
    """One `jaxgen train` run to completion; its summary.json with the wall time from launch to exit."""
    command = [sys.executable, "-m", "jaxgen", "train", "--config", config, "--run-dir", str(run_dir),
               f"train.steps={steps}", "logging.progress_bar=false", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall_s = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"startup.py: `{' '.join(command)}` failed ({result.returncode}): {result.stderr[-2000:]}")
    return {**json.loads((run_dir / "summary.json").read_text()), "process_wall_s": wall_s}


def run_record(kind: str, repeat: int, summary: dict) -> dict:
    """What one run says about its start: the phases, the compile time and what the cache did."""
    phases = summary["startup_s"]
    cache = summary.get("compilation_cache") or {}
    return {"run": kind, "repeat": repeat, "first_step_s": phases["total"],
            "phases": {k: v for k, v in phases.items() if k != "total"}, "compile_s": summary["compile_s"],
            "cache_hits": cache.get("hits"), "cache_writes": cache.get("writes"),
            "process_wall_s": summary["process_wall_s"]}


def summarize(records: list[dict], target_s: float) -> dict:
    """Medians of the cold and the warm runs' first-step times and phases."""
    out: dict = {"summary": True}
    for kind in ("cold", "warm"):
        runs = [r for r in records if r.get("run") == kind]
        if not runs:
            continue
        out[f"first_step_s_{kind}"] = statistics.median(r["first_step_s"] for r in runs)
        out[f"phases_{kind}"] = {phase: round(statistics.median(r["phases"][phase] for r in runs), 3)
                                 for phase in runs[0]["phases"]}
        out[f"compile_s_{kind}"] = statistics.median(r["compile_s"] for r in runs)
    help_runs = [r["help_s"] for r in records if "help_s" in r]
    if help_runs:
        out["help_s"] = statistics.median(help_runs)
    if "first_step_s_warm" in out:
        out["target_warm_s"] = target_s
        out["warm_within_target"] = out["first_step_s_warm"] <= target_s
    return out


def parse_records(lines: list[str]) -> tuple[list[dict], dict]:
    """This script's output read back: the records and the summary (the last line)."""
    records = [json.loads(line) for line in lines if line.strip()]
    if not records or not records[-1].get("summary"):
        raise ValueError("the last line of benchmarks/startup.py's output is its summary; it is missing")
    return records[:-1], records[-1]


def emit(record: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.compute_dtype=bfloat16")
    parser.add_argument("--config", default="configs/lm_tiny.yaml")
    parser.add_argument("--steps", type=at_least_one, default=2, help="train.steps of each run")
    parser.add_argument("--repeats", type=at_least_one, default=1, help="cold/warm pairs, taking turns")
    parser.add_argument("--target-s", type=float, default=10.0, help="the warm first-step time aimed at")
    args = parser.parse_args()

    records = []
    with tempfile.TemporaryDirectory(prefix="jaxgen-startup-") as tmp:
        root = pathlib.Path(tmp)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jaxgen", "train", "--help"], capture_output=True, check=True,
                       env=child_env(root / "help-cache"), cwd=REPO)
        records.append({"help_s": time.perf_counter() - start})
        emit(records[-1])
        for repeat in range(args.repeats):
            env = child_env(root / f"cache{repeat}")  # empty: the cold run fills it for the warm one
            for kind in ("cold", "warm"):
                summary = run_train(args.config, root / f"{kind}{repeat}", args.steps, args.overrides, env)
                records.append(run_record(kind, repeat, summary))
                emit(records[-1])
    emit(summarize(records, args.target_s))


if __name__ == "__main__":
    main()
