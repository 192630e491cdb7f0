"""Fused "stream + scaled SiLU prompts" for CPUs (numba), forward and backward:

    out[b, t] = h[b, t] + (s1 * silu(a1[b, t]) + s2 * silu(a2[b, t]))   for t != skip
    out[b, t] = h[b, t]                                                    for t == skip

with a1, a2 (b, l, d) pre-activations (either may be absent) and s1, s2 (d,) per-channel
scales. This is SVP's prompt step (Cross and Inner prompters, alpha and beta; the class token
at ``skip`` untouched), the same float operations in the same order as the PyTorch reference
``h + (alpha * silu(a1) + beta * silu(a2))``, up to the SiLU's rounding.

Why: written in PyTorch the step is two SiLUs, two multiplies and two adds forward (six passes
over the token stream, five fresh tensors) and about twice that backward (SiLU backward,
multiply backward with a broadcast-sum for each scale), run before every block; and the class
token must be left out, which the module did by splitting the sequence at it and joining it
again (strided halves copied for the products, a concatenation forward, zero-filled slices
backward). Here it is one pass forward (read h, a1, a2; write out) and one backward (read the
incoming gradient, a1, a2; write the gradients of a1 and a2, whose class-token rows are zero,
and the scales' sums: float32 over each task's rows, float64 across tasks in task order, so
the bits do not depend on the number of threads). The gradient of h is the incoming gradient itself.
"""
from __future__ import annotations

import numpy as np
import torch

from . import scan_cpu  # noqa: F401  (numba cache dir, threading layer, LLVM options)
from .scan_cpu import _FM_SAFE, _ONE, _dynamic_tasks, _nd, _sigmoid, _wide_vectors, drop_stale_caches
from .simd import as_f32, to_elem
from numba import njit, prange

TB = 16  # tokens per task (a task owns whole rows)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_FM_SAFE)
def _prompt_fwd(h, a1, s1, a2, s2, use1, use2, skip, out):
    b, L, d = h.shape
    ntb = (L + TB - 1) // TB
    for task in prange(b * ntb):
        _wide_vectors()
        bi = task // ntb
        t0 = (task - bi * ntb) * TB
        for t in range(t0, min(L, t0 + TB)):
            hr = h[bi, t]
            o = out[bi, t]
            if t == skip:
                for c in range(d):
                    o[c] = hr[c]
            elif use1 and use2:
                x1 = a1[bi, t]
                x2 = a2[bi, t]
                for c in range(d):
                    u = as_f32(x1[c])
                    v = as_f32(x2[c])
                    o[c] = hr[c] + (s1[c] * (u * _sigmoid(u)) + s2[c] * (v * _sigmoid(v)))
            elif use1:
                x1 = a1[bi, t]
                for c in range(d):
                    u = as_f32(x1[c])
                    o[c] = hr[c] + s1[c] * (u * _sigmoid(u))
            else:
                x2 = a2[bi, t]
                for c in range(d):
                    v = as_f32(x2[c])
                    o[c] = hr[c] + s2[c] * (v * _sigmoid(v))


@njit(inline="always", fastmath=_FM_SAFE, error_model="numpy")
def _term_bwd(g, x, s, need_s, da, ds):
    """da = g * s * silu'(x); ds += g * silu(x). One loop: the sigmoid once per element. ds is the
    task's float32 partial (a float64 one here took as long as the rest of the kernel). x and da
    may be bfloat16 (uint16 bits: svp.ops.simd.as_f32 / to_elem)."""
    d = g.shape[0]
    if need_s:
        for c in range(d):
            u = as_f32(x[c])
            sg = _sigmoid(u)
            gc = g[c]
            da[c] = to_elem((gc * s[c]) * (sg * (_ONE + u * (_ONE - sg))), da)
            ds[c] += gc * (u * sg)
    else:
        for c in range(d):
            u = as_f32(x[c])
            sg = _sigmoid(u)
            da[c] = to_elem((g[c] * s[c]) * (sg * (_ONE + u * (_ONE - sg))), da)


@njit(parallel=True, cache=True, error_model="numpy", fastmath=_FM_SAFE)
def _prompt_bwd(g, a1, s1, a2, s2, use1, use2, skip, need_s1, need_s2, da1, da2, ds1p, ds2p):
    b, L, d = g.shape
    ntb = (L + TB - 1) // TB
    for task in prange(b * ntb):
        _wide_vectors()
        bi = task // ntb
        t0 = (task - bi * ntb) * TB
        # the scales' sums: float32 over the task's (at most TB) rows, then float64 across tasks
        ds1 = np.zeros(d, np.float32)
        ds2 = np.zeros(d, np.float32)
        for t in range(t0, min(L, t0 + TB)):
            if t == skip:   # (zero bits: 0.0 in float32 and in bfloat16 alike)
                if use1:
                    da1[bi, t, :] = 0
                if use2:
                    da2[bi, t, :] = 0
                continue
            gr = g[bi, t]
            if use1:
                _term_bwd(gr, a1[bi, t], s1, need_s1, da1[bi, t], ds1)
            if use2:
                _term_bwd(gr, a2[bi, t], s2, need_s2, da2[bi, t], ds2)
        if need_s1:
            p1 = ds1p[task]
            for c in range(d):
                p1[c] = ds1[c]
        if need_s2:
            p2 = ds2p[task]
            for c in range(d):
                p2[c] = ds2[c]


