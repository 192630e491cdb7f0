"""`svp sweep` takes over a run folder (reuses a finished run, resumes an interrupted one)
only when the folder's config.yaml is the configuration the sweep asks for now; and
`--suite mini` runs on its bundled base configuration (svp/assets/mini_suite.yaml)."""
import csv
import json
import logging
import os

import pytest
import yaml

import svp.engine.loop as loop
from svp.engine import config as C
from svp.engine import tune as T
from svp.engine.sweep import sweep
from svp.models.vim_mini import mini_asset_path

# on top of the mini suite's base (bundled mini Vim, 32 px, plain recipe, CPU): the tiniest budget
REAL = ["data.max_train_samples=32", "data.max_eval_samples=32", "train.epochs=1", "train.batch_size=16",
        "train.eval_batch_size=64", "run.progress=none"]


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def _fake_trainer(monkeypatch, calls):
    """Stands in for the engine's train(): records the configuration, writes the files
    the sweep reads (config.yaml first, as the engine does, then results.json)."""
    def fake_train(cfg=None, *, resume=None, overrides=None):
        calls.append(cfg)
        run_dir = os.path.join(cfg["run"]["output"], cfg["run"]["name"])
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(C.dump(cfg))
        val = 50.0 + 100 * float(cfg["train"]["lr"]) if cfg["data"]["val_split"] else None
        res = {"val_selected": {"epoch": 1, "val_top1": val, "test_top1": 40.0},
               "final": {"epoch": 1, "val_top1": val, "test_top1": 40.0}, "epochs_run": cfg["train"]["epochs"],
               "trainable_params": 10, "trainable_params_without_head": 0, "run_dir": run_dir}
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(res, f)
        return dict(res)
    monkeypatch.setattr(loop, "train", fake_train)


# ---------------------------------------------------------------- defect A: reuse only the same run
@pytest.mark.slow  # trains one tiny run
def test_a_finished_run_made_with_another_configuration_is_refused_not_reported(tmp_path):
    out = str(tmp_path / "sw")
    args = ("mini", ["linear"], [0], out, ["digits"], ())
    first = sweep(*args, REAL)
    assert [r["status"] for r in first["rows"]] == ["ok"]
    run_dir = first["rows"][0]["run_dir"]
    results = open(os.path.join(run_dir, "results.json")).read()
    # the same configuration (how it is watched, and where the output folder is spelled, aside): reused
    again = sweep("mini", ["linear"], [0], os.path.relpath(out), ["digits"], (),
                  REAL + ["run.progress=lines", "run.log_every=3", "data.num_workers=0"])
    assert [r["status"] for r in again["rows"]] == ["reused"]
    # another number of epochs: not the run asked for; refused, the old results left alone
    other = sweep(*args, REAL + ["train.epochs=2"])
    (row,) = other["rows"]
    assert row["status"] == "failed" and row["epochs_run"] in ("", None)
    assert os.path.samefile(row["run_dir"], run_dir)   # (a failed row's run_dir was empty)
    assert run_dir in row["error"] and "train.epochs: 1 -> 2" in row["error"] and "another --output" in row["error"]
    # the tables of the run the folder holds are kept; this call's failures beside them (every run of
    # a sweep run again with another configuration refused overwrote them: retest 91)
    assert _rows(out)[0]["status"] == "reused"   # (the last tables: the call before's)
    assert os.path.basename(other["csv"]) == "results.failed.csv" and "1 run(s) failed" in open(other["markdown"]).read()
    with open(other["csv"]) as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["failed"]
    assert open(os.path.join(run_dir, "results.json")).read() == results
    with pytest.raises(C.ConfigError, match=r"train\.epochs: 1 -> 2"):
        sweep(*args, REAL + ["train.epochs=2"], fail_fast=True)
    # runs at a time (worker processes): the same check, before any worker starts
    par = sweep("mini", ["linear"], [0], out, ["digits"], (), REAL + ["train.batch_size=8"], jobs=2)
    assert [r["status"] for r in par["rows"]] == ["failed"]
    assert "train.batch_size: 16 -> 8" in par["rows"][0]["error"] and os.path.samefile(par["rows"][0]["run_dir"],
                                                                                       run_dir)
    assert _rows(out)[0]["status"] == "reused"
    # the first configuration again: its tables, and the failures' files gone with the stale news
    assert [r["status"] for r in sweep(*args, REAL)["rows"]] == ["reused"]
    assert _rows(out)[0]["status"] == "reused" and not os.path.exists(os.path.join(out, "results.failed.csv"))


def test_a_sweep_with_another_epoch_count_trains_nothing_and_reports_no_old_number(tmp_path, monkeypatch, logged):
    out = str(tmp_path / "sw")
    calls = []
    _fake_trainer(monkeypatch, calls)
    sweep("mini", ["linear"], [0], out, ["digits"], (), REAL)
    with logged("svp.engine.sweep", logging.ERROR) as errors:   # (not caplog: conftest's logged)
        res = sweep("mini", ["linear"], [0], out, ["digits"], (), REAL + ["train.epochs=3"])
    # the failure's line as a --jobs sweep words it: the run's folder and the error's kind
    run_dir = os.path.join(out, "digits", "linear", "seed0")
    assert res["rows"][0]["error"].startswith("ConfigError: ")
    assert errors == [f"run {run_dir} failed: {res['rows'][0]['error']}"]
    assert len(calls) == 1
    with open(os.path.join(out, "results.failed.csv")) as f:
        assert [(r["status"], r["epochs_run"], r["final_test_top1"]) for r in csv.DictReader(f)] == [("failed", "", "")]
    assert [r["status"] for r in _rows(out)] == ["ok"]   # (the run the folder holds: its tables kept)
    assert "train.epochs: 1 -> 3" in res["rows"][0]["error"]
    assert "digits/linear/seed0" in res["rows"][0]["error"].replace(os.sep, "/")


