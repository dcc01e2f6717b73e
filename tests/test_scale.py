"""Issue 17: gradient rows without torch.func, and block mode streamed over groups of blocks in bounded memory
(the plan, the memory cap, the OBS-saliency support, Ctrl-C and --resume)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, small_cnn, tiny_mlp
from torch import nn

from chita_edge.core.errors import BadInput, Interrupted
from chita_edge.pruning import blockwise
from chita_edge.pruning import gradients as gradmod
from chita_edge.pruning.gradients import collect_gradients
from chita_edge.pruning.layers import find_prunable, flatten_weights
from chita_edge.pruning.prune import PruneConfig, prune_weights
from chita_edge.solvers import chita as solver
from chita_edge.solvers.group_chita import masked_layer_backsolve


def _default(mod: nn.Module, name: str) -> bool:
    return isinstance(mod, (nn.Conv2d, nn.Linear))


class _Depthwise(nn.Module):
    """A strided, dilated depthwise conv, a grouped conv and a Linear on 3-D input: the hooked path's cases."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=4, bias=False)
        self.gc = nn.Conv2d(4, 6, 1, groups=2)
        self.seq = nn.Linear(4, 5)
        self.fc = nn.Linear(6 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.gc(torch.relu(self.dw(x.repeat(1, 4, 1, 1)))))  # (N, 6, 4, 4)
        h = self.seq(h.flatten(2)[:, :, :4])  # Linear over (N, 6, 4)
        return self.fc(h.flatten(1))


class _Pointwise(nn.Module):
    """Strided and plain 1x1 convs (groups 1, no padding): the batched-matmul case of the hooked path."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pw1 = nn.Conv2d(1, 5, 1, stride=2, bias=False)
        self.pw2 = nn.Conv2d(5, 3, 1)
        self.fc = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.pw2(torch.relu(self.pw1(x)))).flatten(1))


class _Twice(nn.Module):
    """One Linear applied twice (shared weights): its rows come from torch.func."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.relu(self.a(x.flatten(1))))))


