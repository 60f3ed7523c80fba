"""Files that are never half-written, and directories with one writer at a time.

- `write_atomic`: the bytes go to a hidden temporary name in the
  same directory, reach the disk, and are renamed over the target. Readers see
  the old file or the new one; a full disk or a kill leaves no partial file
  under the real name.
- `append_line`: a record added to a log of lines (metrics.jsonl, eval.jsonl);
  a line an earlier writer left cut short (killed, or the disk full mid-write)
  stays a line of its own rather than swallowing the new record.
- `written_together`: the files a command writes in a block (`write_output`: a
  grid and its arrays) are renamed into place together when it completes; a
  failure at the second leaves the first as it was.
- `building(target)`: a directory is built under a hidden temporary name and
  renamed into place only when the block completes.
- `updating_alone`: a short wait for the one process that reads, changes and
  rewrites a file others update too, so neither drops what the other added.
- `DirectoryLock`: an OS lock (flock) on a lock file. The OS drops it when the
  holder dies, so a stale lock is simply taken over; the file names its holder
  (host, PID, command) so that a refused second writer is told who has it.
  Where the file system has no locks, that record stands in for one, with a
  warning: a holder still running on this host refuses.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator

from jaxgen.errors import DirectoryInUse
from jaxgen.interrupts import undone_on_leaving

log = logging.getLogger("jaxgen")


def _temporary_sibling(path: pathlib.Path, kind: str) -> pathlib.Path:
    """A hidden name unique to this process: never mistaken for the real file, never shared by two writers.

    Leftovers of processes of this host that died (killed while writing) are removed first.
    """
    prefix = f"{hidden_beside(path, kind).name}-{socket.gethostname()}-"
    for leftover in path.parent.glob(glob.escape(prefix) + "*"):
        pid = leftover.name[len(prefix):].removesuffix(".removed")  # (.removed: see _discard)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return path.with_name(f"{prefix}{os.getpid()}")


def absolute(path: str | os.PathLike) -> pathlib.Path:
    """`path` made absolute as the kernel follows it. A '..' after a symbolic link leads to the parent of the
    link's target, not back beside the link; normalizing the text (os.path.abspath, and TensorStore does it to
    every checkpoint path) gets that wrong and put one run's checkpoints half in each of two folders. So a path
    holding '..' is resolved, links and all; any other keeps the names it was given."""
    path = pathlib.Path(path)
    return pathlib.Path(os.path.realpath(path)) if ".." in path.parts else path.absolute()


def hidden_beside(path: pathlib.Path, kind: str) -> pathlib.Path:
    """`.NAME.KIND` beside `path`; where NAME's UTF-8 is over 150 bytes, its start and a digest of the whole. A
    hidden name built on an output's must fit the file system's 255 bytes a name (with a host name of up to 64,
    a process number and `.removed` added) whatever the output's own name, and stay the same for the same name
    (leftovers and locks are found by it)."""
    encoded = path.name.encode("utf-8", "surrogateescape")
    name = path.name if len(encoded) <= 150 else (
        encoded[:133].decode("utf-8", "ignore") + "~" + hashlib.sha256(encoded).hexdigest()[:16])
    return path.with_name(f".{name}.{kind}")


def nearest_existing(path: str | pathlib.Path) -> pathlib.Path:
    """`path` made absolute, or its nearest ancestor that exists: where an output not made yet will go."""
    path = absolute(path)
    return next(p for p in (path, *path.parents) if p.exists())


def unwritable_place(text: str, directory: bool = False) -> str | None:
    """Why output path `text` (a file, or a `directory`) is not one this process can make, else None: its nearest
    existing folder (parents are made when it is written) must be a directory that takes new files. Tried as
    writing would, with a trial file, so a read-only, foreign or special folder is named before the work."""
    path = absolute(text)
    if (link := _dangling_link(path if directory else path.parent)) is not None:
        what = "is" if link == path else f"leads through {str(link)!r},"
        return f"{text!r} {what} a symbolic link to {os.readlink(link)!r}, {_leads_nowhere(link)}"
    place = nearest_existing(path if directory else path.parent)
    if not place.is_dir():
        wanted = "give a directory" if directory else "give a file's path in a directory"
        return (f"{text!r} is a file; {wanted}" if place == path
                else f"{text!r} is under {str(place)!r}, a file; {wanted}")
    if (err := trial_file_fails(place)) is not None:
        return (f"{text!r} cannot be written: {str(place)!r} takes no new files "
                f"(a trial file there failed: {(err.strerror or str(err)).lower()})")
    return None


def _dangling_link(path: pathlib.Path) -> pathlib.Path | None:
    """The first of `path` and its ancestors that is a symbolic link leading nowhere (its target missing, or a
    loop of links): what would be made there cannot be, and `mkdir` says only that it already exists."""
    return next((p for p in (*reversed(path.parents), path) if p.is_symlink() and not p.exists()), None)


def _leads_nowhere(link: pathlib.Path) -> str:
    try:
        os.stat(link)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "one of a loop of links leading to each other; give another path"
    return "which does not exist; make its target first, or give another path"


def trial_file_fails(folder: str | pathlib.Path) -> OSError | None:
    """Why a new file cannot be made in `folder` (a read-only file system, another user's folder), tried as a
    write would; None where it can."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        return err
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | pathlib.Path, data: bytes | str, replace: bool = True) -> None:
    """Replace `path` with `data` in one step: afterwards it holds all of `data` or what it held before.

    `replace=False`: only where no `path` exists, else FileExistsError (another process's, written meanwhile,
    is kept whole); checked as the file is put in place, so two writers cannot both succeed.
    """
    path = pathlib.Path(path)
    tmp = _temporary_sibling(path, "tmp")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with undone_on_leaving(lambda: tmp.unlink(missing_ok=True)), open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _put_in_place_if_absent(tmp, path)
    except OSError as err:
        _remove(tmp)
        if err.filename in (None, str(tmp)):  # the temporary file's name means nothing to the user; theirs does
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        _remove(tmp)
        raise
    _fsync_directory(path.parent)


