"""Reading official Vim checkpoints safely, adapting them to a VisionMamba and loading
them with readable errors. Knows the model only through its attributes (``pos_embed``,
``patch_embed.grid_size``, ``head``), so the model module imports this one and not the
other way round."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from typing import List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, to_2tuple

_logger = logging.getLogger(__name__)

# Keys of a training checkpoint that may hold the weights, in the order the official
# code reads them: 'model' (what Vim's and SVP's own loaders take), never the EMA first.
STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")


from ..errors import CheckpointError  # noqa: F401 (re-exported)


class UnreadableCheckpoint(CheckpointError):
    """The file is no checkpoint svp can read (empty, cut off, another format, unreadable), as
    opposed to weights that do not fit the model: the model builder says "cannot read" of it,
    not "do not fit"."""


def _safetensors_layout(path: str, head: bytes) -> Optional[str]:
    """'safetensors' where the file is laid out as one: an 8-byte little-endian length n, then n
    bytes of a JSON object within the file; a description where such a header is cut off by the
    file's end; None else. (A pickle never passes: its byte 8 is no '{', and a header that does
    not parse is no safetensors header either.)"""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    n, size = int.from_bytes(head[:8], "little"), os.path.getsize(path)
    if not 0 < n <= (100 << 20):   # (safetensors' own header limit)
        return None
    if n > size - 8:   # (its header cut off: it read as a pickle where its first byte is 0x80: retest 75)
        # (cut right after its '{' too: it was read as a pickle, "Unsupported operand": retest 80)
        return (f"a safetensors file cut off inside its header ({n:,} bytes of header, {size:,} bytes of file): "
                f"download or copy it again") if head[9:10] in (b'"', b"") else None
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError):
        return None
    return "safetensors" if isinstance(header, dict) else None


def _sniff(path: str) -> str:
    """What the file's first bytes say it is: 'zip' (torch.save), 'pickle' (torch's legacy
    format, or a plain pickle), 'safetensors' (whatever its extension), or a description of
    what it is instead (a Git LFS pointer, an HTML page, ...). A file that cannot be opened is
    said as the OS says it (an unreadable .safetensors was "No such file or directory")."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise UnreadableCheckpoint(f"{path}: cannot be read ({e.strerror or e})") from None
    if head.startswith(b"PK\x03\x04"):
        try:   # torch.save's zip holds <name>/data.pkl; another zip (a zipped .pth, an .npz) is said as one
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip"   # (cut off: torch's reader says how)
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "zip"
        inner = any(n.endswith((".pth", ".pt", ".safetensors")) for n in names)
        if names and all(n.endswith(".npy") for n in names):   # (retest 96)
            return (f"a numpy .npz archive (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), "
                    f"not a torch.save file: Google's ViT format, which svp reads into timm's ViTs (--model vit_*) "
                    f"only")
        return (f"a zip archive, not a torch.save file (it holds {', '.join(names[:3]) or 'nothing'}"
                f"{', ...' if len(names) > 3 else ''}){': unpack it' if inner else ''}")
    # safetensors before pickle: its first byte is the low byte of its header's length, 0x80 (a
    # pickle's first byte) in one file of 256: such a file was refused as torch.save's format, and
    # read as a pickle once renamed as told (review 74)
    layout = _safetensors_layout(path, head)
    if layout:
        return layout
    if head[:1] == b"\x80":
        return "pickle"
    if head.startswith(b"version https://git-lfs"):
        return ("a Git LFS pointer, not the weights (a clone without git-lfs): fetch the file itself "
                "(`git lfs pull`, or download it)")
    if head.lstrip().startswith(b"<"):
        return "an HTML/XML page, not weights (a download that saved an error or login page?)"
    return f"no checkpoint format svp reads (it begins {head[:16]!r})"


