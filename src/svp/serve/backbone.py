"""Building the one frozen backbone a server shares.

Everything svp.serve knows about creating a model is in :func:`build_backbone`, so that it
can be swapped for a common model builder in one place.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from ..errors import CheckpointError, ConfigError

MINI = "vim_mini_patch4_32"


def build_backbone(model_name: str, checkpoint: Optional[str] = None, pretrained: Optional[bool] = None,
                   kwargs: Optional[Dict[str, Any]] = None, init_seed: int = 0) -> torch.nn.Module:
    """A timm Vim in eval mode with every parameter frozen.

    The bundled mini Vim always gets its bundled weights; ``checkpoint`` goes through svp's
    loader (``load_checkpoint_into``); ``pretrained`` asks timm (hub or cache). Without
    either, the random parts are initialised under ``init_seed`` as ``svp train`` does, so an
    adapter trained on such a backbone (tests) finds the same weight hash.
    """
    import timm

    import svp  # noqa: F401  (registers the Vim models with timm)
    from svp.models import load_checkpoint_into

    if pretrained is None:
        pretrained = model_name == MINI and not checkpoint
    kwargs = dict(kwargs or {})
    state = torch.get_rng_state()
    torch.manual_seed(int(init_seed))
    try:
        model = timm.create_model(model_name, pretrained=bool(pretrained), **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"--model {model_name!r}: {e}") from None
        raise
    finally:
        torch.set_rng_state(state)
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise CheckpointError(f"--checkpoint {checkpoint!r}: file not found")
        load_checkpoint_into(model, checkpoint)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def backbone_spec(adapters_dir: str, model_name: Optional[str] = None,
                  checkpoint: Optional[str] = None) -> Dict[str, Any]:
    """Which backbone to serve: ``--model``/``--checkpoint`` when given, else the first adapter's
    ``backbone.json`` (written by ``svp train``), else its ``base_model_name``. Returns
    {"model", "checkpoint", "pretrained", "kwargs", "init_seed", "recipe", "img_size"}."""
    import json

    from ..peft.io import read_adapter_config
    from .model import check_adapter_dir

    found: Dict[str, Any] = {}
    names = sorted(n for n in os.listdir(adapters_dir) if not n.startswith(".")) if os.path.isdir(adapters_dir) else []
    for name in names:
        try:
            real = check_adapter_dir(adapters_dir, name)
        except Exception:  # refused folders are reported when the adapters load
            continue
        path = os.path.join(real, "backbone.json")
        if os.path.isfile(path):
            with open(path) as f:
                found = json.load(f)
            break
        if not found:
            found = {"model": read_adapter_config(real).get("base_model_name")}
    model = model_name or found.get("model")
    if not model:
        raise ConfigError(f"{adapters_dir}: no adapter names its base model; pass --model (and --checkpoint)")
    same = found.get("model") == model
    kwargs = dict(found.get("kwargs") or {}) if same else {}
    if same and found.get("img_size"):
        kwargs.setdefault("img_size", found["img_size"])
    return {"model": model, "checkpoint": checkpoint or (found.get("checkpoint") if same else None),
            "pretrained": found.get("pretrained") if same and model != MINI else None,
            "kwargs": kwargs, "init_seed": int(found.get("init_seed", 0)) if same else 0,
            "recipe": found.get("recipe", "svp") if same else "svp"}
