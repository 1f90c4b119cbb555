"""fuse: partition the graph into groups, each lowered as one loop nest.

  1. An elementwise node whose only user is an elementwise node of the same
     shape joins that user's group: chains like bias + activation, or the
     backward `g * (y > 0)`, run in registers.
  2. A sum over everything (a loss) joins the elementwise group computing
     its operand: the loop accumulates as it goes, so the summed values are
     never stored. (Such a group is not also put into a matmul epilogue.)
  3. A matmul absorbs the elementwise groups that consume its result at the
     same shape, as its epilogue: bias, activation and the activation's
     derivative mask are applied to the tile before it is stored; then the
     elementwise groups that read only the epilogue's values and draw or
     read random numbers (dropout's mask and product after an activation).
  4. A `part` (another result of a kernel with several) joins the group of
     the kernel that computes it.
  5. An op with the `siblings` trait names nodes that read its operands in
     the same loop nest (`op.siblings(graph, nid)`); they join its group and
     its kernel stores them too: max-pooling's arg-max rides in the forward
     max-pool, the bias gradient in the kernel gradient's read of the delta.
  6. An elementwise node with several users, its group elementwise, joins
     the group of its first elementwise user of its shape, when every other
     group reading it runs after that one: it is stored for them, from the
     same loop.
  7. (Run before 6.) A cell's gate math (`lstm_gates`, `lstm_state`: an op with `gate_math`)
     whose gates only a matmul's epilogue group computes joins that group
     (`Group.gate`): the kernel runs the gate math on each block of rows
     right after that block's product, its gates still in L1 or L2
     (`gemm.emit_gemm(gate=...)`): one kernel and one pool job where there
     were two (the gates' product and a row kernel reading them back). Only
     where every gate's units fill whole panels of the matmul (a multiple of
     32 units) and K fits one k block.
Nodes that are constants are inlined wherever used; views and sources get
no group. Groups are kept in execution order, effects (the optimiser) last.
"""
from __future__ import annotations

import heapq

from ..graph import Graph, Group

NO_GROUP = {"source", "inline", "view"}


def fuse(g: Graph) -> Graph:
    order = g.topo()
    pos = {nid: k for k, nid in enumerate(order)}
    outputs = set(g.outputs.values())
    group: dict[int, Group] = {}
    counter = iter(range(10 ** 9))

    def kind_of(nid):
        traits = g.nodes[nid].op.traits
        if "elementwise" in traits:
            return "elementwise"
        if "epilogue" in traits:
            return "epilogue"
        return "effect" if "effect" in traits else "kernel"

    for nid in order:
        if not g.nodes[nid].op.traits & NO_GROUP:
            group[nid] = Group(next(counter), kind_of(nid), [nid], nid)

    def merge(into: Group, other: Group) -> None:
        into.members.extend(other.members)
        for m in other.members:
            group[m] = into

    # 1. elementwise producers into their single elementwise consumer
    for nid in reversed(order):
        gr = group.get(nid)
        if gr is None or gr.kind != "elementwise" or nid in outputs:
            continue
        users = g.users(nid)
        if len(users) != 1:
            continue
        u = users[0]
        ug = group.get(u)
        if ug is None or ug is gr or ug.kind != "elementwise" or g.nodes[u].shape != g.nodes[nid].shape:
            continue
        merge(ug, gr)
        ug.anchor = nid if pos[nid] < pos[ug.anchor] else ug.anchor

    # 2. full reductions into the elementwise group producing their operand
    for nid in order:
        node = g.nodes[nid]
        # the loop accumulates with +: a max or min over everything stays a kernel of its own
        if "summing" not in node.op.traits or nid not in group or node.type.rank != 0:
            continue
        src = node.inputs[0]
        sg = group.get(src)
        if sg is None or sg.kind != "elementwise" or group[nid] is sg:
            continue
        if g.nodes[src].shape != g.nodes[sg.anchor].shape or len(g.nodes[src].shape) == 0:
            continue
        merge(sg, group[nid])
        sg.reductions.append(nid)

    # 3. elementwise consumers of a matmul into its epilogue
    for nid in order:
        gr = group.get(nid)
        if gr is None or gr.kind != "epilogue" or gr.anchor != nid:
            continue
        for u in g.users(nid):
            ug = group.get(u)
            if ug is None or ug.kind != "elementwise" or g.nodes[u].shape != g.nodes[nid].shape:
                continue
            if any(g.nodes[m].shape != g.nodes[nid].shape for m in ug.members):
                continue
            if ug.reductions or _would_cycle(g, nid, ug, pos):
                continue
            merge(gr, ug)
        _absorb_readers(g, nid, gr, group, merge, pos)

    # 4. extra results of a kernel (ops with the `part` trait) are written by
    #    the kernel of their first operand: they join its group
    for nid in order:
        gr = group.get(nid)
        if gr is not None and "part" in g.nodes[nid].op.traits:
            owner = group.get(g.nodes[nid].inputs[0])
            if owner is not None and owner is not gr:
                merge(owner, gr)

    # 5. siblings into their host's loop nest
    for nid in order:
        gr = group.get(nid)
        if gr is None or "siblings" not in g.nodes[nid].op.traits or gr.kind != "kernel" or gr.anchor != nid:
            continue
        for s in g.nodes[nid].op.siblings(g, nid):
            sg = group.get(s)
            if sg is None or sg is gr or len(sg.members) != 1:
                continue
            if _reaches(g, nid, s, pos) or _reaches(g, s, nid, pos):
                continue
            merge(gr, sg)

    # 7. a cell's gate math into the epilogue of the product of its gates
    if GATED_PRODUCTS:
        for nid in order:
            _gate_into_product(g, nid, group, merge, pos, outputs)

    # 6. an elementwise producer with several users into its first elementwise
    #    user's group of the same shape, when every other group reading it runs
    #    after that one: it is stored for them all the same, from the same loop
    #    (batch norm's x - mean and its square). Last, on the groups the other
    #    rules made, with their order: a merge that keeps every reader of the
    #    producer after the merged group keeps that order valid, so no group can
    #    be needed both before and after it (GAT and sequence models have such
    #    groups, spread over the graph)
    _merge_shared_producers(g, group, merge, pos, order)

    groups = {id(gr): gr for gr in group.values()}.values()
    for gr in groups:
        gr.members.sort(key=pos.get)
        members = set(gr.members)
        gates = g.nodes[gr.gate].inputs[0] if gr.gate is not None else None     # read back by the gate math
        gr.outputs = [m for m in gr.members
                      if m in outputs or m == gates or any(u not in members for u in g.users(m))]
    g.groups = _schedule(g, list(groups), group, pos)
    return g