@pytest.mark.slow  # trains one step, then resumes it
def test_an_interrupted_run_resumes_only_under_its_own_configuration(tmp_path):
    out = str(tmp_path / "sw")
    args = ("mini", ["linear"], [0], out, ["digits"], ())
    first = sweep(*args, REAL + ["debug.stop_at_step=1"])
    assert [r["status"] for r in first["rows"]] == ["failed"]
    run_dir = os.path.join(out, "digits", "linear", "seed0")
    assert os.path.isfile(os.path.join(run_dir, "resume.safetensors"))
    other = sweep(*args, REAL + ["train.lr=0.5"])
    assert other["rows"][0]["status"] == "failed"
    assert "interrupted run" in other["rows"][0]["error"] and "train.lr: 0.003 -> 0.5" in other["rows"][0]["error"]
    assert os.path.isfile(os.path.join(run_dir, "resume.safetensors"))       # left for a matching sweep
    # the debug stop is not part of the run; how it is watched is taken from the new sweep
    res = sweep(*args, REAL + ["run.log_every=7"])
    assert [r["status"] for r in res["rows"]] == ["resumed"]
    saved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert saved["run"]["log_every"] == 7 and saved["debug"]["stop_at_step"] is None
    assert saved["run"]["changes"] == []


def test_a_tuning_sweep_does_not_select_among_runs_of_another_configuration(tmp_path, monkeypatch):
    out = str(tmp_path / "sw")
    tiny = REAL + ["eval.every=1"]
    calls = []
    _fake_trainer(monkeypatch, calls)
    grid = ["train.lr=1e-3,1e-2"]
    sweep("mini", ["svp"], [0], out, ["digits"], (), tiny, tune=grid)
    assert len(calls) == 2
    # a block of another method's settings does not apply to these runs: still reused
    same = sweep("mini", ["svp"], [0], out, ["digits"], (), tiny + ["method.settings.lora.r=8"], tune=grid)
    assert len(calls) == 2 and {r["status"] for r in same["rows"]} == {"reused"}
    # another weight decay: every grid run refused, nothing trained, nothing chosen
    other = sweep("mini", ["svp"], [0], out, ["digits"], (), tiny + ["train.weight_decay=0.5"], tune=grid)
    assert len(calls) == 2
    grid_rows = [r for r in other["rows"] if r["role"] == "grid"]
    assert [r["status"] for r in grid_rows] == ["failed", "failed"]
    assert all("train.weight_decay: 0.0001 -> 0.5" in r["error"] for r in grid_rows)
    assert other["tuning"]["cells"][0]["chosen"] is None
    # svp's own settings are part of its runs (named as the run gets them: its block over the flat keys)
    mine = sweep("mini", ["svp"], [0], out, ["digits"], (), tiny + ["method.settings.svp.hidden=8"], tune=grid)
    assert all("method.settings.hidden: 16 -> 8" in r["error"] for r in mine["rows"] if r["role"] == "grid")


def test_differences_leave_out_what_a_resume_may_change_and_see_earlier_resumes():
    cfg = C.resolve(overrides=["method.name=svp", "method.settings.lora.r=2"])
    saved = C.resolve(overrides=["method.name=svp", "method.settings.lora.r=4", "run.output=elsewhere",
                                 "run.name=x", "train.device=cpu", "data.num_workers=2", "debug.stop_at_step=3",
                                 "run.progress=none"])
    assert T.config_differences(saved, cfg) == {}
    saved["train"]["max_steps"] = 5  # a run cut short is not the run asked for
    assert T.config_differences(saved, cfg) == {"train.max_steps": "5 -> null"}
    saved["train"]["max_steps"] = None
    saved["method"]["settings"]["head"] = 1
    cfg["method"]["settings"]["head"] = True
    n = cfg["train"]["epochs"]
    saved["train"]["epochs"] = n + 1
    assert T.config_differences(saved, cfg) == {"method.settings.head": "1 -> true", "train.epochs": f"{n + 1} -> {n}"}
    # a run whose lr was changed by `svp train --resume` ran with both values: not the run asked for
    saved = C.resolve(overrides=["train.lr=0.01"])
    saved["run"]["changes"] = [{"step": 12, "epoch": 1, "batch": 0, "changes": {"train.lr": [0.001, 0.01]}}]
    diff = T.config_differences(saved, C.resolve(overrides=["train.lr=0.01"]))
    assert diff == {"train.lr": "0.001 (from start), then 0.01 (from step 12) -> 0.01"}


def test_differences_compare_the_weights_a_run_used_not_the_sources_set_aside():
    """A sweep made with --checkpoint before the suite's pretrained was dropped under one recorded
    pretrained: true beside its checkpoint; after the upgrade every run of it was refused as made
    with another configuration (model.pretrained: true -> false), the weights being the same
    (retest 84). Sources set aside by the one that gives the weights do not count; the source
    itself still does."""
    ck = ["model.checkpoint=/w/vim.pth"]
    assert T.config_differences(C.resolve(overrides=ck + ["model.pretrained=true"]), C.resolve(overrides=ck)) == {}
    assert T.config_differences(C.resolve(overrides=ck + ["model.random_init=true"]), C.resolve(overrides=ck)) == {}
    assert T.config_differences(C.resolve(overrides=["model.pretrained=true", "model.random_init=true"]),
                                C.resolve(overrides=["model.pretrained=true"])) == {}
    assert T.config_differences(C.resolve(overrides=["model.pretrained=true"]), C.resolve(overrides=ck)) == {
        "model.checkpoint": 'null -> "/w/vim.pth"', "model.pretrained": "true -> false"}
    assert T.config_differences(C.resolve(overrides=["model.random_init=true"]),
                                C.resolve(overrides=["model.pretrained=true"])) == {
        "model.pretrained": "false -> true", "model.random_init": "true -> false"}


