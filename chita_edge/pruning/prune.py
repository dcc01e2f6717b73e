"""One verb: ``prune(model, PruneConfig, data) -> PruneReport``.

Methods: ``chita`` (single stage), ``chita++`` (multi-stage, gradients recomputed at each stage),
``bso`` (magnitude support + exact backsolve), ``magnitude`` (global), ``magnitude-uniform`` (per layer).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, RuntimeFailure, check_finite, check_seed
from chita_edge.core.evaluate import loss_and_top1
from chita_edge.models.zoo import default_prunable
from chita_edge.pruning import blockwise
from chita_edge.pruning.batchnorm import reestimate_if_better
from chita_edge.pruning.defaults import DEFAULTS
from chita_edge.pruning.distributed import collect_gradients_split
from chita_edge.pruning.gradients import check_memory, gradient_memory_bytes
from chita_edge.pruning.layers import (
    PrunableParam,
    find_prunable,
    flatten_weights,
    layer_sparsity,
    set_weights,
)
from chita_edge.pruning.refit import LayerStats, layerwise_refit
from chita_edge.pruning.safeguard import choose as choose_candidate
from chita_edge.pruning.schedule import cubic_schedule
from chita_edge.solvers import chita as solver

log = logging.getLogger(__name__)

METHODS = ("chita", "chita++", "bso", "magnitude", "magnitude-uniform")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """Knobs of one pruning run (the paper's symbols where it has them)."""

    sparsity: float  # s: fraction of prunable weights set to zero
    method: str = DEFAULTS["method"]
    stages: int = DEFAULTS["stages"]  # T for chita++
    n_grads: int = DEFAULTS["n_grads"]  # n: rows of G
    fisher_batch: int = DEFAULTS["fisher_batch"]  # m: samples per gradient row
    l2: float = DEFAULTS["l2"]  # ridge; lam = l2 * n / 2 (1e-3 in the reference; 0.03 measured better, docs/benchmarks.md)
    # a = (1/m) sum_i g_i. None: on for chita++ (its later stages start from pruned points, which are not
    # minima, so the linear term matters), off otherwise (at the dense optimum it only adds noise).
    first_order: bool | None = None
    keep_pruned: bool = True  # CHITA++: weights pruned at an earlier stage stay zero
    start_sparsity: float = 0.1  # s0 of the cubic schedule
    block_size: int = 0  # > 0: block mode (per-block solves, G streamed by groups of blocks: pruning/blockwise.py)
    # block mode's support: "saliency" (a global threshold over per-block OBS saliencies) or "magnitude" (the
    # reference code's rule: the k largest |w| over the model, then per-block solves)
    block_support: str = DEFAULTS["block_support"]
    # block mode's second pass over G_g: "spill" G_g (float16, scaled per column) to disk in the first pass and
    # read it back (g passes over the data instead of 2g - 1; docs/benchmarks.md, eighth session), or "recompute"
    block_stream: str = "spill"
    max_iter: int = 500
    backsolve_every: int = 3  # IHT: jump to the exact backsolve once the support is stable this many steps
    active_set: bool = True
    bn_recalibrate: bool = True  # after each stage that changed weights: re-estimate BatchNorm statistics, kept
    # only if they lower the loss on held-out training inputs (the stage's report says which were kept)
    bn_rule: str = "if-better"  # "always": keep every re-estimation (the rule before; an ablation)
    # every prunable layer keeps at least ceil(layer_floor * (1 - s) * its size) weights (among the allowed
    # ones) in the unstructured support of magnitude/chita/chita++: a global threshold never empties a layer
    # (docs/benchmarks.md, ninth session, "Layer floor"); 0: off
    layer_floor: float = DEFAULTS["layer_floor"]
    safeguard: bool = True  # keep the best of {update scaled by 1, 1/2, 1/4, 0; magnitude} on training loss
    # (with BatchNorm: the loss after the stage's BatchNorm re-estimation; pruning/safeguard.py)
    # After the last stage, re-fit every pruned Conv2d/Linear on its support so that its outputs match the dense
    # layer's on training images (layer-wise OBS reconstruction, as in OBC/SparseGPT). None: on for the
    # data-driven methods (chita, chita++, bso), off for the magnitude baselines. Kept only if the training
    # loss drops.
    layerwise_refit: bool | None = None
    refit_samples: int = 1024  # calibration images (fewer when their activations would not fit refit_memory_gb)
    refit_damp: float = 0.01  # ridge, relative to the mean diagonal of each layer's X^T X
    refit_memory_gb: float = 2.0
    prune_inert: bool = True  # weights with a zero gradient on every sample are pruned before any other
    tol: float = 1e-7
    seed: int = DEFAULTS["seed"]
    dtype: str = DEFAULTS["dtype"]  # solver precision (G is collected in float32)
    memory_budget_gb: float | None = None

    def validate(self) -> None:
        check_finite(self, {"sparsity": "--sparsity", "l2": "--l2"})
        check_seed(self.seed)
        if self.method not in METHODS:
            raise BadInput(f"--method '{self.method}': expected one of {', '.join(METHODS)}")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise BadInput(f"--sparsity {self.sparsity}: expected a fraction in [0, 1)")
        if self.stages < 1:
            raise BadInput(f"--stages {self.stages}: expected >= 1")
        if self.n_grads < 1 or self.fisher_batch < 1:
            raise BadInput("--grads and --fisher-batch must be >= 1")
        if not self.l2 > 0:
            raise BadInput(f"--l2 {self.l2}: expected > 0")
        if self.block_size < 0:
            raise BadInput(f"--block-size {self.block_size}: expected >= 0 (0: off, > 0: weights per block)")
        if self.block_support not in blockwise.SUPPORTS:
            raise BadInput(f"--block-support {self.block_support!r}: expected one of {', '.join(blockwise.SUPPORTS)}")
        if self.block_stream not in ("recompute", "spill"):
            raise BadInput(f"block_stream {self.block_stream!r}: expected recompute or spill")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise BadInput(f"--memory-gb {self.memory_budget_gb}: expected > 0")
        if self.bn_rule not in ("if-better", "always"):
            raise BadInput(f"bn_rule {self.bn_rule!r}: expected if-better or always")
        if not (0.0 <= self.layer_floor <= 1.0):
            raise BadInput(f"--layer-floor {self.layer_floor}: expected a fraction in [0, 1] (0: off)")
        if self.refit_samples < 1 or not self.refit_damp > 0:
            raise BadInput("refit_samples must be >= 1 and refit_damp > 0")

    @property
    def refit(self) -> bool:
        return self.layerwise_refit if self.layerwise_refit is not None else self.method in ("chita", "chita++", "bso")


@dataclass
class PruneReport:
    method: str
    target_sparsity: float
    sparsity: float
    layer_sparsity: dict[str, float]
    timings: dict[str, float]
    stages: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    refit: dict[str, Any] | None = None  # the layer-wise re-fit after the last stage (None: not run)
    layer_floor: dict[str, Any] | None = None  # {"floor": f, "raised": {layer: weights added back, all stages}}
    note: str | None = None  # why nothing was done, when nothing was

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def keep_count(s: float, p: int) -> int:
    """k = floor((1 - s) p) in floating point, exactly as the CHITA reference computes it (so that
    magnitude pruning reproduces its published accuracies: at s = 0.9, p = 32360 this gives 3235)."""
    return int(math.floor((1.0 - s) * p))


def _magnitude_uniform(w: torch.Tensor, params: list[PrunableParam], s: float, allowed: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros_like(w)
    for q in params:
        sl = q.slice
        k = keep_count(s, q.numel)
        mask = solver.top_k_mask(w[sl].abs(), k, None if allowed is None else allowed[sl])
        out[sl] = torch.where(mask, w[sl], torch.zeros_like(w[sl]))
    return out


def apply_layer_floor(w: torch.Tensor, w_bar: torch.Tensor, params: list[PrunableParam], s: float, floor: float,
                      allowed: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, int]]:
    """Repair the support of ``w`` so that every layer keeps at least ceil(floor * (1 - s) * its size) weights
    (never more than its allowed non-zero entries of ``w_bar``): a layer under its floor gets back its largest
    pruned |w_bar| (dense values), and as many of the smallest kept |w| leave the layers above their floors, so
    the kept count is unchanged. Returns the repaired weights and {layer: weights added back}."""
    if floor <= 0:
        return w, {}
    eligible = w_bar != 0 if allowed is None else (allowed & (w_bar != 0))
    kept = w != 0
    floors, counts = [], []
    for q in params:
        sl = q.slice
        floors.append(min(math.ceil(floor * (1.0 - s) * q.numel), int(eligible[sl].sum())))
        counts.append(int(kept[sl].sum()))
    need = [max(0, f - c) for f, c in zip(floors, counts, strict=True)]
    if not any(need):
        return w, {}
    # the donors: each layer above its floor offers its (kept - floor) smallest kept |w|
    offers, offer_idx = [], []
    for q, f, c in zip(params, floors, counts, strict=True):
        if c > f:
            sl = q.slice
            mag = torch.where(kept[sl], w[sl].abs(), torch.full_like(w[sl], float("inf")))
            v, i = torch.topk(mag, c - f, largest=False)
            offers.append(v)
            offer_idx.append(i + q.offset)
    supply = sum(len(v) for v in offers)
    out = w.clone()
    raised: dict[str, int] = {}
    total = 0
    for q, n in zip(params, need, strict=True):
        n = min(n, supply - total)
        if n <= 0:
            continue
        sl = q.slice
        cand = torch.where(eligible[sl] & ~kept[sl], w_bar[sl].abs(), torch.full_like(w_bar[sl], -1.0))
        idx = torch.topk(cand, n).indices + q.offset
        out[idx] = w_bar[idx]
        raised[q.name] = n
        total += n
    if total:
        v, i = torch.cat(offers), torch.cat(offer_idx)
        out[i[torch.topk(v, total, largest=False).indices]] = 0
    return out, raised


def _stage_batchnorm(model: nn.Module, data: Dataset, cfg: PruneConfig, si: int) -> dict[str, Any] | None:
    """The BatchNorm step after stage ``si``: re-estimated statistics, kept only where they lower the loss on
    training inputs the re-estimation did not see (None: no BatchNorm)."""
    perm = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(20_000 + cfg.seed + si))
    return reestimate_if_better(model, data.x_train, data.y_train, perm, samples=2048, batch_size=256,
                                always=cfg.bn_rule == "always")


