"""The CPU scan kernels inside a real training step: each call's time, and the same call again.

    python benchmarks/scan_in_step.py                       # Vim-Tiny SVP, batch 8, 2 threads
    python benchmarks/scan_in_step.py --method lora --batch 32 --model vim_small_patch16_224

Builds the model the way the engine does (``get_peft_model(timm.create_model(...),
make_config(method))``), runs warm-up steps, then times every call of the scan's forward and
backward kernels (``svp.ops.scan_cpu._scan_fwd`` / ``_scan_bwd``) in --steps steps, and the
time of the autograd nodes around them (the wrapper: layouts, allocations, the block sums).
Each call of a mixer's first direction is then run a second time on the same buffers (the
second direction adds into the first's output, so it cannot be repeated in place): the
difference between the two is what the call loses to its data not being in cache in the step.

Prints, per step (ms): each kernel's calls (count, sum, median, slowest), the repeats, and the
nodes' time outside the kernels ("wrapper"); and for the last step every backward call in order
(block 23's two directions first), which is where a call slower than its neighbours shows (the
last block's backward ran 2-3x slower than the others until the kernels flushed denormals:
docs/benchmarks.md, twelfth round).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vim_tiny_patch16_224")
    ap.add_argument("--method", default="svp")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)

    sys.path.insert(0, SRC)
    import svp  # noqa: F401  (before torch, as the CLI: svp.runtime)
    import timm
    import torch

    import svp.ops.scan_cpu as sc
    from svp.peft import get_peft_model, make_config
    from scan import set_threads

    set_threads(args.threads)
    torch.manual_seed(0)
    from model import method_settings   # benchmarks/model.py's settings
    backbone = timm.create_model(args.model, num_classes=100)
    model = get_peft_model(backbone, make_config(args.method, num_classes=100,
                                                 **method_settings(args.method, backbone))).train()
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 100, (args.batch,))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    rec = {k: [] for k in ("fwd", "bwd", "fwd again", "bwd again", "fwd node", "bwd node")}
    kernels = {"fwd": sc._scan_fwd, "bwd": sc._scan_bwd}
    # the position of the kernels' `acc` flag (the second direction adds in), from their signatures
    acc_arg = {k: fn.py_func.__code__.co_varnames.index("acc") for k, fn in kernels.items()}

    def timed_kernel(name):
        fn = kernels[name]

        def call(*a):
            t0 = time.perf_counter()
            r = fn(*a)
            t1 = time.perf_counter()
            rec[name].append(t1 - t0)
            if not a[acc_arg[name]]:   # overwrites its outputs with the same values
                fn(*a)
                rec[name + " again"].append(time.perf_counter() - t1)
            return r
        return call

    def timed_node(name, fn):
        def call(ctx, *a):
            t0 = time.perf_counter()
            r = fn(ctx, *a)
            rec[name].append(time.perf_counter() - t0)
            return r
        return staticmethod(call)

    sc._scan_fwd, sc._scan_bwd = timed_kernel("fwd"), timed_kernel("bwd")
    sc.BiScanCPU.forward = timed_node("fwd node", sc.BiScanCPU.forward)
    sc.BiScanCPU.backward = timed_node("bwd node", sc.BiScanCPU.backward)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    ms = lambda v: v * 1e3  # noqa: E731
    print(f"{args.model} {args.method} b={args.batch} threads={args.threads}")
    for i in range(args.steps):
        for v in rec.values():
            v.clear()
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
        cols = []
        for k in ("fwd", "fwd again", "bwd", "bwd again"):
            s = sorted(rec[k])
            cols.append(f"{k}: n={len(s)} sum={ms(sum(s)):.1f} med={ms(s[len(s) // 2]):.2f} max={ms(s[-1]):.2f}")
        for k in ("fwd", "bwd"):   # the node's time less its kernel calls (and the repeats)
            rest = sum(rec[k + " node"]) - sum(rec[k]) - sum(rec[k + " again"])
            cols.append(f"{k} wrapper: {ms(rest):.1f}")
        print(f"step {i}: {ms(wall):.0f} ms (the repeats included) | " + " | ".join(cols))
    print("last step's backward calls in order (ms):", " ".join(f"{ms(t):.1f}" for t in rec["bwd"]))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
