"""Structured CHITA: the CHITA problem with groups of weights (channels, neurons, blocks) instead of single weights.

Same quadratic model and the same ``f`` as ``chita.py`` (Benbaki et al., ICML 2023, problem (4)):

    minimise  f(w) = 1/2 ||G (w - w_bar)||^2 + lam ||w - w_bar||^2 + a^T w
    subject to  w_j = 0 for every coordinate j of a removed group,
                exactly k_f groups of each family f are kept.

A *group* is a set of coordinates of w (e.g. output channel c of a conv: its output slice, the BatchNorm-free
depthwise slice and the input slice of every consumer). Groups may overlap (a conv weight w[o, i] belongs to
output channel o of one channel space and input channel i of another); a coordinate survives only when every
group containing it is kept. Coordinates in no group are never pruned. A *family* is a set of groups that
compete for the same budget (the channels of one channel space; all 1x4 blocks of a model), with ``k[f]`` groups
kept in family ``f``.

Generalisations of the scalar algorithm (paper, Algorithms 1-2 and Section 3.3):

* hard thresholding keeps, per family, the k_f groups of largest ||v_g||^2 (``group_hard_threshold``);
* the exact step tau* along -g_S on a fixed support is unchanged (S = kept coordinates);
* tau_chg is the smallest step at which an off group's score tau^2 ||g_g||^2 reaches a kept group's
  ||w_g - tau g_g||^2 in the same family -- a quadratic in tau per kept group, which reduces to the scalar
  rule |w_j| / (|g_j| +- m_off) for one-coordinate groups;
* the active set is a set of groups (top ceil(1.5 k_f) per family by ||w_bar_g||);
* the final polish is chita.backsolve on the kept coordinates, which re-fits every surviving weight,
  including the consumers' input slices of the kept channels (the OBS update).

Pure functions over tensors; no modules, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chita_edge.solvers.chita import (
    backsolve,
    gradient,
    grow_active_set,
    iht_loop,
    objective,
    spectral_norm_sq,
)

Tensor = torch.Tensor

__all__ = [
    "GroupSolveResult",
    "Groups",
    "coordinate_mask",
    "group_chita",
    "group_hard_threshold",
    "group_iht",
    "group_removal_cost",
    "group_sq_norms",
    "group_support_change_step",
    "layer_backsolve",
    "masked_layer_backsolve",
    "nested_backsolve",
    "select_groups",
]


@dataclass(frozen=True)
class Groups:
    """Coordinate-group incidences: ``idx[i]`` is a coordinate of w that belongs to group ``gid[i]``.

    ``family[g]`` is the family of group g. Build with ``Groups.from_lists``::

        Groups.from_lists(6, [[[0, 1], [2, 3]], [[4], [5]]])   # families 0 and 1, two groups each
    """

    p: int
    idx: Tensor  # (nnz,) int64
    gid: Tensor  # (nnz,) int64
    family: Tensor  # (num_groups,) int64

    @property
    def num_groups(self) -> int:
        return int(self.family.numel())

    @property
    def num_families(self) -> int:
        return int(self.family.max()) + 1 if self.family.numel() else 0

    @staticmethod
    def from_lists(p: int, families: Sequence[Sequence[Sequence[int] | Tensor]]) -> Groups:
        idx, gid, fam = [], [], []
        g = 0
        for f, groups in enumerate(families):
            for members in groups:
                t = torch.as_tensor(members, dtype=torch.long).reshape(-1)
                idx.append(t)
                gid.append(torch.full_like(t, g))
                fam.append(f)
                g += 1
        def cat(xs: list[Tensor]) -> Tensor:
            return torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)

        out = Groups(p, cat(idx), cat(gid), torch.tensor(fam, dtype=torch.long))
        if out.idx.numel() and (int(out.idx.min()) < 0 or int(out.idx.max()) >= p):
            raise ValueError("group coordinates must lie in 0..p-1")
        return out

    def sizes(self) -> Tensor:
        """Number of groups per family."""
        return torch.bincount(self.family, minlength=self.num_families)

    def coordinates(self, which: Tensor) -> Tensor:
        """The coordinates (with repeats) of the groups in ``which`` (bool over groups)."""
        sel = which.nonzero().squeeze(1)
        if sel.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        if bool((self.gid[1:] >= self.gid[:-1]).all()):  # incidences sorted by group (from_lists): slice them
            ptr = torch.searchsorted(self.gid, torch.stack([sel, sel + 1]))
            return torch.cat([self.idx[a:b] for a, b in zip(ptr[0].tolist(), ptr[1].tolist(), strict=True)])
        return self.idx[which[self.gid]]


def group_sq_norms(v: Tensor, groups: Groups) -> Tensor:
    """||v_g||^2 for every group (over all its coordinates)."""
    out = torch.zeros(groups.num_groups, dtype=v.dtype)
    return out.index_add_(0, groups.gid, v[groups.idx] ** 2)


def coordinate_mask(keep: Tensor, groups: Groups) -> Tensor:
    """Coordinates that survive when only the groups in ``keep`` (bool, num_groups) are kept."""
    removed = torch.zeros(groups.p, dtype=torch.int32)
    removed.index_add_(0, groups.idx, (~keep).to(torch.int32)[groups.gid])
    return removed == 0


def select_groups(score: Tensor, groups: Groups, k: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Per family f, the k[f] groups of largest ``score`` among ``allowed`` (bool, num_groups); ``torch.topk``."""
    keep = torch.zeros(groups.num_groups, dtype=torch.bool)
    s = score if allowed is None else torch.where(allowed, score, torch.full_like(score, -math.inf))
    for f in range(groups.num_families):
        members = (groups.family == f).nonzero().squeeze(1)
        kf = int(k[f])
        if kf <= 0 or members.numel() == 0:
            continue
        top = torch.topk(s[members], min(kf, members.numel()), sorted=False).indices
        keep[members[top]] = True
    if allowed is not None:
        keep &= allowed
    return keep


