"""bench: the child process, its statistics and memory, the host calibration and the device estimate."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn

from chita_edge.core.errors import BadInput, RuntimeFailure
from chita_edge.devices.band import TAIL_WIDENING
from chita_edge.devices.bench import BenchConfig, benchmark, best_latency
from chita_edge.devices.bench_child import measure
from chita_edge.devices.calibration import (
    REFERENCE_MODELS,
    HostCalibration,
    anchors_for,
    estimate,
    fit_profile,
    host_calibration,
    leave_one_out,
)
from chita_edge.devices.child import run_child
from chita_edge.devices.profiles import load_all, load_profile, parse_profile

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- helpers
class TinyNet(nn.Module):
    """A small CNN with dense, depthwise and pointwise convolutions and a classifier."""

    def __init__(self, width: int = 8, classes: int = 10, in_ch: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


class NanNet(nn.Module):
    def forward(self, x):
        return torch.log(-(x + 1.0)).flatten(1)


def export_onnx(module: nn.Module, path: Path, shape: tuple[int, ...], dynamic_batch: bool = False) -> Path:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.rand(*shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}} if dynamic_batch else None)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export_onnx(TinyNet(), tmp_path_factory.mktemp("tiny") / "tiny.onnx", (1, 3, 16, 16))


@pytest.fixture(scope="session")
def calib_env(tmp_path_factory):
    """A reduced host calibration in a temporary cache, shared by the session: two references (a depthwise-heavy
    and a dense one), 3 runs, no repeats (224 px costs no more than 64: exports and process starts dominate)."""
    keys = {"CHITA_EDGE_CACHE": str(tmp_path_factory.getbasetemp() / "chita-calib-cache"),
            "CHITA_EDGE_CALIB_MODELS": "mobilenet_v1,resnet18",
            "CHITA_EDGE_CALIB_RESOLUTION": "224", "CHITA_EDGE_CALIB_RUNS": "3", "CHITA_EDGE_CALIB_REPEATS": "1",
            "CHITA_EDGE_CALIB_WARMUP": "1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    yield keys
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def fake_host(**refs) -> HostCalibration:
    """A host calibration with given (p50_ms, dense) per reference model, no timing involved."""
    r = {m: {"p50_ms": v[0], "dense": v[1], "p50_spread": 0.0} for m, v in refs.items()}
    return HostCalibration("onnxruntime", "test", 1, 224, {"cpu": "test"}, r, "time")


# -------------------------------------------------------------------------------------------- child
def test_child_measures_latency_memory_layers(tiny_onnx):
    r = run_child(tiny_onnx, warmup=2, runs=20, profile_runs=3)
    lat = r["latency_ms"]
    assert len(r["samples_ms"]) == 20
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["p50"] == pytest.approx(float(np.percentile(r["samples_ms"], 50)), abs=2e-4)
    assert r["file_bytes"] == tiny_onnx.stat().st_size and r["file_mb"] == pytest.approx(r["file_bytes"] / 2**20)
    assert r["provenance"] == "measured-host" and r["runtime"] == "onnxruntime" and r["threads"] == 1
    assert r["input"]["shape"] == [1, 3, 16, 16] and r["load_ms"] > 0 and r["peak_memory_mb"] >= 0
    kinds = {lc["kind"] for lc in r["layers"]}
    assert {"dense", "depthwise"} <= kinds
    dw = [lc for lc in r["layers"] if lc["kind"] == "depthwise"]
    assert dw and all(lc["op"] in ("Conv", "FusedConv") for lc in dw)
    mix = r["op_mix"]
    assert mix["basis"] == "time" and math.isclose(mix["dense"] + mix["depthwise"] + mix["other"], 1.0)
    # weight bytes per layer (as ONNX Runtime holds them: blocked layouts pad channels) cover the parameters
    n_params = sum(p.numel() for p in TinyNet().parameters())
    assert 0.9 * 4 * n_params <= sum(lc["param_bytes"] for lc in r["layers"]) <= 1.5 * 4 * n_params + 64


def test_peak_memory_grows_with_the_weights(tmp_path, tiny_onnx):
    big = export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(768, 8192), nn.ReLU(), nn.Linear(8192, 10)),
                      tmp_path / "big.onnx", (1, 3, 16, 16))
    assert big.stat().st_size > 24 * 2**20
    rb = run_child(big, warmup=1, runs=3, profile_runs=0)
    rt = run_child(tiny_onnx, warmup=1, runs=3, profile_runs=0)
    assert rb["peak_memory_mb"] >= 24  # the weights are resident at least once
    assert rb["peak_memory_mb"] > rt["peak_memory_mb"] + 20
    assert rb["layers"] is None and rb["op_mix"] is None  # profile_runs=0: no per-layer pass


def test_child_failures_are_bad_input_or_runtime_failure(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(BadInput, match="junk.onnx: not a valid ONNX model"):
        run_child(junk, runs=1)
    nan = export_onnx(NanNet(), tmp_path / "nan.onnx", (1, 4))
    with pytest.raises(RuntimeFailure, match="NaN or Inf"):
        measure(str(nan), runs=1)  # in-process: the CLI test in test_gate covers the child's exit code 3
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    with pytest.raises(BadInput, match="unknown model format"):
        benchmark(other)
    with pytest.raises(BadInput, match="--runs 0"):
        benchmark(junk, cfg=BenchConfig(runs=0))


def test_cli_bench_json_and_exit_codes(tiny_onnx, tmp_path):
    r = run_cli("bench", tiny_onnx, "--runs", "5", "--warmup", "1", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert {"latency_ms", "peak_memory_mb", "file_mb", "load_ms", "provenance"} <= set(d)
    assert set(d["latency_ms"]) >= {"p50", "p90", "p99", "mean"}
    assert "device_estimate" not in d  # no profile given
    r = run_cli("bench", tmp_path / "missing.onnx", "--json")
    assert r.code == 2 and "model file not found" in r.stderr
    r = run_cli("bench", tiny_onnx, "--profile", "no-such-profile")
    assert r.code == 2 and "unknown id" in r.stderr
    r = run_cli("bench", tiny_onnx, "--runtime", "litert")
    assert r.code == 2 and "runs on onnxruntime, not litert" in r.stderr


# -------------------------------------------------------------------------------------- calibration
def test_reference_models_match_the_published_parameter_counts():
    counts = {k: sum(p.numel() for p in f().parameters()) for k, f in REFERENCE_MODELS.items()}
    assert counts == {"mobilenet_v1": 4_231_976, "mobilenet_v2": 3_504_872, "resnet18": 11_689_512}


def test_fit_recovers_a_known_two_factor_device_and_loo_is_exact():
    host = fake_host(mobilenet_v1=(10.0, 0.75), mobilenet_v2=(8.0, 0.6), resnet18=(30.0, 0.98))
    profs = load_all()
    rho_true = 4.0
    scale = {p.id: 0.3 + 0.2 * i for i, p in enumerate(profs)}
    synth = []
    for p in profs:
        d = p.model_dump()
        for row in d["calibration"]["rows"]:
            if row["model"] in host.references:
                ref = host.references[row["model"]]
                target = scale[p.id] * ref["p50_ms"] * (ref["dense"] + rho_true * (1 - ref["dense"]))
                clock = (row["clock_ghz"] / d["calibration"]["clock_ghz"]) if row.get("clock_ghz") else 1.0
                row["latency_ms"] = target / clock
        synth.append(type(p).model_validate(d))
    for p in synth:
        fit = fit_profile(p, host, synth)
        assert fit.rho == pytest.approx(rho_true, rel=0.03)
        assert fit.scale == pytest.approx(scale[p.id], rel=0.03)
        assert fit.fit_error < 0.02
    assert all(abs(r["error"]) < 0.03 for r in leave_one_out(synth, host))


def test_fit_on_real_rows_and_provenance_string():
    host = fake_host(mobilenet_v1=(8.2, 0.75), mobilenet_v2=(6.2, 0.8), resnet18=(24.2, 0.99))
    p = load_profile("sbc-rpi5")
    fit = fit_profile(p, host)
    assert fit.device_threads == 4 and {a.row for a in fit.anchors} == {"R43"}
    assert fit.provenance == f"estimated-device (calibrated, anchors R43:mobilenet_v2, R43:resnet18, fit error " \
                             f"{100 * fit.fit_error:.0f} % in-sample, {fit.band.describe()})"
    assert fit.band.basis == "pooled" and "leave-one-out, pooled over" in fit.band.describe()  # 2 anchors: too few
    e = estimate(p, host, {"p50": 2.0, "p90": 3.0, "p99": 4.0, "mean": 2.5}, {"dense": 1.0, "basis": "time"})
    assert e["available"] and e["factor"] == pytest.approx(fit.scale)
    # p50 from the calibration; p90/p99 = p50 x the stated widening (not this host's own, noisy, tail ratio)
    assert e["latency_ms"]["p50"] == pytest.approx(2.0 * fit.scale)
    assert e["latency_ms"]["p90"] == pytest.approx(2.0 * fit.scale * TAIL_WIDENING["p90"])
    assert e["latency_ms"]["p99"] == pytest.approx(2.0 * fit.scale * TAIL_WIDENING["p99"])
    assert 1 < TAIL_WIDENING["p90"] < TAIL_WIDENING["p99"] and e["tails"]["widening"] == TAIL_WIDENING
    assert f"p90/p99 = p50 x {TAIL_WIDENING['p90']:g} / {TAIL_WIDENING['p99']:g}" in e["provenance"]
    band_hi = e["band"]["latency_ms"]["p90"][1]
    assert band_hi == pytest.approx(e["latency_ms"]["p90"] * e["band"]["high"])  # the band rides on the widened tail
    # a depthwise-heavier model gets a larger factor when non-dense work is slower on the device
    e2 = estimate(p, host, {"p50": 2.0}, {"dense": 0.5, "basis": "time"})
    assert (e2["factor"] > e["factor"]) == (fit.rho > 1)


def test_estimate_records_the_thread_assumption_and_the_published_speedup():
    host = fake_host(mobilenet_v1=(8.2, 0.75), mobilenet_v2=(6.2, 0.8), resnet18=(24.2, 0.99))
    assert host.threads == 1
    e = estimate(load_profile("phone-mid-sd670"), host, {"p50": 1.0, "p90": 1.0}, {"dense": 0.9, "basis": "time"})
    th = e["threads"]
    assert th["host"] == 1 and th["anchors"] == 2 and "carries the anchors'" in th["correction"]
    # R16/R17: the same Pixel 3a at 1 and 2 threads (MobileNetV1 88 / 46 ms, ..., MobileNetV3-small 14 / 8 ms)
    assert th["published_speedup"] == pytest.approx({"R16:mobilenet_v1": 88 / 46, "R16:mobilenet_v2": 55 / 28,
                                                     "R17:mobilenet_v3_large": 44 / 24, "R17:mobilenet_v3_small": 14 / 8})
    assert "host 1 thread(s), anchors at 2: carries the anchors' thread speed-up (R16:mobilenet_v1 x1.91" \
        in e["provenance"] and e["fit"]["threads"] == th
    w = estimate(load_profile("watch-a55-dual"), host, {"p50": 1.0}, {"dense": 0.9, "basis": "time"})
    assert w["threads"]["anchors"] == 1 and w["threads"]["correction"].startswith("none needed")
    assert "anchors at 1)" in w["provenance"]


def test_uncalibrated_profile_has_no_estimate_and_says_why(tmp_path):
    text = (Path(__file__).parent / "test_profiles.py").read_text()
    good = text.split('GOOD = """\\\n')[1].split('"""')[0]
    p = parse_profile(good, "mine.yaml")
    host = fake_host(mobilenet_v1=(8.0, 0.7), mobilenet_v2=(6.0, 0.8), resnet18=(24.0, 0.99))
    e = estimate(p, host, {"p50": 1.0}, None)
    assert not e["available"] and "no calibration rows" in e["reason"]
    assert anchors_for(p, "onnxruntime") == []


def test_host_calibration_is_cached(calib_env):
    h1 = host_calibration("onnxruntime", 1)
    assert h1.resolution == 224 and set(h1.references) == {"mobilenet_v1", "resnet18"}
    assert Path(h1.path).is_file() and Path(h1.path).parent == Path(calib_env["CHITA_EDGE_CACHE"])
    for ref in h1.references.values():
        assert ref["p50_ms"] > 0 and 0 < ref["dense"] <= 1
    # ResNet18 is dense; MobileNetV1 spends a visible share in depthwise and other ops
    assert h1.references["resnet18"]["dense"] > h1.references["mobilenet_v1"]["dense"]
    mtime = Path(h1.path).stat().st_mtime_ns
    h2 = host_calibration("onnxruntime", 1)
    assert h2.references == h1.references and Path(h2.path).stat().st_mtime_ns == mtime


def test_bench_with_profiles_gives_estimates_with_provenance(tiny_onnx, tmp_path, calib_env):
    mine = tmp_path / "mine.yaml"
    mine.write_text((Path(__file__).parent / "test_profiles.py").read_text()
                    .split('GOOD = """\\\n')[1].split('"""')[0])
    r = run_cli("bench", tiny_onnx, "--profile", "sbc-rpi4", "--profile", str(mine), "--runs", "5", "--warmup", "1",
                "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    est = d["device_estimate"]
    assert est["profile"] == "sbc-rpi4"
    assert est["provenance"].startswith("estimated-device (calibrated, anchors R41:mobilenet_v1, R41:resnet18, "
                                        "fit error ")
    for k in ("p50", "p90", "p99", "mean"):
        tail = 1.0 if k in ("p50", "mean") else TAIL_WIDENING[k]
        base = d["latency_ms"]["p50"] if tail != 1.0 else d["latency_ms"][k]
        assert est["latency_ms"][k] == pytest.approx(base * est["factor"] * tail)
        lo, hi = est["band"]["latency_ms"][k]  # the leave-one-out error band travels with every estimate
        assert lo < est["latency_ms"][k] < hi
    assert est["confidence"] == "medium" and d["device_estimates"]["my-board"]["confidence"] == "medium"
    assert d["device_estimates"]["my-board"]["available"] is False
    lat, prov = best_latency(d, "my-board")
    assert prov == "measured-host" and lat == d["latency_ms"]
    json.dumps(d)  # plain JSON all the way down


def test_several_files_give_a_results_list(tiny_onnx, tmp_path):
    other = export_onnx(TinyNet(width=4), tmp_path / "small.onnx", (1, 3, 16, 16))
    r = run_cli("bench", tiny_onnx, other, "--runs", "3", "--warmup", "0", "--json")
    assert r.code == 0, r.stderr
    res = r.json()["results"]
    assert [Path(x["file"]).name for x in res] == ["tiny.onnx", "small.onnx"]
    assert res[1]["file_mb"] < res[0]["file_mb"]


def test_profiles_calibrate_cli_shows_every_fit(calib_env):
    r = run_cli("profiles", "calibrate", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["host_calibration"]["resolution"] == 224 and d["cache"].startswith(calib_env["CHITA_EDGE_CACHE"])
    fits = d["fits"]
    assert len(fits) >= 8 and all(f is not None for f in fits.values())
    rhos = {f["rho"] for f in fits.values()}
    assert len(rhos) == 1  # one pooled rho, a scale per profile
    r4 = fits["sbc-rpi4"]
    assert r4["device_threads"] == 4 and [(a["row"], a["kind"]) for a in r4["anchors"]] == [
        ("R41", "depthwise-heavy"), ("R41", "dense")]


@pytest.mark.tflite
def test_bench_runs_a_tflite_file_with_mac_costed_ops(tmp_path):
    pytest.importorskip("litert_torch", reason="needs the tflite extra (litert-torch, ai-edge-litert)")
    from chita_edge.exporters import tflite_format

    torch.manual_seed(0)
    f = tmp_path / "tiny.tflite"
    f.write_bytes(tflite_format.convert(TinyNet().eval(), torch.rand(1, 3, 16, 16)))
    r = run_child(f, warmup=1, runs=5)
    assert r["runtime"] == "litert" and r["xnnpack"] is True and len(r["samples_ms"]) == 5
    kinds = {lc["kind"]: lc for lc in r["layers"]}
    assert kinds["depthwise"]["macs"] == 16 * 16 * 8 * 9  # 8 channels, 3x3, 16x16 outputs
    assert r["op_mix"]["basis"] == "macs" and 0 < r["op_mix"]["depthwise"] < 0.5
    with pytest.raises(BadInput, match="runs on litert, not onnxruntime"):
        benchmark(f, cfg=BenchConfig(runtime="onnxruntime"))
