"""Tiny benchmark files in the public datasets' own formats, written by the tests (nothing is downloaded)."""

from __future__ import annotations

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

# Records as the Hugging Face datasets store them (Rowan/hellaswag, allenai/ai2_arc, baber/piqa,
# EleutherAI/lambada_openai), with text a KJV-trained model has seen something like.
HELLASWAG = [
    {"ind": 4, "activity_label": "Sowing seed", "ctx_a": "A sower went forth to sow.", "ctx_b": "and when he sowed",
     "endings": ["some seeds fell by the way side.", "the fowls [title] came and devoured them.",
                 "he sat down on the mountain.", "the sea was calm."], "label": "0", "split": "val"},
    {"ind": 9, "activity_label": "Building", "ctx_a": "The wise man built his house upon a rock.", "ctx_b": "the rain",
     "endings": ["descended, and the floods came.", "was a loaf of bread.", "said unto him, Follow me.",
                 "and the night were the first day."], "label": "0", "split": "val"},
    {"ind": 12, "activity_label": "Fishing", "ctx_a": "Simon and Andrew cast a net into the sea.", "ctx_b": "they",
     "endings": ["were fishers.", "went up into a mountain to pray.", "and he [step] said unto them.",
                 "took bread, and blessed it."], "label": "0", "split": "val"},
]
ARC_EASY = [
    {"id": "q1", "question": "Who created the heaven and the earth in the beginning?",
     "choices": {"text": ["God", "the sea", "a stone", "the moon"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "q2", "question": "What did God divide the light from?",
     "choices": {"text": ["the darkness", "the waters", "the dry land"], "label": ["1", "2", "3"]}, "answerKey": "1"},
    {"id": "q3", "question": "How many days did God work?",
     "choices": {"text": ["seven", "six", "forty", "one"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
]
PIQA = [
    {"goal": "To light a lamp in the house,", "sol1": "put it on a candlestick.", "sol2": "put it under a bushel.",
     "label": 0},
    {"goal": "To keep new wine,", "sol1": "put it into old bottles.", "sol2": "put it into new bottles.", "label": 1},
]
LAMBADA = [
    {"text": "In the beginning God created the heaven and the earth"},
    {"text": "And God said, Let there be light: and there was light"},
    # Longer than the tiny model's window (64 tokens): scored on its last 65 tokens.
    {"text": " ".join(["And the evening and the morning were the first day."] * 12) + " And God said"},
]
MULTIPLE_CHOICE = [
    {"context": "Our Father which art in", "choices": ["heaven", "the sea", "Egypt"], "label": 0},
    {"context": "Blessed are the meek: for they shall inherit the", "choices": ["earth", "stones"], "label": 0},
    {"context": "", "choices": ["And God said", "said God And"], "label": 0},  # no context: BOS alone
]


def write_jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_task_data(root: pathlib.Path) -> pathlib.Path:
    """A --task-data directory in the layouts the public copies come in; returns it."""
    write_jsonl(root / "hellaswag" / "data" / "hellaswag_val.jsonl", HELLASWAG)
    write_jsonl(root / "hellaswag" / "data" / "hellaswag_train.jsonl", HELLASWAG[:1])  # another split: not read
    # The whole ai2_arc repository: ARC-Challenge beside ARC-Easy, each with its splits.
    for subset, split, records in (("ARC-Easy", "test", ARC_EASY), ("ARC-Easy", "validation", ARC_EASY[:1]),
                                   ("ARC-Challenge", "test", ARC_EASY[:2])):
        (root / "arc_easy" / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records), root / "arc_easy" / subset / f"{split}-00000-of-00001.parquet")
    write_jsonl(root / "piqa.jsonl", PIQA)
    write_jsonl(root / "lambada" / "lambada_test_en.jsonl", LAMBADA)
    write_jsonl(root / "lambada" / "lambada_test_de.jsonl", LAMBADA[:1])  # a translation: not read
    return root
