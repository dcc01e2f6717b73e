"""The cost model (chita_edge.budget: costmodel, units, timing, memory): units as ONNX Runtime fuses them,
interpolation, caching, memory and weight accounting.

No timed assertions: timings are only checked for being measured, cached and reused.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from chita_edge.budget import costmodel as C
from chita_edge.budget import memory as M
from chita_edge.budget import timing as T
from chita_edge.budget import units as U
from chita_edge.budget.costmodel import CostModel, grid_widths
from chita_edge.budget.memory import MemoryModel
from chita_edge.graph.channels import channel_groups
from chita_edge.graph.compact import compact_model
from chita_edge.models.zoo import MobileNetV1, ResNet20

torch.set_num_threads(1)


def test_units_follow_onnxruntime_fusion_on_resnet20():
    m = ResNet20().eval()
    x = torch.rand(1, 3, 32, 32)
    g = U.trace_graph(m, x, channel_groups(m, x))
    units = {u.name: u for u in U.split_units(g)}
    assert units["conv1"].nodes == ("conv1", "bn1", "relu") and units["conv1"].axes == ("conv1",)
    u = units["layer1.0.conv2"]  # conv + BatchNorm + residual add + ReLU: one fused kernel
    assert u.nodes == ("layer1_0_conv2", "layer1_0_bn2", "add", "relu_2")
    assert u.kind == U.DENSE and set(u.axes) == {"layer1.0.conv1", "conv1"}
    assert units["layer2.0.downsample.0"].axes == ("conv1", "layer2.0.conv2")
    assert units["avgpool"].kind == U.OTHER and units["fc"].axes == ("layer3.0.conv2",)
    # identical blocks share one timing signature
    assert units["layer1.1.conv1"].signature == units["layer1.2.conv1"].signature


def test_depthwise_units_on_mobilenet():
    m = MobileNetV1(alpha=0.25, num_classes=10).eval()
    x = torch.rand(1, 3, 64, 64)
    g = U.trace_graph(m, x, channel_groups(m, x))
    units = U.split_units(g)
    dw = [u for u in units if u.kind == U.DEPTHWISE]
    assert len(dw) == 13 and all(len(u.axes) == 1 for u in dw)
    mod, inputs = U.build_unit(g, dw[0], {**g.sizes, dw[0].axes[0]: 4})
    out = mod(*inputs)
    assert out.shape[1] == 4 and len(inputs) == 1


def test_grid_widths():
    assert grid_widths(64, 8) == (8, 16, 32, 48, 64)
    assert grid_widths(16, 4) == (4, 8, 12, 16)
    assert grid_widths(10, 8) == (8, 10)


def test_unit_table_interpolation_is_exact_for_bilinear_costs():
    u = U.Unit("u", U.DENSE, ("a",), ("a", "b"), "sig")
    grid = ((4, 8, 16), (8, 32))
    f = lambda a, b: 0.01 + 0.002 * a * b  # noqa: E731
    ms = np.array([[f(a, b) for b in grid[1]] for a in grid[0]])
    t = C._UnitTable(u, grid, ms)
    for a, b in [(4, 8), (6, 20), (12, 32), (16, 8), (10, 10)]:
        assert t.at({"a": a, "b": b}) == pytest.approx(f(a, b))


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture
def fake_memory(monkeypatch):
    mm = MemoryModel(3.0, 2.0, 2.5, 1.5, 2.0, 16)
    monkeypatch.setattr(C, "memory_model", lambda threads=1, **kw: mm)
    return mm


def test_build_times_once_and_reuses_the_cache(tmp_path, monkeypatch, fake_memory):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    m = Chain().eval()
    x = torch.rand(1, 3, 4, 4)
    calls = []
    real = T.time_file

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(T, "time_file", counting)
    cm = CostModel.build(m, x, None, width_multiple=4, runs=3)
    n_first = len(calls)
    assert n_first > 0
    files = list(tmp_path.glob("layer-latency-v2-onnxruntime-t1-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["format"] == T.TABLE_FORMAT and len(data["entries"]) == n_first - 2  # + the two node chains
    assert all(ms >= 0 and nodes >= 1 for ms, nodes in data["entries"].values())
    assert data["overhead_ms"] > 0 and data["node_ms"] >= 0

    def boom(*a, **k):
        raise AssertionError("timed again although cached")

    monkeypatch.setattr(T, "time_file", boom)
    cm2 = CostModel.build(m, x, None, width_multiple=4, runs=3)
    p1, p2 = cm.predict({"c1": 8, "c2": 4}), cm2.predict({"c1": 8, "c2": 4})
    assert p1.host_ms - cm.overhead_ms == pytest.approx(p2.host_ms - cm2.overhead_ms)
    assert p1.provenance.startswith("cost-model estimate of this host")
    with pytest.raises(Exception, match="expected 1..16"):
        cm.predict({"c1": 17})


def test_weights_activations_and_file_size(tmp_path, monkeypatch, fake_memory):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "time_file", lambda *a, **k: (0.01, 1))
    m = Chain().eval()
    x = torch.rand(1, 3, 4, 4)
    cm = CostModel.build(m, x, None, width_multiple=4, runs=1)
    # weights: c1 (16x3x3x3, BatchNorm folded into a bias of 16), c2 (8x16 + 8), fc (5x128 + 5)
    wb, tensors = cm.weight_bytes({})
    assert wb == 4 * (16 * 27 + 16 + 8 * 16 + 8 + 5 * 128 + 5) and tensors == 6
    # at c1 = 8 channels and c2 = 4: the compacted model holds exactly that (plus BatchNorm's 4 per channel)
    with torch.no_grad():
        m.c1.weight[8:] = 0
        m.b1.weight[8:] = 0
        m.b1.bias[8:] = 0
        m.c2.weight[4:] = 0
        m.c2.bias[4:] = 0
    new, _ = compact_model(m, x)
    conv_lin = sum(p.numel() for n, p in new.named_parameters() if not n.startswith("b1"))
    wb2, _ = cm.weight_bytes({"c1": 8, "c2": 4})
    assert wb2 == 4 * (conv_lin + 8)  # + the folded BatchNorm bias of c1
    # activations (NCHWc block 16): input 3x4x4 (not padded), c1 out 16x4x4, c2 out 8 padded to 16 x4x4
    ab = cm.activation_bytes({})
    assert ab == 4 * (16 * 16 + 16 * 16)  # the two largest tensors live together (c1 out, c2 out)
    assert cm.activation_bytes({"c1": 8, "c2": 4}) == 4 * (16 * 16 + 16 * 16)  # both still one block wide
    p = cm.predict({})
    fc, conv, largest, _ = cm.weight_bytes({}, split=True)
    assert fc == 4 * (5 * 128 + 5) and fc + conv == wb and largest == 4 * (16 * 27 + 16)
    assert p.memory_mb == pytest.approx(3.0 + 2.0 * fc / M.MiB + 2.5 * conv / M.MiB + 1.5 * largest / M.MiB
                                        + 2.0 * ab / M.MiB)
    assert p.file_mb == pytest.approx((wb + C.FILE_OVERHEAD_BYTES * 6) / M.MiB)
    assert p.latency_ms == pytest.approx(p.host_ms)  # no profile: the host figure


def test_device_latency_uses_the_profile_fit(tmp_path, monkeypatch, fake_memory):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "time_file", lambda *a, **k: (0.02, 1))
    cm = CostModel.build(Chain().eval(), torch.rand(1, 3, 4, 4), None, width_multiple=4, runs=1)

    class Fit:
        provenance = "estimated-device (calibrated, anchors X, fit error 1 %)"

        def predict(self, host_ms: float, dense: float) -> float:
            return 3.0 * host_ms * (dense + 2.0 * (1.0 - dense))

    cm.fit = Fit()
    host, d, per = cm.host_latency({})
    assert 0.0 < d < 1.0 and host == pytest.approx(cm.overhead_ms + sum(per.values()))
    p = cm.predict({})
    assert p.latency_ms == pytest.approx(3.0 * host * (d + 2.0 * (1 - d)))
    assert p.provenance.startswith("cost-model estimate (calibrated")


def test_op_mix_anchor_moves_the_dense_share_with_widths(tmp_path, monkeypatch, fake_memory):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "time_file", lambda *a, **k: (0.02, 1))
    cm = CostModel.build(Chain().eval(), torch.rand(1, 3, 4, 4), None, width_multiple=4, runs=1)
    for t in cm.tables:  # raw profiled time: dense units scale with the product of their widths, others fixed
        if t.unit.kind == U.DENSE:
            t.raw = np.array([[0.001 * np.prod(c) for c in itertools.product(*t.grid)]]).reshape(t.ms.shape)
        else:
            t.raw = np.full(t.ms.shape, 0.002)
    D = lambda w: sum(t.at(w, raw=True) for t in cm.tables if t.unit.kind == U.DENSE)  # noqa: E731
    Oth = lambda w: sum(t.at(w, raw=True) for t in cm.tables if t.unit.kind != U.DENSE)  # noqa: E731
    full, small = dict(cm.sizes), {"c1": 4, "c2": 4}
    assert cm.host_latency({})[1] == pytest.approx(D(full) / (D(full) + Oth(full)))
    anchored = cm.with_op_mix(0.8)
    assert cm.extra_other_ms == 0.0  # a copy: the shared model is unchanged
    assert anchored.host_latency({})[1] == pytest.approx(0.8)
    extra = anchored.extra_other_ms
    assert extra == pytest.approx(D(full) / 0.8 - D(full) - Oth(full)) and extra > 0
    d_small = anchored.host_latency(small)[1]
    assert d_small == pytest.approx(D(small) / (D(small) + Oth(small) + extra)) and d_small < 0.8
    assert anchored.host_latency(small)[0] == pytest.approx(cm.host_latency(small)[0])  # host time unchanged
    with pytest.raises(Exception, match="dense fraction"):
        cm.with_op_mix(0.0)


def test_memory_model_fit_recovers_the_coefficients(tmp_path, monkeypatch):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    series = {}

    def fake_series(td):
        pts = [(0.1, 0, 0, 0.01), (4, 0, 0, 0.02), (12, 0, 0, 0.03), (0, 1, 1, 0.01), (0, 6, 6, 0.05),
               (0, 6, 1, 0.05), (0, 12, 2, 0.1), (0, 0.1, 0.05, 2), (0, 0.2, 0.1, 6), (0.01, 0.3, 0.2, 12)]
        rows = [(td / f"m{i}.onnx", *pt) for i, pt in enumerate(pts)]
        series.update({str(r[0]): r[1:] for r in rows})
        return rows

    def fake_child(p, **kw):
        f, c, l_, a = series[str(p)]
        return {"peak_memory_mb": 3.5 + 1.8 * f + 2.0 * c + 2.5 * l_ + 2.1 * a}

    monkeypatch.setattr(M, "_memory_series", fake_series)
    monkeypatch.setattr("chita_edge.devices.child.run_child", fake_child)
    mm = M.memory_model(1)
    assert (mm.base_mb, mm.alpha, mm.alpha_conv, mm.gamma, mm.beta) == pytest.approx((3.5, 1.8, 2.0, 2.5, 2.1),
                                                                                      rel=1e-6)
    assert mm.predict(M.MiB, M.MiB, M.MiB, 2 * M.MiB) == pytest.approx(3.5 + 1.8 + 2.0 + 2.5 + 4.2)
    # cached: a second fit does not measure
    monkeypatch.setattr("chita_edge.devices.child.run_child", lambda *a, **k: (_ for _ in ()).throw(AssertionError("again")))
    assert M.memory_model(1).alpha == pytest.approx(1.8)
    assert math.isfinite(mm.base_mb)


class Res(nn.Module):
    """stem conv -> two identity-shortcut blocks -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(*[_Block() for _ in range(2)])
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def test_dropped_blocks_remove_their_units_weights_and_activations(tmp_path, monkeypatch, fake_memory):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "time_file", lambda *a, **k: (0.05, 1))
    m = Res().eval()
    x = torch.rand(1, 3, 8, 8)
    cm = CostModel.build(m, x, None, width_multiple=4, runs=1)
    assert sorted(cm.blocks) == ["blocks.0", "blocks.1"]
    full, one, both = cm.predict({}), cm.predict({}, dropped={"blocks.1"}), cm.predict({}, dropped={"blocks.0", "blocks.1"})
    # each block is two units (conv+bn+relu; conv+bn+add+relu), every unit timed the same
    per_unit = {t.unit.name: t.at(cm.sizes) for t in cm.tables}
    assert per_unit["blocks.1.c1"] > 0
    assert full.host_ms - one.host_ms == pytest.approx(per_unit["blocks.1.c1"] + per_unit["blocks.1.c2"])
    assert one.host_ms - both.host_ms == pytest.approx(full.host_ms - one.host_ms)
    assert set(full.units) - set(one.units) == {"blocks.1.c1", "blocks.1.c2"}
    # their weights (BatchNorm folded into a bias) go too: 2 x (8x8x3x3 + 8) floats per block
    assert full.weight_bytes - one.weight_bytes == 4 * 2 * (8 * 8 * 9 + 8)
    assert both.activation_bytes <= full.activation_bytes
    # the same at other widths: the saving shrinks with the stream's width
    w = {"stem": 4}
    assert 0 < cm.latency(w) - cm.latency(w, dropped={"blocks.0"}) <= full.host_ms - one.host_ms + 1e-12
    with pytest.raises(Exception, match="not a removable residual block"):
        cm.predict({}, dropped={"fc"})
