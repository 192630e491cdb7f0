"""`svp serve --amp` against float32, the model alone: ``MultiAdapterModel`` with the eight
adapters of benchmarks/serve.py's mixed set (randomly perturbed, nothing trained) on a Vim
backbone (random weights: the compute of the official ones), a mixed batch of 16 rows and
single rows, the float32 and the bfloat16-autocast model alternating in one process.

    python benchmarks/serve_amp.py --models vim_tiny_patch16_224 vim_small_patch16_224 [--threads 1]

Prints best wall ms per call and the speed-up (float32 / amp). benchmarks/serve.py runs the
bundled mini Vim, whose products are too small for bfloat16 to pay; this measures the backbones
users serve.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # serve_helpers: the adapters' settings

import svp  # noqa: E402,F401  (before torch, which serve's helpers import: svp.runtime sets torch's OpenMP spin)
from serve import MIXED8  # noqa: E402  (this folder is on sys.path: the script runs from it)


def measure(name: str, threads: int, reps: int) -> dict:
    import timm
    import torch
    import serve_helpers as H
    from svp.serve import MultiAdapterModel

    torch.set_num_threads(threads)   # as `svp serve --threads`

    def backbone():
        torch.manual_seed(0)
        return timm.create_model(name).requires_grad_(False).eval()

    depth = len(backbone().layers)
    with tempfile.TemporaryDirectory(prefix="svp-bench-serve-amp-") as root:
        for k, adapter in enumerate(MIXED8):
            method, settings = H.SPECS[adapter]
            settings = dict(settings)
            if method == "svp" and depth % settings["shared_layers"]:
                settings["shared_layers"] = 6   # (the mini Vim's 4 and 8 do not divide 24)
            H.make_adapter(os.path.join(root, adapter), method, settings, seed=k, backbone=backbone,
                           base_model_name=name)
        models = {}
        for amp in (False, True):
            models[amp] = MultiAdapterModel(backbone(), amp=amp)
            for adapter in MIXED8:
                models[amp].add_adapter(adapter, os.path.join(root, adapter))
    names = MIXED8 * 2
    size = models[False].backbone.patch_embed.img_size[0]
    x = torch.randn(len(names), 3, size, size)
    for amp in (False, True):   # warm-up
        models[amp](x, names)
        models[amp](x[:1], names[:1])
    times = {(amp, b): [] for amp in (False, True) for b in (16, 1)}
    for _ in range(reps):
        for amp in (False, True):
            t0 = time.perf_counter()
            models[amp](x, names)
            times[(amp, 16)].append(time.perf_counter() - t0)
            for i in range(4):
                t0 = time.perf_counter()
                models[amp](x[i:i + 1], names[i:i + 1])
                times[(amp, 1)].append(time.perf_counter() - t0)
    return {b: (min(times[(False, b)]), min(times[(True, b)])) for b in (16, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_tiny_patch16_224", "vim_small_patch16_224"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args(argv)
    print(f"# {a.threads} thread(s); load average {os.getloadavg()}")
    print("| model | batch | float32 ms | amp ms | speed-up |")
    print("|---|---|---|---|---|")
    for name in a.models:
        for b, (f32, amp) in measure(name, a.threads, a.reps).items():
            print(f"| {name} | {'16 rows, 8 adapters' if b == 16 else '1 row'} | {f32 * 1e3:.1f} | {amp * 1e3:.1f} | "
                  f"{f32 / amp:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
