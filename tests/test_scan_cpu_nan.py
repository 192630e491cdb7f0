"""NaN in any input of the fused CPU scan reaches the outputs where the float64 reference's
does (softplus(NaN) was 0 in the kernel, so a NaN delta used to vanish)."""
from __future__ import annotations

import pytest
import torch

from svp.ops import available_backends
from svp.ops.scan_ref import selective_scan_ref

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="numba unavailable")


def _inputs(b=1, d=70, L=6, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(b, L, d).transpose(1, 2)
    delta = (r(b, L, d) * 0.5 - 1).transpose(1, 2)
    A = -(torch.rand(d, n, generator=g) + 0.05)
    B, C = r(b, n, L), r(b, n, L)
    z = r(b, L, d).transpose(1, 2)
    return [u, delta, A, B, C, r(d), z, r(d) * 0.3]


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("which", ["u", "delta", "z", "delta_bias", "A"])
def test_nan_propagates_like_reference(softplus, which):
    from svp.ops.scan_cpu import selective_scan_cpu
    xs = _inputs()
    i = {"u": 0, "delta": 1, "A": 2, "z": 6, "delta_bias": 7}[which]
    x = xs[i].clone()
    if which == "delta_bias":
        x[3] = float("nan")
    elif which == "A":
        x[3, 5] = float("nan")
    else:
        x[0, 3, 2] = float("nan")
    xs[i] = x
    out, last = selective_scan_cpu(*xs[:7], delta_bias=xs[7], delta_softplus=softplus, return_last_state=True)
    ref, ref_last = selective_scan_ref(*xs[:7], delta_bias=xs[7], delta_softplus=softplus, return_last_state=True)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(last.isnan(), ref_last.isnan())
    assert out.isnan().any()


def test_no_channels_give_empty_results_as_the_other_backends():
    """d = 0 passes the argument check; the reference and torch scans return empty outputs, the
    'cpu' scan divided by zero in its channel groups (review of the CPU kernels)."""
    from svp.ops.scan_cpu import selective_scan_cpu
    u = torch.randn(2, 0, 5, requires_grad=True)
    dl = torch.randn(2, 0, 5, requires_grad=True)
    A = torch.randn(0, 4)
    B, C = torch.randn(2, 4, 5, requires_grad=True), torch.randn(2, 4, 5, requires_grad=True)
    out, last = selective_scan_cpu(u, dl, A, B, C, return_last_state=True)
    assert out.shape == (2, 0, 5) and last.shape == (2, 0, 4)
    out.sum().backward()
    assert u.grad.shape == (2, 0, 5) and torch.equal(B.grad, torch.zeros(2, 4, 5))
