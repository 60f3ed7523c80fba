"""LM text generation by full re-computation over a fixed-size buffer.

Simple and exact: each new token re-runs the model on the whole buffer. Good for
the short samples the trainer prints; a KV-cache decoder replaces it for long
generations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.data.tokenizer import BOS_ID, EOS_ID


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "max_new_tokens", "temperature"))
def _generate(graphdef, params, buffer_1T, prompt_len: int, max_new_tokens: int, temperature: float, rng):
    model = nnx.merge(graphdef, params)

    def next_token(t, carry):
        buffer, rng = carry
        logits_V = model(buffer)[0, t - 1]
        rng, key = jax.random.split(rng)
        if temperature == 0:
            token = jnp.argmax(logits_V)
        else:
            token = jax.random.categorical(key, logits_V / temperature)
        return buffer.at[0, t].set(token.astype(buffer.dtype)), rng

    buffer, _ = jax.lax.fori_loop(prompt_len, prompt_len + max_new_tokens, next_token, (buffer_1T, rng))
    return buffer


def generate_text(graphdef, params, tokenizer, prompt: str, max_new_tokens: int, max_len: int,
                  temperature: float = 0.8, seed: int = 0) -> str:
    """Continue `prompt`; stops at EOS or the model's context length."""
    prompt_ids = [BOS_ID, *tokenizer.encode([prompt])[0][-(max_len - 2):]]
    max_new_tokens = min(max_new_tokens, max_len - len(prompt_ids))
    buffer = jnp.zeros((1, len(prompt_ids) + max_new_tokens), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids))
    out = _generate(graphdef, params, buffer, len(prompt_ids), max_new_tokens, temperature, jax.random.PRNGKey(seed))
    ids = [int(t) for t in jax.device_get(out)[0, 1:]]
    if EOS_ID in ids[len(prompt_ids) - 1:]:
        ids = ids[: ids.index(EOS_ID, len(prompt_ids) - 1)]
    # Decoding prompt and continuation together keeps the space between them.
    return tokenizer.decode(ids)
