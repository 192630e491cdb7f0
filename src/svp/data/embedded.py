"""Offline datasets that need no data root: real images bundled in scikit-learn /
scikit-image, and procedural generators of VTAB structured tasks.

All are deterministic given ``seed`` (default 0) and have fixed train/val/test
splits. Images are small (32 or 64 px) so a tiny Vim trains on them on a CPU in
a minute or two.

| name          | classes | train / val / test | native | what |
|---------------|---------|--------------------|--------|------|
| digits        | 10      | 1000 / 297 / 500   | 32     | sklearn 8x8 handwritten digits, upsampled |
| textures      | 3       | 600 / 150 / 300    | 32     | crops of skimage brick / grass / gravel, disjoint image regions per split |
| faces         | 2       | 120 / 20 / 60      | 32     | skimage lfw_subset, face vs non-face (25 px, upsampled) |
| dsprites_loc  | 16      | 800 / 200 / 1000   | 64     | dSprites generator, label = x-position bin (VTAB dSpr-Loc) |
| dsprites_ori  | 16      | 800 / 200 / 1000   | 64     | dSprites generator, label = orientation bin (VTAB dSpr-Ori) |
| shapes_count  | 8       | 800 / 200 / 1000   | 64     | 3..10 coloured shapes, label = count - 3 (CLEVR-Count-like) |

dSprites/shapes_count also accept the VTAB split names ``train800``, ``val200``,
``train800val200`` (= train, val, train+val).
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .base import ArrayDataset, DatasetError

# ---------------------------------------------------------------------- helpers

Splits = Dict[str, Tuple[np.ndarray, np.ndarray]]  # split -> (uint8 images, int labels)


def _resize_stack(imgs: np.ndarray, size: int, resample=Image.BILINEAR) -> np.ndarray:
    out = [np.asarray(Image.fromarray(a).resize((size, size), resample)) for a in imgs]
    return np.stack(out)


def _stratified_split(labels: np.ndarray, sizes: Dict[str, int], seed: int) -> Dict[str, np.ndarray]:
    """Seeded per-class round-robin split into consecutive named parts of the given
    total sizes; classes stay as balanced as the sizes allow."""
    rng = np.random.RandomState(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)).tolist()
                 for c in np.unique(labels)]
    # interleave classes so any prefix is near-balanced
    order: List[int] = []
    while any(per_class):
        for lst in per_class:
            if lst:
                order.append(lst.pop())
    order_arr = np.asarray(order)
    parts, start = {}, 0
    for name, n in sizes.items():
        parts[name] = np.sort(order_arr[start:start + n])
        start += n
    assert start <= len(order_arr), "split sizes exceed the data"
    return parts


# ---------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=4)
def _digits(seed: int) -> Splits:
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # white ink on black
    imgs = _resize_stack(imgs, 32)
    labels = d.target.astype(np.int64)
    parts = _stratified_split(labels, {"train": 1000, "val": 297, "test": 500}, seed)
    return {k: (imgs[v], labels[v]) for k, v in parts.items()}


# ---------------------------------------------------------------------- textures

TEXTURE_CLASSES = ["brick", "grass", "gravel"]
# rows of each 512x512 texture reserved for each split, so no crop is shared
_TEXTURE_ROWS = {"train": (0, 320), "val": (320, 400), "test": (400, 512)}
_TEXTURE_COUNTS = {"train": 200, "val": 50, "test": 100}  # per class


@functools.lru_cache(maxsize=4)
def _textures(seed: int) -> Splits:
    import skimage.data
    sources = [np.asarray(getattr(skimage.data, n)()) for n in TEXTURE_CLASSES]
    out: Splits = {}
    for si, split in enumerate(("train", "val", "test")):
        rng = np.random.RandomState(seed * 1000 + si)
        r0, r1 = _TEXTURE_ROWS[split]
        imgs, labels = [], []
        for c, src in enumerate(sources):
            for _ in range(_TEXTURE_COUNTS[split]):
                s = int(rng.randint(24, min(72, r1 - r0) + 1))
                y = int(rng.randint(r0, r1 - s + 1))
                x = int(rng.randint(0, src.shape[1] - s + 1))
                crop = src[y:y + s, x:x + s]
                crop = np.rot90(crop, int(rng.randint(4)))
                if rng.rand() < 0.5:
                    crop = crop[:, ::-1]
                crop = np.ascontiguousarray(crop)
                imgs.append(np.asarray(Image.fromarray(crop).resize((32, 32), Image.BILINEAR)))
                labels.append(c)
        imgs_a, labels_a = np.stack(imgs), np.asarray(labels, dtype=np.int64)
        perm = rng.permutation(len(labels_a))
        out[split] = (imgs_a[perm], labels_a[perm])
    return out


# ---------------------------------------------------------------------- faces

FACE_CLASSES = ["face", "non_face"]


@functools.lru_cache(maxsize=4)
def _faces(seed: int) -> Splits:
    import skimage.data
    a = np.asarray(skimage.data.lfw_subset())  # (200, 25, 25) float in [0, 1]
    imgs = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    imgs = _resize_stack(imgs, 32, Image.BICUBIC)
    labels = np.r_[np.zeros(100), np.ones(100)].astype(np.int64)  # first 100 are faces
    parts = _stratified_split(labels, {"train": 120, "val": 20, "test": 60}, seed)
    return {k: (imgs[v], labels[v]) for k, v in parts.items()}


# ---------------------------------------------------------------------- dSprites

DSPRITES_SHAPES = ["square", "ellipse", "heart"]
DSPRITES_SCALES = np.linspace(0.5, 1.0, 6)
DSPRITES_ORIENTATIONS = np.linspace(0.0, 2 * np.pi, 40)   # as in the dSprites latents
DSPRITES_POSITIONS = np.linspace(0.0, 1.0, 32)
DSPRITES_SIZE = 64
_SPRITE_RADIUS = 10.0      # half-extent in pixels of a scale-1 sprite
_SPRITE_MARGIN = 10.0      # centre of pos 0 / pos 1 lies this far from the border


def _unit_shape(shape: str) -> np.ndarray:
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    if shape == "ellipse":
        return np.stack([np.cos(t), 0.5 * np.sin(t)], 1)
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        pts = np.stack([x, -y], 1) / 17.0   # image y axis points down
        return pts - pts.mean(0)
    raise ValueError(shape)


_UNIT = {s: _unit_shape(s) for s in DSPRITES_SHAPES}


def render_sprite(shape: int, scale: int, orientation: int, x: int, y: int) -> np.ndarray:
    """Rasterise one dSprites sprite from latent *indices* as a binary 64x64 uint8
    image (0 / 255): white shape on black."""
    pts = _UNIT[DSPRITES_SHAPES[shape]] * (_SPRITE_RADIUS * DSPRITES_SCALES[scale])
    th = DSPRITES_ORIENTATIONS[orientation]
    c, s = math.cos(th), math.sin(th)
    pts = pts @ np.array([[c, s], [-s, c]])
    span = DSPRITES_SIZE - 2 * _SPRITE_MARGIN
    cx = _SPRITE_MARGIN + DSPRITES_POSITIONS[x] * span
    cy = _SPRITE_MARGIN + DSPRITES_POSITIONS[y] * span
    im = Image.new("L", (DSPRITES_SIZE, DSPRITES_SIZE), 0)
    ImageDraw.Draw(im).polygon([(float(px + cx), float(py + cy)) for px, py in pts], fill=255)
    return np.asarray(im)


def vtab_rebin(original: np.ndarray, num_original: int, num_classes: int) -> np.ndarray:
    """VTAB relabelling: floor(original / (num_original / num_classes))."""
    return np.floor(np.asarray(original) / (num_original / num_classes)).astype(np.int64)


_DSPRITES_SIZES = {"train": 800, "val": 200, "test": 1000}


@functools.lru_cache(maxsize=4)
def _dsprites_latents(seed: int) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Latent indices (N, 5) = shape, scale, orientation, x, y, drawn uniformly
    from the dSprites grids, and the rendered images (N, 64, 64)."""
    rng = np.random.RandomState(seed)
    total = sum(_DSPRITES_SIZES.values())
    lat = np.stack([rng.randint(0, n, total) for n in (3, 6, 40, 32, 32)], 1)
    imgs = np.stack([render_sprite(*map(int, row)) for row in lat])
    out, start = {}, 0
    for k, n in _DSPRITES_SIZES.items():
        out[k] = (imgs[start:start + n], lat[start:start + n])
        start += n
    return out


