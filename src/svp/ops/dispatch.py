"""Backend selection for the selective scan.

Backends (all with the semantics of :func:`svp.ops.scan_ref.selective_scan_ref` plus
``reverse``):

``reference``  the literal PyTorch loop (slow; the definition everything is tested against)
``cpu``        fused numba kernels (:mod:`svp.ops.scan_cpu`); CPU tensors only
``torch``      chunked pure-PyTorch path with a hand-written backward; any device
``cuda``       mamba_ssm's ``selective_scan_fn`` (when it imports); CUDA tensors only

Choice: ``set_backend(name)`` (Python) overrides ``SVP_SCAN_BACKEND`` (environment), which
overrides the automatic choice: ``cpu`` for CPU tensors when numba works, ``cuda`` for
CUDA tensors when mamba_ssm works, else ``torch``. A forced backend that cannot run on
the inputs' device raises; there is no silent fallback. The choice is logged once per
(device type, backend).
"""
from __future__ import annotations

import importlib
import logging
import os

from .scan_ref import selective_scan_ref

log = logging.getLogger("svp.ops.scan")

NAMES = ("reference", "cpu", "torch", "cuda")
# which device types each backend runs on (None: any)
_DEVICES = {"reference": None, "torch": None, "cpu": ("cpu",), "cuda": ("cuda",)}
_MODULES = {"cpu": ("svp.ops.scan_cpu", "selective_scan_cpu"),
            "torch": ("svp.ops.scan_torch", "selective_scan_torch"),
            "cuda": ("svp.ops.scan_cuda", "selective_scan_cuda")}
_loaded: dict = {"reference": selective_scan_ref}
_errors: dict = {}
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
        mod = importlib.import_module(modname)
        if name == "cuda" and not mod.available():
            raise ImportError(mod.unavailable_reason())
        _loaded[name] = getattr(mod, fn)
    except Exception as e:  # numba / mamba_ssm missing or broken: backend unavailable
        _errors[name] = f"{type(e).__name__}: {e}"
        return None
    return _loaded[name]


def available_backends():
    """Backends that can run on this machine (importing their dependencies on first call)."""
    return [n for n in NAMES if _load(n) is not None]


def unavailable_backends() -> dict:
    """{name: reason} for the backends that cannot run here."""
    available_backends()
    return dict(_errors)


def _check_name(name: str, source: str):
    if name not in NAMES:
        raise ValueError(f"unknown scan backend {name!r} ({source}); choose one of {list(NAMES)}")
    if _load(name) is None:
        raise RuntimeError(f"scan backend {name!r} ({source}) is not available here: {_errors.get(name)}")


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
    if name is not None:
        _check_name(name, source)
        ok = _DEVICES[name]
        if ok is not None and dev not in ok:
            raise RuntimeError(f"scan backend {name!r} (forced by {source}) cannot run on {dev} tensors; "
                               f"unset it or choose one of "
                               f"{[n for n in available_backends() if _DEVICES[n] is None or dev in _DEVICES[n]]}")
    else:
        if dev == "cpu" and _load("cpu") is not None:
            name = "cpu"
        elif dev == "cuda" and _load("cuda") is not None:
            name = "cuda"
        else:
            name = "torch"
    key = (dev, name, source)
    if key not in _logged:
        _logged.add(key)
        why = "" if source != "auto" else "".join(
            f"; {n} unavailable ({_errors[n]})" for n in ("cpu", "cuda") if n in _errors
            and _DEVICES[n] and dev in _DEVICES[n])
        log.info("selective scan on %s tensors: backend %r (%s%s)", dev, name, source, why)
    return name


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False):
    """Selective scan; ``reverse=True`` scans from the last position to the first
    (the backward direction of the bidirectional mixer) and returns outputs in the
    original order."""
    name = get_backend(u.device)
    fn = _loaded[name]
    if name == "reference":
        if reverse:
            flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
            out = fn(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                     return_last_state)
            if return_last_state:
                return out[0].flip(-1), out[1]
            return out.flip(-1)
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return fn(u, delta, A, B, C, D, z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              return_last_state=return_last_state, reverse=reverse)
