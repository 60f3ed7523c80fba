"""Document sources chosen in config, each opened as a grain dataset of documents.

A document is text (`str`), or token ids (`np.ndarray`) from a pre-tokenized
prepared dataset. Random-access sources follow the plain protocol grain reads
(`pipeline.RandomAccessSource`: `__len__`, `__getitem__(index) -> record`):
prepared datasets and TFDS datasets (ArrayRecord, through `tfds.data_source`),
ArrayRecord and Parquet files by glob (parquet.py) and Hugging Face datasets
(hf_datasets.py). They are sharded by slicing, so
each process reads only its share, and shuffled whole every epoch. Text and
JSONL files are streamed (see streaming.py) and shuffled within a window.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from jaxgen.config import DataConfig, SourceConfig
from jaxgen.data.corpus import BUNDLED_CORPUS, InvalidUtf8, decode_utf8, resolve_files, warn_once
from jaxgen.data.hf_datasets import open_hf
from jaxgen.data.parquet import open_parquet
from jaxgen.data.pipeline import RandomAccessSource, record_epochs, user_errors_unwrapped
from jaxgen.data.prepare import PREPARED_MARKER
from jaxgen.data.splits import HeldOutView, HoldOut, Part, Shard
from jaxgen.data.streaming import DocumentStream
from jaxgen.data.tfds_builders import description, open_builder, open_split
from jaxgen.data.tfrecord import TfdsTfRecordStream
from jaxgen.errors import DataError

Document = str | np.ndarray


class RecordDocument(grain.transforms.Map):
    """A source record -> its document; None (dropped by grain) for a null (Parquet, hf) and for
    invalid UTF-8 when skipping."""

    def __init__(self, field: str, invalid_utf8: InvalidUtf8, name: str):
        self.field, self.invalid_utf8, self.name = field, invalid_utf8, name

    def map(self, record: Any) -> Document | None:
        if record is None:
            return None
        if isinstance(record, dict):
            if "tokens" in record:
                return np.asarray(record["tokens"], np.int32)
            if self.field not in record:
                raise DataError(f"{self.name} records have no field {self.field!r} (data.field); they hold {sorted(record)}")
            record = record[self.field]
        if isinstance(record, bytes):
            return self._text(record)
        if isinstance(record, str):
            return record
        raise DataError(f"{self.name} holds {type(record).__name__} records, not text")

    def _text(self, record: bytes) -> str | None:
        text = decode_utf8(record, self.invalid_utf8, lambda err: (
            f"a record of {self.name} is not valid UTF-8 ({err.reason} at byte {err.start})"))
        if text is None:
            # Records carry no position a reader could count them by, so the source is named once, uncounted.
            warn_once(self.name, f"{self.name}: skipping records of invalid UTF-8; "
                                 "set data.invalid_utf8=error to stop at them instead")
        return text


def describe(source: DataConfig | SourceConfig) -> str:
    kind = source.kinds[0] if source.kinds else None
    return f"data.{kind} {getattr(source, kind)!r}" if kind else "the bundled corpus"


def open_prepared(path: str, split: str) -> RandomAccessSource:
    """A split of a dataset directory written by `jaxgen data prepare` (read through TFDS)."""
    import tensorflow_datasets as tfds

    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise DataError(f"data.path {path!r} is not a directory; create one with `jaxgen data prepare --input GLOB --out {path}`")
    if not (directory / PREPARED_MARKER).is_file():
        raise DataError(
            f"data.path {path!r} is not a complete prepared dataset (no {PREPARED_MARKER}); "
            "an interrupted `jaxgen data prepare` leaves this state; run it again"
        )
    builder = tfds.builder_from_directory(str(directory))
    if split not in builder.info.splits:
        raise DataError(f"data.path {path!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def open_tfds(name: str, data_dir: str | None, split: str) -> RandomAccessSource | None:
    """A TFDS split stored as ArrayRecord; None when it is stored as TFRecord (read by `tfrecord.py`)."""
    return open_split(open_builder("data.tfds", name, data_dir), split, description("data.tfds", name, data_dir))


def open_array_records(pattern: str) -> RandomAccessSource:
    files = resolve_files(pattern, "data.array_record")
    try:
        return grain.sources.ArrayRecordDataSource([str(f) for f in files])
    except RuntimeError as err:  # array_record's report of a file it cannot read, which it does not name
        raise _unreadable_array_record(pattern, files, err) from None


def _unreadable_array_record(pattern: str, files: list[pathlib.Path], err: RuntimeError) -> DataError:
    """The error naming the first of `files` that cannot be opened alone (`err`: opening them together)."""
    from array_record.python.array_record_module import ArrayRecordReader

    culprit, reason = "its files", err
    for path in files:
        try:
            ArrayRecordReader(str(path)).close()
        except RuntimeError as file_err:
            culprit, reason = f"file {str(path)!r}", file_err
            break
    return DataError(f"data.array_record {pattern!r}: {culprit} cannot be read as ArrayRecord ({reason}); "
                     "give files written by ArrayRecordWriter or `jaxgen data prepare`")


def open_documents(source: DataConfig | SourceConfig, data: DataConfig, part: Part, shard: Shard, *,
                   seed: int | None, epochs: int | None = None) -> grain.IterDataset:
    """One source's documents of one part, for `epochs` passes (None = forever); shuffled when seeded."""
    name = describe(source)
    if source.text is not None or source.jsonl is not None or not source.kinds:
        files = [BUNDLED_CORPUS] if not source.kinds else resolve_files(
            source.text or source.jsonl, "data.text" if source.text else "data.jsonl")
        stream = DocumentStream(files, field=source.field if source.jsonl else None,
                                holdout=HoldOut(data.eval_every_nth_doc, part), shard=shard,
                                invalid_utf8=data.invalid_utf8, name=name, epochs=epochs)
        if seed is None:
            return stream
        return grain.experimental.WindowShuffleIterDataset(stream, window_size=data.shuffle_window, seed=seed)

    split = source.train_split if part == "train" else source.eval_split
    if source.path is not None:
        records = open_prepared(source.path, split)
    elif source.tfds is not None:
        records = open_tfds(source.tfds, source.tfds_data_dir, split)
    elif source.hf is not None:
        records = open_hf(source, part, data.eval_every_nth_doc)
    else:
        documents = (open_parquet(source.parquet, source.field) if source.parquet is not None
                     else open_array_records(source.array_record))
        records = HeldOutView(documents, HoldOut(data.eval_every_nth_doc, part))
    to_document = RecordDocument(source.field, data.invalid_utf8, name)
    if records is None:
        stream = TfdsTfRecordStream(source.tfds, source.tfds_data_dir, split, shard, seed, epochs)
        return stream.map(to_document).filter(is_document)
    dataset = record_epochs(records, shard, seed, f"the {part} part of {name}", epochs)
    return dataset.map(to_document).to_iter_dataset()


def is_document(document: Document | None) -> bool:
    return document is not None


def mixed_documents(data: DataConfig, part: Part, shard: Shard) -> grain.IterDataset:
    """All configured sources, endless, drawn in proportion to their weights (one source: itself).
    Training documents are shuffled; evaluation documents come in a fixed order."""
    sources = data.mixture or [data]
    seeds = np.random.SeedSequence(data.seed).generate_state(len(sources))
    seeds = [int(seed) if part == "train" else None for seed in seeds]
    datasets = [open_documents(s, data, part, shard, seed=seed) for s, seed in zip(sources, seeds)]
    if len(datasets) == 1:
        return datasets[0]
    return grain.IterDataset.mix(datasets, weights=[s.weight for s in sources])


def one_pass_documents(data: DataConfig, part: Part) -> Iterator[Document]:
    """Every document of the part once, source after source, in a fixed order."""
    for source in data.mixture or [data]:
        with user_errors_unwrapped():
            yield from open_documents(source, data, part, Shard(), seed=None, epochs=1)
