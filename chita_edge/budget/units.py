"""A model cut into the units the cost model times, over the shared fx trace (``chita_edge.graph.trace``).

Units follow how ONNX Runtime fuses the graph on CPU: a Conv or Linear with the BatchNorm, activation and
residual add that follow it, a depthwise conv with its BatchNorm and activation, and every other op on its own.

* ``TracedGraph`` / ``trace_graph``: the traced model with every node's shape and channel space
  (``chita_edge.graph.channels`` channel groups), its users and its execution order. A tensor whose dim 1 is a
  concatenation along the channels (``torch.cat``, DenseNet/SqueezeNet/Inception-style) has ``parts``: its
  inputs' spaces at their offsets, so that a unit fed by a ``cat`` scales with each of them.
* ``Unit`` / ``split_units``: the units and the channel spaces whose widths each depends on; a unit's
  ``signature`` (what it computes, without names) keys its timings in the cache.
* ``build_unit``: one unit rebuilt alone at given widths (random weights and inputs, fixed seed), ready to
  export; ``scaled_shape``: a node's shape at given widths.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from chita_edge.core.errors import BadInput
from chita_edge.graph.channels import ChannelGroupSpec
from chita_edge.graph.trace import BN, is_add_node, is_bn_node, is_conv, is_depthwise, trace_shapes

DENSE, DEPTHWISE, OTHER = "dense", "depthwise", "other"
MAX_AXES = 3  # channel spaces per unit at most: a unit's table is timed on the product of their width grids

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout)
_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.sigmoid, torch.tanh,
                  F.hardswish, F.hardsigmoid, F.hardtanh, F.dropout}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_"}


@dataclass(frozen=True)
class Unit:
    """A group of graph nodes timed together; ``axes`` are the channel spaces whose widths it depends on."""

    name: str
    kind: str  # dense / depthwise / other
    nodes: tuple[str, ...]
    axes: tuple[str, ...]
    signature: str


@dataclass
class TracedGraph:
    """The model's fx trace with, per node name, its output shape, channel space, users and position."""

    gm: fx.GraphModule
    shapes: dict[str, tuple[int, ...]]
    fam: dict[str, tuple[str | None, int]]  # node -> (channel space of dim 1, features per channel)
    sizes: dict[str, int]
    users: dict[str, list[str]]
    order: dict[str, int]
    # node -> dim 1 as a concatenation, in order: (channel space, features per channel) or (None, fixed width);
    # such a node's ``fam`` is (None, 1)
    parts: dict[str, tuple[tuple[str | None, int], ...]] = field(default_factory=dict)
    # nodes whose ``fam`` is their last dim, not dim 1 (channels last: after a permute, a Linear over the channels)
    last: set[str] = field(default_factory=set)

    def pieces(self, name: str) -> tuple[tuple[str | None, int], ...]:
        """Node ``name``'s dim 1 as pieces (space, features per channel) / (None, fixed width); ``()`` without
        a channel dim."""
        if name in self.parts:
            return self.parts[name]
        f, r = self.fam.get(name, (None, 1))
        s = self.shapes.get(name, ())
        if f is not None:
            return ((f, r),)
        return ((None, s[1]),) if len(s) >= 2 else ()

    def spaces(self, name: str) -> list[str]:
        """The channel spaces node ``name``'s dim 1 scales with, each once, in order."""
        return list(dict.fromkeys(f for f, _ in self.pieces(name) if f is not None))


def _is_act(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _ACT_MODULES)
    if n.op == "call_function":
        return n.target in _ACT_FUNCTIONS
    return n.op == "call_method" and n.target in _ACT_METHODS


