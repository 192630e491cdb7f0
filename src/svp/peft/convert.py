"""Import an official SVP training checkpoint (GitHub zhoujiahuan1991/AAAI2025-SVP) as an
adapter directory with ``compat='official'``.

The official checkpoint is ``{'model': state_dict}`` holding the frozen backbone (Vim names),
the prompt tensors ``prompt_scale`` [24, D], ``prompt_shared_scale`` [depth/S, D],
``prompt_generator.{i}.0/1`` (Inner, D -> r -> D), ``prompt_generator_shared.{j}.0`` (Cross)
and the head (``head.*``, or ``head.0.*`` / ``head.1.*`` for the two-layer head). It is
read with ``torch.load(weights_only=True)``; nothing in it is executed.
"""
from __future__ import annotations

import json
import logging
import numbers
import os
import shutil
from typing import Mapping, Optional, Sequence

import torch

from ..build import ModelSpec, build_model
from ..errors import ConfigError
from ..io import json_text
from ..models.loading import (CheckpointError, checkpoint_filter_fn, load_checkpoint_into, mismatch_lines,
                              read_checkpoint_weights, read_state_dict, strip_wrappers)
from .base import get_peft_model
from .io import BACKBONE_SPEC, nonfinite_tensors, save_adapter
from .registry import make_config

_logger = logging.getLogger(__name__)


def _split(sd: dict, source: str = "<official checkpoint>"):
    backbone, prompts, head = {}, {}, {}
    for k, v in strip_wrappers(sd, source, ("module.", "_orig_mod.")).items():
        if k.startswith("prompt_"):
            prompts[k] = v
        elif k.startswith("head."):
            head[k[len("head."):]] = v
        elif k.startswith("head_dist."):
            continue
        else:
            backbone[k] = v
    return backbone, prompts, head


def _check_counts(**counts) -> None:
    """The command's counts (--num-classes, --shared-layers, --prompt-hidden) as positive
    integers, named by their flags: num_classes=0 was refused as a model argument."""
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ConfigError(f"{name}={v!r} (--{name.replace('_', '-')}): expected a positive integer")


