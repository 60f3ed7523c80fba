"""LM decoding with a KV cache: batched prompts, greedy or sampled, jitted end to end.

Prompts are left-padded to a common length so every row writes its next token
into the same cache slot; padded slots are masked out of attention and each
row's rotary positions start at its first real token. That length is rounded up
to a power of two (`prompt_bucket`), so prompts of different lengths share one
compiled program instead of compiling one each. The decode loop is one
`lax.while_loop` that stops when every row has produced EOS; tokens can be
streamed to the host as they are produced through an ordered io_callback.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from jaxgen.models.layers import each_layer


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature {self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} must be above 0 and at most 1 (1 = off)")


def sample_logits(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token per row: argmax at temperature 0, else a draw from the truncated, tempered softmax."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    # Shifted so the largest logit is 0: dividing by any temperature > 0 then gives values in [-inf, 0], never
    # inf - inf = NaN. A temperature below float32's smallest normal would round to 0, so it is raised to it.
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
    logits_BV = logits_BV / max(sampling.temperature, float(np.finfo(np.float32).tiny))
    if sampling.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sampling.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        cutoff_index_B = jnp.sum(cumulative_BV < sampling.top_p, axis=-1)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, cutoff_index_B[:, None], axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What decoding needs of the tokenizer: where to stop, and which ids are tokens at all."""
    eos_id: int
    size: int  # ids from here up are logits a padded embedding has but no token (never sampled)


def without_padding(logits_BV: jax.Array, vocabulary: Vocabulary) -> jax.Array:
    if logits_BV.shape[-1] <= vocabulary.size:
        return logits_BV
    return jnp.where(jnp.arange(logits_BV.shape[-1]) < vocabulary.size, logits_BV, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "vocabulary", "stream"))
def _decode(graphdef, params, tokens_BP, pad_B, key, max_new_tokens: int, sampling: Sampling, vocabulary: Vocabulary,
            stream: Callable | None):
    model = nnx.merge(graphdef, params)
    eos_id = vocabulary.eos_id
    b, p = tokens_BP.shape
    t = p + max_new_tokens
    slots_T = jnp.arange(t)
    key_valid_BT = slots_T[None, :] >= pad_B[:, None]
    positions_BP = jnp.maximum(slots_T[None, :p] - pad_B[:, None], 0)

    layers = each_layer(model.layers)
    logits_B1V, cache = model.decode(tokens_BP, positions_BP, model.init_cache(b, t), 0, key_valid_BT, layers,
                                     last_only=True)
    key, first_key = jax.random.split(key)
    token_B = sample_logits(without_padding(logits_B1V[:, 0], vocabulary), first_key, sampling)

    def record(i, token_B, out_BN, done_B):
        """Token i of every row (EOS once a row has ended) into the output, streamed if asked."""
        token_B = jnp.where(done_B, eos_id, token_B)
        if stream is not None:
            io_callback(stream, None, i, token_B, done_B, ordered=True)
        return token_B, out_BN.at[:, i].set(token_B), done_B | (token_B == eos_id)

    # The prefill gave token 0; each step feeds the last token back in for the next, so N new
    # tokens take N - 1 steps (no step computes a token past the last one asked for).
    token_B, out_BN, done_B = record(0, token_B, jnp.zeros((b, max_new_tokens), jnp.int32), jnp.zeros((b,), bool))

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, token_B, cache, out_BN, done_B, key = carry
        slot = p + i - 1  # where the last token goes
        logits_B1V, cache = model.decode(token_B[:, None], (slot - pad_B)[:, None], cache, slot, key_valid_BT,
                                         layers)
        key, step_key = jax.random.split(key)
        token_B = sample_logits(without_padding(logits_B1V[:, 0], vocabulary), step_key, sampling)
        token_B, out_BN, done_B = record(i, token_B, out_BN, done_B)
        return i + 1, token_B, cache, out_BN, done_B, key

    start = (jnp.int32(1), token_B, cache, out_BN, done_B, key)
    _, _, _, out_BN, _, _ = jax.lax.while_loop(cond, body, start)
    return out_BN


def text_stream(tokenizer, on_text: Callable[[str], None], prefix: Sequence[int] = ()) -> Callable:
    """An `on_token(i, tokens_B, done_B)` that gives `on_text` row 0's new text as its tokens come (after the
    token ids `prefix`). Decoding the whole text each time keeps pieces that only make sense together (spaces,
    the bytes of one character) right; the text so far is kept, so each token is decoded once."""
    ids = list(prefix)
    text = [tokenizer.decode(ids)]

    def on_token(i, tokens_B, done_B) -> None:
        if not bool(done_B[0]) and int(tokens_B[0]) != tokenizer.eos_id:
            ids.append(int(tokens_B[0]))
            before, text[0] = text[0], tokenizer.decode(ids)
            on_text(text[0][len(before):])

    return on_token


MIN_BUCKET = 16


def prompt_bucket(length: int) -> int:
    """The padded prompt width for prompts up to `length` tokens: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def generate(graphdef, params, prompts: list[list[int]], max_new_tokens: int, vocabulary: Vocabulary,
             sampling: Sampling = Sampling(), seed: int = 0,
             on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (without the prompt), cut at EOS.

    `on_token(i, tokens_B, done_B)` is called on the host for every decoding step.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS token is enough)")
    width = prompt_bucket(max(len(p) for p in prompts))
    tokens_BP = np.zeros((len(prompts), width), np.int32)
    for row, prompt in zip(tokens_BP, prompts):
        row[width - len(prompt):] = prompt
    pad_B = np.asarray([width - len(p) for p in prompts], np.int32)
    out_BN = _decode(graphdef, params, jnp.asarray(tokens_BP), jnp.asarray(pad_B), jax.random.PRNGKey(seed),
                     max_new_tokens, sampling, vocabulary, on_token)
    results = []
    for row in np.asarray(jax.device_get(out_BN)).tolist():
        results.append(row[: row.index(vocabulary.eos_id)] if vocabulary.eos_id in row else row)
    return results
