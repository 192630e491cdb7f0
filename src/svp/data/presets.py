"""Per-dataset training presets, shipped as YAML in ``svp/configs/datasets/``.

``load_preset(name)`` accepts any registry name or alias: ``cub200``, ``hta/cub200``,
``CUB200``, ``vtab/dtd``, ``digits`` ... VTAB tasks share ``vtab.yaml`` (the
dataset name and class count are filled in). Every preset has the keys listed in
``PRESET_KEYS``; see docs/datasets.md for their meaning and provenance.
"""
from __future__ import annotations

import copy
import functools
import os
from typing import Any, Dict

import yaml

from .registry import dataset_info

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "datasets")

PRESET_KEYS = (
    "dataset", "num_classes", "source", "recipe", "img_size", "train_split", "val_split",
    "test_split", "val_from_train", "batch_size", "eval_batch_size", "epochs", "warmup_epochs",
    "warmup_lr", "min_lr", "lr", "lr_base_batch", "weight_decay", "optimizer", "sched",
    "shared_layers", "hidden_dim", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
    "mixup_mode", "smoothing", "drop_path", "seed", "simam", "head",
)


def preset_file(name: str) -> str:
    info = dataset_info(name)
    stem = "vtab" if info.name.startswith("vtab/") else info.name.split("/")[-1]
    return os.path.join(PRESET_DIR, f"{stem}.yaml")


@functools.lru_cache(maxsize=None)
def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no preset file {path}")
    with open(path, "r", encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset must be a mapping")
    return data


def load_preset(name: str) -> Dict[str, Any]:
    """The preset of dataset ``name`` as a fresh dict (safe to modify). A registered dataset
    without a preset file gets its registry entry's image recipe and size (a dataset added
    without one trained at 224 px on the ``svp`` recipe, whatever its entry said)."""
    info = dataset_info(name)
    path = preset_file(name)
    if os.path.isfile(path):
        data = copy.deepcopy(_read(path))
    else:
        data = {"source": "registry", "recipe": info.recipe, "img_size": info.img_size}
    data["dataset"] = info.name
    if info.num_classes:
        data["num_classes"] = info.num_classes
    return data


def lr_used(preset: Dict[str, Any], batch_size: int = None, world_size: int = 1) -> float:
    """The learning rate the optimizer gets: ``lr * batch * world / lr_base_batch``
    when ``lr_base_batch`` is set (the official SVP scaling), else ``lr``."""
    bs = preset["batch_size"] if batch_size is None else batch_size
    return linear_scaled_lr(preset["lr"], bs, world_size, preset.get("lr_base_batch"))


def linear_scaled_lr(lr: float, batch_size: int, world_size: int, base_batch=None) -> float:
    """The official (DeiT-style) linear scaling rule, the one place it is written:
    ``lr x batch x world / base_batch``, or ``lr`` when ``base_batch`` is unset."""
    if not base_batch:
        return float(lr)
    return float(lr) * int(batch_size) * int(world_size) / float(base_batch)
