"""Channel groups: which Conv/Linear/BatchNorm slices form one prunable channel (``channel_groups``).

A ``torch.fx`` trace of the model (``chita_edge.graph.trace``) is walked once; every tensor carries the "channel
space" of its dim 1. Conv/Linear outputs open a new space, per-channel ops (BatchNorm, activations, pooling,
dropout, depthwise convs, flatten, eval-mode identities such as ``StochasticDepth``) pass it on, residual adds and
multiplies join the spaces of their operands, and the next Conv/Linear consumes it. A ``torch.cat`` along the
channels makes dim 1 a sequence of spaces: every per-channel op and consumer after it gets one member per space,
at that space's offset (``Member.offset`` / ``total``), and a constant slice ``x[:, a:b]`` keeps the spaces it
covers whole. A space that reaches anything else (the model output, the input, a channel shuffle or permute,
a grouped conv, softmax, an op we do not know, a per-channel constant) is *blocked*: its channels are not
prunable. Each unblocked space is one ``ChannelGroupSpec`` of ``Member`` slices (``chita_edge.graph.members``);
``channel_weight_indices`` gives the flat weight indices of one channel. ``channel_report`` also returns every blocked space that has a producer, as a
``BlockedGroup`` naming the module and op that blocked it first (``blocked_summary`` puts them on one line).
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from chita_edge.graph.members import (  # re-exported: the public names of channel groups
    BlockedGroup,
    ChannelGroupSpec,
    Member,
    Spaces,
    blocked_summary,
    channel_weight_indices,
)
from chita_edge.graph.trace import (
    BINARY_FUNCTIONS,
    BINARY_METHODS,
    BN,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
    IDENTITY_FUNCTION_NAMES,
    POOL_FUNCTIONS,
    POOL_MODULES,
    QUERY_METHODS,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    RESHAPE_MODULES,
    function_name,
    is_conv,
    trace_shapes,
)

__all__ = ["BlockedGroup", "ChannelGroupSpec", "Member", "blocked_summary", "channel_groups", "channel_report",
           "channel_weight_indices", "traced_channel_groups"]

# --------------------------------------------------------------------------------------------------------------
# The channel-space walk


# State of a tensor node: (spaces, factor) -- dim 1 is the concatenation of the spaces' channels (one space unless
# a ``torch.cat`` joined several), and feature i of a space's stretch is its channel i // factor.
_State = tuple[tuple[int, ...], int]


class _Walker:
    """One pass over the fx graph assigning channel spaces; see the module docstring for the rules."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]):
        self.gm = gm
        self.shapes = shapes
        self.sp = Spaces()
        self.state: dict[fx.Node, _State] = {}
        self.dynamic: dict[fx.Node, bool] = {}  # depends on a model input
        # (module, kind, offset) -> (space, repeat)
        self.module_space: dict[tuple[str, str, int], tuple[int, int]] = {}

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
    def _st(self, node: Any) -> _State | None:
        """The state of a node, with the spaces cut since (``Spaces.split``) read as their pieces."""
        st = self.state.get(node) if isinstance(node, fx.Node) else None
        return None if st is None else (self.sp.expand(st[0]), st[1])

    def _split(self, s: int, sizes: list[int]) -> tuple[int, ...]:
        """Cut space ``s`` into pieces of ``sizes`` channels, re-keying the modules' members to the pieces."""
        r = self.sp.find(s)
        pieces = self.sp.split(r, sizes)
        for (module, kind, off), (space, rep) in list(self.module_space.items()):
            if self.sp.find(space) == r:
                del self.module_space[(module, kind, off)]
                start = 0
                for p, n in zip(pieces, sizes, strict=True):
                    self.module_space[(module, kind, off + start * rep)] = (p, rep)
                    start += n
        return tuple(pieces)

    def _size(self, s: int) -> int:
        return self.sp.size[self.sp.find(s)]

    def _width(self, st: _State) -> int:
        """The length of dim 1 a state describes."""
        return sum(self._size(s) for s in st[0]) * st[1]

    def _segments(self, st: _State) -> list[tuple[int, int, int]]:
        """(space, offset along dim 1, total) per stretch of a state; total 0 when it is one space (no cat)."""
        total = self._width(st) if len(st[0]) > 1 else 0
        out, off = [], 0
        for s in st[0]:
            out.append((s, off, total))
            off += self._size(s) * st[1]
        return out

    def _block_state(self, st: _State, reason: tuple[str, str, str]) -> None:
        for s in st[0]:
            self.sp.block(s, reason)

    def _fresh_blocked(self, node: fx.Node, why: str | None = None) -> None:
        shape = self.shapes.get(node)
        if shape is not None:
            self.state[node] = ((self.sp.new(shape[1] if len(shape) >= 2 else 0, blocked=True,
                                             reason=self._why(node, why)),), 1)

    def _block_inputs(self, node: fx.Node, why: str | None = None) -> None:
        for a in node.all_input_nodes:
            st = self._st(a)
            if st is not None:
                self._block_state(st, self._why(node, why))

    def _unknown(self, node: fx.Node, why: str | None = None) -> None:
        self._block_inputs(node, why)
        self._fresh_blocked(node, why)

    def _pass(self, node: fx.Node, src: fx.Node, factor_one: bool = False) -> None:
        st = self._st(src)
        if st is None or node not in self.shapes:
            self._unknown(node)
        elif factor_one and st[1] != 1:
            self._unknown(node, "a pooling op after a flatten")
        else:
            self.state[node] = st
            for a in node.all_input_nodes:  # other tensor inputs (rare) must not carry channels
                if a is not src and a in self.state:
                    self._block_state(self._st(a), self._why(node, "a second tensor input of a per-channel op"))

    def _member(self, space: int, order: int, module: str, kind: str, repeat: int, shape: tuple[int, ...],
                offset: int = 0, total: int = 0) -> int:
        """Add a member, joining the space this (module, kind, offset) already has from another call site."""
        key = (module, kind, offset)
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
        self.sp.add(space, order, Member(module, kind, repeat, shape, offset, total))
        return self.sp.find(space)

    def _new_out(self, order: int, name: str, size: int, shape: tuple[int, ...]) -> _State:
        prev = self.module_space.get((name, "out", 0))
        space = prev[0] if prev is not None and self._size(prev[0]) == size else self.sp.new(size)
        return (self._member(space, order, name, "out", 1, shape),), 1

    # -- ops
    def _conv(self, node: fx.Node, order: int, name: str, m: nn.Module) -> None:
        x = node.args[0]
        st = self._st(x)
        ok_in = st is not None and st[1] == 1 and self._width(st) == m.in_channels
        shape = tuple(m.weight.shape)
        if m.groups == 1:
            if ok_in:
                for s, off, total in self._segments(st):
                    self._member(s, order, name, "in", 1, shape, off, total)
            else:
                self._block_inputs(node, "its input's channels do not map onto the conv's in_channels")
            self.state[node] = self._new_out(order, name, m.out_channels, shape)
        elif m.groups == m.in_channels == m.out_channels and ok_in:
            self.state[node] = (tuple(self._member(s, order, name, "dw", 1, shape, off, total)
                                      for s, off, total in self._segments(st)), 1)
        else:  # grouped conv or depth multiplier: its channels are tied across groups, which we do not model
            self._unknown(node, f"a grouped conv (groups={m.groups}, {m.in_channels} -> {m.out_channels} channels: "
                                f"pruning it would have to remove the same channels from every group)")

    def _linear(self, node: fx.Node, order: int, name: str, m: nn.Linear) -> None:
        x = node.args[0]
        st = self._st(x)
        in_shape = self.shapes.get(x) if isinstance(x, fx.Node) else None
        shape = tuple(m.weight.shape)
        if st is not None and in_shape is not None and len(in_shape) == 2 and self._width(st) == m.in_features:
            for s, off, total in self._segments(st):
                self._member(s, order, name, "in", st[1], shape, off, total)
        else:
            self._block_inputs(node, "its input does not map onto the Linear's in_features")
        out_shape = self.shapes.get(node)
        if out_shape is not None and len(out_shape) == 2:
            self.state[node] = self._new_out(order, name, m.out_features, shape)
        elif out_shape is not None:  # blocked, but reported with the Linear as its producer
            why = self._why(node, "a Linear over the last of more than 2 dims (channels last, e.g. after a permute)")
            space = self.sp.new(m.out_features, blocked=True, reason=why)
            self.state[node] = ((self._member(space, order, name, "out", 1, shape),), 1)

    def _bn(self, node: fx.Node, order: int, name: str, m: nn.Module) -> None:
        x = node.args[0]
        st = self._st(x)
        if st is None or self._width(st) != m.num_features:
            self._unknown(node, "its num_features do not match the input's channels")
            return
        ref = m.weight if m.weight is not None else m.running_mean
        shape = tuple(ref.shape) if ref is not None else (m.num_features,)
        self.state[node] = (tuple(self._member(s, order, name, "bn", st[1], shape, off, total)
                                  for s, off, total in self._segments(st)), st[1])

    def _reshape(self, node: fx.Node) -> None:
        x = node.args[0]
        if not isinstance(x, fx.Node) or x not in self.state or node not in self.shapes:
            self._unknown(node)
            return
        spaces, f = self._st(x)
        si, so = self.shapes[x], self.shapes[node]
        if len(si) >= 2 and len(so) >= 2 and si[:2] == so[:2]:
            self.state[node] = (spaces, f)  # dim 1 untouched (row-major)
        elif len(si) >= 2 and len(so) == 2 and so[0] == si[0] and so[1] == math.prod(si[1:]):
            self.state[node] = (spaces, f * math.prod(si[2:]))  # flatten: channel c -> H*W features
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
                    joined.append(self._st(a))
                else:
                    why = why or "a per-channel constant operand"  # would need slicing
            elif self.dynamic.get(a, False):  # a removed channel's value would move
                why = why or "an input-dependent operand broadcast over the channels"
        if why is None and len({f for _, f in joined}) > 1:
            why = "operands flattened with different factors"
        if why is None and len({len(s) for s, _ in joined}) > 1:  # a cat on one side: cut the one-space operands
            sizes = [self._size(s) for s in max(joined, key=lambda st: len(st[0]))[0]]
            if all(len(s) == len(sizes) or (len(s) == 1 and self._size(s[0]) == sum(sizes)) for s, _ in joined):
                cut = []
                for spaces, f in joined:
                    spaces = self.sp.expand(spaces)  # the same operand twice: cut once
                    cut.append((spaces if len(spaces) == len(sizes) else self._split(spaces[0], sizes), f))
                joined = cut
            else:
                why = "operands concatenated from channel spaces that do not line up"
        if why is None and len(joined[0][0]) > 1 and any(
                [self._size(s) for s in st[0]] != [self._size(s) for s in joined[0][0]] for st in joined):
            why = "operands concatenated from channel spaces that do not line up"
        if why is not None or not joined:
            self._unknown(node, why)
            return
        spaces = list(joined[0][0])
        for other, _ in joined[1:]:  # stretch by stretch
            spaces = [self.sp.union(a, b, self._why(node)) for a, b in zip(spaces, other, strict=True)]
        self.state[node] = (tuple(self.sp.find(s) for s in spaces), joined[0][1])

    def _permute(self, node: fx.Node) -> None:
        """A permute/transpose that keeps dims 0 and 1 in place passes the channels on; any other blocks them."""
        x, rest = node.args[0] if node.args else None, list(node.args[1:])
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        nd = len(self.shapes[x]) if isinstance(x, fx.Node) and x in self.shapes else 0
        if node.target in ("transpose", torch.transpose):
            moved = {d % nd for d in dims if isinstance(d, int)} if nd else {0}
            keeps = len(dims) == 2 and not moved & {0, 1}
        else:
            keeps = nd > 1 and all(isinstance(d, int) for d in dims) and [d % nd for d in dims[:2]] == [0, 1]
        if keeps and isinstance(x, fx.Node):
            self._pass(node, x)
        else:
            self._unknown(node, "a permute that moves the channel dim (e.g. to channels last for a LayerNorm over "
                                "the channels, as in ConvNeXt)")

    def _cat(self, node: fx.Node) -> None:
        """``torch.cat`` along the channels: the output's dim 1 is its inputs' spaces one after the other."""
        xs = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out = self.shapes.get(node)
        if (out is None or not isinstance(xs, (list, tuple)) or not all(isinstance(a, fx.Node) for a in xs)
                or not isinstance(dim, int)):
            self._unknown(node)
            return
        if node.target is torch.stack or len(out) < 2 or dim % len(out) != 1:
            self._unknown(node, f"a {'stack' if node.target is torch.stack else 'concatenation'} along dim {dim}, "
                                f"not the channels")
            return
        sts = [self._st(a) for a in xs]
        if any(st is None or st[1] != 1 for st in sts):
            self._unknown(node, "a concatenation of tensors without channel spaces (or after a flatten)")
            return
        self.state[node] = (tuple(s for st in sts for s in st[0]), 1)

    def _getitem(self, node: fx.Node) -> None:
        """``x[:, a:b]``: a constant slice of the channels keeps the stretches of whole spaces inside it."""
        x, idx = node.args[0], node.args[1] if len(node.args) > 1 else None
        st = self._st(x)
        idx = idx if isinstance(idx, tuple) else (idx,)
        full = slice(None)
        if (st is None or node not in self.shapes or len(idx) < 1 or idx[0] != full
                or any(i != full and i is not Ellipsis for i in idx[2:])):
            self._unknown(node, "an indexing op other than a constant slice of the channels (x[:, a:b])")
            return
        ch = idx[1] if len(idx) > 1 and idx[1] is not Ellipsis else full
        width = self._width(st)
        if not isinstance(ch, slice) or ch.step not in (None, 1) or st[1] != 1 or not all(
                v is None or isinstance(v, int) for v in (ch.start, ch.stop)):
            self._unknown(node, "an index of the channels that is not a constant slice (x[:, a:b])")
            return
        lo, hi, _ = ch.indices(width)
        kept: list[int] = []
        why = self._why(node, f"a channel slice [{lo}:{hi}] that cuts a channel space of a concatenation")
        for s, off, _ in self._segments(st):
            a, b = max(lo, off), min(hi, off + self._size(s))
            if a >= b:
                continue  # not used here
            if (a, b) == (off, off + self._size(s)):
                kept.append(s)
            else:
                self.sp.block(s, why)
                kept.append(self.sp.new(b - a, blocked=True, reason=why))
        self.state[node] = (tuple(kept), 1)

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
                if fn and tgt is operator.getitem:
                    self._getitem(node)
                elif (fn and tgt in BINARY_FUNCTIONS) or (not fn and tgt in BINARY_METHODS):
                    self._binary(node)
                elif ((fn and (tgt in ELEMENTWISE_FUNCTIONS or function_name(tgt) in IDENTITY_FUNCTION_NAMES))
                      or (not fn and tgt in ELEMENTWISE_METHODS)) and first is not None:
                    self._pass(node, first)
                elif fn and tgt in POOL_FUNCTIONS and first is not None:
                    self._pass(node, first, factor_one=True)
                elif (fn and tgt in RESHAPE_FUNCTIONS) or (not fn and tgt in RESHAPE_METHODS):
                    self._reshape(node)
                elif (fn and tgt in REDUCE_FUNCTIONS) or (not fn and tgt in REDUCE_METHODS):
                    self._reduce(node)
                elif fn and tgt in (torch.cat, torch.concat, torch.stack):
                    self._cat(node)
                elif (fn and tgt in (torch.permute, torch.transpose)) or (not fn and tgt in ("permute", "transpose")):
                    self._permute(node)
                elif (fn and tgt in (torch.chunk, torch.split)) or (not fn and tgt in ("chunk", "split")):
                    self._unknown(node, "a split of the channels into parts (e.g. ShuffleNetV2's channel split)")
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
            seen: set[tuple[str, str, int]] = set()
            members: list[Member] = []
            for _, m in sorted(self.sp.members[s], key=lambda om: om[0]):
                if (m.module, m.kind, m.offset) not in seen:
                    seen.add((m.module, m.kind, m.offset))
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
