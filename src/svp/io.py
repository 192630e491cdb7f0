"""Atomic file writes, used for every file svp writes (run folders, adapters, cards,
figures): the content goes to a temporary file in the target folder, is fsync'ed, then
``os.replace``d over the target, so a crash or a kill leaves the old file or the new one,
never a torn one."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_save_safetensors"]


def atomic_write(path, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` to produce the file, then move it into place atomically."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=d)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> str:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def atomic_write_text(path, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj: Any, sort_keys: bool = False) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def atomic_save_safetensors(path, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> str:
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
