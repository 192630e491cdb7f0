"""``svp doctor``: what this machine can run, and whether it runs it correctly.

Prints the CPU, Python/torch/CUDA/numba/Triton/mamba_ssm versions and the selective-scan backends
that exist here, runs every available backend against ``selective_scan_ref`` evaluated in
float64 on small shapes (outputs and the gradients of all eight inputs), times each backend
on a Vim-Tiny-sized scan, and exits non-zero if any backend is outside its tolerance.
Without a GPU the ``triton`` backend is checked on CPU tensors through Triton's
interpreter (TRITON_INTERPRET=1, small shapes, not timed). Where the fused CPU kernels run, a
tiny Vim with an SVP adapter is also trained one step on them and in plain PyTorch, outputs and
gradients compared: that checks the conv, add + RMSNorm and prompt kernels too, and compiles
every CPU kernel a run uses, so a run after ``svp doctor`` does not pay numba's first compile.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from typing import Tuple

# relative error, max |x - x64| / max |x64| per tensor
# cpu: the base-2 polynomial exp (0.8 ulp) puts the worst gradient at ~5.1e-7 on this shape
# (dA where delta*|A| is large), just past the 5e-7 the kernel met before; 1e-6 as for triton.
TOLERANCE = {"cpu": 1e-6, "torch": 2e-6, "reference": 2e-6, "triton": 1e-6, "cuda": 5e-4}
# on a GPU, Triton's exp/log are the hardware approximations (a few ulp)
TOLERANCE_CUDA = {"triton": 2e-6}
# the whole tiny model's forward and backward, fused CPU kernels against plain PyTorch (the
# chunked torch scan, PyTorch's conv, norm and prompt modules), float32 both: 6e-7 measured
TOLERANCE_FUSED_MODEL = 1e-5
# the interpreter runs ~1000x slower than a GPU: short sequences (2 backward chunks)
INTERPRETER_CASES = [((1, 20, 21, 4), False, False), ((2, 24, 19, 8), True, True)]


def _wait_policy() -> str:
    """How torch's OpenMP threads wait between parallel regions, and who chose it (svp.runtime)."""
    from svp import runtime
    st = runtime.status()
    if st["applied_before_torch"] is None:
        return "not configured (SVP_NO_RUNTIME_DEFAULTS is set)"
    if not sys.platform.startswith("linux"):   # (review45)
        return (f"{st['omp_wait_policy']}; read by libgomp (Linux's torch) alone: torch here uses "
                f"another OpenMP runtime, which does not read it")
    return str(st["omp_wait_policy"])


def _collector() -> str:
    """What svp.runtime did with Python's cyclic collector around svp's imports (and, in the
    ``svp`` command's own process, after them)."""
    from svp import runtime
    return str(runtime.status()["gc"] or "not configured")


def _malloc() -> str:
    """svp.runtime's malloc thresholds (or who chose them), whether runs hold the heap, and the
    heap's huge pages."""
    from svp import runtime
    held = "; CPU runs hold the heap (svp.runtime.held_heap)" if runtime.holds_heap() else ""
    return f"{runtime.status()['malloc'] or 'not configured'}{held}; {runtime.huge_pages()}"


def _bf16() -> str:
    """Whether ``train.amp`` / ``--amp`` (bfloat16 autocast) pays on this CPU."""
    from svp.compat import cpu_bf16_instructions
    found = cpu_bf16_instructions()
    if found is None:
        return "unknown (svp cannot read this CPU's instruction sets)"
    if found:
        return f"{', '.join(found)}: train.amp / --amp runs the large products in bfloat16, faster than float32"
    return "no avx512_bf16 or amx_bf16: train.amp / --amp would likely be slower than float32 here"


def _products() -> str:
    """What float32 CPU products run on (svp.ops.matmul_cpu: oneDNN where torch's MKL is slow)."""
    from svp.errors import BackendError
    from svp.ops import matmul_cpu
    try:
        return matmul_cpu.status()
    except BackendError as e:   # a bad SVP_CPU_MATMUL: said here, and doctor fails (run)
        return f"FAIL: {e}"


