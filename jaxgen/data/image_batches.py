"""Image records -> model batches: {'images': float32 (B, H, W, C) in [-1, 1], 'labels': int32 (B,)}.

Training batches come from the grain pipeline: each reader stream's share of
the train records -> shuffle every epoch -> scale -> random mirror -> batch;
the streams this process holds side by side -> prefetch. The mirror is drawn
from (seed, stream, record position), so a restored pipeline continues with
exactly the same batches, on any process count. Held-out batches hold the
held-out records in order, each once, in at most train.eval_batches batches;
they carry `weights` (float32 (B,)), 0 on the rows that pad the last one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import grain
import numpy as np

from jaxgen.config import Config
from jaxgen.data.image_source import ImageSource
from jaxgen.data.images import ImageSet, to_model_range
from jaxgen.data.pipeline import GrainBatches, padded, process_rows, record_stream, stream_batches
from jaxgen.data.splits import Part, Shard
from jaxgen.errors import DataError

log = logging.getLogger("jaxgen")


# A caption -> (token ids (L,) int32, mask of real tokens (L,) bool), all captions one length L.
CaptionTokens = Callable[[str], tuple[np.ndarray, np.ndarray]]


class ModelInput(grain.transforms.Map):
    """A source record -> {'images': float32 (H, W, C) in [-1, 1], 'labels': int32}; records of float
    values (latents, `white` None) pass through as they are. With `caption_tokens`, the record's caption
    also becomes 'caption_ids' and 'caption_mask'."""

    def __init__(self, source: ImageSource, caption_tokens: CaptionTokens | None = None):
        self.image_key, self.label_key, self.white = source.image_key, source.label_key, source.white
        self.caption_key, self.caption_tokens = source.caption_key, caption_tokens

    def map(self, record: dict) -> dict[str, np.ndarray]:
        pixels = np.asarray(record[self.image_key])
        images = pixels.astype(np.float32) if self.white is None else to_model_range(pixels, self.white)
        example = {"images": images, "labels": np.int32(record[self.label_key])}
        if self.caption_tokens is not None:
            example["caption_ids"], example["caption_mask"] = self.caption_tokens(str(record[self.caption_key]))
        return example


class RandomMirror(grain.transforms.RandomMap):
    """Mirror left-right with probability 1/2."""

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if rng.random() < 0.5:
            return {**example, "images": example["images"][:, ::-1]}
        return example


def train_batches(source: ImageSource, cfg: Config, shard: Shard,
                  caption_tokens: CaptionTokens | None = None) -> GrainBatches:
    """This process's rows of every global training batch, endless and resumable."""
    transforms = [ModelInput(source, caption_tokens), *([RandomMirror()] if cfg.images.hflip else [])]
    streams = cfg.data.reader_streams

    def stream(reader: Shard) -> grain.IterDataset:
        return record_stream(source.records("train", reader, cfg.data.seed), cfg.data.batch_size // streams, reader,
                             seed=cfg.data.seed, transforms=transforms)

    return stream_batches(stream, cfg.data.batch_size, streams, shard, workers=cfg.data.workers,
                          prefetch=cfg.data.prefetch)


def part_examples(source: ImageSource, part: Part, limit: int | None = None,
                  caption_tokens: CaptionTokens | None = None) -> dict[str, np.ndarray]:
    """The records of a part once, in order (at most `limit`), stacked as model input."""
    to_input = ModelInput(source, caption_tokens)
    examples = [to_input.map(r) for r in itertools.islice(source.records(part, Shard(), None, epochs=1), limit)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def held_out_images(source: ImageSource, global_batch: int, max_batches: int,
                    caption_tokens: CaptionTokens | None = None) -> list[dict[str, np.ndarray]]:
    """Global held-out batches: the held-out records in order, each once, the last batch padded with
    zero-weight rows; at most `max_batches` of them. A held-out part smaller than a batch is refused."""
    if source.size("eval") < global_batch:
        raise DataError(f"the held-out part of {source.name} holds {source.size('eval')} images, fewer than one "
                        f"batch of data.batch_size={global_batch}; {source.larger_held_out}")
    examples = part_examples(source, "eval", max_batches * global_batch, caption_tokens)
    n = len(examples["labels"])
    weights = np.ones(n, np.float32)
    batches = []
    for start in range(0, n, global_batch):
        rows = {**{key: field[start:start + global_batch] for key, field in examples.items()},
                "weights": weights[start:start + global_batch]}
        batches.append(padded(rows, global_batch))
    return batches


def held_out_batches(source: ImageSource, global_batch: int, max_batches: int, shard: Shard,
                     caption_tokens: CaptionTokens | None = None) -> list[dict[str, np.ndarray]]:
    """This process's rows of the held-out batches: every process reads the same global batches and keeps its rows."""
    batches = held_out_images(source, global_batch, max_batches, caption_tokens)
    used, held_out = int(sum(batch["weights"].sum() for batch in batches)), source.size("eval")
    rest = "every held-out image" if used == held_out else (
        f"the first {used} of {held_out}; train.eval_batches={max_batches} batches take no more")
    log.info("held-out: %d images in %d batches, each image once: %s", used, len(batches), rest)
    rows = process_rows(global_batch, shard)
    return [{key: field[rows] for key, field in batch.items()} for batch in batches]


def image_set(source: ImageSource, part: Part) -> ImageSet:
    """A whole part in memory (small datasets only: sample-quality figures)."""
    examples = part_examples(source, part)
    return ImageSet(examples["images"], examples["labels"])
