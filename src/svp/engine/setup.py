"""Building a run: seeds, data, backbone + method, loss/mixup, mixed precision."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import types
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn

from .. import runtime
from ..build import ModelSpec, build_model, pick_device  # noqa: F401 (pick_device re-exported)
from ..compat import cpu_bf16_instructions, memory_bytes, no_bf16_warning
from ..data.transforms import normalization
from ..errors import ConfigError, DatasetError, OutOfMemoryIn, first_line, out_of_memory
from .seeds import seed_everything

log = logging.getLogger("svp.engine")


def set_deterministic(on: bool) -> None:
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


class Limited(torch.utils.data.Dataset):
    """The first ``limit`` items of a dataset (all when ``limit`` is None); with ``cache``
    (a :class:`svp.data.cache.PixelCache`, set by :func:`keep_pixels`) the items' images
    after the recipe's fixed steps, kept from their first read."""

    def __init__(self, ds, limit):
        self.ds = ds
        self.n = len(ds) if not limit else min(len(ds), int(limit))
        self.classes = list(getattr(ds, "classes", []))
        self.num_classes = int(getattr(ds, "num_classes", len(self.classes)))
        self.cache = None

    def __len__(self):
        return self.n

    @property
    def targets(self):
        return list(getattr(self.ds, "targets", []))[:self.n]

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        if self.cache is not None:
            return self.cache.item(i, self.ds.__getitem__, getattr(self.ds, "describe", None))
        return self.ds[i]


def build_datasets(cfg: dict):
    """((train dataset, transform), (val ...) or None, (test ...) or None)."""
    import svp.data as data
    from svp.data.base import SubsetDataset, few_shot_indices

    d = cfg["data"]
    img = int(d["img_size"])
    opts = dict(d["options"] or {})
    mean, std = normalization(d["normalize"], cfg["model"]["name"])

    def make(split, training):
        if split is None:
            return None
        try:
            ds = data.build_dataset(d["dataset"], split, root=d["root"], transform=None, **opts)
        except (TypeError, ValueError) as e:  # an option the dataset does not take, or a bad value of one
            if isinstance(e, ConfigError) or not opts:
                raise
            raise ConfigError(f"data.options={opts} for dataset {d['dataset']!r}: {e}") from None
        limit = d["max_train_samples"] if training else d["max_eval_samples"]
        if len(ds) == 0:  # nothing to train on, or a NaN accuracy reported as a result
            raise DatasetError(f"dataset {d['dataset']!r}: its {split!r} split has no samples")
        if training and d["shots"]:
            whole = ds
            if limit:   # the first N of the split, then the draw from them (the draw's first N, in the
                # split's order, left out whole classes of a split ordered by class: retest 91)
                ds, limit = SubsetDataset(ds, range(min(len(ds), int(limit))), split=split), None
            ds = few_shot(ds, split)
            # (the split's own classes, for check_classes_to_learn: a cut to one class was refused as
            # a one-class split, not warned of as the cut's, with shots: retest 93)
            ds.split_targets = whole.targets
        return Limited(ds, limit), data.build_transform(d["recipe"], training, img_size=img, mean=mean, std=std)

    def few_shot(ds, split):
        shots = int(d["shots"])
        seed = int(cfg["train"]["seed"] if d["shots_seed"] is None else d["shots_seed"])
        targets = np.asarray(ds.targets, dtype=np.int64)
        keep = few_shot_indices(targets, shots, seed)
        counts = np.bincount(targets, minlength=ds.num_classes)
        # (a class without images at all is check_classes_to_learn's, or the other splits': it was listed
        # here as keeping "all it has": retest 93)
        short = [ds.classes[c] for c in np.flatnonzero((counts > 0) & (counts < shots)) if c < len(ds.classes)]
        log.info("data.shots=%d: %d of the %d images of %s (%d per class), drawn with seed %d", shots, len(keep),
                 len(ds), split, shots, seed)
        if short:
            log.warning("data.shots=%d: %d class(es) of %s have fewer images and keep all they have (%s%s)", shots,
                        len(short), split, ", ".join(map(repr, short[:5])), ", ..." if len(short) > 5 else "")
        drawn = SubsetDataset(ds, keep, split=split)
        # what a resume point records of the draw: the split it was drawn from (its size and labels
        # in order) and the items kept; the kept labels alone are N per class in class order however
        # the folder changed, and a resumed run trained on other images: retest 91
        drawn.few_shot_digest = hashlib.sha256(json.dumps([len(ds), targets.tolist(), keep]).encode()).hexdigest()[:16]
        return drawn

    if opts.get("val_from_train") and not d["val_split"] and "val" not in re.split(r"[+\[\]:]", str(d["train_split"])):
        # (the HTA CIFAR presets say "val_split: null; use val_from_train": the carve left training,
        # and the run still kept its last epoch: review)
        log.warning("data.options.val_from_train=%s carves a validation split out of %s, but data.val_split is "
                    "null: nothing selects on it, and its images are left out of training; set "
                    "data.val_split=val to select on it", opts["val_from_train"], d["train_split"])
    built = make(d["train_split"], True), make(d["val_split"], False), make(d["test_split"], False)
    if d["shots"] and built[1] is not None and len(built[1][0]) > len(built[0][0]):
        log.warning("data.shots=%d trains on %d images, but data.val_split=%s selects the epoch on %d labelled "
                    "images: a strict few-shot protocol selects on no more than it trains on (data.val_split=null "
                    "keeps the last epoch)", int(d["shots"]), len(built[0][0]), d["val_split"], len(built[1][0]))
    for key, split, item in (("data.val_split", d["val_split"], built[1]),
                             ("data.test_split", d["test_split"], built[2])):
        if item is not None and item[0].classes != built[0][0].classes:
            # (custom data reads each split's class list from the folders it knows: a test split of
            # other name, lacking a class, numbered the rest otherwise, and was scored so: review)
            mine, theirs = item[0].classes, built[0][0].classes
            raise DatasetError(f"{key}={split}: its classes ({', '.join(mine[:8])}{', ...' if len(mine) > 8 else ''}) "
                               f"are not data.train_split={d['train_split']}'s ({', '.join(theirs[:8])}"
                               f"{', ...' if len(theirs) > 8 else ''}): its labels would not be the model's; give "
                               f"the class list (data.options.classes=[...], or classes.txt for csv) or splits "
                               f"of the same classes")
    warn_overlap(d["dataset"], built[0][0], d["train_split"],
                 (("data.val_split", d["val_split"], built[1]), ("data.test_split", d["test_split"], built[2])),
                 carved=bool(opts.get("val_from_train")))
    return built


