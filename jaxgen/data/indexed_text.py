"""Text and JSONL files small enough to hold, as a random-access source of documents.

A source whose files take at most data.index_max_mb MiB on disk is read once per process:
its documents (non-empty lines, or the `field` of JSONL lines) are kept as one UTF-8 buffer
with their offsets. It is then read by index like an ArrayRecord or Parquet source, so it is
shuffled whole every epoch and held out by document number. Larger sources are streamed
(streaming.py). The decision needs only the files' sizes, so every process makes the same one
at once; the memory held is the documents' text (for `.gz` files, several times their size).
"""

from __future__ import annotations

import pathlib

import numpy as np

from jaxgen.data.corpus import CONFIG_KEYS, InvalidUtf8, SettingNames, file_documents

# Sources read in this process, by their files (name, size, modification time) and how they are read.
# A run opens a source once per part and reader stream, and for its tokenizer and checks.
_read: dict[tuple, IndexedDocuments] = {}


class IndexedDocuments:
    """Documents held in memory, by index (their order in the files). Pickles as its buffer."""

    def __init__(self, text: bytes, starts: np.ndarray):
        self.text, self.starts = text, starts  # document i is text[starts[i]:starts[i + 1]]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index: int) -> str:
        return self.text[self.starts[index]:self.starts[index + 1]].decode("utf-8")

    def __repr__(self) -> str:
        return f"IndexedDocuments({len(self)} documents, {len(self.text)} bytes)"


def fits_in_memory(files: list[pathlib.Path], max_mb: float) -> bool:
    return sum(path.stat().st_size for path in files) <= max_mb * 2**20


def indexed_documents(files: list[pathlib.Path], field: str | None, invalid_utf8: InvalidUtf8,
                      names: SettingNames = CONFIG_KEYS) -> IndexedDocuments:
    """The documents of `files` (field=None: text lines) in memory, read once per process; `names`: the
    settings its messages name."""
    key = (tuple((str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files),
           field, invalid_utf8)
    if key not in _read:
        documents = [document.encode("utf-8") for path in files
                     for document in file_documents(path, field, invalid_utf8, names)]
        _read[key] = IndexedDocuments(b"".join(documents),
                                      np.cumsum([0, *map(len, documents)], dtype=np.int64))
    return _read[key]
