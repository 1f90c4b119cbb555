"""The `structc` command: check, compile, export, graph, train, eval, predict, plot, profile.

Library code raises; this module alone prints errors (`file:line:col:
error: ...`, the line and a caret) and chooses exit codes: 1 for an error in
the model or the data, 2 for a command line that cannot be carried out (an
output path that cannot be written), checked before any work is done.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .errors import SnetError, render


def _source(path: str) -> tuple[str, str]:
    try:
        return Path(path).read_text(), path
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


class UserError(Exception):
    """A mistake on the command line (not in the model)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class RefusedOnEveryRank(UserError):
    """A data-parallel run refused for what every rank sees alike (the model, the
    data set's kind): rank 0 says why, once, and every rank exits with the code."""

    def __init__(self, message: str, comm):
        super().__init__(message)
        self.comm = comm


def warn(message: str) -> None:
    print(f"structc: warning: {message}", file=sys.stderr)


# -- files -----------------------------------------------------------------------

#: what an output flag names for standard output (only `predict --out` writes there)
STDOUT = "-"


def with_suffix(path: str, suffix: str, allowed: tuple[str, ...] = ()) -> Path:
    """`path` ending in `suffix` (or one of `allowed`): numpy appends `.npz`/`.npy` to
    a name without it, so the name we report must be the one written. `-` stays `-`
    (standard output: not a file `-.npz`), for `writable_output` to refuse."""
    p = Path(path)
    return p if str(path) == STDOUT or p.name.endswith((suffix, *allowed)) else p.with_name(p.name + suffix)


def writable_output(path: str | Path, what: str) -> Path:
    """`path` if a file can be written there; otherwise a UserError (exit code 2),
    raised before any compiling or training is done."""
    if str(path) == STDOUT:         # else a file named `-` (or `-.npz`) appears, and nothing on stdout
        raise UserError(f"cannot write {what} to standard output ('-'): it is written to a file; name one",
                        code=2)
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"cannot write {what} to {p}: folder {folder} does not exist", code=2)
    if p.is_dir():
        raise UserError(f"cannot write {what} to {p}: it is a folder", code=2)
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"cannot write {what} to {p}: permission denied", code=2)
    return p


def write_whole(path: Path, what: str, write) -> None:
    """`write(name)` into a fresh file beside `path` with its suffix (matplotlib picks the
    format by it), renamed over `path` once written: a write that fails part-way (a full
    disk) leaves the old file whole, never half of a new one, and is one line (exit 1)."""
    from .files import write_atomically
    try:
        write_atomically(str(path), write, by_name=True, prefix=f".{path.name}-", suffix=path.suffix)
    except OSError as e:
        raise UserError(f"cannot write {what} to {path}: {e.strerror or e}") from None


def existing_params(path: str) -> Path:
    """A parameter file by the name given, or by that name with `.npz` added
    (what `np.savez` writes for a name without it)."""
    for p in (Path(path), with_suffix(path, ".npz")):
        if p.is_file():
            return p
    raise UserError(f"no parameter file {path}" + ("" if path.endswith(".npz") else f" (nor {path}.npz)"))


def load_params(net, path: str) -> Path:
    from .train import NumberingWarning
    p = existing_params(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumberingWarning)    # `saved_numbering` says it, in the CLI's words
            net.load_params(str(p))
    except (OSError, KeyError, EOFError) as e:
        raise UserError(f"cannot read parameters from {p}: {e}") from None
    return p


def save_run(net, out: Path, save_extra=None) -> tuple[Path, str | None]:
    """Save the parameters to `out`; if that fails now (the folder went away, the disk
    filled), save them in the working directory or a temporary file instead so that
    a finished run is never lost. Returns (where they are, why not `out` or None).
    `save_extra(path)` writes files that go next to them (the training state)."""
    problem = None
    candidates = [out, Path.cwd() / out.name]
    for target in candidates:
        try:
            written = net.save_params(str(target))
            written = Path(written) if written else target
            if save_extra is not None:
                save_extra(written)
            return written, problem
        except OSError as e:
            problem = problem or f"cannot write {target}: {e.strerror or e}"
    fd, tmp = tempfile.mkstemp(prefix=f"{out.stem}-", suffix=".npz")
    os.close(fd)
    net.save_params(tmp)
    if save_extra is not None:
        save_extra(Path(tmp))
    return Path(tmp), problem


# -- commands --------------------------------------------------------------------

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
            meant = frozenset(n for n, p in mdef.params.items() if p.frozen)   # frozen, buffers: as compile does
            warn_gradient_flow(gradient_warnings(mdef.graph, frozen=meant, model_span=mdef.span))   # as compile does
        n = sum(p.type.size().coef for p in mdef.params.values())
        seqs = [f"{q['name']}: sequence of " + (f"word(vocab={q['vocab']})" if q["vocab"] else f"f32[{q['features']}]")
                for q in mdef.sequences]
        ins = ", ".join([f"{name}: {spec}" for name, spec in mdef.graphs.items()] + seqs +
                        [f"{s.name}: {s.type}" for s in mdef.inputs.values() if s.kind not in ("graph", "sequence")])
        outs = ", ".join(k for k in mdef.graph.outputs)
        print(f"{file}: model {mdef.name}({ins}) -> {outs}: ok, {len(mdef.params)} parameter tensors, {n} values")
    return 0


def compile_into_cache(source: str, file: str, model: str | None, target, timings: bool = False,
                       parts=None):
    """Compile through the cache `structc.compile` uses: (meta, objects, already cached),
    and with `timings` the artifact's `Timings` last. `parts`: as `api.compile_artifact`'s."""
    from . import api
    before = api.COMPILE_COUNT
    art = api.compile_artifact(source, file, model, target=target, parts=parts)
    found = (art.meta, art.objects, api.COMPILE_COUNT == before)
    return found + (art.timings,) if timings else found


def _shipped_parts(args):
    """A library gets every part its model has (the held-out loss entry too); a dump the
    eager ones and the update entry (its stages are among those `--dump` names); in-process,
    the eager ones."""
    from .compiler import EAGER_PARTS, PARTS
    if args.output:
        return list(PARTS)
    return [*EAGER_PARTS, "update"] if args.dump else None


