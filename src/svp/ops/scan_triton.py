"""Selective scan as Triton kernels (GPU; or CPU tensors under ``TRITON_INTERPRET=1``).

Semantics are those of :func:`svp.ops.scan_ref.selective_scan_ref` plus ``reverse``
(time is indexed backwards; nothing is flipped or copied).

Design. One program per (batch, channel block of ``BLOCK_D`` channels within one B/C
group); the (BLOCK_D, d_state) state lives in registers in float32 and the program walks
the sequence. u, delta, z, B, C, dout are read in place through their strides (the model
hands (b, d, l) views of (b, l, d) tensors, so a channel block is one contiguous row), in
float32, bfloat16 or float16; outputs and gradients come back in each input's dtype.

The forward writes only y, the last state, and the state at the start of every chunk of
``CHUNK`` steps (b, l/CHUNK, d, n): never a (b, d, l, n) tensor. The backward walks the
chunks from last to first: it recomputes the chunk's states from the saved chunk-start
state into a per-program scratch of CHUNK x BLOCK_D x d_state (small enough to stay in L2
on a GPU), then runs the reverse-time recurrence
dh_{t-1} = exp(delta_t A) * (dh_t + C_t g_t) over it. Every time loop loads the next step's
u, delta, z, B, C (and dy) one step ahead, so that their latency overlaps the current step's
arithmetic. Sums over channels (dB, dC) are
written per channel block and summed afterwards in a fixed order (the ``fixed_sum`` kernel;
torch adds the scan groups' sums in float64), and sums over batch (dA, dD, d delta_bias)
likewise per batch: no atomics, so the same inputs give the same bits on every run.
"""
from __future__ import annotations

import contextlib
import os

import torch

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ..errors import BackendError
from .scan_ref import check_scan_args, scan_groups, sum_to_groups

CHUNK = 16           # steps per backward chunk: scratch per program = CHUNK * BLOCK_D * d_state floats
MAX_D_STATE = 256    # the state tile (BLOCK_D x d_state) must fit in registers
STAGES = 2           # tl.range pipelining of the time loops (the backward's scratch tile loads)
# The loop forward's: it prefetches every input by hand one step ahead, so the pipeliner had only
# the other direction's output to stage where a direction adds to it (ACC_OUT), and held it at
# 225 registers a thread against 163 (8 warps an SM against 12; sm_90a as a Vim-S launch compiles
# it, benchmarks/triton_asm.py). That load is prefetched by hand too now: with 1 they take 163 and 168.
FWD_STAGES = 1
# which forward kernel runs: "loop" (_fwd, step by step) or "tiled" (_fwd_tiled, a chunk at a
# time through a parallel scan: an experiment, not measured on a GPU yet; benchmarks/triton_sweep.py
# times both)
FORWARD = "loop"
BACKWARD = "loop"    # the same for the backward (_bwd or _bwd_tiled)
# A cap on the registers a thread of the scan's kernels may use (Triton's ``maxnreg``), per kernel;
# None leaves ptxas its choice. Compiled for sm_90a as a Vim-S step's launches compile them
# (benchmarks/triton_asm.py, Triton 3.8): the forward takes 163-168 registers, the backward 157
# (208 with dA), no spills: 12 warps an SM at one warp a program. Capped at 168 all fit without a
# spill, at 144 one forward spills 12 bytes (14 warps), at 128 they spill 32-76 (16 warps); a cap
# above a kernel's own count can raise it (192: the backward takes 184). Not timed yet:
# benchmarks/triton_sweep.py --parts regs tries them on a GPU. (The interpreter ignores it.)
MAXNREG = {"fwd": None, "bwd": None}
_TILE = 512          # BLOCK_D * BLOCK_N of the loop backward (16 float32 of state a thread on one warp; _plan)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _device_fn(fn):
    """A Triton device function, compiled or interpreted as the calling kernel is. Not
    triton.jit: that decides once, at import, from TRITON_INTERPRET (see _library_interpreted)."""
    return JITFunction(fn)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def version() -> str:
    return triton.__version__


@_device_fn
def _softplus(x):
    ex = tl.exp(-tl.abs(x))
    w = 1.0 + ex
    return tl.maximum(x, 0.0) + tl.where(w == 1.0, ex, tl.log(w) * ex / (w - 1.0))   # log1p(ex), exact for tiny ex


