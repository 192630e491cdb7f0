"""Reading every image of a dataset before it is needed.

One routine, :func:`find_bad_images`, serves both ``svp data check`` (every image of
every split, on request) and :func:`check_before_training` (called by the trainer before
the first step, so that a corrupt test image is not found only after the last epoch).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Mapping, Optional

from .base import DOCS_HINT, ConcatSplits, DatasetError, FileListDataset, SubsetDataset

log = logging.getLogger("svp.data")

#: Default for :func:`check_before_training`. Decoding a 500x375 JPEG took 2.6 ms of CPU
#: here (noise content, the decoder's worst case; docs/datasets.md), so this many is about
#: a minute of CPU, split over the reader threads: small next to training on them. Larger
#: splits are left to ``svp data check`` and said so in the log.
PRECHECK_MAX_IMAGES = 20000


def _read_one(ds, i) -> str:
    try:
        ds._load(i)
        return ""
    except DatasetError as e:
        return str(e)
    except MemoryError:   # the process's, not the image's
        raise
    except Exception as e:  # anything else a decoder may raise
        return f"unreadable image: {ds.describe(i)}: {type(e).__name__}: {e}"


def find_bad_images(ds, read: bool = True, workers: int = 4, count: Optional[int] = None
                    ) -> List[str]:
    """One message per missing (``read=False``) or missing/unreadable (``read=True``)
    image among the first ``count`` (default all) items of ``ds``, in item order; empty
    when all are fine."""
    n = len(ds) if count is None else min(len(ds), count)
    if not read:
        if not _file_backed(ds):
            return []
        return [f"image not found: {p}" for p in (ds.describe(i) for i in range(n))
                if not os.path.isfile(p)]
    if workers > 1:
        try:
            with ThreadPoolExecutor(workers) as pool:
                return [e for e in pool.map(lambda k: _read_one(ds, k), range(n)) if e]
        except RuntimeError as e:   # "can't start new thread" (a process limit, ulimit -u): read here
            if "thread" not in str(e):
                raise
    return [e for e in (_read_one(ds, k) for k in range(n)) if e]


def _file_backed(ds) -> bool:
    # In-memory datasets (embedded, CIFAR, SVHN) were decoded when built; a split expression
    # ('train800+val200', 'train[:512]') is file-backed where one of its parts is
    if isinstance(ds, SubsetDataset):
        return _file_backed(ds.base)
    if isinstance(ds, ConcatSplits):
        return any(_file_backed(p) for p in ds.parts)
    return isinstance(ds, FileListDataset)


def check_before_training(datasets: Mapping[str, object], max_images: int = PRECHECK_MAX_IMAGES,
                          workers: int = 4, logger: Optional[logging.Logger] = None
                          ) -> Dict[str, List[str]]:
    """Read every image of the file-backed splits in ``datasets`` (split name -> dataset,
    or -> ``(dataset, n)`` when only its first ``n`` items are used), in the given order, while the images read so far stay within ``max_images``; a split
    that would pass the limit is not read and one log line says so.

    Raises :class:`DatasetError` listing the bad files (first 10 and a count) when a split
    that does not skip bad images has any; for one built with ``skip_bad_images`` the
    files are logged as a warning. Returns split -> bad-file messages for every split read.
    """
    logger = logger or log
    found: Dict[str, List[str]] = {}
    fatal: List[str] = []
    budget = max_images
    for split, ds in datasets.items():
        ds, n = ds if isinstance(ds, tuple) else (ds, None)
        if ds is None or not _file_backed(ds):
            continue
        n = len(ds) if not n else min(len(ds), int(n))
        if n > budget:
            logger.info("data: %s split (%d images) not read before training: over the %d-image "
                        "limit for the up-front check; run `svp data check` to read every image",
                        split, n, max_images)
            continue
        budget -= n
        bad = find_bad_images(ds, read=True, workers=workers, count=n)
        found[split] = bad
        if not bad:
            continue
        if getattr(ds, "skip_bad_images", False):
            logger.warning("data: %s split: %d unreadable image(s), skipped when read, e.g. %s",
                           split, len(bad), bad[0])
        else:
            fatal.extend(f"{split}: {m}" for m in bad)
    if fatal:
        shown = "\n  ".join(fatal[:10])
        more = f"\n  ... and {len(fatal) - 10} more" if len(fatal) > 10 else ""
        raise DatasetError(f"{len(fatal)} missing/unreadable image(s) found before training:\n"
                           f"  {shown}{more}\n({DOCS_HINT}; fix or remove them, or build the dataset "
                           f"with skip_bad_images=True (svp train: data.options.skip_bad_images=true) "
                           f"to skip them with a logged count)")
    return found
