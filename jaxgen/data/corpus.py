"""Files of documents: glob resolution, line decoding and the bundled corpus.

A text file holds one document per non-empty line; a JSONL file one JSON object
per line, whose `field` is the document. Files are read in binary so a bad line
can be reported (or skipped) by its byte offset without losing the stream.

The bundled default corpus is the King James Bible (public domain, one verse per
line; provenance in KJV_PROVENANCE.md beside it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import json
import logging
import pathlib
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Literal

from jaxgen.errors import DataError, json_problem

BUNDLED_CORPUS = pathlib.Path(__file__).with_name("kjv.txt.gz")

InvalidUtf8 = Literal["skip", "error"]

log = logging.getLogger("jaxgen")


@dataclasses.dataclass(frozen=True)
class SettingNames:
    """How the command reading the documents spells the settings its messages advise: `train` takes config
    keys, `data prepare` and `tokenizer train` flags."""

    field: str
    invalid_utf8: str  # "{}" stands for the value


CONFIG_KEYS = SettingNames("data.field", "data.invalid_utf8={}")
COMMAND_FLAGS = SettingNames("--field", "--invalid-utf8 {}")


def config_keys(field_key: str) -> SettingNames:
    """The config keys of a source whose field is set by `field_key` (`data.mixture[1].field`, say)."""
    return SettingNames(field_key, CONFIG_KEYS.invalid_utf8)


def resolve_files(pattern: str, key: str, suffix: str = ".txt", text: bool = False) -> list[pathlib.Path]:
    """Files matched by a glob, sorted for determinism; `key` names the config key in errors, `suffix` the
    files' kind in the glob a folder given for them is told to write. With `text`, a file (Parquet aside) with a
    NUL byte in its first 8 kB is refused: no text holds one, UTF-8 or Latin-1, so it is binary, or UTF-16."""
    matched = sorted(pathlib.Path(p) for p in glob.glob(str(pathlib.Path(pattern).expanduser()), recursive=True))
    files = [f for f in matched if f.is_file()]
    if not files:
        others = [f for f in matched if not f.is_dir()]
        if others:  # a FIFO, a device, a link that leads nowhere: something is there, but no file to read
            raise DataError(f"{key} {pattern!r}: {str(others[0])!r} is {not_a_file(others[0])}; give regular files")
        raise DataError(no_files(key, pattern, suffix))
    for path in files:
        with open_binary(path) as f, damaged_gzip_named(path):  # a .gz that is not gzip fails here, before any work
            head = f.read(8192 if text else 1)
        if not head:
            raise DataError(f"{key} {pattern!r}: file {str(path)!r} is empty")
        if text and b"\0" in head and not is_parquet(path):
            named = f"{key} {pattern!r}" + (f": {str(path)!r}" if str(path) != pattern else "")
            raise DataError(f"{named} is not text (a NUL byte in its first 8 kB: a binary file, or text in UTF-16); "
                            "give text files in UTF-8, a document a line")
    return files


def not_a_file(path: pathlib.Path) -> str:
    """What `path`, which is neither a regular file nor a folder, is."""
    try:
        mode = path.stat().st_mode
    except OSError as err:  # a link to nothing, or a loop of links
        return f"a link that leads to no file ({err.strerror.lower()})" if path.is_symlink() else err.strerror.lower()
    kinds = {stat.S_ISFIFO: "a pipe (FIFO)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def no_files(key: str, pattern: str, suffix: str = ".txt") -> str:
    """The message for a pattern that matches no files; a folder is named as one, with the glob it may mean."""
    if pathlib.Path(pattern).expanduser().is_dir():
        return (f"{key} {pattern!r} is a folder; give a file or a glob of files in it, e.g. "
                f"{str(pathlib.Path(pattern) / '**' / ('*' + suffix))!r}")
    return f"{key} {pattern!r} matches no files"


def open_binary(path: pathlib.Path) -> IO[bytes]:
    """A file's (decompressed) bytes; `.gz` files are gunzipped on the fly."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


