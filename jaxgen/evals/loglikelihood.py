"""Log-likelihoods of continuations after contexts, scored in batches on the sharded model.

Legend: B rows of a batch, L tokens of a row, V vocabulary.

A request (context, continuation) is tokenized as lm-evaluation-harness does
(trailing spaces of the context move to the continuation; the continuation's
tokens are what encoding both adds to the context's), behind the token that
starts every document. A sequence longer than the model's window loses tokens
from the left (counted). Rows are right-padded to a few bucketed lengths, so
a whole task compiles a handful of programs; the model is causal, so padding
after a row never changes its scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.data.tokenizer import Tokenizer
from jaxgen.progress import progress_bar
from jaxgen.sharding import BATCH_AXES, Rules, data_parallel_size, replicated, with_rules

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class TokenRequest:
    context: list[int]  # starts with the document-start token
    continuation: list[int]


@dataclasses.dataclass(frozen=True)
class Score:
    loglikelihood: float  # summed over the continuation's tokens
    greedy: bool  # every continuation token is the model's argmax
    truncated: bool  # tokens were dropped from the left to fit the window


def encode_requests(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[TokenRequest]:
    """Token requests for (context, continuation) text pairs, by the harness's rules."""
    moved = []
    for context, continuation in pairs:
        kept = context.rstrip()
        moved.append((kept, context[len(kept):] + continuation))
    with_context = [i for i, (context, _) in enumerate(moved) if context]
    alone = [i for i, (context, _) in enumerate(moved) if not context]
    contexts = [moved[i][0] for i in with_context]
    wholes = [moved[i][0] + moved[i][1] for i in with_context]
    encoded = tokenizer.encode(contexts + wholes + [moved[i][1] for i in alone])
    n = len(with_context)
    requests: dict[int, TokenRequest] = {}
    for j, i in enumerate(with_context):
        context_ids, whole = encoded[j], encoded[n + j]
        requests[i] = TokenRequest([tokenizer.bos_id, *context_ids], whole[len(context_ids):])
    for j, i in enumerate(alone):  # nothing to split at: the document-start token alone is the context
        requests[i] = TokenRequest([tokenizer.bos_id], encoded[2 * n + j])
    return [requests[i] for i in range(len(moved))]


def continuation_scores(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array):
    """(summed log-likelihood of the masked targets, whether each masked target is the argmax), per row."""
    logprobs_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    target_BL = jnp.take_along_axis(logprobs_BLV, targets_BL[..., None], axis=-1)[..., 0]
    hit_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
    return jnp.sum(jnp.where(mask_BL, target_BL, 0.0), axis=-1), jnp.all(hit_BL | ~mask_BL, axis=-1)


def bucket_length(n: int, window: int) -> int:
    """The padded length of a row of `n` tokens: the next power of two (at least MIN_BUCKET), at most the window."""
    return min(window, max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()))


def window_row(request: TokenRequest, window: int) -> tuple[list[int], list[int], int, bool]:
    """(inputs, targets, continuation tokens scored, truncated) of one request for a model of `window` tokens."""
    sequence = request.context + request.continuation
    kept = sequence[-(window + 1):]
    return kept[:-1], kept[1:], min(len(request.continuation), len(kept) - 1), len(sequence) > len(kept)


class Scorer:
    """Scores token requests with a model's parameters, sharded as `param_shardings` say."""

    def __init__(self, graphdef: nnx.GraphDef, param_shardings, mesh: Mesh, rules: Rules, window: int,
                 batch_size: int = 32):
        self.dp = data_parallel_size(mesh)
        self.window, self.mesh = window, mesh
        self.batch_size = -(-batch_size // self.dp) * self.dp  # every data-parallel device gets rows
        self.rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))

        def scores(params, inputs_BL, targets_BL, mask_BL):
            return continuation_scores(nnx.merge(graphdef, params)(inputs_BL), targets_BL, mask_BL)

        self._scores = jax.jit(with_rules(scores, mesh, rules),
                               in_shardings=(param_shardings, self.rows, self.rows, self.rows),
                               out_shardings=replicated(mesh))

    def score(self, params, requests: Sequence[TokenRequest], progress: str | None = None) -> list[Score]:
        """A Score per request, in order; `progress` names a progress bar (None: no bar)."""
        rows = [window_row(r, self.window) for r in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        # No larger than the requests: a --batch-size of millions allocated, and compiled for, millions of rows.
        size = min(self.batch_size, -(-len(rows) // self.dp) * self.dp)
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        results: list[Score | None] = [None] * len(rows)
        show = progress is not None and jax.process_index() == 0
        pending = None  # the batch on the device: fetched after the next is dispatched, so the host never idles it
        for batch in progress_bar(batches, desc=progress, unit="batch", disable=not show, dynamic_ncols=True):
            length = bucket_length(len(rows[batch[0]][0]), self.window)
            inputs, targets, mask = (np.zeros((size, length), dtype) for dtype in (np.int32, np.int32, bool))
            for row, i in enumerate(batch):
                tokens, predicted, scored, _ = rows[i]
                inputs[row, :len(tokens)], targets[row, :len(predicted)] = tokens, predicted
                mask[row, len(predicted) - scored:len(predicted)] = True
            dispatched = batch, self._scores(params, *map(self._global, (inputs, targets, mask)))
            if pending is not None:
                self._collect(*pending, rows, results)
            pending = dispatched
        if pending is not None:
            self._collect(*pending, rows, results)
        return results

    @staticmethod
    def _collect(batch: list[int], scores, rows: list, results: list) -> None:
        loglikelihood_B, greedy_B = jax.device_get(scores)
        for row, i in enumerate(batch):
            results[i] = Score(float(loglikelihood_B[row]), bool(greedy_B[row]), rows[i][3])

    def _global(self, rows: np.ndarray) -> jax.Array:
        # Every process holds the whole batch; each device takes its rows.
        return jax.make_array_from_callback(rows.shape, self.rows, lambda index: rows[index])

