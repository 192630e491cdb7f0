"""SVP's prompt step as Triton kernels: the GPU's form of
:func:`svp.ops.prompt_cpu.add_silu_prompts_cpu` (same arguments, same results).

    out[t] = h[t] + s1 * silu(a1[t]) + s2 * silu(a2[t])   for every token t != skip,
    out[skip] = h[skip]

a1, a2: the Cross and Inner prompters' pre-activations, formed by the prompters' products on the
whole sequence (paper mode prompts every patch token from itself); s1, s2: the scales alpha,
beta. In PyTorch (the split at the class token, the SiLUs, scales, adds and the join) that is
~15 passes over a (b, l, D) tensor forward and ~20 backward; here the forward reads h, a1, a2 and
writes out, the backward reads the output's gradient, a1, a2 and writes their gradients (h's
gradient is the output's own). A program takes a tile of ROWS tokens x BLOCK_D channels; the
scales' gradients are summed per program and then over programs in float64 in a fixed order: no
atomics, the same bits on every run. Arithmetic in float32; out in h's dtype, each gradient in
its tensor's.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from .scan_triton import DTYPES, _device_fn, _launch, check_tensors, jitted

# Whether SVP's paper-mode prompt step runs through these kernels where the scan runs on the
# 'triton' backend (svp.peft.svp's _triton_prompts); False gives the PyTorch form back.
ENABLED = True
# 16 tokens x 128 channels a program at 8 warps, 8 values a thread (not tuned on a GPU); ptxas
# (sm_90a, bf16 stream) reports 58 registers forward and 64 backward, no spills (at 4 warps
# 108 and 136)
ROWS = 16
BLOCK_D = 128
WARPS = 8


@_device_fn
def _tile(M, L, d, skip, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's row block, offsets into (M, d) rows, the tile's mask and the mask of the
    rows that get a prompt (all but each sample's token ``skip``)."""
    pr = tl.program_id(0)
    rows = pr * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < d
    m = (rows < M)[:, None] & cm[None, :]
    pm = m & ((rows % L) != skip)[:, None]
    return pr, cols, cm, rows.to(tl.int64)[:, None] * d + cols[None, :], m, pm


