"""Gradient statistics for CHITA: the n x p matrix G of mini-batch gradients of the prunable weights.

Row i of G is the gradient of the mean loss over mini-batch i (m samples) at the current weights, with the
model in eval mode. The empirical Fisher is G^T G / n; it is never formed. Rows are computed with
``torch.func`` (vmap over mini-batches of per-batch ``grad``), in chunks to bound memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from chita_edge.core.errors import BadInput, Interrupted
from chita_edge.pruning.layers import PrunableParam, num_weights

Progress = Callable[[str, int, int], None]


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def gradient_memory_bytes(n: int, p: int, dtype: torch.dtype = torch.float32) -> int:
    return n * p * torch.empty((), dtype=dtype).element_size()


def check_memory(n: int, p: int, budget_bytes: int | None = None) -> int:
    """Refuse (BadInput) when the n x p float32 G would not fit in ``budget_bytes`` (default: half of free RAM)."""
    need = gradient_memory_bytes(n, p)
    budget = budget_bytes if budget_bytes is not None else available_memory_bytes() // 2
    if need > budget:
        raise BadInput(
            f"the gradient matrix G needs {need / 2**30:.2f} GiB ({n} gradients x {p} weights, float32) but the "
            f"budget is {budget / 2**30:.2f} GiB; use fewer gradients (--grads) or block mode (--block-size)"
        )
    return need


def sample_indices(num: int, n: int, m: int, seed: int) -> torch.Tensor:
    """n*m training indices, without replacement when the data set is large enough."""
    if num <= 0:
        raise BadInput("the training set is empty; gradients need at least one example")
    g = torch.Generator().manual_seed(seed)
    total = n * m
    if total <= num:
        return torch.randperm(num, generator=g)[:total]
    return torch.randint(0, num, (total,), generator=g)


def collect_gradients(
    model: nn.Module,
    params: list[PrunableParam],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n: int,
    m: int = 1,
    seed: int = 0,
    columns: slice | None = None,
    chunk_samples: int = 256,
    memory_budget_bytes: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Return G (n x p float32, or n x |columns|): row i = grad of the mean loss over mini-batch i of size m.

    The model is put in eval mode (BatchNorm uses its running statistics) and restored afterwards.
    """
    if n < 1 or m < 1:
        raise BadInput(f"--grads and --fisher-batch must be >= 1 (got n={n}, m={m})")
    p = num_weights(params)
    cols = columns or slice(0, p)
    width = len(range(p)[cols])
    check_memory(n, width, memory_budget_bytes)
    was_training = model.training
    model.eval()
    idx = sample_indices(len(x), n, m, seed)
    names = [q.name for q in params]
    named = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in list(model.named_parameters()) + list(model.named_buffers()) if k not in names}
    weights = {k: named[k].detach() for k in names}

    def batch_loss(wd: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **wd}, (xb,))
        return loss_fn(out, yb)

    per_batch = vmap(grad(batch_loss), in_dims=(None, 0, 0))
    G = torch.empty((n, width), dtype=torch.float32)
    rows_per_chunk = max(1, chunk_samples // m)
    done = 0
    try:
        while done < n:
            r = min(rows_per_chunk, n - done)
            sel = idx[done * m:(done + r) * m]
            xb = x[sel].reshape(r, m, *x.shape[1:])
            yb = y[sel].reshape(r, m)
            gd = per_batch(weights, xb, yb)
            flat = torch.cat([gd[k].reshape(r, -1) for k in names], dim=1)
            G[done:done + r] = flat[:, cols]
            done += r
            if progress:
                progress("gradients", done, n)
            if should_stop and should_stop():
                raise Interrupted("interrupted during gradient collection; nothing was written")
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(G.sum())) and not bool(torch.isfinite(G).all()):
        raise BadInput("non-finite gradients (NaN/Inf): check the data (scale, NaNs) and the loss; nothing was written")
    return G


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))
