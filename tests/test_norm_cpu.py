"""The fused numba add+RMSNorm against the PyTorch reference, forward and every gradient, and the
Vim model with the fused path against the same model through the reference ops."""
import pytest
import timm
import torch

import svp  # noqa: F401  (registers the models)
import svp.models.vim as vim
from svp.ops import available_backends, rms_norm_ref

if "cpu" not in available_backends():
    pytest.fail("the numba cpu backend is not available", pytrace=False)

from svp.ops.norm_cpu import add_rms_norm_cpu  # noqa: E402


def _inputs(shape, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    h = torch.randn(*shape[:-1], 2 * d, generator=g)[..., :d] if strided else torch.randn(shape, generator=g)
    r = torch.randn(shape, generator=g) * 3
    w = 1 + 0.3 * torch.randn(d, generator=g)
    return h, r, w, g


@pytest.mark.parametrize("shape", [(2, 13, 40), (3, 37, 192), (1, 1, 7), (2, 5, 8)], ids=str)
@pytest.mark.parametrize("strided", [False, True])
def test_fused_add_norm_matches_reference(shape, strided):
    h, r, w, g = _inputs(shape, shape[1] * shape[2], strided)
    a = [t.clone().requires_grad_() for t in (h, r, w)]
    c = [t.clone().requires_grad_() for t in (h, r, w)]
    want, want_res = rms_norm_ref(a[0], a[2], None, a[1], 1e-5, prenorm=True, residual_in_fp32=True)
    got, got_res = add_rms_norm_cpu(c[0], c[1], c[2], 1e-5)
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)  # the add is the same float op
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    go, gr = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    torch.autograd.backward([want, want_res], [go, gr])
    torch.autograd.backward([got, got_res], [go, gr])
    for p, q, name in zip(a, c, ("hidden", "residual", "weight")):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_norm_without_residual_and_unused_residual_output():
    h, r, w, g = _inputs((2, 9, 24), 5)
    a, c = h.clone().requires_grad_(), h.clone().requires_grad_()
    want = rms_norm_ref(a, w, eps=1e-5)
    got = add_rms_norm_cpu(c, None, w, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    go = torch.randn(want.shape, generator=g)
    want.backward(go)
    got.backward(go)
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-5, atol=1e-5)
    # the final norm uses only the normalised output: no gradient arrives for the new residual
    a, c = [h.clone().requires_grad_(), r.clone().requires_grad_()], [h.clone().requires_grad_(), r.clone().requires_grad_()]
    rms_norm_ref(a[0], w, None, a[1], 1e-5, prenorm=True, residual_in_fp32=True)[0].backward(go)
    add_rms_norm_cpu(c[0], c[1], w, 1e-5)[0].backward(go)
    for p, q in zip(a, c):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5)


def test_fused_norm_bits_do_not_depend_on_threads():
    import numba
    h, r, w, g = _inputs((4, 50, 64), 7)
    h.requires_grad_()
    w.requires_grad_()
    go = torch.randn(h.shape, generator=g)
    outs = []
    old = torch.get_num_threads()   # the kernels take torch's count
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            torch.set_num_threads(n)
            out, res = add_rms_norm_cpu(h, r, w, 1e-5)
            gh, gw = torch.autograd.grad([out, res], [h, w], [go, go])
            assert numba.get_num_threads() == n
            outs.append((out, gh, gw))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("train_norm", [False, True])
def test_vim_with_fused_norm_matches_reference_ops(monkeypatch, train_norm):
    """A small Vim, forward and gradients (input, norm weights when trained), with the fused
    add+RMSNorm against the same model with the PyTorch ops."""
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=3, embed_dim=32,
                              num_classes=5).eval()
    with torch.no_grad():  # norm weights away from 1 so their use shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    for n, p in model.named_parameters():
        p.requires_grad_(train_norm and "norm" in n)
    x = torch.randn(2, 3, 32, 32)

    def run():
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out, xi.grad, grads

    calls = []
    real = vim._add_rms_norm
    monkeypatch.setattr(vim, "_add_rms_norm", lambda *a: calls.append(1) or real(*a))
    fused = run()
    assert len(calls) == 4  # three blocks and the final norm
    monkeypatch.setattr(vim, "_fused_norm", lambda *a: None)
    ref = run()
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-4, atol=1e-5)
    assert fused[2].keys() == ref[2].keys() and (len(ref[2]) > 0) == train_norm
    for n in ref[2]:
        torch.testing.assert_close(fused[2][n], ref[2][n], rtol=1e-4, atol=1e-5, msg=n)
