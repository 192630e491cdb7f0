"""Explicit 16-lane float32 vectors for numba kernels.

numba vectorises loops over arrays by itself, but it cannot tell LLVM that two arrays do not
overlap, so every vectorised loop starts with runtime overlap checks between all the arrays
it touches. In the scan's backward, whose inner loops over 64 channels are entered once per
(step, state), those checks and the register spills they caused were most of the executed
instructions. A kernel written with the ``f32x16`` values of this module has no loops over
lanes at all: each value is one LLVM ``<16 x float>`` (one AVX-512 register, two AVX2 or four
NEON registers: LLVM splits it where the machine is narrower), loaded from and stored to an
array at an element offset.

Every operation is exact IEEE float32 and spelled out: ``fma`` is ``llvm.fma`` (one rounding),
``a * b + c`` is two roundings, and no fast-math flag lets LLVM rewrite either. So the bits a
kernel produces do not depend on how LLVM schedules it, on whether numba compiled it now or
loaded it from its disk cache, or on the vector width of the machine. The one instruction
chosen per machine, AVX-512's ``vscalefps`` for the power-of-two scalings (``vscale_biased``,
``vscale_pow2i``), gives the portable form's bits wherever the scan kernels use it (they flush
denormals; see the note above ``_target_has_avx512f``).

A uint16 array stands for bfloat16 values (their bits; numpy has no bfloat16): ``vload`` widens
them exactly and ``vstore`` rounds to them as torch's cast does (``as_f32`` / ``to_elem`` for
single elements), so a kernel reads and writes CPU autocast's bfloat16 tensors without casts.

Operators ``+ - * /`` work between two vectors and between a vector and a scalar (broadcast),
unary ``-`` negates. Everything lowers to generic LLVM IR (on a CPU without FMA instructions
``llvm.fma`` becomes a correctly rounded library call: slow, same bits); the prefetch hints,
the denormal mode (``flush_denormals``, x86 only) and ``vscalefps`` (AVX-512) are the only
target-dependent pieces; the hints change no result, the mode changes only results below
float32's normal range, and ``vscalefps`` differs from the portable form only there.
"""
from __future__ import annotations

import operator
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

VL = W = 16               # lanes
_F = ir.FloatType()
_I = ir.IntType(32)
_VF = ir.VectorType(_F, W)
_VI = ir.VectorType(_I, W)


class F32x16(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


def _llvm_version():
    from llvmlite import binding
    return tuple(binding.llvm_version_info)


def _is_f32_array(a):
    return isinstance(a, types.Array) and a.dtype == types.float32


def _elem_ptr(context, builder, aryty, ary, idx, idxty):
    arr = context.make_array(aryty)(context, builder, ary)
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.gep(arr.data, [i])


@intrinsic
def vstream(typingctx, arr, idx, v):
    """vstore as a non-temporal (streaming) store on x86: the line is written without being
    read into the caches first, for outputs written once and read again only much later. The
    address must be 64-byte aligned (x86 faults otherwise): callers check it before choosing
    this over vstore. The same values as vstore; elsewhere it is vstore."""
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                            _VF.as_pointer())
        if not _X86:
            builder.store(args[2], p, align=4)
            return context.get_dummy_value()
        st = builder.store(args[2], p, align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_I, 1)]))
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


def _is_bf16_array(a):
    """bfloat16 values as numba sees them: their bits in a uint16 array (numpy has no
    bfloat16; ``t.view(torch.int16).numpy().view(np.uint16)`` is a torch tensor's)."""
    return isinstance(a, types.Array) and a.dtype == types.uint16


_VH = ir.VectorType(ir.IntType(16), W)
_BF16_NAN = 0x7FC0   # the NaN c10::BFloat16's rounding gives (its sign and payload are not kept)


def _widen_bf16(builder, h, lanes=W):
    """<16 x i16> bfloat16 bits -> the <16 x float> they stand for: exact (the high half).
    ``lanes`` None: one i16 -> one float."""
    i32, f32 = (_VI, _VF) if lanes else (_I, _F)
    sh = ir.Constant(i32, [16] * W if lanes else 16)
    return builder.bitcast(builder.shl(builder.zext(h, i32), sh), f32)


