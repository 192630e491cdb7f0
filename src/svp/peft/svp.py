"""Selective Visual Prompting (SVP; Yao et al., AAAI 2025) on a frozen Vision Mamba.

Before every layer l, every patch token x (never the class token) becomes
    x + alpha_{l // S} * G^C_{l // S}(x) + beta_l * G^I_l(x)
with the Cross prompter G^C_j(x) = SiLU(W x + b) (D -> D, one per group of S layers),
the Inner prompter G^I_l(x) = SiLU(Up(Down(x))) (D -> r -> D, no activation between,
one per layer), and element-wise factors alpha (per group) and beta (per layer),
both zero-initialised so that an untrained SVP model is exactly the frozen backbone (in eval mode).

Which stream (docs/methods.md, note D2; as in the official code, in both modes): before layer 0 the
prompter reads and writes the embedded tokens; before layer l > 0 it reads and writes
``hidden`` = layer l-1's mixer output, which the next block then adds to the residual
stream (so the prompt reaches the token representation through the residual add,
and passes through that block's DropPath when DropPath is active).

compat='paper' (default): each token's Cross prompt is computed from that token.
compat='official' (docs/methods.md, note D1): the first half (indices < cls_pos) is prompted as above;
the second half's Cross prompt at index cls_pos+1+k is G^C of the *already prompted*
first-half token k, as the official code computes it in place.

In both modes the backbone trains in train mode (its DropPath schedule active), as the official
recipe does (spec sections 1.2 and 7.5); ``backbone_train_mode=False`` keeps it in eval mode.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compat import autocast_dtype, cpu_autocast, cpu_autocast_dtype
from ..models.loading import mismatch_lines
from ..ops import cpu_kernels, get_backend, triton_kernels
from .base import PeftConfig, PeftMethod
from .registry import register_method

COMPAT = ("paper", "official")


@dataclasses.dataclass
class SVPConfig(PeftConfig):
    """shared_layers: S, layers per Cross-prompter group (must divide the depth).
    hidden: r, the Inner prompter's bottleneck width.
    use_cross / use_inner: ablation switches (Cross only, Inner only, both).
    compat: 'paper' or 'official' (see the module docstring)."""
    shared_layers: int = 8
    hidden: int = 64
    use_cross: bool = True
    use_inner: bool = True
    compat: str = "paper"

    method = "svp"

    def __post_init__(self):
        super().__post_init__()
        if self.compat not in COMPAT:
            raise ValueError(f"svp: compat={self.compat!r}; expected one of {COMPAT}")
        if not (self.use_cross or self.use_inner):
            raise ValueError("svp: use_cross and use_inner are both False; nothing to train")
        if int(self.shared_layers) <= 0 or int(self.hidden) <= 0:
            raise ValueError(f"svp: shared_layers and hidden must be positive, got "
                             f"{self.shared_layers}, {self.hidden}")


class InnerPrompter(nn.Module):
    """G^I = SiLU(Up(Down(x))); submodule names 0 (down) and 1 (up) as in the official
    ``prompt_generator.{i}.0/1``."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.add_module("0", nn.Linear(dim, hidden))
        self.add_module("1", nn.Linear(hidden, dim))

    def forward(self, x):
        return F.silu(self._modules["1"](self._modules["0"](x)))


class CrossPrompter(nn.Module):
    """G^C = SiLU(Linear D -> D); submodule name 0 as in ``prompt_generator_shared.{j}.0``."""

    def __init__(self, dim):
        super().__init__()
        self.add_module("0", nn.Linear(dim, dim))

    def forward(self, x):
        return F.silu(self._modules["0"](x))


