"""The per-layer floor of the unstructured support (PruneConfig.layer_floor, prune --layer-floor): a global
threshold never empties a layer, the kept count stays k, and 0 gives the old support exactly."""
import math

import pytest
import torch
from conftest import TINY, run_cli, tiny_mlp

from chita_edge.core.checkpoint import read_weights
from chita_edge.models.zoo import default_prunable
from chita_edge.pruning.layers import find_prunable, flatten_weights
from chita_edge.pruning.prune import PruneConfig, apply_layer_floor, keep_count, prune
from chita_edge.solvers import chita as solver

S = 0.7


def small_last_layer():
    """tiny_mlp whose last Linear (320 weights) is smaller than every weight of the first (2048): global
    magnitude at 70 % keeps none of it."""
    m = tiny_mlp()
    with torch.no_grad():
        m[3].weight.mul_(1e-4)
    return m


def test_global_magnitude_empties_the_small_layer_without_the_floor_and_keeps_its_floor_with_it(digits):
    off, on = small_last_layer(), small_last_layer()
    w_bar = flatten_weights(on, find_prunable(on, default_prunable))
    k = keep_count(S, w_bar.numel())
    r_off = prune(off, PruneConfig(sparsity=S, method="magnitude", layer_floor=0.0), digits)
    r_on = prune(on, PruneConfig(sparsity=S, method="magnitude"), digits)  # the default floor, 0.1
    assert int(off[3].weight.count_nonzero()) == 0
    floor = math.ceil(0.1 * (1 - S) * 320)  # 10
    assert int(on[3].weight.count_nonzero()) == floor
    assert r_on.layer_floor == {"floor": 0.1, "raised": {"3.weight": floor}}
    assert r_off.layer_floor == {"floor": 0.0, "raised": {}}
    # total kept stays k: the floor's weights come from the smallest kept ones of the first layer
    assert int(on[1].weight.count_nonzero()) + floor == k == int(off[1].weight.count_nonzero())
    # the last layer keeps its largest dense weights, at their dense values
    dense = small_last_layer()[3].weight
    top = dense.abs().flatten().topk(floor).indices
    assert torch.equal(on[3].weight.flatten()[top], dense.flatten()[top])
    # the first layer lost exactly its `floor` smallest kept weights
    gone = (off[1].weight != 0) & (on[1].weight == 0)
    assert int(gone.sum()) == floor
    assert float(off[1].weight.detach()[gone].abs().max()) <= float(on[1].weight.detach()[on[1].weight != 0].abs().min())


def test_the_floor_counts_only_allowed_weights_and_leaves_a_support_above_it_untouched():
    m = small_last_layer()
    params = find_prunable(m, default_prunable)
    w_bar = flatten_weights(m, params)
    k = keep_count(S, w_bar.numel())
    w = solver.hard_threshold(w_bar, k, None)
    allowed = torch.ones_like(w_bar, dtype=torch.bool)
    allowed[params[1].offset:params[1].offset + 316] = False  # 4 allowed entries left in the last layer
    out, raised = apply_layer_floor(w, w_bar, params, S, 0.1, allowed)
    assert raised == {"3.weight": 4} and int(out.count_nonzero()) == k
    assert torch.equal(apply_layer_floor(out, w_bar, params, S, 0.1, allowed)[0], out)  # already above: unchanged


def test_chita_support_keeps_the_floor(digits):
    m = small_last_layer()
    k = keep_count(S, 2368)
    r = prune(m, PruneConfig(sparsity=S, method="chita", n_grads=32, layerwise_refit=False, max_iter=50), digits)
    assert int(m[3].weight.count_nonzero()) >= 10
    assert int(m[1].weight.count_nonzero()) + int(m[3].weight.count_nonzero()) <= k
    assert r.layer_floor["raised"] == {"3.weight": 10}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "m.py").write_text(TINY)
    torch.save(small_last_layer().state_dict(), tmp_path / "w.pt")
    return tmp_path


def test_cli_layer_floor_zero_reproduces_the_global_support_and_the_default_reports_the_raise(files):
    base = ("prune", f"{files / 'm.py'}:mlp", "--weights", files / "w.pt", "--data", "digits", "--method",
            "magnitude", "--sparsity", str(S))
    r0 = run_cli(*base, "--layer-floor", "0", "--out", files / "p0.pt", "--json")
    assert r0.code == 0, r0.stderr
    sd0, _ = read_weights(files / "p0.pt")
    m = small_last_layer()
    w_bar = flatten_weights(m, find_prunable(m, default_prunable))
    old = solver.hard_threshold(w_bar, keep_count(S, w_bar.numel()), None)
    assert torch.equal(torch.cat([sd0["1.weight"].flatten(), sd0["3.weight"].flatten()]), old)
    assert r0.json()["layer_floor"]["raised"] == {}
    r = run_cli(*base, "--out", files / "p.pt")
    assert r.code == 0, r.stderr
    assert "layer floor (0.1) raised: 3.weight +10" in r.stdout + r.stderr
    bad = run_cli(*base, "--layer-floor", "1.5", "--out", files / "p2.pt")
    assert bad.code == 2 and "--layer-floor 1.5" in bad.stderr and "[0, 1]" in bad.stderr
    assert not (files / "p2.pt").exists()
