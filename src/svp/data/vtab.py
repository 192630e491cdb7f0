"""VTAB-1k in the NOAH/SSF export, as the official SVP code reads it.

Layout (per task)::

    <root>/VTAB/vtab-1k/<task>/
        train800.txt  val200.txt  train800val200.txt  test.txt
        images/train800/000000.jpg ...  images/val200/...  images/train800val200/...  images/test/...

Each list line is ``<relative image path> <integer label>`` (single space), the
path relative to the task folder.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from .base import (DOCS_HINT, DatasetError, FileListDataset, leaves_folder, listed_path, missing, open_text,
                   warn_repeats)

# (task folder, classes, group) in the usual VTAB-1k order (natural, specialized, structured)
VTAB_TASKS = [
    ("cifar", 100, "vtab-natural"),
    ("caltech101", 102, "vtab-natural"),
    ("dtd", 47, "vtab-natural"),
    ("oxford_flowers102", 102, "vtab-natural"),
    ("oxford_iiit_pet", 37, "vtab-natural"),
    ("svhn", 10, "vtab-natural"),
    ("sun397", 397, "vtab-natural"),
    ("patch_camelyon", 2, "vtab-specialized"),
    ("eurosat", 10, "vtab-specialized"),
    ("resisc45", 45, "vtab-specialized"),
    ("diabetic_retinopathy", 5, "vtab-specialized"),
    ("clevr_count", 8, "vtab-structured"),
    ("clevr_dist", 6, "vtab-structured"),
    ("dmlab", 6, "vtab-structured"),
    ("kitti", 4, "vtab-structured"),
    ("dsprites_loc", 16, "vtab-structured"),
    ("dsprites_ori", 16, "vtab-structured"),
    ("smallnorb_azi", 18, "vtab-structured"),
    ("smallnorb_ele", 9, "vtab-structured"),
]

# commonly reported test sizes (recalled, not verified against files)
VTAB_TEST_SIZES = {
    "cifar": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149,
    "oxford_iiit_pet": 3669, "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768,
    "eurosat": 5400, "resisc45": 6300, "diabetic_retinopathy": 42670, "clevr_count": 15000,
    "clevr_dist": 15000, "dmlab": 22735, "kitti": 711, "dsprites_loc": 73728,
    "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}

VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
# generic names: train/val are the disjoint tuning pair, trainval the official training list
VTAB_SPLIT_ALIASES = {"train": "train800", "val": "val200", "trainval": "train800val200"}
# the exporter writes each split's images again under images/<split>/: the same images, other paths
VTAB_SPLIT_PARTS = {"train800val200": ("train800", "val200")}


def vtab_splits_share_images(a: str, b: str) -> bool:
    """Whether VTAB-1k splits ``a`` and ``b`` (names or aliases) hold the same images."""
    a, b = VTAB_SPLIT_ALIASES.get(a, a), VTAB_SPLIT_ALIASES.get(b, b)
    return a == b or b in VTAB_SPLIT_PARTS.get(a, ()) or a in VTAB_SPLIT_PARTS.get(b, ())

VTAB_LAYOUT = """\
<root>/VTAB/vtab-1k/{task}/
    train800.txt  val200.txt  train800val200.txt  test.txt
    images/<split>/000000.jpg ...
  (list lines: '<relative image path> <integer label>', e.g. 'images/test/000000.jpg 3')"""


def vtab_task_dir(root: str, task: str) -> str:
    """The task folder. Besides the official ``<root>/VTAB/vtab-1k/<task>`` this
    accepts a root that already points at ``vtab-1k`` or at ``VTAB``."""
    candidates = [os.path.join(root, "VTAB", "vtab-1k", task),
                  os.path.join(root, "vtab-1k", task),
                  os.path.join(root, task)]
    for c in candidates:
        if os.path.isfile(os.path.join(c, "test.txt")) or os.path.isfile(
                os.path.join(c, "train800val200.txt")):
            return c
    # a task folder without its lists: report the missing list there. The bare <root>/<task> only
    # counts with a list in it: with VTAB and HTA under one root it is HTA's folder of that name
    for c in candidates[:2]:
        if os.path.isdir(c):
            return c
    if any(os.path.isfile(os.path.join(root, f)) for f in ("test.txt", "train800val200.txt")):
        # (the task folder itself given as the root: "not found: .../dtd/VTAB/vtab-1k/dtd": review 67)
        raise DatasetError(f"VTAB-1k task folder for '{task}' not found under {root}, which holds a task's lists "
                           f"itself: give the folder that holds VTAB/vtab-1k/{task}/ (or vtab-1k/) as the data "
                           f"root, not a task's folder ({DOCS_HINT})")
    raise missing(candidates[0], f"VTAB-1k task folder for '{task}'",
                  VTAB_LAYOUT.format(task=task))


def read_list_file(path: str, base_dir: str, sep: str = " ", num_classes: Optional[int] = None,
                   name: str = "") -> List[Tuple[str, int]]:
    """Parse ``<path><sep><int label>`` lines; blank lines are ignored, anything
    else malformed (and, given ``num_classes``, a label outside 0..num_classes-1) raises
    with file and line number."""
    samples, lines = [], []
    with open_text(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.strip().rsplit(sep, 1)
            if len(parts) != 2 or not parts[0].strip():
                raise DatasetError(f"{path}:{lineno}: malformed line {line!r}; expected "
                                   f"'<relative image path>{sep}<integer label>' ({DOCS_HINT})")
            rel, lab = parts[0].strip(), parts[1].strip()
            try:
                label = int(lab)
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: label {lab!r} is not an integer in line "
                                   f"{line!r} ({DOCS_HINT})") from None
            if num_classes is not None and not 0 <= label < num_classes:
                raise DatasetError(f"{path}:{lineno}: label {label} outside 0..{num_classes - 1}: {name} has "
                                   f"{num_classes} classes (docs/datasets.md, All datasets)")
            if leaves_folder(rel):
                raise DatasetError(f"{path}:{lineno}: image path {rel!r} leaves the task folder; expected a path "
                                   f"relative to {base_dir} ({DOCS_HINT})")
            samples.append((listed_path(base_dir, rel), label))
            lines.append(lineno)
    warn_repeats(name or os.path.basename(path), path, [(p, ln, lab) for (p, lab), ln in zip(samples, lines)])
    return samples


def build_vtab(task: str, num_classes: int, root: str, split: str, transform=None,
               skip_bad_images: bool = False, check_files: bool = True) -> FileListDataset:
    split = VTAB_SPLIT_ALIASES.get(split, split)
    if split not in VTAB_SPLITS:
        raise DatasetError(f"vtab/{task}: unknown split {split!r}; available: "
                           f"{', '.join(VTAB_SPLITS)} (aliases: "
                           + ", ".join(f"{k}={v}" for k, v in VTAB_SPLIT_ALIASES.items()) + ")")
    tdir = vtab_task_dir(root, task)
    lst = os.path.join(tdir, f"{split}.txt")
    if not os.path.isfile(lst):
        raise missing(lst, f"VTAB-1k split list '{split}.txt'", VTAB_LAYOUT.format(task=task))
    samples = read_list_file(lst, tdir, num_classes=num_classes, name=f"vtab/{task}")
    classes = [str(i) for i in range(num_classes)]
    return FileListDataset(samples, classes, transform, name=f"vtab/{task}", split=split,
                           skip_bad_images=skip_bad_images, check_files=check_files, source=lst)
