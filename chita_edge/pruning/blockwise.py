"""Block mode in bounded memory (issue 17): a block-diagonal Fisher, streamed over groups of blocks.

The weight vector is cut into blocks of ``block_size`` weights inside each tensor. G (n x p) is never held:
the blocks are gathered into groups whose columns G_g (n x |g|, float32) fit the memory cap, and G_g is
recomputed for each group (gradients w.r.t. that group's weights only, ``collect_gradients(columns=...)``).

1. Allocation pass (skipped when one group holds every block): for each group, the OBS saliency of every weight
   in its block, w_i^2 / [(G_b^T G_b + 2 lam I)^-1]_ii (by Woodbury when n < |b|), the first-order term and the
   weights whose gradient is zero on every sample. One global threshold over the saliencies then gives each
   block its share k_b of the k kept weights (``support="saliency"``); ``support="magnitude"`` keeps the
   reference code's rule (the k largest |w| over the whole model).
2. Solve pass: per group, G_g again, then per block CHITA (IHT + backsolve, ``method="chita"``) with k_b, or
   the exact backsolve on the chosen support (``method="bso"``). The last group of pass 1 is still in memory and
   is solved first.

Recompute against spill (``spill``): the allocation pass may write each G_g to disk in float16 (scaled per
column) for the solve pass to read back: g passes over the data instead of 2g - 1. Measured on MobileNetV1
(docs/benchmarks.md, eighth session): spill 1.33x faster at n = 200, same accuracy, under the cap (one n = 1000
pair at a changing load did not confirm it); it is the default (``PruneConfig.block_stream``), recompute stays
available (exact float32 G_g, no disk). After each solved group the finished weights are written to a state file (``state_path``); an
interrupted run resumes there (``resume=True``) and gives the same weights as one run.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput, Interrupted
from chita_edge.core.io import atomic_path
from chita_edge.pruning.distributed import collect_gradients_split, is_main, solve_split, world
from chita_edge.pruning.gradients import CHUNK_BYTES, available_memory_bytes
from chita_edge.pruning.layers import PrunableParam, num_weights
from chita_edge.solvers import chita as solver

Progress = Callable[[str, int, int], None]
SUPPORTS = ("saliency", "magnitude")
COLUMNS = 1 << 15  # columns per slice where a whole-group temporary would break the cap


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc/self/statm; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def default_memory_bytes() -> int:
    """The cap when --memory-gb is not given: what this process holds now plus half of the free RAM."""
    return rss_bytes() + available_memory_bytes() // 2


@dataclass(frozen=True)
class BlockPlan:
    """How block mode runs under the cap: column ranges of the groups of blocks, passes over the data, bytes."""

    n: int
    block_size: int
    blocks: int
    groups: tuple[tuple[int, int], ...]  # [c0, c1) of each group, whole blocks
    passes: int  # gradient collections over the n*m samples (each restricted to one group's weights)
    group_bytes: int  # G_g of the widest group (float32 while collected, then in the solver's precision)
    workspace_bytes: int  # per-block solver and per-chunk gradient working memory
    base_bytes: int  # the process before the plan (model, data, interpreter)
    memory_bytes: int  # the cap

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = len(self.groups)
        d["blocks_per_group"] = math.ceil(self.blocks / len(self.groups))
        return d

    def describe(self) -> str:
        gib = 2**30
        return (f"block plan: {self.blocks} blocks of <= {self.block_size} weights in {len(self.groups)} group(s) "
                f"(<= {math.ceil(self.blocks / len(self.groups))} blocks each), {self.passes} pass(es) over the "
                f"data; G per group {self.group_bytes / gib:.2f} GiB + workspace {self.workspace_bytes / gib:.2f} "
                f"GiB + process {self.base_bytes / gib:.2f} GiB <= cap {self.memory_bytes / gib:.2f} GiB")


def _agreed(cap: int, base: int) -> tuple[int, int]:
    """Under torch.distributed every rank must plan the same groups: the smallest cap and the largest base."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return cap, base
    t = torch.tensor([-cap, base], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return -int(t[0]), int(t[1])


def block_slices(params: list[PrunableParam], block_size: int) -> list[slice]:
    """Contiguous blocks of ``block_size`` weights inside each tensor (the last block of a tensor may be short)."""
    return [slice(s, min(s + block_size, q.offset + q.numel))
            for q in params for s in range(q.offset, q.offset + q.numel, block_size)]


def vector_bytes(p: int, solver_bytes: int) -> int:
    """Bytes of block mode's per-weight vectors: six in the solver's precision, four masks."""
    return p * (6 * solver_bytes + 4)


def plan_blocks(params: list[PrunableParam], n: int, block_size: int, memory_bytes: int | None = None,
                *, solver_bytes: int = 8, base_bytes: int | None = None, spill: bool = False) -> BlockPlan:
    """Group the blocks so that G_g, the solver's workspace and the process fit ``memory_bytes`` (``spill``:
    the solve pass reads G_g back from disk, so the plan counts one pass per group)."""
    blocks = block_slices(params, block_size)
    cap = default_memory_bytes() if memory_bytes is None else int(memory_bytes)
    base = rss_bytes() if base_bytes is None else base_bytes
    cap, base = _agreed(cap, base)
    p = num_weights(params)
    bs = max(b.stop - b.start for b in blocks)
    # per block: G_b and a few n x |b| copies in the solver's precision, one Gram matrix; per chunk of rows:
    # the row gradients of the touched weights (CHUNK_BYTES at most), the activations, the copy into G_g
    workspace = 3 * n * bs * solver_bytes + 2 * min(n, bs) ** 2 * solver_bytes + 3 * min(CHUNK_BYTES, 256 * 4 * p)
    # and the pass's vectors of p entries, allocated after planning: saliency scores, first-order term, solution,
    # its copies (solver precision), masks (bool). Small next to G on MobileNetV1 (3.2 M weights: 0.08 GiB); on the
    # 25.5 M ResNet50-sized row, before this term, the peak RSS came 0.42 GiB over a 12 GiB cap
    workspace += vector_bytes(p, solver_bytes)
    # G_g is collected in float32 and converted to the solver's precision: both are held for a moment
    per_entry = 4 + (solver_bytes if solver_bytes != 4 else 0)
    room = cap - base - workspace
    if room < n * bs * per_entry:
        need = (base + workspace + n * bs * per_entry) / 2**30
        raise BadInput(f"--memory-gb {cap / 2**30:.2f}: block mode needs at least {need:.2f} GiB here (process "
                       f"{base / 2**30:.2f} GiB, one block of {bs} weights x {n} gradients); raise --memory-gb, or "
                       "lower --block-size or --grads")
    width = room // (n * per_entry)
    groups: list[tuple[int, int]] = []
    c0 = blocks[0].start
    for b in blocks:
        if b.stop - c0 > width:
            groups.append((c0, b.start))
            c0 = b.start
    groups.append((c0, blocks[-1].stop))
    g = len(groups)
    widest = max(c1 - c0 for c0, c1 in groups)
    return BlockPlan(n=n, block_size=block_size, blocks=len(blocks), groups=tuple(groups),
                     passes=g if (spill or g == 1) else 2 * g - 1, group_bytes=n * widest * per_entry, workspace_bytes=workspace,
                     base_bytes=base, memory_bytes=cap)


def obs_saliency(Gb: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
    """w_i^2 / [(G_b^T G_b + 2 lam I)^-1]_ii: the exact increase (times 2) of the block's quadratic model when
    weight i alone is removed and the others re-fit (OBS). Woodbury when n < |b|:
    diag H^-1 = (1 - colsum(G_b * (2 lam I + G_b G_b^T)^-1 G_b)) / (2 lam)."""
    n, b = Gb.shape
    if n < b:
        K = Gb @ Gb.T
        K.diagonal().add_(2.0 * lam)
        L = torch.linalg.cholesky(K)
        diag = (1.0 - (Gb * torch.cholesky_solve(Gb, L)).sum(0)) / (2.0 * lam)
    else:
        H = Gb.T @ Gb
        H.diagonal().add_(2.0 * lam)
        diag = torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal()
    return w * w / diag.clamp_min(torch.finfo(diag.dtype).tiny)


@dataclass
class _Stage:
    """What the allocation pass leaves for the solve pass (and what a resumed run reads back)."""

    support: torch.Tensor  # bool (p,): the k kept weights
    a: torch.Tensor | None  # first-order term (p,) or None
    inert: int


STATE_KEYS = ("sparsity", "method", "stages", "n_grads", "fisher_batch", "l2", "first_order", "block_size", "seed",
              "dtype", "block_support", "max_iter", "tol", "prune_inert", "keep_pruned", "start_sparsity")


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise BadInput(f"{path}: not a block-mode state file ({type(e).__name__}); remove it to start over") from e


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def solve_streamed(model: nn.Module, params: list[PrunableParam], data: Dataset, *, w_bar: torch.Tensor, k: int,
                   lam: float, allowed: torch.Tensor | None, method: str, support: str, first_order: bool,
                   prune_inert: bool, n: int, m: int, seed: int, max_iter: int, tol: float, plan: BlockPlan,
                   dtype: torch.dtype, progress: Progress | None = None,
                   state: dict[str, Any] | None = None, spill: str | os.PathLike | None = None,
                   on_group: Callable[[dict[str, Any]], None] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """One stage of block mode: the pruned weight vector and the stage's info (passes, seconds, inert weights).

    ``state``: what an interrupted run of this stage saved (support and finished groups): the allocation pass is
    skipped and the finished groups are kept. ``on_group(state)`` is called after each solved group with the
    state to save. ``spill``: a folder where the allocation pass writes each group's G_g in float16 (scaled per
    column) for the solve pass to read back instead of recomputing it."""
    if support not in SUPPORTS:
        raise BadInput(f"block support {support!r}: expected one of {', '.join(SUPPORTS)}")
    p = num_weights(params)
    blocks = block_slices(params, plan.block_size)

    seconds = [0.0]

    def grads(c0: int, c1: int) -> torch.Tensor:
        t = time.perf_counter()
        G = collect_gradients_split(model, params, data.x_train, data.y_train, n=n, m=m, seed=seed,
                                    columns=slice(c0, c1), memory_budget_bytes=plan.group_bytes).to(dtype)
        seconds[0] += time.perf_counter() - t
        return G

    passes = 0
    resident: tuple[int, torch.Tensor] | None = None
    if state is None:
        for old in Path(spill).glob("g*.f16") if spill is not None else ():  # an earlier stage's
            old.unlink()
        score = torch.empty(p, dtype=dtype, device=w_bar.device)  # on w_bar's device (--device)
        moving = torch.ones(p, dtype=torch.bool, device=w_bar.device)
        a = torch.zeros(p, dtype=dtype, device=w_bar.device) if first_order else None
        for gi, (c0, c1) in enumerate(plan.groups):
            resident = Gg = None  # the previous group goes before the next one is computed
            Gg = grads(c0, c1)
            passes += 1
            for j in range(0, c1 - c0, COLUMNS):  # by slices of columns: no n x |g| temporary
                moving[c0 + j:min(c0 + j + COLUMNS, c1)] = Gg[:, j:j + COLUMNS].ne(0).any(0)
            if a is not None:
                a[c0:c1] = Gg.sum(0) / m
            if support == "saliency":
                for b in blocks:
                    if c0 <= b.start < c1:
                        score[b] = obs_saliency(Gg[:, b.start - c0:b.stop - c0], w_bar[b], lam)
            if spill is not None and gi < len(plan.groups) - 1:
                _spill_write(Path(spill) / f"g{gi}", Gg)
            resident = (gi, Gg)
            if progress:
                progress("block groups (allocation)", gi + 1, len(plan.groups))
        if support == "magnitude":
            score = w_bar.abs()
        ok = torch.ones(p, dtype=torch.bool, device=w_bar.device) if allowed is None else allowed.clone()
        inert = 0
        if prune_inert:  # as in the one-G path: weights that never move are pruned before any other
            useful = ok & moving
            if k <= int(useful.sum()) < int(ok.sum()):
                inert = p - int(moving.sum())
                ok = useful
        stage = _Stage(solver.top_k_mask(score, k, ok), a, inert)
        state = {"support": stage.support, "a": a, "inert": inert, "done": [], "w": torch.zeros_like(w_bar)}
    else:
        stage = _Stage(state["support"], state["a"], int(state["inert"]))
    w = state["w"]
    order = list(range(len(plan.groups)))
    if resident is not None:  # solve the group still in memory first
        order = [resident[0]] + [g for g in order if g != resident[0]]
    todo = [g for g in order if g not in state["done"]]
    for count, gi in enumerate(todo, start=len(state["done"]) + 1):
        c0, c1 = plan.groups[gi]
        if resident is not None and resident[0] == gi:
            Gg = resident[1]
        elif spill is not None and (Path(spill) / f"g{gi}.f16").exists():
            Gg = _spill_read(Path(spill) / f"g{gi}", dtype).to(w_bar.device)
        else:
            Gg = grads(c0, c1)
            passes += 1
        resident = None
        inside = [b for b in blocks if c0 <= b.start < c1]

        def solve_block(b: slice, Gg: torch.Tensor = Gg, c0: int = c0) -> torch.Tensor | None:
            sb = stage.support[b]
            kb = int(sb.sum())
            if kb == 0:
                return None
            Gb = Gg[:, b.start - c0:b.stop - c0]
            ab = stage.a[b] if stage.a is not None else None
            if method == "bso" or kb == b.stop - b.start:
                return solver.backsolve(Gb, w_bar[b], sb, lam, ab)
            alb = allowed[b] if allowed is not None else None
            return solver.chita(Gb, w_bar[b], kb, lam, a=ab, allowed=alb, max_iter=max_iter, tol=tol).w

        w[c0:c1] = solve_split(inside, solve_block, w_bar)[c0:c1]
        del Gg, solve_block  # (its default argument holds G_g too)
        state["done"] = state["done"] + [gi]
        if on_group is not None:
            on_group(state)
        if progress:
            progress("block groups (solve)", count, len(plan.groups))
    info = {"plan": plan.to_dict(), "passes": passes, "support": support, "inert_weights": stage.inert,
            "gradients_s": seconds[0]}
    return w, info


@contextmanager
def spill_folder(state_path: str | os.PathLike | None) -> Iterator[Path]:
    """Where one stage spills its G_g: beside the state file (kept when interrupted, for --resume to read the
    same float16 columns back, so that a resumed run equals one run), else a temporary folder."""
    if state_path is None:
        with tempfile.TemporaryDirectory(prefix="chita-edge-G-") as tmp:
            yield Path(tmp)
        return
    rank, size = world()
    folder = Path(f"{state_path}.G" + (f"-rank{rank}" if size > 1 else ""))  # each process spills its own copy
    folder.mkdir(exist_ok=True)
    yield folder  # not reached after an exception: the folder stays for --resume
    shutil.rmtree(folder, ignore_errors=True)


def _spill_write(path: Path, G: torch.Tensor) -> None:
    """G_g in float16, each column scaled by its largest |entry|, written by slices of columns with plain writes
    (a memory map would count the file's pages in this process's resident memory, against the cap)."""
    scale = torch.cat([G[:, j:j + COLUMNS].abs().amax(0) for j in range(0, G.shape[1], COLUMNS)])
    scale = scale.clamp_min(torch.finfo(torch.float32).tiny).float()
    np.save(f"{path}.scale.npy", scale.cpu().numpy())
    with open(f"{path}.f16", "wb") as f:
        for j in range(0, G.shape[1], COLUMNS):
            f.write((G[:, j:j + COLUMNS].float() / scale[j:j + COLUMNS]).to(torch.float16).cpu().numpy().tobytes())


def _spill_read(path: Path, dtype: torch.dtype) -> torch.Tensor:
    scale = torch.from_numpy(np.load(f"{path}.scale.npy")).to(dtype)
    n = Path(f"{path}.f16").stat().st_size // (2 * len(scale))
    G = torch.empty((n, len(scale)), dtype=dtype)
    with open(f"{path}.f16", "rb") as f:
        for j in range(0, len(scale), COLUMNS):
            c = min(COLUMNS, len(scale) - j)
            part = np.frombuffer(f.read(2 * n * c), dtype=np.float16).reshape(n, c)
            G[:, j:j + c] = torch.from_numpy(part.copy()).to(dtype) * scale[j:j + c]
    return G


def read_resume(path: str | os.PathLike, cfg: dict[str, Any]) -> dict[str, Any]:
    """The state an interrupted block-mode run left at ``path`` (checked against ``cfg``): its stage, the model
    at that stage's start, the earlier stages' reports, the plan and the finished groups."""
    if not Path(path).exists():
        raise BadInput(f"{path}: no block-mode state to resume from (run without --resume to start)")
    saved = load_state(path)
    if not isinstance(saved, dict) or saved.get("config") != {k: cfg.get(k) for k in STATE_KEYS}:
        raise BadInput(f"{path}: written with other settings; resume with the same options or remove it")
    return saved


def run_stage(model: nn.Module, params: list[PrunableParam], data: Dataset, *, stage_index: int,
              cfg: dict[str, Any], plan: BlockPlan, stages: list[dict[str, Any]],
              state_path: str | os.PathLike | None, state: dict[str, Any] | None,
              **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """``solve_streamed`` with the state file: written after each solved group (with the model at this stage's
    start and the earlier stages' reports); Ctrl-C keeps the finished groups and says how to continue."""
    start_model = {k: v.detach().clone() for k, v in model.state_dict().items()} if state_path else None

    def save(st: dict[str, Any]) -> None:
        if state_path is not None and is_main():  # one process writes the state (all of them read it)
            save_state(state_path, {"config": {k: cfg.get(k) for k in STATE_KEYS}, "stage": stage_index,
                                    "plan": asdict(plan), "model": start_model, "stages": stages, "state": st})

    try:
        return solve_streamed(model, params, data, plan=plan, state=state, on_group=save, **kwargs)
    except KeyboardInterrupt as e:
        kept = state_path is not None and Path(state_path).exists()
        where = f"; the finished block groups are kept in {state_path} (rerun with --resume)" if kept else ""
        raise Interrupted(f"interrupted during block mode{where}") from e
