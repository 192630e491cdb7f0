"""Selective-scan benchmark: every backend against the reference, same run, plus the
machine's memory-bandwidth and FMA-peak lower bounds (measured in the same run).

    .venv/bin/python benchmarks/scan.py [--batches 1 8 32] [--ref-batches 1 8] [--json out.json]

Shapes: one direction of one Vim mixer, L=197, N=16, d_inner 384 (Vim-Tiny) and 768
(Vim-Small), float32, inputs laid out as the model passes them ((b, d, l) views of
(b, l, d) tensors; B, C sliced from one x_proj output), delta_softplus with delta_bias,
D skip and SiLU(z) gate. Times are the best of --reps wall-clock runs, with the heap held as
svp's training holds it (``svp.runtime.held_heap``; before 2026-12-04 it was not, and from Vim-Small
batch 56 on, where the scan's buffers pass glibc's 32 MiB mmap threshold, every call page-faulted
them in afresh: ``--no-held-heap``).

Lower bounds:
* bandwidth: bytes the scan must move (fwd: read u, delta, z, B, C, write out; fwd+bwd
  additionally read u, delta, z, B, C, dout and write du, ddelta, dz, dB, dC) divided by
  the copy bandwidth of a 256 MiB tensor measured here.
* FMA peak: lane operations the scan needs per (b, l, d, n) element divided by the
  machine's measured peak rate of float32 FMA lanes/s (the larger of a float32 matmul
  and a numba loop of independent 16-lane FMAs, both on all threads). Counted per element: forward
  12 = delta*A 1, exp 8 (degree-6 polynomial + range reduction, the least that gives
  1e-7), state update 2, C.h 1; backward 20 = recompute 11, dh += C g 1, q = dh h e 2,
  decay 1, and the dB, dC, dA and delta/u sums 5. The scan's per-(b,l,d) work (softplus,
  gate, D) is left out, so the bound is optimistic.

--frozen times what every method but full fine-tuning runs: A, D and delta_bias are constants
(a frozen backbone), so the backward computes no dA, dD or d_delta_bias (bound 19 per element:
the dA sum left out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
import svp  # noqa: E402,F401  (before torch: the short spin of torch's OpenMP threads, svp.runtime)
import torch  # noqa: E402

from svp.doctor import cpu_name  # noqa: E402
from svp.ops import available_backends, selective_scan, set_backend  # noqa: E402

OPS_FWD, OPS_BWD = 12, 20
FROZEN = (2, 5, 7)   # A, D, delta_bias in make_inputs' order
clock = time.perf_counter
MODELS = {"Vim-Tiny": 384, "Vim-Small": 768}


def measure_bandwidth(mib=256, reps=5):
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x).fill_(0.0)
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best  # bytes read + written per second


def measure_fma_peak():
    """float32 FMA lanes per second: max of a large matmul and a numba FMA loop, timed with
    ``clock`` (process CPU time under --cpu-time, so a descheduled thread does not lower it).

    The loop is written with svp's explicit 16-lane vectors (``svp.ops.simd``), asking for
    512-bit registers as the scan kernels do: ten independent FMA chains per thread, enough to
    cover the FMA latency on two units. An auto-vectorised loop measures less than the machine
    can do where LLVM picks 256-bit vectors (Intel server parts: 49 against 96 G lanes/s at 1
    thread), and the matmul reaches ~90% of the peak, so neither is the bound on its own."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 1e9
    for _ in range(3):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    mm = n ** 3 / best  # one FMA per multiply-add
    loop = 0.0
    try:
        import numba
        from numba import njit, prange
        from svp.ops.scan_cpu import _wide_vectors
        from svp.ops.simd import fma, splat, vload, vstore

        W = 160  # 10 chains of 16 lanes per thread

        @njit(parallel=True, error_model="numpy")
        def fma_loop(acc, reps):
            for t in prange(acc.shape[0] // W):
                _wide_vectors()
                o = t * W
                m, c = splat(np.float32(0.999)), splat(np.float32(0.001))
                a0, a1, a2, a3, a4 = vload(acc, o), vload(acc, o + 16), vload(acc, o + 32), vload(acc, o + 48), \
                    vload(acc, o + 64)
                a5, a6, a7, a8, a9 = vload(acc, o + 80), vload(acc, o + 96), vload(acc, o + 112), \
                    vload(acc, o + 128), vload(acc, o + 144)
                for _ in range(reps):
                    a0, a1, a2, a3, a4 = fma(a0, m, c), fma(a1, m, c), fma(a2, m, c), fma(a3, m, c), fma(a4, m, c)
                    a5, a6, a7, a8, a9 = fma(a5, m, c), fma(a6, m, c), fma(a7, m, c), fma(a8, m, c), fma(a9, m, c)
                for k, v in enumerate((a0, a1, a2, a3, a4, a5, a6, a7, a8, a9)):
                    vstore(acc, o + 16 * k, v)
        nt = numba.get_num_threads()
        acc = np.ones(nt * W, np.float32)
        fma_loop(acc, 10)
        reps = 2_000_000
        b2 = 1e9
        for _ in range(5):
            t0 = clock()
            fma_loop(acc, reps)
            b2 = min(b2, clock() - t0)
        loop = nt * W * reps / b2
    except Exception:
        pass
    return max(mm, loop), mm, loop


def make_inputs(b, d, L=197, n=16, dt_rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt_rank = dt_rank or d // 32
    u = torch.randn(b, L, d, generator=g).transpose(1, 2)
    delta = (torch.randn(b, L, d, generator=g) * 0.5 - 1).transpose(1, 2)
    x = torch.randn(b, L, dt_rank + 2 * n, generator=g)
    B, C = x[:, :, dt_rank:dt_rank + n].transpose(1, 2), x[:, :, dt_rank + n:].transpose(1, 2)
    z = torch.randn(b, L, d, generator=g).transpose(1, 2)
    A = -torch.exp(torch.randn(d, n, generator=g) * 0.5)
    D = torch.ones(d)
    bias = torch.randn(d, generator=g) * 0.1
    return [u, delta, A, B, C, D, z, bias]


def leaf_inputs(args, frozen=()):
    """Leaf copies of make_inputs' tensors in the same layout: u, delta and z stay (b, d, l) views
    of (b, l, d) memory (clone keeps a dense tensor's strides) and B and C stay views of one
    projection, as the models slice them (cloned alone they would become contiguous (b, n, l)
    tensors, which the CPU kernels copy instead of reading the projection's rows)."""
    xs = [a.clone() for a in args]
    B, C = args[3], args[4]
    if B._base is not None and B._base is C._base:
        proj = B._base.clone()
        xs[3] = proj.as_strided(B.shape, B.stride(), B.storage_offset())
        xs[4] = proj.as_strided(C.shape, C.stride(), C.storage_offset())
    return [x.requires_grad_(i not in frozen) for i, x in enumerate(xs)]


def time_backend(name, args, reps, backward, frozen=False):
    xs = leaf_inputs(args, FROZEN if frozen else ())
    # the output gradient exists before the timed backward, as in a model (filling a
    # (b, d, l) tensor of ones inside the timing added ~3% to the cpu backend's fwd+bwd)
    dout = torch.ones_like(args[0]) if backward else None
    set_backend(name)
    try:
        best_f, best_fb = 1e9, 1e9
        for _ in range(reps):
            t0 = clock()
            out = selective_scan(*xs[:7], delta_bias=xs[7], delta_softplus=True)
            t1 = clock()
            best_f = min(best_f, t1 - t0)
            if backward:
                out.backward(dout)
                best_fb = min(best_fb, clock() - t0)
            for x in xs:
                x.grad = None
    finally:
        set_backend(None)
    return best_f * 1e3, (best_fb * 1e3 if backward else None)


def set_threads(n):
    """torch's and numba's thread counts (every benchmark here). svp's kernel module is imported
    first: it picks numba's threading layer, which numba fixes at its first thread launch, and
    ``numba.set_num_threads`` is one."""
    torch.set_num_threads(n)
    try:
        import svp.ops.scan_cpu  # noqa: F401
        import numba
    except ImportError:   # no numba: the fused CPU kernels are not there to thread
        return
    try:
        numba.set_num_threads(n)
    except ValueError as e:   # more than NUMBA_NUM_THREADS: numba's own words, without the traceback
        raise SystemExit(f"{n} threads: {e} (NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS')} "
                         f"fixes numba's pool; unset it or lower --threads)") from None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--ref-batches", type=int, nargs="*", default=[1, 8],
                    help="batches at which the (slow) reference runs; forward+backward at the first only")
    ap.add_argument("--backends", nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=json_path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: all)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the scans and the FMA peak in process CPU time instead of wall clock "
                         "(robust on a shared machine with --threads 1; with more threads the CPU time "
                         "sums them; the copy bandwidth stays wall-clock)")
    ap.add_argument("--frozen", action="store_true",
                    help="A, D and delta_bias without gradients (a frozen backbone's backward)")
    ap.add_argument("--no-held-heap", action="store_true",
                    help="svp's import-time malloc thresholds alone (default: the heap held, as svp's training "
                         "holds it: svp.runtime.held_heap)")
    a = ap.parse_args(argv)
    missing = [b for b in a.backends or () if b not in available_backends()]
    if missing:   # before the bandwidth and FMA measurements, not after them
        ap.error(f"--backends {' '.join(missing)}: not available here (available: {', '.join(available_backends())})")
    from svp import runtime
    with runtime.held_heap(not a.no_held_heap):
        run(a)


