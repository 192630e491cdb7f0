"""One way to build a model: a backbone from a :class:`ModelSpec`, and, given an adapter
directory, the adapted model. ``svp train/eval/predict/visualize/demo/convert-official-svp``
and ``svp pretrain`` all build through :func:`build_model`.

Where the backbone's weights come from, in this order:

1. ``checkpoint``: an official Vim ``.pth`` or a ``.safetensors`` file;
2. ``pretrained``: timm's pretrained weights (may download from the hub);
3. the bundled mini Vim (``vim_mini_patch4_32``) named without a checkpoint: its bundled weights;
4. ``random_init``: random weights (under ``init_seed`` when given), only when asked for.

Anything else is a :class:`~svp.errors.ConfigError`: nothing is downloaded, and no random
backbone is built, unless asked for.
"""
from __future__ import annotations

import contextlib
import errno
import dataclasses
import json
import numbers
import os
import re
import stat
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .errors import AdapterError, CheckpointError, ConfigError, SVPError, out_of_memory
from .io import shell_word
from .models.loading import UnreadableCheckpoint

BUNDLED_MODEL = "vim_mini_patch4_32"
WEIGHTS_HELP = (f"the bundled {BUNDLED_MODEL} uses its bundled weights unless a checkpoint is given; "
                "other models need a checkpoint, pretrained weights, or an explicit random initialisation")


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to rebuild a backbone (stored as ``backbone.json`` next to adapters)."""

    model: str
    checkpoint: Optional[str] = None
    pretrained: bool = False
    random_init: bool = False
    img_size: Optional[int] = None
    num_classes: Optional[int] = None
    class_names: List[str] = dataclasses.field(default_factory=list)
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    drop_path_rate: Optional[float] = None
    init_seed: Optional[int] = None   # None: draw random parts from the global RNG
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # recipe, dataset, method, epoch...
    # the class names an adapter folder recorded, before adapter_spec fills in "0".."n-1" for one
    # without (svp eval checks these alone); not written by to_dict
    recorded_class_names: List[str] = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def weights(self) -> str:
        """Where the weights come from: checkpoint, pretrained, bundled or random."""
        if self.checkpoint:
            return "checkpoint"
        if self.pretrained:
            return "pretrained"
        if self.model == BUNDLED_MODEL and not self.random_init:
            return "bundled"
        if self.random_init:
            return "random"
        check_model_name(self.model)   # say what is wrong first: the name, not its weights
        raise ConfigError(
            f"model {self.model!r}: no weights given. Pass a checkpoint (--checkpoint / model.checkpoint), "
            f"ask for timm's pretrained weights (--pretrained / model.pretrained=true; may download), or ask "
            f"for a random backbone (--random-init / model.random_init=true)")

    def to_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items()
             if k not in ("extra", "drop_path_rate", "recorded_class_names")}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], source: str = "backbone spec") -> "ModelSpec":
        if not isinstance(d, dict) or not d.get("model"):
            raise ConfigError(f"{source}: expected a mapping with a 'model' name, got {d!r}")
        if not isinstance(d["model"], str):
            raise ConfigError(f"{source}: 'model' must be a timm model name (a string), got {d['model']!r}")
        from .models import MODEL_NAMES
        loader = sorted(k for k in (d.get("kwargs") or {}) if k in _TIMM_LOADER_KWARGS) \
            if isinstance(d.get("kwargs"), dict) else []
        if ":" in d["model"]:   # (hf-hub:, local-dir: fetch a config and weights timm's loader reads)
            raise ConfigError(f"{source}: 'model' {d['model']!r}: a timm model name, not a hub or folder source "
                              f"(svp's Vim models: {', '.join(MODEL_NAMES)})")
        if d["model"] not in MODEL_NAMES and loader:
            # another timm model reads such a file with timm's own loader, which unpickled anything before
            # timm 1.0.31: a downloaded adapter folder's backbone.json ran code (svp's Vim models read
            # every file through svp's loader; a user's own registered Vim variant builds as before)
            raise ConfigError(f"{source}: 'model' {d['model']!r} is not one of svp's Vim models "
                              f"({', '.join(MODEL_NAMES)}), and its kwargs {loader} would have timm's own loader "
                              f"read a file; give the weights as 'checkpoint' (read by svp's loader) instead")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay"):
            cfg = (d.get("kwargs") or {}).get(key) if isinstance(d.get("kwargs"), dict) else None
            remote = sorted(k for k in _REMOTE_CFG_KEYS if cfg.get(k)) if isinstance(cfg, dict) else []
            if remote:
                # a downloaded adapter folder chose where its weights were fetched from, any URL or hub
                # repository, with HF_HUB_OFFLINE=1 too (timm fetches a url through torch.hub: review 70)
                raise ConfigError(f"{source}: kwargs.{key} sets {', '.join(remote)}: a backbone description "
                                  f"may not choose where weights are downloaded from; remove {key} from the "
                                  f"file, and give the weights as 'checkpoint' (a local file) or 'pretrained' "
                                  f"(the model's registered weights)")
        for key, types, what in (("kwargs", dict, "a mapping of model arguments"),
                                 ("class_names", list, "a list of class names"),
                                 ("checkpoint", str, "a file path")):
            if d.get(key) is not None and not isinstance(d[key], types):
                raise ConfigError(f"{source}: {key!r} must be {what}, got {d[key]!r}")
        for key in ("pretrained", "random_init"):
            if key in d and not isinstance(d[key], bool):
                raise ConfigError(f"{source}: {key!r} must be true or false, got {d[key]!r}")
        for key, top in (("img_size", _SIZE_BOUNDS["img_size"]), ("num_classes", _SIZE_BOUNDS["num_classes"]),
                         ("init_seed", 2**63 - 1)):
            v = d.get(key)
            if v is not None and not _bounded_int(v, 0 if key == "init_seed" else 1, top):
                raise ConfigError(f"{source}: {key!r} must be an integer in {0 if key == 'init_seed' else 1}..{top}, "
                                  f"got {v!r}")
        # the sizes together, as build_backbone will use them (a folder refused here is skipped by
        # svp serve, where one that failed to build stopped the server)
        sizes = dict(d.get("kwargs") or {})
        for key in ("img_size", "num_classes"):
            if d.get(key) is not None:
                sizes.setdefault(key, d[key])
        check_model_kwargs(sizes, source)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "recorded_class_names"}
        known = {k: v for k, v in d.items() if k in names}
        # backbone.json files written before random_init existed: no weights recorded means random
        known.setdefault("random_init", not (d.get("checkpoint") or d.get("pretrained")))
        known["kwargs"] = dict(known.get("kwargs") or {})
        known["class_names"] = list(known.get("class_names") or [])
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})


# timm.create_model's arguments that make timm read or fetch weights itself
_TIMM_LOADER_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# the keys of a pretrained_cfg that name a source on the network
_REMOTE_CFG_KEYS = ("url", "hf_hub_id", "hf_hub_filename")


# The largest sizes a backbone read from a file may ask for (Vim-B: depth 24, width 768, 224 px):
# a damaged or hostile backbone.json with depth 1000000 built modules until the machine's memory
# ran out (svp serve reached 9.7 GB in 46 s) before anything was compared with the weights.
_SIZE_BOUNDS = {"depth": 1024, "embed_dim": 16384, "img_size": 8192, "patch_size": 1024, "stride": 1024,
                "d_state": 1024, "d_conv": 64, "expand": 16, "in_chans": 64, "num_classes": 1_000_000}


def _bounded_int(v, low: int, high: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high


# ... and together: five times Vim-B's 98 million parameters (2 GB in float32). Each size within
# its bound still made 34 GB together (width 16384, depth 1024, expand 16).
MAX_BACKBONE_PARAMS = 500_000_000


def vim_params_estimate(kwargs: Dict[str, Any]) -> int:
    """About how many parameters a Vim built with ``kwargs`` holds (the official variants' within
    0.1%), where a size not given takes the largest of the official variants' (Vim-B's width,
    stride 8)."""
    d, depth = int(kwargs.get("embed_dim", 768)), int(kwargs.get("depth", 24))
    n, expand, width = int(kwargs.get("d_state", 16)), int(kwargs.get("expand", 2)), int(kwargs.get("d_conv", 4))
    p = int(kwargs.get("patch_size", 16))
    stride = int(kwargs.get("stride", min(p, 8)))
    img = kwargs.get("img_size", 224)
    h, w = (img * 2)[:2] if isinstance(img, (list, tuple)) else (img, img)
    e, r = expand * d, -(-d // 16)
    block = 3 * d * e + 2 * e * (r + 2 * n) + 2 * r * e + 2 * e * (n + width + 3) + d
    tokens = (max(int(h) - p, 0) // stride + 1) * (max(int(w) - p, 0) // stride + 1) + 1
    head, patch = int(kwargs.get("num_classes", 1000)) * d, int(kwargs.get("in_chans", 3)) * p * p * d
    return depth * block + tokens * d + head + patch


def check_model_kwargs(kwargs: Dict[str, Any], source: str) -> None:
    """The backbone's size arguments read from a file (backbone.json, an adapter's record) or given
    as JSON on a command line, within what any Vim could use, one by one and together; the other
    arguments are the model's to check."""
    for key, top in _SIZE_BOUNDS.items():
        v = kwargs.get(key)
        sides = v if key == "img_size" and isinstance(v, (list, tuple)) and len(v) in (1, 2) else [v]
        if v is not None and not all(_bounded_int(x, 1, top) for x in sides):
            raise ConfigError(f"{source}: model argument {key}={kwargs[key]!r}: expected an integer in 1..{top}")
    sized = {k: v for k, v in kwargs.items() if k in _SIZE_BOUNDS and v is not None}
    if sized and vim_params_estimate(sized) > MAX_BACKBONE_PARAMS:
        raise ConfigError(f"{source}: model arguments {sized} make a Vim of about {vim_params_estimate(sized):,} "
                          f"parameters; expected at most {MAX_BACKBONE_PARAMS:,} (Vim-B has 98 million)")


