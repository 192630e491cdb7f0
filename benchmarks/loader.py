"""What keeping decoded images in memory (``data.cache_images``, svp/data/cache.py) saves a
data loader: images per second through the engine's dataset wrappers, every image read,
decoded and resized as in a first epoch, against the kept pixels of a later one.

    python benchmarks/loader.py                         # 96 JPEGs of 400 x 300, vtab recipe, 224 px
    python benchmarks/loader.py --size 32 32 --images 256
    python benchmarks/loader.py --recipe svp --eval     # the svp recipe's evaluation steps

Writes ``--images`` random JPEG files (quality 90) of ``--size`` (width height) to a temporary
folder, builds the recipe's transform, and times, in one process and one thread (as the engine's
loader runs with ``data.num_workers=0``), passes over every item of
``SeededDataset(Limited(files), transform)`` and of the same split kept in a PixelCache after a
first pass, alternating, ``--reps`` each. Reports the median images/s of each and their ratio, and
checks that every kept item has the read item's bits. Random pixels compress worst, so their
JPEGs take longer to decode than photographs of the same size: the read side is pessimistic.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import svp  # noqa: E402,F401  (before torch: svp.runtime)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from svp.data.base import FileListDataset  # noqa: E402
from svp.data.cache import PixelCache, split_fixed  # noqa: E402
from svp.data.transforms import build_transform  # noqa: E402
from svp.engine.distributed import SeededDataset  # noqa: E402
from svp.engine.setup import Limited  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--size", type=int, nargs=2, default=[400, 300], metavar=("W", "H"))
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--recipe", default="vtab", choices=["vtab", "plain", "svp"])
    ap.add_argument("--eval", action="store_true", help="the recipe's evaluation transform")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    tf = build_transform(a.recipe, not a.eval, img_size=a.img_size)
    parts = split_fixed(tf)
    if parts is None:
        sys.exit(f"the {a.recipe} recipe's {'evaluation' if a.eval else 'training'} transform has a random "
                 "step before ToTensor: nothing to keep")
    fixed, rest = parts
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = []
        for i in range(a.images):
            p = os.path.join(tmp, f"{i:06d}.jpg")
            Image.fromarray((rng.random((a.size[1], a.size[0], 3)) * 255).astype(np.uint8)).save(p, quality=90)
            samples.append((p, i % 10))
        files = FileListDataset(samples, [str(c) for c in range(10)], name="bench", split="train")
        read = SeededDataset(Limited(files, None), tf)
        kept_split = Limited(files, None)
        kept_split.cache = PixelCache(fixed, len(files))
        kept = SeededDataset(kept_split, rest)
        for i in range(len(files)):   # the first pass fills the cache; every item must match
            if not torch.equal(read[i][0], kept[i][0]):
                sys.exit(f"item {i}: the kept pixels gave other bits")

        def rate(ds):
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[(i, i)]
            return len(ds) / (time.perf_counter() - t0)

        rates = {"read": [], "kept": []}
        for _ in range(a.reps):
            for k, ds in (("read", read), ("kept", kept)):
                rates[k].append(rate(ds))
    r, k = statistics.median(rates["read"]), statistics.median(rates["kept"])
    print(f"# {a.images} JPEGs {a.size[0]}x{a.size[1]}, recipe {a.recipe} ({'eval' if a.eval else 'train'}), "
          f"{a.img_size} px, 1 thread; kept pixels {kept_split.cache.nbytes / 2**20:.1f} MB, same bits: yes")
    print("| loader | images/s (median of %d) | ms per image |" % a.reps)
    print("|---|---|---|")
    print(f"| read, decoded, resized (a first epoch) | {r:.0f} | {1e3 / r:.2f} |")
    print(f"| kept pixels (later epochs) | {k:.0f} | {1e3 / k:.2f} |")
    print(f"| ratio | {k / r:.1f}x | |")


if __name__ == "__main__":
    main()
