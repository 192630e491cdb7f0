"""Causal depthwise conv1d (the ``causal_conv1d`` op), pure PyTorch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None) -> torch.Tensor:
    """x: (batch, dim, len); weight: (dim, width); bias: (dim,). Output at t sees x[..., t-width+1 : t+1]."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"expected x (batch, dim, len) and weight (dim, width); got {tuple(x.shape)}, {tuple(weight.shape)}")
    dim, width = weight.shape
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=width - 1, groups=dim)[..., : x.shape[-1]]
    return F.silu(out) if activation is not None else out


def causal_conv1d_bld(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None, reverse: bool = False) -> torch.Tensor:
    """The same conv on a (batch, len, dim) tensor, without transposes.

    ``reverse=True`` is the causal conv of the time-reversed sequence, returned in
    the original order (the backward branch of the bidirectional mixer) without
    flipping: out[t] = sum_j weight[:, W-1-j] * x[t+j].
    Written as W shifted multiply-adds: for W=4 this is cheaper than F.conv1d plus the
    two (b, d, l) <-> (b, l, d) copies it needs.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"expected x (batch, len, dim) and weight (dim, width); got {tuple(x.shape)}, {tuple(weight.shape)}")
    L = x.shape[1]
    width = weight.shape[1]
    w = weight.to(x.dtype).t()  # (width, dim)
    if reverse:
        xp = F.pad(x, (0, 0, 0, width - 1))
        w = w.flip(0)
    else:
        xp = F.pad(x, (0, 0, width - 1, 0))
    out = xp[:, 0:L] * w[0]
    for k in range(1, width):
        out = out + xp[:, k:k + L] * w[k]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return F.silu(out) if activation is not None else out


causal_conv1d = causal_conv1d_ref
