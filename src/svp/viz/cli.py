"""``svp visualize``: gate-activation and propagation pictures for one image and one or
more models (the frozen backbone and any number of adapters)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..io import atomic_write_json
from .gates import DIRECTIONS, QUANTITIES, GateMaps, analyze, find_vim

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_QUANTITIES = ("update", "forget", "propagation")


from ..errors import VizError  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------- inputs

def load_backbone(name: str, checkpoint: Optional[str] = None, model_args: Optional[dict] = None,
                  pretrained: bool = False):
    """A VisionMamba from a timm name (``vim_mini_patch4_32``, ``vim_small_patch16_224``...)
    with ``model_args`` (e.g. img_size, depth); weights from ``checkpoint``, or timm's
    pretrained weights (``pretrained``: bundled for the mini model, the hub otherwise)."""
    import timm
    import svp  # noqa: F401  (registers the vim models)
    if checkpoint and pretrained:
        raise VizError("give --checkpoint or --pretrained, not both")
    try:
        model = timm.create_model(name, pretrained=pretrained, **(model_args or {}))
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise VizError(f"--model {name!r}{' (pretrained)' if pretrained else ''}: {e}") from e
    if pretrained:
        pass
    elif checkpoint:
        from ..models import load_checkpoint_into
        if not os.path.isfile(checkpoint):
            raise VizError(f"--checkpoint {checkpoint}: no such file")
        load_checkpoint_into(model, checkpoint)
    else:
        print(f"svp visualize: warning: neither --checkpoint nor --pretrained: {name} has random weights",
              file=sys.stderr)
    model.eval()
    return model


def load_adapter_model(backbone, adapter_dir: str):
    if not os.path.isdir(adapter_dir):
        raise VizError(f"--adapter {adapter_dir}: not a directory (expected adapter.safetensors + "
                       "adapter_config.json written by PeftModel.save)")
    try:
        from ..peft import load_adapter
    except ImportError as e:  # pragma: no cover - the PEFT package is part of svp
        raise VizError(f"cannot load adapters: svp.peft is unavailable ({e})") from e
    from ..peft import AdapterError
    try:
        model = load_adapter(backbone, adapter_dir)
    except (AdapterError, ValueError, KeyError, OSError) as e:
        raise VizError(f"--adapter {adapter_dir}: {e}") from e
    model.eval()
    return model


def model_input_size(vim) -> Tuple[int, int]:
    return tuple(int(s) for s in vim.patch_embed.img_size)


def model_mean_std(vim) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    cfg = getattr(vim, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def prepare_image(img, size: Tuple[int, int], mean, std) -> Tuple[torch.Tensor, np.ndarray]:
    """PIL image -> ((1, 3, H, W) normalised tensor, (H, W, 3) display array in [0, 1]).
    The image is resized to exactly ``size`` (no crop), so boxes and masks given in the
    original image's pixels map linearly onto the model input."""
    from PIL import Image
    img = img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    disp = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(disp).permute(2, 0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None], disp


