"""Ctrl-C (and SIGTERM) end `jaxgen` cleanly from its first moment: one line and an exit status, at once.

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

# What each stopping signal prints and exits with; a command may add what to do next (`advise`).
_ENDINGS = {signal.SIGINT: ["interrupted", 130], signal.SIGTERM: ["stopped by SIGTERM", 128 + signal.SIGTERM]}
_advice = {"text": ""}


def exit_interrupted(line: str | None = None, status: int | None = None, signum: int = signal.SIGINT) -> None:
    """Print the interruption's one line and leave at once."""
    ending, ending_status = _ENDINGS[signum]
    sys.stderr.write(("\n" if _progress_bar_open() else "") + f"jaxgen: {line or ending + _advice['text']}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(ending_status if status is None else status)


def _progress_bar_open() -> bool:
    """Whether a progress bar may be part-way along the console's last line (tqdm redraws its line with a
    carriage return), where the interruption's line would otherwise be appended to it."""
    bars = sys.modules.get("tqdm.std")
    return bool(bars is not None and getattr(bars.tqdm, "_instances", None))


def _on_signal(signum, frame) -> None:
    exit_interrupted(signum=signum)


def end_cleanly_on_ctrl_c() -> None:
    """Install the handlers (only the main thread can): Ctrl-C, and SIGTERM (a scheduler, `timeout`, `kill`),
    which would otherwise end the process without a word."""
    if threading.current_thread() is threading.main_thread():
        for signum in _ENDINGS:
            signal.signal(signum, _on_signal)
        # Blocked across jaxgen.allocator's re-execution: a Ctrl-C that came meanwhile arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def advise(text: str) -> None:
    """What an interrupted command should tell its user to do, e.g. "; run the same command again to continue"."""
    _advice["text"] = text


def after_ctrl_c(status: int, line: str) -> None:
    """What a later Ctrl-C or SIGTERM reports: e.g. 75 once a run's final checkpoint is saved."""
    for ending in _ENDINGS.values():
        ending[:] = [line, status]
    _advice["text"] = ""
