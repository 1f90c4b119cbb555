"""Generate `logic.txt.gz`: boolean formulas as labelled trees, in treebank form.

    python -m structc.data.make_logic            # rewrites structc/data/logic.txt.gz

Each line is one formula over the constants T and F with the operators
`and`, `or`, `xor` (binary) and `not` (unary), written as a tree whose every
node carries a label, as in a sentiment treebank:

    (1 (0 F) (2 or) (1 (2 not) (0 F)))        F or (not F)  = true

- a constant leaf is `(v T)` or `(v F)`, v its truth (1 or 0);
- an operator is a leaf word too, labelled 2: `(2 and)`;
- a binary node is `(v left (2 op) right)`, a unary one `(v (2 not) operand)`,
  v the truth of the subformula. Trees have arity 3, and mixed arity.

A formula has 2 to 12 constants; its shape is a uniform random split of the
constants into subtrees, and each inner node is `not` applied to a binary
node with probability 0.2. Formulas are drawn with a fixed seed, true and
false in equal numbers, without repeats; the first 6,000 form the training
set, the last 2,000 the held-out set, and no held-out formula occurs in
training. The task: predict the root's truth (chance: 50%).
"""
from __future__ import annotations


import numpy as np

from . import write_lines

SEED = 20260611
N_TRAIN, N_TEST = 6000, 2000
OPS = {"and": lambda a, b: a & b, "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b}


def formula(rng: np.random.Generator, leaves: int) -> tuple[str, int]:
    """(bracketed text, truth) of a random formula with `leaves` constants."""
    if leaves == 1:
        v = int(rng.integers(2))
        text, value = f"({v} {'TF'[1 - v]})", v
    else:
        k = int(rng.integers(1, leaves))
        (lt, lv), (rt, rv) = formula(rng, k), formula(rng, leaves - k)
        op = str(rng.choice(list(OPS)))
        value = OPS[op](lv, rv)
        text = f"({value} {lt} (2 {op}) {rt})"
    if leaves > 1 and rng.random() < 0.2:
        value = 1 - value
        text = f"({value} (2 not) {text})"
    return text, value


def generate() -> list[str]:
    rng = np.random.default_rng(SEED)
    seen: set[str] = set()
    lines: list[str] = []
    want = {0: (N_TRAIN + N_TEST) // 2, 1: (N_TRAIN + N_TEST) // 2}
    while want[0] or want[1]:
        text, value = formula(rng, int(rng.integers(2, 13)))
        if want[value] and text not in seen:
            seen.add(text)
            lines.append(text)
            want[value] -= 1
    return lines


def main() -> None:
    path = write_lines("logic", generate())
    print(f"wrote {path} ({N_TRAIN} training + {N_TEST} held-out formulas)")


if __name__ == "__main__":
    main()
