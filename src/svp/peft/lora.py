"""LoRA (Hu et al. 2021) on the Mamba mixers' projections.

Each targeted nn.Linear weight W (out x in) is re-parametrised, with
``torch.nn.utils.parametrize``, as  W + (alpha / r) * B @ A  (A: r x in, B: out x r,
A Kaiming-uniform, B zero). Because the parametrisation replaces the ``weight``
attribute itself, every read of the weight sees the adapted value: the module calls
(``in_proj(x)``, ``x_proj(x)``, ``out_proj(y)``) and the mixer's direct read
``F.linear(dt, dt_proj.weight)`` alike. The original weight stays frozen (as
``...parametrizations.weight.original``).

targets: names of mixer projections; 'x_proj' and 'dt_proj' also cover the backward
direction's twins ('x_proj_b', 'dt_proj_b'). Default: all four. On a ViT backbone
(svp.models.vit) the block's Linears: 'qkv', 'proj' (attention), 'fc1', 'fc2' (MLP); the default
there is 'qkv', recorded in the adapter's config as applied.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..ops.kept import kept
from .base import PeftConfig, PeftMethod
from .registry import register_method

TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")


@dataclasses.dataclass
class LoRAConfig(PeftConfig):
    """r: rank; alpha: scale numerator (update = alpha / r * B A); targets: see module doc."""
    r: int = 8
    alpha: float = 16.0
    targets: tuple = TARGETS

    method = "lora"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.targets, (list, tuple)):  # a string would be split into letters
            raise ValueError(f"lora: targets={self.targets!r}; expected a list of layer names from {TARGETS}")
        self.targets = tuple(self.targets)
        from ..models.vit import VIT_LORA_TARGETS
        bad = [t for t in self.targets if t not in TARGETS + VIT_LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"lora: targets {list(self.targets)} invalid; choose from {TARGETS} (a Vim's mixer) "
                             f"or {VIT_LORA_TARGETS} (a ViT's block)")
        twice = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if twice:  # a second parametrisation would be frozen (only the first is trained) and dead weight
            raise ValueError(f"lora: targets {list(self.targets)} name {', '.join(twice)} more than once; "
                             f"expected each at most once")
        if int(self.r) <= 0:
            raise ValueError(f"lora: r must be positive, got {self.r}")


def _summed(weight, a, b, scale):
    """W + s B A in the weights' own dtype, outside any autocast: a sum kept from a bfloat16-autocast
    forward (its B A rounded to bfloat16) was reused by float32 forwards after it (retest 92)."""
    device = weight.device.type
    if device not in ("cpu", "cuda"):
        return weight + scale * (b @ a)
    with torch.autocast(device, enabled=False):
        return weight + scale * (b @ a)


class LoRAParametrization(nn.Module):
    def __init__(self, out_features, in_features, r, scale, device=None, dtype=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = scale

    def forward(self, weight):
        a, b = self.lora_A, self.lora_B
        if weight.requires_grad or b.requires_grad or b.is_inference():
            return weight + self.scale * (b @ a)
        # a frozen adapter (svp eval / predict / serve load it so): the sum kept while W, A, B and
        # the scale stay the same, not formed afresh by every projection of every forward (a
        # Vim-Small batch-1 prediction took 1.7-1.8x linear probing's time; benchmarks/method_costs.py),
        # and, one tensor from call to call, what the kernels keep of it is kept too. Kept on A, so
        # that an optimizer step over the adapter drops it (svp.ops.kept: a fused step does not bump
        # the version counters the key reads)
        return kept(a, "lora W + s B A", lambda: _summed(weight, a, b, self.scale),
                    extra=(weight._version, weight.data_ptr(), b._version, b.data_ptr(), float(self.scale)))

    def factors(self):
        """(A, B, scale): the update is scale * B @ A. Training products that keep it factored
        (svp.ops.low_rank, through svp.models.vim) read these instead of ``forward``'s sum."""
        return self.lora_A, self.lora_B, self.scale

    def delta(self, x):
        """The low-rank part of ``F.linear(x, forward(W))`` for inputs ``x`` (..., in), computed
        without forming the update: ``scale * x A^T B^T``. svp.serve adds it to the frozen
        projection's output for the rows of one adapter (multi-LoRA batches, never merged)."""
        return self.scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


