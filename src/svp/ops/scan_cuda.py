"""Adapter for mamba_ssm's CUDA selective scan (optional; never required).

Available when ``mamba_ssm`` imports and CUDA is present. mamba_ssm has no reversed
scan; :mod:`svp.ops.dispatch` adds ``reverse`` by flipping time.
"""
from __future__ import annotations

import torch

from ..errors import BackendError
from .scan_ref import check_scan_args

_fn = None
_err = None
try:  # pragma: no cover - needs a CUDA build of mamba_ssm
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _fn  # type: ignore
except (Exception, SystemExit) as e:  # ImportError, or a broken extension build (one even exits)
    _err = f"mamba_ssm not importable ({type(e).__name__}: {e})"


def available() -> bool:
    return _fn is not None and torch.cuda.is_available()


def unavailable_reason() -> str:
    if _fn is None:
        return _err or "mamba_ssm not importable"
    return "no CUDA device"


def version() -> str:
    """``svp doctor``'s row: mamba_ssm's version, or that it is installed but does not import (a
    CPU-only install of it imports its CUDA extension, spec checkpoints-and-install.md 1.3) and
    why, or "not installed"."""
    from ..compat import module_version
    return module_version("mamba_ssm")


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    if not available():
        raise BackendError(f"the 'cuda' scan backend is unavailable: {unavailable_reason()}")
    for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C)):
        if x.device.type != "cuda":
            raise BackendError(f"the 'cuda' scan backend needs CUDA tensors; {name} is on {x.device}")
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    return _fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
