"""Encoder-decoder generation: encode each input once, then decode its target with a KV cache, jitted end to end.

Inputs are right-padded to a bucket length (a power of two, at least MIN_BUCKET), so
inputs of different lengths share one compiled program; padding has segment id 0 and
is masked out of the encoder and the cross-attention. The decoder's cross-attention
keys and values are computed once; its self-attention cache grows by one slot a
step in one `lax.while_loop`, which stops when every row has produced EOS. Sampling
is the LM decoder's (`decode.sample_logits`): greedy at temperature 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from jaxgen.models.layers import each_layer
from jaxgen.tasks.decode import Sampling, Vocabulary, sample_logits, without_padding

MIN_BUCKET = 16


def bucket_length(n: int) -> int:
    """The padded length of an n-token input: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "vocabulary", "stream"))
def _generate(graphdef, params, tokens_BL, segments_BL, start_id, key, max_new_tokens: int, sampling: Sampling,
              vocabulary: Vocabulary, stream: Callable | None = None):
    model = nnx.merge(graphdef, params)
    eos_id = vocabulary.eos_id
    b = tokens_BL.shape[0]
    layers = each_layer(model.decoder.layers)  # sliced once, outside the token loop
    cross = model.cross_kv(model.encode(tokens_BL, segments_BL), layers)

    def cond(carry):
        i, _, _, _, done_B, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
        i, token_B, cache, out_BN, done_B, key = carry
        logits_B1V, cache = model.decode_step(token_B[:, None], i, cache, cross, segments_BL, layers)
        key, step_key = jax.random.split(key)
        token_B = sample_logits(without_padding(logits_B1V[:, 0], vocabulary), step_key, sampling)
        token_B = jnp.where(done_B, eos_id, token_B)
        if stream is not None:
            io_callback(stream, None, i, token_B, done_B, ordered=True)
        out_BN = out_BN.at[:, i].set(token_B)
        return i + 1, token_B, cache, out_BN, done_B | (token_B == eos_id), key

    start = (jnp.int32(0), jnp.full((b,), start_id, jnp.int32), model.init_cache(b, max_new_tokens),
             jnp.full((b, max_new_tokens), eos_id, jnp.int32), jnp.zeros((b,), bool), key)
    return jax.lax.while_loop(cond, body, start)[3]


def generate_targets(graphdef, params, inputs: list[list[int]], max_new_tokens: int, start_id: int, eos_id: int,
                     sampling: Sampling, seed: int, vocab_size: int | None = None,
                     on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> list[list[int]]:
    """Each input's generated target ids, without the start token, cut before EOS.

    `vocab_size` (the tokenizer's): ids from it up are never generated, should the model's vocabulary be larger.
    `on_token(i, tokens_B, done_B)` is called on the host for every decoding step.
    """
    if not inputs:
        return []
    width = bucket_length(max(len(ids) for ids in inputs))
    tokens_BL = np.zeros((len(inputs), width), np.int32)
    for row, ids in zip(tokens_BL, inputs):
        row[:len(ids)] = ids
    segments_BL = (np.arange(width)[None, :] < np.asarray([len(ids) for ids in inputs])[:, None]).astype(np.int32)
    vocabulary = Vocabulary(eos_id=eos_id, size=vocab_size or params["embed"].shape[0])
    out_BN = _generate(graphdef, params, jnp.asarray(tokens_BL), jnp.asarray(segments_BL), jnp.int32(start_id),
                       jax.random.PRNGKey(seed), max_new_tokens, sampling, vocabulary, on_token)
    rows = np.asarray(jax.device_get(out_BN)).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]
