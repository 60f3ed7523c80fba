"""Sentencepiece tokenizers: jaxgen's own (lossless training settings) and any with its special ids.

Ids follow the Llama convention (unk=0, bos=1, eos=2) so exports need no remap.
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import sentencepiece as spm

from jaxgen.errors import DataError
from jaxgen.files import write_atomic

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_IDS = {"unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}
BYTE_PIECES = 256  # byte fallback: a piece for every byte, so that any text can be encoded


ModelType = Literal["bpe", "unigram"]

# Sentencepiece holds its training sentences in memory; beyond this many it trains on a
# uniform sample of them, so a corpus of any size can be streamed in.
MAX_TRAINING_SENTENCES = 2_000_000
# Sentencepiece silently skips training sentences longer than 4192 bytes (its max_sentence_length): a
# corpus of long documents (web pages, books on one line) trained on its short ones alone, or on none.
# Longer documents are cut into pieces of at most this many bytes, at whitespace where there is some.
TRAINING_PIECE_BYTES = 4096
# Sentencepiece reads the size as an int32, and the largest tokenizers in use hold ~256k pieces; more pieces
# than this would only make an embedding no corpus can train.
MAX_VOCAB_SIZE = 1 << 20

GIVE_A_TOKENIZER = "give a sentencepiece .model (e.g. from `jaxgen tokenizer train`) or a Hugging Face tokenizer.json"


def train_tokenizer(documents: Iterable[str], vocab_size: int, out: str | pathlib.Path, model_type: ModelType = "bpe",
                    *, source: str = "the given documents", vocab_option: str = "the vocabulary size",
                    special_pieces: Sequence[str] = (), replace: bool = True) -> SentencepieceTokenizer:
    """Train on streamed documents and write `out` atomically (never a half-written model); with
    `replace=False` only where no `out` exists then (FileExistsError, see `files.write_atomic`).

    `source` names the documents and `vocab_option` the setting of `vocab_size` in messages
    (e.g. "--input 'corpus.txt'" and "--vocab-size"). `special_pieces` (a masked LM's [MASK],
    span corruption's sentinels) get ids 3, 4, ... and are never split.
    """
    out = pathlib.Path(out)
    # Sentencepiece's own failure below this says nothing a user can act on ("insert_id(bos_id, ...)").
    least = BYTE_PIECES + len(SPECIAL_IDS) + len(special_pieces)
    if vocab_size < least:
        raise DataError(f"a {vocab_size}-piece {model_type} tokenizer is too small: its {BYTE_PIECES} byte pieces and "
                        f"{least - BYTE_PIECES} special pieces alone need {least}, the text's characters more; set "
                        f"{vocab_option} to at least {least}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"a {vocab_size}-piece {model_type} tokenizer is too large: jaxgen trains at most "
                        f"{MAX_VOCAB_SIZE} pieces (the largest tokenizers in use have ~256k); set {vocab_option} "
                        f"to at most {MAX_VOCAB_SIZE}")
    proto = io.BytesIO()
    reading = _KeepingErrors(piece for document in documents for piece in pieces_within(document, TRAINING_PIECE_BYTES))
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=reading, model_writer=proto, vocab_size=vocab_size, model_type=model_type,
            # Lossless: decode(encode(text)) == text for any UTF-8 input.
            normalization_rule_name="identity", byte_fallback=True, remove_extra_whitespaces=False,
            split_digits=True, character_coverage=1.0,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, user_defined_symbols=list(special_pieces),
            input_sentence_size=MAX_TRAINING_SENTENCES, shuffle_input_sentence=True, num_threads=2, minloglevel=2,
        )
    except RuntimeError as err:
        if reading.error is not None:  # the documents failed (e.g. a DataError naming a bad line), not sentencepiece
            raise reading.error from None
        raise _training_failure(str(err), vocab_size, model_type, source, vocab_option) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, proto.getvalue(), replace=replace)
    return SentencepieceTokenizer(out)


def pieces_within(text: str, limit: int) -> list[str]:
    """`text` cut into consecutive pieces of at most `limit` UTF-8 bytes: before the last whitespace that keeps
    a piece within the limit (the whitespace starts the next piece, as it starts a word for sentencepiece), or,
    in a run without any, at the last character boundary."""
    data = text.encode()
    if len(data) <= limit:
        return [text]
    pieces, start = [], 0
    while len(data) - start > limit:
        end = max(data.rfind(b" ", start + 1, start + limit + 1), data.rfind(b"\n", start + 1, start + limit + 1))
        if end <= start:
            end = start + limit
            while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the character began earlier
                end -= 1
        pieces.append(data[start:end].decode())
        start = end
    return [*pieces, data[start:].decode()]


class _KeepingErrors:
    """Iterates documents, keeping the exception they raise: sentencepiece turns it into a RuntimeError of its own."""

    def __init__(self, documents: Iterable[str]):
        self._documents: Iterator[str] = iter(documents)
        self.error: BaseException | None = None

    def __iter__(self) -> _KeepingErrors:
        return self

    def __next__(self) -> str:
        try:
            return next(self._documents)
        except StopIteration:  # the end of the documents, not a failure
            raise
        except BaseException as err:
            self.error = err
            raise


def _sentencepiece_reason(message: str) -> str:
    """Sentencepiece's error message without its status and source location ("INTERNAL: src/x.cc(12) [check] ")."""
    reason = re.sub(r"^[A-Z_]+: (\S+\(\d+\) \[[^\]]*\] ?)?", "", message)
    return " ".join(reason.split())


def _training_failure(message: str, vocab_size: int, model_type: str, source: str, vocab_option: str) -> DataError:
    """What sentencepiece's training error `message` means for the user, in one line."""
    model = f"a {vocab_size}-piece {model_type} tokenizer"
    if too_high := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        largest = too_high.group(1)
        return DataError(f"the corpus is too small for {model}: sentencepiece can make at most {largest} pieces "
                         f"from {source}; set {vocab_option} to at most {largest}, or add documents")
    if too_low := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return DataError(f"{model} is too small for the text of {source}: its characters, the 256 byte pieces "
                         f"and the special pieces need at least {too_low.group(1)}; set {vocab_option} to at least "
                         f"{too_low.group(1)}")
    if "[!sentences_.empty()]" in message:
        return DataError(f"no documents to train {model} on were found in {source}; give files with non-blank lines")
    return DataError(f"sentencepiece could not train {model} from {source}: {_sentencepiece_reason(message)}")


class SentencepieceTokenizer:
    """A sentencepiece `.model`, stored in run directories as `tokenizer.model`."""

    kind = "sentencepiece"
    file_name = "tokenizer.model"
    bos_id, eos_id = BOS_ID, EOS_ID

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self._load(_read_model_file(self.path))

    @classmethod
    def from_files(cls, files: dict[str, bytes], directory: str | pathlib.Path) -> SentencepieceTokenizer:
        """A model received in memory (`files()` of another); `directory` is where it lives (maybe on another host)."""
        tokenizer = cls.__new__(cls)
        tokenizer.__setstate__({"path": pathlib.Path(directory) / cls.file_name, "model_bytes": files[cls.file_name]})
        return tokenizer

    def _load(self, model_bytes: bytes) -> None:
        self._model_bytes = model_bytes
        self._sp = _load_model(model_bytes, self.path)
        self._byte_lengths: np.ndarray | None = None

    def files(self) -> dict[str, bytes]:
        return {self.file_name: self._model_bytes}

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

    def piece_id(self, piece: str) -> int | None:
        """The id of a whole piece (e.g. "[MASK]"), None if the vocabulary lacks it."""
        found = self._sp.piece_to_id(piece)
        return None if found == UNK_ID and piece != self._sp.id_to_piece(UNK_ID) else found

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for: 0 for control tokens, 1 for a byte-fallback piece
        (worked out once: every eval asks)."""
        if self._byte_lengths is None:
            sp = self._sp
            lengths = np.zeros(sp.get_piece_size(), np.int64)
            for i in range(sp.get_piece_size()):
                if sp.is_control(i) or sp.is_unknown(i):
                    continue
                lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
            self._byte_lengths = lengths
        return self._byte_lengths

    def __getstate__(self) -> dict:
        # Pickled into grain worker processes: the model bytes travel, not the C++ object.
        return {"path": self.path, "model_bytes": self._model_bytes}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["model_bytes"])


def _read_model_file(path: pathlib.Path) -> bytes:
    if path.is_dir():
        raise DataError(f"tokenizer file {str(path)!r} is a directory; {GIVE_A_TOKENIZER}")
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist; {GIVE_A_TOKENIZER}")
    return path.read_bytes()


def _load_model(model_bytes: bytes, path: pathlib.Path) -> spm.SentencePieceProcessor:
    """The model, if it is a sentencepiece model with jaxgen's special ids; `path` names it in errors."""
    name = str(path)
    if not model_bytes:  # sentencepiece would silently make an empty, unloaded model of it
        raise DataError(f"tokenizer file {name!r} is empty, not a sentencepiece model; {GIVE_A_TOKENIZER}")
    try:
        model = spm.SentencePieceProcessor(model_proto=model_bytes)
    except RuntimeError as err:
        reason = _sentencepiece_reason(str(err))  # empty when the bytes are no model at all
        detail = f" ({reason})" if reason else ""
        raise DataError(
            f"tokenizer file {name!r} is not a valid sentencepiece model{detail}; {GIVE_A_TOKENIZER}") from None
    _check_special_pieces(model, name)
    return model


def _check_special_pieces(model: spm.SentencePieceProcessor, name: str) -> None:
    """Batches, exports and generation assume jaxgen's special ids; another convention would train silently wrong."""
    if model.get_piece_size() < len(SPECIAL_IDS):
        raise DataError(f"tokenizer file {name!r} has {model.get_piece_size()} pieces, fewer than the "
                        f"{len(SPECIAL_IDS)} special pieces ({', '.join(SPECIAL_IDS)}) jaxgen needs; {GIVE_A_TOKENIZER}")
    found = {"unk": model.unk_id(), "bos": model.bos_id(), "eos": model.eos_id()}
    if found != SPECIAL_IDS:
        raise DataError(f"tokenizer file {name!r} has special ids {_ids(found)} (-1: none), jaxgen needs "
                        f"{_ids(SPECIAL_IDS)}; {GIVE_A_TOKENIZER}")


def _ids(ids: dict[str, int]) -> str:
    return ", ".join(f"{piece}={id_}" for piece, id_ in ids.items())
