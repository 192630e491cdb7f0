"""The fault matrix of issue 15: bad inputs and faults a new user meets, each with the
one outcome it must have. Kept fast: tiny generated files, no training unless a case
needs it. (Data cases first; engine cases follow.)"""
import json
import logging
import os
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from svp.cli import main as svp_main
from svp.data.fake import make_fake_root
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


def test_csv_a_huge_class_index_is_refused_at_its_line(tmp_path):
    """A label such as 99999999999 (without a class list) built the class names 0..label and filled
    the machine's memory (22.6 GB, killed) before anything was said."""
    root = _csv_root(tmp_path / "a", {"train": ["0", "1", "99999999999", "1"]})
    with pytest.raises(DatasetError, match=r"train\.csv:4: label 99999999999 as a class index means "
                                           r"100,000,000,000 classes .*at most 100,000"):
        build_dataset("csv", "train", root=root)
    ds = build_dataset("csv", "train", root=_csv_root(tmp_path / "b", {"train": ["0", "99999"]}))
    assert len(ds.classes) == 100_000


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_list_file_not_in_utf8_names_the_file_and_line(tmp_path, encoding, capsys):
    """A csv or VTAB list in another encoding ended in a UnicodeDecodeError traceback (svp
    train) or a message without the file (svp data check)."""
    root = _csv_root(tmp_path, {"train": ["0", "1"], "test": ["0"]})
    text = "path,label\nimg/train_0.png,0\nimg/caf\u00e9.png,1\n"
    open(os.path.join(root, "train.csv"), "wb").write(text.encode(encoding))
    line = 1 if encoding == "utf-16" else 3
    with pytest.raises(DatasetError, match=rf"train\.csv:{line}: not UTF-8 text .*save it as UTF-8"):
        build_dataset("csv", "train", root=root)
    assert svp_main(["data", "check", "csv", "--root", root, "--split", "train"]) == 1
    assert f"train.csv:{line}: not UTF-8" in capsys.readouterr().out


def test_csv_an_image_listed_twice_is_kept_and_said(tmp_path, caplog):
    """Duplicate lines (often a list concatenated twice) were kept without a word."""
    import logging
    root = _csv_root(tmp_path, {"train": ["0", "1", "1"]})
    path = os.path.join(root, "train.csv")
    open(path, "a").write("img/train_1.png,1\n")
    with caplog.at_level(logging.WARNING, logger="svp.data"):
        ds = build_dataset("csv", "train", root=root)
    assert len(ds) == 4 and "1 line(s) of" in caplog.text and "(line 5 repeats line 3)" in caplog.text


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


def test_unsigned_32_bit_tiffs_keep_their_order_and_signed_ones_theirs(tmp_path):
    """Pillow decodes a uint32 TIFF to its signed mode "I": values from 2**31 wrapped to negatives
    and the brightest pixels came out darkest (QA 16b). An int32 TIFF stays signed."""
    tifffile = pytest.importorskip("tifffile")
    ramp = np.linspace(0, 2**32 - 1, 8).astype(np.uint32)[None].repeat(4, axis=0)
    p = str(tmp_path / "u32.tif")
    tifffile.imwrite(p, ramp)
    want = np.rint(ramp.astype(np.float64) * (255.0 / (2**32 - 1))).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(p)), _rgb(want))
    signed = np.linspace(-2**31, 2**31 - 1, 8).astype(np.int32)[None].repeat(4, axis=0)
    p = str(tmp_path / "i32.tif")
    tifffile.imwrite(p, signed)
    s = signed.astype(np.float64)
    want = np.rint((s - s.min()) * (255.0 / (s.max() - s.min()))).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(p)), _rgb(want))


def test_a_tiff_over_the_pixel_bound_is_not_decoded_by_the_fallback(tmp_path, monkeypatch):
    """Pillow refused a 1 MB TIFF of 196 million pixels as a decompression bomb, and the tifffile
    fallback then decoded it (2 GB, and copies) without any bound."""
    tifffile = pytest.importorskip("tifffile")
    called = []
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: called.append(1))
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", lambda *a, **k: called.append(1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)   # 36 pixels
    p16 = str(tmp_path / "rgb16.tif")   # Pillow reads it, and refuses it as a bomb
    tifffile.imwrite(p16, np.zeros((6, 6, 3), np.uint16), compression="zlib")
    with pytest.raises(DatasetError, match=r"rgb16\.tif: Image size \(36 pixels\) exceeds limit"):
        load_image(p16)
    pf = str(tmp_path / "rgbf.tif")   # Pillow cannot decode it: the fallback's own bound
    tifffile.imwrite(pf, np.zeros((6, 6, 3), np.float32), photometric="rgb")
    with pytest.raises(DatasetError, match=r"rgbf\.tif: 36 pixels \(6x6x3\) exceed the decompression-bomb limit"):
        load_image(pf)
    thin = str(tmp_path / "thin.tif")   # a side of 4 or less is a side, not channels (4 x 9: 36 pixels)
    tifffile.imwrite(thin, np.zeros((4, 9, 3), np.float32), photometric="rgb")
    with pytest.raises(DatasetError, match=r"thin\.tif: 36 pixels \(4x9x3\) exceed"):
        load_image(thin)
    assert called == []


def test_postscript_named_as_an_image_is_not_opened(tmp_path, monkeypatch):
    """load_image opened every format Pillow knows: a file evil.jpg holding PostScript went to
    Ghostscript where it is installed (svp serve already opened raster formats only)."""
    from PIL import EpsImagePlugin
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(1))
    p = tmp_path / "evil.jpg"
    p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto showpage\n%%EOF\n")
    with pytest.raises(DatasetError, match=r"evil\.jpg: UnidentifiedImageError"):
        load_image(str(p))
    assert ran == []


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


# ============================================================================ engine cases
# ---------------------------------------------------------------- run folder lock and names

def _hold_lock(run_dir):
    """A forked child that takes the lock of ``run_dir`` and sleeps; returns its PID once locked."""
    import time

    from svp.engine.runlock import RunLock
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            RunLock(str(run_dir)).acquire()
            os.write(w, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    return pid


def test_run_lock_names_the_holder_and_dies_with_it(tmp_path):
    import signal
    import socket

    from svp.engine.runlock import RunLock, holder
    from svp.errors import ResumeError
    run = tmp_path / "run"
    run.mkdir()
    child = _hold_lock(run)
    try:
        with pytest.raises(ResumeError, match=rf"is in use by process {child} on host "
                                              rf"{socket.gethostname()}, since "):
            RunLock(str(run)).acquire()
        assert holder(str(run))["pid"] == child
    finally:
        os.kill(child, signal.SIGKILL)  # no clean-up code runs: the OS drops the lock
        os.waitpid(child, 0)
    assert holder(str(run)) is None
    with RunLock(str(run)) as lock:
        assert lock.held and holder(str(run))["pid"] == os.getpid()
        with pytest.raises(ResumeError, match=rf"process {os.getpid()}"):
            RunLock(str(run)).acquire()  # a second claim from the same process is refused too
    assert not (run / "run.lock").exists() and holder(str(run)) is None


def test_a_released_lock_leaves_another_process_lock_file_alone_and_a_sweep_names_a_live_run(tmp_path):
    """Review 71: a fresh run that failed removed its folder while holding its lock, and its
    release then unlinked the lock file by path, another run's in a folder made again meanwhile,
    so a third process could lock the folder beside that run. A sweep that found a plain `svp
    train` alive in one of its run folders called it "an interrupted run made with another
    configuration"."""
    import shutil

    from svp.engine.runlock import RunLock, holder
    from svp.engine.tune import load_or_resume
    from svp.errors import ConfigError, ResumeError
    run = tmp_path / "run"
    run.mkdir()
    a = RunLock(str(run)).acquire()
    shutil.rmtree(run)   # (the failed run's clean-up) ...
    run.mkdir()          # ... and another process's claim of the same name
    b = RunLock(str(run)).acquire()
    a.release()
    try:
        assert (run / "run.lock").exists() and holder(str(run))["pid"] == os.getpid()
        with pytest.raises(ResumeError, match="is in use by"):
            RunLock(str(run)).acquire()   # (it was taken: two holders of one folder)
        (run / "resume.safetensors").write_bytes(b"")   # (as a run in its second epoch)
        with pytest.raises(ConfigError, match=rf"run folder {run} is in use by process {os.getpid()} .*an `svp "
                                              rf"train` of its own, or another sweep's run\), so this sweep does "
                                              rf"not take it over"):
            load_or_resume(str(run), {})
    finally:
        b.release()
    assert not (run / "run.lock").exists()


def test_a_fresh_run_that_fails_before_its_first_step_leaves_no_folder_where_open_files_stay(tmp_path, monkeypatch):
    """Windows cannot remove an open file: the failed fresh run's folder was removed while its
    lock file was still open (held), so run.lock, and the folder, stayed (review45). Emulated: the
    Windows branch's lock (the file stays at release) and a removal that leaves held files."""
    import shutil
    import types

    from svp.engine import rundir, runlock, setup
    from svp.errors import ConfigError
    monkeypatch.setattr(runlock, "fcntl", None)
    monkeypatch.setattr(runlock, "msvcrt", types.SimpleNamespace(LK_NBLCK=2, locking=lambda fd, mode, n: None),
                        raising=False)
    real_rmtree = shutil.rmtree

    def windows_rmtree(path, ignore_errors=False):
        held = os.path.join(path, runlock.LOCK_FILE)
        if not runlock._HELD or not os.path.exists(held):
            return real_rmtree(path, ignore_errors=ignore_errors)
        for name in os.listdir(path):   # every other file goes; the open one, and the folder, stay
            if name != runlock.LOCK_FILE:
                p = os.path.join(path, name)
                real_rmtree(p) if os.path.isdir(p) else os.unlink(p)
    monkeypatch.setattr(rundir.shutil, "rmtree", windows_rmtree)

    def fails(*a, **k):
        raise ConfigError("a failure before the first step")
    monkeypatch.setattr(setup, "build_datasets", fails)
    assert svp_main(["train", *MINI, "--output", str(tmp_path / "runs"), "--name", "r"]) == 2
    assert not (tmp_path / "runs").exists()


def test_a_file_system_without_locks_is_said_not_a_false_holder(tmp_path, monkeypatch):
    """flock failing with ENOLCK (NFS without its lock daemon; simulated) was read as "in use by
    another process (it has not recorded its PID yet)": every run on such a file system refused
    with a holder that does not exist (review of engine/runlock.py)."""
    import errno

    from svp.engine import runlock
    from svp.errors import ResumeError
    if runlock.fcntl is None:
        pytest.skip("Windows: msvcrt's locking has no errno to tell these apart")
    real = runlock.fcntl.flock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with pytest.raises(ResumeError, match=r"its file system refuses file locks \(ENOLCK: ") as e:
        runlock.RunLock(str(tmp_path)).acquire()
    assert "in use by" not in str(e.value) and not (tmp_path / runlock.LOCK_FILE).exists()
    # svp train: the run folder made for the run is removed, lock file and all (both stayed)
    rc = svp_main(["train", *MINI, "--output", str(tmp_path / "runs"), "--name", "r"])
    assert rc == 2 and not (tmp_path / "runs").exists()
    # svp demo stops at the first (each method failed the same way, then a table of failures)
    import svp.engine
    runs = []
    real_train = svp.engine.train
    monkeypatch.setattr(svp.engine, "train", lambda cfg: runs.append(cfg["method"]["name"]) or real_train(cfg))
    assert svp_main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--no-figure", "--quiet"]) == 2
    assert runs == ["linear"]
    (tmp_path / runlock.LOCK_FILE).write_text("{}")
    assert runlock.holder(str(tmp_path)) is None
    monkeypatch.setattr(runlock.fcntl, "flock", real)
    with runlock.RunLock(str(tmp_path)):   # a held lock is still "in use"
        with pytest.raises(ResumeError, match="is in use by process"):
            runlock.RunLock(str(tmp_path)).acquire()


def test_a_run_folder_that_cannot_be_made_leaves_no_folder_made_for_it(tmp_path):
    """run.output's new folders stayed when the run folder itself could not be made (a name
    too long for the file system) or locked."""
    from svp.engine.config import defaults
    from svp.engine.runlock import claim_run_dir
    from svp.errors import ConfigError
    cfg = defaults()
    cfg["run"].update(output=str(tmp_path / "n" / "deep" / "new"), name="x" * 300)
    with pytest.raises(ConfigError, match="cannot create run folder"):
        claim_run_dir(cfg)
    assert os.listdir(tmp_path) == []


def test_default_run_names_differ_within_one_second(tmp_path):
    from svp.engine.config import defaults
    from svp.engine.runlock import claim_run_dir, default_run_name
    cfg = defaults()
    cfg["run"]["output"] = str(tmp_path)
    names = {default_run_name(cfg) for _ in range(50)}
    assert len(names) == 50
    # a taken generated name is redrawn, never shared
    taken = default_run_name(cfg, token="abc123")
    os.mkdir(tmp_path / taken)
    import svp.engine.runlock as rl
    tokens = iter(["abc123", "def456"])
    real = rl.default_run_name
    rl.default_run_name = lambda c, token=None: real(c, token=next(tokens))
    try:
        run_dir, lock, created = claim_run_dir(cfg)
    finally:
        rl.default_run_name = real
    assert created and run_dir.endswith("-def456") and lock.held
    lock.release()


def test_claiming_a_finished_or_read_only_folder_is_one_error(tmp_path, monkeypatch):
    from svp.engine.config import defaults
    from svp.engine.runlock import claim_run_dir
    from svp.errors import ConfigError
    cfg = defaults()
    cfg["run"].update(output=str(tmp_path / "runs"), name="r")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "results.json").write_text("{}")
    # finished: --resume would say "nothing to resume", so the advice is another name
    with pytest.raises(ConfigError, match=r"already holds a run; it has nothing to resume; choose another run\.name"):
        claim_run_dir(cfg)
    assert not (tmp_path / "runs" / "r" / "run.lock").exists()  # the refusal released its lock
    (tmp_path / "runs" / "r" / "resume.safetensors").write_text("")
    with pytest.raises(ConfigError, match=r"already holds a run; use `svp train --resume .*runs/r` to continue it"):
        claim_run_dir(cfg)
    # the output, or the run folder, a file: said so (it was "File exists" / "cannot create its lock file")
    (tmp_path / "runs" / "f").write_text("")
    cfg["run"]["name"] = "f"
    with pytest.raises(ConfigError, match=r"run folder .*runs/f is a file, not a folder"):
        claim_run_dir(cfg)
    cfg["run"].update(output=str(tmp_path / "runs" / "f"), name=None)
    with pytest.raises(ConfigError, match=r"run\.output=.*runs/f' is a file, not a folder"):
        claim_run_dir(cfg)
    cfg["run"]["name"] = "r"
    # --output under a file, and a read-only file system (simulated: the tests may run as root,
    # which ignores folder permissions)
    (tmp_path / "afile").write_text("")
    cfg["run"].update(output=str(tmp_path / "afile" / "runs"), name=None)
    with pytest.raises(ConfigError, match=r"run\.output=.*afile/runs.*: cannot create the folder"):
        claim_run_dir(cfg)

    def read_only(path, *a, **k):
        raise PermissionError(30, "Read-only file system", path)
    cfg["run"]["output"] = str(tmp_path / "runs")
    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"cannot create run folder .*runs/.*Read-only file system"):
        claim_run_dir(cfg)


