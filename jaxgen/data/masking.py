"""BERT's masked-LM corruption of packed rows (Devlin et al. 2019, section 3.1).

Of a row's maskable positions (its real tokens: not [CLS], [SEP] or padding; the
caller says which) `mask_rate` are chosen and predicted; of the chosen,
`replace_mask` become [MASK], `replace_random` a token drawn uniformly from the
vocabulary's ordinary tokens (it may happen to be the original, as in BERT), the
rest stay as they are. A packed row is masked as one: its documents share the
row's count.

Counts are exact, not Bernoulli draws: k = max(1, round(mask_rate * n)) of the n
maskable positions (0 when none are), round(k * replace_mask) of them masked and
round(k * replace_random) replaced (at most what the mask leaves). So every row's
loss weight is known from its length alone and a fixed seed gives exact figures
to test. `round` is Python's (half to even, as T5's tf.round).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def ordinary_ids(vocab_size: int, special_ids: Iterable[int]) -> np.ndarray:
    """The ids a random replacement may take: 0..vocab_size-1 without the special ones."""
    ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), np.fromiter(special_ids, np.int32))
    if not len(ids):
        raise ValueError(f"a vocabulary of {vocab_size} tokens has no ordinary token to draw random replacements from")
    return ids


def mask_tokens(tokens_L: np.ndarray, maskable_L: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
                replace_mask: float, replace_random: float, mask_id: int,
                random_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row -> (inputs_L, targets_L, weights_L): the corrupted row, the original row, 1.0 where chosen."""
    inputs_L, targets_L = tokens_L.copy(), tokens_L.copy()
    weights_L = np.zeros(tokens_L.shape, np.float32)
    candidates = np.flatnonzero(maskable_L)
    if not len(candidates):
        return inputs_L, targets_L, weights_L
    k = max(1, round(mask_rate * len(candidates)))
    # A random order of the candidates: its first k are chosen, and their split by order is uniform too.
    chosen = rng.permutation(candidates)[:k]
    n_mask = round(k * replace_mask)
    n_random = min(round(k * replace_random), k - n_mask)
    weights_L[chosen] = 1.0
    inputs_L[chosen[:n_mask]] = mask_id
    inputs_L[chosen[n_mask:n_mask + n_random]] = random_ids[rng.integers(len(random_ids), size=n_random)]
    return inputs_L, targets_L, weights_L


def mask_rows(tokens_BL: np.ndarray, maskable_BL: np.ndarray, rng: np.random.Generator,
              **options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of rows, each masked by `mask_tokens` (same options) in turn from one generator."""
    rows = [mask_tokens(tokens_L, maskable_L, rng, **options) for tokens_L, maskable_L in zip(tokens_BL, maskable_BL)]
    inputs_BL, targets_BL, weights_BL = (np.stack(parts) for parts in zip(*rows))
    return inputs_BL, targets_BL, weights_BL
