"""Channel groups: which Conv/Linear/BatchNorm slices form one prunable channel (``channel_groups``).

A ``torch.fx`` trace of the model (``chita_edge.graph.trace``) is walked once; every tensor carries the "channel
space" of its channel dim (dim 1, or the dim a permute moved it to: channels last). Conv/Linear outputs open a new
space, per-channel ops (BatchNorm, activations, pooling, dropout, depthwise convs, flatten, eval-mode identities
such as ``StochasticDepth``) pass it on, residual adds and multiplies join the spaces of their operands (a
per-channel parameter operand, e.g. layer scale, is sliced with them), and the next Conv/Linear consumes it. A
grouped conv with as many outputs as inputs passes its channels on too, a whole group at a time (the space's
unit: each of its channels is then a group of channels, ``groups`` shrinks). A permute moves the channel dim; a
Linear over the last dim consumes (and opens) a space there, as ConvNeXt's MLP does. A ``torch.cat`` along the
channels makes dim 1 a sequence of spaces: every per-channel op and consumer after it gets one member per space,
at that space's offset (``Member.offset`` / ``total``), and a constant slice ``x[:, a:b]`` keeps the spaces it
covers whole. A space that reaches anything else (the model output, the input, a channel shuffle, a LayerNorm over
the channels, a grouped conv with a depth multiplier, softmax, an op we do not know, a per-channel constant that
is not a parameter) is *blocked*: its channels are not prunable. Each unblocked space is one
``ChannelGroupSpec`` of ``Member`` slices (``chita_edge.graph.members``); ``channel_weight_indices`` gives the
flat weight indices of one channel. ``channel_report`` also returns every blocked space that has a producer, as
a ``BlockedGroup`` naming the module and op that blocked it first (``blocked_summary`` puts them on one line).
"""

from __future__ import annotations

import math
import operator
from dataclasses import replace
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
from chita_edge.graph.trace import op_kind, trace_shapes

__all__ = ["BlockedGroup", "ChannelGroupSpec", "Member", "blocked_summary", "channel_groups", "channel_report",
           "channel_weight_indices", "traced_channel_groups"]

# --------------------------------------------------------------------------------------------------------------
# The channel-space walk


# What the walker follows on a tensor whose channels moved off dim 1 (``op_kind``); anything else blocks them
_CHANNELS_LAST = frozenset({"linear", "norm", "elementwise", "binary", "permute", "output"})

