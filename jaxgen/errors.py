"""Every error a user can cause, and the exit status the CLI gives it.

Library code raises these with a message that names the bad value (key, file,
step) and what would be valid; `jaxgen.cli.main` prints one `jaxgen: error:`
line and exits with the class's status. Nothing here imports the rest of
jaxgen, so every layer can raise them.
"""

from __future__ import annotations


class JaxgenError(Exception):
    """A mistake or failure the user can act on; the message says what and how."""

    exit_status = 2


class ConfigError(JaxgenError, ValueError):
    """A configuration the user wrote cannot be used; the message says why."""


class DataError(JaxgenError, ValueError):
    """Input data cannot be used; the message names the file or pattern."""


class CheckpointError(JaxgenError, ValueError):
    """A checkpoint cannot be used as asked; the message says what differs or is damaged."""


class ExportError(JaxgenError, ValueError):
    """The export or import cannot be done as asked; the message names the option."""


class DirectoryInUse(JaxgenError):
    """Another process holds the directory's lock; the message names its host and PID."""


class CheckpointWriteError(JaxgenError, RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); earlier ones are intact."""

    exit_status = 1


class NonFiniteError(JaxgenError, RuntimeError):
    """A step produced non-finite values and the run stopped without saving them."""

    exit_status = 1
