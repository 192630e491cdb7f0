"""Selective scan in plain PyTorch, correct on any device (CPU, CUDA, MPS, ...).

One ``torch.autograd.Function`` with a hand-written backward, so the autograd graph is
a single node instead of one node per time step. Time is processed in chunks of
``chunk`` steps: for a chunk, exp(delta*A) and delta*B*u are materialised as
(b, T, g, d/g, n) tensors, the recurrence runs as one in-place ``addcmul`` per step,
and y = C.h is one einsum. Only the state at each chunk start is kept for backward,
which recomputes the chunk's states and then runs the reverse-time recurrence
dh_{t-1} = exp(delta_t A) * (dh_t + C_t g_t), again one ``addcmul`` per step; all other
gradients are batched tensor ops. Peak extra memory is a few (b, T, d, n) tensors.

Computes in float32 (float64 for float64 inputs, so it can be gradchecked). Scans
forward only; :mod:`svp.ops.dispatch` adds ``reverse`` by flipping time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scan_ref import check_scan_args, scan_groups, sum_to_groups

CHUNK = 64


def _grp(X: torch.Tensor, l: int) -> torch.Tensor:
    """(b, n, l) | (b, g, n, l) -> (b, l, g, 1, n)."""
    if X.dim() == 3:
        X = X.unsqueeze(1)
    return X.permute(0, 3, 1, 2).unsqueeze(3)


class SelectiveScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
        b, d, L = u.shape
        N = A.shape[1]
        gB, gC, G = scan_groups(B, C, d)
        dg = d // G
        uu = u.detach().to(cdt).transpose(1, 2).reshape(b, L, G, dg)           # (b, l, G, dg)
        x = delta.detach().to(cdt).transpose(1, 2).reshape(b, L, G, dg)
        if delta_bias is not None:
            x = x + delta_bias.detach().to(cdt).reshape(G, dg)
        dt = F.softplus(x) if delta_softplus else x
        Ag = A.detach().to(cdt).reshape(G, dg, N)
        Bg = _expand(_grp(B.detach().to(cdt), L), G)                          # (b, l, G, 1, n)
        Cg = _expand(_grp(C.detach().to(cdt), L), G)
        T = int(chunk)
        nch = (L + T - 1) // T
        h = torch.zeros(b, G, dg, N, dtype=cdt, device=u.device)
        starts = []
        ys = []
        for k in range(nch):
            s0, s1 = k * T, min(L, (k + 1) * T)
            starts.append(h)
            H = _chunk_states(h, dt[:, s0:s1], Ag, Bg[:, s0:s1], uu[:, s0:s1])[0]
            ys.append(torch.einsum("btgcn,btgn->btgc", H, Cg[:, s0:s1, :, 0]))
            h = H[:, -1]
        y = torch.cat(ys, 1)                                                   # (b, l, G, dg)
        if D is not None:
            y = y + uu * D.detach().to(cdt).reshape(G, dg)
        out = y
        if z is not None:
            zz = z.detach().to(cdt).transpose(1, 2).reshape(b, L, G, dg)
            out = y * F.silu(zz)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(starts, 1))
        ctx.cfg = (bool(delta_softplus), T, G, gB, gC, cdt)
        out = out.reshape(b, L, d).transpose(1, 2).to(u.dtype)
        return out, h.reshape(b, d, N)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        softplus, T, G, gB, gC, cdt = ctx.cfg
        b, d, L = u.shape
        N = A.shape[1]
        dg = d // G
        dev = u.device
        shp = (b, L, G, dg)
        uu = u.detach().to(cdt).transpose(1, 2).reshape(shp)
        x = delta.detach().to(cdt).transpose(1, 2).reshape(shp)
        if delta_bias is not None:
            x = x + delta_bias.detach().to(cdt).reshape(G, dg)
        dt = F.softplus(x) if softplus else x
        Ag = A.detach().to(cdt).reshape(G, dg, N)
        Bg = _expand(_grp(B.detach().to(cdt), L), G)
        Cg = _expand(_grp(C.detach().to(cdt), L), G)
        if dout is None:
            dout = torch.zeros(b, d, L, dtype=cdt, device=dev)
        go = dout.to(cdt).transpose(1, 2).reshape(shp)
        Dg = D.detach().to(cdt).reshape(G, dg) if D is not None else None
        dz = None
        if z is not None:
            zz = z.detach().to(cdt).transpose(1, 2).reshape(shp)
            sg = torch.sigmoid(zz)
            gv = go * zz * sg
        else:
            gv = go
        dD = (gv * uu).sum((0, 1)) if D is not None else None
        du = gv * Dg if D is not None else torch.zeros_like(uu)
        ddt = torch.empty_like(uu)
        dA = torch.zeros(G, dg, N, dtype=cdt, device=dev)
        dBt = torch.empty(b, L, G, N, dtype=cdt, device=dev)
        dCt = torch.empty(b, L, G, N, dtype=cdt, device=dev)
        yC = torch.empty(shp, dtype=cdt, device=dev) if z is not None else None
        dh = (torch.zeros(b, G, dg, N, dtype=cdt, device=dev) if dlast is None
              else dlast.to(cdt).reshape(b, G, dg, N).clone())
        nch = (L + T - 1) // T
        for k in range(nch - 1, -1, -1):
            s0, s1 = k * T, min(L, (k + 1) * T)
            h0 = starts[:, k]
            H, E = _chunk_states(h0, dt[:, s0:s1], Ag, Bg[:, s0:s1], uu[:, s0:s1])
            Cc = Cg[:, s0:s1, :, 0]                                            # (b, t, G, n)
            g = gv[:, s0:s1]
            if yC is not None:
                yC[:, s0:s1] = torch.einsum("btgcn,btgn->btgc", H, Cc)
            dCt[:, s0:s1] = torch.einsum("btgcn,btgc->btgn", H, g)
            dH = g.unsqueeze(-1) * Cc.unsqueeze(3)                             # (b, t, G, dg, n)
            for i in range(s1 - s0 - 1, -1, -1):
                dHi = dH[:, i]
                dHi.add_(dh)
                dh = E[:, i] * dHi
            Hp = torch.cat([h0.unsqueeze(1), H[:, :-1]], 1)
            q = dH * Hp * E                                                    # dL/d(dt*A) per (n)
            Bc = Bg[:, s0:s1]
            sB = (dH * Bc).sum(-1)                                             # (b, t, G, dg)
            dtc = dt[:, s0:s1]
            ddt[:, s0:s1] = (q * Ag).sum(-1) + sB * uu[:, s0:s1]
            du[:, s0:s1] += sB * dtc
            dA += (q * dtc.unsqueeze(-1)).sum((0, 1))
            dBt[:, s0:s1] = torch.einsum("btgcn,btgc->btgn", dH, dtc * uu[:, s0:s1])
        if z is not None:
            yf = yC + (uu * Dg if D is not None else 0)
            dz = go * yf * sg * (1 + zz * (1 - sg))
        ddelta = ddt * torch.sigmoid(x) if softplus else ddt
        need = ctx.needs_input_grad

        def back(t, like):                                                    # (b, l, G, dg) -> (b, d, l)
            return t.reshape(b, L, d).transpose(1, 2).to(like.dtype)

        return (back(du, u) if need[0] else None,
                back(ddelta, delta) if need[1] else None,
                dA.reshape(d, N).to(A.dtype) if need[2] else None,
                sum_to_groups(dBt.permute(0, 2, 3, 1), B.shape, B.dtype) if need[3] else None,
                sum_to_groups(dCt.permute(0, 2, 3, 1), C.shape, C.dtype) if need[4] else None,
                dD.reshape(d).to(D.dtype) if (D is not None and need[5]) else None,
                back(dz, z) if (z is not None and need[6]) else None,
                ddelta.sum((0, 1)).reshape(d).to(delta_bias.dtype) if (delta_bias is not None and need[7]) else None,
                None, None)


def _expand(X, G):
    """(b, l, g, 1, n) -> (b, l, G, 1, n), repeating each of the g groups G//g times."""
    g = X.shape[2]
    return X if g == G else X.repeat_interleave(G // g, dim=2)


def _chunk_states(h0, dt, Ag, Bc, uc):
    """States of one chunk. dt, uc: (b, t, G, dg); Bc: (b, t, G, 1, n). Returns H, E (b, t, G, dg, n)."""
    E = torch.exp(dt.unsqueeze(-1) * Ag)
    H = (dt * uc).unsqueeze(-1) * Bc                                           # starts as delta*B*u
    h = h0
    for i in range(H.shape[1]):
        Hi = H[:, i]
        Hi.addcmul_(E[:, i], h)
        h = Hi
    return H, E


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, chunk=CHUNK):
    """Pure-PyTorch selective scan (any device). Same arguments as ``selective_scan_ref``."""
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"selective_scan_torch: chunk must be a positive number of steps; got {chunk!r}")
    out, last = SelectiveScanTorch.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
    return (out, last) if return_last_state else out
