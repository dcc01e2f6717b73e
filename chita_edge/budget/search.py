"""Pruning to a device budget: per-layer widths chosen on the cost model, structured CHITA, verified by benchmark.

One verb, ``prune_to_budget(model, example_input, data, profile, budgets, BudgetConfig) -> BudgetResult``, and
its checkpoint-writing wrapper ``prune_budget_checkpoint`` behind ``chita-edge prune --profile``.

The search (``method="chita"``), a NetAdapt-style greedy loop on the cost model, in ``stages`` steps:

Step 1: measure the dense model (export + ``bench``) and anchor the cost model to it: the ratio of measured to
        predicted dense latency (at the budget's percentile), memory and file size corrects every prediction.
Step 2: refuse an impossible budget (``GateFailed``) with the smallest latency / memory / file reachable (every
        channel group at its narrowest allowed width).
Step 3: per stage, targets on a geometric schedule from the dense prediction to the budget. Per channel group,
        the group-OBS removal order of its channels on the layer-wise CHITA quadratic (G = the consumers' input
        activations, ``removal_curves``), and the cost of removing the first k of them -- the KL divergence of
        the model's outputs after removing them and re-fitting the consumers, measured at a few k
        (``probe_curves``). Greedy: while a target is unmet, take the step (one group down to a lower multiple
        of the width multiple) with the least cost per unit of normalised resource saved.
Step 4: zero the chosen channels (weights, producer biases, BatchNorm gamma/beta) and re-fit every layer to the
        dense model's outputs on the calibration images (``layerwise_refit``: CHITA's backsolve with G = the
        layer's inputs; the consumers' input slices are re-fitted, earlier layers' error is absorbed).
Step 5: compact, export, benchmark; when a measurement misses its budget (beyond ``slack``), correct that
        resource's prediction by the miss and run one more stage, up to ``max_tighten`` times -- unless the
        corrected prediction of the narrowest widths is itself over the budget (then it stops: unreachable).

``method="chita-fisher"`` uses the paper's global G instead (mini-batch gradients; joint no-refit saliency for
the greedy, then ``group_chita`` -- group IHT + backsolve -- at the chosen widths). Baselines with the same
budgets, cost model and verification: ``l1-uniform`` (every group keeps the same fraction of channels, the
largest that meets the budgets; channels chosen by the L1 norm of their filters, Li et al. 2017) and
``norm-global`` (channels removed in increasing order of their filters' L2 norm across all layers until the
budgets hold). Neither re-fits weights (unless ``refit=True``, an ablation); both get BatchNorm re-estimation.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chita_edge.budget.costmodel import CostModel, Prediction, nchwc_block
from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, GateFailed
from chita_edge.devices.profiles import Budgets, Profile
from chita_edge.graph.structure import ResidualBlock, compact_model, residual_blocks
from chita_edge.pruning.layers import flatten_weights
from chita_edge.pruning.structured import (
    BlockConfig,
    ChannelStructure,
    LayerStats,
    StructuredConfig,
    allowed_widths,
    apply_keep,
    block_costs,
    channel_saliency,
    channel_structure,
    gradients,
    l1_filter_norms,
    l2_filter_norms,
    layerwise_refit,
    probe_curves,
    prune_blocks,
    reestimate_bn,
    removal_curves,
    solve_groups,
    zero_block,
)
from chita_edge.solvers.group_chita import coordinate_mask, select_groups

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]

METHODS = ("chita", "chita-fisher", "l1-uniform", "norm-global")
STRUCTURES = ("auto", "channel", "block", "unstructured")
RESOURCES = ("latency_ms", "memory_mb", "file_mb")


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """Knobs of the budget search (see the module docstring)."""

    method: str = "chita"
    structure: str = "channel"
    stages: int = 4  # T: stages of the search (G recomputed at each)
    n_grads: int = 500  # n: rows of G
    fisher_batch: int = 1  # m
    l2: float = 1e-3  # lam = l2 * n / 2
    width_multiple: int | None = None  # None: the profile's
    channel_block: int | None = None  # widths between blocks left out (allowed_widths); None: the host's NCHWc block, 0: off
    margin: float = 0.97  # plan each resource to this fraction of its budget
    slack: float = 0.05  # a measurement within budget * (1 + slack) meets the budget
    verify: bool = True  # export + benchmark the result (and tighten on a miss)
    dense_anchor: bool = True  # with verify: measure the dense model first and correct the cost model by it
    max_tighten: int = 2
    depth: bool = True  # method chita: removing a whole residual block (identity shortcut) is one more move
    relax_below: float = 0.9  # after a tightening round lands below this fraction of a budget: relax (bisection)
    relax_steps: int = 2  # bisection steps between the last missing and the tightened correction
    bench_runs: int = 100
    bench_repeats: int = 3  # benchmark processes per measurement; the median is used
    bn_batches: int = 16  # BatchNorm re-estimation batches when it is on
    refit: bool | None = None  # layer-wise re-fit after each stage; None: on for chita, off for the baselines
    bn_reestimate: bool | None = None  # None: on where there is no re-fit (it undoes a re-fit's calibration)
    calib_samples: int = 256  # training images for the layer statistics and the re-fit
    damp: float = 0.01  # ridge of the layer-wise problems, relative to the mean diagonal of H
    max_probes: int = 6  # widths per channel group at which the output divergence is measured
    probe_samples: int = 128  # calibration images for those measurements
    max_iter: int = 60
    seed: int = 0
    threads: int = 1  # host threads for timing (the benchmark's host setting)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise BadInput(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.structure not in STRUCTURES:
            raise BadInput(f"--structure {self.structure!r}: expected one of {', '.join(STRUCTURES)}")
        if self.stages < 1:
            raise BadInput(f"--stages {self.stages}: expected >= 1")
        if self.width_multiple is not None and not 1 <= self.width_multiple <= 256:
            raise BadInput(f"--width-multiple {self.width_multiple}: expected 1..256")
        if self.channel_block is not None and self.channel_block < 0:
            raise BadInput(f"channel_block {self.channel_block}: expected >= 0 (0: off)")
        if not 0 < self.margin <= 1 or not 0 <= self.slack < 1:
            raise BadInput("margin must be in (0, 1] and slack in [0, 1)")
        if self.bench_runs < 1 or self.bench_repeats < 1:
            raise BadInput("bench_runs and bench_repeats must be >= 1")
        if not 0 < self.relax_below <= 1 or self.relax_steps < 0 or self.max_tighten < 0:
            raise BadInput("relax_below must be in (0, 1], relax_steps and max_tighten >= 0")

    @property
    def do_refit(self) -> bool:
        return self.refit if self.refit is not None else self.method == "chita"

    @property
    def do_bn(self) -> bool:
        return self.bn_reestimate if self.bn_reestimate is not None else not self.do_refit

    def structured(self, solver: str = "chita") -> StructuredConfig:
        return StructuredConfig(n_grads=self.n_grads, fisher_batch=self.fisher_batch, l2=self.l2, solver=solver,
                                max_iter=self.max_iter, bn_batches=self.bn_batches, seed=self.seed)


@dataclass
class BudgetResult:
    model: nn.Module  # the compacted model
    plan: dict[str, Any]
    widths: dict[str, int]
    sizes: dict[str, int]
    budgets: dict[str, float]
    percentile: str
    predicted: dict[str, float]
    measured: dict[str, Any] | None
    dense_measured: dict[str, Any] | None
    dense_predicted: dict[str, float]
    met: dict[str, bool]
    stages: list[dict[str, Any]] = field(default_factory=list)
    cost_model: dict[str, Any] = field(default_factory=dict)
    export: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # residual blocks removed whole (also in plan["drop"])

    @property
    def passed(self) -> bool:
        return all(self.met.values())

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("plan", "widths", "sizes", "budgets", "percentile", "predicted",
                                           "measured", "dense_measured", "dense_predicted", "met", "stages",
                                           "cost_model", "export", "timings")}
        d["passed"] = self.passed
        d["dropped_blocks"] = list(self.dropped)
        d["layers"] = [{"group": g, "width": self.widths[g], "of": self.sizes[g],
                        "kept_fraction": self.widths[g] / self.sizes[g]} for g in self.sizes
                       if g in self.widths]
        return d


# --------------------------------------------------------------------------------------------------------------
# Budgets and predictions


def budget_targets(profile: Profile, budgets: Budgets) -> tuple[dict[str, float], str]:
    """{resource: limit} from the resolved budgets, and the latency percentile."""
    out: dict[str, float] = {}
    pct = "p50"
    if budgets.latency_ms is not None:
        out["latency_ms"] = float(budgets.latency_ms.value)
        pct = budgets.latency_ms.percentile
    if budgets.peak_memory_mb is not None:
        out["memory_mb"] = float(budgets.peak_memory_mb)
    if budgets.model_file_mb is not None:
        out["file_mb"] = float(budgets.model_file_mb)
    if not out:
        raise BadInput(f"profile {profile.id} has no budgets and none was given (--latency-ms, --memory-mb, --file-mb)")
    return out, pct


def _resources(p: Prediction) -> dict[str, float]:
    return {"latency_ms": p.latency_ms, "memory_mb": p.memory_mb, "file_mb": p.file_mb}


def resolve_block(cfg: BudgetConfig) -> int:
    """The channel block of the runtime that verifies the budget: ONNX Runtime's NCHWc block on this host."""
    return nchwc_block() if cfg.channel_block is None else cfg.channel_block


