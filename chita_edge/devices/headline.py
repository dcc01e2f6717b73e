"""The report's headline: what pruning bought, each target against the dense model, at a glance.

One row per (pruned file, target device): the latency at the device budget's percentile, the file size and the
top-1 accuracy of the file and of the dense file of the same runtime, as ratios (``latency_x``: how many times
faster, ``size_x``: how many times smaller, both dense / pruned) and a difference (``accuracy_delta``, points),
with the verdict of the device's budgets on both files. The dense file is the one named ``dense.*`` (the
pipeline's and the sweep's baseline); a file named after a profile id is that profile's target, any other file
is compared on every profile. Latencies are compared on one footing: both estimated for the device when both
have an estimate, else both as measured on this host (said in ``latency_provenance``).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

from chita_edge.devices.bench import best_latency
from chita_edge.devices.gate import judge, latency_check
from chita_edge.devices.profiles import Profile

_WORST = {"fail": 2, "uncertain": 1, "pass": 0}


def _stem(result: dict[str, Any]) -> str:
    return os.path.splitext(os.path.basename(result["file"]))[0]


def _budget_verdicts(result: dict[str, Any], profile: Profile) -> list[dict[str, Any]]:
    """Each budget of ``profile`` on ``result``: name, limit, value, verdict (the gate's rules)."""
    b = profile.budgets
    out = []
    if b.latency_ms is not None:
        c = latency_check(result, profile.id, b.latency_ms.value, b.latency_ms.percentile)
        out.append({"name": f"latency {b.latency_ms.percentile}", "limit": c.limit, "unit": "ms", "value": c.value,
                    "verdict": c.verdict})
    if b.peak_memory_mb is not None:
        v = float(result["peak_memory_mb"])
        out.append({"name": "peak memory", "limit": b.peak_memory_mb, "unit": "MB", "value": v,
                    "verdict": judge(v, b.peak_memory_mb)})
    if b.model_file_mb is not None:
        v = float(result["file_mb"])
        out.append({"name": "model file", "limit": b.model_file_mb, "unit": "MB", "value": v,
                    "verdict": judge(v, b.model_file_mb)})
    return out


def _worst(verdicts: Sequence[str]) -> str:
    return max(verdicts, key=lambda v: _WORST[v]) if verdicts else "pass"


def _latency_pair(r: dict[str, Any], dense: dict[str, Any], pid: str, pct: str) -> tuple[float, float, str]:
    lr, pr = best_latency(r, pid)
    ld, pd = best_latency(dense, pid)
    if pr.startswith("estimated") != pd.startswith("estimated") or pr.split(" (")[0] != pd.split(" (")[0]:
        return float(r["latency_ms"][pct]), float(dense["latency_ms"][pct]), "measured-host"
    return float(lr[pct]), float(ld[pct]), pr.split(" (")[0]


def headline_rows(results: Sequence[dict[str, Any]], profiles: Sequence[Profile]) -> list[dict[str, Any]]:
    """One row per (pruned file, target profile) against the dense file of the same runtime; [] without one."""
    dense = {r["runtime"]: r for r in results if _stem(r) == "dense"}
    ids = {p.id for p in profiles}
    rows = []
    for r in results:
        d = dense.get(r["runtime"])
        if d is None or r is d:
            continue
        targets = [p for p in profiles if p.id == _stem(r)] if _stem(r) in ids else list(profiles)
        for p in targets:
            pct = p.budgets.latency_ms.percentile if p.budgets.latency_ms else "p50"
            lat, dlat, prov = _latency_pair(r, d, p.id, pct)
            mine, theirs = _budget_verdicts(r, p), _budget_verdicts(d, p)
            budgets = [{**m, "dense_value": t["value"], "dense_verdict": t["verdict"]}
                       for m, t in zip(mine, theirs, strict=True)]
            acc = (r.get("accuracy") or {}).get("accuracy")
            dacc = (d.get("accuracy") or {}).get("accuracy")
            rows.append({
                "target": p.id, "file": os.path.basename(r["file"]), "dense_file": os.path.basename(d["file"]),
                "runtime": r["runtime"], "latency_percentile": pct, "latency_provenance": prov,
                "latency_ms": lat, "dense_latency_ms": dlat, "latency_x": dlat / lat if lat > 0 else None,
                "file_mb": float(r["file_mb"]), "dense_file_mb": float(d["file_mb"]),
                "size_x": float(d["file_mb"]) / float(r["file_mb"]) if r["file_mb"] else None,
                "accuracy": acc, "dense_accuracy": dacc,
                "accuracy_delta": acc - dacc if acc is not None and dacc is not None else None,
                "verdict": _worst([b["verdict"] for b in budgets]),
                "dense_verdict": _worst([b["dense_verdict"] for b in budgets]),
                "budgets": budgets,
                "broken_by_dense_met_by_pruning": [b["name"] for b in budgets
                                                   if b["dense_verdict"] == "fail" and b["verdict"] == "pass"],
            })
    return rows


HEADER = ["target", "file", "latency (vs dense)", "faster ×", "file MB (vs dense)", "smaller ×", "top-1 Δ (points)",
          "verdict (dense's)", "budgets broken by dense, met by pruning"]


def _cells(row: dict[str, Any]) -> list[str]:
    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}×"

    delta = "—" if row["accuracy_delta"] is None else f"{row['accuracy_delta']:+.2f}"
    return [row["target"], row["file"],
            f"{row['latency_ms']:.3g} ms {row['latency_percentile']} ({row['dense_latency_ms']:.3g} ms, "
            f"{row['latency_provenance']})", x(row["latency_x"]),
            f"{row['file_mb']:.3g} ({row['dense_file_mb']:.3g})", x(row["size_x"]), delta,
            f"{row['verdict']} ({row['dense_verdict']})", ", ".join(row["broken_by_dense_met_by_pruning"]) or "—"]


def headline_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["## What pruning bought", "",
           "Each target against the dense file of the same runtime; ×: dense / pruned; Δ: pruned − dense.", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return out + [""]


def headline_html(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    parts = ["<h2>What pruning bought</h2><p class='prov'>Each target against the dense file of the same runtime; "
             "×: dense / pruned; Δ: pruned − dense.</p><table class='headline'><tr>"
             + "".join(f"<th>{html.escape(h)}</th>" for h in HEADER) + "</tr>"]
    for r in rows:
        cells = _cells(r)
        cls = {"pass": "pass", "fail": "fail"}.get(r["verdict"], "unsure")
        parts.append("<tr>" + "".join(f"<td class='{cls}'>{html.escape(c)}</td>" if i == 7 else
                                      f"<td>{html.escape(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    return "".join(parts) + "</table>"


__all__ = ["headline_html", "headline_markdown", "headline_rows"]
