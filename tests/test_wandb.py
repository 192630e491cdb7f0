"""run.wandb: a training run logs its scalars, configuration and results to a Weights & Biases
run, which a resume continues. wandb is not a test dependency (it brings ~100 MB of packages and
starts a service process): a stand-in module records what the run asks of wandb's API
(``init``, ``define_metric``, ``log``, ``summary.update``, ``finish``). The same calls were
checked once against wandb 0.31 in offline mode (docs/training.md, "Weights & Biases")."""
import json
import os
import sys
import types

import pytest

from svp.cli import main as svp_main
from svp.engine.progress import read_wandb_record

MINI = ["--dataset", "digits", "--method", "linear", "--model", "vim_mini_patch4_32", "--epochs", "3",
        "--batch-size", "8", "data.max_train_samples=24", "data.max_eval_samples=8", "train.warmup_epochs=0",
        "data.recipe=plain", "run.progress=none", "train.device=cpu", "run.log_every=1"]


MINI_OVERRIDES = ["data.dataset=digits", "method.name=linear", "model.name=vim_mini_patch4_32", "train.epochs=3",
                  "train.batch_size=8", "data.max_train_samples=24", "data.max_eval_samples=8", "train.warmup_epochs=0",
                  "data.recipe=plain", "run.progress=none", "train.device=cpu", "run.log_every=1"]


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.metrics, self.exit_code = kwargs, [], [], None
        self.summary = {}

    def define_metric(self, name, step_metric=None):
        self.metrics.append((name, step_metric))

    def log(self, row):
        assert self.exit_code is None, "logged after finish"
        self.logged.append(dict(row))

    def finish(self, exit_code=0):
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    mod = types.ModuleType("wandb")

    def init(**kwargs):
        if mod.fail:
            raise RuntimeError("api_key not configured (no-tty)")
        runs.append(FakeRun(**kwargs))
        return runs[-1]
    mod.init, mod.fail, mod.runs = init, False, runs
    mod.Settings = lambda **kw: dict(kw)
    monkeypatch.setitem(sys.modules, "wandb", mod)
    for name in ("WANDB_PROJECT", "WANDB_MODE", "WANDB_ENTITY", "WANDB_QUIET", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    return mod


def test_a_run_logs_each_steps_scalars_once_over_global_step_and_its_results(tmp_path, fake_wandb, capsys):
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "digits/w", "run.wandb=true",
                     "run.wandb_project=vim-digits"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "digits" / "w"
    (run,) = fake_wandb.runs
    init = run.init
    # (run.name whole: a sweep's runs are <dataset>/<method>/seed<N>)
    assert init["project"] == "vim-digits" and init["name"] == "digits/w" and init["dir"] == str(run_dir)
    assert init["resume"] == "allow" and init["id"] == read_wandb_record(str(run_dir / "wandb_run_id"))["id"]
    assert init["config"]["method"]["name"] == "linear" and init["config"]["run"]["wandb"] is True
    assert set(init["tags"]) == {"linear", "digits"}
    assert ("*", "global_step") in run.metrics
    steps = [row["global_step"] for row in run.logged]
    assert steps == list(range(1, 10))   # one row per step, in order (wandb's own step counts rows)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for rec in records:   # the epoch's record in the row of the step it ended at, beside that step's loss
        row = run.logged[rec["step"] - 1]
        assert row["epoch/val_top1"] == rec["val_top1"] and row["epoch/train_loss"] == rec["train_loss"]
        assert "train/loss" in row and "train/lr" in row
    assert sum("epoch/val_top1" in row for row in run.logged) == 3
    results = json.loads((run_dir / "results.json").read_text())
    assert run.summary["selected/test_top1"] == results["val_selected"]["test_top1"]
    assert run.summary["final/epoch"] == 3 and run.summary["trainable_params"] == results["trainable_params"]
    assert run.exit_code == 0


def test_a_resumed_run_continues_the_same_wandb_run_from_its_resume_point(tmp_path, fake_wandb, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    args = ["train", *MINI, "--output", str(tmp_path), "--name", "r", "run.wandb=true"]
    assert svp_main(args + ["debug.stop_at_step=4"]) == 75
    assert svp_main(["train", "--resume", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    first, second = fake_wandb.runs
    assert first.init["id"] == second.init["id"] and first.init["project"] == second.init["project"] == "from-env"
    assert first.exit_code == 0 and second.exit_code == 0   # a stop on request is no failure
    assert [row["global_step"] for row in first.logged] == [1, 2, 3, 4]
    assert [row["global_step"] for row in second.logged] == [5, 6, 7, 8, 9]
    # a resume in a shell without the $WANDB_PROJECT of the start continues in the run's own project
    # (an id lives in one project: the second half went to a second run in project 'svp': retest 97)
    assert read_wandb_record(str(tmp_path / "r" / "wandb_run_id"))["project"] == "from-env"
    assert svp_main(args + ["--name", "s", "debug.stop_at_step=4"]) == 75
    monkeypatch.delenv("WANDB_PROJECT")
    assert svp_main(["train", "--resume", str(tmp_path / "s")]) == 0
    assert "this run's wandb run" in capsys.readouterr().err
    third, fourth = fake_wandb.runs[2:]
    assert third.init["id"] == fourth.init["id"] and fourth.init["project"] == "from-env"
    # the entity likewise: the first attempt's was wandb's default (an offline run's is ""), so a
    # resume under $WANDB_ENTITY stays there, unread, and the record is not rewritten (retest 98)
    assert read_wandb_record(str(tmp_path / "s" / "wandb_run_id"))["entity"] == ""
    assert svp_main(args + ["--name", "t", "debug.stop_at_step=4"]) == 75
    seen = []
    init = fake_wandb.init
    monkeypatch.setattr(fake_wandb, "init", lambda **kw: (seen.append(os.environ.get("WANDB_ENTITY")), init(**kw))[1])
    monkeypatch.setenv("WANDB_ENTITY", "e2")
    capsys.readouterr()
    assert svp_main(["train", "--resume", str(tmp_path / "t")]) == 0
    assert "belongs to wandb's default entity (its first attempt's); it continues there, not in " \
           "$WANDB_ENTITY='e2'" in capsys.readouterr().err
    assert seen == [None] and fake_wandb.runs[-1].init["entity"] is None and os.environ["WANDB_ENTITY"] == "e2"
    assert read_wandb_record(str(tmp_path / "t" / "wandb_run_id"))["entity"] == ""


def test_wandb_turned_on_at_a_resume_starts_logging_there(tmp_path, fake_wandb, capsys):
    args = ["train", *MINI, "--output", str(tmp_path), "--name", "late"]
    assert svp_main(args + ["debug.stop_at_step=4"]) == 75
    assert not fake_wandb.runs and not (tmp_path / "late" / "wandb_run_id").exists()
    assert svp_main(["train", "--resume", str(tmp_path / "late"), "run.wandb=true"]) == 0
    capsys.readouterr()
    (run,) = fake_wandb.runs
    assert [row["global_step"] for row in run.logged] == [5, 6, 7, 8, 9] and run.exit_code == 0


def test_a_non_finite_loss_marks_the_wandb_run_failed(tmp_path, fake_wandb, capsys):
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "nan", "run.wandb=true",
                     "debug.nan_at_step=5"]) == 3
    capsys.readouterr()
    (run,) = fake_wandb.runs
    assert run.exit_code == 1 and [row["global_step"] for row in run.logged] == [1, 2, 3, 4]


def test_without_wandb_or_when_it_cannot_start_the_run_says_what_to_do(tmp_path, fake_wandb, monkeypatch, capsys):
    fake_wandb.fail = True
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "a", "run.wandb=true"]) == 2
    err = capsys.readouterr().err
    assert "wandb could not start a run (RuntimeError: api_key not configured" in err and "WANDB_MODE=offline" in err
    assert "run.wandb=false, at a --resume too" in err
    # not installed: said before any work (the data, the model), and a resume asking for it leaves
    # config.yaml as it was (it was rewritten first, and every plain --resume failed after: retest 94)
    fake_wandb.fail = False
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "r", "debug.stop_at_step=4"]) == 75
    monkeypatch.setitem(sys.modules, "wandb", None)   # (import wandb raises ImportError)
    capsys.readouterr()
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "b", "run.wandb=true"]) == 2
    out, err = capsys.readouterr()
    assert "run.wandb=true needs the wandb package (pip install 'svp-vim[wandb]')" in err
    assert "trainable params" not in out + err and not (tmp_path / "b").exists()
    config = (tmp_path / "r" / "config.yaml").read_text()
    assert svp_main(["train", "--resume", str(tmp_path / "r"), "run.wandb=true"]) == 2
    assert (tmp_path / "r" / "config.yaml").read_text() == config
    assert svp_main(["train", "--resume", str(tmp_path / "r")]) == 0


