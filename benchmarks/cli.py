"""The commands users run for inference, end to end: ``svp predict`` and ``svp eval`` with an SVP
adapter, each a process of its own, timed from start to exit, at batch 1 and 32.

    python benchmarks/cli.py                                   # Vim-Small, 3 runs of each command
    python benchmarks/cli.py --models vim_tiny_patch16_224 vim_small_patch16_224 --runs 5
    python benchmarks/cli.py --src /path/to/other/checkout/src # the same commands, that tree's svp
    python benchmarks/cli.py --models vim_base_patch16_224 --commands predict1 eval1 --no-in-process

What it builds first (in a temporary folder, nothing downloaded): for each model, a random
backbone (``random_init``, seed 0: the compute is the same as with the official weights), saved
as the official checkpoints are (a ``.pth`` with ``model``, ``model_ema``, ``optimizer`` with two
AdamW moments, ``epoch`` and ``args``: four times the weights), with an untrained SVP adapter
(S = 6, r = 64) for 10 classes on it, saved as ``svp train`` saves one (``backbone.json`` naming
the checkpoint + the adapter; ``--weights random`` leaves the backbone to ``random_init`` in every
command instead); and 64 JPEG images of 500 x 375 px (the size of a typical VTAB / FGVC
photograph) in an ``imagefolder`` tree. One untimed ``svp predict`` per source tree
(numba's kernel cache written or loaded). Then, per model and source tree, in turn:

* ``svp --help``: the start-up every command pays (interpreter, imports, exit);
* ``svp predict ADAPTER IMG`` with 1 image and with 32 (predict runs its images as one batch);
* ``svp eval ADAPTER --dataset imagefolder --batch-size 1 --max-samples 8`` and
  ``--batch-size 32`` over the 64 images.

Reported: the best wall time of --runs processes (each command run once per round, the rounds
one after the other, so a burst of load hits every command alike), images/s end to end, and the
time per image beyond the start-up of ``svp --help``. A second part times the same steps inside
one process (load the adapter onto the backbone, read and transform the images, the forward at
batch 1 and 32 after one warm-up): the latency the model itself gives, what ``svp serve`` pays
per request once loaded.

``--src`` runs every command with ``PYTHONPATH`` set to another tree's ``src`` (ahead of the
installed svp), alternating with this one, for a before/after in the same minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, "..", "src"))
NUM_CLASSES = 10
SETTING = {"shared_layers": 6, "hidden": 64}


def build(root, model, weights="checkpoint"):
    """An adapter folder for ``model`` and 64 images under ``root``."""
    sys.path.insert(0, SRC)
    import numpy as np
    from PIL import Image

    from svp.build import ModelSpec, build_model
    from svp.peft import get_peft_model, make_config

    spec = ModelSpec(model=model, random_init=True, init_seed=0, num_classes=NUM_CLASSES, img_size=224,
                     extra={"recipe": "svp"})
    backbone = build_model(spec)
    if weights == "checkpoint":
        from load import save_official_style   # benchmarks/load.py: the released files' layout
        path = os.path.join(root, model, "backbone.pth")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_official_style(backbone.state_dict(), path, model)
        spec.checkpoint, spec.random_init = path, False
    pm = get_peft_model(backbone, make_config("svp", num_classes=NUM_CLASSES, **SETTING))
    adapter = os.path.join(root, model, "adapter")
    pm.save(adapter)
    with open(os.path.join(adapter, "backbone.json"), "w", encoding="utf-8") as f:
        json.dump(spec.to_dict(), f)
    data = os.path.join(root, "data")
    if not os.path.isdir(data):
        rng = np.random.RandomState(0)
        for i in range(64):
            path = os.path.join(data, "test", f"class{i % NUM_CLASSES}", f"{i:03d}.jpg")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # smooth colour fields (JPEG decodes them at the speed of a photograph of that size)
            small = (rng.rand(16, 21, 3) * 255).astype(np.uint8)
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(path, quality=90)
    images = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data, "test")) for f in fs)
    return adapter, data, images


COMMANDS = ("help", "predict1", "predict32", "eval1", "eval32")


def commands(adapter, data, images, only=COMMANDS):
    """(name, svp arguments, images it classifies) of the commands in ``only``; ``svp --help``
    always (the start-up the others are measured beyond)."""
    ev = ["eval", adapter, "--dataset", "imagefolder", "--data-root", data, "--split", "test"]
    cmds = {"help": ("svp --help", ["--help"], 0),
            "predict1": ("predict, 1 image", ["predict", adapter, images[0], "--json"], 1),
            "predict32": ("predict, 32 images (one batch)", ["predict", adapter, *images[:32], "--json"], 32),
            "eval1": ("eval, batch 1, 8 images", ev + ["--batch-size", "1", "--max-samples", "8"], 8),
            "eval32": ("eval, batch 32, 64 images", ev + ["--batch-size", "32"], 64)}
    return [cmds[k] for k in COMMANDS if k == "help" or k in only]


def timed(args, src):
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "svp", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"svp {' '.join(args[:2])} failed ({src or 'installed svp'}):\n{r.stderr[-3000:]}")
    return wall


def in_process(adapter, images, reps):
    """Stages inside one process (run as a child: a fresh process per model)."""
    code = f"""
