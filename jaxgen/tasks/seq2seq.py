"""The encoder-decoder task (T5): span corruption of packed text, or supervised (input, target) pairs.

Trained on the decoder's teacher-forced cross-entropy over target tokens. Evaluated
by held-out loss, perplexity and next-token accuracy; on supervised pairs also by
generating each held-out input's target (greedy, KV cache) and scoring exact
matches, the token error rate and the error rate over whitespace-separated units
(phonemes, for grapheme-to-phoneme), beside a baseline that answers each input
with the target of the most similar training input. `jaxgen sample --prompt`
generates a target for each prompt.
"""

from __future__ import annotations

import functools
import logging
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.config import Config
from jaxgen.data.bidirectional import (
    TextRows,
    build_text_rows,
    decoder_start_id,
    held_out_pairs,
    ids_of,
    is_pairs,
    special_pieces,
    training_pairs,
)
from jaxgen.data.tokenizer import Tokenizer, load_tokenizer
from jaxgen.errors import ConfigError, UsageError
from jaxgen.tasks.base import Weights
from jaxgen.tasks.decode import Sampling, text_stream
from jaxgen.tasks.layout import MAIN_GROUP
from jaxgen.tasks.text_inputs import OneTextModel, global_batches, spaces_taken

log = logging.getLogger("jaxgen")

# Held-out pairs whose targets `jaxgen eval` generates, and training pairs the nearest-input baseline searches.
EVAL_PAIRS = 2000
BASELINE_TRAIN_PAIRS = 500_000
GENERATE_BATCH = 256


