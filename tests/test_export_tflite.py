"""TFLite / LiteRT exports: direct sparse FULLY_CONNECTED weights, DENSIFY, compact, int8, metadata, runner."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from chita_edge.exporters import ExportConfig, export_model, file_requirements, inspect_file, load_session
from chita_edge.exporters import layouts as L
from conftest import run_cli
from test_export import (  # noqa: F401  (fixtures shared with the ONNX tests)
    _export,
    check_fallback_keeps_the_classifier,
    digits,
    export_int8,
    pooled_cnn,
    tiny,
)

from chita_edge.core.errors import BadInput
from chita_edge.models.zoo import MLPNet

pytestmark = pytest.mark.tflite
pytest.importorskip("litert_torch", reason="needs the tflite extra (litert-torch)")
pytest.importorskip("ai_edge_litert", reason="needs the tflite extra (ai-edge-litert)")


def test_sparse_fc_runs_on_builtin_kernels_without_xnnpack(tiny, digits, tmp_path):  # noqa: F811
    x = digits.x_test[:200]
    dense = _export(tiny["mlp"], "tflite", "dense", tmp_path / "d.tflite", x)
    sparse = _export(tiny["mlp"], "tflite", "sparse", tmp_path / "s.tflite", x)
    assert dense.parity.passed and sparse.parity.passed and sparse.parity.max_abs_error <= 1e-4
    assert dense.requires == {"xnnpack": True} and dense.parity.xnnpack is True
    assert sparse.requires["xnnpack"] is False and sparse.parity.xnnpack is False
    assert {row["encoding"] for row in sparse.layers} == {L.BCSR4}  # 1x4-block pruned, 90 %
    assert all(row["kernel"] == L.K_SPARSE for row in sparse.layers)
    assert sparse.bytes < 0.5 * dense.bytes
    # the file says what it needs, and the runner follows it
    req = file_requirements(tmp_path / "s.tflite")
    assert req["xnnpack"] is False and "XNNPACK" in req["reason"]
    sess = load_session(tmp_path / "s.tflite")
    assert sess.xnnpack is False
    assert np.allclose(sess.run(x[:5].numpy()), tiny["mlp"](x[:5]).detach().numpy(), atol=1e-4)
    with pytest.raises(BadInput, match="without XNNPACK"):
        load_session(tmp_path / "s.tflite", xnnpack=True)
    j = inspect_file(tmp_path / "s.tflite")
    assert j["sparse_mac_share"] == 1.0 and j["layout"] == "sparse" and j["requires"]["xnnpack"] is False
    assert j["verdict"].startswith("100% of MACs run on LiteRT's sparse FULLY_CONNECTED kernels")
    assert j["source"]["sha256"] == "ab" * 32 and j["producer"] == "chita-edge"
    assert {w["param"] for w in j["weights"]} == {"1.weight", "3.weight"}


def test_mlpnet_at_95_percent_sparse_file_is_under_a_quarter_of_dense(tmp_path):
    torch.manual_seed(0)
    m = MLPNet().eval()
    with torch.no_grad():
        for p in m.parameters():  # global magnitude pruning to 95 %, as unstructured as CHITA's output
            p.mul_((p.abs() > p.abs().flatten().kthvalue(int(0.95 * p.numel())).values).float())
    x = torch.rand(50, 1, 28, 28)
    dense = _export(m, "tflite", "dense", tmp_path / "d.tflite", x)
    sparse = _export(m, "tflite", "sparse", tmp_path / "s.tflite", x)
    assert sparse.parity.passed and sparse.bytes <= 0.25 * dense.bytes


def test_compact_cnn_has_fewer_parameters_and_dense_xnnpack(tiny, digits, tmp_path):  # noqa: F811
    x = digits.x_test[:100]
    r = _export(tiny["cnn"], "tflite", "compact", tmp_path / "c.tflite", x)
    assert r.parity.passed and r.requires["xnnpack"] is True
    assert r.compact["params_after"] < r.compact["params_before"]
    numel = {row["param"]: int(np.prod(row["shape"])) for row in r.layers}
    assert numel["0.weight"] == 4 * 1 * 3 * 3 and numel["3.weight"] == 16 * 4 * 3 * 3  # 8 -> 4 channels


def test_auto_keeps_xnnpack_when_convolutions_dominate(tiny, digits, tmp_path):  # noqa: F811
    r = _export(tiny["cnn"], "tflite", "auto", tmp_path / "a.tflite", digits.x_test[:50])
    assert r.requires["xnnpack"] is True and r.compact["removed_channels"] == 4
    fc = [row for row in r.layers if row["op"] == "FULLY_CONNECTED"][0]
    assert fc["encoding"] == L.DENSE


def test_int8_keeps_zeros_and_agrees_with_pytorch(tiny, digits, tmp_path):  # noqa: F811
    r = _export(tiny["cnn"], "tflite", "dense", tmp_path / "q.tflite", digits.x_test, quantize="int8",
                calib=digits.x_train[:100])
    assert r.parity.passed and r.parity.top1_agreement >= 0.99
    assert {row["dtype"] for row in r.layers} == {"int8"} and r.zeros["zeros_kept"]
    sess = load_session(tmp_path / "q.tflite")
    assert sess.run(digits.x_test[:3].numpy()).dtype == np.float32  # int8 I/O handled by the runner


def test_fp16_sparse_uses_densify_and_keeps_xnnpack(tiny, digits, tmp_path):  # noqa: F811
    r = _export(tiny["mlp"], "tflite", "sparse", tmp_path / "h.tflite", digits.x_test[:100], quantize="fp16")
    assert r.parity.passed and r.requires["xnnpack"] is True
    assert {row["encoding"] for row in r.layers} <= {L.DENSIFY_CSR, L.DENSIFY_BCSR4}
    j = inspect_file(tmp_path / "h.tflite")
    assert j["sparse_mac_share"] == 0 and "densif" in j["verdict"] and "dense speed" in j["verdict"]


def test_cli_export_tflite_and_inspect(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "m.tflite"
    r = run_cli("export", tiny["mlp_ckpt"], "--format", "tflite", "--layout", "auto", "--out", out,
                "--parity-samples", "100")
    assert r.code == 0, r.stderr
    # auto keeps XNNPACK (switching it off rests on x86-only constants) and says how to opt in
    assert "requires: no XNNPACK" not in r.stderr and out.exists()
    assert "note: auto kept XNNPACK on" in r.stderr and "opt in with --layout sparse" in r.stderr
    assert "LITERT_NO_XNNPACK_PENALTY=4.5" in r.stderr
    assert file_requirements(out)["xnnpack"] is True
    out = tmp_path / "j.tflite"
    r = run_cli("export", tiny["mlp_ckpt"], "--layout", "sparse", "--out", out, "--json",
                "--parity-samples", "50")
    assert r.code == 0 and r.json()["requires"]["xnnpack"] is False  # stdout holds exactly the JSON object
    assert any("unverified on ARM" in n for n in r.json()["notes"])
    r = run_cli("inspect", out)
    assert r.code == 0 and "verdict:" in r.stderr and "sparse kernel" in r.stdout


def test_int8_repairs_all_zero_channels_that_carry_a_bias(tiny, digits, tmp_path):  # noqa: F811
    """A pruned channel (all-zero filter) whose BatchNorm still adds a constant: the quantizer's ~1e-11 scale
    would clip that constant to zero; the export repairs the scale and the bias."""
    from chita_edge.exporters import tflite_format

    cnn = copy.deepcopy(tiny["cnn"])
    dead = (cnn[0].weight.abs().sum((1, 2, 3)) == 0).nonzero().flatten()
    assert len(dead) == 4
    with torch.no_grad():
        cnn[1].bias[dead] = 1.0
    cfg = ExportConfig(format="tflite", quantize="int8", min_agreement=0.95)  # without the repair: 0 %
    r = export_model(cnn, cfg, example_input=digits.x_test[:1], out=tmp_path / "q.tflite",
                     parity_inputs=digits.x_test, calibration=digits.x_train[:100])
    assert r.parity.passed and r.parity.top1_agreement >= 0.95
    m = tflite_format.load(tmp_path / "q.tflite")
    g = m.subgraphs[0]
    first = next(op for op in g.operators if tflite_format._op_name(m, op) in ("CONV_2D", "DEPTHWISE_CONV_2D"))
    scales = np.asarray(g.tensors[int(first.inputs[1])].quantization.scale)
    assert scales.min() > 1e-6 * scales.max()


def test_int8_keeps_exactly_the_sensitive_layer_in_float(tiny, digits, tmp_path):  # noqa: F811
    check_fallback_keeps_the_classifier("tflite", tiny, digits, tmp_path)
    assert load_session(tmp_path / "q.tflite").xnnpack is True  # float and int8 ops both run under XNNPACK


@pytest.mark.parametrize("pool", [torch.nn.AvgPool2d(8), torch.nn.AdaptiveAvgPool2d(1)], ids=["avgpool", "adaptive"])
def test_int8_average_pooling_is_float_and_the_classifier_gets_its_own_grid(pool, digits, tmp_path):  # noqa: F811
    """int8 AVERAGE_POOL_2D keeps its input's scale; run in float, the classifier after it quantises the averages
    on their own range (the FULLY_CONNECTED's int32 bias scale follows its input scale)."""
    from chita_edge.exporters import tflite_format

    cnn, own, coarse = pooled_cnn(pool)
    r = export_int8(cnn, "tflite", tmp_path / "q.tflite", digits, int8_fallback=False, min_agreement=0.9)
    assert r.parity.passed and len(r.int8_float_pooling) == 1
    m = tflite_format.load(tmp_path / "q.tflite")
    g = m.subgraphs[0]
    ops = {tflite_format._op_name(m, op): op for op in g.operators}
    pooling = ops.get("AVERAGE_POOL_2D") or ops["MEAN"]
    assert g.tensors[int(pooling.inputs[0])].type == 0  # float32: DEQUANTIZE -> pooling -> QUANTIZE
    x, w, b = (g.tensors[int(i)] for i in ops["FULLY_CONNECTED"].inputs[:3])
    xs = float(np.asarray(x.quantization.scale).reshape(-1)[0])
    assert xs == pytest.approx(own, rel=0.01) and xs < 0.5 * coarse
    assert np.allclose(np.asarray(b.quantization.scale), np.asarray(w.quantization.scale) * xs, rtol=1e-5)


def test_int8_quantising_leaves_the_calibrated_ranges_alone(digits):  # noqa: F811
    """The quantizer writes scale constraints into the ranges it is given (an int8 AVERAGE_POOL_2D's output range
    becomes its input's); each fallback trial must start from the calibrated ranges, so each gets a copy."""
    from chita_edge.exporters import tflite_format, tflite_quantize

    cnn, _, _ = pooled_cnn(torch.nn.AvgPool2d(8))
    q = tflite_quantize.Int8Quantizer(tflite_format.convert(cnn, digits.x_test[:1]), digits.x_train[:100].numpy())
    before = {k: {f: np.asarray(v).copy() for f, v in d.items()} for k, d in q._qsvs.items()}
    q.float_pooling = []  # the pooling in int8: the constrained op whose range the quantizer rewrites
    first = q.quantize(())
    assert all(np.array_equal(before[k][f], np.asarray(v)) for k, d in q._qsvs.items() for f, v in d.items())
    assert q.quantize(()) == first