def _dsprites(task: str, seed: int) -> Splits:
    col, n_orig = {"loc": (3, 32), "ori": (2, 40)}[task]
    out = {}
    for k, (imgs, lat) in _dsprites_latents(seed).items():
        out[k] = (imgs, vtab_rebin(lat[:, col], n_orig, 16))
    return out


# ---------------------------------------------------------------------- shapes_count

_COUNT_SIZES = {"train": 800, "val": 200, "test": 1000}
_COLORS = np.array([[230, 60, 60], [60, 180, 75], [60, 110, 230], [240, 200, 40],
                    [170, 80, 200], [40, 200, 200], [245, 130, 50], [240, 240, 240]], np.uint8)


def render_count_scene(n: int, rng: np.random.RandomState, size: int = 64) -> np.ndarray:
    """n non-overlapping shapes (circle/square/triangle, random colour and size)
    on a dim gradient background, RGB uint8."""
    g0, g1 = rng.randint(20, 70), rng.randint(20, 70)
    ramp = np.linspace(g0, g1, size)
    bg = np.repeat(np.repeat(ramp[:, None, None], size, 1), 3, 2)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    placed: List[Tuple[float, float, float]] = []
    tries = 0
    while len(placed) < n:
        tries += 1
        if tries > 5000:   # restart (never happens for n <= 10 at 64 px in practice)
            return render_count_scene(n, rng, size)
        r = rng.uniform(3.5, 6.0)
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        if any((cx - px) ** 2 + (cy - py) ** 2 < (r + pr + 3.0) ** 2 for px, py, pr in placed):
            continue
        placed.append((cx, cy, r))
        color = tuple(int(v) for v in _COLORS[rng.randint(len(_COLORS))])
        kind = rng.randint(3)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif kind == 1:
            h = r * 0.7   # inside the radius-r disc, so shapes never touch
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
        else:
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a))
                   for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
            draw.polygon(pts, fill=color)
    return np.asarray(im)


