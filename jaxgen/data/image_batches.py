"""Image records -> model batches: {'images': float32 (B, H, W, C) in [-1, 1], 'labels': int32 (B,)}.

Training batches come from the grain pipeline: each reader stream's share of
the train records -> shuffle every epoch -> scale -> random mirror -> batch;
the streams this process holds side by side -> prefetch. The mirror is drawn
from (seed, stream, record position), so a restored pipeline continues with
exactly the same batches, on any process count. Held-out batches are the
first held-out records in order, every time.
"""

from __future__ import annotations

import itertools

import grain
import numpy as np

from jaxgen.config import Config
from jaxgen.data.image_source import ImageSource
from jaxgen.data.images import ImageSet, to_model_range
from jaxgen.data.pipeline import GrainBatches, process_rows, record_stream, stream_batches
from jaxgen.data.splits import Part, Shard


class ModelInput(grain.transforms.Map):
    """A source record -> {'images': float32 (H, W, C) in [-1, 1], 'labels': int32}."""

    def __init__(self, source: ImageSource):
        self.image_key, self.label_key, self.white = source.image_key, source.label_key, source.white

    def map(self, record: dict) -> dict[str, np.ndarray]:
        return {"images": to_model_range(np.asarray(record[self.image_key]), self.white),
                "labels": np.int32(record[self.label_key])}


class RandomMirror(grain.transforms.RandomMap):
    """Mirror left-right with probability 1/2."""

    def random_map(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if rng.random() < 0.5:
            return {**example, "images": example["images"][:, ::-1]}
        return example


def train_batches(source: ImageSource, cfg: Config, shard: Shard) -> GrainBatches:
    """This process's rows of every global training batch, endless and resumable."""
    transforms = [ModelInput(source), *([RandomMirror()] if cfg.images.hflip else [])]
    streams = cfg.data.reader_streams

    def stream(reader: Shard) -> grain.IterDataset:
        return record_stream(source.records("train", reader, cfg.data.seed), cfg.data.batch_size // streams, reader,
                             seed=cfg.data.seed, transforms=transforms)

    return stream_batches(stream, cfg.data.batch_size, streams, shard, workers=cfg.data.workers,
                          prefetch=cfg.data.prefetch)


def first_examples(source: ImageSource, part: Part, n: int) -> dict[str, np.ndarray]:
    """The first `n` records of a part in order (wrapping round a small part), stacked as model input."""
    to_input = ModelInput(source)
    examples = [to_input.map(r) for r in itertools.islice(source.records(part, Shard(), None), n)]
    return {key: np.stack([e[key] for e in examples]) for key in ("images", "labels")}


def held_out_batches(source: ImageSource, global_batch: int, n_batches: int, shard: Shard) -> list[dict[str, np.ndarray]]:
    """Fixed held-out batches: every process reads the same global batches and keeps its rows."""
    examples = first_examples(source, "eval", n_batches * global_batch)
    rows = process_rows(global_batch, shard)
    return [{key: field[b * global_batch:(b + 1) * global_batch][rows] for key, field in examples.items()}
            for b in range(n_batches)]


def image_set(source: ImageSource, part: Part) -> ImageSet:
    """A whole part in memory (small datasets only: sample-quality figures)."""
    examples = first_examples(source, part, source.size(part))
    return ImageSet(examples["images"], examples["labels"])
