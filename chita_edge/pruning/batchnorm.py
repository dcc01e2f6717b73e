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
