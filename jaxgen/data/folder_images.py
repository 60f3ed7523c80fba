"""A folder of PNG/JPEG files (`images.source: folder`), in the layouts Hugging Face's `imagefolder` reads.

- Class sub-folders: `DIR/<class>/*.png`; labels number the class names in sorted order.
- `metadata.jsonl` beside the images: one JSON object per line with `file_name` (relative
  to the folder holding metadata.jsonl) and a label column (`images.label_key`, integers or
  names) and/or a caption column (`images.caption_key`).
  Integer labels must lie below `model.num_classes`, in the held-out part too.
- Either one inside `train/` and `test/` (or `validation/`) sub-folders: those are the two
  parts. Otherwise every `images.eval_every_nth` image is held out.

Images are decoded when read (Pillow), turned upright as their EXIF orientation says (a phone's
photo is stored sideways with a tag), converted to RGB or grey as `model.channels` says,
and with `images.resize` scaled so their shorter side is `model.image_size` and centre-cropped
to a square. An unreadable image fails naming its file, or with `images.bad_images: skip`
is replaced by the next readable one listed after it, with a warning naming it.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import re
import stat
import warnings
from typing import NamedTuple

import numpy as np

from jaxgen.config import DiTConfig, ImagesConfig
from jaxgen.data.corpus import warn_once
from jaxgen.data.image_source import ImageSource
from jaxgen.data.images import held_out_parts, to_model_range
from jaxgen.errors import ConfigError, DataError

log = logging.getLogger("jaxgen")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Images of other kinds a class sub-folder may hold: not read, but named, so that a folder of .webp files does not
# train on a fraction of its images without a word.
OTHER_IMAGE_SUFFIXES = (".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic")
METADATA = "metadata.jsonl"
EXIF_ORIENTATION = 0x0112
SPLITS = {"train": ("train",), "eval": ("test", "validation")}


class FolderImages:
    """Random access to decoded images of listed files: {'image': uint8 (S, S, C), 'label': int[, 'caption': str]}."""

    def __init__(self, files: list[pathlib.Path], labels: list[int], captions: list[str] | None, size: int,
                 channels: int, resize: bool, skip_bad: bool):
        self.files, self.labels, self.captions = files, labels, captions
        self.size, self.channels, self.resize, self.skip_bad = size, channels, resize, skip_bad

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        for tried in range(len(self.files)):
            i = (index + tried) % len(self.files)
            try:
                image = self.decode(self.files[i])
            except DataError as err:
                if not self.skip_bad:
                    raise
                warn_once(f"bad image {self.files[i]}", f"skipped: {err} (images.bad_images=skip)")  # each epoch
                continue
            record = {"image": image, "label": np.int32(self.labels[i])}
            return record if self.captions is None else {**record, "caption": self.captions[i]}
        where = os.path.commonpath([str(f.parent) for f in self.files])  # the folder over every class's
        raise DataError(f"none of the {len(self.files)} images under {where} can be read (images.bad_images=skip "
                        "passed over each one)")

    def decode(self, path: pathlib.Path) -> np.ndarray:
        opened = open_image(path)
        try:
            with opened:
                image = eight_bit(upright(opened)).convert("RGB" if self.channels == 3 else "L")
        except (OSError, ValueError) as err:  # truncated: found when the pixels are read
            raise DataError(f"image {str(path)!r} cannot be read: {err}") from None
        if image.size != (self.size, self.size):
            if not self.resize:
                raise DataError(f"image {str(path)!r} is {image.size[0]}x{image.size[1]}, not model.image_size="
                                f"{self.size} square; set images.resize=true to scale and centre-crop images")
            image = scaled_and_cropped(image, self.size)
        pixels = np.asarray(image, np.uint8)
        return pixels if pixels.ndim == 3 else pixels[..., None]


def open_image(path: str | pathlib.Path):
    """`path` opened by Pillow (its header read, the pixels not yet), or a DataError naming it.

    Images of more pixels than Pillow's decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) are refused from
    the header: Pillow refuses only twice that many and warns below, and decoding one (a 140 kB PNG can
    declare 12000 x 12000) in every reader ran the machine out of memory.
    """
    from PIL import Image, UnidentifiedImageError

    # Below twice the limit Pillow only warns, naming no file: such an image is refused below instead. Added
    # where missing (a caller's `catch_warnings` restores the filters), never again per image: each change
    # of the filters resets every module's record of warnings shown once, which then show again.
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
        if regular:  # a named pipe or a device would block the read for ever
            image = Image.open(path)
    except Image.DecompressionBombError as err:  # Pillow's words name neither the file nor what to do
        pixels = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(err))
        raise _too_large(path, int(pixels[1]) if pixels else None) from None
    except (OSError, UnidentifiedImageError, ValueError) as err:  # missing, not an image
        raise DataError(f"image {str(path)!r} cannot be read: {err}") from None
    if not regular:
        raise DataError(f"image {str(path)!r} is not a regular file (a pipe, device or folder); give image files")
    if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise _too_large(path, image.width * image.height, image.size)
    return image


def _too_large(path: str | pathlib.Path, pixels: int | None, size: tuple[int, int] | None = None) -> DataError:
    from PIL import Image

    shape = f"{size[0]}x{size[1]}, " if size else ""
    count = f"{pixels:,} pixels" if pixels else "too many pixels"
    return DataError(f"image {str(path)!r} is {shape}{count}, more than the {Image.MAX_IMAGE_PIXELS:,} Pillow "
                     "decodes safely (a guard against decompression bombs); scale it down first")


def upright(image):
    """`image` turned as its EXIF orientation tag says (what cameras and phones write instead of turning the
    pixels); as it is where it has none."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - an EXIF block Pillow cannot parse: the pixels as stored
        return image
    return image if orientation in (None, 1) else ImageOps.exif_transpose(image)