def _distinct_files(*named) -> None:
    """Refuse one file named twice (`-o m.so -H m.so`): one write would replace the other,
    or the library would overwrite its own parameters or source."""
    seen: dict = {}
    for flag, path in named:
        if path is None:
            continue
        key = Path(path).resolve()
        if key in seen:
            raise UserError(f"{flag} and {seen[key]} name the same file {path}: give each its own")
        seen[key] = flag


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
    if args.params and not args.output:
        raise UserError("--params needs -o/--output (they are built into that library)")
    if not args.output and not wanted and not args.kernel_timings:
        return _compile_to_cache(source, file, args.model, target, args.timings,
                                 ["forward"] if args.inference else None)
    if args.output:
        writable_output(args.output, "the library")
    if args.header:
        writable_output(args.header, "the header")
    _distinct_files(("-o", args.output), ("-H", args.header), ("--params", args.params), ("the source", args.file))
    params = None
    if args.params:
        from .model import _read_params
        p = existing_params(args.params)
        try:
            params = _read_params(str(p))
        except ValueError as e:
            raise UserError(f"cannot read parameters: {e}") from None
    t0 = time.perf_counter()
    art = compile_source(source, file, args.model, target=target, dump=dump if wanted else None,
                         jit=not args.output, parts=["forward"] if args.inference else _shipped_parts(args),
                         kernel_timings=args.kernel_timings)
    if args.timings or args.kernel_timings:
        print(art.timings.table())
    if args.output:
        from .ship import ShipError, write_shared_library
        try:
            write_shared_library(art, args.output, header=args.header, params=params,
                                 numbering=saved_numbering(args.params) if args.params else None)
        except ShipError as e:
            raise UserError(str(e)) from None
        print(f"wrote {args.output}" + (f" and {args.header}" if args.header else ""), file=sys.stderr)
        print(f"{file}: model {art.meta['model']} ({', '.join(art.meta['entries'])}) compiled in "
              f"{time.perf_counter() - t0:.2f} s, {sum(map(len, art.objects))} bytes of machine code")
    return 0


def _compile_to_cache(source: str, file: str, model: str | None, target, timings: bool = False,
                      parts=None) -> int:
    """`structc compile m.snet` alone: compile into the cache `structc.compile` reads,
    so the next `structc.compile`, `train` or `eval` of this model loads instead
    (with `parts=["forward"]`, `--inference`: the forward entry only)."""
    from .cache import cache_dir
    t0 = time.perf_counter()
    meta, objects, cached, times = compile_into_cache(source, file, model, target, timings=True, parts=parts)
    if timings:
        print(times.table())
    where = "not cached: STRUCTC_NO_CACHE is set" if os.environ.get("STRUCTC_NO_CACHE") is not None \
        else f"cached in {cache_dir()}"
    if cached:
        print(f"{file}: model {meta['model']} is already compiled ({where}); nothing to do")
    else:
        print(f"{file}: compiled {meta['model']} ({', '.join(meta['entries'])}) in "
              f"{time.perf_counter() - t0:.2f} s, {sum(map(len, objects))} bytes of machine code ({where})")
    return 0


def cmd_export(args) -> int:
    """The forward pass as an ONNX file (structc.onnx.export)."""

    from . import onnx as snet_onnx
    out = writable_output(args.onnx, "the ONNX model")
    params = str(existing_params(args.params)) if args.params else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # the untrained-weights warning: said below instead
            snet_onnx.export(args.file, out, model=args.model, params=params)
    except ImportError as e:
        raise UserError(str(e)) from None
    if not args.params:
        warn("no --params: the exported weights are the initial (untrained) ones")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_graph(args) -> int:
    from . import draw
    from .build import build_model
    from .compiler import forward_graph, train_graph
    from .passes import run_pipeline
    from .passes.plan import param_layout
    from .syntax import parse
    out = writable_output(args.output, "the picture")      # and its format: before any work
    if out.suffix.lower() not in draw.FORMATS:
        raise UserError(draw.unknown_format(out))
    source, file = _source(args.file)
    mdef = build_model(parse(source, file), args.model)
    forward = set(mdef.graph.nodes)
    if args.which == "train" and not mdef.has_loss:
        raise UserError(f"model {mdef.name} declares no loss, so it has no training graph: draw it with --which forward")
    from .native import host_target
    lanes = host_target().vector_width     # as this machine compiles it (legalize depends on it)
    if args.which != "forward" and mdef.has_loss:
        _, size = param_layout({n: p.type.shape for n, p in mdef.params.items()})
        g = train_graph(mdef, size, vector_width=lanes)
    else:
        g = forward_graph(mdef)
    if not args.unfused:
        g = run_pipeline(g, vector_width=lanes)
    try:
        write_whole(out, "the picture", lambda name: draw.write(g, forward, name))
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _compile_net(args, dp_comm=None, training: bool = False, evaluation: bool = False):
    """The model, compiled (or loaded from the cache); with `dp_comm`, rank 0 compiles
    first and the other ranks load what it put in the cache. `training`: its training
    entry too, now (and with `dp_comm` its update entry, which data-parallel training
    calls); `evaluation`: its held-out evaluation entry too, now (eval, and
    data-parallel training: otherwise every rank would compile them at once)."""
    from .api import compile as compile_net
    source, file = _source(args.file)
    t0 = time.perf_counter()

    freeze = getattr(args, "freeze_names", ())

    def compile_it():
        try:
            net = compile_net(source if file == "<source>" else Path(file), args.model,
                              seed=getattr(args, "seed", 0) or 0, freeze=freeze, training=training)
        except ValueError as e:
            if freeze and str(e).startswith("freeze:"):
                raise UserError(f"--{e}") from None
            raise
        if evaluation:
            net._entries.get("eval_loss")     # a model without a loss has none: left to what needs it
        if training and dp_comm is not None:
            net._entries.get("update")
        return net
    if dp_comm is None:
        net = compile_it()
    else:
        from .distributed import rank0_first
        net = rank0_first(dp_comm, compile_it)
    return net, time.perf_counter() - t0


def _distributed_comm(args):
    """MPI.COMM_WORLD for --distributed (None without it), or a UserError saying what to install."""
    if not getattr(args, "distributed", False):
        return None
    from .distributed import mpi
    try:
        return mpi().COMM_WORLD
    except ImportError as e:
        raise UserError(str(e)) from None


def _load_bound_data(name: str, net, split: float | None = None, stream: bool | None = None,
                     numbering: dict | None = None, fixed: bool = False):
    """The data set `name`, checked against the model's kind of input, bound to `net`.
    `split`: the held-out fraction for the user's data that comes as one set; `stream`:
    read the user's treebank or table file a chunk at a time (`structc.streams`), or
    whole (False), or by its size (None). `numbering`: the words and labels of trained
    parameters (`saved_numbering`), new ones refused with `fixed`."""
    from . import datasets, readers
    try:
        datasets.check_name_fits(name, net)
        if stream and name in datasets.DATASETS:
            raise ValueError(f"--stream reads your own treebank or table file; the built-in data set '{name}' "
                             f"is read whole")
        if stream is not None and name not in datasets.DATASETS and Path(name).exists():
            data = readers.read(name, split, stream=stream, numbering=numbering, fixed=fixed)
        else:
            data = datasets.load(name, split, numbering=numbering, fixed=fixed)
        datasets.check_fits(data, net)
        data.bind(net)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    return data


def saved_numbering(params: str | None) -> dict | None:
    """The words and labels the run that saved `params` numbered (`train.load_numbering`),
    saying why when they are there but cannot be used."""
    try:
        found = existing_params(params) if params is not None else None
    except UserError:
        return None                 # said by what loads the parameters, after the data's checks
    if found is None:
        return None
    from .train import load_numbering
    numbering, problem = load_numbering(found)
    if problem:
        warn(problem)
    return numbering


