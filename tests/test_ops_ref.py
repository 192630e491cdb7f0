"""Reference operators against independent naive definitions, and gradchecks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svp.ops import causal_conv1d_bld, causal_conv1d_ref, rms_norm_ref, selective_scan_ref


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False):
    """Element-by-element recurrence in float64 numpy, written from the equations."""
    u, delta, A, B, C = (t.detach().double().numpy() for t in (u, delta, A, B, C))
    b, d, l = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.detach().double().numpy()[None, :, None]
    if softplus:
        delta = np.log1p(np.exp(delta))
    grouped = B.ndim == 4
    y = np.zeros((b, d, l))
    last = np.zeros((b, d, n))
    for bi in range(b):
        for di in range(d):
            g = di // (d // B.shape[1]) if grouped else None
            h = np.zeros(n)
            for t in range(l):
                Bt = B[bi, g, :, t] if grouped else B[bi, :, t]
                Ct = C[bi, g, :, t] if grouped else C[bi, :, t]
                h = np.exp(delta[bi, di, t] * A[di]) * h + delta[bi, di, t] * Bt * u[bi, di, t]
                y[bi, di, t] = (Ct * h).sum()
            last[bi, di] = h
    if D is not None:
        y = y + u * D.detach().double().numpy()[None, :, None]
    if z is not None:
        zz = z.detach().double().numpy()
        y = y * zz / (1 + np.exp(-zz))
    return torch.from_numpy(y), torch.from_numpy(last)


def make_inputs(b=2, d=5, n=3, l=7, groups=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    bc_shape = (b, n, l) if groups is None else (b, groups, n, l)
    return dict(u=r(b, d, l), delta=r(b, d, l) * 0.5, A=-torch.rand(d, n, generator=g, dtype=dtype) * 2,
                B=r(*bc_shape), C=r(*bc_shape), D=r(d), z=r(b, d, l), delta_bias=r(d) * 0.1)


@pytest.mark.parametrize("groups", [None, 1, 5])
@pytest.mark.parametrize("with_extras", [False, True])
def test_reference_scan_matches_naive_recurrence(groups, with_extras):
    x = make_inputs(groups=groups)
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True) if with_extras else {}
    out, last = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True, **kw)
    want, want_last = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], kw.get("D"), kw.get("z"),
                                 kw.get("delta_bias"), softplus=with_extras)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, want_last, rtol=1e-10, atol=1e-10)


def test_reference_scan_keeps_input_dtype_and_computes_in_float32():
    x = make_inputs(dtype=torch.float32)
    out16 = selective_scan_ref(*(x[k].to(torch.bfloat16) for k in ("u", "delta")), x["A"],
                               x["B"].to(torch.bfloat16), x["C"].to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16


def test_reference_scan_rejects_bad_shapes():
    x = make_inputs()
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_ref(x["u"], x["delta"], x["A"][:2], x["B"], x["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_ref(x["u"], x["delta"], x["A"], x["B"][..., :3], x["C"])


def test_scan_gradcheck():
    x = make_inputs(b=1, d=3, n=2, l=5)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    args = [x[k].clone().requires_grad_() for k in names]

    def f(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_scan_backward_memory_is_linear_in_length():
    # Autograd must not build one full-size tensor per step: the number of saved
    # elements per position must not grow with L.
    def saved_numel(l):
        x = make_inputs(b=1, d=4, n=4, l=l, dtype=torch.float32)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            u = x["u"].requires_grad_()
            selective_scan_ref(u, x["delta"], x["A"], x["B"], x["C"]).sum()
        return total / l

    assert saved_numel(256) < 1.5 * saved_numel(32)


def test_causal_conv_matches_naive_and_bld_layout():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    want = torch.zeros_like(x)
    for t in range(9):
        for k in range(4):
            src = t - 3 + k
            if src >= 0:
                want[..., t] += w[:, k] * x[..., src]
    want = want + bias[:, None]
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias), want)
    torch.testing.assert_close(causal_conv1d_ref(x, w, bias, "silu"), F.silu(want))
    bld = causal_conv1d_bld(x.transpose(1, 2), w, bias, "silu").transpose(1, 2)
    torch.testing.assert_close(bld, F.silu(want))
    # reverse: the causal conv of the time-reversed sequence, in original order
    rev = causal_conv1d_bld(x.transpose(1, 2), w, bias, "silu", reverse=True).transpose(1, 2)
    torch.testing.assert_close(rev, causal_conv1d_ref(x.flip(-1), w, bias, "silu").flip(-1))


def test_conv_and_norm_gradcheck():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: causal_conv1d_ref(x, w, b, "silu"), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: causal_conv1d_bld(x.transpose(1, 2), w, b, "silu", reverse=True), (x, w, b))
    h = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    nw = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, r, nw: rms_norm_ref(h, nw, residual=r, prenorm=True), (h, r, nw))


def test_rms_norm_fused_residual():
    g = torch.Generator().manual_seed(3)
    h, r = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    w = torch.randn(8, generator=g)
    out, res = rms_norm_ref(h, w, residual=r, prenorm=True, residual_in_fp32=True, eps=1e-5)
    s = (h + r).double()
    want = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res, (h + r).float())
    assert res.dtype == torch.float32
