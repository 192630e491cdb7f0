"""Launch-geometry sweep of the Triton selective scan (issue 11): which channel block,
warp count, pipelining depth and chunk length are fastest on this GPU, and how the
experimental tiled kernels (scan_triton.FORWARD / BACKWARD = "tiled") compare; and the tiles
and the two backward forms of the mixer's conv (svp.ops.conv_triton).

    PYTHONPATH=src python benchmarks/triton_sweep.py OUTDIR [--budget-s 120] [--parts loop,tiled,conv,regs]
    PYTHONPATH=src python benchmarks/triton_sweep.py OUTDIR --dry-run   # CPU interpreter, tiny

One direction of one Vim-S mixer (d_inner 768, L 197, N 16) at batch 128, bfloat16 inputs
(benchmarks/scan.py's layout: (b, d, l) views of (b, l, d) tensors), the shape of issue 11's
targets. For each geometry the forward and the backward are timed apart (CUDA events around
20 launches, best of 3), each beside the HBM-bandwidth bound of gpu_check.py (bytes the pass
must move / bandwidth of a large device-to-device copy measured in this run), and the output
and every gradient are compared with the default geometry's (a geometry changes summation
order only). The default geometry is svp.ops.scan_triton._plan (the first row: each kernel's
own); the sweep replaces it. The regs part caps the registers a thread of both kernels may use
(scan_triton.MAXNREG) at the default geometry.
The conv part times the conv + SiLU of the same mixer (x a strided bf16 view, as in_proj's
output gives it) for each (BLOCK_L, BLOCK_D, num_warps) tile and backward form, beside the
bytes it must move (forward: read x, write out; backward: read x and dout, write dx).
Writes OUTDIR/triton_sweep.json and .md after every geometry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from gpu_check import copy_bandwidth, scan_bytes, sync  # noqa: E402
from scan import make_inputs  # noqa: E402
from svp.io import atomic_write_text  # noqa: E402
from svp.ops import scan_triton as st  # noqa: E402

# (BLOCK_D, num_warps) pairs: 2 to 32 state floats per thread at N = 16 (the first GPU run
# tried 1 to 8, the second 1 to 16: docs/benchmarks.md, "GPU, first run", "GPU, second run";
# 16 was fastest, 32 channels on one warp)
GEOMETRIES = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 1), (64, 2), (64, 4), (128, 2), (128, 4),
              (256, 4), (256, 8)]
# the experimental tiled kernels (scan_triton.FORWARD / BACKWARD = "tiled"), (BLOCK_D,
# num_warps); a tiled forward's rows time the default backward and the other way round
TILED_FWD = [(4, 2), (8, 2), (8, 4), (16, 4), (16, 8)]
TILED_BWD = [(2, 1), (2, 2), (4, 2), (4, 4), (8, 4)]
STAGES = (1, 3)
CHUNKS = (8, 32, 64)
# the conv's (BLOCK_L, BLOCK_D, num_warps) tiles, each with both backward forms (after the default
# tile, in this order: a sweep cut short by its time budget has the newest). The first three are
# tall: a program's time steps cover half or all of Vim's 197, so the backward's weight and bias
# sums (five reductions over the tile's time steps across lanes and warps, 200-240 shuffles and
# 33-37 barriers in its first kernel's code: benchmarks/triton_asm.py) run once or twice per batch
# row and channel block instead of four times. Compiled as a Vim-S launch (sm_90a, Triton 3.8):
# 88 registers at 128 x 32 on 8 warps, 206 at 256 x 32 on 8 and 202 at 256 x 16 on 4, no spills.
CONV_TILES = [(128, 32, 8), (256, 32, 8), (256, 16, 4), (32, 64, 8), (32, 64, 4), (16, 64, 4), (16, 64, 2),
              (64, 64, 8), (8, 128, 4), (16, 128, 4), (32, 128, 8), (8, 256, 8), (64, 32, 4), (32, 32, 2)]
# register caps a thread (scan_triton.MAXNREG, Triton's maxnreg) for both loop kernels at their
# default geometry. As a Vim-S step's launches compile them (benchmarks/triton_asm.py, sm_90a,
# Triton 3.8) the forward takes 163-168 registers, the backward 157, without spills (12 warps an
# SM at one warp a program): at 168 all fit with none, at 144 one spills 12 bytes (14 warps), at
# 128 32-76 bytes (16 warps). (192, the first choice here, would have raised the backward to 184:
# docs/benchmarks.md, "The Triton kernels as a launch compiles them")
REG_CAPS = (168, 144, 128)
PARTS = ("loop", "tiled", "conv", "regs")


def plan_with(block_d, warps, stages, only=None, default=None):
    """A scan_triton._plan giving (block_d, warps, stages) to both kernels, or to the ``only``
    one ("fwd" or "bwd"; the other keeps ``default``'s)."""
    def plan(kind, d, N, G):
        if only is not None and kind != only:
            return default(kind, d, N, G)
        dg, BN, _, _ = st._geometry(d, N, G)
        BD = min(block_d, st._pow2(dg))
        return dg, BN, BD, (dg + BD - 1) // BD, warps, stages
    return plan


def timed(fn, dev, reps):
    """Best of 3 mean times (ms) of ``reps`` calls of fn."""
    fn()
    sync(dev)
    best = float("inf")
    for _ in range(3):
        if dev.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(reps):
                fn()
            t1.record()
            torch.cuda.synchronize()
            best = min(best, t0.elapsed_time(t1) / reps)
        else:
            w = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - w) * 1e3 / reps)
    return best


