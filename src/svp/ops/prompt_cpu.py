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

Two nodes use the kernels: ``add_silu_prompts_cpu`` takes the pre-activations (float32, or the
prompters' bfloat16 products under CPU autocast), and ``svp_prompts_cpu`` is SVP's whole step, the
prompters' products included (SVPPromptsCPU, the products in float32 or bfloat16): the kernels
then also add per-channel biases to the pre-activations, sum the biases' gradients like the
scales', and write h's gradient into a buffer the prompters' input-gradient products add to.
"""
from __future__ import annotations

import numpy as np
import torch

from ..compat import no_cpu_autocast
from . import scan_cpu  # noqa: F401  (numba cache dir, threading layer, LLVM options)
from .args import check_skip
from .kept import constant_zeros
from .matmul_cpu import addmm_, mm
from .scan_cpu import _FM_SAFE, _ONE, _call_task, _dynamic_tasks, _nd, _sigmoid, _task_sig_is, \
    _wide_vectors, guard_caches, run_tasks
from .simd import as_f32, to_elem
from numba import njit, prange, types

TB = 16  # tokens per task (a task owns whole rows)


# Each kernel's task (TB rows of one sample) is a function the one-line prange calls through its
# address (scan_cpu.run_tasks; see _call_task there), as the scan's and the conv's are: numba
# then compiles the task once, where a prange body is typed twice, its IR deep-copied in the
# parfor passes and its code optimised again inside the kernel; and the tasks call the sigmoid
# as a function LLVM inlines (scan_cpu._sigmoid). Under numba 0.58 (the floor) the two
# kernels, float32 and bfloat16 each, took 51 s to compile with the bodies inline, 39 s as tasks,
# 11 s as tasks calling it; under 0.68 12 s inline, 7 s so. Same bits; the forward
# 1-5% faster, the backward up to 6% slower in float32 and 10% in bfloat16 until the tasks took
# `_svp_noalias` (scan_cpu: LLVM `noalias` on their array arguments, which the prange bodies had
# from numba; docs/benchmarks.md, thirty-third round). Their arrays never overlap where written:
# every output (out; da1, da2, the four partial sums, dh) is a fresh tensor of its own; the
# arguments that may share memory are read only (the zero vector standing for absent biases and
# scales) or never touched (an absent term's stand-ins; dh and g without need_h).
@njit(cache=True, error_model="numpy", fastmath=_FM_SAFE, _svp_noalias=True)
def _fwd_task(task, h, a1, c1, s1, a2, c2, s2, use1, use2, skip, out):
    _wide_vectors()
    b, L, d = h.shape
    ntb = (L + TB - 1) // TB
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
                u = as_f32(x1[c]) + c1[c]
                v = as_f32(x2[c]) + c2[c]
                o[c] = hr[c] + (s1[c] * (u * _sigmoid(u)) + s2[c] * (v * _sigmoid(v)))
        elif use1:
            x1 = a1[bi, t]
            for c in range(d):
                u = as_f32(x1[c]) + c1[c]
                o[c] = hr[c] + s1[c] * (u * _sigmoid(u))
        else:
            x2 = a2[bi, t]
            for c in range(d):
                v = as_f32(x2[c]) + c2[c]
                o[c] = hr[c] + s2[c] * (v * _sigmoid(v))


@njit(parallel=True, cache=True, error_model="numpy")
def _prompt_fwd(taddr, thash, h, a1, c1, s1, a2, c2, s2, use1, use2, skip, out):
    args = (h, a1, c1, s1, a2, c2, s2, use1, use2, skip, out)
    if not _task_sig_is(thash, np.int64(0), args):
        return False
    ntb = (h.shape[1] + TB - 1) // TB
    for task in prange(h.shape[0] * ntb):
        _call_task(taddr, np.int64(task), args)
    return True


@njit(fastmath=_FM_SAFE, error_model="numpy", _svp_noalias=True)
def _rows_bwd(g, x, cb, s, need_s, da, ds, db, bi, t0, t1, skip):
    """One prompt term over rows t0..t1-1 of sample bi: da = g * s * silu'(x + cb);
    ds += g * silu(x + cb); db += da (before any rounding to bfloat16); row ``skip`` gets da = 0
    (zero bits in float32 and bfloat16 alike). One loop per row: the sigmoid once per element.
    ds and db are the task's float32 partials (a float64 one here took as long as the rest of the
    kernel). x and da may be bfloat16 (uint16 bits: svp.ops.simd.as_f32 / to_elem).
    A call per task and term, not inlined into the kernel: inlined (per row, at two sites) it
    made numba 0.58 (the floor) compile each backward variant in ~36 s instead of ~8.
    `_svp_noalias` (see _fwd_task): da is a fresh tensor, ds and db disjoint rows of the task's
    own sums, indexed element by element here (no view of them, so their shared meminfo is not
    touched); without it the backward ran up to 1.1x the time (docs/benchmarks.md, thirty-third round)."""
    _wide_vectors()   # (a function attribute: this function's own loops, see scan_cpu)
    d = g.shape[2]
    for t in range(t0, t1):
        dr = da[bi, t]
        if t == skip:
            for c in range(d):
                dr[c] = 0
            continue
        gr = g[bi, t]
        xr = x[bi, t]
        if need_s:
            for c in range(d):
                u = as_f32(xr[c]) + cb[c]
                sg = _sigmoid(u)
                gc = gr[c]
                v = (gc * s[c]) * (sg * (_ONE + u * (_ONE - sg)))
                dr[c] = to_elem(v, dr)
                ds[c] += gc * (u * sg)
                db[c] += v
        else:
            for c in range(d):
                u = as_f32(xr[c]) + cb[c]
                sg = _sigmoid(u)
                v = (gr[c] * s[c]) * (sg * (_ONE + u * (_ONE - sg)))
                dr[c] = to_elem(v, dr)
                db[c] += v


@njit
def _put_sums(p, v):
    for c in range(v.shape[0]):
        p[c] = v[c]


@njit(cache=True, error_model="numpy", fastmath=_FM_SAFE, _svp_noalias=True)
def _bwd_task(task, g, a1, c1, s1, a2, c2, s2, use1, use2, skip, need_s1, need_s2, need_b, need_h, da1, da2, ds1p,
              ds2p, db1p, db2p, dh):
    _wide_vectors()
    b, L, d = g.shape
    ntb = (L + TB - 1) // TB
    bi = task // ntb
    t0 = (task - bi * ntb) * TB
    t1 = min(L, t0 + TB)
    if need_h:   # the stream's gradient, into a buffer the prompters' products then add to
        for t in range(t0, t1):
            gr = g[bi, t]
            o = dh[bi, t]
            for c in range(d):
                o[c] = gr[c]
    # the scales' and biases' sums: float32 over the task's (at most TB) rows, then float64
    # across tasks
    sums = np.zeros((4, d), np.float32)
    if use1:
        _rows_bwd(g, a1, c1, s1, need_s1, da1, sums[0], sums[1], bi, t0, t1, skip)
    if use2:
        _rows_bwd(g, a2, c2, s2, need_s2, da2, sums[2], sums[3], bi, t0, t1, skip)
    if need_s1:
        _put_sums(ds1p[task], sums[0])
    if need_b and use1:
        _put_sums(db1p[task], sums[1])
    if need_s2:
        _put_sums(ds2p[task], sums[2])
    if need_b and use2:
        _put_sums(db2p[task], sums[3])


@njit(parallel=True, cache=True, error_model="numpy")
def _prompt_bwd(taddr, thash, g, a1, c1, s1, a2, c2, s2, use1, use2, skip, need_s1, need_s2, need_b, need_h, da1,
                da2, ds1p, ds2p, db1p, db2p, dh):
    args = (g, a1, c1, s1, a2, c2, s2, use1, use2, skip, need_s1, need_s2, need_b, need_h, da1, da2, ds1p, ds2p,
            db1p, db2p, dh)
    if not _task_sig_is(thash, np.int64(0), args):
        return False
    ntb = (g.shape[1] + TB - 1) // TB
    for task in prange(g.shape[0] * ntb):
        _call_task(taddr, np.int64(task), args)
    return True


def _c(t):
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


def _step_fwd(hc, x1, c1, v1, x2, c2, v2, use1, use2, skip):
    """The kernel's forward on contiguous (b, l, d) h and pre-activations (an absent one: any
    stand-in of the other's dtype) and (d,) biases and scales; returns the float32 output."""
    out = torch.empty(hc.shape, dtype=torch.float32)
    with _dynamic_tasks():
        run_tasks(_prompt_fwd, _fwd_task, types.int64, hc.numpy(), _nd(x1), c1.numpy(), v1.numpy(), _nd(x2),
                  c2.numpy(), v2.numpy(), use1, use2, int(skip), out.numpy())
    return out


