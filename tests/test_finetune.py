"""Masked fine-tuning and gradual pruning: masks kept, accuracy recovered, bit-identical resume, BN, distillation, CLI."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_cli, tiny_cnn, tiny_mlp
from torch import nn

from chita_edge.core.checkpoint import read_weights, save_checkpoint
from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, Interrupted
from chita_edge.core.io import sha256_file
from chita_edge.models.zoo import default_prunable
from chita_edge.pruning.batchnorm import keyed_generator
from chita_edge.pruning.layers import find_prunable
from chita_edge.pruning.prune import PruneConfig, prune, prune_weights
from chita_edge.pruning.schedule import cubic_schedule
from chita_edge.training import finetune as finetune_module
from chita_edge.training.augment import augment_batch, mix_batch
from chita_edge.training.distill import distillation_loss, hard_loss
from chita_edge.training.finetune import FinetuneConfig, finetune, reestimate_batchnorm
from chita_edge.training.gradual import GradualConfig, gradual_prune, gradual_schedule
from chita_edge.training.masks import masks_from_zeros


@pytest.fixture(scope="module")
def dense_mlp(digits) -> nn.Module:
    m = tiny_mlp()
    finetune(m, digits, FinetuneConfig(epochs=4, lr=0.1, bn_batches=0, eval_each_epoch=False), masks={})
    return m


def pruned_copy(model: nn.Module, digits: Dataset, sparsity: float) -> nn.Module:
    m = copy.deepcopy(model)
    prune(m, PruneConfig(method="magnitude", sparsity=sparsity), digits)
    return m


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- library -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masks_survive_finetuning(digits, dense_mlp, optimizer):
    m = pruned_copy(dense_mlp, digits, 0.8)
    params = find_prunable(m, default_prunable)
    before = masks_from_zeros(m, params)
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = FinetuneConfig(epochs=2, lr=0.05 if optimizer == "sgd" else 0.005, optimizer=optimizer, weight_decay=1e-3)
    rep = finetune(m, digits, cfg)
    after = masks_from_zeros(m, params)
    named = dict(m.named_parameters())
    for q in params:
        assert torch.all(named[q.name][~before[q.name]] == 0), q.name  # pruned stay exactly zero
        assert torch.equal(after[q.name] | before[q.name], before[q.name])
        assert not torch.equal(named[q.name], w0[q.name])  # and the rest did train
    assert rep.masked_weights == sum(int((~v).sum()) for v in before.values())
    assert rep.sparsity == pytest.approx(0.8, abs=0.01)


def test_finetuning_recovers_accuracy(digits, dense_mlp):
    m = pruned_copy(dense_mlp, digits, 0.9)
    rep = finetune(m, digits, FinetuneConfig(epochs=3, lr=0.05))
    assert rep.accuracy > rep.initial_accuracy + 5
    assert len(rep.history) == 3 and all(h["test_accuracy"] is not None for h in rep.history)
    assert rep.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine down to min_lr


class Stop(Exception):
    pass


def _cnn_cfg() -> FinetuneConfig:
    return FinetuneConfig(epochs=3, lr=0.05, batch_size=64, augment=True, crop_padding=1, bn_batches=5, seed=3)


def _pruned_cnn(digits) -> nn.Module:
    m = tiny_cnn(dropout=0.1)
    prune(m, PruneConfig(method="magnitude", sparsity=0.7), digits)
    return m


def test_resume_after_epoch_is_bit_identical(digits, tmp_path):
    ref = _pruned_cnn(digits)
    finetune(ref, digits, _cnn_cfg())

    m = _pruned_cnn(digits)
    state = tmp_path / "ft.state"

    def boom(stage, done, total):
        if stage == "epochs" and done == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(m, digits, _cnn_cfg(), progress=boom, state_path=state)
    st = torch.load(state, weights_only=True)  # plain tensors and containers only
    assert st["epoch"] == 1 and st["step"] == 0
    torch.manual_seed(1234)  # the resumed run must not depend on the global RNG of the new process
    fresh = _pruned_cnn(digits)
    rep = finetune(fresh, digits, _cnn_cfg(), state_path=state, resume=True)
    assert rep.resumed_from == {"epoch": 1, "step": 0}
    assert [h["epoch"] for h in rep.history] == [1, 2, 3]
    assert same_weights(fresh, ref)


def test_sigint_mid_epoch_saves_state_and_resume_is_bit_identical(digits, tmp_path):
    ref = _pruned_cnn(digits)
    ref_rep = finetune(ref, digits, _cnn_cfg())

    m = _pruned_cnn(digits)
    state = tmp_path / "ft.state"

    def send_sigint(stage, done, total):
        if stage == "steps" and done == 30:  # in the second epoch (23 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    old = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match="--resume"):
        finetune(m, digits, _cnn_cfg(), progress=send_sigint, state_path=state)
    assert signal.getsignal(signal.SIGINT) is old  # handlers restored
    st = torch.load(state, weights_only=True)
    assert (st["epoch"], st["step"]) == (1, 7)
    fresh = _pruned_cnn(digits)
    rep = finetune(fresh, digits, _cnn_cfg(), state_path=state, resume=True)
    assert same_weights(fresh, ref)
    assert rep.history == [dict(h, seconds=r["seconds"]) for h, r in zip(ref_rep.history, rep.history, strict=True)]


def test_resume_refuses_other_settings(digits, tmp_path):
    m = _pruned_cnn(digits)
    state = tmp_path / "ft.state"
    with pytest.raises(Interrupted):
        finetune(m, digits, _cnn_cfg(), state_path=state, should_stop=lambda: True)
    from chita_edge.core.errors import BadInput

    with pytest.raises(BadInput, match="lr 0.05 -> 0.1"):
        finetune(_pruned_cnn(digits), digits, dataclasses.replace(_cnn_cfg(), lr=0.1), state_path=state, resume=True)
    with pytest.raises(BadInput, match="no fine-tuning state"):
        finetune(m, digits, _cnn_cfg(), state_path=tmp_path / "none", resume=True)


def test_batchnorm_reestimation_recomputes_running_stats(digits):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 10))
    bn = m[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    x = digits.x_train[:1000]
    assert reestimate_batchnorm(m, x, batches=10, batch_size=100, seed=0)
    flat = x.flatten(1)
    # ten equal batches covering the 1000 examples: the cumulative average is the exact data mean
    assert torch.allclose(bn.running_mean, flat.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, flat.var(0), rtol=0.05, atol=1e-3)  # mean of per-batch variances
    assert bn.momentum == 0.1  # restored
    assert not reestimate_batchnorm(tiny_mlp(), x, batches=10, batch_size=100, seed=0)  # no BatchNorm: no-op


def test_finetune_reestimates_batchnorm_at_the_end(digits):
    m = _pruned_cnn(digits)
    cfg = dataclasses.replace(_cnn_cfg(), epochs=1)
    a = copy.deepcopy(m)
    ra = finetune(a, digits, dataclasses.replace(cfg, bn_batches=0))
    b = copy.deepcopy(m)
    rb = finetune(b, digits, cfg)
    assert not ra.bn_reestimated and rb.bn_reestimated
    assert torch.equal(a[0].weight, b[0].weight)  # same training ...
    assert not torch.allclose(a[1].running_mean, b[1].running_mean)  # ... other statistics


def test_distillation_loss_math():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.equal(distillation_loss(s, t, y, 4.0, 0.0), F.cross_entropy(s, y))
    # identical teacher and student: the KL term is zero, the loss is the weighted CE
    assert torch.allclose(distillation_loss(s, s, y, 2.0, 0.5), 0.5 * F.cross_entropy(s, y))
    # log-probabilities and logits give the same loss
    assert torch.allclose(distillation_loss(F.log_softmax(s, 1), t, y, 3.0, 0.7), distillation_loss(s, t, y, 3.0, 0.7))
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean")
    assert torch.allclose(distillation_loss(s, t, y, 3.0, 1.0), 9 * kl)


def test_distillation_changes_training(digits, dense_mlp):
    cfg = FinetuneConfig(epochs=2, lr=0.05, distill_weight=0.7)
    plain, dist = pruned_copy(dense_mlp, digits, 0.9), pruned_copy(dense_mlp, digits, 0.9)
    finetune(plain, digits, cfg)
    rep = finetune(dist, digits, cfg, teacher=copy.deepcopy(dense_mlp))
    assert not same_weights(plain, dist)
    assert rep.accuracy > rep.initial_accuracy


def test_augment_batch_crops_and_flips():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, g, padding=0, flip=True)
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(2))
    z = augment_batch(x, torch.Generator().manual_seed(1), padding=2, flip=False)
    assert z.shape == x.shape
    for i in range(2):  # every crop is a shifted window of the zero-padded image
        xp = F.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(z[i], xp[:, a:a + 4, b:b + 4]) for a in range(5) for b in range(5))


def test_mix_batch_mixup_and_cutmix_are_seeded_mixtures():
    x = torch.randn(6, 2, 8, 8)
    same, perm, lam = mix_batch(x, torch.Generator().manual_seed(0), "none", 1.0)
    assert same is x and lam == 1.0
    m, perm, lam = mix_batch(x, torch.Generator().manual_seed(0), "mixup", 1.0)
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(6))
    assert torch.allclose(m, lam * x + (1 - lam) * x[perm])
    m2, perm2, lam2 = mix_batch(x, torch.Generator().manual_seed(0), "mixup", 1.0)
    assert torch.equal(m, m2) and torch.equal(perm, perm2) and lam == lam2  # the generator decides everything
    lams = [mix_batch(x, torch.Generator().manual_seed(s), "cutmix", 1.0) for s in range(20)]
    for c, p, lam in lams:  # every pixel is x's or x[perm]'s, and lam is the share left to x
        moved = p != torch.arange(6)  # a sample mixed with itself is left whole
        assert ((c == x) | (c == x[p])).all() and torch.equal(c[~moved], x[~moved])
        assert (c == x).all(1)[moved].float().mean().item() == pytest.approx(lam)
    assert len({round(lam, 3) for *_, lam in lams}) > 5
    with pytest.raises(BadInput, match="--mix 'blend'"):
        FinetuneConfig(mix="blend").validate()
    with pytest.raises(BadInput, match="--mix-alpha"):
        FinetuneConfig(mix="mixup", mix_alpha=0).validate()


def test_mixed_loss_math():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    perm = torch.randperm(8)
    assert torch.allclose(hard_loss(s, y, (perm, 0.3)), 0.3 * F.cross_entropy(s, y) + 0.7 * F.cross_entropy(s, y[perm]))
    assert torch.equal(hard_loss(s, y, (perm, 1.0)), F.cross_entropy(s, y))
    # pure distillation needs no label; alpha 0.5 splits the hard term between the two labels
    assert torch.equal(distillation_loss(s, t, y, 2.0, 1.0, (perm, 0.3)), distillation_loss(s, t, y[perm], 2.0, 1.0))
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 0.5, (perm, 0.3)),
                          0.5 * hard_loss(s, y, (perm, 0.3)) + 0.5 * distillation_loss(s, t, y, 2.0, 1.0))


class _Recorder(nn.Module):
    """The teacher: records what it is shown."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.net(x)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_teacher_and_loss_see_the_mixed_batch(digits, monkeypatch, mix):
    """Function matching: the student's and the teacher's inputs are the crop + flip + mix of the batch, drawn from
    (seed, epoch, step); the loss gets the teacher's outputs on that image and the mixing (perm, lam)."""
    cfg = dataclasses.replace(_cnn_cfg(), epochs=1, batch_size=len(digits.x_train), mix=mix, distill_weight=1.0,
                              bn_batches=0, eval_each_epoch=False)
    calls = []

    def spy(student, teacher_out, y, temperature, weight, mix_=None):
        calls.append((teacher_out.detach().clone(), y.clone(), mix_))
        return distillation_loss(student, teacher_out, y, temperature, weight, mix_)

    monkeypatch.setattr(finetune_module, "distillation_loss", spy)
    teacher = _Recorder(tiny_cnn())
    finetune(_pruned_cnn(digits), digits, cfg, teacher=teacher)
    perm = torch.randperm(len(digits.x_train), generator=keyed_generator(cfg.seed, 0))
    g = keyed_generator(cfg.seed, 0, 0)
    xb = augment_batch(digits.x_train[perm], g, cfg.crop_padding, cfg.flip)
    want, mperm, lam = mix_batch(xb, g, mix, cfg.mix_alpha)
    assert not torch.equal(want, xb) and len(teacher.seen) == 1 and len(calls) == 1
    assert torch.equal(teacher.seen[0], want)
    t_out, y, got = calls[0]
    assert torch.equal(t_out, teacher.net(want)) and torch.equal(y, digits.y_train[perm])
    assert torch.equal(got[0], mperm) and got[1] == lam


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_finetuning_is_seeded_and_resumes_bit_identically(digits, tmp_path, mix):
    cfg = dataclasses.replace(_cnn_cfg(), mix=mix, distill_weight=1.0, temperature=1.0, eval_each_epoch=False)
    teacher = tiny_cnn()
    ref, again, plain = _pruned_cnn(digits), _pruned_cnn(digits), _pruned_cnn(digits)
    finetune(ref, digits, cfg, teacher=teacher)
    finetune(again, digits, cfg, teacher=teacher)
    finetune(plain, digits, dataclasses.replace(cfg, mix="none"), teacher=teacher)
    assert same_weights(ref, again) and not same_weights(ref, plain)
    state = tmp_path / "ft.state"

    def boom(stage, done, total):
        if stage == "epochs" and done == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(_pruned_cnn(digits), digits, cfg, teacher=teacher, progress=boom, state_path=state)
    torch.manual_seed(99)
    fresh = _pruned_cnn(digits)
    rep = finetune(fresh, digits, cfg, teacher=teacher, state_path=state, resume=True)
    assert rep.resumed_from == {"epoch": 1, "step": 0} and same_weights(fresh, ref)


