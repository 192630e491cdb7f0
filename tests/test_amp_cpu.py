"""Mixed precision on the CPU (``train.amp``): bfloat16 autocast for the large products, the Vim
mixer's conv, x_proj, dt_proj, scan and residual stream in float32 on the fused kernels."""
import logging

import pytest
import timm
import torch
import torch.nn.functional as F

from fused_helpers import output_and_grads
from svp.compat import cpu_autocast
from svp.engine import config as C
from svp.compat import cpu_bf16_instructions
from svp.engine.setup import Precision
from svp.models import vim
from svp.ops import conv_cpu, norm_cpu, scan_cpu
from svp.peft import get_peft_model, make_config
from svp.peft.registry import list_methods

SETTINGS = {"svp": dict(shared_layers=2, hidden=8), "visual_prompt": dict(pad=4), "vpt_deep": dict(num_tokens=2),
            "vpt_shallow": dict(num_tokens=2)}
DIM, DEPTH = 32, 4


def _model(method):
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=DEPTH,
                              embed_dim=DIM, num_classes=5)
    pm = get_peft_model(model, make_config(method, num_classes=5, **SETTINGS.get(method, {}))).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # nonzero adapters (zero-initialised ones would get no gradient through them)
        for n, p in pm.named_parameters():
            if p.requires_grad and not n.startswith("base_model.head."):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return pm, torch.randn(2, 3, 32, 32, generator=g)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("method", list_methods())
def test_every_method_under_cpu_autocast_runs_the_large_products_in_bfloat16_and_the_ssm_in_float32(
        method, monkeypatch):
    pm, x = _model(method)
    ref_out, ref_grads = output_and_grads(pm, x, seed=5)

    kernels, linears = [], []
    # (the checked entries the model calls: the public *_cpu functions check, then call these)
    for mod, name in ((scan_cpu, "bidirectional_scan"), (conv_cpu, "bi_conv_proj"), (norm_cpu, "add_rms_norm")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **k):
            ts = [t for t in a if isinstance(t, torch.Tensor)] + [t for s in a if isinstance(s, tuple)
                                                                  for t in s if isinstance(t, torch.Tensor)]
            kernels.append((_name, {t.dtype for t in ts}, cpu_autocast(), [s for s in a if isinstance(s, tuple)]))
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    real_linear = F.linear

    def linear_spy(inp, weight, bias=None):
        out = real_linear(inp, weight, bias)
        linears.append((weight.shape[1], weight.shape[0], out.dtype))
        return out
    monkeypatch.setattr(F, "linear", linear_spy)
    real_in_proj = vim._InProj.products

    def in_proj_spy(h, w, E):   # the mixer's in_proj without a bias: its two halves' products
        x, z = real_in_proj(h, w, E)
        linears.extend([(w.shape[1], E, x.dtype), (w.shape[1], E, z.dtype)])
        return x, z
    monkeypatch.setattr(vim._InProj, "products", staticmethod(in_proj_spy))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return output_and_grads(pm, x, seed=5)
    out, grads = run()
    E = pm.base_model.layers[0].mixer.d_inner
    R = pm.base_model.layers[0].mixer.dt_rank
    # the fused kernels ran, every layer, on float32 inputs, outside autocast, but for in_proj's
    # outputs, which they read in bfloat16 as they are: z the scan (which gives y in bfloat16),
    # x the convs (the bits of the casts: below)
    for name in ("bidirectional_scan", "bi_conv_proj", "add_rms_norm"):
        calls = [k for k in kernels if k[0] == name]
        assert len(calls) >= DEPTH, (name, len(calls))
        want = {torch.float32} if name == "add_rms_norm" else {torch.float32, torch.bfloat16}
        assert all(k[1] == want for k in calls), (name, calls)
    assert not any(on for name, _, on, _ in kernels if name != "add_rms_norm")
    # in_proj's two halves (D -> E) in bfloat16, dt_proj (R -> E) in float32: a product, or the
    # scan's own, from its float32 weight (its dt_w: the float32 sets above)
    in_proj = [d for i, o, d in linears if (i, o) == (DIM, E)]
    dt_proj = [d for i, o, d in linears if (i, o) == (R, E)]
    in_scan = [side[7] is not None for name, *_, sides in kernels if name == "bidirectional_scan" for side in sides]
    assert len(in_proj) >= 2 * DEPTH and set(in_proj) == {torch.bfloat16}   # (+ adapters of that shape)
    assert len(dt_proj) + sum(in_scan) == 2 * DEPTH and set(dt_proj) <= {torch.float32}
    # a bfloat16 step, close to the float32 one (not equal: autocast did something)
    assert out.dtype == torch.bfloat16   # the head's product
    assert 0 < _rel(out, ref_out) < 3e-2
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert grads[n].dtype == torch.float32, n
        assert _rel(grads[n], ref_grads[n]) < 0.15, n
    # the same bits as casting x and z to float32 (and y back to bfloat16) around float32 kernels
    kernels.clear()
    with vim.amp_casts():
        cast_out, cast_grads = run()
    assert all(k[1] == {torch.float32} for k in kernels if k[0] != "add_rms_norm")
    assert torch.equal(out, cast_out) and cast_grads.keys() == grads.keys()
    for n in grads:
        assert torch.equal(grads[n], cast_grads[n]), n


