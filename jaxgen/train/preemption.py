"""Stop cleanly when the scheduler says so (SIGTERM), the user presses Ctrl-C (SIGINT) or the terminal goes (SIGHUP).

The loop asks `reached(step)` after every step. In a multi-process run JAX's
coordination service propagates a SIGTERM on any host to all of them and picks
one step where every process stops together (Ctrl-C, which a terminal sends to
every process of a launch, is turned into that SIGTERM); a single process just
notices its own signal. Either way the run saves at that step boundary, waits
for the save and exits with EXIT_PREEMPTED so a wrapper or scheduler can requeue
it. Process 0 says at once that it will save; a second Ctrl-C stops at once.

A hang-up (the terminal or SSH session closed) is a request to stop like SIGTERM:
by default it would kill the run without saving. Output to the lost terminal is
discarded from then on, so printing while stopping cannot fail.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
from jax.experimental import multihost_utils

from jaxgen.interrupts import again, exit_interrupted, while_busy

log = logging.getLogger("jaxgen")


# Said at once, so that a user who sees nothing happen for a step does not press Ctrl-C again.
SAVING = {signal.SIGINT: "Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once, "
                         "without it)",
          signal.SIGTERM: "SIGTERM: saving a checkpoint after this step, then stopping"}
# Ctrl-Cs closer together than this are taken for one keypress passed on twice.
ONE_KEYPRESS_S = 1.0


def again_line() -> str:
    return f"interrupted again before the checkpoint was saved; {again()} to continue from the last one"


class PreemptionWatch:
    def __init__(self):
        self._signalled: int | None = None
        self._ctrl_c = False
        self._multi_process = jax.process_count() > 1
        # With several processes JAX's own SIGTERM handler drives the agreement; a
        # local-only flag there would stop one process and hang the others. Ctrl-C
        # (which a terminal sends every process of a launch) is turned into it.
        signals = [signal.SIGINT] if self._multi_process else [signal.SIGTERM, signal.SIGINT]
        self._previous = {s: signal.signal(s, self._on_signal) for s in signals}
        self._previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
        self._first_ctrl_c: float | None = None  # when the watcher thread, or the main thread's handler, saw it
        self._told = False
        while_busy(self._at_once)

    def _at_once(self, signum: int) -> None:
        """From jaxgen.interrupts' watcher thread, while the main thread may be busy (waiting in C++ for a
        collective whose peer hung): say at once that the run will save, and stop at once on a second Ctrl-C.
        One keypress can arrive twice (from the terminal and from `jaxgen launch`, which passes it on): the
        watcher sees each, where the main thread's handler runs once for both."""
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_ctrl_c is None:
                self._first_ctrl_c = now
            elif now - self._first_ctrl_c >= ONE_KEYPRESS_S:
                exit_interrupted(again_line())
        self._tell(signum)

    def _tell(self, signum: int) -> None:
        if not self._told and signum in SAVING and jax.process_index() == 0:
            self._told = True
            log.warning(SAVING[signum])

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._ctrl_c:
            # The same keypress passed on twice runs this handler twice where the main thread handled the first
            # before the second came (a launcher slow to pass it on): that took it for a second Ctrl-C.
            if time.monotonic() - self._first_ctrl_c >= ONE_KEYPRESS_S:
                exit_interrupted(again_line())  # Ctrl-C twice: stop now, without waiting for the save
            return
        if signum == signal.SIGINT and self._first_ctrl_c is None:  # unless the watcher thread saw it first
            self._first_ctrl_c = time.monotonic()
        self._ctrl_c = self._ctrl_c or signum == signal.SIGINT
        if self._signalled is None:
            self._tell(signum)
        if self._multi_process:  # JAX's SIGTERM handler makes every process stop at the same step
            os.kill(os.getpid(), signal.SIGTERM)
        self._signalled = signum

    def _on_hangup(self, signum, frame) -> None:
        discard_terminal_output()
        if self._multi_process:  # JAX's SIGTERM handler makes every process stop at the same step
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self._signalled = signal.SIGTERM

    def reached(self, step: int) -> bool:
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled is not None

    def close(self) -> None:
        while_busy(None)
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def discard_terminal_output() -> None:
    """Send stdout and stderr that went to a terminal (now gone) to /dev/null; files and pipes keep theirs."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if os.isatty(fd):
                os.dup2(devnull, fd)
        except OSError:
            pass
    os.close(devnull)