def check_model_name(name: str) -> None:
    """A model timm knows (svp's Vim models among them), else one line naming them."""
    import timm

    import svp.models  # noqa: F401  (registers vim_* with timm)
    if not timm.is_model(name):
        raise ConfigError(f"model {name!r}: no such model; the Vim models: {', '.join(timm.list_models('vim_*'))} "
                          f"(and timm's ViTs for the baselines: vit_small_patch16_224, vit_base_patch16_224, ...)")


def check_checkpoint_file(path, key: str = "checkpoint", recorded_in: Optional[str] = None) -> None:
    """A checkpoint path names a file (a run checks it before reading its data, as the build does
    before building): CheckpointError naming ``key`` and the path otherwise, and the file that
    recorded the path (``recorded_in``) with what to do."""
    if path and not os.path.isfile(str(path)):
        what = "is a folder; expected a checkpoint file" if os.path.isdir(str(path)) else "file not found"
        if recorded_in:
            raise CheckpointError(f"{key} {str(path)!r} (recorded in {recorded_in}): {what}; if it moved, "
                                  f"pass --checkpoint FILE")
        raise CheckpointError(f"{key} {str(path)!r}: {what}")


def check_device_name(kind: str) -> None:
    """The device's spelling, not whether it is on this machine ('cudaXYZ' and 'cuda:-1' passed
    as CUDA, and torch refused them only on a machine with one: review46)."""
    if kind not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:[0-9]+", str(kind)):
        raise ConfigError(f"device {kind!r}: expected auto, cpu, cuda or cuda:N")