class SVP(PeftMethod):
    # the official recipe puts the whole model in train mode: DropPath drops the frozen blocks'
    # mixer outputs, and with them the prompts they carry (D2). (A class attribute: what a
    # configuration without the setting means is known without building the method.)
    default_backbone_train_mode = True
    uses_hook = True
    serve_shared = True   # prompts computed from each row's own tokens, added in place

    def __init__(self, config: SVPConfig, model: nn.Module):
        super().__init__(config, model)
        if getattr(model, "family", "vim") != "vim":
            raise ValueError(f"svp: selective prompts act on a Mamba mixer's selective scan; the backbone is a "
                             f"{type(model).__name__}, which has none (on a ViT: vpt_deep, lora, adapter, ...)")
        depth, dim = len(model.layers), model.embed_dim
        S = int(config.shared_layers)
        if depth % S:
            raise ValueError(f"svp: shared_layers={S} does not divide the model depth {depth}; "
                             f"choose a divisor of {depth} (e.g. {[d for d in range(1, depth + 1) if depth % d == 0]})")
        self.depth, self.dim, self.S = depth, dim, S
        self.groups = depth // S
        self.official = config.compat == "official"
        # Parameters are created after the backbone, so nn.Linear's default init (as the
        # official code, whose prompters are built after the model's custom init).
        if config.use_inner:
            self.inner = nn.ModuleList([InnerPrompter(dim, int(config.hidden)) for _ in range(depth)])
            self.beta = nn.Parameter(torch.zeros(depth, dim))
        if config.use_cross:
            self.cross = nn.ModuleList([CrossPrompter(dim) for _ in range(self.groups)])
            self.alpha = nn.Parameter(torch.zeros(self.groups, dim))

    def _parts(self, layer_idx):
        cross = inner = None
        if self.config.use_cross:
            g = layer_idx // self.S
            cross = (self.cross[g], self.alpha[g])
        if self.config.use_inner:
            inner = (self.inner[layer_idx], self.beta[layer_idx])
        return cross, inner

    @staticmethod
    def _prompt(x_cross, x_inner, cross, inner):
        p = 0
        if cross is not None:
            p = p + cross[1].to(x_cross.dtype) * cross[0](x_cross)
        if inner is not None:
            p = p + inner[1].to(x_inner.dtype) * inner[0](x_inner)
        return p

    def prompt_tokens(self, layer_idx: int, hidden: torch.Tensor, cls_pos: int) -> torch.Tensor:
        """The prompted sequence for layer ``layer_idx`` (functional; class token untouched)."""
        cross, inner = self._parts(layer_idx)
        if not self.official and _fused_prompts(hidden, cls_pos, cross, inner):
            # Paper mode prompts every patch token from itself: the prompters' products run on
            # the whole sequence at once (contiguous rows, no split at the class token and no
            # join after it), and the SiLUs, scales and adds are one fused pass each way that
            # leaves the class token's row alone (its prompt gradient is zero). Same floats as
            # the path below up to rounding (tests/test_prompt_cpu.py).
            # Under CPU autocast (train.amp) the products run in bfloat16 and the fused step
            # reads their outputs as they are (and writes their gradients in bfloat16), two
            # passes over the stream less each way than casting them to float32 first.
            amp = cpu_autocast()
            lin, down, up = _linears(cross, inner)
            if _plain_linears(hidden.device, lin, down, up) and (not amp or cpu_autocast_dtype() == torch.bfloat16):
                # the prompters' products inside the fused node too (in bfloat16 under
                # autocast), which takes the biases into the kernel and forms the stream's
                # gradient once (SVPPromptsCPU)
                # (svp_prompts_cpu's step without its checks: the ones above cover them)
                dtype = torch.bfloat16 if amp else torch.float32
                return cpu_kernels.prompt_cpu.svp_prompts(hidden, int(cls_pos), dtype,
                                                          *_node_args(cross, inner, lin, down, up))
            from ..ops.prompt_cpu import add_silu_prompts_cpu
            a1 = s1 = a2 = s2 = None
            if cross is not None:
                a1, s1 = lin(hidden), cross[1]
            if inner is not None:
                a2, s2 = up(down(hidden)), inner[1]
            if not all(a is None or a.dtype == torch.bfloat16 for a in (a1, a2)):
                a1, a2 = (None if a is None else a.float() for a in (a1, a2))
            return add_silu_prompts_cpu(hidden, a1, s1, a2, s2, skip=cls_pos)
        if not self.official and _triton_prompts(hidden, cls_pos, cross, inner):
            # the same on a GPU (the 'triton' backend): the prompters' products on the whole
            # sequence by torch (under autocast in its dtype), the SiLUs, scales and adds as one
            # Triton kernel each way (svp.ops.prompt_triton); with plain Linear layers the
            # products inside the node, which adds the biases in the kernel, casts the stream
            # once and forms its gradient in one buffer (SVPPromptsTriton; models/vim.py's
            # GPU_JOINT_NODES off: the modules' products and autograd's sums)
            lin, down, up = _linears(cross, inner)
            dtype = _gpu_products_dtype(hidden, lin, down, up)
            if dtype is not None:
                return triton_kernels.prompt_triton.svp_prompts(hidden, int(cls_pos), dtype,
                                                                *_node_args(cross, inner, lin, down, up))
            a1 = s1 = a2 = s2 = None
            if cross is not None:
                a1, s1 = lin(hidden), cross[1]
            if inner is not None:
                a2, s2 = up(down(hidden)), inner[1]
            return triton_kernels.prompt_triton.add_silu_prompts_triton(hidden, a1, s1, a2, s2, skip=cls_pos)
        first, cls, second = hidden[:, :cls_pos], hidden[:, cls_pos:cls_pos + 1], hidden[:, cls_pos + 1:]
        first_p = first + self._prompt(first, first, cross, inner)
        if self.official:
            if second.shape[1] != first.shape[1]:
                raise ValueError(
                    f"svp compat='official' pairs token cls_pos+1+k with token k, which needs as many tokens "
                    f"after the class token as before it; got {first.shape[1]} before and {second.shape[1]} "
                    f"after (an odd number of patches). Use compat='paper' for this input size.")
            second_p = second + self._prompt(first_p, second, cross, inner)
        else:
            second_p = second + self._prompt(second, second, cross, inner)
        return torch.cat([first_p, cls, second_p], dim=1)

    def hook(self, layer_idx, hidden, residual, cls_pos):
        return self.prompt_tokens(layer_idx, hidden, cls_pos), residual, cls_pos

    # -- conversion to / from the official tensor names -----------------------------
    def to_official(self) -> dict:
        """This SVP's tensors under the official names (``prompt_scale`` padded to 24 rows as
        the official code allocates it when depth < 24; docs/methods.md, note D5)."""
        if not (self.config.use_cross and self.config.use_inner):
            raise ValueError("only SVP with both Cross and Inner prompters has an official layout")
        out = {}
        beta = self.beta.detach()
        if self.depth < 24:
            beta = torch.cat([beta, beta.new_zeros(24 - self.depth, self.dim)])
        out["prompt_scale"] = beta.clone()
        out["prompt_shared_scale"] = self.alpha.detach().clone()
        out.update({k: v.clone() for k, v in self._official_prompters().items()})
        return out

    def _official_prompters(self) -> dict:
        """The Cross and Inner prompter tensors (live, not copies) under the official names."""
        out = {}
        for j, m in enumerate(self.cross):
            for k, v in m.state_dict().items():
                out[f"prompt_generator_shared.{j}.{k}"] = v
        for i, m in enumerate(self.inner):
            for k, v in m.state_dict().items():
                out[f"prompt_generator.{i}.{k}"] = v
        return out

    def load_official(self, tensors: dict, source: str = "<official checkpoint>"):
        """Load official ``prompt_*`` tensors (the name mapping: docs/methods.md, "Importing official
        SVP checkpoints")."""
        if not (self.config.use_cross and self.config.use_inner):
            raise ValueError("official SVP checkpoints hold both Cross and Inner prompters")
        own = self._official_prompters()
        expected = dict({k: v.shape for k, v in own.items()}, prompt_scale=None,
                        prompt_shared_scale=(self.groups, self.dim))  # prompt_scale: checked below
        lines = mismatch_lines(expected, {k: v for k, v in tensors.items() if k.startswith("prompt_")})
        if lines:
            raise ValueError("\n".join([f"{source}: SVP tensors do not match depth {self.depth}, shared_layers "
                                        f"{self.S}, hidden {self.config.hidden} (check --prompt-hidden / "
                                        f"--shared-layers / --model):"] + lines))
        scale, shared = tensors["prompt_scale"], tensors["prompt_shared_scale"]
        if scale.dim() != 2 or scale.shape[1] != self.dim or scale.shape[0] < self.depth:
            raise ValueError(f"{source}: prompt_scale has shape {tuple(scale.shape)}, expected "
                             f"({max(24, self.depth)}, {self.dim}) (the official code always allocates 24 rows; "
                             f"docs/methods.md, note D5)")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(tensors[k])
            self.beta.copy_(scale[:self.depth])
            self.alpha.copy_(shared)
        return self


