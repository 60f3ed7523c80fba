"""The seam between data and trainer.

A pipeline yields *host-local* numpy batches (this process's rows of the global
batch) and can save and restore its position; `to_global` assembles them into
one global array with the trainer's batch sharding.

Every global batch is made of `data.streams` reader streams side by side, each
reading its own share of the documents or records and supplying
`batch_size / streams` rows. The streams are fixed by the config, not by the
process count: a process reads only the streams whose rows its devices hold,
so the global batch of step N is the same on 1 process or 8, and a position
saved on one process count is re-split onto another (`merged_position`).
`GrainBatches` adapts such a grain dataset to the trainer, whatever its records
are (tokens, images).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import os
import re
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jaxgen.data.splits import Shard
from jaxgen.device_memory import usable_cores
from jaxgen.errors import ConfigError, DataError, JaxgenError, listed_or
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
            if (failure := _worker_failure(err)) is not None:
                raise DataError(failure) from None
            raise
        if hasattr(original, "__notes__"):
            del original.__notes__
        raise original from None


# What grain raises when a worker process dies (its exit code negative: the signal that killed it).
_WORKER_DIED = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")


def _worker_failure(err: BaseException) -> str | None:
    """The line for a failure of the data loader's worker processes (data.workers > 0), else None: one killed
    (grain said "Search the logs above", where nothing is), or no room in the shared memory they pass batches
    through (the bare "no space left on device" of a semaphore or segment that names no file)."""
    if died := _WORKER_DIED.search(str(err)):
        code = int(died.group(1))
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            how = f"was killed by {name}" + (" (the out-of-memory killer, or kill -9)" if -code == 9 else "")
        else:
            how = f"exited with status {code}"
        return (f"a data loader worker process (data.workers) {how}; if memory ran out, set data.workers lower "
                "or data.prefetch smaller")
    if isinstance(err, OSError) and err.errno == errno.ENOSPC and not err.filename:
        return ("no space left in the shared memory (/dev/shm) the data loader's worker processes pass batches "
                "through; make /dev/shm larger (a container's --shm-size), or set data.workers=0")
    return None


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


def process_streams(streams: int, shard: Shard) -> range:
    """The reader streams whose rows the process `shard` supplies (their rows are contiguous)."""
    if streams % shard.count:
        fitting = [n for n in range(1, streams + 1) if streams % n == 0]
        raise ConfigError(f"data.streams={streams} must be a multiple of the {shard.count} processes, which share "
                          f"the streams; run on {listed_or(fitting)} process{'es' if fitting != [1] else ''}, or, "
                          f"in a new run, set "
                          f"data.streams to a multiple of {shard.count} (a run resumes only with the streams it saved)")
    per = streams // shard.count
    return range(shard.index * per, (shard.index + 1) * per)


def process_rows(global_batch: int, shard: Shard) -> slice:
    """The rows of each global batch that the process `shard` supplies."""
    if global_batch % shard.count:
        raise ValueError(f"global batch size {global_batch} is not divisible by {shard.count} processes")
    per = global_batch // shard.count
    return slice(shard.index * per, (shard.index + 1) * per)


def this_process_rows(values: np.ndarray) -> np.ndarray:
    """This process's rows of `values`, drawn for a whole global batch: the same numbers, whatever the number
    of processes that share the batch."""
    return values[process_rows(len(values), this_process())]


def padded(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """`batch` with rows of zeros added up to `rows`: the end of a finite set, given zero weight."""
    return {name: np.pad(field, [(0, rows - len(field))] + [(0, 0)] * (field.ndim - 1)) for name, field in batch.items()}


def prefetched(dataset: grain.IterDataset, workers: int, buffer: int) -> grain.IterDataset:
    """Batches made ahead of time: in `workers` processes, or in one background thread when 0."""
    if workers == 0:
        return grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=buffer)
    if workers > (cores := usable_cores()):
        # Each worker is a process holding its own copy of the sources' index and buffers: past the
        # cores it may run on, more only take memory (thousands would exhaust the host's).
        raise ConfigError(f"data.workers={workers} asks for more worker processes than the {cores} CPU cores this "
                          f"process may use; give at most {cores} (0 reads in a background thread of the trainer)")
    # grain's worker processes read absl flags, which a non-absl program never parses.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer),
                               worker_init_fn=leave_stopping_to_the_trainer)


# How often a data worker checks that the trainer that started it is still there.
WORKER_WATCH_S = 0.5


def leave_stopping_to_the_trainer(worker_index: int, worker_count: int) -> None:
    """In a worker process: ignore Ctrl-C and SIGTERM, which reach the trainer's whole process group, and
    leave when the trainer is gone.

    The trainer saves a checkpoint and then stops its workers itself (grain's stop event); a worker that acted
    on the signal printed a traceback mid-save and left its shared memory for the resource tracker to warn of.
    A trainer that stops at once (a second Ctrl-C, SIGKILL, the out-of-memory killer) stops nothing: its
    workers notice they were orphaned and exit.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), name="watch-trainer", daemon=True).start()


