"""Visual Prompt Tuning (VPT, Jia et al. 2022) adapted to Vision Mamba: learned prompt
tokens inserted into the token sequence.

placement (the paper's prompt-position ablation):
  'prefix': before every token (indices 0..n-1), class token moves to cls_pos + n;
  'middle': immediately before the class token (indices cls_pos..cls_pos+n-1), class
            token moves to cls_pos + n;
  'suffix': after every token (the last n indices), class token index unchanged.
The hook returns the new class-token index, so the head reads the class token.

vpt_shallow: the prompts are inserted once, into the embedded sequence before layer 0.
vpt_deep: layer 0 as shallow; before every later layer l the n prompt rows are replaced
by that layer's own prompts P_l. The replacement sets the prompt rows of the *residual*
stream to P_l and those of the ``hidden`` stream (the previous mixer output) to zero,
so the token state entering block l (residual + hidden) is exactly P_l, as in VPT-deep
for ViTs, whatever DropPath does to ``hidden``.

Init: uniform(-v, v) with v = sqrt(6 / (3 * patch_h * patch_w + D)), VPT's choice.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from .base import PeftConfig, PeftMethod
from .registry import register_method

PLACEMENTS = ("prefix", "middle", "suffix")


@dataclasses.dataclass
class VPTConfig(PeftConfig):
    """num_tokens: prompt tokens per layer; placement: 'prefix' / 'middle' / 'suffix'."""
    num_tokens: int = 10
    placement: str = "prefix"

    method = "vpt_shallow"
    deep = False

    def __post_init__(self):
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise ValueError(f"{self.method}: placement={self.placement!r}; expected one of {PLACEMENTS}")
        if int(self.num_tokens) <= 0:
            raise ValueError(f"{self.method}: num_tokens must be positive, got {self.num_tokens}")


@dataclasses.dataclass
class VPTShallowConfig(VPTConfig):
    method = "vpt_shallow"
    deep = False


@dataclasses.dataclass
class VPTDeepConfig(VPTConfig):
    method = "vpt_deep"
    deep = True


class VPT(PeftMethod):
    uses_hook = True

    def __init__(self, config: VPTConfig, model: nn.Module):
        super().__init__(config, model)
        n, dim = int(config.num_tokens), model.embed_dim
        layers = len(model.layers) if config.deep else 1
        ph, pw = model.patch_embed.patch_size
        v = math.sqrt(6.0 / float(3 * ph * pw + dim))
        self.prompts = nn.Parameter(torch.empty(layers, n, dim).uniform_(-v, v))
        self.n = n
        self.placement = config.placement

    def _start(self, seq_len, cls_pos):
        """Index of the first prompt row in a sequence that already holds the prompts."""
        if self.placement == "prefix":
            return 0
        if self.placement == "middle":
            return cls_pos - self.n
        return seq_len - self.n

    def hook(self, layer_idx, hidden, residual, cls_pos):
        b, n = hidden.shape[0], self.n
        if layer_idx == 0:
            p = self.prompts[0].to(hidden.dtype).unsqueeze(0).expand(b, -1, -1)
            if self.placement == "prefix":
                return torch.cat([p, hidden], 1), residual, cls_pos + n
            if self.placement == "middle":
                return torch.cat([hidden[:, :cls_pos], p, hidden[:, cls_pos:]], 1), residual, cls_pos + n
            return torch.cat([hidden, p], 1), residual, cls_pos
        if not self.config.deep:
            return hidden, residual, cls_pos
        s = self._start(hidden.shape[1], cls_pos)
        p = self.prompts[layer_idx].to(residual.dtype).unsqueeze(0).expand(b, -1, -1)
        # slice_scatter, not a concatenation of slices: one copy each way, where the slices' backward
        # zero-filled a full-size gradient per slice and autograd then added them (~2% of a step's CPU time)
        residual = residual.slice_scatter(p, 1, s, s + n)
        hidden = hidden.slice_scatter(hidden.new_zeros(b, n, hidden.shape[2]), 1, s, s + n)
        return hidden, residual, cls_pos


register_method("vpt_shallow", VPTShallowConfig, VPT)
register_method("vpt_deep", VPTDeepConfig, VPT)
