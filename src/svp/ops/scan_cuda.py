"""Adapter for mamba_ssm's CUDA selective scan (optional; never required).

Available when ``mamba_ssm`` imports and CUDA is present. mamba_ssm has no reversed
scan, so ``reverse=True`` flips the time axis around the call.
"""
from __future__ import annotations

import torch

_fn = None
_err = None
try:  # pragma: no cover - needs a CUDA build of mamba_ssm
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _fn  # type: ignore
except Exception as e:  # ImportError, or a broken extension build
    _err = f"mamba_ssm not importable ({type(e).__name__}: {e})"


def available() -> bool:
    return _fn is not None and torch.cuda.is_available()


def unavailable_reason() -> str:
    if _fn is None:
        return _err or "mamba_ssm not importable"
    return "no CUDA device"


def version() -> str | None:
    try:
        import mamba_ssm  # type: ignore
        return getattr(mamba_ssm, "__version__", "unknown")
    except Exception:
        return None


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, reverse=False):
    if not available():
        raise RuntimeError(f"the 'cuda' scan backend is unavailable: {unavailable_reason()}")
    for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C)):
        if x.device.type != "cuda":
            raise ValueError(f"the 'cuda' scan backend needs CUDA tensors; {name} is on {x.device}")
    if reverse:
        fl = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        res = _fn(fl(u), fl(delta), A, fl(B), fl(C), D, fl(z), delta_bias, delta_softplus, return_last_state)
        if return_last_state:
            return res[0].flip(-1), res[1]
        return res.flip(-1)
    return _fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
