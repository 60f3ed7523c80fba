"""What a run's training files were when a checkpoint was saved, to say so when a resume finds them changed.

A corpus appended to, cut short or replaced, or a glob that now matches other files, changes
which documents the saved data position points at and which are held out: the run goes on,
but neither in the data order nor with the held-out set it had. Files are told apart by their
names under the glob's fixed folder and their sizes, not their paths or times, so data staged
to another folder (a node's local disk) for a resumed job counts as the same data.

The same record tells, before a multi-process run reads any data, a process whose files are not
process 0's: a copy staged to each host's own disk that is incomplete or out of date.

An image folder's class names and the labels they number are recorded beside its files: a class
folder removed or added renumbers the others, and a model resumed on them would learn every label
anew under another name, so a resume that finds them changed is refused, not warned about.
"""

from __future__ import annotations

import glob
import json
import pathlib

from jaxgen.config import Config
from jaxgen.config_data import SOURCE_KINDS
from jaxgen.distributed import bytes_from_process_0, from_every_process, is_multiprocess
from jaxgen.errors import CheckpointError, DataError, listed, on_every_process

# Text sources read from local files by glob; `path` is a prepared dataset's directory.
GLOBBED = ("text", "jsonl", "array_record", "parquet")
# Image sources that are directories (a folder of images, IDX files, a latent dataset).
IMAGE_DIRECTORIES = ("folder", "idx", "latents")
MAX_FILES = 10_000  # per source: beyond it only the total size is kept
CLASSES = "images.folder classes"  # the record of {class name: label}, where labels are the model's input


def data_files(cfg: Config) -> dict[str, dict[str, int]]:
    """{source key: {file name under its folder: size in bytes}} for every local file source."""
    data, found = cfg.data, {}
    for i, source in enumerate(data.mixture or [data]):
        prefix = f"data.mixture[{i}]." if data.mixture else "data."
        for kind in SOURCE_KINDS:
            pattern = getattr(source, kind)
            if pattern is not None and "://" not in pattern and kind in (*GLOBBED, "path"):
                found[prefix + kind] = _sizes(*_files(pattern, kind == "path"))
    if cfg.images.source in IMAGE_DIRECTORIES:
        found[f"images.{cfg.images.source}"] = _sizes(*_files(getattr(cfg.images, cfg.images.source), True))
    if cfg.images.source == "folder" and cfg.conditioning.by == "class" and hasattr(cfg.model, "num_classes"):
        from jaxgen.data.folder_images import folder_listings

        _, classes = folder_listings(cfg.images, cfg.model.num_classes)
        found[CLASSES] = {name: label for label, name in enumerate(classes)}
    return found


def _sizes(root: pathlib.Path, files: list[pathlib.Path]) -> dict[str, int]:
    sizes = {_name(f, root): f.stat().st_size for f in files}
    return {"all files": sum(sizes.values())} if len(sizes) > MAX_FILES else sizes


def _files(pattern: str, directory: bool) -> tuple[pathlib.Path, list[pathlib.Path]]:
    expanded = pathlib.Path(pattern).expanduser()
    if directory:
        return expanded, sorted(f for f in expanded.rglob("*") if f.is_file())
    fixed = []
    for part in expanded.parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    root = pathlib.Path(*fixed) if fixed else pathlib.Path(".")
    files = sorted(pathlib.Path(p) for p in glob.glob(str(expanded), recursive=True))
    return (root.parent if root == expanded else root), [f for f in files if f.is_file()]


def _name(path: pathlib.Path, root: pathlib.Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def changed_files(saved: dict[str, dict[str, int]], now: dict[str, dict[str, int]]) -> list[str]:
    """Each difference between a resumed checkpoint's `data_files` record and this run's, for people
    ("data.text: a.txt 2,048 -> 1,024 bytes"); CheckpointError where the classes' labels changed."""
    refuse_changed_classes(saved.get(CLASSES), now.get(CLASSES))
    return _differences(saved, now)


def refuse_changed_classes(saved: dict[str, int] | None, now: dict[str, int] | None) -> None:
    """Raise CheckpointError when an image folder's {class name: label} is not the one the run was trained on
    (a checkpoint from before classes were recorded has none, and resumes)."""
    if saved is None or now is None or saved == now:
        return
    removed, added = [c for c in saved if c not in now], [c for c in now if c not in saved]
    moved = [f"{c} {saved[c]} -> {now[c]}" for c in saved if c in now and saved[c] != now[c]]
    changes = [f"{what} {', '.join(names[:5])}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"
               for what, names in (("removed", removed), ("added", added)) if names]
    changes = changes or [f"relabelled {listed(moved, 3)}"]
    raise CheckpointError(f"images.folder holds other classes than this run was trained on ({'; '.join(changes)}): "
                          "its labels would no longer name the classes the model learned; restore the folder's "
                          "classes, or start a new run in another --run-dir")


def _differences(saved: dict[str, dict[str, int]], now: dict[str, dict[str, int]]) -> list[str]:
    changes = []
    for key in dict.fromkeys([*saved, *now]):
        before, after = saved.get(key), now.get(key)
        if key == CLASSES and before is None:  # recorded since; nothing to compare with
            continue
        if before is None or after is None:
            changes.append(f"{key}: {'now read' if before is None else 'no longer read'}")
            continue
        for name in dict.fromkeys([*before, *after]):
            if name not in after:
                changes.append(f"{key}: {name} gone")
            elif name not in before:
                changes.append(f"{key}: {name} new")
            elif before[name] != after[name]:
                changes.append(f"{key}: {name} {before[name]:,} -> {after[name]:,}{'' if key == CLASSES else ' bytes'}")
    return changes


def refuse_other_files_than_process_0(files: dict[str, dict[str, int]]) -> None:
    """Raise DataError on every process of a multi-process run when some process's `files` (its `data_files`)
    are not process 0's: each process reads its share of every batch from its own view of the files, so one
    reading a cut or older copy trains on other documents than the run's data order says, unseen."""
    if not is_multiprocess():
        return
    process_0 = json.loads(bytes_from_process_0(json.dumps(files).encode()))
    differences = [json.loads(raw) for raw in from_every_process(json.dumps(_differences(process_0, files)).encode())]
    differing = [index for index, changes in enumerate(differences) if changes]
    if differing:
        first, more = differing[0], len(differing) - 1
        others = f"; {more} other process{'es' if more > 1 else ''} too" if more else ""
        raise on_every_process(DataError(
            f"process {first} does not see the training files process 0 does (process 0's -> its own: "
            f"{listed(differences[first], 4)}{others}): every process must read the same files; a copy staged to "
            "each host's own disk may be incomplete or out of date"))
