"""SVP's prompt step as Triton kernels: the GPU's form of
:func:`svp.ops.prompt_cpu.add_silu_prompts_cpu` (same arguments, same results), and of
:func:`svp.ops.prompt_cpu.svp_prompts_cpu`, the step with its prompters' products as one node.

    out[t] = h[t] + s1 * silu(a1[t] + c1) + s2 * silu(a2[t] + c2)   for every token t != skip,
    out[skip] = h[skip]

a1, a2: the Cross and Inner prompters' pre-activations, formed by the prompters' products on the
whole sequence (paper mode prompts every patch token from itself); c1, c2: their biases (in the
node; add_silu_prompts_triton takes the products' outputs as they are); s1, s2: the scales alpha,
beta. In PyTorch (the split at the class token, the SiLUs, scales, adds and the join) that is
~15 passes over a (b, l, D) tensor forward and ~20 backward; here the forward reads h, a1, a2 and
writes out, the backward reads the output's gradient, a1, a2 and writes their gradients (h's
gradient is the output's own, or in the node a copy the products add to). A program takes a
tile of ROWS tokens x BLOCK_D channels; the scales' and biases' gradients are summed per
program and then over programs in float64 (one reduction for all of them): no atomics, the same
bits on every run. Arithmetic in float32; out in h's dtype, each gradient in
its tensor's.
"""
from __future__ import annotations

import torch

import triton
import triton.language as tl

from ..compat import no_autocast
from .args import check_skip
from .kept import constant_zeros, kept_cast
from .matmul_cpu import mm
from .scan_triton import DTYPES, _device_fn, _launch, _vec, check_tensors, jitted

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


@_device_fn
def _preact(a_ptr, c_ptr, off, cols, cm, pm, HAS_C: tl.constexpr):
    """A prompter's pre-activation in float32: its product's output, plus its bias (float32, per
    channel) where SVPPromptsTriton leaves the bias to the kernel."""
    a = tl.load(a_ptr + off, mask=pm, other=0.0).to(tl.float32)
    if HAS_C:
        a += tl.load(c_ptr + cols, mask=cm, other=0.0)[None, :]
    return a


