"""The run's tokenizer: a sentencepiece `.model` or a Hugging Face `tokenizer.json`, behind one interface.

Which one a file is follows from its contents, not its name. A run directory (and a
prepared dataset) keeps its tokenizer's files under fixed names, so the run says
which kind it was trained with and stays self-contained.
"""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Protocol

import numpy as np

from jaxgen.data.hf_json_tokenizer import CONFIG_NAME, HFJsonTokenizer
from jaxgen.data.sentencepiece_tokenizer import (  # noqa: F401  (what callers of jaxgen.data.tokenizer use)
    GIVE_A_TOKENIZER,
    MAX_TRAINING_SENTENCES,
    SentencepieceTokenizer,
    train_tokenizer,
)
from jaxgen.errors import DataError
from jaxgen.files import write_atomic

KINDS = (SentencepieceTokenizer, HFJsonTokenizer)


class Tokenizer(Protocol):
    kind: str  # "sentencepiece" or "hf_json"
    path: pathlib.Path
    bos_id: int  # starts every document (the EOS id where the tokenizer has no BOS)
    eos_id: int  # ends every document; generation stops at it

    @property
    def vocab_size(self) -> int: ...

    @property
    def sha256(self) -> str: ...

    def files(self) -> dict[str, bytes]: ...

    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def encode_document(self, text: str) -> np.ndarray: ...

    def decode(self, ids: list[int]) -> str: ...

    def piece_id(self, piece: str) -> int | None: ...

    def token_byte_lengths(self) -> np.ndarray: ...


MASK_PIECE = "[MASK]"  # a masked LM's mask token


def sentinel_piece(i: int) -> str:
    """Span corruption's i-th sentinel, named as T5's tokenizers name them."""
    return f"<extra_id_{i}>"


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """The tokenizer in file `path`, or the one a run directory or prepared dataset `path` keeps."""
    path = pathlib.Path(path)
    if path.is_dir():
        kept = tokenizer_file_in(path)
        if kept is None:
            raise DataError(f"tokenizer {str(path)!r} is a directory without tokenizer.model or tokenizer.json; "
                            f"{GIVE_A_TOKENIZER}")
        path = kept
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist; {GIVE_A_TOKENIZER}")
    with path.open("rb") as f:
        start = f.read(64).lstrip()
    return HFJsonTokenizer(path) if start[:1] == b"{" else SentencepieceTokenizer(path)


def tokenizer_file_in(directory: pathlib.Path) -> pathlib.Path | None:
    """The tokenizer file a run directory or prepared dataset keeps, if any."""
    found = [directory / kind.file_name for kind in KINDS if (directory / kind.file_name).is_file()]
    return found[0] if found else None


def tokenizer_from_files(files: dict[str, bytes], directory: pathlib.Path) -> Tokenizer:
    """The tokenizer whose `files()` these are, as kept in `directory`."""
    [kind] = [kind for kind in KINDS if kind.file_name in files]
    return kind.from_files(files, directory)


def keep_tokenizer(tokenizer: Tokenizer, directory: pathlib.Path) -> None:
    """Write the tokenizer's files into `directory` under their fixed names, each atomically.

    The tokenizer file itself goes last: it is what `tokenizer_file_in` looks for, so a start
    killed in between leaves no tokenizer that would be read without its config.
    """
    files = tokenizer.files()
    for name in sorted(files, key=lambda name: name == tokenizer.file_name):
        write_atomic(directory / name, files[name])


def kept_tokenizer_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """Every tokenizer file `keep_tokenizer` may have written into `directory` (existing or not)."""
    return [directory / SentencepieceTokenizer.file_name, directory / HFJsonTokenizer.file_name,
            directory / CONFIG_NAME]


def files_as_bytes(files: dict[str, bytes]) -> bytes:
    """`files()` as one payload (to send from one process to the others)."""
    return json.dumps({name: base64.b64encode(data).decode() for name, data in files.items()}).encode()


def files_from_bytes(payload: bytes) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in json.loads(payload).items()}
