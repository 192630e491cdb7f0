"""data.shots: few-shot training, N images of each class of the training split, seeded."""
import collections

import numpy as np
import pytest

from svp.cli import main as svp_main
from svp.data.base import few_shot_indices
from svp.engine import config as C
from svp.engine.setup import build_datasets


def test_few_shot_indices_keep_n_of_each_class_and_nest():
    rng = np.random.RandomState(3)
    targets = rng.randint(0, 5, size=200)
    targets[targets == 4] = 3        # class 4 empty
    targets[:2] = 4                  # ... then two images: fewer than the shots asked
    have = collections.Counter(targets.tolist())
    for shots in (1, 3, 8):
        keep = few_shot_indices(targets, shots, seed=7)
        assert keep == sorted(set(keep))   # the dataset's order, no repeats
        assert collections.Counter(targets[keep].tolist()) == {c: min(n, shots) for c, n in have.items()}
    small, large = set(few_shot_indices(targets, 3, 7)), set(few_shot_indices(targets, 8, 7))
    assert small < large                                   # a seed's draws nest
    assert few_shot_indices(targets, 3, 7) == few_shot_indices(list(targets), 3, 7)
    assert few_shot_indices(targets, 3, 7) != few_shot_indices(targets, 3, 8)
    assert few_shot_indices(targets, 10_000, 0) == list(range(200))
    with pytest.raises(ValueError, match="shots must be a positive integer, got 0"):
        few_shot_indices(targets, 0)


def _cfg(*overrides):
    return C.resolve(overrides=("data.dataset=digits", "data.img_size=32", *overrides), use_presets=False)


def _targets(ds):
    return collections.Counter(int(t) for t in ds.targets)


def test_the_training_split_keeps_n_per_class_and_the_others_are_whole(logged):
    (full, _), (val, _), (test, _) = build_datasets(_cfg())
    with logged("svp.engine", "INFO") as messages:
        (train, _), (val3, _), (test3, _) = build_datasets(_cfg("data.shots=3", "train.seed=5"))
    assert len(train) == 30 and set(_targets(train).values()) == {3}
    assert (len(val3), len(test3)) == (len(val), len(test))
    assert "data.shots=3: 30 of the 1000 images of train (3 per class), drawn with seed 5" in messages
    assert any("data.val_split=val selects the epoch on 297 labelled images" in m for m in messages)
    # the images are those few_shot_indices draws from the split, under train.seed when no shots_seed
    items = [full.ds[i][0].tobytes() for i in few_shot_indices(full.targets, 3, 5)]
    assert [train.ds[i][0].tobytes() for i in range(30)] == items
    (other, _), _, _ = build_datasets(_cfg("data.shots=3", "train.seed=6"))
    (fixed5, _), _, _ = build_datasets(_cfg("data.shots=3", "train.seed=6", "data.shots_seed=5"))
    assert train.ds.indices != other.ds.indices and fixed5.ds.indices == train.ds.indices
    # a class with fewer images keeps its own, and the warning names it; no val split, no warning
    with logged("svp.engine", "INFO") as messages:
        (every, _), val_none, _ = build_datasets(_cfg("data.shots=150", "data.val_split=null"))
    assert len(every) == len(full) and val_none is None
    assert any(m.startswith("data.shots=150: 10 class(es) of train have fewer images and keep all they have ('0', "
                            "'1', '2', '3', '4', ...)") for m in messages)
    assert not any("selects the epoch" in m for m in messages)
    # after a val_from_train carve, from the remainder
    (carved, _), (cval, _), _ = build_datasets(_cfg("data.shots=2", "data.options.val_from_train=0.5",
                                                    "data.val_split=val"))
    assert len(carved) == 20 and not set(carved.ds.base.indices[i] for i in carved.ds.indices) & set(cval.ds.indices)