def test_a_run_finished_inside_a_callers_except_block_is_no_failure(tmp_path, fake_wandb, capsys):
    """sys.exc_info() in the run's finally named the caller's handled error: a finished run was
    marked failed when train() was called from an except block (retest 94)."""
    from svp.engine.loop import train
    try:
        raise ValueError("the caller's own, handled")
    except ValueError:
        train(overrides=[*MINI_OVERRIDES, f"run.output={tmp_path}", "run.name=x", "run.wandb=true"])
    capsys.readouterr()
    (run,) = fake_wandb.runs
    assert run.exit_code == 0 and len(run.logged) == 9


def test_wandb_project_is_text_or_null(tmp_path, capsys):
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "p", "run.wandb_project=[a]",
                     "--print-config"]) == 2
    assert "run.wandb_project=['a']: expected a non-empty string or null" in capsys.readouterr().err
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "p", "run.wandb_project=vim s",
                     "--print-config"]) == 0
    assert "wandb_project: vim s" in capsys.readouterr().out
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "p", "run.wandb_project=a/b",
                     "--print-config"]) == 2   # (wandb refused it only at init, after the data and the model)
    assert "a wandb project name may not hold any of / \\ # ? % :" in capsys.readouterr().err


def test_a_fresh_run_after_an_attempt_without_a_resume_point_is_a_new_wandb_run(tmp_path, fake_wandb, capsys):
    """The attempt's id is set aside with its log (``wandb_run_id.1``): kept, the fresh run had
    continued the attempt's wandb run, its first steps logged twice."""
    args = ["train", *MINI, "--output", str(tmp_path), "--name", "again", "run.wandb=true"]
    assert svp_main(args + ["debug.nan_at_step=2"]) == 3
    run_dir = tmp_path / "again"
    assert not (run_dir / "resume.safetensors").exists()
    assert svp_main(args) == 0
    capsys.readouterr()
    first, second = fake_wandb.runs
    assert first.init["id"] != second.init["id"] and first.exit_code == 1 and second.exit_code == 0
    assert read_wandb_record(str(run_dir / "wandb_run_id.1"))["id"] == first.init["id"]
    assert read_wandb_record(str(run_dir / "wandb_run_id"))["id"] == second.init["id"]
    assert [row["global_step"] for row in second.logged] == list(range(1, 10))


