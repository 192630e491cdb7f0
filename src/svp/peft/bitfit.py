"""BitFit (bias-only tuning, Ben Zaken et al. 2022) for Vision Mamba.

Vim's biases: the patch-embedding conv bias, and per layer the depthwise conv biases
(``conv1d.bias``, ``conv1d_b.bias``) and the time-step biases (``dt_proj.bias``,
``dt_proj_b.bias``). in_proj / x_proj / out_proj have no bias and RMSNorm has only a
scale, so these are all the biases there are: D + depth * 4 * d_inner parameters."""
from __future__ import annotations

import dataclasses

from .base import PeftConfig, PeftMethod
from .registry import register_method


@dataclasses.dataclass
class BitFitConfig(PeftConfig):
    """patch_embed: also tune the patch-embedding bias."""
    patch_embed: bool = True

    method = "bitfit"


class BitFit(PeftMethod):
    mergeable = True   # (trained in place)

    def trainable_base_names(self, model):
        if getattr(model, "family", "vim") == "vit":   # (every bias of a ViT's blocks and final norm, as BitFit)
            names = [n for n, _ in model.named_parameters() if n.endswith(".bias")
                     and not n.startswith(("head.", "patch_embed."))]
            return names + (["patch_embed.proj.bias"] if self.config.patch_embed else [])
        names = [n for n, _ in model.named_parameters()
                 if n.startswith("layers.") and n.endswith(".bias")
                 and n.split(".")[-2] in ("conv1d", "conv1d_b", "dt_proj", "dt_proj_b")]
        if self.config.patch_embed:
            names.append("patch_embed.proj.bias")
        return names


register_method("bitfit", BitFitConfig, BitFit)
