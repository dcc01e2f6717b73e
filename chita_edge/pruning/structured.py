"""Model plumbing for structured CHITA: channel and block groups mapped into the flat weight vector w.

The solver (``chita_edge.solvers.group_chita``) sees only G, w_bar and a ``Groups`` incidence; this module
builds that incidence from a model and writes solutions back:

* ``channel_structure(model, example_input)``: one family per prunable channel space of
  ``chita_edge.graph.structure.channel_groups`` (a conv's output channels with the matching BatchNorm entries, depthwise
  filters and the input slice of every consumer; residual streams are one family), one group per channel. The
  groups' coordinates are the producers' output slices, the depthwise slices and the consumers' input slices
  (``structure.channel_weight_indices``), mapped to offsets in w. w holds every Conv/Linear weight (biases and
  BatchNorm are not in w).
* ``block_structure(params, ...)``: 1x4 (or 4x1) blocks inside Linear weights, the layout TFLite's sparse
  FULLY_CONNECTED kernel reads; one family per layer or one for all.
* ``apply_keep(model, cs, keep)``: zero every weight of a removed channel *and* its producers' biases and its
  BatchNorm gamma/beta, so that the channel is exactly zero everywhere and ``structure.compact_model`` removes it.
* ``solve_groups(...)``: one structured CHITA solve (group IHT + backsolve) at the current weights, written back.
* ``reestimate_bn``: BatchNorm statistics re-estimated on a few training batches after channels moved.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput
from chita_edge.graph.structure import ChannelGroupSpec, ResidualBlock, channel_groups, channel_weight_indices
from chita_edge.pruning.batchnorm import reestimate_on_random_batches
from chita_edge.pruning.gradients import collect_gradients
from chita_edge.pruning.layers import PrunableParam, find_prunable, flatten_weights, num_weights, set_weights
from chita_edge.pruning.schedule import cubic_schedule
from chita_edge.solvers.group_chita import (
    Groups,
    coordinate_mask,
    group_chita,
    group_removal_cost,
    group_sq_norms,
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
    ``first[f] + c``."""

    params: tuple[PrunableParam, ...]
    specs: tuple[ChannelGroupSpec, ...]
    groups: Groups
    first: tuple[int, ...]

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

    A channel space with a member outside ``filter_fn`` cannot be represented in w and is left out (logged).
    Raises ``BadInput`` when nothing is prunable by channels.
    """
    params = find_prunable(model, filter_fn)
    by_name = {q.name: q for q in params}
    specs, families = [], []
    for spec in channel_groups(model, example_input):
        missing = [m.param for m in spec.members if m.kind in ("out", "in", "dw") and m.param not in by_name]
        if missing:
            log.info("channel group %s left out: %s is not a prunable weight", spec.id, missing[0])
            continue
        chans = []
        for c in range(spec.size):
            idx = channel_weight_indices(spec, c)
            chans.append(torch.cat([by_name[name].offset + t for name, t in idx.items()]))
        specs.append(spec)
        families.append(chans)
    if not specs:
        raise BadInput(f"{type(model).__name__}: no prunable channel groups (every channel space reaches the "
                       "model output, a concat or an unsupported op); use --structure unstructured or block")
    groups = Groups.from_lists(num_weights(params), families)
    first, acc = [], 0
    for s in specs:
        first.append(acc)
        acc += s.size
    return ChannelStructure(tuple(params), tuple(specs), groups, tuple(first))


def block_structure(params: list[PrunableParam], model: nn.Module, *, block: tuple[int, int] = (1, 4),
                    per_layer: bool = True) -> tuple[Groups, list[str]]:
    """Blocks of ``block = (rows, cols)`` inside every Linear weight (out, in) as groups; (1, 4) is the layout of
    TFLite's sparse FULLY_CONNECTED kernel. Returns (groups, family names): one family per Linear layer, or one
    family ``"all"`` when ``per_layer`` is False. Partial blocks at the edges are groups too. Non-Linear
    weights are in no group (never pruned).
    """
    br, bc = block
    if br < 1 or bc < 1:
        raise BadInput(f"block {block}: expected positive sizes such as (1, 4) or (4, 1)")
    mods = dict(model.named_modules())
    families: list[list[torch.Tensor]] = []
    names: list[str] = []
    for q in params:
        if not isinstance(mods.get(q.module_name), nn.Linear):
            continue
        rows, cols = q.shape
        ids = torch.arange(rows * cols).view(rows, cols) + q.offset
        blocks = [ids[r:r + br, c:c + bc].reshape(-1) for r in range(0, rows, br) for c in range(0, cols, bc)]
        if per_layer or not families:
            families.append(blocks)
            names.append(q.module_name if per_layer else "all")
        else:
            families[0].extend(blocks)
    if not families:
        raise BadInput("block structure: the model has no Linear (fully connected) layer to prune in blocks")
    return Groups.from_lists(num_weights(params), families), names


# --------------------------------------------------------------------------------------------------------------
# Writing a selection back


@torch.no_grad()
def apply_keep(model: nn.Module, cs: ChannelStructure, keep: torch.Tensor) -> None:
    """Zero every weight of the removed channels (coordinates in w) and their producers' / depthwise biases and
    BatchNorm gamma and beta, so that a removed channel is exactly zero and ``compact_model`` drops it."""
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
            mod = mods[m.module]
            rows = (gone.view(-1, 1) * m.repeat + torch.arange(m.repeat).view(1, -1)).reshape(-1)
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
    and beta of its branch, so that ``structure.compact_model`` drops the block and ``layerwise_refit`` (zero
    rows stay zero) keeps it dropped."""
    mods = dict(model.named_modules())
    for name in block.modules:
        m = mods[name]
        for pname in ("weight", "bias"):
            t = getattr(m, pname, None)
            if isinstance(t, torch.Tensor):
                t.zero_()


