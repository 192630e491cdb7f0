"""What each adaptation method costs, at the settings `svp train --method M` gives (the
library's defaults): trainable parameters, the adapter file it saves, the products' work per
image, and measured time (inference at batch 1 and 32, one training step), all in one run.

    python benchmarks/method_costs.py                                   # Vim-Small, every method
    python benchmarks/method_costs.py --model vim_tiny_patch16_224 --methods linear svp lora \\
        --train-batch 8 --infer-batches 1 32 --threads 2 --json costs.json

Parameters and adapter bytes are counted in this process: ``svp.peft.get_peft_model(timm model,
make_config(method, num_classes=N))`` and ``PeftModel.save`` into a temporary folder (the
adapter's safetensors file alone: the JSON beside it is a few hundred bytes). Time, memory and
work come from ``benchmarks/model.py``'s own child process per configuration (random 224 px
images, the engine's optimizer, the heap held, the float32 matmul rate measured in the same
process), so each number is that configuration's alone. GFLOP per image: the matrix products and
convolutions one forward runs (torch's FlopCounterMode, with the fused kernels' products and the
depthwise conv counted as model.py counts them): the measure fvcore/timm tables use; the scan's
elementwise work is not in it. "train GFLOP / image" is the step's forward and the backward the
method needs. The wall times are best-of --reps on this machine: compare rows of one run only,
and read the ratio columns (each method's time over linear probing's in the same run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")


def counts(model_name: str, method: str, num_classes: int) -> dict:
    """Trainable parameters (with and without the head) and the saved adapter's bytes."""
    import svp  # noqa: F401  (before torch: svp.runtime; registers the Vim models)
    import timm
    import torch
    from svp.peft import get_peft_model, make_config
    from svp.peft.io import ADAPTER_WEIGHTS
    torch.manual_seed(0)
    pm = get_peft_model(timm.create_model(model_name, num_classes=num_classes), make_config(method,
                                                                                          num_classes=num_classes))
    c = pm.trainable_counts()
    with tempfile.TemporaryDirectory() as d:
        pm.save(d)
        size = os.path.getsize(os.path.join(d, ADAPTER_WEIGHTS))
    return {"settings": {k: v for k, v in pm.config.to_dict().items() if k not in ("num_classes", "method")},
            "counts": c, "adapter_bytes": size}


def measure(spec: dict) -> dict:
    r = subprocess.run([sys.executable, os.path.join(HERE, "model.py"), "--child", json.dumps(spec)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{spec}: failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} M" if n < 1e7 else f"{n / 1e6:.1f} M"


def main(argv=None) -> int:
    sys.path.insert(0, SRC)
    from svp.peft.registry import list_methods
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vim_small_patch16_224")
    ap.add_argument("--methods", nargs="+", default=None, help=f"default: every method ({', '.join(list_methods())})")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--infer-batches", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=json_path, default=None)
    a = ap.parse_args(argv)
    methods = a.methods or list_methods()
    unknown = sorted(set(methods) - set(list_methods()))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(list_methods())}")
    if "linear" not in methods:
        methods = ["linear"] + methods   # (the ratios' reference)
    print(f"# {a.model}, {a.num_classes} classes; {os.cpu_count()} cpus, {a.threads} threads; "
          f"load average {os.getloadavg()}", flush=True)
    rows = []
    for method in methods:
        row = {"method": method, **counts(a.model, method, a.num_classes)}
        base = {"model": a.model, "method": method, "settings": {}, "threads": a.threads, "reps": a.reps}
        row["infer"] = {b: measure({**base, "mode": "infer", "batch": b}) for b in a.infer_batches}
        if a.train_batch:
            row["train"] = measure({**base, "mode": "train", "batch": a.train_batch})
        rows.append(row)
        said = [f"trainable {row['counts']['trainable_without_head']:,} without the head",
                f"adapter {row['adapter_bytes']:,} B"]
        said += [f"inference batch {b} {r['seconds'] * 1e3:.0f} ms, {r['flops'] / b / 1e9:.2f} GFLOP/image"
                 for b, r in row["infer"].items()]
        if "train" in row:
            said.append(f"training step batch {a.train_batch} {row['train']['seconds'] * 1e3:.0f} ms")
        print(f"{method}: " + "; ".join(said), flush=True)
    ref = rows[methods.index("linear")]
    some = next(iter(ref["infer"].values()), ref.get("train"))
    print(f"\n# cpu: {some['cpu'] if some else '-'}\n")
    head = ["method", "settings", "trainable (without head)", "adapter file", "GFLOP / image (forward)"]
    head += [f"inference batch {b}: ms (x linear)" for b in a.infer_batches]
    if a.train_batch:
        head += ["train GFLOP / image", f"train step batch {a.train_batch}: ms (x linear)", "train peak RSS MiB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items()
                             if k not in ("head", "simam", "backbone_train_mode", "compat")) or "-"
        c = row["counts"]
        cells = [row["method"], settings, _mb(c["trainable_without_head"]), f"{row['adapter_bytes'] / 1e6:.2f} MB",
                 f"{row['infer'][a.infer_batches[0]]['flops'] / a.infer_batches[0] / 1e9:.2f}" if a.infer_batches
                 else "-"]
        for b in a.infer_batches:
            r, r0 = row["infer"][b], ref["infer"][b]
            cells.append(f"{r['seconds'] * 1e3:.0f} ({r['seconds'] / r0['seconds']:.2f}x)")
        if a.train_batch:
            t, t0 = row["train"], ref["train"]
            cells += [f"{t['flops'] / a.train_batch / 1e9:.2f}",
                      f"{t['seconds'] * 1e3:.0f} ({t['seconds'] / t0['seconds']:.2f}x)", f"{t['peak_rss_mib']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
