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
from triton_helpers import interpreter, require_triton  # noqa: F401  (interpreter: an autouse fixture)

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
    with pytest.raises(BackendError, match="x is torch.float64"):
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
    """models/vim.py's conv: the Triton kernels with the 'triton' scan backend, their values
    those of the PyTorch form; with conv_triton.ENABLED off, or another backend, never."""
    calls = []
    real = conv_triton.causal_conv1d_triton

    def spy(*a, **k):
        calls.append(k.get("reverse"))
        return real(*a, **k)

    monkeypatch.setattr(conv_triton, "causal_conv1d_triton", spy)
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
            outs[backend, enabled, reverse] = y.detach(), dx
        assert calls == ([False, True] if (backend, enabled) == ("triton", True) else []), (backend, enabled)
    for reverse in (False, True):
        for a, b in zip(outs["triton", True, reverse], outs["torch", True, reverse]):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