def _log_probs(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """Log-softmax of ``model``'s outputs on ``x`` (float64), in batches."""
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).double().log_softmax(1)


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


def alive_channels(model: nn.Module, cs: ChannelStructure) -> torch.Tensor:
    """Channels whose coordinates are not all zero (a removed channel has every weight zero)."""
    w = flatten_weights(model, list(cs.params))
    return group_sq_norms(w.double(), cs.groups) > 0


# --------------------------------------------------------------------------------------------------------------
# Solving


@dataclass(frozen=True, kw_only=True)
class StructuredConfig:
    """Knobs of structured CHITA (the paper's symbols where it has them)."""

    n_grads: int = 500  # n: rows of G
    fisher_batch: int = 1  # m: samples per row
    l2: float = 1e-3  # lam = l2 * n / 2
    solver: str = "chita"  # chita: group IHT + backsolve; bso: the given selection + backsolve; select: zero only
    max_iter: int = 60
    active_set: bool = True
    bn_batches: int = 16  # BatchNorm re-estimation after every stage (0: off)
    bn_batch_size: int = 64
    seed: int = 0
    dtype: str = "float32"  # G and the solve; float64 doubles time and memory

    def validate(self) -> None:
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
    from chita_edge.solvers.chita import backsolve, objective

    if cfg.solver == "chita":
        r = group_chita(G, w_bar, groups, k, lam, allowed=allowed, w0=w0, max_iter=cfg.max_iter,
                        active_set=cfg.active_set)
        w, keep = r.w, r.keep
        info = {"objective": r.objective, "iterations": r.iterations, "rounds": r.active_set_rounds,
                "converged": r.converged}
    else:
        from chita_edge.solvers.group_chita import select_groups

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


def reestimate_bn(model: nn.Module, data: Dataset, cfg: StructuredConfig, stage: int = 0) -> bool:
    """BatchNorm running statistics re-estimated on ``cfg.bn_batches`` training batches (no-op without BN)."""
    if cfg.bn_batches <= 0:
        return False
    return reestimate_on_random_batches(model, data.x_train, batches=cfg.bn_batches, batch_size=cfg.bn_batch_size,
                                        seed=cfg.seed + 104729 + stage)


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """Block-sparse pruning of Linear weights (TFLite's sparse FULLY_CONNECTED layout) to a sparsity."""

    sparsity: float  # fraction of the blocked (Linear) weights set to zero
    block: tuple[int, int] = (1, 4)
    stages: int = 5  # cubic schedule from 0.1, G recomputed at each stage
    n_grads: int = 1000
    fisher_batch: int = 1
    l2: float = 1e-3
    max_iter: int = 100
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise BadInput(f"--sparsity {self.sparsity}: expected a fraction in [0, 1)")
        if self.stages < 1 or self.n_grads < 1 or self.fisher_batch < 1 or not self.l2 > 0:
            raise BadInput("--stages, --grads and --fisher-batch must be >= 1 and --l2 > 0")


