"""Latent datasets: an image dataset encoded once by a frozen autoencoder, and read back (`images.source: latents`).

`jaxgen data prepare --images SOURCE --autoencoder RUN_DIR --out DIR` reads both parts
of an image dataset in order, as training would read it at the autoencoder's image
size (SOURCE: `folder:DIR`, `idx:DIR`, `tfds:NAME`, `digits` or `shapes`), encodes
every image to its scaled latents (`jaxgen.diffusion.latents`) and writes them with
their labels and captions. The scale is measured on the first `SCALE_IMAGES`
training images, unless the autoencoder has its own `model.scaling_factor` (an
imported Stable Diffusion VAE), which is then used.

DIR holds `latents-{train,eval}.array_record-NNNNN-of-NNNNN` files, one record per
image: the latents as little-endian float32 (h, w, Z), the label as a little-endian
int32, then the caption as UTF-8 (empty when the source has none). `latents.json`,
written last, describes them: scale, shift, shapes, the autoencoder (resolved run
directory, step, parameter digest), counts and files per part, the source, whether
captions exist and the number of classes.

It is written as `prepare.py` writes text datasets (and with its helpers): one
prepare per DIR (a lock beside it), built in a hidden directory, every file read
back and compared with what was written, synced, `latents.json` last, then renamed
into place; a failure leaves no DIR.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from jaxgen.config import IMAGE_SOURCES, Config, DiTConfig, ImagesConfig
from jaxgen.data.image_batches import ModelInput
from jaxgen.data.image_source import ImageSource
from jaxgen.data.images import open_images
from jaxgen.data.prepare import ShardedSplitWriter, prepare_lock, read_back, sync_files
from jaxgen.data.splits import Part, Shard
from jaxgen.diffusion.latents import BATCH, FrozenAutoencoder, autoencoder_config, load_autoencoder, measure_scale
from jaxgen.errors import ConfigError, DataError
from jaxgen.files import building, write_atomic

log = logging.getLogger("jaxgen")

MANIFEST = "latents.json"
FORMAT = 1
PARTS: tuple[Part, ...] = ("train", "eval")
SCALE_IMAGES = 4096  # training images whose latents measure the scale
SOURCES = {"folder": "DIR", "idx": "DIR", "tfds": "NAME", "digits": None, "shapes": None}
SOURCE_SYNTAX = "folder:DIR, idx:DIR, tfds:NAME, digits or shapes"
PREPARE = "jaxgen data prepare --images SOURCE --autoencoder RUN_DIR --out DIR"


# ----------------------------------------------------------------------------- records


def encode_record(latents_hwZ: np.ndarray, label: int, caption: str) -> bytes:
    return (np.asarray(latents_hwZ, "<f4").tobytes() + np.asarray(label, "<i4").tobytes()
            + caption.encode("utf-8"))


def decode_record(record: bytes, shape: tuple[int, int, int]) -> dict:
    """{'image': float32 (h, w, Z), 'label': int32, 'caption': str}."""
    n = 4 * int(np.prod(shape))
    return {"image": np.frombuffer(record, "<f4", count=n // 4).reshape(shape).astype(np.float32),
            "label": np.frombuffer(record, "<i4", count=1, offset=n)[0].astype(np.int32),
            "caption": record[n + 4:].decode("utf-8")}


class LatentRecords:
    """Random access to one part's records, decoded."""

    def __init__(self, files: list[pathlib.Path], shape: tuple[int, int, int]):
        import grain

        self.source, self.shape = grain.sources.ArrayRecordDataSource([str(f) for f in files]), shape

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return decode_record(self.source[index], self.shape)


# ----------------------------------------------------------------------------- writing


