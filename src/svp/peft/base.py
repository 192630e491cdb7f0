"""The common harness of every adaptation method (modelled on HF peft).

A method is a config dataclass plus a ``PeftMethod`` module, registered by name.
``get_peft_model(vim, config)`` wraps a VisionMamba in a ``PeftModel``:

  images -> [SimAM] -> method.transform_input -> vim.forward_features(hook=method.hook)
         -> vim.forward_head(cls_pos=...) -> logits

Only the method's parameters and the head are trainable; every other backbone
parameter gets ``requires_grad=False``. The backbone's modules are not replaced;
methods that must act inside a block (LoRA, the parallel adapter) attach to it
through ``torch.nn.utils.parametrize`` or forward hooks, and only once per model.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load

from ..models.loading import mismatch_lines
from .heads import HEAD_KINDS, build_head, head_kind, head_num_classes, simam
from .io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, AdapterFiles, base_weights_hash, read_adapter_config,
                 read_adapter_files, save_adapter, settings_differences, tensors_hash)
from .registry import config_from_dict, get_method, list_methods

_ATTACHED = "_svp_peft_attached"


_TYPES = {"int": ((int,), "an integer"), "bool": ((bool,), "true or false"),
          "float": ((int, float), "a number"), "str": ((str,), "a string")}


def _type_name(annotation) -> str:
    """A field's annotation as text: ``"float"``, ``"Optional[int]"``; the string that ``from
    __future__ import annotations`` leaves, or the type itself in a file without it (a new
    method's settings were not checked at all then)."""
    if isinstance(annotation, str):
        parts = [p.strip() for p in annotation.split("|")]
        if len(parts) == 2 and "None" in parts:   # "float | None"
            return f"Optional[{[p for p in parts if p != 'None'][0]}]"
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    args = typing.get_args(annotation)
    if len(args) == 2 and type(None) in args:   # Optional[X], X | None
        return f"Optional[{_type_name([a for a in args if a is not type(None)][0])}]"
    return str(annotation)


def _check_type(method: str, name: str, annotation, value) -> None:
    """Refuse a setting whose value is not of its field's type. bool is no int here, and no int
    is a bool."""
    kind = _type_name(annotation)
    optional = kind.startswith("Optional[")
    kind = kind[len("Optional["):-1] if optional else kind
    if kind not in _TYPES or (optional and value is None):
        return
    types, what = _TYPES[kind]
    if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
        raise ValueError(f"{method}: {name}={value!r}; expected {what}{' or null' if optional else ''}")
    if kind == "float" and not math.isfinite(value):   # a NaN scale predicted "nan%" for every image
        raise ValueError(f"{method}: {name}={value!r}; expected a finite number")
    if kind == "float" and abs(value) > 1e6:   # (1e308 overflowed to inf in the first product)
        raise ValueError(f"{method}: {name}={value!r}; expected a number of magnitude at most 1e6")


@dataclasses.dataclass
class PeftConfig:
    """Settings shared by every method.

    num_classes: size of the new head; None keeps the model's class count.
    head: 'linear' (Linear D->C) or 'two_layer' (Linear D->D/2 -> Linear D/2->C, no activation;
        docs/methods.md, note D6).
    simam: apply parameter-free SimAM to the input image before the patch embedding (docs/methods.md, note D7).
    backbone_train_mode: whether the backbone's own stochastic layers (DropPath) run in training
        mode while the PeftModel trains. None = the method's default (True for full fine-tuning
        and for SVP, as the official SVP code trains; False for the other methods that freeze
        the backbone, i.e. their frozen backbone stays in eval mode).
    """
    num_classes: Optional[int] = None
    head: str = "linear"
    simam: bool = False
    backbone_train_mode: Optional[bool] = None

    method = "base"  # class attribute, set by each subclass

    def __post_init__(self):
        for f in dataclasses.fields(self):  # "false" or 2.5 would otherwise be taken as True or 2
            _check_type(self.method, f.name, f.type, getattr(self, f.name))
        if self.head not in HEAD_KINDS:
            raise ValueError(f"{self.method}: head={self.head!r}; expected one of {HEAD_KINDS}")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes <= 0):
            raise ValueError(f"{self.method}: num_classes must be a positive int or None, got {self.num_classes!r}")

    def validate(self) -> None:
        """Check the settings again: they are checked when the config is made, and a field set
        afterwards (``cfg.r = "8"``) is checked when a model is built from it, not after a run
        has trained and saved an adapter that load_adapter refuses."""
        self.__post_init__()

    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


