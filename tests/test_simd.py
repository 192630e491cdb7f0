"""svp.ops.simd: the explicit 16-lane vectors the CPU scan kernels are written with."""
import numpy as np
import pytest
from numba import njit

from svp.ops import simd
from svp.ops.simd import VL, _X86, as_f32, flush_denormals, fma, prefetch, prefetch_write, restore_fp, splat, \
    to_elem, vacc_f64, vhsum16, vload, vmax, vmin, vscale_biased, vscale_pow2i, vstore, vstream, zeros

TINY = np.finfo(np.float32).tiny   # the smallest normal float32, 2^-126


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


@njit(cache=False)
def _streamed(a, out):
    for i in range(0, a.size, VL):
        vstream(out, i, vload(a, i) * 2.0)


def test_streaming_store_writes_what_vstore_writes_past_the_caches():
    """vstream: the values vstore writes; on x86 as non-temporal stores (vmovntps and kin),
    into a 64-byte aligned buffer (what callers check)."""
    a = np.random.default_rng(0).standard_normal(8 * VL).astype(np.float32)
    raw = np.zeros(8 * VL + 16, np.float32)
    k = (-raw.ctypes.data % 64) // 4          # the first 64-byte boundary in raw
    out = raw[k:k + 8 * VL]
    assert out.ctypes.data % 64 == 0
    _streamed(a, out)
    np.testing.assert_array_equal(out, a * 2)
    ir = next(iter(_streamed.inspect_llvm().values()))
    asm = "".join(_streamed.inspect_asm().values())
    if _X86:
        assert "!nontemporal" in ir and "movnt" in asm
    else:
        assert "!nontemporal" not in ir


@njit(cache=False)
def _roundtrip(src, dst):
    for i in range(0, src.size, VL):
        vstore(dst, i, vload(src, i))


@njit(cache=False)
def _roundtrip_scalar(src, dst):
    for i in range(src.size):
        dst[i] = to_elem(as_f32(src[i]), dst)


def test_uint16_arrays_load_and_store_as_bfloat16_with_torchs_rounding():
    """A uint16 array holds bfloat16 bits: vload widens them exactly, vstore rounds to nearest,
    ties to even, as torch's cast does, over every float32 range (denormals, overflow to
    infinity, ties both ways, signed zeros, infinities; a NaN stays a NaN). The scalar forms
    (as_f32, to_elem) give the same bits."""
    import torch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, generator=g) * torch.logspace(-44, 38.5, 8192).float()
    one, ulp = 1.0, 2.0 ** -7   # bfloat16 has 8 significant bits: 1 + 2^-8 is a tie
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4028235e38, -3.3961776e38, 1e-45,
               one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2.0 ** -20, -(one + ulp / 2), 2.0 ** -126,
               float.fromhex("0x1.fefffep127"), float.fromhex("0x1.ff0000p127"), -1.0]
    x = torch.cat([x, torch.tensor(special)])
    assert x.numel() % VL == 0
    bits = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    _roundtrip(x.numpy(), bits(out))
    want = x.to(torch.bfloat16)
    assert torch.equal(out.isnan(), x.isnan())
    ok = ~x.isnan()
    np.testing.assert_array_equal(bits(out)[ok.numpy()], bits(want)[ok.numpy()])
    # the ties: to the even neighbour, up and down
    assert out[-8:-4].tolist() == [1.0, 1.0 + 2 * ulp, 1.0 + ulp, -1.0]
    back = torch.empty(x.numel())
    _roundtrip(bits(out), back.numpy())
    assert torch.equal(back[ok], out.float()[ok]) and back.isnan().equal(x.isnan())
    out_s, back_s = torch.empty_like(out), torch.empty_like(back)
    _roundtrip_scalar(x.numpy(), bits(out_s))
    _roundtrip_scalar(bits(out_s), back_s.numpy())
    np.testing.assert_array_equal(bits(out_s), bits(out))
    assert torch.equal(back_s[ok], back[ok]) and back_s.isnan().equal(x.isnan())