def _narrow_bf16(builder, v, lanes=W):
    """<16 x float> -> <16 x i16> bfloat16 bits, rounded to nearest, ties to even, by the
    integer steps of c10::BFloat16's round_to_nearest_even, so the bits are torch's ``.to(
    torch.bfloat16)`` (whose vector paths may give a NaN another sign or payload: a NaN
    either way). Overflow rounds to infinity; infinities stay. ``lanes`` None: a scalar."""
    i32, i16 = (_VI, _VH) if lanes else (_I, ir.IntType(16))
    i = builder.bitcast(v, i32)
    c = lambda x: ir.Constant(i32, [x] * W if lanes else x)  # noqa: E731
    lsb = builder.and_(builder.lshr(i, c(16)), c(1))
    r = builder.lshr(builder.add(i, builder.add(lsb, c(0x7FFF))), c(16))
    r = builder.select(builder.fcmp_unordered("uno", v, v), c(_BF16_NAN), r)
    return builder.trunc(r, i16)


@intrinsic
def is_bf16(typingctx, arr):
    """Whether ``arr`` holds bfloat16 (a uint16 array): a constant of the compiled function, so a
    branch on it is folded away and a float32 kernel runs the float32 side's code only."""
    if not isinstance(arr, types.Array):
        return None
    val = int(_is_bf16_array(arr))

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), val)

    return types.boolean(arr), codegen


@intrinsic
def is_2d(typingctx, arr):
    """Whether ``arr`` is a 2-D array: a constant of the compiled function, like is_bf16. A kernel
    that takes an optional operand as a 2-D array, or a 1-D placeholder when it is absent,
    compiles each case to its own code with no runtime branch in its loops."""
    if not isinstance(arr, types.Array):
        return None
    val = int(arr.ndim == 2)

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), val)

    return types.boolean(arr), codegen


@intrinsic
def as_f32(typingctx, x):
    """An element read from a float32 array as it is, from a uint16 (bfloat16) one widened
    exactly: the scalar counterpart of vload, for the auto-vectorised kernels' loops."""
    if x not in (types.float32, types.uint16):
        return None
    bf16 = x == types.uint16

    def codegen(context, builder, sig, args):
        return _widen_bf16(builder, args[0], lanes=None) if bf16 else args[0]

    return types.float32(x), codegen


@intrinsic
def to_elem(typingctx, v, arr):
    """float32 ``v`` as an element of ``arr``: itself for a float32 array, rounded to bfloat16
    bits for a uint16 one (as vstore rounds): ``arr[i] = to_elem(v, arr)``."""
    if not (v == types.float32 and (_is_f32_array(arr) or _is_bf16_array(arr))):
        return None
    bf16 = _is_bf16_array(arr)

    def codegen(context, builder, sig, args):
        return _narrow_bf16(builder, args[0], lanes=None) if bf16 else args[0]

    return arr.dtype(v, arr), codegen


@intrinsic
def vload(typingctx, arr, idx):
    """16 consecutive float32 of ``arr`` (C-contiguous) from flat element offset ``idx``. A
    uint16 ``arr`` holds bfloat16 bits (``_is_bf16_array``): its values are widened, exactly.
    So one kernel source reads float32 or bfloat16 (numba compiles it once per dtype)."""
    if not ((_is_f32_array(arr) or _is_bf16_array(arr)) and isinstance(idx, types.Integer)):
        return None
    bf16 = _is_bf16_array(arr)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        if bf16:
            return _widen_bf16(builder, builder.load(builder.bitcast(p, _VH.as_pointer()), align=2))
        return builder.load(builder.bitcast(p, _VF.as_pointer()), align=4)

    return f32x16(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """arr[idx:idx+16] = v; into a uint16 (bfloat16) ``arr`` rounded as torch rounds (see
    ``_narrow_bf16``)."""
    if not ((_is_f32_array(arr) or _is_bf16_array(arr)) and isinstance(idx, types.Integer) and v == f32x16):
        return None
    bf16 = _is_bf16_array(arr)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        if bf16:
            builder.store(_narrow_bf16(builder, args[2]), builder.bitcast(p, _VH.as_pointer()), align=2)
        else:
            builder.store(args[2], builder.bitcast(p, _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(arr, idx, v), codegen


@intrinsic
def splat(typingctx, x):
    """x (any real scalar, rounded to float32) in every lane."""
    if not isinstance(x, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[0], sig.args[0], types.float32)
        v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(_I, 0))
        return builder.shuffle_vector(v, ir.Constant(_VF, ir.Undefined), ir.Constant(_VI, [0] * W))

    return f32x16(x), codegen


def _binop(name):
    @intrinsic
    def op(typingctx, a, b):
        if not (a == f32x16 and b == f32x16):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1])

        return f32x16(a, b), codegen
    return op


