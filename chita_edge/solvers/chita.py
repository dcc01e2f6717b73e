"""CHITA: sparse ridge least squares on a low-rank empirical Fisher (Benbaki et al., ICML 2023).

With G (n x p) the mini-batch gradients at the dense weights w_bar and y = G w_bar, pruning is

    minimise  f(w) = 1/2 ||y - G w||^2 + lam ||w - w_bar||^2 + a^T w     subject to ||w||_0 <= k

(the paper's problem (4); lam = l2 * n / 2). Writing d = w - w_bar, y - G w = -G d, so
f(w) = 1/2 ||G d||^2 + lam ||d||^2 + a^T w and grad f(w) = G^T G d + 2 lam d + a.

Everything here is a pure function over tensors: no modules, no I/O, no printing. ``allowed`` (a bool mask
over p) restricts the support, which is how earlier pruned weights are kept at zero in CHITA++.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveResult:
    w: Tensor  # (p,) solution with at most k non-zeros
    objective: float  # f(w)
    iterations: int  # IHT iterations over all active-set rounds
    active_set_rounds: int
    converged: bool


def objective(G: Tensor, w: Tensor, w_bar: Tensor, lam: float, a: Tensor | None = None) -> float:
    """f(w) = 1/2 ||G (w - w_bar)||^2 + lam ||w - w_bar||^2 + a^T w."""
    d = w - w_bar
    Gd = G @ d
    f = 0.5 * float(Gd @ Gd) + lam * float(d @ d)
    return f + (float(a @ w) if a is not None else 0.0)


def gradient(G: Tensor, w: Tensor, w_bar: Tensor, lam: float, a: Tensor | None = None) -> Tensor:
    d = w - w_bar
    g = G.T @ (G @ d) + 2.0 * lam * d
    return g + a if a is not None else g


def hard_threshold(v: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """Keep the k largest |v_i| (among ``allowed``), zero the rest; ``torch.topk``, not a full sort."""
    score = v.abs()
    if allowed is not None:
        score = torch.where(allowed, score, torch.full_like(score, -1.0))
    keep = torch.topk(score, k, sorted=False).indices
    out = torch.zeros_like(v)
    out[keep] = v[keep]
    return out


def top_k_mask(score: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    if allowed is not None:
        score = torch.where(allowed, score, torch.full_like(score, -math.inf))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[torch.topk(score, k, sorted=False).indices] = True
    return mask


def spectral_norm_sq(G: Tensor, iters: int = 12, seed: int = 0) -> float:
    """sigma_max(G)^2 by power iteration on G^T G (a slight over-estimate is added by the caller)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(G.shape[1], generator=gen, dtype=G.dtype).to(G.device)  # the same draw on every device
    v /= v.norm()
    s = 0.0
    for _ in range(iters):
        u = G.T @ (G @ v)
        s = float(u.norm())
        if s == 0.0:
            return 0.0
        v = u / s
    return s


