"""What the first use of svp's CPU kernels costs: numba compiles them on first use and caches them,
so a fresh install's first prediction and first training step pay the compile once.

    python benchmarks/first_use.py                                  # Vim-Tiny, svp and lora
    python benchmarks/first_use.py --model vim_small_patch16_224 --methods svp vpt_deep lora
    python benchmarks/first_use.py --after-doctor       # `svp doctor` fills the empty cache first
    python benchmarks/first_use.py --methods svp --cached-runs 8 --frozen --src /path/to/other/src

Per method, two child processes share one empty temporary ``NUMBA_CACHE_DIR`` (the in-tree cache
the kernels normally use is left alone): the first compiles, the second loads what the first
cached. Each child builds the model (random backbone, 10 classes, batch 2) and times an eval
forward, a second one, a training step (forward + backward) and a second one. Reported: seconds
per call, and the first calls' extra over the second ones (what compiling, or loading, added).
With ``--after-doctor``, ``svp doctor --no-timing`` runs first in each empty cache (timed), and
the first child's row says "after svp doctor".

``--cached-runs N`` runs the cached child N times and reports each call's median (the cached
cost is a fraction of a second, within one process's noise). ``--src`` adds other trees' ``src``
folders: each gets its own first child, and the cached children alternate between the trees
(this one first), for a before/after in the same minutes. ``--frozen`` has each child freeze its
imports (``svp.runtime.freeze_imports``) before it builds the model, as the ``svp`` command does:
otherwise the process's first full garbage collection, which walks everything the imports made
(~0.6 s on a 2-vCPU Zen 3), tends to land in the first forward.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

CHILD = """
import json, sys, time
import svp, timm, torch
from svp.peft import get_peft_model, make_config
model_name, method = sys.argv[1], sys.argv[2]
if sys.argv[3:] == ["frozen"]:
    from svp.runtime import freeze_imports
    freeze_imports()
torch.manual_seed(0)
m = get_peft_model(timm.create_model(model_name), make_config(method, num_classes=10))
x = torch.randn(2, 3, 224, 224)
def forward():
    m.eval()
    with torch.no_grad():
        m(x)
def step():
    m.train()
    m(x).sum().backward()
out = {}
for name, f in (("forward", forward), ("forward again", forward), ("step", step), ("step again", step)):
    t = time.perf_counter(); f(); out[name] = time.perf_counter() - t
print(json.dumps(out))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vim_tiny_patch16_224")
    ap.add_argument("--methods", nargs="+", default=["svp", "lora"])
    ap.add_argument("--after-doctor", action="store_true",
                    help="run `svp doctor --no-timing` in each empty cache first")
    ap.add_argument("--cached-runs", type=int, default=1,
                    help="cached children per tree (their calls' medians are reported)")
    ap.add_argument("--src", nargs="*", default=[], help="other trees' src folders, alternating with this one")
    ap.add_argument("--frozen", action="store_true",
                    help="each child freezes its imports first, as the svp command does")
    ap.add_argument("--json", type=json_path, help="write the results here")
    args = ap.parse_args(argv)
    trees = [SRC] + [os.path.abspath(p) for p in args.src]
    child = [sys.executable, "-c", CHILD, args.model]
    rows = []
    for method in args.methods:
        cmd = child + [method] + (["frozen"] if args.frozen else [])
        with tempfile.TemporaryDirectory(prefix="svp-first-use-") as cache:
            envs = [dict(os.environ, NUMBA_CACHE_DIR=cache,   # numba keys its cache by source path
                         PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
                    for src in trees]
            first = "empty cache"
            for src, env in zip(trees, envs):
                if args.after_doctor:
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "svp", "doctor", "--no-timing"], env=env,
                                   capture_output=True, text=True, check=True)
                    print(f"{method}: svp doctor --no-timing with an empty cache took {time.perf_counter() - t0:.1f} s")
                    first = "after svp doctor"
                rows.append(_row(method, src, first, [_child(cmd, env)]))
            cached = {src: [] for src in trees}
            for _ in range(args.cached_runs):
                for src, env in zip(trees, envs):
                    cached[src].append(_child(cmd, env))
            for src in trees:
                rows.append(_row(method, src, "cached" if args.cached_runs == 1
                                 else f"cached, median of {args.cached_runs}", cached[src]))
    several = len(trees) > 1
    print(f"| {args.model} |{' svp |' if several else ''} kernels | first forward s | next forward s | first step s "
          "| next step s | first forward's extra s | first step's extra s |")
    print("|---|" + ("---|" if several else "") + "---|---|---|---|---|---|---|")
    for r in rows:
        tree = (" this tree |" if r["src"] == SRC else f" {r['src']} |") if several else ""
        print(f"| {r['method']} |{tree} {r['run']} | {r['forward']:.2f} | {r['forward again']:.2f} | {r['step']:.2f} "
              f"| {r['step again']:.2f} | {r['forward_extra']:.2f} | {r['step_extra']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _child(cmd, env):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _row(method, src, run, times):
    """One table row: each call's median over the children ``times`` (dicts of seconds)."""
    med = {k: statistics.median(t[k] for t in times) for k in times[0]}
    extra = dict(forward_extra=statistics.median(t["forward"] - t["forward again"] for t in times),
                 step_extra=statistics.median(t["step"] - t["step again"] for t in times))
    return dict(method=method, src=src, run=run, **med, **extra, children=times)


if __name__ == "__main__":
    main()
