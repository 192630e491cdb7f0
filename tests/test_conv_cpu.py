"""The fused numba conv1d (+ SiLU) against the pure-PyTorch one, forward and every gradient."""
import pytest
import torch

from svp.ops import available_backends, causal_conv1d_bld

if "cpu" not in available_backends():
    pytest.fail("the numba cpu backend is not available", pytrace=False)

from svp.ops import conv_cpu as conv_cpu_mod  # noqa: E402
from svp.ops.conv_cpu import causal_conv1d_cpu, causal_conv1d_proj_cpu  # noqa: E402
from fused_helpers import output_and_grads, recompiled  # noqa: E402


def _check_against_pytorch(x, w, bias, act, reverse, g):
    """The fused conv and the PyTorch one on the same inputs: output, and every gradient of a
    random projection of it (``g`` draws the projection)."""
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


@pytest.mark.parametrize("shape", [(2, 13, 40), (3, 37, 130), (1, 2, 7), (2, 1, 5)], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("act", [None, "silu"])
def test_fused_conv_matches_pytorch(shape, reverse, act):
    b, L, d = shape
    g = torch.Generator().manual_seed(L * d)
    x = torch.randn(b, L, 2 * d, generator=g)[..., :d]       # strided, as a chunk of in_proj
    w, bias = torch.randn(d, 4, generator=g) * 0.5, torch.randn(d, generator=g)
    _check_against_pytorch(x, w, bias, act, reverse, g)


def test_a_strided_input_is_copied_so_the_kernels_are_compiled_for_one_layout():
    # a second layout would be a second numba specialisation of each kernel: seconds of compiling
    from svp.ops import conv_cpu
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 2 * 16, generator=g)[..., :16].requires_grad_()
    w, bias = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    causal_conv1d_cpu(x, w, bias, "silu").sum().backward()
    causal_conv1d_proj_cpu(x, w, bias, torch.randn(5, 16, generator=g), "silu")[1].sum().backward()
    for task in (conv_cpu._fwd_task, conv_cpu._bwd_task):   # (x after the task index)
        assert task.signatures and {sig[1].layout for sig in task.signatures} == {"C"}


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
    _check_against_pytorch(x, w, bias, "silu", reverse, g)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("used", ["both", "conv", "proj"])
