"""Image samples from a diffusion checkpoint: a PNG grid (one row per label) and optionally the arrays."""

from __future__ import annotations

import io
import pathlib

import numpy as np

from jaxgen.diffusion.grid import image_grid, save_png
from jaxgen.errors import ConfigError
from jaxgen.files import write_atomic
from jaxgen.runs import open_run
from jaxgen.train.tasks import make_task


def sample_images(run_dir: str | pathlib.Path, labels: list[int] | None, num_per_label: int, *,
                  guidance: float | None = None,
                  sampler: str | None = None, steps: int | None = None, seed: int = 0,
                  out: str | pathlib.Path | None = None, save_array: str | pathlib.Path | None = None,
                  step: int | None = None, overrides: list[str] = ()) -> dict:
    """Sample `num_per_label` images per label (None: every class); returns where they went."""
    overrides = [*overrides, *([f"diffusion.sampler={sampler}"] if sampler else []),
                 *([f"diffusion.sample_steps={steps}"] if steps else [])]
    run = open_run(run_dir, step, overrides)
    n_classes = run.cfg.model.num_classes
    labels = list(range(n_classes)) if labels is None else labels
    bad = [label for label in labels if not 0 <= label < n_classes]
    if bad or not labels:
        raise ConfigError(f"--labels {','.join(map(str, labels))}: each label must be in 0..{n_classes - 1} "
                          f"(model.num_classes={n_classes})")
    task = make_task(run.cfg)
    labels_N = np.repeat(np.asarray(labels, np.int32), num_per_label)
    scale = run.cfg.diffusion.guidance_scale if guidance is None else guidance
    images_NHWC = task.generate(run.training.layout.graphdef, run.params, labels_N, seed, scale)
    out = pathlib.Path(out) if out else pathlib.Path(run_dir) / "samples" / f"sample_step{run.step}.png"
    save_png(image_grid(images_NHWC, rows=len(labels)), out)
    result = {"grid": str(out), "step": run.step, "labels": labels, "num_per_label": num_per_label, "guidance": scale}
    if save_array:
        unit = np.clip((images_NHWC + 1) / 2, 0, 1).astype(np.float32)
        arrays = io.BytesIO()
        np.savez(arrays, images=unit[..., 0] if unit.shape[-1] == 1 else unit, labels=labels_N)
        write_atomic(save_array, arrays.getvalue())
        result["array"] = str(save_array)
    return result
