"""Random whole convolutional models, compiled natively, against the interpreter.

The op tests (test_conv.py) check one convolution on small shapes, and the
dense fuzzer's convolution reads images 3..7 wide; here a generator writes
random valid CNNs: conv2d or conv1d layers stacked 1-3 deep over rows of
1..300 columns (1..19 vectors of 16 floats: one chunk, chunked rows with
interior chunks, an even or odd number V of vectors a chunk), heights 1..9,
strides 1..4, sometimes 5..8 (also (1, s) and (s, 1)), kernels 1..7 (wider than the stride,
as wide, narrower), paddings valid / same / a number / (h, w) / (top, bottom,
left, right), 1..8 channels, bias or not, activations, max / average
pooling between layers, global average pooling or flatten into dense
heads. A layer after the first has an input gradient: for a stride of 2
it is a convolution over the delta dilated by 2 (`lower/conv.py` runs it by
column parity, `_RowReader.phased`, or spread over even / odd lanes), for
other strides a gather; strided rows are read by loads and shuffles
(`_RowReader.paired`), and the interior chunks of long rows by unmasked
loads (`interior_chunk`) in the forward and the kernel gradient. Each
program is checked as the dense fuzzer checks its own (`check_program` of
test_program_fuzz.py: outputs, loss, every gradient, held-out loss, one SGD
step, against the interpreter in float64, at batches 1, 2 and 5 of one net),
the calls again over a workspace of NaN bytes bit for bit (a kernel reading
past a buffer's end, or lanes it zeroes only by multiplying, reads NaNs:
`structc.testing.poison_workspace`), and 1 thread against 2 bit for bit
(`structc.testing.thread_bits`).
`reached` reads from the compiled graph which of those paths each program's
convolutions take; the fast test asserts its seeds reach the new ones.

    python tests/test_conv_fuzz.py --count 100 --seed 1000 --threads --out /tmp/convfuzz
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from structc.lower import conv
from structc.testing import poison_workspace, random_feed, thread_bits

from test_program_fuzz import THREADS_SCRIPT, check_program, compiled_graphs, model_of, params_of

HERE = Path(__file__).resolve().parent     # the tests folder: a worker process imports the fuzzers from it

BATCHES = (1, 2, 5)
# conv1d lengths and image widths: one vector or less, 2..4 vectors (one chunk, V even or odd),
# chunked rows (more than 64 columns), and the edges between them
LENGTHS = [1, 2, 5, 9, 16, 17, 24, 31, 33, 40, 48, 63, 64, 65, 70, 96, 100, 129, 150, 200, 257, 300]
WIDTHS = [1, 3, 7, 16, 17, 20, 31, 33, 40, 47, 64, 65, 70, 80, 100, 129, 140]
ACTIVATIONS = ["relu", "tanh", "sigmoid", "elu", "gelu", "softplus", "leaky_relu", None, None]


@dataclass
class Gen:
    rng: random.Random
    lines: list = field(default_factory=list)
    count: int = 0

    def fresh(self) -> str:
        self.count += 1
        return f"h{self.count}"

    def emit(self, expr: str) -> str:
        name = self.fresh()
        self.lines.append(f"  {name} = {expr}")
        return name

    def padding(self, dims: int, kernel: tuple, stride: tuple, hw: tuple):
        """(the option's text, (top, bottom, left, right)) of a random padding that fits."""
        r = self.rng
        form = r.choice(["valid", "same", "number", "pair", "quad"] if dims == 2 else
                        ["valid", "same", "number", "pair"])
        if form == "valid":
            return "valid", (0, 0, 0, 0)
        if form == "same":
            pads = []
            for n, k, s in zip(hw, kernel, stride):
                total = max((-(-n // s) - 1) * s + k - n, 0)    # as layers/conv.py: output ceil(n / s)
                pads += [total // 2, total - total // 2]
            return "same", tuple(pads)
        most = [min(3, k - 1) for k in kernel]       # no more padding than the kernel reaches
        if form == "number":
            p = r.randint(0, min(most) if dims == 2 else most[1])
            return str(p), (p, p, p, p) if dims == 2 else (0, 0, p, p)
        if form == "pair" and dims == 2:
            ph, pw = r.randint(0, most[0]), r.randint(0, most[1])
            return f"({ph}, {pw})", (ph, ph, pw, pw)
        quad = [r.randint(0, most[0]), r.randint(0, most[0]), r.randint(0, most[1]), r.randint(0, most[1])]
        if dims == 1:
            return f"({quad[2]}, {quad[3]})", (0, 0, quad[2], quad[3])
        return f"({', '.join(map(str, quad))})", tuple(quad)

    def conv(self, x: str, dims: int, hw: tuple, first: bool):
        """A convolution layer of x (rows and columns hw) that fits, or None; its output's
        (name, channels, hw, activation)."""
        r = self.rng
        s = r.choice([1, 1, 2, 2, 3, 3, 4, 4, r.randint(5, 8)])   # 5-8: rarer (9-16: test_conv's edge shapes)
        if first and r.random() < 0.4:      # rows left wide for a later layer's strides
            s = 1
        elif not first and hw[1] >= 32 and r.random() < 0.3:   # an input gradient by column parity
            s = 2
        if dims == 1:
            stride = (1, s)
        else:
            stride = r.choice([(s, s), (s, s), (1, s), (s, 1)])
        k = r.choice([1, 2, 3, 3, 5, 7])
        if stride[1] > 1 and r.random() < 0.3:      # as wide as the stride, or narrower (columns skipped)
            k = r.choice([k, stride[1], max(1, stride[1] - 1)])
        kernel = (1, k) if dims == 1 else (r.choice([k, k, r.randint(1, 7)]), k)
        text, pads = self.padding(dims, kernel, stride, hw)
        out = []
        for n, kk, ss, lo, hi in zip(hw, kernel, stride, pads[::2], pads[1::2]):
            span = n + lo + hi - kk
            if span < 0:
                return None
            out.append(span // ss + 1)
        channels = r.randint(1, 8)
        opts = [f"kernel={k}" if dims == 1 or kernel[0] == k else f"kernel=({kernel[0]}, {k})"]
        if stride != (1, 1):
            opts.append(f"stride={s}" if dims == 1 or stride[0] == stride[1] else f"stride=({stride[0]}, {stride[1]})")
        if text != "valid" or r.random() < 0.5:
            opts.append(f"padding={text}")
        if r.random() < 0.3:
            opts.append("bias=false")
        act = r.choice(ACTIVATIONS)
        expr = f"conv{dims}d({x}, {channels}, {', '.join(opts)})" + (f" |> {act}" if act else "")
        return self.emit(expr), channels, tuple(out), act

    def program(self) -> str:
        r = self.rng
        dims = r.choice([1, 2])
        c = r.randint(1, 8)
        if dims == 1:
            hw = (1, r.choice(LENGTHS))
            decl = f"  input x: f32[N, {c}, {hw[1]}]"
        else:
            hw = (r.randint(1, 9), r.choice(WIDTHS))
            decl = f"  input x: f32[N, {c}, {hw[0]}, {hw[1]}]"
        h, act = "x", None
        for index in range(r.choice([1, 2, 2, 3, 3])):
            made = None
            for _ in range(20):         # a layer that fits the rows left
                made = self.conv(h, dims, hw, first=index == 0)
                if made:
                    break
            if made is None:
                break
            h, c, hw, act = made
            pool = r.choice(["max", "avg", None, None, None]) if dims == 2 else None
            # no maximum over relu's exact zeros: a tie picks either, the interpreter and the native code differently
            if pool and hw[0] >= 2 and hw[1] >= 2 and not (pool == "max" and act == "relu"):
                size = r.choice([2, 2, "(2, 1)"])
                h = self.emit(f"{pool}pool2d({h}, {size})")
                hw = (hw[0] // 2, hw[1] // 2 if size == 2 else hw[1])
        head = r.choice(["flatten", "global"] if dims == 2 else ["flatten", "flatten", "mean"])
        if head == "global":
            h, width = self.emit(f"global_avg_pool({h})"), c
        elif head == "mean":            # over the positions: a conv1d's global pooling
            h, width = self.emit(f"mean({h}, axes=(2,))"), c
        else:
            h, width = self.emit(f"flatten({h})"), c * hw[0] * hw[1]
        if r.random() < 0.4:
            width = r.choice([3, 8, 17])
            h = self.emit(f"dense({h}, {width})" + r.choice([" |> tanh", " |> relu", ""]))
        self.lines.append(f"  output out = {h}")
        if r.random() < 0.6:
            classes = r.choice([2, 3, 10])
            decl += f"\n  target y: class[N] of {classes}"
            self.lines.append(f"  loss cross_entropy(dense({h}, {classes}), y)")
        else:
            decl += f"\n  target t: f32[N, {width}]"
            self.lines.append(f"  loss mse({h}, t)")
        return "model ConvFuzz {\n" + decl + "\n" + "\n".join(self.lines) + "\n}\n"


def generate(seed: int) -> str:
    """A random valid CNN's source (`reached` says which row paths it takes)."""
    return Gen(random.Random(seed)).program()


# ---- which of lower/conv.py's paths a program's convolutions take
def reached(source: str, vw: int | None = None) -> Counter:
    """The row paths of the compiled forward and training graphs' convolutions,
    read with lower/conv.py's own geometry (vectors of `vw` floats, this machine's):
    `<kind> rows of n vectors`, `<kind> stride s` (a strided row read by loads
    and shuffles, `_RowReader.paired`), `<kind> interior chunks [strided]` (a
    long row's chunks loaded without masks, `interior_chunk`), where <kind> is
    `forward` or `kernel grad`, with `1-D ` first for rows one input row high
    read by one kernel row (conv1d's); `dilated by d [chunked]` (a strided
    layer's input gradient) and, for d = 2, `dilated V=even|odd OW>=32|<32`
    (by column parity, `_RowReader.phased`, or spread over even / odd lanes)."""
    from structc.native import host_target
    vw = vw or host_target().vector_width
    found = Counter()
    for g in compiled_graphs(source):
        for node in g.nodes.values():
            name = node.op.name
            if name not in ("conv2d", "conv2d_kernel_grad", "conv2d_kernel_grad_parts"):
                continue
            x, other = (g.nodes[i].shape for i in node.inputs)
            if name == "conv2d":
                kind, geo = "forward", conv._Geometry(x, other[2:], node.shape[2:], node.attrs)
            else:
                kind, geo = "kernel grad", conv._Geometry(x, node.shape[-2:], other[2:], node.attrs)
            V, chunks = geo.row_chunks(vw)
            tag = "1-D " if geo.H == 1 and geo.KH == 1 else ""
            found[f"{tag}{kind} rows of {conv._ceil(geo.OW, vw)} vectors"] += 1
            if geo.dw == 1 and 2 <= geo.sw <= conv.MAX_SHUFFLED_STRIDE:      # `_RowReader.paired`
                found[f"{tag}{kind} stride {geo.sw}"] += 1
            if geo.dw > 1:          # a strided layer's input gradient
                found[f"dilated by {geo.dw}" + (" chunked" if chunks > 1 else "")] += 1
            if kind == "forward" and (geo.sw, geo.dw) == (1, 2):             # `_RowReader.phased` when V is even
                found[f"dilated V={'odd' if V % 2 else 'even'} OW{'>=' if geo.OW >= 32 else '<'}32"] += 1
            if chunks > 1 and any(conv.interior_chunk(geo, k * V * vw, V, vw) for k in range(chunks)):
                found[f"{tag}{kind} interior chunks" + (" strided" if geo.sw > 1 else "")] += 1
            if kind == "kernel grad" and conv._pointwise(geo):      # `_emit_pointwise_kernel_grad`
                found["pointwise kernel grad" + (" in parts" if name.endswith("parts") else "")] += 1
    return found


def check_poisoned(source: str, seed: int, n: int = 5) -> None:
    """The forward and training calls again over a workspace of NaN bytes
    (`structc.testing.poison_workspace`) give the first calls' bits: a kernel
    that reads memory no kernel wrote (lanes past a delta row's end, zeroed only
    by the input lanes they meet) reads NaNs there, where the finite values a
    model leaves in its workspace would hide it."""
    import warnings

    import structc
    mdef = model_of(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", structc.errors.GradientWarning)
        net = structc.compile(source)
    rng = np.random.default_rng(seed)
    for k, v in params_of(mdef, rng).items():
        net.params[k] = v
    feed = random_feed(mdef, n, rng)
    inputs = {k: v for k, v in feed.items() if mdef.inputs[k].kind != "target"}
    runs = []
    for poisoned in (False, True):
        if poisoned:
            poison_workspace(net)
        outs = net.forward(**inputs)
        if poisoned:
            poison_workspace(net)
        runs.append((outs, *net.grad(**feed)))
    (o1, l1, g1), (o2, l2, g2) = runs
    differ = [f"output {k}" for k in o1 if not np.array_equal(o1[k], o2[k])]
    differ += ["loss"] if l1 != l2 else []
    differ += [f"gradient of {k}" for k in g1 if not np.array_equal(g1[k], g2[k])]
    assert not differ, f"batch {n} over a workspace of NaNs: {', '.join(differ)} differ"


# ---- the tests
def run_seed(seed: int, **kw) -> None:
    source = generate(seed)
    try:
        check_program(source, seed, batches=BATCHES, **kw)
        check_poisoned(source, seed)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- program (seed {seed}) ---\n{source}") from None


#: what the fast seeds must reach between them (`reached`): each new path of
#: lower/conv.py in a whole model, forward and backward
WANTED = {
    "the input gradient of a stride-2 layer by column parity (V even), rows >= 32":
        lambda k: k == "dilated V=even OW>=32",
    "the input gradient of a stride-2 layer spread over lanes (V odd), rows >= 32":
        lambda k: k == "dilated V=odd OW>=32",
    "a forward stride >= 3": lambda k: re.fullmatch(r"(1-D )?forward stride [3-8]", k),
    "a forward stride > 4 (5 and more vectors a vector)": lambda k: re.fullmatch(r"(1-D )?forward stride [5-8]", k),
    "a kernel gradient at stride >= 3": lambda k: re.fullmatch(r"(1-D )?kernel grad stride [3-8]", k),
    "a conv1d over > 64 positions with interior chunks": lambda k: k == "1-D forward interior chunks",
    "its kernel gradient with interior chunks": lambda k: k == "1-D kernel grad interior chunks",
    "a strided row with interior chunks": lambda k: k.endswith("interior chunks strided"),
    "a 2-D row with interior chunks": lambda k: k.startswith("forward interior chunks"),
    "a 1x1 kernel gradient over a batch in parts": lambda k: k == "pointwise kernel grad in parts",
}
#: the first seeds, and later ones chosen (by `reached`) for what those miss with
#: vectors of 16, 8 and 4 floats (26: a stride-2 input gradient of an odd vector count
#: in rows >= 32 at 4, which no other reaches)
FAST = list(range(11)) + [17, 26, 28, 73, 108]


@pytest.mark.parametrize("vw", [8, 4])
def test_fast_seeds_reach_the_row_paths_of_narrower_vectors(vw):
    """A machine with AVX2 or SSE only: its geometry, the same paths."""
    missing = missed(FAST, vw)
    assert not missing, f"with {vw}-float vectors no program of the fast seeds reaches: {'; '.join(missing)}"


def missed(seeds, vw: int | None = None) -> list:
    """The WANTED paths no program of `seeds` reaches."""
    found = Counter()
    for seed in seeds:
        found += reached(generate(seed), vw)
    return [w for w, hit in WANTED.items() if not any(hit(k) for k in found)]


@pytest.mark.parametrize("seed", FAST)
def test_conv_programs_match_the_interpreter(seed):
    run_seed(seed, fd_coords=0)


def test_fast_seeds_reach_the_row_paths():
    """The new row paths of lower/conv.py are what the fast seeds run (else they check nothing new)."""
    missing = missed(FAST)
    assert not missing, f"no program of the fast seeds {FAST} reaches: {'; '.join(missing)}"


def test_conv_programs_give_one_threads_bits_on_two():
    items = [{"source": generate(seed), "seed": seed, "batches": list(BATCHES)} for seed in FAST]
    found = thread_bits(THREADS_SCRIPT, items, HERE)
    assert found["handoffs"] > 0, "nothing was handed to the pool: the comparison checked nothing"
    assert not found["mismatches"], found["mismatches"]


@pytest.mark.slow
def test_more_conv_programs_match_the_interpreter():
    seeds = range(100, 124)         # more: the script mode
    for seed in seeds:
        run_seed(seed, fd_coords=2)
    found = thread_bits(THREADS_SCRIPT, [{"source": generate(s), "seed": s, "batches": list(BATCHES)}
                                         for s in seeds], HERE)
    assert not found["mismatches"], found["mismatches"]


# ---- many programs, from the command line
def main(argv=None):
    import argparse
    import time
    import traceback
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default="/tmp/convfuzz")
    ap.add_argument("--threads", action="store_true", help="also compare 1 and 2 threads bitwise")
    ap.add_argument("--reached", action="store_true", help="print the row paths the programs took")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures, paths, t0 = 0, Counter(), time.time()
    seeds = range(args.seed, args.seed + args.count)
    for seed in seeds:
        source = generate(seed)
        try:
            check_program(source, seed, batches=BATCHES, fd_coords=2)
            check_poisoned(source, seed)
        except Exception as e:
            failures += 1
            text = str(e) if isinstance(e, AssertionError) else traceback.format_exc()
            (out / f"fail-{seed}.snet").write_text(source + "\n# " + text.replace("\n", "\n# ") + "\n")
            print(f"seed {seed}: {text.strip().splitlines()[0] if text else type(e).__name__}", flush=True)
        if args.reached:
            paths += reached(source)
    print(f"{args.count} programs, {failures} failures, {time.time() - t0:.0f} s")
    if args.threads:
        found = thread_bits(THREADS_SCRIPT, [{"source": generate(s), "seed": s, "batches": list(BATCHES)}
                                             for s in seeds], HERE)
        print(f"threads: {len(found['mismatches'])} mismatches, {found['handoffs']} jobs handed off")
        for m in found["mismatches"]:
            print("  ", m)
    if args.reached:
        for k, v in sorted(paths.items()):
            print(f"  {v:5d}  {k}")


if __name__ == "__main__":
    main()
