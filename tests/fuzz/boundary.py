"""Throw invalid calls at compiled models; only ValueError/TypeError may come
out. Run in a subprocess by tests/test_boundary.py, so a crash in native code
fails the test instead of killing the test run.

usage: python boundary.py N_CALLS SEED
"""
import sys

import numpy as np

import structc

MODEL = """
model B {
  input  x: f32[N, 6]
  input  z: f32[N, 2, 3]
  target y: class[N] of 4
  h = concat(dense(x, 5) |> relu, flatten(z), axis=1)
  loss cross_entropy(dense(h, 4), y)
}
"""

GOOD = {"x": ((None, 6), np.float32), "z": ((None, 2, 3), np.float32), "y": ((None,), np.int32)}


def junk(rng):
    """Something that is not a valid value for any input."""
    choice = rng.integers(0, 12)
    n = int(rng.integers(0, 5))
    if choice == 0:
        return None
    if choice == 1:
        return "text"
    if choice == 2:
        return rng.normal(size=tuple(rng.integers(0, 4, rng.integers(0, 4))))   # any shape
    if choice == 3:
        return np.zeros((n, 6), dtype=rng.choice([np.bool_, np.complex64, object, np.uint8, np.float16]))
    if choice == 4:
        return [[1, 2], [3]]                                                  # ragged
    if choice == 5:
        return np.full((n, 6), np.nan, np.float32)[:, ::2]
    if choice == 6:
        return np.array([rng.integers(-10**12, 10**12)])                      # labels far out of range
    if choice == 7:
        return np.zeros((2**31 + 5,), np.int8)[:0]                            # empty
    if choice == 8:
        return {"x": 1}
    if choice == 9:
        return np.ones((n, 6), np.float32).T
    if choice == 10:
        return 3.5
    return np.arange(n * 7, dtype=np.int64).reshape(n, 7)


def call(net, rng):
    feed = {}
    n = int(rng.integers(1, 6))
    for name, (shape, dtype) in GOOD.items():
        r = rng.random()
        if r < 0.15:
            continue                                                        # missing
        if r < 0.45:
            feed[name] = junk(rng)
            continue
        shape = tuple(n if d is None else d for d in shape)
        if rng.random() < 0.3:                                              # wrong batch for this one
            shape = (n + int(rng.integers(1, 3)),) + shape[1:]
        if dtype == np.int32:
            feed[name] = rng.integers(-2, 7, shape)                           # sometimes out of [0, 4)
        else:
            feed[name] = rng.normal(size=shape).astype(dtype)
    if rng.random() < 0.1:
        feed["extra"] = np.zeros(3)
    what = rng.integers(0, 3)
    if what == 0:
        net(**feed)
    elif what == 1:
        net.grad(**feed)
    else:
        net.train_step(lr=float(rng.choice([0.1, -1.0, np.inf, 0.0])), **feed)


def main(calls: int, seed: int) -> None:
    net = structc.compile(MODEL)
    rng = np.random.default_rng(seed)
    outcomes = {"ok": 0, "ValueError": 0, "TypeError": 0}
    for _ in range(calls):
        try:
            call(net, rng)
            outcomes["ok"] += 1
        except (ValueError, TypeError) as e:
            outcomes["ValueError" if isinstance(e, ValueError) else "TypeError"] += 1
    print(outcomes)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
