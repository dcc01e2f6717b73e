"""Model plumbing for structured pruning: channel groups, structural plans, compaction and MAC counts.

This module only knows ``torch`` (it never imports ``chita_edge.pruning``): the exporters use it to lay out a
compact model, the pruning side uses it to know which weights form one channel.

Three pieces, all plain data:

1. **Channel groups** (``channel_groups``). A ``torch.fx`` trace of the model is walked once; every tensor
   carries the "channel space" of its dim 1. Conv/Linear outputs open a new space, per-channel ops
   (BatchNorm, activations, pooling, dropout, depthwise convs, flatten) pass it on, residual adds and
   multiplies join the spaces of their operands, and the next Conv/Linear consumes it. A space that reaches
   anything else (the model output, the input, ``cat``, softmax, an op we do not know, a per-channel
   constant) is *blocked*: its channels are not prunable. Each unblocked space is one ``ChannelGroupSpec``.

2. **Plans** (``plan_from_zeros``, ``apply_plan``). A plan is versioned JSON-able data::

       {"version": 1,
        "keep":   {"layer1.0.conv1": [0, 2, 3, ...]},             # group id -> kept channel indices
        "groups": {"layer1.0.conv1": {"size": 16, "members": [    # group id -> its original size and wiring
                       {"module": "layer1.0.conv1", "kind": "out", "repeat": 1},
                       {"module": "layer1.0.bn1",   "kind": "bn",  "repeat": 1},
                       {"module": "layer1.0.conv2", "kind": "in",  "repeat": 1}]}},
        "add_bias": []}                                           # consumers that gained a (folded) bias

   Only groups that lose channels appear. A plan that also removes residual blocks (see 4.) has
   ``"version": 2`` and ``"drop": {"layer1.1": "identity"}`` (module path -> what replaces it); a plan
   without dropped blocks stays version 1. The plan names modules, so it can be replayed on a fresh model
   without tracing or an example input; ``apply_plan`` shrinks the Conv/Linear/BatchNorm modules in place
   (same objects, same names, so the state-dict keys are unchanged) and a structurally pruned state dict then
   loads with ``strict=True``.

3. **Compaction** (``compact_model``): a deep copy with every removable channel and every removable residual
   block physically removed, whose output equals the original's.

4. **Residual blocks** (``residual_blocks``). A submodule ``M`` whose forward is ``y = x + f(x)`` (optionally
   ``act(x + f(x))``) with the shortcut the identity -- ``x`` is ``M``'s only input, ``f`` is computed from ``x``
   alone, every path from ``x`` to ``f(x)`` passes a Conv/Linear, nothing inside ``f`` is used outside ``M``,
   and the shapes of ``x`` and ``f(x)`` match -- can be removed whole (``f := 0``): ``M`` becomes
   ``nn.Identity`` (or the activation alone when ``act(x) != x``; ``relu(relu(z)) = relu(z)``, so a ReLU after
   the add goes too when ``x`` is itself a ReLU output). Found from the same fx trace, never by module names:
   ResNet20 has 6 such blocks (its 3 downsampling blocks have a 1x1-conv shortcut and are not). A pruner marks a
   block removed by zeroing every Conv/Linear weight and bias and every BatchNorm gamma/beta of ``f``;
   ``compact_model`` removes a block when every Conv/Linear of ``f`` is zero and ``f(x)`` measured on the example
   input is zero (then it is zero for every input).

When is a channel removable? (what ``plan_from_zeros`` decides)
   A channel ``c`` of a group is a candidate when every producer (``kind == "out"``) has an all-zero output
   slice ``weight[c]`` and a zero ``bias[c]`` (``|x| <= tol``). Everything between the producers and the
   consumers is per-channel, so the channel's value at each consumer input is then a fixed tensor that does
   not depend on the model input -- but it need not be zero: BatchNorm turns a zero into
   ``beta - running_mean * gamma / sqrt(running_var + eps)``, a ReLU may or may not clamp that, a zero-padded
   depthwise conv makes it differ at the borders. We measure that value on ``example_input`` (eval mode) at
   every consumer and remove the channel only if removing it leaves the model output unchanged:

   * value zero everywhere: dropping the consumer's input slice changes nothing;
   * Linear consumer: the value ``v`` is fixed, so ``W[:, slice] @ v`` is folded into the consumer's bias;
   * Conv consumer without zero padding (``padding == 0`` or a non-zero ``padding_mode``) and a spatially
     constant value ``v``: ``v * W[:, c].sum()`` is folded into its bias;
   * anything else (e.g. a 3x3 zero-padded conv seeing a non-zero constant: the border would change) keeps
     the channel. To make such a channel removable, make its constant zero (e.g. BatchNorm ``beta = 0`` with
     zero running mean, or a negative constant before a ReLU).

   A consumer without a bias that needs a non-zero fold gets one; the plan lists it in ``"add_bias"`` so that
   ``apply_plan`` adds the same (zero-initialised) bias to a fresh model and the checkpoint still loads
   strictly. Every group keeps at least one channel. ``compact_model`` re-checks the output on
   ``example_input`` and raises ``RuntimeFailure`` if it moved.
"""

