"""train.sched=multistep: the rate times train.decay_rate after each of train.decay_epochs, as
PyTorch's MultiStepLR counts its milestones, after timm's linear warm-up."""
import json

import pytest
import torch
import yaml

from svp.cli import main as svp_main
from svp.engine import config as C
from svp.engine.sched import Schedule, lr_at_epoch, schedule_notes


def _cfg(**kw):
    cfg = C.defaults()
    cfg["train"].update({"epochs": 12, "sched": "multistep", "decay_epochs": [3, 7], "decay_rate": 0.2,
                         "warmup_epochs": 0, "warmup_lr": 1e-5})
    cfg["train"].update(kw)
    C.validate(cfg)
    return cfg


def _torch_multistep(peak, milestones, rate, n):
    """PyTorch's own MultiStepLR: the reference the milestones are counted by."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=rate)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    return out


def test_epoch_milestones_are_pytorchs_and_the_official_offset_delays_them():
    want = _torch_multistep(0.1, [3, 7], 0.2, 12)
    got = [lr_at_epoch(_cfg(official_epoch_offset=False), e, 0.1) for e in range(12)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[2] == pytest.approx(0.1) and got[3] == pytest.approx(0.02) and got[7] == pytest.approx(0.004)
    offset = [lr_at_epoch(_cfg(), e, 0.1) for e in range(12)]   # epoch e >= 1 at lr(e - 1), as the cosine
    assert offset == pytest.approx([want[0]] + want[:-1], rel=1e-12)


def test_the_milestone_shift_is_measured_on_the_installed_timm(monkeypatch):
    """A timm that took PyTorch's convention (milestone m applied at index m, not m - 1) would have
    decayed every run one epoch late, unsaid: the shift is measured, and the epochs stay PyTorch's
    (retest 93)."""
    import bisect

    import svp.engine.sched as S
    want = _torch_multistep(0.1, [3, 7], 0.2, 12)
    assert S.timm_milestone_shift() == 1   # (timm 1.0.x's documented convention)

    class PyTorchConvention(S.MultiStepLRScheduler):
        def get_curr_decay_steps(self, t):
            return bisect.bisect_right(self.decay_t, t)
    monkeypatch.setattr(S, "MultiStepLRScheduler", PyTorchConvention)
    S.timm_milestone_shift.cache_clear()
    try:
        assert S.timm_milestone_shift() == 0
        got = [lr_at_epoch(_cfg(official_epoch_offset=False), e, 0.1) for e in range(12)]
        assert got == pytest.approx(want, rel=1e-12)
    finally:
        S.timm_milestone_shift.cache_clear()


def test_step_milestones_count_optimizer_steps_and_the_warm_up_is_the_cosines():
    per = 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    s = Schedule(opt, _cfg(sched_step="step", warmup_epochs=1.5), per)
    got = []
    for step in range(12 * per):
        s.before_step(step)
        got.append(s.lr())
    cos_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cos = Schedule(cos_opt, _cfg(sched_step="step", warmup_epochs=1.5, sched="cosine", decay_epochs=[]), per)
    for step in range(6):   # the same linear warm-up, from warmup_lr, over 1.5 epochs of steps
        cos.before_step(step)
        assert got[step] == pytest.approx(cos.lr(), rel=1e-12)
    assert got[0] == pytest.approx(1e-5) and got[5] < 0.1
    want = _torch_multistep(0.1, [3 * per, 7 * per], 0.2, 12 * per)
    assert got[6:] == pytest.approx(want[6:], rel=1e-12)


def test_train_layer_decay_scales_each_group_under_multistep():
    import timm

    from svp.engine.optim import build_optimizer
    from svp.peft import get_peft_model, make_config
    vim = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=16,
                            num_classes=5)
    cfg = _cfg(layer_decay=0.5, decay_epochs=[2], decay_rate=0.1, official_epoch_offset=False)
    opt = build_optimizer(get_peft_model(vim, make_config("full", num_classes=4)), cfg, 1e-3)
    assert len({g["lr_scale"] for g in opt.param_groups}) == 4   # head, two blocks, the stem
    sched = Schedule(opt, cfg, 5)
    for epoch, head in ((1, 1e-3), (2, 1e-4)):
        sched.start_epoch(epoch)
        assert sched.lr() == pytest.approx(head, rel=1e-12)
        assert {round(g["lr"] / (head * g["lr_scale"]), 9) for g in opt.param_groups} == {1.0}


def test_multistep_settings_are_checked_and_late_milestones_noted():
    for kw, said in (({"decay_epochs": []}, "train.sched=multistep needs train.decay_epochs"),
                     ({"decay_epochs": [5, 3]}, r"train.decay_epochs=\[5, 3\]: expected a list of increasing positive"),
                     ({"decay_epochs": [0, 3]}, "expected a list of increasing positive whole epochs"),
                     ({"decay_epochs": 30}, "train.decay_epochs=30: expected a list"),
                     ({"decay_epochs": [2.5]}, "expected a list of increasing positive whole epochs"),
                     ({"decay_rate": 0}, r"train.decay_rate=0: expected a number in \(0, 1\]"),
                     ({"decay_rate": 1.5}, r"train.decay_rate=1.5: expected a number in \(0, 1\]")):
        with pytest.raises(C.ConfigError, match=said):
            _cfg(**kw)
    # milestones set for another schedule (a --tune grid of cosine and multistep points): said, not refused
    assert schedule_notes(_cfg(sched="cosine", warmup_epochs=1), 0.1) == [
        "train.decay_epochs [3, 7] is read only with train.sched=multistep: this run's cosine schedule does not use it"]
    assert _cfg(sched="cosine", decay_epochs=None)["train"]["decay_epochs"] == []   # null: none
    # a milestone inside the warm-up: timm's schedule rises to the peak first, then decays
    early = _cfg(warmup_epochs=4, decay_epochs=[2, 6], official_epoch_offset=False)
    assert schedule_notes(early, 0.1) == [
        "train.decay_epochs [2]: inside the warm-up (train.warmup_epochs=4), where the rate still rises to the "
        "peak; their decay comes at the warm-up's end"]
    rates = [lr_at_epoch(early, e, 0.1) for e in range(8)]
    assert rates[3] < 0.1 and rates[4:] == pytest.approx([0.02, 0.02, 0.004, 0.004], rel=1e-12)
    assert schedule_notes(_cfg(decay_epochs=[3, 11], official_epoch_offset=False), 0.1) == []
    assert schedule_notes(_cfg(decay_epochs=[3, 11]), 0.1) == [
        "train.decay_epochs [11]: the run ends before the rate decays there (train.epochs=12, and the official "
        "epoch offset runs each change an epoch later)"]
    assert schedule_notes(_cfg(decay_epochs=[3, 12, 20], sched_step="step"), 0.1) == [
        "train.decay_epochs [12, 20]: the run ends before the rate decays there (train.epochs=12)"]


def test_a_multistep_run_logs_the_rates_it_trained_at(tmp_path):
    cfg = {"model": {"name": "vim_tiny_patch16_224", "random_init": True,
                     "kwargs": {"img_size": 32, "patch_size": 8, "stride": 8, "depth": 1, "embed_dim": 16}},
           "data": {"dataset": "digits", "img_size": 32, "recipe": "plain", "max_train_samples": 8,
                    "max_eval_samples": 4},
           "train": {"epochs": 4, "batch_size": 8, "warmup_epochs": 0, "lr": 0.05, "lr_scale": False,
                     "sched": "multistep", "decay_epochs": [2], "decay_rate": 0.5, "official_epoch_offset": False},
           "run": {"output": str(tmp_path), "progress": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert svp_main(["train", "-c", str(tmp_path / "c.yaml"), "--name", "m", "--method", "linear", "-q"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.025, 0.025], rel=1e-12)
