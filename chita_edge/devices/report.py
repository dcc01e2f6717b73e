"""Benchmark reports: ``report.json``, ``report.md`` and a self-contained ``report.html`` with inline SVG plots.

Plots (hand-written SVG, no dependency, no script): latency distribution per model, budget bars per profile,
per-layer latency and weight size, and an accuracy-vs-latency Pareto chart when several models carry an
accuracy. Every latency shown says where it comes from (measured-host, estimated-device (...), measured-device),
and every device estimate its out-of-sample error band (error bars on the budget and Pareto charts) and the
verdict it supports (pass, fail, uncertain: ``chita_edge.devices.gate``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chita_edge.core.errors import BadInput
from chita_edge.core.io import atomic_write_text
from chita_edge.devices.bench import best_latency
from chita_edge.devices.gate import band_text, judge, latency_check, result_word
from chita_edge.devices.headline import headline_html, headline_markdown, headline_rows
from chita_edge.devices.profiles import Profile
from chita_edge.devices.svg import (  # noqa: F401  (OK, UNSURE: the verdict colours, imported from here)
    BAD,
    OK,
    PALETTE,
    UNSURE,
    VERDICT_COLOR,
)
from chita_edge.devices.svg import esc as _e
from chita_edge.devices.svg import file_name as _name
from chita_edge.devices.svg import fmt as _fmt
from chita_edge.devices.svg import nice_ticks as _nice_ticks
from chita_edge.devices.svg import svg_doc as _svg


# --------------------------------------------------------------------------------------------------- plots
def latency_histogram_svg(result: dict[str, Any], color: str = PALETTE[0], w: int = 600, h: int = 240) -> str:
    s = np.asarray(result.get("samples_ms") or [], dtype=float)
    title = f"Latency distribution: {_name(result)} ({result.get('provenance', 'measured-host')})"
    if s.size == 0:
        return _svg(w, 40, [f"<text x='8' y='24'>{_e(title)}: no samples</text>"], title)
    ml, mr, mt, mb = 50, 16, 28, 40
    lat = result["latency_ms"]
    lo = float(s.min())
    hi = float(max(lat["p99"], np.percentile(s, 99)))  # the tail beyond p99 is counted, not drawn
    if hi - lo < 1e-9:
        lo, hi = lo * 0.95, hi * 1.05 + 1e-6
    hi = hi + (hi - lo) * 0.02
    beyond = int((s > hi).sum())
    bins = int(min(40, max(8, math.sqrt(s.size) * 2)))
    counts, edges = np.histogram(np.clip(s, lo, hi), bins=bins, range=(lo, hi))
    cmax = max(1, int(counts.max()))
    pw, ph = w - ml - mr, h - mt - mb

    def X(v: float) -> float:
        return ml + (min(v, hi) - lo) / (hi - lo) * pw

    def Y(c: float) -> float:
        return mt + ph - c / cmax * ph

    body = [f"<text x='{ml}' y='18' font-size='13' font-weight='bold'>{_e(title)}</text>"]
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if c:
            body.append(f"<rect x='{X(a):.1f}' y='{Y(c):.1f}' width='{max(1.0, X(b) - X(a) - 1):.1f}' "
                        f"height='{mt + ph - Y(c):.1f}' fill='{color}' opacity='0.8'/>")
    body.append(f"<line x1='{ml}' y1='{mt + ph}' x2='{ml + pw}' y2='{mt + ph}' stroke='#333'/>")
    body.append(f"<line x1='{ml}' y1='{mt}' x2='{ml}' y2='{mt + ph}' stroke='#333'/>")
    for t in _nice_ticks(lo, hi):
        if lo <= t <= hi:
            body.append(f"<line x1='{X(t):.1f}' y1='{mt + ph}' x2='{X(t):.1f}' y2='{mt + ph + 4}' stroke='#333'/>"
                        f"<text x='{X(t):.1f}' y='{mt + ph + 16}' text-anchor='middle'>{t:g}</text>")
    for t in _nice_ticks(0, cmax, 4):
        if t <= cmax and float(t).is_integer():
            body.append(f"<text x='{ml - 6}' y='{Y(t) + 4:.1f}' text-anchor='end'>{int(t)}</text>")
    tail = f"; {beyond} slower run(s) up to {s.max():.3g} ms not drawn" if beyond else ""
    body.append(f"<text x='{ml + pw / 2}' y='{h - 6}' text-anchor='middle'>latency per inference (ms), "
                f"{s.size} runs{tail}</text>")
    body.append(f"<text x='12' y='{mt + ph / 2}' transform='rotate(-90 12 {mt + ph / 2})' text-anchor='middle'>runs</text>")
    for i, (k, dash) in enumerate((("p50", ""), ("p90", "5,3"), ("p99", "2,2"))):
        v = lat[k]
        right = X(v) > ml + 0.75 * pw
        tx = X(v) - 4 if right else X(v) + 4
        body.append(f"<line x1='{X(v):.1f}' y1='{mt}' x2='{X(v):.1f}' y2='{mt + ph}' stroke='#222' "
                    f"stroke-dasharray='{dash}'/><text x='{tx:.1f}' y='{mt + 12 + 14 * i}' font-size='11' "
                    f"text-anchor='{'end' if right else 'start'}' fill='#111'>{k} {v:.3g} ms</text>")
    return _svg(w, h, body, title)


def budget_rows(result: dict[str, Any], profile: Profile) -> list[dict[str, Any]]:
    """The budget comparisons that the bars draw: name, value, limit, provenance, the estimate's band
    (``low``/``high``, None for a measurement) and the gate's verdict (pass, fail, uncertain)."""
    b = profile.budgets
    rows = []
    if b.latency_ms is not None:
        c = latency_check(result, profile.id, b.latency_ms.value, b.latency_ms.percentile)
        rows.append({"name": f"latency {b.latency_ms.percentile}", "value": c.value, "limit": c.limit, "unit": "ms",
                     "provenance": c.provenance, "low": c.low, "high": c.high, "verdict": c.verdict, "note": c.note,
                     "confidence": c.confidence})
    if b.peak_memory_mb is not None:
        v = result["peak_memory_mb"]
        rows.append({"name": "peak memory", "value": v, "limit": b.peak_memory_mb, "unit": "MB",
                     "provenance": "measured-device" if result.get("provenance") == "measured-device"
                     else "measured-host", "low": None, "high": None, "verdict": judge(v, b.peak_memory_mb)})
    if b.model_file_mb is not None:
        v = result["file_mb"]
        rows.append({"name": "model file", "value": v, "limit": b.model_file_mb, "unit": "MB",
                     "provenance": "file size", "low": None, "high": None, "verdict": judge(v, b.model_file_mb)})
    return rows


