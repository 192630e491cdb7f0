"""``svp sweep``: a suite of datasets x methods x seeds, then ``results.csv`` and a
Markdown table.

Suites: ``mini`` (the embedded offline datasets), ``vtab`` (the 19 VTAB-1k tasks, with
the Natural / Specialized / Structured group means), ``hta`` (the 10 HTA datasets).
Each run gets its own run folder ``<output>/<dataset>/<method>/seed<k>``; a finished
run (``results.json`` present) is reused and an interrupted one resumed, so a sweep
can be restarted at will.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import checkpoint as ck
from . import config as C
from .select import mean_std

log = logging.getLogger("svp.engine.sweep")

VTAB_GROUP_TITLES = {"vtab-natural": "Natural", "vtab-specialized": "Specialized", "vtab-structured": "Structured"}


def suite_datasets(suite: str) -> List[Tuple[str, str]]:
    """(dataset name, group) pairs of a suite, in the suite's column order."""
    import svp.data as data

    if suite == "mini":
        names = data.list_datasets("embedded")
        return [(n, "mini") for n in names]
    if suite == "vtab":
        return [(n, data.dataset_info(n).group) for n in data.list_datasets() if n.startswith("vtab/")]
    if suite == "hta":
        return [(n, "hta") for n in data.list_datasets("hta")]
    raise C.ConfigError(f"unknown suite {suite!r}; expected mini, vtab or hta")


def _slug(name: str) -> str:
    return name.replace("/", "_")


def run_one(dataset: str, method: str, seed: int, output: str, config_files: Sequence[str],
            overrides: Sequence[str]) -> Dict[str, Any]:
    from .loop import train

    run_name = os.path.join(_slug(dataset), method, f"seed{seed}")
    run_dir = os.path.join(output, run_name)
    done = os.path.join(run_dir, "results.json")
    if os.path.isfile(done):
        with open(done) as f:
            res = json.load(f)
        res["status"] = "reused"
        return res
    if os.path.isfile(os.path.join(run_dir, ck.RESUME_FILE)):
        res = train(resume=run_dir)
        res["status"] = "resumed"
        return res
    # the sweep decides dataset/method/seed/run folder, whatever the config files say; as
    # overrides they also pick the right dataset preset and method file
    forced = [f"data.dataset={json.dumps(dataset)}", f"method.name={json.dumps(method)}",
              f"train.seed={int(seed)}", f"run.output={json.dumps(output)}", f"run.name={json.dumps(run_name)}"]
    cfg = C.resolve(config_files, list(overrides) + forced)
    res = train(cfg)
    res["status"] = "ok"
    return res


CSV_FIELDS = ["suite", "group", "dataset", "method", "seed", "status", "selection", "val_selected_epoch",
              "val_selected_val_top1", "val_selected_test_top1", "final_test_top1", "official_best_test_top1",
              "trainable_params", "trainable_params_without_head", "adapter_bytes", "epochs_run",
              "train_seconds", "run_dir", "error"]


def row_from_results(suite, group, dataset, method, seed, res: Optional[dict], error: str = "") -> Dict[str, Any]:
    row = {k: "" for k in CSV_FIELDS}
    row.update({"suite": suite, "group": group, "dataset": dataset, "method": method, "seed": seed})
    if res is None:
        row.update({"status": "failed", "error": error})
        return row
    sel, fin = res.get("val_selected", {}), res.get("final", {})
    obt = res.get("official_best_test_top1")
    row.update({"status": res.get("status", "ok"), "selection": res.get("selection", ""),
                "val_selected_epoch": sel.get("epoch"),
                "val_selected_val_top1": sel.get("val_top1"), "val_selected_test_top1": sel.get("test_top1"),
                "final_test_top1": fin.get("test_top1"), "official_best_test_top1": obt["value"] if obt else "",
                "trainable_params": res.get("trainable_params"),
                "trainable_params_without_head": res.get("trainable_params_without_head"),
                "adapter_bytes": res.get("adapter_bytes"), "epochs_run": res.get("epochs_run"),
                "train_seconds": res.get("train_seconds"), "run_dir": res.get("run_dir")})
    return row


def _num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


_mean_std = mean_std


def _fmt_params(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.3f}M" if v >= 1e5 else f"{int(round(v)):,}"


def _fmt_bytes(v: Optional[float]) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024