# --- gradual pruning -------------------------------------------------------------------------------------------


def test_gradual_schedule_is_cubic_from_half():
    plan = gradual_schedule(0.9, epochs=10, prune_every=3)
    assert [e for _, e in plan] == [3, 3, 3, 1]
    assert [s for s, _ in plan] == pytest.approx(cubic_schedule(0.9, 4, 0.5))
    assert plan[0][0] == pytest.approx(0.5) and plan[-1][0] == pytest.approx(0.9)
    assert gradual_schedule(0.4, epochs=3, prune_every=1) == [(0.4, 3)]


def test_gradual_pruning_keeps_earlier_masks(digits, dense_mlp):
    m = copy.deepcopy(dense_mlp)
    after_prune: list[dict[str, torch.Tensor]] = []
    during_epochs: list[dict[str, torch.Tensor]] = []

    def reviving_prune(model, params, data, cfg, progress):
        """Magnitude pruning, then a misbehaving step: one weight pruned earlier comes back."""
        rep = prune_weights(model, params, data, cfg, progress)
        if after_prune:
            w = dict(model.named_parameters())[params[0].name]
            i = (~after_prune[-1][params[0].name]).nonzero()[0]
            with torch.no_grad():
                w[tuple(i)] = 1.0
        return rep

    def prune_fn(model, params, data, cfg, progress):
        rep = reviving_prune(model, params, data, cfg, progress)
        after_prune.append(masks_from_zeros(model, params))
        return rep

    def on_epoch(rec):
        during_epochs.append(masks_from_zeros(m, find_prunable(m, default_prunable)))

    cfg = GradualConfig(epochs=3, prune_every=1, finetune=FinetuneConfig(lr=0.05, eval_each_epoch=False))
    rep = gradual_prune(m, digits, PruneConfig(method="magnitude", sparsity=0.9), cfg, prune_fn=prune_fn,
                        on_epoch=on_epoch)
    assert [s["target_sparsity"] for s in rep.steps] == pytest.approx([0.5, 0.5 + 0.4 * (1 - 0.125), 0.9])
    assert [s["revived"] for s in rep.steps] == [0, 1, 1]  # the revived weight was zeroed again
    assert rep.sparsity == pytest.approx(0.9, abs=2e-3)
    # the mask of each epoch is inside the mask of the epoch before it: zeros never come back
    for a, b in zip(during_epochs, during_epochs[1:], strict=False):
        for k in a:
            assert not torch.any(b[k] & ~a[k])
    assert len(during_epochs) == 3
    assert rep.accuracy > rep.steps[-1]["pruned_accuracy"]


