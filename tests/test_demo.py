"""`svp demo` end to end on a sliver of digits (the full demo is `make demo`)."""
import json
import os

import pytest

from svp.cli import main


@pytest.mark.slow
def test_demo_smoke_prints_table_run_folders_and_figure(tmp_path, capsys, predicted_test_metrics):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--epochs", "1", "--batch-size", "16", "--max-train-samples", "32",
               "--max-eval-samples", "32", "--methods", "linear,svp", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    summary = json.load(open(out / "demo_results.json"))
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"linear", "svp"}
    for m, r in rows.items():
        assert f"run folder ({m}): {r['run_dir']}" in text
        res = json.load(open(os.path.join(r["run_dir"], "results.json")))
        assert res["method"] == m and res["final"]["test_samples"] == 32
        # the table reports the run's own final test top-1, which the saved adapter reproduces
        assert r["test_top1"] == res["final"]["test_top1"]
        assert r["test_top1"] == pytest.approx(predicted_test_metrics(os.path.join(r["run_dir"], "last"), 32)[0])
        assert f"{r['test_top1']:.2f}%" in text
    full = summary["full_finetune"]["trainable_params_without_head"]
    # linear probing trains the head only; SVP a small fraction of the backbone
    assert rows["linear"]["trainable_params_without_head"] == 0
    assert 0 < rows["svp"]["trainable_params_without_head"] < 0.10 * full
    assert "linear probing" in text and "SVP (ours)" in text and "full fine-tuning" in text
    pngs = [f for f in summary["figures"] if f.endswith(".png")]
    assert pngs and all(os.path.isfile(f) for f in pngs)
    assert "gate-activation figures" in text
    assert "10 classes, 32 train / 32 test)" in text  # the samples it ran on, not digits' whole splits


