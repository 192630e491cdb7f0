"""`svp sweep --tune`: selection on the validation split only, ties, refit, resume."""
import csv
import json
import os

import pytest
import yaml

import svp.engine.loop as loop
from svp.engine import config as C
from svp.engine import tune as T
from svp.engine.config import ConfigError
from svp.engine.sweep import sweep

TINY = ["model.name=vim_mini_patch4_32", "model.pretrained=true", "data.img_size=32", "data.recipe=plain",
        "data.max_train_samples=32", "data.max_eval_samples=32", "train.epochs=1", "train.batch_size=16",
        "train.eval_batch_size=64", "train.lr_scale=false", "train.warmup_epochs=0", "train.mixup=0",
        "train.cutmix=0", "train.smoothing=0", "model.drop_path_rate=0", "eval.every=1", "run.progress=none",
        "train.device=cpu"]


def test_grid_parsing_order_and_errors():
    spec = T.parse_tune(["train.lr=1e-3,1e-2", "train.opt_betas=[0.9,0.99],[0.9,0.999]"])
    assert spec == [("train.lr", ["1e-3", "1e-2"]), ("train.opt_betas", ["[0.9,0.99]", "[0.9,0.999]"])]
    points = T.grid_points(spec)
    assert [T.point_label(p) for p in points][:2] == ["train.lr=1e-3, train.opt_betas=[0.9,0.99]",
                                                       "train.lr=1e-3, train.opt_betas=[0.9,0.999]"]
    assert len(points) == 4
    # 1e-2 and 0.01 are one value, so one folder
    assert T.point_slug((("train.lr", "1e-2"),)) == T.point_slug((("train.lr", "0.01"),))
    # whole numbers without ".0" (an adapter of hidden=4 was in a folder hidden=4.0)
    assert T.point_slug((("method.settings.hidden", "4"),)) == "method.settings.hidden=4" \
        == T.point_slug((("method.settings.hidden", "4.0"),))
    two = T.point_slug((("train.lr", "1e-2"), ("train.opt_betas", "[0.9,0.99]")))
    assert two.startswith("train.lr=0.01,train.opt_betas")
    for bad, word in (("train.lr", "expected"), ("train.nope=1,2", "unknown"), ("train.lr=1e-3,0.001", "twice"), ("train.lr=1,1.0", "twice"),
                      ("train.seed=0,1", "cannot be tuned"), ("train.lr=1e-3,", "empty")):
        with pytest.raises(ConfigError, match=word):
            T.parse_tune([bad])


def test_choice_is_the_best_validation_score_ties_to_the_first_failed_never():
    assert T.choose([50.0, 70.0, 60.0]) == 1
    assert T.choose([70.0, 50.0, 70.0]) == 0           # tie: the first in grid order
    assert T.choose([None, 40.0, None]) == 1           # a failed point never wins
    assert T.choose([None, None]) is None


def _fake_trainer(monkeypatch, val_of, test_of, calls, interrupt_at=None):
    """Stands in for the engine's train(): writes results.json with the given
    validation and test accuracies for the run's learning rate."""
    def fake_train(cfg=None, *, resume=None, overrides=None):
        calls.append(cfg)
        if interrupt_at is not None and len(calls) == interrupt_at:
            # what the engine raises after Ctrl-C / SIGTERM, once its resume point is written
            raise loop.TrainingStopped("interrupted by signal 2", loop.EXIT_INTERRUPTED, "somewhere")
        lr = float(cfg["train"]["lr"])
        run_dir = os.path.join(cfg["run"]["output"], cfg["run"]["name"])
        os.makedirs(run_dir, exist_ok=True)
        # what the engine writes first: the sweep reuses a run only when this matches
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(C.dump(cfg))
        val = val_of(lr, cfg) if cfg["data"]["val_split"] else None
        res = {"dataset": cfg["data"]["dataset"], "method": cfg["method"]["name"], "seed": cfg["train"]["seed"],
               "val_selected": {"epoch": 1, "val_top1": val, "test_top1": test_of(lr, cfg)},
               "final": {"epoch": 1, "val_top1": val, "test_top1": test_of(lr, cfg)},
               "trainable_params": 10, "trainable_params_without_head": 0, "run_dir": run_dir,
               "train_split": cfg["data"]["train_split"], "val_split": cfg["data"]["val_split"],
               "max_train_samples": cfg["data"]["max_train_samples"]}
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(res, f)
        return dict(res)
    monkeypatch.setattr(loop, "train", fake_train)


