"""Training rows of the bidirectional families: masked-LM rows for an encoder, (input, target) rows for
an encoder-decoder.

Documents are never cut across rows mid-piece nor attend to each other: each
document is tokenized and split into pieces that fit a row, and whole pieces are
packed first-fit into rows (grain's FirstFitPackIterDataset), each marked by
`segment_ids` (1, 2, ...; 0 = padding) and `positions` restarting at 0.

- Masked LM: a piece is [BOS] t1..tn [EOS] (BERT's [CLS] ... [SEP]); each packed row
  is masked by `masking.mask_tokens` (never BOS, EOS or padding). Fields: inputs,
  targets, weights (1 where a token is to be predicted), segment_ids, positions.
- Encoder-decoder: a piece of raw tokens is span-corrupted (`span_corruption`) into
  an input and a target, or a supervised pair is tokenized; inputs and targets end
  in EOS and are packed together (pair k's input and target share segment id k).
  Fields: inputs, input_segments, input_positions; targets, targets_in (the target
  shifted right within its segment, starting with the decoder's start id),
  target_segments, target_positions, weights.

Random choices (masks, spans) draw from (data.seed, reader stream, row position), so
a resumed run sees the same rows; held-out rows are masked and corrupted with a fixed
seed, so every evaluation measures the same thing.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pathlib
from collections.abc import Sequence

import grain
import numpy as np

from jaxgen.config import Config, DataConfig
from jaxgen.data.lm import check_holds_one_batch, how_to_hold_out_more, prepare_tokenizer, too_few_documents
from jaxgen.data.masking import mask_tokens, ordinary_ids
from jaxgen.data.pipeline import (
    BatchIterator,
    padded,
    process_rows,
    stream_batches,
    this_process,
    user_errors_unwrapped,
)
from jaxgen.data.sources import document_of, held_out_documents, mixed_numbered_documents, one_pass_documents
from jaxgen.data.span_corruption import corrupt, noise_mask, raw_length, span_count
from jaxgen.data.splits import Shard
from jaxgen.data.text_pairs import ReadPair, cut_pairs_note, pair_files, pair_texts, read_pair
from jaxgen.data.tokenizer import MASK_PIECE, Tokenizer, sentinel_piece
from jaxgen.errors import DataError

log = logging.getLogger("jaxgen")

# A document longer than this many rows is refused rather than split further (grain's fan-out bound).
MAX_PIECES_PER_DOCUMENT = 4096
# Held-out rows are masked and corrupted from this seed whatever data.seed is.
HELD_OUT_SEED = 2**31 - 1


@dataclasses.dataclass
class TextRows:
    tokenizer: Tokenizer
    train: BatchIterator  # this process's rows of every training batch, resumable
    eval: list[dict[str, np.ndarray]]  # this process's rows of the fixed held-out batches


# ----------------------------------------------------------------------------- what each objective needs


def is_pairs(cfg: Config) -> bool:
    return cfg.data.input_field is not None


def special_pieces(cfg: Config) -> list[str]:
    """The whole pieces the objective needs in the vocabulary."""
    if cfg.model.kind == "encoder":
        return [MASK_PIECE]
    if is_pairs(cfg):
        return []
    return [sentinel_piece(i) for i in range(sentinels_needed(cfg))]


def sentinels_needed(cfg: Config) -> int:
    return span_count(span_raw_length(cfg), cfg.span.noise_density, cfg.span.mean_length)


def span_raw_length(cfg: Config) -> int:
    """Raw tokens per span-corrupted piece: the most whose input fits data.seq_len and target data.target_len."""
    try:
        return raw_length(cfg.data.seq_len, cfg.data.target_len, cfg.span.noise_density, cfg.span.mean_length)
    except ValueError as err:
        raise DataError(f"span corruption cannot fit data.seq_len={cfg.data.seq_len} and data.target_len="
                        f"{cfg.data.target_len}: {err}") from None


def decoder_start_id(cfg: Config, tokenizer: Tokenizer) -> int:
    start = getattr(cfg.model, "decoder_start_id", None)
    return tokenizer.bos_id if start is None else start


# ----------------------------------------------------------------------------- transforms


class TokenPieces(grain.experimental.FlatMapTransform):
    """A document -> pieces of at most `length` token ids, each {"tokens": ids}; with `framed`, each piece is
    [BOS] ids [EOS] within `length`. Pieces shorter than `min_length` ids are dropped."""

    max_fan_out = MAX_PIECES_PER_DOCUMENT

    def __init__(self, tokenizer: Tokenizer, length: int, framed: bool, min_length: int = 1):
        self.tokenizer, self.framed, self.min_length = tokenizer, framed, min_length
        self.room = length - 2 if framed else length

    def flat_map(self, document: str | np.ndarray) -> list[dict[str, np.ndarray]]:
        ids = self.tokenizer.encode_document(document) if isinstance(document, str) else document.astype(np.int32)
        if len(ids) > self.room * MAX_PIECES_PER_DOCUMENT:
            raise DataError(f"a document of {len(ids)} tokens would fill more than {MAX_PIECES_PER_DOCUMENT} rows of "
                            f"data.seq_len; split such documents before training")
        pieces = [ids[i:i + self.room] for i in range(0, len(ids), self.room)]
        bos, eos = np.int32(self.tokenizer.bos_id), np.int32(self.tokenizer.eos_id)
        return [{"tokens": np.concatenate([[bos], piece, [eos]]).astype(np.int32) if self.framed else piece}
                for piece in pieces if len(piece) >= self.min_length]


class MaskRow(grain.transforms.RandomMap):
    """A packed row of framed pieces -> masked-LM fields."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer):
        self.mlm = cfg.mlm
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.mask_id = tokenizer.piece_id(MASK_PIECE)
        self.random_ids = ordinary_ids(tokenizer.vocab_size, special_ids(tokenizer))

    def random_map(self, row: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens, segments = row["tokens"].astype(np.int32), row["tokens_segment_ids"].astype(np.int32)
        maskable = (segments > 0) & (tokens != self.bos) & (tokens != self.eos)
        inputs, targets, weights = mask_tokens(tokens, maskable, rng, mask_rate=self.mlm.mask_rate,
                                               replace_mask=self.mlm.replace_mask,
                                               replace_random=self.mlm.replace_random, mask_id=self.mask_id,
                                               random_ids=self.random_ids)
        return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
                "weights": weights.astype(np.float32), "segment_ids": segments,
                "positions": row["tokens_positions"].astype(np.int32)}


