"""What the first use of svp's CPU kernels costs: numba compiles them on first use and caches them,
so a fresh install's first prediction and first training step pay the compile once.

    python benchmarks/first_use.py                                  # Vim-Tiny, svp and lora
    python benchmarks/first_use.py --model vim_small_patch16_224 --methods svp vpt_deep lora
    python benchmarks/first_use.py --after-doctor       # `svp doctor` fills the empty cache first

Per method, two child processes share one empty temporary ``NUMBA_CACHE_DIR`` (the in-tree cache
the kernels normally use is left alone): the first compiles, the second loads what the first
cached. Each child builds the model (random backbone, 10 classes, batch 2) and times an eval
forward, a second one, a training step (forward + backward) and a second one. Reported: seconds
per call, and the first calls' extra over the second ones (what compiling, or loading, added).
With ``--after-doctor``, ``svp doctor --no-timing`` runs first in each empty cache (timed), and
the first child's row says "after svp doctor".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")

CHILD = """
import json, sys, time
import svp, timm, torch
from svp.peft import get_peft_model, make_config
model_name, method = sys.argv[1], sys.argv[2]
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
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix="svp-first-use-") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                       PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
            first = "empty cache"
            if args.after_doctor:
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "svp", "doctor", "--no-timing"], env=env,
                               capture_output=True, text=True, check=True)
                print(f"{method}: svp doctor --no-timing with an empty cache took {time.perf_counter() - t0:.1f} s")
                first = "after svp doctor"
            for run in (first, "cached"):
                r = subprocess.run([sys.executable, "-c", CHILD, args.model, method], env=env,
                                   capture_output=True, text=True, check=True)
                t = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(dict(method=method, run=run, **t,
                                 forward_extra=t["forward"] - t["forward again"],
                                 step_extra=t["step"] - t["step again"]))
    print(f"| {args.model} | kernels | first forward s | next forward s | first step s | next step s "
          "| first forward's extra s | first step's extra s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['run']} | {r['forward']:.1f} | {r['forward again']:.2f} | {r['step']:.1f} "
              f"| {r['step again']:.2f} | {r['forward_extra']:.1f} | {r['step_extra']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