def read_checkpoint(path) -> dict:
    """Load a .pth/.pt (``weights_only=True``, only ``argparse.Namespace`` allowed, for
    the pickled ``args`` of official training checkpoints) or a .safetensors file.

    A .pth in torch's zip format is memory-mapped: an official training checkpoint is four times
    its weights (model, EMA, two AdamW moments), and only the tensors a caller touches are read
    (Vim-B's 1.5 GB file: 1.2-3.3 s read whole, 0.14 s mapped)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder; expected a checkpoint file (.pth, .pt or .safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise UnreadableCheckpoint(f"{path}: the file is empty; expected a checkpoint (.pth, .pt or .safetensors)")
    if os.path.getsize(path) < 9:
        # (no format holds weights in fewer: safetensors' length and '{', torch.save's zip or pickle
        # header. One such cut beginning with 0x80 was called torch.save's format, "name it .pth",
        # and then failed in torch's reader; the others were "no format svp reads": retest 82)
        size = os.path.getsize(path)
        raise UnreadableCheckpoint(f"{path}: {size} byte{'' if size == 1 else 's'}, too short to be a checkpoint "
                                   f"(cut off?): download or copy it again")
    kind = _sniff(path)
    if kind == "zip" and not zipfile.is_zipfile(path):
        # (torch.save's zip format ends with its directory: one cut short was "name it .pth" under a
        # .safetensors name, then torch's "failed finding central directory": retest 84)
        raise UnreadableCheckpoint(f"{path}: torch.save's format, but without the directory a whole file ends "
                                   f"with ({os.path.getsize(path)} bytes: cut off?): download or copy it again")
    if path.endswith(".safetensors") and kind in ("zip", "pickle"):   # (torch.load reads it as safetensors)
        raise UnreadableCheckpoint(f"{path}: not a safetensors file: its content is torch.save's format; "
                                   f"name it .pth")
    if kind == "safetensors" or path.endswith(".safetensors"):   # (safetensors named .bin: read as what it is)
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # SafetensorError: truncated, empty or not a safetensors file
            what = "" if kind == "safetensors" else f"; the file is {kind}" if " " in kind else ""
            raise UnreadableCheckpoint(f"{path}: not a readable safetensors file ({e}){what}") from None
    if kind not in ("zip", "pickle"):   # the unpickler's "Unsupported operand 60" said nothing of it
        raise UnreadableCheckpoint(f"{path}: {kind}" + (
            "" if kind.startswith("a safetensors file") else   # (what it is, and what to do: retest 80)
            "; expected a checkpoint written by torch.save (.pth, .pt) or a .safetensors file"))
    # the legacy (pre-1.6) format cannot be mapped (known by its first bytes: is_zipfile finds a zip's
    # end-of-directory bytes anywhere near the end, which a legacy file's tensors may hold: retest 59)
    mmap = kind == "zip" and zipfile.is_zipfile(path)
    try:
        from ..compat import makes_bytearrays, restricted_torch_load
        if hasattr(torch.serialization, "safe_globals") and not makes_bytearrays(path):
            # (torch's warning on a plain pickle's protocol went raw to stderr before the refusal)
            with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        # torch < 2.5 cannot allow Namespace in weights_only=True: the same allow-list, our unpickler
        # (which also bounds a bytearray by the file's size)
        return restricted_torch_load(path, mmap=mmap)
    except Exception as e:  # an UnpicklingError names the forbidden global
        if not _refused(e):  # text, an image, a cut-off zip: bytes the unpickler cannot parse
            infos = _checksummed_members(path)
            damage = _index_damage(path, infos) if infos else None
            if damage is not None:   # (a flipped bit in data.pkl: said as what it is)
                raise damage from None
            first = str(e).split(". ")[0].strip() or "no message"
            raise UnreadableCheckpoint(
                f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first}); expected a whole "
                f".pth/.pt written by torch.save, or a .safetensors file") from e
        raise UnreadableCheckpoint(   # (unread, so "cannot read", not "do not fit": review 70)
            f"{path}: cannot be read with torch.load(weights_only=True) (only tensors, containers and "
            f"argparse.Namespace are allowed; arbitrary pickled code is never run): {_unpickle_reason(e)}") from e


def _refused(e: Exception) -> bool:
    """Whether the allow-list refused the file (torch's weights-only unpickler, or svp's own on
    torch < 2.5), as opposed to bytes that are no checkpoint at all."""
    text = str(e)
    return isinstance(e, pickle.UnpicklingError) and ("Weights only load failed" in text or "GLOBAL" in text
                                                      or " is not allowed (" in text)


def _unpickle_reason(e: Exception) -> str:
    """torch's refusal in one line, naming the global the file wanted, without torch's advice to
    load with ``weights_only=False`` (which would run whatever the file holds; svp never offers
    that)."""
    text = str(e)
    found = (re.search(r"GLOBAL ([\w.]+) was not an allowed global", text)
             or re.search(r"global '([\w.]+)' is not allowed \(", text))  # svp.compat.AllowListUnpickler's
    if found:
        return f"it pickles {found.group(1)}, which is not on the allow-list"
    # (torch 2.14 puts a blank line before the reason)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. Please|\n|$)", text)
    if found and found.group(1).strip():
        reason = found.group(1).strip()
        if reason.startswith("Unsupported operand"):   # an opcode torch.save never writes
            reason += " (a plain pickle? torch.save's files and .safetensors are read)"
        return reason
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    kept = [p for p in paragraphs if "weights_only" not in p and "documentation of torch.load" not in p]
    return " ".join(kept or paragraphs[-1:]) or type(e).__name__


def extract_state_dict(ckpt, source: str = "<checkpoint>") -> dict:
    """The model weights of a checkpoint: ``model`` (as the official code loads), else
    ``state_dict``, else the EMA weights, else the dict itself if it is a bare state dict."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(ckpt).__name__}")
    for key in STATE_DICT_KEYS:
        if isinstance(ckpt.get(key), Mapping):
            if key in ("model_ema", "state_dict_ema"):
                _logger.warning("%s: no 'model' weights, loading the EMA weights under %r", source, key)
            return _tensors_only(dict(ckpt[key]), f"{source}[{key!r}]")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if any(k.startswith("exp_avg.") for k in ckpt) and any(k.startswith("model.") for k in ckpt):
            # `svp pretrain`'s own checkpoint (weights and AdamW's moments, for its --resume): its
            # weights were read as "141 missing ... 572 unexpected: exp_avg...."
            _logger.warning("%s: an svp pretrain checkpoint: loading its model.* weights, those of the step it "
                            "was saved at (a --resume of that run rewrites the file, and adapters trained on "
                            "it then refuse its new weights: give --checkpoint the run's --export file)", source)
            return {k[len("model."):]: v for k, v in ckpt.items() if k.startswith("model.")}
        return dict(ckpt)
    raise CheckpointError(f"{source}: no state dict found; expected one of the keys {list(STATE_DICT_KEYS)} "
                          f"or a bare name->tensor dict, found keys {sorted(ckpt)[:10]}")


