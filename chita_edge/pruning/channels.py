"""Channel-structured CHITA: channel groups mapped into the flat weight vector w, the solve, and baselines.

The solver (``chita_edge.solvers.group_chita``) sees only G, w_bar and a ``Groups`` incidence; this module
builds that incidence from a model and writes solutions back:

* ``channel_structure(model, example_input)``: one family per prunable channel space of
  ``chita_edge.graph.channels.channel_groups`` (a conv's output channels with the matching BatchNorm entries, depthwise
  filters and the input slice of every consumer; residual streams are one family), one group per channel. The
  groups' coordinates are the producers' output slices, the depthwise slices and the consumers' input slices
  (``graph.channels.channel_weight_indices``), mapped to offsets in w. w holds every Conv/Linear weight (biases and
  BatchNorm are not in w).
* ``apply_keep(model, cs, keep)``: zero every weight of a removed channel *and* its producers' biases and its
  BatchNorm gamma/beta, so that the channel is exactly zero everywhere and ``graph.compact.compact_model`` removes it;
  ``zero_block`` removes a whole residual block; ``alive_channels`` reads which channels are left.
* ``StructuredConfig``, ``gradients``, ``channel_saliency``, ``solve_groups(...)``: one structured CHITA solve
  (group IHT + backsolve) at the current weights, written back.
* ``reestimate_bn``: BatchNorm statistics re-estimated on a few training batches after channels moved.
* Data-free baseline criteria (``l1_filter_norms``, ``l2_filter_norms``) and the widths a family may have
  (``round_width``, ``allowed_widths``).

Block (1x4) pruning is in ``chita_edge.pruning.blocks``, the layer-wise re-fit in ``chita_edge.pruning.refit``,
the removal-cost curves in ``chita_edge.pruning.probes``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, check_finite, check_seed
from chita_edge.graph.channels import (
    BlockedGroup,
    ChannelGroupSpec,
    blocked_summary,
    channel_report,
    channel_weight_indices,
)
from chita_edge.graph.residual import ResidualBlock
from chita_edge.pruning.batchnorm import keyed_generator, reestimate_if_better
from chita_edge.pruning.defaults import DEFAULTS
from chita_edge.pruning.gradients import collect_gradients
from chita_edge.pruning.layers import PrunableParam, find_prunable, flatten_weights, num_weights, set_weights
from chita_edge.solvers.chita import backsolve, objective
from chita_edge.solvers.group_chita import (
    Groups,
    coordinate_mask,
    group_chita,
    group_removal_cost,
    group_sq_norms,
    select_groups,
)

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]

_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SOLVERS = ("chita", "bso", "select")


def conv_linear(module: nn.Module, name: str) -> bool:
    """Every Conv/Linear weight: the w of structured pruning (all producers and consumers of a channel)."""
    return isinstance(module, _CONV_LINEAR)


# --------------------------------------------------------------------------------------------------------------
# Channel structure


@dataclass(frozen=True)
class ChannelStructure:
    """The channel groups of a model as solver data. Family f is ``specs[f]``; its channel c is group
    ``first[f] + c``. ``blocked``: the channel spaces that cannot be pruned, with the module and op that block
    each (``BlockedGroup.to_json`` for a report)."""

    params: tuple[PrunableParam, ...]
    specs: tuple[ChannelGroupSpec, ...]
    groups: Groups
    first: tuple[int, ...]
    blocked: tuple[BlockedGroup, ...] = ()

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.specs]

    @property
    def sizes(self) -> dict[str, int]:
        return {s.id: s.size for s in self.specs}

    def channels(self, f: int) -> slice:
        return slice(self.first[f], self.first[f] + self.specs[f].size)

    def widths(self, keep: torch.Tensor) -> dict[str, int]:
        """Kept channels per family for a keep mask over groups."""
        return {s.id: int(keep[self.channels(f)].sum()) for f, s in enumerate(self.specs)}

    def k(self, widths: dict[str, int]) -> torch.Tensor:
        return torch.tensor([int(widths.get(s.id, s.size)) for s in self.specs], dtype=torch.long)

    def keep_from_plan(self, keep_lists: dict[str, list[int]]) -> torch.Tensor:
        keep = torch.ones(self.groups.num_groups, dtype=torch.bool)
        for f, s in enumerate(self.specs):
            if s.id in keep_lists:
                sl = self.channels(f)
                keep[sl] = False
                keep[torch.tensor(keep_lists[s.id], dtype=torch.long) + sl.start] = True
        return keep


def channel_structure(model: nn.Module, example_input: Any,
                      filter_fn: Callable[[nn.Module, str], bool] = conv_linear) -> ChannelStructure:
    """Channel groups of ``model`` over the flat vector of every weight accepted by ``filter_fn``.

    A channel space with a member outside ``filter_fn`` cannot be represented in w and is left out (logged, and
    listed in ``blocked``). Raises ``BadInput`` naming the module and op that block each channel space when
    nothing is prunable by channels.
    """
    params = find_prunable(model, filter_fn)
    by_name = {q.name: q for q in params}
    specs, families = [], []
    found, blocked = channel_report(model, example_input)
    for spec in found:
        missing = [m for m in spec.members if m.kind in ("out", "in", "dw") and m.param not in by_name]
        if missing:
            log.info("channel group %s left out: %s is not a prunable weight", spec.id, missing[0].param)
            blocked.append(BlockedGroup(spec.id, spec.size, tuple(m.module for m in spec.producers),
                                        missing[0].module, f"{missing[0].kind} member",
                                        f"{missing[0].param} is not a prunable weight"))
            continue
        chans = []
        for c in range(spec.size):
            idx = channel_weight_indices(spec, c)
            chans.append(torch.cat([by_name[name].offset + t for name, t in idx.items()]))
        specs.append(spec)
        families.append(chans)
    if not specs:
        raise BadInput(f"{type(model).__name__}: no prunable channel groups: {blocked_summary(blocked)}; "
                       "use --structure unstructured or block")
    groups = Groups.from_lists(num_weights(params), families)
    first, acc = [], 0
    for s in specs:
        first.append(acc)
        acc += s.size
    return ChannelStructure(tuple(params), tuple(specs), groups, tuple(first), tuple(blocked))



# --------------------------------------------------------------------------------------------------------------
# Writing a selection back


@torch.no_grad()
def apply_keep(model: nn.Module, cs: ChannelStructure, keep: torch.Tensor) -> None:
    """Zero every weight of the removed channels (coordinates in w) and their producers' / depthwise biases,
    BatchNorm gamma and beta and layer-scale entries, so that a removed channel is exactly zero and
    ``compact_model`` drops it."""
    params = list(cs.params)
    w = flatten_weights(model, params)
    w[cs.groups.coordinates(~keep)] = 0.0
    set_weights(model, params, w)
    mods = dict(model.named_modules())
    for f, spec in enumerate(cs.specs):
        gone = (~keep[cs.channels(f)]).nonzero().squeeze(1)
        if gone.numel() == 0:
            continue
        for m in spec.members:
            rows = (m.offset + gone.view(-1, 1) * m.repeat + torch.arange(m.repeat).view(1, -1)).reshape(-1)
            if m.kind == "scale":  # a per-channel parameter (layer scale): a removed channel's entries are zero
                owner, _, attr = m.module.rpartition(".")
                getattr(mods[owner], attr)[rows] = 0.0
                continue
            mod = mods[m.module]
            if m.kind in ("out", "dw") and getattr(mod, "bias", None) is not None:
                mod.bias[rows] = 0.0
            elif m.kind == "bn":
                for pname in ("weight", "bias"):
                    t = getattr(mod, pname, None)
                    if t is not None:
                        t[rows] = 0.0


@torch.no_grad()
def zero_block(model: nn.Module, block: ResidualBlock) -> None:
    """Mark a residual block removed (f := 0): zero every Conv/Linear weight and bias and every BatchNorm gamma
    and beta of its branch, so that ``graph.compact.compact_model`` drops the block and ``layerwise_refit`` (zero
    rows stay zero) keeps it dropped."""
    mods = dict(model.named_modules())
    for name in block.modules:
        m = mods[name]
        for pname in ("weight", "bias"):
            t = getattr(m, pname, None)
            if isinstance(t, torch.Tensor):
                t.zero_()



def alive_channels(model: nn.Module, cs: ChannelStructure) -> torch.Tensor:
    """Channels whose coordinates are not all zero (a removed channel has every weight zero)."""
    w = flatten_weights(model, list(cs.params))
    return group_sq_norms(w.double(), cs.groups) > 0


# --------------------------------------------------------------------------------------------------------------
# Solving


@dataclass(frozen=True, kw_only=True)
class StructuredConfig:
    """Knobs of structured CHITA (the paper's symbols where it has them)."""

    n_grads: int = DEFAULTS["n_grads"]  # n: rows of G
    fisher_batch: int = DEFAULTS["fisher_batch"]  # m: samples per row
    l2: float = DEFAULTS["l2"]  # lam = l2 * n / 2
    solver: str = "chita"  # chita: group IHT + backsolve; bso: the given selection + backsolve; select: zero only
    max_iter: int = 60
    active_set: bool = True
    bn_batches: int = 16  # BatchNorm re-estimation after every stage (0: off)
    bn_batch_size: int = 64
    seed: int = DEFAULTS["seed"]
    dtype: str = DEFAULTS["dtype"]  # G and the solve

    def validate(self) -> None:
        check_finite(self, {"l2": "--l2"})
        check_seed(self.seed)
        if self.solver not in SOLVERS:
            raise BadInput(f"solver {self.solver!r}: expected one of {', '.join(SOLVERS)}")
        if self.n_grads < 1 or self.fisher_batch < 1:
            raise BadInput("--grads and --fisher-batch must be >= 1")
        if not self.l2 > 0:
            raise BadInput(f"--l2 {self.l2}: expected > 0")
        if self.dtype not in ("float32", "float64"):
            raise BadInput(f"dtype {self.dtype!r}: expected float32 or float64")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def gradients(model: nn.Module, params: tuple[PrunableParam, ...] | list[PrunableParam], data: Dataset,
              cfg: StructuredConfig, stage: int, progress: Progress | None = None) -> torch.Tensor:
    """G (n x p) at the model's current weights, a fresh sample of the training set per stage."""
    G = collect_gradients(model, list(params), data.x_train, data.y_train, n=cfg.n_grads, m=cfg.fisher_batch,
                          seed=cfg.seed + 7919 * stage, progress=progress)
    return G.to(cfg.torch_dtype)


def channel_saliency(G: torch.Tensor, w: torch.Tensor, cs: ChannelStructure, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z, s): Z[:, g] = G_g w_g and s[g] = 1/2 ||Z[:, g]||^2 + lam ||w_g||^2, the increase of f when channel g
    alone is zeroed without re-fitting (see ``group_removal_cost``)."""
    return group_removal_cost(G, w.to(G.dtype), cs.groups, lam)


def solve_groups(model: nn.Module, params: list[PrunableParam] | tuple[PrunableParam, ...], groups: Groups,
                 k: torch.Tensor, G: torch.Tensor, cfg: StructuredConfig, *, allowed: torch.Tensor | None = None,
                 w0: torch.Tensor | None = None) -> dict[str, Any]:
    """One structured solve at the model's current weights w_bar, written back into the model.

    ``solver="chita"``: ``group_chita`` (group IHT on an active set, warm-started from ``w0``, then the exact
    backsolve on the kept coordinates). ``"bso"``: the kept groups of ``w0`` (else the top-k by norm), then the
    backsolve. ``"select"``: ``w0`` as given (zeroing only, no re-fit; for baselines).
    Returns the solve's figures and ``keep`` (bool over groups). BatchNorm is not touched here.
    """
    params = list(params)
    w_bar = flatten_weights(model, params).to(G.dtype)
    lam = cfg.l2 * G.shape[0] / 2.0

    if cfg.solver == "chita":
        r = group_chita(G, w_bar, groups, k, lam, allowed=allowed, w0=w0, max_iter=cfg.max_iter,
                        active_set=cfg.active_set)
        w, keep = r.w, r.keep
        info = {"objective": r.objective, "iterations": r.iterations, "rounds": r.active_set_rounds,
                "converged": r.converged}
    else:
        if w0 is not None:
            keep = group_sq_norms(w0.to(G.dtype), groups) > 0
        else:
            keep = select_groups(group_sq_norms(w_bar, groups), groups, k, allowed)
        mask = coordinate_mask(keep, groups)
        w = backsolve(G, w_bar, mask, lam) if cfg.solver == "bso" else torch.where(mask, w_bar, torch.zeros_like(w_bar))
        info = {"objective": objective(G, w, w_bar, lam)}
    info["objective_dense"] = 0.0
    info["objective_selection"] = objective(G, torch.where(coordinate_mask(keep, groups), w_bar,
                                                           torch.zeros_like(w_bar)), w_bar, lam)
    if not torch.isfinite(w).all():
        raise FloatingPointError("structured solver produced non-finite weights; try a larger --l2")
    set_weights(model, params, w.to(torch.float32))
    info["keep"] = keep
    return info


def reestimate_bn(model: nn.Module, data: Dataset, cfg: StructuredConfig, stage: int = 0) -> dict[str, Any] | None:
    """BatchNorm running statistics re-estimated on ``cfg.bn_batches`` random training batches after channels moved,
    kept only if they lower the loss on training inputs held out from the re-estimation (``reestimate_if_better``).
    None: no BatchNorm, or re-estimation off."""
    if cfg.bn_batches <= 0:
        return None
    perm = torch.randperm(len(data.x_train), generator=keyed_generator(cfg.seed + 104729 + stage, -1))
    n = min(len(perm), cfg.bn_batches * cfg.bn_batch_size)
    return reestimate_if_better(model, data.x_train, data.y_train, perm, samples=n, batch_size=cfg.bn_batch_size,
                                batches=cfg.bn_batches)


# --------------------------------------------------------------------------------------------------------------
# Baseline criteria (no data)


def _filter_norms(model: nn.Module, cs: ChannelStructure, order: int) -> torch.Tensor:  # order: 1 or 2
    """Per channel: the L``order`` norm (1 or 2) of its producers' and depthwise output filters, together."""
    params = dict(model.named_parameters())
    out = torch.zeros(cs.groups.num_groups, dtype=torch.float64)
    for f, spec in enumerate(cs.specs):
        acc = torch.zeros(spec.size, dtype=torch.float64)
        for m in spec.members:
            if m.kind in ("out", "dw"):
                # at an offset: after a cat; repeat rows per channel: a grouped conv's whole group
                rows = params[m.param].detach().double().narrow(0, m.offset, spec.size * m.repeat)
                acc += rows.reshape(spec.size, -1).abs().pow(order).sum(1)
        out[cs.channels(f)] = acc if order == 1 else acc.sqrt()
    return out


def l1_filter_norms(model: nn.Module, cs: ChannelStructure) -> torch.Tensor:
    """Per channel: the L1 norm of its producers' output filters (Li et al. 2017, "Pruning Filters for
    Efficient ConvNets"), summed over the producers of a coupled group; depthwise filters count too."""
    return _filter_norms(model, cs, 1)


def l2_filter_norms(model: nn.Module, cs: ChannelStructure) -> torch.Tensor:
    """Per channel: the L2 norm of its producers' (and depthwise) output filters."""
    return _filter_norms(model, cs, 2)


def round_width(width: float, size: int, multiple: int) -> int:
    """The nearest allowed width <= ``width``: a multiple of ``multiple`` (at least one multiple), or ``size``."""
    if width >= size:
        return size
    m = max(1, multiple)
    return int(min(size, max(m, math.floor(width / m) * m)))


def allowed_widths(size: int, multiple: int, block: int | None = None) -> list[int]:
    """Every width a family of ``size`` channels may have: multiples of ``multiple`` below it, and ``size``.

    ``block`` (a runtime's channel block, e.g. ONNX Runtime's NCHWc block of 16 with AVX-512): widths above
    ``block / 2`` that are not a multiple of ``block`` are left out -- the runtime runs them with slower kernels
    and layout reorders, as slow as the next multiple of the block or slower (measured on ResNet20: stage widths
    12/24/48 of 16/32/64 take 0.94x of the dense latency, 8/16/32 0.52x). The narrowest width always stays."""
    m = max(1, multiple)
    ws = sorted(set(list(range(m, size, m)) + [size]))
    if block and block > 1:
        ws = [w for w in ws if w == ws[0] or w == size or w <= block // 2 or w % block == 0]
    return ws


__all__ = [
    "SOLVERS",
    "ChannelStructure",
    "Progress",
    "StructuredConfig",
    "allowed_widths",
    "alive_channels",
    "apply_keep",
    "channel_saliency",
    "channel_structure",
    "conv_linear",
    "gradients",
    "l1_filter_norms",
    "l2_filter_norms",
    "reestimate_bn",
    "round_width",
    "solve_groups",
    "zero_block",
]
