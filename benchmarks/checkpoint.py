"""How long a checkpoint holds up training, and how long until it is durable.

For train states of about 100 MB and 1 GB (float32 arrays on the default
device), prints one JSON object per size and a final summary line:
  blocked_s   time `Checkpointer.save()` blocks the loop (device -> host copy)
  durable_s   time from the call until the checkpoint is committed on disk
  restore_s   time to restore it into the same shardings, verification included
  digest_s    of blocked_s and restore_s, the time the per-array checksums take (computed on the devices)
  numpy_save_s  the same bytes written with numpy.save, for comparison
Target: blocked_s < 10% of durable_s.

    python benchmarks/checkpoint.py [--sizes-mb 100 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.checkpoint import Checkpointer
from jaxgen.config import CheckpointConfig
from jaxgen.integrity import tree_digest


def make_state(total_mb: int) -> dict:
    """A state of `total_mb` MB in 16 float32 arrays (a stand-in for params + Adam moments) and a step counter."""
    per_array = total_mb * 2**20 // 4 // 16
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    params = {f"w{i}": jax.random.normal(k, (per_array,), jnp.float32) for i, k in enumerate(keys)}
    return {"step": jnp.zeros((), jnp.int32), "params": params}


def target_of(state: dict) -> dict:
    """Abstract arrays carrying the state's shardings: what a restore reads into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def measure(total_mb: int, root: pathlib.Path, repeats: int) -> dict:
    state = make_state(total_mb)
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    target = target_of(state)
    blocked, durable, restore, numpy_save, digest = [], [], [], [], []
    tree_digest(state)  # compiled once, as a run's first save does
    for r in range(repeats):
        directory = root / f"ckpt-{total_mb}-{r}"
        ckpt = Checkpointer(directory, CheckpointConfig(keep=1))
        start = time.perf_counter()
        ckpt.save(1, state, {"step": 1}, {})
        blocked.append(time.perf_counter() - start)
        ckpt.wait()
        durable.append(time.perf_counter() - start)
        ckpt.close()

        start = time.perf_counter()
        restored = Checkpointer(directory, CheckpointConfig()).restore(target, 1).state
        jax.block_until_ready(restored)
        restore.append(time.perf_counter() - start)
        shutil.rmtree(directory)

        start = time.perf_counter()
        tree_digest(state)
        digest.append(time.perf_counter() - start)

        host = [np.asarray(x) for x in jax.tree.leaves(state)]
        start = time.perf_counter()
        with open(root / "plain.npy", "wb") as f:
            for array in host:
                np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        numpy_save.append(time.perf_counter() - start)
        (root / "plain.npy").unlink()
    result = {
        "state_mb": round(nbytes / 2**20, 1),
        "blocked_s": float(np.median(blocked)),
        "durable_s": float(np.median(durable)),
        "restore_s": float(np.median(restore)),
        "numpy_save_s": float(np.median(numpy_save)),
        "digest_s": float(np.median(digest)),
    }
    result["blocked_fraction"] = result["blocked_s"] / result["durable_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="jaxgen-ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results = [measure(mb, root, args.repeats) for mb in args.sizes_mb]
    for r in results:
        print(json.dumps(r))
    print(json.dumps({
        "benchmark": "checkpoint",
        "device": jax.devices()[0].device_kind,
        "results": results,
        "max_blocked_fraction": max(r["blocked_fraction"] for r in results),
        "target_met": all(r["blocked_fraction"] < 0.10 for r in results),
    }))


if __name__ == "__main__":
    main()
