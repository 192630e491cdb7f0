"""`svp eval` of several adapters on the same images: each one's result and confidence interval,
and McNemar's exact test of each against the first."""
import csv
import json
import math
import os

import pytest
import yaml

from svp.cli import main as svp_main
from svp.engine.evaluate import mcnemar_exact, paired_difference_interval, wilson_interval


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    for a in range(0, 26, 3):
        for b in range(0, 26, 4):
            n, k = a + b, min(a, b)
            want = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
            assert mcnemar_exact(a, b) == pytest.approx(want, rel=1e-11, abs=0), (a, b)
            assert mcnemar_exact(a, b) == mcnemar_exact(b, a)
    assert mcnemar_exact(10, 1) == pytest.approx(24 / 2048, rel=1e-12)   # 2 (C(11,0) + C(11,1)) / 2^11
    assert mcnemar_exact(500, 700) < 1e-8 < mcnemar_exact(500, 560) < 0.1 < mcnemar_exact(500, 520)
    # hundreds of thousands of discordant images: a probability, not an overflow
    assert 0.0 < mcnemar_exact(300_000, 301_000) < 1.0


def test_wilson_interval_solves_its_defining_equation():
    z = 1.959963984540054
    for hits, n in ((0, 10), (3, 10), (10, 10), (85, 100), (1, 1000), (4999, 5000)):
        lo, hi = wilson_interval(hits, n)
        p = hits / n
        assert 0.0 <= lo <= 100 * p <= hi <= 100.0
        for bound in (lo / 100, hi / 100):   # (p_hat - q)^2 = z^2 q (1 - q) / n at each end
            assert (p - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / n, abs=1e-12)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 100.0
    a, b = wilson_interval(85, 100), wilson_interval(850, 1000)
    assert b[1] - b[0] < a[1] - a[0]   # more images, a narrower interval
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paired")
    cfg = {"model": {"name": "vim_tiny_patch16_224", "random_init": True,
                     "kwargs": {"img_size": 32, "patch_size": 4, "stride": 4, "depth": 2, "embed_dim": 32}},
           "data": {"dataset": "digits", "img_size": 32, "recipe": "plain", "max_train_samples": 64,
                    "max_eval_samples": 8},
           "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "warmup_epochs": 0, "lr": 0.05,
                     "lr_scale": False},
           "run": {"output": str(tmp / "runs"), "progress": "none"}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    for method in ("linear", "full"):
        assert svp_main(["train", "-c", str(tmp / "cfg.yaml"), "--name", method, "--method", method, "-q"]) == 0
    return tmp, str(tmp / "runs" / "linear" / "best"), str(tmp / "runs" / "full" / "best")


def _correct(path):
    with open(path) as f:
        return [row["correct"] == "1" for row in csv.DictReader(f)]