def warn_overlap(dataset: str, train, train_split: str, others, carved: bool = False) -> None:
    """Warn when a split that selects or reports holds images the model trains on (VTAB-1k's
    val200 is part of train800val200, under other file names): an epoch chosen on it is chosen
    on training images."""
    from svp.data import dataset_info
    from svp.data.vtab import vtab_splits_share_images

    dataset = dataset_info(dataset).name  # 'cub200' -> 'hta/cub200'
    # (the images the run reads: data.max_train_samples / max_eval_samples' first N, retest 92)
    # (Limited's n; None, every image, for a split given without it)
    seen = {p for p, _ in list(getattr(train.ds, "samples", ()))[:getattr(train, "n", None)]}
    for key, split, item in others:
        if item is None:
            continue
        if split == train_split:   # (datasets held in memory have no paths to compare: digits said nothing)
            log.warning("%s=%s is data.train_split itself: results on it are on the training images", key, split)
            continue
        if str(dataset).startswith("vtab/") and carved and _vtab_carve_meets_native(train_split, split):
            # (val_from_train carves train800val200, which holds train800's and val200's images under
            # other names: a native one beside a carve side shares most of its images: review)
            log.warning("%s=%s and data.train_split=%s with data.options.val_from_train (VTAB-1k): the carve "
                        "is made of train800val200, which holds train800's and val200's images under other "
                        "names, so results on it are largely on training images; with val_from_train train on "
                        "'train' and select on 'val'", key, split, train_split)
            continue
        if str(dataset).startswith("vtab/") and carved and _vtab_carve_side(train_split) and _vtab_carve_side(split):
            continue   # (both sides of the carve: disjoint, whatever their names say without it: review)
        if str(dataset).startswith("vtab/") and vtab_splits_share_images(train_split, split):
            log.warning("%s=%s is part of data.train_split=%s (VTAB-1k): results on it are on training images; "
                        "select on val200 while training on train800, then refit on train800val200",
                        key, split, train_split)
            continue
        if str(dataset).startswith("hta/") and split == "val":
            continue  # the FGVC reader has said it already, with its advice (val_from_train)
        mine = [p for p, _ in list(getattr(item[0].ds, "samples", ()))[:getattr(item[0], "n", None)]]
        both = sum(p in seen for p in mine)
        if both:
            log.warning("%s=%s: %d of its %d images are also in the training split (data.train_split=%s): "
                        "results on it are on training images", key, split, both, len(mine), train_split)


def _vtab_carve_side(split: str) -> bool:
    """With val_from_train on VTAB-1k: a side of the carve of train800val200 (its remainder
    'train' / 'train800val200' / 'trainval', or the carve 'val')."""
    return split in ("train", "val", "train800val200", "trainval")


def _vtab_carve_meets_native(a: str, b: str) -> bool:
    """With val_from_train on VTAB-1k: one split a side of the carve of train800val200 (its
    remainder 'train' / 'train800val200' / 'trainval', or the carve 'val'), the other train800 or
    val200 themselves."""
    native = ("train800", "val200")
    return (_vtab_carve_side(a) and b in native) or (a in native and _vtab_carve_side(b))


