"""The language-model task: a decoder trained on next-token cross-entropy over packed text.

Its inputs are text through a sentencepiece tokenizer (recorded in every
checkpoint, so a run never resumes on another tokenizer); it is evaluated by
held-out loss, perplexity and bits per byte, and generates with a KV cache.
"""

from __future__ import annotations

import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxgen.data.lm import LMData, build_lm_data
from jaxgen.data.tokenizer import Tokenizer, load_tokenizer
from jaxgen.errors import ConfigError, UsageError
from jaxgen.models.transformer import flops_per_token
from jaxgen.tasks.base import Weights
from jaxgen.tasks.decode import Sampling, Vocabulary, generate, text_stream
from jaxgen.tasks.layout import MAIN_GROUP
from jaxgen.tasks.text_inputs import OneTextModel

log = logging.getLogger("jaxgen")

# Tokens `jaxgen sample` generates after each prompt when --max-new-tokens is not given.
DEFAULT_NEW_TOKENS = 64


class LanguageModelTask(OneTextModel):
    unit = "tokens"
    loss_name = "cross-entropy (nats / token)"
    sample_every = 0
    # max_new_tokens None: DEFAULT_NEW_TOKENS, or what the context leaves after the prompt, without a word.
    sample_options: dict[str, Any] = {"prompt": None, "temperature": 0.8, "top_k": 0, "top_p": 1.0,
                                      "max_new_tokens": None, "seed": 0}

    def logits(self, model, batch):
        if self.cfg.model.document_mask:
            return model(batch["inputs"], batch["positions"], batch["segment_ids"])
        return model(batch["inputs"])

    def units_per_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.data.seq_len

    def flops_per_unit(self) -> float:
        return flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def make_data(self, run_dir: pathlib.Path) -> LMData:
        data = build_lm_data(self.cfg, run_dir)
        train = self.cfg.train
        if train.sample_tokens:  # the end-of-run sample's prompt, refused before any step rather than after all
            ids = [data.tokenizer.bos_id, *data.tokenizer.encode([train.sample_prompt])[0]]
            if len(ids) >= self.cfg.model.max_seq_len:
                raise ConfigError(f"train.sample_prompt is {len(ids)} tokens with BOS, which fills the model's context "
                                  f"(model.max_seq_len={self.cfg.model.max_seq_len}); shorten it, or set "
                                  "train.sample_tokens=0 for no sample")
            room = self.room_after_prompts([ids])
            if train.sample_tokens > room:
                log.warning("train.sample_tokens=%d: train.sample_prompt leaves room for %d new tokens in the "
                            "model's context (model.max_seq_len=%d); the end-of-run sample has %d",
                            train.sample_tokens, room, self.cfg.model.max_seq_len, room)
        return data

    # ------------------------------------------------------------------ samples, evaluation, generation
    def sample(self, weights: Weights, data: LMData, run_dir: pathlib.Path, step: int | None) -> dict:
        train = self.cfg.train
        if step is not None or not train.sample_tokens:
            return {}
        [(_, text)] = self.continue_texts(weights, data.tokenizer, [train.sample_prompt], train.sample_tokens,
                                          Sampling(temperature=0.8), train.seed)
        return {"sample": text}

    def evaluate(self, weights: Weights, data: LMData, loss_sum: float, weight_sum: float) -> dict:
        """Loss (nats/token), perplexity and bits per byte over the fixed held-out batches."""
        byte_lengths = data.tokenizer.token_byte_lengths()
        # Every process sees only its rows; the byte count must cover all of them.
        n_bytes = sum(int(np.sum(byte_lengths[batch["targets"]] * batch["weights"])) for batch in data.eval)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            n_bytes = int(np.sum(multihost_utils.process_allgather(np.asarray([n_bytes]))))
        loss = loss_sum / max(weight_sum, 1.0)
        return {"eval_loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": loss_sum / math.log(2) / max(n_bytes, 1), "eval_tokens": int(weight_sum)}

    def check_sample_options(self, options: dict[str, Any]) -> None:
        super().check_sample_options(options)
        wanted, max_len = options.get("max_new_tokens"), self.cfg.model.max_seq_len
        if wanted is not None and wanted > max_len - 1:
            raise UsageError(f"--max-new-tokens {wanted} does not fit this run's context (model.max_seq_len="
                             f"{max_len}, one of them the BOS token); give 1 to {max_len - 1}")

    def check_sample_inputs(self, options: dict[str, Any], run_dir: pathlib.Path) -> None:
        """A prompt must leave room for a token in the model's context."""
        tokenizer = load_tokenizer(run_dir)
        self.room_after_prompts([[tokenizer.bos_id, *tokenizer.encode([p])[0]] for p in options["prompt"] or [""]])

    def room_after_prompts(self, ids: list[list[int]]) -> int:
        """How many tokens the model's context leaves after the longest of the prompts `ids` (BOS included)."""
        max_len = self.cfg.model.max_seq_len
        room = max_len - max(len(i) for i in ids)
        if room < 1:
            raise ConfigError(f"the longest prompt ({max(len(i) for i in ids)} tokens with BOS) fills the model's "
                              f"context (model.max_seq_len={max_len}); shorten it")
        return room

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        self.check_sample_options(options)
        tokenizer = load_tokenizer(run_dir)
        sampling = Sampling(temperature=options["temperature"], top_k=options["top_k"], top_p=options["top_p"])
        prompts = options["prompt"] or [""]
        results = self.continue_texts(weights, tokenizer, prompts, options["max_new_tokens"], sampling,
                                      options["seed"], on_text if len(prompts) == 1 else None, name_cut=True)
        return [{"prompt": prompt, "text": text} for prompt, text in results]

    def continue_texts(self, weights: Weights, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int | None,
                       sampling: Sampling, seed: int, on_text: Callable[[str], None] | None = None,
                       name_cut: bool = False) -> list[tuple[str, str]]:
        """(prompt, prompt + continuation) for each prompt; `on_text` receives one prompt's text piece by piece.

        At most the context the longest prompt leaves is generated (`name_cut`: with a warning when
        `max_new_tokens` asks for more); None asks for DEFAULT_NEW_TOKENS or what is left, quietly."""
        max_len = self.cfg.model.max_seq_len
        ids = [[tokenizer.bos_id, *tokenizer.encode([p])[0]] for p in prompts]
        room = self.room_after_prompts(ids)
        if name_cut and max_new_tokens is not None and max_new_tokens > room:
            log.warning("the longest prompt leaves room for %d new tokens in the model's context "
                        "(model.max_seq_len=%d), not the %d asked for", room, max_len, max_new_tokens)
        new_tokens = min(DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens, room)
        if on_text is not None:
            on_text(prompts[0])
        outputs = generate(weights.graphdefs[MAIN_GROUP], weights.params[MAIN_GROUP], ids, new_tokens,
                           Vocabulary(tokenizer.eos_id, tokenizer.vocab_size), sampling, seed,
                           on_token=text_stream(tokenizer, on_text, ids[0][1:]) if on_text else None)
        # Decoding prompt and continuation together keeps the space between them.
        return [(tokenizer.decode(p[1:]), tokenizer.decode(p[1:] + new)) for p, new in zip(ids, outputs)]
