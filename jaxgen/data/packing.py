"""Documents -> next-token training rows: tokenize, pack, batch.

Each document becomes `inputs = [BOS, t1..tn]` and `targets = [t1..tn, EOS]` (the
tokenizer's BOS and EOS ids), so
every token is predicted exactly once however documents are cut. Packing is
grain's concatenate-and-split: documents are laid end to end and cut every
`seq_len` tokens, a document crossing a cut continuing in the next row.
`segment_ids` (1, 2, ... per document piece within a row; 0 = padding) and
`positions` (0, 1, ... within each piece) mark the boundaries, so attention can
be masked per document.
"""

from __future__ import annotations

import grain
import numpy as np

from jaxgen.data.tokenizer import Tokenizer


class TokenizeDocument(grain.transforms.Map):
    """A document (text, or token ids from a pre-tokenized dataset), bare or `sources.Numbered` ->
    shifted input/target ids, and with `origins` its source and number at every token."""

    def __init__(self, tokenizer: Tokenizer, origins: bool = False):
        self.tokenizer, self.origins = tokenizer, origins

    def map(self, item: str | np.ndarray | tuple) -> dict[str, np.ndarray]:
        source, index, document = item if isinstance(item, tuple) else (-1, -1, item)
        ids = self.tokenizer.encode_document(document) if isinstance(document, str) else document.astype(np.int32)
        tokens = {
            "inputs": np.concatenate([np.array([self.tokenizer.bos_id], np.int32), ids]),
            "targets": np.concatenate([ids, np.array([self.tokenizer.eos_id], np.int32)]),
        }
        if self.origins:
            tokens |= {ORIGIN_SOURCE: np.full(len(ids) + 1, source, np.int64),
                       ORIGIN_INDEX: np.full(len(ids) + 1, index, np.int64)}
        return tokens


# Batch fields that `jaxgen data inspect` asks for: each token's document's source and number.
ORIGIN_SOURCE, ORIGIN_INDEX = "origin_source", "origin_index"


def rows_of_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features -> the trainer's field names; padding gets zero loss weight."""
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "weights": (segment_ids > 0).astype(np.float32),
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"].astype(np.int32),
        **{name: packed[name] for name in (ORIGIN_SOURCE, ORIGIN_INDEX) if name in packed},
    }


def pack_documents(documents: grain.IterDataset, tokenizer: Tokenizer, seq_len: int,
                   origins: bool = False) -> grain.IterDataset:
    """Rows of exactly `seq_len` tokens, documents concatenated and split (the last row of a finite
    stream padded); with `origins`, each token's document's source and number alongside."""
    tokens = documents.map(TokenizeDocument(tokenizer, origins))
    fields = ("inputs", "targets", ORIGIN_SOURCE, ORIGIN_INDEX) if origins else ("inputs", "targets")
    return grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct={name: seq_len for name in fields})


def batch_rows(packed: grain.IterDataset, batch_size: int, drop_remainder: bool = True) -> grain.IterDataset:
    return packed.batch(batch_size, drop_remainder=drop_remainder).map(rows_of_batch)
