"""The seam between data and trainer.

A pipeline yields *host-local* numpy batches (this process's rows of the global
batch) and can save and restore its position; `to_global` assembles them into
one global array with the trainer's batch sharding.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from jaxgen.sharding import batch_sharding


class BatchIterator(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


def to_global(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process contributes its rows; the result is sharded over the batch axes."""
    return {
        name: jax.make_array_from_process_local_data(batch_sharding(mesh, rows.ndim), rows)
        for name, rows in host_batch.items()
    }


def process_rows(global_batch: int) -> slice:
    """The rows of each global batch that this JAX process supplies."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch % n:
        raise ValueError(f"global batch size {global_batch} is not divisible by {n} processes")
    per = global_batch // n
    return slice(i * per, (i + 1) * per)
