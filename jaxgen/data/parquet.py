"""Parquet files as a random-access source of documents: one string column, read with pyarrow.

Local paths are globbed like the other sources; URIs (`gs://`, `s3://`, `file://`, ...)
go through pyarrow's filesystem layer (`pyarrow.fs.FileSystem.from_uri`), so the same
code reads a bucket. Every file's footer is read when the source opens (in parallel, and
once per process for a file of unchanged size and time: a run opens its sources several
times, and a bucket answers slowly): a damaged file, a missing column or one that does
not hold text is reported before any work.

Parquet stores a column in row groups, the smallest unit it reads, so a document costs
the read of its row group; the last row group read of each of the most recently read
files is kept, which makes reading in order (or nearby) one read per row group. Read in
a whole-shuffled order, nearly every document is a row-group read: small row groups, or
`jaxgen data prepare --input 'x/*.parquet'` (ArrayRecord), suit large shuffled corpora.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import glob
import pathlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxgen.data.corpus import no_files, resolve_files, warn_once
from jaxgen.errors import DataError, first_line

# Files whose reader (an open file and its last row group) is kept; bounds memory and open files.
_KEPT_FILES = 8
# Footers read at once when a source opens.
_FOOTER_READERS = 16
# Row-group sizes of the files checked in this process, by (name, size, modification time, field).
_checked: dict[tuple, list[int]] = {}


def is_uri(pattern: str) -> bool:
    return "://" in pattern


@dataclasses.dataclass
class _FileReader:
    parquet_file: Any  # pyarrow.parquet.ParquetFile
    row_group: int = -1
    column: Any = None  # the field's values in that row group (a pyarrow ChunkedArray)


class ParquetDocuments:
    """The `field` column of Parquet files, by index: each value a `str`, or None where it is null.

    Pickles (to grain's worker processes) without open files; each copy opens them as it reads.
    """

    def __init__(self, filesystem: Any, paths: list[str], names: list[str], field: str,
                 field_setting: str = "data.field"):
        """`paths` on `filesystem` (a `pyarrow.fs.FileSystem`), `names` as errors show them, and `field_setting`
        how the command the user ran sets `field` ("data.field", "--field")."""
        self.filesystem, self.paths, self.names, self.field = filesystem, list(paths), list(names), field
        self.field_setting = field_setting
        with ThreadPoolExecutor(_FOOTER_READERS) as pool:
            rows = list(pool.map(self._row_groups, range(len(self.paths))))  # the first bad file's error
        # One entry per row group of every file: its file, its index within the file, its first row.
        self._group_file = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
        self._group_index = np.concatenate([np.arange(len(r)) for r in rows]).astype(np.int64)
        sizes = np.concatenate([np.asarray(r, np.int64) for r in rows])
        self._group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._init_readers()

    def _init_readers(self) -> None:
        self._readers: collections.OrderedDict[int, _FileReader] = collections.OrderedDict()
        self._lock = threading.Lock()  # grain reads records from several threads

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_readers()

    def _open(self, i: int):
        """File i as a `pyarrow.parquet.ParquetFile`, its footer read; `_close` it."""
        import pyarrow
        import pyarrow.parquet as pq

        try:
            source = self.filesystem.open_input_file(self.paths[i])
        except OSError as err:
            raise DataError(f"{self.names[i]!r} cannot be opened ({first_line(err)})") from None
        try:
            return pq.ParquetFile(source)
        except (pyarrow.ArrowException, OSError) as err:
            source.close()
            raise DataError(f"{self.names[i]!r} cannot be read as Parquet ({first_line(err)}); "
                            "give Parquet files, e.g. written by pyarrow.parquet.write_table") from None

    @staticmethod
    def _close(parquet_file) -> None:
        parquet_file.close(force=True)  # force: the file was opened here, not by pyarrow.parquet

    @contextlib.contextmanager
    def _opened(self, i: int) -> Iterator[Any]:
        parquet_file = self._open(i)
        try:
            yield parquet_file
        finally:
            self._close(parquet_file)

    def _row_groups(self, i: int) -> list[int]:
        """File i's row-group sizes, once its footer shows a text column `field`."""
        try:
            info = self.filesystem.get_file_info(self.paths[i])
        except OSError as err:
            raise DataError(f"{self.names[i]!r} cannot be opened ({first_line(err)})") from None
        key = (self.names[i], info.size, info.mtime_ns, self.field)
        if key not in _checked:
            _checked[key] = self._check(i)
        return _checked[key]

    def _check(self, i: int) -> list[int]:
        import pyarrow

        with self._opened(i) as parquet_file:
            schema, metadata = parquet_file.schema_arrow, parquet_file.metadata
        if self.field not in schema.names:
            raise DataError(f"{self.names[i]!r} has no column {self.field!r} ({self.field_setting}); it has "
                            f"{schema.names}; set {self.field_setting} to the column of the text")
        kind = schema.field(self.field).type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)
                or pyarrow.types.is_string_view(kind)):
            raise DataError(f"{self.names[i]!r}: column {self.field!r} ({self.field_setting}) holds {kind}, "
                            f"not strings; set {self.field_setting} to the column of the text")
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        column = schema.get_field_index(self.field)
        stats = [metadata.row_group(g).column(column).statistics for g in range(metadata.num_row_groups)]
        nulls = sum(int(s.null_count) for s in stats if s is not None and s.has_null_count)
        if nulls:  # as a JSONL document that is null is named, rather than trained on silently without it
            warn_once(f"{self.names[i]} nulls", f"{self.names[i]!r}: {nulls:,} of {sum(sizes):,} rows have no "
                                                f"{self.field!r} ({self.field_setting}) value (null); they are left "
                                                "out")
        return sizes

    def __len__(self) -> int:
        return int(self._group_start[-1])

    def __getitem__(self, index: int) -> str | None:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        group = int(np.searchsorted(self._group_start, index, side="right")) - 1
        file, row_group = int(self._group_file[group]), int(self._group_index[group])
        with self._lock:
            column = self._column(file, row_group)
        return column[index - int(self._group_start[group])].as_py()

    def _column(self, file: int, row_group: int):
        reader = self._readers.pop(file, None) or _FileReader(self._open(file))
        self._readers[file] = reader  # now the most recently used
        if len(self._readers) > _KEPT_FILES:
            self._close(self._readers.popitem(last=False)[1].parquet_file)
        if reader.row_group != row_group:
            reader.column = self._read(reader, file, row_group)
            reader.row_group = row_group
        return reader.column

    def _read(self, reader: _FileReader, file: int, row_group: int):
        import pyarrow

        try:
            return reader.parquet_file.read_row_group(row_group, columns=[self.field]).column(0)
        except (pyarrow.ArrowException, OSError) as err:
            raise DataError(f"{self.names[file]!r}: row group {row_group} cannot be read ({first_line(err)}); "
                            "the file is damaged: replace it, or leave it out of the glob") from None

    def file_documents(self, file: int) -> Iterator[str]:
        """The documents of file `file` in order, a row group at a time, nulls left out (for one-pass readers)."""
        with self._opened(file) as parquet_file:
            reader = _FileReader(parquet_file)
            for row_group in range(parquet_file.metadata.num_row_groups):
                yield from (doc for doc in self._read(reader, file, row_group).to_pylist() if doc is not None)

    def __repr__(self) -> str:
        return f"ParquetDocuments({len(self.paths)} files, column {self.field!r}, {len(self)} rows)"


