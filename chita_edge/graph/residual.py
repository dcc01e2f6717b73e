"""Residual blocks that can be removed whole (``residual_blocks``).

A submodule ``M`` whose forward is ``y = x + f(x)`` (optionally ``act(x + f(x))``) with the shortcut the identity
-- ``x`` is ``M``'s only input, ``f`` is computed from ``x`` alone, every path from ``x`` to ``f(x)`` passes a
Conv/Linear, nothing inside ``f`` is used outside ``M``, and the shapes of ``x`` and ``f(x)`` match -- can be
removed whole (``f := 0``): ``M`` becomes ``nn.Identity`` (or the activation alone when ``act(x) != x``;
``relu(relu(z)) = relu(z)``, so a ReLU after the add goes too when ``x`` is itself a ReLU output). Found from the
same fx trace as the channel groups (``chita_edge.graph.trace``), never by module names: ResNet20 has 7 such
blocks (its 3 downsampling blocks have a 1x1-conv shortcut and are not). A pruner marks a block removed by
zeroing every Conv/Linear weight and bias and every BatchNorm gamma/beta of ``f``; ``compact_model``
(``chita_edge.graph.compact``) removes a block when every Conv/Linear of ``f`` is zero and ``f(x)`` measured on
the example input is zero (then it is zero for every input). ``REPLACEMENTS`` names what a dropped block
becomes, as a plan's ``"drop"`` entry does; ``set_submodule`` puts it in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from chita_edge.graph.trace import ACTIVATIONS, BN, CONV, act_name, is_add_node, trace_shapes

__all__ = ["REPLACEMENTS", "ResidualBlock", "residual_blocks", "set_submodule", "traced_blocks"]


@dataclass(frozen=True)
class ResidualBlock:
    """A submodule computing ``[act](x + f(x))`` with an identity shortcut; removable whole (``f := 0``).

    id: the submodule's path (``"layer1.1"``), which a dropped block's plan entry names;
    replacement: what the submodule becomes when dropped: ``"identity"`` or an activation (``"relu"``, ...);
    nodes: names of the ``torch.fx.symbolic_trace`` nodes that disappear with it (``f``, the add, and the
        activation when the replacement is the identity), for a cost model built on the same trace;
    modules: the Conv/Linear/BatchNorm modules of ``f`` (what a pruner zeroes to mark the block removed);
    output: the name of the node computing ``f(x)`` (the add's operand).
    """

    id: str
    replacement: str
    nodes: tuple[str, ...]
    modules: tuple[str, ...]
    output: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "replacement": self.replacement, "modules": list(self.modules)}


REPLACEMENTS: dict[str, type[nn.Module]] = {"identity": nn.Identity, **ACTIVATIONS}
_IDEMPOTENT = frozenset({"relu", "relu6"})  # act(act(z)) == act(z)


def _module_paths(n: fx.Node) -> list[str]:
    """The module paths ``n`` was traced inside, outermost first (from the tracer's nn_module_stack)."""
    stack = n.meta.get("nn_module_stack") or {}
    out = []
    for k, v in stack.items():
        path = v[0] if isinstance(v, tuple) and v and isinstance(v[0], str) else k
        out.append(path)
    return out


def _branch(y: fx.Node, x: fx.Node, dynamic: dict[fx.Node, bool]) -> set[fx.Node] | None:
    """The input-dependent nodes computing ``y`` from ``x`` alone, or None when ``y`` also depends on another
    input-dependent tensor (a path to the model input that avoids ``x``)."""
    out: set[fx.Node] = set()
    todo = [y]
    while todo:
        n = todo.pop()
        if n is x or n in out or not dynamic.get(n, False):
            continue
        if n.op == "placeholder":
            return None
        out.add(n)
        todo.extend(n.all_input_nodes)
    return out


def _blocks_of(gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]],
               module_names: set[str]) -> list[ResidualBlock]:
    nodes = list(gm.graph.nodes)
    dynamic: dict[fx.Node, bool] = {}
    for n in nodes:
        dynamic[n] = n.op == "placeholder" or any(dynamic.get(a, False) for a in n.all_input_nodes)
    paths = {n: _module_paths(n) for n in nodes}
    order = {n: i for i, n in enumerate(nodes)}
    found: list[ResidualBlock] = []
    for add in nodes:
        if not is_add_node(add) or add.kwargs or len(add.args) != 2 or add not in shapes:
            continue
        a, b = add.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for x, y in ((a, b), (b, a)):
            if shapes.get(x) != shapes[add] or shapes.get(y) != shapes[add]:
                continue
            br = _branch(y, x, dynamic)
            if not br or any(u not in br and u is not add for n in br for u in n.users):
                continue  # not f(x) alone, or a value of f is used elsewhere
            heavy = {n for n in br if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Linear, *CONV))}
            # every path from x to y passes a Conv/Linear: zeroing them makes f(x) a constant
            todo, seen, leaks = [y], set(), False
            while todo and not leaks:
                n = todo.pop()
                if n in seen or n in heavy or n not in br and n is not x:
                    continue
                seen.add(n)
                if n is x:
                    leaks = True
                    break
                todo.extend(n.all_input_nodes)
            if not heavy or leaks:
                continue
            act = next(iter(add.users)) if len(add.users) == 1 else None
            act_kind = act_name(gm, act) if act is not None and act.args and act.args[0] is add else None
            if act_kind is None:
                act = None
            # the enclosing submodule: the deepest module path shared by f and the add
            common = paths[add]
            for n in br:
                pn = paths[n]
                k = 0
                while k < min(len(common), len(pn)) and common[k] == pn[k]:
                    k += 1
                common = common[:k]
            if not common or common[-1] not in module_names:
                continue
            mpath = common[-1]
            inside = {n for n in nodes if mpath in paths[n]}
            body = br | {add}
            with_act = act is not None and act in inside
            if with_act:
                body = body | {act}
            if inside != body:
                continue  # the submodule computes more than [act](x + f(x))
            if with_act:
                assert act_kind is not None
                same = act_name(gm, x) == act_kind if x.op in ("call_module", "call_function", "call_method") else False
                repl = "identity" if act_kind in _IDEMPOTENT and same else act_kind
            else:
                repl = "identity"
            gone = body if repl == "identity" else body - {act}
            mods = sorted({n.target for n in br if n.op == "call_module" and isinstance(
                gm.get_submodule(n.target), (nn.Linear, *CONV, *BN))}, key=lambda t: min(
                    order[n] for n in br if n.op == "call_module" and n.target == t))
            found.append(ResidualBlock(mpath, repl, tuple(n.name for n in sorted(gone, key=order.__getitem__)),
                                       tuple(mods), y.name))
            break
    # nested blocks: an outer block removes the inner ones with it; both stay candidates
    return found


def residual_blocks(model: nn.Module, example_input: Any) -> list[ResidualBlock]:
    """Every removable residual block of ``model`` (identity shortcut), in execution order; see the module
    docstring. Raises ``BadInput`` when the model cannot be traced."""
    return traced_blocks(model, example_input)[1]


def traced_blocks(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, list[ResidualBlock]]:
    """The traced graph (``trace_shapes``) and ``residual_blocks`` found on it."""
    gm, shapes = trace_shapes(model, example_input)
    return gm, _blocks_of(gm, shapes, {n for n, _ in model.named_modules() if n})


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (a dotted module path) in ``model``."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)

