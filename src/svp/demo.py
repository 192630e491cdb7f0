"""``svp demo``: the project's main job in a few minutes on any CPU.

Adapts the bundled pre-trained mini Vim (``vim_mini_patch4_32``, see
docs/mini_backbone.md) to the real scikit-learn handwritten-digits task with SVP, and
with linear probing and VPT-deep under the same budget (same epochs, batch size,
schedule and data) and each at its own learning rate, chosen once on the digits
validation split (``svp demo --select-lr``, stored in ``svp/assets/demo_preset.json``),
through the engine's Python API (:func:`svp.engine.train`). Prints
the test accuracy of each, the trainable-parameter counts next to full fine-tuning's,
where the run folders are, and draws the gate-activation picture of the frozen
backbone vs. the SVP-adapted one (:mod:`svp.viz`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

from .io import error_line, print_or_drop, user_path

BACKBONE = "vim_mini_patch4_32"
# SVP sized for the mini backbone (width 64, depth 8) in the paper's proportions: the
# Inner bottleneck r ~ width / 6 (paper: 64 of 384) and Cross prompters shared over a
# fraction of the depth (S = 4 of 8, i.e. 2 groups; paper: S = 8 of 24, 3 groups).
# Chosen a priori so SVP trains < 10% of full fine-tuning's parameters; not tuned.
METHOD_SETTINGS = {
    "linear": {},
    "vpt_deep": {"num_tokens": 10, "placement": "prefix"},
    "svp": {"shared_layers": 4, "hidden": 16},
}
METHOD_TITLES = {"linear": "linear probing", "vpt_deep": "VPT-deep", "svp": "SVP (ours)", "full": "full fine-tuning"}
# Each method's learning rate, chosen once on the digits *validation* split by
# ``svp demo --select-lr ...`` (the selection code of ``svp sweep --tune``) and stored
# here; the file records the grid, every validation accuracy and the command.
PRESET_ASSET = "demo_preset.json"
SHARED_LR = 3e-3   # for a method the preset does not cover (or --lr): one shared, untuned value


def load_preset(path: Optional[str] = None) -> dict:
    from svp.models.vim_mini import mini_asset_path
    path = path or mini_asset_path(PRESET_ASSET)
    if not os.path.isfile(path):
        return {"lr": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def select_lrs(out: str, lrs, epochs: int = 8, batch_size: int = 32, seed: int = 0,
               methods=("linear", "vpt_deep", "svp"), max_train_samples: Optional[int] = None,
               max_eval_samples: Optional[int] = None, progress: str = "none", command: str = "",
               jobs: int = 1, echo=print_or_drop, write: Optional[Callable[[dict], None]] = None) -> dict:
    """Pick each method's learning rate on the digits validation split with the sweep's
    tuning code (train on train, score val top-1, ties to the first lr listed); test
    accuracy is not looked at. Returns the preset (``{"lr": {method: lr}, ...}``), given first
    to ``write`` (which saves it) while the runner still holds a stop signal: with ``jobs`` > 1
    a SIGINT/SIGTERM from the first grid on stops it once the preset is written
    (:class:`svp.engine.tune.StoppedAfterRuns`), never between two methods' grids or in the write."""
    from svp.engine import tune as T

    points = T.grid_points([("train.lr", [f"{float(v):g}" for v in lrs])])

    def make_config(point, s, run_dir, refit):
        cfg = demo_config("?", os.path.dirname(run_dir), epochs, batch_size, float(point[0][1]), s,
                          max_train_samples, max_eval_samples, progress)
        cfg["data"]["val_split"] = "val"
        cfg["run"]["name"] = os.path.basename(run_dir)
        return cfg

    preset = {"lr": {}, "val_top1": {}, "grid": [float(v) for v in lrs], "dataset": "digits",
              "selection": "top-1 on the digits val split (297 images, or the first --max-eval-samples) "
                           "after training on the train split; ties to the first lr listed; test accuracy "
                           "not used",
              "epochs": epochs, "batch_size": batch_size, "seed": seed, "command": command}
    # one runner for every method's grid and the write: a runner puts the default handlers back
    # as it closes, and with one per method a SIGTERM between two grids, or after the last one
    # as the preset was written, killed the process without a word (exit 143; review49)
    with T.Runner(jobs) as runner:
        for m in methods:
            def mk(point, s, run_dir, refit, m=m):
                cfg = make_config(point, s, run_dir, refit)
                cfg["method"] = {"name": m, "settings": dict(METHOD_SETTINGS.get(m, {}))}
                # resolved as the engine resolves it: a finished grid run's config.yaml is compared with
                # this one, and the partial dict differed in every key it left out, so each finished
                # run was refused ("made with another configuration") and a rerun wrote an empty preset
                from svp.engine import config as C
                return C.resolve(base=cfg)
            cell = T.tune_cell(points, [seed], os.path.join(out, m), "val", mk, runner, label=f"demo / {m}")
            preset["val_top1"][m] = {g["label"].split("=", 1)[1]: g["val_top1"] for g in cell["grid"]}
            if cell["chosen"] is not None:
                preset["lr"][m] = float(cell["chosen"]["train.lr"])
            echo(f"{m}: val top-1 " + ", ".join(f"lr {k}: {'failed' if v is None else f'{v:.2f}'}"
                                               for k, v in preset["val_top1"][m].items())
                 + f" -> lr {preset['lr'].get(m, 'none')}")
        if write is not None:
            write(preset)
    return preset