class PeftMethod(nn.Module):
    """Base of the method modules. Subclasses own their parameters (registered on
    themselves, unless they live inside the backbone, as with LoRA/BitFit/full) and may
    override ``transform_input``, ``hook``, ``trainable_base_names``, ``detach``."""

    uses_hook = False  # whether forward_features must be given self.hook
    default_backbone_train_mode = False
    # svp serve may run this method's samples in one backbone pass beside other adapters' samples
    # (each adapter's transform_input and hook on its own rows): true for a method that acts only
    # through those two, keeps the token sequence's length and class position, and trains no
    # backbone tensor in place. Otherwise each of its adapters is served on its own model.
    serve_shared = False
    # whether what the method learns is a change of the backbone's own tensors (PeftModel.
    # merge_and_unload folds it into them: a plain Vim computes the adapted function); a method
    # that adds computation (prompts, adapter modules) cannot be merged
    mergeable = False

    def __init__(self, config: PeftConfig, model: nn.Module):
        super().__init__()
        self.config = config

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def hook(self, layer_idx: int, hidden, residual, cls_pos: int):
        return hidden, residual, cls_pos

    def trainable_base_names(self, model: nn.Module) -> List[str]:
        """Names (in ``model.named_parameters()``) of backbone parameters this method trains."""
        return []

    def detach(self, model: nn.Module) -> None:
        """Undo what attaching did to ``model`` (hooks, parametrizations)."""

    def merge(self, model: nn.Module) -> None:
        """Detach the method, leaving what it learned in ``model``'s own tensors (for a
        ``mergeable`` method; the ones trained in place already are)."""
        self.detach(model)


def _set_head(model: nn.Module, config: PeftConfig):
    current = model.head
    n_cur = head_num_classes(current)
    n = config.num_classes if config.num_classes is not None else n_cur
    if n is None:
        raise ValueError("the model has no classifier head; set num_classes in the config")
    if head_kind(current) != config.head or n != n_cur:
        model.head = build_head(config.head, model.num_features, n)
        model.num_classes = n
    return n


