"""Process settings that decide CPU speed on a shared machine, applied once when ``svp`` is
imported (before torch), and only where the user has not chosen them.

* ``GOMP_SPINCOUNT=1000`` (unless ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set). torch's
  CPU wheel runs its intra-op threads on libgomp, whose default is to spin for a long time
  (300,000 rounds) at the end of every parallel region before sleeping. A training step is
  thousands of small parallel regions; when another process shares the cores, the thread that
  finishes first spins while its partner waits to be scheduled, and the spinning takes the CPU
  the partner needs. Measured here (Vim-Tiny SVP step, batch 8, 2 threads, load ~12 on 2
  cores): default 72-76 s wall / 19-20 s CPU per step, ``OMP_WAIT_POLICY=PASSIVE`` (sleep at
  once) 13-16 s wall / 3.8-3.9 s CPU (one thread: 3.1 s CPU). But sleeping at once has its own
  price: every parallel region then wakes a sleeping thread, ~50 us on a 2-vCPU VM, and a
  small op pays it too (``torch.exp`` of 6,144 floats: 52 us at 2 threads, 2.5 us at 1).
  1,000 rounds is a short spin (each round one pause instruction) that bridges the gap
  between one op and the next without holding a core for long: against PASSIVE, on the TBB
  threading layer (docs/benchmarks.md, "Eighth round"), Vim-Tiny batch-1 prediction 71-72 ->
  53 ms, training steps 2-10% faster, and beside one busy process the same times (the issue's
  2x target met either way). 10,000 rounds broke that target (2.0-2.1x), ACTIVE (spin
  forever) is slower even on a quiet machine beside numba's TBB threads. libgomp reads
  the variable once, when torch loads it, so this only works if ``svp`` is imported before
  ``torch`` (and before ``timm``, which imports torch); ``status()`` says whether it took effect.
  Where it did not and the user set neither variable, svp's CPU kernels warn once, when first
  imported (``LongSpinWarning``, ``long_spin()``): torch's threads then spin 300,000 rounds after
  every operator, on the cores the kernels' threads need. Measured on a 2-vCPU Xeon
  (docs/benchmarks.md, "Batch-1 prediction on the AMX Xeon"): a Vim-Tiny SVP training step at
  batch 8 1.15-1.19x its time with svp first, batch-1 prediction 1.17-1.21x.

* ``SVP_CPU_DEDICATED=1`` (opt-in, for a machine svp has to itself): svp's numba kernels run
  on torch's own OpenMP threads instead of numba's TBB threads (``svp.ops.scan_cpu``: numba's
  'omp' layer, its OpenMP calls bound to the libgomp torch's wheel loaded, so one pool serves
  both), and libgomp spins 100,000 rounds (``SPINCOUNT_DEDICATED``) instead of 1,000. Between a
  numba kernel and the torch op after it (and back), the other thread is then awake and
  spinning in the same pool, instead of asleep in another pool and woken (~50-120 us a kernel
  call measured inside a Vim-Tiny step). Measured on a 2-vCPU Xeon (docs/benchmarks.md,
  "Twenty-fourth round"): Vim-Tiny SVP and LoRA training steps 8-12% faster, Vim-Small ~6%,
  prediction 3-12%; but beside one busy process the long spin takes the cores it needs: a step
  then took 3.3-5.0x its quiet time (the default 1.5-1.7x, the issue's target 2x). Hence not
  the default. And a process forked after the kernels ran cannot run them: numba's OpenMP layer
  ends such a child ("fork() called from a process already using GNU OpenMP"), where the
  default TBB layer runs them (data-loader workers, which only load data, are unaffected; start
  such processes with 'spawn'). Where torch has no bundled libgomp (macOS, Windows, builds on
  Intel's OpenMP) only the spin count changes. Set it before the process starts, as the
  variables above.

* glibc malloc: ``M_MMAP_THRESHOLD`` 32 MiB and ``M_TRIM_THRESHOLD`` 256 MiB (``mallopt``,
  on Linux with glibc, unless a ``MALLOC_*_`` variable or one of the ``glibc.malloc`` tunables
  ``mmap_threshold``, ``trim_threshold``, ``top_pad``, ``mmap_max`` was set as the process
  started: glibc reads them then, and only then, so one set later from inside the process is
  not the user's setting and svp's apply).
  glibc's defaults return freed memory to the kernel as soon as 2x its (adaptive) mmap
  threshold is free at the top of the heap; the scan's backward frees three (b, l, E) buffers
  at once, so the next call page-faults them back in. Measured (``benchmarks/scan.py``'s
  shapes, Vim-Tiny, 1 thread, fwd+bwd per call, two runs each): batch 32, 4,230-6,587 ->
  473-1,215 page faults and 5.6-11.2 -> 0.8 ms system time (of ~62 ms); batch 8, 694-927 ->
  350 faults.
  A whole Vim-Tiny SVP step moved by less than the machine's noise (batch 8, 2 threads:
  781-796 -> 759-777 ms). The cost: the process keeps up to 256 MiB of freed heap for reuse.
  Applied whenever ``svp`` is imported (malloc reads it at each call, so order does not matter).
  Other ``glibc.malloc`` tunables (``hugetlb``, ``arena_max``, ...) leave these two in place.

* The heap held while svp trains, evaluates or predicts on the CPU (``held_heap``, where svp
  set the thresholds above). 32 MiB is as high as glibc lets the mmap threshold go, so a larger
  buffer is its own mapping, given back to the kernel when freed and page-faulted in afresh the
  next time: at the recipes' batch of 96, Vim-Small's (b, l, E) activations are 58 MiB (from
  batch 56 on; Vim-Base's from batch 28), and a Vim-Small SVP step faulted ~1.6 million pages
  back in: on a 2-vCPU VM 10.5 of its ~37 CPU-seconds in the kernel, 19.5 s a step
  (``benchmarks/heap.py``; docs/benchmarks.md, "Forty-sixth round"). While held, no buffer gets
  a mapping of its own (``M_MMAP_MAX`` 0) and the heap is never trimmed, so from the third step
  on a step reuses its own memory: 13.8 s, 0.4 s in the kernel (0.69-0.72x); ``svp train`` end to
  end, the last of three epochs 18.8-19.7 -> 13.4-13.7 s. The costs: the first step is slower
  (the heap grows to its size over two steps, in fresh memory: a few seconds at batch 96), and
  the peak memory grows by the heap's free pieces between live buffers (Vim-Small batch 96
  15.0 -> 16.8 GB). Below 32 MiB nothing changes (batch 8: the same times). When the outermost
  run ends, svp's settings come back and the free heap goes back to the kernel (``malloc_trim``:
  0.4 s for a 16 GB heap). Not in ``svp serve``, which runs for long and gives memory back as it
  goes.

* Huge pages for malloc's heap: opt-in, not set by svp (glibc reads ``GLIBC_TUNABLES`` once, as
  the process starts). ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc 2.35 or later, the
  kernel's transparent huge pages 'madvise' or 'always') asks for 2 MiB pages for the heap svp's
  thresholds keep the activations on; ``status()`` says when it was set, and ``svp doctor``'s
  malloc row (``huge_pages()``) gives the kernel's mode and whether the heap asked. Measured on a 2-vCPU AMD
  Zen 3 (docs/benchmarks.md, "Thirty-sixth round"): the scan's backward (Vim-Tiny batch 8, 1
  thread, median of 60 calls, one process each) took 1.10-1.15x the median time in 5 of 17
  processes with 4 KiB pages and at most 1.05x in 17 with huge pages; a Vim-Tiny SVP training
  step at batch 8, 2 threads, 13 processes each: 903-953 ms (median 916) -> 899-923 (906); 1 thread
  the same (1646-1810 -> 1653-1702 ms, medians 1661 / 1664); peak memory the same.

* Python's cyclic garbage collector, around svp's own imports (``imports_outside_gc``). Importing
  torch, timm (which imports torchvision, which imports torch._dynamo) and svp makes ~630,000
  objects the collector tracks, nearly all of them alive until the process ends; with the
  collector running, the young generations' collections walked them as the imports went, and full
  collections walked them again later. svp pauses automatic collection while it imports them, then
  moves every tracked object straight to the oldest generation (``gc.freeze()`` then
  ``gc.unfreeze()``): the objects are the same, and any garbage among them (the user's too) is
  still collected by the next full collection; only the young generations' walks are skipped. Not
  where the user has turned the collector off (it stays off) or frozen objects (they stay frozen).
  The ``svp`` command goes one step further in a process of its own (``freeze_imports``, called
  by ``svp.cli.run``): everything imported before the command runs is frozen for the rest of the
  process, so no later collection, and not the interpreter's shutdown, walks it again. Measured
  (docs/benchmarks.md, "Seventeenth round"): ``import svp`` 2.84 -> 2.2-2.3 s; ``svp --help``
  4.17 -> 2.74 s; ``svp predict`` with one image, Vim-Small, 5.55 -> 3.85 s (``benchmarks/cli.py``).
  What stays frozen is never freed, and Triton 3.9 (torch 2.15's; torch imports it) built its
  library with nanobind, which reports every one of its objects still alive when the process ends
  as a leak: 26 lines on stderr after every command (``svp data list``). ``hide_frozen_leak_report``
  points C's stderr, where that report is printed after Python has shut down, at the null device,
  as the last of the process's atexit handlers, and keeps Python's own ``sys.stderr`` on the
  terminal (unfreezing instead cost ~0.6-0.85 s at every exit, measured).

Set ``SVP_NO_RUNTIME_DEFAULTS=1`` to leave the environment untouched.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import ntpath
import os
import sys
import threading
from typing import NamedTuple

_state = {"omp_wait_policy": None, "applied_before_torch": None, "malloc": None, "gc": None, "dedicated": None}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4   # glibc's malloc.h
_DEFAULT_MMAP_MAX = 65536      # glibc's default count of separate mappings
MMAP_THRESHOLD = 32 * 2**20    # the largest glibc accepts on 64-bit (half its heap size)
TRIM_THRESHOLD = 256 * 2**20
SPINCOUNT = "1000"             # libgomp's spin rounds before a thread sleeps (see above)
SPINCOUNT_DEDICATED = "100000"  # the same with SVP_CPU_DEDICATED (10,000: half the gain, see above)


class LongSpinWarning(RuntimeWarning):
    """svp's CPU kernels run beside libgomp's long spin: torch was imported before svp (``long_spin``)."""


def long_spin():
    """Why this process's CPU runs are slower than they need be, or None: torch was imported
    before svp (``configure`` found it loaded) and the user set neither ``OMP_WAIT_POLICY`` nor
    ``GOMP_SPINCOUNT``, so torch's libgomp keeps its default spin. None where svp's defaults are
    off (``SVP_NO_RUNTIME_DEFAULTS``) or with ``SVP_CPU_DEDICATED``, whose kernels share torch's
    spinning threads. Whether torch runs on libgomp at all is for the caller to check
    (``svp.ops.scan_cpu``: torch's bundled libgomp, Linux)."""
    if _state["applied_before_torch"] is not False or _state["dedicated"]:
        return None
    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get("GOMP_SPINCOUNT"):
        return None
    return ("torch was imported before svp, so torch's OpenMP threads (libgomp) spin 300,000 rounds after "
            "every operator before they sleep, on the cores svp's CPU kernels need: CPU training and "
            "prediction run slower (~1.15-1.2x measured on 2 vCPUs) and several times slower beside "
            "another busy process. Import svp before torch and timm, or set GOMP_SPINCOUNT=1000 in the "
            "environment before Python starts (svp.runtime).")


def env_flag(name: str, environ=os.environ) -> bool:
    """An on/off environment switch: on for any value but empty, 0, false, no, off."""
    return environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def dedicated(environ=os.environ) -> bool:
    """Whether the user declared the machine svp's own (``SVP_CPU_DEDICATED``, :func:`env_flag`)."""
    return env_flag("SVP_CPU_DEDICATED", environ)


def no_defaults(environ=os.environ) -> bool:
    """``SVP_NO_RUNTIME_DEFAULTS`` (:func:`env_flag`; ``=0`` turned the defaults off too)."""
    return env_flag("SVP_NO_RUNTIME_DEFAULTS", environ)


_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
# the tunables that set what svp sets (or decide the same trade-off); others, such as
# glibc.malloc.hugetlb (see the module docstring) or arena_max, leave svp's thresholds in place
_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                    "glibc.malloc.mmap_max")


