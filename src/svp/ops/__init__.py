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
    "triton_kernels",
]


class _KernelModules:
    """Kernel modules of an optional dependency, each imported at its first use and then an
    attribute: the model's per-layer calls reach them without an import statement (~1.5 us a
    call, several a layer)."""

    def __init__(self, *names):
        self._names = names

    def __getattr__(self, name):   # (only until the module is an attribute)
        if name.startswith("_") or name not in self._names:
            raise AttributeError(name)
        import importlib
        mod = importlib.import_module(f"{__name__}.{name}")
        setattr(self, name, mod)
        return mod


# the fused numba CPU modules (numba is optional, like the 'cpu' scan backend)
cpu_kernels = _KernelModules("scan_cpu", "conv_cpu", "norm_cpu", "prompt_cpu")
# the Triton modules around the scan (Triton is optional; the model takes them where the scan
# runs on the 'triton' backend)
triton_kernels = _KernelModules("scan_triton", "conv_triton", "norm_triton", "prompt_triton")
