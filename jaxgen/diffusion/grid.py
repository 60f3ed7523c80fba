"""Sample grids: images in [-1, 1] laid out one row per class, as PNG files people look at."""

from __future__ import annotations

import io
import pathlib

import numpy as np

from jaxgen.files import write_atomic


def image_grid(images_NHWC: np.ndarray, rows: int, min_cell: int = 32, gap: int = 1) -> np.ndarray:
    """(rows x cols) images -> one uint8 (H', W', 3) picture, each image enlarged to at least `min_cell` pixels."""
    n, h, w, c = images_NHWC.shape
    cols = n // rows
    zoom = max(1, -(-min_cell // h))
    pixels = np.round((np.clip(images_NHWC, -1, 1) + 1) * 127.5).astype(np.uint8)
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    pixels = pixels.repeat(zoom, axis=1).repeat(zoom, axis=2)
    ch, cw = h * zoom + gap, w * zoom + gap
    grid = np.full((rows * ch + gap, cols * cw + gap, 3), 255, np.uint8)
    for i in range(rows * cols):
        r, col = divmod(i, cols)
        grid[gap + r * ch: (r + 1) * ch, gap + col * cw: (col + 1) * cw] = pixels[i]
    return grid


def save_png(picture: np.ndarray, path: pathlib.Path) -> None:
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    matplotlib.image.imsave(png, picture, format="png")
    write_atomic(path, png.getvalue())
