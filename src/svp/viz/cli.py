"""``svp visualize``: gate-activation and propagation pictures for one image and one or
more models (the frozen backbone and any number of adapters)."""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..build import WEIGHTS_HELP
from ..errors import ConfigError, SVPError, VizError  # noqa: F401 (VizError re-exported)
from ..io import mkdir_error, user_path
from .figures import (DEFAULT_QUANTITIES, DPI_RANGE, check_alpha, check_dpi,  # noqa: F401 (re-exported)
                      default_layers, mask_to_grid, model_input_size, model_mean_std, prepare_image, visualize)
from .gates import DIRECTIONS, QUANTITIES, find_vim


# --------------------------------------------------------------------------- inputs

def load_backbone(name: Optional[str], checkpoint: Optional[str] = None, model_args: Optional[dict] = None,
                  pretrained: bool = False, random_init: bool = False, adapter_dir: Optional[str] = None,
                  backbone_of: Optional[str] = None):
    """The backbone (with ``adapter_dir``: the adapted model) through :func:`svp.build.build_model`.
    An adapter's backbone is the one it recorded (its backbone.json, as svp eval/predict/serve
    rebuild it), ``name``/``checkpoint``/... overriding it; the frozen backbone is that of the
    adapter folder ``backbone_of`` (the first one given), overridden the same way, so that it is the
    one the adapters are put on; without adapters, ``name`` or the bundled mini Vim. (With ``name``
    it was ``name`` as timm builds it by default, without the model arguments the folder recorded:
    retest 77.)
    The bundled mini Vim gets its bundled weights; other models need ``checkpoint``,
    ``pretrained`` or ``random_init``. (Until 2026-12-06 the adapters were put on the bundled mini
    Vim, or on ``--model`` drawn anew, whatever they recorded: refused by their weight hash.)"""
    from ..build import (BUNDLED_MODEL, ModelSpec, adapter_spec, build_model, check_recorded_weights,
                         read_adapter_folder)
    from ..models.vim import PatchGridError
    if checkpoint and pretrained:
        raise VizError("give --checkpoint or --pretrained, not both")
    recorded = adapter_dir or backbone_of
    spec = None
    try:
        if recorded:
            # (an adapter's folder read once, as svp eval/predict read it: build.read_adapter_folder)
            files = read_adapter_folder(adapter_dir) if adapter_dir else None
            spec = adapter_spec(recorded, name, checkpoint, pretrained, random_init, files=files)
            check_recorded_weights(spec, recorded, files if files is not None else read_adapter_folder(recorded),
                                   name)
            spec.kwargs = dict(spec.kwargs, **(model_args or {}))
            return build_model(spec, adapter_dir, files=files).eval()
        spec = ModelSpec(name or BUNDLED_MODEL, checkpoint=checkpoint, pretrained=pretrained,
                         random_init=random_init, kwargs=dict(model_args or {}))
        return build_model(spec).eval()
    except ConfigError as e:
        # (the others name what they refuse; an input size the patch grid cannot take names
        # neither the option nor the model: "image height 30 does not fit the patch grid")
        if not isinstance(e, PatchGridError):
            raise
        error = e
    except (SVPError, RuntimeError, ValueError, OSError) as e:
        error = e
    model = spec.model if spec is not None else name
    if adapter_dir:
        where = f"--adapter {adapter_dir}" + (f" (on backbone {model!r})" if spec is not None else "")
    elif recorded:   # (the frozen backbone, as the first adapter recorded it, with what the command line changed)
        given = [w for w, v in ((f"--model {name}", name), (f"--checkpoint {checkpoint}", checkpoint),
                                ("--pretrained", pretrained), ("--random-init", random_init),
                                (f"--model-args '{json.dumps(model_args)}'", model_args)) if v]
        # (what came from the command line was said to be the adapter's record: retest 82; the
        # model's name read as the last flag's value: retest 84)
        where = (f"the frozen backbone ({f'model {model!r}, ' if spec is not None else ''}as --adapter {recorded} "
                 f"recorded it" + (f", with {', '.join(given)}" if given else "") + ")")
    else:
        where = f"--model {model!r}{' (pretrained)' if pretrained else ''}"
    if isinstance(error, PatchGridError) and model_args and not (recorded and not adapter_dir):
        where += f" with --model-args '{json.dumps(model_args)}'"
    said = str(error)
    if not adapter_dir and said.startswith(f"model {model!r}: "):   # (the name said once)
        said = said[len(f"model {model!r}: "):]
    raise VizError(f"{where}: {said}") from error


