"""The trivial baseline of supervised pairs: answer each input with the target of the most similar training input.

Similarity is Levenshtein distance between the input strings (rapidfuzz, in C++);
for grapheme-to-phoneme this is "pronounce it like the nearest spelling". A model
that does not beat it has learned no more than lookup.
"""

from __future__ import annotations

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

CHUNK = 256  # inputs compared at once: CHUNK x (training pairs) distances in memory


def nearest_input_targets(train: list[tuple[str, str]], inputs: list[str]) -> list[str]:
    """For each input, the target of the training pair whose input is closest (the first such on a tie)."""
    if not train:
        return [""] * len(inputs)
    train_inputs = [source for source, _ in train]
    nearest: list[int] = []
    for start in range(0, len(inputs), CHUNK):  # a chunk's distance matrix, not all of them at once
        distances = process.cdist(inputs[start:start + CHUNK], train_inputs, scorer=Levenshtein.distance,
                                  dtype=np.int32, workers=-1)
        nearest += np.argmin(distances, axis=1).tolist()
    return [train[i][1] for i in nearest]
