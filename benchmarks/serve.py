"""Load test of `svp serve` (localhost only, bounded): the bundled mini Vim with 8 adapters of
mixed methods, N concurrent clients, a fixed number of requests, in three batching modes:

  mixed        any mix of adapters in one batch (the default)
  per_adapter  each collected batch split into one pass per adapter (8 separate models' batching)
  batch1       --max-batch 1: every request alone

Reports throughput, p50/p99 latency, errors, mean batch size (from /metrics) and the server's
peak memory (VmHWM), then memory probes in fresh processes: one backbone, one backbone + 8 SVP
adapters, one backbone + the 8 mixed adapters, and the 8 mixed adapters as 8 separate models.
The ratios are the targets (measured in the same run); the machine's load is printed beside them.

    python benchmarks/serve.py [--requests 480] [--clients 16] [--threads 1]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # serve_helpers: adapters with perturbed parameters

import serve_helpers as H  # noqa: E402

MIXED8 = ["svp", "svp_official", "linear2", "vpt_deep", "visual_prompt", "bitfit", "lora", "adapter"]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def vmhwm_mb(pid="self", key="VmHWM") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_cpu(pid) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _request(conn, image, adapter):
    body, ctype = H.multipart({"adapter": adapter, "topk": 3}, {"image": ("x.png", image)})
    conn.request("POST", "/v1/predict", body, {"Content-Type": ctype})
    r = conn.getresponse()
    r.read()
    return r.status


def _metric(port, name):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def run_mode(mode, adapters_dir, requests, clients, threads, images, max_batch=16):
    port = _free_port()
    flags = {"mixed": ["--max-batch", str(max_batch)],
             "per_adapter": ["--batching", "per_adapter", "--max-batch", str(max_batch)],
             "batch1": ["--max-batch", "1"]}[mode]
    proc = subprocess.Popen([sys.executable, "-m", "svp", "serve", "--adapters", adapters_dir, "--port", str(port),
                             "--threads", str(threads)] + flags,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(threads))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read()}")
            time.sleep(0.2)
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=300)  # first batches load the numba kernels
        for i in range(16):
            _request(warm, images[i % len(images)], MIXED8[i % len(MIXED8)])
        warm.close()
        b_count, b_sum = _metric(port, "svp_batch_size_count"), _metric(port, "svp_batch_size_sum")
        lock = threading.Lock()
        counter = {"next": 0}
        lat, errors = [], [0]

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            while True:
                with lock:
                    i = counter["next"]
                    if i >= requests:
                        break
                    counter["next"] += 1
                t0 = time.perf_counter()
                try:
                    status = _request(conn, images[i % len(images)], MIXED8[i % len(MIXED8)])
                except (OSError, http.client.HTTPException):
                    status = -1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    if status != 200:
                        errors[0] += 1
            conn.close()

        load_before = loadavg()
        cpu0 = _proc_cpu(proc.pid)
        # the clients run in this process, on the same cores as the server: their CPU time is
        # reported so that a run where they, not the server, are the limit can be told apart
        client0 = time.process_time()
        t0 = time.perf_counter()
        ts = [threading.Thread(target=client) for _ in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.perf_counter() - t0
        client_cpu = time.process_time() - client0
        n_batches = _metric(port, "svp_batch_size_count") - b_count
        n_samples = _metric(port, "svp_batch_size_sum") - b_sum
        peak = vmhwm_mb(proc.pid)
        server_cpu = _proc_cpu(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    lat.sort()
    return {"mode": mode, "requests": requests, "clients": clients, "wall_s": wall,
            "throughput": requests / wall, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": errors[0],
            "mean_batch": n_samples / max(n_batches, 1), "server_peak_mb": peak,
            "server_cpu_ms_per_req": 1000 * server_cpu / requests,
            "client_cpu_ms_per_req": 1000 * client_cpu / requests, "exit_code": rc,
            "load_before": load_before, "load_after": loadavg()}


def probe(kind, adapters_dir, threads):
    """Run in a fresh process: build one configuration, run one batch of 16, print peak memory."""
    import torch

    import svp
    from svp.serve import MultiAdapterModel

    torch.set_num_threads(threads)  # as `svp serve --threads` does (svp's kernels follow it)
    x = torch.randn(16, 3, 32, 32)
    H.mini_backbone()(x[:1])  # the runtime (torch, timm, numba kernels) before what is measured
    out = {"kind": kind, "runtime_mb": vmhwm_mb(key="VmRSS")}
    if kind == "backbone":
        m = H.mini_backbone()
        with torch.no_grad():
            m(x)
        out["tensor_mb"] = sum(p.numel() * p.element_size() for p in m.state_dict().values()) / 2**20
    elif kind in ("multi_svp8", "multi_mixed8"):
        m = MultiAdapterModel(H.mini_backbone())
        names = [f"svp{i}" for i in range(8)] if kind == "multi_svp8" else MIXED8
        for n in names:
            m.add_adapter(n, os.path.join(adapters_dir, n))
        m(x, [names[i % 8] for i in range(16)])
        b = m.parameter_bytes()
        out["tensor_mb"] = (b["backbone"] + b["adapters"]) / 2**20
    elif kind == "separate_mixed8":
        models = [svp.load_adapter(H.mini_backbone(), os.path.join(adapters_dir, n)) for n in MIXED8]
        seen = {}
        with torch.no_grad():
            for m in models:
                m(x[:2])
                for t in list(m.parameters()) + list(m.buffers()):
                    seen[id(t)] = t.numel() * t.element_size()
        out["tensor_mb"] = sum(seen.values()) / 2**20
    out["peak_mb"] = vmhwm_mb()
    print(json.dumps(out))


def model_cpu(adapters_dir, threads, reps=5):
    """In-process CPU ms of the model alone (no HTTP) for 16 samples over the 8 adapters:
    one mixed batch, one batch per adapter, one sample at a time; and the frozen backbone."""
    import torch

    from svp.serve import MultiAdapterModel

    torch.set_num_threads(threads)  # as `svp serve --threads` does (svp's kernels follow it)
    m = MultiAdapterModel(H.mini_backbone())
    for n in MIXED8:
        m.add_adapter(n, os.path.join(adapters_dir, n))
    x = torch.randn(16, 3, 32, 32)
    names = [MIXED8[i % 8] for i in range(16)]
    cases = {
        "mixed batch of 16": lambda: m(x, names),
        "8 per-adapter batches of 2": lambda: [m(x[2 * k:2 * k + 2], [n, n]) for k, n in enumerate(MIXED8)],
        "16 batches of 1": lambda: [m(x[i:i + 1], [names[i]]) for i in range(16)],
        "frozen backbone, batch of 16": lambda: m.backbone(x),
        "frozen backbone, 16 batches of 1": lambda: [m.backbone(x[i:i + 1]) for i in range(16)],
    }
    out = {}
    with torch.no_grad():
        for k, f in cases.items():
            f()
            c0 = time.process_time()
            for _ in range(reps):
                f()
            out[k] = 1000 * (time.process_time() - c0) / reps
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=480)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="threads in the server (svp serve --threads)")
    ap.add_argument("--modes", default="mixed,per_adapter,batch1")
    ap.add_argument("--max-batch", type=int, default=16, help="the server's batch limit (mixed, per_adapter; default 16, as svp serve)")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--adapters-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        probe(args.probe, args.adapters_dir, args.threads)
        return 0
    with tempfile.TemporaryDirectory(prefix="svp-bench-serve-") as tmp:
        served = os.path.join(tmp, "served")
        H.make_adapters(served, names=MIXED8)
        extra = os.path.join(tmp, "all")
        H.make_adapters(extra, names=MIXED8)
        for i in range(8):
            method, settings = H.SPECS["svp"]
            H.make_adapter(os.path.join(extra, f"svp{i}"), method, settings, seed=100 + i)
        images = [H.png_bytes(32, seed=i) for i in range(8)]
        cpu = model_cpu(served, args.threads)
        print("model alone, CPU ms for 16 samples (in this process, threads "
              f"{args.threads}; load {loadavg()}):")
        for k, v in cpu.items():
            print(f"  {k}: {v:.0f} ms ({v / 16:.1f} ms/sample)")
        print(f"# svp serve load test: mini Vim + 8 adapters ({', '.join(MIXED8)}), {args.clients} clients, "
              f"{args.requests} requests, server threads {args.threads}, --max-batch {args.max_batch}, "
              f"{os.cpu_count()} CPUs")
        results = [run_mode(m, served, args.requests, args.clients, args.threads, images, args.max_batch)
                   for m in args.modes.split(",")]
        print("\n| mode | req/s | p50 ms | p99 ms | errors | mean batch | server peak MB | server CPU ms/request | "
              "client CPU ms/request | load before -> after |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['mode']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
                  f"{r['mean_batch']:.1f} | {r['server_peak_mb']:.0f} | {r['server_cpu_ms_per_req']:.1f} | "
                  f"{r['client_cpu_ms_per_req']:.2f} | {r['load_before']} -> {r['load_after']} |")
        by = {r["mode"]: r for r in results}
        if "mixed" in by:
            for other, target in (("batch1", 3.0), ("per_adapter", 2.0)):
                if other in by:
                    ratio = by["mixed"]["throughput"] / by[other]["throughput"]
                    cpu = by[other]["server_cpu_ms_per_req"] / by["mixed"]["server_cpu_ms_per_req"]
                    print(f"mixed / {other} throughput: {ratio:.2f}x (target >= {target}x: "
                          f"{'met' if ratio >= target else 'NOT met'}); server CPU per request: {cpu:.2f}x less")
        probes = []
        for kind in ("backbone", "multi_svp8", "multi_mixed8", "separate_mixed8"):
            r = subprocess.run([sys.executable, __file__, "--probe", kind, "--adapters-dir", extra,
                                "--threads", str(args.threads)], capture_output=True, text=True,
                               env=_env(args.threads), check=True)
            probes.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print("\n| process | peak RSS MB (VmHWM) | above the runtime MB | tensors MB |\n|---|---|---|---|")
        for p in probes:
            p["added_mb"] = p["peak_mb"] - p["runtime_mb"]
            print(f"| {p['kind']} | {p['peak_mb']:.0f} | {p['added_mb']:.1f} | {p['tensor_mb']:.2f} |")
        pb = {p["kind"]: p for p in probes}
        ratio = pb["multi_svp8"]["peak_mb"] / pb["backbone"]["peak_mb"]
        print(f"backbone + 8 SVP adapters / backbone, peak RSS: {ratio:.3f}x (target < 1.3x: "
              f"{'met' if ratio < 1.3 else 'NOT met'}); tensors: "
              f"{pb['multi_svp8']['tensor_mb'] / pb['backbone']['tensor_mb']:.2f}x")
        print(f"8 mixed adapters, one backbone / 8 separate models, peak RSS: "
              f"{pb['multi_mixed8']['peak_mb'] / pb['separate_mixed8']['peak_mb']:.3f}x; tensors: "
              f"{pb['multi_mixed8']['tensor_mb'] / pb['separate_mixed8']['tensor_mb']:.2f}x")
        print(f"load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