def markdown_table(suite: str, rows: List[Dict[str, Any]], datasets: List[Tuple[str, str]], methods: List[str],
                   seeds: List[int], metric: str = "val_selected_test_top1") -> str:
    """Per-dataset accuracy (mean ± std over seeds), averages, parameters, adapter size."""
    titles = {"val_selected_test_top1": "test top-1 (%) of the epoch selected on the validation split",
              "final_test_top1": "test top-1 (%) after the last epoch",
              "official_best_test_top1": "OFFICIAL PROTOCOL: best test top-1 (%) over epochs (selected on test)"}
    if metric == "val_selected_test_top1" and rows and all(
            str(r.get("selection", "")).startswith("no validation") for r in rows if r.get("status") != "failed"):
        titles[metric] = "test top-1 (%) after the last epoch (no validation split, so no selection)"
    by = {}
    for r in rows:
        v = _num(r.get(metric))
        if v is not None:
            by.setdefault((r["method"], r["dataset"]), {})[int(r["seed"])] = v
    groups: Dict[str, List[str]] = {}
    for d, g in datasets:
        groups.setdefault(g, []).append(d)
    cols = [d for d, _ in datasets]
    short = {d: d.split("/")[-1] for d in cols}
    avg_cols: List[Tuple[str, Any]] = []
    if suite == "vtab":
        for g in ("vtab-natural", "vtab-specialized", "vtab-structured"):
            if g in groups:
                avg_cols.append((f"{VTAB_GROUP_TITLES[g]} mean", ("group", g)))
        avg_cols.append((f"Mean ({len(cols)} tasks)", ("all", None)))
        avg_cols.append(("Mean of group means", ("groups", None)))
    else:
        avg_cols.append((f"Mean ({len(cols)} datasets)", ("all", None)))
    header = (["Method"] + [short[d] for d in cols] + [a for a, _ in avg_cols]
              + ["Trainable params (with head)", "Trainable params (without head)", "Adapter size"])
    out = [f"**{titles.get(metric, metric)}**; mean ± std over seeds {', '.join(map(str, seeds))}; "
           f"averages are taken per seed over the datasets, then mean ± std over seeds "
           f"(only seeds with every dataset). Parameters and adapter size: mean over datasets.", "",
           "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for m in methods:
        cells = [m]
        for d in cols:
            cells.append(_mean_std(list(by.get((m, d), {}).values())))
        for _, (kind, g) in avg_cols:
            per_seed = []
            for s in seeds:
                vals = {d: by.get((m, d), {}).get(s) for d in cols}
                if any(v is None for v in vals.values()):
                    continue
                if kind == "group":
                    per_seed.append(statistics.fmean(vals[d] for d in groups[g]))
                elif kind == "all":
                    per_seed.append(statistics.fmean(vals.values()))
                else:
                    gm = [statistics.fmean(vals[d] for d in groups[gg]) for gg in
                          ("vtab-natural", "vtab-specialized", "vtab-structured") if gg in groups]
                    per_seed.append(statistics.fmean(gm))
            cells.append(_mean_std(per_seed))
        mrows = [r for r in rows if r["method"] == m and r["status"] != "failed"]
        for key, fmt in (("trainable_params", _fmt_params), ("trainable_params_without_head", _fmt_params),
                         ("adapter_bytes", _fmt_bytes)):
            per_d = {}
            for r in mrows:
                v = _num(r.get(key))
                if v is not None:
                    per_d.setdefault(r["dataset"], v)
            cells.append(fmt(statistics.fmean(per_d.values())) if per_d else "-")
        out.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        out += ["", f"{len(failed)} run(s) failed: " + "; ".join(
            f"{r['dataset']}/{r['method']}/seed{r['seed']}" for r in failed)]
    return "\n".join(out) + "\n"


def write_outputs(output: str, suite: str, rows, datasets, methods, seeds) -> Tuple[str, str]:
    official = any(r.get("official_best_test_top1") not in ("", None) for r in rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    csv_path = os.path.join(output, "results.csv")
    ck.atomic_write_text(csv_path, buf.getvalue())
    md = [f"# svp sweep: suite `{suite}`", "",
          markdown_table(suite, rows, datasets, methods, seeds, "val_selected_test_top1"), "",
          markdown_table(suite, rows, datasets, methods, seeds, "final_test_top1")]
    if official:
        md += ["", markdown_table(suite, rows, datasets, methods, seeds, "official_best_test_top1")]
    md_path = os.path.join(output, "results.md")
    ck.atomic_write_text(md_path, "\n".join(md))
    return csv_path, md_path


def sweep(suite: str, methods: Sequence[str], seeds: Sequence[int], output: str,
          datasets: Optional[Sequence[str]] = None, config_files: Sequence[str] = (),
          overrides: Sequence[str] = (), fail_fast: bool = False) -> Dict[str, Any]:
    all_ds = suite_datasets(suite)
    if datasets:
        import svp.data as data
        wanted = []
        for d in datasets:
            name = data.dataset_info(d).name
            match = [p for p in all_ds if p[0] == name]
            if not match:
                raise C.ConfigError(f"dataset {d!r} is not in suite {suite!r} "
                                    f"({', '.join(n for n, _ in all_ds)})")
            wanted += match
        all_ds = wanted
    os.makedirs(output, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    total = len(all_ds) * len(methods) * len(seeds)
    k = 0
    for ds, group in all_ds:
        for m in methods:
            for s in seeds:
                k += 1
                log.info("[%d/%d] %s / %s / seed %d", k, total, ds, m, s)
                try:
                    res = run_one(ds, m, int(s), output, config_files, overrides)
                    rows.append(row_from_results(suite, group, ds, m, s, res))
                except Exception as e:  # keep going; the row says what failed
                    if fail_fast:
                        raise
                    log.error("run %s/%s/seed%d failed: %s", ds, m, s, e)
                    log.debug("%s", traceback.format_exc())
                    rows.append(row_from_results(suite, group, ds, m, s, None, f"{type(e).__name__}: {e}"))
                write_outputs(output, suite, rows, all_ds, list(methods), [int(x) for x in seeds])
    csv_path, md_path = write_outputs(output, suite, rows, all_ds, list(methods), [int(x) for x in seeds])
    return {"csv": csv_path, "markdown": md_path, "rows": rows}
