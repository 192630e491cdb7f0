"""Where the CPU scan kernels' time goes, against the FMA bound of benchmarks/scan.py.

    OMP_NUM_THREADS=1 python benchmarks/scan_anatomy.py [--d 384] [--mca] [--json out.json]

Two views, 1 thread, the raw numba kernels of one ``selective_scan_cpu`` direction (L = 197,
batch 8, softplus, z gate; the inputs of benchmarks/scan.py):

* measured: each kernel timed (process CPU time, best of --reps) with N = 4, 8 and 16 states,
  everything else the same. A straight-line fit splits its time into a part per state (the state
  loops: decay factors, state update, and in the backward the recompute, dC and reverse passes)
  and a part per time step that does not grow with N (softplus, gate, D skip, loads, stores and
  in the backward the channel sums of dB/dC/dA/dD/d bias). Both are reported per (time step,
  64-channel block) as multiples of the FMA bound for the same work at N = 16 (12 lane
  operations per element forward, 20 backward, at the FMA peak measured in the same run).
* --mca: the compiled kernels' machine code (numba's NUMBA_DUMP_ASSEMBLY, a fresh cache) cut
  into its innermost loops, each one given to ``llvm-mca`` (Debian/Ubuntu package ``llvm``),
  which simulates its throughput on --mcpu (default: the host's CPU name when llvm-mca knows it,
  else icelake-server). Reported per loop: instructions, 512-bit vector operations, and
  llvm-mca's cycles per iteration. A state loop iteration is one state of a 64-channel block, so
  its FMA bound is ops x 4 vectors / 2 FMA units (24 cycles forward) on a CPU that issues two
  512-bit FMAs per cycle. llvm-mca models ports and latencies, not caches, so its cycles are a
  floor for the loop as compiled; where the measured time is far above it, the loop waits on
  memory or on the out-of-order window, not on its operation count.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
OPS = {"fwd": 12, "bwd": 20}     # lane operations per (b, l, d, n) element: benchmarks/scan.py


def _capture(b, d, N, L=197):
    """The raw kernels' arguments of one selective_scan_cpu call (fwd and bwd)."""
    import torch
    import svp.ops.scan_cpu as S
    from scan import leaf_inputs, make_inputs
    cap = {}
    fwd, bwd = S._scan_fwd, S._scan_bwd
    S._scan_fwd = lambda *a: (cap.__setitem__("fwd", a), fwd(*a))[1]
    S._scan_bwd = lambda *a: (cap.__setitem__("bwd", a), bwd(*a))[1]
    try:
        xs = leaf_inputs(make_inputs(b, d, L=L, n=N))
        out = S.selective_scan_cpu(*xs[:7], delta_bias=xs[7], delta_softplus=True)
        out.backward(torch.ones_like(out))
    finally:
        S._scan_fwd, S._scan_bwd = fwd, bwd
    return {"fwd": (fwd, cap["fwd"]), "bwd": (bwd, cap["bwd"])}


