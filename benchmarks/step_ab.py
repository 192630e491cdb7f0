"""One real training step (forward, cross-entropy, backward, AdamW) of a method built the way the
engine builds it, at 1 thread by default: where its CPU time goes, and in-process A/B of the
fused CPU paths outside the scan against the module paths they replace.

    python benchmarks/step_ab.py --profile 30                # top ops by self time, and by input shape
    python benchmarks/step_ab.py --ab prompts conv_proj --reps 10
    python benchmarks/step_ab.py --ab all --reps 10 --method svp --batch 8
    python benchmarks/step_ab.py --droppath-ab --reps 10 --threads 2   # what training in train mode costs

--ab NAME alternates steps with the named fused path switched off (A: the module path) and on
(B), order flipped every rep, and reports process CPU time per step (min, median): the robust
comparison on a shared machine. NAME: prompts (SVP's fused prompt step, peft/svp.py), conv_proj
(the mixer's conv + x_proj node, models/vim.py), all (both). Before the timed steps it runs one
forward/backward each way and prints the largest relative difference of the gradients.
--droppath-ab alternates steps with the frozen backbone in eval mode (A: DropPath off) and in train
mode (B: DropPath drawing its masks, SVP's default since 2026-12-05, as the official recipe), and
reports process CPU time and wall clock per step (min, median).
Profiler self times are wall clock: on a loaded machine they include time the process waited.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import svp  # noqa: E402,F401  (before torch: svp.runtime; registers the Vim models)
import timm  # noqa: E402
import torch  # noqa: E402

import svp.models.vim as vim  # noqa: E402
import svp.peft.svp as svp_method  # noqa: E402
from svp.peft import get_peft_model, make_config  # noqa: E402

from model import method_settings  # noqa: E402  (benchmarks/model.py's settings; this folder is on sys.path)
_REAL = {"prompts": (svp_method, "_fused_prompts", svp_method._fused_prompts),
         "conv_proj": (vim, "_fused_conv_proj", vim._fused_conv_proj)}


def _switch(names, on):
    for n in names:
        mod, attr, real = _REAL[n]
        setattr(mod, attr, real if on else (lambda *a, **k: False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vim_tiny_patch16_224")
    ap.add_argument("--method", default="svp")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--profile", type=int, nargs="?", const=30, default=0)
    ap.add_argument("--ab", nargs="+", default=[], choices=sorted(_REAL) + ["all"])
    ap.add_argument("--droppath-ab", action="store_true")
    a = ap.parse_args(argv)
    if a.droppath_ab and a.ab:
        ap.error("--ab and --droppath-ab measure different things; give one of them")
    from scan import set_threads   # (this folder is on sys.path: run as a script)
    set_threads(a.threads)
    torch.manual_seed(0)
    model = timm.create_model(a.model, num_classes=100)
    pm = get_peft_model(model, make_config(a.method, num_classes=100, **method_settings(a.method, model))).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.randn(a.batch, 3, 224, 224), torch.randint(0, 100, (a.batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(pm(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    print(f"# {a.model} {a.method} batch {a.batch}, {a.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    names = sorted(_REAL) if "all" in a.ab else a.ab
    if a.droppath_ab:
        ts = {False: [], True: []}
        for i in range(a.reps):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                pm.config.backbone_train_mode = on
                pm.train()
                c0, w0 = time.process_time(), time.perf_counter()
                step()
                ts[on].append((time.process_time() - c0, time.perf_counter() - w0))
        for on, label in ((False, "A (backbone in eval mode, DropPath off)"), (True, "B (train mode, DropPath on)")):
            cpu, wall = [c for c, _ in ts[on]], [w for _, w in ts[on]]
            print(f"  {label}: CPU ms per step min {min(cpu) * 1e3:.0f}, median {statistics.median(cpu) * 1e3:.0f}; "
                  f"wall ms min {min(wall) * 1e3:.0f}, median {statistics.median(wall) * 1e3:.0f}")
    elif names:
        def grads():
            loss = torch.nn.functional.cross_entropy(pm(x), y)
            return torch.autograd.grad(loss, params)
        _switch(names, False)
        ga = grads()
        _switch(names, True)
        gb = grads()
        diff = max(((p - q).abs().max() / (p.abs().max() + 1e-30)).item() for p, q in zip(ga, gb))
        print(f"A/B {'+'.join(names)}: largest relative gradient difference {diff:.2e}")
        ts = {False: [], True: []}
        for i in range(a.reps):
            for on in ((False, True) if i % 2 == 0 else (True, False)):
                _switch(names, on)
                c0 = time.process_time()
                step()
                ts[on].append(time.process_time() - c0)
        _switch(names, True)
        for on, label in ((False, "A (module path)"), (True, "B (fused)")):
            t = ts[on]
            print(f"  {label}: CPU ms per step min {min(t) * 1e3:.0f}, median {statistics.median(t) * 1e3:.0f}")
    else:
        ts = []
        for _ in range(a.reps):
            c0 = time.process_time()
            step()
            ts.append(time.process_time() - c0)
        print(f"CPU ms per step: min {min(ts) * 1e3:.0f}, median {statistics.median(ts) * 1e3:.0f}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile))
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=a.profile, max_name_column_width=40, max_shapes_column_width=80))


if __name__ == "__main__":
    main()
