"""The gate-activation figures of one image for several models (library code of
``svp visualize`` and ``svp demo``)."""
from __future__ import annotations

import numbers
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import VizError
from ..io import atomic_write_json
from .gates import DIRECTIONS, QUANTITIES, GateMaps, analyze, find_vim

DEFAULT_QUANTITIES = ("update", "forget", "propagation")
# below 10 dpi matplotlib's font engine fails ("invalid ppem value"); 6000 (a typo of 600) drew a
# 72,000 x 39,600 px figure in ~21 GB for 154 s: refused at once instead
DPI_RANGE = (10, 1200)


def model_input_size(vim) -> Tuple[int, int]:
    return tuple(int(s) for s in vim.patch_embed.img_size)


def model_mean_std(vim) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    cfg = getattr(vim, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def prepare_image(img, size: Tuple[int, int], mean, std) -> Tuple[torch.Tensor, np.ndarray]:
    """PIL image (or an image file's path) -> ((1, 3, H, W) normalised tensor, (H, W, 3) display
    array in [0, 1]). The image is resized to exactly ``size`` (no crop), so boxes and masks
    given in the original image's pixels map linearly onto the model input. 16-bit and float
    images are scaled to 8 bits by their range, as ``svp visualize``, training and prediction
    read them (``svp.data.load_image``); Pillow's ``convert("RGB")`` clipped them at 255."""
    from PIL import Image

    from ..data import DatasetError, load_image
    from ..data.base import to_rgb
    if isinstance(img, (str, os.PathLike)):
        try:
            img = load_image(img)
        except (DatasetError, OSError) as e:
            raise VizError(f"image {os.fspath(img)}: cannot be read as an image ({e})") from e
    elif not isinstance(img, Image.Image):
        raise VizError(f"image: expected a PIL image or an image file's path; got {type(img).__name__} (a "
                       f"normalised tensor goes to svp.viz.analyze directly)")
    img = to_rgb(img).resize((size[1], size[0]), Image.BICUBIC)
    disp = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(disp).permute(2, 0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None], disp


def mask_to_grid(mask: np.ndarray, size: Tuple[int, int], vim) -> Tuple[np.ndarray, np.ndarray]:
    """Object mask in original pixels -> (mask at model input size, (gh, gw) 0/1 patch mask:
    a patch is 'object' when at least half of its pixels are). A mask value is the share of
    that pixel inside the object: 0/1 for a drawn mask, a fraction on a box's edge pixels
    (values are clipped to [0, 1]).

    The coverage is the exact area average of the original pixels, so a patch's share counts
    every pixel it spans; a nearest-neighbour resize first kept only sampled pixels (a box
    covering 43% of a patch counted as object at 224 px)."""
    m = np.clip(np.asarray(mask, dtype=np.float64), 0.0, 1.0)
    frac = (_area_weights(m.shape[0], size[0]) @ m @ _area_weights(m.shape[1], size[1]).T).astype(np.float32)
    pe = vim.patch_embed
    cover = torch.nn.functional.avg_pool2d(torch.from_numpy(frac)[None, None], kernel_size=pe.patch_size,
                                           stride=pe.stride)[0, 0].numpy()
    return (frac >= 0.5).astype(np.float32), (cover >= 0.5 - 1e-6).astype(np.float32)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): row i holds the share of each input pixel in output pixel i's span
    [i n_in / n_out, (i + 1) n_in / n_out): a resize that averages areas exactly."""
    lo = np.arange(n_out)[:, None] * n_in / n_out
    hi = lo + n_in / n_out
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) * n_out / n_in


def default_layers(depth: int, n: int = 4) -> List[int]:
    if depth <= n:
        return list(range(depth))
    return sorted({int(round(i * (depth - 1) / (n - 1))) for i in range(n)})


def check_dpi(dpi, name: str = "dpi") -> float:
    """A resolution in DPI_RANGE: an int, a float or a numpy scalar, as matplotlib takes it."""
    lo, hi = DPI_RANGE
    if isinstance(dpi, bool) or not isinstance(dpi, numbers.Real) or not lo <= dpi <= hi:   # (nan too)
        raise VizError(f"{name} {dpi!r}: expected a resolution from {lo} to {hi} dots per inch")
    return dpi


def check_alpha(alpha, name: str = "alpha") -> float:
    """An opacity in 0..1 (nan refused): a float, an int or a numpy scalar."""
    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and 0.0 <= alpha <= 1.0):
        raise VizError(f"{name} {alpha!r}: expected an opacity in 0..1")
    return alpha


def check_choices(layers, quantities, direction: str, depth: int) -> Tuple[List[int], List[str]]:
    """``visualize``'s layers (negative from the end), quantities and direction, refused by name
    before any model runs: a layer out of range was an IndexError, an unknown quantity a KeyError,
    after every model had run, and each failure left its figure open."""
    if layers is None:
        layers = default_layers(depth)
    if not isinstance(layers, (numbers.Integral, str)):
        layers = list(layers)   # (read once: a generator's items were used up by the check, and no layer drawn)
    if isinstance(layers, (numbers.Integral, str)) or not layers or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in layers):
        raise VizError(f"layers={layers!r}: expected a list of one or more layer indices (integers, negative "
                       f"from the end)")
    layers = [int(v) for v in layers]
    for i, v in enumerate(layers):
        if not -depth <= v < depth:
            raise VizError(f"layers={layers!r}: layer {v} is out of range for depth {depth} "
                           f"(from {-depth} to {depth - 1})")
        if v % depth in [w % depth for w in layers[:i]]:   # ([0, 0, 1] drew layer 0 twice)
            raise VizError(f"layers={layers!r}: layer {v % depth} is given twice; name each layer once")
    if isinstance(quantities, str) or not (quantities := list(quantities)):
        raise VizError(f"quantities={quantities!r}: expected a list of one or more of {', '.join(QUANTITIES)}")
    for q in quantities:
        if q not in QUANTITIES:
            raise VizError(f"quantities: unknown {q!r}; choose from {', '.join(QUANTITIES)}")
    if direction not in DIRECTIONS:
        raise VizError(f"direction={direction!r}: expected one of {', '.join(DIRECTIONS)}")
    return [v % depth for v in layers], quantities


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def write_json(path: str, obj) -> None:
    """``obj`` as strict JSON: a non-finite number (a propagation mean over patches the class
    token cannot be reached from, all -inf) is written null (svp.io.json_text)."""
    atomic_write_json(path, obj)


def visualize(image, models: Dict[str, torch.nn.Module], out_dir: str, prefix: str,
              layers: Optional[Sequence[int]] = None, quantities: Sequence[str] = DEFAULT_QUANTITIES,
              direction: str = "both", mask: Optional[np.ndarray] = None, dpi: int = 100,
              alpha: float = 1.0) -> List[str]:
    """Analyse ``image`` (PIL) with every model in ``models`` (label -> module) and write the
    figures into ``out_dir``. ``mask``: optional (H, W) object mask in the image's pixels: 1 inside,
    0 outside, a fraction for a pixel partly inside (a box's edges).
    Returns the written paths."""
    from .plots import plot_comparison, plot_difference, plot_model_heatmaps, plot_region_curves, region_curves
    if not models:
        raise VizError("no model to visualise")
    check_dpi(dpi)
    check_alpha(alpha)
    names: Dict[str, str] = {}
    for k in models:   # labels are file names too: two that sanitise alike overwrote one file
        if _safe(k) in names:
            raise VizError(f"the labels {names[_safe(k)]!r} and {k!r} both give files named {_safe(k)!r}; "
                           f"label one of them otherwise (--adapter LABEL=DIR)")
        names[_safe(k)] = k
    prefix = _safe(prefix)   # a dataset name's "/" made a subfolder; "../" left out_dir
    vims = {k: find_vim(m) for k, m in models.items()}
    first = next(iter(vims.values()))
    size = model_input_size(first)
    depth = len(first.layers)
    for k, v in vims.items():
        if model_input_size(v) != size or len(v.layers) != depth:
            raise VizError(f"model {k!r} has input {model_input_size(v)} / depth {len(v.layers)}, "
                           f"but {next(iter(vims))!r} has {size} / {depth}; compare models of one backbone")
    layers, quantities = check_choices(layers, quantities, direction, depth)
    mean, std = model_mean_std(first)
    x, disp = prepare_image(image, size, mean, std)
    mask_in, mask_grid = (None, None)
    if mask is not None:  # checked before anything is drawn: a refused mask leaves no figures behind
        mask_in, mask_grid = mask_to_grid(mask, size, first)
        if mask_grid.sum() == 0 or mask_grid.sum() == mask_grid.size:
            # (a --mask file's grey levels are checked where it is read: this is the patch grid's share)
            raise VizError(f"the object covers {int(mask_grid.sum())} of {mask_grid.size} patches (a patch is "
                           f"object when at least half of its pixels are); need object and background patches "
                           f"for the curves")
    maps: Dict[str, GateMaps] = {k: analyze(m, x) for k, m in models.items()}
    written = []
    for k, g in maps.items():
        written.append(plot_model_heatmaps(g, disp, os.path.join(out_dir, f"{prefix}_{_safe(k)}_maps.png"), layers,
                                           quantities, direction, title=k, alpha=alpha, mask_outline=mask_in,
                                           dpi=dpi))
    if len(maps) > 1:
        for q in quantities:
            written.append(plot_comparison(maps, disp, os.path.join(out_dir, f"{prefix}_compare_{q}.png"), layers,
                                           q, direction, alpha=alpha, mask_outline=mask_in, dpi=dpi))
            written.append(plot_difference(maps, disp, os.path.join(out_dir, f"{prefix}_diff_{q}.png"), layers,
                                           q, direction, mask_outline=mask_in, dpi=dpi))
    if mask_grid is not None:
        curves = region_curves(maps, mask_grid, quantities, direction)
        written.append(plot_region_curves(curves, os.path.join(out_dir, f"{prefix}_curves.png"), quantities,
                                          direction, dpi=dpi))
        jpath = os.path.join(out_dir, f"{prefix}_curves.json")
        write_json(jpath, {"direction": direction, "object_patches": int(mask_grid.sum()),
                           "patches": int(mask_grid.size), "curves": curves})
        written.append(jpath)
    return written
