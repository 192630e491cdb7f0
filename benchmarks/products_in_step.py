"""Where a training step's matrix products lose their rate: each product shape's rate inside one
real step against the same shapes back to back, and what a product pays right after a kernel.

    python benchmarks/products_in_step.py                      # Vim-Tiny SVP, batch 8, 2 threads
    python benchmarks/products_in_step.py --method vpt_deep --batch 8 --threads 2 --reps 150

1. One training step (forward, loss, backward, AdamW step) of ``get_peft_model(model,
   make_config(method))`` after three warm-up steps, under torch's profiler with shapes
   recorded: every ``mm`` / ``addmm`` / ``addmm_`` grouped by its operand shapes, with calls,
   GFLOP, milliseconds and GFLOP/s. Then each shape alone, back to back (best of five bursts),
   in the same process: the rate the product reaches when nothing runs between two calls.
2. One product, the step's most frequent shape, timed right after each of: the same product,
   one call of the fused scan (the model's mixer shape, both threads busy, then idle), 2 ms
   asleep, 2 ms with the calling thread busy in Python. The conditions alternate ``--reps``
   times; medians and quartiles are reported. The difference from "after the same product" is
   what switching from a numba kernel to torch's threads (waking them, caches the kernel used)
   costs each product.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import svp  # noqa: E402,F401  (before torch: svp.runtime's settings)
import torch  # noqa: E402

from model import method_settings  # noqa: E402  (benchmarks/model.py: the issue's SVP setting)
from scan import make_inputs, set_threads  # noqa: E402  (benchmarks/scan.py: the model's scan layout)

PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_")


def _flops(name, shapes):
    if name == "aten::mm":
        (m, k), (_, n) = shapes[0], shapes[1]
    else:   # addmm(bias/self, a, b)
        (m, k), (_, n) = shapes[1], shapes[2]
    return 2 * m * k * n


def step_products(model_name, method, batch):
    """(the step's products by (name, operand shapes): [calls, ms, flops], the mixers' d_inner)"""
    import timm
    from svp.peft import get_peft_model, make_config
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    backbone = timm.create_model(model_name)
    m = get_peft_model(backbone, make_config(method, num_classes=100, **method_settings(method, backbone)))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.train()
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    agg = collections.defaultdict(lambda: [0, 0.0, 0])
    for e in prof.events():
        if e.name in PRODUCTS:
            shapes = [tuple(s) for s in e.input_shapes if s]
            key = (e.name, tuple(shapes[-2:]))
            a = agg[key]
            a[0] += 1
            a[1] += e.self_cpu_time_total / 1e3
            a[2] += _flops(e.name, shapes)
    return agg, m.base_model.layers[0].mixer.d_inner


def alone_rate(shapes, reps=20):
    (m, k), (_, n) = shapes
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * m * k * n / best / 1e9


def after_kernel(shapes, d_inner, batch, reps):
    from svp.ops.scan_cpu import selective_scan_cpu
    (m, k), (_, n) = shapes
    a, w = torch.randn(m, k), torch.randn(k, n)
    u, dl, A, B, C, D, z, db = make_inputs(batch, d_inner)

    def scan():
        selective_scan_cpu(u, dl, A, B, C, D, z, db, delta_softplus=True)

    def busy(s):
        t = time.perf_counter()
        while time.perf_counter() - t < s:
            pass
    conds = {"the same product": lambda: a @ w, "one scan call": scan,
             "2 ms asleep": lambda: time.sleep(0.002), "2 ms busy in Python": lambda: busy(0.002)}
    times = {c: [] for c in conds}
    for f in conds.values():
        f()
        a @ w
    for _ in range(reps):
        for c, f in conds.items():
            f()
            t = time.perf_counter()
            a @ w
            times[c].append((time.perf_counter() - t) * 1e3)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vim_tiny_patch16_224")
    ap.add_argument("--method", default="svp", choices=("svp", "vpt_deep", "lora", "linear", "full"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=150, help="alternations of part 2")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    print(f"# {args.model} {args.method} batch {args.batch}, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    agg, d_inner = step_products(args.model, args.method, args.batch)
    tot_ms = sum(v[1] for v in agg.values())
    tot_fl = sum(v[2] for v in agg.values())
    print(f"\nproducts in one step: {tot_ms:.0f} ms, {tot_fl / 1e9:.2f} GFLOP, {tot_fl / 1e6 / tot_ms:.0f} GFLOP/s\n")
    print("| product | operands | calls | GFLOP | ms in the step | GFLOP/s in the step | GFLOP/s back to back |")
    print("|---|---|---|---|---|---|---|")
    for (name, shapes), (calls, ms, fl) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        if fl < 1e8:
            continue
        print(f"| {name} | {' x '.join(str(s) for s in shapes)} | {calls} | {fl / 1e9:.2f} | {ms:.1f} "
              f"| {fl / 1e6 / ms:.0f} | {alone_rate(shapes):.0f} |")
    shapes = max(agg.items(), key=lambda kv: kv[1][0])[0][1]
    times = after_kernel(shapes, d_inner, args.batch, args.reps)
    print(f"\none {' x '.join(str(s) for s in shapes)} product, {args.reps} alternations (ms):\n")
    print("| right after | median | quartiles |")
    print("|---|---|---|")
    for c, v in times.items():
        q = statistics.quantiles(v, n=4)
        print(f"| {c} | {statistics.median(v):.3f} | {q[0]:.3f} - {q[2]:.3f} |")


if __name__ == "__main__":
    main()
