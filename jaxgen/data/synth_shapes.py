"""Captioned procedural shapes for text-to-image models: one or two shapes on a dark background.

A scene is one shape, or two shapes and the relation of the first to the second; its caption
says so compositionally: "a small red circle", "a small red circle above a large blue square".
- kinds: circle, square, triangle, cross (the cross is the one concave kind, so no two kinds
  blur into each other at 32 px); colours: red, green, blue, yellow, magenta, white, near corners
  of the RGB cube, at least 170 apart and 190 from the background; sizes: small and large (radius
  0.11 and 0.18 of the side).
- relations compare centres: "left of"/"right of" put the whole of one shape left of the
  other, with the vertical offset at most half the horizontal one ("above"/"below" likewise),
  so the relation is never a matter of pixels. A lone shape has no position word: it may be
  anywhere, and its caption names only what it is.
- held-out combinations (`HELD_OUT`): green triangle, blue circle, yellow square, red cross,
  one per kind and per colour, so training sees every kind and colour, but never these pairs.
  The training split holds no scene with one; every held-out scene holds at least one.

Shapes never overlap (their boxes are apart by a gap on the relation's axis) and lie wholly
inside the image. Positions are fractions of the side, so a scene renders alike at any size;
edges are anti-aliased by the signed-distance ramp the built-in `shapes` source uses.
Scene `index` of a split depends only on (seed, split, index).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from jaxgen.data.images import shape_coverage
from jaxgen.errors import DataError
from jaxgen.files import building, nearest_existing
from jaxgen.progress import progress_bar

KINDS = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (235, 215, 40),
           "magenta": (220, 50, 220), "white": (235, 235, 235)}
SIZES = {"small": 0.11, "large": 0.18}  # radius as a fraction of the side; every kind fits the box of half-side r
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (16, 16, 20)
HELD_OUT = frozenset({("green", "triangle"), ("blue", "circle"), ("yellow", "square"), ("red", "cross")})
SPLITS = ("train", "test")  # test: the held-out combinations
MIN_SIZE = 32  # a small triangle is about 7 px across at 32
MAX_SIZE = 4096
ROOM_SAMPLES = 8  # scenes encoded to estimate a dataset's size on disk
TWO_SHAPES = 0.5  # chance a scene has two shapes
# Between two shapes' boxes and from a box to the border, fractions of the side: 2 px at 32, as the
# anti-aliasing ramp reaches up to a pixel beyond a box (at the triangle's apex).
GAP = MARGIN = 2 / 32


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a caption asks for of one shape."""

    kind: str
    colour: str
    size: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A caption's content: one shape, or two and the relation of the first to the second."""

    shapes: tuple[Shape, ...]
    relation: str | None = None

    def caption(self) -> str:
        if self.relation is None:
            return self.shapes[0].words()
        return f"{self.shapes[0].words()} {self.relation} {self.shapes[1].words()}"


@dataclasses.dataclass(frozen=True)
class Scene:
    prompt: Prompt
    centres: tuple[tuple[float, float], ...]  # (x from the left, y from the top) per shape, fractions of the side


def holds_held_out(prompt: Prompt) -> bool:
    """Whether any shape of the prompt is a held-out (colour, kind) pair."""
    return any((shape.colour, shape.kind) in HELD_OUT for shape in prompt.shapes)


def parse_caption(caption: str) -> Prompt:
    """The prompt a caption of this dataset states; anything else is refused naming the caption."""
    words = caption.strip().lower().split()
    for relation in RELATIONS:
        n = len(relation.split())
        if len(words) == 8 + n and " ".join(words[4:4 + n]) == relation:
            return Prompt((_shape(words[:4], caption), _shape(words[4 + n:], caption)), relation)
    return Prompt((_shape(words, caption),))


