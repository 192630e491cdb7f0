"""Fused selective scan for CPUs: numba kernels + one ``torch.autograd.Function``.

Semantics are those of :func:`svp.ops.scan_ref.selective_scan_ref` (plus ``reverse``).
Everything is computed in float32 whatever the input dtype; results are cast back.

Layout. The kernels work on the (batch, len, dim) layout so that a vector holds 16
contiguous channels. The model hands us u/delta/z as (b, d, l) *transposed views* of
contiguous (b, l, d) tensors, which we read in place; any other layout is copied once.
B and C are read in place from the x_proj output's rows (any other layout is copied).

Vectors. The kernels are written with the explicit 16-lane float32 vectors of
:mod:`svp.ops.simd` rather than loops over channels for numba to vectorise: numba cannot
tell LLVM that its arrays do not overlap, so every auto-vectorised loop over channels
began with runtime overlap checks between all the arrays it touched, entered once per
(step, state); those checks and the register spills around them were most of the
instructions the backward executed. Every operation is exact IEEE float32 with explicit
fused multiply-adds, so the bits do not depend on the compiler's scheduling, on numba
compiling now or loading its disk cache, or on the machine's vector width.

Time steps from dt_proj's input (BiScanCPU's dt_w): the models' delta is dt_proj's product of
a rank-R input, R = d_model / 16. Given that input (read in place from the x_proj output's rows,
like B and C) and dt_proj's weight, the kernels form each block's time steps themselves (4R
multiply-adds a step), and the backward forms the input's gradient per chunk and block as one
small product with W (_dlow_rows), and, where dt_proj's weight is trained (LoRA, full
fine-tuning), that weight's gradient as one small product with the input rows (_dw_rows); the
(b, len, dim) time steps and their gradient are then never written to memory, where the
products that formed them, and the weight gradient's read of them, ran at memory speed.

Indexing: the B and C values a state loop reads per state are taken with an unsigned index
(``Bm[np.uint64(br + n)]``): with a signed one numba emits Python's negative-index wraparound
(a shift, a mask and an add per read) that LLVM cannot drop for an offset from the arguments;
in the narrow loops, which read them once per vector and state, that was 1-5% of the backward's
time at one thread and ~7% at two on a Zen 3 (docs/benchmarks.md, thirty-seventh round). Same bits.

Memory: a task walks rows d floats apart, a stride the hardware prefetchers do not follow,
so the kernels prefetch the rows they will read and write PF steps ahead (the output rows
with ``prefetch_write``: unowned output lines stalled the stores behind them).

Parallelism: one task per (batch, group, block of BW = 64 channels), i.e. four vectors
processed side by side in every loop iteration (measured: one vector per task left the
loops waiting on their own latencies, 1.8x slower backward; four were 1.4-1.8x faster
than two). Channel counts per group that are not a multiple of 64 are padded with inert
zero channels and cut off again. ``reverse`` only changes the time index (no flips or
copies).

Narrow registers: AVX-512 has 32 vector registers that hold a 16-lane vector each; AVX2 has 16
that hold half of one (ARM's NEON: 32 that hold a quarter). There the backward's state loops,
which keep 12-20 vectors live across their iterations with all four vectors side by side,
spilled most of them to the stack, so on targets without AVX-512 (``_NARROW``) they take the block's
four vectors one at a time, each over all states (the same operations in the same order per
lane: the same bits). On a Zen 3 the backward took 0.91-0.94x the time with every gradient
and 0.93-1.03x with a frozen backbone (1 thread; docs/benchmarks.md, thirty-fifth round). The
forward keeps its four side by side: one or two at a time took 1.00-1.17x its time there. The
same holds for the small products inside the kernels, which keep several accumulators side by
side: there they take fewer at a time, each element's chain unchanged (the same bits):
``_dlow_rows`` four steps instead of eight (the backward 0.95-0.97x its time at Vim-Tiny's
rank, 0.90-0.93x at Vim-Small's), ``conv_cpu._proj_rows`` two vectors of a block instead of
four and ``conv_cpu._proj_out_rows`` 16-column tiles instead of 48 (the conv + x_proj node
0.50-0.72x its forward time, 0.69-0.82x forward and backward; docs/benchmarks.md,
thirty-sixth round).

Backward: the forward stores the state at the start of every chunk of K steps. The
backward walks the chunks from last to first: it recomputes the chunk's states and
decay factors exp(delta*A) into task-local buffers (bit for bit the forward's: same
operations), then runs the reverse-time recurrence
dh_{t-1} = exp(delta_t A) * (dh_t + C_t * g_t), accumulating the gradients of every input.
Sums over channels (dB, dC) are fixed float32 orders per block of 64 channels (a chain of
fused multiply-adds over the four vectors, then a shuffle tree over the 16 lanes,
``simd.vhsum16``), the blocks summed in float64; sums over time and batch accumulate in
float64 (dD, d_delta_bias per step; dA in float32 over runs of DA_RUN = 8 steps, then
float64: runs of 32 doubled dA's error on some inputs, 8 matches a float64 sum per step).
When A, D and delta_bias need no gradient (a frozen backbone: every method but full
fine-tuning) the backward skips their sums (~10% of its time); the other gradients keep their bits.

exp/softplus/sigmoid are branch-free polynomials, accurate to ~1e-7 relative; the decay
factors use a cheaper base-2 exponential (see _vexp2) that is exactly 0 for delta*|A|
above 88 (no NaN/inf for delta*|A| in the hundreds or thousands).

Denormals: on x86 both kernels run each task with denormal results and operands flushed to
zero (MXCSR's FTZ and DAZ bits, ``simd.flush_denormals``; the thread's previous mode is put
back at the task's end). The state gradient of the last block of a class-token model is
fed at one position only and decays from there through float32's denormal range, where
every operation took a ~100-cycle microcode assist: that call ran 3x slower than its
neighbours (docs/benchmarks.md, twelfth round). Only values below 1.2e-38 change (to 0).
The official CUDA kernels flush them too (mamba_ssm's extension is built with nvcc
``--use_fast_math``). Elsewhere (ARM) the mode is left as it is, so bits can differ from
x86 where a denormal occurs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from .. import runtime as _runtime

from .scan_ref import check_scan_args, scan_groups, sum_to_groups


def _writable(folder: str, private: bool = False) -> bool:
    """Whether ``folder`` exists (made if not) and can be written. ``private``: also owned by
    this user and not writable by others, for a folder in the shared temp folder (numba's cache
    index is a pickle: one planted there by another user would run as this one)."""
    try:
        os.makedirs(folder, mode=0o700 if private else 0o777, exist_ok=True)
        if private and hasattr(os, "getuid"):
            st = os.stat(folder)
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return False
        return os.access(folder, os.W_OK)
    except OSError:
        return False


def _default_cache_dir():
    """Where numba caches the kernels: next to this file (numba's own choice, __pycache__);
    where the package is read-only, the user's cache folder; where that is not writable either
    (a service account without a home, ``docker --user``), a folder of this user's in the temp
    folder. numba refuses to decorate a ``cache=True`` kernel with nowhere to write, so without
    the last step the CPU kernels were unavailable there, silently slower."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if _writable(os.path.join(here, "__pycache__")):
        return
    import tempfile
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    for folder, private in ((os.path.join(base, "svp", "numba"), False),
                            (os.path.join(tempfile.gettempdir(), f"svp-numba-{uid}"), True)):
        if _writable(folder, private):
            os.environ["NUMBA_CACHE_DIR"] = folder
            if "numba" in sys.modules:   # imported before svp (a user's script): it read its config then
                sys.modules["numba"].config.CACHE_DIR = folder
            return


_default_cache_dir()


# numba checks a cached kernel against the file that defines it and nothing else. The kernels
# here inline code from other files (simd.py's intrinsics; conv_cpu, norm_cpu and prompt_cpu
# take helpers from this file), so after a `git pull` that changed only simd.py a cache would
# hand back kernels compiled from the old simd.py: other bits, or old bugs. Each cached kernel
# therefore gets a note beside numba's index, the SHA-256 of the files it depends on; where the
# note is missing or differs the index is removed, so numba compiles afresh and writes a new
# one. (Only the index: numba rewrites the data files it points to.)
_DEPS = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), f) for f in ("simd.py", "scan_cpu.py"))


def drop_stale_caches(namespace, deps=_DEPS):
    """Remove numba's cache index of every cached kernel in ``namespace`` (a module's globals)
    whose dependencies (``deps``, file paths) changed since the index was noted; returns the
    indexes removed. Best effort: a read-only cache directory is left alone."""
    import hashlib
    digest = hashlib.sha256()
    try:
        for path in deps:
            with open(path, "rb") as f:
                digest.update(f.read())
    except OSError:     # sources not readable as files (a zipped install): nothing to compare
        return []
    tag = digest.hexdigest()
    removed = []
    for _, cache_file in _cache_files(namespace):
        index = cache_file._index_path
        note = index + ".deps"
        try:
            with open(note) as f:
                if f.read() == tag:
                    continue
        except OSError:
            pass
        try:
            if os.path.exists(index):
                os.remove(index)
                removed.append(index)
            os.makedirs(os.path.dirname(note), exist_ok=True)
            tmp = f"{note}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, note)
        except OSError:
            continue
    return removed


# numba's cache is not safe for processes that compile one kernel at the same time (numba issue
# #4807, open): saving a signature reads the kernel's index, takes the first free data-file
# number, writes the index back, then the data file. Two processes saving two signatures at once
# both take number 1: the index keeps one signature, and its data file may hold the other's
# machine code, which a later process would load and call with the wrong types. Runs start
# together on a cold cache often enough (torchrun's ranks, two `svp tune` runs, pytest-xdist's
# workers), so each kernel's save holds an exclusive lock on a file beside its index and each
# load a shared one: a save sees every earlier one, and no load reads an index whose data file
# is still being written. POSIX only (fcntl); elsewhere, or where the lock file cannot be opened
# (a read-only cache), numba's own unlocked behaviour.
@contextlib.contextmanager
def _flocked(path, exclusive):
    try:
        import fcntl
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)   # releases the lock


def lock_cache_file(cache_file):
    """Make a numba ``IndexDataCacheFile``'s ``save`` and ``load`` hold a lock on
    ``<index>.lock`` (exclusive for saves, shared for loads); idempotent."""
    if getattr(cache_file, "_svp_locked", False):
        return
    lock = cache_file._index_path + ".lock"
    save, load = cache_file.save, cache_file.load

    def locked_save(key, data):
        with _flocked(lock, exclusive=True):
            return save(key, data)

    def locked_load(key):
        with _flocked(lock, exclusive=False):
            return load(key)

    cache_file.save, cache_file.load, cache_file._svp_locked = locked_save, locked_load, True


def _cache_files(namespace):
    """(dispatcher, numba cache file) of every kernel in ``namespace`` compiled with cache=True."""
    from numba.core.dispatcher import Dispatcher
    for obj in list(namespace.values()):
        if isinstance(obj, Dispatcher):
            cache_file = getattr(getattr(obj, "_cache", None), "_cache_file", None)   # else NullCache
            if cache_file is not None:
                yield obj, cache_file


def guard_caches(namespace, deps=_DEPS):
    """What every kernel module does once its kernels are defined: drop the cache indexes made
    stale by a change in ``deps`` (drop_stale_caches), and lock each kernel's cache file
    (lock_cache_file)."""
    drop_stale_caches(namespace, deps)
    for _, cache_file in _cache_files(namespace):
        lock_cache_file(cache_file)


import numpy as np  # noqa: E402
import numba  # noqa: E402  (first: without numba pip installed no llvmlite either, and that error named llvmlite)
from llvmlite import ir  # noqa: E402
_POOL = int(numba.config.NUMBA_NUM_THREADS)   # numba's pool, fixed when numba was imported


# numba's first compile, or first load from its cache, in a process imports its array-math
# implementations (numba.np.arraymath), and that module asks once whether scipy's BLAS is there
# by importing scipy.linalg, only to pick how *user* code's np.dot-like inner products compile.
# None of svp's kernels uses it, yet every process paid the import on its first kernel call:
# ~0.2-0.3 s of a command's first forward on a 2-vCPU Zen 3 (numba's set-up 0.48-0.56 -> 0.17-0.21
# s; docs/benchmarks.md, forty-first round). So svp imports arraymath itself, with numba's check
# answered from the files scipy installed (the compiled cython_blas beside scipy.linalg) instead of
# importing them. Where that file is missing numba's own check runs (and finds no BLAS, as
# before); numba's BLAS functions still run the full check (the import and the integer-width
# test) when user code first compiles one. (So a scipy whose BLAS is installed but fails to
# import gets that check's clear error where np.correlate / np.convolve in numba code would
# otherwise have fallen back to a plain loop.)
def _scipy_blas_installed() -> bool:
    import importlib.machinery
    import importlib.util
    try:
        spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for root in spec.submodule_search_locations:
        try:
            if any(f.startswith("cython_blas.") and f.endswith(suffixes)
                   for f in os.listdir(os.path.join(root, "linalg"))):
                return True
        except OSError:
            pass
    return False


def _import_arraymath_without_scipy() -> bool:
    """Import numba.np.arraymath with its BLAS check answered by _scipy_blas_installed; True
    when done this way (False: already imported, or numba's own check ran)."""
    if "numba.np.arraymath" in sys.modules:
        return False
    try:
        from numba.np import linalg as nplinalg
        real = nplinalg.ensure_blas
    except (ImportError, AttributeError):   # pragma: no cover - a numba laid out otherwise
        return False
    if not _scipy_blas_installed():
        return False
    nplinalg.ensure_blas = lambda: None
    try:
        from numba.np import arraymath
    finally:
        nplinalg.ensure_blas = real
    arraymath.ensure_blas = real   # (its `from numba.np.linalg import ensure_blas` took ours)
    return True


ARRAYMATH_WITHOUT_SCIPY = _import_arraymath_without_scipy()

# Threading layer. numba's 'omp' layer loads the system libgomp, a second OpenMP runtime
# beside torch's. Measured here (2 vCPUs, torch 1 thread, another process on the other
# core): after one OpenMP-parallel scan, *every* following torch op took ~7.6 ms whatever its
# size (a 6k-element exp included), and a Vim-Tiny batch-8 forward took 6.2 s; with the
# 'workqueue' layer (numba's own threads, no second OpenMP runtime) the same forward took
# 0.48 s and the scan's own CPU time was unchanged (fwd+bwd 39.4 vs 38.6 ms, Vim-Small b=8).
# (OMP_WAIT_POLICY=PASSIVE, tried first, did not remove the stall.) But every 'workqueue'
# launch hands the whole loop to sleeping worker threads and waits for them: ~90-100 us per
# call on this VM even for an empty loop, at 1 thread too, and a Vim-Tiny SVP step makes 386
# launches. numba's 'tbb' layer (Intel oneTBB, no OpenMP) runs part of the loop on the calling
# thread: 2 us per empty launch, and the 2-thread SVP step went from 783-815 to 726-747 ms
# (docs/benchmarks.md, seventh round). So: 'tbb' when it loads (the `tbb` wheel is a
# dependency on Linux x86-64), else 'workqueue'; NUMBA_THREADING_LAYER set by the user wins.
# SVP_CPU_DEDICATED (svp.runtime) asks for 'omp' bound to torch's own libgomp instead: one
# OpenMP runtime, whose threads serve torch's ops and the kernels alike.
def _tbb_wheel_library():
    """The path of the `tbb` wheel's libtbb.so.12, or None when the wheel is not installed."""
    from importlib import metadata
    try:
        files = metadata.distribution("tbb").files or ()
    except metadata.PackageNotFoundError:
        return None
    return next((str(f.locate()) for f in files if f.name == "libtbb.so.12"), None)


