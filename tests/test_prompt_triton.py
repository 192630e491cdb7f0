"""SVP's prompt step as Triton kernels (svp.ops.prompt_triton), run on CPU tensors through
Triton's interpreter: the output and every gradient against the float64 formula, with both
prompters or one, the class token anywhere or nowhere, row counts and widths that fill no tile;
reduced-precision streams; the class token's row left alone; the same bits on every run; bad
input; and SVP's paper mode taking it where the scan runs on the 'triton' backend (and not
otherwise, nor in official mode), with the PyTorch path's values."""
from __future__ import annotations

import pytest
import torch

from svp.errors import BackendError
from svp.ops import set_backend
from fused_helpers import prompt_step_reference
from triton_helpers import interpreter, require_triton  # noqa: F401  (interpreter: an autouse fixture)

triton = require_triton()

from svp.ops import prompt_triton  # noqa: E402
from svp.ops.prompt_triton import add_silu_prompts_triton  # noqa: E402


def _inputs(shape, dtype, use, seed):
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    h = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    a1 = (2 * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_() if "cross" in use else None
    a2 = (2 * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_() if "inner" in use else None
    s1 = torch.randn(d, generator=gen).requires_grad_() if a1 is not None else None
    s2 = torch.randn(d, generator=gen).requires_grad_() if a2 is not None else None
    return h, a1, s1, a2, s2, torch.randn(*shape, generator=gen)


def _leaves(args):
    return [t for t in args if t is not None]


@pytest.mark.parametrize("shape", [(2, 9, 24), (3, 37, 200), (1, 197, 384)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("skip", [4, 0, -1])
@pytest.mark.parametrize("use", ["cross+inner", "cross", "inner"])
def test_matches_the_float64prompt_step_reference(shape, skip, use):
    skip = min(skip, shape[1] - 1)
    h, a1, s1, a2, s2, g = _inputs(shape, torch.float32, use, sum(shape) + skip)
    args = (h, a1, s1, a2, s2)
    out = add_silu_prompts_triton(*args, skip=skip)
    got = (out, *torch.autograd.grad(out, _leaves(args), g))
    a64 = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    want_out = prompt_step_reference(*a64, skip)
    want = (want_out, *torch.autograd.grad(want_out, _leaves(a64), g.double()))
    assert out.dtype == torch.float32
    for a, b in zip(got, want):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 2e-6
    if skip >= 0:   # the class token's row: h's own bits, and no prompt gradient
        assert torch.equal(out[:, skip], h[:, skip])
        for da in got[2:]:
            if da.dim() == 3:
                assert torch.count_nonzero(da[:, skip]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_stream(dtype):
    h, a1, s1, a2, s2, g = _inputs((2, 17, 40), dtype, "cross+inner", 3)
    args = (h, a1, s1, a2, s2)
    out = add_silu_prompts_triton(*args, skip=8)
    got = (out, *torch.autograd.grad(out, _leaves(args), g.to(dtype)))
    a64 = [t.detach().double().requires_grad_() for t in args]
    want_out = prompt_step_reference(*a64, 8)
    want = (want_out, *torch.autograd.grad(want_out, a64, g.to(dtype).double()))
    assert [t.dtype for t in got] == [dtype, dtype, dtype, torch.float32, dtype, torch.float32]
    for a, b in zip(got, want):   # one rounding to the stream's dtype; the scales' sums in float32
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < (1e-5 if a.dtype == torch.float32 else 1e-2)


def test_same_bits_on_every_run():
    h, a1, s1, a2, s2, g = _inputs((3, 41, 150), torch.float32, "cross+inner", 5)
    args = (h, a1, s1, a2, s2)
    runs = []
    for _ in range(2):
        out = add_silu_prompts_triton(*args, skip=20)
        runs.append((out, *torch.autograd.grad(out, _leaves(args), g)))
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_bad_input_is_named(monkeypatch):
    h = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="needs a1 or a2"):
        add_silu_prompts_triton(h)
    with pytest.raises(ValueError, match="each pre-activation needs its scale"):
        add_silu_prompts_triton(h, h)
    with pytest.raises(ValueError, match=r"a1 has shape \(2, 4, 8\), expected \(2, 5, 8\)"):
        add_silu_prompts_triton(h, torch.randn(2, 4, 8), torch.ones(8))
    for skip in (-2, 5, 1.5):   # a row the kernel never meets prompted every row
        with pytest.raises(ValueError, match=r"add_silu_prompts_triton: skip must be a row index in \[0, 5\)"):
            add_silu_prompts_triton(h, h, torch.ones(8), skip=skip)
    with pytest.raises(BackendError, match="takes float32 tensors; s1 is torch.bfloat16"):
        add_silu_prompts_triton(h, h, torch.ones(8, dtype=torch.bfloat16))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        add_silu_prompts_triton(h, h, torch.ones(8))


@pytest.mark.parametrize("joint", [True, False], ids=["joint-node", "modules"])
@pytest.mark.parametrize("compat", ["paper", "official"])
def test_svp_takes_it_where_the_scan_runs_on_triton(monkeypatch, compat, joint):
    """SVP's prompt step (a layer of a small Vim's adapter): the Triton kernels in paper mode
    with the 'triton' scan backend, with the PyTorch path's output and gradients (the stream
    and every prompter parameter); never with ENABLED off, another backend, or official mode.
    With models/vim.py's GPU_JOINT_NODES on, the step and the prompters' products as one node
    (SVPPromptsTriton), else the modules' products and the step's kernels alone."""
    import timm

    import svp.models  # noqa: F401  (registers the Vim models)
    from svp.models import vim
    from svp.peft import get_peft_model, make_config
    calls = []
    step, node = prompt_triton.add_silu_prompts_triton, prompt_triton.svp_prompts
    monkeypatch.setattr(prompt_triton, "add_silu_prompts_triton", lambda *a, **k: calls.append("step") or step(*a, **k))
    monkeypatch.setattr(prompt_triton, "svp_prompts", lambda *a, **k: calls.append("node") or node(*a, **k))
    monkeypatch.setattr(vim, "GPU_JOINT_NODES", joint)
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32)
    peft = get_peft_model(model, make_config("svp", shared_layers=1, hidden=8, compat=compat))
    with torch.no_grad():
        for p in peft.method.parameters():
            p.add_(0.5 * torch.randn(p.shape))
    h = torch.randn(2, 17, 32)
    g = torch.randn(2, 17, 32)
    params = list(peft.method.parameters())
    res = {}
    for backend, enabled in (("triton", True), ("triton", False), ("torch", True)):
        monkeypatch.setattr(prompt_triton, "ENABLED", enabled)
        set_backend(backend)
        calls.clear()
        hi = h.clone().requires_grad_()
        out = peft.method.prompt_tokens(1, hi, 8)
        grads = torch.autograd.grad(out, [hi] + params, g, allow_unused=True)
        res[backend, enabled] = out.detach(), grads
        taken = (backend, enabled, compat) == ("triton", True, "paper")
        assert calls == ([("node" if joint else "step")] if taken else []), (backend, enabled, compat)
    (o1, g1), (o2, g2) = res["triton", True], res["torch", True]
    assert (o1 - o2).abs().max() <= 1e-5 * o2.abs().max()
    assert sum(a is not None for a in g2) > 4
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if b is not None:
            assert (a - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1e-12)


def _prompters(d, r, use, biases, seed):
    gen = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).requires_grad_()
    cross = (t(d, d, scale=d ** -0.5), t(d) if biases else None, t(d)) if "cross" in use else None
    inner = ((t(r, d, scale=d ** -0.5), t(r) if biases else None, t(d, r, scale=r ** -0.5),
              t(d) if biases else None, t(d)) if "inner" in use else None)
    return cross, inner


def _node_reference(h, cross, inner, skip):
    """The step written out from the prompters' formulas (float64 where its inputs are)."""
    lin = torch.nn.functional.linear
    a1 = s1 = a2 = s2 = None
    if cross is not None:
        a1, s1 = lin(h, cross[0], cross[1]), cross[2]
    if inner is not None:
        a2, s2 = lin(lin(h, inner[0], inner[1]), inner[2], inner[3]), inner[4]
    return prompt_step_reference(h, a1, s1, a2, s2, skip)


def _flat(cross, inner):
    return [t for part in (cross, inner) if part is not None for t in part]


@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no-biases"])
@pytest.mark.parametrize("use", ["cross+inner", "cross", "inner"])
def test_the_node_with_its_products_matches_the_float64_formula(use, biases):
    """svp_prompts_triton: the output and the gradients of the stream, both prompters' weights
    and biases and the scales against the step written out in float64; the class token's row
    is the stream's own and gets no gradient from the prompters."""
    from svp.ops.prompt_triton import svp_prompts_triton
    d, r, skip = 48, 8, 6
    cross, inner = _prompters(d, r, use, biases, 7)
    h = torch.randn(3, 13, d, generator=torch.Generator().manual_seed(1)).requires_grad_()
    g = torch.randn(3, 13, d, generator=torch.Generator().manual_seed(2))
    out = svp_prompts_triton(h, skip, cross, inner)
    leaves = [h] + [t for t in _flat(cross, inner) if t is not None]
    got = (out, *torch.autograd.grad(out, leaves, g))
    c64, i64 = ([None if t is None else t.detach().double().requires_grad_() for t in part] if part else None
                for part in (cross, inner))
    h64 = h.detach().double().requires_grad_()
    want_out = _node_reference(h64, c64, i64, skip)
    want = (want_out, *torch.autograd.grad(want_out, [h64] + [t for t in _flat(c64, i64) if t is not None],
                                           g.double()))
    assert [t.dtype for t in got] == [torch.float32] * len(got)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-5
    assert torch.equal(out[:, skip], h[:, skip])
    assert torch.equal(got[1][:, skip], g[:, skip])   # the stream's gradient there: the incoming one


@pytest.mark.parametrize("stream", [torch.float32, torch.bfloat16])
def test_the_node_under_autocast_runs_bfloat16_products_close_to_the_modules(monkeypatch, stream):
    """Under autocast (the CPU's here, as the interpreter runs on CPU tensors) the node's
    products run in bfloat16 like the modules' and its values stay within bfloat16's rounding
    of theirs; the weights' gradients are float32, the stream's in its dtype. A float32 stream
    (a GPU autocast's first layer) takes the path where the products' sum is added to the
    incoming gradient, a bfloat16 one the path where the products add to the kernel's copy."""
    from svp.ops.prompt_triton import svp_prompts_triton
    d, r, skip = 40, 8, 5
    cross, inner = _prompters(d, r, "cross+inner", True, 3)
    h = torch.randn(2, 11, d, generator=torch.Generator().manual_seed(4)).to(stream).requires_grad_()
    g = torch.randn(2, 11, d, generator=torch.Generator().manual_seed(5)).to(stream)
    leaves = [h] + _flat(cross, inner)
    mods = []
    real_mm = torch.mm
    monkeypatch.setattr(prompt_triton, "mm", lambda a, b: mods.append(a.dtype) or real_mm(a, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = svp_prompts_triton(h, skip, cross, inner, dtype=torch.bfloat16)
        got = (out, *torch.autograd.grad(out, leaves, g))
        a1 = torch.nn.functional.linear(h, cross[0], cross[1])
        a2 = torch.nn.functional.linear(torch.nn.functional.linear(h, inner[0], inner[1]), inner[2], inner[3])
        ref = add_silu_prompts_triton(h, a1, cross[2], a2, inner[4], skip=skip)
        want = (ref, *torch.autograd.grad(ref, leaves, g))
    assert mods and set(mods) == {torch.bfloat16}
    assert [t.dtype for t in got] == [stream] * 2 + [torch.float32] * (len(got) - 2)
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 2e-2


def test_the_node_gives_the_same_bits_on_every_run():
    from svp.ops.prompt_triton import svp_prompts_triton
    cross, inner = _prompters(150, 16, "cross+inner", True, 9)
    h = torch.randn(3, 41, 150, generator=torch.Generator().manual_seed(3)).requires_grad_()
    g = torch.randn(3, 41, 150, generator=torch.Generator().manual_seed(4))
    runs = []
    for _ in range(2):
        out = svp_prompts_triton(h, 20, cross, inner)
        runs.append((out, *torch.autograd.grad(out, [h] + _flat(cross, inner), g)))
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_the_node_names_bad_input():
    from svp.ops.prompt_triton import svp_prompts_triton
    h = torch.randn(2, 5, 8)
    cross, inner = _prompters(8, 4, "cross+inner", True, 0)
    with pytest.raises(ValueError, match="needs the Cross or the Inner prompter"):
        svp_prompts_triton(h, 2)
    with pytest.raises(ValueError, match=r"W1 has shape \(4, 8\), expected \(8, 4\)"):
        svp_prompts_triton(h, 2, None, (inner[0], inner[1], inner[2].t(), inner[3], inner[4]))
    with pytest.raises(ValueError, match="Wc is None"):
        svp_prompts_triton(h, 2, (None, None, cross[2]))
    with pytest.raises(ValueError, match=r"svp_prompts_triton: skip must be a row index in \[0, 5\) or -1"):
        svp_prompts_triton(h, -3, cross, inner)
    with pytest.raises(BackendError, match="takes float32 tensors; alpha is torch.bfloat16"):
        svp_prompts_triton(h, 2, (cross[0], cross[1], cross[2].bfloat16()))
