"""Structured CHITA: the group solver (golden cases, identities) and the model plumbing (channels, blocks, re-fit)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import tiny_resnet
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, RuntimeFailure
from chita_edge.graph.channels import channel_report, channel_weight_indices
from chita_edge.graph.compact import _check_same_function, compact_model
from chita_edge.graph.plan import apply_plan
from chita_edge.pruning import probes as probes_mod
from chita_edge.pruning.blocks import BlockConfig, block_structure, prune_blocks
from chita_edge.pruning.channels import (
    alive_channels,
    allowed_widths,
    apply_keep,
    channel_structure,
    conv_linear,
    round_width,
)
from chita_edge.pruning.layers import find_prunable, flatten_weights
from chita_edge.pruning.probes import probe_curves, removal_curves
from chita_edge.pruning.refit import LayerStats, layerwise_refit
from chita_edge.solvers import chita as scalar
from chita_edge.solvers import group_chita as gc
from chita_edge.solvers.group_chita import (
    Groups,
    coordinate_mask,
    group_chita,
    group_hard_threshold,
    group_iht,
    group_removal_cost,
    group_support_change_step,
    layer_backsolve,
    masked_layer_backsolve,
    nested_backsolve,
    obs_removal_order,
    select_groups,
)

torch.set_num_threads(1)


def problem(n: int = 12, p: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, p, generator=g, dtype=torch.float64)
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    return G, w_bar


# ----------------------------------------------------------------------------------------------- the solver


def test_from_lists_and_coordinate_mask_with_overlap():
    # family 0: {0,1}, {2,3}; family 1: {1,3}, {4}; coordinate 5 is in no group (never pruned)
    gr = Groups.from_lists(6, [[[0, 1], [2, 3]], [[1, 3], [4]]])
    assert gr.num_groups == 4 and gr.num_families == 2
    assert gr.sizes().tolist() == [2, 2]
    keep = torch.tensor([True, True, False, True])  # remove group {1,3}
    assert coordinate_mask(keep, gr).tolist() == [True, False, True, False, True, True]
    keep = torch.tensor([False, True, True, False])
    assert coordinate_mask(keep, gr).tolist() == [False, False, True, True, False, True]
    with pytest.raises(ValueError):
        Groups.from_lists(3, [[[0, 5]]])


def test_group_hard_threshold_keeps_k_per_family_by_norm():
    gr = Groups.from_lists(6, [[[0, 1], [2, 3], [4, 5]]])
    v = torch.tensor([3.0, 0.0, 1.0, 1.0, 0.0, 2.5], dtype=torch.float64)
    w, keep = group_hard_threshold(v, gr, torch.tensor([2]))
    assert keep.tolist() == [True, False, True]  # norms^2 9, 2, 6.25
    assert w.tolist() == [3.0, 0.0, 0.0, 0.0, 0.0, 2.5]
    allowed = torch.tensor([True, True, False])
    _, keep = group_hard_threshold(v, gr, torch.tensor([2]), allowed)
    assert keep.tolist() == [True, True, False]


def test_support_change_step_reduces_to_the_scalar_rule_for_singletons():
    g_ = torch.Generator().manual_seed(3)
    for _ in range(20):
        w = torch.randn(8, generator=g_, dtype=torch.float64)
        w[torch.randperm(8, generator=g_)[:3]] = 0.0
        g = torch.randn(8, generator=g_, dtype=torch.float64)
        support = w != 0
        gr = Groups.from_lists(8, [[[i] for i in range(8)]])
        got = group_support_change_step(w, g, gr, support)
        want = scalar._support_change_step(w, g, support, None)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_support_change_step_is_where_scores_cross():
    gr = Groups.from_lists(4, [[[0, 1], [2, 3]]])
    w = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    g = torch.tensor([0.3, -0.2, 0.4, 0.6], dtype=torch.float64)
    keep = torch.tensor([True, False])
    tau = group_support_change_step(w, g, gr, keep)
    kept = lambda t: float(((w[:2] - t * g[:2]) ** 2).sum())  # noqa: E731
    off = lambda t: float(((t * g[2:]) ** 2).sum())  # noqa: E731
    assert kept(tau) == pytest.approx(off(tau), rel=1e-9)
    assert kept(0.9 * tau) > off(0.9 * tau)


def _enumerate(G, w_bar, groups_list, k, lam):
    """Best objective over every choice of k groups, each re-fitted exactly (the golden answer)."""
    best = math.inf
    p = w_bar.numel()
    for combo in itertools.combinations(range(len(groups_list)), k):
        support = torch.zeros(p, dtype=torch.bool)
        for j in combo:
            support[groups_list[j]] = True
        w = scalar.backsolve(G, w_bar, support, lam)
        best = min(best, scalar.objective(G, w, w_bar, lam))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_group_chita_matches_enumeration_on_a_small_problem(seed):
    G, w_bar = problem(n=5, p=6, seed=seed)
    glist = [[0, 1], [2, 3], [4, 5]]
    gr = Groups.from_lists(6, [glist])
    lam = 0.05
    best = _enumerate(G, w_bar, glist, 2, lam)
    bso = scalar.objective(G, scalar.backsolve(G, w_bar, coordinate_mask(
        group_hard_threshold(w_bar, gr, torch.tensor([2]))[1], gr), lam), w_bar, lam)
    r = group_chita(G, w_bar, gr, torch.tensor([2]), lam)
    assert int(r.keep.sum()) == 2
    assert r.objective == pytest.approx(scalar.objective(G, r.w, w_bar, lam), rel=1e-9)
    assert bool((r.w[~coordinate_mask(r.keep, gr)] == 0).all())
    assert best - 1e-12 <= r.objective <= bso + 1e-12  # never worse than magnitude groups + backsolve
    r = group_chita(G, w_bar, gr, torch.tensor([2]), lam, swap_rounds=3)  # with the swap search: the optimum
    assert r.objective == pytest.approx(best, rel=1e-6)


def test_group_iht_never_increases_f_and_respects_families():
    G, w_bar = problem(n=20, p=12, seed=5)
    gr = Groups.from_lists(12, [[[0, 1], [2, 3], [4, 5]], [[6, 7, 8], [9, 10, 11]]])
    k = torch.tensor([1, 1])
    lam = 0.1
    w0, _ = group_hard_threshold(w_bar, gr, k)
    f0 = scalar.objective(G, w0, w_bar, lam)
    w, keep, f, its, _ = group_iht(G, w_bar, gr, k, lam, w0=w0, max_iter=50)
    assert f <= f0 + 1e-12
    assert f == pytest.approx(scalar.objective(G, w, w_bar, lam), rel=1e-9)
    assert keep[:3].sum() == 1 and keep[3:].sum() == 1


def test_group_chita_active_set_and_allowed():
    G, w_bar = problem(n=30, p=40, seed=7)
    gr = Groups.from_lists(40, [[list(range(i, i + 2)) for i in range(0, 40, 2)]])
    lam = 0.2
    allowed = torch.ones(20, dtype=torch.bool)
    allowed[:5] = False
    r = group_chita(G, w_bar, gr, torch.tensor([4]), lam, allowed=allowed)
    assert int(r.keep.sum()) == 4 and not bool(r.keep[:5].any())
    assert r.objective <= scalar.objective(G, group_hard_threshold(w_bar, gr, torch.tensor([4]), allowed)[0], w_bar, lam)


def test_group_removal_cost_is_the_objective_of_zeroing():
    G, w_bar = problem(n=9, p=6, seed=2)
    gr = Groups.from_lists(6, [[[0, 1], [2, 3], [4, 5]]])
    lam = 0.3
    Z, s = group_removal_cost(G, w_bar, gr, lam)
    for j, idx in enumerate([[0, 1], [2, 3], [4, 5]]):
        w = w_bar.clone()
        w[idx] = 0.0
        assert float(s[j]) == pytest.approx(scalar.objective(G, w, w_bar, lam), rel=1e-9)
    w = w_bar.clone()
    w[[0, 1, 4, 5]] = 0.0
    z = Z[:, 0] + Z[:, 2]
    joint = 0.5 * float(z @ z) + lam * float((w_bar[[0, 1, 4, 5]] ** 2).sum())
    assert joint == pytest.approx(scalar.objective(G, w, w_bar, lam), rel=1e-9)


def test_layer_backsolve_is_the_ridge_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    Xp = torch.randn(200, 6, generator=g, dtype=torch.float64)
    Xd = Xp + 0.1 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    W_bar = torch.randn(3, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, False, True])
    lam = 0.5
    W = layer_backsolve(Xp.T @ Xp, Xp.T @ Xd, W_bar, keep, lam)
    assert bool((W[:, ~keep] == 0).all())
    S = keep.nonzero().squeeze(1)
    A = torch.cat([Xp[:, S], math.sqrt(lam) * torch.eye(4, dtype=torch.float64)])
    B = torch.cat([Xd @ W_bar.T, math.sqrt(lam) * W_bar[:, S].T])
    want = torch.linalg.lstsq(A, B).solution.T
    assert torch.allclose(W[:, S], want, atol=1e-9)
    # nothing removed, same inputs: the dense weights are the exact solution
    W2 = layer_backsolve(Xp.T @ Xp, Xp.T @ Xp, W_bar, torch.ones(6, dtype=torch.bool), lam)
    assert torch.allclose(W2, W_bar, atol=1e-9)


def test_masked_layer_backsolve_refits_each_row_on_its_own_support():
    g = torch.Generator().manual_seed(3)
    Xp = torch.randn(300, 7, generator=g, dtype=torch.float64)
    Xd = Xp + 0.1 * torch.randn(300, 7, generator=g, dtype=torch.float64)
    W_bar = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) > 0.5
    mask[0] = False  # an empty row stays empty
    lam = 0.3
    W = masked_layer_backsolve(Xp.T @ Xp, Xp.T @ Xd, W_bar, mask, lam, rows_per_chunk=2)
    assert bool((W[~mask] == 0).all()) and bool((W[0] == 0).all())
    for o in range(1, 5):
        S = mask[o].nonzero().squeeze(1)
        A = torch.cat([Xp[:, S], math.sqrt(lam) * torch.eye(len(S), dtype=torch.float64)])
        B = torch.cat([Xd @ W_bar[o], math.sqrt(lam) * W_bar[o, S]])
        assert torch.allclose(W[o, S], torch.linalg.lstsq(A, B.unsqueeze(1)).solution.squeeze(1), atol=1e-9)
    # a column mask is the channel case: same answer as layer_backsolve
    keep = torch.tensor([True, False, True, True, False, True, True])
    assert torch.allclose(masked_layer_backsolve(Xp.T @ Xp, Xp.T @ Xd, W_bar, keep.expand(5, 7), lam),
                          layer_backsolve(Xp.T @ Xp, Xp.T @ Xd, W_bar, keep, lam), atol=1e-9)


@pytest.mark.parametrize("cols", [2, 1], ids=["conv-like: 2 columns a channel", "linear: 1 column a channel"])
def test_obs_removal_cost_equals_the_refit_error(cols):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 4 * cols, generator=g, dtype=torch.float64)
    W = torch.randn(4, 4 * cols, generator=g, dtype=torch.float64)
    H = X.T @ X
    blocks = torch.arange(4 * cols).view(4, cols)  # 4 channels of `cols` columns
    order, cum = obs_removal_order([torch.linalg.inv(H)], [W], [blocks], [1.0], torch.ones(4, dtype=torch.bool), 2)
    assert order.numel() == 2 and cum.numel() == 2 and bool((cum[1:] >= cum[:-1]).all())
    # the cost after removing the chosen channels is the error of the exact least-squares re-fit
    keep = torch.ones(4 * cols, dtype=torch.bool)
    for c in order.tolist():
        keep[blocks[c]] = False
    Wr = layer_backsolve(H, H, W, keep, 1e-12)
    err = float(((X @ Wr.T - X @ W.T) ** 2).sum())
    assert float(cum[-1]) == pytest.approx(err, rel=1e-6)
    # and it is the cheapest first removal
    firsts = []
    for c in range(4):
        k1 = torch.ones(4 * cols, dtype=torch.bool)
        k1[blocks[c]] = False
        W1 = layer_backsolve(H, H, W, k1, 1e-12)
        firsts.append(float(((X @ W1.T - X @ W.T) ** 2).sum()))
    assert int(order[0]) == min(range(4), key=lambda c: firsts[c])


# ----------------------------------------------------------------------------------------------- model plumbing


def test_channel_structure_covers_producers_and_consumers():
    m = tiny_resnet((4, 8, 8), random_bn=True)
    x = torch.rand(2, 3, 32, 32)
    cs = channel_structure(m, x[:1])
    params = find_prunable(m, conv_linear)
    assert [q.name for q in cs.params] == [q.name for q in params]
    assert cs.groups.num_groups == sum(s.size for s in cs.specs)
    # channel 1 of the block group layer1.0.conv1: its conv1 row and the conv2 input slice, nothing else
    f = cs.ids.index("layer1.0.conv1")
    gid = cs.first[f] + 1
    coords = cs.groups.idx[cs.groups.gid == gid]
    by = {q.name: q for q in cs.params}
    c1, c2 = by["layer1.0.conv1.weight"], by["layer1.0.conv2.weight"]
    assert coords.numel() == 4 * 9 + 4 * 9
    assert bool(((coords >= c1.offset) & (coords < c2.offset + c2.numel)).all())


def test_apply_keep_makes_channels_removable_and_compaction_exact():
    m = tiny_resnet((4, 8, 8), random_bn=True)
    x = torch.rand(3, 3, 32, 32)
    cs = channel_structure(m, x[:1])
    keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
    for gid in ("conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.1.conv1"):
        f = cs.ids.index(gid)
        keep[cs.first[f]] = False
        keep[cs.first[f] + 2] = False
    apply_keep(m, cs, keep)
    assert torch.equal(alive_channels(m, cs), keep)
    for gid in ("conv1", "layer2.0.conv2"):  # BatchNorm gamma/beta of removed channels are zero
        spec = cs.specs[cs.ids.index(gid)]
        for mem in spec.members:
            if mem.kind == "bn":
                bn = m.get_submodule(mem.module)
                assert float(bn.weight[0]) == 0.0 and float(bn.bias[2]) == 0.0
    new, plan = compact_model(m, x)
    widths = cs.widths(keep)
    for gid, kept in plan["keep"].items():
        assert len(kept) == widths[gid]
    assert set(plan["keep"]) == {"conv1", "layer1.0.conv1", "layer2.0.conv2", "layer3.1.conv1"}
    with torch.no_grad():
        assert torch.allclose(new(x), m(x), atol=1e-5)


def test_round_and_allowed_widths():
    assert allowed_widths(20, 8) == [8, 16, 20]
    assert allowed_widths(16, 4) == [4, 8, 12, 16]
    assert round_width(11.2, 16, 4) == 8 and round_width(16, 16, 4) == 16 and round_width(1, 16, 4) == 4


def test_removal_curves_and_layerwise_refit_on_a_small_net():
    m = tiny_resnet((4, 8, 8), random_bn=True)
    x = torch.rand(16, 3, 32, 32)
    dense = tiny_resnet((4, 8, 8), random_bn=True)
    cs = channel_structure(m, x[:1])
    alive = torch.ones(cs.groups.num_groups, dtype=torch.bool)
    curves = removal_curves(m, cs, x, alive, min_width={s.id: 2 for s in cs.specs})
    for f, s in enumerate(cs.specs):
        order, cum = curves[f]
        assert order.numel() == s.size - 2
        assert bool(((order >= cs.first[f]) & (order < cs.first[f] + s.size)).all())
        assert bool((cum[1:] >= cum[:-1] - 1e-12).all())
    keep = alive.clone()
    for f, _ in enumerate(cs.specs):
        keep[curves[f][0][:2]] = False
    apply_keep(m, cs, keep)
    with torch.no_grad():
        before = float(((m(x) - dense(x)) ** 2).mean())
    errs = layerwise_refit(m, dense, x)
    assert set(errs) >= {"conv1", "layer1.0.conv2", "fc"}
    assert torch.equal(alive_channels(m, cs), keep)  # removed channels stay removed
    with torch.no_grad():
        after = float(((m(x) - dense(x)) ** 2).mean())
    assert after < before


def test_layerwise_refit_leaves_an_unpruned_model_unchanged():
    m = tiny_resnet((4, 8, 8), random_bn=True)
    x = torch.rand(8, 3, 32, 32)
    w0 = flatten_weights(m, find_prunable(m, conv_linear)).clone()
    layerwise_refit(m, tiny_resnet((4, 8, 8), random_bn=True), x)
    w1 = flatten_weights(m, find_prunable(m, conv_linear))
    assert torch.allclose(w0, w1, atol=1e-4 * float(w0.abs().max()))


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 12, bias=False)
        self.fc2 = nn.Linear(12, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_block_structure_1x4_and_4x1():
    m = TinyMLP()
    params = find_prunable(m, conv_linear)
    gr, names = block_structure(params, m, block=(1, 4))
    assert names == ["fc1", "fc2"] and gr.num_groups == 12 * 4 + 4 * 3
    first = gr.idx[gr.gid == 0].tolist()
    assert first == [0, 1, 2, 3]
    gr2, names2 = block_structure(params, m, block=(4, 1), per_layer=False)
    assert names2 == ["all"] and gr2.num_groups == 3 * 16 + 1 * 12
    assert gr2.idx[gr2.gid == 0].tolist() == [0, 16, 32, 48]


def test_prune_blocks_reaches_the_block_sparsity():
    torch.manual_seed(0)
    m = TinyMLP()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    ds = Dataset("synthetic", x, y, x[:50], y[:50])
    rep = prune_blocks(m, ds, BlockConfig(sparsity=0.75, stages=2, n_grads=40))
    assert rep["blocks"] == 60 and rep["blocks_kept"] == 15
    w = m.fc1.weight.detach().reshape(12, 4, 4)  # (rows, blocks, 4)
    nz = (w != 0).any(-1)
    assert bool(((w != 0).sum(-1)[nz] >= 1).all())
    assert rep["sparsity"] >= 0.75 - 1e-9
    # every block is all-zero or (generically) all-non-zero: the zeros come in 1x4 blocks
    allw = torch.cat([m.fc1.weight.detach().reshape(-1, 4), m.fc2.weight.detach().reshape(-1, 4)])
    zero_blocks = (allw == 0).all(1)
    assert int((~zero_blocks).sum()) == 15
    assert not bool(select_groups(torch.ones(3), Groups.from_lists(3, [[[0], [1], [2]]]), torch.tensor([0])).any())


# ------------------------------------------------------------------------------------------------ concatenations
class _DenseLike(nn.Module):
    """DenseNet's dense block and transition (cat -> BatchNorm -> ReLU -> conv) and a SqueezeNet Fire module (two
    expand convs concatenated), ending in a classifier over the concatenated channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.norm1, self.conv1 = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)
        self.norm2, self.conv2 = nn.BatchNorm2d(10), nn.Conv2d(10, 4, 3, padding=1)
        self.squeeze = nn.Conv2d(14, 5, 1)
        self.e1, self.e3 = nn.Conv2d(5, 3, 1), nn.Conv2d(5, 4, 3, padding=1)
        self.norm5 = nn.BatchNorm2d(7)
        self.head = nn.Linear(7 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [torch.relu(self.bn0(self.stem(x)))]
        for norm, conv in ((self.norm1, self.conv1), (self.norm2, self.conv2)):
            feats.append(conv(torch.relu(norm(torch.cat(feats, 1)))))
        s = torch.relu(self.squeeze(torch.cat(feats, dim=1)))
        y = torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)
        y = nn.functional.adaptive_avg_pool2d(torch.relu(self.norm5(y)), 2)
        return self.head(torch.flatten(y, 1))


