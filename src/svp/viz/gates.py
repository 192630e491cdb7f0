"""Gate activations and information propagation of Vision Mamba, read from the real
forward pass.

Every :class:`~svp.models.vim.BiMambaMixer` calls ``mixer.gate_hook(mixer, direction,
delta, delta_bias, A, B, C)`` just before its selective scan, with exactly the tensors
the scan is about to use. :class:`GateRecorder` installs such hooks (and a thin
wrapper around ``VisionMamba.forward_features`` that observes the sequence layout
and the class-token position per layer), runs nothing itself, and turns what it saw
into per-layer, per-direction, per-token numbers. Nothing of the model is
re-implemented: whatever a PEFT method does to the sequence (SVP adds prompts, VPT
inserts tokens, LoRA changes projections) is reflected in the recorded gates.

What is computed, for layer l, direction d in {forward, backward}, token i, with
Delta_i = softplus(delta_i + delta_bias) in R^E (E channels), A in R^{E x N}
(A = -exp(A_log), N states) and B_i in R^N:

``update``      mean_e Delta_{i,e}                         (update/input-gate step size)
``update_db``   mean_{e,n} |Delta_{i,e} B_{i,n}|            (= mean_e Delta_{i,e} * mean_n |B_{i,n}|,
                                                            since Delta > 0; the input-gate weight
                                                            of the discretised B-bar = Delta B)
``forget``      mean_{e,n} exp(Delta_{i,e} A_{e,n})         (forget gate on h_{i-1}; 1 keeps the
                                                            state, 0 erases it)
``propagation`` natural log of the geometric mean over (e, n) of the product of forget gates a
                token's contribution is multiplied by on its way to the class-token position c:
                forward scan (left to right), token j < c:  sum_{k=j+1..c} mean_{e,n} Delta_{k,e} A_{e,n}
                backward scan (right to left), token j > c: sum_{k=c..j-1} mean_{e,n} Delta_{k,e} A_{e,n}
                token c itself: 0; tokens the direction cannot reach c from (j > c forward,
                j < c backward): -inf. Values are <= 0; 0 means nothing is forgotten on the way,
                -5 means the state carrying token j is scaled by about e^-5 when it reaches c.
                It ignores the input weight B-bar_j, the read-out C_c and the causal conv (which
                mixes 3 neighbours into each token), so it is a decay-only transport measure.

The combined direction ``both`` is the mean of the two directions for ``update``,
``update_db`` and ``forget``, and ``logaddexp`` of the two for ``propagation`` (each
patch reaches the class token through exactly one scan direction, so this is simply
the forward value left of c and the backward value right of c).

Token layout: positions of the mixer's sequence are mapped back to the patch grid.
The embedded sequence is ``[patches 0..c-1, cls, patches c..M-1]`` with c = M // 2.
A ``forward_features`` layer hook (how PEFT methods act) may change the sequence; when
it changes the length or the class position, rows that are bit-identical before and
after the hook are matched to follow the patch tokens, rows that match nothing are
marked as extra (prompt) tokens, and the hook's returned ``cls_pos`` marks the class
token. A hook that keeps length and class position (SVP) keeps the layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import VizError
from ..models.vim import VisionMamba

__all__ = ["GateRecorder", "GateMaps", "record_gates", "analyze", "find_vim", "QUANTITIES",
           "DIRECTIONS", "CLS", "EXTRA"]

QUANTITIES = ("update", "update_db", "forget", "propagation")
DIRECTIONS = ("forward", "backward", "both")
CLS = -1    # layout code of the class token
EXTRA = -2  # layout code of a token that is neither a patch nor the class token (a prompt)


def find_vim(model: nn.Module):
    """The (single) VisionMamba inside ``model`` (``model`` itself, a PeftModel, a wrapper)."""
    found = [m for m in model.modules() if isinstance(m, VisionMamba)]
    if not found:
        raise ValueError(f"{type(model).__name__} contains no VisionMamba module; "
                         "gate analysis needs a Vim backbone (svp.models.vim.VisionMamba)")
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} contains {len(found)} VisionMamba modules; "
                         "pass the one to analyse")
    return found[0]


def _default_layout(num_patches: int) -> torch.Tensor:
    c = num_patches // 2
    return torch.cat([torch.arange(c), torch.tensor([CLS]), torch.arange(c, num_patches)])


def _match_layout(prev_layout: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                  cls_pos: int) -> torch.Tensor:
    """Follow tokens through a hook that changed the sequence: row j of ``after`` that is
    bit-identical to row i of ``before`` inherits ``prev_layout[i]``; other rows are EXTRA.
    ``before``/``after``: (L_in, D) and (L_out, D) of one sample."""
    out = torch.full((after.shape[0],), EXTRA, dtype=torch.long)
    used = set()
    for start in range(0, after.shape[0], 256):
        eq = (after[start:start + 256, None, :] == before[None, :, :]).all(-1)  # (chunk, L_in)
        for r, row in enumerate(eq):
            hits = torch.nonzero(row).flatten().tolist()
            hits = [h for h in hits if int(prev_layout[h]) >= 0 and h not in used]
            if hits:
                used.add(hits[0])
                out[start + r] = prev_layout[hits[0]]
    if not 0 <= cls_pos < out.shape[0]:
        raise ValueError(f"layer hook returned cls_pos {cls_pos} outside the sequence of length {out.shape[0]}")
    out[cls_pos] = CLS
    return out


@dataclass
class _Pass:
    grid: Tuple[int, int]
    layout: Dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> (L,)
    cls_pos: Dict[int, int] = field(default_factory=dict)
    tokens: Dict[Tuple[int, str, str], torch.Tensor] = field(default_factory=dict)  # (layer, dir, q) -> (b, L)


class GateRecorder:
    """Context manager that records gate statistics of every forward pass run inside it.

    >>> with GateRecorder(model) as rec:
    ...     model(images)
    >>> maps = rec.result()          # GateMaps

    ``model`` is any nn.Module containing one VisionMamba (a bare Vim, a PeftModel,
    a wrapper). The hooks are removed on exit, also after an exception.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.vim = find_vim(model)
        self.mixers: List[nn.Module] = [layer.mixer for layer in self.vim.layers]
        self._mixer_layer = {id(m): i for i, m in enumerate(self.mixers)}
        self.passes: List[_Pass] = []
        self._current: Optional[_Pass] = None
        self._active = False

    # -- install / remove ------------------------------------------------------------
    def __enter__(self):
        if self._active:
            raise RuntimeError("GateRecorder is already active")
        for m in self.mixers:
            if getattr(m, "gate_hook", None) is not None:
                raise RuntimeError("a gate_hook is already installed on a mixer (nested GateRecorder?)")
        if "forward_features" in self.vim.__dict__:
            raise RuntimeError("VisionMamba.forward_features is already wrapped on this instance")
        for m in self.mixers:
            m.gate_hook = self._gate_hook
        original = self.vim.forward_features  # bound method
        recorder = self

        def forward_features(x, hook=None, return_cls_pos=False):
            return recorder._run_pass(original, x, hook, return_cls_pos)

        self.vim.forward_features = forward_features
        self._active = True
        return self

    def __exit__(self, *exc):
        for m in self.mixers:
            m.gate_hook = None
        self.vim.__dict__.pop("forward_features", None)
        self._current = None
        self._active = False
        return False

    # -- observation -------------------------------------------------------------------
    def _run_pass(self, original, x, user_hook, return_cls_pos):
        grid = self.vim.patch_embed.grid_for(x.shape[-2:])
        p = _Pass(grid=grid)
        layout = _default_layout(grid[0] * grid[1])

        def hook(i, hidden, residual, cls_pos):
            nonlocal layout
            if user_hook is not None:
                h2, r2, c2 = user_hook(i, hidden, residual, cls_pos)
            else:
                h2, r2, c2 = hidden, residual, cls_pos
            if h2.shape[1] != hidden.shape[1] or c2 != cls_pos:
                before = hidden[0] if residual is None else (residual[0] + hidden[0])
                after = h2[0] if r2 is None else (r2[0] + h2[0])
                layout = _match_layout(layout, before.detach(), after.detach(), int(c2))
            p.layout[i] = layout
            p.cls_pos[i] = int(c2)
            return h2, r2, c2

        self._current = p
        try:
            out = original(x, hook=hook, return_cls_pos=return_cls_pos)
        finally:
            self._current = None
        self.passes.append(p)
        return out

    @torch.no_grad()
    def _gate_hook(self, mixer, direction, delta, delta_bias, A, B, C):
        p = self._current
        if p is None:
            raise RuntimeError("a Vim mixer ran outside VisionMamba.forward_features while gates were being "
                               "recorded; svp.viz can only map tokens of models that run forward_features")
        layer = self._mixer_layer[id(mixer)]
        L = delta.shape[1]
        layout = p.layout.get(layer)
        if layout is None or layout.shape[0] != L:
            raise RuntimeError(f"layer {layer}: the mixer saw {L} tokens but the recorded layout has "
                               f"{None if layout is None else layout.shape[0]}")
        c = p.cls_pos[layer]
        dt = F.softplus(delta.float() + delta_bias.float())            # (b, L, E)
        A = A.float()                                                  # (E, N)
        upd = dt.mean(-1)                                              # (b, L)
        upd_db = upd * B.float().abs().mean(-1)                        # mean_{e,n} |dt_e B_n|
        forget = torch.stack([torch.exp(dt_b[..., None] * A).mean((-1, -2)) for dt_b in dt])  # (b, L)
        # mean over (e, n) of log of the per-token forget gate: Delta_{k,e} * A_{e,n}
        logf = (dt * A.mean(-1)).mean(-1)                              # (b, L)
        prop = torch.full_like(logf, -math.inf)
        prop[:, c] = 0.0
        if direction == "forward":   # token j < c: product over k = j+1 .. c
            if c > 0:
                seg = logf[:, 1:c + 1]                                 # k = 1..c
                suffix = seg.flip(-1).cumsum(-1).flip(-1)              # sum_{k=j+1..c} for j = 0..c-1
                prop[:, :c] = suffix
        else:                        # token j > c: product over k = c .. j-1
            if c < L - 1:
                prop[:, c + 1:] = logf[:, c:L - 1].cumsum(-1)
        for q, v in (("update", upd), ("update_db", upd_db), ("forget", forget), ("propagation", prop)):
            p.tokens[(layer, direction, q)] = v.detach().cpu()

    # -- result ------------------------------------------------------------------------
    def result(self) -> "GateMaps":
        if not self.passes:
            raise RuntimeError("no forward pass was recorded; run the model inside the GateRecorder context")
        grids = {p.grid for p in self.passes}
        if len(grids) > 1:
            raise ValueError(f"recorded passes have different patch grids {sorted(grids)}; analyse one size at a time")
        maps = GateMaps.from_passes(self.passes, len(self.mixers))
        pe = self.vim.patch_embed
        maps.patch_size = tuple(int(v) for v in pe.patch_size)
        maps.stride = tuple(int(v) for v in getattr(pe, "stride", pe.patch_size))
        return maps