vadd = _binop("fadd")
vsub = _binop("fsub")
vmul = _binop("fmul")
vdiv = _binop("fdiv")


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma: the same bits on every machine)."""
    if not (a == f32x16 and b == f32x16 and c == f32x16):
        return None

    def codegen(context, builder, sig, args):
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VF, _VF]),
                                           "llvm.fma.v16f32")
        return builder.call(f, list(args))

    return f32x16(a, b, c), codegen


def _select(pred):
    @intrinsic
    def op(typingctx, a, b):
        if not (a == f32x16 and b == f32x16):
            return None

        def codegen(context, builder, sig, args):
            # select(a OP b, a, b): the shape x86's maxps/minps implement exactly (b when
            # either is NaN), so it compiles to one instruction.
            return builder.select(builder.fcmp_ordered(pred, args[0], args[1]), args[0], args[1])

        return f32x16(a, b), codegen
    return op


vmax = _select(">")
vmin = _select("<")


@intrinsic
def vselect_ge(typingctx, a, b, x, y):
    """lane-wise (a >= b) ? x : y."""
    if not all(t == f32x16 for t in (a, b, x, y)):
        return None

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">=", args[0], args[1]), args[2], args[3])

    return f32x16(a, b, x, y), codegen


@intrinsic
def vround_magic(typingctx, t):
    """(s, k): s = t + 1.5*2^23 (round-to-nearest of t in its low mantissa bits), k = s - 1.5*2^23."""
    if t != f32x16:
        return None
    magic = ir.Constant(_VF, [float(np.float32(12582912.0))] * W)

    def codegen(context, builder, sig, args):
        s = builder.fadd(args[0], magic)
        k = builder.fsub(s, magic)
        return context.make_tuple(builder, sig.return_type, [s, k])

    return types.UniTuple(f32x16, 2)(t), codegen


@intrinsic
def vpow2_from_magic(typingctx, s):
    """2^k as float32, k the integer held in the low bits of s = k + 1.5*2^23 (|k| <= 127;
    k = -127 gives +0: the exponent field is zero and the mantissa bits shifted out)."""
    if s != f32x16:
        return None
    bias = ir.Constant(_VI, [127 - 0x4B400000] * W)
    sh = ir.Constant(_VI, [23] * W)

    def codegen(context, builder, sig, args):
        i = builder.bitcast(args[0], _VI)
        return builder.bitcast(builder.shl(builder.add(i, bias), sh), _VF)

    return f32x16(s), codegen


# AVX-512's vscalefps computes p * 2^floor(k) in one instruction: the decay factors and the
# exponentials of softplus and the gate each end in such a scaling, which otherwise takes three
# or four (convert or clamp, shift, multiply). The scaled value is exact and rounded once, as
# p * 2^k is, so the two forms give the same bits wherever 2^k is a normal float; they differ
# only where p * 2^k falls below float32's normal range, which the scan kernels flush to zero
# (``flush_denormals``) on x86, the only place vscalefps exists. Chosen when the function is
# compiled, from the features numba compiles for (numba's disk cache keys on them too);
# ``_SCALEF = False`` before compiling forces the portable form (the tests compare the two).
def _target_has_avx512f(context):
    try:
        feats = context.codegen()._tm_features
    except AttributeError:          # a numba without the attribute: the portable form
        return False
    return "+avx512f" in str(feats).split(",")


_SCALEF = True


def _use_scalef(context):
    return _SCALEF and _X86 and _target_has_avx512f(context)


def _scalef(builder, p, k):
    f = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VF, [_VF, _VF, _VF, ir.IntType(16), _I]),
        "llvm.x86.avx512.mask.scalef.ps.512")
    # all 16 lanes (mask -1), the rounding mode of MXCSR (4: _MM_FROUND_CUR_DIRECTION)
    return builder.call(f, [p, k, p, ir.Constant(ir.IntType(16), -1), ir.Constant(_I, 4)])


_MAGIC_BIASED = float(np.float32(12582912.0 + 127.0))


@intrinsic
def vscale_biased(typingctx, p, s):
    """p * 2^k for s = k + 127 + 1.5*2^23 (k + 127 in s's low mantissa bits). Portable: 2^k
    from the bits of s shifted so k + 127 lands in the exponent field, anything at or below
    1.5*2^23 in value (k <= -127, s in a lower binade, or negative s) first raised to the bits
    of 1.5*2^23, which shift to +0; then one multiply. AVX-512: vscalefps(p, s - 127 - 1.5*2^23).
    k <= -127 gives 0 in the first form and p * 2^k (0 after flushing) in the second."""
    if not (p == f32x16 and s == f32x16):
        return None
    lo = ir.Constant(_VI, [0x4B400000] * W)
    sh = ir.Constant(_VI, [23] * W)
    magic = ir.Constant(_VF, [_MAGIC_BIASED] * W)

    def codegen(context, builder, sig, args):
        if _use_scalef(context):
            return _scalef(builder, args[0], builder.fsub(args[1], magic))
        i = builder.bitcast(args[1], _VI)
        i = builder.select(builder.icmp_signed(">", i, lo), i, lo)
        return builder.fmul(args[0], builder.bitcast(builder.shl(i, sh), _VF))

    return f32x16(p, s), codegen


@intrinsic
def vscale_pow2i(typingctx, p, k):
    """p * 2^k for integral float lanes k in [-126, 127]: 2^k built from k's integer (convert,
    add the bias, shift) and one multiply, or vscalefps(p, k) on AVX-512."""
    if not (p == f32x16 and k == f32x16):
        return None
    b127 = ir.Constant(_VI, [127] * W)
    sh = ir.Constant(_VI, [23] * W)

    def codegen(context, builder, sig, args):
        if _use_scalef(context):
            return _scalef(builder, args[0], args[1])
        i = builder.fptosi(args[1], _VI)
        return builder.fmul(args[0], builder.bitcast(builder.shl(builder.add(i, b127), sh), _VF))

    return f32x16(p, k), codegen


@intrinsic
def vfloor(typingctx, x):
    if x != f32x16:
        return None

    def codegen(context, builder, sig, args):
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF]), "llvm.floor.v16f32")
        return builder.call(f, [args[0]])

    return f32x16(x), codegen


@intrinsic
def vhsum16(typingctx, buf, off):
    """Lane-sums of 16 vectors at once: ``buf`` holds 16 vectors (256 float32 from ``off``);
    lane n of the result is the sum of the 16 lanes of vector n, added as a fixed tree
    (halves, then quarters, ...), with 30 shuffles and 15 vector additions."""
    if not (_is_f32_array(buf) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        vp = builder.bitcast(p, _VF.as_pointer())
        vs = [builder.load(builder.gep(vp, [ir.Constant(ir.IntType(64), n)]), align=4) for n in range(W)]
        # lanes[v] = which input vector each lane of v belongs to (the "owner"); at every stage two
        # vectors x, y are folded: in each block of 2w lanes, the block's first w lanes of x and of y
        # are added to its last w lanes of x and of y, giving a vector whose blocks of w lanes are
        # owned alternately by x's and y's owners.
        owners = [[n] * W for n in range(W)]
        w = W // 2
        while len(vs) > 1:
            nv, no = [], []
            for i in range(0, len(vs), 2):
                x, y = vs[i], vs[i + 1]
                lo, hi, own = [], [], []
                for blk in range(0, W, 2 * w):
                    lo += list(range(blk, blk + w)) + list(range(W + blk, W + blk + w))
                    hi += list(range(blk + w, blk + 2 * w)) + list(range(W + blk + w, W + blk + 2 * w))
                    own += owners[i][blk:blk + w] + owners[i + 1][blk:blk + w]
                a = builder.shuffle_vector(x, y, ir.Constant(_VI, lo))
                b = builder.shuffle_vector(x, y, ir.Constant(_VI, hi))
                nv.append(builder.fadd(a, b))
                no.append(own)
            vs, owners, w = nv, no, w // 2
        # owners[0][lane] is the input vector summed in that lane; put lane n at position n
        perm = [owners[0].index(n) for n in range(W)]
        return builder.shuffle_vector(vs[0], ir.Constant(_VF, ir.Undefined), ir.Constant(_VI, perm))

    return f32x16(buf, off), codegen


# The prefetch intrinsic's name carries its pointer type: p0i8 with LLVM's typed pointers
# (LLVM <= 14: numba 0.58), p0 since pointers became opaque.
_PREFETCH = "llvm.prefetch.p0" if _llvm_version() >= (15,) else "llvm.prefetch.p0i8"


def _prefetch(arr, idx, write):
    if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        i8p = ir.IntType(8).as_pointer()
        p8 = builder.bitcast(p, i8p)
        i32 = ir.IntType(32)
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                           _PREFETCH)
        # (address, 0 read / 1 write, locality 3: keep in every cache level, 1: data cache)
        builder.call(f, [p8, ir.Constant(i32, int(write)), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, idx), codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Ask for the cache line holding arr[idx] (a hint: no effect on any result). The
    kernels walk rows d floats apart; beyond ~2 KiB strides the hardware's stride
    prefetchers stop following, and every step then waited for its rows from memory."""
    return _prefetch(arr, idx, write=False)


