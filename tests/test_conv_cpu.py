"""The fused numba conv1d (+ SiLU) against the pure-PyTorch one, forward and every gradient."""
import pytest
import torch

from svp.ops import available_backends, causal_conv1d_bld

if "cpu" not in available_backends():
    pytest.fail("the numba cpu backend is not available", pytrace=False)

from svp.ops.conv_cpu import causal_conv1d_cpu  # noqa: E402


@pytest.mark.parametrize("shape", [(2, 13, 40), (3, 37, 130), (1, 2, 7), (2, 1, 5)], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("act", [None, "silu"])
def test_fused_conv_matches_pytorch(shape, reverse, act):
    b, L, d = shape
    g = torch.Generator().manual_seed(L * d)
    x = torch.randn(b, L, 2 * d, generator=g)[..., :d]       # strided, as a chunk of in_proj
    w, bias = torch.randn(d, 4, generator=g) * 0.5, torch.randn(d, generator=g)
    a = [t.clone().requires_grad_() for t in (x, w, bias)]
    c = [t.clone().requires_grad_() for t in (x, w, bias)]
    want = causal_conv1d_bld(*a, act, reverse=reverse)
    got = causal_conv1d_cpu(*c, act, reverse=reverse)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    go = torch.randn(want.shape, generator=g)
    (want * go).sum().backward()
    (got * go).sum().backward()
    for p, q, name in zip(a, c, ("x", "weight", "bias")):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_frozen_conv_gets_no_weight_gradient_and_same_input_gradient():
    x = torch.randn(2, 19, 24, requires_grad=True)
    w, bias = torch.randn(24, 4), torch.randn(24)
    causal_conv1d_cpu(x, w, bias, "silu").pow(2).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    causal_conv1d_bld(x, w, bias, "silu").pow(2).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_per_sample_bias_matches_pytorch_and_is_refused_with_a_gradient(reverse):
    # svp serve's mixed batches: BitFit adapters give each sample its own conv bias (b, 1, d)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 17, 2 * 24, generator=g)[..., :24].requires_grad_()
    w, bias = torch.randn(24, 4, generator=g) * 0.5, torch.randn(3, 1, 24, generator=g)
    want = causal_conv1d_bld(x, w, bias, "silu", reverse=reverse)
    got = causal_conv1d_cpu(x, w, bias, "silu", reverse=reverse)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # each row really used its own bias: the same rows with row 0's bias differ
    other = causal_conv1d_cpu(x, w, bias[:1].expand(3, 1, 24).contiguous(), "silu", reverse=reverse)
    assert torch.equal(other[0], got[0]) and not torch.allclose(other[1:], got[1:])
    go = torch.randn(want.shape, generator=g)
    gx_want, = torch.autograd.grad((want * go).sum(), x)
    gx_got, = torch.autograd.grad((got * go).sum(), x)
    torch.testing.assert_close(gx_got, gx_want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-sample"):
        causal_conv1d_cpu(x, w, bias.clone().requires_grad_(), "silu")
    with pytest.raises(ValueError, match=r"\(batch, 1, dim\)"):
        causal_conv1d_cpu(x, w, torch.randn(2, 1, 24), "silu")


@pytest.mark.parametrize("width", [2, 3, 4, 5])
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_conv_any_width_matches_pytorch(width, reverse):
    # width 4 (Vim's) has a one-loop path for rows with all their taps inside the sequence;
    # the other widths and the first/last rows take the general loop
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, 21, 24, generator=g)
    w, bias = torch.randn(24, width, generator=g) * 0.5, torch.randn(24, generator=g)
    a = [t.clone().requires_grad_() for t in (x, w, bias)]
    c = [t.clone().requires_grad_() for t in (x, w, bias)]
    want = causal_conv1d_bld(*a, "silu", reverse=reverse)
    got = causal_conv1d_cpu(*c, "silu", reverse=reverse)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    go = torch.randn(want.shape, generator=g)
    (want * go).sum().backward()
    (got * go).sum().backward()
    for p, q, name in zip(a, c, ("x", "weight", "bias")):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)