# ---------------------------------------------------------------- temporaries of killed writes


def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    from svp.io import atomic_replace_dir, atomic_write_text, remove_stale_temps, temp_name
    run = tmp_path / "run"
    atomic_write_text(run / "a.txt", "new")
    assert sorted(os.listdir(run)) == ["a.txt"]
    # what kill -9 during writes leaves: a partial file, a legacy one, a half-written folder
    stale = [temp_name(run / "resume.safetensors"), str(run / ".tmp-abcd1234-resume.safetensors")]
    for p in stale:
        open(p, "wb").write(b"\0" * 100)
    atomic_replace_dir(lambda d: open(os.path.join(d, "x"), "w").write("1"), run / "best")
    os.makedirs(run / ".svp-tmp-new-last")
    removed = remove_stale_temps(str(run))
    assert removed == sorted(stale + [str(run / ".svp-tmp-new-last")])
    assert sorted(os.listdir(run)) == ["a.txt", "best"]


def test_folder_moved_aside_by_a_killed_replace_is_restored(tmp_path):
    from svp.io import atomic_replace_dir, remove_stale_temps
    run = tmp_path / "run"
    atomic_replace_dir(lambda d: open(os.path.join(d, "w"), "w").write("old"), run / "best")
    # killed between "best -> old" and "new -> best": best/ is missing, both copies lie aside
    os.replace(run / "best", run / ".svp-tmp-old-best")
    os.makedirs(run / ".svp-tmp-new-best")
    remove_stale_temps(str(run))
    assert sorted(os.listdir(run)) == ["best"] and (run / "best" / "w").read_text() == "old"


# ---------------------------------------------------------------- divergence guard (unit)


def test_guard_sees_nonfinite_weights_optimizer_state_and_gradients_not_only_the_loss():
    import torch

    from svp.engine.divergence import DivergenceGuard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    guard = DivergenceGuard(model, opt)
    x = torch.randn(5, 4)
    model(x).sum().backward()
    assert guard.bad_gradients() == [] and guard.bad_state() == []
    guard.snapshot()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    assert guard.bad_state() == []
    # AdamW's second moment becomes inf while every weight stays finite (a frozen run)
    opt.state[model[1].weight]["exp_avg_sq"][0, 0] = float("inf")
    assert guard.bad_state() == ["optimizer/1.weight/exp_avg_sq"]
    opt.state[model[1].weight]["exp_avg_sq"][0, 0] = 1.0
    with torch.no_grad():
        model[1].bias[1] = float("nan")
    assert guard.bad_state() == ["1.bias"]
    # restore: the weights and optimizer state from before the step, bit for bit
    guard.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert opt.state_dict()["state"] == {}   # the step had created AdamW's state: gone again
    assert guard.bad_state() == []
    opt.step()
    guard.snapshot()
    moments = {k: v.clone() for k, v in opt.state[model[1].weight].items()}
    opt.step()
    guard.restore()
    assert all(torch.equal(opt.state[model[1].weight][k], v) for k, v in moments.items())
    model[1].weight.grad[0, 0] = float("inf")
    assert guard.bad_gradients() == ["grad/1.weight"]
    # a frozen weight never counts, even when it is not finite
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    model[1].weight.grad.zero_()
    assert guard.bad_state() == [] and guard.bad_gradients() == []


# ---------------------------------------------------------------- one line, exit 2 (issue point 4)
# the bundled mini Vim (its weights ship with svp) on a sliver of digits: fast, and the shapes of
# a real backbone (data.img_size sets the model's input size)
MINI = ["--dataset", "digits", "--method", "linear", "--model", "vim_mini_patch4_32", "--epochs", "1",
        "--batch-size", "8", "data.max_train_samples=16", "data.max_eval_samples=8", "train.warmup_epochs=0",
        "data.recipe=plain", "run.progress=none", "train.device=cpu"]


def _one_line_error(capsys, rc, code=2, *names):
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert rc == code, err
    assert lines and "Traceback" not in err, err
    # one line of error (the run's own log lines, if it got that far, come before it)
    assert lines[-1].startswith("svp") and ": error: " in lines[-1], err
    assert [ln for ln in lines if ": error: " in ln] == [lines[-1]], err
    for n in names:
        assert n in lines[-1], (n, err)
    return lines[-1]


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """One finished mini run (its adapter is the victim of the corruption probes)."""
    out = tmp_path_factory.mktemp("mini")
    assert svp_main(["train", *MINI, "--output", str(out), "--name", "ok"]) == 0
    return out / "ok"


def test_a_warning_during_a_run_is_in_its_log_and_shown_once(tmp_path, monkeypatch, recwarn):
    """Python's warnings were missing from train.log, and one torch's DataLoader gives from two
    places (at construction and at each iterator: `--num-workers` above the cores) was on stderr
    twice (review 55). Here every DataLoader warns the same text from two places. A second run
    in the process logs its own (Python shows a warning once per place and process: retest 56
    found only the first run of a sweep logging it), and with warning options given (-W,
    PYTHONWARNINGS: here as if `-W always`) every one is shown, as Python would."""
    import sys
    import warnings

    import torch.utils.data

    def from_two_places(self):
        warnings.warn("more workers than cores", UserWarning)
        warnings.warn("more workers than cores", UserWarning)
    monkeypatch.setattr(torch.utils.data.DataLoader, "check_worker_number_rationality", from_two_places)
    before = warnings.showwarning
    shown = []
    for name, options, want in (("w", [], 1), ("w2", ["always"], 2)):
        monkeypatch.setattr(sys, "warnoptions", options)
        recwarn.clear()
        assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", name]) == 0
        shown.append([str(w.message) for w in recwarn].count("more workers than cores"))
        log_lines = (tmp_path / name / "train.log").read_text().splitlines()
        logged = sum("UserWarning: more workers than cores" in ln for ln in log_lines)
        assert shown[-1] == logged == want, (name, shown, log_lines)
        assert warnings.showwarning is before   # (the run's hook is gone with it)


def _no_stub(out):
    """Nothing is left behind by a run that failed before it trained."""
    return not os.path.exists(out) or os.listdir(out) == []


@pytest.mark.parametrize("cmd", ["train", "eval"])
def test_unknown_dataset_is_one_line(tmp_path, capsys, cmd, mini_run):
    if cmd == "train":
        rc = svp_main(["train", *MINI, "--dataset", "nope", "--output", str(tmp_path / "runs")])
        assert _no_stub(tmp_path / "runs")
    else:
        rc = svp_main(["eval", str(mini_run / "best"), "--dataset", "nope"])
    _one_line_error(capsys, rc, 2, "'nope'")


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_corrupt_adapter_weights_are_one_line(tmp_path, capsys, mini_run, damage):
    import shutil
    ad = tmp_path / "ad"
    shutil.copytree(mini_run / "best", ad)
    w = ad / "adapter.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                   "random": np.random.RandomState(0).bytes(len(data))}[damage])
    img = _png8(str(tmp_path / "x.png"), 7)
    _one_line_error(capsys, svp_main(["eval", str(ad), "--dataset", "digits", "--max-samples", "4"]), 2,
                    "adapter.safetensors")
    _one_line_error(capsys, svp_main(["predict", str(ad), img]), 2, "adapter.safetensors")