def special_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids a random replacement must never be: unk, BOS, EOS and [MASK]."""
    return sorted({0, tokenizer.bos_id, tokenizer.eos_id, tokenizer.piece_id(MASK_PIECE)})


class CorruptPiece(grain.transforms.RandomMap):
    """Raw token ids -> T5 span corruption's {"inputs", "targets"}, both ending in EOS."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer):
        self.density, self.mean_length = cfg.span.noise_density, cfg.span.mean_length
        self.sentinels = [tokenizer.piece_id(sentinel_piece(i)) for i in range(sentinels_needed(cfg))]
        self.eos = tokenizer.eos_id

    def random_map(self, piece: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = piece["tokens"]
        mask = noise_mask(len(tokens), self.density, self.mean_length, rng)
        inputs, targets = corrupt(tokens, mask, self.sentinels, self.eos)
        return {"inputs": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32)}


class PairTokens(grain.transforms.Map):
    """(input text, target text) -> {"inputs", "targets"} ids, each ending in EOS, cut to the row lengths."""

    def __init__(self, data: DataConfig, tokenizer: Tokenizer):
        self.tokenizer, self.lengths = tokenizer, (data.seq_len, data.target_len)

    def map(self, pair: tuple[str, str]) -> dict[str, np.ndarray]:
        eos = [self.tokenizer.eos_id]
        ids = [np.concatenate([self.tokenizer.encode_document(text)[:length - 1], eos]).astype(np.int32)
               for text, length in zip(pair, self.lengths)]
        return {"inputs": ids[0], "targets": ids[1]}


class Seq2SeqRow(grain.transforms.Map):
    """A packed row of (input, target) pairs -> the encoder-decoder's fields."""

    def __init__(self, start_id: int):
        self.start_id = start_id

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        targets = row["targets"].astype(np.int32)
        target_segments = row["targets_segment_ids"].astype(np.int32)
        target_positions = row["targets_positions"].astype(np.int32)
        targets_in = np.concatenate([[self.start_id], targets[:-1]]).astype(np.int32)
        targets_in = np.where(target_positions == 0, self.start_id, targets_in) * (target_segments > 0)
        return {"inputs": row["inputs"].astype(np.int32),
                "input_segments": row["inputs_segment_ids"].astype(np.int32),
                "input_positions": row["inputs_positions"].astype(np.int32),
                "targets": targets, "targets_in": targets_in.astype(np.int32), "target_segments": target_segments,
                "target_positions": target_positions, "weights": (target_segments > 0).astype(np.float32)}


# ----------------------------------------------------------------------------- pipelines


def packed_rows(documents: grain.IterDataset, cfg: Config, tokenizer: Tokenizer, seed: int) -> grain.IterDataset:
    """Documents -> this objective's rows, random choices drawn from `seed` and each row's position."""
    data, bins = cfg.data, 16
    if cfg.model.kind == "encoder":
        pieces = grain.experimental.FlatMapIterDataset(documents, TokenPieces(tokenizer, data.seq_len, framed=True))
        packed = grain.experimental.FirstFitPackIterDataset(pieces, length_struct={"tokens": data.seq_len},
                                                            num_packing_bins=bins, shuffle_bins=False)
        return packed.seed(seed).random_map(MaskRow(cfg, tokenizer))
    if is_pairs(cfg):
        examples = documents.map(ReadPair(data)).map(PairTokens(data, tokenizer))
    else:
        pieces = grain.experimental.FlatMapIterDataset(
            documents, TokenPieces(tokenizer, span_raw_length(cfg), framed=False, min_length=2))
        examples = pieces.seed(seed).random_map(CorruptPiece(cfg, tokenizer))
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={"inputs": data.seq_len, "targets": data.target_len}, num_packing_bins=bins,
        shuffle_bins=False)
    return packed.map(Seq2SeqRow(decoder_start_id(cfg, tokenizer)))