def _activation_bytes_per_sample(model: nn.Module, names: list[str], x: torch.Tensor) -> int:
    """Bytes of the named modules' inputs for one sample (what the layer-wise re-fit keeps per image)."""
    mods = dict(model.named_modules())
    total = [0]
    hooks = [mods[n].register_forward_pre_hook(lambda m, a: total.__setitem__(0, total[0] + a[0].numel() * 4))
             for n in names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total[0]


def _layerwise_refit(model: nn.Module, dense: nn.Module, params: list[PrunableParam], data: Dataset,
                     cfg: PruneConfig) -> dict[str, Any]:
    """Re-fit the pruned layers to the dense model's layer outputs (dense BatchNorm statistics, which those
    outputs were normalised with); keep the result only if, on training samples the re-fit did not see, the
    loss drops and the top-1 accuracy does not (a lower loss alone can hide fewer correct labels: MLPNet
    chita++ at 95 %, loss 0.303 -> 0.300 but top-1 91.45 -> 91.15 % on the check set, 92.04 -> 91.37 % on test)."""
    names = sorted({q.module_name for q in params})
    per_sample = max(1, _activation_bytes_per_sample(model, names, data.x_train))
    # dense inputs + the pruned model's inputs + im2col/Gram workspace: ~3 copies per sample
    n = int(min(cfg.refit_samples, len(data.x_train), max(16, cfg.refit_memory_gb * 2**30 // (3 * per_sample))))
    idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(30_000 + cfg.seed))[:n]
    x = data.x_train[idx]
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    li = torch.randperm(len(data.x_train), generator=g)
    seen = torch.zeros(len(data.x_train), dtype=torch.bool)
    seen[idx] = True
    li = li[~seen[li]][:2000]
    if len(li) == 0:  # every training sample was used for the re-fit: judge on them
        li = idx[:2000]
    xl, yl = data.x_train[li], data.y_train[li]
    was = model.training
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before, top1_before = loss_and_top1(model, xl, yl)
    dense_bufs = dict(dense.named_buffers())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")) and name in dense_bufs:
                buf.copy_(dense_bufs[name])
    errs = layerwise_refit(model, dense, x, damp=cfg.refit_damp, stats=LayerStats(dense, x, names=names),
                           elementwise=True)
    loss_after, top1_after = loss_and_top1(model, xl, yl)
    kept = loss_after < loss_before and top1_after >= top1_before
    if not kept:
        model.load_state_dict(before)
    model.train(was)
    return {"samples": n, "check_samples": len(li), "loss_before": loss_before, "loss_after": loss_after,
            "top1_before": top1_before, "top1_after": top1_after, "kept": kept, "relative_error": errs}


def _timed_refit(model: nn.Module, dense: nn.Module, params: list[PrunableParam], data: Dataset,
                 cfg: PruneConfig) -> dict[str, Any]:
    t = time.perf_counter()
    return {**_layerwise_refit(model, dense, params, data, cfg), "seconds": time.perf_counter() - t}


def prune_weights(
    model: nn.Module,
    params: list[PrunableParam],
    data: Dataset,
    cfg: PruneConfig,
    progress: Progress | None = None,
    *,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    announce: Callable[[str], None] | None = None,
) -> PruneReport:
    """Prune ``params`` of ``model`` in place to ``cfg.sparsity``; returns the report.

    Block mode (``cfg.block_size > 0`` with a gradient method): ``announce`` gets the memory plan before work
    starts; the finished groups of blocks are saved to ``state_path`` and ``resume=True`` continues from there."""
    cfg.validate()
    t0 = time.perf_counter()
    dtype = getattr(torch, cfg.dtype)
    p = params[-1].offset + params[-1].numel
    nonzero = int(flatten_weights(model, params).count_nonzero())
    if keep_count(cfg.sparsity, p) >= nonzero:
        # nothing to remove: the model is returned untouched (no solve, no re-fit, no BatchNorm re-estimation)
        ls = layer_sparsity(model, params)
        return PruneReport(method=cfg.method, target_sparsity=cfg.sparsity, sparsity=1.0 - nonzero / p,
                           layer_sparsity=ls, timings={"gradients_s": 0.0, "solve_s": 0.0,
                                                       "total_s": time.perf_counter() - t0},
                           config=asdict(cfg), note=f"nothing to prune: {nonzero} of {p} weights are non-zero "
                                                    f"and sparsity {cfg.sparsity} keeps {keep_count(cfg.sparsity, p)}")
    needs_grads = cfg.method in ("chita", "chita++", "bso")
    if needs_grads and cfg.block_size <= 0:
        budget = cfg.memory_budget_gb * 2**30 if cfg.memory_budget_gb else None
        check_memory(cfg.n_grads, p, int(budget) if budget else None)
        if gradient_memory_bytes(cfg.n_grads, p, dtype) > (budget or 8 * 2**30):
            dtype = torch.float32
    targets = cubic_schedule(cfg.sparsity, cfg.stages, cfg.start_sparsity) if cfg.method == "chita++" else [cfg.sparsity]
    dense = copy.deepcopy(model) if cfg.refit else None
    t_grad = t_solve = 0.0
    stages: list[dict[str, Any]] = []
    raised_all: dict[str, int] = {}
    refit_info = None
    streamed = needs_grads and cfg.block_size > 0
    floored = cfg.method in ("magnitude", "chita", "chita++") and not streamed  # apply_layer_floor's paths
    plan = resumed = None
    first = 0
    if streamed:
        if resume:
            resumed = blockwise.read_resume(state_path, asdict(cfg)) if state_path else None
            if resumed is None:
                raise BadInput("--resume: block mode keeps its state beside --out; give --out")
            model.load_state_dict(resumed["model"])
            first, stages = int(resumed["stage"]), list(resumed["stages"])
            plan = blockwise.BlockPlan(**{**resumed["plan"], "groups": tuple(map(tuple, resumed["plan"]["groups"]))})
        else:
            gb = cfg.memory_budget_gb
            plan = blockwise.plan_blocks(params, cfg.n_grads, cfg.block_size, int(gb * 2**30) if gb else None,
                                         solver_bytes=torch.empty((), dtype=dtype).element_size(),
                                         spill=cfg.block_stream == "spill")
        if announce:
            announce(plan.describe() + (f" (resumed at stage {first + 1}, from {state_path})" if resumed else ""))
    for si, s in enumerate(targets):
        if si < first:
            continue
        w_bar = flatten_weights(model, params).to(dtype)
        allowed = (w_bar != 0) if (cfg.keep_pruned and si > 0) else None
        k = keep_count(s, p)
        if allowed is not None:
            k = min(k, int(allowed.sum()))
        G = a = None
        if needs_grads and not streamed:
            tg = time.perf_counter()
            G = collect_gradients_split(model, params, data.x_train, data.y_train, n=cfg.n_grads, m=cfg.fisher_batch,
                                  seed=cfg.seed + si, progress=progress,
                                  memory_budget_bytes=int(cfg.memory_budget_gb * 2**30) if cfg.memory_budget_gb else None)
            G = G.to(dtype)
            t_grad += time.perf_counter() - tg
            if cfg.first_order or (cfg.first_order is None and cfg.method == "chita++"):
                # f is n/m times the local loss model (1/2 ||G d||^2 ~ n/(2m) d^T F d for rows that average
                # m samples), so the linear term is n/m times the mean gradient: (1/m) sum_i g_i.
                a = G.sum(0) / cfg.fisher_batch
            if cfg.prune_inert:
                # A weight whose gradient is zero on every sample (its input unit is dead: a removed row of the
                # layer before, a ReLU that never fires) does nothing; the ridge term alone would keep it and
                # waste the budget. Keep the others first.
                moving = G.ne(0).any(0)
                useful = moving if allowed is None else (allowed & moving)
                if int(useful.sum()) >= k and int(useful.sum()) < (p if allowed is None else int(allowed.sum())):
                    info_inert = p - int(moving.sum())
                    allowed = useful
                else:
                    info_inert = 0
        ts = time.perf_counter()
        lam = cfg.l2 * cfg.n_grads / 2.0
        info: dict[str, Any] = {"stage": si, "sparsity": s, "k": k}
        if needs_grads and cfg.prune_inert and not streamed:
            info["inert_weights"] = info_inert
        if cfg.method == "magnitude":
            w = solver.hard_threshold(w_bar, k, allowed)
        elif cfg.method == "magnitude-uniform":
            w = _magnitude_uniform(w_bar, params, s, allowed)
        elif streamed:
            assert plan is not None
            with blockwise.spill_folder(state_path if cfg.block_stream == "spill" else None) as spill:
                w, binfo = blockwise.run_stage(
                    model, params, data, stage_index=si, cfg=asdict(cfg), plan=plan, stages=stages,
                    spill=spill if cfg.block_stream == "spill" else None, state_path=state_path,
                    state=resumed["state"] if resumed is not None and si == first else None, w_bar=w_bar, k=k,
                    lam=lam, allowed=allowed, method=cfg.method, support=cfg.block_support, prune_inert=cfg.prune_inert,
                    first_order=bool(cfg.first_order or (cfg.first_order is None and cfg.method == "chita++")),
                    n=cfg.n_grads, m=cfg.fisher_batch, seed=cfg.seed + si, max_iter=cfg.max_iter, tol=cfg.tol,
                    dtype=dtype, progress=progress)
            info.update(binfo)
            t_grad += binfo["gradients_s"]
        else:
            # Weights pruned at an earlier stage stay zero: solve on the allowed columns only (exact, since
            # w_bar is zero there), which makes late CHITA++ stages cheap.
            cols = allowed.nonzero().squeeze(1) if allowed is not None else None
            Gc = G[:, cols] if cols is not None else G
            wb = w_bar[cols] if cols is not None else w_bar
            ac = (a[cols] if cols is not None else a) if a is not None else None
            if cfg.method == "bso":
                r = solver.magnitude_bso(Gc, wb, k, lam, a=ac)
            else:
                r = solver.chita(Gc, wb, k, lam, a=ac, max_iter=cfg.max_iter, tol=cfg.tol,
                                 backsolve_every=cfg.backsolve_every, active_set=cfg.active_set)
                info.update(iterations=r.iterations, rounds=r.active_set_rounds, converged=r.converged)
            info["objective"] = r.objective
            if cols is not None:
                w = torch.zeros_like(w_bar)
                w[cols] = r.w
            else:
                w = r.w
        if not torch.isfinite(w).all():
            raise RuntimeFailure("the solver produced non-finite weights; try a larger --l2")
        if floored:
            w, info["layer_floor_raised"] = apply_layer_floor(w, w_bar, params, s, cfg.layer_floor, allowed)
            for name, n in info["layer_floor_raised"].items():
                raised_all[name] = raised_all.get(name, 0) + n
        info["solve_s"] = time.perf_counter() - ts
        t_solve += info["solve_s"]
        bn_done = False
        if cfg.safeguard and needs_grads:
            mag = solver.hard_threshold(w_bar, k, allowed)
            if floored:
                mag = apply_layer_floor(mag, w_bar, params, s, cfg.layer_floor, allowed)[0]
            # with BatchNorm, each candidate is ranked after the BatchNorm step below, which the winner has had;
            # before the layer-wise re-fit (last stage), CHITA's and magnitude's supports after it
            last = dense is not None and si == len(targets) - 1
            choice = choose_candidate(model, params, data, w_bar, w, mag, cfg.seed + si,
                                      then=partial(_stage_batchnorm, model, data, cfg, si) if cfg.bn_recalibrate
                                      else None, refit=partial(_timed_refit, model, dense, params, data, cfg)
                                      if last else None)
            w, info["safeguard"] = choice.weights, choice.record
            if choice.after_batchnorm:
                info["batchnorm"] = choice.batchnorm
            bn_done = choice.after_batchnorm or choice.refit is not None
            refit_info = choice.refit
        set_weights(model, params, w)
        if cfg.bn_recalibrate and not bn_done and bool((w != w_bar).any()):
            info["batchnorm"] = _stage_batchnorm(model, data, cfg, si)
        del G
        stages.append(info)
        if progress:
            progress("stages", si + 1, len(targets))
        log.info("stage %d/%d sparsity %.4f done", si + 1, len(targets), s)
    if dense is not None:
        if refit_info is None:  # not already run by the last stage's safeguard
            refit_info = _timed_refit(model, dense, params, data, cfg)
        t_solve += refit_info["seconds"]
        if progress:
            progress("refit", 1, 1)
    ls = layer_sparsity(model, params)
    total_zero = sum(ls[q.name] * q.numel for q in params)
    return PruneReport(
        method=cfg.method, target_sparsity=cfg.sparsity, sparsity=total_zero / p, layer_sparsity=ls,
        timings={"gradients_s": t_grad, "solve_s": t_solve, "total_s": time.perf_counter() - t0},
        stages=stages, config=asdict(cfg), refit=refit_info,
        layer_floor={"floor": cfg.layer_floor, "raised": raised_all} if floored else None,
    )


def prune(model: nn.Module, cfg: PruneConfig, data: Dataset,
          filter_fn: Callable[[nn.Module, str], bool] = default_prunable,
          progress: Progress | None = None) -> PruneReport:
    """Prune the weights of every layer accepted by ``filter_fn``, in place."""
    return prune_weights(model, find_prunable(model, filter_fn), data, cfg, progress)
