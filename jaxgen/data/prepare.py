"""`jaxgen data prepare`: text/JSONL/Parquet files -> a TFDS-style ArrayRecord dataset.

The result is an ordinary TFDS dataset directory (`dataset_info.json`,
`features.json`, `corpus-{train,validation}.array_record-NNNNN-of-NNNNN`), read
with `tfds.builder_from_directory` and no TensorFlow. Records hold the document
`text`, or its `tokens` when a tokenizer is given (the tokenizer is copied in
beside them). The validation split is chosen by the rule training applies to
sources without splits (`splits.HoldOut`): every n-th block of consecutive
documents, so a validation document rarely sits next to the training text it
continues.

Never a dataset that looks finished but is not:
- One prepare per `--out`: it holds the lock `.NAME.prepare.lock` beside `--out`
  (flock, so the lock of a killed run is simply taken over); a second one is
  refused at once, naming the holder's host and PID.
- The dataset is built in a hidden directory (`jaxgen.files.building`) and
  renamed into place only after every file has been read back and found to
  hold exactly the records written to it (count and digest), tfds reports the
  same split sizes, and everything is on disk. `jaxgen_dataset.json`, written
  last, marks completion.
- A failure (bad input, damaged file, full disk) removes the hidden directory
  and the lock; a killed run's hidden directory is removed by the next run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import socket
from collections.abc import Iterator

import numpy as np

from jaxgen.config import DataConfig
from jaxgen.data.corpus import InvalidUtf8, is_parquet, iter_documents, looks_binary, resolve_files
from jaxgen.data.splits import HoldOut
from jaxgen.data.tokenizer import Tokenizer, keep_tokenizer
from jaxgen.errors import ConfigError, DataError, listed
from jaxgen.files import DirectoryLock, building, hidden_beside, write_atomic
from jaxgen.interrupts import undone_on_leaving
from jaxgen.progress import progress_bar

PREPARED_MARKER = "jaxgen_dataset.json"
DATASET_NAME = "corpus"
SPLITS = ("train", "validation")
_READ_BACK_CHUNK = 1024  # records per read while verifying: bounded memory, few calls
# Training's own defaults (data.eval_every_nth_doc, data.eval_block), so a prepared dataset's validation
# split is the held-out set the same corpus would have as text.
DEFAULT_HOLDOUT = HoldOut(DataConfig.model_fields["eval_every_nth_doc"].default, "eval",
                          DataConfig.model_fields["eval_block"].default)


class _RecordDigest:
    """The number of records in a sequence and a digest of their bytes."""

    def __init__(self):
        self.records = 0
        self._sha256 = hashlib.sha256()

    def add(self, record: bytes) -> None:
        # The length prefix makes record boundaries count: two records are not their concatenation.
        self._sha256.update(len(record).to_bytes(8, "little"))
        self._sha256.update(record)
        self.records += 1

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


@dataclasses.dataclass
class _WrittenFile:
    """One ArrayRecord file and what was written to it, to compare with what reading it back gives."""

    path: pathlib.Path
    written: _RecordDigest = dataclasses.field(default_factory=_RecordDigest)


class ShardedSplitWriter:
    """One split's ArrayRecord files, a new file every `shard_size` records."""

    def __init__(self, directory: pathlib.Path, split: str, shard_size: int):
        self.directory, self.split, self.shard_size = directory, split, shard_size
        self.files: list[_WrittenFile] = []
        self._writer = None

    @property
    def shard_lengths(self) -> list[int]:
        return [f.written.records for f in self.files]

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.files[-1].written.records == self.shard_size:
            self.close()
            self.files.append(_WrittenFile(self.directory / f"{self.split}-{len(self.files):05d}.unnumbered"))
            # group_size:1 keeps every record individually addressable for random access.
            with _as_os_error(self.files[-1].path):
                self._writer = ArrayRecordWriter(str(self.files[-1].path), "group_size:1")
        with _as_os_error(self.files[-1].path):
            self._writer.write(record)
        self.files[-1].written.add(record)

    def close(self) -> None:
        if self._writer is not None:
            with _as_os_error(self.files[-1].path):
                self._writer.close()
            self._writer = None

    def finish(self, prefix: str | None = DATASET_NAME) -> None:
        """Name the files as TFDS expects ([prefix-]split.array_record-i-of-n), now that their number is known."""
        self.close()
        n = len(self.files)
        stem = self.split if prefix is None else f"{prefix}-{self.split}"
        for i, file in enumerate(self.files):
            file.path = file.path.rename(self.directory / f"{stem}.array_record-{i:05d}-of-{n:05d}")


