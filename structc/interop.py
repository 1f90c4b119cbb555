"""What exporters need from a compiled `Net`: the forward graph it was
compiled from, rebuilt from the source it keeps (`net._compiled_from`, set
by `structc.compile`), and checked to be that `Net`'s (same parameters)."""
from __future__ import annotations


def forward_graph_of(net, source: str | None = None):
    """The forward graph `net` was compiled from, rebuilt from its source."""
    from .build import build_model
    from .compiler import forward_graph
    from .syntax import parse
    if source is None:
        source = (getattr(net, "_compiled_from", None) or (None,))[0]
    if source is None:
        raise ValueError(f"model {net.name} carries no source (it was loaded from a library?): "
                         f"pass source=<the .snet text it was compiled from>")
    program = parse(source, net.meta.get("file", "<source>"))
    mdef = build_model(program, net.name)
    _check_same_interface(net, mdef)
    _check_same_program(net, program)
    return forward_graph(mdef)


def _check_same_program(net, program) -> None:
    """Parameters of the same names and shapes may still mean other things (relu edited
    to tanh): the source must be the Net's own model, as its metadata's digest says
    (libraries built before the digest was kept carry none: only their parameters are checked)."""
    from .compiler import model_digest
    kept = net.meta.get("program")
    if kept is not None and model_digest(program, net.name) != kept:
        raise ValueError(f"the source given is not the one model {net.name} was compiled from: its parameters "
                         "match, but its definition differs (comments and layout aside); pass the source it "
                         "was compiled from")


def _check_same_interface(net, mdef) -> None:
    """A source that is not the Net's would export other weights' meaning."""
    theirs = {p["name"]: tuple(p["shape"]) for p in net.meta["params"]}
    ours = {name: tuple(p.type.shape) for name, p in mdef.params.items()}
    if theirs != ours:
        raise ValueError(f"the source given is not the one model {net.name} was compiled from: its "
                         f"parameters differ ({_differences(theirs, ours)})")


def _differences(theirs: dict, ours: dict) -> str:
    parts = [f"{k}: {theirs.get(k)} in the Net, {ours.get(k)} in the source"
             for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    return "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "")
