"""`python -m jaxgen` and the `jaxgen` command."""

import sys

from jaxgen.interrupts import end_cleanly_on_ctrl_c, exit_interrupted


def run() -> None:
    end_cleanly_on_ctrl_c()  # before the heavy imports: Ctrl-C during them must end cleanly too
    try:
        from jaxgen.cli import main
        from jaxgen.launch import watch_launcher
    except KeyboardInterrupt:
        exit_interrupted()

    watch_launcher()  # only in a process `jaxgen launch local` started: stops it when the launcher dies
    sys.exit(main())


if __name__ == "__main__":
    run()