def pick_device(kind: str) -> str:
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device_name(kind)
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {kind!r} but CUDA is not available on this machine")
    return kind


def _pretrained_source(model: str, kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A variant's pretrained_cfg as timm resolves it for ``create_model(model, **kwargs)``: the
    registered one (its tag included), replaced by a ``pretrained_cfg`` mapping and updated by a
    ``pretrained_cfg_overlay`` (the hint named the registered file where an overlay fetched
    another: review 70). Empty where timm knows none."""
    kwargs = kwargs or {}
    whole, overlay = kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
    try:
        import timm
        name = f"{model.split('.')[0]}.{whole}" if isinstance(whole, str) else model
        cfg = timm.models.get_pretrained_cfg(name)
        out = dict(cfg.to_dict()) if cfg is not None else {}
    except Exception:   # (an unknown name or tag is said elsewhere)
        out = {}
    if isinstance(whole, dict):
        out = dict(whole)
    if isinstance(overlay, dict):
        out.update(overlay)
    return out


def _hub_file(model: str, kwargs: Optional[Dict[str, Any]] = None) -> str:
    """Where a variant's pretrained weights are (its pretrained_cfg), for the advice of a failed
    download: the message named no repository or file, and offline nothing on screen did."""
    cfg = _pretrained_source(model, kwargs)
    hub, name = cfg.get("hf_hub_id"), cfg.get("hf_hub_filename")
    if hub and name:   # (HF_ENDPOINT: a mirror, where huggingface_hub downloads from)
        endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{hub}/resolve/main/{name}"
    return cfg.get("url") or "the weights"


def _cached_copy(model: str, kwargs: Optional[Dict[str, Any]] = None) -> str:
    """How to replace the hub cache's copy of a variant's weights. Deleting the snapshot's file
    alone did nothing: huggingface_hub linked it again to the same damaged blob, which is named by
    the file's ETag (review 70). Names both where the cache has them."""
    cfg = _pretrained_source(model, kwargs)
    if cfg.get("file"):   # (timm reads a pretrained_cfg's local file before any hub: it is no cache's copy)
        return f"; it is the file named by the model's pretrained_cfg ({shell_word(str(cfg['file']))})"
    hub, name = cfg.get("hf_hub_id"), cfg.get("hf_hub_filename")
    link = None
    if hub and name:
        try:
            from huggingface_hub import try_to_load_from_cache
            link = try_to_load_from_cache(hub, name)
        except Exception:   # noqa: BLE001  (an older huggingface_hub, a damaged cache: the general advice)
            link = None
    if isinstance(link, str):
        blob = os.path.realpath(link)
        files = (f"{shell_word(link)} and {shell_word(blob)}, the file it links to," if blob != link
                 else shell_word(link))
        return f"; it is the hub cache's copy: delete {files} to download again, or pass --checkpoint"
    return "; it is the hub cache's copy: delete it (and, in a huggingface_hub cache, the blob it links to) " \
           "to download again, or pass --checkpoint"


def _offline_switch(environ=os.environ) -> Optional[str]:
    """The variable that makes huggingface_hub read only its local cache, as it reads them
    (HF_HUB_OFFLINE where set, =0 too, else TRANSFORMERS_OFFLINE), or None."""
    var = "HF_HUB_OFFLINE" if environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
    # (unstripped, as huggingface_hub reads it: "1 " went to the network while svp said offline)
    return var if environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE") else None


def build_backbone(spec: ModelSpec, skip_init: bool = False) -> nn.Module:
    """The timm model of ``spec`` with its weights (see the module docstring).

    ``skip_init`` is for a backbone that adapters go onto next (they bring their heads): with
    weights from a checkpoint, the model is built on the meta device and every tensor read from
    the checkpoint, instead of being drawn at random first (Vim-B 0.7 s, Vim-S 0.2 s of CPU).
    A head the checkpoint lacks is initialised alone. Training does not skip: the random head,
    and the random numbers drawn after it, are part of what makes a run repeat exactly."""
    import timm

    import svp.models  # noqa: F401  (registers vim_* with timm)
    from .models.vit import NotAViTBackbone, as_backbone, is_vit

    weights = spec.weights
    kwargs = dict(spec.kwargs)
    if spec.drop_path_rate is not None:
        kwargs["drop_path_rate"] = float(spec.drop_path_rate)
    if spec.img_size is not None:
        kwargs.setdefault("img_size", int(spec.img_size))
    if spec.num_classes is not None:
        kwargs["num_classes"] = int(spec.num_classes)
    # sizes from a file or a command line (--model-args, --model-kwargs, model.kwargs): one that no
    # Vim could use built modules until the machine's memory ran out
    check_model_kwargs(kwargs, f"model {spec.model!r}")
    check_checkpoint_file(spec.checkpoint)
    lazy = skip_init and weights == "checkpoint"
    if lazy:
        kwargs["weight_init"] = "skip"
    rng = torch.get_rng_state() if spec.init_seed is not None else None
    if spec.init_seed is not None:
        torch.manual_seed(int(spec.init_seed))
    try:
        with torch.device("meta") if lazy else contextlib.nullcontext():
            model = timm.create_model(spec.model, pretrained=weights in ("pretrained", "bundled"), **kwargs)
        try:   # (timm's ViTs with svp's seam: svp.models.vit)
            model = as_backbone(model, spec.model)
        except NotAViTBackbone as e:
            raise ConfigError(str(e)) from None
        if lazy:
            model = _materialise(model, spec)
    except UnreadableCheckpoint as e:
        # (a CheckpointError, so a RuntimeError: read "do not fit" of a file that was never read)
        cached = _cached_copy(spec.model, kwargs) if weights == "pretrained" else ""
        raise CheckpointError(f"model {spec.model!r}: cannot read its {weights} weights ({e}){cached}") from None
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):   # (the tag: "do not fit" before)
            raise ConfigError(f"model {spec.model!r}: {e}") from None
        if weights in ("pretrained", "bundled"):
            # (a process out of file descriptors or memory read "do not fit" of weights that do)
            cannot_read = out_of_memory(e) or any(w in str(e) for w in ("unable to open", "open files"))
            what = f"cannot read its {weights} weights" if cannot_read else f"its {weights} weights do not fit"
            raise CheckpointError(f"model {spec.model!r}: {what} ({e})") from None
        raise
    except (TypeError, ValueError, AssertionError) as e:   # (AssertionError: timm's own argument checks)
        if isinstance(e, SVPError) or not spec.kwargs:  # nothing the user passed: a bug, keep its traceback
            raise
        # an unknown or mistyped model argument (model.kwargs, --model-args, backbone.json's kwargs)
        raise ConfigError(f"model {spec.model!r}: its arguments {spec.kwargs} do not fit "
                          f"({type(e).__name__}: {error_words(e)})") from None
    except (FileNotFoundError, OSError) as e:
        offline = _offline_switch()
        # (a resumed run keeps model.pretrained and refuses --checkpoint: the cache is its way: review 70)
        local = _pretrained_source(spec.model, kwargs).get("file")
        hint = ("" if weights != "pretrained" else
                f"; the model's pretrained_cfg names the local file {shell_word(str(local))}: check its path, or "
                f"pass the weights with --checkpoint" if local else
                f"; with no network, download {_hub_file(spec.model, kwargs)} elsewhere and pass it with "
                f"--checkpoint, or, for a run resumed, put it in the hub cache this machine reads (HF_HUB_CACHE, "
                f"else $HF_HOME/hub, default ~/.cache/huggingface/hub; `hf download` fills one to copy over)" + (
                    f" ({offline} is set: only the local hub cache was read)" if offline else
                    "; set HF_HUB_OFFLINE=1 to read only the local hub cache without waiting on the network"))
        raise CheckpointError(f"model {spec.model!r}: cannot get its {weights} weights ({e}){hint}") from None
    finally:
        if rng is not None:
            torch.set_rng_state(rng)
    if weights == "checkpoint":
        from .models import load_checkpoint_into
        from .models.vit import load_checkpoint as load_vit_checkpoint
        (load_vit_checkpoint if is_vit(model) else load_checkpoint_into)(model, spec.checkpoint)
    return model


