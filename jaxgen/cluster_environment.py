"""What a cluster's environment must hold for JAX to place this process in the run, checked before JAX reads it.

JAX's own detection reads SLURM's, a Kubernetes indexed Job's or a GKE TPU slice's
variables and fails in its words: `int('abc')` for a SLURM_PROCID that is not a
number, "coordinator_address should be defined" where SLURM_PROCID is missing or
the `kubernetes` client is not installed, or a C++ abort. Each problem here is
named by its variable and what would be valid. Pure functions of the environment.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping


def slurm_markers(environ: Mapping[str, str]) -> bool:
    """Whether this process runs as a step of a SLURM job (its tasks then say how many there are)."""
    return "SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" in environ


def problem(cluster: str | None, environ: Mapping[str, str]) -> str | None:
    """What keeps JAX from placing this process in `cluster`'s run (detected from `environ`), or None."""
    if slurm_markers(environ) and "SLURM_NTASKS" in environ and not environ["SLURM_NTASKS"].isdigit():
        return (f"SLURM_NTASKS={environ['SLURM_NTASKS']!r} is not a number of tasks; SLURM sets it to the job "
                "step's task count (start the tasks with srun)")
    if cluster == "SLURM":
        tasks = int(environ["SLURM_NTASKS"])
        return _index("SLURM_PROCID", environ, tasks, "the task's rank, which srun sets") or _index(
            "SLURM_LOCALID", environ, None, "the task's rank on its node, which srun sets")
    if cluster == "Kubernetes indexed Job":
        if importlib.util.find_spec("kubernetes") is None:
            return ("this pod is part of a Kubernetes indexed Job, and JAX finds the other pods through the "
                    "`kubernetes` package, which is not installed: pip install 'jax[k8s]' in the image")
        return _index("JOB_COMPLETION_INDEX", environ, None, "the pod's index in the Job, which Kubernetes sets")
    if cluster == "Cloud TPU on GKE":
        hosts = environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES") or ""
        return _index("TPU_WORKER_ID", environ, len(hosts.split(",")), "this host's place among TPU_WORKER_HOSTNAMES")
    return None


# Each cluster engine's variable of a process's rank in its job, and of the job's process count where it has one.
RANK_VARIABLES = {"SLURM": "SLURM_PROCID", "Open MPI": "OMPI_COMM_WORLD_RANK",
                  "Kubernetes indexed Job": "JOB_COMPLETION_INDEX", "Cloud TPU on GKE": "TPU_WORKER_ID"}
COUNT_VARIABLES = {"SLURM": "SLURM_NTASKS", "Open MPI": "OMPI_COMM_WORLD_SIZE"}


def place(cluster: str | None, environ: Mapping[str, str]) -> str | None:
    """This process's place in `cluster`'s run, in the variables that give it, for a message; None where unknown."""
    rank, count = RANK_VARIABLES.get(cluster or ""), COUNT_VARIABLES.get(cluster or "")
    if rank is None or rank not in environ:
        return None
    return f"{rank}={environ[rank]}" + (f" of {count}={environ[count]}" if count and count in environ else "")


def _index(name: str, environ: Mapping[str, str], count: int | None, what: str) -> str | None:
    """A variable that must hold an index below `count` (any, where None); `what` says what it is."""
    if name not in environ:
        return f"{name} is not set: it is {what}, without which JAX cannot tell which process of the run this is"
    value = environ[name]
    if not value.isdigit() or (count is not None and int(value) >= count):
        valid = f"in 0..{count - 1}" if count is not None else "an integer of 0 or more"
        return f"{name}={value!r} is not {valid}: it is {what}"
    return None