# The failures a write can meet, which array_record names only in its message's words.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


@contextlib.contextmanager
def _as_os_error(path: pathlib.Path) -> Iterator[None]:
    # array_record reports a failed write (full disk, file too large) as RuntimeError, its cause in the system's
    # words ("write() failed: No space left on device"); it is raised as the OSError it was, naming the file,
    # so it reads as every other command's ("PATH: no space left on device").
    try:
        yield
    except RuntimeError as err:
        code = next((code for code in _WRITE_ERRNOS if os.strerror(code) in str(err)), None)
        if code is None:
            raise OSError(f"writing {str(path)!r}: {err}") from err
        raise OSError(code, os.strerror(code), str(path)) from err


def prepare_dataset(input_pattern: str, out: str | pathlib.Path, *, field: str = "text",
                    tokenizer: Tokenizer | None = None, validation_every_nth: int = DEFAULT_HOLDOUT.every_nth,
                    validation_block: int = DEFAULT_HOLDOUT.block, invalid_utf8: InvalidUtf8 = "skip",
                    shard_size: int = 1_000_000, progress: bool = True) -> dict:
    """Write the dataset; returns its summary (also stored as `jaxgen_dataset.json`).

    Every `validation_every_nth`-th block of `validation_block` consecutive documents goes to
    the validation split, as data.eval_every_nth_doc and data.eval_block choose them in training.
    """
    if validation_every_nth < 2:
        raise ConfigError(f"--validation-every-nth {validation_every_nth} would hold out every document; "
                          "give 2 or more (one block of documents in N goes to the validation split)")
    if validation_block < 1:
        raise ConfigError(f"--validation-block {validation_block} is not a number of documents; give 1 or more")
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with prepare_lock(out):
        if out.exists():
            raise DataError(f"--out {str(out)!r} already exists; choose a new directory")
        files = resolve_files(input_pattern, "--input", text=True)
        with building(out) as partial:
            summary = _write_dataset(files, input_pattern, partial, out, field=field, tokenizer=tokenizer,
                                     validation=HoldOut(validation_every_nth, "eval", validation_block),
                                     invalid_utf8=invalid_utf8, shard_size=shard_size, progress=progress)
    return summary


def prepare_lock_file(out: pathlib.Path) -> pathlib.Path:
    return hidden_beside(out, "prepare.lock")


@contextlib.contextmanager
def prepare_lock(out: pathlib.Path) -> Iterator[None]:
    """Hold `out`'s prepare lock for the block, then remove its file (a finished prepare leaves no trace)."""
    lock_file = prepare_lock_file(out)
    lock = DirectoryLock(lock_file, f"--out {str(out)!r}",
                         "wait for that prepare to finish, or choose another --out")
    while True:
        try:
            lock.acquire()
        except OSError as err:  # its record could not be written (a full disk): the empty file it made goes too
            with contextlib.suppress(OSError):
                if lock_file.stat().st_size == 0:
                    lock_file.unlink()
            if err.errno is None or err.filename != str(lock_file):
                raise
            raise OSError(err.errno, err.strerror, str(out)) from err  # the user's --out, not a hidden file
        # The holder removes the file before releasing it, so we may have locked a removed
        # file while another process locks a new one; the file at the path names its holder.
        if _names_this_process(lock_file):
            break
        lock.release()
    try:
        with undone_on_leaving(lambda: lock_file.unlink(missing_ok=True)):  # Ctrl-C leaves at once, it too
            yield
    finally:
        with contextlib.suppress(OSError):  # a lock file left behind is harmless: nobody holds it
            lock_file.unlink(missing_ok=True)
        lock.release()


