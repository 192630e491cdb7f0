"""PeftModel.merge_and_unload and `svp export`: an adapter folded into its backbone's weights."""
import json
import os

import pytest
import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from torch.nn.utils import parametrize

from svp.build import ModelSpec, build_model, load_for_inference
from svp.cli import main as svp_main
from svp.errors import AdapterError
from svp.peft import get_peft_model, make_config
from svp.peft.base import merge_refusal
from svp.peft.registry import get_method, list_methods

MERGEABLE = ["bitfit", "full", "linear", "lora"]


def _vim():
    torch.manual_seed(0)
    return timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32,
                             num_classes=5).eval()


def _adapted(method, **settings):
    model = get_peft_model(_vim(), make_config(method, num_classes=4, **settings)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # nonzero adapters: LoRA's B starts at zero, the untrained model is the backbone's
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_the_methods_that_change_only_the_backbones_weights_are_the_mergeable_ones():
    assert [m for m in list_methods() if get_method(m)[1].mergeable] == MERGEABLE
    for m in MERGEABLE:
        assert merge_refusal(m) is None
        assert "SimAM" in merge_refusal(m, simam=True)


@pytest.mark.parametrize("method,settings", [("bitfit", {}), ("full", {}), ("linear", {}),
                                             ("linear", {"head": "two_layer"}), ("lora", {}),
                                             ("lora", {"targets": ["x_proj", "out_proj"], "r": 2})])
def test_merge_and_unload_gives_a_plain_vim_computing_the_adapted_outputs(method, settings):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bare = _vim()(x)
        model = _adapted(method, **settings)
        adapted = model(x)
        merged = model.merge_and_unload()
        out = merged(x)
    assert adapted.shape == (3, 4) and not torch.allclose(adapted[:, :4], bare[:, :4], atol=1e-3)
    assert (out - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    # nothing of the method is left on it: no parametrisation, no hook, one Linear head
    assert not any(parametrize.is_parametrized(m) for m in merged.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert isinstance(merged.head, nn.Linear) and merged.num_classes == 4
    # timm's layout: a fresh model of the same arguments and class count loads it strictly and computes the same
    fresh = timm.create_model("vim_tiny_patch16_224", img_size=32, patch_size=8, stride=8, depth=2, embed_dim=32,
                              num_classes=4).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    with pytest.raises(RuntimeError, match="was unloaded"):
        model(x)


def test_lora_merges_in_float32_and_rounds_once_to_the_weights_dtype():
    model = _adapted("lora", targets=["out_proj"], r=2).to(torch.bfloat16)
    lin = model.base_model.layers[0].mixer.out_proj
    a, b, scale = lin.parametrizations.weight[0].factors()
    expected = (lin.parametrizations.weight.original.float() + scale * (b.float() @ a.float())).to(torch.bfloat16)
    assert not torch.equal(expected, lin.weight)   # (the parametrisation's sum, in bfloat16 throughout, rounds twice)
    merged = model.merge_and_unload()
    assert merged.layers[0].mixer.out_proj.weight.dtype == torch.bfloat16
    assert torch.equal(merged.layers[0].mixer.out_proj.weight, expected)


@pytest.mark.parametrize("method", sorted(set(list_methods()) - set(MERGEABLE)))
def test_methods_that_add_computation_are_refused_and_keep_working(method):
    settings = {"svp": dict(shared_layers=1, hidden=8), "visual_prompt": dict(pad=4),
                "vpt_deep": dict(num_tokens=2), "vpt_shallow": dict(num_tokens=2)}.get(method, {})
    model = _adapted(method, **settings)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    with pytest.raises(AdapterError, match=rf"merge_and_unload: {method} adapters add computation .* only "
                                           rf"bitfit, full, linear, lora adapters can"):
        model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_simam_on_the_input_is_refused():
    model = _adapted("lora", simam=True)
    with pytest.raises(AdapterError, match=r"applies SimAM to the input image"):
        model.merge_and_unload()


def _saved(tmp_path, method, **settings):
    torch.manual_seed(0)
    model = get_peft_model(build_model(ModelSpec("vim_mini_patch4_32", num_classes=3)),
                           make_config(method, num_classes=3, **settings))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / f"ad_{method}"
    model.save(str(folder), base_model_name="vim_mini_patch4_32", class_names=["ant", "bee", "cat"])
    return str(folder)


def test_svp_export_writes_a_file_timm_loads_with_the_adapters_outputs(tmp_path, capsys):
    adapter = _saved(tmp_path, "lora")
    out = str(tmp_path / "merged.safetensors")
    assert svp_main(["export", adapter, "-o", out]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: vim_mini_patch4_32 with the lora adapter merged, 3 classes" in printed
    load = printed.strip().splitlines()[-1].strip()
    assert load.startswith("import svp, timm; model = timm.create_model('vim_mini_patch4_32', num_classes=3")
    namespace = {}
    exec(load, namespace)   # the printed line, as a user would paste it
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    peft, _, _ = load_for_inference(adapter, device="cpu")
    with torch.no_grad():
        expected, got = peft(x), namespace["model"].eval()(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    data = timm.data.resolve_data_config({}, model=namespace["model"])   # (the images as svp evaluated them)
    assert (data["input_size"], data["interpolation"], data["crop_pct"], data["crop_mode"]) == (
        (3, 32, 32), "bicubic", 0.875, "center"), data
    with safe_open(out, "pt") as f:
        described = json.loads(f.metadata()["svp.export"])
    assert described["class_names"] == ["ant", "bee", "cat"] and described["method"] == "lora"
    assert described["method_config"]["r"] == 8 and described["base_model_hash"] == peft.base_hash
    # as another run's backbone: its head is dropped for a new class count, the rest loads
    backbone = build_model(ModelSpec("vim_mini_patch4_32", checkpoint=out, num_classes=7))
    merged = namespace["model"].state_dict()
    assert all(torch.equal(v, merged[k]) for k, v in backbone.state_dict().items() if not k.startswith("head."))

    # an existing file is kept without --overwrite; replaced with it
    stamp = os.stat(out).st_mtime_ns
    assert svp_main(["export", adapter, "-o", out]) == 2
    assert "--overwrite replaces it" in capsys.readouterr().err and os.stat(out).st_mtime_ns == stamp
    assert svp_main(["export", adapter, "-o", out, "--overwrite"]) == 0


def test_svp_export_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    import svp.build

    built = []
    monkeypatch.setattr(svp.build, "build_model", lambda *a, **k: built.append(1))
    adapter = _saved(tmp_path, "svp", shared_layers=1, hidden=4)
    cases = [([adapter, "-o", str(tmp_path / "m.safetensors")], "svp adapters add computation"),
             ([adapter, "-o", str(tmp_path / "m.pth")], "expected a file name ending in .safetensors"),
             ([adapter, "-o", str(tmp_path / "no" / "m.safetensors")], "does not exist"),
             ([str(tmp_path), "-o", str(tmp_path / "m.safetensors")], "adapter_config.json")]
    for argv, message in cases:
        assert svp_main(["export", *argv]) == 2
        assert message in capsys.readouterr().err
    assert built == [] and sorted(os.listdir(tmp_path)) == ["ad_svp"]


def test_a_merge_that_changes_the_outputs_writes_nothing(tmp_path, monkeypatch):
    from svp.peft import lora

    adapter = _saved(tmp_path, "lora")
    monkeypatch.setattr(lora.LoRA, "merge", lora.LoRA.detach)   # (a broken merge: the update dropped)
    with pytest.raises(RuntimeError, match=r"merged lora model's outputs differ from the adapter's by .* nothing "
                                           r"written"):
        svp_main(["export", adapter, "-o", str(tmp_path / "m.safetensors")])
    assert sorted(os.listdir(tmp_path)) == ["ad_lora"]


@pytest.mark.parametrize("recipe", ["svp", "vtab", "plain"])
def test_the_data_configuration_written_gives_timm_svps_evaluation_images(recipe):
    """The file's model would get timm's 224 px and center crop from the hub config: its data
    configuration is the recipe's evaluation transform in timm's terms (retest 89)."""
    from PIL import Image
    from timm.data import create_transform

    from svp.data.transforms import build_transform, timm_data_config
    pixels = torch.randint(0, 256, (50, 70, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    ours = build_transform(recipe, False, img_size=48)(image)
    theirs = create_transform(**timm_data_config(recipe, 48), is_training=False)(image)
    assert ours.shape == theirs.shape == (3, 48, 48) and torch.equal(ours, theirs)


def test_svp_export_keeps_the_adapters_backbone_file_and_writes_through_a_link_to_nothing(tmp_path, capsys):
    from svp.models.vim_mini import mini_asset_path
    import shutil
    base = tmp_path / "base.safetensors"
    shutil.copy(mini_asset_path("vim_mini_patch4_32.safetensors"), base)
    spec = ModelSpec("vim_mini_patch4_32", checkpoint=str(base), num_classes=3, class_names=["a", "b", "c"])
    model = get_peft_model(build_model(spec), make_config("bitfit", num_classes=3))
    model.save(str(tmp_path / "ad"), base_model_name="vim_mini_patch4_32", class_names=["a", "b", "c"])
    (tmp_path / "ad" / "backbone.json").write_text(json.dumps(spec.to_dict()))
    before = base.read_bytes()
    assert svp_main(["export", str(tmp_path / "ad"), "-o", str(base), "--overwrite"]) == 2
    assert "is the backbone checkpoint the adapter was trained on" in capsys.readouterr().err
    assert base.read_bytes() == before
    os.symlink("made.safetensors", tmp_path / "link.safetensors")   # (a link to nothing: not "exists")
    assert svp_main(["export", str(tmp_path / "ad"), "-o", str(tmp_path / "link.safetensors")]) == 0
    assert os.path.islink(tmp_path / "link.safetensors") and (tmp_path / "made.safetensors").is_file()
    os.symlink("model.bin", tmp_path / "odd.safetensors")   # (the file written is the link's target)
    capsys.readouterr()
    assert svp_main(["export", str(tmp_path / "ad"), "-o", str(tmp_path / "odd.safetensors")]) == 2
    assert "model.bin; expected a file name ending in .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "model.bin").exists()


def test_a_plugin_method_that_says_mergeable_and_is_not_is_named(tmp_path, monkeypatch, capsys):
    import dataclasses

    from svp.peft import PeftConfig, PeftMethod
    from svp.peft import registry as R

    @dataclasses.dataclass
    class ShiftConfig(PeftConfig):
        method = "shift"

    class Shift(PeftMethod):   # adds a learned input shift: computation of its own, not a weight's change
        mergeable = True

        def __init__(self, config, model):
            super().__init__(config, model)
            self.shift = nn.Parameter(torch.full((3, 1, 1), 0.5))

        def transform_input(self, x):
            return x + self.shift
    monkeypatch.setattr(R, "_METHODS", dict(R._METHODS))
    R.register_method("shift", ShiftConfig, Shift)
    adapter = _saved(tmp_path, "shift")
    assert svp_main(["export", adapter, "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"The method's class ({__name__}.Shift) says mergeable = True, but its change is not one of the " \
           f"backbone's weights alone" in err, err
    assert not (tmp_path / "m.safetensors").exists()
