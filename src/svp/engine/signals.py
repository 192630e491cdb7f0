"""How a run stops early: exit codes, ``TrainingStopped`` and the SIGINT/SIGTERM handler.

A first signal only sets a flag: the loop finishes its step (or evaluation), writes a
resume point and raises :class:`TrainingStopped` with exit code 130. A second one gives
up at once (``KeyboardInterrupt``), unless it comes within :data:`SAME_SIGNAL_S` of the
first: one Ctrl-C reaches a process several times when a wrapper passes it on to the
group it is already in (``timeout``; ``torchrun``, which sends its workers SIGINT, then
SIGTERM on the copy it got itself), and each copy was taken as a second press: the run
stopped at once, losing the steps since its last resume point.

A run in a worker process of ``svp sweep --jobs N`` also stops, the same way, when the
sweep asks it to through a shared stop value (:func:`use_stop_value`): a signal sent to
the sweep's process alone does not reach its workers, and forwarding it would give them a
second signal whenever the whole process group was signalled as well.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Optional

from .. import runtime
from ..io import shell_word

EXIT_STOPPED = 75       # stopped on request (debug.stop_at_step), resume point written
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM, resume point written
EXIT_NONFINITE = 3

# A signal this soon after the first is the same one, passed on: the copies a wrapper sends came
# within milliseconds (timeout, torchrun), but Python runs a handler only between bytecodes, so a
# copy that came during an operator is handled when it ends (~50 ms a kernel call in a CPU step of
# Vim-Small at batch 96); a second press a person means comes later, or again. The limit: a copy
# that came while the main thread had just entered one operator of two seconds or more still
# counts as a second press (the window is timed from when the handlers run).
SAME_SIGNAL_S = 2.0
# How long after the first signal's handler a run that stops waits before it puts the old handlers
# back: the copies still on their way left their senders within milliseconds of the first.
COPIES_WAIT_S = 0.25


def _again(first_at: Optional[float]) -> bool:
    """Whether a signal now is a second one, after a first at ``first_at`` (time.monotonic)."""
    return first_at is None or time.monotonic() - first_at >= SAME_SIGNAL_S


def _in_finalizer(frame) -> bool:
    """Whether the signal came while a ``__del__`` ran (the handler's frame and its callers)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _interrupt_main_soon(after_s: float = 0.05) -> None:
    """SIGINT's Python handler called again in the main thread in ``after_s`` (``_thread.
    interrupt_main``): the handler then decides anew (or Python's default raises
    KeyboardInterrupt, where the run has put its handlers back meanwhile)."""
    import _thread
    t = threading.Timer(after_s, _thread.interrupt_main)
    t.daemon = True
    t.start()


class TrainingStopped(Exception):
    """Raised when the run stops early on purpose (signal, debug stop); ``code`` is the exit code."""

    def __init__(self, message: str, code: int, run_dir: str):
        super().__init__(message)
        self.code, self.run_dir = code, run_dir


class NonFiniteLoss(TrainingStopped):
    def __init__(self, message: str, run_dir: str, step: int):
        super().__init__(message, EXIT_NONFINITE, run_dir)
        self.step = step


_stop_value = None  # a multiprocessing Value('i'): the signal number the sweep received, 0 before


def use_stop_value(value) -> None:
    """In a sweep's worker process: read ``value`` (set by the sweep, :class:`StopRequest`)
    as a signal received."""
    global _stop_value
    _stop_value = value


def stop_value_signal() -> Optional[int]:
    """The signal the sweep asked this worker to stop for, if it did."""
    return (_stop_value.value or None) if _stop_value is not None else None


class _Handler:
    """``_handle`` on SIGINT and SIGTERM while installed (main thread only), the old handlers back
    on ``restore``."""

    old: dict
    _first_at: Optional[float] = None   # when the first signal came (time.monotonic)
    _closing = False                    # restore() waits out COPIES_WAIT_S: every signal is a copy

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):  # pragma: no cover - each subclass has its own
        raise NotImplementedError

    def restore(self) -> None:
        if self.old and self._first_at is not None:
            # copies of the first signal still on their way (torchrun's SIGTERM follows its own
            # handling of its second copy) meet this handler, not the old one, which would take a
            # copy as a second press once the run had saved (a run whose step ended within
            # milliseconds of the signal: svp pretrain's mini steps). Short sleeps: the handler
            # runs between them
            self._closing = True
            end = self._first_at + COPIES_WAIT_S
            while time.monotonic() < end:
                time.sleep(min(0.01, max(0.0, end - time.monotonic())))
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}