def test_eval_and_predict_say_what_an_adapter_folder_left_them_to_assume(tmp_path, capsys, mini_run):
    """Review 69: a run folder was "not an adapter directory", not saying to pass its best/ or
    last/; an adapter of another dataset with the same class names ('0'..'9', as every VTAB
    task's) and a folder without backbone.json (another image recipe, another loss) were scored
    with nothing said; a folder among predict's images was a raw errno; an image's path went to
    stdout raw (a name with a line break was two records)."""
    import shutil
    line = _one_line_error(capsys, svp_main(["eval", str(mini_run), "--dataset", "digits"]), 2)
    assert f"a run folder: pass the adapter folder it holds, {mini_run / 'best'} or {mini_run / 'last'}" in line
    run = tmp_path / "started"
    run.mkdir()
    shutil.copy(mini_run / "config.yaml", run / "config.yaml")
    assert "a run folder that has saved no adapter yet" in _one_line_error(
        capsys, svp_main(["predict", str(run), _png8(str(tmp_path / "x.png"), 7)]), 2)
    assert f"the run {run} has saved no best/ adapter yet" in _one_line_error(
        capsys, svp_main(["eval", str(run / "best"), "--dataset", "digits"]), 2)

    fake = tmp_path / "fake"
    make_fake_root(str(fake), which=("svhn",))   # (its classes are '0'..'9', as digits')
    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "svhn", "--data-root", str(fake),
                     "--split", "test"]) == 0
    err = capsys.readouterr().err
    assert (f"svp eval: note: the adapter in {mini_run / 'best'} was trained on digits (its backbone.json); "
            f"evaluated here on svhn") in err, err
    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "embedded/digits", "--max-samples", "4"]) == 0
    assert "note:" not in capsys.readouterr().err   # (another name of the same dataset)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter.safetensors"):
        shutil.copy(mini_run / "best" / f, bare / f)
    assert svp_main(["eval", str(bare), "--dataset", "digits", "--max-samples", "4"]) == 0
    err = capsys.readouterr().err
    assert f"svp eval: note: {bare} has no backbone.json, so the image recipe ('svp') and size (32 px) are " \
           f"assumed, not the run's" in err, err

    odd = _png8(str(tmp_path / "a\nb\x1b[2J.png"), 3)
    assert svp_main(["predict", str(mini_run / "best"), odd]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/a\\x0ab\\x1b[2J.png\n  1. " in out and "\x1b" not in out, out


def test_a_folders_names_with_digits_of_other_kinds_keep_their_natural_order(tmp_path):
    """'²' is a digit to str.isdigit() but not to int(): a name holding one stopped svp predict on
    its folder with a traceback (retest 88). Runs of decimal digits, of any script, count as numbers."""
    from svp.engine.cli import _images_of
    for name in ("x10.png", "x2.png", "x1\u00b22.png", "\u2460.png", "x\u0663.png"):
        (tmp_path / name).write_bytes(b"")
    images, errors, skipped, special = _images_of([str(tmp_path)])
    assert [os.path.basename(p) for p in images] == ["x1\u00b22.png", "x2.png", "x\u0663.png", "x10.png", "\u2460.png"]
    assert not errors and not skipped and not special


def test_a_folder_among_predicts_images_stands_for_the_images_in_it_and_below(tmp_path, capsys, mini_run,
                                                                             monkeypatch):
    """A folder was answered "a folder, not an image" (review 69), and a shell's `folder/*.jpg`
    fails past its argument limit. Its image files are answered, in natural order (img2 before
    img10, case aside), its subfolders' after its own, linked folders once each (a loop walked
    once), hidden ones skipped, other files and pipes skipped with a note; a folder with none, or
    one that cannot be read (in its place), is answered as such and the others are still
    answered (exit 2, the folders counted apart from the images)."""
    pics = tmp_path / "pics"
    names = ("img10.png", "b.PNG", "img2.jpg", "A.png", "sub/c.webp", "sub/z/d.png", "Sub2/e.png")
    want = {n: _png8(str(pics / n), v) for v, n in enumerate(names)}
    _png8(str(pics / ".hidden.png"))
    _png8(str(pics / ".cache" / "e.png"))
    (pics / "labels.txt").write_text("not an image")
    os.mkfifo(pics / "pipe.png")   # (reading it would wait for ever)
    _png8(str(tmp_path / "elsewhere" / "f.png"), 9)
    os.symlink(tmp_path / "elsewhere", pics / "sub" / "linked")
    os.symlink(pics, pics / "sub" / "up")   # (a loop)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    alone = _png8(str(tmp_path / "alone.png"), 5)

    # a reader of the pipe would wait for a writer: one that opens and closes it, ending a read
    # with EOF, so that a regression fails here and does not hang
    import threading
    import time
    done, opened = threading.Event(), []

    def writer():
        while not done.is_set():
            try:
                os.close(os.open(pics / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
                opened.append(True)
            except OSError:   # (ENXIO: no reader)
                time.sleep(0.05)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        # named on its own, it is answered as what it is (its read waited for ever: retest 88)
        assert svp_main(["predict", str(mini_run / "best"), str(pics / "pipe.png"), alone, "--json"]) == 2
        out, err = capsys.readouterr()
        named = json.loads(out)
        assert named[0]["error"] == f"{pics}/pipe.png: not a regular file (a pipe, a device or a socket), not an " \
                                    f"image" and named[1]["top"]
        assert "error: 1 of 2 images could not be read" in err and "folder(s)" not in err, err
        assert svp_main(["predict", str(mini_run / "best"), str(pics), alone, "--json", "--batch-size", "2"]) == 0
    finally:
        done.set()
        t.join()
    assert not opened
    out, err = capsys.readouterr()
    answers = json.loads(out)
    order = ["A.png", "b.PNG", "img2.jpg", "img10.png", "sub/c.webp"]
    assert [a["image"] for a in answers] == [want[n] for n in order] + [str(pics / "sub" / "linked" / "f.png"),
                                                                        want["sub/z/d.png"], want["Sub2/e.png"], alone]
    assert all(a["top"] for a in answers)
    assert err == (f"svp predict: note: 1 file(s) in the folders given skipped: not ending as an image file (.jpg "
                   f".jpeg .png .ppm .bmp .pgm .tif .tiff .webp); e.g. {pics}/labels.txt (name them to have them "
                   f"read)\nsvp predict: note: 1 entries named like images in the folders given skipped: not regular "
                   f"files (pipes, devices, sockets), which reading would wait on; e.g. {pics}/pipe.png\n"), err
    # the same answers as the files named one by one (in batches of the same size: a batch moves an
    # answer in its last bits), and line by line with --jsonl
    assert svp_main(["predict", str(mini_run / "best"), *(a["image"] for a in answers), "--json",
                     "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == answers
    assert svp_main(["predict", str(mini_run / "best"), str(pics), alone, "--jsonl", "--batch-size", "2"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == answers

    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(pics / "sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    assert svp_main(["predict", str(mini_run / "best"), str(tmp_path / "empty"), str(pics), "--topk", "1"]) == 2
    out, err = capsys.readouterr()
    blocks = out.split("\n" + str(tmp_path))   # (one block an answer, each starting with its path)
    assert [b.split("\n")[0] for b in blocks[1:]] == [
        "/pics/A.png", "/pics/b.PNG", "/pics/img2.jpg", "/pics/img10.png", "/pics/sub", "/pics/Sub2/e.png"], out
    assert blocks[0] == f"{tmp_path}/empty\n  {tmp_path}/empty: a folder with no image files in it or below " \
                        f"(.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp)", out
    assert f"{pics}/sub\n  {pics}/sub: a folder that cannot be read (Permission denied)\n" in out, out
    assert err.endswith("svp predict: error: 2 folder(s) gave no images (the others are answered); "
                        f"the first: {tmp_path}/empty: a folder with no image files in it or below (.jpg .jpeg "
                        ".png .ppm .bmp .pgm .tif .tiff .webp)\n"), err
    dangling = tmp_path / "gone.png"
    os.symlink("nowhere.png", dangling)
    assert svp_main(["predict", str(mini_run / "best"), str(dangling), alone]) == 2
    assert capsys.readouterr().err == (f"svp predict: error: 1 of 2 images could not be read (the others are "
                                       f"answered); the first: image not found: {dangling} is a link to nothing "
                                       f"(nowhere.png)\n")


def test_eval_writes_each_images_prediction_as_predict_gives_it(tmp_path, capsys, mini_run):
    """`svp eval --predictions FILE.csv` (review 87: no per-image output, for paired tests between
    methods): a row per image in dataset order, its file, label and top-1 as `svp predict` gives
    them for the same files, and `correct` summing to eval's top-1."""
    import csv
    fake = tmp_path / "fake"
    make_fake_root(str(fake), which=("vtab",), vtab_tasks=("svhn",))   # (list files; classes '0'..'9')
    out = tmp_path / "p.csv"
    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "vtab/svhn", "--data-root", str(fake / "VTAB"),
                     "--predictions", str(out), "--json", "--batch-size", "3"]) == 0
    r = _strict_json(capsys.readouterr().out)
    rows = list(csv.DictReader(out.open()))
    ds = build_dataset("vtab/svhn", "test", root=str(fake / "VTAB"))
    assert r["predictions"] == os.path.realpath(out) and len(rows) == r["n"] == len(ds)
    assert [(int(row["index"]), row["item"], int(row["label"]), row["label_name"]) for row in rows] == [
        (i, p, t, str(t)) for i, (p, t) in enumerate(ds.samples)]
    assert sum(int(row["correct"]) for row in rows) == round(r["top1"] * r["n"] / 100)
    assert all(row["correct"] == str(int(row["pred"] == row["label"])) for row in rows)
    assert svp_main(["predict", str(mini_run / "best"), *(row["item"] for row in rows), "--jsonl", "--topk", "1",
                     "--batch-size", "3"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["top"][0]["index"], a["top"][0]["class"]) for a in answers] == [
        (int(row["pred"]), row["pred_name"]) for row in rows]
    assert [a["top"][0]["prob"] for a in answers] == pytest.approx([float(row["prob"]) for row in rows], rel=1e-5)
    # refused before the run: a folder that is not there, a folder for the file, a name ending in a
    # separator, a pipe (replaced by a plain file, as /dev/stdout would be as root: retest 88), a
    # folder that cannot be written
    import stat
    os.mkfifo(tmp_path / "pipe.csv")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [(tmp_path / "nowhere" / "p.csv", "does not exist"), (tmp_path, "a folder; expected a file"),
             (f"{tmp_path}/new/", "ends in a folder separator"), (tmp_path / "pipe.csv", "not a regular file")]
    if not os.access(ro, os.W_OK):   # (root writes anywhere but on a read-only file system)
        cases.append((ro / "p.csv", "cannot be written"))
    os.symlink("loop_b.csv", tmp_path / "loop_a.csv")
    os.symlink("loop_a.csv", tmp_path / "loop_b.csv")
    cases.append((tmp_path / "loop_a.csv", "links that lead to each other in a loop"))
    r, w = os.pipe()   # a link to a pipe's /proc name (as /dev/stdout into `| cat`), which exists nowhere
    if os.path.isdir("/proc/self/fd"):
        os.symlink(f"/proc/{os.getpid()}/fd/{w}", tmp_path / "stdout.csv")
        cases.append((tmp_path / "stdout.csv", "not a regular file"))
    for bad, words in cases:
        assert svp_main(["eval", str(mini_run / "best"), "--dataset", "digits", "--predictions", str(bad)]) == 2
        assert words in capsys.readouterr().err, bad
    os.close(r)
    os.close(w)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe.csv").st_mode) and not (tmp_path / "new").exists()
    # a link is written through: its target gets the rows, the link stays a link
    (tmp_path / "target.csv").write_text("old")
    os.symlink("target.csv", tmp_path / "link.csv")
    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "digits", "--max-samples", "4",
                     "--predictions", str(tmp_path / "link.csv")]) == 0
    assert os.path.islink(tmp_path / "link.csv") and (tmp_path / "target.csv").read_text().startswith("index,item")
    # a folder link then '..': the folder the system reaches (its target's parent), checked and written
    (tmp_path / "deep" / "a").mkdir(parents=True)
    os.symlink(tmp_path / "deep" / "a", tmp_path / "sub")
    capsys.readouterr()
    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "digits", "--max-samples", "4", "--json",
                     "--predictions", f"{tmp_path}/sub/../q.csv"]) == 0
    assert _strict_json(capsys.readouterr().out)["predictions"] == os.path.realpath(tmp_path / "deep" / "q.csv")
    assert (tmp_path / "deep" / "q.csv").is_file() and not (tmp_path / "q.csv").exists()


def test_eval_per_class_gives_each_class_its_accuracy_and_their_mean(tmp_path, capsys, mini_run):
    """`svp eval --per-class`: each class's images and top-1 accuracy, as the model's own argmax
    over the split gives them, and their mean over the classes with images; classes without
    images (here cut by --max-samples) shown as such and left out of the mean."""
    import torch

    import svp.data as data
    from svp.build import load_for_inference
    from svp.engine.cli import _eval_transform
    from svp.engine.evaluate import forward_in_chunks

    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "digits", "--per-class", "--json"]) == 0
    r = _strict_json(capsys.readouterr().out)
    # the reference: the adapter's model over the split, argmax by hand
    model, spec, _ = load_for_inference(str(mini_run / "best"))
    ds, tf = data.build_dataset("digits", "test"), _eval_transform(spec, str(mini_run / "best"))
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    with torch.no_grad():
        pred = forward_in_chunks(model, torch.stack([tf(x) for x in xs])).argmax(dim=1)
    y = torch.tensor(ys)
    want = [(int((y == c).sum()), 100.0 * float(((pred == y) & (y == c)).sum()) / int((y == c).sum()))
            for c in range(10)]
    assert [(row["class"], row["index"]) for row in r["per_class"]] == [(str(c), c) for c in range(10)]
    assert [row["n"] for row in r["per_class"]] == [n for n, _ in want]
    assert [row["top1"] for row in r["per_class"]] == pytest.approx([a for _, a in want], abs=1e-9)
    assert len({a for _, a in want}) > 2, want   # (not one answer for every class)
    assert r["mean_class_top1"] == pytest.approx(sum(a for _, a in want) / 10, abs=1e-9)
    assert r["classes_without_images"] == 0
    assert r["top1"] == pytest.approx(100.0 * float((pred == y).sum()) / len(y), abs=1e-9)
    assert "class_n" not in r and "class_correct1" not in r

    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "digits", "--per-class", "--max-samples", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[3:]]
    assert lines[2].split() == ["class", "images", "top-1"] and [row[0] for row in rows] == [str(c) for c in range(10)]
    seen = [row for row in rows if row[1] != "0"]
    assert sum(int(row[1]) for row in rows) == 6 and all(row[2] == "-" for row in rows if row[1] == "0")
    mean = sum(float(row[2].rstrip("%")) for row in seen) / len(seen)
    assert lines[1] == (f"mean per-class top-1 {mean:.2f}% over {len(seen)} classes "
                        f"({10 - len(seen)} of 10 have no images here)"), lines


