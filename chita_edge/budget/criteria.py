"""The greedy width search of the budget search: which channels a group loses next, and at what cost.

A criterion (``Criterion``) keeps the channels still alive and prices a step of one channel group down to a
lower width: ``ChitaCriterion`` (the paper's global quadratic, no re-fit), ``CurveCriterion`` (precomputed
removal orders and costs, ``removal_curves`` / ``probe_curves``) or ``NormCriterion`` (filter norms, the
global-magnitude baseline). ``greedy_widths`` steps groups down (and removes residual blocks, ``BlockMoves``)
until the corrected cost-model predictions meet their targets; ``uniform_widths`` is the common-fraction
baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from chita_edge.budget.config import resources_of
from chita_edge.budget.costmodel import CostModel
from chita_edge.pruning.channels import ChannelStructure, allowed_widths

# the weights left at (widths, removed blocks), in any unit: the "weights" objective's capacity
WeightsLeft = Callable[[Mapping[str, int], frozenset[str]], float]


class Criterion:
    """Greedy state: per group the channels still alive; ``propose`` / ``commit`` a step down of one group, and
    ``undo_cost`` / ``undo`` its last step (the give-back phase of ``greedy_widths``)."""

    def __init__(self, cs: ChannelStructure, alive: torch.Tensor):
        self.cs = cs
        self.alive = alive.clone()
        self.taken: list[list[torch.Tensor]] = [[] for _ in cs.specs]  # per group, the channels of each step

    def _alive_in(self, f: int) -> torch.Tensor:
        sl = self.cs.channels(f)
        return self.alive[sl].nonzero().squeeze(1) + sl.start

    def propose(self, f: int, drop: int) -> tuple[float, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def commit(self, f: int, chans: torch.Tensor) -> None:
        self.alive[chans] = False
        self.taken[f].append(chans)

    def undo_cost(self, f: int) -> tuple[float, torch.Tensor]:  # pragma: no cover - abstract
        """What undoing group ``f``'s last step recovers (its cost had it been the last step taken), and its
        channels."""
        raise NotImplementedError

    def undo(self, f: int) -> torch.Tensor:
        chans = self.taken[f].pop()
        self.alive[chans] = True
        return chans


class ChitaCriterion(Criterion):
    """Objective increase of removing channels without re-fit, with the residual of earlier removals."""

    def __init__(self, cs: ChannelStructure, alive: torch.Tensor, Z: torch.Tensor, wsq: torch.Tensor, lam: float):
        super().__init__(cs, alive)
        self.Z = Z.double()
        self.wsq = wsq.double()
        self.lam = lam
        self.r = torch.zeros(Z.shape[0], dtype=torch.float64)
        self.zz = (self.Z * self.Z).sum(0)

    def propose(self, f: int, drop: int) -> tuple[float, torch.Tensor]:
        cand = self._alive_in(f)
        if drop <= 0 or cand.numel() <= drop:
            return math.inf, cand[:0]
        # incremental cost of each channel given the residual r, then the joint cost of the cheapest `drop`
        inc = self.r @ self.Z[:, cand] + 0.5 * self.zz[cand] + self.lam * self.wsq[cand]
        chans = cand[torch.topk(-inc, drop).indices]
        zsum = self.Z[:, chans].sum(1)
        cost = float(self.r @ zsum + 0.5 * zsum @ zsum + self.lam * self.wsq[chans].sum())
        return cost, chans

    def commit(self, f: int, chans: torch.Tensor) -> None:
        super().commit(f, chans)
        self.r += self.Z[:, chans].sum(1)

    def undo_cost(self, f: int) -> tuple[float, torch.Tensor]:
        chans = self.taken[f][-1]
        zsum = self.Z[:, chans].sum(1)
        return float((self.r - zsum) @ zsum + 0.5 * zsum @ zsum + self.lam * self.wsq[chans].sum()), chans

    def undo(self, f: int) -> torch.Tensor:
        chans = super().undo(f)
        self.r -= self.Z[:, chans].sum(1)
        return chans


class CurveCriterion(Criterion):
    """Precomputed per-group removal orders with cumulative costs (``removal_curves``)."""

    def __init__(self, cs: ChannelStructure, alive: torch.Tensor, curves: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(cs, alive)
        self.curves = curves
        self.pos = [0] * len(curves)

    def propose(self, f: int, drop: int) -> tuple[float, torch.Tensor]:
        order, cum = self.curves[f]
        p = self.pos[f]
        if drop <= 0 or p + drop > order.numel():
            return math.inf, order[:0]
        before = float(cum[p - 1]) if p > 0 else 0.0
        return float(cum[p + drop - 1]) - before, order[p:p + drop]

    def commit(self, f: int, chans: torch.Tensor) -> None:
        super().commit(f, chans)
        self.pos[f] += chans.numel()

    def undo_cost(self, f: int) -> tuple[float, torch.Tensor]:
        chans, (_, cum), p = self.taken[f][-1], self.curves[f], self.pos[f]
        k = chans.numel()
        return float(cum[p - 1]) - (float(cum[p - k - 1]) if p > k else 0.0), chans

    def undo(self, f: int) -> torch.Tensor:
        chans = super().undo(f)
        self.pos[f] -= chans.numel()
        return chans


class NormCriterion(Criterion):
    """Global magnitude ranking: the cost of a step is the mean filter norm of the channels it removes."""

    def __init__(self, cs: ChannelStructure, alive: torch.Tensor, norms: torch.Tensor):
        super().__init__(cs, alive)
        self.norms = norms.double()

    def propose(self, f: int, drop: int) -> tuple[float, torch.Tensor]:
        cand = self._alive_in(f)
        if drop <= 0 or cand.numel() <= drop:
            return math.inf, cand[:0]
        chans = cand[torch.topk(-self.norms[cand], drop).indices]
        return float(self.norms[chans].max()), chans

    def undo_cost(self, f: int) -> tuple[float, torch.Tensor]:
        chans = self.taken[f][-1]
        return float(self.norms[chans].max()), chans


@dataclass
class BlockMoves:
    """Residual blocks as moves of the width search: ``costs[id]`` is the objective cost of removing block
    ``id`` (same units as the channel criterion's costs: ``block_costs``' output divergence); ``dropped``
    holds the blocks removed so far (the greedy adds to it)."""

    costs: dict[str, float]
    dropped: set[str] = field(default_factory=set)


def greedy_widths(cm: CostModel, cs: ChannelStructure, crit: Criterion, targets: Mapping[str, float],
                  corr: Mapping[str, float], multiple: int, *, per_resource: bool = True,
                  max_jump: int = 4, block: int | None = None, blocks: BlockMoves | None = None,
                  weights_left: WeightsLeft | None = None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Step groups down until every (corrected) predicted resource meets its target; ``crit`` picks channels.

    ``per_resource``: rank steps by objective cost per unit of (normalised) resource saved (NetAdapt); False
    ranks by the objective cost alone (the global-norm baseline). ``blocks``: removing one of these residual
    blocks is one more candidate step, ranked by the same score (its cost per resource saved, the saving
    predicted by the cost model without the block's units). ``weights_left(widths, dropped)``: the objective cost
    of a step is then the weights it removes (the capacity a fine-tuning after it has to work with) instead of
    ``crit``'s and the blocks' costs; ``crit`` still picks which channels go. Returns the widths and the steps taken.
    """
    sizes = cs.sizes
    widths = {s.id: int(crit.alive[cs.channels(f)].sum()) for f, s in enumerate(cs.specs)}
    steps: list[dict[str, Any]] = []
    dropped = blocks.dropped if blocks is not None else set()
    before = set(dropped)  # blocks removed by earlier stages stay removed; this search's may be given back

    def res(w: Mapping[str, int], d: set[str]) -> dict[str, float]:
        p = resources_of(cm.predict(w, dropped=frozenset(d))) if ("memory_mb" in targets or "file_mb" in targets) \
            else {"latency_ms": cm.latency(w, dropped=frozenset(d))}
        return {k: p[k] * corr.get(k, 1.0) for k in p}

    def lost(w: Mapping[str, int], d: set[str]) -> float:  # weights removed by going from (widths, dropped)
        assert weights_left is not None
        return weights_left(widths, frozenset(dropped)) - weights_left(w, frozenset(d))

    cur = res(widths, dropped)
    while any(cur[k] > targets[k] for k in targets):
        best = None
        for b, cost in (blocks.costs.items() if blocks is not None else ()):
            if b in dropped or not math.isfinite(cost):
                continue
            if weights_left is not None:
                cost = lost(widths, dropped | {b})
            r = res(widths, dropped | {b})
            gain = sum((cur[k] - r[k]) / targets[k] for k in targets if cur[k] > targets[k])
            if gain <= 1e-12:
                continue
            score = max(cost, 0.0) / gain
            if best is None or score < best[0]:
                best = (score, None, b, None, r, cost)
        for f, s in enumerate(cs.specs):
            lower = [w for w in allowed_widths(sizes[s.id], multiple, block) if w < widths[s.id]]
            # every lower width is a candidate step (not only the next one): the latency of a kernel is flat
            # between the runtime's channel blocks, so a one-step look-ahead stalls on such plateaus
            for new_w in reversed(lower[-max_jump:] if per_resource else lower[-1:]):
                cost, chans = crit.propose(f, widths[s.id] - new_w)
                if not math.isfinite(cost):
                    continue
                trial = {**widths, s.id: new_w}
                if weights_left is not None:
                    cost = lost(trial, dropped)
                r = res(trial, dropped)
                gain = sum((cur[k] - r[k]) / targets[k] for k in targets if cur[k] > targets[k])
                if gain <= 1e-12:
                    continue
                score = max(cost, 0.0) / gain if per_resource else cost
                if best is None or score < best[0]:
                    best = (score, f, new_w, chans, r, cost)
        if best is None:
            break  # nothing left to remove that helps: unreachable from here
        _, f, new_w, chans, r, cost = best
        if f is None:  # a residual block goes
            dropped.add(new_w)
            steps.append({"block": new_w, "objective_cost": cost, **{k: r[k] for k in r}})
            cur = r
            continue
        crit.commit(f, chans)
        gid = cs.specs[f].id
        steps.append({"group": gid, "width": new_w, "objective_cost": cost, **{k: r[k] for k in r}})
        widths[gid], cur = new_w, r
    if all(cur[k] <= targets[k] for k in targets):
        _give_back(cs, crit, targets, widths, dropped, dropped - before, res, steps, per_resource,
                   blocks.costs if blocks is not None else {}, weights_left)
    return widths, steps


