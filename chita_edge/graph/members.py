"""The data of channel groups: ``Member`` (one coupled weight slice), ``ChannelGroupSpec`` (channels that must
be removed together), ``BlockedGroup`` (a channel space that cannot be pruned, with the module and op that block
it), ``blocked_summary`` (them on one line) and ``channel_weight_indices`` (the flat weight indices of one
channel), and ``Spaces``, the union-find over channel spaces that the channel walker
(``chita_edge.graph.channels``) finds them with.

Depends on ``torch`` only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from chita_edge.core.errors import BadInput

__all__ = ["BlockedGroup", "ChannelGroupSpec", "Member", "Spaces", "blocked_summary", "channel_weight_indices"]

# --------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Member:
    """One coupled slice: channel ``c`` of a group is ``weight.narrow(dim, c * repeat, repeat)`` of ``module``.

    kind:
      ``"out"`` output channel of a Conv/Linear: weight dim 0 and ``bias[c]`` (a producer);
      ``"in"``  input channel of a Conv/Linear: weight dim 1 (a consumer); after a flatten, each channel
                covers ``repeat = H * W`` consecutive input features of the Linear;
      ``"dw"``  depthwise or grouped conv with ``in_channels == out_channels`` (``groups > 1``): weight dim 0 and
                ``bias[c]``; the channel passes through it (its input ``c`` and output ``c`` are the same
                channel). A grouped conv's channel is one whole group (``repeat`` = channels per group): the
                group's input channels (its producers' rows) and output rows go together and ``groups`` shrinks;
      ``"bn"``  BatchNorm ``weight``, ``bias``, ``running_mean``, ``running_var`` entries;
      ``"scale"`` a per-channel parameter added to or multiplying the channels (ConvNeXt's layer scale, of shape
                ``(C, 1, 1)`` or ``(C,)`` channels last): its dim 0; ``module`` is then the parameter's path.
    shape: the shape of ``module.weight`` (of ``running_mean`` for a BatchNorm without affine).
    offset, total: where the group's channels sit along the member's dim when the module sees a concatenation
      (``torch.cat`` along the channels): channel ``c`` is ``weight.narrow(dim, offset + c * repeat, repeat)``
      of a dim with ``total`` entries; ``total == 0`` means the group covers the whole dim (no concatenation).
    """

    module: str
    kind: str
    repeat: int = 1
    shape: tuple[int, ...] = ()
    offset: int = 0
    total: int = 0

    @property
    def dim(self) -> int:
        return 1 if self.kind == "in" else 0

    @property
    def param(self) -> str:
        """State-dict name of the weight this member slices (as ``PrunableParam.name``)."""
        if self.kind == "scale":
            return self.module
        return f"{self.module}.weight" if self.module else "weight"

    def to_json(self) -> dict[str, Any]:
        seg = {"offset": self.offset, "total": self.total} if self.total else {}
        return {"module": self.module, "kind": self.kind, "repeat": self.repeat, **seg}


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
        idx = _slice_indices(m.shape, m.dim, m.offset + channel * m.repeat, m.repeat)
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


class Spaces:
    """Union-find over channel spaces (the channel walker's state); a root carries its size, blocked flag and
    members, and its unit: channels go ``unit`` at a time (a grouped conv's group width; every member's
    ``repeat`` is multiplied by it when the groups are made). A space can also be cut into consecutive pieces (``split``): a space's channels are independent of
    each other, so any partition of them is valid; ``expand`` then reads the pieces wherever the cut space was."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.blocked: list[bool] = []
        self.members: list[list[tuple[int, Member]]] = []
        self.reason: list[tuple[str, str, str] | None] = []  # (module, op, why) that blocked the root first
        self.pieces: dict[int, list[int]] = {}  # a root that was split -> its pieces, in channel order
        self.unit: list[int] = []  # channels removed together (1, or a grouped conv's group width)

    def new(self, size: int, blocked: bool = False, reason: tuple[str, str, str] | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.blocked.append(blocked)
        self.members.append([])
        self.reason.append(reason if blocked else None)
        self.unit.append(1)
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

    def set_unit(self, s: int, unit: int, reason: tuple[str, str, str]) -> None:
        """Channels of ``s`` go ``unit`` at a time (with any unit it has already: their least common multiple);
        blocked with ``reason`` when that does not divide the space."""
        r = self.find(s)
        u = math.lcm(self.unit[r], unit)
        if self.size[r] % u:
            self.block(r, (*reason[:2], f"{reason[2]}; its {self.size[r]} channels do not split into whole groups "
                                        f"of {u}"))
        else:
            self.unit[r] = u

    def union(self, a: int, b: int, reason: tuple[str, str, str]) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:  # cannot be one channel set: neither is prunable
            why = (reason[0], reason[1], f"joins channel spaces of {self.size[ra]} and {self.size[rb]} channels")
            self.block(ra, why)
            self.block(rb, why)
            return ra
        unit = self.unit[rb]
        self.parent[rb] = ra
        if self.blocked[rb] and (not self.blocked[ra] or not self.members[ra] and self.members[rb]):
            self.reason[ra] = self.reason[rb]  # the reason of a space with members (producers) beats a fresh one's
        self.blocked[ra] = self.blocked[ra] or self.blocked[rb]
        self.members[ra] += self.members[rb]
        self.members[rb] = []
        self.set_unit(ra, unit, reason)
        return ra

    def add(self, s: int, order: int, member: Member) -> None:
        self.members[self.find(s)].append((order, member))

    def split(self, s: int, sizes: list[int], reason: tuple[str, str, str]) -> list[int]:
        """Cut space ``s`` into consecutive pieces of ``sizes`` channels; each member becomes one member per piece,
        at the piece's offset within the member's dim. A cut through a unit (a grouped conv's group) blocks the
        space with ``reason``."""
        r = self.find(s)
        if sum(sizes) != self.size[r] or r in self.pieces:
            raise ValueError(f"cannot split a space of {self.size[r]} channels into {sizes}")
        pieces, start = [], 0
        if any(n % self.unit[r] for n in sizes):
            self.block(r, (*reason[:2], f"{reason[2]}: a cut into {sizes} channels splits its groups of "
                                        f"{self.unit[r]} (a grouped conv's)"))
        for n in sizes:
            p = self.new(n, self.blocked[r], self.reason[r])
            self.unit[p] = self.unit[r] if not n % self.unit[r] else 1
            for order, m in self.members[r]:
                total = m.total or self.size[r] * m.repeat
                self.members[p].append((order, replace(m, offset=m.offset + start * m.repeat, total=total)))
            pieces.append(p)
            start += n
        self.members[r] = []
        self.pieces[r] = pieces
        return pieces

    def expand(self, spaces: tuple[int, ...]) -> tuple[int, ...]:
        """``spaces`` with every split space replaced by its pieces (roots)."""
        out: list[int] = []
        for s in spaces:
            r = self.find(s)
            out.extend(self.expand(tuple(self.pieces[r])) if r in self.pieces else (r,))
        return tuple(out)
