"""What a DiT is conditioned on: class labels, or captions (text-to-image).

Each kind turns batches into the model's condition (dropping some to the null
condition while training, for classifier-free guidance), makes the null
condition, and turns what a user asks for (labels; prompts and negative
prompts) into conditions for the sampler. A caption condition is token ids
for the encoder trained with the DiT, or the per-token and pooled embeddings
of a frozen encoder run, computed in the step from the frozen `text_encoder`
model group (models/text_conditioning.py).
"""

from __future__ import annotations

import functools
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.config import Config
from jaxgen.data.caption_words import caption_ids, colliding_words, left_out, words
from jaxgen.diffusion.guidance import drop_captions, drop_labels
from jaxgen.tasks.base import ModelSpec, Weights

log = logging.getLogger("jaxgen")

TEXT_ENCODER_GROUP = "text_encoder"


class ClassConditions:
    def __init__(self, cfg: Config):
        self.null_label, self.drop_rate = cfg.model.num_classes, cfg.diffusion.label_dropout

    def models(self) -> dict[str, ModelSpec]:
        return {}

    def caption_tokens(self):
        return None

    def text_width(self) -> int | None:
        return None

    def training(self, models, batch: dict, rng: jax.Array):
        return drop_labels(batch["labels"], rng, self.drop_rate, self.null_label)

    def held_out(self, models, batch: dict):
        return batch["labels"]

    def requested(self, weights: Weights, labels: list[int]) -> np.ndarray:
        return np.asarray(labels, np.int32)

    def null(self, weights: Weights, n: int) -> np.ndarray:
        return np.full((n,), self.null_label, np.int32)


