"""Per-step agreement on data between processes: every process gets its batch for a step, or none does.

Processes may hold uneven shares of the data: one may run out (a finite share)
or fail to read (a share with no documents, a bad record) while the others
have batches. Before a batch is used, the processes exchange one status each;
if any has no batch, all raise at this same step, instead of one leaving and
the others waiting for it in the step's collectives until the heartbeat
timeout kills them. The exchange is one tiny collective per step, and only in
multi-process runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from jaxgen.errors import DataError


class DataExhausted(DataError):
    """Some process has no batch for the next step; every process stops at that step."""


_HAS_BATCH, _RAN_OUT, _FAILED = 0, 1, 2


def next_in_lockstep(batches: Iterator[dict[str, np.ndarray]], step: int) -> dict[str, np.ndarray]:
    """This process's batch for `step`, returned on every process or on none."""
    error: DataError | None = None
    try:
        batch, status = next(batches), _HAS_BATCH
    except StopIteration:
        batch, status = None, _RAN_OUT
    except DataError as err:
        batch, status, error = None, _FAILED, err
    statuses = _gather_statuses(status)
    if (statuses == _HAS_BATCH).all():
        return batch
    if error is not None:
        raise error
    ran_out = ", ".join(str(i) for i in np.flatnonzero(statuses == _RAN_OUT))
    failed = ", ".join(str(i) for i in np.flatnonzero(statuses == _FAILED))
    what = [f"ran out on process {ran_out}" if ran_out else "", f"failed on process {failed} (see its log)" if failed else ""]
    fewer_steps = f", or set train.steps <= {step - 1}" if step > 1 else ""
    raise DataExhausted(
        f"training data {' and '.join(w for w in what if w)} before step {step} ({len(statuses)} processes); "
        f"every process stops at step {step}. Give every process an equal share of the data{fewer_steps}"
    )


def _gather_statuses(status: int) -> np.ndarray:
    """Every process's status, indexed by process."""
    if jax.process_count() == 1:
        return np.asarray([status])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(status, np.int32))).reshape(-1)
