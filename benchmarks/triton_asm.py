"""The GPU path's Triton kernels compiled as a training step's launches compile them, without a GPU:
registers, spills and what a kernel's code does that costs (warp shuffles, layout conversions,
shared-memory round trips, barriers), from the PTX and ptxas.

    python benchmarks/triton_asm.py [--model vim_small_patch16_224] [--method svp] [--batch 128]
                                    [--arch 90] [--maxnreg FWD BWD] [--json OUT] [--keep DIR]

How: one training step (forward, cross-entropy, backward) of the model with the method runs on
fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes, strides, no data and no GPU) under
bfloat16 autocast, as `svp train` runs on a GPU with `train.amp`, with the scan on the 'triton'
backend and every Triton launch recorded instead of run. Each distinct launch is then compiled
for sm_<arch> the way Triton's launcher compiles it: its arguments specialised by Triton's own
rules (a pointer 16-byte aligned, an integer divisible by 16, an integer equal to 1 made a
constant), which decide the kernel's layouts and so its registers. Compiled without that
specialisation (every integer and pointer plain, as tests/test_scan_triton.py's compile check
does) the scan's kernels get other layouts: 255 registers each, where a launch's take 157-168
(Triton 3.8; docs/benchmarks.md, "The Triton kernels as a launch compiles them").

Registers and spills come from ptxas -v (Triton's own ptxas), shared memory from Triton's
metadata, and the warps an SM holds of each kernel from those by CUDA's occupancy rules (sm_80 and
sm_90); the counts are of instructions in the PTX (static: an instruction inside a loop counts
once). Nothing here is timed.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

from common import json_path   # (benchmarks/common.py: a script runs with its folder on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
    # Triton's library functions must be imported compiled (see tests/test_scan_triton.py); the
    # capture below turns the interpreter on itself, after the import
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402
import triton  # noqa: E402

# what is counted in the PTX
COUNTS = {"shfl": r"shfl\.sync", "ld.shared": r"ld\.shared", "st.shared": r"st\.shared", "bar": r"bar\.sync",
          "ex2": r"ex2\.approx", "ld.global": r"ld\.global", "st.global": r"st\.global"}


# an SM's limits by compute capability (CUDA's occupancy tables): registers, warps, blocks, shared
# memory bytes (of which 1 KiB a block is the system's)
SM_LIMITS = {80: (65536, 64, 32, 167936), 90: (65536, 64, 32, 233472)}


def warps_per_sm(arch, registers, warps, shared):
    """The warps of one kernel an SM holds at once (registers allocated 256 a warp), or None for
    an arch not in SM_LIMITS."""
    if arch not in SM_LIMITS or not registers:
        return None
    regs, max_warps, max_blocks, smem = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(max_blocks, regs // (per_warp * warps), max_warps // warps)
    if shared:
        blocks = min(blocks, smem // (shared + 1024))
    return blocks * warps


class _Pointer:
    """What Triton's specialisation reads of a tensor argument: its dtype and its address, here
    the tensor's offset into its storage on a 256-byte aligned allocation (as CUDA's caching
    allocator gives; a fake tensor has no address of its own). A slice such as B and C of x_proj's
    output (Vim-Tiny: B at 12 bfloat16 columns, 24 bytes in) is then not 16-byte aligned, as on a GPU."""

    def __init__(self, t):
        self.dtype = t.dtype
        self.offset = t.storage_offset() * t.element_size()

    def data_ptr(self):
        return 256 + self.offset


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}


def _specialize(a):
    """(type, attribute) of one launch argument, as Triton's launcher specialises it: Triton's own
    function where it has one (3.4 and later), else its rules written out."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        pass
    else:
        return native_specialize_impl(BaseBackend, a, False, True, True)
    if isinstance(a, bool):
        return "i1", ""
    if isinstance(a, int):
        if a == 1:
            return "constexpr", 1
        return ("i32" if -2**31 <= a < 2**31 else "i64"), ("D" if a % 16 == 0 else "")
    if isinstance(a, float):
        return "fp32", ""
    return "*" + _DTYPES[a.dtype], ("D" if a.data_ptr() % 16 == 0 else "")


_materialize = {}


