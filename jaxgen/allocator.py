"""tcmalloc for the `jaxgen` command where the system has it, chosen before anything is allocated.

XLA:CPU allocates a compiled step's temporary buffer afresh on every call (hundreds of MB for a
DiT-S/2 step), and glibc's malloc serves allocations that large with a fresh `mmap` each time: the
kernel then faults in and zeroes every page of it on first touch, every step. tcmalloc keeps freed
spans for reuse, so a step writes into memory the process already has (docs/performance.md has the
measurements). A process cannot change its allocator once running, so `jaxgen` re-executes itself
once, at its first line, with the library preloaded: same process id, arguments, standard streams
and signal handling, so job schedulers see no difference.

JAXGEN_ALLOCATOR chooses: `auto` (the default: tcmalloc when installed, else the system's),
`tcmalloc` (required: an error names the package when it is missing) or `system` (never re-execute).
A process that already preloads tcmalloc or jemalloc (set by hand, or inherited from a jaxgen
parent such as `jaxgen launch local`) keeps what it has. Nothing beyond the standard library and
jaxgen.errors is imported here: this runs before every other import of the command.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

from jaxgen.errors import ConfigError

VARIABLE = "JAXGEN_ALLOCATOR"
CHOICES = ("auto", "tcmalloc", "system")
# Debian/Ubuntu `libtcmalloc-minimal4` or `libgoogle-perftools4`; Fedora/RHEL `gperftools-libs`.
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")
ALREADY_PRELOADED = ("tcmalloc", "jemalloc")
# Set across the re-execution, while SIGINT is blocked; the new image removes it and unblocks.
HELD = "JAXGEN_CTRL_C_HELD"
# gperftools prints a line with a stack trace for every allocation above 1 GiB by default; a large
# model's parameters and optimizer state are such allocations, and expected.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62)}


def find_tcmalloc(dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """The first tcmalloc shared library installed in the usual places, if any."""
    for directory in dirs:
        for name in LIBRARIES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def preloading_environment(env: Mapping[str, str], library: str | None, platform: str) -> dict[str, str] | None:
    """The environment to re-execute with so that `library` is the allocator, or None to run as is."""
    choice = env.get(VARIABLE, "auto")
    if choice not in CHOICES:
        raise ConfigError(f"{VARIABLE}={choice!r} is not one of {', '.join(CHOICES)}")
    preloaded = env.get("LD_PRELOAD", "")
    if choice == "system" or any(name in preloaded for name in ALREADY_PRELOADED):
        return None
    if library is None or platform != "linux":
        if choice == "tcmalloc":
            raise ConfigError(f"{VARIABLE}=tcmalloc, but no tcmalloc library was found (looked for "
                              f"{' or '.join(LIBRARIES)} in {', '.join(LIBRARY_DIRS)}): install it (Debian and "
                              f"Ubuntu: apt-get install libtcmalloc-minimal4) or set {VARIABLE}=auto")
        return None
    return {**QUIET, **env, "LD_PRELOAD": f"{library} {preloaded}".strip()}


def use_tcmalloc() -> None:
    """Re-execute this process with tcmalloc preloaded when JAXGEN_ALLOCATOR and the system allow it.

    Returns only when the process keeps its allocator (or the re-execution itself failed). Call it
    after installing the process's Ctrl-C handler (Python's default will do): a Ctrl-C held across
    the re-execution is released to that handler when this returns in the new image.
    """
    if os.environ.pop(HELD, None) is not None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    env = preloading_environment(os.environ, find_tcmalloc(), sys.platform)
    if env is None:
        return
    # A Ctrl-C while the new image starts up would end it before its handler is installed, or with
    # a traceback: blocked, it waits (the mask survives exec) until the new image gets back here,
    # its handler installed again, and unblocks it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**env, HELD: "1"})
    except OSError:  # e.g. the interpreter was removed while running: go on with the system allocator
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def loaded_allocator(maps: str | None = None) -> str:
    """Which allocator this process runs on ("tcmalloc", "jemalloc" or "system"), from its mapped libraries."""
    if maps is None:
        try:
            with open("/proc/self/maps") as file:
                maps = file.read()
        except OSError:  # not Linux
            return "system"
    return next((name for name in ALREADY_PRELOADED if f"lib{name}" in maps), "system")
