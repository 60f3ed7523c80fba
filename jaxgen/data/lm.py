"""Everything the LM task reads: tokenizer, training stream, held-out batches."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil

import jax
import numpy as np

from jaxgen.config import Config, ConfigError
from jaxgen.data.pipeline import BatchIterator
from jaxgen.data.text import RandomWindows, eval_batches, split_documents, tokenize_stream
from jaxgen.data.tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger("jaxgen")


@dataclasses.dataclass
class LMData:
    tokenizer: Tokenizer
    train: BatchIterator  # host-local batches, resumable
    eval: list[dict[str, np.ndarray]]  # fixed held-out batches, host-local


def prepare_tokenizer(cfg: Config, run_dir: pathlib.Path, train_docs: list[str]) -> Tokenizer:
    """The run's tokenizer, always stored in the run directory so the run is self-contained."""
    target = run_dir / "tokenizer.model"
    if cfg.data.tokenizer is None:
        tokenizer = train_tokenizer(train_docs, cfg.model.vocab_size, target) if jax.process_index() == 0 else None
    else:
        tokenizer = Tokenizer(cfg.data.tokenizer)
        if jax.process_index() == 0:
            shutil.copyfile(tokenizer.path, target)
    tokenizer = tokenizer or Tokenizer(target)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {str(tokenizer.path)!r} has {tokenizer.vocab_size} pieces but model.vocab_size="
            f"{cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def build_lm_data(cfg: Config, run_dir: pathlib.Path) -> LMData:
    train_docs, held_out_docs = split_documents(cfg.data.path, cfg.data.eval_every_nth_doc)
    tokenizer = prepare_tokenizer(cfg, run_dir, train_docs)
    train_tokens = tokenize_stream(tokenizer, train_docs)
    eval_tokens = tokenize_stream(tokenizer, held_out_docs)
    log.info("data: %d train tokens, %d held-out tokens", len(train_tokens), len(eval_tokens))
    return LMData(
        tokenizer=tokenizer,
        train=RandomWindows(train_tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.data.seed),
        eval=eval_batches(eval_tokens, cfg.data.seq_len, cfg.data.batch_size, cfg.train.eval_batches),
    )
