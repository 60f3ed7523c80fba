"""What sharded arrays need per device, checked against what a device has, before anything is allocated.

A model too large for its devices (say `model.n_layers=1000000000`) would
otherwise spend minutes allocating before failing, or take the host down with
it. The figures come from abstract arrays (`jax.eval_shape`) and their
shardings alone. On CPU every (simulated) device shares the host's memory, so
the whole mesh's share is held against the host's available memory. JAX is imported
only where devices are asked, so the launcher can weigh host memory without it.
"""

from __future__ import annotations

import math
import os
from typing import Any

from jaxgen.errors import ConfigError


def bytes_per_device(abstract_tree: Any) -> int:
    """Bytes the largest device holds of `abstract_tree` (ShapeDtypeStructs carrying shardings)."""
    import jax

    per_device: dict = {}
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        nbytes = math.prod(shard) * leaf.dtype.itemsize
        for device in leaf.sharding.device_set if leaf.sharding is not None else jax.local_devices()[:1]:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


def capacity() -> tuple[int, int, str]:
    """(bytes one device may use, devices sharing that memory, what it is) for this process's devices."""
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), 1, f"a {device.device_kind} device holds"
    return host_available_bytes(), jax.local_device_count(), "this host has available"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as a container or `taskset` limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(what: str, parts: dict[str, int]) -> None:
    """Refuse, naming the figures, when `parts` (bytes per device by name) cannot fit a device."""
    need = sum(parts.values())
    limit, sharing, where = capacity()
    if need * sharing <= limit:
        return
    detail = ", ".join(f"{name} {human_bytes(n)}" for name, n in parts.items() if n)
    shared = f" ({sharing} devices x {human_bytes(need)})" if sharing > 1 else ""
    raise ConfigError(
        f"{what} needs at least {human_bytes(need)} per device ({detail}){shared}, more than the "
        f"{human_bytes(limit)} {where}; make the model smaller or shard it over more devices "
        "(mesh.fsdp with sharding.preset=fsdp)")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