@contextlib.contextmanager
def damaged_gzip_named(path: pathlib.Path) -> Iterator[None]:
    """Reads of `path` in the block fail naming it when its gzip stream is damaged; Python's errors name no file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(
            f"{str(path)!r} is not a complete gzip file ({err}); a file named .gz must be gzip-compressed: "
            "compress it again, or rename it without .gz if it is plain text"
        ) from None


def line_number(path: pathlib.Path, offset: int) -> int:
    """The 1-based number of the line starting at byte `offset`, counted on demand for messages."""
    newlines, left = 0, offset
    with open_binary(path) as f:
        while left and (chunk := f.read(min(left, 1 << 20))):
            newlines += chunk.count(b"\n")
            left -= len(chunk)
    return newlines + 1


def find_line(files: Iterable[pathlib.Path], line: str) -> tuple[pathlib.Path, int] | None:
    """The first file of `files` holding `line` (without its line ending), and its 1-based line number there;
    searched only for an error's message, where the reader that met the line no longer knows its place."""
    wanted = line.rstrip("\r\n").encode("utf-8", "surrogateescape")
    for path in files:
        try:
            with open_binary(path) as f:
                for number, raw in enumerate(f, start=1):
                    if raw.rstrip(b"\r\n") == wanted:
                        return path, number
        except (OSError, EOFError, zlib.error):  # gone or damaged since: the message names no place
            continue
    return None


# Sources whose skipped records were reported in this process. Several passes read the same files
# (tokenizer training, the one-batch check, the training and held-out streams, every epoch) and
# would otherwise each report the same lines again.
_reported: set[str] = set()


def warn_once(source: str, message: str) -> None:
    """Log `message` unless a warning about `source` was logged in this process already."""
    if source not in _reported:
        _reported.add(source)
        log.warning(message)


def already_reported() -> frozenset[str]:
    return frozenset(_reported)


def mark_reported(sources: Iterable[str]) -> None:
    """Sources another process reported (e.g. the parent of a grain worker): not reported again here."""
    _reported.update(sources)


class SkippedLines:
    """Lines of one file that one pass skipped as invalid UTF-8.

    Only a pass that read the whole file knows the file's count, so only such a pass reports
    it, and only the first one in the process. A pass over a piece of a file (streaming.py)
    reports the first line it skips, uncounted, unless told to stay quiet.
    """

    def __init__(self, path: pathlib.Path, whole_file: bool, quiet: bool = False, names: SettingNames = CONFIG_KEYS):
        self.path, self.whole_file, self.quiet, self.names = path, whole_file, quiet, names
        self.count, self.first_offset = 0, 0

    def skip(self, offset: int) -> None:
        if not self.count:
            self.first_offset = offset
            if not self.whole_file and not self.quiet:
                stop = self.names.invalid_utf8.format("error")
                warn_once(str(self.path.resolve()), f"{self.path}: skipping lines of invalid UTF-8 (the first met: "
                                                    f"line at byte {offset}); set {stop} to stop at them instead")
        self.count += 1

    def report(self) -> None:
        """Called at the end of the file."""
        if self.count and self.whole_file:
            first = f"line at byte {self.first_offset}, line {line_number(self.path, self.first_offset)}"
            warn_once(str(self.path.resolve()),
                      f"{self.path}: skipped {self.count} lines of invalid UTF-8 (the first: {first}); "
                      f"set {self.names.invalid_utf8.format('error')} to stop at them instead")


