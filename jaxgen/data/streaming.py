"""Text and JSONL files too large to hold, as an endless, resumable grain stream of documents.

Files are cut into pieces: a plain file every PIECE_BYTES (a piece owns the lines that start
in it), a `.gz` file whole (gzip cannot seek). Each epoch, a seeded stream takes the pieces
of all files in a new random order and reads PIECES_AT_ONCE of them side by side, a line
from each in turn, so the documents that reach the window shuffle (sources.py) come from
all over the source rather than from its first file. Unseeded, the pieces are read one after
another: the files in order.

Held-out documents are counted within each piece: document o of piece p belongs to block
p + o // block of the `HoldOut` rule, so every reader, process and order agrees on the split
without counting the documents before a piece. A document is numbered by its place,
file * FILE_STRIDE + byte offset (`document_place` names it).

The position is a handful of integers (epoch, pieces opened, each open piece's byte offset
and document count), so the state is exact and JSON-serialisable; restoring seeks straight
to the offsets. Sharding is by document: among the documents of the chosen part in reading
order, reader i of n keeps those whose counter is i mod n. grain's worker processes split a
shard again through `set_slice`, so workers and processes compose.
"""

from __future__ import annotations

import pathlib
from typing import IO, Any

import grain
import numpy as np

from jaxgen.data.corpus import (
    CONFIG_KEYS,
    InvalidUtf8,
    SettingNames,
    SkippedLines,
    already_reported,
    damaged_gzip_named,
    decode_line,
    line_document,
    mark_reported,
    open_binary,
    read_line,
)
from jaxgen.data.pipeline import ShardedStream
from jaxgen.data.splits import HoldOut, Shard
from jaxgen.errors import DataError

# Small enough that a window of documents comes from many places, large enough that a seek per piece costs nothing.
PIECE_BYTES = 1 << 16
PIECES_AT_ONCE = 16
FILE_STRIDE = 1 << 40  # a document's number: file * FILE_STRIDE + its line's byte offset (decompressed)


def document_place(files: list[pathlib.Path], number: int) -> str:
    """'FILE:BYTE_OFFSET' of the streamed document numbered `number`."""
    file, offset = divmod(number, FILE_STRIDE)
    return f"{files[file]}:{offset}"


