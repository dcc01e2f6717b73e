"""Sparsity masks of masked fine-tuning: ``masks_from_zeros`` (True where a prunable weight is non-zero),
``apply_masks`` (zero the masked-out weights in place) and ``_check_masks`` (masks fit the model's parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from chita_edge.core.errors import BadInput
from chita_edge.pruning.layers import PrunableParam


def masks_from_zeros(model: nn.Module, params: list[PrunableParam]) -> dict[str, torch.Tensor]:
    """``{param name: bool mask}``, True where the weight is non-zero (free to train)."""
    named = dict(model.named_parameters())
    return {q.name: named[q.name].detach() != 0 for q in params}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for name, m in masks.items():
        named[name].mul_(m.to(named[name].dtype))


def _check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    named = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in named:
            raise BadInput(f"mask for '{name}': the model has no such parameter")
        if m.shape != named[name].shape or m.dtype != torch.bool:
            raise BadInput(f"mask for '{name}': expected a bool tensor of shape {tuple(named[name].shape)}, "
                           f"got {m.dtype} {tuple(m.shape)}")


__all__ = ["apply_masks", "masks_from_zeros"]