def test_conv_with_projection_matches_conv_then_linear(reverse, used):
    """The mixer's conv + x_proj node: outputs and every gradient (x, conv weight and bias, the
    projection's weight) against the conv followed by F.linear, with either output unused."""
    from svp.ops.conv_cpu import causal_conv1d_proj_cpu
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 23, 40, generator=g)
    w, bias, pw = torch.randn(40, 4, generator=g) * 0.5, torch.randn(40, generator=g), torch.randn(9, 40, generator=g)
    a = [t.clone().requires_grad_() for t in (x, w, bias, pw)]
    c = [t.clone().requires_grad_() for t in (x, w, bias, pw)]
    y_ref = causal_conv1d_bld(a[0], a[1], a[2], "silu", reverse=reverse)
    p_ref = torch.nn.functional.linear(y_ref, a[3])
    y, p = causal_conv1d_proj_cpu(c[0], c[1], c[2], c[3], "silu", reverse=reverse)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5)
    gy, gp = torch.randn(y.shape, generator=g), torch.randn(p.shape, generator=g)

    def loss(yy, pp):
        return ((yy * gy).sum() if used != "proj" else 0) + ((pp * gp).sum() if used != "conv" else 0)
    loss(y_ref, p_ref).backward()
    loss(y, p).backward()
    for r, q, name in zip(a, c, ("x", "weight", "bias", "proj_w")):
        if r.grad is None:
            assert q.grad is None or not q.grad.any(), name
            continue
        torch.testing.assert_close(q.grad, r.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("L", [1, 2, 3, 19, 40])
@pytest.mark.parametrize("d", [40, 64, 130])
def test_projection_gradient_formed_in_the_conv_kernel_matches_float64_and_not_the_threads(L, d):
    """x_proj's input gradient, formed per task row and halo inside the conv's backward kernel
    (conv_cpu._proj_rows: pairs of rows, the last pair overlapping, a single row formed twice,
    pw padded to whole 64-channel blocks), against the float64 conv + product, and the same
    bits on one thread as on two (rows formed in different tasks by different threads)."""
    from svp.ops.conv_cpu import causal_conv1d_proj_cpu
    g = torch.Generator().manual_seed(L * 1000 + d)
    x, w, bias = torch.randn(2, L, d, generator=g), torch.randn(d, 4, generator=g) * 0.5, torch.randn(d, generator=g)
    pw, gy, gp = torch.randn(9, d, generator=g), torch.randn(2, L, d, generator=g), torch.randn(2, L, 9, generator=g)
    ref = x.double().requires_grad_()
    yr = causal_conv1d_bld(ref, w.double(), bias.double(), "silu")
    ((yr * gy.double()).sum() + (torch.nn.functional.linear(yr, pw.double()) * gp.double()).sum()).backward()
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xx = x.clone().requires_grad_()
            y, p = causal_conv1d_proj_cpu(xx, w, bias, pw, "silu")
            ((y * gy).sum() + (p * gp).sum()).backward()
            grads.append(xx.grad)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(grads[0].double(), ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("L", [1, 2, 3, 5, 19, 37])
@pytest.mark.parametrize("n", [9, 44, 56, 100])
def test_projection_formed_in_the_conv_kernel_matches_float64_and_not_the_threads(L, n):
    """x_proj's product, formed by the conv's forward kernel from the rows each task has just
    written (conv_cpu._proj_out_rows: four rows at a time, the last four overlapping, fewer
    repeated; 48- and 16-column tiles), against the float64 conv + product, and the same bits
    on one thread as on two."""
    from svp.ops.conv_cpu import causal_conv1d_proj_cpu
    g = torch.Generator().manual_seed(L * 1000 + n)
    d = 40
    x, w, bias = torch.randn(2, L, d, generator=g), torch.randn(d, 4, generator=g) * 0.5, torch.randn(d, generator=g)
    pw = torch.randn(n, d, generator=g)
    want = torch.nn.functional.linear(causal_conv1d_bld(x.double(), w.double(), bias.double(), "silu"), pw.double())
    outs = []
    threads = torch.get_num_threads()
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            outs.append(causal_conv1d_proj_cpu(x, w, bias, pw, "silu")[1])
    finally:
        torch.set_num_threads(threads)
    assert outs[0].shape == (2, L, n)
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow  # compiles the kernel in the form other CPUs take (main environment only: Makefile)
def test_projection_products_have_the_same_bits_in_their_narrow_and_wide_forms(monkeypatch):
    """Where a vector is two registers (scan_cpu._NARROW) x_proj's products in the conv's kernels
    take fewer accumulators at a time (_proj_rows two vectors of a block, _proj_out_rows 16-column
    tiles instead of 48): each element is the same fma chain in the same order, so both forms,
    compiled side by side, give the same bits, over partial row groups, padded columns and
    several blocks; and they match float64."""
    import numpy as np
    from svp.ops import conv_cpu
    rng = np.random.default_rng(11)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    probe = f32(2, 3, 64)
    conv_cpu._proj_rows(f32(2, 3), f32(3, 64), 0, 2)   # the module's own, compiled with the real flag
    conv_cpu._proj_out_rows(probe, 0, 0, 2, f32(64, 16), np.zeros((2, 3, 9), np.float32))
    narrow = conv_cpu._NARROW
    monkeypatch.setattr(conv_cpu, "_NARROW", not narrow)
    other_rows, other_out = recompiled(conv_cpu, "_proj_rows"), recompiled(conv_cpu, "_proj_out_rows")
    monkeypatch.setattr(conv_cpu, "_NARROW", narrow)
    assert other_rows.py_func.__globals__["_NARROW"] is (not narrow)
    # the input gradient's rows: pd (rows, n) @ pw (n, dp), rows row0 .. row0 + nr - 1
    for n, dp in ((9, 64), (44, 192)):
        pd, pw = f32(20, n), f32(n, dp)
        for row0, nr in ((0, 1), (2, 2), (1, 3), (0, 16), (3, 17)):
            got = [fn(pd, pw, row0, nr)[:nr * dp] for fn in (conv_cpu._proj_rows, other_rows)]
            assert np.array_equal(got[0], got[1]), (n, dp, row0, nr)
            want = pd[row0:row0 + nr].astype(np.float64) @ pw.astype(np.float64)
            np.testing.assert_allclose(got[0].reshape(nr, dp), want, rtol=1e-5, atol=1e-4)
    # the forward's product: out[bi, t] @ pwT (d, npd), into proj (b, L, n)
    d, L = 96, 23
    out = f32(2, L, d)
    for n in (9, 44, 56, 100):
        npd = -(-n // 16) * 16
        pwT = np.zeros((d, npd), np.float32)
        pwT[:, :n] = f32(d, n)
        for t0, t1 in ((0, 1), (0, 3), (5, 9), (2, 23)):
            got = []
            for fn in (conv_cpu._proj_out_rows, other_out):
                proj = np.full((2, L, n), np.nan, np.float32)
                fn(out, 1, t0, t1, pwT, proj)
                got.append(proj)
            assert np.array_equal(got[0], got[1], equal_nan=True), (n, t0, t1)
            want = out[1, t0:t1].astype(np.float64) @ pwT[:, :n].astype(np.float64)
            np.testing.assert_allclose(got[0][1, t0:t1], want, rtol=1e-5, atol=1e-4)


def test_projection_follows_its_weight_changed_in_place():
    """The fused forward keeps a frozen x_proj weight transposed on the weight (svp.ops.kept); an
    in-place change makes it form it again, and a trained weight (which torch's fused AdamW steps
    without bumping its version counter) is formed anew each call."""
    from svp.ops.conv_cpu import causal_conv1d_proj_cpu
    g = torch.Generator().manual_seed(2)
    x, w, bias, pw = (torch.randn(2, 9, 64, generator=g), torch.randn(64, 4, generator=g), torch.randn(64, generator=g),
                      torch.randn(44, 64, generator=g))
    p1 = causal_conv1d_proj_cpu(x, w, bias, pw, "silu")[1]
    assert torch.equal(causal_conv1d_proj_cpu(x, w, bias, pw, "silu")[1], p1)
    with torch.no_grad():
        pw.mul_(2.0)   # (every product and sum exactly doubled)
    assert torch.equal(causal_conv1d_proj_cpu(x, w, bias, pw, "silu")[1], 2 * p1)
    # a trained weight stepped by the engine's AdamW (fused where torch has a CPU kernel: torch
    # 2.14's leaves the version counter as it was)
    from svp.engine.optim import fused_available
    tw = torch.nn.Parameter(pw.clone())
    opt = torch.optim.AdamW([tw], lr=0.5, fused=fused_available("cpu") or None)
    causal_conv1d_proj_cpu(x, w, bias, tw, "silu")[1].sum().backward()
    opt.step()
    assert not torch.equal(tw, pw)
    with torch.no_grad():
        got = causal_conv1d_proj_cpu(x, w, bias, tw, "silu")[1]
        want = torch.nn.functional.linear(causal_conv1d_bld(x, w, bias, "silu"), tw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv_weight_is_kept_transposed_on_its_parameter_through_fresh_views():
    """The model hands the conv its (d, 1, W) weight as a fresh squeeze view on every call; the
    transposed weight the kernels read is kept on the view's base (svp.ops.kept): the next view's
    call reuses it, an in-place change of the parameter forms it again (the result then that of
    the new values), and a parameter that requires grad keeps nothing."""
    g = torch.Generator().manual_seed(4)
    x, bias, pw = torch.randn(2, 9, 64, generator=g), torch.randn(64, generator=g), torch.randn(5, 64, generator=g)
    param = torch.randn(64, 1, 4, generator=g)

    def kept_wt(p):
        return [v[1] for k, v in getattr(p, "_svp_kept", {}).items() if k == "conv_cpu w^T"]

    y0, p0 = causal_conv1d_proj_cpu(x, param.squeeze(1), bias, pw, "silu")
    first = kept_wt(param)
    assert len(first) == 1 and torch.equal(first[0], param.squeeze(1).t())
    assert torch.equal(causal_conv1d_cpu(x, param.squeeze(1), bias, "silu"), y0) and kept_wt(param)[0] is first[0]
    with torch.no_grad():
        param.mul_(0.5)
    y1, _ = causal_conv1d_proj_cpu(x, param.squeeze(1), bias, pw, "silu")
    assert kept_wt(param)[0] is not first[0]
    assert torch.equal(y1, causal_conv1d_cpu(x, param.squeeze(1).clone(), bias, "silu"))
    torch.testing.assert_close(y1, causal_conv1d_bld(x, param.squeeze(1), bias, "silu"), rtol=1e-5, atol=1e-5)
    trained = param.clone().requires_grad_()
    causal_conv1d_proj_cpu(x, trained.squeeze(1), bias, pw, "silu")[1].sum().backward()
    assert not kept_wt(trained) and trained.grad is not None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_vim_with_fused_conv_projection_matches_unfused(monkeypatch, method):
    """A small Vim, every gradient, with conv + x_proj as one node against the separate conv and
    x_proj: full fine-tuning (conv and x_proj weights trained) and LoRA on x_proj (a
    parametrized weight)."""
    import timm
    import svp.models.vim as vim
    from svp.peft import get_peft_model, make_config
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32,
                              num_classes=5)
    kw = dict(targets=("x_proj",), r=2) if method == "lora" else {}
    peft = get_peft_model(model, make_config(method, **kw)).eval()
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape))
    x = torch.randn(2, 3, 32, 32)

    def run():
        return output_and_grads(peft, x)

    calls = []
    real = vim._fused_conv_proj
    monkeypatch.setattr(vim, "_fused_conv_proj", lambda *a, **k: (calls.append(1) or real(*a, **k)))
    fused = run()
    assert len(calls) == 4 and real(torch.zeros(1, 2, 64), model.layers[0].mixer.conv1d, model.layers[0].mixer.x_proj)
    monkeypatch.setattr(vim, "_fused_conv_proj", lambda *a, **k: False)
    ref = run()
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=1e-5)
    assert fused[1].keys() == ref[1].keys()
    assert any("x_proj" in n for n in ref[1]) and (method == "lora" or any("conv1d" in n for n in ref[1]))
    for n in ref[1]:
        torch.testing.assert_close(fused[1][n], ref[1][n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("used", ["all", "no_proj_b"])
def test_bidirectional_conv_projection_is_two_nodes_bit_for_bit(used):
    """bi_conv_proj_cpu (the reverse direction's backward kernel adds its x gradient to the
    forward direction's) against two causal_conv1d_proj_cpu calls and autograd's sum: the same
    bits for all four outputs and every gradient, also when one output is unused."""
    from svp.ops.conv_cpu import bi_conv_proj_cpu, causal_conv1d_proj_cpu
    g = torch.Generator().manual_seed(5)
    b, L, d, n = 2, 21, 40, 7
    base = [torch.randn(b, L, d, generator=g), torch.randn(d, 4, generator=g), torch.randn(d, generator=g),
            torch.randn(n, d, generator=g), torch.randn(d, 4, generator=g), torch.randn(d, generator=g),
            torch.randn(n, d, generator=g)]
    gs = [torch.randn(b, L, d, generator=g), torch.randn(b, L, n, generator=g)] * 2

    def loss(outs):
        return sum((o * gg).sum() for i, (o, gg) in enumerate(zip(outs, gs)) if not (used == "no_proj_b" and i == 3))

    a = [t.clone().requires_grad_() for t in base]
    two = (*causal_conv1d_proj_cpu(a[0], a[1], a[2], a[3], "silu"),
           *causal_conv1d_proj_cpu(a[0], a[4], a[5], a[6], "silu", reverse=True))
    ga = torch.autograd.grad(loss(two), a, allow_unused=True)
    c = [t.clone().requires_grad_() for t in base]
    one = bi_conv_proj_cpu(c[0], (c[1], c[2], c[3]), (c[4], c[5], c[6]))
    gc = torch.autograd.grad(loss(one), c, allow_unused=True)
    for p, q in zip(two, one):
        assert torch.equal(p, q)
    for i, (p, q) in enumerate(zip(ga, gc)):
        assert (p is None and q is None) if i == 6 and used == "no_proj_b" else torch.equal(p, q), i


@pytest.mark.parametrize("used", ["all", "backward_only"])
def test_bidirectional_conv_projection_reads_bfloat16_x_with_the_bits_of_its_cast(used):
    """A bfloat16 x (in_proj's output under CPU autocast) is read as it is and its gradient written
    in bfloat16: exactly the bits of casting x to float32 first, every output and gradient
    (float32 but x's); also when only the reverse direction's outputs are used (x's gradient
    then float32 from the kernel, cast by autograd). Other dtypes are refused."""
    from svp.ops.conv_cpu import bi_conv_proj_cpu, causal_conv1d_proj_cpu
    g = torch.Generator().manual_seed(6)
    b, L, d, n = 2, 21, 40, 7
    x = torch.randn(b, L, d, generator=g).to(torch.bfloat16)
    rest = [torch.randn(d, 4, generator=g), torch.randn(d, generator=g), torch.randn(n, d, generator=g),
            torch.randn(d, 4, generator=g), torch.randn(d, generator=g), torch.randn(n, d, generator=g)]
    gs = [torch.randn(b, L, d, generator=g), torch.randn(b, L, n, generator=g)] * 2

    def run(cast):
        xx = x.clone().requires_grad_()
        r = [t.clone().requires_grad_() for t in rest]
        outs = bi_conv_proj_cpu(xx.float() if cast else xx, (r[0], r[1], r[2]), (r[3], r[4], r[5]))
        loss = sum((o * gg).sum() for i, (o, gg) in enumerate(zip(outs, gs)) if used == "all" or i >= 2)
        return outs, torch.autograd.grad(loss, [xx] + r, allow_unused=True)
    (o1, g1), (o2, g2) = run(True), run(False)
    for p, q in zip(o1, o2):
        assert q.dtype == torch.float32 and torch.equal(p, q)
    assert g2[0].dtype == torch.bfloat16
    for i, (p, q) in enumerate(zip(g1, g2)):
        assert (p is None and q is None) if (used == "backward_only" and i in (1, 2, 3)) else torch.equal(p, q), i
    with pytest.raises(ValueError, match="x as a float32 or bfloat16 CPU tensor"):
        bi_conv_proj_cpu(x.half(), (rest[0], rest[1], rest[2]), (rest[3], rest[4], rest[5]))
    with pytest.raises(ValueError, match="x as a float32 CPU tensor"):
        causal_conv1d_proj_cpu(x, rest[0], rest[1], rest[2], "silu")


@pytest.mark.skipif(conv_cpu_mod._NARROW, reason="a CPU without AVX-512: no 512-bit vectors to ask for")
def test_the_pre_activation_loops_take_512_bit_vectors():
    """_preact and _preact4, the conv's pre-activation rows, are functions of their own in the
    kernels' code, so the task's "prefer-vector-width" attribute does not reach their loops:
    LLVM vectorised them at 256 bits on AVX-512 until each asked for 512 itself (the same bits;
    the node 0.9x the time at Vim-Tiny b8). Compiled here apart (uncached, so their machine code
    can be read), their multiply-adds use zmm registers."""
    import numpy as np
    conv_cpu = conv_cpu_mod
    x = np.random.default_rng(0).standard_normal((1, 6, 64)).astype(np.float32)
    w = np.ones((4, 64), np.float32)
    bias = np.zeros((1, 64), np.float32)
    acc = np.empty(64, np.float32)
    conv_cpu._preact4(x, w, bias[0], 0, 3, False, acc)
    conv_cpu._preact(x, w, bias, 0, 1, False, acc)
    for fn in (conv_cpu._preact4, conv_cpu._preact):
        asm = "\n".join(fn.inspect_asm().values())
        ops = [ln for ln in asm.splitlines() if ln.strip().startswith(("vfmadd", "vmulps", "vaddps"))]
        assert ops and any("zmm" in ln for ln in ops), (fn.__name__, ops[:8])


def test_weights_of_another_dtype_are_refused_by_name():
    """A bfloat16 weight or bias reached numba as an unsupported ScalarType (TypeError)."""
    x, w, b = torch.randn(1, 5, 16), torch.randn(16, 4), torch.randn(16)
    for kw, name in ((dict(weight=w.bfloat16(), bias=b), "weight"), (dict(weight=w, bias=b.half()), "bias")):
        with pytest.raises(ValueError, match=f"causal_conv1d_cpu needs {name} as a float32 or float64 CPU tensor"):
            causal_conv1d_cpu(x, **kw)
        with pytest.raises(ValueError, match=f"causal_conv1d_proj_cpu needs {name} as a float32 or float64"):
            causal_conv1d_proj_cpu(x, kw["weight"], kw["bias"], torch.randn(3, 16))


def test_a_float64_weight_is_read_as_float32_and_a_bias_of_another_length_refused():
    """Review of the CPU kernels: a float64 weight (accepted, "read as float32") reached the kernels
    as float64: a float64 compile of the forward, and a numba TypingError in the backward; a (k*dim,)
    bias became k per-sample ones, read past its end for the samples after them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, generator=g, requires_grad=True)
    w = torch.randn(16, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    out = causal_conv1d_cpu(x, w, b, "silu")
    want = causal_conv1d_bld(x.detach(), w.detach().float(), b.detach().float(), "silu")
    assert out.dtype == torch.float32 and torch.allclose(out, want, atol=1e-5)
    out.square().sum().backward()
    assert w.grad.dtype == torch.float64 and b.grad.dtype == torch.float64 and x.grad is not None
    wf, bf, xf = (t.detach().float().requires_grad_() for t in (w, b, x))
    causal_conv1d_bld(xf, wf, bf, "silu").square().sum().backward()
    for got, ref in ((x.grad, xf.grad), (w.grad, wf.grad), (b.grad, bf.grad)):
        assert torch.allclose(got.float(), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"expected bias \(dim,\) = \(16,\) or \(batch, 1, dim\); got \(32,\)"):
        causal_conv1d_cpu(x.detach(), w.detach().float(), torch.zeros(32))