class PeftModel(nn.Module):
    """A VisionMamba with one adaptation method applied. ``forward(images) -> logits``."""

    def __init__(self, base_model: nn.Module, config: PeftConfig, method: PeftMethod, base_hash: str,
                 requires_grad: Optional[Dict[str, bool]] = None):
        super().__init__()
        self.base_model = base_model
        self.method = method
        self.config = config
        self.base_hash = base_hash
        # the backbone's requires_grad flags before the method froze it, which unload() gives back
        self._requires_grad = dict(requires_grad or {})
        # the adapter: what the method made trainable when it was attached. save() writes these and
        # load_adapter expects them, whatever the flags are when saved: a head frozen before save()
        # was left out of the file, which load_adapter then refused
        self._adapter_names = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def _check_attached(self, what: str) -> None:
        # after unload() the backbone is bare (it may carry another method), and this wrapper
        # computed, depending on the method, the adapted function, the bare backbone's, or failed
        if getattr(self, "_unloaded", False):
            raise RuntimeError(f"{what}: this {self.config.method} PeftModel was unloaded (PeftModel.unload or "
                               f"merge_and_unload): "
                               f"its method is no longer on the backbone; use the backbone unload() returned, "
                               f"or attach the method again (get_peft_model / svp.load_adapter)")

    # -- timm's model API, for scripts written against a timm model ------------------
    @property
    def num_classes(self) -> int:
        return self.base_model.num_classes

    @property
    def pretrained_cfg(self) -> dict:
        return self.base_model.pretrained_cfg

    @property
    def default_cfg(self) -> dict:
        return self.base_model.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        return self.base_model.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head of the method's kind (``config.head``) for ``num_classes`` classes, trainable
        and part of the adapter. (The backbone's own ``reset_classifier`` replaces it with timm's
        Linear, ``0`` with none: the adapter's head tensors then no longer exist.) ``global_pool``
        as timm's signature has it: the methods classify the class token, 'token'."""
        self._check_attached("reset_classifier")
        if global_pool not in (None, "token"):
            raise ValueError(f"reset_classifier(global_pool={global_pool!r}): svp's methods classify the class "
                             f"token ('token')")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"reset_classifier({num_classes!r}): expected a positive number of classes (for the "
                             f"features without a head: forward(images, pre_logits=True))")
        old = self.base_model.head
        ref = next(old.parameters(), None)
        head = build_head(self.config.head, self.base_model.num_features, num_classes)
        if ref is not None:
            head = head.to(device=ref.device, dtype=ref.dtype)
        before = set(self.head_parameter_names())
        self.base_model.head = head
        self.base_model.num_classes = num_classes
        self.config.num_classes = num_classes
        self._adapter_names = tuple(n for n in self._adapter_names if n not in before) + tuple(
            self.head_parameter_names())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.base_model.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise lr decay) on the wrapper's names: the backbone's,
        under ``base_model.``; the head and the method's own tensors outside the blocks (SVP's
        prompters, VPT's prompts) match none and get the full rate, LoRA's factors their block's.
        Without it timm grouped the wrapper's tensors twelve at a time and the head trained at
        0.004-0.04x its rate (review42)."""
        inner = self.base_model.group_matcher(coarse)

        def under(pattern: str) -> str:
            return "|".join(r"^base_model\." + p[1:] if p.startswith("^") else r"^base_model\." + p
                            for p in pattern.split("|"))
        out = {}
        for key, value in inner.items():
            out[key] = under(value) if isinstance(value, str) else [(under(p), order) for p, order in value]
        return out

    def no_weight_decay(self) -> set:
        """The backbone's no-decay tensors (position embedding, class token) under ``base_model.``,
        for timm's optimizer factory given the wrapper."""
        return {f"base_model.{n}" for n in self.base_model.no_weight_decay()}

    # -- forward ------------------------------------------------------------------
    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        self._check_attached("forward")
        # (before SimAM and the pixel prompt see it; a ViT's own check: svp.models.vit)
        check = getattr(self.base_model, "check_images", None) or self.base_model.patch_embed.check_images
        check(images)
        x = simam(images) if self.config.simam else images
        return self.method.transform_input(x)

    def forward_features(self, images: torch.Tensor):
        """(tokens after the final norm (b, L, D), class-token index)."""
        x = self.prepare_input(images)
        hook = self.method.hook if self.method.uses_hook else None
        return self.base_model.forward_features(x, hook=hook, return_cls_pos=True)

    def forward(self, images: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x, cls_pos = self.forward_features(images)
        return self.base_model.forward_head(x, pre_logits=pre_logits, cls_pos=cls_pos)

    @property
    def backbone_train_mode(self) -> bool:
        m = self.config.backbone_train_mode
        return self.method.default_backbone_train_mode if m is None else bool(m)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not self.backbone_train_mode:
            # A frozen backbone keeps its stochastic layers (DropPath, pos dropout) off.
            for name, child in self.base_model.named_children():
                if name != "head":
                    child.eval()
        return self

    # -- parameters ---------------------------------------------------------------
    def head_parameter_names(self) -> List[str]:
        return [n for n, _ in self.named_parameters() if n.startswith("base_model.head.")]

    def trainable_parameter_names(self) -> List[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def adapter_parameter_names(self) -> List[str]:
        """The adapter's tensors: those the method made trainable when it was attached (its
        parameters and the head), whatever their ``requires_grad`` flags are now."""
        return list(self._adapter_names)

    def _own_adapter_tensors(self, what: str) -> dict:
        """name -> parameter of each of the adapter's tensors; refused, naming them, where some
        are gone (the head replaced through the backbone: a KeyError without context)."""
        self._check_attached(what)
        own = dict(self.named_parameters())
        gone = [n for n in self._adapter_names if n not in own]
        if gone:
            raise AdapterError(f"{what}: {len(gone)} of the {self.config.method} adapter's tensors are no longer in "
                               f"the model ({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''}): its head was "
                               f"replaced or removed after the method was attached (the backbone's "
                               f"reset_classifier?); PeftModel.reset_classifier(n) gives a new head of the "
                               f"adapter's kind ({self.config.head})")
        return own

    def adapter_state_dict(self) -> dict:
        """The adapter's tensors (``adapter_parameter_names``), detached, on CPU."""
        own = self._own_adapter_tensors("adapter_state_dict")
        return {n: own[n].detach().cpu().contiguous() for n in self._adapter_names}

    def trainable_counts(self) -> dict:
        params = dict(self.named_parameters())
        total = sum(p.numel() for p in params.values())
        head = sum(params[n].numel() for n in self.head_parameter_names())
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        head_trainable = sum(params[n].numel() for n in self.head_parameter_names() if params[n].requires_grad)
        return {"trainable": trainable, "all": total,
                "trainable_without_head": trainable - head_trainable, "all_without_head": total - head}

    def trainable_report(self) -> str:
        c = self.trainable_counts()

        def line(t, a, what):
            pct = 100.0 * t / a if a else 0.0
            return f"trainable params: {t:,} || all params: {a:,} || trainable%: {pct:.4f} ({what})"
        return "\n".join([line(c["trainable"], c["all"], "with head"),
                          line(c["trainable_without_head"], c["all_without_head"], "without head")])

    def print_trainable_parameters(self):
        print(self.trainable_report())

    # -- files --------------------------------------------------------------------
    def save(self, directory, base_model_name: Optional[str] = None,
             class_names: Optional[Sequence[str]] = None, extra: Optional[dict] = None) -> str:
        return save_adapter(self, directory, base_model_name=base_model_name, class_names=class_names,
                            extra=extra)

    def load_adapter_state(self, tensors: dict, source: str = "<adapter>"):
        """Load a trainable-tensor dict saved by ``save`` (exact name and shape match)."""
        own = self._own_adapter_tensors("load_adapter_state")
        expected = {k: own[k].shape for k in self._adapter_names}
        lines = mismatch_lines(expected, tensors)
        if lines:
            raise ValueError("\n".join([f"{source} does not fit this {self.config.method} model:"] + lines))
        _check_values(tensors, expected, source)
        with torch.no_grad():
            for k in expected:
                own[k].copy_(tensors[k].to(dtype=own[k].dtype, device=own[k].device))
        return self

    def init_from_adapter(self, directory) -> dict:
        """Start this model's adapter from another adapter folder's tensors: each of them is copied
        into this model's adapter tensor of the same name and shape (LP-FT: a linear probe's head
        as a full fine-tuning run's start; an adapter of one task as another run's of the same
        settings and classes), the others keep their initial values. Refused, with nothing
        changed, where the folder's adapter was trained on other base weights, or holds a tensor
        that is not one of this model's adapter tensors (a backbone tensor this method keeps
        frozen: a fine-tuned backbone starts a run as its backbone, ``svp export`` then
        ``model.checkpoint``) or one of another shape. Returns ``{"method", "loaded",
        "initialised", "class_names", "config"}``: the folder's method, the names copied, this
        adapter's names left as they were, the folder's recorded class names and settings."""
        from .io import read_adapter_files

        self._check_attached("init_from_adapter")
        directory = os.fspath(directory)
        try:
            files = read_adapter_files(directory)
        except FileNotFoundError as e:
            raise AdapterError(str(e)) from None
        cfg = read_adapter_config(directory, files.data[ADAPTER_CONFIG])
        weights = files.path(ADAPTER_WEIGHTS)
        _check_base(cfg, directory, self.base_hash, self.base_model)
        state = _read_tensors(files)
        _check_weights_hash(cfg, state, weights)
        own = self._own_adapter_tensors("init_from_adapter")
        mine = set(self._adapter_names)
        foreign = [k for k in sorted(state) if k not in mine]
        if foreign:
            frozen = [k for k in foreign if k in own]
            why = (f"{len(frozen)} of them are backbone tensors this {self.config.method} run keeps frozen "
                   f"(a backbone trained in place starts a run as its backbone: svp export, then "
                   f"model.checkpoint)" if frozen else f"this {self.config.method} model has no tensor of "
                   f"that name (another method, or settings that name other layers)")
            raise AdapterError(f"{weights}: {len(foreign)} of its {len(state)} tensors are not among this "
                               f"{self.config.method} model's adapter tensors ({', '.join(foreign[:3])}"
                               f"{', ...' if len(foreign) > 3 else ''}): {why}")
        wrong = [f"{k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}" for k in sorted(state)
                 if tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            raise AdapterError(f"{weights}: {len(wrong)} of its tensors do not fit this {self.config.method} model "
                               f"(other settings or another class count): " + "; ".join(wrong[:3]))
        try:
            _check_values(state, state, weights)
        except ValueError as e:
            raise AdapterError(str(e)) from None
        with torch.no_grad():
            for k, t in state.items():
                own[k].copy_(t.to(dtype=own[k].dtype, device=own[k].device))
        return {"method": cfg.get("method"), "loaded": sorted(state),
                "initialised": [k for k in self._adapter_names if k not in state],
                "class_names": cfg.get("class_names"), "config": cfg.get("config")}

    def unload(self) -> nn.Module:
        """Detach the method from the backbone (remove hooks/parametrizations) and return it.
        Parameters the method trained in place (BitFit, full) keep their trained values. This
        PeftModel refuses to run or save afterwards."""
        self._check_attached("unload")
        self.method.detach(self.base_model)
        return self._bare()

    def merge_and_unload(self) -> nn.Module:
        """The backbone with the adaptation folded into its own tensors, detached from this
        PeftModel: a plain VisionMamba, as timm builds it, that computes this model's outputs up to
        rounding, for the methods whose change is one of the backbone's weights (linear probing,
        BitFit, full fine-tuning: trained in place; LoRA: W + (alpha / r) B A written into W, in
        float32). A two-layer head (two Linears, nothing between them) becomes the one Linear it
        computes. Refused, with nothing changed, for a method that adds computation (SVP's prompts,
        VPT's tokens, adapters: see :func:`merge_refusal`) and for SimAM on the input. This
        PeftModel refuses to run or save afterwards, as after ``unload()``."""
        self._check_attached("merge_and_unload")
        why = merge_refusal(self.config.method, self.config.simam)
        if why:
            raise AdapterError(f"merge_and_unload: {why}")
        self.method.merge(self.base_model)
        model = self.base_model
        if head_kind(model.head) == "two_layer":
            first, second = model.head
            with torch.no_grad():   # y = W1 (W0 x + b0) + b1 = (W1 W0) x + (W1 b0 + b1), formed in float64
                w = second.weight.double() @ first.weight.double()
                b = second.weight.double() @ first.bias.double() + second.bias.double()
            head = nn.Linear(first.in_features, second.out_features, device=second.weight.device,
                             dtype=second.weight.dtype)
            with torch.no_grad():
                head.weight.copy_(w)
                head.bias.copy_(b)
            model.head = head
        return self._bare()

    def _bare(self) -> nn.Module:
        setattr(self.base_model, _ATTACHED, False)
        _set_requires_grad(self.base_model, self._requires_grad)  # as trainable as before the method froze it
        self._unloaded = True
        return self.base_model


def merge_refusal(method: str, simam: bool = False) -> Optional[str]:
    """Why an adapter of ``method`` (with SimAM on its input or not) cannot be folded into the
    backbone's weights (``PeftModel.merge_and_unload``, ``svp export``); None where it can."""
    if not get_method(method)[1].mergeable:
        mergeable = [name for name in list_methods() if get_method(name)[1].mergeable]
        return (f"{method} adapters add computation a plain Vim does not have (prompts, tokens or modules "
                f"of their own), so they cannot be folded into the backbone's weights; only {', '.join(mergeable)} "
                f"adapters can. Keep it as an adapter (svp eval, predict and serve run it on its backbone)")
    if simam:
        return (f"this {method} adapter applies SimAM to the input image (simam: true), which a plain Vim "
                f"does not; it cannot be folded into the backbone's weights")
    return None


def freeze_for(model: nn.Module, method: PeftMethod):
    names = set(method.trainable_base_names(model))
    known = dict(model.named_parameters())
    bad = sorted(names - set(known))
    if bad:
        raise RuntimeError(f"{type(method).__name__} names unknown backbone parameters: {bad[:5]}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names or n.startswith("head."))


def get_peft_model(model: nn.Module, config: PeftConfig) -> PeftModel:
    """Apply ``config`` (see ``make_config``) to a VisionMamba. The returned PeftModel
    holds ``model`` as ``.base_model``; only the method's parameters and the head are
    trainable. A model can carry one method at a time (``PeftModel.unload`` to remove it)."""
    return _attach(model, config)


def dry_run(model: nn.Module, config: PeftConfig) -> "PeftModel":
    """``config`` attached to a twin of ``model`` without storage (the meta device, also for the
    method's own tensors): what ``get_peft_model`` would raise for the settings against the model
    (depth, width, ...), and the shapes of the tensors it would make, without allocating them or
    hashing weights; ``model`` itself is not changed."""
    with torch.device("meta"):
        return _attach(_meta_twin(model), config, base_hash="", materialize=False)


class _Snapshot:
    """What attaching a method changes on a backbone before it can fail: its head, class count
    and requires_grad flags. ``restore`` puts them back and takes off a half-attached method."""

    def __init__(self, model: nn.Module):
        self.head, self.num_classes = model.head, getattr(model, "num_classes", None)
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    def restore(self, model: nn.Module, method: Optional[PeftMethod] = None) -> None:
        if method is not None:
            method.detach(model)
        setattr(model, _ATTACHED, False)
        model.head = self.head
        if self.num_classes is not None:
            model.num_classes = self.num_classes
        _set_requires_grad(model, self.requires_grad)


def _set_requires_grad(model: nn.Module, flags: Dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _check_backbone(model, who: str) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "forward_features") or not hasattr(model, "layers"):
        raise TypeError(f"{who} expects a svp VisionMamba as its first argument, got {type(model).__name__}")
    if getattr(model, "global_pool", "token") != "token":   # (every token's logits, not one image's)
        raise ValueError(f"{who}: the backbone returns every token (global_pool={model.global_pool!r}); the "
                         f"methods classify the class token: build it with the default global_pool='token'")


def _attach(model: nn.Module, config: PeftConfig, base_hash: Optional[str] = None,
            materialize: bool = True) -> PeftModel:
    # base_hash: the pristine backbone's, when the caller has just computed it (hashing Vim-B's
    # weights takes ~0.3 s; load_adapter needs it to check the adapter first)
    _check_backbone(model, "get_peft_model")
    if getattr(model, _ATTACHED, False):
        raise ValueError("this model already carries an adaptation method; build a fresh model "
                         "(or call PeftModel.unload()) before applying another")
    if not isinstance(config, PeftConfig):
        raise TypeError(f"config must be a PeftConfig (see svp.peft.make_config), got {type(config).__name__}")
    config.validate()
    _, method_cls = get_method(config.method)
    if base_hash is None:
        # of the pristine backbone, before anything is attached; a backbone on the meta device
        # (to count parameters without memory) has no bytes to hash: its adapter cannot be saved
        # (it was torch's "Cannot copy out of meta tensor": review 66)
        meta = any(t.is_meta for t in model.state_dict().values())
        base_hash = "" if meta else base_weights_hash(model)
    before = _Snapshot(model)
    method = None
    try:
        _set_head(model, config)
        method = method_cls(config, model)
        freeze_for(model, method)
    except BaseException:  # a refused config leaves the model as it was (its head, hooks, flags)
        before.restore(model, method)
        raise
    for p in method.parameters():
        p.requires_grad_(True)
    setattr(model, _ATTACHED, True)
    peft = PeftModel(model, config, method, base_hash, before.requires_grad)
    if not materialize:   # (a dry run on the meta device: its tensors' shapes only)
        return peft
    # match device/dtype of the backbone for the new parameters
    ref = next(iter(model.parameters()))
    method.to(device=ref.device, dtype=ref.dtype)
    model.head.to(device=ref.device, dtype=ref.dtype)
    return peft


def _meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers live on the meta device
    (shapes only: nothing is copied or allocated; methods that place their tensors on the
    backbone's device, as LoRA's factors, place them there too)."""
    import copy
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        m = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)


def load_adapter(model: nn.Module, directory, check_hash: bool = True):
    """Apply the adapter saved in ``directory`` to ``model`` (a freshly built VisionMamba
    holding the same base weights the adapter was trained on) and return the PeftModel in
    eval mode. Refuses a model whose base-weight hash differs from the recorded one."""
    _check_bare_backbone(model)   # before the files are read
    return load_adapter_files(model, read_adapter_files(directory), check_hash)


def _dtype_hint(model: nn.Module) -> str:
    """Where the backbone is not float32 (the hash covers dtypes): load on the backbone as built,
    then cast."""
    dtypes = sorted({str(t.dtype).replace("torch.", "") for k, t in model.state_dict().items()
                     if t.is_floating_point() and not k.startswith("head.")} - {"float32"})
    if not dtypes:
        return ""
    return (f", and so does the dtype: the model given holds {'/'.join(dtypes)} weights; load the adapter on the "
            f"backbone as built (float32), then cast the PeftModel (.to(torch.{dtypes[0]}))")


def _check_bare_backbone(model: nn.Module) -> None:
    if isinstance(model, PeftModel):
        raise TypeError("load_adapter expects the bare backbone (a VisionMamba), got a PeftModel: pass a freshly "
                        "built backbone (or peft_model.unload() where its method changed no backbone weights: "
                        "not BitFit or full fine-tuning, whose trained weights stay in place)")
    _check_backbone(model, "load_adapter")   # before the hash reads its weights


def load_adapter_files(model: nn.Module, files: AdapterFiles, check_hash: bool = True):
    """:func:`load_adapter` from an adapter folder's files already read
    (:func:`svp.peft.io.read_adapter_files`; ``svp serve`` compares them with the folder it
    serves)."""
    _check_bare_backbone(model)
    directory = files.directory
    cfg = read_adapter_config(directory, files.data[ADAPTER_CONFIG])
    weights = files.path(ADAPTER_WEIGHTS)
    have = None
    if check_hash:
        have = base_weights_hash(model)
        _check_base(cfg, directory, have, model)
    try:  # a setting edited or damaged in the file: named with the folder, before anything is attached
        n = cfg["num_classes"]
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError(f"num_classes is {n!r}, expected an integer")
        config = config_from_dict(dict(cfg["config"], num_classes=n))
    except (ValueError, TypeError) as e:
        raise AdapterError(f"{os.path.join(directory, ADAPTER_CONFIG)}: {e}") from None
    state = _read_tensors(files)
    before = _Snapshot(model)
    # the settings' tensors first built without storage, on a twin of the backbone whose tensors
    # have none either, and held to the file's: a damaged or hostile adapter_config.json (svp's
    # hidden=10**9, LoRA's r=10**9) allocated 256 GB, or tried to, before the shapes were compared
    try:
        dry = dry_run(model, config)
    except ValueError as e:  # settings that do not fit this backbone (its depth, width)
        raise AdapterError(f"{directory}: {e}") from None
    own = dict(dry.named_parameters())
    shapes = {n: own[n].shape for n in dry.adapter_parameter_names()}
    lines = mismatch_lines(shapes, state)
    if lines:
        raise AdapterError("\n".join([f"{weights} does not fit this {config.method} model, as "
                                       f"{os.path.join(directory, ADAPTER_CONFIG)} sets it up:"] + lines))
    # (check_hash=False forces this too: tensors edited on purpose, e.g. re-saved in float16)
    if check_hash:
        _check_weights_hash(cfg, state, weights)
    try:
        peft = _attach(model, config, base_hash=have)
    except ValueError as e:  # settings that do not fit this backbone (its depth, width)
        raise AdapterError(f"{directory}: {e}") from None
    try:
        peft.load_adapter_state(state, source=weights)
    except BaseException as e:  # tensors that do not fit: take the method off again
        before.restore(model, peft.method)
        if isinstance(e, ValueError) and not isinstance(e, AdapterError):
            raise AdapterError(str(e)) from None   # the message names the file
        raise
    peft.class_names = cfg.get("class_names")
    peft.base_model_name = cfg.get("base_model_name")
    return peft.eval()


def family_mismatch(cfg: dict, directory: str, family: Optional[str], given: str) -> Optional[str]:
    """Where an adapter (its config ``cfg``) of one backbone family meets the other (a ViT's on a
    Vim, or the reverse; ``family`` None: not known), the sentence saying so, else None: it was
    said as a weight-hash mismatch or as arguments that do not fit (retests 96, 98)."""
    recorded = (cfg.get("base_model_settings") or {}).get("family", "vim")
    if family is None or recorded == family or not {recorded, family} <= {"vim", "vit"}:
        return None
    words = {"vim": "a Vision Mamba (vim_*)", "vit": "a ViT (vit_*)"}
    return (f"{directory}: the adapter was trained on {words[recorded]} backbone ({cfg.get('base_model_name')!r}), "
            f"but {given} is {words[family]}; give it a backbone of its family")


def check_family(cfg: dict, directory: str, model: nn.Module, given: str = "the model given") -> None:
    """:func:`family_mismatch` of ``model``, raised."""
    said = family_mismatch(cfg, directory, getattr(model, "family", "vim"), given)
    if said:
        raise AdapterError(said)


def _check_base(cfg: dict, directory: str, have: str, model: nn.Module) -> None:
    """The adapter in ``directory`` (its config ``cfg``) was trained on weights of hash ``have``,
    built with ``model``'s output settings; refused, naming both, otherwise."""
    want = cfg["base_model_hash"]
    if have != want:
        check_family(cfg, directory, model)
    if have != want:
        raise AdapterError(
            f"{directory}: adapter was trained on base model {cfg.get('base_model_name')!r} with weight hash "
            f"{want}, but the model given has weight hash {have}; load the same base weights, built "
            f"the same way: another img_size resamples the position embedding, and a float16/bfloat16 "
            f"copy of the checkpoint rounds every weight, so either differs too{_dtype_hint(model)} "
            f"(from Python, load_adapter(..., check_hash=False) forces it)")
    differ = settings_differences(cfg.get("base_model_settings") or {}, model)
    if differ:   # the same weights, other outputs (adapters saved before 2026-12-06 record none)
        raise AdapterError(
            f"{directory}: adapter was trained on a {cfg.get('base_model_name')!r} backbone built with "
            f"{', '.join(differ)}; build the model with the adapter's settings (its outputs differ "
            f"otherwise, the weights being the same), or from Python load_adapter(..., check_hash=False) "
            f"forces it")


def _check_weights_hash(cfg: dict, state: dict, weights: str) -> None:
    """Tensors of the right shapes that are not the ones saved with this config are refused
    (folders saved before svp wrote weights_hash have none)."""
    digest = cfg.get("weights_hash")
    found = tensors_hash(state) if digest is not None else None
    if found != digest:
        raise AdapterError(f"{weights} is not the file {ADAPTER_CONFIG} was saved with (its tensors' hash is "
                           f"{found}, the config's weights_hash {digest}): a save stopped between the two files, "
                           f"or one of them was replaced? Save or copy the adapter again; tensors edited on "
                           f"purpose load with weights_hash removed from the config (from Python, "
                           f"load_adapter(..., check_hash=False))")


def _check_values(tensors: dict, names, source: str) -> None:
    """Values a saved adapter never holds (they are cast, or checked, before svp writes them): an
    integer tensor was truncated into the weights and a NaN one predicted "nan%", silently."""
    for k in names:
        t = tensors[k]
        if not t.is_floating_point():
            raise ValueError(f"{source}: tensor {k!r} is {t.dtype}; expected floating-point weights "
                             f"(the file is damaged or was not written by svp)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: tensor {k!r} holds NaN or infinite values; the file is damaged "
                             f"(svp checks weights are finite before it writes them)")


def _read_tensors(files: AdapterFiles) -> dict:
    """The adapter's tensors, read before anything is attached: a damaged file leaves the model as it was."""
    weights = files.path(ADAPTER_WEIGHTS)
    try:
        return safetensors_load(files.data[ADAPTER_WEIGHTS])
    except Exception as e:  # SafetensorError: truncated, empty or not a safetensors file at all
        raise AdapterError(f"{weights}: not a readable safetensors file ({e}); the adapter directory is "
                           f"damaged, save or copy it again") from None
