"""Sample quality for diffusion models: the image-quality sample report (jaxgen.quality.image_quality), logged."""

from __future__ import annotations

import logging

import numpy as np

from jaxgen.data.images import ImageSet
from jaxgen.quality.image_quality import sample_report

log = logging.getLogger("jaxgen")


def sample_quality(samples: np.ndarray, labels: np.ndarray, train: ImageSet, held_out: ImageSet,
                   guidance_scale: float) -> dict:
    """Score samples drawn for the held-out labels (one per held-out image) at `guidance_scale` against the real
    images; the log line names the scale, as a run evaluated at several logs one line for each."""
    figures = sample_report(samples, labels, train, held_out)
    log.info("sample quality at guidance scale %g: %s", guidance_scale, {k: round(v, 4) for k, v in figures.items()})
    return figures
