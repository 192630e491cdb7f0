"""Adapter directories: ``adapter.safetensors`` (only the adapter's tensors: what the method made
trainable when it was attached) and ``adapter_config.json`` (method, settings, base model name
and weight hash, classes).
Both are written atomically (temp file in the same directory, then ``os.replace``).
The file format only: applying a loaded adapter to a model is ``base.load_adapter``."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..io import atomic_save_safetensors  # noqa: F401 (re-exported)
from ..io import (DISK_ERRNOS, atomic_write_group, bytes_writer, json_text, mkdir_error, remove_dead_writers_temps,
                  safetensors_writer)

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BACKBONE_SPEC = "backbone.json"   # written by svp train beside the two: the backbone and image recipe
FORMAT_VERSION = 1


from ..errors import AdapterError  # noqa: F401 (re-exported)


def base_weights_hash(model: nn.Module) -> str:
    """sha256 over the backbone's state dict without the head (``head.*``): for each
    tensor in sorted name order, its name, dtype, shape and raw little-endian bytes
    (contiguous, on CPU). Deterministic for equal weights; any changed value, shape,
    dtype or name changes it."""
    sd = model.state_dict()
    return tensors_hash({k: v for k, v in sd.items() if not k.startswith("head.")})


def base_output_settings(model: nn.Module) -> Optional[dict]:
    """The backbone's settings its weight hash cannot see (``VisionMamba.output_settings``:
    norm eps, divide_out, ...), or None for a backbone without them."""
    get = getattr(model, "output_settings", None)
    return get() if callable(get) else None


def settings_differences(recorded: dict, model: nn.Module) -> list:
    """'name=recorded (the model: value)' for each recorded setting the model has otherwise
    (settings this svp does not know, or the model lacks, are not compared)."""
    have = base_output_settings(model) or {}
    return [f"{k}={recorded[k]!r} (the model given: {have[k]!r})"
            for k in sorted(recorded) if k in have and have[k] != recorded[k]]


def nonfinite_tensors(tensors: Dict[str, torch.Tensor]) -> list:
    """The names of the floating-point tensors holding NaN or infinite values, in order."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def tensors_hash(tensors: Dict[str, torch.Tensor]) -> str:
    """:func:`base_weights_hash`'s sha256 over any name -> tensor dict (an adapter's own:
    ``weights_hash`` in adapter_config.json binds the config to the tensors saved with it)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return "sha256:" + h.hexdigest()


def save_adapter(peft_model, directory, base_model_name: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, extra: Optional[dict] = None,
                 extra_files: Optional[Dict[str, bytes]] = None) -> str:
    """Write ``directory/adapter.safetensors`` + ``directory/adapter_config.json``, and
    ``extra_files`` (name -> bytes: the ``backbone.json`` of a converted adapter) in the same
    group, after them."""
    directory = os.fspath(directory)
    base = peft_model.base_model
    if not peft_model.base_hash:   # (a backbone built on the meta device: nothing to bind the adapter to)
        raise AdapterError(f"{directory}: not saved: the backbone has no weights (built on the meta device), so "
                           f"the adapter has no base-weight hash to be bound to; attach it to a backbone with its "
                           f"weights to save it")
    num_classes = int(base.num_classes)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != num_classes:
            raise AdapterError(f"{directory}: not saved: {len(class_names)} class names given for a "
                               f"{num_classes}-class head")
    if base_model_name is None:
        cfg = getattr(base, "pretrained_cfg", None) or {}
        base_model_name = cfg.get("architecture")
    tensors = peft_model.adapter_state_dict()
    # values a load refuses (load_adapter_state): a diverged model from a user's own loop was
    # written, and its folder then called damaged
    bad = nonfinite_tensors(tensors)
    if bad:
        raise AdapterError(f"{directory}: not saved: {len(bad)} tensor(s) hold NaN or infinite values "
                           f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the training diverged?")
    extra_trained = sorted(set(peft_model.trainable_parameter_names()) - set(tensors))
    if extra_trained:   # made trainable by hand after the method was attached: not the adapter's
        warnings.warn(f"save_adapter: {len(extra_trained)} tensor(s) trainable now are not part of the "
                      f"{peft_model.config.method} adapter and are not saved (made trainable after the "
                      f"method was attached): {', '.join(extra_trained[:5])}"
                      + (", ..." if len(extra_trained) > 5 else ""), stacklevel=3)
    config = {
        "format_version": FORMAT_VERSION,
        "method": peft_model.config.method,
        "config": peft_model.config.to_dict(),
        "base_model_name": base_model_name,
        "base_model_hash": peft_model.base_hash,
        "num_classes": num_classes,
        "class_names": class_names,
        "trainable_tensors": len(tensors),
        "trainable_params": int(sum(t.numel() for t in tensors.values())),
        "weights_hash": tensors_hash(tensors),
    }
    settings = base_output_settings(base)
    if settings is not None:
        config["base_model_settings"] = settings
    config["config"]["num_classes"] = num_classes
    if extra:
        config["extra"] = extra
    # The pair is written as one group (atomic_write_group): both files go to temporaries, then
    # are moved in one rename after the other, so a save stopped while writing (a SIGKILL in a
    # large `full` adapter's weights) leaves the old pair whole and loadable. The config's text is
    # made before anything is written (an `extra` JSON cannot hold wrote the new weights beside the
    # old config, and that folder loaded, one save's weights under another's class names), and
    # the config, which binds its tensors by ``weights_hash``, goes in first: a kill between the
    # two renames leaves the new config beside the old tensors, refused at load, also over a folder
    # whose old config had no hash (saved by an svp before it).
    try:
        json.dumps(extra, allow_nan=False)   # (json_text would write a nan as null, silently)
        text = json_text(config, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{directory}: not saved: extra={_brief(extra)} cannot be written as JSON ({e}); "
                           f"expected strings, finite numbers, booleans, None, lists and dicts of them") from None
    # the folder once everything is checked: a refused save left a new, empty one (review)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:   # a file in the way was "[Errno 17] File exists: 'common.txt'"
        if e.errno in DISK_ERRNOS:
            raise
        raise AdapterError(f"{directory}: cannot create the adapter folder ({mkdir_error(directory, e)})") from None
    remove_dead_writers_temps(directory)   # what a save killed while writing left
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    group = [
        (os.path.join(directory, ADAPTER_CONFIG), bytes_writer(text.encode("utf-8", "surrogateescape"))),
        (weights, safetensors_writer(weights, tensors, metadata={"method": peft_model.config.method,
                                                                  "base_model_hash": peft_model.base_hash})),
    ] + [(os.path.join(directory, name), bytes_writer(data)) for name, data in (extra_files or {}).items()]
    # (a folder in a file's place failed its rename after the others had moved in: review 57)
    for path, _ in group:
        if os.path.isdir(path):
            raise AdapterError(f"{path}: is a folder; not saved (an adapter file goes there)")
    atomic_write_group(group)
    return directory


def _brief(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_adapter_config(directory, data: Optional[bytes] = None) -> dict:
    """``<directory>/adapter_config.json``, checked; ``data``: its bytes, already read
    (:func:`read_adapter_files`)."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    if data is None:
        data = _read(path, f"no {ADAPTER_CONFIG} in {directory} {not_an_adapter(directory)}")
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON in UTF-8: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    for key in ("method", "config", "base_model_hash", "num_classes"):
        if key not in cfg:
            raise AdapterError(f"{path}: missing key {key!r}")
    inner = cfg["config"].get("method") if isinstance(cfg["config"], dict) else None
    if not isinstance(cfg["config"], dict) or inner != cfg["method"]:
        raise AdapterError(f"{path}: 'method' is {cfg['method']!r} but 'config' describes "
                           f"{inner!r}; the file was edited or damaged")
    n, n_inner = cfg["num_classes"], cfg["config"].get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise AdapterError(f"{path}: num_classes is {_brief(n)}, expected a positive integer")
    if n_inner is not None and n_inner != n:   # save_adapter writes both, equal
        raise AdapterError(f"{path}: 'num_classes' is {n!r} but 'config' has num_classes {n_inner!r}; the file "
                           f"was edited or damaged")
    names = cfg.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)
                              or len(names) != n):
        raise AdapterError(f"{path}: 'class_names' must be null or a list of {n!r} strings (one per class), "
                           f"got {_brief(names)}")
    settings = cfg.get("base_model_settings")
    if settings is not None and not isinstance(settings, dict):
        raise AdapterError(f"{path}: base_model_settings is {_brief(settings)}, expected an object")
    digest = cfg.get("weights_hash")
    if digest is not None and not (isinstance(digest, str) and digest.startswith("sha256:")):
        raise AdapterError(f"{path}: weights_hash is {_brief(digest)}, expected 'sha256:' and a hex digest")
    version = cfg.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterError(f"{path}: format_version is {version!r}, expected an integer")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {cfg['format_version']} is newer than this svp "
                           f"understands ({FORMAT_VERSION})")
    return cfg


