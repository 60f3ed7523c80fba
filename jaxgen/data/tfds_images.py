"""TFDS image datasets (`images.source: tfds`): uint8 images and class labels by name.

The dataset's feature spec says what its images are, so the model config is
checked against it as soon as the builder is open, before any record is read.
ArrayRecord datasets are read by random access (no TensorFlow); TFRecord ones
are streamed through TensorFlow (the `tf` extra), shuffled within a buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from jaxgen.config import DiTConfig, ImagesConfig
from jaxgen.data.image_source import ImageSource
from jaxgen.data.splits import Part, Shard
from jaxgen.data.tfds_builders import description, open_builder, open_split, split_size
from jaxgen.data.tfrecord import TfdsTfRecordStream
from jaxgen.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class TfRecordImages(ImageSource):
    """A TFDS image dataset stored as TFRecord, which can only be read in order."""

    data_dir: str | None = None
    splits: dict[Part, str] = dataclasses.field(default_factory=dict)
    sizes: dict[Part, int] = dataclasses.field(default_factory=dict)

    def size(self, part: Part) -> int:
        return self.sizes[part]

    def records(self, part: Part, shard: Shard, seed: int | None, epochs: int | None = None) -> grain.IterDataset:
        return TfdsTfRecordStream(self.name, self.data_dir, self.splits[part], shard, seed, epochs)


def check_features(features: Any, images: ImagesConfig, model: DiTConfig, what: str) -> None:
    """The image and label features exist, hold square uint8 images and class labels, and fit the model."""
    import tensorflow_datasets as tfds

    for key, field in ((images.image_key, "image_key"), (images.label_key, "label_key")):
        if key not in features:
            raise DataError(f"{what} has no feature {key!r} (images.{field}); its features: {sorted(features.keys())}")
    image, label = features[images.image_key], features[images.label_key]
    shape, dtype = tuple(image.shape), np.dtype(image.np_dtype)
    if len(shape) != 3 or dtype != np.uint8:
        raise DataError(f"{what} feature {images.image_key!r} holds {dtype} values of shape {shape}, "
                        "not uint8 images (height, width, channels)")
    height, width, channels = shape
    if height is None or height != width:
        raise DataError(f"{what} holds {height or 'any'}x{width or 'any'} images, but the model takes square "
                        f"images of model.image_size={model.image_size}; the dataset's images must be square")
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"{what} feature {images.label_key!r} is {type(label).__name__}, not ClassLabel, "
                        "so its number of classes is unknown")
    found = (height, channels, label.num_classes)
    model_classes = getattr(model, "num_classes", label.num_classes)  # an autoencoder has no classes to match
    if found != (model.image_size, model.channels, model_classes):
        raise ConfigError(f"{what} holds {height}x{width}x{channels} images in {label.num_classes} classes, but "
                          f"model.image_size={model.image_size}, model.channels={model.channels}, "
                          f"model.num_classes={model_classes}; set model.image_size={height}, "
                          f"model.channels={channels}, model.num_classes={label.num_classes}")


def open_tfds_images(images: ImagesConfig, model: DiTConfig) -> ImageSource:
    what = description("images.tfds", images.tfds, images.tfds_data_dir)
    builder = open_builder("images.tfds", images.tfds, images.tfds_data_dir)
    check_features(builder.info.features, images, model, what)
    splits: dict[Part, str] = {"train": images.train_split, "eval": images.eval_split}
    parts = {part: open_split(builder, split, f"{what} (images.{part}_split)") for part, split in splits.items()}
    keys = {"image_key": images.image_key, "label_key": images.label_key,
            "larger_held_out": f"name a larger held-out split in images.eval_split (now {images.eval_split!r})"}
    if all(records is not None for records in parts.values()):
        return ImageSource(images.tfds, parts, **keys)
    sizes = {part: split_size(builder, split, what) for part, split in splits.items()}
    return TfRecordImages(images.tfds, {}, **keys, data_dir=images.tfds_data_dir, splits=splits, sizes=sizes)
