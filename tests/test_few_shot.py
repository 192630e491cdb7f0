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
    assert any("data.val_split=val selects the epoch on all of its images" in m for m in messages)
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