class Signals(_Handler):
    """Records the first SIGINT/SIGTERM while installed (main thread only); in a sweep's
    worker also the sweep's stop request."""

    def __init__(self, on_first=None):
        self._received: Optional[int] = None
        self.old, self.on_first = {}, on_first

    @property
    def received(self) -> Optional[int]:
        return self._received or stop_value_signal()

    def _handle(self, signum, frame):
        if self._received is not None:  # second signal: give up immediately
            if self._closing or not _again(self._first_at):
                return   # the first one's copy (SAME_SIGNAL_S)
            if _starting["depth"] > 0 and _starting["pid"] == os.getpid():
                # ... once the workers being started have their whole state: raised mid-start, it
                # left a half-built loader and a cut-off pickle that a worker (ignoring the signal
                # while it starts) read, printing its traceback
                _starting["interrupt"] = True
                return
            if _in_finalizer(frame):
                # a KeyboardInterrupt raised in a __del__ (a DataLoader iterator joining its workers
                # as the run stops) is printed as "Exception ignored in ..." with its traceback, and
                # lost (review46: 1 of 7 double Ctrl-Cs): raised once the finalizer has returned
                _interrupt_main_soon()
                return
            raise KeyboardInterrupt
        self._received, self._first_at = signum, time.monotonic()
        if self.on_first is not None:
            self.on_first(signal.Signals(signum).name)
        if _starting_here():
            raise WorkersInterrupted(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "signal"

    def flags(self) -> list:
        """[SIGINT received, SIGTERM received] as 0/1: summed over the ranks (all_reduce_sum)."""
        return [float(self.received == signal.SIGINT), float(self.received == signal.SIGTERM)]

    def name_of(self, counts) -> str:
        """The signal's name from the ranks' summed ``flags``: this rank's own, else another
        rank's (SIGTERM sent to one process of a torchrun job)."""
        if self.received:
            return self.name
        got = [n for n, c in zip(("SIGINT", "SIGTERM"), counts) if c > 0]
        return f"{'/'.join(got) or 'signal'} (sent to another rank)"


class StopRequest(_Handler):
    """The sweep's side (``--jobs N``): while installed, a first SIGINT/SIGTERM sets the
    shared stop value its workers read, so each running run stops after its step with a
    resume point; a second one raises ``KeyboardInterrupt`` in the sweep, which still waits
    for its workers as it shuts its pool down (main thread only)."""

    def __init__(self, value, on_first=None):
        self.value, self.on_first, self.old = value, on_first, {}

    def _handle(self, signum, frame):
        if self.value.value:
            if self._closing or not _again(self._first_at):
                return   # the first one's copy (SAME_SIGNAL_S)
            raise KeyboardInterrupt
        self.value.value, self._first_at = int(signum), time.monotonic()
        if self.on_first is not None:
            self.on_first(signal.Signals(signum).name)


_worker_first_at: Optional[float] = None


def _worker_handle(signum, frame):
    global _worker_first_at
    if _worker_first_at is None:
        _worker_first_at = time.monotonic()
    elif _again(_worker_first_at):
        raise KeyboardInterrupt


_STOPS = (signal.SIGINT, signal.SIGTERM)


class WorkersInterrupted(Exception):
    """A first SIGINT/SIGTERM while this process started DataLoader workers, where a spawned
    worker cannot be started with them ignored (see :func:`starting_workers`): raised by the run's
    handler; the run stops there with a resume point."""


_starting = {"depth": 0, "pid": None, "raise": False}


@contextlib.contextmanager
def starting_workers():
    """While this process starts DataLoader workers. A spawned worker (macOS, Windows) runs
    under Python's default handler until it has started (seconds: the interpreter, imports, the
    dataset unpickled): a terminal's Ctrl-C, which reaches the whole group, killed it, printing
    its traceback, and the run crashed with no resume point, or hung writing the pickled dataset
    into the dead worker's pipe. Where workers are spawned by fork + exec (Linux, macOS), each
    starts with SIGINT/SIGTERM blocked, a mask that fork and exec keep and Python's start leaves
    alone, until :func:`worker_signals` (:func:`loader_worker_init`, the sweep's worker start)
    sets its handlers and unblocks them: this thread blocks them for the milliseconds of each fork
    + exec, so that the child inherits the mask. A signal meanwhile waits (or another thread takes
    it) and this process handles it as at any other moment: they were ignored here before, and a
    Ctrl-C in those milliseconds was lost, the sweep's workers ignoring it too (a sweep went on to
    its end: CI). Elsewhere a first signal meanwhile is raised by the run's handler
    (:class:`WorkersInterrupted`), which ends the write, and the loop stops as after a step
    (engine.loop)."""
    import multiprocessing.util as mpu
    real = getattr(mpu, "spawnv_passfds", None)
    shim = (real is not None and hasattr(signal, "pthread_sigmask")
            and threading.current_thread() is threading.main_thread())
    if shim:
        def spawnv_passfds(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return real(*args, **kwargs)   # (another thread's process: not one svp starts)
            # blocked, not ignored: an ignored signal is discarded, a blocked one waits, and
            # only the mask, not a handler, passes through exec to the child
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
            try:
                return real(*args, **kwargs)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        mpu.spawnv_passfds = spawnv_passfds
    saved = dict(_starting)
    _starting.update(depth=saved["depth"] + 1, pid=os.getpid(), **{"raise": not shim})
    try:
        yield
    finally:
        interrupt = _starting.pop("interrupt", False)
        _starting.clear()
        _starting.update(saved)
        if shim:
            mpu.spawnv_passfds = real
        if interrupt:   # a second signal while the workers started (Signals._handle)
            raise KeyboardInterrupt


def _starting_here() -> bool:
    # (a forked worker inherits the flag and the run's handler: not its business)
    return _starting["depth"] > 0 and _starting["raise"] and _starting["pid"] == os.getpid()


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader svp makes: a worker lets a first SIGINT/SIGTERM
    pass (the main process, which got it too, finishes its step, saves and ends its workers)
    and gives up on a second, as the main process does. A forked worker inherited that
    behaviour from the main process's handler; a spawned one (macOS and Windows start workers
    so) had Python's default and died on a terminal's Ctrl-C with the batch the main process
    was waiting for (the run crashed with no resume point). Until this runs, a spawned worker
    has the signals blocked (:func:`starting_workers`)."""
    worker_signals(_worker_handle)


def worker_signals(handler) -> None:
    """A worker process's first step: ``handler`` for SIGINT/SIGTERM, then the signals unblocked,
    which a spawned worker started with (:func:`starting_workers`); one that came while it
    started is handled now (an ignored one is dropped). Main thread only (the signals' owner)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in _STOPS:
        signal.signal(s, handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


def resume_command(run_dir: str) -> str:
    """The command that continues ``run_dir`` as it was started: a run saved by several
    processes resumes only with as many (svp refuses another world size)."""
    world, _, _, local = runtime.launch()
    run_dir = shell_word(run_dir)   # (a path with spaces, to paste: review45)
    if world == 1:
        return f"svp train --resume {run_dir}"
    if not os.environ.get("LOCAL_WORLD_SIZE", "").strip():   # (empty is unset, as runtime.launch reads it)
        # torchrun always sets it; without it another launcher (a Kubeflow PyTorchJob, an MPI or
        # Slurm wrapper) started the processes, and "torchrun" would send the user the wrong way
        return f"the same launcher ({world} processes) running: svp train --resume {run_dir}"
    if local == world:
        return f"torchrun --nproc_per_node={world} -m svp train --resume {run_dir}"
    return f"the same torchrun command ({world} processes) with: -m svp train --resume {run_dir}"


def interrupted(run_dir: str, signal_name: str, where: str) -> TrainingStopped:
    return TrainingStopped(f"{signal_name} received: stopped after {where}; resume point saved. "
                           f"Continue with: {resume_command(run_dir)}", EXIT_INTERRUPTED, run_dir)