def cache_limit_bytes() -> int:
    """``data.cache_images: auto``'s limit for one process: 2 GiB, or an eighth of the
    machine's memory shared among the processes torchrun started on it (each rank keeps
    the images its batches read, over the epochs all of them) where that is less."""
    ram = memory_bytes() or 16 << 30   # (not said: Windows)
    local = runtime.launch().local_world_size
    return min(2 << 30, ram // (8 * local))


def keep_pixels(cfg: dict, splits: dict) -> dict:
    """Decoded images kept in memory (``data.cache_images``; svp/data/cache.py).

    ``splits``: name -> (Limited, transform) or None, in the order to consider them. Returns
    the same mapping, where a split is kept as (its Limited with a PixelCache, the transform's
    steps from ToTensor on). auto keeps the training and validation splits, and the test split
    when it is evaluated after every epoch (``eval.test_every_epoch``; otherwise it is read
    once or twice), while their pixels together stay within :func:`cache_limit_bytes`; true
    keeps every split whose recipe allows it, however large; false none. A recipe with a
    random step before ToTensor (``svp``'s training augmentation) is never kept. Nothing is
    read here unless the fixed steps keep the aspect ratio (then one image, for the size);
    :func:`fill_kept` reads the kept splits for data-loader workers."""
    from ..data.cache import PixelCache, fixed_bytes, split_fixed

    mode = cfg["data"]["cache_images"]
    out = dict(splits)
    if mode is False:
        return out
    read_more_than_once = {"train", "val"} | ({"test"} if cfg["eval"]["test_every_epoch"] else set())
    budget = cache_limit_bytes() if mode == "auto" else None
    for name, pair in splits.items():
        if pair is None or len(pair[0]) == 0 or (mode == "auto" and name not in read_more_than_once):
            continue
        ds, tf = pair
        parts = split_fixed(tf)
        if parts is None:
            continue
        fixed, rest = parts
        one = fixed_bytes(fixed)
        if one is None:
            first = fixed(ds.ds[0][0])
            one = np.asarray(first).nbytes if hasattr(first, "mode") else 0
        size = len(ds) * one
        if budget is not None:
            if size > budget:
                log.info("data: %s split not kept in memory (~%d MB of decoded images, over the %d MB "
                         "data.cache_images=auto has left; data.cache_images=true keeps it)",
                         name, round(size / 1e6), round(budget / 1e6))
                continue
            budget -= size
        ds.cache = PixelCache(fixed, len(ds))
        out[name] = (ds, rest)
        log.info("data: %s split kept in memory after its first read (%d images, ~%d MB)",
                 name, len(ds), round(size / 1e6))   # (MB: 10**6 bytes, as the docs count them)
    return out


def fill_kept(cfg: dict, splits) -> None:
    """With data-loader workers, read the kept splits here, in the process that starts them:
    each worker inherits the pixels, where a cache filled in a worker would be lost with it
    at the epoch's end. Runs after check_data, so a bad image is reported the usual way."""
    if int(cfg["data"]["num_workers"]) == 0:
        return
    for pair in splits:
        ds = pair[0] if pair is not None else None
        if ds is not None and ds.cache is not None:
            ds.cache.fill(ds.ds.__getitem__)


def model_spec(cfg: dict, num_classes: int, class_names: List[str]) -> ModelSpec:
    """The backbone of a run (saved as ``backbone.json`` for ``svp eval``/``svp predict``)."""
    m, d = cfg["model"], cfg["data"]
    ckpt = m["checkpoint"]
    if m["random_init"] and (ckpt or m["pretrained"]):
        # (layered configurations meet so, a suite's pretrained under a file's random_init: the
        # weights win, as ModelSpec.weights says, and the log now says so: review)
        log.warning("model.random_init=true is not used: %s gives the backbone its weights",
                    "model.checkpoint" if ckpt else "model.pretrained=true")
    if ckpt and m["pretrained"]:   # (said of random_init only: retest 80)
        log.warning("model.pretrained=true is not used: model.checkpoint (%s) gives the backbone its weights", ckpt)
    extra = {"recipe": d["recipe"], "dataset": d["dataset"], "method": cfg["method"]["name"],
             # (the precision its evaluations ran in: svp eval/predict say when theirs differs, as
             # their numbers then do: retest 82. Null: float32; an older folder has no record. What
             # train.amp resolves to on the device, which build_run sets once its Precision is
             # made: retest 84)
             "amp": None}
    # (the numbers, not the key: svp eval/predict/serve/export normalise as the run did without
    # asking timm again; a folder without them was normalised with ImageNet's)
    extra["mean"], extra["std"] = map(list, normalization(d["normalize"], m["name"]))
    if cfg["method"].get("init_from"):   # (where the adapter started, for the record)
        extra["init_from"] = cfg["method"]["init_from"]
    return ModelSpec(model=m["name"], checkpoint=os.path.abspath(ckpt) if ckpt else None,
                     pretrained=bool(m["pretrained"]), random_init=bool(m["random_init"]),
                     img_size=int(d["img_size"]), num_classes=num_classes, class_names=list(class_names),
                     kwargs=dict(m["kwargs"] or {}), init_seed=init_seed(cfg), extra=extra)


def init_seed(cfg: dict) -> int:
    """The seed the model's random parts are drawn under: ``model.init_seed``, else ``train.seed``,
    so that each seed of a sweep starts from its own head (the official code seeds before it
    builds the model); backbone.json records the number, for svp eval/predict."""
    s = cfg["model"]["init_seed"]
    return int(cfg["train"]["seed"] if s is None else s)


def build_method(backbone: nn.Module, cfg: dict, num_classes: int) -> nn.Module:
    import svp.peft as peft

    mc, name, settings = method_config(cfg, num_classes)
    try:
        return peft.get_peft_model(backbone, mc)  # checks the settings against the model (depth, width)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"method.name={name!r} / method.settings={settings}: {e}") from None
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        raise OutOfMemoryIn(f"building method {name!r} with method.settings={settings}: {first_line(e)}",
                            "smaller method.settings where they size the method's own tensors (SVP's hidden, VPT's "
                            "num_tokens, LoRA's r, the adapter's bottleneck)") from None


def method_config(cfg: dict, num_classes: Optional[int]):
    """The run's method configuration (``svp.peft.make_config``), its name and settings; a bad
    name or setting is a ConfigError naming them (before any model is built)."""
    import svp.peft as peft

    name = cfg["method"]["name"]
    raw = dict(cfg["method"]["settings"] or {})
    # per-method blocks (method.settings.<method>.<key>) apply only to that method, so one
    # configuration can drive a sweep over several methods
    known = set(peft.list_methods())
    settings = {k: v for k, v in raw.items() if not (k in known and isinstance(v, dict))}
    if isinstance(raw.get(name), dict):
        settings.update(raw[name])
    if num_classes is not None:
        given = settings.get("num_classes", num_classes)
        if not (isinstance(given, int) and not isinstance(given, bool) and given == num_classes):
            # (a head of another size: an IndexError at the first step, or an epoch lost at the first
            # save; the same count, as a config written out in full holds it, is fine: review)
            raise ConfigError(f"method.settings.num_classes={given!r}: the head's class count is the dataset's "
                              f"({num_classes}); remove it")
        settings["num_classes"] = num_classes
    try:
        return peft.make_config(name, **settings), name, settings
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"method.name={name!r} / method.settings={settings}: {e}") from None


