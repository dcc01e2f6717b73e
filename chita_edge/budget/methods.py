"""One stage of a budget method: choose widths for the stage's targets, pick the channels, write them back.

``run_stage`` does what every method shares (the calibration images, writing the kept channels and removed
residual blocks back, the layer-wise re-fit, BatchNorm re-estimation, the stage's record); the choice of the
widths and channels is one function per method in ``STAGE_METHODS``:

* ``chita-layerwise``: group-OBS removal curves on the layer-wise CHITA quadratic, probed by the output divergence,
  residual blocks as moves, the NetAdapt-style greedy (``greedy_widths``);
* ``chita-fisher``: the paper's global G (mini-batch gradients), the joint no-refit saliency for the greedy,
  then group IHT + backsolve at the chosen widths (``solve_groups``);
* ``l1-uniform``: the largest common kept fraction, channels by the L1 norm of their filters;
* ``norm-global``: channels removed in increasing order of their filters' L2 norm across all layers.

Also the search's mutable state (``SearchState``: alive channels, removed blocks, the stage counter) and its
snapshots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from chita_edge.budget.config import BudgetConfig, Progress, min_widths, resolve_block
from chita_edge.budget.costmodel import CostModel
from chita_edge.budget.criteria import (
    BlockMoves,
    ChitaCriterion,
    CurveCriterion,
    NormCriterion,
    greedy_widths,
    uniform_widths,
)
from chita_edge.core.data import Dataset
from chita_edge.graph.residual import ResidualBlock
from chita_edge.pruning.channels import (
    ChannelStructure,
    StructuredConfig,
    allowed_widths,
    apply_keep,
    channel_saliency,
    gradients,
    l1_filter_norms,
    l2_filter_norms,
    reestimate_bn,
    solve_groups,
    zero_block,
)
from chita_edge.pruning.gradients import check_memory
from chita_edge.pruning.layers import flatten_weights, num_weights
from chita_edge.pruning.probes import block_costs, probe_curves, removal_curves
from chita_edge.pruning.refit import LayerStats, layerwise_refit
from chita_edge.solvers.group_chita import coordinate_mask, group_sq_norms, select_groups

log = logging.getLogger(__name__)


@dataclass
class SearchState:
    """The search's mutable state: alive channels, removed blocks, stage counter; snapshots for relaxing."""

    alive: torch.Tensor
    dropped: set[str]
    stage_no: int = 0
    no_new_blocks: bool = False  # this stage may narrow widths only (``BudgetConfig.width_first``)

    def snapshot(self, model: nn.Module, stats: LayerStats | None) -> dict[str, Any]:
        return {"sd": {k: v.detach().clone() for k, v in model.state_dict().items()}, "alive": self.alive.clone(),
                "dropped": set(self.dropped), "gram": dict(stats.gram) if stats is not None else None}

    def restore(self, model: nn.Module, stats: LayerStats | None, snap: dict[str, Any]) -> None:
        model.load_state_dict(snap["sd"])
        self.alive = snap["alive"].clone()
        self.dropped = set(snap["dropped"])
        if stats is not None and snap["gram"] is not None:
            stats.gram = dict(snap["gram"])


@dataclass
class StageEnv:
    """What every stage of one search shares: the model pruned in place, its dense copy (the re-fit's
    reference) and layer statistics, the data, the channel structure, the (anchored) cost model, the settings,
    the width multiple and the residual blocks the search may remove."""

    model: nn.Module
    dense: nn.Module
    stats: LayerStats | None
    data: Dataset | None
    cs: ChannelStructure
    cm: CostModel
    cfg: BudgetConfig
    scfg: StructuredConfig
    mult: int
    blocks: list[ResidualBlock]
    progress: Progress | None


@dataclass
class _Stage:
    """One stage's inputs, as a method sees them."""

    env: StageEnv
    st: SearchState
    tgt: Mapping[str, float]
    corr: Mapping[str, float]
    alive: torch.Tensor
    gone: set[str]  # channel groups inside removed blocks
    block: int  # the runtime's channel block
    xcal: torch.Tensor | None  # calibration images (None without data)
    rec: dict[str, Any]  # the stage's record; a method adds what it measured


class Choice(NamedTuple):
    """A method's choice: the channels kept, and the residual blocks to remove in this stage."""

    keep: torch.Tensor
    drop: list[ResidualBlock]


