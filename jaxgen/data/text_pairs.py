"""Supervised (input, target) pairs from JSONL lines: `data.input_field` and `data.target_field` of each line.

The document sources hand a pairs source's lines over whole (`sources.line_field`);
this module reads the two fields, refusing a line that lacks one in one message
naming the file and line, the field and what the line holds. A pair longer than
its row is cut to fit; `cut_pairs_note` says how many a sample of them are, so
that a target cut short (the model then learns to stop early) is never silent.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterable, Iterator

import grain

from jaxgen.config import DataConfig
from jaxgen.data.corpus import find_line
from jaxgen.data.sources import text_files
from jaxgen.errors import DataError, json_problem


def read_pair(line: str, input_field: str, target_field: str,
              files: Callable[[], Iterable[pathlib.Path]] = tuple) -> tuple[str, str]:
    """A JSONL line's input and target texts; `files()`: the files it may come from, searched only to name the
    file and line number of one that is refused."""

    def where() -> str:
        found = find_line(files(), line)
        return f"line {found[1]} of {str(found[0])!r} (data.jsonl)" if found else "a line of data.jsonl"

    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where()} is not JSON ({json_problem(err)}): {line[:80]!r}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where()} holds {type(record).__name__}, not a JSON object with fields "
                        f"{input_field!r} and {target_field!r}: {line[:80]!r}")
    texts = []
    for key, field in (("data.input_field", input_field), ("data.target_field", target_field)):
        if field not in record:
            raise DataError(f"{where()} has no field {field!r} ({key}); it holds {sorted(record)}: {line[:80]!r}")
        if not isinstance(record[field], str):
            raise DataError(f"field {field!r} ({key}) of {where()} holds {type(record[field]).__name__}, "
                            f"not text: {line[:80]!r}")
        texts.append(record[field])
    return texts[0], texts[1]


class ReadPair(grain.transforms.Map):
    """A JSONL line -> (input text, target text)."""

    def __init__(self, data: DataConfig):
        self.data = data

    def map(self, line: str) -> tuple[str, str]:
        return read_pair(line, self.data.input_field, self.data.target_field, lambda: pair_files(self.data))


def pair_files(data: DataConfig) -> list[pathlib.Path]:
    """The JSONL files the pairs are read from (data.jsonl's glob)."""
    return text_files(data) or []


def pair_texts(lines: Iterable[str], data: DataConfig) -> Iterator[str]:
    """Every input and target text of the lines (what a tokenizer for the pairs is trained on)."""
    for line in lines:
        yield from read_pair(line, data.input_field, data.target_field, lambda: pair_files(data))


def cut_pairs_note(lengths: Iterable[tuple[int, int]], seq_len: int, target_len: int) -> str | None:
    """What a warning says of pairs whose (input, target) token counts (EOS included) exceed data.seq_len or
    data.target_len, and so are cut to fit; None where every pair fits."""
    lengths = list(lengths)
    over = [(what, key, limit, [n for n in counts if n > limit])
            for what, key, limit, counts in (("inputs", "data.seq_len", seq_len, [i for i, _ in lengths]),
                                             ("targets", "data.target_len", target_len, [t for _, t in lengths]))]
    over = [(what, key, limit, longer) for what, key, limit, longer in over if longer]
    if not over:
        return None
    cut = sum(i > seq_len or t > target_len for i, t in lengths)
    found = " and ".join(f"{len(longer)} {what} longer than {key}={limit} (the longest {max(longer)} tokens, EOS "
                         "included)" for what, key, limit, longer in over)
    raise_to = " and ".join(f"{key} to {max(longer)}" for _, key, _, longer in over)
    return (f"{cut} of the first {len(lengths)} training pairs of data.jsonl do not fit their rows: {found}; they "
            f"are cut to fit, so the model learns from cut text (a cut target teaches it to stop early); raise "
            f"{raise_to} to hold them")
