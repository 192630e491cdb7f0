"""``svp doctor``: what this machine can run, and whether it runs it correctly.

Prints Python/torch/CUDA/numba/mamba_ssm versions and the selective-scan backends that
exist here, runs every available backend against a float64 evaluation of the operator
on small shapes (outputs and the gradients of all eight inputs), times each backend on a
Vim-Tiny-sized scan, and exits non-zero if any backend is outside its tolerance.
"""
from __future__ import annotations

import platform
import time

# relative error, max |x - x64| / max |x64| per tensor
TOLERANCE = {"cpu": 5e-7, "torch": 2e-6, "reference": 2e-6, "cuda": 5e-4}


def _versions():
    import torch
    rows = [("python", platform.python_version()), ("platform", platform.platform()),
            ("torch", torch.__version__),
            ("torch threads", str(torch.get_num_threads())),
            ("CUDA", f"{torch.version.cuda} ({torch.cuda.device_count()} device(s): "
                     f"{', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))})"
             if torch.cuda.is_available() else f"not available (torch built with {torch.version.cuda})")]
    try:
        import numba
        rows.append(("numba", f"{numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads, "
                              f"cache {numba.config.CACHE_DIR or 'next to the package'})"))
    except Exception as e:
        rows.append(("numba", f"not importable ({type(e).__name__}: {e})"))
    from svp.ops import scan_cuda
    rows.append(("mamba_ssm", scan_cuda.version() or "not installed"))
    return rows


def _ref64(u, delta, A, B, C, D, z, delta_bias, softplus, reverse):
    import torch
    import torch.nn.functional as F
    b, d, L = u.shape
    delta = delta + delta_bias[:, None]
    if softplus:
        delta = F.softplus(delta)
    Bx, Cx = B.unsqueeze(1), C.unsqueeze(1)
    h = u.new_zeros(b, d, A.shape[1])
    ys = [None] * L
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys[t] = (h * Cx[..., t]).sum(-1)
    return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z), h


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


def check_backend(name, device, cases=None):
    """Worst relative error of outputs, last state and all gradients over a few cases."""
    import torch
    from svp.ops import selective_scan, set_backend
    cases = cases or [((2, 40, 37, 16), False, False), ((2, 40, 37, 16), True, False),
                      ((1, 130, 70, 16), True, True), ((2, 24, 65, 1), False, True)]
    worst, where = 0.0, ""
    for k, (shape, reverse, big) in enumerate(cases):
        args = _inputs(*shape, device=device, seed=k, big=big)
        xs = [a.clone().requires_grad_() for a in args]
        set_backend(name)
        try:
            out, h = selective_scan(*xs[:7], delta_bias=xs[7], delta_softplus=True, return_last_state=True,
                                    reverse=reverse)
        finally:
            set_backend(None)
        refs = [a.detach().cpu().double().requires_grad_() for a in args]
        o64, h64 = _ref64(*refs, True, reverse)
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
            e = float("inf") if not torch.isfinite(a).all() else \
                ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            if not e <= worst:
                worst, where = e, f"{nm} at {shape}{' reversed' if reverse else ''}{' large delta*|A|' if big else ''}"
    return worst, where


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
    for k, v in _versions():
        print(f"  {k:14s} {v}")
    avail = available_backends()
    print("selective-scan backends:")
    for nm in dispatch.NAMES:
        print(f"  {nm:10s} {'available' if nm in avail else 'unavailable: ' + dispatch._errors.get(nm, '?')}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"  automatic choice on {dev.type}: {dispatch.get_backend(dev)}")
    print("parity against a float64 evaluation (outputs, last state, gradients of all 8 inputs; "
          "max|x-x64|/max|x64|):")
    failed = []
    timings = []
    skip_ref_timing = not getattr(args, "time_reference", False)
    for dev in devices:
        for nm in avail:
            if dispatch._DEVICES[nm] is not None and dev.type not in dispatch._DEVICES[nm]:
                continue
            tol = TOLERANCE[nm]
            try:
                err, where = check_backend(nm, dev)
                ok = err <= tol
                msg = f"worst {err:.2e} ({where}), tolerance {tol:.0e}"
            except Exception as e:  # a backend that crashes is a failure, reported
                ok, msg = False, f"error: {type(e).__name__}: {e}"
            print(f"  {dev.type:5s} {nm:10s} {'ok  ' if ok else 'FAIL'} {msg}")
            if not ok:
                failed.append(f"{nm} on {dev.type}")
            if ok and not getattr(args, "no_timing", False) and not (nm == "reference" and skip_ref_timing):
                timings.append((dev.type, nm) + time_backend(nm, dev))
    if timings:
        print("timing, Vim-Tiny scan (batch 8, d_inner 384, L 197, N 16; best of 3, ms):")
        for dev, nm, f, fb in timings:
            print(f"  {dev:5s} {nm:10s} forward {f:8.2f}   forward+backward {fb:8.2f}")
        if skip_ref_timing:
            print("  (reference not timed: it takes seconds; --time-reference to include it)")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print("all available backends agree with the reference")
    return 0


def register(subparsers):
    p = subparsers.add_parser("doctor", help="versions, available scan backends, and a correctness check of each")
    p.add_argument("--no-timing", action="store_true", help="skip the timings")
    p.add_argument("--time-reference", action="store_true", help="also time the slow reference backend")
    p.set_defaults(func=run)