def _backward(loss):
    """loss.backward() without autograd's engine, which needs a real CUDA device: every node of
    the graph called in reverse topological order, as the engine would (a Python node gets zeros
    for the gradients it did not get unless it set_materialize_grads(False); each gradient is cast
    to the dtype of the input it flows to, as the engine's validate_outputs does)."""
    order, seen, stack = [], set(), [(loss.grad_fn, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif node is not None and node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    grads = {loss.grad_fn: [torch.ones_like(loss)]}
    for node in reversed(order):
        g = grads.pop(node, None)
        if g is None or type(node).__name__ == "AccumulateGrad":
            continue
        meta = node._input_metadata
        g = list(g) + [None] * (len(meta) - len(g))
        if hasattr(node, "_forward_cls"):   # a Python Function: one result per forward input
            if _materialize.get(id(node), True):
                g = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if x is None else x for x, m in zip(g, meta)]
            outs = node.apply(*g)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = zip([e for e in node.next_functions if e[0] is not None],
                        [o for o, need in zip(outs, node.needs_input_grad) if need])
        else:
            outs = node(*g)
            pairs = zip(node.next_functions, outs if isinstance(outs, (tuple, list)) else (outs,))
        for (nxt, i), o in pairs:
            if nxt is None or o is None:
                continue
            want = nxt._input_metadata[i].dtype if type(nxt).__name__ != "AccumulateGrad" else o.dtype
            o = o.to(want)
            slot = grads.setdefault(nxt, [])
            slot.extend([None] * (i + 1 - len(slot)))
            slot[i] = o if slot[i] is None else slot[i] + o


def capture(model_name, method, batch):
    """{(kernel name, signature, constexprs, attrs, options): [launches, the kernel's function]}
    of one training step (forward, cross-entropy, backward) on fake CUDA tensors
    (torch's FakeTensorMode: shapes, dtypes and strides, no data, no GPU) under bfloat16
    autocast, the Triton launches recorded instead of run."""
    import timm
    from torch._subclasses.fake_tensor import FakeTensorMode

    import svp.models  # noqa: F401  (registers the Vim models)
    from svp.ops import conv_triton, dispatch, norm_triton, prompt_triton, scan_triton
    from svp.peft import get_peft_model, make_config

    launches: dict = collections.OrderedDict()

    def record(kernel, grid, *args, **kwargs):
        kwargs = {**scan_triton.launch_options(), **kwargs}   # (what _launch adds)
        fn = getattr(kernel, "fn", kernel)
        names = list(fn.__code__.co_varnames[:fn.__code__.co_argcount])
        const = {k: v for k, v in kwargs.items() if k in names}
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
        free = [n for n in names if n not in const]
        if len(free) != len(args):
            raise RuntimeError(f"{fn.__name__}: {len(args)} positional arguments for {len(free)} parameters")
        sig, attrs = {}, {}
        for n, a in zip(free, args):
            kind, attr = _specialize(_Pointer(a) if isinstance(a, torch.Tensor) else a)
            if kind == "constexpr":          # an integer equal to 1
                const[n] = attr
                continue
            sig[n] = kind
            if attr:
                attrs[n] = attr
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())), tuple(sorted(attrs.items())),
               options)
        if key not in launches:
            launches[key] = [0, fn]
        launches[key][0] += 1

    smg = torch.autograd.function.FunctionCtx.set_materialize_grads

    def set_materialize_grads(ctx, value):
        _materialize[id(ctx)] = bool(value)
        return smg(ctx, value)

    _materialize.clear()   # (keyed on the nodes' ids, which a finished capture's may share)
    saved = {m: m._launch for m in (scan_triton, conv_triton, norm_triton, prompt_triton)}
    for m in saved:
        m._launch = record
    torch.autograd.function.FunctionCtx.set_materialize_grads = set_materialize_grads
    # the 'triton' backend takes tensors of a device that is not there only under the interpreter,
    # which nothing here runs (the launches are recorded)
    os.environ["TRITON_INTERPRET"] = "1"
    # (svp.ops.kept keys its kept casts on data pointers, which fake tensors warn about: no data here)
    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    try:
        torch.manual_seed(0)
        model = get_peft_model(timm.create_model(model_name, pretrained=False, num_classes=100),
                               make_config(method, num_classes=100)).train()   # (as gpu_bytes)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to("cuda")
            x = torch.empty(batch, 3, 224, 224, device="cuda")
            y = torch.zeros(batch, dtype=torch.long, device="cuda")
            dispatch.set_backend("triton")
            # torch.autocast refuses a CUDA that is not there; its switches do not
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            try:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            finally:
                torch.set_autocast_enabled("cuda", False)
            with torch.no_grad():   # (as the engine runs a backward without create_graph)
                _backward(loss)
    finally:
        dispatch.set_backend(None)
        del os.environ["TRITON_INTERPRET"]
        torch.autograd.function.FunctionCtx.set_materialize_grads = smg
        for m, f in saved.items():
            m._launch = f
    return launches


