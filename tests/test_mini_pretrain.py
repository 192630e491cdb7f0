"""The procedural source data and the `svp pretrain` loop (tiny configurations)."""
import argparse
import gc

from svp.errors import ConfigError
import json
import os

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from svp.pretrain import fractals as fr
from svp.pretrain import train as pt


def test_categories_and_images_are_deterministic_and_split_disjoint():
    cats = fr.make_categories(6, seed=3)
    assert len(cats) == 6
    again = fr.make_categories(6, seed=3)
    for a, b in zip(cats, again):
        assert np.array_equal(a.A, b.A) and np.array_equal(a.b, b.b)
    other = fr.make_categories(6, seed=4)
    assert not all(np.array_equal(a.A, b.A) for a, b in zip(cats, other))

    x, y = fr.generate_split("train", 6, 5, seed=3, categories=cats)
    x2, y2 = fr.generate_split("train", 6, 5, seed=3)
    assert x.shape == (30, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert np.array_equal(np.bincount(y), [5] * 6)
    h, _ = fr.generate_split("heldout", 6, 5, seed=3, categories=cats)
    # the held-out stream shares no image with the training stream
    flat_train = {img.tobytes() for img in x}
    assert not any(img.tobytes() in flat_train for img in h)
    # images are not blank: a lit figure on a background
    assert all(img.std() > 5 for img in x)


def test_contractive_maps_and_probabilities():
    for cat in fr.make_categories(8, seed=0):
        s = np.linalg.svd(cat.A, compute_uv=False)
        assert (s[:, 0] < 0.9 + 1e-9).all()
        assert abs(cat.p.sum() - 1) < 1e-12 and (cat.p > 0).all()
        assert 2 <= cat.n_maps <= 4


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        fr.make_categories(1, 0)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        fr.generate_split("test", 4, 2)


def test_the_command_refuses_counts_below_one_threads_included(tmp_path, capsys):
    """`svp pretrain --threads 0` trained on one thread and recorded threads 0 (svp demo and svp
    serve refuse it)."""
    from svp.cli import main
    for flag in ("--threads", "--epochs"):
        assert main(["pretrain", "--out", str(tmp_path / "p"), flag, "0"]) == 2
        assert f"svp pretrain: error: {flag} must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    # rates, smoothing and the paths, before any training: they were torch's tracebacks, at the first
    # step or, for an --export folder, after the whole run
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    for flags, words in ((["--lr", "-1"], "--lr must be a finite number > 0"),
                         (["--label-smoothing", "2"], "--label-smoothing"),
                         (["--weight-decay", "-1"], "--weight-decay must be finite numbers >= 0"),
                         # (inf trained, then stopped as a divergence; 100000 threads: a segfault)
                         (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
                         (["--weight-decay", "inf"], "--weight-decay must be finite numbers >= 0"),
                         (["--threads", "100000"], "--threads must be between 1 and "),
                         (["--export", str(tmp_path / "adir")], "a folder, expected a .safetensors file")):
        assert main(["pretrain", "--out", str(tmp_path / "p"), *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert main(["pretrain", "--out", str(tmp_path / "afile")]) == 2
    assert "a file, expected a folder" in capsys.readouterr().err
    # one class was the fractal generator's traceback; a negative warm-up started part-way along
    # the cosine, silently; 10**9 classes drew categories for minutes, then ran out of memory
    for flags, words in ((["--num-classes", "1"], "--num-classes must be >= 2, got 1"),
                         (["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
                         (["--num-classes", str(10**9)], f"{10**9} classes x (500 + 50) images are ")):
        assert main(["pretrain", "--out", str(tmp_path / "p"), *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()


def test_a_negative_seed_a_model_of_another_size_and_a_diverging_run_are_one_line(tmp_path, capsys):
    """--seed -1 was numpy's traceback after the folder was made; a 64 px model trained on the
    32 px fractals resampled, its card saying 64x64; a non-finite loss a RuntimeError traceback,
    not in pretrain.log (review of svp pretrain)."""
    from svp.cli import main
    for flags, words in ((["--seed", "-1"], "--seed must be >= 0, got -1"),
                         (["--seed", str(2**62)], "--seed must be <= "),
                         (["--model-kwargs", '{"depth": 1, "img_size": 64}'],
                          "--model vim_mini_patch4_32 takes 64x64 images, and the fractals are 32x32"),
                         (["--model", "vim_tiny_patch16_224"], "takes 224x224 images")):
        assert main(["pretrain", "--out", str(tmp_path / "p"), *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()
    out = tmp_path / "nan"
    rc = main(["pretrain", "--out", str(out), "--num-classes", "2", "--per-class", "8", "--heldout-per-class", "1",
               "--epochs", "1", "--batch-size", "8", "--lr", "1e30", "--warmup-steps", "0", "--threads", "1",
               "--model-kwargs", '{"depth": 1, "embed_dim": 16}'])
    err = capsys.readouterr().err
    assert rc == 3 and "svp pretrain: error: non-finite loss" in err and "Traceback" not in err, err
    assert "non-finite loss" in (out / "pretrain.log").read_text()


def test_one_pretrain_a_folder_and_a_fresh_run_does_not_overwrite_another(tmp_path, capsys, monkeypatch):
    """Two `svp pretrain` wrote one --out at once (a --resume beside the running one, a fresh run
    with another seed), and a fresh run overwrote a finished run's checkpoint and summary."""
    from svp.cli import main
    from svp.engine.runlock import RunLock
    from svp.pretrain import train as pt
    ran = []
    monkeypatch.setattr(pt, "pretrain", lambda args, log=print: ran.append(args.out) or
                        open(os.path.join(args.out, "checkpoint.safetensors"), "wb").close())
    out = str(tmp_path / "p")
    os.makedirs(out)
    holder = RunLock(out, "pretrain.lock").acquire("pretrain")
    try:
        for flags in ([], ["--resume"]):
            assert main(["pretrain", "--out", out, *flags]) == 2
            err = capsys.readouterr().err
            assert f"pretrain folder {out} is in use by process {os.getpid()}" in err, err
    finally:
        holder.release()
    assert ran == []
    assert main(["pretrain", "--out", out]) == 0 and ran == [out]
    assert not os.path.exists(os.path.join(out, "pretrain.lock"))   # (released)
    assert main(["pretrain", "--out", out, "--seed", "1"]) == 2
    assert "holds a pretraining run" in capsys.readouterr().err and ran == [out]
    assert main(["pretrain", "--out", out, "--resume"]) == 0 and ran == [out, out]


def test_out_of_memory_in_pretrain_names_what_to_lower(tmp_path, capsys, monkeypatch):
    """The one line named the batch and train.eval_batch_size, not pretrain's image counts (what
    --per-class 10**9 had made too many of)."""
    from svp.cli import main
    from svp.pretrain import train as pt

    def oom(args, log=print):
        raise MemoryError("Unable to allocate 119. GiB")
    monkeypatch.setattr(pt, "pretrain", oom)
    assert main(["pretrain", "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("svp pretrain: error: out of memory (Unable to allocate 119. GiB): fewer images "
                              "(--num-classes, --per-class"), err
    assert "eval_batch_size" not in err[-1]


def _args(out, **kw):
    d = dict(pt.DEFAULTS, out=str(out), num_classes=3, per_class=8, heldout_per_class=4, epochs=2,
             batch_size=8, warmup_steps=2, ckpt_every=2, threads=1, resume=False, export=None,
             model_kwargs={"depth": 2, "embed_dim": 32}, command_line="svp pretrain (test)")
    d.update(kw)
    return argparse.Namespace(**d)


def _stopped_at(step, args):
    """``pt.pretrain(args)`` stopped as a kill at the start of ``step`` would stop it: its last
    checkpoint is what stays."""
    orig = pt.lr_at

    class Stop(Exception):
        pass

    def lr_stop(s, total, a):
        if s == step:
            raise Stop
        return orig(s, total, a)
    pt.lr_at = lr_stop
    try:
        with pytest.raises(Stop):
            pt.pretrain(args, log=lambda m: None)
    finally:
        pt.lr_at = orig


def test_pretrain_resume_reproduces_uninterrupted_run_and_export_card(tmp_path):
    # 3 classes x 8 = 24 images, batch 8 -> 3 steps/epoch, 6 steps in all
    full = pt.pretrain(_args(tmp_path / "full", export=str(tmp_path / "w.safetensors")), log=lambda m: None)
    assert full["steps"] == 6
    # the reported held-out accuracies are those of the exported weights on the held-out images
    exported = timm.create_model("vim_mini_patch4_32", num_classes=3, depth=2, embed_dim=32).eval()
    exported.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    cats = fr.make_categories(3, 0)
    card = json.load(open(tmp_path / "w.json"))
    for per_class, reported in ((4, full["heldout_accuracy"]),
                                (10, card["source_task"]["heldout_test_subset"]["accuracy"])):
        images, labels = fr.generate_split("heldout", 3, per_class, 0, categories=cats)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
        with torch.no_grad():
            predicted = exported(x).argmax(-1).numpy()
        assert reported == pytest.approx(float(np.mean(predicted == labels)))
    assert card["source_task"]["heldout"]["accuracy"] == full["heldout_accuracy"]

    # the same run killed right after step 3 (its checkpoint), then resumed
    _stopped_at(3, _args(tmp_path / "resume", epochs=2, ckpt_every=3))
    import svp.pretrain.train as mod
    with open(tmp_path / "resume" / "checkpoint.json") as f:
        assert json.load(f)["step"] == 3
    with pytest.raises(ConfigError, match=r"--epochs 2 -> 3"):  # another schedule: not this run's steps
        pt.pretrain(_args(tmp_path / "resume", epochs=3, ckpt_every=3, resume=True), log=lambda m: None)
    # the checkpoint it resumed from is no longer mapped when the next one replaces it: the tensors
    # read stayed alive, views of the file's pages, and on Windows a mapped file cannot be replaced
    ckpt_path = str(tmp_path / "resume" / "checkpoint.safetensors")
    save, mapped_at_save = mod.atomic_save_safetensors, []

    def checked_save(path, *a, **k):
        if path == ckpt_path and os.path.exists("/proc/self/maps"):
            gc.collect()
            with open("/proc/self/maps") as f:
                mapped_at_save.append(ckpt_path in f.read())
        return save(path, *a, **k)
    mod.atomic_save_safetensors = checked_save
    try:
        resumed = pt.pretrain(_args(tmp_path / "resume", epochs=2, ckpt_every=3, resume=True, command_line="again"),
                              log=lambda m: None)
    finally:
        mod.atomic_save_safetensors = save
    assert not any(mapped_at_save) and (mapped_at_save or not os.path.exists("/proc/self/maps"))
    # the epoch finished before the resume point stays in the history, with its logged loss
    assert [h["epoch"] for h in resumed["history"]] == [h["epoch"] for h in full["history"]] == [0, 1]
    assert resumed["history"][0] == full["history"][0]

    a = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "resume" / "checkpoint.safetensors"))
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys and set(a) == set(b)
    for k in model_keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)

    assert card["sha256"] == pt.sha256_file(str(tmp_path / "w.safetensors"))
    assert card["architecture"]["depth"] == 2 and card["architecture"]["embed_dim"] == 32
    assert card["source_task"]["num_classes"] == 3
    assert card["command"] == "svp pretrain (test)"


def test_a_signal_saves_the_step_under_way_and_resume_finishes_the_same_run(tmp_path, monkeypatch):
    """A Ctrl-C ended `svp pretrain` without a checkpoint: every step since the last --ckpt-every
    one was lost. Now the step under way ends, is saved, and the run stops (exit 130); a copy of
    the signal (a wrapper passing it on) is not a second one."""
    import os
    import signal

    full = pt.pretrain(_args(tmp_path / "full", ckpt_every=100), log=lambda m: None)
    orig, before = pt.lr_at, signal.getsignal(signal.SIGINT)   # (ignored under CI's background jobs)

    def ctrl_c(step, total, args):
        if step == 4:   # in epoch 1's second step, no checkpoint due until the end
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return orig(step, total, args)
    monkeypatch.setattr(pt, "lr_at", ctrl_c)
    with pytest.raises(pt.Interrupted, match=r"SIGINT received: stopped after step 5/6; checkpoint saved"):
        pt.pretrain(_args(tmp_path / "cut", ckpt_every=100), log=lambda m: None)
    assert signal.getsignal(signal.SIGINT) is before   # put back
    with open(tmp_path / "cut" / "checkpoint.json") as f:
        assert json.load(f)["step"] == 5
    monkeypatch.setattr(pt, "lr_at", orig)
    resumed = pt.pretrain(_args(tmp_path / "cut", ckpt_every=100, resume=True), log=lambda m: None)
    assert resumed["history"] == full["history"]
    a = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_pretrain_resume_of_a_damaged_checkpoint_is_one_error_naming_the_file(tmp_path):
    """A cut-off checkpoint.safetensors was a SafetensorError traceback, a damaged
    checkpoint.json a JSONDecodeError (exit 1)."""
    from svp.errors import ResumeError
    out = tmp_path / "run"
    pt.pretrain(_args(out, epochs=1, ckpt_every=1), log=lambda m: None)
    ckpt, state = out / "checkpoint.safetensors", out / "checkpoint.json"
    good_ckpt, good_state = ckpt.read_bytes(), state.read_text()
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(ckpt), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert json.loads(meta["state"]) == json.loads(good_state)   # the state in the weights' own file

    def old_format(state_text):   # a checkpoint of an earlier version: the state in checkpoint.json only
        save_file(tensors, str(ckpt))
        state.write_text(state_text)
    for damage, name in ((lambda: ckpt.write_bytes(good_ckpt[:100]), "checkpoint.safetensors"),
                         (lambda: save_file(tensors, str(ckpt), metadata={"state": "{cut"}), "checkpoint.safetensors"),
                         (lambda: old_format(good_state[:20]), "checkpoint.json"),
                         (lambda: old_format("[]"), "checkpoint.json")):
        ckpt.write_bytes(good_ckpt)
        state.write_text(good_state)
        damage()
        with pytest.raises(ResumeError, match=f"--resume: .*{name}"):
            pt.pretrain(_args(out, epochs=1, ckpt_every=1, resume=True), log=lambda m: None)
    # a kill between the two files left the weights of a later step beside an earlier checkpoint.json,
    # resumed as that earlier step: the weights' own state is read
    ckpt.write_bytes(good_ckpt)
    earlier = json.loads(good_state)
    earlier["step"] = 0
    state.write_text(json.dumps(earlier))
    logged = []
    pt.pretrain(_args(out, epochs=1, ckpt_every=1, resume=True), log=logged.append)
    assert any(f"at step {json.loads(good_state)['step']}/" in m for m in logged), logged


def test_a_pretrain_runs_own_checkpoint_loads_as_backbone_weights(tmp_path, caplog):
    """`svp train --checkpoint OUT/checkpoint.safetensors` read 'model.*' and AdamW's 'exp_avg.*'
    as weights ("141 missing ... 572 unexpected"): its model.* weights load, as the export's do."""
    import logging

    from svp.models.loading import load_checkpoint_into
    said = []
    pt.pretrain(_args(tmp_path / "p", epochs=1, resume=True, export=str(tmp_path / "w.safetensors")),
                log=said.append)
    assert f"--resume: no {tmp_path / 'p' / 'checkpoint.safetensors'} yet; starting at step 0" in said   # (was silent)

    def mini():
        return timm.create_model("vim_mini_patch4_32", num_classes=3, depth=2, embed_dim=32)
    from_export, from_run = mini(), mini()
    load_checkpoint_into(from_export, str(tmp_path / "w.safetensors"))
    with caplog.at_level(logging.WARNING, logger="svp.models.loading"):
        load_checkpoint_into(from_run, str(tmp_path / "p" / "checkpoint.safetensors"))
    assert "an svp pretrain checkpoint: loading its model.* weights" in caplog.text
    a, b = from_export.state_dict(), from_run.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


STAGE_CHILD = """import signal, sys, time
def stop(signum, frame):
    time.sleep(0.6)                       # the step under way, then its save
    open(sys.argv[1], "w").write("saved")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("ready", flush=True)
time.sleep(60)
"""

SUITE_PARENT = """import sys
from svp.pretrain import mini_suite
mini_suite._run_stage([sys.executable, "-c", sys.argv[1], sys.argv[2]], None)
"""


@pytest.mark.slow   # starts processes
def test_a_ctrl_c_of_the_mini_suite_lets_the_stage_under_way_save(tmp_path):
    """The suite ran each stage with subprocess.call, which kills the command 0.25 s after a
    Ctrl-C: `svp pretrain` or `svp sweep`, stopping after its step with a resume point, was
    killed before it had saved. A signal sent to the suite alone is passed on."""
    import signal
    import subprocess
    import sys
    marker = tmp_path / "saved"
    # (SIGINT as a terminal leaves it: CI's background jobs start with it ignored, kept by children)
    parent = subprocess.Popen([sys.executable, "-c", SUITE_PARENT, STAGE_CHILD, str(marker)],
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert parent.stdout.readline().strip() == "ready"
    parent.send_signal(signal.SIGINT)    # to the suite alone
    assert parent.wait(timeout=60) == 130
    assert marker.read_text() == "saved"


def test_a_ctrl_c_of_a_stage_on_windows_waits_for_the_command_without_forwarding_it(monkeypatch):
    """On Windows Popen.send_signal(SIGINT) raises ValueError, and the console already gave the
    command the Ctrl-C: the suite waits for it instead (simulated: FORWARD_SIGINT off)."""
    import svp.pretrain.mini_suite as ms

    class Child:
        waits, sent = 0, []

        def __init__(self, cmd, env):
            pass

        def wait(self):
            Child.waits += 1
            if Child.waits == 1:
                raise KeyboardInterrupt
            return 130

        def send_signal(self, sig):
            raise ValueError(f"Unsupported signal: {sig}")   # as CPython's on Windows

        def kill(self):
            raise AssertionError("killed")
    monkeypatch.setattr(ms.subprocess, "Popen", Child)
    monkeypatch.setattr(ms, "FORWARD_SIGINT", False)
    with pytest.raises(SystemExit) as e:
        ms._run_stage(["svp", "sweep"], {})
    assert e.value.code == 130 and Child.waits == 2


PRETRAIN_TINY = ["--num-classes", "2", "--per-class", "8", "--heldout-per-class", "1", "--epochs", "1",
                 "--batch-size", "8", "--threads", "1", "--model-kwargs", '{"depth": 1, "embed_dim": 16}']


def test_a_reader_that_closes_the_pipe_early_does_not_stop_pretraining(tmp_path, monkeypatch, capsys):
    """`svp pretrain | head`: the first log line after the reader went stopped the run, and the
    words blamed the output folder ("cannot write ... (Broken pipe)") and a checkpoint that did
    not exist (review38)."""
    import io
    import sys

    from svp.cli import main

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = tmp_path / "p"
    assert main(["pretrain", "--out", str(out), *PRETRAIN_TINY, "--export", str(tmp_path / "w.safetensors")]) == 0
    assert (out / "checkpoint.safetensors").exists() and (tmp_path / "w.safetensors").exists()
    assert "error" not in capsys.readouterr().err


def test_pretrain_under_a_c_locale_with_a_non_ascii_folder_exports_and_resumes(tmp_path):
    """LANG=C without UTF-8 mode: the model card's strict UTF-8 and the log's ASCII refused a
    non-ASCII --out (UnicodeEncodeError, and every --resume of the run failed the same way)."""
    import subprocess
    import sys
    env = dict(os.environ, LANG="C", LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", OMP_NUM_THREADS="1")
    base = os.fsencode(str(tmp_path))
    out, export = base + "/pr\xc3\xab".encode("latin-1"), base + b"/w\xc3\xa9.safetensors"
    cmd = [sys.executable.encode(), b"-m", b"svp", b"pretrain", b"--out", out,
           *[a.encode() for a in PRETRAIN_TINY], b"--export", export]
    for extra in ([], [b"--resume"]):
        r = subprocess.run(cmd + extra, env=env, capture_output=True, timeout=300)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr[-3000:]
    assert os.path.isfile(out + b"/checkpoint.safetensors") and os.path.isfile(export)
    assert out in open(base + b"/MODEL_CARD.md", "rb").read()   # the command, with the folder's own bytes
    assert os.path.getsize(out + b"/pretrain.log") > 0


def test_a_resume_with_drop_path_is_the_same_run_and_the_card_says_how_it_was_trained(tmp_path, monkeypatch):
    """With drop_path_rate in --model-kwargs a resume drew other masks than the run that never
    stopped (the global RNG was not saved); the card said "no drop-path", kept the last segment's
    seconds only (a resume that only exported said 0.2 s) and told users to load the bundled
    weights with pretrained=True (review 60). The run's summary counted the held-out evaluation
    after the last checkpoint as training, so a resume that only exported said 0.1 s where the run
    had said 0.2 s (the version-floor CI run, once): each evaluation here takes 0.3 s more, so that
    difference cannot round away."""
    import time
    evaluate = pt.evaluate
    monkeypatch.setattr(pt, "evaluate", lambda *a, **k: (time.sleep(0.3), evaluate(*a, **k))[1])
    kw = {"depth": 2, "embed_dim": 32, "drop_path_rate": 0.3}
    full = pt.pretrain(_args(tmp_path / "full", model_kwargs=kw, export=str(tmp_path / "w.safetensors")),
                       log=lambda m: None)
    _stopped_at(3, _args(tmp_path / "resume", model_kwargs=kw, ckpt_every=3))
    resumed = pt.pretrain(_args(tmp_path / "resume", model_kwargs=kw, ckpt_every=3, resume=True), log=lambda m: None)
    a = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "resume" / "checkpoint.safetensors"))
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], b[k]), k
    assert [(s["from_step"], s["to_step"]) for s in resumed["segments"]] == [(0, 3), (3, 6)]
    assert resumed["train_seconds"] == pytest.approx(sum(s["seconds"] for s in resumed["segments"]), abs=0.11)

    card = json.load(open(tmp_path / "w.json"))
    assert card["drop_path_rate"] == 0.3 and card["model_kwargs"] == kw
    assert card["train_seconds"] == full["train_seconds"] and card["segments"] == full["segments"]
    md = (tmp_path / "MODEL_CARD.md").read_text()
    assert "drop-path 0.3" in md and "no drop-path" not in md and "pretrained=True" not in md
    assert 'build_model(ModelSpec("vim_mini_patch4_32", checkpoint="w.safetensors", num_classes=10' in md
    # a resume of the finished run that only exports keeps the run's training time
    logged = []
    again = pt.pretrain(_args(tmp_path / "full", model_kwargs=kw, resume=True, export=str(tmp_path / "w.safetensors")),
                        log=logged.append)
    assert again["train_seconds"] == full["train_seconds"] and again["train_seconds_this_run"] == 0.0
    assert json.load(open(tmp_path / "w.json"))["train_seconds"] == full["train_seconds"]
    assert any("resumed from" in m for m in logged)
    # the card's own snippet builds the exported weights
    from svp.build import ModelSpec, build_model
    model = build_model(ModelSpec("vim_mini_patch4_32", checkpoint=str(tmp_path / "w.safetensors"),
                                  num_classes=10, kwargs=kw))
    w = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(model.layers[1].mixer.in_proj.weight, w["layers.1.mixer.in_proj.weight"])


def test_a_resume_on_other_threads_says_its_bits_differ_and_a_short_warm_up_is_said(tmp_path):
    logged = []
    first = _args(tmp_path / "p", epochs=1, warmup_steps=50)
    pt.pretrain(first, log=logged.append)
    assert any("--warmup-steps 50 is not below the run's 3 steps" in m for m in logged), logged
    _stopped_at(2, _args(tmp_path / "q", epochs=1, ckpt_every=2))
    logged.clear()
    threads = torch.get_num_threads()
    try:
        done = pt.pretrain(_args(tmp_path / "q", epochs=1, ckpt_every=2, resume=True, threads=2), log=logged.append)
    finally:
        torch.set_num_threads(threads)
    assert any("ran on 1 thread(s)" in m and "these run on 2" in m for m in logged), logged
    assert [s["threads"] for s in done["segments"]] == [1, 2]


def test_an_export_that_cannot_be_written_as_asked_is_refused_before_the_run(tmp_path, capsys):
    """Each was found after the whole run, or never: an export under a file, or equal to --out,
    failed at the end; w.json had its card written over its weights (rc 0); an export named as
    the run's checkpoint replaced it; a FIFO, link or /dev/null was replaced by a file; a user's own
    MODEL_CARD.md was replaced; a non-Vim model failed its export with a traceback; num_classes in
    --model-kwargs was ignored; a folder of other files took the run's files (review 60)."""
    from svp.cli import main
    (tmp_path / "afile").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "MODEL_CARD.md").write_text("# my notes\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    (tmp_path / "notes" / ".gitkeep").write_text("")   # (hidden files are not counted)
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.symlink(tmp_path / "afile", tmp_path / "link.safetensors")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint.safetensors").write_bytes(b"")
    os.symlink(tmp_path / "other", tmp_path / "to_other")
    out = tmp_path / "p"
    for flags, words in (
            (["--export", str(tmp_path / "afile" / "w.safetensors")], f"{tmp_path / 'afile'} is a file, where a folder"),
            (["--export", str(out)], "expected a file name ending in .safetensors"),
            (["--export", str(out / "w.json")], "expected a file name ending in .safetensors"),
            (["--export", str(out / "checkpoint.safetensors")], "checkpoint.safetensors is one of the run's own files"),
            # (through a link to --out: retest 64)
            (["--out", str(tmp_path / "other"), "--resume", "--export",
              str(tmp_path / "to_other" / "checkpoint.safetensors")], "is one of the run's own files"),
            (["--export", str(tmp_path / "pipe.safetensors")], "is not a regular file"),
            (["--export", str(tmp_path / "link.safetensors")], "is not a regular file"),
            (["--export", str(tmp_path / "mine" / "w.safetensors")], "holds a MODEL_CARD.md that svp pretrain did not"),
            (["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32}'],
             "is a VisionTransformer, not a Vision Mamba"),
            (["--model-kwargs", '{"num_classes": 10}'], "--model-kwargs sets num_classes (10)"),
            (["--model-kwargs", '{"no_such_argument": 1}'], "does not build ("),
            (["--model", "vim_nonexistent"], "--model vim_nonexistent does not build (")):
        assert main(["pretrain", "--out", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (flags, err)
        assert not out.exists(), flags
    assert stat_is_fifo(tmp_path / "pipe.safetensors") and (tmp_path / "link.safetensors").is_symlink()
    assert (tmp_path / "mine" / "MODEL_CARD.md").read_text() == "# my notes\n"
    assert main(["pretrain", "--out", str(tmp_path / "notes")]) == 2
    assert "holds other files (todo.txt); give a new or empty folder" in capsys.readouterr().err


def stat_is_fifo(path) -> bool:
    import stat
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_a_sigterm_while_the_data_are_made_is_an_interruption(tmp_path):
    """SIGTERM before the loop's handler ended the process with no word and an empty log, where
    SIGINT said "interrupted" (review 60). (In a process of its own: without the handler the
    signal ends the process it reaches.)"""
    import subprocess
    import sys
    script = f"""
import os, signal, sys
from svp.cli import main
from svp.pretrain import fractals, train
real = fractals.generate_split
def term(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)
train.generate_split = term
rc = main(["pretrain", "--out", {str(tmp_path / "p")!r}, "--num-classes", "2", "--per-class", "8",
           "--heldout-per-class", "1", "--epochs", "1", "--batch-size", "8",
           "--model-kwargs", '{{"depth": 1, "embed_dim": 16}}'])
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "not put back"
sys.exit(rc)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 130 and "svp pretrain: interrupted" in r.stderr, (r.returncode, r.stderr[-2000:])


def test_two_exports_to_one_file_write_one_after_the_other(tmp_path):
    """Review 71: two runs exporting to one --export at once left one run's weights beside the
    other's JSON card (its sha256 not the file's), both saying "exported". The export holds a
    lock file beside the weights while it writes them and their cards; a second export waits."""
    import threading
    import time as _time

    from svp.pretrain.train import _export_lock
    path = str(tmp_path / "w.safetensors")
    order = []
    first = _export_lock(path).__enter__()
    assert os.path.isfile(str(tmp_path / ".w.safetensors.lock"))

    def second():
        with _export_lock(path, wait_s=30):
            order.append(("second", _time.monotonic()))
    t = threading.Thread(target=second)
    t.start()
    _time.sleep(0.6)
    assert not order   # (waiting)
    released = _time.monotonic()
    order.append(("first released", released))
    first.__exit__(None, None, None)
    t.join(30)
    assert [o[0] for o in order] == ["first released", "second"], order
    assert not os.path.exists(str(tmp_path / ".w.safetensors.lock"))   # (nothing left beside the weights)
    held = _export_lock(path).__enter__()
    try:   # a wait that runs out names the holder
        from svp.errors import ResumeError
        with pytest.raises(ResumeError, match=r"export .* is in use by process \d+"):
            _export_lock(path, wait_s=0.3).__enter__()
    finally:
        held.__exit__(None, None, None)
    # an --export into a folder that does not exist yet: it is made (retest 73: the lock file,
    # taken before the folder was made, stopped the export after the whole run)
    import hashlib

    from svp.cli import main
    export = tmp_path / "new dir" / "w.safetensors"
    assert main(["pretrain", "--out", str(tmp_path / "p"), *PRETRAIN_TINY, "--export", str(export)]) == 0
    card = json.loads((tmp_path / "new dir" / "w.json").read_text())
    assert card["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest() and card["bytes"] == export.stat().st_size
    assert sorted(os.listdir(tmp_path / "new dir")) == ["MODEL_CARD.md", "w.json", "w.safetensors"]