from __future__ import annotations

import builtins
import copy
import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from chita_edge.core.errors import BadInput, RuntimeFailure

__all__ = [
    "PLAN_VERSION",
    "ChannelGroupSpec",
    "Member",
    "ResidualBlock",
    "residual_blocks",
    "apply_plan",
    "channel_groups",
    "channel_weight_indices",
    "compact_model",
    "count_macs",
    "plan_from_zeros",
]

PLAN_VERSION = 1  # plans without dropped blocks; a plan with a "drop" field is version 2
PLAN_VERSIONS = (1, 2)
KINDS = ("out", "in", "dw", "bn")

# Absolute slack when deciding that a measured channel value is zero / constant (float rounding only).
_ACT_ATOL = 1e-6


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
# Tracing and the channel-space walk

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
_RESHAPE_MODULES = (nn.Flatten,)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, torch.clamp, torch.abs, operator.neg, operator.pos,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "clamp_", "clamp_min", "clamp_max", "abs",
                        "neg", "contiguous", "float", "double", "half"}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.interpolate,
}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_QUERY_METHODS = {"size", "dim", "numel"}


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        raise BadInput(
            f"{type(model).__name__}: structured pruning needs a torch.fx-traceable model, but symbolic_trace "
            f"failed ({type(e).__name__}: {_first_line(e)}); remove data-dependent control flow from forward()"
        ) from None


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            m.training = t


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


class _Recorder(fx.Interpreter):
    """Runs the traced graph, recording each tensor result's shape, the inputs of chosen modules and the values
    of chosen nodes (by node name)."""

    def __init__(self, gm: fx.GraphModule, capture: frozenset[str] = frozenset(),
                 values: frozenset[str] = frozenset()):
        super().__init__(gm)
        self.capture = capture
        self.value_names = values
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
            if n.name in self.value_names:
                self.values[n.name] = result.detach().clone()
        return result

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.capture and args and isinstance(args[0], torch.Tensor):
            self.inputs.setdefault(target, []).append(args[0].detach().clone())
        return super().call_module(target, args, kwargs)