RUN_ADAPTERS = ("best", "last")   # the adapter folders svp train saves in a run folder


def not_an_adapter(directory) -> str:
    """Why a folder without adapter_config.json is no adapter, in parentheses: a run folder (its
    config.yaml) names the adapters it holds, or says it has saved none yet; the message read
    "not an adapter directory" of a run folder, not saying what to pass (review 69)."""
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.yaml")):
        return "(not an adapter directory)"
    held = [os.path.join(directory, n) for n in RUN_ADAPTERS
            if os.path.isfile(os.path.join(directory, n, ADAPTER_CONFIG))]
    if held:
        return f"(a run folder: pass the adapter folder it holds, {' or '.join(held)})"
    return ("(a run folder that has saved no adapter yet: still training, or stopped before its first save; "
            "`svp train --resume` it)")


def _read(path: str, missing: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(missing) from None
    except IsADirectoryError:
        raise AdapterError(f"{path}: a folder, expected a file") from None
    except OSError as e:   # (a folder that cannot be searched said "no such file" before)
        raise AdapterError(f"{path}: cannot read it ({e.strerror or e})") from None


def _identity(st: os.stat_result) -> tuple:
    # the inode and ctime too: files copied over with their old times and sizes (`cp -p`) change
    # the ctime, a folder swapped for another the inodes
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


# the files of an adapter folder as read, in this order (backbone.json may be absent)
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BACKBONE_SPEC)
_READ_TRIES = 3