def _give_back(cs: ChannelStructure, crit: Criterion, targets: Mapping[str, float], widths: dict[str, int],
               dropped: set[str], mine: set[str], res: Callable[[Mapping[str, int], set[str]], dict[str, float]],
               steps: list[dict[str, Any]], per_resource: bool,
               block_costs: Mapping[str, float], weights_left: WeightsLeft | None = None) -> None:
    """Undo steps of this search while every target still holds: the last step down can overshoot the target by
    a whole residual block or several width multiples, and the slack it leaves is accuracy thrown away. Each
    round undoes the step (a group's last step, or a removed block of ``mine``) that recovers the most objective
    cost per unit of normalised resource it adds back (``per_resource``; else the most cost), among those that
    keep every target met; the record is ``{"give_back": ...}`` in ``steps``. ``weights_left``: the cost an undo
    recovers is the weights it brings back (as in ``greedy_widths``)."""
    def regained(w: Mapping[str, int], d: set[str], cost: float) -> float:
        if weights_left is None:
            return cost
        return weights_left(w, frozenset(d)) - weights_left(widths, frozenset(dropped))

    cur = res(widths, dropped)
    while True:
        cands = []  # (score, group index or None for a block, its new width or the block, resources, cost)
        for b in sorted(mine):
            cands.append((regained(widths, dropped - {b}, block_costs[b]), None, b, res(widths, dropped - {b})))
        for f, s in enumerate(cs.specs):
            if crit.taken[f]:
                cost, chans = crit.undo_cost(f)
                w = widths[s.id] + chans.numel()
                back = {**widths, s.id: w}
                cands.append((regained(back, dropped, cost), f, w, res(back, dropped)))
        fits = [(_undo_score(c, cur, r, targets, per_resource), f, what, r, c) for c, f, what, r in cands
                if all(r[k] <= targets[k] for k in targets)]
        if not fits:
            return
        _, f, what, cur, cost = max(fits, key=lambda t: t[0])
        if f is None:
            dropped.discard(what)
            mine.discard(what)
        else:
            crit.undo(f)
            widths[cs.specs[f].id] = what
        steps.append({"give_back": what if f is None else cs.specs[f].id, **({} if f is None else {"width": what}),
                      "objective_cost": cost, **cur})