def _shape(words: list[str], caption: str) -> Shape:
    if len(words) != 4 or words[0] != "a" or words[1] not in SIZES or words[2] not in COLOURS or words[3] not in KINDS:
        raise DataError(f"caption {caption!r} is not 'a SIZE COLOUR KIND' optionally followed by a relation "
                        f"({', '.join(RELATIONS)}) and another; sizes {'/'.join(SIZES)}, colours "
                        f"{'/'.join(COLOURS)}, kinds {'/'.join(KINDS)}")
    return Shape(kind=words[3], colour=words[2], size=words[1])


def draw_scene(seed: int, split: str, index: int) -> Scene:
    """Scene `index` of a split: its shapes, relation and centres, from (seed, split, index) alone."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    pairs = sorted(HELD_OUT) if split == "test" else [(c, k) for c in COLOURS for k in KINDS if (c, k) not in HELD_OUT]
    first = _draw_shape(rng, pairs)
    if rng.random() >= TWO_SHAPES:
        return Scene(Prompt((first,)), (_draw_centre(rng, SIZES[first.size]),))
    everything = [(c, k) for c in COLOURS for k in KINDS]
    second = first
    while second == first:  # two identical shapes would make the caption ambiguous
        second = _draw_shape(rng, everything if split == "test" else pairs)
    shapes = (first, second) if rng.random() < 0.5 else (second, first)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    return Scene(Prompt(shapes, relation), _draw_pair_centres(rng, relation, *(SIZES[s.size] for s in shapes)))


def _draw_shape(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> Shape:
    colour, kind = pairs[rng.integers(len(pairs))]
    return Shape(kind=kind, colour=colour, size=list(SIZES)[rng.integers(len(SIZES))])


def _draw_centre(rng: np.random.Generator, r: float) -> tuple[float, float]:
    lo, hi = r + MARGIN, 1 - r - MARGIN
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _draw_pair_centres(rng: np.random.Generator, relation: str, r_a: float,
                       r_b: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres with the first shape `relation` the second: apart along the relation's axis, near on the other."""
    lower_first = relation in ("left of", "above")  # the first shape has the smaller coordinate on the axis
    r_lo, r_hi = (r_a, r_b) if lower_first else (r_b, r_a)
    lo, hi = r_lo + MARGIN, 1 - r_hi - MARGIN
    need = r_lo + r_hi + GAP
    major_lo = float(rng.uniform(lo, hi - need))
    major_hi = float(rng.uniform(major_lo + need, hi))
    apart = major_hi - major_lo
    minor_lo = float(rng.uniform(r_lo + MARGIN, 1 - r_lo - MARGIN))
    minor_hi = float(rng.uniform(max(r_hi + MARGIN, minor_lo - apart / 2), min(1 - r_hi - MARGIN, minor_lo + apart / 2)))
    lo_centre, hi_centre = (major_lo, minor_lo), (major_hi, minor_hi)
    if relation in ("above", "below"):  # the axis is y: swap to (x, y)
        lo_centre, hi_centre = lo_centre[::-1], hi_centre[::-1]
    return (lo_centre, hi_centre) if lower_first else (hi_centre, lo_centre)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as uint8 (size, size, 3) pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    image = np.broadcast_to(np.asarray(BACKGROUND, np.float64), (size, size, 3))
    for shape, (x, y) in zip(scene.prompt.shapes, scene.centres):
        cover = shape_coverage(shape.kind, xx - x * size, yy - y * size, SIZES[shape.size] * size)[..., None]
        image = cover * np.asarray(COLOURS[shape.colour]) + (1 - cover) * image
    return np.round(image).astype(np.uint8)


def metadata_row(scene: Scene, file_name: str) -> dict:
    """One metadata.jsonl line: the file, caption (`text`), label (the first shape's kind, index into KINDS),
    and each shape's attributes and centre."""
    shapes = [{**dataclasses.asdict(shape), "x": round(x, 5), "y": round(y, 5)}
              for shape, (x, y) in zip(scene.prompt.shapes, scene.centres)]
    return {"file_name": file_name, "text": scene.prompt.caption(), "label": KINDS.index(scene.prompt.shapes[0].kind),
            "objects": shapes, "relation": scene.prompt.relation}


