"""Hugging Face `datasets` as a random-access source of documents (the optional extra `hf`).

`data.hf` names a local directory, either written by `save_to_disk` (read with
`datasets.load_from_disk`) or holding Parquet/JSON/CSV/Arrow files (`datasets.load_dataset`),
or a dataset that `datasets.load_dataset(name, data.hf_config)` finds in its cache or, with
a network, on the Hub.

data.train_split and data.eval_split name the splits. A dataset without splits (a saved
`Dataset`), or whose only split is data.train_split (a folder of files loads as one
`train` split), holds out documents by data.eval_every_nth_doc and data.eval_block instead,
as the other sources without splits do; an explicitly set data.eval_split must exist.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jaxgen.config import DataConfig, SourceConfig
from jaxgen.data.splits import HeldOutView, HoldOut, Part
from jaxgen.errors import ConfigError, DataError, first_line


class HfDocuments:
    """One text column of a `datasets.Dataset`, by index: each value a `str`, or None where it is null.

    Pickles (to grain's worker processes) as the dataset does: by reference to its memory-mapped Arrow files.
    """

    def __init__(self, dataset: Any, field: str):
        self.dataset, self.field = dataset.select_columns([field]), field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str | None:
        return self.dataset[int(index)][self.field]

    def __repr__(self) -> str:
        return f"HfDocuments(column {self.field!r}, {len(self)} rows)"


def open_hf(source: DataConfig | SourceConfig, part: Part, holdout: HoldOut):
    """The documents of `part` in the dataset `source.hf` (a `pipeline.RandomAccessSource`)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError('data.hf needs the datasets library: pip install -e ".[hf]"') from None
    loaded = _load(datasets, source)
    if isinstance(loaded, datasets.Dataset):
        return HeldOutView(_documents(datasets, loaded, source), holdout)
    splits = list(loaded)
    if source.train_split not in loaded:
        raise _no_split(source, source.train_split, "train_split", splits)
    if source.eval_split in loaded:
        split = source.train_split if part == "train" else source.eval_split
        return _documents(datasets, loaded[split], source)
    if splits == [source.train_split] and "eval_split" not in source.model_fields_set:
        return HeldOutView(_documents(datasets, loaded[source.train_split], source), holdout)
    raise _no_split(source, source.eval_split, "eval_split", splits)


def _no_split(source: DataConfig | SourceConfig, split: str, setting: str, splits: list[str]) -> DataError:
    return DataError(f"{source.key('hf')} {source.hf!r} has no split {split!r} ({source.key(setting)}); "
                     f"it has {splits}")


def _load(datasets: Any, source: DataConfig | SourceConfig) -> Any:
    """A `Dataset` (no splits) or a `DatasetDict` (splits by name)."""
    name, config, hf, hf_config = source.hf, source.hf_config, source.key("hf"), source.key("hf_config")
    directory = pathlib.Path(name).expanduser()
    saved = any((directory / marker).is_file() for marker in (
        datasets.config.DATASETDICT_JSON_FILENAME, datasets.config.DATASET_STATE_JSON_FILENAME))
    # A Hub name is "dataset" or "owner/dataset"; one whose first part is a folder here is a mistyped path, which the
    # Hub would be asked for (retrying for about half a minute where there is no network).
    local = directory.is_absolute() or name.startswith((".", "~")) or len(directory.parts) > 2 or (
        len(directory.parts) == 2 and pathlib.Path(directory.parts[0]).is_dir())
    if not directory.exists() and local:
        raise DataError(f"{hf} {name!r} does not exist; give a directory written by save_to_disk, "
                        "a folder of Parquet/JSON/CSV/Arrow files, or a dataset name on the Hugging Face Hub")
    if saved and config is not None:
        raise ConfigError(f"{hf_config} {config!r} chooses a configuration of a dataset load_dataset builds; "
                          f"{hf} {name!r} was written by save_to_disk and has none: leave {hf_config} out")
    if saved:
        try:
            return datasets.load_from_disk(str(directory))
        except Exception as err:  # noqa: BLE001 - datasets' own failures on a damaged directory take many types
            if empty := _saved_empty(datasets, directory):
                raise DataError(f"{hf} {name!r} holds no rows ({empty} was saved with none, which datasets "
                                "cannot read back); give a dataset with documents") from None
            raise DataError(f"{hf} {name!r} cannot be read by datasets' load_from_disk ({type(err).__name__}: "
                            f"{first_line(err)}): its files are missing or damaged; write it again with "
                            "save_to_disk") from None
    try:
        return datasets.load_dataset(str(directory) if directory.is_dir() else name, config)
    except (OSError, ValueError) as err:  # not found, no data files, an unknown configuration, no network
        config_named = f" ({hf_config} {config!r})" if config is not None else ""
        where = "" if directory.is_dir() else ", not a local directory,"
        raise DataError(f"{hf} {name!r}{config_named}{where} cannot be loaded by datasets "
                        f"({first_line(err)})") from None


def _saved_empty(datasets: Any, directory: pathlib.Path) -> str | None:
    """Which part of a save_to_disk directory was saved with no rows (it lists no data files), if one was."""
    for state in sorted(directory.glob(f"**/{datasets.config.DATASET_STATE_JSON_FILENAME}")):
        try:
            files = json.loads(state.read_text()).get("_data_files")
        except (OSError, ValueError, AttributeError):
            continue
        if files == []:
            return "it" if state.parent == directory else f"split {state.parent.name!r}"
    return None


def _documents(datasets: Any, dataset: Any, source: DataConfig | SourceConfig) -> HfDocuments:
    features, field, name = dataset.features, source.field, source.hf
    hf, field_key = source.key("hf"), source.key("field")
    if field not in features:
        raise DataError(f"{hf} {name!r} has no column {field!r} ({field_key}); it has {list(features)}; "
                        f"set {field_key} to the column of the text")
    feature = features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise DataError(f"{hf} {name!r}: column {field!r} ({field_key}) holds {kind}, not strings; "
                        f"set {field_key} to the column of the text")
    return HfDocuments(dataset, field)