def _tensors_only(state_dict: dict, source: str) -> dict:
    bad = [f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: expected a name -> tensor mapping; not tensors: " + ", ".join(bad[:8])
                              + (" ..." if len(bad) > 8 else ""))
    return state_dict


def _checksummed_members(path) -> Optional[list]:
    """The members of a torch.save zip file (one that begins with a local header: a legacy file
    may hold a zip's end-of-directory bytes anywhere, retest 59), or None: another format, or a
    zip whose stored checksums are all 0 (``torch.serialization.set_crc32_options(False)``), which
    has none to check."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError):
        return None
    return infos if any(i.CRC for i in infos if i.file_size) else None


def _index_damage(path, infos) -> Optional[UnreadableCheckpoint]:
    """The error for the first of the small members (``data.pkl``, which says which stored bytes
    each tensor reads; the version, the byte order) whose bytes fail their checksum, or None: on
    torch < 2.5 a flipped bit there pointed a weight at another storage of its size, and it loaded
    silently (retest 59). The storages themselves are checked through the tensors read."""
    with zipfile.ZipFile(path) as z:
        for info in infos:
            if "/data/" in info.filename or info.file_size > (64 << 20):
                continue
            try:
                z.read(info)
            except zipfile.BadZipFile:
                return _damaged(path, "its index of the tensors' bytes does not match", info.filename)
    return None


def _damaged(path, what: str, member: str) -> UnreadableCheckpoint:
    return UnreadableCheckpoint(
        f"{path}: the file is damaged: {what} the CRC-32 checksum torch.save stored (first damaged member: "
        f"{member}); it changed after it was written (a bad disk, an interrupted download or copy): download "
        f"or copy it again")


def verify_checksums(path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check the bytes of ``tensors`` (read from ``path``), and the file's index of them, against
    the CRC-32 checksums that torch.save's zip format stores for every member; torch.load never
    checks them, so a file damaged after it was written (a bad disk, a copy cut short and resumed,
    a flipped bit) loaded silently with wrong weights. Only the storages of ``tensors`` are read,
    so a training checkpoint's optimizer state stays unread (mapped, see ``read_checkpoint``). A
    storage whose (size, checksum) is no member's is confirmed with ``zipfile``'s own whole-file
    check before the file is called damaged. The legacy format, safetensors and a zip saved
    without checksums have none to check."""
    path = os.fspath(path)
    infos = _checksummed_members(path)
    if infos is None:
        return
    damage = _index_damage(path, infos)
    if damage is not None:
        raise damage
    stored = {(i.file_size, i.CRC) for i in infos}
    matches, bad = {}, []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in matches:
            data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
            matches[key] = (storage.nbytes(), zlib.crc32(data)) in stored
        if not matches[key]:
            bad.append(name)
    if not bad:
        return
    with zipfile.ZipFile(path) as z:
        member = z.testzip()
    if member is None:   # every member matches its checksum: the tensors were laid out otherwise
        _logger.debug("%s: %d tensors matched no stored checksum, but every member does", path, len(bad))
        return
    more = f" and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''}" if len(bad) > 1 else ""
    raise _damaged(path, f"the bytes of {bad[0]!r}{more} do not match", member)


