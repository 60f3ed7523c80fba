"""Text documents from files: one non-empty line is one document.

The bundled default corpus is the King James Bible (public domain, one verse per
line; provenance in KJV_PROVENANCE.md beside it).
"""

from __future__ import annotations

import glob
import gzip
import pathlib
from collections.abc import Iterator

BUNDLED_CORPUS = pathlib.Path(__file__).with_name("kjv.txt.gz")


class DataError(ValueError):
    """Input data cannot be used; the message names the file or pattern."""


def resolve_files(pattern: str | None) -> list[pathlib.Path]:
    """Files matched by a glob (null = the bundled corpus), sorted for determinism."""
    if pattern is None:
        return [BUNDLED_CORPUS]
    files = sorted(pathlib.Path(p) for p in glob.glob(str(pathlib.Path(pattern).expanduser()), recursive=True))
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataError(f"data.path {pattern!r} matches no files")
    return files


def iter_documents(files: list[pathlib.Path]) -> Iterator[str]:
    """Stream documents (non-empty lines) from text files, gzip or plain."""
    for path in files:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            try:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not valid UTF-8 text ({err.reason} at byte {err.start})") from None
