"""``svp data`` subcommands: list, check, grid."""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Dict, List

from ..errors import ConfigError
from ..io import error_line, mkdir_error, printable, shortened, user_path
from .base import DatasetError
from .check import find_bad_images
from .registry import _resolve_root, build_dataset, dataset_info, list_datasets


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="datasets: list, check a data root, save image grids",
                              description="Datasets: list them, check a data root, save image grids. "
                                          "Layouts: docs/datasets.md.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")

    pl = sub.add_parser("list", help="list the registered datasets")
    pl.add_argument("--group", default=None, help="only this group (vtab, hta, embedded, ...)")
    pl.set_defaults(func=cmd_list)

    pc = sub.add_parser("check", help="count images per split (and class) and read every image")
    pc.add_argument("name", help="dataset name, e.g. vtab/dtd, cub200, digits")
    pc.add_argument("--root", default=None, type=user_path, help="data root (default $SVP_DATA; not needed for "
                                                  "embedded datasets)")
    pc.add_argument("--split", action="append", default=None,
                    help="split to check (repeatable; default: every split of the dataset)")
    pc.add_argument("--per-class", action="store_true", help="also print images per class")
    pc.add_argument("--no-read", action="store_true",
                    help="only check that files exist, do not decode them")
    pc.add_argument("--workers", type=int, default=4, help="reader threads (default 4)")
    pc.add_argument("--seed", type=seed_arg, default=0,
                    help="seed of the splits svp draws (the embedded sets, GTSRB's and Food-101's validation "
                         "part, --val-from-train; default 0)")
    pc.add_argument("--val-from-train", type=float, default=None, metavar="F",
                    help="also make and check a val split of this fraction of train (data.options.val_from_train)")
    pc.add_argument("--partition", type=int, default=None, help="hta/dtd: DTD partition 1..10 (default 1)")
    pc.add_argument("--file", default=None, type=user_path, help="csv: one list file instead of <root>/<split>.csv")
    pc.set_defaults(func=cmd_check)

    pg = sub.add_parser("grid", help="save a batch of a dataset as an image grid (PNG)")
    pg.add_argument("name", help="dataset name (svp data list)")
    pg.add_argument("--root", default=None, type=user_path,
                    help="data root (default $SVP_DATA; not needed for embedded datasets)")
    pg.add_argument("--split", default="train", help="split to draw from (default train)")
    pg.add_argument("--n", type=int, default=32, help="number of images (default 32)")
    pg.add_argument("--cols", type=int, default=8, help="images per row (default 8)")
    pg.add_argument("--seed", type=seed_arg, default=0, help="seed of the images drawn (default 0)")
    pg.add_argument("--out", required=True, type=user_path,
                    help="output PNG (replaced if it exists; its folder is made)")
    pg.set_defaults(func=cmd_grid)

    # (no action: a usage error, its help on stderr as every usage error's)
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])


def cmd_list(args) -> int:
    names = list_datasets(args.group.lower() if args.group else None)   # (as dataset names: VTAB, HTA)
    if not names:   # a misspelt group printed nothing and exited 0
        groups = sorted({dataset_info(n).group.split("-")[0] for n in list_datasets()})
        raise ConfigError(f"--group {args.group!r}: no such group; expected one of {', '.join(groups)}")
    for n in names:
        i = dataset_info(n)
        nc = str(i.num_classes) if i.num_classes else "-"
        print(f"{n:28s} {nc:>4s}  {i.group:17s} {i.description}")
    return 0


def _check_splits(info, requested, val_from_train: bool = False, one_file: bool = False) -> List[str]:
    if requested:
        return requested
    if one_file:   # (--file: one list, checked once, not once a split: review 78)
        return [info.splits[0]]
    if info.name.startswith("vtab/"):
        # (with --val-from-train, train800val200 is the remainder and 'val' the carve beside it)
        return ["train800", "val200", "train800val200"] + (["val"] if val_from_train else []) + ["test"]
    splits = [s for s in info.splits if s != "trainval"]
    if val_from_train and "val" not in splits:   # the split --val-from-train makes
        splits.insert(splits.index("train") + 1 if "train" in splits else 0, "val")
    return splits