class _Spaces:
    """Union-find over channel spaces; a root carries its size, blocked flag and members."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: list[bool] = []
        self.members: list[list[tuple[int, Member]]] = []

    def new(self, size: int, blocked: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.blocked.append(blocked)
        self.members.append([])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def block(self, s: int) -> None:
        self.blocked[self.find(s)] = True

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:  # cannot be one channel set: neither is prunable
            self.blocked[ra] = self.blocked[rb] = True
            return ra
        self.parent[rb] = ra
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

    # -- helpers
    def _fresh_blocked(self, node: fx.Node) -> None:
        shape = self.shapes.get(node)
        if shape is not None:
            self.state[node] = (self.sp.new(shape[1] if len(shape) >= 2 else 0, blocked=True), 1)

    def _block_inputs(self, node: fx.Node) -> None:
        for a in node.all_input_nodes:
            st = self.state.get(a)
            if st is not None:
                self.sp.block(st[0])

    def _unknown(self, node: fx.Node) -> None:
        self._block_inputs(node)
        self._fresh_blocked(node)

    def _pass(self, node: fx.Node, src: fx.Node, factor_one: bool = False) -> None:
        st = self.state.get(src)
        if st is None or (factor_one and st[1] != 1) or node not in self.shapes:
            self._unknown(node)
        else:
            self.state[node] = st
            for a in node.all_input_nodes:  # other tensor inputs (rare) must not carry channels
                if a is not src and a in self.state:
                    self.sp.block(self.state[a][0])

    def _member(self, space: int, order: int, module: str, kind: str, repeat: int, shape: tuple[int, ...]) -> int:
        """Add a member, joining the space this (module, kind) already has from another call site."""
        key = (module, kind)
        prev = self.module_space.get(key)
        if prev is not None:
            if prev[1] != repeat:
                self.sp.block(prev[0])
                self.sp.block(space)
                return self.sp.find(space)
            space = self.sp.union(prev[0], space)
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
                self._block_inputs(node)
            prev = self.module_space.get((name, "out"))
            space = prev[0] if prev is not None else self.sp.new(m.out_channels)
            self.state[node] = (self._member(space, order, name, "out", 1, shape), 1)
        elif m.groups == m.in_channels == m.out_channels and ok_in:
            self.state[node] = (self._member(st[0], order, name, "dw", 1, shape), 1)
        else:  # grouped conv or depth multiplier: its channels are tied in ways we do not model
            self._unknown(node)

    def _linear(self, node: fx.Node, order: int, name: str, m: nn.Linear) -> None:
        x = node.args[0]
        st = self.state.get(x) if isinstance(x, fx.Node) else None
        in_shape = self.shapes.get(x) if isinstance(x, fx.Node) else None
        shape = tuple(m.weight.shape)
        if (st is not None and in_shape is not None and len(in_shape) == 2
                and self.sp.size[self.sp.find(st[0])] * st[1] == m.in_features):
            self._member(st[0], order, name, "in", st[1], shape)
        else:
            self._block_inputs(node)
        out_shape = self.shapes.get(node)
        if out_shape is not None and len(out_shape) == 2:
            prev = self.module_space.get((name, "out"))
            space = prev[0] if prev is not None else self.sp.new(m.out_features)
            self.state[node] = (self._member(space, order, name, "out", 1, shape), 1)
        else:
            self._fresh_blocked(node)

    def _bn(self, node: fx.Node, order: int, name: str, m: nn.Module) -> None:
        x = node.args[0]
        st = self.state.get(x) if isinstance(x, fx.Node) else None
        if st is None or self.sp.size[self.sp.find(st[0])] * st[1] != m.num_features:
            self._unknown(node)
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
            self._unknown(node)

    def _reduce(self, node: fx.Node) -> None:
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if not isinstance(x, fx.Node) or x not in self.shapes or dims is None:
            self._unknown(node)
            return
        nd = len(self.shapes[x])
        dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (tuple, list)) else None
        if dims is None or not all(isinstance(d, int) for d in dims) or any(d % nd in (0, 1) for d in dims):
            self._unknown(node)
            return
        self._pass(node, x, factor_one=True)

    def _binary(self, node: fx.Node) -> None:
        out = self.shapes.get(node)
        operands = [a for a in node.all_input_nodes if a in self.shapes]
        if out is None or len(out) < 2:
            self._unknown(node)
            return
        joined: list[_State] = []
        ok = True
        for a in operands:
            sa = self.shapes[a]
            pos = 1 - (len(out) - len(sa))
            if pos >= 0 and sa[pos] == out[1]:  # covers the channel dim
                if self.dynamic.get(a, False) and a in self.state:
                    joined.append(self.state[a])
                else:
                    ok = False  # a per-channel constant would need slicing
            elif self.dynamic.get(a, False):
                ok = False  # an input-dependent tensor broadcast over channels: a removed channel's value moves
        if not ok or not joined or len({f for _, f in joined}) != 1:
            self._unknown(node)
            return
        space = joined[0][0]
        for s, _ in joined[1:]:
            space = self.sp.union(space, s)
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
                if isinstance(m, _CONV) and not getattr(m, "transposed", False):
                    self._conv(node, order, tgt, m)
                elif isinstance(m, nn.Linear):
                    self._linear(node, order, tgt, m)
                elif isinstance(m, _BN):
                    self._bn(node, order, tgt, m)
                elif isinstance(m, _ELEMENTWISE_MODULES) and first is not None:
                    self._pass(node, first)
                elif isinstance(m, _POOL_MODULES) and first is not None:
                    self._pass(node, first, factor_one=True)
                elif isinstance(m, _RESHAPE_MODULES):
                    self._reshape(node)
                else:
                    self._unknown(node)
            elif op in ("call_function", "call_method"):
                fn = op == "call_function"
                if (not fn and tgt in _QUERY_METHODS) or (fn and tgt in (builtins.getattr, builtins.len)
                                                         and node not in self.shapes):
                    continue  # shape queries do not use the values
                if fn and tgt is operator.getitem and node not in self.shapes:
                    continue  # indexing a size tuple
                if (fn and tgt in _BINARY_FUNCTIONS) or (not fn and tgt in _BINARY_METHODS):
                    self._binary(node)
                elif ((fn and tgt in _ELEMENTWISE_FUNCTIONS) or (not fn and tgt in _ELEMENTWISE_METHODS)) and first is not None:
                    self._pass(node, first)
                elif fn and tgt in _POOL_FUNCTIONS and first is not None:
                    self._pass(node, first, factor_one=True)
                elif (fn and tgt in _RESHAPE_FUNCTIONS) or (not fn and tgt in _RESHAPE_METHODS):
                    self._reshape(node)
                elif (fn and tgt in _REDUCE_FUNCTIONS) or (not fn and tgt in _REDUCE_METHODS):
                    self._reduce(node)
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


def _analyse(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, list[ChannelGroupSpec]]:
    gm, shapes = _shapes(model, example_input)
    return gm, _Walker(gm, shapes).run()


def channel_groups(model: nn.Module, example_input: Any) -> list[ChannelGroupSpec]:
    """Every prunable channel group of ``model``, in execution order of their first producer.

    ``example_input`` (a tensor, or a tuple of tensors for several inputs) is run once in eval mode to learn
    shapes (e.g. how many features each channel becomes after a flatten). Raises ``BadInput`` when the model
    cannot be traced with ``torch.fx``.
    """
    return _analyse(model, example_input)[1]


# --------------------------------------------------------------------------------------------------------------
# Residual blocks


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


_REPLACEMENTS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh, "hardswish": nn.Hardswish,
}
_IDEMPOTENT = frozenset({"relu", "relu6"})  # act(act(z)) == act(z)
_ACT_MODULE_NAMES = tuple((cls, name) for name, cls in _REPLACEMENTS.items() if name != "identity")
_ACT_FUNCTION_NAMES = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
                       F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.hardswish: "hardswish"}
_ACT_METHOD_NAMES = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ADDS = {operator.add, operator.iadd, torch.add}


def _act_name(gm: fx.GraphModule, n: fx.Node) -> str | None:
    """The activation ``n`` applies to its first argument (a name of ``_REPLACEMENTS``), or None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return next((name for cls, name in _ACT_MODULE_NAMES if type(m) is cls), None)
    if n.op == "call_function":
        return _ACT_FUNCTION_NAMES.get(n.target)
    if n.op == "call_method":
        return _ACT_METHOD_NAMES.get(n.target)
    return None


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
        is_add = (add.op == "call_function" and add.target in _ADDS) or (
            add.op == "call_method" and add.target in ("add", "add_"))
        if not is_add or add.kwargs or len(add.args) != 2 or add not in shapes:
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
            heavy = {n for n in br if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Linear, *_CONV))}
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
            act_name = _act_name(gm, act) if act is not None and act.args and act.args[0] is add else None
            if act_name is None:
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
                assert act_name is not None
                same = _act_name(gm, x) == act_name if x.op in ("call_module", "call_function", "call_method") else False
                repl = "identity" if act_name in _IDEMPOTENT and same else act_name
            else:
                repl = "identity"
            gone = body if repl == "identity" else body - {act}
            mods = sorted({n.target for n in br if n.op == "call_module" and isinstance(
                gm.get_submodule(n.target), (nn.Linear, *_CONV, *_BN))}, key=lambda t: min(
                    order[n] for n in br if n.op == "call_module" and n.target == t))
            found.append(ResidualBlock(mpath, repl, tuple(n.name for n in sorted(gone, key=order.__getitem__)),
                                       tuple(mods), y.name))
            break
    # nested blocks: an outer block removes the inner ones with it; both stay candidates
    return found


