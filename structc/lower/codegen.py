"""Helpers over llvmlite's IRBuilder for one LLVM function (`CG`).

They hide phi/branch plumbing (`with cg.loop(n) as i:`) and make element
code generic over scalars and vectors: `cg.exp(x)` works on `float` and on
`<16 x float>` alike, so an op's `emit` is written once and used both in
plain loops and inside vectorised matmul epilogues. Transcendentals are
polynomials (Cephes) rather than libm calls so they vectorise.
"""
from __future__ import annotations

from contextlib import contextmanager

from llvmlite import ir
from llvmlite.ir._utils import DuplicatedNameError, NameScope
from llvmlite.ir.instructions import Instruction

F32 = ir.FloatType()
F64 = ir.DoubleType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()

DTYPE_IR = {"f32": F32, "f64": F64, "i32": I32, "i64": I64}
#: ln of float32's largest and smallest normal values: `CG.exp` is inf above the one
#: and 0 below the other (flushed), and clamps its polynomial's argument between them
EXP_HI, EXP_LO = 88.72283, -87.33654
#: the largest x whose e^x rounds n = x log2 e to at most 127 (127.49 / log2 e): with
#: x clamped there, `CG._exp_clamped` needs no fix-up for 2^128
EXP_HI_127 = 88.37
FAST = ("contract",)    # allow FMA contraction, keep IEEE semantics otherwise
#: the one loop property kernels set (`CG.loop(unroll=False)`); `lower.module` makes each
#: use a loop ID of its own (LLVM wants them distinct and self-referential, which llvmlite cannot write)
NO_UNROLL = "llvm.loop.unroll.disable"


def vector_registers(vw: int) -> int:
    """x86's vector registers at this vector width: 32 with AVX-512 (16 lanes),
    16 with AVX2 or SSE. Register tiles are sized by it."""
    return 32 if vw == 16 else 16


def vec(t: ir.Type, n: int) -> ir.Type:
    return t if n == 1 else vector_type(t, n)


_VECTOR_TYPES: dict = {}


def vector_type(t: ir.Type, n: int) -> ir.VectorType:
    """`ir.VectorType(t, n)`, one object per type: its text is made once, not at
    every kernel's first print."""
    key = (str(t), n)
    found = _VECTOR_TYPES.get(key)
    if found is None:
        found = _VECTOR_TYPES[key] = ir.VectorType(t, n)
    return found


def lanes(t: ir.Type) -> int:
    return t.count if isinstance(t, ir.VectorType) else 1


def elem(t: ir.Type) -> ir.Type:
    return t.element if isinstance(t, ir.VectorType) else t


def mangle(t: ir.Type) -> str:
    e = elem(t)
    base = {F32: "f32", F64: "f64", I32: "i32", I64: "i64", I1: "i1"}[e]
    return f"v{t.count}{base}" if isinstance(t, ir.VectorType) else base


