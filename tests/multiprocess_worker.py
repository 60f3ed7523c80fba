"""One JAX process of a multi-process test, started by tests/test_launch_processes.py.

It joins the run from the JAXGEN_* variables (as `jaxgen train` does) and runs
one scenario, printing a JSON line that starts with RESULT:

  losses STEPS OVERRIDES...  train the tiny config on fixed random batches; each
                             process feeds its rows of every global batch
  uneven stop|error N0 N1 .. process i holds N_i batches, then its share ends
                             (StopIteration) or fails (DataError); step with
                             `next_in_lockstep` and a cross-process sum per step

It must not import conftest: that would force 8 devices on every process.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import distributed

TINY_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "lm_tiny.yaml"


def global_batches(cfg, n: int) -> list[dict[str, np.ndarray]]:
    """The same n global batches on every process, whatever the process count."""
    rng = np.random.default_rng(0)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    windows = rng.integers(0, cfg.model.vocab_size, size=(n, b, length + 1), dtype=np.int32)
    return [{"inputs": w[:, :-1], "targets": w[:, 1:], "weights": np.ones((b, length), np.float32)} for w in windows]


def this_process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    per = len(batch["inputs"]) // jax.process_count()
    rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    return {name: field[rows] for name, field in batch.items()}


def train_losses(steps: int, overrides: list[str]) -> dict:
    """Losses of `steps` steps and the final parameter norm; the same on any process layout."""
    import optax

    from jaxgen.config import load_config
    from jaxgen.data.pipeline import to_global
    from jaxgen.sharding import make_mesh
    from jaxgen.train.build import build_training

    cfg = load_config(TINY_CONFIG, overrides)
    training = build_training(cfg, make_mesh(cfg.mesh))
    state, losses = training.init_state(), []
    for batch in global_batches(cfg, steps):
        state, metrics = training.train_step(state, to_global(this_process_rows(batch), training.mesh))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "param_norm": float(optax.tree.norm(state.params))}


def uneven(shares: list[int], end: str) -> dict:
    """Step until some process has no batch; every process must stop at the same step.

    A share ends as a finite iterator does (end="stop") or with a DataError, as a
    share without documents does (end="error").
    """
    from jaxgen.config import MeshConfig
    from jaxgen.data.lockstep import next_in_lockstep
    from jaxgen.data.pipeline import to_global
    from jaxgen.errors import DataError
    from jaxgen.sharding import make_mesh

    mesh = make_mesh(MeshConfig())
    rows = 2 * jax.local_device_count()

    def my_share():
        for step in range(shares[jax.process_index()]):
            yield {"x": np.full((rows, 1), float(step), np.float32)}
        if end == "error":
            raise DataError(f"process {jax.process_index()} cannot read its share")

    batches, total, sums, step = my_share(), jax.jit(jnp.sum), [], 1
    try:
        while True:
            batch = next_in_lockstep(batches, step)
            sums.append(float(total(to_global(batch, mesh)["x"])))  # a collective over every process
            step += 1
    except DataError as err:
        return {"stopped_at": step, "sums": sums, "error": type(err).__name__, "message": str(err)}


def main() -> None:
    distributed.initialize(distributed.settings_from({}))
    scenario, *args = sys.argv[1:]
    if scenario == "losses":
        result = train_losses(int(args[0]), args[1:])
    elif scenario == "uneven":
        result = uneven([int(a) for a in args[1:]], end=args[0])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print("RESULT:" + json.dumps({"process": jax.process_index(), **result}), flush=True)


if __name__ == "__main__":
    main()