def _exp_floor(x_ptr, out_ptr, L, N: tl.constexpr, BLOCK_D: tl.constexpr):
    # exp(delta * A) for every (channel, step, state), as the scan's forward computes it, with
    # no memory traffic: the floor of any kernel that takes one exp per state element
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    a = tl.load(x_ptr + c)
    A = -(tl.arange(0, N) + 1).to(tl.float32)
    acc = tl.zeros((BLOCK_D, N), tl.float32)
    for t in range(0, L):
        dt = a + t * 1e-3
        acc += tl.exp(dt[:, None] * A[None, :])
    tl.store(out_ptr + c, tl.sum(acc, axis=1))


def exp_floor_ms(b, d, L, n, dev, reps):
    """Time (ms) of b*d*L*n exps (and one FMA each) in registers, 64 channels per program."""
    from triton.runtime.jit import JITFunction
    if st.interpreting():
        from triton.runtime.interpreter import InterpretedFunction
        kernel = InterpretedFunction(_exp_floor)
    else:
        kernel = JITFunction(_exp_floor)
    x = torch.rand(b * d, device=dev)
    out = torch.empty_like(x)
    BD = 64 if (b * d) % 64 == 0 else 1
    return timed(lambda: st._launch(kernel, ((b * d) // BD,), x, out, L, N=n, BLOCK_D=BD, num_warps=8), dev, reps)


def run_one(args, dev, chunk, reps):
    xs = [a.detach().clone().requires_grad_() for a in args]
    out = st.selective_scan_triton(*xs[:7], delta_bias=xs[7], delta_softplus=True, chunk=chunk)
    g = torch.ones_like(out)

    def fwd():
        with torch.no_grad():
            st.selective_scan_triton(*xs[:7], delta_bias=xs[7], delta_softplus=True, chunk=chunk)

    def bwd():
        torch.autograd.grad(out, xs, g, retain_graph=True)

    tf, tb = timed(fwd, dev, reps), timed(bwd, dev, reps)
    grads = torch.autograd.grad(out, xs, g, retain_graph=True)
    return tf, tb, [out.detach().float()] + [x.float() for x in grads]


def conv_one(x, w, bias, g, dev, reps):
    from svp.ops.conv_triton import causal_conv1d_triton
    xs = [t.detach().clone().requires_grad_() for t in (x, w, bias)]
    out = causal_conv1d_triton(xs[0], xs[1], xs[2], "silu")

    def fwd():
        with torch.no_grad():
            causal_conv1d_triton(x, w, bias, "silu")

    def bwd():
        torch.autograd.grad(out, xs, g, retain_graph=True)

    tf, tb = timed(fwd, dev, reps), timed(bwd, dev, reps)
    grads = torch.autograd.grad(out, xs, g, retain_graph=True)
    return tf, tb, [out.detach().float()] + [t.float() for t in grads]


def conv_part(res, dev, b, d, L, reps, bw, tiles, t_start, budget_s, save):
    """Rows of res["conv"]: each tile with each backward form, the first row the default."""
    from svp.ops import conv_triton as ct
    gen = torch.Generator(device=dev).manual_seed(0)
    xz = torch.randn(b, L, 2 * d, device=dev, generator=gen).to(torch.bfloat16)
    x = xz[..., :d]                               # in_proj's output: a strided view, read in place
    w = torch.randn(d, 4, device=dev, generator=gen) * 0.5
    bias = torch.randn(d, device=dev, generator=gen) * 0.1
    g = torch.randn(b, L, d, device=dev, generator=gen).to(torch.bfloat16)
    n = b * L * d
    res["conv_bound_fwd_ms"], res["conv_bound_bwd_ms"] = 2 * n * 2 / bw * 1e3, 3 * n * 2 / bw * 1e3
    default = (ct.BLOCK_L, ct.BLOCK_D, ct.WARPS, ct.BACKWARD)
    trials = [default] + [(bl, bd, wp, form) for bl, bd, wp in tiles for form in ("split", "fused")
                          if (bl, bd, wp, form) != default]
    ref, res["conv"] = None, []
    for bl, bd, wp, form in trials:
        row = dict(block_l=bl, block_d=bd, warps=wp, backward=form)
        if time.monotonic() - t_start > budget_s:
            row["skipped"] = "time budget"
        else:
            ct.BLOCK_L, ct.BLOCK_D, ct.WARPS, ct.BACKWARD = bl, bd, wp, form
            try:
                ref = measure(row, lambda: conv_one(x, w, bias, g, dev, reps), res["conv_bound_fwd_ms"],
                              res["conv_bound_bwd_ms"], ref)
            finally:
                ct.BLOCK_L, ct.BLOCK_D, ct.WARPS, ct.BACKWARD = default
        res["conv"].append(row)
        save()
        print(f"triton_sweep: conv {row}", flush=True)


def measure(row, fn, bound_fwd, bound_bwd, ref):
    """Runs fn() -> (forward ms, backward ms, outputs) into ``row``: the times beside their bounds
    and the outputs' largest relative difference from ``ref`` (the first row's). Returns the
    reference for the next rows. One geometry or tile failing to compile must not end the
    sweep: its row says why."""
    try:
        tf, tb, outs = fn()
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return ref
    ref = ref or outs
    row.update(fwd_ms=tf, bwd_ms=tb, fwd_x_bound=tf / bound_fwd, bwd_x_bound=tb / bound_bwd, diff=rel_err(outs, ref))
    return ref


def rel_err(a, b):
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def markdown(res):
    lines = [f"# triton_sweep ({'DRY RUN: CPU interpreter, numbers meaningless' if res['dry_run'] else res['device']})",
             "", f"torch {res['torch']}, Triton {res['triton']}; shape {res['shape']}; copy bandwidth "
             f"{res['copy_GBps']:.1f} GB/s; bounds: fwd {res['bound_fwd_ms']:.4f} ms, bwd {res['bound_bwd_ms']:.4f} ms "
             f"(bytes / copy bandwidth); the forward's exps alone, in registers: "
             f"{res.get('exp_floor_ms', float('nan')):.4f} ms",
             "", "| forward | backward | BLOCK_D | warps | stages | chunk | maxnreg | fwd ms | fwd / bound | bwd ms | "
             "bwd / bound | max rel. diff vs default |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        head = (f"| {r.get('forward', 'loop')} | {r.get('backward', 'loop')} | {r['block_d']} | {r['warps']} | "
                f"{r['stages']} | {r['chunk']} | {r.get('maxnreg', '-')} |")
        if "error" in r or "skipped" in r:
            lines.append(f"{head} {r.get('error') or r.get('skipped')} | | | | |")
            continue
        lines.append(f"{head} {r['fwd_ms']:.4f} | {r['fwd_x_bound']:.2f}x | {r['bwd_ms']:.4f} | "
                     f"{r['bwd_x_bound']:.2f}x | {r['diff']:.1e} |")
    if res.get("conv"):
        lines += ["", f"conv + SiLU (svp.ops.conv_triton), the same mixer, width 4, bf16 x; bounds: fwd "
                  f"{res['conv_bound_fwd_ms']:.4f} ms, bwd {res['conv_bound_bwd_ms']:.4f} ms", "",
                  "| BLOCK_L | BLOCK_D | warps | backward | fwd ms | fwd / bound | bwd ms | bwd / bound | "
                  "max rel. diff vs default |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["conv"]:
            head = f"| {r['block_l']} | {r['block_d']} | {r['warps']} | {r['backward']} |"
            if "error" in r or "skipped" in r:
                lines.append(f"{head} {r.get('error') or r.get('skipped')} | | | | |")
                continue
            lines.append(f"{head} {r['fwd_ms']:.4f} | {r['fwd_x_bound']:.2f}x | {r['bwd_ms']:.4f} | "
                         f"{r['bwd_x_bound']:.2f}x | {r['diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter + tiny shape (logic check)")
    ap.add_argument("--budget-s", type=float, default=120.0, help="stop trying geometries after this long")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="what to sweep, comma-separated: loop (the scan's loop kernels' geometries), tiled "
                         "(the experimental tiled kernels), conv (the conv's tiles and backward forms), regs "
                         "(register caps a thread for the loop kernels)")
    a = ap.parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts takes {', '.join(PARTS)}; got {', '.join(bad)}")
    t_start = time.monotonic()
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        dev, (b, d, L, n), reps = torch.device("cpu"), (1, 32, 9, 4), 1
        geoms, tiled_f, tiled_b, conv_tiles = [(8, 1), (16, 2)], [(8, 2)], [(4, 2)], [(8, 16, 1)]
    else:
        if not torch.cuda.is_available():
            print("triton_sweep: no CUDA GPU here (use --dry-run to check the script on a CPU)", file=sys.stderr)
            return 2
        dev, (b, d, L, n), reps = torch.device("cuda"), (128, 768, 197, 16), 20
        geoms, tiled_f, tiled_b, conv_tiles = GEOMETRIES, TILED_FWD, TILED_BWD, CONV_TILES
    args = [x.to(dev) for x in make_inputs(b, d, L=L, n=n)]
    for i in (0, 1, 3, 4, 6):                      # u, delta, B, C, z in bfloat16
        args[i] = args[i].to(torch.bfloat16)
    bw = copy_bandwidth(dev, 16 if a.dry_run else 2048)
    bf, bfb = scan_bytes(b, d, L, n, 2)
    st.FORWARD = st.BACKWARD = "loop"
    dg, BN, BD0, _, W0, S0 = st._plan("fwd", d, n, 1)
    res = dict(dry_run=a.dry_run, device=torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
               torch=torch.__version__, triton=st.version(), shape=f"b={b} d={d} L={L} N={n} bfloat16",
               copy_GBps=bw / 1e9, bound_fwd_ms=bf / bw * 1e3, bound_bwd_ms=(bfb - bf) / bw * 1e3,
               default=dict(block_d=BD0, warps=W0, stages=S0, chunk=st.CHUNK), rows=[])
    try:
        res["exp_floor_ms"] = exp_floor_ms(b, d, L, n, dev, reps)
    except Exception as e:
        res["exp_floor_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    os.makedirs(a.outdir, exist_ok=True)

    def save():
        res["wall_s"] = time.monotonic() - t_start
        atomic_write_text(os.path.join(a.outdir, "triton_sweep.json"), json.dumps(res, indent=1) + "\n")
        atomic_write_text(os.path.join(a.outdir, "triton_sweep.md"), markdown(res))

    # the default first (the reference of the diff column), then the loop kernels' other
    # geometries, then the tiled kernels (3x slower in the second run: last, budget allowing);
    # the conv's tiles between them
    # (a block_d of None: each kernel's default geometry, _plan as it is)
    trials = [("loop", "loop", None, None, S0, st.CHUNK, None)]
    if "regs" in parts:
        trials += [("loop", "loop", None, None, S0, st.CHUNK, cap) for cap in REG_CAPS]
    if "loop" in parts:
        trials += [("loop", "loop", g, w, S0, st.CHUNK, None) for g, w in geoms]
        trials += [("loop", "loop", BD0, W0, s, st.CHUNK, None) for s in STAGES]
        trials += [("loop", "loop", BD0, W0, S0, k, None) for k in CHUNKS]
    if "tiled" in parts:
        trials += [("tiled", "loop", g, w, S0, st.CHUNK, None) for g, w in tiled_f]
        trials += [("loop", "tiled", g, w, S0, st.CHUNK, None) for g, w in tiled_b]
    default_plan, default_kernels, ref = st._plan, (st.FORWARD, st.BACKWARD), None
    default_caps = dict(st.MAXNREG)
    for i, (forward, backward, block_d, warps, stages, chunk, cap) in enumerate(trials):
        row = dict(forward=forward, backward=backward, block_d=block_d or "default", warps=warps or "default",
                   stages=stages, chunk=chunk, maxnreg=cap or "-")
        if time.monotonic() - t_start > a.budget_s:
            row["skipped"] = "time budget"
        else:
            only = "fwd" if forward == "tiled" else "bwd" if backward == "tiled" else None
            if block_d is not None:
                st._plan = plan_with(block_d, warps, stages, only, default_plan)
            st.FORWARD, st.BACKWARD = forward, backward
            st.MAXNREG.update(fwd=cap, bwd=cap)
            try:
                ref = measure(row, lambda: run_one(args, dev, chunk, reps), res["bound_fwd_ms"],
                              res["bound_bwd_ms"], ref)
            finally:
                st._plan, (st.FORWARD, st.BACKWARD) = default_plan, default_kernels
                st.MAXNREG.update(default_caps)
        res["rows"].append(row)
        save()
        print(f"triton_sweep: {row}", flush=True)
        if "conv" in parts and forward == backward == "loop" and (i + 1 == len(trials) or trials[i + 1][0] == "tiled"
                                                                 or trials[i + 1][1] == "tiled"):
            conv_part(res, dev, b, d, L, reps, bw, conv_tiles, t_start, a.budget_s, save)
    if "conv" in parts and "conv" not in res:
        conv_part(res, dev, b, d, L, reps, bw, conv_tiles, t_start, a.budget_s, save)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