def check_other_blocks(cfg: dict) -> None:
    """Another method's block (method.settings.<method>) is not applied, but its names are
    checked: a typo in it (method.settings.lora.rr=4 under --method svp) passed until a sweep ran
    LoRA (QA 16a). Not at --resume: a run an older svp started with such a typo still resumes."""
    import svp.peft as peft

    name, raw = cfg["method"]["name"], cfg["method"]["settings"] or {}
    known = set(peft.list_methods())
    for other, block in raw.items():
        if other != name and other in known and isinstance(block, dict):
            valid = peft.setting_names(other)
            wrong = sorted(set(block) - valid)
            if wrong:
                raise ConfigError(f"method.settings.{other}: unknown setting(s) {wrong} for method {other!r}; "
                                  f"valid settings: {sorted(valid)}")


_META_MODELS: dict = {}


def check_method_fits(cfg: dict) -> None:
    """The run's method settings against its model's architecture (depth, width, patch grid),
    on a model without storage (the meta device): a sweep checks every run before the first
    trains, where a setting that does not fit the model (an SVP ``shared_layers`` that does not
    divide the depth) failed its runs one by one while the others trained. Models are built once
    a process (Vim-S ~0.15 s); anything but a refused setting is left to the run."""
    import timm

    import svp.models  # noqa: F401  (registers vim_* with timm)
    from ..models.vim import PatchGridError, VisionMamba
    from ..models.vit import HookedViT, NotAViTBackbone, as_backbone
    from ..peft.base import dry_run

    mc, name, settings = method_config(cfg, None)
    m = cfg["model"]
    kwargs = dict(m["kwargs"] or {})
    kwargs.setdefault("img_size", int(cfg["data"]["img_size"]))
    # (the run builds it with the task's head: a ViT registered without one, DINOv2's, was refused
    # as headless here: retest 96. The count is the data's, unknown before it is read; any will do)
    kwargs.setdefault("num_classes", 2)
    key = (m["name"], repr(sorted(kwargs.items())))
    if key not in _META_MODELS:
        try:
            with torch.device("meta"):
                _META_MODELS[key] = as_backbone(timm.create_model(m["name"], pretrained=False, **kwargs), m["name"])
        except NotAViTBackbone as e:
            raise ConfigError(str(e)) from None
        except PatchGridError as e:
            where = ("model.kwargs.img_size", kwargs["img_size"]) if "img_size" in (m["kwargs"] or {}) \
                else ("data.img_size", kwargs["img_size"])
            raise ConfigError(f"{where[0]}={where[1]}: {e}") from None
        except (TypeError, ValueError) as e:
            # a Vim's argument out of range: the run names it in its own words (model.kwargs); a model
            # that is no Vim could not take svp's img_size (kept as words)
            _META_MODELS[key] = None if m["name"] in timm.list_models("vim_*") else f"{type(e).__name__}: {e}"
        except AssertionError as e:   # (timm's own checks of its arguments: a traceback in the run: retest 96)
            if not m["kwargs"]:
                raise
            from ..build import error_words
            raise ConfigError(f"model {m['name']!r}: its arguments {m['kwargs']} do not fit "
                              f"(timm: {error_words(e)})") from None
        except Exception:   # an unknown model: the run says so, as without the check
            _META_MODELS[key] = None
    built = _META_MODELS[key]
    if built is None:
        return
    # (a model that is no Vim was built by the run with svp's img_size, and failed there with a
    # traceback after the data had been read: review46)
    if not isinstance(built, (VisionMamba, HookedViT)):   # (a str: the words it failed with)
        shown = {k: v for k, v in kwargs.items() if k != "num_classes"}   # (svp's own stand-in count left out)
        what = f"cannot be built with {shown} ({built})" if isinstance(built, str) else \
            f"is a {type(built).__name__}"
        raise ConfigError(f"model {m['name']!r} {what}; svp's methods adapt Vision Mamba backbones (the Vim "
                          f"models: {', '.join(timm.list_models('vim_*'))}) and timm's plain ViTs (vit_*)")
    if isinstance(built, HookedViT):
        _check_vit_size(built, cfg)
    try:
        dry_run(_META_MODELS[key], mc)
    except (ValueError, TypeError) as e:
        said = str(e) if isinstance(e, ConfigError) else f"method.name={name!r} / method.settings={settings}: {e}"
        raise ConfigError(said + _from_preset(cfg["data"]["dataset"], name, settings, str(e))) from None


