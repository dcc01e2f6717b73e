"""Gradual pruning as in the CHITA paper: prune a little, fine-tune with the mask, prune more, ...

With E epochs and a pruning step every K epochs there are T = ceil(E / K) steps at the sparsities of the cubic
schedule s_t = s + (s0 - s)(1 - t/(T-1))^3 from s0 = 0.5 (``cubic_schedule``). Step t:

1. prune the current weights to s_t with ``prune_weights`` (CHITA, CHITA++, BSO or a magnitude baseline; or any
   ``prune_fn`` with the same signature, e.g. structured or budget-driven pruning), starting CHITA++'s own
   schedule at s_{t-1};
2. keep every weight pruned at an earlier step at zero (multiply by the previous mask);
3. fine-tune for K epochs (the last step: what is left of E) with the new mask (``finetune``), each step its
   own cosine learning-rate cycle, BatchNorm statistics re-estimated at its end.

The run is resumable: after every step the model and the record are written atomically to ``state_path``, and
the fine-tuning of step t keeps its own state in ``<state_path>.step<t>``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chita_edge.core.data import Dataset
from chita_edge.core.errors import BadInput
from chita_edge.core.evaluate import accuracy
from chita_edge.models.zoo import default_prunable
from chita_edge.pruning.layers import PrunableParam, find_prunable, layer_sparsity
from chita_edge.pruning.prune import PruneConfig, prune_weights
from chita_edge.pruning.schedule import cubic_schedule
from chita_edge.training.finetune import FinetuneConfig, Progress, finetune, save_state
from chita_edge.training.masks import masks_from_zeros

log = logging.getLogger(__name__)

STATE_FORMAT = "chita-edge/gradual-state-v1"
PruneFn = Callable[[nn.Module, list[PrunableParam], Dataset, PruneConfig, "Progress | None"], Any]


@dataclass(frozen=True, kw_only=True)
class GradualConfig:
    """E epochs of fine-tuning in all, a pruning step every K of them, sparsities from ``start_sparsity``."""

    epochs: int
    prune_every: int = 1
    start_sparsity: float = 0.5
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # its ``epochs`` is set per step

    def validate(self, target: float) -> None:
        if self.epochs < 1:
            raise BadInput(f"--epochs {self.epochs}: expected >= 1")
        if self.prune_every < 1:
            raise BadInput(f"--prune-every {self.prune_every}: expected >= 1")
        if not (0 <= self.start_sparsity < 1):
            raise BadInput(f"--gradual-start {self.start_sparsity}: expected a fraction in [0, 1)")
        dataclasses.replace(self.finetune, epochs=1).validate()
        if not (0 <= target < 1):
            raise BadInput(f"--sparsity {target}: expected a fraction in [0, 1)")


def gradual_schedule(target: float, epochs: int, prune_every: int, start: float = 0.5) -> list[tuple[float, int]]:
    """[(sparsity of step t, fine-tuning epochs after it)]: cubic from ``start`` to ``target``, epochs summing to E."""
    steps = max(1, math.ceil(epochs / prune_every))
    sparsities = cubic_schedule(target, steps, start)
    if len(sparsities) == 1:  # target <= start: one step, then all the epochs
        return [(target, epochs)]
    return [(s, prune_every if t < steps - 1 else epochs - prune_every * (steps - 1))
            for t, s in enumerate(sparsities)]


@dataclass
class GradualReport:
    method: str
    target_sparsity: float
    sparsity: float
    initial_accuracy: float
    accuracy: float
    steps: list[dict[str, Any]]
    layer_sparsity: dict[str, float]
    timings: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _overall_sparsity(model: nn.Module, params: list[PrunableParam]) -> tuple[float, dict[str, float]]:
    ls = layer_sparsity(model, params)
    total = sum(q.numel for q in params)
    return sum(ls[q.name] * q.numel for q in params) / total, ls


@torch.no_grad()
def _keep_earlier_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero every weight that an earlier step pruned; returns how many the pruning step had revived."""
    named = dict(model.named_parameters())
    revived = 0
    for name, m in masks.items():
        w = named.get(name)
        if w is None or w.shape != m.shape:  # removed or reshaped by a structural step
            continue
        revived += int(((w != 0) & ~m).sum())
        w.mul_(m.to(w.dtype))
    return revived


