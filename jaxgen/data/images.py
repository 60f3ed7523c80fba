"""In-memory image sources for diffusion models: labelled images in [-1, 1], NHWC.

`digits`: the 1,797 8x8 grey handwritten digits bundled with scikit-learn.
`shapes`: procedural 32x32 RGB pictures of six shapes in random colours,
positions and sizes, drawn with anti-aliased edges; a seed fixes the set.
Training batches are a pure function of (seed, batch number), so they are the
same on any number of processes and resuming needs only the counter.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxgen.data.pipeline import process_rows, this_process

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross", "diamond")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, H, W, C) float32 in [-1, 1]
    labels: np.ndarray  # (N,) int32
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names)


def load_digits() -> ImageSet:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values are 0..16
    return ImageSet(images[..., None], bunch.target.astype(np.int32), tuple(str(d) for d in range(10)))


def _shape_coverage(kind: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
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


def make_shapes(n: int, seed: int = 0, size: int = 32) -> ImageSet:
    """`n` pictures, classes in turn; colours, centres, sizes and backgrounds drawn from `seed`."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % len(SHAPE_CLASSES)).astype(np.int32)
    r = rng.uniform(0.18, 0.32, n) * size
    cx, cy = rng.uniform(0.0, 1.0, (2, n)) * (size - 2 * r) + r  # the whole shape inside the frame
    fg = rng.uniform(0.35, 1.0, (n, 3))
    bg = rng.uniform(0.0, 0.3, (n, 3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    images = np.empty((n, size, size, 3), np.float32)
    for label, kind in enumerate(SHAPE_CLASSES):
        idx = np.flatnonzero(labels == label)
        dx, dy = xx[None] - cx[idx, None, None], yy[None] - cy[idx, None, None]
        cover = _shape_coverage(kind, dx, dy, r[idx, None, None])[..., None]
        images[idx] = cover * fg[idx, None, None, :] + (1 - cover) * bg[idx, None, None, :]
    return ImageSet(images * 2.0 - 1.0, labels, SHAPE_CLASSES)


def load_images(source: str, seed: int, shapes_count: int) -> ImageSet:
    return load_digits() if source == "digits" else make_shapes(shapes_count, seed)


def split_images(images: ImageSet, every_nth: int) -> tuple[ImageSet, ImageSet]:
    """Deterministic (train, held-out) split: every n-th image is held out."""
    held = np.arange(len(images)) % every_nth == every_nth - 1
    return images.subset(np.flatnonzero(~held)), images.subset(np.flatnonzero(held))


class RandomImageBatches:
    """Infinite training batches of images drawn with replacement, optionally mirrored left-right."""

    def __init__(self, images: ImageSet, global_batch: int, seed: int, hflip: bool):
        self.images, self.global_batch, self.seed, self.hflip = images, global_batch, seed, hflip
        self.rows = process_rows(global_batch, this_process())
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        index = rng.integers(0, len(self.images), self.global_batch)[self.rows]
        flip = (rng.random(self.global_batch) < 0.5)[self.rows] if self.hflip else np.zeros(len(index), bool)
        self.step += 1
        x = self.images.images[index]
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
        return {"images": x, "labels": self.images.labels[index]}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def fixed_batches(images: ImageSet, global_batch: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """The first n_batches x global_batch held-out images (wrapping round a small split), this process's rows."""
    index = np.arange(n_batches * global_batch) % len(images)
    rows = process_rows(global_batch, this_process())
    return [
        {"images": images.images[b][rows], "labels": images.labels[b][rows]}
        for b in index.reshape(n_batches, global_batch)
    ]
