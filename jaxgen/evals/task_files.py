"""Records of a benchmark's files: JSONL or Parquet, as the Hugging Face datasets store them.

A task's data is found under `--task-data DIR` as `DIR/<task>.jsonl`, `DIR/<task>.parquet`,
or a directory `DIR/<task>/` holding the files of its evaluation split (files whose name
names the split, e.g. `validation-00000-of-00001.parquet`, `hellaswag_val.jsonl`; or, when
none does, every data file there that names no other split: a `train.jsonl` is never scored).
Each record comes with where it was read, so a message can name the file and line.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator

from jaxgen.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# How file names spell each split (Hugging Face writes "validation", the original releases "val"/"dev").
SPLIT_NAMES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",), "train": ("train",)}


def split_files(data_dir: pathlib.Path, task: str, split: str, subset: str | None = None) -> list[pathlib.Path]:
    """The files holding `task`'s `split` under `data_dir` (see the module docstring).

    Where a dataset ships several subsets side by side (ARC-Easy beside ARC-Challenge, LAMBADA in six
    languages), only the files whose path names `subset` are read, when some do.
    """
    for suffix in DATA_SUFFIXES:
        if (data_dir / f"{task}{suffix}").is_file():
            return [data_dir / f"{task}{suffix}"]
    directory = data_dir / task
    if not directory.is_dir():
        raise DataError(f"no data for task {task!r} in --task-data {str(data_dir)!r}: expected {task}.jsonl, "
                        f"{task}.parquet or a directory {task}/ holding its {split} split")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise DataError(f"directory {str(directory)!r} holds no .jsonl or .parquet file for task {task!r}")
    others = [name for other, names in SPLIT_NAMES.items() if other != split for name in names]
    kept = ([p for p in files if _names(p, SPLIT_NAMES[split])]
            or [p for p in files if not _names(p, others)])
    if not kept:  # scoring a train split (the examples a model may have been tuned on) would flatter it
        raise DataError(f"directory {str(directory)!r} holds no file of the {split} split of task {task!r}, only of "
                        f"other splits ({', '.join(p.name for p in files[:3])}{', ...' if len(files) > 3 else ''}); "
                        f"give it a {split} file (one whose name says {' or '.join(SPLIT_NAMES[split])})")
    files = kept
    if subset is not None:
        words = [re.split(r"[^a-z0-9-]+", str(p.relative_to(directory)).lower()) for p in files]
        files = [p for p, w in zip(files, words) if subset.lower() in w] or files
    return files


def _names(path: pathlib.Path, split_names: list[str] | tuple[str, ...]) -> bool:
    """Whether `path`'s file name names one of `split_names` as a word (`hellaswag_val.jsonl`, not `interval`)."""
    return re.search(rf"(^|[^a-z])({'|'.join(split_names)})([^a-z]|$)", path.name.lower()) is not None


def read_records(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a JSONL or Parquet file; `where` is 'FILE:LINE' or 'FILE row N'."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:  # a damaged or foreign file
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
        return
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark (Windows) is no text
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}); save {path.name} as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                array = line.lstrip().startswith("[") * " (a JSON array: task files are JSON Lines, one object a line)"
                raise DataError(f"{path}:{number}: not a JSON object ({err.msg}){array}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: not a JSON object")
            yield f"{path}:{number}", record


def require_fields(record: dict, names: tuple[str, ...], where: str) -> None:
    """Every field of `names` in `record`: those missing are named together, not one per attempt."""
    missing = [name for name in names if name not in record]
    if missing:
        listed = ", ".join(map(repr, missing))
        raise DataError(f"{where}: missing field{'s' * (len(missing) > 1)} {listed} (fields there: {sorted(record)})")


def field(record: dict, name: str, where: str, kind: type | tuple[type, ...]):
    """`record[name]`, refused in one line naming the field and where the record is when absent or mistyped."""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (fields there: {sorted(record)})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise DataError(f"{where}: field {name!r} is {type(value).__name__} {value!r:.60}, expected "
                        f"{' or '.join(k.__name__ for k in kinds)}")
    return value
