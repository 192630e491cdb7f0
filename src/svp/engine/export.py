"""``svp export``: an adapter folded into its backbone's weights, as one plain Vim checkpoint.

Linear probing, BitFit, full fine-tuning and LoRA change only the backbone's own tensors (LoRA's
W + (alpha / r) B A), so a plain Vim, as timm builds it, computes what the adapted model
computes: ``PeftModel.merge_and_unload``. The file it writes is that model's state dict
(safetensors, timm's key names, the new head's class count), with a description in its metadata
(``svp.export``: the model name and arguments, class names, method and settings, svp version, and
the recipe's evaluation transform as timm's data configuration), loaded by timm through svp's
registered models as the command prints it::

    import svp, timm
    model = timm.create_model("vim_small_patch16_224", num_classes=N, pretrained=True,
                              pretrained_cfg_overlay=dict(file="model.safetensors", input_size=(3, 224, 224),
                                                          interpolation="bicubic", crop_pct=0.875,
                                                          crop_mode="center"))

No adapter machinery runs at inference (a LoRA model's products are the backbone's own), and the
file starts another run (``svp train --checkpoint``; its head is replaced there, as any
checkpoint's). Before writing, the merged model's outputs are compared with the adapted model's on
a batch of random images: a difference beyond rounding is a bug, and nothing is written.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .. import errors as E
from ..io import atomic_save_safetensors, user_path

# the merged model's outputs against the adapted model's, relative to the largest output: rounding
# (float32 sums in another order, LoRA's update formed once) stays below 1e-5 on the mini Vim
TOLERANCE = 1e-4
METADATA_KEY = "svp.export"


def check_output(path: str, overwrite: bool) -> str:
    """Refused before any work: another ending, an existing file without ``overwrite``, and what
    :func:`svp.engine.cli.check_output_file` refuses; returns the path to write."""
    from .cli import check_output_file

    if not path.endswith(".safetensors"):
        raise E.ConfigError(f"--output {path}: expected a file name ending in .safetensors (the loaders "
                            f"read a file by its ending)")
    target = check_output_file(path, "--output")
    if not target.endswith(".safetensors"):   # (a link named .safetensors to model.bin)
        raise E.ConfigError(f"--output {path} leads to {target}; expected a file name ending in .safetensors")
    if os.path.exists(path) and not overwrite:   # (a link to nothing: its target is written)
        raise E.ConfigError(f"--output {path} exists; --overwrite replaces it")
    return target


def check_mergeable(adapter_dir: str) -> dict:
    """The adapter's config (adapter_config.json), refused before the backbone is built where its
    method cannot be merged."""
    from ..build import check_adapter_folder
    from ..peft.base import merge_refusal
    from ..peft.io import read_adapter_config
    from ..peft.registry import get_method

    check_adapter_folder(adapter_dir)
    try:
        cfg = read_adapter_config(adapter_dir)
    except FileNotFoundError as e:
        raise E.AdapterError(str(e)) from None
    method = cfg["method"]
    try:
        get_method(method)
    except ValueError as e:   # (a method of a plugin not loaded here)
        raise E.AdapterError(f"{adapter_dir}: {e}") from None
    why = merge_refusal(method, bool((cfg.get("config") or {}).get("simam", False)))
    if why:
        raise E.AdapterError(f"{adapter_dir}: {why}")
    return cfg


def export_merged(adapter_dir: str, output: str, model: Optional[str] = None, checkpoint: Optional[str] = None,
                  pretrained: bool = False, random_init: bool = False, overwrite: bool = False) -> dict:
    """Merge the adapter in ``adapter_dir`` into its backbone and write the model to ``output``;
    returns what was written (``path``, ``tensors``, ``bytes``, ``max_difference``, ``metadata``)."""
    import torch

    from .._version import __version__
    from ..build import load_for_inference
    from ..data.transforms import adapter_normalization, adapter_recipe, timm_data_config

    target = check_output(output, overwrite)
    cfg = check_mergeable(adapter_dir)
    # on the CPU, in float32: the file is the same wherever it is made
    peft, spec, _ = load_for_inference(adapter_dir, model, checkpoint, "cpu", pretrained, random_init)
    if spec.checkpoint and os.path.exists(target) and os.path.samefile(spec.checkpoint, target):
        # (overwritten, the adapter would be left without the weights it is bound to: retest 89)
        raise E.ConfigError(f"--output {output} is the backbone checkpoint the adapter was trained on "
                            f"({spec.checkpoint}); write the merged model to another file")
    base = peft.base_model
    in_chans = int(base.patch_embed.proj.weight.shape[1])
    size = int(spec.img_size)
    images = torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = peft(images).float()
        merged_model = peft.merge_and_unload().eval()
        merged = merged_model(images).float()
    scale = adapted.abs().max().clamp_min(1e-12)
    difference = float((merged - adapted).abs().max() / scale)
    if not difference <= TOLERANCE and not type(peft.method).__module__.startswith("svp.peft."):
        raise E.AdapterError(f"the merged {cfg['method']} model's outputs differ from the adapter's by "
                             f"{difference:.3g} of the largest; nothing written. The method's class "
                             f"({type(peft.method).__module__}.{type(peft.method).__name__}) says mergeable = True, "
                             f"but its change is not one of the backbone's weights alone (docs/architecture.md, "
                             f"'Adding an adaptation method')")
    if not difference <= TOLERANCE:   # (NaN too)
        raise RuntimeError(f"svp export: the merged {cfg['method']} model's outputs differ from the adapter's by "
                           f"{difference:.3g} of the largest (expected rounding, below {TOLERANCE:g}); nothing "
                           f"written. This is a bug in svp: please report it with the adapter's "
                           f"adapter_config.json")
    tensors = {k: v.detach().cpu().contiguous() for k, v in merged_model.state_dict().items()}
    recipe = adapter_recipe(spec.extra, adapter_dir)
    description = {
        "model": spec.model, "model_kwargs": spec.kwargs, "img_size": size,
        "num_classes": int(merged_model.num_classes), "class_names": list(spec.class_names),
        "method": cfg["method"], "method_config": cfg.get("config"),
        "base_model_hash": cfg.get("base_model_hash"), "recipe": recipe,
        # (the images as svp evaluated the adapter on them, in timm's terms)
        "data_config": timm_data_config(recipe, size, in_chans, *adapter_normalization(spec.extra, adapter_dir)),
        "svp_version": __version__,
        "family": getattr(merged_model, "family", "vim"),
    }
    metadata = {"format": "pt", METADATA_KEY: json.dumps(description, sort_keys=True)}
    atomic_save_safetensors(target, tensors, metadata)
    return {"path": output, "tensors": len(tensors), "bytes": os.path.getsize(output),
            "max_difference": difference, "metadata": description}


def _load_line(path: str, description: dict) -> str:
    """The Python that builds the exported model with timm, its data configuration the images' as
    svp gave them (``timm.data.resolve_data_config({}, model=model)`` reads it)."""
    kwargs = dict(description["model_kwargs"] or {})
    if description["img_size"] and "img_size" not in kwargs:
        kwargs["img_size"] = description["img_size"]
    extra = "".join(f", {k}={v!r}" for k, v in sorted(kwargs.items()) if k != "num_classes")
    # (the overlay's num_classes: timm keeps a file's head only where its pretrained_cfg's class
    # count is the model's, and a ViT's registered 1000 dropped the exported head; its mean/std: the
    # adapter's, and a ViT's registered (0.5, 0.5) are not ImageNet's, svp's default: retest 95)
    data = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in description["data_config"].items())
    # (a ViT's registered cfg may name Google's .npz, read by its own numpy loader (custom_load): timm
    # 1.0.21's vit_tiny does, and the exported safetensors file failed there: the floor's CI run)
    if description.get("family") == "vit":
        data += ", custom_load=False"
    return (f"import svp, timm; model = timm.create_model({description['model']!r}, "
            f"num_classes={description['num_classes']}{extra}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={path!r}, num_classes={description['num_classes']}{data}))")


def cmd_export(args) -> int:
    out = export_merged(args.adapter_dir, args.output, args.model, args.checkpoint, args.pretrained,
                        args.random_init, args.overwrite)
    d = out["metadata"]
    print(f"wrote {out['path']}: {d['model']} with the {d['method']} adapter merged, {d['num_classes']} classes, "
          f"{out['tensors']} tensors, {out['bytes'] / 2 ** 20:.1f} MiB")
    print(f"its outputs against the adapter's on random images: {out['max_difference']:.2g} of the largest")
    print("load it with:")
    print(f"  {_load_line(out['path'], d)}")
    return 0


def register(subparsers) -> None:
    from .cli import _backbone_args

    x = subparsers.add_parser(
        "export", help="fold a linear, bitfit, full or lora adapter into its backbone: one plain Vim (or ViT) "
                       "checkpoint",
        description="Merge the adapter in ADAPTER_DIR into the backbone it was trained on (the one its "
                    "backbone.json records, or --model/--checkpoint) and write the whole model as one "
                    "safetensors file, timm's key names, the new head: a plain Vim or ViT that timm loads with no "
                    "adapter code (the line to load it is printed). For methods whose change is one of the "
                    "backbone's weights: linear, bitfit, full, lora. SVP, VPT and adapters add computation "
                    "and are refused. The merged model's outputs are checked against the adapter's first.")
    x.add_argument("adapter_dir", metavar="ADAPTER_DIR", type=user_path, help="an adapter folder, e.g. runs/<run>/best")
    x.add_argument("--output", "-o", required=True, metavar="FILE.safetensors", type=user_path,
                   help="the model file to write")
    x.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    _backbone_args(x, device=False)
    x.set_defaults(func=cmd_export)