def _tunables(value: str) -> dict:
    """A GLIBC_TUNABLES value as {name: value} (name=value pairs joined by colons)."""
    pairs = (item.partition("=") for item in value.split(":") if item)
    return {name.strip(): v for name, _, v in pairs}


def _environ_at_start() -> dict:
    """The environment the process started with, which glibc read its malloc settings from
    (MALLOC_*_ and GLIBC_TUNABLES, once, at start): /proc/self/environ keeps it, and a variable
    set or removed later, from inside the process, changes nothing for malloc. Where /proc is
    not there, os.environ.

    glibc 2.36 (Debian 12; other versions not checked) parses GLIBC_TUNABLES in that memory:
    each ':' between two tunables becomes a NUL there (the process's ``environ`` gets a copy), so
    "a=1:b=2" reads back as the item "GLIBC_TUNABLES=a=1" followed by an item "b=2". Every tunable
    is named glibc.*, so the items after GLIBC_TUNABLES that start so are joined back to it."""
    try:
        with open("/proc/self/environ", "rb") as f:
            items = [item.decode(errors="replace") for item in f.read().split(b"\0") if item]
    except OSError:
        return dict(os.environ)
    env, last = {}, None
    for item in items:
        if last == "GLIBC_TUNABLES" and item.startswith("glibc."):
            env[last] += ":" + item
            continue
        name, _, value = item.partition("=")
        env[name], last = value, name
    return env


