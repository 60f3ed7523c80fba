"""Write safetensors files one tensor at a time.

`safetensors.numpy.save_file` wants every tensor in one dict, i.e. the whole
model in host memory at once. The format is simple enough to stream: a JSON
header with every tensor's dtype, shape and byte range (all known from shapes
alone), then the raw bytes in that order. Files written here are read back
with the `safetensors` library itself in the tests.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Callable, Iterable

import numpy as np

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32", "int64": "I64"}


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


def tensor_names_in(directory: pathlib.Path, stem: str = "model") -> Iterable[tuple[str, pathlib.Path]]:
    """(tensor name, file) for a single file or a sharded set with its index."""
    index = directory / f"{stem}.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [(name, directory / file) for name, file in weight_map.items()]
    single = directory / f"{stem}.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{directory} holds neither {single.name} nor {index.name}")
    from safetensors import safe_open

    with safe_open(single, framework="numpy") as f:
        return [(name, single) for name in f.keys()]