class CaptionConditions:
    def __init__(self, cfg: Config, run_dir: pathlib.Path | None = None):
        """`run_dir`: the run's, where it has one. A run with checkpoints opens its frozen encoder from the copy
        it kept (`keep`), not from the encoder run: that run may have moved, and its parameters are in the
        run's own checkpoints."""
        self.cfg, self.cond = cfg, cfg.conditioning
        self.frozen, self.kept = None, False
        if self.cond.text_encoder is None:
            return
        from jaxgen.outputs.text_encoder import kept_text_encoder, load_text_encoder

        kept = kept_text_encoder(run_dir)
        if kept is not None:
            self.frozen, self.kept = load_text_encoder(kept, max_length=self.cond.max_length, with_params=False), True
            log.info("captions: the frozen %s this run kept (%s)", self.frozen.kind, kept)
            return
        self.frozen = load_text_encoder(self.cond.text_encoder, max_length=self.cond.max_length)
        log.info("captions: frozen %s of run %s (step %d, width %d)", self.frozen.kind, self.cond.text_encoder,
                 self.frozen.step, self.frozen.width)

    def keep(self, run_dir: pathlib.Path) -> None:
        """Keep in a new run's `run_dir` what it needs of the frozen encoder's run to open without it."""
        if self.frozen is None or self.kept:
            return
        from jaxgen.outputs.text_encoder import KEPT_TEXT_ENCODER, keep_text_encoder

        out = run_dir / KEPT_TEXT_ENCODER
        shutil.rmtree(out, ignore_errors=True)  # a copy a start killed before its first checkpoint left
        keep_text_encoder(self.frozen, out)

    def models(self) -> dict[str, ModelSpec]:
        if self.frozen is None:
            return {}
        frozen = self.frozen
        if frozen.params is None:  # a kept copy: the run's checkpoints hold the parameters
            return {TEXT_ENCODER_GROUP: ModelSpec(build=frozen.build, trained=False)}
        return {TEXT_ENCODER_GROUP: ModelSpec(build=lambda rngs: nnx.merge(frozen.graphdef, frozen.params),
                                              trained=False)}

    def text_width(self) -> int | None:
        return None if self.frozen is None else self.frozen.width

    def caption_tokens(self):
        """caption -> (ids, mask) as the pipeline adds them to batches."""
        if self.frozen is None:
            return functools.partial(caption_ids, vocab=self.cond.joint_vocab, max_length=self.cond.max_length)
        frozen = self.frozen

        def frozen_tokens(text: str) -> tuple[np.ndarray, np.ndarray]:
            ids, mask = frozen.token_ids([text])
            return ids[0], mask[0]

        return frozen_tokens

    def warn_of_prompts_read_in_part(self, prompts: list[str]) -> None:
        """Name each prompt longer than the captions the model reads (conditioning.max_length), which is cut, and
        each holding letters the hashed-word encoder leaves out (é, 日): a prompt of nothing else is no caption."""
        limit, unit = self.cond.max_length, "words" if self.frozen is None else "tokens"
        for prompt in prompts:
            if self.frozen is None:
                length = len(words(prompt))
            else:  # with the encoder's own markers ([CLS] ... [SEP], or the end token)
                markers = 2 if self.frozen.kind == "encoder" else 1
                length = len(self.frozen.tokenizer.encode_document(prompt)) + markers
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            if length > limit:
                log.warning("prompt %r is %d %s long; the model reads only the first %d (conditioning.max_length)",
                            shown, length, unit, limit)
            if self.frozen is None and (dropped := left_out(prompt)):  # the hashed-word encoder reads a-z, 0-9
                read = " ".join(words(prompt))
                log.warning("prompt %r: the model's caption encoder reads only letters a-z and digits, so it is read "
                            "as %s (%s left out)", shown, repr(read) if read else "the empty caption",
                            "".join(dropped[:20]))

    def report_collisions(self, captions: list[str]) -> None:
        if self.frozen is None and (groups := colliding_words(captions, self.cond.joint_vocab)):
            log.warning("captions: these words share an id among conditioning.joint_vocab=%d buckets: %s",
                        self.cond.joint_vocab, "; ".join(" = ".join(g) for g in groups[:5]))

    def _condition(self, models, ids_BL, mask_BL, keep_B) -> dict:
        if self.frozen is None:
            return {"ids": ids_BL, "mask": mask_BL, "keep": keep_B}
        from jaxgen.outputs.text_encoder import embed_with

        tokens_BLT, pooled_BT = embed_with(self.frozen.kind, models[TEXT_ENCODER_GROUP], ids_BL, mask_BL)
        return {"tokens": jax.lax.stop_gradient(tokens_BLT), "mask": mask_BL,
                "pooled": jax.lax.stop_gradient(pooled_BT), "keep": keep_B}

    def training(self, models, batch: dict, rng: jax.Array) -> dict:
        keep_B = drop_captions(jnp.ones(batch["labels"].shape, bool), rng, self.cond.drop_rate)
        return self._condition(models, batch["caption_ids"], batch["caption_mask"], keep_B)

    def held_out(self, models, batch: dict) -> dict:
        return self._condition(models, batch["caption_ids"], batch["caption_mask"],
                               jnp.ones(batch["labels"].shape, bool))

    def null(self, weights: Weights, n: int) -> dict:
        return self.requested(weights, [None] * n)

    def requested(self, weights: Weights, texts: list[str | None]) -> dict:
        """The sampler's condition for each text (None: the null caption), as arrays."""
        tokens = self.caption_tokens()
        rows = [tokens(text or "") for text in texts]
        ids_BL = np.stack([r[0] for r in rows])
        mask_BL = np.stack([r[1] for r in rows])
        keep_B = np.asarray([text is not None for text in texts])
        if self.frozen is None:
            return {"ids": ids_BL, "mask": mask_BL, "keep": keep_B}
        params = weights.params[TEXT_ENCODER_GROUP]
        tokens_BLT, pooled_BT = self.frozen.embed(params, ids_BL, mask_BL)
        return {"tokens": tokens_BLT, "mask": mask_BL, "pooled": pooled_BT, "keep": keep_B}


def make_conditions(cfg: Config, run_dir: pathlib.Path | None = None) -> ClassConditions | CaptionConditions:
    return CaptionConditions(cfg, run_dir) if cfg.conditioning.by == "text" else ClassConditions(cfg)