def _materialise(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Give a model built on the meta device real (uninitialised) CPU memory, which the
    checkpoint then fills: it must hold every tensor but the head (``strict_load``), so the head
    alone is initialised here. A buffer the state dict does not carry would stay garbage:
    such a model is built the ordinary way."""
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return build_backbone(dataclasses.replace(spec, checkpoint=None, random_init=True))
    model = model.to_empty(device="cpu")
    if hasattr(model, "reset_classifier") and hasattr(model, "num_classes"):
        model.reset_classifier(model.num_classes)
    return model


def build_model(spec: ModelSpec, adapter_dir: Optional[str] = None, files=None) -> nn.Module:
    """The backbone of ``spec``; with ``adapter_dir`` (written by ``PeftModel.save``) the
    adapted :class:`~svp.peft.PeftModel` on it (refused when the base weights differ); ``files``:
    that folder's files already read (:func:`svp.peft.io.read_adapter_files`)."""
    if adapter_dir is None:
        return build_backbone(spec)
    backbone = build_backbone(spec, skip_init=True)
    import svp.peft as peft
    if files is None and not os.path.isdir(adapter_dir):
        raise AdapterError(f"{adapter_dir}: not an adapter folder (expected adapter.safetensors + "
                           f"adapter_config.json written by PeftModel.save)")
    try:
        if files is not None:
            from .peft.base import load_adapter_files
            return load_adapter_files(backbone, files)
        return peft.load_adapter(backbone, adapter_dir)
    except (FileNotFoundError, ValueError) as e:  # a missing file, or tensors that do not fit
        if isinstance(e, AdapterError):
            raise
        # (the folder once: "nw: no adapter.safetensors in nw", review)
        raise AdapterError(str(e) if adapter_dir in str(e) else f"{adapter_dir}: {e}") from None


def read_backbone_spec(path: str, data: Optional[bytes] = None) -> ModelSpec:
    """An adapter folder's ``backbone.json`` (``data``: its bytes, where read already, as ``svp
    serve`` reads an adapter's files) as a ``ModelSpec``; ``AdapterError`` naming the file else."""
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        d = json.loads(data.decode("utf-8"))
    except (ValueError, OSError) as e:  # not JSON, not UTF-8, unreadable
        raise AdapterError(f"{path}: not a readable backbone description ({e}); expected the "
                           f"JSON file svp train writes") from None
    try:
        return ModelSpec.from_dict(d, path)
    except ConfigError as e:
        raise AdapterError(str(e)) from None


def error_words(e: BaseException) -> str:
    """``e``'s message, or for a bare ``assert`` (timm 1.0.21's constructors have some) the line
    that failed: "timm: " alone said nothing (retest 96)."""
    if str(e) or not isinstance(e, AssertionError):
        return str(e)
    import traceback
    frames = traceback.extract_tb(e.__traceback__)
    return f"its check `{frames[-1].line}` failed" if frames and frames[-1].line else "an assertion failed"


def adapter_spec(adapter_dir: str, model: Optional[str] = None, checkpoint: Optional[str] = None,
                 pretrained: bool = False, random_init: bool = False, files=None) -> ModelSpec:
    """The backbone an adapter was trained on: ``<adapter_dir>/backbone.json`` (written by
    ``svp train``), with ``model``/``checkpoint`` overriding it (another ``model`` takes
    only the weights asked for: ``checkpoint``, ``pretrained``, ``random_init`` or bundled).
    ``files``: the folder's files already read (:func:`svp.peft.io.read_adapter_files`), so that
    the spec, the weights and the class names come from one state of the folder."""
    import svp.peft as peft
    from .peft.io import ADAPTER_CONFIG, BACKBONE_SPEC

    check_adapter_folder(adapter_dir)
    if files is not None:
        info = peft.read_adapter_config(adapter_dir, files.data[ADAPTER_CONFIG])
        data = files.data.get(BACKBONE_SPEC)
        spec = (read_backbone_spec(files.path(BACKBONE_SPEC), data=data) if data is not None
                else _spec_without_backbone_json(adapter_dir, info, model))
        return _finish_adapter_spec(spec, info, adapter_dir, model, checkpoint, pretrained, random_init)
    try:
        info = peft.read_adapter_config(adapter_dir)
    except FileNotFoundError as e:
        raise AdapterError(str(e)) from None
    spec_path = os.path.join(adapter_dir, "backbone.json")
    spec = (read_backbone_spec(spec_path) if os.path.isfile(spec_path)
            else _spec_without_backbone_json(adapter_dir, info, model))
    return _finish_adapter_spec(spec, info, adapter_dir, model, checkpoint, pretrained, random_init)


def check_adapter_folder(adapter_dir: str) -> None:
    """``adapter_dir`` is a folder, or a ConfigError saying what it is."""
    if not os.path.isdir(adapter_dir):   # (a missing one was "not a folder" too)
        try:
            st = os.lstat(adapter_dir)
            what = ("a link to nothing" if stat.S_ISLNK(st.st_mode) and not os.path.exists(adapter_dir)
                    else "a file, not a folder")
        except OSError as e:   # (a parent the user may not search is EACCES, not "no such folder")
            what = "no such folder" if e.errno == errno.ENOENT else (e.strerror or str(e))
            from .peft.io import RUN_ADAPTERS
            run, name = os.path.split(os.path.normpath(adapter_dir))
            if what == "no such folder" and name in RUN_ADAPTERS and os.path.isfile(os.path.join(run or ".",
                                                                                                "config.yaml")):
                what += f" (the run {run or '.'} has saved no {name}/ adapter yet: still training, or stopped " \
                        f"before its first save)"
        raise ConfigError(f"adapter folder {adapter_dir!r}: {what}")


def check_recorded_weights(spec: ModelSpec, adapter_dir: str, files, model: Optional[str] = None) -> None:
    """An adapter folder without backbone.json (an older convert-official-svp wrote none) records
    no weights: the builder's "no weights given" offered a random or downloaded backbone, wrong
    for an adapter bound to its base weights (review 74; svp eval, predict and visualize: retest
    75; svp serve says its own). Says what the folder records instead. Not where another
    ``model`` was asked for: the builder's own message says it."""
    from .peft.io import ADAPTER_CONFIG, BACKBONE_SPEC
    if model or files.data.get(BACKBONE_SPEC) is not None:
        return
    try:
        info = json.loads(files.data[ADAPTER_CONFIG].decode("utf-8"))
    except (ValueError, KeyError):
        info = {}
    try:
        spec.weights
    except ConfigError as e:
        if "no weights given" not in str(e):   # (an unknown model name says so itself)
            raise
        raise ConfigError(f"{adapter_dir}: no backbone.json naming the weights the adapter was trained on (an "
                          f"older svp's convert-official-svp wrote none){converted_origin(info)}; pass the "
                          f"backbone with --checkpoint FILE (model {spec.model!r})") from None


def converted_origin(info) -> str:
    """``"; it was converted from FILE, which holds that backbone"`` where an adapter config
    (``adapter_config.json`` read as a dict) records the official checkpoint it was converted from,
    else ``""``: that file is the ``--checkpoint`` to pass (svp eval, predict, visualize, serve)."""
    extra = info.get("extra") if isinstance(info, dict) else None
    source = extra.get("converted_from") if isinstance(extra, dict) else None
    return f"; it was converted from {shell_word(source)}, which holds that backbone" if isinstance(source, str) else ""


AMP_RECORDS = (None, "bfloat16", "float16")


def recorded_precision(recorded) -> Tuple[bool, Optional[str]]:
    """(whether a backbone.json's record, ``recorded``: its ``extra`` or the file read as a dict,
    says the precision its run evaluated in; that precision: the autocast dtype, None for
    float32). An older folder has no record, and a value other than null, "bfloat16" or
    "float16" (edited by hand) counts as none."""
    if not isinstance(recorded, dict) or "amp" not in recorded or recorded["amp"] not in AMP_RECORDS:
        return False, None
    return True, recorded["amp"]


def other_precision(recorded: dict, dtype: Optional[str]) -> bool:
    """Whether a backbone.json's record says its run evaluated in another precision than
    ``dtype`` (the autocast dtype this command runs in, None for float32). svp eval, predict and
    serve say so, as their numbers then differ from the run's."""
    known, ran = recorded_precision(recorded)
    return known and ran != dtype


def _spec_without_backbone_json(adapter_dir: str, info: dict, model: Optional[str]) -> ModelSpec:
    name = model or info.get("base_model_name")
    if not name:
        raise ConfigError(f"{adapter_dir}: no backbone.json; pass --model (and --checkpoint)")
    # adapters converted before convert-official-svp wrote backbone.json keep their model arguments here
    kw = (info.get("extra") or {}).get("model_kwargs") if isinstance(info.get("extra"), dict) else None
    kw = dict(kw) if isinstance(kw, dict) else {}
    try:
        check_model_kwargs(kw, os.path.join(adapter_dir, "adapter_config.json"))
    except ConfigError as e:
        raise AdapterError(str(e)) from None
    return ModelSpec(model=name, init_seed=0, kwargs=kw, extra={"recipe": "svp"})


def _finish_adapter_spec(spec: ModelSpec, info: dict, adapter_dir: str, model, checkpoint, pretrained,
                         random_init) -> ModelSpec:
    # (the names the folder records, before any are filled in: svp eval checks those alone)
    spec.recorded_class_names = [str(n) for n in (info.get("class_names") or spec.class_names or [])]
    if model:
        _check_family(info, adapter_dir, model)
    if model or checkpoint or pretrained or random_init:
        spec.model = model or spec.model
        spec.checkpoint, spec.pretrained, spec.random_init = checkpoint, pretrained, random_init
    spec.num_classes = int(info["num_classes"])
    spec.class_names = list(info.get("class_names") or spec.class_names or
                            [str(i) for i in range(spec.num_classes)])
    if len(spec.class_names) != spec.num_classes:
        raise AdapterError(f"{adapter_dir}: {len(spec.class_names)} class names for {spec.num_classes} classes "
                           f"(adapter_config.json's class_names, else backbone.json's); expected one per class")
    return spec


def _check_family(info: dict, adapter_dir: str, model: str) -> None:
    """A ViT adapter given a Vim (``--model``), or the reverse, said as such before anything is built."""
    import timm

    from .peft.base import family_mismatch
    bare = str(model).split(".")[0]
    asked = "vim" if bare in timm.list_models("vim_*") else "vit" if bare.startswith("vit_") else None
    said = family_mismatch(info, adapter_dir, asked, f"--model {model!r}")
    if said:
        raise ConfigError(said)


def read_adapter_folder(adapter_dir: str, weights: bool = True):
    """An adapter folder's files read once (:func:`svp.peft.io.read_adapter_files`), for
    :func:`adapter_spec` and :func:`build_model` to take the backbone description, the weights
    and the class names from one state of it (read three times, a folder replaced meanwhile,
    e.g. a run's best/ at an epoch's end, gave one adapter's weights under the other's class
    names: review). ``weights=False``: the weights file checked, not read (a check before the load)."""
    from .peft.io import read_adapter_files

    check_adapter_folder(adapter_dir)
    try:
        return read_adapter_files(adapter_dir, weights)
    except FileNotFoundError as e:
        raise AdapterError(str(e)) from None


def check_recorded_checkpoint(spec: ModelSpec, adapter_dir: str, given: Optional[str]) -> None:
    """Where the checkpoint path came from the adapter folder's backbone.json, not the user, and
    names no file: said so, and what to do (``svp serve`` said only "file not found", and a
    folder in its place was not said as the folder's record: review 57)."""
    from .peft.io import BACKBONE_SPEC

    if not given:
        check_checkpoint_file(spec.checkpoint, recorded_in=os.path.join(adapter_dir, BACKBONE_SPEC))


def load_for_inference(adapter_dir: str, model: Optional[str] = None, checkpoint: Optional[str] = None,
                       device: str = "auto", pretrained: bool = False, random_init: bool = False):
    """(adapted model in eval mode on ``device``, its :class:`ModelSpec`, torch device); the
    folder read once (:func:`read_adapter_folder`)."""
    files = read_adapter_folder(adapter_dir)
    spec = adapter_spec(adapter_dir, model, checkpoint, pretrained, random_init, files=files)
    check_recorded_weights(spec, adapter_dir, files, model)
    check_recorded_checkpoint(spec, adapter_dir, checkpoint)
    dev = torch.device(pick_device(device))
    model = build_model(spec, adapter_dir, files=files).to(dev).eval()
    # nothing trains here: frozen, the mixers keep what they derive from their weights (svp.ops.kept)
    model.requires_grad_(False)
    if spec.img_size is None:  # no backbone.json: the model's own input size
        spec.img_size = int(getattr(model, "base_model", model).patch_embed.img_size[0])
    return model, spec, dev