def _check_vit_size(vit, cfg: dict) -> None:
    """The run's images fit the ViT's patch embedding, said before the data is read: a model built
    for another size failed in its first step with a traceback, and a size that is no multiple of
    the patch size trained on images whose last rows and columns the embedding dropped (a Vim
    refuses both: retest 96)."""
    pe, size = vit.patch_embed, int(cfg["data"]["img_size"])
    kw = cfg["model"]["kwargs"] or {}
    built = tuple(int(v) for v in pe.img_size) if getattr(pe, "img_size", None) else None
    # (dynamic_img_size is the ViT's, not its PatchEmbed's: read there, the exemption never held: retest 99)
    dynamic = getattr(vit, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True)
    if built and not dynamic and built != (size, size):
        raise ConfigError(f"model.kwargs.img_size={kw.get('img_size')!r} builds {cfg['model']['name']} for "
                          f"{built[0]}x{built[1]} px images, but data.img_size={size} makes {size} px ones; drop "
                          f"model.kwargs.img_size (data.img_size sizes the model) or make them equal")
    patch = int(pe.patch_size[0])
    if size % patch and not getattr(pe, "dynamic_img_pad", False):
        raise ConfigError(f"data.img_size={size} is not a multiple of {cfg['model']['name']}'s patch size {patch}: its "
                          f"patch embedding would drop the last {size % patch} px rows and columns of every image; "
                          f"use {size - size % patch} or {size - size % patch + patch}")


def _from_preset(dataset: str, method: str, settings: dict, message: str) -> str:
    """Where a refused method setting came from when the run's value (``settings``, as
    ``method_config`` resolved them) is the dataset's preset's: the official recipe's S for
    Vim-S, depth 24, where 6 or 12 do not divide the mini Vim's 8, and the error named a setting
    the user never set (review 66)."""
    from .presets import dataset_preset
    preset = (dataset_preset(str(dataset), method).get("method") or {}).get("settings") or {}
    for k, v in preset.items():
        if re.search(rf"\b{re.escape(k)}\b", message) and settings.get(k) == v:
            return (f" ({k}={v!r} is dataset {dataset}'s preset, the official recipe's; give "
                    f"method.settings.{method}.{k}=... for this model)")
    return ""


def build_train_model(cfg: dict, spec: ModelSpec, resuming: bool = False) -> nn.Module:
    """Backbone (with the run's drop path) + method, its adapter started from ``method.init_from``'s
    tensors where set (not ``resuming``: the resume point holds them all)."""
    import dataclasses

    from ..models.vim import PatchGridError
    try:
        backbone = build_model(dataclasses.replace(spec, drop_path_rate=cfg["model"]["drop_path_rate"]))
    except PatchGridError as e:
        kw = cfg["model"]["kwargs"] or {}
        key, v = ("model.kwargs.img_size", kw["img_size"]) if "img_size" in kw else ("data.img_size", spec.img_size)
        raise ConfigError(f"{key}={v}: {e}") from None
    native = (getattr(backbone, "pretrained_cfg", None) or {}).get("input_size")
    grid, own = getattr(backbone, "checkpoint_grid", None), tuple(getattr(backbone.patch_embed, "grid_size", ()))
    if spec.weights == "checkpoint":
        # (a file's own grid, not the model name's 224 px: a 32 px file was said resampled at 32: retest 96)
        if grid and own and tuple(grid) != own:
            log.warning("data.img_size=%d makes a %dx%d patch grid; %s's position embedding is for a grid of "
                        "%dx%d: resampled to the model's, and a step costs what %d px costs", int(spec.img_size),
                        own[0], own[1], spec.checkpoint, grid[0], grid[1], int(spec.img_size))
    elif (spec.weights != "random" and native and int(native[-1]) != int(spec.img_size)
            and "img_size" not in (cfg["model"]["kwargs"] or {})):
        # (the mini Vim on an imagefolder ran at data.img_size's default 224, 49x its 32 px cost)
        log.warning("data.img_size=%d, while %s's weights were trained at %d px: its position embedding is "
                    "resampled, and a step costs what %d px costs; data.img_size=%d (--img-size) trains at the "
                    "weights' own size", int(spec.img_size), spec.model, int(native[-1]), int(spec.img_size),
                    int(native[-1]))
    if cfg["model"].get("grad_checkpointing"):
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise ConfigError(f"model.grad_checkpointing=true: {spec.model} has no set_grad_checkpointing")
        backbone.set_grad_checkpointing(True)
    if getattr(backbone, "head_from_checkpoint", False):
        # a task with the checkpoint's class count (1000 for the official files) got its
        # pretrained head; the official fine-tuning deletes head.* and trains a new one
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed(cfg))
            backbone.reset_classifier(int(spec.num_classes))
        backbone.head_from_checkpoint = False
        log.info("the checkpoint's %d-class head replaced by a new one (as the official fine-tuning "
                 "deletes head.*)", int(spec.num_classes))
    model = build_method(backbone, cfg, int(spec.num_classes))
    source = cfg["method"].get("init_from")
    if source and not resuming:
        init_from(model, source, spec)
    return model


def adapter_digest(folder: str) -> Optional[str]:
    """The tensors of the adapter folder ``folder`` as one digest: its adapter_config.json's
    ``weights_hash`` (which binds the config to the tensors saved with it), else, for a folder an
    older svp saved, the sha256 of its adapter.safetensors; None where neither can be read."""
    from ..io import sha256_file
    from ..peft.io import ADAPTER_WEIGHTS, read_adapter_config
    try:
        digest = read_adapter_config(folder).get("weights_hash")
        if digest:
            return f"weights_hash:{digest}"
        return f"sha256:{sha256_file(os.path.join(folder, ADAPTER_WEIGHTS))}"
    except (OSError, ValueError, AttributeError):
        return None


