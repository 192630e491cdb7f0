"""Reference selective scan (Mamba "S6"), pure PyTorch.

Same signature and semantics as mamba_ssm's ``selective_scan_ref``. This is the
definition every fast backend is tested against; it favours clarity over speed.

Shapes (batch b, channels d, state n, length l, groups g):
    u, delta, z : (b, d, l)
    A           : (d, n)             real, usually negative (A = -exp(A_log))
    B, C        : (b, n, l) or grouped (b, g, n, l), input-dependent
    D           : (d,)                skip connection
    delta_bias  : (d,)
Recurrence per channel d and state n:
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,  then y_t *= silu(z_t)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _expand_groups(X: torch.Tensor, dim: int) -> torch.Tensor:
    """(b, n, l) -> (b, 1, n, l); (b, g, n, l) -> (b, d, n, l) by repeating each group."""
    if X.dim() == 3:
        return X.unsqueeze(1)
    g = X.shape[1]
    if dim % g:
        raise ValueError(f"grouped B/C: channels ({dim}) must be a multiple of groups ({g})")
    return X.repeat_interleave(dim // g, dim=1)


def scan_groups(B: torch.Tensor, C: torch.Tensor, dim: int):
    """(gB, gC, G): the groups of B and C (1 when shared, (b, n, l)) and the finest grouping
    G = lcm(gB, gC) that every fast backend iterates over (channel c is in group c // (dim / G))."""
    gB = 1 if B.dim() == 3 else B.shape[1]
    gC = 1 if C.dim() == 3 else C.shape[1]
    G = math.lcm(gB, gC)
    if dim % G:
        raise ValueError(f"grouped B/C: channels ({dim}) must be a multiple of groups ({gB}, {gC})")
    return gB, gC, G


def sum_to_groups(grad: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Gradient per finest group (b, G, n, l) -> ``shape`` (B's or C's: (b, g, n, l) or
    shared (b, n, l)) and ``dtype``: sums the G // g finer groups that share one group."""
    b, G, n, l = grad.shape
    g = 1 if len(shape) == 3 else shape[1]
    if g != G:
        grad = grad.reshape(b, g, G // g, n, l).sum(2)
    return grad.reshape(shape).to(dtype)


def check_scan_args(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """The shapes every scan backend takes (each checks them: the fast kernels index their
    inputs by these sizes and would read past a shorter tensor)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, len); got u {tuple(u.shape)}, delta {tuple(delta.shape)}")
    b, d, l = u.shape
    if l < 1:
        raise ValueError(f"u and delta must hold at least one time step (len >= 1); got {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim={d}, d_state); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        ok = (X.dim() == 3 and X.shape == (b, n, l)) or (X.dim() == 4 and X.shape[0] == b and X.shape[2:] == (n, l))
        if not ok:
            raise ValueError(f"{name} must be (batch={b}, d_state={n}, len={l}) or (batch, groups, d_state, len); "
                             f"got {tuple(X.shape)}")
        if X.dim() == 4 and (X.shape[1] < 1 or d % X.shape[1]):
            raise ValueError(f"{name}'s groups ({X.shape[1]}) must divide dim={d}; got {tuple(X.shape)}")
    if D is not None and D.shape != (d,):
        raise ValueError(f"D must be ({d},); got {tuple(D.shape)}")
    if delta_bias is not None and delta_bias.shape != (d,):
        raise ValueError(f"delta_bias must be ({d},); got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must match u {tuple(u.shape)}; got {tuple(z.shape)}")


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    # float32 for half/bfloat16/float32 inputs (as mamba_ssm); float64 stays float64 so
    # that gradcheck and high-precision references are possible.
    ct = torch.promote_types(u.dtype, torch.float32)
    u = u.to(ct)
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(ct)
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    A = A.to(ct)
    Bx = _expand_groups(B.to(ct), d)  # (b, 1|d, n, l)
    Cx = _expand_groups(C.to(ct), d)

    deltaA = torch.exp(delta.unsqueeze(2) * A[None, :, :, None])      # (b, d, n, l)
    deltaB_u = (delta * u).unsqueeze(2) * Bx                           # (b, d, n, l)
    h = u.new_zeros(b, d, A.shape[1])
    ys = []
    # unbind slices every step in one autograd node; indexing deltaA[..., t] in the
    # loop would make backward materialise a full-size zero tensor per step (L^2).
    for dA, dBu, c in zip(deltaA.unbind(-1), deltaB_u.unbind(-1), Cx.unbind(-1)):
        h = dA * h + dBu
        ys.append((h * c).sum(-1))
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out
