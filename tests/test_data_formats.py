"""Every on-disk format, through the registry, on tiny fake copies (real file and
folder names, generated images), and every failure mode with its message."""
import json
import re
import logging
import os
import shutil

import numpy as np
import pytest

from svp.cli import main as svp_main
from svp.data import DatasetError, build_dataset
from svp.data.fake import make_fake_root

VTAB_FEW = ["cifar", "dtd", "patch_camelyon", "dsprites_loc", "smallnorb_ele", "sun397"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_root")
    man, classes = make_fake_root(str(root), vtab_tasks=None)
    return str(root), man, classes


def _root(root, name):
    if name == "imagefolder":
        return os.path.join(root, "custom_imagefolder")
    if name == "csv":
        return os.path.join(root, "custom_csv")
    return root


def _copy(fake, tmp_path, *parts):
    """A private copy of part of the fake root, for tests that break files."""
    root = fake[0]
    dst = tmp_path / "root"
    for p in parts:
        src = os.path.join(root, p)
        if os.path.isdir(src):
            shutil.copytree(src, dst / p)
        else:
            os.makedirs(dst / os.path.dirname(p), exist_ok=True)
            shutil.copy(src, dst / p)
    return str(dst)


def test_every_format_loads_with_counts_labels_and_class_order(fake):
    root, man, classes = fake
    assert len([n for n in man if n.startswith("vtab/")]) == 19
    for name, splits in man.items():
        for split, items in splits.items():
            ds = build_dataset(name, split, root=_root(root, name))
            assert len(ds) == len(items), (name, split)
            assert ds.classes == classes[name], name
            assert ds.num_classes == len(classes[name])
            assert len(ds.targets) == len(ds)
            if items[0][0] is not None:          # file-backed: path -> class name
                got = {ds.describe(i): ds.classes[ds.targets[i]] for i in range(len(ds))}
                assert got == dict(items), (name, split)
            else:                                # array-backed: pixel value = label
                for i in range(len(ds)):
                    img, y = ds[i]
                    assert np.asarray(img)[0, 0, 0] == y
                    assert ds.classes[y] == items[i][1]
            img, y = ds[0]
            assert img.mode == "RGB" and y == ds.targets[0]


def test_split_protocols(fake):
    root = fake[0]
    # VTAB generic aliases
    assert len(build_dataset("vtab/dtd", "train", root=root)) == 4          # train800
    assert len(build_dataset("vtab/dtd", "trainval", root=root)) == 8       # train800val200
    # GTSRB / Food-101: seeded 80 / 20 of the official training set, disjoint
    for name in ("gtsrb", "food101"):
        tv = build_dataset(name, "trainval", root=root)
        tr = build_dataset(name, "train", root=root)
        va = build_dataset(name, "val", root=root)
        assert len(tr) == int(len(tv) * 0.8) and len(tr) + len(va) == len(tv)
        ptr = {tr.describe(i) for i in range(len(tr))}
        assert not ptr & {va.describe(i) for i in range(len(va))}
        assert ptr == {build_dataset(name, "train", root=root, seed=0).describe(i)
                       for i in range(len(tr))}
        assert ptr != {build_dataset(name, "train", root=root, seed=1).describe(i)
                       for i in range(len(tr))}
    # SVHN: first 80 %, no shuffle; 10 -> 0
    sv = build_dataset("svhn", "train", root=root)
    assert len(sv) == 40 and sv.targets == [i % 10 for i in range(40)]
    assert len(build_dataset("svhn", "val", root=root)) == 10
    # DTD trainval = train1 + val1
    assert len(build_dataset("dtd", "trainval", root=root)) == 2 * 94


def test_val_from_train(fake, caplog):
    root = fake[0]
    with pytest.raises(DatasetError, match="val_from_train"):
        build_dataset("cifar10", "val", root=root)
    with caplog.at_level(logging.INFO, logger="svp.data"):
        va = build_dataset("cifar100", "val", root=root, val_from_train=0.5, seed=3)
    assert "carved 100 validation items" in caplog.text
    tr = build_dataset("cifar100", "train", root=root, val_from_train=0.5, seed=3)
    assert len(tr) + len(va) == 200
    assert sorted(va.targets) == list(range(100))           # stratified: one per class
    assert set(tr.indices).isdisjoint(va.indices)
    again = build_dataset("cifar100", "val", root=root, val_from_train=0.5, seed=3)
    assert again.indices == va.indices
    assert build_dataset("cifar100", "val", root=root, val_from_train=0.5, seed=4).indices != va.indices
    # VTAB: carved from the official training list train800val200
    v = build_dataset("vtab/patch_camelyon", "val", root=root, val_from_train=0.25)
    t = build_dataset("vtab/patch_camelyon", "train", root=root, val_from_train=0.25)
    assert len(v) == 2 and len(v) + len(t) == 8
    t2 = build_dataset("vtab/patch_camelyon", "train800val200", root=root, val_from_train=0.25)
    assert t2.indices == t.indices and set(t2.indices).isdisjoint(v.indices)
    # the fake's 8 images of 100-class CIFAR are alone in their classes: nothing to carve, refused
    # (an empty validation split used to be returned, and selected epochs on NaN)
    assert len(build_dataset("vtab/cifar", "train", root=root, val_from_train=0.25)) == 8
    with pytest.raises(DatasetError, match="leaves the 'val' split empty"):
        build_dataset("vtab/cifar", "val", root=root, val_from_train=0.25)
    assert len(build_dataset("vtab/cifar", "test", root=root, val_from_train=0.25)) == 4
    # file-backed subsets read their images through the transform
    x, y = build_dataset("dtd", "val", root=root, val_from_train=0.1,
                         transform=lambda im: im.size)[0]
    assert x == (8, 8)


def test_missing_split_file_and_folder(fake, tmp_path):
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/dtd", "dtd")
    os.remove(os.path.join(r, "VTAB/vtab-1k/dtd/test.txt"))
    with pytest.raises(DatasetError) as e:
        build_dataset("vtab/dtd", "test", root=r)
    msg = str(e.value)
    assert os.path.join(r, "VTAB/vtab-1k/dtd/test.txt") in msg
    assert "train800val200.txt" in msg and "docs/datasets.md" in msg
    with pytest.raises(DatasetError, match=r"(?s)VTAB/vtab-1k/kitti.*expected layout"):
        build_dataset("vtab/kitti", "test", root=r)
    os.remove(os.path.join(r, "dtd/dtd/labels/val1.txt"))
    with pytest.raises(DatasetError, match="labels/val1.txt"):
        build_dataset("dtd", "val", root=r)
    for name, path in [("cub200", "FGVC/CUB_200_2011"), ("cifar10", "cifar-10-batches-py"),
                       ("gtsrb", "gtsrb/GTSRB"), ("svhn", "test_32x32.mat"),
                       ("food101", "food-101"), ("dogs", "FGVC/stanford-dogs")]:
        with pytest.raises(DatasetError) as e:
            build_dataset(name, "test", root=r)
        assert os.path.join(r, path) in str(e.value) and "docs/datasets.md" in str(e.value)
    with pytest.raises(DatasetError, match="imagefolder split folder 'test'"):
        build_dataset("imagefolder", "test", root=r)
    with pytest.raises(DatasetError, match=r"csv split file 'test.csv'"):
        build_dataset("csv", "test", root=r)


def test_missing_image_error_and_skip(fake, tmp_path, caplog):
    r = _copy(fake, tmp_path, "FGVC/OxfordFlower")
    gone = os.path.join(r, "FGVC/OxfordFlower/jpg/image_00013.jpg")
    os.remove(gone)
    with pytest.raises(DatasetError) as e:
        build_dataset("flowers", "test", root=r)
    assert gone in str(e.value) and "1 of 102" in str(e.value) and "test.json" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        ds = build_dataset("flowers", "test", root=r, skip_bad_images=True)
    assert len(ds) == 101 and ds.skipped == [gone]
    assert "skipping 1 missing image" in caplog.text


def test_truncated_and_unreadable_images(fake, tmp_path, caplog):
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/eurosat")
    d = os.path.join(r, "VTAB/vtab-1k/eurosat/images/test")
    first, second = os.path.join(d, "000000.jpg"), os.path.join(d, "000001.jpg")
    data = open(first, "rb").read()
    open(first, "wb").write(data[: len(data) // 2])        # truncated jpeg
    open(second, "wb").write(b"not an image at all")
    ds = build_dataset("vtab/eurosat", "test", root=r)
    with pytest.raises(DatasetError, match=rf"unreadable image: {first}"):
        ds[0]
    with pytest.raises(DatasetError, match=rf"unreadable image: {second}"):
        ds[1]
    ds = build_dataset("vtab/eurosat", "test", root=r, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        img, y = ds[0]                                  # -> item 2, the next readable one
    assert y == ds.targets[2] and img.size == (8, 8)
    assert len(ds.skipped) == 2 and first in caplog.text and second in caplog.text
    assert "2 bad image(s) met so far" in caplog.text
    # met again (every epoch): neither counted nor logged again (the count grew by one a read)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        ds[1], ds[0]
    assert len(ds.skipped) == 2 and caplog.text == ""
    # the check command names both files and fails
    rc = svp_main(["data", "check", "vtab/eurosat", "--root", r, "--split", "test"])
    assert rc == 1


def test_malformed_lines_give_file_and_line(fake, tmp_path):
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/clevr_count", "dtd", "gtsrb", "custom_csv",
              "FGVC/nabirds")
    lst = os.path.join(r, "VTAB/vtab-1k/clevr_count/val200.txt")
    lines = open(lst).read().splitlines()
    lines[2] = lines[2].replace(" ", "\t")
    open(lst, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{lst}:3: malformed line"):
        build_dataset("vtab/clevr_count", "val200", root=r)
    lines[2] = lines[2].replace("\t", " ").rsplit(" ", 1)[0] + " seven"
    open(lst, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{lst}:3: label 'seven' is not an integer"):
        build_dataset("vtab/clevr_count", "val200", root=r)
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 8"                  # 8 classes: 0..7
    open(lst, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"label 8 .*outside 0..7.*8 classes"):
        build_dataset("vtab/clevr_count", "val200", root=r)

    dtd = os.path.join(r, "dtd/dtd/labels/test1.txt")
    with open(dtd, "a") as f:
        f.write("just_a_name.jpg\n")
    with pytest.raises(DatasetError, match=rf"{dtd}:95: malformed line"):
        build_dataset("dtd", "test", root=r)

    gt = os.path.join(r, "gtsrb/GT-final_test.csv")
    good = open(gt).read()
    header = good.splitlines()[0].split(";")
    row = ["0"] * len(header)
    row[header.index("Filename")], row[header.index("ClassId")] = "00998.ppm", "43"
    with open(gt, "a") as f:   # a ClassId past the 43 classes: named at its line (it had none)
        f.write(";".join(row) + "\n")
    with pytest.raises(DatasetError, match=rf"{gt}:88: ClassId 43 outside 0\.\.42"):
        build_dataset("gtsrb", "test", root=r)
    with open(gt, "w") as f:
        f.write(good + "00999.ppm;8;8\n")
    with pytest.raises(DatasetError, match=rf"{gt}:88: malformed row"):
        build_dataset("gtsrb", "test", root=r)

    c = os.path.join(r, "custom_csv/val.csv")
    with open(c, "a") as f:
        f.write("images/x.jpg\n")
    with pytest.raises(DatasetError, match=rf"{c}:8: malformed line"):
        build_dataset("csv", "val", root=os.path.join(r, "custom_csv"))

    js = os.path.join(r, "FGVC/nabirds/test.json")
    open(js, "w").write('{"0295/a.jpg": 295,\n "0296/b.jpg": }')
    with pytest.raises(DatasetError, match=rf"{js}:2: malformed json"):
        build_dataset("nabirds", "test", root=r)


def test_class_counts_checked_against_spec(fake, tmp_path):
    r = _copy(fake, tmp_path, "FGVC/stanford-dogs", "food-101", "gtsrb")
    for s in ("train", "val", "test"):
        p = os.path.join(r, f"FGVC/stanford-dogs/{s}.json")
        d = json.load(open(p))
        json.dump({k: v for k, v in d.items() if v != 120}, open(p, "w"))
    with pytest.raises(DatasetError, match=r"dogs: found 119 distinct class ids.*expected 120"):
        build_dataset("dogs", "train", root=r)
    p = os.path.join(r, "food-101/meta/train.json")
    d = json.load(open(p))
    d.pop(sorted(d)[0])
    json.dump(d, open(p, "w"))
    with pytest.raises(DatasetError, match=r"lists 100 classes, expected 101"):
        build_dataset("food101", "train", root=r)
    shutil.rmtree(os.path.join(r, "gtsrb/GTSRB/Training/00042"))
    with pytest.raises(DatasetError, match=r"43 class folders.*missing: 00042"):
        build_dataset("gtsrb", "train", root=r)


def test_lists_naming_an_image_twice_and_class_ids_out_of_place_are_named(fake, tmp_path, caplog):
    """A VTAB or DTD list naming an image twice (even under two labels) and an FGVC json giving a
    key twice (the last entry silently won) were taken without a word; a class id or DTD class
    name out of place was a count of classes, naming no entry (QA 14c)."""
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/patch_camelyon", "dtd", "FGVC/OxfordFlower", "FGVC/nabirds")
    lst = os.path.join(r, "VTAB/vtab-1k/patch_camelyon/test.txt")
    lines = open(lst).read().splitlines()
    path, label = lines[0].rsplit(" ", 1)
    open(lst, "a").write(f"{path} {1 - int(label)}\n{lines[1]}\n")
    n = len(lines)
    with caplog.at_level("WARNING", logger="svp.data"):
        ds = build_dataset("vtab/patch_camelyon", "test", root=r)
    assert len(ds) == n + 2
    assert f"1 line(s) of {lst} list an image already listed with another label (line {n + 1}: " \
           f"{1 - int(label)}, line 1: {label})" in caplog.text
    assert f"1 line(s) of {lst} list an image already listed (line {n + 2} repeats line 2)" in caplog.text
    # DTD: a repeat said; a space in a file name is part of it; a class name typo named with its line
    labels = os.path.join(r, "dtd/dtd/labels/test1.txt")
    first = open(labels).read().splitlines()[0]
    cls = first.split("/")[0]
    shutil.copy(os.path.join(r, "dtd/dtd/images", first), os.path.join(r, "dtd/dtd/images", cls, "a copy.jpg"))
    open(labels, "a").write(f"{first}\n{cls}/a copy.jpg\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="svp.data"):
        ds = build_dataset("dtd", "test", root=r)
    assert "a copy.jpg" in ds.samples[-1][0] and "list an image already listed (line" in caplog.text
    text = open(labels).read().splitlines()
    text[2] = "bandedd/" + text[2].split("/", 1)[1]
    open(labels, "w").write("\n".join(text) + "\n")
    with pytest.raises(DatasetError, match=r"found 48 classes .*expected 47; classes without an images/<class>/ "
                                           r"folder: 'bandedd' \(labels/test1\.txt:3\)"):
        build_dataset("dtd", "test", root=r)
    # FGVC: a key given twice (the last wins, as json.load and the official loader read it), said
    test_json = os.path.join(r, "FGVC/OxfordFlower/test.json")
    d = json.load(open(test_json))
    key, cid = next(iter(d.items()))
    other = next(v for v in d.values() if v != cid)
    raw = open(test_json).read().rstrip().rstrip("}") + f', "{key}": {other}}}'
    open(test_json, "w").write(raw)
    caplog.clear()
    with caplog.at_level("WARNING", logger="svp.data"):
        ds = build_dataset("flowers", "test", root=r)
    assert f"{test_json}: 1 image(s) listed more than once, 1 with another class id (e.g. {key!r}: {cid!r}, " \
           f"then {other!r})" in caplog.text
    assert len(ds) == len(d)
    # an id out of range: named with its file and entry
    d[key] = 103
    json.dump(d, open(test_json, "w"))
    with pytest.raises(DatasetError, match=r"found 103 distinct class ids .*expected 102; class ids used by one split "
                                           r"file only: '103' \(test\.json: '" + re.escape(key)):
        build_dataset("flowers", "test", root=r)
    nab = os.path.join(r, "FGVC/nabirds/val.json")
    d = json.load(open(nab))
    key = next(iter(d))
    d[key] = 9999
    json.dump(d, open(nab, "w"))
    with pytest.raises(DatasetError, match=r"class ids not in classes\.txt: '9999' \(val\.json: '"):
        build_dataset("nabirds", "test", root=r)


def test_data_check_command_on_every_fake_layout(fake, capsys):
    root, man, classes = fake
    names = ["vtab/dtd", "vtab/smallnorb_azi", "cub200", "nabirds", "flowers", "dogs", "cars",
             "cifar10", "cifar100", "dtd", "gtsrb", "svhn", "food101", "imagefolder", "csv"]
    for name in names:
        rc = svp_main(["data", "check", name, "--root", _root(root, name)])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "all images present and readable" in out
        for split, items in man[name if "/" in name or name in ("imagefolder", "csv")
                                else f"hta/{name}"].items():
            if split == "trainval":
                continue
            # the classes the split holds, not the dataset's (review36: every line said all of them)
            key = name if "/" in name or name in ("imagefolder", "csv") else f"hta/{name}"
            held, total = len({label for _, label in items}), len(classes[key])
            shown = f"{held}" if held == total else f"{held} of {total}"
            assert f"{len(items):8d} images, {shown} classes" in out, (name, split, out)
    rc = svp_main(["data", "check", "cub200", "--root", root, "--per-class", "--split", "val"])
    out = capsys.readouterr().out
    assert rc == 0 and "001.Bird_species_001" in out and "val" in out and "test " not in out
    # the val split --val-from-train makes is among every split (it was left out)
    rc = svp_main(["data", "check", "cifar10", "--root", root, "--val-from-train", "0.5"])
    lines = [ln.split()[:2] for ln in capsys.readouterr().out.splitlines()[1:-1]]
    n = len(man["hta/cifar10"]["train"])
    assert rc == 0 and lines == [["train", str(n - n // 2)], ["val", str(n // 2)],
                                 ["test", str(len(man["hta/cifar10"]["test"]))]], lines


def test_data_check_names_every_missing_file(fake, tmp_path, capsys):
    r = _copy(fake, tmp_path, "food-101")
    a = os.path.join(r, "food-101/images/dish_000/200000.jpg")
    b = os.path.join(r, "food-101/images/dish_007/200070.jpg")
    os.remove(a)
    os.remove(b)
    rc = svp_main(["data", "check", "food101", "--root", r])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"image not found: {a}" in out and f"image not found: {b}" in out
    assert "2 problem(s)" in out
    rc = svp_main(["data", "check", "cub200", "--root", str(tmp_path / "nothing")])
    out = capsys.readouterr().out
    assert rc == 1 and "data root not found" in out and "CUB_200_2011" in out


def test_data_check_embedded(capsys):
    for name in ("digits", "faces", "dsprites_ori"):
        rc = svp_main(["data", "check", name, "--per-class"])
        out = capsys.readouterr().out
        assert rc == 0 and "all images present and readable" in out
    assert "1000 images" in out and "ori_bin_15" in out
    assert svp_main(["data", "list"]) == 0
    assert "shapes_count" in capsys.readouterr().out


def test_dataloader_with_workers(fake):
    import torch
    from svp.data import build_transform
    tf = build_transform("vtab", False, img_size=16)
    for name, kw in (("vtab/cifar", {"root": fake[0]}), ("cifar10", {"root": fake[0]}),
                     ("dtd", {"root": fake[0], "val_from_train": 0.2}), ("faces", {})):
        ds = build_dataset(name, "train", transform=tf, **kw)
        dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        x, y = next(iter(dl))
        assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
        # worker processes return the same items as reading them here
        here = [ds[i] for i in range(4)]
        assert torch.equal(x, torch.stack([img for img, _ in here])), name
        assert y.tolist() == [label for _, label in here], name


def test_an_empty_split_is_refused_and_a_bom_is_read_through(fake, tmp_path, capsys):
    """An empty list file would train on nothing or report a NaN accuracy as a result; a UTF-8
    byte-order mark (list files saved on Windows) is not part of the first path."""
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/clevr_count")
    task = os.path.join(r, "VTAB/vtab-1k/clevr_count")
    n = len(build_dataset("vtab/clevr_count", "train800", root=r))
    lst = os.path.join(task, "train800.txt")
    with open(lst, "rb") as f:
        raw = f.read()
    with open(lst, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw)
    assert len(build_dataset("vtab/clevr_count", "train800", root=r)) == n
    open(os.path.join(task, "test.txt"), "w").close()
    with pytest.raises(DatasetError, match=r"clevr_count/test: no images listed in .*test\.txt"):
        build_dataset("vtab/clevr_count", "test", root=r)
    assert svp_main(["data", "check", "vtab/clevr_count", "--root", r]) != 0
    assert "test.txt" in capsys.readouterr().out


def test_check_of_a_vtab_export_of_what_svp_reads_passes(fake, tmp_path, capsys):
    """A task folder with only train800val200.txt and test.txt (what SVP reads) trains, but
    `svp data check` reported train800 and val200 as two problems (exit 1)."""
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/eurosat")
    task = os.path.join(r, "VTAB/vtab-1k/eurosat")
    for f in ("train800.txt", "val200.txt"):
        os.remove(os.path.join(task, f))
    assert svp_main(["data", "check", "vtab/eurosat", "--root", r, "--no-read"]) == 0
    out = capsys.readouterr().out
    assert "train800        absent (SVP trains on train800val200" in out and "val200          absent" in out
    assert svp_main(["data", "check", "vtab/eurosat", "--root", r, "--no-read", "--split", "val200"]) == 1
    assert "val200.txt" in capsys.readouterr().out


def test_cifar_batches_are_read_without_running_pickled_code(fake, tmp_path):
    import pickle

    r = _copy(fake, tmp_path, "cifar-10-batches-py")
    assert len(build_dataset("cifar10", "test", root=r)) > 0  # numpy arrays, bytes, lists: allowed
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    with open(os.path.join(r, "cifar-10-batches-py", "test_batch"), "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(DatasetError, match="not allowed in a CIFAR batch"):
        build_dataset("cifar10", "test", root=r)
    assert not marker.exists()
    # an 89-byte file that calls numpy.ndarray((N, 3072), 'u1') itself: N images of uninitialised
    # memory (gigabytes), where numpy's own rebuild reads its data from the file
    import struct

    def text(v):
        b = v.encode()
        return b"X" + struct.pack("<I", len(b)) + b
    n = 300_000
    arr2 = (b"cnumpy\nndarray\nJ" + struct.pack("<i", n) + b"M" + struct.pack("<H", 3072) + b"\x86" + text("u1")
            + b"\x86\x81")
    arr1 = b"cnumpy\nndarray\nJ" + struct.pack("<i", n) + b"\x85" + text("u1") + b"\x86\x81"
    with open(os.path.join(r, "cifar-10-batches-py", "test_batch"), "wb") as f:
        f.write(b"\x80\x02}" + text("data") + arr2 + b"s" + text("labels") + arr1 + b"s.")
    with pytest.raises(DatasetError, match=r"test_batch: UnpicklingError: an array of 921,600,000 values, more than a "
                                           r"CIFAR file holds"):
        build_dataset("cifar10", "test", root=r)


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(monkeypatch, capsys):
    """`svp data list | head -1`: the listing's next write meets a closed pipe; the command
    ends with exit 0 and no traceback, as a Unix filter does."""
    import io
    import sys

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert svp_main(["data", "list"]) == 0


def test_a_closed_stdout_or_stderr_drops_the_output_and_keeps_the_exit_status(tmp_path):
    """`svp ... >&-` starts Python with sys.stdout None: a finished command ended in an
    AttributeError at its last flush (exit 1); `2>&-` turned a usage error's exit 2 into 1
    (review38)."""
    import subprocess
    import sys
    py = f"{sys.executable} -m svp"
    for cmd, rc in ((f"{py} data list >&-", 0), (f"{py} data list --bogus 2>&-", 2),
                    (f"{py} data check digits >&- 2>&-", 0)):
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
        assert r.returncode == rc and "Traceback" not in r.stderr, (cmd, r.returncode, r.stderr[-2000:])


def test_output_on_a_full_disk_ends_the_command_with_one_line(monkeypatch, capsys):
    """`svp data list > /dev/full`, or any command whose own words for a full disk do not cover
    the write that failed: one line naming the error, exit 2 (it was a traceback, exit 1)."""
    import errno
    import io
    import sys

    class FullDisk(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sys, "stdout", FullDisk())
    assert svp_main(["data", "list"]) == 2
    err = capsys.readouterr().err
    assert err == "svp data list: error: a write failed (No space left on device)\n"
    # --help too (argparse dropped its write's error: the text was lost with exit 0)
    assert svp_main(["data", "list", "--help"]) == 2
    assert capsys.readouterr().err == "svp: error: a write failed (No space left on device)\n"

    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert svp_main(["train", "--help"]) == 0   # `svp train --help | head`

    class Denied(io.StringIO):  # not a disk's state: a bug to report, with its traceback
        def write(self, s):
            raise OSError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(sys, "stdout", Denied())
    with pytest.raises(PermissionError):
        svp_main(["data", "list"])


def test_out_of_memory_in_svp_data_names_its_own_options(tmp_path, capsys, monkeypatch):
    """`svp data grid` out of memory was told --batch-size and DataLoader workers, train's (retest 80)."""
    import svp.data.cli as dcli

    def oom(*a, **k):
        raise MemoryError()
    monkeypatch.setattr(dcli, "save_grid", oom)
    assert svp_main(["data", "grid", "digits", "--n", "9999", "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert err == ("svp data grid: error: out of memory (MemoryError): fewer images (--n), or more memory (a limit: "
                   "ulimit -v?)\n"), err


def test_every_command_out_of_memory_names_its_own_options(tmp_path, capsys, monkeypatch):
    """Each command and action has its own advice (eval, predict, visualize, serve, doctor, ... were
    given train's: train.eval_batch_size and DataLoader workers, which they do not take: retest 82)."""
    import argparse

    from svp.cli import OOM_ADVICE, build_parser

    def commands(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    subs = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                    yield from (commands(sub, f"{prefix}{name} ") if subs else [f"{prefix}{name}"])
    names = set(commands(build_parser()))
    assert "data check" in names and "eval" in names and "serve" in names, names
    assert names == set(OOM_ADVICE), (names ^ set(OOM_ADVICE))
    for name, advice in OOM_ADVICE.items():   # (the options it names are the command's own)
        flags = set(re.findall(r"--[a-z-]+", advice))
        usage = build_parser()
        for word in name.split():
            usage = next(a for a in usage._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        assert flags <= {o for a in usage._actions for o in a.option_strings}, (name, flags)
    import svp.engine.cli as ecli

    def oom(*a, **k):
        raise MemoryError()
    monkeypatch.setattr(ecli, "load_for_inference", oom)
    assert svp_main(["eval", str(tmp_path), "--dataset", "digits"]) == 1
    assert capsys.readouterr().err == ("svp eval: error: out of memory (MemoryError): a smaller --batch-size, or more "
                                       "memory (a limit: ulimit -v?)\n")
    import svp.doctor as doctor
    monkeypatch.setattr(doctor, "_versions", oom)
    assert svp_main(["doctor", "--no-timing"]) == 1
    assert capsys.readouterr().err == ("svp doctor: error: out of memory (MemoryError): more memory (a limit: "
                                       "ulimit -v?)\n")


def test_data_grid_makes_its_output_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "sub" / "grid.png"
    assert svp_main(["data", "grid", "digits", "--n", "4", "--cols", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "afile").write_text("x")
    assert svp_main(["data", "grid", "digits", "--out", str(tmp_path / "afile" / "g.png")]) == 2
    err = capsys.readouterr().err   # (makedirs said "File exists" of a folder that does not exist)
    assert "cannot create its folder" in err and f"({tmp_path / 'afile'} is a file, not a folder)" in err, err
    # a full disk as it writes: one line (it was a traceback), and no cut-off PNG
    import errno

    import svp.io as sio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sio.os, "fsync", full)
    assert svp_main(["data", "grid", "digits", "--n", "4", "--cols", "2", "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot write it (No space left on device)" in err and "Traceback" not in err
    assert not any(p.name.endswith("f.png") for p in tmp_path.iterdir())


def test_data_grid_draws_class_names_as_written_not_as_mathtext(tmp_path):
    """A '$' in a folder name was matplotlib's mathtext: '$\\bad{$' crashed the grid with a
    traceback, 'cost $5 and $6' was drawn as 'cost 5and6' in italics."""
    import matplotlib.text
    root = tmp_path / "r"
    names = ["$\\bad{$", "cost $5 and $6"]
    from PIL import Image
    for name in names:
        (root / "test" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (90, 90, 90)).save(root / "test" / name / "0.png")
    drawn = []
    real = matplotlib.text.Text.draw

    def draw(self, renderer):
        drawn.append((self.get_text(), self.get_parse_math()))
        return real(self, renderer)
    matplotlib.text.Text.draw = draw
    try:
        assert svp_main(["data", "grid", "imagefolder", "--root", str(root), "--split", "test", "--n", "2",
                         "--cols", "2", "--out", str(tmp_path / "g.png")]) == 0
    finally:
        matplotlib.text.Text.draw = real
    assert {(n, False) for n in names} <= set(drawn), drawn


def test_data_commands_refuse_bad_values_with_exit_2_and_say_the_file_they_write(tmp_path, capsys, monkeypatch):
    """grid exited 1 for bad values and printed --out as given while matplotlib wrote <out>.png
    (an existing folder g became ./g.png); check counted --val-from-train 2 as missing data;
    list --group bogus printed nothing, exit 0."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("g")
    for argv, words in ((["grid", "digits", "--n", "0", "--out", "x.png"], "--n and --cols must be >= 1"),
                        (["grid", "nosuch", "--out", "x.png"], "unknown dataset 'nosuch'"),
                        (["grid", "digits", "--split", "nope", "--out", "x.png"], "unknown split 'nope'"),
                        (["grid", "digits", "--out", "g"], "--out 'g': expected the path of the PNG file"),
                        (["check", "digits", "--val-from-train", "2"], "--val-from-train 2.0: expected a fraction"),
                        (["check", "digits", "--workers", "0"], "--workers 0: expected a positive number"),

                        (["list", "--group", "bogus"], "--group 'bogus': no such group"),
                        # options a dataset does not read: the command's mistake (review 78)
                        (["check", "digits", "--partition", "2"], "--partition: digits takes no partition "
                                                                  "(it is for hta/dtd)"),
                        (["check", "dtd", "--partition", "11"], "--partition 11: expected one of DTD's partitions"),
                        (["check", "digits", "--file", "x.csv"], "--file: digits takes no file (it is for csv)")):
        assert svp_main(["data", *argv]) == 2, argv
        assert words in capsys.readouterr().err, argv
    for argv, words in ((["grid", "digits", "--seed", "4294967296", "--out", "x.png"],   # numpy's seeds are 32 bits:
                         "argument --seed: expected an integer in 0..4294967295, got '4294967296'"),  # a traceback
                        (["check", "digits", "--seed", "-1"], "argument --seed: expected an integer in 0.."),
                        (["grid", "digits", "--out", ""], "argument --out: '': expected a path, got an empty one")):
        with pytest.raises(SystemExit) as e:
            svp_main(["data", *argv])
        assert e.value.code == 2 and words in capsys.readouterr().err, argv
    assert svp_main(["data", "grid", "digits", "--n", "2", "--out", "sub/grid"]) == 0
    assert capsys.readouterr().out.strip() == "sub/grid.png" and os.path.isfile("sub/grid.png")
    assert not os.path.exists("x.png") and not os.path.exists("g.png")


def test_food101_test_labels_follow_train_json_classes(fake, tmp_path):
    """The test split numbered test.json's own keys: one key spelled differently shifted every
    label after it, with no error (a wrong accuracy)."""
    r = _copy(fake, tmp_path, "food-101")
    train, test = build_dataset("food101", "train", root=r), build_dataset("food101", "test", root=r)
    assert test.classes == train.classes
    meta = os.path.join(r, "food-101", "meta", "test.json")
    d = json.load(open(meta))
    last = sorted(d)[-1]
    d[last.capitalize() if last != last.capitalize() else last + "_x"] = d.pop(last)
    json.dump(d, open(meta, "w"))
    with pytest.raises(DatasetError, match=r"test.json lists classes that .*train.json does not"):
        build_dataset("food101", "test", root=r)


def test_imagefolder_refuses_a_listed_class_without_a_folder_and_says_what_it_leaves_out(tmp_path, caplog):
    """classes=[...] with one name misspelt gave a class of no images and dropped the folder it
    meant, without a word (12 images fewer in the QA run)."""
    from PIL import Image
    root = tmp_path / "r"
    for split, names in (("train", ["Case", "case", "dog"]), ("test", ["Case", "dog"])):
        for name in names:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "0.png")
    with pytest.raises(DatasetError, match=r"classes= lists 'Csae', which no split folder of .* has a folder for"):
        build_dataset("imagefolder", "train", root=str(root), classes=["Csae", "case", "dog"])
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        ds = build_dataset("imagefolder", "test", root=str(root), classes=["dog", "case"])   # 'case': train only
    assert ds.classes == ["dog", "case"] and sorted(ds.targets) == [0]
    assert "1 class folder(s) not in classes= are left out: 'Case'" in caplog.text
    assert build_dataset("imagefolder", "test", root=str(root)).classes == ["Case", "case", "dog"]
    # a name twice labelled its images twice; a string was read letter by letter
    with pytest.raises(DatasetError, match=r"classes= lists 'dog' more than once"):
        build_dataset("imagefolder", "train", root=str(root), classes=["dog", "case", "dog"])
    with pytest.raises(DatasetError, match=r"classes='dog': expected a list of class folder names"):
        build_dataset("imagefolder", "train", root=str(root), classes="dog")


def test_imagefolder_reads_utf8_class_names_where_python_reads_file_names_as_ascii(tmp_path):
    """In a C locale without Python's UTF-8 mode, 'café' was listed as 'caf\\udcc3\\udca9' (kept in
    the adapter files, unreadable elsewhere), and a classes= list naming 'café' found no folder."""
    import subprocess
    import sys

    from PIL import Image
    root = tmp_path / "r"
    for name in ("café", "plain"):
        for k in range(2):
            (root / "train" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(root / "train" / name / f"{k}.png")
    code = ("import sys; from svp.data import build_dataset as b; from svp.engine.config import parse_overrides; "
            "r = sys.argv[1]; "
            "print(sys.getfilesystemencoding(), ascii(b('imagefolder', 'train', root=r).classes), "
            "len(b('imagefolder', 'train', root=r)), len(b('imagefolder', 'train', root=r, classes=['caf\\xe9'])), "
            # the list as a command line gives it: argv decoded as ASCII, 'é' as two lone surrogates
            "len(b('imagefolder', 'train', root=r, classes=parse_overrides(['data.options=' + sys.argv[2]])[0][1]['classes'])))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(root), "{classes: ['café', 'plain']}"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ascii", "['caf\\xe9',", "'plain']", "4", "2", "4"], out.stdout


def test_an_error_under_a_c_locale_names_a_non_ascii_path_by_its_bytes(tmp_path):
    """stderr's default escapes (backslashreplace) wrote an undecodable path as \\udcc3\\udcb6, in
    the very command an error gives to paste (review38): its bytes now, as stdout writes them."""
    import subprocess
    import sys
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    run = os.fsencode(str(tmp_path)) + "/d\xc3\xb6nn\xc3\xa9es".encode("latin-1")
    r = subprocess.run([sys.executable.encode(), b"-m", b"svp", b"train", b"--resume", run], env=env,
                       capture_output=True, timeout=120)
    assert r.returncode == 2 and run + b": no such folder" in r.stderr and b"\\udc" not in r.stderr, r.stderr


def test_gtsrb_and_imagefolder_skip_hidden_files_and_refuse_an_empty_class(fake, tmp_path, caplog):
    """macOS's ._x.ppm resource forks were read as images (and failed the check); other files
    were dropped silently, so a class of .png files ended with no images and check said ok."""
    r = _copy(fake, tmp_path, "gtsrb", "custom_imagefolder")
    tdir = os.path.join(r, "gtsrb", "GTSRB", "Training")
    n = len(build_dataset("gtsrb", "trainval", root=r))
    open(os.path.join(tdir, "00003", "._00000_00000.ppm"), "wb").write(b"\0\5\26\7 junk")
    open(os.path.join(tdir, "00003", "notes.txt"), "w").write("x")
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        assert len(build_dataset("gtsrb", "trainval", root=r)) == n  # the GT-*.csv files are not counted
    assert "ignored 1 file(s) that are not .ppm images" in caplog.text and "notes.txt" in caplog.text
    for fn in os.listdir(os.path.join(tdir, "00007")):
        if fn.endswith(".ppm"):
            os.rename(os.path.join(tdir, "00007", fn), os.path.join(tdir, "00007", fn[:-4] + ".png"))
    with pytest.raises(DatasetError, match=r"no .ppm images in the class folder\(s\) 00007"):
        build_dataset("gtsrb", "trainval", root=r)
    sdir = os.path.join(r, "custom_imagefolder", "train")
    cls = sorted(os.listdir(sdir))[0]
    n = len(build_dataset("imagefolder", "train", root=os.path.join(r, "custom_imagefolder")))
    open(os.path.join(sdir, cls, "._a.jpg"), "wb").write(b"\0\5\26\7 junk")
    assert len(build_dataset("imagefolder", "train", root=os.path.join(r, "custom_imagefolder"))) == n


def test_imagefolder_follows_linked_folders_once_each_in_the_same_order(tmp_path, caplog):
    """A class folder's linked subfolders were left out without a word (torchvision's ImageFolder
    follows them); a link to a parent is no loop, and a folder linked twice gives its images once,
    through the first link in sorted order. A link into the data root, a split folder or another
    class's folder of the split is not followed: a link to a parent labelled the other classes'
    images as this class's too (retest 88); a link to another split's class folder is (a trainval
    split made of links: retest 89). A pipe named like an image is left out, said (reading it hung
    `svp data check`)."""
    from PIL import Image
    root = tmp_path / "f"
    for rel in ("train/cat/a.png", "train/dog/b.png", "elsewhere/c.png", "elsewhere/deeper/d.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / rel)
    os.symlink(root / "elsewhere", root / "train" / "cat" / "zlinked")
    os.symlink(root / "elsewhere", root / "train" / "cat" / "mlinked")   # (the same folder again)
    os.symlink(root / "train", root / "train" / "dog" / "up")   # (a loop)
    os.symlink(root / "train" / "cat" / "mlinked", root / "train" / "cat" / ".alias")   # (hidden: walked first)
    os.symlink(root / "train" / "dog", root / "train" / "cat" / "dogs")   # (another class)
    os.symlink(root, root / "train" / "cat" / "root")   # (the data root, and its other splits)
    (root / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "val" / "cat" / "v.png")
    os.symlink(root / "val", root / "train" / "dog" / "valsplit")   # (another split)
    os.mkfifo(root / "train" / "dog" / "pipe.png")
    for c in ("cat", "dog"):   # a trainval split of links to the other splits' class folders
        (root / "trainval" / c).mkdir(parents=True)
        for s in ("train", "val"):
            if (root / s / c).is_dir():
                os.symlink(root / s / c, root / "trainval" / c / f"from_{s}")
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        ds = build_dataset("imagefolder", "train", root=str(root))
    assert [(os.path.relpath(p, root), t) for p, t in ds.samples] == [
        ("train/cat/a.png", 0), ("train/cat/mlinked/c.png", 0), ("train/cat/mlinked/deeper/d.png", 0),
        ("train/dog/b.png", 1)], ds.samples
    both = build_dataset("imagefolder", "trainval", root=str(root))
    assert [(os.path.relpath(p, root), t) for p, t in both.samples] == [
        ("trainval/cat/from_train/a.png", 0), ("trainval/cat/from_train/mlinked/c.png", 0),
        ("trainval/cat/from_train/mlinked/deeper/d.png", 0), ("trainval/cat/from_val/v.png", 0),
        ("trainval/dog/from_train/b.png", 1)], both.samples
    assert "imagefolder/train: ignored 1 entries named like images that are not regular files (pipes, devices, " \
           f"sockets), e.g. {root}/train/dog/pipe.png" in caplog.text


def test_cars_train_json_holds_the_val_images_and_reading_val_warns(fake, caplog):
    """As the real Stanford Cars split files (the spec: train.json's 8,144 include val.json's 815),
    so the warning docs/datasets.md promises for its val split is exercised (the fake's splits
    were disjoint: review36)."""
    root, man, _ = fake
    train, val = build_dataset("cars", "train", root=root), build_dataset("cars", "val", root=root)
    assert len(train) == len(man["hta/cars"]["train"]) == 2 * 196 and len(val) == 196
    assert {p for p, _ in val.samples} <= {p for p, _ in train.samples}
    assert "196 of 196 val.json images are also in train.json" in caplog.text


def test_data_check_prints_file_names_from_split_files_without_their_control_characters(fake, tmp_path, capsys):
    """A list naming 'images/x<ESC>]0;PWNED<BEL><ESC>[2J.jpg' set the terminal's title and cleared
    it through svp data check's "image not found" line (review43)."""
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/dtd")
    lst = os.path.join(r, "VTAB/vtab-1k/dtd/test.txt")
    open(lst, "a").write("images/x\x1b]0;PWNED\x07\x1b[2J.jpg 0\n")
    assert svp_main(["data", "check", "vtab/dtd", "--root", r, "--split", "test"]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "x\\x1b]0;PWNED\\x07\\x1b[2J.jpg" in out, out


@pytest.mark.parametrize("rel", ["../../../../secret/private.png", "/etc/passwd", "images/../../x.png", "C:/x.png"])
def test_a_split_file_naming_an_image_outside_its_folder_is_refused(fake, tmp_path, rel):
    """VTAB lists and FGVC json files name images relative to their folder; one that climbed out
    (or was absolute) was read silently: a root prepared by someone else pulled the user's own
    files into training (review41)."""
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/dtd", "FGVC/OxfordFlower")
    lst = os.path.join(r, "VTAB/vtab-1k/dtd/test.txt")
    lines = open(lst).read().splitlines()
    open(lst, "w").write("\n".join(lines + [f"{rel} 0"]) + "\n")
    with pytest.raises(DatasetError, match=rf"test.txt:{len(lines) + 1}: image path '{re.escape(rel)}' leaves the task "
                                           r"folder"):
        build_dataset("vtab/dtd", "test", root=r)
    js = os.path.join(r, "FGVC/OxfordFlower/test.json")
    data = json.load(open(js))
    data[rel] = 1
    json.dump(data, open(js, "w"))
    with pytest.raises(DatasetError, match=rf"test.json: image path '{re.escape(rel)}' leaves "):
        build_dataset("flowers", "test", root=r)
    # DTD's label lists and Food-101's meta files likewise (review43: read from outside the root)
    r = _copy(fake, tmp_path / "more", "dtd", "food-101")
    lst = os.path.join(r, "dtd/dtd/labels/train1.txt")
    open(lst, "a").write(f"texture00/../../../../{rel.lstrip('/')}\n")
    with pytest.raises(DatasetError, match=r"train1.txt:\d+: malformed line .* inside images/"):
        build_dataset("dtd", "train", root=r)
    meta = os.path.join(r, "food-101/meta/train.json")
    d = json.load(open(meta))
    first = next(iter(d))
    d[first].append(f"{first}/../../../{rel.lstrip('/')}")
    json.dump(d, open(meta, "w"))
    with pytest.raises(DatasetError, match=r"train.json: class .* which leaves images/"):
        build_dataset("food101", "train", root=r)
    # and GTSRB's test csv (review 52: the one list still read from anywhere)
    r = _copy(fake, tmp_path / "gtsrb", "gtsrb")
    gt = os.path.join(r, "gtsrb/GT-final_test.csv")
    rows = open(gt).read().splitlines()
    open(gt, "w").write("\n".join(rows + [f"{rel};32;32;0;0;31;31;0"]) + "\n")
    with pytest.raises(DatasetError,
                       match=rf"GT-final_test.csv:{len(rows) + 1}: image path '{re.escape(rel)}' leaves "):
        build_dataset("gtsrb", "test", root=r)


def test_layout_errors_point_at_the_right_place(fake, tmp_path, capsys):
    """One error for a missing image folder (not one per image), the VTAB folder (not HTA's folder
    of the same name) for a missing task, file:line for a label out of range, the file that
    differs only in case, and a carved split left empty."""
    r = _copy(fake, tmp_path, "FGVC/stanford-cars", "FGVC/OxfordFlower", "dtd", "VTAB/vtab-1k/kitti")
    # one training image per class (the fake Flowers): carving a validation split takes none
    assert len(build_dataset("flowers", "train", root=r)) == 102
    with pytest.raises(DatasetError, match=r"val_from_train=0.5 of its 102 training items \(train\) leaves the "
                                           r"'val' split empty"):
        build_dataset("flowers", "val", root=r, val_from_train=0.5)
    shutil.rmtree(os.path.join(r, "FGVC/stanford-cars/car_ims"))
    with pytest.raises(DatasetError, match=r"cars image folder 'car_ims' \(named by test.json\) not found") as e:
        build_dataset("cars", "test", root=r)
    assert str(e.value).count("car_ims") <= 3  # the folder, not each image
    with pytest.raises(DatasetError, match=r"VTAB-1k task folder for 'dtd' not found: .*VTAB/vtab-1k/dtd"):
        build_dataset("vtab/dtd", "test", root=r)
    lst = os.path.join(r, "VTAB/vtab-1k/kitti/test.txt")
    lines = open(lst).read().splitlines()
    path0 = lines[1].rsplit(" ", 1)[0]
    open(lst, "w").write("\n".join([lines[0], "", f"{path0} 4"] + lines[2:]) + "\n")
    with pytest.raises(DatasetError, match=r"test.txt:3: label 4 outside 0..3: vtab/kitti has 4 classes"):
        build_dataset("vtab/kitti", "test", root=r)
    open(lst, "w").write("\n".join(lines) + "\n")
    img = os.path.join(r, "VTAB/vtab-1k/kitti", path0)
    os.rename(img, img[:-4] + ".JPG")
    with pytest.raises(DatasetError, match=r"\.JPG exists: file names are case-sensitive"):
        build_dataset("vtab/kitti", "test", root=r)
    # svp data check: an option the dataset does not take is one line naming it, not a traceback
    # (and the command's mistake, exit 2, not a data problem of every split: review 78)
    assert svp_main(["data", "check", "cub200", "--root", r, "--partition", "2"]) == 2
    err = capsys.readouterr().err
    assert "--partition: hta/cub200 takes no partition (it is for hta/dtd)" in err and "Traceback" not in err


def test_images_are_checked_in_this_thread_where_no_thread_can_start(tmp_path, monkeypatch):
    """A process limit (ulimit -u) stopped svp train before its first step with a traceback,
    RuntimeError: can't start new thread, from the image check's reader threads."""
    import threading

    from PIL import Image

    from svp.data.check import find_bad_images
    for k in range(3):
        (tmp_path / "train" / "c").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "c" / f"{k}.png")
    (tmp_path / "train" / "c" / "1.png").write_bytes(b"not a png")
    ds = build_dataset("imagefolder", "train", root=str(tmp_path), check_files=False)

    def no_threads(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", no_threads)
    bad = find_bad_images(ds, workers=4)
    assert len(bad) == 1 and "1.png" in bad[0], bad


def test_a_large_image_reads_without_a_raw_warning_and_a_float32_tiff_is_named_so(tmp_path, monkeypatch, caplog):
    """Between half Pillow's bomb bound and the bound, its DecompressionBombWarning went raw to
    stderr (a site-packages path); a float32 TIFF out of range was announced as float64."""
    import warnings

    from PIL import Image

    from svp.data import load_image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # warns above 1000 pixels, refuses above 2000
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(str(tmp_path / "big.png")).size == (40, 40)
    Image.new("RGB", (50, 50)).save(tmp_path / "bomb.png")
    with pytest.raises(DatasetError, match="bomb.png"):
        load_image(str(tmp_path / "bomb.png"))
    monkeypatch.undo()
    Image.fromarray(np.linspace(-3, 7, 64, dtype=np.float32).reshape(8, 8), mode="F").save(tmp_path / "f.tif")
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        load_image(str(tmp_path / "f.tif"))
    assert "float32 pixels in -3..7 are outside the known range" in caplog.text, caplog.text


def test_the_fake_root_command_takes_a_folder_and_says_its_usage(tmp_path, capsys, monkeypatch):
    """Any first argument was the folder: `python -m svp.data.fake --help` wrote ~5,000 files
    into ./--help (QA 16e)."""
    from svp.data.fake import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "DIR" in capsys.readouterr().out and os.listdir(tmp_path) == []
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and os.listdir(tmp_path) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:   # (a NotADirectoryError traceback: review)
        main([str(tmp_path / "afile")])
    assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert main([str(tmp_path / "fk")]) == 0 and os.path.isdir(tmp_path / "fk" / "VTAB" / "vtab-1k")
    # a folder that holds files (a real root) is not written over unless asked (review 67)
    real = tmp_path / "real" / "VTAB" / "vtab-1k" / "dtd"
    real.mkdir(parents=True)
    (real / "test.txt").write_text("images/a.jpg 3\n")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "real")])
    assert e.value.code == 2 and "already holds files (VTAB): a fake root replaces" in capsys.readouterr().err
    assert (real / "test.txt").read_text() == "images/a.jpg 3\n"
    assert main([str(tmp_path / "real"), "--overwrite"]) == 0
    assert (real / "test.txt").read_text() != "images/a.jpg 3\n"


def test_split_files_written_on_windows_name_their_images_with_backslashes(fake, tmp_path):
    """A VTAB list, an FGVC json or a csv list written on Windows (`images\\a.jpg`) was refused
    image by image elsewhere, where a backslash is a character of the file's name (review45): the
    '/' form is read where the name as written is missing."""
    from svp.data.fake import make_fake_root
    r = _copy(fake, tmp_path, "VTAB/vtab-1k/dtd", "FGVC/OxfordFlower")
    make_fake_root(os.path.join(r, "c"), which=("csv",))
    cases = [("vtab/dtd", "VTAB/vtab-1k/dtd/test.txt", {}), ("flowers", "FGVC/OxfordFlower/test.json", {}),
             ("csv", "c/custom_csv/test.csv", {"root": os.path.join(r, "c/custom_csv")})]
    for name, listed, kw in cases:
        kw = kw or {"root": r}
        before = build_dataset(name, "test", **kw)
        lst = os.path.join(r, listed)
        text = open(lst).read()
        assert "/" in text and "\\" not in text, listed
        if listed.endswith(".json"):
            data = json.loads(text)
            open(lst, "w").write(json.dumps({k.replace("/", "\\"): v for k, v in data.items()}))
        else:   # (the csv's header and labels hold no '/')
            open(lst, "w").write(text.replace("/", "\\"))
        after = build_dataset(name, "test", **kw)
        assert after.samples == before.samples and after.classes == before.classes, name
        x, y = after[0]
        assert y == before.samples[0][1]
    # a file whose name holds the backslash itself is still the one read
    odd = os.path.join(r, "VTAB/vtab-1k/dtd/images\\own.jpg")
    shutil.copy(build_dataset("vtab/dtd", "test", root=r).samples[0][0], odd)
    open(os.path.join(r, "VTAB/vtab-1k/dtd/test.txt"), "a").write("images\\own.jpg 3\n")
    assert build_dataset("vtab/dtd", "test", root=r).samples[-1] == (odd, 3)


def test_data_check_says_a_shared_problem_once_and_names_the_root_it_read(fake, tmp_path, capsys, monkeypatch):
    """One bad line of test.csv was an ERROR under train, val and test and "3 problem(s)"; a root
    given as a task folder was "not found: .../dtd/VTAB/vtab-1k/dtd" once a split, a file as the
    root "not found"; the header said "root $SVP_DATA", not the folder (review 67)."""
    import shutil
    root, _, _ = fake
    csv_root = tmp_path / "csv"
    shutil.copytree(os.path.join(root, "custom_csv"), csv_root)
    (csv_root / "classes.txt").write_text("apple\nbanana\ncherry\n")
    for s in ("train", "val", "test"):
        f = csv_root / f"{s}.csv"
        text = f.read_text()
        for i, name in enumerate(("apple", "banana", "cherry")):
            text = text.replace(f",{name}\n", f",{i}\n")
        f.write_text(text)
    lines = (csv_root / "test.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",7"
    (csv_root / "test.csv").write_text("\n".join(lines) + "\n")
    assert svp_main(["data", "check", "csv", "--root", str(csv_root)]) == 1
    out = capsys.readouterr().out
    assert out.count("label '7' is outside 0..2") == 1 and "1 problem(s)" in out, out
    assert out.count("ERROR (the same as train's, above)") == 2, out
    task = os.path.join(root, "VTAB", "vtab-1k", "dtd")
    assert svp_main(["data", "check", "vtab/dtd", "--root", task]) == 1
    out = capsys.readouterr().out
    assert "which holds a task's lists itself: give the folder that holds VTAB/vtab-1k/dtd/" in out, out
    assert "1 problem(s)" in out, out
    assert svp_main(["data", "check", "vtab/dtd", "--root", str(csv_root / "train.csv")]) == 1
    assert "data root is a file, not a folder" in capsys.readouterr().out
    monkeypatch.setenv("SVP_DATA", root)
    assert svp_main(["data", "check", "vtab/dtd", "--split", "test"]) == 0
    assert f"root {root} ($SVP_DATA)" in capsys.readouterr().out


def test_review67_stray_files_and_short_grids_are_said_once_and_fake_roots_repeat_bit_for_bit(
        fake, tmp_path, caplog, capsys, monkeypatch):
    """An imagefolder class folder without images and an image beside the class folders were
    dropped without a word; GTSRB's stray-file warning came once per split cut from the same
    folder; --group VTAB listed nothing; a grid of fewer images than --n was silent; the fake
    SVHN .mat files held their write time (two fake roots differed)."""
    r = _copy(fake, tmp_path, "gtsrb", "custom_imagefolder")
    open(os.path.join(r, "gtsrb", "GTSRB", "Training", "00003", "notes.txt"), "w").write("x")
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        build_dataset("gtsrb", "train", root=r)
        build_dataset("gtsrb", "val", root=r)
    assert caplog.text.count("ignored 1 file(s) that are not .ppm images") == 1, caplog.text
    caplog.clear()
    froot = os.path.join(r, "custom_imagefolder")
    sdir = os.path.join(froot, "train")
    first = sorted(os.listdir(sdir))[0]
    n = len(build_dataset("imagefolder", "train", root=froot))
    shutil.copy(os.path.join(sdir, first, sorted(os.listdir(os.path.join(sdir, first)))[0]),
                os.path.join(sdir, "loose.png"))
    os.mkdir(os.path.join(sdir, "zz_empty"))
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        ds = build_dataset("imagefolder", "train", root=froot)
    assert len(ds) == n and "zz_empty" in ds.classes
    assert "1 class folder(s) of" in caplog.text and "hold no image: 'zz_empty'" in caplog.text, caplog.text
    assert "ignored 1 image(s) directly in" in caplog.text and "loose.png" in caplog.text, caplog.text

    capsys.readouterr()
    assert svp_main(["data", "list", "--group", "VTAB"]) == 0
    upper = capsys.readouterr().out
    assert svp_main(["data", "list", "--group", "vtab"]) == 0
    assert upper == capsys.readouterr().out and upper.count("\n") == 19
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        assert svp_main(["data", "grid", "svhn", "--root", fake[0], "--split", "test", "--n", "999",
                         "--out", str(tmp_path / "g.png")]) == 0
    assert "hta/svhn/test holds 20 image(s): the grid shows all of them, not 999" in caplog.text, caplog.text

    import time
    a, b = tmp_path / "a", tmp_path / "b"
    for d, when in ((a, "Mon Dec  7 09:00:00 2026"), (b, "Tue Dec  8 10:00:01 2026")):
        monkeypatch.setattr(time, "asctime", lambda *t, _w=when: _w)   # (scipy's header's clock)
        make_fake_root(str(d), which=("svhn",))
    monkeypatch.undo()
    for fn in ("train_32x32.mat", "test_32x32.mat"):
        assert (a / fn).read_bytes() == (b / fn).read_bytes()
    from scipy.io import loadmat
    assert loadmat(str(a / "test_32x32.mat"))["X"].shape == (32, 32, 3, 20)


def test_data_check_reads_one_list_file_once(fake, capsys):
    """`--file` named one list, which was checked once per split (train, val, test), each problem
    counted three times (review 78)."""
    root = os.path.join(fake[0], "custom_csv")
    assert svp_main(["data", "check", "csv", "--root", root, "--file", os.path.join(root, "train.csv")]) == 0
    out = capsys.readouterr().out
    assert [ln.split()[0] for ln in out.splitlines()[1:-1]] == ["train"], out