def eight_bit(image):
    """A 16-bit grey image (Pillow modes I;16*, and I as 16-bit PNGs open) scaled to 8 bits, value / 65535:
    Pillow's own conversion clips it at 255, so a full-range picture came out white. Others as they are."""
    from PIL import Image

    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image, np.float64)
    return Image.fromarray(np.round(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8), "L")


def read_image_files(files: list[str], size: int, channels: int, resize: bool = True) -> np.ndarray:
    """Image files decoded as the folder source decodes them, in the model's range: float32 (N, S, S, C) in [-1, 1]."""
    reader = FolderImages([pathlib.Path(f) for f in files], [0] * len(files), None, size, channels, resize, False)
    return np.stack([to_model_range(reader.decode(path), 255) for path in reader.files])


def scaled_and_cropped(image, size: int):
    """The shorter side scaled to `size` (antialiased), then the centre `size` x `size` square."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class Listing(NamedTuple):
    """One folder's images as metadata.jsonl or its class sub-folders list them, none yet decoded."""

    files: list[pathlib.Path]
    labels: list[int]
    captions: list[str] | None  # None unless every image has one
    classes: list[str]  # the class names its labels number, in label order
    uncaptioned: str | None = None  # where metadata.jsonl lacks captions, for the error that needs them


def listed_images(root: pathlib.Path, label_key: str, caption_key: str, classes: list[str] | None = None,
                  num_classes: int | None = None) -> Listing:
    """One folder's listing, from metadata.jsonl or class sub-folders.

    `classes`: names already numbered (the train part's), which the held-out part must use too.
    `num_classes`: the model's, which integer labels must lie below (None: labels are not the model's input).
    """
    if (root / METADATA).is_file():
        return _from_metadata(root, label_key, caption_key, classes, num_classes)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or names
    files, labels, others, empty = [], [], collections.Counter(), []
    for name in names:
        if name not in classes:
            raise DataError(f"class folder {str(root / name)!r} is not among the training classes "
                            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
        inside = [p for p in (root / name).rglob("*") if not hidden(p.relative_to(root / name))]
        found = sorted(p for p in inside if p.suffix.lower() in IMAGE_SUFFIXES)
        others.update(p.suffix.lower() for p in inside if p.suffix.lower() in OTHER_IMAGE_SUFFIXES)
        if not found:
            empty.append(name)
        files += found
        labels += [classes.index(name)] * len(found)
    if others:
        kinds = ", ".join(f"{count:,} {suffix}" for suffix, count in others.most_common())
        warn_once(f"{root} other image kinds", f"images.folder {root}: {kinds} files not read (only PNG and JPEG "
                                                "images are); convert them to PNG to train on them")
    if not files:
        loose = [p.name for p in root.iterdir()
                 if p.suffix.lower() in IMAGE_SUFFIXES and not hidden(pathlib.Path(p.name))][:3]
        hint = (f"; images lie in it directly ({', '.join(loose)}...): put them in class sub-folders or list them "
                f"in a {METADATA}") if loose else ""
        raise DataError(f"images.folder {str(root)!r} holds no PNG or JPEG images in class sub-folders{hint}")
    if empty and classes is names:  # a label learned from no image, and every later class's moved up by one
        raise DataError(f"class folder {str(root / empty[0])!r} holds no PNG or JPEG images, yet would be class "
                        f"{names.index(empty[0])} and number the classes after it; add images to it or remove it")
    return Listing(files, labels, None, classes)


def hidden(relative: pathlib.Path) -> bool:
    """Whether a path inside a class folder is hidden (a name starting with "."), or lies in a hidden folder: what
    a copy from a Mac leaves beside each image (`._0.png`, AppleDouble metadata, not an image), or `.thumbnails/`.
    Text globs pass them over too."""
    return any(part.startswith(".") for part in relative.parts)


def _metadata_rows(root: pathlib.Path, label_key: str, caption_key: str) -> list[tuple]:
    """(line number, file, label or None, caption or None) of each listed image."""
    path, inside = root / METADATA, root.resolve()
    rows = []
    with path.open("rb") as lines:  # decoded line by line, so that a bad byte is named by its line
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number} is not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}); save {METADATA} as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise DataError(f"{path}:{number} names no file: each line needs \"file_name\"")
            file = (root / row["file_name"]).resolve()
            if not file.is_relative_to(inside) or not file.is_file():
                raise DataError(f"{path}:{number} names {row['file_name']!r}, which is not a file inside {root}")
            if isinstance(row.get(caption_key), (dict, list, bool)):
                raise DataError(f"{path}:{number} has {caption_key!r} {row[caption_key]!r}; a caption is text")
            if label_key not in row and caption_key not in row:
                raise DataError(f"{path}:{number} has neither a label (images.label_key={label_key!r}) nor a caption "
                                f"(images.caption_key={caption_key!r})")
            rows.append((number, file, row.get(label_key), row.get(caption_key)))
    if not rows:
        raise DataError(f"{path} lists no images")
    return rows


