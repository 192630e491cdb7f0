"""Fused causal depthwise conv1d + bias + SiLU for CPUs (numba), forward and backward,
on the mixer's (batch, len, dim) layout; same result as :func:`svp.ops.conv.causal_conv1d_bld`.

Why: written in PyTorch the conv is a pad, W shifted multiplies, W adds and a SiLU
forward (10 ops for W = 4) and twice that backward, every slice's gradient a fresh zeroed
tensor plus a copy. In a Vim-Tiny SVP step that was ~40% of all elementwise work and most
of the step's ~4,000 thread-pool launches. Here each direction is one pass forward (read x,
write y) and one backward (read x and dy, write dx; dweight/dbias as fixed-order float64
sums per batch row, so the bits do not depend on threads or scheduling).
"""
from __future__ import annotations

import numpy as np
import torch

from ..compat import cpu_autocast
from . import scan_cpu  # noqa: F401  (numba cache dir, threading layer, LLVM options)
from .kept import kept
from .matmul_cpu import mm
from .scan_cpu import _FM_SAFE, _NARROW, _ONE, _call_task, _dynamic_tasks, _dynamic_tasks_in, _nd, _np_kept, _sigmoid, \
    _task_sig_is, _wide_vectors, guard_caches, run_tasks
from .simd import as_f32, fma, is_bf16, splat, to_elem, vload, vstore, zeros
from numba import njit, prange, types

TB = 16  # time steps per task; a task owns whole (contiguous) rows of every channel


@njit(inline="always")
def _tap_src(t, k, W, reverse):
    """Input row read by output row t through tap k (may be outside [0, L))."""
    return t + (W - 1 - k) if reverse else t - (W - 1 - k)


@njit(inline="always")
def _rows(task, ntb, L):
    """(batch row, first and end time step) of task number ``task``."""
    bi = task // ntb
    t0 = (task - bi * ntb) * TB
    return bi, t0, min(L, t0 + TB)


# _preact, _preact4 and the sigmoid (scan_cpu._sigmoid) are functions LLVM links in, not
# inline="always" (numba copies and types the IR of those at every call site, two each in the
# backward task): under numba 0.58 (the floor) the backward's three variants then took 24 s to
# compile instead of 55 s and the forward's two 9 s instead of 19 s (0.68: 6.5 s and 4.2 s
# instead of 10.8 s and 5.5 s). Same bits; the node's time 0.99-1.03x (docs/benchmarks.md,
# thirty-third round).
@njit(fastmath=_FM_SAFE, error_model="numpy")
def _preact(x, w, bias, bi, t, reverse, acc):
    """acc = bias + the conv's output row t (before the activation). bias is (1, d), or
    (b, d) with one row per sample (svp serve's BitFit rows in a mixed-adapter batch)."""
    # a function of its own in the task's code, so its loops take this attribute, not the task's:
    # without it LLVM vectorised them at 256 bits on AVX-512 (the same bits either way; the
    # conv + x_proj node 0.9x the time at Vim-Tiny b8, docs/benchmarks.md, forty-seventh round)
    _wide_vectors()
    L, d = x.shape[1], x.shape[2]
    W = w.shape[0]
    brow = bias[bi] if bias.shape[0] > 1 else bias[0]
    for c in range(d):
        acc[c] = brow[c]
    for k in range(W):
        s = _tap_src(t, k, W, reverse)
        if s >= 0 and s < L:
            xr = x[bi, s]
            wk = w[k]
            for c in range(d):
                acc[c] += wk[c] * as_f32(xr[c])


@njit(inline="always")
def _full4(t, L, W, reverse):
    """Whether output row t reads all its W input rows (the W == 4 fast path's condition)."""
    return W == 4 and ((t + 3 < L) if reverse else (t >= 3))


@njit(fastmath=_FM_SAFE, error_model="numpy")
def _preact4(x, w, brow, bi, t, reverse, acc):
    """_preact for W == 4 and a row with all four inputs: the four taps in one loop over the
    channels (same operations in the same order), not four passes through acc. ~10% off the
    forward and ~15% off the backward kernel at the Vim-Tiny shape."""
    _wide_vectors()   # (as in _preact)
    d = x.shape[2]
    if reverse:
        x0, x1, x2, x3 = x[bi, t + 3], x[bi, t + 2], x[bi, t + 1], x[bi, t]
    else:
        x0, x1, x2, x3 = x[bi, t - 3], x[bi, t - 2], x[bi, t - 1], x[bi, t]
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    for c in range(d):
        acc[c] = ((((brow[c] + w0[c] * as_f32(x0[c])) + w1[c] * as_f32(x1[c])) + w2[c] * as_f32(x2[c]))
                  + w3[c] * as_f32(x3[c]))


PB = 64  # channels per block of _proj_rows (four 16-lane vectors); its pw is padded to whole blocks


