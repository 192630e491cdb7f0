"""FGVC datasets with the VPT json splits (CUB-200-2011, NABirds, Oxford Flowers,
Stanford Dogs, Stanford Cars), as the official SVP code reads them.

Each ``{train,val,test}.json`` is one object ``{image path relative to the image
folder: class id}``; class ids (strings for CUB, ints otherwise) are sorted and
mapped to 0..C-1, over the union of the split files present.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Tuple

from .base import DOCS_HINT, DatasetError, FileListDataset, leaves_folder, listed_path, missing, open_text

log = logging.getLogger("svp.data")

# key: (folder candidates under <root>/FGVC, image-dir candidates, classes, json path example)
FGVC = {
    "cub200": (["CUB_200_2011"], ["images"], 200,
               "190.Red_cockaded_Woodpecker/Red_Cockaded_Woodpecker_0036_182519.jpg"),
    "nabirds": (["nabirds"], ["images"], 555, "0533/e9bd16ad62624f35a3519790ed41c2fa.jpg"),
    "flowers": (["OxfordFlower"], [""], 102, "jpg/image_06765.jpg"),
    "dogs": (["stanford-dogs", "Stanford-dogs"], ["images", "Images"], 120,
             "n02112706-Brabancon_griffon/n02112706_1882.jpg"),
    "cars": (["stanford-cars", "Stanford-cars"], [""], 196, "car_ims/015678.jpg"),
}

FGVC_SPLITS = ("train", "val", "test")


def fgvc_layout(key: str) -> str:
    folders, imgdirs, _, example = FGVC[key]
    img = f"{imgdirs[0]}/" if imgdirs[0] else ""
    extra = "    classes.txt            (optional: '<id> <name>' lines, for class names)\n" \
        if key in ("cub200", "nabirds") else ""
    return (f"<root>/FGVC/{folders[0]}/\n"
            f"    train.json  val.json  test.json   ({{\"<image path>\": <class id>, ...}})\n"
            f"{extra}"
            f"    {img}{example}")


def _dataset_dir(root: str, key: str) -> str:
    folders = FGVC[key][0]
    for base in (os.path.join(root, "FGVC"), root):
        for f in folders:
            d = os.path.join(base, f)
            if os.path.isdir(d):
                return d
    raise missing(os.path.join(root, "FGVC", folders[0]), f"FGVC folder for '{key}'",
                  fgvc_layout(key))


def _load_json(path: str) -> Dict[str, object]:
    repeated: List[Tuple[str, object, object]] = []

    def pairs(items):
        # a key given twice: json.load keeps the last, as the official loader reads it, and says
        # nothing (an image listed twice in test.json became the last entry's class, silently)
        out: Dict[str, object] = {}
        for k, v in items:
            if k in out:
                repeated.append((k, out[k], v))
            out[k] = v
        return out
    try:
        with open_text(path) as f:
            data = json.load(f, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed json ({e.msg}); expected one object "
                           f"{{\"<image path>\": <class id>}} ({DOCS_HINT})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected one json object {{\"<image path>\": <class id>}}, "
                           f"got {type(data).__name__} ({DOCS_HINT})")
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DatasetError(f"{path}: entry {k!r} has class id {v!r}; expected an int or a "
                               f"string id ({DOCS_HINT})")
    if repeated:
        other = [r for r in repeated if r[1] != r[2]]
        k, was, now = (other or repeated)[0]
        log.warning("%s: %d image(s) listed more than once%s (e.g. %r: %r, then %r); the last entry of each is "
                    "used, as the official loader reads the file", path, len(repeated),
                    f", {len(other)} with another class id" if other else "", k, was, now)
    return data


def _odd_ids(ddir: str, loaded: Dict[str, Dict[str, object]], files: Dict[str, str]) -> str:
    """The class ids a count mismatch most likely comes from, each with one entry naming it: ids
    missing from classes.txt where the dataset has one, else ids that only one split file uses
    (an edited id among 102 or 555 was a count alone)."""
    where: Dict[str, Tuple[str, str]] = {}
    used_in: Dict[str, set] = {}
    for s, d in loaded.items():
        for k, v in d.items():
            where.setdefault(str(v), (os.path.basename(files[s]), k))
            used_in.setdefault(str(v), set()).add(s)
    txt = os.path.join(ddir, "classes.txt")
    odd, why = [], ""
    if os.path.isfile(txt):
        try:
            table = _read_class_names(txt)
        except DatasetError:
            table = {}
        odd = [i for i in where if table and not (_sort_key(i)[0] == 0 and int(i) in table)]
        why = "not in classes.txt"
    if not odd and len(loaded) > 1:
        odd = [i for i in where if len(used_in[i]) == 1]
        why = "used by one split file only"
    if not odd:
        return ""
    odd = sorted(odd, key=_sort_key)
    return (f"; class ids {why}: " + ", ".join(f"{i!r} ({where[i][0]}: {where[i][1]!r})" for i in odd[:5])
            + (" ..." if len(odd) > 5 else ""))


def _sort_key(v):
    s = str(v)
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _read_class_names(path: str) -> Dict[int, str]:
    names: Dict[int, str] = {}
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(" ", 1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise DatasetError(f"{path}:{lineno}: malformed line {line.rstrip()!r}; "
                                   f"expected '<id> <name>' ({DOCS_HINT})")
            names[int(parts[0])] = parts[1].strip()
    return names


def _class_names(ddir: str, ids: List[object], data: Dict[str, object]) -> List[str]:
    txt = os.path.join(ddir, "classes.txt")
    if os.path.isfile(txt):
        table = _read_class_names(txt)
        if all(_sort_key(i)[0] == 0 and int(str(i)) in table for i in ids):
            return [table[int(str(i))] for i in ids]
    # a single distinct parent folder per class (CUB, Dogs) names it
    parents: Dict[str, set] = {}
    for p, v in data.items():
        parents.setdefault(str(v), set()).add(os.path.dirname(p))
    dirs = [parents.get(str(i), set()) for i in ids]
    if all(len(d) == 1 for d in dirs):
        flat = [next(iter(d)) for d in dirs]
        if len(set(flat)) == len(flat) and all(flat):
            return [os.path.basename(d) for d in flat]
    return [str(i) for i in ids]


def build_fgvc(key: str, root: str, split: str, transform=None, skip_bad_images: bool = False,
               check_files: bool = True, expected_classes: Optional[int] = None
               ) -> FileListDataset:
    if split not in FGVC_SPLITS:
        raise DatasetError(f"{key}: unknown split {split!r}; available: {', '.join(FGVC_SPLITS)}")
    ddir = _dataset_dir(root, key)
    files = {s: os.path.join(ddir, f"{s}.json") for s in FGVC_SPLITS}
    if not os.path.isfile(files[split]):
        raise missing(files[split], f"{key} split file '{split}.json'", fgvc_layout(key))
    imgdir = ddir
    for cand in FGVC[key][1]:
        if cand == "" or os.path.isdir(os.path.join(ddir, cand)):
            imgdir = os.path.join(ddir, cand) if cand else ddir
            break
    else:
        raise missing(os.path.join(ddir, FGVC[key][1][0]), f"{key} image folder", fgvc_layout(key))
    loaded = {s: _load_json(p) for s, p in files.items() if os.path.isfile(p)}
    union: Dict[str, object] = {}
    for d in loaded.values():
        union.update(d)
    ids = sorted({str(v) for v in union.values()}, key=_sort_key)
    expected = FGVC[key][2] if expected_classes is None else expected_classes
    if expected and len(ids) != expected:
        raise DatasetError(f"{key}: found {len(ids)} distinct class ids in "
                           f"{', '.join(sorted(os.path.basename(p) for p in loaded))} under {ddir}, "
                           f"expected {expected}{_odd_ids(ddir, loaded, files)} (docs/datasets.md, FGVC)")
    index = {i: n for n, i in enumerate(ids)}
    classes = _class_names(ddir, ids, union)
    data = loaded[split]
    outside = [p for p in data if leaves_folder(p)]
    if outside:
        raise DatasetError(f"{files[split]}: image path {outside[0]!r} leaves {imgdir}"
                           f"{f' (and {len(outside) - 1} more)' if len(outside) > 1 else ''}; expected paths "
                           f"relative to it ({DOCS_HINT})")
    # a missing folder (Flowers' jpg/, Cars' car_ims/, a class folder) is one error, not one per image
    tops = sorted({p.replace("\\", "/").split("/")[0] for p in data if "/" in p.replace("\\", "/")})
    absent = [t for t in tops if not os.path.isdir(os.path.join(imgdir, t))]
    if absent:
        raise missing(os.path.join(imgdir, absent[0]), f"{key} image folder '{absent[0]}' (named by "
                      f"{os.path.basename(files[split])}{f' with {len(absent) - 1} more' if len(absent) > 1 else ''})",
                      fgvc_layout(key))
    samples: List[Tuple[str, int]] = [(listed_path(imgdir, p), index[str(v)])
                                      for p, v in data.items()]
    if split == "val" and "train" in loaded:
        overlap = len(set(data) & set(loaded["train"]))
        if overlap:
            log.warning("%s: %d of %d val.json images are also in train.json; for model selection "
                        "use val_from_train=<fraction> instead", key, overlap, len(data))
    return FileListDataset(samples, classes, transform, name=f"hta/{key}", split=split,
                           skip_bad_images=skip_bad_images, check_files=check_files,
                           source=files[split])