def test_several_adapters_are_each_evaluated_and_paired_with_the_first(two_adapters, capsys):
    tmp, lin, full = two_adapters
    common = ["--dataset", "digits", "--max-samples", "120", "--batch-size", "50"]
    single = []
    for i, d in enumerate((lin, full)):
        assert svp_main(["eval", d, *common, "--json", "--predictions", str(tmp / f"p{i}.csv")]) == 0
        single.append(json.loads(capsys.readouterr().out))
    assert svp_main(["eval", lin, full, *common, "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["n"] == 120 and [r["adapter"] for r in both["results"]] == [lin, full]
    for one, r in zip(single, both["results"]):   # the same numbers as evaluated alone
        assert {k: r[k] for k in ("top1", "top5", "loss", "n", "top1_ci95")} == {
            k: one[k] for k in ("top1", "top5", "loss", "n", "top1_ci95")}
        assert r["top1_ci95"] == list(wilson_interval(round(r["top1"] * 1.2), 120))
    first, other = _correct(tmp / "p0.csv"), _correct(tmp / "p1.csv")
    only_other = sum(b and not a for a, b in zip(first, other))
    only_first = sum(a and not b for a, b in zip(first, other))
    assert only_other + only_first > 0   # (else the test below compares nothing)
    (pair,) = both["paired"]
    agree = sum(a and b for a, b in zip(first, other))
    assert pair == {"adapter": full, "against": lin, "top1_diff": pytest.approx(single[1]["top1"] - single[0]["top1"]),
                    "top1_diff_ci95": list(paired_difference_interval(agree, only_first, only_other,
                                                                      120 - agree - only_first - only_other)),
                    "only_this_right": only_other, "only_first_right": only_first,
                    "mcnemar_p": mcnemar_exact(only_first, only_other), "nonfinite": 0, "nonfinite_first": 0}
    assert pair["top1_diff"] == pytest.approx(100 * (only_other - only_first) / 120)
    # --json-list: one adapter in the same form (a script reads one shape whatever the folders)
    assert svp_main(["eval", lin, *common, "--json-list"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone == {"dataset": "digits", "split": "test", "n": 120, "paired": [],
                     "results": [{k: v for k, v in single[0].items() if k != "predictions"}]}
    # the text: each adapter's line, then the comparison
    assert svp_main(["eval", lin, full, *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "digits [test] 120 images, 2 adapters:"
    lo, hi = both["results"][1]["top1_ci95"]
    assert out[2] == (f"  {full}: top-1 {both['results'][1]['top1']:.2f}% (95% CI {lo:.2f}-{hi:.2f})  top-5 "
                      f"{both['results'][1]['top5']:.2f}%  loss {both['results'][1]['loss']:.4f}")
    assert out[3].startswith(f"paired with {lin} on the same images (McNemar's exact test)")
    lo, hi = pair["top1_diff_ci95"]
    assert lo <= pair["top1_diff"] <= hi
    assert out[4] == (f"  {full}: top-1 {pair['top1_diff']:+.2f} points (95% CI {lo:+.2f} to {hi:+.2f}); right "
                      f"where the first is wrong: {only_other}, the reverse: {only_first}; p = {pair['mcnemar_p']:.3g}")


def test_several_adapters_refused_before_the_work(two_adapters, capsys):
    tmp, lin, full = two_adapters
    link = tmp / "again"
    os.symlink(lin, link)
    assert svp_main(["eval", lin, full, str(link), "--dataset", "digits"]) == 2
    assert f"{link}: given twice (as {lin} too); expected different adapter folders" in capsys.readouterr().err
    assert svp_main(["eval", lin, full, "--dataset", "digits", "--predictions", str(tmp / "p.csv")]) == 2
    assert "--predictions writes one adapter's predictions; 2 adapters were given" in capsys.readouterr().err
    assert not (tmp / "p.csv").exists()
    # the adapter whose classes are not the dataset's is the one named
    import shutil
    other = tmp / "reordered"
    shutil.copytree(full, other)
    for f in ("backbone.json", "adapter_config.json"):
        d = json.loads((other / f).read_text())
        if d.get("class_names"):
            d["class_names"] = d["class_names"][1:] + d["class_names"][:1]
        (other / f).write_text(json.dumps(d))
    assert svp_main(["eval", lin, str(other), "--dataset", "digits", "--max-samples", "8"]) == 2
    assert f"its classes are not the adapter's ({other})" in capsys.readouterr().err


def test_every_adapter_is_checked_first_and_a_later_failure_keeps_the_finished(two_adapters, capsys, monkeypatch):
    tmp, lin, full = two_adapters
    common = ["--dataset", "digits", "--max-samples", "20"]
    # a folder that is not there, named last: refused before the first evaluation
    assert svp_main(["eval", lin, full, str(tmp / "nope"), *common]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "nope" in err
    # options among the folders (the parser reads them intermixed)
    assert svp_main(["eval", lin, "--dataset", "digits", full, "--max-samples", "20", "--per-class"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "digits [test] 20 images, 2 adapters:" and out[1].startswith(f"  {lin}: top-1 ")
    assert out[2].startswith("    mean per-class top-1 ") and out[3].split() == ["class", "images", "top-1"]
    assert out[3].startswith("      class")   # each table under its adapter's line
    # a failure after the first evaluation (weights, memory, Ctrl-C): the finished result is kept
    import svp.engine.cli as cli
    from svp.errors import AdapterError
    real, calls = cli._eval_one, []

    def second_fails(d, *a, **k):
        calls.append(d)
        if len(calls) == 2:
            raise AdapterError(f"{d}: its base weights are not these")
        return real(d, *a, **k)
    monkeypatch.setattr(cli, "_eval_one", second_fails)
    assert svp_main(["eval", lin, full, *common]) != 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1].startswith(f"  {lin}: top-1 ") and "its base weights are not these" in err
    calls.clear()
    assert svp_main(["eval", lin, full, *common, "--json"]) != 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["incomplete"] is True and [r["adapter"] for r in doc["results"]] == [lin] and doc["n"] == 20
    assert doc["failed"] == full and doc["paired"] == []
    # the first failing: the document still comes, naming it (a script read nothing: retest 94)
    calls.clear()
    calls.append("one done")
    assert svp_main(["eval", full, lin, *common, "--json"]) != 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["incomplete"] is True and doc["failed"] == full and doc["results"] == [] and doc["paired"] == []
    # the third failing: the two finished ones are still paired, and the failed folder named (retest 93)
    import shutil
    third = str(tmp / "third")
    shutil.copytree(lin, third)

    def third_fails(d, *a, **k):
        if d == third:
            raise AdapterError(f"{d}: its base weights are not these")
        return real(d, *a, **k)
    monkeypatch.setattr(cli, "_eval_one", third_fails)
    assert svp_main(["eval", lin, full, third, *common, "--json"]) != 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] == third and [r["adapter"] for r in doc["results"]] == [lin, full]
    assert [(p["adapter"], p["against"]) for p in doc["paired"]] == [(full, lin)]
    # a device this machine lacks: refused before the header (it was refused after it)
    import torch
    if not torch.cuda.is_available():
        assert svp_main(["eval", lin, full, *common, "--device", "cuda"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "CUDA is not available" in err


def test_non_finite_outputs_are_said_beside_the_paired_test(two_adapters, capsys, monkeypatch):
    tmp, lin, full = two_adapters
    import svp.engine.cli as cli
    real = cli._eval_one

    def broken(d, *a, **k):   # the second adapter's outputs all non-finite: every image wrong
        r = real(d, *a, **k)
        if d == full:
            r.update(top1=0.0, nonfinite=r["n"], correct=[False] * r["n"])
        return r
    monkeypatch.setattr(cli, "_eval_one", broken)
    assert svp_main(["eval", lin, full, "--dataset", "digits", "--max-samples", "30"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].endswith("; 30 of its images gave non-finite outputs, counted wrong")
    assert f"30 of 30 images gave non-finite outputs (nan or inf logits), counted as wrong ({full})" in err
    assert svp_main(["eval", lin, full, "--dataset", "digits", "--max-samples", "30", "--json"]) == 1
    pair = json.loads(capsys.readouterr().out)["paired"][0]
    assert (pair["nonfinite"], pair["nonfinite_first"]) == (30, 0)


def test_a_p_value_below_floats_range_is_said_as_such():
    from svp.engine.cli import _p_text
    assert mcnemar_exact(0, 1100) == 0.0 and _p_text(0.0) == "p < 1e-300"
    assert _p_text(mcnemar_exact(10, 1)) == "p = 0.0117"


def test_the_paired_difference_interval_covers_the_true_difference_95_times_in_100():
    """Newcombe's hybrid score interval for paired accuracies: simulated pairs of models whose hits
    are correlated (as two adapters of one backbone are), the true difference known; the interval
    covers it at its nominal rate (a wrong sign of the correlation term covers 97-99.9%)."""
    import numpy as np
    rng = np.random.default_rng(0)
    for probs, n in (((0.7, 0.1, 0.15, 0.05), 300), ((0.85, 0.02, 0.06, 0.07), 200), ((0.4, 0.2, 0.2, 0.2), 100)):
        truth = 100 * (probs[2] - probs[1])   # (both, only first, only other, neither): other minus first
        tables = rng.multinomial(n, probs, size=4000)
        covered = 0
        for t in tables:
            lo, hi = paired_difference_interval(*map(int, t))
            assert -100 <= lo <= 100 * (int(t[2]) - int(t[1])) / n <= hi <= 100
            covered += lo <= truth <= hi
        assert 0.935 <= covered / len(tables) <= 0.965, (probs, covered / len(tables))
    # the other way round: the interval negated; pairing narrows it against unpaired Wilson intervals
    lo, hi = paired_difference_interval(70, 10, 15, 5)
    assert paired_difference_interval(70, 15, 10, 5) == pytest.approx((-hi, -lo), abs=1e-12)
    l1, u1 = (v / 100 for v in wilson_interval(80, 100))
    l2, u2 = (v / 100 for v in wilson_interval(85, 100))
    unpaired = (100 * (0.05 - math.hypot(0.85 - l2, u1 - 0.8)), 100 * (0.05 + math.hypot(u2 - 0.85, 0.8 - l1)))
    assert unpaired[0] < lo < 5 < hi < unpaired[1]   # (hits correlated: phi = 0.14)
    assert all(math.isnan(v) for v in paired_difference_interval(0, 0, 0, 0))


def test_the_paired_difference_interval_corrects_phi_as_newcombe_does():
    """Without Newcombe's correction of phi's numerator (AD - BC lowered by N/2, to 0 at most, when
    positive) two models agreeing on every image got a zero-width interval, and strongly agreeing
    pairs, the usual case of two adapters on one backbone, covered 86-87% (retest 93)."""
    import numpy as np
    # worked examples: Altman et al., Statistics with Confidence (2nd ed.), table 6.2: 0.011 to 0.226
    # for the first's accuracy minus the other's; Fagerland, Lydersen & Laake's Bentur et al. table
    # (1, 1, 7, 12): 2.56 to 50.69 points; Newcombe's (36, 12, 2, 0), where AD - BC < 0 (uncorrected)
    assert paired_difference_interval(14, 5, 0, 22) == pytest.approx((-22.65, -1.15), abs=0.005)
    assert paired_difference_interval(1, 1, 7, 12) == pytest.approx((2.56, 50.69), abs=0.005)
    assert paired_difference_interval(36, 12, 2, 0) == pytest.approx((-34.04, -5.69), abs=0.005)
    lo, hi = paired_difference_interval(50, 0, 0, 50)
    assert lo == pytest.approx(-hi) and 1.5 < hi < 2.5   # (it was exactly 0.0 to 0.0)
    lo, hi = paired_difference_interval(2, 0, 0, 2)
    assert lo == pytest.approx(-hi) and hi > 30
    rng = np.random.default_rng(1)
    probs, n = (0.45, 0.01, 0.02, 0.52), 100
    covered = sum(lo <= 1.0 <= hi for lo, hi in (paired_difference_interval(*map(int, t))
                                                 for t in rng.multinomial(n, probs, size=4000)))
    assert covered / 4000 >= 0.95, covered / 4000   # (86-87% uncorrected)


def test_the_check_before_the_evaluations_reads_no_weights(two_adapters, capsys, monkeypatch):
    """Each adapter's weights file was read whole by the check and again by the load (a full
    fine-tuning adapter: hundreds of MB twice). The check reads its header, so a damaged one is
    still refused before any work (retest 93)."""
    from svp.peft import io as pio
    tmp, lin, full = two_adapters
    files = pio.read_adapter_files(full, weights=False)
    assert files.data[pio.ADAPTER_WEIGHTS] is None and files.data[pio.ADAPTER_CONFIG]
    real, reads = pio._read_once, []
    monkeypatch.setattr(pio, "_read_once", lambda d, weights=True: (reads.append((d, weights)), real(d, weights))[1])
    assert svp_main(["eval", lin, full, "--dataset", "digits", "--max-samples", "10"]) == 0
    capsys.readouterr()
    assert [w for d, w in reads] == [False, False, True, True], reads
    import shutil
    broken = tmp / "broken"
    shutil.copytree(full, broken)
    w = broken / pio.ADAPTER_WEIGHTS
    w.write_bytes(w.read_bytes()[:-4])
    reads.clear()
    assert svp_main(["eval", lin, str(broken), "--dataset", "digits", "--max-samples", "10"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "not a readable safetensors file" in err and len(reads) == 2
