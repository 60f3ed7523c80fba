"""What a diffusion task reads: the configured images as a training stream and fixed held-out batches."""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np

from jaxgen.config import Config
from jaxgen.data.image_batches import CaptionTokens, held_out_batches, image_set, train_batches
from jaxgen.data.images import ImageSet, ImageSource, open_images
from jaxgen.data.pipeline import BatchIterator, this_process
from jaxgen.errors import DataError

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


def build_image_data(cfg: Config, caption_tokens: CaptionTokens | None = None, image_model=None) -> ImageData:
    """This process's share of the configured images (checked against the model, or `image_model`, before
    anything is read); with `caption_tokens`, batches also carry each image's caption as tokens."""
    source = open_images(cfg, image_model)
    log.info("data: %s, %d train and %d held-out images", source.name, source.size("train"), source.size("eval"))
    if caption_tokens is not None and not source.has_captions and source.uncaptioned:
        raise DataError(f"conditioning.by=text needs a caption for every image, but {source.uncaptioned}; give each "
                        f"line a caption (images.caption_key={cfg.images.caption_key!r})")
    if caption_tokens is not None and not source.has_captions:
        raise DataError(f"conditioning.by=text needs captions, but {source.name} has none; give images with a "
                        f"caption column (images.caption_key={cfg.images.caption_key!r} in metadata.jsonl)")
    shard = this_process()
    return ImageData(train=train_batches(source, cfg, shard, caption_tokens),
                     eval=held_out_batches(source, cfg.data.batch_size, cfg.train.eval_batches, shard, caption_tokens),
                     source=source)
