"""Run folder and resume state.

Everything is written atomically (temporary file in the same folder + ``os.replace``).
The resume state is ONE safetensors file, ``resume.safetensors``: every tensor of the
state (trainable weights, optimizer moments, EMA, RNG states) is a tensor entry and
the rest of the structure (scheduler, scaler, counters, metric history, Python and
NumPy RNG states) is JSON in the file's metadata. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors import safe_open

from ..io import (atomic_replace_dir, atomic_save_safetensors, atomic_write_json,  # noqa: F401 (re-exported)
                  atomic_write_text, json_text)

RESUME_FILE = "resume.safetensors"
FORMAT = "svp-resume-1"


from ..errors import ResumeError  # noqa: F401 (re-exported)


# ------------------------------------------------------------------ atomic writes
def atomic_save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    atomic_save_safetensors(path, tensors, metadata)


# ------------------------------------------------------------------ (un)flattening
def _flatten(obj: Any, prefix: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """Replace every tensor/ndarray in a nested structure by a reference into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
            # torch < 2.3 has no uint16/32/64 (NumPy's RNG state is uint32): the same bits as the
            # signed type, viewed back on load, so resume stays bit-identical on every torch
            tensors[prefix] = torch.from_numpy(arr.view(arr.dtype.str.replace("u", "i"))).clone()
            return {"__ndarray__": prefix, "dtype": arr.dtype.str}
        tensors[prefix] = torch.from_numpy(arr).clone()
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            tag = ("i:" if isinstance(k, int) else "s:") + str(k)
            out[tag] = _flatten(v, f"{prefix}/{k}", tensors)
        return {"__dict__": out}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise ResumeError(f"cannot store {type(obj).__name__} at {prefix!r} in the resume state")


def _unflatten(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            arr = tensors[obj["__ndarray__"]]
            arr = arr if isinstance(arr, np.ndarray) else arr.numpy()
            return arr.view(obj["dtype"]) if "dtype" in obj else arr
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__dict__" in obj:
            out = {}
            for tag, v in obj["__dict__"].items():
                kind, k = tag.split(":", 1)
                out[int(k) if kind == "i" else k] = _unflatten(v, tensors)
            return out
        raise ResumeError(f"malformed resume state entry {obj!r}")
    return obj


def save_state(path: str, state: Dict[str, Any]) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    structure = _flatten(state, "s", tensors)
    atomic_save_tensors(path, tensors, {"format": FORMAT, "state": json.dumps(structure)})


def _saved_top(path: str) -> Any:
    """A saved state's top-level entries as its metadata holds them (tag -> flattened value; its
    tags are what iterating gives), no tensor read; None where the file is missing or is not a
    resume state."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["state"])["__dict__"]
    except Exception:
        return None


def saved_names(path: str) -> Optional[set]:
    """The top-level names of a saved state, from the file's metadata alone (no tensor read);
    None where the file is missing or is not a resume state. Tells which svp wrote it: a name
    added to the state at some date is missing from every file written before it."""
    try:
        return {tag.split(":", 1)[1] for tag in _saved_top(path)}
    except Exception:   # (None, or tags of another shape: no resume state)
        return None


def saved_value(path: str, name: str) -> Any:
    """A top-level JSON value of a saved state (not a tensor), from the file's metadata alone;
    None where the file, the name or a plain value is missing."""
    top = _saved_top(path)
    got = top.get(f"s:{name}") if isinstance(top, dict) else None
    return got if isinstance(got, (bool, int, float, str)) else None


def load_state(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ResumeError(f"no resume state at {path} (expected {RESUME_FILE} written by `svp train`)")
    try:
        tensors: Dict[str, Any] = {}
        unsupported = []
        # copies, not the file's mapped pages: the optimizer keeps the tensors it is given as they
        # are, and on Windows a file mapped cannot be replaced, so a resumed run could never write
        # its next resume point (review45)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                try:
                    tensors[key] = f.get_tensor(key).clone()
                except Exception:  # a dtype this torch lacks (uint32 of files written by torch >= 2.3)
                    unsupported.append(key)
        if unsupported:
            with safe_open(path, framework="np") as f:
                tensors.update((key, np.array(f.get_tensor(key), copy=True)) for key in unsupported)
    except Exception as e:
        raise ResumeError(f"{path}: unreadable resume state ({e})") from None
    if meta.get("format") != FORMAT:
        raise ResumeError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        state = _unflatten(json.loads(meta["state"]), tensors)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:   # the record (JSON) damaged
        raise ResumeError(f"{path}: damaged resume state ({type(e).__name__}: {e}); the file is not as "
                          f"`svp train` wrote it") from None
    return state


# ------------------------------------------------------------------ RNG states
def rng_state() -> Dict[str, Any]:
    import random
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    import random
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(st["numpy"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))


def read_jsonl(path: str):
    out = []
    if os.path.isfile(path):
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a torn last line after a kill
    return out


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json_text(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: str, records) -> None:
    atomic_write_text(path, "".join(json_text(r) + "\n" for r in records))


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total
