"""Atomic writes: the target is either the old file or the complete new one."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from svp.io import atomic_save_safetensors, atomic_write, atomic_write_json


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


def test_written_files_are_complete_and_readable_by_others(tmp_path):
    path = tmp_path / "sub" / "w.safetensors"
    atomic_save_safetensors(path, {"x": torch.arange(6.0).view(2, 3).t()}, metadata={"k": "v"})
    assert torch.equal(load_file(str(path))["x"], torch.arange(6.0).view(2, 3).t())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_safetensors_files_of_the_same_content_have_the_same_bytes(tmp_path):
    """safetensors writes the metadata keys in a hash map's order, which differs between
    processes: two identical `svp pretrain --export` runs gave files of other sha256."""
    import subprocess
    import sys
    code = ("import torch, svp.io as io, sys; io.atomic_save_safetensors(sys.argv[1], {'b': torch.arange(3.0), "
            "'a': torch.ones(2, 2)}, metadata={k: str(i) for i, k in enumerate('qwertyuiop')})")
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {k: str(i) for i, k in enumerate("qwertyuiop")}
        assert f.get_tensor("b").tolist() == [0.0, 1.0, 2.0]