record_gates = GateRecorder


@dataclass
class GateMaps:
    """Recorded gate statistics.

    ``grid[q]``: (n_images, depth, 3, gh, gw) float tensor per quantity q in QUANTITIES,
    directions in the order of DIRECTIONS (forward, backward, both), patch values on
    the patch grid (NaN for a patch the model dropped).
    ``cls[q]``: (n_images, depth, 3) the value at the class-token position.
    ``tokens[q]``: per layer a (n_images, 2, L_l) tensor in sequence order (forward,
    backward), with ``layout[l]`` (L_l,) giving each position's patch index, CLS (-1)
    or EXTRA (-2, prompt tokens) and ``cls_pos[l]``.
    ``patch_size``, ``stride``: (height, width) of the model's patches and of their step, in
    input pixels (where a figure draws each patch: overlapping ones are a stride apart); None
    where unknown.
    """
    grid_size: Tuple[int, int]
    grid: Dict[str, torch.Tensor]
    cls: Dict[str, torch.Tensor]
    tokens: Dict[str, List[torch.Tensor]]
    layout: List[torch.Tensor]
    cls_pos: List[int]
    patch_size: Optional[Tuple[int, int]] = None
    stride: Optional[Tuple[int, int]] = None

    @property
    def depth(self) -> int:
        return len(self.layout)

    @property
    def num_images(self) -> int:
        return next(iter(self.grid.values())).shape[0]

    def map(self, quantity: str, layer: int, direction: str = "both", image: int = 0) -> torch.Tensor:
        """(gh, gw) map of one quantity, layer, direction and image."""
        self._check(quantity, direction, image)
        if not -self.depth <= layer < self.depth:
            raise ValueError(f"layer {layer} out of range for a model of depth {self.depth}")
        return self.grid[quantity][image, layer, DIRECTIONS.index(direction)]

    def _check(self, quantity: str, direction: str, image: int) -> None:
        if quantity not in QUANTITIES:
            raise ValueError(f"unknown quantity {quantity!r}; choose from {', '.join(QUANTITIES)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
        if not -self.num_images <= image < self.num_images:
            raise ValueError(f"image {image} out of range: {self.num_images} image(s) were analysed")

    def extra_tokens(self, layer: int) -> int:
        return int((self.layout[layer] == EXTRA).sum())

    @classmethod
    def from_passes(cls, passes: Sequence[_Pass], depth: int) -> "GateMaps":
        gh, gw = passes[0].grid
        M = gh * gw
        layouts, cls_pos = [], []
        for l in range(depth):
            lay = passes[0].layout.get(l)
            if lay is None:
                raise RuntimeError(f"layer {l} was never reached in the recorded pass")
            for p in passes[1:]:
                if not torch.equal(p.layout[l], lay) or p.cls_pos[l] != passes[0].cls_pos[l]:
                    raise RuntimeError(f"layer {l}: the token layout differs between recorded passes")
            layouts.append(lay)
            cls_pos.append(passes[0].cls_pos[l])
        grid, clsv, tokens = {}, {}, {}
        for q in QUANTITIES:
            per_layer = []
            for l in range(depth):
                missing = [d for d in ("forward", "backward") if (l, d, q) not in passes[0].tokens]
                if missing:
                    raise RuntimeError(f"layer {l}: no {missing[0]} gate was recorded (did the mixer run?)")
                per_layer.append(torch.stack([torch.cat([p.tokens[(l, d, q)] for p in passes])
                                              for d in ("forward", "backward")], dim=1))  # (n, 2, L)
            tokens[q] = per_layer
            n = per_layer[0].shape[0]
            g = torch.full((n, depth, 3, M), math.nan)
            cv = torch.empty(n, depth, 3)
            for l, t in enumerate(per_layer):
                if q == "propagation":  # each token reaches cls through one direction; cls itself: 0
                    both = torch.logaddexp(t[:, 0], t[:, 1])
                    both[:, cls_pos[l]] = 0.0
                else:
                    both = t.mean(1)
                t3 = torch.cat([t, both[:, None]], dim=1)  # (n, 3, L)
                lay = layouts[l]
                pos = torch.nonzero(lay >= 0).flatten()
                g[:, l, :, lay[pos]] = t3[:, :, pos]
                cv[:, l] = t3[:, :, cls_pos[l]]
            grid[q] = g.reshape(n, depth, 3, gh, gw)
            clsv[q] = cv
        return cls(grid_size=(gh, gw), grid=grid, cls=clsv, tokens=tokens, layout=layouts, cls_pos=cls_pos)

    def region_means(self, mask: torch.Tensor, quantity: str, direction: str = "both",
                     image: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-layer mean over patches inside / outside ``mask`` ((gh, gw) weights in [0, 1],
        e.g. the fraction of each patch covered by the object). Returns two (depth,) tensors.
        For ``propagation`` the mean is taken over finite values only."""
        self._check(quantity, direction, image)
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if tuple(mask.shape) != tuple(self.grid_size):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the patch grid {self.grid_size}")
        g = self.grid[quantity][image, :, DIRECTIONS.index(direction)].reshape(self.depth, -1)
        w_in = mask.reshape(1, -1).expand_as(g).clone()
        w_out = (1 - mask).reshape(1, -1).expand_as(g).clone()
        ok = torch.isfinite(g)
        w_in[~ok] = 0
        w_out[~ok] = 0
        gz = torch.where(ok, g, torch.zeros_like(g))
        inside = (gz * w_in).sum(1) / w_in.sum(1).clamp_min(1e-12)
        outside = (gz * w_out).sum(1) / w_out.sum(1).clamp_min(1e-12)
        inside[w_in.sum(1) == 0] = math.nan
        outside[w_out.sum(1) == 0] = math.nan
        return inside, outside


@torch.no_grad()
def analyze(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> GateMaps:
    """Run ``model`` (eval mode, no grad) on normalised ``images`` (n, 3, H, W) and return
    the recorded :class:`GateMaps`. The train/eval mode of every submodule is restored afterwards
    (a PeftModel trains with parts in eval mode; so may a caller's model)."""
    if not isinstance(images, torch.Tensor):
        raise VizError(f"images: expected a normalised (n, 3, H, W) float tensor (svp.viz.cli.prepare_image "
                       f"makes one from a PIL image); got {type(images).__name__}")
    if images.ndim != 4:
        raise VizError(f"images must be a (n, C, H, W) tensor, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise VizError(f"images: an empty batch, shape {tuple(images.shape)}; give at least one image")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with GateRecorder(model) as rec:
            for start in range(0, images.shape[0], batch_size):
                model(images[start:start + batch_size])
        return rec.result()
    finally:
        for m, training in modes:
            m.training = training
