"""The stage's safeguard (chita_edge/pruning/safeguard.py): with BatchNorm, candidates are ranked after the
BatchNorm re-estimation that the stage does next; without BatchNorm, on training loss as before; before the
layer-wise re-fit (last stage), CHITA's and magnitude's supports are ranked after that re-fit."""
import copy

import pytest
import torch
from conftest import tiny_mlp, trained_digits_cnn

from chita_edge.core.data import load_data
from chita_edge.models.zoo import default_prunable
from chita_edge.pruning import prune as prune_mod
from chita_edge.pruning.batchnorm import batchnorm_buffers, reestimate_if_better
from chita_edge.pruning.layers import find_prunable, flatten_weights, set_weights
from chita_edge.pruning.prune import PruneConfig, keep_count, prune
from chita_edge.pruning.safeguard import candidates, choose
from chita_edge.solvers import chita as solver

S = 0.8  # on this trained CNN the ranking before BatchNorm (alpha=1.0) and after it (alpha=0.5) disagree


def _cfg(**kw):
    return PruneConfig(**{"sparsity": S, "method": "chita", "n_grads": 64, "layerwise_refit": False,
                          "layer_floor": 0.0, "prune_inert": False, **kw})


def _stage_step(model, ds, cfg):
    """The BatchNorm step that stage 0 of ``prune`` runs (same permutation, samples, rule)."""
    perm = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(20_000 + cfg.seed))
    return reestimate_if_better(model, ds.x_train, ds.y_train, perm, samples=2048, batch_size=256)


