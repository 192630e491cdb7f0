"""Datasets, splits, image recipes and per-dataset presets.

Public interface::

    list_datasets(group=None) -> list[str]
    dataset_info(name) -> DatasetInfo
    build_dataset(name, split, root=None, transform=None, **options) -> Dataset
    build_transform(recipe, is_training, img_size=224, **kw)
    load_preset(name) -> dict

See docs/datasets.md for every supported dataset, its on-disk layout and the
``svp data check`` command.
"""
from .base import DatasetError, VisionDataset
from .registry import DATA_ENV, DatasetInfo, build_dataset, dataset_info, list_datasets, resolve_name
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RECIPES, build_transform
from .presets import load_preset, lr_used

__all__ = [
    "DATA_ENV", "DatasetError", "DatasetInfo", "IMAGENET_MEAN", "IMAGENET_STD", "RECIPES",
    "VisionDataset", "build_dataset", "build_transform", "dataset_info", "list_datasets",
    "load_preset", "lr_used", "resolve_name",
]
