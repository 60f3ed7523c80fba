"""`jaxgen launch local`: N JAX processes on this machine, joined over loopback.

The same multi-controller program a cluster runs, on one host: each process
gets M simulated CPU devices and the JAXGEN_* variables that `jaxgen.distributed`
reads. Output lines are prefixed with the process index. When one process
fails, the others are stopped (they could only wait for it); the launcher's
exit status is the first failure's, and where that process only relayed
another's failure (`jaxgen.peer_stops`), the launcher names the one that
failed. SIGTERM / SIGINT to the launcher reach every
process, so a run saves its checkpoint as it would under a cluster scheduler; a
hang-up (SIGHUP: the terminal or SSH session closed) reaches them as SIGTERM, and
the launcher keeps draining their output, wherever its own can no longer go, until
they have saved and stopped.

When the launcher itself dies (SIGKILL, the out-of-memory killer), there is no one
left to forward anything, so each process watches for that itself
(`watch_launcher`, started by `python -m jaxgen` when JAXGEN_LAUNCHER_PID is set):
within a second it sends itself SIGTERM, so the run saves a checkpoint at a step
every process agrees on and exits with 75, and if it is still running
ORPHAN_GRACE_S later it kills itself. No process trains on unsupervised, and a
launcher started again on the same run directory finds no old process still
writing there.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TextIO

from jaxgen.device_memory import host_available_bytes, human_bytes
from jaxgen.distributed import ENV, refuse_busy_port
from jaxgen.errors import EXIT_PREEMPTED, ConfigError

# After one process fails, how long the others get to exit by themselves before SIGKILL.
STOP_GRACE_S = 5.0

# Set in every process the launcher starts: the PID whose death means "stop".
LAUNCHER_PID_ENV = "JAXGEN_LAUNCHER_PID"
# How often a launched process checks that its launcher is still its parent.
LAUNCHER_POLL_S = 0.5
# How long a process whose launcher is gone may take to save and exit before it
# kills itself. Saving a local run takes seconds; the clean stop can also never
# come (a peer already dead, a process stuck in a collective or still compiling),
# and the old processes must be gone before a requeued launcher starts new ones.
ORPHAN_GRACE_S = 20.0
# The line a process prints when it stops because another process of the run failed (jaxgen.peer_stops).
RELAYED_STOP = re.compile(r"jaxgen: error: process (\d+) stopped: ")
# How long the launcher waits for a failed process's last lines to be copied before it says why it stopped.
LAST_LINES_S = 1.0
# What one process holds before any model or data (Python, JAX, XLA's CPU client and jaxgen), at least.
PROCESS_BYTES = 512 * 2**20


@dataclasses.dataclass
class Copied:
    """What the launcher has passed on of its processes' output: each one's last `jaxgen:` line, and how many
    lines in all."""

    last_words: dict[int, str] = dataclasses.field(default_factory=dict)
    lines: int = 0


def free_port() -> int:
    """A TCP port on loopback that is free now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: Mapping[str, str], index: int, processes: int, devices_per_process: int, port: int) -> dict:
    """Environment of process `index`: its place in the run, its CPU devices and its launcher (the caller)."""
    kept_flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    return {
        **base,
        ENV["coordinator_address"]: f"127.0.0.1:{port}",
        ENV["num_processes"]: str(processes),
        ENV["process_id"]: str(index),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join([*kept_flags, f"--xla_force_host_platform_device_count={devices_per_process}"]),
        "PYTHONUNBUFFERED": "1",  # lines appear as they are printed, in order across processes
        LAUNCHER_PID_ENV: str(os.getpid()),
    }


def exit_code(returncode: int) -> int:
    """A shell-style status: killed by signal N reads as 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def launch_local(command: Sequence[str], processes: int, devices_per_process: int, port: int | None = None,
                 out: TextIO = sys.stdout) -> int:
    """Run `command` (an argv) as `processes` JAX processes; returns the run's exit status."""
    if processes < 1:
        raise ValueError(f"--processes {processes} must be at least 1")
    if devices_per_process < 1:
        raise ValueError(f"--devices-per-process {devices_per_process} must be at least 1")
    if not command:
        raise ValueError("no command to launch; put it after --, e.g. -- train --config configs/lm_tiny.yaml")
    if processes * PROCESS_BYTES > (available := host_available_bytes()):
        raise ConfigError(f"--processes {processes} would start {processes} JAX processes on this machine, about "
                          f"{human_bytes(PROCESS_BYTES)} each before any model or data, more than the "
                          f"{human_bytes(available)} it has available; give at most {available // PROCESS_BYTES}")
    if port is not None:
        refuse_busy_port(port, "--port, or leave --port out to take one that is free")
    port = port or free_port()
    started = [_start(command, process_env(os.environ, i, processes, devices_per_process, port))
               for i in range(processes)]
    procs = [proc for proc, _ in started]
    lock = threading.Lock()
    copied = Copied()
    copiers = [threading.Thread(target=_copy_prefixed, args=(output, i, out, lock, copied), daemon=True)
               for i, (_, output) in enumerate(started)]
    for t in copiers:
        t.start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        status, ending = _wait(procs, out, lock, copiers, copied)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in copiers:
            t.join(timeout=STOP_GRACE_S)
    if ending is not None and copied.lines > ending[1]:  # the others' last lines (a C++ stack dump of a
        _write(out, f"[launch] the run stopped: {ending[0]}\n")  # process aborted by JAX) came after its line
    return status