def test_gradual_resume_is_bit_identical(digits, dense_mlp, tmp_path):
    pcfg = PruneConfig(method="magnitude", sparsity=0.9)
    cfg = GradualConfig(epochs=3, prune_every=1, finetune=FinetuneConfig(lr=0.05, eval_each_epoch=False))
    ref = copy.deepcopy(dense_mlp)
    gradual_prune(ref, digits, pcfg, cfg)

    m = copy.deepcopy(dense_mlp)
    calls = {"n": 0}

    def stop_in_step_two(stage, done, total):
        if stage == "steps":
            calls["n"] += 1

    state = tmp_path / "g.state"
    steps_per_epoch = -(-len(digits.x_train) // 128)
    with pytest.raises(Interrupted):
        gradual_prune(m, digits, pcfg, cfg, progress=stop_in_step_two, state_path=state,
                      should_stop=lambda: calls["n"] == steps_per_epoch + 4)
    assert state.exists() and (tmp_path / "g.state.step1").exists()
    fresh = copy.deepcopy(dense_mlp)
    gradual_prune(fresh, digits, pcfg, cfg, state_path=state, resume=True)
    assert same_weights(fresh, ref)
    assert not (tmp_path / "g.state.step1").exists()


# --- CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture
def pruned_ckpt(tmp_path, digits, dense_mlp):
    (tmp_path / "tiny.py").write_text(TINY)
    dense = tmp_path / "dense.pt"
    torch.save(dense_mlp.state_dict(), dense)
    out = tmp_path / "p.pt"
    r = run_cli("prune", f"{tmp_path / 'tiny.py'}:mlp", "--weights", dense, "--data", "digits", "--method",
                "magnitude", "--sparsity", "0.85", "--out", out)
    assert r.code == 0, r.stderr
    return out


def test_cli_finetune_json_history_and_checkpoint(pruned_ckpt, tmp_path):
    sha = sha256_file(pruned_ckpt)
    out = tmp_path / "ft.pt"
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "2", "--lr", "0.05", "--distill",
                "--out", out, "--json")
    assert r.code == 0, r.stderr
    js = r.json()
    assert [h["epoch"] for h in js["history"]] == [1, 2]
    assert {"loss", "train_accuracy", "test_accuracy", "lr"} <= set(js["history"][0])
    assert js["distill"] is True and js["accuracy"] > js["initial_accuracy"]
    assert js["config"]["hints"] == 0.0  # not pruned to a budget: the recipe's hints stay off
    assert sha256_file(pruned_ckpt) == sha  # the input is untouched
    sd_in, meta_in = read_weights(pruned_ckpt)
    sd, meta = read_weights(out)
    assert meta["model"] == meta_in["model"] and meta["method"] == "magnitude"
    assert meta["finetune"]["accuracy"] == js["accuracy"] and len(meta["finetune"]["history"]) == 2
    for k in sd:
        if k.endswith("weight"):
            assert torch.all(sd[k][sd_in[k] == 0] == 0)
    assert not (tmp_path / "ft.pt.state").exists()
    r = run_cli("eval", "ckpt", "--weights", out, "--data", "digits", "--json")
    assert r.code == 0 and r.json()["accuracy"] == pytest.approx(js["accuracy"])


