"""Everything the LM task reads: tokenizer, training stream, held-out batches.

Training batches come from the grain pipeline: configured sources -> each reader
stream's share -> shuffle -> tokenize -> pack -> batch; the streams this process
holds side by side -> prefetch. Each batch
holds this process's rows, `inputs`/`targets` (int32), `weights` (float32, 0 on
padding) and the packing marks `segment_ids`/`positions` (int32), all
(per_process_batch, seq_len).

Held-out batches are the held-out documents themselves, each once, in a fixed shuffled
order (the same for every data.seed), packed the same way: at most train.eval_batches of
them, the last padded with zero weight. A held-out split too small to fill one batch is
refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import grain
import jax
import numpy as np

from jaxgen.config import Config, DataConfig
from jaxgen.config_data import MIN_EVAL_EVERY_NTH_DOC
from jaxgen.data.packing import batch_rows, pack_documents
from jaxgen.data.pipeline import (
    BatchIterator,
    GrainBatches,
    padded,
    process_rows,
    stream_batches,
    this_process,
    user_errors_unwrapped,
)
from jaxgen.data.prepare import read_prepared_metadata
from jaxgen.data.sources import (
    Document,
    describe,
    held_out_documents,
    mixed_numbered_documents,
    one_pass_documents,
)
from jaxgen.data.splits import Shard
from jaxgen.data.tokenizer import (
    MAX_TRAINING_SENTENCES,
    SentencepieceTokenizer,
    Tokenizer,
    files_as_bytes,
    files_from_bytes,
    keep_tokenizer,
    load_tokenizer,
    tokenizer_file_in,
    tokenizer_from_files,
    train_tokenizer,
)
from jaxgen.distributed import bytes_from_process_0
from jaxgen.errors import ConfigError, DataError

log = logging.getLogger("jaxgen")


@dataclasses.dataclass
class LMData:
    tokenizer: Tokenizer
    train: BatchIterator  # host-local batches, resumable
    eval: list[dict[str, np.ndarray]]  # fixed held-out batches, host-local


def prepared_datasets(data: DataConfig) -> list[dict]:
    """Metadata of every prepared dataset (data.path) among the sources."""
    found = [(s.path, read_prepared_metadata(s.path)) for s in data.mixture or [data] if s.path is not None]
    return [metadata | {"path": path} for path, metadata in found if metadata is not None]


def prepare_tokenizer(cfg: Config, run_dir: pathlib.Path, special_pieces: Sequence[str] = (),
                      texts: Callable[[Iterable[Document]], Iterator[str]] | None = None) -> Tokenizer:
    """The run's tokenizer, always kept in the run directory so the run is self-contained.

    A resumed run keeps the one in its run directory; a new run takes data.tokenizer if set,
    else the one a pre-tokenized prepared dataset carries, else one trained on the training
    documents (`texts` turns them into the texts to train on; `special_pieces` are added whole,
    and a given tokenizer must have them). Process 0 decides and sends the files to the others,
    so run directories need not be shared and no process reads a half-written file.
    """
    pretokenized = [d for d in prepared_datasets(cfg.data) if d["tokenizer"]]
    given = cfg.data.tokenizer or (pretokenized[0]["path"] if pretokenized else None)
    files = (tokenizer_on_process_0(cfg, run_dir, given, special_pieces, texts) if jax.process_index() == 0
             else None)
    tokenizer = tokenizer_from_files(files_from_bytes(bytes_from_process_0(files and files_as_bytes(files))), run_dir)
    check_vocab_size(tokenizer, cfg, given or str(tokenizer.path))
    check_special_pieces(tokenizer, special_pieces, given or str(tokenizer.path))
    for dataset in pretokenized:
        if dataset["tokenizer"]["sha256"] != tokenizer.sha256:
            raise DataError(
                f"data.path {dataset['path']!r} was tokenized with another tokenizer than {given!r}; "
                "unset data.tokenizer to use the dataset's own, or prepare the dataset again"
            )
    return tokenizer


def check_special_pieces(tokenizer: Tokenizer, pieces: Sequence[str], name: str) -> None:
    """The model's objective needs these whole pieces ([MASK], sentinels) in the vocabulary."""
    missing = [piece for piece in pieces if tokenizer.piece_id(piece) is None]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"tokenizer {name!r} lacks {shown}, which {_objective(pieces)} needs; unset data.tokenizer "
                        "to train one that has them, or give one that does")


def _objective(pieces: Sequence[str]) -> str:
    return "masked-LM training (model.kind=encoder)" if "[MASK]" in pieces else "span corruption (span:)"


