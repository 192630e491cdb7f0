"""Reading official Vim checkpoints safely and loading them with readable errors."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Mapping

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

# Keys of a training checkpoint that may hold the weights, in the order the official
# code reads them: 'model' (what Vim's and SVP's own loaders take), never the EMA first.
STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


from ..errors import CheckpointError  # noqa: F401 (re-exported)


def read_checkpoint(path) -> dict:
    """Load a .pth/.pt (``weights_only=True``, only ``argparse.Namespace`` allowed, for
    the pickled ``args`` of official training checkpoints) or a .safetensors file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        # torch < 2.5 cannot allow Namespace in weights_only=True: the same allow-list, our unpickler
        from ..compat import restricted_torch_load
        return restricted_torch_load(path)
    except Exception as e:  # an UnpicklingError names the forbidden global
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) (only tensors, containers and "
            f"argparse.Namespace are allowed; arbitrary pickled code is never run): {e}") from e


def extract_state_dict(ckpt, source: str = "<checkpoint>") -> dict:
    """The model weights of a checkpoint: ``model`` (as the official code loads), else
    ``state_dict``, else the EMA weights, else the dict itself if it is a bare state dict."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(ckpt).__name__}")
    for key in STATE_DICT_KEYS:
        if isinstance(ckpt.get(key), Mapping):
            if key in ("model_ema", "state_dict_ema"):
                _logger.warning("%s: no 'model' weights, loading the EMA weights under %r", source, key)
            return dict(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise CheckpointError(f"{source}: no state dict found; expected one of the keys {list(STATE_DICT_KEYS)} "
                          f"or a bare name->tensor dict, found keys {sorted(ckpt)[:10]}")


def strict_load(model: nn.Module, state_dict: dict, source: str = "<checkpoint>",
                allow_missing=()) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped tensor in one error.
    ``allow_missing`` lists prefixes that may legitimately be absent (a dropped head)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state_dict if k in own and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=False)


def load_checkpoint_into(model, checkpoint, strict: bool = True):
    """Read ``checkpoint`` (a path, a checkpoint dict or a state dict), adapt it to
    ``model`` (see ``checkpoint_filter_fn``) and load it strictly; the head may be
    absent (it was dropped because the class count differs)."""
    from .vim import checkpoint_filter_fn

    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state_dict = checkpoint_filter_fn(extract_state_dict(ckpt, source), model)
    if strict:
        strict_load(model, state_dict, source, allow_missing=("head.",))
    else:
        model.load_state_dict(state_dict, strict=False)
    _logger.info("loaded %s into %s", source, type(model).__name__)
    return model


def _patch_timm_checkpoint_path():
    """``timm.create_model(..., checkpoint_path=P)`` calls timm's ``load_checkpoint``,
    which prefers EMA weights and cannot resample the middle class token. For Vim
    models, route it through :func:`load_checkpoint_into`; other models are untouched."""
    import timm.models._factory as factory

    original = factory.load_checkpoint
    if getattr(original, "_svp_patched", False):
        return

    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        from .vim import VisionMamba
        if isinstance(model, VisionMamba):
            return load_checkpoint_into(model, checkpoint_path, strict=kwargs.get("strict", True))
        return original(model, checkpoint_path, *args, **kwargs)

    load_checkpoint._svp_patched = True
    factory.load_checkpoint = load_checkpoint