def test_a_moved_sweeps_reused_rows_name_the_folders_it_read(tmp_path, monkeypatch):
    """results.csv took a reused run's folder from its results.json, which names the folder it was
    trained in: after `mv sweep moved`, every reused row pointed at a folder that was gone."""
    import shutil
    calls = []
    _fake_trainer(monkeypatch, calls)
    first = sweep("mini", ["linear"], [0, 1], str(tmp_path / "sw"), ["digits"], (), REAL)
    shutil.move(str(tmp_path / "sw"), str(tmp_path / "moved"))
    again = sweep("mini", ["linear"], [0, 1], str(tmp_path / "moved"), ["digits"], (), REAL)
    assert len(calls) == 2 and [r["status"] for r in again["rows"]] == ["reused", "reused"]
    for row, before in zip(_rows(str(tmp_path / "moved")), first["rows"]):
        assert row["run_dir"] == str(tmp_path / "moved" / os.path.relpath(before["run_dir"], tmp_path / "sw"))
        assert os.path.isfile(os.path.join(row["run_dir"], "results.json"))
    from svp.engine.sweep import row_from_results   # a failed row's too, given relative (--jobs)
    monkeypatch.chdir(tmp_path)
    assert row_from_results("mini", "g", "d", "m", 0, None, "boom", run_dir="out/d/m/seed0")["run_dir"] == \
        str(tmp_path / "out" / "d" / "m" / "seed0")


def test_a_finished_run_without_its_config_is_not_reused(tmp_path, monkeypatch):
    out = str(tmp_path / "sw")
    run_dir = os.path.join(out, "digits", "linear", "seed0")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"final": {"test_top1": 99.0}}, f)
    calls = []
    _fake_trainer(monkeypatch, calls)
    res = sweep("mini", ["linear"], [0], out, ["digits"], (), REAL)
    assert calls == [] and res["rows"][0]["status"] == "failed"
    assert "no config.yaml" in res["rows"][0]["error"] and run_dir in res["rows"][0]["error"]


# ---------------------------------------------------------------- defect B: --suite mini needs no -c
def test_suite_mini_runs_on_its_bundled_configuration_under_the_users(tmp_path, monkeypatch):
    calls = []
    _fake_trainer(monkeypatch, calls)
    sweep("mini", ["linear"], [0], str(tmp_path / "a"), ["digits"], (), ["train.epochs=1"])
    cfg = calls[-1]
    suite = yaml.safe_load(open(mini_asset_path("mini_suite.yaml")))
    assert cfg["model"]["name"] == "vim_mini_patch4_32" and cfg["model"]["pretrained"] is True
    assert cfg["data"]["max_train_samples"] == suite["data"]["max_train_samples"] and cfg["data"]["img_size"] == 32
    assert cfg["train"]["epochs"] == 1                                  # the override wins over the base
    # the file given again with -c: the same runs; a user's file goes over the base
    sweep("mini", ["linear"], [0], str(tmp_path / "a"), ["digits"], [mini_asset_path("mini_suite.yaml")],
          ["train.epochs=1"])
    assert len(calls) == 1                                              # the same configuration: reused
    mine = tmp_path / "mine.yaml"
    mine.write_text("train: {batch_size: 8}\n")
    sweep("mini", ["linear"], [0], str(tmp_path / "b"), ["digits"], [str(mine)], ["train.epochs=1"])
    assert calls[-1]["train"]["batch_size"] == 8 and calls[-1]["model"]["name"] == "vim_mini_patch4_32"
    # another backbone does not inherit the mini Vim's model.pretrained (a hub download)
    sweep("mini", ["linear"], [0], str(tmp_path / "c"), ["digits"], (),
          ["model.name=vim_tiny_patch16_224", "model.random_init=true"])
    assert calls[-1]["model"]["pretrained"] is False and calls[-1]["data"]["img_size"] == 32


def test_the_documented_suite_mini_command_builds_mini_vim_runs(tmp_path, monkeypatch, capsys):
    from svp.cli import main as svp_main
    calls = []
    _fake_trainer(monkeypatch, calls)
    out = tmp_path / "sw"
    rc = svp_main(["sweep", "--suite", "mini", "--datasets", "digits,faces", "--methods", "svp,linear",
                   "--seeds", "0", "--output", str(out), "train.epochs=10"])
    assert rc == 0, capsys.readouterr().err
    assert len(calls) == 4 and {c["model"]["name"] for c in calls} == {"vim_mini_patch4_32"}
    assert {c["train"]["epochs"] for c in calls} == {10}
    svp_cfg = next(c for c in calls if c["method"]["name"] == "svp")
    assert svp_cfg["method"]["settings"]["svp"] == {"shared_layers": 4, "hidden": 16}