def _tunables_at_start() -> dict:
    """The tunables glibc read: GLIBC_TUNABLES as the process started (see _environ_at_start)."""
    return _tunables(_environ_at_start().get("GLIBC_TUNABLES", ""))


def _hugetlb_at_start(tunables=None):
    """glibc.malloc.hugetlb's value as the process started when it asks for huge pages (not
    unset, empty or 0), else None. ``tunables``: _tunables_at_start()'s, when the caller has them."""
    value = (_tunables_at_start() if tunables is None else tunables).get("glibc.malloc.hugetlb", "0")
    return None if value in ("", "0") else value


def _malloc_defaults() -> str:
    # the user's choice is what glibc read as the process started, not os.environ now (read once)
    start = _environ_at_start()
    tunables = _tunables(start.get("GLIBC_TUNABLES", ""))
    if any(start.get(k) for k in _MALLOC_VARS) or any(t in tunables for t in _MALLOC_TUNABLES):
        return "left to the user's MALLOC_* / GLIBC_TUNABLES setting"
    if not sys.platform.startswith("linux"):
        return "system default (not Linux)"
    version = _glibc_version()
    if version is None:
        return "system default (not glibc)"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                  TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return "system default (not glibc)"
    if not ok:
        return f"glibc {version[0]}.{version[1]} refused mallopt; its defaults apply"
    _heap["libc"] = libc
    hugetlb = _hugetlb_at_start(tunables)
    huge = f"; glibc.malloc.hugetlb={hugetlb} (huge pages for the heap)" if hugetlb else ""
    return f"mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB (set by svp){huge}"


