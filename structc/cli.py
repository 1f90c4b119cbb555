"""The `structc` command: check, compile, train.

Library code raises; this module alone prints errors (`file:line:col:
error: ...`, the line and a caret) and chooses exit codes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import SnetError, render


def _source(path: str) -> tuple[str, str]:
    try:
        return Path(path).read_text(), path
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


class UserError(Exception):
    """A mistake on the command line (not in the model)."""


def cmd_check(args) -> int:
    from .build import build_model
    from .syntax import parse
    source, file = _source(args.file)
    program = parse(source, file)
    names = [args.model] if args.model else program.model_names
    from .autodiff import gradient_warnings, warn_gradient_flow
    for name in names:
        mdef = build_model(program, name)
        if mdef.has_loss:
            warn_gradient_flow(gradient_warnings(mdef.graph))   # parameters training cannot change
        n = sum(p.type.size().coef for p in mdef.params.values())
        ins = ", ".join([f"{name}: {spec}" for name, spec in mdef.graphs.items()] +
                        [f"{s.name}: {s.type}" for s in mdef.inputs.values() if s.kind != "graph"])
        outs = ", ".join(k for k in mdef.graph.outputs)
        print(f"{file}: model {mdef.name}({ins}) -> {outs}: ok, {len(mdef.params)} parameter tensors, {n} values")
    return 0


def cmd_compile(args) -> int:
    from .compiler import STAGES, compile_source
    source, file = _source(args.file)
    wanted = set(args.dump or [])
    unknown = wanted - set(STAGES) - {"all"}
    if unknown:
        raise UserError(f"unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(STAGES)}")

    def dump(stage, text):
        if "all" in wanted or stage in wanted:
            print(f";; ---- {stage} ----")
            print(text)

    from .native import named_target
    try:
        target = named_target(args.target_cpu)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.header and not args.output:
        raise UserError("-H/--header needs -o/--output (the header describes that library)")
    t0 = time.perf_counter()
    art = compile_source(source, file, args.model, target=target, dump=dump if wanted else None,
                         jit=not args.output)
    if args.output:
        from .ship import ShipError, write_shared_library
        params = None
        if args.params:
            import numpy as np
            try:
                with np.load(args.params) as data:
                    params = {k: data[k] for k in data.files}
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read parameters from {args.params}: {e}") from None
        try:
            write_shared_library(art, args.output, header=args.header, params=params)
        except ShipError as e:
            raise UserError(str(e)) from None
        print(f"wrote {args.output}" + (f" and {args.header}" if args.header else ""), file=sys.stderr)
    if not wanted:
        entries = ", ".join(art.meta["entries"])
        print(f"{file}: model {art.meta['model']} compiled ({entries}) in {time.perf_counter() - t0:.2f} s, "
              f"{len(art.object)} bytes of machine code")
    return 0


def cmd_graph(args) -> int:
    from . import draw
    from .build import build_model
    from .compiler import forward_graph, train_graph
    from .passes import run_pipeline
    from .passes.plan import param_layout
    from .syntax import parse
    source, file = _source(args.file)
    mdef = build_model(parse(source, file), args.model)
    forward = set(mdef.graph.nodes)
    if args.which == "train" and mdef.has_loss:
        _, size = param_layout({n: p.type.shape for n, p in mdef.params.items()})
        g = train_graph(mdef, size)
    else:
        g = forward_graph(mdef)
    if not args.unfused:
        g = run_pipeline(g)
    try:
        draw.write(g, forward, args.output)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    import numpy as np

    from . import datasets
    from .api import compile as compile_net
    from .native import set_num_threads
    from .train import TrainConfig, train
    if args.threads is not None:
        set_num_threads(args.threads)
    source, file = _source(args.file)
    try:
        data = datasets.load(args.data)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    t0 = time.perf_counter()
    net = compile_net(source if file == "<source>" else Path(file), args.model, seed=args.seed)
    print(f"compiled {net.name} in {time.perf_counter() - t0:.2f} s; "
          f"{sum(p.size for p in net.params.values())} parameters; "
          f"data: {data.description or data.name}", file=sys.stderr)
    try:
        data.bind(net)
    except ValueError as e:
        raise UserError(str(e)) from None
    cfg = TrainConfig(epochs=args.epochs, batch=args.batch, lr=args.lr, optimizer=args.optimizer,
                      seed=args.seed, progress=not args.no_progress)
    history = train(net, data, cfg)
    out = args.out or f"{net.name.lower()}.npz"
    net.save_params(out)
    final = history.final
    acc = final.get("heldout_accuracy")
    print(f"saved parameters to {out}"
          + (f"; held-out accuracy {100 * acc:.2f}%" if acc is not None else
             f"; held-out loss {final['heldout_loss']:.4f}"))
    np.seterr(all="ignore")
    return 0


def parser() -> argparse.ArgumentParser:
    from .compiler import STAGES
    p = argparse.ArgumentParser(prog="structc", description="Compile and train structured neural networks.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="parse and shape-check a .snet file")
    c.add_argument("file")
    c.add_argument("--model", help="check only this model")
    c.set_defaults(run=cmd_check)

    c = sub.add_parser("compile", help="compile a model to native code",
                       description=f"Stages for --dump: {', '.join(STAGES)}, all.")
    c.add_argument("file")
    c.add_argument("--model")
    c.add_argument("--dump", action="append", metavar="STAGE", help="print a stage (repeatable)")
    c.add_argument("-o", "--output", help="write a shared library (.so)")
    c.add_argument("-H", "--header", help="also write a C header")
    c.add_argument("--params", help="build these parameters (.npz from `structc train`) into the library")
    c.add_argument("--target-cpu", default="native",
                   help="native (default: this machine), generic, x86-64-v2, x86-64-v3 or x86-64-v4")
    c.set_defaults(run=cmd_compile)

    c = sub.add_parser("graph", help="draw the forward and backward graphs (.svg, .png, .pdf, .dot)")
    c.add_argument("file")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--model")
    c.add_argument("--which", choices=["train", "forward"], default="train",
                   help="train: forward and backward (default); forward: inference only")
    c.add_argument("--unfused", action="store_true", help="before the passes (no fused groups)")
    c.set_defaults(run=cmd_graph)

    c = sub.add_parser("train", help="train a model on a data set")
    c.add_argument("file")
    c.add_argument("--data", required=True, help="a built-in data set (digits) or an .npz file")
    c.add_argument("--model")
    c.add_argument("--epochs", type=int, default=20)
    c.add_argument("--batch", type=int, default=32)
    c.add_argument("--lr", type=float, default=0.1)
    c.add_argument("--optimizer", choices=["sgd", "momentum", "adam"], default="sgd")
    c.add_argument("--threads", type=int, help="threads for the native kernels (default: all cores)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="where to save the parameters (default: <model>.npz)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(run=cmd_train)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except SnetError as e:
        source = None
        if e.span is not None:
            try:
                source = Path(e.span.file).read_text()
            except OSError:
                source = None
        print(render(e, source), file=sys.stderr)
        return 1
    except (UserError, ValueError, TypeError, FloatingPointError) as e:
        print(f"structc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