def test_an_interrupted_plain_sweep_exits_130_with_advice_and_bad_lists_are_refused(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a run of a sweep without --tune ended in a traceback and exit 1 ("some runs
    failed"); --seeds a named no flag; an empty or repeated list ran nothing or a run twice."""
    from svp.cli import main as svp_main
    from svp.engine.signals import EXIT_INTERRUPTED, TrainingStopped

    def stopped(cfg=None, *, resume=None, overrides=None):
        raise TrainingStopped("SIGINT received: stopped after step 3; resume point saved. Continue with: "
                              "svp train --resume x", EXIT_INTERRUPTED, "x")
    monkeypatch.setattr(loop, "train", stopped)
    base = ["sweep", "--suite", "mini", "--methods", "linear", "--datasets", "digits", "--output", str(tmp_path / "s")]
    assert svp_main(base) == EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "sweep interrupted" in err and "run the same svp sweep command again" in err and "Traceback" not in err
    for extra, words in ((["--seeds", "a"], "--seeds 'a': expected comma-separated integers"),
                         (["--seeds", ","], "--seeds ',': expected at least one value"),
                         (["--seeds", "0,0"], "--seeds names 0 more than once"),
                         (["--methods", "linear,linear"], "--methods names linear more than once"),
                         (["--jobs", "0"], "--jobs 0: expected a positive number")):
        assert svp_main(base + extra) == 2
        assert words in capsys.readouterr().err


def test_a_table_that_cannot_be_rewritten_between_runs_does_not_stop_the_sweep(tmp_path, monkeypatch):
    """The tables are rewritten after each run: a results.csv open in Excel (Windows refuses to
    replace it) stopped the sweep there, and the runs after it never started (review45). Now said,
    and the sweep goes on; the last write still counts."""
    import errno

    from svp.engine import sweep as S
    calls, real, tries = [], S._write_outputs, []
    _fake_trainer(monkeypatch, calls)

    def busy_once(*a, **k):
        tries.append(1)
        if len(tries) == 1:
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(a[0], "results.csv"))
        return real(*a, **k)
    monkeypatch.setattr(S, "_write_outputs", busy_once)
    out = tmp_path / "s"
    sweep("mini", ["linear"], [0, 1], str(out), ["digits"], (), [])
    assert len(calls) == 2 and len(tries) == 3
    assert [r["seed"] for r in _rows(out)] == ["0", "1"]
    tries.clear()

    def busy(*a, **k):
        tries.append(1)
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(a[0], "results.csv"))
    monkeypatch.setattr(S, "_write_outputs", busy)   # the last write failing is an error still
    with pytest.raises(C.ConfigError, match="cannot write the sweep's results"):
        sweep("mini", ["linear"], [0], str(tmp_path / "t"), ["digits"], (), [])


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_bad_method_or_setting_fails_the_sweep_before_any_run(tmp_path, monkeypatch, jobs):
    """A plain sweep trained every good run first and reported the bad method or setting
    as a failed row of each run it touched (exit 1); now it stops before any training
    (exit 2), naming the dataset and method."""
    calls = []
    _fake_trainer(monkeypatch, calls)
    out = tmp_path / "s"
    with pytest.raises(C.ConfigError, match=r"digits / nope: .*unknown adaptation method 'nope'"):
        sweep("mini", ["linear", "nope"], [0], str(out), ["digits"], (), REAL, jobs=jobs)
    # (found at the linear run already: another method's block has its names checked, QA 16a)
    with pytest.raises(C.ConfigError, match=r"digits / linear: method.settings.lora: .*rank"):
        sweep("mini", ["linear", "lora"], [0], str(out), ["digits"], (), REAL + ["method.settings.lora.rank=2.5"],
              jobs=jobs)
    # a value that only the model refuses (its depth, 8): found on a model without storage
    with pytest.raises(C.ConfigError, match=r"digits / svp: .*shared_layers=3 does not divide the model depth 8"):
        sweep("mini", ["linear", "svp"], [0], str(out), ["digits"], (), REAL + ["method.settings.svp.shared_layers=3"],
              jobs=jobs)
    assert calls == [] and not out.exists()
    # every replicate's train.seed (the configuration's plus its seed), not only the first's: seed 1
    # was refused after seed 0 had trained (QA 16a)
    with pytest.raises(C.ConfigError, match=r"digits / linear: train\.seed=4294967296: expected"):
        sweep("mini", ["linear"], [0, 1], str(out), ["digits"], (), REAL + ["train.seed=4294967295"], jobs=jobs)
    with pytest.raises(C.ConfigError, match=r"digits / linear: train\.seed=-1: expected"):   # (review)
        sweep("mini", ["linear"], [0, -1], str(out), ["digits"], (), REAL, jobs=jobs)
    assert calls == [] and not out.exists()


def test_a_short_dataset_name_means_the_suites_dataset_of_that_name():
    """`--suite vtab --datasets dtd` resolved dtd to the HTA dataset and was refused as not
    in the suite."""
    from svp.engine.sweep import _select_datasets
    # (in the suite's order)
    assert [d for d, _ in _select_datasets("vtab", ["dtd", "vtab/cifar"])] == ["vtab/cifar", "vtab/dtd"]
    assert [d for d, _ in _select_datasets("hta", ["dtd"])] == ["hta/dtd"]
    with pytest.raises(C.ConfigError, match="'digits' is not in suite 'vtab'"):
        _select_datasets("vtab", ["digits"])


def test_a_folder_from_before_init_seeds_followed_the_seed_is_reused_where_it_drew_the_same_head(tmp_path, monkeypatch):
    """Folders made when model.init_seed defaulted to 0 were all refused (init_seed: 0 -> null);
    for seed 0 that is the same run (null means train.seed), for seed 1 it is not."""
    out = str(tmp_path / "sw")
    calls = []
    _fake_trainer(monkeypatch, calls)
    sweep("mini", ["linear"], [0, 1], out, ["digits"], (), REAL + ["model.init_seed=0"])
    assert len(calls) == 2
    res = sweep("mini", ["linear"], [0, 1], out, ["digits"], (), REAL)
    assert [r["status"] for r in res["rows"]] == ["reused", "failed"]
    assert "model.init_seed: 0 -> 1" in res["rows"][1]["error"] and len(calls) == 2