@_device_fn
def _program_rows(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, dg, nblk, rB, rC,
                  su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sA_d, sA_n,
                  N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """This program's channels (batch row, group gi, block blk), A/D/bias for them, and the
    row pointers of u, delta, z, B, C at time 0."""
    bi = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    gi = pid // nblk
    blk = pid % nblk
    cl = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cl < dg
    c = gi * dg + cl
    n = tl.arange(0, BLOCK_N)
    nm = n < N
    m2 = cm[:, None] & nm[None, :]
    # the state lanes past d_state (BLOCK_N is a power of two) take A = -FLT_MIN, not 0: their B
    # and C are 0, and the decay exp(delta * A) is 1 for any finite delta (no overflow: A = -1 gave
    # exp(120) at delta = -120 without softplus, inf * 0 = NaN, review), and exp(-inf) = 0 for
    # delta = +inf, where A = 0 gave exp(inf * 0) = NaN, which the sums over the state carried into
    # the gradients of every earlier step (QA 16b; the reference's were finite). (Set in float32,
    # after the load: a float16 A's `other` would round it to 0.)
    A = tl.load(A_ptr + c[:, None] * sA_d + n[None, :] * sA_n, mask=m2, other=0.0).to(tl.float32)
    A = tl.where(m2, A, -1.1754943508222875e-38)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cm, other=0.0).to(tl.float32)
    else:
        Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), tl.float32)
    u_row = u_ptr + bi * su_b + c * su_d
    dl_row = dl_ptr + bi * sd_b + c * sd_d
    z_row = z_ptr + bi * sz_b + c * sz_d
    B_row = B_ptr + bi * sB_b + (gi // rB) * sB_g + n * sB_n
    C_row = C_ptr + bi * sC_b + (gi // rC) * sC_g + n * sC_n
    return bi, pid, gi, blk, c, cm, n, nm, m2, A, Dv, bias, u_row, dl_row, z_row, B_row, C_row


@_device_fn
def _f32_step(uv, x, Bv, Cv, zv, bias):
    """A prefetched step's inputs in float32, delta with its bias added."""
    return uv.to(tl.float32), x.to(tl.float32) + bias, Bv.to(tl.float32), Cv.to(tl.float32), zv.to(tl.float32)


@_device_fn
def _load_step(u_row, dl_row, z_row, B_row, C_row, t, ok, cm, nm, su_l, sd_l, sz_l, sB_l, sC_l,
               HAS_Z: tl.constexpr):
    """u, delta, B, C, z of time step t (in their own dtypes; zeros where not ``ok``)."""
    # (a block mask and the scalar ok: tl.where, not `cm & ok`, which Triton 3.9's interpreter
    # broadcasts as int32 data that tl.load then refuses, "mask has unsupported dtype"; the same
    # below)
    mc = tl.where(ok, cm, False)
    mn = tl.where(ok, nm, False)
    uv = tl.load(u_row + t * su_l, mask=mc, other=0.0)
    x = tl.load(dl_row + t * sd_l, mask=mc, other=0.0)
    Bv = tl.load(B_row + t * sB_l, mask=mn, other=0.0)
    Cv = tl.load(C_row + t * sC_l, mask=mn, other=0.0)
    if HAS_Z:
        zv = tl.load(z_row + t * sz_l, mask=mc, other=0.0)
    else:
        zv = uv
    return uv, x, Bv, Cv, zv


def _fwd(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, out_ptr, hs_ptr, last_ptr,
         L, d, dg, nblk, rB, rC,
         su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l,
         sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sA_d, sA_n, so_b, so_d, so_l,
         N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
         HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
         REVERSE: tl.constexpr, ACC_OUT: tl.constexpr, STAGES: tl.constexpr):
    bi, pid, gi, blk, c, cm, n, nm, m2, A, Dv, bias, u_row, dl_row, z_row, B_row, C_row = _program_rows(
        u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, dg, nblk, rB, rC,
        su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sA_d, sA_n,
        N, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    o_row = out_ptr + bi * so_b + c * so_d
    nchunk = tl.cdiv(L, K)
    hs_tile = hs_ptr + bi * nchunk * d * N + c[:, None] * N + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    # each step's inputs are loaded one step ahead so that their latency overlaps the
    # current step's arithmetic (Triton's pipeliner leaves these small vectors alone)
    if REVERSE:
        t = L - 1
    else:
        t = 0
    un, xn, Bn, Cn, zn = _load_step(u_row, dl_row, z_row, B_row, C_row, t, L > 0, cm, nm,
                                    su_l, sd_l, sz_l, sB_l, sC_l, HAS_Z)
    # (and the other direction's output, where this one adds to it: prefetched the same way, not
    # by Triton's pipeliner, which held it at a cost of ~60 registers a thread; FWD_STAGES)
    if ACC_OUT:
        on = tl.load(o_row + t * so_l, mask=tl.where(L > 0, cm, False), other=0.0)
    else:
        on = un
    for k in range(0, nchunk):
        tl.store(hs_tile + k * d * N, h, mask=m2)
        for j in tl.range(0, tl.minimum(K, L - k * K), num_stages=STAGES):
            s = k * K + j
            if REVERSE:
                t = L - 1 - s
                tn = t - 1
            else:
                t = s
                tn = t + 1
            uv, x, Bv, Cv, zv = _f32_step(un, xn, Bn, Cn, zn, bias)
            ov = on
            un, xn, Bn, Cn, zn = _load_step(u_row, dl_row, z_row, B_row, C_row, tn, s + 1 < L, cm, nm,
                                            su_l, sd_l, sz_l, sB_l, sC_l, HAS_Z)
            if ACC_OUT:
                on = tl.load(o_row + tn * so_l, mask=tl.where(s + 1 < L, cm, False), other=0.0)
            if SOFTPLUS:
                x = _softplus(x)
            dt = tl.where(cm, x, 0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * uv)[:, None] * Bv[None, :]
            y = tl.sum(h * Cv[None, :], axis=1) + Dv * uv
            if HAS_Z:
                y = y * zv / (1.0 + tl.exp(-zv))
            if ACC_OUT:   # the other direction's output, already there (BiScanTriton)
                y += ov.to(tl.float32)
            tl.store(o_row + t * so_l, y.to(out_ptr.dtype.element_ty), mask=cm)
    tl.store(last_ptr + bi * d * N + c[:, None] * N + n[None, :], h, mask=m2)


@_device_fn
def _linear_combine(a1, b1, a2, b2):
    # h -> a2 * (a1 * h + b1) + b2: two steps of h_t = a_t h_{t-1} + b_t as one
    return a1 * a2, a2 * b1 + b2


def _fwd_tiled(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, out_ptr, hs_ptr, last_ptr,
               L, d, dg, nblk, rB, rC,
               su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l,
               sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sA_d, sA_n, so_b, so_d, so_l,
               N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
               HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               REVERSE: tl.constexpr, ACC_OUT: tl.constexpr, STAGES: tl.constexpr):
    """The forward a chunk of K steps at a time (an experiment, not the default: FORWARD).
    _fwd walks the steps one by one, each waiting on loads issued one step ahead; on an H200
    that loop, not memory, set its time (docs/benchmarks.md, "GPU, first run"). Here each chunk
    loads (channels x K) tiles of u, delta, z and (K x d_state) tiles of B and C at once and
    forms the chunk's states with a parallel scan over time (tl.associative_scan of
    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t), from the state the previous chunk left.
    Same outputs, last state and saved chunk-start states as _fwd (K must be the backward's
    chunk); the same exps, in (BLOCK_D, K, d_state) tiles."""
    bi, pid, gi, blk, c, cm, n, nm, m2, A, Dv, bias, u_row, dl_row, z_row, B_row, C_row = _program_rows(
        u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, dg, nblk, rB, rC,
        su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sA_d, sA_n,
        N, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    o_row = out_ptr + bi * so_b + c * so_d
    nchunk = tl.cdiv(L, K)
    hs_tile = hs_ptr + bi * nchunk * d * N + c[:, None] * N + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    j = tl.arange(0, K)
    for k in range(0, nchunk):
        tl.store(hs_tile + k * d * N, h, mask=m2)
        s = k * K + j
        ok = s < L
        if REVERSE:
            t = L - 1 - s
        else:
            t = s
        mt = cm[:, None] & ok[None, :]                    # (BLOCK_D, K)
        mbc = ok[:, None] & nm[None, :]                   # (K, BLOCK_N)
        uv = tl.load(u_row[:, None] + t[None, :] * su_l, mask=mt, other=0.0).to(tl.float32)
        x = tl.load(dl_row[:, None] + t[None, :] * sd_l, mask=mt, other=0.0).to(tl.float32) + bias[:, None]
        Bv = tl.load(B_row[None, :] + t[:, None] * sB_l, mask=mbc, other=0.0).to(tl.float32)
        Cv = tl.load(C_row[None, :] + t[:, None] * sC_l, mask=mbc, other=0.0).to(tl.float32)
        if SOFTPLUS:
            x = _softplus(x)
        dt = tl.where(mt, x, 0.0)          # steps past the end: exp(0) = 1, nothing added
        a = tl.exp(dt[:, :, None] * A[:, None, :])
        b = (dt * uv)[:, :, None] * Bv[None, :, :]
        ac, bc = tl.associative_scan((a, b), axis=1, combine_fn=_linear_combine)
        hh = ac * h[:, None, :] + bc                      # the state after each step of the chunk
        y = tl.sum(hh * Cv[None, :, :], axis=2) + Dv[:, None] * uv
        if HAS_Z:
            zv = tl.load(z_row[:, None] + t[None, :] * sz_l, mask=mt, other=0.0).to(tl.float32)
            y = y * zv / (1.0 + tl.exp(-zv))
        if ACC_OUT:
            y += tl.load(o_row[:, None] + t[None, :] * so_l, mask=mt, other=0.0).to(tl.float32)
        tl.store(o_row[:, None] + t[None, :] * so_l, y.to(out_ptr.dtype.element_ty), mask=mt)
        h = tl.sum(tl.where((j == K - 1)[None, :, None], hh, 0.0), axis=1)
    tl.store(last_ptr + bi * d * N + c[:, None] * N + n[None, :], h, mask=m2)


@_device_fn
def _bwd_rows(go_ptr, du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, hs_ptr, glast_ptr, bi, gi, blk, c, n, m2, nblk,
              L, d, sg_b, sg_d, so_b, so_d, N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              K: tl.constexpr, HAS_GLAST: tl.constexpr):
    """A backward program's row pointers (dy; du, ddelta, dz, which share one layout, strides
    so_*; its dB/dC partials, (b, G, nblk, L, N) contiguous), its chunk-start states, and
    dL/d(last state) (zeros without one)."""
    G = tl.num_programs(1) // nblk
    g_row = go_ptr + bi * sg_b + c * sg_d
    du_row = du_ptr + bi * so_b + c * so_d
    ddl_row = ddl_ptr + bi * so_b + c * so_d
    dz_row = dz_ptr + bi * so_b + c * so_d
    part = dBp_ptr + ((bi * G + gi) * nblk + blk) * L * N + n
    partC = dCp_ptr + ((bi * G + gi) * nblk + blk) * L * N + n
    nchunk = tl.cdiv(L, K)
    hs_tile = hs_ptr + bi * nchunk * d * N + c[:, None] * N + n[None, :]
    if HAS_GLAST:
        glast = tl.load(glast_ptr + bi * d * N + c[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
    else:
        glast = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    return g_row, du_row, ddl_row, dz_row, part, partC, nchunk, hs_tile, glast


@_device_fn
def _bwd_store_sums(dAp_ptr, dDp_ptr, dbp_ptr, bi, d, c, n, cm, m2, dA_acc, dD_acc, db_acc, N: tl.constexpr,
                    NEED_DA: tl.constexpr):
    """The program's sums over time of dA, dD and d delta_bias (per batch row: torch sums them)."""
    if NEED_DA:
        tl.store(dAp_ptr + bi * d * N + c[:, None] * N + n[None, :], dA_acc, mask=m2)
    tl.store(dDp_ptr + bi * d + c, dD_acc, mask=cm)
    tl.store(dbp_ptr + bi * d + c, db_acc, mask=cm)


def _bwd(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, hs_ptr, go_ptr, glast_ptr,
         du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbp_ptr, scr_ptr,
         L, d, dg, nblk, rB, rC,
         su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l,
         sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sA_d, sA_n, sg_b, sg_d, sg_l,
         so_b, so_d, so_l,
         N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
         HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
         REVERSE: tl.constexpr, HAS_GLAST: tl.constexpr, ACC_DZ: tl.constexpr, NEED_DA: tl.constexpr,
         STAGES: tl.constexpr):
    bi, pid, gi, blk, c, cm, n, nm, m2, A, Dv, bias, u_row, dl_row, z_row, B_row, C_row = _program_rows(
        u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, dg, nblk, rB, rC,
        su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sA_d, sA_n,
        N, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    g_row, du_row, ddl_row, dz_row, part, partC, nchunk, hs_tile, lam = _bwd_rows(
        go_ptr, du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, hs_ptr, glast_ptr, bi, gi, blk, c, n, m2, nblk,
        L, d, sg_b, sg_d, so_b, so_d, N, BLOCK_D, BLOCK_N, K, HAS_GLAST)
    scr = scr_ptr + (bi * tl.num_programs(1) + pid) * K * BLOCK_D * BLOCK_N \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    db_acc = tl.zeros((BLOCK_D,), tl.float32)
    for kk in range(0, nchunk):
        k = nchunk - 1 - kk
        s0 = k * K
        kn = tl.minimum(K, L - s0)
        h = tl.load(hs_tile + k * d * N, mask=m2, other=0.0)
        # recompute the chunk's states (scratch[j] = state before step j), dz and dC;
        # inputs are loaded one step ahead (see _fwd)
        if REVERSE:
            t = L - 1 - s0
        else:
            t = s0
        un, xn, Bn, Cn, zn = _load_step(u_row, dl_row, z_row, B_row, C_row, t, True, cm, nm,
                                        su_l, sd_l, sz_l, sB_l, sC_l, HAS_Z)
        gn = tl.load(g_row + t * sg_l, mask=cm, other=0.0)
        for j in tl.range(0, kn, num_stages=STAGES):
            if REVERSE:
                t = L - 1 - s0 - j
                tn = t - 1
            else:
                t = s0 + j
                tn = t + 1
            uv, x, Bv, Cv, zv = _f32_step(un, xn, Bn, Cn, zn, bias)
            gv = gn.to(tl.float32)
            un, xn, Bn, Cn, zn = _load_step(u_row, dl_row, z_row, B_row, C_row, tn, j + 1 < kn, cm, nm,
                                            su_l, sd_l, sz_l, sB_l, sC_l, HAS_Z)
            gn = tl.load(g_row + tn * sg_l, mask=tl.where(j + 1 < kn, cm, False), other=0.0)
            tl.store(scr + j * BLOCK_D * BLOCK_N, h)
            if SOFTPLUS:
                x = _softplus(x)
            dt = tl.where(cm, x, 0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * uv)[:, None] * Bv[None, :]
            if HAS_Z:
                sg = 1.0 / (1.0 + tl.exp(-zv))
                y = tl.sum(h * Cv[None, :], axis=1) + Dv * uv
                dzv = gv * y * sg * (1.0 + zv * (1.0 - sg))
                if ACC_DZ:   # the other direction's dz, already there (BiScanTriton)
                    dzv += tl.load(dz_row + t * so_l, mask=cm, other=0.0).to(tl.float32)
                tl.store(dz_row + t * so_l, dzv.to(dz_ptr.dtype.element_ty), mask=cm)
                gv = gv * zv * sg
            dD_acc += gv * uv
            tl.store(partC + t * N, tl.sum(gv[:, None] * h, axis=0), mask=nm)
        tl.debug_barrier()  # scratch written by other threads of this program
        # reverse-time recurrence over the chunk; lam = dL/dh_t; inputs loaded one step ahead
        if REVERSE:
            t = L - s0 - kn
        else:
            t = s0 + kn - 1
        un, xn, Bn, Cn, zn = _load_step(u_row, dl_row, z_row, B_row, C_row, t, True, cm, nm,
                                        su_l, sd_l, sz_l, sB_l, sC_l, HAS_Z)
        gn = tl.load(g_row + t * sg_l, mask=cm, other=0.0)
        for jj in tl.range(0, kn, num_stages=STAGES):
            j = kn - 1 - jj
            if REVERSE:
                t = L - 1 - s0 - j
                tn = t + 1
            else:
                t = s0 + j
                tn = t - 1
            uv, xr, Bv, Cv, zv = _f32_step(un, xn, Bn, Cn, zn, bias)
            gv = gn.to(tl.float32)
            un, xn, Bn, Cn, zn = _load_step(u_row, dl_row, z_row, B_row, C_row, tn, j > 0, cm, nm,
                                            su_l, sd_l, sz_l, sB_l, sC_l, HAS_Z)
            gn = tl.load(g_row + tn * sg_l, mask=tl.where(j > 0, cm, False), other=0.0)
            hp = tl.load(scr + j * BLOCK_D * BLOCK_N)
            x = xr
            if SOFTPLUS:
                x = _softplus(x)
            dt = tl.where(cm, x, 0.0)
            if HAS_Z:
                gv = gv * zv / (1.0 + tl.exp(-zv))
            e = tl.exp(dt[:, None] * A)
            lam = lam + gv[:, None] * Cv[None, :]
            q = lam * hp * e                     # dL/d(delta*A), per state
            dtu = dt * uv
            tl.store(part + t * N, tl.sum(lam * dtu[:, None], axis=0), mask=nm)
            s1 = tl.sum(lam * Bv[None, :], axis=1)
            s2 = tl.sum(q * A, axis=1)
            if NEED_DA:   # (a frozen A, every method but full fine-tuning: not kept in registers)
                dA_acc += q * dt[:, None]
            lam = e * lam
            ddt = s2 + s1 * uv
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-xr))
            ddt = tl.where(cm, ddt, 0.0)
            db_acc += ddt
            tl.store(du_row + t * so_l, (gv * Dv + s1 * dt).to(du_ptr.dtype.element_ty), mask=cm)
            tl.store(ddl_row + t * so_l, ddt.to(ddl_ptr.dtype.element_ty), mask=cm)
        tl.debug_barrier()  # before the next chunk overwrites the scratch
    _bwd_store_sums(dAp_ptr, dDp_ptr, dbp_ptr, bi, d, c, n, cm, m2, dA_acc, dD_acc, db_acc, N, NEED_DA)


def _bwd_tiled(u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, hs_ptr, go_ptr, glast_ptr,
               du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbp_ptr, scr_ptr,
               L, d, dg, nblk, rB, rC,
               su_b, su_d, su_l, sd_b, sd_d, sd_l, sz_b, sz_d, sz_l,
               sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sA_d, sA_n, sg_b, sg_d, sg_l,
               so_b, so_d, so_l,
               N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
               HAS_Z: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               REVERSE: tl.constexpr, HAS_GLAST: tl.constexpr, ACC_DZ: tl.constexpr, NEED_DA: tl.constexpr,
               STAGES: tl.constexpr):
    """The backward a chunk of K steps at a time (an experiment, not the default: BACKWARD),
    chunks from last to first as _bwd, with no scratch: each chunk loads its inputs as tiles
    (and again shifted by one step either way), forms the states before each step by a
    parallel scan over time from the saved chunk-start state, and dL/dh for each step by a
    reversed parallel scan of lam_s = exp(delta_{s+1} A) lam_{s+1} + C_s g_s from what the
    chunk after left. Three exps per state element (steps s-1, s, s+1) where _bwd takes one."""
    bi, pid, gi, blk, c, cm, n, nm, m2, A, Dv, bias, u_row, dl_row, z_row, B_row, C_row = _program_rows(
        u_ptr, dl_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, dg, nblk, rB, rC,
        su_b, su_d, sd_b, sd_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sA_d, sA_n,
        N, BLOCK_D, BLOCK_N, HAS_D, HAS_BIAS)
    g_row, du_row, ddl_row, dz_row, part, partC, nchunk, hs_tile, carry = _bwd_rows(
        go_ptr, du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, hs_ptr, glast_ptr, bi, gi, blk, c, n, m2, nblk,
        L, d, sg_b, sg_d, so_b, so_d, N, BLOCK_D, BLOCK_N, K, HAS_GLAST)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    db_acc = tl.zeros((BLOCK_D,), tl.float32)
    j = tl.arange(0, K)
    for kk in range(0, nchunk):
        k = nchunk - 1 - kk
        s = k * K + j
        kn = tl.minimum(K, L - k * K)
        ok = j < kn
        okp = (j >= 1) & ok                  # step s - 1 inside the chunk
        okn = (j + 1) < kn                   # step s + 1 inside the chunk
        if REVERSE:
            t = L - 1 - s
            tp = t + 1
            tn = t - 1
        else:
            t = s
            tp = t - 1
            tn = t + 1
        mt = cm[:, None] & ok[None, :]
        mp = cm[:, None] & okp[None, :]
        mn = cm[:, None] & okn[None, :]
        # this step's inputs, (BLOCK_D, K) and (K, BLOCK_N)
        uv = tl.load(u_row[:, None] + t[None, :] * su_l, mask=mt, other=0.0).to(tl.float32)
        xr = tl.load(dl_row[:, None] + t[None, :] * sd_l, mask=mt, other=0.0).to(tl.float32) + bias[:, None]
        Bv = tl.load(B_row[None, :] + t[:, None] * sB_l, mask=ok[:, None] & nm[None, :], other=0.0).to(tl.float32)
        Cv = tl.load(C_row[None, :] + t[:, None] * sC_l, mask=ok[:, None] & nm[None, :], other=0.0).to(tl.float32)
        gv = tl.load(g_row[:, None] + t[None, :] * sg_l, mask=mt, other=0.0).to(tl.float32)
        # the previous step's (for the states before each step) and the next step's delta
        up = tl.load(u_row[:, None] + tp[None, :] * su_l, mask=mp, other=0.0).to(tl.float32)
        xp = tl.load(dl_row[:, None] + tp[None, :] * sd_l, mask=mp, other=0.0).to(tl.float32) + bias[:, None]
        Bp = tl.load(B_row[None, :] + tp[:, None] * sB_l, mask=okp[:, None] & nm[None, :], other=0.0).to(tl.float32)
        xn = tl.load(dl_row[:, None] + tn[None, :] * sd_l, mask=mn, other=0.0).to(tl.float32) + bias[:, None]
        x = xr
        if SOFTPLUS:
            x = _softplus(x)
            xp = _softplus(xp)
            xn = _softplus(xn)
        dt = tl.where(mt, x, 0.0)
        dtp = tl.where(mp, xp, 0.0)          # outside the chunk: exp(0) = 1, nothing added
        dtn = tl.where(mn, xn, 0.0)
        e = tl.exp(dt[:, :, None] * A[:, None, :])
        # states before each step: an inclusive scan of the previous steps' updates
        ap, bp = tl.associative_scan((tl.exp(dtp[:, :, None] * A[:, None, :]),
                                      (dtp * up)[:, :, None] * Bp[None, :, :]), axis=1, combine_fn=_linear_combine)
        h0 = tl.load(hs_tile + k * d * N, mask=m2, other=0.0)
        hp = ap * h0[:, None, :] + bp
        dtu = dt * uv
        h = e * hp + dtu[:, :, None] * Bv[None, :, :]
        if HAS_Z:
            zv = tl.load(z_row[:, None] + t[None, :] * sz_l, mask=mt, other=0.0).to(tl.float32)
            sg = 1.0 / (1.0 + tl.exp(-zv))
            y = tl.sum(h * Cv[None, :, :], axis=2) + Dv[:, None] * uv
            dzv = gv * y * sg * (1.0 + zv * (1.0 - sg))
            if ACC_DZ:
                dzv += tl.load(dz_row[:, None] + t[None, :] * so_l, mask=mt, other=0.0).to(tl.float32)
            tl.store(dz_row[:, None] + t[None, :] * so_l, dzv.to(dz_ptr.dtype.element_ty), mask=mt)
            gv = gv * zv * sg
        dD_acc += tl.sum(gv * uv, axis=1)
        tl.store(partC[None, :] + t[:, None] * N, tl.sum(gv[:, :, None] * h, axis=0), mask=ok[:, None] & nm[None, :])
        # dL/dh_s: lam_s = exp(delta_{s+1} A) lam_{s+1} + C_s g_s, the chunk's last step taking
        # what the chunk after left (already multiplied by its first step's exp)
        pa, pb = tl.associative_scan((tl.exp(dtn[:, :, None] * A[:, None, :]), gv[:, :, None] * Cv[None, :, :]),
                                     axis=1, combine_fn=_linear_combine, reverse=True)
        lam = pa * carry[:, None, :] + pb
        q = lam * hp * e                                  # dL/d(delta*A), per state
        tl.store(part[None, :] + t[:, None] * N, tl.sum(lam * dtu[:, :, None], axis=0),
                 mask=ok[:, None] & nm[None, :])
        s1 = tl.sum(lam * Bv[None, :, :], axis=2)
        s2 = tl.sum(q * A[:, None, :], axis=2)
        if NEED_DA:
            dA_acc += tl.sum(q * dt[:, :, None], axis=1)
        ddt = s2 + s1 * uv
        if SOFTPLUS:
            ddt = ddt / (1.0 + tl.exp(-xr))
        ddt = tl.where(mt, ddt, 0.0)
        db_acc += tl.sum(ddt, axis=1)
        tl.store(du_row[:, None] + t[None, :] * so_l, (gv * Dv[:, None] + s1 * dt).to(du_ptr.dtype.element_ty),
                 mask=mt)
        tl.store(ddl_row[:, None] + t[None, :] * so_l, ddt.to(ddl_ptr.dtype.element_ty), mask=mt)
        carry = tl.sum(tl.where((j == 0)[None, :, None], e * lam, 0.0), axis=1)
    _bwd_store_sums(dAp_ptr, dDp_ptr, dbp_ptr, bi, d, c, n, cm, m2, dA_acc, dD_acc, db_acc, N, NEED_DA)


def _sum_mid(p_ptr, out_ptr, NS, INNER, SPAN, BLOCK: tl.constexpr, F64: tl.constexpr):
    # out[o, k, i] = sum of p[o, s, i] over s in span k = [k SPAN, (k + 1) SPAN), in float64 and
    # in the order of s; rounded through float32 unless the output is float64 (as torch rounds
    # a double to bfloat16 or half)
    o = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    k = tl.program_id(2)
    m = i < INNER
    src = p_ptr + o * NS * INNER + i
    acc = tl.zeros((BLOCK,), tl.float64)
    for s in range(k * SPAN, tl.minimum(NS, k * SPAN + SPAN)):
        acc += tl.load(src + s * INNER, mask=m, other=0.0).to(tl.float64)
    dst = out_ptr + (o * tl.num_programs(2) + k) * INNER + i
    if F64:
        tl.store(dst, acc, mask=m)
    else:
        tl.store(dst, acc.to(tl.float32).to(out_ptr.dtype.element_ty), mask=m)


SUM_BLOCK = 1024     # columns a program
SUM_SPAN = 32        # the most terms one program adds in turn when the grid would be small
SUM_PROGRAMS = 512   # below this many (outer x column blocks) programs, long sums go in two stages


def fixed_sum(P: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """P (float32) summed over ``dim`` in float64, in a fixed order, as ``dtype``: the backward's
    per-program partial sums reduced without atomics, so the same bits on every run. A kernel
    reading P once, where ``P.sum(dim, dtype=torch.float64).to(dtype)`` first writes P as float64
    (at Vim-S batch 128 the dB / dC partials took 43 us to copy and 25 us to sum a call on an
    H200, docs/benchmarks.md "GPU, second run"; reading them once is ~10 us of HBM bandwidth).
    Each program adds its terms in turn, one load's latency each; a long sum over a small grid
    (dD's over the batch: one program would add 128 rows in turn) goes in two stages instead,
    spans of SUM_SPAN terms and then the spans' sums, each in index order."""
    P = P.contiguous()
    shape = P.shape[:dim] + P.shape[dim + 1:]
    outer = 1
    for n in P.shape[:dim]:
        outer *= n
    ns = P.shape[dim]
    inner = P[(0,) * (dim + 1)].numel() if P.numel() else 0
    if not (outer and inner):
        return torch.zeros(shape, dtype=dtype, device=P.device)
    (kernel,) = jitted(_sum_mid)
    cols = triton.cdiv(inner, SUM_BLOCK)
    if ns > SUM_SPAN and outer * cols < SUM_PROGRAMS:
        spans = triton.cdiv(ns, SUM_SPAN)
        part = torch.empty(outer, spans, inner, dtype=torch.float64, device=P.device)
        _launch(kernel, (outer, cols, spans), P, part, ns, inner, SUM_SPAN, BLOCK=SUM_BLOCK, F64=True,
                num_warps=4)
        return fixed_sum(part, 1, dtype).reshape(shape)
    out = torch.empty(shape, dtype=dtype, device=P.device)
    _launch(kernel, (outer, cols, 1), P, out, ns, inner, ns, BLOCK=SUM_BLOCK, F64=dtype == torch.float64,
            num_warps=4)
    return out


_jitted: dict = {}


def jitted(*fns):
    """Kernels (plain functions) compiled for the GPU, or wrapped for Triton's interpreter when
    TRITON_INTERPRET=1 at call time (triton.jit reads it once, at decoration); made once each
    way, and shared by every module's kernels (conv_triton's too)."""
    key = (interpreting(),) + fns
    if key not in _jitted:
        if key[0]:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            wrap = JITFunction
        _jitted[key] = tuple(map(wrap, fns))
    return _jitted[key]


def _kernels():
    """(forward, backward): the loop or the tiled kernels, as FORWARD and BACKWARD say."""
    fwd, bwd, fwd_tiled, bwd_tiled = jitted(_fwd, _bwd, _fwd_tiled, _bwd_tiled)
    return (fwd_tiled if FORWARD == "tiled" else fwd), (bwd_tiled if BACKWARD == "tiled" else bwd)


class _library_interpreted:
    """While interpreting, let Triton's own @jit library functions (tl.sum, tl.cdiv, ...) and
    ours (_softplus, _program_rows, _load_step, ...) run interpreted. They were decorated when triton was imported; if TRITON_INTERPRET was
    not set then (e.g. it is set later by a test or by ``svp doctor``), calling them from an
    interpreted kernel would raise instead. Also makes Triton 3.6's interpreter work with
    NumPy >= 2.4 (see __enter__)."""

    def __enter__(self):
        from triton.runtime import interpreter
        self.cls, self.old = JITFunction, JITFunction.__dict__.get("__call__")
        cache: dict = {}

        def call(jf, *args, **kwargs):
            if jf.fn not in cache:
                cache[jf.fn] = interpreter.InterpretedFunction(jf.fn)
            f = cache[jf.fn]
            patch, rewrite = getattr(interpreter, "_patch_lang", None), getattr(f, "rewrite", None)
            if patch is None or rewrite is None:
                return f(*args, **kwargs)
            # InterpretedFunction.__call__ would leave triton.language patched for the
            # interpreter after the kernel ends, and a later GPU compile in this process fail
            scope = patch(jf.fn)
            try:
                return rewrite()(*args, **kwargs)
            finally:
                if hasattr(scope, "restore"):
                    scope.restore()

        JITFunction.__call__ = call
        # Triton < 3.7's interpreter turns a scalar (a 1-element array) into a loop bound with
        # int(array), which NumPy >= 2.4 refuses for arrays of ndim > 0 ("only 0-dimensional
        # arrays can be converted to Python scalars"): our range(0, nchunk) loops need it.
        # Triton 3.7+ squeezes first; do the same on every version (no change there).
        self.patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
        if self.patch_tensor is not None:
            orig = self.patch_tensor

            def patch_tensor(tensor, *rest):
                orig(tensor, *rest)
                scope = rest[0] if rest and hasattr(rest[0], "set_attr") else None
                index = lambda t: int(t.handle.data.squeeze())  # noqa: E731
                if scope is not None:
                    scope.set_attr(tensor, "__index__", index)
                else:
                    tensor.__index__ = index

            interpreter._patch_lang_tensor = patch_tensor
        self.interpreter = interpreter

    def __exit__(self, *exc):
        if self.old is None:
            del self.cls.__call__
        else:
            self.cls.__call__ = self.old
        if self.patch_tensor is not None:
            self.interpreter._patch_lang_tensor = self.patch_tensor


# Compile options every launch asks for, whatever Triton's defaults: FMA contraction (a*b + c in
# one rounding) is on by default up to Triton 3.9, which warns that 3.10 turns it off; the kernels'
# registers, timings and bits were measured with it on (the interpreter ignores the option)
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def launch_options() -> dict:
    """:data:`LAUNCH_OPTIONS`, unless the user set Triton's own switch for that default,
    TRITON_DEFAULT_FP_FUSION (Triton >= 3.9): theirs then decides."""
    return {} if "TRITON_DEFAULT_FP_FUSION" in os.environ else LAUNCH_OPTIONS


def _launch(kernel, grid, *args, **kwargs):
    kwargs = {**launch_options(), **kwargs}
    if interpreting():
        with _library_interpreted():
            kernel[grid](*args, **kwargs)
        return
    # Triton launches on the current CUDA device, not on its tensors' one: a model on cuda:1 in a
    # process whose current device is cuda:0 (no torch.cuda.set_device, as in a notebook) would
    # otherwise run its kernels on the wrong GPU
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    with torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **kwargs)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def check_tensors(op: str, named, dtypes=DTYPES, advice: str | None = None) -> None:
    """What every Triton op here asks of its tensors: raise BackendError unless each of ``named``
    ((name, tensor or None) pairs) has one of ``dtypes`` (a tuple, or a function of the name
    giving one), all sit on the first one's device, and that device is CUDA or Triton's
    interpreter runs. ``op`` begins each message ("the Triton conv")."""
    first_name, first = next((n, t) for n, t in named if t is not None)
    if advice is None:
        # every Triton op runs because the scan backend is 'triton' (svp.ops.dispatch): a float64
        # model's first refusal came from the conv, with no word of what to run it on instead
        advice = (" (use the 'torch' scan backend for it)" if first.device.type == "cuda" else
                  " (use the 'torch' or 'cpu' scan backend for it)")
    for name, x in named:
        if x is None:
            continue
        ok = dtypes(name) if callable(dtypes) else dtypes
        if x.dtype not in ok:
            kinds = ", ".join(str(d).replace("torch.", "") for d in ok)
            kinds = " or ".join(kinds.rsplit(", ", 1))
            raise BackendError(f"{op} takes {kinds} tensors; {name} is {x.dtype}{advice}")
        if x.device != first.device:
            raise BackendError(f"{op} needs every tensor on one device; {first_name} is on {first.device}, "
                               f"{name} on {x.device}")
    if first.device.type != "cuda" and not interpreting():
        raise BackendError(f"{op} runs on CUDA tensors ({first_name} is on {first.device}); "
                           f"set TRITON_INTERPRET=1 to run it on CPU tensors through Triton's interpreter")


def _check(u, delta, A, B, C, D, z, delta_bias):
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    check_tensors("the 'triton' scan backend", (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C),
                                                ("D", D), ("z", z), ("delta_bias", delta_bias)))
    if A.shape[1] > MAX_D_STATE:
        raise BackendError(f"the 'triton' scan backend supports d_state <= {MAX_D_STATE}; got {A.shape[1]}")


def _geometry(d, N, G, tile=_TILE):
    dg = d // G
    BN = _pow2(N)
    BD = max(1, min(tile // BN, _pow2(dg)))
    return dg, BN, BD, (dg + BD - 1) // BD


def _plan(kind: str, d: int, N: int, G: int):
    """Launch geometry of the ``kind`` ("fwd" or "bwd") kernel: (dg, BLOCK_N, BLOCK_D, nblk,
    num_warps, stages). One warp a program: the forward takes blocks of 1024 / BLOCK_N channels
    (64 at d_state 16: 32 state floats a thread), the backward of 512 / BLOCK_N (32: 16 a
    thread). Measured on an H200 (Triton 3.6, Vim-S mixer at batch 128, bf16 inputs;
    benchmarks/triton_sweep.py, docs/benchmarks.md "GPU, second run"): the forward took 0.244
    ms at 64 channels on one warp, 0.284 at 32, 0.445-0.55 at 32 on 2 or 4 warps; the backward
    1.25 ms at 32 on one warp, 1.51-1.55 at 64 on 1 or 2, 1.92-2.44 at 16 or at 32 on 2-4 warps
    (the first run's choice, 64 at 4 warps forward and 16 at 1 backward, took 0.45 / 1.92 ms).
    One function so that benchmarks/triton_sweep.py can try others; the chunk length is not
    here (the backward must use the forward's: it reads its saved states)."""
    if kind == "fwd" and FORWARD == "tiled":
        # five (BLOCK_D, CHUNK, BLOCK_N) float32 tiles live at once: 8 channels at 16 x 16
        dg, BN, BD, nblk = _geometry(d, N, G, 2048 // CHUNK)
        return dg, BN, BD, nblk, max(1, min(8, BD * BN * CHUNK // 512)), STAGES
    if kind == "bwd" and BACKWARD == "tiled":
        # a dozen (BLOCK_D, CHUNK, BLOCK_N) tiles live at once: 4 channels at 16 x 16
        dg, BN, BD, nblk = _geometry(d, N, G, 1024 // CHUNK)
        return dg, BN, BD, nblk, max(1, min(8, BD * BN * CHUNK // 512)), STAGES
    dg, BN, BD, nblk = _geometry(d, N, G, 2 * _TILE if kind == "fwd" else _TILE)
    return dg, BN, BD, nblk, 1, FWD_STAGES if kind == "fwd" else STAGES


def _bld(like, dtype):
    """An empty (b, d, l) tensor stored as (b, l, d), the layout the model reads back."""
    b, d, L = like.shape
    return torch.empty(b, L, d, dtype=dtype, device=like.device).transpose(1, 2)


def _strides(x):
    return tuple(x.stride())


def _reg_cap(kind):
    return {"maxnreg": MAXNREG[kind]} if MAXNREG[kind] else {}


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, K, out=None):
    """One direction's forward launch: (out, last state, chunk-start states). With ``out``
    given (the other direction's output, BiScanTriton), this direction's output is added to it
    in the kernel."""
    b, d, L = u.shape
    N = A.shape[1]
    gB, gC, G = scan_groups(B, C, d)
    dg, BN, BD, nblk, warps, stages = _plan("fwd", d, N, G)
    if "tiled" in (FORWARD, BACKWARD) and K & (K - 1):
        raise BackendError(f"the tiled Triton kernels (scan_triton.FORWARD, BACKWARD) take a chunk that is a "
                           f"power of two; got {K}")
    nchunk = (L + K - 1) // K
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    acc = out is not None
    out = _bld(u, u.dtype) if out is None else out
    hs = torch.empty(b, nchunk, d, N, dtype=torch.float32, device=u.device)
    last = torch.empty(b, d, N, dtype=torch.float32, device=u.device)
    zz = z if z is not None else u
    fwd, _ = _kernels()
    _launch(fwd, (b, G * nblk),
        u, delta, zz, B4, C4, A, D if D is not None else u, delta_bias if delta_bias is not None else u,
        out, hs, last, L, d, dg, nblk, G // gB, G // gC,
        *_strides(u), *_strides(delta), *_strides(zz), *_strides(B4), *_strides(C4), *_strides(A),
        *_strides(out),
        N=N, BLOCK_D=BD, BLOCK_N=BN, K=K, HAS_Z=z is not None, HAS_D=D is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), REVERSE=bool(reverse), ACC_OUT=acc,
        STAGES=stages, num_warps=warps, **_reg_cap("fwd"))
    return out, last, hs


def _scan_bwd(saved, softplus, reverse, K, dout, dlast, need, dz=None):
    """One direction's backward launch and its sums: the gradients of (u, delta, A, B, C, D,
    z, delta_bias), each None where ``need`` says so. With ``dz`` given (the other direction's
    z gradient, BiScanTriton), this direction's is added to it in the kernel."""
    u, delta, A, B, C, D, z, delta_bias, hs = saved
    b, d, L = u.shape
    N = A.shape[1]
    gB, gC, G = scan_groups(B, C, d)
    dg, BN, BD, nblk, warps, stages = _plan("bwd", d, N, G)
    dev = u.device
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    if dout is None:
        dout = torch.zeros_like(u)
    dout = _time_safe(dout)
    zz = z if z is not None else u
    du = _bld(u, u.dtype)
    ddelta = _bld(u, delta.dtype)
    acc_dz = dz is not None
    if dz is None:
        dz = _bld(u, z.dtype) if z is not None else du
    f32 = dict(dtype=torch.float32, device=dev)
    dBp = torch.empty(b, G, nblk, L, N, **f32)
    dCp = torch.empty(b, G, nblk, L, N, **f32)
    dAp = torch.empty(b, d, N, **f32) if need[2] else hs   # (not written without need[2])
    dDp = torch.empty(b, d, **f32)
    dbp = torch.empty(b, d, **f32)
    # the loop backward's per-program scratch (the tiled one keeps the chunk in registers)
    scr = torch.empty(1 if BACKWARD == "tiled" else b * G * nblk * K * BD * BN, **f32)
    glast = dlast.contiguous() if dlast is not None else hs
    _, bwd = _kernels()
    _launch(bwd, (b, G * nblk),
        u, delta, zz, B4, C4, A, D if D is not None else u, delta_bias if delta_bias is not None else u,
        hs, dout, glast, du, ddelta, dz, dBp, dCp, dAp, dDp, dbp, scr, L, d, dg, nblk, G // gB, G // gC,
        *_strides(u), *_strides(delta), *_strides(zz), *_strides(B4), *_strides(C4), *_strides(A),
        *_strides(dout), *_strides(du),
        N=N, BLOCK_D=BD, BLOCK_N=BN, K=K, HAS_Z=z is not None, HAS_D=D is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, REVERSE=reverse, HAS_GLAST=dlast is not None,
        ACC_DZ=acc_dz, NEED_DA=bool(need[2]), STAGES=stages, num_warps=warps, **_reg_cap("bwd"))

    def chan_sum(P, X):        # (b, G, nblk, L, N) -> shape of X, fixed-order sums
        if (1 if X.dim() == 3 else X.shape[1]) == G:     # X has every scan group: no group sums
            return fixed_sum(P, 2, X.dtype).transpose(2, 3).reshape(X.shape)
        return sum_to_groups(fixed_sum(P, 2, torch.float64).transpose(2, 3), X.shape, X.dtype)

    return (du if need[0] else None,
            ddelta if need[1] else None,
            fixed_sum(dAp, 0, A.dtype) if need[2] else None,
            chan_sum(dBp, B) if need[3] else None,
            chan_sum(dCp, C) if need[4] else None,
            fixed_sum(dDp, 0, D.dtype) if (D is not None and need[5]) else None,
            dz if (z is not None and need[6]) else None,
            fixed_sum(dbp, 0, delta_bias.dtype) if (delta_bias is not None and need[7]) else None)


class SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk):
        K = _chunk_for(chunk, u.shape[-1])
        out, last, hs = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, K)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hs)
        ctx.cfg = (bool(delta_softplus), bool(reverse), K)
        # The last state, which the models never use, gets None in backward, not a zero tensor
        # autograd fills and the kernel reads (one memset of (b, d, N) float32 per call: 48 a
        # Vim-S step, docs/benchmarks.md "GPU, after the second run")
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        return (*_scan_bwd(ctx.saved_tensors, *ctx.cfg, dout, dlast, ctx.needs_input_grad), None, None, None)


class BiScanTriton(torch.autograd.Function):
    """Both directions of a bidirectional mixer as one node, gated by one z: the forward
    direction's scan, then the reverse direction's adding its output to the first's in the
    kernel; backward, the second adds its z gradient to the first's the same way. As two nodes
    the outputs were added by a separate pass (read two, write one) and autograd added the two
    z gradients the same way: two passes over three (b, l, E) tensors and two launches a layer
    fewer. In float32 the same bits as the two nodes and their sums (one addition of the same
    two numbers); in a reduced-precision output the sum is rounded once, not three times.
    Arguments: z (b, E, l), then each direction's (u, delta, A, B, C, D, delta_bias)."""

    @staticmethod
    def forward(ctx, z, u, delta, A, B, C, D, delta_bias, ub, deltab, Ab, Bb, Cb, Db, delta_biasb,
                delta_softplus, chunk):
        K = _chunk_for(chunk, u.shape[-1])
        sp = bool(delta_softplus)
        out, _, hs = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, sp, False, K)
        out, _, hsb = _scan_fwd(ub, deltab, Ab, Bb, Cb, Db, z, delta_biasb, sp, True, K, out=out)
        ctx.save_for_backward(z, u, delta, A, B, C, D, delta_bias, hs, ub, deltab, Ab, Bb, Cb, Db, delta_biasb, hsb)
        ctx.cfg = (sp, K)
        return out

    @staticmethod
    def backward(ctx, dout):
        z, u, delta, A, B, C, D, delta_bias, hs, ub, deltab, Ab, Bb, Cb, Db, delta_biasb, hsb = ctx.saved_tensors
        sp, K = ctx.cfg
        need = ctx.needs_input_grad
        # each direction's needs as _scan_bwd orders them (u, delta, A, B, C, D, z, delta_bias); z's
        # gradient always formed: the first direction writes it, the second adds its own to it
        gf = _scan_bwd((u, delta, A, B, C, D, z, delta_bias, hs), sp, False, K, dout, None,
                       need[1:7] + (True, need[7]))
        dz = gf[6]
        gb = _scan_bwd((ub, deltab, Ab, Bb, Cb, Db, z, delta_biasb, hsb), sp, True, K, dout, None,
                       need[8:14] + (True, need[14]), dz=dz)
        return (dz if need[0] else None, *gf[:6], gf[7], *gb[:6], gb[7], None, None)


def _chunk_for(chunk, L: int) -> int:
    """The chunk the kernels run with: ``chunk`` (checked as the other backends check it), or,
    where it is longer than the sequence, the smallest power of two that holds the sequence (one
    chunk either way, the same steps): the loop backward's scratch is sized by the chunk, and
    chunk=65536 at L=5 took 256 MiB of it (review)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"selective_scan_triton: chunk must be a positive number of steps; got {chunk!r}")
    return min(int(chunk), 1 << max(0, L - 1).bit_length()) if L > 0 else int(chunk)


OFFSET_LIMIT = 2**31   # the int32 the kernels form time offsets in


def _time_safe(t, dim: int = -1):
    """``t`` with time along ``dim`` (the scan's (..., L), the conv's (b, L, d): dim 1), copied
    contiguous where its time offsets ``t * stride`` would pass int32 (the kernels form them in 32
    bits: a time-major view with L*b*d >= 2**31 read wrong steps, or crashed: review); as it is
    otherwise (no copy)."""
    if t is None or t.dim() == 0 or t.shape[dim] < 2 or (t.shape[dim] - 1) * abs(t.stride(dim)) < OFFSET_LIMIT:
        return t
    return t.contiguous()


def _vec(t):
    # the kernels read a (d,) vector (and the prompts' weights) at unit stride: a strided or expanded
    # one (D[::2]) was read wrong, or past its storage (review); a contiguous one is returned as it
    # is, no copy, no node
    return t.contiguous() if t is not None else None


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, reverse=False, chunk=CHUNK):
    """Triton selective scan. Same arguments as ``selective_scan_ref`` plus ``reverse``."""
    _check(u, delta, A, B, C, D, z, delta_bias)
    _chunk_for(chunk, u.shape[-1])   # (a bad chunk named before anything runs)
    u, delta, B, C, z = (_time_safe(t) for t in (u, delta, B, C, z))
    out, last = SelectiveScanTriton.apply(u, delta, A, B, C, _vec(D), z, _vec(delta_bias), delta_softplus, reverse,
                                          chunk)
    return (out, last) if return_last_state else out


def bidirectional_scan_triton(z, fwd, bwd, delta_softplus=True, chunk=CHUNK):
    """out_f + out_b of two scans gated by one ``z`` (b, E, l): ``fwd`` and ``bwd`` are each
    direction's (u, delta, A, B, C, D, delta_bias) in ``selective_scan_triton``'s layout, the
    second scanned in reverse; one node, BiScanTriton. Returns (b, E, l) in u's dtype."""
    if z is None or len(fwd) != 7 or len(bwd) != 7:
        raise ValueError("bidirectional_scan_triton takes z and two (u, delta, A, B, C, D, delta_bias)")
    for u, delta, A, B, C, D, bias in (fwd, bwd):
        _check(u, delta, A, B, C, D, z, bias)
    if fwd[0].shape != bwd[0].shape or fwd[0].dtype != bwd[0].dtype:
        raise ValueError(f"the two directions' u differ: {tuple(fwd[0].shape)} {fwd[0].dtype}, "
                         f"{tuple(bwd[0].shape)} {bwd[0].dtype}")
    _chunk_for(chunk, fwd[0].shape[-1])
    fwd, bwd = (tuple(_time_safe(t) if i in (0, 1, 3, 4) else t for i, t in enumerate(d[:5]))
                + (_vec(d[5]), _vec(d[6])) for d in (fwd, bwd))
    return BiScanTriton.apply(_time_safe(z), *fwd, *bwd, delta_softplus, chunk)
