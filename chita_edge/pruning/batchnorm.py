"""BatchNorm running statistics re-estimated at changed weights: after a pruning stage, after channels were
removed, and at the end of fine-tuning. One implementation for all of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, order: torch.Tensor, *, batch_size: int,
                         batches: int | None = None,
                         transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> bool:
    """Reset every BatchNorm's running statistics (that tracks them) and re-estimate them as a cumulative
    average over train-mode forwards of ``x[order]`` in consecutive batches of ``batch_size`` (``batches`` of
    them, wrapping around ``order``; default: one pass). ``transform(batch, b)`` (e.g. augmentation) is
    applied to batch ``b``. Returns False, and changes nothing, when there is no BatchNorm."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    n = len(order)
    if batches is None:
        batches = -(-n // batch_size)
    if not bns or batches <= 0 or n == 0:
        return False
    was = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    bs = min(batch_size, n)
    try:
        for b in range(batches):
            start = (b * bs) % n
            idx = order[start:start + bs]
            if len(idx) < 2 and b > 0:  # BatchNorm needs more than one value per channel
                break
            xb = x[idx]
            model(transform(xb, b) if transform is not None else xb)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was)
    return True


def keyed_generator(*key: int) -> torch.Generator:
    """A generator whose stream depends on the key only (seed, epoch, step, ...)."""
    h = 0x9E3779B97F4A7C15
    for k in key:
        h = (h * 1_000_003 + int(k) + 0x632BE59BD9B4E019) % (1 << 63)
    return torch.Generator().manual_seed(h)


def reestimate_on_random_batches(model: nn.Module, x: torch.Tensor, *, batches: int, batch_size: int, seed: int,
                                 transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> bool:
    """``reestimate_batchnorm`` over ``batches`` random training batches in the order keyed by ``seed``."""
    order = torch.randperm(len(x), generator=keyed_generator(seed, -1))
    return reestimate_batchnorm(model, x, order, batch_size=batch_size, batches=batches, transform=transform)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm running statistic (and its batch counter), by buffer name."""
    return {k: v.detach().clone() for k, v in model.named_buffers() if k.endswith(_STATISTICS)}


@torch.no_grad()
def load_batchnorm_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (from ``batchnorm_buffers``) back buffer by buffer: a partial ``load_state_dict`` loses the
    modules' version metadata, which some refuse (torchvision's MNASNet)."""
    for k, v in model.named_buffers():
        if k in saved:
            v.copy_(saved[k])


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    total = 0.0
    for i in range(0, len(x), batch):
        total += float(nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum"))
    return total / max(1, len(x))


@torch.no_grad()
def reestimate_if_better(model: nn.Module, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, *, samples: int,
                         batch_size: int, batches: int | None = None, check_samples: int = 2000,
                         always: bool = False) -> dict[str, object] | None:
    """Re-estimate BatchNorm statistics on ``x[perm[:samples]]`` (``batches`` batches of ``batch_size``, default one
    pass; at most half of ``perm``) and keep them only if the cross-entropy on the next ``check_samples`` inputs of
    ``perm`` -- held out from the re-estimation -- drops;
    otherwise the previous statistics are restored (``always``: kept regardless, for ablations). ``None`` when the
    model has no BatchNorm. The returned record says which statistics were kept and the two losses."""
    if not has_batchnorm(model):
        return None
    samples = min(samples, max(1, len(perm) // 2))  # a small data set: half of it is held out for the check
    order = perm[:samples]
    check = perm[samples:samples + check_samples]
    held_out = len(check) > 0
    if not held_out:
        check = order[:check_samples]
    was = model.training
    model.eval()
    xc, yc = x[check], y[check]
    before = batchnorm_buffers(model)
    loss_before = _loss(model, xc, yc)
    reestimate_batchnorm(model, x, order, batch_size=batch_size, batches=batches)
    model.eval()
    loss_after = _loss(model, xc, yc)
    kept = always or loss_after < loss_before
    if not kept:
        load_batchnorm_buffers(model, before)
    model.train(was)
    return {"kept": "re-estimated" if kept else "previous", "loss_before": loss_before, "loss_after": loss_after,
            "check_samples": len(check), "held_out": held_out}
