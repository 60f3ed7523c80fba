"""Is the data pipeline ever the bottleneck? Prints JSON.

Measures tokens/s of the training pipeline alone (read + shuffle + tokenize +
pack + batch) for the default config with 0 and 2 worker processes, and the
tokens/s the default training step consumes on this machine, in the same run.
Target: pipeline / train step >= 20.

    flock /tmp/jaxgen-bench.lock python benchmarks/data_throughput.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np

from jaxgen.config import load_config
from jaxgen.data.lm import prepare_tokenizer, train_batches
from jaxgen.data.pipeline import to_global
from jaxgen.data.splits import Shard
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training


def pipeline_tokens_per_s(cfg, tokenizer, workers: int, batches: int) -> float:
    data = cfg.data.model_copy(update={"workers": workers})
    stream = train_batches(data, tokenizer, Shard())
    for _ in range(5):  # start-up: worker processes, the first shuffle window
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - start
    stream.close()
    return batches * data.batch_size * data.seq_len / elapsed


def train_step_tokens_per_s(cfg, steps: int) -> float:
    training = build_training(cfg, make_mesh(cfg.mesh))
    state = training.init_state()
    rng = np.random.default_rng(0)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    batch = to_global({
        "inputs": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
        "targets": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
        "weights": np.ones(shape, np.float32),
    }, training.mesh)
    step = training.train_step.lower(state, batch).compile()
    state, metrics = step(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * shape[0] * shape[1] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches timed per setting")
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    args = parser.parse_args()

    cfg = load_config()  # the default run: `jaxgen train` with no arguments
    with tempfile.TemporaryDirectory() as run_dir:
        tokenizer = prepare_tokenizer(cfg, pathlib.Path(run_dir))
        pipeline = {f"workers_{w}": pipeline_tokens_per_s(cfg, tokenizer, w, args.batches) for w in (0, 2)}
    train = train_step_tokens_per_s(cfg, args.steps)
    print(json.dumps({
        "config": "default (bundled corpus, seq_len 128, batch 32)",
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "pipeline_tokens_per_s": {k: round(v) for k, v in pipeline.items()},
        "train_step_tokens_per_s": round(train),
        "ratio_pipeline_to_train": {k: round(v / train, 1) for k, v in pipeline.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