def _fused_prompts(hidden, cls_pos, cross, inner) -> bool:
    """Whether the fused CPU prompt step computes what the modules would: float32 CPU tensors,
    the fused numba CPU backend in use (forcing another scan backend, e.g. 'reference', runs
    everything in plain PyTorch), and prompters whose forward is the one defined here, without
    hooks on them (hooks on their Linear layers still run). Under CPU autocast the products
    still run in bfloat16; the SiLUs, scales and adds then run in float32, not bfloat16."""
    if hidden.dim() != 3 or not hidden.is_cpu or hidden.dtype != torch.float32:
        return False
    if not 0 <= cls_pos < hidden.shape[1]:
        return False
    for part, cls in ((cross, CrossPrompter), (inner, InnerPrompter)):
        if part is None:
            continue
        m, s = part
        if (type(m).forward is not cls.forward or m._forward_hooks or m._forward_pre_hooks
                or s.dtype != torch.float32 or not s.is_cpu):
            return False
    return get_backend() == "cpu"   # (CPU tensors: the default device's backend)


def _triton_prompts(hidden, cls_pos, cross, inner) -> bool:
    """Whether svp.ops.prompt_triton's kernels take the paper-mode prompt step: where the scan
    runs on the 'triton' backend (a GPU by default), its ENABLED flag on, the prompters' forwards
    the ones defined here without hooks (hooks on their Linear layers still run), float32
    scales, and a float32, bfloat16 or float16 stream."""
    if hidden.dim() != 3 or not 0 <= cls_pos < hidden.shape[1]:
        return False
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    for part, cls in ((cross, CrossPrompter), (inner, InnerPrompter)):
        if part is None:
            continue
        m, s = part
        if type(m).forward is not cls.forward or m._forward_hooks or m._forward_pre_hooks or s.dtype != torch.float32:
            return False
    return (cross is not None or inner is not None) and get_backend(hidden.device) == "triton" and (
        triton_kernels.prompt_triton.ENABLED)