def open_parquet(pattern: str, field: str, key: str = "data.parquet",
                 field_setting: str = "data.field") -> ParquetDocuments:
    """The `field` column of the Parquet files matching `pattern` (a local glob or a URI glob); `key` and
    `field_setting` name their settings."""
    if not is_uri(pattern):
        return local_parquet(resolve_files(pattern, key, ".parquet"), field, field_setting)
    filesystem, paths = _remote_files(pattern, key)
    scheme = pattern.split("://", 1)[0]
    return ParquetDocuments(filesystem, paths, [f"{scheme}://{path}" for path in paths], field, field_setting)


def local_parquet(files: list[pathlib.Path], field: str, field_setting: str = "data.field") -> ParquetDocuments:
    import pyarrow.fs

    return ParquetDocuments(pyarrow.fs.LocalFileSystem(), [str(path.absolute()) for path in files],
                            [str(path) for path in files], field, field_setting)


def _remote_files(pattern: str, key: str) -> tuple[Any, list[str]]:
    """The filesystem of a URI glob and the paths on it that the glob matches, sorted."""
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(pattern)
        if glob.has_magic(path):
            # List below the last directory before the first wildcard, then match the whole glob.
            base = path[: min(path.find(c) for c in "*?[" if c in path)].rpartition("/")[0]
            infos = filesystem.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
            infos = [info for info in infos if fnmatch.fnmatchcase(info.path, path)]
        else:
            infos = [filesystem.get_file_info(path)]
    except (OSError, ValueError) as err:  # pyarrow's errors (network, credentials, a bad URI) name no key
        raise DataError(f"{key} {pattern!r} cannot be listed ({first_line(err)})") from None
    paths = sorted(info.path for info in infos if info.type == pyarrow.fs.FileType.File)
    if not paths:
        raise DataError(no_files(key, pattern, ".parquet"))
    return filesystem, paths