def residual_blocks(model: nn.Module, example_input: Any) -> list[ResidualBlock]:
    """Every removable residual block of ``model`` (identity shortcut), in execution order; see the module
    docstring, section 4. Raises ``BadInput`` when the model cannot be traced."""
    return _traced_blocks(model, example_input)[1]


def _traced_blocks(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, list[ResidualBlock]]:
    gm, shapes = _shapes(model, example_input)
    return gm, _blocks_of(gm, shapes, {n for n, _ in model.named_modules() if n})


def _shapes(model: nn.Module, example_input: Any) -> tuple[fx.GraphModule, dict[fx.Node, tuple[int, ...]]]:
    """The traced graph and every node's output shape on ``example_input``."""
    with eval_no_grad(model):  # traced in eval mode: a `self.training` read in forward() is baked in
        gm = _trace(model)
        rec = _Recorder(gm)
        try:
            rec.run(*_as_args(example_input))
        except Exception as e:
            raise BadInput(f"{type(model).__name__}: the example input does not run through the model "
                           f"({type(e).__name__}: {_first_line(e)})") from None
    return gm, rec.shapes


def _zero_blocks(model: nn.Module, example_input: Any, tol: float) -> dict[str, str]:
    """{block path: replacement} of the residual blocks whose f is exactly zero (every Conv/Linear of f zero,
    f(x) zero on ``example_input``); nested ones left out when their outer block goes."""
    gm, blocks = _traced_blocks(model, example_input)
    if not blocks:
        return {}
    mods = dict(model.named_modules())
    cand = []
    with torch.no_grad():
        for b in blocks:
            zero = True
            for name in b.modules:
                m = mods[name]
                if isinstance(m, (nn.Linear, *_CONV)):
                    zero &= bool(m.weight.detach().abs().max() <= tol) if m.weight.numel() else True
                    if m.bias is not None and m.bias.numel():
                        zero &= bool(m.bias.detach().abs().max() <= tol)
            if zero:
                cand.append(b)
    if not cand:
        return {}
    rec = _Recorder(gm, values=frozenset(b.output for b in cand))
    with eval_no_grad(model):
        rec.run(*_as_args(example_input))
    out: dict[str, str] = {}
    for b in sorted(cand, key=lambda b: b.id.count(".")):
        v = rec.values.get(b.output)
        if v is None or (v.numel() and float(v.abs().max()) > tol + _ACT_ATOL):
            continue
        if any(b.id.startswith(o + ".") for o in out):
            continue
        out[b.id] = b.replacement
    return out


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# --------------------------------------------------------------------------------------------------------------
# Plans


