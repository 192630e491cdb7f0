"""Result selection: which epoch is "best", and the ``results.json`` record. Pure
functions of the metric history (unit-tested in tests/test_select.py)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from .._version import __version__


def selection_score(record: dict, metric: str, has_val: bool) -> Optional[float]:
    """Higher is better; None when the epoch was not evaluated on validation. Without a
    validation split the latest epoch wins; a non-finite score never wins."""
    if has_val:
        if "val_top1" not in record:
            return None
        score = record["val_top1"] if metric == "top1" else -record["val_loss"]
    else:
        score = float(record["epoch"])
    return score if math.isfinite(score) else -float("inf")


def improves(score: Optional[float], best: Optional[dict]) -> bool:
    """Does ``score`` beat the best so far (ties keep the earlier epoch)?"""
    return score is not None and (best is None or score > best["score"])


def best_test_over_epochs(history: List[dict]) -> Optional[dict]:
    """The official protocol's number: the best per-epoch test top-1 (earliest epoch on ties)."""
    tests = [(h["test_top1"], h["epoch"]) for h in history if "test_top1" in h]
    if not tests:
        return None
    v, e = max(tests, key=lambda p: (p[0], -p[1]))
    return {"value": v, "epoch": e,
            "note": "OFFICIAL PROTOCOL: best test top-1 over all epochs; selects on the test split, "
                    "so it is optimistic and not a held-out estimate"}


def throughput(history: List[dict]) -> Dict[str, float]:
    seconds = sum(h["train_seconds"] for h in history)
    return {"train_seconds": seconds,
            "images_per_s": sum(h["images_per_s"] * h["train_seconds"] for h in history) / max(seconds, 1e-9)}


def results(cfg: dict, history: List[dict], best_epoch: Optional[int], final_test: Optional[dict],
            best_test: Optional[dict], steps: int, stopped_early: bool, has_val: bool) -> Dict[str, Any]:
    """The results record (without counts, lr, device and files) from the epoch history and
    the test evaluations of the last and the selected weights."""
    t, m = cfg["train"], cfg["model"]
    last = history[-1]
    best_rec = next((h for h in history if h["epoch"] == best_epoch), last)
    res: Dict[str, Any] = {
        "dataset": cfg["data"]["dataset"], "method": cfg["method"]["name"], "seed": int(t["seed"]),
        "model": m["name"], "checkpoint": m["checkpoint"],
        "backbone_init": ("checkpoint" if m["checkpoint"] else "pretrained" if m["pretrained"] or not m["random_init"]
                          else "random"),
        "epochs_run": last["epoch"], "epochs": int(t["epochs"]), "steps": steps,
        "stopped_early": bool(stopped_early),
        "selection": (f"epoch with the best validation {cfg['eval']['metric']} on split "
                      f"{cfg['data']['val_split']!r}" if has_val else "no validation split: the last epoch"),
        # (the metric the epoch was selected by: svp sweep --tune scores its grid points by it)
        "selection_metric": cfg["eval"]["metric"] if has_val else None,
        "val_selected": {"epoch": best_rec["epoch"], "val_top1": best_rec.get("val_top1"),
                         "val_loss": best_rec.get("val_loss"),
                         "test_top1": best_test["top1"] if best_test else None,
                         "test_top5": best_test["top5"] if best_test else None,
                         # (the same keys in both records: the selected epoch's test loss and count
                         # were only in the log, the last epoch's validation loss in metrics.jsonl)
                         "test_loss": best_test["loss"] if best_test else None,
                         "test_samples": best_test["n"] if best_test else 0},
        "final": {"epoch": last["epoch"], "val_top1": last.get("val_top1"), "val_loss": last.get("val_loss"),
                  "test_top1": final_test["top1"] if final_test else None,
                  "test_top5": final_test["top5"] if final_test else None,
                  "test_loss": final_test["loss"] if final_test else None,
                  "test_samples": final_test["n"] if final_test else 0},
        "final_train_loss": last["train_loss"],
        # (the svp that finished the run: a bug report or a comparison across releases names it; each
        # segment's own is in train.log)
        "svp_version": __version__,
    }
    if cfg["eval"]["report_best_test"]:
        official = best_test_over_epochs(history)
        if official:
            res["official_best_test_top1"] = official
    return res


def mean_std(values: List[float], digits: int = 2) -> str:
    """``mean ± sample std`` of ``values``; the value alone for one (a sample std of one value is
    undefined, and "± 0.00" would read as a measured spread); ``-`` for none."""
    if not values:
        return "-"
    import statistics
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