def _start(command: Sequence[str], env: Mapping[str, str]) -> tuple[subprocess.Popen, TextIO]:
    """Start one process with stdout and stderr into one pipe; returns it and the pipe's read end."""
    read_end, write_end = os.pipe()
    # The process also inherits the read end of its own output pipe, and never reads
    # it. Once the launcher is gone that keeps the pipe open, so the run's next print
    # does not fail with a broken pipe (ending the run before it can save) in the
    # moment before `watch_launcher` notices and sends its output elsewhere.
    try:
        proc = subprocess.Popen(list(command), env=env, stdout=write_end, stderr=subprocess.STDOUT,
                                pass_fds=(read_end,))
    finally:
        os.close(write_end)
    return proc, open(read_end, errors="replace")


def _wait(procs: list[subprocess.Popen], out: TextIO, lock: threading.Lock, copiers: list[threading.Thread],
          copied: Copied) -> tuple[int, tuple[str, int] | None]:
    """Wait for all; on the first failure stop the rest. Returns 0 or the first failure's status, and what the
    launcher said of that failure with the number of lines copied until then (None where all succeeded)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index, code = failed[0]
            status = exit_code(code)
            others = len(procs) > 1
            copiers[index].join(timeout=LAST_LINES_S)  # its last line, copied, says whether it only relayed
            cause = failed_first(index, copied.last_words.get(index, ""), len(procs))
            after = f" after process {cause} failed (its line says why)" if cause is not None else ""
            if cause is None and (paused := suspended(procs)):  # JAX aborts the others when its heartbeats stop
                after = (f" after process {paused[0]} was suspended (SIGSTOP or Ctrl-Z) and sent no heartbeats; "
                         "resume a job with SIGCONT before --heartbeat-timeout")
            what = (("saved a checkpoint and stopped (status 75)" + "; waiting for the others" * others)
                    if status == EXIT_PREEMPTED else how_it_ended(code) + after + "; stopping the others" * others)
            with lock:
                _write(out, f"[launch] process {index} {what}\n")
                lines = copied.lines
            _stop(procs)
            ended = "saved a checkpoint and stopped (status 75)" if status == EXIT_PREEMPTED else how_it_ended(code)
            return status, (f"process {index} {ended}{after}", lines)
        if all(c == 0 for c in codes):
            return 0, None
        time.sleep(0.1)


def failed_first(index: int, last_line: str, processes: int) -> int | None:
    """The process whose failure process `index` relayed, by its last `jaxgen:` line; None where it failed itself.

    Process 0 hosts the coordination service and so leaves last when it fails
    (`jaxgen.peer_stops`): the first process to exit is then one that relayed its line.
    """
    relayed = RELAYED_STOP.match(last_line)
    cause = int(relayed.group(1)) if relayed else None
    return cause if cause is not None and cause != index and cause < processes else None


def suspended(procs: list[subprocess.Popen]) -> list[int]:
    """The processes still running but stopped by a signal (state T in /proc; none where there is no /proc)."""
    paused = []
    for index, proc in enumerate(procs):
        try:
            stat = pathlib.Path(f"/proc/{proc.pid}/stat").read_text()
        except OSError:
            continue
        if proc.poll() is None and stat.rpartition(")")[2].split()[:1] in (["T"], ["t"]):
            paused.append(index)
    return paused


def how_it_ended(returncode: int) -> str:
    """A failed process's end in words: a signal is named, and SIGKILL, which no process sends itself, says who
    usually sends it (the others then die of missed heartbeats, with a stack dump that does not say why)."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    cause = " (the out-of-memory killer, or kill -9)" if -returncode == signal.SIGKILL else ""
    return f"was killed by {name}{cause}, status {exit_code(returncode)}"


def _stop(procs: list[subprocess.Popen]) -> None:
    # Peers of a failed process usually fail by themselves within a second (their
    # collectives lose a partner) and a preempted run's peers are finishing their
    # save, so they get a grace period. Then SIGKILL: in a multi-process run JAX
    # takes SIGTERM as a preemption notice, which a run missing a process cannot honour.
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _copy_prefixed(stream: TextIO, index: int, out: TextIO, lock: threading.Lock, copied: Copied) -> None:
    # Reading goes on when writing fails (a closed terminal or pipe): a process whose
    # output pipe fills up would block in the middle of saving.
    for line in stream:
        if line.startswith("jaxgen: "):
            copied.last_words[index] = line
        with lock:
            _write(out, f"[{index}] {line}")
            copied.lines += 1


def _write(out: TextIO, text: str) -> None:
    try:
        out.write(text)
        out.flush()
    except (OSError, ValueError):  # ValueError: written to after being closed
        pass


def watch_launcher(environ: MutableMapping[str, str] = os.environ) -> None:
    """In a process `launch_local` started: stop when the launcher is gone. Elsewhere: nothing.

    Stopping is SIGTERM to itself (the run saves as if preempted and exits with 75),
    then SIGKILL to itself if it is still running ORPHAN_GRACE_S later.
    """
    launcher_pid = environ.pop(LAUNCHER_PID_ENV, None)  # processes this one starts have another parent
    if launcher_pid is not None:
        threading.Thread(target=_stop_when_orphaned, args=(int(launcher_pid),), name="watch-launcher",
                         daemon=True).start()


def _stop_when_orphaned(launcher_pid: int) -> None:
    # A process whose parent dies is adopted by init (or a subreaper), so its parent
    # PID changes for good; unlike asking whether `launcher_pid` runs, a new process
    # reusing that PID cannot fool this.
    while os.getppid() == launcher_pid:
        time.sleep(LAUNCHER_POLL_S)
    _discard_output()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _discard_output() -> None:
    # No one reads this process's output any more: once the pipe filled up, the next
    # write would block the run in the middle of stopping.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (sys.stdout.fileno(), sys.stderr.fileno()):
        os.dup2(devnull, fd)
    os.close(devnull)
