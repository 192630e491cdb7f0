"""Adapter directories: ``adapter.safetensors`` (only the adapter's tensors: what the method made
trainable when it was attached) and ``adapter_config.json`` (method, settings, base model name
and weight hash, classes).
Both are written atomically (temp file in the same directory, then ``os.replace``).
The file format only: applying a loaded adapter to a model is ``base.load_adapter``."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..io import atomic_save_safetensors  # noqa: F401 (re-exported)
from ..io import atomic_write_json as _atomic_write_json

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


from ..errors import AdapterError  # noqa: F401 (re-exported)


def base_weights_hash(model: nn.Module) -> str:
    """sha256 over the backbone's state dict without the head (``head.*``): for each
    tensor in sorted name order, its name, dtype, shape and raw little-endian bytes
    (contiguous, on CPU). Deterministic for equal weights; any changed value, shape,
    dtype or name changes it."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        if name.startswith("head."):
            continue
        t = sd[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return "sha256:" + h.hexdigest()


def atomic_write_json(path: str, obj):
    _atomic_write_json(path, obj, sort_keys=True)


def save_adapter(peft_model, directory, base_model_name: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, extra: Optional[dict] = None) -> str:
    """Write ``directory/adapter.safetensors`` + ``directory/adapter_config.json``."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    base = peft_model.base_model
    num_classes = int(base.num_classes)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise AdapterError(f"{len(class_names)} class names given for a {num_classes}-class head")
    if base_model_name is None:
        cfg = getattr(base, "pretrained_cfg", None) or {}
        base_model_name = cfg.get("architecture")
    tensors = peft_model.adapter_state_dict()
    extra_trained = sorted(set(peft_model.trainable_parameter_names()) - set(tensors))
    if extra_trained:   # made trainable by hand after the method was attached: not the adapter's
        warnings.warn(f"save_adapter: {len(extra_trained)} tensor(s) trainable now are not part of the "
                      f"{peft_model.config.method} adapter and are not saved (made trainable after the "
                      f"method was attached): {', '.join(extra_trained[:5])}"
                      + (", ..." if len(extra_trained) > 5 else ""), stacklevel=3)
    config = {
        "format_version": FORMAT_VERSION,
        "method": peft_model.config.method,
        "config": peft_model.config.to_dict(),
        "base_model_name": base_model_name,
        "base_model_hash": peft_model.base_hash,
        "num_classes": num_classes,
        "class_names": class_names,
        "trainable_tensors": len(tensors),
        "trainable_params": int(sum(t.numel() for t in tensors.values())),
    }
    config["config"]["num_classes"] = num_classes
    if extra:
        config["extra"] = extra
    atomic_save_safetensors(os.path.join(directory, ADAPTER_WEIGHTS), tensors,
                            metadata={"method": peft_model.config.method, "base_model_hash": peft_model.base_hash})
    atomic_write_json(os.path.join(directory, ADAPTER_CONFIG), config)
    return directory


def _brief(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_adapter_config(directory) -> dict:
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory} (not an adapter directory)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON in UTF-8: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for key in ("method", "config", "base_model_hash", "num_classes"):
        if key not in cfg:
            raise AdapterError(f"{path}: missing key {key!r}")
    inner = cfg["config"].get("method") if isinstance(cfg["config"], dict) else None
    if not isinstance(cfg["config"], dict) or inner != cfg["method"]:
        raise AdapterError(f"{path}: 'method' is {cfg['method']!r} but 'config' describes "
                           f"{inner!r}; the file was edited or damaged")
    n, n_inner = cfg["num_classes"], cfg["config"].get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise AdapterError(f"{path}: num_classes is {_brief(n)}, expected a positive integer")
    if n_inner is not None and n_inner != n:   # save_adapter writes both, equal
        raise AdapterError(f"{path}: 'num_classes' is {n!r} but 'config' has num_classes {n_inner!r}; the file "
                           f"was edited or damaged")
    names = cfg.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)
                              or len(names) != n):
        raise AdapterError(f"{path}: 'class_names' must be null or a list of {n!r} strings (one per class), "
                           f"got {_brief(names)}")
    version = cfg.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterError(f"{path}: format_version is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {cfg['format_version']} is newer than this svp "
                           f"understands ({FORMAT_VERSION})")
    return cfg
