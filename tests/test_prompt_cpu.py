"""The fused numba SVP prompt step against the PyTorch reference, forward and every gradient, and
an SVP model with the fused path against the same model through the module path."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import svp  # noqa: F401  (registers the models)
import svp.peft.svp as svp_mod
from svp.ops import available_backends
from svp.peft import get_peft_model, make_config

if "cpu" not in available_backends():
    pytest.fail("the numba cpu backend is not available", pytrace=False)

from svp.ops.prompt_cpu import add_silu_prompts_cpu, svp_prompts_cpu  # noqa: E402
from fused_helpers import output_and_grads, prompt_step_reference as _reference  # noqa: E402


@pytest.mark.parametrize("shape,skip", [((2, 13, 40), 6), ((3, 37, 192), 18), ((1, 1, 7), 0), ((2, 5, 8), -1),
                                        ((2, 33, 16), 32)], ids=str)
@pytest.mark.parametrize("use", ["both", "cross", "inner"])
def test_fused_prompts_match_reference(shape, skip, use):
    g = torch.Generator().manual_seed(shape[1] * shape[2] + skip)
    d = shape[-1]
    h = torch.randn(shape, generator=g)
    a1, a2 = 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g)
    s1, s2 = torch.randn(d, generator=g), torch.randn(d, generator=g)
    if use == "cross":
        a2 = s2 = None
    if use == "inner":
        a1 = s1 = None
    inputs = [h, a1, s1, a2, s2]
    ref = [None if t is None else t.clone().requires_grad_() for t in inputs]
    got = [None if t is None else t.clone().requires_grad_() for t in inputs]
    want = _reference(*ref, skip)
    out = add_silu_prompts_cpu(*got, skip=skip)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    if 0 <= skip < shape[1]:
        assert torch.equal(out[:, skip], h[:, skip])   # the class token is copied, not recomputed
    go = torch.randn(shape, generator=g)
    want.backward(go)
    out.backward(go)
    for p, q, name in zip(ref, got, ("h", "a1", "s1", "a2", "s2")):
        if p is None:
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)
        if name in ("a1", "a2") and 0 <= skip < shape[1]:
            assert not q.grad[:, skip].any()


def test_fused_prompts_without_scale_gradients_and_bits_independent_of_threads():
    import numba
    g = torch.Generator().manual_seed(0)
    shape = (4, 41, 24)
    h, a1, a2 = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
    s1, s2 = torch.randn(24, generator=g).requires_grad_(), torch.randn(24, generator=g)
    go = torch.randn(shape, generator=g)
    outs = []
    old = torch.get_num_threads()   # the kernels take torch's count
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            torch.set_num_threads(n)
            out = add_silu_prompts_cpu(h, a1, s1, a2, s2, skip=20)
            outs.append((out, *torch.autograd.grad(out, [h, a1, s1, a2], go)))
            assert numba.get_num_threads() == n
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert torch.equal(x, y)
    assert torch.equal(outs[0][1], go)   # the stream's gradient passes through unchanged


def _svp_reference(h, skip, cross, inner):
    """The modules' arithmetic: SiLU of each prompter's products with their biases, scaled."""
    p = 0
    if cross is not None:
        wc, bc, alpha = cross
        p = p + alpha * F.silu(F.linear(h, wc, bc))
    if inner is not None:
        w0, b0, w1, b1, beta = inner
        p = p + beta * F.silu(F.linear(F.linear(h, w0, b0), w1, b1))
    out = h + p
    return torch.cat([out[:, :skip], h[:, skip:skip + 1], out[:, skip + 1:]], dim=1)


@pytest.mark.parametrize("use", ["both", "cross", "inner"])
@pytest.mark.parametrize("frozen", ["none", "h", "weights", "biases", "scales"])
def test_svp_prompt_node_matches_the_modules_arithmetic(use, frozen):
    """svp_prompts_cpu (the prompters' products, biases in the kernel, the Inner down bias folded
    into the up one, the stream's gradient formed in place) against the modules' arithmetic:
    output and the gradient of every input that asks for one, and None for those that do not."""
    g = torch.Generator().manual_seed(11)
    b, L, d, r = 3, 23, 40, 8
    skip = 11
    h = torch.randn(b, L, d, generator=g)
    cross = [torch.randn(d, d, generator=g) / d ** 0.5, torch.randn(d, generator=g), torch.randn(d, generator=g)]
    inner = [torch.randn(r, d, generator=g) / d ** 0.5, torch.randn(r, generator=g),
             torch.randn(d, r, generator=g) / r ** 0.5, torch.randn(d, generator=g), torch.randn(d, generator=g)]
    if use == "cross":
        inner = None
    if use == "inner":
        cross = None
    names = ["h"] + (["Wc", "bc", "alpha"] if cross else []) + (["W0", "b0", "W1", "b1", "beta"] if inner else [])
    skip_grad = {"none": set(), "h": {"h"}, "weights": {"Wc", "W0", "W1"}, "biases": {"bc", "b0", "b1"},
                 "scales": {"alpha", "beta"}}[frozen]

    def leaves():
        ts = [h] + (cross or []) + (inner or [])
        return [t.clone().requires_grad_(n not in skip_grad) for t, n in zip(ts, names)]

    def split(ts):
        c = tuple(ts[1:4]) if cross else None
        i = tuple(ts[1 + 3 * bool(cross):]) if inner else None
        return c, i
    ref, got = leaves(), leaves()
    want = _svp_reference(ref[0], skip, *split(ref))
    out = svp_prompts_cpu(got[0], skip, *split(got))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, skip], h[:, skip])
    go = torch.randn(b, L, d, generator=g)
    want.backward(go)
    out.backward(go)
    for p, q, n in zip(ref, got, names):
        if n in skip_grad:
            assert q.grad is None, n
            continue
        assert q.grad is not None and q.grad.abs().max() > 0, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_svp_prompt_node_refuses_bad_inputs_by_name():
    h = torch.randn(2, 5, 8)
    w, v = torch.randn(8, 8), torch.randn(8)
    with pytest.raises(ValueError, match="Cross or the Inner"):
        svp_prompts_cpu(h, 2)
    with pytest.raises(ValueError, match=r"Wc has shape \(8, 7\), expected \(8, 8\)"):
        svp_prompts_cpu(h, 2, (torch.randn(8, 7), v, v))
    with pytest.raises(ValueError, match="alpha is torch.float64"):
        svp_prompts_cpu(h, 2, (w, v, v.double()))
    with pytest.raises(ValueError, match="beta is None"):
        svp_prompts_cpu(h, 2, None, (torch.randn(4, 8), None, torch.randn(8, 4), None, None))


@pytest.mark.parametrize("skip", [-2, 5, 2.0, True, None])
def test_prompt_steps_refuse_a_skip_row_they_would_never_meet(skip):
    """The kernels compare each row's index with ``skip``: -2 (Python's second-to-last row) or
    5 of 5 rows prompted every row, silently; a float or None was cast or crashed inside."""
    h, v = torch.randn(2, 5, 8), torch.randn(8)
    words = r"skip must be a row index in \[0, 5\) or -1 for none; got "
    with pytest.raises(ValueError, match="svp_prompts_cpu: " + words):
        svp_prompts_cpu(h, skip, (torch.randn(8, 8), v, v))
    with pytest.raises(ValueError, match="add_silu_prompts_cpu: " + words):
        add_silu_prompts_cpu(h, torch.randn(2, 5, 8), v, skip=skip)


def test_prompt_step_skip_minus_one_prompts_every_row():
    h, a, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(8)
    torch.testing.assert_close(add_silu_prompts_cpu(h, a, s, skip=-1), h + s * torch.nn.functional.silu(a))
    kept = add_silu_prompts_cpu(h, a, s, skip=np.int64(4))
    torch.testing.assert_close(kept[:, 4], h[:, 4])


@pytest.mark.parametrize("kw", [{}, dict(use_cross=False), dict(use_inner=False), dict(compat="official")], ids=str)
def test_svp_with_fused_prompts_matches_module_path(monkeypatch, kw):
    """An SVP model (nonzero alpha/beta, so every prompter gets a gradient), logits and every
    trainable gradient, with the fused prompt step against the same model through the modules."""
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=4, embed_dim=32,
                              num_classes=5)
    peft = get_peft_model(model, make_config("svp", shared_layers=2, hidden=8, **kw)).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if p.requires_grad and not n.startswith("base_model.head."):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 3, 32, 32, generator=g)

    def run():   # official mode trains with DropPath: the same masks both runs
        return output_and_grads(peft, x, seed=5)

    calls = []
    real = svp_mod._fused_prompts
    monkeypatch.setattr(svp_mod, "_fused_prompts", lambda *a: calls.append(1) or real(*a))
    fused = run()
    assert len(calls) == (0 if kw.get("compat") == "official" else 4)   # official mode: the module path
    monkeypatch.setattr(svp_mod, "_fused_prompts", lambda *a: False)
    ref = run()
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == ref[1].keys() and len(ref[1]) > 2
    for n in ref[1]:
        torch.testing.assert_close(fused[1][n], ref[1][n], rtol=1e-4, atol=1e-5, msg=n)


def test_svp_fused_prompts_leave_the_class_token_alone():
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=4, embed_dim=32)
    peft = get_peft_model(model, make_config("svp", shared_layers=2, hidden=8))
    with torch.no_grad():
        for p in peft.method.parameters():
            p.add_(0.5 * torch.randn(p.shape))
    h = torch.randn(2, 17, 32)
    assert svp_mod._fused_prompts(h, 8, *peft.method._parts(1))
    out = peft.method.prompt_tokens(1, h, 8)
    assert torch.equal(out[:, 8], h[:, 8])
    assert (out[:, :8] - h[:, :8]).abs().min() > 0 and (out[:, 9:] - h[:, 9:]).abs().min() > 0


def test_svp_under_cpu_autocast_runs_the_prompters_products_in_bfloat16_and_the_rest_in_float32():
    """Under autocast (train.amp on the CPU) the prompt node casts h and the weights to bfloat16
    once and runs the products (without biases) in bfloat16; the biases (the Inner down bias
    folded into the up one), SiLUs, scales, adds, their sums and the stream's gradient stay
    float32. Output and every gradient against that arithmetic written out with autograd, and
    against the float32 step at bfloat16's tolerance."""
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32)
    peft = get_peft_model(model, make_config("svp", shared_layers=1, hidden=8))
    with torch.no_grad():
        for p in peft.method.parameters():
            p.add_(0.5 * torch.randn(p.shape))
    h = torch.randn(2, 17, 32).requires_grad_()
    (cm, _), (im, _) = peft.method._parts(0)
    lin, down, up = cm._modules["0"], im._modules["0"], im._modules["1"]
    A, B = peft.method.alpha, peft.method.beta   # (the layer's rows: alpha[0], beta[0])
    params = [lin.weight, lin.bias, A, down.weight, down.bias, up.weight, up.bias, B]
    go = torch.randn(2, 17, 32)
    keep = [t for t in range(17) if t != 8]

    def grads(out):
        return torch.autograd.grad(out, [h] + params, go)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert svp_mod._fused_prompts(h, 8, *peft.method._parts(0))
        out = peft.method.prompt_tokens(0, h, 8)
    got = grads(out)
    bf = torch.bfloat16
    H = h.to(bf)
    a1 = (H @ lin.weight.to(bf).t()).float() + lin.bias
    a2 = ((H @ down.weight.to(bf).t()) @ up.weight.to(bf).t()).float() + ((up.weight * down.bias).sum(1) + up.bias)
    want = h + (A[0] * F.silu(a1) + B[0] * F.silu(a2))
    want = torch.cat([want[:, :8], h[:, 8:9], want[:, 9:]], dim=1)
    assert out.dtype == torch.float32 and torch.equal(out[:, 8], h[:, 8])
    torch.testing.assert_close(out[:, keep], want[:, keep], rtol=1e-6, atol=1e-6)
    for name, x, y in zip(["h", "Wc", "bc", "alpha", "W0", "b0", "W1", "b1", "beta"], got, grads(want)):
        assert x.dtype == torch.float32, name
        # (autograd sums h's two bfloat16 product gradients in bfloat16 first: one rounding more)
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-2 * y.abs().max().item(), msg=name)
    f32 = peft.method.prompt_tokens(0, h, 8)
    assert 0 < ((out - f32).norm() / f32.norm()).item() < 2e-2
    for name, x, y in zip(["h", "Wc", "bc", "alpha", "W0", "b0", "W1", "b1", "beta"], got, grads(f32)):
        assert ((x - y).norm() / y.norm()).item() < 5e-2, name


