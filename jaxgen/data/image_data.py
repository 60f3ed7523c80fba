"""What a diffusion task reads: the configured images as a training stream and fixed held-out batches."""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from jaxgen.config import Config
from jaxgen.data.image_batches import held_out_batches, image_set, train_batches
from jaxgen.data.images import ImageSet, ImageSource, open_images
from jaxgen.data.pipeline import BatchIterator, this_process

log = logging.getLogger("jaxgen")


@dataclasses.dataclass
class ImageData:
    train: BatchIterator  # host-local batches, resumable
    eval: list[dict[str, np.ndarray]]  # fixed held-out batches, host-local
    source: ImageSource

    @functools.cached_property
    def train_set(self) -> ImageSet:
        return image_set(self.source, "train")

    @functools.cached_property
    def held_out(self) -> ImageSet:
        return image_set(self.source, "eval")


def build_image_data(cfg: Config) -> ImageData:
    """This process's share of the configured images (checked against the model before anything is read)."""
    source = open_images(cfg)
    log.info("data: %s, %d train and %d held-out images", source.name, source.size("train"), source.size("eval"))
    shard = this_process()
    return ImageData(train=train_batches(source, cfg, shard),
                     eval=held_out_batches(source, cfg.data.batch_size, cfg.train.eval_batches, shard),
                     source=source)
