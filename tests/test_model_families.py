"""torchvision and timm models (``torchvision:NAME`` / ``timm:NAME``, the ``zoo`` extra): the import shim, the
specs, the fp32 parity tolerance, what blocks structured pruning, and a small matrix of families (random init,
32x32 inputs): unstructured prune through the CLI, dense fp32 ONNX export with parity, their channel groups, the
budget cost model's units (a layer fed by a concatenation scales with each input) and a budget prune through the
CLI (stand-in cost model and device), and TFLite with parity for the smallest families.

Tests that need torchvision or timm skip with the reason when the extra is not installed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from chita_edge.exporters import export_model
from chita_edge.exporters.export import ExportConfig, _check_parity
from conftest import run_cli
from test_budget import use_fake_cost_model
from test_structured import _RegNetLike
from torch import nn

from chita_edge.budget import costmodel as C
from chita_edge.budget import search
from chita_edge.budget import timing as T
from chita_edge.budget import units as U
from chita_edge.budget.config import BudgetConfig
from chita_edge.budget.costmodel import CostModel, widths_of
from chita_edge.budget.memory import MemoryModel
from chita_edge.budget.search import prune_to_budget
from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, MissingExtra
from chita_edge.devices.profiles import load_profile, with_budgets
from chita_edge.graph.channels import channel_report
from chita_edge.graph.compact import compact_model
from chita_edge.models.hub import (
    DETECTION_OPS,
    define_detection_ops,
    import_timm,
    import_torchvision,
    parse_spec,
)
from chita_edge.models.loading import load_model
from chita_edge.pruning.channels import apply_keep, channel_structure, l1_filter_norms

SIZE = 32


def need(family: str) -> None:
    try:
        import_timm() if family == "timm" else import_torchvision()
    except MissingExtra:
        pytest.skip(f"{family} is not installed (the zoo extra: pip install 'chita-edge[zoo]')")


# ------------------------------------------------------------------------------------------------ the shim
def test_torchvision_imports_through_the_shim_even_where_its_extension_cannot_load():
    need("torchvision")
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=120)
    shimmed = subprocess.run(
        [sys.executable, "-c", "import torch\n"
         "from chita_edge.models.hub import import_torchvision\n"
         "tv = import_torchvision()\n"
         "m = tv.models.mobilenet_v2(weights=None, num_classes=3).eval()\n"
         "print(tuple(m(torch.rand(1, 3, 32, 32)).shape), tv.extension._has_ops())"],
        capture_output=True, text=True, timeout=120)
    assert shimmed.returncode == 0, shimmed.stderr[-2000:]
    shape, has_ops = shimmed.stdout.split(")")[0] + ")", shimmed.stdout.split(")")[1].strip()
    assert shape == "(1, 3)"
    if has_ops == "False":  # a CUDA torchvision wheel beside a CPU torch: the failure the shim exists for
        assert plain.returncode != 0 and "torchvision::nms" in plain.stderr
    else:
        assert plain.returncode == 0


def test_the_shim_defines_each_detection_op_once():
    need("torchvision")
    for qualname in DETECTION_OPS:
        ns, _, name = qualname.partition("::")
        assert hasattr(getattr(torch.ops, ns), name)
    assert define_detection_ops() == []  # already there (from the extension or the shim): nothing redefined


def test_a_missing_extra_says_which(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now raises ImportError
    with pytest.raises(MissingExtra, match=r"needs the 'zoo' extra: pip install 'chita-edge\[zoo\]'"):
        load_model("torchvision:resnet18")
    with pytest.raises(MissingExtra, match="zoo"):
        load_model("timm:mobilenetv2_050")


# ------------------------------------------------------------------------------------------------ specs
def test_spec_options_are_parsed_and_bad_ones_named():
    assert parse_spec("timm:mobilenetv2_050?num_classes=10&input_size=32") == (
        "timm", "mobilenetv2_050", {"num_classes": 10, "input_size": 32})
    assert parse_spec("torchvision:resnet18") == ("torchvision", "resnet18", {})
    for spec, msg in [("torchvision:resnet18?classes=3", "unknown option 'classes=3'"),
                      ("torchvision:resnet18?num_classes=0", "num_classes must be a positive integer"),
                      ("timm:x?input_size=big", "input_size must be a positive integer, got 'big'"),
                      ("timm:", "expected torchvision:NAME or timm:NAME")]:
        with pytest.raises(BadInput, match=msg):
            parse_spec(spec)


def test_a_spec_builds_the_same_model_with_its_classes_and_input_size(tmp_path):
    need("torchvision")
    spec = f"torchvision:mobilenet_v3_small?num_classes=7&input_size={SIZE}"
    a, b = load_model(spec), load_model(spec)
    assert a.input_shape == (3, SIZE, SIZE) and a.spec == spec
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert a.module(x).shape == (2, 7)
    sa = a.module.state_dict()
    assert all(torch.equal(sa[k], v) for k, v in b.module.state_dict().items())  # seeded init
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sa.items()}, tmp_path / "w.pt")
    c = load_model(spec, tmp_path / "w.pt")  # weights come as a state dict
    assert torch.equal(c.module.state_dict()["classifier.3.bias"], sa["classifier.3.bias"] + 1)
    with pytest.raises(BadInput, match="no classification model 'mobilenet_v3_smal'; did you mean "
                                       "torchvision:mobilenet_v3_small"):
        load_model("torchvision:mobilenet_v3_smal")


# ------------------------------------------------------------------------------------------------ parity
def test_fp32_parity_scales_with_the_outputs():
    cfg = ExportConfig(format="onnx")
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 20, (50, 1000))  # trained-size logits
    ok = _check_parity(cfg, ref, (ref + rng.uniform(-1.3e-4, 1.3e-4, ref.shape)).astype(np.float32), "data", False)
    assert ok.passed and ok.max_abs_error > 1e-4 and ok.error_to_tolerance < 0.1  # refused by the old 1e-4 gate
    bad = ref.copy()
    bad[:, 3] += 0.5  # one wrong output: far beyond 1e-4 + 1e-3 * max|output|
    assert not _check_parity(cfg, ref, bad.astype(np.float32), "data", False).passed
    small = rng.normal(0, 1e-3, (50, 10))  # tiny outputs: the absolute 1e-4 still holds
    assert not _check_parity(cfg, small, (small + 3e-4).astype(np.float32), "data", False).passed
    assert "0.0001 + 0.001 * max|output| per sample" in ok.criterion


# ------------------------------------------------------------------------------------------------ the matrix
# (family, name, channel groups found on 32x32 inputs, the ops that block the other channel spaces besides the
# model output -- each named in the report and left unpruned)
MATRIX = [
    ("torchvision", "mobilenet_v3_small", 27, ()),
    ("torchvision", "resnet18", 12, ()),
    ("torchvision", "mobilenet_v2", 25, ()),
    ("torchvision", "mnasnet0_5", 25, ()),
    ("torchvision", "efficientnet_b0", 40, ()),  # StochasticDepth: an identity in eval mode
    ("torchvision", "shufflenet_v2_x0_5", 18, (".view() in InvertedResidual.forward",)),  # the channel shuffle
    ("torchvision", "regnet_x_400mf", 27, ()),  # 5 streams + 22 bottlenecks through grouped convs, whole groups
    ("timm", "mobilenetv2_050", 25, ()),  # BatchNormAct2d is traced as one BatchNorm module (graph/trace.py)
    ("timm", "efficientnet_lite0", 24, ()),
    ("timm", "mobilenetv3_small_050", 26, ()),  # timm's Linear (an nn.Linear subclass) is a leaf module
    ("timm", "ghostnet_050", 31, ()),  # Ghost modules: cat + slice; SE gates and shortcuts cut to line up
]
IDS = [f"{f}:{n}" for f, n, _, _ in MATRIX]
DENSE_EXPORT = IDS[:3] + ["timm:mobilenetv2_050"]  # unstructured prune + dense export (the CLI path)


def spec_of(family: str, name: str) -> str:
    return f"{family}:{name}?num_classes=10&input_size={SIZE}"


@pytest.mark.parametrize("family,name,groups,blockers", MATRIX, ids=IDS)
def test_channel_groups_of_each_family_and_what_blocks_the_rest(family, name, groups, blockers):
    need(family)
    lm = load_model(spec_of(family, name))
    found, blocked = channel_report(lm.module, torch.rand(1, 3, SIZE, SIZE))
    assert len(found) == groups
    assert any(b.why == "reaches the model output" for b in blocked)  # the classifier's outputs, always
    assert {b.op for b in blocked} - {"output"} == set(blockers)
    assert all(b.module and b.why for b in blocked if b.op != "output")  # each names its module and reason
    cs = channel_structure(lm.module, torch.rand(1, 3, SIZE, SIZE))
    assert len(cs.specs) == groups


def _convnext_like() -> nn.Module:
    """torchvision's ConvNeXt with two tiny stages: CNBlocks (depthwise 7x7, channels-last LayerNorm, a Linear
    MLP, layer scale, stochastic depth) and LayerNorm2d downsampling."""
    tv = import_torchvision()
    cfg = tv.models.convnext.CNBlockConfig
    torch.manual_seed(0)
    return tv.models.convnext.ConvNeXt([cfg(16, 32, 1), cfg(32, None, 1)], stochastic_depth_prob=0.1,
                                       num_classes=10).eval()


def test_a_convnext_like_model_prunes_its_hidden_channels_and_names_the_layer_norm_on_the_stream():
    need("torchvision")
    found, blocked = channel_report(_convnext_like(), torch.rand(1, 3, SIZE, SIZE))
    assert [(g.id, g.size) for g in found] == [("features.1.0.block.3", 64), ("features.3.0.block.3", 128)]
    by = {b.id: b for b in blocked}
    assert set(by) == {"features.0.0", "features.2.1", "classifier.2"}  # two streams and the classifier's outputs
    assert by["features.0.0"].producers == ("features.0.0", "features.1.0.block.5")  # joined through layer scale
    assert (by["features.0.0"].module, by["features.0.0"].op) == ("features.0.1", "layer_norm in LayerNorm2d.forward")
    assert (by["features.2.1"].module, by["features.2.1"].op) == ("features.3.0.block.2", "LayerNorm")
    assert "a LayerNorm over the channels" in by["features.2.1"].why


@pytest.mark.slow
def test_a_convnext_like_model_exports_compact_with_parity(tmp_path):
    """The hidden MLP channels pruned, compacted and exported to ONNX with parity (fast, without the export:
    tests/test_structured.py::test_a_convnext_block_prunes_its_hidden_linear_channels_and_names_the_layer_norm)."""
    need("torchvision")
    m, x = _convnext_like(), torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    cs = channel_structure(m, x[:1])
    norms = l1_filter_norms(m, cs)
    keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
    for f, s in enumerate(cs.specs):  # a quarter of each hidden MLP layer, the smallest L1 rows
        sl = cs.channels(f)
        keep[sl.start + norms[sl].argsort()[:s.size // 4]] = False
    apply_keep(m, cs, keep)
    r = export_model(m, ExportConfig(format="onnx", layout="compact"), example_input=x[:1], out=tmp_path / "c.onnx",
                     parity_inputs=x)
    assert r.parity.passed and r.parity.top1_agreement == 1.0 and r.compact["removed_channels"] == 16 + 32
    assert r.compact["params_after"] == r.compact["params_before"] - 2 * 16 * 16 - 16 - 2 * 32 * 32 - 32


class _StochasticDepth(nn.Module):
    """EfficientNet's MBConv tail: a 1x1 projection, StochasticDepth (identity in eval mode) and the shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.expand, self.project = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)
        self.drop = import_torchvision().ops.StochasticDepth(0.2, "row")
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head((s + self.drop(self.project(torch.relu(self.expand(s))))).mean((2, 3)))


