"""MNIST-format IDX files (`images.source: idx`): MNIST, Fashion-MNIST, KMNIST and the like.

A directory holds the four files of the original distribution, gzipped or not:
`train-images-idx3-ubyte`, `train-labels-idx1-ubyte` and the same with `t10k-` for the
held-out part. The Debian package `dataset-fashion-mnist` installs Fashion-MNIST in
`/usr/share/datasets/fashion-mnist`. An IDX file is a big-endian header (two zero bytes,
a type code, the number of dimensions, each dimension as uint32) and the values; only
unsigned bytes (type 0x08) hold images and labels. The images are small enough to hold.
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from jaxgen.config import DiTConfig, ImagesConfig
from jaxgen.data.image_source import ImageSource
from jaxgen.data.images import InMemoryRecords
from jaxgen.errors import ConfigError, DataError

UNSIGNED_BYTE = 0x08
PARTS = {"train": "train", "eval": "t10k"}


def read_idx(path: pathlib.Path) -> np.ndarray:
    """The uint8 array an IDX file holds (gzipped or not); a damaged file is refused naming it."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:  # a truncated or garbled .gz
        raise DataError(f"IDX file {str(path)!r} cannot be read: {err}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DataError(f"{str(path)!r} is not an IDX file (it must start with two zero bytes, a type code and "
                        "the number of dimensions)")
    kind, ndim = raw[2], raw[3]
    if kind != UNSIGNED_BYTE:
        raise DataError(f"IDX file {str(path)!r} holds values of type 0x{kind:02x}; images and labels are "
                        f"unsigned bytes (0x{UNSIGNED_BYTE:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} ends inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"IDX file {str(path)!r} holds {len(raw) - header} values after its header, but its "
                        f"shape {shape} needs {expected} (a truncated or padded file)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"images.idx {str(directory)!r} has no {stem} (or {stem}.gz); an IDX dataset directory holds "
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                    "t10k-labels-idx1-ubyte")


def idx_part(directory: pathlib.Path, prefix: str) -> InMemoryRecords:
    image_path, label_path = idx_file(directory, f"{prefix}-images-idx3-ubyte"), idx_file(
        directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{str(image_path)!r} and {str(label_path)!r} hold arrays of shapes {images.shape} and "
                        f"{labels.shape}; images are (count, height, width) and labels (count,)")
    if len(images) != len(labels):
        raise DataError(f"{str(image_path)!r} holds {len(images)} images but {str(label_path)!r} "
                        f"{len(labels)} labels")
    return InMemoryRecords(images[..., None], labels.astype(np.int32))


def _label_gap(parts: dict[str, InMemoryRecords], classes: int) -> str:
    """Where labels 0..classes-1 do not all occur, the record of the largest: more likely a damaged label
    (one 42 among labels 0..9) than a dataset of that many classes, which the advice would follow."""
    used = np.unique(np.concatenate([part.labels for part in parts.values()]))
    if len(used) == classes:
        return ""
    part, records = next((name, part) for name, part in parts.items() if (part.labels == classes - 1).any())
    index = int(np.argmax(records.labels == classes - 1))
    return (f" (but only {len(used)} of labels 0..{classes - 1} occur: label {classes - 1} of record {index} of the "
            f"{PARTS[part]} labels may be damaged)")


def open_idx_images(images: ImagesConfig, model: DiTConfig) -> ImageSource:
    """The train and t10k parts of `images.idx`, checked against the model."""
    directory = pathlib.Path(images.idx)
    if not directory.is_dir():
        raise DataError(f"images.idx {images.idx!r} is not a directory; give the directory holding the IDX files "
                        "(Fashion-MNIST: apt-get install dataset-fashion-mnist, then "
                        "images.idx=/usr/share/datasets/fashion-mnist)")
    parts = {part: idx_part(directory, prefix) for part, prefix in PARTS.items()}
    side = parts["train"].images.shape[1:3]
    classes = int(max(p.labels.max() for p in parts.values())) + 1
    found = (side[0], side[1], 1, classes)
    if parts["eval"].images.shape[1:3] != side:
        raise DataError(f"images.idx {images.idx!r}: train images are {side[0]}x{side[1]} but t10k images "
                        f"{parts['eval'].images.shape[1]}x{parts['eval'].images.shape[2]}")
    model_classes = getattr(model, "num_classes", classes)  # an autoencoder has no classes to match
    if found != (model.image_size, model.image_size, model.channels, model_classes):
        raise ConfigError(f"images.idx {images.idx!r} holds {side[0]}x{side[1]}x1 images in {classes} classes, but "
                          f"model.image_size={model.image_size}, model.channels={model.channels}, "
                          f"model.num_classes={model_classes}; set model.image_size={side[0]}, "
                          f"model.channels=1, model.num_classes={classes}{_label_gap(parts, classes)}")
    return ImageSource(directory.name, parts, "the held-out part is the t10k files; add images to them",
                       read_threads=0)