def backend_choice(dev) -> str:
    """The doctor's line for the scan backend calls on ``dev`` get, and who chose it
    (get_backend's order: set_backend, then SVP_SCAN_BACKEND, then its own choice)."""
    from svp.ops import dispatch
    how = ("forced by set_backend" if dispatch._forced is not None else
           "forced by SVP_SCAN_BACKEND" if os.environ.get("SVP_SCAN_BACKEND") else "automatic choice")
    return f"{how} on {dev.type}: {dispatch.get_backend(dev)}"


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the OS reports it (Linux: the first "model name" of
    /proc/cpuinfo; macOS: ``sysctl machdep.cpu.brand_string``; Windows: the registry's
    ProcessorNameString; elsewhere ``platform.processor()``), else the architecture. Speed numbers
    depend on it more than on anything else (docs/benchmarks.md measures three kinds of 2-vCPU
    machine whose float32 matmul rates differ by up to 2.5x), so doctor and the benchmarks print it.
    A VM reports what its hypervisor shows, which may be a generic name. (platform.processor()
    says 'arm' or 'i386' on a Mac, and 'Intel64 Family 6 Model 158 ...' on Windows.)"""
    from svp.compat import cpuinfo_field
    return (cpuinfo_field("model name", cpuinfo) or _os_cpu_name() or platform.processor() or platform.machine()
            or "unknown")


def _os_cpu_name() -> str:
    if sys.platform == "darwin":
        import subprocess
        try:
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                               timeout=5)
        except (OSError, subprocess.SubprocessError):
            return ""
        return r.stdout.strip() if r.returncode == 0 else ""
    if sys.platform == "win32":
        try:
            import winreg
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as k:
                return str(winreg.QueryValueEx(k, "ProcessorNameString")[0]).strip()
        except (ImportError, OSError):
            return ""
    return ""


def _numba_row() -> str:
    """The doctor's numba row: the version, the threads and cache the kernels use, or why there
    are no kernels (numba missing, or installed but svp's kernels cannot load)."""
    try:
        import numba
    except ImportError as e:
        return (f"not installed ({e}): `pip install numba` gives svp's fused CPU kernels; without them the "
                f"CPU runs the pure-PyTorch scan, several times slower")
    except (Exception, SystemExit) as e:   # a broken install (llvmlite's shared library: an OSError)
        return (f"installed, but its import fails ({type(e).__name__}: {e}): reinstall numba and llvmlite; "
                f"without them the CPU runs the pure-PyTorch scan, several times slower")
    try:
        from svp.ops import scan_cpu  # picks the threading layer (tbb where the wheel is installed)
    except Exception as e:
        return f"{numba.__version__} installed, but svp's CPU kernels cannot load ({type(e).__name__}: {e})"
    try:
        try:
            layer = numba.threading_layer()           # threads already started
        except ValueError:
            layer = str(numba.config.THREADING_LAYER)  # what the first parallel call will load
        chosen = "chosen by svp" if scan_cpu.THREADING_LAYER else "set by NUMBA_THREADING_LAYER"
        if scan_cpu.SHARED_OPENMP:   # SVP_CPU_DEDICATED (svp.runtime)
            chosen += f", SVP_CPU_DEDICATED: torch's OpenMP threads, {os.path.basename(scan_cpu.SHARED_OPENMP)}"
        import torch
        used = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)   # scan_cpu.follow_torch_threads
        return (f"{numba.__version__} (kernels on {used} of a pool of {numba.config.NUMBA_NUM_THREADS} threads, as "
                f"many as torch's; {layer} layer, {chosen}; cache {numba.config.CACHE_DIR or 'next to the package'})")
    except Exception as e:
        return f"not importable ({type(e).__name__}: {e})"


def _versions():
    import torch

    from svp._version import __version__
    from svp.compat import module_version
    # (where it is imported from: an editable checkout, or which environment's site-packages)
    rows = [("svp", f"{__version__} ({os.path.dirname(os.path.abspath(__file__))})"),
            ("python", platform.python_version()), ("platform", platform.platform()),
            ("CPU", f"{cpu_name()}, {os.cpu_count()} logical CPUs"),
            ("torch", torch.__version__),
            ("torchvision", module_version("torchvision")),   # (the trio that must match: spec 1.1-1.2)
            ("timm", module_version("timm")),
            ("torch threads", str(torch.get_num_threads())),
            ("libgomp wait", _wait_policy()),
            ("collector", _collector()),
            ("malloc", _malloc()),
            ("CPU bfloat16", _bf16()),
            ("CPU products", _products()),
            ("CUDA", f"{torch.version.cuda} ({torch.cuda.device_count()} device(s): "
                     f"{', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))})"
             if torch.cuda.is_available() else f"not available (torch built with {torch.version.cuda})")]
    rows.append(("numba", _numba_row()))
    rows.append(("triton", module_version("triton")))
    from svp.ops import scan_cuda
    rows.append(("mamba_ssm", scan_cuda.version()))
    return rows