def test_a_sweep_that_selects_by_loss_tunes_by_loss(tmp_path, monkeypatch):
    """eval.metric=loss: each grid point was still scored by the top-1 of its loss-selected epoch,
    and a point 10x worse by loss won on a tie in top-1 (QA 16d). Scored by the loss now."""
    val = {3.0: 70.0, 0.3: 70.0, 0.03: 60.0}
    vloss = {3.0: 15.8, 0.3: 1.46, 0.03: 2.0}
    calls = []
    _fake_trainer(monkeypatch, lambda lr, c: val[lr], lambda lr, c: 50.0, calls)
    real = loop.train

    def with_loss(cfg=None, **kw):
        res = real(cfg, **kw)
        lr = float(cfg["train"]["lr"])
        run_dir = os.path.join(cfg["run"]["output"], cfg["run"]["name"])
        if lr == 3.0:   # as an older svp finished it: no val_loss in results.json, the metric lines have it
            with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
                f.write(json.dumps({"epoch": 1, "val_top1": val[lr], "val_loss": vloss[lr]}) + "\n")
        else:
            res["selection_metric"] = cfg["eval"]["metric"]
            res["val_selected"]["val_loss"] = vloss[lr]
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(res, f)
        return res
    monkeypatch.setattr(loop, "train", with_loss)
    monkeypatch.chdir(tmp_path)
    out = "sw"   # (relative: tuning.json's run folders are written absolute)
    res = sweep("mini", ["linear"], [0], out, ["digits"], (), TINY + ["eval.metric=loss"],
                tune=["train.lr=3.0,0.3,0.03"])
    cell = json.load(open(os.path.join(out, "tuning.json")))["cells"][0]
    assert cell["chosen"] == {"train.lr": "0.3"} and cell["scored_by"] == "val_loss"
    # (run folders as absolute paths: relative to where the sweep started they did not resolve
    # from where tuning.json lives, review)
    assert all(os.path.isabs(g["run_dir"]) for g in cell["grid"]) and all(
        os.path.isabs(f["run_dir"]) for f in cell["finals"])
    assert [g["val_loss"] for g in cell["grid"]] == [15.8, 1.46, 2.0] and [g["val_top1"] for g in cell["grid"]] == [
        70.0, 70.0, 60.0]
    md = open(res["markdown"]).read()
    assert "validation loss of each grid point" in md and "| linear | digits | 15.8000 | **1.4600** | 2.0000 |" in md
    with pytest.raises(C.ConfigError, match="eval.metric is set by the sweep itself"):   # (the points' scores
        T.parse_tune(["eval.metric=top1,loss"])                                           # would not compare)
    with pytest.raises(C.ConfigError, match=r"--tune .*the key 'hidden' is given twice"):   # (a traceback: review)
        T.parse_tune(["method.settings.svp={hidden: 8, hidden: 9},{hidden: 4}"])


def _rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_choice_follows_validation_when_test_prefers_another_value(tmp_path, monkeypatch):
    # validation prefers lr 1e-2, test prefers 1e-1: the choice must be 1e-2
    val = {1e-3: 40.0, 1e-2: 80.0, 1e-1: 60.0}
    test = {1e-3: 45.0, 1e-2: 50.0, 1e-1: 95.0}
    calls = []
    _fake_trainer(monkeypatch, lambda lr, c: val[lr], lambda lr, c: test[lr] + c["train"]["seed"], calls)
    out = str(tmp_path / "sw")
    res = sweep("mini", ["svp", "linear"], [0, 1], out, ["digits"], (), TINY, tune=["train.lr=1e-3,1e-2,1e-1"])
    tuning = json.load(open(os.path.join(out, "tuning.json")))
    assert [c["chosen"] for c in tuning["cells"]] == [{"train.lr": "1e-2"}] * 2
    assert [g["val_top1"] for g in tuning["cells"][0]["grid"]] == [40.0, 80.0, 60.0]
    finals = [r for r in _rows(out) if r["role"] == "final"]
    assert sorted(float(r["val_selected_test_top1"]) for r in finals if r["method"] == "svp") == [50.0, 51.0]
    assert all(r["setting"] == "train.lr=1e-2" and r["protocol"] == "val" for r in finals)
    # 3 grid points per method, seed 0's final run is its grid run: one more run (seed 1) per method
    assert len(calls) == 2 * (3 + 1)
    assert all(c["data"]["val_split"] == "val" for c in calls)
    md = open(res["markdown"]).read()
    assert "**80.00**" in md and "| svp | digits | 40.00 | **80.00** | 60.00 | train.lr=1e-2 |" in md
    # the report's accuracy table holds the final runs only (mean of seeds 0 and 1 at lr 1e-2)
    assert "50.50 ± 0.71" in md and "95.00" not in md


