"""torchvision and timm models (``torchvision:NAME`` / ``timm:NAME``, the ``zoo`` extra): the import shim, the
specs, the fp32 parity tolerance, what blocks structured pruning, and a small matrix of families (random init,
32x32 inputs): unstructured prune, dense fp32 ONNX export with parity, and their channel groups.

Tests that need torchvision or timm skip with the reason when the extra is not installed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from chita_edge.exporters.export import ExportConfig, _check_parity
from conftest import run_cli
from torch import nn

from chita_edge.core.errors import BadInput, MissingExtra
from chita_edge.graph.channels import blocked_summary, channel_report
from chita_edge.models.hub import (
    DETECTION_OPS,
    define_detection_ops,
    import_timm,
    import_torchvision,
    parse_spec,
)
from chita_edge.models.loading import load_model
from chita_edge.pruning.channels import channel_structure

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
# (family, name, channel groups found on 32x32 inputs or None when a known op blocks them all, what blocks them)
MATRIX = [
    ("torchvision", "mobilenet_v3_small", 27, None),
    ("torchvision", "resnet18", 12, None),
    ("torchvision", "mobilenet_v2", 25, None),
    ("timm", "mobilenetv2_050", 25, None),  # BatchNormAct2d is traced as one BatchNorm module (graph/trace.py)
]
IDS = [f"{f}:{n}" for f, n, _, _ in MATRIX]


def spec_of(family: str, name: str) -> str:
    return f"{family}:{name}?num_classes=10&input_size={SIZE}"


@pytest.mark.parametrize("family,name,groups,blocker", MATRIX, ids=IDS)
def test_channel_groups_of_each_family_or_what_blocks_them(family, name, groups, blocker):
    need(family)
    lm = load_model(spec_of(family, name))
    found, blocked = channel_report(lm.module, torch.rand(1, 3, SIZE, SIZE))
    assert len(found) == groups
    assert any(b.why == "reaches the model output" for b in blocked)  # the classifier's outputs, always
    if blocker is None:
        channel_structure(lm.module, torch.rand(1, 3, SIZE, SIZE))
        return
    assert all(b.op in (blocker, "output") for b in blocked)
    with pytest.raises(BadInput) as e:  # the refusal names the module and op that block each group
        channel_structure(lm.module, torch.rand(1, 3, SIZE, SIZE))
    msg = str(e.value)
    assert "no prunable channel groups" in msg and "\n" not in msg
    assert f"by {blocker}" in msg and "at bn1: conv_stem's 16 channels" in msg and blocked_summary(blocked) in msg


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


@pytest.mark.slow
@pytest.mark.parametrize("family,name", [(f, n) for f, n, _, _ in MATRIX], ids=IDS)
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