def _training_order(data: Dataset, seed: int) -> torch.Tensor:
    """The fixed random order of the training images that calibration and held-out images are taken from."""
    return torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed + 17))


def calibration_images(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` training images (a fixed random subset) for the layer statistics and the re-fit."""
    return data.x_train[_training_order(data, seed)[:n]]


def heldout_images(data: Dataset, n: int, calib: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` training images and labels outside ``calibration_images(data, calib, seed)``: the same
    order's tail, so that a choice between pruned models is not made on the images they were re-fitted to."""
    idx = _training_order(data, seed)[calib:][:n]
    return data.x_train[idx], data.y_train[idx]


def groups_inside(cs: ChannelStructure, dropped: set[str]) -> set[str]:
    """Channel groups every member of which lies inside a removed block (they go with it)."""
    def inside(module: str) -> bool:
        return any(module == b or module.startswith(b + ".") for b in dropped)

    return {s.id for s in cs.specs if dropped and all(inside(m.module) for m in s.members)}


def _chita(s: _Stage) -> Choice:
    env, cfg, cs, model, stats, st = s.env, s.env.cfg, s.env.cs, s.env.model, s.env.stats, s.st
    assert s.xcal is not None
    # Step 3: group-OBS removal curves of every channel group (layer-wise CHITA quadratic, G = inputs X).
    curves = removal_curves(model, cs, s.xcal, s.alive, min_width=min_widths(cs.sizes, env.mult), damp=cfg.damp,
                            stats=stats)
    assert stats is not None
    probes = {}
    for f, spec in enumerate(cs.specs):
        if spec.id in s.gone:  # inside a removed block: nothing to gain
            probes[f] = []
            continue
        w_now = int(s.alive[cs.channels(f)].sum())
        lower = [w for w in allowed_widths(spec.size, env.mult, s.block) if w < w_now]
        if len(lower) > cfg.max_probes:  # spread the probes, always including the narrowest width
            step = (len(lower) - 1) / (cfg.max_probes - 1)
            lower = sorted({lower[round(i * step)] for i in range(cfg.max_probes)})
        probes[f] = [w_now - w for w in lower]
    pcal = s.xcal[: cfg.probe_samples]
    curves = probe_curves(model, cs, pcal, curves, stats, probes=probes, damp=cfg.damp)
    crit = CurveCriterion(cs, s.alive, curves)
    todo = [] if st.no_new_blocks else [b for b in env.blocks if b.id not in st.dropped]
    # a block's cost: the same output divergence, measured with the block removed from the current model (with
    # the "weights" objective the greedy prices every step by the weights it removes instead)
    weights = cfg.objective == "weights"
    costs = [0.0] * len(todo) if weights else block_costs(model, todo, pcal)
    moves = BlockMoves({b.id: c for b, c in zip(todo, costs, strict=True)}, set(st.dropped))
    left = (lambda w, d: float(env.cm.weight_bytes(w, dropped=d)[0])) if weights else None
    widths, steps = greedy_widths(env.cm, cs, crit, s.tgt, s.corr, env.mult, block=s.block, blocks=moves,
                                  weights_left=left)
    new_blocks = sorted(moves.dropped - st.dropped)
    s.rec.update(n_steps=len(steps), block_costs={k: round(v, 6) for k, v in moves.costs.items()},
                 dropped=new_blocks)
    return Choice(crit.alive, [b for b in env.blocks if b.id in moves.dropped and b.id not in st.dropped])


def check_fisher_memory(cs: ChannelStructure, cfg: BudgetConfig) -> int:
    """With ``chita-fisher`` (else 0): its G (n x p float32, and its cast to the solver's dtype) must fit
    ``cfg.memory_gb`` (default: half of the free RAM); refused (BadInput, naming --grads) before any measurement
    or gradient. Returns the bytes."""
    if cfg.method != "chita-fisher":
        return 0
    cap = int(cfg.memory_gb * 2**30) if cfg.memory_gb is not None else None
    dtype = cfg.structured().torch_dtype
    return check_memory(cfg.n_grads, num_weights(list(cs.params)), cap, solver_dtype=dtype,
                        alternative="or --dtype float32" if dtype != torch.float32 else "")


def _chita_fisher(s: _Stage) -> Choice:
    env, cs, model, scfg = s.env, s.env.cs, s.env.model, s.env.scfg
    assert env.data is not None
    params = list(cs.params)
    G = gradients(model, params, env.data, scfg, s.st.stage_no, progress=env.progress)
    w = flatten_weights(model, params).to(G.dtype)
    lam = scfg.l2 * G.shape[0] / 2.0
    Z, _ = channel_saliency(G, w, cs, lam)
    crit = ChitaCriterion(cs, s.alive, Z, group_sq_norms(w.double(), cs.groups), lam)
    widths, steps = greedy_widths(env.cm, cs, crit, s.tgt, s.corr, env.mult, block=s.block)
    k = cs.k(widths)
    w0 = torch.where(coordinate_mask(crit.alive, cs.groups), w, torch.zeros_like(w))
    # Step 4 (global form): group IHT from the greedy selection, then the exact backsolve.
    sol = solve_groups(model, params, cs.groups, k, G, scfg, allowed=s.alive, w0=w0)
    s.rec.update(objective=sol["objective"], objective_selection=sol["objective_selection"],
                 iterations=sol.get("iterations"), n_steps=len(steps))
    del G, Z
    return Choice(sol["keep"], [])


def _l1_uniform(s: _Stage) -> Choice:
    env, cs = s.env, s.env.cs
    widths = uniform_widths(env.cm, cs, s.tgt, s.corr, env.mult, s.block)
    return Choice(select_groups(l1_filter_norms(env.model, cs), cs.groups, cs.k(widths), s.alive), [])


def _norm_global(s: _Stage) -> Choice:
    env, cs = s.env, s.env.cs
    crit = NormCriterion(cs, s.alive, l2_filter_norms(env.model, cs))
    greedy_widths(env.cm, cs, crit, s.tgt, s.corr, env.mult, per_resource=False, block=s.block)
    return Choice(crit.alive, [])


STAGE_METHODS: dict[str, Callable[[_Stage], Choice]] = {
    "chita-layerwise": _chita, "chita-fisher": _chita_fisher, "l1-uniform": _l1_uniform, "norm-global": _norm_global}


def run_stage(env: StageEnv, st: SearchState, tgt: Mapping[str, float], corr: Mapping[str, float],
              info: list[dict[str, Any]]) -> torch.Tensor:
    """Stage ``st.stage_no``: choose widths (and residual blocks to remove) for ``tgt`` and the channels, solve,
    write back; its record goes to ``info``. Returns the new alive mask; removed blocks are added to
    ``st.dropped``."""
    ts = time.perf_counter()
    cfg, model, data = env.cfg, env.model, env.data
    gone = groups_inside(env.cs, st.dropped)
    block = resolve_block(cfg)
    rec: dict[str, Any] = {"stage": st.stage_no, "targets": dict(tgt)}
    xcal = calibration_images(data, cfg.calib_samples, cfg.seed) if data is not None else None
    s = _Stage(env=env, st=st, tgt=tgt, corr=corr, alive=st.alive, gone=gone, block=block, xcal=xcal, rec=rec)
    keep, drop = STAGE_METHODS[cfg.method](s)
    apply_keep(model, env.cs, keep)
    for b in drop:
        zero_block(model, b)  # f := 0; compact_model removes the block
        st.dropped.add(b.id)
    if cfg.do_refit and xcal is not None:
        # Step 4: re-fit every layer to the dense model's outputs (consumers' input slices included).
        errs = layerwise_refit(model, env.dense, xcal, damp=cfg.damp, stats=env.stats)
        rec["refit_error"] = {k: round(v, 5) for k, v in errs.items()}
    if cfg.do_bn and data is not None and cfg.bn_batches > 0 and (bool((~keep).any()) or drop):
        # never when nothing was removed; kept only where it lowers a held-out loss (the record says which)
        rec["batchnorm"] = reestimate_bn(model, data, env.scfg, st.stage_no)
    rec.update(widths=env.cs.widths(keep), seconds=time.perf_counter() - ts, all_dropped=sorted(st.dropped))
    info.append(rec)
    log.info("stage %d: widths %s, residual blocks removed %s", st.stage_no, rec["widths"],
             rec["all_dropped"] or "none")
    return keep
