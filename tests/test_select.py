"""Result selection (svp.engine.select): pure functions of the metric history."""
import math

import pytest

from svp.engine import config as C
from svp.engine import select


def rec(epoch, val=None, loss=None, test=None):
    r = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_seconds": 2.0, "images_per_s": 10.0 * epoch}
    if val is not None:
        r.update(val_top1=val, val_loss=loss if loss is not None else 1.0)
    if test is not None:
        r["test_top1"], r["test_top5"] = test, 100.0
    return r


def run_selection(history, metric="top1", has_val=True):
    best = None
    for r in history:
        s = select.selection_score(r, metric, has_val)
        if select.improves(s, best):
            best = {"epoch": r["epoch"], "score": s}
    return best["epoch"] if best else None


def test_best_validation_epoch_and_ties_keep_the_earliest():
    hist = [rec(1, 50.0), rec(2, 70.0), rec(3, 70.0), rec(4, 60.0)]
    assert run_selection(hist) == 2
    # by loss: lower is better
    hist = [rec(1, 50.0, 0.9), rec(2, 40.0, 0.5), rec(3, 90.0, 0.7)]
    assert run_selection(hist, "loss") == 2 and run_selection(hist, "top1") == 3


def test_non_finite_scores_never_win_and_unevaluated_epochs_are_skipped():
    hist = [rec(1, 30.0), rec(2, float("nan")), rec(3)]
    assert run_selection(hist) == 1
    assert select.selection_score(rec(2, float("nan")), "top1", True) == -math.inf
    assert select.selection_score(rec(3), "top1", True) is None


def test_without_validation_the_last_epoch_is_selected():
    assert run_selection([rec(1), rec(2), rec(3)], has_val=False) == 3


def test_official_best_test_over_epochs():
    hist = [rec(1, 10.0, test=60.0), rec(2, 90.0, test=75.0), rec(3, 20.0, test=75.0)]
    off = select.best_test_over_epochs(hist)
    assert off["value"] == 75.0 and off["epoch"] == 2 and "OFFICIAL PROTOCOL" in off["note"]
    assert select.best_test_over_epochs([rec(1, 10.0)]) is None


def test_results_record():
    cfg = C.defaults()
    cfg["eval"]["report_best_test"] = True
    hist = [rec(1, 10.0, test=60.0), rec(2, 90.0, test=50.0), rec(3, 20.0, test=70.0)]
    final = {"top1": 70.0, "top5": 99.0, "loss": 0.5, "n": 8}
    best = {"top1": 50.0, "top5": 98.0, "loss": 0.6, "n": 8}
    res = select.results(cfg, hist, 2, final, best, steps=9, stopped_early=False, has_val=True)
    assert res["val_selected"] == {"epoch": 2, "val_top1": 90.0, "val_loss": 1.0, "test_top1": 50.0, "test_top5": 98.0,
                                   "test_loss": 0.6, "test_samples": 8}
    # the two records hold the same keys, each its own epoch's (the last's val_loss was missing)
    assert set(res["final"]) == set(res["val_selected"]) and res["final"]["val_loss"] == hist[-1]["val_loss"]
    assert res["selection_metric"] == "top1"
    assert res["final"]["epoch"] == 3 and res["final"]["test_top1"] == 70.0 and res["final"]["test_samples"] == 8
    assert res["official_best_test_top1"]["value"] == 70.0 and res["epochs_run"] == 3 and res["steps"] == 9
    assert res["final_train_loss"] == pytest.approx(1 / 3)
    assert res["backbone_init"] == "pretrained"  # no checkpoint, not random: bundled/pretrained weights
    import svp
    assert res["svp_version"] == svp.__version__   # (which svp wrote it: retest 82)
    cfg["model"]["random_init"] = True
    assert select.results(cfg, hist, None, None, None, 9, True, False)["backbone_init"] == "random"
    tp = select.throughput(hist)
    assert tp["train_seconds"] == 6.0 and tp["images_per_s"] == pytest.approx(20.0)