def _gpu_products_dtype(hidden, *lins):
    """The dtype SVPPromptsTriton runs the prompters' products in, or None where the modules run
    them: the joint nodes on (models/vim.py's GPU_JOINT_NODES), the given Linear layers
    (None: absent) plain ``nn.Linear`` forwards without hooks, with float32 parameters on the
    stream's device, and the products' dtype the one the modules would take: autocast's on the
    stream's device, else a float32 stream's."""
    from ..models import vim
    if not vim.GPU_JOINT_NODES or not _plain_linears(hidden.device, *lins):
        return None
    dtype = autocast_dtype(hidden.device.type)
    if dtype is not None:
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    return torch.float32 if hidden.dtype == torch.float32 else None


def _linears(cross, inner):
    """The prompters' Linear layers: (Cross's, Inner's down, Inner's up), None where absent."""
    lin = None if cross is None else cross[0]._modules["0"]
    down, up = (None, None) if inner is None else (inner[0]._modules["0"], inner[0]._modules["1"])
    return lin, down, up


def _node_args(cross, inner, lin, down, up):
    """The prompt nodes' tensor arguments (SVPPromptsCPU, SVPPromptsTriton): (W, b, alpha) of the
    Cross prompter, then (W0, b0, W1, b1, beta) of the Inner one, each group all None when absent."""
    wc, bc, alpha = (None,) * 3 if cross is None else (lin.weight, lin.bias, cross[1])
    w0, b0, w1, b1, beta = (None,) * 5 if inner is None else (down.weight, down.bias, up.weight, up.bias, inner[1])
    return wc, bc, alpha, w0, b0, w1, b1, beta


def _plain_linears(device, *lins) -> bool:
    """Whether the given Linear layers (None: absent) are plain ``nn.Linear`` forwards without
    hooks, float32 on ``device``, so that SVPPromptsCPU (or SVPPromptsTriton) may run their
    products itself (a weight parametrization, e.g. LoRA, still applies: the weight is read
    through it)."""
    for lin in lins:
        if lin is None:
            continue
        if (type(lin).forward is not nn.Linear.forward or lin._forward_hooks or lin._forward_pre_hooks
                or lin.weight.dtype != torch.float32 or lin.weight.device != device
                or (lin.bias is not None and lin.bias.dtype != torch.float32)):
            return False
    return True


register_method("svp", SVPConfig, SVP)
