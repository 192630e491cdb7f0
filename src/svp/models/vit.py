"""Vision Transformer backbones (timm's own ViTs) in svp's harness, for the baselines the paper
compares SVP on Vim with (linear probing, full fine-tuning, VPT, LoRA, adapters on ViT-S/16 and
ViT-B/16).

timm builds the model (``vit_small_patch16_224``, ``vit_base_patch16_224.augreg_in21k``, any
registered ViT of timm's VisionTransformer class with a class token and plain pre-norm blocks);
:func:`as_backbone` turns it into a :class:`HookedViT`, the same object with svp's seam added, its
weights, their names and timm's own ``forward`` unchanged. The methods then see what they see of a
Vim:

  images -> patch + position embedding -> for each block: hook(i, hidden, residual, cls_pos)
         -> block -> final norm -> class token -> head

A timm block computes ``x1 = x + attn(norm1(x)); out = x1 + mlp(norm2(x1))``; here it returns the
two streams ``residual = x1`` and ``hidden = mlp(norm2(x1))``, whose sum, taken as the next block's
input, is timm's ``out`` to the bit. So a hook that sets rows of both streams (VPT-deep: the
residual's prompt rows to the layer's prompts, the hidden's to zero) sets the token entering the
block, as on a Vim, and without a hook the outputs are timm's exactly.

A ViT has no selective scan: SVP itself is refused on it (svp.peft.svp).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from timm.models.vision_transformer import Block, VisionTransformer

# LoRA's targets on a ViT block (names as in timm's modules) and its default: the attention's
# fused query/key/value projection, as the LoRA baselines of ViT fine-tuning apply it
VIT_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
VIT_LORA_DEFAULT = ("qkv",)
_LORA_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class NotAViTBackbone(ValueError):
    """A timm ViT svp's harness cannot run (another block kind, no class token, ...)."""


class HookedViT(VisionTransformer):
    """timm's VisionTransformer with svp's seam (see the module docstring). Made by
    :func:`as_backbone` from a model timm built; not constructed directly."""

    family = "vit"

    @property
    def layers(self) -> nn.Module:
        return self.blocks

    def check_images(self, images: torch.Tensor) -> None:
        """A batch the patch embedding takes, or one line saying what it expects."""
        if images.dim() != 4 or images.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f"{type(self).__name__}: expected images (B, {self.patch_embed.proj.in_channels}, H, W), "
                             f"got shape {tuple(images.shape)}")
        size = getattr(self.patch_embed, "img_size", None)
        # (dynamic_img_size is the ViT's own flag; its PatchEmbed then checks no size: retest 99)
        dynamic = getattr(self, "dynamic_img_size", False) or not getattr(self.patch_embed, "strict_img_size", True)
        if size is not None and not dynamic and tuple(images.shape[-2:]) != tuple(size):
            raise ValueError(f"{type(self).__name__}: images of {images.shape[-2]}x{images.shape[-1]} px; the model "
                             f"was built for {size[0]}x{size[1]} (data.img_size / --img-size)")

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Tokens entering the first block, and the class token's index (0)."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), 0

    @staticmethod
    def _block(blk: Block, hidden: torch.Tensor, residual: Optional[torch.Tensor]):
        x = hidden if residual is None else residual + hidden
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        return blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), x

    def forward_features(self, x, hook=None, return_cls_pos: bool = False):
        """Tokens after the final norm, (b, L, D); ``hook`` (svp.models.vim.LayerHook) may rewrite
        the streams entering each block."""
        hidden, cls_pos = self.embed(x)
        residual = None
        for i, blk in enumerate(self.blocks):
            if hook is not None:
                hidden, residual, cls_pos = hook(i, hidden, residual, cls_pos)
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden, residual = checkpoint(self._block, blk, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = self._block(blk, hidden, residual)
        out = self.norm(hidden if residual is None else residual + hidden)
        return (out, cls_pos) if return_cls_pos else out

    def forward_head(self, x, pre_logits: bool = False, cls_pos: Optional[int] = None):
        """Class-token feature (pre_logits) or logits; the class token at ``cls_pos`` (a prompt
        inserted before it moves it), else at 0."""
        x = x[:, 0 if cls_pos is None else cls_pos]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        x, cls_pos = self.forward_features(x, return_cls_pos=True)
        return self.forward_head(x, cls_pos=cls_pos)

    # -- where the methods attach ------------------------------------------------------
    def adapter_site(self, i: int) -> nn.Module:
        """The module a parallel adapter runs beside in block ``i``: the MLP (AdaptFormer)."""
        return self.blocks[i].mlp

    def lora_sites(self, targets: Sequence[str]) -> List[Tuple[str, nn.Module]]:
        """(state-dict path, module) of every Linear LoRA adapts for ``targets`` (VIT_LORA_TARGETS)."""
        bad = [t for t in targets if t not in _LORA_PATHS]
        if bad:
            raise ValueError(f"lora: targets {list(targets)} on a ViT; choose from {VIT_LORA_TARGETS}")
        out = []
        for i, blk in enumerate(self.blocks):
            for t in targets:
                mod = blk.get_submodule(_LORA_PATHS[t])
                out.append((f"blocks.{i}.{_LORA_PATHS[t]}", mod))
        return out

    def output_settings(self) -> dict:
        """What changes the outputs but no weight (svp.peft.io binds an adapter to it)."""
        blk = self.blocks[0]
        act = getattr(blk.mlp, "act", None)
        return {"family": "vit", "norm_eps": float(getattr(blk.norm1, "eps", 0.0)),
                "final_norm_eps": float(getattr(self.norm, "eps", 0.0)), "global_pool": "token",
                # (the same weights split into other heads, or another activation, give other outputs)
                "num_heads": int(getattr(blk.attn, "num_heads", 0)), "act": type(act).__name__ if act else ""}


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, HookedViT)


