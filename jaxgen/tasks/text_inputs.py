"""What the text families share: the tokenizer a run records, and held-out batches placed beside the parameters.

A run records its tokenizer's hash in every checkpoint and never resumes on another
(`TokenizerInputs`). Figures computed on the host's rows of held-out batches are
summed over processes (`summed_over_processes`); figures computed by the model take
the batches as global arrays on the parameters' mesh (`global_batches`).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxgen.data.pipeline import to_global
from jaxgen.errors import CheckpointError


class TokenizerInputs:
    """`Task.inputs` / `check_inputs` of a family whose data has a `tokenizer`."""

    def inputs(self, data) -> dict:
        return {"tokenizer_sha256": data.tokenizer.sha256, "tokenizer_path": str(data.tokenizer.path),
                "tokenizer_kind": data.tokenizer.kind}

    def check_inputs(self, saved: dict, current: dict) -> None:
        if saved.get("tokenizer_sha256") != current.get("tokenizer_sha256"):
            raise CheckpointError(
                f"the checkpoint was trained with tokenizer {saved.get('tokenizer_path')} "
                f"(sha256 {saved.get('tokenizer_sha256')}), but this run uses {current.get('tokenizer_path')} "
                f"(sha256 {current.get('tokenizer_sha256')}); resume with the checkpoint's tokenizer")


def global_batches(params, batches: list[dict[str, np.ndarray]]) -> list[dict[str, jax.Array]]:
    """This process's rows of each batch joined into global arrays on the mesh the parameters live on."""
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    return [to_global(batch, mesh) for batch in batches]


def summed_over_processes(values: list[float]) -> list[float]:
    """Each value summed over every process (each computed its own rows' share)."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(values, np.float64))
    return [float(v) for v in np.sum(gathered, axis=0)]