# forceinline: LLVM inlines it (its `alwaysinline`), where numba's inline="always" copied and typed
# its IR into the task: numba 0.58 (the floor) compiled the backward's variants in 20 s instead of
# 38 s; same bits and speed (docs/benchmarks.md, thirty-fourth round)
@njit(error_model="numpy", forceinline=True)
def _proj_rows(pd, pw, row0, nr):
    """x_proj's input gradient for rows row0 .. row0 + nr - 1 of pd (b * L, n): a flat
    (max(nr, 2), dp) float32 buffer G with G[i * dp + c] = sum over r of pd[row0 + i, r] *
    pw[r, c], pw (n, dp) with dp a multiple of PB. Each element is one fma chain over r in
    order, the same whichever pair of rows it is formed in (the last pair overlaps the one
    before it, a single row is formed twice), so its bits do not depend on the task's rows or
    the threads. Two rows per pass over a PB-channel block of pw (n * PB floats, in L1); where
    a vector is two registers (scan_cpu._NARROW) over half a block, so that the accumulators and
    pw's vectors fit in the 16 registers (the same chains: the same bits).

    Formed in the conv's backward kernel instead of by a product into a (b, L, d) tensor that
    the kernel then read: the product wrote and the kernel read that tensor through memory,
    and the node took 0.88x the time this way in a Vim-Tiny step (docs/benchmarks.md,
    thirty-first round). For the Vim models' shapes it gave the bits of oneDNN's product (there, AMD Zen 5)."""
    n, dp = pw.shape
    G = np.empty(max(nr, 2) * dp, np.float32)
    if _NARROW:   # two vectors of the block at a time (scan_cpu's module docstring, Narrow registers)
        for c0 in range(0, dp, 32):
            for i0 in range(0, nr, 2):
                i = max(0, min(i0, nr - 2))
                ra = row0 + i
                rb = row0 + min(i + 1, nr - 1)
                a0 = zeros()
                a1 = zeros()
                b0 = zeros()
                b1 = zeros()
                for r in range(n):
                    o = r * dp + c0
                    w0 = vload(pw, o)
                    w1 = vload(pw, o + 16)
                    s = splat(pd[ra, r])
                    a0 = fma(s, w0, a0)
                    a1 = fma(s, w1, a1)
                    s = splat(pd[rb, r])
                    b0 = fma(s, w0, b0)
                    b1 = fma(s, w1, b1)
                o = i * dp + c0
                vstore(G, o, a0)
                vstore(G, o + 16, a1)
                vstore(G, o + dp, b0)
                vstore(G, o + dp + 16, b1)
        return G
    for c0 in range(0, dp, PB):
        for i0 in range(0, nr, 2):
            i = max(0, min(i0, nr - 2))
            ra = row0 + i
            rb = row0 + min(i + 1, nr - 1)
            a0 = zeros()
            a1 = zeros()
            a2 = zeros()
            a3 = zeros()
            b0 = zeros()
            b1 = zeros()
            b2 = zeros()
            b3 = zeros()
            for r in range(n):
                o = r * dp + c0
                w0 = vload(pw, o)
                w1 = vload(pw, o + 16)
                w2 = vload(pw, o + 32)
                w3 = vload(pw, o + 48)
                s = splat(pd[ra, r])
                a0 = fma(s, w0, a0)
                a1 = fma(s, w1, a1)
                a2 = fma(s, w2, a2)
                a3 = fma(s, w3, a3)
                s = splat(pd[rb, r])
                b0 = fma(s, w0, b0)
                b1 = fma(s, w1, b1)
                b2 = fma(s, w2, b2)
                b3 = fma(s, w3, b3)
            o = i * dp + c0
            vstore(G, o, a0)
            vstore(G, o + 16, a1)
            vstore(G, o + 32, a2)
            vstore(G, o + 48, a3)
            o += dp
            vstore(G, o, b0)
            vstore(G, o + 16, b1)
            vstore(G, o + 32, b2)
            vstore(G, o + 48, b3)
    return G


_NO_PD = _NO_PW = np.empty((0, 0), np.float32)   # _bwd_task's pd and pw without x_proj's gradient


def _padded_pw(pw: torch.Tensor) -> torch.Tensor:
    """pw (n, d) as _proj_rows reads it: contiguous, its columns padded with zeros to a
    multiple of PB (the Vim models' widths need no padding)."""
    d = pw.shape[1]
    pad = -d % PB
    return (torch.nn.functional.pad(pw, (0, pad)) if pad else pw).contiguous()


@njit(inline="always")
def _fma3(x, w0, w1, w2, a0, a1, a2):
    """(a0, a1, a2) + x * (w0, w1, w2): one row's step of _tile3, x a scalar of that row."""
    s = splat(x)
    return fma(s, w0, a0), fma(s, w1, a1), fma(s, w2, a2)