@functools.lru_cache(maxsize=4)
def _shapes_count(seed: int) -> Splits:
    out = {}
    for si, (k, n) in enumerate(_COUNT_SIZES.items()):
        rng = np.random.RandomState(seed * 1000 + 17 + si)
        labels = np.arange(n) % 8
        labels = labels[rng.permutation(n)]
        imgs = np.stack([render_count_scene(int(l) + 3, rng) for l in labels])
        out[k] = (imgs, labels.astype(np.int64))
    return out


# ---------------------------------------------------------------------- registry glue

EMBEDDED = {
    # name: (generator(seed) -> Splits, classes)
    "digits": (_digits, [str(i) for i in range(10)]),
    "textures": (_textures, TEXTURE_CLASSES),
    "faces": (_faces, FACE_CLASSES),
    "dsprites_loc": (lambda seed: _dsprites("loc", seed), [f"x_bin_{i}" for i in range(16)]),
    "dsprites_ori": (lambda seed: _dsprites("ori", seed), [f"ori_bin_{i}" for i in range(16)]),
    "shapes_count": (_shapes_count, [f"{n}_objects" for n in range(3, 11)]),
}

VTAB_STYLE = {"dsprites_loc", "dsprites_ori", "shapes_count"}
_VTAB_ALIASES = {"train800": ("train",), "val200": ("val",), "train800val200": ("train", "val")}


def single_split_aliases(name: str) -> Dict[str, str]:
    """The VTAB names that are one split of ``name`` (``train800`` is its ``train``)."""
    if name not in VTAB_STYLE:
        return {}
    return {alias: parts[0] for alias, parts in _VTAB_ALIASES.items() if len(parts) == 1}


def embedded_splits(name: str) -> Tuple[str, ...]:
    base = ("train", "val", "test", "trainval")
    return base + (tuple(_VTAB_ALIASES) if name in VTAB_STYLE else ())


def build_embedded(name: str, split: str, transform=None, seed: int = 0) -> ArrayDataset:
    gen, classes = EMBEDDED[name]
    data = gen(int(seed))
    if split in data:
        parts = (split,)
    elif split == "trainval":
        parts = ("train", "val")
    elif name in VTAB_STYLE and split in _VTAB_ALIASES:
        parts = _VTAB_ALIASES[split]
    else:
        raise DatasetError(f"{name}: unknown split {split!r}; available: "
                           f"{', '.join(embedded_splits(name))}")
    imgs = np.concatenate([data[p][0] for p in parts])
    labels = np.concatenate([data[p][1] for p in parts])
    return ArrayDataset(imgs, labels.tolist(), classes, transform, name=name, split=split)