class Seq2SeqTask(OneTextModel):
    unit = "tokens"
    loss_name = "target cross-entropy (nats / target token)"
    sample_every = 0
    sample_options: dict[str, Any] = {"prompt": None, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                      "max_new_tokens": None, "seed": 0}

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._held_out: tuple[list[tuple[str, str]], list[str]] | None = None  # pairs, the baseline's answers

    @staticmethod
    def logits(model, batch):
        return model(batch["inputs"], batch["input_segments"], batch["targets_in"], batch["target_segments"],
                     batch["input_positions"], batch["target_positions"])

    def units_per_batch(self) -> int:
        """Tokens through the model per batch: encoder rows and decoder rows."""
        return self.cfg.data.batch_size * (self.cfg.data.seq_len + self.cfg.data.target_len)

    def flops_per_unit(self) -> float:
        from jaxgen.models.t5 import flops_per_token

        return flops_per_token(self.cfg.model, self.cfg.data.seq_len, self.cfg.data.target_len)

    def make_data(self, run_dir: pathlib.Path) -> TextRows:
        return build_text_rows(self.cfg, run_dir)

    # ------------------------------------------------------------------ samples, evaluation, generation
    def sample(self, weights: Weights, data: TextRows, run_dir: pathlib.Path, step: int | None) -> dict:
        return {}

    def evaluate(self, weights: Weights, data: TextRows, loss_sum: float, weight_sum: float) -> dict:
        graphdef, params = weights.graphdefs[MAIN_GROUP], weights.params[MAIN_GROUP]
        correct = sum(float(_correct(graphdef, params, batch)) for batch in global_batches(params, data.eval))
        n = max(weight_sum, 1.0)
        report = {"eval_loss": loss_sum / n, "perplexity": math.exp(loss_sum / n), "token_accuracy": correct / n,
                  "eval_target_tokens": int(weight_sum)}
        if is_pairs(self.cfg):
            report |= self.pair_report(weights, data.tokenizer)
        return report

    def pair_report(self, weights: Weights, tokenizer: Tokenizer) -> dict:
        """Generated targets of held-out pairs against the references, beside the nearest-input baseline."""
        from jaxgen.quality.edit_distance import error_rate, exact_match
        from jaxgen.quality.nearest_input import nearest_input_targets

        if self._held_out is None:  # the same for every checkpoint `jaxgen eval --all` scores
            pairs = held_out_pairs(self.cfg.data, EVAL_PAIRS)
            baseline = nearest_input_targets(training_pairs(self.cfg.data, BASELINE_TRAIN_PAIRS),
                                             [source for source, _ in pairs])
            self._held_out = pairs, baseline
        pairs, baseline = self._held_out
        references = [target for _, target in pairs]
        generated = self.targets_for([source for source, _ in pairs], weights, tokenizer, self.cfg.data.target_len,
                                     Sampling(temperature=0.0), seed=0)

        def scores(hypotheses: list[str], prefix: str) -> dict:
            return {f"{prefix}exact_match": exact_match(references, hypotheses),
                    f"{prefix}unit_error_rate": error_rate([r.split() for r in references],
                                                           [h.split() for h in hypotheses]),
                    f"{prefix}token_error_rate": error_rate(ids_of(references, tokenizer),
                                                            ids_of(hypotheses, tokenizer))}

        return {**scores(generated, ""), **scores(baseline, "nearest_input_"), "eval_pairs": len(pairs),
                "examples": [{"input": s, "target": t, "generated": g}
                             for (s, t), g in list(zip(pairs, generated))[:5]]}

    def targets_for(self, inputs: list[str], weights: Weights, tokenizer: Tokenizer, max_new_tokens: int,
                    sampling: Sampling, seed: int, name_cut: bool = False,
                    on_text: Callable[[str], None] | None = None) -> list[str]:
        """The decoder's text for each input, generated in batches; an input is cut to data.seq_len as in
        training (`name_cut`: with a warning naming it). `on_text` receives the first input's text piece by
        piece as it is decoded."""
        from jaxgen.tasks.seq2seq_decode import generate_targets

        limit = self.cfg.data.seq_len
        sentinels = {tokenizer.piece_id(piece) for piece in special_pieces(self.cfg)}
        whole = [spaces_taken(ids, sentinels, tokenizer) for ids in ids_of(inputs, tokenizer)]
        for i, ids in enumerate(whole):
            if name_cut and len(ids) >= limit:
                log.warning("--prompt %d is %d tokens with EOS; the encoder reads its first %d (data.seq_len=%d)",
                            i + 1, len(ids) + 1, limit - 1, limit)
        encoded = [ids[:limit - 1] + [tokenizer.eos_id] for ids in whole]
        start = decoder_start_id(self.cfg, tokenizer)
        out: list[str] = []
        for i in range(0, len(encoded), GENERATE_BATCH):
            ids = generate_targets(weights.graphdefs[MAIN_GROUP], weights.params[MAIN_GROUP],
                                   encoded[i:i + GENERATE_BATCH], max_new_tokens, start, tokenizer.eos_id, sampling,
                                   seed + i, vocab_size=tokenizer.vocab_size,
                                   on_token=text_stream(tokenizer, on_text) if on_text and i == 0 else None)
            out += [tokenizer.decode(target) for target in ids]
        return out

    def check_sample_options(self, options: dict[str, Any]) -> None:
        super().check_sample_options(options)
        if not options["prompt"]:
            raise ConfigError("an encoder-decoder turns inputs into targets: pass --prompt INPUT (repeat for several)")
        wanted = options.get("max_new_tokens")
        if wanted is not None:
            check_decoding_fits(self.cfg, wanted, min(len(options["prompt"]), GENERATE_BATCH))
            if wanted > self.cfg.data.target_len:  # relative positions let it go on; what it says there is untrained
                log.warning("--max-new-tokens %d is more than the %d target tokens the model was trained to write "
                            "(data.target_len); what it writes beyond them it never learned, and greedy decoding "
                            "without an EOS runs to the end", wanted, self.cfg.data.target_len)

    def generate(self, weights: Weights, run_dir: pathlib.Path, step: int, options: dict[str, Any],
                 on_text: Callable[[str], None] | None) -> list[dict]:
        self.check_sample_options(options)
        prompts = options["prompt"]
        tokenizer = load_tokenizer(run_dir)
        sampling = Sampling(temperature=options["temperature"], top_k=options["top_k"], top_p=options["top_p"])
        targets = self.targets_for(prompts, weights, tokenizer, options["max_new_tokens"] or self.cfg.data.target_len,
                                   sampling, options["seed"], name_cut=True,
                                   on_text=on_text if len(prompts) == 1 else None)
        return [{"prompt": prompt, "text": target} for prompt, target in zip(prompts, targets)]


@functools.partial(jax.jit, static_argnums=0)
def _correct(graphdef, params, batch) -> jax.Array:
    logits = Seq2SeqTask.logits(nnx.merge(graphdef, params), batch)
    hits = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(hits * batch["weights"])


def check_decoding_fits(cfg: Config, new_tokens: int, rows: int) -> None:
    """Refuse, before anything is read, a target length whose decoder cache (keys and values of every decoder
    layer for every slot; relative positions set no length of their own) cannot fit this host or device."""
    from jaxgen.device_memory import capacity, human_bytes

    model = cfg.model
    cache = model.decoder_layers * 2 * model.n_heads * model.resolved_head_dim * jnp.dtype(model.compute_dtype).itemsize
    per_token = rows * (2 * cache + 4)  # the decoding loop holds the cache it updates twice; and the int32 output
    limit, _, where = capacity()
    if new_tokens * per_token > limit:
        inputs = f"{rows} input{'s' * (rows > 1)}"
        raise UsageError(f"--max-new-tokens {new_tokens} needs about {human_bytes(new_tokens * per_token)} for the "
                         f"decoder's cache of {inputs} at once, more than the {human_bytes(limit)} {where}; give at "
                         f"most {limit // per_token}")
