"""Philox-4x32-10 (Salmon, Moraes, Dror & Shaw, SC 2011): a counter-based
random generator, in native code and in numpy.

A counter-based generator is a keyed bijection: 128 random bits are a pure
function of a 128-bit counter and a 64-bit key, with no state carried from
one draw to the next. Element e of a dropout mask gets 32 of them: word
e mod 4 of the block at counter (b mod 2^32, b div 2^32, step, stream),
b = e div 4, under the run's key, so its bits depend on what the element
is, never on which thread computed it or in which order (`ops/random.py`).

Ten rounds of

    hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2          (32 x 32 -> 64-bit products)
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    k += (W0, W1)                                   (between rounds)

`philox4x32` emits them for one block or one vector of lanes (each lane
its own counter). The words are held in 64-bit lanes so that each product
is one unsigned 32 x 32 multiply (`vpmuludq` on x86): only the low 32 bits
of a word are meaningful until the end, where they are masked.
`element_bits` gives a vector of consecutive elements their bits.
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


def block_counter(cg, block, step, stream, m: int) -> list:
    """The counters of blocks block, block + 1, ..., block + m - 1 (one per
    lane): (block low word, block high word, step, stream), as i64 lanes."""
    b = cg.b
    t = vec(I64, m)
    if m > 1:
        iota = ir.Constant(t, [ir.Constant(I64, k) for k in range(m)])
        block = b.add(cg.splat(block, m), iota)
    return [b.and_(block, _const(LOW32, t)), b.lshr(block, _const(32, t)), cg.splat(step, m), cg.splat(stream, m)]


def element_bits(cg, index, step, stream, key, n: int):
    """32 random bits (i32 lanes) for each of elements index .. index + n - 1:
    element e gets word e mod 4 of block e div 4. One call of a function
    defined once per module and width: the ten rounds are about a hundred
    instructions, and a matmul inlines its epilogue two dozen times."""
    name = f"sc_philox_bits_{n}"
    fn = cg.module.globals.get(name)
    if fn is None:
        fn = _define_element_bits(cg, name, n)
    return cg.b.call(fn, [index, step, stream, key[0], key[1]])


def _define_element_bits(cg, name: str, n: int):
    """n consecutive elements from element `index` on lie in n/4 + 1 blocks at
    most: Philox runs on n/2 lanes of i64 (one vector register for n = 16 with
    AVX-512; the spare lanes cost nothing), the 2n words are put in element
    order, and the n from `index mod 4` on are returned."""
    from .codegen import CG
    fn = ir.Function(cg.module, ir.FunctionType(vec(I32, n), [I64] * 5), name=name)
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    body = CG(cg.module, fn)
    b = body.b
    index, step, stream, k0, k1 = fn.args
    m = 1 if n == 1 else max(2, n // 2)
    words = philox4x32(body, block_counter(body, b.lshr(index, ir.Constant(I64, 2)), step, stream, m), (k0, k1))
    words = [b.trunc(w, vec(I32, m)) for w in words]
    shift = b.trunc(b.and_(index, ir.Constant(I64, 3)), I32)
    if n == 1:      # one element: word `index mod 4` of its block
        table = ir.Constant(ir.VectorType(I32, 4), ir.Undefined)
        for w, word in enumerate(words):
            table = b.insert_element(table, word, ir.Constant(I32, w))
        b.ret(b.extract_element(table, shift))
    else:
        pairs = _gather(b, words[0], words[1], range(2 * m)), _gather(b, words[2], words[3], range(2 * m))
        # in element order: element 4j + w is word w of block j (word w sits at w*m + j of the pairs)
        ordered = _gather(b, *pairs, [w * m + j for j in range(m) for w in range(4)])
        windows = [_gather(b, ordered, ordered, [s + k for k in range(n)]) for s in range(4)]
        out = windows[3]
        for s in (2, 1, 0):
            out = b.select(b.icmp_unsigned("==", shift, ir.Constant(I32, s)), windows[s], out)
        b.ret(out)
    body.finish()
    return fn


def _gather(b, x, y, picks):
    """shufflevector(x, y, picks): lanes of x then y, numbered on."""
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(I32, len(list(picks))), list(picks)))


def _const(v: int, t):
    return ir.Constant(t, [ir.Constant(t.element, v)] * t.count) if isinstance(t, ir.VectorType) else ir.Constant(t, v)


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
    """Elements 0 .. size-1's 32 bits, as `element_bits` draws them: element e
    gets word e mod 4 of Philox at counter (e div 4 low and high words, step, stream)."""
    blocks = np.arange((size + 3) // 4, dtype=np.uint64)
    counter = np.stack([blocks & np.uint64(LOW32), blocks >> np.uint64(32),
                        np.full(blocks.size, step & LOW32, np.uint64),
                        np.full(blocks.size, stream & LOW32, np.uint64)], axis=-1)
    return philox4x32_numpy(counter, key).reshape(-1)[:size]