def _ptxas(arch):
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def compile_one(key, fn, arch, keep=None, tag=None):
    """``key``'s kernel compiled for sm_<arch>: ptxas's registers and spill bytes, and the PTX's
    counts (COUNTS) and the TTGIR's layout conversions. ``keep``: a folder for its PTX and TTGIR,
    named ``tag`` (default the kernel's name)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    name, sig, const, attrs, options = key
    jf = JITFunction(fn)
    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    signature = dict(sig)
    constexprs = dict(const)
    signature.update({n: "constexpr" for n in constexprs})
    src = ASTSource(jf, signature, constexprs=constexprs,
                    attrs={(jf.arg_names.index(n),): backend.parse_attr(a) for n, a in attrs})
    k = triton.compile(src, target=target, options=dict(options))
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    row = {n: len(re.findall(p, ptx)) for n, p in COUNTS.items()}
    row["convert_layout"] = ttgir.count("ttg.convert_layout")
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    tag = tag or name
    path = os.path.join(keep, f"{tag}.ptx") if keep else os.path.join(tempfile.gettempdir(),
                                                                      f"svp_triton_asm_{os.getpid()}_{tag}.ptx")
    with open(path, "w") as f:
        f.write(re.sub(r"^\.target sm_\d+a?$", f".target {sm}", ptx, flags=re.M))
    r = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={sm}", path, "-o", os.devnull], capture_output=True, text=True)
    if not keep:
        os.remove(path)
    if r.returncode:
        raise RuntimeError(f"ptxas failed on {name}: {r.stderr[-2000:]}")
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", r.stderr)
    row.update(registers=int(regs[-1]) if regs else None, spill_bytes=int(spill[-1]) if spill else None,
               shared_bytes=k.metadata.shared)
    row["warps_per_sm"] = warps_per_sm(arch, row["registers"], dict(options).get("num_warps", 4), row["shared_bytes"])
    if keep:
        with open(os.path.join(keep, f"{tag}.ttgir"), "w") as f:
            f.write(ttgir)
    return row


def _variant(const, skip=("N", "BLOCK_N", "K", "W", "STAGES", "HAS_Z", "HAS_D", "HAS_BIAS", "SOFTPLUS", "SILU")):
    """The constexprs that tell a kernel's launches apart (the ones every launch shares left out)."""
    return ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in const if k not in skip)


def scan_caps():
    from svp.ops import scan_triton
    return dict(scan_triton.MAXNREG)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vim_small_patch16_224")
    ap.add_argument("--method", default="svp")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: H100/H200)")
    ap.add_argument("--maxnreg", type=int, nargs=2, metavar=("FWD", "BWD"),
                    help="the scan kernels' register caps (scan_triton.MAXNREG; 0: none) for this compile")
    ap.add_argument("--json", type=json_path, help="write the rows here")
    ap.add_argument("--keep", help="keep each kernel's PTX and TTGIR in this folder")
    a = ap.parse_args(argv)
    if a.keep:
        os.makedirs(a.keep, exist_ok=True)
    if a.maxnreg:
        from svp.ops import scan_triton
        scan_triton.MAXNREG.update(fwd=a.maxnreg[0] or None, bwd=a.maxnreg[1] or None)
    launches = capture(a.model, a.method, a.batch)
    rows = []
    for key, (n, fn) in launches.items():
        name, sig, const, attrs, options = key
        row = dict(kernel=name, variant=_variant(const), launches=n, warps=dict(options).get("num_warps", 4),
                   maxnreg=dict(options).get("maxnreg"), aligned=[k for k, _ in attrs])
        row.update(compile_one(key, fn, a.arch, a.keep, f"{name}-{len(rows)}"))
        rows.append(row)
    print(f"# {a.model}, {a.method}, one training step at batch {a.batch} under bfloat16 autocast; sm_{a.arch}; "
          f"scan register caps {scan_caps()}; "
          f"Triton {triton.__version__}, torch {torch.__version__}")
    cols = ["kernel", "variant", "launches", "warps", "registers", "spill_bytes", "shared_bytes", "warps_per_sm",
            "shfl", "convert_layout", "ld.shared", "st.shared", "bar", "ex2"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(model=a.model, method=a.method, batch=a.batch, arch=a.arch, triton=triton.__version__,
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