def load_input_image(args):
    from ..data import DatasetError, load_image
    if args.image and args.dataset:
        raise VizError("give either an image file or --dataset/--index, not both")
    if args.image:
        if os.path.isdir(args.image):
            raise VizError(f"image {args.image}: is a folder; svp visualize takes one image file per call "
                           f"(docs/visualize.md, \"Limits\")")
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
    # Each pixel holds the share of its area inside the box: a box of fractional pixels covers
    # its edge pixels in part (rounding them moved a small image's box by up to half a pixel).
    return np.outer(_span_cover(y0, y1, height), _span_cover(x0, x1, width)).astype(np.float32)


def _span_cover(lo: float, hi: float, n: int) -> np.ndarray:
    j = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, 1.0)


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
    a = np.asarray(m)
    # refused here, before any model is built, in the file's own grey levels: a mask saved with
    # values 0/1 (not 0/255) was "the object mask covers 0 of 64 patches", with no word of why
    if not (a > 127).any() or (a > 127).all():
        what = "no pixel" if not (a > 127).any() else "every pixel"
        hint = (f"; this mask's go up to {int(a.max())}: saved as 0/1? save the object as 255"
                if 0 < a.max() <= 127 else "")
        raise VizError(f"--mask {path}: {what} is object (a pixel is object where its grey level is above 127 "
                       f"of 255{hint}); need object and background pixels for the curves")
    return (a > 127).astype(np.float32)


def parse_layers(text: Optional[str], depth: int) -> List[int]:
    if text is None:
        return default_layers(depth)
    if not text.strip():   # ('' drew the default layers, as if --layers had not been given)
        raise VizError(f"--layers {text!r}: expected one or more layer indices, e.g. 0,4,-1")
    out: List[int] = []
    given: List[int] = []
    for part in text.split(","):
        try:
            v = int(part)
        except ValueError:
            raise VizError(f"--layers {text!r}: {part!r} is not an integer") from None
        if not -depth <= v < depth:
            raise VizError(f"--layers {text!r}: layer {v} is out of range for depth {depth} "
                           f"(from {-depth} to {depth - 1})")
        if v % depth in out:   # (0,0,1 drew layer 0 twice; -1,7 at depth 8 is one layer, in either order)
            first = given[out.index(v % depth)]
            how = f" (as {first} and {v})" if first != v else ""
            raise VizError(f"--layers {text!r}: layer {v % depth} of {depth} is given twice{how}; name each "
                           f"layer once")
        out.append(v % depth)
        given.append(v)
    return out


def parse_quantities(text: Optional[str]) -> List[str]:
    if text is None:
        return list(DEFAULT_QUANTITIES)
    if not text.strip():   # ('' drew the default quantities, as if --quantities had not been given)
        raise VizError(f"--quantities {text!r}: expected one or more of {', '.join(QUANTITIES)}, or 'all'")
    qs = QUANTITIES if text == "all" else [q.strip() for q in text.split(",")]
    for q in qs:
        if q not in QUANTITIES:
            raise VizError(f"--quantities: unknown {q!r}; choose from {', '.join(QUANTITIES)} or 'all'")
    return list(qs)


# --------------------------------------------------------------------------- main


