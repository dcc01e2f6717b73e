"""Gradient statistics for CHITA: the n x p matrix G of mini-batch gradients of the prunable weights.

Row i of G is the gradient of the mean loss over mini-batch i (m samples) at the current weights, with the
model in eval mode. The empirical Fisher is G^T G / n; it is never formed.

How rows are computed, and why not with ``torch.func`` (issue 17): 1000 rows of MLPNet took 1.5 s against 0.3 s
for a plain forward/backward loop. The vmap itself took 0.13 s; the rest was the first call of
``torch.func.grad`` in a process, which imports ``torch._dynamo`` (about 1.0-1.8 s here, paid by every
``chita-edge prune``). Rows of Conv2d and Linear weights are therefore computed without torch.func: one batched
forward over a chunk of samples records each layer's input a; one ``torch.autograd.grad`` of the summed row
losses gives each layer's output gradient delta (no weight gradients are formed); a row of a Linear weight is
sum_j delta_j a_j^T over the row's samples, of a Conv2d weight one grouped weight gradient with the rows folded
into the groups (``torch.nn.grad.conv2d_weight``), except 1x1 convs (groups 1, no padding), whose rows are one
batched matmul: the grouped weight gradient was 5-10x slower for them and made MobileNetV1's rows 1.1-1.2x the plain
loop (eleventh session).
Other weights (Conv1d, padding modes other than zeros, a layer called twice, an input changed in place) use the
vmap path. ``columns`` restricts the work to the weights whose columns it covers (the streamed block mode asks
for one group of blocks at a time). Measured in docs/benchmarks.md (eighth session).
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


def check_memory(n: int, p: int, budget_bytes: int | None = None, *, solver_dtype: torch.dtype = torch.float32,
                 alternative: str = "or block mode (--block-size)") -> int:
    """Refuse (BadInput) when the n x p float32 G, with its copy in ``solver_dtype`` where that is not float32 (the
    cast structured CHITA solves with), would not fit in ``budget_bytes`` (default: half of free RAM).
    ``alternative``: what else the message offers besides fewer gradients."""
    row = gradient_memory_bytes(1, p) + (gradient_memory_bytes(1, p, solver_dtype) if solver_dtype != torch.float32
                                         else 0)
    need = n * row
    budget = budget_bytes if budget_bytes is not None else available_memory_bytes() // 2
    if need > budget:
        fit = budget // max(row, 1)
        what = "float32" if solver_dtype == torch.float32 else f"float32 + its {str(solver_dtype)[6:]} copy"
        raise BadInput(
            f"the gradient matrix G needs {need / 2**30:.2f} GiB ({n} gradients x {p} weights, {what}) but the "
            f"budget is {budget / 2**30:.2f} GiB; use fewer gradients "
            f"({f'--grads {fit} or fewer fit' if fit else 'not even --grads 1 fits'}) {alternative}".rstrip()
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


CHUNK_BYTES = 256 << 20  # per-chunk row gradients of the touched weights (bounds the working memory)


class _NotHookable(Exception):
    """The hooked rows would be wrong for this model (a layer called twice, an input changed in place)."""


def _hookable(model: nn.Module, params: list[PrunableParam]) -> dict[str, tuple[nn.Module, PrunableParam]] | None:
    """{module name: (module, param)} when every weight is a Linear or zero-padded Conv2d weight; else None."""
    mods = dict(model.named_modules())
    out: dict[str, tuple[nn.Module, PrunableParam]] = {}
    for q in params:
        mod = mods.get(q.module_name)
        ok = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros"
                                            and not isinstance(mod.padding, str))
        if not ok or q.name != (f"{q.module_name}.weight" if q.module_name else "weight"):
            return None
        out[q.module_name] = (mod, q)
    return out


def _row_loss_sum(out: torch.Tensor, yb: torch.Tensor, loss_fn: Callable) -> torch.Tensor:
    """Sum over rows of each row's mean loss (rows are independent in eval mode, so d/d(out) is per row)."""
    r, m = yb.shape
    if loss_fn is F.cross_entropy:
        return F.cross_entropy(out, yb.reshape(-1), reduction="sum") / m
    out = out.reshape(r, m, *out.shape[1:])
    return sum(loss_fn(out[i], yb[i]) for i in range(r))  # type: ignore[return-value]


def _weight_rows(mod: nn.Module, a: torch.Tensor, d: torch.Tensor, r: int) -> torch.Tensor:
    """(r, *weight.shape): per row, the weight gradient from the layer input a and output gradient d."""
    if isinstance(mod, nn.Linear):
        A = a.reshape(r, -1, a.shape[-1])
        D = d.reshape(r, -1, d.shape[-1])
        return D.transpose(1, 2) @ A
    B = a.shape[0]
    m = B // r
    W = mod.weight.shape
    if W[2:] == (1, 1) and mod.groups == 1 and tuple(mod.padding) == (0, 0):
        # pointwise: per row, D^T A over the row's samples and positions (one batched matmul); the grouped
        # weight gradient below is 5-10x slower for these on CPU
        A = a[:, :, ::mod.stride[0], ::mod.stride[1]].reshape(r, m, W[1], -1)
        return torch.einsum("rmoh,rmih->roi", d.reshape(r, m, W[0], -1), A).reshape(r, *W)
    # Conv2d: the rows as one grouped weight gradient, rows folded into groups and a row's samples into the batch
    A = a.reshape(r, m, *a.shape[1:]).transpose(0, 1).reshape(m, r * a.shape[1], *a.shape[2:])
    D = d.reshape(r, m, *d.shape[1:]).transpose(0, 1).reshape(m, r * d.shape[1], *d.shape[2:])
    g = torch.nn.grad.conv2d_weight(A, (r * W[0], *W[1:]), D, mod.stride, mod.padding, mod.dilation, r * mod.groups)
    return g.reshape(r, *W)


