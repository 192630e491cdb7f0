"""train.layer_decay: timm's layer-wise learning-rate decay through the engine's optimizer and schedule."""
import logging

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from svp.cli import main as svp_main
from svp.engine import config as C
from svp.engine.optim import build_optimizer
from svp.engine.sched import Schedule
from svp.errors import ConfigError
from svp.peft import get_peft_model, make_config

DEPTH = 3


def _model(method, **settings):
    torch.manual_seed(0)
    vim = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=DEPTH, embed_dim=32,
                            num_classes=5)
    return get_peft_model(vim, make_config(method, num_classes=4, **settings))


def _cfg(**train):
    cfg = C.defaults()
    cfg["train"].update(dict(epochs=10, warmup_epochs=2, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6), **train)
    C.validate(cfg)
    return cfg


def _groups(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in opt.param_groups for p in g["params"]}


def _layer(name):
    if name.startswith("base_model.head."):
        return DEPTH + 1
    if name.startswith("base_model.layers."):
        return int(name.split(".")[2]) + 1
    if name.startswith("base_model.norm_f."):   # (the final norm with the last block, as timm's ViTs group it)
        return DEPTH
    return 0


@pytest.mark.parametrize("method", ["full", "lora"])
def test_each_block_trains_at_decay_times_the_one_above_and_weight_decay_is_unchanged(method):
    model = _model(method)
    plain = _groups(build_optimizer(model, _cfg(), 1e-3), model)
    opt = build_optimizer(model, _cfg(layer_decay=0.5), 1e-3)
    decayed = _groups(opt, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(decayed) == sorted(trainable) == sorted(plain)
    for n in trainable:
        assert decayed[n]["lr_scale"] == pytest.approx(0.5 ** (DEPTH + 1 - _layer(n))), n
        assert decayed[n]["weight_decay"] == plain[n]["weight_decay"], n
    # the schedule scales every group's rate by its factor, and reports the head's
    reference = Schedule(build_optimizer(model, _cfg(), 1e-3), _cfg(), 5)
    sched = Schedule(opt, _cfg(layer_decay=0.5), 5)
    for epoch in (0, 1, 3, 9):
        reference.start_epoch(epoch)
        sched.start_epoch(epoch)
        assert sched.lr() == reference.lr()
        for n in trainable:
            assert decayed[n]["lr"] == pytest.approx(reference.lr() * decayed[n]["lr_scale"], rel=1e-12), (epoch, n)


def test_a_constant_schedule_keeps_the_decayed_rates():
    model = _model("full")
    opt = build_optimizer(model, _cfg(layer_decay=0.8, sched="constant"), 1e-3)
    sched = Schedule(opt, _cfg(layer_decay=0.8, sched="constant"), 5)
    sched.start_epoch(3)
    assert sched.lr() == 1e-3
    assert sorted({round(g["lr"] / 1e-3, 9) for g in opt.param_groups}) == [round(0.8 ** k, 9) for k in
                                                                            range(DEPTH + 1, -1, -1)]


def test_a_method_whose_tensors_are_outside_the_blocks_is_told_it_has_no_effect(logged):
    model = _model("svp", shared_layers=1, hidden=4)
    with logged("svp.engine", logging.INFO) as said, logged("timm", logging.WARNING) as timms:
        opt = build_optimizer(model, _cfg(layer_decay=0.5), 1e-3)
    assert {g.get("lr_scale", 1.0) for g in opt.param_groups} == {1.0}
    assert any("train.layer_decay=0.5 has no effect here: every trainable tensor of this svp run" in m
               for m in said), said
    assert not any("Layer-wise lr decay has no effect" in m for m in timms)   # (timm's own, in timm's terms)


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "0.5", True, float("nan")])
def test_a_decay_outside_zero_to_one_is_refused(value):
    cfg = C.defaults()
    cfg["train"]["layer_decay"] = value
    with pytest.raises(ConfigError, match=r"train.layer_decay=.*expected null or a number in \(0, 1\]"):
        C.validate(cfg)


def test_a_resumed_run_with_layer_decay_is_the_run_never_stopped(tmp_path):
    cfg = {"model": {"name": "vim_tiny_patch16_224", "random_init": True,
                     "kwargs": {"img_size": 32, "patch_size": 8, "stride": 8, "depth": 2, "embed_dim": 32}},
           "method": {"name": "full"},
           "data": {"dataset": "digits", "img_size": 32, "recipe": "plain", "max_train_samples": 12,
                    "max_eval_samples": 8},
           "train": {"epochs": 2, "batch_size": 4, "eval_batch_size": 8, "warmup_epochs": 1, "lr": 0.05,
                     "lr_scale": False, "layer_decay": 0.6},
           "run": {"output": str(tmp_path / "runs"), "progress": "none", "save_every_steps": 2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert svp_main(["train", "-c", str(path), "--name", "straight"]) == 0
    assert svp_main(["train", "-c", str(path), "--name", "cut", "debug.stop_at_step=4"]) == 75   # (mid-epoch 2)
    assert svp_main(["train", "--resume", str(tmp_path / "runs" / "cut")]) == 0
    a = load_file(str(tmp_path / "runs" / "straight" / "last" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "runs" / "cut" / "last" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "runs" / "straight" / "train.log").read_text()
    assert "train.layer_decay=0.6: 4 rates, from 0.216 x lr" in log