def test_shots_settings_are_checked_and_the_flag_sets_them(capsys):
    for bad in ("data.shots=0", "data.shots=2.5", "data.shots=-1"):
        with pytest.raises(C.ConfigError, match="data.shots=.*expected null or a positive integer"):
            _cfg(bad)
    with pytest.raises(C.ConfigError, match=r"data.shots_seed=-1: expected a non-negative integer below 2\*\*32 .* "
                                            r"or null"):
        _cfg("data.shots_seed=-1")
    assert svp_main(["train", "--dataset", "digits", "--shots", "4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  shots: 4\n" in out and "  shots_seed: null\n" in out


def _csv_root(tmp_path, n_per_class=6, classes=("a", "b", "c")):
    """A csv data root whose test list repeats files of its train list."""
    from PIL import Image
    lines = []
    for c in classes:
        for i in range(n_per_class):
            name = f"{c}{i}.png"
            Image.new("RGB", (8, 8), (10 * i, 40, 90)).save(tmp_path / name)
            lines.append(f"{name},{c}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(lines[::2]) + "\n")
    return str(tmp_path)


def test_the_overlap_check_sees_the_drawn_images(tmp_path, logged):
    root = _csv_root(tmp_path)
    over = ("data.dataset=csv", f"data.root={root}", "data.val_split=null", "data.img_size=32")
    for shots, said in ((None, "9 of its 9 images are also in the training split"),
                        (2, "of its 9 images are also in the training split")):
        with logged("svp.engine", "WARNING") as messages:
            build_datasets(C.resolve(overrides=over + ((f"data.shots={shots}",) if shots else ()), use_presets=False))
        assert any(said in m for m in messages), messages   # (with shots: nothing was said)
    # the images the run reads: the first N under data.max_train_samples / max_eval_samples
    with logged("svp.engine", "WARNING") as messages:
        build_datasets(C.resolve(overrides=over + ("data.max_eval_samples=3",), use_presets=False))
    assert any("3 of its 3 images are also in the training split" in m for m in messages), messages
    with logged("svp.engine", "WARNING") as messages:   # train: the first 5 images, of class a (test: a0, a2, a4)
        build_datasets(C.resolve(overrides=over + ("data.max_train_samples=5",), use_presets=False))
    assert any("3 of its 9 images are also in the training split" in m for m in messages), messages


def test_a_resume_sees_a_draw_from_a_changed_split(tmp_path):
    from svp.engine.loop import check_same_train_data, train_data_id
    from svp.engine.setup import Limited
    from svp.errors import ResumeError
    over = ("data.dataset=csv", "data.val_split=null", "data.test_split=null", "data.img_size=32", "data.shots=2")
    root = _csv_root(tmp_path)
    (before, _), _, _ = build_datasets(C.resolve(overrides=over + (f"data.root={root}",), use_presets=False))
    again = build_datasets(C.resolve(overrides=over + (f"data.root={root}",), use_presets=False))[0][0]
    assert train_data_id(again) == train_data_id(before) and "few_shot_sha256" in train_data_id(before)
    # one image moved from class b to class a: the same draw's labels (2 per class, in class order)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    lines[6] = lines[6].replace(",b", ",a")
    (tmp_path / "train.csv").write_text("\n".join(sorted(lines, key=lambda x: x.split(",")[1])) + "\n")
    (after, _), _, _ = build_datasets(C.resolve(overrides=over + (f"data.root={root}",), use_presets=False))
    assert list(after.targets) == list(before.targets)
    with pytest.raises(ResumeError, match="data.shots draws from a split whose images or labels changed"):
        check_same_train_data(train_data_id(before), train_data_id(after), "run")
    # a split without a draw records what it did before; a resume point written before the draw's
    # record (no such key) is compared on what it has (its few-shot runs were refused: retest 92)
    plain = Limited(before.ds.base, None)
    assert set(train_data_id(plain)) == {"samples", "labels_sha256"}
    older = {k: v for k, v in train_data_id(before).items() if k != "few_shot_sha256"}
    check_same_train_data(older, train_data_id(again), "run")


def test_max_train_samples_cuts_the_split_before_the_draw_and_a_refit_is_refused(tmp_path):
    (full, _), _, _ = build_datasets(_cfg())
    (cut, _), _, _ = build_datasets(_cfg("data.shots=4", "data.max_train_samples=100", "train.seed=2"))
    first = [int(t) for t in full.ds.targets[:100]]
    want = few_shot_indices(first, 4, 2)   # the draw from the first 100 images, every class of them
    assert cut.ds.indices == want and len(cut) == len(want)
    assert set(int(t) for t in cut.targets) == set(first)
    from svp.engine.sweep import sweep
    with pytest.raises(C.ConfigError, match="--tune-refit with data.shots=4: a refit trains on the training and "
                                            "the whole validation split"):
        sweep("mini", ["linear"], [0], str(tmp_path / "sw"), datasets=["digits"], overrides=["data.shots=4"],
              tune=["train.lr=0.01,0.1"], tune_refit=True)
    with pytest.raises(C.ConfigError, match=r"--tune-refit with data.shots=\(tuned\): a refit trains"):
        sweep("mini", ["linear"], [0], str(tmp_path / "sw2"), datasets=["digits"], tune=["data.shots=2,3"],
              tune_refit=True)   # (in the grid: the refit drew from train+val again, retest 92)
    assert not any(tmp_path.rglob("results.json"))


def test_a_small_validation_split_is_not_warned_of(logged):
    with logged("svp.engine", "WARNING") as messages:
        build_datasets(_cfg("data.shots=4", "data.max_eval_samples=20"))   # 20 to select on, 40 trained on
    assert not any("selects the epoch" in m for m in messages)
    with logged("svp.engine", "WARNING") as messages:
        build_datasets(_cfg("data.shots=4", "data.max_eval_samples=41"))
    assert any("data.shots=4 trains on 40 images, but data.val_split=val selects the epoch on 41 labelled images"
               in m for m in messages), messages


def test_a_cut_to_one_class_is_warned_of_as_the_cuts_with_shots_too(tmp_path, logged):
    """With data.shots, data.max_train_samples cutting a split ordered by class to one class was
    refused as a one-class split ("images of 1 class ('a') of 3"), where without shots it is the
    cut's warning (retest 93)."""
    from svp.engine.setup import check_classes_to_learn
    root = _csv_root(tmp_path)
    over = ("data.dataset=csv", f"data.root={root}", "data.val_split=null", "data.img_size=32",
            "data.max_train_samples=5")
    for shots in ((), ("data.shots=2",)):
        cfg = C.resolve(overrides=over + shots, use_presets=False)
        (train, _), _, _ = build_datasets(cfg)
        with logged("svp.engine", "WARNING") as messages:
            check_classes_to_learn(cfg, train)
        assert any("data.max_train_samples=5 keeps images of 1 class of the 3 the training split has (the first 5"
                   in m for m in messages), messages
    assert any("data.shots=2 draws from them" in m for m in messages)


def test_the_short_class_warning_leaves_out_classes_without_images(tmp_path, logged):
    """A class of no training image was listed among those that "keep all they have" (retest 93)."""
    root = _csv_root(tmp_path, n_per_class=4)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(lines[:4] + lines[4:6] + lines[8:]) + "\n")   # b: 2 images
    over = ("data.dataset=csv", f"data.root={root}", "data.val_split=null", "data.img_size=32", "data.shots=3",
            "data.options={classes: [a, b, c, d]}")
    with logged("svp.engine", "WARNING") as messages:
        build_datasets(C.resolve(overrides=over, use_presets=False))
    assert any("1 class(es) of train have fewer images and keep all they have ('b')" in m for m in messages), messages


def test_a_draw_smaller_than_a_batch_or_cut_by_the_batches_is_said(tmp_path, capsys):
    """A batch larger than the draw was refused without naming data.shots (after the model was
    built); a draw of 30 at batch 16 left 14 images out of every epoch unsaid (retest 93)."""
    base = ["train", "--dataset", "digits", "--model", "vim_mini_patch4_32", "--method", "linear", "--epochs", "1",
            "--output", str(tmp_path), "run.progress=none", "data.max_eval_samples=8", "train.warmup_epochs=0"]
    assert svp_main(base + ["--name", "big", "--shots", "1"]) == 2
    assert ("train.batch_size=64 x world size 1 is larger than the training set (10 samples of 'digits', "
            "data.shots=1 per class)") in capsys.readouterr().err
    assert svp_main(base + ["--name", "cut", "--shots", "3", "--batch-size", "16"]) == 0
    log = (tmp_path / "cut" / "train.log").read_text()
    assert "data.shots=3: 30 training images at 16 a step leave 14 of them (47%) out of each epoch" in log
    assert svp_main(base + ["--name", "fits", "--shots", "3", "--batch-size", "10"]) == 0
    assert "out of each epoch" not in (tmp_path / "fits" / "train.log").read_text()
