"""Backend selection for the selective scan.

Placeholder dispatcher with only the reference backend; the fast backends
(compiled CPU kernels, pure-PyTorch GPU path, mamba_ssm CUDA) register here.
"""
from __future__ import annotations

import os

from .scan_ref import selective_scan_ref

_BACKENDS = {"reference": selective_scan_ref}
_forced: str | None = None


def available_backends():
    return list(_BACKENDS)


def set_backend(name: str | None):
    global _forced
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; available: {available_backends()}")
    _forced = name


def get_backend(device=None) -> str:
    name = _forced or os.environ.get("SVP_SCAN_BACKEND") or "reference"
    if name not in _BACKENDS:
        raise ValueError(f"SVP_SCAN_BACKEND={name!r} is not available; available: {available_backends()}")
    return name


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False):
    """Selective scan; ``reverse=True`` scans from the last position to the first
    (the backward direction of the bidirectional mixer) and returns outputs in the
    original order."""
    fn = _BACKENDS[get_backend(u.device)]
    if reverse:
        flip = lambda t: None if t is None else t.flip(-1)
        out = fn(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus, return_last_state)
        if return_last_state:
            return out[0].flip(-1), out[1]
        return out.flip(-1)
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