def gradual_prune(
    model: nn.Module,
    data: Dataset,
    prune_cfg: PruneConfig,
    cfg: GradualConfig,
    *,
    filter_fn: Callable[[nn.Module, str], bool] = default_prunable,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    prune_fn: PruneFn = prune_weights,
    should_stop: Callable[[], bool] | None = None,
) -> GradualReport:
    """Prune ``model`` in place to ``prune_cfg.sparsity`` in steps, with masked fine-tuning between them.

    ``teacher``: a dense copy to distil from during the fine-tuning (None: plain cross-entropy).
    ``on_epoch(record)`` gets each fine-tuning epoch's record with the step index added.
    """
    prune_cfg.validate()
    cfg.validate(prune_cfg.sparsity)
    t0 = time.perf_counter()
    plan = gradual_schedule(prune_cfg.sparsity, cfg.epochs, cfg.prune_every, cfg.start_sparsity)
    state_file = Path(state_path) if state_path is not None else None
    if resume and (state_file is None or not state_file.exists()):
        raise BadInput(f"{state_file}: no gradual-pruning state to resume from (run without --resume to start)")
    steps: list[dict[str, Any]] = []
    initial_acc = accuracy(model, data.x_test, data.y_test)
    first = 0
    if resume:
        assert state_file is not None
        try:
            st = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BadInput(f"{state_file}: not a readable gradual-pruning state ({type(e).__name__})") from None
        if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
            raise BadInput(f"{state_file}: not a chita-edge gradual-pruning state file")
        if st.get("prune") != asdict(prune_cfg) or st.get("gradual") != asdict(cfg):
            raise BadInput(f"{state_file}: written with other settings; resume with the same options or remove it")
        model.load_state_dict(st["model"], strict=True)
        steps, first, initial_acc = list(st["steps"]), int(st["done"]), float(st["initial_accuracy"])
        log.info("resuming gradual pruning after step %d of %d", first, len(plan))

    prev_s = max(cfg.start_sparsity, prune_cfg.start_sparsity)
    if first > 0:
        prev_s = plan[first - 1][0]
    for t in range(first, len(plan)):
        s_t, ep_t = plan[t]
        # A resumed step redoes its pruning from the previous step's weights (so structural steps get their
        # shapes back); its fine-tuning then continues from its own state file, masks included.
        ft_state = Path(f"{state_file}.step{t}") if state_file is not None else None
        ft_cfg = dataclasses.replace(cfg.finetune, epochs=ep_t, seed=cfg.finetune.seed + t)
        resume_ft = resume and ft_state is not None and ft_state.exists()
        params = find_prunable(model, filter_fn)
        earlier = masks_from_zeros(model, params)
        step_cfg = dataclasses.replace(prune_cfg, sparsity=s_t, seed=prune_cfg.seed + 1000 * t,
                                       start_sparsity=min(prev_s, s_t) if t > 0 else prune_cfg.start_sparsity)
        tp = time.perf_counter()
        rep = prune_fn(model, params, data, step_cfg, progress)
        params = find_prunable(model, filter_fn)
        revived = _keep_earlier_zeros(model, earlier) if t > 0 else 0
        if revived:
            log.warning("step %d: the pruning step revived %d weights pruned earlier; they were zeroed again",
                        t + 1, revived)
        rec: dict[str, Any] = {"step": t + 1, "target_sparsity": s_t,
                               "sparsity": _overall_sparsity(model, params)[0], "revived": revived,
                               "prune_s": time.perf_counter() - tp,
                               "pruned_accuracy": accuracy(model, data.x_test, data.y_test),
                               "prune_report": rep.to_dict() if hasattr(rep, "to_dict") else None}
        steps.append(rec)

        def epoch_cb(r: dict[str, Any], _t: int = t) -> None:
            if on_epoch:
                on_epoch({"step": _t + 1, **r})

        ft = finetune(model, data, ft_cfg, masks=masks_from_zeros(model, params), teacher=teacher,
                      progress=progress, on_epoch=epoch_cb, state_path=ft_state, resume=resume_ft,
                      should_stop=should_stop)
        rec.update(epochs=ep_t, accuracy=ft.accuracy, history=ft.history)
        prev_s = s_t
        log.info("gradual step %d/%d: sparsity %.4f, accuracy %.2f %% after %d epochs", t + 1, len(plan),
                 rec.get("sparsity", s_t), ft.accuracy, ep_t)
        if state_file is not None:
            save_state(state_file, {"format": STATE_FORMAT, "prune": asdict(prune_cfg), "gradual": asdict(cfg),
                               "done": t + 1, "steps": steps, "initial_accuracy": initial_acc,
                               "model": {k: v.detach().clone() for k, v in model.state_dict().items()}})
            if ft_state is not None:
                ft_state.unlink(missing_ok=True)
        if progress:
            progress("gradual steps", t + 1, len(plan))

    params = find_prunable(model, filter_fn)
    s, ls = _overall_sparsity(model, params)
    return GradualReport(
        method=prune_cfg.method, target_sparsity=prune_cfg.sparsity, sparsity=s, initial_accuracy=initial_acc,
        accuracy=accuracy(model, data.x_test, data.y_test), steps=steps, layer_sparsity=ls,
        timings={"total_s": time.perf_counter() - t0}, config={"prune": asdict(prune_cfg), "gradual": asdict(cfg)},
    )


def _cfg_dict(cfg: GradualConfig) -> dict[str, Any]:
    return asdict(cfg)


__all__ = ["GradualConfig", "GradualReport", "gradual_prune", "gradual_schedule"]
