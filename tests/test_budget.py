"""chita_edge.budget: the greedy width search, the stages, impossible budgets, checkpoints and the CLI.

The cost model is replaced by an analytic stand-in (MACs-like latency, exact weight bytes) and the benchmark by a
stand-in measurement, so that these tests check the search and its plumbing, not this machine's timings.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import model_file, run_cli, tiny_mlp, tiny_resnet
from torch import nn

from chita_edge.budget import measure, methods, search
from chita_edge.budget.config import BudgetConfig, min_widths
from chita_edge.budget.costmodel import CostModel, Prediction
from chita_edge.budget.criteria import (
    BlockMoves,
    CurveCriterion,
    NormCriterion,
    greedy_widths,
    uniform_widths,
)
from chita_edge.budget.measure import measure_model
from chita_edge.budget.search import _schedule, prune_to_budget
from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, GateFailed
from chita_edge.devices.profiles import load_profile, with_budgets
from chita_edge.graph.plan import apply_plan
from chita_edge.models.loading import load_model
from chita_edge.pruning.channels import alive_channels, allowed_widths, channel_structure
from chita_edge.workflows import budget_jobs, jobs
from chita_edge.workflows.budget_jobs import raise_if_missed

torch.set_num_threads(1)


class FakeCostModel:
    """latency = 0.01 + sum over channel groups of cost_g * width_g - the savings of removed residual blocks (ms);
    memory/file from parameters."""

    def __init__(self, sizes: dict[str, int], costs: dict[str, float] | None = None,
                 blocks: dict[str, float] | None = None):
        self.sizes = dict(sizes)
        self.costs = costs or {g: 1.0 for g in sizes}
        self.block_ms = dict(blocks or {})
        self.blocks = {b: frozenset() for b in self.block_ms}

    def latency(self, widths, dropped=()):
        w = {**self.sizes, **widths}
        return 0.01 + sum(self.costs[g] * w[g] for g in self.sizes) - sum(self.block_ms[b] for b in dropped)

    def predict(self, widths=None, dropped=()):
        widths = widths or {}
        lat = self.latency(widths, dropped)
        w = {**self.sizes, **widths}
        wb = 4 * sum(w[g] * 10 for g in self.sizes)
        return Prediction(lat, lat, 1.0, 1.0 + wb / 2**20, wb / 2**20, wb, 0, "fake")

    def weight_bytes(self, widths, *, dropped=()):  # 40 bytes per channel (the "weights" objective's capacity)
        return 40 * sum({**self.sizes, **widths}.values()), len(self.sizes)

    def describe(self):
        return {"fake": True}


def synthetic_data(n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("synthetic", x, y, x[:32], y[:32])


# ------------------------------------------------------------------------------------------------- the search


def test_greedy_widths_meets_the_target_in_width_multiples():
    m = tiny_resnet()
    cs = channel_structure(m, torch.rand(1, 3, 32, 32))
    cm = FakeCostModel(cs.sizes)
    dense = cm.latency({})
    crit = NormCriterion(cs, torch.ones(cs.groups.num_groups, dtype=torch.bool), torch.rand(cs.groups.num_groups))
    target = {"latency_ms": 0.6 * dense}
    widths, steps = greedy_widths(cm, cs, crit, target, {}, 4)
    assert cm.latency(widths) <= target["latency_ms"]
    assert all(w % 4 == 0 or w == cs.sizes[g] for g, w in widths.items())
    assert steps and steps[-1]["latency_ms"] == pytest.approx(cm.latency(widths))
    assert cs.widths(crit.alive) == widths
    # one step less would not have met the target
    last = steps[-1]
    undo = {**widths, last["group"]: widths[last["group"]] + 4}
    assert cm.latency(undo) > target["latency_ms"] or undo[last["group"]] > cs.sizes[last["group"]]


def test_greedy_prefers_the_cheapest_objective_per_latency_saved():
    m = tiny_resnet()
    cs = channel_structure(m, torch.rand(1, 3, 32, 32))
    costs = {g: 1.0 for g in cs.sizes}
    costs["layer3.1.conv1"] = 5.0  # saving 4 channels here saves 20 ms-units: by far the best ratio
    cm = FakeCostModel(cs.sizes, costs)
    curves = []
    for f, s in enumerate(cs.specs):
        order = torch.arange(s.size - 1) + cs.first[f]
        curves.append((order, torch.arange(1, s.size, dtype=torch.float64)))  # every channel costs 1
    crit = CurveCriterion(cs, torch.ones(cs.groups.num_groups, dtype=torch.bool), curves)
    widths, steps = greedy_widths(cm, cs, crit, {"latency_ms": cm.latency({}) - 19.0}, {}, 4)
    assert steps[0]["group"] == "layer3.1.conv1" and widths["layer3.1.conv1"] == 12
    assert steps[0]["objective_cost"] == pytest.approx(4.0)


def test_channel_block_leaves_out_widths_between_blocks():
    assert allowed_widths(64, 4) == list(range(4, 65, 4))
    assert allowed_widths(64, 4, 16) == [4, 8, 16, 32, 48, 64]
    assert allowed_widths(16, 4, 16) == [4, 8, 16] and allowed_widths(24, 8, 16) == [8, 16, 24]
    assert allowed_widths(64, 4, 0) == allowed_widths(64, 4)
    m = tiny_resnet()
    cs = channel_structure(m, torch.rand(1, 3, 32, 32))
    cm = FakeCostModel(cs.sizes)
    target = {"latency_ms": 0.55 * cm.latency({})}
    for block in (None, 16):
        crit = NormCriterion(cs, torch.ones(cs.groups.num_groups, dtype=torch.bool), torch.rand(cs.groups.num_groups))
        widths, _ = greedy_widths(cm, cs, crit, target, {}, 4, block=block)
        assert cm.latency(widths) <= target["latency_ms"]
        if block:
            assert all(w in allowed_widths(cs.sizes[g], 4, 16) for g, w in widths.items())
    uni = uniform_widths(cm, cs, target, {}, 4, 16)
    assert all(w in allowed_widths(cs.sizes[g], 4, 16) for g, w in uni.items())
    loose = {"latency_ms": 0.8 * cm.latency({})}
    assert 12 in uniform_widths(cm, cs, loose, {}, 4).values()  # between blocks: allowed without the block
    assert 12 not in uniform_widths(cm, cs, loose, {}, 4, 16).values()


def test_uniform_widths_is_the_largest_common_fraction():
    m = tiny_resnet()
    cs = channel_structure(m, torch.rand(1, 3, 32, 32))
    cm = FakeCostModel(cs.sizes)
    target = {"latency_ms": 0.55 * cm.latency({})}
    w = uniform_widths(cm, cs, target, {}, 4)
    assert cm.latency(w) <= target["latency_ms"]
    fr = {g: w[g] / cs.sizes[g] for g in w}
    assert max(fr.values()) - min(fr.values()) <= 0.25 + 1e-9  # one common fraction, rounded to multiples of 4


def test_schedule_is_geometric_and_ends_at_the_target():
    sched = _schedule({"latency_ms": 8.0, "memory_mb": 10.0}, {"latency_ms": 2.0, "memory_mb": 20.0}, 2)
    assert sched[0]["latency_ms"] == pytest.approx(4.0) and sched[1]["latency_ms"] == pytest.approx(2.0)
    assert sched[0]["memory_mb"] == 20.0


# --------------------------------------------------------------------------------------- prune_to_budget


@pytest.mark.parametrize("method", ["chita", "l1-uniform", "norm-global"])
def test_prune_to_budget_meets_the_predicted_budget_and_compacts(method):
    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    data = synthetic_data()
    x1 = data.x_train[:1]
    cs = channel_structure(m, x1)
    cm = FakeCostModel(cs.sizes)
    budgets = with_budgets(prof, latency_ms=0.5 * cm.latency({}), memory_mb=1000, file_mb=1000)
    cfg = BudgetConfig(method=method, stages=2, verify=False, calib_samples=32, width_multiple=4)
    res = prune_to_budget(m, x1, data, prof, budgets, cfg, cost_model=cm)
    assert res.passed and res.measured is None
    assert res.predicted["latency_ms"] <= 0.5 * cm.latency({}) * cfg.margin + 1e-9
    assert len(res.stages) == (2 if method == "chita" else 1)
    # the compacted model has exactly the chosen widths and the plan replays on a fresh model
    for gid, kept in res.plan["keep"].items():
        assert len(kept) == res.widths[gid]
    assert all(res.widths[g] == cs.sizes[g] for g in cs.sizes if g not in res.plan["keep"])
    fresh = tiny_resnet()
    apply_plan(fresh, res.plan)
    fresh.load_state_dict(res.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(data.x_test[:4]), m(data.x_test[:4]), atol=1e-4)
    # the zeroed (uncompacted) model's alive channels are the widths
    assert channel_structure(m, x1).widths(alive_channels(m, cs)) == res.widths


def test_impossible_budget_names_the_smallest_reachable():
    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    data = synthetic_data(32)
    cs = channel_structure(m, data.x_train[:1])
    cm = FakeCostModel(cs.sizes)
    floor = cm.latency(min_widths(cs.sizes, 4))
    budgets = with_budgets(prof, latency_ms=0.5 * floor)
    cfg = BudgetConfig(method="l1-uniform", verify=False, width_multiple=4)
    with pytest.raises(GateFailed, match=r"smallest reachable: latency ([0-9.]+) ms") as e:
        prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg, cost_model=cm)
    assert f"{floor:.4g}" in str(e.value)
    assert "peak memory" in str(e.value) and "file" in str(e.value)


def test_verification_tightens_after_a_miss(monkeypatch):
    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    data = synthetic_data(32)
    cs = channel_structure(m, data.x_train[:1])
    cm = FakeCostModel(cs.sizes)
    calls = []

    def fake_measure(model, x, profile, path, **kw):  # the device is 20 % slower than the cost model says
        from chita_edge.budget.costmodel import widths_of

        lat = 1.2 * cm.latency(widths_of(model, cs.specs))
        calls.append(lat)
        return {"latency_ms": lat, "memory_mb": 1.0, "file_mb": 0.1, "file": str(path)}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    limit = 0.6 * 1.2 * cm.latency({})
    budgets = with_budgets(prof, latency_ms=limit, memory_mb=100, file_mb=100)
    cfg = BudgetConfig(method="norm-global", width_multiple=4, slack=0.0, dense_anchor=False)
    res = prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg, cost_model=cm)
    assert len(calls) >= 2 and calls[-1] <= limit  # the first try missed, the tightened one meets it
    assert res.passed and res.met["latency_ms"]
    assert [s["missed"] for s in res.stages if "verify" in s][0] == ["latency_ms"]


def test_data_without_test_images_verifies_with_random_parity_inputs(monkeypatch):
    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    full = synthetic_data(32)
    data = Dataset("calibration only", full.x_train, full.y_train, full.x_train[:0], full.y_train[:0])
    cs = channel_structure(m, data.x_train[:1])
    cm = FakeCostModel(cs.sizes)
    seen = []

    def fake_measure(model, x, profile, path, *, parity_inputs=None, **kw):
        from chita_edge.budget.costmodel import widths_of

        seen.append(parity_inputs)
        return {"latency_ms": cm.latency(widths_of(model, cs.specs)), "memory_mb": 1.0, "file_mb": 0.1,
                "file": str(path)}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    budgets = with_budgets(prof, latency_ms=0.8 * cm.latency({}), memory_mb=100, file_mb=100)
    cfg = BudgetConfig(method="norm-global", width_multiple=4, dense_anchor=True)
    res = prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg, cost_model=cm)
    assert res.passed and len(seen) >= 2 and all(p is None for p in seen)  # not an empty batch


def test_verification_stops_when_the_measured_floor_is_over_the_budget(monkeypatch):
    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    data = synthetic_data(32)
    cs = channel_structure(m, data.x_train[:1])
    cm = FakeCostModel(cs.sizes)
    floor = cm.latency(min_widths(cs.sizes, 4))
    calls = []

    def fake_measure(model, x, profile, path, **kw):  # the device is 3x slower than the cost model says
        from chita_edge.budget.costmodel import widths_of

        lat = 3.0 * cm.latency(widths_of(model, cs.specs))
        calls.append(lat)
        return {"latency_ms": lat, "memory_mb": 1.0, "file_mb": 0.1, "file": str(path)}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    limit = 1.5 * floor  # reachable as predicted (no dense anchor), not at 3x the predicted floor
    budgets = with_budgets(prof, latency_ms=limit, memory_mb=100, file_mb=100)
    cfg = BudgetConfig(method="norm-global", width_multiple=4, slack=0.0, dense_anchor=False, max_tighten=2)
    res = prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg, cost_model=cm)
    assert len(calls) == 1  # no second round of pruning towards a budget it cannot reach
    assert not res.passed
    verify = [s for s in res.stages if "verify" in s]
    assert verify[-1]["unreachable"]["latency_ms"] == pytest.approx(floor * calls[0] / res.predicted["latency_ms"])
    with pytest.raises(GateFailed, match="smallest reachable at latency_ms"):
        raise_if_missed({"passed": False, "profile": prof.id, "out": "p.pt", "stages": res.stages,
                         "checks": [{"budget": "latency_ms.p50", "limit": limit, "measured": calls[0], "unit": "ms",
                                     "met": False}]})


def test_dense_measurement_anchors_the_op_mix(monkeypatch, tmp_path):
    prof = load_profile("phone-mid-sd670")
    fracs = iter([0.9, 0.7, 0.8])

    def fake_bench(path, profiles, cfg):
        return {"latency_ms": {"p50": 1.0}, "peak_memory_mb": 5.0, "file_mb": 0.5,
                "device_estimates": {prof.id: {"available": True, "latency_ms": {"p50": 2.0}, "provenance": "est",
                                               "dense_fraction": next(fracs)}}}

    monkeypatch.setattr(measure, "export_model", lambda *a, **k: None)
    monkeypatch.setattr(measure, "benchmark", fake_bench)
    meas = measure_model(nn.Linear(2, 2), torch.rand(1, 2), prof, tmp_path / "m.onnx", percentile="p50", runs=1,
                         repeats=3)
    assert meas["dense_fraction"] == pytest.approx(0.8) and meas["latency_ms"] == 2.0

    m = tiny_resnet()
    data = synthetic_data(32)
    cs = channel_structure(m, data.x_train[:1])
    seen = []

    class Anchored(FakeCostModel):
        def with_op_mix(self, d):
            seen.append(d)
            return FakeCostModel(self.sizes, {g: 0.5 for g in self.sizes})  # the anchored model: half the cost

    dense = {"latency_ms": 0.5 * FakeCostModel(cs.sizes).latency({}), "memory_mb": 1.0, "file_mb": 0.1,
             "dense_fraction": 0.8}
    budgets = with_budgets(prof, latency_ms=0.9 * dense["latency_ms"], memory_mb=100, file_mb=100)
    cfg = BudgetConfig(method="norm-global", width_multiple=4, verify=False)
    res = prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg, cost_model=Anchored(cs.sizes),
                          dense_measured=dense)
    assert seen == [0.8]
    # the correction is taken against the anchored model's dense prediction (it matches the measurement)
    assert res.cost_model["correction"]["latency_ms"] == pytest.approx(dense["latency_ms"] / (0.01 + 0.5 * sum(
        cs.sizes.values())), rel=1e-6)


# --------------------------------------------------------------------------------------------- the command


def use_fake_cost_model(monkeypatch) -> None:
    """``CostModel.build`` returns a ``FakeCostModel`` of the channel groups' sizes (no layer timing)."""
    monkeypatch.setattr(CostModel, "build", classmethod(lambda cls, model, x, prof, specs=None, **kw:
                                                          FakeCostModel({s.id: s.size for s in specs})))