def _tbb_loads() -> bool:
    """Whether numba's TBB layer can be used. The `tbb` wheel installs libtbb.so.12 under the
    environment's lib/, where numba's tbbpool extension does not look (it needs the library on
    the loader's path); loading it first, globally, satisfies tbbpool's dependency."""
    try:
        import ctypes
        lib = _tbb_wheel_library()
        if lib is not None:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        from numba.np.ufunc import parallel as _parallel
        check = getattr(_parallel, "_check_tbb_version_compatible", None)  # numba's own version floor
        if check is not None:
            check()
        from numba.np.ufunc import tbbpool  # noqa: F401
        return True
    except Exception:   # no tbb, too old, or an unloadable library: workqueue
        return False


def _torch_libgomp():
    """The path of the libgomp torch's wheel bundles (torch/lib/libgomp*.so*; Linux), when torch
    has loaded it, else None."""
    import glob
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    for lib in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))):
        try:
            ctypes.CDLL(lib, mode=os.RTLD_NOLOAD)   # loaded already (by libtorch_cpu), or fails
            return lib
        except OSError:
            continue
    return None


def _share_torch_openmp():
    """Make numba's 'omp' layer run on torch's OpenMP threads (SVP_CPU_DEDICATED, see
    svp.runtime). numba's omppool extension is linked against the system's libgomp, which then
    loads beside torch's; its OpenMP calls bind to whichever libgomp comes first in the dynamic
    linker's global search. With torch imported first that was torch's in both wheels checked
    (torch 2.1 with numba 0.58, 2.14 with 0.68; LD_DEBUG=bindings), and the system library sat
    unused; used before torch, numba bound to the system's, a second runtime with threads of its
    own. svp makes torch's libgomp global itself before omppool loads, so the binding does not
    rest on how torch loaded it (tests/test_scan_backends.py checks the binding). Returns torch's
    libgomp's path, or None (no bundled libgomp, or omppool does not load)."""
    lib = _torch_libgomp()
    if lib is None:
        return None
    import ctypes
    try:
        ctypes.CDLL(lib, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        from numba.np.ufunc import omppool  # noqa: F401  (binds its OpenMP symbols now)
    except (OSError, ImportError):
        return None
    return lib


SHARED_OPENMP = None   # torch's libgomp, when the kernels run on torch's OpenMP threads


_THREADS_CHECKED = []   # non-empty once numba's layer has started after the check


def _start_numba_threads():
    """Start numba's threading layer, after checking that this process may start the threads it
    starts. Where it cannot (a limit on a user's processes and threads: ``ulimit -u``), TBB's
    layer aborted the process ("pthread_create has failed"), the workqueue layer hung in its first
    parallel launch and OpenMP's exited: no word of svp's. A pool's worth of Python threads
    started and ended first says it in a line (as a non-root user under ``ulimit -u``, the
    workqueue layer needed as many free as its pool, TBB's one fewer, at least one)."""
    import threading

    from ..errors import BackendError

    if _THREADS_CHECKED:   # (SVP_CPU_DEDICATED starts the layer at import: once is enough)
        return
    go, started = threading.Event(), []
    try:
        for _ in range(_POOL):
            t = threading.Thread(target=go.wait, name="svp-thread-check", daemon=True)
            t.start()
            started.append(t)
    except RuntimeError as e:   # "can't start new thread"
        fewer = f", give numba fewer threads (NUMBA_NUM_THREADS=1; {_POOL} now)" if _POOL > 1 else ""
        raise BackendError(
            f"svp's CPU kernels cannot start numba's pool of {_POOL} thread{'s' * (_POOL > 1)} ({e}): "
            f"a limit on processes and threads (ulimit -u; in a container its pids limit)? Raise the "
            f"limit{fewer}, or run without svp's CPU kernels (SVP_SCAN_BACKEND=torch)") from None
    finally:
        go.set()
        for t in started:
            t.join()
    numba.get_num_threads()
    _THREADS_CHECKED.append(True)


def _pick_threading_layer(environ=os.environ):
    """The layer svp asks numba for, or None when the user chose one (NUMBA_THREADING_LAYER;
    a choice of 'tbb' still needs the wheel's library loaded for numba to find it). With
    SVP_CPU_DEDICATED, 'omp' on torch's own OpenMP runtime where that can be arranged."""
    global SHARED_OPENMP
    user = environ.get("NUMBA_THREADING_LAYER", "")
    if user:
        if user.lower().startswith("tbb"):
            _tbb_loads()
        return None
    if _runtime.dedicated(environ):
        SHARED_OPENMP = _share_torch_openmp()
        if SHARED_OPENMP is not None:
            return "omp"
    return "tbb" if _tbb_loads() else "workqueue"


THREADING_LAYER = _pick_threading_layer()
# torch imported before svp left libgomp's long spin in place: say so once, where it costs (the CPU
# kernels' first import), not at `import svp` (a GPU run does not mind)
_SPIN = _runtime.long_spin()   # (None in the usual case, svp first: no look for torch's libgomp then)
if _SPIN and _torch_libgomp():
    warnings.warn(_SPIN, _runtime.LongSpinWarning)
if THREADING_LAYER is not None:
    numba.config.THREADING_LAYER = THREADING_LAYER  # read at the first parallel launch
if SHARED_OPENMP is not None:
    # Start numba's layer now, in this thread. Its start sets the OpenMP thread count of the
    # thread it starts in to numba's pool size, and that count is torch's too here: started
    # lazily in a server's inference thread it overrode `svp serve --threads 1` there
    # (tests/test_serve_cli.py). torch's count is put back right after.
    _n = torch.get_num_threads()
    _start_numba_threads()
    torch.set_num_threads(_n)
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402
from numba.core import cgutils  # noqa: E402
import llvmlite.binding as _llvm  # noqa: E402

from .kept import kept  # noqa: E402

from .simd import VL, fma, is_2d, is_bf16, prefetch, prefetch_write, splat, vacc_f64, vhsum16, vload, vmax, vmin, \
    vscale_biased, vscale_pow2i, vpow2_from_magic, vfloor, vround_magic, vselect_ge, vstore, vstream, zeros, \
    zeros64, empty64, flush_denormals, restore_fp, _target_has_avx512f  # noqa: E402

# The package's auto-vectorised kernels (conv_cpu, norm_cpu, prompt_cpu; the scan kernels use
# explicit vectors) have loops over several arrays that numba cannot mark as non-aliasing;
# LLVM's default limit of 8 runtime overlap checks would leave them scalar. Raise the limit
# (a process-wide LLVM option that only changes vectorisation decisions).
try:
    _llvm.set_option("svp", "-runtime-memory-check-threshold=128")
except Exception:  # pragma: no cover - an LLVM without the option: slower, still correct
    pass

BW = 4 * VL      # channels per task: four 16-lane vectors side by side
DA_RUN = 8       # backward steps dA sums in float32 before adding them in float64
PF = 4           # rows prefetched this many steps ahead (see simd.prefetch)
# The backward's state loops one vector at a time (module docstring, Narrow registers): a constant
# of the compiled code, from the features numba compiles for (which its disk cache keys on).
_NARROW = not _target_has_avx512f(numba.core.registry.cpu_target.target_context)
CHUNK = 32       # time steps per backward chunk (8, 16 and 32 measured the same)

_f32 = np.float32
# exp: Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, degree-7 polynomial (Taylor-like
# minimax coefficients), then scale by 2^k built from the exponent bits.
_LOG2E_64 = 1.4426950408889634
_LOG2E = _f32(_LOG2E_64)
_RATIO_MAX = 2.0 ** 20
_LN2_HI = _f32(0.693359375)
_LN2_LO = _f32(-2.12194440e-4)
_P0 = _f32(1.9875691500e-4)
_P1 = _f32(1.3981999507e-3)
_P2 = _f32(8.3334519073e-3)
_P3 = _f32(4.1665795894e-2)
_P4 = _f32(1.6666665459e-1)
_P5 = _f32(5.0000001201e-1)
_ONE = _f32(1.0)
_TWO = _f32(2.0)
_ZERO = _f32(0.0)
_HALF = _f32(0.5)
_XMAX = _f32(88.3)
_XMIN = _f32(-87.3)
# log1p(t) = 2 atanh(f), f = t / (2 + t) in [0, 1/3] for t in [0, 1]
_Q = [_f32(1.0 / (2 * k + 1)) for k in range(9)]
_Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8 = _Q

# Fused multiply-adds ('contract'): numba 0.58 (LLVM 14) fused differently in a kernel it had
# just compiled and in the same kernel loaded from its disk cache (other bits, so a resumed run
# did not reproduce an uninterrupted one; without 'contract' both agreed). numba 0.68 gives the
# same bits both ways; releases in between were not checked, so they run without contraction.
_CONTRACT = {"contract"} if tuple(int(p) for p in numba.__version__.split(".")[:2]) >= (0, 68) else set()
_FM_SAFE = _CONTRACT | {"nsz"}  # keeps the order of every operation


@intrinsic
def _bits_to_f32(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always", fastmath=_FM_SAFE, error_model="numpy")
def _exp(x):
    """float32 exp, branch-free; exactly 0 below -87.3, saturates at 2^127 above 88.3."""
    xc = x if x > _XMIN else _XMIN        # (ternaries, not min/max: those do not vectorise)
    xc = xc if xc < _XMAX else _XMAX
    k = np.floor(xc * _LOG2E + _HALF)
    r = xc - k * _LN2_HI
    r = r - k * _LN2_LO
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = p * (r * r) + r + _ONE
    scale = _bits_to_f32(np.int32((np.int32(k) + 127) << 23))
    v = p * scale
    return v if x >= _XMIN else _ZERO


# 2^t for the decay factors exp(delta*A) = 2^(delta * A log2 e), the scan's inner-loop cost:
# the A log2 e products are formed once per call (in float64, rounded), so the loop needs no
# range-reduction multiply. Rounding by adding 1.5*2^23 (the float's own round-to-nearest), f
# = t - k in [-1/2, 1/2], a degree-6 polynomial fitted for relative error on that interval
# (2e-9 in exact arithmetic, 9.7e-8 = 0.8 ulp evaluated in float32, mean bias 1e-9), and 2^k
# built from the rounded sum's low bits (simd.vround_magic, simd.vpow2_from_magic). t <= -127
# gives exactly 0 (k = -127 makes the exponent field 0), t >= 127 saturates at 2^127 * p.
# Relative to exp(x) the error grows as |x| * 6e-8 (the rounding of t), which only matters
# where exp(x) is already negligible. 13 vector operations against 18 for exp(x) with a
# natural-log reduction.
_T_MIN = _f32(-127.0)
_T_MAX = _f32(127.0)
_E1 = _f32(0.6931471824645996)
_E2 = _f32(0.24022647738456726)
_E3 = _f32(0.055503323674201965)
_E4 = _f32(0.00961843691766262)
_E5 = _f32(0.0013398875016719103)
_E6 = _f32(0.00015353360504377633)


# LLVM's x86 tuning for Intel server cores with AVX-512 prefers 256-bit vectors (a clock
# penalty on old parts), and may split the kernels' 16-lane vectors in two. The scan kernels
# are compute-bound on float32 FMAs, so they ask for 512-bit vectors with the
# "prefer-vector-width" function attribute (what clang's -mprefer-vector-width=512 sets),
# attached to the function this is called in (the prange body). llvmlite's attribute set only
# admits a fixed list of names, hence the set.add. On a CPU without AVX-512 the attribute
# cannot widen anything, and other targets ignore it. Vector width does not change any result
# (svp.ops.simd: every operation is explicit). The auto-vectorised conv and prompt kernels ask
# for it too: their SiLU is compute-bound and LLVM gave them 256-bit vectors (18-21% off their
# time at the Vim-Tiny shapes, same bits: without reassociation LLVM keeps every operation's
# order at any width); the memory-bound add + RMSNorm kernels gained nothing and keep the default.
@intrinsic
def _wide_vectors(typingctx):
    sig = types.none()

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return sig, codegen


# A kernel's task is compiled on its own (cache=True) and called through its address, which the
# kernel gets as an argument, instead of as a numba function call: numba links a callee's
# optimised code into the caller's module and optimises and emits it again, for a parallel kernel
# twice (the parfor's gufunc, then the kernel), so each task went through LLVM three times. The
# backward's first compile (float32, time steps passed in) took 16.8 s, 7.7 s of it in the
# kernel around the task; through the address 8.8 s. The call itself is one indirect call per
# task (a task is a block of 64 channels over the whole sequence), and the task's machine code
# is what its own compile emits: the same bits; at two threads the same speed, at one the
# backward ~3% slower (its state loops keep one more value on the stack; docs/benchmarks.md,
# twenty-ninth round). run_tasks' lookup of the address costs ~4 us a call.
# The parallel kernels (_scan_fwd and _scan_bwd here, conv_cpu's _conv_fwd and _conv_bwd,
# prompt_cpu's _prompt_fwd and _prompt_bwd) stay one per task, the same few lines each: one
# kernel for all would take its task's arguments as a tuple (or *args) from Python, and numba
# 0.58 (the floor) dispatches a call with a long tuple of arrays to another specialisation of
# the kernel: ~half of 20,000 calls when two specialisations differed in one
# array's rank (none under numba 0.68; docs/benchmarks.md, thirtieth round). Built inside each
# kernel from its own arguments, the tuple never crosses the dispatcher (tested: no svp kernel
# is compiled with a tuple argument).
def _sig_hash(argtypes):
    """A hash of numba argument types that is the same in every process."""
    import zlib
    return zlib.crc32(", ".join(str(t) for t in argtypes).encode())


@intrinsic
def _task_sig_is(typingctx, h, index, args):
    """Whether ``h`` is the _sig_hash of (index, *args)'s types: a kernel checks the task address
    it was given against the types it was compiled for before it calls it."""
    if not isinstance(args, types.BaseTuple):
        return None
    want = _sig_hash((index,) + tuple(args.types))

    def codegen(context, builder, signature, llargs):
        return builder.icmp_unsigned("==", llargs[0], ir.Constant(llargs[0].type, want))
    return types.boolean(h, index, args), codegen


@intrinsic
def _call_task(typingctx, addr, index, args):
    """Call the numba function at ``addr`` (numba's calling convention, returning None) with
    (index, *args). Its exceptions are not raised: the tasks raise none."""
    if not isinstance(args, types.BaseTuple):
        return None
    argtys = [index] + list(args.types)

    def codegen(context, builder, signature, llargs):
        cc = context.call_conv
        fnty = cc.get_function_type(types.none, argtys)
        fn = builder.inttoptr(llargs[0], fnty.as_pointer())
        vals = [llargs[1]] + [builder.extract_value(llargs[2], i) for i in range(len(argtys) - 1)]
        ret = cgutils.alloca_once(builder, cc.get_return_type(types.none).pointee)
        exc = cgutils.alloca_once(builder, fnty.args[1].pointee)
        builder.call(fn, [ret, exc] + list(cc._get_arg_packer(argtys).as_arguments(builder, vals)))
        return context.get_dummy_value()
    return types.none(addr, index, args), codegen


# numba compiles a prange body's gufunc with LLVM `noalias` on its array arguments when its alias
# analysis finds none among them (numba's Flags.noalias, set in parfor_lowering), so LLVM
# vectorises the body's loops without runtime checks that the arrays overlap; a function compiled
# by @njit gets no such flag, and @njit has no option for it. This adds one: a task whose array
# arguments never overlap in memory that is written (checked by hand for each task given it)
# takes `_svp_noalias=True` in its decorator. SVP's prompt backward, a prange body before the
# thirty-third round, ran 1.01-1.10x the time as a task without it and 0.95-1.04x (2 threads)
# with it on the task and its row function, the same bits (docs/benchmarks.md, thirty-third
# round). numba 0.58 to 0.68 map decorator options to flags through these class attributes
# (TargetOptions._apply).
if not hasattr(numba.core.cpu.CPUTargetOptions, "_svp_noalias"):
    numba.core.cpu.CPUTargetOptions._svp_noalias = numba.core.options.TargetOptions.Mapping("noalias")


_TASKS = {}


def _task_address(task, index, args, fresh=False):
    """(address, _sig_hash) of numba function ``task`` compiled (or loaded from numba's cache)
    for (``index``'s numba type, *args' types); remembered per task and the args' dtypes and ranks."""
    key = (task, index, tuple([(a.dtype, a.ndim) if type(a) is np.ndarray else type(a) for a in args]))
    hit = None if fresh else _TASKS.get(key)
    if hit is None:
        sig = (index,) + tuple(numba.typeof(a) for a in args)
        task.compile(sig)
        cres = task.overloads[sig]
        hit = _TASKS[key] = (cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name), _sig_hash(sig))
    return hit


_LAST_TASK = {}   # task -> the (address, hash) its last call ran


def run_tasks(kernel, task, index, *args):
    """``kernel(address, hash, *args)``: a parallel kernel that calls numba function ``task``
    with (its task number as numba type ``index``, *args) through the task's address.

    The task's last address is tried first: the kernel checks it against the types it was
    compiled for and runs nothing when they differ (returns False), so a call with other types
    falls through to the lookup by dtypes and ranks. Forming that lookup's key over a scan
    call's 31 arguments took 2.4 us in a loop, seven launches a layer."""
    last = _LAST_TASK.get(task)
    if last is not None and kernel(last[0], last[1], *args):
        return
    addr, h = _task_address(task, index, args)
    if not kernel(addr, h, *args):   # the same dtypes and ranks, other types (layout, read-only)
        addr, h = _task_address(task, index, args, fresh=True)
        if not kernel(addr, h, *args):
            raise RuntimeError(f"{kernel.__name__}: its task {task.__name__} was compiled for other argument types")
    _LAST_TASK[task] = (addr, h)


# A plain function, not inline="always": the conv's and the prompt kernels' tasks call it and LLVM
# inlines it (no call is left in their code), where numba inlines an inline="always" function into
# the caller's IR and types it again at every call site, which numba 0.58 (the floor) does slowly:
# the prompt kernels' forward task (four sites) took 11 s to compile per variant under 0.58 with
# it inline="always", 2 s so. Same bits (docs/benchmarks.md, thirty-third round).
@njit(fastmath=_FM_SAFE, error_model="numpy")
def _sigmoid(x):
    return _ONE / (_ONE + _exp(-x))


# --- 16-lane vector versions of the helpers (svp.ops.simd: exact float32, explicit fma) ---
@njit
def _vexp2(t):
    tc = vmin(splat(_T_MAX), vmax(splat(_T_MIN), t))   # bound first: NaN stays NaN
    s, k = vround_magic(tc)
    f = tc - k
    p = splat(_E6)
    p = fma(p, f, splat(_E5))
    p = fma(p, f, splat(_E4))
    p = fma(p, f, splat(_E3))
    p = fma(p, f, splat(_E2))
    p = fma(p, f, splat(_E1))
    p = fma(p, f, splat(_ONE))
    return p * vpow2_from_magic(s)


# 2^(dt a) for a < 0 and 0 <= dt <= dtmax (the models' case, see _fast_decay): 10 vector
# operations against 14 for _vexp2(dt * a) (on AVX-512 two fewer: the scaling by 2^k, an
# integer max, a shift and a multiply, is one vscalefps by s - M' = k, which the reduction
# forms anyway), and the product is never rounded on its own.
# s = dt a + M' in one fused rounding gives k = round(dt a) as s - M'; the reduced argument
# f = dt a - k is a second fused multiply-add, so the |t| * 6e-8 error of rounding t goes
# away. M' = 1.5 * 2^23 + 127 leaves k + 127 in the low bits of s, so 2^k is s's bits
# shifted, after one integer max that sends k <= -127 to exactly 0, as in _vexp2 (vscalefps:
# to p * 2^k, below the normal range, which the kernels flush to 0: the same bits). Needs
# |dt a| <= 2^27 or so (then |f| stays small and p(f) finite, so p * 0 = 0): the caller
# bounds dt by dtmax.
_MAGIC_B = _f32(12582912.0 + 127.0)


@njit
def _vexp2_neg(dt, a):
    s = fma(dt, a, splat(_MAGIC_B))
    f = fma(dt, a, -(s - _MAGIC_B))
    p = splat(_E6)
    p = fma(p, f, splat(_E5))
    p = fma(p, f, splat(_E4))
    p = fma(p, f, splat(_E3))
    p = fma(p, f, splat(_E2))
    p = fma(p, f, splat(_E1))
    p = fma(p, f, splat(_ONE))
    return vscale_biased(p, s)


@njit
def _vexp(x):
    xc = vmin(vmax(x, splat(_XMIN)), splat(_XMAX))
    k = vfloor(fma(xc, splat(_LOG2E), splat(_HALF)))
    r = fma(k, splat(-_LN2_HI), xc)
    r = fma(k, splat(-_LN2_LO), r)
    p = splat(_P0)
    p = fma(p, r, splat(_P1))
    p = fma(p, r, splat(_P2))
    p = fma(p, r, splat(_P3))
    p = fma(p, r, splat(_P4))
    p = fma(p, r, splat(_P5))
    p = fma(p, r * r, r) + _ONE
    return vselect_ge(x, splat(_XMIN), vscale_pow2i(p, k), zeros())


@njit
def _vlog1p01(t):
    f = t / (t + _TWO)
    f2 = f * f
    p = splat(_Q8)
    p = fma(p, f2, splat(_Q7))
    p = fma(p, f2, splat(_Q6))
    p = fma(p, f2, splat(_Q5))
    p = fma(p, f2, splat(_Q4))
    p = fma(p, f2, splat(_Q3))
    p = fma(p, f2, splat(_Q2))
    p = fma(p, f2, splat(_Q1))
    p = fma(p, f2, splat(_Q0))
    return (f + f) * p


@njit
def _vsoftplus(x):
    # max(0, x) with 0 first: NaN gives NaN (exp(NaN) is 0 in _vexp, so without it a NaN
    # delta would vanish from the outputs)
    return vmax(zeros(), x) + _vlog1p01(_vexp(-vmax(x, -x)))


@njit
def _vsigmoid(x):
    return _ONE / (_vexp(-x) + _ONE)


# The forward's state loop and the backward's recompute of it run the same operations (the
# backward reproduces the forward's states bit for bit); what they share is here.
@njit
def _softplus_of(x, softplus):
    return _vsoftplus(x) if softplus else x


@njit
def _delta(dl, off, bias, softplus):
    """The time step of 16 channels: delta + bias, through softplus when asked."""
    return _softplus_of(vload(dl, off) + bias, softplus)


# inline="always": numba inlines it into the step loop (a call there spills every live vector
# register around it, see _flush_da)
@njit(inline="always")
def _low_rank(Lm, lr, Wb, R, X, xo):
    """A block's time step before bias and softplus, formed from the dt_proj input row at
    Lm[lr:lr+R] as dt_proj forms it: X[xo:xo+BW] = sum_r low[r] * W[c, r], r in order (Wb: the
    block's rows of W^T, R x BW). Four chains of multiply-adds side by side: one chain per
    vector ran four times R latencies (the two scans' forward at Vim-Small's R = 24, batch 8,
    took 6.2 ms instead of 5.0). The forward and the backward's recompute share it, so the two
    give the same bits."""
    lv = splat(Lm[lr])
    x0 = lv * vload(Wb, 0)
    x1 = lv * vload(Wb, VL)
    x2 = lv * vload(Wb, 2 * VL)
    x3 = lv * vload(Wb, 3 * VL)
    for r in range(1, R):
        lv = splat(Lm[lr + r])
        o = r * BW
        x0 = fma(lv, vload(Wb, o), x0)
        x1 = fma(lv, vload(Wb, o + VL), x1)
        x2 = fma(lv, vload(Wb, o + 2 * VL), x2)
        x3 = fma(lv, vload(Wb, o + 3 * VL), x3)
    vstore(X, xo, x0)
    vstore(X, xo + VL, x1)
    vstore(X, xo + 2 * VL, x2)
    vstore(X, xo + 3 * VL, x3)


@njit
def _w_block(Wt, c0, dp):
    """The rows of W^T (R, dp) for the block at channel c0, R x BW floats in L1-sized scratch
    (a 1-D placeholder Wt: an unused vector)."""
    R = Wt.shape[0] if is_2d(Wt) else 0
    Wf = Wt.reshape(Wt.size)
    Wb = empty64(max(R, 1) * BW)
    for r in range(R):
        for k in range(0, BW, VL):
            vstore(Wb, r * BW + k, vload(Wf, r * dp + c0 + k))
    return Wb, R


@njit
def _decay(fast, dt, dc, a):
    """exp(delta A) as 2^(dt * A log2 e): the fused-rounding form where _fast_decay allows it
    (dc: dt capped per channel), else the general one."""
    return _vexp2_neg(dc, a) if fast else _vexp2(dt * a)


# inline="always" (numba inlines it; LLVM declined to): a call from the step loop spills every
# live vector register around it (all of them are caller-saved); with _store_sums, ~5% of the
# backward.
@njit(inline="always")
def _flush_da(dAacc, dAc, N):
    for o in range(0, N * BW, VL):
        vacc_f64(dAacc, o, vload(dAc, o))
        vstore(dAc, o, zeros())


@njit
def _put(a, a16, prev, off, v, acc):
    """a[off:off+16] = v, or += v when acc (the second direction of a bidirectional mixer adds
    its output, and its z gradient, to the first's: a + v is the same sum PyTorch forms).

    The kernels for a bfloat16 z (uint16 bits, svp.ops.simd) get a16 as a uint16 array: empty,
    or the bfloat16 output, which then gets prev[off:off+16] + v (prev: the first direction's
    float32 output) rounded once, as its cast would round it. One kernel type for both of their
    outputs, so a bfloat16 output adds no compilation of its own. The float32 kernels get an
    empty float32 a16, and is_bf16 folds this to their own code."""
    if is_bf16(a16):
        s = vload(prev, off) + v if acc else v
        if a16.size:
            vstore(a16, off, s)
        else:
            vstore(a, off, s)
    else:
        vstore(a, off, vload(a, off) + v if acc else v)


@njit
def _out(a, off, stream, v):
    """a[off:off+16] = v, streamed past the caches when ``stream`` (see _bwd)."""
    if stream:
        vstream(a, off, v)
    else:
        vstore(a, off, v)


@njit
def _prefetch_rows(a, b, c, has_c, off):
    """The four cache lines of a block's row at flat offset off, in a, b (and c)."""
    for k in range(0, BW, VL):
        prefetch(a, off + k)
        prefetch(b, off + k)
        if has_c:
            prefetch(c, off + k)


@njit
def _prefetch_out(a, off):
    """The same for a row of a about to be written."""
    for k in range(0, BW, VL):
        prefetch_write(a, off + k)


@njit
def _prefetch_put(a, a16, prev, acc, off):
    """_prefetch_out for the row _put writes at flat offset off (and the one it reads, when acc)."""
    if is_bf16(a16) and a16.size:
        _prefetch_out(a16, off)
        if acc:
            _prefetch_rows(prev, prev, prev, False, off)
    else:
        _prefetch_out(a, off)   # (a is prev)


# Each kernel's work is one task per (batch row, group, 64-channel block), and the task's code is a
# function of its own, called from a one-line prange: numba types a prange body twice (inside the
# kernel, then again as its parallel body) and its parfor passes deep-copy the body's IR, which
# made the backward's first compile ~12 s per variant on a quiet Emerald Rapids; as a function,
# 8 s (the forward 4.3 -> 3.8 s). Same bits and speed as the body inlined (docs/benchmarks.md,
# twenty-sixth round), given the lane sums in _bwd_task (see _store_sums). Since the
# twenty-ninth round the prange calls the task through its address (run_tasks, _call_task), so
# its code is compiled once, not again inside the kernel.
@njit(cache=True, error_model="numpy")
def _fwd_task(task, u, dl, Lm, ls, Wt, z, Bm, Cm, A2t, Dv, bias, has_z, softplus, reverse, K, acc, prev, out, out16,
              hs, hlast, fast, dtmax, b, L, d, g, N, bs, cs, stream):
    # Wt 2-D: the time steps are formed here from dt_proj's input rows (Lm, row stride ls) and
    # W^T (R, d), not read from dl (see _fwd's dt_w)
    dg = d // g
    nbg = dg // BW
    nchunk = (L + K - 1) // K
    NV = N * BW
    _wide_vectors()
    fpc = flush_denormals()   # see the module docstring, Denormals
    # a constant of the task's code (Wt's type): as a flag passed in, a runtime value, it cost the
    # float32 backward ~10%
    lowr = is_2d(Wt)
    bi = task // (g * nbg)
    rem = task - bi * (g * nbg)
    gi = rem // nbg
    blk = rem - gi * nbg
    c0 = gi * dg + blk * BW
    A2b = empty64(NV)
    h = zeros64(NV)
    for n in range(N):
        vstore(A2b, n * BW, vload(A2t, n * d + c0))
        vstore(A2b, n * BW + VL, vload(A2t, n * d + c0 + VL))
        vstore(A2b, n * BW + 2 * VL, vload(A2t, n * d + c0 + 2 * VL))
        vstore(A2b, n * BW + 3 * VL, vload(A2t, n * d + c0 + 3 * VL))
    D0 = vload(Dv, c0)
    D1 = vload(Dv, c0 + VL)
    D2 = vload(Dv, c0 + 2 * VL)
    D3 = vload(Dv, c0 + 3 * VL)
    b0 = vload(bias, c0)
    b1 = vload(bias, c0 + VL)
    b2 = vload(bias, c0 + 2 * VL)
    b3 = vload(bias, c0 + 3 * VL)
    m0 = vload(dtmax, c0)
    m1 = vload(dtmax, c0 + VL)
    m2 = vload(dtmax, c0 + 2 * VL)
    m3 = vload(dtmax, c0 + 3 * VL)
    Wb, R = _w_block(Wt, c0, d)
    X = empty64(BW)
    for s in range(L):
        if s % K == 0:
            hb = (bi * nchunk + s // K) * N
            for n in range(N):
                _out(hs, (hb + n) * d + c0, stream, vload(h, n * BW))
                _out(hs, (hb + n) * d + c0 + VL, stream, vload(h, n * BW + VL))
                _out(hs, (hb + n) * d + c0 + 2 * VL, stream, vload(h, n * BW + 2 * VL))
                _out(hs, (hb + n) * d + c0 + 3 * VL, stream, vload(h, n * BW + 3 * VL))
        t = L - 1 - s if reverse else s
        row = (bi * L + t) * d + c0
        br = (bi * L + t) * bs + gi * N
        cr = (bi * L + t) * cs + gi * N
        if s + PF < L:
            tp = (bi * L + (t - PF if reverse else t + PF)) * d + c0
            _prefetch_rows(u, dl, z, has_z, tp)
            _prefetch_put(out, out16, prev, acc, tp)
            if lowr:
                prefetch(Lm, (bi * L + (t - PF if reverse else t + PF)) * ls)
        # The next chunk's state rows (written all at once at its first step), one state's
        # row per step ahead of it: unowned, those N x 4 lines stalled the stores behind them
        # (the forward's calls in a Vim-Tiny b8 step -5%: docs/benchmarks.md, twelfth round).
        # Streamed (the backward reads them much later), they need no line first.
        jc = s % K
        if not stream and jc < N and s - jc + K < L:
            _prefetch_out(hs, ((bi * nchunk + s // K + 1) * N + jc) * d + c0)
        u0 = vload(u, row)
        u1 = vload(u, row + VL)
        u2 = vload(u, row + 2 * VL)
        u3 = vload(u, row + 3 * VL)
        if lowr:
            _low_rank(Lm, (bi * L + t) * ls, Wb, R, X, 0)
            dt0 = _softplus_of(vload(X, 0) + b0, softplus)
            dt1 = _softplus_of(vload(X, VL) + b1, softplus)
            dt2 = _softplus_of(vload(X, 2 * VL) + b2, softplus)
            dt3 = _softplus_of(vload(X, 3 * VL) + b3, softplus)
        else:
            dt0 = _delta(dl, row, b0, softplus)
            dt1 = _delta(dl, row + VL, b1, softplus)
            dt2 = _delta(dl, row + 2 * VL, b2, softplus)
            dt3 = _delta(dl, row + 3 * VL, b3, softplus)
        dtu0 = dt0 * u0
        dtu1 = dt1 * u1
        dtu2 = dt2 * u2
        dtu3 = dt3 * u3
        dc0 = vmin(m0, dt0)   # the time step second: vmin gives it when it is NaN, so NaN stays NaN
        dc1 = vmin(m1, dt1)
        dc2 = vmin(m2, dt2)
        dc3 = vmin(m3, dt3)
        y0 = zeros()
        y1 = zeros()
        y2 = zeros()
        y3 = zeros()
        for n in range(N):
            o = n * BW
            bn = Bm[np.uint64(br + n)]
            cn = splat(Cm[np.uint64(cr + n)])
            a = vload(A2b, o)
            e0 = _decay(fast, dt0, dc0, a)
            a = vload(A2b, o + VL)
            e1 = _decay(fast, dt1, dc1, a)
            a = vload(A2b, o + 2 * VL)
            e2 = _decay(fast, dt2, dc2, a)
            a = vload(A2b, o + 3 * VL)
            e3 = _decay(fast, dt3, dc3, a)
            h0 = fma(e0, vload(h, o), dtu0 * bn)
            h1 = fma(e1, vload(h, o + VL), dtu1 * bn)
            h2 = fma(e2, vload(h, o + 2 * VL), dtu2 * bn)
            h3 = fma(e3, vload(h, o + 3 * VL), dtu3 * bn)
            vstore(h, o, h0)
            vstore(h, o + VL, h1)
            vstore(h, o + 2 * VL, h2)
            vstore(h, o + 3 * VL, h3)
            y0 = fma(h0, cn, y0)
            y1 = fma(h1, cn, y1)
            y2 = fma(h2, cn, y2)
            y3 = fma(h3, cn, y3)
        if has_z:
            z0 = vload(z, row)
            z1 = vload(z, row + VL)
            z2 = vload(z, row + 2 * VL)
            z3 = vload(z, row + 3 * VL)
            _put(out, out16, prev, row, fma(D0, u0, y0) * (z0 * _vsigmoid(z0)), acc)
            _put(out, out16, prev, row + VL, fma(D1, u1, y1) * (z1 * _vsigmoid(z1)), acc)
            _put(out, out16, prev, row + 2 * VL, fma(D2, u2, y2) * (z2 * _vsigmoid(z2)), acc)
            _put(out, out16, prev, row + 3 * VL, fma(D3, u3, y3) * (z3 * _vsigmoid(z3)), acc)
        else:
            _put(out, out16, prev, row, fma(D0, u0, y0), acc)
            _put(out, out16, prev, row + VL, fma(D1, u1, y1), acc)
            _put(out, out16, prev, row + 2 * VL, fma(D2, u2, y2), acc)
            _put(out, out16, prev, row + 3 * VL, fma(D3, u3, y3), acc)
    for n in range(N):
        vstore(hlast, (bi * N + n) * d + c0, vload(h, n * BW))
        vstore(hlast, (bi * N + n) * d + c0 + VL, vload(h, n * BW + VL))
        vstore(hlast, (bi * N + n) * d + c0 + 2 * VL, vload(h, n * BW + 2 * VL))
        vstore(hlast, (bi * N + n) * d + c0 + 3 * VL, vload(h, n * BW + 3 * VL))
    restore_fp(fpc)


@njit(parallel=True, cache=True, error_model="numpy")
def _scan_fwd(taddr, thash, u, dl, Lm, ls, Wt, z, Bm, Cm, A2t, Dv, bias, has_z, softplus, reverse, K, acc, prev, out,
              out16, hs, hlast, fast, dtmax, b, L, d, g, N, bs, cs, stream):
    args = (u, dl, Lm, ls, Wt, z, Bm, Cm, A2t, Dv, bias, has_z, softplus, reverse, K, acc, prev, out, out16, hs,
            hlast, fast, dtmax, b, L, d, g, N, bs, cs, stream)
    if not _task_sig_is(thash, np.uint64(0), args):
        return False
    for task in prange(b * g * ((d // g) // BW)):
        _call_task(taddr, np.uint64(task), args)
    return True


@njit(cache=True, error_model="numpy")
def _bwd_task(task, u, dl, Lm, ls, Wt, z, Bm, Cm, At, A2t, Dv, bias, has_z, softplus, reverse, K, hs, dout, has_dlast,
              dlast, acc, dz_prev, du_o, ddl_o, dz_o, dz16, dBp, dCp, dLp, dWp, need_dlow, need_dw, dAp, dDp, dbp,
              need_da, need_ddb, fast, dtmax, b, L, d, g, N, bs, cs, stream):
    # Wt 2-D (see _scan_fwd): the time steps are recomputed from Lm and W^T, the gradient of
    # Lm's rows is formed per chunk and block into dLp (_dlow_rows) when need_dlow, and W's own
    # gradient per chunk into the task's rows of dWp (_dw_rows) when need_dw; d_delta (ddl_o) is
    # then never written (Wt 1-D: it always is)
    dg = d // g
    nbg = dg // BW
    nchunk = (L + K - 1) // K
    NG = (N + VL - 1) // VL
    NV = N * BW
    _wide_vectors()
    fpc = flush_denormals()   # see the module docstring, Denormals
    # a constant of the task's code (Wt's type): as a flag passed in, a runtime value, it cost the
    # float32 backward ~10%
    lowr = is_2d(Wt)
    bi = task // (g * nbg)
    rem = task - bi * (g * nbg)
    gi = rem // nbg
    blk = rem - gi * nbg
    c0 = gi * dg + blk * BW
    Ab = empty64(NV)
    A2b = empty64(NV)
    dh = zeros64(NV)
    for n in range(N):
        o = n * BW
        vstore(Ab, o, vload(At, n * d + c0))
        vstore(Ab, o + VL, vload(At, n * d + c0 + VL))
        vstore(Ab, o + 2 * VL, vload(At, n * d + c0 + 2 * VL))
        vstore(Ab, o + 3 * VL, vload(At, n * d + c0 + 3 * VL))
        vstore(A2b, o, vload(A2t, n * d + c0))
        vstore(A2b, o + VL, vload(A2t, n * d + c0 + VL))
        vstore(A2b, o + 2 * VL, vload(A2t, n * d + c0 + 2 * VL))
        vstore(A2b, o + 3 * VL, vload(A2t, n * d + c0 + 3 * VL))
        if has_dlast:   # else the state gradient starts at zero (zeros64)
            for k in range(0, BW, VL):
                vstore(dh, o + k, vload(dlast, (bi * N + n) * d + c0 + k))
    # chunk buffers, written before they are read (dAc is zeroed per chunk)
    Hb = empty64((K + 1) * NV)
    Eb = empty64(K * NV)
    Tb = empty64(K * BW)
    Gb = empty64(K * BW)
    P = empty64(VL * VL)
    tmp = empty64(VL)
    dAc = empty64(NV)
    S4 = empty64(2 * BW)   # _NARROW's loops: the four vectors' y, or their sums of dh B and q A
    dAacc = np.zeros(NV, np.float64)
    dDacc = np.zeros(BW, np.float64)
    dbacc = np.zeros(BW, np.float64)
    D0 = vload(Dv, c0)
    D1 = vload(Dv, c0 + VL)
    D2 = vload(Dv, c0 + 2 * VL)
    D3 = vload(Dv, c0 + 3 * VL)
    b0 = vload(bias, c0)
    b1 = vload(bias, c0 + VL)
    b2 = vload(bias, c0 + 2 * VL)
    b3 = vload(bias, c0 + 3 * VL)
    m0 = vload(dtmax, c0)
    m1 = vload(dtmax, c0 + VL)
    m2 = vload(dtmax, c0 + 2 * VL)
    m3 = vload(dtmax, c0 + 3 * VL)
    Wb, R = _w_block(Wt, c0, d)
    Sb = empty64(K * BW if lowr else BW)   # the softplus arguments of the chunk's steps
    # the gradient of the time steps per chunk step, and W's block as (BW, Rp) rows
    Rp = (R + VL - 1) // VL * VL
    keep_db = lowr and (need_dlow or need_dw)
    Db = empty64(K * BW if keep_db else VL)
    Wc = _w_cols(Wb, R, Rp) if lowr and need_dlow else Db
    dWacc = np.zeros(R * BW if lowr and need_dw else 1, np.float64)
    pbase = ((bi * g + gi) * nbg + blk) * L
    for kk in range(nchunk - 1, -1, -1):
        s0 = kk * K
        s1_ = min(L, s0 + K)
        hbase = (bi * nchunk + kk) * N
        for n in range(N):
            o = n * BW
            vstore(Hb, o, vload(hs, (hbase + n) * d + c0))
            vstore(Hb, o + VL, vload(hs, (hbase + n) * d + c0 + VL))
            vstore(Hb, o + 2 * VL, vload(hs, (hbase + n) * d + c0 + 2 * VL))
            vstore(Hb, o + 3 * VL, vload(hs, (hbase + n) * d + c0 + 3 * VL))
            if need_da:
                vstore(dAc, o, zeros())
                vstore(dAc, o + VL, zeros())
                vstore(dAc, o + 2 * VL, zeros())
                vstore(dAc, o + 3 * VL, zeros())
        for s in range(s0, s1_):
            j = s - s0
            t = L - 1 - s if reverse else s
            row = (bi * L + t) * d + c0
            br = (bi * L + t) * bs + gi * N
            cr = (bi * L + t) * cs + gi * N
            if s + PF < L:
                tp = (bi * L + (t - PF if reverse else t + PF)) * d + c0
                _prefetch_rows(u, dl, z, has_z, tp)
                _prefetch_rows(dout, dout, dout, False, tp)
                if lowr:
                    prefetch(Lm, (bi * L + (t - PF if reverse else t + PF)) * ls)
                if has_z:
                    _prefetch_put(dz_o, dz16, dz_prev, acc, tp)
            u0 = vload(u, row)
            u1 = vload(u, row + VL)
            u2 = vload(u, row + 2 * VL)
            u3 = vload(u, row + 3 * VL)
            if lowr:
                _low_rank(Lm, (bi * L + t) * ls, Wb, R, Sb, j * BW)
                x0 = vload(Sb, j * BW) + b0
                x1 = vload(Sb, j * BW + VL) + b1
                x2 = vload(Sb, j * BW + 2 * VL) + b2
                x3 = vload(Sb, j * BW + 3 * VL) + b3
                vstore(Sb, j * BW, x0)
                vstore(Sb, j * BW + VL, x1)
                vstore(Sb, j * BW + 2 * VL, x2)
                vstore(Sb, j * BW + 3 * VL, x3)
                dt0 = _softplus_of(x0, softplus)
                dt1 = _softplus_of(x1, softplus)
                dt2 = _softplus_of(x2, softplus)
                dt3 = _softplus_of(x3, softplus)
            else:
                dt0 = _delta(dl, row, b0, softplus)
                dt1 = _delta(dl, row + VL, b1, softplus)
                dt2 = _delta(dl, row + 2 * VL, b2, softplus)
                dt3 = _delta(dl, row + 3 * VL, b3, softplus)
            vstore(Tb, j * BW, dt0)
            vstore(Tb, j * BW + VL, dt1)
            vstore(Tb, j * BW + 2 * VL, dt2)
            vstore(Tb, j * BW + 3 * VL, dt3)
            hp0 = j * NV
            hn0 = hp0 + NV
            if _NARROW:   # one vector at a time (module docstring, Narrow registers)
                for k in range(0, BW, VL):
                    dtk = vload(Tb, j * BW + k)
                    dck = vmin(vload(dtmax, c0 + k), dtk)
                    dtuk = dtk * vload(u, row + k)
                    yk = zeros()
                    for n in range(N):
                        o = n * BW + k
                        ek = _decay(fast, dtk, dck, vload(A2b, o))
                        hk = fma(ek, vload(Hb, hp0 + o), dtuk * Bm[np.uint64(br + n)])
                        vstore(Eb, hp0 + o, ek)
                        vstore(Hb, hn0 + o, hk)
                        yk = fma(hk, splat(Cm[np.uint64(cr + n)]), yk)
                    vstore(S4, k, yk)
                y0 = vload(S4, 0)
                y1 = vload(S4, VL)
                y2 = vload(S4, 2 * VL)
                y3 = vload(S4, 3 * VL)
            else:
                dtu0 = dt0 * u0
                dtu1 = dt1 * u1
                dtu2 = dt2 * u2
                dtu3 = dt3 * u3
                dc0 = vmin(m0, dt0)
                dc1 = vmin(m1, dt1)
                dc2 = vmin(m2, dt2)
                dc3 = vmin(m3, dt3)
                y0 = zeros()
                y1 = zeros()
                y2 = zeros()
                y3 = zeros()
                for n in range(N):
                    o = n * BW
                    bn = Bm[np.uint64(br + n)]
                    cn = splat(Cm[np.uint64(cr + n)])
                    a = vload(A2b, o)
                    e0 = _decay(fast, dt0, dc0, a)
                    a = vload(A2b, o + VL)
                    e1 = _decay(fast, dt1, dc1, a)
                    a = vload(A2b, o + 2 * VL)
                    e2 = _decay(fast, dt2, dc2, a)
                    a = vload(A2b, o + 3 * VL)
                    e3 = _decay(fast, dt3, dc3, a)
                    h0 = fma(e0, vload(Hb, hp0 + o), dtu0 * bn)
                    h1 = fma(e1, vload(Hb, hp0 + o + VL), dtu1 * bn)
                    h2 = fma(e2, vload(Hb, hp0 + o + 2 * VL), dtu2 * bn)
                    h3 = fma(e3, vload(Hb, hp0 + o + 3 * VL), dtu3 * bn)
                    vstore(Eb, hp0 + o, e0)
                    vstore(Eb, hp0 + o + VL, e1)
                    vstore(Eb, hp0 + o + 2 * VL, e2)
                    vstore(Eb, hp0 + o + 3 * VL, e3)
                    vstore(Hb, hn0 + o, h0)
                    vstore(Hb, hn0 + o + VL, h1)
                    vstore(Hb, hn0 + o + 2 * VL, h2)
                    vstore(Hb, hn0 + o + 3 * VL, h3)
                    y0 = fma(h0, cn, y0)
                    y1 = fma(h1, cn, y1)
                    y2 = fma(h2, cn, y2)
                    y3 = fma(h3, cn, y3)
            g0 = vload(dout, row)
            g1 = vload(dout, row + VL)
            g2 = vload(dout, row + 2 * VL)
            g3 = vload(dout, row + 3 * VL)
            if has_z:
                z0 = vload(z, row)
                z1 = vload(z, row + VL)
                z2 = vload(z, row + 2 * VL)
                z3 = vload(z, row + 3 * VL)
                sg0 = _vsigmoid(z0)
                sg1 = _vsigmoid(z1)
                sg2 = _vsigmoid(z2)
                sg3 = _vsigmoid(z3)
                _put(dz_o, dz16, dz_prev, row, g0 * fma(D0, u0, y0) * sg0 * (_ONE + z0 * (_ONE - sg0)), acc)
                _put(dz_o, dz16, dz_prev, row + VL, g1 * fma(D1, u1, y1) * sg1 * (_ONE + z1 * (_ONE - sg1)), acc)
                _put(dz_o, dz16, dz_prev, row + 2 * VL,
                     g2 * fma(D2, u2, y2) * sg2 * (_ONE + z2 * (_ONE - sg2)), acc)
                _put(dz_o, dz16, dz_prev, row + 3 * VL,
                     g3 * fma(D3, u3, y3) * sg3 * (_ONE + z3 * (_ONE - sg3)), acc)
                gv0 = g0 * z0 * sg0
                gv1 = g1 * z1 * sg1
                gv2 = g2 * z2 * sg2
                gv3 = g3 * z3 * sg3
            else:
                gv0 = g0
                gv1 = g1
                gv2 = g2
                gv3 = g3
            vstore(Gb, j * BW, gv0)
            vstore(Gb, j * BW + VL, gv1)
            vstore(Gb, j * BW + 2 * VL, gv2)
            vstore(Gb, j * BW + 3 * VL, gv3)
            if need_ddb:
                vacc_f64(dDacc, 0, gv0 * u0)
                vacc_f64(dDacc, VL, gv1 * u1)
                vacc_f64(dDacc, 2 * VL, gv2 * u2)
                vacc_f64(dDacc, 3 * VL, gv3 * u3)
            for ng in range(NG):
                n0 = ng * VL
                n1 = min(N, n0 + VL)
                for n in range(n0, n1):
                    o = hn0 + n * BW
                    p = fma(gv1, vload(Hb, o + VL), gv0 * vload(Hb, o))
                    p = fma(gv2, vload(Hb, o + 2 * VL), p)
                    vstore(P, (n - n0) * VL, fma(gv3, vload(Hb, o + 3 * VL), p))
                if n1 - n0 == VL:   # the models' case, not through _store_sums: see there
                    vstore(dCp, (pbase + t) * N + n0, vhsum16(P, 0))
                else:
                    _store_sums(P, n1 - n0, dCp, (pbase + t) * N + n0, tmp)
        for s in range(s1_ - 1, s0 - 1, -1):
            j = s - s0
            t = L - 1 - s if reverse else s
            row = (bi * L + t) * d + c0
            br = (bi * L + t) * bs + gi * N
            cr = (bi * L + t) * cs + gi * N
            if s >= PF and not stream:   # this walk runs backwards: step s - PF comes PF steps later
                tq = (bi * L + (t + PF if reverse else t - PF)) * d + c0
                _prefetch_out(du_o, tq)
                if not lowr:
                    _prefetch_out(ddl_o, tq)
            u0 = vload(u, row)
            u1 = vload(u, row + VL)
            u2 = vload(u, row + 2 * VL)
            u3 = vload(u, row + 3 * VL)
            dt0 = vload(Tb, j * BW)
            dt1 = vload(Tb, j * BW + VL)
            dt2 = vload(Tb, j * BW + 2 * VL)
            dt3 = vload(Tb, j * BW + 3 * VL)
            gv0 = vload(Gb, j * BW)
            gv1 = vload(Gb, j * BW + VL)
            gv2 = vload(Gb, j * BW + 2 * VL)
            gv3 = vload(Gb, j * BW + 3 * VL)
            dtu0 = dt0 * u0
            dtu1 = dt1 * u1
            dtu2 = dt2 * u2
            dtu3 = dt3 * u3
            hp0 = j * NV
            # The wide loops: two copies of the state loop, with and without dA's sums (a test of
            # need_da inside it cost the full backward ~2%, and a helper numba inlined twice made
            # numba 0.58 compile the backward in 44 s instead of 11.5).
            sa0 = zeros()
            sa1 = zeros()
            sa2 = zeros()
            sa3 = zeros()
            sb0 = zeros()
            sb1 = zeros()
            sb2 = zeros()
            sb3 = zeros()
            if _NARROW:   # one vector at a time; need_da tested inside (a copy without it: 1.04-1.11x frozen)
                for k in range(0, 2 * BW, VL):
                    vstore(S4, k, zeros())
                for ng in range(NG):
                    n0 = ng * VL
                    n1 = min(N, n0 + VL)
                    for k in range(0, BW, VL):
                        gvk = vload(Gb, j * BW + k)
                        dtk = vload(Tb, j * BW + k)
                        dtuk = dtk * vload(u, row + k)
                        sak = vload(S4, k)
                        sbk = vload(S4, BW + k)
                        for n in range(n0, n1):
                            o = n * BW + k
                            dhv = fma(gvk, splat(Cm[np.uint64(cr + n)]), vload(dh, o))
                            ek = vload(Eb, hp0 + o)
                            qk = dhv * vload(Hb, hp0 + o) * ek
                            vstore(dh, o, ek * dhv)
                            sak = fma(dhv, splat(Bm[np.uint64(br + n)]), sak)
                            sbk = fma(qk, vload(Ab, o), sbk)
                            if need_da:
                                vstore(dAc, o, fma(qk, dtk, vload(dAc, o)))
                            # P's vector n: the chain over the four vectors of the wide loop below
                            pn = (n - n0) * VL
                            vstore(P, pn, dhv * dtuk if k == 0 else fma(dhv, dtuk, vload(P, pn)))
                        vstore(S4, k, sak)
                        vstore(S4, BW + k, sbk)
                    if n1 - n0 == VL:   # the models' case, not through _store_sums: see there
                        vstore(dBp, (pbase + t) * N + n0, vhsum16(P, 0))
                    else:
                        _store_sums(P, n1 - n0, dBp, (pbase + t) * N + n0, tmp)
                sa0 = vload(S4, 0)
                sa1 = vload(S4, VL)
                sa2 = vload(S4, 2 * VL)
                sa3 = vload(S4, 3 * VL)
                sb0 = vload(S4, BW)
                sb1 = vload(S4, BW + VL)
                sb2 = vload(S4, BW + 2 * VL)
                sb3 = vload(S4, BW + 3 * VL)
            elif need_da:
                for ng in range(NG):
                    n0 = ng * VL
                    n1 = min(N, n0 + VL)
                    for n in range(n0, n1):
                        o = n * BW
                        cn = splat(Cm[np.uint64(cr + n)])
                        bn = splat(Bm[np.uint64(br + n)])
                        dhv0 = fma(gv0, cn, vload(dh, o))
                        dhv1 = fma(gv1, cn, vload(dh, o + VL))
                        dhv2 = fma(gv2, cn, vload(dh, o + 2 * VL))
                        dhv3 = fma(gv3, cn, vload(dh, o + 3 * VL))
                        e0 = vload(Eb, hp0 + o)
                        e1 = vload(Eb, hp0 + o + VL)
                        e2 = vload(Eb, hp0 + o + 2 * VL)
                        e3 = vload(Eb, hp0 + o + 3 * VL)
                        q0 = dhv0 * vload(Hb, hp0 + o) * e0
                        q1 = dhv1 * vload(Hb, hp0 + o + VL) * e1
                        q2 = dhv2 * vload(Hb, hp0 + o + 2 * VL) * e2
                        q3 = dhv3 * vload(Hb, hp0 + o + 3 * VL) * e3
                        vstore(dh, o, e0 * dhv0)
                        vstore(dh, o + VL, e1 * dhv1)
                        vstore(dh, o + 2 * VL, e2 * dhv2)
                        vstore(dh, o + 3 * VL, e3 * dhv3)
                        sa0 = fma(dhv0, bn, sa0)
                        sa1 = fma(dhv1, bn, sa1)
                        sa2 = fma(dhv2, bn, sa2)
                        sa3 = fma(dhv3, bn, sa3)
                        sb0 = fma(q0, vload(Ab, o), sb0)
                        sb1 = fma(q1, vload(Ab, o + VL), sb1)
                        sb2 = fma(q2, vload(Ab, o + 2 * VL), sb2)
                        sb3 = fma(q3, vload(Ab, o + 3 * VL), sb3)
                        vstore(dAc, o, fma(q0, dt0, vload(dAc, o)))
                        vstore(dAc, o + VL, fma(q1, dt1, vload(dAc, o + VL)))
                        vstore(dAc, o + 2 * VL, fma(q2, dt2, vload(dAc, o + 2 * VL)))
                        vstore(dAc, o + 3 * VL, fma(q3, dt3, vload(dAc, o + 3 * VL)))
                        vstore(P, (n - n0) * VL, fma(dhv3, dtu3, fma(dhv2, dtu2, fma(dhv1, dtu1, dhv0 * dtu0))))
                    if n1 - n0 == VL:   # the models' case, not through _store_sums: see there
                        vstore(dBp, (pbase + t) * N + n0, vhsum16(P, 0))
                    else:
                        _store_sums(P, n1 - n0, dBp, (pbase + t) * N + n0, tmp)
            else:
                for ng in range(NG):
                    n0 = ng * VL
                    n1 = min(N, n0 + VL)
                    for n in range(n0, n1):
                        o = n * BW
                        cn = splat(Cm[np.uint64(cr + n)])
                        bn = splat(Bm[np.uint64(br + n)])
                        dhv0 = fma(gv0, cn, vload(dh, o))
                        dhv1 = fma(gv1, cn, vload(dh, o + VL))
                        dhv2 = fma(gv2, cn, vload(dh, o + 2 * VL))
                        dhv3 = fma(gv3, cn, vload(dh, o + 3 * VL))
                        e0 = vload(Eb, hp0 + o)
                        e1 = vload(Eb, hp0 + o + VL)
                        e2 = vload(Eb, hp0 + o + 2 * VL)
                        e3 = vload(Eb, hp0 + o + 3 * VL)
                        q0 = dhv0 * vload(Hb, hp0 + o) * e0
                        q1 = dhv1 * vload(Hb, hp0 + o + VL) * e1
                        q2 = dhv2 * vload(Hb, hp0 + o + 2 * VL) * e2
                        q3 = dhv3 * vload(Hb, hp0 + o + 3 * VL) * e3
                        vstore(dh, o, e0 * dhv0)
                        vstore(dh, o + VL, e1 * dhv1)
                        vstore(dh, o + 2 * VL, e2 * dhv2)
                        vstore(dh, o + 3 * VL, e3 * dhv3)
                        sa0 = fma(dhv0, bn, sa0)
                        sa1 = fma(dhv1, bn, sa1)
                        sa2 = fma(dhv2, bn, sa2)
                        sa3 = fma(dhv3, bn, sa3)
                        sb0 = fma(q0, vload(Ab, o), sb0)
                        sb1 = fma(q1, vload(Ab, o + VL), sb1)
                        sb2 = fma(q2, vload(Ab, o + 2 * VL), sb2)
                        sb3 = fma(q3, vload(Ab, o + 3 * VL), sb3)
                        vstore(P, (n - n0) * VL, fma(dhv3, dtu3, fma(dhv2, dtu2, fma(dhv1, dtu1, dhv0 * dtu0))))
                    if n1 - n0 == VL:   # the models' case, not through _store_sums: see there
                        vstore(dBp, (pbase + t) * N + n0, vhsum16(P, 0))
                    else:
                        _store_sums(P, n1 - n0, dBp, (pbase + t) * N + n0, tmp)
            _out(du_o, row, stream, fma(gv0, D0, sa0 * dt0))
            _out(du_o, row + VL, stream, fma(gv1, D1, sa1 * dt1))
            _out(du_o, row + 2 * VL, stream, fma(gv2, D2, sa2 * dt2))
            _out(du_o, row + 3 * VL, stream, fma(gv3, D3, sa3 * dt3))
            dd0 = fma(sa0, u0, sb0)
            dd1 = fma(sa1, u1, sb1)
            dd2 = fma(sa2, u2, sb2)
            dd3 = fma(sa3, u3, sb3)
            if softplus and lowr:
                dd0 = dd0 * _vsigmoid(vload(Sb, j * BW))
                dd1 = dd1 * _vsigmoid(vload(Sb, j * BW + VL))
                dd2 = dd2 * _vsigmoid(vload(Sb, j * BW + 2 * VL))
                dd3 = dd3 * _vsigmoid(vload(Sb, j * BW + 3 * VL))
            elif softplus:
                dd0 = dd0 * _vsigmoid(vload(dl, row) + b0)
                dd1 = dd1 * _vsigmoid(vload(dl, row + VL) + b1)
                dd2 = dd2 * _vsigmoid(vload(dl, row + 2 * VL) + b2)
                dd3 = dd3 * _vsigmoid(vload(dl, row + 3 * VL) + b3)
            if keep_db:   # kept for the chunk's products with W (_dlow_rows) and Lm (_dw_rows)
                vstore(Db, j * BW, dd0)
                vstore(Db, j * BW + VL, dd1)
                vstore(Db, j * BW + 2 * VL, dd2)
                vstore(Db, j * BW + 3 * VL, dd3)
            if not lowr:
                _out(ddl_o, row, stream, dd0)
                _out(ddl_o, row + VL, stream, dd1)
                _out(ddl_o, row + 2 * VL, stream, dd2)
                _out(ddl_o, row + 3 * VL, stream, dd3)
            if need_ddb:
                vacc_f64(dbacc, 0, dd0)
                vacc_f64(dbacc, VL, dd1)
                vacc_f64(dbacc, 2 * VL, dd2)
                vacc_f64(dbacc, 3 * VL, dd3)
            if need_da and j % DA_RUN == 0:   # dA: DA_RUN steps in float32, then into float64
                _flush_da(dAacc, dAc, N)
        if lowr and need_dlow:
            _dlow_rows(Db, Wc, Rp, s0, s1_ - s0, L, reverse, dLp, pbase)
        if lowr and need_dw:
            _dw_rows(Db, Lm, ls, bi * L, s0, s1_ - s0, L, reverse, R, dWacc)
    for n in range(N):
        for c in range(BW):
            dAp[(bi * N + n) * d + c0 + c] = dAacc[n * BW + c]
    for c in range(BW):
        dDp[bi * d + c0 + c] = dDacc[c]
        dbp[bi * d + c0 + c] = dbacc[c]
    if lowr and need_dw:
        for r in range(R):
            for c in range(BW):
                dWp[(bi * R + r) * d + c0 + c] = dWacc[r * BW + c]
    restore_fp(fpc)


@njit(parallel=True, cache=True, error_model="numpy")
def _scan_bwd(taddr, thash, u, dl, Lm, ls, Wt, z, Bm, Cm, At, A2t, Dv, bias, has_z, softplus, reverse, K, hs, dout,
              has_dlast, dlast, acc, dz_prev, du_o, ddl_o, dz_o, dz16, dBp, dCp, dLp, dWp, need_dlow, need_dw, dAp,
              dDp, dbp, need_da, need_ddb, fast, dtmax, b, L, d, g, N, bs, cs, stream):
    args = (u, dl, Lm, ls, Wt, z, Bm, Cm, At, A2t, Dv, bias, has_z, softplus, reverse, K, hs, dout, has_dlast,
            dlast, acc, dz_prev, du_o, ddl_o, dz_o, dz16, dBp, dCp, dLp, dWp, need_dlow, need_dw, dAp, dDp, dbp,
            need_da, need_ddb, fast, dtmax, b, L, d, g, N, bs, cs, stream)
    if not _task_sig_is(thash, np.uint64(0), args):
        return False
    for task in prange(b * g * ((d // g) // BW)):
        _call_task(taddr, np.uint64(task), args)
    return True


@njit
def _w_cols(Wb, R, Rp):
    """The block's W (Wb: its R x BW rows of W^T) as BW rows of Rp floats, zero past R."""
    Wc = empty64(BW * Rp)
    for c in range(BW):
        for r in range(Rp):
            Wc[c * Rp + r] = Wb[r * BW + c] if r < R else np.float32(0.0)
    return Wc


@njit   # a call per chunk (not inlined: numba 0.58 compiled the backward 10 s longer with it inlined)
def _dlow_rows(Db, Wc, Rp, s0, m, L, reverse, dLp, pbase):
    """The gradient of the dt_proj input rows of a chunk's m steps, summed over the block's
    channels: dLp row t = sum_c Db[j, c] W[c, :] for step s0 + j, c in order. One product per
    chunk: each channel's row of W is multiplied by eight steps' gradients at once, without the
    lane sums (shuffles) and partial stores a per-step sum over channels needs (the per-step
    form made the Vim-Small backward 11-15% slower, Vim-Tiny's 4-7%)."""
    for rv in range(0, Rp, VL):
        j = 0
        while j + 8 <= m and not _NARROW:
            a0 = zeros()
            a1 = zeros()
            a2 = zeros()
            a3 = zeros()
            a4 = zeros()
            a5 = zeros()
            a6 = zeros()
            a7 = zeros()
            for c in range(BW):
                w = vload(Wc, c * Rp + rv)
                o = j * BW + c
                a0 = fma(splat(Db[o]), w, a0)
                a1 = fma(splat(Db[o + BW]), w, a1)
                a2 = fma(splat(Db[o + 2 * BW]), w, a2)
                a3 = fma(splat(Db[o + 3 * BW]), w, a3)
                a4 = fma(splat(Db[o + 4 * BW]), w, a4)
                a5 = fma(splat(Db[o + 5 * BW]), w, a5)
                a6 = fma(splat(Db[o + 6 * BW]), w, a6)
                a7 = fma(splat(Db[o + 7 * BW]), w, a7)
            t = s0 + j
            step = 1
            if reverse:   # step s is row L - 1 - s
                t = L - 1 - t
                step = -1
            vstore(dLp, (pbase + t) * Rp + rv, a0)
            vstore(dLp, (pbase + t + step) * Rp + rv, a1)
            vstore(dLp, (pbase + t + 2 * step) * Rp + rv, a2)
            vstore(dLp, (pbase + t + 3 * step) * Rp + rv, a3)
            vstore(dLp, (pbase + t + 4 * step) * Rp + rv, a4)
            vstore(dLp, (pbase + t + 5 * step) * Rp + rv, a5)
            vstore(dLp, (pbase + t + 6 * step) * Rp + rv, a6)
            vstore(dLp, (pbase + t + 7 * step) * Rp + rv, a7)
            j += 8
        # four steps at a time: where a vector is two registers (_NARROW), eight accumulators
        # and W's vector would need 18 of the 16 (they spilled); elsewhere a chunk's last 4-7 steps
        while j + 4 <= m:
            a0 = zeros()
            a1 = zeros()
            a2 = zeros()
            a3 = zeros()
            for c in range(BW):
                w = vload(Wc, c * Rp + rv)
                o = j * BW + c
                a0 = fma(splat(Db[o]), w, a0)
                a1 = fma(splat(Db[o + BW]), w, a1)
                a2 = fma(splat(Db[o + 2 * BW]), w, a2)
                a3 = fma(splat(Db[o + 3 * BW]), w, a3)
            t = s0 + j
            step = 1
            if reverse:
                t = L - 1 - t
                step = -1
            vstore(dLp, (pbase + t) * Rp + rv, a0)
            vstore(dLp, (pbase + t + step) * Rp + rv, a1)
            vstore(dLp, (pbase + t + 2 * step) * Rp + rv, a2)
            vstore(dLp, (pbase + t + 3 * step) * Rp + rv, a3)
            j += 4
        for jj in range(j, m):   # the chunk's last steps (L = 197: one)
            a0 = zeros()
            for c in range(BW):
                a0 = fma(splat(Db[jj * BW + c]), vload(Wc, c * Rp + rv), a0)
            t = L - 1 - (s0 + jj) if reverse else s0 + jj
            vstore(dLp, (pbase + t) * Rp + rv, a0)


@njit   # a call per chunk, as _dlow_rows
def _dw_rows(Db, Lm, ls, lbase, s0, m, L, reverse, R, dWacc):
    """dt_proj's weight gradient from a chunk's m steps, into the block's R x BW float64 rows:
    dWacc[r, c] += sum_j Db[j, c] Lm[row of step s0 + j, r], j in order (a float32 sum per chunk).
    dt_proj's backward formed it as a product, d_delta (b*L, d)^T (b*L, R), from a (b, L, d)
    d_delta the kernel wrote for it alone; here the chunk's time-step gradients are still in
    Db, and four ranks at a time keep one vector of Db per step for four products (two vectors
    for eight where the registers are wide: four chains of 4-cycle multiply-adds left half the
    FMA units idle)."""
    for cv in range(0, BW, 2 * VL):
        r0 = 0
        while r0 + 4 <= R and not _NARROW:
            a0 = zeros()
            a1 = zeros()
            a2 = zeros()
            a3 = zeros()
            b0 = zeros()
            b1 = zeros()
            b2 = zeros()
            b3 = zeros()
            for j in range(m):
                t = L - 1 - (s0 + j) if reverse else s0 + j
                lo = (lbase + t) * ls + r0
                dv = vload(Db, j * BW + cv)
                dw = vload(Db, j * BW + cv + VL)
                l0 = splat(Lm[np.uint64(lo)])
                l1 = splat(Lm[np.uint64(lo + 1)])
                l2 = splat(Lm[np.uint64(lo + 2)])
                l3 = splat(Lm[np.uint64(lo + 3)])
                a0 = fma(dv, l0, a0)
                a1 = fma(dv, l1, a1)
                a2 = fma(dv, l2, a2)
                a3 = fma(dv, l3, a3)
                b0 = fma(dw, l0, b0)
                b1 = fma(dw, l1, b1)
                b2 = fma(dw, l2, b2)
                b3 = fma(dw, l3, b3)
            vacc_f64(dWacc, r0 * BW + cv, a0)
            vacc_f64(dWacc, (r0 + 1) * BW + cv, a1)
            vacc_f64(dWacc, (r0 + 2) * BW + cv, a2)
            vacc_f64(dWacc, (r0 + 3) * BW + cv, a3)
            vacc_f64(dWacc, r0 * BW + cv + VL, b0)
            vacc_f64(dWacc, (r0 + 1) * BW + cv + VL, b1)
            vacc_f64(dWacc, (r0 + 2) * BW + cv + VL, b2)
            vacc_f64(dWacc, (r0 + 3) * BW + cv + VL, b3)
            r0 += 4
        if r0 == R:
            continue
        _dw_cols(Db, Lm, ls, lbase, s0, m, L, reverse, R, dWacc, cv, r0)
        _dw_cols(Db, Lm, ls, lbase, s0, m, L, reverse, R, dWacc, cv + VL, r0)


@njit
def _dw_cols(Db, Lm, ls, lbase, s0, m, L, reverse, R, dWacc, cv, r0):
    """_dw_rows for one vector of channels, ranks r0 onwards (the same sums in the same order)."""
    while r0 + 4 <= R:
        a0 = zeros()
        a1 = zeros()
        a2 = zeros()
        a3 = zeros()
        for j in range(m):
            t = L - 1 - (s0 + j) if reverse else s0 + j
            lo = (lbase + t) * ls + r0
            dv = vload(Db, j * BW + cv)
            a0 = fma(dv, splat(Lm[np.uint64(lo)]), a0)
            a1 = fma(dv, splat(Lm[np.uint64(lo + 1)]), a1)
            a2 = fma(dv, splat(Lm[np.uint64(lo + 2)]), a2)
            a3 = fma(dv, splat(Lm[np.uint64(lo + 3)]), a3)
        vacc_f64(dWacc, r0 * BW + cv, a0)
        vacc_f64(dWacc, (r0 + 1) * BW + cv, a1)
        vacc_f64(dWacc, (r0 + 2) * BW + cv, a2)
        vacc_f64(dWacc, (r0 + 3) * BW + cv, a3)
        r0 += 4
    for r in range(r0, R):   # (R not a multiple of 4)
        a0 = zeros()
        for j in range(m):
            t = L - 1 - (s0 + j) if reverse else s0 + j
            a0 = fma(vload(Db, j * BW + cv), splat(Lm[np.uint64((lbase + t) * ls + r)]), a0)
        vacc_f64(dWacc, r * BW + cv, a0)


@njit(inline="always")   # called per step from the backward: see _flush_da
def _store_sums(P, m, out, off, tmp):
    """out[off:off+m] = lane sums of the first m vectors of P (zeroing P's other vectors first).

    _bwd_task stores a full group (m == 16, the models' 16 states) itself and calls this only for a
    partial one: with every call inside its step loop, numba kept a reference-count increment and
    decrement of out and tmp around each (its pruning does not see through the loop's branches),
    out-of-line calls that spill every vector register: the backward ran ~10-20% slower
    (docs/benchmarks.md, twenty-sixth round)."""
    if m == VL:
        vstore(out, off, vhsum16(P, 0))
    else:
        for n in range(m, VL):
            vstore(P, n * VL, zeros())
        vstore(tmp, 0, vhsum16(P, 0))
        for n in range(m):
            out[off + n] = tmp[n]


_TB = 16  # time steps per _sum_blocks task


@njit(parallel=True, cache=True, error_model="numpy")
def _sum_blocks(P, out):
    """out[b, g, t, n] = sum_k P[b, g, k, t, n], summed in float64 (k in order) and rounded once
    to out's dtype (P: the per-channel-block partial sums of dB or dC). A task sums _TB steps.
    out is (b, g, L, N), the layout of the x_proj output B and C are views of, so that autograd's
    concatenation of the projection's gradient copies rows instead of transposing."""
    b, g, nb, L, N = P.shape
    ntb = (L + _TB - 1) // _TB
    for task in prange(b * g * ntb):
        bi = task // (g * ntb)
        gi = (task // ntb) % g
        t0 = (task % ntb) * _TB
        m = min(_TB, L - t0)
        acc = np.zeros((_TB, N), np.float64)
        for k in range(nb):
            for j in range(m):
                for n in range(N):
                    acc[j, n] += np.float64(P[bi, gi, k, t0 + j, n])
        for j in range(m):
            for n in range(N):
                out[bi, gi, t0 + j, n] = acc[j, n]


@njit(parallel=True, cache=True, error_model="numpy")
def _sum_blocks_dbl(PL, PB, PC, out):
    """_sum_blocks of the low-rank delta's, dB's and dC's partial sums (one group) in one
    launch, into the rows of one (b, L, R + 2N) gradient, laid out as the x_proj output the
    three are column ranges of: out[b, t] = (dL[:R], dB, dC) summed over channel blocks, the
    same bits as three _sum_blocks calls (each element summed in float64 over the blocks in
    order, rounded once). BiScanCPU's x_dbl form (see there)."""
    b, _, nb, L, N = PB.shape
    RP = PL.shape[4]   # R padded to whole vectors: rows of whole vectors in every sum below
    R = out.shape[2] - 2 * N
    ntb = (L + _TB - 1) // _TB
    for task in prange(b * ntb):
        bi = task // ntb
        t0 = (task % ntb) * _TB
        m = min(_TB, L - t0)
        # one accumulator per input, each row whole vectors: the sums vectorise (one (_TB, R + 2N)
        # accumulator, its rows 44 wide at Vim-Tiny, took 1.1-1.2x as long; docs/benchmarks.md,
        # thirty-second round). The padding columns of PL are summed and dropped.
        accL = np.zeros((_TB, RP), np.float64)
        accB = np.zeros((_TB, N), np.float64)
        accC = np.zeros((_TB, N), np.float64)
        for k in range(nb):
            for j in range(m):
                for n in range(RP):
                    accL[j, n] += np.float64(PL[bi, 0, k, t0 + j, n])
                for n in range(N):
                    accB[j, n] += np.float64(PB[bi, 0, k, t0 + j, n])
                for n in range(N):
                    accC[j, n] += np.float64(PC[bi, 0, k, t0 + j, n])
        for j in range(m):
            for n in range(R):
                out[bi, t0 + j, n] = accL[j, n]
            for n in range(N):
                out[bi, t0 + j, R + n] = accB[j, n]
            for n in range(N):
                out[bi, t0 + j, R + N + n] = accC[j, n]


@njit(cache=True, error_model="numpy")
def _sum_batch(dAp, dDp, dbp, dg, dgp, dA, dD, db):
    """The per-batch-row float64 sums of dA (b, N, padded d), dD and delta_bias's gradient
    (b, padded d), summed over the batch and rounded once into float32 dA (d, N), dD, db (d,),
    dropping the padding channels."""
    b, N, dp = dAp.shape
    d = dA.shape[0]
    # batch rows outermost, so the reads run along memory (a loop over the batch innermost
    # strided by N * dp: 0.85 against 0.31 ms per call at Vim-Small batch 32); each sum still adds
    # the rows in batch order, so the bits are the same
    accA = np.zeros((N, dp))
    accD = np.zeros(dp)
    accb = np.zeros(dp)
    for bi in range(b):
        for n in range(N):
            for cp in range(dp):
                accA[n, cp] += dAp[bi, n, cp]
        for cp in range(dp):
            accD[cp] += dDp[bi, cp]
            accb[cp] += dbp[bi, cp]
    for c in range(d):
        gi = c // dg
        cp = gi * dgp + c - gi * dg
        for n in range(N):
            dA[c, n] = accA[n, cp]
        dD[c] = accD[cp]
        db[c] = accb[cp]


@njit(cache=True, error_model="numpy")
def _a_tables(A, dg, dgp, softplus, At, A2t, dtmax):
    """A (d, N, float64) -> the kernels' per-channel tables, channel-padded group by group:
    At = A and A2t = A log2(e) (float32, (N, padded d)), and whether the fused-rounding decay
    (_vexp2_neg) may be used, with its per-channel bound on delta, dtmax.

    With softplus, delta >= 0; with every A < 0 the exponent t = delta * A log2 e is <= 0.
    Clamping delta (for the decay factors only) at dtmax_c = 128 / min_n |A2[n, c]| changes no
    factor: beyond it every t of that channel is <= -128, where the factor is 0 either way; with
    max_n |A2| / min_n |A2| <= 2^20 it bounds |t| by 2^27, as _vexp2_neg needs. Anything else
    (no softplus, A >= 0 somewhere, inf/NaN in A) takes the general path. One pass instead of
    a dozen small torch ops per call (~0.2 ms)."""
    d, N = A.shape
    fast = softplus and d * N > 0
    for c in range(d):
        gi = c // dg
        cp = gi * dgp + c - gi * dg
        amin = np.inf
        amax = 0.0
        for n in range(N):
            At[n, cp] = np.float32(A[c, n])
            a2 = np.float32(A[c, n] * _LOG2E_64)
            A2t[n, cp] = a2
            if not (a2 < 0.0 and np.isfinite(a2)):
                fast = False
            m = abs(np.float64(a2))
            amin = min(amin, m)
            amax = max(amax, m)
        if not amax <= _RATIO_MAX * amin:
            fast = False
        dtmax[cp] = np.float32(128.0 / amin) if amin > 0.0 else np.float32(1.0)
    return fast


# ---------------------------------------------------------------------------------------


_THREAD_FNS = []   # numba's own per-thread count and chunk-size functions, once its threads run


def _thread_fns():
    """(get count, set count, set chunk size): the ctypes functions of numba's threading layer,
    which numba's public ``get_num_threads`` / ``set_num_threads`` / ``set_parallel_chunksize``
    call after taking numba's process-wide start-up lock (where processes fork, as on Linux, a
    multiprocessing RLock: two semaphore system calls). Inside a training step, setting the
    count and chunk size around a node and putting the chunk size back took 46-61 us through
    the public functions, 11-18 us through these: 218 times in a Vim-Tiny SVP batch-8 step,
    ~8-10 ms of it (docs/benchmarks.md, thirtieth round). The public functions where numba has
    not these under their names."""
    if not _THREAD_FNS:
        _start_numba_threads()   # (the functions exist from then on)
        from numba.np.ufunc import parallel as p
        fns = tuple(getattr(p, n, None) for n in ("_get_num_threads", "_set_num_threads", "_set_parallel_chunksize"))
        _THREAD_FNS.append(fns if all(callable(f) for f in fns) else _public_thread_fns())
    return _THREAD_FNS[0]


def _public_thread_fns():
    """_thread_fns' three through numba's public functions (a numba without chunk sizes: a setter
    that returns None, i.e. nothing to put back)."""
    return numba.get_num_threads, numba.set_num_threads, getattr(numba, "set_parallel_chunksize", lambda n: None)


def follow_torch_threads():
    """Run the calling thread's kernels on as many threads as torch's operators (at most numba's
    pool): however the user set torch's count (``torch.set_num_threads``, ``OMP_NUM_THREADS``,
    torchrun's one thread per worker, ``svp serve --threads``), the kernels take the same.
    numba's own count is per thread and starts at the whole pool, one thread per core: a serving
    thread or a worker limited to one thread ran its kernels on every core."""
    n = min(torch.get_num_threads(), _POOL)
    get, set_, _ = _thread_fns()
    if get() != n:
        set_(n)


class _dynamic_tasks:
    """Around every kernel launch (the thread count set here holds for the node's later
    launches too). Hands out the (batch, channel-block) tasks one at a time instead of in
    equal static slices: on a shared machine a descheduled thread then delays the call by one
    task, not by its whole slice."""

    def __enter__(self):
        follow_torch_threads()
        self.old = _thread_fns()[2](1)

    def __exit__(self, *exc):
        if self.old is not None:
            _thread_fns()[2](self.old)


def _dynamic_tasks_in(fn):
    """fn (an autograd node's forward or backward) with _dynamic_tasks around all of it: set
    once per node instead of once per kernel call (each set is ~4 µs; two kernels per node). Not
    the scan's backward: its block sums (_sum_blocks, many short tasks) ran ~10% slower with it."""
    def run(*args):
        with _dynamic_tasks():
            return fn(*args)
    return run


def _as_bld(x: torch.Tensor, keep_bf16: bool = False) -> torch.Tensor:
    """(b, d, l) tensor -> float32 (b, l, d) contiguous, a view when memory allows; a bfloat16
    one stays bfloat16 when ``keep_bf16`` (the kernels read it as such: see _flat)."""
    xt = x.detach().transpose(1, 2)
    if xt.dtype != torch.float32 and not (keep_bf16 and xt.dtype == torch.bfloat16):
        return xt.to(torch.float32).contiguous()
    return xt.contiguous()


def _bc_rows(X: torch.Tensor, G: int):
    """B or C ((b, n, l) or (b, g, n, l)) as the kernels read it: a flat float32 tensor F and a
    row stride rs, with element (b, l, group, n) of G groups at F[(b * L + l) * rs + group * N + n].
    The models' B and C are (b, n, l) views of the x_proj output (b, l, R + 2N): read in place
    (rs = R + 2N; a copy cost ~15 µs per call at batch 1, 46 in a batch-8 step). Any other
    layout, dtype or group count is copied to (b, l, G, n)."""
    if G == 1 and X.dim() == 3 and X.dtype == torch.float32:   # the models' case, in fewer tensor calls
        b, N, L = X.shape
        sb, sn, sl = X.stride()
        if sn == 1 and b * L > 0 and (b == 1 or sb == L * sl) and sl >= N:
            return X.detach().as_strided(((b * L - 1) * sl + N,), (1,)), sl
    X = X.detach()
    if X.dim() == 3:
        X = X.unsqueeze(1)
    Xp = X.permute(0, 3, 1, 2)   # (b, l, g, n)
    b, L, g, N = Xp.shape
    sb, sl, sg, sn = Xp.stride()
    if (Xp.dtype == torch.float32 and g == G and b * L > 0 and sn == 1 and (g == 1 or sg == N)
            and (b == 1 or sb == L * sl) and sl >= g * N):
        return Xp.as_strided(((b * L - 1) * sl + g * N,), (1,)), sl
    if g != G:
        Xp = Xp.repeat_interleave(G // g, dim=2)
    return Xp.to(torch.float32).contiguous().reshape(-1), G * N


def _vec(x, d):
    if x is None:
        return torch.zeros(d, dtype=torch.float32)
    if x.dtype == torch.float32 and x.is_contiguous():
        return x.detach()
    return x.detach().to(torch.float32).contiguous()


def _padc(x: torch.Tensor, g: int, dg: int, dgp: int) -> torch.Tensor:
    """Pad the last (channel) dim of ``x`` group by group from g*dg to g*dgp with zeros."""
    if dgp == dg:
        return x
    xs = x.reshape(*x.shape[:-1], g, dg)
    return torch.nn.functional.pad(xs, (0, dgp - dg)).reshape(*x.shape[:-1], g * dgp)


def _unpadc(x: torch.Tensor, g: int, dg: int, dgp: int) -> torch.Tensor:
    if dgp == dg:
        return x
    return x.reshape(*x.shape[:-1], g, dgp)[..., :dg].reshape(*x.shape[:-1], g * dg)


_NO16, _NO32 = torch.empty(0, dtype=torch.bfloat16), torch.empty(0)   # _put's unused outputs


def _no16(z3):
    """_put's a16 when unused: empty, in the kernel type's dtype (bfloat16 for a bfloat16 z)."""
    return _NO16 if z3.dtype == torch.bfloat16 else _NO32


def _flat(x: torch.Tensor):
    """x as the flat numpy array the kernels take; a bfloat16 x as its bits in uint16, which
    svp.ops.simd's vload and vstore read and write as bfloat16 values."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    return x.numpy().reshape(-1)   # (numpy's reshape: ~0.6 µs less per array, ~16 per call)


def _nd(x: torch.Tensor):
    """x as a numpy array of its shape, a bfloat16 x as its uint16 bits (see _flat), for the
    kernels that index (b, l, d) arrays (conv_cpu, prompt_cpu)."""
    return x.numpy() if x.dtype != torch.bfloat16 else _flat(x).reshape(x.shape)


def _tables(A, dg, dgp, softplus):
    """(At, A2t, dtmax, fast) of _a_tables for A, kept on A while its values stay the same
    (svp.ops.kept): a frozen backbone's mixers pass the same A tensor on every call, and forming
    the tables took ~20 µs of a ~300 µs batch-1 scan call. The kernels only read them."""
    def make():
        N, dp = A.shape[1], (A.shape[0] // dg) * dgp
        new = torch.zeros if dgp != dg else torch.empty   # padding channels: A = 0
        At, A2t, dtmax = new(N, dp), new(N, dp), new(dp)
        fast = bool(_a_tables(A.detach().to(torch.float64).contiguous().numpy(), dg, dgp, softplus,
                              At.numpy(), A2t.numpy(), dtmax.numpy()))
        return At, A2t, dtmax, fast
    return kept(A, ("scan_cpu tables", dg, dgp, softplus), make)


def _flat_kept(t: torch.Tensor):
    """_flat of a tensor the kernels take on every call unchanged (the values svp.ops.kept keeps:
    W^T, the tables of A), made once and kept on the tensor: a numpy view takes ~0.7 us, and
    _fwd passes five such tensors."""
    a = getattr(t, "_svp_flat", None)
    if a is None:
        a = t._svp_flat = _flat(t)
    return a


def _np_kept(t: torch.Tensor):
    """t.numpy() (float32), made once and kept on the tensor, as _flat_kept."""
    a = getattr(t, "_svp_np", None)
    if a is None:
        a = t._svp_np = t.numpy()
    return a


def _dbl_rows(x_dbl: torch.Tensor, w: torch.Tensor, A: torch.Tensor):
    """The x_dbl form's (B, row stride, C, row stride, dt_proj's input, row stride) as _bc_rows
    gives each column range's view, read in place from one flat view of x_dbl (b, L, R + 2N)
    float32 with contiguous rows: one tensor call instead of a split, three transposes and three
    _bc_rows (3.9 against 11.8 us a direction, timed in a loop); None for any other layout
    (_dbl_views then)."""
    if x_dbl.dtype != torch.float32 or x_dbl.dim() != 3:
        return None
    b, L, W = x_dbl.shape
    sb, sl, sc = x_dbl.stride()
    R, N = w.shape[1], A.shape[1]
    if sc != 1 or b * L == 0 or not (b == 1 or sb == L * sl) or sl < W or W != R + 2 * N:
        return None
    flat = x_dbl.detach().as_strided(((b * L - 1) * sl + W,), (1,))
    return flat[R:], sl, flat[R + N:], sl, flat, sl


def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, chunk, acc=None, out_dtype=torch.float32,
         z_bf16=False, dt_w=None, rows=None, keep=True):
    """One direction's forward. Returns (out, last, state): out the padded (b, L, dp) output
    (``acc``'s buffer, added to, when given: see _put), state what _bwd needs (None without
    ``keep``). With ``z_bf16`` a bfloat16 z is read as it is (else cast to float32 first), and with
    ``out_dtype`` bfloat16 the output (the sum with ``acc``, when given, float32) is written in
    bfloat16: the bits of casting the float32 output. With ``dt_w`` (d, R), ``delta`` is dt_proj's
    input (b, R, L) and the time steps are ``dt_w @ delta``, formed in the kernels (see
    BiScanCPU); with ``rows`` (_dbl_rows) too, ``delta`` is the whole x_dbl (B and C None) and
    ``rows`` its column ranges as the kernels read them. All four for BiScanCPU only."""
    b, d, L = u.shape
    N = A.shape[1]
    if rows is None:
        gB, gC, G = scan_groups(B, C, d)
        (Bm, bs), (Cm, cs) = _bc_rows(B, G), _bc_rows(C, G)
    else:
        gB = gC = G = 1
        Bm, bs, Cm, cs, Lm, ls = rows
    dg = d // G
    dgp = -(-dg // BW) * BW
    dp = G * dgp
    pad = lambda x: _padc(x, G, dg, dgp)  # noqa: E731
    u3 = pad(_as_bld(u))
    if dt_w is None:
        dl3, Lm, ls, Wt = pad(_as_bld(delta)), _NO32, 0, _NO32
    else:   # no (b, L, d) time steps: the kernels read delta's rows and W^T
        # W^T kept on a frozen dt_proj weight (svp.ops.kept): transposing it took ~47 µs a call at
        # Vim-Small's (768, 24), 2% of a batch-1 forward's py-spy samples; the node 0.95x its time at
        # batch 1 (docs/benchmarks.md, thirty-eighth round)
        if rows is None:
            Lm, ls = _bc_rows(delta, 1)
        Wt = kept(dt_w, ("scan_cpu dt_w^T", G, dg, dgp),
                  lambda: pad(dt_w.detach().to(torch.float32).t()).contiguous())
        dl3 = u3   # (a placeholder the kernels do not read)
    has_z = z is not None
    z3 = pad(_as_bld(z, keep_bf16=z_bf16)) if has_z else u3
    At, A2t, dtmax, fast = _tables(A, dg, dgp, bool(softplus))
    Dv, bias = pad(_vec(D, d)), pad(_vec(delta_bias, d))
    K = int(chunk)
    nchunk = (L + K - 1) // K
    if acc is not None and out_dtype == torch.float32:
        out = acc
    else:
        out = torch.empty(b, L, dp, dtype=out_dtype)
    o32, o16 = (out, _no16(z3)) if out.dtype == torch.float32 else (_NO32 if acc is None else acc, out)
    hs = torch.empty(b, nchunk, N, dp, dtype=torch.float32)
    hlast = torch.empty(b, N, dp, dtype=torch.float32)
    f = _flat
    fo32 = f(o32)
    run_tasks(_scan_fwd, _fwd_task, types.uint64, f(u3), f(dl3), f(Lm), ls, _np_kept(Wt), f(z3), f(Bm), f(Cm),
              _flat_kept(A2t), f(Dv), f(bias), has_z, bool(softplus),
              bool(reverse), K, acc is not None, fo32, fo32, f(o16), f(hs), f(hlast), fast, _flat_kept(dtmax), b, L,
              dp, G, N, bs, cs, _streamable(hs))
    if not keep:
        return out, None, None
    Bd, Cd = (B, C) if rows is None else (delta, delta)
    state = ((u3, dl3, z3, Bm, Cm, At, A2t, Dv, bias, hs, dtmax, Lm, Wt),
             (has_z, bool(softplus), bool(reverse), K, (gB, gC), D is not None, delta_bias is not None,
              (Bd.dim() == 4, Cd.dim() == 4), (dg, dgp), fast, (G, N, bs, cs), ls),
             tuple(None if x is None else x.dtype for x in (u, delta, A, Bd, Cd, D, z, delta_bias, dt_w)))
    return out, _unpadc(hlast, G, dg, dgp).transpose(1, 2), state


def _streamable(*ts):
    """Whether a kernel may write these outputs with streaming stores (simd.vstream): their
    first element is on a 64-byte boundary (torch's CPU allocations are), so every 16-channel
    vector is (rows are whole 64-channel blocks). Streamed: the forward's chunk states hs
    (read by the backward only), and the backward's input gradients du and d_delta (read by
    the layers below only after the rest of this backward has passed through the caches).
    Written through the caches, each of their lines was first read from memory (2-5% of the
    scan's forward + backward, docs/benchmarks.md, fourteenth round). Not the output or z's
    gradient: the second direction of a bidirectional mixer adds to them right away."""
    return all(t.data_ptr() % 64 == 0 for t in ts)


def _bwd(saved, cfg, dtypes, need, dout, dlast, acc=None, dz_dtype=None, dbl=False):
    """One direction's backward: the gradients of (u, delta, A, B, C, D, z, delta_bias, dt_w).
    dout (b, L, dp) float32 or bfloat16, padded, or None; ``acc``: a padded float32 z gradient
    to add this one to. The z gradient comes in ``dz_dtype`` (default: z's), written in it by
    the kernel when that is bfloat16 and ``acc`` is given (BiScanCPU's second direction). With
    a dt_w (_fwd), delta's gradient is that of dt_proj's input (b, R, L), formed in the kernel
    per chunk and channel block (_dlow_rows) and summed over the blocks like dB, and dt_w's is
    formed in the kernel too, per task (_dw_rows), and added over the batch rows here. With
    ``dbl`` (a dt_w, one group, need[1]: BiScanCPU's x_dbl form), delta's gradient is that of the
    whole x_proj output (b, L, R + 2N), dt_proj's input, B and C in one tensor, and B's and C's
    are None."""
    u3, dl3, z3, Bm, Cm, At, A2t, Dv, bias, hs, dtmax, Lm, Wt = saved
    has_z, softplus, reverse, K, (gB, gC), has_D, has_bias, (b4, c4), (dg, dgp), fast, (g, N, bs, cs), ls = cfg
    lowr = Wt.dim() == 2
    need_w = lowr and len(need) > 8 and bool(need[8])
    b, L, dp = u3.shape
    pad = lambda x: _padc(x, g, dg, dgp)  # noqa: E731
    unpad = lambda x: _unpadc(x, g, dg, dgp)  # noqa: E731
    nbg = dgp // BW
    g3 = torch.zeros(b, L, dp, dtype=torch.float32) if dout is None else dout
    has_dlast = dlast is not None
    dl_ = pad(dlast.detach().transpose(1, 2).to(torch.float32)).contiguous() if has_dlast else hs
    du = torch.empty(b, L, dp, dtype=torch.float32)
    dd = du if lowr else torch.empty(b, L, dp, dtype=torch.float32)   # (lowr: d_delta is never written)
    dt_u, dt_delta, dt_A, dt_B, dt_C, dt_D, dt_z, dt_bias, dt_w = dtypes
    dt_z = dt_z if dz_dtype is None else dz_dtype
    dz16 = has_z and acc is not None and dt_z == torch.bfloat16
    if not has_z:
        dz = du
    elif acc is not None and not dz16:
        dz = acc
    else:
        dz = torch.empty(b, L, dp, dtype=torch.bfloat16 if dz16 else torch.float32)
    dz32, dz16_ = (acc, dz) if dz16 else (dz, _no16(z3))
    dBp = torch.empty(b, g, nbg, L, N, dtype=torch.float32)
    dCp = torch.empty(b, g, nbg, L, N, dtype=torch.float32)
    R = Wt.shape[0] if lowr else 0
    need_low = lowr and bool(need[1])
    # (rows of R padded to whole vectors: the kernel stores them as such; bc() cuts them)
    dLp = torch.empty(b, g, nbg, L, -(-R // VL) * VL, dtype=torch.float32) if need_low else dCp
    # A frozen backbone (every method but full fine-tuning) needs no dA, dD or d_delta_bias:
    # the kernel then skips dA's load, multiply-add and store per state and the per-step sums.
    need_da = bool(need[2])
    need_ddb = bool((has_D and need[5]) or (has_bias and need[7]))
    dAp = torch.empty(b, N, dp, dtype=torch.float64)
    dDp = torch.empty(b, dp, dtype=torch.float64)
    dbp = torch.empty(b, dp, dtype=torch.float64)
    dWp = torch.empty(b, R, dp, dtype=torch.float64) if need_w else dbp   # dt_w's, per batch row
    f = _flat
    with _dynamic_tasks():   # (not around the block sums below: their many short tasks ran 10% slower)
        run_tasks(_scan_bwd, _bwd_task, types.uint64, f(u3), f(dl3), f(Lm), ls, Wt.numpy(), f(z3), f(Bm), f(Cm),
                  f(At), f(A2t), f(Dv), f(bias), has_z, softplus, reverse, K, f(hs), f(g3), has_dlast, f(dl_),
                  acc is not None and has_z, f(dz32), f(du), f(dd), f(dz32), f(dz16_), f(dBp), f(dCp), f(dLp),
                  f(dWp), need_low, need_w, f(dAp), f(dDp), f(dbp), need_da, need_ddb, fast, f(dtmax), b, L, dp, g, N,
                  bs, cs, _streamable(du, dd))

    def bc(P, gX, is4, dtype):   # (also the low-rank delta's, n = R)
        n = P.shape[-1]
        shape = (b, gX, n, L) if is4 else (b, n, L)
        if gX == g and dtype == torch.float32:   # the models' case: straight into the result
            o = torch.empty(b, g, L, n, dtype=torch.float32)
            _sum_blocks(P.numpy(), o.numpy())
            o = o.transpose(2, 3)   # (b, g, n, L) with (b, L, n) rows, as B and C are laid out
            return o if is4 else o[:, 0]
        o = torch.empty(b, g, L, n, dtype=torch.float64)
        _sum_blocks(P.numpy(), o.numpy())
        return sum_to_groups(o.transpose(2, 3), shape, dtype)

    d = g * dg
    dA, dD, db = torch.empty(d, N), torch.empty(d), torch.empty(d)
    if need_da or need_ddb:
        _sum_batch(dAp.numpy(), dDp.numpy(), dbp.numpy(), dg, dgp, dA.numpy(), dD.numpy(), db.numpy())
    if dbl:
        ddelta = torch.empty(b, L, R + 2 * N, dtype=torch.float32)
        _sum_blocks_dbl(dLp.numpy(), dBp.numpy(), dCp.numpy(), ddelta.numpy())
        need = (*need[:3], False, False, *need[5:])
    if lowr:
        if not dbl:
            ddelta = bc(dLp, 1, False, dt_delta)[:, :R] if need_low else None
        # dt_w's gradient, sum over (b, l) of d_delta[c] * low[r]: the kernel's per-row sums
        # (_dw_rows), added over the batch rows in order (the same bits at any thread count)
        dw = None
        if need_w:
            dw = dWp[0].clone()
            for i in range(1, b):
                dw += dWp[i]
            dw = unpad(dw).to(dt_w).t().contiguous()   # (d, R), laid out as dt_proj's weight
    else:
        ddelta = unpad(dd).transpose(1, 2).to(dt_delta) if need[1] else None
        dw = None
    return (unpad(du).transpose(1, 2).to(dt_u) if need[0] else None,
            ddelta,
            dA.to(dt_A) if need[2] else None,
            bc(dBp, gB, b4, dt_B) if need[3] else None,
            bc(dCp, gC, c4, dt_C) if need[4] else None,
            dD.to(dt_D) if (has_D and need[5]) else None,
            unpad(dz).transpose(1, 2).to(dt_z) if (has_z and need[6]) else None,
            db.to(dt_bias) if (has_bias and need[7]) else None,
            dw)


def _layout(saved, cfg):
    """(groups, channels per group, padded channels per group) of a _fwd state."""
    dg, dgp = cfg[8]
    return cfg[10][0], dg, dgp


def _dout3(dout, saved, cfg, keep_bf16=False):
    """The output gradient (b, d, L) as the kernels read it: float32 (b, L, padded d), or a
    bfloat16 one as it is when ``keep_bf16``."""
    return None if dout is None else _padc(_as_bld(dout, keep_bf16), *_layout(saved, cfg)).contiguous()


class SelectiveScanCPU(torch.autograd.Function):
    # The kernels take channel blocks of BW per group. Other channel counts are padded with
    # zero channels (A = 0, u = 0, D = 0: their state stays 0 and adds nothing to the sums
    # over channels) and cut off again; the Vim models' widths need no padding.
    @staticmethod
    @_dynamic_tasks_in
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk):
        out, last, state = _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk)
        ctx.save_for_backward(*state[0])
        ctx.cfg, ctx.dtypes = state[1], state[2]
        # An output nobody uses (the last state, in the models) gets None in backward rather
        # than a zero tensor autograd fills and the kernel reads.
        ctx.set_materialize_grads(False)
        out = _unpadc(out, *_layout(state[0], state[1])).transpose(1, 2)
        return (out if u.dtype == torch.float32 else out.to(u.dtype)), last

    @staticmethod
    def backward(ctx, dout, dlast):
        saved = ctx.saved_tensors
        grads = _bwd(saved, ctx.cfg, ctx.dtypes, ctx.needs_input_grad, _dout3(dout, saved, ctx.cfg), dlast)
        return (*grads[:8], None, None, None)


class BiScanCPU(torch.autograd.Function):
    """Both directions of a bidirectional (Vim) mixer, summed: scan(forward inputs) +
    scan(backward inputs, reverse=True), sharing z. The second kernel adds its output to the
    first's, and in backward its z gradient to the first's, so the two sums PyTorch would form
    in separate passes over (b, L, d) (y + y_b, and autograd's dz + dz_b) are not formed; bit
    for bit the same values. Inputs: z, then (u, delta, A, B, C, D, delta_bias, dt_w) per
    direction.

    With a dt_w (dt_proj's weight, (d, R)), delta is dt_proj's input, (b, R, L) (the first R
    columns of the x_proj output, read in place like B and C), and the kernels form the time
    steps dt_w @ delta themselves, 4R multiply-adds per step and block of 64 channels: the
    (b, L, d) time steps are never written or read, forward or backward (the product that
    formed them, and the one that formed their input's gradient, ran at memory speed on such a
    tensor, ~0.3 ms each per direction and layer in a Vim-Tiny batch-8 step). Its bits differ
    from dt_proj's product only by the order of the R-term sums.

    A bfloat16 z (the mixer's in_proj under CPU autocast, train.amp) is read as it is, and the
    output is then bfloat16 too, as are the output gradient read and the z gradient written
    backward: the bits of casting z to float32, running this, and casting the output to
    bfloat16 (what out_proj's autocast did), each cast a pass over (b, L, d) less.

    The x_dbl form (B and C None, a dt_w, delta the whole x_proj output (b, L, R + 2N): dt_proj's
    input, B and C as its column ranges) takes the x_proj output as one input and gives its
    gradient as one tensor, written by one kernel (_sum_blocks_dbl): the same values as the
    three column views' gradients, without autograd's split backward concatenating them (a
    copy per direction and layer) or two of the three block-sum launches."""

    @staticmethod
    @_dynamic_tasks_in
    def forward(ctx, z, u, delta, A, B, C, D, bias, w, u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, w_b):
        ctx.dbl = B is None
        y, sf, sb = _bi_fwd(z, (u, delta, A, B, C, D, bias, w), (u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, w_b))
        ctx.save_for_backward(*sf[0], *sb[0])
        ctx.cfg, ctx.dtypes, ctx.n = (sf[1], sb[1]), (sf[2], sb[2]), len(sf[0])
        return y

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        sf, sb = saved[:ctx.n], saved[ctx.n:]
        nf, nb = ctx.needs_input_grad[1:9], ctx.needs_input_grad[9:17]
        g3 = _dout3(dout, sf, ctx.cfg[0], keep_bf16=True)
        need_z = ctx.needs_input_grad[0]
        # (u, delta, A, B, C, D, z, bias, w) order for _bwd; the second call's kernel adds its z
        # gradient to the first's (padded again: a view of the first's buffer when unpadded),
        # float32 until that sum
        dbl_f, dbl_b = ctx.dbl and nf[1], ctx.dbl and nb[1]
        gf = _bwd(sf, ctx.cfg[0], ctx.dtypes[0], (*nf[:6], need_z, *nf[6:]), g3, None, dz_dtype=torch.float32,
                  dbl=dbl_f)
        acc = _padc(gf[6].transpose(1, 2), *_layout(sf, ctx.cfg[0])).contiguous() if need_z else None
        gb = _bwd(sb, ctx.cfg[1], ctx.dtypes[1], (*nb[:6], need_z, *nb[6:]), g3, None, acc=acc, dbl=dbl_b)
        return (gb[6], *gf[:6], *gf[7:], *gb[:6], *gb[7:])


def _bi_fwd(z, fwd, bwd, keep=True):
    """BiScanCPU's forward: (y (b, d, L), the forward direction's _fwd state, the backward's;
    None without ``keep``). fwd, bwd: (u, delta, A, B, C, D, delta_bias, dt_w), B and C None in
    the x_dbl form."""
    (u, delta, A, B, C, D, bias, w), (u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, w_b) = fwd, bwd
    rows = rows_b = None
    if B is None:
        rows, rows_b = _dbl_rows(delta, w, A), _dbl_rows(delta_b, w_b, A_b)
        if rows is None or rows_b is None:
            rows = rows_b = None
            (delta, B, C), (delta_b, B_b, C_b) = _dbl_views(delta, w, A), _dbl_views(delta_b, w_b, A_b)
    out, _, sf = _fwd(u, delta, A, B, C, D, z, bias, True, False, CHUNK, z_bf16=True, dt_w=w, rows=rows, keep=keep)
    out, _, sb = _fwd(u_b, delta_b, A_b, B_b, C_b, D_b, z, bias_b, True, True, CHUNK, acc=out, out_dtype=z.dtype,
                      z_bf16=True, dt_w=w_b, rows=rows_b, keep=keep)
    d = u.shape[1]
    if out.shape[-1] != d:   # channels padded to whole blocks (_padc)
        G = 1 if rows is not None else scan_groups(B, C, d)[2]
        out = _unpadc(out, G, d // G, out.shape[-1] // G)
    return out.transpose(1, 2), sf, sb


def bidirectional_scan(z, fwd, bwd):
    """bidirectional_scan_cpu on arguments already checked, both 8-tuples (the Vim mixer forms
    them, svp.models.vim.BiMambaMixer._both_directions_fused): an autograd node where a
    gradient is recorded, else the forward alone (the checks of 17 tensors took 9.5 us and a node
    ~2 us, timed in a loop; more in a forward)."""
    if torch.is_grad_enabled():
        return BiScanCPU.apply(z, *fwd, *bwd)
    with _dynamic_tasks():
        return _bi_fwd(z, fwd, bwd, keep=False)[0]


def _dbl_views(x_dbl, w, A):
    """(delta, B, C) of the x_dbl form (see BiScanCPU): dt_proj's input (b, R, L), B and C
    (b, N, L), views of the x_proj output's column ranges, as the models pass them."""
    R, N = w.shape[1], A.shape[1]
    return tuple(t.transpose(1, 2) for t in x_dbl.split([R, N, N], dim=-1))


class _Shape:
    """What check_scan_args reads of a tensor: its shape and rank."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)

    def dim(self) -> int:
        return len(self.shape)


def bidirectional_scan_cpu(z, fwd, bwd):
    """``selective_scan_cpu(*fwd, z=z) + selective_scan_cpu(*bwd, z=z, reverse=True)`` with
    delta_softplus, in one autograd node (see BiScanCPU). fwd, bwd: (u, delta, A, B, C, D,
    delta_bias) or (u, delta, A, B, C, D, delta_bias, dt_w), float32 CPU tensors laid out as for
    selective_scan_cpu, with a dt_w (d, R) meaning that delta is (b, R, L) and the time steps
    are dt_w @ delta; z float32 or bfloat16 (then so is the result); returns (b, d, L).

    Or both (u, x_dbl, A, None, None, D, delta_bias, dt_w): BiScanCPU's x_dbl form, x_dbl the
    x_proj output (b, L, R + 2N) whose column ranges are dt_proj's input, B and C (as the Vim
    mixer splits it), its gradient one tensor."""
    fwd, bwd = (tuple(s) + (None,) * (8 - len(s)) for s in (fwd, bwd))
    for t in (z, *fwd, *bwd):
        ok = (torch.float32, torch.bfloat16) if t is z else (torch.float32,)
        if t is not None and (t.device.type != "cpu" or t.dtype not in ok):
            raise ValueError(f"bidirectional_scan_cpu needs float32 CPU tensors (z: float32 or bfloat16); "
                             f"got {t.dtype} on {t.device}")
    forms = {s[3] is None and s[4] is None for s in (fwd, bwd)}
    if len(forms) > 1:
        raise ValueError("bidirectional_scan_cpu: fwd and bwd must both pass B and C, or both the x_dbl form")
    for name, (u, delta, A, B, C, D, bias, w) in (("fwd", fwd), ("bwd", bwd)):
        if u.dim() != 3 or A.dim() != 2:
            raise ValueError(f"bidirectional_scan_cpu: {name}'s u must be (b, d, L) and A (d, N); got u "
                             f"{tuple(u.shape)}, A {tuple(A.shape)}")
        if B is None and C is None:   # the x_dbl form
            want = None if w is None or w.dim() != 2 else (u.shape[0], u.shape[2], w.shape[1] + 2 * A.shape[1])
            if want is None or tuple(delta.shape) != want or w.shape[0] != u.shape[1]:
                raise ValueError(f"bidirectional_scan_cpu: {name}'s x_dbl form (B and C None) needs a dt_w (d, R) "
                                 f"and an x_dbl (b, L, R + 2N) for u {tuple(u.shape)} and A {tuple(A.shape)}; got "
                                 f"x_dbl {tuple(delta.shape)}, dt_w {None if w is None else tuple(w.shape)}")
            # B and C are column ranges of x_dbl, of the right shape by the check above (a shape
            # alone: an expanded tensor cost ~4 us a direction, more than the check)
            B = C = _Shape((u.shape[0], A.shape[1], u.shape[2]))
        elif w is not None and (w.dim() != 2 or delta.dim() != 3 or tuple(w.shape) != (u.shape[1], delta.shape[1])
                                or (delta.shape[0], delta.shape[2]) != (u.shape[0], u.shape[2])):
            raise ValueError(f"bidirectional_scan_cpu: {name}'s dt_w {tuple(w.shape)} must be (d, R) for u "
                             f"{tuple(u.shape)} and a (b, R, L) delta, got delta {tuple(delta.shape)}")
        try:   # with a dt_w, delta (b, R, L) or x_dbl was checked above
            check_scan_args(u, u if w is not None else delta, A, B, C, D, z, bias)
        except ValueError as e:
            raise ValueError(f"bidirectional_scan_cpu: {name}: {e}") from None
    return bidirectional_scan(z, fwd, bwd)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, reverse=False, chunk=CHUNK):
    """Fused CPU selective scan. Same arguments as ``selective_scan_ref`` plus ``reverse``
    (scan from the last position to the first; outputs stay in the original order)."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if x is not None and x.device.type != "cpu":
            raise ValueError(f"the 'cpu' scan backend needs CPU tensors; {name} is on {x.device}")
        if x is not None and x.is_complex():
            raise ValueError("the 'cpu' scan backend supports real tensors only")
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"selective_scan_cpu: chunk must be a positive number of steps; got {chunk!r}")
    if u.dtype == torch.float64:
        warnings.warn("the 'cpu' scan backend computes in float32: float64 inputs get float32 accuracy (their "
                      "outputs and gradients come back as float64); the 'torch' and 'reference' backends compute "
                      "float64 in float64 (svp.ops.set_backend / scan_with)", stacklevel=2)
    if u.shape[1] == 0:
        # no channel: nothing to scan (the kernels' channel groups divided by zero, where the other
        # backends return empty results: review); the torch form gives the same empty outputs, with
        # autograd's graph to them
        from .scan_torch import selective_scan_torch
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    out, last = SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk)
    # the last state in the reference's dtype (float32 for half inputs, float64 for float64)
    return (out, last.to(torch.promote_types(u.dtype, torch.float32))) if return_last_state else out


guard_caches(globals())   # see drop_stale_caches (numba cannot see what they inline from other files) and _flocked
