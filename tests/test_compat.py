"""What keeps the oldest supported stack working (svp.compat, resume-state dtypes). These run on
every torch: `make test` checks them on the pinned stack, `make test-oldest` on the floor."""
import argparse
import collections
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy

from svp.compat import restricted_torch_load
from svp.engine import checkpoint as ck


def official_style_checkpoint():
    lin = torch.nn.Linear(3, 2)
    sd = collections.OrderedDict(lin.state_dict())
    sd["half"] = torch.randn(4).half()
    sd["bf16"] = torch.randn(4).to(torch.bfloat16)
    sd["index"] = torch.arange(5)
    sd["mask"] = torch.tensor([True, False])
    sd["view"] = torch.arange(12.0).reshape(3, 4)[:, 1]  # a strided view shares its storage
    return {"model": sd, "model_ema": {"p": torch.nn.Parameter(torch.ones(2))},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "epoch": 299, "blob": b"\x00\xff", "pair": (1, 2.5), "tags": {"a", "b"},
            "args": argparse.Namespace(model="vim_tiny", lr=5e-4, drop_path=0.05)}


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, argparse.Namespace):
        assert vars(a) == vars(b)
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("zipfile", [True, False])
def test_restricted_load_reads_what_plain_torch_load_reads(tmp_path, zipfile):
    ckpt = official_style_checkpoint()
    path = tmp_path / "vim.pth"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipfile)
    back = restricted_torch_load(path)
    assert_same(back, torch.load(path, map_location="cpu", weights_only=False))
    assert_same(back, ckpt)
    if zipfile:
        assert_same(restricted_torch_load(path, mmap=True), ckpt)


@pytest.mark.parametrize("zipfile", [True, False])
def test_read_checkpoint_maps_a_zip_checkpoint_and_never_writes_to_it(tmp_path, zipfile):
    from svp.models import read_checkpoint
    ckpt = official_style_checkpoint()
    path = tmp_path / "vim.pth"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipfile)
    before = path.read_bytes()
    back = read_checkpoint(path)  # memory-mapped when zipped: the loader must not care
    assert_same(back, ckpt)
    back["model"]["weight"].mul_(2)  # callers adapt tensors in place (copy on write, never the file)
    del back
    assert path.read_bytes() == before
    assert_same(read_checkpoint(path), ckpt)


class OpensAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


class Exec:
    def __reduce__(self):
        return (eval, ("1",))


@pytest.mark.parametrize("payload", ["open", "eval", "parser", "torch_fn"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_restricted_load_refuses_every_other_global(tmp_path, payload, writer):
    marker = tmp_path / "pwned"
    obj = {"open": OpensAFile(str(marker)), "eval": Exec(), "parser": argparse.FileType("r"),
           "torch_fn": torch.load}[payload]
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"model": {}, "payload": obj}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {}, "payload": obj}, f)
    with pytest.raises(pickle.UnpicklingError, match="is not allowed"):
        restricted_torch_load(path)
    assert not marker.exists()


def test_restricted_load_sets_no_state_on_a_class(tmp_path):
    """BUILD on the allowed class argparse.Namespace (not an instance) set its attributes for the
    whole process: a crafted .pth replaced Namespace.__init__ (torch's own weights-only
    unpickler refuses it)."""
    import io
    import struct
    import zipfile

    def text(s):
        b = s.encode()
        return b"X" + struct.pack("<I", len(b)) + b
    # GLOBAL argparse.Namespace; state (None, {"__init__": _codecs.encode}); BUILD; then {"model": {}}
    evil = (b"\x80\x02" + b"cargparse\nNamespace\n" + b"N}" + text("__init__") + b"c_codecs\nencode\n" + b"s"
            + b"\x86b0" + b"}" + text("model") + b"}" + b"s.")
    buf = io.BytesIO()
    torch.save({"model": {}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info, evil if info.filename.endswith("/data.pkl") else src.read(info))
    init = argparse.Namespace.__init__
    try:
        with pytest.raises(pickle.UnpicklingError, match="setting the state of the class Namespace is not allowed"):
            restricted_torch_load(path)
    finally:
        if argparse.Namespace.__init__ is not init:   # (the old unpickler's harm, undone for the next tests)
            argparse.Namespace.__init__ = init
            pytest.fail("the class's attribute was set")


def test_unsigned_arrays_round_trip_bit_identical_through_signed_entries(tmp_path):
    rng = np.random.RandomState(3)
    state = {"rng": rng.get_state(), "u16": np.array([0, 65535], np.uint16),
             "u64": np.array([2**64 - 1, 1], np.uint64), "u8": np.array([255], np.uint8)}
    path = tmp_path / "r.safetensors"
    ck.save_state(str(path), state)
    with safe_open(str(path), framework="np") as f:  # every entry is a dtype torch 2.1 has
        stored = {k: f.get_tensor(k).dtype.str for k in f.keys()}
    assert not any(d[1] == "u" and d != "|u1" for d in stored.values()), stored
    back = ck.load_state(str(path))
    assert back["rng"][0] == "MT19937" and back["rng"][1].dtype == np.uint32
    assert np.array_equal(back["rng"][1], state["rng"][1])
    for k in ("u16", "u64", "u8"):
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k])
    np.random.set_state(back["rng"])
    assert np.array_equal(np.random.rand(4), rng.rand(4))


