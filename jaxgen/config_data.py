"""The `data:` section: where a text run's documents come from (one source, or a weighted mixture) and
how they are tokenized, packed and held out."""

from __future__ import annotations

import math
from typing import Literal

import pydantic
from pydantic import Field

from jaxgen.config_section import MAX_SEED
from jaxgen.config_section import Section as _Section

SOURCE_KINDS = ("path", "tfds", "array_record", "text", "jsonl", "parquet", "hf")
MIN_EVAL_EVERY_NTH_DOC = 2  # every other document held out: any more would leave none to train on


class _SourceFields(_Section):
    """Where documents come from: set at most one kind (none = the bundled King James Bible)."""

    # A dataset directory written by `jaxgen data prepare` (its train/validation splits).
    path: str | None = None
    # A TFDS dataset by name ("lm1b", "name/config:1.0.0"), already prepared in tfds_data_dir.
    tfds: str | None = None
    # TFDS data directory; null = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    tfds_data_dir: str | None = None
    # Globs (.gz accepted): ArrayRecord files of UTF-8 documents; text files, one document per
    # non-empty line; JSONL files, one document per line in its `field`.
    array_record: str | None = None
    text: str | None = None
    jsonl: str | None = None
    # A glob of Parquet files (local, or a URI pyarrow reads: gs://, s3://, ...); documents
    # are the `field` column.
    parquet: str | None = None
    # A Hugging Face dataset: a save_to_disk directory, a folder of Parquet/JSON/CSV/Arrow
    # files, or a name datasets.load_dataset finds (cache or Hub); needs the `hf` extra.
    hf: str | None = None
    # The configuration of an hf dataset that has several (load_dataset's second argument).
    hf_config: str | None = None
    # The document field of JSONL lines, of TFDS / prepared records and the column of
    # Parquet files and hf datasets.
    field: str = "text"
    # Split names, for the sources that have splits (path, tfds, hf); the others, and an hf
    # dataset whose only split is train_split, hold out documents by data.eval_every_nth_doc
    # and data.eval_block instead.
    train_split: str = "train"
    eval_split: str = "validation"

    # Where this source's settings sit in the config: "data." or, for a mixture entry, "data.mixture[i]."
    _place: str = pydantic.PrivateAttr("data.")

    @property
    def kinds(self) -> list[str]:
        return [kind for kind in SOURCE_KINDS if getattr(self, kind) is not None]

    def key(self, name: str) -> str:
        """The config key of this source's setting `name`, as a message names it (`data.mixture[1].field`)."""
        return f"{self._place}{name}"

    @pydantic.field_validator(*SOURCE_KINDS, "tfds_data_dir", "hf_config", "field", "train_split", "eval_split")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; give a value or leave the key out")
        return value


class SourceConfig(_SourceFields):
    """One component of data.mixture."""

    # Relative share of documents drawn from this source.
    weight: float = Field(1.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _exactly_one_kind(self) -> SourceConfig:
        if len(self.kinds) != 1:
            raise ValueError(f"each data.mixture entry needs exactly one of {', '.join(SOURCE_KINDS)}; got {self.kinds or 'none'}")
        return self


class DataConfig(_SourceFields):
    # Several weighted sources instead of the single one above.
    mixture: list[SourceConfig] = Field(default_factory=list)
    # A sentencepiece .model, a Hugging Face tokenizer.json (its BOS/EOS from the
    # tokenizer_config.json beside it), or a directory keeping one (a run or an import);
    # null = the prepared dataset's own, else train one on the training documents.
    tokenizer: str | None = None
    seq_len: int = Field(128, gt=0)
    # Global batch (all devices, all processes), in sequences.
    batch_size: int = Field(32, gt=0)
    # Reader streams that make up each global batch, each reading its own share of the data
    # into batch_size/streams rows. Fixed here rather than by the process count, so step N
    # trains on the same batch on any number of processes (which must divide it) and a run
    # resumes on another process count. null = the largest of 8, 4, 2, 1 dividing batch_size.
    streams: int | None = Field(None, gt=0)
    # For sources without splits: one document in n goes to the held-out split, in blocks of
    # eval_block consecutive documents (every n-th block); smaller n holds out more. Evaluation
    # packs held-out documents, each once, in a fixed shuffled order, into at most
    # train.eval_batches batches. A held-out split smaller than one batch is refused.
    # `jaxgen data prepare` chooses its validation split by the same rule and defaults.
    eval_every_nth_doc: int = Field(50, ge=MIN_EVAL_EVERY_NTH_DOC)
    # Held-out documents come in runs of this many, so that few sit next to training documents
    # that continue them (a passage's verses, a site's pages); 1 = every n-th document.
    eval_block: int = Field(10, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # Text and JSONL sources (the bundled corpus too) whose files take at most this many MiB on
    # disk are read into memory once, in every process and worker (.gz files take several times
    # their size), and then shuffled whole every epoch, as random-access sources (path, tfds,
    # array_record, parquet, hf) are. Larger ones are streamed; 0 streams every one.
    index_max_mb: float = Field(256, ge=0)
    # Streamed sources are read in 64 KiB pieces of their files (a .gz file whole, from its start)
    # in a new random order every epoch, 16 pieces at a time, then shuffled within windows of this
    # many documents. A larger window mixes documents from more places, but each reader stream
    # holds a window of documents in memory and reads one before its first batch and on resume.
    shuffle_window: int = Field(10_000, gt=0)
    # Worker processes that tokenize and pack, at most the CPU cores the trainer may use;
    # 0 = a background thread in the trainer.
    workers: int = Field(0, ge=0)
    # Batches made ahead, per worker.
    prefetch: int = Field(4, gt=0)
    # A document that is not valid UTF-8 is skipped (with a counted warning) or fails the run.
    invalid_utf8: Literal["skip", "error"] = "skip"
    # Supervised pairs for an encoder-decoder (model.kind encoder_decoder): each line of data.jsonl
    # holds the encoder's input in input_field and the decoder's target in target_field.
    input_field: str | None = None
    target_field: str | None = None
    # An encoder-decoder's decoder rows (targets), in tokens; data.seq_len is its encoder rows.
    target_len: int = Field(64, gt=0)

    @property
    def reader_streams(self) -> int:
        return self.streams if self.streams is not None else math.gcd(self.batch_size, 8)

    @pydantic.model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.batch_size % self.reader_streams:
            raise ValueError(f"data.batch_size={self.batch_size} must be a multiple of data.streams="
                             f"{self.reader_streams}{' (the default for this batch size)' if self.streams is None else ''}")
        if len(self.kinds) > 1:
            raise ValueError(f"set only one data source, got {', '.join(f'data.{k}' for k in self.kinds)}")
        if self.kinds and self.mixture:
            raise ValueError(f"data.{self.kinds[0]} and data.mixture are exclusive; put every source in data.mixture")
        for index, source in enumerate(self.mixture):
            source._place = f"data.mixture[{index}]."
        return self
