"""Vision Mamba (Vim, Zhu et al. 2024) in pure PyTorch.

One file for the model family, in the manner of timm: the modules and the registered
factory functions. The checkpoint filter that adapts official weights lives in
``loading.py`` (with the reader and the strict loader) and is re-exported here.

Layout of the official "midclstok" models (the ones SVP builds on):
  image -> patch conv -> M tokens -> class token inserted at index M // 2 -> + pos_embed
  -> depth x Block ("add -> RMSNorm -> bidirectional Mamba mixer", residual in fp32)
  -> RMSNorm(residual + hidden) -> row M // 2 -> head.
Parameter names and shapes are those of the official checkpoints, so a state dict
loads without renaming.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ..compat import autocast_dtype, autocast_enabled, cpu_autocast, cpu_autocast_dtype, recording
from ..errors import ConfigError
from ..ops import RMSNorm, causal_conv1d_bld, cpu_kernels, get_backend, selective_scan, triton_kernels
from ..ops.kept import constant_zeros, kept_cast, kept_unless_trained
from ..ops.low_rank import low_rank_products
from ..ops.matmul_cpu import addmm_, linear, mm, onednn_takes
from .loading import checkpoint_filter_fn, load_checkpoint_into, resample_pos_embed_midcls


__all__ = ["VisionMamba", "BiMambaMixer", "Block", "PatchEmbed", "resample_pos_embed_midcls",
           "checkpoint_filter_fn"]

# A hook run before every block on the streams entering it:
#   hook(layer_idx, hidden, residual, cls_pos) -> (hidden, residual, cls_pos)
# For block 0 ``hidden`` is the embedded token sequence and ``residual`` is None;
# for block l > 0 ``hidden`` is block l-1's mixer output and ``residual`` its residual.
# Adaptation methods (SVP prompts, VPT tokens) plug in here without touching the model.
LayerHook = Callable[[int, torch.Tensor, Optional[torch.Tensor], int],
                     Tuple[torch.Tensor, Optional[torch.Tensor], int]]


class PatchGridError(ConfigError):
    """An input size the patch grid cannot take (a ``ValueError`` too)."""


class PatchEmbed(nn.Module):
    """Conv patchify with a stride that may be smaller than the patch (the "+" models)."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.grid_size = self.grid_for(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def grid_for(self, hw) -> Tuple[int, int]:
        grid = []
        for size, p, s, axis in zip(hw, self.patch_size, self.stride, ("height", "width")):
            if size < p or (size - p) % s:
                raise PatchGridError(f"image {axis} {size} does not fit the patch grid (patch {p}, stride {s}): "
                                 f"need {p} + k*{s} pixels")
            grid.append((size - p) // s + 1)
        return tuple(grid)

    def check_images(self, x: torch.Tensor) -> None:
        """Refuse, in words, a batch this embedding cannot take (also called by the PEFT methods
        before they transform the input: SimAM and the pixel prompt failed on it first)."""
        if x.dim() != 4:  # an unbatched (3, H, W) image failed later, in a concatenation
            raise ValueError(f"expected images as (batch, channels, height, width); got shape {tuple(x.shape)}"
                             + (" (one image: add a batch dimension, x[None])" if x.dim() == 3 else ""))
        c = self.proj.in_channels
        if x.shape[1] != c:   # (B, H, W, C) was reported as a width off the patch grid
            last = " (channels last? x.permute(0, 3, 1, 2))" if x.shape[-1] == c else ""
            raise ValueError(f"expected images as (batch, {c}, height, width); got shape {tuple(x.shape)}, "
                             f"{x.shape[1]} channels{last}")
        # torch's own words named the conv's bias, not the input
        if not x.is_floating_point():
            raise ValueError(f"expected floating-point images (the recipe's normalised values: svp's "
                             f"transforms make them); got {x.dtype}")
        w = self.proj.weight
        if x.dtype != w.dtype and not autocast_enabled(x.device.type) and w.device.type != "meta":
            raise ValueError(f"expected {w.dtype} images, the model's dtype; got {x.dtype} (x.to({w.dtype}), "
                             f"or the model .to({x.dtype}), or mixed precision under torch.autocast)")

    def forward(self, x):
        self.check_images(x)
        grid = self.grid_for(x.shape[-2:])
        return self.proj(x).flatten(2).transpose(1, 2), grid


def _check_num_classes(n) -> None:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:   # numpy's integers too
        raise ValueError(f"VisionMamba: num_classes={n!r}; expected a class count, or 0 for no head (features)")


def _fused_cpu(*ts, dtypes=(torch.float32,)) -> bool:
    """Whether the fused numba kernels (conv, add+RMSNorm) take these tensors: float32 (or one
    of ``dtypes``) on the CPU, and the scan itself on the fused 'cpu' backend (forcing another
    backend, e.g. 'reference', then runs the whole model in plain PyTorch)."""
    for t in ts:
        if t is not None and (not t.is_cpu or t.dtype not in dtypes):
            return False
    return get_backend() == "cpu"   # (CPU tensors: the default device's backend)


def _add_rms_norm(kernel, hidden, residual, norm):
    """The fused kernel _fused_norm chose (it checked the arguments)."""
    return kernel(hidden, residual, norm.weight, norm.eps)


def _conv(x, weight, bias, reverse):
    """Causal depthwise conv1d + SiLU on (b, l, E): the fused numba kernel when the scan runs
    on the fused CPU backend too, else the pure-PyTorch version (same result). A per-sample
    (b, 1, E) bias (`svp serve`'s BitFit rows in a mixed batch) takes the fused kernel only
    without a gradient: the kernel sums the bias gradient per channel."""
    if (bias is None or bias.dim() == 1 or not bias.requires_grad) and _fused_cpu(x):
        from ..ops.conv_cpu import causal_conv1d_cpu
        return causal_conv1d_cpu(x, weight, bias, "silu", reverse=reverse)
    if (bias is None or bias.dim() == 1) and _triton_conv(x):
        return triton_kernels.conv_triton.causal_conv1d_triton(x, weight, bias, "silu", reverse=reverse)
    return causal_conv1d_bld(x, weight, bias, "silu", reverse=reverse)


def _triton_conv(x) -> bool:
    """Whether the conv runs as svp.ops.conv_triton's kernels: where the scan runs on the
    'triton' backend (a CUDA GPU by default; CPU tensors under TRITON_INTERPRET=1 with the backend
    forced), unless ``conv_triton.ENABLED`` is off. Its PyTorch form moves ~14x the bytes."""
    return get_backend(x.device) == "triton" and triton_kernels.conv_triton.ENABLED


def _plain_proj(x_proj) -> bool:
    """x_proj as the fused conv + x_proj nodes take it: a bias-free Linear without hooks (its
    weight may be parametrized, e.g. by LoRA: it is read, and gets its gradient, like any tensor)."""
    return (isinstance(x_proj, nn.Linear) and type(x_proj).forward is nn.Linear.forward and x_proj.bias is None
            and not (x_proj._forward_hooks or x_proj._forward_pre_hooks))


def _triton_conv_proj(x, conv, x_proj) -> bool:
    """Whether conv + x_proj run as one node of svp.ops.conv_triton (CausalConv1dProjTriton):
    where _conv would take the Triton conv, with a (dim,) conv bias and a plain x_proj, unless
    GPU_JOINT_NODES is off."""
    return (GPU_JOINT_NODES and _triton_conv(x) and (conv.bias is None or conv.bias.dim() == 1)
            and _plain_proj(x_proj))


def _fused_conv_proj(x, conv, x_proj, bf16_x=False) -> bool:
    """Whether conv + x_proj can run as one fused CPU node: what _conv would run fused, with a
    (dim,) conv bias, and an x_proj that is a bias-free Linear without hooks (its weight may be
    parametrized, e.g. by LoRA: it is read, and gets its gradient, like any tensor). With
    ``bf16_x``, x may be bfloat16 too (svp.ops.conv_cpu.BiConvProjCPU reads it as it is)."""
    x_dtypes = (torch.float32, torch.bfloat16) if bf16_x else (torch.float32,)
    return (_plain_proj(x_proj)
            and (conv.bias is None or conv.bias.dim() == 1) and _fused_cpu(x, dtypes=x_dtypes)
            and _fused_cpu(x_proj.weight))


def _autocast_weight(w, dtype=None):
    """A product's weight in autocast's ``dtype`` (default: CPU autocast's). Autocast keeps its
    cast of a weight only for a leaf that requires grad; a frozen backbone's weights (every
    method but full fine-tuning, and inference) were cast again on every call. Kept here instead
    (svp.ops.kept.kept_cast): the same bits, one cast per weight value."""
    dtype = dtype or cpu_autocast_dtype()
    return kept_cast(w, dtype)


# The mixer's joint nodes off the CPU (docs/benchmarks.md, "GPU, after the second run"): in_proj's
# halves with autocast's casts made once (_InProj.cast_once), each direction's conv + x_proj
# (svp.ops.conv_triton.CausalConv1dProjTriton; both directions' as BiConvProjTriton) and both
# scans (svp.ops.scan_triton.BiScanTriton) as one node each, adding inside the kernels and
# products what autograd added in passes of its own; and SVP's prompt step with its prompters'
# products (svp.ops.prompt_triton.SVPPromptsTriton, taken by svp.peft.svp). False gives the nodes
# of before (conv, x_proj and scan per direction, the prompters' modules, autograd's sums), for an
# A/B on a GPU (benchmarks/gpu_check.py part (c), benchmarks/gpu_profile.py --nodes).
GPU_JOINT_NODES = True


def _triton_bi_scan(x, z) -> bool:
    """Whether the two directions' scans run as one node of svp.ops.scan_triton
    (BiScanTriton): where the scan runs on the 'triton' backend with its loop kernels (the
    tiled ones, an experiment, take no second direction's sum) and x and z share a dtype."""
    # the backend first: reading triton_kernels imports Triton, which the other backends never
    # need (a machine without it, as macOS, crashed here on the 'torch' backend)
    if not (GPU_JOINT_NODES and get_backend(x.device) == "triton" and z is not None and x.dtype == z.dtype):
        return False
    st = triton_kernels.scan_triton
    return st.FORWARD == st.BACKWARD == "loop"


def _fused_bi_scan(x, z) -> bool:
    """Whether the two directions' scans run as one node (svp.ops.scan_cpu.BiScanCPU): the
    scan on the fused CPU backend, float32."""
    return _fused_cpu(x, z)


# the largest rank measured (Vim-Base's): above it, what the backward's per-chunk products cost
# against what they save is not known
_LOW_RANK_TRAIN_MAX = 48


def _low_rank_delta(mixer, grad) -> bool:
    """Whether the fused scan forms the time steps from dt_proj's input and weight itself
    (svp.ops.scan_cpu.BiScanCPU's dt_w), the same values as dt_proj's product but for the order
    of its R-term sums (the tests hold them close): unless a hook is to see or change them, and,
    when a gradient flows back through them (``grad``), only up to rank _LOW_RANK_TRAIN_MAX.
    The backward then forms the input's gradient, and dt_proj's weight gradient where that is
    trained, as small products per chunk of steps (scan_cpu._dlow_rows, _dw_rows), and the
    (b, L, d) time steps and their gradient are never in memory. At first the input's gradient
    was a per-step sum over channels, and Vim-Small's training steps (R = 24) were 3-5% slower
    this way, so training took it only up to R = 16; since the per-chunk products, Vim-Small and
    Vim-Base (R = 48) training steps take the same time or less and Vim-Small's peak memory
    at batch 8 is ~10% lower (docs/benchmarks.md, twenty-third and forty-second rounds)."""
    if mixer.delta_hook is not None or mixer.gate_hook is not None:
        return False
    return not grad or mixer.dt_rank <= _LOW_RANK_TRAIN_MAX


_AMP_CASTS = False   # see amp_casts


@contextlib.contextmanager
def amp_casts():
    """Within it, under CPU autocast the mixer casts in_proj's bfloat16 x and z to float32 (and
    autocast casts y back) instead of its fused kernels reading and writing bfloat16: the way
    before 2026-12-01, and the reference `svp doctor` and the tests hold those kernels to (the
    same bits). Not thread-safe: it sets a module flag."""
    global _AMP_CASTS
    old, _AMP_CASTS = _AMP_CASTS, True
    try:
        yield
    finally:
        _AMP_CASTS = old


def _bf16_fused(t) -> bool:
    """Whether ``t`` is a bfloat16 CPU tensor and the fused CPU kernels run (the 'cpu' scan
    backend): under CPU autocast they read in_proj's bfloat16 outputs as they are."""
    return _fused_cpu(t, dtypes=(torch.bfloat16,))


# LoRA's in_proj and out_proj in training products through svp.ops.low_rank, which never forms the
# (out, in) gradient of W + s B A (False: the parametrization's merged weight and autograd's full
# gradient of it, as before: tests compare the two)
LORA_FACTORED = True


def _low_rank(lin, x):
    """(W, A, B, scale) when ``lin``'s weight is W + scale * B @ A through one parametrization that
    gives its factors (svp.peft.lora: ``factors``), W frozen, in a training forward (grad mode) on
    float32 CPU tensors; else None. With grad mode off (inference) the merged weight's one
    product is the cheaper: the parametrization forms it."""
    if not (LORA_FACTORED and torch.is_grad_enabled()) or recording():   # (a recording: plain operators)
        return None
    plist = getattr(getattr(lin, "parametrizations", None), "weight", None)
    if plist is None or len(plist) != 1 or not hasattr(plist[0], "factors"):
        return None
    w = plist.original
    a, b, scale = plist[0].factors()
    if w.requires_grad or not all(t.is_cpu and t.dtype == torch.float32 for t in (x, w, a, b)):
        return None
    return w, a, b, scale


class _InProj(torch.autograd.Function):
    """in_proj without a bias, as two products on the weight's row halves: x = h Wx^T and
    z = h Wz^T, each contiguous, so the conv and the scan read them in place (one product and a
    chunk gave strided halves, which were copied). Backward forms h's gradient once, in place:
    dx Wx, then dz Wz added by the second product itself (beta = 1), where autograd formed the
    two and added them, one more pass over (b, l, d) per layer (~5 ms a Vim-Tiny batch-8
    step, every method; docs/benchmarks.md, "Twenty-fifth round"; where the products run on oneDNN,
    svp.ops.matmul_cpu, the second is added in a pass of its own). A weight that trains (full fine-tuning, LoRA
    through its parametrization) gets its gradient as one (2E, d) tensor whose halves the two
    products write."""

    @staticmethod
    def products(h, w, E):
        """(x, z): the forward's products (without a gradient to record, they run alone)."""
        h2 = h.reshape(-1, h.shape[-1])
        return mm(h2, w[:E].t()).view(*h.shape[:-1], E), mm(h2, w[E:].t()).view(*h.shape[:-1], E)

    @staticmethod
    def cast_once(h, w, E, dtype):
        """The node under autocast (a GPU's, in the model): the input and the weight cast to
        autocast's ``dtype`` once, here, and the products run on the casts. Left to autocast,
        each half's product cast the input again, and autograd cast both halves' gradients
        back to the input's dtype and added them: three passes over (b, l, d) a layer more
        (docs/benchmarks.md, "GPU, after the second run"). The input's gradient is then formed
        in ``dtype`` and cast once, as the official code's one in_proj product gives it (here
        rounded once more, after the first half's product), where autograd summed the two
        halves' gradients in the input's dtype. A frozen weight's cast is kept (_autocast_weight),
        as on the CPU."""
        run = _InProj.apply if torch.is_grad_enabled() and not recording() else _InProj.products
        with torch.autocast(h.device.type, enabled=False):
            return run(h.to(dtype), _autocast_weight(w, dtype), E)

    @staticmethod
    def forward(ctx, h, w, E):
        x, z = _InProj.products(h, w, E)
        ctx.save_for_backward(h, w)
        ctx.E = E
        ctx.set_materialize_grads(False)   # an unused half's gradient: None, not zeros multiplied
        return x, z

    @staticmethod
    def backward(ctx, dx, dz):
        h, w = ctx.saved_tensors
        E = ctx.E
        if dx is None and dz is None:
            return None, None, None
        dx = None if dx is None else dx.reshape(-1, E)
        dz = None if dz is None else dz.reshape(-1, E)
        dh = dw = None
        if ctx.needs_input_grad[0]:
            if dx is None or dz is None:
                dh = mm(dz, w[E:]) if dx is None else mm(dx, w[:E])
            else:
                dh = addmm_(mm(dx, w[:E]), dz, w[E:])
            dh = dh.view(h.shape)
        if ctx.needs_input_grad[1]:
            h2 = h.reshape(-1, h.shape[-1])
            dw = torch.zeros_like(w) if dx is None or dz is None else torch.empty_like(w)
            if dx is not None:
                mm(dx.t(), h2, out=dw[:E])
            if dz is not None:
                mm(dz.t(), h2, out=dw[E:])
        return dh, dw, None


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer ("bimamba v2"): a forward and a backward selective
    SSM with separate conv1d / x_proj / dt_proj / A / D, outputs averaged."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto",
                 dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4, dt_scale=1.0, divide_out=True,
                 weight_init="official"):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.divide_out = divide_out
        E, N, R = self.d_inner, d_state, self.dt_rank

        # Direct parameters first: this is the official checkpoint's order.
        A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1)
        self.A_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(E))
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D_b = nn.Parameter(torch.ones(E))
        self.A_log._no_weight_decay = self.A_b_log._no_weight_decay = True
        self.D._no_weight_decay = self.D_b._no_weight_decay = True

        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.conv1d_b = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1)
        self.x_proj_b = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj_b = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        if weight_init != "skip":
            for dt_proj in (self.dt_proj, self.dt_proj_b):
                self._init_dt_proj(dt_proj, dt_scale, dt_min, dt_max, dt_init_floor)

        # Set by analysis code (svp.viz) to observe the gates the scan actually uses:
        # gate_hook(mixer, direction, delta, delta_bias, A, B, C) with delta (b, l, E)
        # before bias/softplus and B, C (b, l, N).
        self.gate_hook = None
        # Set by svp.serve to change the time steps per sample in a mixed-adapter batch (LoRA on
        # dt_proj, BitFit's dt bias): delta_hook(mixer, direction, dt, delta) -> delta, with dt
        # (b, l, R) the input of dt_proj and delta = F.linear(dt, dt_proj.weight) (b, l, E).
        self.delta_hook = None
        # Set by svp.serve to change in_proj's output per sample (LoRA on in_proj) without a
        # module hook, which would take the two half products below from the whole batch:
        # in_proj_hook(mixer, hidden, x, z) -> (x, z), each (b, l, E).
        self.in_proj_hook = None

    def _init_dt_proj(self, dt_proj, dt_scale, dt_min, dt_max, dt_init_floor):
        std = self.dt_rank ** -0.5 * dt_scale
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # bias = softplus^-1(dt)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True

    def _conv_proj(self, x, conv, x_proj, reverse):
        # x: (b, l, E). The backward branch runs on the time-reversed sequence; its conv and
        # scan take `reverse=True` so nothing is flipped or copied.
        if _fused_conv_proj(x, conv, x_proj):
            # conv and x_proj as one autograd node: the two gradients of the conv's output
            # (from the scan and from x_proj) are added inside the conv's backward kernel
            from ..ops.conv_cpu import causal_conv1d_proj_cpu
            return causal_conv1d_proj_cpu(x, conv.weight.squeeze(1), conv.bias, x_proj.weight, "silu",
                                          reverse=reverse)
        if _triton_conv_proj(x, conv, x_proj):
            # the same one node on the GPU: x_proj's input gradient added by its own product
            return triton_kernels.conv_triton.causal_conv1d_proj_triton(
                x, conv.weight.squeeze(1), conv.bias, x_proj.weight, "silu", reverse=reverse)
        x = _conv(x, conv.weight.squeeze(1), conv.bias, reverse)
        return x, x_proj(x)

    @staticmethod
    def _neg_exp(A_log):
        """A = -exp(A_log), the same tensor from call to call while A_log keeps its values and
        needs no gradient here (a frozen backbone, inference; svp.ops.kept_unless_trained): the
        exp is not recomputed, and the CPU scan keeps the tables it derives from A on it
        (svp.ops.scan_cpu._tables; ~40 µs per direction and layer at batch 1)."""
        return kept_unless_trained(A_log, "-exp", lambda a: -torch.exp(_wide(a)))

    def _scan_inputs(self, x, conv, x_proj, dt_proj, A_log, D, reverse, name, conv_proj=None, low_rank=False):
        """One direction's conv, x_proj and dt_proj: the scan's (u, delta, A, B, C, D,
        delta_bias), laid out (b, E, l) / (b, N, l) as views of the (b, l, *) products.
        ``conv_proj``: the (conv output, x_proj output) pair when already computed. With
        ``low_rank`` (BiScanCPU's inputs) and where _low_rank_delta allows, BiScanCPU's x_dbl
        form: (u, the x_proj output (b, l, R + 2N), A, None, None, D, delta_bias, dt_proj's
        weight); the fused scan forms the time steps itself, from the output's first R columns."""
        x, x_dbl = conv_proj or self._conv_proj(x, conv, x_proj, reverse)
        w = dt_proj.weight
        if low_rank and _low_rank_delta(self, torch.is_grad_enabled() and (x_dbl.requires_grad or w.requires_grad)):
            return (x.transpose(1, 2), x_dbl, self._neg_exp(A_log), None, None, _wide(D), _wide(dt_proj.bias), w)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, w)  # bias and softplus are fused into the scan
        if self.delta_hook is not None:
            delta = self.delta_hook(self, name, dt, delta)
        A = self._neg_exp(A_log)
        if self.gate_hook is not None:
            self.gate_hook(self, name, delta, dt_proj.bias, A, B, C)
        return (x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), _wide(D),
                _wide(dt_proj.bias))

    def _direction(self, x, z, conv, x_proj, dt_proj, A_log, D, reverse, name):
        u, delta, A, B, C, Dv, bias = self._scan_inputs(x, conv, x_proj, dt_proj, A_log, D, reverse, name)
        y = selective_scan(u, delta, A, B, C, Dv, z=z.transpose(1, 2), delta_bias=bias, delta_softplus=True,
                           reverse=reverse)
        return y.transpose(1, 2)

    def _both_directions_fused(self, x, z, fwd, bwd):
        """_direction(fwd) + _direction(bwd) with the fused CPU kernels: the two scans in one
        node, the second adding its output (and in backward its z gradient) to the first's, and
        when both convs fuse with x_proj, the two convs in one node, the second adding its x
        gradient to the first's: three passes over (b, l, E) fewer, the same bits."""
        cp_f = cp_b = None
        if self._convs_fuse(x):
            xf, dbl_f, xb, dbl_b = cpu_kernels.conv_cpu.bi_conv_proj(   # (_convs_fuse checked its arguments)
                x, (self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight),
                (self.conv1d_b.weight.squeeze(1), self.conv1d_b.bias, self.x_proj_b.weight))
            cp_f, cp_b = (xf, dbl_f), (xb, dbl_b)
        cp_f = cp_f or self._conv_proj(x, fwd[0], fwd[1], fwd[5])
        cp_b = cp_b or self._conv_proj(x, bwd[0], bwd[1], bwd[5])
        # low rank: the x_proj outputs whole (BiScanCPU's x_dbl form; their gradients then come
        # as one tensor each, not three for autograd to concatenate)
        sf = self._scan_inputs(x, *fwd, conv_proj=cp_f, low_rank=True)
        sb = self._scan_inputs(x, *bwd, conv_proj=cp_b, low_rank=True)
        zt = z.transpose(1, 2)
        if all(t is None or t.dtype == torch.float32 for t in sf + sb):
            if len(sf) != len(sb):   # (rank above _LOW_RANK_TRAIN_MAX, one direction trained)
                sf, sb = self._unfold_dbl(sf), self._unfold_dbl(sb)
            if len(sf) == 7:
                sf, sb = sf + (None,), sb + (None,)
            # (checked here: every tensor float32 on the CPU, _fused_bi_scan and the modules' shapes)
            return cpu_kernels.scan_cpu.bidirectional_scan(zt, sf, sb).transpose(1, 2)
        # a hook changed a dtype: two scans (float32, with a bfloat16 z cast for them), the time
        # steps formed as without low_rank
        sf, sb = self._unfold_dbl(sf), self._unfold_dbl(sb)
        y = (selective_scan(*sf[:6], z=zt.float(), delta_bias=sf[6], delta_softplus=True)
             + selective_scan(*sb[:6], z=zt.float(), delta_bias=sb[6], delta_softplus=True, reverse=True))
        return (y.to(z.dtype) if z.dtype == torch.bfloat16 else y).transpose(1, 2)

    def _unfold_dbl(self, s):
        """_scan_inputs' x_dbl form as (u, delta, A, B, C, D, delta_bias), the time steps formed
        by dt_proj's product; any other form as it is."""
        if len(s) == 7:
            return s
        u, x_dbl, A, _, _, D, bias, w = s
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u, F.linear(dt, w).transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, bias

    def forward(self, hidden):
        ip = self.in_proj
        amp = hidden.is_cpu and cpu_autocast()
        if any(m._forward_hooks or m._forward_pre_hooks
               for m in (self.conv1d, self.conv1d_b, self.dt_proj, self.dt_proj_b)):
            _warn_unread_hooks()
        if ip._forward_hooks or ip._forward_pre_hooks:
            x, z = ip(hidden).chunk(2, dim=-1)
        else:
            lr = None if amp or ip.bias is not None else _low_rank(ip, hidden)
            if lr is not None:   # LoRA training: the update kept factored (svp.ops.low_rank)
                x, z = low_rank_products(hidden, *lr, (self.d_inner, self.d_inner))
            else:
                x, z = self._in_proj_halves(hidden, amp)
        if self.in_proj_hook is not None:
            x, z = self.in_proj_hook(self, hidden, x, z)
        if amp:
            # CPU mixed precision (train.amp): in_proj above and out_proj below, 84% (Vim-Tiny) to
            # 88% (Vim-Small) of a mixer's product FLOPs, run in bfloat16. The conv, x_proj, dt_proj
            # and the scan compute in float32, as the time steps' exp(delta A) asks.
            with torch.autocast("cpu", enabled=False):
                y = self._ssm(*self._amp_inputs(x, z), amp=True)
        else:
            y = self._ssm(x, z)
        out = self._out_proj(y, hidden, amp)
        # the residual stream stays float32 (residual_in_fp32) and the fused add+RMSNorm reads it
        return out.float() if amp else out

    def _convs_fuse(self, x) -> bool:
        """Whether both directions' conv + x_proj run as one fused node (bi_conv_proj_cpu), which
        takes x in float32 or bfloat16."""
        return (_fused_conv_proj(x, self.conv1d, self.x_proj, bf16_x=True)
                and _fused_conv_proj(x, self.conv1d_b, self.x_proj_b, bf16_x=True))

    def _amp_inputs(self, x, z):
        """Under CPU autocast: in_proj's bfloat16 x and z as the mixer's inside takes them. The
        fused kernels read bfloat16 as it is: z the scan (which then gives y in bfloat16 for
        out_proj), x the two directions' conv + x_proj. The bits of casting them to float32
        (and y back), without the casts: three casts of a (b, l, E) tensor a layer less forward
        (x, z, y), and three backward (the gradients, written in bfloat16). Anything else gets
        float32."""
        if _AMP_CASTS or not _bf16_fused(z):
            return x.float(), z.float()
        return (x if _bf16_fused(x) and self._convs_fuse(x) else x.float()), z

    def _ssm(self, x, z, amp=False):
        """Both directions' conv, x_proj, dt_proj and scan of (b, l, E) x and z: the sum of the
        two directions' gated outputs, (b, l, E). With ``amp``, x and z as _amp_inputs gives
        them (bfloat16 only where the fused kernels read them; y then bfloat16 too)."""
        fwd = (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, False, "forward")
        bwd = (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, True, "backward")
        if _fused_bi_scan(x, z) or (amp and z.dtype == torch.bfloat16):
            y = self._both_directions_fused(x, z, fwd, bwd)
        elif _triton_bi_scan(x, z):
            # on the GPU as on the CPU, each pair as one node: both convs + x_projs (the second's x
            # gradient added to the first's in the kernel) and both scans (the second's output,
            # and backward its z gradient, added to the first's), where autograd added them in
            # passes of their own
            cp_f = cp_b = None
            if _triton_conv_proj(x, self.conv1d, self.x_proj) and _triton_conv_proj(x, self.conv1d_b, self.x_proj_b):
                uf, df, ub, db = triton_kernels.conv_triton.bi_conv_proj_triton(
                    x, (self.conv1d.weight.squeeze(1), self.conv1d.bias, self.x_proj.weight),
                    (self.conv1d_b.weight.squeeze(1), self.conv1d_b.bias, self.x_proj_b.weight))
                cp_f, cp_b = (uf, df), (ub, db)
            sf = self._scan_inputs(x, *fwd, conv_proj=cp_f)
            sb = self._scan_inputs(x, *bwd, conv_proj=cp_b)
            y = triton_kernels.scan_triton.bidirectional_scan_triton(z.transpose(1, 2), sf, sb).transpose(1, 2)
        else:
            y = self._direction(x, z, *fwd) + self._direction(x, z, *bwd)
        return y

    def _in_proj_halves(self, hidden, amp):
        """Two products on the weight's row halves instead of one product and a chunk, as one
        node (_InProj) where in_proj has no bias (the Vim models): on the CPU for an input and a
        weight of one dtype, and off it, where under autocast the node takes autocast's casts
        (_InProj.cast_once). Otherwise (a bias; dtypes that differ on the CPU) the halves come
        from split, not two slices: a weight that trains (full fine-tuning, LoRA under autocast)
        then gets its gradient as one concatenation of the halves' gradients instead of two
        zero-filled full-size tensors added (~8 ms a Vim-Tiny step)."""
        ip, E = self.in_proj, self.d_inner
        w = _autocast_weight(ip.weight) if amp else ip.weight
        # under CPU autocast, the input cast once, not by each product (and once backward)
        h = hidden.to(cpu_autocast_dtype()) if amp else hidden
        run = _InProj.apply if torch.is_grad_enabled() and not recording() else _InProj.products
        if ip.bias is None and h.is_cpu and h.dtype == w.dtype:
            return run(h, w, E)
        if ip.bias is None and not h.is_cpu and GPU_JOINT_NODES:
            dtype = autocast_dtype(h.device.type)
            if dtype is not None:
                return _InProj.cast_once(h, w, E, dtype)
            if h.dtype == w.dtype:
                return run(h, w, E)
        wx, wz = w.split(E)
        bx, bz = (None, None) if ip.bias is None else ip.bias.split(E)
        return F.linear(h, wx, bx), F.linear(h, wz, bz)

    def _out_proj(self, y, hidden, amp):
        op = self.out_proj
        # y in the stream's dtype, unless autocast runs the product: under CPU autocast (amp) the
        # product takes y as it is, and under a GPU's autocast y (bfloat16 from the scan) would
        # be cast to float32 here and back to bfloat16 by the product, the same bits after two
        # passes over a (b, l, E) tensor forward and two backward (4 ms of a Vim-S step at
        # batch 128 on an H200, docs/benchmarks.md "GPU, second run")
        if not amp and not autocast_enabled(y.device.type):
            y = y.to(hidden.dtype)
        if self.divide_out and not (op._forward_hooks or op._forward_pre_hooks):
            if amp:
                # the halved weight cast once (frozen: kept) and the products in bfloat16, as
                # autocast would run them with its own cast of the weight every call
                return F.linear(y, self._half_cast(op.weight), op.bias)
            # out_proj((y + y_b) / 2) == (y + y_b) @ (W / 2)^T bit for bit (scaling by 2^-1 is
            # exact) with one elementwise pass less forward and backward
            # (not while recording: a trace under no_grad, checked by tracing again, took the
            # other branch and differed)
            if op.bias is None and not torch.is_grad_enabled() and not recording():
                # inference: the halving as the product's alpha, at no cost (the same bits, as
                # above; 59 µs of ~100 per layer at batch 1 went to the weight's multiply and its
                # thread hand-off). Not in training: addmm's backward scales its gradient by alpha
                # in a pass of its own.
                y2 = y.reshape(-1, y.shape[-1])
                if onednn_takes(y2, op.weight.t()):   # (svp.ops.matmul_cpu; the halving exact too)
                    out = mm(y2, op.weight.t()).mul_(0.5)
                else:
                    out = torch.addmm(constant_zeros((), y2.dtype, y2.device), y2, op.weight.t(), beta=0, alpha=0.5)
                return out.view(*y.shape[:-1], out.shape[-1])
            lr = None if op.bias is not None else _low_rank(op, y)
            if lr is not None:   # LoRA training: the update factored, its scale halved too (exact)
                w, a, b, scale = lr
                return low_rank_products(y, self._half(w), a, b, 0.5 * scale, (w.shape[0],))[0]
            return linear(y, self._half(op.weight), None if op.bias is None else op.bias)
        return op(y / 2 if self.divide_out else y)

    @staticmethod
    def _half(w):
        """out_proj's weight / 2. A weight that needs no gradient here (a frozen backbone: every
        method but full fine-tuning) keeps its half on it (svp.ops.kept_unless_trained) while its
        values stay the same: one (d_model, d_inner) multiply per layer and step less. A trained
        weight (full fine-tuning; LoRA on out_proj, whose weight is formed per call) is halved
        per call."""
        return kept_unless_trained(w, "half", lambda t: t * 0.5)

    @staticmethod
    def _half_cast(w):
        """``_half(w)`` in CPU autocast's dtype: the same bits as autocast's cast of ``_half(w)``
        (halving and rounding to bfloat16 commute), kept on a frozen weight."""
        dtype = cpu_autocast_dtype()
        return kept_unless_trained(w, ("half", dtype), lambda t: (t * 0.5).to(dtype))