@pytest.mark.parametrize("use", ["both", "cross", "inner"])
def test_fused_prompts_read_and_write_bfloat16_pre_activations_with_the_bits_of_their_casts(use):
    """bfloat16 a1, a2 (the prompters' products under CPU autocast) are read as they are and
    their gradients written in bfloat16: exactly the bits of casting them to float32 first, the
    output and every gradient. Mixed dtypes are refused."""
    g = torch.Generator().manual_seed(7)
    shape, skip = (3, 37, 192), 18
    h = torch.randn(shape, generator=g)
    a1, a2 = ((3 * torch.randn(shape, generator=g)).to(torch.bfloat16) for _ in range(2))
    s1, s2 = torch.randn(192, generator=g), torch.randn(192, generator=g)
    if use == "cross":
        a2 = s2 = None
    if use == "inner":
        a1 = s1 = None
    go = torch.randn(shape, generator=g)

    def run(cast):
        leaves = [None if t is None else t.clone().requires_grad_() for t in (h, a1, s1, a2, s2)]
        args = [None if (t is None or not cast or i not in (1, 3)) else t.float() for i, t in enumerate(leaves)]
        args = [a if a is not None else t for a, t in zip(args, leaves)]
        out = add_silu_prompts_cpu(*args, skip=skip)
        used = [t for t in leaves if t is not None]
        return out, torch.autograd.grad(out, used, go)
    (o1, g1), (o2, g2) = run(True), run(False)
    assert o2.dtype == torch.float32 and torch.equal(o1, o2)
    for x, y in zip(g1, g2):
        assert x.dtype == y.dtype and torch.equal(x, y)
    if use == "both":
        assert g2[1].dtype == torch.bfloat16 and not g2[1][:, skip].any()
        with pytest.raises(ValueError, match="one dtype"):
            add_silu_prompts_cpu(h, a1, s1, a2.float(), s2, skip=skip)