def budget_bars_svg(results: Sequence[dict[str, Any]], profile: Profile, w: int = 760) -> str:
    title = f"Budgets of {profile.id} ({profile.name})"
    rows = [(r, row) for r in results for row in budget_rows(r, profile)]
    if not rows:
        return _svg(w, 40, [f"<text x='8' y='24'>{_e(title)}: no budgets</text>"], title)
    label_w, mr, bar_h, gap = 210, 260, 18, 8
    h = 40 + len(rows) * (bar_h + gap) + 24
    pw = w - label_w - mr
    maxpct = max(150.0, min(400.0, max(100 * (row["high"] or row["value"]) / row["limit"] for _, row in rows) * 1.05))

    def X(p: float) -> float:
        return label_w + min(p, maxpct) / maxpct * pw

    body = [f"<text x='8' y='18' font-size='13' font-weight='bold'>{_e(title)}</text>"]
    y = 34
    for r, row in rows:
        pct = 100 * row["value"] / row["limit"]
        color = VERDICT_COLOR[row["verdict"]]
        label = f"{_name(r)} · {row['name']}" if len(results) > 1 else row["name"]
        tip = row["provenance"] + (f"; {row['verdict']}: {row['note']}" if row.get("note") else "")
        body.append(f"<text x='{label_w - 6}' y='{y + 13}' text-anchor='end'>{_e(label[:36])}</text>")
        body.append(f"<rect x='{label_w}' y='{y}' width='{pw}' height='{bar_h}' fill='#f0f0f0'/>")
        body.append(f"<rect x='{label_w}' y='{y}' width='{max(1.0, X(pct) - label_w):.1f}' height='{bar_h}' "
                    f"fill='{color}'><title>{_e(tip)}</title></rect>")
        if row["low"] is not None and row["high"] is not None:  # the estimate's error bar
            x0, x1, ym = X(100 * row["low"] / row["limit"]), X(100 * row["high"] / row["limit"]), y + bar_h / 2
            body.append(f"<path class='errorbar' d='M{x0:.1f},{ym:.1f}H{x1:.1f}M{x0:.1f},{y + 3}V{y + bar_h - 3}"
                        f"M{x1:.1f},{y + 3}V{y + bar_h - 3}' stroke='#222' stroke-width='1.5' fill='none'>"
                        f"<title>error band {_fmt(row['low'])}–{_fmt(row['high'])} {row['unit']}</title></path>")
        more = "▶" if pct > maxpct else ""
        band = f", band {_fmt(row['low'])}–{_fmt(row['high'])}" if row["low"] is not None else ""
        body.append(f"<text x='{label_w + pw + 6}' y='{y + 13}'>{_fmt(row['value'])} / {_fmt(row['limit'])} "
                    f"{row['unit']} ({pct:.0f} %{band}){more}</text>")
        y += bar_h + gap
    x100 = X(100)
    body.append(f"<line x1='{x100:.1f}' y1='28' x2='{x100:.1f}' y2='{y}' stroke='#222' stroke-dasharray='4,3'/>"
                f"<text x='{x100:.1f}' y='{y + 14}' text-anchor='middle' font-size='11'>100 % of budget</text>")
    return _svg(w, h, body, title)