@contextlib.contextmanager
def _triton_interpreter():
    """TRITON_INTERPRET=1 for the duration (the triton backend then runs on CPU tensors)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _inputs(b, d, L, n, device, seed, big=False):
    import torch
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(b, L, 3 + 2 * n)
    args = [r(b, L, d).transpose(1, 2), (r(b, L, d) * 0.5 + (4.0 if big else -1.0)).transpose(1, 2),
            -(torch.rand(d, n, generator=g) * (80.0 if big else 1.0) + 0.05),
            x[:, :, 3:3 + n].transpose(1, 2), x[:, :, 3 + n:].transpose(1, 2), r(d), r(b, L, d).transpose(1, 2),
            r(d) * 0.3]
    return [a.to(device) for a in args]


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| (inf where a has a non-finite value)."""
    import torch
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_backend(name, device, cases=None):
    """Worst relative error of outputs, last state and all gradients over a few cases."""
    import torch
    from svp.ops.dispatch import scan_with
    cases = cases or [((2, 40, 37, 16), False, False), ((2, 40, 37, 16), True, False),
                      ((1, 130, 70, 16), True, True), ((2, 24, 65, 1), False, True)]
    worst, where = 0.0, ""
    for k, (shape, reverse, big) in enumerate(cases):
        args = _inputs(*shape, device=device, seed=k, big=big)
        xs = [a.clone().requires_grad_() for a in args]
        out, h = scan_with(name, *xs[:7], delta_bias=xs[7], delta_softplus=True, return_last_state=True,
                           reverse=reverse)
        refs = [a.detach().cpu().double().requires_grad_() for a in args]
        o64, h64 = scan_with("reference", *refs[:7], delta_bias=refs[7], delta_softplus=True,
                             return_last_state=True, reverse=reverse)
        gen = torch.Generator().manual_seed(99)
        go = torch.randn(o64.shape, generator=gen, dtype=torch.float64)
        gh = torch.randn(h64.shape, generator=gen, dtype=torch.float64)
        loss = (out.double() * go.to(out.device)).sum() + (h.double() * gh.to(h.device)).sum()
        loss64 = (o64 * go).sum() + (h64 * gh).sum()
        g1 = torch.autograd.grad(loss, xs)
        g2 = torch.autograd.grad(loss64, refs)
        pairs = [("out", out, o64), ("last_state", h, h64)] + [
            ("d" + nm, a, b) for nm, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), g1, g2)]
        for nm, a, b in pairs:
            a = a.detach().cpu().double()
            e = _rel_err(a, b)
            if not e <= worst:
                worst, where = e, f"{nm} at {shape}{' reversed' if reverse else ''}{' large delta*|A|' if big else ''}"
    return worst, where


# the Triton kernels around the scan against their PyTorch forms in float64 (float32 arithmetic:
# within 2e-6 under the interpreter in the tests; their exp on a GPU is the hardware's)
TOLERANCE_TRITON_OPS = 1e-5


def check_triton_ops(device, big=False):
    """The Triton kernels around the scan (svp.ops.conv_triton, norm_triton, prompt_triton) on
    ``device`` against their PyTorch forms in float64: [(name, worst relative error of the outputs
    and every gradient, where)], err None and the exception as ``where`` for one that raised.
    ``big``: Vim-S's shapes at batch 4 (benchmarks/gpu_check.py), else small ones."""
    import torch
    out = []
    for name, check in (("conv", _check_conv), ("add+RMSNorm", _check_norm), ("SVP prompts", _check_prompt)):
        try:
            with torch.random.fork_rng(devices=[]):
                err, where = check(device, big)
        except Exception as e:
            err, where = None, f"{type(e).__name__}: {e}"
        out.append((name, err, where))
    return out


def _worst_of(got, want, names):
    errs = [_rel_err(g.detach().cpu().double(), w.detach().cpu()) for g, w in zip(got, want)]
    i = max(range(len(errs)), key=errs.__getitem__)
    return errs[i], names[i]


def _randn(gen, device, *shape):
    import torch
    return torch.randn(*shape, generator=gen).to(device)