def init_from(model, source: str, spec: ModelSpec) -> None:
    """The adapter of ``model`` started from the adapter folder ``source`` (``method.init_from``);
    its head only on the run's classes, in the run's order. backbone.json records which tensors
    (``init_from_weights``: a sweep does not reuse the run once the folder holds others)."""
    from ..build import check_adapter_folder
    from ..errors import AdapterError

    check_adapter_folder(source)
    try:
        got = model.init_from_adapter(source)
    except AdapterError as e:
        raise ConfigError(f"method.init_from={source}: {e}") from None
    names, classes = [str(c) for c in got["class_names"] or []], [str(c) for c in spec.class_names or []]
    if any(k.startswith("base_model.head.") for k in got["loaded"]) and names and classes and names != classes:
        i = next((k for k, (a, b) in enumerate(zip(names, classes)) if a != b), min(len(names), len(classes)))
        raise ConfigError(f"method.init_from={source}: its head was trained on other classes than this run's "
                          f"(class {i}: {names[i] if i < len(names) else '-'!r} there, "
                          f"{classes[i] if i < len(classes) else '-'!r} here), so each class would start as another")
    # the same method with other settings of the same shapes (LoRA's alpha, SVP's compat): its tensors
    # are taken as they are, and start another function than they ended as (retest 89)
    if got["method"] == model.config.method and isinstance(got["config"], dict):
        mine = model.config.to_dict()
        differ = [f"{k}: {got['config'][k]!r} there, {mine[k]!r} here" for k in sorted(got["config"])
                  if k not in ("method", "num_classes") and k in mine and got["config"][k] != mine[k]]
        if differ:
            log.warning("method.init_from: %s's %s settings are not this run's (%s); its tensors start this run "
                        "as they are", source, got["method"], "; ".join(differ))
    _warn_other_images(source, spec)
    spec.extra["init_from_weights"] = adapter_digest(source)
    log.info("method.init_from: %d tensors of the %s adapter in %s start this run's %s adapter; %d of its %d "
             "start as initialised", len(got["loaded"]), got["method"], source, model.config.method,
             len(got["initialised"]), len(got["loaded"]) + len(got["initialised"]))


def _warn_other_images(source: str, spec: ModelSpec) -> None:
    """A start adapter trained on images prepared otherwise (another recipe, mean or std) than this
    run's: said, as other settings are (a head trained on 0.5/0.5 inputs started an ImageNet-normalised
    run unsaid: retest 98). Read from its backbone.json; a folder without one is not compared."""
    from ..build import read_backbone_spec
    from ..data.transforms import adapter_normalization, same_statistics
    path = os.path.join(source, "backbone.json")
    if not os.path.isfile(path):
        return
    try:
        theirs = read_backbone_spec(path).extra
        there = (theirs.get("recipe", "svp"),) + adapter_normalization(theirs, source)
    except Exception:   # noqa: BLE001  (a damaged record: the adapter's tensors were read; nothing to compare)
        return
    here = (spec.extra.get("recipe", "svp"),) + adapter_normalization(spec.extra, "this run")
    if there[0] != here[0] or not same_statistics(there[1:], here[1:]):
        log.warning("method.init_from: %s was trained on images prepared otherwise (recipe %s, mean %s, std %s) than "
                    "this run's (recipe %s, mean %s, std %s): its tensors start this run as they are", source,
                    there[0], list(there[1]), list(there[2]), here[0], list(here[1]), list(here[2]))


def param_counts(model) -> dict:
    """The counts ``results.json`` reports, from ``PeftModel.trainable_counts`` (head: the
    trainable parameters of ``base_model.head``)."""
    c = model.trainable_counts()
    return {"all_params": c["all"], "trainable_params": c["trainable"],
            "trainable_params_without_head": c["trainable_without_head"],
            "head_params": c["trainable"] - c["trainable_without_head"]}