def trace_graph(model: nn.Module, example: torch.Tensor, specs: Sequence[ChannelGroupSpec]) -> TracedGraph:
    """Trace ``model`` on one sample of ``example`` and follow the channel spaces of ``specs`` through it."""
    gm, node_shapes = trace_shapes(model, example[:1], needed_by="the cost model")
    shapes = {n.name: s for n, s in node_shapes.items()}
    out_fam: dict[str, tuple[str, int]] = {}  # module -> (space, output features per channel: a group's width)
    dw_fam: dict[str, tuple[str, int]] = {}  # depthwise and grouped convs (a channel passes through)
    segments: dict[str, list[tuple[int, int, str, int, int]]] = {}  # module -> its output as groups at offsets
    for s in specs:
        for m in s.members:
            if m.kind == "out":
                out_fam[m.module] = (s.id, m.repeat)
            elif m.kind == "dw":
                dw_fam[m.module] = (s.id, m.repeat)
            if m.kind in ("out", "dw") and m.total:
                segments.setdefault(m.module, []).append((m.offset, m.total, s.id, m.repeat, s.size))
    fam: dict[str, tuple[str | None, int]] = {}
    users: dict[str, list[str]] = {}
    order: dict[str, int] = {}
    parts: dict[str, tuple[tuple[str | None, int], ...]] = {}
    last: set[str] = set()
    for i, n in enumerate(gm.graph.nodes):
        order[n.name] = i
        users[n.name] = [u.name for u in n.users]
        ins = [a for a in n.all_input_nodes if a.name in shapes]
        if n.op == "call_module" and n.target in segments:  # a producer of a concatenation's groups at offsets
            fam[n.name], parts[n.name] = (None, 1), _segment_parts(segments[n.target])
        elif (n.op == "call_module" and is_conv(gm.get_submodule(n.target)) and not is_depthwise(gm.get_submodule(n.target))
              and n.target not in dw_fam):
            fam[n.name] = out_fam.get(n.target, (None, 1))
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear):
            fam[n.name] = out_fam.get(n.target, (None, 1))
            if len(shapes.get(n.name, ())) > 2:  # over the last dim: channels last
                last.add(n.name)
        elif n.op == "call_module" and is_conv(gm.get_submodule(n.target)):  # depthwise, or grouped in whole groups
            src = ins[0] if ins else None
            if src is not None and src.name in parts:  # per channel: the concatenation passes through
                fam[n.name], parts[n.name] = (None, 1), parts[src.name]
            else:  # its channels are its input's: fixed where those are
                fixed = src is not None and fam.get(src.name, (None, 1))[0] is None
                fam[n.name] = (None, 1) if fixed else dw_fam.get(n.target, (None, 1))
        elif _cat_inputs(n, shapes) is not None:
            fam[n.name] = (None, 1)
            traced = TracedGraph(gm, shapes, fam, {}, users, order, parts)
            parts[n.name] = tuple(p for a in _cat_inputs(n, shapes) for p in traced.pieces(a.name))
        elif ins and n.name in shapes and ins[0].name in parts:  # after a concatenation: element-wise keeps it
            si, so = shapes[ins[0].name], shapes[n.name]
            fam[n.name] = (None, 1)
            if len(so) == len(si) and so[1:2] == si[1:2]:
                parts[n.name] = parts[ins[0].name]
        elif ins and n.name in shapes and (ins[0].name in last or _permuted(n, shapes) is not None):
            src = ins[0]  # channels last, or a permute moving the channels: followed to the last dim and back
            f, r = fam.get(src.name, (None, 1))
            si, so = shapes[src.name], shapes[n.name]
            ax = len(si) - 1 if src.name in last else 1
            perm = _permuted(n, shapes)
            to = perm.index(ax) if perm is not None and ax in perm else ax if so == si else None
            fam[n.name] = (f, r) if f is not None and to in (1, len(so) - 1) else (None, 1)
            if f is not None and to == len(so) - 1 != 1:
                last.add(n.name)
        elif ins and n.name in shapes:
            src = ins[0]
            f, r = fam.get(src.name, (None, 1))
            si, so = shapes[src.name], shapes[n.name]
            if f is not None and len(si) >= 3 and len(so) == 2 and so[1] == si[1] * math.prod(si[2:]):
                # flatten: a channel becomes H*W features (a mean over H, W keeps one per channel)
                r = r * math.prod(si[2:])
            elif f is not None and (len(so) < 2 or (len(si) >= 2 and si[1] * 1 != so[1] and len(so) == len(si))):
                f, r = None, 1
            fam[n.name] = (f, r)
        else:
            fam[n.name] = (None, 1)
    return TracedGraph(gm, shapes, fam, {s.id: s.size for s in specs}, users, order, parts, last)


def _permuted(n: fx.Node, shapes: Mapping[str, tuple[int, ...]]) -> list[int] | None:
    """The dims of a ``permute`` node (output dim i is input dim ``perm[i]``), else None."""
    if n.target not in (torch.permute, "permute") or not n.args or not isinstance(n.args[0], fx.Node):
        return None
    rest = list(n.args[1:])
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    nd = len(shapes.get(n.args[0].name, ()))
    return [d % nd for d in dims] if nd and len(dims) == nd and all(isinstance(d, int) for d in dims) else None


def _segment_parts(segs: list[tuple[int, int, str, int, int]]) -> tuple[tuple[str | None, int], ...]:
    """(offset, total, space, repeat, size) segments of a dim as pieces in order, the gaps as fixed widths."""
    out: list[tuple[str | None, int]] = []
    at, total = 0, segs[0][1]
    for offset, _, space, repeat, size in sorted(segs):
        if offset > at:
            out.append((None, offset - at))
        out.append((space, repeat))
        at = offset + size * repeat
    if total > at:
        out.append((None, total - at))
    return tuple(out)


