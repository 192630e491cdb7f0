"""The mini suite and its ablations, as a list of ``svp sweep --suite mini`` commands.

    python -m svp.pretrain.mini_suite --out sweeps/mini --stages 1-11   # the suite (about an hour)
    python -m svp.pretrain.mini_suite --out sweeps/mini --stages 12-14  # supplementary budget check
    python -m svp.pretrain.mini_suite --out sweeps/mini --dry-run  # print the commands
    python -m svp.pretrain.mini_suite --out sweeps/mini --report   # Markdown of what finished
    python -m svp.pretrain.mini_suite --out sweeps/mini-tuned --tuned   # each setting chosen on val

Every command is an ordinary ``svp sweep`` with the suite configuration
``svp/assets/mini_suite.yaml`` (bundled backbone, fixed budget, method sizes); a sweep
reuses finished runs, so the stages below can be interrupted and re-run at will and
later stages (more seeds) only add runs. The stages are ordered so that a cut-off run
still leaves complete tables: first every method on every dataset with seed 0, then
the ablations, then seeds 1 and 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from ..io import user_path

METHODS = ["linear", "full", "vpt_shallow", "vpt_deep", "lora", "adapter", "svp"]
ABLATION_DATASETS = ["digits", "textures", "dsprites_loc"]
# name -> (methods, overrides); "both", S=4, r=16 and VPT prefix are the main-table SVP / VPT-deep runs
ABLATIONS: Dict[str, Tuple[str, List[str]]] = {
    "inner_only": ("svp", ["method.settings.svp.use_cross=false"]),
    "cross_only": ("svp", ["method.settings.svp.use_inner=false"]),
    "S1": ("svp", ["method.settings.svp.shared_layers=1"]),
    "S2": ("svp", ["method.settings.svp.shared_layers=2"]),
    "S8": ("svp", ["method.settings.svp.shared_layers=8"]),
    "r4": ("svp", ["method.settings.svp.hidden=4"]),
    "r64": ("svp", ["method.settings.svp.hidden=64"]),
    "vpt_middle": ("vpt_deep", ["method.settings.vpt_deep.placement=middle"]),
    "vpt_suffix": ("vpt_deep", ["method.settings.vpt_deep.placement=suffix"]),
}


# Supplementary budget check (not part of the hour; run with --stages 12,13,14): the same
# configuration on the full training sets for 10 epochs (about 5x the images per run), seed 0.
LONG_OVERRIDES = ["data.max_train_samples=null", "train.epochs=10", "eval.every=10"]
LONG_METHODS = ["linear", "full", "vpt_deep", "lora", "svp"]
LONG_ABLATIONS = ["inner_only", "cross_only"]


def suite_yaml() -> str:
    from svp.models.vim_mini import mini_asset_path
    return mini_asset_path("mini_suite.yaml")


def tune_grid(path: Optional[str] = None) -> dict:
    """The tuned suite's grid file (``svp/assets/mini_suite_tune.yaml``) as
    ``{"tune": ["train.lr=1e-3,...", ...], "refit": bool, "jobs": int}``."""
    import yaml
    from svp.models.vim_mini import mini_asset_path
    path = path or mini_asset_path("mini_suite_tune.yaml")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    grid = doc.get("tune")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise SystemExit(f"{path}: 'tune' must map config keys to non-empty lists of values")
    return {"tune": [f"{k}={','.join(str(v) for v in vals)}" for k, vals in grid.items()],
            "refit": bool(doc.get("refit", False)), "jobs": int(doc.get("jobs", 1))}


def commands(out: str, svp_bin: str = "svp", tuned: bool = False, datasets: Optional[List[str]] = None,
             methods: Optional[List[str]] = None, seeds: str = "0,1,2") -> List[Tuple[str, List[str]]]:
    """The suite's sweeps in order. ``tuned``: each with the grid of
    ``mini_suite_tune.yaml`` (selection on the validation split). ``datasets`` /
    ``methods`` / ``seeds`` cut the suite down (a reduced check)."""
    cfg = suite_yaml()
    main = os.path.join(out, "main")
    base = [svp_bin, "sweep", "--suite", "mini", "-c", cfg]
    if tuned:
        g = tune_grid()
        for t in g["tune"]:
            base += ["--tune", t]
        base += (["--tune-refit"] if g["refit"] else []) + ["--jobs", str(g["jobs"])]
    main_methods = [m for m in METHODS if methods is None or m in methods]
    ds_main = ["--datasets", ",".join(datasets)] if datasets else []
    ab_ds = [d for d in ABLATION_DATASETS if datasets is None or d in datasets]
    first_seed = seeds.split(",")[0]
    cmds = [(f"main, seed {first_seed}", base + ["--methods", ",".join(main_methods), "--seeds", first_seed,
                                                 "--output", main] + ds_main)]
    for name, (method, ov) in ABLATIONS.items():
        if methods is not None and method not in methods or not ab_ds:
            continue
        cmds.append((f"ablation {name}, seed {first_seed}",
                     base + ["--methods", method, "--seeds", first_seed, "--datasets", ",".join(ab_ds),
                             "--output", os.path.join(out, "ablations", name)] + ov))
    if seeds != first_seed:
        cmds.append((f"main, seeds {seeds}", base + ["--methods", ",".join(main_methods), "--seeds", seeds,
                                                    "--output", main] + ds_main))
    if tuned:   # the budget check below is a supplement of the untuned suite
        return cmds
    long_base = base + ["--seeds", "0", "--datasets", ",".join(ABLATION_DATASETS)]
    cmds.append(("budget check (full train sets, 10 epochs), main methods",
                 long_base + ["--methods", ",".join(LONG_METHODS), "--output", os.path.join(out, "long", "main")]
                 + LONG_OVERRIDES))
    for name in LONG_ABLATIONS:
        method, ov = ABLATIONS[name]
        cmds.append((f"budget check, ablation {name}", long_base + ["--methods", method, "--output",
                                                                    os.path.join(out, "long", name)]
                     + LONG_OVERRIDES + ov))
    return cmds


def _sweep_name(rel: List[str]) -> str:
    return "main" if rel[0] == "main" else rel[1] if rel[0] == "ablations" else f"long/{rel[1]}"


def _collect_tuned(out: str) -> Tuple[Dict[str, List[dict]], Dict[str, List[dict]]]:
    """Final runs of the chosen settings (from each sweep's results.csv) and the
    selection records (tuning.json), per sweep folder."""
    import csv
    import json
    found: Dict[str, List[dict]] = {}
    cells: Dict[str, List[dict]] = {}
    for root, _dirs, files in os.walk(out):
        if "tuning.json" not in files:
            continue
        name = _sweep_name(os.path.relpath(root, out).split(os.sep))
        with open(os.path.join(root, "tuning.json")) as f:
            cells[name] = json.load(f)["cells"]
        with open(os.path.join(root, "results.csv")) as f:
            for row in csv.DictReader(f):
                done = os.path.join(row["run_dir"], "results.json") if row["run_dir"] else ""
                if row["role"] == "final" and done and os.path.isfile(done):
                    with open(done) as g:
                        found.setdefault(name, []).append(json.load(g))
    return found, cells


def _collect(out: str) -> Dict[str, List[dict]]:
    """Finished runs from every sweep folder (results.json of each run, so a sweep cut
    off mid-way still counts its finished runs)."""
    import json
    found: Dict[str, List[dict]] = {}
    for root, _dirs, files in os.walk(out):
        if "results.json" in files:
            with open(os.path.join(root, "results.json")) as f:
                res = json.load(f)
            found.setdefault(_sweep_name(os.path.relpath(root, out).split(os.sep)), []).append(res)
    return found


def _ms(vals: List[float]) -> str:
    from ..engine.select import mean_std
    return mean_std(vals, 1) + ("" if len(vals) != 1 else " (1 seed)")


def selection_report(cells: Dict[str, List[dict]]) -> List[str]:
    """The chosen setting per method (or ablation variant) and dataset, with the
    validation top-1 that chose it."""
    lines = ["Chosen on the validation split (seed 0 grid; validation top-1 % in brackets):", ""]
    datasets = sorted({c["dataset"] for cs in cells.values() for c in cs})
    lines += ["| Sweep / method | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for name, cs in cells.items():
        for m in dict.fromkeys(c["method"] for c in cs):
            by = {c["dataset"]: c for c in cs if c["method"] == m}
            cell_txt = []
            for d in datasets:
                c = by.get(d)
                if c is None or not c["chosen"]:
                    cell_txt.append("-")
                    continue
                val = next(g["val_top1"] for g in c["grid"] if g["label"] == c["chosen_label"])
                cell_txt.append(f"{', '.join(f'{v}' for v in c['chosen'].values())} ({val:.1f})")
            lines.append(f"| {name} / {m} | " + " | ".join(cell_txt) + " |")
    lines.append("")
    return lines


def report(out: str) -> str:
    import svp.data as data
    tuned = any("tuning.json" in files for _r, _d, files in os.walk(out))
    cells: Dict[str, List[dict]] = {}
    if tuned:
        found, cells = _collect_tuned(out)
    else:
        found = _collect(out)
    lines: List[str] = selection_report(cells) if tuned else []
    datasets = [d for d in data.list_datasets("embedded")
                if not tuned or any(r["dataset"] == d for rs in found.values() for r in rs)]
    main = found.get("main", [])
    acc: Dict[Tuple[str, str], Dict[int, float]] = {}
    params: Dict[str, Dict[str, Tuple[int, int]]] = {}
    for r in main:
        if r.get("final", {}).get("test_top1") is None:
            continue
        acc.setdefault((r["method"], r["dataset"]), {})[int(r["seed"])] = float(r["final"]["test_top1"])
        params.setdefault(r["method"], {})[r["dataset"]] = (r["trainable_params"], r["trainable_params_without_head"])
    seeds = sorted({s for v in acc.values() for s in v})
    lines.append(("Tuned protocol (setting chosen on the validation split). " if tuned else
                  "Shared learning rate (mini_suite.yaml), not tuned. ") +
                 f"Test top-1 (%) after the last epoch, mean ± std over seeds {seeds}. "
                 f"Mean: per seed over the datasets, then mean ± std over seeds (seeds with every dataset).")
    lines.append("")
    hdr = ["Method"] + datasets + ["Mean", "Trainable (no head)", "% of full FT"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
    full_p = statistics.fmean(v[1] for v in params.get("full", {}).values()) if params.get("full") else None
    means: Dict[str, Optional[float]] = {}
    for m in METHODS:
        cells = [m]
        for d in datasets:
            cells.append(_ms(list(acc.get((m, d), {}).values())))
        per_seed = []
        for s in seeds:
            vals = [acc.get((m, d), {}).get(s) for d in datasets]
            if all(v is not None for v in vals):
                per_seed.append(statistics.fmean(vals))
        cells.append(_ms(per_seed))
        means[m] = statistics.fmean(per_seed) if per_seed else None
        p = params.get(m)
        pn = statistics.fmean(v[1] for v in p.values()) if p else None
        cells.append(f"{pn:,.0f}" if pn is not None else "-")
        cells.append(f"{100 * pn / full_p:.2f}%" if pn is not None and full_p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    # ablations: mean over the ablation datasets, seed 0, next to the main-table runs
    lines.append(f"Ablations (seed 0; test top-1 %, per dataset and mean over {', '.join(ABLATION_DATASETS)}):")
    lines.append("")
    hdr = ["Variant"] + ABLATION_DATASETS + ["Mean", "Trainable (no head)"]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")

    def ab_row(label, runs):
        by = {r["dataset"]: r for r in runs if int(r["seed"]) == 0 and r.get("final", {}).get("test_top1") is not None}
        vals = [by[d]["final"]["test_top1"] if d in by else None for d in ABLATION_DATASETS]
        mean = statistics.fmean(vals) if all(v is not None for v in vals) else None
        pn = [by[d]["trainable_params_without_head"] for d in ABLATION_DATASETS if d in by]
        lines.append("| " + " | ".join([label] + [f"{v:.1f}" if v is not None else "-" for v in vals]
                                       + [f"{mean:.1f}" if mean is not None else "-",
                                          f"{statistics.fmean(pn):,.0f}" if pn else "-"]) + " |")

    svp_main = [r for r in main if r["method"] == "svp"]
    vpt_main = [r for r in main if r["method"] == "vpt_deep"]
    for label, key in (("SVP Inner + Cross (main: S=4, r=16)", None), ("Inner only", "inner_only"),
                       ("Cross only", "cross_only"), ("S=1", "S1"), ("S=2", "S2"), ("S=8", "S8"),
                       ("r=4", "r4"), ("r=64", "r64"), ("VPT-deep prefix (main)", "vpt"),
                       ("VPT-deep middle", "vpt_middle"), ("VPT-deep suffix", "vpt_suffix")):
        runs = svp_main if key is None else vpt_main if key == "vpt" else found.get(key, [])
        ab_row(label, runs)
    lines.append("")
    long_main = found.get("long/main", [])
    if long_main:
        lines.append("Budget check (seed 0; full training sets, 10 epochs; test top-1 %):")
        lines.append("")
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
        for m in LONG_METHODS:
            ab_row(m, [r for r in long_main if r["method"] == m])
        for name in LONG_ABLATIONS:
            ab_row(f"svp {name}", found.get(f"long/{name}", []))
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m svp.pretrain.mini_suite", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("sweeps", "mini"), type=user_path)
    ap.add_argument("--dry-run", action="store_true", help="print the svp sweep commands only")
    ap.add_argument("--report", action="store_true", help="print the Markdown tables of the finished runs")
    ap.add_argument("--stages", default=None, help="stages to run, e.g. 1-11 or 12,13 (1-based; default all)")
    ap.add_argument("--tuned", action="store_true",
                    help="the tuned protocol: every sweep selects its setting on the validation split with the "
                         "grid of svp/assets/mini_suite_tune.yaml (one thread per run, runs at a time as it says)")
    ap.add_argument("--datasets", default=None, help="comma-separated: only these datasets (a reduced check)")
    ap.add_argument("--methods", default=None, help="comma-separated: only these methods (a reduced check)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.out))
        return 0
    # (on Windows the console script is svp.exe: "svp" beside the interpreter never existed there)
    svp_bin = os.path.join(os.path.dirname(sys.executable), "svp.exe" if os.name == "nt" else "svp")
    if not os.path.exists(svp_bin):
        svp_bin = "svp"
    split = (lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None)
    cmds = commands(args.out, svp_bin, args.tuned, split(args.datasets), split(args.methods), args.seeds)
    env = dict(os.environ)
    if args.tuned:   # one thread per run; the sweep runs `jobs` of them at a time
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("NUMBA_NUM_THREADS", "1")
    wanted = set(range(1, len(cmds) + 1))
    if args.stages:
        wanted = set()
        for part in args.stages.split(","):
            lo, _, hi = part.partition("-")
            wanted.update(range(int(lo), int(hi or lo) + 1))
    rc = 0
    for i, (title, cmd) in enumerate(cmds, 1):
        if i not in wanted:
            continue
        print(f"== stage {i}/{len(cmds)}: {title}\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        if not args.dry_run:
            rc = _run_stage(cmd, env) or rc
    return rc


# Windows: Popen.send_signal takes no SIGINT (ValueError "Unsupported signal"), and the console
# delivers a Ctrl-C to every process attached to it, the stage's command included (read from
# CPython's subprocess.py; no Windows machine here)
FORWARD_SIGINT = os.name != "nt"


def _run_stage(cmd, env) -> int:
    """One stage's command, to its end. A Ctrl-C ends the stage as the command ends on it: it
    finishes its step and saves (subprocess.call killed it 0.25 s after the signal, losing that);
    it is passed on to the command too, for a signal sent to this process alone (a copy the
    command got from the terminal as well counts as one: svp.engine.signals). A second one kills
    the command. The suite stops there."""
    child = subprocess.Popen(cmd, env=env)
    try:
        return child.wait()
    except KeyboardInterrupt:
        if FORWARD_SIGINT:
            child.send_signal(signal.SIGINT)
        try:
            code = child.wait()
        except KeyboardInterrupt:
            child.kill()
            child.wait()
            raise
        raise SystemExit(code or 130) from None


if __name__ == "__main__":
    sys.exit(main())