def _parse_adapter(spec: str) -> Tuple[str, str]:
    label, path = (spec.split("=", 1) if "=" in spec and not os.path.exists(os.path.expanduser(spec))
                   else (None, spec))
    if not path.strip():   # ('' and 'label=' named no folder: a traceback)
        raise VizError(f"--adapter {spec!r}: expected an adapter folder, or LABEL=FOLDER")
    path = user_path(path)
    return (label if label is not None else os.path.basename(os.path.normpath(path))), path


def check_one_base(adapters: List[Tuple[str, str]]) -> None:
    """Refuse adapters trained on different base weights (``base_model_hash`` in their
    adapter_config.json), before any model is built: the frozen backbone is the first adapter's,
    so another adapter's difference figure and curves showed the swap of backbones as its effect.
    A folder whose config cannot be read is left to its load, which says what is wrong with it."""
    from ..peft import read_adapter_config
    first: Optional[Tuple[str, str, str]] = None
    for label, path in adapters:
        try:
            digest = read_adapter_config(path)["base_model_hash"]
        except (SVPError, OSError, ValueError):
            continue
        if first is None:
            first = (label, path, digest)
        elif digest != first[2]:
            raise VizError(f"--adapter: {first[0]!r} ({first[1]}) and {label!r} ({path}) were trained on different "
                           f"base weights (base_model_hash {_short(first[2])} and {_short(digest)} in their "
                           f"adapter_config.json); one call compares every model with one frozen backbone, so draw "
                           f"them in separate runs of svp visualize")


def _short(digest) -> str:
    return str(digest)[:19] + "..." if len(str(digest)) > 22 else repr(digest)