def split_counts(count: int, held_out_fraction: float) -> dict[str, int]:
    held_out = min(count - 1, max(1, round(count * held_out_fraction)))
    return {"train": count - held_out, "test": held_out}


def check_room(out: pathlib.Path, count: int, seed: int, size: int) -> None:
    """Refuse, before any is drawn, `count` scenes the disk under `out` cannot hold: each file takes at least a
    block, and a few scenes encoded here say how large one is."""
    import io

    from PIL import Image

    from jaxgen.device_memory import human_bytes

    place = nearest_existing(out)
    stats = os.statvfs(place)
    block = stats.f_frsize or 4096
    samples = [draw_scene(seed, "train", index) for index in range(min(count, ROOM_SAMPLES))]
    per_scene = 0
    for scene in samples:
        png = io.BytesIO()
        Image.fromarray(render(scene, size)).save(png, format="PNG")
        per_scene += -(-len(png.getvalue()) // block) * block + len(json.dumps(metadata_row(scene, "0.png"))) + 1
    per_scene = per_scene // len(samples)
    # Beyond the scenes: the folders (out, train/, test/) and the two metadata.jsonl files' last blocks, which the
    # scenes' lines were counted without.
    fixed = 5 * block
    free = stats.f_bavail * stats.f_frsize
    if fixed + count * per_scene > free:
        fits = max(free - fixed, 0) // per_scene
        raise DataError(f"--count {count:,} scenes of {size}x{size} px take about "
                        f"{human_bytes(fixed + count * per_scene)} on disk ({human_bytes(per_scene)} each), more than "
                        f"the {human_bytes(free)} free at {place}; "
                        + (f"give at most {fits:,}" if fits else "free space there, or give --out elsewhere"))


def write_shapes_folder(out: pathlib.Path, count: int, seed: int = 0, size: int = 32,
                        held_out_fraction: float = 0.1, progress: bool = False) -> dict:
    """`count` captioned scenes as an image folder (train/ and test/, PNGs and a metadata.jsonl each), built
    under a hidden name and renamed into place when complete; returns counts per split and the held-out pairs."""
    out = pathlib.Path(out)
    if count < 2:
        raise DataError(f"count={count}: the shapes dataset needs at least 2 scenes, one training and one held out")
    if size < MIN_SIZE:
        raise DataError(f"size={size}: shapes images must be at least {MIN_SIZE} px, or small shapes are unreadable")
    if size > MAX_SIZE:
        raise DataError(f"size={size}: shapes images are at most {MAX_SIZE} px (each is rendered whole in memory)")
    if not 0 < held_out_fraction < 1:
        raise DataError(f"held_out_fraction={held_out_fraction} must lie strictly between 0 and 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{str(out)!r} already exists and is not an empty directory; choose a new one or remove it")
    from PIL import Image

    counts = split_counts(count, held_out_fraction)
    check_room(out, count, seed, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with building(out) as tmp, progress_bar(total=count, unit="image", desc="shapes", leave=False,
                                            disable=not progress) as bar:
        for split, n in counts.items():
            (tmp / split).mkdir()
            with open(tmp / split / "metadata.jsonl", "w", encoding="utf-8") as metadata:
                for index in range(n):
                    scene = draw_scene(seed, split, index)
                    file_name = f"{index:06d}.png"
                    Image.fromarray(render(scene, size)).save(tmp / split / file_name)
                    metadata.write(json.dumps(metadata_row(scene, file_name)) + "\n")
                    bar.update()
    return {"out": str(out), "seed": seed, "size": size, **counts,
            "held_out": sorted(f"{colour} {kind}" for colour, kind in HELD_OUT)}
