"""chita-edge demo end to end: offline, exit 0, a report whose HTML renders; a second run skips every stage."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path / "cache"))  # a fresh machine: nothing calibrated yet
    out = tmp_path / "demo"
    r = cli("demo", "--out", out, "--json")
    assert r.code == 0, r.stderr
    s = r.json()
    assert s["passed"] and {v["profile"] for v in s["verdicts"]} == {"phone-mid-sd670", "watch-a55-dual"}
    assert all(v["checks"] for v in s["verdicts"])
    assert ("tflite" in s["formats"]) or any("TFLite skipped" in n for n in s["notes"])
    index = Path(s["report"]["index"])
    html = index.read_text()
    assert "Verdict: every budget holds" in html and html.count("<svg") >= 2  # one Pareto chart per device
    assert Path(s["report"]["html"]).is_file()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        png = tmp_path / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1000,1400",
                        f"--screenshot={png}", index.as_uri()], capture_output=True, timeout=120)
        assert png.is_file() and png.stat().st_size > 20_000  # a rendered page, not a blank one

    r2 = cli("demo", "--out", out, "--json")  # unchanged: every stage is skipped
    assert r2.code == 0 and {x["status"] for x in r2.json()["stages"]} == {"skipped"}
