"""Structural plans: which channels (and residual blocks) a pruned model loses (``plan_from_zeros``,
``apply_plan``).

A plan is versioned JSON-able data::

    {"version": 1,
     "keep":   {"layer1.0.conv1": [0, 2, 3, ...]},             # group id -> kept channel indices
     "groups": {"layer1.0.conv1": {"size": 16, "members": [    # group id -> its original size and wiring
                    {"module": "layer1.0.conv1", "kind": "out", "repeat": 1},
                    {"module": "layer1.0.bn1",   "kind": "bn",  "repeat": 1},
                    {"module": "layer1.0.conv2", "kind": "in",  "repeat": 1}]}},
     "add_bias": []}                                           # consumers that gained a (folded) bias

Only groups (``chita_edge.graph.channels``) that lose channels appear. A member of a module that sees a
concatenation (``torch.cat`` of several groups along the channels) also has ``"offset"`` and ``"total"``: the
group's channels start at ``offset`` of the module's ``total`` channels; each group removes its own slice.
A plan that also removes residual blocks (``chita_edge.graph.residual``) has ``"version": 2`` and ``"drop": {"layer1.1": "identity"}`` (module path ->
what replaces it); a plan without dropped blocks stays version 1. The plan names modules, so it can be replayed
on a fresh model without tracing or an example input; ``apply_plan`` shrinks the Conv/Linear/BatchNorm modules
in place (same objects, same names, so the state-dict keys are unchanged) and a structurally pruned state dict
then loads with ``strict=True``.

When is a channel removable? (what ``plan_from_zeros`` decides)
   A channel ``c`` of a group is a candidate when every producer (``kind == "out"``) has an all-zero output
   slice ``weight[c]`` and a zero ``bias[c]`` (``|x| <= tol``). Everything between the producers and the
   consumers is per-channel, so the channel's value at each consumer input is then a fixed tensor that does
   not depend on the model input -- but it need not be zero: BatchNorm turns a zero into
   ``beta - running_mean * gamma / sqrt(running_var + eps)``, a ReLU may or may not clamp that, a zero-padded
   depthwise conv makes it differ at the borders. We measure that value on ``example_input`` (eval mode) at
   every consumer and remove the channel only if removing it leaves the model output unchanged:

   * value zero everywhere: dropping the consumer's input slice changes nothing;
   * Linear consumer: the value ``v`` is fixed, so ``W[:, slice] @ v`` is folded into the consumer's bias;
   * Conv consumer without zero padding (``padding == 0`` or a non-zero ``padding_mode``) and a spatially
     constant value ``v``: ``v * W[:, c].sum()`` is folded into its bias;
   * anything else (e.g. a 3x3 zero-padded conv seeing a non-zero constant: the border would change) keeps
     the channel. To make such a channel removable, make its constant zero (e.g. BatchNorm ``beta = 0`` with
     zero running mean, or a negative constant before a ReLU).

   A consumer without a bias that needs a non-zero fold gets one; the plan lists it in ``"add_bias"`` so that
   ``apply_plan`` adds the same (zero-initialised) bias to a fresh model and the checkpoint still loads
   strictly. Every group keeps at least one channel. ``compact_model`` re-checks the output on
   ``example_input`` and raises ``RuntimeFailure`` if it moved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from chita_edge.core.errors import BadInput
from chita_edge.graph.channels import Member, traced_channel_groups
from chita_edge.graph.residual import REPLACEMENTS, set_submodule
from chita_edge.graph.trace import BN, CONV, Recorder, as_args, eval_no_grad

__all__ = ["ACT_ATOL", "KINDS", "PLAN_VERSION", "PLAN_VERSIONS", "apply_plan", "plan_from_zeros", "zero_plan"]

PLAN_VERSION = 1  # plans without dropped blocks; a plan with a "drop" field is version 2
PLAN_VERSIONS = (1, 2)
KINDS = ("out", "in", "dw", "bn", "scale")

# Absolute slack when deciding that a measured channel value is zero / constant (float rounding only).
ACT_ATOL = 1e-6


def _empty_plan() -> dict[str, Any]:
    return {"version": PLAN_VERSION, "keep": {}, "groups": {}, "add_bias": []}


def _foldable_conv(m: nn.Module) -> bool:
    """True when a spatially constant input channel contributes a constant to every output (no zero padding)."""
    if m.padding_mode != "zeros":
        return True
    if isinstance(m.padding, str):
        return m.padding == "valid" or all(k == 1 for k in m.kernel_size)
    return all(p == 0 for p in m.padding)


def _fold_delta(mod: nn.Module, m: Member, channel: int, acts: list[torch.Tensor], tol: float) -> torch.Tensor | None:
    """What the consumer loses when input ``channel`` is removed, as a bias change; None if not foldable.

    ``acts`` are the consumer's inputs recorded at each call; the channel's slice is fixed (input-independent).
    """
    if not acts:
        return None
    w = mod.weight.detach()
    delta = torch.zeros(w.shape[0], dtype=torch.float64)
    lo, r = m.offset + channel * m.repeat, m.repeat
    linear = isinstance(mod, nn.Linear)
    for act in acts:
        s = act.narrow(act.dim() - 1 if linear else 1, lo, r).to(torch.float64)  # a Linear reads the last dim
        if s.abs().max() <= tol + ACT_ATOL:
            continue  # zero: nothing to fold
        if len(acts) > 1:
            return None  # one bias cannot absorb the values of several call sites
        slack = tol + ACT_ATOL * (1.0 + float(s.abs().max()))
        if (s - s[:1]).abs().max() > slack:
            return None  # differs between samples: not a fixed value after all
        if linear:
            rows = s.reshape(-1, r)  # every sample and position (a Linear over the last of several dims)
            if (rows - rows[:1]).abs().max() > slack:
                return None
            delta += w[:, lo:lo + r].to(torch.float64) @ rows[0]
        else:
            v = s.transpose(0, 1).reshape(r, -1).mean(dim=1)  # per input channel
            if not _foldable_conv(mod) or (s - v.view(1, r, *([1] * (s.dim() - 2)))).abs().max() > slack:
                return None  # zero padding (or a varying value) would change the borders
            cols = w[:, lo:lo + r].to(torch.float64)
            delta += (cols * v.view(1, r, *([1] * (w.dim() - 2)))).sum(dim=tuple(range(1, w.dim())))
    return delta


def zero_plan(model: nn.Module, example_input: Any, tol: float) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The plan removing every removable zero channel, and the bias changes (per consumer) it needs."""
    if not (tol >= 0.0 and math.isfinite(tol)):
        raise BadInput(f"tol {tol}: expected a finite number >= 0")
    gm, groups = traced_channel_groups(model, example_input)
    mods = dict(model.named_modules())
    candidates: dict[str, list[int]] = {}
    with torch.no_grad():
        for g in groups:
            zero = torch.ones(g.size, dtype=torch.bool)
            for p in g.producers:  # a producer's output may be cut over several groups (at p.offset)
                mod, n = mods[p.module], g.size * p.repeat  # repeat: a grouped conv's group width
                zero &= mod.weight.detach().narrow(0, p.offset, n).reshape(g.size, -1).abs().amax(dim=1) <= tol
                if mod.bias is not None:
                    zero &= mod.bias.detach().narrow(0, p.offset, n).reshape(g.size, -1).abs().amax(dim=1) <= tol
            if zero.any():
                candidates[g.id] = zero.nonzero().flatten().tolist()
    plan, folds = _empty_plan(), {}
    if not candidates:
        return plan, folds
    consumers = frozenset(m.module for g in groups if g.id in candidates for m in g.consumers)
    rec = Recorder(gm, consumers)
    with eval_no_grad(model):
        rec.run(*as_args(example_input))
    add_bias: set[str] = set()
    for g in groups:
        if g.id not in candidates:
            continue
        removed: list[tuple[int, dict[str, torch.Tensor]]] = []
        for c in candidates[g.id]:
            deltas: dict[str, torch.Tensor] = {}
            for m in g.consumers:
                d = _fold_delta(mods[m.module], m, c, rec.inputs.get(m.module, []), tol)
                if d is None:
                    break
                if d.abs().max() > 0:
                    deltas[m.module] = d
            else:
                removed.append((c, deltas))
        if len(removed) == g.size:
            removed = removed[1:]  # a group keeps at least one channel
        if not removed:
            continue
        gone = {c for c, _ in removed}
        plan["keep"][g.id] = [c for c in range(g.size) if c not in gone]
        plan["groups"][g.id] = g.to_json()
        for _, deltas in removed:
            for name, d in deltas.items():
                folds[name] = folds[name] + d if name in folds else d
                if mods[name].bias is None:
                    add_bias.add(name)
    plan["add_bias"] = sorted(add_bias)
    return plan, folds


