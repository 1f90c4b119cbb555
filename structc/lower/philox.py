"""Philox-4x32-10 (Salmon, Moraes, Dror & Shaw, SC 2011): a counter-based
random generator, in native code and in numpy.

A counter-based generator is a keyed bijection: 128 random bits are a pure
function of a 128-bit counter and a 64-bit key, with no state carried from
one draw to the next. Element e of a dropout mask is drawn at counter
(e mod 2^32, e div 2^32, step, stream) under the run's key, so its bit
depends on what the element is, never on which thread computed it or in
which order (`random.Dropout`).

Ten rounds of

    hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2          (32 x 32 -> 64-bit products)
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    k += (W0, W1)                                   (between rounds)

`philox4x32` emits them for one element or one vector of lanes (each lane
its own counter). The words are held in 64-bit lanes so that each product
is one unsigned 32 x 32 multiply (`vpmuludq` on x86): only the low 32 bits
of a word are meaningful until the end, where they are masked.
`philox4x32_numpy` is the reference (and Random123's known answers test it).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir

from .codegen import I32, I64, lanes, vec

M0, M1 = 0xD2511F53, 0xCD9E8D57        # the round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85        # the key schedule (golden ratio, sqrt(3) - 1)
ROUNDS = 10
LOW32 = 0xFFFFFFFF


def philox4x32(cg, counter, key, rounds: int = ROUNDS) -> list:
    """The four 32-bit output words (i64 lanes, high halves zero) for a
    counter of four words (i64 values or vectors, low 32 bits used) under a
    key of two words (i64 scalars, splat as needed)."""
    b = cg.b
    t = counter[0].type
    n = lanes(t)
    low = _const(LOW32, t)
    c = list(counter)
    k0, k1 = (cg.splat(k, n) for k in key)
    for r in range(rounds):
        if r:
            k0 = b.add(k0, _const(W0, t))
            k1 = b.add(k1, _const(W1, t))
        p0 = b.mul(b.and_(c[0], low), _const(M0, t))
        p1 = b.mul(b.and_(c[2], low), _const(M1, t))
        hi0, hi1 = b.lshr(p0, _const(32, t)), b.lshr(p1, _const(32, t))
        c = [b.xor(b.xor(hi1, c[1]), k0), p1, b.xor(b.xor(hi0, c[3]), k1), p0]
    return [b.and_(w, low) for w in c]


def counter_words(cg, index, step, stream, n: int) -> list:
    """The counter of elements index, index + 1, ..., index + n - 1 (one per
    lane): (index low word, index high word, step, stream), as i64 lanes."""
    b = cg.b
    t = vec(I64, n)
    if n > 1:
        iota = ir.Constant(t, [ir.Constant(I64, k) for k in range(n)])
        e = b.add(cg.splat(index, n), iota)
    else:
        e = index
    return [b.and_(e, _const(LOW32, t)), b.lshr(e, _const(32, t)), cg.splat(step, n), cg.splat(stream, n)]


def first_word(cg, index, step, stream, key, n: int):
    """Word 0 of the Philox output (i64 lanes) for elements index .. index + n - 1,
    by a call to one function per module and width: the ten rounds are about a
    hundred instructions, and a matmul inlines its epilogue two dozen times, so
    inlining them would triple a model's code and its compile time."""
    name = f"sc_philox_first_{n}"
    fn = cg.module.globals.get(name)
    if fn is None:
        fn = _define_first_word(cg, name, n)
    return cg.b.call(fn, [index, step, stream, key[0], key[1]])


def _define_first_word(cg, name: str, n: int):
    from .codegen import CG
    ret = vec(I64, n)
    fn = ir.Function(cg.module, ir.FunctionType(ret, [I64] * 5), name=name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    body = CG(cg.module, fn)
    index, step, stream, k0, k1 = fn.args
    body.b.ret(philox4x32(body, counter_words(body, index, step, stream, n), (k0, k1))[0])
    body.finish()
    return fn


def _const(v: int, t):
    return ir.Constant(t, [ir.Constant(t.element, v)] * t.count) if isinstance(t, ir.VectorType) else ir.Constant(t, v)


def word32(cg, w):
    """An output word (i64 lanes) as i32 lanes."""
    return cg.b.trunc(w, vec(I32, lanes(w.type)))


# -- the numpy reference --------------------------------------------------------

def philox4x32_numpy(counter, key, rounds: int = ROUNDS) -> np.ndarray:
    """Philox-4x32 of counters [..., 4] under key (k0, k1): uint32 [..., 4]."""
    c = [np.asarray(w, dtype=np.uint64) & LOW32 for w in np.moveaxis(np.asarray(counter, np.uint64), -1, 0)]
    k0, k1 = np.uint64(int(key[0]) & LOW32), np.uint64(int(key[1]) & LOW32)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + np.uint64(W0)) & np.uint64(LOW32), (k1 + np.uint64(W1)) & np.uint64(LOW32)
        p0 = c[0] * np.uint64(M0)
        p1 = c[2] * np.uint64(M1)
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & np.uint64(LOW32),
             (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & np.uint64(LOW32)]
    return np.stack(c, axis=-1).astype(np.uint32)


def element_bits_numpy(size: int, key, step: int, stream: int) -> np.ndarray:
    """The first output word of elements 0 .. size-1's counters: what
    `random.Dropout` compares with its threshold."""
    e = np.arange(size, dtype=np.uint64)
    counter = np.stack([e & np.uint64(LOW32), e >> np.uint64(32),
                        np.full(size, step & LOW32, np.uint64), np.full(size, stream & LOW32, np.uint64)], axis=-1)
    return philox4x32_numpy(counter, key)[..., 0]
