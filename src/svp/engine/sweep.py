"""``svp sweep``: a suite of datasets x methods x seeds, then ``results.csv`` and a
Markdown table.

Suites: ``mini`` (the embedded offline datasets, on the bundled mini Vim: the bundled
``svp/assets/mini_suite.yaml`` is its base configuration, under the user's ``-c`` files
and overrides), ``vtab`` (the 19 VTAB-1k tasks, with the Natural / Specialized /
Structured group means), ``hta`` (the 10 HTA datasets).
Each run gets its own run folder ``<output>/<dataset>/<method>/seed<k>``; a finished
run (``results.json`` present) is reused and an interrupted one resumed, so a sweep
can be restarted at will. Only when the folder's ``config.yaml`` matches the run the
sweep asks for now: a folder made with another configuration is refused (a failed row
naming the differing keys; :func:`svp.engine.tune.check_same_config`).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import statistics
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import ResumeError
from ..io import atomic_write_group, bytes_writer, json_text, mkdir_error
from . import config as C
from .select import mean_std
from .tune import load_or_resume

log = logging.getLogger("svp.engine.sweep")

HTA_ORDER = ("hta/cub200", "hta/cifar100", "hta/cifar10", "hta/dtd", "hta/dogs", "hta/gtsrb", "hta/nabirds",
             "hta/svhn", "hta/flowers", "hta/food101")
VTAB_GROUP_TITLES = {"vtab-natural": "Natural", "vtab-specialized": "Specialized", "vtab-structured": "Structured"}


def suite_datasets(suite: str) -> List[Tuple[str, str]]:
    """(dataset name, group) pairs of a suite, in the suite's column order."""
    import svp.data as data

    if suite == "mini":
        names = data.list_datasets("embedded")
        return [(n, "mini") for n in names]
    if suite == "vtab":
        return [(n, data.dataset_info(n).group) for n in data.list_datasets() if n.startswith("vtab/")]
    if suite == "hta":   # the official HTA script's order (the paper's own is not known)
        names = data.list_datasets("hta")
        return [(n, "hta") for n in sorted(names, key=lambda n: (HTA_ORDER.index(n) if n in HTA_ORDER
                                                                  else len(HTA_ORDER)))]
    if suite == "any":   # every registered dataset: one added outside the suites, or several suites' ones
        return [(n, data.dataset_info(n).group) for n in data.list_datasets()]
    raise C.ConfigError(f"unknown suite {suite!r}; expected mini, vtab, hta or any")


MINI_SUITE_ASSET = "mini_suite.yaml"


def suite_base(suite: str, config_files: Sequence[str] = (), overrides: Sequence[str] = ()) -> Optional[dict]:
    """The suite's own base configuration, merged under the user's ``-c`` files and
    overrides (None: the engine's defaults). ``mini``: the bundled ``mini_suite.yaml``
    (the bundled mini Vim and the suite's budget), so ``svp sweep --suite mini`` runs as
    documented without a config file; giving the file again with ``-c`` changes nothing."""
    if suite != "mini":
        return None
    from svp.models.vim_mini import mini_asset_path
    path = mini_asset_path(MINI_SUITE_ASSET)
    base = C.load_yaml(path)
    if not isinstance(base, dict) or not isinstance(base.get("model"), dict):
        raise C.ConfigError(f"{path}: expected the mini suite's configuration (a mapping with a model "
                            f"section); the package install is incomplete or the file was edited")
    base = {sec: dict(body) if isinstance(body, dict) else body for sec, body in base.items()}
    # the file's model.pretrained=true belongs to its backbone (the bundled mini Vim, whose
    # weights are bundled): on another --model, or with model.random_init, it would turn the
    # user's choice into a download of timm's weights, which take precedence (svp.build); beside
    # a --checkpoint it is unused, and every run warned of it (retest 82)
    try:
        probe = C.resolve(config_files, overrides, base=base)
    except C.ConfigError:
        return base  # a bad file or override: check_configs / the tuned sweep's probe reports it
    if (probe["model"]["name"] != base["model"].get("name") or probe["model"]["random_init"]
            or probe["model"]["checkpoint"]):
        base["model"].pop("pretrained", None)
    return base


def _slug(name: str) -> str:
    return name.replace("/", "_")


# the keys run_config sets for every run, whatever an override says (train.seed is not among them:
# an override's seed is the base the replicates count from)
_FORCED = ("data.dataset", "method.name", "run.output", "run.name")


def _forced(override) -> bool:
    return str(override).split("=", 1)[0].strip() in _FORCED


def sweep_settings(config_files, overrides) -> List[str]:
    """What results.md says every run was given: the config files and the overrides the sweep
    does not replace (run.name=foo was listed, its runs in the sweep's own folders: retest 94)."""
    return [*(config_files or ()), *(o for o in overrides or () if not _forced(o))]


