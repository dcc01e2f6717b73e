"""Removal-cost curves for the width search: per channel group, the greedy group-OBS removal order and its cost
(``removal_curves``), calibrated on the KL divergence of the model's outputs (``probe_curves``), and the same
loss proxy for removing whole residual blocks (``block_costs``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from chita_edge.graph.members import Member
from chita_edge.graph.residual import ResidualBlock
from chita_edge.pruning.channels import ChannelStructure, apply_keep, zero_block
from chita_edge.pruning.refit import LayerStats, _gram, layer_inputs
from chita_edge.solvers.group_chita import nested_backsolve, obs_removal_order


def _log_probs(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Log-softmax of ``model``'s outputs on ``x`` (float64), in batches."""
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).double().log_softmax(1)


def _channel_columns(m: Member, size: int, ncols: int) -> torch.Tensor:
    """The weight columns of each channel of a group of ``size`` channels in consumer ``m`` (size x b)."""
    kk = ncols // (m.total or size * m.repeat)  # columns per input channel (k*k; 1 for a Linear)
    b = m.repeat * kk  # a consumer of a concatenation sees the group at m.offset
    return m.offset * kk + torch.arange(size).view(-1, 1) * b + torch.arange(b).view(1, -1)


def _kl(ref: torch.Tensor, lp: torch.Tensor) -> float:
    """Mean KL(p_ref || p) over the samples, from log-probabilities; clamped at 0 against rounding."""
    return max(float((ref.exp() * (ref - lp)).sum(1).mean()), 0.0)


@torch.no_grad()
def block_costs(model: nn.Module, blocks: list[ResidualBlock], x: torch.Tensor, batch: int = 128) -> list[float]:
    """Per residual block: the KL divergence of the model's outputs on ``x`` after removing the block
    (``zero_block``) from the model's current outputs -- the same loss proxy ``probe_curves`` measures for
    channel removals, so that the width search can trade a block against channels."""
    was = model.training
    model.eval()
    try:
        ref = _log_probs(model, x, batch)
        out = []
        for b in blocks:
            trial = copy.deepcopy(model)
            zero_block(trial, b)
            trial.eval()
            out.append(_kl(ref, _log_probs(trial, x, batch)))
    finally:
        model.train(was)
    return out


