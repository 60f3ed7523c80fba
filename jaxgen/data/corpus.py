"""Files of documents: glob resolution, line decoding and the bundled corpus.

A text file holds one document per non-empty line; a JSONL file one JSON object
per line, whose `field` is the document. Files are read in binary so a bad line
can be reported (or skipped) by its byte offset without losing the stream.

The bundled default corpus is the King James Bible (public domain, one verse per
line; provenance in KJV_PROVENANCE.md beside it).
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import pathlib
from collections.abc import Iterator
from typing import IO, Literal

from jaxgen.errors import DataError

BUNDLED_CORPUS = pathlib.Path(__file__).with_name("kjv.txt.gz")

InvalidUtf8 = Literal["skip", "error"]

log = logging.getLogger("jaxgen")


def resolve_files(pattern: str, key: str) -> list[pathlib.Path]:
    """Files matched by a glob, sorted for determinism; `key` names the config key in errors."""
    files = sorted(pathlib.Path(p) for p in glob.glob(str(pathlib.Path(pattern).expanduser()), recursive=True))
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError(f"{key} {pattern!r} matches no files")
    for path in files:
        with open_binary(path) as f:
            if not f.read(1):
                raise DataError(f"{key} {pattern!r}: file {str(path)!r} is empty")
    return files


def open_binary(path: pathlib.Path) -> IO[bytes]:
    """A file's (decompressed) bytes; `.gz` files are gunzipped on the fly."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


class SkipCounter:
    """Counts skipped records and warns at 1, 10, 100, ... so a bad corpus is noticed, not flooded."""

    def __init__(self, what: str):
        self.what, self.count = what, 0

    def skip(self, where: str) -> None:
        self.count += 1
        if self.count in (1, 10, 100) or self.count % 1000 == 0:
            log.warning("skipped %d %s so far (latest: %s; data.invalid_utf8=error fails instead)",
                        self.count, self.what, where)


def decode_utf8(raw: bytes, where: str, policy: InvalidUtf8, skipped: SkipCounter) -> str | None:
    """The text of `raw`, or None if it is invalid UTF-8 and the policy is to skip."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if policy == "error":
            raise DataError(
                f"{where} is not valid UTF-8 ({err.reason} at byte {err.start}); "
                "set data.invalid_utf8=skip to skip such records"
            ) from None
        skipped.skip(where)
        return None


def line_document(line: str, field: str | None, where: str) -> str | None:
    """The document a line holds (None for a blank line): the line itself, or its JSON `field`."""
    if not line.strip():
        return None
    if field is None:
        return line.rstrip("\r\n")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON: {err.msg}") from None
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where} has no field {field!r} (data.field); it holds {keys}")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is a {type(text).__name__}, not a string")
    return text


def is_jsonl(path: pathlib.Path) -> bool:
    return ".jsonl" in path.suffixes


def iter_documents(files: list[pathlib.Path], field: str = "text", invalid_utf8: InvalidUtf8 = "skip") -> Iterator[str]:
    """Every document of the files once, in order: lines of text files, `field` of `.jsonl` files.

    For one-pass readers (tokenizer training, `data prepare`); training streams use streaming.py.
    """
    skipped = SkipCounter("lines of invalid UTF-8")
    for path in files:
        jsonl_field = field if is_jsonl(path) else None
        with open_binary(path) as f:
            offset = 0
            for raw in f:
                where = f"{path}: line at byte {offset}"
                offset += len(raw)
                line = decode_utf8(raw, where, invalid_utf8, skipped)
                doc = None if line is None else line_document(line, jsonl_field, where)
                if doc is not None:
                    yield doc
