"""`jaxgen data prepare`: text/JSONL files -> a TFDS-style ArrayRecord dataset.

The result is an ordinary TFDS dataset directory (`dataset_info.json`,
`features.json`, `corpus-{train,validation}.array_record-NNNNN-of-NNNNN`), read
with `tfds.builder_from_directory` and no TensorFlow. Records hold the document
`text`, or its `tokens` when a tokenizer is given (the tokenizer is copied in
beside them). It is written into a hidden `.NAME.partial` directory and renamed
into place only when complete, so an interrupted run never leaves a dataset
that looks finished; `jaxgen_dataset.json`, written last, marks completion.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
from tqdm.auto import tqdm

from jaxgen.data.corpus import InvalidUtf8, iter_documents, resolve_files
from jaxgen.data.splits import HoldOut
from jaxgen.data.tokenizer import Tokenizer
from jaxgen.errors import DataError

PREPARED_MARKER = "jaxgen_dataset.json"
DATASET_NAME = "corpus"
SPLITS = ("train", "validation")


class _ShardedSplitWriter:
    """One split's ArrayRecord files, a new file every `shard_size` records."""

    def __init__(self, directory: pathlib.Path, split: str, shard_size: int):
        self.directory, self.split, self.shard_size = directory, split, shard_size
        self.shard_lengths: list[int] = []
        self._writer = None

    def write(self, record: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.shard_lengths[-1] == self.shard_size:
            self.close()
            # group_size:1 keeps every record individually addressable for random access.
            self._writer = ArrayRecordWriter(str(self._unnumbered(len(self.shard_lengths))), "group_size:1")
            self.shard_lengths.append(0)
        self._writer.write(record)
        self.shard_lengths[-1] += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> None:
        """Name the files as TFDS expects, now that their number is known."""
        self.close()
        n = len(self.shard_lengths)
        for i in range(n):
            self._unnumbered(i).rename(
                self.directory / f"{DATASET_NAME}-{self.split}.array_record-{i:05d}-of-{n:05d}")

    def _unnumbered(self, i: int) -> pathlib.Path:
        return self.directory / f"{self.split}-{i:05d}.unnumbered"


def prepare_dataset(input_pattern: str, out: str | pathlib.Path, *, field: str = "text",
                    tokenizer: Tokenizer | None = None, validation_every_nth: int = 50,
                    invalid_utf8: InvalidUtf8 = "skip", shard_size: int = 1_000_000,
                    progress: bool = True) -> dict:
    """Write the dataset; returns its summary (also stored as `jaxgen_dataset.json`)."""
    import tensorflow_datasets as tfds

    out = pathlib.Path(out)
    if out.exists():
        raise DataError(f"--out {str(out)!r} already exists; choose a new directory")
    files = resolve_files(input_pattern, "--input")
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():  # left by an interrupted run: ours, never a finished dataset
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        features = tfds.features.FeaturesDict(
            {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)} if tokenizer
            else {"text": tfds.features.Text()})
        writers = {split: _ShardedSplitWriter(partial, split, shard_size) for split in SPLITS}
        validation = HoldOut(validation_every_nth, "eval")
        n_tokens = 0
        documents = iter_documents(files, field, invalid_utf8)
        for ordinal, text in enumerate(tqdm(documents, unit="doc", disable=not progress, desc="prepare")):
            if tokenizer:
                ids = tokenizer.encode_document(text)
                n_tokens += len(ids)
                example = {"tokens": ids}
            else:
                example = {"text": text}
            writers["validation" if validation.keeps(ordinal) else "train"].write(features.serialize_example(example))
        counts = {split: sum(w.shard_lengths) for split, w in writers.items()}
        if counts["validation"] == 0:
            raise DataError(
                f"--input {input_pattern!r} holds {counts['train']} documents, fewer than "
                f"--validation-every-nth={validation_every_nth}; no validation split possible")
        for writer in writers.values():
            writer.finish()
        tfds.folder_dataset.write_metadata(
            data_dir=partial, features=features, check_data=False, version="1.0.0",
            filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            split_infos=[tfds.core.SplitInfo(name=s, shard_lengths=w.shard_lengths, num_bytes=0)
                         for s, w in writers.items()],
            description=f"jaxgen data prepare --input {input_pattern}")
        summary = {"input": input_pattern, "files": len(files), "documents": counts,
                   "validation_every_nth": validation_every_nth, "tokenizer": None}
        if tokenizer:
            shutil.copyfile(tokenizer.path, partial / "tokenizer.model")
            summary["tokenizer"] = {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "tokens": n_tokens}
        (partial / PREPARED_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


def read_prepared_metadata(path: str | pathlib.Path) -> dict | None:
    """What `prepare_dataset` recorded, or None if `path` is not a complete prepared dataset."""
    marker = pathlib.Path(path).expanduser() / PREPARED_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None
