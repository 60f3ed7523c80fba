"""Reads shapes back from images of the captioned shapes set (data/synth_shapes.py) and scores prompt adherence.

Analytic, by analysis through synthesis, so it needs no training and knows no more than the renderer:
- foreground: pixels whose largest channel differs from the background by more than FOREGROUND;
  objects: its 4-connected components, largest first, ignoring specks under MIN_AREA of the smallest shape;
- colour: the nearest palette colour to the mean of a component's core (pixels at least CORE of its
  strongest); coverage: each pixel's projection onto (colour - background), so anti-aliased and blurred
  edges count by how much of the shape they hold;
- position: the coverage-weighted centroid (every kind's centroid is its centre);
- kind and size together: the renderer's (kind, size) template, centred there, nearest in squared
  coverage difference. Blur keeps a shape's mass and centroid, so a blurry sample is judged by the
  template it still resembles most rather than refused;
- relation: the axis along which the two centres differ more, and the sign on it.
A prompt's shapes are matched to the largest detections, two of them in the order agreeing with more of
their kinds, colours and sizes. Chance is measured, not assumed: the same readings scored against the
prompts of other images (`adherence(...)["chance"]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import scipy.ndimage

from jaxgen.data.images import shape_coverage
from jaxgen.data.synth_shapes import BACKGROUND, COLOURS, KINDS, SIZES, Prompt, parse_caption

FOREGROUND = 80.0  # largest channel difference from the background (0..255) of a pixel at least half covered
CORE = 0.8
MIN_AREA = 0.3  # of the smallest shape's area
ATTRIBUTES = ("count", "kind", "colour", "size", "relation", "prompt")


@dataclasses.dataclass(frozen=True)
class Seen:
    """One shape read from an image; x, y: its centre, fractions of the side from the left and top."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    area: float  # covered pixels


def as_pixels(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 as is, or floats in the model's [-1, 1], as float64 in 0..255."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"shape images must be (N, H, W, 3), not {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float64)
    return np.clip((images.astype(np.float64) + 1) * 127.5, 0, 255)


def _templates(size: int) -> tuple[list[tuple[str, str]], float]:
    """The (kind, size) pairs templates are drawn for, and the smallest shape's area in pixels."""
    pairs = [(kind, name) for kind in KINDS for name in SIZES]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    smallest = min(shape_coverage(kind, xx, yy, SIZES[name] * size).sum() for kind, name in pairs)
    return pairs, float(smallest)


def read_image(pixels_HWC: np.ndarray, pairs: list[tuple[str, str]], smallest: float) -> list[Seen]:
    """The shapes in one image (float 0..255), largest first."""
    size = pixels_HWC.shape[0]
    background, palette = np.asarray(BACKGROUND, np.float64), np.asarray(list(COLOURS.values()), np.float64)
    diff_HWC = pixels_HWC - background
    strength_HW = np.abs(diff_HWC).max(-1)
    labels_HW, n = scipy.ndimage.label(strength_HW > FOREGROUND)
    if n == 0:
        return []
    areas = np.bincount(labels_HW.ravel(), minlength=n + 1)[1:]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    seen = []
    for label in np.flatnonzero(areas >= MIN_AREA * smallest) + 1:
        mask_HW = labels_HW == label
        core_HW = mask_HW & (strength_HW >= CORE * strength_HW[mask_HW].max())
        colour = diff_HWC[core_HW].mean(0)
        nearest = int(np.argmin(((palette - background - colour) ** 2).sum(-1)))
        # the component and its anti-aliased rim, but none of another component's pixels
        region_HW = scipy.ndimage.binary_dilation(mask_HW, iterations=2) & ((labels_HW == 0) | mask_HW)
        cover_HW = np.where(region_HW, np.clip(diff_HWC @ colour / (colour @ colour), 0, 1), 0.0)
        mass = cover_HW.sum()
        cx, cy = (cover_HW * xx).sum() / mass, (cover_HW * yy).sum() / mass
        errors = [((cover_HW - shape_coverage(kind, xx - cx, yy - cy, SIZES[name] * size)) ** 2).sum()
                  for kind, name in pairs]
        kind, name = pairs[int(np.argmin(errors))]
        seen.append(Seen(kind, list(COLOURS)[nearest], name, cx / size, cy / size, float(mass)))
    return sorted(seen, key=lambda s: -s.area)


def read_images(images: np.ndarray) -> list[list[Seen]]:
    """The shapes in each of (N, H, W, 3) images (uint8, or floats in [-1, 1])."""
    pixels = as_pixels(images)
    pairs, smallest = _templates(pixels.shape[1])
    return [read_image(image, pairs, smallest) for image in pixels]


def relation_between(a: Seen, b: Seen) -> str:
    """Where `a` is relative to `b`, along the axis their centres differ more on."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def score(seen: list[Seen], prompt: Prompt) -> dict:
    """Per-shape kind/colour/size correctness (lists, in the prompt's order), count, relation (None without one)
    and whole-prompt correctness of one image's readings against what its prompt asked."""
    wanted = prompt.shapes
    candidates = seen[:len(wanted)]
    if len(candidates) == 2:
        swapped = candidates[::-1]
        if _agreement(swapped, wanted) > _agreement(candidates, wanted):
            candidates = swapped
    matched = list(candidates) + [None] * (len(wanted) - len(candidates))
    result = {attribute: [s is not None and getattr(s, attribute) == getattr(w, attribute)
                          for s, w in zip(matched, wanted)] for attribute in ("kind", "colour", "size")}
    result["count"] = len(seen) == len(wanted)
    result["relation"] = None if prompt.relation is None else (
        None not in matched and relation_between(*matched) == prompt.relation)
    result["prompt"] = (result["count"] and all(all(result[a]) for a in ("kind", "colour", "size"))
                        and result["relation"] is not False)
    return result


def _agreement(seen: Sequence[Seen], wanted: Sequence) -> int:
    return sum(getattr(s, a) == getattr(w, a) for s, w in zip(seen, wanted) for a in ("kind", "colour", "size"))


def check(images: np.ndarray, requested: Sequence[Prompt | str]) -> list[dict]:
    """Per image, what `score` says of its shapes against its requested prompt (or caption)."""
    prompts = [parse_caption(p) if isinstance(p, str) else p for p in requested]
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return [score(seen, prompt) for seen, prompt in zip(read_images(images), prompts)]


def summarise(scores: list[dict]) -> dict[str, float]:
    """Accuracy of each attribute: kind, colour and size over requested shapes; count and prompt over images;
    relation over images whose prompt has one (nan when none has)."""
    summary = {}
    for attribute in ATTRIBUTES:
        values = [v for s in scores for v in (s[attribute] if isinstance(s[attribute], list) else [s[attribute]])
                  if v is not None]
        summary[attribute] = float(np.mean(values)) if values else float("nan")
    return summary


def adherence(images: np.ndarray, requested: Sequence[Prompt | str], seed: int = 0) -> dict:
    """Per-attribute and whole-prompt accuracy, and under "chance" the same with each image scored against another
    image's prompt (a random derangement from `seed`): what images that ignore their prompts would score."""
    prompts = [parse_caption(p) if isinstance(p, str) else p for p in requested]
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    readings = read_images(images)
    order = np.random.default_rng(seed).permutation(len(prompts))
    others = [None] * len(prompts)
    for i, j in zip(order, np.roll(order, -1)):  # image i gets the prompt of image j != i
        others[i] = prompts[j]
    return {**summarise([score(s, p) for s, p in zip(readings, prompts)]), "images": len(prompts),
            "chance": summarise([score(s, p) for s, p in zip(readings, others)])}