def _check_conv(dev, big):
    """The conv + SiLU's output and x, weight and bias gradients, both directions."""
    import torch
    from svp.ops.conv import causal_conv1d_bld
    from svp.ops.conv_triton import causal_conv1d_triton
    b, L, d = (4, 197, 768) if big else (2, 37, 70)
    gen = torch.Generator().manual_seed(0)
    worst = (0.0, "")
    for reverse in (False, True):
        x, w, bias, g = (_randn(gen, dev, *s) for s in ((b, L, d), (d, 4), (d,), (b, L, d)))
        xs = [t.clone().requires_grad_() for t in (x, w, bias)]
        y = causal_conv1d_triton(*xs, "silu", reverse=reverse)
        refs = [t.double().requires_grad_() for t in (x, w, bias)]
        y64 = causal_conv1d_bld(*refs, "silu", reverse=reverse)
        got = (y, *torch.autograd.grad(y, xs, g))
        want = (y64, *torch.autograd.grad(y64, refs, g.double()))
        names = [f"{k}{' reversed' if reverse else ''}" for k in ("out", "dx", "dweight", "dbias")]
        worst = max(worst, _worst_of(got, want, names))
    return worst


def _check_norm(dev, big):
    """The residual add + RMSNorm's two outputs and its gradients, the residual stream's too."""
    import torch
    from svp.ops.norm import rms_norm_ref
    from svp.ops.norm_triton import add_rms_norm_triton
    shape = (4, 197, 384) if big else (2, 37, 48)
    gen = torch.Generator().manual_seed(1)
    h, r, g, gx = (_randn(gen, dev, *shape) for _ in range(4))
    w = 1 + 0.3 * _randn(gen, dev, shape[-1])
    xs = [t.clone().requires_grad_() for t in (h, r, w)]
    y, x = add_rms_norm_triton(xs[0], xs[1], xs[2], 1e-5)
    refs = [t.double().requires_grad_() for t in (h, r, w)]
    x64 = refs[0] + refs[1]
    y64 = rms_norm_ref(x64, refs[2], eps=1e-5)
    got = (y, x, *torch.autograd.grad((y * g).sum() + (x * gx).sum(), xs))
    want = (y64, x64, *torch.autograd.grad((y64 * g.double()).sum() + (x64 * gx.double()).sum(), refs))
    return _worst_of(got, want, ["out", "residual", "dhidden", "dresidual", "dweight"])


def _check_prompt(dev, big):
    """SVP's prompt step, both prompters, the class token in the middle, and its gradients: the
    step's kernels on given pre-activations, and the node with the prompters' products that SVP's
    model path takes (svp_prompts_triton: every weight's, bias's and scale's gradient too)."""
    import torch
    import torch.nn.functional as F
    from svp.ops.prompt_triton import add_silu_prompts_triton, svp_prompts_triton
    b, L, d = (4, 197, 384) if big else (2, 17, 48)
    r = 64 if big else 8
    gen = torch.Generator().manual_seed(2)
    h, a1, a2, g = (_randn(gen, dev, b, L, d) for _ in range(4))
    s1, s2 = (_randn(gen, dev, d) for _ in range(2))
    skip = L // 2
    keep = (torch.arange(L, device=dev) != skip)[None, :, None]

    def step64(h, a1, s1, a2, s2):
        return torch.where(keep, h + s1 * F.silu(a1) + s2 * F.silu(a2), h)
    xs = [t.clone().requires_grad_() for t in (h, a1, s1, a2, s2)]
    y = add_silu_prompts_triton(*xs, skip=skip)
    refs = [t.double().requires_grad_() for t in (h, a1, s1, a2, s2)]
    y64 = step64(*refs)
    got = (y, *torch.autograd.grad(y, xs, g))
    want = (y64, *torch.autograd.grad(y64, refs, g.double()))
    worst = _worst_of(got, want, ["out", "dh", "da1", "ds1", "da2", "ds2"])
    # the node: Wc (d, d), bc; W0 (r, d), b0; W1 (d, r), b1 (weights scaled to keep the
    # pre-activations near 1)
    ws = [_randn(gen, dev, d, d) * d ** -0.5, _randn(gen, dev, d), _randn(gen, dev, r, d) * d ** -0.5,
          _randn(gen, dev, r), _randn(gen, dev, d, r) * r ** -0.5, _randn(gen, dev, d)]
    xs = [t.clone().requires_grad_() for t in (h, *ws, s1, s2)]
    hh, wc, bc, w0, b0, w1, b1, t1, t2 = xs
    y = svp_prompts_triton(hh, skip, (wc, bc, t1), (w0, b0, w1, b1, t2))
    refs = [t.double().requires_grad_() for t in (h, *ws, s1, s2)]
    hh, wc, bc, w0, b0, w1, b1, t1, t2 = refs
    y64 = step64(hh, F.linear(hh, wc, bc), t1, F.linear(F.linear(hh, w0, b0), w1, b1), t2)
    got = (y, *torch.autograd.grad(y, xs, g))
    want = (y64, *torch.autograd.grad(y64, refs, g.double()))
    node = _worst_of(got, want, [f"node {k}" for k in ("out", "dh", "dWc", "dbc", "dW0", "db0", "dW1", "db1",
                                                         "dalpha", "dbeta")])
    return max(worst, node)


