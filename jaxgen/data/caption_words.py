"""Captions as token ids for the text encoder trained with a DiT: lower-cased words, hashed.

Each word (a run of letters and digits) maps to 1 + crc32(word) mod (vocab - 1);
id 0 is padding. There is no vocabulary to fit or keep, any prompt has ids,
and the ids of a word never change. Two words may share an id (at the default
4,096 buckets, a caption vocabulary of 50 words has a collision with odds of
about 1 in 4); `colliding_words` says which, and the run logs them.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

import numpy as np

_WORD = re.compile(r"[0-9a-z]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def left_out(text: str) -> list[str]:
    """The letters and digits of `text` that no word of it keeps (é, 日): the encoder never sees them."""
    return sorted({c for c in text.lower() if c.isalnum() and not _WORD.fullmatch(c)})


def word_id(word: str, vocab: int) -> int:
    return 1 + zlib.crc32(word.encode()) % (vocab - 1)


def caption_ids(text: str, vocab: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (max_length,) int32, mask (max_length,) bool): the first max_length words' ids, then padding."""
    ids = [word_id(w, vocab) for w in words(text)[:max_length]]
    ids_L = np.zeros(max_length, np.int32)
    ids_L[:len(ids)] = ids
    return ids_L, ids_L > 0


def colliding_words(texts: Iterable[str], vocab: int) -> list[tuple[str, ...]]:
    """Groups of distinct words of `texts` that share an id."""
    by_id: dict[int, set[str]] = {}
    for text in texts:
        for w in words(text):
            by_id.setdefault(word_id(w, vocab), set()).add(w)
    return [tuple(sorted(group)) for group in by_id.values() if len(group) > 1]