class _GhostLike(nn.Module):
    """timm's GhostModule: a primary conv, a cheap depthwise conv of its output, both concatenated and sliced to
    ``oup`` channels (``out[:, :oup]``), then the next conv."""

    def __init__(self, oup: int = 8) -> None:
        super().__init__()
        self.oup = oup
        self.primary, self.bn1 = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.cheap, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(oup, 6, 1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = torch.relu(self.bn1(self.primary(x)))
        x2 = torch.relu(self.bn2(self.cheap(x1)))
        out = torch.cat([x1, x2], dim=1)[:, :self.oup]
        return self.head(torch.relu(self.conv(out)).mean((2, 3)))


def _randomise_bn(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


def _prune_compact_replay(m: nn.Module, fresh: nn.Module, x: torch.Tensor, drop: int = 1) -> dict:
    """Remove channels 0..drop-1 of every group (apply_keep), compact, and replay the plan on a fresh model."""
    cs = channel_structure(m, x[:1])
    keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
    for f in range(len(cs.specs)):
        keep[cs.first[f]:cs.first[f] + drop] = False
    apply_keep(m, cs, keep)
    new, plan = compact_model(m, x)  # raises RuntimeFailure when the output moved
    assert set(plan["keep"]) == set(cs.ids)
    apply_plan(fresh, plan)
    fresh.load_state_dict(new.state_dict(), strict=True)
    with torch.no_grad():
        m.eval(), new.eval(), fresh.eval()
        assert torch.allclose(new(x), m(x), atol=1e-5) and torch.equal(fresh(x), new(x))
    return plan


def test_a_concatenation_maps_each_input_onto_its_consumers_at_an_offset():
    torch.manual_seed(0)
    m = _DenseLike()
    _randomise_bn(m)
    x = torch.rand(3, 3, 16, 16)
    found, blocked = channel_report(m, x[:1])
    assert [b.op for b in blocked] == ["output"]  # nothing blocked by the cats
    by = {g.id: g for g in found}
    assert set(by) == {"stem", "conv1", "conv2", "squeeze", "e1", "e3"}
    stem = {(mm.module, mm.kind, mm.offset, mm.total) for mm in by["stem"].members}
    assert stem == {("stem", "out", 0, 0), ("bn0", "bn", 0, 0), ("norm1", "bn", 0, 0), ("norm2", "bn", 0, 10),
                    ("conv2", "in", 0, 10), ("squeeze", "in", 0, 14), ("conv1", "in", 0, 0)}
    assert {(mm.module, mm.offset) for mm in by["conv2"].consumers} == {("squeeze", 10)}
    assert {(mm.module, mm.kind, mm.repeat, mm.offset, mm.total) for mm in by["e3"].members if mm.kind != "out"} == {
        ("norm5", "bn", 1, 3, 7), ("head", "in", 4, 12, 28)}  # after the flatten: 4 features per channel at 3 * 4
    idx = channel_weight_indices(by["conv2"], 1)["squeeze.weight"]
    assert idx.tolist() == [o * 14 + 11 for o in range(5)]  # input channel 10 + 1 of every output row
    plan = _prune_compact_replay(m, _DenseLike(), x)
    assert plan["keep"]["conv1"] == [1, 2, 3] and plan["groups"]["conv1"]["members"][-1] == {
        "module": "squeeze", "kind": "in", "repeat": 1, "offset": 6, "total": 14}
    new_sq = m.get_submodule("squeeze").weight.shape
    assert new_sq == (5, 14, 1, 1)  # the original is untouched; the compact copy shrank (checked in the helper)


def test_a_ghost_module_prunes_its_primary_channels_through_the_cheap_conv_and_the_slice():
    torch.manual_seed(0)
    m = _GhostLike()
    _randomise_bn(m)
    x = torch.rand(3, 3, 16, 16)
    found, _ = channel_report(m, x[:1])
    primary = next(g for g in found if g.id == "primary")
    assert {(mm.module, mm.kind, mm.offset) for mm in primary.members} == {
        ("primary", "out", 0), ("bn1", "bn", 0), ("cheap", "dw", 0), ("bn2", "bn", 0), ("conv", "in", 0),
        ("conv", "in", 4)}
    plan = _prune_compact_replay(m, _GhostLike(), x, drop=2)
    assert plan["keep"]["primary"] == [2, 3]


def test_a_slice_that_cuts_a_concatenated_space_is_named():
    found, blocked = channel_report(_GhostLike(oup=7), torch.rand(1, 3, 16, 16))
    assert "primary" not in {g.id for g in found}
    b = next(b for b in blocked if b.id == "primary")
    assert b.op == "getitem in _GhostLike.forward" and "channel slice [0:7] that cuts" in b.why


class _LibraryLinear(nn.Linear):
    """timm's ``Linear``: an nn.Linear subclass with its own forward (fx would trace it into F.linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def test_subclasses_of_linear_and_conv_are_leaf_modules():
    class LibraryConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight, self.bias)

    m = nn.Sequential(LibraryConv(3, 8, 3), nn.ReLU(), nn.Flatten(), _LibraryLinear(8 * 14 * 14, 12), nn.ReLU(),
                      _LibraryLinear(12, 10))
    found, blocked = channel_report(m, torch.rand(1, 3, 16, 16))
    assert [g.id for g in found] == ["0", "3"] and [b.op for b in blocked] == ["output"]
    assert [(mm.module, mm.kind, mm.repeat) for mm in found[0].members] == [("0", "out", 1), ("3", "in", 196)]


class _GhostBottleneck(_GhostLike):
    """A Ghost bottleneck's tail: the Ghost module's output (two halves of one channel space) gated by a
    squeeze-excitation and added to a 1x1-conv shortcut: the gate's and the shortcut's single channel space is cut
    in two, each half joining the primary conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.se_reduce, self.se_expand = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.shortcut, self.bn3 = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = torch.relu(self.bn1(self.primary(x)))
        out = torch.cat([x1, self.bn2(self.cheap(x1))], dim=1)[:, :self.oup]
        out = out * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(out.mean((2, 3), keepdim=True)))))
        out = out + self.bn3(self.shortcut(x))
        return self.head(torch.relu(self.conv(out)).mean((2, 3)))


