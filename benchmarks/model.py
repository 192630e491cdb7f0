"""Whole-model benchmark: the real adaptation methods, built the way the engine builds them
(``timm.create_model`` + ``svp.peft.get_peft_model(model, make_config(method, ...))``), one
training step (forward, loss, backward, AdamW step) on random 224 px images, and inference.

    python benchmarks/model.py                                 # Vim-T, batch 8, every method
    python benchmarks/model.py --models vim_tiny_patch16_224 vim_small_patch16_224 \\
        --batches 8 32 --threads 2 --infer-batches 1 32 --json model.json
    python benchmarks/model.py --methods svp --profile        # + the top ops of one step
    python benchmarks/model.py --methods svp --contend        # + the same step beside a busy process
    python benchmarks/model.py --methods svp vpt_deep --amp   # + the same step with train.amp (bfloat16)

Every configuration runs in its own subprocess (peak RSS is that configuration's alone; svp
is imported before torch there, as the CLI does, so ``svp.runtime`` applies, and the steps run with
the heap held, as the engine's: ``svp.runtime.held_heap``). Reported per
training configuration, in the same process:

* ms / step: best wall clock of --reps steps after one warm-up step; CPU ms: process CPU time
  of the same step (all threads); the machine's load average beside it.
* matmul-bound ms: the floating-point work of every matrix product and convolution the step
  actually runs (forward and the backward autograd needs for this method: counted with
  ``torch.utils.flop_counter.FlopCounterMode`` over one real step, with dt_proj's and x_proj's
  products run as F.linear for it (the fused kernels form them where the counter cannot see),
  plus the depthwise conv1d, which runs in a fused kernel the counter cannot see either: 2 W
  flops per element and pass, at the tokens each mixer read in that step, a forward pass, an input
  gradient where the backward reaches the conv, a weight gradient where it is trained), divided
  by the float32 matmul rate measured in the same process (best of a 2048^3 product, same threads;
  the faster of torch's own product and oneDNN's, which svp.ops.matmul_cpu runs where torch's is
  slow: on an AMD Zen 5 torch's MKL reaches half oneDNN's rate, docs/benchmarks.md, twenty-seventh round),
  five products before the timed steps and five after them: the bound takes the faster burst, and
  both are reported (``matmul_gflops_before`` / ``_after``), so a machine whose speed moved during
  the measurement shows it (a note is printed when the two differ by more than 10%). With one burst
  only, a rate caught in a slow moment of a noisy VM made a step look closer to its bound than it was
  (VPT-deep at Vim-Tiny: 3.1x at 190 GFLOP/s, the step 689 ms, against 4.5x at 321 GFLOP/s and 591 ms
  the run before; docs/benchmarks.md, twenty-sixth round).
* x bound: ms / step over matmul-bound ms (the issue's target: within 3x). CPU x bound: CPU ms
  over the flops at the matmul rate per CPU-second (both in process CPU time, so it holds on a
  shared machine; with --threads 1 it is the robust one).

``--amp`` also times each step under bfloat16 autocast as ``train.amp`` runs it on the CPU
(forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, loss and backward outside),
the float32 and the bfloat16 step alternating in the same process, and reports the speed-up
(best float32 wall over best bfloat16 wall) with the bfloat16 matmul rate of the same process.
The bound and its ratios stay those of the float32 step.

``--contend`` also runs each training step while one other CPU-bound process (a Python busy
loop) runs, and reports the ratio to the quiet time: the issue's "within 2x of its quiet time
while one other process shares the machine". It only means something on an otherwise idle
machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
METHODS = ("svp", "vpt_deep", "lora", "linear", "full")
# The SVP setting (S = 6 layers per Cross group, r = 64); the others use their defaults.
SETTINGS = {"svp": {"shared_layers": 6, "hidden": 64}}


def method_settings(method: str, model) -> dict:
    """SETTINGS of ``method`` for ``model``: on a backbone whose depth 6 does not divide (the
    bundled mini Vim has 8 layers), the largest number of shared layers below 6 that does."""
    s = dict(SETTINGS.get(method, {}))
    if "shared_layers" in s:
        depth = len(model.layers)
        s["shared_layers"] = next(k for k in range(s["shared_layers"], 0, -1) if depth % k == 0)
    return s


def _matmul_rate(reps=5, n=2048, dtype=None, paths=None):
    """float32 (or ``dtype``) matmul flop/s by wall clock and per CPU-second (process CPU time,
    all threads): the faster of torch's own product and, in float32 where this torch has it,
    oneDNN's (svp.ops.matmul_cpu: on an AMD Zen 5 torch's MKL runs at half the rate oneDNN
    reaches, and svp's products take oneDNN there, so a bound at MKL's rate would be half as
    tight). Each path's rates go into ``paths`` (a dict) when given."""
    import torch
    from svp.ops import matmul_cpu
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    prods = {"blas": lambda: a @ b}
    if dtype in (None, torch.float32) and matmul_cpu.onednn_available():
        def onednn():   # the product svp runs there, through its own entry point
            with matmul_cpu.forced(True):
                return matmul_cpu.mm(a, b)
        prods["onednn"] = onednn
    best = dict.fromkeys(prods, 1e9)
    best_cpu = dict.fromkeys(prods, 1e9)
    for f in prods.values():
        f()
    for _ in range(reps):
        for k, f in prods.items():   # alternating: both see the same machine
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
            best_cpu[k] = min(best_cpu[k], time.process_time() - c0)
    if paths is not None:
        paths.update({k: 2 * n ** 3 / best[k] / 1e9 for k in prods})
    return 2 * n ** 3 / min(best.values()), 2 * n ** 3 / min(best_cpu.values())


