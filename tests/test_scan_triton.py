"""The Triton selective scan, run on CPU tensors through Triton's interpreter.

The parity grid is the one every backend passes (tests/test_scan_backends.py: outputs,
last state and all gradients against float64; both directions; grouped and strided
inputs; exp underflow), parametrised here with the ``triton`` backend and the grid's
``SHRINK``/``KW`` for the interpreter. Then dispatch and bad input, and the bundled mini
Vim with SVP: logits and adapter gradients equal to the ``cpu`` backend's.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import test_scan_backends as grid
from svp.errors import BackendError
from svp.ops import dispatch, get_backend, set_backend
from triton_helpers import Fills, interpreter, require_triton  # noqa: F401  (interpreter: an autouse fixture)

triton = require_triton()


@pytest.mark.parametrize("shape", grid.SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity_shapes(shape):
    grid.test_parity_shapes("triton", shape)


@pytest.mark.parametrize("flags", grid.FLAGS, ids=lambda f: "z%dD%dbias%dsp%d" % f)
def test_parity_options(flags):
    grid.test_parity_options("triton", flags)


@pytest.mark.slow  # the interpreter on the largest grouped shapes
def test_grouped_and_noncontiguous():
    grid.test_grouped_and_noncontiguous("triton")


def test_large_delta_A():
    grid.test_large_delta_A("triton")


def test_half_and_double_inputs():
    grid.test_half_and_double_inputs("triton")


def test_wrong_shapes_refused():
    grid.test_every_backend_refuses_inputs_of_the_wrong_shape("triton")


def test_a_nan_time_step_reaches_the_gradients_of_the_steps_before_it():
    grid.test_a_nan_time_step_reaches_the_gradients_of_the_steps_before_it("triton")


@pytest.mark.parametrize("tiled", [False, True])
def test_an_infinite_time_step_leaves_the_steps_before_it_as_the_reference_does(tiled, monkeypatch):
    if tiled:
        _tiled(monkeypatch, "both")
    grid.test_an_infinite_time_step_leaves_the_steps_before_it_as_the_reference_does("triton")


@pytest.mark.parametrize("tiled", [False, True])
def test_a_large_negative_delta_without_softplus_stays_finite_as_the_reference(tiled, monkeypatch):
    if tiled:
        _tiled(monkeypatch, "both")
    grid.test_a_large_negative_delta_without_softplus_stays_finite_as_the_reference("triton")


TILED = {"fwd": ("tiled", "loop"), "bwd": ("loop", "tiled"), "both": ("tiled", "tiled")}


def _tiled(monkeypatch, which):
    """The experimental kernels (scan_triton.FORWARD / BACKWARD = "tiled": a chunk of steps at
    a time through parallel scans over time): ``which`` of them, the other the default."""
    from svp.ops import scan_triton as st
    fwd, bwd = TILED[which]
    monkeypatch.setattr(st, "FORWARD", fwd)
    monkeypatch.setattr(st, "BACKWARD", bwd)
    kf, kb = st._kernels()
    assert (kf.fn is st._fwd_tiled) == (fwd == "tiled") and (kb.fn is st._bwd_tiled) == (bwd == "tiled")


# both tiled over the grid's shapes but its largest (several blocks of 4 and 8 channels come
# with d = 24 and 40); each alone beside the other's default kernel (the saved chunk-start
# states are the interface) on the first
@pytest.mark.parametrize("which,shape", [("both", s) for s in grid.SHAPES[:4]]
                         + [("fwd", grid.SHAPES[0]), ("bwd", grid.SHAPES[0])],
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_tiled_kernels_parity_shapes(which, shape, monkeypatch):
    _tiled(monkeypatch, which)
    grid.test_parity_shapes("triton", shape)


def test_tiled_kernels_large_delta_A_and_half_inputs(monkeypatch):
    _tiled(monkeypatch, "both")
    grid.test_large_delta_A("triton")
    grid.test_half_and_double_inputs("triton")
    args = grid.make(1, 8, 5, 4)
    with pytest.raises(BackendError, match="power of two; got 6"):
        dispatch.scan_with("triton", *args[:7], delta_bias=args[7], delta_softplus=True, chunk=6)


# Every pair of the four options' values in 5 runs (a covering array), not all 16 combinations
# (2 s each interpreted, 33 s of CI's 10 minutes); the untiled kernels run all 16 above, the shapes
# above run every option on. SVP_TEST_ALL_OPTIONS=1 runs the 16 here too.
PAIRWISE = [(False, False, False, False), (False, True, True, True), (True, False, True, True),
            (True, True, False, True), (True, True, True, False)]


@pytest.mark.slow
@pytest.mark.parametrize("flags", grid.FLAGS if os.environ.get("SVP_TEST_ALL_OPTIONS") else PAIRWISE,
                         ids=lambda f: "z%dD%dbias%dsp%d" % f)
def test_tiled_kernels_parity_options(flags, monkeypatch):
    _tiled(monkeypatch, "both")
    grid.test_parity_options("triton", flags)


def test_one_chunk_and_default_chunk_agree_and_repeat_bit_for_bit():
    """The chunked backward gives the same result at any chunk size; two runs give the same bits
    (channel sums are per-block partials reduced in a fixed order, no atomics)."""
    args = grid.make(1, 70, 9, 16, seed=11)   # 70 channels: two blocks of 64, one partial
    res = []
    for chunk in (2, 16, 2):
        xs = [a.detach().clone().requires_grad_() for a in args]
        out = dispatch.scan_with("triton", *xs[:7], delta_bias=xs[7], delta_softplus=True, reverse=True,
                                 chunk=chunk)
        out.square().sum().backward()
        res.append([out.detach()] + [x.grad for x in xs])
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    assert all(torch.equal(a, b) for a, b in zip(res[2], res[0]))


def test_dispatch_forcing_and_automatic_choice(monkeypatch):
    assert "triton" in dispatch.available_backends()
    assert get_backend(torch.device("cpu")) == ("cpu" if "cpu" in dispatch.available_backends() else "torch")
    set_backend("triton")
    assert get_backend(torch.device("cpu")) == "triton"
    set_backend(None)
    monkeypatch.setenv("SVP_SCAN_BACKEND", "triton")
    assert get_backend(torch.device("cpu")) == "triton"
    monkeypatch.delenv("SVP_SCAN_BACKEND")
    # on CUDA tensors: mamba_ssm's kernels if they import, else triton
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    expect = "cuda" if "cuda" in dispatch.available_backends() else "triton"
    assert get_backend(torch.device("cuda")) == expect


def test_bad_input_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="no CUDA GPU found.*TRITON_INTERPRET=1"):
        set_backend("triton")
    monkeypatch.setenv("SVP_SCAN_BACKEND", "triton")
    with pytest.raises(BackendError, match="no CUDA GPU found"):
        get_backend(torch.device("cpu"))
    monkeypatch.delenv("SVP_SCAN_BACKEND")
    # Triton not installed: the import fails, the message says so
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "svp.ops.scan_triton", raising=False)
    monkeypatch.delitem(dispatch._loaded, "triton", raising=False)
    monkeypatch.setattr(dispatch, "_errors", {})
    with pytest.raises(BackendError, match="Triton is not installed"):
        set_backend("triton")


def test_bad_input_dtype_and_d_state():
    from svp.ops.scan_triton import MAX_D_STATE
    args = grid.make(1, 4, 3, 2)
    with pytest.raises(BackendError, match="float32, bfloat16 or float16 tensors; u is torch.float64"):
        dispatch.scan_with("triton", args[0].double(), *args[1:7])
    n = MAX_D_STATE + 1
    big = grid.make(1, 2, 2, n)
    with pytest.raises(BackendError, match=f"d_state <= {MAX_D_STATE}; got {n}"):
        dispatch.scan_with("triton", *big[:7])


def test_cli_prints_one_line_for_a_backend_error(monkeypatch, capsys):
    from svp.cli import main
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SVP_SCAN_BACKEND", "triton")
    rc = main(["doctor", "--no-timing"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no CUDA GPU found" in err, err


@pytest.mark.slow
def test_mini_vim_with_svp_matches_the_cpu_backend():
    """The bundled mini Vim's first four blocks (its bundled weights) with SVP (two groups of two
    layers) on one 12x12 image (10 tokens and four blocks, to keep the interpreter quick): logits
    and adapter gradients with the triton backend equal the cpu backend's."""
    import timm
    import svp.models  # noqa: F401  (registers the Vim models)
    from svp.peft import get_peft_model, make_config
    if "cpu" not in dispatch.available_backends():
        pytest.fail("the numba cpu backend is not available")
    torch.manual_seed(0)
    full = timm.create_model("vim_mini_patch4_32", pretrained=True, num_classes=5).state_dict()
    base = timm.create_model("vim_mini_patch4_32", num_classes=5, depth=4)
    base.load_state_dict({k: v for k, v in full.items() if not k.startswith(("layers.4.", "layers.5.", "layers.6.",
                                                                             "layers.7."))})
    model = get_peft_model(base, make_config("svp", shared_layers=2, hidden=8, num_classes=5)).eval()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3])
    res = {}
    for name in ("cpu", "triton"):
        model.zero_grad(set_to_none=True)
        set_backend(name)
        try:
            logits = model(x)
            torch.nn.functional.cross_entropy(logits, target).backward()
        finally:
            set_backend(None)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        res[name] = logits.detach(), grads
    (l_cpu, g_cpu), (l_tri, g_tri) = res["cpu"], res["triton"]
    assert g_cpu.keys() == g_tri.keys() and any("head" not in k for k in g_cpu)
    assert (l_tri - l_cpu).abs().max() <= 1e-4 * l_cpu.abs().max()
    for k in g_cpu:
        assert (g_tri[k] - g_cpu[k]).abs().max() <= 1e-3 * g_cpu[k].abs().max().clamp_min(1e-12), k