def load_input_image(args):
    from ..data import DatasetError, load_image
    if args.image and args.dataset:
        raise VizError("give either an image file or --dataset/--index, not both")
    if args.image:
        if not os.path.isfile(args.image):
            raise VizError(f"image {args.image}: no such file")
        try:
            img = load_image(args.image)
        except DatasetError as e:
            raise VizError(f"image {args.image}: cannot be read as an image ({e})") from e
        stem = os.path.splitext(os.path.basename(args.image))[0]
        return img, stem
    if args.dataset:
        from ..data import build_dataset
        try:
            ds = build_dataset(args.dataset, args.split, root=args.data_root)
        except (DatasetError, KeyError, ValueError, OSError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise VizError(f"--dataset {args.dataset} --split {args.split}: {msg}") from e
        if not 0 <= args.index < len(ds):
            raise VizError(f"--index {args.index} out of range: {args.dataset}/{args.split} has {len(ds)} images")
        img, label = ds[args.index]
        if isinstance(img, torch.Tensor):
            raise VizError(f"{args.dataset} returned a tensor, expected a PIL image")
        return img.convert("RGB"), f"{args.dataset}_{args.split}_{args.index}"
    raise VizError("no input: give an image file or --dataset NAME --index I")


def parse_box(text: str, width: int, height: int) -> np.ndarray:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise VizError(f"--box {text!r}: expected four numbers x0,y0,x1,y1 in image pixels") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise VizError(f"--box {text!r}: need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                       f"(the image is {width}x{height})")
    mask = np.zeros((height, width), dtype=np.float32)
    mask[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = 1.0
    return mask


def load_mask(path: str, width: int, height: int) -> np.ndarray:
    from ..data import DatasetError, load_image
    if not os.path.isfile(path):
        raise VizError(f"--mask {path}: no such file")
    try:
        m = load_image(path).convert("L")
    except DatasetError as e:
        raise VizError(f"--mask {path}: cannot be read as an image ({e})") from e
    if m.size != (width, height):
        raise VizError(f"--mask {path}: size {m.size[0]}x{m.size[1]} differs from the image's {width}x{height}")
    return (np.asarray(m) > 127).astype(np.float32)


def mask_to_grid(mask: np.ndarray, size: Tuple[int, int], vim) -> Tuple[np.ndarray, np.ndarray]:
    """Object mask in original pixels -> (mask at model input size, (gh, gw) 0/1 patch mask:
    a patch is 'object' when at least half of its pixels are)."""
    from PIL import Image
    m = Image.fromarray((mask * 255).astype(np.uint8)).resize((size[1], size[0]), Image.NEAREST)
    m = (np.asarray(m) > 127).astype(np.float32)
    pe = vim.patch_embed
    cover = torch.nn.functional.avg_pool2d(torch.from_numpy(m)[None, None], kernel_size=pe.patch_size,
                                           stride=pe.stride)[0, 0].numpy()
    return m, (cover >= 0.5).astype(np.float32)


def default_layers(depth: int, n: int = 4) -> List[int]:
    if depth <= n:
        return list(range(depth))
    return sorted({int(round(i * (depth - 1) / (n - 1))) for i in range(n)})


def parse_layers(text: Optional[str], depth: int) -> List[int]:
    if not text:
        return default_layers(depth)
    out = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            raise VizError(f"--layers {text!r}: {part!r} is not an integer") from None
        if not -depth <= v < depth:
            raise VizError(f"--layers {text!r}: layer {v} out of range for depth {depth}")
        out.append(v % depth)
    return out


def parse_quantities(text: Optional[str]) -> List[str]:
    if not text:
        return list(DEFAULT_QUANTITIES)
    qs = QUANTITIES if text == "all" else [q.strip() for q in text.split(",")]
    for q in qs:
        if q not in QUANTITIES:
            raise VizError(f"--quantities: unknown {q!r}; choose from {', '.join(QUANTITIES)} or 'all'")
    return list(qs)


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def write_json(path: str, obj) -> None:
    atomic_write_json(path, obj)


# --------------------------------------------------------------------------- main

def visualize(image, models: Dict[str, torch.nn.Module], out_dir: str, prefix: str,
              layers: Optional[Sequence[int]] = None, quantities: Sequence[str] = DEFAULT_QUANTITIES,
              direction: str = "both", mask: Optional[np.ndarray] = None, dpi: int = 100,
              alpha: float = 1.0) -> List[str]:
    """Analyse ``image`` (PIL) with every model in ``models`` (label -> module) and write the
    figures into ``out_dir``. ``mask``: optional (H, W) 0/1 object mask in the image's pixels.
    Returns the written paths."""
    from .plots import plot_comparison, plot_difference, plot_model_heatmaps, plot_region_curves, region_curves
    if not models:
        raise VizError("no model to visualise")
    vims = {k: find_vim(m) for k, m in models.items()}
    first = next(iter(vims.values()))
    size = model_input_size(first)
    depth = len(first.layers)
    for k, v in vims.items():
        if model_input_size(v) != size or len(v.layers) != depth:
            raise VizError(f"model {k!r} has input {model_input_size(v)} / depth {len(v.layers)}, "
                           f"but {next(iter(vims))!r} has {size} / {depth}; compare models of one backbone")
    mean, std = model_mean_std(first)
    x, disp = prepare_image(image, size, mean, std)
    layers = list(layers) if layers is not None else default_layers(depth)
    maps: Dict[str, GateMaps] = {k: analyze(m, x) for k, m in models.items()}
    mask_in, mask_grid = (None, None)
    if mask is not None:
        mask_in, mask_grid = mask_to_grid(mask, size, first)
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
        if mask_grid.sum() == 0 or mask_grid.sum() == mask_grid.size:
            raise VizError(f"the object mask covers {int(mask_grid.sum())} of {mask_grid.size} patches; "
                           "need object and background patches for the curves")
        curves = region_curves(maps, mask_grid, quantities, direction)
        written.append(plot_region_curves(curves, os.path.join(out_dir, f"{prefix}_curves.png"), quantities,
                                          direction, dpi=dpi))
        jpath = os.path.join(out_dir, f"{prefix}_curves.json")
        write_json(jpath, {"direction": direction, "object_patches": int(mask_grid.sum()),
                           "patches": int(mask_grid.size), "curves": curves})
        written.append(jpath)
    return written


def _parse_adapter(spec: str) -> Tuple[str, str]:
    if "=" in spec and not os.path.exists(spec):
        label, path = spec.split("=", 1)
        return label, path
    return os.path.basename(os.path.normpath(spec)), spec


def run(args) -> int:
    try:
        model_args = json.loads(args.model_args) if args.model_args else {}
        if not isinstance(model_args, dict):
            raise VizError(f"--model-args must be a JSON object, got {args.model_args!r}")
    except json.JSONDecodeError as e:
        print(f"svp visualize: --model-args is not valid JSON: {e}", file=sys.stderr)
        return 2
    try:
        image, stem = load_input_image(args)
        models: Dict[str, torch.nn.Module] = {}
        if not args.no_frozen:
            models[args.frozen_label] = load_backbone(args.model, args.checkpoint, model_args, args.pretrained)
        for spec in args.adapter or []:
            label, path = _parse_adapter(spec)
            if label in models:
                raise VizError(f"two models are labelled {label!r}; use --adapter LABEL=DIR")
            models[label] = load_adapter_model(
                load_backbone(args.model, args.checkpoint, model_args, args.pretrained), path)
        if not models:
            raise VizError("--no-frozen without --adapter leaves nothing to show")
        depth = len(find_vim(next(iter(models.values()))).layers)
        layers = parse_layers(args.layers, depth)
        quantities = parse_quantities(args.quantities)
        mask = None
        if args.mask and args.box:
            raise VizError("give --mask or --box, not both")
        if args.mask:
            mask = load_mask(args.mask, *image.size)
        elif args.box:
            mask = parse_box(args.box, *image.size)
        written = visualize(image, models, args.out, args.prefix or stem, layers, quantities, args.direction,
                            mask, dpi=args.dpi, alpha=args.alpha)
    except VizError as e:
        print(f"svp visualize: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "visualize", help="gate-activation and propagation heat maps for an image",
        description="Run the frozen backbone and/or adapters on one image and write PNG heat maps of the "
                    "Mamba update gate, forget gate and propagation to the class token per layer "
                    "(see docs/visualize.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("image", nargs="?", help="image file (or use --dataset/--index)")
    p.add_argument("--dataset", help="dataset name (svp.data), e.g. digits")
    p.add_argument("--index", type=int, default=0, help="sample index in --dataset")
    p.add_argument("--split", default="test", help="dataset split")
    p.add_argument("--root", "--data-root", dest="data_root", default=None,
                   help="data root for datasets read from disk (or $SVP_DATA; see docs/datasets.md)")
    p.add_argument("--model", default="vim_mini_patch4_32",
                   help="timm name of the backbone (the bundled mini Vim by default)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights (bundled for vim_mini_patch4_32; hub download otherwise)")
    p.add_argument("--model-args", default=None, help='JSON kwargs for the backbone, e.g. \'{"img_size": 32}\'')
    p.add_argument("--checkpoint", default=None, help="backbone weights (.pth / .safetensors)")
    p.add_argument("--adapter", action="append", metavar="[LABEL=]DIR",
                   help="adapter directory (PeftModel.save); repeat for several; label defaults to the dir name")
    p.add_argument("--no-frozen", action="store_true", help="do not show the frozen backbone itself")
    p.add_argument("--frozen-label", default="frozen", help="label of the frozen backbone")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (negative from the end); "
                                                  "default: 4 evenly spaced incl. first and last")
    p.add_argument("--quantities", default=",".join(DEFAULT_QUANTITIES),
                   help=f"comma-separated from {', '.join(QUANTITIES)}, or 'all'")
    p.add_argument("--direction", default="both", choices=DIRECTIONS, help="scan direction to show")
    p.add_argument("--mask", default=None, help="object mask PNG (same size as the image; >127 = object)")
    p.add_argument("--box", default=None, help="object box x0,y0,x1,y1 in image pixels")
    p.add_argument("--out", default="viz", help="output directory")
    p.add_argument("--prefix", default=None, help="file name prefix (default: image name or dataset_split_index)")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="opacity of the maps; < 1 shows a grey copy of the image underneath (bright image "
                        "regions then look brighter whatever the value)")
    p.set_defaults(func=run)