def _hooked_rows(mods: dict[str, tuple[nn.Module, PrunableParam]], model: nn.Module, xb: torch.Tensor,
                 yb: torch.Tensor, loss_fn: Callable) -> dict[str, torch.Tensor]:
    r, m = yb.shape
    saved: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def hook(name: str) -> Callable:
        def record(mod: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
            if name in saved:
                raise _NotHookable(f"{name} is called twice")
            saved[name] = (inp[0].detach(), inp[0]._version, out)
            return out.clone()  # a later in-place op (ReLU(inplace=True)) must not change the tensor we read
        return record

    weights = [mod.weight for mod, _ in mods.values()]
    req = [w.requires_grad for w in weights]
    handles = [mod.register_forward_hook(hook(name)) for name, (mod, _) in mods.items()]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = model(xb.reshape(r * m, *xb.shape[2:]))
            names = list(saved)
            deltas = torch.autograd.grad(_row_loss_sum(out, yb, loss_fn), [saved[k][2] for k in names],
                                         allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for w, rq in zip(weights, req, strict=True):
            w.requires_grad_(rq)
    res: dict[str, torch.Tensor] = {}
    for k, d in zip(names, deltas, strict=True):
        a, version, _ = saved.pop(k)
        mod, q = mods[k]
        if a._version != version:
            raise _NotHookable(f"the input of {k} was changed in place")
        res[q.name] = torch.zeros((r, *q.shape), device=a.device) if d is None else _weight_rows(mod, a, d, r)
    for mod, q in mods.values():
        if q.name not in res:  # (not setdefault: its argument, r x the layer's zeros, would be built for every layer)
            res[q.name] = torch.zeros((r, *q.shape), device=mod.weight.device)
    return res


def _func_rows(model: nn.Module, params: list[PrunableParam], loss_fn: Callable) -> Callable:
    """Rows by torch.func (vmap over rows of per-row ``grad``), only w.r.t. ``params``."""
    names = [q.name for q in params]
    named = dict(model.named_parameters())
    fixed = {k: v.detach() for k, v in list(model.named_parameters()) + list(model.named_buffers()) if k not in names}
    weights = {k: named[k].detach() for k in names}

    def batch_loss(wd: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **wd}, (xb,))
        return loss_fn(out, yb)

    per_batch = vmap(grad(batch_loss), in_dims=(None, 0, 0))
    return lambda xb, yb: per_batch(weights, xb, yb)


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
    rows: range | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return G (n x p float32, or n x |columns|): row i = grad of the mean loss over mini-batch i of size m.

    The model is put in eval mode (BatchNorm uses its running statistics) and restored afterwards.
    ``rows``: compute only these rows of G (len(rows) x width), with the sample indices of the full run, so that
    shards computed apart can be gathered (``chita_edge.pruning.distributed``). ``device``: where G and the
    computation live (default: the device of the model's weights; batches are moved there).
    """
    if n < 1 or m < 1:
        raise BadInput(f"--grads and --fisher-batch must be >= 1 (got n={n}, m={m})")
    p = num_weights(params)
    cols = columns or slice(0, p)
    width = len(range(p)[cols])
    check_memory(n, width, memory_budget_bytes)
    rows = range(n) if rows is None else rows
    if rows.step != 1 or rows.start < 0 or rows.stop > n:
        raise BadInput(f"rows {rows}: expected a contiguous range inside the {n} rows of G")
    if cols.step not in (None, 1):
        raise BadInput(f"columns {cols}: expected a contiguous slice")
    c0, c1 = range(p)[cols].start if width else 0, (range(p)[cols].start + width) if width else 0
    touched = [q for q in params if q.offset < c1 and q.offset + q.numel > c0]
    was_training = model.training
    model.eval()
    idx = sample_indices(len(x), n, m, seed)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    G = torch.empty((len(rows), width), dtype=torch.float32, device=dev)
    mods = _hookable(model, touched)
    compute = _hooked_rows if mods is not None else _func_rows(model, touched, loss_fn)
    rows_per_chunk = max(1, min(chunk_samples // m, CHUNK_BYTES // (4 * max(1, sum(q.numel for q in touched)))))
    done = 0
    try:
        while done < len(rows):
            r = min(rows_per_chunk, len(rows) - done)
            first = rows.start + done
            sel = idx[first * m:(first + r) * m].to(x.device)
            xb = x[sel].reshape(r, m, *x.shape[1:]).to(dev)
            yb = y[sel].reshape(r, m).to(dev)
            try:
                grads = compute(mods, model, xb, yb, loss_fn) if mods is not None else compute(xb, yb)
            except _NotHookable:
                mods, compute = None, _func_rows(model, touched, loss_fn)
                grads = compute(xb, yb)
            for q in touched:
                lo, hi = max(q.offset, c0), min(q.offset + q.numel, c1)
                G[done:done + r, lo - c0:hi - c0] = grads[q.name].reshape(r, -1)[:, lo - q.offset:hi - q.offset]
            del grads
            done += r
            if progress:
                progress("gradients", done, len(rows))
            if should_stop and should_stop():
                raise Interrupted("interrupted during gradient collection; nothing was written")
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(G.sum())) and not bool(torch.isfinite(G).all()):
        raise BadInput("non-finite gradients (NaN/Inf): check the data (scale, NaNs) and the loss; nothing was written")
    return G


def default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))
