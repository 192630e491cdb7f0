"""The Triton residual add + RMSNorm (svp.ops.norm_triton), run on CPU tensors through
Triton's interpreter: outputs and gradients against the float64 reference, with and without a
residual and a gradient on the residual stream, reduced-precision mixer outputs, row counts and
widths that fill no program; the same bits on every run; bad input; and the Vim blocks taking it
where the scan runs on the 'triton' backend (and not otherwise)."""
from __future__ import annotations

import pytest
import torch

from svp.errors import BackendError
from svp.ops import set_backend
from svp.ops.norm import rms_norm_ref
from triton_helpers import Fills, interpreter, require_triton  # noqa: F401  (interpreter: an autouse fixture)

triton = require_triton()

from svp.ops import norm_triton  # noqa: E402
from svp.ops.norm_triton import add_rms_norm_triton  # noqa: E402

EPS = 1e-5


def _inputs(shape, hdtype, residual, seed):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(*shape, generator=gen) * 3).to(hdtype).requires_grad_()
    r = torch.randn(*shape, generator=gen).requires_grad_() if residual else None
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).requires_grad_()
    g = torch.randn(*shape, generator=gen)
    gx = torch.randn(*shape, generator=gen)
    return h, r, w, g, gx


def _grads(outs, leaves, g, gx, use_gx):
    out, x = outs if isinstance(outs, tuple) else (outs, None)
    loss = (out * g).sum() + ((x * gx).sum() if use_gx else 0)
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("shape", [(2, 9, 24), (1, 37, 100), (3, 5, 384)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual,use_gx", [(True, True), (True, False), (False, False)])
def test_matches_the_float64_reference(shape, residual, use_gx):
    h, r, w, g, gx = _inputs(shape, torch.float32, residual, sum(shape))
    leaves = [h, w] + ([r] if residual else [])
    got = add_rms_norm_triton(h, r, w, EPS)
    dgot = _grads(got, leaves, g, gx, use_gx)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    x64 = l64[0] + l64[2] if residual else l64[0]
    want = (rms_norm_ref(x64, l64[1], eps=EPS), x64) if residual else rms_norm_ref(x64, l64[1], eps=EPS)
    dwant = _grads(want, l64, g.double(), gx.double(), use_gx)
    outs = got if residual else (got,)
    wants = want if residual else (want,)
    assert all(o.dtype == torch.float32 and o.shape == h.shape for o in outs)
    for a, b in zip(outs + dgot, wants + dwant):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 2e-6
    if residual:   # one gradient serves both addends
        assert torch.equal(dgot[0], dgot[2])


def test_bfloat16_mixer_output_into_a_float32_stream():
    h, r, w, g, gx = _inputs((2, 17, 48), torch.bfloat16, True, 7)
    out, x = add_rms_norm_triton(h, r, w, EPS)
    dh, dw, dr = _grads((out, x), [h, w, r], g, gx, True)
    # the sum in float32 from bfloat16 hidden, as the block's `residual + hidden` promotes it
    assert torch.equal(x, r + h.float())
    want = rms_norm_ref(x.detach().double(), w.detach().double(), eps=EPS)
    assert ((out.double() - want).abs().max() / want.abs().max()).item() < 2e-6
    assert dh.dtype == torch.bfloat16 and dr.dtype == torch.float32 and dw.dtype == torch.float32
    assert (dh.float() - dr).abs().max() <= 1e-2 * dr.abs().max()


def test_same_bits_on_every_run():
    h, r, w, g, gx = _inputs((3, 41, 72), torch.float32, True, 9)
    a = _grads(add_rms_norm_triton(h, r, w, EPS), [h, w, r], g, gx, True)
    b = _grads(add_rms_norm_triton(h, r, w, EPS), [h, w, r], g, gx, True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_bad_input_is_named(monkeypatch):
    h = torch.randn(2, 3, 8)
    with pytest.raises(BackendError, match="takes float32 tensors; residual is torch.bfloat16"):
        add_rms_norm_triton(h, h.bfloat16(), torch.ones(8), EPS)
    with pytest.raises(BackendError, match="without a residual takes a float32 hidden"):
        add_rms_norm_triton(h.bfloat16(), None, torch.ones(8), EPS)
    with pytest.raises(ValueError, match=r"residual \(2, 4, 8\) and hidden \(2, 3, 8\) differ"):
        add_rms_norm_triton(h, torch.randn(2, 4, 8), torch.ones(8), EPS)
    with pytest.raises(ValueError, match=r"weight \(7,\) does not match"):
        add_rms_norm_triton(h, None, torch.ones(7), EPS)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        add_rms_norm_triton(h, None, torch.ones(8), EPS)


def test_the_blocks_take_it_where_the_scan_runs_on_triton(monkeypatch):
    """models/vim.py's blocks and final norm: the Triton kernel with the 'triton' scan backend
    (the block's values those of the PyTorch form), never with ENABLED off or another backend.
    The mixer is replaced by a product, so the scan (slow in the interpreter) does not run."""
    import timm

    import svp.models  # noqa: F401  (registers the Vim models)
    calls = []
    real = norm_triton.add_rms_norm_triton
    monkeypatch.setattr(norm_triton, "add_rms_norm_triton", lambda *a: calls.append(a[1] is None) or real(*a))
    torch.manual_seed(0)
    model = timm.create_model("vim_mini_patch4_32", pretrained=False, num_classes=5, depth=2).eval()
    for blk in model.layers:
        blk.mixer = torch.nn.Linear(model.embed_dim, model.embed_dim)
    x = torch.randn(2, 3, 12, 12)
    res = {}
    for backend, enabled in (("triton", True), ("triton", False), ("torch", True)):
        monkeypatch.setattr(norm_triton, "ENABLED", enabled)
        set_backend(backend)
        calls.clear()
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.square().sum().backward()
        res[backend, enabled] = out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()
                                                          if "norm" in n}
        model.zero_grad(set_to_none=True)
        # two blocks (the first without a residual) and the final norm
        assert calls == ([True, False, False] if (backend, enabled) == ("triton", True) else []), (backend, enabled)
    (o1, g1, n1), (o2, g2, n2) = res["triton", True], res["torch", True]
    assert (o1 - o2).abs().max() <= 1e-5 * o2.abs().max() and (g1 - g2).abs().max() <= 1e-4 * g2.abs().max()
    assert n1.keys() == n2.keys() and len(n1) == 3
    for k in n1:
        assert (n1[k] - n2[k]).abs().max() <= 1e-4 * n2[k].abs().max(), k


def test_an_unused_output_gets_no_zero_filled_gradient():
    """The final norm's residual stream is unused: its gradient comes as None, with no zero
    tensor filled and read, and the gradients are those of a zero gradient given for it. The
    other way round (only the stream used) the output's gradient is zero."""
    h, r, w, g, gx = _inputs((2, 9, 24), torch.float32, True, 5)
    with Fills() as fills:
        a = _grads(add_rms_norm_triton(h, r, w, EPS), [h, w, r], g, gx, False)
    assert fills.count == 0
    b = _grads(add_rms_norm_triton(h, r, w, EPS), [h, w, r], g, torch.zeros_like(gx), True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    _, x = add_rms_norm_triton(h, r, w, EPS)
    dh, dw, dr = torch.autograd.grad((x * gx).sum(), [h, w, r], allow_unused=True)
    assert torch.equal(dh, gx) and torch.equal(dr, gx) and not dw.any()
