"""Quantisation-aware fine-tuning (chita_edge.training.qat, `finetune --qat`): the fake quantisation is the exporters'
int8, it sits where ONNX Runtime's QDQ graph quantises, masks stay exact, the checkpoint stays a plain float one
that exports, and training through it changes what the int8 file does."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import TINY, run_cli, tiny_cnn
from torch import nn

from chita_edge.core.checkpoint import read_weights, save_checkpoint
from chita_edge.core.data import Dataset
from chita_edge.models.zoo import ZOO, default_prunable
from chita_edge.pruning.layers import find_prunable
from chita_edge.training.finetune import FinetuneConfig, finetune
from chita_edge.training.masks import masks_from_zeros
from chita_edge.training.qat import QATModel, act_qparams, fake_quant_weight


@pytest.fixture(scope="module")
def pruned_cnn(digits) -> nn.Module:
    """A trained tiny CNN with ~60 % of its weights (and one whole output channel) set to zero."""
    m = tiny_cnn()
    finetune(m, digits, FinetuneConfig(epochs=2, lr=0.1, bn_batches=10, eval_each_epoch=False), masks={})
    with torch.no_grad():
        for p in (m[0].weight, m[4].weight):
            p[p.abs() < p.abs().flatten().quantile(0.6)] = 0
        m[0].weight[2] = 0
    return m.eval()


def test_fake_quant_weight_is_the_per_channel_int8_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 2, 2, generator=g)
    w[1] = 0  # an all-zero (pruned) channel
    w[2, 0] = 0
    w[3] *= 100  # channels of very different scales: per-channel scales keep the small ones precise
    ref = torch.empty_like(w)
    for c in range(4):
        s = max(float(w[c].abs().max()) / 127, 1e-12)
        q = np.clip(np.rint(w[c].numpy().astype(np.float64) / s), -127, 127)  # symmetric, zero point 0
        assert q.min() >= -127 and q.max() <= 127
        ref[c] = torch.from_numpy(q * s).float()
    got = fake_quant_weight(w)
    assert torch.allclose(got, ref, rtol=0, atol=1e-6 * float(w.abs().max()))
    assert torch.all(got[w == 0] == 0)  # zeros stay exactly zero
    assert not torch.equal(got, w)
    # straight-through estimator: the gradient passes unchanged inside the (never clipping) weight range
    wp = w.clone().requires_grad_(True)
    fake_quant_weight(wp).sum().backward()
    assert torch.equal(wp.grad, torch.ones_like(w))


def test_activation_qparams_and_round_trip_match_onnxruntime():
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    for lo, hi in ((-1.0, 1.0), (0.0, 6.2), (-3.7, 0.4), (0.25, 2.0)):
        s, zp = act_qparams(lo, hi)
        zp_ref, s_ref = compute_scale_zp(np.float32(min(lo, 0)), np.float32(max(hi, 0)), np.int8(-128),
                                       np.int8(127))
        assert s == pytest.approx(float(s_ref), rel=1e-6) and zp == int(zp_ref)
    qm = QATModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), torch.tensor([[-3.7, 0.4, 0.1, 0.0]])).eval()
    fq = qm.fq["q0"]  # the Linear's input
    assert (float(fq.lo), float(fq.hi)) == pytest.approx((-3.7, 0.4))
    x = torch.linspace(-5, 1, 97)
    s, zp = act_qparams(-3.7, 0.4)
    ref = (np.clip(np.rint(x.numpy().astype(np.float64) / s) + zp, -128, 127) - zp) * s  # QuantizeLinear + Dequantize
    assert np.allclose(fq(x).numpy(), ref, atol=1e-6)


def test_quantisation_points_are_the_qdq_graphs():
    r20 = ZOO["resnet20"].factory().eval()
    q = QATModel(r20, torch.rand(4, 3, 32, 32))
    # the normalised input, stem conv+bn+relu, per block: conv1+bn+relu, conv2+bn, (downsample), add+relu;
    # fc's input (average pooling runs in float in both exported files: its output gets a range of its own), fc
    assert len(q.points) == 1 + 1 + 9 * 3 + 2 + 2
    assert q.points[:5] == ["conv1:input", "conv1", "layer1.0.conv1", "layer1.0.conv2", "add"]
    assert q.points[-3:] == ["add_8", "fc:input", "fc"] and "layer2.0.downsample.0" in q.points
    assert len(q.fq) == len(q.points)
    mlp = QATModel(ZOO["mlpnet"].factory().eval(), torch.rand(4, 1, 28, 28))
    assert mlp.points == ["fc1:input", "fc1", "fc2", "fc3"]  # log_softmax stays float, as in the QDQ graph
    # the wrapper shares the model's parameters (training it trains the model) and does quantise
    assert {id(p) for p in q.parameters()} == {id(p) for p in r20.parameters()}
    with torch.no_grad():
        x = torch.rand(8, 3, 32, 32)
        assert not torch.equal(q(x), r20(x))


def test_qat_finetune_keeps_masks_freezes_bn_and_writes_a_plain_model(digits, pruned_cnn):
    m = copy.deepcopy(pruned_cnn)
    masks = masks_from_zeros(m, find_prunable(m, default_prunable))
    bn_stats = (m[1].running_mean.clone(), m[1].running_var.clone())
    keys = set(m.state_dict())
    rep = finetune(m, digits, FinetuneConfig(epochs=1, lr=0.02, qat=True, qat_agreement=1.0))
    named = dict(m.named_parameters())
    for k, mask in masks.items():
        assert torch.all(named[k][~mask] == 0)
    assert torch.all(m[0].weight[2] == 0)
    assert set(m.state_dict()) == keys and all(type(x) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.Linear)
                                               for x in m)
    assert torch.equal(m[1].running_mean, bn_stats[0]) and torch.equal(m[1].running_var, bn_stats[1])
    assert rep.bn_reestimated is False and rep.qat["points"] == ["0:input", "0", "4"]
    assert "int8_test_accuracy" in rep.history[0]
    for p in (m[0].weight, m[4].weight):  # the weights end on their int8 grid: export's quantisation is exact
        assert torch.equal(fake_quant_weight(p.detach()), p.detach())
    assert not any(isinstance(x, QATModel) for x in m.modules())


def hostile(model: nn.Module, factor: float = 50.0) -> nn.Module:
    """The same function, hostile to per-tensor int8: channel 0 of the BatchNorm output is ``factor`` x larger
    (the classifier's inputs from it ``factor`` x smaller), so the other channels get coarse int8 steps."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m[1].weight[0] *= factor
        m[1].bias[0] *= factor
        m[4].weight.view(10, 6, 64)[:, 0] /= factor
    return m


def _int8_onnx(model: nn.Module, digits: Dataset, out) -> tuple[float, float]:
    """Top-1 agreement and mean KL(float || int8) of the ONNX static-int8 export on the test images."""
    from chita_edge.exporters import ExportConfig, export_model, load_session

    model = model.eval()
    r = export_model(model, ExportConfig(format="onnx", quantize="int8", min_agreement=0.01, int8_fallback=False),
                     example_input=digits.x_test[:1], out=out, parity_inputs=digits.x_test,
                     calibration=digits.x_train[:200])
    q = torch.from_numpy(load_session(out).run(digits.x_test.numpy()))
    with torch.no_grad():
        f = model(digits.x_test)
    kl = torch.nn.functional.kl_div(q.log_softmax(1), f.log_softmax(1), log_target=True, reduction="batchmean")
    return r.parity.top1_agreement, float(kl)


def test_qat_brings_the_int8_file_closer_to_the_model(digits, pruned_cnn, tmp_path):
    """Same start, same settings, with and without --qat: only QAT lowers the int8 file's distance from PyTorch
    (measured on ONNX Runtime's int8 file, not on the simulation). The start is made hostile to per-tensor int8:
    one channel's activations are 50x larger (the function is unchanged), which makes the others' steps coarse."""
    m = hostile(pruned_cnn)
    base = _int8_onnx(m, digits, tmp_path / "base.onnx")
    res = {}
    for qat in (False, True):
        mm = copy.deepcopy(m)
        finetune(mm, digits, FinetuneConfig(epochs=2, lr=0.02, bn_batches=0, eval_each_epoch=False, qat=qat))
        res[qat] = _int8_onnx(mm, digits, tmp_path / f"{qat}.onnx")
    # measured: KL 0.0089 at the start, 0.0248 after float fine-tuning, 0.0025 after QAT; agreement 96.4 / 97.8 /
    # 98.3 % (360 test images)
    assert res[True][1] < 0.5 * min(base[1], res[False][1])
    assert res[True][0] >= max(base[0], res[False][0])


def test_cli_finetune_qat_checkpoint_exports(tmp_path, digits, pruned_cnn):
    (tmp_path / "tiny.py").write_text(TINY)
    src = tmp_path / "p.pt"
    save_checkpoint(src, pruned_cnn.state_dict(), {"model": f"{tmp_path / 'tiny.py'}:cnn", "input_shape": [1, 8, 8],
                                                   "data": "digits", "method": "magnitude", "sparsity": 0.6})
    out = tmp_path / "q.pt"
    r = run_cli("finetune", src, "--data", "digits", "--qat", "--epochs", "1", "--lr", "0.01", "--out", out, "--json")
    assert r.code == 0, r.stderr
    js = r.json()
    assert js["qat"]["int8_accuracy"] > 50 and js["bn_reestimated"] is False
    sd, meta = read_weights(out)
    assert meta["qat"] is True and meta["finetune"]["config"]["qat"] is True
    assert set(sd) == set(pruned_cnn.state_dict())
    sd_in = pruned_cnn.state_dict()
    assert torch.all(sd["0.weight"][sd_in["0.weight"] == 0] == 0)
    onnx_out = tmp_path / "q.onnx"
    r = run_cli("export", out, "--format", "onnx", "--quantize", "int8", "--no-int8-fallback", "--min-agreement",
                "0.9", "--out", onnx_out, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["zeros"]["zeros_kept"] is True
    # a float fine-tune of a QAT checkpoint drops the flag; --qat-agreement alone is refused
    out2 = tmp_path / "f.pt"
    assert run_cli("finetune", out, "--data", "digits", "--epochs", "1", "--out", out2).code == 0
    assert "qat" not in read_weights(out2)[1]
    r = run_cli("finetune", src, "--data", "digits", "--qat-agreement", "1", "--out", tmp_path / "x.pt")
    assert r.code == 2 and "--qat" in r.stderr


def test_dither_rounds_on_shifted_grids_in_training_only():
    from chita_edge.training.qat import FakeQuantAct

    fq = FakeQuantAct("t", ema=0.0, dither=True)
    fq.lo.fill_(-1.0)
    fq.hi.fill_(1.0)
    x = torch.linspace(-0.9, 0.9, 1001)
    s, _ = act_qparams(-1.0, 1.0)
    torch.manual_seed(0)
    fq.train()
    a, b = fq(x), fq(x)
    assert not torch.equal(a, b)  # a new grid offset per call
    assert float((a - x).abs().max()) <= s / 2 + 1e-6 and float((b - x).abs().max()) <= s / 2 + 1e-6
    assert len(torch.unique(torch.round((a - a[0]) / s * 1e4))) > 1  # still a grid: a few distinct levels
    fq.eval()
    plain = FakeQuantAct("t", ema=0.0).eval()
    plain.lo.fill_(-1.0)
    plain.hi.fill_(1.0)
    assert torch.equal(fq(x), plain(x))  # eval (export-time) rounding is the plain one


def _kl_float_vs_int8(m: nn.Module, digits: Dataset) -> float:
    q = QATModel(m, digits.x_train[:200]).eval()
    with torch.no_grad():
        f, s = m.eval()(digits.x_train), q(digits.x_train)
    return float(torch.nn.functional.kl_div(s.log_softmax(1), f.log_softmax(1), log_target=True,
                                            reduction="batchmean"))


def test_agreement_term_pulls_the_float_model_and_its_int8_together(digits, pruned_cnn):
    res = {}
    models = {}
    for ag in (0.0, 3.0):
        m = copy.deepcopy(pruned_cnn)
        finetune(m, digits, FinetuneConfig(epochs=1, lr=0.02, eval_each_epoch=False, qat=True, qat_agreement=ag))
        res[ag], models[ag] = _kl_float_vs_int8(m, digits), m
    # the float path is trained too (same seed and data order: only the loss differs) ...
    assert not torch.equal(models[0.0][4].weight, models[3.0][4].weight)
    # ... towards its simulated int8 (measured: mean KL on the training images 4.75e-5 without, 4.52e-5 with)
    assert res[3.0] < res[0.0]


def test_qat_resume_is_bit_identical(digits, pruned_cnn, tmp_path):
    cfg = FinetuneConfig(epochs=2, lr=0.02, batch_size=128, eval_each_epoch=False, qat=True, qat_dither=True,
                         qat_agreement=1.0, seed=5)
    ref = copy.deepcopy(pruned_cnn)
    finetune(ref, digits, cfg)
    state = tmp_path / "q.state"

    class Stop(Exception):
        pass

    def boom(stage, done, total):
        if stage == "epochs" and done == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(copy.deepcopy(pruned_cnn), digits, cfg, progress=boom, state_path=state)
    st = torch.load(state, weights_only=True)
    assert set(st["qat_ranges"]) == {"q0", "q1", "q2"}
    fresh = copy.deepcopy(pruned_cnn)
    rep = finetune(fresh, digits, cfg, state_path=state, resume=True)
    assert rep.resumed_from == {"epoch": 1, "step": 0}
    sa, sb = fresh.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_simulated_quantisation_points_and_scales_are_the_exported_files(tmp_path):
    """Every activation the int8 ONNX file quantises (its QuantizeLinear nodes) is a point of the simulation, with
    the same scale -- average pooling included: in float, its output quantised once, on its own range, as the
    classifier's input."""
    import onnx
    from chita_edge.exporters import ExportConfig, export_model
    from onnx import numpy_helper

    torch.manual_seed(0)
    r20 = ZOO["resnet20"].factory().eval()
    x = torch.rand(24, 3, 32, 32)
    export_model(r20, ExportConfig(format="onnx", quantize="int8", min_agreement=0.01, int8_fallback=False),
                 example_input=x[:1], out=tmp_path / "q.onnx", parity_inputs=x[:4], calibration=x)
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    file_scales = sorted(float(inits[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear")
    q = QATModel(r20, x)
    sim_scales = sorted(act_qparams(m.lo, m.hi)[0] for m in q.fq.values())
    assert len(file_scales) == len(sim_scales) == len(q.points)
    assert np.allclose(file_scales, sim_scales, rtol=3e-3)