def _conv1d_flops(seen, batch, train):
    """Depthwise causal conv1d of every mixer direction, from what each mixer saw in the counted
    step (``seen``: per layer, the conv's input's tokens, whether it needed a gradient and whether
    the conv's weights were trained): 2 W flops per (b, l, E) element for the forward, the same
    for the input gradient where the backward reaches the conv's input, and again for the weight
    gradient where the conv is trained. Returns (forward flops, the step's flops)."""
    fwd = total = 0
    for tokens, E, d_conv, input_grad, trained in seen:
        per = 2 * 2 * batch * tokens * E * d_conv    # two directions
        fwd += per
        total += per * (1 + (train and input_grad) + (train and trained))
    return fwd, total


def peak_rss_mib():
    """This process's peak resident set, MiB (``ru_maxrss`` is in KiB on Linux, in bytes on macOS)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 ** 2 if sys.platform == "darwin" else 1024)


def _watch_convs(pm, seen):
    """Record, per mixer, the tokens its conv reads (a VPT prompt's included; the image size the
    step runs, not the model's own) and whether the backward reaches the conv's input. Returns a
    function that takes the watch off."""
    mixers = [layer.mixer for layer in pm.base_model.layers]

    def watch(m, ssm):
        def watched(x, z, *a, **k):
            trained = any(p.requires_grad for c in (m.conv1d, m.conv1d_b) for p in c.parameters())
            seen.append((x.shape[1], m.d_inner, m.d_conv, x.requires_grad, trained))
            return ssm(x, z, *a, **k)
        return watched
    for m in mixers:
        m._ssm = watch(m, m._ssm)

    def unwatch():
        for m in mixers:
            del m._ssm
    return unwatch


def child(spec):
    sys.path.insert(0, SRC)
    import svp  # (before torch: svp.runtime)
    # the heap held, as the engine's training and evaluation hold it on the CPU (svp.runtime.held_heap;
    # benchmarks/heap.py compares the two)
    with svp.runtime.held_heap():
        return _child(spec)


def training_step(pm, x, autocast):
    """One training step of ``pm`` on ``x`` (random labels of 100 classes) as the engine runs it:
    the engine's optimizer (AdamW, timm's decay grouping, train.opt_fused's default), the loss in
    float32, backward outside autocast. Returns ``step(amp=False)``; ``autocast(amp)`` gives the
    context the forward runs in. (benchmarks/heap.py times the same step.)"""
    import torch
    from svp.engine.config import defaults
    from svp.engine.optim import build_optimizer
    pm.train()
    opt = build_optimizer(pm, defaults(), lr=1e-3)
    yt = torch.randint(0, 100, (x.shape[0],))

    def step(amp=False):
        with autocast(amp):
            logits = pm(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _child(spec):
    import svp  # (child imported it first, before torch: svp.runtime; registers the Vim models)
    import timm
    import torch
    from svp.doctor import cpu_name
    from svp.peft import get_peft_model, make_config

    from scan import set_threads   # (this folder is on sys.path: the child runs as a script)
    set_threads(spec["threads"])
    torch.manual_seed(0)
    model = timm.create_model(spec["model"], num_classes=100)
    method = spec["method"]
    settings = spec.get("settings")   # (benchmarks/method_costs.py: the library's defaults, {})
    pm = get_peft_model(model, make_config(method, num_classes=100,
                                           **(method_settings(method, model) if settings is None else settings)))
    b = spec["batch"]
    x = torch.randn(b, 3, 224, 224)
    paths_before, paths_after = {}, {}
    rate, rate_cpu = _matmul_rate(paths=paths_before)
    from svp.ops import matmul_cpu
    out = {"cpu": cpu_name(), "matmul_gflops_before": rate / 1e9, "matmul_paths_before": paths_before,
           "products": matmul_cpu.status(), "load_start": os.getloadavg()[0],
           "runtime": svp.runtime.status(), "heap_held": svp.runtime.heap_held(),
           "trainable": sum(p.numel() for p in pm.parameters() if p.requires_grad)}
    def autocast(amp):
        return torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    if spec["mode"] == "infer":
        # as `svp predict`, `eval` and `serve` load a model (svp.build.load_for_inference): frozen, so
        # what the model derives from its weights is kept (svp.ops.kept) for the method's too
        pm.eval().requires_grad_(False)

        def step(amp=False):
            with torch.no_grad(), autocast(amp):
                pm(x)
        train = False
    else:
        step = training_step(pm, x, autocast)
        train = True
    step()  # warm-up (numba compiles or loads its cache here)
    if spec.get("amp"):
        step(True)
        out["matmul_gflops_bf16"] = _matmul_rate(dtype=torch.bfloat16)[0] / 1e9
    from torch.utils.flop_counter import FlopCounterMode
    # dt_proj's and x_proj's products counted as products wherever they run: the fused scan
    # forms dt_proj's in its kernels (svp.models.vim._low_rank_delta), the fused conv x_proj's
    # forward and its input gradient (svp.ops.conv_cpu._proj_out_rows / _proj_rows), where the
    # counter would not see them; for the counted step they run as F.linear
    import svp.models.vim as vim_module
    saved = {name: getattr(vim_module, name) for name in ("_low_rank_delta", "_fused_conv_proj")
             if hasattr(vim_module, name)}
    for name in saved:
        setattr(vim_module, name, lambda *a, **k: False)
    # in-place products (addmm_) and oneDNN's count as products too (the counter's table has neither)
    seen = []
    unwatch = _watch_convs(pm, seen)
    try:
        with FlopCounterMode(display=False, custom_mapping=matmul_cpu.flop_mapping()) as fc:
            step()
    finally:
        unwatch()
        for name, f in saved.items():
            setattr(vim_module, name, f)
    flops = fc.get_total_flops() + _conv1d_flops(seen, b, train)[1]
    out["flops"] = flops
    try:   # the layer numba's kernels ran on (after the steps above launched its threads)
        import numba
        out["numba_layer"] = numba.threading_layer()
    except Exception:
        out["numba_layer"] = None
    walls, cpus, amp_walls = [], [], []
    for _ in range(spec["reps"]):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if spec.get("amp"):   # alternating: the two see the same machine
            t0 = time.perf_counter()
            step(True)
            amp_walls.append(time.perf_counter() - t0)
    out.update(seconds=min(walls), cpu_seconds=min(cpus), load_end=os.getloadavg()[0])
    after, after_cpu = _matmul_rate(paths=paths_after)   # the second burst: the steps ran between the two
    out["matmul_paths_after"] = paths_after
    rate, rate_cpu = max(rate, after), max(rate_cpu, after_cpu)
    out.update(matmul_gflops_after=after / 1e9, matmul_gflops=rate / 1e9, matmul_gflops_per_cpu_s=rate_cpu / 1e9,
               bound_seconds=flops / rate, bound_cpu_seconds=flops / rate_cpu)
    if amp_walls:
        out["amp_seconds"] = min(amp_walls)
    if spec.get("contend"):
        # the busy process spins until this one is gone, so an interrupted run leaves no spinner
        # behind (one did, and slowed every measurement after it)
        hog = subprocess.Popen([sys.executable, "-c", f"import os\nwhile os.getppid() == {os.getpid()}: pass"])
        try:
            time.sleep(0.5)
            w = []
            for _ in range(spec["reps"]):
                t0 = time.perf_counter()
                step()
                w.append(time.perf_counter() - t0)
            out["seconds_contended"] = min(w)
        finally:
            hog.kill()
            hog.wait()
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=spec["profile"])
        if spec.get("amp"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(amp=True)
            out["profile"] += "\nthe same step under bfloat16 autocast:\n" + prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=spec["profile"])
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_tiny_patch16_224"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batches", type=int, nargs="*", default=[8], help="training batches")
    ap.add_argument("--infer-batches", type=int, nargs="*", default=[],
                    help="inference batches (the svp model in eval mode, no_grad)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contend", action="store_true", help="also time each training step beside a busy process")
    ap.add_argument("--amp", action="store_true",
                    help="also time each step under bfloat16 autocast (train.amp), alternating with float32")
    ap.add_argument("--profile", type=int, nargs="?", const=15, default=0,
                    help="print the top N ops (self CPU) of one step of each configuration "
                         "(with --amp, also of its bfloat16 step)")
    ap.add_argument("--json", type=json_path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    specs = []
    for model in a.models:
        for batch in a.batches:
            for method in a.methods:
                specs.append({"model": model, "method": method, "mode": "train", "batch": batch})
        for batch in a.infer_batches:
            specs.append({"model": model, "method": "svp", "mode": "infer", "batch": batch})
    rows, failed = [], []
    print(f"# {os.cpu_count()} cpus, {a.threads} threads; load average {os.getloadavg()}", flush=True)
    for spec in specs:
        spec.update(threads=a.threads, reps=a.reps, contend=a.contend and spec["mode"] == "train",
                    profile=a.profile, amp=a.amp)
        r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if r.returncode:
            print(f"{spec}: failed\n{r.stderr[-3000:]}", flush=True)
            failed.append(spec)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if not rows:   # a child names the CPU: this process does not import svp (the children set its runtime defaults)
            print(f"# cpu: {res['cpu']}; products: {res['products']}", flush=True)
        prof = res.pop("profile", None)
        rows.append({**spec, **res})
        extra = f", beside a busy process {res['seconds_contended'] * 1e3:.0f} ms" if "seconds_contended" in res else ""
        if "amp_seconds" in res:
            extra += (f", bfloat16 autocast {res['amp_seconds'] * 1e3:.0f} ms = "
                      f"{res['seconds'] / res['amp_seconds']:.2f}x "
                      f"faster (bfloat16 matmul {res['matmul_gflops_bf16']:.0f} GFLOP/s)")
        print(f"{spec['model']} {spec['mode']} {spec['method']} b={spec['batch']}: {res['seconds'] * 1e3:.0f} ms "
              f"(CPU {res['cpu_seconds'] * 1e3:.0f} ms), matmul bound {res['bound_seconds'] * 1e3:.0f} ms "
              f"({res['matmul_gflops']:.0f} GFLOP/s), {res['seconds'] / res['bound_seconds']:.1f}x; CPU "
              f"{res['cpu_seconds'] / res['bound_cpu_seconds']:.1f}x the bound at "
              f"{res['matmul_gflops_per_cpu_s']:.0f} GFLOP/CPU-s{extra}; "
              f"load {res['load_start']:.1f}-{res['load_end']:.1f}; numba layer {res.get('numba_layer')}", flush=True)
        print("  matmul rates (GFLOP/s, before / after the steps): " + ", ".join(
            f"{k} {res['matmul_paths_before'][k]:.0f} / {res['matmul_paths_after'][k]:.0f}"
            for k in res["matmul_paths_before"]), flush=True)
        lo, hi = sorted((res["matmul_gflops_before"], res["matmul_gflops_after"]))
        if hi > 1.1 * lo:
            print(f"  note: the matmul rate moved from {res['matmul_gflops_before']:.0f} to "
                  f"{res['matmul_gflops_after']:.0f} GFLOP/s across the steps (the bound uses {hi:.0f}): "
                  "the machine's speed changed during this measurement", flush=True)
        if prof:
            print(prof, flush=True)
    print()
    amp = any("amp_seconds" in r for r in rows)
    print("| model | mode | method | batch | ms / step | CPU ms | images/s | GFLOP | matmul-bound ms | x bound "
          "| CPU x bound | beside busy process | peak RSS MiB | load |"
          + (" amp ms / step | amp speed-up |" if amp else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if amp else ""))
    for r in rows:
        cont = f"{r['seconds_contended'] / r['seconds']:.1f}x" if "seconds_contended" in r else "-"
        cpux = f"{r['cpu_seconds'] / r['bound_cpu_seconds']:.1f}x" if "bound_cpu_seconds" in r else "-"
        print(f"| {r['model']} | {r['mode']} | {r['method']} | {r['batch']} | {r['seconds'] * 1e3:.0f} | "
              f"{r['cpu_seconds'] * 1e3:.0f} | {r['batch'] / r['seconds']:.1f} | {r['flops'] / 1e9:.1f} | "
              f"{r['bound_seconds'] * 1e3:.0f} | {r['seconds'] / r['bound_seconds']:.1f}x | {cpux} | {cont} | "
              f"{r['peak_rss_mib']:.0f} | {r['load_start']:.1f}-{r['load_end']:.1f} |"
              + (f" {r['amp_seconds'] * 1e3:.0f} | {r['seconds'] / r['amp_seconds']:.2f}x |" if "amp_seconds" in r
                 else " - | - |" if amp else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failed:   # a table without its rows is not the measurement asked for
        print(f"{len(failed)} configuration(s) failed (above); not in the table", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
