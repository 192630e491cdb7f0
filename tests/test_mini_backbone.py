"""The bundled pre-trained mini Vim: file, hash, card, timm registration, and its
accuracy on regenerated held-out source-task images."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import svp  # noqa: F401  (registers the models)
from svp.models.vim_mini import MINI_ARCH, MINI_ASSET, mini_asset_path
from svp.pretrain.fractals import generate_split
from svp.pretrain.train import evaluate, sha256_file

CARD = os.path.splitext(mini_asset_path())[0] + ".json"


@pytest.fixture(scope="module")
def card():
    assert os.path.isfile(mini_asset_path()), f"bundled weights missing: {mini_asset_path()}"
    assert os.path.isfile(CARD), f"model card missing: {CARD}"
    with open(CARD) as f:
        return json.load(f)


def test_asset_hash_size_and_card(card):
    path = mini_asset_path()
    assert card["file"] == MINI_ASSET
    assert sha256_file(path) == card["sha256"], "bundled weights differ from the model card's sha256"
    assert os.path.getsize(path) == card["bytes"] <= 10 * 1024 * 1024
    arch = card["architecture"]
    for k in ("img_size", "patch_size", "stride", "embed_dim", "depth"):
        assert arch[k] == MINI_ARCH[k], k
    assert card["command"] and card["command"].startswith("svp pretrain")
    assert os.path.isfile(os.path.join(os.path.dirname(path), "MODEL_CARD.md"))


def test_pretrained_true_loads_the_bundled_weights():
    sd = load_file(mini_asset_path())
    m = timm.create_model("vim_mini_patch4_32", pretrained=True)
    assert m.head.out_features == sd["head.weight"].shape[0]
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # a new task: same backbone, fresh head of the requested size
    m10 = timm.create_model("vim_mini_patch4_32", pretrained=True, num_classes=10)
    assert m10.head.out_features == 10
    assert torch.equal(m10.layers[3].mixer.in_proj.weight, sd["layers.3.mixer.in_proj.weight"])
    assert torch.equal(m10.pos_embed, sd["pos_embed"])
    # without pretrained=True the weights are random, not the asset
    r = timm.create_model("vim_mini_patch4_32", pretrained=False, num_classes=10)
    assert not torch.equal(r.layers[3].mixer.in_proj.weight, sd["layers.3.mixer.in_proj.weight"])


@pytest.mark.slow
def test_heldout_source_accuracy_clearly_above_chance(card):
    st = card["source_task"]
    sub = st["heldout_test_subset"]
    x, y = generate_split("heldout", st["num_classes"], sub["per_class"], st["seed"], st["img_size"])
    assert len(y) >= 200
    torch.manual_seed(0)
    m = timm.create_model("vim_mini_patch4_32", pretrained=True)
    acc = evaluate(m, x, y)
    chance = 1.0 / st["num_classes"]
    # clearly above chance: at least 5x chance and 25 points above it
    assert acc >= max(5 * chance, chance + 0.25), f"held-out accuracy {acc:.3f} vs chance {chance:.3f}"
    # and what the card says, up to a few near-tie flips from float differences between scan backends
    assert abs(acc - sub["accuracy"]) <= 0.02, (acc, sub["accuracy"])
    # the prediction is not a constant: several classes are predicted
    with torch.no_grad():
        from svp.pretrain.train import to_input
        pred = m.eval()(to_input(x)).argmax(-1).numpy()
    assert len(np.unique(pred)) >= st["num_classes"] // 2