TRAIN_DEFAULTS = {"lr": 0.1, "batch": 32, "optimizer": "sgd", "seed": 0, "clip_norm": 0.0, "val_split": 0.0}


#: float32's largest finite value: native code reads the lr and the clip norm as float32
_F32_MAX = 3.4028234663852886e38


def _check_step_flags(args, code: int = 1) -> None:
    """The numbers a training run or profile takes from the command line, checked before
    any work and named as the flags they are (library code checks them again, naming its
    arguments: `epochs must be ...`): --epochs, --batch, --steps, --threads at least 1;
    --lr positive, as `train.configure` requires; --clip-norm at least 0."""
    for name in ("epochs", "batch", "steps", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}", code)
    lr, clip = getattr(args, "lr", None), getattr(args, "clip_norm", None)
    if lr is not None and not 0 < lr < _F32_MAX:          # nan too
        raise UserError(f"--lr, the learning rate, must be a positive number, got {lr}", code)
    if clip is not None and not 0 <= clip < _F32_MAX:
        raise UserError(f"--clip-norm must be a number >= 0 (0: no clipping), got {clip}", code)


def _train_settings(args, saved: dict | None) -> dict:
    """lr, batch, optimizer, seed, clip_norm, val_split: as given, else the resumed run's, else the defaults.
    A resumed run told to change one says so (the run then differs from the original)."""
    settings = {}
    for key, default in TRAIN_DEFAULTS.items():
        given = getattr(args, key)
        before = saved.get(key) if saved else None
        if given is not None and before is not None and given != before:
            warn(f"--{key.replace('_', '-')} {given} differs from the resumed run's {before}")
        settings[key] = given if given is not None else before if before is not None else default
    return settings


def _resume(args, net) -> tuple[dict, object]:
    """Load a checkpoint into `net`: its parameters, and from the state file next to them
    the epochs done, the optimizer moments and the shuffling generator."""
    import numpy as np

    from .train import load_state, params_digest, state_path
    params = load_params(net, args.resume)
    spath = state_path(params)
    if not spath.is_file():
        raise UserError(f"cannot resume from {params}: its training state {spath} is missing (structc train "
                        f"writes it next to the parameters); without it the epoch count and the optimizer "
                        f"state are unknown")
    try:
        state = load_state(spath)
    except ValueError as e:
        raise UserError(str(e)) from None
    if state["config"].get("model") != net.name or state["digest"] != params_digest(net):
        raise UserError(f"{spath} is the training state of other parameters than {params} "
                        f"(model {state['config'].get('model')}); cannot resume")
    before, now = state["config"].get("program"), net.meta.get("program")
    if before is not None and now is not None and before != now:       # same parameters, other meaning
        warn(f"model {net.name} differs from the resumed run's (its parameters' names and shapes are the "
             f"same, its definition is not): training continues from {params} with the model as it is now")
    rng = np.random.default_rng()
    rng.bit_generator.state = state["config"]["rng"]          # the shuffling continues where it stopped
    return state, rng


def _early_stop_settings(args, saved: dict | None) -> tuple[int, str]:
    """--early-stop and --monitor: as given, else the resumed run's (so it stops where an
    uninterrupted one would), else none and val_loss."""
    before = (saved or {}).get("early_stop") or {}
    patience = args.early_stop if args.early_stop is not None else before.get("patience") or 0
    return patience, args.monitor or before.get("monitor") or "val_loss"


def _resume_early_stopping(net, state: dict, cfg):
    """The resumed run's early stopping (`train.resume_early_stopping`), saying what it continues from."""
    from .train import resume_early_stopping, resumes_from
    stopper, problem = resume_early_stopping(net, state, cfg)
    if problem:
        warn(problem)
    kept, last = resumes_from(state), state["epoch"]
    if kept != last:
        warn(f"the resumed run stopped early after epoch {last} and kept epoch {kept}'s parameters: training "
             f"continues from those, with the optimizer state and shuffling of epoch {last} (the metrics log "
             f"marks it: epoch {last + 1}'s record continues_from {kept})")
    return stopper


def _freeze_names(args) -> list[str]:
    """--freeze as a list of names; a resumed run keeps the run's unless told otherwise."""
    given = [n.strip() for n in args.freeze.split(",") if n.strip()] if args.freeze is not None else None
    saved = None
    if args.resume:
        from .train import load_state, state_path
        try:
            saved = load_state(state_path(existing_params(args.resume)))["config"].get("freeze", [])
        except ValueError:
            saved = None      # `_resume` reports a missing or unreadable state
    if given is not None and saved is not None and sorted(given) != sorted(saved):
        warn(f"--freeze {','.join(given) or '(none)'} differs from the resumed run's {','.join(saved) or '(none)'}")
    return given if given is not None else saved or []


#: a schedule option -> the --schedule kinds that use it (the others would drop it unsaid)
SCHEDULE_OPTIONS = {"decay_steps": ("step", "cosine"), "gamma": ("step",), "floor": ("cosine",)}


def _check_schedule_options(args) -> None:
    """--decay-steps, --gamma, --floor only with a --schedule that uses them, checked before any work."""
    for name, kinds in SCHEDULE_OPTIONS.items():
        if getattr(args, name) is not None and args.schedule not in kinds:
            given = f"--schedule {args.schedule}" if args.schedule else "no --schedule"
            raise UserError(f"--{name.replace('_', '-')} is an option of --schedule {' or '.join(kinds)}, "
                            f"and this run has {given}: it would have no effect")


def _schedule(args, saved: dict | None) -> dict | None:
    """--schedule and its options, checked; a resumed run keeps the run's unless given
    (and says so when it is given another)."""
    from .schedules import check_schedule
    if args.schedule is None and args.warmup is None:
        return saved.get("schedule") if saved else None
    kind = args.schedule or "constant"
    try:
        spec = check_schedule(kind, warmup=args.warmup or 0, decay_steps=args.decay_steps,
                              gamma=0.1 if args.gamma is None else args.gamma,
                              floor=0.0 if args.floor is None else args.floor)
    except ValueError as e:
        raise UserError(f"--schedule: {_as_flags(str(e), SCHEDULE_FLAGS)}") from None
    if saved is not None and _schedule_text(spec) != _schedule_text(saved.get("schedule")):
        warn(f"--schedule {_schedule_text(spec)} differs from the resumed run's {_schedule_text(saved.get('schedule'))}")
    return spec


#: check_schedule's arguments -> the flags that give them
SCHEDULE_FLAGS = {"warmup": "--warmup", "decay_steps": "--decay-steps", "gamma": "--gamma", "floor": "--floor"}


def _as_flags(message: str, flags: dict) -> str:
    """A library message with the arguments it names (whole words) as the flags that gave them."""
    return re.sub(rf"\b({'|'.join(flags)})\b", lambda m: flags[m.group(1)], message)


