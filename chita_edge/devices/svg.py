"""The SVG primitives of the reports (``chita_edge.devices.report``): colours, escaping, ticks, the document."""

from __future__ import annotations

import html
import math
import os
from typing import Any

PALETTE = ["#3366cc", "#dc7633", "#28a745", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#d4ac0d"]
OK, BAD, UNSURE = "#2e8b57", "#c0392b", "#d68910"
VERDICT_COLOR = {"pass": OK, "fail": BAD, "uncertain": UNSURE}
FONT = "font-family='Helvetica, Arial, sans-serif'"


def esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def file_name(result: dict[str, Any]) -> str:
    return os.path.basename(result["file"])


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    return f"{v:.3g}{unit}" if abs(v) < 100 else f"{v:.0f}{unit}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + 1e-9]


def svg_doc(w: int, h: int, body: list[str], title: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img' "
            f"aria-label='{esc(title)}' {FONT} font-size='12'><rect width='{w}' height='{h}' fill='white'/>"
            + "".join(body) + "</svg>")


__all__ = ["BAD", "FONT", "OK", "PALETTE", "UNSURE", "VERDICT_COLOR", "esc", "file_name", "fmt", "nice_ticks", "svg_doc"]