def compile_kernels_for_sm90():
    """Compile the kernels (forward, backward and their experimental tiled forms, the backward's
    sums; the conv's three; the add + RMSNorm's and SVP's prompt step's two each) for sm_90
    (bf16 inputs, every option on, each with the launch geometry it gets for a Vim-S mixer) to
    PTX and a cubin; no GPU needed.
    Returns the kernels' asm dicts."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from svp.ops import scan_triton as st
    consts = dict(N=16, BLOCK_N=16, K=st.CHUNK, HAS_Z=True, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True,
                  REVERSE=True, STAGES=st.STAGES)
    bf16 = {"u_ptr", "dl_ptr", "z_ptr", "B_ptr", "C_ptr", "out_ptr", "go_ptr", "du_ptr", "ddl_ptr", "dz_ptr"}
    asm = []
    modes = st.FORWARD, st.BACKWARD
    # (the reverse direction's forms, which add to the other direction's output and z gradient)
    fx, bx = {"ACC_OUT": True}, {"HAS_GLAST": True, "ACC_DZ": True, "NEED_DA": True}
    for fn, kind, extra in ((st._fwd, "fwd", fx), (st._bwd, "bwd", bx), (st._fwd_tiled, "fwd", fx),
                            (st._bwd_tiled, "bwd", bx)):
        jf = JITFunction(fn)
        st.FORWARD = st.BACKWARD = "tiled" if fn in (st._fwd_tiled, st._bwd_tiled) else "loop"
        try:
            _, _, block_d, _, warps, _ = st._plan(kind, 768, 16, 1)
        finally:
            st.FORWARD, st.BACKWARD = modes
        c = dict(consts, BLOCK_D=block_d, **extra)
        sig = {a: "constexpr" if a in c else ("*bf16" if a in bf16 else "*fp32") if a.endswith("_ptr") else "i32"
               for a in jf.arg_names}
        k = triton.compile(ASTSource(jf, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, **st.LAUNCH_OPTIONS))
        asm.append(k.asm)
    # the backward's fixed-order float64 sums (scan_triton.fixed_sum), into bfloat16
    jf = JITFunction(st._sum_mid)
    sig = {"p_ptr": "*fp32", "out_ptr": "*bf16", "NS": "i32", "INNER": "i32", "SPAN": "i32", "BLOCK": "constexpr",
           "F64": "constexpr"}
    asm.append(triton.compile(ASTSource(jf, sig, constexprs=dict(BLOCK=st.SUM_BLOCK, F64=False)),
                              target=GPUTarget("cuda", 90, 32), options=dict(**st.LAUNCH_OPTIONS, num_warps=4)).asm)
    # the conv's kernels (svp.ops.conv_triton), bf16 x as the model gives them under autocast
    from svp.ops import conv_triton as ct
    for fn in (ct._conv_fwd, ct._conv_bwd, ct._conv_dpre):
        jf = JITFunction(fn)
        c = dict(W=4, BLOCK_L=ct.BLOCK_L, BLOCK_D=ct.BLOCK_D, HAS_BIAS=True, SILU=True, REVERSE=True,
                 **({} if fn is ct._conv_dpre else {"ACC": True}))   # (the reverse direction's dx added)
        sig = {a: "constexpr" if a in c else ("*bf16" if a in ("x_ptr", "out_ptr", "go_ptr", "dx_ptr") else "*fp32")
               if a.endswith("_ptr") else "i32" for a in jf.arg_names}
        k = triton.compile(ASTSource(jf, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                           options=dict(**st.LAUNCH_OPTIONS, num_warps=ct.WARPS))
        asm.append(k.asm)
    # the add + RMSNorm's (svp.ops.norm_triton) at Vim-S's width, a bf16 mixer output
    from svp.ops import norm_triton as nt
    for fn, flag in ((nt._norm_fwd, "HAS_RES"), (nt._norm_bwd, "HAS_GX")):
        jf = JITFunction(fn)
        c = {"BLOCK": 512, "ROWS": nt.ROWS, flag: True}
        sig = {a: "constexpr" if a in c else ("*bf16" if a == "h_ptr" else "*fp32") if a.endswith("_ptr")
               else "fp32" if a == "eps" else "i32" for a in jf.arg_names}
        k = triton.compile(ASTSource(jf, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                           options=dict(**st.LAUNCH_OPTIONS, num_warps=nt._warps(512)))
        asm.append(k.asm)
    # SVP's prompt step (svp.ops.prompt_triton), both prompters, a bf16 stream
    from svp.ops import prompt_triton as pt
    for fn in (pt._prompt_fwd, pt._prompt_bwd):
        jf = JITFunction(fn)
        c = dict(HAS1=True, HAS2=True, ROWS=pt.ROWS, BLOCK_D=pt.BLOCK_D)
        f32 = ("s1_ptr", "s2_ptr", "ds1p_ptr", "ds2p_ptr")
        sig = {a: "constexpr" if a in c else ("*fp32" if a in f32 else "*bf16") if a.endswith("_ptr") else "i32"
               for a in jf.arg_names}
        k = triton.compile(ASTSource(jf, sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                           options=dict(**st.LAUNCH_OPTIONS, num_warps=pt.WARPS))
        asm.append(k.asm)
    return asm


def test_kernels_compile_for_a_gpu_without_one(monkeypatch):
    """The interpreter does not type-check like the compiler does: compile both kernels for
    sm_90 to PTX and a cubin, which needs no GPU. (Every integer and pointer plain here, without
    the alignment and divisibility a launch specialises on: registers read from these compiles
    are not a launch's; benchmarks/triton_asm.py compiles what a step launches, and its test
    runs in tests/test_gpu_scripts.py.) If TRITON_INTERPRET was set when triton was
    imported (``TRITON_INTERPRET=1 pytest ...``), Triton's own library functions (tl.cdiv,
    tl.sum, ...) were made interpreter-only and the compiler cannot use them in this process
    (on every Triton 3 release), so the compile runs in a fresh process without it."""
    from triton.runtime.jit import JITFunction as JF
    monkeypatch.delenv("TRITON_INTERPRET")
    if isinstance(triton.language.cdiv, JF):
        asm = compile_kernels_for_sm90()
    else:
        import os
        import subprocess
        here = os.path.dirname(os.path.abspath(__file__))
        src = os.path.join(os.path.dirname(here), "src")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([here, src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        code = ("import test_scan_triton as t; asm = t.compile_kernels_for_sm90(); "
                "print(len(asm) == 12 and all('cubin' in a and 'atom' not in a['ptx'] for a in asm))")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and r.stdout.split()[-1:] == ["True"], r.stdout + r.stderr
        return
    assert len(asm) == 12   # the scan's four and its sums'; the conv's three; the norm's and the prompt step's two
    for a in asm:
        assert "cubin" in a and "atom" not in a["ptx"]   # deterministic: no atomics


def test_kernels_launch_on_their_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device; _launch makes that the device of the kernel's
    tensors (a model on cuda:1 in a process whose current device is cuda:0). No GPU here: the
    tensor is a fake one on cuda:1, torch.cuda.device a recorder, and the kernel a stub that
    sees which device was current when it ran."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode
    from svp.ops import scan_triton
    monkeypatch.delenv("TRITON_INTERPRET")
    current = [None]

    @contextlib.contextmanager
    def device(d):
        old, current[0] = current[0], d
        try:
            yield
        finally:
            current[0] = old

    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []

    options = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: (seen.append(current[0]), options.append(k))

    with FakeTensorMode():
        x = torch.empty(2, device="cuda:1")
    scan_triton._launch(Kernel(), (1,), 7, x, BLOCK=4)
    scan_triton._launch(Kernel(), (1,), torch.empty(2), BLOCK=4)   # a CPU tensor: no device switch
    assert seen == [torch.device("cuda:1"), None] and current[0] is None
    # FMA contraction asked for, not left to Triton's default (off from Triton 3.10), unless the
    # user set Triton's switch for that default
    assert options == [dict(BLOCK=4, enable_fp_fusion=True)] * 2
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    scan_triton._launch(Kernel(), (1,), torch.empty(2), BLOCK=4)
    assert options[2:] == [dict(BLOCK=4)]


def test_fixed_sum_is_the_float64_sum_in_one_kernel():
    """scan_triton.fixed_sum, the backward's reduction of its per-program partials: the float64
    sum over one dimension, rounded to the dtype asked for. The float64 sums of these few
    float32 terms (magnitudes 1e-3 to 1e3 along the kept dimensions) are exact in any order, so
    the kernel's in-order sum must equal torch's bit for bit in float32 and float64. In
    bfloat16, within one unit in the last place: Triton's interpreter narrows float32 to
    bfloat16 by truncation (a GPU rounds to nearest, as torch does)."""
    from svp.ops.scan_triton import fixed_sum
    gen = torch.Generator().manual_seed(7)
    scale = torch.logspace(-3, 3, 37).view(1, 1, 1, 37, 1)
    P = torch.randn(3, 2, 5, 37, 4, generator=gen) * scale
    for dim, dtype in ((2, torch.float32), (2, torch.bfloat16), (2, torch.float64), (0, torch.float32),
                       (4, torch.float32)):
        got = fixed_sum(P, dim, dtype)
        want = P.double().sum(dim).to(dtype)
        assert got.dtype == dtype and got.shape == want.shape, (dim, dtype)
        if dtype == torch.bfloat16:
            assert ((got.double() - want.double()).abs() <= want.double().abs() * 2.0 ** -7).all(), dim
        else:
            assert torch.equal(got, want), (dim, dtype)
    # a strided input is read as its values (made contiguous first); an empty one gives zeros
    assert torch.equal(fixed_sum(P.transpose(0, 3), 1, torch.float32), P.transpose(0, 3).double().sum(1).float())
    assert fixed_sum(torch.empty(0, 4, 3), 1, torch.float32).shape == (0, 3)
    assert torch.equal(fixed_sum(torch.empty(2, 0, 3), 1, torch.float32), torch.zeros(2, 3))
    # a long sum over a small grid goes in two stages (spans of SUM_SPAN terms, then the spans'
    # sums; 3 and 70 spans here, the second 70 in two stages again), the same value
    for rows in (70, 2240):
        Q = torch.randn(rows, 5, generator=gen) * torch.logspace(-2, 2, rows).view(rows, 1)
        assert torch.equal(fixed_sum(Q, 0, torch.float64), Q.double().sum(0)), rows
        assert torch.equal(fixed_sum(Q, 0, torch.float32), Q.double().sum(0).float()), rows


def test_shared_B_beside_grouped_C():
    """B shared by every channel, (b, n, l), beside C in two groups: the scan runs two groups and
    B's gradient sums both groups' partials (the reduction's group path)."""
    args = grid.make(2, 24, 21, 8, groups=2)
    args[3] = args[3][:, 0].clone()
    grid.check("triton", args, reverse=True, last=True)
    args[3], args[4] = args[4], args[3]            # and C shared beside a grouped B
    grid.check("triton", args, reverse=False)


def test_an_unused_last_state_costs_no_zero_filled_gradient():
    """The models never use the scan's last state. Its gradient comes to the backward as None:
    no (b, d, N) zero tensor filled by autograd and read by the kernel. The gradients are those
    of the same call whose last state is used with a zero gradient."""
    from svp.ops.scan_triton import selective_scan_triton
    args = grid.make(2, 20, 9, 8, seed=3)
    g = torch.randn(2, 20, 9, generator=torch.Generator().manual_seed(4))
    grads = []
    for use_last in (False, True):
        xs = [a.detach().clone().requires_grad_() for a in args]
        out, last = selective_scan_triton(*xs[:7], delta_bias=xs[7], delta_softplus=True, return_last_state=True)
        with Fills() as fills:
            if use_last:
                torch.autograd.backward([out, last], [g, torch.zeros_like(last)])
            else:
                out.backward(g)
        if not use_last:
            assert fills.count == 0
        grads.append([x.grad for x in xs])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def _two_directions(dtype=torch.float32, shape=(2, 40, 13, 8)):
    """Each direction's (u, delta, A, B, C, D, delta_bias) from grid.make, and one z (b, d, l),
    the (b, *, l) tensors in ``dtype``. 40 channels: blocks of the plan's size and a partial one."""
    a = grid.make(*shape, seed=21)
    b = grid.make(*shape, seed=22)
    z = a[6]

    def cast(t):
        return t.to(dtype) if t is not None and t.dim() == 3 else t

    fwd = [cast(t) for t in a[:6]] + [a[7]]
    bwd = [cast(t) for t in b[:6]] + [b[7]]
    return cast(z), fwd, bwd


@pytest.mark.parametrize("kind", ["loop", "tiled"])
def test_both_directions_as_one_node_match_two_scans_and_their_sums(kind, monkeypatch):
    """bidirectional_scan_triton (BiScanTriton, the mixer's two scans as one node): the second
    direction adds its output, and backward its z gradient, to the first's in the kernel. In
    float32 that is one addition of the same two numbers, so the output and every gradient have
    the bits of two selective_scan_triton calls and autograd's sums."""
    from svp.ops import scan_triton as st
    shape = (1, 40, 37, 8)   # 37 steps: three of the forward's chunks, across which it prefetches the output
    if kind == "tiled":   # (slow in the interpreter: a smaller case)
        _tiled(monkeypatch, "both")
        shape = (1, 20, 9, 8)
    z, fwd, bwd = _two_directions(shape=shape)
    g = torch.randn(*shape[:3], generator=torch.Generator().manual_seed(23))
    res = []
    for joint in (True, False):
        zz = z.detach().clone().requires_grad_()
        f = [t.detach().clone().requires_grad_() for t in fwd]
        b = [t.detach().clone().requires_grad_() for t in bwd]
        if joint:
            out = st.bidirectional_scan_triton(zz, f, b)
        else:
            out = (st.selective_scan_triton(*f[:6], z=zz, delta_bias=f[6], delta_softplus=True)
                   + st.selective_scan_triton(*b[:6], z=zz, delta_bias=b[6], delta_softplus=True, reverse=True))
        out.backward(g)
        res.append([out.detach(), zz.grad] + [t.grad for t in f + b])
    for i, (a, c) in enumerate(zip(*res)):
        assert torch.equal(a, c), i


def test_both_directions_as_one_node_in_bfloat16_round_the_sums_once():
    """With bfloat16 u, delta and z (a GPU's autocast) the node's output and z gradient are the
    sums rounded once; against the two scans (each rounded, then their sum rounded) within
    bfloat16's rounding, and the other gradients the two scans' own."""
    from svp.ops import scan_triton as st
    z, fwd, bwd = _two_directions(torch.bfloat16)
    g = torch.randn(2, 40, 13, generator=torch.Generator().manual_seed(24)).bfloat16()
    res = []
    for joint in (True, False):
        zz = z.detach().clone().requires_grad_()
        f = [t.detach().clone().requires_grad_() for t in fwd]
        b = [t.detach().clone().requires_grad_() for t in bwd]
        out = (st.bidirectional_scan_triton(zz, f, b) if joint else
               st.selective_scan_triton(*f[:6], z=zz, delta_bias=f[6], delta_softplus=True)
               + st.selective_scan_triton(*b[:6], z=zz, delta_bias=b[6], delta_softplus=True, reverse=True))
        out.backward(g)
        res.append([out.detach(), zz.grad] + [t.grad for t in f + b])
    assert res[0][0].dtype == res[0][1].dtype == torch.bfloat16
    for i, (a, c) in enumerate(zip(*res)):
        if i < 2:
            assert (a.float() - c.float()).abs().max() <= 2 ** -7 * c.float().abs().max(), i
        else:
            assert torch.equal(a, c), i
    with pytest.raises(ValueError, match="two directions' u differ"):
        st.bidirectional_scan_triton(z, fwd, [bwd[0].float()] + bwd[1:])


@pytest.mark.parametrize("tiled", [False, True])
def test_a_frozen_A_skips_its_gradient_and_keeps_every_other_bit(tiled, monkeypatch):
    """Where A takes no gradient (a frozen backbone: every method but full fine-tuning) the
    backward kernel neither accumulates nor writes dA (NEED_DA, a constant of the kernel: a
    (channels x d_state) tile fewer in registers); every other gradient keeps its bits."""
    from svp.ops import scan_triton as st
    shape = (1, 20, 9, 8) if tiled else (2, 40, 13, 8)   # (the tiled kernels are slow in the interpreter)
    if tiled:
        _tiled(monkeypatch, "both")
    args = grid.make(*shape, seed=31)
    g = torch.randn(*shape[:3], generator=torch.Generator().manual_seed(32))
    res = []
    for train_A in (True, False):
        xs = [a.detach().clone().requires_grad_(i != 2 or train_A) for i, a in enumerate(args)]
        st.selective_scan_triton(*xs[:7], delta_bias=xs[7], delta_softplus=True, reverse=True).backward(g)
        res.append([x.grad for x in xs])
    assert res[0][2] is not None and res[1][2] is None
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(*res)) if i != 2)