@njit(inline="always")
def _store3(tmp, o, a0, a1, a2):
    vstore(tmp, o, a0)
    vstore(tmp, o + 16, a1)
    vstore(tmp, o + 32, a2)


# _tile3, _tile1 and _proj_out_rows are functions LLVM links in, not inlined into the task by
# numba (inline="always" copies and types their IR at every call site): inlined, the forward
# task took 50-55 s to compile per variant under numba 0.58 (the floor), nearly half of its
# test suite's first amp test; as functions 9 s (0.68: 2-3 s either way). Same bits and speed
# (docs/benchmarks.md, thirty-second round).
@njit
def _tile3(pwT, k0, oa, ob, oc, od, tmp):
    """tmp[i * npd + k0 .. + 48] for the four rows oa..od: 48 columns of the rows' products
    with pwT (d, npd), each an fma chain over the channels in order (four rows of three
    16-lane accumulators: 12 of the 16 or 32 vector registers)."""
    npd = pwT.shape[1]
    a0 = a1 = a2 = b0 = b1 = b2 = c0 = c1 = c2 = d0 = d1 = d2 = zeros()
    for c in range(oa.shape[0]):
        o = c * npd + k0
        w0 = vload(pwT, o)
        w1 = vload(pwT, o + 16)
        w2 = vload(pwT, o + 32)
        a0, a1, a2 = _fma3(oa[c], w0, w1, w2, a0, a1, a2)
        b0, b1, b2 = _fma3(ob[c], w0, w1, w2, b0, b1, b2)
        c0, c1, c2 = _fma3(oc[c], w0, w1, w2, c0, c1, c2)
        d0, d1, d2 = _fma3(od[c], w0, w1, w2, d0, d1, d2)
    _store3(tmp, k0, a0, a1, a2)
    _store3(tmp, npd + k0, b0, b1, b2)
    _store3(tmp, 2 * npd + k0, c0, c1, c2)
    _store3(tmp, 3 * npd + k0, d0, d1, d2)


@njit
def _tile1(pwT, k0, oa, ob, oc, od, tmp):
    """_tile3 for 16 columns (the last ones, when npd is not a multiple of 48)."""
    npd = pwT.shape[1]
    a0 = zeros()
    b0 = zeros()
    c0 = zeros()
    d0 = zeros()
    for c in range(oa.shape[0]):
        w0 = vload(pwT, c * npd + k0)
        a0 = fma(splat(oa[c]), w0, a0)
        b0 = fma(splat(ob[c]), w0, b0)
        c0 = fma(splat(oc[c]), w0, c0)
        d0 = fma(splat(od[c]), w0, d0)
    vstore(tmp, k0, a0)
    vstore(tmp, npd + k0, b0)
    vstore(tmp, 2 * npd + k0, c0)
    vstore(tmp, 3 * npd + k0, d0)


@njit(error_model="numpy")
def _proj_out_rows(out, bi, t0, t1, pwT, proj):
    """proj[bi, t] = out[bi, t] @ pwT[:, :n] for the task's rows t0 .. t1 - 1 (x_proj's
    product of the conv's output rows the task has just written, while they are in cache),
    pwT (d, npd) x_proj's weight transposed, its columns padded to whole 16-lane vectors.
    Each element is one fma chain over the channels in order, whichever four rows it is formed
    with (the last four overlap the ones before, fewer rows are repeated), so its bits do not
    depend on the task's rows or the threads; for Vim-Tiny's shape (d 384, n 44) they were
    oneDNN's bits here (docs/benchmarks.md, thirty-first round). Where a vector is two registers
    (scan_cpu._NARROW) only 16-column tiles: _tile3's 12 accumulators would spill."""
    npd = pwT.shape[1]
    n = proj.shape[2]
    nr = t1 - t0
    tmp = np.empty(4 * npd, np.float32)
    for i0 in range(0, nr, 4):
        i = max(0, min(i0, nr - 4))
        ra = t0 + i
        rb = t0 + min(i + 1, nr - 1)
        rc = t0 + min(i + 2, nr - 1)
        rd = t0 + min(i + 3, nr - 1)
        oa, ob, oc, od = out[bi, ra], out[bi, rb], out[bi, rc], out[bi, rd]
        k0 = 0
        while k0 + 48 <= npd and not _NARROW:   # narrow: _tile3's 12 accumulators would spill
            _tile3(pwT, k0, oa, ob, oc, od, tmp)
            k0 += 48
        while k0 < npd:
            _tile1(pwT, k0, oa, ob, oc, od, tmp)
            k0 += 16
        for j, r in enumerate((ra, rb, rc, rd)):
            pr = proj[bi, r]
            for k in range(n):
                pr[k] = tmp[j * npd + k]


