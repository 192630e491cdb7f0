"""Image recipes.

- ``svp``: the official SVP pipeline. Training = timm ``create_transform(is_training=True)``
  with the arguments of the official script: RandomResizedCrop(size, scale 0.08-1,
  ratio 3/4-4/3, bicubic), horizontal flip 0.5, RandAugment ``rand-m9-mstd0.5-inc1``,
  ToTensor, ImageNet normalisation, RandomErasing(p 0.25, mode 'pixel', count 1);
  colour jitter 0.3 is passed but ignored by timm because auto-augment is set.
  Evaluation = Resize(int(size / 0.875), bicubic) + CenterCrop(size) + ToTensor +
  ImageNet normalisation (size 224 -> Resize 256).
- ``vtab``: the common VTAB-1k practice (VPT/NOAH): Resize((size, size), bicubic),
  ToTensor, ImageNet normalisation; same for training and evaluation.
- ``plain``: for the tiny embedded images: Resize((size, size), bilinear), ToTensor,
  normalisation with the **ImageNet** mean/std by default (so pre-trained backbones
  see inputs on their usual scale); pass ``mean=``/``std=`` to use other statistics
  (e.g. ``(0.5, 0.5, 0.5)``). No augmentation, same for training and evaluation,
  unless ``hflip=<p>`` is given for training.

Any image size works (``img_size``); all recipes take ``mean``/``std`` overrides.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..errors import AdapterError, ConfigError

RECIPES = ("svp", "vtab", "plain")
# data.normalize: ImageNet's statistics for every backbone (VPT's protocol, which the paper's ViT
# baselines follow), or those timm's pretrained_cfg gives the model name (0.5/0.5 for timm's
# augreg and original-Google ViTs, which were pre-trained on [-1, 1] inputs)
NORMALIZATIONS = ("imagenet", "backbone")


def adapter_recipe(extra: dict, adapter_dir: str) -> str:
    """The recipe an adapter was trained with (its ``backbone.json``'s ``recipe``; ``svp``
    without one), refused by name when it is none of :data:`RECIPES`."""
    recipe = extra.get("recipe", "svp")
    if recipe not in RECIPES:
        raise AdapterError(f"{os.path.join(adapter_dir, 'backbone.json')}: image recipe {recipe!r} is not one "
                           f"of {', '.join(RECIPES)}")
    return recipe


def normalization(how: str, model_name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) ``data.normalize=how`` gives a run of backbone ``model_name``."""
    if how == "imagenet":
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    if how != "backbone":
        raise ConfigError(f"data.normalize={how!r}; expected one of {', '.join(NORMALIZATIONS)}")
    from timm.models import get_pretrained_cfg, is_model
    try:
        cfg = get_pretrained_cfg(str(model_name))
    except RuntimeError as e:   # (timm: "Invalid pretrained tag (...)")
        raise ConfigError(f"model.name={model_name!r}: {e}") from None
    if cfg is None and not is_model(str(model_name)):   # (the name is the trouble, not the setting)
        raise ConfigError(f"model.name={model_name!r}: not a model timm knows (data.normalize=backbone reads its "
                          f"pretrained configuration); `timm.list_models()` lists them, `svp` registers vim_*")
    if cfg is None or cfg.mean is None or cfg.std is None:
        raise ConfigError(f"data.normalize=backbone: timm has no pretrained configuration with a mean and std for "
                          f"model {model_name!r}; use data.normalize=imagenet")
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def _statistic(value, name: str, where: str) -> Tuple[float, ...]:
    ok = (isinstance(value, (list, tuple)) and len(value) in (1, 3)
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and (name == "mean" or all(v > 0 for v in value)))
    if value is None:   # (one of the two: "std None is not ..." said it less plainly: retest 98)
        raise AdapterError(f"{where}: holds a mean or std but not both ({name} missing); the file is damaged, save "
                           f"or copy it again")
    if not ok:
        raise AdapterError(f"{where}: {name} {value!r} is not 1 or 3 finite numbers"
                           f"{' above 0' if name == 'std' else ''}; the file is damaged, save or copy it again")
    return tuple(float(v) for v in value)


def adapter_normalization(extra: dict, adapter_dir: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The (mean, std) an adapter's images were normalised with (its ``backbone.json``'s; ImageNet's
    for a folder without them: every run before ``data.normalize`` existed used those)."""
    if "mean" not in extra and "std" not in extra:
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    where = os.path.join(adapter_dir, "backbone.json")
    return _statistic(extra.get("mean"), "mean", where), _statistic(extra.get("std"), "std", where)


def same_statistics(a: tuple, b: tuple) -> bool:
    """Whether two (mean, std) normalise alike: per channel, a 1-number statistic being each
    channel's (as torchvision's Normalize broadcasts it), to within 1e-7."""
    def per_channel(v):
        v = [float(x) for x in v]
        return v * 3 if len(v) == 1 else v
    return all(len(per_channel(x)) == len(per_channel(y)) and
               all(abs(p - q) <= 1e-7 for p, q in zip(per_channel(x), per_channel(y))) for x, y in zip(a, b))


# arguments of timm create_transform used by the official SVP training script
SVP_TRAIN_ARGS = dict(
    color_jitter=0.3,
    auto_augment="rand-m9-mstd0.5-inc1",
    interpolation="bicubic",
    re_prob=0.25,
    re_mode="pixel",
    re_count=1,
)
SVP_EVAL_CROP_RATIO = 0.875


def _posterize(img, bits_to_keep, **_):
    """timm's posterize, with 0 bits as Pillow < 13 did it: every channel 0. RandAugment's
    magnitude is drawn around 9 and clipped at 10, where "PosterizeIncreasing" keeps 0 bits;
    Pillow 13 refuses that (ValueError in about one image in 2,000), which stopped training
    at the same step on every resume."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    from PIL import ImageOps
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_any_bits(transform):
    """The RandAugment inside timm's training transform, its posterize ops on :func:`_posterize`."""
    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def _size(img_size) -> int:
    if isinstance(img_size, (tuple, list)):
        img_size = img_size[-1]
    return int(img_size)


