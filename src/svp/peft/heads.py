"""Classification heads and the parameter-free SimAM input reweighting (docs/methods.md, notes D6 and D7)."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

HEAD_KINDS = ("linear", "two_layer")


def top_classes(scores: torch.Tensor, k: int):
    """(values, indices) of the ``k`` highest ``scores`` along the last dimension, highest first,
    equal scores in class order (lowest index first). ``torch.topk`` breaks ties by its own
    algorithm, differently for different ``k``: on a row of equal logits `svp predict --topk 1`
    named class 8 and `--topk 10` class 5 first (QA 16d); eval's top-1 came from topk(5)."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def _init_linear(m: nn.Linear):
    # The official init of every head Linear: truncated normal std 0.02, bias 0.
    trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def build_head(kind: str, dim: int, num_classes: int) -> nn.Module:
    """``linear``: Linear(D -> C). ``two_layer``: Linear(D -> D/2) then Linear(D/2 -> C) with no
    activation in between (the official head for CUB / NABirds / Flowers; state-dict names
    ``head.0.*``, ``head.1.*`` as in the official checkpoints)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if kind == "linear":
        head = nn.Linear(dim, num_classes)
        _init_linear(head)
    elif kind == "two_layer":
        head = nn.Sequential(nn.Linear(dim, dim // 2), nn.Linear(dim // 2, num_classes))
        for m in head:
            _init_linear(m)
    else:
        raise ValueError(f"unknown head {kind!r}; expected one of {HEAD_KINDS}")
    return head


def head_kind(head: nn.Module):
    """'linear' / 'two_layer' for heads of those layouts, else None."""
    if isinstance(head, nn.Linear):
        return "linear"
    if isinstance(head, nn.Sequential) and len(head) == 2 and all(isinstance(m, nn.Linear) for m in head):
        return "two_layer"
    return None


def head_num_classes(head: nn.Module):
    if isinstance(head, nn.Linear):
        return head.out_features
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        return head[-1].out_features
    return None


def simam(x: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """Parameter-free SimAM attention on a (B, C, H, W) image, per image and channel:
    e = (x - mu)^2 / (4 (var + lam)) + 0.5 with var = sum (x - mu)^2 / (H W - 1);
    returns x * sigmoid(e)."""
    if x.dim() != 4:
        raise ValueError(f"simam expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    n = x.shape[-2] * x.shape[-1] - 1
    d = (x - x.mean(dim=(-2, -1), keepdim=True)).pow(2)
    var = d.sum(dim=(-2, -1), keepdim=True) / n
    e = d / (4 * (var + lam)) + 0.5
    return x * torch.sigmoid(e)