def _trained():
    """The digits data, the trained BatchNorm CNN, its prunable parameters and their dense weights."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load_data("digits")
    dense = trained_digits_cnn(ds)
    params = find_prunable(dense, default_prunable)
    return ds, dense, params, flatten_weights(dense, params)


def test_with_batchnorm_the_winner_has_the_lowest_loss_after_reestimation_and_keeps_its_statistics():
    ds, dense, params, w_bar = _trained()
    solved = copy.deepcopy(dense)  # CHITA's own solution: the same stage with no safeguard and no BatchNorm step
    prune(solved, _cfg(safeguard=False, bn_recalibrate=False), ds)
    w = flatten_weights(solved, find_prunable(solved, default_prunable))
    mag = solver.hard_threshold(w_bar, keep_count(S, len(w_bar)), None)
    # the rule before: training loss with the dense statistics
    old = choose(copy.deepcopy(dense), params, ds, w_bar, w, mag, _cfg().seed).record["chosen"]
    # each candidate through the stage's BatchNorm step on its own copy of the dense model
    after, stats, recs = {}, {}, {}
    for name, c in candidates(w_bar, w, mag).items():
        m = copy.deepcopy(dense)
        set_weights(m, find_prunable(m, default_prunable), c)
        recs[name] = rec = _stage_step(m, ds, _cfg())
        after[name] = rec["loss_after"] if rec["kept"] == "re-estimated" else rec["loss_before"]
        stats[name] = batchnorm_buffers(m)
    best = min(after, key=after.get)
    assert best != old  # the case: the two rankings disagree

    model = copy.deepcopy(dense)
    rep = prune(model, _cfg(), ds)
    st = rep.stages[0]
    assert st["safeguard"]["chosen"] == best and st["safeguard"]["after_batchnorm"]
    # (prune forms the candidates in float64 from the unrounded solution, this test in float32: 1e-5)
    assert st["safeguard"]["losses"] == pytest.approx(after, rel=1e-5)
    bn, want = st["batchnorm"], recs[best]  # the winner's step, not a second one
    assert bn["kept"] == want["kept"] and [bn["loss_before"], bn["loss_after"]] == pytest.approx(
        [want["loss_before"], want["loss_after"]], rel=1e-5)
    got = flatten_weights(model, find_prunable(model, default_prunable))
    assert torch.equal(got != 0, candidates(w_bar, w, mag)[best] != 0)
    assert torch.allclose(got, candidates(w_bar, w, mag)[best], rtol=1e-5, atol=1e-7)
    bufs = batchnorm_buffers(model)
    assert set(bufs) == set(stats[best]) and len(bufs) == 6
    assert all(torch.allclose(v.double(), stats[best][k].double(), rtol=1e-5, atol=1e-6) for k, v in bufs.items())
    assert not all(torch.allclose(v.double(), stats[old][k].double(), rtol=1e-5, atol=1e-6) for k, v in bufs.items())


def test_without_batchnorm_or_without_the_step_the_ranking_is_the_one_before():
    torch.set_num_threads(1)
    ds = load_data("digits")
    for model, then in ((tiny_mlp(), True), (trained_digits_cnn(ds), False)):
        params = find_prunable(model, default_prunable)
        w_bar = flatten_weights(model, params)
        k = keep_count(0.7, len(w_bar))
        mag = solver.hard_threshold(w_bar, k, None)
        w = torch.where(mag != 0, w_bar * 1.1, torch.zeros_like(w_bar))
        before = batchnorm_buffers(model)
        step = (lambda m=model: _stage_step(m, ds, _cfg())) if then else None
        got = choose(model, params, ds, w_bar, w, mag, 0, then=step)
        plain = choose(copy.deepcopy(model), params, ds, w_bar, w, mag, 0)
        assert not got.after_batchnorm and "after_batchnorm" not in got.record
        assert got.record == plain.record and torch.equal(got.weights, plain.weights)
        assert all(torch.equal(v, before[k]) for k, v in batchnorm_buffers(model).items())


def test_before_the_refit_the_support_that_wins_after_it_is_kept_with_its_refitted_weights(monkeypatch):
    ds, dense, params, w_bar = _trained()
    cfg = _cfg(n_grads=128)  # at 80 %: the rule before the re-fit keeps magnitude, CHITA's support re-fits better
    refit_cfg = _cfg(n_grads=128, layerwise_refit=True)
    # the rule without the re-fit in the ranking: the stage as before, then the re-fit on its winner
    old = copy.deepcopy(dense)
    old_pick = prune(old, cfg, ds).stages[0]["safeguard"]
    old_refit = prune_mod._layerwise_refit(old, dense, find_prunable(old, default_prunable), ds, refit_cfg)
    assert old_pick["chosen"] == "magnitude" and old_refit["kept"]
    # CHITA's support (its own solution) through the BatchNorm step and the re-fit
    solved = copy.deepcopy(dense)
    prune(solved, _cfg(n_grads=128, safeguard=False, bn_recalibrate=False), ds)
    w = flatten_weights(solved, find_prunable(solved, default_prunable))
    mag = solver.hard_threshold(w_bar, keep_count(S, len(w_bar)), None)
    alpha = "alpha=1.0"  # the re-fit re-solves the kept weights: CHITA's own solution stands for its support
    new = copy.deepcopy(dense)
    new_params = find_prunable(new, default_prunable)
    set_weights(new, new_params, candidates(w_bar, w, mag)[alpha])
    _stage_step(new, ds, cfg)
    new_refit = prune_mod._layerwise_refit(new, dense, new_params, ds, refit_cfg)
    assert new_refit["kept"] and new_refit["loss_after"] < old_refit["loss_after"]  # the case: the rules disagree

    calls = []
    real = prune_mod._layerwise_refit
    monkeypatch.setattr(prune_mod, "_layerwise_refit", lambda *a: calls.append(1) or real(*a))
    model = copy.deepcopy(dense)
    rep = prune(model, refit_cfg, ds)
    sg = rep.stages[0]["safeguard"]
    assert len(calls) == 2 and rep.refit["refits"] == 2  # one per support, and the winner not re-fitted again
    assert sg["chosen_before_refit"] == "magnitude" and sg["support"] == "chita" and sg["chosen"] == alpha
    assert sg["after_refit"]["chita"]["loss"] == pytest.approx(new_refit["loss_after"], rel=1e-5)
    assert sg["after_refit"]["magnitude"]["loss"] == pytest.approx(old_refit["loss_after"], rel=1e-5)
    assert rep.refit["support"] == "chita" and rep.refit["kept"]
    assert rep.refit["loss_before"] == pytest.approx(new_refit["loss_before"], rel=1e-5)
    got = flatten_weights(model, find_prunable(model, default_prunable))
    want, other = flatten_weights(new, new_params), flatten_weights(old, find_prunable(old, default_prunable))
    assert torch.equal(got != 0, want != 0) and not torch.equal(got != 0, other != 0)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    bufs, want_bufs = batchnorm_buffers(model), batchnorm_buffers(new)
    assert all(torch.allclose(v.double(), want_bufs[k].double(), rtol=1e-5, atol=1e-6) for k, v in bufs.items())


def test_one_support_is_refitted_once_and_without_batchnorm_the_supports_are_ranked_too():
    torch.set_num_threads(1)
    ds = load_data("digits")
    model = trained_digits_cnn(ds)
    rep = prune(model, _cfg(method="bso", layerwise_refit=True), ds)  # bso: magnitude's support, CHITA's weights
    assert rep.refit["refits"] == 1 and set(rep.stages[0]["safeguard"]["after_refit"]) == {"chita"}
    mlp = tiny_mlp()
    rep = prune(mlp, _cfg(sparsity=0.9, layerwise_refit=True), ds)
    sg = rep.stages[0]["safeguard"]
    assert "after_batchnorm" not in sg and rep.refit["refits"] == len(sg["after_refit"])
    best = sg["after_refit"][sg["support"]]
    assert rep.refit["kept"] == best["refit_kept"] and rep.refit["loss_after" if best["refit_kept"] else
                                                                 "loss_before"] == best["loss"]