def _empty_plan() -> dict[str, Any]:
    return {"version": PLAN_VERSION, "keep": {}, "groups": {}, "add_bias": []}


def _foldable_conv(m: nn.Module) -> bool:
    """True when a spatially constant input channel contributes a constant to every output (no zero padding)."""
    if m.padding_mode != "zeros":
        return True
    if isinstance(m.padding, str):
        return m.padding == "valid" or all(k == 1 for k in m.kernel_size)
    return all(p == 0 for p in m.padding)


def _fold_delta(mod: nn.Module, m: Member, channel: int, acts: list[torch.Tensor], tol: float) -> torch.Tensor | None:
    """What the consumer loses when input ``channel`` is removed, as a bias change; None if not foldable.

    ``acts`` are the consumer's inputs recorded at each call; the channel's slice is fixed (input-independent).
    """
    if not acts:
        return None
    w = mod.weight.detach()
    delta = torch.zeros(w.shape[0], dtype=torch.float64)
    lo, r = channel * m.repeat, m.repeat
    for act in acts:
        s = act.narrow(1, lo, r).to(torch.float64)
        if s.abs().max() <= tol + _ACT_ATOL:
            continue  # zero: nothing to fold
        if len(acts) > 1:
            return None  # one bias cannot absorb the values of several call sites
        slack = tol + _ACT_ATOL * (1.0 + float(s.abs().max()))
        if (s - s[:1]).abs().max() > slack:
            return None  # differs between samples: not a fixed value after all
        if isinstance(mod, nn.Linear):
            delta += w[:, lo:lo + r].to(torch.float64) @ s[0].reshape(-1)
        else:
            v = s.mean()
            if not _foldable_conv(mod) or (s - v).abs().max() > slack:
                return None  # zero padding (or a varying value) would change the borders
            delta += v * w[:, channel].to(torch.float64).sum(dim=tuple(range(1, w.dim() - 1)))
    return delta


