"""GPU check of the selective-scan backends and of Vim-S SVP training (issue 11, parts a-c).

    benchmarks/gpu_check.sh OUTDIR              # one CUDA GPU, under 8 minutes
    benchmarks/gpu_check.sh OUTDIR --dry-run    # CPU only: Triton's interpreter, tiny shapes

Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md (rewritten after every part, so a run
cut short still leaves what it measured). Needs only torch (with its Triton), timm and this
source tree (PYTHONPATH=src); mamba_ssm is used when it imports, never required.

(a) correctness: every CUDA backend (``triton``; ``cuda`` if mamba_ssm imports) against
    ``selective_scan_ref`` in float64 (``svp doctor``'s cases: both directions, delta*|A|
    large enough that exp underflows, N=1): worst relative error of the output, the last
    state and the gradients of all eight inputs, beside the backend's tolerance; with
    ``triton``, also the conv's, the add + RMSNorm's and SVP's prompt step's Triton kernels
    against their PyTorch forms in float64 (outputs and every gradient, at Vim-S's shapes).
(b) scan speed: one direction of one Vim mixer (L=197, N=16, d_inner 384 = Vim-T and
    768 = Vim-S), batch 64 and 128, float32 and bfloat16 inputs, forward and
    forward+backward, for ``triton``, ``torch`` and ``cuda``; beside each time the
    HBM-bandwidth bound = bytes the scan must move / bandwidth of a large device-to-device
    copy measured in this run. Bytes (element size e of the inputs): forward reads u,
    delta, z, B, C and writes y: e(4 bld + 2 bln); the backward also reads u, delta, z, B,
    C, dy and writes du, ddelta, dz, dB, dC: e(7 bld + 4 bln) more.
(c) whole model: Vim-S (random weights: no download) with SVP, batch 128 at 224 px,
    bfloat16 autocast: training (forward, backward, AdamW step) and inference images/s,
    peak memory, per backend.

--dry-run swaps in CPU tensors, TRITON_INTERPRET=1 and tiny shapes (d 16/32, L 9, batch
1/2; the bundled mini Vim cut to 2 blocks on 12 px images) to test this script's logic on a
machine without a GPU; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402

from scan import make_inputs  # noqa: E402  (benchmarks/scan.py: the model's input layout)
from svp import doctor  # noqa: E402
from svp.ops import dispatch  # noqa: E402

MODELS = {"Vim-T": 384, "Vim-S": 768}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(dev, mib):
    """Bytes read + written per second by a large tensor copy on ``dev`` (best of 5)."""
    x = torch.ones(mib * 2**20 // 4, device=dev)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(5):
        sync(dev)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def scan_bytes(b, d, L, n, elem):
    fwd = elem * (4 * b * L * d + 2 * b * L * n)
    return fwd, fwd + elem * (7 * b * L * d + 4 * b * L * n)


def time_scan(name, args, dev, reps):
    """Best forward and forward+backward wall time in ms (synchronised)."""
    xs = [a.detach().clone().requires_grad_() for a in args]
    tf = tfb = float("inf")
    for i in range(reps + 1):                     # the first run compiles / warms up
        sync(dev)
        t0 = time.perf_counter()
        out = dispatch.scan_with(name, *xs[:7], delta_bias=xs[7], delta_softplus=True)
        sync(dev)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        sync(dev)
        t2 = time.perf_counter()
        for x in xs:
            x.grad = None
        if i:
            tf, tfb = min(tf, t1 - t0), min(tfb, t2 - t0)
    return tf * 1e3, tfb * 1e3


def part_a(dev, backends, dry):
    rows = []
    for name in backends:
        if name == "torch":
            continue
        tol = (doctor.TOLERANCE_CUDA if dev.type == "cuda" else {}).get(name, doctor.TOLERANCE[name])
        try:
            err, where = doctor.check_backend(name, dev, doctor.INTERPRETER_CASES if dry else None)
            rows.append(dict(backend=name, worst=err, where=where, tolerance=tol, ok=bool(err <= tol)))
        except Exception as e:  # reported, not fatal: the other parts still run
            rows.append(dict(backend=name, worst=None, where=f"{type(e).__name__}: {e}", tolerance=tol, ok=False))
    if "triton" in backends:   # the Triton kernels around the scan, at Vim-S's shapes (svp doctor's check)
        tol = doctor.TOLERANCE_TRITON_OPS
        for name, err, where in doctor.check_triton_ops(dev, big=not dry):
            rows.append(dict(backend=f"triton {name}", worst=err, where=where, tolerance=tol,
                             ok=bool(err is not None and err <= tol)))
    return rows


def part_b(dev, backends, bw, dry, deadline):
    rows = []
    shapes = {"tiny-16": 16, "tiny-32": 32} if dry else MODELS
    L, n = (9, 4) if dry else (197, 16)    # keep in step with scan_L / scan_N in main
    for model, d in shapes.items():
        for b in ((1, 2) if dry else (64, 128)):
            base = make_inputs(b, d, L=L, n=n)
            for dtype in (torch.float32, torch.bfloat16):
                args = [a.to(dev) for a in base]
                for i in (0, 1, 3, 4, 6):            # u, delta, B, C, z in the input dtype
                    args[i] = args[i].to(dtype)
                bf, bfb = scan_bytes(b, d, L, n, torch.finfo(dtype).bits // 8)
                for name in backends:
                    row = dict(shape=model, d_inner=d, batch=b, dtype=str(dtype).replace("torch.", ""),
                               backend=name, bound_fwd_ms=bf / bw * 1e3, bound_fwdbwd_ms=bfb / bw * 1e3)
                    if time.monotonic() > deadline:
                        row["skipped"] = "time budget"
                    else:
                        try:
                            reps = 1 if dry else (2 if name == "torch" else 10)
                            row["fwd_ms"], row["fwdbwd_ms"] = time_scan(name, args, dev, reps)
                            row["fwd_x_bound"] = row["fwd_ms"] / row["bound_fwd_ms"]
                            row["fwdbwd_x_bound"] = row["fwdbwd_ms"] / row["bound_fwdbwd_ms"]
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {e}"
                    rows.append(row)
    return rows


class _EagerGraph:
    """--dry-run's stand-in for torch.cuda.CUDAGraph (a CPU has none): "capture" runs the
    callable once, as a capture records it, and each replay runs it again. It checks the
    script's logic around the graph (static inputs, the optimizer inside the step), not capture."""

    def capture(self, fn):
        self.fn = fn
        return fn()

    def replay(self):
        self.fn()


