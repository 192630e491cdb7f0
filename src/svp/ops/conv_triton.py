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

The backward recomputes the pre-activation instead of saving it. Two forms (``BACKWARD``):
"split" (the default) runs two kernels: the first computes dL/d(pre-activation) once per time
(float32, a (b, l, E) scratch) with the weight's and bias' partial sums, the second is this
module's forward kernel run the other way in time over it (dx[u] = sum_k w[k] dpre[u +/-
(W-1-k)] is the conv in the opposite direction, no bias, no activation). "fused" does it in one
kernel that recomputes dpre at each of the W shifted times, from W loads of x each: fewer
bytes, W times the arithmetic and ~200 registers a thread. dweight and dbias are written per
(batch row, time block) and summed afterwards in float64 in a fixed order
(``scan_triton.fixed_sum``): no atomics, so the same inputs give the same bits on every run (as
the Triton scan's sums).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

from ..compat import autocast_dtype
from .kept import kept_cast
from .scan_triton import _device_fn, _launch, _time_safe, _vec, check_tensors, fixed_sum, jitted

# Whether the model runs its conv through these kernels where the scan runs on the 'triton'
# backend (models/vim.py's _conv); False gives the pure-PyTorch conv there, for an A/B on a GPU
# (benchmarks/gpu_profile.py --conv torch, gpu_check.py part (c)).
ENABLED = True
# Tile of one program: BLOCK_L steps x BLOCK_D channels on WARPS warps, 16 values a thread.
# Measured on an H200 (Triton 3.6, Vim-S mixer at batch 128, bf16 x; benchmarks/triton_sweep.py
# --parts conv, docs/benchmarks.md "GPU, second run"): 64 x 32 at 4 warps took 0.060 ms forward
# and 0.298 ms backward (split), against 0.104 / 0.588 ms for the first choice, 32 x 64 at 8
# warps; 32 x 32 at 2 warps was as fast; wider tiles (128-256 channels) were slower backward.
# ptxas (sm_90a, Triton 3.8, bf16 x, width 4) gives the forward 78 registers and the split
# backward's first kernel 255 with a 24-byte spill; faster all the same.
BLOCK_L = 64
BLOCK_D = 32
WARPS = 4
# The backward's form, "split" or "fused" (module docstring); the same results within float32
# rounding. At the tile above the split backward took 0.298 ms, the fused 0.364; in the whole
# Vim-S step at the first tile the two were within noise (895 / 901 img/s).
BACKWARD = "split"


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


@_device_fn
def _weight_sums(x_row, dwp_ptr, dbp_ptr, g, t, c, cm, row, L, d, sx_l, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                 REVERSE: tl.constexpr):
    """This (batch row, time block)'s partial sums of the weight's gradient, sum over t of g[t] *
    x[t_k] for each tap k, and of the bias', sum of g[t]: g the gradient of the pre-activation at
    the tile's times t, into row ``row`` of the (rows, W, d) and (rows, d) partials."""
    for j in tl.static_range(W):
        if REVERSE:
            tj = t + (W - 1 - j)
        else:
            tj = t - (W - 1 - j)
        mj = ((tj >= 0) & (tj < L))[:, None] & cm[None, :]
        xj = tl.load(x_row[None, :] + tj[:, None] * sx_l, mask=mj, other=0.0).to(tl.float32)
        tl.store(dwp_ptr + (row * W + j) * d + c, tl.sum(g * xj, axis=0), mask=cm)
    if HAS_BIAS:
        tl.store(dbp_ptr + row * d + c, tl.sum(g, axis=0), mask=cm)


def _conv_fwd(x_ptr, w_ptr, b_ptr, out_ptr, L, d,
              sx_b, sx_l, sx_d, sw_d, sw_w, so_b, so_l, so_d,
              W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
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
    o = out_ptr + bi * so_b + t[:, None] * so_l + c[None, :] * so_d
    if ACC:   # added to what is there: the other direction's dx (BiConvProjTriton's split backward)
        v += tl.load(o, mask=m, other=0.0).to(tl.float32)
    tl.store(o, v.to(out_ptr.dtype.element_ty), mask=m)


def _conv_bwd(x_ptr, w_ptr, b_ptr, go_ptr, dx_ptr, dwp_ptr, dbp_ptr, L, d, nlb,
              sx_b, sx_l, sx_d, sw_d, sw_w, sg_b, sg_l, sg_d, sdx_b, sdx_l, sdx_d,
              W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
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
            _weight_sums(x_row, dwp_ptr, dbp_ptr, g, u, c, cm, bi * nlb + lb, L, d, sx_l, W, HAS_BIAS, REVERSE)
    mu = (u < L)[:, None] & cm[None, :]
    dxp = dx_ptr + bi * sdx_b + u[:, None] * sdx_l + c[None, :] * sdx_d
    if ACC:   # added to the other direction's dx (BiConvProjTriton)
        dx += tl.load(dxp, mask=mu, other=0.0).to(tl.float32)
    tl.store(dxp, dx.to(dx_ptr.dtype.element_ty), mask=mu)


def _conv_dpre(x_ptr, w_ptr, b_ptr, go_ptr, dp_ptr, dwp_ptr, dbp_ptr, L, d, nlb,
               sx_b, sx_l, sx_d, sw_d, sw_w, sg_b, sg_l, sg_d,
               W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
               HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr):
    """The split backward's first kernel: dpre = dL/d(pre-activation) at this tile's times
    into a contiguous float32 (b, l, d) scratch (zero past the end), and the weight's and
    bias' partial sums of this (batch row, time block)."""
    bi = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    t = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < d
    m = (t < L)[:, None] & cm[None, :]
    x_row = x_ptr + bi * sx_b + c * sx_d
    g = tl.load(go_ptr + bi * sg_b + t[:, None] * sg_l + c[None, :] * sg_d, mask=m, other=0.0).to(tl.float32)
    if SILU:
        bias = _bias(b_ptr, c, cm, BLOCK_D, HAS_BIAS)
        v = _pre(x_row, w_ptr, t, c, cm, L, sx_l, sw_d, sw_w, bias, W, BLOCK_L, BLOCK_D, HAS_BIAS, REVERSE)
        s = 1.0 / (1.0 + tl.exp(-v))
        g = g * s * (1.0 + v * (1.0 - s))
    tl.store(dp_ptr + (bi * L + t[:, None]) * d + c[None, :], g, mask=m)
    _weight_sums(x_row, dwp_ptr, dbp_ptr, g, t, c, cm, bi * nlb + lb, L, d, sx_l, W, HAS_BIAS, REVERSE)


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


def _kernels():
    return jitted(_conv_fwd, _conv_bwd, _conv_dpre)


def _conv(fwd, x, weight, bias, out, silu, reverse, acc=False):
    _launch(fwd, _grid(x), x, weight, bias if bias is not None else x, out, x.shape[1], x.shape[2],
            *x.stride(), *weight.stride(), *out.stride(),
            W=weight.shape[1], BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, HAS_BIAS=bias is not None,
            SILU=bool(silu), REVERSE=bool(reverse), ACC=bool(acc), num_warps=WARPS)


class CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, reverse):
        b, L, d = x.shape
        out = torch.empty(b, L, d, dtype=x.dtype, device=x.device)
        _conv(_kernels()[0], x, weight, bias, out, silu, reverse)
        ctx.save_for_backward(x, weight, bias)
        ctx.cfg = (bool(silu), bool(reverse))
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        return (*_backward(x, weight, bias, *ctx.cfg, dout, ctx.needs_input_grad), None, None)


def _backward(x, weight, bias, silu, reverse, dout, need, dx=None):
    """(dx, dweight, dbias) of the conv for the output gradient ``dout`` (b, l, d); each None
    where ``need`` (the node's needs_input_grad, x first) says so. With ``dx`` given (the other
    direction's, BiConvProjTriton) this conv's input gradient is added to it in the kernel."""
    b, L, d = x.shape
    W = weight.shape[1]
    grid = _grid(x)
    nlb = grid[1]
    f32 = dict(dtype=torch.float32, device=x.device)
    acc = dx is not None
    if dx is None:
        dx = torch.empty(b, L, d, dtype=x.dtype, device=x.device)
    dwp = torch.empty(b * nlb, W, d, **f32)
    dbp = torch.empty(b * nlb, d, **f32) if bias is not None else dwp
    fwd, bwd, dpre = _kernels()
    if BACKWARD == "split":
        dp = torch.empty(b, L, d, **f32)
        _launch(dpre, grid, x, weight, bias if bias is not None else x, dout, dp, dwp, dbp, L, d, nlb,
                *x.stride(), *weight.stride(), *dout.stride(),
                W=W, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, HAS_BIAS=bias is not None, SILU=silu,
                REVERSE=reverse, num_warps=WARPS)
        _conv(fwd, dp, weight, None, dx, False, not reverse, acc)
    elif BACKWARD == "fused":
        _launch(bwd, grid, x, weight, bias if bias is not None else x, dout, dx, dwp, dbp, L, d, nlb,
                *x.stride(), *weight.stride(), *dout.stride(), *dx.stride(),
                W=W, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, HAS_BIAS=bias is not None, SILU=silu,
                REVERSE=reverse, ACC=acc, num_warps=WARPS)
    else:
        raise ValueError(f"conv_triton.BACKWARD must be 'split' or 'fused'; got {BACKWARD!r}")
    dw = fixed_sum(dwp, 0, weight.dtype).t().contiguous() if need[1] else None
    db = fixed_sum(dbp, 0, bias.dtype) if bias is not None and need[2] else None
    return dx if need[0] else None, dw, db


def _proj_fwd(x, weight, bias, proj_w, silu, reverse):
    """One direction's conv output u and x_proj's product of it, with the product's operands
    as its backward needs them: (u, u @ proj_w^T, u_in, w_in). The product runs as ``F.linear``
    under the caller's autocast, as ``x_proj(u)`` did: the same bits."""
    b, L, d = x.shape
    u = torch.empty(b, L, d, dtype=x.dtype, device=x.device)
    _conv(_kernels()[0], x, weight, bias, u, silu, reverse)
    dt = autocast_dtype(x.device.type)
    if dt is None:
        u_in, w_in = u, proj_w
        dbl = F.linear(u_in, w_in)
    else:   # autocast's casts, made here so that the backward has the cast weight; a frozen
        # weight's cast kept on it (svp.ops.kept.kept_cast), where autocast cast it every call
        u_in, w_in = u.to(dt), kept_cast(proj_w, dt)
        with torch.autocast(x.device.type, enabled=False):
            dbl = F.linear(u_in, w_in)
    return u, dbl, u_in, w_in


def _proj_bwd(x, weight, bias, u_in, w_in, proj_dtype, silu, reverse, du, ddbl, need, dx=None):
    """One direction's (dx, dweight, dbias, dproj_w) from the gradients of u and of the product:
    x_proj's input gradient added to u's by the product itself (addmm, beta = 1) where both
    are in the product's dtype, before the conv's backward reads the sum. ``dx`` as in
    _backward."""
    b, L, d = x.shape
    g = du
    if ddbl is not None:
        d2 = ddbl.reshape(-1, ddbl.shape[-1])
        if du is None:
            g = (d2 @ w_in).view(b, L, d).to(x.dtype)
        elif du.dtype == d2.dtype == w_in.dtype and du.is_contiguous():
            g = torch.addmm(du.view(-1, d), d2, w_in).view(b, L, d)
        else:
            g = du + (d2 @ w_in).view(b, L, d).to(du.dtype)
    if g is None:
        g = torch.zeros_like(x)
    dx, dw, db = _backward(x, weight, bias, silu, reverse, g, need, dx)
    dproj = (d2.t() @ u_in.reshape(-1, d)).to(proj_dtype) if need[3] and ddbl is not None else None
    return dx, dw, db, dproj


class CausalConv1dProjTriton(torch.autograd.Function):
    """The conv (+ SiLU) and x_proj's product of its output as one node: (u, u @ proj_w^T).
    The mixer's conv output has two consumers, the scan and x_proj; as separate nodes autograd
    adds their two gradients, a pass over three (b, l, E) tensors and a launch per direction
    and layer. Here x_proj's input gradient is added by its own product to the scan's
    (_proj_bwd) before the conv's backward reads it."""

    @staticmethod
    def forward(ctx, x, weight, bias, proj_w, silu, reverse):
        u, dbl, u_in, w_in = _proj_fwd(x, weight, bias, proj_w, silu, reverse)
        ctx.save_for_backward(x, weight, bias, u_in, w_in)
        ctx.cfg = (proj_w.dtype, bool(silu), bool(reverse))
        ctx.set_materialize_grads(False)   # an unused output's gradient: None, not zeros
        return u, dbl

    @staticmethod
    def backward(ctx, du, ddbl):
        return (*_proj_bwd(*ctx.saved_tensors, *ctx.cfg, du, ddbl, ctx.needs_input_grad), None, None)


class BiConvProjTriton(torch.autograd.Function):
    """Both directions' conv + x_proj (CausalConv1dProjTriton's work) from one x as one node:
    backward, the reverse direction's conv adds its input gradient to the forward direction's
    in the kernel, where autograd added the two in a pass of its own (read two (b, l, E)
    tensors, write one) and a launch a layer. Arguments: x, then each direction's (conv
    weight, conv bias, x_proj weight); returns (u, dbl, u_b, dbl_b)."""

    @staticmethod
    def forward(ctx, x, weight, bias, proj_w, weight_b, bias_b, proj_w_b, silu):
        u, dbl, u_in, w_in = _proj_fwd(x, weight, bias, proj_w, silu, False)
        ub, dblb, ub_in, wb_in = _proj_fwd(x, weight_b, bias_b, proj_w_b, silu, True)
        ctx.save_for_backward(x, weight, bias, u_in, w_in, weight_b, bias_b, ub_in, wb_in)
        ctx.cfg = (proj_w.dtype, proj_w_b.dtype, bool(silu))
        ctx.set_materialize_grads(False)
        return u, dbl, ub, dblb

    @staticmethod
    def backward(ctx, du, ddbl, dub, ddblb):
        x, weight, bias, u_in, w_in, weight_b, bias_b, ub_in, wb_in = ctx.saved_tensors
        pdt, pdt_b, silu = ctx.cfg
        need = ctx.needs_input_grad
        # x's gradient always formed by the first direction (the second adds its own to it)
        dx, dw, db, dp = _proj_bwd(x, weight, bias, u_in, w_in, pdt, silu, False, du, ddbl,
                                   (True,) + need[1:4])
        _, dwb, dbb, dpb = _proj_bwd(x, weight_b, bias_b, ub_in, wb_in, pdt_b, silu, True, dub, ddblb,
                                     (True,) + need[4:7], dx=dx)
        return dx if need[0] else None, dw, db, dp, dwb, dbb, dpb, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = None, reverse: bool = False) -> torch.Tensor:
    """Triton causal depthwise conv1d on (batch, len, dim); the arguments of
    :func:`svp.ops.conv.causal_conv1d_bld` (bias (dim,) only)."""
    _check(x, weight, bias, activation)
    # (time offsets past int32: a contiguous copy; the bias is read at unit stride: review)
    x, bias = _time_safe(x, 1), _vec(bias)
    return CausalConv1dTriton.apply(x, weight, bias, activation is not None, reverse)


def causal_conv1d_proj_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              proj_w: torch.Tensor, activation: str | None = "silu",
                              reverse: bool = False):
    """(conv, conv @ proj_w^T): :func:`causal_conv1d_triton` and a bias-free product of its
    output with ``proj_w`` (n, dim), as one node (CausalConv1dProjTriton)."""
    _check(x, weight, bias, activation)
    if proj_w.dim() != 2 or proj_w.shape[1] != x.shape[-1]:
        raise ValueError(f"expected proj_w (n, {x.shape[-1]}); got {tuple(proj_w.shape)}")
    x, bias = _time_safe(x, 1), _vec(bias)
    return CausalConv1dProjTriton.apply(x, weight, bias, proj_w, activation is not None, reverse)


def bi_conv_proj_triton(x: torch.Tensor, fwd, bwd, activation: str | None = "silu"):
    """Both directions' :func:`causal_conv1d_proj_triton` from one x, the second reversed, as
    one node (BiConvProjTriton): ``fwd`` and ``bwd`` are each direction's (conv weight (dim,
    width), conv bias or None, x_proj weight (n, dim)). Returns (u, dbl, u_b, dbl_b)."""
    for weight, bias, proj_w in (fwd, bwd):
        _check(x, weight, bias, activation)
        if proj_w.dim() != 2 or proj_w.shape[1] != x.shape[-1]:
            raise ValueError(f"expected proj_w (n, {x.shape[-1]}); got {tuple(proj_w.shape)}")
    x = _time_safe(x, 1)
    fwd, bwd = ((w, _vec(b), p) for w, b, p in (fwd, bwd))
    return BiConvProjTriton.apply(x, *fwd, *bwd, activation is not None)