def support_gram(G: Tensor, support: Tensor, ref: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """K = G_S G_S^T (n x n) for the Woodbury backsolve, the cheap way.

    With ``ref = (support_ref, K_ref)`` the Gram matrix of a nearby support is updated by the columns that
    entered and left (cost n^2 |changes|) instead of recomputed (cost n^2 |S|).
    """
    if ref is not None:
        s_ref, K_ref = ref
        add, rem = support & ~s_ref, s_ref & ~support
        n_changes = int(add.sum()) + int(rem.sum())
        if n_changes < int(support.sum()):
            Ga, Gr = G[:, add], G[:, rem]
            return K_ref + Ga @ Ga.T - Gr @ Gr.T
    GS = G[:, support]
    return GS @ GS.T


def backsolve(G: Tensor, w_bar: Tensor, support: Tensor, lam: float, a: Tensor | None = None,
              K: Tensor | None = None, Gty: Tensor | None = None) -> Tensor:
    """Exact minimiser of f on a fixed support S (the BSO step and the final polish).

    Solves (G_S^T G_S + 2 lam I) w_S = G_S^T y + 2 lam w_bar_S - a_S with y = G w_bar. When n < |S| the
    Woodbury identity turns it into one n x n Cholesky solve:
        (G_S^T G_S + 2 lam I)^-1 = (I - G_S^T (2 lam I + G_S G_S^T)^-1 G_S) / (2 lam);
    ``K`` = G_S G_S^T may be passed in (see ``support_gram``), and ``Gty`` = G^T y when the caller solves on many
    supports of the same problem. With both, G_S is never gathered: G_S b and G_S^T t are products of G with
    vectors that are zero off S (cheaper than copying n x |S| columns when S is most of the columns).
    """
    idx = support.nonzero().squeeze(1)
    w = torch.zeros_like(w_bar)
    if idx.numel() == 0:
        return w
    if lam <= 0:
        raise ValueError("backsolve needs lam > 0")
    n, s = G.shape[0], idx.numel()
    if Gty is None:
        GS = G[:, idx]
        b = GS.T @ (G @ w_bar)
    else:
        GS = None
        b = Gty[idx]
    b = b + 2.0 * lam * w_bar[idx]
    if a is not None:
        b = b - a[idx]
    if n < s:
        if K is None:
            GS = G[:, idx] if GS is None else GS
            K = GS @ GS.T
        else:
            K = K.clone()
        K.diagonal().add_(2.0 * lam)
        L = _cholesky(K)
        if GS is None:
            b_full = torch.zeros_like(w_bar)
            b_full[idx] = b
            t = _chol_solve(L, G @ b_full)
            wS = (b - (G.T @ t)[idx]) / (2.0 * lam)
        else:
            t = _chol_solve(L, GS @ b)
            wS = (b - GS.T @ t) / (2.0 * lam)
    else:
        GS = G[:, idx] if GS is None else GS
        H = GS.T @ GS
        H.diagonal().add_(2.0 * lam)
        wS = _chol_solve(_cholesky(H), b)
    w[idx] = wS
    return w


def _chol_solve(L: Tensor, b: Tensor) -> Tensor:
    """Solve (L L^T) x = b with two triangular solves (``torch.cholesky_solve`` is 100x slower on a busy
    2-core machine with 2 threads)."""
    z = torch.linalg.solve_triangular(L, b.unsqueeze(1), upper=False)
    return torch.linalg.solve_triangular(L.T, z, upper=True).squeeze(1)


def _cholesky(K: Tensor) -> Tensor:
    """Cholesky factor of an (n x n or s x s) system whose diagonal already holds 2 lam. If it is not
    numerically positive definite, the ridge is raised tenfold (up to 6 times) and a warning says so."""
    L, info = torch.linalg.cholesky_ex(K)
    extra = 1e-10 * float(K.diagonal().abs().max()) or 1e-12
    for _ in range(6):
        if int(info) == 0:
            return L
        log.warning("backsolve: system not positive definite; ridge raised by %.3g", extra)
        L, info = torch.linalg.cholesky_ex(K + extra * torch.eye(K.shape[0], dtype=K.dtype, device=K.device))
        extra *= 10.0
    if int(info) != 0:
        raise FloatingPointError("backsolve: the system is not positive definite; use a larger l2")
    return L


def _support_change_step(w: Tensor, g: Tensor, support: Tensor, allowed: Tensor | None) -> float:
    """tau_chg: the smallest step at which an off-support |g_i| overtakes a kept |w_j - tau g_j|."""
    off = ~support if allowed is None else (~support & allowed)
    if not bool(off.any()):
        return math.inf
    m_off = float(g[off].abs().max())
    wS, gS = w[support].abs(), g[support]
    same = torch.sign(w[support]) == torch.sign(gS)
    gabs = gS.abs()
    t = torch.full_like(wS, math.inf)
    t = torch.where(same, wS / (gabs + m_off), t)
    opp = (~same) & (gabs < m_off)
    t = torch.where(opp, wS / (m_off - gabs).clamp_min(1e-300), t)
    return float(t.min()) if t.numel() else math.inf


Projection = Callable[[Tensor], tuple[Tensor, Tensor]]
"""v -> (w, state): w is v projected on the sparsity constraint, state the discrete choice that defines it (the
support for single weights, the kept groups in ``group_chita``); two states are equal when ``torch.equal``."""


def iht_loop(
    G: Tensor,
    w_bar: Tensor,
    lam: float,
    a: Tensor | None,
    w: Tensor,
    state: Tensor,
    *,
    project: Projection,
    support_of: Callable[[Tensor, Tensor], Tensor],
    change_step: Callable[[Tensor, Tensor, Tensor], float],
    L: float,
    max_iter: int,
    tol: float,
    max_doublings: int = 5,
    backsolve_every: int = 3,
) -> tuple[Tensor, Tensor, float, int, bool]:
    """The IHT iterations with CHITA's step sizes, for any projection (paper, Algorithm 1 with the line search
    of Section 3.2). ``w`` = project(...) with its ``state``; ``support_of(w, state)`` is the bool mask of free
    coordinates; ``change_step(w, g, state)`` is tau_chg, the smallest step at which the state would change.

    ``backsolve_every`` > 0: once the state has stayed the same for that many steps, jump to the exact
    minimiser on its support (``backsolve``) instead of taking more gradient steps there; then only a change
    of state can lower f, and the loop stops as soon as none does. Returns (w, state, f(w), iterations,
    converged).
    """
    f = objective(G, w, w_bar, lam, a)
    converged, it, unchanged = False, 0, 0
    gram_ref: tuple[Tensor, Tensor] | None = None
    Gty: Tensor | None = None  # G^T G w_bar, the same for every backsolve of the loop
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is reported after the loop
        support = support_of(w, state)
        if backsolve_every > 0 and unchanged >= backsolve_every and lam > 0:
            K = None
            if G.shape[0] < int(support.sum()):
                K = support_gram(G, support, gram_ref)
                gram_ref = (support, K)
            Gty = G.T @ (G @ w_bar) if Gty is None else Gty
            w_bs = backsolve(G, w_bar, support, lam, a, K=K, Gty=Gty)
            f_bs = objective(G, w_bs, w_bar, lam, a)
            if f_bs < f:
                w, f = w_bs, f_bs
            unchanged = 0
        g = gradient(G, w, w_bar, lam, a)
        # Step 2: the exact minimiser along -g_S, and the step at which the state would change.
        gS = torch.where(support, g, torch.zeros_like(g))
        gS2 = float(gS @ gS)
        if gS2 == 0.0:
            tau_star = 0.0
        else:
            GgS = G @ gS
            tau_star = gS2 / (float(GgS @ GgS) + 2.0 * lam * gS2)
        tau_chg = change_step(w, g, state)
        if 0.0 < tau_star < tau_chg:
            w_new, state_new = w - tau_star * gS, state
            f_new = objective(G, w_new, w_bar, lam, a)
            unchanged += 1
        else:
            # Step 3: just below tau_chg (state unchanged, f decreasing), then doubling while f decreases.
            tau = 0.999 * tau_chg if math.isfinite(tau_chg) else 1.0 / L
            w_new, state_new = project(w - tau * g)
            f_new = objective(G, w_new, w_bar, lam, a)
            for _ in range(max_doublings):
                tau *= 2.0
                w_try, state_try = project(w - tau * g)
                f_try = objective(G, w_try, w_bar, lam, a)
                if f_try >= f_new:
                    break
                w_new, state_new, f_new = w_try, state_try, f_try
            unchanged = unchanged + 1 if torch.equal(state_new, state) else 0
        if f_new > f:  # never accept an increase
            converged = True
            break
        rel = (f - f_new) / max(abs(f), 1e-30)
        w, state, f = w_new, state_new, f_new
        if rel < tol:
            converged = True
            break
    return w, state, f, it, converged


def grow_active_set(G: Tensor, w: Tensor, w_bar: Tensor, lam: float, a: Tensor | None, f: float, A: Tensor,
                    project: Projection, L: float, tries: int = 10) -> tuple[Tensor, Tensor] | None:
    """Active-set growth (paper, Section 3.3): full-dimensional IHT steps with step 1/L' (halving L' up to
    ``tries`` times); the first that lowers f and enters states outside ``A`` grows it. Returns
    (new A, that step's w), or None when no step does."""
    g = gradient(G, w, w_bar, lam, a)
    for _ in range(tries):
        w_try, state_try = project(w - g / L)
        if objective(G, w_try, w_bar, lam, a) < f:
            new = state_try & ~A
            if bool(new.any()):
                return A | new, w_try
        L /= 2.0
    return None


def _support(w: Tensor, state: Tensor) -> Tensor:
    return state


def iht(
    G: Tensor,
    w_bar: Tensor,
    k: int,
    lam: float,
    *,
    a: Tensor | None = None,
    w0: Tensor | None = None,
    allowed: Tensor | None = None,
    L: float | None = None,
    max_iter: int = 500,
    tol: float = 1e-7,
    max_doublings: int = 5,
    backsolve_every: int = 3,
) -> tuple[Tensor, float, int, bool]:
    """IHT with CHITA's step sizes on single weights (``iht_loop`` with hard thresholding to k weights).
    Returns (w, f(w), iterations, converged)."""
    if L is None:
        L = 1.05 * (spectral_norm_sq(G) + 2.0 * lam)

    def project(v: Tensor) -> tuple[Tensor, Tensor]:
        out = hard_threshold(v, k, allowed)
        return out, out != 0

    # Step 1: a first plain step with 1/L makes w k-sparse.
    w, state = project(w_bar - gradient(G, w_bar, w_bar, lam, a) / L if w0 is None else w0)
    w, _, f, it, conv = iht_loop(G, w_bar, lam, a, w, state, project=project, support_of=_support,
                                 change_step=lambda w_, g_, s_: _support_change_step(w_, g_, s_, allowed), L=L,
                                 max_iter=max_iter, tol=tol, max_doublings=max_doublings,
                                 backsolve_every=backsolve_every)
    return w, f, it, conv


def chita(
    G: Tensor,
    w_bar: Tensor,
    k: int,
    lam: float,
    *,
    a: Tensor | None = None,
    allowed: Tensor | None = None,
    active_set: bool = True,
    active_factor: float = 1.5,
    max_iter: int = 500,
    tol: float = 1e-7,
    max_rounds: int = 20,
    polish: bool = True,
    backsolve_every: int = 3,
    refine_rounds: int = 50,
    refine_steps: int = 12,
    refine_ratio: float = 4.0,
) -> SolveResult:
    """Solve the CHITA problem: IHT with exact and support-change steps on a growing active set, then an
    exact backsolve on the final support (paper, Algorithm 2 with the active-set strategy of Section 3.3).

    Shapes: G (n, p), w_bar (p,), a (p,) or None, allowed (p,) bool or None; 0 <= k <= p.
    """
    p = w_bar.numel()
    n_allowed = p if allowed is None else int(allowed.sum())
    k = min(k, n_allowed)
    if k == 0:
        w = torch.zeros_like(w_bar)
        return SolveResult(w, objective(G, w, w_bar, lam, a), 0, 0, True)
    L_full = 1.05 * (spectral_norm_sq(G) + 2.0 * lam)
    if not active_set or math.ceil(active_factor * k) >= n_allowed:
        w, f, its, conv = iht(G, w_bar, k, lam, a=a, allowed=allowed, L=L_full, max_iter=max_iter, tol=tol,
                              backsolve_every=backsolve_every)
        rounds = 1
    else:
        # Step 4: active set = top ceil(1.5 k) weights by magnitude; solve there, then grow it.
        def project_full(v: Tensor) -> tuple[Tensor, Tensor]:
            out = hard_threshold(v, k, allowed)
            return out, out != 0

        A = top_k_mask(w_bar.abs(), math.ceil(active_factor * k), allowed)
        w = hard_threshold(w_bar, k, A)
        its, rounds, conv = 0, 0, False
        f = objective(G, w, w_bar, lam, a)
        for rounds in range(1, max_rounds + 1):  # noqa: B007 - `rounds` is reported after the loop
            idx = A.nonzero().squeeze(1)
            GA = G[:, idx]
            a_A = a[idx] if a is not None else None
            wA, f, it_r, conv = iht(GA, w_bar[idx], k, lam, a=a_A, w0=w[idx], max_iter=max_iter, tol=tol,
                                    backsolve_every=backsolve_every,
                                    L=1.05 * (spectral_norm_sq(GA) + 2.0 * lam))
            its += it_r
            w = torch.zeros_like(w_bar)
            w[idx] = wA
            # f on the full problem differs from the restricted one only by constants outside A.
            f = objective(G, w, w_bar, lam, a)
            grown = grow_active_set(G, w, w_bar, lam, a, f, A, project_full, L_full)
            if grown is None:
                break
            A, w = grown
    # Step 5: exact backsolve on the final support.
    if polish and lam > 0:
        woodbury = G.shape[0] < k
        Gty = G.T @ (G @ w_bar)
        support = w != 0
        # (support, its Gram matrix G_S G_S^T) of the current solution: each candidate's Gram is updated from it
        gram = (support, support_gram(G, support)) if woodbury else None
        w_bs = backsolve(G, w_bar, support, lam, a, K=gram[1] if gram else None, Gty=Gty)
        f_bs = objective(G, w_bs, w_bar, lam, a)
        if f_bs <= f:
            w, f = w_bs, f_bs
        # Step 6: support refinement. IHT judges a new support by one gradient step; judge it by its exact
        # refit instead: candidates supp(H_k(w - tau g)) for tau = 2^j / L, each backsolved, the best one
        # taken while it lowers f (hard-thresholding pursuit with a step search). Stops at a support that no
        # step size improves: a fixed point of IHT with exact refits.
        # Refitting candidate supports costs n^2 |changes| each; at low sparsity (k >> n) the local quadratic
        # model barely moves the support and IHT alone is enough, so refinement runs where k <= refine_ratio n.
        for _ in range(refine_rounds if k <= refine_ratio * G.shape[0] else 0):
            g = gradient(G, w, w_bar, lam, a)
            support = w != 0
            best_f, best_w, best_gram, seen = f, None, None, set()
            tau = 1.0 / L_full
            for _j in range(refine_steps):
                cand = hard_threshold(w - tau * g, k, allowed) != 0
                tau *= 2.0
                key = cand.nonzero().squeeze(1)
                if torch.equal(cand, support) or (h := hash(key.cpu().numpy().tobytes())) in seen:
                    continue
                seen.add(h)
                K_c = support_gram(G, cand, gram) if gram else None
                w_c = backsolve(G, w_bar, cand, lam, a, K=K_c, Gty=Gty)
                f_c = objective(G, w_c, w_bar, lam, a)
                if f_c < best_f:
                    best_f, best_w, best_gram = f_c, w_c, ((cand, K_c) if gram else None)
            if best_w is None or (f - best_f) <= tol * max(abs(f), 1e-30):
                break
            w, f, gram = best_w, best_f, best_gram
            if gram is not None and G.dtype != torch.float64:  # no chain of float32 updates: recompute
                gram = (gram[0], support_gram(G, gram[0]))
            rounds += 1
    return SolveResult(w, f, its, rounds, conv)


def magnitude_bso(G: Tensor, w_bar: Tensor, k: int, lam: float, *, a: Tensor | None = None,
                  allowed: Tensor | None = None) -> SolveResult:
    """CHITA-BSO: the magnitude support, then the exact backsolve on it."""
    support = top_k_mask(w_bar.abs(), k, allowed)
    w = backsolve(G, w_bar, support, lam, a)
    return SolveResult(w, objective(G, w, w_bar, lam, a), 0, 0, True)