def build_loss(cfg: dict, mixup_active: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()  # smoothing is applied by Mixup to the targets
    if float(cfg["train"]["smoothing"]) > 0:
        return LabelSmoothingCrossEntropy(smoothing=float(cfg["train"]["smoothing"]))
    return nn.CrossEntropyLoss()


def build_mixup(cfg: dict, num_classes: int):
    t = cfg["train"]
    if float(t["mixup"]) <= 0 and float(t["cutmix"]) <= 0:
        return None
    from timm.data import Mixup

    if int(t["batch_size"]) % 2:  # timm's Mixup asserts it at the first step, in every mode
        raise ConfigError(f"train.mixup / train.cutmix need an even train.batch_size (timm's Mixup mixes "
                          f"pairs of images), got {t['batch_size']}; or set train.mixup=0 train.cutmix=0")
    return Mixup(mixup_alpha=float(t["mixup"]), cutmix_alpha=float(t["cutmix"]), prob=float(t["mixup_prob"]),
                 switch_prob=float(t["mixup_switch_prob"]), mode=t["mixup_mode"],
                 label_smoothing=float(t["smoothing"]), num_classes=num_classes)


def amp_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The autocast dtype ``train.amp_dtype`` (``requested``) runs as on ``device``: bfloat16 on
    the CPU whatever was asked (float16 has no fast products there and would need a scaler);
    elsewhere the one asked, but float16 where the device has no bfloat16."""
    kind = torch.device(device).type
    if kind == "cpu":
        return torch.bfloat16
    # (asked of CUDA alone: an older torch without a CUDA driver raises)
    if requested == "float16" or kind != "cuda" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Precision:
    """Autocast and gradient scaler for ``train.amp``.

    CUDA: bfloat16 autocast where the device supports it (no scaler needed), else float16 with
    a GradScaler. CPU: bfloat16 autocast, no scaler; the Vim mixer keeps its conv, x_proj,
    dt_proj and scan in float32 and its output, the residual stream, in float32
    (BiMambaMixer.forward), so what runs in bfloat16 is the large products: in_proj, out_proj,
    the patch embedding, the head and the methods' own (prompters, adapters, LoRA). float16 is a
    CUDA choice: on the CPU it has no fast products and would need a scaler, so the CPU runs
    bfloat16 and says so. ``train.amp_cpu=false`` leaves the CPU in float32 (as svp did before
    that key existed, and as runs started then resume: engine/rundir.py)."""

    def __init__(self, cfg: dict, device: torch.device, option: str = "train.amp"):
        # option: what the user set, as the log names it (`svp eval`/`predict` pass "--amp")
        t = cfg["train"]
        self.device_type = device.type
        self.enabled = bool(t["amp"]) and (device.type != "cpu" or bool(t.get("amp_cpu", True)))
        dtype = amp_dtype(t["amp_dtype"], device)
        if t["amp"] and not self.enabled:   # (said nowhere: the log read as a float32 run's)
            log.info("%s: off on the CPU (train.amp_cpu=false): float32, as CUDA-only amp", option)
        if self.enabled and device.type == "cpu":
            if t["amp_dtype"] == "float16":
                log.warning("train.amp_dtype=float16 is for CUDA; on the CPU %s runs bfloat16 autocast", option)
            found = cpu_bf16_instructions()
            if found:
                log.info("%s: bfloat16 products on the CPU (it has %s)", option, ", ".join(found))
            else:
                log.warning("%s: %s", option, no_bf16_warning(found))
        if device.type == "cpu":
            # which float32 products run (the bits depend on it), and a bad SVP_CPU_MATMUL
            # stopped here rather than at the first step
            from ..ops import matmul_cpu
            log.info("float32 products on the CPU: %s", matmul_cpu.status())
        # a bad SVP_SCAN_BACKEND (or one that cannot run on this device) stops here too, not in the
        # first step's forward, which left the fresh run folder behind
        from ..ops import dispatch
        log.info("selective scan: %s", dispatch.describe(device))
        self.dtype = dtype
        use_scaler = self.enabled and device.type == "cuda" and dtype == torch.float16
        # torch >= 2.3 has torch.amp.GradScaler; a disabled scaler is a no-op
        if hasattr(torch.amp, "GradScaler"):
            self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        else:  # pragma: no cover - older torch
            self.scaler = torch.cuda.amp.GradScaler(enabled=use_scaler)

    def recorded(self) -> Optional[str]:
        """The autocast dtype the steps and evaluations run in, as backbone.json records it
        ("bfloat16", "float16"), or None for float32."""
        return str(self.dtype).replace("torch.", "") if self.enabled else None

    def describe(self) -> str:
        """What the steps compute in, as a resume point records it (a resume on another device
        may resolve train.amp otherwise: engine/rundir.py refuses it)."""
        if not self.enabled:
            return "float32"
        dtype = str(self.dtype).replace("torch.", "")
        return f"{dtype} autocast" + (" with a gradient scaler" if self.scaler.is_enabled() else "")

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def ema_for(cfg: dict, model: nn.Module) -> Optional[nn.Module]:
    if not cfg["train"]["ema"]:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=float(cfg["train"]["ema_decay"]))


def check_classes_to_learn(cfg: dict, train_ds: "Limited") -> None:
    """A training split with images of one class: trained to loss 0 and top-1 100% on a one-class
    set, and silently on one whose other classes had images only in val/test (or only a name in
    classes=). Refused; where data.max_train_samples (the first N) made it so, on a split ordered
    by class, a warning: a debugging run's choice."""
    present = sorted(set(int(t) for t in train_ds.targets))
    every = getattr(train_ds.ds, "split_targets", None)   # (data.shots: the split before the cut and draw)
    every = getattr(train_ds.ds, "targets", None) if every is None else every   # (a list or an array)
    full = sorted(set(int(t) for t in every)) if every is not None and len(every) else present
    if not present:   # (a dataset without targets: nothing to tell)
        return
    names = [train_ds.classes[i] for i in full if i < len(train_ds.classes)]
    if len(full) < 2:
        raise DatasetError(f"{cfg['data']['dataset']}: the training split has images of {len(full)} class "
                           f"({', '.join(map(repr, names))}) of {train_ds.num_classes}: a classifier needs "
                           f"images of at least 2")
    if len(present) < 2:
        cut = cfg["data"]["max_train_samples"]
        cut = int(cut) if cut else len(train_ds)
        log.warning("data.max_train_samples=%d keeps images of %d class of the %d the training split has (the "
                    "first %d of a split ordered by class%s): nothing to tell apart", cut, len(present),
                    len(full), cut, f"; data.shots={cfg['data']['shots']} draws from them" if cfg["data"]["shots"]
                    else "")


def check_names(cfg: dict, weights: bool = True) -> None:
    """What a run refused only once it had read its data (a minute or more of a real dataset, for
    a typo), checked first: the model's name, where its weights come from (``weights``), the
    optimizer's and the device's names. ``svp train --print-config`` checks the names alone (the
    default configuration names no weights; whether CUDA is here is the machine's business, not
    the configuration's)."""
    from ..build import check_checkpoint_file, check_device_name, check_model_name
    from .optim import check_opt_name

    m = cfg["model"]
    check_model_name(m["name"])
    check_opt_name(cfg["train"]["opt"])
    check_device_name(cfg["train"]["device"])
    if weights:
        ModelSpec(model=m["name"], checkpoint=m["checkpoint"], pretrained=bool(m["pretrained"]),
                  random_init=bool(m["random_init"]), img_size=int(cfg["data"]["img_size"])).weights
        check_checkpoint_file(m["checkpoint"], "model.checkpoint")   # (said after the data was read: review46)


def build_run(cfg: dict, device: torch.device, dinfo, resuming: bool = False) -> types.SimpleNamespace:
    """Everything a run trains with: datasets and loader, spec, model (and its DDP wrapper),
    optimizer, schedule, precision, EMA, mixup and loss (``resuming``: a resume point's values
    follow; ``method.init_from`` is not read)."""
    from .distributed import EpochSampler, Loader, SeededDataset, comm_device
    from .optim import build_optimizer, scaled_lr
    from .sched import Schedule

    t = cfg["train"]
    set_deterministic(bool(t["deterministic"]))
    seed_everything(int(t["seed"]))
    check_names(cfg)
    check_method_fits(cfg)   # (as --print-config and a sweep check it: before the data is read)
    if cfg["method"].get("init_from") and not resuming:
        from ..build import check_adapter_folder
        check_adapter_folder(cfg["method"]["init_from"])   # (also before the data is read)
    r = types.SimpleNamespace()
    (r.train_ds, train_tf), r.val, r.test = build_datasets(cfg)
    kept = keep_pixels(cfg, {"train": (r.train_ds, train_tf), "val": r.val, "test": r.test})
    (r.train_ds, train_tf), r.val, r.test = kept["train"], kept["val"], kept["test"]
    check_classes_to_learn(cfg, r.train_ds)
    # (before the model is built: a few-shot set smaller than a batch was refused after it)
    r.sampler = EpochSampler(len(r.train_ds), int(t["batch_size"]), int(t["seed"]), dinfo.rank, dinfo.world_size)
    r.steps_per_epoch = r.sampler.batches_per_epoch()
    shots = cfg["data"]["shots"]
    if r.steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={t['batch_size']} x world size {dinfo.world_size} is larger than "
                          f"the training set ({len(r.train_ds)} samples of {cfg['data']['dataset']!r}"
                          f"{f', data.shots={shots} per class' if shots else ''})")
    left = len(r.train_ds) - r.steps_per_epoch * int(t["batch_size"]) * dinfo.world_size
    if shots and left >= 0.1 * len(r.train_ds):
        # (the last partial batch is dropped each epoch: 14 of a 30-image draw at batch 16 went unsaid)
        log.warning("data.shots=%s: %d training images at %d a step leave %d of them (%.0f%%) out of each epoch "
                    "(a different %d each epoch: the last partial batch is dropped); a global batch dividing %d "
                    "uses them all", shots, len(r.train_ds), int(t["batch_size"]) * dinfo.world_size, left,
                    100.0 * left / len(r.train_ds), left, len(r.train_ds))
    r.spec = model_spec(cfg, r.train_ds.num_classes, r.train_ds.classes)
    r.model = model = build_train_model(cfg, r.spec, resuming).to(device)
    model.train()
    cuda = device.type == "cuda"
    r.loader = Loader(
        SeededDataset(r.train_ds, train_tf), batch_size=int(t["batch_size"]), sampler=r.sampler,
        num_workers=int(cfg["data"]["num_workers"]), pin_memory=cuda, persistent_workers=False)
    r.lr = scaled_lr(cfg, dinfo.world_size)
    r.optimizer = build_optimizer(model, cfg, r.lr)
    r.sched = Schedule(r.optimizer, cfg, r.steps_per_epoch)
    r.prec = Precision(cfg, device)
    r.spec.extra["amp"] = r.prec.recorded()
    r.ema = ema_for(cfg, model)
    r.mixup = build_mixup(cfg, r.spec.num_classes)
    r.criterion = build_loss(cfg, r.mixup is not None)
    r.ddp_model = model
    if dinfo.enabled:
        r.ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if cuda else None, find_unused_parameters=bool(t["ddp_find_unused"]))
    r.comm_dev = comm_device(device, dinfo)
    return r


def check_data(train_ds, val, test, dist) -> None:
    """Read every image of the splits a run uses before its first step (within svp.data's
    limit; the log says when a split is too large), on the main rank; every rank raises."""
    from ..data import check_before_training
    from .distributed import broadcast_object
    from .progress import log

    msg = None
    if dist.is_main:
        splits = {"train": train_ds, "val": val and val[0], "test": test and test[0]}
        try:
            check_before_training({k: (d.ds, d.n) for k, d in splits.items() if d is not None}, logger=log)
        except DatasetError as e:
            msg = str(e)
    msg = broadcast_object(msg, dist)
    if msg:
        raise DatasetError(msg)
