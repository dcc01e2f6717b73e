"""chita-edge demo end to end: offline, exit 0, a budget the dense model breaks and pruning meets (from the report's
JSON), chart labels that do not overlap in Chromium; a second run skips every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_report import CHROMIUM, label_overlaps

from chita_edge.devices.profiles import load_profile
from chita_edge.workflows.demo import FILE_FRACTION, PHONE, WATCH, DigitsMLP, demo_profiles


def test_demo_end_to_end(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path / "cache"))  # a fresh machine: nothing calibrated yet
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--json")
    assert r.code == 0, r.stderr
    s = r.json()
    assert s["passed"] and {v["profile"] for v in s["verdicts"]} == {"phone-mid-sd670", "watch-a55-dual"}
    assert all(v["checks"] for v in s["verdicts"])
    assert s["formats"] == ["onnx"] and any("add --tflite" in n for n in s["notes"])  # TFLite: opt-in
    assert any("set from the dense model" in n for n in s["notes"])  # the output says where the budget came from

    # what pruning bought, read from the report's JSON: a budget the dense file breaks and the pruned file meets
    doc = json.loads(Path(s["report"]["json"]).read_text())
    rows = doc["headline"]
    assert {r["target"] for r in rows} == {"phone-mid-sd670", "watch-a55-dual"}
    for row in rows:
        assert row["verdict"] == "pass" and row["dense_verdict"] == "fail"
        assert "model file" in row["broken_by_dense_met_by_pruning"]
        assert row["size_x"] > 1 / 0.3 * 0.99  # at least the budget's factor smaller
        assert row["latency_x"] > 1.5  # measured: fewer hidden units, faster
        assert row["accuracy_delta"] is not None and row["accuracy"] >= 90
    budgets = {p["id"]: p for p in doc["profiles"]}
    assert all("set from the dense model" in p["notes"] for p in budgets.values())

    index = Path(s["report"]["index"])
    html = index.read_text()
    assert "Verdict: every budget holds" in html and html.count("<svg") >= 2  # one Pareto chart per device
    assert html.count("class='budget'") >= 2 and html.count("class='dense'") >= 2  # budget line, dense marked
    assert "What pruning bought" in Path(s["report"]["html"]).read_text()

    if CHROMIUM:
        for page in (index, Path(s["report"]["html"])):
            n, bad = label_overlaps(page, tmp_path)
            assert n >= 4 and bad == [], (page.name, bad)

    r2 = cli("demo", "--out", out, "--json")  # unchanged: every stage is skipped
    assert r2.code == 0 and {x["status"] for x in r2.json()["stages"]} == {"skipped"}


def test_demo_budget_is_set_from_the_dense_file(tmp_path):
    base = [load_profile(PHONE), load_profile(WATCH)]
    paths = demo_profiles({"file_mb": 4.0}, base, tmp_path)
    for p, b in zip(paths, base, strict=True):
        prof = load_profile(p)
        assert prof.id == b.id and prof.budgets.model_file_mb == pytest.approx(FILE_FRACTION * 4.0)
        assert prof.budgets.latency_ms == b.budgets.latency_ms and prof.budgets.peak_memory_mb == b.budgets.peak_memory_mb
        assert "set from the dense model" in prof.notes and "4 MB" in prof.notes
    mtime = paths[0].stat().st_mtime_ns
    assert demo_profiles({"file_mb": 4.0}, base, tmp_path) == paths and paths[0].stat().st_mtime_ns == mtime  # unchanged


def test_digits_mlp_is_wide_enough_to_show_a_speedup():
    m = DigitsMLP()
    assert sum(p.numel() for p in m.parameters()) > 1_000_000  # a 4 MB file: weights, not per-call overhead, dominate
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)