def _schedule_text(spec: dict | None) -> str:
    """`cosine (warmup 5, decay-steps 40, floor 0)`: the options that kind uses; `constant` for none."""
    if spec is None or (spec["kind"] == "constant" and not spec["warmup"]):
        return "constant"
    used = [("warmup", spec["warmup"])] if spec["warmup"] else []
    used += [(name.replace("_", "-"), spec[name]) for name, kinds in SCHEDULE_OPTIONS.items() if spec["kind"] in kinds]
    return f"{spec['kind']} ({', '.join(f'{k} {v:g}' for k, v in used)})" if used else spec["kind"]


def cmd_train(args) -> int:
    import numpy as np

    from .native import set_num_threads
    from .train import TrainConfig, save_state, train
    if args.init and args.resume:
        raise UserError("--init starts a new run from given parameters, --resume continues a run: pass one")
    if args.seed is not None and args.seed < 0:           # numpy's generators take none: say so before any work
        raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
    _check_step_flags(args)
    _check_validation_options(args)
    _check_schedule_options(args)
    if args.out is None and args.resume:
        args.out = str(existing_params(args.resume))          # continuing a run updates its checkpoint
    args.freeze_names = _freeze_names(args)
    out = writable_output(with_suffix(args.out, ".npz"), "the parameters") if args.out else None
    comm = _distributed_comm(args)
    if args.tensorboard:
        _check_tensorboard()
    if args.threads is None and comm is not None:
        from .distributed import threads_per_rank
        args.threads = threads_per_rank(comm)
    if args.threads is not None:
        set_num_threads(args.threads)
    net, seconds = _compile_net(args, comm, training=True, evaluation=comm is not None)
    if args.init:
        load_params(net, args.init)          # before DataParallel, which starts every rank from rank 0's
    out = out or writable_output(Path(f"{net.name.lower()}.npz"), "the parameters")
    # a run continued or fine-tuned keeps its words' and labels' numbers; new ones follow
    data = _load_bound_data(args.data, net, args.split, _stream_choice(args),
                            numbering=saved_numbering(args.resume or args.init))
    dp = _data_parallel(net, comm, data) if comm is not None else None
    root = dp is None or dp.is_root        # only rank 0 prints and writes
    data_id = _data_id(args)
    state = rng = None
    first_epoch = 1
    if args.resume:
        state, rng = _resume(args, net)
        first_epoch = state["epoch"] + 1
        if first_epoch > args.epochs:
            raise UserError(f"{args.resume} has already been trained for {state['epoch']} epochs; "
                            f"--epochs is the total to reach: pass more than {state['epoch']}")
        if state["config"].get("data") != data_id:
            warn(f"the resumed run was trained on {state['config'].get('data')}, this one on {data_id}")
    saved = state["config"] if state else None
    settings = _train_settings(args, saved)
    early_stop, monitor = _early_stop_settings(args, saved)
    cfg = TrainConfig(epochs=args.epochs, batch=settings["batch"], lr=settings["lr"],
                      optimizer=settings["optimizer"], seed=settings["seed"], progress=not args.no_progress,
                      first_epoch=first_epoch, freeze=list(args.freeze_names), clip_norm=settings["clip_norm"],
                      schedule=_schedule(args, saved), val_split=settings["val_split"],
                      early_stop=early_stop, monitor=monitor)
    stopper = None
    if state is not None:
        stopper = _resume_early_stopping(net, state, cfg)
    if cfg.schedule is not None:
        net.set_schedule(**cfg.schedule)           # data-parallel training too
    net.set_seed(cfg.seed)      # dropout's masks: the run's seed, a resumed run's too (compiled with --seed or 0)
    if state is not None:
        _continue_optimizer(net, state, cfg)
    metrics = _start_metrics_log(out, cfg, args.resume, state) if root else None
    board = _tensorboard(args.tensorboard, cfg.first_epoch) if root and args.tensorboard else None
    if root:
        print(f"compiled {net.name} in {seconds:.2f} s; {sum(p.size for p in net.params.values())} parameters; "
              f"data: {data.description or data.name}"
              + (f"; resuming after epoch {first_epoch - 1}" if state else "")
              + (f"; starting from {args.init}" if args.init else "")
              + (f"; frozen: {', '.join(net.meta['frozen'])}" if net.meta.get("frozen") else "")
              + (f"; {dp.size} ranks" if dp else "")
              + f"; per-epoch metrics in {metrics.path}"
              + (f"; TensorBoard scalars in {board.folder}" if board else ""), file=sys.stderr)
    on_epoch = _epoch_logger(metrics, board) if root else None
    try:
        if dp is None:
            history = train(net, data, cfg, rng=rng, on_epoch=on_epoch, stopper=stopper)
        else:
            from .distributed import train as train_data_parallel
            history = train_data_parallel(dp, data, cfg, rng=rng, on_epoch=on_epoch, stopper=stopper)
            if not root:
                return 0
    except BaseException:
        if metrics is not None:
            _put_back_log(metrics, out)
        raise
    finally:
        if board is not None:
            board.close()

    def save_training_state(params_path: Path) -> None:
        from .readers import data_numbering
        from .train import save_numbering, state_path
        save_state(net, state_path(params_path), history.last_epoch, cfg, history.rng_state, data_id,
                   history.best_epoch, history, metrics.digest())
        save_numbering(net, params_path, data_numbering(data))

    written, problem = save_run(net, out, save_training_state)
    final = history.final
    acc = final.get("heldout_accuracy")
    result = (f"; held-out accuracy {100 * acc:.2f}%" if acc is not None else
              f"; held-out loss {final['heldout_loss']:.4f}")
    # early stopping may keep an earlier epoch's parameters than the last one trained: say which
    which = (f"epoch {history.best_epoch}'s parameters" if history.best_epoch not in (None, history.last_epoch)
             else "parameters")
    np.seterr(all="ignore")
    if problem:
        print(f"structc: error: {problem}; saved the {which} to {written} instead{result}", file=sys.stderr)
        return 1
    print(f"saved {which} to {written}{result}")
    return 0


def _continue_optimizer(net, state: dict, cfg) -> None:
    """The resumed run's optimizer state; when its moments cannot be restored (another
    --optimizer or --freeze), its step and dropout counts, saying what starts from zero."""
    from .train import restore_counters, restore_optimizer
    saved = state["config"]
    # another set of frozen parameters is another arena layout: the saved moments would not line up
    same_layout = saved.get("frozen", []) == net.meta.get("frozen", [])
    try:
        if cfg.optimizer == saved["optimizer"] and same_layout and restore_optimizer(net, state):
            return
        kept_step = restore_counters(net, state, cfg.optimizer)
    except ValueError as e:         # checked by Net.set_optimizer_state before anything changed
        raise UserError(f"cannot resume: the run's optimizer state is damaged: {e}") from None
    restarts = ", and so does the --schedule" if not kept_step and net.schedule is not None else ""
    if cfg.optimizer == "adam" or (not kept_step and (cfg.optimizer != "sgd" or restarts)):
        warn(f"the {cfg.optimizer} optimizer's state (moments, step count) could not be restored: it starts "
             f"from zero{restarts}, so this run differs from an uninterrupted one")
    elif cfg.optimizer == "momentum":
        warn("the momentum optimizer's moments could not be restored: they start from zero, so this run "
             "differs from an uninterrupted one")