def _write_model_and_data(tmp_path):
    (tmp_path / "tiny.py").write_text(model_file(tiny_resnet, make="tiny_resnet().train()"))
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=g.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8),
             y_train=g.integers(0, 10, 64), x_test=g.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
             y_test=g.integers(0, 10, 16))
    sd = tiny_resnet().state_dict()
    torch.save(sd, tmp_path / "w.pt")
    return f"{tmp_path / 'tiny.py'}:make", f"npz:{tmp_path / 'd.npz'}", tmp_path / "w.pt"


def test_cli_budget_mode_writes_a_reloadable_checkpoint(tmp_path, monkeypatch):
    spec, data, weights = _write_model_and_data(tmp_path)
    use_fake_cost_model(monkeypatch)

    specs = channel_structure(tiny_resnet(), torch.rand(1, 3, 32, 32)).specs
    full = sum(s.size for s in specs)

    def fake_measure(model, x, profile, path, **kw):  # latency: 1 ms for the dense model, linear in the widths
        from chita_edge.budget.costmodel import widths_of

        path.write_bytes(b"onnx")
        lat = sum(widths_of(model, specs).values()) / full
        return {"latency_ms": lat, "memory_mb": 5.0, "file_mb": 0.05, "file": str(path), "percentile": "p90"}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    out = tmp_path / "p.pt"
    r = run_cli("prune", spec, "--weights", weights, "--data", data, "--out", out, "--profile", "phone-mid-sd670",
                "--latency-ms", "0.6", "--memory-mb", "64", "--width-multiple", "4", "--search-stages", "1",
                "--export", tmp_path / "p.onnx", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["passed"] and d["profile"] == "phone-mid-sd670" and d["method"] == "chita-layerwise"
    assert d["objective"] == "output" and load_model(None, out).meta["objective"] == "output"  # no fine-tuning
    assert {c["budget"] for c in d["checks"]} == {"latency_ms.p90", "memory_mb", "file_mb"}
    assert all(c["measured"] is not None for c in d["checks"])
    assert (tmp_path / "p.onnx").read_bytes() == b"onnx"
    assert d["layers"] and all(row["width"] <= row["of"] for row in d["layers"])
    lm = load_model(None, out)
    assert lm.meta["plan"]["keep"] and lm.meta["widths"] == d["widths"]
    assert sum(p.numel() for p in lm.module.parameters()) == d["params_after"]


def test_cli_missed_budget_exits_1_after_writing(tmp_path, monkeypatch):
    spec, data, weights = _write_model_and_data(tmp_path)
    canned = {"passed": False, "profile": "watch-a55-dual", "out": str(tmp_path / "p.pt"),
              "checks": [{"budget": "latency_ms.p90", "limit": 1.0, "predicted": 0.9, "measured": 1.4, "unit": "ms",
                          "met": False}]}
    seen = {}

    def fake(model_spec, w, d, **kw):
        seen.update(model=model_spec, weights=w, data=d, **kw)
        return canned

    monkeypatch.setattr(jobs, "prune_budget_checkpoint", fake)
    r = run_cli("prune", spec, "--data", data, "--out", tmp_path / "p.pt", "--profile", "watch-a55-dual",
                "--latency-ms", "1", "--json")
    assert r.code == 1
    assert json.loads(r.stdout)["passed"] is False
    assert "latency_ms.p90 1.4 ms > 1 ms" in r.stderr
    assert seen["profile"] == "watch-a55-dual" and seen["latency_ms"] == 1.0 and seen["memory_mb"] is None
    assert seen["cfg"].structure == "channel" and seen["cfg"].depth
    assert seen["cfg"].width_multiple == load_profile("watch-a55-dual").width_multiple  # resolved from the profile
    r = run_cli("prune", spec, "--data", data, "--out", tmp_path / "p.pt", "--profile", "watch-a55-dual",
                "--latency-ms", "1", "--no-depth", "--json")
    assert r.code == 1 and seen["cfg"].depth is False


def test_cli_budget_usage_errors(tmp_path):
    spec, data, weights = _write_model_and_data(tmp_path)
    out = tmp_path / "p.pt"
    r = run_cli("prune", spec, "--data", data, "--out", out, "--structure", "channel")
    assert r.code == 2 and "--profile" in r.stderr
    r = run_cli("prune", spec, "--data", data, "--out", out, "--sparsity", "0.5", "--latency-ms", "3")
    assert r.code == 2 and "need --profile" in r.stderr
    r = run_cli("prune", spec, "--data", data, "--out", out)
    assert r.code == 2 and "--sparsity is required" in r.stderr
    r = run_cli("prune", spec, "--data", data, "--out", out, "--sparsity", "0.5", "--no-depth")
    assert r.code == 2 and "--objective need --profile" in r.stderr
    r = run_cli("prune", spec, "--data", data, "--out", out, "--profile", "no-such-phone")
    assert r.code == 2 and "unknown id" in r.stderr
    r = run_cli("prune", spec, "--data", data, "--out", out, "--profile", "phone-mid-sd670", "--latency-ms", "-1")
    assert r.code == 2 and "--latency-ms" in r.stderr
    r = run_cli("prune", spec, "--data", data, "--out", out, "--profile", "phone-mid-sd670", "--structure", "block")
    assert r.code == 2 and "channel" in r.stderr
    assert not out.exists()


def test_cli_impossible_budget_exits_1(tmp_path, monkeypatch):
    spec, data, weights = _write_model_and_data(tmp_path)
    use_fake_cost_model(monkeypatch)
    calls = []

    def fake_measure(model, x, profile, path, **kw):  # only the dense anchor is measured, never a pruned model
        calls.append(path.name)
        return {"latency_ms": 1.0, "memory_mb": 5.0, "file_mb": 0.05, "file": str(path), "percentile": "p90"}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    r = run_cli("prune", spec, "--data", data, "--out", tmp_path / "p.pt", "--profile", "phone-mid-sd670",
                "--latency-ms", "0.001", "--width-multiple", "4", "--json")
    assert r.code == 1 and "smallest reachable" in r.stderr
    assert calls == ["dense.onnx"]
    assert not (tmp_path / "p.pt").exists()


def test_cli_block_structure_prunes_linear_weights_in_1x4_blocks(tmp_path):
    (tmp_path / "mlp.py").write_text(model_file(tiny_mlp, make="tiny_mlp(16)"))
    r = run_cli("prune", f"{tmp_path / 'mlp.py'}:make", "--data", "digits", "--out", tmp_path / "b.pt",
                "--structure", "block", "--sparsity", "0.75", "--grads", "50", "--stages", "2", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["blocks"] == 16 * 16 + 10 * 4 and d["blocks_kept"] == math.floor(0.25 * d["blocks"])
    lm = load_model(None, tmp_path / "b.pt")
    w = lm.module[1].weight.detach().reshape(16, 16, 4)
    assert bool(((w == 0).all(-1) | (w != 0).any(-1)).all())
    assert int((w != 0).any(-1).sum()) + int((lm.module[3].weight.detach().reshape(10, 4, 4) != 0).any(-1).sum()) == d["blocks_kept"]


# ------------------------------------------------------------------------------ depth: removing residual blocks


def _unit_curves(cs):
    """Every channel of every group costs 1 (objective units)."""
    curves = []
    for f, s in enumerate(cs.specs):
        order = torch.arange(s.size - 1) + cs.first[f]
        curves.append((order, torch.arange(1, s.size, dtype=torch.float64)))
    return curves


def _resnet_blocks():
    """tiny_resnet's channel structure and its removable residual blocks."""
    from chita_edge.graph.residual import residual_blocks

    m = tiny_resnet()
    x = torch.rand(1, 3, 32, 32)
    return channel_structure(m, x), [b.id for b in residual_blocks(m, x)]


def test_greedy_takes_a_block_only_where_it_is_the_cheaper_move():
    cs, ids = _resnet_blocks()
    assert ids == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    cm = FakeCostModel(cs.sizes, blocks={b: 10.0 for b in ids})
    floor = cm.latency(min_widths(cs.sizes, 4))

    def run(target, costs):
        crit = CurveCriterion(cs, torch.ones(cs.groups.num_groups, dtype=torch.bool), _unit_curves(cs))
        moves = BlockMoves(dict(costs))
        widths, steps = greedy_widths(cm, cs, crit, {"latency_ms": target}, {}, 4, blocks=moves)
        assert cm.latency(widths, moves.dropped) <= target
        return moves.dropped, steps

    # reachable by widths, blocks expensive: channels only
    dropped, steps = run(0.7 * cm.latency({}), {b: 1e6 for b in ids})
    assert not dropped and all("block" not in s for s in steps)
    # below the narrowest widths: only removing blocks reaches it, even expensive ones
    dropped, steps = run(floor - 15.0, {b: 1e6 for b in ids})
    assert len(dropped) == 2 and sum("block" in s for s in steps) == 2
    # a cheap block (cost 1 for 10 ms) beats channels (cost 1 per ms): taken first
    dropped, steps = run(cm.latency({}) - 9.0, {**{b: 1e6 for b in ids}, "layer2.1": 1.0})
    assert dropped == {"layer2.1"} and steps[0]["block"] == "layer2.1" and len(steps) == 1


def test_greedy_gives_back_the_width_an_overshooting_step_left_unused():
    # below the width floor two blocks of 10 units each must go for a 15-unit gap: the second overshoots by 5,
    # which is given back as channel width, the dearest per unit first, until no more fits
    cs, ids = _resnet_blocks()
    cm = FakeCostModel(cs.sizes, blocks={b: 10.0 for b in ids})
    target = cm.latency(min_widths(cs.sizes, 4)) - 15.0
    crit = CurveCriterion(cs, torch.ones(cs.groups.num_groups, dtype=torch.bool), _unit_curves(cs))
    moves = BlockMoves({b: 1e6 for b in ids})
    widths, steps = greedy_widths(cm, cs, crit, {"latency_ms": target}, {}, 4, blocks=moves)
    lat = cm.latency(widths, moves.dropped)
    back = [s for s in steps if "give_back" in s]
    assert len(moves.dropped) == 2 and back and all("width" in s for s in back)
    assert target - 5.0 < lat <= target and cs.widths(crit.alive) == widths
    # nothing more fits: undoing any group's last step (or a removed block) would break the target
    for f, s in enumerate(cs.specs):
        if crit.taken[f]:
            assert cm.latency({**widths, s.id: widths[s.id] + crit.taken[f][-1].numel()}, moves.dropped) > target
    assert all(cm.latency(widths, moves.dropped - {b}) > target for b in moves.dropped)
    # what was given back is the dearest per unit: every given-back group was stepped down before the block
    assert all(s["objective_cost"] > 0 for s in back)


@pytest.mark.parametrize("objective", ["output", "weights"])
def test_prune_to_budget_removes_blocks_below_the_width_floor_and_the_plan_replays(tmp_path, objective):
    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    data = synthetic_data()
    x1 = data.x_train[:1]
    cs, ids = _resnet_blocks()
    cm = FakeCostModel(cs.sizes, blocks={b: 12.0 for b in ids})
    floor = cm.latency(min_widths(cs.sizes, 4))
    limit = floor - 20.0  # two blocks at least
    budgets = with_budgets(prof, latency_ms=limit, memory_mb=1000, file_mb=1000)
    cfg = BudgetConfig(method="chita", stages=2, verify=False, calib_samples=32, width_multiple=4,
                       objective=objective)
    res = prune_to_budget(m, x1, data, prof, budgets, cfg, cost_model=cm)
    assert res.passed and len(res.dropped) >= 2
    if objective == "weights":  # the fake's blocks hold no weights of their own: every one goes (free capacity-wise)
        assert set(res.dropped) == set(ids)
    assert set(res.plan["drop"]) == set(res.dropped) and res.plan["version"] == 2
    assert res.to_dict()["dropped_blocks"] == res.dropped
    assert all(isinstance(res.model.get_submodule(b), nn.Identity) for b in res.dropped)
    assert not any(g.startswith(b + ".") for b in res.dropped for g in res.widths)  # their groups went with them
    # the plan is data: JSON round trip, replay on a fresh model, strict load, same outputs as the masked model
    plan = json.loads(json.dumps(res.plan))
    fresh = tiny_resnet()
    apply_plan(fresh, plan)
    fresh.load_state_dict(res.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh(data.x_test[:4]), m(data.x_test[:4]), atol=1e-4)
    # with depth off the same budget is refused before pruning
    with pytest.raises(GateFailed, match="smallest reachable"):
        prune_to_budget(tiny_resnet(), x1, data, prof, budgets,
                        BudgetConfig(method="chita", verify=False, width_multiple=4, depth=False), cost_model=cm)


# --------------------------------------------------------------------- tightening: proportional, then relaxed


def _relax_setup(monkeypatch, factors, **cfg_kw):
    """A device whose n-th measurement is factors[n] x the cost model (the last factor repeats)."""
    from chita_edge.budget.costmodel import widths_of

    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    data = synthetic_data(32)
    cs = channel_structure(m, data.x_train[:1])
    cm = FakeCostModel(cs.sizes)
    calls = []

    def fake_measure(model, x, profile, path, **kw):
        lat = factors[min(len(calls), len(factors) - 1)] * cm.latency(widths_of(model, cs.specs))
        calls.append(lat)
        return {"latency_ms": lat, "memory_mb": 1.0, "file_mb": 0.1, "file": str(path)}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    limit = 0.6 * cm.latency({})
    budgets = with_budgets(prof, latency_ms=limit, memory_mb=100, file_mb=100)
    cfg = BudgetConfig(method="norm-global", width_multiple=4, slack=0.0, dense_anchor=False, channel_block=0,
                       **cfg_kw)
    res = prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg, cost_model=cm)
    return m, cs, cm, calls, limit, res


def test_tightening_over_shoot_is_relaxed_by_bisection(monkeypatch):
    # the first widths measure 1.4x the model (e.g. layout reorders), every later model 1.0x: the proportional
    # tightening (correction 1.4) lands far below the budget; bisection brings it back towards the budget
    m, cs, cm, calls, limit, res = _relax_setup(monkeypatch, [1.4, 1.0])
    kinds = [s["kind"] for s in res.stages if "verify" in s]
    assert kinds[:2] == ["first", "tighten"] and "relax" in kinds
    assert calls[0] > limit and calls[1] < 0.9 * limit  # missed, then over-shot
    assert res.passed and res.measured["latency_ms"] == max(c for c in calls if c <= limit)
    assert res.measured["latency_ms"] > calls[1]  # less pruned than the tightened round
    # the returned (compacted) model and the masked model in place are the chosen round's
    from chita_edge.budget.costmodel import widths_of

    assert cm.latency(widths_of(res.model, cs.specs)) == pytest.approx(res.measured["latency_ms"])
    assert cs.widths(alive_channels(m, cs)) == res.widths


def test_a_relaxed_round_that_misses_keeps_the_tightened_result(monkeypatch):
    # every measurement but the tightened one is 1.4x: each relax trial misses, the tightened result stays
    m, cs, cm, calls, limit, res = _relax_setup(monkeypatch, [1.4, 1.0, 1.4], land_steps=0)
    kinds = [s["kind"] for s in res.stages if "verify" in s]
    assert kinds[:2] == ["first", "tighten"] and kinds.count("relax") >= 1
    assert all(c > limit for i, c in enumerate(calls) if i != 1)
    assert res.passed and res.measured["latency_ms"] == calls[1]
    from chita_edge.budget.costmodel import widths_of

    assert cm.latency(widths_of(res.model, cs.specs)) == pytest.approx(calls[1])
    assert cs.widths(alive_channels(m, cs)) == res.widths


def test_a_banded_estimate_is_planned_so_that_its_upper_edge_fits(monkeypatch):
    """check passes a device estimate only when its band's upper edge is within budget; the search plans to that."""
    prof = load_profile("phone-mid-sd670")
    m = tiny_resnet()
    data = synthetic_data(32)
    cs = channel_structure(m, data.x_train[:1])
    cm = FakeCostModel(cs.sizes)

    def fake_measure(model, x, profile, path, **kw):  # an estimate whose band reaches 1.5x its value
        from chita_edge.budget.costmodel import widths_of

        return {"latency_ms": cm.latency(widths_of(model, cs.specs)), "memory_mb": 1.0, "file_mb": 0.1,
                "file": str(path), "latency_band": {"low": 0.7, "high": 1.5}}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    limit = 0.8 * cm.latency({})
    budgets = with_budgets(prof, latency_ms=limit, memory_mb=100, file_mb=100)
    cfg = BudgetConfig(method="norm-global", width_multiple=4, dense_anchor=True)
    res = prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg, cost_model=cm)
    assert res.budgets["latency_ms"] == limit  # the budget reported is the user's
    assert res.passed and res.measured["latency_ms"] * 1.5 <= limit  # the upper edge fits, not only the estimate
    assert any("upper_edge_over_budget" in r for r in res.stages)