def adapter_files_stamp(directory, dir_fd: Optional[int] = None) -> Tuple[Optional[tuple], ...]:
    """What :func:`read_adapter_files` records of each file, without reading them (``dir_fd``:
    the folder opened, its files then named relative to it): equal to a snapshot's ``stamp``
    while the folder holds the same files, unchanged."""
    out = []
    for name in ADAPTER_FILES:
        try:
            out.append(_identity(os.stat(name if dir_fd is not None else os.path.join(os.fspath(directory), name),
                                         dir_fd=dir_fd)))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder's files read into memory as one consistent state: every file's bytes
    come from the same folder, and no file changed or was replaced while they were read (a
    folder replaced while `svp serve` loaded it gave one adapter's weights under the other's
    class names). Nothing is memory-mapped: a file truncated under a mapping (`cp` over it)
    killed the process with SIGBUS."""
    directory: str
    data: Dict[str, Optional[bytes]]      # file name -> bytes; None: an optional file is absent
    stamp: Tuple[Optional[tuple], ...]    # per ADAPTER_FILES: (dev, inode, mtime, ctime, size) or None

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


class _Changed(Exception):
    pass


def _moved(directory: str, dir_fd: Optional[int]) -> bool:
    """Is the folder opened as ``dir_fd`` no longer the one at ``directory``?"""
    if dir_fd is None:
        return False
    try:
        here, opened = os.stat(directory), os.fstat(dir_fd)
    except OSError:
        return True
    return (here.st_dev, here.st_ino) != (opened.st_dev, opened.st_ino)


def read_adapter_files(directory, weights: bool = True) -> AdapterFiles:
    """Read ``directory``'s adapter files (:class:`AdapterFiles`). A folder whose files change
    while they are read is read again, up to three times in all, then refused. ``weights=False``:
    adapter.safetensors is checked (its header against its size) but not read (its data None),
    for a check of the folder before the load (svp eval of several adapters read each full
    fine-tuning adapter, hundreds of MB, twice: retest 93)."""
    directory = os.fspath(directory)
    for _ in range(_READ_TRIES):
        try:
            return _read_once(directory, weights)
        except _Changed:
            continue
    raise AdapterError(f"{directory}: its files changed while they were read, {_READ_TRIES} times; load it once "
                       f"they are all in place")


# the largest JSON file of an adapter folder read whole (svp writes a few KB; class names of a
# million classes, ~30 MB, fit)
MAX_JSON_BYTES = 64 << 20


def _check_size(f, name: str, path: str, size: int) -> None:
    """Refuse, before reading it whole, a file larger than what it says it holds: a 4 GiB sparse
    adapter.safetensors (4 KiB on disk, a few in a tarball) took svp predict and svp serve past
    4.7 GB of memory before it was found damaged (review41). A safetensors file is its 8-byte
    header length, the header, then exactly the tensors' bytes the header places."""
    if name != ADAPTER_WEIGHTS:
        if size > MAX_JSON_BYTES:
            raise AdapterError(f"{path}: {size:,} bytes; expected a JSON file of at most {MAX_JSON_BYTES:,} "
                               f"(the folder is damaged, or not an adapter svp wrote)")
        return
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = f.read(n) if 0 <= n <= min(size - 8, MAX_JSON_BYTES) else b""
    f.seek(0)
    try:
        meta = json.loads(header.decode("utf-8")) if len(header) == n > 0 else None
        end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        meta = None
    if meta is None or size != 8 + n + end:
        raise AdapterError(f"{path}: not a readable safetensors file ({size:,} bytes" + (
            f", of which its header places {8 + n + end:,}" if meta is not None else "") +
            "); the adapter directory is damaged, save or copy it again")


