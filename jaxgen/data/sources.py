"""Document sources chosen in config, each opened as a grain dataset of numbered documents.

A document is text (`str`), or token ids (`np.ndarray`) from a pre-tokenized
prepared dataset; it travels with its number in its source (`Numbered`), which
`jaxgen data inspect` reports and training drops. Random-access sources follow the
plain protocol grain reads (`pipeline.RandomAccessSource`: `__len__`,
`__getitem__(index) -> record`): prepared datasets and TFDS datasets (ArrayRecord,
through `tfds.data_source`), ArrayRecord and Parquet files by glob (parquet.py),
Hugging Face datasets (hf_datasets.py), and text and JSONL files of at most
data.index_max_mb MiB, the bundled corpus among them (indexed_text.py). Each epoch
they are shuffled whole and dealt out to the reader streams (`pipeline.record_epochs`).
Larger text and JSONL files are streamed, their pieces interleaved (streaming.py),
and shuffled within a window of data.shuffle_window documents.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import grain
import numpy as np

from jaxgen.config import DataConfig, SourceConfig
from jaxgen.data.array_record_files import damaged_array_record
from jaxgen.data.corpus import (
    BUNDLED_CORPUS,
    InvalidUtf8,
    config_keys,
    decode_utf8,
    refuse_structured,
    resolve_files,
    warn_once,
)
from jaxgen.data.hf_datasets import open_hf
from jaxgen.data.indexed_text import fits_in_memory, indexed_documents
from jaxgen.data.parquet import open_parquet
from jaxgen.data.pipeline import Interleaved, RandomAccessSource, record_epochs, user_errors_unwrapped
from jaxgen.data.prepare import PREPARED_MARKER, prepare_lock_file
from jaxgen.data.splits import HeldOutView, HoldOut, Part, Shard
from jaxgen.data.streaming import PIECE_BYTES, PIECES_AT_ONCE, DocumentStream, document_place
from jaxgen.data.tfds_builders import description, open_builder, open_split
from jaxgen.data.tfrecord import SHUFFLE_BUFFER, TfdsTfRecordStream
from jaxgen.errors import DataError, first_line
from jaxgen.files import describe_holder, live_holder

Document = str | np.ndarray
UNNUMBERED = -1  # TFRecord datasets are read through a shuffle buffer that does not say where a record was


class Numbered(NamedTuple):
    """A document and where it comes from: its source's place in data.mixture (0 for a single source) and
    its number there (`places` says where that is)."""

    source: int
    index: int
    document: Document


class RecordDocument(grain.transforms.Map):
    """(number, source record) -> (number, its document); None (dropped by grain) for a null (Parquet, hf)
    and for invalid UTF-8 when skipping."""

    def __init__(self, field: str, invalid_utf8: InvalidUtf8, name: str, field_key: str = "data.field"):
        self.field, self.invalid_utf8, self.name, self.field_key = field, invalid_utf8, name, field_key

    def map(self, numbered: tuple[int, Any]) -> tuple[int, Document] | None:
        number, record = numbered
        document = self._document(record)
        return None if document is None else (number, document)

    def _document(self, record: Any) -> Document | None:
        if record is None:
            return None
        if isinstance(record, dict):
            if "tokens" in record:
                return np.asarray(record["tokens"], np.int32)
            if self.field not in record:
                raise DataError(f"{self.name} records have no field {self.field!r} ({self.field_key}); they hold "
                                f"{sorted(record)}")
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
    return f"{source.key(kind)} {getattr(source, kind)!r}" if kind else "the bundled corpus"


def open_prepared(path: str, split: str, key: str = "data.path") -> RandomAccessSource:
    """A split of a dataset directory written by `jaxgen data prepare` (read through TFDS); `key` names its setting."""
    import tensorflow_datasets as tfds

    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir() and (holder := live_holder(prepare_lock_file(directory))) is not None:
        raise DataError(f"{key} {path!r} is being written by `jaxgen data prepare` ({describe_holder(holder)}); "
                        "train on it once that has finished")
    if not directory.is_dir():
        raise DataError(f"{key} {path!r} is not a directory; create one with `jaxgen data prepare --input GLOB --out "
                        f"{path}`")
    if not (directory / PREPARED_MARKER).is_file():
        raise DataError(
            f"{key} {path!r} is not a complete prepared dataset (no {PREPARED_MARKER}); "
            "an interrupted `jaxgen data prepare` leaves this state; run it again"
        )
    builder = tfds.builder_from_directory(str(directory))
    if split not in builder.info.splits:
        raise DataError(f"{key} {path!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    damaged = damaged_array_record(sorted(directory.glob(f"*-{split}.array_record-*")))
    if damaged is not None:
        raise DataError(f"{key} {path!r}: file {str(damaged[0])!r} is damaged ({damaged[1]}); {PREPARE_AGAIN}")
    return builder.as_data_source(split=split)


PREPARE_AGAIN = "prepare the dataset again with `jaxgen data prepare`"
WRITE_AGAIN = "give files written by ArrayRecordWriter or `jaxgen data prepare`"


def open_tfds(name: str, data_dir: str | None, split: str) -> RandomAccessSource | None:
    """A TFDS split stored as ArrayRecord; None when it is stored as TFRecord (read by `tfrecord.py`)."""
    return open_split(open_builder("data.tfds", name, data_dir), split, description("data.tfds", name, data_dir))


def open_array_records(pattern: str, key: str = "data.array_record") -> RandomAccessSource:
    files = resolve_files(pattern, key, ".array_record")
    damaged = damaged_array_record(files)
    if damaged is None:
        try:
            return grain.sources.ArrayRecordDataSource([str(f) for f in files])
        except RuntimeError as err:  # array_record's report of a file it cannot read, which it does not name
            damaged = None, first_line(err, 200)
    culprit = "its files" if damaged[0] is None else f"file {str(damaged[0])!r}"
    raise DataError(f"{key} {pattern!r}: {culprit} cannot be read as ArrayRecord ({damaged[1]}); "
                    f"{WRITE_AGAIN}")


class NumberedRecords:
    """(number, record) by position in `records`; a part held out by rule numbers them in the whole source.

    A record the storage cannot give (damage inside an ArrayRecord file: a chunk's checksum) is named in one
    line with `name` (the source) and `advice`, not as the reader's RuntimeError."""

    def __init__(self, records: RandomAccessSource, name: str, advice: str):
        self.records, self.name, self.advice = records, name, advice

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        number = self.records.ordinal(i) if isinstance(self.records, HeldOutView) else i
        try:
            return number, self.records[i]
        except RuntimeError as err:
            reason = first_line(err, 200)
            raise DataError(f"{self.name}: record {number} cannot be read, its file is damaged ({reason}); "
                            f"{self.advice}") from None


def text_files(source: DataConfig | SourceConfig) -> list[pathlib.Path] | None:
    """The files of a text or JSONL source (none set: the bundled corpus); None for other kinds."""
    if not source.kinds:
        return [BUNDLED_CORPUS]
    if source.text is None and source.jsonl is None:
        return None
    key, suffix = (source.key("text"), ".txt") if source.text else (source.key("jsonl"), ".jsonl")
    files = resolve_files(source.text or source.jsonl, key, suffix, text=bool(source.text))
    if source.text:
        refuse_structured(files, key, source.text)
    return files


def line_field(source: DataConfig | SourceConfig, data: DataConfig) -> str | None:
    """The JSON field of a JSONL line that is its document; None: the whole line (plain text, and
    JSONL of supervised pairs, whose two fields `text_pairs` reads)."""
    return source.field if source.jsonl is not None and data.input_field is None else None


def is_streamed(source: DataConfig | SourceConfig, data: DataConfig) -> bool:
    """Whether a source is read in order rather than by index: large text/JSONL files, TFDS's TFRecord."""
    files = text_files(source)
    if files is not None:
        return not fits_in_memory(files, data.index_max_mb)
    return source.tfds is not None and open_tfds(source.tfds, source.tfds_data_dir, source.train_split) is None


# Reading in the calling thread: grain's default read-ahead (threads and a 500-record buffer) costs
# more per record than a one-pass scan of an indexed source saves, an order of magnitude on the
# bundled corpus (the tokenizer pass at the start of a run).
IN_THREAD = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def numbered_documents(source: DataConfig | SourceConfig, data: DataConfig, part: Part, shard: Shard, *,
                       seed: int | None, epochs: int | None = None, read_ahead: bool = True) -> grain.IterDataset:
    """One source's (number, document) pairs of one part, for `epochs` passes (None = forever); shuffled when seeded.

    `read_ahead`: records of an indexed source are read ahead by grain's threads (else in the calling thread)."""
    name = describe(source)
    holdout = HoldOut(data.eval_every_nth_doc, part, data.eval_block)
    files = text_files(source)
    if files is not None and not fits_in_memory(files, data.index_max_mb):
        stream = DocumentStream(files, field=line_field(source, data), holdout=holdout, shard=shard,
                                invalid_utf8=data.invalid_utf8, name=name, seed=seed, epochs=epochs,
                                names=config_keys(source.key("field")))
        if seed is None:
            return stream
        return grain.experimental.WindowShuffleIterDataset(stream, window_size=data.shuffle_window, seed=seed)

    split = source.train_split if part == "train" else source.eval_split
    if files is not None:
        records = HeldOutView(indexed_documents(files, line_field(source, data), data.invalid_utf8,
                                                config_keys(source.key("field"))), holdout)
    elif source.path is not None:
        records = open_prepared(source.path, split, source.key("path"))
    elif source.tfds is not None:
        records = open_tfds(source.tfds, source.tfds_data_dir, split)
    elif source.hf is not None:
        records = open_hf(source, part, holdout)
    else:
        documents = (open_parquet(source.parquet, source.field, source.key("parquet"), source.key("field"))
                     if source.parquet is not None
                     else open_array_records(source.array_record, source.key("array_record")))
        records = HeldOutView(documents, holdout)
    to_document = RecordDocument(source.field, data.invalid_utf8, name, source.key("field"))
    if records is None:
        stream = TfdsTfRecordStream(source.tfds, source.tfds_data_dir, split, shard, seed, epochs)
        return stream.map(unnumbered).map(to_document).filter(is_document)
    advice = (PREPARE_AGAIN if source.path is not None else WRITE_AGAIN if source.array_record is not None
              else "build the dataset again" if source.tfds is not None else "replace the damaged file")
    dataset = record_epochs(NumberedRecords(records, name, advice), shard, seed, f"the {part} part of {name}", epochs)
    return dataset.map(to_document).to_iter_dataset(None if read_ahead else IN_THREAD)


def unnumbered(record: Any) -> tuple[int, Any]:
    return UNNUMBERED, record


def document_of(numbered: tuple) -> Document:
    return numbered[-1]


def is_document(document: Any) -> bool:
    return document is not None


def open_documents(source: DataConfig | SourceConfig, data: DataConfig, part: Part, shard: Shard, *,
                   seed: int | None, epochs: int | None = None, read_ahead: bool = True) -> grain.IterDataset:
    """One source's documents of one part, for `epochs` passes (None = forever); shuffled when seeded."""
    return numbered_documents(source, data, part, shard, seed=seed, epochs=epochs, read_ahead=read_ahead
                              ).map(document_of)


class FromSource(grain.transforms.Map):
    """(number, document) of the source at `source` in data.mixture -> `Numbered`."""

    def __init__(self, source: int):
        self.source = source

    def map(self, numbered: tuple[int, Document]) -> Numbered:
        return Numbered(self.source, *numbered)


# Held-out documents are read in one fixed shuffled order whatever data.seed is, so that runs of other seeds
# evaluate on the same batches, and so that when train.eval_batches take only some, those come from all over.
HELD_OUT_ORDER = 2**32


def source_seeds(data: DataConfig, entropy: int | None = None) -> list[int]:
    """Each source's shuffle seed, from data.seed (or `entropy`)."""
    sequence = np.random.SeedSequence(data.seed if entropy is None else entropy)
    return [int(seed) for seed in sequence.generate_state(len(data.mixture or [data]))]


def mixed_numbered_documents(data: DataConfig, part: Part, shard: Shard) -> grain.IterDataset:
    """All configured sources' `Numbered` documents, endless, drawn in proportion to their weights
    (one source: itself); training documents shuffled, held-out ones in order."""
    sources = data.mixture or [data]
    seeds = source_seeds(data) if part == "train" else [None] * len(sources)
    datasets = [numbered_documents(s, data, part, shard, seed=seed).map(FromSource(k))
                for k, (s, seed) in enumerate(zip(sources, seeds))]
    if len(datasets) == 1:
        return datasets[0]
    return grain.IterDataset.mix(datasets, weights=[s.weight for s in sources])


def mixed_documents(data: DataConfig, part: Part, shard: Shard) -> grain.IterDataset:
    """`mixed_numbered_documents`, the documents alone."""
    return mixed_numbered_documents(data, part, shard).map(document_of)


def held_out_documents(data: DataConfig) -> grain.IterDataset:
    """Every held-out `Numbered` document once, each source's in a fixed shuffled order (`HELD_OUT_ORDER`),
    the sources interleaved by weight."""
    sources = data.mixture or [data]
    seeds = source_seeds(data, HELD_OUT_ORDER)
    return Interleaved([numbered_documents(s, data, "eval", Shard(), seed=seed, epochs=1).map(FromSource(k))
                        for k, (s, seed) in enumerate(zip(sources, seeds))], [s.weight for s in data.mixture] or [1.0])


def one_pass_documents(data: DataConfig, part: Part) -> Iterator[Document]:
    """Every document of the part once, source after source, in a fixed order."""
    for source in data.mixture or [data]:
        with user_errors_unwrapped():
            yield from open_documents(source, data, part, Shard(), seed=None, epochs=1, read_ahead=False)


def places(source: DataConfig | SourceConfig, data: DataConfig, numbers: list[int]) -> list[int | str | None]:
    """Where the documents numbered `numbers` are in their source, for people: the number (before any
    held-out split by rule), 'FILE:BYTE_OFFSET' in a streamed text/JSONL source, None where unknown."""
    files = text_files(source)
    streamed = files is not None and is_streamed(source, data)
    return [None if n == UNNUMBERED else document_place(files, n) if streamed else n for n in numbers]


def shuffle_settings(data: DataConfig) -> dict:
    """How the training documents are ordered, source by source."""
    sources = []
    for source, seed in zip(data.mixture or [data], source_seeds(data)):
        setting = {"source": describe(source), "seed": seed}
        if not is_streamed(source, data):
            setting["shuffle"] = "whole source, a new permutation every epoch"
        elif text_files(source) is not None:
            setting.update(shuffle="window", shuffle_window=data.shuffle_window, piece_bytes=PIECE_BYTES,
                           pieces_at_once=PIECES_AT_ONCE)
        else:
            setting.update(shuffle="buffer", shuffle_buffer=SHUFFLE_BUFFER)
        sources.append(setting)
    return {"seed": data.seed, "streams": data.reader_streams, "workers": data.workers,
            "index_max_mb": data.index_max_mb, "sources": sources}