def _c(t):
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


class AddSiluPromptsCPU(torch.autograd.Function):
    """a1 and a2 may be bfloat16 (the prompters' products under CPU autocast): read as they are,
    and their gradients written in bfloat16, the bits of casting them to float32 first."""
    @staticmethod
    def forward(ctx, h, a1, s1, a2, s2, skip):
        use1, use2 = a1 is not None, a2 is not None
        hc = _c(h)
        d = hc.shape[-1]
        # an absent pre-activation's stand-in has the other's dtype: one kernel type per dtype
        dummy = torch.zeros(1, 1, d, dtype=(a1 if use1 else a2).dtype)
        x1 = _c(a1) if use1 else dummy
        x2 = _c(a2) if use2 else dummy
        v1 = _c(s1) if use1 else hc.new_zeros(d)
        v2 = _c(s2) if use2 else hc.new_zeros(d)
        out = torch.empty(hc.shape, dtype=torch.float32)
        with _dynamic_tasks():
            _prompt_fwd(hc.numpy(), _nd(x1), v1.numpy(), _nd(x2), v2.numpy(), use1, use2, int(skip),
                        out.numpy())
        ctx.save_for_backward(x1, v1, x2, v2)
        ctx.cfg = (use1, use2, int(skip))
        return out

    @staticmethod
    def backward(ctx, g):
        x1, v1, x2, v2 = ctx.saved_tensors
        use1, use2, skip = ctx.cfg
        need = ctx.needs_input_grad
        g = _c(g)
        b, L, d = g.shape
        ntask = b * ((L + TB - 1) // TB)
        need_s1, need_s2 = bool(use1 and need[2]), bool(use2 and need[4])
        da1 = torch.empty(b, L, d, dtype=x1.dtype) if use1 else x1
        da2 = torch.empty(b, L, d, dtype=x2.dtype) if use2 else x2
        ds1p = torch.empty(ntask, d, dtype=torch.float64)   # per-task partial sums (left unwritten
        ds2p = torch.empty(ntask, d, dtype=torch.float64)   # when that scale has no gradient)
        with _dynamic_tasks():
            _prompt_bwd(g.numpy(), _nd(x1), v1.numpy(), _nd(x2), v2.numpy(), use1, use2, skip, need_s1,
                        need_s2, _nd(da1), _nd(da2), ds1p.numpy(), ds2p.numpy())
        return (g if need[0] else None, da1 if (use1 and need[1]) else None,
                ds1p.sum(0).to(torch.float32) if need_s1 else None, da2 if (use2 and need[3]) else None,
                ds2p.sum(0).to(torch.float32) if need_s2 else None, None)


def add_silu_prompts_cpu(h, a1=None, s1=None, a2=None, s2=None, skip=-1):
    """``h + (s1 * silu(a1) + s2 * silu(a2))`` on every row ``t != skip`` of the (b, l, d) float32 CPU
    tensors (row ``skip`` of every sample is ``h``'s, and gets no prompt gradient); either
    (a, s) pair may be None, not both. s1, s2: (d,). a1 and a2 may be bfloat16 instead (both
    the same dtype): the result is float32 either way."""
    if a1 is None and a2 is None:
        raise ValueError("add_silu_prompts_cpu needs a1 or a2")
    if (a1 is None) != (s1 is None) or (a2 is None) != (s2 is None):
        raise ValueError("each pre-activation needs its scale")
    if h.dim() != 3:
        raise ValueError(f"expected h (batch, len, dim), got {tuple(h.shape)}")
    if a1 is not None and a2 is not None and a1.dtype != a2.dtype:
        raise ValueError(f"add_silu_prompts_cpu needs a1 and a2 of one dtype; got {a1.dtype} and {a2.dtype}")
    for name, t, shape in (("a1", a1, h.shape), ("a2", a2, h.shape), ("s1", s1, h.shape[-1:]),
                           ("s2", s2, h.shape[-1:]), ("h", h, h.shape)):
        if t is None:
            continue
        ok = (torch.float32, torch.bfloat16) if name in ("a1", "a2") else (torch.float32,)
        if t.dtype not in ok or t.device.type != "cpu":
            raise ValueError(f"add_silu_prompts_cpu needs float32 CPU tensors (a1, a2: float32 or bfloat16); "
                             f"{name} is {t.dtype} on {t.device}")
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return AddSiluPromptsCPU.apply(h, a1, s1, a2, s2, int(skip))


drop_stale_caches(globals())   # see drop_stale_caches: numba cannot see what they inline from other files