def read_state_dict(checkpoint, source: Optional[str] = None) -> dict:
    """The model weights of ``checkpoint`` (a path, or a checkpoint or state dict already read):
    ``read_checkpoint`` and ``extract_state_dict``, and from a file in torch's zip format the
    weights' bytes checked against the file's checksums (``verify_checksums``)."""
    return read_checkpoint_weights(checkpoint, source)[1]


def read_checkpoint_weights(checkpoint, source: Optional[str] = None):
    """(the checkpoint as read, its model weights): :func:`read_state_dict` that also gives what
    else the file holds (an official training checkpoint's pickled ``args``)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        ckpt = read_checkpoint(path)
        state_dict = extract_state_dict(ckpt, source or path)
        verify_checksums(path, state_dict)
        return ckpt, state_dict
    return checkpoint, extract_state_dict(checkpoint, source or "<state dict>")


def resample_pos_embed_midcls(pos_embed: torch.Tensor, new_grid, old_grid=None,
                              interpolation: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """Resample a (1, M+1, D) position embedding whose class-token row sits at M // 2.

    The class row is taken out, the M patch rows are resampled as a grid, and the
    class row is put back at the new middle (new M // 2). The official loader treats
    row 0 as the class token, which is wrong for this layout.
    """
    n = pos_embed.shape[1] - 1
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch rows, not a square grid; pass old_grid")
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"pos_embed has {n} patch rows but old_grid {old_grid} has {old_grid[0] * old_grid[1]}")
    if old_grid == new_grid:
        return pos_embed
    mid = n // 2
    cls_row = pos_embed[:, mid:mid + 1]
    patches = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, list(new_grid), list(old_grid), num_prefix_tokens=0,
                                     interpolation=interpolation, antialias=antialias)
    new_mid = new_grid[0] * new_grid[1] // 2
    return torch.cat([patches[:, :new_mid], cls_row, patches[:, new_mid:]], dim=1)



WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")


def strip_wrappers(state_dict: Mapping, source: str = "the checkpoint",
                   prefixes: Sequence[str] = WRAPPER_PREFIXES) -> dict:
    """``state_dict`` with every leading wrapper prefix taken off its keys, in any order
    (``compile(DDP(model))`` gives ``_orig_mod.module.*``); a key that is only a prefix stays
    itself. Two keys that become one name are refused, naming both: the later one took the
    tensor's place silently (review 57, retest 77)."""
    out, named = {}, {}
    for key, v in state_dict.items():
        k, before = key, None
        while before != k:
            before = k
            for prefix in prefixes:
                if k.startswith(prefix) and len(k) > len(prefix):
                    k = k[len(prefix):]
        if k in named:
            raise CheckpointError(f"{source}: keys {named[k]!r} and {key!r} are the same tensor {k!r} once the "
                                  f"wrappers' prefixes ({', '.join(prefixes)}) are taken off; expected one of them")
        named[k] = key
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict, model: nn.Module, source: str = "the checkpoint"):
    """Adapt an official (or foreign-prefixed) state dict to ``model``: strip wrapper
    prefixes, resample the position embedding to the model's grid (class-token aware),
    drop the classifier when its class count differs, drop official SVP prompt tensors.
    ``source`` names the file in a refusal (timm's loader calls it without)."""
    out = strip_wrappers(state_dict, source)
    prompts = [k for k in out if k.startswith("prompt_")]
    if prompts:  # an official SVP training checkpoint: the backbone is what we load here
        _logger.info("ignoring %d official SVP prompt tensors (load them with svp convert-official-svp)",
                     len(prompts))
        for k in prompts:
            del out[k]
    # another input channel count (grey-scale, 4 bands): timm's rule for a first conv, as its
    # own loader applies it (the sum for one channel, repeated and scaled for more); the full
    # models' files come through here, not through timm's loader, which did it for the mini only
    proj = out.get("patch_embed.proj.weight")
    want = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "weight", None)
    if (proj is not None and want is not None and proj.dim() == 4 and want.dim() == 4 and proj.shape[1] == 3
            and want.shape[1] != 3 and proj.shape[0] == want.shape[0] and proj.shape[2:] == want.shape[2:]):
        from timm.models import adapt_input_conv
        _logger.info("patch_embed.proj.weight: the checkpoint's 3 input channels adapted to %d", want.shape[1])
        out["patch_embed.proj.weight"] = adapt_input_conv(int(want.shape[1]), proj)
    # resampled only across square grids of the same width: another width, a grid that is not
    # square, or a tensor of another rank is reported by the strict load as the file has it
    pos = out.get("pos_embed")
    if (pos is not None and pos.dim() == 3 and pos.shape[1] > 1
            and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1):
        # (the file's own grid, for svp train's word on the image size: retest 96)
        model.checkpoint_grid = (math.isqrt(pos.shape[1] - 1),) * 2
    if (pos is not None and pos.shape != model.pos_embed.shape and pos.dim() == 3 and pos.shape[0] == 1
            and pos.shape[-1] == model.pos_embed.shape[-1] and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1):
        _warn_other_stride(math.isqrt(pos.shape[1] - 1), model)
        # (in the model's float32: timm casts its result back to the input's dtype, and a float16 file's
        # grid was rounded to float16 again after the interpolation: review 76)
        low = pos.is_floating_point() and pos.dtype in (torch.float16, torch.bfloat16)
        out["pos_embed"] = resample_pos_embed_midcls(pos.float() if low else pos, model.patch_embed.grid_size)
    # The head is dropped, all of it, when its class count differs from the model's (or the model
    # has none); with the same count it is loaded, and the strict load names a tensor of another
    # shape. Dropped tensor by tensor on their shapes, a head of the right count but another width
    # vanished silently, and one of mixed shapes came in half (the bias kept, the weight random).
    for name in [k for k in out if k.startswith("head_dist.")]:
        del out[name]
    heads = [k for k in out if k.startswith("head.")]
    counted = out.get("head.bias", out.get("head.weight"))
    file_classes = counted.shape[0] if counted is not None and counted.dim() >= 1 else None
    has_head = isinstance(model.head, nn.Module) and bool(model.head.state_dict())
    if heads and (not has_head or file_classes != getattr(model, "num_classes", None)):
        for name in heads:
            del out[name]
    # whether the model's head is about to take the file's (same class count): svp train
    # replaces it, as the official fine-tuning deletes head.* (svp.engine.setup.build_train_model)
    model.head_from_checkpoint = any(k.startswith("head.") for k in out)
    return out


