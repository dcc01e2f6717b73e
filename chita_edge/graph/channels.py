"""Channel groups: which Conv/Linear/BatchNorm slices form one prunable channel (``channel_groups``).

A ``torch.fx`` trace of the model (``chita_edge.graph.trace``) is walked once; every tensor carries the "channel
space" of its dim 1. Conv/Linear outputs open a new space, per-channel ops (BatchNorm, activations, pooling,
dropout, depthwise convs, flatten) pass it on, residual adds and multiplies join the spaces of their operands, and
the next Conv/Linear consumes it. A space that reaches anything else (the model output, the input, ``cat``,
softmax, an op we do not know, a per-channel constant) is *blocked*: its channels are not prunable. Each
unblocked space is one ``ChannelGroupSpec`` of ``Member`` slices; ``channel_weight_indices`` gives the flat
weight indices of one channel. ``channel_report`` also returns every blocked space that has a producer, as a
``BlockedGroup`` naming the module and op that blocked it first (``blocked_summary`` puts them on one line).
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from chita_edge.core.errors import BadInput
from chita_edge.graph.trace import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    BN,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    QUERY_METHODS,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    RESHAPE_MODULES,
    is_conv,
    trace_shapes,
)

__all__ = ["BlockedGroup", "ChannelGroupSpec", "Member", "blocked_summary", "channel_groups", "channel_report",
           "channel_weight_indices", "traced_channel_groups"]

# --------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Member:
    """One coupled slice: channel ``c`` of a group is ``weight.narrow(dim, c * repeat, repeat)`` of ``module``.

    kind:
      ``"out"`` output channel of a Conv/Linear: weight dim 0 and ``bias[c]`` (a producer);
      ``"in"``  input channel of a Conv/Linear: weight dim 1 (a consumer); after a flatten, each channel
                covers ``repeat = H * W`` consecutive input features of the Linear;
      ``"dw"``  depthwise conv (``groups == in_channels == out_channels``): weight dim 0 and ``bias[c]``; the
                channel passes through it (its input ``c`` and output ``c`` are the same channel);
      ``"bn"``  BatchNorm ``weight``, ``bias``, ``running_mean``, ``running_var`` entries.
    shape: the shape of ``module.weight`` (of ``running_mean`` for a BatchNorm without affine).
    """

    module: str
    kind: str
    repeat: int = 1
    shape: tuple[int, ...] = ()

    @property
    def dim(self) -> int:
        return 1 if self.kind == "in" else 0

    @property
    def param(self) -> str:
        """State-dict name of the weight this member slices (as ``PrunableParam.name``)."""
        return f"{self.module}.weight" if self.module else "weight"

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "kind": self.kind, "repeat": self.repeat}


@dataclass(frozen=True)
class ChannelGroupSpec:
    """``size`` channels that must be removed together: channel ``c`` is slice ``c`` of every member.

    Worked example, ``zoo.ResNet20`` (16/32/64 channels per stage, 12 groups)::

        id "layer1.0.conv1", size 16: the free channels of a block's first conv
            layer1.0.conv1 out  (weight[c], 16x16x3x3 -> a 1x16x3x3 slice)
            layer1.0.bn1   bn
            layer1.0.conv2 in   (weight[:, c], a 16x1x3x3 slice)
        id "conv1", size 16: stage 1's residual stream; every branch feeding an add shares channel c
            conv1 out, bn1 bn,
            layer1.{0,1,2}.conv1 in, layer1.{0,1,2}.conv2 out, layer1.{0,1,2}.bn2 bn,
            layer2.0.conv1 in, layer2.0.downsample.0 in
        id "layer2.0.conv2", size 32: stage 2's stream, with layer2.0.downsample.0 out / .1 bn as producers
        id "layer3.0.conv2", size 64: stage 3's stream, consumed by fc in (fc's outputs are never prunable)

    plus "layer{1,2,3}.{0,1,2}.conv1" for the other blocks. Removing channel 5 of "conv1" removes
    ``conv1.weight[5]``, ``bn1.*[5]``, ``layer1.0.conv2.weight[5]``, ..., ``layer2.0.downsample.0.weight[:, 5]``.
    The id is the name of the group's first producer in execution order, stable across fresh models.
    """

    id: str
    size: int
    members: tuple[Member, ...]

    @property
    def producers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "out")

    @property
    def consumers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.kind == "in")

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "members": [m.to_json() for m in self.members]}


@dataclass(frozen=True)
class BlockedGroup:
    """A channel space with producers that cannot be pruned: ``size`` output channels of ``producers`` (``id`` is
    the first), blocked first by ``op`` in ``module`` (a module path, ``""`` for the model itself) because
    ``why``."""

    id: str
    size: int
    producers: tuple[str, ...]
    module: str
    op: str
    why: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "producers": list(self.producers)}


def blocked_summary(blocked: list[BlockedGroup] | tuple[BlockedGroup, ...], examples: int = 2) -> str:
    """One line: how many channel spaces are blocked, by which op and why, with the first ``examples`` of each
    as ``at MODULE: GROUP's N channels`` (the module holding the op; the group's first producer)."""
    if not blocked:
        return "no channel space has a producer"
    by: dict[tuple[str, str], list[BlockedGroup]] = {}
    for b in blocked:
        by.setdefault((b.op, b.why), []).append(b)
    parts = []
    for (op, why), bs in by.items():
        ex = ", ".join(f"at {b.module or 'the model'}: {b.id}'s {b.size} channels" for b in bs[:examples])
        parts.append(f"{len(bs)} by {op}, {why} ({ex}{', ...' if len(bs) > examples else ''})")
    return f"{len(blocked)} channel space(s) blocked: " + "; ".join(parts)


def channel_weight_indices(
    group: ChannelGroupSpec, channel: int, kinds: tuple[str, ...] = ("out", "in", "dw")
) -> dict[str, torch.Tensor]:
    """Flat indices (into ``weight.reshape(-1)``) of every weight of ``channel``, per weight name.

    A structured solver treats channel ``c`` as one group of weights: the producers' output slices, the
    depthwise slices and the consumers' input slices. Keys are state-dict weight names (``"conv1.weight"``,
    as ``PrunableParam.name``), values sorted int64 tensors. BatchNorm entries are left out unless ``"bn"``
    is in ``kinds``.
    """
    if not 0 <= channel < group.size:
        raise BadInput(f"channel {channel}: group '{group.id}' has channels 0..{group.size - 1}")
    out: dict[str, torch.Tensor] = {}
    for m in group.members:
        if m.kind not in kinds:
            continue
        idx = _slice_indices(m.shape, m.dim, channel * m.repeat, m.repeat)
        prev = out.get(m.param)
        out[m.param] = idx if prev is None else torch.unique(torch.cat([prev, idx]))
    return out


def _slice_indices(shape: tuple[int, ...], dim: int, start: int, length: int) -> torch.Tensor:
    """Flat row-major indices of ``t.narrow(dim, start, length)`` for a tensor ``t`` of ``shape``."""
    outer = math.prod(shape[:dim])
    mid = shape[dim]
    inner = math.prod(shape[dim + 1:])
    o = torch.arange(outer).view(-1, 1, 1) * (mid * inner)
    j = (start + torch.arange(length)).view(1, -1, 1) * inner
    k = torch.arange(inner).view(1, 1, -1)
    return (o + j + k).reshape(-1)


# --------------------------------------------------------------------------------------------------------------
# The channel-space walk


class _Spaces:
    """Union-find over channel spaces; a root carries its size, blocked flag and members."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: list[bool] = []
        self.members: list[list[tuple[int, Member]]] = []
        self.reason: list[tuple[str, str, str] | None] = []  # (module, op, why) that blocked the root first

    def new(self, size: int, blocked: bool = False, reason: tuple[str, str, str] | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.blocked.append(blocked)
        self.members.append([])
        self.reason.append(reason if blocked else None)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def block(self, s: int, reason: tuple[str, str, str]) -> None:
        r = self.find(s)
        if not self.blocked[r]:
            self.blocked[r], self.reason[r] = True, reason

    def union(self, a: int, b: int, reason: tuple[str, str, str]) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:  # cannot be one channel set: neither is prunable
            why = (reason[0], reason[1], f"joins channel spaces of {self.size[ra]} and {self.size[rb]} channels")
            self.block(ra, why)
            self.block(rb, why)
            return ra
        self.parent[rb] = ra
        if not self.blocked[ra] and self.blocked[rb]:
            self.reason[ra] = self.reason[rb]
        self.blocked[ra] = self.blocked[ra] or self.blocked[rb]
        self.members[ra] += self.members[rb]
        self.members[rb] = []
        return ra

    def add(self, s: int, order: int, member: Member) -> None:
        self.members[self.find(s)].append((order, member))


# State of a tensor node: (space, factor) -- feature i of dim 1 is channel i // factor of the space.
_State = tuple[int, int]


class _Walker:
    """One pass over the fx graph assigning channel spaces; see the module docstring for the rules."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]):
        self.gm = gm
        self.shapes = shapes
        self.sp = _Spaces()
        self.state: dict[fx.Node, _State] = {}
        self.dynamic: dict[fx.Node, bool] = {}  # depends on a model input
        self.module_space: dict[tuple[str, str], tuple[int, int]] = {}  # (module, kind) -> (space, repeat)

    # -- why a space is blocked: (module path, op, reason)
    def _why(self, node: fx.Node, why: str | None = None) -> tuple[str, str, str]:
        unknown = "an op the channel walker does not know (chita_edge/graph/trace.py)"
        if node.op == "call_module":
            return str(node.target), type(self.gm.get_submodule(node.target)).__name__, why or unknown
        if node.op in ("output", "placeholder"):
            return "", node.op, why or f"{'reaches the model output' if node.op == 'output' else 'is the model input'}"
        stack = [v for v in (node.meta.get("nn_module_stack") or {}).values() if isinstance(v, tuple) and len(v) == 2]
        module, owner = (str(stack[-1][0]), getattr(stack[-1][1], "__name__", str(stack[-1][1]))) if stack else (
            "", type(self.gm).__name__)
        if node.op == "get_attr":
            return module, f"constant {node.target}", why or "a constant tensor"
        fn = f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        return module, f"{fn} in {owner}.forward", why or unknown

    # -- helpers
    def _fresh_blocked(self, node: fx.Node, why: str | None = None) -> None:
        shape = self.shapes.get(node)
        if shape is not None:
            self.state[node] = (self.sp.new(shape[1] if len(shape) >= 2 else 0, blocked=True,
                                            reason=self._why(node, why)), 1)

    def _block_inputs(self, node: fx.Node, why: str | None = None) -> None:
        for a in node.all_input_nodes:
            st = self.state.get(a)
            if st is not None:
                self.sp.block(st[0], self._why(node, why))

    def _unknown(self, node: fx.Node, why: str | None = None) -> None:
        self._block_inputs(node, why)
        self._fresh_blocked(node, why)

    def _pass(self, node: fx.Node, src: fx.Node, factor_one: bool = False) -> None:
        st = self.state.get(src)
        if st is None or node not in self.shapes:
            self._unknown(node)
        elif factor_one and st[1] != 1:
            self._unknown(node, "a pooling op after a flatten")
        else:
            self.state[node] = st
            for a in node.all_input_nodes:  # other tensor inputs (rare) must not carry channels
                if a is not src and a in self.state:
                    self.sp.block(self.state[a][0], self._why(node, "a second tensor input of a per-channel op"))

    def _member(self, space: int, order: int, module: str, kind: str, repeat: int, shape: tuple[int, ...]) -> int:
        """Add a member, joining the space this (module, kind) already has from another call site."""
        key = (module, kind)
        prev = self.module_space.get(key)
        why = (module, kind, "the module is called at two places with different flatten factors")
        if prev is not None:
            if prev[1] != repeat:
                self.sp.block(prev[0], why)
                self.sp.block(space, why)
                return self.sp.find(space)
            space = self.sp.union(prev[0], space, why)
        else:
            self.module_space[key] = (space, repeat)
        self.sp.add(space, order, Member(module, kind, repeat, shape))
        return self.sp.find(space)

    # -- ops
    def _conv(self, node: fx.Node, order: int, name: str, m: nn.Module) -> None:
        x = node.args[0]
        st = self.state.get(x) if isinstance(x, fx.Node) else None
        ok_in = st is not None and st[1] == 1 and self.sp.size[self.sp.find(st[0])] == m.in_channels
        shape = tuple(m.weight.shape)
        if m.groups == 1:
            if ok_in:
                self._member(st[0], order, name, "in", 1, shape)
            else:
                self._block_inputs(node, "its input's channels do not map onto the conv's in_channels")
            prev = self.module_space.get((name, "out"))
            space = prev[0] if prev is not None else self.sp.new(m.out_channels)
            self.state[node] = (self._member(space, order, name, "out", 1, shape), 1)
        elif m.groups == m.in_channels == m.out_channels and ok_in:
            self.state[node] = (self._member(st[0], order, name, "dw", 1, shape), 1)
        else:  # grouped conv or depth multiplier: its channels are tied in ways we do not model
            self._unknown(node, f"a grouped conv (groups={m.groups}, {m.in_channels} -> {m.out_channels} channels)")

    def _linear(self, node: fx.Node, order: int, name: str, m: nn.Linear) -> None:
        x = node.args[0]
        st = self.state.get(x) if isinstance(x, fx.Node) else None
        in_shape = self.shapes.get(x) if isinstance(x, fx.Node) else None
        shape = tuple(m.weight.shape)
        if (st is not None and in_shape is not None and len(in_shape) == 2
                and self.sp.size[self.sp.find(st[0])] * st[1] == m.in_features):
            self._member(st[0], order, name, "in", st[1], shape)
        else:
            self._block_inputs(node, "its input does not map onto the Linear's in_features")
        out_shape = self.shapes.get(node)
        if out_shape is not None and len(out_shape) == 2:
            prev = self.module_space.get((name, "out"))
            space = prev[0] if prev is not None else self.sp.new(m.out_features)
            self.state[node] = (self._member(space, order, name, "out", 1, shape), 1)
        else:
            self._fresh_blocked(node, "a Linear applied to more than 2 dims")

    def _bn(self, node: fx.Node, order: int, name: str, m: nn.Module) -> None:
        x = node.args[0]
        st = self.state.get(x) if isinstance(x, fx.Node) else None
        if st is None or self.sp.size[self.sp.find(st[0])] * st[1] != m.num_features:
            self._unknown(node, "its num_features do not match the input's channels")
            return
        ref = m.weight if m.weight is not None else m.running_mean
        shape = tuple(ref.shape) if ref is not None else (m.num_features,)
        self.state[node] = (self._member(st[0], order, name, "bn", st[1], shape), st[1])

    def _reshape(self, node: fx.Node) -> None:
        x = node.args[0]
        if not isinstance(x, fx.Node) or x not in self.state or node not in self.shapes:
            self._unknown(node)
            return
        space, f = self.state[x]
        si, so = self.shapes[x], self.shapes[node]
        if len(si) >= 2 and len(so) >= 2 and si[:2] == so[:2]:
            self.state[node] = (space, f)  # dim 1 untouched (row-major)
        elif len(si) >= 2 and len(so) == 2 and so[0] == si[0] and so[1] == math.prod(si[1:]):
            self.state[node] = (space, f * math.prod(si[2:]))  # flatten: channel c -> H*W features
        else:
            self._unknown(node, f"a reshape {si} -> {so} that moves the channel dim (e.g. a channel shuffle)")

    def _reduce(self, node: fx.Node) -> None:
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(x, fx.Node) or x not in self.shapes or dims is None:
            self._unknown(node)
            return
        nd = len(self.shapes[x])
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
        if dims is None or not all(isinstance(d, int) for d in dims) or any(d % nd in (0, 1) for d in dims):
            self._unknown(node, "a reduction over the batch or channel dim")
            return
        self._pass(node, x, factor_one=True)

    def _binary(self, node: fx.Node) -> None:
        out = self.shapes.get(node)
        operands = [a for a in node.all_input_nodes if a in self.shapes]
        if out is None or len(out) < 2:
            self._unknown(node)
            return
        joined: list[_State] = []
        why = None
        for a in operands:
            sa = self.shapes[a]
            pos = 1 - (len(out) - len(sa))
            if pos >= 0 and sa[pos] == out[1]:  # covers the channel dim
                if self.dynamic.get(a, False) and a in self.state:
                    joined.append(self.state[a])
                else:
                    why = why or "a per-channel constant operand"  # would need slicing
            elif self.dynamic.get(a, False):  # a removed channel's value would move
                why = why or "an input-dependent operand broadcast over the channels"
        if why is None and len({f for _, f in joined}) > 1:
            why = "operands flattened with different factors"
        if why is not None or not joined:
            self._unknown(node, why)
            return
        space = joined[0][0]
        for s, _ in joined[1:]:
            space = self.sp.union(space, s, self._why(node))
        self.state[node] = (self.sp.find(space), joined[0][1])

    def run(self) -> list[ChannelGroupSpec]:
        for order, node in enumerate(self.gm.graph.nodes):
            self.dynamic[node] = node.op == "placeholder" or any(self.dynamic.get(a, False) for a in node.all_input_nodes)
            op, tgt = node.op, node.target
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if op in ("placeholder", "get_attr"):
                self._fresh_blocked(node)
            elif op == "output":
                self._block_inputs(node)
            elif op == "call_module":
                m = self.gm.get_submodule(tgt)
                if is_conv(m):
                    self._conv(node, order, tgt, m)
                elif isinstance(m, nn.Linear):
                    self._linear(node, order, tgt, m)
                elif isinstance(m, BN):
                    self._bn(node, order, tgt, m)
                elif isinstance(m, ELEMENTWISE_MODULES) and first is not None:
                    self._pass(node, first)
                elif isinstance(m, POOL_MODULES) and first is not None:
                    self._pass(node, first, factor_one=True)
                elif isinstance(m, RESHAPE_MODULES):
                    self._reshape(node)
                else:
                    self._unknown(node)
            elif op in ("call_function", "call_method"):
                fn = op == "call_function"
                if (not fn and tgt in QUERY_METHODS) or (fn and tgt in (builtins.getattr, builtins.len)
                                                         and node not in self.shapes):
                    continue  # shape queries do not use the values
                if fn and tgt is operator.getitem and node not in self.shapes:
                    continue  # indexing a size tuple
                if (fn and tgt in BINARY_FUNCTIONS) or (not fn and tgt in BINARY_METHODS):
                    self._binary(node)
                elif ((fn and tgt in ELEMENTWISE_FUNCTIONS) or (not fn and tgt in ELEMENTWISE_METHODS)) and first is not None:
                    self._pass(node, first)
                elif fn and tgt in POOL_FUNCTIONS and first is not None:
                    self._pass(node, first, factor_one=True)
                elif (fn and tgt in RESHAPE_FUNCTIONS) or (not fn and tgt in RESHAPE_METHODS):
                    self._reshape(node)
                elif (fn and tgt in REDUCE_FUNCTIONS) or (not fn and tgt in REDUCE_METHODS):
                    self._reduce(node)
                elif fn and tgt in (torch.cat, torch.concat, torch.stack):
                    self._unknown(node, "a concatenation: the walker does not split channels across its inputs")
                else:
                    self._unknown(node)
            else:
                self._unknown(node)
        return self._groups()

    def _groups(self) -> list[ChannelGroupSpec]:
        groups: list[tuple[int, ChannelGroupSpec]] = []
        for s in range(len(self.sp.parent)):
            if self.sp.find(s) != s or self.sp.blocked[s] or not self.sp.members[s]:
                continue
            seen: set[tuple[str, str]] = set()
            members: list[Member] = []
            for _, m in sorted(self.sp.members[s], key=lambda om: om[0]):
                if (m.module, m.kind) not in seen:
                    seen.add((m.module, m.kind))
                    members.append(m)
            producers = [(o, m) for o, m in sorted(self.sp.members[s], key=lambda om: om[0]) if m.kind == "out"]
            if not producers:
                continue
            groups.append((producers[0][0], ChannelGroupSpec(producers[0][1].module, self.sp.size[s], tuple(members))))
        return [g for _, g in sorted(groups, key=lambda og: og[0])]

    def blocked(self) -> list[BlockedGroup]:
        """Every blocked space that has a producer, with what blocked it, in execution order."""
        out: list[tuple[int, BlockedGroup]] = []
        for s in range(len(self.sp.parent)):
            if self.sp.find(s) != s or not self.sp.blocked[s]:
                continue
            producers = sorted((o, m.module) for o, m in self.sp.members[s] if m.kind == "out")
            if not producers:
                continue
            names = tuple(dict.fromkeys(name for _, name in producers))
            module, op, why = self.sp.reason[s] or ("", "?", "blocked")
            out.append((producers[0][0], BlockedGroup(names[0], self.sp.size[s], names, module, op, why)))
        return [b for _, b in sorted(out, key=lambda ob: ob[0])]


def channel_report(model: nn.Module, example_input: Any) -> tuple[list[ChannelGroupSpec], list[BlockedGroup]]:
    """``channel_groups`` and, for every channel space that cannot be pruned but has producers, what blocks it."""
    gm, shapes = trace_shapes(model, example_input)
    walker = _Walker(gm, shapes)
    return walker.run(), walker.blocked()


def traced_channel_groups(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, list[ChannelGroupSpec]]:
    """The traced graph (``trace_shapes``) and ``channel_groups`` found on it."""
    gm, shapes = trace_shapes(model, example_input)
    return gm, _Walker(gm, shapes).run()


def channel_groups(model: nn.Module, example_input: Any) -> list[ChannelGroupSpec]:
    """Every prunable channel group of ``model``, in execution order of their first producer.

    ``example_input`` (a tensor, or a tuple of tensors for several inputs) is run once in eval mode to learn
    shapes (e.g. how many features each channel becomes after a flatten). Raises ``BadInput`` when the model
    cannot be traced with ``torch.fx``.
    """
    return traced_channel_groups(model, example_input)[1]
