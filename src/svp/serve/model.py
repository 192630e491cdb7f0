"""One frozen Vision Mamba serving many adapters, with mixed-adapter batches.

``MultiAdapterModel(backbone)`` holds the backbone once. ``add_adapter(name, DIR)`` loads
an adapter directory (``PeftModel.save`` output) with ``svp.load_adapter`` onto a *shadow*
of the backbone: a copy of its module tree that shares every backbone tensor (no memory),
except the tensors the adapter trains in place (BitFit's biases, a full fine-tune, the
head), which it owns. The shadow PeftModel is what "this adapter run alone" means, and its
method module holds the parameters the mixed batches use: nothing is re-implemented.

``forward(images, names)`` runs samples that name different adapters through one backbone
pass (per sequence layout, see below), each sample getting its own adapter:

- input transforms (SimAM, pixel visual prompts): each adapter's own ``prepare_input`` on
  its rows;
- layer hooks (SVP prompts, VPT tokens): each adapter's own ``method.hook`` on its rows of
  the streams entering a block (SVP computes prompts from the tokens, per sample);
- LoRA: the frozen projection runs once for the whole batch; for the rows of each LoRA
  adapter the low-rank part ``scale * x A^T B^T`` (``LoRAParametrization.delta``) is added
  to its output (module forward hooks; for ``dt_proj``, which the mixer reads as a weight,
  through ``BiMambaMixer.delta_hook``, and for ``in_proj``, whose two half products a module
  hook would replace for the whole batch, through ``BiMambaMixer.in_proj_hook``), as
  multi-LoRA LLM servers do; never merged;
- BitFit: per-sample biases: the depthwise conv biases as (b, 1, E) tensors standing in for
  the conv modules' bias parameters during the pass, the time-step and patch-embedding biases as the difference
  to the frozen bias added to the rows of that adapter;
- parallel adapters: the method's own forward-hook object on the rows of that adapter;
- heads (linear, two-layer, any class count): each adapter's head on its rows.

A sequence model sees every token, so samples whose token sequences differ in length or
class-token position cannot share a scan: VPT adapters batch with the VPT adapters of the
same token count and placement (one pass), everything else with each other (one pass).
Full fine-tuning adapters (and methods this module does not know) carry their own weights
and run on their own model, one pass per adapter.
"""
from __future__ import annotations

import copy
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..errors import AdapterError
from ..peft.base import PeftMethod, check_family, load_adapter_files
from ..peft.io import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFiles, base_weights_hash, read_adapter_config,
                       read_adapter_files)