def test_a_failing_sink_does_not_hide_the_runs_own_error_nor_the_others_close(logged):
    """Closed in the run's finally: a TensorBoard flush error raised over the run's own error, and
    the wandb run after it was left open; a summary wandb refuses failed a finished run (reread)."""
    from svp.engine.progress import Scalars, WandbScalars

    class Broken:
        def close(self):
            raise OSError("disk full")

    run = FakeRun()
    run.summary = None   # (summary.update raises)
    sinks = Scalars([Broken(), WandbScalars(run)])
    with logged("svp.engine", "WARNING") as messages:
        sinks.summarise({"final": {"test_top1": 50.0}})
        sinks.close(failed=True)
    assert run.exit_code == 1
    assert any("did not take the run's results" in m for m in messages)
    assert any("closing the run's scalar logs: OSError: disk full" in m for m in messages)
    run = FakeRun()
    with pytest.raises(OSError, match="disk full"):
        Scalars([Broken(), WandbScalars(run)]).close(failed=False)
    assert run.exit_code == 0


def test_wandb_settings_wandb_would_refuse_are_said_before_any_work(tmp_path, fake_wandb, monkeypatch, capsys):
    """A project name over 128 characters, a bad $WANDB_PROJECT, a number for a name, and a sweep
    without the package: each failed at wandb's init after the data and the model were built, or
    every run of the sweep one by one (retest 97)."""
    base = ["train", *MINI, "--output", str(tmp_path), "--name", "p", "run.wandb=true"]
    assert svp_main(base + ["run.wandb_project=" + "p" * 129, "--print-config"]) == 2
    assert "a wandb project name has at most 128 characters, this one 129" in capsys.readouterr().err
    assert svp_main(base + ["run.wandb_project=2024", "--print-config"]) == 2
    assert "give a number as text in quotes (run.wandb_project=\"'2024'\")" in capsys.readouterr().err
    monkeypatch.setenv("WANDB_PROJECT", "a/b")
    assert svp_main(base) == 2
    assert "$WANDB_PROJECT='a/b', which wandb reads as the project, is refused by it: a wandb project name may not hold" in capsys.readouterr().err
    assert not fake_wandb.runs and not (tmp_path / "p").exists()
    # (wandb reads the variable even where svp names the project: retest 99)
    assert svp_main(base + ["run.wandb_project=ok"]) == 2
    assert "$WANDB_PROJECT='a/b', which wandb reads even beside run.wandb_project" in capsys.readouterr().err
    monkeypatch.delenv("WANDB_PROJECT")
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert svp_main(["sweep", "--suite", "mini", "--datasets", "digits", "--methods", "linear", "--seeds", "0",
                     "--output", str(tmp_path / "sw"), "run.wandb=true"]) == 2
    assert "run.wandb=true needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_wandb_modes_disabled_and_offline(tmp_path, fake_wandb, monkeypatch, capsys):
    """WANDB_MODE=disabled left an id file of a run that never existed; offline, wandb printed its
    three lines whatever quiet said: silent there, svp says where the records are (retest 97)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "d", "run.wandb=true"]) == 0
    assert not fake_wandb.runs and not (tmp_path / "d" / "wandb_run_id").exists()
    monkeypatch.setenv("WANDB_MODE", "offline")

    def init(**kwargs):
        run = FakeRun(**kwargs)
        run.settings = types.SimpleNamespace(sync_dir=f"{kwargs['dir']}/wandb/offline-run-x")
        fake_wandb.runs.append(run)
        return run
    monkeypatch.setattr(fake_wandb, "init", init)
    capsys.readouterr()
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "o", "run.wandb=true"]) == 0
    (run,) = fake_wandb.runs
    assert run.init["settings"] == {"quiet": True, "silent": True}
    assert f"wandb (offline): run {run.init['id']}'s records are in {tmp_path / 'o'}/wandb/offline-run-x" in \
        capsys.readouterr().err


def test_an_edited_wandb_run_id_file(tmp_path, monkeypatch):
    """A file without its id line made a run 'None' forced into the file's project, and a project
    wandb refuses in it failed only at init (retest 99)."""
    from svp.engine.progress import wandb_run
    from svp.errors import ConfigError
    path = tmp_path / "wandb_run_id"
    path.write_text("\nproject: x\n")
    assert read_wandb_record(str(path)) == {}
    path.write_text("abc12345\nproject: x\nentity: me\n")
    assert read_wandb_record(str(path)) == {"id": "abc12345", "project": "x", "entity": "me"}
    path.write_text("abc12345\n")   # (an earlier svp's)
    assert read_wandb_record(str(path)) == {"id": "abc12345"}
    path.write_text("abc12345\nproject: a/b\n")
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    cfg = {"run": {"wandb": True, "wandb_project": None}}
    with pytest.raises(ConfigError, match=r"wandb_run_id: project 'a/b': a wandb project name may not hold"):
        wandb_run(cfg, str(tmp_path), True)
