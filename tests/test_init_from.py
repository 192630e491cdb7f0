"""method.init_from / PeftModel.init_from_adapter: a run's adapter started from another adapter's tensors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from svp.build import ModelSpec, build_model
from svp.cli import main as svp_main
from svp.errors import AdapterError, ConfigError
from svp.peft import get_peft_model, make_config


def _model(method, seed=0, **settings):
    torch.manual_seed(seed)
    return get_peft_model(build_model(ModelSpec("vim_mini_patch4_32", num_classes=3)),
                          make_config(method, num_classes=3, **settings))


def _saved(tmp_path, method, **settings):
    model = _model(method, **settings)
    with torch.no_grad():   # (trained-looking: LoRA's B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / f"{method}{settings.get('r', '')}"
    model.save(str(folder), base_model_name="vim_mini_patch4_32", class_names=["a", "b", "c"])
    return str(folder), model


def _values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_linear_probes_head_starts_a_full_fine_tuning_and_nothing_else_changes(tmp_path):
    folder, probe = _saved(tmp_path, "linear")
    full = _model("full", seed=1)
    before = _values(full)
    got = full.init_from_adapter(folder)
    assert got["method"] == "linear" and got["loaded"] == ["base_model.head.bias", "base_model.head.weight"]
    assert got["class_names"] == ["a", "b", "c"] and len(got["initialised"]) == len(before) - 2
    after, trained = _values(full), _values(probe)
    for n in before:
        expected = trained[n] if n.startswith("base_model.head.") else before[n]
        assert torch.equal(after[n], expected), n


def test_an_adapter_of_the_same_settings_starts_where_it_ended(tmp_path):
    folder, trained = _saved(tmp_path, "lora", r=4)
    model = _model("lora", seed=1, r=4)
    assert model.init_from_adapter(folder)["initialised"] == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained.eval()(x))


@pytest.mark.parametrize("source,target,message", [
    ("full", ("linear", {}), r"are backbone tensors this linear run keeps frozen .* svp export, then model.checkpoint"),
    ("svp", ("lora", {}), r"this lora model has no tensor of that name"),
    ("lora", ("lora", {"r": 2}), r"96 of its tensors do not fit this lora model .*: base_model.layers.0.mixer."
                                  r"dt_proj.parametrizations.weight.0.lora_A has shape \(8, \d+\), expected "
                                  r"\(2, \d+\)"),
])
def test_tensors_that_have_no_place_here_are_refused_and_nothing_changes(tmp_path, source, target, message):
    folder, _ = _saved(tmp_path, source, **({"shared_layers": 1, "hidden": 4} if source == "svp" else {}))
    model = _model(target[0], seed=1, **target[1])
    before = _values(model)
    with pytest.raises(AdapterError, match=message):
        model.init_from_adapter(folder)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_an_adapter_of_other_base_weights_is_refused(tmp_path):
    folder, _ = _saved(tmp_path, "linear")
    torch.manual_seed(5)
    other = get_peft_model(build_model(ModelSpec("vim_mini_patch4_32", num_classes=3, random_init=True)),
                           make_config("linear", num_classes=3))
    with pytest.raises(AdapterError, match="adapter was trained on base model 'vim_mini_patch4_32' with weight hash"):
        other.init_from_adapter(folder)


def test_the_same_method_with_other_settings_of_the_same_shapes_is_warned_of(tmp_path, logged):
    import logging

    from svp.engine.setup import init_from
    folder, _ = _saved(tmp_path, "lora", r=4)
    spec = ModelSpec("vim_mini_patch4_32", num_classes=3, class_names=["a", "b", "c"])
    with logged("svp.engine", logging.WARNING) as said:
        init_from(_model("lora", r=4, alpha=64.0), folder, spec)
    assert any(f"method.init_from: {folder}'s lora settings are not this run's (alpha: 16.0 there, 64.0 here)" in m
               for m in said), said
    with logged("svp.engine", logging.WARNING) as said:
        init_from(_model("lora", r=4), folder, spec)
    assert said == []


def test_a_head_of_other_classes_is_refused(tmp_path):
    from svp.engine.setup import init_from
    folder, _ = _saved(tmp_path, "linear")
    spec = ModelSpec("vim_mini_patch4_32", num_classes=3, class_names=["a", "c", "b"])
    with pytest.raises(ConfigError, match=r"its head was trained on other classes than this run's \(class 1: 'b' "
                                          r"there, 'c' here\)"):
        init_from(_model("full"), folder, spec)
    spec.class_names = ["a", "b", "c"]
    model = _model("full")
    init_from(model, folder, spec)
    assert torch.equal(model.base_model.head.weight, load_file(os.path.join(folder, "adapter.safetensors"))[
        "base_model.head.weight"])


def test_svp_train_init_from_starts_a_run_and_its_resume_does_not_read_it(tmp_path, capsys):
    runs = tmp_path / "runs"

    def cmd(method, name, *extra):
        return ["train", "--dataset", "digits", "--method", method, "--model", "vim_mini_patch4_32", "--epochs", "1",
                "--batch-size", "8", "data.max_train_samples=16", "data.max_eval_samples=8", "run.progress=none",
                "--output", str(runs), "--name", name, *extra]
    assert svp_main(cmd("linear", "lp", "train.lr=0.05")) == 0
    probe = load_file(str(runs / "lp" / "best" / "adapter.safetensors"))
    # (no step changes a tensor at a rate of 0: the head at the end is the one the run started from)
    frozen_rates = ["train.lr=0", "train.warmup_lr=0", "train.min_lr=0"]
    assert svp_main(cmd("full", "ft", "--init-from", str(runs / "lp" / "best"), *frozen_rates,
                        "debug.stop_at_step=1")) == 75
    assert "method.init_from: 2 tensors of the linear adapter in" in (runs / "ft" / "train.log").read_text()
    # stopped inside its first epoch: no adapter folder yet, the resume point holds the record (retest 94)
    from svp.engine.setup import adapter_digest
    from svp.engine.tune import recorded_init_weights
    assert not (runs / "ft" / "last").exists()
    assert recorded_init_weights(str(runs / "ft")) == adapter_digest(str(runs / "lp" / "best")) is not None
    os.rename(runs / "lp", runs / "lp-moved")   # the resume point holds every tensor: the folder is not read again
    assert svp_main(["train", "--resume", str(runs / "ft")]) == 0, capsys.readouterr().err
    tuned = load_file(str(runs / "ft" / "last" / "adapter.safetensors"))
    assert all(torch.equal(tuned[n], probe[n]) for n in probe)
    recorded = json.loads((runs / "ft" / "last" / "backbone.json").read_text())
    assert recorded["init_from"] == str(runs / "lp" / "best")
    # which tensors it started from, carried over the resume (the folder was not read again), for a
    # sweep's reuse: the folder retrained in place is another start (retest 89)
    from svp.engine.tune import check_same_init
    source = str(runs / "lp-moved" / "best")
    assert recorded["init_from_weights"] == adapter_digest(source) is not None
    check_same_init(str(runs / "ft"), {"method": {"init_from": source}}, finished=True)
    assert svp_main(cmd("linear", "lp2", "train.seed=1")) == 0   # (another head: the warm-up rate is the same)
    import shutil
    shutil.rmtree(source)
    shutil.copytree(runs / "lp2" / "best", source)
    with pytest.raises(ConfigError, match=r"holds a finished run started from the adapter in .*lp-moved/best "
                                          r"\(method.init_from\) when that folder held other tensors"):
        check_same_init(str(runs / "ft"), {"method": {"init_from": source}}, finished=True)
    # a full adapter's backbone tensors have no place in a linear probe; a missing folder is said before the data
    capsys.readouterr()
    assert svp_main(cmd("linear", "x", "--init-from", str(runs / "ft" / "last"))) == 2
    assert "backbone tensors this linear run keeps frozen" in capsys.readouterr().err
    assert svp_main(cmd("linear", "y", "--init-from", str(runs / "lp"))) == 2
    err = capsys.readouterr().err
    assert f"adapter folder '{runs / 'lp'}': no such folder" in err, err
