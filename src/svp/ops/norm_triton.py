"""The Vim blocks' residual add + RMSNorm as Triton kernels: the GPU's form of
:func:`svp.ops.norm_cpu.add_rms_norm` (same arguments, same results).

    x = residual + hidden (float32),   out = x * rsqrt(mean(x^2) + eps) * weight

returning (out, x), or with ``residual=None`` out alone for x = hidden. In PyTorch
(`norm.rms_norm_ref` and the block's add) that is ~7 operators forward and ~12 backward, each a
pass over a (b, l, D) tensor; here the forward reads hidden and residual and writes out and x
(and one float per row, 1/rms), the backward reads x, out's gradient and x's and writes one
gradient, which serves both addends. A program takes ROWS rows of one token each; the weight's
gradient is summed per program and then over programs in float64 in a fixed order: no
atomics, the same bits on every run.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from ..errors import BackendError
from .scan_triton import DTYPES, _device_fn, _launch, _vec, check_tensors, jitted

# Whether the Vim blocks run their add + RMSNorm through these kernels where the scan runs on
# the 'triton' backend (models/vim.py's _triton_norm); False gives the PyTorch form back.
ENABLED = True
ROWS = 16     # rows (tokens) a program: Vim-S at batch 128 has 25,216, so 1,576 programs


@_device_fn
def _program(w_ptr, D, BLOCK: tl.constexpr):
    """This program's number, the row's columns and their mask, and the weight in float32."""
    cols = tl.arange(0, BLOCK)
    cm = cols < D
    return tl.program_id(0).to(tl.int64), cols, cm, tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)


def _norm_fwd(h_ptr, r_ptr, w_ptr, out_ptr, x_ptr, rstd_ptr, M, D, eps,
              BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_RES: tl.constexpr):
    pid, cols, cm, w = _program(w_ptr, D, BLOCK)
    for i in range(ROWS):
        row = pid * ROWS + i
        # (not `cm & (row < M)`: Triton 3.9's interpreter broadcasts a scalar comparison as int32,
        # and the mask it makes is then refused by tl.load: "mask has unsupported dtype")
        m = tl.where(row < M, cm, False)
        x = tl.load(h_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(x_ptr + row * D + cols, x, mask=m)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(rstd_ptr + row, rstd, mask=row < M)
        tl.store(out_ptr + row * D + cols, x * rstd * w, mask=m)


def _norm_bwd(x_ptr, w_ptr, rstd_ptr, g_ptr, gx_ptr, dx_ptr, dwp_ptr, M, D,
              BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_GX: tl.constexpr):
    pid, cols, cm, w = _program(w_ptr, D, BLOCK)
    dw = tl.zeros((BLOCK,), tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        m = tl.where(row < M, cm, False)
        xhat = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < M, other=0.0)
        xhat = xhat * rstd
        g = tl.load(g_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        dw += g * xhat
        gw = g * w
        dx = (gw - xhat * (tl.sum(gw * xhat, axis=0) / D)) * rstd
        if HAS_GX:   # the gradient that reached x itself (the residual stream after this block)
            dx += tl.load(gx_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * D + cols, dx, mask=m)
    tl.store(dwp_ptr + pid * D + cols, dw, mask=cm)


def _rows(t):
    """t as (rows, D) with unit strides, copied only where it is not already."""
    return t.reshape(-1, t.shape[-1]).contiguous()


class AddRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, residual, weight, eps):
        D = hidden.shape[-1]
        h = _rows(hidden)
        M = h.shape[0]
        r = _rows(residual) if residual is not None else h
        out = torch.empty(M, D, dtype=torch.float32, device=h.device)
        x = torch.empty(M, D, dtype=torch.float32, device=h.device) if residual is not None else h
        rstd = torch.empty(M, dtype=torch.float32, device=h.device)
        fwd, _ = jitted(_norm_fwd, _norm_bwd)
        block = triton.next_power_of_2(D)
        _launch(fwd, (triton.cdiv(M, ROWS),), h, r, weight, out, x, rstd, M, D, float(eps),
                BLOCK=block, ROWS=ROWS, HAS_RES=residual is not None, num_warps=_warps(block))
        ctx.save_for_backward(x, weight, rstd)
        ctx.has_res = residual is not None
        ctx.shape = hidden.shape
        # the final norm's residual stream is unused: its gradient comes as None, not as zeros
        # autograd fills and the kernel reads
        ctx.set_materialize_grads(False)
        out = out.view(hidden.shape)
        return (out, x.view(hidden.shape)) if residual is not None else out

    @staticmethod
    def backward(ctx, g, *rest):
        x, weight, rstd = ctx.saved_tensors
        gx = rest[0] if ctx.has_res else None
        M, D = x.shape
        if g is None:   # only the residual stream used
            g = torch.zeros(ctx.shape, dtype=torch.float32, device=x.device)
        g2 = _rows(g)
        gx2 = _rows(gx) if gx is not None else g2
        nprog = triton.cdiv(M, ROWS)
        dx = torch.empty(M, D, dtype=torch.float32, device=x.device)
        dwp = torch.empty(nprog, D, dtype=torch.float32, device=x.device)
        _, bwd = jitted(_norm_fwd, _norm_bwd)
        block = triton.next_power_of_2(D)
        _launch(bwd, (nprog,), x, weight, rstd, g2, gx2, dx, dwp, M, D,
                BLOCK=block, ROWS=ROWS, HAS_GX=gx is not None, num_warps=_warps(block))
        need = ctx.needs_input_grad
        dw = dwp.sum(0, dtype=torch.float64).to(weight.dtype) if need[2] else None
        dx = dx.view(ctx.shape)
        # d(residual + hidden) reaches both addends unchanged: one tensor serves both
        return (dx if need[0] else None), (dx if (ctx.has_res and need[1]) else None), dw, None


def _warps(block):
    return max(1, min(8, block // 256))


def add_rms_norm_triton(hidden, residual, weight, eps):
    """(RMSNorm(residual + hidden) * weight, residual + hidden) in float32, for a (..., D) hidden
    in float32, bfloat16 or float16 and a float32 residual of its shape on one device, weight
    (D,) float32; with ``residual=None`` the normalised float32 ``hidden`` alone."""
    # (the mixer's output may be reduced-precision; the residual stream and the weight are float32)
    check_tensors("the Triton add + RMSNorm", (("hidden", hidden), ("residual", residual), ("weight", weight)),
                  dtypes=lambda name: DTYPES if name == "hidden" else (torch.float32,))
    if residual is None and hidden.dtype != torch.float32:
        raise BackendError(f"the Triton RMSNorm without a residual takes a float32 hidden; got {hidden.dtype}")
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and hidden {tuple(hidden.shape)} differ")
    if weight.dim() != 1 or weight.shape[0] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of {tuple(hidden.shape)}")
    # (the kernel reads the weight at unit stride: a strided or expanded one was read wrong, or
    # past its storage: review; a contiguous one is passed as it is)
    return AddRMSNormTriton.apply(hidden, residual, _vec(weight), eps)
