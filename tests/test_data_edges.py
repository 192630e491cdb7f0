"""Data readers at their edges (whole-module review of svp.data, 2026-12-06): skipping bad
images inside carved splits and split expressions, split aliases under val_from_train, hidden
folders, classes listed twice, array labels past the class list, Food-101 meta entries,
custom split names, and `svp data check --val-from-train` on VTAB."""
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from svp.data import build_dataset
from svp.data.base import DatasetError
from svp.data.check import check_before_training, find_bad_images
from svp.data.fake import make_fake_root


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    make_fake_root(str(root), which=("vtab",), vtab_tasks=("eurosat",), vtab_items=20)
    return str(root)


def _files(ds):
    return [ds.describe(i) for i in range(len(ds))]


def _pixels(img):
    return np.asarray(img).tobytes()


def test_a_bad_image_of_a_carved_split_is_replaced_by_one_of_the_same_side(tmp_path, caplog):
    """With val_from_train + skip_bad_images, an unreadable training image was replaced by the
    next item of the whole list, which could be a carved validation image (and the other way)."""
    make_fake_root(str(tmp_path), which=("vtab",), vtab_tasks=("eurosat",), vtab_items=20)
    kw = dict(root=str(tmp_path), val_from_train=0.25, seed=0, skip_bad_images=True)
    train, val = build_dataset("vtab/eurosat", "train", **kw), build_dataset("vtab/eurosat", "val", **kw)
    val_pixels = {_pixels(val[i][0]) for i in range(len(val))}
    train_pixels = [_pixels(train[i][0]) for i in range(len(train))]
    # every training item whose neighbour in the whole list is a validation item
    carved = set(val.indices)
    at = [k for k in range(len(train)) if train.indices[k] + 1 in carved]
    assert at
    for k in at:
        with open(train.describe(k), "wb") as f:
            f.write(b"broken")
    for k in at:
        img, label = train[k]
        assert _pixels(img) not in val_pixels
        # the next readable training item's image and label stand in for it
        nxt = next(j for j in range(k + 1, len(train)) if j not in at)
        assert _pixels(img) == train_pixels[nxt] and label == train.targets[nxt]
    assert sorted(train.skipped) == sorted(train.describe(k) for k in at)
    # a carved validation image is logged under the val split, not the list it was cut from
    import logging
    caplog.set_level(logging.WARNING, logger="svp.data")
    with open(val.describe(0), "wb") as f:
        f.write(b"broken")
    val[0]
    assert "met so far in vtab/eurosat/val)" in caplog.text, caplog.text


