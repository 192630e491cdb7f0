"""Optimizer: AdamW (or any timm optimizer) with timm's weight-decay grouping.

timm's rule (as in the official code): when weight decay is on, parameters with a
1-D shape or a name ending in ``.bias`` (and names the model lists in
``no_weight_decay()``) get no decay; everything else (2-D weights, SVP's alpha/beta
matrices) gets ``weight_decay``. Only parameters with ``requires_grad`` are given to
the optimizer.
"""
from __future__ import annotations

from typing import Dict

import torch
from timm.optim import create_optimizer_v2

from ..data.presets import linear_scaled_lr


def scaled_lr(cfg: dict, world_size: int) -> float:
    """The learning rate actually used: ``lr x batch x world / base`` when ``train.lr_scale``
    (the official recipe: DeiT-style linear scaling), else ``lr``."""
    t = cfg["train"]
    base = t["lr_scale_base"] if t["lr_scale"] else None
    return linear_scaled_lr(t["lr"], t["batch_size"], world_size, base)


def build_optimizer(model: torch.nn.Module, cfg: dict, lr: float) -> torch.optim.Optimizer:
    t = cfg["train"]
    kwargs: Dict = {"eps": float(t["opt_eps"])}
    if str(t["opt"]).lower().endswith("adamw") or str(t["opt"]).lower() == "adam":
        kwargs["betas"] = tuple(float(b) for b in t["opt_betas"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (check method.name / method.settings)")
    # a wrapper that exposes only trainable parameters, so the grouping (which also
    # reads the model's no_weight_decay()) never hands frozen tensors to the optimizer
    return create_optimizer_v2(_Trainable(model), opt=str(t["opt"]), lr=lr,
                               weight_decay=float(t["weight_decay"]), foreach=False, **kwargs)


class _Trainable(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "_m", model)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for n, p in self._m.named_parameters(prefix=prefix, recurse=recurse):
            if p.requires_grad:
                yield n, p

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def no_weight_decay(self):
        out = set()
        for name, mod in self._m.named_modules():
            fn = getattr(mod, "no_weight_decay", None)
            if callable(fn) and mod is not self:
                out |= {f"{name}.{k}" if name else k for k in fn()}
        return out
