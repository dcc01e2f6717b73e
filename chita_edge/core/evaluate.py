"""Top-1 accuracy of a model on tensors (batched, no grad, eval mode), and its loss with top-1 in one pass."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent (0-100)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was)
    return 100.0 * correct / max(1, len(x))


@torch.no_grad()
def loss_and_top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (percent) of ``model`` as it is (its mode unchanged), in one forward
    pass over all of ``x`` (the pruning safeguard's and the layer-wise re-fit's checks)."""
    out = model(x)
    return float(nn.functional.cross_entropy(out, y)), 100.0 * float((out.argmax(1) == y).float().mean())


def per_image_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, float]:
    """Per-image cross-entropy (float64) and top-1 (percent) of ``model`` in eval mode, without gradients, in
    batches of ``batch`` (the budget search's held-out choice between pruned models: a paired comparison)."""
    was = model.training
    model.eval()
    losses, hits = [], 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            losses.append(nn.functional.cross_entropy(out, y[i:i + batch], reduction="none").double())
            hits += int((out.argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return torch.cat(losses), 100.0 * hits / len(x)