def _names_this_process(lock_file: pathlib.Path) -> bool:
    try:
        holder = json.loads(lock_file.read_text())
    except (OSError, ValueError):
        return False
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _write_dataset(files: list[pathlib.Path], input_pattern: str, partial: pathlib.Path, out: pathlib.Path, *,
                   field: str, tokenizer: Tokenizer | None, validation: HoldOut,
                   invalid_utf8: InvalidUtf8, shard_size: int, progress: bool) -> dict:
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict(
        {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)} if tokenizer
        else {"text": tfds.features.Text()})
    writers = {split: ShardedSplitWriter(partial, split, shard_size) for split in SPLITS}
    n_tokens = 0
    documents = iter_documents(files, field, invalid_utf8)
    for ordinal, text in enumerate(progress_bar(documents, unit="doc", disable=not progress, desc="prepare")):
        if tokenizer:
            ids = tokenizer.encode_document(text)
            n_tokens += len(ids)
            example = {"tokens": ids}
        else:
            example = {"text": text}
        writers["validation" if validation.keeps(ordinal) else "train"].write(features.serialize_example(example))
    counts = {split: sum(w.shard_lengths) for split, w in writers.items()}
    if counts["train"] == 0:
        binary = [str(path) for path in files if not is_parquet(path) and looks_binary(path)]
        why = f" ({listed(binary, 3)} {'looks' if len(binary) == 1 else 'look'} binary)" if binary else ""
        raise DataError(f"--input {input_pattern!r} holds no text documents{why}; give text files (a document a "
                        "line), .jsonl or .parquet files")
    if counts["validation"] == 0:
        first = (validation.every_nth - 1) * validation.block + 1
        raise DataError(
            f"--input {input_pattern!r} holds {counts['train']} documents, too few for a validation split: with "
            f"--validation-every-nth {validation.every_nth} and --validation-block {validation.block} the first "
            f"validation document is number {first}; give a smaller --validation-every-nth or --validation-block")
    for writer in writers.values():
        writer.finish()
    tfds.folder_dataset.write_metadata(
        data_dir=partial, features=features, check_data=False, version="1.0.0",
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        split_infos=[tfds.core.SplitInfo(name=s, shard_lengths=w.shard_lengths, num_bytes=0)
                     for s, w in writers.items()],
        description=f"jaxgen data prepare --input {input_pattern}")
    summary = {"input": input_pattern, "files": len(files), "documents": counts,
               "validation_every_nth": validation.every_nth, "validation_block": validation.block, "tokenizer": None}
    if tokenizer:
        keep_tokenizer(tokenizer, partial)
        summary["tokenizer"] = {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "tokens": n_tokens}
    _verify(partial, writers, out)
    sync_files(partial)
    write_atomic(partial / PREPARED_MARKER, json.dumps(summary, indent=2) + "\n")
    return summary


def _verify(partial: pathlib.Path, writers: dict[str, ShardedSplitWriter], out: pathlib.Path) -> None:
    """Raise DataError unless tfds finds exactly the files written, each holding exactly its records."""
    import tensorflow_datasets as tfds

    def damaged(what: str) -> DataError:
        return DataError(f"--out {str(out)!r} was not created: {what}; the disk or filesystem lost or "
                         f"changed data, check it and run the same command again")

    splits = tfds.builder_from_directory(partial).info.splits
    for split, writer in writers.items():
        if list(splits[split].shard_lengths) != writer.shard_lengths:
            raise damaged(f"dataset_info.json gives split {split!r} files of {list(splits[split].shard_lengths)} "
                          f"records, {writer.shard_lengths} were written")
        for path, file in zip(splits[split].filepaths, writer.files, strict=True):
            if path.name != file.path.name:
                raise damaged(f"tfds reads {path.name}, {file.path.name} was written")
            try:
                read = read_back(file.path)
            except RuntimeError as err:  # array_record's report of a damaged file
                raise damaged(f"{path.name} cannot be read back ({err})") from None
            if read.records != file.written.records:
                raise damaged(f"{path.name} reads back {read.records} records, {file.written.records} were written")
            if read.hexdigest() != file.written.hexdigest():
                raise damaged(f"{path.name} reads back {read.records} records whose bytes differ from those written")


def read_back(path: pathlib.Path) -> _RecordDigest:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        read, n = _RecordDigest(), reader.num_records()
        for start in range(0, n, _READ_BACK_CHUNK):
            for record in reader.read(start, min(start + _READ_BACK_CHUNK, n)):
                read.add(record)
    finally:
        reader.close()
    return read


def sync_files(directory: pathlib.Path) -> None:
    # The rename into place marks the dataset complete, so its bytes must reach the disk first:
    # after a power loss a renamed directory could otherwise hold empty files.
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def read_prepared_metadata(path: str | pathlib.Path) -> dict | None:
    """What `prepare_dataset` recorded, or None if `path` is not a complete prepared dataset."""
    marker = pathlib.Path(path).expanduser() / PREPARED_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None