def build_transform(recipe: str, is_training: bool, img_size: int = 224,
                    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    eval_crop_ratio: float = SVP_EVAL_CROP_RATIO, hflip: float = 0.0, **kw):
    """Return a callable PIL image -> normalised float tensor (3, size, size).

    Extra ``kw`` go to timm ``create_transform`` for the ``svp`` training recipe
    (e.g. ``auto_augment=None``, ``re_prob=0``) and override the official values.
    """
    size = _size(img_size)
    mean = tuple(mean) if mean is not None else IMAGENET_MEAN
    std = tuple(std) if std is not None else IMAGENET_STD
    if recipe == "svp":
        if is_training:
            from timm.data import create_transform
            args = dict(SVP_TRAIN_ARGS)
            args.update(kw)
            return _posterize_any_bits(create_transform(input_size=size, is_training=True, mean=mean, std=std,
                                                        **args))
        if kw:
            raise TypeError(f"unexpected arguments for the svp eval transform: {sorted(kw)}")
        return T.Compose([
            T.Resize(int(size / eval_crop_ratio), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])
    if kw:
        raise TypeError(f"unexpected arguments for recipe {recipe!r}: {sorted(kw)}")
    if recipe == "vtab":
        return T.Compose([
            T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])
    if recipe == "plain":
        steps = [T.Resize((size, size), interpolation=InterpolationMode.BILINEAR)]
        if is_training and hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        steps += [T.ToTensor(), T.Normalize(mean, std)]
        return T.Compose(steps)
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def timm_data_config(recipe: str, img_size: int, in_chans: int = 3, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None) -> dict:
    """``recipe``'s evaluation transform as timm's data configuration (the ``pretrained_cfg`` keys
    ``timm.data.resolve_data_config`` reads): ``timm.data.create_transform(**it)`` makes the same
    tensors as :func:`build_transform` (``svp export`` writes it into the file it makes, whose
    model timm would otherwise give 224 px and a center crop: retest 89)."""
    size = int(img_size)
    interpolation, crop_pct, crop_mode = {"svp": ("bicubic", SVP_EVAL_CROP_RATIO, "center"),
                                          "vtab": ("bicubic", 1.0, "squash"),
                                          "plain": ("bilinear", 1.0, "squash")}[recipe]
    return {"input_size": (int(in_chans), size, size), "interpolation": interpolation, "crop_pct": crop_pct,
            "crop_mode": crop_mode, "mean": tuple(IMAGENET_MEAN if mean is None else mean),
            "std": tuple(IMAGENET_STD if std is None else std)}


def resized_pixels(transform, width: int, height: int) -> int:
    """The pixel count of the largest image ``transform``'s resize steps make of a ``width`` x
    ``height`` one (``width * height`` without one). A Resize to one number scales the shorter
    side to it, so an elongated image grows: the ``svp`` recipe's Resize(256) makes ~20 G pixels
    (~59 GB as RGB) of a few-hundred-byte 1 x 300000 PNG before its crop (review: svp serve's pixel limit
    counted the upload alone). Steps are read from a Compose's ``transforms`` (or ``geometric``,
    svp serve's faster equivalent). The decoded image itself is not counted where a resize
    follows: Pillow's own bound judged it when it was read (a square 9500 x 9500 image, which the
    data check and ``load_image`` accept, was refused as 90 M pixels after a run's last epoch,
    though its resize makes 256 x 256: review 67)."""
    steps = getattr(transform, "transforms", None) or getattr(transform, "geometric", None) or []
    w, h = int(width), int(height)
    most = None
    for t in steps:
        if isinstance(t, T.Resize):
            size = [t.size] if isinstance(t.size, int) else list(t.size)
            if len(size) == 1:   # the shorter side to size[0], the longer in proportion (as torchvision)
                short, long = sorted((w, h))
                s = int(size[0])
                other = int(s * long / max(short, 1))
                w, h = (s, other) if w <= h else (other, s)
            else:
                h, w = int(size[0]), int(size[1])
            most = max(most or 0, w * h)
        elif isinstance(t, T.CenterCrop):
            ch, cw = (t.size, t.size) if isinstance(t.size, int) else tuple(t.size)
            w, h = int(cw), int(ch)   # (a crop larger than the image pads it to this size)
    return int(width) * int(height) if most is None else most


def check_resized_size(transform, width: int, height: int, where: str) -> None:
    """Refuse (:class:`DatasetError`, naming ``where``) an image that ``transform``'s resize would
    make larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``): a
    955-byte 300000 x 1 PNG took svp eval to 2.9 GB at a 32 px model, ~80 GB at 224 px (review)."""
    from PIL import Image

    from .base import DatasetError
    n, limit = resized_pixels(transform, width, height), Image.MAX_IMAGE_PIXELS
    if limit and n > limit:
        raise DatasetError(f"{where}: the image is {width}x{height}: resized for the model (its shorter side to "
                           f"the model's size) it would be {n:,} pixels, over the decompression-bomb limit of "
                           f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS); crop an image this elongated first")
