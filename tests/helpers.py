"""Driving `jaxgen` from outside, as users and clusters do: subprocesses, signals, limits."""

from __future__ import annotations

import os
import pathlib
import resource
import signal
import subprocess
import sys
import time

from jaxgen.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli_env(devices: int = 1) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def run_jaxgen(*args: str, devices: int = 1, timeout: int = 300, file_size_limit: int | None = None,
               crash: tuple[str, int] | None = None, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    """`python -m jaxgen ARGS` to completion.

    `file_size_limit` (bytes): bigger writes fail as on a full disk. `crash`:
    (mode, step) of tests/crash_driver.py, which dies hard around that save.
    """
    program = [str(REPO / "tests" / "crash_driver.py"), crash[0], str(crash[1]), "--"] if crash else ["-m", "jaxgen"]
    return subprocess.run([sys.executable, *program, *args], cwd=cwd, env=cli_env(devices), text=True,
                          capture_output=True, timeout=timeout, preexec_fn=_disk_of(file_size_limit))


def start_jaxgen(*args: str, devices: int = 1) -> subprocess.Popen:
    """`python -m jaxgen ARGS` in the background, in a process group of its own (as a job scheduler starts it).

    A file-size limit set on it later (resource.prlimit) makes writes fail as on a full disk.
    """
    return subprocess.Popen([sys.executable, "-m", "jaxgen", *args], cwd=REPO, env=cli_env(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_disk_of(None))


def _disk_of(file_size_limit: int | None):
    def in_child():  # writes past the limit fail with EFBIG instead of killing the process with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return in_child


def wait_for(condition, timeout: float = 180, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def losses(run_dir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def logged_steps(run_dir: pathlib.Path, key: str = "loss") -> list[int]:
    """Steps of the records holding `key`, in file order (each should appear once)."""
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("jaxgen: error:")]
