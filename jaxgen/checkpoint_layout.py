"""Where a run keeps its checkpoints and which of them are committed: file names only, no JAX.

Commands check a `--run-dir`/`--step` against this before they import JAX; the
checkpointer (`jaxgen.checkpoint`) writes what it describes.
"""

from __future__ import annotations

import json
import pathlib

from jaxgen.files import absolute

CHECKSUMS = "jaxgen_checksums.json"  # written last: a step directory holding it is committed


def checkpoint_dir(run_dir: pathlib.Path) -> pathlib.Path:
    return absolute(run_dir) / "checkpoints"


def step_dirs(directory: pathlib.Path) -> list[int]:
    """Every plainly numbered step directory (Orbax's atomic rename gave it its number): `7`, never a folder a
    person made, such as `007`, which is no step's name."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and p.name == str(int(p.name)) and p.is_dir())


def committed_steps(directory: pathlib.Path) -> list[int]:
    """Steps committed with their checksums: the only ones anybody reads."""
    return [step for step in step_dirs(directory) if (pathlib.Path(directory) / str(step) / CHECKSUMS).is_file()]


def checkpoint_digest(directory: pathlib.Path, step: int) -> str | None:
    """What tells checkpoint `step` from another saved at the same step (by a run continued from an earlier
    checkpoint with other settings): the start of its checksums' digest; None where they cannot be read."""
    try:
        return str(json.loads((pathlib.Path(directory) / str(step) / CHECKSUMS).read_bytes())["self_sha256"])[:16]
    except (OSError, ValueError, KeyError, TypeError):
        return None