# Methods whose samples share the backbone pass through code of this module's own (their token
# layout, LoRA's products, BitFit's biases, the adapters' mixer hooks); besides them, any method
# whose class sets ``PeftMethod.serve_shared`` (svp, linear, visual_prompt, a new layer-hook
# method). Anything else runs on its own model.
SHARED_METHODS = ("vpt_shallow", "vpt_deep", "bitfit", "lora", "adapter")
# Files that may hold pickled code; an adapter directory holding one is refused outright.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
_LORA_LINEARS = ("in_proj", "x_proj", "x_proj_b", "out_proj")
_DT = {"dt_proj": "forward", "dt_proj_b": "backward"}
_CONV_BIAS = ("conv1d", "conv1d_b")


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or under it (both real paths). On Windows a path on another
    drive is neither: commonpath raised ValueError ("Paths don't have the same drive") there, and
    serve stopped with a traceback (review; read from the code, no Windows machine)."""
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:
        return False


def check_adapter_dir(root: str, name: str) -> str:
    """The real path of adapter ``name`` under ``root``; refuses a name that leaves ``root``
    (``..``, separators), a symlink (folder or file) that points out of it, a folder without
    the two adapter files, and any file that may hold a pickle."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name) or "\0" in name:
        raise AdapterError(f"adapter name {name!r}: must be a plain folder name inside {root}")
    root_real = os.path.realpath(root)
    path = os.path.join(root, name)
    real = os.path.realpath(path)
    if not _inside(real, root_real) or real == root_real:
        raise AdapterError(f"adapter {name!r}: {path} resolves to {real}, outside the adapters folder {root_real}")
    if not os.path.isdir(real):
        raise AdapterError(f"adapter {name!r}: {path} is not a folder")
    try:
        entries = sorted(os.listdir(real))
    except OSError as e:   # (a traceback at start when it sorted first)
        raise AdapterError(f"adapter {name!r}: cannot read {path} ({e.strerror or e})") from None
    for entry in entries:
        full = os.path.join(real, entry)
        target = os.path.realpath(full)
        if not _inside(target, real):
            raise AdapterError(f"adapter {name!r}: {full} is a link to {target}, outside the adapter folder")
        if entry.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterError(f"adapter {name!r}: {full} may hold a pickle; refusing to serve a folder with "
                               f"pickled files (adapters are {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    for need in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        try:
            st = os.stat(os.path.join(real, need))
        except FileNotFoundError:
            raise AdapterError(f"adapter {name!r}: no {need} in {path}") from None
        except OSError as e:   # a folder it may list but not enter (chmod -R 644) said "no ..." too
            raise AdapterError(f"adapter {name!r}: cannot read {os.path.join(path, need)} "
                               f"({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"adapter {name!r}: {os.path.join(path, need)} is not a file")
    return real


def _shared_memo(module: nn.Module, own: Sequence[str] = ()) -> dict:
    own = set(own)
    memo = {id(b): b for b in module.buffers()}
    for n, p in module.named_parameters():
        if n not in own:
            memo[id(p)] = p
    return memo


def shadow(module: nn.Module, own: Sequence[str] = ()) -> nn.Module:
    """A copy of ``module``'s module tree whose parameters and buffers are the original
    tensor objects, except the parameters named in ``own``, which are copied."""
    return copy.deepcopy(module, _shared_memo(module, own))


def _in_place_names(files: AdapterFiles) -> List[str]:
    """Backbone parameters an adapter file overwrites (BitFit biases, full fine-tuning, the head):
    its ``base_model.*`` tensors that are not LoRA factors."""
    from safetensors.torch import load

    try:
        keys = list(load(files.data[ADAPTER_WEIGHTS]))
    except Exception as e:  # SafetensorError (truncated, empty, not safetensors)
        raise AdapterError(f"{files.path(ADAPTER_WEIGHTS)}: not a readable safetensors file ({e})") from None
    return [k[len("base_model."):] for k in keys
            if k.startswith("base_model.") and ".parametrizations." not in k]


@dataclass
class Adapter:
    """One loaded adapter: its PeftModel (on a shadow backbone) and what the mixed pass needs."""
    name: str
    path: str
    peft: nn.Module
    info: dict
    layout: Optional[tuple]                 # sequence-layout key of its shared pass; None: own pass
    prepares_input: bool = False
    lora_linear: Dict[str, nn.Module] = field(default_factory=dict)          # "layers.i.mixer.x_proj" -> param
    lora_dt: Dict[Tuple[int, str], nn.Module] = field(default_factory=dict)  # (layer, direction) -> param
    dt_bias: Dict[Tuple[int, str], torch.Tensor] = field(default_factory=dict)  # bias - frozen bias
    conv_bias: Dict[str, torch.Tensor] = field(default_factory=dict)         # master param name -> bias
    patch_bias: Optional[torch.Tensor] = None
    mixer_hooks: Dict[int, object] = field(default_factory=dict)             # layer -> forward-hook object

    @property
    def method(self) -> str:
        return self.info["method"]

    @property
    def class_names(self) -> List[str]:
        names = self.info.get("class_names")
        return list(names) if names else [str(i) for i in range(int(self.info["num_classes"]))]

    def describe(self) -> dict:
        return {"name": self.name, "method": self.method, "num_classes": int(self.info["num_classes"]),
                "classes": self.class_names, "trainable_params": int(self.info.get("trainable_params", 0)),
                "base_model_name": self.info.get("base_model_name"),
                "base_model_hash": self.info["base_model_hash"],
                "batching": "own model" if self.layout is None else "shared pass " + "/".join(map(str, self.layout))}


class _Plan:
    """What the hooks on the shared backbone do for the batch being run. Rows are slices:
    ``forward`` puts each adapter's samples next to each other, so every per-adapter step is
    a view and an in-place write instead of an index gather and a copy of the whole tensor."""

    def __init__(self):
        self.layer_hooks: List[Tuple[slice, object]] = []
        # keyed by the backbone's modules themselves: the pass registers its hooks on the keys
        self.linear: Dict[nn.Module, List[Tuple[slice, nn.Module]]] = {}
        self.in_proj: Dict[nn.Module, List[Tuple[slice, nn.Module]]] = {}   # mixer -> LoRA rows on in_proj
        self.delta: Dict[Tuple[nn.Module, str], List[Tuple[slice, Optional[nn.Module], Optional[torch.Tensor]]]] = {}
        self.mixer: Dict[nn.Module, List[Tuple[slice, object]]] = {}
        self.patch: List[Tuple[slice, torch.Tensor]] = []
        self.overrides: Dict[str, torch.Tensor] = {}


class MultiAdapterModel(nn.Module):
    """One frozen backbone plus any number of adapters; see the module docstring.

    Not thread-safe: run every call (forward, add/remove) from one thread (the server runs
    them in a single worker thread)."""

    def __init__(self, backbone: nn.Module, amp: bool = False):
        """``amp``: run every pass under bfloat16 autocast, as ``train.amp`` / ``svp predict
        --amp`` do (docs/training.md, "Mixed precision on the CPU")."""
        super().__init__()
        self.amp = bool(amp)
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone.eval()
        self.base_hash = base_weights_hash(backbone)
        self._params = dict(backbone.named_parameters())
        # A hook-free twin to copy shadows from (shadows of the hooked backbone would copy the hooks).
        self._template = shadow(backbone)
        self.adapters: Dict[str, Adapter] = {}
        self._plan: Optional[_Plan] = None
        self._modules_by_path = dict(backbone.named_modules())
        self._lock = threading.Lock()

    # -- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, directory: str, files: Optional[AdapterFiles] = None) -> Adapter:
        """Load adapter ``directory`` under ``name`` (replacing one of that name), from ``files``
        where they are read already (svp.peft.io.read_adapter_files). Raises ``AdapterError`` for a
        directory that does not fit this backbone (hash, shapes)."""
        files = files if files is not None else read_adapter_files(directory)
        info = read_adapter_config(directory, files.data[ADAPTER_CONFIG])
        if info["base_model_hash"] != self.base_hash:
            check_family(info, directory, self.backbone, "the served backbone")
            raise AdapterError(
                f"{directory}: adapter was trained on base model {info.get('base_model_name')!r} with weight hash "
                f"{info['base_model_hash']}, but the served backbone has weight hash {self.base_hash} (other "
                f"weights, or the same built at another input size: the resampled position embedding differs)")
        own = _in_place_names(files)
        own += [n for n, _ in self._template.named_parameters() if n.startswith("head.")]
        template_memo = _shared_memo(self._template, own)
        base = copy.deepcopy(self._template, template_memo)
        try:
            peft = load_adapter_files(base, files)
        except (ValueError, TypeError, RuntimeError) as e:
            if isinstance(e, AdapterError):
                raise
            raise AdapterError(f"{directory}: {e}") from e
        peft.eval()
        entry = self._describe(name, directory, peft, info)
        self.adapters[name] = entry
        return entry

    def remove_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)

    def _describe(self, name, directory, peft, info) -> Adapter:
        kind = peft.config.method
        method = peft.method
        generic = method.serve_shared and not method.trainable_base_names(peft.base_model)
        # (the shared pass's hooks know a Vim's modules: an adapter on a ViT is served on its own model)
        vim = getattr(peft.base_model, "family", "vim") == "vim"
        if not vim or (kind not in SHARED_METHODS and not generic):
            return Adapter(name, directory, peft, info, layout=None)
        layout = ("vpt", int(peft.config.num_tokens), peft.config.placement) if kind.startswith("vpt") else ("base",)
        overrides_input = type(method).transform_input is not PeftMethod.transform_input
        e = Adapter(name, directory, peft, info, layout=layout,
                    prepares_input=bool(peft.config.simam) or overrides_input)
        master = self._params
        if kind == "lora":
            for path, lin in method._targets:
                param = lin.parametrizations.weight[0]
                _, i, _, proj = path.split(".")
                if proj in _DT:
                    e.lora_dt[(int(i), _DT[proj])] = param
                else:
                    e.lora_linear[path] = param
        elif kind == "bitfit":
            own = dict(peft.base_model.named_parameters())
            for n in method.trainable_base_names(peft.base_model):
                parts = n.split(".")
                if n == "patch_embed.proj.bias":
                    e.patch_bias = (own[n] - master[n]).detach()
                elif parts[-2] in _DT:
                    e.dt_bias[(int(parts[1]), _DT[parts[-2]])] = (own[n] - master[n]).detach().float()
                elif parts[-2] in _CONV_BIAS:
                    e.conv_bias[n] = own[n].detach()
                else:  # a bias this module does not know how to apply per sample
                    e.layout = None
        elif kind == "adapter":
            from ..peft.adapter import _AdapterHook
            e.mixer_hooks = {i: _AdapterHook(ad) for i, ad in enumerate(method.adapters)}
        return e

    def adapter(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise AdapterError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters)}")
        return self.adapters[name]

    # -- hooks on the shared backbone -----------------------------------------------------
    # Registered for one pass and only where that pass needs them: a module with a forward
    # hook takes nn.Module's slow call path, and the mixer's in_proj/out_proj fast paths (two
    # half products, out_proj with the halving folded in) apply only to hook-free projections,
    # so hooks left on every layer cost every batch, with or without LoRA in it.
    def _patch_hook(self, module, args, output):
        for rows, diff in self._plan.patch:
            output[rows] += diff.to(output.dtype).view(1, -1, 1, 1)
        return output

    def _linear_hook(self, module, args, output):
        x = args[0]
        for rows, param in self._plan.linear[module]:
            output[rows] += param.delta(x[rows]).to(output.dtype)
        return output

    def _mixer_hook(self, module, args, output):
        for rows, hook in self._plan.mixer[module]:
            output[rows] = hook(module, (args[0][rows],), output[rows])
        return output

    def _in_proj_hook(self, mixer, hidden, x, z):
        # LoRA on in_proj through the mixer's own hook: a module hook would make the mixer run
        # in_proj as one product and a chunk for the whole batch (strided x and z, copied later)
        E = x.shape[-1]
        for rows, param in self._plan.in_proj[mixer]:
            upd = param.delta(hidden[rows]).to(x.dtype)
            x[rows] += upd[..., :E]
            z[rows] += upd[..., E:]
        return x, z

    def _delta_hook(self, mixer, direction, dt, delta):
        for rows, lora, bias in self._plan.delta.get((mixer, direction), ()):
            upd = None
            if lora is not None:
                upd = lora.delta(dt[rows]).to(delta.dtype)
            if bias is not None:
                upd = bias.to(delta.dtype) if upd is None else upd + bias.to(delta.dtype)
            delta[rows] += upd
        return delta

    @staticmethod
    def _layer_hook(plan: _Plan, n: int):
        items = plan.layer_hooks
        if len(items) == 1 and items[0][0] == slice(0, n):  # one adapter for the whole pass: its own hook
            return items[0][1].hook

        def hook(i, hidden, residual, cls_pos):
            # rows without a layer hook keep their streams: start from copies, write each adapter's rows
            new_h, new_r, new_c = None, None, cls_pos
            for rows, method in items:
                rv = None if residual is None else residual[rows]
                h, r, c = method.hook(i, hidden[rows], rv, cls_pos)
                if new_h is None:
                    # the sequence grows (VPT's tokens): every row of this pass does (one layout per pass)
                    new_h = hidden.clone() if h.shape[1] == hidden.shape[1] else \
                        hidden.new_empty(hidden.shape[0], h.shape[1], hidden.shape[2])
                new_h[rows] = h
                if r is not None and r is not rv:  # (SVP hands the residual back untouched)
                    if new_r is None:
                        new_r = residual.clone() if residual is not None and r.shape[1] == residual.shape[1] \
                            else r.new_empty(hidden.shape[0], r.shape[1], r.shape[2])
                    new_r[rows] = r
                new_c = c
            return new_h, (residual if new_r is None else new_r), new_c
        return hook

    # -- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor, names: Sequence[str]) -> List[torch.Tensor]:
        """Logits per sample (a list: adapters differ in class count) for ``images`` (b, C, H, W)
        normalised as the backbone expects, sample i run with adapter ``names[i]``."""
        if len(names) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(names)} adapter names")
        entries = [self.adapter(n) for n in names]
        with self._lock, self._autocast(images):
            out: List[Optional[torch.Tensor]] = [None] * len(names)
            passes: Dict[object, Dict[str, List[int]]] = {}
            for i, e in enumerate(entries):
                key = e.layout if e.layout is not None else ("own", e.name)
                passes.setdefault(key, {}).setdefault(e.name, []).append(i)
            dev = images.device
            for key, groups in passes.items():
                idx = [i for rows in groups.values() for i in rows]
                x = images[torch.tensor(idx, device=dev)]
                if key[0] == "own":
                    logits = list(self.adapters[key[1]].peft(x))
                else:
                    local, start = {}, 0
                    for name, rows in groups.items():
                        local[name] = slice(start, start + len(rows))
                        start += len(rows)
                    logits = self._shared_pass(x, local)
                for i, lg in zip(idx, logits):
                    out[i] = lg.float()   # (bfloat16 under amp: the head's product)
            return out

    def _shared_pass(self, x: torch.Tensor, rows_of: Dict[str, slice]) -> List[torch.Tensor]:
        """``x`` is this pass's own tensor (written in place); ``rows_of`` each adapter's slice of it."""
        plan = _Plan()
        vim = self.backbone
        mixers = [layer.mixer for layer in vim.layers]
        modules = self._modules_by_path
        for name, rows in rows_of.items():
            e = self.adapters[name]
            if e.prepares_input:
                x[rows] = e.peft.prepare_input(x[rows])
            if e.peft.method.uses_hook:
                plan.layer_hooks.append((rows, e.peft.method))
            for path, param in e.lora_linear.items():
                if path.endswith(".in_proj"):
                    plan.in_proj.setdefault(mixers[int(path.split(".")[1])], []).append((rows, param))
                else:
                    plan.linear.setdefault(modules[path], []).append((rows, param))
            for (i, d) in set(e.lora_dt) | set(e.dt_bias):
                plan.delta.setdefault((mixers[i], d), []).append(
                    (rows, e.lora_dt.get((i, d)), e.dt_bias.get((i, d))))
            for i, hook in e.mixer_hooks.items():
                plan.mixer.setdefault(mixers[i], []).append((rows, hook))
            if e.patch_bias is not None:
                plan.patch.append((rows, e.patch_bias))
            for pname, bias in e.conv_bias.items():
                if pname not in plan.overrides:
                    plan.overrides[pname] = self._params[pname].detach().view(1, 1, -1).repeat(x.shape[0], 1, 1)
                plan.overrides[pname][rows] = bias.to(plan.overrides[pname].dtype).view(1, 1, -1)
        handles, swapped, delta_mixers = [], [], []
        self._plan = plan
        try:
            if plan.patch:
                handles.append(vim.patch_embed.proj.register_forward_hook(self._patch_hook))
            for module in plan.linear:
                handles.append(module.register_forward_hook(self._linear_hook))
            for mixer in plan.mixer:
                handles.append(mixer.register_forward_hook(self._mixer_hook))
            for mixer in {m for m, _direction in plan.delta}:
                mixer.delta_hook = self._delta_hook
                delta_mixers.append(mixer)
            for mixer in plan.in_proj:
                mixer.in_proj_hook = self._in_proj_hook
            # BitFit's per-sample conv biases: the (b, 1, E) tensors stand in for the conv modules'
            # bias parameters during this pass (what torch.func.functional_call does, without its
            # walk over the whole module tree on every batch); restored below whatever happens.
            for pname, bias in plan.overrides.items():
                mod_path, attr = pname.rsplit(".", 1)
                mod = modules[mod_path]
                swapped.append((mod, attr, mod._parameters[attr]))
                mod._parameters[attr] = bias
            hook = self._layer_hook(plan, x.shape[0]) if plan.layer_hooks else None
            feats, cls_pos = vim.forward_features(x, hook=hook, return_cls_pos=True)
        finally:
            for mod, attr, param in swapped:
                mod._parameters[attr] = param
            for mixer in delta_mixers:
                mixer.delta_hook = None
            for mixer in plan.in_proj:
                mixer.in_proj_hook = None
            for h in handles:
                h.remove()
            self._plan = None
        out: List[Optional[torch.Tensor]] = [None] * x.shape[0]
        for name, rows in rows_of.items():
            logits = self.adapters[name].peft.base_model.forward_head(feats[rows], cls_pos=cls_pos)
            for r, lg in zip(range(rows.start, rows.stop), logits):
                out[r] = lg
        return out

    # -- reference and analysis -------------------------------------------------------------
    @torch.no_grad()
    def forward_alone(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Adapter ``name`` run alone (its PeftModel), for a whole batch."""
        with self._lock, self._autocast(images):
            return self.adapter(name).peft(images)

    def _autocast(self, images: torch.Tensor):
        return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def gate_maps(self, images: torch.Tensor, name: str):
        """(frozen backbone's GateMaps, adapter's GateMaps) for ``images`` (svp.viz.analyze)."""
        from ..viz import analyze
        with self._lock:
            frozen = analyze(self.backbone, images)
            adapted = analyze(self.adapter(name).peft, images)
        return frozen, adapted

    def parameter_bytes(self) -> dict:
        """Bytes of distinct tensors held: the backbone, and what the adapters add."""
        seen = {}
        for t in list(self.backbone.parameters()) + list(self.backbone.buffers()):
            seen[id(t)] = t.numel() * t.element_size()
        backbone = sum(seen.values())
        for e in self.adapters.values():
            for t in list(e.peft.parameters()) + list(e.peft.buffers()):
                seen.setdefault(id(t), t.numel() * t.element_size())
        return {"backbone": backbone, "adapters": sum(seen.values()) - backbone}
