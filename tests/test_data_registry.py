"""Registry, embedded datasets, transforms and presets (no data root needed)."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from svp.data import (DatasetError, build_dataset, build_transform, dataset_info, list_datasets,
                      load_preset, lr_used)
from svp.data.embedded import render_sprite, vtab_rebin
from svp.data.vtab import VTAB_TASKS

EMBEDDED = ["digits", "textures", "faces", "dsprites_loc", "dsprites_ori", "shapes_count"]


def test_registry_names_and_counts():
    names = list_datasets()
    assert len(list_datasets("vtab")) == 19
    assert len(list_datasets("hta")) == 10            # the ten datasets of the HTA script
    assert set(EMBEDDED) <= set(list_datasets("embedded"))
    assert {"imagefolder", "csv", "hta/cars"} <= set(names)
    expected = {"cub200": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196,
                "cifar10": 10, "cifar100": 100, "dtd": 47, "gtsrb": 43, "svhn": 10, "food101": 101}
    for n, c in expected.items():
        assert dataset_info(n).num_classes == c
        assert dataset_info(f"hta/{n}").name == f"hta/{n}"
    for task, c, group in VTAB_TASKS:
        info = dataset_info(f"vtab/{task}")
        assert info.num_classes == c and info.group == group
        assert info.default_splits == {"train": "train800val200", "test": "test"}
    # official flags and aliases
    assert dataset_info("CIFAR").name == "hta/cifar100"
    assert dataset_info("FOOD").name == "hta/food101"
    assert dataset_info("Cub200").name == "hta/cub200"
    with pytest.raises(KeyError, match="vtab/caltech101"):
        dataset_info("caltech101")


# train / val / test sizes, as docs/datasets.md ("Embedded datasets") states them
EMBEDDED_SIZES = {"digits": (1000, 297, 500), "textures": (600, 150, 300), "faces": (120, 20, 60),
                  "dsprites_loc": (800, 200, 1000), "dsprites_ori": (800, 200, 1000),
                  "shapes_count": (800, 200, 1000)}


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_datasets(name):
    info = dataset_info(name)
    assert not info.needs_root and info.recipe == "plain"
    sizes = {}
    for split in ("train", "val", "test"):
        ds = build_dataset(name, split)
        sizes[split] = len(ds)
        assert ds.num_classes == info.num_classes == len(ds.classes)
        assert len(ds.targets) == len(ds)
        assert min(ds.targets) >= 0 and max(ds.targets) < ds.num_classes
        img, y = ds[0]
        assert isinstance(img, Image.Image) and img.mode == "RGB"
        assert img.size[0] == info.native_size and isinstance(y, int)
        # every class appears in train
        assert min(ds.class_counts()) > 0 or split != "train"
    assert (sizes["train"], sizes["val"], sizes["test"]) == EMBEDDED_SIZES[name]
    # deterministic given a seed, different for another seed
    a, b = build_dataset(name, "train"), build_dataset(name, "train", seed=0)
    assert np.array_equal(np.asarray(a[3][0]), np.asarray(b[3][0])) and a.targets == b.targets
    c = build_dataset(name, "train", seed=1)
    assert c.targets != a.targets or not np.array_equal(np.asarray(a[3][0]), np.asarray(c[3][0]))
    tv = build_dataset(name, "trainval")
    assert len(tv) == sizes["train"] + sizes["val"]


def test_embedded_splits_are_disjoint():
    for name in ("digits", "faces", "shapes_count"):
        tr, te = build_dataset(name, "train"), build_dataset(name, "test")
        htr = {np.asarray(tr[i][0]).tobytes() for i in range(len(tr))}
        dup = sum(np.asarray(te[i][0]).tobytes() in htr for i in range(len(te)))
        assert dup <= 2, (name, dup)   # digits has a handful of identical scans


def test_vtab_style_split_names():
    ds = build_dataset("dsprites_loc", "train800val200")
    assert len(ds) == 1000
    assert len(build_dataset("dsprites_ori", "train800")) == 800
    assert len(build_dataset("shapes_count", "val200")) == 200
    with pytest.raises(DatasetError, match="unknown split"):
        build_dataset("digits", "train800")


def test_dsprites_task_definition():
    # label = floor(orig / (orig_classes / 16))
    assert vtab_rebin(np.arange(32), 32, 16).tolist() == [i // 2 for i in range(32)]
    ori = vtab_rebin(np.arange(40), 40, 16)
    assert ori.tolist() == [int(np.floor(i / 2.5)) for i in range(40)]
    assert ori.max() == 15 and np.bincount(ori).min() >= 2
    # binary 64x64 images, sprite centre moves with the x latent
    a = render_sprite(0, 5, 0, 0, 16)
    b = render_sprite(0, 5, 0, 31, 16)
    assert a.shape == (64, 64) and set(np.unique(a)) <= {0, 255}
    xa = np.nonzero(a)[1].mean()
    xb = np.nonzero(b)[1].mean()
    assert xa < 20 < 44 < xb
    # bigger scale -> more pixels; rotation changes a square
    assert render_sprite(0, 0, 0, 16, 16).sum() < render_sprite(0, 5, 0, 16, 16).sum()
    assert not np.array_equal(render_sprite(0, 5, 0, 16, 16), render_sprite(0, 5, 5, 16, 16))
    # the dataset labels follow the image: loc bin from the centre of mass
    ds = build_dataset("dsprites_loc", "test")
    for i in range(50):
        img = np.asarray(ds[i][0])[..., 0]
        cx = np.nonzero(img)[1].mean()
        expect = (cx - 10) / 44 * 31 / 2          # inverse of the renderer's placement
        assert abs(expect - ds.targets[i]) < 1.6


def test_shapes_count_labels_match_objects():
    from skimage.measure import label as cc
    ds = build_dataset("shapes_count", "val")
    for i in range(40):
        img = np.asarray(ds[i][0]).astype(int)
        fg = img.max(-1) > 100          # background ramp is grey <= 70, shapes are bright
        n = cc(fg, connectivity=2).max()
        assert n == ds.targets[i] + 3, (i, n, ds.targets[i])


def test_transforms_all_recipes():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), np.uint8))
    for recipe in ("svp", "vtab", "plain"):
        for train in (True, False):
            for size in (32, 64):
                x = build_transform(recipe, train, img_size=size)(img)
                assert isinstance(x, torch.Tensor) and x.shape == (3, size, size)
    ev = build_transform("svp", False, img_size=224)
    assert ev.transforms[0].size == 256 and ev.transforms[1].size == (224, 224)
    tr = build_transform("svp", True, img_size=224)
    s = repr(tr)
    assert "RandomResizedCrop" in s and "scale=(0.08, 1.0)" in s and "bicubic" in s
    assert "RandAugment" in s and "RandomErasing(p=0.25, mode=pixel" in s
    # plain with dataset statistics
    x = build_transform("plain", False, img_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)(
        Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.allclose(x, torch.ones_like(x))
    with pytest.raises(ValueError):
        build_transform("nope", True)


def test_presets():
    p = load_preset("CUB200")
    assert p["dataset"] == "hta/cub200" and p["num_classes"] == 200
    assert (p["lr"], p["weight_decay"], p["shared_layers"], p["head"], p["simam"]) == \
        (6e-3, 1e-4, 8, "two_layer", False)
    assert abs(lr_used(p) - 1.125e-3) < 1e-12 and p["batch_size"] == 96 and p["epochs"] == 100
    expect = {  # the official script's values (docs/datasets.md, Presets): lr, wd, S, mixup, cutmix, seed, simam, head
        "cifar100": (5e-3, 1e-5, 12, 0.8, 1.0, 0, True, "linear"),
        "cifar10": (5e-3, 1e-4, 8, 0.8, 1.0, 0, True, "linear"),
        "dtd": (6.5e-3, 1e-4, 4, 0.8, 1.0, 3407, False, "linear"),
        "dogs": (5e-4, 1e-8, 12, 0.8, 1.0, 0, False, "linear"),
        "gtsrb": (1e-2, 1e-6, 6, 0.8, 1.0, 0, False, "linear"),
        "nabirds": (1e-2, 0.0, 8, 0.8, 1.0, 0, False, "two_layer"),
        "svhn": (1.5e-2, 1e-3, 12, 0.0, 0.0, 0, False, "linear"),
        "flowers": (1.5e-2, 1e-4, 8, 0.0, 0.0, 0, True, "two_layer"),
        "food101": (5e-3, 1e-4, 8, 0.8, 1.0, 0, False, "linear"),
    }
    for n, v in expect.items():
        p = load_preset(n)
        got = tuple(p[k] for k in ("lr", "weight_decay", "shared_layers", "mixup", "cutmix",
                                   "seed", "simam", "head"))
        assert got == v, n
        assert isinstance(p["weight_decay"], float) and p["warmup_epochs"] == 5
    v = load_preset("vtab/dsprites_loc")
    assert v["num_classes"] == 16 and v["recipe"] == "vtab" and v["train_split"] == "train800val200"
    for n in EMBEDDED:
        e = load_preset(n)
        assert e["recipe"] == "plain" and e["img_size"] <= 64 and e["epochs"] <= 20
    from svp.data.presets import PRESET_KEYS
    for n in list_datasets():
        if n in ("imagefolder", "csv"):
            continue
        assert set(PRESET_KEYS) <= set(load_preset(n)), n


def test_a_dataset_registered_without_a_preset_file_trains_at_its_registry_recipe(monkeypatch):
    """docs/architecture.md: a dataset's registry entry carries its image recipe and size; one
    added without a preset yaml trained at 224 px on the svp recipe, whatever its entry said."""
    from svp.data import registry
    from svp.engine.config import resolve
    info, builder = registry._REGISTRY["digits"]
    mine = dataclasses.replace(info, name="tinyset_test", aliases=(), recipe="plain", img_size=48)
    monkeypatch.setitem(registry._REGISTRY, "tinyset_test", (mine, builder))
    p = load_preset("tinyset_test")
    assert (p["source"], p["recipe"], p["img_size"], p["num_classes"]) == ("registry", "plain", 48, 10)
    cfg = resolve(overrides=["data.dataset=tinyset_test", "method.name=linear"])
    assert (cfg["data"]["recipe"], cfg["data"]["img_size"]) == ("plain", 48)


def test_missing_root_message(monkeypatch):
    monkeypatch.delenv("SVP_DATA", raising=False)
    with pytest.raises(DatasetError, match=r"(?s)root=.*SVP_DATA.*VTAB/vtab-1k/dtd.*docs/datasets.md"):
        build_dataset("vtab/dtd", "test")
    with pytest.raises(DatasetError, match=r"(?s)data root not found: /nonexistent/x.*CUB_200_2011"):
        build_dataset("cub200", "train", root="/nonexistent/x")
    with pytest.raises(TypeError, match="unknown option"):
        build_dataset("digits", "train", partition=2)


def test_the_svp_recipe_posterizes_at_the_clipped_magnitude_as_pillow_before_13_did():
    """RandAugment's magnitude (drawn around 9, clipped at 10) asks "PosterizeIncreasing" for
    0 bits at 10, which Pillow 13 refuses: about one training image in 2,000 raised, at the
    same step again on every resume. 0 bits is every channel 0, as in Pillow < 13."""
    import numpy as np
    from PIL import Image
    from svp.data.transforms import build_transform
    t = build_transform("svp", True, 32)
    ops = [op for tt in t.transforms for op in getattr(tt, "ops", ()) if op.name == "PosterizeIncreasing"]
    assert ops
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))
    out = op(img)
    assert out.mode == "RGB" and not np.asarray(out).any()
    op.magnitude = 5   # 2 bits: Pillow's own posterize
    from PIL import ImageOps
    assert np.array_equal(np.asarray(op(img)), np.asarray(ImageOps.posterize(img, 2)))