def _cat_inputs(n: fx.Node, shapes: Mapping[str, tuple[int, ...]]) -> list[fx.Node] | None:
    """The inputs of ``n`` when it is a ``torch.cat`` along dim 1 of traced tensors, else None."""
    if n.op != "call_function" or n.target not in (torch.cat, torch.concat) or n.name not in shapes:
        return None
    xs = n.args[0] if n.args else n.kwargs.get("tensors")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out = shapes[n.name]
    if (not isinstance(xs, (list, tuple)) or not all(isinstance(a, fx.Node) and a.name in shapes for a in xs)
            or not isinstance(dim, int) or len(out) < 2 or dim % len(out) != 1):
        return None
    return list(xs)


def split_units(g: TracedGraph) -> list[Unit]:
    """The graph's units in execution order, each node in one unit."""
    gm = g.gm
    nodes = list(gm.graph.nodes)
    byname = {n.name: n for n in nodes}
    units: list[Unit] = []
    taken: set[str] = set()
    for n in nodes:
        if n.op in ("placeholder", "output", "get_attr") or n.name in taken or n.name not in g.shapes:
            continue
        members = [n]
        kind = OTHER
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if is_depthwise(mod):
                kind = DEPTHWISE
            elif is_conv(mod) or isinstance(mod, nn.Linear):
                kind = DENSE
        if kind != OTHER:  # absorb what ONNX Runtime fuses into the kernel
            tail, added = n, False
            while len(g.users[tail.name]) == 1:
                u = byname[g.users[tail.name][0]]
                if u.name in taken or u.name not in g.shapes:
                    break
                first = next(iter(u.all_input_nodes), None)
                if is_bn_node(gm, u) or (_is_act(gm, u) and first is tail):
                    pass
                elif is_add_node(u) and kind == DENSE and not added and is_conv(gm.get_submodule(n.target)):
                    added = True
                else:
                    break
                members.append(u)
                tail = u
        for m in members:
            taken.add(m.name)
        # non-tensor helpers used only by this unit (size queries) come along
        axes: list[str] = []
        ext = _external_inputs(members, g)
        cat_axes: list[str] = []
        for a in [*ext, members[-1]]:
            if a.name in g.parts:
                cat_axes += [f for f in g.spaces(a.name) if f not in cat_axes]
                continue
            f = g.fam.get(a.name, (None, 1))[0]
            if f is not None and f not in axes:
                axes.append(f)
        for m in members:
            if m.op == "call_module":
                mod = gm.get_submodule(m.target)
                if (is_conv(mod) or isinstance(mod, nn.Linear)) and m is members[0]:
                    f = g.fam.get(m.name, (None, 1))[0]
                    if f is not None and f not in axes:
                        axes.append(f)
        # the spaces of a concatenation it reads or writes, the widest first, up to MAX_AXES in all (each axis
        # multiplies the timed grid by its points); the others are timed at their full width
        cat_axes = sorted((f for f in cat_axes if f not in axes), key=lambda f: -g.sizes[f])
        axes += cat_axes[:max(0, MAX_AXES - len(axes))]
        units.append(Unit(n.target if n.op == "call_module" else n.name, kind, tuple(m.name for m in members),
                          tuple(axes), _signature(members, g)))
    return units


def _external_inputs(members: list[fx.Node], g: TracedGraph) -> list[fx.Node]:
    names = {m.name for m in members}
    out: list[fx.Node] = []
    for m in members:
        for a in m.all_input_nodes:
            if a.name not in names and a not in out and a.op != "get_attr":
                out.append(a)
    return out


def _describe_module(mod: nn.Module) -> str:
    if is_conv(mod):
        return (f"{type(mod).__name__}(k={tuple(mod.kernel_size)},s={tuple(mod.stride)},p={mod.padding},"
                f"d={tuple(mod.dilation)},dw={is_depthwise(mod)},g={1 if is_depthwise(mod) else mod.groups},"
                f"b={mod.bias is not None},pm={mod.padding_mode})")
    if isinstance(mod, nn.Linear):
        return f"Linear(b={mod.bias is not None})"
    if isinstance(mod, BN):
        return type(mod).__name__
    return repr(mod).replace("\n", "")


