"""Benchmark tasks: each public dataset's records turned into examples by its standard zero-shot protocol.

The prompts and choices follow lm-evaluation-harness's task definitions, so the
figures are comparable with published ones: a multiple-choice example is scored
by the log-likelihood of `" " + choice` after its context, a LAMBADA example by
the last word (`" " + word`) after the rest of the passage.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import re
from collections.abc import Callable

from jaxgen.errors import ConfigError, DataError
from jaxgen.evals.task_files import field, read_records, require_fields, split_files
from jaxgen.files import absolute

TARGET_DELIMITER = " "  # between a context and its continuation, as the harness's default


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice

    def requests(self) -> list[tuple[str, str]]:
        return [(self.context, TARGET_DELIMITER + choice) for choice in self.choices]


@dataclasses.dataclass(frozen=True)
class Cloze:
    context: str
    target: str  # the continuation to predict, its leading space included

    def requests(self) -> list[tuple[str, str]]:
        return [(self.context, self.target)]


Example = MultipleChoice | Cloze


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    examples: list[Example]


def _hellaswag_text(text: str) -> str:
    # WikiHow contexts carry bracketed markup ("[title]", "[step]"); the harness removes it so.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(record: dict, where: str) -> MultipleChoice:
    require_fields(record, ("activity_label", "ctx_a", "ctx_b", "endings", "label"), where)
    ctx = field(record, "ctx_a", where, str) + " " + field(record, "ctx_b", where, str).capitalize()
    endings = field(record, "endings", where, list)
    return MultipleChoice(_hellaswag_text(field(record, "activity_label", where, str) + ": " + ctx),
                          _choices([_hellaswag_text(_text(e, "endings", where)) for e in endings], "endings", where),
                          _label(field(record, "label", where, (int, str)), len(endings), where))


def _arc(record: dict, where: str) -> MultipleChoice:
    require_fields(record, ("question", "choices", "answerKey"), where)
    choices = field(record, "choices", where, dict)
    texts = [_text(t, "choices.text", where) for t in field(choices, "text", where, list)]
    labels = field(choices, "label", where, list)
    key = field(record, "answerKey", where, str)
    if key not in labels:
        raise DataError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return MultipleChoice(f"Question: {field(record, 'question', where, str)}\nAnswer:",
                          _choices(texts, "choices.text", where), labels.index(key))


def _piqa(record: dict, where: str) -> MultipleChoice:
    require_fields(record, ("goal", "sol1", "sol2", "label"), where)
    return MultipleChoice(f"Question: {field(record, 'goal', where, str)}\nAnswer:",
                          _choices([field(record, "sol1", where, str), field(record, "sol2", where, str)],
                                   "sol1/sol2", where),
                          _label(field(record, "label", where, (int, str)), 2, where))


def _lambada(record: dict, where: str) -> Cloze:
    """The passage less its last word, and that word to predict. A passage without both was scored anyway
    (an empty text: the loss of a lone space) and counted in `n` and the perplexity."""
    text = field(record, "text", where, str)
    context, _, word = text.rpartition(" ")
    if not context.strip() or not word.strip():
        raise DataError(f"{where}: field 'text' is {text!r:.60}; a LAMBADA passage needs words before its last "
                        "word, and the last word to predict")
    return Cloze(context, " " + word)


def _multiple_choice(record: dict, where: str) -> MultipleChoice:
    require_fields(record, ("context", "choices", "label"), where)
    choices = field(record, "choices", where, list)
    return MultipleChoice(field(record, "context", where, str),
                          _choices([_text(c, "choices", where) for c in choices], "choices", where),
                          _label(field(record, "label", where, int), len(choices), where))


def _choices(texts: list[str], name: str, where: str) -> tuple[str, ...]:
    """At least two choices, none empty: an empty continuation scores no loss at all and always wins, and a
    single choice is always right; either inflated the task's accuracy without a word."""
    if len(texts) < 2:
        raise DataError(f"{where}: field {name!r} holds {len(texts)} choice{'s' * (len(texts) != 1)}; a "
                        "multiple-choice question needs at least 2")
    empty = [i for i, text in enumerate(texts) if not text.strip()]
    if empty:
        raise DataError(f"{where}: choice {empty[0]} of field {name!r} is {texts[empty[0]]!r}; every choice needs "
                        "text to score (an empty one always wins)")
    return tuple(texts)


