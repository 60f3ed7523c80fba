"""`python -m jaxgen` and the `jaxgen` command."""

import os
import sys
import threading
import time

from jaxgen.allocator import use_tcmalloc
from jaxgen.errors import ConfigError, describe
from jaxgen.interrupts import end_cleanly_on_ctrl_c, exit_interrupted


def start_cleanly() -> None:
    """The first lines of `jaxgen` and of the benchmarks, before anything heavy is imported."""
    end_cleanly_on_ctrl_c()  # before anything else: Ctrl-C during the imports must end cleanly too
    try:
        use_tcmalloc()  # re-executes the process (and its caller) on tcmalloc where installed
    except ConfigError as err:
        line, status = describe(err)
        print(f"jaxgen: {line}", file=sys.stderr, flush=True)
        sys.exit(status)


def run() -> None:
    start_cleanly()
    try:
        from jaxgen.cli import main
        from jaxgen.launch import watch_launcher
    except KeyboardInterrupt:
        exit_interrupted()

    watch_launcher()  # only in a process `jaxgen launch local` started: stops it when the launcher dies
    status = main()
    if status != 0:
        leave_within(EXIT_GRACE_S, status)
    sys.exit(status)


# A failure can leave a library's threads waiting for what will never come (Orbax's, after a save that failed
# half-way for want of file descriptors), and Python waits for them as it exits: for ever, the failure's line
# already said. A failed command gets this long to end on its own.
EXIT_GRACE_S = 60.0


def leave_within(seconds: float, status: int) -> None:
    def leave() -> None:
        time.sleep(seconds)
        os._exit(status)

    threading.Thread(target=leave, name="jaxgen-exit-deadline", daemon=True).start()


if __name__ == "__main__":
    run()