def prune_blocks(model: nn.Module, data: Dataset, cfg: BlockConfig, filter_fn: Callable[[nn.Module, str], bool] = conv_linear,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Prune every Linear weight in ``cfg.block`` blocks with structured CHITA (one global family of blocks),
    in place. Stage t keeps k_t blocks (cubic schedule), G recomputed at the current weights, blocks removed
    at an earlier stage stay removed. Returns the per-stage objectives and the block sparsity reached."""
    cfg.validate()
    from chita_edge.solvers.group_chita import select_groups

    params = find_prunable(model, filter_fn)
    groups, _ = block_structure(params, model, block=cfg.block, per_layer=False)
    nb = groups.num_groups
    scfg = StructuredConfig(n_grads=cfg.n_grads, fisher_batch=cfg.fisher_batch, l2=cfg.l2, max_iter=cfg.max_iter,
                            seed=cfg.seed, dtype="float64", bn_batches=0)
    alive = torch.ones(nb, dtype=torch.bool)
    stages = []
    for t, s in enumerate(cubic_schedule(cfg.sparsity, cfg.stages, 0.1)):
        k = torch.tensor([int(math.floor((1.0 - s) * nb))])
        G = gradients(model, params, data, scfg, t, progress=progress)
        w = flatten_weights(model, params).to(G.dtype)
        keep0 = select_groups(group_sq_norms(w, groups), groups, k, alive)
        w0 = torch.where(coordinate_mask(keep0, groups), w, torch.zeros_like(w))
        info = solve_groups(model, params, groups, k, G, scfg, allowed=alive, w0=w0)
        alive = info.pop("keep")
        stages.append({"stage": t, "sparsity": s, "blocks_kept": int(alive.sum()), **info})
        if progress:
            progress("stages", t + 1, cfg.stages)
    w = flatten_weights(model, params)
    blocked = coordinate_mask(torch.zeros(nb, dtype=torch.bool), groups) == 0
    zero = float((w[blocked] == 0).double().mean())
    return {"blocks": nb, "blocks_kept": int(alive.sum()), "block": list(cfg.block), "sparsity": zero,
            "stages": stages}


# --------------------------------------------------------------------------------------------------------------
# Layer-wise form: statistics of each layer's inputs, group-OBS removal curves, sequential re-fit


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of its weight's columns: im2col for Conv2d (column c*kh*kw + j), features for Linear."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        cols = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise BadInput(f"layer-wise re-fit supports Conv2d (zero padding) and Linear layers, not {type(mod).__name__}")


def _refittable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1
                                          and mod.padding_mode == "zeros" and not isinstance(mod.padding, str))


def _gram(mod: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor | None]:
    """H = X^T X and C = X^T Y (float64), accumulated over batches and row chunks."""
    H: torch.Tensor | None = None
    C: torch.Tensor | None = None
    for i, x in enumerate(xs):
        X = _columns(mod, x)
        Y = _columns(mod, ys[i]) if ys is not None else None
        for s in range(0, X.shape[0], chunk):  # float32 products per chunk, float64 sums
            xb = X[s:s + chunk].float()
            h = (xb.T @ xb).double()
            H = h if H is None else H + h
            if Y is not None:
                c = (xb.T @ Y[s:s + chunk].float()).double()
                C = c if C is None else C + c
    assert H is not None
    return H, C


def _output_sq_norm(mod: nn.Module, xs: list[torch.Tensor], W: torch.Tensor, chunk: int = 8192) -> float:
    """||X W^T||^2 (float64 sum) over the layer inputs ``xs``; W is (out, q) in the layout of ``_columns``."""
    total = 0.0
    Wt = W.T.float()
    for x in xs:
        X = _columns(mod, x)
        for s in range(0, X.shape[0], chunk):
            total += float((X[s:s + chunk].float() @ Wt).double().pow(2).sum())
    return total


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor, batch: int = 128) -> dict[str, list[torch.Tensor]]:
    """The inputs of the named modules on ``x`` (eval mode), per batch."""
    mods = dict(model.named_modules())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: out[n].append(a[0].detach())) for n in names]
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return out


class LayerStats:
    """Statistics of the layer-wise problems on fixed calibration inputs ``x``, shared across stages.

    ``dense_inputs[name]``: each Conv2d/Linear's input in the dense model (computed once);
    ``dense_gram[name]`` = X_d^T X_d (once); ``gram[name]`` = X_p^T X_p of the current pruned model, filled in by
    ``layerwise_refit`` (after a re-fit, layer l's inputs no longer change until the next stage) so that the
    next stage's ``removal_curves`` need not recompute it.
    """

    def __init__(self, dense: nn.Module, x: torch.Tensor, batch: int = 256, names: list[str] | None = None):
        self.x = x
        self.names = [n for n, m in dense.named_modules() if _refittable(m) and (names is None or n in names)]
        self.dense_modules = dict(dense.named_modules())
        self.dense_inputs = layer_inputs(dense, self.names, x, batch)
        self.dense_gram: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}

    def dense_H(self, name: str) -> torch.Tensor:
        if name not in self.dense_gram:
            self.dense_gram[name] = _gram(self.dense_modules[name], self.dense_inputs[name])[0]
        return self.dense_gram[name]


@torch.no_grad()
def removal_curves(model: nn.Module, cs: ChannelStructure, x: torch.Tensor, alive: torch.Tensor, *,
                   min_width: dict[str, int], damp: float = 0.01, batch: int = 128,
                   stats: LayerStats | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per channel group: the greedy group-OBS removal order of its alive channels and the cumulative cost.

    The cost of a channel is the relative output error it causes in every consumer after the consumer's
    optimal re-fit (``obs_removal_order``), each consumer weighted by 1 / its output energy on ``x``.
    ``stats`` (optional) supplies the consumers' Gram matrices where already known.
    """
    from chita_edge.solvers.group_chita import obs_removal_order

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
            b = Wl.shape[1] // spec.size
            blocks.append(torch.arange(spec.size).view(-1, 1) * b + torch.arange(b).view(1, -1))
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
    ``probes[f]``), re-fit its consumers (``layer_backsolve`` with the current Gram matrices: the OBS update),
    and measure the KL divergence of the model's outputs on ``x`` from the current model's. Between probes the
    cost is interpolated linearly (0 at k = 0). Per-layer relative errors are not comparable across layers; the
    output divergence is, so the width search can trade one group against another.
    """
    from chita_edge.solvers.group_chita import layer_backsolve

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
        saved = {m.module: mods[m.module].weight.detach().clone() for m in spec.consumers}
        for k in ks:
            trial = copy.deepcopy(model)
            tmods = dict(trial.named_modules())
            keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
            keep[order[:k]] = False
            apply_keep(trial, cs, keep)
            for m in spec.consumers:
                mod = tmods[m.module]
                W = saved[m.module].reshape(saved[m.module].shape[0], -1).double()
                Wz = mod.weight.detach().reshape(W.shape)
                H = stats.gram.get(m.module)
                if H is None:
                    H = _gram(mod, layer_inputs(model, [m.module], x, batch)[m.module])[0]
                    stats.gram[m.module] = H
                lam = damp * float(H.diagonal().mean()) + 1e-12
                Wn = layer_backsolve(H, H, W, Wz.abs().sum(0) > 0, lam)
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


@torch.no_grad()
def layerwise_refit(model: nn.Module, dense: nn.Module, x: torch.Tensor, *, damp: float = 0.01,
                    stats: LayerStats | None = None, elementwise: bool = False) -> dict[str, float]:
    """Sequentially re-fit every Conv2d (groups 1) and Linear of ``model`` so that, on ``x``, its output matches
    the dense model's output of the same layer (``layer_backsolve`` with the pruned inputs X_p and the dense
    target X_d W_dense^T). Zero columns (removed input channels) and zero rows (removed outputs) stay zero.
    Layers are re-fitted in execution order, each seeing the already re-fitted layers before it. Returns the
    relative output error of each layer after the re-fit (on ``x``). ``stats`` (same ``x``) caches the dense
    side and receives the current Gram matrices. ``elementwise``: every zero weight stays zero and each output
    row is re-fitted on its own support (unstructured or block sparsity; ``masked_layer_backsolve``)."""
    from chita_edge.solvers.group_chita import layer_backsolve, masked_layer_backsolve

    st = stats if stats is not None else LayerStats(dense, x)
    dmods = st.dense_modules
    errs: dict[str, float] = {}
    mods = dict(model.named_modules())

    def pre(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> None:
        if dmods[name].weight.shape != mod.weight.shape:
            return
        Wc = mod.weight.detach().reshape(mod.weight.shape[0], -1)
        Wd = dmods[name].weight.detach().reshape(Wc.shape[0], -1).double()
        H, C = _gram(mod, [args[0]], [torch.cat(st.dense_inputs[name])])
        assert C is not None
        st.gram[name] = H
        keep = Wc.abs().sum(0) > 0
        rows = Wc.abs().sum(1) > 0
        lam = damp * float(H.diagonal().mean()) + 1e-12
        if elementwise:
            Wn = masked_layer_backsolve(H, C, Wd, Wc != 0, lam)
        else:
            Wn = layer_backsolve(H, C, Wd, keep, lam)
            Wn[~rows] = 0.0
        target = _output_sq_norm(mod, st.dense_inputs[name], Wd)  # ||X_d Wd^T||^2, cheaper than X_d^T X_d

        def err(Wx: torch.Tensor) -> float:  # ||X_p Wx^T - X_d Wd^T||^2 = tr(Wx H Wx^T) - 2 tr(Wx C Wd^T) + |Y|^2
            return float(torch.einsum("oi,ij,oj->", Wx, H, Wx) - 2 * torch.einsum("oi,ij,oj->", Wx, C, Wd) + target)

        before, after = err(Wc.double()), err(Wn)
        if after < before:
            mod.weight.copy_(Wn.reshape(mod.weight.shape).to(mod.weight.dtype))
        errs[name] = min(after, before) / max(target, 1e-30)

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)) for n in st.names if n in mods]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return errs


# --------------------------------------------------------------------------------------------------------------
# Baseline criteria (no data)


def l1_filter_norms(model: nn.Module, cs: ChannelStructure) -> torch.Tensor:
    """Per channel: the L1 norm of its producers' output filters (Li et al. 2017, "Pruning Filters for
    Efficient ConvNets"), summed over the producers of a coupled group; depthwise filters count too."""
    params = dict(model.named_parameters())
    out = torch.zeros(cs.groups.num_groups, dtype=torch.float64)
    for f, spec in enumerate(cs.specs):
        acc = torch.zeros(spec.size, dtype=torch.float64)
        for m in spec.members:
            if m.kind in ("out", "dw"):
                wt = params[m.param].detach().double()
                acc += wt.reshape(spec.size, -1).abs().sum(1)
        out[cs.channels(f)] = acc
    return out


def l2_filter_norms(model: nn.Module, cs: ChannelStructure) -> torch.Tensor:
    """Per channel: the L2 norm of its producers' (and depthwise) output filters."""
    params = dict(model.named_parameters())
    out = torch.zeros(cs.groups.num_groups, dtype=torch.float64)
    for f, spec in enumerate(cs.specs):
        acc = torch.zeros(spec.size, dtype=torch.float64)
        for m in spec.members:
            if m.kind in ("out", "dw"):
                acc += params[m.param].detach().double().reshape(spec.size, -1).pow(2).sum(1)
        out[cs.channels(f)] = acc.sqrt()
    return out


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
    "LayerStats",
    "probe_curves",
    "BlockConfig",
    "prune_blocks",
    "layer_inputs",
    "layerwise_refit",
    "removal_curves",
    "ChannelStructure",
    "StructuredConfig",
    "allowed_widths",
    "alive_channels",
    "apply_keep",
    "block_costs",
    "block_structure",
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