def group_hard_threshold(v: Tensor, groups: Groups, k: Tensor, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keep the k[f] groups of largest ||v_g|| per family, zero every coordinate of the others.

    Returns (w, keep) with keep a bool mask over groups.
    """
    keep = select_groups(group_sq_norms(v, groups), groups, k, allowed)
    return torch.where(coordinate_mask(keep, groups), v, torch.zeros_like(v)), keep


def group_support_change_step(w: Tensor, g: Tensor, groups: Groups, keep: Tensor,
                              allowed: Tensor | None = None) -> float:
    """tau_chg: the smallest tau > 0 at which, in some family, an off group's ||tau g_g||^2 reaches a kept
    group's ||w_g - tau g_g||^2.

    For a kept group j with M^2 = max over the family's off (allowed) groups of ||g||^2, the crossing solves
    A tau^2 - 2 B tau + C = 0 with A = ||g_j||^2 - M^2, B = <w_j, g_j>, C = ||w_j||^2; its roots are
    C / (B +- sqrt(B^2 - A C)). For one-coordinate groups this is the scalar rule of chita.py.
    """
    off = ~keep if allowed is None else (~keep & allowed)
    if not bool(off.any()):
        return math.inf
    gn = group_sq_norms(g, groups)
    nf = groups.num_families
    M2 = torch.zeros(nf, dtype=g.dtype).scatter_reduce_(0, groups.family[off], gn[off], "amax", include_self=True)
    has_off = torch.zeros(nf, dtype=torch.bool)
    has_off[groups.family[off]] = True
    sel = keep & has_off[groups.family]
    if not bool(sel.any()):
        return math.inf
    wg = w[groups.idx]
    B = torch.zeros(groups.num_groups, dtype=w.dtype).index_add_(0, groups.gid, wg * g[groups.idx])[sel]
    C = torch.zeros(groups.num_groups, dtype=w.dtype).index_add_(0, groups.gid, wg * wg)[sel]
    A = gn[sel] - M2[groups.family[sel]]
    D = B * B - A * C
    ok = D >= 0
    sq = D.clamp_min(0).sqrt()
    taus = []
    for den in (B + sq, B - sq):
        t = C / torch.where(den != 0, den, torch.full_like(den, math.nan))
        taus.append(torch.where(ok & (t > 0) & torch.isfinite(t), t, torch.full_like(t, math.inf)))
    tau = torch.minimum(taus[0], taus[1])
    return float(tau.min()) if tau.numel() else math.inf


def group_iht(
    G: Tensor,
    w_bar: Tensor,
    groups: Groups,
    k: Tensor,
    lam: float,
    *,
    a: Tensor | None = None,
    w0: Tensor | None = None,
    allowed: Tensor | None = None,
    L: float | None = None,
    max_iter: int = 200,
    tol: float = 1e-7,
    max_doublings: int = 5,
    backsolve_every: int = 3,
) -> tuple[Tensor, Tensor, float, int, bool]:
    """Group IHT with CHITA's step sizes. Returns (w, keep, f(w), iterations, converged).

    ``backsolve_every`` > 0: once the kept groups have stayed the same for that many steps, jump to the exact
    minimiser on them (``backsolve``); afterwards only a change of groups can lower f.

    Shapes: G (n, p), w_bar (p,), k (num_families,) int, allowed (num_groups,) bool or None.
    """
    if L is None:
        L = 1.05 * (spectral_norm_sq(G) + 2.0 * lam)

    def project(v: Tensor) -> tuple[Tensor, Tensor]:
        return group_hard_threshold(v, groups, k, allowed)

    # Step 1: start from w0 projected (or one plain 1/L step from w_bar), so that the group constraint holds.
    w, keep = project(w_bar - gradient(G, w_bar, w_bar, lam, a) / L if w0 is None else w0)
    return iht_loop(G, w_bar, lam, a, w, keep, project=project,
                    support_of=lambda w_, keep_: coordinate_mask(keep_, groups),
                    change_step=lambda w_, g_, keep_: group_support_change_step(w_, g_, groups, keep_, allowed),
                    L=L, max_iter=max_iter, tol=tol, max_doublings=max_doublings, backsolve_every=backsolve_every)


@dataclass(frozen=True)
class GroupSolveResult:
    w: Tensor  # (p,) solution: zero on every coordinate of a removed group
    keep: Tensor  # (num_groups,) bool: kept groups (k[f] per family)
    objective: float
    iterations: int
    active_set_rounds: int
    converged: bool


def group_chita(
    G: Tensor,
    w_bar: Tensor,
    groups: Groups,
    k: Tensor,
    lam: float,
    *,
    a: Tensor | None = None,
    allowed: Tensor | None = None,
    w0: Tensor | None = None,
    active_set: bool = True,
    active_factor: float = 1.5,
    max_iter: int = 200,
    tol: float = 1e-7,
    max_rounds: int = 10,
    polish: bool = True,
    backsolve_every: int = 3,
    swap_rounds: int = 0,
    swap_width: int = 3,
) -> GroupSolveResult:
    """Solve the grouped CHITA problem: group IHT on a growing active set of groups, then the exact backsolve
    on the kept coordinates (paper, Algorithm 2 with Section 3.3, groups instead of coordinates).

    ``w0`` (optional) is a warm start whose kept groups seed the active set (e.g. a greedy selection).
    ``allowed`` restricts which groups may be kept (earlier-removed channels stay removed).
    ``swap_rounds`` > 0 adds a local search after the polish (an extension, not in the paper): per family, try
    swapping each of the ``swap_width`` kept groups of smallest ||w_g|| for each of the ``swap_width`` off
    groups of largest ||grad_g||, re-fit exactly, keep the best swap if f drops; up to that many rounds. IHT judges a change of groups before re-fitting, so it can stop at a
    support that one re-fitted swap improves; each try costs one backsolve.
    """
    sizes = groups.sizes() if allowed is None else torch.bincount(groups.family[allowed], minlength=groups.num_families)
    k = torch.minimum(torch.as_tensor(k, dtype=torch.long), sizes)
    L_full = 1.05 * (spectral_norm_sq(G) + 2.0 * lam)
    # Step 4: the active set: per family the top ceil(1.5 k_f) groups by ||w_bar_g|| (plus the warm start).
    kA = torch.minimum(torch.ceil(active_factor * k.double()).long(), sizes)
    if not active_set or bool((kA >= sizes).all()):
        A = allowed
        w_start = w0
        rounds_cap = 1
    else:
        A = select_groups(group_sq_norms(w_bar, groups), groups, kA, allowed)
        if w0 is not None:
            A = A | (group_sq_norms(w0, groups) > 0) & (allowed if allowed is not None else True)
        w_start = w0 if w0 is not None else group_hard_threshold(w_bar, groups, k, A)[0]
        rounds_cap = max_rounds
    its, rounds, conv = 0, 0, False
    w, keep, f = w_bar, torch.ones(groups.num_groups, dtype=torch.bool), math.inf
    for rounds in range(1, rounds_cap + 1):  # noqa: B007 - `rounds` is reported after the loop
        w, keep, f, it_r, conv = group_iht(G, w_bar, groups, k, lam, a=a, w0=w_start, allowed=A, L=L_full,
                                           max_iter=max_iter, tol=tol, backsolve_every=backsolve_every)
        its += it_r
        if A is allowed:
            break
        grown = grow_active_set(G, w, w_bar, lam, a, f, A, lambda v: group_hard_threshold(v, groups, k, allowed), L_full)
        if grown is None:
            break
        A, w_start = grown
    # Step 5: exact backsolve on the kept coordinates (re-fits the consumers' input slices too).
    if polish and lam > 0:
        support = coordinate_mask(keep, groups)
        w_bs = backsolve(G, w_bar, support, lam, a)
        f_bs = objective(G, w_bs, w_bar, lam, a)
        if f_bs <= f:
            w, f = w_bs, f_bs
    # Step 6 (optional): swap search with exact re-fits.
    for _ in range(swap_rounds if lam > 0 else 0):
        improved = False
        for fam in range(groups.num_families):
            in_f = groups.family == fam
            off = in_f & ~keep & (allowed if allowed is not None else True)
            on = in_f & keep
            if not bool(off.any()) or not bool(on.any()):
                continue
            wn = group_sq_norms(w, groups)
            gn = group_sq_norms(gradient(G, w, w_bar, lam, a), groups)
            outs = torch.topk(torch.where(on, -wn, torch.full_like(wn, -math.inf)), min(swap_width, int(on.sum()))).indices
            ins = torch.topk(torch.where(off, gn, torch.full_like(gn, -math.inf)), min(swap_width, int(off.sum()))).indices
            best = None
            for out_g in outs.tolist():
                for in_g in ins.tolist():
                    keep_try = keep.clone()
                    keep_try[out_g], keep_try[in_g] = False, True
                    w_try = backsolve(G, w_bar, coordinate_mask(keep_try, groups), lam, a)
                    f_try = objective(G, w_try, w_bar, lam, a)
                    if f_try < f * (1 - 1e-12) and (best is None or f_try < best[0]):
                        best = (f_try, w_try, keep_try)
            if best is not None:
                f, w, keep = best
                improved = True
        if not improved:
            break
    return GroupSolveResult(w, keep, f, its, rounds, conv)


def group_removal_cost(G: Tensor, w: Tensor, groups: Groups, lam: float, *, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """What removing each group alone (no re-fit) adds to f at w, the saliency of a greedy search.

    Returns (Z, s): Z (n, num_groups) with Z[:, g] = G_g w_g, and s[g] = 1/2 ||Z[:, g]||^2 + lam ||w_g||^2.
    Removing a set B of groups of one family (disjoint coordinates) costs 1/2 ||sum_B Z||^2 + lam sum_B ||w_g||^2
    (when w is the expansion point w_bar, a = 0).
    """
    n = G.shape[0]
    Z = torch.zeros(n, groups.num_groups, dtype=G.dtype)
    for s0 in range(0, groups.idx.numel(), chunk):
        sl = slice(s0, s0 + chunk)
        cols = groups.idx[sl]
        Z.index_add_(1, groups.gid[sl], G[:, cols] * w[cols].to(G.dtype))
    s = 0.5 * (Z * Z).sum(0) + lam * group_sq_norms(w.to(G.dtype), groups)
    return Z, s


# --------------------------------------------------------------------------------------------------------------
# Layer-wise form: the same quadratic with G = a layer's input activations X (one weight row per output)
#
# For one Conv/Linear layer with dense weights W_bar (out x q, q = in_channels * kernel elements), inputs X_p
# (rows: samples x positions, columns: q) in the pruned network and X_d in the dense one, CHITA's f with G = X_p
# and target y = X_d w_bar for every output row is
#
#     f(W) = 1/2 ||X_p W^T - X_d W_bar^T||^2 + lam/2 ||W - W_bar||^2,
#
# which only needs H = X_p^T X_p and C = X_p^T X_d (q x q). Removing input channel c removes a block of
# columns B_c (its kernel elements). With H^-1 the inverse of H + lam I, removing B with the optimal re-fit of
# the other columns costs tr(W_B [(H^-1)_BB]^-1 W_B^T) (the group OBS saliency) and moves the remaining columns
# by -W_B [(H^-1)_BB]^-1 (H^-1)_B,: (the OBS update).


def layer_backsolve(H: Tensor, C: Tensor, W_bar: Tensor, keep: Tensor, lam: float) -> Tensor:
    """Exact minimiser of f(W) above with the columns outside ``keep`` (bool, q) fixed at zero.

    Solves (H_SS + lam I) W_S^T = (C W_bar^T)_S + lam W_bar_S^T. Shapes: H, C (q, q); W_bar (out, q).
    """
    S = keep.nonzero().squeeze(1)
    W = torch.zeros_like(W_bar)
    if S.numel() == 0:
        return W
    HS = H[S][:, S].clone()
    HS.diagonal().add_(lam)
    rhs = (C @ W_bar.T)[S] + lam * W_bar.T[S]
    L, info = torch.linalg.cholesky_ex(HS)
    if int(info) != 0:
        sol = torch.linalg.lstsq(HS, rhs).solution
    else:
        sol = torch.cholesky_solve(rhs, L)
    W[:, S] = sol.T
    return W


def nested_backsolve(H: Tensor, W_bar: Tensor, rank: Tensor, lam: float) -> Callable[[Tensor], Tensor]:
    """``layer_backsolve(H, H, W_bar, keep, lam)`` for many ``keep`` masks from one Cholesky factor L of H + lam I
    over W_bar's nonzero columns, ordered by ``rank`` (q; descending, stable). A ``keep`` that is a leading block
    S of that order (nested removals) reuses it: L_SS is the factor of the block and the solution is
    L_SS^-T (L^T W_bar^T)_S, one triangular solve. Any other ``keep`` falls back to ``layer_backsolve``."""
    cols = (W_bar != 0).any(0).nonzero().squeeze(1)
    perm = cols[torch.argsort(rank[cols], descending=True, stable=True)]
    A = H[perm][:, perm]
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    Z = L.T @ W_bar[:, perm].T

    def solve(keep: Tensor) -> Tensor:
        s = int(keep.sum())
        if int(info) != 0 or not bool(keep[perm[:s]].all()):
            return layer_backsolve(H, H, W_bar, keep, lam)
        W = torch.zeros_like(W_bar)
        if s:
            W[:, perm[:s]] = torch.linalg.solve_triangular(L[:s, :s].mT, Z[:s], upper=True).T
        return W

    return solve


def masked_layer_backsolve(H: Tensor, C: Tensor, W_bar: Tensor, mask: Tensor, lam: float,
                           rows_per_chunk: int | None = None) -> Tensor:
    """Exact minimiser of f(W) above with every weight outside ``mask`` (bool, out x q) fixed at zero: one
    ridge system per output row on its own support (unstructured or block sparsity),
    (H_SS + lam I) w_S = (C W_bar^T)_S,o + lam W_bar_o,S. Each row's system is gathered at the size of its
    support, not q: rows are sorted by support size and solved in batches of k x k systems (k: the largest
    support in the batch; a shorter row's padding gets the identity, so it solves to exactly zero). At density
    d this costs d^3 of the q x q systems (MobileNetV1's 1024 x 1024 pointwise layer at 80 %: 112 s -> ~1 s)."""
    out, q = W_bar.shape
    R = (C @ W_bar.T).T + lam * W_bar  # (out, q)
    W = torch.zeros_like(W_bar)
    mask = mask.reshape(out, q).bool().to(H.device)
    counts = mask.sum(1)
    rows = torch.argsort(counts, descending=True, stable=True)
    rows = rows[counts[rows] > 0]
    # each row's support, in increasing column order, left-aligned (sorting the keys puts True first, stably)
    support = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    s = 0
    while s < rows.numel():
        k = int(counts[rows[s]])
        step = rows_per_chunk or max(1, (1 << 25) // max(k * k, 1))  # ~256 MB of float64 systems at a time
        r = rows[s:s + step]
        idx = support[r, :k]  # (b, k)
        valid = (torch.arange(k, device=H.device).unsqueeze(0) < counts[r].unsqueeze(1)).to(H.dtype)
        idx = idx * valid.long()  # padding points at column 0; its row and column are replaced by the identity
        A = H[idx.unsqueeze(2), idx.unsqueeze(1)] * (valid.unsqueeze(2) * valid.unsqueeze(1))
        A = A + torch.eye(k, dtype=H.dtype, device=H.device) * (lam * valid + (1 - valid)).unsqueeze(1)
        rhs = (R[r.unsqueeze(1), idx] * valid).unsqueeze(2)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info != 0).any()):
            sol = torch.linalg.lstsq(A, rhs).solution
        else:
            sol = torch.cholesky_solve(rhs, L)
        keep = valid.bool()
        W[r.unsqueeze(1).expand_as(idx)[keep], idx[keep]] = sol.squeeze(2)[keep]
        s += step
    return W


def obs_removal_order(Hinv: Sequence[Tensor], W: Sequence[Tensor], blocks: Sequence[Tensor], scale: Sequence[float],
                      alive: Tensor, steps: int, *, max_rounds: int = 64) -> tuple[Tensor, Tensor]:
    """Greedy group-OBS removal of channels shared by several layers (a channel space and its consumers).

    Layer l has inverse Hessian ``Hinv[l]`` (q_l x q_l, damped) and weights ``W[l]`` (out_l x q_l);
    ``blocks[l]`` (channels x b_l) lists the columns of each channel in layer l. Each round removes the alive
    channels whose removal (with the optimal re-fit of the layer's remaining columns) adds the least
    sum_l scale[l] * tr(W_B [(Hinv_BB)]^-1 W_B^T), and updates every Hinv and W (the OBS update). With more
    than ``max_rounds`` steps, a round removes ceil(steps / max_rounds) channels at once (their joint cost is
    exact; within the round it is shared in proportion to the single costs), which bounds the work at
    max_rounds rank-k updates. Returns (order: removed channels, cumulative cost after each removal).
    """
    Hinv = [h.clone() for h in Hinv]
    W = [w.clone() for w in W]
    alive = alive.clone()
    steps = min(steps, int(alive.sum()))
    chunk = max(1, math.ceil(steps / max(1, max_rounds)))
    order: list[int] = []
    cum: list[float] = []
    total = 0.0
    while len(order) < steps:
        cand = alive.nonzero().squeeze(1)
        cost = torch.zeros(cand.numel(), dtype=torch.float64)
        for Hl, Wl, Bl, s in zip(Hinv, W, blocks, scale, strict=True):
            B = Bl[cand]  # (c, b)
            b = B.shape[1]
            Hbb = Hl[B.unsqueeze(2), B.unsqueeze(1)]  # (c, b, b)
            if b == 1:  # one column per channel (a Linear consumer): ||W_:,j||^2 / Hinv_jj, no batched products
                cost += s * (Wl[:, B[:, 0]].pow(2).sum(0) / Hbb.reshape(-1).clamp_min(1e-300)).double()
                continue
            eye = torch.eye(b, dtype=Hl.dtype)
            Hbb_inv = torch.linalg.solve(Hbb + 1e-12 * eye, eye.expand_as(Hbb))
            Wb = Wl[:, B].permute(1, 0, 2)  # (c, out, b)
            cost += s * torch.einsum("cob,cbe,coe->c", Wb, Hbb_inv, Wb).double()
        r = min(chunk, steps - len(order))
        pick = torch.topk(-cost, r).indices if r < cand.numel() else torch.arange(cand.numel())
        pick = pick[torch.argsort(cost[pick])]
        chans = cand[pick]
        joint = 0.0
        for i, (Hl, Wl, Bl, s) in enumerate(zip(Hinv, W, blocks, scale, strict=True)):
            B = Bl[chans].reshape(-1)
            Hbb_inv = torch.linalg.inv(Hl[B][:, B])
            WB = Wl[:, B]
            joint += s * float(torch.einsum("ob,be,oe->", WB, Hbb_inv, WB))
            Wl -= WB @ Hbb_inv @ Hl[B, :]  # OBS update of the remaining columns
            Wl[:, B] = 0.0
            Hl -= Hl[:, B] @ Hbb_inv @ Hl[B, :]
            Hl[B, :] = 0.0
            Hl[:, B] = 0.0
            Hl[B, B] = 1.0  # removed columns: decoupled, never chosen again
            W[i], Hinv[i] = Wl, Hl
        single = cost[pick].clamp_min(0)
        share = single.cumsum(0) / float(single.sum()) if float(single.sum()) > 0 else \
            torch.arange(1, r + 1, dtype=torch.float64) / r
        for c, sh in zip(chans.tolist(), share.tolist(), strict=True):
            order.append(c)
            cum.append(total + max(joint, 0.0) * sh)
        total += max(joint, 0.0)
        alive[chans] = False
    return torch.tensor(order, dtype=torch.long), torch.tensor(cum, dtype=torch.float64)