SPIN_MARK = "SVP_SET_GOMP_SPINCOUNT"   # the GOMP_SPINCOUNT svp itself put in the environment


def configure() -> dict:
    """Apply the defaults above (idempotent). Returns ``status()``."""
    if _state["applied_before_torch"] is not None or no_defaults():
        return status()
    before_torch = "torch" not in sys.modules
    _state["dedicated"] = dedicated()
    # libgomp reads GOMP_SPINCOUNT from the environment as it loads, so svp sets it there, and
    # the processes a program importing svp starts inherit it. The marker says the value is svp's,
    # not the user's: an svp child (in SVP_CPU_DEDICATED mode, say) sets its own over it (it took
    # the inherited 1000 for the user's choice: review)
    inherited = os.environ.get("GOMP_SPINCOUNT")
    ours = bool(inherited) and inherited == os.environ.get(SPIN_MARK)
    if before_torch and not os.environ.get("OMP_WAIT_POLICY") and (not inherited or ours):
        spin = SPINCOUNT_DEDICATED if _state["dedicated"] else SPINCOUNT
        os.environ["GOMP_SPINCOUNT"] = os.environ[SPIN_MARK] = spin
        why = "set by svp, SVP_CPU_DEDICATED" if _state["dedicated"] else "set by svp"
        _state["omp_wait_policy"] = f"GOMP_SPINCOUNT={spin} ({why})"
    else:
        _state["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY") or (
            f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if os.environ.get("GOMP_SPINCOUNT")
            else "libgomp default (torch was imported before svp)")
    _state["applied_before_torch"] = before_torch
    _state["malloc"] = _malloc_defaults()
    return status()