def test_a_state_with_uint32_entries_still_loads(tmp_path):
    """Files written before the signed storage (uint32 entries) stay readable, also where
    torch has no uint32."""
    key = np.random.RandomState(5).get_state()[1]
    structure = {"__dict__": {"s:key": {"__ndarray__": "s/key"}}}
    path = tmp_path / "old.safetensors"
    save_numpy({"s/key": key}, str(path), metadata={"format": ck.FORMAT, "state": json.dumps(structure)})
    back = ck.load_state(str(path))
    assert back["key"].dtype == np.uint32 and np.array_equal(back["key"], key)


def test_a_bytearray_larger_than_its_file_is_refused_on_every_path(tmp_path):
    """An 818-byte .pth whose pickle is bytearray(2**31) allocated 2 GiB through both the
    allow-list unpickler and torch's weights-only one (review41); a small bytearray still reads."""
    import io
    import struct
    import zipfile

    from svp.models import CheckpointError
    from svp.models.loading import read_checkpoint

    def pth(n, name, opcode=False):
        pkl = b"\x80\x02cbuiltins\nbytearray\n\x8a\x08" + struct.pack("<q", n) + b"\x85R."
        if opcode:   # protocol 5's BYTEARRAY8: no global to bound, it allocates before it reads (review43)
            pkl = b"\x80\x05\x8c\x09bytearray0\x96" + struct.pack("<Q", n) + b"."
        buf = io.BytesIO()
        torch.save({"x": 1}, buf)
        src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for info in src.infolist():
                z.writestr(info, pkl if info.filename.endswith("data.pkl") else src.read(info))
        return path
    big = pth(2**31, "bomb.pth")
    with pytest.raises(pickle.UnpicklingError, match=r"a bytearray of 2,147,483,648 bytes in a file of \d+ bytes"):
        restricted_torch_load(big)
    with pytest.raises(CheckpointError, match="a bytearray of 2,147,483,648 bytes"):
        read_checkpoint(big)   # (torch >= 2.5: its own unpickler would allow it; the file goes through svp's)
    assert read_checkpoint(pth(16, "small.pth")) == bytearray(16)
    with pytest.raises(pickle.UnpicklingError, match=r"BYTEARRAY8 of 2,147,483,648 bytes in a file of \d+ bytes"):
        restricted_torch_load(pth(2**31, "op.pth", opcode=True))
    with pytest.raises(CheckpointError, match="2,147,483,648 bytes"):
        read_checkpoint(pth(2**31, "op.pth", opcode=True))


def test_torch_without_a_numpy_bridge_is_one_import_error_naming_the_fix():
    """torch before 2.3 (the newest for Intel Macs is 2.2.2) was built against NumPy 1.x: beside
    NumPy 2 every batch failed with a traceback ("Numpy is not available"; review45). svp says so
    at import, with the fix. Here torch's bridge is made to fail as it does there."""
    import subprocess
    import sys
    script = ("import torch\n"
              "def gone(*a): raise RuntimeError('Numpy is not available')\n"
              "torch.from_numpy = gone\n"
              "import svp\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: svp: torch ") and "(Numpy is not available)" in last, r.stderr
    assert "pip install 'numpy<2'" in last
    from svp.compat import numpy_bridge_problem
    assert numpy_bridge_problem() is None   # (this torch and numpy: the bridge works)


def test_a_torchvision_built_for_another_torch_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    """A CPU torch wheel beside PyPI's torchvision (spec checkpoints-and-install.md 1.2) made every
    `svp` command, `svp doctor` too, a traceback through timm's imports ending in "operator
    torchvision::nms does not exist" (review 54). The command now says it in one line with the
    fix, exit 1; a program importing svp gets one ImportError. Here a torchvision on the path
    raises what that one raises."""
    import subprocess
    import sys

    from svp import runtime
    from svp.compat import torchvision_problem
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    r = subprocess.run([sys.executable, "-m", "svp", "doctor"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    line, = r.stderr.splitlines()
    assert line.startswith("svp: error: torchvision ") and "(operator torchvision::nms does not exist)" in line, line
    assert f"Install the torchvision release made for torch {torch.__version__}" in line, line
    # the library's form, and which errors are torchvision's
    with pytest.raises(ImportError, match="^svp: torchvision is not installed; timm"):
        runtime.install_problem(torchvision_problem(ModuleNotFoundError("no", name="torchvision")))
    assert torchvision_problem(ModuleNotFoundError("no", name="tqdm")) is None
    # one of its own modules missing: installed, not loading (it said "not installed": retest 56)
    said = torchvision_problem(ModuleNotFoundError("No module named 'torchvision._C'", name="torchvision._C"))
    assert said.startswith("torchvision") and "not installed" not in said and ": a broken install. " in said, said
    assert torchvision_problem(RuntimeError("operator aten::foo does not exist")) is None
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")   # the spec's case: the fix names its index
    said = torchvision_problem(RuntimeError("operator torchvision::nms does not exist"))
    assert "made for torch 2.13.0+cpu (torchvision 0.28); this torch is PyTorch's CPU build" in said, said
    assert said.endswith("pip install torchvision --index-url https://download.pytorch.org/whl/cpu"), said
