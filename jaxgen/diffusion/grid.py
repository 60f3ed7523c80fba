"""Sample grids: images in [-1, 1] laid out one row per class, as PNG files people look at.

A grid stays a picture viewers open: a class with many images wraps onto several rows, and what does not fit
in `MAX_GRID_SIDE` pixels a side is left out (with a warning; `jaxgen sample --save-array` keeps every image).
"""

from __future__ import annotations

import io
import logging
import pathlib

import numpy as np

from jaxgen.errors import NonFiniteError
from jaxgen.files import write_output

log = logging.getLogger("jaxgen")

# 8192 pixels a side (67M pixels) is within Pillow's decompression-bomb limit (89M pixels, which it refuses to
# open at twice that) and the texture size of common image viewers.
MAX_GRID_SIDE = 8192


def image_grid(images_NHWC: np.ndarray, rows: int, min_cell: int = 32, gap: int = 1, max_side: int = MAX_GRID_SIDE,
               finite_only: bool = True) -> np.ndarray:
    """`rows` groups (classes) of images, in order -> one uint8 (H', W', 3) picture, each image enlarged to at least
    `min_cell` pixels. A group wider than `max_side` wraps onto several rows (the groups then set apart by a wider
    gap); groups or images that would not fit in `max_side` high are left out, with a warning. `finite_only`:
    images holding NaN or infinity are refused (NonFiniteError) rather than drawn (NaN black)."""
    n, h, w, c = images_NHWC.shape
    per = n // rows
    bad = int(np.sum(~np.isfinite(images_NHWC).reshape(n, -1).all(axis=1)))
    if bad and finite_only:
        raise NonFiniteError(f"{bad} of the {n} images drawn hold NaN or infinite values: the model, or its sampler "
                             "with these settings, diverged (for a DiT, try a smaller --guidance or another --steps "
                             "or --sampler); nothing was written")
    zoom = max(1, -(-min_cell // h))
    ch, cw = h * zoom + gap, w * zoom + gap
    cols = max(1, min(per, (max_side - gap) // cw))

    def height(groups: int, lines: int) -> int:
        spacer = ch // 4 if lines > 1 else 0  # sets wrapped groups apart
        return groups * (lines * ch + spacer) - spacer + gap

    lines = -(-per // cols)  # rows of the picture each group takes
    while lines > 1 and height(rows, lines) > max_side:  # fewer images of every group rather than fewer groups
        lines -= 1
    groups = rows
    while groups > 1 and height(groups, lines) > max_side:
        groups -= 1
    shown = min(per, lines * cols)
    if groups < rows or shown < per:
        fewer_rows = f", and only the first {groups:,} of its {rows:,} rows" if groups < rows else ""
        log.warning("the grid shows %s of the %s images of each row%s (a picture of at most %d pixels a side stays "
                    "viewable); --save-array keeps them all", f"{shown:,}", f"{per:,}", fewer_rows, max_side)
    drawn = images_NHWC.reshape(rows, per, h, w, c)[:groups, :shown]
    pixels = np.round((np.clip(np.nan_to_num(drawn, nan=-1.0), -1, 1) + 1) * 127.5).astype(np.uint8)
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    spacer = ch // 4 if lines > 1 else 0
    grid = np.full((height(groups, lines), cols * cw + gap, 3), 255, np.uint8)
    for g in range(groups):
        for k in range(shown):
            line, col = divmod(k, cols)
            top, left = gap + g * (lines * ch + spacer) + line * ch, gap + col * cw
            grid[top: top + ch - gap, left: left + cw - gap] = pixels[g, k].repeat(zoom, 0).repeat(zoom, 1)
    return grid


def save_png(picture: np.ndarray, path: pathlib.Path) -> None:
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    matplotlib.image.imsave(png, picture, format="png")
    write_output(path, png.getvalue())