def check_vocab_size(tokenizer: Tokenizer, cfg: Config, name: str) -> None:
    """The model must have a logit for every token; a Hugging Face model may have more (published ones pad)."""
    size, wanted = tokenizer.vocab_size, cfg.model.vocab_size
    if tokenizer.kind == "hf_json" and wanted < size:
        raise ConfigError(f"tokenizer {name!r} has {size} tokens but model.vocab_size={wanted}; "
                          f"set model.vocab_size to at least {size}")
    if tokenizer.kind == "sentencepiece" and wanted != size:
        raise ConfigError(f"tokenizer {name!r} has {size} pieces but model.vocab_size={wanted}; "
                          f"set model.vocab_size={size}")


def tokenizer_on_process_0(cfg: Config, run_dir: pathlib.Path, given: str | None, special_pieces: Sequence[str] = (),
                           texts: Callable[[Iterable[Document]], Iterator[str]] | None = None) -> dict[str, bytes]:
    """The files of the run's tokenizer, kept in `run_dir` if not there yet."""
    if (kept_file := tokenizer_file_in(run_dir)) is not None:  # a resumed run keeps the tokenizer it was trained with
        kept = load_tokenizer(kept_file)
        if given is not None and load_tokenizer(given).sha256 != kept.sha256:
            raise ConfigError(
                f"data.tokenizer={given!r} differs from the tokenizer this run directory was trained with "
                f"({kept_file}); resume with the checkpoint's tokenizer or choose another --run-dir"
            )
        return kept.files()
    if given is not None:
        tokenizer = load_tokenizer(given)
        check_vocab_size(tokenizer, cfg, given)  # before it is copied in: a refused start leaves no trace
        check_special_pieces(tokenizer, special_pieces, given)
        keep_tokenizer(tokenizer, run_dir)
        return tokenizer.files()
    documents = one_pass_documents(cfg.data, "train")
    documents = itertools.islice(documents if texts is None else texts(documents), MAX_TRAINING_SENTENCES)
    sources = ", ".join(describe(source) for source in cfg.data.mixture or [cfg.data])
    return train_tokenizer(documents, cfg.model.vocab_size, run_dir / SentencepieceTokenizer.file_name,
                           source=f"the training documents of {sources}", vocab_option="model.vocab_size",
                           special_pieces=special_pieces).files()


def check_holds_one_batch(data: DataConfig, tokenizer: Tokenizer) -> None:
    """The training documents must fill one global batch; repeating a tinier corpus hides a mistake."""
    needed = data.batch_size * data.seq_len
    found = 0
    for document in one_pass_documents(data, "train"):
        found += 1 + (len(tokenizer.encode_document(document)) if isinstance(document, str) else len(document))
        if found >= needed:
            return
    sources = ", ".join(describe(source) for source in data.mixture or [data])
    raise DataError(
        f"the training documents of {sources} hold {found} tokens, fewer than one batch of "
        f"data.batch_size x data.seq_len = {data.batch_size} x {data.seq_len} = {needed}"
    )


