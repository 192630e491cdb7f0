"""Optimizer: AdamW (or any timm optimizer) with timm's weight-decay grouping.

timm's rule (as in the official code): when weight decay is on, parameters with a
1-D shape or a name ending in ``.bias`` (and names the model lists in
``no_weight_decay()``) get no decay; every other tensor (2 or more dimensions: weights,
SVP's alpha/beta, VPT's prompt tokens, visual_prompt's frame, LoRA's factors) gets
``weight_decay``; BitFit, biases only, gets none. Only parameters with ``requires_grad`` are given to
the optimizer.

``train.opt_fused`` (adam and adamw): torch's fused kernel updates every tensor in one pass
instead of ~10 elementwise ops per tensor. On the CPU (torch >= 2.4) an AdamW step of Vim-Tiny
full fine-tuning took 6.8 ms instead of 45, of an SVP model's trainable tensors 1.0 instead of
7.2 (docs/benchmarks.md, fifteenth round). It rounds differently from the per-tensor loop (the
same update to within float32 rounding), so ``false`` keeps the old numbers bit for bit, and a
run resumed from before the key existed keeps the loop (engine/rundir.py).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Dict

import torch
from timm.optim import create_optimizer_v2, list_optimizers

from ..data.presets import linear_scaled_lr
from ..errors import ConfigError

_log = logging.getLogger("svp.engine")


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
    name = str(t["opt"]).lower()
    base = check_opt_name(t["opt"])
    if _use_fused(t["opt_fused"], name, base, trainable[0].device):
        kwargs["fused"] = True
    decay = t.get("layer_decay")
    if decay is not None:
        if not callable(getattr(model, "group_matcher", None)):
            raise ConfigError(f"train.layer_decay={decay}: {type(model).__name__} has no group_matcher() to say "
                              f"which block each tensor is in")
        kwargs["layer_decay"] = float(decay)
    try:
        # (timm warns that the decay has no effect where every trainable tensor is outside the blocks:
        # said below in the run's own terms)
        with _quiet(logging.getLogger("timm.optim._param_groups")):
            opt = create_optimizer_v2(_Trainable(model), opt=str(t["opt"]), lr=lr,
                                      weight_decay=float(t["weight_decay"]), foreach=False, **kwargs)
    except (ValueError, TypeError, ImportError) as e:  # e.g. an optimizer whose package is missing
        raise ConfigError(f"train.opt={t['opt']!r}: {e}") from None
    if decay is not None:
        scales = sorted({round(float(g.get("lr_scale", 1.0)), 12) for g in opt.param_groups})
        if scales == [1.0] and float(decay) != 1.0:
            _log.warning("train.layer_decay=%s has no effect here: every trainable tensor of this %s run lies "
                         "outside the backbone's blocks (the head and the method's own), and trains at the full "
                         "rate", decay, getattr(getattr(model, "config", None), "method", "model"))
        else:
            _log.info("train.layer_decay=%s: %d rates, from %.3g x lr (the lowest layer trained) to 1 x lr (the "
                      "head)", decay, len(scales), scales[0])
    return opt


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_opt_name(opt) -> str:
    """An optimizer timm knows (its spelling: lookahead_adamw is adamw under lookahead); the base
    name."""
    base = str(opt).lower().split("_")[-1]
    if base not in list_optimizers():
        raise ConfigError(f"train.opt={opt!r}: not an optimizer timm knows; e.g. adamw, sgd, momentum, "
                          f"lamb, lion (all: timm.optim.list_optimizers())")
    return base


_FUSED = ("adam", "adamw")   # timm names whose class is torch.optim.Adam / AdamW


@functools.lru_cache(maxsize=None)
def fused_available(device_type: str) -> bool:
    """Whether this torch has a fused AdamW kernel for tensors on ``device_type``."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device_type, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, ValueError, TypeError, AssertionError):   # (a torch without CUDA asserts)
        return False


def _use_fused(setting, name: str, base: str, device: torch.device) -> bool:
    """train.opt_fused resolved for optimizer ``name`` (timm's spelling; ``base`` without its
    wrappers' prefixes) on ``device``."""
    if setting is False:
        return False
    if base not in _FUSED:
        if setting is True:
            raise ConfigError(f"train.opt_fused=true: only {' and '.join(_FUSED)} have a fused kernel, "
                              f"train.opt={name!r} has none; set train.opt_fused=auto or false")
        return False
    ok = fused_available(device.type)
    if setting is True and not ok:
        raise ConfigError(f"train.opt_fused=true: torch {torch.__version__} has no fused {base} for {device.type} "
                          f"tensors (CPU has one from torch 2.4); set train.opt_fused=auto or false")
    return ok


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    """e.g. ``AdamW (fused)`` / ``AdamW (per-tensor loop)``: results.json records which
    implementation stepped the run (train.opt_fused=auto depends on the torch and device)."""
    inner = getattr(opt, "_base_optimizer", opt)   # timm's Lookahead wraps the base optimizer
    # the groups', not the defaults': a resumed optimizer steps with the groups it loaded (a run
    # saved with the loop resumed on a device where opt_fused=auto means fused still loops)
    d = inner.param_groups[0] if inner.param_groups else inner.defaults
    impl = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "per-tensor loop"
    name = type(inner).__name__ if inner is opt else f"{type(opt).__name__} {type(inner).__name__}"
    return f"{name} ({impl})"


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

    def group_matcher(self, coarse: bool = False):
        return self._m.group_matcher(coarse)

    def no_weight_decay(self):
        out = set()
        for name, mod in self._m.named_modules():
            fn = getattr(mod, "no_weight_decay", None)
            if callable(fn) and mod is not self:
                out |= {f"{name}.{k}" if name else k for k in fn()}
        return out
