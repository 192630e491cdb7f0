"""What the oldest supported stack (torch 2.1, numpy 1.23; see constraints-oldest.txt) lacks.

``cpu_autocast`` asks whether CPU autocast is on and ``cpu_autocast_dtype`` in which dtype
(``autocast_enabled`` whether autocast is on for any device type):
``torch.is_autocast_enabled("cpu")`` and ``torch.get_autocast_dtype("cpu")`` exist from torch
2.4, ``torch.is_autocast_cpu_enabled`` and ``torch.get_autocast_cpu_dtype`` (deprecated since)
before.

``restricted_torch_load`` reads a ``.pth`` with an explicit allow-list of globals on any torch:
torch < 2.5 has no ``torch.serialization.safe_globals``, so its ``weights_only=True`` cannot
let the pickled ``argparse.Namespace`` of official Vim checkpoints through. The unpickler
below resolves a global only if it is in the allow-list (what torch's own weights-only
unpickler allows by default, plus ``argparse.Namespace``); everything else, ``os.system``
included, is refused before it can be called.

``recording`` asks whether ``torch.jit.trace`` or ``torch.export`` is recording the model
(``torch.compiler.is_exporting`` exists from torch 2.5; before, only tracing is seen).

``memory_bytes`` is the machine's physical memory (0 where the system does not say: Windows);
``threads_problem`` bounds a command's ``--threads`` by the machine's cores.

``cpu_bf16_instructions`` asks which bfloat16 instructions the CPU has: torch's probes exist
from torch 2.2; before, ``/proc/cpuinfo`` is read.

``SEED_LIMIT`` bounds every seed a user gives (``train.seed``, ``model.init_seed``, ``svp data
--seed``): torch's CPU generator and numpy's keep 32 bits, so 2**32 + s trained seed s's run (a
sweep over seeds s and s + 2**32 repeated one), and 2**64 stopped in ``torch.manual_seed``.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import contextlib
import os
import pickle
import types
from typing import Any, Dict, List, Optional

import torch

# Functions torch itself pickles tensors with; those missing in the installed torch are skipped.
_REBUILD_FUNCTIONS = (
    "_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_tensor",
    "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_sparse_tensor",
    "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_cpu_tensor",
)


def _allowed_globals() -> Dict[str, Any]:
    import _codecs

    rc: Dict[str, Any] = {
        "argparse.Namespace": argparse.Namespace,
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch.Size": torch.Size,
        "torch.Tensor": torch.Tensor,
        "torch.device": torch.device,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "_codecs.encode": _codecs.encode,  # bytes under pickle protocol 2 (torch.save's default)
        "builtins.bytearray": bytearray,
        "builtins.set": set,
        "builtins.complex": complex,
    }
    for value in vars(torch).values():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            rc[str(value)] = value
    for cls in torch._tensor_classes:
        rc[f"{cls.__module__}.{cls.__name__}"] = cls
    for cls in torch._storage_classes:
        if cls in (torch.storage.TypedStorage, torch.storage.UntypedStorage):
            rc[f"{cls.__module__}.{cls.__name__}"] = cls
        else:  # legacy typed storages are only dtype markers when loading
            rc[f"{cls.__module__}.{cls.__name__}"] = torch.serialization.StorageType(cls.__name__)
    for name in _REBUILD_FUNCTIONS:
        if hasattr(torch._utils, name):
            rc[f"torch._utils.{name}"] = getattr(torch._utils, name)
    return rc


class AllowListUnpickler(pickle._Unpickler):
    """An unpickler that resolves a global only if ``allowed()`` (``"module.name"`` -> object)
    holds it; anything else is refused before it can be called. ``refusal`` ends the error
    message. It sets state (BUILD) only on instances of the allowed classes (and tensors), never
    on a class: BUILD on the class ``argparse.Namespace`` set its attributes for the whole
    process (a crafted .pth replaced ``Namespace.__init__``), which torch's weights-only
    unpickler refuses too. Python's own implementation, whose opcodes can be overridden (the C
    one's cannot); the pickles it reads are small (tensor data is stored apart) or one bytes
    object (a CIFAR batch)."""

    refusal = "(no globals are)"
    dispatch = dict(pickle._Unpickler.dispatch)

    def allowed(self) -> Dict[str, Any]:
        return {}

    def load_build(self) -> None:
        inst = self.stack[-2]   # (the state is on top)
        classes = tuple(v for v in self.allowed().values() if isinstance(v, type))
        if isinstance(inst, type) or not isinstance(inst, classes + (torch.Tensor,)):
            what = f"the class {inst.__name__}" if isinstance(inst, type) else f"a {type(inst).__name__}"
            raise pickle.UnpicklingError(f"setting the state of {what} is not allowed {self.refusal}")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        # protocol 2 (torch.save's, Python 2's) spells Python 3 names the Python 2 way
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return self.allowed()[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed {self.refusal}") from None


# what a bytearray made while a checkpoint is read may hold: the file's size (restricted_torch_load
# sets it). bytearray(N) is N zero bytes: an 818-byte .pth asked for 2 GiB, and one near the
# machine's memory had the process killed (review41)
_BYTES_LIMIT: List[Optional[int]] = [None]


def _bounded_bytearray(*args) -> bytearray:
    limit = _BYTES_LIMIT[0]
    if limit is not None and args and isinstance(args[0], int) and args[0] > limit:
        raise pickle.UnpicklingError(f"a bytearray of {args[0]:,} bytes in a file of {limit:,} bytes is not allowed "
                                     f"(a checkpoint's pickle may not ask for more memory than its file holds)")
    return bytearray(*args)


class RestrictedUnpickler(AllowListUnpickler):
    """torch's weights-only allow-list plus ``argparse.Namespace`` (see the module docstring), a
    bytearray bounded by the file's size, whether made by the global or by protocol 5's
    BYTEARRAY8 opcode (which allocates before it reads: 807 bytes asked 2 GiB, review43), and the
    8-byte-length bytes and strings the same way."""

    refusal = "(only tensors, containers and argparse.Namespace are)"
    _allowed: Dict[str, Any] = {}
    dispatch = dict(AllowListUnpickler.dispatch)

    def _length8(self, op: str) -> int:
        import struct
        n, = struct.unpack("<Q", self.read(8))
        limit = _BYTES_LIMIT[0]
        if limit is not None and n > limit:
            raise pickle.UnpicklingError(f"{op} of {n:,} bytes in a file of {limit:,} bytes is not allowed "
                                         f"(a checkpoint's pickle may not ask for more memory than its file holds)")
        return n

    def load_bytearray8(self) -> None:
        b = bytearray(self._length8("BYTEARRAY8"))
        self.readinto(b)
        self.append(b)

    def load_binbytes8(self) -> None:
        self.append(self.read(self._length8("BINBYTES8")))

    def load_binunicode8(self) -> None:
        self.append(str(self.read(self._length8("BINUNICODE8")), "utf-8", "surrogatepass"))

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.BINUNICODE8[0]] = load_binunicode8

    def allowed(self) -> Dict[str, Any]:
        if not RestrictedUnpickler._allowed:
            RestrictedUnpickler._allowed = dict(_allowed_globals(), **{"builtins.bytearray": _bounded_bytearray})
        return RestrictedUnpickler._allowed


def _restricted_load(file, **kwargs) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load takes a module-like object with ``Unpickler`` and ``load`` (and reads ``__name__``).
restricted_pickle = types.ModuleType("svp_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def restricted_torch_load(path, mmap: bool = False) -> Any:
    """``torch.load(path)`` onto the CPU through ``RestrictedUnpickler``. ``weights_only`` must
    be False here only because torch refuses a custom ``pickle_module`` with it; the allow-list
    above is what keeps arbitrary code from running."""
    _BYTES_LIMIT[0] = os.path.getsize(path)
    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=False, pickle_module=restricted_pickle,
                          mmap=mmap)  # torch 2.1 maps only a str path
    finally:
        _BYTES_LIMIT[0] = None


def makes_bytearrays(path) -> bool:
    """Whether the pickle of a torch checkpoint names ``bytearray`` (a zip's ``data.pkl``; a
    legacy file whole): torch's own weights-only unpickler allows it unbounded, so such a file is
    read through :func:`restricted_torch_load`, which bounds it. (torch.save writes bytes through
    ``_codecs.encode``; a checkpoint of tensors and Namespaces holds no bytearray. Protocol 5's
    BYTEARRAY8 opcode needs no global: torch's own unpickler refuses it.) Read in pieces, never
    more than the file's size: a legacy file holds its tensors' bytes too."""
    import zipfile
    path = os.fspath(path)
    limit = os.path.getsize(path)

    def scan(f) -> bool:
        tail, seen = b"", 0
        while seen <= limit:
            piece = f.read(1 << 20)
            if not piece:
                return False
            seen += len(piece)
            if b"bytearray" in tail + piece:
                return True
            tail = piece[-8:]
        return True   # (a member inflating past its archive: read through svp's unpickler)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                for name in (n for n in z.namelist() if n.endswith("data.pkl")):
                    with z.open(name) as f:
                        if scan(f):
                            return True
        except zipfile.BadZipFile:
            # its checksum fails: damaged, or saved without checksums (set_crc32_options(False),
            # which torch reads: retest 59): svp's unpickler reads it, bounded; the loader's
            # checksum check says which
            return True
        return False
    with open(path, "rb") as f:
        return scan(f)


def recording() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` is recording operators now: svp's fused
    kernels (numba on numpy views of the tensors, Triton launches) run outside PyTorch's
    operators, so a recording of them would hold nothing (trace) or fail (export's fake
    tensors have no numpy view). ``torch.compile`` is not recording in this sense: it breaks
    its graph around them and runs them."""
    # (called ~500 times a Vim-Tiny forward: the two functions looked up once, at import)
    return _is_tracing() or (_is_exporting is not None and _is_exporting())


_is_tracing = torch.jit.is_tracing
_is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)


