"""The built-in labelled image datasets for diffusion models, and the configured image source.

Each is an `ImageSource` (image_source.py) of uint8 records. Built in:
`digits`: the 1,797 8x8 grey handwritten digits bundled with scikit-learn
(4-bit intensities 0..16, kept exact); every n-th image is held out.
`shapes`: procedural 32x32 RGB pictures of six shapes in random colours,
positions and sizes, drawn with anti-aliased edges; a seed fixes the set.
TFDS datasets come from tfds_images.py, image folders from folder_images.py,
MNIST-format IDX files from idx_images.py and latent datasets (float records) from
latent_dataset.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxgen.config import Config
from jaxgen.data.image_source import ImageSource
from jaxgen.data.pipeline import RandomAccessSource
from jaxgen.data.splits import HeldOutView, HoldOut, Part
from jaxgen.errors import ConfigError

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "diamond")
DIGIT_LEVELS = 16  # sklearn's digits count ink in 0..16


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images already scaled for the model, in memory (sample-quality figures need them all at once)."""

    images: np.ndarray  # (N, H, W, C) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)


def to_model_range(pixels: np.ndarray, white: int) -> np.ndarray:
    """uint8 pixels in 0..white -> float32 in [-1, 1]."""
    return pixels.astype(np.float32) / white * 2.0 - 1.0


class InMemoryRecords:
    """Random access to in-memory images and labels as records."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.images[i], "label": self.labels[i]}


def held_out_parts(records: RandomAccessSource, every_nth: int) -> dict[Part, RandomAccessSource]:
    """Deterministic (train, held-out) parts of a source without splits: every n-th record is held out."""
    return {part: HeldOutView(records, HoldOut(every_nth, part)) for part in ("train", "eval")}


def digits_records() -> InMemoryRecords:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return InMemoryRecords(bunch.images.astype(np.uint8)[..., None], bunch.target.astype(np.int32))


def shape_coverage(kind: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Fraction of each pixel inside the shape, from a signed distance (pixels) with a one-pixel ramp."""
    if kind == "circle":
        sdf = np.hypot(dx, dy) - r
    elif kind == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    elif kind == "diamond":
        sdf = (np.abs(dx) + np.abs(dy)) / np.sqrt(2) - 0.75 * r
    elif kind == "ring":
        sdf = np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.25 * r
    elif kind == "cross":
        bar = 0.3 * r
        sdf = np.minimum(np.maximum(np.abs(dx) - r, np.abs(dy) - bar), np.maximum(np.abs(dx) - bar, np.abs(dy) - r))
    else:  # triangle pointing up: intersection of three half-planes
        k = np.sqrt(3.0)
        edges = (dy - 0.5 * r, (-k * dx - dy) / 2 - 0.5 * r, (k * dx - dy) / 2 - 0.5 * r)
        sdf = np.maximum.reduce(edges)
    return np.clip(0.5 - sdf, 0.0, 1.0)


def make_shapes(n: int, seed: int = 0, size: int = 32) -> InMemoryRecords:
    """`n` pictures, classes in turn; colours, centres, sizes and backgrounds drawn from `seed`."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % len(SHAPE_CLASSES)).astype(np.int32)
    r = rng.uniform(0.18, 0.32, n) * size
    cx, cy = rng.uniform(0.0, 1.0, (2, n)) * (size - 2 * r) + r  # the whole shape inside the frame
    fg = rng.uniform(0.35, 1.0, (n, 3))
    bg = rng.uniform(0.0, 0.3, (n, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    images = np.empty((n, size, size, 3), np.uint8)
    for label, kind in enumerate(SHAPE_CLASSES):
        idx = np.flatnonzero(labels == label)
        dx, dy = xx[None] - cx[idx, None, None], yy[None] - cy[idx, None, None]
        cover = shape_coverage(kind, dx, dy, r[idx, None, None])[..., None]
        images[idx] = np.round(255 * (cover * fg[idx, None, None, :] + (1 - cover) * bg[idx, None, None, :]))
    return InMemoryRecords(images, labels)


def open_images(cfg: Config, model=None) -> ImageSource:
    """The configured image source; a TFDS dataset is checked against the model before anything is read
    (and TFDS is imported only then). `model`: the config of the model the images are read for, when it is not
    `cfg.model` (a latent DiT reads images of its autoencoder's size)."""
    images, model = cfg.images, model or cfg.model
    if images.source == "none":
        raise ConfigError(f"images.source=none: this run names no images of its {model.image_size}x"
                          f"{model.image_size}x{model.channels} size; give them with images.source=folder "
                          "images.folder=DIR, images.source=idx images.idx=DIR or images.source=tfds images.tfds=NAME")
    if images.source == "tfds":
        from jaxgen.data.tfds_images import open_tfds_images

        return open_tfds_images(images, model)
    if images.source == "folder":
        from jaxgen.data.folder_images import open_folder_images

        return open_folder_images(images, model)
    if images.source == "idx":
        from jaxgen.data.idx_images import open_idx_images

        return open_idx_images(images, model)
    if images.source == "latents":
        from jaxgen.data.latent_dataset import open_latent_images

        return open_latent_images(images, model)
    smaller_nth = f"hold out more with a smaller images.eval_every_nth (now {images.eval_every_nth})"
    if images.source == "digits":
        parts = held_out_parts(digits_records(), images.eval_every_nth)
        return ImageSource("digits", parts, smaller_nth, white=DIGIT_LEVELS, read_threads=0)
    parts = held_out_parts(make_shapes(images.shapes_count, cfg.data.seed), images.eval_every_nth)
    return ImageSource("shapes", parts, f"{smaller_nth} or draw more with images.shapes_count "
                                        f"(now {images.shapes_count})", read_threads=0)