def check_dataset(name, root=None, splits=None, per_class=False, read=True, workers=4,
                  out=None, **options) -> int:
    """Print counts per split (and class) and read every image; return the number
    of problems found (missing split files, missing or unreadable images)."""
    out = sys.stdout if out is None else out
    info = dataset_info(name)
    if info.needs_root:
        try:
            root_dir = _resolve_root(info, root)
        except DatasetError as e:
            print(f"{info.name}: {info.num_classes or '?'} classes ({info.group})", file=out)
            print(f"  ERROR {printable(shortened(e), lines=True)}".replace("\n", "\n      "), file=out)
            print("1 problem(s)", file=out)
            return 1
    else:
        root_dir = root
    # Build every split first (cheap: no image is read) so that the header can give the
    # class count custom datasets only know once their lists are read.
    built = {}
    for split in _check_splits(info, splits, "val_from_train" in options, "file" in options):
        t0 = time.time()
        try:
            ds = build_dataset(info.name, split, root=root_dir, check_files=False, **options)
        except (DatasetError, KeyError, ValueError, TypeError) as e:  # TypeError: an option it does not take
            ds = e
        built[split] = (ds, time.time() - t0)
    counts = sorted({ds.num_classes for ds, _ in built.values() if not isinstance(ds, Exception)})
    nc = "/".join(map(str, counts)) if counts else str(info.num_classes or "?")
    header = f"{info.name}: {nc} classes ({info.group})"
    if info.needs_root:
        # (the folder read: "root $SVP_DATA" named the variable, not the folder: review 67)
        header += f", root {printable(root_dir)}" + (" ($SVP_DATA)" if root is None else "")
    print(header, file=out)
    problems = 0
    said: Dict[str, str] = {}   # an error's file, line and first words -> the split it was counted under
    for split, (ds, seconds) in built.items():
        if (isinstance(ds, DatasetError) and not splits and info.name.startswith("vtab/")
                and split in ("train800", "val200") and "split list" in str(ds) and "not found" in str(ds)
                and not isinstance(built["train800val200"][0], Exception)):
            # an export of what SVP reads (train800val200 and test) is complete: the two parts
            # are only needed for a run that selects on val200
            print(f"  {split:15s} absent (SVP trains on train800val200; --split {split} to require it)", file=out)
            continue
        if isinstance(ds, Exception):
            # one file's problem (a bad csv line, a malformed json, a root a level too deep) fails
            # every split that reads it: said and counted once (it was once a split: review 67)
            text = printable(shortened(ds), lines=True)
            # (by the file and line it names and what it says there: a csv's message also quotes
            # an example line of the split's own file)
            m = re.match(r"(\S+?:\d+|\S+?\.\w+): .{0,40}", text)
            key = m.group(0) if m else text
            if key in said:
                print(f"  {split:15s} ERROR (the same as {said[key]}'s, above)", file=out)
                continue
            said[key] = split
            problems += 1
            print(f"  {split:15s} ERROR {text}".replace("\n", "\n      "), file=out)
            continue
        t0 = time.time()
        bad = find_bad_images(ds, read=read, workers=workers)
        problems += len(bad)
        status = "ok" if not bad else f"{len(bad)} missing/unreadable"
        what = "read" if read else "listed"
        counts = ds.class_counts()
        present = sum(k > 0 for k in counts)
        # the classes this split holds: a split with images of 1 of 10 classes is not "10 classes"
        held = f"{ds.num_classes}" if present == ds.num_classes else f"{present} of {ds.num_classes}"
        print(f"  {split:15s} {len(ds):8d} images, {held} classes, "
              f"{what} in {seconds + time.time() - t0:.1f}s: {status}", file=out)
        if per_class:
            names = [printable(c) for c in ds.classes]   # (read from the data's files)
            width = max(len(c) for c in names) if names else 1
            for ci, (c, k) in enumerate(zip(names, counts)):
                print(f"      {ci:4d} {c:{width}s} {k:7d}", file=out)
        for msg in bad:
            print(f"    {printable(shortened(msg))}", file=out)   # (file names from split files: escape sequences)
    print(f"{problems} problem(s)" if problems else "all images present and readable"
          if read else "all listed files present", file=out)
    return problems