def test_stochastic_depth_passes_the_channels_on():
    need("torchvision")
    found, blocked = channel_report(_StochasticDepth(), torch.rand(1, 3, SIZE, SIZE))
    assert [g.id for g in found] == ["stem", "expand"] and [b.op for b in blocked] == ["output"]
    assert {m.module for m in found[0].members} == {"stem", "expand", "project", "head"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("families") / "images.npz"
    np.savez(path, x_train=rng.random((64, 3, SIZE, SIZE), dtype=np.float32), y_train=rng.integers(0, 10, 64),
             x_test=rng.random((32, 3, SIZE, SIZE), dtype=np.float32), y_test=rng.integers(0, 10, 32))
    return path


def settled_weights(spec: str, path) -> None:
    """The random-init model with BatchNorm statistics measured on random images (so that its logits are not
    vanishingly small, as a fresh torchvision MobileNet's are), saved as a state dict."""
    m = load_model(spec).module
    for bn in m.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.momentum = None  # a cumulative average over the batches
    m.train()
    with torch.no_grad():
        m(torch.rand(32, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    torch.save(m.state_dict(), path)


@pytest.mark.parametrize("family,name", [(f, n) for f, n, _, _ in MATRIX if f"{f}:{n}" in DENSE_EXPORT],
                         ids=DENSE_EXPORT)
def test_each_family_prunes_and_exports_with_parity(family, name, images, tmp_path):
    need(family)
    spec = spec_of(family, name)
    settled_weights(spec, tmp_path / "w.pt")
    r = run_cli("prune", spec, "--weights", tmp_path / "w.pt", "--data", f"npz:{images}", "--method", "magnitude",
                "--sparsity", "0.5", "--out", tmp_path / "p.pt", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["sparsity"] == pytest.approx(0.5, abs=0.01)
    r = run_cli("export", tmp_path / "p.pt", "--format", "onnx", "--layout", "dense", "--parity-samples", "32",
                "--out", tmp_path / "p.onnx", "--json")
    assert r.code == 0, r.stderr
    p = r.json()["parity"]
    assert p["passed"] and p["inputs"] == "data" and p["samples"] == 32 and p["top1_agreement"] == 1.0
    assert p["error_to_tolerance"] < 0.1 and (tmp_path / "p.onnx").stat().st_size > 0


@pytest.mark.parametrize("family,name", [(f, n) for f, n, _, _ in MATRIX], ids=IDS)
def test_each_family_prunes_channels_and_exports_compact_with_parity(family, name, tmp_path):
    need(family)
    spec = spec_of(family, name)
    settled_weights(spec, tmp_path / "w.pt")
    m = load_model(spec, tmp_path / "w.pt").module.eval()
    x = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    cs = channel_structure(m, x[:1])
    norms = l1_filter_norms(m, cs)
    keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
    for f, s in enumerate(cs.specs):  # a quarter of every group, the smallest L1 filters (structured, one shot)
        sl = cs.channels(f)
        keep[sl.start + norms[sl].argsort()[:max(1, s.size // 4)]] = False
    apply_keep(m, cs, keep)
    r = export_model(m, ExportConfig(format="onnx", layout="compact"), example_input=x[:1], out=tmp_path / "c.onnx",
                     parity_inputs=x)
    assert r.parity.passed and r.parity.top1_agreement == 1.0 and r.parity.error_to_tolerance < 0.5
    assert r.compact["removed_channels"] == int((~keep).sum())
    assert r.compact["params_after"] < r.compact["params_before"]


class _Cumulative(nn.Module):
    """A conv whose channels run through an op the channel walker does not know (a cumulative sum over them)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cumsum(self.conv(x), dim=1).mean((2, 3)))


def test_a_refusal_names_the_module_and_op_that_block_each_group():
    found, blocked = channel_report(_Cumulative(), torch.rand(1, 3, SIZE, SIZE))
    assert not found and any("cumsum" in b.op for b in blocked)
    with pytest.raises(BadInput) as e:
        channel_structure(_Cumulative(), torch.rand(1, 3, SIZE, SIZE))
    msg = str(e.value)
    assert "no prunable channel groups" in msg and "cumsum" in msg and "conv" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------------ budget: cat
class _Fire(nn.Module):
    """SqueezeNet's shape in miniature: a Fire module (squeeze, two expand convs concatenated) read by a conv
    classifier whose outputs are the model output, so that its cost moves only with the concatenated widths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.squeeze = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.e1, self.e3 = nn.Conv2d(8, 32, 1), nn.Conv2d(8, 32, 3, padding=1)
        self.classifier = nn.Conv2d(64, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(torch.relu(self.stem(x))))
        cat = torch.relu(torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1))
        return self.classifier(cat).mean((2, 3))


def test_a_unit_fed_by_a_concatenation_scales_with_each_of_its_parts():
    m, x = _Fire().eval(), torch.rand(1, 3, 8, 8)
    g = U.trace_graph(m, x, channel_structure(m, x).specs)
    units = {u.name: u for u in U.split_units(g)}
    assert set(units["classifier"].axes) == {"e1", "e3"}  # was none: the classifier looked fixed-width
    assert g.parts["cat"] == (("e1", 1), ("e3", 1)) and g.parts["relu_4"] == g.parts["cat"]
    assert U.scaled_shape(g, "cat", {**g.sizes, "e1": 8, "e3": 16}) == (1, 24, 8, 8)
    mod, inputs = U.build_unit(g, units["classifier"], {**g.sizes, "e1": 8, "e3": 16})
    assert inputs[0].shape[1] == 24 and mod(*inputs).shape == (1, 10, 8, 8)
    assert "32*1c+32*1c" in units["classifier"].signature


def test_a_budget_under_the_dense_latency_is_met_through_a_concatenation(tmp_path, monkeypatch):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    # a unit's time stands in as its ONNX file's size (its weights: cin * cout * k), so nothing is timed here
    monkeypatch.setattr(T, "time_file", lambda path, x, threads, runs: (path.stat().st_size * 1e-5, 1))
    monkeypatch.setattr(T, "time_overhead", lambda threads, runs=400: (0.001, 0.0, "test"))
    monkeypatch.setattr(C, "memory_model", lambda threads=1, **kw: MemoryModel(3.0, 2.0, 2.5, 1.5, 2.0, 16))
    m, gen = _Fire().eval(), torch.Generator().manual_seed(0)
    xs, ys = torch.rand(48, 3, 8, 8, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    data = Dataset("synthetic", xs, ys, xs[:16], ys[:16])
    cm = CostModel.build(m, xs[:1], None, width_multiple=4, runs=1)
    dense = cm.predict({}).latency_ms
    assert cm.predict({"e1": 16, "e3": 16}).latency_ms < 0.75 * dense  # the classifier shrinks with the cat
    prof = load_profile("phone-mid-sd670")
    budgets = with_budgets(prof, latency_ms=0.6 * dense, memory_mb=1000, file_mb=1000)
    cfg = BudgetConfig(method="l1-uniform", verify=False, calib_samples=32, width_multiple=4)
    res = prune_to_budget(m, xs[:1], data, prof, budgets, cfg, cost_model=cm)
    assert res.passed and res.predicted["latency_ms"] <= 0.6 * dense
    assert res.widths["e1"] + res.widths["e3"] < 64 and res.model.classifier.in_channels < 64


def test_the_weight_bytes_of_a_layer_fed_by_a_concatenation_scale_with_each_part(tmp_path, monkeypatch):
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "time_file", lambda path, x, threads, runs: (0.01, 1))
    monkeypatch.setattr(T, "time_overhead", lambda threads, runs=400: (0.001, 0.0, "test"))
    monkeypatch.setattr(C, "memory_model", lambda threads=1, **kw: MemoryModel(3.0, 2.0, 2.5, 1.5, 2.0, 16))
    m, x = _Fire().eval(), torch.rand(1, 3, 8, 8)
    cm = CostModel.build(m, x, None, width_multiple=4, runs=1)
    with torch.no_grad():  # e1 keeps 8 of 32 channels, e3 16: the classifier then reads 24 (was counted at 64)
        for conv, keep in ((m.e1, 8), (m.e3, 16)):
            conv.weight[keep:] = 0
            conv.bias[keep:] = 0
    small, _ = compact_model(m, x)
    assert small.classifier.in_channels == 24
    assert cm.weight_bytes({"e1": 8, "e3": 16})[0] == 4 * sum(p.numel() for p in small.parameters())


# ------------------------------------------------------------------------------------------------ the CLI matrix
@pytest.mark.parametrize("family,name", [(f, n) for f, n, _, _ in MATRIX], ids=IDS)
def test_each_family_prunes_unstructured_through_the_cli(family, name, images, tmp_path):
    need(family)
    r = run_cli("prune", spec_of(family, name), "--data", f"npz:{images}", "--method", "magnitude",
                "--sparsity", "0.5", "--out", tmp_path / "p.pt", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert load_model(None, tmp_path / "p.pt").spec == spec_of(family, name)


# one family with residuals, one with SE and inverted residuals, one with concatenations
BUDGET = ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:ghostnet_050"]


@pytest.mark.parametrize("spec", BUDGET)
def test_the_cost_model_units_of_a_family_build_at_reduced_widths(spec):
    """Every unit the cost model would time rebuilds alone at the narrowest widths and runs (no timing here)."""
    need(spec.split(":")[0])
    m = load_model(f"{spec}?num_classes=10&input_size={SIZE}").module.eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    g = U.trace_graph(m, x, channel_structure(m, x).specs)
    narrow = {k: max(1, v // 4) for k, v in g.sizes.items()}
    units = U.split_units(g)
    assert all(len(u.axes) <= U.MAX_AXES for u in units)
    for u in units:
        mod, inputs = U.build_unit(g, u, narrow)
        with torch.no_grad():
            out = mod(*inputs)
        assert tuple(out.shape) == U.scaled_shape(g, u.nodes[-1], narrow), u.name


def test_grouped_and_channels_last_layers_scale_in_the_cost_model(tmp_path, monkeypatch):
    """RegNet's grouped convs (whole groups) and ConvNeXt's Linears over the last dim: every unit rebuilds at the
    narrowest widths, and the weight count at reduced widths is the compacted model's."""
    need("torchvision")
    monkeypatch.setenv("CHITA_EDGE_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "time_file", lambda path, x, threads, runs: (0.01, 1))
    monkeypatch.setattr(T, "time_overhead", lambda threads, runs=400: (0.001, 0.0, "test"))
    monkeypatch.setattr(C, "memory_model", lambda threads=1, **kw: MemoryModel(3.0, 2.0, 2.5, 1.5, 2.0, 16))
    x = torch.rand(1, 3, SIZE, SIZE)
    for m in (load_model(spec_of("torchvision", "regnet_x_400mf")).module.eval(), _convnext_like()):
        g = U.trace_graph(m, x, channel_report(m, x)[0])
        narrow = {k: max(1, v // 4) for k, v in g.sizes.items()}
        new = [u for u in U.split_units(g) if u.name.endswith(("f.b.0", "block.3", "block.5"))]  # grouped; Linear
        assert len(new) in (22, 4)
        for u in new:
            mod, inputs = U.build_unit(g, u, narrow)
            with torch.no_grad():
                assert tuple(mod(*inputs).shape) == U.scaled_shape(g, u.nodes[-1], narrow), u.name
    m, x = _RegNetLike().eval(), torch.rand(1, 3, 8, 8)  # a RegNet bottleneck: 3 groups of 4 channels
    cs = channel_structure(m, x)
    keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
    keep[cs.first[cs.ids.index("a")]] = keep[cs.first[cs.ids.index("stem")]] = False  # a group, a stream channel
    cm = CostModel.build(m, x, None, specs=cs.specs, width_multiple=4, runs=1)
    apply_keep(m, cs, keep)
    small, _ = compact_model(m, x)
    assert small.b.groups == 2 and widths_of(small, cs.specs) == cs.widths(keep)  # "a": 2 groups, not 8 channels
    convs = [small.stem, small.a, small.b, small.c, small.head]  # (small.mult is not called)
    expected = sum(mod.weight.numel() + mod.weight.shape[0] for mod in convs)  # weights and (folded) biases
    assert cm.weight_bytes(cs.widths(keep))[0] == 4 * expected


@pytest.mark.parametrize("spec", BUDGET)
def test_a_family_prunes_to_a_latency_budget_through_the_cli(spec, images, tmp_path, monkeypatch):
    """The budget path end to end (channel groups, search, compaction, the checkpoint's plan); the cost model is
    the analytic stand-in of tests/test_budget.py and the device a measurement linear in the widths."""
    need(spec.split(":")[0])
    spec = f"{spec}?num_classes=10&input_size={SIZE}"
    specs = channel_structure(load_model(spec).module.eval(), torch.rand(1, 3, SIZE, SIZE)).specs
    use_fake_cost_model(monkeypatch)
    full = sum(s.size for s in specs)

    def fake_measure(model, x, profile, path, **kw):  # 1 ms for the dense model, linear in the widths
        path.write_bytes(b"onnx")
        lat = sum(widths_of(model, specs).values()) / full
        return {"latency_ms": lat, "memory_mb": 5.0, "file_mb": 0.05, "file": str(path), "percentile": "p90"}

    monkeypatch.setattr(search, "measure_model", fake_measure)
    r = run_cli("prune", spec, "--data", f"npz:{images}", "--out", tmp_path / "p.pt", "--profile", "phone-mid-sd670",
                "--latency-ms", "0.7", "--memory-mb", "1000", "--file-mb", "1000", "--method", "l1-uniform",
                "--search-stages", "1", "--json")
    assert r.code == 0, r.stderr
    d = r.json()
    assert d["passed"] and all(row["width"] <= row["of"] for row in d["layers"])
    lm = load_model(None, tmp_path / "p.pt")
    assert sum(p.numel() for p in lm.module.parameters()) == d["params_after"] < d["params_before"]
    with torch.no_grad():
        assert lm.module(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 10)


TFLITE = ["timm:mobilenetv3_small_050", "torchvision:shufflenet_v2_x0_5"]  # the smallest (litert-torch is slow)


@pytest.mark.parametrize("spec", TFLITE)
def test_a_small_family_exports_to_tflite_with_parity(spec, images, tmp_path):
    need(spec.split(":")[0])
    pytest.importorskip("litert_torch", reason="needs the tflite extra (litert-torch)")
    pytest.importorskip("ai_edge_litert", reason="needs the tflite extra (ai-edge-litert)")
    spec = f"{spec}?num_classes=10&input_size={SIZE}"
    settled_weights(spec, tmp_path / "w.pt")
    r = run_cli("prune", spec, "--weights", tmp_path / "w.pt", "--data", f"npz:{images}", "--method", "magnitude",
                "--sparsity", "0.5", "--out", tmp_path / "p.pt", "--json")
    assert r.code == 0, r.stderr
    r = run_cli("export", tmp_path / "p.pt", "--format", "tflite", "--parity-samples", "16",
                "--out", tmp_path / "p.tflite", "--json")
    assert r.code == 0, r.stderr
    p = r.json()["parity"]
    assert p["passed"] and p["top1_agreement"] == 1.0 and (tmp_path / "p.tflite").stat().st_size > 0