def run_config(dataset: str, method: str, seed: int, output: str, run_name: str, config_files: Sequence[str],
               overrides: Sequence[str], base: Optional[dict] = None) -> dict:
    # the sweep decides dataset/method/seed/run folder, whatever the config files say; as
    # overrides they also pick the right dataset preset and method file. base: the suite's
    # own configuration (suite_base), under the files and overrides.
    # `seed` is the replicate k: the run's train.seed is the seed the dataset's configuration
    # gives plus k (0 + k, and 3407 + k for DTD, whose official recipe pins 3407: a sweep ran
    # DTD at seed 0 while `svp train --dataset hta/dtd` used 3407)
    forced = [f"data.dataset={C.quoted(dataset)}", f"method.name={C.quoted(method)}",
              f"run.output={C.quoted(output)}", f"run.name={C.quoted(run_name)}"]
    own_seed = C.resolve(config_files, list(overrides) + forced, base=base)["train"]["seed"]
    return C.absolute_paths(C.resolve(config_files, list(overrides) + forced + [f"train.seed={int(own_seed) + int(seed)}"],
                                      base=base))


def run_folder_name(dataset: str, method: str, seed: int) -> str:
    """A plain sweep's run folder, under its output folder."""
    return os.path.join(_slug(dataset), method, f"seed{seed}")


def run_one(dataset: str, method: str, seed: int, output: str, config_files: Sequence[str],
            overrides: Sequence[str], base: Optional[dict] = None) -> Dict[str, Any]:
    from .loop import train

    run_name = run_folder_name(dataset, method, seed)
    cfg = run_config(dataset, method, seed, output, run_name, config_files, overrides, base)
    # a finished or interrupted run is taken over only when it was made with this configuration
    res = load_or_resume(os.path.join(output, run_name), cfg)
    if res is not None:
        return res
    res = train(cfg)
    res["status"] = "ok"
    return res


CSV_FIELDS = ["suite", "group", "dataset", "method", "seed", "status", "selection", "val_selected_epoch",
              "val_selected_val_top1", "val_selected_test_top1", "final_test_top1", "official_best_test_top1",
              "trainable_params", "trainable_params_without_head", "adapter_bytes", "epochs_run",
              "train_seconds", "run_dir", "error", "role", "protocol", "setting"]


def row_from_results(suite, group, dataset, method, seed, res: Optional[dict], error: str = "",
                     role: str = "run", protocol: str = "", setting: str = "",
                     run_dir: str = "") -> Dict[str, Any]:
    """One results.csv row. role: ``run`` (plain sweep), ``grid`` (a tuning grid point,
    selection only) or ``final`` (the selected setting, the reported number). ``run_dir``: the
    run's folder, as the sweep found it (a finished run's results.json names the folder it was
    trained in, which a sweep folder moved since no longer is); else the one results.json names."""
    row = {k: "" for k in CSV_FIELDS}
    row.update({"suite": suite, "group": group, "dataset": dataset, "method": method, "seed": seed,
                "role": role, "protocol": protocol, "setting": setting})
    if res is None:
        row.update({"status": "failed", "error": error, "run_dir": os.path.abspath(run_dir) if run_dir else ""})
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
                "train_seconds": res.get("train_seconds"),
                "run_dir": os.path.abspath(run_dir) if run_dir else res.get("run_dir")})
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
    # (exact below a million: 0.334M with and without the head hid the mini Vim's 650-parameter
    # head; a mean over datasets rounds half up, not to even: review 62)
    return f"{v / 1e6:.3f}M" if v >= 1e6 else f"{math.floor(v + 0.5):,}"


def _fmt_bytes(v: Optional[float]) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024


