"""Decoded images kept in memory for splits that are read more than once.

A recipe whose steps before ``ToTensor`` are fixed (``Resize`` and ``CenterCrop``: the
``vtab`` recipe for training and evaluation, every recipe's evaluation, ``plain`` without
flips) gives an image the same pixels every epoch, so reading and decoding its file and
resizing it again each time is repeated work: with ToTensor and Normalize 0.9 ms for a
32 x 32 JPEG and 2.5-2.8 ms for a 400 x 300 one at 224 px (``benchmarks/loader.py``), eight of
which a Vim-Tiny SVP training step at batch 8 waited for, in a ~0.58 s step on two cores
(docs/benchmarks.md, "Forty-fifth round"); on a GPU, where the step is much shorter, the loader
is often what the step waits for.

:class:`PixelCache` keeps the fixed steps' output as uint8 pixels (150 KB an image at
224 px) after an image's first read and gives the rest of the recipe (``ToTensor``,
``Normalize``) a PIL image of those pixels: the same pixels, so the same tensors, bit for
bit. :func:`split_fixed` finds the fixed steps of a transform. The engine decides which
splits to keep (``data.cache_images``, svp/engine/setup.py).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torchvision import transforms as T

# steps that give an image the same pixels every time (exact types: a subclass may draw)
FIXED_STEPS = (T.Resize, T.CenterCrop)
# steps after ToTensor that draw no random numbers
FIXED_TENSOR_STEPS = (T.ToTensor, T.Normalize)


def is_fixed(transform) -> bool:
    """Whether ``transform`` is a ``Compose`` of steps that draw no random numbers: then
    seeding the random generators around it (engine.distributed.SeededDataset, 0.35 ms an
    item) changes nothing."""
    steps = getattr(transform, "transforms", None)
    return (isinstance(transform, T.Compose) and bool(steps)
            and all(type(t) in FIXED_STEPS + FIXED_TENSOR_STEPS for t in steps))


def split_fixed(transform) -> Optional[Tuple[T.Compose, T.Compose]]:
    """``(fixed, rest)`` where ``transform`` is a ``Compose`` whose steps before its first
    ``ToTensor`` are all fixed (at least one), else None (a random step, or no PIL step)."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps:
        return None
    for k, step in enumerate(steps):
        if type(step) is T.ToTensor:
            return (T.Compose(list(steps[:k])), T.Compose(list(steps[k:]))) if k else None
        if type(step) not in FIXED_STEPS:
            return None
    return None


def fixed_bytes(fixed: T.Compose) -> Optional[int]:
    """Bytes of one RGB image out of ``fixed`` where its last step sets both sides
    (``CenterCrop``, or ``Resize`` to a pair), else None (a ``Resize`` to one side keeps the
    aspect ratio)."""
    last = fixed.transforms[-1]
    size = [last.size] if isinstance(last.size, int) else list(last.size)
    if len(size) == 1 and type(last) is T.CenterCrop:
        size = size * 2
    return int(size[0]) * int(size[1]) * 3 if len(size) == 2 else None


class PixelCache:
    """Per item index, the pixels ``fixed`` gave the item's image, kept after its first read.

    ``item(i, load)`` returns ``(PIL image, label)``: read through ``load(i) -> (image,
    label)`` and ``fixed`` the first time, from memory after that. Images that are not 8-bit
    RGB after ``fixed`` are returned as they are and not kept. Filled lazily in the process
    that reads; :meth:`fill` reads everything at once (before data-loader workers start, so
    they inherit the pixels instead of each filling a copy that ends with the epoch)."""

    def __init__(self, fixed: Callable, n: int):
        self.fixed = fixed
        self._pixels: List[Optional[np.ndarray]] = [None] * n
        self._labels: List[int] = [0] * n
        self.nbytes = 0
        self.reads = 0   # images read and resized (the rest came from memory)

    def __len__(self) -> int:
        return len(self._pixels)

    def item(self, i: int, load: Callable[[int], tuple], describe: Optional[Callable[[int], str]] = None):
        px = self._pixels[i]
        if px is not None:
            return Image.fromarray(px), self._labels[i]
        img, label = load(i)
        if hasattr(img, "size") and not callable(img.size):   # (the fixed steps hold the resize: checked first)
            from .transforms import check_resized_size
            check_resized_size(self.fixed, *img.size, describe(i) if describe else f"item {i}")
        img = self.fixed(img)
        self.reads += 1
        if isinstance(img, Image.Image) and img.mode == "RGB":
            px = np.asarray(img)
            self._pixels[i], self._labels[i] = px, label
            self.nbytes += px.nbytes
        return img, label

    def fill(self, load: Callable[[int], tuple]) -> None:
        for i in range(len(self)):
            self.item(i, load)