def _strict_json(text):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_outputs_are_no_prediction_and_json_stays_strict(tmp_path, capsys, mini_run):
    """Head weights of +-3e38 (finite: the loader takes them) overflow every logit: eval reported an
    accuracy over nan logits, predict ranked nan probabilities, and --json wrote a bare NaN."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    ad = tmp_path / "ad"
    shutil.copytree(mini_run / "best", ad)
    w = ad / "adapter.safetensors"
    with safe_open(str(w), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    head = tensors["base_model.head.weight"]
    head.copy_(torch_sign_pattern(head) * 3e38)
    save_file(tensors, str(w), metadata=meta)
    from svp.peft.io import tensors_hash   # (as a save of these weights binds them)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(dict(cfg, weights_hash=tensors_hash(tensors))))
    capsys.readouterr()
    assert svp_main(["eval", str(ad), "--dataset", "digits", "--max-samples", "6", "--json"]) == 1
    out, err = capsys.readouterr()
    r = _strict_json(out)
    assert r["nonfinite"] == r["n"] == 6 and r["top1"] == r["top5"] == 0.0 and r["loss"] is None, r
    assert "6 of 6 images gave non-finite outputs" in err and err.startswith("svp eval: error: "), err
    img = _png8(str(tmp_path / "x.png"), 7)
    assert svp_main(["predict", str(ad), img, img, "--json"]) == 1
    out, err = capsys.readouterr()
    answers = _strict_json(out)
    assert [a["top"] for a in answers] == [[], []] and all("not finite" in a["error"] for a in answers), answers
    assert err.startswith("svp predict: error: 2 of 2 images: no prediction"), err
    assert svp_main(["predict", str(ad), img]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == img and out[1].startswith("  no prediction: the outputs are not finite") and len(out) == 2, out
    # the healthy adapter: exit 0, and its JSON numbers are numbers
    assert svp_main(["eval", str(mini_run / "best"), "--dataset", "digits", "--max-samples", "6", "--json"]) == 0
    r = _strict_json(capsys.readouterr().out)
    assert r["nonfinite"] == 0 and isinstance(r["loss"], float)


def torch_sign_pattern(t):
    import torch
    return torch.where(torch.arange(t.numel()).reshape(t.shape) % 2 == 0, 1.0, -1.0)


def test_every_json_writer_writes_non_finite_numbers_as_null(tmp_path):
    from svp.engine.checkpoint import append_jsonl, read_jsonl, rewrite_jsonl
    from svp.io import atomic_write_json
    rec = {"val_loss": float("nan"), "hi": float("inf"), "lo": [-float("inf"), 1.5], "n": 3}
    atomic_write_json(str(tmp_path / "r.json"), rec)
    append_jsonl(str(tmp_path / "m.jsonl"), rec)
    rewrite_jsonl(str(tmp_path / "w.jsonl"), [rec, rec])
    want = {"val_loss": None, "hi": None, "lo": [None, 1.5], "n": 3}
    assert _strict_json((tmp_path / "r.json").read_text()) == want
    for name, k in (("m.jsonl", 1), ("w.jsonl", 2)):
        lines = (tmp_path / name).read_text().splitlines()
        assert [_strict_json(ln) for ln in lines] == [want] * k
    assert read_jsonl(str(tmp_path / "w.jsonl")) == [want, want]


def test_random_bytes_backbone_checkpoint_is_one_line(tmp_path, capsys):
    junk = tmp_path / "vim.safetensors"
    junk.write_bytes(np.random.RandomState(1).bytes(4096))
    rc = svp_main(["train", *MINI, "--checkpoint", str(junk), "--output", str(tmp_path / "runs")])
    _one_line_error(capsys, rc, 2, str(junk))
    assert _no_stub(tmp_path / "runs")
    pth = tmp_path / "svp.pth"
    pth.write_bytes(np.random.RandomState(2).bytes(4096))
    for ckpt in (junk, pth):
        rc = svp_main(["convert-official-svp", str(ckpt), "--model", "vim_mini_patch4_32", "--shared-layers", "4",
                       "--prompt-hidden", "8", "--num-classes", "2", "--out", str(tmp_path / "conv")])
        _one_line_error(capsys, rc, 2, str(ckpt))
    # a torch.save file with one flipped bit in a weight (it loaded silently: torch checks no sums)
    import timm
    import torch
    from test_vim import _flip_a_byte
    sd = timm.create_model("vim_mini_patch4_32").state_dict()
    torch.save({"model": sd}, tmp_path / "flipped.pth")
    _flip_a_byte(tmp_path / "flipped.pth", sd["pos_embed"].numel() * 4)
    rc = svp_main(["train", *MINI, "--checkpoint", str(tmp_path / "flipped.pth"), "--output", str(tmp_path / "runs")])
    _one_line_error(capsys, rc, 2, "flipped.pth: the file is damaged", "'pos_embed'")
    assert _no_stub(tmp_path / "runs")


@pytest.mark.parametrize("override,names", [
    ("data.img_size=7", ["data.img_size=7"]), ("data.img_size=0", ["data.img_size=0"]),
    ("data.img_size=-32", ["data.img_size=-32"]), ("data.img_size=33", ["data.img_size=33"]),
    ("train.opt=foo", ["train.opt", "foo"]), ("method.settings.shared_layers=3", ["shared_layers=3"]),
    ("train.smoothing=2", ["train.smoothing=2"])])
def test_bad_values_found_late_are_one_line_and_leave_no_stub(tmp_path, capsys, override, names):
    method = ["--method", "svp"] if "shared_layers" in override else []
    rc = svp_main(["train", *MINI, *method, override, "--output", str(tmp_path / "runs")])
    _one_line_error(capsys, rc, 2, *names)
    assert _no_stub(tmp_path / "runs")


def test_the_first_signal_is_said_on_a_line_of_its_own_by_the_main_process_only():
    """The first signal's line was glued onto a live progress bar (retest 59); sweep workers and
    other ranks leave it to the sweep and the main rank."""
    import logging
    from types import SimpleNamespace

    from svp.engine import loop, progress
    cleared, said = [], []
    bar = SimpleNamespace(clear=lambda: cleared.append(True))
    trainer = SimpleNamespace(progress=SimpleNamespace(bar=bar), dist=SimpleNamespace(is_main=True))
    # (on the run's logger itself: a run's logging setup stops it propagating to caplog's)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    progress.log.addHandler(handler)
    try:
        loop.Trainer._stopping(trainer, "SIGINT")
        assert cleared == [True] and len(said) == 1 and "Ctrl-C again stops it at once" in said[0], said
        trainer.dist.is_main = False
        loop.Trainer._stopping(trainer, "SIGTERM")
        trainer.dist.is_main = True
        progress.worker_label = "svp/s0"
        try:
            loop.Trainer._stopping(trainer, "SIGTERM")
        finally:
            progress.worker_label = None
        assert len(said) == 1, said
    finally:
        progress.log.removeHandler(handler)


def test_a_full_disk_and_a_stray_config_are_said_with_what_to_do(tmp_path, capsys):
    """Review 58: a full disk stopped a run without saying that its last resume point (written
    whole or not at all) can be continued from; a config.yaml that is no svp configuration was
    "config dict: unknown section 'x'", naming no file."""
    import errno

    from svp.engine import checkpoint as ck
    from svp.engine.rundir import user_io_error
    run = tmp_path / "r"
    run.mkdir()
    full = OSError(errno.ENOSPC, "No space left on device", str(run / "resume.safetensors"))
    assert "continue with" not in str(user_io_error(full, str(run)))   # (nothing to continue from yet)
    (run / ck.RESUME_FILE).write_bytes(b"")
    said = str(user_io_error(full, str(run)))
    assert said == (f"run folder {run}: cannot write {run / 'resume.safetensors'} (No space left on device); its "
                    f"last resume point is whole: once the folder can be written, continue with: svp train --resume "
                    f"{run}"), said
    stray = tmp_path / "notarun"
    stray.mkdir()
    for text, words in (("x: 1\n", "unknown section 'x'"), ("[1, 2]\n", "expected a mapping of sections, got list"),
                        ("train:\n  epochs: four\n", "train.epochs='four': expected a positive integer")):
        (stray / "config.yaml").write_text(text)
        _one_line_error(capsys, svp_main(["train", "--resume", str(stray)]), 2, f"{stray / 'config.yaml'}: {words}")


def test_unwritable_output_and_run_folder_are_one_line(tmp_path, capsys, monkeypatch, mini_run):
    (tmp_path / "afile").write_text("")
    rc = svp_main(["train", *MINI, "--output", str(tmp_path / "afile" / "runs")])
    _one_line_error(capsys, rc, 2, "afile/runs")
    # a run folder that cannot be written (read-only file system, simulated: tests may run as root)
    import shutil
    run = tmp_path / "ro"
    shutil.copytree(mini_run, run)
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(30, "Read-only file system", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", ro_open)
    rc = svp_main(["train", "--resume", str(run)])
    _one_line_error(capsys, rc, 2, str(run))


# ---------------------------------------------------------------- one process per run folder (e2e)


def test_busy_run_folder_refuses_a_second_train_and_a_resume(tmp_path, capsys, mini_run):
    import shutil
    import signal
    run = tmp_path / "runs" / "busy"
    shutil.copytree(mini_run, run)
    (run / "results.json").unlink()   # an unfinished run, as while it trains
    child = _hold_lock(run)
    try:
        for args in (["train", *MINI, "--output", str(tmp_path / "runs"), "--name", "busy"],
                     ["train", "--resume", str(run)]):
            _one_line_error(capsys, svp_main(args), 2, f"in use by process {child} on host")
        assert not (run / "results.json").exists()   # neither wrote anything
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


# ---------------------------------------------------------------- temporaries removed (e2e)


def _hooks(monkeypatch, hooks):
    import svp.engine.loop as loop
    monkeypatch.setattr(loop, "hooks_for", lambda cfg: hooks)


@pytest.mark.slow
def test_stale_temporaries_are_removed_on_resume_and_at_the_end(tmp_path, monkeypatch, capsys):
    from svp.engine.hooks import DebugHooks
    from svp.io import is_temp_name, temp_name
    out = tmp_path / "runs"
    assert svp_main(["train", *MINI, "--epochs", "2", "--output", str(out), "--name", "t",
                     "debug.stop_at_step=1"]) == 75
    run = out / "t"
    # what kill -9 inside writes leaves: partial resume states (new and old naming), a half-written best/
    planted = [temp_name(run / "resume.safetensors"), str(run / ".tmp-k9x2abcd-resume.safetensors")]
    for p in planted:
        open(p, "wb").write(os.urandom(1000))
    os.makedirs(run / ".svp-tmp-new-best")
    seen = {}

    class Plant(DebugHooks):
        def after_step(self, global_step):
            seen.setdefault("at_resume", sorted(f for f in os.listdir(run) if is_temp_name(f)))
            open(temp_name(run / "x.json"), "w").write("{")   # a temporary left during this run
    _hooks(monkeypatch, Plant({}))
    assert svp_main(["train", "--resume", str(run)]) == 0
    assert seen["at_resume"] == []   # gone before the first resumed step
    left = [os.path.join(r, f) for r, ds, fs in os.walk(run) for f in fs + ds if is_temp_name(f)]
    assert left == [] and (run / "results.json").is_file()


# ---------------------------------------------------------------- divergence (e2e)

DIVERGE = ["--method", "svp", "method.settings.shared_layers=4", "method.settings.hidden=8", "--epochs", "3",
           "train.sched_step=epoch"]


def _all_finite(path):
    from safetensors.torch import load_file
    t = load_file(str(path))
    return t and all(bool(v.float().isfinite().all()) for v in t.values() if v.is_floating_point())


@pytest.mark.slow
def test_lr_1e6_stops_before_anything_nonfinite_is_saved(tmp_path, capsys):
    """The issue's probe: whatever breaks first (the gradients, here), the run stops at that
    step; the resume point, the dump and best/ hold finite numbers only, and the last resume
    point (end of epoch 1) is not replaced."""
    out = tmp_path / "runs"
    rc = svp_main(["train", *MINI, *DIVERGE, "train.lr=1e6", "--output", str(out), "--name", "d"])
    err = capsys.readouterr().err
    assert rc == 3, err
    run = out / "d"
    assert "non-finite" in err and f"the last resume point ({run / 'resume.safetensors'}) is kept" in err
    for f in ("resume.safetensors", "nonfinite/batch_and_weights.safetensors",
              "nonfinite/resume_before_step.safetensors", "best/adapter.safetensors"):
        assert _all_finite(run / f), f
    from svp.engine.checkpoint import load_state
    assert load_state(str(run / "resume.safetensors"))["batch"] == 0   # an epoch-end point
    assert not (run / "results.json").exists()
    assert "non-finite" in (run / "train.log").read_text()


@pytest.mark.slow
def test_weights_broken_by_a_step_with_finite_loss_are_caught_and_undone(tmp_path, capsys, monkeypatch):
    """The case the loss-only guard missed: the loss and the gradients of step 3 are finite,
    the weights after it are not. The step is undone: the dump holds the weights from before
    it (those of the resume point at the end of epoch 1) and the batch; nothing non-finite is saved."""
    import torch
    from safetensors.torch import load_file

    from svp.engine.hooks import Hooks

    class Break(Hooks):
        def after_optimizer_step(self, step_no, model):
            if step_no == 3:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    _hooks(monkeypatch, Break())
    out = tmp_path / "runs"
    rc = svp_main(["train", *MINI, *DIVERGE, "--output", str(out), "--name", "w"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "the step made the weights/optimizer state non-finite" in err and "loss was finite" in err
    assert "at step 3 (epoch 2, batch 1/2" in err
    run = out / "w"
    resume = load_file(str(run / "resume.safetensors"))
    dump = load_file(str(run / "nonfinite" / "batch_and_weights.safetensors"))
    weights = {k[len("param/"):]: v for k, v in dump.items() if k.startswith("param/")}
    assert weights and _all_finite(run / "nonfinite" / "batch_and_weights.safetensors")
    for k, v in weights.items():   # the last finite weights are the resume point's (step 2)
        assert torch_equal(v, resume[f"s/model/{k}"]), k


def test_finite_check_auto_skips_the_per_step_syncs_on_one_cuda_device_only():
    from svp.engine.divergence import finite_check_mode
    cuda, cpu = torch_device("cuda"), torch_device("cpu")
    assert finite_check_mode("auto", cuda, False) == "interval"
    assert finite_check_mode("auto", cuda, True) == "step"     # DDP reads each step's loss anyway
    assert finite_check_mode("auto", cpu, False) == "step"
    assert finite_check_mode("step", cuda, False) == "step" and finite_check_mode("interval", cpu, False) == "interval"


@pytest.mark.slow
@pytest.mark.parametrize("broken_after", [3, 4])
def test_interval_checks_put_back_the_last_checked_state_and_save_nothing_broken(tmp_path, capsys, monkeypatch,
                                                                                 broken_after):
    """train.finite_check=interval (auto on one CUDA device), here on the CPU: a weight goes NaN
    after step 3 or 4, where no check runs. Either step 4's loss (NaN, read every step on the
    CPU) or the check after step 4 (the end of epoch 2) finds it; the state of the previous
    check (step 2, the end of epoch 1) is put back and the run stops, naming steps 3-4. The
    per-step checks never ran; nothing non-finite is saved, no resume point is written."""
    import torch
    from safetensors.torch import load_file

    from svp.engine.checkpoint import load_state
    from svp.engine.divergence import DivergenceGuard
    from svp.engine.hooks import Hooks

    class Break(Hooks):
        def after_optimizer_step(self, step_no, model):
            if step_no == broken_after:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    _hooks(monkeypatch, Break())
    calls = []
    orig = DivergenceGuard.bad_gradients
    monkeypatch.setattr(DivergenceGuard, "bad_gradients", lambda self: calls.append(1) or orig(self))
    out = tmp_path / "runs"
    rc = svp_main(["train", *MINI, *DIVERGE, "train.finite_check=interval", "run.log_every=10",
                   "--output", str(out), "--name", "i"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert calls == []
    what = ("non-finite loss (nan)" if broken_after == 3 else
            "non-finite weights/optimizer state (base_model.head.weight)")
    assert what in err and "at step 4 (epoch 2, batch 2/2" in err and "steps 3-4 undone" in err, err
    run = out / "i"
    assert load_state(str(run / "resume.safetensors"))["global_step"] == 2   # epoch 1's point, kept
    assert not (run / "nonfinite" / "resume_before_step.safetensors").exists()
    resume = load_file(str(run / "resume.safetensors"))
    dump = load_file(str(run / "nonfinite" / "batch_and_weights.safetensors"))
    weights = {k[len("param/"):]: v for k, v in dump.items() if k.startswith("param/")}
    assert weights and _all_finite(run / "nonfinite" / "batch_and_weights.safetensors")
    for k, v in weights.items():   # put back: the weights as after step 2
        assert torch_equal(v, resume[f"s/model/{k}"]), k
    info = json.loads((run / "nonfinite" / "nonfinite.json").read_text())
    assert info["weights_as_after_step"] == 2 and info["step"] == 4


@pytest.mark.slow
def test_interval_checks_train_the_same_bits_as_per_step_checks(tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "runs"
    for mode in ("step", "interval"):
        assert svp_main(["train", *MINI, *DIVERGE, f"train.finite_check={mode}", "run.log_every=3",
                         "--output", str(out), "--name", mode]) == 0
    a, b = (load_file(str(out / m / "final_state.safetensors")) for m in ("step", "interval"))
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


def torch_device(name):
    import torch
    return torch.device(name)


@pytest.mark.slow
def test_diverged_run_resumes_with_a_lower_lr_exactly(tmp_path, capsys):
    """Warm-up epochs at 1e-3, then a rate of 1e20: epoch 3 breaks (exit 3). Resuming with
    train.lr=1e-3 continues from the kept end-of-epoch-2 point on the new schedule, finishes,
    and records the change (config.yaml run.changes) and the rate of each phase (results.json)."""
    import yaml

    from svp.engine.sched import lr_at_epoch
    out = tmp_path / "runs"
    rc = svp_main(["train", *MINI, *DIVERGE, "train.warmup_epochs=1", "train.warmup_lr=1e-3", "train.lr=1e20",
                   "--output", str(out), "--name", "n"])
    err = capsys.readouterr().err
    assert rc == 3 and "(epoch 3, batch" in err, err
    run = out / "n"
    assert svp_main(["train", "--resume", str(run), "train.lr=1e-3"]) == 0, capsys.readouterr().err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 1e-3
    assert cfg["run"]["changes"] == [{"step": 4, "epoch": 2, "batch": 0, "changes": {"train.lr": [1e20, 1e-3]}}]
    res = json.loads((run / "results.json").read_text())
    assert res["lr_used"] == 1e-3 and res["epochs_run"] == 3
    from svp.engine.optim import fused_available   # train.opt_fused=auto: which one stepped it
    assert res["optimizer"] == ("AdamW (fused)" if fused_available("cpu") else "AdamW (per-tensor loop)")
    p1, p2 = res["lr_phases"]
    assert (p1["from_step"], p1["peak_lr"], p2["from_step"], p2["peak_lr"]) == (0, 1e20, 4, 1e-3)
    assert p1["lr_max"] == pytest.approx(1e-3)    # epochs 1-2 ran at the warm-up rate
    want = lr_at_epoch(cfg, 2, 1e-3)              # the new schedule at epoch 3, computed apart
    assert p2["lr_min"] == pytest.approx(want) and p2["lr_max"] == pytest.approx(want) and 0 < want <= 1e-3
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and metrics[2]["lr"] == pytest.approx(want)
    assert all(np.isfinite(m["train_loss"]) for m in metrics)


def torch_equal(a, b):
    import torch
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.slow
def test_resume_refuses_an_end_before_its_resume_point_and_stops_at_one_on_it(tmp_path, capsys):
    """Stopped one batch into epoch 2 (step 3): lowering train.epochs to 1 or train.max_steps to 2
    would report the step-3 weights as those of an end the run went past, so both are refused;
    train.max_steps=3 ends the run where it stands, with no step beyond it."""
    out = tmp_path / "runs"
    assert svp_main(["train", *MINI, "--epochs", "3", "--output", str(out), "--name", "r",
                     "debug.stop_at_step=3"]) == 75
    run = out / "r"
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    line = _one_line_error(capsys, svp_main(["train", "--resume", str(run), "train.epochs=1"]), 2)
    assert "train.epochs=1" in line and "expected train.epochs >= 2" in line
    line = _one_line_error(capsys, svp_main(["train", "--resume", str(run), "train.max_steps=2"]), 2)
    assert "train.max_steps=2" in line and "at step 3" in line
    assert (run / "config.yaml").read_text() == before  # a refused resume leaves the record as it was
    assert svp_main(["train", "--resume", str(run), "train.max_steps=3", "debug.stop_at_step=null"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 3 and res["epochs_run"] == 2


def test_a_resume_on_another_thread_count_says_its_bits_differ(tmp_path, capsys):
    """torch's CPU products sum in another order at another thread count: a run resumed so ends with
    weights a few 1e-7 off the run never stopped, and nothing said so or recorded the count
    (review 79). The log names the count of each segment, and the resume warns, naming the count
    that gives the same bits."""
    import torch
    before = torch.get_num_threads()
    out = tmp_path / "runs"
    try:
        torch.set_num_threads(2)
        assert svp_main(["train", *MINI, "--epochs", "2", "--output", str(out), "--name", "r",
                         "debug.stop_at_step=2"]) == 75
        torch.set_num_threads(1)
        assert svp_main(["train", "--resume", str(out / "r"), "debug.stop_at_step=null"]) == 0
    finally:
        torch.set_num_threads(before)
    log = (out / "r" / "train.log").read_text()
    assert "device cpu (2 thread(s)), scan backend" in log and "device cpu (1 thread(s)), scan backend" in log, log
    import platform

    import svp
    # each segment names the svp, torch and Python it ran on (retest 82)
    assert log.count(f"svp {svp.__version__}, torch {torch.__version__}, Python {platform.python_version()}\n") == 2
    assert ("the steps so far ran on 2 CPU thread(s) with scan backend cpu, these run on 1 CPU thread(s) with "
            "scan backend cpu: the weights will differ in their last bits from a run that never stopped (the "
            "sums' order changes); resume with OMP_NUM_THREADS=2 for the same bits") in log, log
    # the same count: not said
    capsys.readouterr()
    assert svp_main(["train", *MINI, "--epochs", "2", "--output", str(out), "--name", "s",
                     "debug.stop_at_step=2"]) == 75
    assert svp_main(["train", "--resume", str(out / "s"), "debug.stop_at_step=null"]) == 0
    assert "the steps so far ran on" not in (out / "s" / "train.log").read_text()
    # another scan backend on the same device: the hint names the recorded one (retest 82: none was given)
    assert svp_main(["train", *MINI, "--epochs", "2", "--output", str(out), "--name", "t",
                     "debug.stop_at_step=2"]) == 75
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVP_SCAN_BACKEND", "torch")
        assert svp_main(["train", "--resume", str(out / "t"), "debug.stop_at_step=null"]) == 0
    log = (out / "t" / "train.log").read_text()
    assert "these run on %d CPU thread(s) with scan backend torch" % torch.get_num_threads() in log, log
    assert "resume with SVP_SCAN_BACKEND=cpu for the same bits" in log and "OMP_NUM_THREADS" not in log, log
    assert "scan backend cpu, world size" in log and "scan backend torch, world size" in log, log
    # a device other than the CPU or a GPU is said as what it is; an older record's (no device, no
    # thread count) as a GPU's
    from svp.engine.distributed import arithmetic_words
    assert arithmetic_words({"threads": None, "scan_backend": "torch", "device": "mps"}) == \
        "the mps device with scan backend torch"
    assert arithmetic_words({"threads": None, "scan_backend": "triton"}) == "a GPU with scan backend triton"


def test_only_the_first_process_prints_why_a_run_stopped(tmp_path, capsys, monkeypatch):
    """Under torchrun every process stops; the message (with its resume command) is printed once."""
    from svp import runtime
    from svp.engine import loop
    from svp.engine.distributed import DistInfo
    # rank 1 of two, as launch() reads it, while the run itself is one process
    monkeypatch.setattr(runtime, "launch", lambda: runtime.Launch(2, 1, 1, 2))
    monkeypatch.setattr(loop, "init_distributed", lambda kind: DistInfo())
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "a", "debug.stop_at_step=1"]) == 75
    assert "stopped after step 1" not in capsys.readouterr().err
    monkeypatch.setattr(runtime, "launch", lambda: runtime.Launch(2, 0, 0, 2))
    assert svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "b", "debug.stop_at_step=1"]) == 75
    assert "stopped after step 1" in capsys.readouterr().err


def test_resume_refuses_overrides_it_cannot_apply_exactly(tmp_path, capsys, mini_run):
    line = _one_line_error(capsys, svp_main(["train", "--resume", str(mini_run), "train.opt=sgd",
                                             "train.lr=0.1"]), 2, "train.opt")
    assert "--resume accepts only train.lr, train.epochs" in line and "train.lr," in line


# ---------------------------------------------------------------- signals, fatal errors, train.log


@pytest.mark.slow
def test_second_ctrl_c_exits_130_with_the_resume_hint(tmp_path, capsys, monkeypatch):
    import signal

    from svp.engine.hooks import Hooks

    class CtrlC(Hooks):
        def after_step(self, global_step):
            if global_step == 3:   # after the epoch-1 resume point (2 steps per epoch)
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)   # the impatient second one
    _hooks(monkeypatch, CtrlC())
    from svp.engine import signals
    monkeypatch.setattr(signals, "SAME_SIGNAL_S", 0.0)   # (a second press, not the first's copy)
    out = tmp_path / "runs"
    rc = svp_main(["train", *MINI, "--epochs", "3", "--output", str(out), "--name", "c"])
    run = out / "c"
    line = _one_line_error(capsys, rc, 130, "interrupted again: stopped at once",
                           f"svp train --resume {run}")
    assert "KeyboardInterrupt" not in line
    assert "interrupted again" in (run / "train.log").read_text()   # the end is in the log too
    monkeypatch.undo()
    assert svp_main(["train", "--resume", str(run)]) == 0           # and the hint works


def test_one_ctrl_c_while_the_run_starts_is_not_called_a_second(tmp_path, capsys, monkeypatch):
    """A single Ctrl-C before the run's handler was in place said "interrupted again" (svp demo
    printed it after one press: review)."""
    import svp.engine.rundir as R

    def pressed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(R, "setup_logging", pressed)
    rc = svp_main(["train", *MINI, "--output", str(tmp_path / "runs"), "--name", "s"])
    line = _one_line_error(capsys, rc, 130, "interrupted while the run was starting")
    assert "interrupted again" not in line
    # the folder made for it is not left as a stub (nothing to resume: "start the run again")
    assert not (tmp_path / "runs" / "s").exists()
    # a SIGTERM there killed the process with no word and left the folder's first files: until
    # the run's handler is in place it stops the run as Ctrl-C does (called here, not sent: sent
    # to a process without the handler, it would end the test run)
    import signal

    def terminated(*a, **k):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), handler
        handler(signal.SIGTERM, None)
    monkeypatch.setattr(R, "setup_logging", terminated)
    rc = svp_main(["train", *MINI, "--output", str(tmp_path / "runs"), "--name", "t"])
    _one_line_error(capsys, rc, 130, "interrupted while the run was starting")
    assert not (tmp_path / "runs" / "t").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # (put back)


@pytest.mark.parametrize("during", ["last_validation", "final_test"])
def test_a_signal_during_the_last_evaluations_stops_the_run_at_its_last_resume_point(tmp_path, capsys, monkeypatch,
                                                                                      during):
    """A SIGTERM while the last epoch's validation or the final test evaluations ran was ignored
    (exit 0 after them): a scheduler's grace period shorter than those evaluations then killed
    the run. It stops after the evaluation under way (exit 130), and --resume runs the end."""
    import signal

    from svp.engine import loop

    cmd = [*MINI, "--epochs", "2", "data.max_eval_samples=16", "--output", str(tmp_path)]
    assert svp_main(["train", *cmd, "--name", "whole"]) == 0
    evaluate, finish, seen = loop.Trainer._evaluate, loop.Trainer._finish, {"val": 0, "finishing": False}

    def _finish(self, *a):
        seen["finishing"] = True
        return finish(self, *a)

    def _evaluate(self, model, split, what):
        out = evaluate(self, model, split, what)
        seen["val"] += split is self.val
        if not seen.get("sent") and ((during == "last_validation" and split is self.val and seen["val"] == 2)
                                     or (during == "final_test" and seen["finishing"])):
            seen["sent"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(loop.Trainer, "_evaluate", _evaluate)
    monkeypatch.setattr(loop.Trainer, "_finish", _finish)
    run = tmp_path / "cut"
    _one_line_error(capsys, svp_main(["train", *cmd, "--name", "cut"]), 130,
                    "SIGTERM received: stopped after epoch 2; resume point saved")
    assert not (run / "results.json").exists() and not (run / "last").exists()
    # said as it came (the run went on silently until its evaluation ended: review 58)
    assert "SIGTERM received: the run stops once its current step (or evaluation) ends, writing a resume point; " \
           "SIGTERM again stops it at once" in (run / "train.log").read_text()
    monkeypatch.undo()
    assert svp_main(["train", "--resume", str(run)]) == 0
    # (it said "resumed ... at epoch 3" of a 2-epoch run)
    assert "after its last epoch (2 of 2, global step 4): the final evaluation runs" in (run / "train.log").read_text()
    whole, cut = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "cut"))
    timeless = lambda res: {k: v for k, v in res.items() if not k.endswith(("seconds", "per_s", "run_dir"))}  # noqa: E731
    assert timeless(cut) == timeless(whole)


def test_errors_after_training_started_are_in_train_log_and_keep_the_folder(tmp_path, capsys, monkeypatch):
    from svp.engine.hooks import Hooks
    from svp.errors import DatasetError

    class Fail(Hooks):
        def __init__(self, exc):
            self.exc = exc

        def after_step(self, global_step):
            if global_step == 1:
                raise self.exc
    out = tmp_path / "runs"
    _hooks(monkeypatch, Fail(DatasetError("unreadable image: /data/x.png (truncated)")))
    rc = svp_main(["train", *MINI, "--output", str(out), "--name", "e"])
    _one_line_error(capsys, rc, 2, "/data/x.png")
    log = (out / "e" / "train.log").read_text()
    assert "stopped: unreadable image: /data/x.png (truncated)" in log and "Traceback" not in log
    # a bug keeps its traceback, in the log as on stderr
    _hooks(monkeypatch, Fail(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        svp_main(["train", *MINI, "--output", str(out), "--name", "b"])
    log = (out / "b" / "train.log").read_text()
    assert "stopped: ZeroDivisionError: a bug" in log and "Traceback" in log


def test_corrupt_image_in_any_split_stops_training_before_the_first_step(tmp_path, capsys):
    root = _csv_root(tmp_path, {"train": ["a", "b"] * 4, "val": ["a", "b"], "test": ["a", "b", "a"]})
    broken = os.path.join(root, "img", "test_2.png")
    with open(broken, "r+b") as f:
        f.truncate(40)
    out = tmp_path / "runs"
    rc = svp_main(["train", *MINI, "--dataset", "csv", "--data-root", root, "data.max_eval_samples=null",
                   "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"test: unreadable image: {broken}" in err and "epoch 1/1" not in err, err
    assert _no_stub(out)


# ---------------------------------------------------------------- predict


def test_predict_reads_16bit_images_through_the_shared_reader(tmp_path, capsys, mini_run):
    a16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    p16 = _png16(str(tmp_path / "x16.png"), np.stack([a16, a16[::-1], a16.T], axis=-1))
    p8 = str(tmp_path / "x8.png")
    Image.fromarray((np.stack([a16, a16[::-1], a16.T], axis=-1) >> 8).astype(np.uint8)).save(p8)
    assert svp_main(["predict", str(mini_run / "best"), p16, p8, "--json", "--topk", "10"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got[0]["top"] == got[1]["top"]    # was: the 16-bit image saturated to white


def test_predict_classifies_batch_by_batch_in_the_images_order(tmp_path, capsys, monkeypatch, mini_run):
    """--batch-size bounds the images in one forward; the predictions and their order are those of
    one batch over all images; a batch size below 1 is one line naming the flag."""
    rng = np.random.RandomState(0)
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"p{i}.png"))
        Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    best = str(mini_run / "best")
    assert svp_main(["predict", best, *paths, "--json", "--topk", "10"]) == 0
    whole = json.loads(capsys.readouterr().out)
    import svp.peft as peft
    sizes = []
    forward = peft.PeftModel.forward

    def counted(self, x, *a, **k):
        sizes.append(x.shape[0])
        return forward(self, x, *a, **k)
    monkeypatch.setattr(peft.PeftModel, "forward", counted)
    assert svp_main(["predict", best, *paths, "--json", "--topk", "10", "--batch-size", "2"]) == 0
    batched = json.loads(capsys.readouterr().out)
    assert sizes == [2, 2, 1]
    assert [p["image"] for p in batched] == [p["image"] for p in whole] == paths
    for a, b in zip(whole, batched):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert [t["prob"] for t in a["top"]] == pytest.approx([t["prob"] for t in b["top"]], abs=1e-6)
    _one_line_error(capsys, svp_main(["predict", best, *paths, "--batch-size", "0"]), 2, "--batch-size", "0")
    _one_line_error(capsys, svp_main(["eval", best, "--dataset", "digits", "--batch-size", "-1"]), 2, "--batch-size")
    # the text answers leave batch by batch, an unreadable image (in the third batch) among them
    # with its error: the first four keep theirs (nothing was printed before the last image had
    # its answer; until QA 16e the unreadable one stopped the command)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rc = svp_main(["predict", best, *paths[:4], str(tmp_path / "bad.png"), "--batch-size", "2"])
    got = capsys.readouterr()
    assert rc == 2 and "bad.png" in got.err
    assert [line for line in got.out.splitlines() if not line.startswith(" ")] == paths[:4] + [str(tmp_path / "bad.png")]
    assert got.out.splitlines()[-1].startswith("  unreadable image: ")


def test_predict_reads_the_adapter_folder_once(tmp_path, capsys, monkeypatch, mini_run):
    """svp predict/eval read an adapter folder three times (its description, its weights, its
    class names): a folder replaced meanwhile (a run's best/ at an epoch's end) gave one
    adapter's weights under the other's class names (review). Replaced as the backbone is built,
    the answer is now wholly the first folder's."""
    import shutil

    import torch

    import svp
    import svp.build as B
    src, other = tmp_path / "ad", tmp_path / "other"
    shutil.copytree(mini_run / "best", src)
    pm = svp.load_adapter(B.build_backbone(B.adapter_spec(str(src)), skip_init=True), str(src))
    with torch.no_grad():   # another head: class k of src is class 9-k here, named so
        pm.base_model.head.weight.copy_(pm.base_model.head.weight.flip(0))
        pm.base_model.head.bias.copy_(pm.base_model.head.bias.flip(0))
    pm.save(str(other), base_model_name="vim_mini_patch4_32", class_names=[f"digit{9 - k}" for k in range(10)])
    shutil.copy(src / "backbone.json", other)
    image = str(tmp_path / "x.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    assert svp_main(["predict", str(src), image, "--topk", "1", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)[0]["top"][0]
    real = B.build_backbone

    def swapping(spec, skip_init=False):
        if not getattr(swapping, "done", False):
            swapping.done = True
            os.rename(src, str(src) + ".old")
            os.rename(other, src)
        return real(spec, skip_init)
    monkeypatch.setattr(B, "build_backbone", swapping)
    assert svp_main(["predict", str(src), image, "--topk", "1", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["top"][0]
    assert (got["class"], got["index"]) == (alone["class"], alone["index"])
    assert got["prob"] == pytest.approx(alone["prob"], abs=1e-6)


def test_a_moved_backbone_checkpoint_is_said_as_the_adapters_record(tmp_path, capsys):
    """The checkpoint an adapter's backbone.json names, moved: "checkpoint '...': file not found"
    said neither where the path came from nor the documented answer, --checkpoint (review)."""
    import shutil

    from svp.models.vim_mini import mini_asset_path
    ck = tmp_path / "backbone.safetensors"
    shutil.copy(mini_asset_path(), ck)
    assert svp_main(["train", *MINI, "model.checkpoint=" + str(ck), "--output", str(tmp_path / "runs"),
                     "--name", "c"]) == 0
    image = str(tmp_path / "x.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    ck.rename(tmp_path / "moved.safetensors")
    capsys.readouterr()
    best = str(tmp_path / "runs" / "c" / "best")
    assert svp_main(["predict", best, image]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {str(ck)!r} (recorded in {os.path.join(best, 'backbone.json')}): file not found" in err, err
    assert "pass --checkpoint FILE" in err
    assert svp_main(["predict", best, image, "--checkpoint", str(tmp_path / "moved.safetensors")]) == 0
    # svp serve said only "file not found" (review 57); a folder in the file's place, neither
    from svp.build import CheckpointError
    from svp.serve.backbone import backbone_spec
    shutil.copytree(best, tmp_path / "adapters" / "c")
    ck.mkdir()
    recorded = os.path.join(str(tmp_path / "adapters" / "c"), "backbone.json")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {str(ck)!r} (recorded in {recorded}): is a "
                                                        f"folder; expected a checkpoint file; if it moved, pass "
                                                        f"--checkpoint FILE")):
        backbone_spec(str(tmp_path / "adapters"))
    assert backbone_spec(str(tmp_path / "adapters"), checkpoint=str(tmp_path / "moved.safetensors")).checkpoint


def test_predict_without_weights_fails_at_once_without_the_hub(capsys, monkeypatch, mini_run):
    import timm.models._builder as builder

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(builder, "load_pretrained", no_hub)
    rc = svp_main(["predict", str(mini_run / "best"), "x.png", "--model", "vim_tiny_patch16_224"])
    _one_line_error(capsys, rc, 2, "vim_tiny_patch16_224", "no weights given")


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked: they must not hold the run folder after the trainer is gone."""
    import signal
    import time

    from svp.engine.runlock import RunLock, holder
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(str(run)).acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: stays alive like a worker would
        os.write(w, b"1")
        time.sleep(60)
        os._exit(0)
    assert os.read(r, 1) == b"1"
    try:
        import svp.engine.runlock as rl
        rl._HELD.discard(lock.fd)
        os.close(lock.fd)       # the trainer's descriptor goes away (as on kill -9) ...
        lock.fd = None
        assert holder(str(run)) is None   # ... and the living child does not hold the folder
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_resume_refuses_a_training_split_that_changed_since_the_resume_point(tmp_path, capsys):
    """Images added to or removed from the training split between a stop and --resume went
    unnoticed: the epoch's order is drawn from the split's size, so the resumed epoch skipped
    the wrong batches."""
    root = tmp_path / "if"
    for split, n in (("train", 8), ("test", 2)):
        for c in ("p", "q"):
            for i in range(n):
                _png8(str(root / split / c / f"{i}.png"), 30 * i)
    args = ["--dataset", "imagefolder", "--data-root", str(root), "--method", "linear", "--model",
            "vim_mini_patch4_32", "--epochs", "2", "--batch-size", "4", "train.warmup_epochs=0", "data.recipe=plain",
            "run.progress=none", "train.device=cpu", "data.val_split=null", "--output", str(tmp_path / "runs")]
    assert svp_main(["train", *args, "--name", "r", "debug.stop_at_step=2"]) == 75
    run = str(tmp_path / "runs" / "r")
    extra = _png8(str(root / "train" / "p" / "extra.png"), 7)
    capsys.readouterr()
    _one_line_error(capsys, svp_main(["train", "--resume", run]), 2, "the training split changed", "16 -> 17 images")
    os.remove(extra)
    os.rename(root / "train" / "q" / "0.png", root / "train" / "p" / "zz.png")   # one image to another class
    _one_line_error(capsys, svp_main(["train", "--resume", run]), 2, "other labels or classes in their order")
    os.rename(root / "train" / "p" / "zz.png", root / "train" / "q" / "0.png")
    assert svp_main(["train", "--resume", run]) == 0


def test_resume_refuses_a_backbone_file_that_changed_since_the_run_started(tmp_path, capsys, monkeypatch):
    """--resume reads model.checkpoint again: a file replaced at that path was trained on without
    a word, and the run ended with best/ and last/ bound to two backbones (QA 2026-12-06)."""
    from safetensors.torch import load_file, save_file
    from svp.models.vim_mini import mini_asset_path
    weights = str(tmp_path / "w.safetensors")
    shutil.copyfile(mini_asset_path(), weights)
    args = [*MINI, "--epochs", "2", "--output", str(tmp_path / "runs"), "--checkpoint", weights]
    assert svp_main(["train", *args, "--name", "r", "debug.stop_at_step=3"]) == 75
    run = str(tmp_path / "runs" / "r")
    original = open(weights, "rb").read()
    sd = load_file(weights)
    sd["layers.3.mixer.in_proj.weight"] = sd["layers.3.mixer.in_proj.weight"] * 1.01
    save_file(sd, weights)
    capsys.readouterr()
    line = _one_line_error(capsys, svp_main(["train", "--resume", run]), 2, "the run trained on a backbone with weight "
                           "hash sha256:", f"{weights} now gives sha256:", "the file changed since the run started",
                           "Put the file the run started from back")
    assert re.search(r"hash (sha256:\w+), and .* now gives (sha256:\w+)", line).group(1) != \
        re.search(r"now gives (sha256:\w+)", line).group(1)
    open(weights, "wb").write(original)
    assert svp_main(["train", "--resume", run]) == 0
    hashes = {json.load(open(os.path.join(run, d, "adapter_config.json")))["base_model_hash"] for d in ("best", "last")}
    assert len(hashes) == 1
    # the bundled weights (no file of the user's): said as another svp/torch/timm having made them
    import svp.peft.base as pbase
    args = [*MINI, "--epochs", "2", "--output", str(tmp_path / "runs")]
    assert svp_main(["train", *args, "--name", "b", "debug.stop_at_step=3"]) == 75
    monkeypatch.setattr(pbase, "base_weights_hash", lambda model: "sha256:" + "0" * 64)   # (another svp's weights)
    capsys.readouterr()
    _one_line_error(capsys, svp_main(["train", "--resume", str(tmp_path / "runs" / "b")]), 2,
                    "vim_mini_patch4_32's bundled weights now give sha256:", "another svp, torch or timm made them")


def test_resume_refuses_a_resume_point_copied_from_another_run(tmp_path, capsys):
    """A resume.safetensors copied from another run of the same method was taken: the run went
    on from the other run's weights and step under its own configuration. The resume point
    records its run's config.yaml; an override passed to --resume is still taken."""
    args = [*MINI, "--epochs", "2", "--output", str(tmp_path / "runs"), "debug.stop_at_step=1"]
    assert svp_main(["train", *args, "--name", "a", "train.seed=1"]) == 75
    assert svp_main(["train", *args, "--name", "b", "train.seed=2"]) == 75
    a, b = (str(tmp_path / "runs" / n) for n in ("a", "b"))
    kept = open(os.path.join(b, "resume.safetensors"), "rb").read()
    shutil.copyfile(os.path.join(a, "resume.safetensors"), os.path.join(b, "resume.safetensors"))
    capsys.readouterr()
    _one_line_error(capsys, svp_main(["train", "--resume", b]), 2, "was not saved with this run's config.yaml")
    # its record damaged (JSON, or a part missing) was a JSONDecodeError / KeyError traceback
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(os.path.join(a, "resume.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for edit, words in ((lambda m: m.update(state="{not json"), "damaged resume state (JSONDecodeError"),
                        (lambda m: m.update(state=m["state"].replace('"s:optimizer"', '"s:optimiser"')),
                         "damaged resume state (no optimizer)"),
                        (lambda m: m.update(state=re.sub(r'"s:global_step": \d+', '"s:global_step": "x"', m["state"])),
                         "damaged resume state (global_step='x', expected a count)"),
                        # hostile records: AttributeError and RecursionError tracebacks (review41)
                        (lambda m: m.update(state='{"__dict__": [1, 2]}'), "damaged resume state (AttributeError"),
                        (lambda m: m.update(state="[" * 100000 + "]" * 100000), "damaged resume state (RecursionError")):
        m = dict(meta)
        edit(m)
        save_file(tensors, os.path.join(b, "resume.safetensors"), metadata=m)
        _one_line_error(capsys, svp_main(["train", "--resume", b]), 2, words)
    open(os.path.join(b, "resume.safetensors"), "wb").write(kept)
    # a comment is no change of a value; a value edited by hand is
    cfg_path = os.path.join(b, "config.yaml")
    text = open(cfg_path).read()
    open(cfg_path, "w").write("# a note of my own\n" + text.replace("seed: 2", "seed: 3"))
    _one_line_error(capsys, svp_main(["train", "--resume", b]), 2, "was not saved with this run's config.yaml")
    open(cfg_path, "w").write("# a note of my own\n" + text)
    # a resume rewrites config.yaml with what it may change (train.epochs, run.changes; debug.* dropped)
    # before its first resume point: killed before that point, the run could not be resumed again
    import yaml
    from svp.engine import config as C
    killed = yaml.safe_load(text)
    killed.pop("debug", None)
    killed["train"]["epochs"] = 3
    killed["run"]["changes"] = [{"step": 1, "epoch": 0, "batch": 1, "changes": {"train.epochs": [2, 3]}}]
    open(cfg_path, "w").write(C.dump(killed))
    assert svp_main(["train", "--resume", b, "train.lr=0.02", "debug.stop_at_step=3"]) == 75
    assert svp_main(["train", "--resume", b]) == 0   # saved after the change: bound to the new config.yaml


def test_a_training_value_edited_by_hand_is_a_recorded_change_from_the_resume_point(tmp_path, capsys):
    """train.lr edited by hand in config.yaml (the digest leaves out what --resume may change) was
    taken unrecorded: the record said the run used it from step 0. It is now the same change as
    `--resume RUN train.lr=...` (same bits, same run.changes), with a warning; and a --resume that
    was stopped before its first resume point (config.yaml already rewritten) resumed again
    records its change once."""
    import yaml
    from safetensors.torch import load_file
    out = tmp_path / "runs"
    args = [*MINI, "--epochs", "2", "--output", str(out), "train.lr=0.01"]
    for name in ("hand", "flag", "twice"):
        assert svp_main(["train", *args, "--name", name, "debug.stop_at_step=3"]) == 75
    want = [{"step": 3, "epoch": 1, "batch": 1, "changes": {"train.lr": [0.01, 0.002]}}]
    assert svp_main(["train", "--resume", str(out / "flag"), "train.lr=0.002", "debug.stop_at_step=null"]) == 0
    cfg_path = out / "hand" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("lr: 0.01", "lr: 0.002"))
    assert svp_main(["train", "--resume", str(out / "hand"), "debug.stop_at_step=null"]) == 0
    log = (out / "hand" / "train.log").read_text()
    assert "config.yaml's train.lr changed since the resume point (edited by hand): taken from global step 3" in log
    # the --resume killed before its first resume point: config.yaml rewritten, the old resume point kept
    cfg_path = out / "twice" / "config.yaml"
    killed = yaml.safe_load(cfg_path.read_text())
    killed["train"]["lr"], killed["run"]["changes"] = 0.002, want
    killed.pop("debug", None)
    cfg_path.write_text(yaml.safe_dump(killed))
    assert svp_main(["train", "--resume", str(out / "twice")]) == 0
    assert "edited by hand" not in (out / "twice" / "train.log").read_text()
    capsys.readouterr()
    finals = {}
    for name in ("hand", "flag", "twice"):
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        assert cfg["train"]["lr"] == 0.002 and cfg["run"]["changes"] == want, (name, cfg["run"])
        res = json.loads((out / name / "results.json").read_text())
        assert [p["peak_lr"] for p in res["lr_phases"]] == [0.01, 0.002], name
        finals[name] = load_file(str(out / name / "final_state.safetensors"))
    for name in ("hand", "twice"):
        assert finals[name].keys() == finals["flag"].keys()
        assert all(torch_equal(finals[name][k], finals["flag"][k]) for k in finals["flag"]), name


def test_a_run_named_by_flags_with_an_emoji_and_a_relative_checkpoint_resumes_from_anywhere(tmp_path, capsys,
                                                                                             monkeypatch):
    """--output 'out🙂' (a character outside the BMP) stopped with a UnicodeEncodeError traceback
    making the folder; a relative --checkpoint was kept as given, and the printed --resume
    command failed from any other folder (file not found), with no way to say where it is."""
    import svp
    bundled = os.path.join(os.path.dirname(svp.__file__), "assets", "vim_mini_patch4_32.safetensors")
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    shutil.copy(bundled, start / "ck.safetensors")
    monkeypatch.chdir(start)
    args = [*MINI, "--epochs", "2", "--output", "out🙂", "--name", "r🙂", "--checkpoint", "ck.safetensors"]
    assert svp_main(["train", *args, "debug.stop_at_step=3"]) == 75, capsys.readouterr().err
    run = start / "out🙂" / "r🙂"
    import yaml
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["checkpoint"] == str(start / "ck.safetensors")
    monkeypatch.chdir(elsewhere)
    os.rename(start / "ck.safetensors", start / "moved.safetensors")   # moved: say how to go on
    capsys.readouterr()
    _one_line_error(capsys, svp_main(["train", "--resume", str(run)]), 2,
                    f"model.checkpoint={str(start / 'ck.safetensors')!r} is not there", "a link to it, back")
    os.symlink(start / "moved.safetensors", start / "ck.safetensors")
    assert svp_main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert json.loads((run / "results.json").read_text())["epochs_run"] == 2


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "1073741824 bytes. Error code 12 (Cannot allocate memory)")])
def test_out_of_memory_is_one_line_and_the_run_log_keeps_the_traceback(tmp_path, capsys, monkeypatch, error):
    """ulimit -v: a traceback through torch's allocator on stderr, exit 1."""
    from svp.engine import loop

    def oom(self):
        raise error
    monkeypatch.setattr(loop.Trainer, "_run", oom)
    rc = svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("svp train: error: out of memory (") and "batch" in err[-1], err
    assert not any("Traceback" in ln for ln in err), err
    other = RuntimeError("some bug")
    monkeypatch.setattr(loop.Trainer, "_run", lambda self: (_ for _ in ()).throw(other))
    with pytest.raises(RuntimeError, match="some bug"):   # a bug keeps its traceback
        svp_main(["train", *MINI, "--output", str(tmp_path), "--name", "r2"])


def test_out_of_memory_building_a_method_names_its_settings_not_the_batch(tmp_path, capsys, monkeypatch):
    """method.settings.hidden=10**9 ran out of memory building the method's tensors and was told to
    use a smaller batch (QA 16a)."""
    import svp.peft as peft

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 256000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(peft, "get_peft_model", oom)
    rc = svp_main(["train", *MINI, "--method", "svp", "method.settings.hidden=8", "--output", str(tmp_path),
                   "--name", "r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("svp train: error: out of memory (building method 'svp' with "
                                          "method.settings={") and "'hidden': 8" in err[-1], err
    assert "256000000000 bytes" in err[-1] and "smaller method.settings" in err[-1] and "batch" not in err[-1], err


def test_a_dataset_of_one_class_is_refused_before_any_step(tmp_path, capsys):
    """It trained to loss 0 and top-1 100%, with nothing to tell apart, and said nothing."""
    for split in ("train", "val", "test"):
        for k in range(4):
            _png8(str(tmp_path / "d" / split / "only" / f"{k}.png"), 40 * k)
    args = [a for a in MINI if a not in ("digits",)]
    args[args.index("--dataset") + 1:args.index("--dataset") + 1] = ["imagefolder"]
    rc = svp_main(["train", *args, "--data-root", str(tmp_path / "d"), "--batch-size", "2",
                   "--output", str(tmp_path / "runs"), "data.img_size=32"])
    _one_line_error(capsys, rc, 2, "imagefolder: the training split has images of 1 class ('only') of 1: "
                                   "a classifier needs images of at least 2")
    assert _no_stub(tmp_path / "runs")
    # a second class with images in val and test only: still one class to learn from
    for split in ("val", "test"):
        _png8(str(tmp_path / "d" / split / "other" / "0.png"), 200)
    rc = svp_main(["train", *args, "--data-root", str(tmp_path / "d"), "--batch-size", "2",
                   "--output", str(tmp_path / "runs"), "data.img_size=32"])
    _one_line_error(capsys, rc, 2, "the training split has images of 1 class ('only') of 2")
    # the first N of a split ordered by class (faces: 60 faces, then 60 others): a debugging run's
    # choice, trained, with a warning
    args = [a if a != "digits" else "faces" for a in MINI]
    assert svp_main(["train", *args, "--output", str(tmp_path / "runs"), "--name", "f"]) == 0
    assert ("data.max_train_samples=16 keeps images of 1 class of the 2 the training split has"
            in (tmp_path / "runs" / "f" / "train.log").read_text())


def test_a_run_ended_by_max_steps_and_one_repeated_from_a_resumed_config_say_so(tmp_path, capsys):
    """A run stopped by train.max_steps finished silently (only results.json said so), and its
    --resume said "the run finished or never saved a resume point"; `--config <run>/config.yaml`
    of a run an earlier --resume changed trained one schedule from step 0, without a word."""
    out = tmp_path / "runs"
    args = [*MINI, "--epochs", "2", "--output", str(out)]
    assert svp_main(["train", *args, "--name", "m", "train.max_steps=3"]) == 0
    assert "stopped at train.max_steps=3 (step 3), in epoch 2 of 2" in open(out / "m" / "train.log").read()
    capsys.readouterr()
    _one_line_error(capsys, svp_main(["train", "--resume", str(out / "m"), "train.max_steps=4"]), 2,
                    "the run finished at train.max_steps (step 3); a finished run is not extended")
    assert svp_main(["train", *args, "--name", "r", "debug.stop_at_step=1"]) == 75
    assert svp_main(["train", "--resume", str(out / "r"), "train.lr=0.002"]) == 0
    assert svp_main(["train", "--config", str(out / "r" / "config.yaml"), "--name", "again"]) == 0
    log = open(out / "again" / "train.log").read()
    assert "records 1 change(s) a --resume made mid-run (run.changes)" in log


def test_a_bad_scan_backend_or_model_name_is_one_line_before_any_run_folder(tmp_path, capsys, monkeypatch):
    """A bad SVP_SCAN_BACKEND was found at the first step's forward, after the run folder was
    written; an unknown model name was reported as "no weights given"."""
    out = tmp_path / "runs"
    monkeypatch.setenv("SVP_SCAN_BACKEND", "bogus")
    _one_line_error(capsys, svp_main(["train", *MINI, "--output", str(out)]), 2, "unknown scan backend 'bogus'")
    assert _no_stub(out)
    monkeypatch.delenv("SVP_SCAN_BACKEND")
    args = [a if a != "vim_mini_patch4_32" else "vim_nosuch" for a in MINI]
    _one_line_error(capsys, svp_main(["train", *args, "--output", str(out)]), 2,
                    "model 'vim_nosuch': no such model; the Vim models:")
    assert _no_stub(out)


def test_a_lost_torchrun_peer_is_one_line_with_the_resume_command(monkeypatch, tmp_path):
    """A kill -9 of one torchrun worker left gloo's traceback in the other's train.log and on its
    stderr (checked by hand with two processes: "stopped: rank 0 lost its connection ..." now).
    Without torchrun, or for other errors, nothing is converted."""
    from svp.engine.distributed import DistInfo
    from svp.engine.rundir import lost_peer
    from svp.errors import PeerError
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:14556: Connection reset by "
                        "peer. This is typically caused by a remote worker hanging or bugs in the application.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    e = lost_peer(gloo, DistInfo(rank=1, world_size=2, enabled=True), "/runs/r")
    assert isinstance(e, PeerError) and e.exit_code == 1
    assert str(e).startswith("rank 1 lost its connection to another process of this torchrun job "
                             "(Connection reset by peer)")
    # the resume command only where a resume point is there: one killed before the first said "resume", which then
    # found nothing (review 65)
    run = tmp_path / "r"
    run.mkdir()
    e = lost_peer(gloo, DistInfo(rank=1, world_size=2, enabled=True), str(run))
    assert str(e).endswith("It stopped before any resume point was written; start the run again"), str(e)
    (run / "resume.safetensors").write_bytes(b"")
    e = lost_peer(gloo, DistInfo(rank=1, world_size=2, enabled=True), str(run))
    assert str(e).endswith(f"torchrun --nproc_per_node=2 -m svp train --resume {run}"), str(e)
    assert lost_peer(gloo, DistInfo(), "/runs/r") is None
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
                     DistInfo(rank=0, world_size=2, enabled=True), "/runs/r") is None


def test_a_default_run_name_of_a_dataset_with_a_slash_is_one_folder(tmp_path):
    """runs/hta/cub200-svp-... (a subfolder per benchmark, an empty runs/hta left after a failed
    start) where training.md and --help show runs/hta_cub200-svp-..."""
    from svp.engine.config import defaults
    from svp.engine.runlock import claim_run_dir
    cfg = defaults()
    cfg["run"]["output"] = str(tmp_path)
    cfg["data"]["dataset"] = "hta/cub200"
    run_dir, lock, created = claim_run_dir(cfg)
    lock.release()
    assert os.path.dirname(run_dir) == str(tmp_path) and os.path.basename(run_dir).startswith("hta_cub200-svp-s0-")


def test_a_spawned_loader_worker_lets_a_first_ctrl_c_pass_as_a_forked_one_does():
    """macOS and Windows start DataLoader workers with spawn: a worker then had Python's default
    SIGINT handler, not the run's (which a forked worker inherits), and died on a terminal's
    Ctrl-C, which reaches every process of the group: the main process lost the batch it waited
    for and the run crashed with no resume point. Every loader svp makes sets the workers'
    handlers itself (here evaluate's, with num_workers=1, under spawn)."""
    import multiprocessing as mp

    import torch
    from proc_helpers import SignalsItself
    from svp.engine.distributed import DistInfo
    from svp.engine.evaluate import evaluate
    old = mp.get_start_method(allow_none=True)
    mp.set_start_method("spawn", force=True)
    try:
        res = evaluate(torch.nn.Linear(3, 2), SignalsItself(4), None, 2, "cpu", DistInfo(), num_workers=1)
    finally:
        mp.set_start_method(old, force=True)
    assert res["n"] == 4   # (a Ctrl-C while a worker starts: test_cli_train's spawned-workers test)


def test_the_svp_command_escapes_what_the_consoles_code_page_lacks(monkeypatch):
    """Windows writes redirected output in its ANSI code page (cp1252 here): `svp predict`
    stopped with a UnicodeEncodeError at the first image named outside it. The command's
    streams write such a character as an escape."""
    import io
    import sys

    from svp.cli import _lenient_output
    out = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", out)
    _lenient_output()
    print("imgs/图.png\tcat", file=sys.stdout)
    out.flush()
    assert out.buffer.getvalue() == b"imgs/\\u56fe.png\tcat\n"
    # a C locale without UTF-8 mode: ASCII with surrogateescape, which failed on 'é' (svp predict
    # stopped at the first such class name); a name Python could not decode keeps its bytes
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="surrogateescape")
    monkeypatch.setattr(sys, "stdout", out)
    _lenient_output()
    print("caf\udcc3\udca9.png\tcafé ±", file=sys.stdout)
    out.flush()
    assert out.buffer.getvalue() == b"caf\xc3\xa9.png\tcaf\\xe9 \\xb1\n"


def test_a_full_disk_is_one_line_wherever_it_stops_a_write(tmp_path, capsys, monkeypatch):
    """ENOSPC from a write()/fsync() names no file, and safetensors raises its own error for
    it: both ended `svp train` with a traceback and exit 1; a read-only folder's one line was
    buried under a traceback from removing the lock; a failed train.log line printed logging's
    traceback each time; a sweep whose results.csv could not be written, a traceback."""
    import errno

    import torch

    import svp.io as sio
    from svp.engine import sweep as S
    from svp.engine.progress import log, setup_logging, teardown_logging
    from svp.engine.runlock import RunLock
    from svp.errors import ConfigError
    full = OSError(errno.ENOSPC, "No space left on device")
    real_fsync = os.fsync

    def fsync(fd):   # the resume point at the end of the epoch, after the adapters
        fsync.calls += 1
        if fsync.calls > 4:
            raise full
        real_fsync(fd)
    fsync.calls = 0
    monkeypatch.setattr(sio.os, "fsync", fsync)
    _one_line_error(capsys, svp_main(["train", *MINI, "--output", str(tmp_path / "runs"), "--name", "f"]), 2,
                    "run folder", "No space left on device")
    monkeypatch.setattr(sio.os, "fsync", real_fsync)
    # safetensors' error for it: an OSError naming the file
    import safetensors.torch

    class SafetensorError(Exception):
        pass

    def save_file(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError) as e:
        sio.atomic_save_safetensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "a.safetensors")
    # the lock of a folder made read-only: released, its file left
    lock = RunLock(str(tmp_path)).acquire("train")
    monkeypatch.setattr("svp.engine.runlock.os.unlink", lambda p: (_ for _ in ()).throw(PermissionError(13, "no")))
    lock.release()
    assert not lock.held
    monkeypatch.undo()
    # train.log: said once on stderr
    handlers = setup_logging(str(tmp_path), True)
    try:
        class FullDisk:
            def write(self, text):
                raise full

            def flush(self):   # (what it could not write is still buffered: closing flushes again)
                raise full

            def close(self):
                raise full
        [fh] = [h for h in handlers if isinstance(h, logging.FileHandler)]
        fh.stream.close()
        fh.stream = FullDisk()
        log.info("one")
        log.info("two")
    finally:
        teardown_logging(handlers)
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "Logging error" not in err and "No space left" in err
    # the sweep's tables
    S.write_outputs(str(tmp_path), "mini", [], [("digits", "mini")], ["linear"], [0])
    before = {f: (tmp_path / f).read_bytes() for f in ("results.csv", "results.md")}
    import svp.io as sio
    real_temp = sio._write_temp
    # the disk fills as results.md is written: the three files are one group, every old one stays
    # (each was whole, but a results.csv of this sweep stood beside the results.md of the last: review)
    monkeypatch.setattr(sio, "_write_temp", lambda path, write: (_ for _ in ()).throw(full)
                        if path.endswith("results.md") else real_temp(path, write))
    row = {"method": "linear", "dataset": "digits", "seed": 0, "status": "ok", "val_selected_test_top1": 50.0}
    with pytest.raises(ConfigError, match=r"cannot write the sweep's results \(No space left on device\).*reuses them"):
        S.write_outputs(str(tmp_path), "mini", [row], [("digits", "mini")], ["linear"], [0])
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".svp-tmp")]   # no temporary left


