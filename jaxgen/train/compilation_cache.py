"""JAX's persistent compilation cache for a run: where it is, and kept usable when a write into it fails.

JAX writes an entry in place, under its final name, and never replaces an entry that exists. A write
that a full disk (or a kill) cut short therefore left an empty or partial entry that every later run
read, failed on with a warning, and compiled again, for good. So empty entries are removed before a
run uses the cache; an entry JAX could not write or read is removed as soon as it says so (those of
the program's name that no longer decompress); and each failure is said once, in one line naming
the directory, instead of JAX's two lines per program.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import logging
import os
import pathlib
import re
import warnings

import jax

from jaxgen.errors import ConfigError
from jaxgen.files import make_private_directory, user_cache_dir

log = logging.getLogger("jaxgen")

# JAX's persistent-cache events, counted for the summary: whether a run loaded its programs or compiled them.
CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}
cache_events: collections.Counter = collections.Counter()  # "failed": writes JAX counted but could not make
jax.monitoring.register_event_listener(
    lambda event, **_: cache_events.update([CACHE_EVENTS[event]]) if event in CACHE_EVENTS else None)
# An entry's file: "<program name>-<hash>-cache" (jax._src.lru_cache).
ENTRY_SUFFIX = "-cache"
# What JAX warns when an entry cannot be written or read (jax._src.compiler).
CACHE_WARNING = re.compile(r"Error (writing|reading) persistent compilation cache entry for '([^']*)': (.*)", re.S)
_said: set[str] = set()


def use_compilation_cache(setting: str | None) -> str | None:
    """Point JAX's persistent compilation cache where `train.compilation_cache_dir` says; the directory, if any.

    Every program is cached, however quickly it compiled: the many small ones of a run's
    start (initialisation, evaluation, sampling) add up to seconds on a CPU.
    """
    if not setting:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if setting == "auto":
        directory = (jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                     or str(user_cache_dir() / "compilation"))
        if directory.startswith(str(user_cache_dir())):
            with contextlib.suppress(OSError):  # one that cannot be made is named below
                make_private_directory(user_cache_dir())
    else:
        directory = str(pathlib.Path(setting).expanduser())
    problem = unwritable_directory(pathlib.Path(directory))
    if problem and setting == "auto":  # the default: a read-only home (a compute node, a container) trains uncached
        log.warning("train.compilation_cache_dir='auto': %s %r (%s); training without the compilation cache "
                    "(give a writable directory to keep compiled programs between runs)", problem[0], directory,
                    problem[1])
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if problem and problem[0] == "cannot create":
        raise ConfigError(f"train.compilation_cache_dir={setting!r}: {problem[0]} {directory!r} ({problem[1]}); "
                          "give a writable directory, 'auto' (the user cache), or null to disable the cache")
    if problem:  # a read-only cache (one a site shares): its programs are read; JAX's many-line warning at each
        # write it cannot make is said here once instead
        log.warning("train.compilation_cache_dir=%r: %s it (%s); programs found there are used, new ones are not "
                    "kept", setting, problem[0], problem[1])
        warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    else:
        remove_empty_entries(pathlib.Path(directory))
    watch_cache_warnings()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def unwritable_directory(directory: pathlib.Path) -> tuple[str, str] | None:
    """(what failed, why) where `directory` cannot be made or written in (JAX would warn at every compiled
    program, many lines each, and cache nothing), else None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return "cannot create", err.strerror or str(err)
    if not os.access(directory, os.W_OK | os.X_OK):
        return "cannot write in", "permission denied or a read-only file system"
    return None


def remove_empty_entries(directory: pathlib.Path) -> int:
    """Remove the entries of `directory` that hold nothing (no program compiles to nothing); how many."""
    removed = 0
    for entry in directory.glob(f"*{ENTRY_SUFFIX}"):
        try:
            if entry.stat().st_size == 0:
                entry.unlink()
                removed += 1
        except OSError:  # gone meanwhile (another run), or not ours to remove: JAX then compiles as before
            continue
    if removed:
        log.info("compilation cache %s: removed %d empty entries, left by writes a full disk cut short; their "
                 "programs are compiled and kept again", directory, removed)
    return removed


def remove_unreadable_entries(directory: pathlib.Path, program: str) -> int:
    """Remove the entries of `program` in `directory` that do not decompress (cut short); how many."""
    from jax._src.compilation_cache import decompress_executable

    removed = 0
    for entry in directory.glob(f"{glob.escape(program)}-*{ENTRY_SUFFIX}"):
        try:
            decompress_executable(entry.read_bytes())
        except OSError:
            continue
        except Exception:  # noqa: BLE001 - zlib's and zstandard's errors alike: the entry cannot be used
            try:
                entry.unlink()
                removed += 1
            except OSError:
                continue
    return removed


def watch_cache_warnings() -> None:
    """Have JAX's warnings about cache entries it could not write or read handled here (`cache_warning`)."""
    shown = warnings.showwarning
    if getattr(shown, "handles_cache_warnings", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if not cache_warning(str(message)):
            shown(message, category, filename, lineno, file, line)

    show.handles_cache_warnings = True
    warnings.showwarning = show


def cache_warning(message: str) -> bool:
    """Act on JAX's warning `message` if it is about a cache entry (remove what it left, say it once); whether
    it was."""
    found = CACHE_WARNING.fullmatch(message.strip())
    directory = jax.config.jax_compilation_cache_dir
    if found is None or not directory:
        return False
    action, program, why = found.groups()
    why = why.splitlines()[0] if why else why
    removed = remove_unreadable_entries(pathlib.Path(directory), program)
    if action == "writing":
        cache_events.update(["failed"])
        if action not in _said:
            log.warning("compilation cache %s: a compiled program could not be kept (%s); the run goes on, and "
                        "its programs are compiled again by later runs until the cache can be written", directory,
                        why)
    elif action not in _said:
        damaged = (f"; {removed} damaged entr{'y' if removed == 1 else 'ies'} of it (cut short by a full disk or a "
                   "kill) removed" if removed else "")
        log.warning("compilation cache %s: a compiled program of %r could not be read (%s)%s; compiled instead",
                    directory, program, why, damaged)
    _said.add(action)
    return True