def measured(d, reps, b=8, L=197):
    import scan
    scan.clock = time.process_time
    peak = scan.measure_fma_peak()[0]            # lane FMAs per CPU-second, this thread count
    times = {}
    for N in (4, 8, 16):
        for kind, (fn, args) in _capture(b, d, N, L).items():
            best = 1e9
            for _ in range(reps):
                t0 = time.process_time()
                fn(*args)
                best = min(best, time.process_time() - t0)
            times[(kind, N)] = best
    blocks = b * L * (d // 64)                     # (time step, 64-channel block) pairs
    rows = []
    for kind in ("fwd", "bwd"):
        ns = [4, 8, 16]
        ys = [times[(kind, n)] / blocks for n in ns]
        mx, my = sum(ns) / 3, sum(ys) / 3
        slope = sum((n - mx) * (y - my) for n, y in zip(ns, ys)) / sum((n - mx) ** 2 for n in ns)
        icpt = my - slope * mx
        bound16 = OPS[kind] * 64 * 16 / peak      # seconds per step-block at N = 16
        rows.append({"kernel": kind, "ms_N16": times[(kind, 16)] * 1e3,
                     "x_bound": times[(kind, 16)] / blocks / bound16,
                     "per_state_x_bound": slope * 16 / bound16, "per_step_x_bound": icpt / bound16,
                     "per_state_ns": slope * 1e9, "per_step_ns": icpt * 1e9})
    return {"fma_peak_lanes_per_s": peak, "d": d, "batch": b, "rows": rows}


def _dump_child():
    import torch
    sys.path.insert(0, HERE)
    from scan import make_inputs
    import svp.ops.scan_cpu as S
    xs = [a.clone().requires_grad_() for a in make_inputs(1, 64, L=8)]
    out = S.selective_scan_cpu(*xs[:7], delta_bias=xs[7], delta_softplus=True)
    out.backward(torch.ones_like(out))


_SECTION = re.compile(r"^-+ASSEMBLY (.+?)-+$")
_JUMP = re.compile(r"^\s+(j[a-z]+)\s+(\.LBB\d+_\d+)")


def kernel_asm():
    """{'fwd': lines, 'bwd': lines}: the machine code of the two kernels' tasks."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_DUMP_ASSEMBLY="1", NUMBA_CACHE_DIR=cache, PYTHONPATH=SRC)
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--dump-child"], env=env,
                             capture_output=True, text=True, check=True)
    sections, name = [], None
    for line in res.stdout.splitlines():
        m = _SECTION.match(line)
        if m:
            name = m.group(1).strip()
            sections.append((name, []))
        elif name is not None:
            sections[-1][1].append(line)
    # the kernels' tasks, compiled on their own (the kernels call them through their addresses)
    tasks = {kind: [lines for n, lines in sections if n == f"_{kind}_task"] for kind in ("fwd", "bwd")}
    if any(len(v) != 1 for v in tasks.values()):
        raise SystemExit(f"expected one forward and one backward task, found {({k: len(v) for k, v in tasks.items()})}")
    return {kind: v[0] for kind, v in tasks.items()}


def _loop_spans(lines):
    """(first, last) line spans of the textual loops: a jump back to a label above."""
    label_at = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.LBB\d+_\d+:", ln)}
    spans = []
    for i, ln in enumerate(lines):
        m = _JUMP.match(ln)
        if m and m.group(2) in label_at and label_at[m.group(2)] < i:
            spans.append((label_at[m.group(2)], i))
    return spans


def _instructions(lines, a, z, skip=()):
    return [ln.strip() for i, ln in enumerate(lines[a + 1:z + 1], a + 1)
            if ln.startswith("\t") and not _JUMP.match(ln) and not any(x <= i <= y for x, y in skip)]


def step_bodies(lines, state_loops):
    """The loops that directly enclose the state loops (the time-step loops), each without the
    loops inside it: (first, last, instructions), the work per time step outside the states."""
    spans = _loop_spans(lines)
    out = {}
    for a0, z0, _ in state_loops:
        enclosing = [s for s in spans if s[0] < a0 and z0 < s[1]]
        if enclosing:
            a, z = min(enclosing, key=lambda s: s[1] - s[0])
            out[(a, z)] = _instructions(lines, a, z, [s for s in spans if a < s[0] and s[1] < z])
    return [(a, z, body) for (a, z), body in sorted(out.items())]


def innermost_loops(lines, min_fma=8):
    """(first, last) line spans of the innermost textual loops (a jump back to a label above,
    containing no other such loop) with at least min_fma 512-bit FMAs."""
    spans = _loop_spans(lines)
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    out = []
    for a, z in sorted(set(inner)):
        body = _instructions(lines, a, z)
        if sum(1 for ln in body if re.match(r"vf[n]?m(add|sub)", ln) and "zmm" in ln) >= min_fma:
            out.append((a, z, body))
    return out


def mca(body, mcpu, iterations=200):
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(body) + "\n")
    try:
        res = subprocess.run(["llvm-mca", f"-mcpu={mcpu}", f"-iterations={iterations}", f.name],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", res).group(1))
    return cycles / iterations


def static(mcpu):
    rows = []
    for kind, lines in kernel_asm().items():
        loops = innermost_loops(lines)
        for part, spans in (("state loop", loops), ("loop around it, inner loops left out", step_bodies(lines, loops))):
            for a, z, body in spans:
                rows.append(_static_row(kind, part, a, z, body, mcpu))
    return rows


def _static_row(kind, part, a, z, body, mcpu):
    vec = [ln for ln in body if "zmm" in ln and not ln.startswith(("vmovups", "vbroadcast", "vpbroadcast"))]
    return {"kernel": kind, "part": part, "lines": f"{a}-{z}", "instructions": len(body),
            "vector_ops": len(vec), "fma": sum(1 for ln in vec if re.match(r"vf[n]?m(add|sub)", ln)),
            "exp_tricks": sum(1 for ln in vec if ln.startswith(("vpmaxsd", "vpslld", "vscalefps"))),
            "stores": sum(1 for ln in body if re.match(r"vmovups\s+%zmm\d+,", ln)),
            "mca_cycles": mca(body, mcpu)}


def _table(columns, rows):
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def default_mcpu():
    import llvmlite.binding as llvm
    host = llvm.get_host_cpu_name()
    r = subprocess.run(["llvm-mca", "-mcpu=help"], capture_output=True, text=True)
    known = r.stdout + r.stderr   # (LLVM prints the list on stderr or stdout by version)
    return host if re.search(rf"^\s+{re.escape(host)}\s", known, re.M) else "icelake-server"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=384, help="d_inner (384 Vim-Tiny, 768 Vim-Small)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--mca", action="store_true", help="also the static llvm-mca view of the compiled loops")
    ap.add_argument("--mcpu", default=None)
    ap.add_argument("--json", type=json_path, default=None)
    ap.add_argument("--dump-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dump_child:
        return _dump_child()
    sys.path.insert(0, SRC)
    sys.path.insert(0, HERE)
    from scan import set_threads
    set_threads(1)
    out = {"measured": measured(args.d, args.reps)}
    m = out["measured"]
    print(f"1 thread, d={args.d}, batch {m['batch']}, FMA peak {m['fma_peak_lanes_per_s'] / 1e9:.1f} G lanes/s")
    _table(["kernel", "ms (N=16)", "x FMA bound", "per state (x bound)", "per time step (x bound)",
            "ns per state per block", "ns per step per block"],
           [[r["kernel"], f"{r['ms_N16']:.2f}", f"{r['x_bound']:.2f}x", f"{r['per_state_x_bound']:.2f}x",
             f"{r['per_step_x_bound']:.2f}x", f"{r['per_state_ns']:.1f}", f"{r['per_step_ns']:.1f}"]
            for r in m["rows"]])
    if args.mca:
        if shutil.which("llvm-mca") is None:
            raise SystemExit("--mca needs llvm-mca on PATH (Debian/Ubuntu: apt-get install llvm)")
        mcpu = args.mcpu or default_mcpu()
        out["mcpu"], out["static"] = mcpu, static(mcpu)
        print(f"\nllvm-mca -mcpu={mcpu}: innermost loops with >= 8 512-bit FMAs (the state loops), and the"
              " loops around them without their inner loops (one time step's other work, straight-line)")
        _table(["kernel", "part", "asm lines", "instructions", "vector ops", "of which FMA", "2^k scaling ops",
                "vector stores", "cycles / iteration"],
               [[r["kernel"], r["part"], r["lines"], r["instructions"], r["vector_ops"], r["fma"], r["exp_tricks"],
                 r["stores"], f"{r['mca_cycles']:.1f}"] for r in out["static"]])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