def _read_once(directory: str, weights: bool = True) -> AdapterFiles:
    # the files are opened through one descriptor of the folder where the system has them
    # (Linux, macOS): a folder renamed or swapped meanwhile cannot mix two folders' files
    dir_fd = None
    if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise FileNotFoundError(f"no adapter folder {directory}") from None
        except NotADirectoryError:
            raise AdapterError(f"{directory}: not a folder") from None
        except OSError as e:
            raise AdapterError(f"{directory}: cannot read the folder ({e.strerror or e})") from None
    try:
        data, stamp = {}, []
        for name in ADAPTER_FILES:
            path = os.path.join(directory, name)
            try:   # (not blocking: a FIFO in the folder's place of a file would hold the open forever)
                # (O_BINARY: on Windows os.open is in text mode without it, which turned CR LF into LF
                # and stopped at byte 0x1A, so every adapter read as changed while read: review)
                fd = os.open(name if dir_fd is not None else path,
                             os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
            except FileNotFoundError:
                if _moved(directory, dir_fd):
                    raise _Changed() from None   # removed or replaced since the folder was opened
                if name == BACKBONE_SPEC:
                    data[name] = None
                    stamp.append(None)
                    continue
                what = not_an_adapter(directory) if name == ADAPTER_CONFIG else ""
                raise FileNotFoundError(f"no {name} in {directory} {what}".rstrip()) from None
            except OSError as e:
                raise AdapterError(f"{path}: cannot read it ({e.strerror or e})") from None
            # (what it is before a file object is made of it: fdopen refuses a folder with
            # "[Errno 21] Is a directory: 4", naming the descriptor)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise AdapterError(f"{path}: " + ("a folder, expected a file" if stat.S_ISDIR(st.st_mode)
                                                  else "not a regular file"))
            with os.fdopen(fd, "rb") as f:
                before = _identity(st)
                try:
                    _check_size(f, name, path, st.st_size)
                    blob = f.read() if weights or name != ADAPTER_WEIGHTS else None
                except OSError as e:
                    raise AdapterError(f"{path}: cannot read it ({e.strerror or e})") from None
                if _identity(os.fstat(f.fileno())) != before or (blob is not None and len(blob) != before[-1]):
                    raise _Changed()   # written while it was read
            data[name] = blob
            stamp.append(before)
        # the folder still names the files read: none was replaced after it was read (a file
        # renamed away and back has another ctime)
        try:
            if adapter_files_stamp(directory, dir_fd) != tuple(stamp):
                raise _Changed()
        except OSError:
            raise _Changed() from None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return AdapterFiles(directory, data, tuple(stamp))