def test_strided_parameter_vectors_a_bad_chunk_and_a_long_chunk():
    """Review of the Triton kernels: every kernel read its (d,) vectors (D, delta_bias, the conv bias,
    the norm weight, the prompt scales) at unit stride, so D[::2] gave errors of 11 and an expanded
    weight read past its storage; chunk=0 was a ZeroDivisionError, 2.5 taken as 2; chunk=65536 at
    L=5 took 256 MiB of backward scratch."""
    from svp.ops.conv import causal_conv1d_bld
    from svp.ops.conv_triton import causal_conv1d_triton
    from svp.ops.norm import rms_norm_ref
    from svp.ops.norm_triton import add_rms_norm_triton
    from svp.ops.prompt_triton import add_silu_prompts_triton
    from svp.ops.scan_triton import selective_scan_triton
    g = torch.Generator().manual_seed(0)
    b, d, L, n = 2, 6, 5, 4
    u, dl, z = (torch.randn(b, d, L, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g) - 0.1
    B, C = (torch.randn(b, n, L, generator=g) for _ in range(2))
    D2, bias2 = torch.randn(2 * d, generator=g), torch.randn(2 * d, generator=g)
    D, bias = D2[::2], bias2[::2]
    want = dispatch.scan_with("reference", u, dl, A, B, C, D.contiguous(), z, bias.contiguous(), delta_softplus=True)
    got = selective_scan_triton(u, dl, A, B, C, D, z, bias, delta_softplus=True)
    assert (got - want).abs().max() < 1e-5
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="chunk must be a positive number of steps"):
            selective_scan_triton(u, dl, A, B, C, D, z, bias, chunk=bad)
    # a chunk longer than the sequence: one chunk either way, scratch for the sequence's steps
    sizes, real_empty = [], torch.empty

    def spy(*s, **kw):
        t = real_empty(*s, **kw)
        sizes.append(t.numel())
        return t
    grads = {}
    for chunk in (8, 2**16):
        xs = [t.clone().requires_grad_() for t in (u, dl, A, B, C)]
        out = selective_scan_triton(*xs, D, z, bias, delta_softplus=True, chunk=chunk)
        sizes.clear()
        torch.empty = spy
        try:
            out.sum().backward()
        finally:
            torch.empty = real_empty
        grads[chunk] = ([x.grad for x in xs], max(sizes))
    assert grads[2**16][1] == grads[8][1]
    assert all(torch.equal(a, c) for a, c in zip(grads[8][0], grads[2**16][0]))
    x = torch.randn(b, L, d, generator=g)
    w = torch.randn(d, 4, generator=g)
    cb2 = torch.randn(2 * d, generator=g)
    assert (causal_conv1d_triton(x, w, cb2[::2], "silu") - causal_conv1d_bld(x, w, cb2[::2].contiguous(), "silu")
            ).abs().max() < 1e-5
    h = torch.randn(b, L, d, generator=g)
    for weight in (torch.randn(2 * d, generator=g)[::2], torch.tensor([1.5]).expand(d)):
        assert (add_rms_norm_triton(h, None, weight, 1e-5) - rms_norm_ref(h, weight.contiguous())).abs().max() < 1e-5
    a1 = torch.randn(b, L, d, generator=g)
    s1 = torch.randn(2 * d, generator=g)[::2]
    want = h + s1.contiguous() * torch.nn.functional.silu(a1)
    want[:, 1] = h[:, 1]
    assert (add_silu_prompts_triton(h, a1, s1, skip=1) - want).abs().max() < 1e-5