@contextlib.contextmanager
def imports_outside_gc():
    """Run the ``with`` body (svp's imports) with automatic collection paused, then move every
    tracked object to the oldest generation and resume (see the module docstring). Where the
    collector is off, or SVP_NO_RUNTIME_DEFAULTS is set, the body runs as it is."""
    if no_defaults() or not gc.isenabled():
        if _state["gc"] is None:
            _state["gc"] = ("left alone (SVP_NO_RUNTIME_DEFAULTS)" if no_defaults()
                            else "left alone (the collector was off)")
        yield
        return
    # (not with objects the user froze: unfreeze would hand them back to the collector)
    promote = gc.get_freeze_count() == 0
    gc.disable()
    try:
        yield
    finally:
        if promote:
            gc.freeze()      # every tracked object -> the permanent generation,
            gc.unfreeze()    # -> and back into the oldest: the young collections never see them
        gc.enable()
        if _state["gc"] is None:
            _state["gc"] = ("imports promoted to the oldest generation (set by svp)" if promote
                            else "collection paused during the imports (the user had frozen objects)")


def install_problem(problem: str, cause: BaseException | None = None):
    """``import svp`` found the install broken (``problem`` says how and what to install): the
    ``svp`` command says it in one line and exits 1, where the traceback ran through the imports
    of torch, timm and torchvision; a program importing svp gets an ImportError saying it."""
    if started_as_command():
        try:
            sys.stderr.write(f"svp: error: {problem}\n")
            sys.stderr.flush()
        finally:
            raise SystemExit(1)
    raise ImportError(f"svp: {problem}") from cause


def started_as_command(argv=None, orig_argv=None) -> bool:
    """Is this process the ``svp`` command (its console script, or ``python -m svp``)? While
    ``import svp`` runs, before ``svp.cli`` exists to say so."""
    argv = sys.argv if argv is None else argv
    orig = getattr(sys, "orig_argv", None) if orig_argv is None else orig_argv   # (Python >= 3.10)
    if not argv:
        return False
    name = ntpath.basename(argv[0]).lower()   # (either separator: the Windows script's path too)
    if name in ("svp", "svp.exe", "svp-script.py"):
        return True
    if argv[0] != "-m":
        return False
    # python -m svp: runpy imports the package while argv[0] is still "-m". Python 3.9 has no
    # sys.orig_argv: the command line is read from /proc (Linux); where it cannot be, any -m
    # counted, and a user's `python -m mypkg` importing svp kept svp's Ctrl-C guard (exit 130, its
    # finally blocks skipped: review), so there none does
    if orig is None:
        orig = _proc_cmdline()
    # (`python -m svp.cli` too: the module runs the command as `python -m svp` does)
    return any(a == "-m" and b in ("svp", "svp.cli") for a, b in zip(orig, orig[1:]))


def _proc_cmdline() -> list:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


_IMPORT_GUARD = {"old": None, "on": False}


def guard_command_imports() -> None:
    """The ``svp`` command's first seconds, while it imports torch, timm and its own modules: a
    Ctrl-C ends the process at once with one line and exit 130, as a command's does once it
    runs. A KeyboardInterrupt raised in the middle of an import (Python's default) printed a
    traceback through the imports, or, landing in numpy's lazy imports, a RecursionError; and
    under ``python -m svp`` the process could die by the signal. Nothing is written in those
    seconds, so nothing is lost. Elsewhere (a program importing svp) nothing changes: it gets its
    KeyboardInterrupt. Ended by :func:`end_command_imports` before a command runs."""
    if not started_as_command() or threading.current_thread() is not threading.main_thread():
        return
    import signal
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        # ignored (CI's background jobs, nohup), or someone's own: left as it is (a spawned
        # DataLoader or sweep worker, which re-imports the command's main module with its
        # arguments, starts with SIGINT blocked until its handler is in: engine.signals)
        return

    def interrupted(signum, frame):
        try:
            sys.stderr.write("svp: interrupted\n")
            sys.stderr.flush()
        finally:
            os._exit(130)
    try:
        _IMPORT_GUARD["old"] = signal.signal(signal.SIGINT, interrupted)
        _IMPORT_GUARD["on"] = True
    except (ValueError, OSError):   # (no signals here)
        pass