@intrinsic
def prefetch_write(typingctx, arr, idx):
    """The same hint for a line about to be written (x86 ``prefetchw``: the line arrives
    owned, so the store that follows does not wait for it). Output rows that were not in
    cache stalled the stores behind them: in the scan's backward, whose three (b, l, d)
    gradients are written that way, ~20% of its time when they came from memory."""
    return _prefetch(arr, idx, write=True)


@intrinsic
def vacc_f64(typingctx, buf, off, v):
    """buf[off:off+16] += float64(v) lane by lane (buf float64)."""
    if not (isinstance(buf, types.Array) and buf.dtype == types.float64 and v == f32x16):
        return None
    VD = ir.VectorType(ir.DoubleType(), W)

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        vp = builder.bitcast(p, VD.as_pointer())
        old = builder.load(vp, align=8)
        builder.store(builder.fadd(old, builder.fpext(args[2], VD)), vp, align=8)
        return context.get_dummy_value()

    return types.none(buf, off, v), codegen


# The SSE control register (MXCSR): bit 15 flushes denormal results to zero (FTZ), bit 6
# reads denormal operands as zero (DAZ). x86 cores take a microcode assist of ~100 cycles for
# an operation that produces or reads a denormal, every lane of a vector op included; a scan
# whose state decays for tens of steps with nothing added (the last block of a class-token
# model gets a gradient at one position only) passes through that range on every state.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_FTZ_DAZ = 0x8040


