"""Where numbers go: JSONL (always), TensorBoard, a loss-curve PNG; throughput and MFU.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per chip from vendor data sheets.
KNOWN_PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


def measure_matmul_peak(n: int = 1024, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n x n matmul on the default device: the practical peak on CPUs.

    Inputs in `dtype`, accumulated in float32, as the models' matmuls are.
    """
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    mm(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


def peak_flops_per_device(configured: float | None, compute_dtype: str = "float32") -> tuple[float, str]:
    """(FLOP/s, where the figure came from) for MFU: configured, a data sheet, or measured in the compute dtype."""
    if configured:
        return configured, "config"
    kind = jax.devices()[0].device_kind
    for name, flops in KNOWN_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops, f"data sheet ({kind})"
    return measure_matmul_peak(dtype=jnp.dtype(compute_dtype)), f"measured {compute_dtype} matmul ({kind})"


class MetricsWriter:
    def __init__(self, run_dir: pathlib.Path, tensorboard: bool, resume_step: int | None = None):
        """`resume_step`: a resumed run drops the records a crashed run wrote after its checkpoint."""
        self.enabled = jax.process_index() == 0
        self.path = run_dir / "metrics.jsonl"
        if self.enabled and resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter  # writes event files without TensorFlow

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self._tb:
            self._tb.close()


def read_metrics(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_loss_curve(metrics_path: pathlib.Path, out_png: pathlib.Path) -> None:
    """Train and eval loss against step, as a PNG for people to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
