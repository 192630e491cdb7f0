"""Parallel bottleneck adapter (AdaptFormer-style, Chen et al. 2022) beside each mixer.

In every block, the mixer output becomes
    mixer(u) + scale * Up(ReLU(Down(u))),   u = RMSNorm(residual) = the mixer's input,
with Down: D -> bottleneck, Up: bottleneck -> D (zero-initialised, so the untrained
model is the backbone). Attached with forward hooks on ``layers[i].mixer``; the
adapter parameters live in the method module."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .base import PeftConfig, PeftMethod
from .registry import register_method


@dataclasses.dataclass
class AdapterConfig(PeftConfig):
    """bottleneck: hidden width; scale: fixed output scale (AdaptFormer uses 0.1)."""
    bottleneck: int = 64
    scale: float = 0.1

    method = "adapter"

    def __post_init__(self):
        super().__post_init__()
        if int(self.bottleneck) <= 0:
            raise ValueError(f"adapter: bottleneck must be positive, got {self.bottleneck}")


class Bottleneck(nn.Module):
    def __init__(self, dim, hidden, scale):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, u):
        return self.scale * self.up(torch.relu(self.down(u)))


class _AdapterHook:
    """Forward hook adding the adapter's output to the mixer's. An object (not a closure)
    so that ``copy.deepcopy`` of the whole PeftModel (e.g. for EMA) rebinds it to the
    copied adapter."""

    def __init__(self, ad):
        self.ad = ad

    def __call__(self, module, args, output):
        return output + self.ad(args[0].to(output.dtype))


class ParallelAdapter(PeftMethod):
    def __init__(self, config: AdapterConfig, model: nn.Module):
        super().__init__(config, model)
        self.adapters = nn.ModuleList([Bottleneck(model.embed_dim, int(config.bottleneck), float(config.scale))
                                       for _ in model.layers])
        self._handles = []
        if getattr(model, "family", "vim") == "vit" and any(not isinstance(b.ls2, nn.Identity) for b in model.layers):
            # (beside the MLP, its output would pass through the block's LayerScale: scaled by ~1e-5
            # in DINOv2-style models, where AdaptFormer adds it outside: retest 95)
            raise ValueError("adapter: the ViT scales its MLP's output by LayerScale (init_values); the adapter "
                             "beside the MLP would be scaled with it. Use lora or vpt_deep on this model")
        for i, (layer, ad) in enumerate(zip(model.layers, self.adapters)):
            # (a ViT's site is its block's MLP, as AdaptFormer's: svp.models.vit.HookedViT.adapter_site)
            site = model.adapter_site(i) if hasattr(model, "adapter_site") else layer.mixer
            self._handles.append(site.register_forward_hook(_AdapterHook(ad)))

    def detach(self, model):
        for h in self._handles:
            h.remove()
        self._handles = []


register_method("adapter", AdapterConfig, ParallelAdapter)