def as_backbone(model: nn.Module, name: str = "") -> nn.Module:
    """``model`` as svp's harness runs it: a Vim as it is; timm's VisionTransformer as a
    :class:`HookedViT` (the same object, its class swapped: its weights and forward unchanged);
    another ViT kind refused with :class:`NotAViTBackbone` naming what does not fit."""
    if not isinstance(model, VisionTransformer) or isinstance(model, HookedViT):
        return model
    what = name or type(model).__name__
    if type(model) is not VisionTransformer:
        raise NotAViTBackbone(f"model {what!r} is a {type(model).__name__}; svp runs timm's plain "
                              f"VisionTransformer (vit_tiny/small/base/large_patch16_224 and their tags)")
    kinds = {type(b).__name__ for b in model.blocks}
    if kinds != {"Block"} or not all(type(b) is Block for b in model.blocks):
        raise NotAViTBackbone(f"model {what!r} has {'/'.join(sorted(kinds))} blocks; svp's seam runs timm's "
                              f"pre-norm Block")
    if getattr(model, "attn_pool", None) is not None:
        raise NotAViTBackbone(f"model {what!r} pools its tokens by attention (global_pool='map'); svp's methods "
                              f"classify the class token (global_pool='token')")
    if not getattr(model, "has_class_token", model.cls_token is not None):
        raise NotAViTBackbone(f"model {what!r} has no class token; svp's methods classify the class token")
    from timm.layers import PatchEmbed
    if type(model.patch_embed) is not PatchEmbed:   # (a hybrid's CNN stem: its channels are the CNN's: retest 95)
        raise NotAViTBackbone(f"model {what!r} embeds its patches with a {type(model.patch_embed).__name__} (a "
                              f"hybrid CNN stem); svp runs ViTs with timm's PatchEmbed")
    if model.global_pool != "token":
        raise NotAViTBackbone(f"model {what!r} pools its tokens by {model.global_pool!r}; svp's methods classify "
                              f"the class token (global_pool='token')")
    model.__class__ = HookedViT
    return model


def load_checkpoint(model: HookedViT, checkpoint, source: Optional[str] = None) -> HookedViT:
    """Load a ViT checkpoint file into ``model``: Google's ``.npz`` (the ViT-B/16 ImageNet-21k
    weights VPT and its successors start from; read by timm's own numpy loader, which unpickles
    nothing), else a state dict read by svp's loader (safetensors, or a torch file read with
    ``weights_only``) in timm's or the original names (timm's checkpoint filter renames them and
    resamples the position embedding to the model's grid). A head of another class count is left
    out (the run's own is new); one that fits is loaded and marked, as for a Vim, so a run
    replaces it."""
    import os

    from timm.models.vision_transformer import checkpoint_filter_fn

    from .loading import read_state_dict, strict_load, strip_wrappers

    from .loading import CheckpointError

    path = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    source = source or path or "<state dict>"
    if path is not None and path.lower().endswith(".npz"):
        _load_npz(model, path, source)
        return model
    state = strip_wrappers(read_state_dict(checkpoint, source), source)
    _note_grid(model, state.get("pos_embed"))
    try:
        state = checkpoint_filter_fn(state, model)
    except (RuntimeError, ValueError, KeyError, IndexError) as e:   # (a traceback, the file unnamed: retest 95)
        raise CheckpointError(f"{source}: its tensors do not fit the model (another ViT kind: prefix or register "
                              f"tokens, patch size, ...): {type(e).__name__}: {e}") from None
    own = model.state_dict()
    head = [k for k in state if k.startswith("head.")]
    if any(k not in own or tuple(own[k].shape) != tuple(state[k].shape) for k in head):
        for k in head:
            del state[k]
    elif head:
        model.head_from_checkpoint = True
    strict_load(model, state, source, allow_missing=("head.",))
    return model


