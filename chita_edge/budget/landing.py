"""Step 6 of the budget search: landing on the budget and choosing the result (``Landing``, a part of
``budget.search._Search``).

``land`` gives width back while the best round that meets every budget is well under it; ``choose`` returns the
round nearest under the budget, or a clearly more accurate round that met (``most_accurate``: held-out loss,
paired per-image test), or with ``prefer="nearest"`` the nearest over it; ``"landing"`` in the result records
the nearest under and over, whether the chosen one is in the window, and the held-out candidates.
"""
from __future__ import annotations

import math
from typing import Any

from chita_edge.budget.methods import heldout_images
from chita_edge.core.evaluate import per_image_loss

Round = dict[str, Any]  # one verified round: predicted, compacted model and plan, measured, missed, correction
Kept = tuple[Round, dict[str, Any]]  # a round that met every budget, and the snapshot of its state


class Landing:
    """The landing steps of ``_Search``, which provides the state they read (``cfg``, ``under``, ``over``, ``met``,
    ``bases``, ``eff``, ``limits``, ``data``, ``cs``) and the steps they call (``restore``, ``run_stages``,
    ``verify``, ``config_key``, ``gate_edge``)."""

    def land(self) -> None:
        """Give width back while the best round that meets every budget is more than ``1 - land_low`` under it:
        correct the cost model by that round's own measurement (scale = measured / predicted), re-plan from the
        last stage's state that is still wide enough, aiming at ``land_aim`` x the budget; a re-plan is kept
        between the widest round that met (``lo``) and the narrowest that missed (``hi``), bisected when the
        correction points outside. A plan whose widths were measured before is not measured again."""
        cfg, eff = self.cfg, self.eff
        if self.under is None:
            return
        k = max(eff, key=lambda r: self.under[0]["measured"][r] / eff[r])  # type: ignore[index]
        lo = self.under[0]["pred"][k] / self.under[0]["corr"][k]
        hi = (self.over[0]["pred"][k] / self.over[0]["corr"][k]) if self.over is not None else math.inf
        for _ in range(cfg.land_steps):
            u = self.under[0]
            if u["ratio"] >= cfg.land_low or hi / lo < 1.01:
                break
            raw_u = u["pred"][k] / u["corr"][k]
            # aim so that the measurement's interval (its upper edge, as wide as this round's) stays within
            aim = min(cfg.land_aim, 0.995 * u["measured"][k] / u["upper"][k])
            want = aim * eff[k] / (u["measured"][k] / raw_u)
            if not lo < want < hi:
                want = math.sqrt(lo * hi) if math.isfinite(hi) else lo * 1.1
            c = dict(u["corr"])
            c[k] = eff[k] * cfg.margin / want
            self.restore(self.base_for(k, want))
            self.run_stages(1, c)
            key = self.config_key()
            if key in self.measured_keys:  # the grid gives the same widths: no new file to measure
                if self.measured_keys[key]:
                    lo = max(lo, want)
                else:
                    hi = min(hi, want)
                self.info.append({"land": "same widths as an earlier round", "planned_raw": want,
                                  "met_before": self.measured_keys[key]})
                continue
            r = self.verify("land", c)
            raw = r["pred"][k] / c[k]
            if r["missed"]:
                hi = min(hi, raw)
            else:
                lo = max(lo, raw)

    def base_for(self, k: str, want: float) -> dict[str, Any]:
        """The most pruned state before a stage whose predicted ``k`` (uncorrected) is still at least ``want``."""
        ok = [snap for snap, pred in self.bases if pred[k] >= want]
        return ok[-1] if ok else self.bases[0][0]

    def choose(self, res: Round) -> Round:
        """The result: the round nearest under the budget (``prefer="under"``), or, with ``prefer="nearest"`` and
        none in the window, whichever of the nearest under and over it is closer; the state is restored to it.
        In place of the nearest under, the most accurate round that met every budget (``most_accurate``)."""
        cfg, under, over = self.cfg, self.under, self.over
        self.landing = {"window": [cfg.land_low, 1.0], "prefer": cfg.prefer, "uncertain": cfg.uncertain,
                        "judged": ("the point estimate" if self.edge.get("latency_ms", 1.0) == 1.0
                                   else "the upper edge of the estimate's error band (check's rule)"),
                        "under": self._summary(under[0]) if under else None,
                        "over": self._summary(over[0]) if over else None}
        pick = under
        if under is None or (cfg.prefer == "nearest" and over is not None and under[0]["ratio"] < cfg.land_low
                             and over[0]["ratio"] - 1 < 1 - under[0]["ratio"]):
            pick = over if under is None or cfg.prefer == "nearest" else under
        if pick is None:
            return res
        if pick is under:
            pick = self.most_accurate(pick)
        # "selected": a round that met, further under the budget than ``under`` but more accurate held-out
        kind = "over" if pick is over else "under" if pick is under else "selected"
        self.landing["chosen"] = kind
        if kind == "selected":
            self.landing["selected"] = self._summary(pick[0])
        self.landing["in_window"] = cfg.land_low <= pick[0]["ratio"] <= 1.0 and not pick[0]["missed"]
        chosen = self.landing[kind]
        self.landing.update({k: chosen[k] for k in ("measured_over_budget", "upper_edge_over_budget")})
        if not self.landing["in_window"] and under is not None and over is not None:
            self.landing["note"] = ("no width on the grid lands in the window: the nearest under and over the "
                                    "budget are reported (--prefer under|nearest picks)")
        self.restore(pick[1])
        return pick[0]

    def most_accurate(self, nearest: Kept) -> Kept:
        """Among the rounds that met every budget, the one with the lowest loss on ``cfg.select_samples`` held-out
        training images, where that loss is lower than the nearest round's (``nearest``) by more than two standard
        errors of the per-image difference (a paired test: a tie keeps the round nearest the budget). ``nearest``
        when there is one round, no data, or the selection is off; the landing record lists each candidate."""
        cfg, data = self.cfg, self.data
        if cfg.select_samples == 0 or not cfg.one_shot or data is None or len(self.met) < 2:
            return nearest
        x, y = heldout_images(data, cfg.select_samples, cfg.calib_samples, cfg.seed)
        if len(x) < 2:
            return nearest
        # ``nearest`` itself: a later round with the same widths (not added to ``met``) may have other weights
        rounds = self.met if any(k is nearest for k in self.met) else [*self.met, nearest]
        scored = [(kept, *per_image_loss(kept[0]["new"], x, y)) for kept in rounds]
        base = next(losses for kept, losses, _ in scored if kept is nearest)
        pick, best, cands = nearest, float(base.mean()), []
        for kept, losses, top1 in scored:
            d = base - losses  # > 0 where this round's loss is lower
            z = float(d.mean()) / max(float(d.std()) / math.sqrt(len(d)), 1e-12)
            cands.append({**self._summary(kept[0]), "heldout_loss": float(losses.mean()), "heldout_top1": top1,
                          "z_vs_nearest": z})
            if z > 2.0 and float(losses.mean()) < best:
                pick, best = kept, float(losses.mean())
        self.landing["selected_on"] = {"images": len(x), "candidates": cands}
        return pick

    def _summary(self, r: Round) -> dict[str, Any]:
        lim = self.limits
        return {"judged_over_budget": r["ratio"],
                "measured_over_budget": max(r["measured"][k] / lim[k] for k in lim),  # point / budget
                "upper_edge_over_budget": max(r["measured"][k] * self.gate_edge(k) / lim[k] for k in lim),
                "measured": {k: r["measured"][k] for k in self.limits},
                "widths": dict(r["key"][:len(self.cs.sizes)]), "dropped": list(r["key"][len(self.cs.sizes):]),
                "missed": sorted(r["missed"])}
