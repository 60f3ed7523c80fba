"""Every error a user can cause, and the exit status the CLI gives it.

Library code raises these with a message that names the bad value (key, file,
step) and what would be valid; `jaxgen.cli.main` prints one `jaxgen: error:`
line and exits with the class's status. Nothing here imports the rest of
jaxgen, so every layer can raise them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import traceback
from typing import TypeVar


class JaxgenError(Exception):
    """A mistake or failure the user can act on; the message says what and how."""

    exit_status = 2
    # Raised alike by every process of a multi-process run (a check they made together), so none tells the
    # others of it (jaxgen.peer_stops): one that did could reach another first, as `process 0 stopped: <the
    # same line>` in place of its own.
    every_process_knows = False


Known = TypeVar("Known", bound=JaxgenError)


def on_every_process(err: Known) -> Known:
    """`err`, marked as raised alike by every process of the run."""
    err.every_process_knows = True
    return err


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


# EX_TEMPFAIL from sysexits.h: "try again later". The launchers in launch/ requeue on it.
EXIT_PREEMPTED = 75


class Preempted(JaxgenError):
    """SIGTERM or SIGINT asked a run to stop; it saved a checkpoint first. Not a mistake: a pause."""

    exit_status = EXIT_PREEMPTED

    def __init__(self, step: int | None, again: str = "run the same command again"):
        saved = f"saved a checkpoint at step {step}" if step is not None else "nothing was saved"
        super().__init__(f"preempted: {saved} and stopped; {again} to resume")
        self.step = step


class CheckpointWriteError(JaxgenError, RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); earlier ones are intact.

    `reason` is the failure in words, `errno` the system's error number when one caused it.
    """

    exit_status = 1

    def __init__(self, message: str, reason: str = "", code: int | None = None):
        super().__init__(message)
        self.reason, self.errno = reason or message, code


class OutputWriteError(JaxgenError, RuntimeError):
    """A file a run writes while training (its records, samples, results) failed; the message says what was saved
    first."""

    exit_status = 1


class NonFiniteError(JaxgenError, RuntimeError):
    """A step produced non-finite values and the run stopped without saving them."""

    exit_status = 1


class PeerStopped(JaxgenError):
    """Another process of the run failed a check every process made together: its line."""

    every_process_knows = True

    def __init__(self, process: int, message: str, status: int):
        super().__init__(f"process {process} stopped: {message}")
        self.exit_status = status


class UsageError(JaxgenError):
    """A command line that cannot be parsed; the message says which argument and where to look."""


# What an OSError's errno means, in words a user acts on.
_OS_ERROR_WORDS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit was reached)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.EPIPE: "broken pipe",
}
# A broken pipe names no file: it is the command's own output, whose reader (`| head`, a `| tee` that was killed)
# stopped reading.
_CLOSED_OUTPUT = "the pipe this command's output or log goes to was closed by its reader (broken pipe)"


# TensorStore (Orbax's writer) reports a failed system call inside its message text, not as an OSError.
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")


def os_error_words(code: int, where: str | os.PathLike | None = None) -> str:
    """`code` in words; a full disk at `where` that still has room for data but can take no new file is said to
    be out of inodes, where `df -h` would show free space and the words 'no space left' mislead."""
    if code == errno.ENOSPC and where is not None and _out_of_inodes(where):
        return "no free inodes left on device (the file system can make no more files, though space remains)"
    if code == errno.EMFILE:  # the limit is the process's, whichever file met it
        import resource

        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (f"too many open files (this process may open {limit:,}: raise that with `ulimit -n`, or set "
                "data.workers lower)")
    return _OS_ERROR_WORDS.get(code) or os.strerror(code)


def _out_of_inodes(where: str | os.PathLike) -> bool:
    place = os.path.abspath(where)
    while not os.path.exists(place) and os.path.dirname(place) != place:
        place = os.path.dirname(place)
    try:
        usage = os.statvfs(place)
    except OSError:
        return False
    return usage.f_files > 0 and usage.f_ffree == 0 and usage.f_bavail > 0


def system_error_code(err: BaseException) -> int | None:
    """The errno behind `err`: an OSError it was raised from, or one TensorStore names in its text."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = _TENSORSTORE_OS_ERROR.search(str(e))
        if found:
            return int(found.group(1))
    return None


def describe_os_error(err: OSError) -> str:
    """'PATH: no space left on device' — the file and the reason in words."""
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    words = (os_error_words(err.errno, names[0] if names else None) if err.errno else None) or err.strerror or str(err)
    if not names and err.errno == errno.EPIPE:
        return _CLOSED_OUTPUT
    if err.errno == errno.ENOENT and not all(map(os.path.isabs, names or ["."])) and _working_directory_gone():
        words += (" (the current directory was removed after this command started in it: cd into one that exists, "
                  "or give absolute paths)")
    return f"{' -> '.join(names)}: {words}" if names else words


def _working_directory_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def json_problem(err: json.JSONDecodeError) -> str:
    """'Expecting value at column 5': the decoder's words (some end in "at" already) and the column."""
    return f"{err.msg.removesuffix(' at')} at column {err.colno}"