# ------------------------------------------------------------------------------- chita-fisher's memory check


def test_chita_fisher_refuses_a_G_over_the_memory_cap_before_any_measurement(monkeypatch):
    prof = load_profile("phone-mid-sd670")
    m, data = tiny_resnet(), synthetic_data(32)
    p = sum(q.numel for q in channel_structure(m, data.x_train[:1]).params)

    def never(*a, **kw):
        raise AssertionError("measured or computed gradients before the memory check")

    monkeypatch.setattr(CostModel, "build", classmethod(never))
    monkeypatch.setattr(methods, "gradients", never)
    budgets = with_budgets(prof, latency_ms=1.0)
    cfg = BudgetConfig(method="chita-fisher", n_grads=100, memory_gb=0.01, verify=False, width_multiple=4)
    with pytest.raises(BadInput, match=r"gradient matrix G needs .*float32 \+ its float64 copy.* budget is") as e:
        prune_to_budget(m, data.x_train[:1], data, prof, budgets, cfg)
    fit = int(0.01 * 2**30) // (12 * p)
    assert f"--grads {fit} or fewer fit" in str(e.value) and "--dtype float32" in str(e.value)
    # the bytes: n x p float32 plus the float64 copy; float32 needs no copy
    ok = BudgetConfig(method="chita-fisher", n_grads=100, memory_gb=1.0)
    cs = channel_structure(m, data.x_train[:1])
    assert methods.check_fisher_memory(cs, ok) == 100 * p * 12
    assert methods.check_fisher_memory(cs, BudgetConfig(method="chita-fisher", n_grads=100, dtype="float32")) == \
        100 * p * 4
    assert methods.check_fisher_memory(cs, BudgetConfig(method="l1-uniform", n_grads=10**9)) == 0