def _stream_choice(args) -> bool | None:
    """--stream: True; otherwise None: by the file's size (one process or several)."""
    return True if args.stream else None


def _check_validation_options(args) -> None:
    """--val-split, --early-stop, --monitor: checked before any work."""
    if args.val_split is not None and not 0.0 < args.val_split < 1.0:
        raise UserError(f"--val-split is the fraction of the training examples to validate on: between 0 and 1, "
                        f"got {args.val_split}")
    if args.early_stop is not None and args.early_stop < 1:
        raise UserError(f"--early-stop is a number of epochs without improvement: at least 1, got {args.early_stop}")
    if args.monitor is not None and args.early_stop is None and not args.resume:   # a resumed run may have one
        raise UserError("--monitor is what --early-stop watches, and this run has no --early-stop: it would have "
                        "no effect")
    if args.early_stop and not args.val_split and not args.resume:
        raise UserError("--early-stop needs --val-split: choosing the epoch on the held-out part would leave "
                        "no held-out measure")


def _check_tensorboard() -> None:
    """--tensorboard without tensorboardX: say what to install, before any work."""
    from .runlog import TensorBoardLog
    try:
        TensorBoardLog.writer_class()
    except RuntimeError as e:
        raise UserError(str(e)) from None


def _tensorboard(folder: str, first_epoch: int):
    """The TensorBoard writer of --tensorboard, made as training starts (no event file for a run that never ran)."""
    from .runlog import TensorBoardLog
    try:
        return TensorBoardLog(folder, first_epoch)
    except OSError as e:
        raise UserError(f"cannot write TensorBoard logs to {folder}: {e.strerror or e}", code=2) from None


def _epoch_logger(metrics, board):
    """on_epoch: the JSONL record, then the same record as TensorBoard scalars."""
    if board is None:
        return metrics.callback
    return lambda m: board.write(metrics.callback(m))


def _data_id(args) -> str:
    """--data as a resumed run compares it: with --split when one was given."""
    return args.data if args.split is None else f"{args.data} --split {args.split}"


def _start_metrics_log(out: Path, cfg, resume: str | None, state: dict | None):
    """The per-epoch metrics log beside the checkpoint (NAME.metrics.jsonl); a resumed run's
    log starts with the epochs of the run it continues (`state`: its training state)."""
    from .runlog import metrics_path, start_log
    from .train import resumes_from
    continues_from = None
    if state is not None and resumes_from(state) != state["epoch"]:
        continues_from = resumes_from(state)
    try:
        return start_log(out, cfg.lr, existing_params(resume) if resume else None, cfg.first_epoch, warn=warn,
                         digest=state["config"].get("metrics_digest") if state else None,
                         continues_from=continues_from)
    except OSError as e:
        raise UserError(f"cannot write the metrics log {metrics_path(out)}: {e.strerror or e}", code=2) from None


def _put_back_log(metrics, out: Path) -> None:
    """Training failed: the log beside `out` goes back to that of the run that saved `out`
    (a new run's epochs would otherwise describe another run than the checkpoint)."""
    try:
        failed = metrics.put_back()
    except OSError as e:
        warn(f"{metrics.path} holds this failed run's epochs, not those of {out} ({e.strerror or e})")
        return
    if failed is not None:
        warn(f"this run's epoch records are in {failed}; {metrics.path.name} is "
             + (f"again that of {out.name}" if metrics.path.exists() else "removed (no run saved there had one)"))


def cmd_eval(args) -> int:
    comm = _distributed_comm(args)
    if comm is not None:                 # the machine's cores shared among its ranks
        from .distributed import threads_per_rank
        from .native import set_num_threads
        set_num_threads(threads_per_rank(comm))
    net, _ = _compile_net(args, comm, evaluation=True)
    numbering = saved_numbering(args.params)
    data = _load_bound_data(args.data, net, args.split, _stream_choice(args), numbering=numbering, fixed=True)
    params = load_params(net, args.params)
    _warn_unsaved_numbering(data, numbering, params, args.data)
    if comm is None:
        metrics = data.evaluate(net)
    else:               # each rank its share of the held-out part; rank 0 reports
        from .distributed import check_same_held_out, evaluate
        dp = _data_parallel(net, comm, data)
        if not hasattr(data, "evaluate_share"):      # a streamed file is not compared (docs/DISTRIBUTED.md)
            check_same_held_out(dp, data)
        metrics = evaluate(dp, data)
        if not dp.is_root:
            return 0
    acc = metrics.get("accuracy")
    print(f"{net.name} with {params} on {args.data} (held-out split): loss {metrics['loss']:.4f}"
          + (f", accuracy {100 * acc:.2f}%" if acc is not None else ""))
    return 0


def _warn_unsaved_numbering(data, numbering: dict | None, params: Path, name: str) -> None:
    """Parameters without the numbering of their training data, evaluated on data that
    numbers its words or labels as it reads them: right only on the training data itself."""
    from .readers import data_numbering
    from .train import numbering_path
    if numbering is None and data_numbering(data) is not None and name not in _builtin_data():
        what = "words are given ids" if "words" in data_numbering(data) else "labels are numbered"
        warn(f"{params} has no {numbering_path(params).name} beside it (saved by net.save_params or an older "
             f"structc): {name}'s {what} as this file has them, which matches the model's only if it is "
             f"the data it was trained on")


def _builtin_data() -> set:
    from .datasets import DATASETS
    return set(DATASETS)


def _data_parallel(net, comm, data):
    """`DataParallel(net, comm)` for `data`, or RefusedOnEveryRank: whether a model
    and a data set split exactly depends on nothing a rank has of its own."""
    from .distributed import DataParallel, check_splittable
    try:
        check_splittable(data)
        return DataParallel(net, comm)
    except (ValueError, TypeError) as e:
        raise RefusedOnEveryRank(str(e), comm) from None


