"""CIFAR-10/100, DTD, GTSRB, SVHN and Food-101 in their official (torchvision)
layouts, read from disk with the splits of the official SVP code. Nothing is
downloaded and no checksum is required (so partial or re-packed copies work and
tests can use tiny fakes); every missing piece is reported by its path.

Splits (``train`` / ``val`` / ``test`` / ``trainval``):

- CIFAR: train = the 50k training batches, test = test batch; no native val.
- DTD: partition k (option ``partition``, default 1): ``labels/train{k}.txt``,
  ``val{k}.txt``, ``test{k}.txt``; trainval = train + val.
- GTSRB, Food-101: trainval = the full official training set; train = the first 80 %
  after a seeded shuffle (option ``seed``, default 0), val = the remaining 20 %.
  (SVP shuffles with Python ``random``; we use a seeded numpy permutation, so the
  80 % is a different but equally sized draw.)
- SVHN: train = first 80 % of ``train_32x32.mat`` (no shuffle, as SVP), val = the
  last 20 %, trainval = all; label 10 is mapped to 0.
"""
from __future__ import annotations

import codecs
import collections
import csv
import json
import os
import pickle
import re
from typing import Dict, List, Tuple

import numpy as np

from ..compat import AllowListUnpickler
from .base import (DOCS_HINT, IMG_EXTENSIONS, ArrayDataset, DatasetError, FileListDataset,
                   leaves_folder, listed_path, log, missing, open_text, require_dir, require_file, seeded_shuffle,
                   special_file, walk_folders, warn_repeats)

HTA_SPLITS = ("train", "val", "test", "trainval")
_gtsrb_warned: set = set()   # GTSRB training folders whose stray files were already said in this process


def _check_split(name, split, allowed=HTA_SPLITS):
    if split not in allowed:
        raise DatasetError(f"{name}: unknown split {split!r}; available: {', '.join(allowed)}")


def _eighty(n: int, seed: int, shuffle: bool) -> Tuple[np.ndarray, np.ndarray]:
    order = seeded_shuffle(n, seed) if shuffle else np.arange(n)
    k = int(n * 0.8)
    return np.sort(order[:k]) if shuffle else order[:k], np.sort(order[k:]) if shuffle else order[k:]


def _pick(split: str, n: int, seed: int, shuffle: bool) -> np.ndarray:
    if split == "trainval":
        return np.arange(n)
    tr, va = _eighty(n, seed, shuffle)
    return tr if split == "train" else va


# ---------------------------------------------------------------------- CIFAR

CIFAR_LAYOUT = {
    "cifar10": "<root>/cifar-10-batches-py/\n    data_batch_1 ... data_batch_5  test_batch  batches.meta",
    "cifar100": "<root>/cifar-100-python/\n    train  test  meta",
}


_REBUILD = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own array rebuild, whatever its module


MAX_CIFAR_VALUES = 50_000 * 3072   # the largest array of a CIFAR file (CIFAR-100's train: 50,000 images)


class _BoundedArray(np.ndarray):
    """numpy.ndarray as a CIFAR pickle may name it: an 89-byte file that called
    ``numpy.ndarray((N, 3072), 'u1')`` itself (not numpy's rebuild, whose data is in the file)
    made an array of N images of uninitialised memory, gigabytes for a large N."""

    def __new__(cls, shape=(0,), *args, **kwargs):
        n = int(np.prod(shape, dtype=np.float64)) if np.ndim(shape) else int(shape)
        if n > MAX_CIFAR_VALUES:
            raise pickle.UnpicklingError(f"an array of {n:,} values, more than a CIFAR file holds "
                                         f"({MAX_CIFAR_VALUES:,})")
        return np.ndarray.__new__(cls, shape, *args, **kwargs)