def layers_svg(result: dict[str, Any], top: int = 15, w: int = 760) -> str | None:
    layers = result.get("layers") or []
    if not layers:
        return None
    timed = all(lc.get("ms") is not None for lc in layers)
    key = "ms" if timed else "macs"
    ranked = sorted(layers, key=lambda lc: lc.get(key) or 0, reverse=True)[:top]
    total = sum(lc.get(key) or 0 for lc in layers) or 1
    ptotal = max(1, max(lc.get("param_bytes") or 0 for lc in ranked))
    title = (f"Per-layer {'host time' if timed else 'multiply-accumulates'} (top {len(ranked)} of {len(layers)}) "
             f"and weight size: {_name(result)}")
    label_w, bar_h, gap = 260, 14, 5
    col_w = (w - label_w - 40) // 2
    h = 52 + len(ranked) * (bar_h + gap) + 10
    kind_color = {"dense": PALETTE[0], "depthwise": PALETTE[1], "other": PALETTE[6]}
    body = [f"<text x='8' y='18' font-size='13' font-weight='bold'>{_e(title)}</text>",
            f"<text x='{label_w}' y='38' font-weight='bold'>{'host ms (share)' if timed else 'MACs (share)'}</text>",
            f"<text x='{label_w + col_w + 30}' y='38' font-weight='bold'>"
            f"{'weights held by the runtime (KB)' if timed else 'weights (KB)'}</text>"]
    lx = w - 230
    for i, (k, c) in enumerate(kind_color.items()):
        body.append(f"<rect x='{lx + i * 75}' y='8' width='10' height='10' fill='{c}'/>"
                    f"<text x='{lx + i * 75 + 14}' y='17' font-size='11'>{k}</text>")
    vmax = max(lc.get(key) or 0 for lc in ranked) or 1
    y = 46
    for lc in ranked:
        v = lc.get(key) or 0
        name = lc["name"]
        short = name if len(name) <= 38 else "…" + name[-37:]
        body.append(f"<text x='{label_w - 6}' y='{y + 11}' text-anchor='end' font-size='11'>"
                    f"<title>{_e(name)} ({_e(lc['op'])})</title>{_e(short)}</text>")
        bw = max(1.0, v / vmax * (col_w - 90))
        body.append(f"<rect x='{label_w}' y='{y}' width='{bw:.1f}' height='{bar_h}' "
                    f"fill='{kind_color.get(lc['kind'], PALETTE[6])}'/>")
        vtxt = f"{v:.3g} ms" if timed else f"{v / 1e6:.3g} M"
        body.append(f"<text x='{label_w + bw + 4:.1f}' y='{y + 11}' font-size='11'>{vtxt} ({100 * v / total:.0f} %)</text>")
        pb = lc.get("param_bytes") or 0
        pw = max(0.0, pb / ptotal * (col_w - 70))
        x2 = label_w + col_w + 30
        if pb:
            body.append(f"<rect x='{x2}' y='{y}' width='{max(1.0, pw):.1f}' height='{bar_h}' fill='#999'/>")
        body.append(f"<text x='{x2 + pw + 4:.1f}' y='{y + 11}' font-size='11'>{pb / 1024:.3g}</text>")
        y += bar_h + gap
    return _svg(w, h, body, title)


