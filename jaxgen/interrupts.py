"""Ctrl-C (and SIGTERM) end `jaxgen` cleanly from its first moment: one line and an exit status, at once.

Outside the training loop there is nothing to save, and every file jaxgen
writes appears whole or not at all (temporary names and renames), so the
process leaves immediately instead of unwinding: a KeyboardInterrupt raised
inside `import jax`, an XLA compile or a garbage-collection callback can leave
JAX half-initialised, crash the interpreter's teardown, or be swallowed. The
training loop replaces the handler while it trains (Ctrl-C then saves at the
next step and exits 75; a second Ctrl-C leaves at once). Only the standard
library is imported here, so the handler is installed before anything heavy.

Python runs a signal's handler on the main thread, between bytecodes: while
that thread waits in C++ code that does not look for signals
(`jax.distributed.initialize` waiting for the other processes of a run, up to
its timeout; a collective whose peer hung) the handler waits too, and Ctrl-C
seemed to do nothing for minutes. So every signal a
handler here catches is also written to a pipe (`signal.set_wakeup_fd`) that a
watcher thread reads: where the handler would leave at once, the watcher
leaves for it, whatever the main thread is doing.

Leaving at once skips the `finally` blocks that remove what a command was still
building under a hidden name (an export's folder, a prepared dataset, a file's
temporary copy): those are registered here (`undone_on_leaving`) and removed
before the last line, so an interrupted command leaves nothing behind. Only
`kill -9` leaves them, and the next command writing the same output removes them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator

# What each stopping signal prints and exits with; a command may add what to do next (`advise`).
_ENDINGS = {signal.SIGINT: ["interrupted", 130], signal.SIGTERM: ["stopped by SIGTERM", 128 + signal.SIGTERM]}
_advice = {"text": ""}
# Taken by the first thread to leave (the main thread, the signal watcher, a peer's stop), so that one thread
# prints the last line; re-entrant, as a signal's handler can run on the main thread while it is leaving.
_leaving = threading.RLock()
_leaving_calls = {"count": 0}
# What the watcher does, at once, with a signal whose handler is not `_on_signal` (the training loop's), if anything.
_while_busy: dict[str, Callable[[int], None] | None] = {"act": None}
_watching = {"started": False}
# What to undo before leaving at once: the unfinished outputs of the blocks in progress, by registration.
_undo_on_leaving: dict[int, Callable[[], None]] = {}


def exit_interrupted(line: str | None = None, status: int | None = None, signum: int = signal.SIGINT) -> None:
    """Print the interruption's one line and leave at once."""
    ending, ending_status = _ENDINGS[signum]
    leave_with(line or ending + _advice["text"], ending_status if status is None else status)


def leave_with(line: str, status: int) -> None:
    """Print `jaxgen: <line>` and leave at once (unless another thread has the last word: see `claim_last_word`).

    Returns only where this thread is leaving already: a second signal (`kill` to a process group, then a
    launcher passing it on) whose handler ran on the main thread while it left, which printed a second line.
    """
    claim_last_word()
    _leaving_calls["count"] += 1  # only the thread with the last word gets here
    if _leaving_calls["count"] > 1:
        return
    for undo in reversed(list(_undo_on_leaving.values())):
        try:
            undo()
        except Exception:  # noqa: BLE001 - what cannot be undone is left for the next run to remove
            pass
    with contextlib.suppress(OSError):  # a log whose reader has gone (broken pipe) must not keep the process here
        sys.stderr.write(("\n" if _progress_bar_open() or _console["mid_line"] else "") + f"jaxgen: {line}\n")
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    os._exit(status)


@contextlib.contextmanager
def undone_on_leaving(undo: Callable[[], None]) -> Iterator[None]:
    """For the block's length, `undo()` runs if the process leaves at once (a signal, a peer's stop)."""
    key = id(undo)
    _undo_on_leaving[key] = undo
    try:
        yield
    finally:
        _undo_on_leaving.pop(key, None)


def claim_last_word() -> None:
    """Make this thread the one that prints the process's final line: returns at once, or never, where another
    thread (a signal's, a peer's stop) already prints its own and ends the process."""
    if not _leaving.acquire(blocking=False):
        threading.Event().wait()


_console = {"mid_line": False}


def streamed(text: str) -> None:
    """`text` was just written to the console as it came (a sample's tokens): a line that ends the command
    must start on a line of its own."""
    if text:
        _console["mid_line"] = not text.endswith("\n")


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
        _watch_signals()
        # Blocked across jaxgen.allocator's re-execution: a Ctrl-C that came meanwhile arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _watch_signals() -> None:
    """Start the watcher thread (once; from the main thread) that acts on signals the main thread is too busy
    to see."""
    if _watching["started"]:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the interpreter's C signal handler must never block on it
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    # A forked child keeps the wakeup descriptor but not the thread: its signals would end the parent.
    os.register_at_fork(after_in_child=lambda: _silence(write_fd))
    threading.Thread(target=_watch, args=(read_fd,), name="jaxgen-signals", daemon=True).start()
    atexit.register(_ignored_while_ending)  # first registered: the last exit handler to run
    _watching["started"] = True


def _ignored_while_ending() -> None:
    """What is left after the exit handlers is the interpreter's teardown (JAX's and XLA's objects freed, which
    takes a while), during which Python gives every signal it handled back its default action: a signal then
    ended a command that had finished (export printed its result, then exited 143 without a word). Nothing is
    left to lose or to say by then, so they are ignored: the exit status stays the command's own."""
    if threading.current_thread() is threading.main_thread():
        for signum in _ENDINGS:
            signal.signal(signum, signal.SIG_IGN)


def _silence(write_fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, write_fd)
    os.close(devnull)


def _watch(read_fd: int) -> None:
    while True:
        try:
            received = os.read(read_fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        for signum in received:
            act = _while_busy["act"]
            if signal.getsignal(signum) is _on_signal:
                exit_interrupted(signum=signum)
            elif act is not None:
                act(signum)


def while_busy(act: Callable[[int], None] | None) -> None:
    """Have the watcher thread call `act(signum)` at once for each signal whose handler is not this module's
    (the training loop's, which runs only between the main thread's bytecodes); None: nothing."""
    _while_busy["act"] = act


_again = {"text": "run the same command again"}


def again() -> str:
    """How a user goes on after a stop: "run the same command again", naming the run directory where the
    command chose it itself (`train` without --run-dir: the same command would start a new one)."""
    return _again["text"]


def name_the_run_dir(run_dir: str) -> None:
    """The stopped command's run directory was not given: `again()` names it."""
    _again["text"] = f"run the same command again with --run-dir {shlex.quote(str(run_dir))}"


def advise(text: str) -> None:
    """What an interrupted command should tell its user to do, e.g. "; run the same command again to continue"."""
    _advice["text"] = text


def after_ctrl_c(status: int, line: str) -> None:
    """What a later Ctrl-C or SIGTERM reports: e.g. 75 once a run's final checkpoint is saved."""
    for ending in _ENDINGS.values():
        ending[:] = [line, status]
    _advice["text"] = ""
