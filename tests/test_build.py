"""svp.build: one way to build a backbone and an adapted model."""
import json
import time

import pytest
import timm
import torch

import svp  # noqa: F401
from svp.build import ModelSpec, adapter_spec, build_model
from svp.cli import main as svp_main
from svp.errors import ConfigError

TINY = {"img_size": 32, "patch_size": 4, "stride": 4, "depth": 2, "embed_dim": 32}


def test_the_bundled_mini_vim_gets_its_bundled_weights_unless_random_is_asked_for():
    bundled = timm.create_model("vim_mini_patch4_32", pretrained=True, num_classes=10)
    m = build_model(ModelSpec("vim_mini_patch4_32", num_classes=10))
    w = "layers.3.mixer.in_proj.weight"
    assert torch.equal(m.state_dict()[w], bundled.state_dict()[w])
    r = build_model(ModelSpec("vim_mini_patch4_32", num_classes=10, random_init=True, init_seed=0))
    assert not torch.equal(r.state_dict()[w], bundled.state_dict()[w])


def test_random_init_is_reproducible_under_init_seed():
    a, b, c = (build_model(ModelSpec("vim_tiny_patch16_224", kwargs=TINY, num_classes=3, random_init=True,
                                     init_seed=s)) for s in (1, 1, 2))
    w = "layers.1.mixer.x_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w]) and not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_no_weights_and_no_explicit_ask_is_one_clear_error():
    with pytest.raises(ConfigError, match="random_init"):
        build_model(ModelSpec("vim_tiny_patch16_224", kwargs=TINY))


def test_old_backbone_json_without_random_init_rebuilds_the_random_backbone():
    spec = ModelSpec.from_dict({"model": "vim_tiny_patch16_224", "checkpoint": None, "pretrained": False,
                                "kwargs": TINY, "init_seed": 0, "img_size": 32, "recipe": "svp"})
    assert spec.weights == "random" and spec.extra == {"recipe": "svp"}
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_predict_with_another_model_and_no_weights_fails_fast_without_the_hub(tmp_path, capsys):
    import svp.peft as peft
    base = build_model(ModelSpec("vim_mini_patch4_32", num_classes=4))
    model = peft.get_peft_model(base, peft.make_config("linear", num_classes=4))
    model.save(str(tmp_path / "ad"), base_model_name="vim_mini_patch4_32", class_names=list("abcd"))
    spec = adapter_spec(str(tmp_path / "ad"))  # no backbone.json: the adapter's base model
    assert spec.model == "vim_mini_patch4_32" and spec.weights == "bundled" and spec.class_names == list("abcd")
    t0 = time.time()
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(img)
    assert svp_main(["predict", str(tmp_path / "ad"), str(img), "--model", "vim_tiny_patch16_224"]) == 2
    assert "no weights given" in capsys.readouterr().err and time.time() - t0 < 10
    # the bundled base: the adapter fits, predictions come out
    assert svp_main(["predict", str(tmp_path / "ad"), str(img), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 4