def pareto_points(results: Sequence[dict[str, Any]], profile_id: str | None, pct: str = "p50") -> list[dict[str, Any]]:
    """One point per result with an accuracy (latency at ``pct`` on the profile, best evidence first), the
    Pareto front flagged, the dense baseline (a file named ``dense.*``) flagged."""
    pts = []
    for r in results:
        if r.get("accuracy") is None:
            continue
        lat, prov = best_latency(r, profile_id)
        est = (r.get("device_estimates") or {}).get(profile_id or "", {})
        band = ((est.get("band") or {}).get("latency_ms") or {}).get(pct) if prov.startswith("estimated") else None
        pts.append({"name": _name(r), "latency_ms": lat[pct], "accuracy": r["accuracy"]["accuracy"],
                    "provenance": prov, "low": band[0] if band else None, "high": band[1] if band else None,
                    "dense": os.path.splitext(_name(r))[0] == "dense", "file_mb": float(r["file_mb"])})
    front, best = [], -math.inf
    for p in sorted(pts, key=lambda p: (p["latency_ms"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append(p["name"])
            best = p["accuracy"]
    for p in pts:
        p["pareto"] = p["name"] in front
    return pts


def _place_labels(anchors: Sequence[float], top: float, bottom: float, step: float) -> list[float]:
    """Label baselines for a column of labels: each as close to its anchor's height as it can be while no two are
    closer than ``step`` and all lie in [top, bottom] (labels in one column never overlap)."""
    order = sorted(range(len(anchors)), key=lambda i: anchors[i])
    ys = [0.0] * len(anchors)
    prev = top - step
    for i in order:
        ys[i] = prev = max(anchors[i], prev + step)
    over = prev - bottom
    if over > 0:  # pushed past the bottom: shift the stack up, keeping the spacing
        for i in order:
            ys[i] -= over
        prev = top - step
        for i in order:
            ys[i] = prev = max(ys[i], prev + step)
    return ys


def pareto_svg(results: Sequence[dict[str, Any]], profile: Profile | str | None, w: int = 760,
               h: int = 360, axis: str = "latency") -> str | None:
    """Accuracy against latency (``axis="latency"``, at the latency budget's percentile) or model file size
    (``"file"``) on ``profile``, its budget a dashed red vertical line (an arrow at the right edge when it lies
    far beyond every point), the dense baseline a black diamond, the latency Pareto front in orange. Point labels
    sit in a column right of the plot, one line apart, each joined to its point by a thin leader: they never
    overlap."""
    prof = profile if isinstance(profile, Profile) else None
    profile_id = prof.id if prof else profile
    lat_budget = prof.budgets.latency_ms if prof else None
    pct = lat_budget.percentile if lat_budget else "p50"
    pts = pareto_points(results, profile_id, pct)
    if len(pts) < 2:
        return None
    provs = {p["provenance"].split(" (")[0] for p in pts}
    if axis == "file":
        limit = prof.budgets.model_file_mb if prof else None
        key, unit, what = "file_mb", "MB", "model file"
        title = f"Accuracy vs model file size{f' for {profile_id}' if profile_id else ''}"
        for p in pts:
            p["low"] = p["high"] = None
    else:
        limit = lat_budget.value if lat_budget else None
        key, unit, what = "latency_ms", "ms", f"latency {pct}"
        title = f"Accuracy vs latency {pct}{f' on {profile_id}' if profile_id else ''} ({', '.join(sorted(provs))})"
    lab_w = 210  # the label column
    ml, mr, mt, mb = 56, 24 + lab_w, 30, 44
    xs = [p[key] for p in pts]
    ys = [p["accuracy"] for p in pts]
    far = max([*xs, *(p["high"] for p in pts if p["high"] is not None)])
    off_chart = limit is not None and limit > 3 * far  # drawn as an arrow, not squeezing every point to the left
    x0, x1 = 0.0, max(far, limit if limit is not None and not off_chart else 0.0) * 1.1
    ypad = max(1.0, (max(ys) - min(ys)) * 0.15)
    y0, y1 = max(0.0, min(ys) - ypad), min(100.0, max(ys) + ypad)
    pw, ph = w - ml - mr, h - mt - mb

    def X(v: float) -> float:
        return ml + (v - x0) / (x1 - x0) * pw

    def Y(v: float) -> float:
        return mt + ph - (v - y0) / (y1 - y0) * ph

    body = [f"<text x='{ml}' y='18' font-size='13' font-weight='bold'>{_e(title)}</text>",
            f"<line x1='{ml}' y1='{mt + ph}' x2='{ml + pw}' y2='{mt + ph}' stroke='#333'/>",
            f"<line x1='{ml}' y1='{mt}' x2='{ml}' y2='{mt + ph}' stroke='#333'/>"]
    for t in _nice_ticks(x0, x1):
        body.append(f"<line x1='{X(t):.1f}' y1='{mt}' x2='{X(t):.1f}' y2='{mt + ph}' stroke='#eee'/>"
                    f"<text x='{X(t):.1f}' y='{mt + ph + 16}' text-anchor='middle'>{t:g}</text>")
    for t in _nice_ticks(y0, y1):
        if y0 <= t <= y1:
            body.append(f"<line x1='{ml}' y1='{Y(t):.1f}' x2='{ml + pw}' y2='{Y(t):.1f}' stroke='#eee'/>"
                        f"<text x='{ml - 6}' y='{Y(t) + 4:.1f}' text-anchor='end'>{t:g}</text>")
    body.append(f"<text x='{ml + pw / 2}' y='{h - 8}' text-anchor='middle'>{what} ({unit})</text>")
    body.append(f"<text x='14' y='{mt + ph / 2}' transform='rotate(-90 14 {mt + ph / 2})' "
                f"text-anchor='middle'>top-1 accuracy (%)</text>")
    if limit is not None:  # the device's budget: points left of the line meet it
        tip = f"<title>{what} budget of {_e(profile_id)}: &lt;= {limit:.4g} {unit}</title>"
        if off_chart:
            xb, ym = ml + pw, mt + 8
            body.append(f"<path class='budget' d='M{xb - 14:.1f},{ym}H{xb:.1f}M{xb - 5:.1f},{ym - 4}L{xb:.1f},{ym}"
                        f"L{xb - 5:.1f},{ym + 4}' stroke='{BAD}' stroke-width='1.5' fill='none'>{tip}</path>")
        else:
            xb = X(limit)
            body.append(f"<line class='budget' x1='{xb:.1f}' y1='{mt}' x2='{xb:.1f}' y2='{mt + ph}' stroke='{BAD}' "
                        f"stroke-width='1.5' stroke-dasharray='6,4'>{tip}</line>")
    front = sorted((p for p in pts if p["pareto"]), key=lambda p: p["latency_ms"])
    if len(front) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{X(p[key]):.1f},{Y(p['accuracy']):.1f}" for i, p in enumerate(front))
        body.append(f"<path d='{d}' fill='none' stroke='{PALETTE[1]}' stroke-width='2'/>")
    texts = [(p, f"{p['name'][:26]}{' (baseline)' if p['dense'] else ''}") for p in pts]
    if limit is not None:
        texts.append((None, f"budget {limit:.3g} {unit}{' (off the chart →)' if off_chart else ''}"))
    anchors = [Y(p["accuracy"]) + 4 if p else mt + 12 for p, _ in texts]
    lx = ml + pw + 24
    for (p, text), ly in zip(texts, _place_labels(anchors, mt + 10, mt + ph, 15), strict=True):
        if p is None:
            body.append(f"<line x1='{lx - 22}' y1='{ly - 4:.1f}' x2='{lx - 4}' y2='{ly - 4:.1f}' stroke='{BAD}' "
                        f"stroke-width='1.5' stroke-dasharray='6,4'/><text class='label' x='{lx}' y='{ly:.1f}' "
                        f"font-size='11' fill='{BAD}'>{_e(text)}</text>")
            continue
        c = "#111" if p["dense"] else (PALETTE[1] if p["pareto"] else PALETTE[6])
        px, py = X(p[key]), Y(p["accuracy"])
        if p["low"] is not None and p["high"] is not None:  # the estimate's error band on the latency axis
            body.append(f"<path class='errorbar' d='M{X(p['low']):.1f},{py:.1f}H{X(p['high']):.1f}M{X(p['low']):.1f},"
                        f"{py - 4:.1f}v8M{X(p['high']):.1f},{py - 4:.1f}v8' stroke='{c}' stroke-width='1.5' "
                        f"fill='none'><title>error band {p['low']:.3g}–{p['high']:.3g} ms</title></path>")
        tip = f"<title>{_e(p['name'])}: {p[key]:.3g} {unit}, {p['accuracy']:.2f} % ({_e(p['provenance'])})</title>"
        if p["dense"]:
            body.append(f"<path class='dense' d='M{px:.1f},{py - 7:.1f}l7,7l-7,7l-7,-7z' fill='#111'>{tip}</path>")
        else:
            body.append(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='5' fill='{c}'>{tip}</circle>")
        bold = " font-weight='bold'" if p["dense"] else ""
        body.append(f"<path d='M{px + 6:.1f},{py:.1f}L{lx - 4},{ly - 4:.1f}' stroke='#bbb' stroke-width='0.8' "
                    f"fill='none'/><text class='label' x='{lx}' y='{ly:.1f}' font-size='11' fill='{c}'{bold}>"
                    f"{_e(text)}</text>")
    return _svg(w, h, body, title)


def device_charts(results: Sequence[dict[str, Any]], profile: Profile) -> list[str]:
    """The charts of one device: accuracy vs latency, and accuracy vs file size when the profile has a file budget."""
    axes = ["latency"] + (["file"] if profile.budgets.model_file_mb is not None else [])
    return [svg for svg in (pareto_svg(results, profile, axis=a) for a in axes) if svg]


# ------------------------------------------------------------------------------------------------ documents
def _summary_rows(results: Sequence[dict[str, Any]], profiles: Sequence[Profile]) -> list[list[str]]:
    rows = []
    for r in results:
        lat = r["latency_ms"]
        row = [_name(r), r["runtime"], str(r["threads"]), f"{lat['p50']:.3g} / {lat['p90']:.3g} / {lat['p99']:.3g}",
               r.get("provenance", "measured-host")]
        for p in profiles:
            row.append(_estimate_cell((r.get("device_estimates") or {}).get(p.id, {})))
        row += [f"{r['peak_memory_mb']:.3g}", f"{r['file_mb']:.3g}",
                f"{r['accuracy']['accuracy']:.2f}" if r.get("accuracy") else "—"]
        rows.append(row)
    return rows


def _estimate_cell(est: dict[str, Any]) -> str:
    if not est.get("available"):
        return "—"
    e = est["latency_ms"]
    b = (est.get("band") or {}).get("latency_ms")
    band = f" (p90 band {b['p90'][0]:.3g}–{b['p90'][1]:.3g})" if b else " (band unknown)"
    return f"{e['p50']:.3g} / {e['p90']:.3g}{band}"


def _summary_header(profiles: Sequence[Profile]) -> list[str]:
    return (["model", "runtime", "threads", "host p50 / p90 / p99 ms", "provenance"]
            + [f"{p.id} est. p50 / p90 ms" for p in profiles] + ["peak MB", "file MB", "top-1 %"])


_VERDICT_MD = {"pass": "pass", "fail": "**FAIL**", "uncertain": "**UNCERTAIN**"}


def render_markdown(results: Sequence[dict[str, Any]], profiles: Sequence[Profile],
                    checks: Sequence[dict[str, Any]] | None = None) -> str:
    hdr = _summary_header(profiles)
    out = ["# chita-edge benchmark report", "",
           "Figures are per inference, batch 1. `measured-host`: this machine; `measured-device`: on the device "
           "over SSH; `estimated-device (...)`: host latency × the profile's calibrated factor. "
           "Plots: see report.html.", "", *headline_markdown(headline_rows(results, profiles)),
           "## Every file", "", "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    out += ["| " + " | ".join(row) + " |" for row in _summary_rows(results, profiles)]
    for p in profiles:
        out += ["", f"## {p.id}: {p.name}", "", f"Profile confidence: **{p.confidence}**.", "",
                *([f"Notes: {p.notes}", ""] if p.notes else [])]
        for r in results:
            est = (r.get("device_estimates") or {}).get(p.id, {})
            prov = est.get("provenance") if est.get("available") else est.get("reason", "no estimate")
            out.append(f"- `{_name(r)}`: {prov}")
        rows = [(r, row) for r in results for row in budget_rows(r, p)]
        if rows:
            out += ["", "| model | budget | value | band | limit | result | provenance |",
                    "|---|---|---|---|---|---|---|"]
            for r, row in rows:
                band = "—" if row["low"] is None else f"{_fmt(row['low'])}–{_fmt(row['high'])} {row['unit']}"
                out.append(f"| {_name(r)} | {row['name']} | {_fmt(row['value'])} {row['unit']} | {band} | "
                           f"{_fmt(row['limit'])} {row['unit']} | {_VERDICT_MD[row['verdict']]} | {row['provenance']} |")
    if checks:
        out += ["", "## Gate", "", "| check | limit | value | result | band | provenance |", "|---|---|---|---|---|---|"]
        for c in checks:
            out.append(f"| {c['name']} | {c['comparison']} {c['limit']:.4g} {c['unit']} | {c['value']:.4g} {c['unit']} | "
                       f"{result_word(c)} | {band_text(c)} | {c['provenance']} |")
    pts = pareto_points(results, profiles[0].id if profiles else None)
    if len(pts) >= 2:
        out += ["", "## Accuracy vs latency", "", "| model | latency p50 ms | top-1 % | Pareto | provenance |",
                "|---|---|---|---|---|"]
        out += [f"| {p['name']} | {p['latency_ms']:.3g} | {p['accuracy']:.2f} | {'yes' if p['pareto'] else ''} | "
                f"{p['provenance']} |" for p in sorted(pts, key=lambda p: p["latency_ms"])]
    for r in results:
        layers = r.get("layers") or []
        timed = bool(layers) and all(lc.get("ms") is not None for lc in layers)
        if layers:
            key = "ms" if timed else "macs"
            out += ["", f"## Layers of {_name(r)} (top 10 by {'host time' if timed else 'MACs'})", "",
                    f"| layer | op | kind | {'ms' if timed else 'MACs'} | weights KB |", "|---|---|---|---|---|"]
            for lc in sorted(layers, key=lambda lc: lc.get(key) or 0, reverse=True)[:10]:
                v = lc.get(key) or 0
                out.append(f"| {lc['name']} | {lc['op']} | {lc['kind']} | {v:.3g} | {(lc.get('param_bytes') or 0) / 1024:.3g} |")
    return "\n".join(out) + "\n"


CSS = """body{font-family:Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f4f4f4}.pass{color:#2e8b57;font-weight:bold}.fail{color:#c0392b;font-weight:bold}
.unsure{color:#d68910;font-weight:bold}
.prov{color:#555;font-size:12px}figure{margin:12px 0}"""


def render_html(results: Sequence[dict[str, Any]], profiles: Sequence[Profile],
                checks: Sequence[dict[str, Any]] | None = None) -> str:
    hdr = _summary_header(profiles)
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>chita-edge benchmark report</title>",
             f"<style>{CSS}</style></head><body><h1>chita-edge benchmark report</h1>",
             "<p class='prov'>Per inference, batch 1. <b>measured-host</b>: this machine; <b>measured-device</b>: on "
             "the device over SSH; <b>estimated-device (…)</b>: host latency × the profile's calibrated factor.</p>",
             headline_html(headline_rows(results, profiles)), "<h2>Every file</h2><table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in hdr) + "</tr>"]
    for row in _summary_rows(results, profiles):
        parts.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    if checks:
        parts.append("<h2>Gate</h2><table><tr><th>check</th><th>limit</th><th>value</th><th>result</th>"
                     "<th>band</th><th>provenance</th></tr>")
        for c in checks:
            v = c.get("verdict") or ("pass" if c["passed"] else "fail")
            cls = {"pass": "pass", "fail": "fail"}.get(v, "unsure")
            word = result_word(c).replace("*", "")
            note = f"<br>{_e(c['note'])}" if c.get("note") else ""
            parts.append(f"<tr><td>{_e(c['name'])}</td><td>{_e(c['comparison'])} {c['limit']:.4g} {_e(c['unit'])}</td>"
                         f"<td>{c['value']:.4g} {_e(c['unit'])}</td><td class='{cls}'>{_e(word)}</td>"
                         f"<td>{_e(band_text(c))}</td><td class='prov'>{_e(c['provenance'])}{note}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Latency distribution</h2>")
    for i, r in enumerate(results):
        parts.append(f"<figure>{latency_histogram_svg(r, PALETTE[i % len(PALETTE)])}</figure>")
    for p in profiles:
        budget_note = f" Notes: {_e(p.notes)}" if p.notes else ""
        parts.append(f"<h2>{_e(p.id)}</h2><p class='prov'>Profile confidence: <b>{_e(p.confidence)}</b>.{budget_note} "
                     "Bars: green "
                     "pass, red fail, amber uncertain (the budget inside the estimate's error band, or a host "
                     "timing); black whiskers: the estimate's out-of-sample error band.</p>"
                     f"<figure>{budget_bars_svg(results, p)}</figure><ul class='prov'>")
        for r in results:
            est = (r.get("device_estimates") or {}).get(p.id, {})
            txt = est.get("provenance") if est.get("available") else est.get("reason", "no estimate")
            parts.append(f"<li>{_e(_name(r))}: {_e(txt)}</li>")
        parts.append("</ul>")
    charts = [svg for p in profiles for svg in device_charts(results, p)] if profiles else \
        [svg for svg in [pareto_svg(results, None)] if svg]
    if charts:
        parts.append("<h2>Accuracy vs latency</h2>" + "".join(f"<figure>{svg}</figure>" for svg in charts))
    for r in results:
        svg = layers_svg(r)
        if svg:
            parts.append(f"<h2>Layers of {_e(_name(r))}</h2><figure>{svg}</figure>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(out_dir: str | os.PathLike, results: Sequence[dict[str, Any]], profiles: Sequence[Profile],
                 checks: Sequence[dict[str, Any]] | None = None) -> dict[str, str]:
    """Write report.json, report.md and report.html into ``out_dir`` (created if missing; files written atomically)."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise BadInput(f"--report {d}: exists and is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--report {d}: cannot create the directory ({e.strerror})") from None
    doc = {"format": "chita-edge/report-v1", "profiles": [p.model_dump(exclude_none=True) for p in profiles],
           "results": list(results), "checks": list(checks) if checks else None,
           "pareto": pareto_points(results, profiles[0].id if profiles else None),
           "headline": headline_rows(results, profiles)}  # what pruning bought (chita_edge.devices.headline)
    paths = {"json": str(d / "report.json"), "markdown": str(d / "report.md"), "html": str(d / "report.html")}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str))
    atomic_write_text(paths["markdown"], render_markdown(results, profiles, checks))
    atomic_write_text(paths["html"], render_html(results, profiles, checks))
    return paths
