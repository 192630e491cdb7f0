"""Atomic writes: the target is either the old file or the complete new one."""
import json
import logging
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from svp.io import atomic_save_safetensors, atomic_write, atomic_write_json, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": 2, "trunc')
        raise KeyboardInterrupt  # an interruption in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_written_files_are_complete_and_get_the_mode_open_would_give(tmp_path):
    """Every file was 0644 whatever the umask: under umask 077 resume points and adapters were
    world-readable, under a group project's 002 without group write; a replaced file keeps its
    mode (review of svp.io)."""
    path = tmp_path / "sub" / "w.safetensors"
    old = os.umask(0o022)
    try:
        atomic_save_safetensors(path, {"x": torch.arange(6.0).view(2, 3).t()}, metadata={"k": "v"})
        assert torch.equal(load_file(str(path))["x"], torch.arange(6.0).view(2, 3).t())
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        for mask, mode in ((0o077, 0o600), (0o002, 0o664)):
            os.umask(mask)
            atomic_write_text(tmp_path / f"new{mask:o}.txt", "x")
            assert stat.S_IMODE(os.stat(tmp_path / f"new{mask:o}.txt").st_mode) == mode
        os.chmod(path, 0o640)
        os.umask(0o022)
        atomic_save_safetensors(path, {"x": torch.zeros(1)})
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_folder_replaced_over_a_link_or_a_file_leaves_no_temporary(tmp_path):
    """atomic_replace_dir moved a link (or file) at the target aside, swapped the new folder in,
    then failed in rmtree of the link; remove_stale_temps then said it removed that temporary,
    which stayed (review of svp.io)."""
    from svp.io import atomic_replace_dir, remove_stale_temps
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere, run / "best")
    (run / "last").write_text("a file where a folder goes")

    def write(d):
        with open(os.path.join(d, "adapter.txt"), "w") as f:
            f.write("new")
    for name in ("best", "last"):
        atomic_replace_dir(write, run / name)
        assert (run / name / "adapter.txt").read_text() == "new" and not (run / name).is_symlink()
    assert sorted(os.listdir(run)) == ["best", "last"]
    assert (elsewhere / "keep.txt").read_text() == "mine"   # the link went, not what it pointed to
    os.symlink(elsewhere, run / ".svp-tmp-new-x")   # a new folder's temporary, a link here
    assert remove_stale_temps(str(run)) == [str(run / ".svp-tmp-new-x")]
    assert sorted(os.listdir(run)) == ["best", "last"] and (elsewhere / "keep.txt").exists()


def test_writes_flush_through_a_handle_that_may_write_and_keep_a_c_locale_paths_bytes(tmp_path, monkeypatch):
    """Windows flushes a file only through a handle open for writing (FlushFileBuffers): svp
    fsynced a read-only one, so every write it makes failed there with EBADF (simulated: an fsync
    refusing read-only descriptors). A path Python decoded under LC_ALL=C holds its non-ASCII bytes
    as lone surrogates: writing it (results.csv's run_dir column) failed 'surrogates not allowed'."""
    import errno
    import fcntl

    import svp.io as sio
    real_fsync = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)
    monkeypatch.setattr(sio.os, "fsync", windows_fsync)
    name = "r\udcc3\udcbcn"   # "rün" as Python decodes it under LC_ALL=C
    path = sio.atomic_write_text(tmp_path / "a.csv", f"run_dir\n{name}\n")
    with open(path, "rb") as f:
        assert f.read() == "run_dir\nrün\n".encode("utf-8")
    # train.log's "run folder: ..." line: a logging error and the line lost
    from svp.engine.progress import log, setup_logging, teardown_logging
    handlers = setup_logging(str(tmp_path), True)
    try:
        monkeypatch.setattr(logging, "raiseExceptions", False)   # a lost line, not a traceback on stderr
        log.info("run folder: %s", name)
    finally:
        teardown_logging(handlers)
    assert (tmp_path / "train.log").read_bytes().endswith("run folder: rün\n".encode("utf-8"))