def _warn_other_stride(side: int, model: nn.Module) -> None:
    """The official files are 224 px, patch 16, stride 16 or 8 (the ``_ft_`` ones): a file whose
    grid is that of the other stride at 224 px (27 against 14) is most likely a checkpoint of the
    other variant; resampling it runs, and gives a backbone the file was never trained as."""
    pe = model.patch_embed
    patch, stride = to_2tuple(pe.patch_size)[0], to_2tuple(pe.stride)[0]
    if patch != 16 or stride not in (8, 16):
        return
    other = 24 - stride  # 16 <-> 8
    if side == (224 - 16) // other + 1 != (224 - 16) // stride + 1:
        advice = ("If the file is a stride-8 checkpoint (the official *_ft_* files), build the *_stride8_* model "
                  "instead" if other == 8 else
                  "That is how a stride-8 model starts from a stride-16 file (as the official *_ft_* models did); "
                  "to use the file as it was trained, build the model without _stride8_")
        _logger.warning("pos_embed: the checkpoint's %dx%d grid is that of an official stride-%d model at 224 px, "
                        "this model has stride %d; resampled to %s. %s", side, side, other, stride,
                        tuple(pe.grid_size), advice)


def mismatch_lines(expected: Mapping, given: Mapping, allow_missing=(), limit: int = 20) -> List[str]:
    """Every way ``given`` (name -> tensor) fails to fit ``expected`` (name -> shape, or None for
    any shape): one line each for the missing, unexpected and mis-shaped names; [] when it fits.
    ``allow_missing`` lists name prefixes that may legitimately be absent (a dropped head)."""
    missing = [k for k in expected if k not in given and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in given if k not in expected]
    wrong = [f"{k} has shape {tuple(given[k].shape)}, expected {tuple(shape)}" for k, shape in expected.items()
             if k in given and shape is not None and tuple(given[k].shape) != tuple(shape)]
    return [f"  {len(items)} {title}: " + ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")
            for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items]


