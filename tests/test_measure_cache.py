"""The measurement cache (``budget.measure``): an entry whose repeats stopped early because they settled one
search's decisions is reused by a later request only where it settles that request's decisions too (or is as
precise as its limits allow); otherwise more benchmark processes are run on top of its samples and it is updated."""

from __future__ import annotations

import itertools
import json

import torch
from torch import nn

from chita_edge.budget import measure
from chita_edge.budget.measure import measure_model
from chita_edge.devices.profiles import load_profile

NOISY = [1.0, 1.1, 0.9, 1.05, 0.95, 1.08, 0.93]  # never within 3 % in these few repeats
KW = {"percentile": "p90", "runs": 1, "repeats": 3, "precision": 0.03, "max_repeats": 7, "reuse": True}


def far(m):  # a 30 ms limit: a ~2 ms interval settles it after three repeats
    return m["latency_interval"][1] < 30.0


def near(m):  # a limit at 2.04 ms, inside the interval of the noisy figures: never settled
    return not m["latency_interval"][0] <= 2.04 <= m["latency_interval"][1]


def _bench(monkeypatch, tmp_path, values=NOISY):
    """A fake benchmark cycling through ``values`` (device estimate 2x), a fixed file and a fresh cache."""
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path / "cache"))
    prof = load_profile("watch-a55-dual")
    it, calls = itertools.cycle(values), []

    def fake_bench(path, profiles, cfg):
        calls.append(v := next(it))
        return {"latency_ms": {"p90": v}, "peak_memory_mb": 5.0 + len(calls), "file_mb": 0.5,
                "device_estimates": {prof.id: {"available": True, "latency_ms": {"p90": 2 * v}, "provenance": "est",
                                               "dense_fraction": 1.0}}}

    monkeypatch.setattr(measure, "export_model", lambda model, cfg, *, out, **kw: out.write_bytes(b"same bytes"))
    monkeypatch.setattr(measure, "benchmark", fake_bench)
    return prof, calls


def _measure(prof, path, decided):
    return measure_model(nn.Linear(2, 2), torch.rand(1, 2), prof, path, decided=decided, **KW)


def test_an_early_stopped_entry_is_measured_further_for_a_decision_it_does_not_settle(monkeypatch, tmp_path):
    prof, calls = _bench(monkeypatch, tmp_path)
    a = _measure(prof, tmp_path / "a.onnx", far)
    assert len(calls) == 3 and a["precise"] is False and not a["cached"]  # stopped early: far from its limit
    assert _measure(prof, tmp_path / "b.onnx", far)["cached"] and len(calls) == 3  # same decision: reused
    b = _measure(prof, tmp_path / "c.onnx", near)  # a limit inside its interval: three repeats do not settle it
    assert not b["cached"] and len(calls) == 7 and b["repeats"] == 7
    assert b["latency_samples"] == [2 * v for v in NOISY] and b["memory_samples"][:3] == a["memory_samples"]
    assert b["latency_interval"][0] <= 2.04 <= b["latency_interval"][1]  # as measured at full length, unsettled
    # the entry was updated: the same request (at its most repeats) and the first one both reuse it now
    c = _measure(prof, tmp_path / "d.onnx", near)
    assert c["cached"] and c["repeats"] == 7 and len(calls) == 7
    assert _measure(prof, tmp_path / "e.onnx", far)["repeats"] == 7 and len(calls) == 7


def test_a_precise_entry_is_reused_whatever_the_decision(monkeypatch, tmp_path):
    prof, calls = _bench(monkeypatch, tmp_path, [1.0, 1.01, 0.99])
    a = _measure(prof, tmp_path / "a.onnx", far)
    assert a["precise"] and len(calls) == 3
    assert _measure(prof, tmp_path / "b.onnx", near)["cached"] and len(calls) == 3


def test_an_entry_without_its_samples_is_measured_again_from_scratch(monkeypatch, tmp_path):
    prof, calls = _bench(monkeypatch, tmp_path)
    _measure(prof, tmp_path / "a.onnx", far)
    cache = next((tmp_path / "cache").glob("measurements-*.json"))
    doc = json.loads(cache.read_text())
    for e in doc["entries"].values():  # as an older version wrote it: no host or dense-fraction samples
        del e["host_samples"], e["dense_samples"]
    cache.write_text(json.dumps(doc))
    b = _measure(prof, tmp_path / "b.onnx", near)
    assert not b["cached"] and len(calls) == 3 + 7 and b["repeats"] == 7