def test_safetensors_files_of_the_same_content_have_the_same_bytes(tmp_path):
    """safetensors writes the metadata keys in the order of a hash map seeded afresh for each
    map: two identical `svp pretrain --export` runs gave files of other bytes and sha256."""
    import torch
    from safetensors import safe_open
    from svp.io import atomic_save_safetensors
    meta = {k: str(i) for i, k in enumerate("qwertyuiop")}
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        atomic_save_safetensors(str(f), tensors, metadata=meta)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == meta and f.get_tensor("b").tolist() == [0.0, 1.0, 2.0]


def test_a_target_named_near_the_file_name_limit_is_written(tmp_path):
    """Its temporary's prefix (~25 bytes) took the name past 255 bytes: a valid --out of 231-255
    bytes was refused as "File name too long"."""
    from svp.io import is_temp_name, temp_name
    for name in ("g" * 251 + ".png", "é" * 125 + ".png"):   # 255 and 254 bytes
        atomic_write_json(tmp_path / name, {"n": len(name)})
        assert json.loads((tmp_path / name).read_text()) == {"n": len(name)}
        tmp = os.path.basename(temp_name(str(tmp_path / name)))
        assert is_temp_name(tmp) and len(os.fsencode(tmp)) <= 255 and name[:100] in tmp
    assert sorted(os.listdir(tmp_path)) == sorted(["g" * 251 + ".png", "é" * 125 + ".png"])


def test_a_folder_that_cannot_be_made_names_the_file_or_dangling_link_in_the_way(tmp_path):
    from svp.io import mkdir_error
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    for path, words in ((tmp_path / "afile" / "sub" / "deeper", f"{tmp_path / 'afile'} is a file, not a folder"),
                        (tmp_path / "dangling", f"{tmp_path / 'dangling'} is a link to nothing"),
                        (tmp_path / "dangling" / "x", f"{tmp_path / 'dangling'} is a link to nothing")):
        with pytest.raises(OSError) as e:
            os.makedirs(path, exist_ok=True)
        assert mkdir_error(path, e.value) == words, (path, e.value)


def test_a_folder_whose_write_fails_leaves_the_old_one_and_no_temporary(tmp_path):
    """A file-size limit (ulimit -f) stopped writing best/: the empty .svp-tmp-new-best stayed."""
    import errno

    from svp.io import atomic_replace_dir

    def good(d):
        (open(os.path.join(d, "a.txt"), "w")).write("old")

    def too_large(d):
        open(os.path.join(d, "a.txt"), "w").write("partial")
        raise OSError(errno.EFBIG, "File too large")
    final = tmp_path / "best"
    atomic_replace_dir(good, str(final))
    with pytest.raises(OSError, match="File too large"):
        atomic_replace_dir(too_large, str(final))
    assert os.listdir(tmp_path) == ["best"] and (final / "a.txt").read_text() == "old"

    def full(d):   # the error names the file the user knows, not the temporary's (review38)
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(d, "adapter.safetensors"))
    with pytest.raises(OSError) as e:
        atomic_replace_dir(full, str(final))
    assert e.value.filename == str(final / "adapter.safetensors")