import json, sys, time
t0 = time.perf_counter()
import svp, torch
import svp.data as data
from svp.build import load_for_inference
from svp.data import load_image
t1 = time.perf_counter()
model, spec, dev = load_for_inference({adapter!r})
t2 = time.perf_counter()
tf = data.build_transform("svp", False, img_size=spec.img_size)
images = {images[:32]!r}
t3 = time.perf_counter()
xs = torch.stack([tf(load_image(p)) for p in images])
t4 = time.perf_counter()
out = {{"import_s": t1 - t0, "load_s": t2 - t1, "read_32_s": t4 - t3}}
with torch.no_grad():
    for b in (1, 32):
        x = xs[:b]
        ts = []
        for _ in range({reps} + 1):
            s = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - s)
        out[f"first_b{{b}}_s"], out[f"fwd_b{{b}}_s"] = ts[0], min(ts[1:])
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"in-process timing failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_small_patch16_224"])
    ap.add_argument("--runs", type=int, default=3, help="processes per command (best is reported)")
    ap.add_argument("--reps", type=int, default=3, help="forwards per batch size in the in-process part")
    ap.add_argument("--src", nargs="*", default=[], help="other trees' src folders to run alongside")
    ap.add_argument("--weights", choices=["checkpoint", "random"], default="checkpoint",
                    help="the backbone from a checkpoint file, as users load the official weights (default), "
                         "or drawn by random_init in every command")
    ap.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS),
                    help="which commands to time (svp --help always)")
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process part")
    ap.add_argument("--json", type=json_path, default=None)
    a = ap.parse_args(argv)
    trees = [None] + [os.path.abspath(s) for s in a.src]
    label = {None: "this tree"} | {s: s for s in trees[1:]}
    print(f"# {os.cpu_count()} cpus; load average {os.getloadavg()}; backbone weights: {a.weights}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="svp-cli-bench-") as root:
        for model in a.models:
            adapter, data, images = build(root, model, a.weights)
            cmds = commands(adapter, data, images, a.commands)
            walls = {(name, t): [] for name, _, _ in cmds for t in trees}
            for t in trees:   # untimed: numba's cache of each tree's kernels written or loaded once
                timed(commands(adapter, data, images, ["predict1"])[1][1], t)
            for _ in range(a.runs):
                for name, args, _ in cmds:
                    for t in trees:
                        walls[(name, t)].append(timed(args, t))
            for t in trees:
                start = min(walls[("svp --help", t)])
                for name, _, n in cmds:
                    best = min(walls[(name, t)])
                    rows.append({"model": model, "tree": label[t], "command": name, "images": n, "best_s": best,
                                 "runs_s": walls[(name, t)], "startup_s": start})
                    print(f"{model} [{label[t]}] {name}: best {best:.2f} s of {len(walls[(name, t)])} "
                          f"({', '.join(f'{w:.2f}' for w in walls[(name, t)])})", flush=True)
            if a.no_in_process:
                continue
            stages = in_process(adapter, images, a.reps)
            rows.append({"model": model, "tree": label[None], "command": "in process", **stages})
            print(f"{model} in process: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()), flush=True)
    print()
    print("| model | svp | command | images | best wall s | images/s end to end | s / image beyond start-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["command"] == "in process":
            continue
        n = r["images"]
        ips = f"{n / r['best_s']:.2f}" if n else "-"
        per = f"{(r['best_s'] - r['startup_s']) / n:.3f}" if n else "-"
        print(f"| {r['model']} | {r['tree']} | {r['command']} | {n} | {r['best_s']:.2f} | {ips} | {per} |")
    print()
    print("| model | import s | load adapter + backbone s | read + transform 32 images s | batch 1: first / best "
          "forward ms | batch 32: first / best forward ms | batch 32 images/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["command"] != "in process":
            continue
        print(f"| {r['model']} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['read_32_s']:.2f} | "
              f"{r['first_b1_s'] * 1e3:.0f} / {r['fwd_b1_s'] * 1e3:.0f} | {r['first_b32_s'] * 1e3:.0f} / "
              f"{r['fwd_b32_s'] * 1e3:.0f} | {32 / r['fwd_b32_s']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