def test_a_second_signal_while_workers_start_stops_once_they_have_started(monkeypatch):
    """A second Ctrl-C raised mid-start (spawned workers) left a half-built loader and a cut-off
    pickle that a worker, ignoring the signal while it starts, read and printed a traceback for:
    it is raised once the start is done."""
    import signal

    from svp.engine import signals
    from svp.engine.signals import Signals, starting_workers
    monkeypatch.setattr(signals, "SAME_SIGNAL_S", 0.0)   # (second presses, not copies)
    s = Signals()
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with starting_workers():
            s._handle(signal.SIGINT, None)
            s._handle(signal.SIGINT, None)
            reached.append("the rest of the start")
    assert reached and s.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):   # elsewhere: at once
        s._handle(signal.SIGINT, None)


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="no signal masks (Windows)")
def test_a_signal_while_a_worker_is_spawned_is_handled_and_the_worker_starts_with_it_blocked(monkeypatch):
    """The parent ignored SIGINT/SIGTERM for each worker's fork + exec, so that the worker started
    with them ignored: a Ctrl-C in those milliseconds was lost, the sweep's workers ignoring it too,
    and a sweep went on to its end (CI). Now the parent blocks them there (a signal waits) and the
    child inherits the mask through exec."""
    import multiprocessing.spawn as spawn
    import multiprocessing.util as mpu
    import signal

    from svp.engine.signals import starting_workers
    real = mpu.spawnv_passfds

    def signalled_spawn(path, args, passfds):
        os.kill(os.getpid(), signal.SIGINT)   # (as a terminal's Ctrl-C, to the process)
        return real(path, args, passfds)
    monkeypatch.setattr(mpu, "spawnv_passfds", signalled_spawn)
    code = ("import signal, sys; m = signal.pthread_sigmask(signal.SIG_BLOCK, []); "
            "sys.exit((signal.SIGINT in m) + 2 * (signal.SIGTERM in m))")
    got = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        with starting_workers():
            exe = spawn.get_executable()   # (as multiprocessing gives it: bytes on Python >= 3.11)
            pid = mpu.spawnv_passfds(exe, [exe, "-c", code], [])
        _, status = os.waitpid(pid, 0)
        for _ in range(100):   # (one another thread took is handled at the main thread's next bytecodes)
            if got:
                break
    finally:
        signal.signal(signal.SIGINT, old)
    assert got == [signal.SIGINT]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, status   # both blocked in the child
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])   # and unblocked here again


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="no signal masks (Windows)")
@pytest.mark.parametrize("kind", ["loader", "sweep"])
def test_a_worker_unblocks_the_signals_it_started_with_once_its_handler_is_in(monkeypatch, kind):
    """A spawned worker starts with SIGINT/SIGTERM blocked (above): a DataLoader worker then takes a
    first signal as the run does (noted, a second one raises), a sweep's worker ignores them (the
    sweep stops its runs through the stop value); one that came while it started is handled then."""
    import signal
    import types

    from svp.engine import signals, tune
    monkeypatch.setattr(signals, "_worker_first_at", None)
    monkeypatch.setattr(signals, "_stop_value", None)
    monkeypatch.setattr(tune, "_watch_parent", lambda *a: None)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
    try:
        signal.raise_signal(signal.SIGINT)   # (to this thread: it waits)
        if kind == "loader":
            signals.loader_worker_init(0)
            assert signals._worker_first_at is not None   # the signal that came while it started
            assert signal.getsignal(signal.SIGTERM) is signals._worker_handle
        else:
            tune._worker_init(types.SimpleNamespace(value=0), os.getpid())
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        now = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.SIGINT not in now and signal.SIGTERM not in now
    finally:
        for s in old:
            signal.signal(s, signal.SIG_IGN)   # (a signal still waiting, where the worker left it blocked, is dropped)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@pytest.mark.parametrize("kind", ["run", "sweep", "worker"])