_MD_SPECIAL = re.compile(r"([\\`*|<>\[\]~&$])|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def md_text(value: Any) -> str:
    """``value`` as literal Markdown text, in a table cell or a sentence: a '|' in a --tune value
    split its cell in two (the header then had more columns than the rows), a backquote or '*'
    opened code or emphasis, '&amp;' read as an entity, '$' as math (GitHub). Intraword underscores
    (oxford_flowers102) are left as they are."""
    text = " ".join(str(value).split())   # (a newline would end the table row)
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def markdown_table(suite: str, rows: List[Dict[str, Any]], datasets: List[Tuple[str, str]], methods: List[str],
                   seeds: List[int], metric: str = "val_selected_test_top1") -> str:
    """Per-dataset accuracy (mean ± std over seeds), averages, parameters, adapter size."""
    titles = {"val_selected_test_top1": "test top-1 (%) of the epoch selected on the validation split",
              "final_test_top1": "test top-1 (%) after the last epoch",
              "official_best_test_top1": "OFFICIAL PROTOCOL: best test top-1 (%) over epochs (selected on test)"}
    live = [r for r in rows if r.get("status") != "failed"]

    def last_epoch(r):   # a run without a validation split: its "selected" epoch is the last
        return str(r.get("selection", "")).startswith("no validation")
    # (with every run failed, no run said there was no validation split: review 62)
    all_last = metric == "val_selected_test_top1" and bool(live) and all(last_epoch(r) for r in live)
    if all_last:
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
    # the suite's prefix dropped (vtab/dtd -> dtd) unless two columns would then share a name
    # (--suite any: vtab/dtd beside hta/dtd were two "dtd" columns, review)
    tails = [d.split("/")[-1] for d in cols]
    short = {d: md_text(t if tails.count(t) == 1 else d) for d, t in zip(cols, tails)}
    # columns whose runs had no validation split under a title that says "selected on the
    # validation split": marked (a whole --suite hta sweep's CIFAR columns were last-epoch numbers)
    marked = False
    if metric == "val_selected_test_top1" and not all_last:
        for d in cols:
            runs = [r for r in live if r.get("dataset") == d]
            if runs and all(last_epoch(r) for r in runs):
                marked = True
                short[d] += " †"
    avg_cols: List[Tuple[str, Any]] = []
    partial = ""
    if suite == "vtab":
        # a sweep over some of the tasks: each average says how much of the benchmark it covers
        # ("Natural mean" over one of its seven tasks read as the benchmark's number: review 62)
        whole: Dict[str, int] = {}
        for _, g in suite_datasets("vtab"):
            whole[g] = whole.get(g, 0) + 1
        present = [g for g in ("vtab-natural", "vtab-specialized", "vtab-structured") if g in groups]
        for g in present:
            of = "" if len(groups[g]) == whole[g] else f" ({len(groups[g])} of {whole[g]} tasks)"
            avg_cols.append((f"{VTAB_GROUP_TITLES[g]} mean{of}", ("group", g)))
        n_all = sum(whole.values())
        avg_cols.append((f"Mean ({len(cols)} tasks)" if len(cols) == n_all else f"Mean ({len(cols)} of {n_all} tasks)",
                         ("all", None)))
        avg_cols.append(("Mean of group means" if len(present) == len(whole)
                         else f"Mean of {len(present)} of {len(whole)} group means", ("groups", None)))
        if len(cols) < n_all:
            partial = (f" Partial benchmark: {len(cols)} of VTAB-1k's {n_all} tasks, so these averages are "
                       f"not the benchmark's.")
    else:
        avg_cols.append((f"Mean ({len(cols)} dataset{'' if len(cols) == 1 else 's'})", ("all", None)))
    header = (["Method"] + [short[d] for d in cols] + [a for a, _ in avg_cols]
              + ["Trainable params (with head)", "Trainable params (without head)", "Adapter size"])
    spread = (f"mean ± sample std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else
              f"one seed ({seeds[0]}), so no std" if seeds else "no seeds")
    averages = ("averages are taken per seed over the datasets, then mean ± std over seeds (only seeds "
                "with every dataset); (n=k): a cell over k of the seeds, the others failed or missing"
                if len(seeds) > 1 else "averages are taken over the datasets")
    out = [f"**{titles.get(metric, metric)}**; {spread}; {averages}. Parameters and adapter size: mean "
           f"over datasets ((k of D datasets): over the k whose runs finished)." + partial
           + (" †: no validation split, so the last epoch's test top-1 (no selection)." if marked else ""), "",
           "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    def cell(values: List[float]) -> str:
        # a cell over fewer seeds than the heading's says so (it read as a whole one: QA 16d)
        return _mean_std(values) + (f" (n={len(values)})" if values and len(values) < len(seeds) else "")

    for m in methods:
        cells = [md_text(m)]
        for d in cols:
            cells.append(cell(list(by.get((m, d), {}).values())))
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
            cells.append(cell(per_seed))
        mrows = [r for r in rows if r["method"] == m and r["status"] != "failed"]
        for key, fmt in (("trainable_params", _fmt_params), ("trainable_params_without_head", _fmt_params),
                         ("adapter_bytes", _fmt_bytes)):
            per_d = {}
            for r in mrows:
                v = _num(r.get(key))
                if v is not None:
                    per_d.setdefault(r["dataset"], v)
            # (averaged over the datasets whose runs finished: said, where that is not all of them)
            cells.append(fmt(statistics.fmean(per_d.values())) + ("" if len(per_d) == len(cols) else
                                                                   f" ({len(per_d)} of {len(cols)} datasets)")
                         if per_d else "-")
        out.append("| " + " | ".join(cells) + " |")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        out += ["", f"{len(failed)} run(s) failed: " + "; ".join(
            md_text(f"{r['dataset']}/{r['method']}/seed{r['seed']}") for r in failed)]
    return "\n".join(out) + "\n"


def selection_table(tuning: Dict[str, Any]) -> str:
    """Per method and dataset: the validation top-1 of every grid point, the choice."""
    from .tune import PROTOCOL_TITLES
    labels: List[str] = []   # (grid order; written through md_text)
    for cell in tuning["cells"]:
        for g in cell["grid"]:
            if g["label"] not in labels:
                labels.append(g["label"])
    loss = any(cell.get("scored_by") == "val_loss" for cell in tuning["cells"])
    what, best = (("validation loss", "the lowest validation loss") if loss else
                  ("validation top-1 (%)", "the highest validation top-1"))
    out = [f"**Selection** ({PROTOCOL_TITLES[tuning['protocol']]}): {what} of each grid point, "
           f"trained with seed {tuning['grid_seed']} on the training split; the chosen point is in bold "
           f"({best}; a tie goes to the first in grid order). Test accuracy is not "
           f"used for the choice.", "",
           "| Method | Dataset | " + " | ".join(map(md_text, labels)) + " | Chosen |",
           "|---|---|" + "---:|" * len(labels) + "---|"]
    for cell in tuning["cells"]:
        by = {g["label"]: g for g in cell["grid"]}
        cells = []
        for lab in labels:
            g = by.get(lab)
            key = "val_loss" if cell.get("scored_by") == "val_loss" else "val_top1"
            v = "-" if g is None else ("failed" if g.get(key) is None else
                                       f"{g[key]:.4f}" if key == "val_loss" else f"{g[key]:.2f}")
            cells.append(f"**{v}**" if g is not None and lab == cell["chosen_label"] else v)
        out.append(f"| {md_text(cell['method'])} | {md_text(cell['dataset'])} | " + " | ".join(cells)
                   + f" | {md_text(cell['chosen_label']) if cell['chosen_label'] else 'none (all failed)'} |")
    return "\n".join(out) + "\n"


def write_outputs(output: str, suite: str, rows, datasets, methods, seeds,
                  tuning: Optional[Dict[str, Any]] = None, settings: Sequence[str] = ()) -> Tuple[str, str]:
    """results.csv and results.md (and tuning.json); ``settings``: the config files and overrides
    every run was given, named under the heading (a few-shot table read as a full-data one)."""
    try:
        return _write_outputs(output, suite, rows, datasets, methods, seeds, tuning, settings)
    except OSError as e:   # a full disk: one line, not a traceback; every file is whole or as before
        raise C.ConfigError(f"{output}: cannot write the sweep's results ({e.strerror or e}"
                            f"{': ' + e.filename if isinstance(e.filename, str) else ''}); its finished runs "
                            f"are kept: the same svp sweep, run again once it can write there, reuses them "
                            f"and writes the tables") from None


def write_outputs_meanwhile(*args) -> None:
    """The tables so far, for a look while the sweep goes on: one that cannot be written (a
    results.csv open in Excel, which Windows refuses to replace; a full disk) stopped the sweep
    there, and the runs after it never started (review45). Said; the last write still counts."""
    try:
        write_outputs(*args)
    except C.ConfigError as e:
        log.warning("%s; the sweep goes on and writes them after its last run", str(e).split("; ")[0])


FAILED_STEM = "results.failed"


def _keeps_earlier_tables(output: str, rows) -> bool:
    """Whether this call's tables would replace an earlier call's that hold finished runs with
    failures alone (a sweep run again with another configuration, every run folder refused: the
    tables of the runs the folders hold were overwritten by rows saying "failed": retest 91)."""
    if any(r.get("status") != "failed" for r in rows):
        return False
    try:
        with open(os.path.join(output, "results.csv"), newline="", encoding="utf-8") as f:
            return any(r.get("status") not in (None, "", "failed") for r in csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return False


def _write_outputs(output, suite, rows, datasets, methods, seeds, tuning, settings=()) -> Tuple[str, str]:
    stem = "results"
    if _keeps_earlier_tables(output, rows):
        stem = FAILED_STEM
        log.warning("no run of this sweep finished: %s keeps the earlier tables of the runs its folders hold "
                    "(results.csv, results.md); this sweep's rows are in %s.csv and %s.md", output, stem, stem)
    official = any(r.get("official_best_test_top1") not in ("", None) for r in rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    csv_path = os.path.join(output, f"{stem}.csv")
    # the three files as one group: each was whole, but a failure part-way (a full disk) left a
    # results.csv and tuning.json of this sweep beside the results.md of the last (review)
    texts = [(csv_path, buf.getvalue())]
    md = [f"# svp sweep: suite {md_text(suite)}", ""]
    if settings:
        md += ["Every run with: " + "; ".join(md_text(x) for x in settings) + ".", ""]
    if tuning is not None:
        from .tune import PROTOCOL_TITLES
        md += [f"Tuned protocol: {PROTOCOL_TITLES[tuning['protocol']]}; grid "
               + "; ".join(f"{md_text(k)} in {', '.join(map(md_text, v))}" for k, v in tuning["grid_spec"])
               + ". The tables report the chosen setting's final runs.", ""]
        texts.append((os.path.join(output, "tuning.json" if stem == "results" else f"{stem}.tuning.json"),
                      json_text(tuning, indent=1, default=str)))
    report_rows = [r for r in rows if r.get("role") != "grid"]
    md += [markdown_table(suite, report_rows, datasets, methods, seeds, "val_selected_test_top1"), "",
           markdown_table(suite, report_rows, datasets, methods, seeds, "final_test_top1")]
    if official:
        md += ["", markdown_table(suite, report_rows, datasets, methods, seeds, "official_best_test_top1")]
    if tuning is not None:
        md += ["", selection_table(tuning)]
    md_path = os.path.join(output, f"{stem}.md")
    texts.append((md_path, "\n".join(md)))
    atomic_write_group([(path, bytes_writer(text.encode("utf-8", "surrogateescape"))) for path, text in texts])
    if stem == "results":   # (an earlier call's failures, now out of date beside the tables)
        for name in (f"{FAILED_STEM}.csv", f"{FAILED_STEM}.md", f"{FAILED_STEM}.tuning.json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output, name))
    return csv_path, md_path


def _select_datasets(suite: str, datasets: Optional[Sequence[str]]) -> List[Tuple[str, str]]:
    all_ds = suite_datasets(suite)
    if suite == "any" and not datasets:
        raise C.ConfigError("--suite any sweeps the datasets --datasets names (any registered dataset, "
                            "see `svp data list`); give --datasets")
    if datasets:
        import svp.data as data
        wanted, given = [], {}
        in_suite = {n for n, _ in all_ds}
        for d in datasets:
            # a short name means the suite's dataset of that name (`--suite vtab --datasets dtd`
            # is vtab/dtd, not the HTA dataset the name alone stands for)
            name = f"{suite}/{d}" if f"{suite}/{d}" in in_suite else data.dataset_info(d).name
            match = [p for p in all_ds if p[0] == name]
            if not match:
                raise C.ConfigError(f"dataset {d!r} is not in suite {suite!r} "
                                    f"({', '.join(n for n, _ in all_ds)})")
            if name in given:   # one dataset twice: its runs twice, its column counted twice in the means
                raise C.ConfigError(f"--datasets names {name} twice ({given[name]!r} and {d!r})")
            given[name] = d
            wanted += match
        # in the suite's column order, whatever order --datasets lists them in (VTAB's columns
        # then stay grouped as their group means are: review 62); --suite any has no order but the one given
        all_ds = wanted if suite == "any" else [p for p in all_ds if p in wanted]
    return all_ds


def check_configs(all_ds, methods, seeds, output, config_files, overrides, base,
                  points: Sequence[Sequence[str]] = ((),), tuning: bool = False) -> None:
    """A bad method, key or value fails the sweep before any training, naming the run
    (a run folder made with another configuration still fails its run only). ``points``: the
    overrides of each --tune grid point (every point of every dataset and method is checked);
    ``tuning``: with the training and validation splits the grid runs get (tuned_sweep)."""
    from .progress import check_scalar_packages
    from .setup import check_method_fits
    if not seeds:
        raise C.ConfigError("--seeds: at least one seed is needed")
    fits_checked = set()
    for ds, _ in all_ds:
        for m in methods:
            for point in points:
                try:
                    # (resolving checks the method's name and settings; then the settings against the model)
                    cfg = run_config(ds, m, int(seeds[0]), output, "probe", config_files,
                                     list(overrides) + list(point), base)
                    # each replicate's train.seed is the configuration's plus its seed: the smallest
                    # and the largest checked too (seed 1 was refused after seed 0 had trained: QA 16a)
                    ends = {min(int(x) for x in seeds), max(int(x) for x in seeds)} - {int(seeds[0])}
                    for k in sorted(ends) if point is points[0] else ():
                        run_config(ds, m, k, output, "probe", config_files, list(overrides) + list(point), base)
                    if tuning:
                        _check_selection_splits(ds, m, int(seeds[0]), output, config_files,
                                                list(overrides) + list(point), base, cfg)
                    # the model and the method's settings decide whether they fit (a dataset only
                    # its head's size): one check per combination, not per dataset
                    key = C.dump({"model": cfg["model"], "method": cfg["method"], "data": cfg["data"]["img_size"]})
                    if key not in fits_checked:
                        check_method_fits(cfg)
                        fits_checked.add(key)
                    # (run.wandb without the package failed every run of the sweep, one by one: retest 97)
                    check_scalar_packages(cfg)
                except C.ConfigError as e:
                    where = f"{ds} / {m}" + (f" / {', '.join(point)}" if point else "")
                    raise C.ConfigError(f"{where}: {e}") from None


def sweep(suite: str, methods: Sequence[str], seeds: Sequence[int], output: str,
          datasets: Optional[Sequence[str]] = None, config_files: Sequence[str] = (),
          overrides: Sequence[str] = (), fail_fast: bool = False, tune: Sequence[str] = (),
          tune_refit: bool = False, jobs: int = 1) -> Dict[str, Any]:
    """Run a suite. With ``tune`` (``["train.lr=1e-3,1e-2", ...]``) each method x dataset
    first selects its setting on the validation split (:mod:`svp.engine.tune`)."""
    # the runs' run.output expands a leading ~ (engine.config.path_value): so do the sweep's own
    # files, or `--output=~/sw` put results.csv in ./~/sw and the runs in $HOME/sw
    output = C.path_value("run.output", os.fspath(output))
    all_ds = _select_datasets(suite, datasets)
    base = suite_base(suite, config_files, overrides)
    replaced = [o for o in overrides or () if _forced(o)]
    if replaced:   # (taken without a word, and listed in results.md as given: retest 94)
        log.warning("the sweep sets %s for each run itself (its dataset, method and folder under --output): "
                    "%s not used", ", ".join(_FORCED), ", ".join(replaced))
    if tune_refit and not tune:
        raise C.ConfigError("--tune-refit needs --tune (the grid to select from)")
    if tune and fail_fast:   # a failed grid point is recorded and cannot win; the others go on
        raise C.ConfigError("--fail-fast stops a plain sweep at its first failing run; a --tune sweep records "
                            "a failed grid point and selects among the others: leave out one of them")
    if fail_fast and jobs > 1:
        raise C.ConfigError("--fail-fast works one run at a time; leave out --jobs")
    points = [()]
    if tune:
        from . import tune as T
        points = [T.point_overrides(p) for p in T.grid_points(T.parse_tune(tune))]
    check_configs(all_ds, methods, seeds, output, config_files, overrides, base, points, tuning=bool(tune))
    lock = _claim_output(output)
    try:
        if tune:
            return tuned_sweep(suite, methods, seeds, output, all_ds, config_files, overrides, tune, tune_refit,
                               jobs, base)
        return _plain_sweep(suite, methods, seeds, output, all_ds, config_files, overrides, fail_fast, jobs, base)
    finally:
        lock.release()


def _check_selection_splits(ds, m, seed, output, config_files, overrides, base, cfg) -> None:
    """The grid runs' configuration as tuned_sweep makes it (the selection splits added): a
    data.test_split that names the split --tune selects on failed every grid run, one by one."""
    from . import tune as T
    train_split, val_split = T.selection_splits(ds, cfg)
    if C.splits_shared(val_split, cfg["data"]["test_split"], cfg["data"]["dataset"]):
        raise C.ConfigError(f"--tune selects on the split {val_split!r} (data.val_split, or the dataset's own "
                            f"validation split), which data.test_split={cfg['data']['test_split']!r} also reads: "
                            f"the choice would be made on test images; give data.test_split another split")
    run_config(ds, m, seed, output, "probe", config_files,
               list(overrides) + [f"data.train_split={train_split}", f"data.val_split={val_split}"], base)


SWEEP_LOCK = "sweep.lock"


def _claim_output(output: str):
    """The sweep folder, made and locked for this process: two sweeps writing one folder each
    found the other's runs locked, recorded them as failed, and wrote results.csv last-writer-wins."""
    from .runlock import RunLock
    if os.path.exists(output) and not os.path.isdir(output):
        raise C.ConfigError(f"--output {output} is a file; expected a folder for the sweep's runs and tables")
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise C.ConfigError(f"--output {output}: cannot create the sweep folder ({mkdir_error(output, e)})") from None
    try:
        lock = RunLock(output, SWEEP_LOCK, "sweep folder",
                       "a sweep folder belongs to one `svp sweep` at a time (wait for it to end, or give "
                       "another --output)").acquire("sweep")
    except ResumeError as e:
        raise C.ConfigError(str(e)) from None
    _wait_for_runs_held(output)
    return lock


def _wait_for_runs_held(output: str, timeout_s: float = 60.0) -> None:
    """Wait (at most ``timeout_s``) for the processes that still hold run folders of this sweep:
    the workers of an earlier ``--jobs`` sweep killed a moment ago stop their runs within a step
    of their parent's death (tune._watch_parent), and a restart at once found those folders in
    use and recorded their runs as failed (a failed grid point cannot win). A holder still there
    after the wait fails its run as before, naming it."""
    import time

    from .runlock import LOCK_FILE, describe_holder, holder
    held = {folder: holder(folder) for folder, _, files in os.walk(output) if LOCK_FILE in files}
    held = {folder: info for folder, info in held.items() if info is not None}
    for folder, info in held.items():
        log.warning("waiting for %s to leave run folder %s (a run of an earlier sweep of this folder "
                    "stopping, or an `svp train` of its own there?)", describe_holder(info), folder)
    deadline = time.monotonic() + timeout_s
    while held and time.monotonic() < deadline:
        time.sleep(0.5)
        held = {folder: info for folder in held if (info := holder(folder)) is not None}


def _plain_sweep(suite, methods, seeds, output, all_ds, config_files, overrides, fail_fast, jobs, base):
    rows: List[Dict[str, Any]] = []
    if jobs > 1:
        return _parallel_sweep(suite, methods, seeds, output, all_ds, config_files, overrides, fail_fast, jobs,
                               base)
    total = len(all_ds) * len(methods) * len(seeds)
    k = 0
    for ds, group in all_ds:
        for m in methods:
            for s in seeds:
                k += 1
                log.info("[%d/%d] %s / %s / seed %d", k, total, ds, m, s)
                run_dir = os.path.join(output, run_folder_name(ds, m, int(s)))
                try:
                    res = run_one(ds, m, int(s), output, config_files, overrides, base)
                    rows.append(row_from_results(suite, group, ds, m, s, res, run_dir=run_dir))
                except Exception as e:  # keep going; the row says what failed
                    from .tune import stop_requested
                    if fail_fast or stop_requested(e):
                        raise
                    # (worded as the --jobs runner's: the run's folder and the error's kind)
                    log.error("run %s failed: %s: %s", run_dir, type(e).__name__, e)
                    log.debug("%s", traceback.format_exc())
                    rows.append(row_from_results(suite, group, ds, m, s, None, f"{type(e).__name__}: {e}",
                                                 run_dir=run_dir))
                write_outputs_meanwhile(output, suite, rows, all_ds, list(methods), [int(x) for x in seeds], None,
                                        sweep_settings(config_files, overrides))
    csv_path, md_path = write_outputs(output, suite, rows, all_ds, list(methods), [int(x) for x in seeds],
                                      settings=sweep_settings(config_files, overrides))
    return {"csv": csv_path, "markdown": md_path, "rows": rows}


def _parallel_sweep(suite, methods, seeds, output, all_ds, config_files, overrides, fail_fast, jobs, base=None):
    from .tune import Runner
    if fail_fast:
        raise C.ConfigError("--fail-fast works one run at a time; leave out --jobs")
    combos = [(ds, g, m, int(s)) for ds, g in all_ds for m in methods for s in seeds]
    tasks = []
    for ds, _g, m, s in combos:
        name = run_folder_name(ds, m, s)
        tasks.append((os.path.join(output, name),
                      lambda ds=ds, m=m, s=s, name=name: run_config(ds, m, s, output, name, config_files, overrides,
                                                                    base)))
    # the tables within the runner's block: its stop request holds a signal until they are written
    with Runner(jobs) as runner:
        results = runner.run_all(tasks)
        rows = [row_from_results(suite, g, ds, m, s, res, err, run_dir=run_dir)
                for (ds, g, m, s), (res, err), (run_dir, _) in zip(combos, results, tasks)]
        csv_path, md_path = write_outputs(output, suite, rows, all_ds, list(methods), [int(x) for x in seeds],
                                          settings=sweep_settings(config_files, overrides))
    return {"csv": csv_path, "markdown": md_path, "rows": rows}


def _tuned_rows(suite, plans, cells, seeds, protocol) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for (ds, group, m, *_), cell in zip(plans, cells):
        for g in cell["grid"]:
            res = None
            if g["status"] != "failed":
                with open(os.path.join(g["run_dir"], "results.json")) as f:
                    res = json.load(f)
                res["status"] = g["status"]
            rows.append(row_from_results(suite, group, ds, m, seeds[0], res, g["error"], "grid", protocol,
                                         g["label"], g["run_dir"]))
        for fin in cell["finals"]:
            rows.append(row_from_results(suite, group, ds, m, fin["seed"], fin["results"], fin["error"],
                                         "final", protocol, cell["chosen_label"], fin["run_dir"]))
        if cell["chosen"] is None:
            rows += [row_from_results(suite, group, ds, m, s, None, "every grid point failed", "final",
                                      protocol) for s in seeds]
    return rows


def tuned_sweep(suite: str, methods: Sequence[str], seeds: Sequence[int], output: str,
                all_ds: List[Tuple[str, str]], config_files: Sequence[str], overrides: Sequence[str],
                tune: Sequence[str], refit: bool, jobs: int = 1, base: Optional[dict] = None) -> Dict[str, Any]:
    from . import tune as T

    spec = T.parse_tune(tune)
    points = T.grid_points(spec)
    protocol = "refit" if refit else "val"
    seeds = [int(x) for x in seeds]
    if not seeds:
        raise C.ConfigError("--seeds: at least one seed is needed")
    os.makedirs(output, exist_ok=True)   # (sweep() checked every point's configuration and claimed the folder)
    tuning: Dict[str, Any] = {"suite": suite, "protocol": protocol, "grid_seed": seeds[0], "seeds": seeds,
                              "grid_spec": spec, "overrides": list(overrides),
                              "config_files": list(config_files), "suite_base": base, "cells": []}
    plans = []
    for ds, group in all_ds:
        for m in methods:
            base_cfg = run_config(ds, m, seeds[0], output, "probe", config_files, overrides, base)
            if refit and (base_cfg["data"]["shots"] or any(k in ("data.shots", "data.shots_seed") for k, _ in spec)):
                # (the refit's split, train+val, was drawn from again: other images than the grid's,
                # and the validation images mostly dropped: retest 91)
                shots = base_cfg["data"]["shots"] or "(tuned)"
                raise C.ConfigError(f"--tune-refit with data.shots={shots}: a refit trains on "
                                    f"the training and the whole validation split, which a few-shot protocol "
                                    f"does not; leave out --tune-refit (the selected setting is trained on the "
                                    f"few-shot draw of each seed)")
            train_split, val_split = T.selection_splits(ds, base_cfg)

            def make_config(point, seed, run_dir, refit_run, ds=ds, m=m, train_split=train_split, val_split=val_split):
                ov = list(overrides) + T.point_overrides(point) + [f"data.train_split={train_split}",
                                                                   f"data.val_split={val_split}"]
                cfg = run_config(ds, m, seed, output, os.path.relpath(run_dir, output), config_files, ov, base)
                if refit_run:
                    cfg["data"]["train_split"] = T.refit_split(cfg)
                    cfg["data"]["max_train_samples"] = None
                    cfg["data"]["val_split"] = None
                return cfg

            folder = os.path.join(output, _slug(ds), m)
            plans.append((ds, group, m, folder, make_config,
                          T.grid_tasks(points, seeds[0], folder, make_config)))
    # every grid run of every (dataset, method) first, so `jobs` workers stay busy; then
    # every final run of the chosen settings
    log.info("%d dataset/method pair(s) x %d grid point(s), seed %d; then seeds %s (%s)", len(plans),
             len(points), seeds[0], ",".join(map(str, seeds)), protocol)
    with T.Runner(jobs) as runner:
        grid_res = runner.run_all([t for p in plans for t in p[5]])
        cells, finals = [], []
        for i, (ds, group, m, folder, make_config, grid) in enumerate(plans):
            res_i = grid_res[i * len(points):(i + 1) * len(points)]
            cell, fin = T.select(points, seeds, folder, protocol, make_config, grid, res_i, label=f"{ds} / {m}")
            cell.update({"dataset": ds, "method": m, "group": group})
            cells.append(cell)
            finals.append(fin)
        tuning["cells"] = cells
        write_outputs_meanwhile(output, suite, _tuned_rows(suite, plans, cells, seeds, protocol), all_ds,
                                list(methods), seeds, tuning, sweep_settings(config_files, overrides))
        final_res = runner.run_all([t for f in finals for t in f])
        k = 0
        for cell, fin in zip(cells, finals):
            T.record_finals(cell, seeds, fin, final_res[k:k + len(fin)])
            k += len(fin)
        rows = _tuned_rows(suite, plans, cells, seeds, protocol)
        for cell in cells:
            for fin in cell["finals"]:
                fin.pop("results", None)
        # (within the runner's block, as the plain sweep's tables)
        csv_path, md_path = write_outputs(output, suite, rows, all_ds, list(methods), seeds, tuning,
                                          sweep_settings(config_files, overrides))
    return {"csv": csv_path, "markdown": md_path, "rows": rows, "tuning": tuning,
            "json": os.path.join(output, "tuning.json")}