def test_split_expressions_skip_bad_images_and_are_checked_before_training(tmp_path, caplog):
    make_fake_root(str(tmp_path), which=("vtab",), vtab_tasks=("eurosat",))
    bad = os.path.join(str(tmp_path), "VTAB/vtab-1k/eurosat/images/val200/000001.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    for expr in ("val200[:4]", "train800+val200", "train800+val200[:2]"):
        ds = build_dataset("vtab/eurosat", expr, root=str(tmp_path), skip_bad_images=True)
        assert ds.skip_bad_images
        items = [ds[i] for i in range(len(ds))]   # (raised DatasetError on the bad image)
        assert len(items) == len(ds) and ds.skipped == [bad], expr
        assert check_before_training({"train": ds})["train"], expr   # read, warned, not raised
        plain = build_dataset("vtab/eurosat", expr, root=str(tmp_path))
        with pytest.raises(DatasetError, match="found before training"):   # (a join was not read at all)
            check_before_training({"train": plain})
    os.remove(bad)
    joined = build_dataset("vtab/eurosat", "train800+val200", root=str(tmp_path), check_files=False)
    assert find_bad_images(joined, read=False) == [f"image not found: {bad}"]


def test_aliases_of_the_official_training_split_give_the_remainder_of_a_carve(vtab_root):
    """VTAB's 'trainval' (= train800val200) and the embedded sets' 'train800' (= train) were the
    whole list beside the carved validation split."""
    kw = dict(root=vtab_root, val_from_train=0.25, seed=0)
    val = set(_files(build_dataset("vtab/eurosat", "val", **kw)))
    for split in ("train", "train800val200", "trainval"):
        ds = build_dataset("vtab/eurosat", split, **kw)
        assert len(ds) == 30 and not set(_files(ds)) & val, split
    kw = dict(val_from_train=0.1, seed=0)
    carved = {_pixels(x) for x, _ in build_dataset("dsprites_loc", "val", **kw)}
    for split in ("train", "train800"):
        ds = build_dataset("dsprites_loc", split, **kw)
        assert len(ds) == 719 and not {_pixels(x) for x, _ in ds} & carved, split
    assert [_pixels(x) for x, _ in build_dataset("dsprites_loc", "val200", **kw)] == \
        [_pixels(x) for x, _ in build_dataset("dsprites_loc", "val", **kw)]


def test_hidden_folders_are_neither_classes_nor_images(tmp_path):
    make_fake_root(str(tmp_path), which=("imagefolder",))
    root = os.path.join(str(tmp_path), "custom_imagefolder")
    before = build_dataset("imagefolder", "train", root=root)
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    cls = before.classes[0]
    thumbs = os.path.join(root, "train", cls, ".thumbs")
    os.makedirs(thumbs)
    Image.new("RGB", (8, 8)).save(os.path.join(thumbs, "x.png"))
    after = build_dataset("imagefolder", "train", root=root)
    assert after.classes == before.classes and after.targets == before.targets
    assert not any(".thumbs" in p for p in _files(after))


def test_a_csv_class_listed_twice_is_refused_naming_both_lines(tmp_path):
    make_fake_root(str(tmp_path), which=("csv",))
    root = os.path.join(str(tmp_path), "custom_csv")
    ds = build_dataset("csv", "train", root=root)
    names = list(ds.classes)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(names + [names[0]]) + "\n")
    with pytest.raises(DatasetError, match=rf"classes\.txt:{len(names) + 1}: class '{names[0]}' is listed a "
                                           r"second time \(first at line 1\)"):
        build_dataset("csv", "train", root=root)
    os.remove(os.path.join(root, "classes.txt"))
    with pytest.raises(DatasetError, match=r"classes=: class .* second time \(first at position 1\)"):
        build_dataset("csv", "train", root=root, classes=names + [names[0]])


def test_array_files_with_labels_past_the_class_list_are_refused(tmp_path):
    from scipy.io import savemat
    savemat(str(tmp_path / "train_32x32.mat"),
            {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.array([[1], [2], [11], [10]], np.uint8)})
    with pytest.raises(DatasetError, match=r"train_32x32\.mat: 'y'\[2\] is 11, outside 0\.\.10"):
        build_dataset("svhn", "trainval", root=str(tmp_path))
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 255]}, f)
    with pytest.raises(DatasetError, match=r"test_batch: 'labels'\[1\] is 255, outside 0\.\.9"):
        build_dataset("cifar10", "test", root=str(tmp_path))


def test_a_food_meta_entry_that_is_no_text_is_named(tmp_path):
    make_fake_root(str(tmp_path), which=("food101",))
    meta = os.path.join(str(tmp_path), "food-101", "meta", "train.json")
    with open(meta) as f:
        d = json.load(f)
    first = sorted(d)[0]
    d[first][0] = 1007071
    with open(meta, "w") as f:
        json.dump(d, f)
    with pytest.raises(DatasetError, match=rf"train\.json: class '{first}' lists 1007071; expected image names"):
        build_dataset("food101", "train", root=str(tmp_path))