def _from_metadata(root: pathlib.Path, label_key: str, caption_key: str, classes: list[str] | None,
                   num_classes: int | None) -> Listing:
    path, rows = root / METADATA, _metadata_rows(root, label_key, caption_key)
    files = [file for _, file, _, _ in rows]
    _warn_of_odd_listings(root, rows, caption_key)
    lacking = [number for number, _, _, caption in rows if caption is None]
    captions = None if lacking else [str(caption) for *_, caption in rows]
    uncaptioned = None if not lacking else (
        f"{path} gives no {caption_key!r} caption" if len(lacking) == len(rows) else
        f"{path}:{lacking[0]} has no {caption_key!r} caption ({len(lacking):,} of {len(rows):,} lines lack one)")
    given = [label for _, _, label, _ in rows]
    if all(label is None for label in given):
        return Listing(files, [0] * len(rows), captions, ["unlabelled"], uncaptioned)
    missing = next((number for number, _, label, _ in rows if label is None), None)
    if missing is not None:
        raise DataError(f"{path}:{missing} has no {label_key!r} though other lines have one")
    if all(isinstance(label, int) and not isinstance(label, bool) and label >= 0 for label in given):
        beyond = next(((number, label) for number, _, label, _ in rows
                       if num_classes is not None and label >= num_classes), None)
        if beyond is not None:
            raise DataError(f"{path}:{beyond[0]} has {label_key!r} {beyond[1]}, outside the model's classes "
                            f"0..{num_classes - 1}; correct the label, or set model.num_classes={max(given) + 1}")
        count = max(max(given) + 1, len(classes or ()))
        return Listing(files, given, captions, [str(c) for c in range(count)], uncaptioned)
    if all(isinstance(label, str) for label in given):
        classes = classes or sorted(set(given))
        unknown = next((label for label in given if label not in classes), None)
        if unknown is not None:
            raise DataError(f"{path}: class {unknown!r} is not among the training classes")
        return Listing(files, [classes.index(label) for label in given], captions, classes, uncaptioned)
    raise DataError(f"{path}: {label_key!r} must be all non-negative integers or all class names")


