"""The Triton causal conv1d (svp.ops.conv_triton), run on CPU tensors through Triton's
interpreter: outputs and every gradient against the float64 reference, both directions, with
and without bias and SiLU, widths 1-4, shapes that fill no tile; reduced-precision and
strided inputs; the same bits on every run; bad input; and the mixer taking it where the scan
runs on the 'triton' backend (and not otherwise)."""
from __future__ import annotations

import itertools

import pytest
import torch

from svp.errors import BackendError
from svp.ops import set_backend
from svp.ops.conv import causal_conv1d_bld, causal_conv1d_ref
from triton_helpers import Fills, interpreter, require_triton  # noqa: F401  (interpreter: an autouse fixture)

triton = require_triton()

from svp.ops import conv_triton  # noqa: E402
from svp.ops.conv_triton import causal_conv1d_triton  # noqa: E402


@pytest.fixture(params=["split", "fused"])
def backward_form(request, monkeypatch):
    """Each test that takes it runs with both forms of the backward (conv_triton.BACKWARD)."""
    monkeypatch.setattr(conv_triton, "BACKWARD", request.param)
    return request.param


def _reference(x, w, bias, act, reverse):
    """float64, through F.conv1d on the (flipped, for reverse) (b, d, l) layout: another route
    than causal_conv1d_bld's shifted multiply-adds."""
    x = x.flip(1) if reverse else x
    out = causal_conv1d_ref(x.transpose(1, 2), w, bias, act).transpose(1, 2)
    return out.flip(1) if reverse else out


def _run(x, w, bias, act, reverse, g):
    out = causal_conv1d_triton(x, w, bias, act, reverse=reverse)
    leaves = [x, w] + ([bias] if bias is not None else [])
    return (out, *torch.autograd.grad(out, leaves, g))


def _expected(x, w, bias, act, reverse, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, w) + ((bias,) if bias is not None else ())]
    out = _reference(leaves[0], leaves[1], leaves[2] if bias is not None else None, act, reverse)
    return (out, *torch.autograd.grad(out, leaves, g.double()))