class LoRA(PeftMethod):
    def __init__(self, config: LoRAConfig, model: nn.Module):
        super().__init__(config, model)
        names = []
        for t in config.targets:
            names.append(t)
            if t in ("x_proj", "dt_proj"):
                names.append(t + "_b")
        self._targets = []  # (module path, Linear) -- kept off the module tree on purpose
        scale = float(config.alpha) / int(config.r)
        # every target is checked before any is parametrised: a refusal part-way (a wrapped
        # out_proj in layer 3) left LoRA on layers 0-3, the backbone's names and hash changed
        # (review); an interruption while registering takes off what was registered
        targets = []
        if getattr(model, "family", "vim") == "vit":
            from ..models.vit import VIT_LORA_DEFAULT, VIT_LORA_TARGETS
            # the default (the very tuple the field defaults to: a list given, the Vim's four too, is
            # another object, and refused below) is a ViT's own, recorded as applied (retest 95)
            if config.targets is TARGETS:
                config.targets = VIT_LORA_DEFAULT
            vim_names = [t for t in config.targets if t in TARGETS]
            if vim_names:
                raise ValueError(f"lora: targets {vim_names} name a Vim mixer's projections; a ViT block's are "
                                 f"{VIT_LORA_TARGETS}")
            targets = model.lora_sites(config.targets)
        else:
            foreign = [t for t in config.targets if t not in TARGETS]
            if foreign:
                raise ValueError(f"lora: targets {foreign} name a ViT block's layers; a Vim's are {TARGETS}")
            for i, layer in enumerate(model.layers):
                for name in names:
                    lin = getattr(layer.mixer, name)
                    if not isinstance(lin, nn.Linear):
                        raise TypeError(f"lora: layers.{i}.mixer.{name} is {type(lin).__name__}, expected nn.Linear")
                    targets.append((f"layers.{i}.mixer.{name}", lin))
        for path, lin in targets:
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"lora: {path} is {type(lin).__name__}, expected nn.Linear")
        try:
            for path, lin in targets:
                w = lin.weight
                param = LoRAParametrization(w.shape[0], w.shape[1], int(config.r), scale, w.device, w.dtype)
                parametrize.register_parametrization(lin, "weight", param)
                self._targets.append((path, lin))
        except BaseException:
            self.detach(model)
            raise

    def trainable_base_names(self, model):
        out = []
        for path, _ in self._targets:
            out += [f"{path}.parametrizations.weight.0.lora_A", f"{path}.parametrizations.weight.0.lora_B"]
        return out

    mergeable = True

    def detach(self, model):
        """Remove the parametrisations, keeping the original (un-merged) weights."""
        self._remove(merge=False)

    def merge(self, model):
        """Remove the parametrisations, each weight becoming W + scale * B @ A (formed in float32,
        then stored in the weight's dtype: a bfloat16 W rounds once, not at each product)."""
        self._remove(merge=True)

    def _remove(self, merge: bool):
        for _, lin in self._targets:
            if parametrize.is_parametrized(lin, "weight"):
                param = lin.parametrizations.weight
                if merge:
                    with torch.no_grad():
                        a, b, scale = param[0].factors()
                        w = param.original
                        merged = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
                # a deepcopy (an EMA copy) shares the class torch made for the parametrised module;
                # removing the parametrisation deletes its `weight` property from that class, which
                # would break the other copy: this module gets a class of its own first
                cls = type(lin)
                lin.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
                if merge:
                    with torch.no_grad():   # (in place: a bumped version, so nothing kept from W is reused)
                        lin.weight.copy_(merged)
        self._targets = []


register_method("lora", LoRAConfig, LoRA)
