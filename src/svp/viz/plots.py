"""Figures of gate maps (matplotlib, Agg backend; nothing is shown on screen).

All functions take :class:`~svp.viz.gates.GateMaps` objects plus the image as an
(H, W, 3) float array in [0, 1] (the picture the model saw, before normalisation)
and write one PNG atomically. Patch values are drawn as blocks (no smoothing) over
the object outline (when a mask is given), so what you see is exactly one value per patch;
with ``alpha`` < 1 a grey copy of the image shows through.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..io import atomic_write
from .gates import DIRECTIONS, GateMaps

CMAPS = {"update": "inferno", "update_db": "inferno", "forget": "viridis", "propagation": "magma"}
SHORT = {"update": "update gate (softplus delta)", "update_db": "update gate |delta*B|",
         "forget": "forget gate exp(delta*A)", "propagation": "ln propagation to cls"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` (PNG) atomically; close it."""
    # matplotlib 3.6 truncates inches x dpi to whole pixels (7.2 in at 50 dpi gave 359 px), newer
    # releases round: a quarter pixel above the rounded size gives the same PNG size on both
    w, h = fig.get_size_inches()
    fig.set_size_inches((round(w * dpi) + 0.25) / dpi, (round(h * dpi) + 0.25) / dpi)
    try:
        return atomic_write(os.fspath(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        _plt().close(fig)


def _closes_its_figures(plot):
    """A figure function that fails (a bad argument, a full disk) closes the figures it opened:
    each failed call kept one in pyplot's list, which held its memory for the process's life."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        plt = _plt()
        before = set(plt.get_fignums())
        try:
            return plot(*args, **kwargs)
        except BaseException:
            for n in set(plt.get_fignums()) - before:
                plt.close(n)
            raise
    return wrapper


def _finite_range(arrays: Sequence[np.ndarray]) -> Tuple[float, float]:
    vals = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays] or [np.zeros(0)])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = max(1e-6, abs(hi) * 1e-3)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _outline(ax, mask: Optional[np.ndarray]):
    if mask is None:
        return
    hh, ww = mask.shape
    ax.contour(np.arange(ww) + 0.5, np.arange(hh) + 0.5, mask, levels=[0.5], colors="cyan", linewidths=1.0)


def cell_extent(maps: GateMaps, height: int, width: int) -> Tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) of ``maps``' patch grid over an image of
    ``height`` x ``width`` pixels (the model input, or a resized copy of it), so that each cell
    is centred on the pixels its patch covers: patch k's centre is at p/2 + k*s input pixels.
    Overlapping patches (stride s < patch p, the Vim "+" models) leave a (p - s)/2 border no cell
    is centred in; cells spread evenly over the whole image sat off their patches, up to that
    much at the edges. The whole image where the geometry is unknown."""
    if maps.patch_size is None or maps.stride is None:
        return 0.0, float(width), float(height), 0.0
    span = []
    for n, g, p, s in zip((height, width), maps.grid_size, maps.patch_size, maps.stride):
        size = p + (g - 1) * s   # the input pixels along this axis (the patch grid fits it exactly)
        span.append(((p - s) / 2 * n / size, (size - (p - s) / 2) * n / size))
    (top, bottom), (left, right) = span
    return left, right, bottom, top


def _overlay(ax, image: np.ndarray, values: np.ndarray, cmap: str, vmin: float, vmax: float, alpha: float,
             outline: Optional[np.ndarray] = None, cells: Optional[Tuple[float, float, float, float]] = None):
    """Patch values as blocks (``cells``: their extent, :func:`cell_extent`; the whole image
    without); ``alpha`` < 1 lets a grey copy of the image show through (bright image regions
    then look brighter whatever the value: off by default)."""
    h, w = image.shape[:2]
    if alpha < 1:
        grey = image.mean(-1) if image.ndim == 3 else image
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, alpha=alpha,
                   interpolation="nearest", extent=cells or (0, w, h, 0))
    _outline(ax, outline)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _image_column(axes, image: np.ndarray, row_labels: Sequence[str], mask_outline: Optional[np.ndarray]):
    """Column 0 of a grid figure: the input image once per row, labelled; the colour-bar
    row below it stays empty."""
    for r, label in enumerate(row_labels):
        axes[r, 0].imshow(image, extent=(0, image.shape[1], image.shape[0], 0))
        _outline(axes[r, 0], mask_outline)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=9, parse_math=False)  # a '$' in a label is text
    axes[-1, 0].axis("off")