def _exit_when_orphaned(trainer_pid: int) -> None:
    # An orphan is adopted by init (or a subreaper): its parent PID changes for good.
    while os.getppid() == trainer_pid:
        time.sleep(WORKER_WATCH_S)
    os._exit(1)


def record_epochs(records: RandomAccessSource, shard: Shard, seed: int | None, what: str,
                  epochs: int | None = None) -> grain.MapDataset:
    """One reader's records for `epochs` passes (None: endless), in order, or, when seeded, a new
    permutation of all of them every epoch.

    Reader i of n takes records i, i+n, i+2n, ... of the passes laid end to end, so every epoch each
    record goes to exactly one reader, and each reader's records are spread over the whole source
    (a reader that shuffled only its own slice would walk in step with the others, the n readers'
    k-th records being neighbours). `what` names the records in the error for an endless reader that
    would get none; a finite pass may be empty.
    """
    if epochs is None and len(records) < shard.count:
        raise DataError(f"{what} holds {len(records)} records, too few for {shard.count} reader streams "
                        "(data.streams) to get one each; give more records or set data.streams lower")
    dataset = grain.MapDataset.source(records)
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    return dataset.repeat(epochs)[shard.index::shard.count]


def stream_batches(stream: Callable[[Shard], grain.IterDataset], global_batch: int, streams: int, shard: Shard,
                   *, workers: int = 0, prefetch: int = 4) -> GrainBatches:
    """This process's rows of endless global batches, made of `streams` reader streams side by side.

    `stream(Shard(s, streams))` must give reader stream s's batches of `global_batch // streams`
    rows; it depends on s alone, so the global batch does not depend on the process count.
    """
    mine = process_streams(streams, shard)
    combined = SideBySide({s: stream(Shard(s, streams)) for s in mine})
    return GrainBatches(prefetched(combined, workers, prefetch))


def record_stream(records: grain.IterDataset, rows: int, stream: Shard, *, seed: int,
                  transforms: Sequence[grain.transforms.Map | grain.transforms.RandomMap] = ()) -> grain.IterDataset:
    """Batches of `rows` whole records of one reader stream, each record transformed first.

    Random transforms draw from (seed, stream, record position), so batches are the same
    however often the pipeline is restored and on any process count, and streams do not
    mirror each other's draws.
    """
    stream_seed = int(np.random.SeedSequence([seed, stream.index]).generate_state(1)[0])
    dataset = records.seed(stream_seed).apply(list(transforms)) if transforms else records
    return dataset.batch(rows, drop_remainder=True)


class SideBySide(grain.IterDataset):
    """Batches of several reader streams joined row-wise, in stream order."""

    def __init__(self, streams: dict[int, grain.IterDataset]):
        super().__init__(list(streams.values()))
        self.ids = list(streams)

    def __iter__(self) -> grain.DatasetIterator:
        return _SideBySideIterator([iter(parent) for parent in self.parents], self.ids)

    def __str__(self) -> str:
        return f"SideBySide(streams={self.ids})"


class _SideBySideIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator], ids: list[int]):
        super().__init__(parents)
        self.ids = ids

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(parent) for parent in self._parents]
        return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}

    def get_state(self) -> dict[str, Any]:
        return {STREAMS: {str(s): parent.get_state() for s, parent in zip(self.ids, self._parents)}}

    def set_state(self, state: dict[str, Any]) -> None:
        for s, parent in zip(self.ids, self._parents):
            parent.set_state(state[STREAMS][str(s)])


class Interleaved(grain.IterDataset):
    """Finite datasets interleaved by weight until all are exhausted: each next element comes from the
    dataset furthest behind its share ((taken + 1) / weight smallest; the first such on a tie)."""

    def __init__(self, parents: list[grain.IterDataset], weights: list[float]):
        super().__init__(parents)
        self.weights = weights

    def __iter__(self) -> grain.DatasetIterator:
        return _InterleavedIterator([iter(parent) for parent in self.parents], self.weights)


