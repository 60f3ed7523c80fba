"""Fashion-MNIST with captions, as an image folder: `jaxgen data fashion-captions --idx DIR --out DIR`.

Each image's caption names its class and two attributes read from its pixels,
so captions compose more than the ten labels: the shade of the garment (the
mean intensity of its ink, cut at the training images' terciles: "dark",
"mid-grey", "light") and its width (the share of columns its ink spans, cut at
the training median of its own class: "narrow", "wide"), e.g. "a light wide
ankle boot". train/ and test/ come from the IDX train and t10k files, with a
metadata.jsonl (file_name, text, label, shade, width) each, as Hugging Face's
imagefolder reads them. Built under a hidden name and renamed into place when
complete.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxgen.data.idx_images import PARTS, idx_part
from jaxgen.errors import DataError
from jaxgen.files import building
from jaxgen.progress import progress_bar

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
SHADES = ("dark", "mid-grey", "light")
WIDTHS = ("narrow", "wide")
INK = 25  # pixel value above which a pixel is the garment's


def shade_and_width(images_NHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the mean intensity of its ink, and the share of columns holding ink."""
    ink = images_NHW > INK
    shade = (images_NHW * ink).sum((1, 2)) / np.maximum(ink.sum((1, 2)), 1)
    width = ink.any(1).mean(1)
    return shade, width


def captions(shade: np.ndarray, width: np.ndarray, labels: np.ndarray, shade_cuts: np.ndarray,
             width_cuts: np.ndarray) -> list[dict]:
    """Each image's caption and attributes, given the training cut points (shade terciles, per-class width medians)."""
    shades = np.searchsorted(shade_cuts, shade, side="right")
    wide = width > width_cuts[labels]
    return [{"text": f"a {SHADES[s]} {WIDTHS[int(w)]} {CLASSES[label]}", "label": int(label),
             "shade": SHADES[s], "width": WIDTHS[int(w)]} for s, w, label in zip(shades, wide, labels)]


def write_fashion_captions(idx: pathlib.Path, out: pathlib.Path) -> dict:
    from PIL import Image

    idx, out = pathlib.Path(idx), pathlib.Path(out)
    if not idx.is_dir():
        raise DataError(f"--idx {str(idx)!r} is not a directory; give the directory holding the Fashion-MNIST IDX "
                        "files (apt-get install dataset-fashion-mnist: /usr/share/datasets/fashion-mnist)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{str(out)!r} already exists and is not an empty directory; choose a new one or remove it")
    parts = {part: idx_part(idx, prefix) for part, prefix in PARTS.items()}
    train = parts["train"]
    if int(train.labels.max()) >= len(CLASSES):
        raise DataError(f"--idx {str(idx)!r} has labels up to {int(train.labels.max())}; Fashion-MNIST has "
                        f"{len(CLASSES)} classes")
    shade, width = shade_and_width(train.images[..., 0])
    shade_cuts = np.quantile(shade, [1 / 3, 2 / 3])
    width_cuts = np.asarray([np.median(width[train.labels == c]) for c in range(len(CLASSES))])
    counts, seen = {}, set()
    out.parent.mkdir(parents=True, exist_ok=True)
    with building(out) as tmp:
        for part, split in (("train", "train"), ("eval", "test")):
            records = parts[part]
            rows = captions(*shade_and_width(records.images[..., 0]), records.labels, shade_cuts, width_cuts)
            (tmp / split).mkdir()
            lines = []
            for i, row in enumerate(progress_bar(rows, desc=split, unit="image", mininterval=1.0)):
                name = f"{i:05d}.png"
                Image.fromarray(records.images[i, ..., 0]).save(tmp / split / name)
                lines.append(json.dumps({"file_name": name, **row}))
            (tmp / split / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[split] = len(rows)
            seen.update(row["text"] for row in rows)
    return {"out": str(out), **counts, "distinct_captions": len(seen)}