def check_fused_cpu_model():
    """Worst relative error (max |x - y| / max |y| per tensor) of a tiny Vim with an SVP adapter,
    its output and every trained parameter's gradient after one backward, with the fused CPU
    kernels (scan, conv + x_proj, add + RMSNorm, prompts) against the same model in plain
    PyTorch (the 'torch' scan backend switches the fused paths off)."""
    import torch
    with torch.random.fork_rng(devices=[]):   # the caller's random state stays as it was
        return _check_fused_cpu_model()


def _tiny_svp_model():
    """A tiny Vim with a nonzero SVP adapter (zero-initialised scales would pass no gradient on),
    and an input batch."""
    import timm
    import torch
    from svp.peft import get_peft_model, make_config
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2,
                              embed_dim=32, num_classes=5)
    pm = get_peft_model(model, make_config("svp", num_classes=5, shared_layers=2, hidden=8)).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return pm, torch.randn(2, 3, 32, 32, generator=g)


def _step(pm, x):
    """One forward and backward: [(name, tensor)] for the output and every parameter's gradient."""
    import torch
    torch.manual_seed(2)   # the same DropPath masks in every run
    out = pm(x)
    out.float().square().sum().backward()
    res = [("output", out.detach())] + [("d" + n, p.grad.clone()) for n, p in pm.named_parameters()
                                        if p.grad is not None]
    pm.zero_grad(set_to_none=True)
    return res


def check_model_step():
    """One training step of the tiny Vim with an SVP adapter on the backend the CPU gets:
    (tensors, finite ones) over its output and every gradient."""
    import torch
    with torch.random.fork_rng(devices=[]):
        res = _step(*_tiny_svp_model())
    return len(res), sum(bool(torch.isfinite(t).all()) for _, t in res)


def _check_fused_cpu_model():
    from svp.ops import dispatch, set_backend
    forced = dispatch._forced   # a backend the caller set, restored after
    pm, x = _tiny_svp_model()
    results = {}
    for backend in ("cpu", "torch"):
        set_backend(backend)
        try:
            results[backend] = _step(pm, x)
        finally:
            set_backend(forced)
    worst, where = 0.0, ""
    for (name, a), (_, b) in zip(results["cpu"], results["torch"]):
        e = _rel_err(a, b)
        if not e <= worst:
            worst, where = e, name
    return worst, where, len(results["cpu"])


def check_fused_cpu_amp():
    """One training step of the tiny Vim + SVP under CPU autocast (train.amp), the fused kernels
    reading in_proj's bfloat16 outputs and writing the mixer's in bfloat16, against the same step
    with float32 casts around them (svp.models.vim.amp_casts): they must give the same bits.
    Returns (names of the tensors that differ, number compared)."""
    import torch
    from svp.models.vim import amp_casts
    from svp.ops import dispatch, set_backend
    forced = dispatch._forced
    with torch.random.fork_rng(devices=[]):
        pm, x = _tiny_svp_model()
        set_backend("cpu")
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                direct = _step(pm, x)
                with amp_casts():
                    cast = _step(pm, x)
        finally:
            set_backend(forced)
    differ = [n for (n, a), (_, b) in zip(direct, cast) if not (a.dtype == b.dtype and torch.equal(a, b))]
    return differ, len(direct)


