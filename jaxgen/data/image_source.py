"""What a labelled image dataset hands the training pipeline, whatever stores it.

A source gives records {'image': uint8 (H, W, C), 'label': int} of a train and a
held-out part; image_batches.py shuffles, shards, scales and flips them. The
built-in datasets come from images.py, TFDS ones from tfds_images.py.
"""

from __future__ import annotations

import dataclasses

import grain

from jaxgen.data.pipeline import RandomAccessSource, record_epochs
from jaxgen.data.splits import Part, Shard


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """One labelled image dataset: random access to its train and held-out records."""

    name: str  # for logs and errors
    parts: dict[Part, RandomAccessSource]
    # How a user makes the held-out part larger, for the error that refuses one smaller than a batch.
    larger_held_out: str = "give a larger held-out split"
    white: int | None = 255  # the pixel value of full intensity; None: float records (latents) used as they are
    image_key: str = "image"
    label_key: str = "label"
    caption_key: str = "caption"  # where records carry a caption, if they do
    # Each part's captions in record order, where the records have captions: checks, reports and
    # evaluation read them without decoding images.
    part_captions: dict[Part, tuple[str, ...]] | None = None
    # Where some records lack the captions others have (a file's line, how many), to say so when captions are needed.
    uncaptioned: str | None = None
    # Threads reading records ahead: None = grain's default (files); records in memory need none.
    read_threads: int | None = None

    @property
    def has_captions(self) -> bool:
        return self.part_captions is not None

    def size(self, part: Part) -> int:
        return len(self.parts[part])

    def records(self, part: Part, shard: Shard, seed: int | None, epochs: int | None = None) -> grain.IterDataset:
        """This reader's records of a part for `epochs` passes (None: endless); shuffled every epoch when
        seeded, else in order."""
        options = None if self.read_threads is None else grain.ReadOptions(num_threads=self.read_threads)
        records = record_epochs(self.parts[part], shard, seed, f"the {part} part of {self.name}", epochs)
        return records.to_iter_dataset(options)