def _note_grid(model: HookedViT, pos) -> None:
    """The file's own position grid (``model.checkpoint_grid``), where its embedding shows one: for
    svp train's word on the image size (it named the model name's 224 px for a 32 px file: retest 96)."""
    import math
    shape = tuple(getattr(pos, "shape", ()))
    if len(shape) != 3:
        return
    rows = shape[1] - (0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens))
    if rows > 0 and math.isqrt(rows) ** 2 == rows:
        model.checkpoint_grid = (math.isqrt(rows),) * 2


def _load_npz(model: HookedViT, path: str, source: str) -> None:
    """Google's .npz through timm's own loader, which copies what it finds: checked here that the
    file is one (a damaged one was a zipfile traceback), that it holds the model's number of
    blocks (a 2-block file filled a 1-block model) and that every tensor of the model got a value
    (q/k norms, LayerScale kept their initial values silently: retest 95)."""
    import re

    import numpy as np
    from timm.models.vision_transformer import _load_weights

    from .loading import CheckpointError
    try:
        w = np.load(path)   # (allow_pickle=False: numpy's default; arrays read when indexed)
    except Exception as e:   # noqa: BLE001  (BadZipFile, OSError, ValueError: the file is not one)
        raise CheckpointError(f"{source}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with w:   # (one opening for every read before timm's loader: it was opened four times)
        keys = list(w.keys())
        blocks = len({m.group(1) for m in (re.search(r"encoderblock_(\d+)/", k) for k in keys) if m})
        if not blocks:   # big_vision's layout: one array per tensor, its blocks stacked on the first axis
            # (timm indexes the stack, so a longer one filled a shorter model silently: retest 96)
            stacked = [k for k in keys if k.endswith("Transformer/encoderblock/LayerNorm_0/scale")]
            if stacked:
                blocks = int(w[stacked[0]].shape[0]) if w[stacked[0]].ndim == 2 else 0
        if blocks and blocks != len(model.blocks):
            raise CheckpointError(f"{source}: holds {blocks} encoder blocks; the model has {len(model.blocks)} "
                                  f"(model.kwargs depth, or another model name)")
        pos = [k for k in keys if k.endswith("posembed_input/pos_embedding") or k.endswith("pos_embedding")]
        if pos:
            _note_grid(model, w[pos[0]])
        # timm copies a head of the model's class count: marked, as a state dict's is, so a run replaces
        # it (a 10-class .npz trained on from its own head: retest 96)
        head = [k for k in keys if k in ("head/bias", "opt/target/head/bias", "params/head/bias",
                                         "params/img/head/bias")]
        fits = bool(head) and isinstance(model.head, torch.nn.Linear) and \
            int(w[head[0]].shape[-1]) == int(model.head.bias.shape[0])
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith("head.")]
    with torch.no_grad():
        for _, p in params:
            p.fill_(float("nan"))
    try:
        _load_weights(model, path)
    except Exception as e:   # noqa: BLE001  (timm's loader: KeyError, AttributeError, RuntimeError on a mismatch)
        raise CheckpointError(f"{source}: not a ViT .npz checkpoint this model takes ({type(e).__name__}: "
                              f"{e})") from None
    if fits:
        model.head_from_checkpoint = True
    left = [n for n, p in params if torch.isnan(p).any()]
    if left:
        raise CheckpointError(f"{source}: holds no values for {len(left)} of the model's tensors ({', '.join(left[:4])}"
                              f"{', ...' if len(left) > 4 else ''}): a .npz of another ViT kind (q/k norms, "
                              f"LayerScale, register tokens)")