def test_a_single_space_added_to_a_concatenation_is_cut_to_line_up():
    torch.manual_seed(0)
    m = _GhostBottleneck()
    _randomise_bn(m)
    x = torch.rand(3, 3, 16, 16)
    found, blocked = channel_report(m, x[:1])
    assert [b.op for b in blocked] == ["output"]
    primary = next(g for g in found if g.id == "primary")
    assert {(mm.module, mm.kind, mm.offset, mm.total) for mm in primary.members} >= {
        ("se_expand", "out", 0, 8), ("se_expand", "out", 4, 8), ("shortcut", "out", 0, 8), ("shortcut", "out", 4, 8),
        ("bn3", "bn", 4, 8), ("se_reduce", "in", 4, 8), ("conv", "in", 0, 8), ("conv", "in", 4, 8)}
    plan = _prune_compact_replay(m, _GhostBottleneck(), x)
    assert plan["keep"]["primary"] == [1, 2, 3]


def test_nested_backsolve_equals_layer_backsolve_for_each_keep():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 10, generator=g, dtype=torch.float64)
    H = X.T @ X
    W = torch.randn(4, 10, generator=g, dtype=torch.float64)
    W[:, 7] = 0.0  # a removed column: never in the factor
    rank = torch.tensor([5.0, 1, 4, 4, 0, 2, 3, 9, 5, 5])  # removal order: 4, then 1, 5, 6, {2,3}
    solve = nested_backsolve(H, W, rank, 0.3)
    alive = W.abs().sum(0) > 0
    for gone in ([], [4], [4, 1], [4, 1, 5, 6], [4, 1, 5, 6, 2, 3], [4, 1, 5, 6, 2, 3, 0, 8, 9], [2]):  # [2]: not nested
        keep = alive.clone()
        keep[gone] = False
        assert torch.allclose(solve(keep), layer_backsolve(H, H, W, keep, 0.3), rtol=1e-10, atol=1e-12)


