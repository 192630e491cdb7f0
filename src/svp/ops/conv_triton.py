"""Causal depthwise conv1d (+ SiLU) as Triton kernels: the mixer's conv on the GPU.

Semantics and signature are those of :func:`svp.ops.conv.causal_conv1d_bld` (the pure-PyTorch
op the tests hold it to): x (batch, len, dim) read in place through its strides, weight
(dim, width), an optional (dim,) bias, ``reverse`` for the time-reversed branch (nothing
flipped or copied). With tap time t_k = t - (W-1-k) (forward) or t + (W-1-k) (reverse),

    out[t] = act(bias + sum_k weight[:, k] * x[t_k]),   x outside [0, len) read as 0.

Why a kernel: written as W shifted multiply-adds in PyTorch (causal_conv1d_bld) the conv and
its gradient take ~40 elementwise ops a call, and each slice's backward zero-fills a padded
tensor: 23 passes over a (b, l, E) activation forward and 47 backward (counted at Vim-S,
batch 128, on the CUDA code path; docs/benchmarks.md, "Bytes around the scan on the GPU
path"), where the same work needs two forward (read x, write out) and three backward (read x
and dout, write dx). Here each program takes a (BLOCK_L steps x BLOCK_D channels) tile and
computes in float32; outputs come back in x's dtype.

The backward recomputes the pre-activation instead of saving it: dx[u] = sum_k w[k] dpre[u +/-
(W-1-k)] needs dpre at W shifted times, each from W loads of x that mostly hit the cache.
dweight and dbias are written per (batch row, time block) and summed afterwards in float64 in
a fixed order: no atomics, so the same inputs give the same bits on every run (as the Triton
scan's sums).
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .scan_triton import _device_fn, _launch, check_tensors, jitted

# Whether the model runs its conv through these kernels where the scan runs on the 'triton'
# backend (models/vim.py's _conv); False gives the pure-PyTorch conv there, for an A/B on a GPU
# (benchmarks/gpu_profile.py --conv torch, gpu_check.py part (c)).
ENABLED = True
# Tile of one program. Not tuned on a GPU (none was lent when these were written): 32 steps x
# 64 channels (128-byte rows of bfloat16) at 8 warps, 8 values a thread. ptxas (sm_90a, bf16 x,
# width 4) then reports 48 registers for the forward and 197 for the backward, no spills; at
# 4 warps the backward spilled ~320 bytes.
BLOCK_L = 32
BLOCK_D = 64
WARPS = 8


@_device_fn
def _pre(x_row, w_ptr, t, c, cm, L, sx_l, sw_d, sw_w, bias, W: tl.constexpr, BLOCK_L: tl.constexpr,
         BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr):
    """The (BLOCK_L, BLOCK_D) tile of the conv before its activation at times t, float32."""
    acc = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    for k in tl.static_range(W):
        if REVERSE:
            tk = t + (W - 1 - k)
        else:
            tk = t - (W - 1 - k)
        m = (tk >= 0) & (tk < L)
        xv = tl.load(x_row[None, :] + tk[:, None] * sx_l, mask=m[:, None] & cm[None, :], other=0.0)
        wk = tl.load(w_ptr + c * sw_d + k * sw_w, mask=cm, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wk[None, :]
    if HAS_BIAS:
        acc += bias[None, :]
    return acc


@_device_fn
def _bias(b_ptr, c, cm, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), tl.float32)
    return bias


def _conv_fwd(x_ptr, w_ptr, b_ptr, out_ptr, L, d,
              sx_b, sx_l, sx_d, sw_d, sw_w, so_b, so_l, so_d,
              W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr):
    bi = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < d
    bias = _bias(b_ptr, c, cm, BLOCK_D, HAS_BIAS)
    v = _pre(x_ptr + bi * sx_b + c * sx_d, w_ptr, t, c, cm, L, sx_l, sw_d, sw_w, bias, W, BLOCK_L, BLOCK_D,
             HAS_BIAS, REVERSE)
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    m = (t < L)[:, None] & cm[None, :]
    tl.store(out_ptr + bi * so_b + t[:, None] * so_l + c[None, :] * so_d, v.to(out_ptr.dtype.element_ty), mask=m)


def _conv_bwd(x_ptr, w_ptr, b_ptr, go_ptr, dx_ptr, dwp_ptr, dbp_ptr, L, d, nlb,
              sx_b, sx_l, sx_d, sw_d, sw_w, sg_b, sg_l, sg_d, sdx_b, sdx_l, sdx_d,
              W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr):
    bi = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    u = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < d
    bias = _bias(b_ptr, c, cm, BLOCK_D, HAS_BIAS)
    x_row = x_ptr + bi * sx_b + c * sx_d
    g_row = go_ptr + bi * sg_b + c * sg_d
    dx = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    for k in tl.static_range(W):
        # the output times x[u] reached through tap k, and dL/d(pre-activation) there
        if REVERSE:
            t = u - (W - 1 - k)
        else:
            t = u + (W - 1 - k)
        ok = (t >= 0) & (t < L)
        m = ok[:, None] & cm[None, :]
        g = tl.load(g_row[None, :] + t[:, None] * sg_l, mask=m, other=0.0).to(tl.float32)
        if SILU:
            v = _pre(x_row, w_ptr, t, c, cm, L, sx_l, sw_d, sw_w, bias, W, BLOCK_L, BLOCK_D, HAS_BIAS, REVERSE)
            s = 1.0 / (1.0 + tl.exp(-v))
            g = g * s * (1.0 + v * (1.0 - s))
        wk = tl.load(w_ptr + c * sw_d + k * sw_w, mask=cm, other=0.0).to(tl.float32)
        dx += g * wk[None, :]
        if k == W - 1:
            # t == u: this program's own output times; the weight's and bias' partial sums
            row = bi * nlb + lb
            for j in tl.static_range(W):
                if REVERSE:
                    tj = u + (W - 1 - j)
                else:
                    tj = u - (W - 1 - j)
                mj = ((tj >= 0) & (tj < L))[:, None] & cm[None, :]
                xj = tl.load(x_row[None, :] + tj[:, None] * sx_l, mask=mj, other=0.0).to(tl.float32)
                tl.store(dwp_ptr + (row * W + j) * d + c, tl.sum(g * xj, axis=0), mask=cm)
            if HAS_BIAS:
                tl.store(dbp_ptr + row * d + c, tl.sum(g, axis=0), mask=cm)
    mu = (u < L)[:, None] & cm[None, :]
    tl.store(dx_ptr + bi * sdx_b + u[:, None] * sdx_l + c[None, :] * sdx_d, dx.to(dx_ptr.dtype.element_ty), mask=mu)


def _check(x, weight, bias, activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x (batch, len, dim) and weight (dim, width); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"the Triton conv takes a (dim,) bias; got {tuple(bias.shape)}")
    check_tensors("the Triton conv", (("x", x), ("weight", weight), ("bias", bias)))


def _grid(x):
    b, L, d = x.shape
    return b, triton.cdiv(L, BLOCK_L), triton.cdiv(d, BLOCK_D)


class CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        b, L, d = x.shape
        out = torch.empty(b, L, d, dtype=x.dtype, device=x.device)
        fwd, _ = jitted(_conv_fwd, _conv_bwd)
        _launch(fwd, _grid(x), x, weight, bias if bias is not None else x, out, L, d,
                *x.stride(), *weight.stride(), *out.stride(),
                W=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, HAS_BIAS=bias is not None,
                SILU=bool(silu), REVERSE=bool(reverse), num_warps=WARPS)
        ctx.save_for_backward(x, weight, bias)
        ctx.cfg = (bool(silu), bool(reverse))
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        silu, reverse = ctx.cfg
        b, L, d = x.shape
        W = weight.shape[1]
        grid = _grid(x)
        nlb = grid[1]
        f32 = dict(dtype=torch.float32, device=x.device)
        dx = torch.empty(b, L, d, dtype=x.dtype, device=x.device)
        dwp = torch.empty(b * nlb, W, d, **f32)
        dbp = torch.empty(b * nlb, d, **f32) if bias is not None else dwp
        _, bwd = jitted(_conv_fwd, _conv_bwd)
        _launch(bwd, grid, x, weight, bias if bias is not None else x, dout, dx, dwp, dbp, L, d, nlb,
                *x.stride(), *weight.stride(), *dout.stride(), *dx.stride(),
                W=W, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, HAS_BIAS=bias is not None, SILU=silu,
                REVERSE=reverse, num_warps=WARPS)
        need = ctx.needs_input_grad
        dw = dwp.sum(0, dtype=torch.float64).t().to(weight.dtype).contiguous() if need[1] else None
        db = dbp.sum(0, dtype=torch.float64).to(bias.dtype) if bias is not None and need[2] else None
        return dx if need[0] else None, dw, db, None, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = None, reverse: bool = False) -> torch.Tensor:
    """Triton causal depthwise conv1d on (batch, len, dim); the arguments of
    :func:`svp.ops.conv.causal_conv1d_bld` (bias (dim,) only)."""
    _check(x, weight, bias, activation)
    return CausalConv1dTriton.apply(x, weight, bias, activation is not None, reverse)