@torch.no_grad()
def removal_curves(model: nn.Module, cs: ChannelStructure, x: torch.Tensor, alive: torch.Tensor, *,
                   min_width: dict[str, int], damp: float = 0.01, batch: int = 128,
                   stats: LayerStats | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per channel group: the greedy group-OBS removal order of its alive channels and the cumulative cost.

    The cost of a channel is the relative output error it causes in every consumer after the consumer's
    optimal re-fit (``obs_removal_order``), each consumer weighted by 1 / its output energy on ``x``.
    ``stats`` (optional) supplies the consumers' Gram matrices where already known.
    """
    mods = dict(model.named_modules())
    consumers = sorted({m.module for s in cs.specs for m in s.consumers})
    known = {} if stats is None else dict(stats.gram)
    missing = [c for c in consumers if c not in known]
    xs = layer_inputs(model, missing, x, batch) if missing else {}
    curves = []
    for f, spec in enumerate(cs.specs):
        al = alive[cs.channels(f)]
        steps = int(al.sum()) - min_width.get(spec.id, 1)
        Hinv, W, blocks, scale = [], [], [], []
        for m in spec.consumers:
            mod = mods[m.module]
            H = known[m.module] if m.module in known else _gram(mod, xs[m.module])[0]
            Wl = mod.weight.detach().reshape(mod.weight.shape[0], -1).double()
            energy = float(torch.einsum("oi,ij,oj->", Wl, H, Wl))
            Hd = H.clone()
            Hd.diagonal().add_(damp * float(H.diagonal().mean()) + 1e-12)
            Hinv.append(torch.cholesky_inverse(torch.linalg.cholesky(Hd)))
            W.append(Wl)
            blocks.append(_channel_columns(m, spec.size, Wl.shape[1]))
            scale.append(1.0 / max(energy, 1e-30))
        if steps <= 0 or not Hinv:
            curves.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)))
            continue
        order, cum = obs_removal_order(Hinv, W, blocks, scale, al, steps)
        curves.append((order + cs.first[f], cum))
    return curves


@torch.no_grad()
def probe_curves(model: nn.Module, cs: ChannelStructure, x: torch.Tensor, curves: list[tuple[torch.Tensor, torch.Tensor]],
                 stats: LayerStats, *, probes: dict[int, list[int]], damp: float = 0.01,
                 batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Loss-calibrated removal curves: for group f, remove the first k channels of its group-OBS order (k in
    ``probes[f]``), re-fit its consumers (``layer_backsolve`` with the current Gram matrices: the OBS update;
    ``nested_backsolve``: one factorisation per consumer for all of the group's probes),
    and measure the KL divergence of the model's outputs on ``x`` from the current model's. Between probes the
    cost is interpolated linearly (0 at k = 0). Per-layer relative errors are not comparable across layers; the
    output divergence is, so the width search can trade one group against another.
    """
    was = model.training
    model.eval()
    ref = _log_probs(model, x, batch)
    mods = dict(model.named_modules())
    out = []
    for f, (order, _) in enumerate(curves):
        ks = sorted({k for k in probes.get(f, []) if 0 < k <= order.numel()})
        if not ks:
            out.append((order, torch.zeros(order.numel(), dtype=torch.float64)))
            continue
        pts = [(0, 0.0)]
        spec = cs.specs[f]
        # one Cholesky factor per consumer for all of the group's probes: they remove nested prefixes of
        # ``order``, so each probe's kept columns are a leading block once sorted by removal position
        solve = {}
        for m in spec.consumers:
            Wm = mods[m.module].weight.detach()
            W = Wm.reshape(Wm.shape[0], -1).double()
            H = stats.gram.get(m.module)
            if H is None:
                H = _gram(mods[m.module], layer_inputs(model, [m.module], x, batch)[m.module])[0]
                stats.gram[m.module] = H
            rank = torch.full((W.shape[1],), float(order.numel()), dtype=torch.float64)  # others: never removed
            cols = _channel_columns(m, spec.size, W.shape[1])[order - cs.first[f]]
            rank[cols] = torch.arange(order.numel(), dtype=torch.float64).view(-1, 1).expand_as(cols)
            solve[m.module] = nested_backsolve(H, W, rank, damp * float(H.diagonal().mean()) + 1e-12)
        for k in ks:
            trial = copy.deepcopy(model)
            tmods = dict(trial.named_modules())
            keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
            keep[order[:k]] = False
            apply_keep(trial, cs, keep)
            for m in spec.consumers:
                mod = tmods[m.module]
                Wz = mod.weight.detach().reshape(mod.weight.shape[0], -1)
                Wn = solve[m.module](Wz.abs().sum(0) > 0)
                Wn[Wz.abs().sum(1) == 0] = 0.0
                mod.weight.copy_(Wn.reshape(mod.weight.shape).to(mod.weight.dtype))
            trial.eval()
            pts.append((k, _kl(ref, _log_probs(trial, x, batch))))
        kk = torch.tensor([p[0] for p in pts], dtype=torch.float64)
        vv = torch.tensor([p[1] for p in pts], dtype=torch.float64)
        vv = torch.cummax(vv, 0).values  # removing more never costs less
        j = torch.arange(1, order.numel() + 1, dtype=torch.float64)
        idx = torch.searchsorted(kk, j, right=False).clamp(1, len(kk) - 1)
        k0, k1 = kk[idx - 1], kk[idx]
        t = ((j - k0) / (k1 - k0)).clamp(0, None)
        cost = vv[idx - 1] + t * (vv[idx] - vv[idx - 1])
        beyond = j > kk[-1]
        if bool(beyond.any()):  # past the last probe: extrapolate the last slope
            slope = (vv[-1] - vv[-2]) / max(float(kk[-1] - kk[-2]), 1.0)
            cost[beyond] = vv[-1] + (j[beyond] - kk[-1]) * slope
        out.append((order, cost))
    model.train(was)
    return out


__all__ = ["block_costs", "probe_curves", "removal_curves"]