def test_probe_curves_factor_each_consumer_once_and_equal_direct_solves(monkeypatch):
    """Issue 20: the probes of a group share one Cholesky factor per consumer; the curves equal the old
    per-probe ``layer_backsolve`` (a fresh factorisation of the kept columns) to 1e-6 relative."""
    m = tiny_resnet((4, 8, 8), random_bn=True)
    x = torch.rand(16, 3, 32, 32)
    cs = channel_structure(m, x[:1])
    keep = torch.ones(cs.groups.num_groups, dtype=torch.bool)
    keep[list(cs.first)] = False  # a pruned model: dead columns in every consumer
    apply_keep(m, cs, keep)
    alive = alive_channels(m, cs)
    curves = removal_curves(m, cs, x, alive, min_width={s.id: 1 for s in cs.specs})
    probes = {f: [1, 2, max(int(alive[cs.channels(f)].sum()) - 1, 1)] for f in range(len(cs.specs))}
    calls = []
    direct = gc.layer_backsolve
    monkeypatch.setattr(gc, "layer_backsolve", lambda *a: calls.append(1) or direct(*a))
    new = probe_curves(m, cs, x, curves, LayerStats(m, x), probes=probes)
    assert not calls  # every probe took the shared factor
    monkeypatch.setattr(probes_mod, "nested_backsolve",
                        lambda H, W, rank, lam: lambda kp: direct(H, H, W, kp, lam))  # the old computation
    old = probe_curves(m, cs, x, curves, LayerStats(m, x), probes=probes)
    assert any(float(c.max()) > 0 for _, c in old)
    for (o1, c1), (o2, c2) in zip(new, old, strict=True):
        assert torch.equal(o1, o2)
        assert torch.allclose(c1, c2, rtol=1e-6, atol=1e-12)


