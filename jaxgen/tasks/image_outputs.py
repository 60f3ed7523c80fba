"""What the image families share: the inputs a run records, grids written to the run and its trackers,
and `jaxgen sample`'s arrays."""

from __future__ import annotations

import io
import logging
import pathlib
import shutil

import jax
import numpy as np

from jaxgen.config import Config
from jaxgen.data.image_data import ImageData
from jaxgen.data.images import ImageSet
from jaxgen.diffusion.grid import image_grid, save_png
from jaxgen.errors import CheckpointError, ConfigError, UsageError
from jaxgen.files import nearest_existing, write_output
from jaxgen.metrics import tensorboardx

log = logging.getLogger("jaxgen")


def image_inputs(data: ImageData) -> dict:
    return {"images": data.source.name}


def check_image_inputs(saved: dict, current: dict) -> None:
    if saved.get("images") != current.get("images"):
        raise CheckpointError(f"the checkpoint was trained on {saved.get('images')}, but this run reads "
                              f"{current.get('images')}; resume with the checkpoint's images")


def check_sample_fits(count: int, image_shape: tuple[int, ...], asked: str, options: dict | None = None) -> None:
    """Refuse, before the model is read, a `jaxgen sample` grid of `count` images of `image_shape` (H, W, C) that
    this host cannot hold: they are drawn in batches, but kept whole for the grid and the arrays. `asked` names
    the options that ask for them. The `--out` and `--save-array` files of `options` must have room on their
    disks too: found full only once drawn, the images were lost."""
    from jaxgen.device_memory import host_available_bytes, human_bytes

    # The float32 images in one array, their [0, 1] copy for --save-array, and the grid.
    pixels = int(np.prod(image_shape))
    per_image = pixels * (4 + 4 + 1)
    limit = host_available_bytes()
    if count * per_image > limit:
        raise UsageError(f"{asked} asks for {count:,} images, about {human_bytes(count * per_image)} held at once "
                         f"for the grid, more than the {human_bytes(limit)} this host has available (room for at "
                         f"most {limit // per_image:,})")
    # At most: the grid's 8-bit pixels (PNG compresses them) and the arrays' float32 ones, with room for headers.
    sizes = {"out": count * pixels * 2 + 2**12, "save_array": count * pixels * 4 + 2**12}
    for name, size in sizes.items():
        path = (options or {}).get(name)
        if path is None:
            continue
        free = shutil.disk_usage(nearest_existing(pathlib.Path(path).parent)).free
        if size > free:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} {str(path)!r}: {asked} takes up to {human_bytes(size)} there, and its disk has "
                             f"{human_bytes(free)} free; free space or write it elsewhere")


def draw_progress(cfg: Config, what: str) -> str | None:
    """The name of a progress bar over a draw's batches (None: no bar), as `logging.progress_bar` asks."""
    return what if jax.process_index() == 0 and cfg.logging.progress_bar else None


def grid_name(step: int | None) -> str:
    return "final.png" if step is None else f"step_{step:07d}.png"


def write_training_grid(cfg: Config, images_NHWC: np.ndarray, rows: int, run_dir: pathlib.Path,
                        step: int | None, tag: str = "samples") -> str:
    """RUN_DIR/samples/<step>.png and the TensorBoard image (process 0 writes; every process computed)."""
    path = run_dir / "samples" / grid_name(step)
    if jax.process_index() != 0:
        return str(path)
    if not np.isfinite(images_NHWC).all():  # a picture of progress, not a reason to stop the run
        log.warning("the samples of %s hold NaN or infinite values (drawn black in %s)",
                    "the end" if step is None else f"step {step}", path)
    picture = image_grid(images_NHWC, rows=rows, finite_only=False)
    save_png(picture, path)
    if cfg.logging.tensorboard:
        with tensorboardx().SummaryWriter(str(run_dir / "tensorboard")) as tb:
            tb.add_image(tag, picture, cfg.train.steps if step is None else step, dataformats="HWC")
    return str(path)


def to_unit_range(images_NHWC: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 1], grey images without their channel axis (as image files and viewers hold them)."""
    unit = np.clip((np.asarray(images_NHWC) + 1) / 2, 0, 1).astype(np.float32)
    return unit[..., 0] if unit.shape[-1] == 1 else unit


def save_arrays(path: str, **arrays: np.ndarray) -> str:
    """An .npz of `arrays`, written atomically (with the command's other outputs: `written_together`)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_output(path, buffer.getvalue())
    return str(path)


def requested_labels(labels: list[int] | None, n_classes: int) -> list[int]:
    """`jaxgen sample --labels`, checked against the model's classes; None = every class."""
    labels = list(range(n_classes)) if labels is None else labels
    if not labels or any(not 0 <= label < n_classes for label in labels):
        raise ConfigError(f"--labels {','.join(map(str, labels))}: each label must be in 0..{n_classes - 1} "
                          f"(model.num_classes={n_classes})")
    return labels


def quality_images(cfg: Config, held_out: ImageSet) -> ImageSet:
    """The held-out images sample quality is measured on: the first images.quality_images."""
    n = cfg.images.quality_images
    return held_out if len(held_out) <= n else ImageSet(held_out.images[:n], held_out.labels[:n])
