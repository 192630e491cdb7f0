"""The fault matrix of issue 15: bad inputs and faults a new user meets, each with the
one outcome it must have. Kept fast: tiny generated files, no training unless a case
needs it. (Data cases first; engine cases follow.)"""
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from svp.cli import main as svp_main
from svp.data import DatasetError, build_dataset, check_before_training, load_image

# ---------------------------------------------------------------------------- helpers


def _png8(path, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _png16(path, a):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): gray (H, W) or
    RGB (H, W, 3) uint16."""
    a = np.asarray(a, dtype=">u2")
    h, w = a.shape[:2]
    ctype = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _csv_root(tmp_path, lists, classes_txt=None):
    """<tmp>/csvroot with one 8x8 PNG per listed line and the given split lists
    (split -> list of labels); returns the root."""
    root = tmp_path / "csvroot"
    for split, labels in lists.items():
        lines = []
        for i, lab in enumerate(labels):
            rel = f"img/{split}_{i}.png"
            _png8(str(root / rel), i)
            lines.append(f"{rel},{lab}")
        (root / f"{split}.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    if classes_txt is not None:
        (root / "classes.txt").write_text("\n".join(classes_txt) + "\n")
    return str(root)


# ------------------------------------------------------------ csv labels: no silent switch


@pytest.mark.parametrize("bad", ["x", "-1", "1.5"])
def test_csv_one_bad_label_among_integers_names_file_and_line(tmp_path, bad, capsys):
    root = _csv_root(tmp_path, {"train": ["0", "1", "2", bad, "1"], "test": ["0", "2"]})
    # line 1 is the header, so the 4th label is on line 5
    with pytest.raises(DatasetError, match=rf"train\.csv:5: label '{bad}' is not a non-negative "
                                           r"integer, but the other labels are class indices"):
        build_dataset("csv", "train", root=root)
    # the other split fails too (its classes depend on every list), naming train.csv
    with pytest.raises(DatasetError, match=r"train\.csv:5"):
        build_dataset("csv", "test", root=root)
    assert svp_main(["data", "check", "csv", "--root", root, "--split", "test"]) == 1
    assert "train.csv:5" in capsys.readouterr().out


def test_csv_integer_and_name_files_still_load(tmp_path):
    ints = _csv_root(tmp_path / "a", {"train": ["0", "3", "1"], "val": ["2"]})
    ds = build_dataset("csv", "train", root=ints)
    assert ds.classes == ["0", "1", "2", "3"] and ds.targets == [0, 3, 1]
    names = _csv_root(tmp_path / "b", {"train": ["dog", "cat", "dog"], "val": ["bird"]})
    ds = build_dataset("csv", "train", root=names)
    assert ds.classes == ["bird", "cat", "dog"] and ds.targets == [2, 1, 2]


def test_csv_names_that_look_like_numbers_need_classes_txt(tmp_path):
    lists = {"train": ["cat", "dog", "1990", "cat"]}
    root = _csv_root(tmp_path / "a", lists)
    with pytest.raises(DatasetError, match=r"train\.csv:4: label '1990' looks like a number, "
                                           r"but the other labels are class names.*classes\.txt"):
        build_dataset("csv", "train", root=root)
    # listed in classes.txt they are names, in the listed order
    root = _csv_root(tmp_path / "b", lists, classes_txt=["dog", "1990", "cat"])
    assert build_dataset("csv", "train", root=root).targets == [2, 0, 1, 2]
    # with classes.txt, integer labels are indices into it; out of range names the line
    root = _csv_root(tmp_path / "c", {"train": ["0", "2", "1"]}, classes_txt=["a", "b", "c"])
    ds = build_dataset("csv", "train", root=root)
    assert ds.classes == ["a", "b", "c"] and ds.targets == [0, 2, 1]
    root = _csv_root(tmp_path / "d", {"train": ["0", "2", "3"]}, classes_txt=["a", "b", "c"])
    with pytest.raises(DatasetError, match=r"train\.csv:4: label '3' is outside 0\.\.2"):
        build_dataset("csv", "train", root=root)
    # a name that is not listed is a mix too, not a new class
    root = _csv_root(tmp_path / "e", {"train": ["a", "b", "zebra"]}, classes_txt=["a", "b", "c"])
    with pytest.raises(DatasetError, match=r"train\.csv:4: label 'zebra' is not one of the 3 class"):
        build_dataset("csv", "train", root=root)


def test_csv_split_files_cannot_mix_integers_and_names(tmp_path):
    root = _csv_root(tmp_path, {"train": ["0", "1", "1"], "val": ["cat"]})
    with pytest.raises(DatasetError, match=r"val\.csv:2: label 'cat' is not a non-negative integer"):
        build_dataset("csv", "train", root=root)


# ------------------------------------------------------- image bit depth: scaled, not clipped

GRAD16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535


def _rgb(a):
    return np.stack([a] * 3, axis=-1) if a.ndim == 2 else a


def test_16bit_gray_and_rgb_png_use_the_full_16bit_range(tmp_path):
    g = _png16(str(tmp_path / "g16.png"), GRAD16)
    with Image.open(g) as im:
        assert im.mode.startswith("I")            # what Pillow clipped at 255 before
    got = np.asarray(load_image(g))
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, _rgb(GRAD16 >> 8))
    assert (got == 255).mean() < 0.01
    rgb16 = np.stack([GRAD16, GRAD16[::-1], GRAD16.T], axis=-1)
    c = _png16(str(tmp_path / "c16.png"), rgb16)
    np.testing.assert_array_equal(np.asarray(load_image(c)), rgb16 >> 8)
    # the same content in gray and in RGB gives the same pixels
    same = _png16(str(tmp_path / "s16.png"), np.stack([GRAD16] * 3, axis=-1))
    np.testing.assert_array_equal(np.asarray(load_image(same)), got)


def test_float_tiff_scaled_by_its_range(tmp_path, caplog):
    import svp.data.base as base
    unit = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    p = str(tmp_path / "unit.tif")
    Image.fromarray(unit, mode="F").save(p)
    got = np.asarray(load_image(p))
    np.testing.assert_array_equal(got, _rgb(np.rint(unit.astype(np.float64) * 255).astype(np.uint8)))
    assert got.max() == 255 and got.mean() > 100          # was all black

    wide = (unit * 4000.0 - 1000.0).astype(np.float32)     # e.g. raw sensor values
    p = str(tmp_path / "wide.tif")
    Image.fromarray(wide, mode="F").save(p)
    base._logged_rules.clear()
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        got = np.asarray(load_image(p))
    w = wide.astype(np.float64)
    want = np.rint((w - w.min()) * 255.0 / (w.max() - w.min())).astype(np.uint8)
    np.testing.assert_array_equal(got, _rgb(want))
    assert "min..max" in caplog.text and p in caplog.text

    bad = unit.copy()
    bad[3, 3] = np.nan
    p = str(tmp_path / "nan.tif")
    Image.fromarray(bad, mode="F").save(p)
    with pytest.raises(DatasetError, match=r"nan\.tif: float image with NaN/inf"):
        load_image(p)


def test_rgb_float_tiff_pillow_cannot_open_is_read(tmp_path):
    tifffile = pytest.importorskip("tifffile")  # comes with scikit-image, a dependency
    a = np.random.RandomState(0).rand(8, 8, 3).astype(np.float32)
    p = str(tmp_path / "rgbf.tif")
    tifffile.imwrite(p, a, photometric="rgb")
    np.testing.assert_array_equal(np.asarray(load_image(p)),
                                  np.rint(a.astype(np.float64) * 255).astype(np.uint8))


def test_datasets_and_viz_read_high_bit_depth_images_through_the_same_reader(tmp_path):
    from types import SimpleNamespace

    from svp.viz.cli import load_input_image
    d = tmp_path / "if" / "train"
    os.makedirs(d / "a")
    os.makedirs(d / "b")
    p16 = _png16(str(d / "a" / "x.png"), GRAD16)
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), mode="F").save(
        str(d / "b" / "y.tif"))
    ds = build_dataset("imagefolder", "train", root=str(tmp_path / "if"))
    for i in range(len(ds)):
        img, _ = ds[i]
        np.testing.assert_array_equal(np.asarray(img), np.asarray(load_image(ds.describe(i))))
    np.testing.assert_array_equal(np.asarray(ds[0][0]), _rgb(GRAD16 >> 8))
    img, _ = load_input_image(SimpleNamespace(image=p16, dataset=None))
    np.testing.assert_array_equal(np.asarray(img), _rgb(GRAD16 >> 8))
    # a 16-bit object mask (0 / 65535) is a mask, not all-object; a non-image is one clear error
    from svp.errors import VizError
    from svp.viz.cli import load_mask
    m = np.zeros((16, 16), np.uint16)
    m[4:9, 2:12] = 65535
    np.testing.assert_array_equal(load_mask(_png16(str(tmp_path / "m16.png"), m), 16, 16), m > 0)
    (tmp_path / "junk.png").write_bytes(os.urandom(64))
    with pytest.raises(VizError, match=r"--mask .*junk\.png: cannot be read as an image"):
        load_mask(str(tmp_path / "junk.png"), 16, 16)


# ------------------------------------------------ data check counts; corrupt images up front


def test_data_check_prints_the_class_count_of_custom_datasets(tmp_path, capsys):
    root = _csv_root(tmp_path, {"train": ["a", "b", "c"], "val": ["a"], "test": ["b"]})
    assert svp_main(["data", "check", "csv", "--root", root]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("csv: 3 classes (custom)")
    for split in ("train", "val", "test"):
        for c in ("p", "q"):
            _png8(str(tmp_path / "if" / split / c / "0.png"))
    assert svp_main(["data", "check", "imagefolder", "--root", str(tmp_path / "if")]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("imagefolder: 2 classes (custom)")


def test_corrupt_test_image_found_before_training(tmp_path, caplog):
    root = _csv_root(tmp_path, {"train": ["a", "b", "a", "b"], "test": ["a", "b", "a"]})
    broken = os.path.join(root, "img", "test_2.png")
    with open(broken, "r+b") as f:   # truncate: the header still opens, decoding fails
        f.truncate(40)
    sets = {s: build_dataset("csv", s, root=root) for s in ("train", "test")}
    with pytest.raises(DatasetError, match=rf"(?s)1 missing/unreadable image.*test: unreadable image: {broken}"):
        check_before_training(sets)
    # the up-front check and `svp data check` agree (one function)
    assert svp_main(["data", "check", "csv", "--root", root, "--split", "test"]) == 1
    # only the first n items used: the broken third one is not in them
    assert check_before_training({"train": sets["train"], "test": (sets["test"], 2)}) == {
        "train": [], "test": []}
    # over the limit: the split is not read, and the log says so
    with caplog.at_level(logging.INFO, logger="svp.data"):
        assert check_before_training(sets, max_images=5) == {"train": []}
    assert "test split (3 images) not read before training" in caplog.text
    # a dataset that skips bad images gets a warning, not an error
    caplog.clear()
    skipping = build_dataset("csv", "test", root=root, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        found = check_before_training({"test": skipping})
    assert len(found["test"]) == 1 and broken in caplog.text
