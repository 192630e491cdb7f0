"""Training steps with the heap held (``svp.runtime.held_heap``, what ``svp train``, ``svp eval``
and ``svp predict`` do on the CPU) against svp's import-time malloc thresholds alone, in
alternating processes of the same run.

glibc will not raise its mmap threshold above 32 MiB, so without the hold every buffer larger
than that is a mapping of its own: unmapped when freed and page-faulted in afresh the next time.
Vim-Small's (b, l, E) activations pass 32 MiB from batch 56 (the recipes train at 96), Vim-Base's
from batch 28. Reported per configuration and mode: the median step (wall clock) after the first,
its CPU time split into user and system (the page faults are system time), minor page faults a
step, the first step alone (where the held heap grows), peak RSS, and the held / default ratio
of the median steps, round by round.

    python benchmarks/heap.py                                   # Vim-Small SVP, batch 96
    python benchmarks/heap.py --models vim_tiny_patch16_224 vim_small_patch16_224 --batches 8 96 \\
        --steps 3 --rounds 2 --threads 2
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
MODES = ("held", "default")


def child(spec):
    sys.path.insert(0, SRC)
    import svp  # noqa: F401  (before torch: svp.runtime's settings, as the CLI)
    import timm
    import torch
    from svp import runtime
    from svp.peft import get_peft_model, make_config

    # (this folder is on sys.path: the child runs as a script)
    from model import method_settings, peak_rss_mib, training_step
    from scan import set_threads
    set_threads(spec["threads"])
    torch.manual_seed(0)
    method = spec["method"]
    model = timm.create_model(spec["model"], num_classes=100)
    pm = get_peft_model(model, make_config(method, num_classes=100, **method_settings(method, model)))
    step = training_step(pm, torch.randn(spec["batch"], 3, 224, 224), lambda amp: contextlib.nullcontext())

    def timed():
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        return {"wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                "faults": r1.ru_minflt - r0.ru_minflt}

    with runtime.held_heap(spec["mode"] == "held"):
        held = runtime.heap_held()
        first = timed()
        steps = [timed() for _ in range(spec["steps"])]
    return {"held": held, "malloc": runtime.status()["malloc"], "first": first, "steps": steps,
            "peak_rss_mib": peak_rss_mib(),
            "load": os.getloadavg()[0]}


def _median(steps, key):
    return statistics.median(s[key] for s in steps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_small_patch16_224"])
    ap.add_argument("--method", default="svp")
    ap.add_argument("--batches", type=int, nargs="+", default=[96])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first, per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per mode, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=json_path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    print(f"# {os.cpu_count()} cpus, {a.threads} threads; load average {os.getloadavg()}", flush=True)
    rows = []
    for model in a.models:
        for batch in a.batches:
            runs = {m: [] for m in MODES}
            for r in range(a.rounds):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):   # the order flips each round
                    spec = {"model": model, "method": a.method, "batch": batch, "mode": mode,
                            "steps": a.steps, "threads": a.threads}
                    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                       capture_output=True, text=True)
                    if p.returncode:
                        sys.exit(f"{spec}: failed\n{p.stderr[-3000:]}")
                    res = json.loads(p.stdout.strip().splitlines()[-1])
                    if mode == "held" and not res["held"]:
                        sys.exit(f"the heap could not be held here (svp's malloc settings: {res['malloc']})")
                    runs[mode].append(res)
                    st = res["steps"]
                    walls = ", ".join(f"{s['wall']:.2f}" for s in st)
                    print(f"{model} {a.method} b={batch} {mode}: steps {walls} s"
                          f" (first {res['first']['wall']:.2f} s), system {_median(st, 'sys'):.2f} s a step, "
                          f"{_median(st, 'faults'):.0f} faults a step, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                          f"load {res['load']:.1f}", flush=True)
            ratios = [_median(h["steps"], "wall") / _median(d["steps"], "wall")
                      for h, d in zip(runs["held"], runs["default"])]
            row = {"model": model, "method": a.method, "batch": batch, "ratios": ratios}
            for mode in MODES:
                steps = [s for res in runs[mode] for s in res["steps"]]
                row[mode] = {"wall": _median(steps, "wall"), "user": _median(steps, "user"),
                             "sys": _median(steps, "sys"), "faults": _median(steps, "faults"),
                             "first": statistics.median(res["first"]["wall"] for res in runs[mode]),
                             "peak_rss_mib": max(res["peak_rss_mib"] for res in runs[mode])}
            rows.append(row)
    print()
    print("| model | method | batch | heap | s / step (median) | user s | system s | faults / step | first step s "
          "| peak RSS MiB | held / default (per round) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode in MODES:
            m = r[mode]
            ratio = ", ".join(f"{x:.2f}x" for x in r["ratios"]) if mode == "held" else "-"
            print(f"| {r['model']} | {r['method']} | {r['batch']} | {mode} | {m['wall']:.2f} | {m['user']:.2f} | "
                  f"{m['sys']:.2f} | {m['faults']:.0f} | {m['first']:.2f} | {m['peak_rss_mib']:.0f} | {ratio} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
