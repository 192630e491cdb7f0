"""Formula-driven source data for the bundled mini Vim: IFS fractal categories.

In the manner of FractalDB ("Pre-training without Natural Images", Kataoka et al.),
each *category* is an iterated function system (IFS): 2-4 random contractive affine
maps ``p -> A_i p + b_i`` drawn with a seeded generator. An *instance* of a category
is rendered with the chaos game from a slightly perturbed copy of its maps, then
placed with a random rotation, mirror, scale and offset and painted in a random
foreground colour on a random dark background. The label is the category, so the
network has to recognise a shape family under pose and colour changes, which no
evaluation task (digits, textures, faces, dSprites position/orientation, shape
counting) asks for.

Everything is a pure function of ``(seed, split, category, index)`` through numpy
``SeedSequence`` streams: the same arguments give bit-identical images on any
machine, a held-out split shares no instance stream with the training split, and a
test can regenerate a few hundred held-out images in a fraction of a second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["IFSCategory", "make_categories", "render_instances", "generate_split", "SPLITS",
           "FractalDataset"]

# split name -> stream code; each split draws from its own SeedSequence branch.
SPLITS = {"train": 0, "heldout": 1}

_ITERS = 1200          # chaos-game points per image (after the burn-in)
_BURN_IN = 16
_SUPERSAMPLE = 2       # render at 2x and average-pool: anti-aliased thin structures
_COVER_RANGE = (0.10, 0.55)   # accepted fraction of lit pixels of a canonical render


@dataclass(frozen=True)
class IFSCategory:
    A: np.ndarray      # (n_maps, 2, 2)
    b: np.ndarray      # (n_maps, 2)
    p: np.ndarray      # (n_maps,) map probabilities, proportional to |det A|

    @property
    def n_maps(self) -> int:
        return self.A.shape[0]


def _sample_category(rng: np.random.Generator) -> IFSCategory:
    n = int(rng.integers(2, 5))
    A = rng.uniform(-1.0, 1.0, size=(n, 2, 2))
    # contractive maps: rescale any map whose largest singular value exceeds smax
    s = np.linalg.svd(A, compute_uv=False)              # (n, 2)
    smax = rng.uniform(0.55, 0.9, size=n)
    A = A * np.minimum(1.0, smax / s[:, 0])[:, None, None]
    b = rng.uniform(-1.0, 1.0, size=(n, 2))
    det = np.abs(np.linalg.det(A))
    p = np.maximum(det, 0.02)
    return IFSCategory(A, b, p / p.sum())


def _coverage(cat: IFSCategory, rng: np.random.Generator, size: int = 32) -> float:
    img = _render_gray(cat.A[None], cat.b[None], cat.p, rng, size, rotation=np.zeros(1),
                       mirror=np.zeros(1, bool), scale=np.ones(1), offset=np.zeros((1, 2)))
    return float((img[0] > 0.05).mean())


def make_categories(num_classes: int, seed: int) -> List[IFSCategory]:
    """``num_classes`` IFS categories, deterministic in ``seed``. Candidates whose
    canonical render is dust (too few lit pixels) or a blob (too many) are rejected,
    as FractalDB filters degenerate systems."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    cats: List[IFSCategory] = []
    attempt = 0
    while len(cats) < num_classes:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 99, attempt]))
        attempt += 1
        if attempt > 10000 * num_classes:
            raise RuntimeError("could not draw enough non-degenerate IFS categories")
        cat = _sample_category(rng)
        if _COVER_RANGE[0] <= _coverage(cat, rng) <= _COVER_RANGE[1]:
            cats.append(cat)
    return cats


