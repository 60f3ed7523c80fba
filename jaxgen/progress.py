"""Progress bars that never stop the work they show.

A bar is a courtesy on stderr. Where stderr cannot be written (closed with `2>&-`, `/dev/full`, a `| head` that
has gone), the bar turns itself off and the work goes on; before, the bar's failed write stopped a run as a
failed output, before its first step. Where stderr is a file or a pipe (a cluster's log), the bar is redrawn at
most every LOG_INTERVAL_S seconds, so that a long run's log is not mostly bar.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


class _Unfailing:
    """A stream a bar writes to: its first failure silences it."""

    def __init__(self, stream: Any):
        self._stream, self.failed = stream, stream is None

    def write(self, text: str) -> None:
        self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def _call(self, name: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self._stream, name)(*args)
        except (OSError, ValueError):  # ValueError: a stream Python has closed
            self.failed = True

    def isatty(self) -> bool:
        try:
            return not self.failed and self._stream.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    def __getattr__(self, name: str) -> Any:  # what else tqdm asks of a stream (encoding, fileno)
        return getattr(self._stream, name)


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """`tqdm(iterable, **options)` on stderr, made safe: see the module's docstring."""
    stream = _Unfailing(sys.stderr)
    if not stream.isatty():
        options["mininterval"] = max(options.get("mininterval", 0.1), LOG_INTERVAL_S)
    return tqdm(iterable, file=stream, **options)