def decode_utf8(raw: bytes, policy: InvalidUtf8, invalid: Callable[[UnicodeDecodeError], str],
                names: SettingNames = CONFIG_KEYS) -> str | None:
    """The text of `raw`, or None if it is invalid UTF-8 and the policy is to skip it (the caller counts it).

    `invalid(err)` says which record is invalid, and where, for the error.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if policy == "skip":
            return None
        raise DataError(f"{invalid(err)}; set {names.invalid_utf8.format('skip')} to skip such records") from None


# A document is a line; one longer than this is no document but a file that is not text (a binary file
# in a glob, a dump without newlines): held whole it took gigabytes, and it was read for minutes.
MAX_LINE_BYTES = 64 * 2**20


def read_line(handle: IO[bytes], path: pathlib.Path, offset: int) -> bytes:
    """The next line of `handle` (at byte `offset` of `path`; b"" at the end), never more than MAX_LINE_BYTES."""
    raw = handle.readline(MAX_LINE_BYTES + 1)
    if len(raw) > MAX_LINE_BYTES:
        raise DataError(f"{path}: the line at byte {offset} runs past {MAX_LINE_BYTES / 2**20:g} MiB without a "
                        "newline; documents are lines of text: leave a file that is not text out of the data")
    return raw


def decode_line(raw: bytes, path: pathlib.Path, offset: int, policy: InvalidUtf8, skipped: SkippedLines) -> str | None:
    """The text of the line at byte `offset` of `path`, or None when it is skipped as invalid UTF-8."""
    line = decode_utf8(raw, policy, lambda err: (
        f"{path}: line at byte {offset} is not valid UTF-8 "
        f"({err.reason} at byte {err.start} of line {line_number(path, offset)})"), skipped.names)
    if line is None:
        skipped.skip(offset)
    return line


def line_document(line: str, field: str | None, path: pathlib.Path, offset: int,
                  names: SettingNames = CONFIG_KEYS) -> str | None:
    """The document a line holds (None for a blank line): the line itself, or its JSON `field`."""
    if not line.strip():
        return None
    if field is None:
        return line.rstrip("\r\n")
    where, setting = f"{path}: line at byte {offset}", names.field
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where} is not valid JSON ({json_problem(err)} of line {line_number(path, offset)}); "
            f"each line of a .jsonl file must be one JSON object holding its document in field {field!r} ({setting})"
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{where} has no field {field!r} ({setting}); it holds {_json_kind(record)} "
                        f"(line {line_number(path, offset)}), not a JSON object")
    if field not in record:
        raise DataError(f"{where} has no field {field!r} ({setting}); it holds {sorted(record)} "
                        f"(line {line_number(path, offset)}); set {setting} to the key of the text")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} ({setting}) holds {_json_kind(text)}, not a string "
                        f"(line {line_number(path, offset)})")
    return text


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), "null")


def is_jsonl(path: pathlib.Path) -> bool:
    return ".jsonl" in path.suffixes


def is_parquet(path: pathlib.Path) -> bool:
    return path.suffix == ".parquet"


def refuse_structured(files: list[pathlib.Path], key: str, pattern: str) -> None:
    """Refuse JSONL or Parquet files among a plain-text source's (`data.text`) files, whose lines it would train
    on, markup and all; `data prepare` picks each file's reader by its extension instead."""
    for path in files:
        if is_jsonl(path) or is_parquet(path):
            kind, other = ("JSON-lines", "data.jsonl") if is_jsonl(path) else ("Parquet", "data.parquet")
            raise DataError(f"{key} {pattern!r} matches {str(path)!r}, a {kind} file, which {key} would read as "
                            f"lines of plain text; give it as {other}, or narrow the glob to text files")


def looks_binary(path: pathlib.Path) -> bool:
    """Whether a text or JSONL file's first bytes are those of no text (a NUL byte, or bytes that are not UTF-8)."""
    with open_binary(path) as f, damaged_gzip_named(path):
        head = f.read(8192)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.reason != "unexpected end of data"  # a character cut off by the 8192 bytes is text all the same
    return b"\0" in head


def iter_documents(files: list[pathlib.Path], field: str = "text", invalid_utf8: InvalidUtf8 = "skip",
                   names: SettingNames = COMMAND_FLAGS) -> Iterator[str]:
    """Every document of the files once, in order: lines of text files, `field` of `.jsonl` lines
    and of `.parquet` files (whose footers are all checked before the first document).

    For one-pass readers (`tokenizer train`, `data prepare`, so messages name their flags); training streams
    use streaming.py.
    """
    from jaxgen.data.parquet import local_parquet  # parquet.py resolves its globs with this module

    parquet = [path for path in files if is_parquet(path)]
    columns = local_parquet(parquet, field, names.field) if parquet else None
    for path in files:
        if is_parquet(path):
            yield from columns.file_documents(parquet.index(path))
        else:
            yield from file_documents(path, field if is_jsonl(path) else None, invalid_utf8, names)


def file_documents(path: pathlib.Path, field: str | None, invalid_utf8: InvalidUtf8,
                   names: SettingNames = CONFIG_KEYS) -> Iterator[str]:
    """The documents of one file in order: its lines, or their JSON `field` (field=None: plain text)."""
    skipped = SkippedLines(path, whole_file=True, names=names)
    offset = 0
    with open_binary(path) as f, damaged_gzip_named(path):
        while raw := read_line(f, path, offset):
            line = decode_line(raw, path, offset, invalid_utf8, skipped)
            document = None if line is None else line_document(line, field, path, offset, names)
            offset += len(raw)
            if document is not None:
                yield document
    skipped.report()