def vim_shape(tensors: Mapping) -> Optional[dict]:
    """A Vim state dict's (or model's) size as its tensors show it: width, depth, patch, state
    size; None for tensors that are no Vim's."""
    proj = tensors.get("patch_embed.proj.weight")
    if proj is None or len(getattr(proj, "shape", ())) != 4:
        return None
    # (layers by their mixer's own tensors: a stray 'layers.5.mixer.foo' beside a depth-2 Vim read as
    # depth 6 (review 76), and one missing tensor must not shorten it (retest 77))
    depths = [int(m.group(1)) for k in tensors
              for m in [re.match(r"layers\.(\d+)\.mixer\.(?:A_log|A_b_log|D|D_b|in_proj\.weight|out_proj\.weight|"
                                 r"x_proj\.weight|dt_proj\.weight|conv1d\.weight)$", k)] if m]
    a_log = next((tensors[k] for k in ("layers.0.mixer.A_log", "layers.0.mixer.A_b_log") if k in tensors), None)
    return {"width": int(proj.shape[0]), "depth": max(depths) + 1 if depths else 0,
            "patch": int(proj.shape[-1]),
            "d_state": int(a_log.shape[-1]) if a_log is not None and len(a_log.shape) == 2 else None}


def _show_shape(shape: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in shape.items() if v is not None)


def models_of_shape(shape: dict) -> List[str]:
    """The registered vim_* models whose default size is ``shape`` (built on the meta device:
    no memory, no weights)."""
    import timm
    names = []
    for name in timm.list_models("vim_*"):
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False, num_classes=0)
        except Exception:  # noqa: BLE001  (a model that does not build so: not a candidate)
            continue
        if vim_shape(dict(m.state_dict())) == shape:
            names.append(name)
    return names


_FAMILIES = (("a Vim", re.compile(r"layers\.\d+\.mixer\.")), ("a ViT", re.compile(r"blocks\.\d+\.attn\.")))


def _family(keys) -> Optional[str]:
    for name, pattern in _FAMILIES:
        if any(pattern.match(str(k)) for k in keys):
            return name
    return None


