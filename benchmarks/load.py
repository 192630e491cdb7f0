"""Building a backbone from an official-format checkpoint, as the commands do: wall time and peak
memory, each build in a fresh process.

    python benchmarks/load.py                                   # Vim-Small and Vim-Base, 3 runs each
    python benchmarks/load.py --models vim_base_patch16_224 --runs 5 --src /path/to/other/checkout/src

The checkpoints are written first (in a temporary folder, nothing downloaded): a random backbone
(``random_init``, seed 3) saved as Vim's ``main.py`` saves the released files, a ``.pth`` with
``model``, ``model_ema``, ``optimizer`` (two AdamW moments per weight), ``epoch`` and ``args``:
four times the weights, of which a load needs one. Then, per model, run and source tree, a child
process times ``svp.build.build_backbone`` on it, 10 classes (the head is dropped and drawn anew):

* ``train``: what ``svp train`` builds: the random initialisation first, then the checkpoint;
* ``adapter``: what ``svp predict`` / ``eval`` / ``serve`` / ``visualize`` build under an adapter
  (``skip_init=True`` where the tree has it; a tree without it builds as for training).

Reported: the best wall time of --runs processes and the peak RSS of the child (VmHWM; ``ru_maxrss``
where /proc is missing; the runtime's ~0.85 GB included). ``--src`` runs the same builds with ``PYTHONPATH`` set to
another tree's ``src``, alternating with this one, for a before/after in the same minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, "..", "src"))

CHILD = r"""
import inspect, json, resource, sys, time  # noqa: E401
import svp, torch  # (svp first: svp.runtime)
from svp.build import ModelSpec, build_backbone
torch.set_num_threads(2)
model, path, mode = sys.argv[1:4]
spec = ModelSpec(model, checkpoint=path, num_classes=10, init_seed=0)
kw = {"skip_init": True} if mode == "adapter" and "skip_init" in inspect.signature(build_backbone).parameters else {}
t = time.perf_counter()
build_backbone(spec, **kw)
# VmHWM, not ru_maxrss: Linux carries the forking parent's peak into ru_maxrss across exec
try:
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
except OSError:   # (no /proc: macOS)
    hwm = []
peak = int(hwm[0].split()[1]) if hwm else (   # KiB (ru_maxrss: bytes on macOS)
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1))
print(json.dumps({"build_s": time.perf_counter() - t, "peak_rss_mb": peak / 1024}))
"""


def save_official_style(state_dict, path, model):
    """Save ``state_dict`` as Vim's ``main.py`` saves the released checkpoints: ``model``,
    ``model_ema``, ``optimizer`` with two AdamW moments per weight, ``epoch``, ``args`` (four
    times the weights, of which a load needs one). Also used by benchmarks/cli.py."""
    import argparse as _argparse

    import torch
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": v.clone(), "exp_avg_sq": v.clone()}
               for i, v in enumerate(state_dict.values())}
    torch.save({"model": state_dict, "model_ema": {k: v.clone() for k, v in state_dict.items()}, "epoch": 299,
                "optimizer": {"state": moments, "param_groups": [{"lr": 5e-4, "params": list(moments)}]},
                "args": _argparse.Namespace(model=model)}, path)


WRITER = r"""
import sys
sys.path.insert(0, sys.argv[3])
from load import save_official_style
from svp.build import ModelSpec, build_backbone
model, path = sys.argv[1:3]
save_official_style(build_backbone(ModelSpec(model, random_init=True, init_seed=3)).state_dict(), path, model)
"""


def write_checkpoint(path, model):
    # in a child, so that this process stays small (each timed child is forked from it), then
    # flushed to disk, so that no write-back runs beside the timed builds
    subprocess.run([sys.executable, "-c", WRITER, model, path, HERE], env=dict(os.environ, PYTHONPATH=SRC),
                   check=True)
    os.sync()


def child(model, path, mode, src):
    env = dict(os.environ, PYTHONPATH=src + (os.pathsep + os.environ["PYTHONPATH"]
                                             if os.environ.get("PYTHONPATH") else ""))
    r = subprocess.run([sys.executable, "-c", CHILD, model, path, mode], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"build failed ({src}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_small_patch16_224", "vim_base_patch16_224"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--src", nargs="*", default=[], help="other trees' src folders to run alongside")
    ap.add_argument("--json", type=json_path, default=None)
    a = ap.parse_args(argv)
    trees = [SRC] + [os.path.abspath(s) for s in a.src]
    print(f"# {os.cpu_count()} cpus; load average {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="svp-load-bench-") as root:
        for model in a.models:
            path = os.path.join(root, f"{model}.pth")
            write_checkpoint(path, model)
            size = os.path.getsize(path) / 1e6
            res = {(mode, t): [] for mode in ("train", "adapter") for t in trees}
            for _ in range(a.runs):
                for mode in ("train", "adapter"):
                    for t in trees:
                        res[(mode, t)].append(child(model, path, mode, t))
            for (mode, t), runs in res.items():
                best = min(r["build_s"] for r in runs)
                rss = max(r["peak_rss_mb"] for r in runs)
                tree = "this tree" if t == SRC else t
                rows.append({"model": model, "checkpoint_mb": size, "mode": mode, "tree": tree, "best_s": best,
                             "runs_s": [r["build_s"] for r in runs], "peak_rss_mb": rss})
                walls = ", ".join(f"{r['build_s']:.2f}" for r in runs)
                print(f"{model} ({size:.0f} MB file) {mode} [{tree}]: best {best:.2f} s ({walls}), "
                      f"peak RSS {rss:.0f} MB", flush=True)
            os.remove(path)
    print()
    print("| model | checkpoint MB | build | svp | best wall s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['checkpoint_mb']:.0f} | {r['mode']} | {r['tree']} | {r['best_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