def _check_head(head: dict, two_layer: bool, num_classes: int, dim: int, source: str):
    want = {"0.weight": (dim // 2, dim), "0.bias": (dim // 2,), "1.weight": (num_classes, dim // 2),
            "1.bias": (num_classes,)} if two_layer else {"weight": (num_classes, dim), "bias": (num_classes,)}
    lines = mismatch_lines({"head." + k: v for k, v in want.items()}, {"head." + k: v for k, v in head.items()})
    if lines:
        layout = "two-layer head (head.0.*, head.1.*)" if two_layer else "linear head (head.weight, head.bias)"
        hint = ""
        first, last = ("0.weight", "1.weight") if two_layer else ("weight", "weight")
        if not two_layer and "0.weight" in head:
            hint = "\nthe checkpoint has a two-layer head: pass --two-layer-head"
        elif two_layer and "weight" in head:
            hint = "\nthe checkpoint has a linear head: drop --two-layer-head"
        elif getattr(head.get(first), "ndim", 0) == 2 and head[first].shape[1] != dim:
            hint = (f"\nthe checkpoint's features are {head[first].shape[1]} wide, the model's {dim}: "
                    f"check --model (and --model-kwargs)")
        elif getattr(head.get(last), "ndim", 0) == 2 and head[last].shape[0] != num_classes:
            n = head[last].shape[0]
            hint = f"\nthe checkpoint's head has {n} classes: pass --num-classes {n}"
        raise CheckpointError("\n".join([f"{source}: expected a {layout} for {num_classes} classes and dim {dim}:"]
                                         + lines) + hint)


def _check_out(out: str, overwrite: bool) -> None:
    """A conversion writes a new adapter folder: one already holding files (another adapter, the
    user's notes) was overwritten silently (review 57); ``overwrite`` replaces the adapter files
    of an earlier conversion there."""
    if not os.path.isdir(out) or overwrite:
        return
    try:
        names = sorted(os.listdir(out))
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot read the folder ({e.strerror or e})") from None
    if names:
        raise ConfigError(f"--out {out}: already holds {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}; "
                          f"choose a new folder, or pass --overwrite (overwrite=True) to replace the adapter there")


def _check_class_names(class_names, num_classes: int, source: str) -> None:
    if class_names is None:
        return
    names = list(class_names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ConfigError(f"{source}: class names must be non-empty strings; got {bad[0]!r}")
    if len(names) != num_classes:
        raise ConfigError(f"{source}: {len(names)} class names, but --num-classes is {num_classes}; expected one "
                          f"name per class")
    seen = set()
    twice = [n for n in names if n in seen or seen.add(n)]
    if twice:
        raise ConfigError(f"{source}: the class name {twice[0]!r} is given twice; expected one name per class")


def _check_simam(ckpt, simam: bool, source: str) -> None:
    """SimAM has no weights, so the tensors cannot tell a wrong --simam: an official training
    checkpoint's pickled ``args`` can (``input_relu``, the official flag for it); without them
    it is said that the flag could not be checked."""
    args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
    value = args.get("input_relu") if isinstance(args, Mapping) else getattr(args, "input_relu", None)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        value = value.strip().lower() == "true"   # (parsed as the spec's table reads it: "--input_relu False")
    if not isinstance(value, bool):
        why = "records no args.input_relu" if value is None else f"has args.input_relu={value!r}"
        _logger.warning("%s %s (the official flag for SimAM), so --simam could not be checked: SimAM has no "
                        "weights, and a wrong flag gives other outputs without an error", source, why)
        return
    if value != bool(simam):
        raise ConfigError(f"{source}: its args.input_relu is {value} (SimAM was {'on' if value else 'off'} in "
                          f"training): {'pass' if value else 'drop'} --simam")


def convert_official_svp(checkpoint, model_name: str, shared_layers: int, prompt_hidden: int, num_classes: int,
                         out_dir, simam: bool = False, two_layer_head: bool = False,
                         backbone_checkpoint=None, class_names: Optional[Sequence[str]] = None,
                         model_kwargs: Optional[dict] = None, atol: float = 0.0, overwrite: bool = False,
                         class_names_source: str = "class_names"):
    """Build the adapter directory ``out_dir`` from an official SVP checkpoint and return the
    loaded PeftModel (eval mode). ``checkpoint`` is a path or an already-read dict.

    The recorded base hash is that of the backbone weights inside the official checkpoint, or,
    with ``backbone_checkpoint``, of that file's weights (which must then equal the backbone
    tensors the SVP checkpoint carries, up to ``atol``). ``out_dir`` must be new or empty, or
    ``overwrite`` given; the folder is written whole or not at all (its files in one group; a
    folder this call made is removed again if it stops)."""
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<official checkpoint>"
    out = os.fspath(out_dir)
    _check_counts(num_classes=num_classes, shared_layers=shared_layers, prompt_hidden=prompt_hidden)
    _check_class_names(class_names, num_classes, class_names_source)
    if model_kwargs and "num_classes" in model_kwargs:   # (recorded beside another head's count: review 57)
        raise ConfigError(f"model_kwargs {dict(model_kwargs)!r}: 'num_classes' is set by --num-classes, not here")
    _check_out(out, overwrite)
    ckpt, sd = read_checkpoint_weights(checkpoint, source)
    backbone, prompts, head = _split(sd, source)
    if not prompts:
        raise CheckpointError(f"{source}: no 'prompt_*' tensors; this is not an SVP checkpoint "
                              f"(keys start with {sorted({k.split('.')[0] for k in backbone})[:8]})")
    # named as the file names them (the adapter's own check, at saving, named svp's parameter
    # the tensor became: 'method.beta' for the file's prompt_scale)
    bad = nonfinite_tensors(sd)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:8])}"
                              f"{' ...' if len(bad) > 8 else ''}); expected finite weights (the official run "
                              f"diverged?)")
    # (an integer tensor was cast into the adapter, which a load then calls damaged: review 57)
    ints = [f"{k} ({v.dtype})" for k, v in {**prompts, **{"head." + k: v for k, v in head.items()}}.items()
            if not v.is_floating_point()]
    if ints:
        raise CheckpointError(f"{source}: {', '.join(ints[:4])}{' ...' if len(ints) > 4 else ''}: expected "
                              f"floating-point weights")
    _check_simam(ckpt, simam, source)
    # random parts are replaced by the checkpoint's backbone just below
    model = build_model(ModelSpec(model_name, num_classes=num_classes, kwargs=dict(model_kwargs or {}),
                                  random_init=True))
    dim = model.embed_dim
    _check_head(head, two_layer_head, num_classes, dim, source)

    if backbone_checkpoint is not None:
        load_checkpoint_into(model, backbone_checkpoint)   # (its refusals name that file)
        own = model.state_dict()
        diffs = []
        # compared as loaded: through the same filter as the other file (the position embedding
        # resampled to the model's grid; the raw 197 positions against the other file's resampled
        # ones reported equal backbones as different under another img_size)
        kept = model.head_from_checkpoint
        compared = checkpoint_filter_fn(dict(backbone), model, f"{source} (its backbone tensors)")
        model.head_from_checkpoint = kept
        for k, v in compared.items():
            if k not in own:  # (extract_state_dict has refused anything but tensors)
                diffs.append(f"{k} (not a tensor of {model_name})")
            elif tuple(own[k].shape) != tuple(v.shape):
                diffs.append(f"{k} (shape {tuple(v.shape)}, expected {tuple(own[k].shape)})")
            else:
                d = (own[k].float() - v.float()).abs().max().item() if v.numel() else 0.0
                if d > atol:
                    diffs.append(f"{k} (max |diff| {d:.3g})")
        if diffs:
            raise CheckpointError(f"{source}: its backbone tensors differ from {os.fspath(backbone_checkpoint)}: "
                                  + ", ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")
                                  + "; the SVP checkpoint was trained on another backbone")
    else:
        if not backbone:
            raise CheckpointError(f"{source}: holds no backbone weights; pass --backbone-checkpoint")
        load_checkpoint_into(model, {"model": backbone}, source=f"{source} (its backbone tensors)")

    config = make_config("svp", shared_layers=int(shared_layers), hidden=int(prompt_hidden), compat="official",
                         simam=bool(simam), head="two_layer" if two_layer_head else "linear",
                         num_classes=int(num_classes))
    peft = get_peft_model(model, config)
    peft.method.load_official(prompts, source)
    with torch.no_grad():
        for k, v in peft.base_model.head.state_dict().items():
            v.copy_(head[k])
    extra = {"converted_from": os.path.abspath(source) if isinstance(checkpoint, (str, os.PathLike)) else None,
             "backbone_checkpoint": os.path.abspath(os.fspath(backbone_checkpoint))
             if backbone_checkpoint is not None else None,
             "model_kwargs": model_kwargs or {}}
    # the backbone to rebuild for svp eval/predict/serve: the file whose weights the hash is of,
    # built with the same model arguments (another img_size resamples pos_embed: another hash)
    weights = backbone_checkpoint if backbone_checkpoint is not None else checkpoint
    files = {}
    if isinstance(weights, (str, os.PathLike)):
        spec = ModelSpec(model_name, checkpoint=os.path.abspath(os.fspath(weights)), kwargs=dict(model_kwargs or {}),
                         num_classes=int(num_classes),
                         class_names=list(class_names or []), extra={"recipe": "svp"})
        files[BACKBONE_SPEC] = (json_text(spec.to_dict(), indent=2) + "\n").encode("utf-8", "surrogateescape")
    # backbone.json goes in with the adapter's two files: written after them, apart, a stop
    # between left an adapter whose backbone was rebuilt from the default weights (review 57)
    save = dict(base_model_name=model_name, class_names=class_names, extra=extra, extra_files=files)
    if not os.path.lexists(out):
        _save_as_new_folder(peft, out, save)
        return peft.eval()
    # an existing folder is written in place (a folder the user made, with its mode and group; a
    # mount point; the working directory itself), but looked at again first: another conversion may
    # have filled it since this one started (it was then overwritten without --overwrite: retest 73)
    _check_out(out, overwrite)
    save_adapter(peft, out, **save)
    if not files and os.path.isfile(os.path.join(out, BACKBONE_SPEC)):   # from an earlier conversion
        os.remove(os.path.join(out, BACKBONE_SPEC))
    _check_still_ours(peft, out)
    return peft.eval()