def _text(value, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} holds {type(value).__name__} {value!r:.60}, expected strings")
    return value


def _label(value: int | str, n_choices: int, where: str) -> int:
    try:
        label = int(value)
    except ValueError:
        raise DataError(f"{where}: label {value!r} is not a choice index") from None
    if not 0 <= label < n_choices:
        raise DataError(f"{where}: label {label} is not the index of one of its {n_choices} choices")
    return label


@dataclasses.dataclass(frozen=True)
class Protocol:
    split: str  # the split scored: the labelled one the harness scores
    read: Callable[[dict, str], Example]
    subset: str | None = None  # the files read where a dataset ships several subsets side by side


KNOWN = {
    "hellaswag": Protocol("validation", _hellaswag),
    "arc_easy": Protocol("test", _arc, "arc-easy"),
    "arc_challenge": Protocol("test", _arc, "arc-challenge"),
    "piqa": Protocol("validation", _piqa),
    "lambada": Protocol("test", _lambada, "en"),  # LAMBADA as OpenAI prepared it; EleutherAI adds translations
}
GENERIC = "multiple_choice"  # multiple_choice=FILE.jsonl: context, choices, label


def known_names() -> str:
    return ", ".join([*KNOWN, f"{GENERIC}=FILE.jsonl"])


def parse_task_names(specs: list[str]) -> list[str]:
    """Task names from comma-separated lists (`--tasks a,b --tasks multiple_choice=f.jsonl`), checked."""
    names = [_task_name(name.strip()) for spec in specs for name in spec.split(",") if name.strip()]
    # One file named twice (relative and absolute, or through a link) would be scored twice under two names.
    same = [os.path.realpath(name.partition("=")[2]) if name.startswith(f"{GENERIC}=") else name for name in names]
    if len(set(same)) != len(same):
        raise ConfigError(f"a task is named twice in {','.join(names)}")
    stems = [pathlib.Path(name.partition("=")[2]).stem for name in names if name.startswith(f"{GENERIC}=")]
    if clash := next((stem for stem in stems if stems.count(stem) > 1 or stem in names), None):
        raise ConfigError(f"two tasks would be logged as {clash}/acc ({','.join(names)}): a {GENERIC} file is "
                          "logged by its name without .jsonl; rename one")
    return names


def _task_name(name: str) -> str:
    """`name` checked; a multiple_choice=FILE task is named by the file's absolute path, so that results
    recorded from another working directory stay apart from (or land on) the same file's, not a namesake's."""
    kind, _, path = name.partition("=")
    if kind == GENERIC:
        if not path:
            raise ConfigError(f"task {name!r} needs its file: {GENERIC}=FILE.jsonl")
        return f"{GENERIC}={absolute(os.path.expanduser(path))}"
    if name not in KNOWN:
        close = difflib.get_close_matches(name, [*KNOWN, GENERIC], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown task {name!r}{hint}; known tasks: {known_names()}")
    return name


def load_task(name: str, task_data: str | pathlib.Path | None) -> Task:
    """The examples of task `name` (a known task read from `task_data`, or multiple_choice=FILE)."""
    kind, _, path = name.partition("=")
    if kind == GENERIC:
        files, read = [pathlib.Path(path)], _multiple_choice
        if files[0].is_dir():
            raise DataError(f"task file {path!r} is a directory; give a JSONL file of {GENERIC} questions")
        if not files[0].is_file():
            raise DataError(f"task file {path!r} does not exist")
    else:
        if task_data is None:
            raise ConfigError(f"task {name!r} reads its files from a directory: give --task-data DIR "
                              f"(train.eval_task_data in a config)")
        if not pathlib.Path(task_data).is_dir():
            raise DataError(f"--task-data {str(task_data)!r} is not a directory")
        protocol = KNOWN[name]
        files, read = split_files(pathlib.Path(task_data), name, protocol.split, protocol.subset), protocol.read
    examples = [read(record, where) for file in files for where, record in read_records(file)]
    if not examples:
        raise DataError(f"task {name!r} has no examples in {', '.join(map(str, files))}")
    return Task(name, examples)
