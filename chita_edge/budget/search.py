"""Pruning to a device budget: per-layer widths chosen on the cost model, structured CHITA, verified by benchmark.

One verb, ``prune_to_budget(model, example_input, data, profile, budgets, BudgetConfig) -> BudgetResult``;
its checkpoint-writing job behind ``chita-edge prune --profile`` is ``workflows.budget_jobs``. This module holds
the search loop (Steps 1, 2 and 5); ``budget.landing`` Step 6; ``budget.config`` the settings and result,
``budget.methods`` one stage of each method (Steps 3 and 4), ``budget.criteria`` the greedy width search,
``budget.measure`` the benchmark.

The search (``method="chita-layerwise"``, alias ``chita``), a NetAdapt-style greedy loop on the cost model, in ``stages`` steps:

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
Step 6: land (``land``, ``choose``): a measurement decides with its interval (``decide``, the gate's rule: an
        uncertain verdict is a miss); while the best round that meets every budget is under ``land_low`` x it,
        re-plan from an earlier stage's state with the cost model corrected by that round's own measurement,
        aiming at ``land_aim``; keep the nearest rounds under and over the budget and return one (``prefer``).
        Every verdict, with its interval and the cost model's error, is in ``BudgetResult.decisions``.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chita_edge.budget.config import (
    RESOURCES,
    BudgetConfig,
    BudgetResult,
    Progress,
    budget_targets,
    min_widths,
    resolve_block,
    resources_of,
)
from chita_edge.budget.costmodel import CostModel
from chita_edge.budget.landing import Kept, Landing, Round
from chita_edge.budget.measure import check_interval, measure_model
from chita_edge.budget.methods import (
    SearchState,
    StageEnv,
    calibration_images,
    check_fisher_memory,
    groups_inside,
    run_stage,
)
from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, GateFailed
from chita_edge.devices.gate import judge
from chita_edge.devices.profiles import Budgets, Profile
from chita_edge.graph.compact import compact_model
from chita_edge.graph.residual import residual_blocks
from chita_edge.pruning.channels import ChannelStructure, channel_structure
from chita_edge.pruning.refit import LayerStats

log = logging.getLogger(__name__)



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

    ``data`` (training images and labels) is needed for ``method="chita-layerwise"`` (gradients, BatchNorm statistics).
    ``cost_model`` / ``dense_measured`` may be passed in to share them between runs on the same model.
    Raises ``GateFailed`` when the budget cannot be reached by any allowed widths.
    """
    cfg.validate()
    if cfg.method in ("chita-layerwise", "chita-fisher") and data is None:
        raise BadInput("structured CHITA needs data (--data) for gradients; or use a data-free baseline method")
    t0 = time.perf_counter()
    x1 = example_input[:1]
    mult = cfg.width_multiple or profile.width_multiple
    limits, pct = budget_targets(profile, budgets)
    cs = channel_structure(model, x1)
    check_fisher_memory(cs, cfg)  # chita-fisher's G must fit: refused before any measurement or gradient
    cm = cost_model or CostModel.build(model, x1, profile, specs=cs.specs, threads=cfg.threads,
                                       width_multiple=mult, progress=progress)
    timings = {"cost_model_s": time.perf_counter() - t0}
    tmp = tempfile.TemporaryDirectory(prefix="chita-edge-budget-") if work_dir is None else None
    wd = Path(work_dir if work_dir is not None else tmp.name)  # type: ignore[union-attr]
    try:
        search = _Search(model, x1, data, profile, cfg, cs, cm, limits, pct, mult, wd, timings, progress)
        return search.run(dense_measured, t0)
    finally:
        if tmp is not None:
            tmp.cleanup()


