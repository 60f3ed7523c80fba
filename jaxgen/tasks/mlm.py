"""The masked-LM task: a bidirectional encoder predicting masked tokens of packed documents (BERT).

Its inputs are text through a sentencepiece tokenizer holding [MASK] (recorded in
every checkpoint, like the LM's); it is evaluated by masked-token loss, perplexity
and accuracy beside a unigram baseline (the training tokens' frequencies, which
know nothing of context), and `jaxgen sample --prompt` fills the [MASK]s of a text.
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.config import Config
from jaxgen.data.bidirectional import TextRows, build_text_rows, unigram_counts
from jaxgen.data.tokenizer import MASK_PIECE, load_tokenizer
from jaxgen.errors import ConfigError, DataError
from jaxgen.tasks.base import Weights
from jaxgen.tasks.layout import MAIN_GROUP
from jaxgen.tasks.text_inputs import OneTextModel, global_batches, spaces_taken, summed_over_processes

# The unigram baseline counts this many training tokens.
UNIGRAM_TOKENS = 2_000_000
# Candidates shown for each [MASK] by `jaxgen sample`.
TOP_CANDIDATES = 5


class MaskedLMTask(OneTextModel):
    unit = "tokens"
    loss_name = "masked-token cross-entropy (nats / masked token)"
    sample_every = 0
    sample_options: dict[str, Any] = {"prompt": None}

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._unigram: tuple[float, float] | None = None

    @staticmethod
    def logits(model, batch):
        return model(batch["inputs"], batch["segment_ids"], batch["positions"])

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.seq_len

    def flops_per_unit(self) -> float:
        from jaxgen.models.encoder import flops_per_token

        return flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def make_data(self, run_dir: pathlib.Path) -> TextRows:
        return build_text_rows(self.cfg, run_dir)

    # ------------------------------------------------------------------ samples, evaluation, generation
    def sample(self, weights: Weights, data: TextRows, run_dir: pathlib.Path, step: int | None) -> dict:
        return {}

    def evaluate(self, weights: Weights, data: TextRows, loss_sum: float, weight_sum: float) -> dict:
        """Masked-token loss, perplexity and accuracy; the unigram baseline's loss and accuracy on the same tokens."""
        graphdef, params = weights.graphdefs[MAIN_GROUP], weights.params[MAIN_GROUP]
        correct = sum(float(_correct(graphdef, params, batch)) for batch in global_batches(params, data.eval))
        base_loss, base_correct = self.unigram_sums(data)
        n = max(weight_sum, 1.0)
        loss = loss_sum / n
        return {"eval_loss": loss, "perplexity": math.exp(loss), "masked_accuracy": correct / n,
                "unigram_loss": base_loss / n, "unigram_perplexity": math.exp(base_loss / n),
                "unigram_accuracy": base_correct / n, "eval_masked_tokens": int(weight_sum)}

    def unigram_sums(self, data: TextRows) -> tuple[float, float]:
        """The unigram baseline's (loss sum, correct sum) on the held-out masked tokens; worked out once, as
        `jaxgen eval --all` scores every checkpoint on the same held-out batches."""
        if self._unigram is None:
            counts = unigram_counts(self.cfg.data, data.tokenizer, UNIGRAM_TOKENS).astype(np.float64)
            # Add-one smoothing: a token unseen in training is not infinitely unlikely.
            log_p = np.log((counts + 1.0) / (counts.sum() + len(counts)))
            most_frequent = int(np.argmax(counts))
            loss = sum(-float(np.sum(log_p[b["targets"]] * b["weights"])) for b in data.eval)
            correct = sum(float(np.sum((b["targets"] == most_frequent) * b["weights"])) for b in data.eval)
            self._unigram = tuple(summed_over_processes([loss, correct]))
        return self._unigram

    def check_sample_options(self, options: dict[str, Any]) -> None:
        prompts = options["prompt"]
        if not prompts or not all(MASK_PIECE in p for p in prompts):
            raise ConfigError(f"a masked LM fills in {MASK_PIECE}: pass --prompt with at least one {MASK_PIECE} in "
                              f"each (e.g. --prompt 'In the beginning God created the {MASK_PIECE}')")

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        """Fill every [MASK] of each `--prompt` with its most likely token; the top candidates beside it."""
        self.check_sample_options(options)
        tokenizer = load_tokenizer(run_dir)
        prompts = options["prompt"]
        mask_id = tokenizer.piece_id(MASK_PIECE)
        if mask_id is None:  # a run imported before import refused such a tokenizer: "[MASK]" would be letters
            raise DataError(f"the tokenizer of {run_dir} has no {MASK_PIECE} token, so this model has nothing to "
                            "fill in; import the checkpoint again with its own tokenizer")
        length = self.cfg.data.seq_len
        rows = [[tokenizer.bos_id, *spaces_taken(tokenizer.encode_document(p).tolist(), {mask_id}, tokenizer),
                 tokenizer.eos_id] for p in prompts]
        if max(map(len, rows)) > length:
            raise ConfigError(f"the longest prompt is {max(map(len, rows))} tokens with [CLS] and [SEP], more than "
                              f"data.seq_len={length}; shorten it")
        tokens = np.zeros((len(rows), length), np.int32)
        segments = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            tokens[i, :len(row)], segments[i, :len(row)] = row, 1
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        logits = np.asarray(_logits(weights.graphdefs[MAIN_GROUP], weights.params[MAIN_GROUP], tokens, segments,
                                    positions))
        results = []
        for i, (prompt, row) in enumerate(zip(prompts, rows)):
            filled, candidates = list(row), []
            for j in [j for j, t in enumerate(row) if t == mask_id]:
                ranked = np.argsort(-logits[i, j])[:TOP_CANDIDATES]
                probs = np.exp(logits[i, j] - logits[i, j].max())
                probs /= probs.sum()
                filled[j] = int(ranked[0])
                candidates.append([{"token": tokenizer.decode([int(t)]), "p": round(float(probs[t]), 4)}
                                   for t in ranked])
            text = tokenizer.decode(filled[1:-1])  # not streamed (`on_text`): the record holds the candidates too
            results.append({"prompt": prompt, "text": text, "candidates": candidates})
        return results


@functools.partial(jax.jit, static_argnums=0)
def _correct(graphdef, params, batch) -> jax.Array:
    from flax import nnx

    logits = MaskedLMTask.logits(nnx.merge(graphdef, params), batch)
    hits = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(hits * batch["weights"])


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, segments, positions) -> jax.Array:
    from flax import nnx

    return nnx.merge(graphdef, params)(tokens, segments, positions)
