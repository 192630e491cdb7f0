"""Fused residual add + RMSNorm for CPUs (numba), forward and backward; same result as
:func:`svp.ops.norm.rms_norm_ref` with ``prenorm=True, residual_in_fp32=True`` on float32 tensors.

Why: every Vim block starts with ``residual = residual + hidden; norm(residual)``. In PyTorch
that is an add, pow, mean, add, rsqrt and two multiplies forward (seven passes over the
(b, l, D) stream, five fresh tensors) and about twice that in autograd backward, in every
block, in every training step whatever the method (a frozen backbone still needs the input
gradients). Here it is one pass forward (read hidden and residual, write the new residual
and the normalised output) and one backward (read the residual, the two incoming gradients,
write one gradient, which serves both inputs of the add). Only the residual stream and one
float per row (1 / rms) are kept for backward; the normalised output is recomputed.

Sums over channels (the mean square, the backward's dot product) are 8 float64 lanes added
in a fixed order, and the weight gradient's sums over rows are per-task float64 partials
added in task order: the bits do not depend on the number of threads or on scheduling.
"""
from __future__ import annotations

import numpy as np
import torch

from . import scan_cpu  # noqa: F401  (numba cache dir, threading layer, LLVM options)
from .scan_cpu import _FM_SAFE, _dynamic_tasks, guard_caches
from numba import njit, prange

RB = 16   # rows (tokens) per task
_LANES = 8


# forceinline (LLVM inlines them), not numba's inline="always" (which copies and types their IR
# into the prange bodies): see conv_cpu._proj_rows; numba 0.58 compiled the two kernels in 8.4-9.3 s
# instead of 11.3-11.8 s, same bits and speed
@njit(fastmath=_FM_SAFE, error_model="numpy", forceinline=True)
def _sumsq(x, acc):
    """sum of x[c]^2 in float64: lane-wise partial sums, then a fixed-order tree."""
    d = x.shape[0]
    for k in range(_LANES):
        acc[k] = 0.0
    c0 = d - d % _LANES
    for c in range(0, c0, _LANES):
        for k in range(_LANES):
            v = np.float64(x[c + k])
            acc[k] += v * v
    for c in range(c0, d):
        v = np.float64(x[c])
        acc[0] += v * v
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@njit(fastmath=_FM_SAFE, error_model="numpy", forceinline=True)
def _dot_wg(g, w, x, acc):
    """sum_c (g[c] * w[c]) * x[c] in float64 (same fixed order as _sumsq)."""
    d = x.shape[0]
    for k in range(_LANES):
        acc[k] = 0.0
    c0 = d - d % _LANES
    for c in range(0, c0, _LANES):
        for k in range(_LANES):
            acc[k] += np.float64(g[c + k] * w[c + k]) * np.float64(x[c + k])
    for c in range(c0, d):
        acc[0] += np.float64(g[c] * w[c]) * np.float64(x[c])
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_FM_SAFE)
def _add_norm_fwd(h, res, w, eps, has_res, out, r, rstd):
    # h, res, out, r: (rows, d); rstd: (rows,). r is written only when has_res (else r is h).
    n, d = h.shape
    ntask = (n + RB - 1) // RB
    inv_d = 1.0 / d
    for task in prange(ntask):
        acc = np.empty(_LANES, np.float64)
        for i in range(task * RB, min(n, task * RB + RB)):
            hi = h[i]
            if has_res:
                ri = r[i]
                si = res[i]
                for c in range(d):
                    ri[c] = si[c] + hi[c]
                src = ri
            else:
                src = hi
            s = np.float32(1.0 / np.sqrt(_sumsq(src, acc) * inv_d + eps))
            rstd[i] = s
            oi = out[i]
            for c in range(d):
                oi[c] = (src[c] * s) * w[c]


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_FM_SAFE)
def _add_norm_bwd(x, w, rstd, g, gr, has_gr, need_dw, dx, dwp):
    # x: the normalised input (the new residual); g: dL/d(out); gr: dL/d(new residual).
    # dx = gr + s * (g*w - xhat * mean(g*w*xhat)), xhat = x*s; dwp[task] = sum_rows g*xhat.
    n, d = x.shape
    ntask = (n + RB - 1) // RB
    inv_d = 1.0 / d
    for task in prange(ntask):
        acc = np.empty(_LANES, np.float64)
        dw = dwp[task]
        if need_dw:
            dw[:] = 0.0
        for i in range(task * RB, min(n, task * RB + RB)):
            xi = x[i]
            gi = g[i]
            s = rstd[i]
            # mean(g*w*xhat) = s * mean(g*w*x)
            m = np.float32(_dot_wg(gi, w, xi, acc) * inv_d * s)
            dxi = dx[i]
            if has_gr:
                gri = gr[i]
                for c in range(d):
                    dxi[c] = gri[c] + s * (gi[c] * w[c] - (xi[c] * s) * m)
            else:
                for c in range(d):
                    dxi[c] = s * (gi[c] * w[c] - (xi[c] * s) * m)
            if need_dw:
                for c in range(d):
                    dw[c] += np.float64(gi[c]) * np.float64(xi[c] * s)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, d) float32 view (a copy only when the channels are not contiguous rows)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _add_norm(hidden, residual, weight, eps):
    """AddRMSNormCPU's forward: (out, the residual stream r, the tensors its backward reads)."""
    shape = hidden.shape
    h = _rows(hidden)
    n, d = h.shape
    has_res = residual is not None
    res = _rows(residual) if has_res else h
    w = weight.detach().contiguous()
    out = torch.empty(shape, dtype=torch.float32)
    r = torch.empty(shape, dtype=torch.float32) if has_res else hidden.detach()
    rstd = torch.empty(n, dtype=torch.float32)
    with _dynamic_tasks():
        _add_norm_fwd(h.numpy(), res.numpy(), w.numpy(), float(eps), has_res, out.view(n, d).numpy(),
                      _rows(r).numpy(), rstd.numpy())
    return out, r, (r, w, rstd)


class AddRMSNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, residual, weight, eps):
        out, r, saved = _add_norm(hidden, residual, weight, eps)
        ctx.save_for_backward(*saved)
        ctx.has_res = residual is not None
        return (out, r) if ctx.has_res else out

    @staticmethod
    def backward(ctx, g, *rest):
        r, w, rstd = ctx.saved_tensors
        gr = rest[0] if ctx.has_res else None
        shape = r.shape
        x = _rows(r)
        n, d = x.shape
        g2 = _rows(g)
        has_gr = gr is not None
        gr2 = _rows(gr) if has_gr else g2
        need = ctx.needs_input_grad
        need_dw = bool(need[2])
        ntask = (n + RB - 1) // RB
        dwp = torch.empty(ntask if need_dw else 1, d, dtype=torch.float64)
        dx = torch.empty(shape, dtype=torch.float32)
        with _dynamic_tasks():
            _add_norm_bwd(x.numpy(), w.numpy(), rstd.numpy(), g2.numpy(), gr2.numpy(), has_gr, need_dw,
                          dx.view(n, d).numpy(), dwp.numpy())
        dw = dwp.sum(0).to(torch.float32) if need_dw else None
        # d(residual + hidden) reaches both addends unchanged: one tensor serves both
        return (dx if need[0] else None), (dx if (ctx.has_res and need[1]) else None), dw, None


def add_rms_norm_cpu(hidden, residual, weight, eps):
    """(RMSNorm(residual + hidden) * weight, residual + hidden) for float32 CPU tensors of the
    same shape (b, l, d), weight (d,); with ``residual=None`` the normalised ``hidden`` alone."""
    for name, t in (("hidden", hidden), ("residual", residual), ("weight", weight)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"add_rms_norm_cpu needs float32 CPU tensors; {name} is {t.dtype} on {t.device}")
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and hidden {tuple(hidden.shape)} differ")
    if weight.dim() != 1 or weight.shape[0] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of {tuple(hidden.shape)}")
    return add_rms_norm(hidden, residual, weight, eps)


def add_rms_norm(hidden, residual, weight, eps):
    """add_rms_norm_cpu on arguments already checked (the Vim blocks check them as they pick it,
    svp.models.vim._fused_norm): an autograd node where a gradient is recorded, else the
    forward alone."""
    if torch.is_grad_enabled():
        return AddRMSNormCPU.apply(hidden, residual, weight, eps)
    out, r, _ = _add_norm(hidden, residual, weight, eps)
    return out if residual is None else (out, r)


guard_caches(globals())   # see drop_stale_caches (numba cannot see what they inline from other files) and _flocked