def _chaos_points(A: np.ndarray, b: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Chaos game for n instances at once: A (n, m, 2, 2), b (n, m, 2) -> (n, ITERS, 2)."""
    n = A.shape[0]
    choice = rng.choice(len(p), size=(_BURN_IN + _ITERS, n), p=p)
    pts = np.zeros((n, 2))
    out = np.empty((n, _ITERS, 2))
    rows = np.arange(n)
    for t in range(_BURN_IN + _ITERS):
        k = choice[t]
        pts = np.einsum("nij,nj->ni", A[rows, k], pts) + b[rows, k]
        if t >= _BURN_IN:
            out[:, t - _BURN_IN] = pts
    return out


def _render_gray(A, b, p, rng, size, rotation, mirror, scale, offset) -> np.ndarray:
    """Density images in [0, 1], (n, size, size). Points are rotated/mirrored, fitted
    into the unit square (aspect kept), scaled by ``scale`` and shifted by ``offset``
    (both relative to the image side)."""
    pts = _chaos_points(A, b, p, rng)                                  # (n, T, 2)
    c, s = np.cos(rotation), np.sin(rotation)
    R = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)    # (n, 2, 2)
    R[mirror, :, 0] *= -1
    pts = np.einsum("nij,ntj->nti", R, pts)
    lo, hi = pts.min(1, keepdims=True), pts.max(1, keepdims=True)
    centre = (lo + hi) / 2
    extent = np.maximum((hi - lo).max(-1, keepdims=True), 1e-6)
    pts = (pts - centre) / extent                                      # in [-0.5, 0.5]
    pts = pts * scale[:, None, None] * 0.94 + 0.5 + offset[:, None, :]
    big = size * _SUPERSAMPLE
    ij = np.clip((pts * big).astype(np.int64), 0, big - 1)
    n = pts.shape[0]
    flat = (np.arange(n)[:, None] * big * big + ij[..., 1] * big + ij[..., 0]).ravel()
    hist = np.bincount(flat, minlength=n * big * big).reshape(n, big, big).astype(np.float64)
    dens = 1.0 - np.exp(-hist / 2.0)
    dens = dens.reshape(n, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean((2, 4))
    return np.clip(dens * 1.6, 0.0, 1.0)


def _hsv_to_rgb(h, s, v):
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p_, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(x, -1) for x in
                      ((v, t, p_), (q, v, p_), (p_, v, t), (p_, q, v), (t, p_, v), (v, p_, q))], 0)
    return table[i, np.arange(len(h))]


def render_instances(cat: IFSCategory, n: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """``n`` instances of one category as uint8 RGB, (n, size, size, 3)."""
    m = cat.n_maps
    # FractalDB-style intra-category variation: one map's parameters rescaled a little
    A = np.repeat(cat.A[None], n, 0).copy()
    b = np.repeat(cat.b[None], n, 0).copy()
    which = rng.integers(0, m, size=n)
    w = rng.uniform(0.85, 1.15, size=(n, 2, 2))
    A[np.arange(n), which] *= w
    b[np.arange(n), which] *= rng.uniform(0.85, 1.15, size=(n, 2))
    rotation = rng.uniform(0, 2 * math.pi, size=n)
    mirror = rng.random(n) < 0.5
    scale = rng.uniform(0.65, 1.0, size=n)
    offset = (rng.random((n, 2)) - 0.5) * (1.0 - scale[:, None]) * 0.9
    gray = _render_gray(A, b, cat.p, rng, size, rotation, mirror, scale, offset)  # (n, s, s)
    fg = _hsv_to_rgb(rng.random(n), rng.uniform(0.4, 1.0, n), rng.uniform(0.75, 1.0, n))
    bg = _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.8, n), rng.uniform(0.0, 0.35, n))
    img = bg[:, None, None, :] * (1 - gray[..., None]) + fg[:, None, None, :] * gray[..., None]
    return np.round(img * 255).astype(np.uint8)


def generate_split(split: str, num_classes: int, per_class: int, seed: int = 0, size: int = 32,
                   categories: Sequence[IFSCategory] = None) -> Tuple[np.ndarray, np.ndarray]:
    """All images of a split, class-major: (num_classes * per_class, size, size, 3)
    uint8 and int64 labels. Each (split, class) has one random stream that draws all
    its instances at once, so the images depend on ``per_class``: regenerate a split
    with the same (num_classes, per_class, seed, size) to get the same images."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    cats = list(categories) if categories is not None else make_categories(num_classes, seed)
    if len(cats) != num_classes:
        raise ValueError(f"got {len(cats)} categories for num_classes={num_classes}")
    imgs, labels = [], []
    for c, cat in enumerate(cats):
        rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], c]))
        imgs.append(render_instances(cat, per_class, rng, size))
        labels.append(np.full(per_class, c, dtype=np.int64))
    return np.concatenate(imgs), np.concatenate(labels)


class FractalDataset:
    """Minimal in-memory dataset of a generated split (``(uint8 HWC array, label)``
    items, ``classes``, ``targets``); the pretraining loop reads ``.images`` directly."""

    def __init__(self, split: str, num_classes: int = 32, per_class: int = 500, seed: int = 0,
                 size: int = 32):
        self.images, labels = generate_split(split, num_classes, per_class, seed, size)
        self.targets = labels.tolist()
        self.classes = [f"ifs_{i:03d}" for i in range(num_classes)]
        self.num_classes = num_classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]