class Block(nn.Module):
    """Add -> RMSNorm -> mixer. Returns (mixer output, residual stream)."""

    def __init__(self, dim, mixer, drop_path=0.0, norm_eps=1e-5, residual_in_fp32=True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden, residual=None):
        if residual is not None:
            hidden = self.drop_path(hidden)
        norm = self.norm
        kernel = _fused_norm(norm, hidden, residual)
        if kernel is not None:
            # one pass each way (numba on the CPU, Triton on a GPU) instead of ~7 PyTorch ops
            # forward and ~12 backward
            if residual is None:
                return self.mixer(_add_rms_norm(kernel, hidden, None, norm)), hidden
            out, residual = _add_rms_norm(kernel, hidden, residual, norm)
            return self.mixer(out), residual
        residual = hidden if residual is None else residual + hidden
        if self.residual_in_fp32:
            residual = _wide(residual)
        hidden = self.mixer(norm(residual).to(norm.weight.dtype))
        return hidden, residual


def _warn_unread_hooks() -> None:
    warnings.warn("a forward hook on a Vim mixer's conv1d/conv1d_b or dt_proj/dt_proj_b is never called: the "
                  "mixer reads those modules' weights itself (as mamba_ssm's fused path does; the time step's bias "
                  "and softplus happen inside the scan). To observe or change the time steps, set "
                  "mixer.delta_hook or mixer.gate_hook (docs/architecture.md); hooks on in_proj, x_proj, x_proj_b "
                  "and out_proj are called", UserWarning, stacklevel=3)