def test_suite_any_sweeps_a_dataset_registered_outside_the_suites(tmp_path, monkeypatch, capsys):
    """docs/architecture.md, adding a dataset: a dataset outside the mini/vtab/hta groups could not
    be swept ("not in suite"); `--suite any --datasets NAME` sweeps any registered dataset, on the
    engine's defaults and the dataset's preset (or its registry recipe)."""
    import dataclasses

    from svp.cli import main as svp_main
    from svp.data import registry
    info, builder = registry._REGISTRY["digits"]
    mine = dataclasses.replace(info, name="tinyset_test", group="custom", aliases=(), img_size=48)
    monkeypatch.setitem(registry._REGISTRY, "tinyset_test", (mine, builder))
    calls = []
    _fake_trainer(monkeypatch, calls)
    out = tmp_path / "sw"
    rc = svp_main(["sweep", "--suite", "any", "--datasets", "tinyset_test,digits", "--methods", "linear",
                   "--output", str(out), "--model", "vim_mini_patch4_32"])
    assert rc == 0, capsys.readouterr().err
    assert [(c["data"]["dataset"], c["data"]["img_size"]) for c in calls] == [("tinyset_test", 48), ("digits", 32)]
    assert [(r["suite"], r["group"], r["dataset"]) for r in _rows(out)] == [
        ("any", "custom", "tinyset_test"), ("any", "embedded", "digits")]
    assert "Mean (2 datasets)" in (out / "results.md").read_text()
    assert svp_main(["sweep", "--suite", "any", "--methods", "linear", "--output", str(tmp_path / "x")]) == 2
    assert "--suite any sweeps the datasets --datasets names" in capsys.readouterr().err


def test_a_sweep_folder_is_one_sweeps_at_a_time_and_a_file_is_refused(tmp_path, monkeypatch):
    """Two sweeps on one --output each recorded the other's runs as failed and wrote results.csv
    last-writer-wins; an --output that is a file was a FileExistsError traceback."""
    from svp.engine.runlock import RunLock
    from svp.engine.sweep import SWEEP_LOCK
    calls = []
    _fake_trainer(monkeypatch, calls)
    out = tmp_path / "sw"
    out.mkdir()
    other = RunLock(str(out), SWEEP_LOCK).acquire("sweep")   # another sweep holds the folder
    try:
        with pytest.raises(C.ConfigError, match=r"sweep folder .*sw is in use by process \d+.*one `svp sweep` at a"):
            sweep("mini", ["linear"], [0], str(out), ["digits"], (), REAL)
    finally:
        other.release()
    assert calls == []
    sweep("mini", ["linear"], [0], str(out), ["digits"], (), REAL)
    assert len(calls) == 1 and not (out / SWEEP_LOCK).exists()   # released at the end
    (tmp_path / "f").write_text("x")
    with pytest.raises(C.ConfigError, match=r"--output .*f is a file; expected a folder"):
        sweep("mini", ["linear"], [0], str(tmp_path / "f"), ["digits"], (), REAL)


def test_every_grid_point_is_checked_before_any_run_and_datasets_are_named_once(tmp_path, monkeypatch):
    """--tune points were checked on the first dataset and method only, and not against the model:
    shared_layers=16 on a depth-8 model trained the other points, then failed its own (and it could
    not win); --fail-fast was ignored with --tune; digits,embedded/digits ran and counted twice."""
    calls = []
    _fake_trainer(monkeypatch, calls)
    out = tmp_path / "s"
    with pytest.raises(C.ConfigError, match=r"digits / svp / method\.settings\.svp\.shared_layers=16: .*does not "
                                            r"divide the model depth 8"):
        sweep("mini", ["svp"], [0], str(out), ["digits"], (), REAL, tune=["method.settings.svp.shared_layers=4,16"])
    with pytest.raises(C.ConfigError, match=r"digits / linear / method\.settings\.hidden=4: .*unknown setting"):
        sweep("mini", ["svp", "linear"], [0], str(out), ["digits"], (), REAL, tune=["method.settings.hidden=4,8"])
    # the grid runs' splits as tuned_sweep sets them: a test split that is the one --tune selects on
    with pytest.raises(C.ConfigError, match=r"--tune selects on the split 'val' .*data\.test_split='val' also reads"):
        sweep("mini", ["linear"], [0], str(out), ["digits"], (), REAL + ["data.test_split=val"],
              tune=["train.lr=1e-3,1e-2"])
    # (a slice of the split it selects on read the same images: review 62)
    with pytest.raises(C.ConfigError, match=r"--tune selects on the split 'val' .*data\.test_split='val\[:20\]' also "
                                            r"reads"):
        sweep("mini", ["linear"], [0], str(out), ["digits"], (), REAL + ["data.test_split=val[:20]"],
              tune=["train.lr=1e-3,1e-2"])
    # (or a split that holds it: retest 64)
    with pytest.raises(C.ConfigError, match=r"--tune selects on the split 'val' .*data\.test_split='trainval' also "
                                            r"reads"):
        sweep("mini", ["linear"], [0], str(out), ["digits"], (), REAL + ["data.test_split=trainval"],
              tune=["train.lr=1e-3,1e-2"])
    with pytest.raises(C.ConfigError, match="--fail-fast stops a plain sweep"):
        sweep("mini", ["linear"], [0], str(out), ["digits"], (), REAL, fail_fast=True, tune=["train.lr=1e-3,1e-2"])
    with pytest.raises(C.ConfigError, match=r"--datasets names digits twice \('digits' and 'embedded/digits'\)"):
        sweep("mini", ["linear"], [0], str(out), ["digits", "embedded/digits"], (), REAL)
    assert calls == [] and not out.exists()


