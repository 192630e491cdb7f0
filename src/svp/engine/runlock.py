"""Who owns a run folder: an OS file lock held for the whole run, and unique default names.

A training process (fresh or ``--resume``) holds an exclusive lock on ``<run>/run.lock``
from the moment it claims the folder until it exits. The lock is the operating system's
(``fcntl.flock`` on POSIX), so it is released on any exit, ``kill -9`` included, and a
stale lock file can never block anyone. The file records the holder's PID, host and
start time, which a refused second process names in its one-line error.

Windows: the same class locks one byte of the file far past its content with
``msvcrt.locking`` (released by the OS when the process ends); the file is left in place
on release because Windows cannot delete an open file. This branch is untested here (no
Windows machine); everything else about it is the POSIX path.

Network file systems: Linux emulates ``flock`` with POSIX locks on NFS, so the lock holds
across hosts sharing the folder as long as the server supports locking.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from typing import List, Optional, Tuple

from ..errors import ConfigError, ResumeError
from ..io import mkdir_error, shell_word

LOCK_FILE = "run.lock"
_WIN_LOCK_OFFSET = 1 << 20  # lock a byte past the holder record so others can still read it

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt


# descriptors of the locks this process holds. A forked child (a DataLoader worker) closes its
# copies at once: an flock belongs to the open file, so a worker outliving a killed trainer by
# a few seconds would otherwise keep the folder locked that long
_HELD = set()


def _close_inherited() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


class LocksRefused(ResumeError):
    """A folder's file system refuses locks: every folder there would be refused the same way."""


class LocksUnavailable(OSError):
    """The file system refused the lock call itself (NFS without its lock daemon: ENOLCK), as
    opposed to a lock another process holds."""


# what flock says of a lock another process holds; any other error is the file system's
_HELD_ERRNOS = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


def _try_lock(fd: int) -> bool:
    """True: locked; False: another process holds it; :class:`LocksUnavailable` else (every
    failure read as "in use by another process" refused every run on such a file system with a
    false holder: review)."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as e:
        if fcntl is not None and e.errno not in _HELD_ERRNOS:
            raise LocksUnavailable(e.errno, e.strerror) from None
        return False


def _read_holder(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(info: dict) -> str:
    if not info.get("pid"):
        return "another process (it has not recorded its PID yet)"
    since = info.get("started")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return f"process {info['pid']} on host {info.get('host', '?')}{when}"


class RunLock:
    """An exclusive, non-blocking lock on one run folder. ``acquire`` raises
    :class:`ResumeError` naming the holder when another process has it."""

    def __init__(self, run_dir: str, lock_file: str = LOCK_FILE, what: str = "run folder",
                 advice: str = "a run folder belongs to one `svp train` at a time (wait for it to end, or use "
                               "another run.name)"):
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, lock_file)
        self.what, self.advice = what, advice   # (svp sweep locks its folder with another file and words)
        self.fd: Optional[int] = None

    def acquire(self, purpose: str = "train") -> "RunLock":
        for _ in range(10):
            existed = os.path.exists(self.path)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed under us (a failed run cleaning up)
                raise ResumeError(f"{self.what} {self.run_dir} disappeared while it was being claimed") from None
            except OSError as e:
                raise ResumeError(f"{self.what} {self.run_dir}: cannot create its lock file "
                                  f"{os.path.basename(self.path)} ({e.strerror or e}); is the folder "
                                  f"writable?") from None
            try:
                locked = _try_lock(fd)
            except LocksUnavailable as e:
                os.close(fd)
                if not existed:   # (the lock file made here: a folder made for the run is then removed empty)
                    try:
                        os.unlink(self.path)
                    except OSError:
                        pass
                raise LocksRefused(f"{self.what} {self.run_dir}: its file system refuses file locks "
                                  f"({errno.errorcode.get(e.errno, e.errno)}: {e.strerror}), which svp holds on a "
                                  f"{self.what} while it is in use (one process at a time); put it on a file "
                                  f"system with locks (a local disk; NFS with its lock service)") from None
            if not locked:
                os.close(fd)
                raise ResumeError(
                    f"{self.what} {self.run_dir} is in use by {describe_holder(_read_holder(self.path))}; "
                    f"{self.advice}")
            # the holder we waited for may have unlinked the file between our open and our lock:
            # then we locked an orphan inode and must start over on the current file
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                _HELD.add(fd)
                record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                     "purpose": purpose}).encode("utf-8")
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, record)
                return self
            os.close(fd)
        raise ResumeError(f"{self.what} {self.run_dir}: could not take its lock (it kept changing hands)")

    @property
    def held(self) -> bool:
        return self.fd is not None

    @staticmethod
    def file_outlives_hold() -> bool:
        """Windows: the lock file cannot be removed while it is open (held), and stays after
        release; a folder removed while held keeps it, and so itself."""
        return fcntl is None

    def release(self) -> None:
        if self.fd is None:
            return
        if fcntl is not None:
            # unlink while still holding the lock: a waiter that opened the old file sees the
            # inode change after it gets the lock and retries on a fresh file. Only our own file:
            # a run's folder removed (a fresh run that failed) and made again by another process
            # holds that process's lock file at this path, and unlinking it let a third process
            # lock the folder beside it (review 71)
            try:
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    os.unlink(self.path)
            except OSError:   # gone, or a folder made read-only: the file stays, unlocked, harmless
                pass
        _HELD.discard(self.fd)
        os.close(self.fd)  # releases the lock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def holder(run_dir: str) -> Optional[dict]:
    """The record of the process holding ``run_dir`` now, or None when nobody does."""
    path = os.path.join(os.path.abspath(run_dir), LOCK_FILE)
    if not os.path.isfile(path):
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            if fcntl is None:  # pragma: no cover - Windows: a region is freed at close only "when
                # system resources allow" (Microsoft): a run claiming the folder next was refused
                os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            return None  # (POSIX: closing the descriptor drops our probe lock)
        return _read_holder(path) or {"pid": None}
    except LocksUnavailable:   # nobody can hold it: taking it says why (RunLock.acquire)
        return None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- run names
def default_run_name(cfg: dict, token: Optional[str] = None) -> str:
    """``<dataset>-<method>-s<seed>-<YYYYmmdd-HHMMSS>-<6 hex>``: the random tail keeps two runs
    started in the same second apart (and :func:`claim_run_dir` retries on the rare clash)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # a dataset's "/" (hta/cub200) made a subfolder: runs/hta/cub200-svp-..., not the documented
    # runs/hta_cub200-svp-...
    dataset = str(cfg["data"]["dataset"]).replace("/", "_").replace(os.sep, "_")
    return f"{dataset}-{cfg['method']['name']}-s{cfg['train']['seed']}-{stamp}-{token or secrets.token_hex(3)}"