def run(a):
    global clock
    ops_bwd = OPS_BWD - 1 if a.frozen else OPS_BWD
    if a.cpu_time:
        clock = time.process_time
    if a.threads:
        set_threads(a.threads)
    backends = a.backends or [n for n in ("cpu", "torch", "cuda", "reference") if n in available_backends()]
    bw = measure_bandwidth()
    peak, mm, loop = measure_fma_peak()
    info = {"machine": f"{cpu_name()}, {os.cpu_count()} cpus, "
                       f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
            "load_average_start": os.getloadavg(), "frozen": a.frozen,
            "copy_bandwidth_GBps": bw / 1e9, "fma_lanes_per_s": peak, "fma_matmul": mm, "fma_numba": loop}
    print(f"# machine: {info['machine']}; load average {os.getloadavg()[0]:.1f}"
          + ("; frozen A, D, delta_bias" if a.frozen else ""))
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s; float32 FMA peak {peak / 1e9:.1f} G lanes/s "
          f"(matmul {mm / 1e9:.1f}, numba loop {loop / 1e9:.1f})")
    rows = []
    for model, d in MODELS.items():
        for b in a.batches:
            if a.cpu_time:  # on a shared machine the rate drifts: re-measure it next to each shape
                peak = measure_fma_peak()[0]
            args = make_inputs(b, d)
            L, n = 197, 16
            el = b * L * d * n
            bytes_f = 4 * (4 * b * L * d + 2 * b * L * n)
            bytes_fb = bytes_f + 4 * (7 * b * L * d + 4 * b * L * n)
            lb = {"bw_f": bytes_f / bw * 1e3, "bw_fb": bytes_fb / bw * 1e3,
                  "fma_f": OPS_FWD * el / peak * 1e3, "fma_fb": (OPS_FWD + ops_bwd) * el / peak * 1e3}
            res = {}
            for name in backends:
                if name == "reference" and b not in a.ref_batches:
                    continue
                back = not (name == "reference" and b != a.ref_batches[0])
                reps = 1 if name == "reference" else (2 if name == "torch" else a.reps)
                time_backend(name, make_inputs(1, d, L=5), 1, True)  # warm-up / compile
                res[name] = time_backend(name, args, reps, back, a.frozen)
            row = {"model": model, "d_inner": d, "batch": b, **lb, "ms": res, "fma_lanes_per_s": peak,
                   "load": os.getloadavg()[0]}
            rows.append(row)
            print(f"{model} b={b}: " + ", ".join(f"{k} {v[0]:.2f}/{v[1] if v[1] is None else round(v[1], 2)} ms"
                                                  for k, v in res.items()) +
                  f" (FMA peak {peak / 1e9:.1f} G lanes/s, load {os.getloadavg()[0]:.1f})", flush=True)
    info["load_average_end"] = os.getloadavg()
    # Markdown table
    print()
    print("| shape | batch | pass | " + " | ".join(f"{n} ms" for n in backends) +
          " | BW bound ms | FMA bound ms | cpu / FMA bound | cpu / BW bound | speed-up vs reference | speed-up vs torch |")
    print("|" + "---|" * (len(backends) + 9))
    for r in rows:
        for pas, i, bwk, fk in (("fwd", 0, "bw_f", "fma_f"), ("fwd+bwd", 1, "bw_fb", "fma_fb")):
            cells = []
            for n in backends:
                v = r["ms"].get(n)
                cells.append("-" if v is None or v[i] is None else f"{v[i]:.2f}")
            cpu = r["ms"].get("cpu")
            cpu_t = cpu[i] if cpu else None
            ref = r["ms"].get("reference")
            tor = r["ms"].get("torch")
            su_ref = f"{ref[i] / cpu_t:.0f}x" if (cpu_t and ref and ref[i]) else "-"
            su_tor = f"{tor[i] / cpu_t:.0f}x" if (cpu_t and tor and tor[i]) else "-"
            print(f"| {r['model']} (d {r['d_inner']}) | {r['batch']} | {pas} | " + " | ".join(cells) +
                  f" | {r[bwk]:.2f} | {r[fk]:.2f} | " +
                  (f"{cpu_t / r[fk]:.2f}x | {cpu_t / r[bwk]:.1f}x" if cpu_t else "- | -") +
                  f" | {su_ref} | {su_tor} |")
    print(f"\n# load average at end {os.getloadavg()[0]:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