def _read_inputs(path: str, net) -> dict:
    """The arrays of an .npy (the model's one input) or .npz (by input name) file,
    reshaped to the declared per-example shape where only the layout differs."""
    import numpy as np
    names = [s["name"] for s in net.meta["inputs"] if s["kind"] == "input"]
    structured = [s["name"] for s in (net.meta.get("graphs") or []) + (net.meta.get("forests") or [])
                  + (net.meta.get("sequences") or [])]
    if structured or not names:
        raise UserError(f"structc predict reads tensors; model {net.name} takes "
                        f"{', '.join(structured) or 'no tensor input'} (a graph, forest or sequence): "
                        "call it from Python")
    try:
        with open(path, "rb") as f:      # else numpy reads text as pickled data and advises allow_pickle
            magic = f.read(6)
        if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
            raise UserError(f"cannot read inputs from {path}: not an .npy or .npz file (save the arrays with "
                            f"numpy.save or numpy.savez)")
        if path.endswith(".npz"):
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
            if len(arrays) == 1 and len(names) == 1 and names[0] not in arrays:
                arrays = {names[0]: next(iter(arrays.values()))}
        else:
            arrays = {names[0]: np.load(path)} if len(names) == 1 else None
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read inputs from {path}: {e}") from None
    if arrays is None:
        raise UserError(f"model {net.name} has inputs {names}: give an .npz file with one array per name")
    if sorted(arrays) != sorted(names):
        raise UserError(f"{path} holds {sorted(arrays)}; model {net.name} takes inputs {names}")
    for spec in net.meta["inputs"]:
        arr, per_example = arrays.get(spec["name"]), spec["shape"][1:]
        if (arr is not None and arr.ndim >= 1 and all(isinstance(d, int) for d in per_example)
                and arr[:1].size == int(np.prod(per_example, dtype=np.int64)) and arr.shape[1:] != tuple(per_example)):
            arrays[spec["name"]] = arr.reshape(-1, *per_example)
    return arrays


def _class_count(net, output: dict) -> int:
    """C when `output` is [N, C] scores for a target `class[N] of C`, else 0."""
    shape = output["shape"]
    for s in net.meta["inputs"]:
        if s["kind"] == "target" and s["classes"] and len(shape) == 2 and shape[1] == s["classes"] \
                and s["shape"] == shape[:1]:
            return s["classes"]
    return 0


#: matplotlib's raster limit, pixels a side (past it, it runs out of memory or refuses)
PLOT_PIXELS = 2 ** 16