def test_removal_curves_read_a_concatenation_consumer_at_its_offset():
    torch.manual_seed(0)
    m = _DenseLike().eval()
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        m.squeeze.weight[:, 11] = 0.0  # conv2's channel 1 as squeeze sees it (conv2 sits at offset 10 of 14)
    cs = channel_structure(m, x[:1])
    f = cs.ids.index("conv2")
    order, cum = removal_curves(m, cs, x, alive_channels(m, cs), min_width={s.id: 1 for s in cs.specs})[f]
    assert int(order[0]) - cs.first[f] == 1 and float(cum[0]) < 1e-9  # free to remove: first, at no cost


class _RegNetLike(nn.Module):
    """A RegNet/ResNeXt bottleneck: 1x1 conv, a grouped 3x3 conv (3 groups of 4 channels), 1x1 conv, residual add;
    ``multiplier`` adds a grouped conv whose output is twice its input (a depth multiplier, not modelled)."""

    def __init__(self, multiplier: bool = False) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.b, self.bnb = nn.Conv2d(12, 12, 3, padding=1, groups=3, bias=False), nn.BatchNorm2d(12)
        self.c, self.bnc = nn.Conv2d(12, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.mult = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.head = nn.Linear(16 if multiplier else 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        f = self.bnc(self.c(torch.relu(self.bnb(self.b(torch.relu(self.bna(self.a(s))))))))
        y = torch.relu(s + f)
        return self.head((self.mult(y) if self.multiplier else y).mean((2, 3)))


def test_a_grouped_conv_prunes_whole_groups_and_compacts_to_fewer_groups():
    torch.manual_seed(0)
    m = _RegNetLike()
    _randomise_bn(m)
    x = torch.rand(3, 3, 16, 16)
    found, blocked = channel_report(m, x[:1])
    assert [b.op for b in blocked] == ["output"]
    by = {g.id: g for g in found}
    assert by["a"].size == 3 and [(mm.module, mm.kind, mm.repeat) for mm in by["a"].members] == [
        ("a", "out", 4), ("bna", "bn", 4), ("b", "dw", 4), ("bnb", "bn", 4), ("c", "in", 4)]  # a channel: a group
    assert channel_weight_indices(by["a"], 1)["b.weight"].tolist() == list(range(4 * 36, 8 * 36))
    plan = _prune_compact_replay(m, _RegNetLike(), x)  # the first group of "a" and channel 0 of the stream go
    assert plan["keep"]["a"] == [1, 2] and plan["groups"]["a"]["members"][2] == {"module": "b", "kind": "dw",
                                                                                   "repeat": 4}
    new, _ = compact_model(m, x)
    assert (new.b.groups, new.b.in_channels, new.b.out_channels, tuple(new.b.weight.shape)) == (2, 8, 8, (8, 4, 3, 3))
    bad = {**plan, "groups": {**plan["groups"], "a": {"size": 12, "members": [
        {"module": "b", "kind": "dw", "repeat": 1}]}}, "keep": {**plan["keep"], "a": list(range(1, 12))}}
    with pytest.raises(BadInput, match="grouped conv 'b' has groups of 4 channels"):
        apply_plan(_RegNetLike(), bad)  # one channel of a group: the groups would not stay equal


def test_a_grouped_conv_with_a_depth_multiplier_is_named():
    found, blocked = channel_report(_RegNetLike(multiplier=True), torch.rand(1, 3, 16, 16))
    assert "stem" not in {g.id for g in found}
    b = next(b for b in blocked if b.id == "stem")
    assert (b.module, b.op) == ("mult", "Conv2d") and "a depth multiplier" in b.why and "groups=4" in b.why


class _ConvNeXtLike(nn.Module):
    """ConvNeXt's block (depthwise 7x7, permute to channels last, a norm, Linear C -> 4C, GELU, Linear 4C -> C,
    permute back, layer scale, residual add) on a conv stem; ``layer_norm``: the norm is a LayerNorm over the
    channels, as in ConvNeXt, else a BatchNorm before the permute (its channels stay prunable)."""

    def __init__(self, layer_norm: bool = True) -> None:
        super().__init__()
        self.layer_norm = layer_norm
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8) if layer_norm else nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.bn0(self.stem(x))
        y = self.dw(s) if self.layer_norm else self.norm(self.dw(s))
        y = y.permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y) if self.layer_norm else y)))
        y = s + self.gamma * torch.permute(y, (0, 3, 1, 2))
        return self.head(y.mean((2, 3)))