class CG:
    """Code generation for one function: a builder plus a cache of values
    loaded once in the entry block (frame slots, dims)."""

    def __init__(self, module: ir.Module, fn: ir.Function, frame_layout=None, frame=None):
        self.module = module
        self.fn = fn
        if type(fn.scope) is NameScope and not fn.blocks:
            fn.scope = _Names(fn.scope)
        self.entry = fn.append_basic_block("entry")
        self.body = fn.append_basic_block("body")
        self.b = ir.IRBuilder(self.body)
        self.eb = ir.IRBuilder(self.entry)   # the one builder that appends to the entry block
        self.layout = frame_layout
        self.frame = frame
        self.slots: LocalSlots | None = None     # a kernel's own frame (`LocalSlots`), or the entry's
        self._cache: dict = {}

    def finish(self) -> None:
        """Close the entry block (allocas and hoisted loads) into the body."""
        self.eb.branch(self.body)

    # -- constants and conversions -------------------------------------
    def const(self, v: float, like) -> ir.Value:
        t = like if isinstance(like, ir.Type) else like.type
        e = elem(t)
        v = float(v) if e in (F32, F64) else int(v)
        return _constant(t, v, repr(v))

    def i64(self, v: int) -> ir.Constant:
        found = _I64_CONSTANTS.get(v) if type(v) is int else None     # not bool: True prints as `true`
        if found is None:
            found = _constant(I64, v, repr(v))
            if type(v) is int:
                _I64_CONSTANTS[v] = found
        return found

    def splat(self, x: ir.Value, n: int) -> ir.Value:
        if n == 1:
            return x
        vt = vector_type(x.type, n)
        if isinstance(x, ir.Constant):
            return _constant(vt, x, x.get_reference())
        one = self.b.insert_element(_constant(vt, ir.Undefined, "undef"), x, _constant(I32, 0, "0"))
        return self.b.shuffle_vector(one, _constant(vt, ir.Undefined, "undef"), _constant(vector_type(I32, n), 0, "0"))

    def to_float(self, x: ir.Value, t=F32) -> ir.Value:
        if elem(x.type) in (F32, F64):
            return x if elem(x.type) == t else self.b.fpext(x, vec(t, lanes(x.type)))
        return self.b.sitofp(x, vec(t, lanes(x.type)))

    # -- intrinsics ----------------------------------------------------
    def intrinsic(self, name: str, ret: ir.Type, args: list[ir.Value]) -> ir.Value:
        full = f"llvm.{name}.{mangle(ret)}"
        fn = self.module.globals.get(full)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, [a.type for a in args]), full)
        return self.b.call(fn, args)

    def declare(self, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, args), name)
        return fn

    # -- float arithmetic (scalar or vector) ---------------------------
    def add(self, a, b): return self._float_op("fadd", a, b)
    def sub(self, a, b): return self._float_op("fsub", a, b)
    def mul(self, a, b): return self._float_op("fmul", a, b)
    def div(self, a, b): return self._float_op("fdiv", a, b)

    def _float_op(self, opname: str, a, b):
        """`self.b.fadd(a, b, flags=FAST)` and co. as IRBuilder makes them, with
        a cheaper type check first (the operands' types are mostly one object)."""
        if a.type is not b.type and a.type != b.type:
            raise ValueError(f"Operands must be the same type, got ({a.type}, {b.type})")
        instr = Instruction(self.b.block, a.type, opname, (a, b), "", FAST)
        self.b._insert(instr)
        return instr
    def neg(self, a): return self.b.fneg(a)
    def fma(self, a, b, c):
        # fmuladd: one fused instruction where the CPU has FMA, mul + add where it has not
        # (llvm.fma would become a slow libm call on such targets)
        return self.intrinsic("fmuladd", a.type, [a, b, c])
    def sqrt(self, a): return self.intrinsic("sqrt", a.type, [a])
    def abs(self, a): return self.intrinsic("fabs", a.type, [a])

    def gt(self, a, b): return self.b.fcmp_ordered(">", a, b)
    def ge(self, a, b): return self.b.fcmp_ordered(">=", a, b)
    def lt(self, a, b): return self.b.fcmp_ordered("<", a, b)

    def select(self, c, a, b): return self.b.select(c, a, b)

    def beats(self, v, best):
        """Does v replace the running maximum `best` of an arg-max scan? When it
        is larger, or when it is the first NaN: as numpy's max and argmax,
        a NaN wins and stays (ugt is true if either is NaN; a NaN best is kept)."""
        return self.b.and_(self.b.fcmp_unordered(">", v, best), self.b.fcmp_ordered("ord", best, best))

    def isnan(self, a): return self.b.fcmp_unordered("uno", a, a)

    # llvm.maximum/minimum propagate NaN as numpy's maximum/minimum do (a
    # compare-and-select would drop a NaN in one operand); on AVX-512 they
    # lower to a few instructions
    def max(self, a, b): return self.intrinsic("maximum", a.type, [a, b])
    def min(self, a, b): return self.intrinsic("minimum", a.type, [a, b])

    def bool_to_float(self, c, like) -> ir.Value:
        return self.b.uitofp(c, like.type if isinstance(like, ir.Value) else like)

    def _bits(self, x):
        return self.b.bitcast(x, vec(I32, lanes(x.type)))

    def _from_bits(self, x):
        return self.b.bitcast(x, vec(F32, lanes(x.type)))

    def exp(self, x):
        """e^x: Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 polynomial.

        Above ln(FLT_MAX) the result is +inf, below ln(FLT_MIN) it is 0 (results
        that would be subnormal are flushed); NaN propagates."""
        y = self._exp_clamped(x)
        # the clamp keeps the polynomial in range; out of it the answer is known
        y = self.select(self.gt(x, self.const(EXP_HI, x)), self.const(float("inf"), x), y)
        return self._flushed_below(x, y)

    def exp_nonpositive(self, x):
        """`exp` of an x that is at most 0 or NaN (a softmax's x - max(x)), with
        `exp`'s bits there: no fix-up for 2^128 and no select for overflow. A
        positive x (which such callers never pass) gives 1."""
        return self._flushed_below(x, self._exp_clamped(x, hi=0.0))

    def _flushed_below(self, x, y):
        """y, or 0 where x < EXP_LO (e^x below float32's normal range: flushed)."""
        return self.select(self.lt(x, self.const(EXP_LO, x)), self.const(0.0, x), y)

    def expm1(self, x, nonpositive: bool = False):
        """e^x - 1 without the cancellation of `exp(x) - 1` near 0 (which gives 0 for
        |x| < 3e-8 and loses relative accuracy up to |x| of about 0.3): its Taylor
        series through x^8 for |x| <= 0.35 (the next term is below float32's
        precision there), exp(x) - 1 beyond. NaN propagates, -inf gives -1.
        `nonpositive`: for callers that use it at x <= 0 only (elu's negative
        side), the same bits there without exp's overflow handling (its clamp at
        -87.34 leaves e^x - 1 at -1 as well); past x = 0.35 it gives 0."""
        p = self.const(1.0 / 40320, x)
        for k in (5040, 720, 120, 24, 6, 2, 1):
            p = self.fma(p, x, self.const(1.0 / k, x))
        near = self.mul(p, x)       # x (1 + x/2 (1 + ...)): exact to float32 near 0
        e = self._exp_clamped(x, hi=0.0) if nonpositive else self.exp(x)
        far = self.sub(e, self.const(1.0, x))
        return self.select(self.b.fcmp_ordered("<=", self.abs(x), self.const(0.35, x)), near, far)

    def _exp_clamped(self, x, hi: float = EXP_HI, lo: float | None = EXP_LO):
        """e^x for x clamped to [lo, hi] (NaN propagates): finite, and within the
        polynomial's accuracy inside that range. `hi` at most `EXP_HI_127` leaves
        out the fix-up for n = 128 (four instructions), and `lo` None the lower
        clamp, for callers whose x is never below it (their results there being
        the same)."""
        # a compare-and-select clamp (constants first: a NaN fails both comparisons
        # and passes through) costs less than llvm.maximum/minimum
        top_hi = self.const(hi, x)
        x = self.select(self.lt(top_hi, x), top_hi, x)
        if lo is not None:
            bottom = self.const(lo, x)
            x = self.select(self.gt(bottom, x), bottom, x)
        scalef = self._has_scalef(x)
        if scalef:      # AVX-512: one rounding instruction (the same n as below)
            n = self._roundeven(self.mul(x, self.const(1.44269504088896341, x)))
        else:
            # round to nearest by adding and subtracting 1.5 * 2^23 (|x log2 e| < 2^22 here);
            # no rounding instruction needed, so this also runs on plain SSE2
            magic = self.const(12582912.0, x)
            shifted = self.add(self.mul(x, self.const(1.44269504088896341, x)), magic)
            n = self.sub(shifted, magic)
        r = self.fma(n, self.const(-0.693359375, x), x)
        r = self.fma(n, self.const(2.12194440e-4, x), r)
        p = self.const(1.9875691500e-4, x)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = self.fma(p, r, self.const(c, x))
        r2 = self.mul(r, r)
        y = self.add(self.fma(p, r2, r), self.const(1.0, x))
        if scalef:      # y 2^n in one instruction, 2^128 included (e^x up to 88.72 is finite)
            return self._scalef(y, n)
        # `shifted` is 1.5 * 2^23 + n, an integer of that binade: its low bits are n
        # (no conversion instruction); shifted into the exponent field, the rest of
        # its bits fall off the top
        bits = self._bits(shifted)
        if hi > EXP_HI_127:
            # n reaches 128 from x = 88.38 on, where 2^n has no float32 (its exponent bits
            # would read as inf, though e^x is finite up to 88.72): 2^127 times 2 y then
            top = self.b.icmp_signed(">", bits, self.const(0x4B400000 + 127, bits))
            bits = self.b.select(top, self.const(0x4B400000 + 127, bits), bits)
            y = self.select(top, self.add(y, y), y)
        scale = self.b.add(self.b.shl(bits, self.const(23, bits)), self.const(127 << 23, bits))
        return self.mul(y, self._from_bits(scale))

    def _has_scalef(self, x) -> bool:
        """Whether x's lanes fill AVX-512 vectors in a module built for AVX-512
        (`structc_avx512`, which the compiler sets from the target), in a
        kernel not of `lower.module.LIGHT_KINDS` (`cg.light`)."""
        return getattr(self.module, "structc_avx512", False) and not getattr(self, "light", False) \
            and lanes(x.type) in (16, 32, 64)

    def _roundeven(self, x):
        fn = self.declare(f"llvm.roundeven.v{lanes(x.type)}f32", x.type, [x.type])
        return self.b.call(fn, [x])

    def _scalef(self, y, n):
        """y 2^n (n integral): `vscalefps`, 16 lanes at a time."""
        v16 = vec(F32, 16)
        fn = self.declare("llvm.x86.avx512.mask.scalef.ps.512", v16, [v16, v16, v16, ir.IntType(16), I32])
        count = lanes(y.type)

        def part(v, k):
            if count == 16:
                return v
            return self.b.shuffle_vector(v, v, ir.Constant(vec(I32, 16), list(range(k, k + 16))))
        out = [self.b.call(fn, [part(y, k), part(n, k), part(y, k), ir.Constant(ir.IntType(16), -1),
                                ir.Constant(I32, 4)]) for k in range(0, count, 16)]
        while len(out) > 1:     # halves side by side, pairwise
            out = [self.b.shuffle_vector(a, c, ir.Constant(vec(I32, 2 * lanes(a.type)), list(range(2 * lanes(a.type)))))
                   for a, c in zip(out[::2], out[1::2])]
        return out[0]

    def log(self, x):
        """ln x for x > 0 (0 gives -inf, negatives and NaN give NaN), Cephes logf.

        A subnormal x is scaled by 2^23 first, so its exponent field is right
        (log(1e-45) is -103.3, not the -88.0 of the smallest normal float)."""
        arg = x
        tiny = self.lt(x, self.const(1.17549435e-38, x))    # subnormal (or <= 0: fixed below)
        x = self.select(tiny, self.mul(x, self.const(8388608.0, x)), x)
        bits = self._bits(x)
        e = self.b.sub(self.b.lshr(bits, self.const(23, bits)), self.const(127, bits))
        e = self.b.sub(e, self.b.select(tiny, self.const(23, bits), self.const(0, bits)))
        m = self._from_bits(self.b.or_(self.b.and_(bits, self.const(0x7FFFFF, bits)),
                                       self.const(0x3F800000, bits)))
        big = self.gt(m, self.const(1.41421356, m))
        m = self.select(big, self.mul(m, self.const(0.5, m)), m)
        e = self.to_float(self.b.add(e, self.b.zext(big, e.type)))
        f = self.sub(m, self.const(1.0, m))
        z = self.mul(f, f)
        p = self.const(7.0376836292e-2, f)
        for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
                  -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
            p = self.fma(p, f, self.const(c, f))
        y = self.mul(self.mul(p, f), z)
        y = self.fma(e, self.const(-2.12194440e-4, e), y)
        y = self.fma(z, self.const(-0.5, z), y)
        r = self.fma(e, self.const(0.693359375, e), self.add(f, y))
        x = arg
        r = self.select(self.b.fcmp_ordered("==", x, self.const(0.0, x)), self.const(float("-inf"), x), r)
        # unordered: a NaN operand also gives NaN (its bits would otherwise read as a number)
        r = self.select(self.b.fcmp_unordered("<", x, self.const(0.0, x)), self.const(float("nan"), x), r)
        return self.select(self.b.fcmp_ordered("==", x, self.const(float("inf"), x)), x, r)

    def tanh(self, x):
        """Odd polynomial near 0 (keeps relative accuracy), 1 - 2/(e^2x + 1) elsewhere."""
        a = self.abs(x)
        z = self.mul(x, x)
        p = self.const(-5.70498872745e-3, x)
        for c in (2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1):
            p = self.fma(p, z, self.const(c, x))
        small = self.fma(self.mul(p, z), x, x)
        # e^2|x| past EXP_HI_127 (or inf) leaves `large` at 1 all the same (2 / 2.4e38 rounds away)
        e = self._exp_clamped(self.mul(a, self.const(2.0, x)), hi=EXP_HI_127, lo=None)
        large = self.sub(self.const(1.0, x), self.div(self.const(2.0, x), self.add(e, self.const(1.0, x))))
        large = self.b.bitcast(self.b.or_(self._bits(large), self.b.and_(self._bits(x), self.const(-0x80000000, self._bits(x)))), x.type)
        return self.select(self.lt(a, self.const(0.625, x)), small, large)

    def random_bits(self, index, step, stream, key, n: int):
        """32 random bits (i32 lanes) for each of elements index .. index + n - 1:
        Philox-4x32-10 over (element, step, stream) under `key` (`lower.philox`)."""
        from .philox import element_bits
        return element_bits(self, index, step, stream, key, n)

    def sigmoid(self, x):
        """1 / (1 + e^-x). The clamped exponential is enough: at its ends the
        quotient is already 1 (x >= 87.34) or rounds to 0 (x <= -88.72, below
        float32's normal range, flushed), so its out-of-range selects are not paid;
        nor the fix-up for 2^128: from -x = 87.34 on the quotient is below float32's
        normal range, flushed (x86's FTZ, which every entry sets) whether e^-x
        is clamped at 88.37 or at 88.72."""
        one = self.const(1.0, x)
        return self.div(one, self.add(one, self._exp_clamped(self.neg(x), hi=EXP_HI_127)))

    # -- integers ------------------------------------------------------
    def imul(self, a, b):
        if isinstance(a, int):
            a = self.i64(a)
        if isinstance(b, int):
            b = self.i64(b)
        if isinstance(a, ir.Constant) and a.constant == 1:
            return b
        if isinstance(b, ir.Constant) and b.constant == 1:
            return a
        return self.b.mul(a, b)

    def iadd(self, a, b):
        if isinstance(a, int):
            a = self.i64(a)
        if isinstance(b, int):
            b = self.i64(b)
        if isinstance(a, ir.Constant) and a.constant == 0:
            return b
        if isinstance(b, ir.Constant) and b.constant == 0:
            return a
        return self.b.add(a, b)

    def imin(self, a, b):
        return self.b.select(self.b.icmp_signed("<", a, b), a, b)

    def iclamp(self, v, lo, hi):
        """v clamped to [lo, hi] (signed integers)."""
        b = self.b
        v = b.select(b.icmp_signed("<", v, lo), lo, v)
        return b.select(b.icmp_signed(">", v, hi), hi, v)

    def ceil_div(self, a, k):
        """ceil(a / k) for k > 0: an int, or a value known only at run time."""
        if not isinstance(k, int):
            return self.b.sdiv(self.b.add(a, self.b.sub(k, self.i64(1))), k)
        return self.b.sdiv(self.b.add(a, self.i64(k - 1)), self.i64(k))

    # -- memory --------------------------------------------------------
    def var(self, t: ir.Type, init=None) -> ir.Value:
        """A stack slot in the entry block; SROA turns it into registers."""
        slot = self.eb.alloca(t)
        if init is not None:
            self.b.store(init, slot)
        return slot

    def gep(self, base, idx, t=F32):
        return self.b.gep(base, [idx], source_etype=t)

    def prefetch(self, base, idx, t=F32) -> None:
        """Ask for base[idx]'s cache line (`prefetcht0`): a hint that never faults and
        reads nothing, so an address past a buffer's end is harmless."""
        fn = self.declare("llvm.prefetch.p0", VOID, [PTR, I32, I32, I32])
        read, near, data = (_constant(I32, v, str(v)) for v in (0, 3, 1))
        self.b.call(fn, [self.gep(base, idx, t), read, near, data])

    def load(self, base, idx, t=F32, n: int = 1, mask=None):
        """Load n consecutive elements at base[idx] (masked lanes read as 0)."""
        p = self.gep(base, idx, t)
        if n == 1:
            return self.b.load(p, typ=t)
        vt = vector_type(t, n)
        if mask is None:
            return self.b.load(p, typ=vt, align=4)
        return self.intrinsic_masked_load(p, vt, mask)

    def store(self, value, base, idx, t=F32, mask=None):
        p = self.gep(base, idx, t)
        if mask is None or lanes(value.type) == 1:
            self.b.store(value, p, align=4)
        else:
            name = f"llvm.masked.store.{mangle(value.type)}.p0"
            fn = self.declare(name, VOID, [value.type, PTR, I32, mask.type])
            self.b.call(fn, [value, p, _constant(I32, 4, "4"), mask])

    def intrinsic_masked_load(self, p, vt, mask):
        name = f"llvm.masked.load.{mangle(vt)}.p0"
        fn = self.declare(name, vt, [PTR, I32, mask.type, vt])
        return self.b.call(fn, [p, _constant(I32, 4, "4"), mask, _constant(vt, 0, "0")])

    def lane_mask(self, remaining, n: int):
        """<n x i1> with lanes [0, remaining) set (`remaining`: an i64). The count,
        clamped to [-1, n], is compared in 32-bit lanes: one vpcmpgtd on AVX2,
        where 64-bit lanes took two compares and a pack to 32 bits. x86 code
        generation sinks a mask's compare into the loop that uses it, so a masked
        load in a row loop paid it every row (a narrow bias sum's 4 masks: 36
        instructions a row around its 4 loads)."""
        if isinstance(remaining, ir.Constant) and type(remaining.constant) is int:
            k = min(max(remaining.constant, -1), n)
            count = _constant(I32, k, str(k))
        else:
            count = self.b.trunc(self.iclamp(remaining, self.i64(-1), self.i64(n)), I32)
        lane_ids = _constant(ir.VectorType(I32, n), [ir.Constant(I32, k) for k in range(n)], "lane ids")
        return self.b.icmp_signed("<", lane_ids, self.splat(count, n))

    def hsum(self, v):
        """Sum of the lanes of a float vector."""
        if lanes(v.type) == 1:
            return v
        fn = self.declare(f"llvm.vector.reduce.fadd.{mangle(v.type)}", elem(v.type), [elem(v.type), v.type])
        return self.b.call(fn, [self.const(0.0, elem(v.type)), v], fastmath=("reassoc",))

    def hmax(self, v):
        """Largest lane; NaN if any lane is NaN (fmaximum, not fmax, which skips NaNs)."""
        if lanes(v.type) == 1:
            return v
        fn = self.declare(f"llvm.vector.reduce.fmaximum.{mangle(v.type)}", elem(v.type), [v.type])
        return self.b.call(fn, [v])

    # -- control flow --------------------------------------------------
    @contextmanager
    def loop(self, stop, start=0, step: int = 1, name: str = "i", unroll: bool = True):
        """for (iv = start; iv < stop; iv += step) — yields iv. `unroll=False`
        for a loop whose body is already vector code: O3 would otherwise copy
        it whole once per iteration of a constant trip count, for a large
        compile time and nothing at run time (a transpose's 16x16 blocks:
        0.6 s of LLVM, 0.09 s without; `lower.module.NO_UNROLL`)."""
        b = self.b
        start = self.i64(start) if isinstance(start, int) else start
        stop = self.i64(stop) if isinstance(stop, int) else stop
        pre = b.block
        head = self.fn.append_basic_block(f"{name}.head")
        body = self.fn.append_basic_block(f"{name}.body")
        done = self.fn.append_basic_block(f"{name}.done")
        b.branch(head)
        b.position_at_end(head)
        iv = b.phi(I64, name=name)
        iv.add_incoming(start, pre)
        b.cbranch(b.icmp_signed("<", iv, stop), body, done)
        b.position_at_end(body)
        yield iv
        nxt = b.add(iv, self.i64(step))
        iv.add_incoming(nxt, b.block)
        latch = b.branch(head)
        if not unroll:
            latch.set_metadata("llvm.loop", self.module.add_metadata([ir.MetaDataString(self.module, NO_UNROLL)]))
        b.position_at_end(done)

    @contextmanager
    def while_(self, cond):
        """while (cond()) { body } — `cond` is called to emit the test."""
        b = self.b
        head = self.fn.append_basic_block("while.head")
        body = self.fn.append_basic_block("while.body")
        done = self.fn.append_basic_block("while.done")
        b.branch(head)
        b.position_at_end(head)
        b.cbranch(cond(), body, done)
        b.position_at_end(body)
        yield
        b.branch(head)
        b.position_at_end(done)

    @contextmanager
    def if_(self, cond):
        with self.b.if_then(cond):
            yield

    # -- the frame -----------------------------------------------------
    def slot(self, index: int, t: ir.Type):
        """Load frame slot `index` once, in the entry block."""
        key = ("slot", index, str(t))
        if key not in self._cache:
            at = index if self.slots is None else self.slots.local(index, t)
            p = self.eb.gep(self.frame, [ir.Constant(I64, at)], source_etype=I64)
            self._cache[key] = self.eb.load(p, typ=t)
        return self._cache[key]

    def dim(self, d) -> ir.Value:
        """Runtime value of a dimension: a constant or a symbol from the frame."""
        if isinstance(d, int):
            return self.i64(d)
        return self.slot(self.layout.dim_slot(d), I64)

    def dims(self, shape) -> list[ir.Value]:
        return [self.dim(d) for d in shape]

    def numel(self, shape) -> ir.Value:
        n = self.i64(1)
        for d in shape:
            n = self.imul(n, self.dim(d))
        return n

    def ptr(self, buf) -> ir.Value:
        return self.slot(self.layout.buffer_slot(buf), PTR)

    def hyper(self, index: int | ir.Value) -> ir.Value:
        """Hyper-parameter `index`: a constant, or an i64 the kernel reads at run
        time (`module.run_time_value`), so that kernels differing only in which
        slot they read have one text."""
        base = self.slot(self.layout.hyper_slot, PTR)
        key = ("hyper", index if isinstance(index, int) else ("value", id(index)))
        if key not in self._cache:
            at = ir.Constant(I64, index) if isinstance(index, int) else index
            self._cache[key] = self.eb.load(self.eb.gep(base, [at], source_etype=F32), typ=F32)
        return self._cache[key]

    def partials(self, nid: int) -> ir.Value:
        return self.slot(self.layout.partials[nid], PTR)

    def arena(self, kind: str) -> ir.Value:
        return self.slot(self.layout.arenas[kind], PTR)

    def mode(self) -> ir.Value:
        return self.slot(self.layout.mode_slot, I64)