def cpu_autocast() -> bool:
    """Whether CPU autocast (``torch.autocast("cpu", ...)``) is on in this thread."""
    return autocast_enabled("cpu")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on in this thread for ``device_type`` ("cpu", "cuda", ...)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no argument means CUDA
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:  # a device type autocast does not know (meta: "unknown device type")
        return False


_NO_CONTEXT = contextlib.nullcontext()


def no_cpu_autocast():
    """``torch.autocast("cpu", enabled=False)`` where CPU autocast is on, else a context that
    does nothing: entering and leaving an autocast context takes ~2.5 us, and the fused CPU
    nodes open one per call for the calls autocast would otherwise recast."""
    return torch.autocast("cpu", enabled=False) if cpu_autocast() else _NO_CONTEXT


def no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` where autocast is on for ``device_type``,
    else a context that does nothing (also for a device type autocast does not know, such as
    meta, whose autocast context would raise)."""
    return torch.autocast(device_type, enabled=False) if autocast_enabled(device_type) else _NO_CONTEXT


def cpu_autocast_dtype() -> torch.dtype:
    """The dtype CPU autocast runs its lower-precision ops in (bfloat16 unless set otherwise)."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype("cpu")
    return torch.get_autocast_cpu_dtype()  # torch < 2.4


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs products in on ``device_type`` in this thread, or None where it
    is off (or unknown to autocast, as for the meta device)."""
    if not autocast_enabled(device_type):
        return None
    if device_type == "cpu":
        return cpu_autocast_dtype()
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype()  # torch < 2.4: CUDA


def cpu_bf16_instructions() -> Optional[List[str]]:
    """The bfloat16 dot-product instruction sets this CPU has, of avx512_bf16 (e.g. AMD Zen 4,
    Intel Cooper Lake) and amx_bf16 (Intel Sapphire Rapids and later): what makes bfloat16
    products faster than float32 on a CPU (2.3-2.8x on a Zen 4 core at a Vim step's shapes,
    docs/benchmarks.md). An empty list where an x86 CPU has neither; None where svp cannot tell:
    off x86 (Arm CPUs have bfloat16 instructions of their own, which svp has not measured), and
    with torch < 2.2 off Linux."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    cpu = getattr(torch, "cpu", None)
    probes = {"avx512_bf16": getattr(cpu, "_is_avx512_bf16_supported", None),
              "amx_bf16": getattr(cpu, "_is_amx_tile_supported", None)}
    if all(probes.values()):
        return [name for name, probe in probes.items() if probe()]
    flags = cpuinfo_field("flags")
    if flags is None:
        return None
    return [name for name in probes if name in flags.split()]


SEED_LIMIT = 2**32


def memory_bytes() -> int:
    """This machine's physical memory in bytes; 0 where the system does not say (not POSIX:
    Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def cpuinfo_field(key: str, path: str = "/proc/cpuinfo") -> Optional[str]:
    """The value of the first ``key : value`` line of /proc/cpuinfo (stripped; the first CPU's),
    or None where the file or the key is missing (off Linux; Arm has no "model name")."""
    try:
        with open(path) as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def no_bf16_warning(found: Optional[List[str]]) -> str:
    """What a bfloat16-autocast run or server says on a CPU where ``cpu_bf16_instructions()``
    gave ``found`` (empty or None)."""
    return ("this CPU has no bfloat16 dot-product instructions (avx512_bf16, amx_bf16)"
            f"{'' if found is not None else ' as far as svp can tell'}; bfloat16 products may be slower "
            "than float32 here")


def threads_problem(n, flag: str = "--threads"):
    """What is wrong with ``n`` as a command's thread count, or None: at least one, and a bound
    (64, or 8 per core past 8 cores): --threads 100000 ended in a segmentation fault or an
    out-of-memory traceback as the pools started."""
    most = max(64, 8 * (os.cpu_count() or 1))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        return f"{flag} must be between 1 and {most} (this machine has {os.cpu_count()} cores), got {n}"
    return None


def numpy_bridge_problem() -> Optional[str]:
    """Why torch cannot hand arrays to and from numpy here, if it cannot: torch before 2.3 was
    built against NumPy 1.x and fails on NumPy 2 ("Numpy is not available"), and the newest torch
    for Intel Macs is 2.2, beside which pip installs the newest numpy (review45). svp's data
    pipeline and CPU kernels need the bridge: said at import, not as a traceback at the first batch."""
    import numpy as np
    try:
        torch.from_numpy(np.zeros(1, dtype=np.float32)).numpy()
        return None
    except RuntimeError as e:
        return (f"torch {torch.__version__} cannot exchange arrays with numpy {np.__version__} "
                f"({str(e).strip() or type(e).__name__}): torch before 2.3 was built against NumPy 1.x (the newest "
                f"torch for Intel Macs is 2.2). Install numpy<2 (pip install 'numpy<2'), or torch >= 2.3")


def torchvision_problem(e: BaseException) -> Optional[str]:
    """What ``e``, raised while svp imported timm (which imports torchvision), says of the
    install, if it is torchvision's: torchvision missing, or a torchvision built for another torch
    (a CPU torch wheel from PyTorch's index beside PyPI's torchvision: "operator torchvision::nms
    does not exist", spec checkpoints-and-install.md 1.2). Said at import with the fix, where it
    was a traceback through timm's imports (review 54); None for any other error."""
    missing = isinstance(e, ModuleNotFoundError) and e.name == "torchvision"
    # (one of its own modules missing: a broken install, retest 56 found it called "not installed")
    partial = isinstance(e, ImportError) and (e.name or "").startswith("torchvision.")
    other_torch = isinstance(e, RuntimeError) and "torchvision::" in str(e)
    if not (missing or partial or other_torch):
        return None
    tv = f" {installed_version('torchvision')}" if installed_version("torchvision") else ""
    # (torch 2.N pairs with torchvision 0.N+15: 2.1 with 0.16, 2.14 with 0.29)
    parts = torch.__version__.split("+")[0].split(".")
    pair = f" (torchvision 0.{int(parts[1]) + 15})" if parts[0] == "2" and parts[1:2] and parts[1].isdigit() else ""
    index = ", from the index torch came from"
    if "+cpu" in torch.__version__:
        index = ("; this torch is PyTorch's CPU build, so from the same index: pip install torchvision "
                 "--index-url https://download.pytorch.org/whl/cpu")
    what = ("torchvision is not installed; timm (svp's model library) needs it" if missing else
            f"torchvision{tv} does not load beside torch {torch.__version__} ({str(e).strip()}): "
            + ("it was built for another torch" if other_torch else "a broken install"))
    return f"{what}. Install the torchvision release made for torch {torch.__version__}{pair}{index}"


def installed_version(dist: str) -> Optional[str]:
    """The version pip's metadata gives for distribution ``dist``, without importing it; None
    where none is installed (a source folder on the path has no metadata)."""
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def module_version(module: str, dist: Optional[str] = None) -> str:
    """``svp doctor``'s row for a package: its ``__version__``; "not installed"; or, where it is
    installed and its import fails or exits (mamba_ssm without its CUDA extension, spec
    checkpoints-and-install.md 1.3; a torchvision of another torch, 1.2), "<version> installed, not
    importable (why)" ("found" for a folder without pip's metadata). ``dist`` is the
    distribution's name where it is not the module's."""
    import importlib
    try:
        found = getattr(importlib.import_module(module), "__version__", None)
        # (one without __version__ was "unknown" where pip's metadata knew it: retest 59)
        return str(found) if found else installed_version(dist or module) or "unknown"
    except (Exception, SystemExit) as e:   # (mamba_ssm's import can exit: review 54)
        why = f"{type(e).__name__}: {e}"
        missing = isinstance(e, ModuleNotFoundError) and e.name == module
    version = installed_version(dist or module)
    if missing and version is None:
        return "not installed"
    return f"{f'{version} installed' if version else 'found'}, not importable ({why})"