def test_cli_keeps_input_metadata(digits, tmp_path, dense_mlp):
    (tmp_path / "tiny.py").write_text(TINY)
    src = tmp_path / "p.pt"
    m = pruned_copy(dense_mlp, digits, 0.5)
    save_checkpoint(src, m.state_dict(), {"model": f"{tmp_path / 'tiny.py'}:mlp", "note": "kept",
                                          "input_shape": [1, 8, 8]})
    out = tmp_path / "o.pt"
    r = run_cli("finetune", src, "--data", "digits", "--epochs", "1", "--out", out)
    assert r.code == 0, r.stderr
    _, meta = read_weights(out)
    assert meta["note"] == "kept" and meta["input_shape"] == [1, 8, 8] and meta["finetune"]["source"] == str(src)
    r = run_cli("finetune", src, "--data", "digits", "--epochs", "1", "--distill", "--out", tmp_path / "d.pt")
    assert r.code == 2 and "--teacher" in r.stderr  # no recorded dense source to distil from


def test_cli_bad_input(pruned_ckpt, tmp_path):
    r = run_cli("finetune", tmp_path / "missing.pt", "--data", "digits")
    assert r.code == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--out", pruned_ckpt)
    assert r.code == 2 and "input" in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "0", "--out", tmp_path / "o.pt")
    assert r.code == 2 and "--epochs" in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--optimizer", "rmsprop", "--out", tmp_path / "o.pt")
    assert r.code == 2 and "--optimizer" in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--resume", "--out", tmp_path / "o.pt")
    assert r.code == 2 and "no fine-tuning state" in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--out", tmp_path / "nodir" / "o.pt")
    assert r.code == 2 and "does not exist" in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--teacher", pruned_ckpt, "--out", tmp_path / "o.pt")
    assert r.code == 2 and "--distill" in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--hints", "2", "--out", tmp_path / "o.pt")
    assert r.code == 2 and "--hints 2.0: feature hints distil from the dense teacher" in r.stderr
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--hints", "-1", "--out", tmp_path / "o.pt")
    assert r.code == 2 and "--hints -1.0" in r.stderr
    assert not (tmp_path / "o.pt").exists()