@njit(cache=False)
def _products(x, y, out, flush):
    old = flush_denormals() if flush else np.int32(0)
    for i in range(x.size):            # scalar and vector operations both
        out[i] = x[i] * y[i]
    for i in range(0, x.size - VL + 1, VL):
        vstore(out, x.size + i, vload(x, i) * vload(y, i))
    if flush:
        restore_fp(old)


@pytest.mark.skipif(not _X86, reason="the denormal mode is set on x86 only (MXCSR); elsewhere a no-op")
def test_flush_denormals_zeroes_denormal_results_until_restore_fp():
    x = np.full(2 * VL, 2 * TINY, np.float32)
    x[::2] = 3 * TINY
    y = np.full(2 * VL, 0.25, np.float32)   # every product below the normal range
    plain = np.zeros(4 * VL, np.float32)
    _products(x, y, plain, False)
    assert (plain[:2 * VL] == x * y).all() and (plain > 0).all() and (plain < TINY).all()
    flushed = np.ones(4 * VL, np.float32)
    _products(x, y, flushed, True)
    assert (flushed == 0).all()
    # the mode is put back: this thread (numpy's products, and the kernel's again) sees denormals
    assert (x * y > 0).all()
    again = np.zeros(4 * VL, np.float32)
    _products(x, y, again, False)
    np.testing.assert_array_equal(again, plain)


def _scaler():
    """A fresh kernel (compiled on its first call, with simd._SCALEF as it is then) applying both
    scalings to every 16 lanes, with denormals flushed as in the scan kernels."""
    @njit(cache=False)
    def scale(p, s, k, biased, pow2i):
        old = flush_denormals()
        for i in range(0, p.size, VL):
            vstore(biased, i, vscale_biased(vload(p, i), vload(s, i)))
            vstore(pow2i, i, vscale_pow2i(vload(p, i), vload(k, i)))
        restore_fp(old)
    return scale


@pytest.mark.skipif(not _X86, reason="vscalefps is an x86 (AVX-512) instruction; elsewhere only the portable form")
def test_scaling_by_vscalefps_gives_the_portable_forms_bits(monkeypatch):
    rng = np.random.default_rng(0)
    n = 64 * VL
    p = rng.uniform(0.7, 1.42, n).astype(np.float32)         # the range of 2^f, |f| <= 1/2
    p[:VL] = np.nan
    kb = rng.integers(-400, 1, n)                             # decays: k <= 0, far below -126 too
    kb[VL:2 * VL] = np.arange(-134, -118)                     # around the normal range's edge
    s = (kb + 127 + 12582912.0).astype(np.float32)
    s[2 * VL:3 * VL] = -3e7                                   # dt*a in the -2^24s: s negative
    k = rng.integers(-126, 128, n).astype(np.float32)
    k[VL:2 * VL] = np.arange(-126, -110)
    out = {}
    for flag in (False, True):
        monkeypatch.setattr(simd, "_SCALEF", flag)
        f = _scaler()
        b, q = np.empty_like(p), np.empty_like(p)
        f(p, s, k, b, q)
        out[flag] = b, q, "vscalefps" in "".join(f.inspect_asm().values())
    assert not out[False][2]
    from numba.core.registry import cpu_target
    if _X86 and "+avx512f" in cpu_target.target_context.codegen()._tm_features.split(","):
        assert out[True][2], "an AVX-512 target should get vscalefps"
    for got, want in zip(out[True][:2], out[False][:2]):
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    b, q = out[False][:2]
    # the portable forms' values: p * 2^k, 0 below the normal range, NaN kept
    assert np.isnan(b[:VL]).all() and np.isnan(q[:VL]).all()
    exact_b = p.astype(np.float64) * np.exp2(kb.astype(np.float64))
    exact_b[exact_b < TINY] = 0
    exact_b[2 * VL:3 * VL] = 0
    np.testing.assert_array_equal(b[VL:], exact_b[VL:].astype(np.float32))
    exact_q = p.astype(np.float64) * np.exp2(k.astype(np.float64))
    exact_q[exact_q < TINY] = 0
    np.testing.assert_array_equal(q[VL:], exact_q[VL:].astype(np.float32))