def test_custom_data_takes_any_split_name(tmp_path):
    """docs/datasets.md: imagefolder reads any <root>/<split>/, csv any <root>/<split>.csv."""
    import shutil
    make_fake_root(str(tmp_path), which=("imagefolder", "csv"))
    img, csv = (os.path.join(str(tmp_path), s) for s in ("custom_imagefolder", "custom_csv"))
    shutil.copytree(os.path.join(img, "test"), os.path.join(img, "holdout"))
    shutil.copy(os.path.join(csv, "test.csv"), os.path.join(csv, "holdout.csv"))
    assert len(build_dataset("imagefolder", "holdout", root=img)) == len(build_dataset("imagefolder", "test", root=img))
    assert len(build_dataset("csv", "holdout", root=csv)) == len(build_dataset("csv", "test", root=csv))
    with pytest.raises(DatasetError, match="split file 'nope.csv' not found"):
        build_dataset("csv", "nope", root=csv)
    with pytest.raises(DatasetError, match="unknown split '../test'"):
        build_dataset("csv", "../test", root=csv)
    shutil.copy(os.path.join(csv, "test.csv"), os.path.join(csv, "my-test.csv"))   # in expressions too
    assert len(build_dataset("csv", "my-test[:2]+holdout", root=csv)) == 2 + len(build_dataset("csv", "holdout",
                                                                                              root=csv))


def test_data_check_with_val_from_train_reads_the_carved_vtab_split(vtab_root):
    import io

    from svp.data.cli import check_dataset
    out = io.StringIO()
    assert check_dataset("vtab/eurosat", root=vtab_root, val_from_train=0.25, out=out) == 0
    rows = [ln.split()[0] for ln in out.getvalue().splitlines()[1:-1]]
    assert rows == ["train800", "val200", "train800val200", "val", "test"], out.getvalue()


def test_an_elongated_dataset_image_is_one_error_naming_it_in_eval_and_the_pixel_cache(tmp_path, monkeypatch):
    """The refusal reached svp predict and serve only: svp eval of a folder with a 955-byte
    300000 x 1 PNG went to 2.9 GB at a 32 px model, and under a memory limit blamed the batch size
    (review). The evaluation's dataset wrapper and the pixel cache check before the resize."""
    from PIL import Image

    from svp.data.base import DatasetError, FileListDataset
    from svp.data.cache import PixelCache, split_fixed
    from svp.data.transforms import build_transform
    from svp.engine.distributed import SeededDataset
    thin, fine = tmp_path / "thin.png", tmp_path / "fine.png"
    Image.new("L", (3000, 1)).save(thin)
    Image.new("RGB", (40, 30)).save(fine)
    ds = FileListDataset([(str(fine), 0), (str(thin), 1)], ["a", "b"])
    tf = build_transform("svp", False, img_size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)   # 3000x1 -> 3.9 M once resized
    wrapped = SeededDataset(ds, tf)
    assert wrapped[0][0].shape == (3, 32, 32)
    with pytest.raises(DatasetError, match=r"thin\.png: the image is 3000x1: resized .* 3,888,000 pixels"):
        wrapped[1]
    fixed, _ = split_fixed(tf)
    cache = PixelCache(fixed, len(ds))
    cache.item(0, ds.__getitem__, ds.describe)
    with pytest.raises(DatasetError, match=r"thin\.png: the image is 3000x1"):
        cache.item(1, ds.__getitem__, ds.describe)


def test_custom_splits_of_other_classes_are_refused_before_training(tmp_path):
    """Custom split names are taken since dd5728e, but the class list is each split's own when its
    folders are not among train/val/test/trainval: a 'testing' split lacking 'dog' numbered zebra as
    dog, and svp train scored it so, exit 0 (review)."""
    import shutil

    from svp.engine import config as C
    from svp.engine.setup import build_datasets
    make_fake_root(str(tmp_path), which=("imagefolder",))
    root = tmp_path / "custom_imagefolder"
    for old, new in (("train", "training"), ("test", "testing")):
        shutil.move(str(root / old), str(root / new))
    shutil.rmtree(root / "val")
    classes = sorted(os.listdir(root / "testing"))
    shutil.move(str(root / "testing" / classes[1]), str(tmp_path / "aside"))
    ov = ["data.dataset=imagefolder", f"data.root={root}", "data.train_split=training", "data.val_split=null",
          "data.test_split=testing"]
    with pytest.raises(DatasetError, match=r"data.test_split=testing: its classes .* are not "
                                           r"data.train_split=training's"):
        build_datasets(C.resolve(overrides=ov, use_presets=False))
    shutil.move(str(tmp_path / "aside"), str(root / "testing" / classes[1]))   # the same classes: fine
    build_datasets(C.resolve(overrides=ov, use_presets=False))