def test_every_path_argument_expands_a_leading_tilde(tmp_path, monkeypatch):
    """The shell expands ``~`` only at a word's start: ``--out=~/runs`` and a quoted "~/x" reached
    svp as a folder named ``~`` under the current one (a run written to ./~/runs)."""
    from svp.cli import build_parser
    from svp.viz.cli import _parse_adapter
    monkeypatch.setenv("HOME", str(tmp_path))
    home = str(tmp_path)
    parser = build_parser()
    cases = [
        (["train", "--config=~/c.yaml", "--resume=~/run"], {"config": [f"{home}/c.yaml"], "resume": f"{home}/run"}),
        (["eval", "~/ad", "--dataset", "digits", "--data-root=~/data"],
         {"adapter_dirs": [f"{home}/ad"], "data_root": f"{home}/data"}),
        (["predict", "~/ad", "~/a.png", "b.png", "--checkpoint=~/w.pth"],
         {"adapter_dir": f"{home}/ad", "images": [f"{home}/a.png", "b.png"], "checkpoint": f"{home}/w.pth"}),
        (["sweep", "--suite", "vtab", "--output=~/sw", "--config=~/c.yaml", "--data-root=~/d",
          "--checkpoint=~/w.pth"],
         {"output": f"{home}/sw", "config": [f"{home}/c.yaml"], "data_root": f"{home}/d",
          "checkpoint": f"{home}/w.pth"}),
        (["serve", "--adapters=~/ads", "--checkpoint=~/w.pth"],
         {"adapters": f"{home}/ads", "checkpoint": f"{home}/w.pth"}),
        (["visualize", "~/i.png", "--root=~/d", "--checkpoint=~/w", "--mask=~/m.png", "--out=~/viz"],
         {"image": f"{home}/i.png", "data_root": f"{home}/d", "checkpoint": f"{home}/w", "mask": f"{home}/m.png",
          "out": f"{home}/viz"}),
        (["pretrain", "--out=~/pre", "--export=~/pre.safetensors"],
         {"out": f"{home}/pre", "export": f"{home}/pre.safetensors"}),
        (["data", "check", "digits", "--root=~/d", "--file=~/l.csv"], {"root": f"{home}/d", "file": f"{home}/l.csv"}),
        (["data", "grid", "digits", "--root=~/d", "--out=~/g.png"], {"root": f"{home}/d", "out": f"{home}/g.png"}),
        (["demo", "--out=~/demo", "--preset-out=~/p.json"], {"out": f"{home}/demo", "preset_out": f"{home}/p.json"}),
        (["export", "~/ad", "-o", "~/m.safetensors", "--checkpoint=~/w.pth"],
         {"adapter_dir": f"{home}/ad", "output": f"{home}/m.safetensors", "checkpoint": f"{home}/w.pth"}),
        (["convert-official-svp", "~/c.pth", "--model", "m", "--shared-layers", "1", "--prompt-hidden", "1",
          "--num-classes", "2", "--out=~/o", "--backbone-checkpoint=~/b.pth", "--class-names=~/n.txt"],
         {"checkpoint": f"{home}/c.pth", "out": f"{home}/o", "backbone_checkpoint": f"{home}/b.pth",
          "class_names": f"{home}/n.txt"}),
    ]
    for argv, want in cases:
        args = parser.parse_args(argv)
        assert {k: getattr(args, k) for k in want} == want, argv
    assert _parse_adapter("a=~/ad") == ("a", f"{home}/ad")
    assert _parse_adapter("~/ad") == ("ad", f"{home}/ad")
    assert parser.parse_args(["eval", "runs/~x", "--dataset", "digits"]).adapter_dirs == ["runs/~x"]   # only a leading ~


def test_a_folder_swap_never_leaves_the_folder_missing(tmp_path, monkeypatch):
    """atomic_replace_dir renamed the old folder away, then the new one in: a reader between the
    two renames (svp eval/predict of runs/<run>/best while the run saved it) found no folder. On
    Linux the two are swapped in one step (renameat2 RENAME_EXCHANGE); elsewhere, or where the
    file system refuses it, the two renames remain."""
    import sys
    import svp.io as sio
    final = str(tmp_path / "best")

    def write(text):
        return lambda d: open(os.path.join(d, "x"), "w").write(text)
    sio.atomic_replace_dir(write("1"), final)
    real_replace = os.replace
    missing = []

    def watched(src, dst):   # (each rename: is the folder there just before it)
        missing.append(not os.path.isdir(final))
        real_replace(src, dst)
    monkeypatch.setattr(sio.os, "replace", watched)
    real_rmtree = sio.shutil.rmtree
    monkeypatch.setattr(sio.shutil, "rmtree", lambda p, *a, **k: missing.append(not os.path.isdir(final))
                        or real_rmtree(p, *a, **k))
    sio.atomic_replace_dir(write("2"), final)
    assert open(os.path.join(final, "x")).read() == "2" and os.listdir(tmp_path) == ["best"]
    if sys.platform.startswith("linux"):
        assert sio._exchange is not None and missing == [False], missing   # one rmtree, of the old folder
    # the fallback: two renames, the same result
    monkeypatch.setattr(sio, "_exchange", lambda a, b: False)
    sio.atomic_replace_dir(write("3"), final)
    assert open(os.path.join(final, "x")).read() == "3" and os.listdir(tmp_path) == ["best"]
    # killed after the swap, before the old folder was removed: the new one stands, the old is a
    # temporary that remove_stale_temps clears
    monkeypatch.undo()

    def killed(p, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(sio.shutil, "rmtree", killed)
    if sys.platform.startswith("linux"):
        with pytest.raises(KeyboardInterrupt):
            sio.atomic_replace_dir(write("4"), final)
        monkeypatch.undo()
        assert open(os.path.join(final, "x")).read() == "4"
        assert sio.remove_stale_temps(str(tmp_path)) and os.listdir(tmp_path) == ["best"]


def test_a_missing_adapter_folder_is_called_missing(tmp_path):
    from svp.build import adapter_spec
    from svp.errors import ConfigError
    with pytest.raises(ConfigError, match=r"'.*nothing': no such folder"):
        adapter_spec(str(tmp_path / "nothing"))
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"'.*f': a file, not a folder"):
        adapter_spec(str(tmp_path / "f"))