def _holds_a_run(run_dir: str) -> bool:
    from .checkpoint import RESUME_FILE
    return any(os.path.exists(os.path.join(run_dir, f)) for f in (RESUME_FILE, "results.json"))


def _makedirs(path: str, made: List[str]) -> None:
    """``os.makedirs(path, exist_ok=True)`` that appends the folders it makes to ``made``,
    outermost first, as it makes them (so a failure part-way still says what it made)."""
    todo, p = [], os.path.abspath(path)
    while not os.path.isdir(p):
        todo.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(todo):
        try:
            os.mkdir(d)
            if d not in made:   # (made again after a run beside this one removed it)
                made.append(d)
        except FileExistsError:   # made by someone else meanwhile: not ours to remove
            if not os.path.isdir(d):
                raise


def remove_made_folders(folders: List[str]) -> None:
    """Remove the folders :func:`claim_run_dir` made for a run that never started, innermost
    first, each only if still empty (another run may have put its folder beside it)."""
    for d in reversed(folders):
        try:
            os.rmdir(d)
        except OSError:
            return


def claim_run_dir(cfg: dict) -> Tuple[str, RunLock, List[str]]:
    """Create (or take over an empty) run folder for a fresh run and lock it.
    Returns ``(run_dir, lock, created)``; ``created`` lists the folders this call made,
    outermost first and the run folder last (empty when it took over an existing folder), so a
    run that fails before it writes anything may remove them: ``run.output`` and the folders of
    a ``run.name`` with ``/`` included. Call on the main rank only and broadcast the path
    (``distributed.broadcast_object``): the other ranks then agree on the name even when it is
    generated."""
    made: List[str] = []
    try:
        return _claim_run_dir(cfg, made)
    except BaseException:
        remove_made_folders(made)   # a run that could not even claim its folder leaves none made for it
        raise


def _claim_run_dir(cfg: dict, made: List[str]) -> Tuple[str, RunLock, List[str]]:
    out = cfg["run"]["output"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"run.output={out!r} is a file, not a folder; choose a folder for the runs")
    try:
        _makedirs(out, made)
    except OSError as e:
        raise ConfigError(f"run.output={out!r}: cannot create the folder ({mkdir_error(out, e)})") from None
    name = cfg["run"]["name"]
    for _ in range(100):
        run_dir = os.path.abspath(os.path.join(out, name or default_run_name(cfg)))
        try:
            _makedirs(os.path.dirname(run_dir), made)
            os.mkdir(run_dir)
            made.append(run_dir)
            created = list(made)
        except FileNotFoundError:
            continue   # a parent removed by a run that failed to start beside this one: make it again
        except FileExistsError:
            if not name:
                continue  # a generated name that is taken: draw another
            if not os.path.isdir(run_dir):
                raise ConfigError(f"run folder {run_dir} is a file, not a folder; choose another run.name") from None
            created = []
        except OSError as e:
            raise ConfigError(f"run.output={out!r}: cannot create run folder {run_dir} "
                              f"({mkdir_error(run_dir, e)})") from None
        break
    else:  # pragma: no cover - 100 clashes of 24 random bits
        raise ConfigError(f"run.output={out!r}: could not find a free run folder name")
    lock = RunLock(run_dir).acquire("train")
    if not created and _holds_a_run(run_dir):
        lock.release()
        from .checkpoint import RESUME_FILE
        if os.path.isfile(os.path.join(run_dir, RESUME_FILE)):
            advice = f"use `svp train --resume {shell_word(run_dir)}` to continue it, or choose another run.name"
        else:   # finished (results.json), or never saved: --resume would say "nothing to resume"
            advice = "it has nothing to resume; choose another run.name (or remove the folder to train it again)"
        raise ConfigError(f"run folder {run_dir} already holds a run; {advice}")
    return run_dir, lock, created


def lock_for_resume(run_dir: str) -> RunLock:
    if not os.path.isdir(run_dir):
        raise ResumeError(f"{run_dir}: no such run folder")
    return RunLock(run_dir).acquire("resume")