class _Names(NameScope):
    """llvmlite's names of a function's values, given as llvmlite gives them
    (an unnamed value is `.1`, `.2`, ...; a taken name gets `.1`, `.2` added),
    in one call rather than four: every instruction takes a name."""

    def __init__(self, like: NameScope):
        self._useset = set(like._useset)
        self._basenamemap = like._basenamemap.copy()

    def register(self, name, deduplicate=False):
        used = self._useset
        if name in used:
            if not deduplicate:
                raise DuplicatedNameError(name)
            base, counts = name, self._basenamemap
            while name in used:
                counts[base] += 1
                name = f"{base}.{counts[base]}"
        used.add(name)
        return name


_CONSTANTS: dict = {}
_I64_CONSTANTS: dict = {}


def _constant(t: ir.Type, value, text: str) -> ir.Constant:
    """The constant `value` of type `t` (a vector: every lane), one object per
    (type, text): llvmlite keeps a constant's text once printed, and printing
    the lanes of a vector constant at every use was a tenth of lowering's time.
    `text` tells apart what compares equal (0.0 and -0.0)."""
    key = (str(t), text)
    found = _CONSTANTS.get(key)
    if found is None:
        if isinstance(t, ir.VectorType) and value is not ir.Undefined and not isinstance(value, list):
            lane = value if isinstance(value, ir.Constant) else ir.Constant(t.element, value)
            value = [lane] * t.count
        found = _CONSTANTS[key] = ir.Constant(t, value)
    return found


class LocalSlots:
    """The entry's frame slots a kernel reads, renumbered 0, 1, ... in the order
    it first reads them: the entry passes the kernel a frame of just those, so
    the kernel's code does not depend on where the model keeps its buffers.
    Kernels of the same op, shapes and options are then the same text (emitted
    once, cached by content), whichever layer and model they come from."""

    def __init__(self):
        self.used: dict[int, tuple[int, ir.Type]] = {}     # entry slot -> (kernel slot, type read)

    def local(self, index: int, t: ir.Type) -> int:
        if index not in self.used:
            self.used[index] = (len(self.used), t)
        return self.used[index][0]


def row_columns(width: int, vw: int) -> list:
    """(offset, mask) per vector of a row of static `width` floats; the last
    vector is masked by a constant when the width is not a multiple."""
    out = []
    for col in range(0, width, vw):
        rest = width - col
        mask = None if rest >= vw else ir.Constant(ir.VectorType(I1, vw), [k < rest for k in range(vw)])
        out.append((col, mask))
    return out