def _mxcsr(builder, name, slot):
    i8p = ir.IntType(8).as_pointer()
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p]), name)
    builder.call(f, [builder.bitcast(slot, i8p)])


@intrinsic
def flush_denormals(typingctx):
    """Make this thread's float operations flush denormal results and operands to zero (x86:
    MXCSR's FTZ and DAZ bits); returns the previous control word for ``restore_fp``. Elsewhere
    a no-op that returns 0. Call ``restore_fp`` before the task ends: the worker threads run
    other code afterwards, and the calling thread is one of them."""
    def codegen(context, builder, sig, args):
        if not _X86:
            return ir.Constant(_I, 0)
        slot = cgutils.alloca_once(builder, _I)
        _mxcsr(builder, "llvm.x86.sse.stmxcsr", slot)
        old = builder.load(slot)
        builder.store(builder.or_(old, ir.Constant(_I, _FTZ_DAZ)), slot)
        _mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return old

    return types.int32(), codegen


@intrinsic
def restore_fp(typingctx, old):
    """Put back the control word ``flush_denormals`` returned."""
    if not isinstance(old, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        if _X86:
            slot = cgutils.alloca_once(builder, _I)
            builder.store(context.cast(builder, args[0], sig.args[0], types.int32), slot)
            _mxcsr(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()

    return types.none(old), codegen


# operators (vector op vector, vector op scalar, scalar op vector)
def _mk(op, fn):
    @overload(op)
    def _ov(a, b):
        if a == f32x16 and b == f32x16:
            return lambda a, b: fn(a, b)
        if a == f32x16 and isinstance(b, (types.Float, types.Integer)):
            return lambda a, b: fn(a, splat(b))
        if b == f32x16 and isinstance(a, (types.Float, types.Integer)):
            return lambda a, b: fn(splat(a), b)


_mk(operator.add, vadd)
_mk(operator.sub, vsub)
_mk(operator.mul, vmul)
_mk(operator.truediv, vdiv)


@intrinsic
def vneg(typingctx, a):
    if a != f32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fneg(args[0])

    return f32x16(a), codegen


@overload(operator.neg)
def _ov_neg(a):
    if a == f32x16:
        return lambda a: vneg(a)


@njit(inline="always")
def zeros():
    return splat(0.0)


@njit(inline="always")
def _from64(buf, n):
    """The n floats of buf (n + 16 long) that start on a 64-byte boundary."""
    off = ((64 - buf.ctypes.data % 64) % 64) // 4
    return buf[off:off + n]


@njit
def zeros64(n):
    """n float32 zeros starting on a 64-byte boundary. numba aligns its arrays to 32 bytes
    only; a 64-byte vector access to a row that starts 32 bytes into a cache line touches two
    lines (a split store costs two stores)."""
    return _from64(np.zeros(n + 16, np.float32), n)


@njit
def empty64(n):
    """zeros64 without the zeros, for scratch a kernel writes before it reads: the scan's
    backward takes ~290 KB of it per task, and filling that with zeros first cost ~5% of the
    kernel (docs/benchmarks.md, tenth round)."""
    return _from64(np.empty(n + 16, np.float32), n)