def train_batches(cfg: Config, tokenizer: Tokenizer, shard: Shard) -> BatchIterator:
    data = cfg.data
    streams = data.reader_streams

    def stream(reader: Shard) -> grain.IterDataset:
        documents = mixed_numbered_documents(data, "train", reader).map(document_of)
        seed = int(np.random.SeedSequence([data.seed, reader.index]).generate_state(1)[0])
        return packed_rows(documents, cfg, tokenizer, seed).batch(data.batch_size // streams, drop_remainder=True)

    return stream_batches(stream, data.batch_size, streams, shard, workers=data.workers, prefetch=data.prefetch)


# Training pairs whose lengths are checked at start-up against the rows they are cut to.
PAIRS_CHECKED = 1000


def warn_of_cut_pairs(data: DataConfig, tokenizer: Tokenizer) -> None:
    """Warn where pairs among the first PAIRS_CHECKED are longer than their rows (PairTokens cuts them)."""
    lengths = [tuple(len(tokenizer.encode_document(text)) + 1 for text in pair)
               for pair in training_pairs(data, PAIRS_CHECKED)]
    if note := cut_pairs_note(lengths, data.seq_len, data.target_len):
        log.warning(note)


def held_out_batches(cfg: Config, tokenizer: Tokenizer, shard: Shard) -> list[dict[str, np.ndarray]]:
    """This process's rows of at most train.eval_batches global held-out batches, the last padded."""
    data = cfg.data
    documents = held_out_documents(data).map(document_of)
    rows = packed_rows(documents, cfg, tokenizer, HELD_OUT_SEED).batch(data.batch_size, drop_remainder=False)
    with user_errors_unwrapped():
        taken = list(itertools.islice(iter(rows), cfg.train.eval_batches))
    n_rows = sum(len(batch["weights"]) for batch in taken)
    if n_rows < data.batch_size:
        why = too_few_documents(data) if n_rows == 0 else ""
        raise DataError(f"the held-out documents fill {n_rows} rows, fewer than one batch of data.batch_size="
                        f"{data.batch_size}; {why}{how_to_hold_out_more(data)}")
    taken[-1] = padded(taken[-1], data.batch_size)
    log.info("held-out: %d rows in %d batches, %d target tokens", n_rows, len(taken),
             int(sum(batch["weights"].sum() for batch in taken)))
    mine = process_rows(data.batch_size, shard)
    return [{name: field[mine] for name, field in batch.items()} for batch in taken]


def build_text_rows(cfg: Config, run_dir: pathlib.Path, shard: Shard | None = None) -> TextRows:
    shard = shard or this_process()
    texts = (lambda lines: pair_texts(lines, cfg.data)) if is_pairs(cfg) else None
    tokenizer = prepare_tokenizer(cfg, run_dir, special_pieces(cfg), texts)
    check_holds_one_batch(cfg.data, tokenizer)
    if is_pairs(cfg):
        warn_of_cut_pairs(cfg.data, tokenizer)
    held_out = held_out_batches(cfg, tokenizer, shard)
    return TextRows(tokenizer=tokenizer, train=train_batches(cfg, tokenizer, shard), eval=held_out)


# ----------------------------------------------------------------------------- supervised pairs as text


def held_out_pairs(data: DataConfig, limit: int) -> list[tuple[str, str]]:
    """The first `limit` held-out (input, target) pairs, in the held-out order evaluation reads."""
    with user_errors_unwrapped():
        lines = itertools.islice(iter(held_out_documents(data).map(document_of)), limit)
        return [read_pair(line, data.input_field, data.target_field, lambda: pair_files(data)) for line in lines]


def training_pairs(data: DataConfig, limit: int) -> list[tuple[str, str]]:
    """At most `limit` training pairs, in file order (what a nearest-input baseline looks up)."""
    lines = itertools.islice(one_pass_documents(data, "train"), limit)
    return [read_pair(line, data.input_field, data.target_field, lambda: pair_files(data)) for line in lines]


def unigram_counts(data: DataConfig, tokenizer: Tokenizer, max_tokens: int) -> np.ndarray:
    """Token counts over the first `max_tokens` tokens of the training documents (a masked LM's baseline)."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    seen = 0
    for document in one_pass_documents(data, "train"):
        ids = tokenizer.encode_document(document) if isinstance(document, str) else np.asarray(document)
        counts += np.bincount(ids, minlength=len(counts))[:len(counts)]
        seen += len(ids)
        if seen >= max_tokens:
            break
    return counts


def ids_of(texts: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    return [list(map(int, tokenizer.encode_document(text))) for text in texts]
