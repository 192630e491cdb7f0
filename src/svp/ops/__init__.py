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
    "causal_conv1d", "causal_conv1d_bld", "causal_conv1d_ref", "RMSNorm", "rms_norm_ref",
]