def run(args) -> int:
    try:
        model_args = json.loads(args.model_args) if args.model_args else {}
    except json.JSONDecodeError as e:
        raise VizError(f"--model-args is not valid JSON: {e}") from None
    if not isinstance(model_args, dict):
        raise VizError(f"--model-args must be a JSON object, got {args.model_args!r}")
    check_dpi(args.dpi, "--dpi")
    check_alpha(args.alpha, "--alpha")
    # the arguments alone, before the output folder is made or any model built
    adapters = [_parse_adapter(spec) for spec in args.adapter or []]
    labels = ([] if args.no_frozen else [args.frozen_label]) + [label for label, _ in adapters]
    for label in labels:
        if labels.count(label) > 1:
            raise VizError(f"two models are labelled {label!r}; use --adapter LABEL=DIR")
    if not labels:
        raise VizError("--no-frozen without --adapter leaves nothing to show")
    if args.mask and args.box:
        raise VizError("give --mask or --box, not both")
    check_one_base(adapters)
    quantities = parse_quantities(args.quantities)
    # the image and its region too (--layers alone needs the model's depth)
    image, stem = load_input_image(args)
    mask = None
    if args.mask:
        mask = load_mask(args.mask, *image.size)
    elif args.box:
        mask = parse_box(args.box, *image.size)
    try:  # before any model is built: a folder that cannot be made fails in a second, not after
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise VizError(f"--out {args.out}: cannot create the output folder ({mkdir_error(args.out, e)})") from None
    from ..io import remove_dead_writers_temps
    remove_dead_writers_temps(args.out)   # what a run killed mid-write left (its figures are atomic)
    models: Dict[str, torch.nn.Module] = {}
    if not args.no_frozen:
        models[args.frozen_label] = load_backbone(args.model, args.checkpoint, model_args, args.pretrained,
                                                  args.random_init, backbone_of=adapters[0][1] if adapters else None)
    for label, path in adapters:
        models[label] = load_backbone(args.model, args.checkpoint, model_args, args.pretrained,
                                      args.random_init, path)
    for label, m in models.items():   # (a ViT's adapter: a traceback, retest 95; one line now)
        try:
            find_vim(m)
        except ValueError as e:
            raise VizError(f"{label}: {e} (the gates are a Mamba mixer's; a ViT has none)") from None
    depth = len(find_vim(next(iter(models.values()))).layers)
    layers = parse_layers(args.layers, depth)
    try:
        written = visualize(image, models, args.out, args.prefix or stem, layers, quantities, args.direction,
                            mask, dpi=args.dpi, alpha=args.alpha)
    except OSError as e:   # a read-only or full disk: one line (the figures written before are whole)
        raise VizError(f"--out {args.out}: cannot write the figures ({e.strerror or e}"
                       f"{': ' + e.filename if isinstance(e.filename, str) else ''})") from None
    for p in written:
        print(p)
    return 0


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, but not "None", a flag's False, or one its help
    already states (`svp serve --help` said "(default: one per core) (default: None)")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "visualize", help="gate-activation and propagation heat maps for an image",
        description="Run the frozen backbone and/or adapters on one image and write PNG heat maps of the "
                    "Mamba update gate, forget gate and propagation to the class token per layer "
                    "(see docs/visualize.md).",
        formatter_class=DefaultsFormatter)
    p.add_argument("image", nargs="?", type=user_path, help="image file (or use --dataset/--index)")
    p.add_argument("--dataset", help="dataset name (svp.data), e.g. digits")
    p.add_argument("--index", type=int, default=0, help="sample index in --dataset")
    p.add_argument("--split", default="test", help="dataset split")
    p.add_argument("--root", "--data-root", dest="data_root", default=None, type=user_path,
                   help="data root for datasets read from disk (or $SVP_DATA; see docs/datasets.md)")
    p.add_argument("--model", default=None,
                   help="timm name of the backbone (default: the one the first --adapter recorded in its "
                        "backbone.json, else the bundled mini Vim, vim_mini_patch4_32); " + WEIGHTS_HELP)
    # one source of weights: given two, all but one were ignored without a word (review 78)
    weights = p.add_mutually_exclusive_group()
    # (side by side, so that the usage line shows them as one choice: retest 82)
    weights.add_argument("--pretrained", action="store_true",
                         help="timm's pretrained weights (hub download for models other than the bundled mini Vim)")
    weights.add_argument("--random-init", action="store_true", help="a randomly initialised backbone (tests only)")
    weights.add_argument("--checkpoint", default=None, type=user_path, help="backbone weights (.pth / .safetensors)")
    p.add_argument("--model-args", default=None, help='JSON kwargs for the backbone, e.g. \'{"img_size": 32}\'')
    p.add_argument("--adapter", action="append", metavar="[LABEL=]DIR",
                   help="adapter directory (PeftModel.save); repeat for several; label defaults to the dir name")
    p.add_argument("--no-frozen", action="store_true", help="do not show the frozen backbone itself")
    p.add_argument("--frozen-label", default="frozen", help="label of the frozen backbone")
    p.add_argument("--layers", default=None, help="comma-separated layer indices (negative from the end); "
                                                  "default: 4 evenly spaced incl. first and last")
    p.add_argument("--quantities", default=",".join(DEFAULT_QUANTITIES),
                   help=f"comma-separated from {', '.join(QUANTITIES)}, or 'all'")
    p.add_argument("--direction", default="both", choices=DIRECTIONS, help="scan direction to show")
    p.add_argument("--mask", default=None, type=user_path,
                   help="object mask PNG (same size as the image; >127 = object)")
    p.add_argument("--box", default=None,
                   help="object box x0,y0,x1,y1 in image pixels (0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    p.add_argument("--out", default="viz", type=user_path, help="output directory")
    p.add_argument("--prefix", default=None, help="file name prefix (default: image name or dataset_split_index)")
    p.add_argument("--dpi", type=int, default=100, help=f"PNG resolution, {DPI_RANGE[0]} to {DPI_RANGE[1]}")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="opacity of the maps; < 1 shows a grey copy of the image underneath (bright image "
                        "regions then look brighter whatever the value)")
    p.set_defaults(func=run)
