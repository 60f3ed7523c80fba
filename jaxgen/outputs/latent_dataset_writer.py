"""`jaxgen data prepare --images SOURCE --autoencoder RUN_DIR --out DIR`: an image dataset encoded once into
the latent dataset data/latent_dataset.py reads (its record format, manifest and safety rules are described
there).
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
from collections.abc import Iterator

import numpy as np

from jaxgen.config import IMAGE_SOURCES, Config
from jaxgen.data.image_batches import ModelInput
from jaxgen.data.image_source import ImageSource
from jaxgen.data.images import open_images
from jaxgen.data.latent_dataset import FORMAT, MANIFEST, PARTS, encode_record
from jaxgen.data.prepare import ShardedSplitWriter, prepare_lock, read_back, sync_files
from jaxgen.data.splits import Part, Shard
from jaxgen.diffusion.latents import measure_scale
from jaxgen.errors import ConfigError, DataError
from jaxgen.files import building, write_atomic
from jaxgen.outputs.frozen_autoencoder import BATCH, FrozenAutoencoder, autoencoder_config, load_autoencoder
from jaxgen.progress import progress_bar

log = logging.getLogger("jaxgen")

SCALE_IMAGES = 4096  # training images whose latents measure the scale
SOURCES = {"folder": "DIR", "idx": "DIR", "tfds": "NAME", "digits": None, "shapes": None}
SOURCE_SYNTAX = "folder:DIR, idx:DIR, tfds:NAME, digits or shapes"


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
    with progress_bar(total=sum(source.size(p) for p in PARTS), unit="image", desc="encode",
                      disable=not progress) as bar:
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