def test_copies_of_the_first_signal_are_not_a_second_one(monkeypatch, kind):
    """One Ctrl-C reached a run two or three times when a wrapper passed it on to the group it was
    already in (`timeout 600 svp train`, `torchrun`: SIGINT, then SIGTERM on its own second copy),
    and each copy was taken as a second press: the run stopped at once, without the resume point
    of the step under way. Signals within SAME_SIGNAL_S of the first are that one; later, a second."""
    import signal
    import types

    from svp.engine import signals
    now = [100.0]
    monkeypatch.setattr(signals, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    if kind == "run":
        s = signals.Signals()
        handle = s._handle
    elif kind == "sweep":
        s = signals.StopRequest(types.SimpleNamespace(value=0))
        handle = s._handle
    else:
        monkeypatch.setattr(signals, "_worker_first_at", None)
        handle = signals._worker_handle
    handle(signal.SIGINT, None)
    for dt, sig in ((0.001, signal.SIGINT), (0.2, signal.SIGTERM), (signals.SAME_SIGNAL_S - 0.01, signal.SIGINT)):
        now[0] = 100.0 + dt
        handle(sig, None)   # the same press: nothing raised
    if kind == "run":
        assert s.received == signal.SIGINT
    now[0] = 100.0 + signals.SAME_SIGNAL_S
    with pytest.raises(KeyboardInterrupt):
        handle(signal.SIGINT, None)


def test_a_copy_that_comes_while_a_stopping_run_puts_its_handlers_back_is_not_a_second_press():
    """A run that saved and stops puts the old handlers back: a copy of the first signal still on
    its way (torchrun's SIGTERM comes after its own second copy) would then be taken by Python's
    default handler as a second press. restore() waits COPIES_WAIT_S after the first, taking any
    signal meanwhile as a copy."""
    import signal
    import threading
    import time

    from svp.engine import signals
    before = signal.getsignal(signal.SIGINT)
    s = signals.Signals().install()
    s._handle(signal.SIGINT, None)   # the first (as its handler would take it)
    threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    s.restore()   # nothing raised
    assert time.monotonic() - t0 >= signals.COPIES_WAIT_S - 0.01
    assert signal.getsignal(signal.SIGINT) is before and s.received == signal.SIGINT


def test_a_second_signal_that_comes_inside_a_finalizer_is_raised_after_it_not_lost(monkeypatch, capfd):
    """A second Ctrl-C raised its KeyboardInterrupt inside a DataLoader iterator's __del__ (joining
    its workers as the run stopped): Python printed "Exception ignored in ..." with the traceback
    and dropped it (review46, 1 of 7 double Ctrl-Cs). It is raised once the finalizer returned."""
    import signal
    import sys
    import time

    from svp.engine import signals
    s = signals.Signals().install()
    try:
        s._handle(signal.SIGINT, None)   # the first
        monkeypatch.setattr(signals, "SAME_SIGNAL_S", 0.0)

        class JoinsItsWorkers:
            def __del__(self):
                s._handle(signal.SIGINT, sys._getframe())   # the second, as if it came in here

        with pytest.raises(KeyboardInterrupt):
            JoinsItsWorkers()   # (freed at once)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:
                time.sleep(0.01)
        assert time.monotonic() - t0 < 2
        assert "Exception ignored" not in capfd.readouterr().err
    finally:
        monkeypatch.setattr(signals, "COPIES_WAIT_S", 0.0)
        s.restore()


def test_an_image_size_other_than_the_weights_own_is_said_in_the_log(tmp_path, capsys):
    """The mini Vim on an imagefolder dataset trained at data.img_size's default 224 px (its
    weights are 32 px ones: 49x the cost of a step), without a word."""
    args = [*MINI, "--output", str(tmp_path), "train.max_steps=1"]
    assert svp_main(["train", *args, "--name", "big", "data.img_size=64"]) == 0
    assert svp_main(["train", *args, "--name", "own"]) == 0
    big, own = ((tmp_path / n / "train.log").read_text() for n in ("big", "own"))
    assert "data.img_size=64, while vim_mini_patch4_32's weights were trained at 32 px" in big
    assert "weights were trained at" not in own


def test_a_resumed_run_tells_tensorboard_to_drop_what_came_after_its_resume_point(tmp_path, monkeypatch, capsys):
    """TensorBoard kept a stopped or killed attempt's steps after the resume point beside the
    resumed ones (different values after --resume train.lr=...); epoch scalars were stepped by
    epoch number, which no purge by step reaches (QA 15e). A stand-in for torch's SummaryWriter
    (tensorboard is not a test dependency) records what the run asks of it; TensorBoard's own
    purge_step discards events at or after it."""
    import sys
    import types
    writers = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.purge_step, self.scalars, self.closed = purge_step, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def close(self):
            self.closed = True
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    args = ["train", *MINI, "--output", str(tmp_path), "--name", "tb", "--epochs", "3", "run.tensorboard=true",
            "run.log_every=1", "data.max_train_samples=24"]
    assert svp_main(args + ["debug.stop_at_step=4"]) == 75
    run = tmp_path / "tb"
    assert svp_main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    first, second = writers
    assert first.purge_step is None and second.purge_step == 5 and first.closed and second.closed
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9]
    epoch_steps = sorted({s for w in writers for t, s in w.scalars if t.startswith("epoch/")})
    assert epoch_steps == steps   # on the step axis the purge covers
    assert sorted(s for t, s in second.scalars if t == "train/loss") == [5, 6, 7, 8, 9]