def _worst(got, want):
    return max(((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(got, want))


# (batch, len, dim, width): one tile and less, several tiles along time and channels with
# ragged ends, a width that reaches past the whole sequence
SHAPES = [(2, 37, 70, 4), (1, 5, 8, 3), (3, 65, 129, 4), (2, 33, 64, 2), (1, 2, 16, 4), (2, 9, 24, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,act,reverse", list(itertools.product([True, False], [None, "silu"], [False, True])))
def test_matches_the_float64_reference(shape, bias, act, reverse, backward_form):
    b, L, d, W = shape
    # (a seed of the case's own, the same in every process: str hashes are salted per process)
    gen = torch.Generator().manual_seed(SHAPES.index(shape) * 8 + 4 * bias + 2 * (act is not None) + reverse)
    x = torch.randn(b, L, d, generator=gen, requires_grad=True)
    w = torch.randn(d, W, generator=gen, requires_grad=True)
    bv = torch.randn(d, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(b, L, d, generator=gen)
    got = _run(x, w, bv, act, reverse, g)
    want = _expected(x, w, bv, act, reverse, g)
    assert got[0].dtype == x.dtype and [t.shape for t in got] == [t.shape for t in want]
    assert _worst(got, want) < 2e-6
    # and the pure-PyTorch op the model runs elsewhere agrees with the reference route
    assert (causal_conv1d_bld(*[t.detach().double() if t is not None else None for t in (x, w, bv)], act,
                              reverse=reverse) - want[0]).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_input_gives_its_dtype_and_float32_sums(dtype, backward_form):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 72, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(72, 4, generator=gen, requires_grad=True)
    bias = torch.randn(72, generator=gen, requires_grad=True)
    g = torch.randn(2, 40, 72, generator=gen).to(dtype)
    got = _run(x, w, bias, "silu", True, g)
    want = _expected(x, w, bias, "silu", True, g)
    assert [t.dtype for t in got] == [dtype, dtype, torch.float32, torch.float32]
    # the output and dx are rounded once to the input's dtype; the weight sums stay float32
    assert _worst(got[:2], want[:2]) < 1e-2
    assert _worst(got[2:], want[2:]) < 1e-5


def test_strided_input_and_gradient_are_read_in_place(backward_form):
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(2, 30, 100, generator=gen)
    x = big[:, :, 10:80].requires_grad_()            # (b, l, d) with a row stride of 100
    w = torch.randn(100, 6, generator=gen)[:70, 1:5].requires_grad_()   # a strided weight too
    g = torch.randn(2, 70, 30, generator=gen).transpose(1, 2)            # a transposed gradient
    assert not x.is_contiguous() and not w.is_contiguous() and not g.is_contiguous()
    got = _run(x, w, None, "silu", False, g)
    want = _expected(x, w, None, "silu", False, g)
    assert _worst(got, want) < 2e-6


def test_same_bits_on_every_run(backward_form):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 50, 70, generator=gen, requires_grad=True)
    w = torch.randn(70, 4, generator=gen, requires_grad=True)
    bias = torch.randn(70, generator=gen, requires_grad=True)
    g = torch.randn(3, 50, 70, generator=gen)
    a, b = _run(x, w, bias, "silu", True, g), _run(x, w, bias, "silu", True, g)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_bad_input_is_named(monkeypatch):
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match=r"\(dim,\) bias; got \(1, 1, 8\)"):
        causal_conv1d_triton(x, torch.randn(8, 4), torch.randn(1, 1, 8))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_triton(x, torch.randn(8, 4), None, "relu")
    with pytest.raises(ValueError, match=r"weight \(dim, width\); got \(1, 4, 8\), \(7, 4\)"):
        causal_conv1d_triton(x, torch.randn(7, 4))
    with pytest.raises(BackendError, match=r"x is torch.float64 \(use the 'torch' or 'cpu' scan backend for it\)"):
        causal_conv1d_triton(x.double(), torch.randn(8, 4))
    monkeypatch.setattr(conv_triton, "BACKWARD", "fast")
    x1 = torch.randn(1, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="conv_triton.BACKWARD must be 'split' or 'fused'; got 'fast'"):
        causal_conv1d_triton(x1, torch.randn(8, 4)).sum().backward()
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        causal_conv1d_triton(x, torch.randn(8, 4))


def _mixer():
    from svp.models.vim import BiMambaMixer
    torch.manual_seed(0)
    return BiMambaMixer(16, d_state=4, expand=2)


def test_the_mixer_takes_it_where_the_scan_runs_on_triton(monkeypatch):
    """models/vim.py's conv + x_proj: the Triton kernels as one node with the 'triton' scan
    backend, their values those of the PyTorch form; with conv_triton.ENABLED off, or another
    backend, never."""
    calls = []
    real = conv_triton.causal_conv1d_proj_triton

    def spy(*a, **k):
        calls.append(k.get("reverse"))
        return real(*a, **k)

    monkeypatch.setattr(conv_triton, "causal_conv1d_proj_triton", spy)
    m = _mixer()
    x = torch.randn(2, 9, m.d_inner, requires_grad=True)
    outs = {}
    for backend, enabled in (("triton", True), ("triton", False), ("torch", True)):
        monkeypatch.setattr(conv_triton, "ENABLED", enabled)
        set_backend(backend)
        calls.clear()
        for reverse, conv, proj in ((False, m.conv1d, m.x_proj), (True, m.conv1d_b, m.x_proj_b)):
            y, dbl = m._conv_proj(x, conv, proj, reverse)
            (dx,) = torch.autograd.grad((y * dbl[..., :1]).sum(), [x])
            outs[backend, enabled, reverse] = y.detach(), dbl.detach(), dx
        assert calls == ([False, True] if (backend, enabled) == ("triton", True) else []), (backend, enabled)
    for reverse in (False, True):
        for a, b in zip(outs["triton", True, reverse], outs["torch", True, reverse]):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    # models/vim.py's GPU_JOINT_NODES off (the A/B of benchmarks/gpu_check.py): the conv's node
    # and x_proj's apart, as before
    from svp.models import vim
    monkeypatch.setattr(vim, "GPU_JOINT_NODES", False)
    monkeypatch.setattr(conv_triton, "ENABLED", True)
    set_backend("triton")
    calls.clear()
    m._conv_proj(x, m.conv1d, m.x_proj, False)
    assert calls == []


def _conv_then_proj(x, w, bias, pw, reverse):
    """What the joint node replaces: the conv's node, then x_proj's product of its output."""
    u = causal_conv1d_triton(x, w, bias, "silu", reverse=reverse)
    return u, torch.nn.functional.linear(u, pw)


@pytest.mark.parametrize("reverse", [False, True])
def test_conv_and_projection_as_one_node_match_the_two_nodes(reverse, backward_form):
    """causal_conv1d_proj_triton: the conv's output and x_proj's product of it, with every
    gradient, equal to the two nodes autograd joins (the same forward bits; the gradients to
    float32 rounding: x_proj's input gradient is added to the scan's by the product itself),
    and no zero tensor where one output's gradient is unused."""
    gen = torch.Generator().manual_seed(5)
    x, w, bias, pw = (torch.randn(2, 19, 24, generator=gen), torch.randn(24, 4, generator=gen) * 0.5,
                      torch.randn(24, generator=gen) * 0.1, torch.randn(7, 24, generator=gen) * 0.3)
    gu, gp = torch.randn(2, 19, 24, generator=gen), torch.randn(2, 19, 7, generator=gen)
    res = []
    for fn in (conv_triton.causal_conv1d_proj_triton, None):
        leaves = [t.clone().requires_grad_() for t in (x, w, bias, pw)]
        outs = (fn(*leaves, "silu", reverse=reverse) if fn else _conv_then_proj(*leaves, reverse))
        res.append((*[o.detach() for o in outs], *torch.autograd.grad(outs, leaves, (gu, gp))))
    for i, (a, b) in enumerate(zip(*res)):
        if i < 2:
            assert torch.equal(a, b), i
        else:
            assert (a - b).abs().max() <= 1e-6 * b.abs().max(), i
    # only the projection used (the scan's gradient absent): its gradient alone reaches the conv
    leaves = [t.clone().requires_grad_() for t in (x, w, bias, pw)]
    with Fills() as fills:
        got = torch.autograd.grad(conv_triton.causal_conv1d_proj_triton(*leaves, "silu", reverse=reverse)[1],
                                  leaves, gp)
    assert fills.count == 0
    want = torch.autograd.grad(_conv_then_proj(*leaves, reverse)[1], leaves, gp)
    assert all((a - b).abs().max() <= 1e-6 * b.abs().max() for a, b in zip(got, want))


def test_conv_and_projection_under_autocast_cast_as_autocast_does():
    """Under autocast (bfloat16 x, as in_proj gives it; the CPU's autocast here, a GPU's in a
    run) the joint node's product takes autocast's casts: the same output bits as x_proj's
    product under autocast, and gradients to bfloat16 rounding, the weight's in float32."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 21, 32, generator=gen).bfloat16()
    w, bias, pw = torch.randn(32, 4, generator=gen) * 0.5, torch.randn(32, generator=gen) * 0.1, \
        torch.randn(9, 32, generator=gen) * 0.3
    gu, gp = torch.randn(2, 21, 32, generator=gen).bfloat16(), torch.randn(2, 21, 9, generator=gen).bfloat16()
    res = []
    for fn in (conv_triton.causal_conv1d_proj_triton, None):
        leaves = [t.clone().requires_grad_() for t in (x, w, bias, pw)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = (fn(*leaves, "silu") if fn else _conv_then_proj(*leaves, False))
        assert outs[1].dtype == torch.bfloat16
        res.append((*[o.detach() for o in outs], *torch.autograd.grad(outs, leaves, (gu, gp))))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    assert res[0][5].dtype == torch.float32    # x_proj's weight gradient in the weight's dtype
    for a, b in zip(res[0][2:], res[1][2:]):
        assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    # a frozen x_proj weight (every method but full fine-tuning and LoRA) is cast once, then kept
    from dispatch_helpers import casts_of
    with casts_of(pw.shape) as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [conv_triton.causal_conv1d_proj_triton(x, w, bias, pw, "silu")[1] for _ in range(2)]
    assert casts.count == 1 and torch.equal(outs[0], outs[1]) and torch.equal(outs[0], res[0][1])


def test_both_directions_conv_and_projection_as_one_node_match_two_nodes_and_their_sum(backward_form):
    """bi_conv_proj_triton (BiConvProjTriton, the mixer's two convs + x_projs of one x): the
    reverse direction's conv adds its input gradient to the forward direction's in the kernel.
    In float32 that is the one addition autograd made of the same two numbers: the same bits
    as two causal_conv1d_proj_triton nodes, every output and gradient."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 19, 24, generator=gen)
    dirs = [(torch.randn(24, 4, generator=gen) * 0.5, torch.randn(24, generator=gen) * 0.1,
             torch.randn(7, 24, generator=gen) * 0.3) for _ in range(2)]
    grads = [torch.randn(2, 19, n, generator=gen) for n in (24, 7, 24, 7)]
    res = []
    for joint in (True, False):
        xx = x.clone().requires_grad_()
        leaves = [[t.clone().requires_grad_() for t in d] for d in dirs]
        if joint:
            outs = conv_triton.bi_conv_proj_triton(xx, *leaves)
        else:
            outs = (conv_triton.causal_conv1d_proj_triton(xx, *leaves[0], "silu")
                    + conv_triton.causal_conv1d_proj_triton(xx, *leaves[1], "silu", reverse=True))
        flat = [xx] + leaves[0] + leaves[1]
        res.append([o.detach() for o in outs] + list(torch.autograd.grad(outs, flat, grads)))
    for i, (a, b) in enumerate(zip(*res)):
        assert torch.equal(a, b), i