def _undo_score(cost: float, cur: Mapping[str, float], r: Mapping[str, float], targets: Mapping[str, float],
                per_resource: bool) -> float:
    """Objective cost recovered per unit of normalised resource added back (free width first)."""
    if not per_resource:
        return cost
    added = sum(max(r[k] - cur[k], 0.0) / targets[k] for k in targets)
    return math.inf if added <= 1e-12 else max(cost, 0.0) / added


def uniform_widths(cm: CostModel, cs: ChannelStructure, targets: Mapping[str, float], corr: Mapping[str, float],
                   multiple: int, block: int | None = None) -> dict[str, int]:
    """The largest common kept fraction q (widths rounded down to the multiple) meeting every target."""
    def at(q: float) -> dict[str, int]:
        out = {}
        for s in cs.specs:
            ws = allowed_widths(s.size, multiple, block)
            ok = [w for w in ws if w <= q * s.size + 1e-9]
            out[s.id] = ok[-1] if ok else ws[0]
        return out

    def fits(w: Mapping[str, int]) -> bool:
        p = resources_of(cm.predict(w))
        return all(p[k] * corr.get(k, 1.0) <= targets[k] for k in targets)

    lo, hi = 0.0, 1.0
    if fits(at(1.0)):
        return at(1.0)
    for _ in range(30):
        mid = (lo + hi) / 2
        if fits(at(mid)):
            lo = mid
        else:
            hi = mid
    return at(lo)