def test_cli_interrupted_run_resumes(pruned_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "o.pt"
    ref = tmp_path / "ref.pt"
    assert run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "2", "--out", ref).code == 0

    import chita_edge.workflows.finetune as ftmod  # the job calls the training loop through this name

    real = ftmod.finetune

    def interrupted(*a, **kw):
        return real(*a, **{**kw, "should_stop": lambda: True})

    monkeypatch.setattr(ftmod, "finetune", interrupted)
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "2", "--out", out)
    assert r.code == 130 and "--resume" in r.stderr and not out.exists()  # interrupted: 130, as prune gives
    monkeypatch.setattr(ftmod, "finetune", real)
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "2", "--out", out)
    assert r.code == 2 and "--resume" in r.stderr  # a leftover state is never silently discarded
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "2", "--out", out, "--resume")
    assert r.code == 0, r.stderr
    a, _ = read_weights(out)
    b, _ = read_weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_plain_state_dict_needs_model_spec(digits, dense_mlp, tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    src, dense = tmp_path / "plain.pt", tmp_path / "dense.pt"
    torch.save(pruned_copy(dense_mlp, digits, 0.7).state_dict(), src)
    torch.save(dense_mlp.state_dict(), dense)
    r = run_cli("finetune", src, "--data", "digits", "--epochs", "1", "--out", tmp_path / "o.pt")
    assert r.code == 2 and "MODEL" in r.stderr
    r = run_cli("finetune", src, "--model", f"{tmp_path / 'tiny.py'}:mlp", "--data", "digits", "--epochs", "1",
                "--distill", "--teacher", dense, "--out", tmp_path / "o.pt", "--json")
    assert r.code == 0, r.stderr
    _, meta = read_weights(tmp_path / "o.pt")
    assert meta["model"].endswith("tiny.py:mlp") and meta["finetune"]["teacher"] == str(dense)


def test_cli_keeps_structural_plan(digits, tmp_path):
    """A structurally pruned (compacted) checkpoint stays compacted: its plan is kept and the output reloads."""
    from chita_edge.graph.compact import compact_model
    from chita_edge.models.loading import load_model

    (tmp_path / "tiny.py").write_text(TINY)
    spec = f"{tmp_path / 'tiny.py'}:cnn"
    m = load_model(spec).module
    with torch.no_grad():
        m[0].weight[:2] = 0  # two output channels removed
    small, plan = compact_model(m, digits.x_train[:2])
    assert small[0].weight.shape[0] == 4
    src, out = tmp_path / "s.pt", tmp_path / "o.pt"
    save_checkpoint(src, small.state_dict(), {"model": spec, "plan": plan, "input_shape": [1, 8, 8]})
    r = run_cli("finetune", src, "--data", "digits", "--epochs", "1", "--out", out)
    assert r.code == 0, r.stderr
    _, meta = read_weights(out)
    assert meta["plan"] == plan
    lm = load_model(None, out)
    assert lm.module[0].weight.shape[0] == 4 and lm.module[4].weight.shape == (10, 4 * 64)


def test_cli_warmup_epochs_and_head_ridge_reach_the_config(pruned_ckpt, tmp_path):
    out = tmp_path / "ft.pt"
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "2", "--warmup-epochs", "1",
                "--head-ridge", "0.2", "--bn-batches", "0", "--out", out, "--json")
    assert r.code == 0, r.stderr
    _, meta = read_weights(out)
    cfg = meta["finetune"]["config"]
    assert cfg["warmup_epochs"] == 1.0 and cfg["head_ridge"] == 0.2
    assert meta["finetune"]["head"]  # the head re-fit ran
    for bad, flag in ((["--warmup-epochs", "3"], "--warmup-epochs 3.0"), (["--head-ridge", "-1"], "--head-ridge -1.0"),
                      (["--head-ridge", "nan"], "--head-ridge nan")):
        r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "2", *bad, "--out", tmp_path / "o.pt")
        assert r.code == 2 and flag in r.stderr, r.stderr
    assert not (tmp_path / "o.pt").exists()