def plan_from_zeros(model: nn.Module, example_input: Any, tol: float = 0.0) -> dict[str, Any]:
    """A plan removing every channel whose producers' weights are zero and whose removal keeps the output.

    See the module docstring for the exact rule (BatchNorm constants are folded into the consumers' biases
    where that is exact). ``tol`` bounds what counts as a zero weight.
    """
    return zero_plan(model, example_input, tol)[0]


def _bad(where: str, msg: str) -> BadInput:
    return BadInput(f"{where}: plan {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _resolve_drop(model: nn.Module, plan: dict[str, Any], where: str) -> dict[str, str]:
    """The plan's dropped blocks {module path: replacement}, checked against ``model``."""
    drop = plan.get("drop", {})
    if plan.get("version") == 1 and drop:
        raise _bad(where, "field 'drop' needs version 2")
    if not isinstance(drop, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in drop.items()):
        raise _bad(where, "field 'drop' must be an object (module path -> replacement)")
    mods = dict(model.named_modules())
    for path, repl in drop.items():
        if not path or path not in mods:
            raise _bad(where, f"drop names module '{path}', which this model does not have (applied already?)")
        if repl not in REPLACEMENTS:
            raise _bad(where, f"drop['{path}'] = {repl!r}: expected one of {', '.join(sorted(REPLACEMENTS))}")
        if isinstance(mods[path], REPLACEMENTS[repl]) and not any(True for _ in mods[path].parameters()):
            raise _bad(where, f"drop['{path}']: the block is already removed (plan applied twice?)")
        if any(path.startswith(o + ".") for o in drop):
            raise _bad(where, f"drop['{path}'] lies inside another dropped block")
    return dict(drop)


def _resolve_plan(model: nn.Module, plan: Any, where: str) -> tuple[dict[str, dict[str, list[int]]], list[str]]:
    """Validate ``plan`` against ``model``; returns {module: {kind: kept indices along its dim}}, add_bias.
    Modules inside the plan's dropped blocks do not count as the model's (the channel part is applied after
    the drops)."""
    if not isinstance(plan, dict):
        raise _bad(where, f"must be a JSON object with 'version', 'keep' and 'groups', got {type(plan).__name__}")
    if plan.get("version") not in PLAN_VERSIONS:
        raise _bad(where, f"version {plan.get('version')!r} is not supported (expected one of "
                          f"{', '.join(map(str, PLAN_VERSIONS))}); re-create the plan with this chita-edge")
    keep, groups, add_bias = plan.get("keep"), plan.get("groups"), plan.get("add_bias", [])
    if not isinstance(keep, dict) or not isinstance(groups, dict):
        raise _bad(where, "fields 'keep' and 'groups' must be objects (group id -> ...)")
    if set(keep) != set(groups):
        odd = sorted(set(keep) ^ set(groups))
        raise _bad(where, f"group '{odd[0]}' must appear in both 'keep' and 'groups'")
    if not isinstance(add_bias, list) or not all(isinstance(n, str) for n in add_bias):
        raise _bad(where, "field 'add_bias' must be a list of module names")
    drop = _resolve_drop(model, plan, where)
    mods: dict[str, Any] = {n: m for n, m in [*model.named_modules(), *model.named_parameters(), *model.named_buffers()]
                            if not any(n == d or n.startswith(d + ".") for d in drop)}  # tensors: "scale" members
    gone: dict[str, dict[str, tuple[int, set[int]]]] = {}  # module -> slot -> (dim length, removed indices)
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for gid, entry in groups.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        members = entry.get("members") if isinstance(entry, dict) else None
        if not _is_int(size) or size < 1 or not isinstance(members, list) or not members:
            raise _bad(where, f"groups['{gid}'] must have an integer 'size' >= 1 and a non-empty 'members' list")
        kept = keep[gid]
        if not isinstance(kept, list) or not kept or not all(_is_int(i) for i in kept):
            raise _bad(where, f"keep['{gid}'] must be a non-empty list of channel indices")
        if any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
            raise _bad(where, f"keep['{gid}'] must be strictly increasing (no duplicates)")
        if kept[0] < 0 or kept[-1] >= size:
            raise _bad(where, f"keep['{gid}'] index {kept[0] if kept[0] < 0 else kept[-1]} is out of range "
                              f"0..{size - 1}")
        for mem in members:
            if not isinstance(mem, dict) or mem.get("kind") not in KINDS or not isinstance(mem.get("module"), str):
                raise _bad(where, f"groups['{gid}'] member {mem!r}: expected {{'module': str, 'kind': one of "
                                  f"{', '.join(KINDS)}, 'repeat': int}}")
            name, kind, r = mem["module"], mem["kind"], mem.get("repeat", 1)
            off, total = mem.get("offset", 0), mem.get("total", 0)
            if not _is_int(r) or r < 1:
                raise _bad(where, f"groups['{gid}'] member '{name}': 'repeat' must be an integer >= 1")
            if not (_is_int(off) and _is_int(total) and off >= 0 and (total == 0 and off == 0
                                                                      or off + size * r <= total)):
                raise _bad(where, f"groups['{gid}'] member '{name}': 'offset' {off!r} and 'total' {total!r} must be "
                                  f"integers with offset + size * repeat <= total (or both 0)")
            if name not in mods:
                raise _bad(where, f"group '{gid}' names module '{name}', which this model does not have")
            mod = mods[name]
            width = mod.out_channels // mod.groups if kind == "dw" and isinstance(mod, CONV) else 1
            if (off % width or r % width) and _channels(mod, kind) is not None:
                raise _bad(where, f"group '{gid}': grouped conv '{name}' has groups of {width} channels, the member's "
                                  f"offset {off} and repeat {r} must be multiples of it (whole groups)")
            have = _channels(mod, kind)
            if have is None:
                raise _bad(where, f"group '{gid}': module '{name}' ({type(mod).__name__}) cannot be a "
                                  f"'{kind}' member")
            if have != (total or size * r):
                raise _bad(where, f"group '{gid}': module '{name}' has {have} {kind} channels, the plan expects "
                                  f"{total or size * r} (made for another model, or applied already?)")
            slot = "out" if kind in ("dw", "bn", "scale") else kind
            lo, hi = off, off + size * r
            if any(a < hi and lo < b for a, b in spans.get((name, slot), [])):
                raise _bad(where, f"module '{name}' appears as '{kind}' in more than one group")
            spans.setdefault((name, slot), []).append((lo, hi))
            kept_set = set(kept)
            removed = gone.setdefault(name, {}).setdefault(slot, (have, set()))[1]
            removed.update(off + c * r + j for c in range(size) if c not in kept_set for j in range(r))
    sel = {name: {slot: [i for i in range(n) if i not in removed] for slot, (n, removed) in slots.items()}
           for name, slots in gone.items()}
    for name in add_bias:
        if not isinstance(mods.get(name), (nn.Linear, *CONV)):
            raise _bad(where, f"add_bias names '{name}', which is not a Conv/Linear module of this model")
    return sel, add_bias


def _channels(mod: nn.Module | torch.Tensor, kind: str) -> int | None:
    """The size of ``mod``'s dim that a member of ``kind`` slices, or None if the kind does not fit."""
    if isinstance(mod, torch.Tensor):
        return mod.shape[0] if kind == "scale" and mod.dim() else None
    if kind in ("out", "in") and isinstance(mod, nn.Linear):
        return mod.out_features if kind == "out" else mod.in_features
    if isinstance(mod, CONV) and not mod.transposed:
        if kind in ("out", "in") and mod.groups == 1:
            return mod.out_channels if kind == "out" else mod.in_channels
        if kind == "dw" and mod.groups > 1 and mod.in_channels == mod.out_channels:
            return mod.out_channels
    if kind == "bn" and isinstance(mod, BN):
        return mod.num_features
    return None


def _take(t: torch.Tensor, dim: int, idx: list[int]) -> torch.Tensor:
    return t.detach().index_select(dim, torch.tensor(idx, dtype=torch.long, device=t.device)).clone()


def _set_param(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value)  # a registered buffer stays a buffer


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Any, where: str = "plan") -> None:
    """Shrink ``model``'s Conv/Linear/BatchNorm modules in place to the channels ``plan`` keeps, after replacing
    the residual blocks the plan drops (``"drop"``) by ``nn.Identity`` (or their activation).

    The modules stay the same objects under the same names, so the state-dict keys are unchanged; a state dict
    saved from the compacted model then loads with ``strict=True``. Existing weights are sliced (on a fresh
    model they are about to be overwritten). The plan is checked fully before anything changes; a bad plan
    raises ``BadInput`` naming ``where`` (e.g. the checkpoint path).
    """
    sel, add_bias = _resolve_plan(model, plan, where)
    for path, repl in plan.get("drop", {}).items():
        set_submodule(model, path, REPLACEMENTS[repl]())
    mods = dict(model.named_modules())
    for name in add_bias:
        mod = mods[name]
        if mod.bias is None:
            w = mod.weight
            mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    for name, slots in sel.items():
        out, inp = slots.get("out"), slots.get("in")
        if name not in mods:  # a "scale" member: a parameter or buffer of its owner
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner)
            _set_param(mod, attr, _take(getattr(mod, attr), 0, out))
            continue
        mod = mods[name]
        if isinstance(mod, BN):
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    _set_param(mod, p, _take(getattr(mod, p), 0, out))
            mod.num_features = len(out)
            continue
        grouped = isinstance(mod, CONV) and mod.groups > 1  # depthwise or grouped: whole groups go
        width = mod.out_channels // mod.groups if grouped else 1
        if out is not None:
            _set_param(mod, "weight", _take(mod.weight, 0, out))
            if mod.bias is not None:
                _set_param(mod, "bias", _take(mod.bias, 0, out))
        if inp is not None:
            _set_param(mod, "weight", _take(mod.weight, 1, inp))
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape[0], mod.weight.shape[1]
        elif grouped:
            mod.in_channels = mod.out_channels = mod.weight.shape[0]
            mod.groups = mod.weight.shape[0] // width
        else:
            mod.out_channels, mod.in_channels = mod.weight.shape[0], mod.weight.shape[1]

