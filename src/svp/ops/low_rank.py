"""Products with a frozen weight plus a trained low-rank update, W + s B A, without its full gradient.

A LoRA-adapted projection trained through its parametrization (svp.peft.lora) forms W' = W + s B A
on every call and takes its product; autograd then forms the whole weight's gradient, dY^T X (out x
in), only to reduce it to A's and B's (B^T dW', dW' A^T). That gradient is as many FLOPs as the
forward product itself: without in_proj's and out_proj's, a Vim-Tiny batch-8 LoRA step's products
come to 39.6 GFLOP instead of 53.8 (Vim-Small 153.5 instead of 215.9), and on a 2-vCPU Zen 3 they
took 115 ms of a profiled step at 2 threads (docs/benchmarks.md, thirty-ninth round). Here A's and
B's gradients come from products with r columns or rows only,

    dA = (s dY B)^T X,   dB = (s X A^T)^T dY transposed,

and the outputs and X's gradient from the merged weight of each block, formed per call (out x in
x r multiply-adds, small beside the M x out x in of the product; M = batch x tokens):

    Y_k = X (W_k + s B_k A)^T,   dX = sum over k of dY_k (W_k + s B_k A).

``MERGED = False`` keeps the update factored there too, Y = X W^T + (s X A^T) B^T and dX = dY W +
(s dY B) A: the same sums up to float32 rounding, but two more products per block, (M, r) x (r,
out) and (M, r) x (r, in), which run at memory speed (each reads and writes an (M, out) or (M, in)
tensor for 2 r flops per element): merging made a Vim-Tiny batch-8 LoRA step 0.97-0.98x its time at
1 thread and ~0.99x its CPU time at 2 (in-process alternation; Vim-Small's within the noise;
docs/benchmarks.md, forty-third round).

``low_rank_products`` takes W's rows in blocks (in_proj's x and z halves, each contiguous for the
kernels that read them; out_proj in one block) and gives one output per block, as svp.models.vim's
_InProj does for the plain weight: X's gradient is formed once, the blocks' products adding into it.

Tried and not kept (docs/benchmarks.md, forty-ninth round): s B as r more columns of the merged
weights, kept from the forward, so that one product a block gives dX and s dY B together. It took
0.87-0.92x the time of these products alone, but a LoRA training step was no faster (0.98-1.00x):
much of what it removed was waiting for torch's other thread (presumably then paid by the next
operator instead).

The narrow products run on torch's own ``mm`` in the layouts MKL takes fastest (measured on the
Zen 3 at Vim-Tiny in_proj's shapes, (1656, 768) x (768, 8): dY B with B read through a contiguous
(r, out) copy of its transpose 0.36 ms against 0.85 ms from B as it is; B's gradient as an (r, M) x (M, n)
product, 0.38 against 1.86 ms for dY^T (s X A^T)).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .matmul_cpu import addmm_, mm

# The outputs and X's gradient through the merged block weights (see the module doc); False: the
# update's own products added to them
MERGED = True


class _LowRankProducts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, a, b, scale, sizes):
        x2 = x.reshape(-1, x.shape[-1])
        xa = torch.mm(x2, a.t()).mul_(scale)          # s X A^T, (M, r): kept for B's gradient
        outs, row = [], 0
        for n in sizes:
            if MERGED:
                y = mm(x2, _merged(w, a, b, scale, row, n).t())
            else:
                y = mm(x2, w[row:row + n].t())
                y.addmm_(xa, b[row:row + n].t())
            outs.append(y.view(*x.shape[:-1], n))
            row += n
        ctx.save_for_backward(x, w, a, b, xa)
        ctx.scale, ctx.sizes, ctx.merged = scale, tuple(sizes), MERGED
        ctx.set_materialize_grads(False)   # an unused block's gradient: None, not zeros multiplied
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        x, w, a, b, xa = ctx.saved_tensors
        need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
        if all(d is None for d in douts):
            return (None,) * 6
        x2 = x.reshape(-1, x.shape[-1])
        dx = g = db = None
        if need_b:   # (an unused block's rows: zero)
            db = (torch.zeros_like if any(d is None for d in douts) else torch.empty_like)(b)
        merged = ctx.merged
        row = 0
        for n, dy in zip(ctx.sizes, douts):
            if dy is not None and n > 0:   # (an empty block: no rows, no gradient; its reshape failed)
                dy = dy.reshape(-1, n)
                if need_a or (need_x and not merged):
                    bt = b[row:row + n].t().contiguous()         # (r, n): see the module doc
                    gi = torch.mm(dy, bt.t())                    # dY_k B_k, (M, r)
                    g = gi if g is None else g.add_(gi)
                if need_x:
                    # merged: dY_k (W_k + s B_k A), the forward's weight formed again (no copy kept)
                    wk = _merged(w, a, b, ctx.scale, row, n) if merged else w[row:row + n]
                    dx = mm(dy, wk) if dx is None else addmm_(dx, dy, wk)
                if need_b:
                    db[row:row + n] = torch.mm(xa.t(), dy).t()   # ((s X A^T)^T dY_k)^T
            row += n
        da = None
        if g is not None:
            g.mul_(ctx.scale)                                    # s dY B
            if need_x and not merged:
                dx = dx.addmm_(g, a)
            if need_a:
                da = torch.mm(g.t(), x2)
        if dx is not None:
            dx = dx.view(x.shape)
        return dx, None, da, db, None, None


def _merged(w, a, b, scale, row, n):
    """W_k + s B_k A for the block of rows row .. row + n - 1, (n, in): out x in x r multiply-adds,
    against the M x out x r of adding the update's product to each output (M = batch x tokens)."""
    return torch.addmm(w[row:row + n], b[row:row + n], a, alpha=scale)


def low_rank_products(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                      sizes: Sequence[int]) -> tuple:
    """``F.linear(x, w_k + scale * b_k @ a)`` for each block k of ``sizes`` rows of ``w`` (out, in)
    and ``b`` (out, r), ``a`` (r, in): one output (..., size_k) per block. ``w`` gets no gradient
    (a frozen weight: one that requires grad is refused, since its gradient is not formed here); x, a
    and b get theirs. Tensors of one floating dtype on one device (the model: float32 on the CPU)."""
    if sum(sizes) != w.shape[0] or b.shape != (w.shape[0], a.shape[0]) or a.shape[1] != w.shape[1]:
        raise ValueError(f"low_rank_products: blocks {list(sizes)} of w {tuple(w.shape)}, b {tuple(b.shape)}, "
                         f"a {tuple(a.shape)}: expected blocks summing to w's rows, b (out, r), a (r, in)")
    if w.requires_grad and torch.is_grad_enabled():
        raise ValueError("low_rank_products: w requires grad, but its gradient is not formed here; "
                         "expected a frozen weight (train it through the merged weight instead)")
    return _LowRankProducts.apply(x, w.detach(), a, b, float(scale), tuple(sizes))