def test_cli_mix_reaches_the_config(pruned_ckpt, tmp_path):
    out = tmp_path / "ft.pt"
    r = run_cli("finetune", pruned_ckpt, "--data", "digits", "--epochs", "1", "--mix", "mixup", "--mix-alpha", "0.4",
                "--bn-batches", "0", "--out", out, "--json")
    assert r.code == 0, r.stderr
    cfg = read_weights(out)[1]["finetune"]["config"]
    assert cfg["mix"] == "mixup" and cfg["mix_alpha"] == 0.4
    for bad, flag in ((["--mix", "blend"], "--mix 'blend'"), (["--mix-alpha", "0"], "--mix-alpha 0.0"),
                      (["--mix-alpha", "nan"], "--mix-alpha nan")):
        r = run_cli("finetune", pruned_ckpt, "--data", "digits", *bad, "--out", tmp_path / "o.pt")
        assert r.code == 2 and flag in r.stderr, r.stderr
    assert not (tmp_path / "o.pt").exists()


# --- feature hints ---------------------------------------------------------------------------------------------


class _Staged(nn.Module):
    """A stem and a stage (containers of conv + BatchNorm + ReLU) and a classifier head, for 8x8 digits."""

    def __init__(self, width: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(width, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(self.stem(x)))


def test_feature_hints_match_stages_and_start_from_the_least_squares_map(digits):
    from chita_edge.training.distill import FeatureHints

    x = digits.x_train[:128]
    teacher = _Staged()
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics := those of x, so that eval-mode maps equal training-mode ones
    with torch.no_grad():
        teacher(x)
    teacher.eval()
    twin = copy.deepcopy(teacher)
    buffers = {k: v.clone() for k, v in twin.state_dict().items()}
    same = FeatureHints(twin, teacher, x)
    assert same.points == ["stem", "stage"]  # the head's output is not a feature map
    assert all(torch.equal(v, buffers[k]) for k, v in twin.state_dict().items())  # the probe left them alone
    with torch.no_grad():
        twin.train()(x)
        teacher(x)
    assert float(same.loss()) < 1e-3  # a copy of the teacher: the fitted map is (nearly) the identity
    narrow = _Staged(width=3, seed=1)
    hints = FeatureHints(narrow, teacher, x)
    narrow(x)
    teacher(x)
    fitted = float(hints.loss())
    assert 0 < fitted < 1  # the ridge map beats the zero projection (relative error 1)
    with torch.no_grad():
        for p in hints.proj.values():
            p.weight.zero_()
    narrow(x)
    teacher(x)
    assert float(hints.loss()) == pytest.approx(1.0)
    hints.close()
    same.close()
    assert not any(m._forward_hooks for net in (teacher, narrow, twin) for m in net.modules())


def test_hints_change_training_keep_masks_and_resume_bit_identically(digits, tmp_path):
    cfg = dataclasses.replace(_cnn_cfg(), hints=2.0, eval_each_epoch=False)
    teacher = _Staged(width=8, seed=5)

    def student() -> nn.Module:
        m = _Staged()
        prune(m, PruneConfig(method="magnitude", sparsity=0.5), digits)
        return m

    ref, plain = student(), student()
    rep = finetune(ref, digits, cfg, teacher=teacher)
    finetune(plain, digits, dataclasses.replace(cfg, hints=0.0), teacher=teacher)
    assert not same_weights(ref, plain) and rep.config["hint_points"] == ["stem", "stage"]
    assert not any(m._forward_hooks for net in (teacher, ref) for m in net.modules())
    masks = masks_from_zeros(student(), find_prunable(student(), default_prunable))
    assert all(torch.all(dict(ref.named_parameters())[k][~m] == 0) for k, m in masks.items())
    state = tmp_path / "ft.state"

    def boom(stage, done, total):
        if stage == "epochs" and done == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(student(), digits, cfg, teacher=teacher, progress=boom, state_path=state)
    fresh = student()
    finetune(fresh, digits, cfg, teacher=teacher, state_path=state, resume=True)
    assert same_weights(fresh, ref)  # the projections' state came back too
    with pytest.raises(BadInput, match="--hints 2.0: .*--distill"):
        finetune(student(), digits, cfg)
