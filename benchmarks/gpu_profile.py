"""Where a Vim-S SVP training step spends its GPU time (issue 11): torch.profiler over one
step (forward, backward, AdamW) at batch 128, 224 px, bfloat16 autocast, after two warm-up
steps; prints the kernels by total CUDA time and the scan kernels' share.

    PYTHONPATH=src python benchmarks/gpu_profile.py [--backend triton] [--batch 128] [--shapes 40]
    PYTHONPATH=src python benchmarks/gpu_profile.py --dry-run      # CPU, mini Vim: logic only
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--kernels", choices=("loop", "tiled"), default="loop",
                    help="the Triton backend's kernels (scan_triton.FORWARD and BACKWARD)")
    ap.add_argument("--around", choices=("triton", "torch"), default="triton",
                    help="the mixer's conv, the blocks' add + RMSNorm and SVP's prompt step on the triton "
                         "backend: their Triton kernels (conv_triton, norm_triton, prompt_triton) or their PyTorch "
                         "forms")
    ap.add_argument("--nodes", choices=("joint", "per-direction"), default="joint",
                    help="the joint nodes on the GPU path (models/vim.py's GPU_JOINT_NODES: the mixer's, and SVP's "
                         "prompt step with its products) or the mixer's nodes per direction and the prompters' "
                         "modules, with autograd's sums")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--shapes", type=int, default=0, metavar="N",
                    help="also print the N operators with the most CUDA time grouped by input shapes (which "
                         "copies, multiplies and adds: where in the model they come from)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import timm
    from torch.profiler import ProfilerActivity, profile

    import svp.models  # noqa: F401  (registers the Vim models)
    from svp.ops import dispatch
    from svp.peft import get_peft_model, make_config
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_profile: no CUDA GPU here (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.dry_run else "cuda")
    if a.dry_run:
        arch, kw, svp_kw, batch, px = "vim_mini_patch4_32", dict(depth=2), dict(shared_layers=2, hidden=8), 2, 12
    else:
        arch, kw, svp_kw, batch, px = "vim_small_patch16_224", {}, {}, a.batch, 224
    torch.manual_seed(0)
    model = get_peft_model(timm.create_model(arch, pretrained=False, num_classes=100, **kw),
                           make_config("svp", num_classes=100, **svp_kw)).to(dev).train()   # (as gpu_bytes)
    # fused where torch has it, as `svp train` steps (svp.engine.optim, train.opt_fused=auto)
    from svp.engine.optim import fused_available
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            fused=fused_available(dev.type) or None)
    x = torch.randn(batch, 3, px, px, device=dev)
    y = torch.randint(0, 100, (batch,), device=dev)
    dispatch.set_backend(a.backend)
    if a.backend == "triton":
        from svp.ops import conv_triton, norm_triton, prompt_triton, scan_triton
        scan_triton.FORWARD = scan_triton.BACKWARD = a.kernels
        conv_triton.ENABLED = norm_triton.ENABLED = prompt_triton.ENABLED = a.around == "triton"
    from svp.models import vim
    vim.GPU_JOINT_NODES = a.nodes == "joint"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, record_shapes=a.shapes > 0) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    if dev.type == "cuda":
        key = "self_device_time_total"   # (torch >= 2.4; what the first run used)
        try:   # the kernels' own time ranges (the aten ops and autograd nodes above them repeat it)
            from torch.autograd import DeviceType
            kern = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            total = sum(e.time_range.elapsed_us() for e in kern)
            names = ("_fwd", "_bwd", "_fwd_tiled", "_bwd_tiled")
            scan = sum(e.time_range.elapsed_us() for e in kern if e.name in names)
            around = ("_conv_fwd", "_conv_bwd", "_conv_dpre", "_norm_fwd", "_norm_bwd", "_prompt_fwd", "_prompt_bwd")
            conv = sum(e.time_range.elapsed_us() for e in kern if e.name in around)
            print(f"kernel time in the step: {total / 1e3:.2f} ms; the scan's ({', '.join(names)}): "
                  f"{scan / 1e3:.2f} ms ({100 * scan / max(total, 1):.1f}%); the kernels around it "
                  f"({', '.join(around)}): {conv / 1e3:.2f} ms")
        except Exception as e:     # the table below matters more than this line
            print(f"(no kernel-time summary: {type(e).__name__}: {e})")
    print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))
    if a.shapes:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=a.shapes,
                                                                 max_name_column_width=40, max_shapes_column_width=80))
    return 0


if __name__ == "__main__":
    sys.exit(main())
