"""Is the data pipeline ever the bottleneck? Prints JSON.

Measures tokens/s of the training pipeline alone (read + shuffle + tokenize +
pack + batch) for the default config with 0 and 2 worker processes, and the
tokens/s the default training step consumes on this machine, in the same run.
The pipeline reads the bundled corpus as its text file, and as the ArrayRecord
and Parquet files it writes first (the same documents, shuffled whole).
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
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter

from jaxgen.config import load_config
from jaxgen.data.corpus import BUNDLED_CORPUS, iter_documents
from jaxgen.data.lm import prepare_tokenizer, train_batches
from jaxgen.data.pipeline import to_global
from jaxgen.data.splits import Shard
from jaxgen.sharding import make_mesh
from jaxgen.train.build import build_training


def write_sources(directory: pathlib.Path, parquet_row_group: int) -> dict[str, list[str]]:
    """The bundled corpus's documents as files of each random-access kind; the overrides that read each."""
    documents = list(iter_documents([BUNDLED_CORPUS]))
    array_record = directory / "corpus.array_record"
    writer = ArrayRecordWriter(str(array_record), "group_size:1")
    for document in documents:
        writer.write(document.encode())
    writer.close()
    parquet = directory / "corpus.parquet"
    pq.write_table(pa.table({"text": documents}), parquet, row_group_size=parquet_row_group)
    return {"text": [], "array_record": [f"data.array_record={array_record}"], "parquet": [f"data.parquet={parquet}"]}


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
    parser.add_argument("--parquet-row-group", type=int, default=1024, help="rows per row group of the Parquet file")
    args = parser.parse_args()

    cfg = load_config()  # the default run: `jaxgen train` with no arguments
    with tempfile.TemporaryDirectory() as run_dir:
        tokenizer = prepare_tokenizer(cfg, pathlib.Path(run_dir))
        sources = write_sources(pathlib.Path(run_dir), args.parquet_row_group)
        pipeline = {source: {f"workers_{w}": pipeline_tokens_per_s(load_config(None, overrides), tokenizer, w,
                                                                    args.batches) for w in (0, 2)}
                    for source, overrides in sources.items()}
    train = train_step_tokens_per_s(cfg, args.steps)
    print(json.dumps({
        "config": "default (bundled corpus, seq_len 128, batch 32)",
        "parquet_row_group": args.parquet_row_group,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "pipeline_tokens_per_s": {s: {k: round(v) for k, v in by.items()} for s, by in pipeline.items()},
        "train_step_tokens_per_s": round(train),
        "ratio_pipeline_to_train": {s: {k: round(v / train, 1) for k, v in by.items()} for s, by in pipeline.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
