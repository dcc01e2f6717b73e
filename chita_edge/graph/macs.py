"""MAC counts (``count_macs``): multiply-accumulates per sample of every Conv and Linear module, measured with
forward hooks (works on models ``torch.fx`` cannot trace)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from chita_edge.core.errors import BadInput
from chita_edge.graph.trace import CONV, as_args, eval_no_grad, first_line

__all__ = ["count_macs"]


def count_macs(model: nn.Module, example_input: Any) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv and Linear module, by module name, in call order.

    Conv: ``output elements * in_channels / groups * prod(kernel_size)``; Linear: ``output elements *
    in_features``; both divided by the batch size (dim 0 of the first input). A module called several times
    counts every call. Measured with forward hooks on ``example_input`` (eval mode), so it also works on models
    that ``torch.fx`` cannot trace. Functional convs/matmuls (no module) are not counted.
    """
    args = as_args(example_input)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None or first.dim() == 0 or first.shape[0] == 0:
        raise BadInput("count_macs: example_input must be a batched tensor (N, ...) or a tuple starting with one")
    n = first.shape[0]
    macs: dict[str, int] = {}
    handles = []

    def hook(name: str, mod: nn.Module):
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            if isinstance(mod, nn.Linear):
                per_out = mod.in_features
            else:
                per_out = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            macs[name] = macs.get(name, 0) + out.numel() * per_out // n
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, *CONV)):
            handles.append(mod.register_forward_hook(hook(name, mod)))
    try:
        with eval_no_grad(model):
            model(*args)
    except Exception as e:
        raise BadInput(f"{type(model).__name__}: the example input does not run through the model "
                       f"({type(e).__name__}: {first_line(e)})") from None
    finally:
        for h in handles:
            h.remove()
    return macs