def test_refit_trains_on_train_plus_val_as_the_grid_saw_them(tmp_path, monkeypatch):
    calls = []
    _fake_trainer(monkeypatch, lambda lr, c: {1e-3: 70.0, 1e-2: 70.0}[lr], lambda lr, c: 10.0, calls)
    out = str(tmp_path / "sw")
    sweep("mini", ["svp"], [3], out, ["faces"], (), TINY, tune=["train.lr=1e-3,1e-2"], tune_refit=True)
    tuning = json.load(open(os.path.join(out, "tuning.json")))
    assert tuning["cells"][0]["chosen"] == {"train.lr": "1e-3"}      # tie: the first listed
    assert tuning["cells"][0]["grid_seed"] == 3
    refit = calls[-1]
    assert refit["data"]["train_split"] == "train[:32]+val[:32]"
    assert refit["data"]["val_split"] is None and refit["data"]["max_train_samples"] is None
    assert float(refit["train"]["lr"]) == 1e-3
    assert "/refit/" in _rows(out)[-1]["run_dir"].replace(os.sep, "/")
    assert "retrained on training + validation" in open(os.path.join(out, "results.md")).read()


def test_an_interrupted_tuning_sweep_resumes_without_redoing_finished_points(tmp_path, monkeypatch):
    val = {1e-3: 30.0, 3e-3: 20.0, 1e-2: 10.0}
    out = str(tmp_path / "sw")
    calls = []
    _fake_trainer(monkeypatch, lambda lr, c: val[lr], lambda lr, c: 1.0, calls, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        sweep("mini", ["svp"], [0, 1], out, ["digits"], (), TINY, tune=["train.lr=1e-3,3e-3,1e-2"])
    assert len(calls) == 3
    again = []
    _fake_trainer(monkeypatch, lambda lr, c: val[lr], lambda lr, c: 1.0, again)
    sweep("mini", ["svp"], [0, 1], out, ["digits"], (), TINY, tune=["train.lr=1e-3,3e-3,1e-2"])
    # the two finished grid points are reused; the interrupted one and seed 1's final run are trained
    assert [(float(c["train"]["lr"]), c["train"]["seed"]) for c in again] == [(1e-2, 0), (1e-3, 1)]
    third = []
    _fake_trainer(monkeypatch, lambda lr, c: val[lr], lambda lr, c: 1.0, third)
    sweep("mini", ["svp"], [0, 1], out, ["digits"], (), TINY, tune=["train.lr=1e-3,3e-3,1e-2"])
    assert third == []
    assert {r["status"] for r in _rows(out)} == {"reused"}


@pytest.mark.slow  # trains a grid
def test_tiny_real_grid_picks_the_best_validation_point_and_resumes_a_stopped_run(tmp_path):
    """The real engine on the bundled mini Vim: two grid points stopped after their
    first step (resume points), then the sweep re-run resumes them, selects on the
    recorded validation accuracy and runs seed 1 at the chosen lr."""
    out = str(tmp_path / "sw")
    grid = ["train.lr=1e-3,1e-1"]
    first = sweep("mini", ["svp"], [0, 1], out, ["digits"], (), TINY + ["debug.stop_at_step=1"], tune=grid)
    assert all(r["status"] == "failed" for r in first["rows"])
    folder = os.path.join(out, "digits", "svp", "grid")
    assert all(os.path.isfile(os.path.join(folder, d, "seed0", "resume.safetensors")) for d in os.listdir(folder))
    # a failed grid row names its run folder (results.csv left it empty)
    failed_grid = [r for r in first["rows"] if r["role"] == "grid"]
    assert len(failed_grid) == 2 and all(os.path.isfile(os.path.join(r["run_dir"], "resume.safetensors"))
                                         for r in failed_grid)
    res = sweep("mini", ["svp"], [0, 1], out, ["digits"], (), TINY, tune=grid)
    grid_rows = [r for r in res["rows"] if r["role"] == "grid"]
    assert [r["status"] for r in grid_rows] == ["resumed", "resumed"]
    scores = {r["setting"]: float(r["val_selected_val_top1"]) for r in grid_rows}
    cell = res["tuning"]["cells"][0]
    best = max(scores.values())
    assert scores[cell["chosen_label"]] == best
    assert cell["chosen_label"] == next(k for k, v in scores.items() if v == best)   # first on a tie
    finals = [r for r in res["rows"] if r["role"] == "final"]
    assert [r["seed"] for r in finals] == [0, 1] and all(r["status"] != "failed" for r in finals)
    cfg1 = yaml.safe_load(open(os.path.join(finals[1]["run_dir"], "config.yaml")))
    assert cfg1["train"]["lr"] == pytest.approx(float(cell["chosen"]["train.lr"]))
    assert cfg1["data"]["val_split"] == "val" and cfg1["train"]["seed"] == 1


def test_tuning_needs_a_validation_split_and_refit_needs_a_grid(tmp_path):
    with pytest.raises(ConfigError, match="--tune-refit needs --tune"):
        sweep("mini", ["svp"], [0], str(tmp_path / "a"), ["digits"], (), TINY, tune_refit=True)
    with pytest.raises(ConfigError, match="unknown configuration key"):
        sweep("mini", ["svp"], [0], str(tmp_path / "b"), ["digits"], (), TINY, tune=["train.lrr=1,2"])


def test_split_expressions_join_the_first_items_of_each_split():
    import numpy as np
    from svp.data import build_dataset
    from svp.data.base import DatasetError
    joined = build_dataset("digits", "train[:5]+val[:3]")
    train, val = build_dataset("digits", "train"), build_dataset("digits", "val")
    assert len(joined) == 8 and joined.targets == train.targets[:5] + val.targets[:3]
    for i, (ds, j) in enumerate([(train, k) for k in range(5)] + [(val, k) for k in range(3)]):
        assert np.array_equal(np.asarray(joined[i][0]), np.asarray(ds[j][0]))
    assert len(build_dataset("digits", "train+val")) == len(build_dataset("digits", "trainval"))
    with pytest.raises(DatasetError, match="bad split expression"):
        build_dataset("digits", "train[5]")


@pytest.mark.slow  # starts processes
def test_two_runs_at_a_time_give_the_numbers_of_one_at_a_time(tmp_path, capfd):
    """--jobs 2 trains in spawned worker processes; the runs are the same runs. Each worker's
    stderr lines begin with its run's name within the sweep (two workers' lines interleaved and
    nothing said which run an epoch line came from; on a terminal their bars overwrote each
    other: QA 15e)."""
    args = (["linear"], [0, 1])
    serial = sweep("mini", *args, str(tmp_path / "serial"), ["faces"], (), TINY)
    capfd.readouterr()
    parallel = sweep("mini", *args, str(tmp_path / "parallel"), ["faces"], (), TINY, jobs=2)
    epoch_lines = [ln for ln in capfd.readouterr().err.splitlines() if " img/s " in ln]
    assert epoch_lines and all(ln.startswith(("[seed0] epoch ", "[seed1] epoch ")) for ln in epoch_lines), epoch_lines
    assert {ln.split()[0] for ln in epoch_lines} == {"[seed0]", "[seed1]"}
    key = ("seed", "status", "val_selected_test_top1", "final_test_top1", "trainable_params")
    assert [tuple(r[k] for k in key) for r in parallel["rows"]] == [tuple(r[k] for k in key) for r in serial["rows"]]
    assert all(r["status"] == "ok" for r in parallel["rows"])


def test_demo_preset_holds_the_best_validation_lr_of_each_method():
    from svp.demo import SHARED_LR, load_preset, method_lrs
    preset = load_preset()
    assert set(preset["lr"]) == {"linear", "vpt_deep", "svp"}
    for m, lr in preset["lr"].items():
        scores = preset["val_top1"][m]              # lr text -> val top-1, in grid order
        assert [float(k) for k in scores] == preset["grid"]
        best = max(v for v in scores.values() if v is not None)
        assert lr == float(next(k for k, v in scores.items() if v == best))
    lrs = method_lrs(["svp", "lora"])
    assert lrs["svp"][0] == preset["lr"]["svp"] and "validation" in lrs["svp"][1]
    assert lrs["lora"] == (SHARED_LR, "no preset for this method: shared default, not tuned")
    assert method_lrs(["svp"], lr=0.5)["svp"][0] == 0.5


def test_vtab_tuning_trains_on_train800_and_scores_on_val200():
    """The VTAB presets train on train800val200, which holds val200: the grid was scored on its
    own training images, and the refit trained on train800val200+val (val200 twice)."""
    from svp.engine import config as C
    from svp.engine import tune as T

    def pair(ds, *overrides):
        cfg = C.resolve(overrides=[f"data.dataset={ds}", *overrides])
        return T.selection_splits(ds, cfg), cfg
    (train, val), cfg = pair("vtab/dtd")
    assert cfg["data"]["train_split"] == "train800val200" and (train, val) == ("train800", "val")
    cfg["data"].update(train_split=train, val_split=val, max_train_samples=None, max_eval_samples=None)
    assert T.refit_split(cfg) == "train800+val"
    assert pair("cub200")[0] == ("train", "val")                       # HTA: its own train / val
    assert pair("vtab/dtd", "data.train_split=train800")[0] == ("train800", "val")
    assert pair("vtab/dtd", "data.val_split=val200")[0] == ("train800val200", "val200")  # the user's pair stays
    # a validation split asked to be carved out of the training split is carved out of the split the
    # grid trains on: with VTAB's own pair the grid trained on train800 and was scored on a carve of
    # train800val200, mostly train800's images (review)
    assert pair("vtab/dtd", "data.options.val_from_train=0.25")[0] == ("train800val200", "val")


def test_a_grid_folder_of_the_old_name_is_reused(tmp_path):
    """A sweep restarted after the folder names changed (hidden=4.0 -> hidden=4) finds the runs it
    made under the old name; a new sweep uses the new one."""
    point = (("method.settings.hidden", "4"),)
    assert T.point_dir(str(tmp_path), point) == str(tmp_path / "method.settings.hidden=4")
    (tmp_path / "method.settings.hidden=4.0").mkdir()
    assert T.point_dir(str(tmp_path), point) == str(tmp_path / "method.settings.hidden=4.0")
    (tmp_path / "method.settings.hidden=4").mkdir()
    assert T.point_dir(str(tmp_path), point) == str(tmp_path / "method.settings.hidden=4")


def test_a_runner_with_workers_takes_signals_until_it_closes_and_says_where_it_stopped():
    """A --jobs runner's stop request took signals only while its pool trained: one between a
    tuned sweep's stages was called an interruption of runs with resume points, and a rerun with
    one run left (trained in this process) had no stop request at all (review48)."""
    import signal

    from svp.engine import signals
    from svp.engine import tune as T
    before = signal.getsignal(signal.SIGINT)
    runner = T.Runner(2)
    with pytest.raises(KeyboardInterrupt, match=r"^SIGINT received between runs: no run was training"):
        with runner:
            assert runner.run_all([]) == []   # nothing to train: the stop request is in all the same
            assert isinstance(getattr(signal.getsignal(signal.SIGINT), "__self__", None), signals.StopRequest)
            runner._stop.value = int(signal.SIGINT)   # as its handler sets it
            runner.run_all([])
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt, match=r"^SIGTERM received after the last run had finished$"):
        with T.Runner(2) as runner:
            runner.run_all([])
            runner._stop.value = int(signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before
    with T.Runner(1) as runner:   # one at a time: no stop request (each run has its own handlers)
        runner.run_all([])
        assert signal.getsignal(signal.SIGINT) is before


def test_the_sweep_commands_exit_status_and_last_lines_say_what_failed(tmp_path, monkeypatch, capsys):
    """A --tune sweep whose grid point diverged (documented: it cannot win) exited 1, saying
    nothing of why; a --fail-fast sweep called a diverged run 'interrupted', cut its cause at the
    first '.' (inside a weight's name) and advised a rerun, which diverges again (review 55)."""
    from svp.cli import main as svp_main
    calls = []
    _fake_trainer(monkeypatch, lambda lr, c: 50.0, lambda lr, c: 40.0, calls)
    fake = loop.train
    why = "the step made the weights non-finite (base_model.head.weight); lower train.lr"

    def diverging(cfg=None, **kw):
        if float(cfg["train"]["lr"]) > 1e30:
            raise loop.NonFiniteLoss(why, os.path.join(cfg["run"]["output"], cfg["run"]["name"]), 3)
        return fake(cfg, **kw)
    monkeypatch.setattr(loop, "train", diverging)
    base = ["sweep", "--suite", "mini", "--methods", "linear", "--seeds", "0", "--datasets", "digits", *TINY]
    assert svp_main([*base, "--output", str(tmp_path / "tuned"), "--tune", "train.lr=1e-3,1e38"]) == 0
    err = capsys.readouterr().err
    assert "sweep: 1 grid run(s) failed and could not be chosen" in err and ": error:" not in err, err
    assert svp_main([*base, "train.lr=1e38", "--output", str(tmp_path / "plain")]) == 1
    assert capsys.readouterr().err.endswith("svp sweep: error: 1 of 1 run(s) failed; results.csv's error column "
                                            "says why\n")
    rc = svp_main([*base, "train.lr=1e38", "--output", str(tmp_path / "fast"), "--fail-fast"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "fast" / "digits" / "linear" / "seed0"
    assert rc == loop.EXIT_NONFINITE
    assert line == f"svp sweep: error: run {run_dir} stopped the sweep (--fail-fast): {why}", line