class _CifarUnpickler(AllowListUnpickler):
    """CIFAR's batches are pickles of a dict of bytes, lists and one numpy array; a file under a
    data root is not trusted, so only the globals such a dict needs resolve (numpy's array
    rebuild, and ``_codecs.encode``, which protocol 2 writes bytes with). Anything else, e.g.
    a function a crafted file would call, is refused before it runs."""

    refusal = "in a CIFAR batch (only numpy arrays, bytes, lists and dicts are)"
    _ALLOWED = {"numpy.core.multiarray._reconstruct": _REBUILD, "numpy._core.multiarray._reconstruct": _REBUILD,
                "numpy.ndarray": _BoundedArray, "numpy.dtype": np.dtype, "_codecs.encode": codecs.encode}

    def allowed(self):
        return self._ALLOWED


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:
        raise DatasetError(f"unreadable CIFAR batch file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise DatasetError(f"unreadable CIFAR batch file {path}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def build_cifar(key: str, root: str, split: str, transform=None, **_) -> ArrayDataset:
    _check_split(key, split, ("train", "test"))
    if key == "cifar10":
        d = os.path.join(root, "cifar-10-batches-py")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        d = os.path.join(root, "cifar-100-python")
        files = [split]
        meta, label_key, names_key = "meta", "fine_labels", "fine_label_names"
    layout = CIFAR_LAYOUT[key]
    require_dir(d, f"{key} folder", layout)
    classes = _unpickle(require_file(os.path.join(d, meta), f"{key} meta file", layout))[names_key]
    xs, ys = [], []
    for fn in files:
        p = require_file(os.path.join(d, fn), f"{key} batch file '{fn}'", layout)
        b = _unpickle(p)
        if "data" not in b or label_key not in b:
            raise DatasetError(f"{p}: CIFAR batch without 'data'/'{label_key}' ({DOCS_HINT})")
        x = np.asarray(b["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(b[label_key]):
            raise DatasetError(f"{p}: 'data' has shape {x.shape}, expected (N, 3072) matching "
                               f"{len(b[label_key])} labels")
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.extend(int(v) for v in b[label_key])
        _check_labels(ys[len(ys) - len(x):], len(classes), p, f"'{label_key}'")
    return ArrayDataset(np.concatenate(xs), ys, classes, transform, name=f"hta/{key}", split=split)


# ---------------------------------------------------------------------- DTD

DTD_LAYOUT = """\
<root>/dtd/dtd/
    labels/train1.txt  val1.txt  test1.txt  (... partitions 1-10; lines 'banded/banded_0002.jpg')
    images/<class>/<file>.jpg"""


def _dtd_dir(root: str) -> str:
    for c in (os.path.join(root, "dtd", "dtd"), os.path.join(root, "dtd")):
        if os.path.isdir(os.path.join(c, "labels")):
            return c
    raise missing(os.path.join(root, "dtd", "dtd"), "DTD folder", DTD_LAYOUT)


def _dtd_list(path: str) -> List[Tuple[str, int]]:
    """(``<class>/<file>``, line number) of each line. A space is part of the name (there is no
    separator in this format: a re-packed copy's 'class00/class00 copy.jpg' was refused)."""
    out = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            s = line.strip()
            if not s:
                continue
            if "/" not in s or s.startswith("/") or s.endswith("/") or leaves_folder(s):
                raise DatasetError(f"{path}:{lineno}: malformed line {s!r}; expected "
                                   f"'<class>/<file>.jpg' inside images/ ({DOCS_HINT})")
            out.append((s, lineno))
    return out


def build_dtd(root: str, split: str, transform=None, partition: int = 1,
              skip_bad_images=False, check_files=True, **_) -> FileListDataset:
    _check_split("dtd", split)
    d = _dtd_dir(root)
    parts = ("train", "val") if split == "trainval" else (split,)
    lists = {}
    for s in ("train", "val", "test"):
        p = os.path.join(d, "labels", f"{s}{partition}.txt")
        if s in parts:
            require_file(p, f"DTD split list '{s}{partition}.txt'", DTD_LAYOUT)
        if os.path.isfile(p):
            lists[s] = _dtd_list(p)
    classes = sorted({e.split("/")[0] for v in lists.values() for e, _ in v})
    if len(classes) != 47:
        # name the lines whose class has no images/<class>/ folder: a typo among 47 names
        where = {}
        for s in ("train", "val", "test"):
            for e, lineno in lists.get(s, []):
                where.setdefault(e.split("/")[0], f"labels/{s}{partition}.txt:{lineno}")
        stray = [c for c in classes if not os.path.isdir(os.path.join(d, "images", c))]
        named = "; classes without an images/<class>/ folder: " + ", ".join(
            f"{c!r} ({where[c]})" for c in stray[:5]) + (" ..." if len(stray) > 5 else "") if stray else ""
        raise DatasetError(f"dtd: found {len(classes)} classes in {d}/labels/*{partition}.txt, "
                           f"expected 47{named} (docs/datasets.md, All datasets)")
    idx = {c: i for i, c in enumerate(classes)}
    for s in parts:
        warn_repeats(f"dtd/{s}", os.path.join(d, "labels", f"{s}{partition}.txt"),
                     [(e, lineno, e.split("/")[0]) for e, lineno in lists[s]])
    samples = [(os.path.join(d, "images", e), idx[e.split("/")[0]]) for s in parts for e, _ in lists[s]]
    return FileListDataset(samples, classes, transform, name="hta/dtd", split=split,
                           skip_bad_images=skip_bad_images, check_files=check_files,
                           source=os.path.join(d, "labels", f"{parts[0]}{partition}.txt"))


# ---------------------------------------------------------------------- GTSRB

GTSRB_LAYOUT = """\
<root>/gtsrb/
    GTSRB/Training/00000/*.ppm ... GTSRB/Training/00042/*.ppm
    GTSRB/Final_Test/Images/*.ppm
    GT-final_test.csv          (';'-separated, columns Filename;...;ClassId)"""


def build_gtsrb(root: str, split: str, transform=None, seed: int = 0,
                skip_bad_images=False, check_files=True, **_) -> FileListDataset:
    _check_split("gtsrb", split)
    base = os.path.join(root, "gtsrb")
    classes = [f"{i:05d}" for i in range(43)]
    if split == "test":
        imgdir = require_dir(os.path.join(base, "GTSRB", "Final_Test", "Images"),
                             "GTSRB test image folder", GTSRB_LAYOUT)
        csvp = require_file(os.path.join(base, "GT-final_test.csv"), "GTSRB test labels",
                            GTSRB_LAYOUT)
        samples = []
        with open_text(csvp, newline="") as f:
            rows = list(csv.reader(f, delimiter=";"))
        if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
            raise DatasetError(f"{csvp}:1: header must contain 'Filename' and 'ClassId' "
                               f"(';'-separated) ({DOCS_HINT})")
        fi, ci = rows[0].index("Filename"), rows[0].index("ClassId")
        for lineno, row in enumerate(rows[1:], 2):
            if not row or not "".join(row).strip():
                continue
            try:
                fn, lab = row[fi], int(row[ci])
            except (IndexError, ValueError):
                raise DatasetError(f"{csvp}:{lineno}: malformed row {';'.join(row)!r} "
                                   f"({DOCS_HINT})") from None
            if not 0 <= lab < len(classes):   # here, where its line is known
                raise DatasetError(f"{csvp}:{lineno}: ClassId {lab} outside 0..{len(classes) - 1}")
            if leaves_folder(fn):   # (as every other list's: read silently from outside the root, review 52)
                raise DatasetError(f"{csvp}:{lineno}: image path {fn!r} leaves the test images' folder; "
                                   f"expected a file name in {imgdir} ({DOCS_HINT})")
            samples.append((os.path.join(imgdir, fn), lab))
        return FileListDataset(samples, classes, transform, name="hta/gtsrb", split=split,
                               skip_bad_images=skip_bad_images, check_files=check_files,
                               source=csvp)
    tdir = require_dir(os.path.join(base, "GTSRB", "Training"), "GTSRB training folder",
                       GTSRB_LAYOUT)
    found = sorted(e for e in os.listdir(tdir) if not e.startswith(".") and os.path.isdir(os.path.join(tdir, e)))
    if found != classes:
        miss = sorted(set(classes) - set(found))
        raise DatasetError(f"gtsrb: {tdir} must hold the 43 class folders 00000..00042 "
                           f"(docs/datasets.md, All datasets); missing: {', '.join(miss[:10]) or 'none'}; "
                           f"unexpected: {', '.join(sorted(set(found) - set(classes))) or 'none'}")
    samples, ignored, empty = [], [], []
    for i, c in enumerate(classes):
        n = len(samples)
        for fn in sorted(os.listdir(os.path.join(tdir, c))):
            if fn.startswith("."):  # hidden, e.g. macOS's ._x.ppm resource forks: no images
                continue
            if fn.lower().endswith(".ppm"):
                samples.append((os.path.join(tdir, c, fn), i))
            elif not re.fullmatch(r"GT-\d{5}\.csv", fn):  # each class folder's own annotation file
                ignored.append(os.path.join(tdir, c, fn))
        if len(samples) == n:
            empty.append(c)
    if empty:
        raise DatasetError(f"gtsrb: no .ppm images in the class folder(s) {', '.join(empty[:10])} of {tdir} "
                           f"(docs/datasets.md, All datasets)")
    if ignored and tdir not in _gtsrb_warned:   # (once: each split is cut from the same folder)
        _gtsrb_warned.add(tdir)
        log.warning("hta/gtsrb: ignored %d file(s) that are not .ppm images, e.g. %s", len(ignored), ignored[0])
    keep = _pick(split, len(samples), seed, shuffle=True)
    samples = [samples[i] for i in keep]
    return FileListDataset(samples, classes, transform, name="hta/gtsrb", split=split,
                           skip_bad_images=skip_bad_images, check_files=check_files, source=tdir)


# ---------------------------------------------------------------------- SVHN

SVHN_LAYOUT = "<root>/\n    train_32x32.mat  test_32x32.mat   (directly in the data root)"


def _check_labels(labels: List[int], n: int, path: str, what: str) -> None:
    """An array file's labels within 0..n-1 (FileListDataset checks the listed ones): a label
    past the class list was a class of its own in the counts, or an IndexError in the loss."""
    bad = next((k for k, v in enumerate(labels) if not 0 <= v < n), None)
    if bad is not None:
        raise DatasetError(f"{path}: {what}[{bad}] is {labels[bad]}, outside 0..{n - 1}; expected the "
                           f"dataset's original file ({DOCS_HINT})")


def build_svhn(root: str, split: str, transform=None, **_) -> ArrayDataset:
    _check_split("svhn", split)
    fn = "test_32x32.mat" if split == "test" else "train_32x32.mat"
    path = os.path.join(root, fn)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(root, "svhn", fn)):
        path = os.path.join(root, "svhn", fn)
    require_file(path, f"SVHN file '{fn}'", SVHN_LAYOUT)
    try:
        from scipy.io import loadmat
        m = loadmat(path)
        x = np.asarray(m["X"], dtype=np.uint8)   # (32, 32, 3, N)
        y = np.asarray(m["y"]).astype(np.int64).reshape(-1)
    except Exception as e:
        raise DatasetError(f"unreadable SVHN file {path}: {type(e).__name__}: {e}") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DatasetError(f"{path}: 'X' has shape {x.shape}, expected (32, 32, 3, N) with N = "
                           f"{len(y)} labels")
    _check_labels(y.tolist(), 11, path, "'y'")   # (1..10, 10 for the digit 0)
    y[y == 10] = 0
    x = x.transpose(3, 0, 1, 2)
    if split != "test":
        keep = _pick(split, len(y), 0, shuffle=False)
        x, y = x[keep], y[keep]
    return ArrayDataset(np.ascontiguousarray(x), y.tolist(), [str(i) for i in range(10)],
                        transform, name="hta/svhn", split=split)


# ---------------------------------------------------------------------- Food-101

FOOD_LAYOUT = """\
<root>/food-101/
    meta/train.json  meta/test.json   ({"<class>": ["<class>/<id>", ...], ...})
    images/<class>/<id>.jpg"""


def _food_meta(path: str) -> Dict[str, List[str]]:
    try:
        with open_text(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed json ({e.msg}) ({DOCS_HINT})") from None
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise DatasetError(f"{path}: expected {{\"<class>\": [\"<class>/<id>\", ...]}} ({DOCS_HINT})")
    for c, entries in d.items():
        bad = next((e for e in entries if not isinstance(e, str)), None)
        if bad is not None:   # (a TypeError in a path join, naming nothing)
            raise DatasetError(f"{path}: class {c!r} lists {bad!r}; expected image names \"<class>/<id>\" "
                               f"(text) ({DOCS_HINT})")
        outside = next((e for e in entries if leaves_folder(e)), None)
        if outside is not None:   # (read silently from outside the root: review43)
            raise DatasetError(f"{path}: class {c!r} lists {outside!r}, which leaves images/; expected image "
                               f"names \"<class>/<id>\" ({DOCS_HINT})")
    return d


def build_food101(root: str, split: str, transform=None, seed: int = 0,
                  skip_bad_images=False, check_files=True, **_) -> FileListDataset:
    _check_split("food101", split)
    base = require_dir(os.path.join(root, "food-101"), "Food-101 folder", FOOD_LAYOUT)
    # the classes are train.json's for every split: numbering test.json's own keys would shift
    # every test label after a key that differs (silently wrong accuracy)
    tp = require_file(os.path.join(base, "meta", "train.json"), "Food-101 split file 'meta/train.json'",
                      FOOD_LAYOUT)
    train_meta = _food_meta(tp)
    classes = sorted(train_meta)
    if len(classes) != 101:
        raise DatasetError(f"food101: {tp} lists {len(classes)} classes, expected 101 "
                           f"(docs/datasets.md, All datasets)")
    mp, meta = tp, train_meta
    if split == "test":
        mp = require_file(os.path.join(base, "meta", "test.json"), "Food-101 split file 'meta/test.json'",
                          FOOD_LAYOUT)
        meta = _food_meta(mp)
        unknown = sorted(set(meta) - set(classes))
        if unknown:
            raise DatasetError(f"food101: {mp} lists classes that {tp} does not: {', '.join(unknown[:5])}"
                               f"{' ...' if len(unknown) > 5 else ''}; expected the same 101 class names "
                               f"(docs/datasets.md, Food-101)")
    index = {c: i for i, c in enumerate(classes)}
    samples = [(os.path.join(base, "images", rel + ".jpg"), index[c])
               for c in sorted(meta) for rel in meta[c]]
    if split != "test":
        samples = [samples[i] for i in _pick(split, len(samples), seed, shuffle=True)]
    return FileListDataset(samples, classes, transform, name="hta/food101", split=split,
                           skip_bad_images=skip_bad_images, check_files=check_files, source=mp)


# ---------------------------------------------------------------------- custom: imagefolder, csv

IMAGEFOLDER_LAYOUT = """\
<root>/
    train/<class>/<image>   val/<class>/<image>   test/<class>/<image>
  (class order = sorted union of the class folder names over all split folders)"""

CSV_LAYOUT = """\
<root>/
    train.csv  val.csv  test.csv     (lines '<image path>,<label>'; optional header 'path,label';
                                       paths relative to the csv's folder; labels all
                                       integers 0..N-1 or all class names)
    classes.txt                       (optional: one class name per line, in label order)
  or pass file=<one csv> to read a single list"""


def _folder_name(entry: str) -> str:
    """A folder's name as text: its bytes read as UTF-8. Where Python reads file names in another
    encoding (a C locale without UTF-8 mode), 'café' came back as 'caf\\udcc3\\udca9', which
    adapter files kept and no UTF-8 system reads back; a name that is not UTF-8 stays as listed."""
    try:
        return os.fsencode(entry).decode("utf-8", "surrogateescape")
    except UnicodeEncodeError:   # text beyond the file system's encoding: a name given as text already
        return entry


def build_imagefolder(root: str, split: str, transform=None, classes=None,
                      skip_bad_images=False, check_files=True, **_) -> FileListDataset:
    sdir = os.path.join(root, split)
    require_dir(sdir, f"imagefolder split folder '{split}'", IMAGEFOLDER_LAYOUT)
    folders: Dict[str, str] = {}   # class name -> its folder's entry in this split
    found = set()
    splits = [os.path.join(root, s) for s in {"train", "val", "test", "trainval", split}]
    owners = collections.defaultdict(set)   # real path of a class folder (of any split) -> its classes
    for d in splits:
        if os.path.isdir(d):
            for e in os.listdir(d):
                # (a hidden folder, e.g. Jupyter's .ipynb_checkpoints, became class 0)
                if not e.startswith(".") and os.path.isdir(os.path.join(d, e)):
                    found.add(_folder_name(e))
                    owners[os.path.realpath(os.path.join(d, e))].add(_folder_name(e))
                    if d == sdir:
                        folders[_folder_name(e)] = e
    if classes is None:
        classes = sorted(found)
    else:
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise DatasetError(f"imagefolder: classes={classes!r}: expected a list of class folder names, "
                               f"e.g. classes=['cat', 'dog']")
        # names given where Python reads text as ASCII (a C locale without UTF-8 mode) as the folders'
        classes = [_folder_name(c) for c in classes]
        twice = sorted(c for c, k in collections.Counter(classes).items() if k > 1)   # (21,841 classes: no count())
        if twice:   # (the folder's images were labelled twice, as two classes)
            raise DatasetError(f"imagefolder: classes= lists {', '.join(map(repr, twice))} more than once")
        # a listed name without a folder was a class of no images, and the folder it meant was
        # left out, both silently (a typo: 12 images fewer, no word)
        missing = [c for c in classes if c not in found]
        if missing:
            raise DatasetError(f"imagefolder: classes= lists {', '.join(map(repr, missing[:5]))}"
                               f"{' and more' if len(missing) > 5 else ''}, which no split folder of {root} "
                               f"has a folder for; expected the names of its class folders "
                               f"({', '.join(map(repr, sorted(found)[:5]))}{', ...' if len(found) > 5 else ''})")
        unlisted = sorted(found - set(classes))
        if unlisted:
            log.warning("imagefolder/%s: %d class folder(s) not in classes= are left out: %s", split,
                        len(unlisted), ", ".join(map(repr, unlisted[:5])) + (", ..." if len(unlisted) > 5 else ""))
    if not classes:
        raise DatasetError(f"imagefolder: no class folders in {sdir}\nexpected layout:\n"
                           f"{IMAGEFOLDER_LAYOUT}\n({DOCS_HINT})")
    # a class folder's linked subfolders are followed, but never into the data root, a split folder
    # or another class's folder (of any split): a link to a parent ('cat/up -> ..') labelled every
    # other class's images, and the other splits', as this class's too (retest 88). A link to the
    # same class's folder of another split is followed: a trainval split made of links to
    # train/cat and val/cat (fenced too, it had no images: retest 89)
    # (by real paths, made once: a folder is fenced where it, or a folder it lies in, is another
    # class's; per class, a set of every other class's folders cost the square of the class count:
    # 15 s at 10,000 classes; and a link to another class's subfolder was followed: retest 90)
    blocked = {os.path.realpath(root)} | {os.path.realpath(d) for d in splits}

    def fenced_for(c):
        def fenced(path):
            real = os.path.realpath(path)
            if real in blocked:
                return True
            while True:
                held = owners.get(real)
                if held is not None:
                    return c not in held
                up = os.path.dirname(real)
                if up == real or up in blocked:
                    return False
                real = up
        return fenced
    samples, ignored, special = [], [], []
    for i, c in enumerate(classes):
        if c not in folders:   # (a class of another split only)
            continue
        top = os.path.join(sdir, folders[c])
        # (in sorted order of the folder paths; hidden folders, .thumbs/, .ipynb_checkpoints/: left out)
        for dirpath, files in sorted(walk_folders(top, fenced=fenced_for(c))):
            for fn in sorted(files):
                p = os.path.join(dirpath, fn)
                if fn.startswith("."):  # hidden, e.g. macOS's ._x.jpg resource forks: no images
                    continue
                if not fn.lower().endswith(IMG_EXTENSIONS):
                    ignored.append(p)
                # a pipe or a device named like an image, which reading waits on or reads forever
                # (`svp data check` hung: retest 88); a link to nothing is reported missing below
                elif special_file(p):
                    special.append(p)
                else:
                    samples.append((p, i))
    if ignored:
        log.warning(
            "imagefolder/%s: ignored %d non-image file(s) (extensions %s), e.g. %s",
            split, len(ignored), " ".join(IMG_EXTENSIONS), ignored[0])
    if special:
        log.warning("imagefolder/%s: ignored %d entries named like images that are not regular files (pipes, "
                    "devices, sockets), e.g. %s", split, len(special), special[0])
    # a class folder of this split holding no image, and images beside the class folders (they
    # have no class), were dropped without a word (review 67)
    counts = collections.Counter(t for _, t in samples)
    empty = [folders[c] for i, c in enumerate(classes) if c in folders and not counts[i]]
    if empty:
        log.warning("imagefolder/%s: %d class folder(s) of %s hold no image: %s", split, len(empty), sdir,
                    ", ".join(map(repr, empty[:5])) + (", ..." if len(empty) > 5 else ""))
    loose = sorted(e for e in os.listdir(sdir) if not e.startswith(".") and e.lower().endswith(IMG_EXTENSIONS)
                   and os.path.isfile(os.path.join(sdir, e)))
    if loose:
        log.warning("imagefolder/%s: ignored %d image(s) directly in %s, outside any class folder, e.g. %s; "
                    "expected <split>/<class>/<image>", split, len(loose), sdir, loose[0])
    return FileListDataset(samples, classes, transform, name="imagefolder", split=split,
                           skip_bad_images=skip_bad_images, check_files=check_files, source=sdir)


def _read_csv(path: str) -> List[Tuple[str, str, int]]:
    rows = []
    with open_text(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{path}:{lineno}: malformed line {','.join(row)!r}; "
                                   f"expected '<image path>,<label>' ({DOCS_HINT})")
            rows.append((row[0].strip(), row[1].strip(), lineno))
    return rows


_INT_LABEL = re.compile(r"[0-9]+")
# class indices of a csv dataset without a class list: ImageNet-21k has 21,841 classes
MAX_INDEX_CLASSES = 100_000
_NUMBER_LIKE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _csv_label_mode(labelled, classes, listed):
    """Decide whether a csv dataset's labels are class indices or class names and return
    ``(classes, label -> index)``. ``labelled`` holds ``(file, label, line)`` of every split
    file; one mode holds for all of them (docs/datasets.md, "csv (custom)"):

    - without a class list: indices when every label is a non-negative integer (classes
      "0".."max"), names when no label looks like a number (classes = sorted names);
    - with a class list (classes.txt / ``classes=``): names when every label is a listed
      name, else indices when every label is an integer in 0..len-1.

    Anything else is a mix and raises :class:`DatasetError` at the first line that does
    not fit the mode most lines follow, never a silent switch of the whole file."""
    labels = [lab for _, lab, _ in labelled]
    if classes is None:
        is_name = [not _NUMBER_LIKE.fullmatch(lab) for lab in labels]
        is_index = [bool(_INT_LABEL.fullmatch(lab)) for lab in labels]
    else:
        classes = [str(c) for c in classes]
        names = set(classes)
        is_name = [lab in names for lab in labels]
        is_index = [bool(_INT_LABEL.fullmatch(lab)) and int(lab) < len(classes) for lab in labels]
    if all(is_index) and not (classes is not None and all(is_name)):
        if classes is None:
            top = max(range(len(labels)), key=lambda i: int(labels[i]), default=None)
            if top is not None and int(labels[top]) >= MAX_INDEX_CLASSES:
                # the classes would be "0".."label": a typo such as 99999999999 built 10^11 names
                # and filled the machine's memory before anything was said
                path, lab, lineno = labelled[top]
                raise DatasetError(f"{path}:{lineno}: label {lab} as a class index means {int(lab) + 1:,} classes "
                                   f"(0..{lab}); at most {MAX_INDEX_CLASSES:,} are read without a class list. Check "
                                   f"the label, or list the classes in classes.txt ({DOCS_HINT})")
            classes = [str(i) for i in range(max((int(v) for v in labels), default=-1) + 1)]
        return classes, int
    if all(is_name):
        if classes is None:
            classes = sorted(set(labels))
        idx = {c: i for i, c in enumerate(classes)}
        clash = [lab for lab in set(labels) if _INT_LABEL.fullmatch(lab) and int(lab) != idx[lab]]
        if clash:
            log.warning("csv: labels such as %r are read as class names from %s, not as indices",
                        sorted(clash)[0], listed)
        return classes, idx.__getitem__
    # A mix: name the first line against the mode most lines follow (ties: indices).
    as_index = sum(is_index) >= sum(is_name)
    fits = is_index if as_index else is_name
    k = fits.index(False)
    path, lab, lineno = labelled[k]
    example = next((f"{f}:{n}: {v!r}" for (f, v, n), ok in zip(labelled, fits) if ok), "")
    example = f" (e.g. {example})" if example else ""
    n = len(classes) if classes is not None else 0
    if as_index:
        why = ("is not a non-negative integer" if not _INT_LABEL.fullmatch(lab) else
               f"is outside 0..{n - 1} ({n} classes in {listed})")
        mode = "class indices"
    elif classes is not None:
        why, mode = f"is not one of the {n} class names in {listed}", "class names"
    else:
        why, mode = "looks like a number", "class names"
    raise DatasetError(
        f"{path}:{lineno}: label {lab!r} {why}, but the other labels are {mode}{example}; "
        f"a csv dataset's labels are either all integers 0..N-1 or all class names "
        f"(names that look like numbers must be listed in classes.txt) ({DOCS_HINT})")


def build_csv(root: str, split: str, transform=None, file=None, classes=None,
              skip_bad_images=False, check_files=True, **_) -> FileListDataset:
    if file is not None:
        files = {split: os.fspath(file)}
        require_file(files[split], "csv list file", CSV_LAYOUT)
    else:
        files = {s: os.path.join(root, f"{s}.csv") for s in {"train", "val", "test", split}}
        require_file(files[split], f"csv split file '{split}.csv'", CSV_LAYOUT)
    rows = {s: _read_csv(p) for s, p in files.items() if os.path.isfile(p)}
    cdir = os.path.dirname(os.path.abspath(files[split]))
    listed = None
    lines = None
    if classes is None and os.path.isfile(os.path.join(cdir, "classes.txt")):
        listed = os.path.join(cdir, "classes.txt")
        with open_text(listed) as f:
            lines = [(k, ln.strip()) for k, ln in enumerate(f, 1) if ln.strip()]
        classes = [c for _, c in lines]
    elif classes is not None:
        listed = "classes="
    if classes is not None and not isinstance(classes, str):
        # (the name's label was its last line's, and the first one's class held no images)
        seen: Dict[str, int] = {}
        for k, c in lines or enumerate(classes, 1):
            if c in seen:
                where = f"{listed}:{k}" if lines else f"{listed}"
                raise DatasetError(f"{where}: class {c!r} is listed a second time (first at "
                                   f"{'line' if lines else 'position'} {seen[c]}); expected each class once")
            seen[c] = k
    # The requested split's file first, so that its lines are the ones an error names.
    labelled = [(files[s], lab, lineno) for s in [split] + sorted(set(rows) - {split})
                for _, lab, lineno in rows[s]]
    classes, to_index = _csv_label_mode(labelled, classes, listed)
    samples = [(rel if os.path.isabs(rel) else listed_path(cdir, rel), to_index(lab))
               for rel, lab, _ in rows[split]]
    # an image listed twice is two samples (weighted twice in training and in the accuracy): kept,
    # as listed, but said, since it is more often a list concatenated twice than a choice
    warn_repeats(f"csv/{split}", files[split], [(path, lineno, label) for (path, label), (_, _, lineno)
                                               in zip(samples, rows[split])])
    return FileListDataset(samples, classes, transform, name="csv", split=split,
                           skip_bad_images=skip_bad_images, check_files=check_files,
                           source=files[split])