DIGITS_TRAIN = 1000  # digits' train split (its test split: 500)


def _train_images(max_train_samples: Optional[int]) -> int:
    return DIGITS_TRAIN if max_train_samples is None else min(DIGITS_TRAIN, max_train_samples)


def demo_config(method: str, out: str, epochs: int, batch_size: int, lr: float, seed: int,
                max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None,
                progress: str = "auto") -> dict:
    """The engine configuration of one demo run (the same for every method except
    ``method``): bundled backbone, digits at 32 px, plain transform, AdamW + cosine,
    no validation split (the last epoch is reported on the test split)."""
    return {
        "model": {"name": BACKBONE, "pretrained": True, "drop_path_rate": 0.0},
        "method": {"name": method, "settings": dict(METHOD_SETTINGS.get(method, {}))},
        "data": {"dataset": "digits", "img_size": 32, "recipe": "plain", "num_workers": 0, "val_split": None,
                 "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples},
        "train": {"epochs": epochs, "batch_size": batch_size, "eval_batch_size": 256, "lr": lr,
                  "lr_scale": False, "weight_decay": 1e-4, "warmup_epochs": 0, "sched": "cosine",
                  "sched_step": "step", "min_lr": 1e-5, "smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0,
                  "seed": seed, "device": "cpu"},
        "eval": {"every": epochs},
        "run": {"output": out, "name": method, "progress": progress, "log_every": 5},
    }


def full_finetune_params(num_classes: int = 10) -> Dict[str, int]:
    from svp.build import ModelSpec, build_model
    m = build_model(ModelSpec(BACKBONE, num_classes=num_classes, random_init=True))  # counts only
    total = sum(p.numel() for p in m.parameters())
    head = sum(p.numel() for p in m.head.parameters())
    return {"trainable_params": total, "trainable_params_without_head": total - head}


def gate_figure(out: str, svp_run: str, seed: int = 0) -> List[str]:
    """Gate maps of the frozen backbone and the SVP-adapted model on one test digit."""
    from svp.build import ModelSpec, build_model
    from svp.data import build_dataset
    from svp.viz.figures import visualize

    image, label = build_dataset("digits", "test")[0]
    spec = ModelSpec(BACKBONE, num_classes=10)  # the bundled weights
    frozen = build_model(spec).eval()
    adapted = build_model(spec, os.path.join(svp_run, "last")).eval()
    return visualize(image, {"frozen": frozen, "SVP": adapted}, os.path.join(out, "figures"),
                     f"digit{label}")


def format_table(rows: List[dict], full: Dict[str, int]) -> str:
    lines = [f"{'method':<18} {'test top-1':>10} {'trainable (no head)':>20} {'with head':>10} "
             f"{'% of full FT':>12} {'train s':>8}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        acc = r.get("test_top1")
        acc_s = f"{acc:.2f}%" if acc is not None else "failed"
        tp, tpn = r.get("trainable_params"), r.get("trainable_params_without_head")
        pct = f"{100.0 * tp / full['trainable_params']:.2f}%" if tp is not None else "-"
        lines.append(f"{METHOD_TITLES.get(r['method'], r['method']):<18} {acc_s:>10} "
                     f"{(f'{tpn:,}' if tpn is not None else '-'):>20} {(f'{tp:,}' if tp is not None else '-'):>10} "
                     f"{pct:>12} {r.get('train_seconds', 0):>8.0f}")
    lines.append(f"{'full fine-tuning':<18} {'(not run)':>10} {full['trainable_params_without_head']:>20,} "
                 f"{full['trainable_params']:>10,} {'100.00%':>12} {'':>8}")
    return "\n".join(lines)


def set_aside_previous(out: str, methods, echo=print_or_drop) -> List[str]:
    """The demo's run folders are its own: a new demo moves a previous demo's
    ``<out>/<method>`` to ``<out>/previous/<method>`` (replacing an older one there) and says
    so, so that ``make demo`` works every time. A folder another process is training in is
    left alone (that method's run then reports the folder in use)."""
    import shutil

    from svp.engine.runlock import describe_holder, holder

    import svp.peft as peft

    # every folder a previous demo wrote, whatever methods it ran: its runs, its figures and its
    # summary, so that what stays beside the new demo_results.json is this demo's only
    names = list(dict.fromkeys(list(methods) + list(peft.list_methods()) + ["figures", "demo_results.json"]))
    moved = []
    for m in names:
        src, dst = os.path.join(out, m), os.path.join(out, "previous", m)
        if not os.path.exists(src):
            continue
        busy = holder(src)
        if busy:
            echo(f"{src} is in use by {describe_holder(busy)}; not moved")
            continue
        if os.path.isdir(dst):
            shutil.rmtree(dst, ignore_errors=True)
        elif os.path.exists(dst):
            os.remove(dst)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        moved.append(dst)
    if moved:
        echo(f"the previous demo's run folders were set aside in {os.path.join(out, 'previous')} "
             f"({', '.join(os.path.basename(p) for p in moved)}); this demo starts fresh runs")
    return moved


def method_lrs(methods, lr: Optional[float] = None, preset: Optional[dict] = None) -> Dict[str, tuple]:
    """method -> (lr, where it comes from): ``lr`` for all when given, else the preset's
    validation-selected value, else the shared default."""
    chosen = (preset or load_preset()).get("lr", {})
    out = {}
    for m in methods:
        if lr is not None:
            out[m] = (float(lr), "--lr, shared by every method, not tuned")
        elif m in chosen:
            out[m] = (float(chosen[m]), "chosen on the digits validation split")
        else:
            out[m] = (SHARED_LR, "no preset for this method: shared default, not tuned")
    return out


def _summary(lrs, epochs, batch_size, seed, rows, figures, t0, interrupted: Optional[str] = None,
             full: Optional[dict] = None) -> dict:
    summary = {"backbone": BACKBONE, "dataset": "digits", "epochs": epochs, "batch_size": batch_size,
               "lr": {m: v[0] for m, v in lrs.items()},
               "seed": seed, "rows": rows, "full_finetune": full or full_finetune_params(10), "figures": figures,
               "seconds": round(time.time() - t0, 1)}
    if interrupted:   # the method whose run, or "figures", a Ctrl-C / SIGTERM stopped
        summary["interrupted"] = interrupted
    return summary


def _write_summary(out: str, summary: dict) -> None:
    from svp.io import atomic_write_json
    atomic_write_json(os.path.join(out, "demo_results.json"), summary)


def run_demo(out: str, epochs: int = 8, batch_size: int = 32, lr: Optional[float] = None, seed: int = 0,
             methods=("linear", "vpt_deep", "svp"), max_train_samples: Optional[int] = None,
             max_eval_samples: Optional[int] = None, figure: bool = True, progress: str = "auto",
             echo=print_or_drop, preset: Optional[dict] = None) -> dict:
    os.makedirs(out, exist_ok=True)
    set_aside_previous(out, methods, echo)
    with _presses() as pressed:
        return _run_demo(out, epochs, batch_size, lr, seed, methods, max_train_samples, max_eval_samples, figure,
                         progress, echo, preset, pressed)


@contextlib.contextmanager
def _presses():
    """A Ctrl-C or SIGTERM between the runs (each run has its own handler, which puts this one back)
    is noted, and a second one raises: pressed while a finished run was being torn down, it was
    raised in a garbage-collection callback, which Python ignores, and the demo went on (review)."""
    import signal

    pressed: List[int] = []

    def note(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:   # (ignored, as nohup and background jobs have it)
                old[s] = signal.signal(s, note)
    except ValueError:   # (not the main thread: the caller's handlers stay)
        pass
    try:
        yield pressed
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _stopped_between(pressed, m, out):
    import signal

    from svp.engine.signals import TrainingStopped
    e = TrainingStopped(f"{signal.Signals(pressed[0]).name} received between runs: stopped before the {m} run",
                        130, out)
    e.demo_method = None   # (no run was under way)
    return e


def _run_demo(out, epochs, batch_size, lr, seed, methods, max_train_samples, max_eval_samples, figure, progress,
              echo, preset, pressed) -> dict:
    from svp.engine import train
    from svp.engine.runlock import LocksRefused
    from svp.engine.signals import TrainingStopped
    from svp.errors import OutputError

    t0 = time.time()
    lrs = method_lrs(methods, lr, preset)
    rows = []
    for i, m in enumerate(methods, 1):
        if pressed:
            _write_summary(out, _summary(lrs, epochs, batch_size, seed, rows, [], t0, interrupted=m))
            raise _stopped_between(pressed, m, out)
        echo(f"\n[{i}/{len(methods)}] {METHOD_TITLES.get(m, m)} on digits, {epochs} epoch(s), batch {batch_size}, "
             f"lr {lrs[m][0]:g} ({lrs[m][1]}), bundled backbone {BACKBONE}")
        cfg = demo_config(m, out, epochs, batch_size, lrs[m][0], seed, max_train_samples, max_eval_samples,
                          progress)
        try:
            res = train(cfg)
        except TrainingStopped as e:   # Ctrl-C / SIGTERM: the demo stops; what ran so far is summarised
            e.demo_method = m
            _write_summary(out, _summary(lrs, epochs, batch_size, seed, rows, [], t0, interrupted=m))
            raise
        except (OutputError, LocksRefused):   # the demo's folder unwritable, full disk, a file system
            raise   # without locks: the next method would fail the same way
        except Exception as e:  # keep going: the table says which one failed
            echo(f"  {m} failed: {type(e).__name__}: {e}")
            rows.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            continue
        rows.append({"method": m, "lr": lrs[m][0], "lr_source": lrs[m][1], "test_top1": res["final"]["test_top1"],
                     "trainable_params": res.get("trainable_params"),
                     "trainable_params_without_head": res.get("trainable_params_without_head"),
                     "train_seconds": res.get("train_seconds", 0.0), "run_dir": res.get("run_dir")})
    full = full_finetune_params(10)
    figures: List[str] = []
    fig_note = ""
    interrupted = None
    svp_row = next((r for r in rows if r["method"] == "svp" and r.get("run_dir")), None)
    if figure and svp_row:
        # the runs' summary first: a Ctrl-C while the figure is drawn (half a minute) left none
        _write_summary(out, _summary(lrs, epochs, batch_size, seed, rows, [], t0, full=full))
        try:
            if pressed:
                raise KeyboardInterrupt
            figures = gate_figure(out, svp_row["run_dir"], seed)
            if pressed:   # (one press while it was drawn: noted, the figure finished)
                raise KeyboardInterrupt
        except KeyboardInterrupt:   # the runs are done: their table still comes, then exit 130
            fig_note, interrupted = "gate figure: interrupted (svp visualize draws it from the run folder)", "figures"
        except Exception as e:
            fig_note = f"gate figure failed: {type(e).__name__}: {e}"
    summary = _summary(lrs, epochs, batch_size, seed, rows, figures, t0, interrupted, full=full)
    _write_summary(out, summary)

    echo("\n" + "=" * 84)
    n_train = _train_images(max_train_samples)
    n_test = 500 if max_eval_samples is None else min(500, max_eval_samples)
    echo(f"svp demo: digits (sklearn, 10 classes, {n_train} train / {n_test} test), backbone {BACKBONE} "
         f"(bundled, pre-trained on IFS fractals)")
    echo(f"same budget for every method: {epochs} epoch(s), batch {batch_size}, cosine, seed {seed}; "
         f"learning rate per method:")
    for m in methods:
        echo(f"  {METHOD_TITLES.get(m, m)}: {lrs[m][0]:g} ({lrs[m][1]})")
    if lr is None and any(src.startswith("chosen") for _, src in lrs.values()):
        echo("  (each chosen once by `svp demo --select-lr` on the digits validation split, never on test; "
             "see docs/mini_backbone.md)")
    echo(format_table(rows, full))
    echo("")
    for r in rows:
        if r.get("run_dir"):
            echo(f"run folder ({r['method']}): {r['run_dir']}")
    if figures:
        echo("gate-activation figures (frozen vs SVP): " + ", ".join(f for f in figures if f.endswith(".png")))
    elif fig_note:
        echo(fig_note)
    echo(f"summary: {os.path.join(out, 'demo_results.json')}  ({summary['seconds']:.0f}s in all)")
    return summary


def register(subparsers):
    p = subparsers.add_parser(
        "demo", help="adapt the bundled mini Vim to sklearn digits: SVP vs linear probing vs VPT-deep",
        description="Adapt the bundled pre-trained mini Vim to the real scikit-learn digits task with SVP, "
                    "linear probing and VPT-deep under the same budget; print test accuracy and trainable "
                    "parameters, and draw the gate-activation figure. A few minutes on a CPU.")
    # (expanded as the runs' run.output is: `--out=~/demo` reaches svp unexpanded)
    p.add_argument("--out", default=os.path.join("runs", "demo"), type=user_path,
                   help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per method (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=None,
                   help="one learning rate for every method (default: each method's own, chosen on the digits "
                        "validation split and stored in svp/assets/demo_preset.json)")
    p.add_argument("--select-lr", default=None, metavar="LR1,LR2,...",
                   help="instead of the demo: choose each method's lr from this list on the digits validation "
                        "split and write the preset (--preset-out)")
    p.add_argument("--jobs", type=int, default=1, help="--select-lr: grid runs at a time, each in its own process")
    p.add_argument("--preset-out", default=None, type=user_path,
                   help="where --select-lr writes the preset (default <out>/demo_preset.json)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--methods", default="linear,vpt_deep,svp", help="comma-separated (default linear,vpt_deep,svp)")
    p.add_argument("--max-train-samples", type=int, default=None,
                   help="use only N training images (smoke test; at least --batch-size)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="use only N val/test images (smoke test)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads: torch's, which svp's kernels follow (default: one per core)")
    p.add_argument("--no-figure", action="store_true", help="skip the gate-activation figure")
    p.add_argument("--quiet", action="store_true", help="no per-step progress")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.epochs < 1 or args.batch_size < 1:
        error_line("demo", f"--epochs and --batch-size must be >= 1 (got {args.epochs}, {args.batch_size})")
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    problems = []
    if not methods:
        problems.append(f"--methods {args.methods!r} names no method")
    if len(set(methods)) != len(methods):
        problems.append(f"--methods {args.methods!r} names a method twice")
    if args.lr is not None and not 0 < args.lr < float("inf"):   # (inf: every method's run refused it, exit 1)
        problems.append(f"--lr must be a finite number > 0, got {args.lr}")
    from svp.compat import SEED_LIMIT
    if not 0 <= args.seed < SEED_LIMIT:
        problems.append(f"--seed must be >= 0 and below 2**32, got {args.seed}")
    for flag, path, want in (("--out", args.out, "a folder"), ("--preset-out", args.preset_out, "a file")):
        if path and os.path.exists(path) and os.path.isdir(path) != (want == "a folder"):
            problems.append(f"{flag} {path}: expected {want}")
    for flag, v in (("--max-train-samples", args.max_train_samples), ("--max-eval-samples", args.max_eval_samples)):
        if v is not None and v < 1:
            problems.append(f"{flag} must be >= 1, got {v}")
    if args.jobs < 1:   # (ran as --jobs 1, where svp sweep refuses it: review 78)
        problems.append(f"--jobs {args.jobs}: expected a positive number of worker processes")
    n_train = _train_images(args.max_train_samples)
    if not problems and args.batch_size > n_train:  # every run would refuse it, one by one
        problems.append(f"--batch-size {args.batch_size} is larger than the {n_train} training images"
                        + (" (--max-train-samples)" if args.max_train_samples is not None else "")
                        + f"; use --batch-size {n_train} or less")
    if problems:  # before any run starts, not as a table of failed runs
        error_line("demo", "; ".join(problems))
        return 2
    import svp.peft as peft
    unknown = [m for m in methods if m not in peft.list_methods()]
    if unknown:
        error_line("demo", f"unknown method(s) {unknown}; choose from {', '.join(peft.list_methods())}")
        return 2
    if args.threads is not None:
        from svp.compat import threads_problem
        problem = threads_problem(args.threads)
        if problem:
            error_line("demo", problem)
            return 2
        import torch
        torch.set_num_threads(args.threads)  # svp's CPU kernels follow it
    if args.select_lr is not None:   # (--select-lr "" ran the demo instead)
        try:
            grid = [float(v) for v in args.select_lr.split(",") if v.strip()]
        except ValueError:
            grid = []
        if not grid or not all(v > 0 for v in grid):   # (a rate of 0 "won" and was written to the preset)
            error_line("demo", f"--select-lr {args.select_lr!r}: expected comma-separated rates > 0")
            return 2
        command = "svp demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else ""
        path = args.preset_out or os.path.join(args.out, PRESET_ASSET)

        def write(preset):
            from svp.io import atomic_write_json
            atomic_write_json(path, preset)
            shipped = os.path.basename(path) == PRESET_ASSET and \
                os.path.basename(os.path.dirname(os.path.abspath(path))) == "assets"
            hint = "" if shipped else f"; copy it to src/svp/assets/{PRESET_ASSET} to make it the demo's preset"
            print_or_drop(f"wrote {path}{hint}")
        preset = select_lrs(os.path.join(args.out, "select_lr"), grid, args.epochs, args.batch_size, args.seed,
                            methods, args.max_train_samples, args.max_eval_samples,
                            "none" if args.quiet else "auto", command, args.jobs, write=write)
        return 0 if len(preset["lr"]) == len(methods) else 1
    from svp.engine.signals import TrainingStopped
    try:
        summary = run_demo(args.out, args.epochs, args.batch_size, args.lr, args.seed, methods,
                           args.max_train_samples, args.max_eval_samples, not args.no_figure,
                           "none" if args.quiet else "auto")
    except TrainingStopped as e:
        # (svp train's words said to continue with `svp train --resume RUN`: that finishes the run,
        # never the demo, and the next `svp demo` sets it aside and trains it again)
        method = getattr(e, "demo_method", None)
        error_line("demo", f"stopped{f' during the {method} run' if method else ''} ({str(e).split(';')[0]}); the "
                   f"runs so far are summarised in {os.path.join(args.out, 'demo_results.json')}. `svp demo` again "
                   f"starts the demo over (it sets these runs aside in {os.path.join(args.out, 'previous')})")
        return e.code
    except OSError as e:   # a full or read-only disk: one line
        error_line("demo", f"cannot write {e.filename or args.out} ({e.strerror or e})")
        return 2
    if summary.get("interrupted"):
        print("svp demo: error: interrupted while drawing the gate figure; the runs' table above is complete",
              file=sys.stderr)
        return 130
    return 0 if all(r.get("test_top1") is not None for r in summary["rows"]) else 1
