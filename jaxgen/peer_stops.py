"""A process of a multi-process run that stops on an error tells the others, so they stop with its line.

Without it a process that fails alone mid-run (a full disk on its host, a
device error) printed its line and left, and every other process waited in
its next collective until JAX's coordination service aborted it from C++:
half a minute later, a stack dump, exit status 134, and no word of why on
process 0, whose log is the one people read. Now the failing process posts its
line to the coordination service's key-value store (the first failure is kept:
it is the cause, later ones its consequences), and a thread on every process,
waiting on that key from the moment the process joined, prints `jaxgen: error:
process N stopped: <its line>` and leaves with its exit status. The wait is one
blocking call to the service, which JAX's shutdown cancels at a normal exit.

Process 0 hosts the service, and every process still joined when it ends is
aborted from C++: so the process that posted leaves at once, process 0 last.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time

from jaxgen.interrupts import leave_with

log = logging.getLogger("jaxgen")

KEY = "jaxgen/stopped"
WAIT_MS = 3_600_000  # one blocking call per hour of a run; an answer comes the moment a process posts
POST_TIMEOUT_S = 5.0  # a coordination service that is gone must not keep a failing process from leaving
# Process 0 hosts the coordination service, whose end aborts every process still joined (a C++ stack dump): it
# leaves this long after the others are told, by when the process that posted has left.
SERVICE_LAST_S = 1.0
_posted = threading.Event()


def _client():
    from jax._src import distributed

    return distributed.global_state.client


def watch(process_index: int) -> None:
    """Start the thread that waits for another process's stop (after joining; a no-op without a client)."""
    client = _client()
    if client is not None:
        waiting = threading.Thread(target=_wait_for_stop, args=(client, process_index), name="jaxgen-peer-stops",
                                   daemon=True)
        waiting.start()
        atexit.register(_end_before_exit, waiting)  # runs before JAX's own clean-up, registered earlier


def _end_before_exit(waiting: threading.Thread) -> None:
    """At a normal exit, JAX's clean-up (which shuts the coordination client down, cancelling the wait), then
    the thread's end: a thread left waiting inside JAX's C++ while the interpreter finalises aborts the
    process ("terminate called after throwing ..."). JAX's own call at exit then finds nothing left to do."""
    try:
        jax_clean_up()()
    finally:
        waiting.join(timeout=10)


def jax_clean_up():
    """JAX's own clean-up at exit (backends first, then the coordination client), private in JAX; where a JAX
    release moved it, the public shutdown of the client, which is what cancels the wait."""
    try:
        from jax._src import api

        return api.clean_up
    except (ImportError, AttributeError):
        import jax

        return jax.distributed.shutdown


def _wait_for_stop(client, process_index: int) -> None:
    while True:
        try:
            posted = client.blocking_key_value_get(KEY, WAIT_MS)
        except Exception as err:  # noqa: BLE001 - the service's own errors, whatever JAX names them
            if "DEADLINE_EXCEEDED" in str(err):
                continue
            return  # cancelled by the shutdown of a normal exit, or the service is gone (JAX reports that)
        try:
            report = json.loads(posted)
            process, line, status = int(report["process"]), str(report["line"]), int(report["status"])
        except (ValueError, KeyError, TypeError):
            return
        if process != process_index:
            if process_index == 0:  # the coordination service's host leaves last: its end aborts the others
                time.sleep(SERVICE_LAST_S)
            leave_with(f"error: process {process} stopped: {line.removeprefix('error: ')}",
                       status if 0 < status < 256 else 1)
        return


def announce(process_index: int, line: str, status: int) -> None:
    """Post this process's stop for the others (unless another process posted first); never raises, and gives
    up after POST_TIMEOUT_S."""
    client = _client()
    if client is None:
        return
    report = json.dumps({"process": process_index, "line": line, "status": status})

    def post() -> None:
        try:
            client.key_value_set(KEY, report)
            _posted.set()
        except Exception as err:  # noqa: BLE001 - already posted by another process, or the service is gone
            log.debug("could not post this process's stop: %s", err)

    poster = threading.Thread(target=post, daemon=True)
    poster.start()
    poster.join(POST_TIMEOUT_S)


def announced() -> bool:
    """Whether this process posted its stop (so the others are told, and it may leave at once)."""
    return _posted.is_set()

