"""chita-edge sweep: one row per (profile, point), the sparsities reached, device estimates, the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chita_edge.devices import calibration
from chita_edge.devices.calibration import HostCalibration
from chita_edge.workflows.sweep import COLUMNS, table_rows

torch.set_num_threads(1)

DEMO = Path(__file__).resolve().parents[1] / "chita_edge" / "workflows" / "demo.py"
PROFILE = "phone-mid-sd670"


@pytest.fixture
def fake_host(monkeypatch):
    """Host timings of the reference models given, not measured (the real calibration takes a minute): the
    device estimates are still computed by chita_edge.devices.calibration.estimate from them."""
    refs = {m: {"p50_ms": v[0], "dense": v[1], "p50_spread": 0.0}
            for m, v in {"mobilenet_v1": (10.0, 0.75), "mobilenet_v2": (8.0, 0.6), "resnet18": (30.0, 0.98)}.items()}
    host = HostCalibration("onnxruntime", "test", 1, 224, {"cpu": "test"}, refs, "time")
    monkeypatch.setattr(calibration, "host_calibration", lambda *a, **k: host)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from chita_edge.workflows.demo import DigitsCNN, train_digits_cnn

    assert DigitsCNN  # the tiny model of the demo: 8x8 digits, ~15 k weights
    w = tmp_path_factory.mktemp("sweep") / "w.pt"
    train_digits_cnn(w, epochs=2)
    return w


def test_sweep_table_json_and_report(tmp_path, cli, weights, fake_host):
    out = tmp_path / "out"
    r = cli("sweep", f"{DEMO}:digits_cnn", "--weights", weights, "--data", "digits", "--profiles", PROFILE,
            "--sparsities", "0.5,0.8", "--method", "magnitude", "--grads", "64", "--runs", "5", "--warmup", "1",
            "--out", out, "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["mode"] == "sparsity" and doc["profiles"] == [PROFILE]
    pts = doc["points"]
    assert [p["point"] for p in pts] == ["dense", "s=0.5", "s=0.8"]
    assert all(p["profile"] == PROFILE for p in pts)
    # the sparsities asked for are the sparsities reached (of the prunable weights)
    assert [p["value"] for p in pts[1:]] == [0.5, 0.8]
    for p in pts[1:]:
        assert p["sparsity"] == pytest.approx(p["value"], abs=0.01)
    assert pts[0]["sparsity"] == 0.0
    for p in pts:
        assert 0.0 <= p["accuracy"] <= 100.0
        assert p["host_p50_ms"] > 0 and p["file_mb"] > 0
        assert p["device_p50_ms"] is not None and p["device_p50_ms"] > 0  # estimated for the profile
        assert p["latency_provenance"].startswith("estimated-device")
        assert Path(p["file"]).is_file() and Path(p["file"]).parent == out / "files"
    # the exported file's accuracy is the pruned model's (torch) accuracy
    for p in pts[1:]:
        assert p["accuracy"] == pytest.approx(p["torch_accuracy"], abs=0.5)
    assert pts[0]["accuracy"] == pytest.approx(doc["dense_torch_accuracy"], abs=0.5)
    # the report: chita_edge.devices.report's files with the sweep added, one Pareto chart for the device
    for name in ("report.json", "report.md", "report.html"):
        assert (out / name).is_file()
    rep = json.loads((out / "report.json").read_text())
    assert rep["format"] == "chita-edge/report-v1" and len(rep["results"]) == 3
    assert [p["point"] for p in rep["sweep"]["points"]] == ["dense", "s=0.5", "s=0.8"]
    page = (out / "report.html").read_text()
    assert "Sweep: accuracy vs latency per device" in page
    assert f"Accuracy vs latency p90 on {PROFILE}" in page  # at the latency budget's percentile, budget drawn
    assert "| s=0.8 |" in (out / "report.md").read_text()

    # the table the command prints: one row per (profile, point)
    rows = table_rows(doc)
    assert len(rows) == 3 and all(len(row) == len(COLUMNS) for row in rows)
    assert [row[:3] for row in rows] == [[PROFILE, "dense", "0.000"], [PROFILE, "s=0.5", "0.500"],
                                         [PROFILE, "s=0.8", "0.800"]]
    assert all(c != "—" for row in rows for c in row)  # every figure is there, the device estimate included


@pytest.mark.parametrize("args, needle", [
    (["--sparsities", "0.5", "--latency-fractions", "0.5"], "exactly one of"),
    ([], "exactly one of"),
    (["--sparsities", "0.5,1.2"], "--sparsities 1.2"),
    (["--sparsities", "0.5,x"], "comma-separated fractions"),
    (["--latency-fractions", "0.5,0.5"], "each point once"),
])
def test_sweep_bad_input_is_one_line(cli, args, needle):
    r = cli("sweep", f"{DEMO}:digits_cnn", "--data", "digits", "--profiles", PROFILE, *args)
    assert r.code == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_sweep_unknown_profile(cli):
    r = cli("sweep", f"{DEMO}:digits_cnn", "--data", "digits", "--profiles", "no-such-board", "--sparsities", "0.5")
    assert r.code == 2 and "no-such-board" in r.stderr


def test_sweep_never_writes_over_an_input(tmp_path, cli):
    out = tmp_path / "sweep"
    (out / "files").mkdir(parents=True)
    w = out / "files" / "w.pt"  # the sweep's own files go there
    torch.save({"x": torch.zeros(1)}, w)
    r = cli("sweep", f"{DEMO}:digits_cnn", "--weights", w, "--data", "digits", "--profiles", PROFILE,
            "--sparsities", "0.5", "--out", out)
    assert r.code == 2 and "writes its files into" in r.stderr and "--weights" in r.stderr
    page = out / "report.html"  # a file the report replaces, given as an input
    page.write_text("mine")
    r = cli("sweep", f"{DEMO}:digits_cnn", "--data", f"npz:{page}", "--profiles", PROFILE, "--sparsities", "0.5",
            "--out", out)
    assert r.code == 2 and "is the input --data" in r.stderr and page.read_text() == "mine"
    assert sorted(p.name for p in out.rglob("*")) == ["files", "report.html", "w.pt"]