#: rule 7 on (off: every cell's gate math a row kernel of its own, for comparisons)
GATED_PRODUCTS = True
#: the products whose epilogue may take a gate math (their K must fit one k block, `gemm.KC`)
GATE_PRODUCERS = frozenset({"matmul", "matmul_pair"})
#: a gate's units must fill whole panels of the matmul (two vectors of 16 lanes on AVX-512)
GATE_UNITS_STEP = 32


def _gate_into_product(g: Graph, nid: int, group: dict, merge, pos: dict, outputs: set) -> None:
    """Rule 7 (see `fuse`) for node `nid`."""
    from ..lower.gemm import KC
    node = g.nodes[nid]
    gr = group.get(nid)
    if gr is None or gr.anchor != nid or not hasattr(node.op, "gate_math"):
        return
    gates = node.inputs[0]
    pg = group.get(gates)
    if pg is None or pg is gr or pg.kind != "epilogue" or pg.reductions or pg.gate is not None:
        return
    product = g.nodes[pg.anchor]
    if product.op.name not in GATE_PRODUCERS or product.attrs.get("ta") or product.attrs.get("tb"):
        return
    width = g.nodes[gates].shape[-1]
    units = g.nodes[nid].shape[1] // 2
    k = sum(g.nodes[i].shape[1] for i in product.inputs[:-1]) if product.op.name == "matmul_pair" \
        else g.nodes[product.inputs[0]].shape[1]
    if not (isinstance(width, int) and isinstance(k, int) and k <= KC
            and units % GATE_UNITS_STEP == 0 and width % units == 0):
        return
    # the gates are read by this cell's kernel alone, and nothing else of the product leaves its group
    inside = set(pg.members) | set(gr.members)
    if any(m in outputs or any(u not in inside for u in g.users(m)) for m in pg.members):
        return
    # what the gate math reads besides the gates (c, the kept memory) comes before the product
    if any(i not in inside and _reaches(g, pg.anchor, i, pos) for m in gr.members for i in g.nodes[m].inputs):
        return
    merge(pg, gr)
    pg.gate = nid


def _merge_shared_producers(g: Graph, group: dict, merge, pos: dict, order: list) -> None:
    """Rule 6 (see `fuse`)."""
    groups = list({id(gr): gr for gr in group.values()}.values())
    place = {gr.id: k for k, gr in enumerate(_schedule(g, groups, group, pos))}
    for nid in reversed(order):
        gr = group.get(nid)
        if gr is None or gr.kind != "elementwise" or gr.reductions or len(g.users(nid)) < 2:
            continue
        shape = g.nodes[nid].shape
        if any(g.nodes[m].shape != shape for m in gr.members):
            continue
        for u in sorted(g.users(nid), key=pos.get):
            ug = group.get(u)
            if ug is None or ug is gr or ug.kind != "elementwise" or ug.reductions:
                continue
            if any(g.nodes[m].shape != shape for m in ug.members):
                continue
            if all(place[r.id] > place[ug.id] for r in _readers(g, gr, group) if r is not ug):
                merge(ug, gr)
                ug.anchor = min(ug.members, key=pos.get)
            break