def time_backend(name, device, b=8, d=384, L=197, n=16, reps=3):
    import torch
    from svp.ops import selective_scan, set_backend
    args = _inputs(b, d, L, n, device=device, seed=0)
    xs = [a.clone().requires_grad_() for a in args]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    set_backend(name)
    try:
        tf, tb = [], []
        for _ in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            out = selective_scan(*xs[:7], delta_bias=xs[7], delta_softplus=True)
            sync()
            t1 = time.perf_counter()
            out.sum().backward()
            sync()
            t2 = time.perf_counter()
            tf.append(t1 - t0)
            tb.append(t2 - t0)
    finally:
        set_backend(None)
    return min(tf[1:]) * 1e3, min(tb[1:]) * 1e3


def run(args) -> int:
    import torch
    from svp.ops import available_backends, dispatch
    print("svp doctor")
    rows = _versions()
    for k, v in rows:
        print(f"  {k:14s} {v}")
    avail = available_backends()
    missing = dispatch.unavailable_backends()
    # no GPU: Triton can still be checked, through its interpreter on CPU tensors (with
    # TRITON_INTERPRET=1 set by the user too: 'triton' is then available, but not on CUDA)
    triton_gpu = "triton" in avail and torch.cuda.is_available()
    interp_triton = not triton_gpu and dispatch._load("triton") is not None
    # (a GPU with TRITON_INTERPRET=1 left set: its kernels run interpreted there too, not timed)
    interp_gpu = triton_gpu and dispatch._interpreting()
    print("selective-scan backends:")
    for nm in dispatch.NAMES:
        if nm == "triton" and interp_triton and nm in avail:
            state = "no CUDA GPU; available on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 is set)"
        elif nm == "triton" and interp_gpu:
            state = "available, but TRITON_INTERPRET=1 is set: its kernels run through Triton's interpreter " \
                    "(for testing, very slow); unset it to run them compiled"
        elif nm in avail:
            state = "available"
        elif nm == "triton" and interp_triton:
            state = "no CUDA GPU; checked on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1)"
        else:
            state = "unavailable: " + missing.get(nm, "?")
        print(f"  {nm:10s} {state}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"  {backend_choice(dev)}")
    print("parity against selective_scan_ref in float64 (outputs, last state, gradients of all 8 inputs; "
          "max|x-x64|/max|x64|):")
    failed = []
    products_bad = dict(rows)["CPU products"].startswith("FAIL")
    if products_bad:
        failed.append("SVP_CPU_MATMUL (the 'CPU products' row above)")

    def verdict(ok: bool, msg: str) -> Tuple[str, str, bool]:
        """(state, message, failed?) of a check: one that a bad SVP_CPU_MATMUL stopped is not
        run, not failed (the kernels were named as failed: review)"""
        if ok:
            return "ok  ", msg, False
        if products_bad and "SVP_CPU_MATMUL" in msg:
            return "not run", "SVP_CPU_MATMUL (the 'CPU products' row above)", False
        return "FAIL", msg, True
    timings = []
    skip_ref_timing = not getattr(args, "time_reference", False)
    runs = [(dev, nm, nm == "triton" and interp_gpu) for dev in devices for nm in avail
            if (dispatch._DEVICES[nm] is None or dev.type in dispatch._DEVICES[nm]) and not (nm == "triton"
                                                                                        and interp_triton)]
    if interp_triton:
        runs.append((torch.device("cpu"), "triton", True))
    for dev, nm, interpreted in runs:
        tol = (TOLERANCE_CUDA if dev.type == "cuda" else {}).get(nm, TOLERANCE[nm])
        try:
            with _triton_interpreter() if interpreted else contextlib.nullcontext():
                err, where = check_backend(nm, dev, INTERPRETER_CASES if interpreted else None)
            ok = err <= tol
            msg = f"worst {err:.2e} ({where}), tolerance {tol:.0e}" + (" [interpreter]" if interpreted else "")
        except Exception as e:  # a backend that crashes is a failure, reported
            ok, msg = False, f"error: {type(e).__name__}: {e}"
        state, msg, bad = verdict(ok, msg)
        print(f"  {dev.type:5s} {nm:10s} {state} {msg}")
        if bad:
            failed.append(f"{nm} on {dev.type}")
        elif ok and not (interpreted or getattr(args, "no_timing", False) or (nm == "reference" and skip_ref_timing)):
            timings.append((dev.type, nm) + time_backend(nm, dev))
    if triton_gpu or interp_triton:
        # the model's other Triton kernels, where the scan runs on 'triton' (a GPU; else under
        # the interpreter, small shapes)
        dev = torch.device("cuda") if triton_gpu else torch.device("cpu")
        print("Triton kernels around the scan (conv + SiLU, add + RMSNorm, SVP prompts) against their PyTorch "
              "forms in float64 (outputs and every gradient):")
        with _triton_interpreter() if interp_triton else contextlib.nullcontext():
            results = check_triton_ops(dev)
        for name, err, where in results:
            ok = err is not None and err <= TOLERANCE_TRITON_OPS
            msg = (f"worst {err:.2e} ({where}), tolerance {TOLERANCE_TRITON_OPS:.0e}" if err is not None
                   else f"error: {where}") + (" [interpreter]" if interp_triton or interp_gpu else "")
            state, msg, bad = verdict(ok, msg)
            print(f"  {dev.type:5s} {name:11s} {state} {msg}")
            if bad:
                failed.append(f"the Triton {name} kernels on {dev.type}")
    if "cpu" not in avail:
        # the model as it runs here, on the backend the CPU gets (the 'torch' scan without numba):
        # a crash in the model's other paths showed nowhere else (it needed Triton, 2026-12-05)
        try:
            n, finite = check_model_step()
            ok = finite == n
            msg = f"{finite} of {n} tensors finite (output and gradients)"
        except Exception as e:
            ok, msg = False, f"error: {type(e).__name__}: {e}"
        print(f"a tiny Vim with an SVP adapter, one training step, {backend_choice(torch.device('cpu'))}:")
        state, msg, bad = verdict(ok, msg)
        print(f"  cpu   {'model':10s} {state} {msg}")
        if bad:
            failed.append("a training step of the model on the CPU")
    if "cpu" in avail:
        try:
            err, where, n = check_fused_cpu_model()
            ok = err <= TOLERANCE_FUSED_MODEL
            msg = f"worst {err:.2e} ({where}; output and {n - 1} gradients), tolerance {TOLERANCE_FUSED_MODEL:.0e}"
        except Exception as e:
            ok, msg = False, f"error: {type(e).__name__}: {e}"
        print("fused CPU kernels (conv + x_proj, add + RMSNorm, SVP prompts, scan) in a tiny Vim with an SVP "
              "adapter, one training step, against plain PyTorch:")
        state, msg, bad = verdict(ok, msg)
        print(f"  cpu   {'model':10s} {state} {msg}")
        if bad:
            failed.append("fused CPU kernels in the model")
        print("the same step under bfloat16 autocast (train.amp, --amp), the kernels reading and writing "
              "bfloat16, against float32 casts around them:")
        if not getattr(args, "amp", False):
            # opt-in: compiling those kernel variants doubles a first doctor run (29 -> 57 s on a 2-vCPU Xeon)
            print(f"  cpu   {'amp':10s} skipped: `svp doctor --amp` checks it (and compiles those kernels, ~30 s)")
        else:
            try:
                differ, n = check_fused_cpu_amp()
                ok = not differ
                msg = (f"the same bits (output and {n - 1} gradients)" if ok
                       else f"{len(differ)} of {n} tensors differ: {', '.join(differ[:3])}")
            except Exception as e:
                ok, msg = False, f"error: {type(e).__name__}: {e}"
            state, msg, bad = verdict(ok, msg)
            print(f"  cpu   {'amp':10s} {state} {msg}")
            if bad:
                failed.append("fused CPU kernels under bfloat16 autocast")
    if timings:
        print("timing, Vim-Tiny scan (batch 8, d_inner 384, L 197, N 16; best of 3, ms):")
        for dev, nm, f, fb in timings:
            print(f"  {dev:5s} {nm:10s} forward {f:8.2f}   forward+backward {fb:8.2f}")
        if skip_ref_timing:
            print("  (reference not timed: it takes seconds; --time-reference to include it)")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print("all available backends agree with the reference" + (
        "; the fused CPU kernels agree with plain PyTorch (and are compiled and cached for later runs)"
        if "cpu" in avail else ""))
    return 0


def register(subparsers):
    p = subparsers.add_parser("doctor", help="versions, available scan backends, and a correctness check of each")
    timing = p.add_mutually_exclusive_group()   # (both: --time-reference was ignored without a word)
    timing.add_argument("--no-timing", action="store_true", help="skip the timings")
    timing.add_argument("--time-reference", action="store_true", help="also time the slow reference backend")
    p.add_argument("--amp", action="store_true",
                   help="also check the fused kernels' bfloat16 paths (train.amp, --amp) against float32 casts, "
                        "compiling them (~30 s once)")
    p.set_defaults(func=run)

