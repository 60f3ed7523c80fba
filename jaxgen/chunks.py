"""Work on many rows as a fixed-size batch at a time, so that a jitted function compiles once and memory stays bounded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jaxgen.progress import progress_bar


def padded_chunks(rows: Any, size: int) -> Iterator[tuple[Any, int]]:
    """(chunk, count) for every `size` consecutive rows of `rows` (an array, or a pytree of arrays with the same
    leading axis): each chunk has exactly `size` rows, the last one repeating its final row as padding; `count` is
    how many of its rows are real (the caller keeps `result[:count]`)."""
    total = len(jax.tree.leaves(rows)[0])
    for start in range(0, total, size):
        count = min(size, total - start)
        yield jax.tree.map(lambda x: _pad(np.asarray(x[start:start + count]), size), rows), count


def map_chunks(fn: Callable[[Any, int], Any], rows: Any, size: int, progress: str | None = None) -> Any:
    """What `fn` would give for all `rows` at once, computed `size` rows at a time: `fn(chunk, index)` runs on each
    chunk of `padded_chunks` (`index` counts chunks, e.g. to fold into a random key) and returns an array, or a
    pytree of arrays, with one row per chunk row; the rows are brought to the host, padding dropped, and joined.
    With no rows, `fn` is only traced (`jax.eval_shape`) for the shapes of the empty result.
    `progress`: a progress bar of that name counts the chunks (when there are several)."""
    chunks = padded_chunks(rows, size)
    if progress is not None:
        total = -(-len(jax.tree.leaves(rows)[0]) // size)
        chunks = progress_bar(chunks, total=total, desc=progress, unit="batch", leave=False, dynamic_ncols=True,
                              disable=total < 2)
    parts = [jax.tree.map(lambda out: np.asarray(out)[:count], jax.device_get(fn(chunk, index)))
             for index, (chunk, count) in enumerate(chunks)]
    if not parts:
        shapes = jax.eval_shape(lambda chunk: fn(chunk, 0), rows)
        return jax.tree.map(lambda shape: np.zeros(shape.shape, shape.dtype), shapes)
    return jax.tree.map(lambda *outs: np.concatenate(outs), *parts)


def _pad(chunk: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])


def chunk_size(rows: int, largest: int) -> int:
    """The power of two at least `rows`, at most `largest`: few distinct shapes to compile, little padding."""
    return min(largest, 1 << max(rows - 1, 0).bit_length())
