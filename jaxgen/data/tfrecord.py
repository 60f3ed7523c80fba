"""TFDS datasets stored as TFRecord: streamed through `tfds` + TensorFlow (the `tf` extra).

ArrayRecord datasets need none of this (sources.py reads them by random
access). TFRecord files can only be read in order, so the position is
(epoch, records consumed); restoring skips that many records of the same
deterministic order, which is exact but proportional to the distance.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import grain

from jaxgen.data.pipeline import ShardedStream
from jaxgen.data.splits import Shard
from jaxgen.errors import DataError

# Records shuffled at once in a training stream (TFRecord has no random access).
SHUFFLE_BUFFER = 10_000


def tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


class TfdsTfRecordStream(ShardedStream):
    """Records (dicts of numpy values) of one TFDS split for `epochs` passes (None = forever);
    shuffled per epoch when seeded."""

    def __init__(self, name: str, data_dir: str | None, split: str, shard: Shard, seed: int | None,
                 epochs: int | None = None):
        super().__init__(shard)
        self.name, self.data_dir, self.split, self.seed, self.epochs = name, data_dir, split, seed, epochs

    def __iter__(self) -> grain.DatasetIterator:
        return _TfRecordIterator(self)


class _TfRecordIterator(grain.DatasetIterator):
    def __init__(self, stream: TfdsTfRecordStream):
        super().__init__()
        self._stream = stream
        self._position = {"epoch": 0, "consumed": 0}
        self._records = None

    def _open(self):
        import tensorflow as tf
        import tensorflow_datasets as tfds

        tf.config.set_visible_devices([], "GPU")  # the accelerators belong to JAX
        s, pos = self._stream, self._position
        dataset = tfds.builder(s.name, data_dir=s.data_dir).as_dataset(split=s.split, shuffle_files=False)
        dataset = dataset.shard(s.shard.count, s.shard.index)
        if s.seed is not None:
            dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=s.seed + pos["epoch"], reshuffle_each_iteration=False)
        return dataset.skip(pos["consumed"]).as_numpy_iterator()

    def __next__(self) -> dict[str, Any]:
        if self._stream.epochs is not None and self._position["epoch"] == self._stream.epochs:
            raise StopIteration
        if self._records is None:
            self._records = self._open()
        try:
            record = next(self._records)
        except StopIteration:
            if self._position["consumed"] == 0:
                raise DataError(f"data.tfds {self._stream.name!r} split {self._stream.split!r} has no records "
                                f"for reader {self._stream.shard.index} of {self._stream.shard.count}") from None
            self._position = {"epoch": self._position["epoch"] + 1, "consumed": 0}
            self._records = None
            return next(self)
        self._position["consumed"] += 1
        return record

    def get_state(self) -> dict[str, Any]:
        return dict(self._position)

    def set_state(self, state: dict[str, Any]) -> None:
        self._position = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"])}
        self._records = None