def test_a_worker_whose_sweep_died_stops_its_run_and_exits(tmp_path):
    """kill -9 of a --jobs sweep left its workers training with their run folders locked (the
    restart recorded those runs as failed), then idle forever; a worker now asks its run to stop
    (resume point written) once its parent is gone, and exits when the run has returned."""
    import subprocess
    import sys
    script = (
        "import multiprocessing as mp, time, svp.engine.tune as T\n"
        "v = mp.get_context('spawn').RawValue('i', 0)\n"
        "T._RUNS_IN_PROGRESS[0] = 1\n"
        "T._watch_parent(v, -1, every_s=0.05)\n"   # a parent pid that is not ours: as if it died
        "t0 = time.time()\n"
        "while not v.value and time.time() - t0 < 20: time.sleep(0.01)\n"
        "print('stop', v.value, flush=True)\n"
        "time.sleep(0.5)\n"
        "print('still running', flush=True)\n"
        "T._RUNS_IN_PROGRESS[0] = 0\n"
        "time.sleep(20)\n"
        "print('not exited', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    import signal
    assert r.stdout.split("\n")[:2] == [f"stop {int(signal.SIGTERM)}", "still running"], r.stdout + r.stderr
    assert "not exited" not in r.stdout and r.returncode == 1


# parent.py of the tests below: spawns a worker from wmod.py beside it, whose path it is given
# (out); WAIT_READY waits for the worker's out + '.ready'
SPAWNING_PARENT = (
    "import os, sys, time, signal, multiprocessing as mp\n"
    "sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
    "import wmod\n"
    "if __name__ == '__main__':\n"
    "    out = sys.argv[1]\n")
WAIT_READY = (
    "    t0 = time.time()\n"
    "    while not os.path.exists(out + '.ready') and time.time() - t0 < 60: time.sleep(0.02)\n")


def test_an_idle_worker_of_a_broken_pool_exits_once_the_sweep_retires_it(tmp_path):
    """A worker killed by a signal breaks the pool; Python >= 3.12 then ends the other workers by
    SIGTERM alone (3.11 also queued them an end-of-work marker), which a worker between runs
    ignores, and the sweep's shutdown waited for them for ever
    (test_a_worker_killed_by_a_signal_fails_its_run_alone hung on Python 3.13). A worker started
    as the sweep starts them, idle: SIGTERM leaves it running; the pool's retire flag, set by the
    sweep, ends it, and a call the broken pool had queued is not started."""
    import subprocess
    import sys
    (tmp_path / "wmod.py").write_text(
        "import time\n"
        "def worker(stop, retire, sweep_pid, out):\n"
        "    import svp.engine.tune as T\n"
        "    T._worker_init(stop, sweep_pid, retire)\n"
        "    open(out + '.ready', 'w').close()\n"
        "    while not retire.value: time.sleep(0.01)\n"
        "    with open(out, 'w') as f: f.write(T._run_safely('never', {})[1])\n"
        "    time.sleep(30)\n")
    (tmp_path / "parent.py").write_text(
        SPAWNING_PARENT
        + "    ctx = mp.get_context('spawn')\n"
        "    stop, retire = ctx.RawValue('i', 0), ctx.RawValue('b', 0)\n"
        "    p = ctx.Process(target=wmod.worker, args=(stop, retire, os.getpid(), out))\n"
        "    p.start()\n"
        + WAIT_READY
        + "    os.kill(p.pid, signal.SIGTERM)\n"   # what a broken pool sends its other workers
        "    time.sleep(0.5)\n"
        "    print('alive after SIGTERM', p.is_alive(), flush=True)\n"
        "    retire.value = 1\n"
        "    p.join(20)\n"
        "    print('exit code', p.exitcode, flush=True)\n"
        "    p.kill()\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(tmp_path / "parent.py"), str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.splitlines() == ["alive after SIGTERM True", "exit code 0"], r.stdout + r.stderr
    assert out.read_text() == "not started: the sweep's worker pool broke"


def test_a_worker_sees_its_sweep_die_where_getppid_keeps_the_dead_parents_pid(tmp_path):
    """On Windows os.getppid() goes on answering the dead parent's pid: a worker watching it never
    saw its sweep die and trained on with its run folder locked (review45). The parent's sentinel
    (multiprocessing.parent_process) says so everywhere; here getppid is made to answer as there."""
    import subprocess
    import sys
    (tmp_path / "wmod.py").write_text(
        "import os, time, multiprocessing as mp\n"
        "def child(out, ppid):\n"
        "    import svp.engine.tune as T\n"
        "    os.getppid = lambda: ppid\n"   # as on Windows: the dead parent's pid for ever
        "    v = mp.get_context('spawn').RawValue('i', 0)\n"
        "    T._RUNS_IN_PROGRESS[0] = 1\n"
        "    T._watch_parent(v, ppid, every_s=0.05)\n"
        "    open(out + '.ready', 'w').close()\n"
        "    t0 = time.time()\n"
        "    while not v.value and time.time() - t0 < 30: time.sleep(0.01)\n"
        "    with open(out, 'w') as f: f.write(f'stop {v.value}')\n"
        "    T._RUNS_IN_PROGRESS[0] = 0\n"
        "    time.sleep(30)\n")
    (tmp_path / "parent.py").write_text(
        SPAWNING_PARENT
        + "    p = mp.get_context('spawn').Process(target=wmod.child, args=(out, os.getpid()))\n"
        "    p.start()\n"
        + WAIT_READY
        + "    print(p.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    out = tmp_path / "stopped"
    r = subprocess.run([sys.executable, str(tmp_path / "parent.py"), str(out)], capture_output=True, text=True,
                       timeout=120)
    child = int(r.stdout.split()[0])
    import signal
    import time
    t0 = time.time()
    while not (out.exists() and out.read_text()) and time.time() - t0 < 30:
        time.sleep(0.05)
    try:
        assert out.exists() and out.read_text() == f"stop {int(signal.SIGTERM)}", r.stderr
        while time.time() - t0 < 30:   # and it exits once its run has returned
            try:
                os.kill(child, 0)
                with open(f"/proc/{child}/stat") as f:   # (a zombie a container's init has not reaped)
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the worker did not exit")
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_worker_that_starts_after_its_sweep_died_stops_too(tmp_path):
    """A worker that started up after a kill -9 of its sweep had been adopted already, took its
    new parent (init) for the sweep and watched it for ever, training on with the run locked
    (review38). The sweep's pid now comes with the worker's start: here the parent starts the
    worker and exits before the worker's initializer runs."""
    import subprocess
    import sys
    import textwrap
    out = tmp_path / "worker.out"
    worker = textwrap.dedent(f"""
        import multiprocessing as mp, os, sys, time, svp.engine.tune as T
        sweep = int(sys.argv[1])
        while os.getppid() == sweep: time.sleep(0.01)   # the sweep is gone before the initializer
        v = mp.get_context('spawn').RawValue('i', 0)
        T._RUNS_IN_PROGRESS[0] = 1   # a run: the watcher waits for it to return before it exits
        T._worker_init(v, sweep)
        t0 = time.time()
        while not v.value and time.time() - t0 < 20: time.sleep(0.01)
        open({str(out)!r}, 'w').write(f'stop {{v.value}} {{os.getpid()}}')
        T._RUNS_IN_PROGRESS[0] = 0
        time.sleep(20)
        """)
    sweep = ("import os, subprocess, sys\n"
             f"subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())])\n")
    subprocess.run([sys.executable, "-c", sweep], timeout=60, check=True)
    import signal
    import time
    t0 = time.time()
    while not (out.exists() and out.read_text()) and time.time() - t0 < 60:
        time.sleep(0.05)
    stop, pid = out.read_text().rsplit(" ", 1)
    assert stop == f"stop {int(signal.SIGTERM)}"
    # and it exits once its run has returned (the watcher looks every 0.2 s), not after its 20 s
    t0 = time.time()
    try:
        while time.time() - t0 < 15 and _alive(int(pid)):
            time.sleep(0.05)
        assert not _alive(int(pid)), "the worker did not exit"
    finally:
        if _alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)


def _alive(pid):
    """Whether ``pid`` runs (a zombie that a container's init has not reaped has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:   # gone since, or no /proc (macOS: a zombie then counts as running)
        return not os.path.isdir("/proc")


@pytest.mark.slow
def test_a_worker_killed_by_a_signal_fails_its_run_alone(tmp_path, caplog):
    """--jobs 2: a worker killed by a signal (the out-of-memory killer; here debug.kill_at_step,
    a SIGKILL after step 1's resume point) broke the pool: the sweep crashed with a traceback, the
    run beside it was stopped, and no table was written (review). Each affected run now goes again
    in a process of its own: the killed one resumes from its resume point (a resume drops debug.*)."""
    import logging
    out = str(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="svp.engine.sweep"):
        res = sweep("mini", ["linear"], [0], out, ["digits"], (), REAL + ["run.save_every_steps=1"], jobs=2,
                    tune=["debug.kill_at_step=null,1"])
    tuning = json.load(open(os.path.join(out, "tuning.json")))
    grid = tuning["cells"][0]["grid"]
    # (the run beside it was stopped with it, and resumed, or had finished first: reported by its
    # worker, or, where the pool broke before its result came back, found finished in its folder)
    assert grid[0]["status"] in ("ok", "resumed", "reused") and grid[1]["status"] == "resumed", grid
    assert all(g["val_top1"] is not None for g in grid), grid
    assert "a worker process died (killed by a signal" in caplog.text
    assert os.path.isfile(res["csv"]) and os.path.isfile(res["markdown"])


def test_a_finished_run_is_not_reused_once_its_backbone_checkpoint_holds_other_weights(tmp_path):
    """review of sweep.py: the configuration names the checkpoint file, not its contents; a
    checkpoint replaced at the same path left finished runs on the old weights reused beside new
    runs on the new ones, in one table. Rewritten with the same weights, the run is still reused."""
    import shutil

    from safetensors.torch import load_file, save_file
    ckpt = str(tmp_path / "backbone.safetensors")
    shutil.copy(mini_asset_path("vim_mini_patch4_32.safetensors"), ckpt)
    out = str(tmp_path / "sw")
    args = ("mini", ["linear"], [0], out, ["digits"], (), REAL + [f"model.checkpoint={ckpt}"])
    assert [r["status"] for r in sweep(*args)["rows"]] == ["ok"]
    weights = load_file(ckpt)
    save_file(weights, ckpt)   # another file (another mtime and inode), the same weights
    assert [r["status"] for r in sweep(*args)["rows"]] == ["reused"]
    name = next(k for k in sorted(weights) if k.endswith("norm_f.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, ckpt)
    (row,) = sweep(*args)["rows"]
    assert row["status"] == "failed" and ckpt in row["error"] and "not reused" in row["error"], row
    results = json.load(open(os.path.join(row["run_dir"], "results.json")))
    assert results["epochs_run"] == 1   # left alone
    with pytest.raises(C.ConfigError, match="replaced since the run"):
        sweep(*args, fail_fast=True)


@pytest.mark.slow  # two tiny runs in two spawned workers
def test_a_sigterm_after_a_jobs_sweeps_last_run_still_writes_its_tables(tmp_path):
    """Once a --jobs sweep's last run had returned, its stop request was off again: a SIGTERM
    before its tables were written killed it there (no tables; a Ctrl-C ended it as 'sweep
    interrupted', no tables either) (review44). The runner's stop request now holds the signal
    until the tables are written, and the sweep then exits 130 saying so."""
    import subprocess
    import sys
    out = tmp_path / "sw"
    script = (
        "import os, signal, sys, time\n"
        "import svp.engine.sweep as S\n"
        "real = S.write_outputs\n"
        "def write_outputs(*a, **k):\n"   # the signal comes as the tables are about to be written
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    return real(*a, **k)\n"
        "S.write_outputs = write_outputs\n"
        "from svp.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script, "sweep", "--suite", "mini", "--methods", "linear",
                        "--seeds", "0,1", "--datasets", "digits", "--jobs", "2", "--output", str(out),
                        "train.epochs=1", "data.max_train_samples=8", "data.max_eval_samples=8",
                        "train.batch_size=4", "run.progress=none"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "SIGTERM received: no run is training now" in r.stderr, r.stderr[-3000:]
    assert ("svp sweep: error: sweep stopped: SIGTERM received after the last run had finished; its tables "
            "are written") in r.stderr, r.stderr[-3000:]
    rows = _rows(str(out))
    assert sorted(row["seed"] for row in rows) == ["0", "1"]
    assert all(row["status"] == "ok" and row["final_test_top1"] for row in rows), rows
    assert (out / "results.md").is_file()
    # a rerun with one run left to train trains it in this process: its tables were not held
    # (review48: killed by the SIGTERM, the tables left without the new run)
    r = subprocess.run([sys.executable, "-c", script, "sweep", "--suite", "mini", "--methods", "linear",
                        "--seeds", "0,1,2", "--datasets", "digits", "--jobs", "2", "--output", str(out),
                        "train.epochs=1", "data.max_train_samples=8", "data.max_eval_samples=8",
                        "train.batch_size=4", "run.progress=none"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 130 and "its tables are written" in r.stderr, r.stderr[-3000:]
    assert sorted(row["seed"] for row in _rows(str(out))) == ["0", "1", "2"]


def test_a_folder_of_an_older_svp_is_reused_with_the_behaviour_it_had_and_a_setting_spelled_either_way(
        tmp_path, monkeypatch, logged):
    """Review 74: after an upgrade, every finished run of an older sweep was refused as "made with
    another configuration" (train.opt_fused: false -> "auto"; train.amp_cpu: false -> true), keys
    the old config.yaml lacks, pinned to the old behaviour when it is read; and a setting in the
    method's own block (method.settings.svp.hidden) differed from the same setting given flat."""
    out = str(tmp_path / "sw")
    calls = []
    _fake_trainer(monkeypatch, calls)
    sweep("mini", ["svp"], [0], out, ["digits"], (), REAL + ["method.settings.svp.hidden=4"])
    assert len(calls) == 1
    path = os.path.join(out, "digits", "svp", "seed0", "config.yaml")
    cfg = yaml.safe_load(open(path))
    for key in ("opt_fused", "amp_cpu"):   # (as an older svp wrote it)
        del cfg["train"][key]
    with open(path, "w") as f:
        f.write(C.dump(cfg))
    with logged("svp.engine.sweep", logging.INFO) as messages:
        res = sweep("mini", ["svp"], [0], out, ["digits"], (), REAL + ["method.settings.hidden=4"])
    assert [r["status"] for r in res["rows"]] == ["reused"] and len(calls) == 1, res["rows"]
    assert any("was made by an older svp, without the key(s) train.opt_fused, train.amp_cpu: reused with the "
               "behaviour it had" in m for m in messages), messages
    # a value the sweep asks for explicitly is another run (and the log says no "older svp" of it)
    with logged("svp.engine.sweep", logging.INFO) as messages:
        res = sweep("mini", ["svp"], [0], out, ["digits"], (), REAL + ["method.settings.hidden=4",
                                                                       "train.opt_fused=true"])
    assert res["rows"][0]["status"] == "failed" and 'train.opt_fused: false -> true' in res["rows"][0]["error"]
    assert not any("older svp" in m for m in messages), messages
    # a folder from before model.random_init trained on a random backbone: another run than the bundled
    # weights' (retest 75: it was reused as one)
    del cfg["model"]["random_init"]
    cfg["model"]["pretrained"] = False   # (the mini suite asks for the bundled weights as pretrained ones)
    with open(path, "w") as f:
        f.write(C.dump(cfg))
    res = sweep("mini", ["svp"], [0], out, ["digits"], (), REAL + ["method.settings.hidden=4", "model.pretrained=false"])
    assert res["rows"][0]["status"] == "failed" and "model.random_init: true -> false" in res["rows"][0]["error"]
    res = sweep("mini", ["svp"], [0], out, ["digits"], (), REAL + ["method.settings.hidden=8"])
    assert "method.settings.hidden: 4 -> 8" in res["rows"][0]["error"]


@pytest.mark.parametrize("drop, compat", [(0.0, "paper"), (0.1, "paper"), (0.1, "official")])
def test_an_older_svp_run_kept_droppath_off_which_is_the_same_run_only_without_drop_path(tmp_path, drop, compat):
    """SVP trained its frozen backbone with DropPath off until 2026-12-05 (backbone_train_mode,
    pinned false for such a folder): at drop path 0 that is the run a sweep asks for now; at 0.1
    it is another run (the reread of review 74's mend). With compat=official it had DropPath on
    (pinned true), which is what the setting left unset means now: the same run (retest 77)."""
    import torch
    from safetensors.torch import save_file
    run = tmp_path / "run"
    run.mkdir()
    cfg = C.resolve(overrides=["method.name=svp", f"model.drop_path_rate={drop}", f"method.settings.compat={compat}"])
    (run / "config.yaml").write_text(C.dump(cfg))
    (run / "results.json").write_text("{}")
    # a final state written before 'train_data' was one of its names (the date the mode changed)
    state = json.dumps({"__dict__": ["t:model", "t:optimizer"]})
    save_file({"x": torch.zeros(1)}, str(run / "final_state.safetensors"), metadata={"state": state})
    if drop and compat == "paper":
        with pytest.raises(C.ConfigError, match=r"method\.settings\.backbone_train_mode: false -> \(unset\)"):
            T.check_same_config(str(run), cfg, finished=True)
    else:
        assert T.check_same_config(str(run), cfg, finished=True) == []
