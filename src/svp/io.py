"""Atomic file writes, used for every file svp writes (run folders, adapters, cards,
figures): the content goes to a temporary file in the target folder, is fsync'ed, then
``os.replace``d over the target, so a crash or a kill leaves the old file or the new one,
never a torn one.

Temporary files and folders are named ``.svp-tmp-<pid>-<random>-<target name>`` (see
:func:`temp_name`), so the temporaries a killed writer left behind can be recognised
and removed (:func:`remove_stale_temps`; the engine does it when a run starts, resumes
and ends, while it holds the run folder's lock)."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["atomic_write", "atomic_write_group", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "json_text", "atomic_save_safetensors", "bytes_writer", "safetensors_writer", "atomic_replace_dir",
           "temp_name", "is_temp_name", "remove_stale_temps", "remove_dead_writers_temps", "TEMP_PREFIX",
           "DISK_ERRNOS", "mkdir_error", "user_path"]

TEMP_PREFIX = ".svp-tmp-"
# what a full or failing disk says, whichever write it stopped (a write()/fsync() names no file)
DISK_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EIO", "EROFS") if hasattr(errno, n))
# what svp <= 0.1's atomic writes left (mkstemp(prefix=".tmp-", suffix="-<name>")): removed too
_LEGACY_PREFIX = ".tmp-"


def user_path(value: str) -> str:
    """A path given on the command line with its leading ``~`` (or ``~user``) as the home folder:
    the shell expands ``~`` only at a word's start, so ``--out=~/runs`` and a quoted ``"~/runs"``
    reached svp as a folder named ``~`` (argparse ``type=`` for every path argument). An empty
    one is refused: ``--resume "$RUN"`` with RUN unset started a new run, ``--output ""`` wrote
    to the default folder (argparse names the flag)."""
    if isinstance(value, str) and not value.strip():
        import argparse
        raise argparse.ArgumentTypeError(f"{value!r}: expected a path, got an empty one")
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


def mkdir_error(path, e: OSError) -> str:
    """Why ``os.makedirs(path)`` failed, in words that name the cause: for a file, or a link to
    nothing, on the way, makedirs says "File exists" (or "Not a directory") of a folder that does
    not exist."""
    if isinstance(e, (FileExistsError, NotADirectoryError, FileNotFoundError)):
        p = os.path.abspath(os.fspath(path))
        while True:
            if os.path.lexists(p) and not os.path.isdir(p):
                return (f"{p} is a link to nothing" if os.path.islink(p) and not os.path.exists(p)
                        else f"{p} is a file, not a folder")
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
    return e.strerror or str(e)


_NAME_MAX = 255   # bytes in a file name: Linux, macOS and Windows file systems alike


def _fitted(prefix: str, base: str) -> str:
    """``prefix + base``, the end of ``base`` cut off where the whole would pass ``_NAME_MAX``
    bytes: a target named near the limit (valid) was refused as "File name too long", for
    its temporary's prefix. The target's own name is what the temporary becomes."""
    name = prefix + base
    while len(os.fsencode(name)) > _NAME_MAX and len(name) > len(prefix):
        name = name[:-1]
    return name


def temp_name(target: str) -> str:
    """A fresh temporary path next to ``target`` (same folder, so ``os.replace`` is atomic)."""
    d, base = os.path.split(os.path.abspath(os.fspath(target)))
    return os.path.join(d, _fitted(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-", base))


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) or name.startswith(_LEGACY_PREFIX)


def remove_dead_writers_temps(folder: str) -> List[str]:
    """Remove the temporary files that atomic writes of processes no longer alive on this host
    left directly in ``folder`` (killed mid-write): for a folder several processes may write at
    once (``svp visualize --out``), where ``remove_stale_temps`` could take a live write's file."""
    removed: List[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if os.name == "nt":   # (os.kill(pid, 0) there sends CTRL_C_EVENT, whose value is 0, to a console group)
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # (another user's process: alive)
        return True
    return True


def _alive_windows(pid: int) -> bool:
    """Whether process ``pid`` runs, asked of Windows itself: every writer counted as alive there,
    so a killed writer's temporaries were never removed (review45; not run on Windows)."""
    import _winapi
    try:
        handle = _winapi.OpenProcess(0x1000, False, pid)   # PROCESS_QUERY_LIMITED_INFORMATION
    except OSError as e:   # ERROR_INVALID_PARAMETER: no such process; else (access denied) another user's
        return getattr(e, "winerror", None) != 87
    try:
        return _winapi.GetExitCodeProcess(handle) == 259   # STILL_ACTIVE
    finally:
        _winapi.CloseHandle(handle)


def _dir_temps(final_dir: str):
    parent, base = os.path.split(os.path.abspath(final_dir).rstrip("/"))
    return (os.path.join(parent, f"{TEMP_PREFIX}new-{base}"), os.path.join(parent, f"{TEMP_PREFIX}old-{base}"))


def remove_stale_temps(folder: str) -> List[str]:
    """Remove every temporary file/folder of an atomic write under ``folder`` (recursively);
    returns the removed paths. A folder that a killed :func:`atomic_replace_dir` had already
    moved aside (and not yet replaced) is moved back first. Only call it while no other
    process writes there (the engine holds the run folder's lock)."""
    removed: List[str] = []
    if not os.path.isdir(folder):
        return removed
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            old_prefix = f"{TEMP_PREFIX}old-"
            if name.startswith(old_prefix):
                final = os.path.join(root, name[len(old_prefix):])
                if not os.path.exists(final):
                    os.replace(os.path.join(root, name), final)
    for root, dirs, files in os.walk(folder):
        for name in [d for d in dirs if is_temp_name(d)]:
            dirs.remove(name)  # do not descend into what is removed
            if _remove_path(os.path.join(root, name)):
                removed.append(os.path.join(root, name))
        for name in files:
            if is_temp_name(name) and _remove_path(os.path.join(root, name)):
                removed.append(os.path.join(root, name))
    return sorted(removed)


def _remove_path(path: str) -> bool:
    """Remove a file, a link (not what it points to) or a folder tree; whether it is gone (a
    link to a folder was "removed" while rmtree refused it, and stayed: review)."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return not os.path.lexists(path)


def _umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux 4.7+), else
    by setting and restoring it (macOS, Windows: a moment in which another thread's new files
    would get the 022 mask)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: str) -> int:
    """The mode a written file gets: the replaced file's, else what open() would give a new one
    (0666 less the umask). Every file was 0644 whatever the umask: a user's umask 077 gave
    world-readable resume points and adapters, a group-shared project's 002 no group write."""
    import stat
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def _fsync_dir(path: str) -> None:
    """Make a folder's entries (a rename into it) durable (POSIX; Windows has no folder fsync):
    without it a power loss after a rename could bring back the old file while metrics.jsonl,
    fsync'ed on each append, already listed what came after (review)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:   # (some file systems refuse a folder fsync: the rename stands as it is)
        pass
    finally:
        os.close(fd)


def _write_temp(path: str, write: Callable[[str], None]) -> str:
    """``write(tmp)`` into a fresh temporary next to ``path``, fsync'ed: ready to be moved in."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        write(tmp)
        # opened for writing: Windows flushes a file only through a handle that may write
        # (os.fsync of a read-only one fails there with EBADF, at every write svp makes)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _file_mode(path))  # created 0600 while partial
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` to produce the file, then move it into place atomically."""
    return atomic_write_group([(path, write)])[0]


def atomic_write_group(writes: Sequence[Tuple[Any, Callable[[str], None]]]) -> List[str]:
    """Several files that belong together (an adapter's weights and config): every one is written
    to its temporary first, then all are moved in, in the order given, one rename after the other.
    A failure or an interruption while any is being written leaves every old file in place; once
    the first is moved in, the rest are moved in too (renames: microseconds) before a
    KeyboardInterrupt goes on, so only a kill in those microseconds splits the group, or a rename
    that fails part-way (a target that is a folder; on Windows one another process holds open),
    which is raised with the files before it moved in."""
    paths = [os.fspath(p) for p, _ in writes]
    temps: List[str] = []
    try:
        for path, (_, write) in zip(paths, writes):
            temps.append(_write_temp(path, write))
    except BaseException:
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)
        raise
    try:
        _move_in(temps, paths)
    except BaseException:
        # a KeyboardInterrupt (or a signal handler's exception) after the first rename ran: the
        # rest go in too, so the group stays whole; before it, every old file still stands
        if not os.path.exists(temps[0]):
            try:
                _move_in(temps, paths)
            except OSError:   # (the rename that failed fails again: the original error is reported)
                pass
        for t in temps:
            if os.path.exists(t):
                os.unlink(t)
        raise
    return paths


def _move_in(temps: List[str], paths: List[str]) -> None:
    for tmp, path in zip(temps, paths):
        if os.path.exists(tmp):   # (gone: moved in already, before an interrupt)
            os.replace(tmp, path)
    for d in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        _fsync_dir(d)


def atomic_write_bytes(path, data: bytes) -> str:
    return atomic_write(path, bytes_writer(data))


def atomic_write_text(path, text: str) -> str:
    # surrogateescape: a path Python decoded under a non-UTF-8 locale (LC_ALL=C) holds its
    # undecodable bytes as lone surrogates; they are written back as those bytes, not refused
    return atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def printable(text: str, lines: bool = False) -> str:
    """``text`` with its control characters (C0, DEL, C1: ESC among them) written as ``\\xNN``,
    for names read from files that reach a terminal: a class name or an adapter folder holding
    escape sequences set the window's title, cleared the screen and printed fake lines (review41).
    ``lines``: a message's own line breaks kept (an error of several lines)."""
    return (_CONTROL_BUT_NEWLINE if lines else _CONTROL).sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


_LONG_WORD = re.compile(r"\S{1001,}")


def shortened(text: str) -> str:
    """``text`` with each run of more than 1,000 characters without a space cut to its two ends,
    for a one-line error: a 5,000-digit value was quoted whole, twice (10,092 characters; review40).
    A path stays whole (PATH_MAX is 4,096, but no one's paths come near 1,000)."""
    def cut(m):
        w = m.group()
        return f"{w[:100]}...[{len(w) - 140:,} characters]...{w[-40:]}"
    return _LONG_WORD.sub(cut, str(text))


def error_line(command: str, message) -> None:
    """``svp COMMAND: error: MESSAGE`` on stderr, the way every command says a user's mistake: its
    control characters escaped and its over-long runs cut (:func:`printable`, :func:`shortened`;
    the commands printing their own lines quoted a 5,000-character value or path whole: review46)."""
    print(f"svp {command}: error: {printable(shortened(message), lines=True)}", file=sys.stderr)


def shell_word(path: str) -> str:
    """``path`` as one word of the user's shell, for a command to paste (quoted where it has
    spaces or a shell's specials)."""
    if os.name == "nt":
        import subprocess
        return subprocess.list2cmdline([path])
    import shlex
    return shlex.quote(path)


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that later writes, and the interpreter's own flush at exit,
    do not raise BrokenPipeError again (the recipe of Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured in a test)
        pass


def print_or_drop(*args, **kwargs) -> None:
    """``print`` to stdout for work that goes on whoever reads it: `svp demo | head -3` stopped
    the demo at the next line (its runs and summary lost, "cannot write" blaming the folder)."""
    try:
        print(*args, **kwargs)
    except BrokenPipeError:
        quiet_stdout()


def finite_or_none(obj: Any) -> Any:
    """``obj`` with each non-finite float (nan, inf) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj: Any, **kw) -> str:
    """Strict JSON, what every file and answer svp writes is: a non-finite number (the loss of a
    run whose logits overflowed) is null. Python's default wrote a bare NaN, which jq, JavaScript's
    JSON.parse and strict parsers refuse."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kw)


def atomic_write_json(path, obj: Any, sort_keys: bool = False) -> str:
    return atomic_write_text(path, json_text(obj, indent=2, sort_keys=sort_keys) + "\n")


def bytes_writer(data: bytes) -> Callable[[str], None]:
    """A ``write(tmp)`` for :func:`atomic_write` / :func:`atomic_write_group` of ``data``."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return write


def safetensors_writer(path, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None
                       ) -> Callable[[str], None]:
    """A ``write(tmp)`` that saves ``tensors`` as ``path``'s safetensors file (errors name ``path``)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp):
        try:
            save_file(tensors, tmp, metadata=metadata)
        except Exception as e:
            # safetensors' own error for a failed write (a full disk: "... (os error 28)"): an
            # OSError naming the file, as every other write's
            m = re.search(r"\(os error (\d+)\)", str(e))
            if isinstance(e, OSError) or m is None:
                raise
            raise OSError(int(m.group(1)), os.strerror(int(m.group(1))), os.fspath(path)) from e
        if metadata and len(metadata) > 1:
            sort_safetensors_metadata(tmp)
    return write


def atomic_save_safetensors(path, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> str:
    return atomic_write(path, safetensors_writer(path, tensors, metadata))


def sort_safetensors_metadata(path) -> None:
    """Put the header's ``__metadata__`` keys in sorted order, in place: safetensors writes them
    in its hash map's order, which changes from process to process, so the same tensors and
    metadata gave files of other bytes (and another sha256). Same length: only the order moves."""
    import json
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw, object_pairs_hook=dict)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > n or new.strip() != new or len(new) != len(raw.rstrip(b" ")):
            return  # not the compact form this expects: leave the file as safetensors wrote it
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def atomic_replace_dir(write: Callable[[str], None], final_dir: str) -> str:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` into ``final_dir``; an interruption
    leaves either the old or the new folder complete (plus, at worst, temporaries that
    the next call or :func:`remove_stale_temps` clears, restoring the old folder if the
    kill came between the two renames)."""
    final_dir = os.path.abspath(os.fspath(final_dir)).rstrip("/")
    tmp, old = _dir_temps(final_dir)
    if os.path.exists(old) and not os.path.lexists(final_dir):
        os.replace(old, final_dir)
    for p in (tmp, old):
        if os.path.lexists(p) and not _remove_path(p):
            raise OSError(errno.EEXIST, "cannot remove a leftover temporary", p)
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException as e:   # (a file too large, a full disk: the half-written folder went with it)
        shutil.rmtree(tmp, ignore_errors=True)
        name = e.filename if isinstance(e, OSError) and isinstance(e.filename, str) else None
        if name is not None and (name == tmp or name.startswith(tmp + os.sep)):
            # the file the user knows (runs/r/best/adapter.safetensors), not its temporary's name
            e.filename = final_dir + name[len(tmp):]
        raise
    _fsync_dir(tmp)   # (its files' names, before it is swapped in)
    parent = os.path.dirname(final_dir)
    if os.path.isdir(final_dir) and not os.path.islink(final_dir) and _exchange(tmp, final_dir):
        # one atomic swap: a reader never finds the folder missing (between the two renames
        # below, svp eval/predict of runs/<run>/best failed ~1 in 2,700 reads in a stress loop)
        _fsync_dir(parent)
        _remove_path(tmp)   # (the old folder now; a kill here leaves a temporary, removed later)
        return final_dir
    if os.path.lexists(final_dir):   # a folder, or a link or file in its place (replaced, not followed)
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    _fsync_dir(parent)
    if os.path.lexists(old):
        _remove_path(old)
    return final_dir


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``, glibc >= 2.28);
    False where the system or the file system cannot (then the caller renames twice)."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            import ctypes
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):   # (an older C library, musl without it)
            _renameat2 = False
    if _renameat2 is False:
        return False
    return _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def sigterm_as_interrupt():
    """Make SIGTERM raise KeyboardInterrupt, as Ctrl-C does, where it is at its default action
    (which kills with no word and no cleanup: a run's folder half set up, a converted adapter's
    folder half made: reviews 57-58). Returns the handler to put back (``signal.signal(
    signal.SIGTERM, old)``), or None where SIGTERM is ignored or handled already (a process
    started with it ignored keeps ignoring it: retest 59) or this is not the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, stop)


def sha256_file(path: str) -> str:
    """The sha256 of a file's bytes (hex), read a MiB at a time."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