def cmd_check(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: expected a positive number of reader threads")
    if args.val_from_train is not None and not 0 < args.val_from_train < 1:   # not a data problem (exit 1)
        raise ConfigError(f"--val-from-train {args.val_from_train}: expected a fraction in (0, 1)")
    opts = {}
    if args.val_from_train is not None:
        opts["val_from_train"] = args.val_from_train
    try:
        info = dataset_info(args.name)
    except KeyError as e:
        error_line("data check", e.args[0])   # (it lacked the command's prefix)
        return 2
    # options a dataset does not read are the command's mistake, said as one (exit 2), not a data
    # problem of every split (review 78)
    for flag, value, option in (("--partition", args.partition, "partition"), ("--file", args.file, "file")):
        if value is None:
            continue
        if option not in info.options:
            takers = ", ".join(n for n in list_datasets() if option in dataset_info(n).options)
            raise ConfigError(f"{flag}: {info.name} takes no {option} (it is for {takers})")
        opts[option] = value
    if args.partition is not None and not 1 <= args.partition <= 10:
        raise ConfigError(f"--partition {args.partition}: expected one of DTD's partitions 1..10")
    if info.group == "embedded" or info.name in ("hta/gtsrb", "hta/food101") or "val_from_train" in opts:
        opts["seed"] = args.seed
    problems = check_dataset(args.name, root=args.root, splits=args.split,
                             per_class=args.per_class, read=not args.no_read,
                             workers=args.workers, **opts)
    return 1 if problems else 0


def save_grid(name, path, split="train", n=32, cols=8, root=None, seed=0, **options) -> str:
    """Save ``n`` images of a split (a seeded random sample) as a labelled PNG grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ds = build_dataset(name, split, root=root, **options)
    idx = np.random.RandomState(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
    if len(idx) < n:   # (a grid of fewer images than asked, without a word: review 67)
        logging.getLogger("svp.data").warning("%s/%s holds %d image(s): the grid shows all of them, not %d",
                                              dataset_info(name).name, split, len(idx), n)
    rows = (len(idx) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.0, rows * 1.15), dpi=80)
    axes = np.atleast_1d(axes).reshape(-1)
    for ax in axes:
        ax.axis("off")
    for ax, i in zip(axes, idx):
        img, y = ds[int(i)]
        ax.imshow(np.asarray(img), interpolation="nearest")
        ax.set_title(ds.classes[y], fontsize=7, pad=2, parse_math=False)  # class names as written ('$5')
    fig.suptitle(f"{dataset_info(name).name} / {split}", fontsize=9, parse_math=False)
    fig.tight_layout(pad=0.3)
    from ..io import atomic_write
    try:   # (atomic: a full disk left a cut-off PNG)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or "png"))
    finally:
        plt.close(fig)
    return path


def seed_arg(text: str) -> int:
    """--seed: numpy's and torch's seeds are 32 bits (2**32 or -1 stopped with a traceback)."""
    import argparse

    from ..compat import SEED_LIMIT
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{SEED_LIMIT - 1}, got {text!r}")
    return v


def cmd_grid(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")   # (as check's)
    # a user's mistake is one line and exit 2, as in every command (SVPError)
    if args.n < 1 or args.cols < 1:
        raise ConfigError(f"--n and --cols must be >= 1, got {args.n} and {args.cols}")
    out = args.out
    if not out.strip() or os.path.isdir(out):
        raise ConfigError(f"--out {out!r}: expected the path of the PNG file to write"
                          + (" (that is a folder)" if out.strip() else ""))
    if os.path.splitext(out)[1].lower() != ".png":   # matplotlib would add .png: say the file it writes
        out += ".png"
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create its folder {parent} ({mkdir_error(parent, e)})") from None
    try:
        save_grid(args.name, out, split=args.split, n=args.n, cols=args.cols, root=args.root, seed=args.seed)
    except KeyError as e:   # an unknown dataset or split
        raise ConfigError(str(e.args[0] if e.args else e)) from None
    except OSError as e:   # a full or read-only disk as the PNG is written
        raise ConfigError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    print(out)
    return 0
