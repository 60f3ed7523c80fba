"""Write safetensors files one tensor at a time; read what a directory of them holds, trusting nothing.

`safetensors.numpy.save_file` wants every tensor in one dict, i.e. the whole
model in host memory at once. The format is simple enough to stream: a JSON
header with every tensor's dtype, shape and byte range (all known from shapes
alone), then the raw bytes in that order. Files written here are read back
with the `safetensors` library itself in the tests.

Reading starts from the headers alone (`stored_tensors`), so a caller can check
every tensor's shape and dtype before it reads or allocates anything, and only
files inside the given directory are ever opened.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from collections.abc import Callable

import numpy as np

from jaxgen.errors import ExportError

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                      "int32": "I32", "int64": "I64"}
DTYPE_NAMES = {code: name for name, code in SAFETENSORS_DTYPES.items()}
# Weights that only `torch.load` (unpickling) reads.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def write_safetensors(path: pathlib.Path, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                      fetch: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """Write the tensors named in `specs` (name, shape, dtype), calling `fetch(name)` for each in turn.

    Written to a temporary name and renamed, so a file that exists is complete. Returns bytes written.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name}: expected shape {tuple(shape)}, got {array.shape}")
            f.write(array.tobytes())
    tmp.replace(path)
    return offset


def split_into_shards(specs: list[tuple[str, tuple[int, ...], np.dtype]], max_bytes: int) -> list[list]:
    """Consecutive groups of tensors of at most `max_bytes` each (a larger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = _nbytes(spec[1], spec[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_sharded(out: pathlib.Path, stem: str, specs: list, fetch: Callable[[str], np.ndarray],
                  max_shard_bytes: int) -> list[pathlib.Path]:
    """One `<stem>.safetensors`, or `<stem>-0000i-of-0000n.safetensors` files plus the Hugging Face index."""
    shards = split_into_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        path = out / f"{stem}.safetensors"
        write_safetensors(path, specs, fetch)
        return [path]
    weight_map, paths, total = {}, [], 0
    for i, shard in enumerate(shards, start=1):
        path = out / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path, shard, fetch)
        weight_map.update({name: path.name for name, _, _ in shard})
        paths.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """What a safetensors header says about one tensor; no tensor data is read to learn it."""

    file: pathlib.Path  # resolved: inside the directory it was found in
    dtype: str  # numpy's name ("float32", "bfloat16"), or the format's code for types jaxgen never writes
    shape: tuple[int, ...]


def file_inside(directory: pathlib.Path, name: str, what: str) -> pathlib.Path:
    """`directory / name` with links resolved, refused unless it still lies inside `directory`.

    Names come from the files being read (an index's weight map), so `..`, absolute
    paths and symlinks could otherwise make them read anything on the machine.
    """
    root = directory.resolve()
    path = (directory / name).resolve()
    if not path.is_relative_to(root):
        raise ExportError(
            f"{what} {name!r} resolves to {str(path)!r}, outside {str(root)!r}; only files inside it are read "
            "(to import a directory of links, copy it with the links followed: cp -rL)"
        )
    return path


def stored_tensors(directory: pathlib.Path, stem: str = "model") -> dict[str, StoredTensor]:
    """Every tensor of `<stem>.safetensors`, or of the files `<stem>.safetensors.index.json` names.

    Read from the headers alone; files outside `directory`, an index that disagrees
    with its files and files safetensors cannot parse are refused with an ExportError.
    """
    index = directory / f"{stem}.safetensors.index.json"
    single = directory / f"{stem}.safetensors"
    if index.exists():
        return _indexed_tensors(directory, index)
    if single.exists():
        return _header(file_inside(directory, single.name, "weights file"))
    raise ExportError(f"{str(directory)!r} holds neither {single.name} nor {index.name}{_pickle_advice(directory)}")


def _pickle_advice(directory: pathlib.Path) -> str:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return ""
    # Unpickling runs arbitrary code, so a checkpoint from elsewhere is never loaded that way.
    return (f"; it holds {', '.join(pickles)}, but only safetensors are read: pickles are never loaded. Convert "
            "with transformers: from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)")


def _indexed_tensors(directory: pathlib.Path, index: pathlib.Path) -> dict[str, StoredTensor]:
    """The tensors of every file the index names, refused unless the index maps each one to its own file."""
    weight_map = _weight_map(file_inside(directory, index.name, "index"))
    tensors: dict[str, StoredTensor] = {}
    for entry in sorted(set(weight_map.values())):
        file = file_inside(directory, entry, f"{index.name} entry")
        if not file.is_file():
            raise ExportError(f"{index.name} entry {entry!r} names no file in {str(directory)!r}")
        for name, stored in _header(file).items():
            if weight_map.get(name) != entry:
                raise ExportError(f"{str(file)!r} holds tensor {name!r}, which {index.name} does not map to it")
            tensors[name] = stored
    unheld = [name for name in weight_map if name not in tensors]
    if unheld:
        raise ExportError(f"{index.name} maps tensor {unheld[0]!r} to {weight_map[unheld[0]]!r}, which does not hold it")
    return tensors


def _weight_map(index: pathlib.Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{str(index)!r} is not a safetensors index (a JSON object with a 'weight_map'): "
                          f"{type(err).__name__}: {err}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise ExportError(f"{str(index)!r}: 'weight_map' must map tensor names to file names")
    return weight_map


def _header(file: pathlib.Path) -> dict[str, StoredTensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{str(file)!r} is not a readable safetensors file: {err}") from None
    return {name: StoredTensor(file, DTYPE_NAMES.get(s.get_dtype(), s.get_dtype()), tuple(s.get_shape()))
            for name, s in slices.items()}


def read_tensor(name: str, stored: StoredTensor) -> np.ndarray:
    """Tensor `name`, whose values must be finite: a NaN or an infinity was refused only as the checkpoint was
    written, under jaxgen's own parameter path and as a failed save (status 1), not as the input it is."""
    from safetensors import safe_open

    with safe_open(stored.file, framework="numpy") as f:
        tensor = f.get_tensor(name)
    if np.issubdtype(tensor.dtype, np.inexact) or tensor.dtype.kind == "V" or "float" in str(tensor.dtype):
        bad = int(np.size(tensor) - np.count_nonzero(np.isfinite(tensor)))
        if bad:
            raise ExportError(f"tensor {name!r} in {stored.file} holds {bad:,} non-finite value{'s' * (bad > 1)} (NaN or "
                              f"infinity) of {np.size(tensor):,}: the checkpoint is damaged, or was saved from a run that "
                              "diverged; import a healthy one")
    return tensor
