"""In-memory LM data: the corpus tokenized once, then random windows of it.

Fits corpora up to a few hundred MB of text (the bundled Bible is 4 MB). Batch
n is a pure function of (seed, n), so it is identical on any number of processes
and resuming needs only the step counter.
"""

from __future__ import annotations

import numpy as np

from jaxgen.data.corpus import DataError, iter_documents, resolve_files
from jaxgen.data.pipeline import process_rows
from jaxgen.data.tokenizer import BOS_ID, EOS_ID, Tokenizer


def split_documents(pattern: str | None, every_nth: int) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split: every n-th document is held out."""
    train, held_out = [], []
    for i, doc in enumerate(iter_documents(resolve_files(pattern))):
        (held_out if i % every_nth == every_nth - 1 else train).append(doc)
    if not held_out:
        raise DataError(f"data.path {pattern!r} holds fewer than {every_nth} documents; no held-out split possible")
    return train, held_out


def tokenize_stream(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """Documents as one int32 stream, each wrapped in BOS ... EOS."""
    pieces = [np.asarray([BOS_ID, *ids, EOS_ID], np.int32) for ids in tokenizer.encode(docs)]
    return np.concatenate(pieces)


def windows_to_batch(windows: np.ndarray) -> dict[str, np.ndarray]:
    """(b, L+1) token windows -> next-token inputs, targets and loss weights."""
    return {
        "inputs": windows[:, :-1],
        "targets": windows[:, 1:],
        "weights": np.ones(windows[:, 1:].shape, np.float32),
    }


class RandomWindows:
    """Infinite training batches of random (seq_len+1)-token windows."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        if len(tokens) < seq_len + 2:
            raise DataError(
                f"the training text has {len(tokens)} tokens, fewer than one sequence of data.seq_len={seq_len}"
            )
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.rows = process_rows(global_batch)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)[self.rows]
        self.step += 1
        return windows_to_batch(self.tokens[starts[:, None] + np.arange(self.seq_len + 1)])

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def eval_batches(tokens: np.ndarray, seq_len: int, global_batch: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches: consecutive windows from the start, identical on every run."""
    n_windows = n_batches * global_batch
    stride = seq_len + 1
    if len(tokens) < stride:
        raise DataError(f"the held-out text has {len(tokens)} tokens, fewer than one sequence of {stride}")
    reps = -(-n_windows * stride // len(tokens))  # wrap around a small held-out split
    stream = np.tile(tokens, reps)[: n_windows * stride].reshape(n_batches, global_batch, stride)
    rows = process_rows(global_batch)
    return [windows_to_batch(w[rows]) for w in stream]
