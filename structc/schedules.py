"""Learning-rate schedules: the factor the lr of step i is multiplied by.

Computed in Python from the step counter before each native call (one
float, written with the other hyper-parameters), so a step stays one native
call and a resumed run, which restores the counter, uses bit-identical rates.

With i the number of updates made before this one (0 for the first step):
  warm-up w:  (i + 1) / w while i < w, then the schedule on j = i - w
  constant:   1
  step:       gamma ** (j // decay_steps)
  cosine:     floor + (1 - floor) * (1 + cos(pi * min(j, decay_steps) / decay_steps)) / 2
`floor` is a fraction of the lr (cosine ends at lr * floor).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

KINDS = ("constant", "step", "cosine")
#: the kind each option belongs to, and its default
OPTION_KINDS = {"gamma": "step", "floor": "cosine"}
DEFAULTS = {"gamma": 0.1, "floor": 0.0}


def check_schedule(kind: str = "constant", *, warmup: int = 0, decay_steps: int | None = None,
                   gamma: float = 0.1, floor: float = 0.0) -> dict:
    """The schedule as a plain dict (saved with a run), or a clear error."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule {kind!r} (choose {', '.join(KINDS)})")
    if isinstance(warmup, bool) or not isinstance(warmup, Integral) or warmup < 0:
        raise ValueError(f"warmup must be a whole number of steps >= 0, got {warmup!r}")
    if kind != "constant":
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, Integral) or decay_steps < 1:
            raise ValueError(f"the {kind} schedule needs decay_steps, a whole number of steps >= 1, "
                             f"got {decay_steps!r}")
    elif decay_steps is not None:
        raise ValueError("the constant schedule takes no decay_steps")
    for name, value in (("gamma", gamma), ("floor", floor)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= float(value) <= 1:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        # another kind's option, away from its default, would change nothing: a mistake to say
        # (the default passes: a saved schedule holds both, `set_schedule(**spec)`)
        owner = OPTION_KINDS[name]
        if kind != owner and float(value) != DEFAULTS[name]:
            raise ValueError(f"{name} is the {owner} schedule's: the {kind} schedule would ignore it "
                             f"(got {name}={value!r})")
    return {"kind": kind, "warmup": int(warmup), "decay_steps": None if decay_steps is None else int(decay_steps),
            "gamma": float(gamma), "floor": float(floor)}


def lr_factor(schedule: dict | None, i: int) -> float:
    """The factor of the lr for the update made after `i` updates."""
    if schedule is None:
        return 1.0
    w = schedule["warmup"]
    if i < w:
        return (i + 1) / w
    j = i - w
    kind = schedule["kind"]
    if kind == "step":
        return schedule["gamma"] ** (j // schedule["decay_steps"])
    if kind == "cosine":
        t = schedule["decay_steps"]
        floor = schedule["floor"]
        return floor + (1 - floor) * (1 + math.cos(math.pi * min(j, t) / t)) / 2
    return 1.0