@pytest.mark.parametrize("make", [lambda: tiny_mlp(), lambda: small_cnn(), _Depthwise, _Pointwise, _Twice])
@pytest.mark.parametrize("m", [1, 3])
def test_hooked_rows_equal_torch_func_rows(digits, monkeypatch, make, m):
    model = make()
    params = find_prunable(model, _default)
    x, y = digits.x_train[:200], digits.y_train[:200]
    hooked = collect_gradients(model, params, x, y, n=20, m=m, chunk_samples=21)
    p = hooked.shape[1]
    part = collect_gradients(model, params, x, y, n=20, m=m, columns=slice(p // 3, p - 5))
    monkeypatch.setattr(gradmod, "_hookable", lambda *a: None)
    func = collect_gradients(model, params, x, y, n=20, m=m)
    scale = float(func.abs().max())
    assert scale > 0
    assert float((hooked - func).abs().max()) <= 1e-5 * scale
    assert float((part - func[:, p // 3:p - 5]).abs().max()) <= 1e-5 * scale


def _plan(params, n, bs, groups_of_blocks, monkeypatch):
    """A plan whose groups hold ``groups_of_blocks`` blocks, independent of this process's RSS."""
    monkeypatch.setattr(blockwise, "rss_bytes", lambda: 0)
    monkeypatch.setattr(blockwise, "COLUMNS", 37)  # the slices of columns that bound the temporaries, exercised
    one = blockwise.plan_blocks(params, n, bs, 1 << 40)
    cap = one.workspace_bytes + groups_of_blocks * n * bs * 12  # float32 while collected + float64 G_g
    return blockwise.plan_blocks(params, n, bs, cap)


def _stream(model, params, digits, plan, support, method="chita"):
    w_bar = flatten_weights(model, params).double()
    k = int(0.3 * w_bar.numel())
    return blockwise.solve_streamed(model, params, digits, w_bar=w_bar, k=k, lam=0.03 * 64 / 2, allowed=None,
                                    method=method, support=support, first_order=True, prune_inert=True, n=64, m=1,
                                    seed=0, max_iter=100, tol=1e-7, plan=plan, dtype=torch.float64)


@pytest.mark.parametrize("support", ["saliency", "magnitude"])
def test_streamed_block_mode_equals_in_memory_block_mode(digits, monkeypatch, support):
    model = small_cnn()
    params = find_prunable(model, _default)
    bs = 100
    whole = _plan(params, 64, bs, 10_000, monkeypatch)
    split = _plan(params, 64, bs, 3, monkeypatch)
    assert len(whole.groups) == 1 and whole.passes == 1
    assert len(split.groups) > 2 and split.passes == 2 * len(split.groups) - 1  # the cap changes passes ...
    w1, info1 = _stream(model, params, digits, whole, support)
    w2, info2 = _stream(model, params, digits, split, support)
    assert info2["passes"] == split.passes
    assert torch.equal(w1 != 0, w2 != 0)  # ... not the result
    assert float((w1 - w2).abs().max()) <= 1e-8 * float(w1.abs().max())
    # the in-memory reference: the whole G, the support chosen on it, CHITA per block on its columns
    G = collect_gradients(model, params, digits.x_train, digits.y_train, n=64).double()
    w_bar = flatten_weights(model, params).double()
    lam, k = 0.03 * 64 / 2, int(0.3 * w_bar.numel())
    blocks = blockwise.block_slices(params, bs)
    if support == "magnitude":
        score = w_bar.abs()
    else:
        score = torch.cat([blockwise.obs_saliency(G[:, b], w_bar[b], lam) for b in blocks])
    keep = solver.top_k_mask(score, k, G.ne(0).any(0))
    a = G.sum(0)
    ref = torch.zeros_like(w_bar)
    for b in blocks:
        kb = int(keep[b].sum())
        if 0 < kb < b.stop - b.start:
            ref[b] = solver.chita(G[:, b], w_bar[b], kb, lam, a=a[b], max_iter=100, tol=1e-7).w
        elif kb:
            ref[b] = solver.backsolve(G[:, b], w_bar[b], keep[b], lam, a[b])
    assert torch.equal(ref != 0, w1 != 0)
    assert float((ref - w1).abs().max()) <= 1e-8 * float(w1.abs().max())


def test_obs_saliency_woodbury_equals_direct_inverse():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, dtype=torch.float64, generator=g)
    for n in (10, 50):  # n < |b|: Woodbury; n >= |b|: the direct inverse
        G = torch.randn(n, 30, dtype=torch.float64, generator=g)
        H = G.T @ G + 2 * 0.7 * torch.eye(30, dtype=torch.float64)
        assert torch.allclose(blockwise.obs_saliency(G, w, 0.7), w**2 / torch.linalg.inv(H).diagonal())


def test_saliency_support_beats_magnitude_on_the_quadratic_model(digits, monkeypatch):
    model = small_cnn()
    params = find_prunable(model, _default)
    plan = _plan(params, 64, 100, 4, monkeypatch)
    G = collect_gradients(model, params, digits.x_train, digits.y_train, n=64).double()
    w_bar = flatten_weights(model, params).double()
    a = G.sum(0)
    f = {}
    for s in blockwise.SUPPORTS:  # the block-diagonal model that both supports are chosen for, backsolved
        w = _stream(model, params, digits, plan, s, "bso")[0]
        f[s] = sum(solver.objective(G[:, b], w[b], w_bar[b], 0.03 * 64 / 2, a[b]) for b in blockwise.block_slices(params, 100))
    assert f["saliency"] < f["magnitude"]


def test_plan_counts_the_per_weight_vectors_of_the_pass(monkeypatch):
    # the vectors of p entries allocated after planning (scores, solution, masks) are part of the cap: a cap that
    # holds G for every block but not those vectors needs more groups
    monkeypatch.setattr(blockwise, "rss_bytes", lambda: 0)
    params = find_prunable(small_cnn(), _default)
    p = sum(q.numel for q in params)
    n, bs = 64, 100
    one = blockwise.plan_blocks(params, n, bs, 1 << 40, solver_bytes=4)
    assert one.workspace_bytes >= blockwise.vector_bytes(p, 4) == p * 28
    fits_g_only = one.workspace_bytes - blockwise.vector_bytes(p, 4) + n * p * 4
    assert len(blockwise.plan_blocks(params, n, bs, fits_g_only, solver_bytes=4).groups) > 1
    assert len(blockwise.plan_blocks(params, n, bs, fits_g_only + blockwise.vector_bytes(p, 4),
                                     solver_bytes=4).groups) == 1


def test_plan_refuses_a_cap_below_one_block(monkeypatch):
    monkeypatch.setattr(blockwise, "rss_bytes", lambda: 0)
    params = find_prunable(tiny_mlp(), _default)
    with pytest.raises(BadInput, match="--memory-gb 0.00: block mode needs at least"):
        blockwise.plan_blocks(params, 1000, 500, 1 << 20)


@pytest.mark.parametrize("stream", ["spill", "recompute"])
def test_interrupted_block_mode_resumes_to_the_same_result(digits, monkeypatch, tmp_path, stream):
    monkeypatch.setattr(blockwise, "rss_bytes", lambda: 0)
    params = find_prunable(small_cnn(), _default)
    plan = _plan(params, 64, 100, 3, monkeypatch)
    cfg = PruneConfig(sparsity=0.7, method="chita++", stages=2, n_grads=64, block_size=100,
                      memory_budget_gb=plan.memory_bytes / 2**30, max_iter=50, block_stream=stream)
    ref = small_cnn()
    prune_weights(ref, params, digits, cfg)
    state = tmp_path / "p.pt.block-state"

    def stop_in_stage_two(stage, done, total):
        if stage == "stages" and done == 1:
            stop_in_stage_two.stage = 2
        if stage == "block groups (solve)" and getattr(stop_in_stage_two, "stage", 1) == 2 and done == 2:
            raise KeyboardInterrupt

    model = small_cnn()
    with pytest.raises(Interrupted, match="kept in .*block-state.*--resume"):
        prune_weights(model, params, digits, cfg, stop_in_stage_two, state_path=state)
    saved = blockwise.load_state(state)
    assert saved["stage"] == 1 and len(saved["state"]["done"]) == 2
    assert (tmp_path / "p.pt.block-state.G").is_dir() == (stream == "spill")  # the spilled G_g, kept
    fresh = small_cnn()
    announced = []
    rep = prune_weights(fresh, params, digits, cfg, state_path=state, resume=True, announce=announced.append)
    assert "resumed at stage 2" in announced[0]
    # the finished groups are not solved again; the others are read back from the spill, or recomputed
    assert rep.stages[1]["passes"] == (0 if stream == "spill" else len(plan.groups) - 2)
    assert not (tmp_path / "p.pt.block-state.G").exists()
    assert torch.equal(flatten_weights(fresh, params), flatten_weights(ref, params))
    with pytest.raises(BadInput, match="written with other settings"):
        prune_weights(small_cnn(), params, digits, PruneConfig(**{**cfg.__dict__, "l2": 0.1}), state_path=state,
                      resume=True)


def test_cli_prints_the_plan_and_records_it_in_json(cli, tmp_path):
    src = tmp_path / "m.py"
    src.write_text(TINY)
    out = tmp_path / "p.pt"
    r = cli("prune", f"{src}:mlp", "--data", "digits", "--sparsity", "0.8", "--method", "chita", "--grads", "32",
            "--block-size", "256", "--memory-gb", "8", "--out", out, "--json")
    assert r.code == 0, r.stderr
    assert "block plan:" in r.stderr and "cap 8.00 GiB" in r.stderr
    plan = r.json()["stages"][0]["plan"]
    assert plan["memory_bytes"] == 8 * 2**30 and plan["groups"] == 1 and plan["passes"] == 1
    assert plan["blocks"] == 8 + 2 and r.json()["stages"][0]["support"] == "saliency"
    assert not (tmp_path / "p.pt.block-state").exists()  # removed once the checkpoint is written
    bad = cli("prune", f"{src}:mlp", "--data", "digits", "--sparsity", "0.8", "--memory-gb", "8",
              "--out", tmp_path / "q.pt")
    assert bad.code == 2 and "--memory-gb caps block mode" in bad.stderr
    again = cli("prune", f"{src}:mlp", "--data", "digits", "--sparsity", "0.8", "--block-size", "256",
                "--resume", "--out", tmp_path / "r.pt")
    assert again.code == 2 and "no block-mode state to resume from" in again.stderr


def test_spilled_g_gives_the_recomputed_result(digits, monkeypatch, tmp_path):
    model = small_cnn()
    params = find_prunable(model, _default)
    plan = _plan(params, 64, 100, 3, monkeypatch)
    w1, info1 = _stream(model, params, digits, plan, "saliency", "bso")
    w_bar = flatten_weights(model, params).double()
    w2, info2 = blockwise.solve_streamed(
        model, params, digits, w_bar=w_bar, k=int(0.3 * w_bar.numel()), lam=0.03 * 64 / 2, allowed=None,
        method="bso", support="saliency", first_order=True, prune_inert=True, n=64, m=1, seed=0, max_iter=100,
        tol=1e-7, plan=plan, dtype=torch.float64, spill=tmp_path)
    assert info2["passes"] == len(plan.groups) < info1["passes"]  # one pass over the data; G_g read back
    assert len(list(tmp_path.glob("g*.f16"))) == len(plan.groups) - 1  # the last group stays in memory
    assert torch.equal(w1 != 0, w2 != 0)
    assert float((w1 - w2).abs().max()) <= 1e-2 * float(w1.abs().max())  # float16 G


def _masked_backsolve_in_q_by_q(H, C, W_bar, mask, lam):
    """The re-fit's per-row systems as they were solved before: each embedded in q x q (identity off-support)."""
    R = (C @ W_bar.T).T + lam * W_bar
    m = mask.to(H.dtype)
    A = H.unsqueeze(0) * (m.unsqueeze(2) * m.unsqueeze(1)) + torch.eye(H.shape[0], dtype=H.dtype) * (lam * m + 1 - m).unsqueeze(1)
    return torch.cholesky_solve((R * m).unsqueeze(2), torch.linalg.cholesky(A)).squeeze(2) * m


@pytest.mark.parametrize("chunk", [None, 3])
def test_refit_systems_at_support_size_equal_the_q_by_q_systems(chunk, monkeypatch):
    """The layer-wise re-fit solves each row at the size of its support (sorted, batched, padded): the same
    weights as the q x q systems within 1e-6 relative, zeros off the mask, an empty row stays empty."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 40, generator=g, dtype=torch.float64)
    Xd = X + 0.1 * torch.randn(400, 40, generator=g, dtype=torch.float64)
    W_bar = torch.randn(17, 40, generator=g, dtype=torch.float64)
    dens = torch.rand(17, 1, generator=g)  # rows from empty to full support
    mask = torch.rand(17, 40, generator=g) < dens
    mask[0], mask[1] = False, True
    H, C, lam = X.T @ X, X.T @ Xd, 0.05 * float((X.T @ X).diagonal().mean())
    sizes: list[int] = []
    chol = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: (sizes.append(A.shape[-1]), chol(A))[1])
    W = masked_layer_backsolve(H, C, W_bar, mask, lam, rows_per_chunk=chunk)
    monkeypatch.undo()
    assert sizes[0] == 40 and sizes == sorted(sizes, reverse=True)  # largest support first
    assert chunk is None or sizes[-1] < 20  # batches of short rows solve small systems (q x q before)
    want = _masked_backsolve_in_q_by_q(H, C, W_bar, mask, lam)
    assert bool((W[~mask] == 0).all()) and bool((W[0] == 0).all())
    assert float((W - want).norm() / want.norm()) < 1e-6
    assert float((W - want).abs().max()) <= 1e-6 * float(want.abs().max())
