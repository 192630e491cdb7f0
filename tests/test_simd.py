"""svp.ops.simd: the explicit 16-lane vectors the CPU scan kernels are written with."""
import numpy as np
from numba import njit

from svp.ops.simd import VL, fma, prefetch, prefetch_write, splat, vacc_f64, vhsum16, vload, vmax, vmin, vstore, zeros


@njit(cache=False)
def _ops(a, b, c, out, P, acc):
    x = vload(a, 0)
    y = vload(b, VL)                      # an element offset, not a vector index
    vstore(out, 0, fma(x, y, vload(c, 0)))
    vstore(out, VL, x * y + vload(c, 0))
    vstore(out, 2 * VL, (x - y) * 2.0 + 1)
    vstore(out, 3 * VL, vmax(x, splat(0.0)))
    vstore(out, 4 * VL, vmin(x, zeros()))
    vstore(out, 5 * VL, -x)
    vstore(out, 6 * VL, vhsum16(P, 0))
    vacc_f64(acc, 0, x)


def test_vector_ops_match_numpy_exactly():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(VL).astype(np.float32)
    b = rng.standard_normal(2 * VL).astype(np.float32)
    c = rng.standard_normal(VL).astype(np.float32)
    a[3] = np.nan
    P = rng.standard_normal(VL * VL).astype(np.float32)
    out = np.zeros(7 * VL, np.float32)
    acc = np.full(VL, 0.5)
    _ops(a, b, c, out, P, acc)
    y = b[VL:]
    # fma rounds once: the float64 product-sum of float32 inputs rounded to float32 is exact
    # except for double rounding, which cannot happen here (53 bits hold the 48-bit product)
    np.testing.assert_array_equal(out[:VL], (a.astype(np.float64) * y + c).astype(np.float32))
    np.testing.assert_array_equal(out[VL:2 * VL], a * y + c)
    np.testing.assert_array_equal(out[2 * VL:3 * VL], (a - y) * np.float32(2) + np.float32(1))
    # max/min take the second operand when the first is NaN (x86 maxps semantics)
    np.testing.assert_array_equal(out[3 * VL:4 * VL], np.where(a > 0, a, 0).astype(np.float32))
    np.testing.assert_array_equal(out[4 * VL:5 * VL], np.where(a < 0, a, 0).astype(np.float32))
    np.testing.assert_array_equal(out[5 * VL:6 * VL], -a)
    np.testing.assert_array_equal(acc, 0.5 + a.astype(np.float64))
    # lane n = the sum of vector n's lanes, as the fixed tree: halves, quarters, eighths, pairs
    tree = P.reshape(VL, VL)
    while tree.shape[1] > 1:
        h = tree.shape[1] // 2
        tree = tree[:, :h] + tree[:, h:]
    np.testing.assert_array_equal(out[6 * VL:], tree[:, 0])


@njit(cache=False)
def _hinted(a, out):
    for i in range(0, a.size, VL):
        prefetch(a, i)
        prefetch_write(out, i)
        vstore(out, i, vload(a, i) * 2.0)


def test_prefetch_hints_lower_to_read_and_write_prefetches_and_change_nothing():
    a = np.arange(4 * VL, dtype=np.float32)
    out = np.zeros_like(a)
    _hinted(a, out)
    np.testing.assert_array_equal(out, a * 2)
    ir = next(iter(_hinted.inspect_llvm().values()))
    calls = [ln for ln in ir.splitlines() if "call void @llvm.prefetch" in ln]
    # (address, rw, locality, cache type): one read and one write hint per vector
    assert any(", i32 0, i32 3, i32 1)" in c for c in calls), calls
    assert any(", i32 1, i32 3, i32 1)" in c for c in calls), calls
