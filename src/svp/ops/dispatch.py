"""Backend selection for the selective scan.

Backends (all with the semantics of :func:`svp.ops.scan_ref.selective_scan_ref` plus
``reverse``):

``reference``  the literal PyTorch loop (slow; the definition everything is tested against)
``cpu``        fused numba kernels (:mod:`svp.ops.scan_cpu`); CPU tensors only
``torch``      chunked pure-PyTorch path with a hand-written backward; any device
``triton``     Triton kernels (:mod:`svp.ops.scan_triton`); CUDA tensors, or CPU tensors
               through Triton's interpreter when ``TRITON_INTERPRET=1``
``cuda``       mamba_ssm's ``selective_scan_fn`` (when it imports); CUDA tensors only

Choice: ``set_backend(name)`` (Python) overrides ``SVP_SCAN_BACKEND`` (environment), which
overrides the automatic choice: ``cpu`` for CPU tensors when numba works; for CUDA
tensors ``cuda`` when mamba_ssm works, else ``triton`` when Triton works, else ``torch``.
A forced backend that cannot run on the inputs' device raises
:class:`svp.errors.BackendError`; there is no silent fallback. The choice is logged once
per (device type, backend).

The contract every backend meets is ``fn(u, delta, A, B, C, D, z, delta_bias,
delta_softplus, return_last_state, reverse)``. ``reverse`` is done here, once, by flipping
the time axis for the backends that cannot index time backwards themselves (``reference``,
``torch``, ``cuda``); ``cpu`` and ``triton`` do it natively without copies.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os

import torch

from ..compat import recording
from ..errors import BackendError
from .scan_ref import selective_scan_ref

log = logging.getLogger("svp.ops.scan")

NAMES = ("reference", "cpu", "torch", "triton", "cuda")
# which device types each backend runs on (None: any); triton: see _devices
_DEVICES = {"reference": None, "torch": None, "cpu": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",)}
# the backends made of PyTorch operators alone, which torch.jit.trace and torch.export can record
_RECORDABLE = ("torch", "reference")
_MODULES = {"cpu": ("svp.ops.scan_cpu", "selective_scan_cpu"),
            "torch": ("svp.ops.scan_torch", "selective_scan_torch"),
            "triton": ("svp.ops.scan_triton", "selective_scan_triton"),
            "cuda": ("svp.ops.scan_cuda", "selective_scan_cuda")}
NATIVE_REVERSE = ("cpu", "triton")
_CONTRACT = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state", "reverse")


def _time_reversed(fn):
    """``fn`` with the backend contract's ``reverse``, for a backend that only scans forward:
    the one place where time is flipped."""
    def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
             return_last_state=False, reverse=False, **kw):
        if not reverse:
            return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **kw)
        fl = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        res = fn(fl(u), fl(delta), A, fl(B), fl(C), D, fl(z), delta_bias, delta_softplus, return_last_state, **kw)
        return (res[0].flip(-1), res[1]) if return_last_state else res.flip(-1)
    scan.__wrapped__ = fn
    return scan


_loaded: dict = {"reference": _time_reversed(selective_scan_ref)}
_errors: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _devices(name):
    if name == "triton" and _interpreting():
        return None
    return _DEVICES[name]


def _require_triton3() -> None:
    """The kernels are written for Triton 3 (the interpreter under triton.runtime, triton.backends);
    torch < 2.4 ships Triton 2, where the backend is unavailable rather than failing mid-scan."""
    import triton
    if int(triton.__version__.split(".")[0]) < 3:
        raise ImportError(f"triton {triton.__version__} is too old for the triton backend "
                          f"(needs Triton >= 3.0, which torch >= 2.4 ships)")


def _triton_missing() -> str | None:
    """Why Triton cannot run here (no GPU and no interpreter), or None."""
    import torch
    if torch.cuda.is_available() or _interpreting():
        return None
    return "no CUDA GPU found (set TRITON_INTERPRET=1 to run the triton backend on CPU tensors)"
_forced: str | None = None
_logged: set = set()


def _load(name: str):
    """The backend's function, or None when it cannot be imported here (reason in _errors)."""
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    modname, fn = _MODULES[name]
    try:
        if name == "triton":
            _require_triton3()
        mod = importlib.import_module(modname)
        if name == "cuda" and not mod.available():
            raise ImportError(mod.unavailable_reason())
        f = getattr(mod, fn)
        _loaded[name] = f if name in NATIVE_REVERSE else _time_reversed(f)
    except ImportError as e:  # numba / triton / mamba_ssm missing: backend unavailable
        missing = isinstance(e, ModuleNotFoundError)
        _errors[name] = (f"Triton is not installed ({e})" if name == "triton" and missing and "triton" in str(e)
                         else f"numba is not installed ({e}); `pip install numba` gives svp's fused CPU kernels"
                         if name == "cpu" and missing and (getattr(e, "name", None) in ("numba", "llvmlite")
                                                           or "numba" in str(e))
                         else f"{type(e).__name__}: {e}")
        return None
    except (Exception, SystemExit) as e:  # a broken install (one module's import even exits): unavailable
        _errors[name] = f"{type(e).__name__}: {e}"
        if "no locator available" in str(e):   # numba found no writable folder for its cache
            _errors[name] += "; set NUMBA_CACHE_DIR to a writable folder"
        return None
    return _loaded[name]