def test_time_offsets_past_int32_are_read_from_a_contiguous_copy(monkeypatch):
    """The kernels form ``t * stride`` in 32 bits: a time-major view with L*b*d >= 2**31 read wrong
    steps or crashed (review; 4 GB to show for real): such an input is copied contiguous first.
    The limit lowered here so that a small strided view crosses it."""
    from svp.ops import conv_triton, scan_triton
    from svp.ops.scan_triton import selective_scan_triton
    g = torch.Generator().manual_seed(1)
    b, d, L, n = 1, 4, 6, 3
    u, dl = (torch.randn(L, b, d, generator=g).permute(1, 2, 0) for _ in range(2))   # time-major views
    A = -torch.rand(d, n, generator=g) - 0.1
    B, C = (torch.randn(b, n, L, generator=g) for _ in range(2))
    monkeypatch.setattr(scan_triton, "OFFSET_LIMIT", 4)   # (the conv's copy is made by the same helper)
    from svp.ops.conv_triton import causal_conv1d_triton
    seen = []

    def spy(cls):
        real = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a: (seen.append((cls.__name__, a[0], a[1])), real(*a))[1])
    spy(scan_triton.SelectiveScanTriton)
    spy(conv_triton.CausalConv1dTriton)
    assert scan_triton._time_safe(B) is B   # (time stride 1: as it is)
    want = dispatch.scan_with("reference", u, dl, A, B, C)
    assert (selective_scan_triton(u, dl, A, B, C) - want).abs().max() < 1e-5
    x = torch.randn(L, 2, d, generator=g).transpose(0, 1)   # (2, L, d), time stride 2*d
    w = torch.randn(d, 4, generator=g)
    causal_conv1d_triton(x, w, None)
    # what reached the kernels: the copies, not the time-major views
    assert [(name, t0.is_contiguous(), t1.is_contiguous() if name.startswith("Sel") else True)
            for name, t0, t1 in seen] == [("SelectiveScanTriton", True, True), ("CausalConv1dTriton", True, True)]
    assert not u.is_contiguous() and not x.is_contiguous()