_DIVISIONS = frozenset({operator.truediv, operator.itruediv, torch.div, "div", "div_"})  # a zeroed divisor: inf

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
        self.at = 0  # the position of the node being walked (members are sorted by it)
        self.axis: dict[fx.Node, int] = {}  # the dim a node's channels are in, where it is not 1 (after a permute)

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

    def _split(self, s: int, sizes: list[int], node: fx.Node) -> tuple[int, ...]:
        """Cut space ``s`` into pieces of ``sizes`` channels (for ``node``), re-keying the modules' members to the
        pieces."""
        r = self.sp.find(s)
        pieces = self.sp.split(r, sizes, self._why(node, "an operand lined up with a concatenation"))
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
            if src in self.axis:
                self.axis[node] = self.axis[src]
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
        elif m.in_channels == m.out_channels and ok_in and all(
                not (off % width or self._size(s) % width) for s, off, _ in self._segments(st)
                for width in [m.in_channels // m.groups]):
            # depthwise (one channel per group) or grouped: a channel passes through; a grouped conv's input and
            # output channels are coupled within each group, so its channels go a whole group at a time
            width = m.in_channels // m.groups
            why = (name, type(m).__name__, f"a grouped conv (groups={m.groups}) prunes whole groups of {width}")
            spaces = []
            for s, off, total in self._segments(st):
                spaces.append(self._member(s, order, name, "dw", 1, shape, off, total))
                if width > 1:
                    self.sp.set_unit(s, width, why)
            self.state[node] = (tuple(self.sp.find(s) for s in spaces), 1)
        else:  # a depth multiplier, or groups that straddle channel spaces: not modelled
            what = ("its input's channels do not map onto the conv's in_channels" if not ok_in else
                    "a depth multiplier: its output channels are not its input's" if m.in_channels != m.out_channels
                    else "its groups straddle the channel spaces of its (concatenated) input")
            self._unknown(node, f"a grouped conv (groups={m.groups}, {m.in_channels} -> {m.out_channels} channels): "
                                f"{what}")

    def _linear(self, node: fx.Node, order: int, name: str, m: nn.Linear) -> None:
        x = node.args[0]
        st = self._st(x)
        in_shape = self.shapes.get(x) if isinstance(x, fx.Node) else None
        shape = tuple(m.weight.shape)
        last = st is not None and in_shape is not None and self.axis.get(x, 1) == len(in_shape) - 1
        if last and self._width(st) == m.in_features:  # over the channels: (N, C) or channels last (N, ..., C)
            for s, off, total in self._segments(st):
                self._member(s, order, name, "in", st[1], shape, off, total)
        else:
            self._block_inputs(node, "its input does not map onto the Linear's in_features")
        out_shape = self.shapes.get(node)
        if out_shape is not None and (len(out_shape) == 2 or last):
            self.state[node] = self._new_out(order, name, m.out_features, shape)
            if len(out_shape) > 2:
                self.axis[node] = len(out_shape) - 1
        elif out_shape is not None:  # blocked, but reported with the Linear as its producer
            why = self._why(node, "a Linear over the last of more than 2 dims, which are not the channels")
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
        elif (len(so) == len(si) + 1 and so[0] == si[0] and so[1] * so[2] == si[1] and so[3:] == si[2:]
              and any(u.target in ("transpose", torch.transpose) and u.args[1:] == (1, 2) for u in node.users)):
            self._unknown(node, f"a channel shuffle (groups={so[1]}: view {si} -> {so}, transpose(1, 2), view "
                                f"back) interleaves the channel spaces; through the next blocks' identity halves it "
                                f"would couple ever larger sets of channels (not modelled)")
        else:
            self._unknown(node, f"a reshape {si} -> {so} that moves the channel dim")

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
        axes = {self.axis.get(a, 1) for a in operands if self.dynamic.get(a, False)}
        ax = axes.pop() if len(axes) == 1 else 1
        if axes:
            why = "operands with their channels in different dims"
        scales: list[fx.Node] = []  # per-channel parameters (layer scale): sliced with the channel
        for a in operands:
            sa = self.shapes[a]
            pos = ax - (len(out) - len(sa))
            if pos >= 0 and sa[pos] == out[ax]:  # covers the channel dim
                if self.dynamic.get(a, False) and a in self.state:
                    joined.append(self._st(a))
                elif pos == 0 and math.prod(sa) == sa[0] and self._parameter(a) and node.target not in _DIVISIONS:
                    scales.append(a)
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
                    cut.append((spaces if len(spaces) == len(sizes) else self._split(spaces[0], sizes, node), f))
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
        if ax != 1:
            self.axis[node] = ax
        for a in scales:
            for s, off, total in self._segments(self.state[node]):
                self._member(s, self.at, str(a.target), "scale", joined[0][1], tuple(self.shapes[a]), off, total)
        self.state[node] = self._st(node)

    def _parameter(self, a: fx.Node) -> bool:
        """``a`` reads a parameter or buffer of the model (``get_attr``)."""
        if a.op != "get_attr":
            return False
        owner, _, attr = str(a.target).rpartition(".")
        try:
            return isinstance(getattr(self.gm.get_submodule(owner), attr), torch.Tensor)
        except AttributeError:
            return False

    def _permute(self, node: fx.Node) -> None:
        """A permute/transpose that keeps the batch dim in place passes the channels on, to the dim they move to
        (``axis``: e.g. channels last for ConvNeXt's LayerNorm and Linears); one that moves the batch dim blocks."""
        x, rest = node.args[0] if node.args else None, list(node.args[1:])
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        nd = len(self.shapes[x]) if isinstance(x, fx.Node) and x in self.shapes else 0
        if not nd or not all(isinstance(d, int) for d in dims) or len(dims) != (2 if node.target in (
                "transpose", torch.transpose) else nd):
            self._unknown(node, "a permute with dims that are not constants")
            return
        perm = list(range(nd))
        if node.target in ("transpose", torch.transpose):
            a, b = dims[0] % nd, dims[1] % nd
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = [d % nd for d in dims]
        ax = self.axis.get(x, 1)
        if perm[0] != 0 or ax not in perm:
            self._unknown(node, "a permute that moves the batch dim")
            return
        self._pass(node, x)
        self.axis.pop(node, None)
        if perm.index(ax) != 1:
            self.axis[node] = perm.index(ax)

    def _norm(self, node: fx.Node) -> None:
        """A LayerNorm over the channels (in the last dim): the channels pass on, but removing one would change the
        mean and variance of the others, so the space is blocked (named); over anything else: unknown."""
        x = node.args[0] if node.args else None
        shape = self.shapes.get(x) if isinstance(x, fx.Node) else None
        if node.op == "call_module":
            normalized = tuple(self.gm.get_submodule(node.target).normalized_shape)
        else:
            normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if (shape is None or x not in self.state or self.axis.get(x, 1) != len(shape) - 1
                or not isinstance(normalized, (tuple, list)) or tuple(normalized) != (shape[-1],)):
            self._unknown(node, "a normalisation over other dims than the channels alone")
            return
        self._block_state(self._st(x), self._why(node, "a LayerNorm over the channels: removing a channel would "
                                                       "change the others' mean and variance (not modelled)"))
        self._pass(node, x)

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
            self.at = order
            self.dynamic[node] = node.op == "placeholder" or any(self.dynamic.get(a, False) for a in node.all_input_nodes)
            kind = op_kind(self.gm, node, node in self.shapes)
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if kind == "query":
                continue  # shape queries do not use the values
            moved = any(self.axis.get(a, 1) != 1 for a in node.all_input_nodes if self.dynamic.get(a, False))
            if moved and kind not in _CHANNELS_LAST:
                self._unknown(node, "an op on channels moved off dim 1 (after a permute); the walker follows them "
                                    "only through Linear, LayerNorm, element-wise ops, adds/multiplies and permutes")
            elif kind == "input":
                self._fresh_blocked(node)
            elif kind == "output":
                self._block_inputs(node)
            elif kind in ("conv", "linear", "bn"):
                m = self.gm.get_submodule(node.target)
                getattr(self, f"_{kind}")(node, order, node.target, m)
            elif kind in ("elementwise", "pool") and first is not None:
                self._pass(node, first, factor_one=kind == "pool")
            elif kind in ("norm", "reshape", "reduce", "binary", "cat", "permute", "getitem"):
                getattr(self, f"_{kind}")(node)
            elif kind == "split":
                self._unknown(node, "a split of the channels into parts (e.g. ShuffleNetV2's channel split)")
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
            unit = self.sp.unit[s]  # a grouped conv's group width: its channel is a whole group
            for _, m in sorted(self.sp.members[s], key=lambda om: om[0]):
                if (m.module, m.kind, m.offset) not in seen:
                    seen.add((m.module, m.kind, m.offset))
                    members.append(replace(m, repeat=m.repeat * unit))
            producers = [(o, m) for o, m in sorted(self.sp.members[s], key=lambda om: om[0]) if m.kind == "out"]
            if not producers:
                continue
            groups.append((producers[0][0], ChannelGroupSpec(producers[0][1].module, self.sp.size[s] // unit,
                                                             tuple(members))))
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
