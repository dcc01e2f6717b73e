"""The CHITA solver: golden cases by enumeration, identities, Woodbury = direct, allowed masks."""

import itertools

import pytest
import torch

from chita_edge.solvers import chita as S


def problem(n=8, p=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, p, generator=g, dtype=dtype)
    w_bar = torch.randn(p, generator=g, dtype=dtype)
    return G, w_bar


def brute_force(G, w_bar, k, lam, a=None):
    best = (float("inf"), None)
    p = w_bar.numel()
    for supp in itertools.combinations(range(p), k):
        mask = torch.zeros(p, dtype=torch.bool)
        mask[list(supp)] = True
        w = S.backsolve(G, w_bar, mask, lam, a)
        f = S.objective(G, w, w_bar, lam, a)
        if f < best[0]:
            best = (f, w)
    return best


def test_backsolve_is_the_exact_minimiser_on_the_support():
    G, w_bar = problem()
    lam = 0.3
    mask = torch.tensor([True, False, True, True, False, False])
    w = S.backsolve(G, w_bar, mask, lam)
    assert (w[~mask] == 0).all()
    # gradient restricted to the support vanishes at the minimiser
    g = S.gradient(G, w, w_bar, lam)
    assert g[mask].abs().max() < 1e-10
    # and f is a minimum: random perturbations on the support do not lower it
    f = S.objective(G, w, w_bar, lam)
    for i in range(20):
        d = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) * mask
        assert S.objective(G, w + 1e-3 * d, w_bar, lam) >= f


def test_woodbury_equals_direct_solve():
    G, w_bar = problem(n=5, p=40, seed=3)  # n < |S|: Woodbury path
    lam = 0.7
    mask = torch.zeros(40, dtype=torch.bool)
    mask[::2] = True
    w_wood = S.backsolve(G, w_bar, mask, lam)
    idx = mask.nonzero().squeeze(1)
    GS = G[:, idx]
    H = GS.T @ GS + 2 * lam * torch.eye(len(idx), dtype=G.dtype)
    b = GS.T @ (G @ w_bar) + 2 * lam * w_bar[idx]
    assert torch.allclose(w_wood[idx], torch.linalg.solve(H, b), atol=1e-9)


@pytest.mark.parametrize("n", [5, 60])  # Woodbury (n < |S|) and the direct |S| x |S| system
def test_backsolve_without_gathering_G_S_equals_the_direct_solve(n):
    G, w_bar = problem(n=n, p=40, seed=4)
    lam, a = 0.7, torch.linspace(-0.2, 0.2, 40, dtype=torch.float64)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[1::3] = True
    mask[:8] = True
    idx = mask.nonzero().squeeze(1)
    GS = G[:, idx]
    H = GS.T @ GS + 2 * lam * torch.eye(len(idx), dtype=G.dtype)
    b = GS.T @ (G @ w_bar) + 2 * lam * w_bar[idx] - a[idx]
    want = torch.linalg.solve(H, b)
    # the Gram matrix updated from a nearby support, and G^T y given once: G_S is never copied
    near = mask.clone()
    near[[1, 2, 30]] = ~near[[1, 2, 30]]
    K = S.support_gram(G, mask, (near, S.support_gram(G, near)))
    w = S.backsolve(G, w_bar, mask, lam, a, K=K if n < len(idx) else None, Gty=G.T @ (G @ w_bar))
    assert (w[~mask] == 0).all()
    assert torch.allclose(w[idx], want, atol=1e-9)


def test_chita_finds_the_enumerated_optimum_on_6_weight_problems():
    """IHT is a local method: on 18 enumerated 6-weight problems it must hit the global optimum in at least
    16 and never be worse than the magnitude support refitted exactly (CHITA-BSO)."""
    hits = 0
    for seed in range(6):
        for k in (1, 2, 3):
            G, w_bar = problem(seed=seed)
            lam = 0.5
            f_best, _ = brute_force(G, w_bar, k, lam)
            r = S.chita(G, w_bar, k, lam, active_set=False)
            assert int((r.w != 0).sum()) <= k
            assert r.objective == pytest.approx(S.objective(G, r.w, w_bar, lam), rel=1e-12)
            assert r.objective <= S.magnitude_bso(G, w_bar, k, lam).objective + 1e-12
            hits += r.objective <= f_best * (1 + 1e-9) + 1e-12
    assert hits >= 16


def test_chita_beats_or_equals_magnitude_bso():
    G, w_bar = problem(n=30, p=200, seed=7)
    lam = 0.1
    for k in (10, 50, 120):
        r = S.chita(G, w_bar, k, lam)
        b = S.magnitude_bso(G, w_bar, k, lam)
        assert int((r.w != 0).sum()) == k
        assert r.objective <= b.objective + 1e-9


def test_allowed_mask_is_respected_and_first_order_term_is_used():
    G, w_bar = problem(n=20, p=50, seed=1)
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[10:40] = True
    a = torch.full((50,), 0.05, dtype=torch.float64)
    r = S.chita(G, w_bar, 8, 0.2, a=a, allowed=allowed)
    assert (r.w[~allowed] == 0).all() and int((r.w != 0).sum()) == 8
    assert r.objective == pytest.approx(S.objective(G, r.w, w_bar, 0.2, a), rel=1e-12)
    r0 = S.chita(G, w_bar, 8, 0.2, allowed=allowed)
    assert not torch.equal(r.w, r0.w)


def test_hard_threshold_keeps_exactly_k_largest():
    v = torch.tensor([0.1, -3.0, 2.0, 0.0, -0.5, 1.5])
    out = S.hard_threshold(v, 3)
    assert out.tolist() == [0.0, -3.0, 2.0, 0.0, 0.0, 1.5]
