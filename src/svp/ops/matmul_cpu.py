"""Float32 products on the CPU through oneDNN where torch's BLAS runs at half speed.

torch's float32 CPU products (``aten::mm`` / ``addmm``, and ``F.linear`` and autograd's products
through them) go to Intel's MKL in the x86 wheels. MKL runs its AVX-512 code only on Intel
processors; on an AMD one it takes its AVX2 code, which on a Zen 5 core (two full-width 512-bit
FMA pipes) reaches half the core's FMA peak. oneDNN, which torch also ships (its convolutions and
bfloat16 products run on it), picks its code by the instructions the CPU has, not by vendor.
Measured on a 2-vCPU AMD EPYC, Zen 5 (docs/benchmarks.md, "Twenty-seventh round"): a Vim-Tiny
layer's products 2.2-2.4x faster at one thread (~220 against ~100 GFLOP/s), 1.8-2.2x at two. On a
Zen 4 (AVX-512 at the AVX2 rate; "Thirty-second round") the gap is small but on oneDNN's side for
the products it takes there (below): a training step's products 0.83-0.96x the time (every
method, Vim-Tiny and Vim-Small, 2 threads), batch-32 prediction 0.81-0.94x.

``SVP_CPU_MATMUL`` chooses, read once when this module is first used:

* ``auto`` (the default): oneDNN on an AMD processor with AVX-512 (as /proc/cpuinfo says:
  Linux), that is Zen 4 (family 25) and later, where it was measured; torch's BLAS everywhere else
  (Intel: MKL runs its AVX-512 code there; AMD without AVX-512: on a Zen 3 MKL was the faster for
  every product measured, oneDNN 1.07-1.58x its time at 2 threads, 1.04-1.60x at 1, weight
  gradients the most: docs/benchmarks.md, thirty-fourth round).
* ``onednn``: oneDNN wherever torch has it (an error where it has not: no silent fallback).
* ``blas``: torch's own products (``torch.mm``), as before this module.

The two give the same results up to float32 rounding (a product's sums run in another order), so
a machine's bits depend on its choice; on one machine and thread count each is reproducible. Only
float32 products with both operands on the CPU and at least ``MIN_MACS`` multiply-adds take
oneDNN (a call costs ~10 us more than torch's: a (1, 192) x (192, 100) head product 2.8 against
13 us). Under ``auto`` on a Zen 4 (``auto_limits``), only products of at least ``MIN_MACS_ZEN4``,
since there torch's products were the faster up to ~15 M (a batch-1 Vim-Tiny in_proj half,
(197, 192) x (192, 384): 277 against 300 us at 2 threads), and not weight gradients (a first
operand that is a transpose, dY^T X): oneDNN copies it to row-major first, and MKL, which reads
it as it is, was as fast or faster there (a step's products 0.93-0.98x the time with them on
MKL, every method). bfloat16 products already run on oneDNN in torch.

``mm`` is ``torch.mm`` with the same signature, for the inside of autograd Functions (no graph);
``linear`` is ``F.linear``, differentiable, its backward products through ``mm`` too.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
from typing import Optional

import torch
import torch.nn.functional as F

from ..compat import cpu_autocast, cpuinfo_field, recording
from ..errors import BackendError

MIN_MACS = 1 << 21     # smaller products: oneDNN's per-call cost is larger than what it saves
MIN_MACS_ZEN4 = 1 << 24   # the same where its AVX-512 runs at the AVX2 rate (auto only)
MODES = ("auto", "onednn", "blas")
_state = {"on": None, "why": None, "limits": None}


def onednn_available() -> bool:
    """Whether this torch can run a float32 product through oneDNN (``mkldnn._linear_pointwise``)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _amd_avx512(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """Why auto picks oneDNN on this CPU, or None where it does not."""
    vendor = cpuinfo_field("vendor_id", cpuinfo) or platform.processor()
    if "AuthenticAMD" not in (vendor or ""):
        return None
    family = cpuinfo_field("cpu family", cpuinfo)
    flags = (cpuinfo_field("flags", cpuinfo) or "").split()
    # family 25 holds Zen 3 (no AVX-512; MKL measured the faster there) as well as Zen 4, hence the flag
    if family is None or not family.isdigit() or int(family) < 25 or "avx512f" not in flags:
        return None
    return f"AMD family {family} with AVX-512: MKL runs its AVX2 code here"


def auto_limits(cpuinfo: str = "/proc/cpuinfo") -> tuple:
    """(the smallest product, in multiply-adds, ``auto`` sends to oneDNN on this CPU; whether
    it sends weight gradients, a first operand that is a transpose): on a Zen 4 (family 25; its
    AVX-512 at the AVX2 rate, so MKL's AVX2 code is less far behind) neither small products nor
    weight gradients (see the module doc)."""
    if cpuinfo_field("cpu family", cpuinfo) == "25":
        return MIN_MACS_ZEN4, False
    return MIN_MACS, True


def decide(mode: Optional[str] = None, cpuinfo: str = "/proc/cpuinfo") -> tuple:
    """(use oneDNN, why) for ``mode`` (default: ``SVP_CPU_MATMUL``, else 'auto')."""
    raw = os.environ.get("SVP_CPU_MATMUL", "") if mode is None else mode
    mode = raw.strip().lower() or "auto"
    if mode not in MODES:
        raise BackendError(f"SVP_CPU_MATMUL={raw!r}: expected one of {', '.join(MODES)}")
    if mode == "blas":
        return False, "SVP_CPU_MATMUL=blas"
    if mode == "onednn":
        if not onednn_available():
            raise BackendError("SVP_CPU_MATMUL=onednn, but this torch has no oneDNN float32 product "
                               "(torch.ops.mkldnn._linear_pointwise); set it to 'auto' or 'blas'")
        return True, "SVP_CPU_MATMUL=onednn"
    why = _amd_avx512(cpuinfo)
    if why is None:
        return False, "auto: torch's BLAS (not an AMD processor with AVX-512)"
    if not onednn_available():
        return False, f"auto: torch's BLAS ({why}, but this torch has no oneDNN float32 product)"
    return True, f"auto: oneDNN ({why})"


def use_onednn() -> bool:
    """This process's choice (decided once, at first use)."""
    if _state["on"] is None:
        _state["on"], _state["why"] = decide()
        _state["limits"] = auto_limits() if _state["on"] and _state["why"].startswith("auto") else None
    return _state["on"]


def limits() -> tuple:
    """(smallest product in multiply-adds, weight gradients too) for oneDNN in this process, after
    ``use_onednn()``: ``auto_limits()`` under auto, else (``MIN_MACS``, True)."""
    return _state["limits"] or (MIN_MACS, True)


@contextlib.contextmanager
def forced(on: bool):
    """Within the block, products take oneDNN (``on``) or torch's BLAS whatever the machine, as
    ``SVP_CPU_MATMUL=onednn`` / ``blas`` would (tests, benchmarks comparing the two): oneDNN from
    ``MIN_MACS`` up, weight gradients too, as there."""
    if on and not onednn_available():
        raise BackendError("oneDNN products forced on, but this torch has no oneDNN float32 product "
                           "(torch.ops.mkldnn._linear_pointwise)")
    use_onednn()
    old = dict(_state)
    _state.update(on=bool(on), why=f"forced {'on' if on else 'off'} (svp.ops.matmul_cpu.forced)", limits=None)
    try:
        yield
    finally:
        _state.update(old)


def status() -> str:
    """What products run on, and why (``svp doctor``)."""
    if not use_onednn():
        return f"torch BLAS for float32 products ({_state['why']})"
    least, wgrads = limits()
    return (f"oneDNN for float32 products of {least / 2**20:g} M multiply-adds or more"
            f"{'' if wgrads else ' but weight gradients'} ({_state['why']})")


def _plain(t) -> bool:
    """Row-major or the transpose of a row-major matrix: oneDNN's fast kernels take these. Any
    other strides (a column slice of a wider matrix, as the scan's dt_w gradient reads) send it to
    a reference kernel: 121 ms against torch's 0.22 ms for a (384, 1576) x (1576, 12) product."""
    return t.is_contiguous() or t.t().is_contiguous()


def onednn_takes(a, b, macs=None) -> bool:
    """Whether the product of a (.., k) and b (k, n) goes to oneDNN (``mm``'s two matrices; with
    ``macs``, ``linear``'s input and weight)."""
    if not (a.dtype == torch.float32 and b.dtype == torch.float32 and a.device.type == "cpu"
            and b.device.type == "cpu" and not cpu_autocast() and use_onednn()) or recording():
        return False   # (torch.jit.trace / torch.export record torch's own operators)
    least, wgrads = limits()
    if macs is None:
        if a.dim() != 2 or b.dim() != 2 or not (_plain(a) and _plain(b)):
            return False
        if not (wgrads or a.is_contiguous()):   # a weight gradient, dY^T X, where MKL takes those
            return False
        macs = a.shape[0] * a.shape[1] * b.shape[1]
    return macs >= least


def mm(a, b, out=None):
    """``torch.mm(a, b, out=out)``; float32 CPU products through oneDNN where ``onednn_takes``
    them. Not differentiable on that path: for the inside of autograd Functions (where grad mode
    is off), or tensors that need no gradient."""
    if not onednn_takes(a, b) or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    # oneDNN's linear takes the weight as (out, in): b.t(), a view, read as it is; torch makes
    # its input contiguous first, a copy when a is a transpose (a weight gradient, dY^T X). When
    # b's transpose is the cheaper copy, the product is formed transposed, (b^T a^T)^T, and
    # copied back to row-major (m x n, small beside the operands: a prompter's (192, 64) weight
    # gradient over 1576 rows copies 0.10 M elements instead of 0.30 M, 0.7-0.8x the call's time
    # on a Zen 5; docs/benchmarks.md, thirty-first round). The same sums, the same bits there.
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    if (0 if b.t().is_contiguous() else n * k) + m * n < (0 if a.is_contiguous() else m * k):
        r = torch.ops.mkldnn._linear_pointwise(b.t(), a, None, "none", [], "").t()
        return r.contiguous() if out is None else out.copy_(r)
    r = torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return r if out is None else out.copy_(r)


def addmm_(c, a, b):
    """``c.addmm_(a, b)`` (c += a @ b) through ``mm``."""
    if not onednn_takes(a, b):
        return c.addmm_(a, b)
    return c.add_(mm(a, b))


class _Linear(torch.autograd.Function):
    """F.linear with the forward and both backward products through oneDNN (see module doc)."""

    @staticmethod
    def forward(ctx, x, w, b):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, w)
        ctx.has_b, ctx.shape = b is not None, x.shape
        y = mm(x2, w.t())
        if b is not None:
            y.add_(b)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        need = ctx.needs_input_grad
        dx = mm(dy2, w).view(ctx.shape) if need[0] else None
        dw = mm(dy2.t(), x2) if need[1] else None
        db = dy2.sum(0) if ctx.has_b and need[2] else None
        return dx, dw, db


