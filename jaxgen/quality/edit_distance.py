"""Sequence-to-sequence scores: error rate (Levenshtein edits per reference token) and exact match.

Sequences are lists of anything hashable: token ids for the token error rate,
phoneme strings for the phoneme error rate (split "HH AH0 L OW1" first; a bare
string counts characters).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein


def _as_list(sequence: Sequence) -> list:
    return sequence.tolist() if isinstance(sequence, np.ndarray) else list(sequence)


def _paired(references: Sequence[Sequence], hypotheses: Sequence[Sequence]) -> list[tuple[list, list]]:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not len(references):
        raise ValueError("no references to score")
    return [(_as_list(r), _as_list(h)) for r, h in zip(references, hypotheses)]


def error_rate(references: Sequence[Sequence], hypotheses: Sequence[Sequence]) -> float:
    """Total edits (insertions, deletions, substitutions) over total reference length."""
    pairs = _paired(references, hypotheses)
    total = sum(len(r) for r, _ in pairs)
    if not total:
        raise ValueError("the references are all empty; an error rate needs at least one reference token")
    return sum(Levenshtein.distance(r, h) for r, h in pairs) / total


def exact_match(references: Sequence[Sequence], hypotheses: Sequence[Sequence]) -> float:
    """The fraction of hypotheses equal to their reference."""
    pairs = _paired(references, hypotheses)
    return sum(r == h for r, h in pairs) / len(pairs)