def test_a_convnext_block_prunes_its_hidden_linear_channels_and_names_the_layer_norm():
    torch.manual_seed(0)
    m = _ConvNeXtLike()
    _randomise_bn(m)
    x = torch.rand(3, 3, 16, 16)
    found, blocked = channel_report(m, x[:1])
    assert [(g.id, g.size) for g in found] == [("fc1", 32)]  # the 4C hidden channels, over the last dim
    assert [(mm.module, mm.kind) for mm in found[0].members] == [("fc1", "out"), ("fc2", "in")]
    stream = next(b for b in blocked if b.id == "stem")
    assert stream.producers == ("stem", "fc2") and (stream.module, stream.op) == ("norm", "LayerNorm")
    assert "LayerNorm over the channels" in stream.why
    plan = _prune_compact_replay(m, _ConvNeXtLike(), x)
    assert plan["keep"]["fc1"] == list(range(1, 32))


def test_layer_scale_and_channels_last_linears_prune_with_the_stream():
    torch.manual_seed(0)
    m = _ConvNeXtLike(layer_norm=False)
    _randomise_bn(m)
    x = torch.rand(3, 3, 16, 16)
    found, blocked = channel_report(m, x[:1])
    assert [b.op for b in blocked] == ["output"]
    stream = next(g for g in found if g.id == "stem")
    assert {(mm.module, mm.kind) for mm in stream.members} == {
        ("stem", "out"), ("bn0", "bn"), ("dw", "dw"), ("norm", "bn"), ("fc1", "in"), ("fc2", "out"),
        ("gamma", "scale"), ("head", "in")}
    plan = _prune_compact_replay(m, _ConvNeXtLike(layer_norm=False), x)
    assert plan["keep"]["stem"] == list(range(1, 8))
    new, _ = compact_model(m, x)
    assert new.gamma.shape == (7, 1, 1) and new.fc1.in_features == 7 and new.fc2.out_features == 7