def _tidy_colorbar(cb, horizontal: bool = False):
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    fmt = ScalarFormatter(useOffset=False)
    fmt.set_powerlimits((-3, 4))
    axis = cb.ax.xaxis if horizontal else cb.ax.yaxis
    cb.locator = MaxNLocator(3 if horizontal else 5)
    cb.formatter = fmt
    cb.update_ticks()
    cb.ax.tick_params(labelsize=7)
    if horizontal:
        for t in axis.get_ticklabels():
            t.set_rotation(0)


def _layer_title(layer: int, depth: int) -> str:
    return f"layer {layer}" if layer >= 0 else f"layer {depth + layer}"


@_closes_its_figures
def plot_model_heatmaps(maps: GateMaps, image: np.ndarray, path: str, layers: Sequence[int],
                        quantities: Sequence[str], direction: str = "both", title: str = "",
                        alpha: float = 1.0, mask_outline: Optional[np.ndarray] = None,
                        panel: float = 2.0, dpi: int = 100) -> str:
    """One model: rows = quantities, columns = the image then one panel per layer. Each
    panel has its own colour bar (layers differ in range; the spatial pattern is the point)."""
    plt = _plt()
    d = DIRECTIONS.index(direction)
    ncol = len(layers) + 1
    fig, axes = plt.subplots(len(quantities), ncol, figsize=(panel * ncol * 1.2, panel * len(quantities) + 0.6),
                             squeeze=False)
    for r, q in enumerate(quantities):
        ax0 = axes[r, 0]
        ax0.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))
        _outline(ax0, mask_outline)
        ax0.set_xticks([])
        ax0.set_yticks([])
        ax0.set_ylabel(SHORT[q], fontsize=8)
        for c, layer in enumerate(layers):
            ax = axes[r, c + 1]
            v = maps.grid[q][0, layer, d].numpy()
            lo, hi = _finite_range([v])
            im = _overlay(ax, image, v, CMAPS[q], lo, hi, alpha, mask_outline, cell_extent(maps, *image.shape[:2]))
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
            _tidy_colorbar(cb)
            if r == 0:
                ax.set_title(_layer_title(layer, maps.depth), fontsize=9)
    fig.suptitle(f"{title}  ({direction} scan{'s' if direction == 'both' else ''})".strip(), fontsize=10,
                 parse_math=False)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