def _wide(t):
    """``t`` in float32, or float64 when it is: a ``.double()`` model (gradcheck, float64 checks
    on the 'torch' and 'reference' backends) computes in float64 throughout; ``.float()`` here
    made it float32-accurate, silently."""
    return t if t.dtype == torch.float64 else t.float()


def _fused_norm(norm, hidden, residual):
    """The fused add+RMSNorm kernel for these tensors, or None. It computes what
    ``RMSNorm(residual + hidden)`` does (in float32, as residual_in_fp32 asks): the numba one
    when everything is float32 on the CPU, the Triton one (svp.ops.norm_triton) where the scan
    runs on 'triton' and the residual stream is float32 (hidden, the mixer's output, may be
    bfloat16 under autocast); a norm with hooks, or one a method replaced by another module,
    keeps the module call."""
    if not (isinstance(norm, RMSNorm) and type(norm).forward is RMSNorm.forward
            and not (norm._forward_hooks or norm._forward_pre_hooks)
            and (residual is None or residual.shape == hidden.shape)):
        return None
    if _fused_cpu(hidden, residual, norm.weight):
        return cpu_kernels.norm_cpu.add_rms_norm
    if (norm.weight.dtype == torch.float32 and (hidden.dtype == torch.float32 if residual is None
                                                 else residual.dtype == torch.float32)
            and get_backend(hidden.device) == "triton" and triton_kernels.norm_triton.ENABLED):
        return triton_kernels.norm_triton.add_rms_norm_triton
    return None