class _ShuffleLike(nn.Module):
    """ShuffleNetV2's unit: two branches concatenated, then a channel shuffle (view, transpose(1, 2), view)."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.conv = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.left(x), self.right(x)], dim=1)
        b, c, h, w = y.size()
        y = torch.transpose(y.view(b, 2, c // 2, h, w), 1, 2).contiguous().view(b, c, h, w)
        return self.head(torch.relu(self.conv(y)).mean((2, 3)))


def test_a_channel_shuffle_is_named_as_the_blocker():
    found, blocked = channel_report(_ShuffleLike(), torch.rand(1, 3, 8, 8))
    assert [g.id for g in found] == ["conv"]
    by = {b.id: b for b in blocked}
    assert set(by) == {"left", "right", "head"} and by["left"].op == ".view() in _ShuffleLike.forward"
    assert by["right"].why.startswith("a channel shuffle (groups=2: view (1, 8, 8, 8) -> (1, 2, 4, 8, 8), transpose(1,")


def _two_layer(hidden_bias: float, out_bias: float) -> nn.Module:
    """y = (1e4 x + hidden_bias) - 1e4 x + out_bias: the same function for every split of 0.3 between the biases."""
    m = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 1))
    with torch.no_grad():
        m[0].weight.fill_(1e4), m[0].bias.copy_(torch.tensor([hidden_bias, 0.0]))
        m[1].weight.copy_(torch.tensor([[1.0, -1.0]])), m[1].bias.fill_(out_bias)
    return m


def test_compaction_checks_the_function_in_float64_not_float32_rounding():
    """A bias folded into a consumer rounds differently in float32 (ResNet18: 3.4e-5 of the output after ~20
    folds, which refused a correct compaction); the check runs both models in float64 and still refuses a change."""
    x = torch.linspace(1.0, 3.0, 64).unsqueeze(1)
    before, folded = _two_layer(0.3, 0.0), _two_layer(0.0, 0.3)
    with torch.no_grad():
        assert float((before(x) - folded(x)).abs().max()) > 1e-5 * 1.3  # float32 rounding alone
    _check_same_function(before, folded, (x,), 0.0)
    with pytest.raises(RuntimeFailure, match="not inert"):
        _check_same_function(before, _two_layer(0.0, 0.31), (x,), 0.0)