def cmd_plot(args) -> int:
    from .runlog import foreign_log, plot, run_file
    out = writable_output(args.output, "the picture")
    try:
        width, height = (float(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size takes WIDTHxHEIGHT in inches, such as 10x4; got {args.size!r}", code=2) from None
    if not (width > 0 and height > 0 and args.dpi > 0):
        raise UserError(f"--size and --dpi must be positive; got {args.size} at {args.dpi} dpi", code=2)
    if not max(width, height) * args.dpi < PLOT_PIXELS:      # inf too: matplotlib draws no larger
        raise UserError(f"--size and --dpi give a picture too large to draw: {args.size} inches at {args.dpi} dpi; "
                        f"at most {PLOT_PIXELS - 1} pixels a side", code=2)

    def draw(name: str) -> None:
        try:
            plot(args.runs, name, size=(width, height), dpi=args.dpi)
        except (FileNotFoundError, RuntimeError) as e:     # a run not found, no matplotlib: not the write
            raise UserError(str(e)) from None
    write_whole(out, "the picture", draw)
    for run in args.runs:
        problem = foreign_log(run_file(run))
        if problem:
            warn(problem)
    print(f"wrote {out} ({round(width * args.dpi)}x{round(height * args.dpi)} pixels, {len(args.runs)} "
          f"run{'' if len(args.runs) == 1 else 's'})", file=sys.stderr)
    return 0


def _binary_stdout():
    """Standard output for `--out -`: binary, so not a terminal (that would print bytes)."""
    if sys.stdout.isatty():
        raise UserError("--out - writes the predictions to standard output as an .npy file (binary), and standard "
                        "output is a terminal: pipe or redirect it, or name a file", code=2)
    return sys.stdout.buffer


def cmd_predict(args) -> int:
    import numpy as np
    to_stdout = args.out == STDOUT      # one .npy for a pipe (np.load seeks: read it through io.BytesIO)
    out = _binary_stdout() if to_stdout else writable_output(with_suffix(args.out, ".npy", (".npz",)),
                                                             "the predictions")
    net, _ = _compile_net(args)
    load_params(net, args.params)
    feed = _read_inputs(args.input, net)
    outputs = {o["name"]: o for o in net.meta["entries"]["forward"]["outputs"]}
    if not to_stdout and out.name.endswith(".npz"):
        chosen = list(outputs) if args.output is None else [args.output]
    elif args.output is None and len(outputs) > 1:
        raise UserError(f"model {net.name} has outputs {list(outputs)}: choose one with --output, "
                        f"or write them all with --out NAME.npz" + (" (standard output takes one)" if to_stdout else ""))
    else:
        chosen = [args.output or next(iter(outputs))]
    for name in chosen:
        if name not in outputs:
            raise UserError(f"model {net.name} has no output '{name}' (outputs: {', '.join(outputs)})")
    values = net.forward(**feed)
    result, said = {}, []
    for name in chosen:
        if _class_count(net, outputs[name]) and not args.raw:
            result[name] = np.argmax(values[name], axis=-1).astype(np.int32)
            said.append(f"class ids from '{name}' ({len(result[name])} rows; --raw for the scores)")
        else:
            result[name] = values[name]
            said.append(f"'{name}' {list(values[name].shape)}")
    if to_stdout:
        data = io.BytesIO()     # numpy writes a file object with tofile, whose error on a pipe closed early is
        try:                    # "N requested and M written": written here, it is a BrokenPipeError (exit 141)
            np.save(data, result[chosen[0]])
            out.write(data.getbuffer())
            out.flush()
        except BrokenPipeError:
            raise
        except OSError as e:        # redirected to a full disk
            raise UserError(f"cannot write the predictions to standard output: {e.strerror or e}") from None
        print(f"wrote {', '.join(said)} to standard output", file=sys.stderr)
        return 0

    def write(name: str) -> None:
        with open(name, "wb") as f:      # an open file: numpy adds no second suffix
            if out.name.endswith(".npz"):
                np.savez(f, **result)
            else:
                np.save(f, result[chosen[0]])
    write_whole(out, "the predictions", write)
    print(f"wrote {', '.join(said)} to {out}")
    return 0


def cmd_profile(args) -> int:
    import numpy as np

    from .api import read_source
    from .native import set_num_threads
    from .profile import profile, profiled_net
    trace = writable_output(args.trace, "the trace") if args.trace else None
    if args.forward and args.lr is not None:
        raise UserError("--lr is the training step's learning rate; --forward profiles the forward pass, which has none")
    _check_step_flags(args, code=2)
    if args.peak is not None and not args.peak > 0:
        raise UserError(f"--peak must be a positive number of GFLOP/s, got {args.peak}", code=2)
    if args.threads is not None:
        set_num_threads(args.threads)
    source, file = read_source(Path(args.file))
    net = profiled_net(source, file, args.model)
    data = _load_bound_data(args.data, net, args.split)
    feed = next(iter(data.batches(args.batch, np.random.default_rng(0))))
    report = profile(net, feed, steps=args.steps, forward=args.forward,
                     lr=TRAIN_DEFAULTS["lr"] if args.lr is None else args.lr, peak=args.peak)
    print(report.table())
    if trace is not None:
        write_whole(trace, "the trace", report.write_trace)
        print(f"\ntrace of {len(report.step_spans)} step(s) in {trace} (open in ui.perfetto.dev or chrome://tracing)")
    return 0


def version_text() -> str:
    """`structc --version`: what decides the machine code this installation makes."""
    import llvmlite
    from llvmlite import binding as llvm

    from .compiler import compiler_fingerprint
    from .native import host_target
    target = host_target()
    feats = [f[1:] for f in target.features.split(",") if f.startswith("+")]
    simd = [f for f in ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni",
                        "amx-tile", "neon", "sve") if f in feats]
    return (f"structc {compiler_fingerprint()} (compiler fingerprint)\n"
            f"llvmlite {llvmlite.__version__}, LLVM {'.'.join(map(str, llvm.llvm_version_info))}\n"
            f"host {target.triple}, CPU {target.cpu}: {len(feats)} features"
            + (f" (vectors: {', '.join(simd)})" if simd else ""))


class _Version(argparse.Action):
    """Prints `version_text()` only when asked: it initialises LLVM."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


# -- the parser ------------------------------------------------------------------

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to options whose help does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    from .compiler import STAGES
    from .datasets import DATASETS
    data_sets = ", ".join(sorted(DATASETS))
    p = argparse.ArgumentParser(prog="structc", description="Compile and train structured neural networks.")
    p.add_argument("--version", action=_Version, help="the version, the compiler fingerprint, llvmlite, LLVM "
                                                      "and the host CPU; then exit")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        c = sub.add_parser(name, formatter_class=_Help, **kw)
        c.add_argument("file", help="a .snet file")
        c.add_argument("--model", help="the model to use when the file defines several (default: its only model)")
        return c

    c = command("check", help="parse and shape-check a .snet file")
    c.set_defaults(run=cmd_check)

    c = command("compile", help="compile a model to native code (into the cache, a library or a dump)",
                description=f"Without -o or --dump, compiles into the cache that structc.compile, train and "
                            f"eval load from. Stages for --dump: {', '.join(STAGES)}, all.")
    c.add_argument("--dump", action="append", metavar="STAGE", help="print a stage (repeatable; default: none)")
    c.add_argument("-o", "--output", help="write a shared library (.so) (default: none: compile into the cache)")
    c.add_argument("-H", "--header", help="also write a C header (default: none)")
    c.add_argument("--params", help="build these parameters (.npz from `structc train`) into the library "
                                    "(default: none)")
    c.add_argument("--target-cpu", default="native",
                   help="native (this machine), generic, x86-64-v2, x86-64-v3 or x86-64-v4")
    c.add_argument("--timings", action="store_true",
                   help="print where the compile's time went: parse, build, autodiff, each pass, lowering, "
                        "LLVM optimisation and code generation, per entry point and part")
    c.add_argument("--kernel-timings", action="store_true",
                   help="--timings, and LLVM's time per kernel (each kernel compiled as a module of its own, "
                        "one at a time, not cached: a slower compile)")
    c.add_argument("--inference", action="store_true",
                   help="the forward entry only: no training code in the library, the dump or the cache")
    c.set_defaults(run=cmd_compile)

    c = command("export", help="write the forward pass as an ONNX model (needs pip install 'structc[onnx]')",
                description="Dense, convolution, pooling, activations, reshapes and reductions; the batch "
                            "dimension N stays dynamic. Recursion over trees and message passing over graphs "
                            "have no ONNX form and are refused.")
    c.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    c.add_argument("--params", help="parameters saved by `structc train` (.npz optional) (default: none: the "
                                    "initial weights)")
    c.set_defaults(run=cmd_export)

    c = command("graph", help="draw the forward and backward graphs (.svg, .png, .pdf, .dot)")
    c.add_argument("-o", "--output", required=True, help="the picture to write")
    c.add_argument("--which", choices=["train", "forward"],
                   help="train: forward and backward; forward: inference only (default: train, or forward for a "
                        "model without a loss)")
    c.add_argument("--unfused", action="store_true", help="before the passes (no fused groups)")
    c.set_defaults(run=cmd_graph)

    c = command("train", help="train a model on a data set",
                description=f"Built-in data sets: {data_sets}; or your data by path: a treebank (one "
                            f"bracketed tree per line), a TU graph folder, a node classification folder "
                            f"(edges, labels, features), a .csv/.npy table (label last) or an .npz (x_train, "
                            f"y_train, x_test, y_test; or x, y). Bars are shown on a terminal only; otherwise "
                            f"one line per epoch. Per-epoch metrics go to NAME.metrics.jsonl beside the "
                            f"parameters NAME.npz (see `structc plot`).")
    c.add_argument("--data", required=True, metavar="DATA",
                   help=f"a built-in data set ({data_sets}) or a file or folder of your data")
    _split_option(c)
    _stream_option(c)
    c.add_argument("--epochs", type=int, default=20, help="epochs to train (with --resume: the total to reach)")
    c.add_argument("--batch", type=int, help=f"examples per step (default: {TRAIN_DEFAULTS['batch']}; "
                                             f"with --resume: the run's)")
    c.add_argument("--lr", type=float, help=f"learning rate (default: {TRAIN_DEFAULTS['lr']}; "
                                            f"with --resume: the run's)")
    c.add_argument("--optimizer", choices=["sgd", "momentum", "adam"],
                   help=f"the update rule (default: {TRAIN_DEFAULTS['optimizer']}; with --resume: the run's)")
    c.add_argument("--threads", type=int, help="threads for the native kernels (default: all cores; with "
                                               "--distributed: the cores shared among the ranks on a machine)")
    c.add_argument("--seed", type=int, help="initialisation, shuffling and dropout seed (default: 0; with "
                                            "--resume: the run's generator continues)")
    c.add_argument("--out", help="where to save the parameters; `.npz` is added if missing, and the training "
                                 "state goes next to them as NAME.train.npz (default: <model>.npz; with "
                                 "--resume: the resumed file)")
    c.add_argument("--resume", metavar="PARAMS",
                   help="continue the run that saved PARAMS: its parameters, and from PARAMS.train.npz the "
                        "epochs done, the optimizer state (momentum / Adam moments) and the shuffling, so "
                        "that it ends as an uninterrupted run would (default: none: a new run)")
    c.add_argument("--clip-norm", type=float, metavar="C",
                   help="clip gradients by global norm: scale them all by min(1, C / their L2 norm) before "
                        "each update (default: 0: no clipping; with --resume: the run's)")
    c.add_argument("--schedule", choices=["constant", "step", "cosine"],
                   help="scale the lr per step: step (times --gamma every --decay-steps steps) or cosine (to "
                        "lr * --floor over --decay-steps steps), after --warmup (default: constant; with "
                        "--resume: the run's)")
    c.add_argument("--warmup", type=int, metavar="W", help="linear warm-up: the lr grows to its value over W steps "
                                                           "(default: 0)")
    c.add_argument("--decay-steps", type=int, metavar="T", help="the step schedule's period or the cosine's "
                                                                 "length, in steps (default: none: required)")
    c.add_argument("--gamma", type=float, help="the step schedule's factor (default: 0.1)")
    c.add_argument("--floor", type=float, help="where the cosine ends, as a fraction of the lr (default: 0)")
    c.add_argument("--init", metavar="PARAMS",
                   help="start a new run from these parameters (.npz, e.g. a trained model to fine-tune) "
                        "instead of the initialisers (default: none)")
    c.add_argument("--freeze", metavar="NAMES",
                   help="comma-separated parameters or layers (conv1,conv2.w) that training leaves unchanged: "
                        "no gradient is computed for them (default: none; with --resume: the run's)")
    c.add_argument("--val-split", type=float, metavar="FRACTION",
                   help="validate on this fraction of each class of the training examples (seeded with --seed, "
                        "disjoint from training; val_loss and val_accuracy each epoch) (default: none; with "
                        "--resume: the run's)")
    c.add_argument("--early-stop", type=int, metavar="PATIENCE",
                   help="stop when --monitor has not improved for PATIENCE epochs and keep (and save) the best "
                        "epoch's parameters; needs --val-split (default: none: train all --epochs)")
    c.add_argument("--monitor", choices=["val_loss", "val_acc"],
                   help="what --early-stop watches: validation loss (lower is better) or accuracy (higher) "
                        "(default: val_loss; with --resume: the run's)")
    c.add_argument("--tensorboard", metavar="DIR",
                   help="also write each epoch's loss, accuracy, learning rate and time as TensorBoard scalars "
                        "to DIR (needs pip install 'structc[tensorboard]': tensorboardX, no TensorFlow) "
                        "(default: none)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    _distributed_option(c)
    c.set_defaults(run=cmd_train)

    c = command("eval", help="report held-out accuracy and loss of trained parameters")
    c.add_argument("--data", required=True, metavar="DATA",
                   help=f"a built-in data set ({data_sets}) or a file or folder of your data; its held-out "
                        f"part is used")
    _split_option(c)
    _stream_option(c)
    c.add_argument("--params", required=True, help="parameters saved by `structc train` (.npz optional)")
    _distributed_option(c)
    c.set_defaults(run=cmd_eval)

    c = command("predict", help="run a trained model on inputs and write its predictions")
    c.add_argument("--params", required=True, help="parameters saved by `structc train` (.npz optional)")
    c.add_argument("--input", required=True, help="an .npy (the model's one input) or .npz (one array per "
                                                  "input name) file")
    c.add_argument("--out", required=True, help="an .npy file (one output), .npz (every output by name), or - "
                                                "(one output as .npy on standard output)")
    c.add_argument("--output", help="the output to write (default: the model's only output)")
    c.add_argument("--raw", action="store_true", help="write class scores as they are, not class ids")
    c.set_defaults(run=cmd_predict)

    c = sub.add_parser("plot", formatter_class=_Help, help="draw loss and accuracy curves of training runs",
                       description="Reads each run's NAME.metrics.jsonl (written by structc train) and draws "
                                   "training and held-out loss, and held-out accuracy, against the epoch. "
                                   "Needs matplotlib (pip install 'structc[plot]').")
    c.add_argument("runs", nargs="+", metavar="RUN",
                   help="a run: its metrics file, its parameters NAME.npz, or NAME")
    c.add_argument("-o", "--output", default="curves.png", help="the picture to write (.png, .svg, .pdf)")
    c.add_argument("--size", default="10x4", help="WIDTHxHEIGHT in inches")
    c.add_argument("--dpi", type=int, default=100, help="pixels per inch")
    c.set_defaults(run=cmd_plot)

    c = command("profile", help="time every kernel of a training step (or the forward pass)",
                description="Runs steps on the first batch of the data and prints each kernel's time, "
                            "share of the step, and GFLOP/s as a fraction of the measured FMA peak (matrix "
                            "products and convolutions), grouped by the .snet line that produced it.")
    c.add_argument("--data", required=True, metavar="DATA",
                   help=f"a built-in data set ({data_sets}) or a file or folder of your data")
    _split_option(c)
    c.add_argument("--batch", type=int, default=TRAIN_DEFAULTS["batch"], help="examples per step")
    c.add_argument("--steps", type=int, help="timed steps (default: about a second's worth)")
    c.add_argument("--forward", action="store_true", help="the forward pass instead of a training step")
    c.add_argument("--lr", type=float, help=f"learning rate of the training steps (default: {TRAIN_DEFAULTS['lr']}; "
                                            f"not with --forward)")
    c.add_argument("--threads", type=int, help="threads for the native kernels (default: all cores)")
    c.add_argument("--peak", type=float, metavar="GFLOPS",
                   help="one core's peak GFLOP/s (default: measured with a loop of FMAs)")
    c.add_argument("--trace", metavar="FILE", help="also write a Chrome/Perfetto trace (JSON), a lane per thread "
                                                   "(default: none)")
    c.set_defaults(run=cmd_profile)
    return p


def _split_option(c) -> None:
    c.add_argument("--split", type=float, metavar="FRACTION",
                   help="for your data that comes as one set: the held-out fraction of each class, drawn "
                        "with seed 0 so that train and eval see the same parts (default: 0.2; built-in data "
                        "sets and files that give both parts keep theirs)")


def _stream_option(c) -> None:
    c.add_argument("--stream", action="store_true",
                   help="read a treebank or table file a chunk of 4096 examples at a time, for files larger than "
                        "memory: the same checks and split, shuffled within chunks (default: only files over "
                        "256 MiB)")


def _distributed_option(c) -> None:
    c.add_argument("--distributed", action="store_true",
                   help="data-parallel across MPI ranks: run as `mpiexec -n 2 python -m mpi4py -m structc ... "
                        "--distributed` (needs pip install 'structc[mpi]'); each global batch is split among "
                        "the ranks, gradients are exact; rank 0 prints and writes")


def main(argv=None) -> int:
    try:
        args = parser().parse_args(argv)
    except BrokenPipeError:             # `structc --version | true`: printed as the arguments are read
        return _reader_gone()
    code = _main(args)
    if code not in (0, None) and getattr(args, "distributed", False) and not getattr(args, "ended_together", False):
        _end_other_ranks(code)
    return code


def _end_other_ranks(code: int) -> None:
    """A rank that failed ends the job, so that the others do not wait for it forever."""
    try:
        from .distributed import abort_job
        abort_job(code)
    except ImportError:         # no mpi4py: there are no other ranks
        pass


def _main(args) -> int:
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
    except RefusedOnEveryRank as e:
        if e.comm.Get_rank() == 0:
            print(f"structc: error: {e}", file=sys.stderr)
        e.comm.Barrier()            # every rank is here: none ends the job before rank 0 has said why
        args.ended_together = True
        return e.code
    except UserError as e:
        print(f"structc: error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, TypeError, FloatingPointError) as e:
        print(f"structc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The reader went away (`structc compile --dump=llvm | head`): stop quietly, and
    point stdout at /dev/null so the interpreter's final flush does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


if __name__ == "__main__":
    sys.exit(main())