def _signature(members: list[fx.Node], g: TracedGraph) -> str:
    """What the unit computes, without names: ops, module configs and the fixed parts of its shapes."""
    parts = []
    for m in members:
        if m.op == "call_module":
            parts.append(_describe_module(g.gm.get_submodule(m.target)))
        else:
            parts.append(f"{m.op}:{getattr(m.target, '__name__', str(m.target))}")
    for a in [*_external_inputs(members, g), members[-1]]:
        s = g.shapes.get(a.name)
        f, r = g.fam.get(a.name, (None, 1))
        if s is not None:
            dims = list(s[1:])
            if f is not None and dims:
                dims[-1 if a.name in g.last else 0] = f"{g.sizes[f]}*{r}c"  # scaled: full size, features per channel
            elif a.name in g.parts and dims:  # a concatenation: its pieces in order
                dims[0] = "+".join(f"{g.sizes[p]}*{q}c" if p is not None else str(q) for p, q in g.parts[a.name])
            parts.append("x".join(str(d) for d in dims))
    return ";".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Building a unit alone at given widths


def _resized(mod: nn.Module, cin: int | None, cout: int | None) -> nn.Module:
    if is_conv(mod):
        dw = is_depthwise(mod)
        cin = cin or mod.in_channels
        cout = cin if dw else (cout or mod.out_channels)
        groups = cin if dw else mod.groups
        if not dw and mod.groups > 1 and mod.in_channels == mod.out_channels:  # grouped: whole groups go
            groups = max(1, cin // (mod.in_channels // mod.groups))
            cout = cin
        return type(mod)(cin, cout, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                         mod.bias is not None, mod.padding_mode)
    if isinstance(mod, nn.Linear):
        return nn.Linear(cin or mod.in_features, cout or mod.out_features, mod.bias is not None)
    if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:  # over the channels, channels last
        return nn.LayerNorm(cin or mod.normalized_shape[0], mod.eps, mod.elementwise_affine)
    if isinstance(mod, BN):
        c = cin or mod.num_features
        bn = type(mod)(c, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        with torch.no_grad():
            if bn.running_var is not None:
                bn.running_var.uniform_(0.5, 1.5)
                bn.running_mean.normal_(0, 0.1)
        return bn
    return copy.deepcopy(mod)


def scaled_shape(g: TracedGraph, name: str, widths: Mapping[str, int]) -> tuple[int, ...]:
    """Node ``name``'s output shape at ``widths``, batch 1."""
    s = list(g.shapes[name])
    f, r = g.fam.get(name, (None, 1))
    if f is not None and len(s) >= 2:
        s[-1 if name in g.last else 1] = widths[f] * r
    elif name in g.parts and len(s) >= 2:
        s[1] = sum(widths[p] * q if p is not None else q for p, q in g.parts[name])
    s[0] = 1
    return tuple(s)


def build_unit(g: TracedGraph, unit: Unit, widths: Mapping[str, int]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """``unit`` alone at ``widths`` and its input; a second operand becomes a constant, size queries are
    recomputed."""
    byname = {n.name: n for n in g.gm.graph.nodes}
    members = [byname[n] for n in unit.nodes]
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    root: dict[str, Any] = {}
    inputs: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(0)
    names = set(unit.nodes)

    def bring(a: fx.Node) -> None:
        if a.name in env or a.name in names:
            return
        if a.op == "get_attr":
            root[a.target] = _attr(g.gm, a.target)
            env[a.name] = graph.get_attr(a.target)
        elif a.name in g.shapes and not inputs:
            env[a.name] = graph.placeholder("in0")
            inputs.append(torch.rand(scaled_shape(g, a.name, widths), generator=gen))
        elif a.name in g.shapes:  # a second operand (a residual add): a constant of the same shape
            key = f"_const{len(root)}"
            root[key] = torch.rand(scaled_shape(g, a.name, widths), generator=gen)
            env[a.name] = graph.get_attr(key)
        elif a.op in ("call_function", "call_method"):  # a size query or similar helper: recompute it here
            for b in a.all_input_nodes:
                bring(b)
            env[a.name] = graph.node_copy(a, lambda b: env[b.name])
        else:
            raise BadInput(f"cost model: layer {unit.name} depends on '{a.name}', which is not a tensor")

    for m in members:
        for a in m.all_input_nodes:
            bring(a)
        if m.op == "call_module":
            mod = g.gm.get_submodule(m.target)
            src = next(iter(m.all_input_nodes))
            ch = -1 if isinstance(mod, (nn.Linear, nn.LayerNorm)) else 1  # a Linear and a LayerNorm: the last dim
            cin = scaled_shape(g, src.name, widths)[ch] if len(g.shapes.get(src.name, ())) >= 2 else None
            cout = scaled_shape(g, m.name, widths)[ch] if len(g.shapes.get(m.name, ())) >= 2 else None
            root[m.target] = _resized(mod, cin, cout).eval()
        env[m.name] = graph.node_copy(m, lambda a: env[a.name])
    graph.output(env[members[-1].name])
    return fx.GraphModule(root, graph), inputs


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["DENSE", "DEPTHWISE", "OTHER", "TracedGraph", "Unit", "build_unit", "scaled_shape", "split_units",
           "trace_graph"]