def listed(items: list[str], limit: int) -> str:
    """The first `limit` items joined by "; ", then how many more there are: a message names, it does not dump."""
    return "; ".join(items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else []))


def on_one_line(text: str) -> str:
    """`text` with its control characters escaped (a path holding a newline): a message is one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def listed_or(values: list) -> str:
    """'1, 2 or 4': the choices a message offers."""
    words = [str(v) for v in values]
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


def first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# What to change when a device runs out of memory: training's remedies mean nothing to a command that only reads.
OUT_OF_MEMORY_ADVICE = {
    "train": "make data.batch_size smaller, use train.microbatches, model.remat=full, or shard over more devices",
}
READER_OUT_OF_MEMORY_ADVICE = ("ask for less at once (fewer prompts or images, a smaller --batch-size or "
                               "--max-new-tokens), or read the model over more devices (mesh.fsdp=N with "
                               "sharding.preset=fsdp)")


def _raised_in(err: BaseException, source: str) -> bool:
    """Whether `err` was raised in the file `source` (its innermost frame)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.replace(os.sep, "/").endswith(source)


def describe(err: BaseException, command: str | None = None) -> tuple[str, int]:
    """The one line (after 'jaxgen: ') and exit status for any failure that reaches the command line
    (`command`: the jaxgen command that failed, whose remedies an out-of-memory error names)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(err, Preempted):
        return str(err), err.exit_status
    if isinstance(err, JaxgenError):
        return f"error: {err}", err.exit_status
    os_error = next((e for e in _chain(err) if isinstance(e, OSError) and e.errno), None)
    if os_error is not None:
        return f"error: {describe_os_error(os_error)}", 1
    if isinstance(err, MemoryError):
        return "error: out of host memory; make the model, batch or prefetch smaller", 1
    if lost_a_peer(str(err)):
        return (f"error: another process of the run stopped, breaking this one's collective ({first_line(err, 200)}); "
                "that process's own log says why, or nothing where it was killed outright (kill -9, the "
                "out-of-memory killer)"), 1
    # The machine's setting, not the code: a user error. A platform whose JAX plugin is not installed fails an
    # assertion inside JAX's backend set-up (an attribute error where Python drops assertions).
    unable = str(err).startswith("Unable to initialize backend")
    if unable or (os.environ.get("JAX_PLATFORMS") and isinstance(err, (AssertionError, AttributeError))
                  and _raised_in(err, "jax/_src/xla_bridge.py")):
        asked = os.environ.get("JAX_PLATFORMS", "")
        where = f"JAX_PLATFORMS={asked!r}" if asked else "the JAX platform asked for"
        why = (first_line(err, 240) if unable
               else "JAX has no backend for it: is its plugin, e.g. jax[cuda12], installed?")
        return (f"error: {where}: JAX cannot start it here ({why}); unset JAX_PLATFORMS to use what this machine has, "
                "or name what it has (cpu, cuda, rocm, tpu)"), 2
    if "RESOURCE_EXHAUSTED" in str(err):
        advice = OUT_OF_MEMORY_ADVICE.get(command or "train", READER_OUT_OF_MEMORY_ADVICE)
        return f"error: a device ran out of memory ({first_line(err, 200)}); {advice}", 1
    return f"error: unexpected {type(err).__name__}: {first_line(err)} (run with --debug for the traceback)", 1


# What a collective fails with when another process of the run has gone (Gloo, JAX's collectives on CPU): this
# process is not the one to blame, nor is the file it was reading. Gloo words it in several ways: "Gloo AllReduce
# failed: ... Connection closed by peer" where the other process exited, "Gloo all-reduce failed: ... Read error
# ...: Connection reset by peer" where it was killed outright (kill -9, the out-of-memory killer).
PEER_LOST = re.compile(r"connection (closed|reset) by peer|gloo ?[\w-]* failed", re.IGNORECASE)


def lost_a_peer(message: str) -> bool:
    return PEER_LOST.search(message) is not None


def _chain(err: BaseException):
    """`err` and the exceptions it was raised from or while handling."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
