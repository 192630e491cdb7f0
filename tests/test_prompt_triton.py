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
    with pytest.raises(BackendError, match="takes float32 tensors; s1 is torch.bfloat16"):
        add_silu_prompts_triton(h, h, torch.ones(8, dtype=torch.bfloat16))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match="runs on CUDA tensors.*TRITON_INTERPRET=1"):
        add_silu_prompts_triton(h, h, torch.ones(8))


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_svp_takes_it_where_the_scan_runs_on_triton(monkeypatch, compat):
    """SVP's prompt step (a layer of a small Vim's adapter): the Triton kernels in paper mode
    with the 'triton' scan backend, with the PyTorch path's output and gradients (the stream
    and every prompter parameter); never with ENABLED off, another backend, or official mode."""
    import timm

    import svp.models  # noqa: F401  (registers the Vim models)
    from svp.peft import get_peft_model, make_config
    calls = []
    real = prompt_triton.add_silu_prompts_triton
    monkeypatch.setattr(prompt_triton, "add_silu_prompts_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
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
        assert calls == ([1] if taken else []), (backend, enabled, compat)
    (o1, g1), (o2, g2) = res["triton", True], res["torch", True]
    assert (o1 - o2).abs().max() <= 1e-5 * o2.abs().max()
    assert sum(a is not None for a in g2) > 4
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if b is not None:
            assert (a - b).abs().max() <= 1e-4 * b.abs().max().clamp_min(1e-12)