def _put_in_place_if_absent(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Rename `tmp` to `path` unless `path` exists (FileExistsError): a hard link fails where the name is taken."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError as err:  # a file system without hard links: checked, then renamed (a narrow race remains)
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _remove(leftover: pathlib.Path) -> None:
    """Remove a temporary file a failed write may have left; its removal must not replace the failure (on a
    read-only file system removing even a name that was never made fails, naming the temporary file)."""
    with contextlib.suppress(OSError):
        leftover.unlink(missing_ok=True)


# The outputs written so far in the innermost `written_together` block: (hidden name, the user's path).
_STAGED: contextvars.ContextVar[list[tuple[pathlib.Path, pathlib.Path]] | None] = contextvars.ContextVar(
    "staged_outputs", default=None)


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """The files `write_output` writes in the block go to hidden names beside their paths and are renamed into place
    only when the block completes: a failure (a full disk at the second file) leaves every path as it was."""
    staged: list[tuple[pathlib.Path, pathlib.Path]] = []
    token = _STAGED.set(staged)

    def discard() -> None:
        for hidden, _ in staged:
            _remove(hidden)

    try:
        with undone_on_leaving(discard):
            yield
            for hidden, path in staged:
                os.replace(hidden, path)
    finally:
        _STAGED.reset(token)
        discard()  # what was renamed into place is no longer there to remove


def write_output(path: str | pathlib.Path, data: bytes) -> None:
    """`path` replaced by `data` atomically, or, inside `written_together`, when the block completes."""
    path = pathlib.Path(path)
    staged = _STAGED.get()
    if staged is None:
        write_atomic(path, data)
        return
    hidden = _temporary_sibling(path, "together")
    try:
        write_atomic(hidden, data)
    except OSError as err:
        if err.filename == str(hidden) and err.errno:  # the hidden name means nothing to the user; theirs does
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    if (hidden, path) not in staged:
        staged.append((hidden, path))


def append_line(path: str | pathlib.Path, line: str) -> None:
    """Add `line` (no newline) to the end of `path` as one line, whole or not at all.

    A write that fails part-way (a full disk) is cut off again, so no half record stays
    behind for every later reader. Readers of such logs skip a line that does not parse
    (one a kill cut short); ending an unfinished one first keeps that loss to the damaged
    line alone.
    """
    made = not os.path.exists(path)
    try:
        with open(path, "a+b", buffering=0) as f:  # unbuffered: what is written is known, write by write
            size = f.seek(0, os.SEEK_END)
            unfinished = False
            if size > 0:
                f.seek(-1, os.SEEK_END)
                unfinished = f.read(1) != b"\n"
            data = (b"\n" if unfinished else b"") + line.encode() + b"\n"
            try:
                written = 0
                while written < len(data):  # a raw write may be short
                    written += f.write(data[written:])
            except OSError:
                f.truncate(size)
                raise
    except OSError as err:
        if made:  # an empty log this call made would read as one whose records were lost
            with contextlib.suppress(OSError):
                if os.path.getsize(path) == 0:
                    os.unlink(path)
        if err.filename is None:  # a failed write names no file; the user's log is the one to name
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


@contextlib.contextmanager
def building(target: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a hidden directory beside `target`; it becomes `target` when the block completes.

    `target` must not exist or be an empty directory. If the block raises (or
    the process dies), `target` is untouched and the temporary directory is
    removed (or, after a kill, left hidden).
    """
    target = pathlib.Path(target)
    tmp = _temporary_sibling(target, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with undone_on_leaving(lambda: _discard(tmp)):
            yield tmp
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.rename(tmp, target)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise DirectoryInUse(f"{str(target)!r} was written by another process while this one built it; "
                                 "nothing of this one's was kept: name a new directory") from None
    except OSError as err:
        _remove_for_good(tmp)
        # Name the output the user asked for: a failed write may name no file, or one under the hidden name.
        named = str(target) if err.filename is None else str(err.filename).replace(str(tmp), str(target), 1)
        if named != err.filename and err.errno:
            raise OSError(err.errno, err.strerror, named) from err
        raise
    except BaseException:
        _remove_for_good(tmp)
        raise
    _fsync_directory(target.parent)


def _discard(tree: pathlib.Path) -> None:
    """Remove `tree` while another thread may still be writing into it: first out of the way under a name of
    its own (files opened by their old path then fail instead of making it anew), then for good."""
    doomed = tree.with_name(tree.name + ".removed")
    try:
        os.rename(tree, doomed)
    except OSError:
        doomed = tree
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_for_good(tree: pathlib.Path, quiet_s: float = 0.5, give_up_s: float = 5.0) -> None:
    """Remove `tree` and see that it stays removed.

    A library's background writes can land moments after the failure that ended the block
    (Orbax's other array writes go on after the first fails, and TensorStore makes the
    folders it writes into), so one removal could leave a hidden partial tree behind.
    """
    deadline = time.monotonic() + give_up_s
    quiet_since = None
    while time.monotonic() < deadline:
        if tree.exists():
            shutil.rmtree(tree, ignore_errors=True)
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.05)


def _holder_now() -> dict:
    program = pathlib.Path(sys.argv[0]).name
    program = "python -m jaxgen" if program == "__main__.py" else program
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([program, *sys.argv[1:]])[:300],
    }


RUN_LOCK_FILE = ".jaxgen.lock"  # in a run directory: held by the run's training process (jaxgen.train.run_dir)


def lock_holder(lock_file: str | pathlib.Path) -> dict | None:
    """What the last holder of `lock_file` wrote of itself, read without taking the lock (taking it, even for a
    moment, could refuse the holder's own start); None where it holds nothing readable."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def live_holder(lock_file: str | pathlib.Path) -> dict | None:
    """`lock_holder`, where that process may still hold it: one on another host, or alive on this one (a killed
    holder leaves its record behind)."""
    holder = lock_holder(lock_file)
    pid = holder.get("pid") if holder else None
    if holder is None or (holder.get("host") == socket.gethostname()
                          and not (isinstance(pid, int) and pid > 0 and _alive(pid))):
        return None
    return holder


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another process (it left no name)"
    return (f"process {holder.get('pid')} on host {holder.get('host')} "
            f"(since {holder.get('since')}: {holder.get('command')})")


class DirectoryLock:
    """An exclusive lock on `lock_file`, held until `release` or the process's death.

    `what` names the locked thing in the refusal ("run directory 'runs/a'"), and
    `advice` says what to do instead.
    """

    def __init__(self, lock_file: str | pathlib.Path, what: str, advice: str):
        self.lock_file = pathlib.Path(lock_file)
        self.what, self.advice = what, advice
        self._fd: int | None = None
        self.record = b""  # what this holder wrote into the lock file

    def acquire(self) -> dict | None:
        """Take the lock or raise DirectoryInUse naming its holder.

        Returns the previous holder's record when it left one behind (it died
        without releasing: the lock was taken over), else None.
        """
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in _NO_LOCKS:
                    raise
                self._without_os_lock(fd, err)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirectoryInUse(f"{self.what} is in use by {describe_holder(holder)}; {self.advice}") from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read_holder(fd)
        try:
            payload = json.dumps(_holder_now()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, payload, 0)
            os.fsync(fd)
        except BaseException as err:
            os.close(fd)  # closing drops the lock
            if isinstance(err, OSError) and err.filename is None:  # a full disk: say where
                raise OSError(err.errno, err.strerror, str(self.lock_file)) from None
            raise
        self._fd, self.record = fd, payload
        return previous

    def _without_os_lock(self, fd: int, err: OSError) -> None:
        """Where the file system has no locks, the holder's record stands in for one: a holder on this host
        that still runs refuses (as BlockingIOError); one on another host cannot be asked, and a record left by
        a holder that died must not stop a restart, so the warning says what goes undetected."""
        holder = _read_holder(fd) or {}
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and _alive(pid):
            raise BlockingIOError(errno.EWOULDBLOCK, "held")
        log.warning("%s is on a file system without file locks (%s): a second writer started on this host is "
                    "refused, one on another host is not; see that only one job uses it", self.what,
                    os.strerror(err.errno).lower())

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # an empty file means "nobody": a later taker has no one to report
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def updating_alone(lock_file: str | pathlib.Path) -> Iterator[None]:
    """Held while this process reads a file that other processes update too, changes it and writes it back
    (the trainer and a user's `eval` merging tasks into one evals/<step>.json): without it, the later write
    drops what the other added. Waits for the holder, whose update is a moment's work; where the file system
    has no locks, goes on unguarded as before."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)  # closing drops the lock


# What flock fails with where a file system has no locks: Lustre mounted without `flock`, NFS without a lock
# daemon, some FUSE mounts (cloud buckets).
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None


def user_cache_dir() -> pathlib.Path:
    """What jaxgen keeps per user and machine between runs: $XDG_CACHE_HOME/jaxgen, else ~/.cache/jaxgen."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "jaxgen"


def make_private_directory(path: pathlib.Path) -> None:
    """Make `path` (and its parents) where it does not exist, itself readable and writable by this user alone
    whatever the umask: a compiled program read from a cache runs as the reader's code, so a cache others
    could write in (umask 000) would run theirs."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
