"""The GPU benchmark scripts run: a GPU is lent to few sessions, for minutes, and a script that
fails there wastes the loan. Each runs here in its --dry-run form (the CPU, Triton's
interpreter, tiny shapes), in a fresh process as on the GPU machine, and must write what the
docs read from it. The numbers are meaningless here; the rows, their fields and the reference
rows' zero differences are not."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from triton_helpers import require_triton

require_triton()
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SVP_SCAN_BACKEND")}
    env["PYTHONPATH"] = os.path.join(ROOT, "src")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_triton_sweep_times_the_scan_and_the_conv(tmp_path):
    script("triton_sweep.py", str(tmp_path), "--dry-run", "--parts", "conv,regs")
    res = json.loads((tmp_path / "triton_sweep.json").read_text())
    # --parts conv,regs: the scan's default row, then its register caps (the same arithmetic)
    default, *caps = res["rows"]
    assert default["block_d"] == "default" and default["maxnreg"] == "-"
    assert default["diff"] == 0 and default["fwd_ms"] > 0 and default["bwd_ms"] > 0
    assert caps and all(isinstance(r["maxnreg"], int) and r["diff"] == 0 for r in caps), caps
    from svp.ops import conv_triton as ct
    first, *rest = res["conv"]
    assert (first["block_l"], first["block_d"], first["warps"], first["backward"]) == (
        ct.BLOCK_L, ct.BLOCK_D, ct.WARPS, ct.BACKWARD)
    assert first["diff"] == 0 and {r["backward"] for r in rest} == {"split", "fused"}
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["diff"] < 1e-6 for r in res["conv"])
    md = (tmp_path / "triton_sweep.md").read_text()
    assert "conv + SiLU" in md and md.count("| split |") + md.count("| fused |") == len(res["conv"])


def test_gpu_check_times_the_scan_beside_its_bound(tmp_path):
    script("gpu_check.py", str(tmp_path), "--dry-run", "--parts", "b")
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "a" not in res and "c" not in res
    rows = res["b"]
    assert {r["backend"] for r in rows} >= {"triton", "torch"}
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["fwd_ms"] < r["fwdbwd_ms"], r           # the forward is part of forward + backward
        assert abs(r["fwd_x_bound"] - r["fwd_ms"] / r["bound_fwd_ms"]) <= 1e-9 * r["fwd_x_bound"], r
    assert "## (b) scan" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_profile_prints_the_step_and_its_shapes():
    out = script("gpu_profile.py", "--dry-run", "--backend", "torch", "--rows", "3", "--shapes", "3")
    assert out.count("Self CPU time total") == 2 and "Input Shapes" in out


def test_gpu_check_replays_the_captured_step(tmp_path):
    # --graph's two rows (the torch backend: the interpreter would take minutes); on a CPU the
    # "graph" runs the step eagerly (there is no capture to test here), so this holds the script's
    # logic: as many steps as the eager row, each of them training
    script("gpu_check.py", str(tmp_path), "--dry-run", "--parts", "c", "--graph", "torch")
    eager, graph = json.loads((tmp_path / "gpu_check.json").read_text())["c"]
    assert graph["backend"] == "torch (whole step in a CUDA graph)", graph
    for r in (eager, graph):
        assert "error" not in r and r["train_img_s"] > 0 and r["infer_img_s"] > 0, r
    assert graph["param_sum_start"] == eager["param_sum_start"] != graph["param_sum"] == eager["param_sum"]
    assert "whole step in a CUDA graph" in (tmp_path / "gpu_check.md").read_text()


def test_triton_asm_compiles_every_kernel_of_a_step_as_its_launch_specialises_it(tmp_path):
    # one Vim-Tiny SVP step on fake CUDA tensors: every kernel it launches, compiled for sm_90 with
    # the launch's specialisation (alignment, divisibility by 16) and put through ptxas
    out = tmp_path / "asm.json"
    script("triton_asm.py", "--model", "vim_tiny_patch16_224", "--batch", "8", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"_fwd", "_bwd", "_sum_mid", "_conv_fwd", "_conv_dpre", "_norm_fwd",
                                           "_norm_bwd", "_prompt_fwd", "_prompt_bwd"}
    for name in ("_fwd", "_bwd"):   # both directions of each of the 24 blocks, forward and backward
        scan = [r for r in rows if r["kernel"] == name]
        assert sum(r["launches"] for r in scan) == 48, scan
        # B and C are slices of x_proj's bfloat16 output 12 and 28 columns in (24 and 56 bytes):
        # not 16-byte aligned, as on a GPU; u is a tensor of its own
        assert all("u_ptr" in r["aligned"] and "B_ptr" not in r["aligned"] and "C_ptr" not in r["aligned"]
                   for r in scan), scan
    assert all(r["registers"] > 0 and r["spill_bytes"] is not None for r in rows), rows
    # and each fits an SM at least once, by CUDA's occupancy rules for sm_90
    assert all(r["warps"] <= r["warps_per_sm"] <= 64 for r in rows), rows


def test_gpu_bytes_counts_what_the_joint_nodes_save():
    """benchmarks/gpu_bytes.py on the meta device (a Vim-Tiny SVP step at batch 2, the 'triton'
    backend's path): with the joint nodes the step runs fewer PyTorch operators than with them
    apart; autograd's sums of the stream's three gradients at each prompted layer but the first
    (whose stream needs none) are gone, at least 2 x 23 adds of a (2, 197, 192) float32 tensor
    reading two and writing one; and so are the sums over rows of the Cross and Inner-up biases'
    gradients, 2 x 24, which SVP's prompt node forms in its kernel (the mixer's nodes have no
    such sums: this part fails if the prompt step's node is not taken). The step is counted in the
    mode `svp train` runs it in: SVP's and full fine-tuning's backbones in train mode, where each
    DropPath draws one mask, and a frozen backbone of another method (LoRA) in eval mode, drawing none."""
    stdout = script("gpu_bytes.py", "--model", "vim_tiny_patch16_224", "--batch", "2", "--configs",
                    "conv+norm+prompt+apart", "conv+norm+prompt", "--top", "60")
    sections = stdout.split("\n## ")[1:]
    assert len(sections) == 2

    def op(section, name):
        m = re.search(rf"^  {name}\s+(\d+) calls\s+([\d.]+) GB", section, re.M)
        return (int(m.group(1)), float(m.group(2)) * 1e9) if m else (0, 0.0)
    rows = re.findall(r"^\| (conv\+norm\+prompt\S*) \| (\d+) \| ([\d.]+) \|", stdout, re.M)
    (apart, n_apart, _), (joint, n_joint, _) = rows
    assert (apart, joint) == ("conv+norm+prompt+apart", "conv+norm+prompt")
    assert int(n_joint) < int(n_apart)
    assert op(sections[0], "add")[1] - op(sections[1], "add")[1] >= 2 * 23 * 3 * 2 * 197 * 192 * 4 * 0.99
    assert op(sections[0], "sum")[0] - op(sections[1], "sum")[0] >= 2 * 24
    # SVP trains its frozen backbone in train mode (the official recipe), as full fine-tuning does:
    # each DropPath draws its mask; LoRA's frozen backbone stays in eval mode and draws none
    import timm
    from timm.layers import DropPath

    import svp.models  # noqa: F401  (registers the Vim models)
    n_drop = sum(isinstance(m, DropPath) for m in timm.create_model("vim_tiny_patch16_224", num_classes=100).modules())
    assert n_drop > 0 and op(sections[0], "bernoulli_")[0] == op(sections[1], "bernoulli_")[0] == n_drop
    full = script("gpu_bytes.py", "--model", "vim_tiny_patch16_224", "--batch", "2", "--method", "full",
                  "--configs", "conv+norm+prompt", "--top", "60")
    assert op(full, "bernoulli_")[0] == n_drop
    lora = script("gpu_bytes.py", "--model", "vim_tiny_patch16_224", "--batch", "2", "--method", "lora",
                  "--configs", "conv+norm+prompt", "--top", "60")
    assert op(lora, "bernoulli_") == (0, 0.0)