def test_cli_chita_fisher_memory_cap_and_its_usage_errors(tmp_path):
    spec, data, weights = _write_model_and_data(tmp_path)
    out = tmp_path / "p.pt"
    base = ("prune", spec, "--data", data, "--out", out, "--profile", "phone-mid-sd670", "--latency-ms", "1")
    r = run_cli(*base, "--method", "chita-fisher", "--memory-gb", "0.0001")
    assert r.code == 2 and "--grads" in r.stderr and "gradient matrix G needs" in r.stderr
    r = run_cli(*base, "--method", "chita-fisher", "--grads", "100000000")  # over half of the free RAM
    assert r.code == 2 and "--grads" in r.stderr
    r = run_cli(*base, "--memory-gb", "1")
    assert r.code == 2 and "--memory-gb" in r.stderr and "chita-fisher" in r.stderr
    r = run_cli(*base, "--method", "chita-fisher", "--memory-gb", "0")
    assert r.code == 2 and "--memory-gb 0.0: expected > 0" in r.stderr
    assert not out.exists()


def test_the_weights_objective_prices_a_step_by_the_weights_it_removes():
    # one block (10 ms) or ten channels (1 ms each) meet the target; the output objective's block cost is
    # prohibitive, so it narrows. Priced by weights, a block of few weights goes before channels of many (the
    # capacity a fine-tuning keeps), and a block of many weights does not
    cs, ids = _resnet_blocks()
    cm = FakeCostModel(cs.sizes, blocks={b: 10.0 for b in ids})
    target = {"latency_ms": cm.latency({}) - 10.0}

    def run(block_weights, weights=True):
        def left(w, d):  # 100 weights per channel, plus the blocks' own
            return 100.0 * sum({**cs.sizes, **w}.values()) + sum(v for b, v in block_weights.items() if b not in d)

        crit = CurveCriterion(cs, torch.ones(cs.groups.num_groups, dtype=torch.bool), _unit_curves(cs))
        moves = BlockMoves({b: 1e6 for b in ids})
        widths, steps = greedy_widths(cm, cs, crit, target, {}, 4, blocks=moves,
                                      weights_left=left if weights else None)
        assert cm.latency(widths, moves.dropped) <= target["latency_ms"]
        return moves.dropped, widths

    light = {b: 1e4 for b in ids} | {"layer1.1": 1.0}
    assert run(light, weights=False)[0] == set()
    dropped, widths = run(light)
    assert dropped == {"layer1.1"} and widths == cs.sizes
    dropped, widths = run({b: 1e4 for b in ids})
    assert dropped == set() and widths != cs.sizes


