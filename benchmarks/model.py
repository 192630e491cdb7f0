"""Whole-model benchmark: Vim-Tiny / Vim-Small at 224 px, inference and an SVP-style
training step, with the selective scan on each backend, measured in the same run.

    .venv/bin/python benchmarks/model.py [--models vim_tiny_patch16_224] [--batch 8]
        [--backends cpu torch reference] [--ref-train-batch 2] [--json out.json]

Each (model, backend, mode) runs in its own subprocess so that peak memory (max RSS) is
that configuration's alone. Training step: the backbone is frozen; a learnable prompt
vector is added to the input of every mixer (SVP-like: gradients flow through every
layer, including every scan, to the prompts) and a linear head is trained; forward +
backward + SGD step on random images. Times: best of --reps after one warm-up.
The share of the scan in the training step is measured by timing the scan's forward
calls and its autograd backward inside the step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(spec):
    import resource

    import torch
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    import timm

    import svp  # noqa: F401  (registers the Vim models)
    from svp.ops import dispatch, set_backend

    set_backend(spec["backend"])
    torch.manual_seed(0)
    model = timm.create_model(spec["model"], num_classes=10)
    b = spec["batch"]
    x = torch.randn(b, 3, 224, 224)
    scan_t = [0.0]
    name = spec["backend"]
    fn = dispatch._loaded[name]

    def timed(*a, **k):
        t0 = time.perf_counter()
        r = fn(*a, **k)
        scan_t[0] += time.perf_counter() - t0
        return r
    dispatch._loaded[name] = timed
    fn_classes = []
    if name == "cpu":
        from svp.ops.scan_cpu import SelectiveScanCPU as F
        fn_classes.append(F)
    elif name == "torch":
        from svp.ops.scan_torch import SelectiveScanTorch as F
        fn_classes.append(F)
    for F in fn_classes:
        orig = F.backward

        def bw(ctx, *g, _orig=orig):
            t0 = time.perf_counter()
            r = _orig(ctx, *g)
            scan_t[0] += time.perf_counter() - t0
            return r
        F.backward = staticmethod(bw)

    times = []
    if spec["mode"] == "infer":
        model.eval()
        with torch.no_grad():
            for _ in range(spec["reps"] + 1):
                scan_t[0] = 0.0
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0, scan_t[0]))
    else:
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.get_classifier()
        for p in head.parameters():
            p.requires_grad_(True)
        prompts = []
        mixers = [m for n_, m in model.named_modules() if n_.endswith("mixer")]
        assert mixers, "no mixers found"
        for m in mixers:
            dim = m.in_proj.in_features
            p = torch.nn.Parameter(torch.zeros(1, 1, dim))
            prompts.append(p)
            m.register_forward_pre_hook(lambda mod, args, p=p: (args[0] + p,) + tuple(args[1:]))
        opt = torch.optim.SGD(prompts + list(head.parameters()), lr=0.01)
        yt = torch.randint(0, 10, (b,))
        for _ in range(spec["reps"] + 1):
            scan_t[0] = 0.0
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append((time.perf_counter() - t0, scan_t[0]))
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts[:1] + prompts[-1:])
    best = min(times[1:] if len(times) > 1 else times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    return {"seconds": best[0], "scan_seconds": best[1], "images_per_s": b / best[0], "peak_rss_mib": rss}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_tiny_patch16_224", "vim_small_patch16_224"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch", "reference"])
    ap.add_argument("--modes", nargs="+", default=["infer", "train"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ref-train-batch", type=int, default=2,
                    help="batch of the reference backend's training step (its backward grows with L^2; "
                         "a batch-8 step takes minutes)")
    ap.add_argument("--ref-models", nargs="*", default=["vim_tiny_patch16_224"],
                    help="models on which the reference backend runs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    rows = []
    print(f"# load average {os.getloadavg()[0]:.1f}", flush=True)
    for model in a.models:
        for mode in a.modes:
            for backend in a.backends:
                b, reps = a.batch, a.reps
                if backend == "reference":
                    if model not in a.ref_models:
                        continue
                    reps = 1
                    if mode == "train":
                        b = a.ref_train_batch
                spec = {"model": model, "mode": mode, "backend": backend, "batch": b, "reps": reps}
                r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                   capture_output=True, text=True)
                if r.returncode:
                    print(f"{spec}: failed\n{r.stderr[-2000:]}", flush=True)
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append({**spec, **res})
                print(f"{model} {mode} {backend} b={b}: {res['seconds'] * 1e3:.0f} ms, "
                      f"{res['images_per_s']:.2f} img/s, scan {100 * res['scan_seconds'] / res['seconds']:.0f}%, "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    print()
    print("| model | mode | backend | batch | ms / step | images/s | scan share | peak RSS MiB | speed-up of cpu (images/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = [x for x in rows if x["model"] == r["model"] and x["mode"] == r["mode"] and x["backend"] == "cpu"]
        su = f"{cpu[0]['images_per_s'] / r['images_per_s']:.1f}x" if cpu and r["backend"] != "cpu" else "-"
        print(f"| {r['model']} | {r['mode']} | {r['backend']} | {r['batch']} | {r['seconds'] * 1e3:.0f} | "
              f"{r['images_per_s']:.2f} | {100 * r['scan_seconds'] / r['seconds']:.0f}% | {r['peak_rss_mib']:.0f} | {su} |")
    print(f"\n# load average at end {os.getloadavg()[0]:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
