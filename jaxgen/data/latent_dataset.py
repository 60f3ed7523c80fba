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

import json
import logging
import pathlib

import numpy as np

from jaxgen.config import DiTConfig, ImagesConfig
from jaxgen.data.array_record_files import damaged_array_record
from jaxgen.data.image_source import ImageSource
from jaxgen.data.splits import Part
from jaxgen.errors import ConfigError, DataError

log = logging.getLogger("jaxgen")

MANIFEST = "latents.json"
FORMAT = 1
PARTS: tuple[Part, ...] = ("train", "eval")
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
    """Random access to one part's records, decoded; a damaged file is named in one line."""

    def __init__(self, files: list[pathlib.Path], shape: tuple[int, int, int]):
        import grain

        self.files, self.shape = files, shape
        damaged = damaged_array_record(files)
        if damaged is not None:
            raise DataError(f"latent dataset file {str(damaged[0])!r} is damaged ({damaged[1]}); prepare the "
                            f"dataset again with {PREPARE}")
        self.sources = [grain.sources.ArrayRecordDataSource([str(f)]) for f in files]
        self.starts = np.cumsum([0] + [len(source) for source in self.sources])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = int(np.searchsorted(self.starts, index, side="right")) - 1
        try:
            record = self.sources[i][index - int(self.starts[i])]
        except RuntimeError as err:  # array_record's report of a damaged file
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"latent dataset file {str(self.files[i])!r} is damaged ({reason}); prepare the "
                            f"dataset again with {PREPARE}") from None
        return decode_record(record, self.shape)


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
