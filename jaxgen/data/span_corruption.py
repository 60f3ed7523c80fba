"""T5's span corruption (Raffel et al. 2020, section 3.1.4), written from the paper and T5's
`random_spans_noise_mask` semantics.

A piece of `length` tokens gets num_noise = round(length * noise_density) noise tokens,
clipped to [1, length - 1], in num_spans = max(1, round(num_noise / mean_length)) spans.
The noise and the non-noise tokens are each cut into num_spans positive parts, uniformly
over all such cuts, and the spans alternate starting with non-noise, so a piece always
ends in noise (as T5's does). Two deliberate differences from T5's code, both only
where T5's would misbehave: a piece shorter than 2 tokens gets no noise (T5 pads it
to 2 and cuts the mask back, which gives the same), and num_spans is also clipped to
the non-noise count so every part stays positive at high densities.

`round` is Python's (half to even, as T5's tf.round).

Layout (T5 v1.1 and transformers' run_t5_mlm_flax): the input is the piece with
each noise span replaced by the next sentinel, then EOS; the target is each
sentinel followed by the span it hides, then EOS. There is no closing sentinel
before the target's EOS (the paper's figure shows one; T5 v1.1 does not add it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxgen.errors import ConfigError


def _noise_sizes(length: int, noise_density: float, mean_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a piece of `length` tokens."""
    if length < 2:
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = min(max(1, round(num_noise / mean_length)), length - num_noise)
    return num_noise, num_spans


def span_count(length: int, noise_density: float, mean_length: float) -> int:
    """The sentinels a piece of `length` tokens needs. Never decreases with length, so this
    at the longest piece is how many sentinels the tokenizer must have."""
    return _noise_sizes(length, noise_density, mean_length)[1]


def _random_partition(n_items: int, n_parts: int, rng: np.random.Generator) -> np.ndarray:
    """`n_parts` positive lengths summing to `n_items`, uniform over all such compositions."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def noise_mask(length: int, noise_density: float, mean_length: float, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of `length`: True at the noise tokens."""
    num_noise, num_spans = _noise_sizes(length, noise_density, mean_length)
    if not num_spans:
        return np.zeros(length, bool)
    nonnoise = _random_partition(length - num_noise, num_spans, rng)
    noise = _random_partition(num_noise, num_spans, rng)
    lengths = np.stack([nonnoise, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), lengths)


def _kept_before(keep: np.ndarray) -> np.ndarray:
    """At each position, how many kept positions come before it."""
    return np.cumsum(keep) - keep


def corrupt(tokens: np.ndarray, mask: np.ndarray, sentinel_ids: Sequence[int],
            eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of `tokens` with noise `mask` (any mask, not only `noise_mask`'s)."""
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    n_spans = int(starts.sum())
    if n_spans > len(sentinel_ids):
        raise ValueError(f"span corruption needs {n_spans} sentinels for this piece; only {len(sentinel_ids)} given")
    sentinels = np.asarray(sentinel_ids[:n_spans], tokens.dtype)
    eos = np.array([eos_id], tokens.dtype)
    # Each side keeps its own tokens and gets a sentinel where each noise span starts.
    inputs = np.insert(tokens[~mask], _kept_before(~mask)[starts], sentinels)
    targets = np.insert(tokens[mask], _kept_before(mask)[starts], sentinels)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def corrupted_lengths(length: int, noise_density: float, mean_length: float) -> tuple[int, int]:
    """(input, target) lengths, EOS included, that a piece of `length` tokens corrupts to."""
    num_noise, num_spans = _noise_sizes(length, noise_density, mean_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length(input_len: int, target_len: int, noise_density: float, mean_length: float) -> int:
    """The longest piece whose corrupted input fits `input_len` tokens and target `target_len`.

    Both corrupted lengths never decrease with the piece's, so the answer is where they stop fitting.
    """
    def fits(length: int) -> bool:
        inputs, targets = corrupted_lengths(length, noise_density, mean_length)
        return inputs <= input_len and targets <= target_len

    if not fits(2):
        need = corrupted_lengths(2, noise_density, mean_length)
        raise ConfigError(f"span corruption: an input of {input_len} and a target of {target_len} tokens cannot hold "
                          f"even a 2-token piece (it needs {need[0]} and {need[1]}, EOS included)")
    length = 2
    while fits(length + 1):
        length += 1
    return length
