"""Ctrl-C ends `jaxgen` cleanly from its first moment: one line and an exit status, at once.

Outside the training loop there is nothing to save, and every file jaxgen
writes appears whole or not at all (temporary names and renames), so the
process leaves immediately instead of unwinding: a KeyboardInterrupt raised
inside `import jax`, an XLA compile or a garbage-collection callback can leave
JAX half-initialised, crash the interpreter's teardown, or be swallowed. The
training loop replaces the handler while it trains (Ctrl-C then saves at the
next step and exits 75; a second Ctrl-C leaves at once). Only the standard
library is imported here, so the handler is installed before anything heavy.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from jaxgen.errors import describe

_on_ctrl_c = {"status": 130, "line": describe(KeyboardInterrupt())[0]}


def exit_interrupted(line: str | None = None, status: int | None = None) -> None:
    """Print the interruption's one line and leave at once."""
    sys.stderr.write(f"jaxgen: {line or _on_ctrl_c['line']}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(_on_ctrl_c["status"] if status is None else status)


def _on_sigint(signum, frame) -> None:
    exit_interrupted()


def end_cleanly_on_ctrl_c() -> None:
    """Install the handler (only the main thread can)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
        # Blocked across jaxgen.allocator's re-execution: a Ctrl-C that came meanwhile arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def after_ctrl_c(status: int, line: str) -> None:
    """What a later Ctrl-C reports: e.g. 75 once a run's final checkpoint is saved."""
    _on_ctrl_c.update(status=status, line=line)
