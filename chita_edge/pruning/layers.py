"""Prunable weights of a model: found once with a ``filter_fn(module, name)``, flattened in a fixed order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from chita_edge.core.errors import BadInput


@dataclass(frozen=True)
class PrunableParam:
    name: str  # parameter name in the state dict, e.g. "layer1.0.conv1.weight"
    module_name: str
    shape: tuple[int, ...]
    offset: int  # start in the flat vector w_bar

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


def find_prunable(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool]) -> list[PrunableParam]:
    """The weights of every module accepted by ``filter_fn`` (conv and linear by default), in module order."""
    out: list[PrunableParam] = []
    offset = 0
    for mname, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2 and filter_fn(mod, mname):
            out.append(PrunableParam(f"{mname}.weight" if mname else "weight", mname, tuple(w.shape), offset))
            offset += w.numel()
    if not out:
        raise BadInput("model has no prunable layers (no Conv/Linear weights accepted by the filter)")
    return out


def num_weights(params: list[PrunableParam]) -> int:
    return params[-1].offset + params[-1].numel


def flatten_weights(model: nn.Module, params: list[PrunableParam]) -> torch.Tensor:
    sd = dict(model.named_parameters())
    return torch.cat([sd[p.name].detach().reshape(-1) for p in params])


@torch.no_grad()
def set_weights(model: nn.Module, params: list[PrunableParam], w: torch.Tensor) -> None:
    sd = dict(model.named_parameters())
    for p in params:
        t = sd[p.name]
        t.copy_(w[p.slice].view(p.shape).to(t.dtype))


def layer_sparsity(model: nn.Module, params: list[PrunableParam]) -> dict[str, float]:
    sd = dict(model.named_parameters())
    return {p.name: float((sd[p.name] == 0).sum()) / p.numel for p in params}