class Pieces:
    """The pieces of the files, by number: file by file, a plain file's in byte order."""

    def __init__(self, files: list[pathlib.Path]):
        self.files = files
        self.ends = [None if path.suffix == ".gz" else path.stat().st_size for path in files]
        counts = [1 if end is None else max(1, -(-end // PIECE_BYTES)) for end in self.ends]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # piece number of each file's first

    def __len__(self) -> int:
        return int(self.first[-1])

    def changed(self) -> list[tuple[pathlib.Path, int, int]]:
        """(path, size when the stream started, size now) of each uncompressed file whose size has changed since;
        a file gone counts as 0 bytes."""
        sizes = [(path, end, path.stat().st_size if path.exists() else 0)
                 for path, end in zip(self.files, self.ends) if end is not None]
        return [(path, then, now) for path, then, now in sizes if now != then]

    def span(self, piece: int) -> tuple[int, int, int | None]:
        """(file, first byte, end byte or None for the end of the file)."""
        file = int(np.searchsorted(self.first, piece, side="right")) - 1
        if self.ends[file] is None:
            return file, 0, None
        start = (piece - int(self.first[file])) * PIECE_BYTES
        return file, start, min(start + PIECE_BYTES, self.ends[file])


class DocumentStream(ShardedStream):
    """(number, document) pairs of text files (field=None) or JSONL files (the `field` of each line),
    for `epochs` passes (None = forever); pieces in a seeded random order, or in order when unseeded."""

    def __init__(self, files: list[pathlib.Path], *, field: str | None, holdout: HoldOut | None,
                 shard: Shard, invalid_utf8: InvalidUtf8, name: str, seed: int | None = None,
                 epochs: int | None = None, names: SettingNames = CONFIG_KEYS):
        super().__init__(shard)
        self.pieces = Pieces(list(files))
        self.field, self.holdout, self.seed = field, holdout, seed
        self.invalid_utf8, self.name, self.epochs, self.names = invalid_utf8, name, epochs, names
        # Travels to grain's worker processes, which must not report skipped lines again.
        self.reported_before = already_reported()

    def piece_at(self, epoch: int, position: int) -> int:
        """The piece read `position`-th in `epoch`."""
        if self.seed is None or len(self.pieces) == 1:
            return position
        return grain.experimental.index_shuffle(position, max_index=len(self.pieces) - 1,
                                                seed=(self.seed + epoch) % 2**32, rounds=4)

    @property
    def at_once(self) -> int:
        return 1 if self.seed is None else PIECES_AT_ONCE

    def __iter__(self) -> grain.DatasetIterator:
        return _DocumentIterator(self)

    def __str__(self) -> str:
        return f"DocumentStream({self.name}, {len(self.pieces.files)} files, {self.shard})"


# "open": [piece, byte offset of its next line, documents counted in it] per piece being read.
_START = {"epoch": 0, "opened": 0, "open": [], "turn": 0, "selected": 0}


class _Reading:
    """An open piece's file; `handle` is opened when first read (after a restore: at the saved offset)."""

    def __init__(self, pieces: Pieces, piece: int, handle: IO[bytes] | None, *, whole_file: bool, quiet: bool):
        self.file, _, self.end = pieces.span(piece)
        self.path = pieces.files[self.file]
        self.handle = handle
        self.skipped = SkippedLines(self.path, whole_file=whole_file, quiet=quiet)


class _DocumentIterator(grain.DatasetIterator):
    def __init__(self, stream: DocumentStream):
        super().__init__()
        mark_reported(stream.reported_before)
        self._stream = stream
        self._position = _fresh(_START)
        self._reading: list[_Reading] = []  # one per open piece

    def __next__(self) -> tuple[int, str]:
        stream, pos = self._stream, self._position
        while True:
            if not pos["open"] and not self._open_next():
                self._end_epoch()
                continue
            slot = pos["turn"] % len(pos["open"])
            piece, offset, ordinal = pos["open"][slot]
            reading = self._reading[slot]
            raw = b""
            if reading.end is None or offset < reading.end:
                with damaged_gzip_named(reading.path):
                    raw = read_line(self._handle(slot), reading.path, offset)
            if not raw:
                self._finish(slot)
                continue
            pos["open"][slot][1] += len(raw)
            pos["turn"] = slot + 1
            line = decode_line(raw, reading.path, offset, stream.invalid_utf8, reading.skipped)
            doc = None if line is None else line_document(line, stream.field, reading.path, offset, stream.names)
            if doc is None:
                continue
            pos["open"][slot][2] += 1
            if stream.holdout and not stream.holdout.keeps(ordinal, blocks_before=piece):
                continue
            pos["selected"] += 1
            if (pos["selected"] - 1) % stream.shard.count == stream.shard.index:
                return reading.file * FILE_STRIDE + offset, doc

    def _open_next(self) -> bool:
        """Start reading the epoch's next pieces, up to the stream's number at once; False when none is left."""
        stream, pos = self._stream, self._position
        while len(pos["open"]) < stream.at_once and pos["opened"] < len(stream.pieces):
            self._start(len(pos["open"]))
        return bool(pos["open"])

    def _start(self, slot: int) -> None:
        """Read the epoch's next piece in `slot` (a new slot at the end, or one whose piece is done)."""
        stream, pos = self._stream, self._position
        piece = stream.piece_at(pos["epoch"], pos["opened"])
        pos["opened"] += 1
        file, start, end = stream.pieces.span(piece)
        path = stream.pieces.files[file]
        with damaged_gzip_named(path):
            handle = open_binary(path) if start == 0 else _at_line_after(path, start, end)
        reading = _Reading(stream.pieces, piece, handle, whole_file=start == 0 and end == stream.pieces.ends[file],
                           quiet=stream.shard.index != 0)
        opened = [piece, handle.tell() if start else 0, 0]
        if slot == len(pos["open"]):
            pos["open"].append(opened)
            self._reading.append(reading)
        else:
            pos["open"][slot], self._reading[slot] = opened, reading

    def _handle(self, slot: int) -> IO[bytes]:
        reading = self._reading[slot]
        if reading.handle is None:
            with damaged_gzip_named(reading.path):
                reading.handle = open_binary(reading.path)
                reading.handle.seek(self._position["open"][slot][1])
        return reading.handle

    def _finish(self, slot: int) -> None:
        """The piece in `slot` is read: the epoch's next piece takes its place, or the slot closes."""
        stream, pos = self._stream, self._position
        reading = self._reading[slot]
        if reading.handle is not None:  # None when restored at the piece's end: nothing was left to read
            reading.handle.close()
        if stream.shard.index == 0:  # every reader meets the same lines; the first alone reports them
            reading.skipped.report()
        if pos["opened"] < len(stream.pieces):
            self._start(slot)
        else:
            del pos["open"][slot], self._reading[slot]

    def _end_epoch(self) -> None:
        stream, pos = self._stream, self._position
        if stream.epochs is None and pos["selected"] <= stream.shard.index:  # endless, it would never yield
            part = stream.holdout.part if stream.holdout else "all"
            if changed := stream.pieces.changed():  # cut short (or emptied) under the running job
                path, then, now = changed[0]
                named = stream.name if repr(str(path)) in stream.name else f"{stream.name}: {str(path)!r}"
                raise DataError(f"{named} changed while the run read it ({then:,} bytes at start-up, {now:,} now), "
                                f"leaving {pos['selected']} documents for the {part} split; a file the run reads must "
                                "stay as it is: put it back, or train on the new data in a new run")
            raise DataError(
                f"{stream.name} holds {pos['selected']} documents for the {part} split, too few for "
                f"{stream.shard.count} readers (data.streams x data.workers) to get one each; "
                "give more documents or set data.streams lower"
            )
        if stream.epochs is not None and pos["epoch"] + 1 == stream.epochs:
            raise StopIteration
        pos.update(_fresh(_START, epoch=pos["epoch"] + 1))

    def get_state(self) -> dict[str, Any]:
        return _fresh(self._position)

    def set_state(self, state: dict[str, Any]) -> None:
        for reading in self._reading:
            if reading.handle is not None:
                reading.handle.close()
        self._position = _fresh({key: state[key] for key in _START})
        # A restored piece's skipped lines go unreported: the pass over it is not whole.
        self._reading = [_Reading(self._stream.pieces, piece, None, whole_file=False, quiet=True)
                         for piece, _, _ in self._position["open"]]


def _fresh(position: dict[str, Any], **changes: int) -> dict[str, Any]:
    """A copy that shares no list with `position`."""
    return {**position, "open": [list(piece) for piece in position["open"]], **changes}


def _at_line_after(path: pathlib.Path, start: int, end: int) -> IO[bytes]:
    """`path` (plain, not gzip) open at the first line that starts at or after byte `start`, or at `end` when
    none starts before it (the piece [start, end) holds no line's start).

    The rest of the line holding byte start - 1 is read only up to `end`: a file with a line far longer than a
    piece (a binary file, a dump without newlines) had every one of its pieces read it to its end."""
    handle = open_binary(path)
    handle.seek(start - 1)
    handle.readline(end - start + 1)  # through its newline (just that, if it ends there), or up to `end`
    return handle