def test_demo_rejects_unknown_method(capsys):
    assert main(["demo", "--methods", "linear,nope"]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [
    (["--methods", ""], "names no method"), (["--methods", "svp,svp"], "names a method twice"),
    (["--lr", "-1"], "--lr must be a finite number > 0"), (["--max-train-samples", "0"], "--max-train-samples must be >= 1"),
    # (inf and a seed past 2**32: every method's run refused them in turn, a table of failures, exit 1)
    (["--lr", "inf"], "--lr must be a finite number > 0"), (["--seed", str(2**32)], "below 2**32"),
    (["--threads", "100000"], "--threads must be between 1 and "),   # (a segmentation fault)
    (["--max-eval-samples", "-2"], "--max-eval-samples must be >= 1"),
    (["--max-train-samples", "16"], "--batch-size 32 is larger than the 16 training images (--max-train-samples)"),
    (["--batch-size", "1001"], "--batch-size 1001 is larger than the 1000 training images"),
    (["--max-train-samples", "16", "--select-lr", "0.1"], "use --batch-size 16 or less"),
    (["--seed", "-1"], "--seed must be >= 0"),   # (each method failed in turn)
    (["--select-lr", "0,0.1"], "expected comma-separated rates > 0"),   # (a rate of 0 won and was the preset)
    (["--select-lr", "0.1", "--preset-out", "."], "--preset-out .: expected a file"),   # (after the whole grid)
    (["--select-lr", "0.1", "--jobs", "-3"], "--jobs -3: expected a positive number"),   # (ran as 1: review 78)
])
def test_demo_refuses_bad_arguments_before_any_run(tmp_path, capsys, flags, words):
    assert main(["demo", "--out", str(tmp_path / "d"), *flags]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_twice_in_the_same_folder_starts_fresh_and_sets_the_old_runs_aside(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--epochs", "1", "--batch-size", "8", "--max-train-samples", "16",
            "--max-eval-samples", "8", "--methods", "linear", "--no-figure", "--quiet"]
    assert main(args) == 0
    first = json.load(open(out / "linear" / "results.json"))
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr()   # was: "run folder ... already holds a run", exit 1
    text = capsys.readouterr().out
    assert f"set aside in {out / 'previous'} (linear, demo_results.json)" in text and "failed" not in text
    again = json.load(open(out / "linear" / "results.json"))
    assert json.load(open(out / "previous" / "linear" / "results.json")) == first
    assert again["final"]["test_top1"] == first["final"]["test_top1"]  # same seed, a fresh run
    assert sorted(os.listdir(out)) == ["demo_results.json", "linear", "previous"]
    # another method: the previous demo's folders all go, not only those of the methods run now
    assert main(args[:-3] + ["bitfit", "--no-figure", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["bitfit", "demo_results.json", "previous"]
    assert sorted(os.listdir(out / "previous")) == ["demo_results.json", "linear"]


def test_select_lr_run_again_reuses_its_finished_runs(tmp_path, capsys, caplog):
    """The documented way to finish an interrupted `svp demo --select-lr` is to run it again; each
    finished grid run was refused as "made with another configuration" (its config.yaml resolved,
    the demo's a partial dict), so the rerun wrote an empty preset over the shipped one."""
    import json
    import logging
    args = ["demo", "--out", str(tmp_path / "d"), "--select-lr", "0.1", "--methods", "linear",
            "--max-train-samples", "32", "--max-eval-samples", "32", "--epochs", "1", "--quiet"]
    with caplog.at_level(logging.ERROR):
        assert main(args) == 0
        first = json.loads((tmp_path / "d" / "demo_preset.json").read_text())
        assert main(args) == 0
    assert not [r for r in caplog.records if "failed" in r.getMessage()], [r.getMessage() for r in caplog.records]
    again = json.loads((tmp_path / "d" / "demo_preset.json").read_text())
    assert first["lr"] == again["lr"] == {"linear": 0.1} and first["val_top1"] == again["val_top1"]


def test_a_ctrl_c_stops_the_demo_not_one_method(tmp_path, capsys, monkeypatch):
    """The demo caught every run's exception to fill its table: a Ctrl-C (the run's
    TrainingStopped, resume point written) only skipped to the next method, exit 1."""
    import svp.engine
    from svp.engine.signals import EXIT_INTERRUPTED, TrainingStopped
    runs = []

    def train(cfg):
        runs.append(cfg["method"]["name"])
        raise TrainingStopped("SIGINT received: stopped after step 3; resume point saved", EXIT_INTERRUPTED, "r")
    monkeypatch.setattr(svp.engine, "train", train)
    assert main(["demo", "--out", str(tmp_path / "d"), "--epochs", "1", "--no-figure"]) == EXIT_INTERRUPTED
    assert runs == ["linear"] and "svp demo: error: stopped during the linear run (SIGINT received: stopped after " \
        "step 3)" in capsys.readouterr().err


def test_an_interrupted_demo_says_what_continues_it_and_summarises_its_runs(tmp_path, capsys, monkeypatch):
    """It printed svp train's advice (`svp train --resume RUN`), which finishes the run but never
    the demo, and wrote no summary; a Ctrl-C while the figure was drawn lost the finished runs'
    table (review of svp demo)."""
    import svp.demo as D
    import svp.engine
    from svp.engine.signals import EXIT_INTERRUPTED, TrainingStopped
    out = tmp_path / "d"

    def train(cfg):
        m = cfg["method"]["name"]
        if m == "svp":
            raise TrainingStopped("SIGINT received: stopped after step 3; resume point saved. Continue with: "
                                  "svp train --resume r", EXIT_INTERRUPTED, "r")
        return {"final": {"test_top1": 50.0}, "trainable_params": 650, "run_dir": str(out / m)}
    monkeypatch.setattr(svp.engine, "train", train)
    assert main(["demo", "--out", str(out), "--epochs", "1", "--methods", "linear,svp"]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "stopped during the svp run" in err and "`svp demo` again starts the demo over" in err, err
    assert "svp train --resume" not in err
    summary = json.loads((out / "demo_results.json").read_text())
    assert summary["interrupted"] == "svp" and [r["method"] for r in summary["rows"]] == ["linear"]

    def interrupted_figure(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(D, "gate_figure", interrupted_figure)
    monkeypatch.setattr(svp.engine, "train", lambda cfg: {"final": {"test_top1": 50.0}, "run_dir": str(out / "x")})
    assert main(["demo", "--out", str(out), "--epochs", "1", "--methods", "linear,svp"]) == EXIT_INTERRUPTED
    cap = capsys.readouterr()
    assert "interrupted while drawing the gate figure" in cap.err and "50.00" in cap.out, cap
    summary = json.loads((out / "demo_results.json").read_text())
    assert summary["interrupted"] == "figures" and [r["method"] for r in summary["rows"]] == ["linear", "svp"]


def test_a_full_disk_stops_the_demo_in_one_line_not_each_method_in_turn(tmp_path, capsys, monkeypatch):
    """A run folder the disk refuses: the demo went on to the next method (which failed the same
    way), then failed again writing its table. Now the first such failure stops it: one line, exit 2."""
    import errno

    import svp.engine
    from svp.engine.rundir import RunFolder
    runs, real_train = [], svp.engine.train

    def train(cfg):
        runs.append(cfg["method"]["name"])
        return real_train(cfg)

    def full(self, fresh):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(self.path, "config.yaml"))
    monkeypatch.setattr(svp.engine, "train", train)
    monkeypatch.setattr(RunFolder, "start", full)
    out = tmp_path / "d"
    rc = main(["demo", "--out", str(out), "--epochs", "1", "--no-figure", "--max-train-samples", "16", "--batch-size", "8",
               "--max-eval-samples", "8", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and runs == ["linear"], (rc, runs, err)
    assert err[-1].startswith("svp demo: error: run folder ") and "(No space left on device)" in err[-1], err
    assert "Traceback" not in "\n".join(err) and not (out / "demo_results.json").exists()


def test_a_press_between_runs_or_while_the_figure_is_drawn_is_not_lost(tmp_path, capsys, monkeypatch):
    """A Ctrl-C just after a run ended landed in a garbage-collection callback, which Python ignores:
    the demo drew its figures and exited 0 (review). Between runs and while the figure is drawn the
    demo's own handler notes it (a second press raises); an ignored SIGINT stays ignored."""
    import signal

    import svp.demo as D
    import svp.engine
    from svp.engine.signals import EXIT_INTERRUPTED
    out = tmp_path / "d"
    ran, drawn = [], []

    def train(cfg):
        ran.append(cfg["method"]["name"])
        os.kill(os.getpid(), signal.SIGINT)   # as the run is being torn down
        return {"final": {"test_top1": 50.0}, "run_dir": str(out / cfg["method"]["name"])}

    def figure(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)   # one press while it is drawn: it finishes
        drawn.append(1)
        return []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)   # (CI's jobs ignore SIGINT)
    try:
        monkeypatch.setattr(svp.engine, "train", train)
        assert main(["demo", "--out", str(out), "--epochs", "1", "--methods", "linear,svp"]) == EXIT_INTERRUPTED
        err = capsys.readouterr().err
        assert ran == ["linear"] and "SIGINT received between runs: stopped before the svp run" in err, err
        assert json.loads((out / "demo_results.json").read_text())["interrupted"] == "svp"
        monkeypatch.setattr(D, "gate_figure", figure)
        monkeypatch.setattr(svp.engine, "train", lambda cfg: {"final": {"test_top1": 50.0},
                                                              "run_dir": str(out / "x")})
        assert main(["demo", "--out", str(out), "--epochs", "1", "--methods", "linear,svp"]) == EXIT_INTERRUPTED
        assert drawn == [1] and json.loads((out / "demo_results.json").read_text())["interrupted"] == "figures"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # put back
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_reader_that_closes_the_pipe_early_does_not_stop_the_demo(tmp_path, monkeypatch, capsys):
    """`svp demo | head`: the first line after the reader went stopped the demo after one run,
    with no summary, blaming the output folder ("cannot write ... (Broken pipe)"; review38)."""
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = tmp_path / "d"
    rc = main(["demo", "--out", str(out), "--epochs", "1", "--no-figure", "--max-train-samples", "16",
               "--batch-size", "8", "--max-eval-samples", "8", "--quiet", "--methods", "linear,svp"])
    assert rc == 0 and "error" not in capsys.readouterr().err
    summary = json.loads((out / "demo_results.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["linear", "svp"]


@pytest.mark.slow
def test_a_sigterm_between_two_methods_grids_of_select_lr_stops_it_in_one_line(tmp_path):
    """`svp demo --select-lr --jobs 2` opened a runner per method, and each put the default
    handlers back as it closed: a SIGTERM between two methods' grids (or as the preset was
    written) killed the process without a word, exit 143 (review49). One runner now holds it
    from the first grid until the preset is written."""
    import subprocess
    import sys
    out = tmp_path / "d"
    script = (
        "import os, signal, sys, time\n"
        "import svp.engine.tune as T\n"
        "real, calls = T.tune_cell, []\n"
        "def tune_cell(*a, **k):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"   # the second method's grid, about to start
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)\n"
        "    return real(*a, **k)\n"
        "T.tune_cell = tune_cell\n"
        "from svp.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    # (one rate per method: each grid trains its one run in this process, no workers to start)
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script, "demo", "--out", str(out), "--select-lr", "0.1",
                        "--jobs", "2", "--methods", "linear,bitfit", "--epochs", "1", "--batch-size", "8",
                        "--max-train-samples", "8", "--max-eval-samples", "8", "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, (r.returncode, r.stderr[-3000:])   # (-15: killed by it)
    assert "SIGTERM received: no run is training now" in r.stderr, r.stderr[-3000:]
    assert r.stderr.rstrip().splitlines()[-1] == "svp demo: interrupted", r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # linear's grid ran, bitfit's never started, and no preset claims a selection
    def finished(method):
        return [d for d, _, files in os.walk(out / "select_lr" / method) if "results.json" in files]
    assert len(finished("linear")) == 1 and finished("bitfit") == []
    assert not (out / "demo_preset.json").exists()