def captured(fn, dev, warm):
    """``fn`` (no arguments; it reads static tensors) run ``warm`` times on a side stream, then
    captured in one CUDA graph (torch's whole-network capture). Returns the graph (``replay()``
    runs ``fn``'s kernels again, with no Python and no launches from the host) and what the
    captured call returned: tensors the replays overwrite in place."""
    if dev.type != "cuda":
        for _ in range(warm - 1):     # as many steps before the replays as on a GPU (a capture runs nothing)
            fn()
        g = _EagerGraph()
        return g, g.capture(fn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):     # Triton's compiles, autotuning, the kept casts: before capture
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def timed_calls(fn, dev, warm, n, graph):
    """Seconds ``n`` calls of ``fn`` take after ``warm`` untimed ones (compiles, warm-up); with
    ``graph`` the calls are replays of ``fn`` captured whole in one CUDA graph (captured)."""
    if graph:
        g, _ = captured(fn, dev, warm)
        call = g.replay
    else:
        for _ in range(warm):
            fn()
        call = fn
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    sync(dev)
    return time.perf_counter() - t0


def part_c(dev, backends, dry, deadline, steps=10, warmup=3, graph_rows=None):
    import timm
    import svp.models  # noqa: F401  (registers the Vim models)
    from svp.peft import get_peft_model, make_config
    from svp.engine.optim import fused_available
    rows = []
    if dry:
        arch, kw, svp_kw, batch, px, steps = "vim_mini_patch4_32", dict(depth=2), dict(shared_layers=2, hidden=8), 2, 12, 1
    else:
        arch, kw, svp_kw, batch, px = "vim_small_patch16_224", {}, {}, 128, 224
    x = torch.randn(batch, 3, px, px, device=dev)
    y = torch.randint(0, 100, (batch,), device=dev)
    # and the Triton backend's A/B rows: the joint nodes off (models/vim.py's GPU_JOINT_NODES:
    # the mixer's nodes per direction, autograd adding the two directions' outputs and gradients,
    # in_proj's halves cast by autocast, as before 2026-12-04's evening; SVP's prompters as
    # modules beside the prompt step's node, as before 2026-12-04's night), the conv's fused backward
    # (conv_triton.BACKWARD), and the mixer's conv, the blocks' add + RMSNorm and SVP's prompt
    # step in their PyTorch forms instead of conv_triton's, norm_triton's and prompt_triton's
    # kernels (their ENABLED flags). The tiled scan kernels, 2.5x slower here in the second run,
    # are left to benchmarks/triton_sweep.py, and the first run's scan geometry (0.76-0.84x the
    # default's img/s in four calls of the second run) to its sweep.
    # With graph_rows (--graph BACKEND) only two rows: the backend's step, and the same step replayed
    # whole (forward, backward, AdamW) from one CUDA graph. The second run found the GPU idle
    # 19-27% of a step while the host launched its ~1,900 kernels; a replay launches none from
    # Python. Its "param sum" (the trainable parameters' sum after as many steps) should match
    # the default row's up to the capturable AdamW's rounding: a capture that recorded less than
    # the step would show there. In a process of its own (gpu_session.sh): a failed capture can
    # leave the CUDA context unusable for what follows.
    runs = [(name, name) for name in backends]
    if "triton" in backends:   # (imports triton: not where it is missing, as with CUDA on Windows)
        from svp.models import vim
        from svp.ops import conv_triton, norm_triton, prompt_triton
        # (and the default once more, last: the drift between the first row and the last)
        runs += [("triton", "triton (joint nodes off)"), ("triton", "triton (fused conv backward)"),
                 ("triton", "triton (PyTorch conv, norm, prompts)"), ("triton", "triton (again, last)")]
    if graph_rows:
        runs = [(graph_rows, graph_rows), (graph_rows, f"{graph_rows} (whole step in a CUDA graph)")]
    for name, label in runs:
        row = dict(model=arch, method="svp", batch=batch, image=px, autocast="bfloat16", backend=label)
        if name == "triton" and not graph_rows:
            vim.GPU_JOINT_NODES = "joint nodes off" not in label
            conv_triton.BACKWARD = "fused" if "fused" in label else "split"
            conv_triton.ENABLED = norm_triton.ENABLED = prompt_triton.ENABLED = "PyTorch" not in label
        model = opt = None
        if time.monotonic() > deadline:
            row["skipped"] = "time budget"
            rows.append(row)
            continue
        graph = "CUDA graph" in label
        try:
            torch.manual_seed(0)
            base = timm.create_model(arch, pretrained=False, num_classes=100, **kw)
            model = get_peft_model(base, make_config("svp", num_classes=100, **svp_kw)).to(dev)
            # fused where torch has it, as `svp train` steps (svp.engine.optim, train.opt_fused=auto);
            # in a graph capturable (its step count on the device, its learning rate read there)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                    fused=fused_available(dev.type) or None,
                                    **(dict(capturable=True) if graph and dev.type == "cuda" else {}))
            trained = [p for p in model.parameters() if p.requires_grad]
            row["param_sum_start"] = sum(p.detach().double().sum().item() for p in trained)
            dispatch.set_backend(name)
            n_steps = 1 if dry else max(1, steps // 5) if name == "torch" else steps
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model.train()
            warm = 1 if (dry or name == "torch") else warmup
            # autocast's cache of cast weights stays on in the graph: the autocast region opens and
            # closes inside the capture, so the cache lives only there (torch's advice to turn it off
            # is for make_graphed_callables, where autocast is entered outside the graphed part). Off,
            # a shared Cross prompter's weight gradient would come out in other bits: its uses' bfloat16
            # gradients are then cast and summed in float32, where the one cached cast sums them in
            # bfloat16 first.
            amp = dict(device_type=dev.type, dtype=torch.bfloat16)

            def train_step():
                # the gradients set to None first: in a graph they are then allocated inside the
                # capture, so each replay writes them afresh instead of adding to them
                opt.zero_grad(set_to_none=True)
                with torch.autocast(**amp):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                return loss

            row["train_img_s"] = batch * n_steps / timed_calls(train_step, dev, warm, n_steps, graph)
            if dev.type == "cuda":
                row["train_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            row["timed_steps"] = n_steps
            row["param_sum"] = sum(p.detach().double().sum().item() for p in trained)
        except Exception as e:
            row["error"] = f"training: {type(e).__name__}: {e}"
        try:       # inference apart: its own code paths (grad mode off), its own failures
            if "error" not in row:
                model.eval()

                def forward():
                    with torch.no_grad(), torch.autocast(**amp):
                        return model(x)

                row["infer_img_s"] = batch * n_steps / timed_calls(forward, dev, warm, n_steps, graph)
                if dev.type == "cuda":
                    row["infer_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as e:
            row["error"] = f"inference: {type(e).__name__}: {e}"
        finally:
            dispatch.set_backend(None)
            if name == "triton" and not graph_rows:
                vim.GPU_JOINT_NODES, conv_triton.BACKWARD = True, "split"
                conv_triton.ENABLED = norm_triton.ENABLED = prompt_triton.ENABLED = True
        rows.append(row)
        model = opt = None   # (freed before the next row builds its own)
    return rows


def part_d(dev, dry):
    """``svp train`` end to end (the CLI, its data loaders and engine) on the device: Vim-S from
    random weights on the embedded digits upsampled to 224 px, batch 128, bfloat16 autocast,
    two epochs. On CUDA, torch's sync debug mode counts the host synchronisations and where in
    svp they happen (the innermost svp frame), to compare with the number of steps."""
    import traceback
    import warnings

    import yaml
    from svp.cli import main as svp_main
    import tempfile
    scratch = tempfile.mkdtemp(prefix="svp-gpu-check-")     # run folder: only its numbers are kept
    runs = os.path.join(scratch, "runs")
    if dry:
        cfg = {"model": {"name": "vim_tiny_patch16_224", "random_init": True,
                         "kwargs": {"img_size": 32, "patch_size": 4, "stride": 4, "depth": 2, "embed_dim": 32}},
               "data": {"dataset": "digits", "img_size": 32, "max_train_samples": 16, "max_eval_samples": 8},
               "train": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "device": "cpu"}}
    else:
        cfg = {"model": {"name": "vim_small_patch16_224", "random_init": True},
               "data": {"dataset": "digits", "img_size": 224, "num_workers": 8, "max_eval_samples": 256},
               "train": {"epochs": 2, "batch_size": 128, "eval_batch_size": 256, "device": "cuda"}}
    cfg["train"].update(amp=True, warmup_epochs=0, lr_scale=False)
    cfg["run"] = {"output": runs, "progress": "lines", "log_every": 5}
    path = os.path.join(scratch, "train_check.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    syncs: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if f"{os.sep}svp{os.sep}" in f.filename]
        where = f"{os.path.relpath(frames[-1].filename, HERE + '/../src')}:{frames[-1].lineno} ({frames[-1].name})" \
            if frames else f"{filename}:{lineno}"
        syncs[where] = syncs.get(where, 0) + 1

    row = dict(config=cfg)
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            row["rc"] = svp_main(["train", "-c", path, "--name", "gpu"])
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    row["wall_s"] = time.monotonic() - t0
    row["syncs"] = dict(sorted(syncs.items(), key=lambda kv: -kv[1]))
    row["scan_backend"] = dispatch.get_backend(dev)
    try:
        folder = os.path.join(runs, "gpu")
        with open(os.path.join(folder, "results.json")) as f:
            res = json.load(f)
        row.update({k: res.get(k) for k in ("steps", "images_per_s", "train_seconds", "device", "optimizer")})
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            row["history"] = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(folder, "train.log")) as f:
            row["log"] = f.read().splitlines()[-24:]
    except (OSError, ValueError) as e:
        row.setdefault("error", f"no run results: {e}")
    return row


def _fmt(v, spec=".2f"):
    return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def _note(lines, row, keys, blanks):
    """A table row saying why ``row`` has no numbers (skipped / error); False if it has them."""
    note = row.get("skipped") or row.get("error")
    if note:
        lines.append("| " + " | ".join(map(str, keys)) + f" | {note} |" + " |" * blanks)
    return bool(note)


def markdown(res):
    env = res["env"]
    lines = [f"# gpu_check ({'DRY RUN: CPU interpreter, numbers meaningless' if res['dry_run'] else env['device']})",
             "", f"torch {env['torch']}, Triton {env['triton']}, mamba_ssm {env['mamba_ssm']}, "
             f"copy bandwidth {env['copy_GBps']:.1f} GB/s, wall {res.get('wall_s', 0):.0f} s", "",
             "## (a) correctness against selective_scan_ref in float64", "",
             "| backend | worst rel. error | where | tolerance | ok |", "|---|---|---|---|---|"]
    for r in res.get("a", []):
        lines.append(f"| {r['backend']} | {_fmt(r['worst'], '.2e')} | {r['where']} | {r['tolerance']:.0e} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", f"## (b) scan, L={res['scan_L']}, N={res['scan_N']} (ms; bound = bytes / copy bandwidth)", "",
              "| shape | batch | dtype | backend | fwd | fwd bound | fwd / bound | fwd+bwd | fwd+bwd bound | "
              "fwd+bwd / bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("b", []):
        if _note(lines, r, (r['shape'], r['batch'], r['dtype'], r['backend']), 5):
            continue
        lines.append(f"| {r['shape']} | {r['batch']} | {r['dtype']} | {r['backend']} | {_fmt(r['fwd_ms'], '.3f')} | "
                     f"{_fmt(r['bound_fwd_ms'], '.3f')} | {_fmt(r['fwd_x_bound'])}x | {_fmt(r['fwdbwd_ms'], '.3f')} | "
                     f"{_fmt(r['bound_fwdbwd_ms'], '.3f')} | {_fmt(r['fwdbwd_x_bound'])}x |")
    lines += ["", "## (c) whole model, SVP, bfloat16 autocast", "",
              "| model | batch | backend | train img/s | train peak GiB | infer img/s | infer peak GiB | steps | "
              "param sum |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("c", []):
        if "train_img_s" not in r and _note(lines, r, (r['model'], r['batch'], r['backend']), 5):
            continue
        infer = _fmt(r.get('infer_img_s'), '.1f') if "infer_img_s" in r else r.get("error", "-")
        lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {_fmt(r['train_img_s'], '.1f')} | "
                     f"{_fmt(r.get('train_peak_GiB'))} | {infer} | "
                     f"{_fmt(r.get('infer_peak_GiB'))} | {r.get('timed_steps', '-')} | "
                     f"{_fmt(r.get('param_sum'), '.9g')} |")
    d = res.get("d")
    if d:
        lines += ["", "## (d) svp train end to end (Vim-S random init, digits at 224 px, batch 128, "
                  "bfloat16 autocast)", ""]
        if d.get("error"):
            lines.append(f"error: {d['error']}")
        lines.append(f"exit code {d.get('rc')}, scan backend {d.get('scan_backend')}, {d.get('steps')} steps, "
                     f"wall {d.get('wall_s', 0):.0f} s")
        lines += ["", "| epoch | steps | train img/s | train s | eval s | loss |", "|---|---|---|---|---|---|"]
        for h in d.get("history") or []:
            lines.append(f"| {h['epoch']} | {h['step']} | {h['images_per_s']:.1f} | {h['train_seconds']:.2f} | "
                         f"{h.get('eval_seconds', 0):.2f} | {h['train_loss']:.4f} |")
        lines += ["", "host synchronisations (torch's sync debug mode), by innermost svp frame:", ""]
        lines += [f"- {n} x {where}" for where, n in (d.get("syncs") or {}).items()] or ["- none"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter + tiny shapes (logic check)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining measurements after this many seconds (default 420)")
    ap.add_argument("--steps", type=int, default=10,
                    help="part (c): timed training and inference steps after the warm-up (the torch backend: a "
                         "fifth of them, at least 1); five steps varied by ~10%% between identical rows")
    ap.add_argument("--warmup", type=int, default=3,
                    help="part (c): untimed steps before the timed ones (the torch backend: 1); with one, the "
                         "first row of a process ran ~10%% slow on an H200")
    ap.add_argument("--parts", default="abcd", help="which parts to run (default abcd)")
    ap.add_argument("--graph", nargs="?", const="triton", default=None, metavar="BACKEND",
                    help="part (c): only two rows, BACKEND's step (default triton) and the same step captured whole "
                         "in a CUDA graph (run in a process of its own: a failed capture can leave the CUDA context "
                         "unusable)")
    a = ap.parse_args(argv)
    if not a.parts or set(a.parts) - set("abcd"):   # --parts x ran nothing and returned 0
        ap.error(f"--parts {a.parts!r}: expected letters from abcd")
    t_start = time.monotonic()
    deadline = t_start + a.budget_s
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda")
    from svp.ops import scan_cuda
    backends = [n for n in ("triton", "torch", "cuda") if n in dispatch.available_backends()]
    env = dict(device=torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, triton=_triton_version(), mamba_ssm=scan_cuda.version() or "not installed",
               python=platform.python_version(), backends=backends)
    env["copy_GBps"] = copy_bandwidth(dev, 16 if a.dry_run else 2048) / 1e9
    res = dict(dry_run=a.dry_run, env=env, scan_L=9 if a.dry_run else 197, scan_N=4 if a.dry_run else 16)
    os.makedirs(a.outdir, exist_ok=True)

    def save():
        res["wall_s"] = time.monotonic() - t_start
        from svp.io import atomic_write_text
        atomic_write_text(os.path.join(a.outdir, "gpu_check.json"), json.dumps(res, indent=1) + "\n")
        atomic_write_text(os.path.join(a.outdir, "gpu_check.md"), markdown(res))

    for part, fn in (("a", lambda: part_a(dev, backends, a.dry_run)),
                     ("b", lambda: part_b(dev, backends, env["copy_GBps"] * 1e9, a.dry_run, deadline)),
                     ("c", lambda: part_c(dev, backends, a.dry_run, deadline, a.steps, a.warmup, a.graph)),
                     ("d", lambda: part_d(dev, a.dry_run))):
        if part not in a.parts:
            continue
        t0 = time.monotonic()
        res[part] = fn()
        print(f"gpu_check: part ({part}) done in {time.monotonic() - t0:.0f} s", flush=True)
        save()
    print(markdown(res))
    ok = all(r["ok"] for r in res.get("a", []))
    return 0 if ok else 1


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
