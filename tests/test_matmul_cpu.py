"""svp.ops.matmul_cpu: float32 CPU products through oneDNN (the fast op) held against torch's own
products and a float64 reference (the slow op), the choice per machine, and a whole training
step with every routed product on oneDNN."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fused_helpers import output_and_grads
from svp.errors import BackendError
from svp.ops import matmul_cpu
from svp.peft import get_peft_model, make_config

needs_onednn = pytest.mark.skipif(not matmul_cpu.onednn_available(),
                                  reason="this torch has no oneDNN float32 product (mkldnn._linear_pointwise)")


def _cpuinfo(tmp_path, vendor, family, flags):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\n"
                 f"flags\t\t: fpu sse2 avx2 fma {flags}\n")
    return str(p)


def test_auto_takes_onednn_only_on_amd_with_avx512(tmp_path, monkeypatch):
    monkeypatch.setattr(matmul_cpu, "onednn_available", lambda: True)
    cases = [("AuthenticAMD", 26, "avx512f avx512bw", True), ("AuthenticAMD", 27, "avx512f", True),
             ("AuthenticAMD", 25, "avx512f avx512bw", True),    # Zen 4
             ("AuthenticAMD", 25, "", False),                   # Zen 3: no AVX-512, not measured
             ("AuthenticAMD", 23, "avx512f", False),
             ("AuthenticAMD", 26, "", False), ("GenuineIntel", 6, "avx512f avx512bw", False)]
    for vendor, family, flags, want in cases:
        on, why = matmul_cpu.decide("auto", cpuinfo=_cpuinfo(tmp_path, vendor, family, flags))
        assert on is want, (vendor, family, flags, why)
        assert why.startswith("auto: ")
    monkeypatch.setattr(matmul_cpu, "onednn_available", lambda: False)
    on, why = matmul_cpu.decide("auto", cpuinfo=_cpuinfo(tmp_path, "AuthenticAMD", 26, "avx512f"))
    assert not on and "no oneDNN" in why


def test_auto_on_a_zen4_leaves_small_products_and_weight_gradients_to_torch(tmp_path, monkeypatch):
    """On a Zen 4 torch's products were the faster below ~15 M multiply-adds (batch-1 prediction's
    layer products) and for weight gradients (dY^T X: oneDNN copies the transpose first), so auto
    sends neither to oneDNN there; forced / SVP_CPU_MATMUL=onednn send both everywhere."""
    zen4 = _cpuinfo(tmp_path, "AuthenticAMD", 25, "avx512f avx512bw")
    assert matmul_cpu.auto_limits(zen4) == (matmul_cpu.MIN_MACS_ZEN4, False)
    assert matmul_cpu.MIN_MACS_ZEN4 > matmul_cpu.MIN_MACS
    assert matmul_cpu.auto_limits(_cpuinfo(tmp_path, "AuthenticAMD", 26, "avx512f")) == (matmul_cpu.MIN_MACS, True)
    monkeypatch.setattr(matmul_cpu, "onednn_available", lambda: True)
    monkeypatch.setattr(matmul_cpu, "decide", lambda: (True, "auto: oneDNN (a Zen 4)"))
    monkeypatch.setattr(matmul_cpu, "auto_limits", lambda: (matmul_cpu.MIN_MACS_ZEN4, False))
    for key in ("on", "why", "limits"):
        monkeypatch.setitem(matmul_cpu._state, key, None)   # decided again, restored after
    small = (torch.randn(197, 192), torch.randn(192, 384))     # 14.5 M: a batch-1 in_proj half
    large = (torch.randn(394, 192), torch.randn(192, 384))     # 29 M
    dy, x = torch.randn(1576, 192), torch.randn(1576, 64)
    wgrad, wgrad_t = (dy.t(), x), (x.t(), dy)                  # 19 M each, the first a transpose
    assert matmul_cpu.use_onednn() and matmul_cpu.limits() == (matmul_cpu.MIN_MACS_ZEN4, False)
    assert matmul_cpu.onednn_takes(*large)
    assert not any(matmul_cpu.onednn_takes(*ab) for ab in (small, wgrad, wgrad_t))
    assert torch.equal(matmul_cpu.mm(*wgrad), torch.mm(*wgrad))   # torch's product, its bits
    assert "16 M multiply-adds or more but weight gradients" in matmul_cpu.status()
    with matmul_cpu.forced(True):
        assert matmul_cpu.limits() == (matmul_cpu.MIN_MACS, True)
        assert all(matmul_cpu.onednn_takes(*ab) for ab in (small, large, wgrad, wgrad_t))
    assert matmul_cpu.limits() == (matmul_cpu.MIN_MACS_ZEN4, False)
    monkeypatch.setattr(matmul_cpu, "decide", lambda: (True, "SVP_CPU_MATMUL=onednn"))
    matmul_cpu._state["on"] = None
    assert matmul_cpu.use_onednn() and matmul_cpu.limits() == (matmul_cpu.MIN_MACS, True)
    assert matmul_cpu.onednn_takes(*wgrad)


def test_explicit_modes_and_a_bad_value(monkeypatch):
    assert matmul_cpu.decide("blas") == (False, "SVP_CPU_MATMUL=blas")
    monkeypatch.setenv("SVP_CPU_MATMUL", " BLAS ")
    assert matmul_cpu.decide()[0] is False
    monkeypatch.setenv("SVP_CPU_MATMUL", "mkl")
    with pytest.raises(BackendError, match=r"SVP_CPU_MATMUL='mkl': expected one of auto, onednn, blas"):
        matmul_cpu.decide()
    monkeypatch.setattr(matmul_cpu, "onednn_available", lambda: False)
    with pytest.raises(BackendError, match="no oneDNN float32 product"):
        matmul_cpu.decide("onednn")   # strict: asked for, not there, no silent fallback
    with pytest.raises(BackendError, match="no oneDNN"):
        with matmul_cpu.forced(True):
            pass


def test_doctor_names_a_bad_setting_and_fails_on_it(monkeypatch):
    from svp import doctor
    monkeypatch.setitem(matmul_cpu._state, "on", None)   # decided again, from the variable below
    monkeypatch.setitem(matmul_cpu._state, "why", None)  # (all three restored after the test)
    monkeypatch.setitem(matmul_cpu._state, "limits", None)
    monkeypatch.setenv("SVP_CPU_MATMUL", "mkl")
    row = doctor._products()
    assert row.startswith("FAIL") and "SVP_CPU_MATMUL='mkl'" in row and "auto, onednn, blas" in row
    monkeypatch.setenv("SVP_CPU_MATMUL", "blas")
    assert doctor._products() == "torch BLAS for float32 products (SVP_CPU_MATMUL=blas)"


def _err(t, ref):
    return ((t.double() - ref).abs().max() / ref.abs().max()).item()


@needs_onednn
def test_mm_through_onednn_is_as_accurate_as_torchs_in_every_layout_the_nodes_use():
    g = torch.Generator().manual_seed(0)
    m, k, n = 300, 200, 96          # 5.8 M multiply-adds: over MIN_MACS
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    w = torch.randn(n, k, generator=g)
    dy = torch.randn(m, n, generator=g)
    layouts = {"a b": (a, b), "a w^T (a forward)": (a, w.t()), "dy w (an input gradient)": (dy, w),
               "dy^T a (a weight gradient)": (dy.t(), a),
               "a^T dy (a weight gradient formed transposed)": (a.t(), dy)}
    with matmul_cpu.forced(True):
        for name, (x, y) in layouts.items():
            assert matmul_cpu.onednn_takes(x, y), name
            ref = x.double() @ y.double()
            got = matmul_cpu.mm(x, y)
            assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous(), name
            assert _err(got, ref) <= 2 * _err(torch.mm(x, y), ref) + 1e-6, name
            out = torch.full(ref.shape, float("nan"))
            assert matmul_cpu.mm(x, y, out=out) is out and torch.equal(out, got), name
            c = torch.randn(ref.shape, generator=g)
            want = c.double() + ref
            assert _err(matmul_cpu.addmm_(c, x, y), want) < 1e-6, name
        # what stays torch's product, bit for bit: small, bfloat16, an operand neither row-major nor
        # its transpose (oneDNN runs a reference kernel on those, ~500x slower), and a product
        # autograd must see
        small = (a[:4], b)
        assert not matmul_cpu.onednn_takes(*small) and torch.equal(matmul_cpu.mm(*small), torch.mm(*small))
        cols = (a, torch.randn(k, n + 7, generator=g)[:, :n])   # a column slice, as the scan's dt_w gradient
        assert not matmul_cpu.onednn_takes(*cols) and torch.equal(matmul_cpu.mm(*cols), torch.mm(*cols))
        ab, bb = a.bfloat16(), b.bfloat16()
        assert torch.equal(matmul_cpu.mm(ab, bb), torch.mm(ab, bb))
        leaf = a.clone().requires_grad_()
        r = matmul_cpu.mm(leaf, b)
        assert r.grad_fn is not None and torch.equal(r, torch.mm(leaf, b))
    with matmul_cpu.forced(False):
        assert not matmul_cpu.onednn_takes(a, b) and torch.equal(matmul_cpu.mm(a, b), torch.mm(a, b))


@needs_onednn
def test_a_weight_gradient_copies_the_narrower_operand_with_the_same_bits(monkeypatch):
    """oneDNN's product makes its input operand contiguous: for dY^T X (a transposed a) with
    fewer columns in X than in dY, mm forms (X^T dY)^T, so the copy is of X; the result is
    row-major, with the bits of the product formed the other way."""
    g = torch.Generator().manual_seed(1)
    rows, wide, narrow = 1576, 192, 64
    dy, x = torch.randn(rows, wide, generator=g), torch.randn(rows, narrow, generator=g)
    real = torch.ops.mkldnn._linear_pointwise
    want = real(dy.t(), x.t(), None, "none", [], "")   # input dY^T: its copy is (192, 1576)
    inputs = []

    class Spy:
        def __call__(self, inp, *a):
            inputs.append(tuple(inp.shape))
            return real(inp, *a)
    with matmul_cpu.forced(True):
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Spy())
        got = matmul_cpu.mm(dy.t(), x)
        back = matmul_cpu.mm(x.t(), dy)   # (64, 192): dY would be the larger copy; as it is
    assert inputs == [(narrow, rows), (narrow, rows)]
    assert got.is_contiguous() and torch.equal(got, want)
    assert back.is_contiguous() and torch.equal(back, real(x.t(), dy.t(), None, "none", [], ""))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen_w", [True, False])
def test_linear_through_onednn_and_its_gradients_against_float64(bias, frozen_w):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 75, 128, generator=g, requires_grad=True)
    w = torch.randn(192, 128, generator=g, requires_grad=not frozen_w)
    b = torch.randn(192, generator=g, requires_grad=True) if bias else None
    dy = torch.randn(4, 75, 192, generator=g)
    with matmul_cpu.forced(True):
        y = matmul_cpu.linear(x, w, b)
    assert y.grad_fn is not None and type(y.grad_fn).__name__.startswith("_Linear")
    y.backward(dy)
    leaves = [t for t in (x, w, b) if t is not None]
    d = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = F.linear(d[0], d[1], d[2] if bias else None)
    ref.backward(dy.double())
    assert _err(y, ref) < 1e-6
    for t, r in zip(leaves, d):
        assert (t.grad is None) == (not t.requires_grad)
        if t.requires_grad:
            assert _err(t.grad, r.grad) < 1e-6


def _step(method, on, monkeypatch, wgrads=True):
    """An SVP-style training step's output and gradients, with every product svp routes on
    oneDNN (``on``; MIN_MACS 0 so the small test model's products count; with ``wgrads`` False,
    as auto on a Zen 4, the weight gradients on torch's) or torch's, and the product FLOPs per op."""
    monkeypatch.setattr(matmul_cpu, "MIN_MACS", 0)
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=4,
                              embed_dim=32, num_classes=5)
    settings = {"svp": dict(shared_layers=2, hidden=8)}.get(method, {})
    pm = get_peft_model(model, make_config(method, num_classes=5, **settings)).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # nonzero adapters, so gradients flow through them
        for n, p in pm.named_parameters():
            if p.requires_grad and not n.startswith("base_model.head."):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, 32, 32, generator=g)
    with matmul_cpu.forced(on), FlopCounterMode(display=False, custom_mapping=matmul_cpu.flop_mapping()) as fc:
        if not wgrads:
            matmul_cpu._state["limits"] = (0, False)   # (forced puts the state back on exit)
        out, grads = output_and_grads(pm, x, seed=5)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    return out, grads, counts


@needs_onednn
@pytest.mark.parametrize("method", ["svp", "full", "lora"])
def test_a_training_step_with_its_products_on_onednn_matches_torchs(method, monkeypatch):
    out, grads, flops = _step(method, True, monkeypatch)
    ref_out, ref_grads, ref_flops = _step(method, False, monkeypatch)
    onednn = sum(v for k, v in flops.items() if "_linear_pointwise" in k)
    # the products moved (in_proj, out_proj, x_proj, the prompters, dt_proj's weight gradient),
    # none added or lost: the same FLOPs in all
    assert onednn > 0.5 * sum(flops.values()) and not any("_linear_pointwise" in k for k in ref_flops)
    assert sum(flops.values()) == sum(ref_flops.values())
    assert ((out - ref_out).abs().max() / ref_out.abs().max()).item() < 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        scale = ref_grads[n].abs().max().clamp_min(1e-12)
        assert ((grads[n] - ref_grads[n]).abs().max() / scale).item() < 1e-4, n


@needs_onednn
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_step_with_weight_gradients_left_to_torch_matches_too(method, monkeypatch):
    """auto on a Zen 4: every product on oneDNN but the weight gradients (dY^T X), which stay
    torch's; the same step, the same FLOPs, split between the two."""
    out, grads, flops = _step(method, True, monkeypatch, wgrads=False)
    all_out, _, all_flops = _step(method, True, monkeypatch)
    ref_out, ref_grads, ref_flops = _step(method, False, monkeypatch)
    on = lambda f: sum(v for k, v in f.items() if "_linear_pointwise" in k)  # noqa: E731
    assert 0 < on(flops) < on(all_flops) and sum(flops.values()) == sum(ref_flops.values())
    assert torch.equal(out, all_out)   # the forward's products are the same calls either way
    assert ((out - ref_out).abs().max() / ref_out.abs().max()).item() < 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        scale = ref_grads[n].abs().max().clamp_min(1e-12)
        assert ((grads[n] - ref_grads[n]).abs().max() / scale).item() < 1e-4, n