def _warn_of_odd_listings(root: pathlib.Path, rows: list[tuple], caption_key: str) -> None:
    """What metadata.jsonl most likely lists by mistake, as warnings: a file listed twice (it trains twice as
    often), an empty caption, and images beside it that no line lists (they are never read)."""
    path, first_line = root / METADATA, {}
    twice = [number for number, file, _, _ in rows if first_line.setdefault(file, number) != number]
    if twice:
        warn_once(f"{path} twice", f"{path}:{twice[0]} lists a file an earlier line lists too ({len(twice):,} such "
                                   "lines); each listing is a separate example, so those images train more often")
    blank = [number for number, _, _, caption in rows if isinstance(caption, str) and not caption.strip()]
    if blank:
        warn_once(f"{path} blank", f"{path}:{blank[0]} has an empty {caption_key!r} caption ({len(blank):,} of "
                                   f"{len(rows):,} lines); those images train on an empty prompt")
    inside = root.resolve()  # the lines' files are resolved; an image is resolved only where that differs
    unlisted = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                      and not hidden(p.relative_to(root)) and inside / p.relative_to(root) not in first_line
                      and p.resolve() not in first_line)
    if unlisted:
        warn_once(f"{path} unlisted", f"{len(unlisted):,} images in {root} are not listed in {METADATA} and are "
                                      f"not read (e.g. {str(unlisted[0].relative_to(root))!r})")


def folder_listings(images: ImagesConfig, num_classes: int | None) -> tuple[list[tuple[pathlib.Path, Listing]],
                                                                             list[str]]:
    """([(folder, its listing)] of the train and held-out split folders, or of the one folder without them;
    the class names the labels number), read from listings alone: no image is decoded."""
    root = pathlib.Path(images.folder)
    if not root.is_dir():
        raise DataError(f"images.folder {images.folder!r} is not a directory")
    split_dirs = {part: next((root / n for n in names if (root / n).is_dir()), None) for part, names in SPLITS.items()}
    if not all(split_dirs.values()):
        listing = listed_images(root, images.label_key, images.caption_key, num_classes=num_classes)
        return [(root, listing)], listing.classes
    train = listed_images(split_dirs["train"], images.label_key, images.caption_key, num_classes=num_classes)
    held_out = listed_images(split_dirs["eval"], images.label_key, images.caption_key, train.classes, num_classes)
    classes = max(train.classes, held_out.classes, key=len)  # integer labels: the larger range
    return [(split_dirs["train"], train), (split_dirs["eval"], held_out)], classes


def open_folder_images(images: ImagesConfig, model: DiTConfig) -> ImageSource:
    """The configured folder's parts, their labels checked against the model before any image is decoded."""
    root, num_classes = pathlib.Path(images.folder), getattr(model, "num_classes", None)  # an autoencoder has none
    listings, classes = folder_listings(images, num_classes)
    options = dict(size=model.image_size, channels=model.channels, resize=images.resize,
                   skip_bad=images.bad_images == "skip")
    uncaptioned = next((listing.uncaptioned for _, listing in listings if listing.uncaptioned), None)
    if len(listings) == 2:
        (_, train), (eval_dir, held_out) = listings
        parts = {"train": FolderImages(*train[:3], **options), "eval": FolderImages(*held_out[:3], **options)}
        larger = f"add images to {eval_dir}"
        captions = None if train.captions is None or held_out.captions is None else {
            "train": tuple(train.captions), "eval": tuple(held_out.captions)}
    else:
        [(_, listing)] = listings
        parts = held_out_parts(FolderImages(*listing[:3], **options), images.eval_every_nth)
        larger = f"hold out more with a smaller images.eval_every_nth (now {images.eval_every_nth})"
        captions = None if listing.captions is None else {
            part: tuple(view[i] for i in range(len(view)))
            for part, view in held_out_parts(listing.captions, images.eval_every_nth).items()}
    if num_classes is not None and len(classes) > num_classes:
        raise ConfigError(f"images.folder {images.folder!r} holds {len(classes)} classes ({', '.join(classes[:5])}"
                          f"{', ...' if len(classes) > 5 else ''}), more than model.num_classes={num_classes}; "
                          f"set model.num_classes={len(classes)}")
    return ImageSource(root.name or str(root), parts, larger, part_captions=captions, uncaptioned=uncaptioned)