def _readers(g: Graph, gr: Group, group: dict):
    """The other groups reading a value of `gr` (through views)."""
    todo, seen, found = list(gr.members), set(), {}
    while todo:
        for u in g.users(todo.pop()):
            ug = group.get(u)
            if ug is None:          # a view, or a node of no group: its users read the same values
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
            elif ug is not gr:
                found[ug.id] = ug
    return found.values()


def _absorb_readers(g: Graph, anchor: int, gr: Group, group: dict, merge, pos: dict) -> None:
    """3b. Elementwise groups that read nothing but the epilogue's values (and
    leaves) and hold or read an `indexed` op join it too, until none is left:
    dropout's mask of an activation (which other users keep apart from its
    chain) and x * mask are then computed and stored in the matmul's store
    loop rather than in loops of their own. (Without the `indexed` condition
    the rule would also move other consumers, e.g. GAT's activations and
    derivative masks, into epilogues: left for a measured change.)"""
    shape = g.nodes[anchor].shape
    grew = True
    while grew:
        grew = False
        for m in list(gr.members):
            for u in g.users(m):
                ug = group.get(u)
                if ug is None or ug is gr or ug.kind != "elementwise" or ug.reductions:
                    continue
                if any(g.nodes[x].shape != shape for x in ug.members):
                    continue
                if not any("indexed" in g.nodes[x].op.traits for x in ug.members) and \
                        not any("indexed" in g.nodes[i].op.traits for x in ug.members for i in g.nodes[x].inputs):
                    continue
                if any(group[p] not in (gr, ug) for x in ug.members for p in _producers(g, x, group)):
                    continue
                inside = set(gr.members) | set(ug.members)
                if any(i not in inside and _reaches(g, anchor, i, pos)        # a view of a later value
                       for x in ug.members for i in g.nodes[x].inputs):
                    continue
                merge(gr, ug)
                grew = True


def _would_cycle(g: Graph, anchor: int, other: Group, pos: dict) -> bool:
    """Merging `other` into the anchor's group is illegal if one of its
    leaves is computed from the anchor outside both groups. (`pos`: places in
    a topological order; a leaf placed before the anchor, or one that reads
    nothing (a parameter), cannot depend on it: that spares most path
    searches.)"""
    members = set(other.members)
    for m in other.members:
        for i in g.nodes[m].inputs:
            if i == anchor or i in members or pos[i] < pos[anchor] or not g.nodes[i].inputs:
                continue
            if _reaches(g, anchor, i, pos):
                return True
    return False


def _reaches(g: Graph, src: int, dst: int, pos: dict) -> bool:
    """Whether a path leads from `src` to `dst` (`nx.has_path`): a walk back
    from `dst` through the nodes placed after `src` in the topological order
    `pos`, the only ones such a path can pass. A search of the whole graph
    per query made fusing a GNN quadratic in its rounds."""
    if src == dst:
        return True
    after = pos[src]
    if pos[dst] < after:
        return False
    seen, todo = {dst}, [dst]
    while todo:
        for i in g.nodes[todo.pop()].inputs:
            if i == src:
                return True
            if i not in seen and pos[i] > after:
                seen.add(i)
                todo.append(i)
    return False


def _schedule(g: Graph, groups: list[Group], group: dict, pos: dict) -> list[Group]:
    """The groups in an order their reads allow, the one whose first member
    comes first in `pos` when several are ready (Kahn's algorithm, a heap)."""
    readers: dict[int, set[int]] = {gr.id: set() for gr in groups}
    for gr in groups:
        for m in gr.members:
            for i in _producers(g, m, group):
                src = group[i]
                if src is not gr:
                    readers[src.id].add(gr.id)
    # Effects run after everything else: they overwrite the parameters.
    effects = [gr for gr in groups if gr.kind == "effect"]
    for e in effects:
        for gr in groups:
            if gr.kind != "effect":
                readers[gr.id].add(e.id)
    waiting = dict.fromkeys(readers, 0)
    for after in readers.values():
        for k in after:
            waiting[k] += 1
    first = {gr.id: min(pos[m] for m in gr.members) for gr in groups}
    ready = [(first[k], k) for k, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    by_id, order = {gr.id: gr for gr in groups}, []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(by_id[k])
        for u in readers[k]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (first[u], u))
    assert len(order) == len(groups), "fusion produced a cycle"
    return order


def _producers(g: Graph, nid: int, group: dict):
    """Grouped nodes whose values `nid` reads, looking through views."""
    for i in g.nodes[nid].inputs:
        while i not in group and "view" in g.nodes[i].op.traits:
            i = g.nodes[i].inputs[0]
        if i in group:
            yield i