def test_a_rename_is_made_durable_by_a_folder_fsync(tmp_path, monkeypatch):
    """The temporary was fsync'ed, never the folder after the rename: after a power loss a resume
    point reported saved could come back as the old one (review of svp.io). POSIX only. The order
    is what matters: the parent's fsync after the last rename (or folder exchange), on a first
    write and on one that replaces what is there."""
    import svp.io as sio
    if os.name == "nt":
        pytest.skip("Windows has no folder fsync")
    events = []
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, sio._exchange

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(a, b):
        real_replace(a, b)
        events.append(("rename", os.path.basename(os.fspath(b))))

    def exchange(a, b):
        done = real_exchange(a, b)
        if done:
            events.append(("rename", os.path.basename(os.fspath(b))))
        return done
    monkeypatch.setattr(sio.os, "fsync", fsync)
    monkeypatch.setattr(sio.os, "replace", replace)
    monkeypatch.setattr(sio, "_exchange", exchange)
    parent = os.stat(tmp_path).st_ino

    def synced_after_last_rename():
        last = max(i for i, e in enumerate(events) if e[0] == "rename")
        return ("fsync", parent) in events[last + 1:]
    for _ in range(2):   # a new file, then one replaced
        events.clear()
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        assert synced_after_last_rename(), events
    for _ in range(2):   # a new folder, then one swapped for the old
        events.clear()
        sio.atomic_replace_dir(lambda d: open(os.path.join(d, "f"), "w").close(), tmp_path / "best")
        assert synced_after_last_rename(), events
        assert ("fsync", os.stat(tmp_path / "best").st_ino) in events   # its own entries, before it went in


def test_a_dead_writers_temporaries_are_found_dead_on_windows_too(tmp_path, monkeypatch):
    """On Windows every writer counted as alive (os.kill(pid, 0) is no probe there), so a killed
    writer's temporaries stayed for good (review45). Windows is asked through _winapi, emulated
    here as it answers: an unknown pid is ERROR_INVALID_PARAMETER (87), a running process's exit
    code STILL_ACTIVE (259), another user's process ERROR_ACCESS_DENIED (5)."""
    import sys
    import types

    import svp.io as sio
    exit_codes = {101: 259, 102: 0}   # 101 runs, 102 has exited (its handle still open somewhere)

    def windows_error(code, text):
        e = OSError(None, text)
        e.winerror = code   # (set by the constructor on Windows alone)
        return e

    def open_process(access, inherit, pid):
        if pid == 103:
            raise windows_error(5, "Access is denied")
        if pid not in exit_codes:
            raise windows_error(87, "The parameter is incorrect")
        return pid
    closed = []
    fake = types.SimpleNamespace(OpenProcess=open_process, GetExitCodeProcess=lambda h: exit_codes[h],
                                 CloseHandle=closed.append)
    monkeypatch.setitem(sys.modules, "_winapi", fake)
    for pid in (101, 102, 103, 104):
        (tmp_path / f"{sio.TEMP_PREFIX}{pid}-x.json").write_text("{}")
    monkeypatch.setattr(sio.os, "name", "nt")
    try:
        removed = sio.remove_dead_writers_temps(str(tmp_path))
    finally:
        monkeypatch.undo()
    assert sorted(os.path.basename(p) for p in removed) == [f"{sio.TEMP_PREFIX}102-x.json",
                                                             f"{sio.TEMP_PREFIX}104-x.json"]
    assert sorted(closed) == [101, 102]
