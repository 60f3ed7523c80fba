"""`jaxgen data inspect`: where the first training batches come from and what the held-out set is.

The batches are the trainer's own (`lm.train_batches`, `lm.held_out_set`), asked to carry each
token's document's source and number; a document is listed where it starts (its BOS token),
batch after batch, row after row, so a document cut across two rows is listed once.
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

from jaxgen.config import Config
from jaxgen.data.lm import document_starts, held_out_set, prepare_tokenizer, train_batches
from jaxgen.data.packing import ORIGIN_INDEX, ORIGIN_SOURCE
from jaxgen.data.sources import describe, places, shuffle_settings
from jaxgen.data.splits import Shard
from jaxgen.data.tokenizer import Tokenizer
from jaxgen.errors import ConfigError


def inspection_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer a new run of `cfg` would use: data.tokenizer, a prepared dataset's own, or one
    trained on the training documents (as the run would train it)."""
    if cfg.model.kind != "transformer":
        raise ConfigError(f"jaxgen data inspect reads a language model's documents, but model.kind={cfg.model.kind} "
                          "reads images (images.*); give a config with model.kind=transformer")
    with tempfile.TemporaryDirectory(prefix="jaxgen-inspect-") as directory:
        return prepare_tokenizer(cfg, pathlib.Path(directory))


def inspect_data(cfg: Config, batches: int, tokenizer: Tokenizer) -> dict:
    """The documents of the first `batches` global training batches and of the held-out batches, as JSON."""
    data = cfg.data
    train = train_batches(data, tokenizer, Shard(), origins=True)
    try:
        first = [next(train) for _ in range(batches)]
    finally:
        train.close()
    held_out = held_out_set(data, tokenizer, cfg.train.eval_batches, origins=True)
    sources = data.mixture or [data]

    def documents(taken: list[dict[str, np.ndarray]]) -> list[list]:
        starts = [document_starts(batch, tokenizer) for batch in taken]  # row-major: batch, row, token
        source = np.concatenate([batch[ORIGIN_SOURCE][s] for batch, s in zip(taken, starts)]).tolist()
        index = np.concatenate([batch[ORIGIN_INDEX][s] for batch, s in zip(taken, starts)]).tolist()
        where = {k: iter(places(sources[k], data, [i for s, i in zip(source, index) if s == k])) for k in set(source)}
        return [[s, next(where[s])] for s in source]

    eval_documents = documents(held_out.batches)
    return {
        "batches": batches,
        "sources": [describe(source) for source in sources],
        "train_documents": documents(first),
        "eval_documents": eval_documents,
        "eval_distinct": len({tuple(d) for d in eval_documents}),
        "eval_total": len(eval_documents),
        "eval_batches": len(held_out.batches),
        "eval_tokens": held_out.tokens,
        "eval_whole": held_out.whole,
        "shuffle": shuffle_settings(data),
    }
