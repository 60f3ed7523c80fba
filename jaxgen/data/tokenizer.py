"""Sentencepiece tokenizer: lossless training settings and a thin wrapper.

Ids follow the Llama convention (unk=0, bos=1, eos=2) so exports need no remap.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
from collections.abc import Iterable
from typing import Literal

import numpy as np
import sentencepiece as spm

from jaxgen.errors import DataError
from jaxgen.files import write_atomic

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


ModelType = Literal["bpe", "unigram"]

# Sentencepiece holds its training sentences in memory; beyond this many it trains on a
# uniform sample of them, so a corpus of any size can be streamed in.
MAX_TRAINING_SENTENCES = 2_000_000


def train_tokenizer(documents: Iterable[str], vocab_size: int, out: str | pathlib.Path, model_type: ModelType = "bpe") -> "Tokenizer":
    """Train on streamed documents and write `out` atomically (never a half-written model)."""
    out = pathlib.Path(out)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents), model_writer=proto, vocab_size=vocab_size, model_type=model_type,
            # Lossless: decode(encode(text)) == text for any UTF-8 input.
            normalization_rule_name="identity", byte_fallback=True, remove_extra_whitespaces=False,
            split_digits=True, character_coverage=1.0,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            input_sentence_size=MAX_TRAINING_SENTENCES, shuffle_input_sentence=True, num_threads=2, minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(f"sentencepiece could not train a {vocab_size}-token {model_type} model: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, proto.getvalue())
    return Tokenizer(out)


class Tokenizer:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer file {str(self.path)!r} does not exist")
        self._model_bytes = self.path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)

    @classmethod
    def from_bytes(cls, model_bytes: bytes, path: str | pathlib.Path) -> Tokenizer:
        """A model received in memory; `path` is where its file lives (possibly on another host)."""
        tokenizer = cls.__new__(cls)
        tokenizer.__setstate__({"path": pathlib.Path(path), "model_bytes": model_bytes})
        return tokenizer

    @property
    def model_bytes(self) -> bytes:
        return self._model_bytes

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._model_bytes).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def __getstate__(self) -> dict:
        # Pickled into grain worker processes: the model bytes travel, not the C++ object.
        return {"path": self.path, "model_bytes": self._model_bytes}

    def __setstate__(self, state: dict) -> None:
        self.path, self._model_bytes = state["path"], state["model_bytes"]
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
