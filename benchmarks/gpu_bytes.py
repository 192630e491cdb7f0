"""What a training step on the GPU code path moves through memory, counted without a GPU.

Runs one training step (forward, cross-entropy, backward, AdamW) of a Vim with a method on
PyTorch's meta device (shapes only, no data), with the scan on the 'triton' backend as on a
CUDA GPU and the Triton kernels not launched, and counts under a TorchDispatchMode every
PyTorch operator that touches memory (views and allocations left out): how many run, and the
bytes of their tensor arguments and results, each counted once as read or written. That is
what the step's PyTorch ops move at the least (a GPU kernel reads each input at least once);
the Triton launches are listed apart with the bytes of their tensor arguments. Counts, not
times: the same on every machine. The meta device has no autocast, so every activation is
float32 here; under bfloat16 autocast on a GPU the products' outputs and what follows them
move about half as many bytes.

    python benchmarks/gpu_bytes.py [--model vim_small_patch16_224] [--method svp] [--batch 128]
                                   [--configs none conv conv+norm conv+norm+prompt] [--top 12]

A configuration names the Triton kernels the step runs beside the scan's: ``none`` (the mixer's
conv, the blocks' add + RMSNorm and SVP's prompt step in PyTorch, as before 2026-12-04), ``conv``
(svp.ops.conv_triton), ``norm`` (svp.ops.norm_triton), ``prompt`` (svp.ops.prompt_triton), joined
by ``+``; ``conv+norm+prompt`` is what the 'triton' backend runs. A ``+apart`` token turns the joint
nodes off (models/vim.py's GPU_JOINT_NODES: the mixer's nodes per direction and SVP's prompters as
modules, with autograd's sums), for the A/B of what they save.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
os.environ["TRITON_INTERPRET"] = "1"   # lets the 'triton' backend take meta tensors; nothing runs

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

# no memory traffic of their own
FREE = {"view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "slice", "select", "unsqueeze", "squeeze",
        "split", "split_with_sizes", "chunk", "permute", "detach", "alias", "unbind", "reshape", "empty",
        "empty_like", "new_empty", "new_empty_strided", "empty_strided", "_reshape_alias", "lift_fresh"}


def _nbytes(t):
    return t.numel() * t.element_size()


class Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = collections.Counter()
        self.place = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in FREE:
            return out
        n = sum(_nbytes(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        self.ops[name] += 1
        self.bytes[name] += n
        frames = [f for f in traceback.extract_stack()[:-1] if os.sep + "svp" + os.sep in f.filename]
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "(autograd)"
        self.place[(name, where)] += n
        return out


def count(model_name, method, batch, kernels):
    import timm

    import svp.models  # noqa: F401  (registers the Vim models)
    from svp.ops import conv_triton, dispatch, norm_triton, prompt_triton, scan_triton
    from svp.peft import get_peft_model, make_config

    launches = collections.Counter()
    launch_bytes = collections.Counter()

    def fake_launch(kernel, grid, *args, **kwargs):
        name = getattr(kernel, "fn", kernel).__name__
        launches[name] += 1
        launch_bytes[name] += sum(_nbytes(a) for a in args if isinstance(a, torch.Tensor))

    scan_triton._launch = conv_triton._launch = norm_triton._launch = prompt_triton._launch = fake_launch
    conv_triton.ENABLED = "conv" in kernels
    norm_triton.ENABLED = "norm" in kernels
    prompt_triton.ENABLED = "prompt" in kernels
    from svp.models import vim
    vim.GPU_JOINT_NODES = "apart" not in kernels
    torch.manual_seed(0)
    # .train(): in the mode `svp train` steps in (svp.engine.setup): PeftModel.train keeps a frozen
    # backbone's DropPath off, except for methods that train it in train mode (SVP, full fine-tuning)
    model = get_peft_model(timm.create_model(model_name, pretrained=False, num_classes=100),
                           make_config(method, num_classes=100)).to("meta").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    x = torch.empty(batch, 3, 224, 224, device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    dispatch.set_backend("triton")

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()      # AdamW's state is made in the first step
    launches.clear()
    launch_bytes.clear()
    with Traffic() as t:
        step()
    dispatch.set_backend(None)
    return t, launches, launch_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vim_small_patch16_224")
    ap.add_argument("--method", default="svp")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--configs", nargs="+", default=["none", "conv", "conv+norm", "conv+norm+prompt"],
                    help="the Triton kernels beside the scan's, one step counted for each")
    ap.add_argument("--top", type=int, default=12, help="rows of the largest operators and places")
    a = ap.parse_args(argv)
    known = {"none", "conv", "norm", "prompt", "apart"}
    for conv in a.configs:   # a misspelt kernel was counted as off and labelled as asked
        bad = [k for k in conv.split("+") if k not in known]
        if bad:
            ap.error(f"--configs {conv}: unknown {', '.join(bad)}; expected + joined names from {sorted(known)}")
    rows = []
    for conv in a.configs:
        t, launches, launch_bytes = count(a.model, a.method, a.batch, conv.split("+"))
        total = sum(t.bytes.values())
        rows.append((conv, sum(t.ops.values()), total, sum(launches.values()), sum(launch_bytes.values())))
        print(f"\n## {a.model}, {a.method}, batch {a.batch}, Triton kernels beside the scan's: {conv}")
        print(f"PyTorch operators: {sum(t.ops.values())}, {total / 1e9:.2f} GB "
              f"({total / a.batch / 1e6:.1f} MB an image)")
        print("Triton launches: " + ", ".join(f"{k} {v} ({launch_bytes[k] / 1e9:.2f} GB of arguments)"
                                              for k, v in sorted(launches.items())))
        print("largest operators:")
        for k, v in t.bytes.most_common(a.top):
            print(f"  {k:24s} {t.ops[k]:6d} calls {v / 1e9:8.2f} GB")
        print("largest places (the svp line that called them):")
        for (k, where), v in t.place.most_common(a.top):
            print(f"  {v / 1e9:8.2f} GB  {k:20s} {where}")
    print("\n| kernels beside the scan | PyTorch operators | their GB | x the first | Triton launches | "
          "their argument GB |")
    print("|---|---|---|---|---|---|")
    for conv, n, b, la, lb in rows:
        print(f"| {conv} | {n} | {b / 1e9:.1f} | {b / rows[0][2]:.2f}x | {la} | {lb / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
