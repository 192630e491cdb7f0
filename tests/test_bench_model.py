"""benchmarks/model.py's matmul bound: the depthwise conv1d it adds by hand (its fused kernel is
invisible to torch's flop counter) at the tokens each mixer read and with the passes the
method's backward runs (review35: forward only for svp/vpt_deep/lora, two passes of three for
full fine-tuning, the model's own 224 px tokens whatever the step ran, VPT's prompts left out)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import model
    return model


# (tokens beyond the image's 64 patches and the class token, backward reaches the conv's input,
# the conv trained): what each method makes of the mini Vim by its definition (docs/methods.md)
EXPECTED = {"linear": (0, False, False), "svp": (0, True, False), "vpt_deep": (10, True, False),
            "lora": (0, True, False), "full": (0, True, True)}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_conv_passes_and_tokens_follow_what_the_step_ran(bench, method):
    import timm

    import svp.models  # noqa: F401
    from svp.peft import get_peft_model, make_config
    torch.manual_seed(0)
    model = timm.create_model("vim_mini_patch4_32", num_classes=10)
    pm = get_peft_model(model, make_config(method, num_classes=10, **bench.method_settings(method, model)))
    pm.train()
    seen = []
    unwatch = bench._watch_convs(pm, seen)
    try:
        pm(torch.randn(2, 3, 32, 32)).sum().backward()
    finally:
        unwatch()
    mixers = [layer.mixer for layer in pm.base_model.layers]
    assert not any("_ssm" in vars(m) for m in mixers)   # the watch taken off
    extra, input_grad, trained = EXPECTED[method]
    m = mixers[0]
    assert seen == [(65 + extra, m.d_inner, m.d_conv, input_grad, trained)] * len(mixers)
    fwd, total = bench._conv1d_flops(seen, 2, train=True)
    assert fwd == len(mixers) * 2 * 2 * 2 * (65 + extra) * m.d_inner * m.d_conv
    assert total == fwd * (1 + input_grad + trained)
    assert bench._conv1d_flops(seen, 2, train=False) == (fwd, fwd)   # inference: the forward alone


def test_json_path_refuses_before_measuring(bench, tmp_path):
    import argparse

    from common import json_path
    assert json_path(str(tmp_path / "x.json")) == str(tmp_path / "x.json")
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        json_path(str(tmp_path / "no" / "x.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        json_path(str(tmp_path))
    assert sys.modules["model"].json_path is json_path
