"""TFDS datasets by name, already prepared in a data directory: the builder and its splits.

Text (`data.tfds`) and image (`images.tfds`) sources open datasets the same way,
so every way a name can fail (no such directory, no such dataset, not prepared,
no such split, TFRecord without TensorFlow) is one `DataError` naming the config
key and what would be valid, raised before any device work.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

from jaxgen.data.pipeline import RandomAccessSource
from jaxgen.data.tfrecord import tensorflow_available
from jaxgen.errors import DataError, first_line


def description(key: str, name: str, data_dir: str | None) -> str:
    return f"{key} {name!r} in {data_dir or 'the default TFDS data_dir'}"


def prepared_names(data_dir: pathlib.Path) -> list[str]:
    """Datasets prepared under `data_dir` (NAME/[CONFIG/]VERSION/dataset_info.json)."""
    infos = list(data_dir.glob("*/*/dataset_info.json")) + list(data_dir.glob("*/*/*/dataset_info.json"))
    return sorted({str(info.parent.parent.relative_to(data_dir)) for info in infos})


def might_be_prepared(name: str, found: list[str]) -> bool:
    """Whether `name` ([namespace:]dataset[/config][:version]) can be among the `found` prepared names.

    Checked before asking tfds: its builder for a dataset that is not prepared makes an empty
    directory in the system's temp dir (to fetch metadata from its bucket) and never removes it.
    """
    dataset, _, version = name.rpartition(":")
    if not dataset or not re.fullmatch(r"[\d.*]+", version):
        dataset = name  # no version given
    if ":" in dataset:  # a community namespace: where tfds keeps those is for tfds to say
        return True
    return any(prepared == dataset or prepared.startswith(f"{dataset}/") for prepared in found)


def open_builder(key: str, name: str, data_dir: str | None) -> Any:
    """The `tfds` builder of a prepared dataset; `key` is the config key that named it (e.g. data.tfds)."""
    import tensorflow_datasets as tfds

    root = pathlib.Path(data_dir or tfds.core.constants.get_default_data_dir()).expanduser()
    if data_dir is not None and not root.is_dir():
        raise DataError(f"{key}_data_dir {data_dir!r} is not a directory")
    found = prepared_names(root) if root.is_dir() else []
    builder, failure = None, None
    if might_be_prepared(name, found):
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            pass
        except Exception as err:  # noqa: BLE001 - a registered builder that cannot read what is prepared there
            failure = f"{type(err).__name__}: {first_line(err, 200)}"
    if (builder is None or not builder.is_prepared()) and (folder := _prepared_folder(name, found)) is not None:
        raise DataError(
            f"{description(key, name, data_dir)}: {root / folder} holds a dataset_info.json, but tfds cannot read "
            f"it as a prepared dataset ({failure or _why_unreadable(root / folder)}); its files are incomplete or "
            f"damaged, or another tfds wrote them: prepare it again: tfds build {name} --data_dir={root} "
            "--file_format=array_record")
    if builder is None or not builder.is_prepared():
        raise DataError(
            f"{description(key, name, data_dir)}: no such prepared dataset (prepared there: {found or 'none'}); "
            f"prepare it first: tfds build {name} --data_dir={root} --file_format=array_record"
        )
    return builder


def _prepared_folder(name: str, found: list[str]) -> str | None:
    """The prepared-looking folder `name` (with no namespace or version: a version not prepared is not a
    damaged one) names among `found`, if it is there."""
    return None if ":" in name else next((prepared for prepared in found if prepared == name), None)


def _why_unreadable(folder: pathlib.Path) -> str:
    import tensorflow_datasets as tfds

    versions = sorted(info.parent for info in folder.glob("**/dataset_info.json"))
    try:
        tfds.builder_from_directory(str(versions[-1]))
    except Exception as err:  # noqa: BLE001 - what tfds says of it, whatever it raises
        return f"{type(err).__name__}: {first_line(err, 200)}"
    return "it is not marked complete"


def split_size(builder: Any, split: str, what: str) -> int:
    """Records in a split (sub-splits such as 'train[:90%]' and 'train+test' included)."""
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as err:
        raise DataError(f"{what}: {err}") from None


def open_split(builder: Any, split: str, what: str) -> RandomAccessSource | None:
    """Random access to one split; None when the dataset is stored as TFRecord (streamed by `tfrecord.py`)."""
    import tensorflow_datasets as tfds

    split_size(builder, split, what)
    if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
        if not tensorflow_available():
            raise DataError(
                f"{what} is stored as TFRecord, which needs TensorFlow to read: pip install 'jaxgen[tf]' "
                "(or rebuild it with --file_format=array_record)"
            )
        return None
    return builder.as_data_source(split=split)
