"""Reports: report.json / report.md / self-contained report.html, and the HTML rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_bench import tiny_onnx  # noqa: F401  (fixture)

from chita_edge.devices.headline import headline_rows
from chita_edge.devices.profiles import load_profile, with_budgets
from chita_edge.devices.report import (
    BAD,
    OK,
    UNSURE,
    _place_labels,
    pareto_points,
    render_html,
    render_markdown,
    write_report,
)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def fake_result(name: str, p50: float, acc: float | None, file_mb: float, est_factor: float = 10.0,
                seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s = (p50 * (1 + 0.1 * rng.standard_normal(60))).clip(p50 * 0.5).tolist()
    lat = {"p50": float(np.percentile(s, 50)), "p90": float(np.percentile(s, 90)), "p99": float(np.percentile(s, 99)),
           "mean": float(np.mean(s))}
    prov = "estimated-device (calibrated, anchors R41:mobilenet_v1, R41:resnet18, fit error 10 %)"
    r = {"file": f"/m/{name}", "runtime": "onnxruntime", "runtime_version": "1.31", "threads": 1, "runs": 60,
         "latency_ms": lat, "samples_ms": s, "peak_memory_mb": 12.0 * file_mb, "file_mb": file_mb, "load_ms": 5.0,
         "provenance": "measured-host",
         "layers": [{"name": f"/layer{i}/conv", "op": "Conv", "kind": "depthwise" if i % 3 == 0 else "dense",
                     "ms": p50 / (i + 2), "param_bytes": 1024 * (i + 1), "macs": None} for i in range(20)],
         "device_estimates": {"sbc-rpi4": {"available": True, "provenance": prov, "confidence": "medium",
                                           "latency_ms": {k: v * est_factor for k, v in lat.items()},
                                           "band": {"low": 0.8, "high": 1.25, "latency_ms": {
                                               k: [0.8 * v * est_factor, 1.25 * v * est_factor]
                                               for k, v in lat.items()}}}}}
    if acc is not None:
        r["accuracy"] = {"accuracy": acc, "data": "npz:cifar10.npz", "test_examples": 10000}
    return r


RESULTS = [fake_result("dense.onnx", 2.0, 91.0, 1.05, seed=1), fake_result("s50.onnx", 1.2, 90.2, 0.5, seed=2),
           fake_result("s90.onnx", 0.5, 86.0, 0.11, seed=3), fake_result("bad.onnx", 1.5, 80.0, 0.6, seed=4)]


def test_pareto_front_is_the_non_dominated_set():
    pts = {p["name"]: p for p in pareto_points(RESULTS, "sbc-rpi4")}
    assert {n for n, p in pts.items() if p["pareto"]} == {"dense.onnx", "s50.onnx", "s90.onnx"}
    assert pts["bad.onnx"]["provenance"].startswith("estimated-device")
    assert pts["dense.onnx"]["latency_ms"] == pytest.approx(RESULTS[0]["latency_ms"]["p50"] * 10)


def test_report_files_are_complete_and_self_contained(tmp_path):
    prof = load_profile("sbc-rpi4")
    paths = write_report(tmp_path / "rep", RESULTS, [prof])
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["format"] == "chita-edge/report-v1" and len(doc["results"]) == 4 and doc["profiles"][0]["id"] == "sbc-rpi4"
    html = Path(paths["html"]).read_text()
    assert html.count("<svg") == 4 + 1 + 2 + 4  # histograms, budget bars, accuracy vs latency and vs file, layers
    assert "<script" not in html and not re.search(r"(src|href)=['\"]?(https?:|//)", html)
    assert "Accuracy vs latency" in html and "estimated-device (calibrated, anchors R41" in html
    md = Path(paths["markdown"]).read_text()
    assert "| dense.onnx | onnxruntime | 1 |" in md and "## Accuracy vs latency" in md
    assert "R41:mobilenet_v1" in md


def test_budget_bars_are_red_when_broken_and_pareto_needs_two_accuracies(tmp_path):
    prof = load_profile("sbc-rpi4")  # latency p90 budget 100 ms
    slow = fake_result("slow.onnx", 20.0, None, 1.0, est_factor=10.0)  # ~200 ms on the Pi: broken
    html = render_html([slow], [prof])
    assert f"fill='{BAD}'" in html and "Accuracy vs latency" not in html
    fast = render_html([fake_result("fast.onnx", 1.0, None, 1.0)], [prof])
    assert f"fill='{BAD}'" not in fast and f"fill='{OK}'" in fast
    # the estimate's error band is drawn; a budget inside it is neither green nor red
    assert "class='errorbar'" in fast and re.search(r"\(\d+ %, band [\d.]+–[\d.]+\)", fast)
    mid = fake_result("mid.onnx", 9.0, None, 1.0)  # p90 ~105 ms on the Pi, band ~84-131 ms vs 100 ms
    html = render_html([mid], [prof])
    assert f"fill='{UNSURE}'" in html and f"fill='{BAD}'" not in html
    assert "**UNCERTAIN**" in render_markdown([mid], [prof])
    assert "**FAIL**" in render_markdown([slow], [prof])


def _png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB/RGBA PNG (what Chromium writes) with the standard library."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    out = np.zeros((h, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        elif f == 1:  # Sub: a running sum per channel
            cur = (np.cumsum(line.reshape(w, bpp), axis=0) & 255).reshape(-1)
        else:  # Sub, Average, Paeth depend on the left neighbour: decode byte by byte
            cur = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + pred) & 255
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)[:, :, :3].astype(np.float32)


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium) for the HTML screenshot")
def test_html_report_renders_in_headless_chromium(tiny_onnx, tmp_path):  # noqa: F811
    rep = tmp_path / "rep"
    r = run_cli("bench", tiny_onnx, "--runs", "20", "--warmup", "1", "--report", rep)
    assert r.code == 0, r.stderr
    # add the synthetic multi-model page too: Pareto and budget bars
    write_report(tmp_path / "multi", RESULTS, [load_profile("sbc-rpi4")])
    for page in (rep / "report.html", tmp_path / "multi" / "report.html"):
        shot = tmp_path / f"{page.parent.name}.png"
        udd = tmp_path / f"chromium-{page.parent.name}"
        p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={udd}", "--enable-logging=stderr", "--v=0",
                            f"--screenshot={shot}", "--window-size=1000,1100", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
        assert shot.is_file(), p.stderr[-2000:]
        px = _png_pixels(shot)
        assert px.shape[0] >= 1000 and px.shape[1] >= 1000
        assert px.std() > 20  # not blank: text, bars and axes on white
        dark = (px.mean(axis=2) < 128).mean()
        assert 0.002 < dark < 0.5
        console = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
        assert console == [], console


# ------------------------------------------------------------------------- headline, budget line, labels
def _tight_rpi4():
    """sbc-rpi4 with budgets the dense fake (p50 2 ms host, x10 on the Pi; 1.05 MB) breaks and s90 meets."""
    prof = load_profile("sbc-rpi4")
    return prof.model_copy(update={"budgets": with_budgets(prof, latency_ms=12.0, percentile="p90", file_mb=0.5)})


def test_headline_compares_each_target_with_dense():
    prof = _tight_rpi4()
    dense, target = fake_result("dense.onnx", 2.0, 91.0, 1.05, seed=1), fake_result("sbc-rpi4.onnx", 0.5, 89.5, 0.11)
    rows = headline_rows([dense, target, fake_result("other.tflite", 0.4, 80.0, 0.1) | {"runtime": "litert"}], [prof])
    assert len(rows) == 1  # no dense file of the litert runtime: nothing to compare that one with
    r = rows[0]
    assert r["target"] == "sbc-rpi4" and r["file"] == "sbc-rpi4.onnx" and r["dense_file"] == "dense.onnx"
    assert r["latency_x"] == pytest.approx(dense["latency_ms"]["p90"] / target["latency_ms"]["p90"])
    assert r["latency_provenance"] == "estimated-device" and r["latency_percentile"] == "p90"
    assert r["size_x"] == pytest.approx(1.05 / 0.11) and r["accuracy_delta"] == pytest.approx(-1.5)
    assert (r["verdict"], r["dense_verdict"]) == ("pass", "fail")
    assert set(r["broken_by_dense_met_by_pruning"]) == {"latency p90", "model file"}
    html = render_html([dense, target], [prof])
    assert html.index("What pruning bought") < html.index("Every file") < html.index("<svg")
    assert "<td>9.55×</td>" in html and "class='budget'" in html and "class='dense'" in html
    md = render_markdown([dense, target], [prof])
    assert md.index("## What pruning bought") < md.index("## Every file") and "| sbc-rpi4 | sbc-rpi4.onnx |" in md


def test_label_column_keeps_labels_apart():
    ys = _place_labels([100.0, 100.0, 101.0, 300.0, 299.0], top=40, bottom=310, step=15)
    s = sorted(ys)
    assert all(b - a >= 15 - 1e-9 for a, b in zip(s, s[1:], strict=False)) and min(ys) >= 40 and max(ys) <= 310


BOXES_JS = """<script>
const out = [];
document.querySelectorAll('svg').forEach((svg, i) => {
  const labels = [...svg.querySelectorAll('text.label')];
  if (!labels.length) return;
  const all = [...svg.querySelectorAll('text')].map(t => {
    const r = t.getBoundingClientRect();
    return {svg: i, label: t.classList.contains('label'), text: t.textContent, x0: r.left, y0: r.top, x1: r.right, y1: r.bottom};
  });
  out.push(...all);
});
const pre = document.createElement('pre'); pre.id = 'label-boxes'; pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
</script>"""


def label_overlaps(page: Path, tmp_path: Path) -> tuple[int, list[tuple[str, str]]]:
    """Render ``page`` in headless Chromium with a script that records the boxes of every text of each chart that
    has point labels; returns (number of labels, pairs of texts whose boxes intersect, a label being one of them)."""
    probe = tmp_path / f"boxes-{page.parent.name}-{page.stem}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", BOXES_JS + "</body>"), encoding="utf-8")
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp_path / 'chromium-boxes'}", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"<pre id=\"label-boxes\">(.*?)</pre>", p.stdout, re.S)
    assert m, p.stderr[-2000:]
    boxes = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    bad = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a["svg"] == b["svg"] and (a["label"] or b["label"]) and a["x0"] < b["x1"] and b["x0"] < a["x1"] \
                    and a["y0"] < b["y1"] and b["y0"] < a["y1"]:
                bad.append((a["text"], b["text"]))
    return sum(b["label"] for b in boxes), bad


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install -y chromium) to measure the labels")
def test_chart_labels_do_not_overlap_in_chromium(tmp_path):
    # the dense point and a target's point on top of each other (the demo's old report), plus two close ones
    same = [fake_result("dense.onnx", 2.0, 91.0, 1.05, seed=1), fake_result("sbc-rpi4.onnx", 2.0, 91.0, 1.05, seed=1),
            fake_result("s50.onnx", 1.9, 90.9, 0.5, seed=2), fake_result("s90.onnx", 0.5, 86.0, 0.11, seed=3)]
    paths = write_report(tmp_path / "rep", same, [_tight_rpi4()])
    n, bad = label_overlaps(Path(paths["html"]), tmp_path)
    assert n == 2 * 5 and bad == []  # two charts (latency, file size): four points and the budget line each