def end_command_imports() -> None:
    """Put back the handler :func:`guard_command_imports` replaced (Python's default)."""
    if _IMPORT_GUARD["on"]:
        import signal
        signal.signal(signal.SIGINT, _IMPORT_GUARD["old"])
        _IMPORT_GUARD["on"] = False


FROZEN = "imports frozen for the command's process (svp.cli.run)"


def freeze_imports() -> bool:
    """For a process that runs one svp command and exits (``svp.cli.run``): freeze every object
    tracked now (the imported modules, their functions and classes) out of the cyclic collector
    for the rest of the process, so later full collections and the interpreter's shutdown skip
    them. Not for a library call: garbage frozen now is never collected. Returns whether it froze
    (not with SVP_NO_RUNTIME_DEFAULTS set, nor with the collector off)."""
    if no_defaults() or not gc.isenabled():
        return False
    gc.freeze()
    _state["gc"] = FROZEN
    return True


_LEAK_HOOK: list = []


def hide_leak_report_at_exit() -> None:
    """Register :func:`hide_frozen_leak_report` with atexit, once; ``import svp`` does it first
    thing, before torch and the rest register theirs, so that it runs after them (atexit runs
    the last registered first): what they print at exit, through logging's handlers too, is
    printed before it."""
    if not _LEAK_HOOK:
        import atexit
        atexit.register(hide_frozen_leak_report)
        _LEAK_HOOK.append(True)


def hide_frozen_leak_report() -> bool:
    """At the end of a process whose imports the svp command froze (:func:`freeze_imports`),
    where Triton's library is a nanobind one (Triton >= 3.9): file descriptor 2, which nanobind's
    leak report is written to once the interpreter has shut down, goes to the null device, and
    ``sys.stderr`` writes on through a copy of it. Still seen: the command's own output, a
    traceback, the other atexit handlers' (this one runs last: :func:`hide_leak_report_at_exit`),
    and what Python writes to ``sys.stderr`` while it tears the modules down ("Exception ignored
    in ..."). Not seen: what C code writes to the file descriptor after it (a crash there: its
    faulthandler report; ``SVP_NO_RUNTIME_DEFAULTS=1`` freezes nothing and hides nothing).
    Returns whether it did."""
    lib = sys.modules.get("triton._C.libtriton")
    context = getattr(getattr(lib, "ir", None), "context", None)
    if _state["gc"] != FROZEN or context is None or type(type(context)).__module__ != "nanobind":
        return False
    stream = sys.stderr
    try:
        stream.flush()
        if stream.fileno() != 2:
            return False
        kept = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):   # (no fd 2: `2>&-`, or a stream without one)
        return False
    import io
    copy = io.TextIOWrapper(io.FileIO(kept, "w"), encoding=stream.encoding, errors=stream.errors,
                            line_buffering=True)
    os.dup2(null, 2)
    os.close(null)
    if sys.__stderr__ is stream:
        sys.__stderr__ = copy
    sys.stderr = copy
    return True