def _check_still_ours(peft, out: str) -> None:
    """The adapter in ``out`` is the one this call wrote: two conversions into one empty folder
    at once both said "wrote" while one adapter was lost (review 71)."""
    from .io import ADAPTER_CONFIG, tensors_hash
    try:
        with open(os.path.join(out, ADAPTER_CONFIG), "rb") as f:
            found = json.loads(f.read().decode("utf-8")).get("weights_hash")
    except (OSError, ValueError, AttributeError):
        found = None
    if found != tensors_hash(peft.adapter_state_dict()):
        raise ConfigError(f"--out {out}: another process wrote an adapter there while this conversion ran; "
                          f"this conversion's adapter was not kept (run it again into another folder)")


def _save_as_new_folder(peft, out: str, save: dict) -> None:
    """Write the adapter into a private folder beside a missing ``out``, then rename it to
    ``out``. Two conversions into one new --out both said "wrote" while one adapter was lost (and
    a failed one removed the folder the other had just written): the rename takes a missing (or
    empty) ``out`` only, so the second is refused, and a failure removes only what this call made
    (review 71)."""
    import secrets
    out_abs = os.path.abspath(out)
    parent = os.path.dirname(out_abs)
    made = []   # the parents this call makes (--out a/b/c with no a: a, a/b), outermost first
    top = parent
    while not os.path.exists(top):
        made.insert(0, top)
        top = os.path.dirname(top)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_abs)}.{secrets.token_hex(6)}.tmp")
    os.mkdir(tmp)
    try:
        save_adapter(peft, tmp, **save)
        try:
            os.rename(tmp, out_abs)
        except OSError as e:
            try:
                taken = bool(os.listdir(out_abs))
            except OSError:
                taken = False
            if taken:
                raise ConfigError(f"--out {out}: another process wrote it while this conversion ran; this "
                                  f"conversion's adapter was not kept (run it again into another folder)") from None
            if os.name == "nt" and os.path.isdir(out_abs):   # (Windows renames onto no folder, even an empty one)
                os.rmdir(out_abs)
                os.rename(tmp, out_abs)
            else:
                raise ConfigError(f"--out {out}: cannot move the written adapter in from {tmp} "
                                  f"({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):   # (empty ones only: another process's files stay)
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise


def official_backbone(checkpoint) -> dict:
    """The backbone tensors of an official SVP checkpoint (no ``prompt_*``, no head), to build
    the base model an imported adapter is loaded onto:
    ``load_checkpoint_into(vim, {'model': official_backbone(CKPT)})``."""
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<official checkpoint>"
    backbone, _, _ = _split(read_state_dict(checkpoint, source), source)
    if not backbone:
        raise CheckpointError(f"{source}: holds no backbone weights")
    return backbone


def official_state_dict(peft_model) -> dict:
    """The inverse direction, for round-trip checks: backbone + prompt + head tensors under the
    official names (``{'model': ...}`` layout without the wrapper)."""
    base = peft_model.base_model
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    sd.update(peft_model.method.to_official())
    return sd


def _read_class_names(path):
    if path is None:
        return None
    try:
        # utf-8-sig: a file saved "UTF-8 with BOM" (Windows Notepad) kept the mark in the first name,
        # and svp eval then refused the adapter's classes (as the dataset readers drop it: review)
        with open(path, encoding="utf-8-sig") as f:
            if path.endswith(".json"):
                names = json.load(f)
            else:
                names = [line.strip() for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise ConfigError(f"--class-names {path}: cannot be read ({e}); expected a JSON list or one class "
                          f"name per line") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"--class-names {path}: expected a JSON list of strings or one class name per line")
    return names