def test_an_error_mid_epoch_is_said_on_a_line_of_its_own_not_after_the_bar(tmp_path, capsys):
    """A non-finite stop (or a second signal) mid-epoch printed its message onto the end of the
    progress bar's last frame: the bar was closed only when an epoch ended or was stopped on
    request (QA 15e)."""
    args = ["train", *MINI, "--output", str(tmp_path), "--name", "nan", "run.progress=bar", "run.log_every=1",
            "debug.nan_at_step=2"]
    assert svp_main(args) == 3
    err = capsys.readouterr().err
    at = err.index("svp train: error: non-finite loss")
    assert "epoch 1/1" in err[:at] and err[at - 1] in "\r\n", repr(err[max(0, at - 120):at + 40])


def test_the_step_lines_show_the_epochs_mean_loss_so_far_as_on_cuda(tmp_path, capsys):
    """On one CUDA device the losses are summed on the device and the shown loss is the epoch's
    mean so far; the CPU showed the last step's loss under the same name (QA 15e). The last
    step's line now gives the epoch's train_loss."""
    args = ["train", *MINI, "--output", str(tmp_path), "--name", "m", "--epochs", "2", "run.progress=lines",
            "run.log_every=1", "data.max_train_samples=32"]
    assert svp_main(args) == 0
    capsys.readouterr()
    run = tmp_path / "m"
    shown = re.findall(r"epoch (\d)/2 step (\d+)/(\d+) loss ([0-9.]+)", (run / "train.log").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        last = [float(loss) for e, s, n, loss in shown if int(e) == rec["epoch"] and s == n]
        assert last == [round(rec["train_loss"], 4)], (last, rec["train_loss"])
    first_steps = [float(loss) for e, s, n, loss in shown if s == "1"]
    assert len(first_steps) == 2 and all(f != round(r["train_loss"], 4) for f, r in zip(first_steps, records))


@pytest.mark.slow
def test_a_run_that_diverges_before_its_first_resume_point_says_to_start_again(tmp_path, capsys):
    """QA 16b: full fine-tuning at lr 1e3 breaks at step 2. The state before it comes after step 1
    at that rate (|w| ~ 1e3): made the resume point, it broke again at any rate (train.lr=0 too),
    against the message's advice. It stays in nonfinite/; no resume point is written, and the run
    starts again under its name with a lower rate. A run broken by its first step keeps that
    state, the run's start, as its resume point."""
    out = tmp_path / "runs"
    base = [*MINI, "--method", "full", "--epochs", "2", "--output", str(out), "--name", "f"]
    rc = svp_main(["train", *base, "train.lr=1e3"])
    err = capsys.readouterr().err
    run = out / "f"
    assert rc == 3 and "at step 2 (epoch 1" in err, err
    assert "start the run again with a lower train.lr" in err and "may already be spoilt" in err, err
    assert not (run / "resume.safetensors").exists()
    assert _all_finite(run / "nonfinite" / "resume_before_step.safetensors")
    assert svp_main(["train", *base, "train.lr=1e-4"]) == 0, capsys.readouterr().err
    assert json.loads((run / "results.json").read_text())["epochs_run"] == 2
    # the attempt's dump and log set aside, numbered alike: the finished run does not look diverged (review)
    assert not (run / "nonfinite").exists() and (run / "nonfinite.1" / "nonfinite.json").is_file()
    assert "non-finite loss" in (run / "train.log.1").read_text()
    rc = svp_main(["train", *MINI, "--method", "full", "--output", str(out), "--name", "g", "train.lr=1e39"])
    err = capsys.readouterr().err
    assert rc == 3 and "at step 1 (epoch 1" in err and "a resume point before the step is in" in err, err
    from svp.engine.checkpoint import load_state
    assert load_state(str(out / "g" / "resume.safetensors"))["global_step"] == 0


def test_best_is_the_finished_runs_selection_after_a_kill_between_best_and_its_resume_point(tmp_path,
                                                                                          monkeypatch):
    """best/ is written before its epoch's resume point: a run killed between the two and resumed
    with a change --resume accepts kept the killed attempt's best/ (epoch 2), while results.json
    and metrics.jsonl selected epoch 1 (review of engine/loop.py)."""
    import torch
    from safetensors.torch import load_file

    from svp.engine import rundir

    class Killed(BaseException):
        pass

    real = rundir.RunFolder.save_adapter

    def save_adapter(self, model, name, spec, epoch):
        real(self, model, name, spec, epoch)
        if name == "best" and epoch >= 2:
            raise Killed(epoch)   # as a kill -9 there: best/ written, the epoch's resume point not
    monkeypatch.setattr(rundir.RunFolder, "save_adapter", save_adapter)
    args = [*MINI, "--epochs", "3", "data.max_train_samples=64", "data.max_eval_samples=64", "eval.metric=loss",
            "--lr", "0.05", "--output", str(tmp_path), "--name", "r"]
    with pytest.raises(Killed):
        svp_main(["train", *args])
    run = tmp_path / "r"
    assert json.loads((run / "best" / "backbone.json").read_text())["epoch"] == 2
    killed = load_file(str(run / "best" / "adapter.safetensors"))
    monkeypatch.setattr(rundir.RunFolder, "save_adapter", real)
    assert svp_main(["train", "--resume", str(run), "train.epochs=1"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["val_selected"]["epoch"] == 1
    assert json.loads((run / "best" / "backbone.json").read_text())["epoch"] == 1
    best, last = (load_file(str(run / d / "adapter.safetensors")) for d in ("best", "last"))
    assert all(torch.equal(best[k], last[k]) for k in best)   # epoch 1 is the last and the selected one
    assert not all(torch.equal(best[k], killed[k]) for k in best)


def test_svps_loaders_spawn_their_workers_where_the_start_method_is_forkserver():
    """Under forkserver (Linux's default from Python 3.14) a server svp started while its workers
    start (SIGINT/SIGTERM blocked: engine.signals) kept them blocked for the program's life, and a
    later, unrelated child forked from it could not be terminated; a server started before svp
    forked workers that ran their start unprotected, and a Ctrl-C ended the run as "cannot start
    ... (Broken pipe)" (review44). svp's loaders spawn their workers there instead."""
    import multiprocessing as mp

    from svp.engine.distributed import Loader
    old = mp.get_start_method(allow_none=True)
    try:
        for method, expected in (("forkserver", "spawn"), ("spawn", None), ("fork", None)):
            mp.set_start_method(method, force=True)
            loader = Loader(list(range(4)), batch_size=2, num_workers=1)
            got = loader.multiprocessing_context
            assert (got.get_start_method() if got is not None else None) == expected, method
        assert Loader(list(range(4)), batch_size=2).multiprocessing_context is None   # (no workers)
        # a program that has not chosen still may after a Loader is built: asking fixed it (review46)
        mp.set_start_method(None, force=True)
        Loader(list(range(4)), batch_size=2, num_workers=1)
        assert mp.get_start_method(allow_none=True) is None
        mp.set_start_method("spawn")   # (raised "context has already been set")
    finally:
        mp.set_start_method(old, force=True)