def size_hint(model: nn.Module, state_dict: Mapping) -> str:
    """Where a checkpoint does not fit because it is another size of Vim than ``model``: a
    sentence saying both sizes and the models of the file's size; where it is another family's (a
    ViT's file for a Vim, the reverse), a sentence saying so (both were described as Vims of depth
    0: retest 95); "" otherwise."""
    fam_have, fam_want = _family(state_dict), _family(model.state_dict())
    if fam_have and fam_want and fam_have != fam_want:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        return f"the file holds {fam_have}'s weights; the model{f' {name!r}' if name else ''} is {fam_want}"
    if fam_have == fam_want == "a ViT":
        return _vit_size_hint(model, state_dict)
    if fam_have != "a Vim" or fam_want != "a Vim":
        return ""
    have, want = vim_shape(state_dict), vim_shape(dict(model.state_dict()))
    if have is None or want is None or have == want:
        return ""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    which = models_of_shape(have)
    if name in which:   # the model's own default size: the arguments it was built with made it another
        advice = (f": {name} was built with arguments (model.kwargs, --model-args, --model-kwargs, or an "
                  f"adapter's backbone.json) that change its size from its default, which is the file's")
    else:
        advice = f": build {' or '.join(which)} (--model / model.name) to load it" if which else ""
    return (f"the file holds a Vim of {_show_shape(have)}; the model{f' {name!r}' if name else ''} is one of "
            f"{_show_shape(want)}" + advice)


# timm's ViT sizes by width (their names' middle word); depth 12 but for large and huge
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def vit_shape(tensors: Mapping) -> Optional[dict]:
    """A ViT state dict's size as its tensors show it (width, depth, patch); None for no ViT's."""
    proj = tensors.get("patch_embed.proj.weight")
    if proj is None or len(getattr(proj, "shape", ())) != 4:
        return None
    depths = [int(m.group(1)) for k in tensors for m in [re.match(r"blocks\.(\d+)\.attn\.qkv\.weight$", str(k))] if m]
    return {"width": int(proj.shape[0]), "depth": max(depths) + 1 if depths else 0, "patch": int(proj.shape[-1])}


def _vit_size_hint(model: nn.Module, state_dict: Mapping) -> str:
    """A ViT file of another size than the ViT ``model`` (review 96's "no size sentence")."""
    have, want = vit_shape(state_dict), vit_shape(dict(model.state_dict()))
    if have is None or want is None or have == want:
        return ""
    import timm
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    size = _VIT_SIZES.get(have["width"])
    guess = f"vit_{size}_patch{have['patch']}_224" if size else None
    advice = (f": build one of its size (--model / model.name, e.g. {guess}, or model.kwargs)"
              if guess and guess != name and timm.is_model(guess) else "")
    return (f"the file holds a ViT of {_show_shape(have)}; the model{f' {name!r}' if name else ''} is one of "
            f"{_show_shape(want)}" + advice)


def strict_load(model: nn.Module, state_dict: dict, source: str = "<checkpoint>",
                allow_missing=()) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped tensor in one error
    (with the sizes of both where the file is another size of Vim)."""
    lines = mismatch_lines({k: v.shape for k, v in model.state_dict().items()}, state_dict, allow_missing)
    if lines:
        hint = size_hint(model, state_dict)
        raise CheckpointError("\n".join([f"{source} does not match {type(model).__name__}"
                                          + (f" ({hint})" if hint else "") + ":"] + lines))
    model.load_state_dict(state_dict, strict=False)


def load_checkpoint_into(model, checkpoint, strict: bool = True, source: Optional[str] = None):
    """Read ``checkpoint`` (a path, a checkpoint dict or a state dict), adapt it to
    ``model`` (see ``checkpoint_filter_fn``) and load it strictly; the head may be
    absent (it was dropped because the class count differs). ``source`` names an
    already-read dict in errors."""
    if source is None:
        source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "<state dict>"
    state_dict = checkpoint_filter_fn(read_state_dict(checkpoint, source), model, source)
    if strict:
        strict_load(model, state_dict, source, allow_missing=("head.",))
    else:
        model.load_state_dict(state_dict, strict=False)
    _logger.info("loaded %s into %s", source, type(model).__name__)
    return model
