"""A trained encoder, frozen, as a text encoder for another task (text-to-image conditioning, retrieval).

`load_text_encoder(RUN_DIR)` opens an encoder run (BERT-style) or an
encoder-decoder run (its encoder, as Imagen uses T5's) and returns a
`TextEncoder`: called on a list of strings it gives per-token embeddings, the
mask of real tokens and a pooled embedding (the mean over real tokens) for each.
Texts are tokenized as the run trained on them ([CLS] text [SEP] for an encoder,
text EOS for an encoder-decoder), cut to `max_length` tokens and padded to it, so
every batch has one shape and compiles once. `embed` is the same computation as
a pure function of (parameters, token ids, mask), for use inside another jitted
step.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgen.checkpoint_layout import checkpoint_dir, committed_steps
from jaxgen.chunks import chunk_size, map_chunks
from jaxgen.config import Config
from jaxgen.data.tokenizer import Tokenizer, keep_tokenizer, load_tokenizer
from jaxgen.errors import ConfigError
from jaxgen.files import building, write_atomic
from jaxgen.outputs.runs import load_run_config, open_run
from jaxgen.tasks import make_task
from jaxgen.tasks.layout import MAIN_GROUP

TEXT_ENCODER_KINDS = ("encoder", "encoder_decoder")


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    tokens: np.ndarray  # (B, L, D) float32 per-token embeddings, zero where mask is False
    mask: np.ndarray  # (B, L) bool: real tokens
    pooled: np.ndarray  # (B, D) float32 mean of the real tokens' embeddings


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    kind: str  # "encoder" or "encoder_decoder"
    width: int  # D
    max_length: int  # L
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    params: dict | None  # None: a kept copy's, whose parameters a run's own checkpoints hold
    step: int  # the checkpoint read (-1: none)
    build: Callable[[nnx.Rngs], nnx.Module] | None = None  # a freshly initialised encoder of this shape
    run_config: Config | None = None  # the encoder run's config, as read

    def token_ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), each (B, max_length): the texts as the run saw them, cut and padded."""
        t = self.tokenizer
        rows = []
        for text in texts:
            ids = t.encode_document(text).tolist()
            if self.kind == "encoder":
                rows.append([t.bos_id, *ids[:self.max_length - 2], t.eos_id])
            else:
                rows.append([*ids[:self.max_length - 1], t.eos_id])
        ids_BL = np.zeros((len(rows), self.max_length), np.int32)
        mask_BL = np.zeros((len(rows), self.max_length), bool)
        for i, row in enumerate(rows):
            ids_BL[i, :len(row)], mask_BL[i, :len(row)] = row, True
        return ids_BL, mask_BL

    def __call__(self, texts: list[str]) -> TextEmbeddings:
        if isinstance(texts, str):
            raise TypeError("TextEncoder takes a list of strings")
        ids_BL, mask_BL = self.token_ids(list(texts))
        tokens_BLD, pooled_BD = self.embed(self.params, ids_BL, mask_BL)
        return TextEmbeddings(tokens=tokens_BLD, mask=mask_BL, pooled=pooled_BD)

    def embed(self, params: dict, ids_BL: np.ndarray, mask_BL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`embed` of any number of rows, through one compiled program EMBED_BATCH rows (or fewer) at a time,
        so that the thousands of captions of a quality evaluation do not make one huge batch."""
        return map_chunks(lambda chunk, _: _embed_jit(self.kind, self.graphdef, params, *chunk), (ids_BL, mask_BL),
                          chunk_size(len(ids_BL), EMBED_BATCH))


def embed(kind: str, graphdef: nnx.GraphDef, params: dict, ids_BL: jax.Array,
          mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(per-token embeddings (B, L, D), zero at padding; their mean over real tokens (B, D))."""
    return embed_with(kind, nnx.merge(graphdef, params), ids_BL, mask_BL)


def embed_with(kind: str, model: nnx.Module, ids_BL: jax.Array, mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`embed` with the model as a module (a frozen model group of another task)."""
    segments_BL = mask_BL.astype(jnp.int32)
    hidden_BLD = model.hidden(ids_BL, segments_BL) if kind == "encoder" else model.encode(ids_BL, segments_BL)
    keep_BL1 = mask_BL[..., None].astype(jnp.float32)
    tokens_BLD = hidden_BLD.astype(jnp.float32) * keep_BL1
    pooled_BD = tokens_BLD.sum(axis=1) / jnp.maximum(keep_BL1.sum(axis=1), 1.0)
    return tokens_BLD, pooled_BD


_embed_jit = jax.jit(embed, static_argnums=(0, 1))
EMBED_BATCH = 64


def load_text_encoder(run_dir: str | pathlib.Path, step: int | None = None, max_length: int | None = None,
                      with_params: bool = True) -> TextEncoder:
    """The frozen encoder of run `run_dir` (checkpoint `step`, default the newest); `max_length` defaults to the
    run's data.seq_len. Without params (`with_params=False`: a copy `keep_text_encoder` made, whose parameters a
    run's own checkpoints hold) `params` is None and `step` -1."""
    cfg = load_run_config(run_dir)
    if cfg.model.kind not in TEXT_ENCODER_KINDS:
        raise ConfigError(f"run {str(run_dir)!r} trains model.kind={cfg.model.kind!r}; a text encoder is an encoder "
                          f"or encoder_decoder run ({', '.join(TEXT_ENCODER_KINDS)})")
    length = max_length or cfg.data.seq_len
    minimum = 3 if cfg.model.kind == "encoder" else 2
    if length < minimum:
        raise ConfigError(f"max_length={length} leaves no room for text (at least {minimum} tokens)")
    tokenizer = load_tokenizer(run_dir)
    if not with_params:
        build = make_task(cfg).models()[MAIN_GROUP].build
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
        return TextEncoder(kind=cfg.model.kind, width=cfg.model.d_model, max_length=length, tokenizer=tokenizer,
                           graphdef=graphdef, params=None, step=-1, build=build, run_config=cfg)
    run = open_run(run_dir, step)
    return TextEncoder(kind=cfg.model.kind, width=cfg.model.d_model, max_length=length, tokenizer=tokenizer,
                       graphdef=run.weights.graphdefs[MAIN_GROUP], params=run.weights.params[MAIN_GROUP],
                       step=run.step, run_config=cfg)


# Where a run keeps the config and tokenizer of its frozen text encoder's run.
KEPT_TEXT_ENCODER = "text_encoder"


def kept_text_encoder(run_dir: pathlib.Path | None) -> pathlib.Path | None:
    """The copy of its frozen text encoder's run that run `run_dir` kept, once it has a checkpoint to go with."""
    if run_dir is None or not (pathlib.Path(run_dir) / KEPT_TEXT_ENCODER / "config.yaml").is_file():
        return None
    return pathlib.Path(run_dir) / KEPT_TEXT_ENCODER if committed_steps(checkpoint_dir(run_dir)) else None


def keep_text_encoder(encoder: TextEncoder, out: pathlib.Path) -> None:
    """What another run needs of `encoder`'s run to open without it: its config and tokenizer as they were read
    (its parameters are in that run's checkpoints), written to `out` all at once. No collective: process 0
    alone keeps it."""
    with building(out) as partial:
        keep_tokenizer(encoder.tokenizer, partial)
        write_atomic(partial / "config.yaml", encoder.run_config.to_yaml())