def _zero_plan(model: nn.Module, example_input: Any, tol: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The plan removing every removable zero channel, and the bias changes (per consumer) it needs."""
    if not (tol >= 0.0 and math.isfinite(tol)):
        raise BadInput(f"tol {tol}: expected a finite number >= 0")
    gm, groups = _analyse(model, example_input)
    mods = dict(model.named_modules())
    candidates: dict[str, list[int]] = {}
    with torch.no_grad():
        for g in groups:
            zero = torch.ones(g.size, dtype=torch.bool)
            for p in g.producers:
                mod = mods[p.module]
                zero &= mod.weight.detach().reshape(g.size, -1).abs().amax(dim=1) <= tol
                if mod.bias is not None:
                    zero &= mod.bias.detach().abs() <= tol
            if zero.any():
                candidates[g.id] = zero.nonzero().flatten().tolist()
    plan, folds = _empty_plan(), {}
    if not candidates:
        return plan, folds
    consumers = frozenset(m.module for g in groups if g.id in candidates for m in g.consumers)
    rec = _Recorder(gm, consumers)
    with eval_no_grad(model):
        rec.run(*_as_args(example_input))
    add_bias: set[str] = set()
    for g in groups:
        if g.id not in candidates:
            continue
        removed: list[tuple[int, dict[str, torch.Tensor]]] = []
        for c in candidates[g.id]:
            deltas: dict[str, torch.Tensor] = {}
            for m in g.consumers:
                d = _fold_delta(mods[m.module], m, c, rec.inputs.get(m.module, []), tol)
                if d is None:
                    break
                if d.abs().max() > 0:
                    deltas[m.module] = d
            else:
                removed.append((c, deltas))
        if len(removed) == g.size:
            removed = removed[1:]  # a group keeps at least one channel
        if not removed:
            continue
        gone = {c for c, _ in removed}
        plan["keep"][g.id] = [c for c in range(g.size) if c not in gone]
        plan["groups"][g.id] = g.to_json()
        for _, deltas in removed:
            for name, d in deltas.items():
                folds[name] = folds[name] + d if name in folds else d
                if mods[name].bias is None:
                    add_bias.add(name)
    plan["add_bias"] = sorted(add_bias)
    return plan, folds


def plan_from_zeros(model: nn.Module, example_input: Any, tol: float = 0.0) -> dict[str, Any]:
    """A plan removing every channel whose producers' weights are zero and whose removal keeps the output.

    See the module docstring for the exact rule (BatchNorm constants are folded into the consumers' biases
    where that is exact). ``tol`` bounds what counts as a zero weight.
    """
    return _zero_plan(model, example_input, tol)[0]


def _bad(where: str, msg: str) -> BadInput:
    return BadInput(f"{where}: plan {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _resolve_drop(model: nn.Module, plan: dict[str, Any], where: str) -> dict[str, str]:
    """The plan's dropped blocks {module path: replacement}, checked against ``model``."""
    drop = plan.get("drop", {})
    if plan.get("version") == 1 and drop:
        raise _bad(where, "field 'drop' needs version 2")
    if not isinstance(drop, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in drop.items()):
        raise _bad(where, "field 'drop' must be an object (module path -> replacement)")
    mods = dict(model.named_modules())
    for path, repl in drop.items():
        if not path or path not in mods:
            raise _bad(where, f"drop names module '{path}', which this model does not have (applied already?)")
        if repl not in _REPLACEMENTS:
            raise _bad(where, f"drop['{path}'] = {repl!r}: expected one of {', '.join(sorted(_REPLACEMENTS))}")
        if isinstance(mods[path], _REPLACEMENTS[repl]) and not any(True for _ in mods[path].parameters()):
            raise _bad(where, f"drop['{path}']: the block is already removed (plan applied twice?)")
        if any(path.startswith(o + ".") for o in drop):
            raise _bad(where, f"drop['{path}'] lies inside another dropped block")
    return dict(drop)


def _resolve_plan(model: nn.Module, plan: Any, where: str) -> tuple[dict[str, dict[str, list[int]]], list[str]]:
    """Validate ``plan`` against ``model``; returns {module: {kind: kept indices along its dim}}, add_bias.
    Modules inside the plan's dropped blocks do not count as the model's (the channel part is applied after
    the drops)."""
    if not isinstance(plan, dict):
        raise _bad(where, f"must be a JSON object with 'version', 'keep' and 'groups', got {type(plan).__name__}")
    if plan.get("version") not in PLAN_VERSIONS:
        raise _bad(where, f"version {plan.get('version')!r} is not supported (expected one of "
                          f"{', '.join(map(str, PLAN_VERSIONS))}); re-create the plan with this chita-edge")
    keep, groups, add_bias = plan.get("keep"), plan.get("groups"), plan.get("add_bias", [])
    if not isinstance(keep, dict) or not isinstance(groups, dict):
        raise _bad(where, "fields 'keep' and 'groups' must be objects (group id -> ...)")
    if set(keep) != set(groups):
        odd = sorted(set(keep) ^ set(groups))
        raise _bad(where, f"group '{odd[0]}' must appear in both 'keep' and 'groups'")
    if not isinstance(add_bias, list) or not all(isinstance(n, str) for n in add_bias):
        raise _bad(where, "field 'add_bias' must be a list of module names")
    drop = _resolve_drop(model, plan, where)
    mods = {n: m for n, m in model.named_modules() if not any(n == d or n.startswith(d + ".") for d in drop)}
    sel: dict[str, dict[str, list[int]]] = {}
    for gid, entry in groups.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        members = entry.get("members") if isinstance(entry, dict) else None
        if not _is_int(size) or size < 1 or not isinstance(members, list) or not members:
            raise _bad(where, f"groups['{gid}'] must have an integer 'size' >= 1 and a non-empty 'members' list")
        kept = keep[gid]
        if not isinstance(kept, list) or not kept or not all(_is_int(i) for i in kept):
            raise _bad(where, f"keep['{gid}'] must be a non-empty list of channel indices")
        if any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
            raise _bad(where, f"keep['{gid}'] must be strictly increasing (no duplicates)")
        if kept[0] < 0 or kept[-1] >= size:
            raise _bad(where, f"keep['{gid}'] index {kept[0] if kept[0] < 0 else kept[-1]} is out of range "
                              f"0..{size - 1}")
        for mem in members:
            if not isinstance(mem, dict) or mem.get("kind") not in KINDS or not isinstance(mem.get("module"), str):
                raise _bad(where, f"groups['{gid}'] member {mem!r}: expected {{'module': str, 'kind': one of "
                                  f"{', '.join(KINDS)}, 'repeat': int}}")
            name, kind, r = mem["module"], mem["kind"], mem.get("repeat", 1)
            if not _is_int(r) or r < 1:
                raise _bad(where, f"groups['{gid}'] member '{name}': 'repeat' must be an integer >= 1")
            if name not in mods:
                raise _bad(where, f"group '{gid}' names module '{name}', which this model does not have")
            mod = mods[name]
            have = _channels(mod, kind)
            if have is None:
                raise _bad(where, f"group '{gid}': module '{name}' ({type(mod).__name__}) cannot be a "
                                  f"'{kind}' member")
            if have != size * r:
                raise _bad(where, f"group '{gid}': module '{name}' has {have} {kind} channels, the plan expects "
                                  f"{size * r} (made for another model, or applied already?)")
            idx = [c * r + j for c in kept for j in range(r)]
            slot = "out" if kind in ("dw", "bn") else kind
            if slot in sel.setdefault(name, {}):
                raise _bad(where, f"module '{name}' appears as '{kind}' in more than one group")
            sel[name][slot] = idx
    for name in add_bias:
        if not isinstance(mods.get(name), (nn.Linear, *_CONV)):
            raise _bad(where, f"add_bias names '{name}', which is not a Conv/Linear module of this model")
    return sel, add_bias


def _channels(mod: nn.Module, kind: str) -> int | None:
    """The size of ``mod``'s dim that a member of ``kind`` slices, or None if the kind does not fit."""
    if kind in ("out", "in") and isinstance(mod, nn.Linear):
        return mod.out_features if kind == "out" else mod.in_features
    if isinstance(mod, _CONV) and not mod.transposed:
        if kind in ("out", "in") and mod.groups == 1:
            return mod.out_channels if kind == "out" else mod.in_channels
        if kind == "dw" and mod.groups == mod.in_channels == mod.out_channels:
            return mod.out_channels
    if kind == "bn" and isinstance(mod, _BN):
        return mod.num_features
    return None


def _take(t: torch.Tensor, dim: int, idx: list[int]) -> torch.Tensor:
    return t.detach().index_select(dim, torch.tensor(idx, dtype=torch.long, device=t.device)).clone()


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value)  # a registered buffer stays a buffer


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Any, where: str = "plan") -> None:
    """Shrink ``model``'s Conv/Linear/BatchNorm modules in place to the channels ``plan`` keeps, after replacing
    the residual blocks the plan drops (``"drop"``) by ``nn.Identity`` (or their activation).

    The modules stay the same objects under the same names, so the state-dict keys are unchanged; a state dict
    saved from the compacted model then loads with ``strict=True``. Existing weights are sliced (on a fresh
    model they are about to be overwritten). The plan is checked fully before anything changes; a bad plan
    raises ``BadInput`` naming ``where`` (e.g. the checkpoint path).
    """
    sel, add_bias = _resolve_plan(model, plan, where)
    for path, repl in plan.get("drop", {}).items():
        _set_submodule(model, path, _REPLACEMENTS[repl]())
    mods = dict(model.named_modules())
    for name in add_bias:
        mod = mods[name]
        if mod.bias is None:
            w = mod.weight
            mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    for name, slots in sel.items():
        mod = mods[name]
        out, inp = slots.get("out"), slots.get("in")
        if isinstance(mod, _BN):
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    _set_param(mod, p, _take(getattr(mod, p), 0, out))
            mod.num_features = len(out)
            continue
        depthwise = isinstance(mod, _CONV) and mod.groups > 1
        if out is not None:
            _set_param(mod, "weight", _take(mod.weight, 0, out))
            if mod.bias is not None:
                _set_param(mod, "bias", _take(mod.bias, 0, out))
        if inp is not None:
            _set_param(mod, "weight", _take(mod.weight, 1, inp))
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape[0], mod.weight.shape[1]
        elif depthwise:
            mod.in_channels = mod.out_channels = mod.groups = mod.weight.shape[0]
        else:
            mod.out_channels, mod.in_channels = mod.weight.shape[0], mod.weight.shape[1]


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _leaves(v)]
    return []