def huge_pages() -> str:
    """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), and whether the
    heap asked for them (``glibc.malloc.hugetlb`` at the process's start, read by glibc 2.35 and
    later; the module docstring's opt-in): one line for ``svp doctor``."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "no transparent huge pages here"
    line = f"transparent huge pages '{mode}'"
    if mode == "never":
        return line
    hugetlb = _hugetlb_at_start()
    glibc = _glibc_version()
    if hugetlb:
        if glibc is not None and glibc < (2, 35):
            return f"{line}; glibc.malloc.hugetlb={hugetlb} set, but glibc {glibc[0]}.{glibc[1]} ignores it (2.35+)"
        return f"{line}; the heap asks for them"   # (status()['malloc'] gives the tunable's value)
    if mode == "always":
        return f"{line}: the kernel gives the heap huge pages where it can"
    return f"{line}; the heap on 4 KiB pages (opt-in: GLIBC_TUNABLES=glibc.malloc.hugetlb=1, glibc 2.35+)"


def _glibc_version():
    """(major, minor) of the glibc this process runs on, or None (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        return tuple(int(x) for x in libc.gnu_get_libc_version().decode().split(".")[:2])
    except (OSError, AttributeError, ValueError):
        return None


_heap = {"libc": None, "depth": 0, "lock": threading.Lock()}   # libc: set where svp's thresholds apply


def holds_heap() -> bool:
    """Whether ``held_heap`` holds anything in this process (svp's malloc settings apply)."""
    return _heap["libc"] is not None


def heap_held() -> bool:
    """Whether a ``held_heap`` is in effect now."""
    return _heap["depth"] > 0 and holds_heap()


@contextlib.contextmanager
def held_heap(active: bool = True):
    """Within it, glibc malloc keeps every freed buffer for reuse: none gets a mapping of its own
    (``M_MMAP_MAX`` 0) and the heap is never trimmed (see the module docstring). Re-entrant and
    process-wide: the outermost exit restores svp's thresholds and gives the free memory back
    (``malloc_trim``). Does nothing with ``active`` False (a run on a GPU), nor where svp's malloc
    settings do not apply (the user's own MALLOC_* / glibc.malloc tunables, SVP_NO_RUNTIME_DEFAULTS,
    not glibc)."""
    libc = _heap["libc"] if active else None
    if libc is None:
        yield
        return
    with _heap["lock"]:
        if _heap["depth"] == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, -1)   # (as size_t: the largest, never trim)
        _heap["depth"] += 1
    try:
        yield
    finally:
        with _heap["lock"]:
            _heap["depth"] -= 1
            if _heap["depth"] == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                libc.malloc_trim(0)


class Launch(NamedTuple):
    """This process's place among those a launcher (torchrun) started: :func:`launch`.
    ``local_world_size`` is 1 where the launcher does not say it (a Kubeflow PyTorchJob without
    torchrun runs one process a pod)."""
    world_size: int
    rank: int
    local_rank: int
    local_world_size: int


_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launch(environ=os.environ) -> Launch:
    """WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE as torchrun sets them, read in one
    place: one process, ``Launch(1, 0, 0, 1)``, where WORLD_SIZE is unset or empty. A value
    that is not a whole number in range is a :class:`~svp.errors.ConfigError` naming the
    variable (``svp train`` stopped in ``int()`` with a traceback while the other commands
    took it as one process; a WORLD_SIZE without RANK, with a KeyError)."""
    from .errors import ConfigError

    def number(name, default, low, high=None):
        text = environ.get(name, "").strip()
        if not text:
            if default is None:
                raise ConfigError(f"WORLD_SIZE={world} is set but {name} is not: a launcher (torchrun) sets "
                                  f"both; unset WORLD_SIZE to run one process")
            return default
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            where = f"{low}..{high}" if high is not None else f">= {low}"
            # (RANK is needed beside a WORLD_SIZE above 1: "unset" it and the next error says so)
            unset = "WORLD_SIZE unset to run one process" if default is None else f"{name} unset"
            raise ConfigError(f"{name}={environ.get(name)!r} in the environment: expected a whole number {where} "
                              f"(as torchrun sets it), or {unset}")
        return value

    world = number("WORLD_SIZE", 1, 0)
    if world <= 1:   # (0 too, as svp train always read it)
        return Launch(1, 0, 0, 1)
    local_world = number("LOCAL_WORLD_SIZE", 1, 1, world)
    local_ranks = local_world if environ.get("LOCAL_WORLD_SIZE", "").strip() else world
    return Launch(world, number("RANK", None, 0, world - 1), number("LOCAL_RANK", 0, 0, local_ranks - 1),
                  local_world)


def status() -> dict:
    """What ``configure`` found and did: {'omp_wait_policy': ..., 'applied_before_torch': ...,
    'malloc': ..., 'gc': ..., 'dedicated': ...} (whether SVP_CPU_DEDICATED was set; which threads
    the kernels run on is ``svp.ops.scan_cpu.THREADING_LAYER`` / ``SHARED_OPENMP``)."""
    return dict(_state)
