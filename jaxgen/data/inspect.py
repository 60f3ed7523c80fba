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
from jaxgen.config_models import TEXT_MODEL_KINDS
from jaxgen.data.lm import document_starts, held_out_set, prepare_tokenizer, train_batches
from jaxgen.data.packing import ORIGIN_INDEX, ORIGIN_SOURCE
from jaxgen.data.sources import describe, places, shuffle_settings
from jaxgen.data.splits import Shard
from jaxgen.data.tokenizer import Tokenizer
from jaxgen.errors import ConfigError
from jaxgen.progress import progress_bar


def inspection_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer a new run of `cfg` would use: data.tokenizer, a prepared dataset's own, or one
    trained on the training documents (as the run would train it)."""
    if cfg.model.kind != "transformer":
        reads = ("text as masked-token rows or input-target pairs, which it does not show" if cfg.model.kind in
                 TEXT_MODEL_KINDS else "images (images.*)")
        raise ConfigError(f"jaxgen data inspect shows a decoder language model's packed documents, but "
                          f"model.kind={cfg.model.kind} reads {reads}; give a config with model.kind=transformer")
    with tempfile.TemporaryDirectory(prefix="jaxgen-inspect-") as directory:
        return prepare_tokenizer(cfg, pathlib.Path(directory))


def inspect_data(cfg: Config, batches: int, tokenizer: Tokenizer) -> dict:
    """The documents of the first `batches` global training batches and of the held-out batches, as JSON."""
    data = cfg.data

    def starting(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(source, index) of each document starting in `batch`, row-major: all of a batch that is kept."""
        starts = document_starts(batch, tokenizer)
        return batch[ORIGIN_SOURCE][starts], batch[ORIGIN_INDEX][starts]

    train = train_batches(data, tokenizer, Shard(), origins=True)
    try:
        first = [starting(next(train)) for _ in progress_bar(range(batches), unit="batch", desc="inspect",
                                                             leave=False, disable=batches < 10)]
    finally:
        train.close()
    held_out = held_out_set(data, tokenizer, cfg.train.eval_batches, origins=True)
    sources = data.mixture or [data]

    def documents(taken: list[tuple[np.ndarray, np.ndarray]]) -> list[list]:
        source = np.concatenate([s for s, _ in taken]).tolist()
        index = np.concatenate([i for _, i in taken]).tolist()
        where = {k: iter(places(sources[k], data, [i for s, i in zip(source, index) if s == k])) for k in set(source)}
        return [[s, next(where[s])] for s in source]

    eval_documents = documents([starting(batch) for batch in held_out.batches])
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
