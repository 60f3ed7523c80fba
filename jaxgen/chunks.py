"""Work on many rows as a fixed-size batch at a time, so that a jitted function compiles once and memory stays bounded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np


def padded_chunks(rows: Any, size: int) -> Iterator[tuple[Any, int]]:
    """(chunk, count) for every `size` consecutive rows of `rows` (an array, or a pytree of arrays with the same
    leading axis): each chunk has exactly `size` rows, the last one repeating its final row as padding; `count` is
    how many of its rows are real (the caller keeps `result[:count]`)."""
    total = len(jax.tree.leaves(rows)[0])
    for start in range(0, total, size):
        count = min(size, total - start)
        yield jax.tree.map(lambda x: _pad(np.asarray(x[start:start + count]), size), rows), count


def _pad(chunk: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])


def chunk_size(rows: int, largest: int) -> int:
    """The power of two at least `rows`, at most `largest`: few distinct shapes to compile, little padding."""
    return min(largest, 1 << max(rows - 1, 0).bit_length())