def _unavailable(name: str) -> str | None:
    """Why ``name`` cannot run on this machine now, or None."""
    if _load(name) is None:
        return _errors.get(name, "?")
    if name == "triton":
        return _triton_missing()
    return None


def available_backends():
    """Backends that can run on this machine (importing their dependencies on first call)."""
    return [n for n in NAMES if _unavailable(n) is None]


def unavailable_backends() -> dict:
    """{name: reason} for the backends that cannot run here."""
    return {n: r for n in NAMES if (r := _unavailable(n)) is not None}


def _check_name(name: str, source: str):
    if name not in NAMES:
        raise BackendError(f"unknown scan backend {name!r} ({source}); choose one of {list(NAMES)}")
    why = _unavailable(name)
    if why is not None:
        raise BackendError(f"scan backend {name!r} ({source}) is not available here: {why}")


def set_backend(name: str | None):
    """Force a backend for every call (``None``: back to ``SVP_SCAN_BACKEND`` / automatic)."""
    global _forced
    if name is not None:
        _check_name(name, "set_backend")
    _forced = name


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


def get_backend(device=None) -> str:
    """The backend a call on tensors of ``device`` uses (raises if a forced one cannot run there)."""
    dev = _device_type(device)
    if _forced is not None:
        name, source = _forced, "set_backend"
    elif os.environ.get("SVP_SCAN_BACKEND"):
        name, source = os.environ["SVP_SCAN_BACKEND"].strip(), "SVP_SCAN_BACKEND"
    else:
        name, source = None, "auto"
    if recording() and name not in _RECORDABLE:
        # what torch.jit.trace / torch.export record must be PyTorch operators: the pure-PyTorch
        # scan, and with it every fused kernel around it (they follow this choice)
        if name is not None:
            _check_name(name, source)
            raise BackendError(f"scan backend {name!r} (forced by {source}) cannot be recorded by torch.jit.trace "
                               f"or torch.export: its kernels run outside PyTorch's operators; unset it (a "
                               f"recording then runs a pure-PyTorch scan) or force one of "
                               f"{list(_RECORDABLE)}")
        # torch.export records through the 'torch' scan's autograd Function; a jit trace keeps it
        # as a Python call (prim::PythonOp) that torch.jit.save cannot write: 'reference', plain
        # operators (a traced graph unrolls the time loop either way)
        name = "reference" if torch.jit.is_tracing() else "torch"
        source = "auto, while torch.jit.trace or torch.export records"
        _load(name)
    elif name is not None:
        _check_name(name, source)
        ok = _devices(name)
        if ok is not None and dev not in ok:
            hint = " (TRITON_INTERPRET=1 runs it on CPU tensors)" if name == "triton" else ""
            raise BackendError(f"scan backend {name!r} (forced by {source}) cannot run on {dev} tensors{hint}; "
                               f"unset it or choose one of "
                               f"{[n for n in available_backends() if _devices(n) is None or dev in _devices(n)]}")
    else:
        if dev == "cpu" and _load("cpu") is not None:
            name = "cpu"
        elif dev == "cuda" and _load("cuda") is not None:
            name = "cuda"
        elif dev == "cuda" and _unavailable("triton") is None:
            name = "triton"
        else:
            # pure PyTorch, always importable; loaded here since nothing above did (a fresh
            # process on CUDA without Triton, as on Windows, or on another device)
            name = "torch"
            _load(name)
    key = (dev, name, source)
    if key not in _logged:
        _logged.add(key)
        log.info("selective scan on %s tensors: %s", dev, _describe(dev, name, source))
    return name


def _describe(dev: str, name: str, source: str) -> str:
    why = "" if source != "auto" else "".join(
        f"; {n} unavailable ({_errors[n]})" for n in ("cpu", "triton", "cuda") if n in _errors
        and _DEVICES[n] and dev in _DEVICES[n])
    if name == "triton" and _interpreting():   # ~1000x slower than on a GPU (on a GPU too): the log says so
        why += "; through Triton's interpreter (TRITON_INTERPRET=1): for testing, very slow"
    return f"backend {name!r} ({source}{why})"


def describe(device=None) -> str:
    """The backend calls on ``device`` get, who chose it, and why the faster ones are not used
    (for a run's log: the scan's speed differs by up to ~5x between them)."""
    name = get_backend(device)
    source = "set_backend" if _forced is not None else "SVP_SCAN_BACKEND" if os.environ.get(
        "SVP_SCAN_BACKEND") else "auto"
    return _describe(_device_type(device), name, source)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False):
    """Selective scan; ``reverse=True`` scans from the last position to the first
    (the backward direction of the bidirectional mixer) and returns outputs in the
    original order."""
    return _loaded[get_backend(u.device)](u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                          return_last_state, reverse)


def scan_with(name: str, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
              return_last_state=False, reverse=False, **kw):
    """Run the named backend directly (no automatic choice), with the same contract;
    ``kw`` reaches the backend (e.g. ``chunk``)."""
    _check_name(name, "scan_with")
    fn = _loaded[name]
    if kw:
        # the contract's arguments, then each backend's own keywords (``chunk`` for cpu, torch,
        # triton); named here, where the wrapped function's TypeError would not say which backend
        params = inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
        own = [k for k in params if k not in _CONTRACT]
        unknown = sorted(set(kw) - set(own))
        if unknown:
            raise TypeError(f"scan backend {name!r} takes no keyword {', '.join(map(repr, unknown))}; "
                            f"its own keywords: {own or 'none'}")
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse, **kw)