def min_widths(sizes: Mapping[str, int], multiple: int) -> dict[str, int]:
    return {g: allowed_widths(s, multiple)[0] for g, s in sizes.items()}


# --------------------------------------------------------------------------------------------------------------
# Selection criteria: which channels a group loses next, and at what objective cost


class _Criterion:
    """Greedy state: per group the channels still alive; ``propose`` / ``commit`` a step down of one group."""

    def __init__(self, cs: ChannelStructure, alive: torch.Tensor):
        self.cs = cs
        self.alive = alive.clone()

    def _alive_in(self, f: int) -> torch.Tensor:
        sl = self.cs.channels(f)
        return self.alive[sl].nonzero().squeeze(1) + sl.start

    def propose(self, f: int, drop: int) -> tuple[float, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def commit(self, f: int, chans: torch.Tensor) -> None:
        self.alive[chans] = False


class ChitaCriterion(_Criterion):
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


class CurveCriterion(_Criterion):
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


class NormCriterion(_Criterion):
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


@dataclass
class BlockMoves:
    """Residual blocks as moves of the width search: ``costs[id]`` is the objective cost of removing block
    ``id`` (same units as the channel criterion's costs: ``block_costs``' output divergence); ``dropped``
    holds the blocks removed so far (the greedy adds to it)."""

    costs: dict[str, float]
    dropped: set[str] = field(default_factory=set)


def greedy_widths(cm: CostModel, cs: ChannelStructure, crit: _Criterion, targets: Mapping[str, float],
                  corr: Mapping[str, float], multiple: int, *, per_resource: bool = True,
                  max_jump: int = 4, block: int | None = None,
                  blocks: BlockMoves | None = None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Step groups down until every (corrected) predicted resource meets its target; ``crit`` picks channels.

    ``per_resource``: rank steps by objective cost per unit of (normalised) resource saved (NetAdapt); False
    ranks by the objective cost alone (the global-norm baseline). ``blocks``: removing one of these residual
    blocks is one more candidate step, ranked by the same score (its cost per resource saved, the saving
    predicted by the cost model without the block's units). Returns the widths and the steps taken.
    """
    sizes = cs.sizes
    widths = {s.id: int(crit.alive[cs.channels(f)].sum()) for f, s in enumerate(cs.specs)}
    steps: list[dict[str, Any]] = []
    dropped = blocks.dropped if blocks is not None else set()

    def res(w: Mapping[str, int], d: set[str]) -> dict[str, float]:
        p = _resources(cm.predict(w, dropped=frozenset(d))) if ("memory_mb" in targets or "file_mb" in targets) \
            else {"latency_ms": cm.latency(w, dropped=frozenset(d))}
        return {k: p[k] * corr.get(k, 1.0) for k in p}

    cur = res(widths, dropped)
    while any(cur[k] > targets[k] for k in targets):
        best = None
        for b, cost in (blocks.costs.items() if blocks is not None else ()):
            if b in dropped or not math.isfinite(cost):
                continue
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
    return widths, steps


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
        p = _resources(cm.predict(w))
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


# --------------------------------------------------------------------------------------------------------------
# Measuring


def measure_model(model: nn.Module, example_input: torch.Tensor, profile: Profile, path: Path, *, percentile: str,
                  runs: int, repeats: int, parity_inputs: torch.Tensor | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Export ``model`` to ONNX at ``path`` (compact layout, parity-checked) and benchmark it ``repeats`` times
    for ``profile``; medians of the latency at ``percentile`` (device estimate), peak memory and file size."""
    import statistics

    from chita_edge.devices.bench import BenchConfig, benchmark, best_latency
    from chita_edge.exporters import ExportConfig, export_model

    px = parity_inputs if parity_inputs is not None else example_input
    export_model(model, ExportConfig(format="onnx", layout="compact"), example_input=example_input[:1], out=path,
                 parity_inputs=px[:16], parity_source="data" if parity_inputs is not None else "random")
    lats, hosts, mems, dens, prov = [], [], [], [], ""
    res: dict[str, Any] = {}
    for i in range(repeats):
        res = benchmark(path, [profile], BenchConfig(runs=runs, warmup=max(5, runs // 10), profile_runs=3))
        lat, prov = best_latency(res, profile.id)
        lats.append(float(lat[percentile]))
        hosts.append(float(res["latency_ms"][percentile]))
        mems.append(float(res["peak_memory_mb"]))
        est = (res.get("device_estimates") or {}).get(profile.id) or {}
        if est.get("dense_fraction") is not None:
            dens.append(float(est["dense_fraction"]))
        if progress:
            progress("benchmarking", i + 1, repeats)
    return {"latency_ms": statistics.median(lats), "host_latency_ms": statistics.median(hosts),
            "memory_mb": statistics.median(mems), "file_mb": float(res["file_mb"]), "percentile": percentile,
            "dense_fraction": statistics.median(dens) if dens else None,
            "latency_provenance": prov, "repeats": repeats, "runs": runs, "latency_samples": lats,
            "memory_samples": mems, "file": str(path)}


# --------------------------------------------------------------------------------------------------------------
# The search


def _schedule(start: Mapping[str, float], final: Mapping[str, float], stages: int) -> list[dict[str, float]]:
    """Per-stage targets: geometric from ``start`` to ``final`` for every resource that must shrink."""
    out = []
    for t in range(1, stages + 1):
        q = t / stages
        out.append({k: (final[k] if start[k] <= final[k] else start[k] * (final[k] / start[k]) ** q) for k in final})
    return out


def prune_to_budget(model: nn.Module, example_input: torch.Tensor, data: Dataset | None, profile: Profile,
                    budgets: Budgets, cfg: BudgetConfig, *, work_dir: str | os.PathLike | None = None,
                    cost_model: CostModel | None = None, dense_measured: dict[str, Any] | None = None,
                    progress: Progress | None = None) -> BudgetResult:
    """Prune ``model`` in place (zeroed channels, zeroed residual blocks) to meet ``budgets`` on ``profile``;
    returns the compacted model.

    ``data`` (training images and labels) is needed for ``method="chita"`` (gradients, BatchNorm statistics).
    ``cost_model`` / ``dense_measured`` may be passed in to share them between runs on the same model.
    Raises ``GateFailed`` when the budget cannot be reached by any allowed widths.
    """
    cfg.validate()
    if cfg.method in ("chita", "chita-fisher") and data is None:
        raise BadInput("structured CHITA needs data (--data) for gradients; or use a data-free baseline method")
    t0 = time.perf_counter()
    x1 = example_input[:1]
    mult = cfg.width_multiple or profile.width_multiple
    limits, pct = budget_targets(profile, budgets)
    cs = channel_structure(model, x1)
    cm = cost_model or CostModel.build(model, x1, profile, specs=cs.specs, threads=cfg.threads,
                                       width_multiple=mult, progress=progress)
    timings = {"cost_model_s": time.perf_counter() - t0}
    tmp = tempfile.TemporaryDirectory(prefix="chita-edge-budget-") if work_dir is None else None
    wd = Path(work_dir if work_dir is not None else tmp.name)  # type: ignore[union-attr]
    try:
        return _search(model, x1, data, profile, cfg, cs, cm, limits, pct, mult, wd, dense_measured, timings, t0,
                       progress)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _search(model: nn.Module, x1: torch.Tensor, data: Dataset | None, profile: Profile, cfg: BudgetConfig,
            cs: ChannelStructure, cm: CostModel, limits: dict[str, float], pct: str, mult: int, wd: Path,
            dense_measured: dict[str, Any] | None, timings: dict[str, float], t0: float,
            progress: Progress | None) -> BudgetResult:
    sizes = cs.sizes
    dense_pred = _resources(cm.predict({}))
    # parity inputs for the exports: test images where there are some (else the exporter's random inputs)
    parity = data.x_test[:16] if data is not None and len(data.x_test) else None
    # residual blocks the search may remove whole (structured CHITA only; the baselines prune channels)
    blocks = residual_blocks(model, x1) if cfg.depth and cfg.method == "chita" else []
    known = set(getattr(cm, "blocks", {}) or {})
    blocks = [b for b in blocks if b.id in known]
    all_blocks = frozenset(b.id for b in blocks)
    # Step 1: anchor the cost model to the measured dense model.
    if cfg.verify and cfg.dense_anchor and dense_measured is None:
        dense_measured = measure_model(model, x1, profile, wd / "dense.onnx", percentile=pct, runs=cfg.bench_runs,
                                       repeats=cfg.bench_repeats, parity_inputs=parity, progress=progress)
    if dense_measured and dense_measured.get("dense_fraction"):
        # the benchmark's op mix of the dense model fixes the non-dense time the units do not see, so that the
        # device factor follows the op mix as channels go (else a pruned model's estimate is ~20 % low)
        cm = cm.with_op_mix(float(dense_measured["dense_fraction"]))
        dense_pred = _resources(cm.predict({}))
    corr = {k: (dense_measured[k] / dense_pred[k]) if dense_measured else 1.0 for k in RESOURCES}
    # Step 2: an impossible budget fails now, naming what is reachable.
    floor = _resources(cm.predict(min_widths(sizes, mult), dropped=all_blocks))
    floor_c = {k: floor[k] * corr[k] for k in floor}
    impossible = [k for k in limits if floor_c[k] > limits[k] * (1 + cfg.slack)]
    if impossible:
        unit = {"latency_ms": "ms", "memory_mb": "MB", "file_mb": "MB"}
        parts = [f"{k} {limits[k]:.4g} {unit[k]} is below the smallest reachable {floor_c[k]:.4g} {unit[k]}"
                 for k in impossible]
        how = "channel pruning" + (f" and removing {len(all_blocks)} residual blocks" if all_blocks else "")
        raise GateFailed(f"budget cannot be met on {profile.id} by {how}: {'; '.join(parts)} (every "
                         f"channel group at its narrowest width of {mult}"
                         f"{', every removable residual block removed' if all_blocks else ''}; smallest reachable: "
                         f"latency {floor_c['latency_ms']:.4g} ms at {pct}, peak memory {floor_c['memory_mb']:.4g} MB, "
                         f"file {floor_c['file_mb']:.4g} MB); raise the budget or lower --width-multiple")
    targets = {k: limits[k] * cfg.margin for k in limits}
    stages_info: list[dict[str, Any]] = []
    dense = copy.deepcopy(model).eval()
    stats = None
    if cfg.do_refit and data is not None and cfg.method in ("chita", "l1-uniform", "norm-global"):
        stats = LayerStats(dense, calibration_images(data, cfg.calib_samples, cfg.seed))
        stats.gram = {n: stats.dense_H(n) for n in stats.names}  # the model is still the dense one
    st = _State(alive=torch.ones(cs.groups.num_groups, dtype=torch.bool), dropped=set())
    scfg = cfg.structured()

    def run_stages(n_st: int, c: Mapping[str, float]) -> None:
        start = {k: _resources(cm.predict(cs.widths(st.alive), dropped=frozenset(st.dropped)))[k] * c[k]
                 for k in targets}
        if cfg.method in ("l1-uniform", "norm-global"):
            n_st = 1
        for tgt in _schedule(start, targets, n_st):
            st.alive = _stage(model, dense, stats, data, cs, cm, cfg, scfg, st, tgt, c, mult, st.stage_no,
                              stages_info, progress, blocks)
            st.stage_no += 1
            if progress:
                progress("stages", st.stage_no, cfg.stages)

    def verify(label: str, c: Mapping[str, float]) -> dict[str, Any]:
        widths = cs.widths(st.alive)
        pred = {k: v * c[k] for k, v in _resources(cm.predict(widths, dropped=frozenset(st.dropped))).items()}
        new, plan = compact_model(model, x1)
        out = {"pred": pred, "new": new, "plan": plan, "measured": None, "missed": {}, "corr": dict(c)}
        if not cfg.verify:
            return out
        ts = time.perf_counter()
        n = sum(1 for r in stages_info if "verify" in r)
        m = measure_model(new, x1, profile, wd / f"pruned-{n}.onnx", percentile=pct, runs=cfg.bench_runs,
                          repeats=cfg.bench_repeats, parity_inputs=parity, progress=progress)
        timings["verify_s"] = timings.get("verify_s", 0.0) + time.perf_counter() - ts
        missed = {k: m[k] / limits[k] for k in limits if m[k] > limits[k] * (1 + cfg.slack)}
        stages_info.append({"verify": n, "kind": label, "measured": {k: m[k] for k in RESOURCES},
                            "predicted": pred, "missed": sorted(missed), "dropped": sorted(st.dropped),
                            "measured_over_budget": {k: m[k] / limits[k] for k in limits}})
        out.update(measured=m, missed=missed)
        return out

    run_stages(cfg.stages, corr)
    res = verify("first", corr)
    best = None if res["missed"] else (res, st.snapshot(model, stats))
    tightened = False
    for _ in range(cfg.max_tighten if cfg.verify else 0):
        if not res["missed"]:
            break
        # Step 5: correct each missed prediction by the miss, proportionally (measured / predicted), and prune
        # one more stage to the same target -- from a snapshot, so that an over-shoot can be relaxed.
        new_corr = dict(corr)
        for k in res["missed"]:
            new_corr[k] *= res["measured"][k] / max(res["pred"][k], 1e-12)
        # With the corrected predictions, a budget below the smallest reachable value cannot be met by pruning
        # further: stop here (the result reports the miss) instead of pruning to the narrowest widths for nothing.
        beyond = {k: floor[k] * new_corr[k] for k in res["missed"]
                  if floor[k] * new_corr[k] > limits[k] * (1 + cfg.slack)}
        if beyond:
            stages_info[-1]["unreachable"] = beyond
            log.info("measurement missed %s, below the smallest reachable (%s) after correction; not pruning further",
                     ", ".join(res["missed"]), ", ".join(f"{k} {v:.4g}" for k, v in beyond.items()))
            break
        log.info("measurement missed %s; tightening and pruning further", ", ".join(res["missed"]))
        before = st.snapshot(model, stats)
        lo_corr, corr = corr, new_corr
        run_stages(1, corr)
        res = verify("tighten", corr)
        tightened = True
        if res["missed"]:
            continue
        best = (res, st.snapshot(model, stats))
        # Relax: a tightening round that lands far below the budget over-pruned (the miss it corrected came from
        # widths it no longer has); bisect the correction between the missing and the met one, from the same
        # snapshot, and keep the least pruned result that meets every budget.
        hi_corr = corr
        tight = [k for k in limits if corr[k] != lo_corr[k]]  # the resources this round tightened
        for _step in range(cfg.relax_steps):
            if not tight or max(best[0]["measured"][k] / limits[k] for k in tight) >= cfg.relax_below:
                break
            mid = {k: math.sqrt(lo_corr[k] * hi_corr[k]) for k in corr}
            if all(abs(mid[k] / hi_corr[k] - 1) < 0.01 for k in corr):
                break
            st.restore(model, stats, before)
            run_stages(1, mid)
            trial = verify("relax", mid)
            if trial["missed"]:
                lo_corr = mid
            else:
                hi_corr = mid
                best = (trial, st.snapshot(model, stats))
        st.restore(model, stats, best[1])
        res = best[0]
        break
    if res["missed"] and best is not None:  # an earlier round met every budget: that one is the result
        res = best[0]
        st.restore(model, stats, best[1])
    measured, pred = res["measured"], res["pred"]
    met = {k: (measured[k] <= limits[k] * (1 + cfg.slack)) if measured else (pred[k] <= limits[k]) for k in limits}
    timings["total_s"] = time.perf_counter() - t0
    gone = _groups_inside(cs, st.dropped)
    widths = {g: w for g, w in cs.widths(st.alive).items() if g not in gone}
    return BudgetResult(model=res["new"], plan=res["plan"], widths=widths, sizes=dict(sizes), budgets=limits,
                        percentile=pct, predicted=pred, measured=measured, dense_measured=dense_measured,
                        dense_predicted={k: dense_pred[k] * res["corr"].get(k, 1.0) for k in dense_pred},
                        met=met, stages=stages_info,
                        cost_model={**cm.describe(), "correction": res["corr"], "channel_block": resolve_block(cfg),
                                    "tightened": tightened},
                        export=measured["file"] if measured else None, timings=timings,
                        dropped=sorted(st.dropped))


@dataclass
class _State:
    """The search's mutable state: alive channels, removed blocks, stage counter; snapshots for relaxing."""

    alive: torch.Tensor
    dropped: set[str]
    stage_no: int = 0

    def snapshot(self, model: nn.Module, stats: LayerStats | None) -> dict[str, Any]:
        return {"sd": {k: v.detach().clone() for k, v in model.state_dict().items()}, "alive": self.alive.clone(),
                "dropped": set(self.dropped), "gram": dict(stats.gram) if stats is not None else None}

    def restore(self, model: nn.Module, stats: LayerStats | None, snap: dict[str, Any]) -> None:
        model.load_state_dict(snap["sd"])
        self.alive = snap["alive"].clone()
        self.dropped = set(snap["dropped"])
        if stats is not None and snap["gram"] is not None:
            stats.gram = dict(snap["gram"])


def _groups_inside(cs: ChannelStructure, dropped: set[str]) -> set[str]:
    """Channel groups every member of which lies inside a removed block (they go with it)."""
    def inside(module: str) -> bool:
        return any(module == b or module.startswith(b + ".") for b in dropped)

    return {s.id for s in cs.specs if dropped and all(inside(m.module) for m in s.members)}


def calibration_images(data: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` training images (a fixed random subset) for the layer statistics and the re-fit."""
    n = min(n, len(data.x_train))
    idx = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed + 17))[:n]
    return data.x_train[idx]


def _stage(model: nn.Module, dense: nn.Module, stats: LayerStats | None, data: Dataset | None,
           cs: ChannelStructure, cm: CostModel, cfg: BudgetConfig, scfg: StructuredConfig, st: _State,
           tgt: Mapping[str, float], corr: Mapping[str, float], mult: int, stage_no: int,
           info: list[dict[str, Any]], progress: Progress | None,
           blocks: list[ResidualBlock] | None = None) -> torch.Tensor:
    """One stage: choose widths (and residual blocks to remove) for ``tgt`` and the channels, solve, write
    back. Returns the new alive mask; removed blocks are added to ``st.dropped``."""
    ts = time.perf_counter()
    alive = st.alive
    gone = _groups_inside(cs, st.dropped)
    block = resolve_block(cfg)
    params = list(cs.params)
    rec: dict[str, Any] = {"stage": stage_no, "targets": dict(tgt)}
    xcal = calibration_images(data, cfg.calib_samples, cfg.seed) if data is not None else None
    if cfg.method == "chita":
        assert xcal is not None
        # Step 3: group-OBS removal curves of every channel group (layer-wise CHITA quadratic, G = inputs X).
        curves = removal_curves(model, cs, xcal, alive, min_width=min_widths(cs.sizes, mult), damp=cfg.damp,
                                stats=stats)
        assert stats is not None
        probes = {}
        for f, s in enumerate(cs.specs):
            if s.id in gone:  # inside a removed block: nothing to gain
                probes[f] = []
                continue
            w_now = int(alive[cs.channels(f)].sum())
            lower = [w for w in allowed_widths(s.size, mult, block) if w < w_now]
            if len(lower) > cfg.max_probes:  # spread the probes, always including the narrowest width
                step = (len(lower) - 1) / (cfg.max_probes - 1)
                lower = sorted({lower[round(i * step)] for i in range(cfg.max_probes)})
            probes[f] = [w_now - w for w in lower]
        pcal = xcal[: cfg.probe_samples]
        curves = probe_curves(model, cs, pcal, curves, stats, probes=probes, damp=cfg.damp)
        crit: _Criterion = CurveCriterion(cs, alive, curves)
        todo = [b for b in (blocks or []) if b.id not in st.dropped]
        # a block's cost: the same output divergence, measured with the block removed from the current model
        moves = BlockMoves({b.id: c for b, c in zip(todo, block_costs(model, todo, pcal), strict=True)},
                           set(st.dropped)) if todo else BlockMoves({}, set(st.dropped))
        widths, steps = greedy_widths(cm, cs, crit, tgt, corr, mult, block=block, blocks=moves)
        keep = crit.alive
        new_blocks = sorted(moves.dropped - st.dropped)
        rec.update(n_steps=len(steps), block_costs={k: round(v, 6) for k, v in moves.costs.items()},
                   dropped=new_blocks)
    elif cfg.method == "chita-fisher":
        assert data is not None
        G = gradients(model, params, data, scfg, stage_no, progress=progress)
        w = flatten_weights(model, params).to(G.dtype)
        lam = scfg.l2 * G.shape[0] / 2.0
        Z, _ = channel_saliency(G, w, cs, lam)
        from chita_edge.solvers.group_chita import group_sq_norms

        crit = ChitaCriterion(cs, alive, Z, group_sq_norms(w.double(), cs.groups), lam)
        widths, steps = greedy_widths(cm, cs, crit, tgt, corr, mult, block=block)
        k = cs.k(widths)
        w0 = torch.where(coordinate_mask(crit.alive, cs.groups), w, torch.zeros_like(w))
        # Step 4 (global form): group IHT from the greedy selection, then the exact backsolve.
        sol = solve_groups(model, params, cs.groups, k, G, scfg, allowed=alive, w0=w0)
        keep = sol["keep"]
        rec.update(objective=sol["objective"], objective_selection=sol["objective_selection"],
                   iterations=sol.get("iterations"), n_steps=len(steps))
        del G, Z
    elif cfg.method == "l1-uniform":
        widths = uniform_widths(cm, cs, tgt, corr, mult, block)
        keep = select_groups(l1_filter_norms(model, cs), cs.groups, cs.k(widths), alive)
    else:  # norm-global
        crit = NormCriterion(cs, alive, l2_filter_norms(model, cs))
        widths, steps = greedy_widths(cm, cs, crit, tgt, corr, mult, per_resource=False, block=block)
        keep = crit.alive
    apply_keep(model, cs, keep)
    if cfg.method == "chita":
        for b in blocks or []:
            if b.id in moves.dropped and b.id not in st.dropped:
                zero_block(model, b)  # f := 0; compact_model removes the block
                st.dropped.add(b.id)
    if cfg.do_refit and xcal is not None:
        # Step 4: re-fit every layer to the dense model's outputs (consumers' input slices included).
        errs = layerwise_refit(model, dense, xcal, damp=cfg.damp, stats=stats)
        rec["refit_error"] = {k: round(v, 5) for k, v in errs.items()}
    if cfg.do_bn and data is not None and cfg.bn_batches > 0:
        reestimate_bn(model, data, scfg, stage_no)
    rec.update(widths=cs.widths(keep), seconds=time.perf_counter() - ts, all_dropped=sorted(st.dropped))
    info.append(rec)
    log.info("stage %d: widths %s, residual blocks removed %s", stage_no, rec["widths"], rec["all_dropped"] or "none")
    return keep


__all__ = ["METHODS", "STRUCTURES", "BlockConfig", "BlockMoves", "BudgetConfig", "prune_blocks_checkpoint", "BudgetResult", "budget_targets", "calibration_images",
           "greedy_widths", "measure_model", "min_widths", "prune_budget_checkpoint", "prune_to_budget",
           "raise_if_missed", "uniform_widths"]


# --------------------------------------------------------------------------------------------------------------
# The command: load, prune to the budget, evaluate, save a checkpoint that reloads


def prune_budget_checkpoint(model_spec: str, weights: str | os.PathLike | None, data: str | None, *,
                            profile: str | Profile, out: str | os.PathLike, cfg: BudgetConfig,
                            latency_ms: float | None = None, percentile: str | None = None,
                            memory_mb: float | None = None, file_mb: float | None = None,
                            export: str | os.PathLike | None = None,
                            progress: Progress | None = None) -> dict[str, Any]:
    """What ``chita-edge prune --profile P`` does; returns the JSON-able report (``passed`` says whether every
    budget was met when measured). Raises ``GateFailed`` before pruning when the budget is unreachable."""
    from chita_edge.core.checkpoint import save_checkpoint
    from chita_edge.core.data import load_data
    from chita_edge.core.evaluate import accuracy
    from chita_edge.core.io import atomic_path, sha256_file
    from chita_edge.devices.profiles import load_profile, with_budgets
    from chita_edge.models.loading import check_fits, load_model

    cfg.validate()
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    budgets = with_budgets(prof, latency_ms=latency_ms, percentile=percentile, memory_mb=memory_mb, file_mb=file_mb)
    lm = load_model(model_spec, weights)
    if lm.meta and lm.meta.get("plan"):
        raise BadInput(f"{weights}: already structurally pruned (its checkpoint carries a plan); prune the dense "
                       "model to the budget instead")
    ds = load_data(data) if data else None
    if ds is not None:
        check_fits(lm, ds.x_train, data or "")
        example = ds.x_train[:1]
    elif lm.input_shape is not None:
        example = torch.rand(1, *lm.input_shape, generator=torch.Generator().manual_seed(cfg.seed))
    else:
        raise BadInput(f"model '{model_spec}': its input shape is unknown; give --data")
    structure = cfg.structure
    if structure == "auto":
        structure = "channel"
    if structure != "channel":
        raise BadInput(f"--structure {cfg.structure} with --profile: only channel pruning lowers latency and memory "
                       "on dense kernels (ONNX Runtime, LiteRT/XNNPACK); use --structure channel, or prune to a "
                       "sparsity with --sparsity and export --layout sparse for a smaller file")
    dense_acc = accuracy(lm.module, ds.x_test, ds.y_test) if ds is not None and len(ds.x_test) else None
    export_dir = Path(export).parent if export else None
    if export_dir is not None and not export_dir.exists():
        raise BadInput(f"--export {export}: directory {export_dir} does not exist")
    with tempfile.TemporaryDirectory(prefix="chita-edge-budget-") as wd:
        res = prune_to_budget(lm.module, example, ds, prof, budgets, cfg, work_dir=wd, progress=progress)
        acc = accuracy(res.model, ds.x_test, ds.y_test) if ds is not None and len(ds.x_test) else None
        meta = {
            "model": lm.spec,
            "source_weights": str(weights) if weights else None,
            "source_sha256": sha256_file(weights) if weights else None,
            "data": data,
            "method": f"{cfg.method}-structured" if cfg.method.startswith("chita") else cfg.method,
            "structure": structure,
            "profile": prof.id,
            "budgets": res.budgets,
            "widths": res.widths,
            "plan": res.plan,
            "accuracy": acc,
            "dense_accuracy": dense_acc,
            "input_shape": list(example.shape[1:]),
            "params_fraction": sum(p.numel() for p in res.model.parameters())
            / max(1, sum(p.numel() for p in lm.module.parameters())),
        }
        save_checkpoint(out, res.model.state_dict(), meta)
        exported = None
        if export and res.export:
            with atomic_path(export) as tmp:
                tmp.write_bytes(Path(res.export).read_bytes())
            exported = str(export)
    unit = {"latency_ms": "ms", "memory_mb": "MB", "file_mb": "MB"}
    checks = []
    for k, limit in res.budgets.items():
        m = res.measured[k] if res.measured else None
        checks.append({"budget": k if k != "latency_ms" else f"latency_ms.{res.percentile}", "limit": limit,
                       "predicted": res.predicted[k], "measured": m, "unit": unit[k], "met": res.met[k]})
    d = res.to_dict()
    d.pop("export", None)
    return {"model": lm.spec, "profile": prof.id, "method": meta["method"], "structure": structure,
            "passed": res.passed, "checks": checks, "dense_accuracy": dense_acc, "accuracy": acc,
            "params_before": sum(p.numel() for p in lm.module.parameters()),
            "params_after": sum(p.numel() for p in res.model.parameters()),
            "out": str(out), "export": exported, "slack": cfg.slack, **d}


def raise_if_missed(result: dict[str, Any]) -> None:
    """``GateFailed`` naming every budget the measured model missed."""
    if result.get("passed", True):
        return
    parts = [f"{c['budget']} {c['measured']:.4g} {c['unit']} > {c['limit']:.4g} {c['unit']}"
             for c in result["checks"] if not c["met"] and c["measured"] is not None]
    beyond = {k: v for s in result.get("stages", []) for k, v in s.get("unreachable", {}).items()}
    advice = ("; the measurements put the smallest reachable at " + ", ".join(f"{k} {v:.4g}" for k, v in beyond.items())
              + ": raise the budget or lower --width-multiple") if beyond else \
        "; prune again with a tighter --latency-ms / --memory-mb"
    raise GateFailed(f"the pruned model misses its budget on {result['profile']} when measured: {'; '.join(parts)} "
                     f"(checkpoint written to {result['out']}){advice}")


def prune_blocks_checkpoint(model_spec: str, weights: str | os.PathLike | None, data: str, cfg: BlockConfig,
                            out: str | os.PathLike, progress: Progress | None = None) -> dict[str, Any]:
    """What ``chita-edge prune --structure block --sparsity S`` does: 1x4 blocks of the Linear weights."""
    from chita_edge.core.checkpoint import save_checkpoint
    from chita_edge.core.data import load_data
    from chita_edge.core.evaluate import accuracy
    from chita_edge.core.io import sha256_file
    from chita_edge.models.loading import check_fits, load_model

    cfg.validate()
    lm = load_model(model_spec, weights)
    ds = load_data(data)
    check_fits(lm, ds.x_train, data)
    dense_acc = accuracy(lm.module, ds.x_test, ds.y_test)
    t0 = time.perf_counter()
    rep = prune_blocks(lm.module, ds, cfg, lm.prunable, progress=progress)
    acc = accuracy(lm.module, ds.x_test, ds.y_test)
    meta = {"model": lm.spec, "source_weights": str(weights) if weights else None,
            "source_sha256": sha256_file(weights) if weights else None, "data": data, "method": "chita-block",
            "structure": f"block{cfg.block[0]}x{cfg.block[1]}", "sparsity": rep["sparsity"], "accuracy": acc,
            "dense_accuracy": dense_acc, "input_shape": list(lm.input_shape or ds.input_shape)}
    save_checkpoint(out, lm.module.state_dict(), meta)
    return {"model": lm.spec, "method": "chita-block", **rep, "accuracy": acc, "dense_accuracy": dense_acc,
            "out": str(out), "seconds": time.perf_counter() - t0}
