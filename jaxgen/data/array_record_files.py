"""ArrayRecord files checked for damage before they are read.

grain's and TFDS's readers open each file lazily, where its first record is read: a file cut short (a copy
that stopped, a full disk) failed then, inside a data-loading thread, as a RuntimeError that names no file.
"""

from __future__ import annotations

import pathlib

from jaxgen.errors import first_line


def damaged_array_record(files: list[pathlib.Path]) -> tuple[pathlib.Path, str] | None:
    """The first of `files` whose ArrayRecord reader reports damage once opened (a file cut short has lost the
    footer it reads first), with the reader's reason; None where every one opens."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in files:
        try:
            ArrayRecordReader(str(path)).close()  # close raises what the open met
        except RuntimeError as err:
            return pathlib.Path(path), first_line(err, 200)
    return None