class _Search(Landing):
    """One search: its fixed inputs, the cost model (anchored by ``anchor``), the state of the model being
    pruned (``st``), what every stage shares (``env``, after Steps 1 and 2) and the log of stages and
    measurements (``info``)."""

    env: StageEnv  # set by run(), once the budget is known to be reachable

    def __init__(self, model: nn.Module, x1: torch.Tensor, data: Dataset | None, profile: Profile,
                 cfg: BudgetConfig, cs: ChannelStructure, cm: CostModel, limits: dict[str, float], pct: str,
                 mult: int, wd: Path, timings: dict[str, float], progress: Progress | None):
        self.model, self.x1, self.data, self.profile, self.cfg = model, x1, data, profile, cfg
        self.cs, self.cm, self.limits, self.pct, self.mult = cs, cm, limits, pct, mult
        self.wd, self.timings, self.progress = wd, timings, progress
        self.dense_pred = resources_of(cm.predict({}))
        # parity inputs for the exports: test images where there are some (else the exporter's random inputs)
        self.parity = data.x_test[:16] if data is not None and len(data.x_test) else None
        # residual blocks the search may remove whole (structured CHITA only; the baselines prune channels)
        blocks = residual_blocks(model, x1) if cfg.depth and cfg.method == "chita-layerwise" else []
        known = set(getattr(cm, "blocks", {}) or {})
        self.blocks = [b for b in blocks if b.id in known]
        self.all_blocks = frozenset(b.id for b in self.blocks)
        # Per budget, the factor the judged figure is of the measured one (see ``eff``): the device estimate's
        # band's upper edge for the latency with ``uncertain="fail"`` (``check``'s default rule), else 1.
        # ``band_high``: that edge whatever the rule, for the reported gate-upper / budget ratio.
        self.edge = {k: 1.0 for k in limits}
        self.band_high = 1.0
        self.dense_measured: dict[str, Any] | None = None
        self.floor: dict[str, float] = {}
        self.info: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []
        self.corr0: dict[str, float] = {}
        self.under: Kept | None = None  # the measured round nearest under the budget (max ratio, every budget met)
        self.over: Kept | None = None  # ... and nearest over it (min ratio, a budget missed or uncertain)
        self.met: list[Kept] = []  # every measured round that met every budget (``choose`` keeps the most accurate)
        self.measured_keys: dict[tuple[Any, ...], bool] = {}  # widths measured: met?
        self.bases: list[tuple[dict[str, Any], dict[str, float]]] = []  # states before the first stages
        self.landing: dict[str, Any] = {}
        self.st = SearchState(alive=torch.ones(cs.groups.num_groups, dtype=torch.bool), dropped=set())

    @property
    def eff(self) -> dict[str, float]:
        """The limits the search compares the measured figures with: each budget over its edge (1, or the latency
        estimate's band's upper edge when the gate's verdict counts an uncertain one as a failure)."""
        return {k: self.limits[k] / self.edge[k] for k in self.limits}

    @property
    def targets(self) -> dict[str, float]:
        """What the stages plan to: the compared limits times ``cfg.margin``."""
        return {k: v * self.cfg.margin for k, v in self.eff.items()}

    def run(self, dense_measured: dict[str, Any] | None, t0: float) -> BudgetResult:
        corr = self.anchor(dense_measured)
        self.corr0 = dict(corr)
        self.refuse_impossible(corr)
        self.env = self.stage_env()
        self.run_stages(self.cfg.stages, corr, keep_bases=self.cfg.verify and self.cfg.land_steps > 0)
        res = self.verify("first", corr)
        res, tightened = self.tighten(res, corr)
        if self.cfg.verify:
            self.land()
            res = self.choose(res)
        return self.result(res, tightened, t0)

    def anchor(self, dense_measured: dict[str, Any] | None) -> dict[str, float]:
        """Step 1: anchor the cost model to the measured dense model; returns the correction per resource."""
        cfg = self.cfg
        if cfg.verify and cfg.dense_anchor and dense_measured is None:
            dense_measured = self.measure(self.model, self.wd / "dense.onnx")
        if dense_measured and dense_measured.get("dense_fraction"):
            # the benchmark's op mix of the dense model fixes the non-dense time the units do not see, so that the
            # device factor follows the op mix as channels go (else a pruned model's estimate is ~20 % low)
            self.cm = self.cm.with_op_mix(float(dense_measured["dense_fraction"]))
            self.dense_pred = resources_of(self.cm.predict({}))
        self.dense_measured = dense_measured
        high = ((dense_measured or {}).get("latency_band") or {}).get("high")
        if high and "latency_ms" in self.limits:  # a device estimate with an error band
            self.band_high = float(high)
            # the window and the verdicts judge what the gate judges: the band's upper edge by default (so that
            # `check` passes), the point estimate with uncertain="pass" (`check --uncertain pass`). The timing's
            # own noise is the measurement's interval, which ``decide`` applies: no extra margin here.
            if self.cfg.uncertain == "fail":
                self.edge["latency_ms"] = float(high)
        return {k: (dense_measured[k] / self.dense_pred[k]) if dense_measured else 1.0 for k in RESOURCES}

    def refuse_impossible(self, corr: Mapping[str, float]) -> None:
        """Step 2: an impossible budget fails now, naming what is reachable."""
        limits, mult, all_blocks = self.eff, self.mult, self.all_blocks
        self.floor = floor = resources_of(self.cm.predict(min_widths(self.cs.sizes, mult), dropped=all_blocks))
        floor_c = {k: floor[k] * corr[k] for k in floor}
        impossible = [k for k in limits if floor_c[k] > limits[k] * (1 + self.cfg.slack)]
        if not impossible:
            return
        unit = {"latency_ms": "ms", "memory_mb": "MB", "file_mb": "MB"}
        parts = [f"{k} {self.limits[k]:.4g} {unit[k]}"
                 + (f" (over the estimate's error band: {limits[k]:.4g})" if self.edge[k] != 1.0 else "")
                 + f" is below the smallest reachable {floor_c[k]:.4g} {unit[k]}" for k in impossible]
        how = "channel pruning" + (f" and removing {len(all_blocks)} residual blocks" if all_blocks else "")
        raise GateFailed(f"budget cannot be met on {self.profile.id} by {how}: {'; '.join(parts)} (every "
                         f"channel group at its narrowest width of {mult}"
                         f"{', every removable residual block removed' if all_blocks else ''}; smallest reachable: "
                         f"latency {floor_c['latency_ms']:.4g} ms at {self.pct}, peak memory "
                         f"{floor_c['memory_mb']:.4g} MB, file {floor_c['file_mb']:.4g} MB); raise the budget or "
                         "lower --width-multiple")

    def stage_env(self) -> StageEnv:
        """The dense copy (the re-fit's reference) and its layer statistics, with what every stage shares."""
        cfg, data = self.cfg, self.data
        dense = copy.deepcopy(self.model).eval()
        stats = None
        if cfg.do_refit and data is not None and cfg.method in ("chita-layerwise", "l1-uniform", "norm-global"):
            stats = LayerStats(dense, calibration_images(data, cfg.calib_samples, cfg.seed))
            stats.gram = {n: stats.dense_H(n) for n in stats.names}  # the model is still the dense one
        return StageEnv(model=self.model, dense=dense, stats=stats, data=data, cs=self.cs, cm=self.cm, cfg=cfg,
                        scfg=cfg.structured(), mult=self.mult, blocks=self.blocks, progress=self.progress)

    def snapshot(self) -> dict[str, Any]:
        return self.st.snapshot(self.model, self.env.stats)

    def restore(self, snap: dict[str, Any]) -> None:
        self.st.restore(self.model, self.env.stats, snap)

    def run_stages(self, n_st: int, c: Mapping[str, float], keep_bases: bool = False) -> None:
        """Prune ``n_st`` stages (one for the baselines) on the schedule from here to the targets;
        ``keep_bases``: keep the state before each stage (with its uncorrected prediction) for ``land``."""
        st, cs = self.st, self.cs
        start = {k: resources_of(self.cm.predict(cs.widths(st.alive), dropped=frozenset(st.dropped)))[k] * c[k]
                 for k in self.targets}
        if self.cfg.method in ("l1-uniform", "norm-global"):
            n_st = 1
        for tgt in _schedule(start, self.targets, n_st):
            if keep_bases:
                raw = resources_of(self.cm.predict(cs.widths(st.alive), dropped=frozenset(st.dropped)))
                self.bases.append((self.snapshot(), raw))
            st.alive = run_stage(self.env, st, tgt, c, self.info)
            st.stage_no += 1
            if self.progress:
                self.progress("stages", st.stage_no, self.cfg.stages)

    def verify(self, label: str, c: Mapping[str, float]) -> Round:
        """Compact the model; with ``cfg.verify``, export and benchmark it and note the budgets it misses."""
        cfg, limits, st = self.cfg, self.eff, self.st
        widths = self.cs.widths(st.alive)
        pred = {k: v * c[k] for k, v in resources_of(self.cm.predict(widths, dropped=frozenset(st.dropped))).items()}
        new, plan = compact_model(self.model, self.x1)
        out = {"pred": pred, "new": new, "plan": plan, "measured": None, "missed": {}, "corr": dict(c)}
        if not cfg.verify:
            return out
        ts = time.perf_counter()
        n = sum(1 for r in self.info if "verify" in r)
        m = self.measure(new, self.wd / f"pruned-{n}.onnx")
        self.timings["verify_s"] = self.timings.get("verify_s", 0.0) + time.perf_counter() - ts
        verdicts = self.decide(n, label, m, c, pred)
        missed = {k: m[k] / limits[k] for k in limits if verdicts[k] != "pass"}
        self.info.append({"verify": n, "kind": label, "measured": {k: m[k] for k in RESOURCES},
                          "predicted": pred, "missed": sorted(missed), "dropped": sorted(st.dropped),
                          "measured_over_budget": {k: m[k] / self.limits[k] for k in limits},
                          "upper_edge_over_budget": {k: m[k] * self.gate_edge(k) / self.limits[k] for k in limits}})
        iv = check_interval(m, self.cfg.check_repeats)
        upper = {k: float(iv[1]) if k == "latency_ms" and iv else float(m[k]) for k in limits}
        out.update(measured=m, missed=missed, ratio=max(m[k] / limits[k] for k in limits), upper=upper,
                   key=self.config_key())
        kept = (out, self.snapshot())  # restore() copies from a snapshot: one serves every list it is kept in
        if not missed and out["key"] not in self.measured_keys:
            self.met.append(kept)
        self.measured_keys[out["key"]] = not missed
        # the nearest round on either side of the budget, with its state (``choose`` picks one of them)
        if not missed and (self.under is None or out["ratio"] > self.under[0]["ratio"]):
            self.under = kept
        elif missed and (self.over is None or out["ratio"] < self.over[0]["ratio"]):
            self.over = kept
        return out

    def gate_edge(self, k: str) -> float:
        """The factor from a measured figure to the upper edge the gate judges (the band's, for a latency)."""
        return self.band_high if k == "latency_ms" else 1.0

    def measure(self, model: nn.Module, path: Path) -> dict[str, Any]:
        cfg = self.cfg
        return measure_model(model, self.x1, self.profile, path, percentile=self.pct, runs=cfg.bench_runs,
                             repeats=cfg.bench_repeats, parity_inputs=self.parity, progress=self.progress,
                             precision=cfg.precision, max_repeats=cfg.bench_max_repeats,
                             reuse=cfg.reuse_measurements, decided=self.settled)

    def settled(self, m: Mapping[str, Any]) -> bool:
        """Whether measurement ``m`` so far already settles the verdict and the landing (``decide``): its interval
        (``check_interval``) straddles neither the limit nor the window's lower edge, so more benchmark repeats
        cannot tip either."""
        iv = check_interval(m, self.cfg.check_repeats)
        if "latency_ms" not in self.eff or not iv:
            return True
        lo, hi = iv
        lim = self.eff["latency_ms"] * (1 + self.cfg.slack)
        return not any(lo <= x <= hi for x in (lim, self.cfg.land_low * lim))

    def config_key(self) -> tuple[Any, ...]:
        """The widths and removed blocks of the model now: two rounds with the same key are the same file."""
        return tuple(sorted(self.cs.widths(self.st.alive).items())) + tuple(sorted(self.st.dropped))

    def decide(self, n: int, label: str, m: Mapping[str, Any], c: Mapping[str, float],
               pred: Mapping[str, float]) -> dict[str, str]:
        """Each budget's verdict on measurement ``n``, the gate's way (``devices.gate.judge``): pass when the
        latency's interval (its measurement precision) is within the limit, fail when it is all over it, else
        uncertain (counted as a miss). The record says whether the interval straddles the limit or the landing
        window's lower edge: then another measurement of the same file could have tipped that decision."""
        cfg, limits = self.cfg, self.eff
        verdicts = {}
        for k in limits:
            lim = limits[k] * (1 + cfg.slack)
            iv = check_interval(m, self.cfg.check_repeats) if k == "latency_ms" else None
            lo, hi = (float(iv[0]), float(iv[1])) if iv else (float(m[k]), float(m[k]))
            verdicts[k] = judge(m[k], lim, lo, hi)
            raw = pred[k] / c[k] if c[k] else pred[k]
            self.decisions.append({
                "verify": n, "kind": label, "budget": k, "measured": float(m[k]), "interval": [lo, hi],
                "limit": lim, "verdict": verdicts[k], "cached": bool(m.get("cached")),
                "precise": m.get("precise") if k == "latency_ms" else True,
                "repeats": m.get("repeats"), "predicted_raw": raw, "scale": float(m[k]) / raw if raw else None,
                "error_dense_anchored": float(m[k]) / (raw * self.corr0.get(k, 1.0)) - 1 if raw else None,
                "error_corrected": float(m[k]) / pred[k] - 1 if pred[k] else None,
                "tipped": [f"{w} {x:.4g}" for w, x in (("limit", lim), ("window", cfg.land_low * lim))
                           if lo <= x <= hi and lo < hi]})
        return verdicts

    def tighten(self, res: Round, corr: dict[str, float]) -> tuple[Round, bool]:
        """Step 5: while a measurement misses its budget, correct the missed predictions and prune one more
        stage (``cfg.max_tighten`` times at most). Returns the round kept and whether it tightened."""
        cfg, limits = self.cfg, self.eff
        best = None if res["missed"] else (res, self.snapshot())
        tightened = False
        for _ in range(cfg.max_tighten if cfg.verify else 0):
            if not res["missed"]:
                break
            # correct each missed prediction by the miss, proportionally (measured / predicted), and prune one more
            # stage to the same target -- from a snapshot, so that an over-shoot can be relaxed.
            new_corr = dict(corr)
            for k in res["missed"]:  # the interval's upper edge: an uncertain verdict is a miss, as in check
                new_corr[k] *= res["upper"][k] / max(res["pred"][k], 1e-12)
            # With the corrected predictions, a budget below the smallest reachable value cannot be met by pruning
            # further: stop here (the result reports the miss) instead of pruning to the narrowest widths for nothing.
            beyond = {k: self.floor[k] * new_corr[k] for k in res["missed"]
                      if self.floor[k] * new_corr[k] > limits[k] * (1 + cfg.slack)}
            if beyond:
                self.info[-1]["unreachable"] = beyond
                log.info("measurement missed %s, below the smallest reachable (%s) after correction; not pruning "
                         "further", ", ".join(res["missed"]), ", ".join(f"{k} {v:.4g}" for k, v in beyond.items()))
                break
            log.info("measurement missed %s; tightening and pruning further", ", ".join(res["missed"]))
            before = self.snapshot()
            lo_corr, corr = corr, new_corr
            self.run_stages(1, corr)
            res = self.verify("tighten", corr)
            tightened = True
            if cfg.width_first and cfg.one_shot and self.st.dropped - before["dropped"]:
                self.widths_only(before, corr)
            if res["missed"]:
                continue
            best = self.relax((res, self.snapshot()), before, lo_corr, corr)
            self.restore(best[1])
            res = best[0]
            break
        if res["missed"] and best is not None:  # an earlier round met every budget: that one is the result
            res = best[0]
            self.restore(best[1])
        return res, tightened

    def widths_only(self, before: dict[str, Any], corr: Mapping[str, float]) -> None:
        """The tightening round just measured removed a residual block: run the same stage from ``before`` with
        widths only and measure it too, as one more candidate for ``choose`` (which keeps the clearly more accurate
        of the rounds that meet); the search then goes on from the block's round, as without it."""
        blocked = self.snapshot()
        self.restore(before)
        self.st.no_new_blocks = True
        try:
            self.run_stages(1, corr)
            self.verify("tighten-widths", corr)
        finally:
            self.st.no_new_blocks = False
            self.restore(blocked)

    def relax(self, best: Kept, before: dict[str, Any], lo_corr: Mapping[str, float],
              hi_corr: Mapping[str, float]) -> Kept:
        """A tightening round (correction ``hi_corr``, met every budget: ``best``) that lands far below the
        budget over-pruned (the miss it corrected came from widths it no longer has): bisect the correction
        between the missing (``lo_corr``) and the met one, from the snapshot ``before`` the round, and keep the
        least pruned result that meets every budget."""
        cfg, limits = self.cfg, self.eff
        tight = [k for k in limits if hi_corr[k] != lo_corr[k]]  # the resources this round tightened
        keys = list(hi_corr)
        for _step in range(cfg.relax_steps):
            if not tight or max(best[0]["measured"][k] / limits[k] for k in tight) >= cfg.relax_below:
                break
            mid = {k: math.sqrt(lo_corr[k] * hi_corr[k]) for k in keys}
            if all(abs(mid[k] / hi_corr[k] - 1) < 0.01 for k in keys):
                break
            self.restore(before)
            self.run_stages(1, mid)
            trial = self.verify("relax", mid)
            if trial["missed"]:
                lo_corr = mid
            else:
                hi_corr = mid
                best = (trial, self.snapshot())
        return best

    def result(self, res: Round, tightened: bool, t0: float) -> BudgetResult:
        limits, cfg, cs, st = self.limits, self.cfg, self.cs, self.st
        eff = self.eff
        measured, pred = res["measured"], res["pred"]
        # measured: the verdict of ``decide`` (an uncertain one counts as a miss, as in ``check``)
        met = {k: (k not in res["missed"]) if measured else (pred[k] <= eff[k]) for k in limits}
        self.timings["total_s"] = time.perf_counter() - t0
        gone = groups_inside(cs, st.dropped)
        widths = {g: w for g, w in cs.widths(st.alive).items() if g not in gone}
        return BudgetResult(model=res["new"], plan=res["plan"], widths=widths, sizes=dict(cs.sizes), budgets=limits,
                            percentile=self.pct, predicted=pred, measured=measured,
                            dense_measured=self.dense_measured,
                            dense_predicted={k: self.dense_pred[k] * res["corr"].get(k, 1.0) for k in self.dense_pred},
                            met=met, stages=self.info,
                            cost_model={**self.cm.describe(), "correction": res["corr"],
                                        "planned_edge": dict(self.edge), "band_high": self.band_high,
                                        "channel_block": resolve_block(cfg), "tightened": tightened,
                                        # its error on each verified round: against the dense anchor only, and
                                        # with the correction from earlier rounds' own measurements
                                        "verify_error": [{k: d[k] for k in ("verify", "kind", "scale",
                                                                           "error_dense_anchored",
                                                                           "error_corrected")}
                                                         for d in self.decisions if d["budget"] == "latency_ms"]},
                            export=measured["file"] if measured else None, timings=self.timings,
                            dropped=sorted(st.dropped), landing=self.landing, decisions=self.decisions)
