"""Text and JSONL files as an endless, resumable grain stream of documents.

Files are read line by line (never whole), epoch after epoch. The position is a
handful of integers (epoch, file, byte offset, document counters), so the state
is exact and JSON-serialisable; restoring seeks straight to the offset.

Sharding is by document: among the documents of the chosen part, reader i of n
keeps those whose counter is i mod n. grain's worker processes split a shard
again through `set_slice`, so workers and processes compose.
"""

from __future__ import annotations

import pathlib
from typing import IO, Any

import grain

from jaxgen.data.corpus import (
    InvalidUtf8,
    SkippedLines,
    already_reported,
    damaged_gzip_named,
    decode_line,
    line_document,
    mark_reported,
    open_binary,
)
from jaxgen.data.pipeline import ShardedStream
from jaxgen.data.splits import HoldOut, Shard
from jaxgen.errors import DataError


class DocumentStream(ShardedStream):
    """Documents of text files (field=None) or JSONL files (the `field` of each line), for
    `epochs` passes (None = forever)."""

    def __init__(self, files: list[pathlib.Path], *, field: str | None, holdout: HoldOut | None,
                 shard: Shard, invalid_utf8: InvalidUtf8, name: str, epochs: int | None = None):
        super().__init__(shard)
        self.files, self.field, self.holdout = list(files), field, holdout
        self.invalid_utf8, self.name, self.epochs = invalid_utf8, name, epochs
        # Travels to grain's worker processes, which must not report skipped lines again.
        self.reported_before = already_reported()

    def __iter__(self) -> grain.DatasetIterator:
        return _DocumentIterator(self)

    def __str__(self) -> str:
        return f"DocumentStream({self.name}, {len(self.files)} files, {self.shard})"


_START = {"epoch": 0, "file": 0, "offset": 0, "ordinal": 0, "selected": 0}


class _DocumentIterator(grain.DatasetIterator):
    def __init__(self, stream: DocumentStream):
        super().__init__()
        mark_reported(stream.reported_before)
        self._stream = stream
        self._position = dict(_START)
        self._handle: IO[bytes] | None = None
        self._skipped: SkippedLines | None = None

    def __next__(self) -> str:
        stream, pos = self._stream, self._position
        while True:
            if self._handle is None:
                if stream.epochs is not None and pos["epoch"] == stream.epochs:
                    raise StopIteration
                self._open_file()
            path, offset = stream.files[pos["file"]], pos["offset"]
            with damaged_gzip_named(path):
                raw = self._handle.readline()
            if not raw:
                self._next_file()
                continue
            pos["offset"] += len(raw)
            line = decode_line(raw, path, offset, stream.invalid_utf8, self._skipped)
            doc = None if line is None else line_document(line, stream.field, path, offset)
            if doc is None:
                continue
            pos["ordinal"] += 1
            if stream.holdout and not stream.holdout.keeps(pos["ordinal"] - 1):
                continue
            pos["selected"] += 1
            if (pos["selected"] - 1) % stream.shard.count == stream.shard.index:
                return doc

    def _open_file(self) -> None:
        path, offset = self._stream.files[self._position["file"]], self._position["offset"]
        with damaged_gzip_named(path):
            self._handle = open_binary(path)
            self._handle.seek(offset)
        self._skipped = SkippedLines(path, whole_file=offset == 0)

    def _next_file(self) -> None:
        stream, pos = self._stream, self._position
        self._handle.close()
        self._handle = None
        # Every reader meets the same lines of a file; the first reader alone reports them.
        if stream.shard.index == 0:
            self._skipped.report()
        pos["file"] += 1
        pos["offset"] = 0
        if pos["file"] < len(stream.files):
            return
        if pos["selected"] <= stream.shard.index:
            part = stream.holdout.part if stream.holdout else "all"
            raise DataError(
                f"{stream.name} holds {pos['selected']} documents for the {part} split, too few for "
                f"{stream.shard.count} readers (data.streams x data.workers) to get one each; "
                "give more documents or set data.streams lower"
            )
        pos.update(_START, epoch=pos["epoch"] + 1)

    def get_state(self) -> dict[str, Any]:
        return dict(self._position)

    def set_state(self, state: dict[str, Any]) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._position.update({key: int(state[key]) for key in _START})