class VisionMamba(nn.Module):
    grad_checkpointing = False   # (set_grad_checkpointing; a class default, so pickled models have it)

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, num_classes=1000,
                 embed_dim=192, depth=24, d_state=16, d_conv=4, expand=2, drop_rate=0.0,
                 drop_path_rate=0.1, norm_eps=1e-5, residual_in_fp32=True, divide_out=True,
                 global_pool="token", weight_init="official"):
        # weight_init="skip" (timm's name) leaves every tensor as allocated: for a caller that
        # builds on the meta device and then loads every tensor (svp.build, a checkpoint
        # under an adapter); the official init costs Vim-B 0.7 s of CPU.
        super().__init__()
        if global_pool not in ("token", ""):
            raise ValueError(f"VisionMamba pools the middle class token ('token'), or returns every token "
                             f"(''), got global_pool={global_pool!r}")
        if weight_init not in ("official", "skip"):
            raise ValueError(f"VisionMamba weight_init must be 'official' or 'skip', got {weight_init!r}")
        sizes = dict(patch_size=patch_size, stride=stride, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                     d_state=d_state, d_conv=d_conv, expand=expand)
        # (numpy's integers too, as img_size and num_classes took them)
        bad = [f"{k}={v!r}" for k, v in sizes.items()
               if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1]
        if bad:  # depth=0 used to build, then fail in the first forward
            raise ValueError(f"VisionMamba: {', '.join(bad)}; expected positive integers")
        patch_size, stride, in_chans, embed_dim, depth, d_state, d_conv, expand = (int(v) for v in sizes.values())
        sides = img_size if isinstance(img_size, (tuple, list)) else (img_size,)
        if len(sides) not in (1, 2) or any(not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1
                                           for v in sides):
            raise ValueError(f"VisionMamba: img_size={img_size!r}; expected a positive integer or (height, width)")
        # one side given as a sequence is a square (timm's to_2tuple kept (32,) as it is: an IndexError)
        img_size = (int(sides[0]), int(sides[-1])) if isinstance(img_size, (tuple, list)) else int(img_size)
        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.depth = depth

        # Registration order reproduces the official state-dict order.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # Block b gets entry b of [0] + linspace(0, rate, depth): blocks 0 and 1 both have 0,
        # the last has rate*(depth-2)/(depth-1). The final add uses the full rate. (On the CPU
        # even inside a meta-device context: these are plain floats.)
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList([
            Block(embed_dim, BiMambaMixer(embed_dim, d_state, d_conv, expand, divide_out=divide_out,
                                            weight_init=weight_init),
                  drop_path=dpr[i], norm_eps=norm_eps, residual_in_fp32=residual_in_fp32)
            for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        if weight_init != "skip":
            self.init_weights()

    # -- initialisation (a random backbone: svp pretrain, model.random_init; trained checkpoints
    # replace all of it). Like the official code: trunc-normal tokens and head, mamba's kaiming
    # out_proj rescaled by sqrt(depth), the dt init of dt_proj (in BiMambaMixer). Unlike it, and
    # kept (the bundled mini Vim was trained from this init): in_proj / x_proj / x_proj_b are
    # trunc-normal 0.02 (official: nn.Linear's default), the patch conv keeps PyTorch's default
    # (official: lecun-normal weight, zero bias), and dt_proj_b gets dt_proj's dt init (official:
    # a zero bias, softplus 0.69) ------------------------------------------------------------
    def init_weights(self):
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            m = layer.mixer
            for lin in (m.in_proj, m.x_proj, m.x_proj_b):
                trunc_normal_(lin.weight, std=0.02)
            nn.init.kaiming_uniform_(m.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                m.out_proj.weight /= math.sqrt(self.depth)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm's parameter groups (layer-wise lr decay: ``create_optimizer_v2(..., layer_decay=)``):
        the embeddings, then one group per block, the final norm with the last block (as timm's
        ViT groups its own); the head, matched by neither, gets the full rate."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    @torch.jit.ignore
    def output_settings(self) -> dict:
        """The constructor arguments that change the outputs but no weight's name, shape or
        value, so that the base-weights hash an adapter is bound to cannot see them: an adapter
        records them (svp.peft.io.save_adapter) and a load onto a backbone built otherwise is
        refused, where its outputs would differ silently."""
        block = self.layers[0]
        return {"norm_eps": float(block.norm.eps), "final_norm_eps": float(self.norm_f.eps),
                "residual_in_fp32": bool(block.residual_in_fp32), "divide_out": bool(block.mixer.divide_out),
                "global_pool": str(self.global_pool)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block's forward in the backward instead of keeping its activations
        (``torch.utils.checkpoint``, non-reentrant; the RNG state is restored, so DropPath draws
        the same): less memory for full fine-tuning at large batches, one more forward's time."""
        self.grad_checkpointing = bool(enable)

    # -- timm classifier API ------------------------------------------------------
    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool not in (None, "token", ""):
            raise ValueError(f"VisionMamba pools the middle class token ('token'), or returns every token "
                             f"(''), got global_pool={global_pool!r}")
        _check_num_classes(num_classes)
        if global_pool is not None:
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # -- forward ------------------------------------------------------------------
    def embed(self, x) -> Tuple[torch.Tensor, int]:
        """Patch tokens with the class token at the middle and positions added.
        Returns the (b, M+1, D) sequence and the class-token index M // 2."""
        x, grid = self.patch_embed(x)
        cls_pos = x.shape[1] // 2
        x = torch.cat([x[:, :cls_pos], self.cls_token.expand(x.shape[0], -1, -1), x[:, cls_pos:]], dim=1)
        pos_embed = self.pos_embed
        if grid != self.patch_embed.grid_size:  # another input size: resample on the fly
            pos_embed = resample_pos_embed_midcls(pos_embed, grid, self.patch_embed.grid_size)
        return self.pos_drop(x + pos_embed), cls_pos

    def forward_features(self, x, hook: Optional[LayerHook] = None, return_cls_pos: bool = False):
        """Token sequence after the final norm, (b, L, D). ``hook`` (see LayerHook) may
        rewrite the streams entering each block, e.g. to add prompts."""
        hidden, cls_pos = self.embed(x)
        residual = None
        for i, layer in enumerate(self.layers):
            if hook is not None:
                hidden, residual, cls_pos = hook(i, hidden, residual, cls_pos)
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
        hidden = self.drop_path(hidden)
        kernel = _fused_norm(self.norm_f, hidden, residual)
        if kernel is not None:
            out = _add_rms_norm(kernel, hidden, residual, self.norm_f)[0]
        else:
            out = self.norm_f(_wide(residual + hidden)).to(self.norm_f.weight.dtype)
        return (out, cls_pos) if return_cls_pos else out

    def forward_head(self, x, pre_logits: bool = False, cls_pos: Optional[int] = None):
        """Class-token feature (pre_logits) or logits from a forward_features output.
        Without ``cls_pos`` the class token is taken at the middle, (L - 1) // 2. With
        ``global_pool=''`` every token is kept (timm's ``num_classes=0, global_pool=''`` gives
        the (B, L, D) tokens; a head then applies to each)."""
        if self.global_pool == "token":
            x = x[:, (x.shape[1] - 1) // 2 if cls_pos is None else cls_pos]
        return x if pre_logits else self.head(x)

    def forward(self, x):
        x, cls_pos = self.forward_features(x, return_cls_pos=True)
        return self.forward_head(x, cls_pos=cls_pos)

    # -- weights ------------------------------------------------------------------
    def load_pretrained(self, checkpoint_path, strict: bool = True):
        """Load an official Vim checkpoint (.pth training checkpoint or safetensors).
        Called by timm for ``pretrained=True`` (file or hub) and ``checkpoint_path=``."""
        return load_checkpoint_into(self, checkpoint_path, strict=strict)


def _cfg(hub_repo, filename, **kwargs):
    return {
        "hf_hub_id": hub_repo, "hf_hub_filename": filename, "custom_load": "hf",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.midclstok_in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_tiny_patch16_stride8_224.midclstok_ft_in1k": _cfg("hustvl/Vim-tiny-midclstok",
                                                           "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_224.midclstok_in1k": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_small_patch16_stride8_224.midclstok_ft_in1k": _cfg("hustvl/Vim-small-midclstok",
                                                            "vim_s_midclstok_ft_81p6acc.pth"),
    "vim_base_patch16_224.midclstok_in1k": _cfg("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
})


def _create_vim(variant, pretrained=False, **kwargs):
    if kwargs.get("features_only"):   # (timm's error was "no attribute 'feature_info'")
        raise ValueError(f"{variant}: features_only is not supported: a Vim has one token sequence, not a feature "
                         f"pyramid; use model.forward_features(x) (the tokens after the final norm, the class "
                         f"token at the middle) or a LayerHook (svp.models.vim) for each block's input")
    # timm resets custom_load when a file/url/hub overlay is given and would then read the
    # file with its own loader (EMA weights first, no class-token-aware resampling).
    # Our checkpoints always go through VisionMamba.load_pretrained.
    # A whole pretrained_cfg dict (timm documents it too) is forced the same way: given one with a
    # file, timm's loader read the EMA weights (review).
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay:
        kwargs["pretrained_cfg_overlay"] = dict(overlay, custom_load=overlay.get("custom_load", "hf"))
    whole = kwargs.get("pretrained_cfg")
    if isinstance(whole, dict):
        kwargs["pretrained_cfg"] = dict(whole, custom_load=whole.get("custom_load") or "hf")
    # timm's factory arguments (timm >= 1.0.31 passes them to every model; a Vim refused them in a
    # TypeError): the model is built on ``device`` and moved to ``dtype``
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(VisionMamba, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                     **kwargs)
    return model.to(dtype=dtype) if dtype is not None else model


@register_model
def vim_tiny_patch16_224(pretrained=False, **kwargs) -> VisionMamba:
    args = dict(patch_size=16, stride=16, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained=False, **kwargs) -> VisionMamba:
    args = dict(patch_size=16, stride=8, embed_dim=192, depth=24)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_224(pretrained=False, **kwargs) -> VisionMamba:
    args = dict(patch_size=16, stride=16, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained=False, **kwargs) -> VisionMamba:
    args = dict(patch_size=16, stride=8, embed_dim=384, depth=24)
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_base_patch16_224(pretrained=False, **kwargs) -> VisionMamba:
    args = dict(patch_size=16, stride=16, embed_dim=768, depth=24)
    return _create_vim("vim_base_patch16_224", pretrained, **dict(args, **kwargs))


def _patch_timm_checkpoint_path():
    """timm's ``load_checkpoint`` (``timm.models.load_checkpoint``, and the one
    ``timm.create_model(..., checkpoint_path=P)`` calls) prefers EMA weights and cannot
    resample the middle class token. For Vim models, route it through
    :func:`load_checkpoint_into`; other models are untouched."""
    import timm.models
    import timm.models._factory as factory
    import timm.models._helpers as helpers

    original = helpers.load_checkpoint
    if getattr(original, "_svp_patched", False):
        return

    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        if isinstance(model, VisionMamba):
            # timm's order: (model, path, use_ema, device, strict, ...)
            strict = kwargs.get("strict", args[2] if len(args) > 2 else True)
            if kwargs.get("use_ema", args[0] if args else False):   # asked for by name or place (not timm's default)
                warnings.warn("svp loads a Vim checkpoint's 'model' weights, as the official fine-tuning does: "
                              "use_ema=True is not followed (to load the EMA weights, load_checkpoint_into(model, "
                              "{'model': checkpoint['model_ema']}))", stacklevel=2)
            return load_checkpoint_into(model, checkpoint_path, strict=strict)
        return original(model, checkpoint_path, *args, **kwargs)

    load_checkpoint._svp_patched = True
    for module in (helpers, factory, timm.models):
        if getattr(module, "load_checkpoint", None) is original:
            module.load_checkpoint = load_checkpoint