class _InterleavedIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator], weights: list[float]):
        super().__init__(parents)
        self.weights = weights
        self.taken = [0] * len(parents)
        self.done = [False] * len(parents)

    def __next__(self) -> Any:
        while not all(self.done):
            live = [i for i, done in enumerate(self.done) if not done]
            i = min(live, key=lambda k: (self.taken[k] + 1) / self.weights[k])
            try:
                element = next(self._parents[i])
            except StopIteration:
                self.done[i] = True
                continue
            self.taken[i] += 1
            return element
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"parents": [parent.get_state() for parent in self._parents], "taken": list(self.taken),
                "done": list(self.done)}

    def set_state(self, state: dict[str, Any]) -> None:
        for parent, parent_state in zip(self._parents, state["parents"]):
            parent.set_state(parent_state)
        self.taken, self.done = list(state["taken"]), list(state["done"])


STREAMS = "streams"
# Which order this jaxgen reads documents in, saved with every position: 2 = whole-source permutations dealt
# out to the reader streams, streamed files read piece by piece. A position of another order would resume
# on other documents.
ORDER, DATA_ORDER = "order", 2
# grain's multiprocess prefetch interleaves its workers' outputs: its state is the interleave's
# position plus one state per worker, each holding that worker's share of every stream.
WORKER_STATES = "iterators_in_use_states"


def merged_position(saved: list[dict[str, Any]]) -> dict[str, Any]:
    """Every process's saved position (in process order) as one, from which any process count resumes.

    A position is {"order": DATA_ORDER, "streams": {stream: state}} plus, with worker processes,
    the workers' common "interleave" position; every process holds the same one, as all take the
    same number of batches.
    """
    if any(STREAMS not in position for position in saved):
        raise DataError("the checkpoint's data position was saved by an older jaxgen whose batches depended on the "
                        "process count; resume it with that version, or start a new run from it with "
                        "checkpoint.init_from")
    if any(position.get(ORDER) != DATA_ORDER for position in saved):
        raise DataError("the checkpoint's data position was saved by an older jaxgen that read the documents in "
                        "another order; resume it with that version, or start a new run from it with "
                        "checkpoint.init_from")
    merged = {**saved[0], STREAMS: {}}
    for position in saved:
        merged[STREAMS].update(position[STREAMS])
    return merged


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

    def get_state(self) -> dict[str, Any]:
        """This process's position: per stream, and the same form whatever the process count."""
        state = self._holder[0].get_state()
        if WORKER_STATES not in state:  # read in this process: the state is SideBySide's
            return {ORDER: DATA_ORDER, STREAMS: {s: _encoded(st) for s, st in state[STREAMS].items()}}
        workers = [worker[STREAMS] for worker in state[WORKER_STATES]]
        return {ORDER: DATA_ORDER, "interleave": _encoded({k: v for k, v in state.items() if k != WORKER_STATES}),
                STREAMS: {s: [_encoded(worker[s]) for worker in workers] for s in workers[0]}}

    def set_state(self, position: dict[str, Any]) -> None:
        """Resume from a position of this process, or from `merged_position` of any process count."""
        mine = self._holder[0].get_state()
        ids = (mine[WORKER_STATES][0] if WORKER_STATES in mine else mine)[STREAMS]
        missing = sorted(set(ids) - set(position.get(STREAMS, {})), key=int)
        if missing:
            saved, now = len(position.get(STREAMS, {})), len(ids) * jax.process_count()
            raise DataError(f"the saved data position holds {saved} reader streams, not the {now} of data.streams "
                            f"now (none for streams {missing}): resume with data.streams={saved} on a process count "
                            "that divides it, or start a new run from these weights with checkpoint.init_from")
        streams = {s: position[STREAMS][s] for s in ids}
        if WORKER_STATES not in mine:
            if "interleave" in position:
                raise DataError("the saved data position was read by data.workers worker processes; "
                                "resume with the same data.workers")
            self._holder[0].set_state({STREAMS: {s: _decoded(st) for s, st in streams.items()}})
            return
        workers = len(mine[WORKER_STATES])
        if "interleave" not in position or any(len(st) != workers for st in streams.values()):
            raise DataError(f"the saved data position was not read by data.workers={workers} worker processes; "
                            "resume with the same data.workers")
        state = _decoded(position["interleave"])
        state[WORKER_STATES] = [{STREAMS: {s: _decoded(st[w]) for s, st in streams.items()}} for w in range(workers)]
        self._holder[0].set_state(state)


def _encoded(state: Any) -> str:
    # grain's state holds tuples that a JSON round trip would turn into lists (and grain then
    # misreads), so it travels as a Python literal inside JSON.
    return repr(state)


def _decoded(text: str) -> Any:
    return ast.literal_eval(text)


def _close_and_drop(holder: list) -> None:
    # Dropping the last reference lets grain's own __del__ run now rather than mid-teardown.
    holder.pop().close()
