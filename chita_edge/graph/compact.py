"""Compaction (``compact_model``): a deep copy of a model with every removable channel and every removable
residual block physically removed, whose output equals the original's.

The channels go by the rule of ``chita_edge.graph.plan`` (``plan_from_zeros``, with the bias folds it needs),
the blocks by that of ``chita_edge.graph.residual`` (every Conv/Linear of ``f`` zero and ``f(x)`` measured
zero on the example input); the plan that did it comes back with the copy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from chita_edge.core.errors import RuntimeFailure
from chita_edge.graph.plan import ACT_ATOL, apply_plan, zero_plan
from chita_edge.graph.residual import REPLACEMENTS, set_submodule, traced_blocks
from chita_edge.graph.trace import CONV, Recorder, as_args, eval_no_grad

__all__ = ["compact_model"]


def _zero_blocks(model: nn.Module, example_input: Any, tol: float) -> dict[str, str]:
    """{block path: replacement} of the residual blocks whose f is exactly zero (every Conv/Linear of f zero,
    f(x) zero on ``example_input``); nested ones left out when their outer block goes."""
    gm, blocks = traced_blocks(model, example_input)
    if not blocks:
        return {}
    mods = dict(model.named_modules())
    cand = []
    with torch.no_grad():
        for b in blocks:
            zero = True
            for name in b.modules:
                m = mods[name]
                if isinstance(m, (nn.Linear, *CONV)):
                    zero &= bool(m.weight.detach().abs().max() <= tol) if m.weight.numel() else True
                    if m.bias is not None and m.bias.numel():
                        zero &= bool(m.bias.detach().abs().max() <= tol)
            if zero:
                cand.append(b)
    if not cand:
        return {}
    rec = Recorder(gm, values=frozenset(b.output for b in cand))
    with eval_no_grad(model):
        rec.run(*as_args(example_input))
    out: dict[str, str] = {}
    for b in sorted(cand, key=lambda b: b.id.count(".")):
        v = rec.values.get(b.output)
        if v is None or (v.numel() and float(v.abs().max()) > tol + ACT_ATOL):
            continue
        if any(b.id.startswith(o + ".") for o in out):
            continue
        out[b.id] = b.replacement
    return out


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _leaves(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _leaves(v)]
    return []


def _double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_double(v) for v in x)
    return x


def _check_same_function(model: nn.Module, new: nn.Module, args: tuple[Any, ...], tol: float) -> None:
    """``RuntimeFailure`` unless ``new`` computes ``model``'s function on ``args``. Both run in float64 (copies):
    in float32 the bias folds' rounding alone reached 3.4e-5 of the output's scale after ~20 layers of a
    ResNet18; in float64 only the folds' own float32 rounding is left (a structural mistake moves the output by
    far more). A model that cannot run in float64 is compared in its own dtype at 1e-4 of the output's scale."""
    try:
        pair, rel = (copy.deepcopy(model).double(), copy.deepcopy(new).double()), 1e-5
        with eval_no_grad(pair[0]), eval_no_grad(pair[1]):
            ref, got = _leaves(pair[0](*_double(args))), _leaves(pair[1](*_double(args)))
    except RuntimeError:  # an op without a float64 kernel, or a dtype fixed inside the forward
        rel = 1e-4
        with eval_no_grad(model), eval_no_grad(new):
            ref, got = _leaves(model(*args)), _leaves(new(*args))
    if len(ref) != len(got):
        raise RuntimeFailure(f"compact_model: the compacted model returns {len(got)} tensors, not {len(ref)}")
    for a, b in zip(ref, got, strict=True):
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = float(a.double().abs().max()) if a.numel() else 0.0
        if a.shape != b.shape or diff > rel * (1.0 + scale):
            raise RuntimeFailure(f"compact_model: the compacted model's output moved by {diff:.3g} at an output "
                                 f"scale of {scale:.3g} (shape {tuple(b.shape)} vs {tuple(a.shape)}): a channel "
                                 "or block removed that was not inert"
                                 + (f"; weights up to tol={tol:g} were taken as zero: use a smaller tol" if tol else ""))


def compact_model(model: nn.Module, example_input: Any, *, tol: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """A deep copy of ``model`` with every removable channel physically removed, and the plan that did it.

    Step 0: on a deep copy, replace every residual block whose f is exactly zero (``residual_blocks``) by
            ``nn.Identity`` or its activation.
    Step 1: find the removable channels of the copy (``plan_from_zeros``) and the bias folds they need.
    Step 2: add the folds to the consumers' biases (creating a bias where the plan says so).
    Step 3: ``apply_plan`` on the copy (the channel part; the plan records the drops as well).
    Step 4: check that the copy's output on ``example_input`` equals the original's (``RuntimeFailure`` if not).
    ``model`` itself is not changed. A model without zero channels comes back as an unchanged copy.
    """
    drop = _zero_blocks(model, example_input, tol)
    new = copy.deepcopy(model)
    for path, repl in drop.items():
        set_submodule(new, path, REPLACEMENTS[repl]())
    plan, folds = zero_plan(new, example_input, tol)
    with torch.no_grad():
        for name, delta in folds.items():
            mod = new.get_submodule(name)
            if mod.bias is None:
                w = mod.weight
                mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            mod.bias.add_(delta.to(mod.bias.dtype))
    apply_plan(new, plan, where="compact_model")
    if drop:
        plan = {**plan, "version": 2, "drop": drop}
    _check_same_function(model, new, as_args(example_input), tol)
    return new, plan