def train_batches(data: DataConfig, tokenizer: Tokenizer, shard: Shard, origins: bool = False) -> GrainBatches:
    """This process's rows of every global training batch, endless and resumable.

    Reader stream s packs its own share of the documents into `batch_size / streams` rows
    of every batch (see `pipeline.stream_batches`). `origins` adds each token's document's
    source and number (`jaxgen data inspect`); the batches are otherwise the same.
    """
    streams = data.reader_streams

    def stream(reader: Shard) -> grain.IterDataset:
        packed = pack_documents(mixed_numbered_documents(data, "train", reader), tokenizer, data.seq_len, origins)
        return batch_rows(packed, data.batch_size // streams)

    return stream_batches(stream, data.batch_size, streams, shard, workers=data.workers, prefetch=data.prefetch)


@dataclasses.dataclass
class HeldOutSet:
    batches: list[dict[str, np.ndarray]]  # global batches, the last padded with zero weight
    documents: int  # documents that start in them, each a different one
    tokens: int  # tokens with weight
    whole: bool  # every held-out document is in them


def held_out_set(data: DataConfig, tokenizer: Tokenizer, max_batches: int, origins: bool = False) -> HeldOutSet:
    """The held-out documents once, in a fixed order, packed into at most `max_batches` global batches."""
    packed = pack_documents(held_out_documents(data), tokenizer, data.seq_len, origins)
    batches = iter(batch_rows(packed, data.batch_size, drop_remainder=False))
    with user_errors_unwrapped():
        taken = list(itertools.islice(batches, max_batches))
        whole = next(batches, None) is None
    full = data.batch_size * data.seq_len
    tokens = int(sum(batch["weights"].sum() for batch in taken))
    documents = int(sum(document_starts(batch, tokenizer).sum() for batch in taken))
    if tokens < full and documents and tokens <= 2 * documents:  # their BOS and EOS alone: holding out more is no cure
        sources = ", ".join(describe(source) for source in data.mixture or [data])
        raise DataError(f"the held-out documents of {sources} are empty: {documents} documents, {tokens} tokens, "
                        "their beginning and end markers alone; give documents that hold text")
    if tokens < full:
        raise DataError(f"the held-out documents hold {tokens} tokens, fewer than one batch of data.batch_size x "
                        f"data.seq_len = {data.batch_size} x {data.seq_len} = {full}; "
                        f"{too_few_documents(data) if tokens == 0 else ''}{how_to_hold_out_more(data)}")
    taken[-1] = padded(taken[-1], data.batch_size)
    return HeldOutSet(batches=taken, documents=documents, tokens=tokens, whole=whole)


def document_starts(batch: dict[str, np.ndarray], tokenizer: Tokenizer) -> np.ndarray:
    """Where documents begin: their BOS (the tokenizer's; padding, 0 too, is never one)."""
    return (batch["inputs"] == tokenizer.bos_id) & (batch["segment_ids"] > 0)


def too_few_documents(data: DataConfig) -> str:
    """Why no document is held out of a single source that holds them out by rule, when it holds fewer documents
    than come before the first held-out one (a corpus of one long line, say); "" otherwise."""
    if data.mixture or data.path is not None or data.tfds is not None or data.hf is not None:
        return ""
    first = (data.eval_every_nth_doc - 1) * data.eval_block + 1
    count = sum(1 for _ in itertools.islice(one_pass_documents(data, "train"), first))
    if count >= first:
        return ""
    kind = ("line of JSONL" if data.jsonl is not None else "record" if data.array_record is not None
            else "row" if data.parquet is not None else "line of text")
    more = "give more documents, or " if data.eval_every_nth_doc > MIN_EVAL_EVERY_NTH_DOC or data.eval_block > 1 else ""
    return (f"the training data holds only {count:,} document{'s' if count != 1 else ''} (each {kind} is one) "
            f"and document {first:,} would be the first held out: {more}")


def how_to_hold_out_more(data: DataConfig) -> str:
    """The keys that make the configured sources' held-out sets larger."""
    sources = data.mixture or [data]
    ways = []
    if any(s.path is None and s.tfds is None for s in sources):  # held out by rule (an hf dataset may be)
        n, block = data.eval_every_nth_doc, data.eval_block
        keys = [*([f"data.eval_every_nth_doc (now {n})"] if n > MIN_EVAL_EVERY_NTH_DOC else []),
                *([f"data.eval_block (now {block}: held-out documents come in runs of it, the first after "
                   f"{(n - 1) * block:,} documents)"] if block > 1 else [])]
        ways.append(f"hold out more with a smaller {' or '.join(keys)}" if keys else
                    f"give more documents (data.eval_every_nth_doc={n}, its least, already holds out every other one)")
    if any(s.path is not None for s in sources):
        ways.append("prepare data.path again with a smaller --validation-every-nth")
    if any(s.tfds is not None or s.hf is not None for s in sources):
        ways.append("name a larger held-out split in the data.mixture entry's eval_split" if data.mixture
                    else f"name a larger held-out split in data.eval_split (now {data.eval_split!r})")
    return " or ".join(ways)


def eval_batches(data: DataConfig, tokenizer: Tokenizer, max_batches: int, shard: Shard) -> list[dict[str, np.ndarray]]:
    """This process's rows of the held-out batches: every process packs the same global batches and keeps its rows."""
    held_out = held_out_set(data, tokenizer, max_batches)
    rest = "every held-out document" if held_out.whole else (
        f"a fixed sample of the held-out documents; train.eval_batches={max_batches} batches take no more")
    log.info("held-out: %d documents, %d tokens in %d batches, each document once: %s", held_out.documents,
             held_out.tokens, len(held_out.batches), rest)
    rows = process_rows(data.batch_size, shard)
    return [{name: field[rows] for name, field in batch.items()} for batch in held_out.batches]


def build_lm_data(cfg: Config, run_dir: pathlib.Path, shard: Shard | None = None) -> LMData:
    """`shard` (default: this JAX process) picks which rows of each global batch are read here."""
    shard = shard or this_process()
    tokenizer = prepare_tokenizer(cfg, run_dir)
    check_holds_one_batch(cfg.data, tokenizer)
    # Held-out batches first: the training stream's worker processes then know which files' skipped
    # lines this process has reported already (see corpus.warn_once).
    held_out = eval_batches(cfg.data, tokenizer, cfg.train.eval_batches, shard)
    return LMData(tokenizer=tokenizer, train=train_batches(cfg.data, tokenizer, shard), eval=held_out)
