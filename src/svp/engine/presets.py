"""The datasets' presets (``svp.data.load_preset``) as partial configurations: which preset
key sets which configuration key, and which method settings a preset gives to which methods."""
from __future__ import annotations

from typing import Any, Dict

from ..errors import DatasetError

# preset key (svp.data.load_preset) -> configuration key; None = informational only
PRESET_MAP = {
    "dataset": None, "num_classes": None, "source": None,
    "recipe": "data.recipe", "img_size": "data.img_size", "train_split": "data.train_split",
    "val_split": "data.val_split", "test_split": "data.test_split",
    "batch_size": "train.batch_size", "eval_batch_size": "train.eval_batch_size", "epochs": "train.epochs",
    "warmup_epochs": "train.warmup_epochs", "warmup_lr": "train.warmup_lr", "min_lr": "train.min_lr",
    "lr": "train.lr", "weight_decay": "train.weight_decay", "optimizer": "train.opt", "sched": "train.sched",
    "mixup": "train.mixup", "cutmix": "train.cutmix", "mixup_prob": "train.mixup_prob",
    "mixup_switch_prob": "train.mixup_switch_prob", "mixup_mode": "train.mixup_mode",
    "smoothing": "train.smoothing", "seed": "train.seed", "drop_path": "model.drop_path_rate",
}
# preset keys that are method settings: (setting name, methods it applies to; None = all)
PRESET_METHOD_KEYS = {"head": ("head", None), "simam": ("simam", None),
                      "shared_layers": ("shared_layers", ("svp",)), "hidden_dim": ("hidden", ("svp",))}


def dataset_preset(dataset: str, method: str) -> dict:
    """The data package's per-dataset settings (``svp.data.load_preset``) as a partial
    config: ``lr`` -> ``train.lr``, ``lr_base_batch`` -> ``train.lr_scale``/``lr_scale_base``,
    ``drop_path`` -> ``model.drop_path_rate``, ``val_from_train`` -> ``data.options``,
    ``head``/``simam`` -> ``method.settings`` (every method), ``shared_layers``/``hidden_dim``
    -> ``method.settings`` of svp only. Returns {} for datasets without a preset."""
    try:
        import svp.data as data
        preset = data.load_preset(dataset)
    except (KeyError, FileNotFoundError, ImportError, AttributeError, LookupError, ValueError, DatasetError):
        return {}  # unknown dataset: the dataset builder reports it later
    out: Dict[str, Dict[str, Any]] = {}
    for k, v in (preset or {}).items():
        if k in PRESET_MAP:
            if PRESET_MAP[k]:
                sec, name = PRESET_MAP[k].split(".")
                out.setdefault(sec, {})[name] = v
        elif k == "lr_base_batch":
            out.setdefault("train", {})["lr_scale"] = bool(v)
            if v:
                out["train"]["lr_scale_base"] = v
        elif k == "val_from_train":
            if v is not None:
                out.setdefault("data", {}).setdefault("options", {})["val_from_train"] = v
        elif k in PRESET_METHOD_KEYS:
            name, methods = PRESET_METHOD_KEYS[k]
            if methods is None or method in methods:
                out.setdefault("method", {}).setdefault("settings", {})[name] = v
    return out