def test_objective_auto_prices_by_weights_when_fine_tuning_follows(tmp_path, monkeypatch):
    assert BudgetConfig().for_finetuning(True).objective == "weights"
    assert BudgetConfig().for_finetuning(False).objective == "output"
    assert BudgetConfig(method="l1-uniform").for_finetuning(True).objective == "output"
    assert BudgetConfig(objective="output").for_finetuning(True).objective == "output"
    assert BudgetConfig().for_finetuning(True, blocks=False).objective == "output"  # no residual block to remove
    assert not BudgetConfig(objective="weights").one_shot
    with pytest.raises(BadInput, match="--objective 'loss'"):
        BudgetConfig(objective="loss").validate()
    with pytest.raises(BadInput, match="chita-layerwise only"):
        BudgetConfig(objective="weights", method="norm-global").validate()
    seen = []

    def fake(model, example, ds, prof, budgets, cfg, **kw):  # the search, as the budget path configures it
        seen.append(cfg.objective)
        raise GateFailed("stop here")

    monkeypatch.setattr(budget_jobs, "prune_to_budget", fake)
    spec, data, weights = _write_model_and_data(tmp_path)
    common = ("prune", spec, "--weights", weights, "--data", data, "--profile", "phone-mid-sd670")
    assert run_cli(*common, "--out", tmp_path / "a.pt").code == 1
    assert run_cli(*common, "--out", tmp_path / "b.pt", "--finetune-epochs", "1").code == 1
    assert run_cli(*common, "--out", tmp_path / "c.pt", "--finetune-epochs", "1", "--objective", "output").code == 1
    assert run_cli(*common, "--out", tmp_path / "d.pt", "--objective", "weights").code == 1
    assert seen == ["output", "weights", "output", "weights"]
    # a plain CNN (no residual block): the weights objective could only narrow the layers of most weights, which
    # fine-tuned worse than the output objective on MobileNetV1 -- "auto" stays "output" there
    (tmp_path / "plain.py").write_text(model_file(make="nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), "
                                                       "nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), "
                                                       "nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), "
                                                       "nn.Flatten(), nn.Linear(8, 10))"))
    torch.save(load_model(f"{tmp_path / 'plain.py'}:make").module.state_dict(), tmp_path / "plain.pt")
    assert run_cli("prune", f"{tmp_path / 'plain.py'}:make", "--weights", tmp_path / "plain.pt", "--data", data,
                   "--profile", "phone-mid-sd670", "--out", tmp_path / "e.pt", "--finetune-epochs", "1").code == 1
    assert seen[-1] == "output"
    bad = run_cli("prune", spec, "--weights", weights, "--data", data, "--out", tmp_path / "e.pt", "--sparsity", "0.5",
                  "--objective", "weights")
    assert bad.code == 2 and "--objective need --profile" in bad.stderr