def compact_model(model: nn.Module, example_input: Any, *, tol: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """A deep copy of ``model`` with every removable channel physically removed, and the plan that did it.

    Step 0: on a deep copy, replace every residual block whose f is exactly zero (``residual_blocks``) by
            ``nn.Identity`` or its activation.
    Step 1: find the removable channels of the copy (``plan_from_zeros``) and the bias folds they need.
    Step 2: add the folds to the consumers' biases (creating a bias where the plan says so).
    Step 3: ``apply_plan`` on the copy (the channel part; the plan records the drops as well).
    Step 4: check that the copy's output on ``example_input`` equals the original's (``RuntimeFailure`` if not).
    ``model`` itself is not changed. A model without zero channels comes back as an unchanged copy.
    """
    drop = _zero_blocks(model, example_input, tol)
    new = copy.deepcopy(model)
    for path, repl in drop.items():
        _set_submodule(new, path, _REPLACEMENTS[repl]())
    plan, folds = _zero_plan(new, example_input, tol)
    with torch.no_grad():
        for name, delta in folds.items():
            mod = new.get_submodule(name)
            if mod.bias is None:
                w = mod.weight
                mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            mod.bias.add_(delta.to(mod.bias.dtype))
    apply_plan(new, plan, where="compact_model")
    if drop:
        plan = {**plan, "version": 2, "drop": drop}
    args = _as_args(example_input)
    with eval_no_grad(model), eval_no_grad(new):
        ref, got = _leaves(model(*args)), _leaves(new(*args))
    if len(ref) != len(got):
        raise RuntimeFailure(f"compact_model: the compacted model returns {len(got)} tensors, not {len(ref)}")
    for a, b in zip(ref, got, strict=True):
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = float(a.double().abs().max()) if a.numel() else 0.0
        if a.shape != b.shape or diff > 1e-5 * (1.0 + scale):
            raise RuntimeFailure(f"compact_model: the compacted model's output moved by {diff:.3g} (shape "
                                 f"{tuple(b.shape)} vs {tuple(a.shape)}); use a smaller tol")
    return new, plan


# --------------------------------------------------------------------------------------------------------------
# Cost


def count_macs(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv and Linear module, by module name, in call order.

    Conv: ``output elements * in_channels / groups * prod(kernel_size)``; Linear: ``output elements *
    in_features``; both divided by the batch size (dim 0 of the first input). A module called several times
    counts every call. Measured with forward hooks on ``example_input`` (eval mode), so it also works on models
    that ``torch.fx`` cannot trace. Functional convs/matmuls (no module) are not counted.
    """
    args = _as_args(example_input)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None or first.dim() == 0 or first.shape[0] == 0:
        raise BadInput("count_macs: example_input must be a batched tensor (N, ...) or a tuple starting with one")
    n = first.shape[0]
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str, mod: nn.Module):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            if isinstance(mod, nn.Linear):
                per_out = mod.in_features
            else:
                per_out = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            macs[name] = macs.get(name, 0) + out.numel() * per_out // n
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, *_CONV)):
            handles.append(mod.register_forward_hook(hook(name, mod)))
    try:
        with eval_no_grad(model):
            model(*args)
    except Exception as e:
        raise BadInput(f"{type(model).__name__}: the example input does not run through the model "
                       f"({type(e).__name__}: {_first_line(e)})") from None
    finally:
        for h in handles:
            h.remove()
    return macs