_NO_PWT = np.empty((0, 0), np.float32)   # _fwd_task's pwT and proj without x_proj's product
_NO_PROJ = np.empty((0, 0, 0), np.float32)


def _padded_pwT(pw: torch.Tensor) -> torch.Tensor:
    """pw (n, d) as _proj_out_rows reads it: transposed (d, npd), contiguous, its columns
    padded with zeros to whole 16-lane vectors."""
    n, d = pw.shape
    out = torch.zeros(d, -(-n // 16) * 16)
    out[:, :n] = pw.t()
    return out


# Each kernel's task (TB rows of one sample) is a function called from a one-line prange, as
# in scan_cpu (see _fwd_task there): numba types a prange body twice and deep-copies its IR in
# the parfor passes. Inline, the backward's three variants (float32 / bfloat16 x and dx) took
# 66 s to compile under numba 0.58 (the floor); as functions 41 s. Under numba 0.68, 21-31 s
# against 16-27 s in cold runs on a host whose speed moved (0.90-1.03x against 0.62-0.74x the
# unchanged scan kernels' compile in the same runs). Same bits and speed (docs/benchmarks.md,
# "CI time"). The prange calls each task through its address (scan_cpu.run_tasks), so the task's
# code is compiled once, not again inside the kernel; its index is an int64.
@njit(cache=True, error_model="numpy", fastmath=_FM_SAFE)
def _fwd_task(task, x, w, bias, reverse, silu, out, pwT, proj):
    # Tasks own whole rows: with channel blocks (c0 + c indexing) numba's index arithmetic
    # kept LLVM from vectorising well and the kernel was 6x slower than this.
    _wide_vectors()
    b, L, d = x.shape
    ntb = (L + TB - 1) // TB
    bi, t0, t1 = _rows(task, ntb, L)
    acc = np.empty(d, np.float32)
    W = w.shape[0]
    brow = bias[bi] if bias.shape[0] > 1 else bias[0]
    for t in range(t0, t1):
        if _full4(t, L, W, reverse):
            _preact4(x, w, brow, bi, t, reverse, acc)
        else:
            _preact(x, w, bias, bi, t, reverse, acc)
        o = out[bi, t]
        if silu:
            for c in range(d):
                a = acc[c]
                o[c] = a * _sigmoid(a)
        else:
            for c in range(d):
                o[c] = acc[c]
    if pwT.shape[1] > 0:   # x_proj's product (CausalConv1dProjCPU)
        _proj_out_rows(out, bi, t0, t1, pwT, proj)


@njit(cache=True, error_model="numpy", fastmath=_FM_SAFE)
def _bwd_task(task, x, w, bias, reverse, silu, need_dw, g, pd, pw, has_gb, add_dx, dxp, dx, dwp, dbp):
    # With has_gb, a second gradient of the output is added to g as it is read: x_proj's input
    # gradient pd @ pw (the output's two consumers in the mixer: the scan and x_proj; see
    # CausalConv1dProjCPU), formed here for the task's rows and halo (_proj_rows) rather than
    # by a product into a (b, L, d) tensor this kernel then read.
    # add_dx: dx = dxp + this gradient (dxp float32: the other direction's input gradient, see
    # BiConvProjCPU; a float32 dx is dxp itself and is added to in place, a bfloat16 one is new).
    # x and dx may be bfloat16 (uint16 bits: svp.ops.simd.as_f32 / to_elem).
    _wide_vectors()
    b, L, d = x.shape
    W = w.shape[0]
    ntb = (L + TB - 1) // TB
    bi, t0, t1 = _rows(task, ntb, L)
    # rows of dL/d(pre-activation) that dx[t0:t1] needs (this block plus a halo)
    lo = max(0, t0 - W + 1) if reverse else t0
    hi = t1 if reverse else min(L, t1 + W - 1)
    ga = np.empty((hi - lo, d), np.float32)
    acc = np.empty(d, np.float32)
    dw = dwp[task]
    db = dbp[task]
    brow = bias[bi] if bias.shape[0] > 1 else bias[0]
    if need_dw:
        dw[:] = 0.0
        db[:] = 0.0
    G2 = _proj_rows(pd, pw, bi * L + lo, hi - lo) if has_gb else acc
    dpw = pw.shape[1]
    for t in range(lo, hi):
        gt = ga[t - lo]
        gr = g[bi, t]
        gbr = G2[(t - lo) * dpw:] if has_gb else acc
        if silu:
            if _full4(t, L, W, reverse):
                _preact4(x, w, brow, bi, t, reverse, acc)
            else:
                _preact(x, w, bias, bi, t, reverse, acc)
            if has_gb:
                for c in range(d):
                    a = acc[c]
                    sg = _sigmoid(a)
                    gt[c] = (gr[c] + gbr[c]) * sg * (_ONE + a * (_ONE - sg))
            else:
                for c in range(d):
                    a = acc[c]
                    sg = _sigmoid(a)
                    gt[c] = gr[c] * sg * (_ONE + a * (_ONE - sg))
        elif has_gb:
            for c in range(d):
                gt[c] = gr[c] + gbr[c]
        else:
            for c in range(d):
                gt[c] = gr[c]
        if need_dw and t >= t0 and t < t1:   # weight/bias sums over this block's own rows
            for c in range(d):
                db[c] += gt[c]
            for k in range(W):
                s = _tap_src(t, k, W, reverse)
                if s >= 0 and s < L:
                    xr = x[bi, s]
                    dwk = dw[k]
                    for c in range(d):
                        dwk[c] += np.float64(gt[c]) * np.float64(as_f32(xr[c]))
    for s in range(t0, t1):
        dxr = dx[bi, s]
        pr = dxp[bi, s]
        if W == 4 and ((s - 3 >= lo) if reverse else (s + 3 < hi)):
            # all four output rows fed by x[s] are in ga: one loop, same order as below
            if reverse:
                g0, g1, g2, g3 = ga[s - 3 - lo], ga[s - 2 - lo], ga[s - 1 - lo], ga[s - lo]
            else:
                g0, g1, g2, g3 = ga[s + 3 - lo], ga[s + 2 - lo], ga[s + 1 - lo], ga[s - lo]
            w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
            if add_dx and is_bf16(dx):   # (a constant of the compiled kernel: see simd.is_bf16)
                for c in range(d):
                    dxr[c] = to_elem(pr[c] + ((((w0[c] * g0[c]) + w1[c] * g1[c]) + w2[c] * g2[c])
                                              + w3[c] * g3[c]), dxr)
            elif add_dx:
                for c in range(d):
                    dxr[c] = to_elem(as_f32(dxr[c]) + ((((w0[c] * g0[c]) + w1[c] * g1[c])
                                                        + w2[c] * g2[c]) + w3[c] * g3[c]), dxr)
            else:
                for c in range(d):
                    dxr[c] = to_elem((((w0[c] * g0[c]) + w1[c] * g1[c]) + w2[c] * g2[c]) + w3[c] * g3[c], dxr)
            continue
        for c in range(d):
            acc[c] = 0.0
        for k in range(W):
            t = s - (W - 1 - k) if reverse else s + (W - 1 - k)   # output fed by x[s] via tap k
            if t >= lo and t < hi:
                gt = ga[t - lo]
                wk = w[k]
                for c in range(d):
                    acc[c] += wk[c] * gt[c]
        if add_dx and is_bf16(dx):
            for c in range(d):
                dxr[c] = to_elem(pr[c] + acc[c], dxr)
        elif add_dx:
            for c in range(d):
                dxr[c] = to_elem(as_f32(dxr[c]) + acc[c], dxr)
        else:
            for c in range(d):
                dxr[c] = to_elem(acc[c], dxr)


# (the tasks are called through their addresses, scan_cpu.run_tasks: see _call_task there)
@njit(parallel=True, cache=True, error_model="numpy")
def _conv_fwd(taddr, thash, x, w, bias, reverse, silu, out, pwT, proj):
    args = (x, w, bias, reverse, silu, out, pwT, proj)
    if not _task_sig_is(thash, np.int64(0), args):
        return False
    ntb = (x.shape[1] + TB - 1) // TB
    for task in prange(x.shape[0] * ntb):
        _call_task(taddr, np.int64(task), args)
    return True


@njit(parallel=True, cache=True, error_model="numpy")
def _conv_bwd(taddr, thash, x, w, bias, reverse, silu, need_dw, g, pd, pw, has_gb, add_dx, dxp, dx, dwp, dbp):
    args = (x, w, bias, reverse, silu, need_dw, g, pd, pw, has_gb, add_dx, dxp, dx, dwp, dbp)
    if not _task_sig_is(thash, np.int64(0), args):
        return False
    ntb = (x.shape[1] + TB - 1) // TB
    for task in prange(x.shape[0] * ntb):
        _call_task(taddr, np.int64(task), args)
    return True


def _np(x: torch.Tensor):
    """numpy view of a float32 (b, l, d) tensor, copied unless contiguous. The model's x always
    is; a row-strided one (a chunk of in_proj's output, when in_proj has forward hooks) is
    copied (one memory pass) rather than given to the kernels as an array of any layout: numba
    compiles that as a second specialisation of each kernel on first use (3-7 s each with
    numba 0.68, 11-25 s with 0.58). A bfloat16 x (BiConvProjCPU) as its uint16 bits."""
    x = x.detach().contiguous()
    return x, _nd(x)


class CausalConv1dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, reverse, silu):
        xs, xn = _np(x)
        wt = _kept_wt(weight)                                         # (W, d)
        d = x.shape[-1]
        bs = torch.zeros(1, d) if bias is None else bias.detach().to(torch.float32).reshape(-1, d).contiguous()
        out = torch.empty(x.shape, dtype=torch.float32)
        with _dynamic_tasks():
            run_tasks(_conv_fwd, _fwd_task, types.int64, xn, wt.numpy(), bs.numpy(), bool(reverse), bool(silu),
                      out.numpy(), _NO_PWT, _NO_PROJ)
        ctx.save_for_backward(xs, wt, bs)
        ctx.cfg = (bool(reverse), bool(silu), bias is not None)
        return out

    @staticmethod
    def backward(ctx, dy):
        xs, wt, bs = ctx.saved_tensors
        reverse, silu, has_bias = ctx.cfg
        b, L, d = xs.shape
        W = wt.shape[0]
        dy = dy.contiguous()
        dx = torch.empty(b, L, d, dtype=torch.float32)
        ntask = b * ((L + TB - 1) // TB)
        dwp = torch.empty(ntask, W, d, dtype=torch.float64)   # per-task partial sums, added
        dbp = torch.empty(ntask, d, dtype=torch.float64)      # in a fixed order below
        need = ctx.needs_input_grad
        need_dw = bool(need[1] or (has_bias and need[2]))  # False for a frozen conv: no sums
        with _dynamic_tasks():
            run_tasks(_conv_bwd, _bwd_task, types.int64, xs.numpy(), wt.numpy(), bs.numpy(), reverse, silu, need_dw,
                      dy.numpy(), _NO_PD, _NO_PW, False, False, dx.numpy(), dx.numpy(), dwp.numpy(), dbp.numpy())
        dw = dwp.sum(0).t().to(torch.float32) if need[1] else None
        db = dbp.sum(0).to(torch.float32) if (has_bias and need[2]) else None
        return dx if need[0] else None, dw, db, None, None


def _mm(a, b):
    """torch.mm in float32 under CPU autocast too: this node's outputs and gradients are float32
    (the Vim mixer keeps x_proj out of bfloat16, svp.models.vim.BiMambaMixer.forward), and its
    backward may run inside an autocast region."""
    if cpu_autocast():
        with torch.autocast("cpu", enabled=False):
            return mm(a, b)
    return mm(a, b)


def _kept_wt(weight: torch.Tensor) -> torch.Tensor:
    """The conv weight (d, W) as the kernels read it, (W, d) contiguous, kept on a frozen weight
    (svp.ops.kept; on the parameter behind the fresh squeeze view the model passes): transposing it
    took ~11 µs a call (timeit), 48 calls a Vim-Small batch-1 forward (~0.3% of its ~160 ms; 1.2%
    of its py-spy samples)."""
    # (float32: a float64 weight was handed to the kernels as it was, a float64 compile of the
    # forward and a numba TypingError in the backward: review)
    return kept(weight, "conv_cpu w^T", lambda: weight.detach().to(torch.float32).t().contiguous())


def _conv_proj_fwd(x, weight, bias, proj_w, reverse, silu):
    """The conv (+ SiLU) of x and the product of its output with proj_w: (out, proj, state)."""
    xs, xn = _np(x)
    wt = _kept_wt(weight)
    d = x.shape[-1]
    bs = torch.zeros(1, d) if bias is None else bias.detach().to(torch.float32).reshape(-1, d).contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    pw = proj_w.detach()
    proj = torch.empty(*x.shape[:-1], pw.shape[0], dtype=torch.float32)
    # kept on a frozen x_proj weight (formed per call it took ~20 us a call in a step, under
    # cProfile); a trained one gets it formed anew (svp.ops.kept)
    pwT = kept(proj_w, "conv_cpu x_proj^T", lambda: _padded_pwT(pw))
    # (callers: _dynamic_tasks)
    run_tasks(_conv_fwd, _fwd_task, types.int64, xn, _np_kept(wt), bs.numpy(), bool(reverse), bool(silu),
              out.numpy(), _np_kept(pwT), proj.numpy())
    return out, proj, ((xs, wt, bs, pw, out), (bool(reverse), bool(silu), bias is not None))


def _conv_proj_bwd(saved, cfg, need, dy, dproj, dx=None, dx_dtype=torch.float32):
    """Gradients (x, weight, bias, proj_w) of _conv_proj_fwd's outputs; with ``dx`` (float32)
    given, the x gradient is added to it (and dx is returned; with ``dx_dtype`` bfloat16, the sum
    in a new bfloat16 tensor, rounded once). Without ``dx`` the x gradient is float32."""
    xs, wt, bs, pw, out = saved
    reverse, silu, has_bias = cfg
    b, L, d = xs.shape
    W = wt.shape[0]
    dpw = None
    dp = None
    if dproj is not None:
        dp = dproj.reshape(-1, pw.shape[0]).to(torch.float32).contiguous()
        if need[3]:
            dpw = _mm(dp.t(), out.view(-1, d))
    if dy is None and dp is not None:   # only x_proj's output is used: its gradient is dy
        dy, dp = _mm(dp, pw).view(b, L, d), None
    if dy is None:
        return dx, None, None, dpw
    dy = dy.contiguous()
    add = dx is not None
    if not add:
        dx = torch.empty(b, L, d, dtype=torch.float32)
    prev = dx
    if add and dx_dtype != torch.float32:
        dx = torch.empty(b, L, d, dtype=dx_dtype)
    ntask = b * ((L + TB - 1) // TB)
    dwp = torch.empty(ntask, W, d, dtype=torch.float64)
    dbp = torch.empty(ntask, d, dtype=torch.float64)
    need_dw = bool(need[1] or (has_bias and need[2]))
    # (callers: _dynamic_tasks)
    pd, pwp = (_NO_PD, _NO_PW) if dp is None else (dp.numpy(), _padded_pw(pw).numpy())
    run_tasks(_conv_bwd, _bwd_task, types.int64, _nd(xs), wt.numpy(), bs.numpy(), reverse, silu, need_dw,
              dy.numpy(), pd, pwp, dp is not None, add, prev.numpy(), _nd(dx), dwp.numpy(), dbp.numpy())
    dw = dwp.sum(0).t().to(torch.float32) if need[1] else None
    db = dbp.sum(0).to(torch.float32) if (has_bias and need[2]) else None
    return dx, dw, db, dpw


class CausalConv1dProjCPU(torch.autograd.Function):
    """The conv (+ SiLU) and a bias-free product of its output: ``(y, y @ proj_w^T)``. In the
    mixer y feeds both the scan and x_proj, so autograd would add the two gradients of y in a
    separate pass over (b, l, d) (a fresh tensor) before the conv's backward; here the conv's
    backward kernel adds them as it reads them."""

    @staticmethod
    @_dynamic_tasks_in
    def forward(ctx, x, weight, bias, proj_w, reverse, silu):
        ctx.set_materialize_grads(False)
        out, proj, (saved, cfg) = _conv_proj_fwd(x, weight, bias, proj_w, reverse, silu)
        ctx.save_for_backward(*saved)
        ctx.cfg = cfg
        return out, proj

    @staticmethod
    @_dynamic_tasks_in
    def backward(ctx, dy, dproj):
        need = ctx.needs_input_grad
        dx, dw, db, dpw = _conv_proj_bwd(ctx.saved_tensors, ctx.cfg, need, dy, dproj)
        return dx if need[0] else None, dw, db, dpw, None, None


class BiConvProjCPU(torch.autograd.Function):
    """CausalConv1dProjCPU for both directions of a bidirectional mixer, which read the same x:
    the second direction's backward kernel adds its x gradient to the first's, instead of
    autograd adding the two in another pass over (b, l, d); bit for bit the same sum. Inputs: x,
    then (weight, bias, proj_w) forward and backward (reverse) direction; SiLU.

    A bfloat16 x (in_proj's output under CPU autocast) is read as it is, and its gradient written
    in bfloat16 (the float32 sum of the two directions', rounded once): the bits of casting x
    to float32 first, a pass over (b, l, d) less each way. The outputs are float32 either way."""

    @staticmethod
    @_dynamic_tasks_in
    def forward(ctx, x, w, bias, pw, w_b, bias_b, pw_b):
        ctx.set_materialize_grads(False)
        out, proj, (sf, cf) = _conv_proj_fwd(x, w, bias, pw, False, True)
        out_b, proj_b, (sb, cb) = _conv_proj_fwd(x, w_b, bias_b, pw_b, True, True)
        ctx.save_for_backward(*sf, *sb)
        ctx.cfg = (cf, cb)
        return out, proj, out_b, proj_b

    @staticmethod
    @_dynamic_tasks_in
    def backward(ctx, dy, dproj, dy_b, dproj_b):
        saved, need = ctx.saved_tensors, ctx.needs_input_grad
        n = len(saved) // 2
        dx, dw, db, dpw = _conv_proj_bwd(saved[:n], ctx.cfg[0], (need[0],) + need[1:4], dy, dproj)
        dx, dw_b, db_b, dpw_b = _conv_proj_bwd(saved[n:], ctx.cfg[1], (need[0],) + need[4:7], dy_b, dproj_b, dx,
                                               dx_dtype=saved[0].dtype)
        return dx if need[0] else None, dw, db, dpw, dw_b, db_b, dpw_b


def bi_conv_proj_cpu(x, fwd, bwd):
    """``causal_conv1d_proj_cpu(x, *fwd, "silu") + causal_conv1d_proj_cpu(x, *bwd, "silu",
    reverse=True)`` outputs, (y, proj, y_b, proj_b), in one autograd node (see BiConvProjCPU);
    fwd, bwd: (weight (dim, width), bias (dim,) or None, proj_w (n, dim)). x float32 or bfloat16;
    the rest float32."""
    for w, bias, pw in (fwd, bwd):
        _check_conv_proj(x, w, bias, pw, x_dtypes=(torch.float32, torch.bfloat16))
    return bi_conv_proj(x, fwd, bwd)


def bi_conv_proj(x, fwd, bwd):
    """bi_conv_proj_cpu on arguments already checked (the Vim mixer checks them as it picks
    it, svp.models.vim._fused_conv_proj): an autograd node where a gradient is recorded, else
    the two forwards alone, without the node (~2 us) or the checks (4.5 us a layer; both timed in a
    loop, more in a forward)."""
    if torch.is_grad_enabled():
        return BiConvProjCPU.apply(x, *fwd, *bwd)
    with _dynamic_tasks():
        out, proj, _ = _conv_proj_fwd(x, *fwd, False, True)
        out_b, proj_b, _ = _conv_proj_fwd(x, *bwd, True, True)
    return out, proj, out_b, proj_b


def _check_conv_proj(x, weight, bias, proj_w, x_dtypes=(torch.float32,)):
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x (batch, len, dim) and weight (dim, width); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"expected bias ({x.shape[-1]},), got {tuple(bias.shape)}")
    if proj_w.dim() != 2 or proj_w.shape[1] != x.shape[-1]:
        raise ValueError(f"expected proj_w (n, {x.shape[-1]}), got {tuple(proj_w.shape)}")
    _check_cpu_dtypes("causal_conv1d_proj_cpu", (("x", x, x_dtypes), ("proj_w", proj_w, (torch.float32,)),
                                                 ("weight", weight, _WEIGHT_DTYPES), ("bias", bias, _WEIGHT_DTYPES)))


_WEIGHT_DTYPES = (torch.float32, torch.float64)   # float64 weights are read as float32, as before


def _check_cpu_dtypes(fn: str, tensors):
    """Each ``(name, tensor or None, allowed dtypes)`` a CPU tensor of an allowed dtype."""
    for name, t, ok in tensors:
        if t is not None and (t.dtype not in ok or t.device.type != "cpu"):
            want = " or ".join(str(d).replace("torch.", "") for d in ok)
            raise ValueError(f"{fn} needs {name} as a {want} CPU tensor; got {t.dtype} on {t.device}")


def causal_conv1d_proj_cpu(x, weight, bias, proj_w, activation=None, reverse=False):
    """``(y, F.linear(y, proj_w))`` with ``y = causal_conv1d_cpu(x, weight, bias, activation, reverse)``
    for float32 CPU tensors: bias (dim,) or None, proj_w (n, dim)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    _check_conv_proj(x, weight, bias, proj_w)
    return CausalConv1dProjCPU.apply(x, weight, bias, proj_w, reverse, activation is not None)


def causal_conv1d_cpu(x, weight, bias=None, activation=None, reverse=False):
    """Fused version of :func:`svp.ops.conv.causal_conv1d_bld` for float32 CPU tensors:
    x (batch, len, dim), weight (dim, width), bias (dim,) or, without a gradient, one per
    sample (batch, 1, dim): svp serve's mixed batches give BitFit's biases that way."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x (batch, len, dim) and weight (dim, width); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.dim() == 1 and bias.shape[0] != x.shape[-1]:
        # (a (k*dim,) bias became k per-sample ones, read past its end for the samples after them)
        raise ValueError(f"expected bias (dim,) = ({x.shape[-1]},) or (batch, 1, dim); got {tuple(bias.shape)}")
    if bias is not None and bias.dim() != 1:
        if tuple(bias.shape) != (x.shape[0], 1, x.shape[-1]):
            raise ValueError(f"expected bias (dim,) or (batch, 1, dim) = {(x.shape[0], 1, x.shape[-1])}; "
                             f"got {tuple(bias.shape)}")
        if bias.requires_grad:
            raise ValueError("a per-sample (batch, 1, dim) bias has no gradient in the fused conv; "
                             "use svp.ops.conv.causal_conv1d_bld")
    _check_cpu_dtypes("causal_conv1d_cpu", (("x", x, (torch.float32,)), ("weight", weight, _WEIGHT_DTYPES),
                                            ("bias", bias, _WEIGHT_DTYPES)))
    return CausalConv1dCPU.apply(x, weight, bias, reverse, activation is not None)


guard_caches(globals())   # see drop_stale_caches (numba cannot see what they inline from other files) and _flocked
