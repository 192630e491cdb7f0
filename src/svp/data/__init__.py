"""Datasets, splits, image recipes and per-dataset presets.

Public interface::

    list_datasets(group=None) -> list[str]
    dataset_info(name) -> DatasetInfo
    build_dataset(name, split, root=None, transform=None, **options) -> Dataset
    build_transform(recipe, is_training, img_size=224, **kw)
    load_preset(name) -> dict
    load_image(path) -> PIL RGB image (8-bit; 16-bit/float scaled, see docs)
    check_before_training(datasets, max_images=PRECHECK_MAX_IMAGES) -> dict

See docs/datasets.md for every supported dataset, its on-disk layout and the
``svp data check`` command.
"""
from .base import DatasetError, VisionDataset, load_image
from .check import PRECHECK_MAX_IMAGES, check_before_training, find_bad_images
from .registry import DATA_ENV, DatasetInfo, build_dataset, dataset_info, list_datasets, resolve_name, \
    split_holds
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RECIPES, build_transform
from .presets import load_preset, lr_used

__all__ = [
    "DATA_ENV", "DatasetError", "DatasetInfo", "IMAGENET_MEAN", "IMAGENET_STD",
    "PRECHECK_MAX_IMAGES", "RECIPES", "VisionDataset", "build_dataset", "build_transform",
    "check_before_training", "dataset_info", "find_bad_images", "list_datasets", "load_image",
    "load_preset", "lr_used", "resolve_name", "split_holds",
]