@_closes_its_figures
def plot_comparison(models: Dict[str, GateMaps], image: np.ndarray, path: str, layers: Sequence[int],
                    quantity: str, direction: str = "both", alpha: float = 1.0, panel: float = 2.0,
                    mask_outline: Optional[np.ndarray] = None, dpi: int = 100) -> str:
    """Several models side by side: rows = models, columns = layers, one shared colour
    scale per layer column (with its colour bar under the column), so the models can be
    compared panel against panel."""
    plt = _plt()
    d = DIRECTIONS.index(direction)
    labels = list(models)
    ncol = len(layers) + 1
    fig, axes = plt.subplots(len(labels) + 1, ncol, figsize=(panel * ncol, panel * len(labels) + 0.9),
                             squeeze=False, gridspec_kw={"height_ratios": [1] * len(labels) + [0.08]})
    for c, layer in enumerate(layers):
        vals = [models[m].grid[quantity][0, layer, d].numpy() for m in labels]
        lo, hi = _finite_range(vals)
        im = None
        for r, m in enumerate(labels):
            im = _overlay(axes[r, c + 1], image, vals[r], CMAPS[quantity], lo, hi, alpha, mask_outline,
                          cell_extent(models[m], *image.shape[:2]))
            if r == 0:
                axes[r, c + 1].set_title(_layer_title(layer, models[m].depth), fontsize=9)
        cb = fig.colorbar(im, cax=axes[-1, c + 1], orientation="horizontal")
        _tidy_colorbar(cb, horizontal=True)
    _image_column(axes, image, labels, mask_outline)
    fig.suptitle(f"{SHORT[quantity]} ({direction}); colour scale shared within each column", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


@_closes_its_figures
def plot_difference(models: Dict[str, GateMaps], image: np.ndarray, path: str, layers: Sequence[int],
                    quantity: str, direction: str = "both", panel: float = 2.0,
                    mask_outline: Optional[np.ndarray] = None, dpi: int = 100) -> str:
    """Each model minus the first (the reference, usually the frozen backbone): rows = the
    other models, columns = layers, diverging colours centred on 0 with one symmetric scale
    per column (red: the model's value is higher than the reference's)."""
    plt = _plt()
    d = DIRECTIONS.index(direction)
    labels = list(models)
    if len(labels) < 2:
        raise ValueError("a difference figure needs at least two models")
    ref, others = labels[0], labels[1:]
    ncol = len(layers) + 1
    fig, axes = plt.subplots(len(others) + 1, ncol, figsize=(panel * ncol, panel * len(others) + 0.9),
                             squeeze=False, gridspec_kw={"height_ratios": [1] * len(others) + [0.08]})
    for c, layer in enumerate(layers):
        base = models[ref].grid[quantity][0, layer, d].numpy()
        with np.errstate(invalid="ignore"):  # -inf - -inf where a patch cannot reach the class token: nan, drawn clear
            diffs = [models[m].grid[quantity][0, layer, d].numpy() - base for m in others]
        fin = np.concatenate([x[np.isfinite(x)].ravel() for x in diffs])
        lim = float(np.abs(fin).max()) if fin.size else 0.0
        lim = lim if lim > 0 else 1e-12
        im = None
        for r, diff in enumerate(diffs):
            im = _overlay(axes[r, c + 1], image, diff, "RdBu_r", -lim, lim, 1.0, mask_outline,
                          cell_extent(models[ref], *image.shape[:2]))
            if r == 0:
                axes[r, c + 1].set_title(_layer_title(layer, models[ref].depth), fontsize=9)
        cb = fig.colorbar(im, cax=axes[-1, c + 1], orientation="horizontal")
        _tidy_colorbar(cb, horizontal=True)
    _image_column(axes, image, [f"{m} - {ref}" for m in others], mask_outline)
    fig.suptitle(f"{SHORT[quantity]} ({direction}): difference to {ref}; red = higher", fontsize=10,
                 parse_math=False)
    fig.tight_layout()
    return save_figure(fig, path, dpi)


def region_curves(models: Dict[str, GateMaps], mask_grid: np.ndarray, quantities: Sequence[str],
                  direction: str = "both") -> Dict[str, Dict[str, Dict[str, List[float]]]]:
    """{model: {quantity: {"object": [per layer], "background": [per layer]}}}"""
    out: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for m, g in models.items():
        out[m] = {}
        for q in quantities:
            inside, outside = g.region_means(mask_grid, q, direction)
            out[m][q] = {"object": [float(v) for v in inside], "background": [float(v) for v in outside]}
    return out


@_closes_its_figures
def plot_region_curves(curves: Dict[str, Dict[str, Dict[str, List[float]]]], path: str,
                       quantities: Sequence[str], direction: str = "both", panel: float = 3.0,
                       dpi: int = 100) -> str:
    """Per-layer mean on object patches (solid) vs background patches (dashed), one colour per model."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(quantities), figsize=(panel * 1.3 * len(quantities), panel + 0.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, q in enumerate(quantities):
        ax = axes[0, k]
        for i, (m, per_q) in enumerate(curves.items()):
            col = colours[i % len(colours)]
            obj, bg = per_q[q]["object"], per_q[q]["background"]
            xs = np.arange(len(obj))
            ax.plot(xs, obj, "-o", color=col, ms=3, label=f"{m}: object")
            ax.plot(xs, bg, "--", color=col, label=f"{m}: background")
        ax.set_title(SHORT[q], fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if k == 0:
            for text in ax.legend(fontsize=7).get_texts():
                text.set_parse_math(False)
    fig.suptitle(f"mean over object vs background patches ({direction})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi)