def source_images(source: str, caption_key: str | None = None, label_key: str | None = None) -> dict:
    """The config's images section for `--images SOURCE`; a SOURCE of no known form is refused."""
    kind, colon, where = source.partition(":")
    if kind not in SOURCES or (SOURCES[kind] is None) != (not colon) or (colon and not where):
        raise ConfigError(f"--images {source!r} names no image dataset; give {SOURCE_SYNTAX}")
    images = {"source": kind, **({kind: where} if where else {})}
    keys = {"caption_key": caption_key, "label_key": label_key}
    return {**images, **{key: value for key, value in keys.items() if value is not None}}


def refuse_existing(out: pathlib.Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {str(out)!r} already exists; choose a new directory")


def prepare_latent_dataset(images: str, autoencoder: str | pathlib.Path, out: str | pathlib.Path, *,
                           caption_key: str | None = None, label_key: str | None = None, step: int | None = None,
                           shard_size: int = 100_000, progress: bool = True) -> dict:
    """Encode image dataset `images` (SOURCE) with the autoencoder of run `autoencoder` into `out`; returns the
    manifest (also stored as latents.json)."""
    out = pathlib.Path(out)
    images_section = source_images(images, caption_key, label_key)
    refuse_existing(out)
    model = autoencoder_config(autoencoder)
    kind = images_section["source"]
    if kind in IMAGE_SOURCES and IMAGE_SOURCES[kind][:2] != (model.image_size, model.channels):
        side, channels, _ = IMAGE_SOURCES[kind]
        raise ConfigError(f"--images {kind} holds {side}x{side}x{channels} images, but the autoencoder "
                          f"{str(autoencoder)!r} takes {model.image_size}x{model.image_size}x{model.channels}")
    source = open_images(Config(model=model, images=images_section))
    empty = next((part for part in PARTS if source.size(part) == 0), None)
    if empty is not None:
        raise DataError(f"--images {images!r}: its {empty} part holds no images")
    out.parent.mkdir(parents=True, exist_ok=True)
    with prepare_lock(out):
        refuse_existing(out)
        frozen = load_autoencoder(autoencoder, step)
        with building(out) as partial:
            return _write(source, frozen, images, partial, out, shard_size, progress)


def _write(source: ImageSource, autoencoder: FrozenAutoencoder, description: str, partial: pathlib.Path,
           out: pathlib.Path, shard_size: int, progress: bool) -> dict:
    if autoencoder.cfg.scaling_factor != 1.0:
        scale_from = f"the autoencoder's model.scaling_factor={autoencoder.cfg.scaling_factor}"
    else:
        first = np.concatenate([images for images, _, _ in _batches(source, "train", SCALE_IMAGES)])
        autoencoder = autoencoder.with_scale(measure_scale(autoencoder.with_scale(1.0).encode(first)))
        scale_from = f"measured: unit variance over the latents of the first {len(first)} training images"
    log.info("latent scale %.6g (%s)", autoencoder.scale, scale_from)
    writers = {part: ShardedSplitWriter(partial, f"latents-{part}", shard_size) for part in PARTS}
    captioned, num_classes = True, 0
    with tqdm(total=sum(source.size(p) for p in PARTS), unit="image", desc="encode", disable=not progress) as bar:
        for part, writer in writers.items():
            for images, labels, captions in _batches(source, part):
                for latents, label, caption in zip(autoencoder.encode(images), labels, captions, strict=True):
                    writer.write(encode_record(latents, int(label), caption or ""))
                captioned &= all(c is not None for c in captions)
                num_classes = max(num_classes, int(labels.max()) + 1)
                bar.update(len(labels))
    for writer in writers.values():
        writer.finish(prefix=None)
    _verify(writers, out)
    manifest = {
        "format": FORMAT, "scale": autoencoder.scale, "shift": autoencoder.shift, "scale_from": scale_from,
        "latent_shape": list(autoencoder.latent_shape), "image_size": autoencoder.cfg.image_size,
        "channels": autoencoder.cfg.channels,
        "autoencoder": {"run_dir": str(autoencoder.run_dir), "step": autoencoder.step, "digest": autoencoder.digest},
        "counts": {part: sum(w.shard_lengths) for part, w in writers.items()},
        "files": {part: [f.path.name for f in w.files] for part, w in writers.items()},
        "source": description, "captions": captioned, "num_classes": num_classes}
    sync_files(partial)
    write_atomic(partial / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _batches(source: ImageSource, part: Part,
             limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, list[str | None]]]:
    """(images (B, H, W, C) in [-1, 1], labels (B,), captions or None) of a part's first `limit` records, in
    order, BATCH at a time."""
    to_input = ModelInput(source)
    records = itertools.islice(source.records(part, Shard(), None, epochs=1), limit)
    while chunk := list(itertools.islice(records, BATCH)):
        examples = [to_input.map(record) for record in chunk]
        yield (np.stack([e["images"] for e in examples]), np.stack([e["labels"] for e in examples]),
               [record.get(source.caption_key) for record in chunk])


def _verify(writers: dict[Part, ShardedSplitWriter], out: pathlib.Path) -> None:
    """Raise DataError unless every file reads back exactly the records written to it."""
    def damaged(what: str) -> DataError:
        return DataError(f"--out {str(out)!r} was not created: {what}; the disk or filesystem lost or changed "
                         "data, check it and run the same command again")

    for writer in writers.values():
        for file in writer.files:
            try:
                read = read_back(file.path)
            except RuntimeError as err:  # array_record's report of a damaged file
                raise damaged(f"{file.path.name} cannot be read back ({err})") from None
            if read.records != file.written.records:
                raise damaged(f"{file.path.name} reads back {read.records} records, {file.written.records} "
                              "were written")
            if read.hexdigest() != file.written.hexdigest():
                raise damaged(f"{file.path.name} reads back records whose bytes differ from those written")


# ----------------------------------------------------------------------------- reading


def read_manifest(directory: str | pathlib.Path) -> dict:
    """What `prepare_latent_dataset` recorded in `directory`; a missing or unfinished dataset is refused."""
    directory = pathlib.Path(directory).expanduser()
    if not directory.is_dir():
        raise DataError(f"latent dataset {str(directory)!r} does not exist; write one with {PREPARE}")
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(f"{str(directory)!r} is not a finished latent dataset (no {MANIFEST}): its prepare was "
                        f"stopped or is still running; write one with {PREPARE}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{str(path)!r} cannot be read: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not a latent dataset manifest of format {FORMAT}; write the dataset "
                        f"again with {PREPARE}")
    return manifest


def open_latent_images(images: ImagesConfig, model: DiTConfig) -> ImageSource:
    """The latent dataset `images.latents`, checked against the model (its image_size and channels are the
    latents' side and channels) before any record is read."""
    directory = pathlib.Path(images.latents)
    manifest = read_manifest(directory)
    h, w, z = shape = tuple(manifest["latent_shape"])
    what = f"images.latents {images.latents!r}"
    if (h, z) != (model.image_size, model.channels):
        raise ConfigError(f"{what} holds {h}x{w}x{z} latents, but model.image_size={model.image_size}, "
                          f"model.channels={model.channels}; set model.image_size={h}, model.channels={z}")
    classes = manifest["num_classes"]
    if hasattr(model, "num_classes") and classes > model.num_classes:
        raise ConfigError(f"{what} holds {classes} classes, more than model.num_classes={model.num_classes}; "
                          f"set model.num_classes={classes}")
    parts = {}
    for part in PARTS:
        files = [directory / name for name in manifest["files"][part]]
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise DataError(f"{what} lacks {missing.name}, which {MANIFEST} lists; write the dataset again")
        parts[part] = LatentRecords(files, shape)
    captions = {part: tuple(records[i]["caption"] for i in range(len(records)))
                for part, records in parts.items()} if manifest["captions"] else None
    return ImageSource(directory.name or str(directory), parts,
                       f"prepare the latents of a source with a larger held-out part ({manifest['source']})",
                       white=None, image_key="image", label_key="label", caption_key="caption",
                       part_captions=captions)