def _prompt_fwd(h_ptr, a1_ptr, c1_ptr, s1_ptr, a2_ptr, c2_ptr, s2_ptr, out_ptr, M, L, d, skip,
                HAS1: tl.constexpr, HAS2: tl.constexpr, HAS_C: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr):
    pr, cols, cm, off, m, pm = _tile(M, L, d, skip, ROWS, BLOCK_D)
    x = tl.load(h_ptr + off, mask=m, other=0.0).to(tl.float32)
    p = tl.zeros((ROWS, BLOCK_D), tl.float32)
    if HAS1:
        a = _preact(a1_ptr, c1_ptr, off, cols, cm, pm, HAS_C)
        s = tl.load(s1_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        p += s[None, :] * (a / (1.0 + tl.exp(-a)))
    if HAS2:
        a = _preact(a2_ptr, c2_ptr, off, cols, cm, pm, HAS_C)
        s = tl.load(s2_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        p += s[None, :] * (a / (1.0 + tl.exp(-a)))
    tl.store(out_ptr + off, tl.where(pm, x + p, x).to(out_ptr.dtype.element_ty), mask=m)


@_device_fn
def _silu_grads(g, a_ptr, c_ptr, s_ptr, da_ptr, P_ptr, k, nprog, pr, cols, cm, off, m, pm, d,
                HAS_C: tl.constexpr, NEED_B: tl.constexpr):
    """da = g * s * silu'(a) (0 where no prompt); this program's sums of g * silu(a) into row
    (k, pr) of the partial sums P (K, nprog, d), and with NEED_B those of da (the bias's
    gradient, before da's rounding to its dtype) into row (k + 1, pr)."""
    a = _preact(a_ptr, c_ptr, off, cols, cm, pm, HAS_C)
    s = tl.load(s_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    sg = 1.0 / (1.0 + tl.exp(-a))
    da = g * s[None, :] * sg * (1.0 + a * (1.0 - sg))
    tl.store(da_ptr + off, da.to(da_ptr.dtype.element_ty), mask=m)
    row = (k * nprog + pr).to(tl.int64) * d
    tl.store(P_ptr + row + cols, tl.sum(g * a * sg, axis=0), mask=cm)
    if NEED_B:
        tl.store(P_ptr + row + nprog * d + cols, tl.sum(da, axis=0), mask=cm)


def _prompt_bwd(g_ptr, a1_ptr, c1_ptr, s1_ptr, a2_ptr, c2_ptr, s2_ptr, da1_ptr, da2_ptr, P_ptr, dh_ptr,
                M, L, d, skip, nprog, K2,
                HAS1: tl.constexpr, HAS2: tl.constexpr, HAS_C: tl.constexpr, NEED_B: tl.constexpr,
                NEED_H: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # K2: the second term's first row in P (after the first term's one or two)
    pr, cols, cm, off, m, pm = _tile(M, L, d, skip, ROWS, BLOCK_D)
    if NEED_H:   # h's gradient is the incoming one, in a buffer the prompters' products add to
        gh = tl.load(g_ptr + off, mask=m, other=0.0)
        tl.store(dh_ptr + off, gh.to(dh_ptr.dtype.element_ty), mask=m)
        g = tl.where(pm, gh.to(tl.float32), 0.0)
    else:
        g = tl.load(g_ptr + off, mask=pm, other=0.0).to(tl.float32)
    if HAS1:
        _silu_grads(g, a1_ptr, c1_ptr, s1_ptr, da1_ptr, P_ptr, 0, nprog, pr, cols, cm, off, m, pm, d, HAS_C, NEED_B)
    if HAS2:
        _silu_grads(g, a2_ptr, c2_ptr, s2_ptr, da2_ptr, P_ptr, K2, nprog, pr, cols, cm, off, m, pm, d, HAS_C,
                    NEED_B)


def _rows(t):
    return t.reshape(-1, t.shape[-1]).contiguous()


def _step_fwd(h2, b, L, skip, a1, c1, s1, a2, c2, s2):
    """The step's kernel forward over the (M, d) rows h2: out in h2's dtype (a1, a2: (M, d) or
    None; c1, c2: float32 biases or None, all None or none)."""
    M, d = h2.shape
    out = torch.empty_like(h2)
    fwd, _ = jitted(_prompt_fwd, _prompt_bwd)
    _launch(fwd, (triton.cdiv(M, ROWS), triton.cdiv(d, BLOCK_D)),
            h2, *(t if t is not None else h2 for t in (a1, c1, s1, a2, c2, s2)), out, M, L, d, skip,
            HAS1=a1 is not None, HAS2=a2 is not None, HAS_C=c1 is not None or c2 is not None, ROWS=ROWS,
            BLOCK_D=BLOCK_D, num_warps=WARPS)
    return out


def _step_bwd(g2, L, skip, a1, c1, s1, a2, c2, s2, need_b, dh_dtype):
    """The step's kernel backward: (da1, da2, (ds1, dc1, ds2, dc2), dh). The float32 (d,)
    gradients of the scales and, with need_b, the biases (None: a term absent, or a bias without
    need_b), each reduced over the programs in float64, all in one reduction; dh: the incoming
    gradient written into a fresh (M, d) buffer of ``dh_dtype`` for the prompters' products to add
    to (None: not written)."""
    M, d = g2.shape
    nprog = triton.cdiv(M, ROWS)
    per = 2 if need_b else 1
    K = per * ((a1 is not None) + (a2 is not None))
    P = torch.empty(K, nprog, d, dtype=torch.float32, device=g2.device)
    da1 = torch.empty_like(a1) if a1 is not None else None
    da2 = torch.empty_like(a2) if a2 is not None else None
    dh = torch.empty(M, d, dtype=dh_dtype, device=g2.device) if dh_dtype is not None else None
    _, bwd = jitted(_prompt_fwd, _prompt_bwd)
    _launch(bwd, (nprog, triton.cdiv(d, BLOCK_D)),
            g2, *(t if t is not None else g2 for t in (a1, c1, s1, a2, c2, s2, da1, da2)), P,
            dh if dh is not None else g2, M, L, d, skip, nprog, per if a1 is not None else 0,
            HAS1=a1 is not None, HAS2=a2 is not None, HAS_C=c1 is not None or c2 is not None, NEED_B=need_b,
            NEED_H=dh is not None, ROWS=ROWS, BLOCK_D=BLOCK_D, num_warps=WARPS)
    # (torch's reduction, not scan_triton.fixed_sum: a long sum over few columns, which a
    # fixed_sum does in three launches of small grids; docs/benchmarks.md, "GPU, second run")
    sums = iter(P.sum(1, dtype=torch.float64).to(torch.float32))
    per_term = [(next(sums), next(sums) if need_b else None) if a is not None else (None, None) for a in (a1, a2)]
    return da1, da2, (*per_term[0], *per_term[1]), dh


class AddSiluPromptsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, a1, s1, a2, s2, skip):
        b, L, d = h.shape
        h2 = _rows(h)
        a1r, a2r = (_rows(a) if a is not None else None for a in (a1, a2))
        out = _step_fwd(h2, b, L, skip, a1r, None, s1, a2r, None, s2)
        ctx.save_for_backward(a1r, s1, a2r, s2)
        ctx.cfg = (b, L, d, skip, h.dtype)
        return out.view(b, L, d)

    @staticmethod
    def backward(ctx, g):
        a1, s1, a2, s2 = ctx.saved_tensors
        b, L, d, skip, hdtype = ctx.cfg
        da1, da2, (ds1, _, ds2, _), _ = _step_bwd(_rows(g), L, skip, a1, None, s1, a2, None, s2, False, None)
        shape = (b, L, d)
        return (g.to(hdtype), None if da1 is None else da1.view(shape), ds1,
                None if da2 is None else da2.view(shape), ds2, None)


def _svp_prompts_fwd(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta):
    """SVPPromptsTriton's forward: (out, the tensors its backward reads, its cfg). Without a
    gradient to record it runs alone, not as a node."""
    b, L, d = h.shape
    h2 = _rows(h)
    with no_autocast(h.device.type):   # (the dtypes are explicit here)
        H = h2 if h2.dtype == dtype else h2.to(dtype)   # cast once for both prompters' products
        wcl, w0l, w1l = (None if w is None else kept_cast(w, dtype) for w in (wc, w0, w1))
        a1 = z0 = a2 = None
        if wc is not None:
            a1 = mm(H, wcl.t())
        if w0 is not None:
            z0 = mm(H, w0l.t()) if b0 is None else torch.addmm(b0.to(dtype), H, w0l.t())
            a2 = mm(z0, w1l.t())
        c1 = c2 = None   # the biases the kernel adds: none, or one for each prompter present
        if bc is not None or b1 is not None:
            zero = constant_zeros((d,), device=h.device)
            c1 = None if wc is None else (zero if bc is None else bc)
            c2 = None if w0 is None else (zero if b1 is None else b1)
        out = _step_fwd(h2, b, L, skip, a1, c1, alpha, a2, c2, beta)
    saved = (H, a1, a2, z0, c1, c2, alpha, beta, wcl, w0l, w1l)
    return out.view(b, L, d), saved, (int(skip), h.dtype, (b, L, d), b0 is not None)


class SVPPromptsTriton(torch.autograd.Function):
    """SVP's paper-mode prompt step on a GPU as one node with its prompters' products, the
    GPU's form of svp.ops.prompt_cpu.SVPPromptsCPU. Left to autograd (the prompters' modules and
    AddSiluPromptsTriton), each Linear's bias gradient was a pass of its own over its output's
    gradient, autocast cast the stream once per prompter, and the stream's gradient was the sum
    of three (the incoming one, and each prompter's input gradient) in two more passes over
    (b, l, d). Here the stream is cast once; the Cross and Inner-up biases are added to the
    pre-activations in the kernel (float32) and their gradients summed there with the scales'
    (the Inner-down bias stays in its product: its gradient is a sum over the narrow (M, r)
    rows); and the kernel writes the incoming gradient into the buffer to which the two
    prompters' input-gradient products add (beta = 1), where the products' dtype is the
    stream's. Otherwise (float32 stream, bfloat16 products: a GPU autocast's first layer) the two
    products' sum, in their dtype, is added to the incoming gradient in one pass. Weight gradients
    are formed in the products' dtype and returned in float32, as autocast's casts give them, each
    use's on its own (a Cross prompter shared by S layers: summed by autograd in float32, where
    autocast's weight cache summed them in bfloat16; docs/benchmarks.md, "The Triton kernels as a
    launch compiles them").

    Inputs: h, skip, the products' dtype, then (W, b, alpha) of the Cross prompter and (W0, b0,
    W1, b1, beta) of the Inner one, each group all None when absent (biases may be None)."""

    @staticmethod
    def forward(ctx, h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta):
        out, saved, ctx.cfg = _svp_prompts_fwd(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, g):
        H, a1, a2, z0, c1, c2, alpha, beta, wc, w0, w1 = ctx.saved_tensors
        skip, hdtype, (b, L, d), has_b0 = ctx.cfg
        need = ctx.needs_input_grad   # (h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)
        use1, use2 = a1 is not None, a2 is not None
        need_h = bool(need[0])
        need_b = bool((use1 and need[4]) or (use2 and need[9]))
        in_place = need_h and H.dtype == hdtype   # the products add to the kernel's copy of g
        da1, da2, (ds1, dc1, ds2, dc2), dh = _step_bwd(_rows(g), L, skip, a1, c1, alpha, a2, c2, beta, need_b,
                                                       hdtype if in_place else None)
        grads = [None] * 11
        grads[4], grads[5] = (dc1 if need[4] else None), (ds1 if need[5] else None)
        grads[9], grads[10] = (dc2 if need[9] else None), (ds2 if need[10] else None)
        parts = []   # h's gradient is g plus x w over these (x, w)
        with no_autocast(H.device.type):
            if use1:
                grads[3] = mm(da1.t(), H).float() if need[3] else None
                if need_h:
                    parts.append((da1, wc))
            if use2:
                grads[8] = mm(da2.t(), z0).float() if need[8] else None
                if need_h or need[6] or need[7]:
                    dz0 = mm(da2, w1)
                    grads[6] = mm(dz0.t(), H).float() if need[6] else None
                    grads[7] = dz0.sum(0, dtype=torch.float32) if has_b0 and need[7] else None
                    if need_h:
                        parts.append((dz0, w0))
            if in_place:
                for x, w in parts:
                    dh.addmm_(x, w)
            elif need_h:
                low = mm(*parts[0])
                for x, w in parts[1:]:
                    low.addmm_(x, w)
                # (torch.add promotes: one pass for a float32 g, the case this branch is for)
                dh = torch.add(_rows(g), low).to(hdtype)
        grads[0] = None if not need_h else dh.view(b, L, d)
        return tuple(grads)


def svp_prompts(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta):
    """SVPPromptsTriton's step on arguments already checked (SVP's model path checks them as it
    picks this path, svp.peft.svp._triton_prompts): a node where a gradient is recorded, else
    the forward alone."""
    if torch.is_grad_enabled():
        return SVPPromptsTriton.apply(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)
    return _svp_prompts_fwd(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)[0]


def svp_prompts_triton(h, skip, cross=None, inner=None, dtype=None):
    """SVP's paper-mode prompt step, ``h + alpha * silu(Wc h + bc) + beta * silu(W1 (W0 h + b0) + b1)``
    on every row but ``skip`` of the (b, l, d) tensor h, with its gradients (SVPPromptsTriton):
    the GPU's form of svp.ops.prompt_cpu.svp_prompts_cpu. ``cross``: (Wc (d, d), bc, alpha) or
    None; ``inner``: (W0 (r, d), b0, W1 (d, r), b1, beta) or None, not both None; biases may be
    None. The parameters float32; h float32, bfloat16 or float16; ``dtype``: the products'
    (default h's; under autocast, autocast's). The result is in h's dtype."""
    if cross is None and inner is None:
        raise ValueError("svp_prompts_triton needs the Cross or the Inner prompter")
    if h.dim() != 3:
        raise ValueError(f"expected h (batch, len, dim), got {tuple(h.shape)}")
    dtype = dtype or h.dtype
    if dtype not in DTYPES:
        raise ValueError(f"svp_prompts_triton runs its products in float32, bfloat16 or float16, not {dtype}")
    d = h.shape[-1]
    wc, bc, alpha = cross if cross is not None else (None, None, None)
    w0, b0, w1, b1, beta = inner if inner is not None else (None,) * 5
    r = None if w0 is None else w0.shape[0]
    named = (("h", h), ("Wc", wc), ("bc", bc), ("alpha", alpha), ("W0", w0), ("b0", b0), ("W1", w1), ("b1", b1),
             ("beta", beta))
    for (name, t), shape in zip(named, (h.shape, (d, d), (d,), (d,), (r, d), (r,), (d, r), (d,), (d,))):
        if t is None:
            if name in ("Wc", "alpha") and cross is not None or name in ("W0", "W1", "beta") and inner is not None:
                raise ValueError(f"svp_prompts_triton: {name} is None")
            continue
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"svp_prompts_triton: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    check_tensors("the Triton SVP prompt step", named,
                  dtypes=lambda name: DTYPES if name == "h" else (torch.float32,))
    # (the kernels read the parameters at unit stride: strided ones were read wrong: review)
    wc, bc, alpha, w0, b0, w1, b1, beta = map(_vec, (wc, bc, alpha, w0, b0, w1, b1, beta))
    return svp_prompts(h, check_skip(skip, h.shape[1], "svp_prompts_triton"), dtype, wc, bc, alpha, w0, b0, w1,
                       b1, beta)


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
    s1, s2 = _vec(s1), _vec(s2)   # (read at unit stride)
    return AddSiluPromptsTriton.apply(h, a1, s1, a2, s2, check_skip(skip, h.shape[1], "add_silu_prompts_triton"))
