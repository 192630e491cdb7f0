"""Write tiny fake copies of every on-disk dataset layout (real file and folder
names, a few generated images per class) — for tests, and to see what a data
root must look like::

    python -m svp.data.fake /tmp/fake_root      # then: svp data check cub200 --root /tmp/fake_root

:func:`make_fake_root` returns a manifest ``{dataset: {split: [(path, class name), ...]}}``
(for array-backed sets the path is ``None`` and the image's pixels equal its label
index) and ``{dataset: [class names in label order]}``.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .vtab import VTAB_TASKS

Manifest = Dict[str, Dict[str, List[Tuple[Optional[str], str]]]]

ALL = ("vtab", "cub200", "nabirds", "flowers", "dogs", "cars", "cifar10", "cifar100", "dtd",
       "gtsrb", "svhn", "food101", "imagefolder", "csv")


def _img(path: str, seed: int, size: int = 8) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.RandomState(seed % (2 ** 31))
    a = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
    fmt = "PPM" if path.endswith(".ppm") else ("PNG" if path.endswith(".png") else "JPEG")
    Image.fromarray(a).save(path, format=fmt)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def make_fake_root(root: str, which: Sequence[str] = ALL, vtab_items: int = 4,
                   vtab_tasks: Optional[Sequence[str]] = None
                   ) -> Tuple[Manifest, Dict[str, List[str]]]:
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)   # (SVHN's files lie in the root itself: which=("svhn",) found no folder)
    man: Manifest = {}
    classes: Dict[str, List[str]] = {}
    seed = [0]

    def img(path):
        seed[0] += 1
        _img(path, seed[0])

    # ---------------- VTAB-1k: <root>/VTAB/vtab-1k/<task>/{split}.txt + images/<split>/
    if "vtab" in which:
        for task, nc, _ in VTAB_TASKS:
            if vtab_tasks is not None and task not in vtab_tasks:
                continue
            tdir = os.path.join(root, "VTAB", "vtab-1k", task)
            name = f"vtab/{task}"
            man[name] = {}
            classes[name] = [str(i) for i in range(nc)]
            rows = {}
            for split, off in (("train800", 0), ("val200", 1), ("test", 2)):
                rows[split] = [(f"images/{split}/{i:06d}.jpg", (i * 7 + off) % nc)
                               for i in range(vtab_items)]
            rows["train800val200"] = [(f"images/train800val200/{i:06d}.jpg", lab)
                                      for i, (_, lab) in enumerate(rows["train800"] + rows["val200"])]
            for split, lst in rows.items():
                _write(os.path.join(tdir, f"{split}.txt"),
                       "".join(f"{p} {lab}\n" for p, lab in lst))
                for p, _ in lst:
                    img(os.path.join(tdir, p))
                man[name][split] = [(os.path.join(tdir, p), str(lab)) for p, lab in lst]

    # ---------------- FGVC json splits
    def fgvc(key, folder, imgdir, ids, path_of, label_of, names, classes_txt=None):
        ddir = os.path.join(root, "FGVC", folder)
        name = f"hta/{key}"
        man[name], classes[name] = {}, list(names)
        for split in ("train", "val", "test"):
            data, lst = {}, []
            for ci, cid in enumerate(ids):
                rel = path_of(ci, cid, split)
                data[rel] = label_of(cid)
                full = os.path.join(ddir, imgdir, rel) if imgdir else os.path.join(ddir, rel)
                img(full)
                lst.append((full, names[ci]))
            _write(os.path.join(ddir, f"{split}.json"), json.dumps(data))
            man[name][split] = lst
        if classes_txt:
            _write(os.path.join(ddir, "classes.txt"), classes_txt)

    sidx = {"train": 1, "val": 2, "test": 3}
    if "cub200" in which:
        ids = list(range(1, 201))
        dirs = [f"{i:03d}.Bird_species_{i:03d}" for i in ids]
        fgvc("cub200", "CUB_200_2011", "images", ids,
             lambda ci, cid, s: f"{dirs[ci]}/Bird_Species_{cid:03d}_{sidx[s]:04d}_{cid * 10 + sidx[s]}.jpg",
             lambda cid: f"{cid:03d}", dirs,
             "".join(f"{i} {d}\n" for i, d in zip(ids, dirs)))
    if "nabirds" in which:
        ids = list(range(295, 295 + 555))
        names = [f"NABird species {i}" for i in ids]
        # classes.txt also lists the non-leaf hierarchy nodes 0..294, as the real file does
        txt = "".join(f"{i} Node {i}\n" for i in range(295)) + \
            "".join(f"{i} {n}\n" for i, n in zip(ids, names))
        fgvc("nabirds", "nabirds", "images", ids,
             lambda ci, cid, s: f"{cid:04d}/{cid:08x}{sidx[s]:024x}.jpg", int, names, txt)
    if "flowers" in which:
        ids = list(range(1, 103))
        fgvc("flowers", "OxfordFlower", "", ids,
             lambda ci, cid, s: f"jpg/image_{cid * 10 + sidx[s]:05d}.jpg", int,
             [str(i) for i in ids])
    if "dogs" in which:
        ids = list(range(1, 121))
        dirs = [f"n02{85000 + i:06d}-Dog_breed_{i}" for i in ids]
        fgvc("dogs", "stanford-dogs", "images", ids,
             lambda ci, cid, s: f"{dirs[ci]}/{dirs[ci].split('-')[0]}_{sidx[s]}.jpg", int,
             [d for d in dirs])
    if "cars" in which:
        ids = list(range(1, 197))
        fgvc("cars", "stanford-cars", "", ids,
             lambda ci, cid, s: f"car_ims/{cid * 10 + sidx[s]:06d}.jpg", int,
             [str(i) for i in ids])
        # the real train.json (8,144) holds the 815 val.json images too (the spec's data formats)
        ddir = os.path.join(root, "FGVC", "stanford-cars")
        with open(os.path.join(ddir, "train.json"), encoding="utf-8") as f:
            train = json.load(f)
        with open(os.path.join(ddir, "val.json"), encoding="utf-8") as f:
            train.update(json.load(f))
        _write(os.path.join(ddir, "train.json"), json.dumps(train))
        man["hta/cars"]["train"] += man["hta/cars"]["val"]

    # ---------------- CIFAR (python pickles), pixels = label
    def cifar_batch(labels, key):
        labels = list(labels)
        data = np.repeat(np.asarray(labels, dtype=np.uint8)[:, None], 3072, 1)
        return {"data": data, key: labels, "batch_label": "fake"}

    def dump(path, obj):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if "cifar10" in which:
        d = os.path.join(root, "cifar-10-batches-py")
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]
        dump(os.path.join(d, "batches.meta"), {"label_names": names, "num_cases_per_batch": 2})
        man["hta/cifar10"] = {"train": [], "test": []}
        for b in range(1, 6):
            labs = [(b + j) % 10 for j in range(4)]
            dump(os.path.join(d, f"data_batch_{b}"), cifar_batch(labs, "labels"))
            man["hta/cifar10"]["train"] += [(None, names[lab]) for lab in labs]
        labs = list(range(10))
        dump(os.path.join(d, "test_batch"), cifar_batch(labs, "labels"))
        man["hta/cifar10"]["test"] = [(None, names[lab]) for lab in labs]
        classes["hta/cifar10"] = names
    if "cifar100" in which:
        d = os.path.join(root, "cifar-100-python")
        names = [f"fine_class_{i:02d}" for i in range(100)]
        dump(os.path.join(d, "meta"), {"fine_label_names": names,
                                       "coarse_label_names": [f"c{i}" for i in range(20)]})
        man["hta/cifar100"] = {}
        for split, labs in (("train", [i % 100 for i in range(200)]), ("test", list(range(100)))):
            b = cifar_batch(labs, "fine_labels")
            b["coarse_labels"] = [lab // 5 for lab in labs]
            dump(os.path.join(d, split), b)
            man["hta/cifar100"][split] = [(None, names[lab]) for lab in labs]
        classes["hta/cifar100"] = names

    # ---------------- DTD: dtd/dtd/images/<class>/<file>.jpg + labels/{train,val,test}1.txt
    if "dtd" in which:
        d = os.path.join(root, "dtd", "dtd")
        names = sorted(f"texture{i:02d}" for i in range(47))
        man["hta/dtd"] = {}
        for k, split in enumerate(("train", "val", "test")):
            lines = [f"{c}/{c}_{k * 10 + j:04d}.jpg" for c in names for j in range(2)]
            _write(os.path.join(d, "labels", f"{split}1.txt"), "\n".join(lines) + "\n")
            for ln in lines:
                img(os.path.join(d, "images", ln))
            man["hta/dtd"][split] = [(os.path.join(d, "images", ln), ln.split("/")[0])
                                     for ln in lines]
        classes["hta/dtd"] = names

    # ---------------- GTSRB
    if "gtsrb" in which:
        g = os.path.join(root, "gtsrb")
        names = [f"{i:05d}" for i in range(43)]
        train = []
        for i, c in enumerate(names):
            for j in range(3):
                p = os.path.join(g, "GTSRB", "Training", c, f"{j // 2:05d}_{j:05d}.ppm")
                img(p)
                train.append((p, c))
            _write(os.path.join(g, "GTSRB", "Training", c, f"GT-{c}.csv"),
                   "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
        rows, test = [], []
        for j in range(86):
            fn = f"{j:05d}.ppm"
            p = os.path.join(g, "GTSRB", "Final_Test", "Images", fn)
            img(p)
            rows.append(f"{fn};8;8;0;0;7;7;{j % 43}")
            test.append((p, names[j % 43]))
        _write(os.path.join(g, "GT-final_test.csv"),
               "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + "\n".join(rows) + "\n")
        man["hta/gtsrb"] = {"trainval": train, "test": test}
        classes["hta/gtsrb"] = names

    # ---------------- SVHN: train_32x32.mat / test_32x32.mat, label 10 means digit 0
    if "svhn" in which:
        from scipy.io import savemat
        man["hta/svhn"] = {}
        for split, n in (("trainval", 50), ("test", 20)):
            digits = np.arange(n) % 10
            X = np.repeat(digits.astype(np.uint8)[None, None, None, :], 32, 0)
            X = np.repeat(np.repeat(X, 32, 1), 3, 2)
            y = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
            mat = os.path.join(root, f"{'test' if split == 'test' else 'train'}_32x32.mat")
            savemat(mat, {"X": X, "y": y})
            with open(mat, "r+b") as f:   # the header's 116 text bytes hold the write time: fixed text instead
                f.write(b"MATLAB 5.0 MAT-file, written by svp.data.fake".ljust(116, b" "))
            man["hta/svhn"][split] = [(None, str(v)) for v in digits]
        classes["hta/svhn"] = [str(i) for i in range(10)]

    # ---------------- Food-101
    if "food101" in which:
        f = os.path.join(root, "food-101")
        names = sorted(f"dish_{i:03d}" for i in range(101))
        man["hta/food101"] = {}
        for split, k in (("train", 3), ("test", 1)):
            meta = {c: [f"{c}/{100000 * (1 + (split == 'test')) + i * 10 + j}" for j in range(k)]
                    for i, c in enumerate(names)}
            _write(os.path.join(f, "meta", f"{split}.json"), json.dumps(meta))
            lst = []
            for c, rels in meta.items():
                for rel in rels:
                    p = os.path.join(f, "images", rel + ".jpg")
                    img(p)
                    lst.append((p, c))
            man["hta/food101"]["trainval" if split == "train" else "test"] = lst
        classes["hta/food101"] = names

    # ---------------- custom: imagefolder (<split>/<class>/*) and csv (<split>.csv + images/)
    custom = (("imagefolder", "custom_imagefolder", ["cat", "dog", "zebra"],
               lambda s, c, j: (s, c, f"{c}_{j}.png")),
              ("csv", "custom_csv", ["apple", "banana", "cherry"],
               lambda s, c, j: ("images", f"{s}_{c}_{j}.jpg")))
    for key, folder, names, rel_parts in custom:
        if key not in which:
            continue
        d = os.path.join(root, folder)
        man[key] = {}
        for split in ("train", "val", "test"):
            rels = [(rel_parts(split, c, j), c) for c in names for j in range(2)]
            for parts, _ in rels:
                img(os.path.join(d, *parts))
            if key == "csv":
                _write(os.path.join(d, f"{split}.csv"),
                       "\n".join(["path,label"] + [f"{'/'.join(parts)},{c}" for parts, c in rels]) + "\n")
            man[key][split] = [(os.path.join(d, *parts), c) for parts, c in rels]
        classes[key] = names
    return man, classes


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m svp.data.fake DIR``: a fake copy of every layout in DIR. (Any first argument was
    taken for the folder: `--help` wrote ~5,000 files into ./--help, QA 16e.)"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m svp.data.fake",
                                description="Write a tiny fake copy of every dataset layout of docs/datasets.md "
                                            "(real file and folder names, a few random 8x8 images per class).")
    p.add_argument("dir", metavar="DIR", help="the folder to write the fake data root in (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a folder that already holds files (fake files replace those of their names)")
    args = p.parse_args(argv)
    if os.path.exists(args.dir) and not os.path.isdir(args.dir):
        p.error(f"{args.dir} is a file, not a folder")
    # (pointed at $SVP_DATA, it replaced a real root's lists and images with fake ones: review 67)
    held = sorted(os.listdir(args.dir)) if os.path.isdir(args.dir) else []
    if held and not args.overwrite:
        p.error(f"{args.dir} already holds files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): a fake "
                f"root replaces files of the real layouts' names; give a new or empty folder, or --overwrite")
    make_fake_root(args.dir)
    print(args.dir)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