def flop_mapping() -> dict:
    """``custom_mapping`` for ``torch.utils.flop_counter.FlopCounterMode``: the products svp runs
    that the counter's table does not have, so a step's products are all counted (benchmarks,
    tests): in-place ``addmm_`` (a second product accumulated with beta = 1, as ``_InProj`` and
    ``SVPPromptsCPU`` form an input's gradient; the table has ``addmm`` only) and, where torch
    has it, oneDNN's ``_linear_pointwise`` (input (.., k), weight (n, k))."""
    def addmm_flops(self_shape, a_shape, b_shape, *args, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def linear_flops(x_shape, w_shape, *args, **kwargs):
        return 2 * math.prod(x_shape) * w_shape[0]
    mapping = {torch.ops.aten.addmm_: addmm_flops}
    if onednn_available():
        mapping[torch.ops.mkldnn._linear_pointwise] = linear_flops
    return mapping


def linear(x, w, b=None):
    """``F.linear(x, w, b)``, its products through oneDNN where ``mm`` would take them."""
    if (x.dim() >= 2 and w.dim() == 2 and (b is None or b.dtype == torch.float32)
            and onednn_takes(x, w, macs=x.numel() * w.shape[0])):
        return _Linear.apply(x, w, b)
    return F.linear(x, w, b)