def test_autocast_on_the_plain_pytorch_path_keeps_the_mixer_in_float32(monkeypatch):
    """With the scan forced onto another backend (no fused kernels) the mixer's inside is
    float32 too: the same step as the fused path up to float32 rounding."""
    import svp.models.vim as vim
    from svp.ops import set_backend
    pm, x = _model("svp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = output_and_grads(pm, x, seed=5)
        seen, real = [], vim.selective_scan
        monkeypatch.setattr(vim, "selective_scan", lambda *a, **k: seen.append(
            {t.dtype for t in list(a) + list(k.values()) if isinstance(t, torch.Tensor)}) or real(*a, **k))
        set_backend("torch")
        try:
            plain = output_and_grads(pm, x, seed=5)
        finally:
            set_backend(None)
    assert len(seen) == 2 * DEPTH and all(s == {torch.float32} for s in seen)
    assert _rel(plain[0], fused[0]) < 1e-2
    for n in fused[1]:
        assert _rel(plain[1][n], fused[1][n]) < 5e-2, n


def _cfg(**train):
    cfg = C.defaults()
    cfg["train"].update(train)
    return cfg


def test_precision_on_the_cpu_is_bfloat16_autocast_without_a_scaler(caplog):
    a = torch.ones(4, 4)
    off = Precision(_cfg(amp=False), torch.device("cpu"))
    with off.autocast():
        assert (a @ a).dtype == torch.float32 and not cpu_autocast()
    on = Precision(_cfg(amp=True), torch.device("cpu"))
    assert not on.scaler.is_enabled()
    with on.autocast():
        assert (a @ a).dtype == torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="svp.engine"):
        f16 = Precision(_cfg(amp=True, amp_dtype="float16"), torch.device("cpu"))
    assert f16.dtype == torch.bfloat16 and not f16.scaler.is_enabled()
    assert any("float16 is for CUDA" in r.getMessage() for r in caplog.records)
    # train.amp_cpu=false: float32, and the log says so (it read as a run without train.amp);
    # `svp eval/predict --amp` are named as what the user gave, not "train.amp"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="svp.engine"):
        kept32 = Precision(_cfg(amp=True, amp_cpu=False), torch.device("cpu"))
        flag = Precision(_cfg(amp=True), torch.device("cpu"), option="--amp")
    with kept32.autocast():
        assert (a @ a).dtype == torch.float32
    assert flag.enabled and not kept32.enabled
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("train.amp: off on the CPU (train.amp_cpu=false)") for m in said), said
    assert any(m.startswith("--amp: ") for m in said) and sum(m.startswith("train.amp: ") for m in said) == 1, said


def test_cpu_bf16_instructions_agree_with_the_cpu_flags(monkeypatch):
    import platform
    with monkeypatch.context() as m:   # off x86 svp does not guess
        m.setattr(platform, "machine", lambda: "arm64")
        assert cpu_bf16_instructions() is None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags below are x86 ones")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags line on this machine")
    assert cpu_bf16_instructions() == [n for n in ("avx512_bf16", "amx_bf16") if n in flags]


def test_a_frozen_backbones_weights_are_cast_once_under_autocast_and_again_when_they_change(monkeypatch):
    """Autocast keeps its casts only of leaf weights that require grad, so a frozen backbone's
    in_proj and out_proj weights were cast on every call; the mixer keeps the cast instead
    (svp.ops.kept_unless_trained). Kept per weight value: an in-place change is seen."""
    import copy
    pm, x = _model("svp")
    pm.eval()
    mixer = pm.base_model.layers[1].mixer
    seen = []
    real_linear = F.linear
    shapes = {(2 * mixer.d_inner, DIM): "in_proj", (mixer.d_inner, DIM): "in_proj half",
              (DIM, mixer.d_inner): "out_proj"}

    def linear_spy(inp, weight, bias=None):
        if inp.shape[-1] == weight.shape[1] and tuple(weight.shape) in shapes:
            seen.append((shapes[tuple(weight.shape)], weight.dtype, weight.untyped_storage().data_ptr()))
        return real_linear(inp, weight, bias)
    monkeypatch.setattr(F, "linear", linear_spy)
    real_in_proj = vim._InProj.products

    def in_proj_spy(h, w, E):   # the mixer's in_proj without a bias: its two halves' products
        seen.extend([("in_proj half", w.dtype, w.untyped_storage().data_ptr())] * 2)
        return real_in_proj(h, w, E)
    monkeypatch.setattr(vim._InProj, "products", staticmethod(in_proj_spy))

    def run(model):
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x), list(seen)
    first, calls1 = run(pm)
    again, calls2 = run(pm)
    # in_proj's two halves and out_proj, every layer, get bfloat16 weights, the same ones twice
    assert len(calls1) == 3 * DEPTH and {(n, d) for n, d, _ in calls1} == {
        ("in_proj half", torch.bfloat16), ("out_proj", torch.bfloat16)}, calls1
    assert calls2 == calls1 and torch.equal(again, first)
    with torch.no_grad():
        mixer.in_proj.weight.mul_(1.5)
        mixer.out_proj.weight.mul_(0.5)
    changed, _ = run(pm)
    assert not torch.equal(changed, first)
    # a copy keeps nothing it could use (new storage): it casts the changed weights afresh
    fresh, _ = run(copy.deepcopy(pm))
    assert torch.equal(changed, fresh)
    # trained weights (full fine-tuning) are cast per call, so the cast takes their gradient
    full, xf = _model("full")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full(xf).float().sum().backward()
    w = full.base_model.layers[0].mixer.in_proj.weight
    assert w.grad is not None and w.grad.abs().sum() > 0 and not getattr(w, "_svp_kept", None)
