"""Hugging Face tokenizers (`tokenizer.json`, read by the `tokenizers` library), as Llama 3, Qwen and Mistral ship them.

`tokenizer.json` says how text becomes ids but not which tokens begin and end a
document: that is `tokenizer_config.json`'s `bos_token` and `eos_token`, read from
beside it. A run directory keeps both files. Without a BOS token (Qwen) documents
are separated by EOS alone: every document is fed after an EOS, as in GPT-2-style
pretraining, so the BOS id is the EOS id.

jaxgen reads special-token text inside documents ("<|endoftext|>") as text, never as
the special token: data must not be able to forge a document boundary.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import tokenizers

from jaxgen.errors import DataError

CONFIG_NAME = "tokenizer_config.json"

# Used when no tokenizer_config.json names them: the names these families give their special tokens.
KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
KNOWN_EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


class HFJsonTokenizer:
    """A `tokenizer.json` with the BOS/EOS roles of its `tokenizer_config.json`."""

    kind = "hf_json"
    file_name = "tokenizer.json"

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        config_path = self.path.parent / CONFIG_NAME
        config = config_path.read_bytes() if config_path.is_file() else None
        self._load(self.path.read_bytes(), config)

    @classmethod
    def from_files(cls, files: dict[str, bytes], directory: str | pathlib.Path) -> HFJsonTokenizer:
        """A tokenizer received in memory (`files()` of another); `directory` is where it lives."""
        tokenizer = cls.__new__(cls)
        tokenizer.path = pathlib.Path(directory) / cls.file_name
        tokenizer._load(files[cls.file_name], files.get(CONFIG_NAME))
        return tokenizer

    def _load(self, json_bytes: bytes, config_bytes: bytes | None) -> None:
        name = str(self.path)
        try:
            self._tok = tokenizers.Tokenizer.from_str(json_bytes.decode("utf-8"))
        except Exception as err:  # the Rust parser raises plain Exception; bad UTF-8 a UnicodeDecodeError
            raise DataError(f"tokenizer file {name!r} is not a Hugging Face tokenizer.json ({err}); give the "
                            "tokenizer.json of a Hugging Face model, or a sentencepiece .model") from None
        self._tok.encode_special_tokens = True
        config = _read_config(config_bytes, self.path.parent / CONFIG_NAME)
        self.eos_id = self._role_id(config, "eos_token", KNOWN_EOS, required=True)
        self.bos_id = self._role_id(config, "bos_token", KNOWN_BOS, required=False)
        if self.bos_id is None:
            self.bos_id = self.eos_id
        self._json_bytes = json_bytes
        self._byte_lengths: np.ndarray | None = None
        # What the run keeps: the config as given, or one naming the roles jaxgen chose.
        self._config_bytes = config_bytes if config is not None else json.dumps(
            {"bos_token": self._tok.id_to_token(self.bos_id), "eos_token": self._tok.id_to_token(self.eos_id)},
            indent=2).encode() + b"\n"

    def _role_id(self, config: dict | None, role: str, known: tuple[str, ...], required: bool) -> int | None:
        if config is not None:
            token = config.get(role)
            if isinstance(token, dict):  # transformers' serialised AddedToken
                token = token.get("content")
            if token is None:
                if required:
                    raise DataError(f"{str(self.path.parent / CONFIG_NAME)!r} names no {role}; jaxgen ends every "
                                    f"document with it: add \"{role}\": \"<the end-of-text token>\"")
                return None
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise DataError(f"{str(self.path.parent / CONFIG_NAME)!r} names {role} {token!r}, which "
                                f"{str(self.path)!r} does not have; name one of its special tokens")
            return token_id
        found = [self._tok.token_to_id(t) for t in known if self._tok.token_to_id(t) is not None]
        if not found and required:
            raise DataError(f"tokenizer {str(self.path)!r} has no {CONFIG_NAME} beside it and none of the usual "
                            f"{role}s {', '.join(known)}; put a {CONFIG_NAME} naming its bos_token and eos_token there")
        return found[0] if found else None

    def files(self) -> dict[str, bytes]:
        return {self.file_name: self._json_bytes, CONFIG_NAME: self._config_bytes}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(self.files().items())}
        return hashlib.sha256(json.dumps(digests).encode()).hexdigest()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_document(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def piece_id(self, piece: str) -> int | None:
        """The id of a whole token (e.g. "[MASK]"), None if the vocabulary lacks it."""
        return self._tok.token_to_id(piece)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for: 0 for special tokens (worked out once: every eval asks).

        A byte-level vocabulary (GPT-2, Llama 3, Qwen) spells each byte as one character;
        a sentencepiece-style one spells the space as "▁" and bytes as "<0xNN>".
        """
        if self._byte_lengths is None:
            self._byte_lengths = self._count_byte_lengths()
        return self._byte_lengths

    def _count_byte_lengths(self) -> np.ndarray:
        byte_level = "ByteLevel" in json.dumps(json.loads(self._json_bytes).get("decoder"))
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is None or token in special:
                continue
            if byte_level:
                lengths[i] = len(token)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                lengths[i] = 1
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return lengths

    def __getstate__(self) -> dict:
        # Pickled into grain worker processes: the files travel, not the Rust object.
        return {"path": self.path, "files": self.files()}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["files"][self.file_name], state["files"][CONFIG_NAME])


def _read_config(config_bytes: bytes | None, path: pathlib.Path) -> dict | None:
    if config_bytes is None:
        return None
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{str(path)!r} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(config, dict):
        raise DataError(f"{str(path)!r} holds a JSON {type(config).__name__}, not an object; fix or remove it")
    return config
