"""Why evaluation and prediction run the model over chunks on the CPU
(``svp.engine.evaluate.forward_in_chunks``): a forward over one large batch against the same
batch in near-equal chunks of at most ``CPU_CHUNK`` images, in one process, alternating.

    python benchmarks/eval_chunks.py                                    # Vim-Tiny and Vim-Small, batch 144
    python benchmarks/eval_chunks.py --models vim_small_patch16_224 --batch 96 --reps 3

Each model is built as the engine builds it (``get_peft_model`` with SVP, random backbone,
100 classes) in eval mode; ``--batch`` random 224 px images. Reports images/s of the whole batch
and of the chunked forward (best of ``--reps``, the two alternating), their ratio, and whether
the logits are bitwise equal. Both run with the heap held, as ``evaluate`` holds it
(``svp.runtime.held_heap``); ``--no-held-heap``: with svp's import-time malloc thresholds alone,
where a whole batch's activations above 32 MiB are page-faulted in afresh every forward.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import svp  # noqa: E402,F401  (before torch: svp.runtime; registers the Vim models)
import timm  # noqa: E402
import torch  # noqa: E402

from svp import runtime  # noqa: E402
from svp.peft import get_peft_model, make_config  # noqa: E402

E = importlib.import_module("svp.engine.evaluate")   # svp.engine.evaluate is also the function


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_tiny_patch16_224", "vim_small_patch16_224"])
    ap.add_argument("--batch", type=int, default=144)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    ap.add_argument("--no-held-heap", action="store_true", help="svp's import-time malloc thresholds alone")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    with runtime.held_heap(not a.no_held_heap):
        compare(a)


def compare(a):
    print(f"# batch {a.batch}, chunks of at most {E.CPU_CHUNK}, {torch.get_num_threads()} threads, "
          f"heap {'held' if runtime.heap_held() else 'not held'}")
    print("| model | whole batch (images/s) | chunked (images/s) | ratio | same bits |")
    print("|---|---|---|---|---|")
    for name in a.models:
        torch.manual_seed(0)
        from model import method_settings   # benchmarks/model.py's settings
        backbone = timm.create_model(name, num_classes=100)
        model = get_peft_model(backbone, make_config("svp", num_classes=100,
                                                     **method_settings("svp", backbone))).eval()
        x = torch.randn(a.batch, 3, 224, 224)
        runs = {"whole": (model, []), "chunked": (lambda t: E.forward_in_chunks(model, t), [])}
        outs = {}
        with torch.no_grad():
            for _ in range(a.reps + 1):   # the first round warms up (compiles, allocates)
                for k, (fn, ts) in runs.items():
                    t0 = time.perf_counter()
                    outs[k] = fn(x)
                    ts.append(time.perf_counter() - t0)
        whole, chunked = (a.batch / min(runs[k][1][1:]) for k in ("whole", "chunked"))
        same = "yes" if torch.equal(outs["whole"], outs["chunked"]) else "no"
        print(f"| {name} | {whole:.1f} | {chunked:.1f} | {chunked / whole:.2f}x | {same} |")


if __name__ == "__main__":
    main()