def _step_bwd(g, x1, c1, v1, x2, c2, v2, use1, use2, skip, need_s1, need_s2, need_b, need_h):
    """The kernel's backward: (da1, da2, ds1, ds2, db1, db2, dh), the sums float32 (None where
    not asked for), dh a fresh copy of g when ``need_h`` (else None)."""
    g = _c(g)
    b, L, d = g.shape
    ntask = b * ((L + TB - 1) // TB)
    da1 = torch.empty(b, L, d, dtype=x1.dtype) if use1 else x1
    da2 = torch.empty(b, L, d, dtype=x2.dtype) if use2 else x2
    # per-task partial sums, float64 across tasks (left unwritten when not asked for)
    ds1p, ds2p, db1p, db2p = (torch.empty(ntask if need else 1, d, dtype=torch.float64)
                              for need in (need_s1, need_s2, need_b and use1, need_b and use2))
    dh = torch.empty(b, L, d, dtype=torch.float32) if need_h else g
    with _dynamic_tasks():
        run_tasks(_prompt_bwd, _bwd_task, types.int64, g.numpy(), _nd(x1), c1.numpy(), v1.numpy(), _nd(x2),
                  c2.numpy(), v2.numpy(), use1, use2, int(skip), need_s1, need_s2, need_b, need_h, _nd(da1), _nd(da2),
                  ds1p.numpy(), ds2p.numpy(), db1p.numpy(), db2p.numpy(), dh.numpy())
    total = lambda p, need: p.sum(0).to(torch.float32) if need else None  # noqa: E731
    return (da1 if use1 else None, da2 if use2 else None, total(ds1p, need_s1), total(ds2p, need_s2),
            total(db1p, need_b and use1), total(db2p, need_b and use2), dh if need_h else None)


class AddSiluPromptsCPU(torch.autograd.Function):
    """a1 and a2 may be bfloat16 (the prompters' products under CPU autocast): read as they are,
    and their gradients written in bfloat16, the bits of casting them to float32 first."""
    @staticmethod
    def forward(ctx, h, a1, s1, a2, s2, skip):
        use1, use2 = a1 is not None, a2 is not None
        hc = _c(h)
        d = hc.shape[-1]
        # an absent pre-activation's stand-in has the other's dtype: one kernel type per dtype
        dummy = constant_zeros((1, 1, d), (a1 if use1 else a2).dtype)
        x1 = _c(a1) if use1 else dummy
        x2 = _c(a2) if use2 else dummy
        # an absent scale; and the biases (the products' outputs are the pre-activations)
        zero = constant_zeros((d,), hc.dtype)
        v1 = _c(s1) if use1 else zero
        v2 = _c(s2) if use2 else zero
        out = _step_fwd(hc, x1, zero, v1, x2, zero, v2, use1, use2, skip)
        ctx.save_for_backward(x1, v1, x2, v2, zero)
        ctx.cfg = (use1, use2, int(skip))
        return out

    @staticmethod
    def backward(ctx, g):
        x1, v1, x2, v2, zero = ctx.saved_tensors
        use1, use2, skip = ctx.cfg
        need = ctx.needs_input_grad
        need_s1, need_s2 = bool(use1 and need[2]), bool(use2 and need[4])
        da1, da2, ds1, ds2, _, _, _ = _step_bwd(g, x1, zero, v1, x2, zero, v2, use1, use2, skip, need_s1,
                                                need_s2, False, False)
        return (g if need[0] else None, da1 if (use1 and need[1]) else None, ds1,
                da2 if (use2 and need[3]) else None, ds2, None)


def _svp_prompts_fwd(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta):
    """SVPPromptsCPU's forward: (out, the tensors its backward reads, its cfg). Without a
    gradient to record (svp_prompts_cpu under no_grad) it runs alone, not as a node."""
    use1, use2 = wc is not None, w0 is not None
    hc = _c(h)
    b, L, d = hc.shape
    zero = constant_zeros((d,))
    vec = lambda t: zero if t is None else _c(t)  # noqa: E731
    low = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    with no_cpu_autocast():   # (the dtypes are explicit here)
        H = hc.view(b * L, d)
        H = H if dtype == torch.float32 else H.to(dtype)
        wcl, w0l, w1l = low(wc), low(w0), low(w1)
        a1 = a2 = z0 = dummy = constant_zeros((1, 1, d), dtype)
        if use1:
            a1 = mm(H, wcl.t()).view(b, L, d)
        if use2:
            z0 = mm(H, w0l.t())
            a2 = mm(z0, w1l.t()).view(b, L, d)
        c1 = vec(bc)
        c2 = vec(b1)
        if b0 is not None:   # W1 b0 + b1 in float32 (elementwise and a sum: BLAS's gemv took ~0.1 ms in a step)
            c2 = (w1 * b0).sum(1) + c2
    s1, s2 = vec(alpha), vec(beta)
    out = _step_fwd(hc, a1, c1, s1, a2, c2, s2, use1, use2, skip)
    saved = (H, a1, a2, z0, c1, c2, s1, s2, *(dummy if t is None else t for t in (wcl, w0l, w1l, w1, b0)))
    return out, saved, (use1, use2, int(skip), b0 is not None, (b, L, d))


class SVPPromptsCPU(torch.autograd.Function):
    """SVP's whole paper-mode prompt step in one node: the prompters' products and the fused
    step above. What it saves against the modules' path (a Vim-Tiny batch-8 step's profile,
    docs/benchmarks.md): the biases go into the kernel instead of each product (a product with
    a bias first copies the broadcast bias into its output, ~0.2 ms per (b, l, d) output in a
    step), their gradients are summed by the kernel from the values it forms (not by another
    pass over each gradient), and the stream's gradient is formed once: the kernel writes the
    incoming gradient into a buffer to which the two prompters' input gradients are added, in
    float32 by their products themselves (beta = 1), instead of autograd adding three
    gradients of the stream in two more passes.

    The Inner prompter's down bias b0 is folded: Up(Down(x)) = W1 (W0 x) + (W1 b0 + b1), so the
    down product has no bias either; W1's gradient then gets the outer product of the up
    bias's gradient with b0, and b0's is W1^T times it. Same values as the modules' path up to
    rounding (tests/test_prompt_cpu.py). Inputs: h, skip, the products' dtype (float32, or
    bfloat16 under CPU autocast: h and the weights cast once, the products' outputs read by the
    kernel as they are and their gradients written in bfloat16, the biases, scales, sums and the
    stream's gradient float32), then (W, b, alpha) of the Cross prompter and (W0, b0, W1, b1,
    beta) of the Inner one, each group all None when absent."""

    @staticmethod
    def forward(ctx, h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta):
        out, saved, ctx.cfg = _svp_prompts_fwd(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, g):
        H, a1, a2, z0, c1, c2, s1, s2, wc, w0, w1, w1_32, b0 = ctx.saved_tensors
        use1, use2, skip, has_b0, (b, L, d) = ctx.cfg
        need = ctx.needs_input_grad   # (h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)
        need_h = bool(need[0])
        need_b = bool((use1 and need[4]) or (use2 and (need[7] or need[8] or need[9])))
        da1, da2, ds1, ds2, db1, db2, dh = _step_bwd(g, a1, c1, s1, a2, c2, s2, use1, use2, skip,
                                                     bool(use1 and need[5]), bool(use2 and need[10]), need_b, need_h)
        f32 = H.dtype == torch.float32
        dH = dh.view(b * L, d) if need_h else None
        parts = []   # h's gradient is the kernel's dh plus x w over these (x, w)
        grads = [None] * 11
        grads[0], grads[5], grads[10] = dh, ds1, ds2
        with no_cpu_autocast():
            if use1:
                da1 = da1.view(b * L, d)
                grads[3] = mm(da1.t(), H).float() if need[3] else None
                grads[4] = db1 if need[4] else None
                if need_h:
                    parts.append((da1, wc))
            if use2:
                da2 = da2.view(b * L, d)
                if need[8]:
                    grads[8] = mm(da2.t(), z0).float()
                    if has_b0:
                        grads[8].add_(torch.outer(db2, b0))
                grads[9] = db2 if need[9] else None
                grads[7] = (w1_32 * db2[:, None]).sum(0) if need[7] else None   # W1^T db2 (see forward)
                if need_h or need[6]:
                    dz0 = mm(da2, w1)
                    grads[6] = mm(dz0.t(), H).float() if need[6] else None
                    if need_h:
                        parts.append((dz0, w0))
            if parts and f32:   # in the products themselves (beta = 1; on oneDNN an add after each)
                for x, w in parts:
                    addmm_(dH, x, w)
            elif parts:   # bfloat16: summed in bfloat16 first, as autograd sums a bfloat16 input's gradients
                low = mm(*parts[0])
                for x, w in parts[1:]:
                    addmm_(low, x, w)
                dH.add_(low)   # (in place: torch.add of a float32 and a bfloat16 tensor took 20x longer)
        return tuple(grads)


def svp_prompts(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta):
    """svp_prompts_cpu's step on arguments already checked (SVP's model path checks them
    as it picks this path, svp.peft.svp._fused_prompts): an autograd node where a gradient is
    recorded, else the forward alone (its checks took 6.6 us and a node ~2 us, timed in a loop; more
    in a forward)."""
    if torch.is_grad_enabled():
        return SVPPromptsCPU.apply(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)
    return _svp_prompts_fwd(h, skip, dtype, wc, bc, alpha, w0, b0, w1, b1, beta)[0]


def svp_prompts_cpu(h, skip, cross=None, inner=None, dtype=torch.float32):
    """SVP's paper-mode prompt step, ``h + alpha * silu(Wc h + bc) + beta * silu(W1 (W0 h + b0) + b1)``
    on every row but ``skip`` of the (b, l, d) float32 CPU tensor h, with its gradients (see
    SVPPromptsCPU). ``cross``: (Wc (d, d), bc, alpha) or None; ``inner``: (W0 (r, d), b0, W1
    (d, r), b1, beta) or None, not both None; biases may be None; every tensor float32 on the CPU.
    ``dtype``: the products' dtype, float32 or bfloat16 (what CPU autocast runs them in)."""
    if cross is None and inner is None:
        raise ValueError("svp_prompts_cpu needs the Cross or the Inner prompter")
    if h.dim() != 3:
        raise ValueError(f"expected h (batch, len, dim), got {tuple(h.shape)}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"svp_prompts_cpu runs its products in float32 or bfloat16, not {dtype}")
    d = h.shape[-1]
    wc, bc, alpha = cross if cross is not None else (None, None, None)
    w0, b0, w1, b1, beta = inner if inner is not None else (None,) * 5
    r = None if w0 is None else w0.shape[0]
    for name, t, shape in (("h", h, h.shape), ("Wc", wc, (d, d)), ("bc", bc, (d,)), ("alpha", alpha, (d,)),
                           ("W0", w0, (r, d)), ("b0", b0, (r,)), ("W1", w1, (d, r)), ("b1", b1, (d,)),
                           ("beta", beta, (d,))):
        if t is None:
            if name in ("Wc", "alpha") and cross is not None or name in ("W0", "W1", "beta") and inner is not None:
                raise ValueError(f"svp_prompts_cpu: {name} is None")
            continue
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"svp_prompts_cpu needs float32 CPU tensors; {name} is {t.dtype} on {t.device}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"svp_prompts_cpu: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return svp_prompts(h, check_skip(skip, h.shape[1], "svp_prompts_cpu"), dtype, wc, bc, alpha, w0, b0, w1, b1, beta)


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
    return AddSiluPromptsCPU.apply(h, a1, s1, a2, s2, check_skip(skip, h.shape[1], "add_silu_prompts_cpu"))


guard_caches(globals())   # see drop_stale_caches (numba cannot see what they inline from other files) and _flocked
