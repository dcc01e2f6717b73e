"""Fine-tuning after a budget prune (issue 20): the output layer's ridge re-fit (``training.head``), the warm-up,
and the budget path's recipe."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_mlp
from torch import nn

from chita_edge.core.errors import BadInput
from chita_edge.training.finetune import FinetuneConfig, finetune
from chita_edge.training.head import condition_head


@pytest.fixture(scope="module")
def dense_mlp(digits) -> nn.Module:
    m = tiny_mlp()
    finetune(m, digits, FinetuneConfig(epochs=4, lr=0.1, bn_batches=0, eval_each_epoch=False), masks={})
    return m


def collinear_head(dense: nn.Module, copies: int = 16, gain: float = 20.0) -> nn.Module:
    """``dense`` (Flatten, Linear, ReLU, Linear) with the first ``copies`` hidden units duplicated and the head
    given ``gain`` x a random direction on each (unit, copy) pair with opposite signs: the same function on every
    input, with the large cancelling weights a least-squares re-fit puts on collinear features."""
    _, fc1, _, fc2 = dense
    g = torch.Generator().manual_seed(0)
    a = nn.Linear(fc1.in_features, fc1.out_features + copies)
    b = nn.Linear(fc1.out_features + copies, fc2.out_features)
    with torch.no_grad():
        a.weight.copy_(torch.cat([fc1.weight, fc1.weight[:copies]]))
        a.bias.copy_(torch.cat([fc1.bias, fc1.bias[:copies]]))
        n = torch.randn(fc2.out_features, copies, generator=g) * gain
        b.weight.copy_(torch.cat([fc2.weight[:, :copies] + n, fc2.weight[:, copies:], -n], 1))
        b.bias.copy_(fc2.bias)
    return nn.Sequential(nn.Flatten(), a, nn.ReLU(), b)


def test_condition_head_drops_the_cancelling_weights_and_keeps_the_function(digits, dense_mlp):
    m = collinear_head(dense_mlp)
    x = digits.x_train
    with torch.no_grad():
        assert torch.allclose(m(x), dense_mlp(x), atol=1e-3)  # the same function
        y0 = m(x)
    rec = condition_head(m, x, damp=0.1)
    assert rec is not None and rec["layer"] == "3"
    assert rec["weight_rms_after"] < rec["weight_rms_before"] / 5  # the pairs' +-n is gone (ridge: null space -> 0)
    with torch.no_grad():
        y1 = m(x)
    assert float((y1.argmax(1) == y0.argmax(1)).float().mean()) > 0.9
    assert rec["output_change"] == pytest.approx(float((y1 - y0).norm() / y0.norm()), rel=1e-3)


def test_condition_head_leaves_a_model_without_an_output_linear_alone(digits, dense_mlp):
    m = nn.Sequential(copy.deepcopy(dense_mlp), nn.LogSoftmax(1))
    w = [p.clone() for p in m.parameters()]
    assert condition_head(m, digits.x_train, damp=0.3) is None
    assert condition_head(copy.deepcopy(dense_mlp), digits.x_train, damp=0.0) is None
    assert all(torch.equal(a, b) for a, b in zip(w, m.parameters(), strict=True))


def test_head_ridge_keeps_fine_tuning_from_wrecking_a_refitted_head(digits, dense_mlp):
    """The issue-20 failure in miniature: the head's cancelling weights amplify every step of the layers below
    it, and one epoch at the usual learning rate throws the model away; with the ridge re-fit first it does not."""
    cfg = dict(epochs=1, lr=0.1, batch_size=64, bn_batches=0, eval_each_epoch=False)
    plain = finetune(collinear_head(dense_mlp), digits, FinetuneConfig(**cfg, head_ridge=0.0), masks={})
    fixed = finetune(collinear_head(dense_mlp), digits, FinetuneConfig(**cfg, head_ridge=0.1), masks={})
    assert plain.accuracy < plain.initial_accuracy - 10  # the toy reproduces the failure
    assert fixed.head is not None and plain.head is None
    assert fixed.accuracy >= fixed.initial_accuracy - 1.0
    assert fixed.history[0]["loss"] < plain.history[0]["loss"] / 3


def test_warmup_rises_linearly_then_follows_the_cosine(digits, dense_mlp, monkeypatch):
    m = copy.deepcopy(dense_mlp)
    lrs: list[float] = []
    steps = math.ceil(len(digits.x_train) / 256)

    cfg = FinetuneConfig(epochs=3, lr=0.1, batch_size=256, warmup_epochs=1, bn_batches=0, eval_each_epoch=False)
    orig = torch.optim.SGD.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    finetune(m, digits, cfg, masks={})
    assert len(lrs) == 3 * steps
    assert lrs[:steps] == pytest.approx([0.1 * (i + 1) / (steps + 1) for i in range(steps)])
    assert lrs[steps] == pytest.approx(0.1)  # the cosine starts at the peak after the warm-up
    assert all(a >= b for a, b in zip(lrs[steps:], lrs[steps + 1:], strict=False))
    with pytest.raises(BadInput, match="warm-up"):
        FinetuneConfig(epochs=2, warmup_epochs=3).validate()
    with pytest.raises(BadInput, match="head ridge"):
        FinetuneConfig(head_ridge=-1).validate()



def test_warmup_and_head_ridge_resume_bit_identically(digits, dense_mlp, tmp_path):
    cfg = FinetuneConfig(epochs=2, lr=0.1, batch_size=64, warmup_epochs=1, head_ridge=0.1, bn_batches=0,
                         eval_each_epoch=False)
    ref = collinear_head(dense_mlp)
    finetune(ref, digits, cfg, masks={})
    state = tmp_path / "ft.state"

    def boom(stage: str, done: int, total: int) -> None:
        if stage == "epochs" and done == 1:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        finetune(collinear_head(dense_mlp), digits, cfg, masks={}, progress=boom, state_path=state)
    fresh = collinear_head(dense_mlp)
    rep = finetune(fresh, digits, cfg, masks={}, state_path=state, resume=True)
    assert rep.resumed_from == {"epoch": 1, "step": 0} and rep.head is None  # re-fitted once, in the first run
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), fresh.state_dict().values(), strict=True))
