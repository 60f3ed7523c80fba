"""The seam between data and trainer.

A pipeline yields *host-local* numpy batches (this process's rows of the global
batch) and can save and restore its position; `to_global` assembles them into
one global array with the trainer's batch sharding. `GrainBatches` adapts any
grain dataset of such batches to that interface, whatever its records are
(tokens, images).
"""

from __future__ import annotations

import ast
import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jaxgen.data.splits import Shard
from jaxgen.errors import DataError, JaxgenError
from jaxgen.sharding import batch_sharding


class RandomAccessSource(Protocol):
    """What grain reads by index: prepared/TFDS/ArrayRecord splits, in-memory images, ..."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any:
        """One record: text, bytes, or a dict of numpy values (e.g. {'image': uint8 HxWxC, 'label': int})."""


class ShardedStream(grain.IterDataset):
    """A source read in order (text files, TFRecord), which readers split by striding: `shard`.

    grain's worker processes split a process's shard again through `set_slice`, each taking
    `slice(worker, None, workers)`; striding is the only split a stream supports, so it serves
    sequential slicing too.
    """

    def __init__(self, shard: Shard):
        super().__init__()
        self.shard = shard
        # grain may slice the same copy again (e.g. when restoring workers): always from this.
        self.process_shard = shard

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice
        self.shard = self.process_shard.within(sl.start or 0, sl.step or 1)


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


@contextlib.contextmanager
def user_errors_unwrapped() -> Iterator[None]:
    """A user's data mistake raised inside a grain pipeline leaves the block as itself.

    grain adds notes about its filtered frames to exceptions passing through it, and may wrap
    them (e.g. a worker process's failure); the user needs only the original one-line error.
    """
    try:
        yield
    except Exception as err:
        original = _user_error_in_chain(err)
        if original is None:
            raise
        if hasattr(original, "__notes__"):
            del original.__notes__
        raise original from None


def _user_error_in_chain(err: BaseException) -> JaxgenError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, JaxgenError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def this_process() -> Shard:
    return Shard(jax.process_index(), jax.process_count())


def process_rows(global_batch: int, shard: Shard) -> slice:
    """The rows of each global batch that the process `shard` supplies."""
    if global_batch % shard.count:
        raise ValueError(f"global batch size {global_batch} is not divisible by {shard.count} processes")
    per = global_batch // shard.count
    return slice(shard.index * per, (shard.index + 1) * per)


def prefetched(dataset: grain.IterDataset, workers: int, buffer: int) -> grain.IterDataset:
    """Batches made ahead of time: in `workers` processes, or in one background thread when 0."""
    if workers == 0:
        return grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=buffer)
    # grain's worker processes read absl flags, which a non-absl program never parses.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))


def record_epochs(records: RandomAccessSource, shard: Shard, seed: int | None, what: str,
                  epochs: int | None = None) -> grain.MapDataset:
    """This process's slice of the records for `epochs` passes (None: endless), shuffled whole every epoch when seeded.

    Unseeded, they come in order. `what` names them in the error for a process that would get none.
    """
    dataset = grain.MapDataset.source(records)[shard.index::shard.count]
    if len(dataset) == 0:
        raise DataError(f"{what} holds {len(records)} records, too few for {shard.count} processes to get one each")
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.repeat(epochs)


def record_batches(records: grain.IterDataset, global_batch: int, shard: Shard, *, seed: int,
                   transforms: Sequence[grain.transforms.Map | grain.transforms.RandomMap] = (),
                   workers: int = 0, prefetch: int = 4) -> GrainBatches:
    """This process's rows of endless global batches of whole records, each record transformed first.

    Random transforms draw from (seed, process, record position), so batches are the same
    however often the pipeline is restored, and processes do not mirror each other's draws.
    """
    rows = process_rows(global_batch, shard)
    process_seed = int(np.random.SeedSequence([seed, shard.index]).generate_state(1)[0])
    dataset = records.seed(process_seed).apply(list(transforms)) if transforms else records
    return GrainBatches(prefetched(dataset.batch(rows.stop - rows.start, drop_remainder=True), workers, prefetch))


class GrainBatches:
    """A `BatchIterator` over a grain dataset; its state is grain's, JSON-serialisable."""

    def __init__(self, dataset: grain.IterDataset):
        self._holder = [iter(dataset)]
        # Prefetch threads and worker processes must stop before the interpreter tears down,
        # or the process aborts at exit; finalizers run at exit while modules are still alive.
        self.close = weakref.finalize(self, _close_and_drop, self._holder)

    def __iter__(self) -> GrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        with user_errors_unwrapped():
            batch = next(self._holder[0])
        # Copies out of grain's worker shared memory, which must not outlive the iterator.
        return {name: np.array(field) for name, field in batch.items()}

    def get_state(self) -> dict[str, str]:
        # grain's state holds tuples that a JSON round trip would turn into lists (and grain then
        # misreads), so it travels as a Python literal inside a JSON-safe dict.
        return {"grain_state": repr(self._holder[0].get_state())}

    def set_state(self, state: dict[str, str]) -> None:
        self._holder[0].set_state(ast.literal_eval(state["grain_state"]))


def _close_and_drop(holder: list) -> None:
    # Dropping the last reference lets grain's own __del__ run now rather than mid-teardown.
    holder.pop().close()
