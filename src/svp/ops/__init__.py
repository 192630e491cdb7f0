"""Operators of the Mamba mixer: selective scan, causal conv1d, RMSNorm.

``selective_scan`` is the one entry point every caller uses; it dispatches to the
best backend available for the inputs (see :mod:`svp.ops.dispatch`).
"""
from .conv import causal_conv1d, causal_conv1d_bld, causal_conv1d_ref
from .norm import RMSNorm, rms_norm_ref
from .scan_ref import selective_scan_ref
from .dispatch import selective_scan, available_backends, get_backend, set_backend

__all__ = [
    "selective_scan", "selective_scan_ref", "available_backends", "get_backend", "set_backend",
    "causal_conv1d", "causal_conv1d_bld", "causal_conv1d_ref", "RMSNorm", "rms_norm_ref", "cpu_kernels",
]


class _CPUKernels:
    """The fused numba CPU modules (``cpu_kernels.scan_cpu``, ``conv_cpu``, ``norm_cpu``,
    ``prompt_cpu``), each imported at its first use (numba is optional, like the 'cpu' scan
    backend) and then an attribute: the model's per-layer calls reach them without an import
    statement (~1.5 us a call, several a layer)."""

    _NAMES = ("scan_cpu", "conv_cpu", "norm_cpu", "prompt_cpu")

    def __getattr__(self, name):   # (only until the module is an attribute)
        if name not in self._NAMES:
            raise AttributeError(name)
        import importlib
        mod = importlib.import_module(f"{__name__}.{name}")
        setattr(self, name, mod)
        return mod


cpu_kernels = _CPUKernels()