def _prompt_fwd(h_ptr, a1_ptr, s1_ptr, a2_ptr, s2_ptr, out_ptr, M, L, d, skip,
                HAS1: tl.constexpr, HAS2: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pr, cols, cm, off, m, pm = _tile(M, L, d, skip, ROWS, BLOCK_D)
    x = tl.load(h_ptr + off, mask=m, other=0.0).to(tl.float32)
    p = tl.zeros((ROWS, BLOCK_D), tl.float32)
    if HAS1:
        a = tl.load(a1_ptr + off, mask=pm, other=0.0).to(tl.float32)
        s = tl.load(s1_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        p += s[None, :] * (a / (1.0 + tl.exp(-a)))
    if HAS2:
        a = tl.load(a2_ptr + off, mask=pm, other=0.0).to(tl.float32)
        s = tl.load(s2_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        p += s[None, :] * (a / (1.0 + tl.exp(-a)))
    tl.store(out_ptr + off, tl.where(pm, x + p, x).to(out_ptr.dtype.element_ty), mask=m)


@_device_fn
def _silu_grads(g, a_ptr, s_ptr, da_ptr, dsp_ptr, pr, cols, cm, off, m, pm, d):
    """da = g * s * silu'(a) (0 where no prompt), and this program's sums of g * silu(a)."""
    a = tl.load(a_ptr + off, mask=pm, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    sg = 1.0 / (1.0 + tl.exp(-a))
    tl.store(da_ptr + off, (g * s[None, :] * sg * (1.0 + a * (1.0 - sg))).to(da_ptr.dtype.element_ty), mask=m)
    tl.store(dsp_ptr + pr.to(tl.int64) * d + cols, tl.sum(g * a * sg, axis=0), mask=cm)


def _prompt_bwd(g_ptr, a1_ptr, s1_ptr, a2_ptr, s2_ptr, da1_ptr, da2_ptr, ds1p_ptr, ds2p_ptr, M, L, d, skip,
                HAS1: tl.constexpr, HAS2: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pr, cols, cm, off, m, pm = _tile(M, L, d, skip, ROWS, BLOCK_D)
    g = tl.load(g_ptr + off, mask=pm, other=0.0).to(tl.float32)
    if HAS1:
        _silu_grads(g, a1_ptr, s1_ptr, da1_ptr, ds1p_ptr, pr, cols, cm, off, m, pm, d)
    if HAS2:
        _silu_grads(g, a2_ptr, s2_ptr, da2_ptr, ds2p_ptr, pr, cols, cm, off, m, pm, d)


def _rows(t):
    return t.reshape(-1, t.shape[-1]).contiguous()


class AddSiluPromptsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, a1, s1, a2, s2, skip):
        b, L, d = h.shape
        M = b * L
        h2 = _rows(h)
        a1r, a2r = (_rows(a) if a is not None else h2 for a in (a1, a2))
        out = torch.empty(M, d, dtype=h.dtype, device=h.device)
        fwd, _ = jitted(_prompt_fwd, _prompt_bwd)
        _launch(fwd, (triton.cdiv(M, ROWS), triton.cdiv(d, BLOCK_D)),
                h2, a1r, s1 if s1 is not None else h2, a2r, s2 if s2 is not None else h2, out, M, L, d, skip,
                HAS1=a1 is not None, HAS2=a2 is not None, ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=WARPS)
        ctx.save_for_backward(a1r if a1 is not None else None, s1, a2r if a2 is not None else None, s2)
        ctx.cfg = (b, L, d, skip, h.dtype)
        return out.view(b, L, d)

    @staticmethod
    def backward(ctx, g):
        a1, s1, a2, s2 = ctx.saved_tensors
        b, L, d, skip, hdtype = ctx.cfg
        M = b * L
        g2 = _rows(g)
        nprog = triton.cdiv(M, ROWS)
        f32 = dict(dtype=torch.float32, device=g.device)
        da1 = torch.empty_like(a1) if a1 is not None else None
        da2 = torch.empty_like(a2) if a2 is not None else None
        ds1p = torch.empty(nprog, d, **f32) if a1 is not None else None
        ds2p = torch.empty(nprog, d, **f32) if a2 is not None else None
        _, bwd = jitted(_prompt_fwd, _prompt_bwd)
        some = g2
        _launch(bwd, (nprog, triton.cdiv(d, BLOCK_D)),
                g2, *(t if t is not None else some for t in (a1, s1, a2, s2, da1, da2, ds1p, ds2p)), M, L, d, skip,
                HAS1=a1 is not None, HAS2=a2 is not None, ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=WARPS)

        def scale_grad(p, s):
            return None if p is None else p.sum(0, dtype=torch.float64).to(s.dtype)

        shape = (b, L, d)
        return (g.to(hdtype), None if da1 is None else da1.view(shape), scale_grad(ds1p, s1),
                None if da2 is None else da2.view(shape), scale_grad(ds2p, s2), None)


def add_silu_prompts_triton(h, a1=None, s1=None, a2=None, s2=None, skip=-1):
    """``h + (s1 * silu(a1) + s2 * silu(a2))`` on every token ``t != skip`` of the (b, l, d) tensors
    (token ``skip`` of every sample is ``h``'s and gets no prompt gradient); either (a, s) pair
    may be None, not both. h, a1, a2 in float32, bfloat16 or float16; s1, s2 (d,) float32. The
    result is in h's dtype."""
    if a1 is None and a2 is None:
        raise ValueError("add_silu_prompts_triton needs a1 or a2")
    if (a1 is None) != (s1 is None) or (a2 is None) != (s2 is None):
        raise ValueError("each pre-activation needs its scale")
    if h.dim() != 3:
        raise ValueError(f"expected h (batch, len, dim), got {tuple(h.shape)}")
    for name, t, shape in (("a1", a1, h.shape), ("a2", a2, h.shape), ("s1", s1, h.shape[-1:]),
                           ("s2", s2, h.shape[-1:])):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    check_tensors("the Triton SVP prompt step", (("h", h), ("a1", a1), ("s1", s1), ("a2", a2), ("s2", s2)),
                  dtypes=lambda name: (torch.float32,) if name in ("s1", "s2") else DTYPES)
    return AddSiluPromptsTriton.apply(h, a1, s1, a2, s2, int(skip))
