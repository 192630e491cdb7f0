"""One registry for every dataset: VTAB-1k tasks, the HTA datasets, custom
imagefolder/csv data and the offline embedded sets.

>>> from svp.data import build_dataset, dataset_info
>>> ds = build_dataset("digits", "train")           # no root needed
>>> ds = build_dataset("vtab/dtd", "test", root="/data")
>>> dataset_info("cub200").num_classes
200
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from . import classic, embedded, fgvc, vtab
from .base import DOCS_HINT, ConcatSplits, DatasetError, SubsetDataset, VisionDataset, carve_validation

log = logging.getLogger("svp.data")

DATA_ENV = "SVP_DATA"   # default data root when root=None


@dataclass(frozen=True)
class DatasetInfo:
    name: str                      # canonical name, e.g. 'vtab/dtd', 'hta/cub200', 'digits'
    num_classes: int               # 0 for custom datasets (known only once read)
    group: str                     # vtab-natural | vtab-specialized | vtab-structured | hta | fgvc | embedded | custom
    splits: Tuple[str, ...]        # split names build_dataset accepts
    # protocol of the official SVP code: what it trains on and what it evaluates
    default_splits: Dict[str, Optional[str]] = field(default_factory=dict)
    # a train/val pair for model selection that never touches the test split;
    # val None = no native validation split, pass val_from_train=<fraction>
    selection_splits: Dict[str, Optional[str]] = field(default_factory=dict)
    recipe: str = "svp"            # default image recipe for build_transform
    img_size: int = 224            # default input size
    native_size: Optional[int] = None   # native resolution when fixed (embedded, CIFAR, SVHN)
    needs_root: bool = True
    layout: str = ""               # expected layout under the data root (for docs/errors)
    aliases: Tuple[str, ...] = ()
    split_aliases: Dict[str, str] = field(default_factory=dict)   # another name of one split -> its own
    description: str = ""
    options: Tuple[str, ...] = ()  # dataset-specific options of build_dataset


_REGISTRY: Dict[str, Tuple[DatasetInfo, Callable]] = {}
_ALIASES: Dict[str, str] = {}

COMMON_OPTIONS = ("val_from_train", "seed", "skip_bad_images", "check_files")


def _register(info: DatasetInfo, builder: Callable) -> None:
    _REGISTRY[info.name] = (info, builder)
    for a in info.aliases:
        _ALIASES[a] = info.name


# ---------------------------------------------------------------------- VTAB
for _task, _nc, _group in vtab.VTAB_TASKS:
    _register(DatasetInfo(
        name=f"vtab/{_task}", num_classes=_nc, group=_group,
        splits=vtab.VTAB_SPLITS + tuple(vtab.VTAB_SPLIT_ALIASES),
        default_splits={"train": "train800val200", "test": "test"},
        selection_splits={"train": "train800", "val": "val200", "test": "test"},
        split_aliases=dict(vtab.VTAB_SPLIT_ALIASES),
        recipe="vtab", img_size=224, layout=vtab.VTAB_LAYOUT.format(task=_task),
        description=f"VTAB-1k {_task} ({_group.split('-')[1]}), {_nc} classes, "
                    f"test ~{vtab.VTAB_TEST_SIZES[_task]:,} images",
    ), (lambda t, n: lambda root, split, transform, **kw: vtab.build_vtab(
        t, n, root, split, transform, **kw))(_task, _nc))

# ---------------------------------------------------------------------- HTA
_FGVC_DESC = {"cub200": "CUB-200-2011", "nabirds": "NABirds", "flowers": "Oxford Flowers",
              "dogs": "Stanford Dogs", "cars": "Stanford Cars (not in the official HTA script)"}
_FLAGS = {"cub200": "CUB200", "nabirds": "NABIRDS", "flowers": "FLOWERS", "dogs": "DOGS",
          "cars": "CARS", "cifar100": "CIFAR", "cifar10": "CIFAR10", "dtd": "DTD",
          "gtsrb": "GTSRB", "svhn": "SVHN", "food101": "FOOD"}
for _key, (_folders, _imgdirs, _nc, _ex) in fgvc.FGVC.items():
    _register(DatasetInfo(
        name=f"hta/{_key}", num_classes=_nc, group="fgvc" if _key == "cars" else "hta",
        splits=fgvc.FGVC_SPLITS,
        default_splits={"train": "train", "test": "test"},
        selection_splits={"train": "train", "val": None if _key == "cars" else "val",
                          "test": "test"},
        recipe="svp", layout=fgvc.fgvc_layout(_key),
        aliases=(_key, _FLAGS[_key]) + (("cub",) if _key == "cub200" else ()),
        description=f"{_FGVC_DESC[_key]}, {_nc} classes, VPT json splits",
    ), (lambda k: lambda root, split, transform, **kw: fgvc.build_fgvc(
        k, root, split, transform, **kw))(_key))

_CLASSIC = [
    # key, classes, builder, layout, splits, selection val, native size, description, extra options
    ("cifar10", 10, lambda r, s, t, **kw: classic.build_cifar("cifar10", r, s, t, **kw),
     classic.CIFAR_LAYOUT["cifar10"], ("train", "test"), None, 32, "CIFAR-10 (python pickles)", ()),
    ("cifar100", 100, lambda r, s, t, **kw: classic.build_cifar("cifar100", r, s, t, **kw),
     classic.CIFAR_LAYOUT["cifar100"], ("train", "test"), None, 32, "CIFAR-100 (python pickles)", ()),
    ("dtd", 47, classic.build_dtd, classic.DTD_LAYOUT, classic.HTA_SPLITS, "val", None,
     "Describable Textures, partition 1 by default", ("partition",)),
    ("gtsrb", 43, classic.build_gtsrb, classic.GTSRB_LAYOUT, classic.HTA_SPLITS, "val", None,
     "German Traffic Signs; train = seeded 80% of Training, val = the other 20%", ()),
    ("svhn", 10, classic.build_svhn, classic.SVHN_LAYOUT, classic.HTA_SPLITS, "val", 32,
     "SVHN cropped digits; train = first 80% of train_32x32.mat, val = last 20%", ()),
    ("food101", 101, classic.build_food101, classic.FOOD_LAYOUT, classic.HTA_SPLITS, "val", None,
     "Food-101; train = seeded 80% of meta/train.json, val = the other 20%", ()),
]
for _key, _nc, _b, _lay, _splits, _val, _nat, _desc, _opts in _CLASSIC:
    _aliases = (_key, _FLAGS[_key]) + (("food",) if _key == "food101" else ())
    _register(DatasetInfo(
        name=f"hta/{_key}", num_classes=_nc, group="hta", splits=_splits,
        default_splits={"train": "train", "test": "test"},
        selection_splits={"train": "train", "val": _val, "test": "test"},
        recipe="svp", native_size=_nat, layout=_lay, aliases=_aliases,
        description=f"{_desc}, {_nc} classes", options=_opts), _b)

# ---------------------------------------------------------------------- custom
_register(DatasetInfo(
    name="imagefolder", num_classes=0, group="custom", splits=("train", "val", "test", "trainval"),
    default_splits={"train": "train", "test": "test"},
    selection_splits={"train": "train", "val": "val", "test": "test"},
    recipe="svp", layout=classic.IMAGEFOLDER_LAYOUT,
    description="custom data as <root>/<split>/<class>/<image>", options=("classes",)),
    classic.build_imagefolder)
_register(DatasetInfo(
    name="csv", num_classes=0, group="custom", splits=("train", "val", "test"),
    default_splits={"train": "train", "test": "test"},
    selection_splits={"train": "train", "val": "val", "test": "test"},
    recipe="svp", layout=classic.CSV_LAYOUT,
    description="custom data listed as '<path>,<label>' in <root>/<split>.csv",
    options=("file", "classes")), classic.build_csv)

# ---------------------------------------------------------------------- embedded
_EMB_DESC = {
    "digits": ("scikit-learn handwritten digits (real, 8x8 upsampled to 32)", 32),
    "textures": ("crops of scikit-image brick / grass / gravel (real, DTD-like)", 32),
    "faces": ("scikit-image lfw_subset face vs non-face (real, 25 px upsampled to 32)", 32),
    "dsprites_loc": ("dSprites generator, x-position in 16 bins (VTAB dSpr-Loc)", 64),
    "dsprites_ori": ("dSprites generator, orientation in 16 bins (VTAB dSpr-Ori)", 64),
    "shapes_count": ("3-10 coloured shapes, label = count - 3 (CLEVR-Count-like)", 64),
}
for _name, (_gen, _classes) in embedded.EMBEDDED.items():
    _register(DatasetInfo(
        name=_name, num_classes=len(_classes), group="embedded",
        splits=embedded.embedded_splits(_name),
        default_splits={"train": "train", "val": "val", "test": "test"},
        selection_splits={"train": "train", "val": "val", "test": "test"},
        split_aliases=embedded.single_split_aliases(_name),
        recipe="plain", img_size=32, native_size=_EMB_DESC[_name][1], needs_root=False,
        aliases=(f"embedded/{_name}",), description=_EMB_DESC[_name][0]),
        (lambda n: lambda root, split, transform, seed=0, **kw: embedded.build_embedded(
            n, split, transform, seed=seed))(_name))


# ---------------------------------------------------------------------- public API

class UnknownDatasetError(DatasetError, KeyError):
    """A dataset name that is not registered (a :class:`DatasetError`, so the CLI prints one
    line; also a ``KeyError`` for code that looks names up)."""

    __str__ = Exception.__str__  # KeyError would quote the message



def list_datasets(group: Optional[str] = None) -> List[str]:
    """Canonical dataset names (optionally of one group, or a group prefix such as 'vtab')."""
    names = [n for n, (i, _) in _REGISTRY.items()
             if group is None or i.group == group or i.group.startswith(group + "-")]
    return names


def resolve_name(name: str) -> str:
    if name in _REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    low = name.lower()
    for n in _REGISTRY:
        if n.lower() == low:
            return n
    for a, n in _ALIASES.items():
        if a.lower() == low and a != "CIFAR":   # 'cifar' is the VTAB task folder name
            return n
    hint = f" (did you mean 'vtab/{low}'?)" if "vtab/" + low in _REGISTRY else ""
    raise UnknownDatasetError(f"unknown dataset {name!r}{hint}; known: {', '.join(list_datasets())} "
                   f"(aliases: {', '.join(sorted(_ALIASES))})")


def dataset_info(name: str) -> DatasetInfo:
    return _REGISTRY[resolve_name(name)][0]


def _resolve_root(info: DatasetInfo, root) -> Optional[str]:
    if not info.needs_root:
        return None
    if root is None:
        root = os.environ.get(DATA_ENV)
        if not root:
            raise DatasetError(f"{info.name} is read from disk: pass its data root (svp train/eval/sweep: "
                               f"--data-root DIR or data.root=DIR; svp data: --root DIR; Python: root=...) "
                               f"or set ${DATA_ENV}\nexpected layout:\n"
                               f"{info.layout}\n({DOCS_HINT})")
    root = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "not found"   # (review 67)
        raise DatasetError(f"data root {what}: {root}\nexpected layout for {info.name}:\n"
                           f"{info.layout}\n({DOCS_HINT})")
    return root


def build_dataset(name: str, split: str, root=None, transform=None, *,
                  val_from_train: Optional[float] = None, seed: int = 0,
                  skip_bad_images: bool = False, check_files: bool = True,
                  **options) -> VisionDataset:
    """Build split ``split`` of dataset ``name``.

    root: the data root (laid out as the official SVP README; see docs/datasets.md);
        default ``$SVP_DATA``; ignored by embedded datasets.
    transform: applied to the PIL RGB image.
    val_from_train: carve a seeded, class-stratified validation split of this
        fraction out of the official training split (``info.default_splits['train']``):
        then 'val' is the carved part, and 'train' as well as the official training
        split's own name (e.g. 'train800val200') the rest; other splits are unchanged.
    seed: seed of that carving, of the GTSRB/Food-101 80/20 shuffle, and of the
        embedded generators.
    skip_bad_images: drop missing files (count logged) and replace unreadable
        images by the next readable one (each logged); default: raise.
    check_files: check that every listed file exists when building (default on).
    options: dataset-specific (``partition`` for DTD; ``file``/``classes`` for csv,
        ``classes`` for imagefolder).
    """
    info = dataset_info(name)
    _, builder = _REGISTRY[info.name]
    if "+" in split or "[" in split:
        return _split_expression(info, split, root, transform, val_from_train=val_from_train, seed=seed,
                                 skip_bad_images=skip_bad_images, check_files=check_files, **options)
    unknown = set(options) - set(info.options)
    if unknown:
        raise TypeError(f"{info.name}: unknown option(s) {', '.join(sorted(unknown))}; "
                        f"accepted: {', '.join(COMMON_OPTIONS + info.options)}")
    root = _resolve_root(info, root)
    kw = dict(options)
    if info.group == "embedded":
        kw["seed"] = seed
    else:
        kw.update(skip_bad_images=skip_bad_images, check_files=check_files)
        if info.name in ("hta/gtsrb", "hta/food101"):
            kw["seed"] = seed
    official_train = info.default_splits["train"]
    # (an alias means its split here too: VTAB's 'trainval' was the whole list beside the carve)
    own = split if split in ("train", "val") else info.split_aliases.get(split, split)
    if val_from_train is not None and own in ("train", "val", official_train):
        # the official training split itself also yields the remainder, so that
        # train_split=train800val200 + val_from_train never overlaps the carved val
        full = builder(root, official_train, None, **kw)
        tr, va = carve_validation(full.targets, float(val_from_train), seed)
        if not (va if own == "val" else tr):  # as FileListDataset refuses an empty list
            raise DatasetError(f"{info.name}: val_from_train={val_from_train} of its {len(full)} training items "
                               f"({official_train}) leaves the {split!r} split empty; expected a fraction that "
                               f"keeps images on both sides")
        log.info("%s: carved %d validation items (%.0f%%, seed %d) out of %d training items "
                 "(%s)", info.name, len(va), 100 * float(val_from_train), seed, len(full),
                 official_train)
        return SubsetDataset(full, va if own == "val" else tr, split=split, transform=transform)
    # custom data: any folder or file name is a split (docs/datasets.md), as its reader takes it
    custom = info.group == "custom" and re.fullmatch(r"[A-Za-z0-9_-]+", split) is not None
    if split not in info.splits and not custom:
        hint = ""
        if split == "val":
            hint = (" (no native validation split: carve one out of the training split with "
                    "data.options.val_from_train=<fraction>, e.g. 0.1; svp data check: --val-from-train 0.1)")
        raise DatasetError(f"{info.name}: unknown split {split!r}; available: "
                           f"{', '.join(info.splits)}{hint}")
    ds = builder(root, split, transform, **kw)
    if info.num_classes and ds.num_classes != info.num_classes:
        raise DatasetError(f"{info.name}: read {ds.num_classes} classes, expected "
                           f"{info.num_classes} (docs/datasets.md, All datasets)")
    return ds


_PART = re.compile(r"^([A-Za-z0-9_-]+)(?:\[:(\d+)\])?$")   # (a custom split name may hold -)
# the splits that join two others under a name of their own
_JOINED = {"trainval": ("train", "val"), **vtab.VTAB_SPLIT_PARTS}


def split_holds(dataset: Optional[str], expression: str) -> List[str]:
    """The splits whose images a split expression (``train[:512]+val``, as
    ``_split_expression`` reads it) of ``dataset`` holds, by their own names, in order: an alias
    is its split (VTAB's ``val`` is ``val200``), ``trainval`` / ``train800val200`` hold the two
    splits they join, and an empty slice (``[:0]``) holds none (any other slice starts at its
    split's first item). For comparing a selection split with the test split (``test[:64]``
    beside ``test``: review 62; ``val`` beside ``val200``: retest 64); a dataset not registered
    keeps the names as they are, and a part the builder would refuse is kept as written."""
    try:
        aliases = dict(dataset_info(dataset).split_aliases) if dataset else {}
    except Exception:   # noqa: BLE001  (a name the configuration check reports itself)
        aliases = {}
    out: List[str] = []
    for text in str(expression).split("+"):
        m = _PART.match(re.sub(r"\s+", "", text))
        if m and m.group(2) == "0":
            continue
        name = aliases.get(m.group(1), m.group(1)) if m else text.strip()
        for held in (aliases.get(p, p) for p in _JOINED.get(name, (name,))):
            if held and held not in out:
                out.append(held)
    return out


def _split_expression(info: DatasetInfo, split: str, root, transform, **kw) -> VisionDataset:
    """``a+b`` joins splits, ``a[:N]`` keeps the first N items of a split (what
    ``data.max_train_samples`` keeps): ``train[:512]+val`` is the training set of a
    refit after selection on ``val`` when the training budget is capped."""
    parts = []
    for text in split.split("+"):
        m = _PART.match(text.strip())
        if not m:
            raise DatasetError(f"{info.name}: bad split expression {split!r}: each part must be a split "
                               f"name, optionally with [:N] (e.g. 'train[:512]+val')")
        ds = build_dataset(info.name, m.group(1), root, None, **kw)
        if m.group(2) is not None:
            ds = SubsetDataset(ds, range(min(len(ds), int(m.group(2)))), split=text.strip())
        parts.append(ds)
    if len(parts) == 1:
        return SubsetDataset(parts[0], range(len(parts[0])), split=split, transform=transform)
    return ConcatSplits(parts, split=split, transform=transform)
