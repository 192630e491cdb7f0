"""Off the CPU, the model's forward and backward never hand an operator a CPU tensor beside the
device's. A CUDA GPU rejects that in most operators (addmm among them), and CI has no GPU:
the check runs the model on PyTorch's meta device (shapes only, no data) and watches every
operator call. Found on a GPU: the inference path of Vim's out_proj gave addmm a CPU zero for
its ignored input, so every evaluation on CUDA failed (docs/benchmarks.md, "GPU, first run")."""
import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import svp.models  # noqa: F401  (registers the Vim models)
from svp.ops import dispatch
from svp.peft import get_peft_model, list_methods, make_config

SETTINGS = {"visual_prompt": dict(pad=4, image_size=12), "svp": dict(shared_layers=2, hidden=8), "lora": dict(r=2),
            "adapter": dict(bottleneck=4)}


class MixedDevices(TorchDispatchMode):
    """Records every operator call whose tensor arguments sit on more than one device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        devices = {t.device.type for t in flat if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.calls.append(f"{func} on {sorted(devices)}")
        return func(*args, **(kwargs or {}))


def test_mode_sees_a_cpu_zero_beside_a_device_tensor():
    # the check itself: the bug it guards against, on purpose
    a = torch.empty(4, 8, device="meta")
    with MixedDevices() as mode:
        torch.addmm(torch.zeros(()), a, a.t(), beta=0, alpha=0.5)
        torch.addmm(torch.zeros((), device="meta"), a, a.t(), beta=0, alpha=0.5)
    assert mode.calls == ["aten.addmm.default on ['cpu', 'meta']"]


@pytest.mark.parametrize("method", list_methods())
def test_no_cpu_tensor_meets_device_tensors(method, monkeypatch):
    # a fresh process's dispatch state: the automatic choice off the CPU and CUDA must load
    # the 'torch' backend itself (it once answered "torch" and then raised KeyError)
    monkeypatch.setattr(dispatch, "_forced", None)
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_errors", {})
    monkeypatch.delenv("SVP_SCAN_BACKEND", raising=False)
    torch.manual_seed(0)
    base = timm.create_model("vim_mini_patch4_32", pretrained=False, num_classes=10)
    model = get_peft_model(base, make_config(method, num_classes=10, **SETTINGS.get(method, {}))).to("meta")
    assert dispatch.get_backend(torch.device("meta")) == "torch"
    x = torch.empty(2, 3, 12, 12, device="meta")   # (10 tokens: the scan of the torch backend loops over them)
    for training in (True, False):
        model.train(training)
        with MixedDevices() as mode, torch.set_grad_enabled(training):
            out = model(x)
            if training:
                out.sum().backward()
        assert out.shape == (2, 10) and out.device.type == "meta"
        assert mode.calls == [], f"{method} ({'train' if training else 'eval'}): {mode.calls[:3]}"
